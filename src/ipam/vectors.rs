//! Upstream's "choosing the next address" vectors, run through the core.

use super::addr::parse_ip;
use super::intervals::OffsetRuns;
use super::range::{parse_exclude, parse_range_text, Range, RangeSpec};

/// The address chosen for `range` with the given bounds, reserved addresses and exclusions.
fn choose(
    range: &str,
    start: Option<&str>,
    end: Option<&str>,
    reserved: &[&str],
    exclude: &[&str],
) -> Result<Option<String>, String> {
    let (cidr, _, _) = parse_range_text(range).map_err(|e| e.to_string())?;
    let exclude = exclude
        .iter()
        .map(|e| parse_exclude(e).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = RangeSpec {
        cidr,
        start: start.and_then(parse_ip),
        end: end.and_then(parse_ip),
        exclude,
    };
    let r = Range::resolve(&spec, None).map_err(|e| e.to_string())?;
    let taken: OffsetRuns = reserved
        .iter()
        .map(|ip| r.cidr.offset_of(parse_ip(ip).unwrap()).unwrap())
        .collect();
    let got = r
        .lowest_free(|o| Ok::<_, ()>(taken.run_containing(o)))
        .unwrap();
    Ok(got.map(|o| r.ip(o).to_string()))
}

fn ok(ip: &str) -> Result<Option<String>, String> {
    Ok(Some(ip.to_string()))
}

#[test]
fn upstream_next_address_vectors() {
    assert_eq!(
        choose("192.168.1.1/24", None, None, &[], &[]),
        ok("192.168.1.1")
    );
    assert_eq!(choose("caa5::/112", None, None, &[], &[]), ok("caa5::1"));
    assert_eq!(choose("::1/126", None, None, &[], &[]), ok("::1"));
    assert_eq!(choose("fd::1/116", None, None, &[], &[]), ok("fd::1"));
    assert_eq!(choose("100::2:1/126", None, None, &[], &[]), ok("100::2:1"));
    assert_eq!(
        choose("192.168.0.0/29", None, None, &[], &["192.168.0.0/30"]),
        ok("192.168.0.4")
    );
    assert_eq!(
        choose("192.168.0.0/29", None, None, &[], &["192.168.0.1"]),
        ok("192.168.0.2")
    );
    assert!(
        choose("192.168.0.0/29", None, None, &[], &["192.168.0.1/123"])
            .unwrap_err()
            .contains("cannot parse exclude")
    );
    assert_eq!(
        choose("100::2:1/125", None, None, &[], &["100::2:1/126"]),
        ok("100::2:4")
    );
    assert_eq!(
        choose("100::2:1/125", None, None, &[], &["100::2:1"]),
        ok("100::2:2")
    );
    assert!(choose("100::2:1/125", None, None, &[], &["100::2::1"])
        .unwrap_err()
        .contains("cannot parse exclude"));
    assert_eq!(
        choose("2001:db8::/30", None, None, &[], &["2001:db8::0/32"]),
        ok("2001:db9::")
    );
    assert_eq!(
        choose(
            "192.168.0.0/28",
            None,
            None,
            &[],
            &[
                "192.168.0.0/30",
                "192.168.0.6/31",
                "192.168.0.8/31",
                "192.168.0.4/30"
            ]
        ),
        ok("192.168.0.10")
    );
    assert_eq!(
        choose(
            "192.168.0.0/29",
            Some("192.168.0.0"),
            None,
            &["192.168.0.4", "192.168.0.5", "192.168.0.6"],
            &["192.168.0.0/30"]
        ),
        Ok(None)
    );
    assert_eq!(
        choose(
            "192.168.0.0/29",
            Some("192.168.0.0"),
            Some("192.168.0.8"),
            &[],
            &[]
        ),
        ok("192.168.0.1")
    );
}

/// An IPv4-mapped range is the IPv4 range it maps, as the Go binary reads it: the same pool
/// (`10.0.0.0-24`), the same first address, the same reservation names.
#[test]
fn ipv4_mapped_ranges_are_ipv4() {
    use super::names::{pool_name, reservation_name};
    assert_eq!(
        choose("::ffff:10.0.0.0/120", None, None, &[], &[]),
        ok("10.0.0.1")
    );
    assert_eq!(
        choose(
            "::ffff:10.0.0.0/120",
            Some("::ffff:10.0.0.5"),
            Some("::ffff:10.0.0.9"),
            &["10.0.0.5"],
            &["::ffff:10.0.0.6"]
        ),
        ok("10.0.0.7")
    );
    let (cidr, start, end) = parse_range_text("::ffff:10.0.0.5-::ffff:10.0.0.9/120").unwrap();
    assert_eq!(cidr.to_string(), "10.0.0.0/24");
    assert_eq!(start, parse_ip("10.0.0.5"));
    assert_eq!(end, parse_ip("10.0.0.9"));
    assert_eq!(pool_name(&cidr, "", None), "10.0.0.0-24");
    assert_eq!(pool_name(&cidr, "net", None), "net-10.0.0.0-24");
    let ip = parse_ip("::ffff:10.0.0.1").unwrap();
    assert_eq!(reservation_name(ip, ""), "10.0.0.1");
}
