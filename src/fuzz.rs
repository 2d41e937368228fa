//! Entry points for fuzzing: each takes arbitrary bytes, must never panic, and checks what must
//! hold of its answer. Shared by the cargo-fuzz targets (`fuzz/`, nightly) and the seeded
//! mutation test of the ordinary test suite (`tests/fuzz_inputs.rs`).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::cni::request::{CniArgs, CniEnv, NetConf};
use crate::config;
use crate::ipam::{Cidr, Range, RangeSpec};

/// The configuration loader, as a network configuration reaches it (no flat file).
pub fn config(bytes: &[u8]) {
    let Ok(ipam) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    if let Err(err) = config::load_untrusted(Some(&ipam), &[]) {
        let err = crate::cni::error::CniError::from(err);
        assert!(!err.msg.contains('\n'), "multi-line error: {}", err.msg);
        assert!(err.msg.chars().count() <= crate::cni::error::MAX_MESSAGE_CHARS + 1);
    }
}

/// The CNI request: stdin, and the environment as `NAME=value` lines before a blank line.
pub fn request(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let (env, stdin) = text.split_once("\n\n").unwrap_or(("", &text));
    let vars: HashMap<String, String> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _ = CniEnv::from_vars(&vars);
    let _ = CniArgs::parse(vars.get("CNI_ARGS").map(String::as_str).unwrap_or(env));
    if let Ok(conf) = NetConf::parse(stdin.as_bytes()) {
        let _ = config::load_untrusted(conf.ipam.as_ref(), &[]);
    }
}

/// The core's choice: a range built from the bytes, some offsets taken; the lowest free offset
/// must be usable, free, and lower than every other usable free offset.
pub fn decide(bytes: &[u8]) {
    let Some((range, taken)) = range_and_taken(bytes) else {
        return;
    };
    let chosen = range
        .lowest_free(|offset| Ok::<_, ()>(taken.contains(&offset).then_some(offset)))
        .unwrap_or(None);
    // Brute force over a window small enough to scan.
    let scan_end = range.last.min(range.first.saturating_add(4096));
    let expected = (range.first..=scan_end).find(|o| range.is_usable(*o) && !taken.contains(o));
    match (chosen, expected) {
        (Some(c), Some(e)) => assert_eq!(c, e, "not the lowest free offset in {range}"),
        (Some(c), None) => {
            assert!(
                c > scan_end && range.is_usable(c) && !taken.contains(&c),
                "{range}"
            )
        }
        (None, Some(e)) => panic!("offset {e} of {range} is free but none was chosen"),
        // Offsets past the window are never taken: free there means not blocked.
        (None, None) => assert!(
            first_unblocked_after(&range, scan_end).is_none(),
            "{range} has a free offset past {scan_end}"
        ),
    }
}

fn first_unblocked_after(range: &Range, after: u128) -> Option<u128> {
    let mut candidate = after.checked_add(1)?;
    while candidate <= range.last {
        match range.blocked.covering(candidate) {
            Some(end) => candidate = end.checked_add(1)?,
            None => return Some(candidate),
        }
    }
    None
}

fn range_and_taken(bytes: &[u8]) -> Option<(Range, BTreeSet<u128>)> {
    let (&kind, rest) = bytes.split_first()?;
    let (addr_len, bits) = if kind & 1 == 0 { (4, 32) } else { (16, 128) };
    if rest.len() < addr_len + 1 {
        return None;
    }
    let (addr_bytes, rest) = rest.split_at(addr_len);
    let addr = ip_from(addr_bytes)?;
    let prefix = rest[0] % (bits + 1);
    let cidr = Cidr { addr, prefix }.network();
    let mut numbers = rest[1..]
        .chunks(2)
        .map(|c| u128::from(c[0]) << 8 | u128::from(*c.get(1).unwrap_or(&0)));
    let size = cidr.last_offset().checked_add(1);
    let mut pick = |on: bool| {
        numbers
            .next()
            .filter(|_| on)
            .map(|n| cidr.at(size.map_or(n, |size| n % size)))
    };
    let start = pick(kind & 2 != 0);
    let end = pick(kind & 4 != 0);
    let gateway = pick(kind & 8 != 0);
    let exclude: Vec<Cidr> = (0..(kind >> 4) % 4)
        .filter_map(|_| {
            Some(Cidr {
                addr: pick(true)?,
                prefix: prefix.saturating_add(2).min(bits),
            })
        })
        .collect();
    let taken: BTreeSet<u128> = numbers.take(64).map(|n| n % 512).collect();
    let spec = RangeSpec {
        cidr,
        start,
        end,
        exclude,
    };
    Some((Range::resolve(&spec, gateway).ok()?, taken))
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    Some(match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        _ => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
    })
}
