//! Names of pools and reservations, exactly as upstream names its objects.

use std::net::IpAddr;

use super::addr::Cidr;

/// Upstream's pool name: the range with `:` and `/` turned into `-`, prefixed by the node (node
/// slices) and the network name. `10.0.0.0/8` with network `net` -> `net-10.0.0.0-8`.
pub fn pool_name(range: &Cidr, network_name: &str, node: Option<&str>) -> String {
    let mut name = String::new();
    for prefix in [Some(network_name), node].into_iter().flatten() {
        if !prefix.is_empty() {
            name.push_str(prefix);
            name.push('-');
        }
    }
    name.push_str(&range.network().to_string().replace([':', '/'], "-"));
    name
}

/// Upstream's overlapping-range reservation name: the address with `:` turned into `-` (a
/// trailing `:` first gets a `0`), prefixed by the network name.
pub fn reservation_name(ip: IpAddr, network_name: &str) -> String {
    let mut text = ip.to_string();
    if text.ends_with(':') {
        text.push('0');
    }
    let text = text.replace(':', "-");
    if network_name.is_empty() {
        text
    } else {
        format!("{network_name}-{text}")
    }
}

/// Whether `name` is a valid Kubernetes object name (an RFC 1123 subdomain, as the API server
/// checks it): at most 253 bytes of dot-separated labels, each of lower-case letters, digits and
/// `-`, starting and ending with a letter or digit. A name the server would refuse (`a..b`,
/// `a.-b`) is refused before any request: the controller's pass would otherwise fail on it for
/// every network.
pub fn is_valid_object_name(name: &str) -> bool {
    let label = |part: &str| {
        let bytes = part.as_bytes();
        bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    };
    name.len() <= 253 && name.split('.').all(label)
}

/// A valid object name for `upstream`: the upstream name when Kubernetes accepts it, otherwise
/// a deterministic valid form. Upstream's invalid names come from a leading `::` (`::/126` gives
/// `---126`), which reads the same with a leading zero (`0::/126`), and from upper-case letters
/// in the network name.
pub fn object_name(upstream: &str) -> String {
    if is_valid_object_name(upstream) {
        return upstream.to_string();
    }
    let mut name = upstream.to_ascii_lowercase();
    if name.starts_with('-') || name.starts_with('.') {
        name.insert(0, '0');
    }
    if name.ends_with('-') || name.ends_with('.') {
        name.push('0');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s, false).unwrap()
    }

    /// Upstream's naming vectors.
    #[test]
    fn upstream_names() {
        assert_eq!(pool_name(&cidr("10.0.0.0/8"), "", None), "10.0.0.0-8");
        assert_eq!(
            pool_name(&cidr("10.0.0.0/8"), "test", None),
            "test-10.0.0.0-8"
        );
        assert_eq!(
            pool_name(&cidr("10.0.0.0/8"), "", Some("testnode")),
            "testnode-10.0.0.0-8"
        );
        assert_eq!(
            pool_name(&cidr("10.0.0.0/8"), "testnetwork", Some("testnode")),
            "testnetwork-testnode-10.0.0.0-8"
        );
        assert_eq!(pool_name(&cidr("2001::/116"), "", None), "2001---116");
        assert_eq!(
            pool_name(&cidr("fd00:0:0:10::/64"), "", None),
            "fd00-0-0-10---64"
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(reservation_name(ip("10.0.0.1"), ""), "10.0.0.1");
        assert_eq!(reservation_name(ip("2001::"), ""), "2001--0");
        assert_eq!(reservation_name(ip("abcd::1"), ""), "abcd--1");
        assert_eq!(reservation_name(ip("10.0.0.1"), "mynet"), "mynet-10.0.0.1");
    }

    /// The API server's rule, label by label: a name it would refuse is refused here first.
    #[test]
    fn object_names_are_rfc_1123_subdomains() {
        for valid in [
            "a",
            "10.0.0.0-8",
            "net.blue-10.0.0.0-24",
            "0---126",
            "a-b.c",
        ] {
            assert!(is_valid_object_name(valid), "{valid}");
        }
        let long = "a".repeat(254);
        for invalid in [
            "", "a..b", "a.-b", "a-.b", ".a", "a.", "-a", "A", "a_b", &long,
        ] {
            assert!(!is_valid_object_name(invalid), "{invalid}");
        }
    }

    #[test]
    fn invalid_upstream_names_get_a_valid_deterministic_form() {
        let upstream = pool_name(&cidr("::/126"), "", None);
        assert_eq!(upstream, "---126");
        assert!(!is_valid_object_name(&upstream));
        assert_eq!(object_name(&upstream), "0---126");
        assert!(is_valid_object_name(&object_name(&upstream)));
        assert_eq!(object_name("10.0.0.0-8"), "10.0.0.0-8");
        assert_eq!(object_name("MyNet-10.0.0.1"), "mynet-10.0.0.1");
        assert_eq!(
            object_name(&reservation_name("::".parse().unwrap(), "")),
            "0--0"
        );
    }
}
