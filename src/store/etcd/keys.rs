//! The key layout. Everything lives under one prefix; offsets are written as 32 hex digits so
//! that the lexicographic order etcd sorts keys by is the numeric order of offsets.
//!
//! ```text
//! <prefix>pools/<pool>/a/<offset>                 allocation record (JSON)
//! <prefix>pools/<pool>/r/<start>                  run of allocated offsets: value = <end>
//! <prefix>freed/<pool>/<offset>                   freed mark: released, its run not cut yet
//! <prefix>reservations/<network>/<ip>             network-wide overlap reservation (JSON)
//! <prefix>owners/<container id>/<ifname>/<pool>   owner index: value = <offset>
//! <prefix>pods/<namespace/name>/<ifname>/<pool>   pod index: value = <offset>
//! <prefix>quota                                   written by every combined ADD commit
//! ```
//!
//! Names coming from configuration or the runtime are escaped so that a `/` inside them can
//! never be mistaken for a separator.

use std::net::IpAddr;

/// The prefix every key of this engine starts with.
pub const DEFAULT_PREFIX: &str = "/whereabouts/";

/// Builds the keys of one deployment (one prefix).
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn pool_dir(&self, pool: &str) -> String {
        format!("{}pools/{}/", self.prefix, escape(pool))
    }

    /// The directory holding every pool's keys.
    pub fn pools_dir(&self) -> String {
        format!("{}pools/", self.prefix)
    }

    /// The directory of one pool's allocation records.
    pub fn allocations_dir(&self, pool: &str) -> String {
        self.pool_dir(pool) + "a/"
    }

    pub fn allocation(&self, pool: &str, offset: u128) -> String {
        self.allocations_dir(pool) + &hex(offset)
    }

    /// The directory of one pool's run keys.
    pub fn runs_dir(&self, pool: &str) -> String {
        self.pool_dir(pool) + "r/"
    }

    pub fn run(&self, pool: &str, start: u128) -> String {
        self.runs_dir(pool) + &hex(start)
    }

    /// The directory of every pool's freed marks.
    pub fn freed_root(&self) -> String {
        format!("{}freed/", self.prefix)
    }

    /// The directory of one pool's freed marks.
    pub fn freed_dir(&self, pool: &str) -> String {
        format!("{}{}/", self.freed_root(), escape(pool))
    }

    /// The mark of `offset`, released while the run covering it still holds it.
    pub fn freed(&self, pool: &str, offset: u128) -> String {
        self.freed_dir(pool) + &hex(offset)
    }

    pub fn reservation(&self, network_name: &str, ip: IpAddr) -> String {
        format!(
            "{}reservations/{}/{}",
            self.prefix,
            escape(network_name),
            ip
        )
    }

    /// The directory of the owner index entries of one attachment, one per pool.
    pub fn owner_dir(&self, container_id: &str, ifname: &str) -> String {
        format!(
            "{}owners/{}/{}/",
            self.prefix,
            escape(container_id),
            escape(ifname)
        )
    }

    pub fn owner(&self, container_id: &str, ifname: &str, pool: &str) -> String {
        self.owner_dir(container_id, ifname) + &escape(pool)
    }

    /// The key a combined ADD commit puts at its own level: etcd prices a transaction by the
    /// puts of its top level, and refuses one priced above nothing when its database is full.
    /// The ADDs' own puts are nested, priced at nothing: without it, a full database would take
    /// them.
    pub fn quota(&self) -> String {
        format!("{}quota", self.prefix)
    }

    pub fn pod(&self, pod_ref: &str, ifname: &str, pool: &str) -> String {
        format!(
            "{}pods/{}/{}/{}",
            self.prefix,
            escape(pod_ref),
            escape(ifname),
            escape(pool)
        )
    }
}

/// A key of the layout above, read back: names unescaped, offsets parsed. The values are not
/// looked at.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Record {
        pool: String,
        offset: u128,
    },
    Run {
        pool: String,
        start: u128,
    },
    Freed {
        pool: String,
        offset: u128,
    },
    Reservation {
        network: String,
        ip: IpAddr,
    },
    Owner {
        container_id: String,
        ifname: String,
        pool: String,
    },
    Pod,
    Quota,
}

impl Keys {
    /// What `key` is in this layout; `None` for a key outside it.
    pub fn parse(&self, key: &str) -> Option<Parsed> {
        let rest = key.strip_prefix(&self.prefix)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let offset = || parse_hex(rest);
        let parsed = match parts.as_slice() {
            ["pools", pool, "a", _] => Parsed::Record {
                pool: unescape(pool),
                offset: offset()?,
            },
            ["pools", pool, "r", _] => Parsed::Run {
                pool: unescape(pool),
                start: offset()?,
            },
            ["freed", pool, _] => Parsed::Freed {
                pool: unescape(pool),
                offset: offset()?,
            },
            ["reservations", network, ip] => Parsed::Reservation {
                network: unescape(network),
                ip: ip.parse().ok()?,
            },
            ["owners", container_id, ifname, pool] => Parsed::Owner {
                container_id: unescape(container_id),
                ifname: unescape(ifname),
                pool: unescape(pool),
            },
            ["pods", _, _, _] => Parsed::Pod,
            ["quota"] => Parsed::Quota,
            _ => return None,
        };
        Some(parsed)
    }
}

/// The end of the key range covering every key that starts with `dir`.
pub fn range_end(dir: &str) -> Vec<u8> {
    let mut end = dir.as_bytes().to_vec();
    // Keys here are ASCII, so the last byte is never 0xff and incrementing it is exact.
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    end
}

