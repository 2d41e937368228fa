//! DELs in a fragmented etcd pool against DELs in a dense one, through the library, on a real
//! 3-member cluster.
//!
//! Two pools of the same size hold the same addresses at the top; below them, one holds a
//! single long run and the other every second address only (`FRAGMENTS` runs of one address
//! each, as a pool looks after many pods came and went). The DELs of the top addresses take
//! turns between the pools, a few at a time, so that the machine's drift falls on both alike.
//! A DEL reads the run covering its address; the ratio shows what the runs below cost it.
//!
//! Run: `cargo bench --bench etcd_fragmented` (needs etcd-server and etcd-client).

#[path = "../tests/etcd_cluster/mod.rs"]
mod etcd_cluster;

use std::time::{Duration, Instant};

use etcd_cluster::{etcd_available, Cluster};
use serde_json::json;
use whereabouts::config::{Datastore, IpamConfig};
use whereabouts::ipam::names::pool_name;
use whereabouts::ipam::Range;
use whereabouts::store::etcd::{open_with, Timeouts};
use whereabouts::store::{
    AddRequest, Attachment, AttachmentRequest, Hints, PoolRef, RangeRequest, Store,
};

/// Runs of one address below the measured ones in the fragmented pool.
const FRAGMENTS: usize = 10_000;
/// DELs measured in each pool.
const MEASURED: usize = 1_000;
/// DELs of one pool before the other pool's turn.
const TURN: usize = 50;

fn main() {
    if !etcd_available() {
        return;
    }
    let cluster = Cluster::start(false);
    let cfg = config(&cluster);
    let Datastore::Etcd(etcd) = &cfg.datastore else {
        unreachable!("etcd configured")
    };
    let store = open_with(&cfg, etcd, Timeouts::default(), "/whereabouts/").expect("store");
    let dense = pool(&cfg, "dense");
    let fragmented = pool(&cfg, "fragmented");
    let started = Instant::now();
    for p in [&dense, &fragmented] {
        for i in 0..2 * FRAGMENTS + MEASURED {
            store.add(&add_request(p, i)).expect("allocation");
        }
    }
    for i in (0..2 * FRAGMENTS).step_by(2) {
        store.del(&del_request(&fragmented, i)).expect("release");
    }
    println!(
        "set-up: {} addresses in each pool, {FRAGMENTS} runs of one below the top {MEASURED} in one ({:.0} s)",
        2 * FRAGMENTS + MEASURED,
        started.elapsed().as_secs_f64()
    );
    let (mut spent_dense, mut spent_fragmented) = (Duration::ZERO, Duration::ZERO);
    for turn in (2 * FRAGMENTS..2 * FRAGMENTS + MEASURED).step_by(TURN) {
        spent_dense += dels(store.as_ref(), &dense, turn);
        spent_fragmented += dels(store.as_ref(), &fragmented, turn);
    }
    let per = |spent: Duration| spent.as_secs_f64() * 1000.0 / MEASURED as f64;
    println!(
        "DEL one at a time: {:.2} ms in the dense pool, {:.2} ms above {FRAGMENTS} runs; ratio (dense/fragmented time) {:.2}",
        per(spent_dense),
        per(spent_fragmented),
        spent_dense.as_secs_f64() / spent_fragmented.as_secs_f64()
    );
}

/// The DELs of the `TURN` addresses from `first` in pool `p`, one after another: their time.
fn dels(store: &dyn Store, p: &PoolRef, first: usize) -> Duration {
    let start = Instant::now();
    for i in first..first + TURN {
        let released = store.del(&del_request(p, i)).expect("release");
        assert_eq!(released.len(), 1, "DEL {i} of {} released nothing", p.name);
    }
    start.elapsed()
}

fn config(cluster: &Cluster) -> IpamConfig {
    let ipam = json!({
        "type": "whereabouts",
        "datastore": "etcd",
        "etcd_host": cluster.endpoints(),
        "range": "10.64.0.0/16",
        "log_level": "error",
    });
    whereabouts::config::load_with_flat_files(Some(&ipam), &[]).expect("config")
}

/// The configured range as the pool of network `network`.
fn pool(cfg: &IpamConfig, network: &str) -> PoolRef {
    let spec = cfg.ranges[0].clone();
    PoolRef {
        name: pool_name(&spec.cidr, network, None),
        range: Range::resolve(&spec, None).expect("range"),
        spec,
        gateway: None,
    }
}

fn container(p: &PoolRef, i: usize) -> String {
    format!("{}-{i}", p.name)
}

fn add_request(p: &PoolRef, i: usize) -> AddRequest {
    AddRequest {
        cni_network: "net".into(),
        network_name: String::new(),
        overlap: false,
        attachment: Attachment {
            container_id: container(p, i),
            ifname: "eth0".into(),
            pod_ref: None,
            pod_uid: None,
        },
        ranges: vec![RangeRequest {
            pool: p.clone(),
            requested: None,
        }],
        node_slice_size: None,
        sleep_for_race: 0,
        node: None,
    }
}

fn del_request(p: &PoolRef, i: usize) -> AttachmentRequest {
    AttachmentRequest {
        cni_network: "net".into(),
        network_name: String::new(),
        container_id: container(p, i),
        ifname: "eth0".into(),
        pools: vec![p.clone()],
        node_slice_size: None,
        hints: Hints::default(),
    }
}
