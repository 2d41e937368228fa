//! Allocator micro-benchmarks: the cost of choosing and recording the next address as a pool
//! fills from empty to 1M allocations, on an IPv4 /8 and an IPv6 /64. The cost must stay flat.
//!
//! Two engines are measured: the core over an in-memory run set (what the Kubernetes engine does
//! with an IPPool), and the SQLite store (one transaction per allocation, as the plugin does).
//!
//! Run: `cargo bench --bench allocator`

use std::time::Instant;

use whereabouts::ipam::names::pool_name;
use whereabouts::ipam::{parse_range_text, OffsetRuns, Range, RangeSpec};
use whereabouts::store::local::LocalStore;
use whereabouts::store::{AddRequest, Attachment, PoolRef, RangeRequest, Store};

const FILLS: [u128; 5] = [0, 1_000, 10_000, 100_000, 1_000_000];
const SAMPLES: u32 = 2_000;

fn pool(range: &str) -> PoolRef {
    let (cidr, _, _) = parse_range_text(range).unwrap();
    let spec = RangeSpec {
        cidr,
        start: None,
        end: None,
        exclude: vec![],
    };
    PoolRef {
        name: pool_name(&cidr, "", None),
        range: Range::resolve(&spec, None).unwrap(),
        spec,
        gateway: None,
    }
}

/// Nanoseconds per allocation with the core over an in-memory run set holding `fill` offsets,
/// laid out either packed from the start or every other address (the worst fragmentation).
fn core_ns(pool: &PoolRef, fill: u128, fragmented: bool) -> f64 {
    let step = if fragmented { 2 } else { 1 };
    let mut runs: OffsetRuns = (0..fill).map(|i| 1 + i * step).collect();
    let start = Instant::now();
    for _ in 0..SAMPLES {
        let next = pool
            .range
            .lowest_free(|o| Ok::<_, ()>(runs.run_containing(o)))
            .unwrap()
            .unwrap();
        runs.insert(next);
    }
    start.elapsed().as_nanos() as f64 / SAMPLES as f64
}

/// Microseconds per ADD through the SQLite store holding `fill` allocations.
fn sqlite_us(pool: &PoolRef, fill: u128) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("wb.db")).unwrap();
    let who = |i: u128| Attachment {
        container_id: format!("fill-{i}"),
        ifname: "eth0".into(),
        pod_ref: None,
        pod_uid: None,
    };
    store
        .import(pool, "", "bench", (1..=fill).map(|i| (i, who(i))))
        .unwrap();
    let samples = SAMPLES / 4;
    let start = Instant::now();
    for i in 0..samples {
        let req = AddRequest {
            cni_network: "bench".into(),
            network_name: String::new(),
            overlap: true,
            attachment: Attachment {
                container_id: format!("bench-{i}"),
                ifname: "eth0".into(),
                pod_ref: None,
                pod_uid: None,
            },
            ranges: vec![RangeRequest {
                pool: pool.clone(),
                requested: None,
            }],
            node_slice_size: None,
            sleep_for_race: 0,
            node: Some("node-a".into()),
        };
        store.add(&req).unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / samples as f64
}

fn main() {
    println!(
        "{:<12} {:>10} {:>16} {:>20} {:>16}",
        "range", "allocated", "core ns/alloc", "core fragmented ns", "sqlite us/ADD"
    );
    for range in ["10.0.0.0/8", "fd00::/64"] {
        let pool = pool(range);
        let mut first = None;
        for fill in FILLS {
            let (packed, fragmented, sqlite) = (
                core_ns(&pool, fill, false),
                core_ns(&pool, fill, true),
                sqlite_us(&pool, fill),
            );
            println!("{range:<12} {fill:>10} {packed:>16.0} {fragmented:>20.0} {sqlite:>16.1}");
            first.get_or_insert(sqlite);
            if fill == *FILLS.last().unwrap() {
                println!(
                    "{range}: SQLite ADD cost at 1M allocations / empty = {:.2}",
                    sqlite / first.unwrap()
                );
            }
        }
    }
}
