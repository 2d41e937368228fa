//! Dividing a range into per-node slices ("fast IPAM").

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
    if size < range.prefix || size > range.bits() {
        return Err(SliceError::TooLarge { size, range });
    }
    let shift = (size - range.prefix) as u32;
    let count: u128 = if shift >= 128 {
        u128::MAX
    } else {
        1u128 << shift
    };
    if count > limit {
        return Err(SliceError::TooMany { size, range, limit });
    }
    let step_bits = (range.bits() - size) as u32;
    Ok((0..count)
        .map(|i| {
            let offset = if step_bits >= 128 { 0 } else { i << step_bits };
            Cidr {
                addr: range.at(offset),
                prefix: size,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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
