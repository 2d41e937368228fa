//! When the scheduled reconcile runs: a five-field cron expression (minute hour day-of-month
//! month day-of-week, in UTC), a descriptor (`@hourly`, `@daily`, ...) or a period
//! (`@every 15m`). Cron expressions are croner's; a period is a jiff duration. Pure: the
//! current time is passed in.

use croner::parser::{CronParser, Seconds};
use croner::Cron;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

/// Our default: every 15 minutes (upstream waits until 04:30 each day).
pub const DEFAULT_EXPRESSION: &str = "*/15 * * * *";

#[derive(Clone, Debug)]
pub enum Schedule {
    /// A fixed period after the previous run.
    Every(SignedDuration),
    Cron(Box<Cron>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cron expression {expression:?}: {why}")]
pub struct CronError {
    pub expression: String,
    pub why: String,
}

/// A period in whole seconds, at least one, as upstream's cron library takes `@every`: a
/// reconcile lists every pod and allocation, and `@every 15ms` (a slip for `15m`) would have
/// the controller do so without a pause.
fn whole_seconds(period: SignedDuration) -> SignedDuration {
    SignedDuration::from_secs(period.as_secs().max(1))
}

impl Schedule {
    pub fn parse(expression: &str) -> Result<Schedule, CronError> {
        let err = |why: String| CronError {
            expression: expression.to_string(),
            why,
        };
        let text = expression.trim();
        if let Some(period) = text.strip_prefix("@every") {
            // Go's time.ParseDuration forms ("10m", "1h30m") read as jiff's friendly format.
            return period
                .trim()
                .parse::<SignedDuration>()
                .ok()
                .filter(|d| d.is_positive())
                .map(|d| Schedule::Every(whole_seconds(d)))
                .ok_or_else(|| err("expected a period such as \"@every 15m\"".into()));
        }
        let text = if text.eq_ignore_ascii_case("@midnight") {
            "@daily"
        } else {
            text
        };
        CronParser::builder()
            .seconds(Seconds::Disallowed)
            .build()
            .parse(text)
            .map(|cron| Schedule::Cron(Box::new(cron)))
            .map_err(|e| err(e.to_string()))
    }

    /// The first run strictly after `now` (UTC); None when the expression never matches (such
    /// as 30 February).
    pub fn next_after(&self, now: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Every(period) => now.checked_add(*period).ok(),
            Schedule::Cron(cron) => cron
                .find_next_occurrence(&now.to_zoned(TimeZone::UTC), false)
                .ok()
                .map(|at| at.timestamp()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-27 22:26:00 UTC, a Friday.
    const NOW: i64 = 1_795_818_360;

    fn next(expr: &str, now: i64) -> i64 {
        let now = Timestamp::from_second(now).unwrap();
        Schedule::parse(expr)
            .unwrap()
            .next_after(now)
            .unwrap()
            .as_second()
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
        assert_eq!(next("@every 10m", NOW), NOW + 600);
        assert_eq!(next("@every 1h30m", NOW), NOW + 5400);
        // Whole seconds, at least one.
        assert_eq!(next("@every 15ms", NOW), NOW + 1);
        assert_eq!(next("@every 2.9s", NOW), NOW + 2);
        // Sunday 00:00: two days and 1h34m ahead.
        assert_eq!(next("0 0 * * sun", NOW), NOW + 86_400 + 94 * 60);
        assert_eq!(next("0 0 * * 7", NOW), NOW + 86_400 + 94 * 60);
        assert_eq!(next("@weekly", NOW), NOW + 86_400 + 94 * 60);
        // 1 December 00:00.
        assert_eq!(next("0 0 1 dec *", NOW), NOW + 3 * 86_400 + 94 * 60);
        assert_eq!(next("@midnight", NOW), NOW + 94 * 60);
        // 30 February parses, and never comes (the controller then falls back to the default:
        // `controller::schedule`).
        let never = Schedule::parse("0 0 30 2 *").expect("30 February is a valid expression");
        assert_eq!(never.next_after(Timestamp::from_second(NOW).unwrap()), None);
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "* * * *",
            "0 * * * * *",
            "60 * * * *",
            "*/0 * * * *",
            "a b c d e",
            "@every",
            "@every 5x",
            "@every -5m",
            "5-1 * * * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
