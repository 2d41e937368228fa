//! The etcd doctor over a store built from the bytes, checked against a walk over the offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use crate::store::etcd::doctor::{findings, Finding, Problem};
use crate::store::etcd::keys::{hex, Keys};
use crate::store::etcd::records::{AllocationRecord, ReservationRecord};

const PREFIX: &str = "/w/";

/// Two pools, one whose name needs escaping in a key.
const POOLS: [&str; 2] = ["p0", "net/1"];

/// Offsets at most this high are walked one by one.
const WALKED: u128 = 255;

/// What a key of the built store is, as the walk needs it.
#[derive(Clone, Copy)]
enum Kind {
    Record { pool: usize, offset: u128 },
    Run { pool: usize, start: u128, end: u128 },
    Mark { pool: usize, offset: u128 },
    Other,
}

/// 4-byte records, each a key of the layout (an allocation record, a run, a freed mark, an
/// owner or pod entry, a reservation) or one the doctor cannot read, in one of two pools, at
/// a low offset or one near the top of the 128-bit space; a later key replaces an earlier
/// one, as in etcd. The survey must finish, name only keys it was given, and in a pool whose
/// keys lie at offsets up to [`WALKED`] report exactly the faults a walk over those offsets
/// finds: an offset two runs cover, a covered offset neither held nor marked, a held or
/// marked offset no run covers, an offset both held and marked.
pub fn etcd_doctor(bytes: &[u8]) {
    let store = built_store(bytes);
    let kvs = store.iter().map(|(k, (v, _))| (k.clone(), v.clone()));
    let found = findings(PREFIX, kvs);
    for f in &found {
        assert!(store.contains_key(&f.object), "names no key: {f:?}");
    }
    for (pool, name) in POOLS.iter().enumerate() {
        if let Some(faults) = walk(&store, pool) {
            assert_eq!(faults, reported(&store, pool, &found), "pool {name}");
        }
    }
}

type Store = BTreeMap<String, (Vec<u8>, Kind)>;

fn built_store(bytes: &[u8]) -> Store {
    let keys = Keys::new(PREFIX);
    let mut store = Store::new();
    for record in bytes.chunks_exact(4).take(256) {
        let (key, value, kind) = key_value(&keys, record);
        store.insert(key, (value, kind));
    }
    store
}

/// One key and value from `[kind, pool and holder, offset, extent]`.
fn key_value(keys: &Keys, record: &[u8]) -> (String, Vec<u8>, Kind) {
    let (what, who, at, extent) = (record[0], record[1], record[2], record[3]);
    let pool = usize::from(who & 1);
    let name = POOLS[pool];
    let offset = match at {
        0..=0xef => u128::from(at),
        _ => u128::MAX - u128::from(at - 0xf0),
    };
    let container = format!("c{}", (who >> 1) % 4);
    let ip = IpAddr::V6(Ipv6Addr::from(offset));
    match what % 8 {
        0 => {
            let value = allocation(name, ip, &container, extent & 1 != 0);
            let kind = Kind::Record { pool, offset };
            (keys.allocation(name, offset), value, kind)
        }
        1 => run(keys, pool, offset, extent),
        2 => {
            let kind = Kind::Mark { pool, offset };
            (keys.freed(name, offset), Vec::new(), kind)
        }
        3 => {
            let value = hex(offset).into_bytes();
            (keys.owner(&container, "net1", name), value, Kind::Other)
        }
        4 => {
            let holder = ReservationRecord {
                pool: name.to_string(),
                container_id: container,
                ifname: "net1".to_string(),
                pod_ref: None,
            };
            (keys.reservation("n", ip), holder.to_json(), Kind::Other)
        }
        5 => {
            let value = hex(offset).into_bytes();
            (keys.pod("ns/pod", "net1", name), value, Kind::Other)
        }
        6 => (keys.allocation(name, offset), vec![extent], Kind::Other),
        _ => (
            format!("{PREFIX}pools/{}/{}", at as char, extent as char),
            vec![extent],
            Kind::Other,
        ),
    }
}

