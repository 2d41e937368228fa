//! Addresses as 128-bit integers, and CIDR parsing that accepts what upstream accepts.
//!
//! IPv4 and IPv6 share one representation (a `u128`) so that every calculation in the core is
//! the same for both families and cannot overflow the way 64-bit offsets do in an IPv6 /64.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The address as an unsigned integer (IPv4 in the low 32 bits).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address of `family` whose integer value is `value` (truncated to 32 bits for IPv4).
pub fn from_u128(value: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(value))
    } else {
        IpAddr::V4(Ipv4Addr::from(value as u32))
    }
}

/// Number of bits in an address of this family.
pub fn family_bits(ip: IpAddr) -> u8 {
    if ip.is_ipv6() {
        128
    } else {
        32
    }
}

/// Parses an IP address. IPv4 octets may carry leading zeros and are read as decimal,
/// as upstream does (`00192.00168.1.5` is 192.168.1.5), where the standard library refuses them.
/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is the IPv4 address, as the Go binary reads
/// it: both implementations then name, count and compare it the same way.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    parse_ip_as_written(text).map(|ip| ip.to_canonical())
}

/// As [`parse_ip`], keeping an IPv4-mapped IPv6 address in its IPv6 form.
fn parse_ip_as_written(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = IpAddr::from_str(text) {
        return Some(ip);
    }
    if text.contains(':') {
        return None;
    }
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 12 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse::<u16>().ok().filter(|v| *v <= 255)? as u8;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// A prefix: an address and a prefix length. `addr` keeps the host bits as written;
/// [`Cidr::network`] drops them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        (prefix <= family_bits(addr)).then_some(Cidr { addr, prefix })
    }

    /// Parses `addr/len`; with `allow_bare`, a bare address is a single-address prefix.
    /// An IPv4-mapped prefix of at least 96 bits (`::ffff:10.0.0.0/120`) is the IPv4 prefix it
    /// maps (`10.0.0.0/24`), as the Go binary reads it; a shorter one stays IPv6.
    pub fn parse(text: &str, allow_bare: bool) -> Option<Cidr> {
        let text = text.trim();
        match text.split_once('/') {
            Some((addr, len)) => {
                let addr = parse_ip_as_written(addr)?;
                if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Cidr::new(addr, len.parse().ok()?).map(Cidr::unmapped)
            }
            None if allow_bare => {
                let addr = parse_ip(text)?;
                Cidr::new(addr, family_bits(addr))
            }
            None => None,
        }
    }

    /// The IPv4-mapped block `::ffff:0:0/96`: a prefix of 96 bits or more inside it reads as
    /// the IPv4 prefix it maps ([`Cidr::parse`]).
    pub const IPV4_MAPPED: Cidr = Cidr {
        addr: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
        prefix: 96,
    };

    /// The IPv4 prefix an IPv4-mapped IPv6 prefix of 96 bits or more stands for; any other
    /// prefix unchanged.
    fn unmapped(self) -> Cidr {
        match self.addr {
            IpAddr::V6(v6) if self.prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: self.prefix - 96,
                },
                None => self,
            },
            _ => self,
        }
    }

    pub fn is_v6(&self) -> bool {
        self.addr.is_ipv6()
    }

    pub fn bits(&self) -> u8 {
        family_bits(self.addr)
    }

    pub fn host_bits(&self) -> u8 {
        self.bits() - self.prefix
    }

    /// The highest offset inside the prefix (size - 1), which fits a u128 even for `::/0`.
    pub fn last_offset(&self) -> u128 {
        match self.host_bits() {
            0 => 0,
            h => u128::MAX >> (128 - h as u32),
        }
    }

    /// The network address as an integer.
    pub fn base(&self) -> u128 {
        to_u128(self.addr) & !self.last_offset()
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Cidr {
        Cidr {
            addr: from_u128(self.base(), self.is_v6()),
            prefix: self.prefix,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv6() == self.is_v6() && to_u128(ip) & !self.last_offset() == self.base()
    }

    /// Offset of `ip` from the network address, if inside.
    pub fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        self.contains(ip).then(|| to_u128(ip) - self.base())
    }

    /// The address at `offset` from the network address.
    pub fn at(&self, offset: u128) -> IpAddr {
        from_u128(self.base() + offset, self.is_v6())
    }

    /// Whether the two prefixes share at least one address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.is_v6() == other.is_v6() && {
            let (a, b) = if self.prefix <= other.prefix {
                (self, other)
            } else {
                (other, self)
            };
            a.contains(b.addr)
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_are_decimal() {
        assert_eq!(parse_ip("00192.00168.1.5"), "192.168.1.5".parse().ok());
        assert_eq!(parse_ip("000000192.168.1.025"), "192.168.1.25".parse().ok());
        assert_eq!(parse_ip("192.168.1.256"), None);
        assert_eq!(parse_ip("192.168.1"), None);
        assert_eq!(parse_ip("192.168.1.1.1"), None);
        assert_eq!(parse_ip("100::2::1"), None);
    }

    #[test]
    fn cidr_parse_and_network() {
        let c = Cidr::parse("192.168.2.225/28", false).unwrap();
        assert_eq!(c.network().to_string(), "192.168.2.224/28");
        assert_eq!(Cidr::parse("192.168.0.1/123", false), None);
        assert_eq!(Cidr::parse("192.168.0.1", false), None);
        assert_eq!(Cidr::parse("192.168.0.1", true).unwrap().prefix, 32);
        assert_eq!(Cidr::parse("::/0", false).unwrap().last_offset(), u128::MAX);
        assert_eq!(Cidr::parse("10.0.0.0/32", false).unwrap().last_offset(), 0);
    }

    #[test]
    fn ipv4_mapped_is_ipv4() {
        let c = Cidr::parse("::ffff:10.0.0.0/120", false).unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/24");
        let c = Cidr::parse("::ffff:10.0.0.7/128", false).unwrap();
        assert_eq!(c.to_string(), "10.0.0.7/32");
        assert_eq!(parse_ip("::ffff:10.0.0.5"), "10.0.0.5".parse().ok());
        assert_eq!(
            Cidr::parse("::ffff:10.0.0.5", true).unwrap().to_string(),
            "10.0.0.5/32"
        );
        // Shorter than the mapping's 96 bits: an IPv6 prefix.
        let c = Cidr::parse("::ffff:10.0.0.0/80", false).unwrap();
        assert!(c.is_v6());
        assert!(Cidr::parse("fd00::ffff:10.0.0.0/120", false)
            .unwrap()
            .is_v6());
    }

    #[test]
    fn offsets_beyond_two_to_the_63() {
        let c = Cidr::parse("fd00::/64", false).unwrap();
        let ip: IpAddr = "fd00::ffff:ffff:ffff:fffe".parse().unwrap();
        let off = c.offset_of(ip).unwrap();
        assert!(off > 1u128 << 63);
        assert_eq!(c.at(off), ip);
    }

    #[test]
    fn overlap() {
        let a = Cidr::parse("10.0.0.0/8", false).unwrap();
        let b = Cidr::parse("10.1.0.0/16", false).unwrap();
        let c = Cidr::parse("11.0.0.0/16", false).unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(!a.overlaps(&Cidr::parse("::/0", false).unwrap()));
    }
}
