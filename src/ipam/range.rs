//! A configured range resolved into the offsets that may be handed out.

use std::fmt;
use std::net::IpAddr;

use super::addr::{parse_ip, Cidr};
use super::intervals::Intervals;

/// Why a range cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("cannot parse range {0:?}: expected a CIDR such as 10.0.0.0/24 or start-end/len")]
    BadRange(String),
    #[error("invalid range start for CIDR {cidr}: {start}")]
    StartOutside { cidr: Cidr, start: IpAddr },
    #[error("range {0} has no usable IP addresses (a /31, /32, /127 or /128 has none)")]
    NoUsable(Cidr),
    #[error("range_start {start} is the broadcast address of {cidr}: no usable address is left")]
    StartBroadcast { cidr: Cidr, start: IpAddr },
    #[error(
        "range {0} leaves no address to hand out (range_start, range_end and exclude cover it all)"
    )]
    NothingLeft(Cidr),
    #[error("cannot parse exclude {0:?}: expected a CIDR or an IP address")]
    BadExclude(String),
    #[error("exclude {exclude} is not of the same IP family as range {cidr}")]
    ExcludeFamily { cidr: Cidr, exclude: Cidr },
    #[error("{field} {ip} is not of the same IP family as range {cidr}")]
    Family {
        field: &'static str,
        ip: IpAddr,
        cidr: Cidr,
    },
}

/// A range as configured: the network, optional bounds and exclusions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSpec {
    /// The network (host bits cleared).
    pub cidr: Cidr,
    pub start: Option<IpAddr>,
    pub end: Option<IpAddr>,
    pub exclude: Vec<Cidr>,
}

/// Parses the text of a `range` field: a CIDR (host bits dropped) or `start-end/len`, whose
/// network is that of `end/len` and whose start must lie inside it.
pub fn parse_range_text(text: &str) -> Result<(Cidr, Option<IpAddr>, Option<IpAddr>), RangeError> {
    let bad = || RangeError::BadRange(text.to_string());
    match text.split_once('-') {
        Some((start, rest)) => {
            let (end, len) = rest.split_once('/').ok_or_else(bad)?;
            let start = parse_ip(start).ok_or_else(bad)?;
            // As written: an IPv4-mapped end keeps its IPv6 prefix length.
            let cidr = Cidr::parse(&format!("{}/{len}", end.trim()), false)
                .ok_or_else(bad)?
                .network();
            let end = parse_ip(end).ok_or_else(bad)?;
            if !cidr.contains(start) {
                return Err(RangeError::StartOutside { cidr, start });
            }
            Ok((cidr, Some(start), Some(end)))
        }
        None => Ok((
            Cidr::parse(text, false).ok_or_else(bad)?.network(),
            None,
            None,
        )),
    }
}

/// Parses one `exclude` entry: a CIDR or a bare address.
pub fn parse_exclude(text: &str) -> Result<Cidr, RangeError> {
    Cidr::parse(text, true)
        .map(|c| c.network())
        .ok_or_else(|| RangeError::BadExclude(text.to_string()))
}

/// A range ready for allocation: offsets `first..=last` from the network address, minus `blocked`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub cidr: Cidr,
    pub first: u128,
    pub last: u128,
    /// Exclusions and the gateway, clipped to `first..=last`.
    pub blocked: Intervals,
}

impl Range {
    /// Applies upstream's bounds rules: never the network or broadcast address; a start inside
    /// the range narrows it (an error outside it); an end inside the range and not before the
    /// start narrows it, otherwise it is ignored. The gateway is never handed out.
    pub fn resolve(spec: &RangeSpec, gateway: Option<IpAddr>) -> Result<Range, RangeError> {
        let cidr = spec.cidr.network();
        if cidr.host_bits() < 2 {
            return Err(RangeError::NoUsable(cidr));
        }
        let mut first = 1;
        let mut last = cidr.last_offset() - 1;
        if let Some(start) = spec.start {
            check_family("range_start", start, cidr)?;
            let off = cidr
                .offset_of(start)
                .ok_or(RangeError::StartOutside { cidr, start })?;
            if off > last {
                return Err(RangeError::StartBroadcast { cidr, start });
            }
            first = off.max(first);
        }
        if let Some(end) = spec.end {
            check_family("range_end", end, cidr)?;
            if let Some(off) = cidr.offset_of(end).filter(|off| *off >= first) {
                last = off.min(last);
            }
        }
        let mut blocked = Vec::with_capacity(spec.exclude.len() + 1);
        for exclude in &spec.exclude {
            if exclude.is_v6() != cidr.is_v6() {
                return Err(RangeError::ExcludeFamily {
                    cidr,
                    exclude: *exclude,
                });
            }
            if let Some(span) = clip(cidr, exclude.network()) {
                blocked.push(span);
            }
        }
        if let Some(off) = gateway.and_then(|gw| cidr.offset_of(gw)) {
            blocked.push((off, off));
        }
        let blocked = Intervals::from_unsorted(
            blocked
                .into_iter()
                .filter(|(a, b)| *b >= first && *a <= last)
                .map(|(a, b)| (a.max(first), b.min(last)))
                .collect(),
        );
        Ok(Range {
            cidr,
            first,
            last,
            blocked,
        })
    }

