//! Dividing a range into per-node slices ("fast IPAM").

use std::net::IpAddr;

use super::addr::Cidr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceError {
    #[error(
        "cannot parse node_slice_size {0:?}: expected a prefix length such as \"/22\" or \"22\""
    )]
    Parse(String),
    #[error("node_slice_size /{size} is larger than range {range}")]
    TooLarge { size: u8, range: Cidr },
    #[error("range {range} divided by /{size} gives more than {limit} slices")]
    TooMany { size: u8, range: Cidr, limit: u128 },
    #[error(
        "range {range} overlaps the IPv4-mapped block ::ffff:0:0/96, where slices of /{size} \
         would read back as IPv4 prefixes"
    )]
    Mapped { size: u8, range: Cidr },
}

/// How many slices of prefix length `size` `range` holds (`u128::MAX` for 2^128). Refused:
/// a size shorter than the range or longer than its family, and slices of 96 bits or more in
/// the IPv4-mapped block, which every reader (this one's and upstream's) takes for IPv4.
pub fn slice_count(range: &Cidr, size: u8) -> Result<u128, SliceError> {
    let range = range.network();
    if size < range.prefix || size > range.bits() {
        return Err(SliceError::TooLarge { size, range });
    }
    if size >= Cidr::IPV4_MAPPED.prefix && range.overlaps(&Cidr::IPV4_MAPPED) {
        return Err(SliceError::Mapped { size, range });
    }
    let shift = u32::from(size - range.prefix);
    Ok(if shift >= 128 {
        u128::MAX
    } else {
        1u128 << shift
    })
}

/// Reads `"/22"` or `"22"`.
pub fn parse_slice_size(text: &str) -> Result<u8, SliceError> {
    let digits = text.trim().trim_start_matches('/');
    digits
        .parse::<u8>()
        .ok()
        .filter(|v| *v <= 128 && !digits.is_empty())
        .ok_or_else(|| SliceError::Parse(text.to_string()))
}

/// The slices of `range` of prefix length `size`, in address order; at most `limit` of them.
pub fn node_slices(range: &Cidr, size: u8, limit: u128) -> Result<Vec<Cidr>, SliceError> {
    let range = range.network();
    let count = slice_count(&range, size)?;
    if count > limit {
        return Err(SliceError::TooMany { size, range, limit });
    }
    Ok((0..count).map(|i| slice_at(&range, size, i)).collect())
}

/// The `index`th slice of prefix length `size` of `range` (whose host bits are clear).
pub fn slice_at(range: &Cidr, size: u8, index: u128) -> Cidr {
    let step_bits = u32::from(range.bits() - size);
    let offset = if step_bits >= 128 {
        0
    } else {
        index << step_bits
    };
    Cidr {
        addr: range.at(offset),
        prefix: size,
    }
}

/// The index of the slice of prefix length `size` of `range` that holds `ip` (the inverse of
/// [`slice_at`]); `None` for an address outside the range.
pub fn slice_index(range: &Cidr, size: u8, ip: IpAddr) -> Option<u128> {
    let offset = range.offset_of(ip)?;
    let step_bits = u32::from(range.bits() - size);
    Some(if step_bits >= 128 {
        0
    } else {
        offset >> step_bits
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_that_would_read_back_as_ipv4_are_refused() {
        let count = |range: &str, size| slice_count(&Cidr::parse(range, false).unwrap(), size);
        assert_eq!(count("fd00::/64", 120), Ok(1 << 56));
        assert_eq!(count("::/64", 80), Ok(1 << 16));
        assert!(matches!(
            count("::/64", 120),
            Err(SliceError::Mapped { .. })
        ));
        assert!(matches!(count("::/0", 96), Err(SliceError::Mapped { .. })));
        assert!(matches!(
            count("10.0.0.0/8", 7),
            Err(SliceError::TooLarge { .. })
        ));
        assert_eq!(count("::/0", 0), Ok(1));
        assert_eq!(count("::/0", 128).ok(), None);
        // The reason: an IPv4-mapped /120 reads back as an IPv4 /24.
        let mapped = Cidr::parse("::ffff:10.0.0.0/120", false).unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/24");
    }

    #[test]
    fn upstream_slice_vectors() {
        let r = Cidr::parse("10.0.0.0/8", false).unwrap();
        let slices: Vec<String> = node_slices(&r, 10, 1 << 20)
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            slices,
            [
                "10.0.0.0/10",
                "10.64.0.0/10",
                "10.128.0.0/10",
                "10.192.0.0/10"
            ]
        );
        assert_eq!(node_slices(&r, 8, 16).unwrap().len(), 1);
        let small = Cidr::parse("10.0.0.0/10", false).unwrap();
        assert!(node_slices(&small, 8, 16).is_err());
        assert_eq!(parse_slice_size("10"), Ok(10));
        assert_eq!(parse_slice_size("/10"), Ok(10));
        assert!(parse_slice_size("/x").is_err());
    }

    #[test]
    fn ipv6_slices() {
        let r = Cidr::parse("fd00::/64", false).unwrap();
        let slices = node_slices(&r, 66, 16).unwrap();
        assert_eq!(slices[3].to_string(), "fd00::c000:0:0:0/66");
        assert!(node_slices(&r, 120, 1 << 20).is_err());
    }
}
