//! Entry points for fuzzing: each takes arbitrary bytes, must never panic, and checks what must
//! hold of its answer. Shared by the cargo-fuzz targets (`fuzz/`, nightly) and the seeded
//! mutation test of the ordinary test suite (`tests/fuzz_inputs.rs`).

mod etcd_doctor;
mod k8s_doctor;
mod pool_keys;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::cni::request::{CniArgs, CniEnv, NetConf};
use crate::config;
use crate::controller::slices::assign;
use crate::ipam::slices::{slice_at, slice_count};
use crate::ipam::{Cidr, Range, RangeSpec};
use crate::k8s::crd::NodeSliceAllocation;

pub use etcd_doctor::etcd_doctor;
pub use k8s_doctor::k8s_doctor;
pub use pool_keys::pool_keys;

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

/// The controller's node slices: a range, a slice size, nodes, a layout to keep and ranges
/// still busy, built from the bytes. The assignment must finish (however many slices a busy
/// range spans), give a node at most one slice and no two nodes the same one, only slices of
/// the range and size, to a new node none that overlaps a busy range, and leave a node without
/// one only when no slice is free.
pub fn slices(bytes: &[u8]) {
    let Some((range, size, nodes, current, busy)) = slice_layout(bytes) else {
        return;
    };
    let Ok(plan) = assign(&range, size, &nodes, &current, &busy) else {
        assert!(
            slice_count(&range, size).is_err(),
            "{range} /{size} refused"
        );
        return;
    };
    let kept: BTreeSet<&str> = current.iter().map(|a| a.node_name.as_str()).collect();
    let mut holders = BTreeSet::new();
    let mut held = HashSet::new();
    for a in plan.allocations.iter().filter(|a| !a.node_name.is_empty()) {
        let slice = Cidr::parse(&a.slice_range, false).expect("a slice reads as a CIDR");
        assert!(
            slice.prefix == size && range.contains(slice.addr),
            "{slice} of {range}"
        );
        assert!(
            holders.insert(a.node_name.clone()),
            "{} holds two",
            a.node_name
        );
        assert!(held.insert(slice), "{slice} given twice");
        if !kept.contains(a.node_name.as_str()) {
            assert!(!busy.iter().any(|b| b.overlaps(&slice)), "{slice} is busy");
        }
    }
    for node in &nodes {
        assert!(
            holders.contains(node) != plan.unassigned.contains(node),
            "{node}"
        );
    }
    if !plan.unassigned.is_empty() && plan.total <= 4096 {
        let free = (0..plan.total).find(|&i| {
            let slice = slice_at(&range, size, i);
            !held.contains(&slice) && !busy.iter().any(|b| b.overlaps(&slice))
        });
        assert!(
            free.is_none(),
            "a node is left out while a slice of {range} is free"
        );
    }
}

type SliceLayout = (
    Cidr,
    u8,
    BTreeSet<String>,
    Vec<NodeSliceAllocation>,
    HashSet<Cidr>,
);

/// A range and slice size, then 3-byte records: a node joins, a busy range, or a kept slice.
fn slice_layout(bytes: &[u8]) -> Option<SliceLayout> {
    let (&kind, rest) = bytes.split_first()?;
    let (addr_len, bits) = if kind & 1 == 0 { (4, 32) } else { (16, 128) };
    if rest.len() < addr_len + 2 {
        return None;
    }
    let (addr_bytes, rest) = rest.split_at(addr_len);
    let prefix = rest[0] % (bits + 1);
    let range = Cidr {
        addr: ip_from(addr_bytes)?,
        prefix,
    }
    .network();
    let size = rest[1] % (bits + 1);
    // Spread over the whole range: a record's byte picks one of 256 places in it.
    let place = |n: u8| {
        range.at((u128::from(n) << range.host_bits().saturating_sub(8)) & range.last_offset())
    };
    let (mut nodes, mut current, mut busy) = (BTreeSet::new(), Vec::new(), HashSet::new());
    for record in rest[2..].chunks_exact(3).take(32) {
        let node = format!("n{}", record[1] % 8);
        match record[0] % 3 {
            0 => {
                nodes.insert(node);
            }
            1 => {
                busy.insert(
                    Cidr {
                        addr: place(record[1]),
                        prefix: record[2] % (bits + 1),
                    }
                    .network(),
                );
            }
            _ => current.push(NodeSliceAllocation {
                node_name: node,
                slice_range: Cidr {
                    addr: place(record[2]),
                    prefix: size,
                }
                .network()
                .to_string(),
            }),
        }
    }
    Some((range, size, nodes, current, busy))
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
