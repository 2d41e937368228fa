//! When the scheduled reconcile runs: a five-field cron expression (minute hour day-of-month
//! month day-of-week, in UTC) or a descriptor (`@hourly`, `@daily`, ..., `@every 15m`). Pure:
//! times are seconds since the Unix epoch, passed in.

use std::time::Duration;

/// Our default: every 15 minutes (upstream waits until 04:30 each day).
pub const DEFAULT_EXPRESSION: &str = "*/15 * * * *";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// A fixed period after the previous run.
    Every(Duration),
    Cron(Box<Fields>),
}

/// The allowed values of each field, as bit sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fields {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Whether day-of-month / day-of-week were restricted (not `*`): when both are, a day
    /// matching either one matches, as in every cron.
    days_restricted: bool,
    weekdays_restricted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cron expression {expression:?}: {why}")]
pub struct CronError {
    pub expression: String,
    pub why: String,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn value(text: &str, names: &[&str], base: u32) -> Option<u32> {
    if let Ok(v) = text.parse::<u32>() {
        return Some(v);
    }
    let lower = text.to_ascii_lowercase();
    names
        .iter()
        .position(|n| *n == lower)
        .map(|i| i as u32 + base)
}

/// The bit set of one field whose values lie in `min..=max`.
fn field(text: &str, min: u32, max: u32, names: &[&str], base: u32) -> Result<u64, String> {
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("bad step in {part:?}"))?,
            ),
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = value(a, names, base).ok_or_else(|| format!("bad value {a:?}"))?;
            let b = value(b, names, base).ok_or_else(|| format!("bad value {b:?}"))?;
            (a, b)
        } else {
            let v = value(range, names, base).ok_or_else(|| format!("bad value {range:?}"))?;
            // `5/10` means from 5 to the end in steps of 10.
            (v, if part.contains('/') { max } else { v })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("{part:?} is outside {min}-{max}"));
        }
        let mut v = lo;
        while v <= hi {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

fn every(text: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().ok()?;
        digits.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return None,
        };
    }
    (digits.is_empty() && total > 0).then(|| Duration::from_secs(total))
}

impl Schedule {
    pub fn parse(expression: &str) -> Result<Schedule, CronError> {
        let err = |why: String| CronError {
            expression: expression.to_string(),
            why,
        };
        let text = expression.trim();
        let text = match text {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        if let Some(period) = text.strip_prefix("@every") {
            return every(period)
                .map(Schedule::Every)
                .ok_or_else(|| err("expected a period such as \"@every 15m\"".into()));
        }
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = parts.as_slice() else {
            return Err(err(format!("expected 5 fields, found {}", parts.len())));
        };
        let weekdays = field(dow, 0, 7, &WEEKDAYS, 0).map_err(&err)?;
        Ok(Schedule::Cron(Box::new(Fields {
            minutes: field(minute, 0, 59, &[], 0).map_err(&err)?,
            hours: field(hour, 0, 23, &[], 0).map_err(&err)? as u32,
            days: field(dom, 1, 31, &[], 0).map_err(&err)? as u32,
            months: field(month, 1, 12, &MONTHS, 1).map_err(&err)? as u16,
            // 7 is Sunday too.
            weekdays: ((weekdays | (weekdays >> 7)) & 0x7f) as u8,
            days_restricted: *dom != "*",
            weekdays_restricted: *dow != "*",
        })))
    }

    /// The first run strictly after `now` (seconds since the epoch, UTC); None when the
    /// expression never matches (such as 30 February).
    pub fn next_after(&self, now: i64) -> Option<i64> {
        match self {
            Schedule::Every(period) => Some(now + period.as_secs() as i64),
            Schedule::Cron(f) => f.next_after(now),
        }
    }
}

/// `secs` since the epoch as RFC 3339 in UTC (`2026-11-27T22:26:00Z`).
pub fn rfc3339(secs: i64) -> String {
    let (year, month, day) = civil(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// (year, month 1-12, day 1-31) of a day counted from 1970-01-01.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

impl Fields {
    fn day_matches(&self, days: i64) -> bool {
        let (_, month, day) = civil(days);
        // 1970-01-01 was a Thursday.
        let weekday = (days + 4).rem_euclid(7) as u32;
        if self.months & (1 << month) == 0 {
            return false;
        }
        let by_date = self.days & (1 << day) != 0;
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        if self.days_restricted && self.weekdays_restricted {
            by_date || by_weekday
        } else {
            by_date && by_weekday
        }
    }

    fn next_after(&self, now: i64) -> Option<i64> {
        let start = now.div_euclid(60) + 1;
        let first_day = start.div_euclid(1440);
        // Five years covers every date that exists (29 February on a given weekday aside).
        for day in first_day..first_day + 366 * 5 {
            if !self.day_matches(day) {
                continue;
            }
            for hour in 0..24i64 {
                if self.hours & (1 << hour) == 0 {
                    continue;
                }
                for minute in 0..60i64 {
                    let at = day * 1440 + hour * 60 + minute;
                    if at >= start && self.minutes & (1 << minute) != 0 {
                        return Some(at * 60);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-27 22:26:00 UTC, a Friday.
    const NOW: i64 = 1_795_818_360;

    fn next(expr: &str, now: i64) -> i64 {
        Schedule::parse(expr).unwrap().next_after(now).unwrap()
    }

    #[test]
    fn calendar() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(NOW.div_euclid(86_400)), (2026, 11, 27));
        assert_eq!(rfc3339(NOW), "2026-11-27T22:26:00Z");
    }

    #[test]
    fn schedules() {
        assert_eq!(next("*/15 * * * *", NOW), NOW + 4 * 60);
        assert_eq!(next("* * * * *", NOW + 5), NOW + 60);
        // Upstream's default: 04:30 the next day.
        assert_eq!(
            next("30 4 * * *", NOW),
            NOW - (22 * 3600 + 26 * 60) + 86_400 + 4 * 3600 + 1800
        );
        assert_eq!(next("@hourly", NOW), NOW + 34 * 60);
        assert_eq!(next("@every 2s", NOW), NOW + 2);
        assert_eq!(next("@every 1h30m", NOW), NOW + 5400);
        // Sunday 00:00: two days and 1h34m ahead.
        assert_eq!(next("0 0 * * sun", NOW), NOW + 86_400 + 94 * 60);
        assert_eq!(next("0 0 * * 7", NOW), NOW + 86_400 + 94 * 60);
        // 1 December 00:00.
        assert_eq!(next("0 0 1 dec *", NOW), NOW + 3 * 86_400 + 94 * 60);
        assert_eq!(Schedule::parse("0 0 30 2 *").unwrap().next_after(NOW), None);
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "* * * *",
            "60 * * * *",
            "*/0 * * * *",
            "a b c d e",
            "@every",
            "@every 5x",
            "5-1 * * * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