    /// As [`Range::resolve`], except that a range too small to hand out an address (a /31,
    /// /32, /127 or /128) resolves to one with nothing free: DEL, CHECK and GC only look for
    /// what is held, and a configuration refused for ADDs must not fail the teardown of its
    /// pods (Go's plugin never checks a range on DEL).
    pub fn resolve_held(spec: &RangeSpec, gateway: Option<IpAddr>) -> Result<Range, RangeError> {
        match Range::resolve(spec, gateway) {
            Err(RangeError::NoUsable(cidr)) => {
                let last = cidr.last_offset();
                Ok(Range {
                    cidr,
                    first: 0,
                    last,
                    blocked: Intervals::from_unsorted(vec![(0, last)]),
                })
            }
            resolved => resolved,
        }
    }

    pub fn is_v6(&self) -> bool {
        self.cidr.is_v6()
    }

    /// How many addresses this range can hand out.
    pub fn capacity(&self) -> u128 {
        (self.last - self.first + 1) - self.blocked.count_within(self.first, self.last)
    }

    /// Whether `offset` may be handed out by the dynamic choice.
    pub fn is_usable(&self, offset: u128) -> bool {
        self.within(offset) && !self.blocked.contains(offset)
    }

    /// Whether `offset` lies between `range_start` and `range_end` (exclusions aside).
    pub fn within(&self, offset: u128) -> bool {
        (self.first..=self.last).contains(&offset)
    }

    pub fn ip(&self, offset: u128) -> IpAddr {
        self.cidr.at(offset)
    }

    pub fn first_ip(&self) -> IpAddr {
        self.ip(self.first)
    }

    pub fn last_ip(&self) -> IpAddr {
        self.ip(self.last)
    }

    /// The lowest offset that is usable and not taken.
    ///
    /// `taken(offset)` answers `Some(end)` when `offset` is taken, `end` being the last offset of
    /// a taken block that contains it (`offset` itself at the least; a larger block saves steps).
    /// Every step jumps past a whole blocked interval or a whole taken block, so the number of
    /// calls depends on fragmentation, never on the size of the range or on how full it is.
    pub fn lowest_free<E>(
        &self,
        mut taken: impl FnMut(u128) -> Result<Option<u128>, E>,
    ) -> Result<Option<u128>, E> {
        let mut candidate = self.first;
        loop {
            if candidate > self.last {
                return Ok(None);
            }
            let skip_to = match self.blocked.covering(candidate) {
                Some(end) => Some(end),
                None => taken(candidate)?.map(|end| end.max(candidate)),
            };
            match skip_to {
                None => return Ok(Some(candidate)),
                Some(end) => match end.checked_add(1) {
                    Some(next) => candidate = next,
                    None => return Ok(None),
                },
            }
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}-{})", self.cidr, self.first_ip(), self.last_ip())
    }
}

fn check_family(field: &'static str, ip: IpAddr, cidr: Cidr) -> Result<(), RangeError> {
    if ip.is_ipv6() == cidr.is_v6() {
        Ok(())
    } else {
        Err(RangeError::Family { field, ip, cidr })
    }
}