/// An offset as 32 lower-case hex digits.
pub fn hex(offset: u128) -> String {
    format!("{offset:032x}")
}

/// The offset a key or value ends with, if it is one written by [`hex`].
pub fn parse_hex(text: &str) -> Option<u128> {
    let digits = text.rsplit('/').next()?;
    if digits.len() != 32 {
        return None;
    }
    // Exactly the form `hex` writes: `from_str_radix` alone would also take a leading `+` and
    // capitals, reading a key no engine wrote as the one at that offset.
    if !digits
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u128::from_str_radix(digits, 16).ok()
}

/// Escapes `%` and `/` (and control characters) so a name is one path segment.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' | '/' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_control() => out.push_str(&format!("%{:02X}", c as u32 & 0xff)),
            c => out.push(c),
        }
    }
    out
}

/// The name in an escaped key segment. Every `%XX` that [`escape`] writes stands for the
/// character U+00XX (`%`, `/` and the control characters, all below U+0100), so it is decoded
/// as that character, never as a raw byte: a C1 control (U+0080 to U+009F) would otherwise
/// come back as U+FFFD, a name that no key of the store was made from.
pub fn unescape(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 3)
            // Capitals only, as `escape` writes: `%2f` was never made from a `/`.
            .filter(|d| d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')))
            .and_then(|d| u8::from_str_radix(d, 16).ok());
        match code {
            Some(code) => {
                out.push(char::from(code));
                rest = &rest[at + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_order_is_numeric_order() {
        let offsets = [0u128, 1, 15, 16, 255, 256, 1 << 40, u128::MAX];
        for pair in offsets.windows(2) {
            assert!(hex(pair[0]) < hex(pair[1]));
        }
        for o in offsets {
            assert_eq!(parse_hex(&hex(o)), Some(o));
        }
        assert_eq!(parse_hex("zz"), None);
        // Only the form written: no sign, no capitals.
        assert_eq!(parse_hex(&format!("+{}", &hex(5)[1..])), None);
        assert_eq!(parse_hex(&hex(10).to_uppercase()), None);
    }

    #[test]
    fn escaping_keeps_one_segment_and_round_trips() {
        let names = [
            "net-10.0.0.0-8",
            "a/b",
            "100%",
            "ns/pod",
            "",
            "x%2Fy",
            "%+F%zz%",
            "tab\there",
            "nel\u{85}csi\u{9b}del\u{7f}",
            "é/ü%",
        ];
        for name in names {
            let e = escape(name);
            assert!(
                !e.contains('/') && !e.chars().any(char::is_control),
                "{e:?}"
            );
            assert_eq!(unescape(&e), name);
        }
        // Only what escape writes is decoded; a stray `%` stays.
        assert_eq!(unescape("%+F%zz%"), "%+F%zz%");
        assert_eq!(unescape("a%2fb"), "a%2fb");
    }

    #[test]
    fn layout() {
        let k = Keys::new("/w/");
        assert_eq!(
            k.allocation("net-10.0.0.0-24", 5),
            "/w/pools/net-10.0.0.0-24/a/00000000000000000000000000000005"
        );
        assert_eq!(
            k.run("p", 1),
            "/w/pools/p/r/00000000000000000000000000000001"
        );
        assert_eq!(
            k.freed("p", 2),
            "/w/freed/p/00000000000000000000000000000002"
        );
        assert_eq!(
            k.reservation("net", "10.0.0.5".parse().unwrap()),
            "/w/reservations/net/10.0.0.5"
        );
        assert_eq!(k.owner("c1", "eth0", "p"), "/w/owners/c1/eth0/p");
        assert_eq!(k.pod("ns/pod", "eth0", "p"), "/w/pods/ns%2Fpod/eth0/p");
        assert_eq!(range_end("/w/pools/"), b"/w/pools0".to_vec());
    }

    #[test]
    fn every_key_reads_back_as_what_it_was_made_for() {
        let k = Keys::new("/w/");
        let pool = || "a/b%c\u{85}".to_string();
        let ip: IpAddr = "fd00::5".parse().unwrap();
        let cases = [
            (
                k.allocation("a/b%c\u{85}", 7),
                Parsed::Record {
                    pool: pool(),
                    offset: 7,
                },
            ),
            (
                k.run("a/b%c\u{85}", u128::MAX),
                Parsed::Run {
                    pool: pool(),
                    start: u128::MAX,
                },
            ),
            (
                k.freed("a/b%c\u{85}", 0),
                Parsed::Freed {
                    pool: pool(),
                    offset: 0,
                },
            ),
            (
                k.reservation("net/1", ip),
                Parsed::Reservation {
                    network: "net/1".into(),
                    ip,
                },
            ),
            (
                k.owner("c/1", "eth0", "a/b%c\u{85}"),
                Parsed::Owner {
                    container_id: "c/1".into(),
                    ifname: "eth0".into(),
                    pool: pool(),
                },
            ),
            (k.pod("ns/pod", "eth0", "a/b%c\u{85}"), Parsed::Pod),
            (k.quota(), Parsed::Quota),
        ];
        for (key, parsed) in cases {
            assert_eq!(k.parse(&key), Some(parsed), "{key}");
        }
        for outside in [
            "/x/pools/p/a/1",
            "/w/pools/p/a/zz",
            "/w/other",
            "/w/pools/p/q/1",
        ] {
            assert_eq!(k.parse(outside), None, "{outside}");
        }
    }
}