/// The run of `pool` from `offset`: a few offsets long, to the top of the space, or ending
/// before it starts (unreadable), as `extent` says.
fn run(keys: &Keys, pool: usize, offset: u128, extent: u8) -> (String, Vec<u8>, Kind) {
    let end = match extent {
        0..=0xef => offset.saturating_add(u128::from(extent % 8)),
        0xf0..=0xf7 => u128::MAX,
        _ => offset.wrapping_sub(1),
    };
    let kind = match end >= offset {
        true => Kind::Run {
            pool,
            start: offset,
            end,
        },
        false => Kind::Other,
    };
    (keys.run(POOLS[pool], offset), hex(end).into_bytes(), kind)
}

fn allocation(pool: &str, ip: IpAddr, container: &str, reserved: bool) -> Vec<u8> {
    AllocationRecord {
        ip,
        range: format!("{pool}-range"),
        container_id: container.to_string(),
        ifname: "net1".to_string(),
        pod_ref: None,
        pod_uid: None,
        cni_network: String::new(),
        network_name: "n".to_string(),
        reserved,
        node: None,
    }
    .to_json()
}

/// A fault: what it is and the key it is reported on (none for overlaps and leaks, which one
/// run or another of the pool may carry).
type Fault = (Problem, Option<String>);

/// The runs (start, end), records and marks of `pool`: offsets and keys.
type PoolKeys<'a> = (
    Vec<(u128, u128)>,
    BTreeMap<u128, &'a String>,
    BTreeMap<u128, &'a String>,
);

fn pool_keys(store: &Store, pool: usize) -> PoolKeys<'_> {
    let (mut runs, mut records, mut marks) = (Vec::new(), BTreeMap::new(), BTreeMap::new());
    for (key, (_, kind)) in store {
        match *kind {
            Kind::Run {
                pool: p,
                start,
                end,
            } if p == pool => runs.push((start, end)),
            Kind::Record { pool: p, offset } if p == pool => drop(records.insert(offset, key)),
            Kind::Mark { pool: p, offset } if p == pool => drop(marks.insert(offset, key)),
            _ => {}
        }
    }
    (runs, records, marks)
}

/// The faults of `pool` that a walk over its offsets finds; `None` when a key of the pool lies
/// beyond [`WALKED`].
fn walk(store: &Store, pool: usize) -> Option<BTreeSet<Fault>> {
    let (runs, records, marks) = pool_keys(store, pool);
    let ends = runs.iter().map(|r| r.1);
    let mut offsets = ends
        .chain(records.keys().copied())
        .chain(marks.keys().copied());
    if offsets.any(|o| o > WALKED) {
        return None;
    }
    let mut faults = BTreeSet::new();
    let on = |problem, key: &String| (problem, Some(key.clone()));
    for offset in 0..=WALKED {
        let covering = runs.iter().filter(|(s, e)| *s <= offset && offset <= *e);
        let (record, mark) = (records.get(&offset), marks.get(&offset));
        match covering.count() {
            0 => {
                faults.extend(record.map(|k| on(Problem::UncoveredAllocation, k)));
                faults.extend(mark.map(|k| on(Problem::MarkOutsideRuns, k)));
            }
            n => {
                if n > 1 {
                    faults.insert((Problem::OverlappingRuns, None));
                }
                if record.is_none() && mark.is_none() {
                    faults.insert((Problem::LeakedOffsets, None));
                }
            }
        }
        if let (Some(_), Some(key)) = (record, mark) {
            faults.insert(on(Problem::MarkedAndHeld, key));
        }
    }
    Some(faults)
}

/// The faults of the walk's kinds that the doctor reported on keys of `pool`.
fn reported(store: &Store, pool: usize, found: &[Finding]) -> BTreeSet<Fault> {
    found
        .iter()
        .filter(|f| match store.get(&f.object).map(|(_, kind)| *kind) {
            Some(
                Kind::Run { pool: p, .. }
                | Kind::Record { pool: p, .. }
                | Kind::Mark { pool: p, .. },
            ) => p == pool,
            _ => false,
        })
        .filter_map(|f| match f.problem {
            Problem::OverlappingRuns | Problem::LeakedOffsets => Some((f.problem, None)),
            Problem::UncoveredAllocation | Problem::MarkOutsideRuns | Problem::MarkedAndHeld => {
                Some((f.problem, Some(f.object.clone())))
            }
            _ => None,
        })
        .collect()
}