/// The offsets of `inner` that fall inside `outer`.
fn clip(outer: Cidr, inner: Cidr) -> Option<(u128, u128)> {
    if !outer.overlaps(&inner) {
        return None;
    }
    if inner.prefix <= outer.prefix {
        return Some((0, outer.last_offset()));
    }
    let start = inner.base() - outer.base();
    Some((start, start + inner.last_offset()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(range: &str, start: Option<&str>, end: Option<&str>, exclude: &[&str]) -> RangeSpec {
        let (cidr, s, e) = parse_range_text(range).unwrap();
        RangeSpec {
            cidr,
            start: start.map(|s| parse_ip(s).unwrap()).or(s),
            end: end.map(|s| parse_ip(s).unwrap()).or(e),
            exclude: exclude.iter().map(|x| parse_exclude(x).unwrap()).collect(),
        }
    }

    fn bounds(range: &str, start: Option<&str>, end: Option<&str>) -> (String, String) {
        let r = Range::resolve(&spec(range, start, end, &[]), None).unwrap();
        (r.first_ip().to_string(), r.last_ip().to_string())
    }

    fn s(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    /// Upstream's "usable bounds of a range" vectors.
    #[test]
    fn usable_bounds() {
        assert_eq!(
            bounds("192.168.21.100/30", None, None),
            s("192.168.21.101", "192.168.21.102")
        );
        assert_eq!(
            bounds("192.168.2.200/24", Some("192.168.2.23"), None),
            s("192.168.2.23", "192.168.2.254")
        );
        assert_eq!(
            bounds("192.168.2.200/27", None, None),
            s("192.168.2.193", "192.168.2.222")
        );
        assert_eq!(
            bounds("192.168.2.0/24", None, Some("192.168.2.100")),
            s("192.168.2.1", "192.168.2.100")
        );
        assert_eq!(
            bounds(
                "192.168.2.0/24",
                Some("192.168.2.50"),
                Some("192.168.2.100")
            ),
            s("192.168.2.50", "192.168.2.100")
        );
        assert_eq!(
            bounds(
                "192.168.2.0/24",
                Some("192.168.2.100"),
                Some("192.168.2.50")
            ),
            s("192.168.2.100", "192.168.2.254")
        );
        assert_eq!(
            bounds("192.168.2.0/24", Some("192.168.2.50"), Some("192.168.2.50")),
            s("192.168.2.50", "192.168.2.50")
        );
        assert_eq!(bounds("2001::0/116", None, None), s("2001::1", "2001::ffe"));
        assert_eq!(
            bounds("fd:db8:abcd:0012::0/96", None, None),
            s("fd:db8:abcd:12::1", "fd:db8:abcd:12::ffff:fffe")
        );
        for tiny in ["192.168.0.0/31", "192.168.0.0/32", "::/127", "::/128"] {
            let err = Range::resolve(&spec(tiny, None, None, &[]), None).unwrap_err();
            assert!(matches!(err, RangeError::NoUsable(_)), "{tiny}: {err}");
            // For the commands that only look for what is held: a range with nothing free.
            let held = Range::resolve_held(&spec(tiny, None, None, &[]), None).unwrap();
            assert_eq!(held.capacity(), 0, "{tiny}");
            assert!((0..=held.cidr.last_offset()).all(|offset| !held.is_usable(offset)));
            assert_eq!(held.lowest_free(|_| Ok::<_, ()>(None)), Ok(None), "{tiny}");
        }
    }

    #[test]
    fn start_outside_is_an_error_end_outside_is_ignored() {
        let err = Range::resolve(
            &spec("192.168.2.0/24", Some("192.168.3.1"), None, &[]),
            None,
        );
        assert!(matches!(err, Err(RangeError::StartOutside { .. })));
        assert_eq!(
            bounds("192.168.0.0/29", Some("192.168.0.0"), Some("192.168.0.8")),
            s("192.168.0.1", "192.168.0.6")
        );
    }

    #[test]
    fn dash_form() {
        let (cidr, start, end) = parse_range_text("192.168.1.5-192.168.1.25/24").unwrap();
        assert_eq!(cidr.to_string(), "192.168.1.0/24");
        assert_eq!(start.unwrap().to_string(), "192.168.1.5");
        assert_eq!(end.unwrap().to_string(), "192.168.1.25");
        let err = parse_range_text("192.168.1.5-192.168.2.25/28").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid range start for CIDR 192.168.2.16/28: 192.168.1.5"
        );
        let (cidr, start, _) = parse_range_text("00192.00168.1.5-000000192.168.1.25/24").unwrap();
        assert_eq!(cidr.to_string(), "192.168.1.0/24");
        assert_eq!(start.unwrap().to_string(), "192.168.1.5");
        assert!(parse_range_text("192.168.1.0/33").is_err());
        assert!(parse_range_text("nonsense").is_err());
    }

    #[test]
    fn gateway_is_blocked_and_capacity_counts_it() {
        let r = Range::resolve(
            &spec("10.0.0.0/29", None, None, &["10.0.0.4/31"]),
            "10.0.0.1".parse().ok(),
        )
        .unwrap();
        assert_eq!(r.capacity(), 3);
        let none = |_o: u128| -> Result<Option<u128>, ()> { Ok(None) };
        assert_eq!(r.lowest_free(none), Ok(Some(2)));
    }

    #[test]
    fn lowest_free_jumps_whole_blocks() {
        let r = Range::resolve(&spec("10.0.0.0/8", None, None, &[]), None).unwrap();
        let mut calls = 0;
        // Everything up to offset 15_000_000 is taken, as one block.
        let got = r.lowest_free(|o| {
            calls += 1;
            Ok::<_, ()>((o <= 15_000_000).then_some(15_000_000))
        });
        assert_eq!(got, Ok(Some(15_000_001)));
        assert_eq!(calls, 2);
    }
}
