//! A burst of ADDs through the real binary against the fake API server with 2 ms added per
//! request: 100 ADDs, 20 at a time, over 10 nodes into one range. Prints the wall time, p50/p99
//! per ADD and API requests per ADD.
//!
//! Run: `cargo bench --bench kubernetes_burst` (builds the release binary).

#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_apiserver::cni::{netconf, run, Call};
use fake_apiserver::FakeApiServer;
use serde_json::json;

const ADDS: usize = 100;
const PARALLEL: usize = 20;
const NODES: usize = 10;
const LATENCY: Duration = Duration::from_millis(2);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let bin = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let ipam = json!({
        "type": "whereabouts",
        "range": "10.50.0.0/16",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()},
    });
    let conf = netconf("burst", &ipam);

    // One warm-up ADD/DEL so the pool exists, as in a running cluster.
    let warm = Call {
        command: "ADD",
        container: "warm-up",
        ifname: "net1",
        pod: Some(("bench", "warm-up")),
        node: Some("node-0"),
        env: vec![],
    };
    assert_eq!(run(bin, &warm, &conf).code, 0);
    assert_eq!(run(bin, &Call { command: "DEL", ..warm }, &conf).code, 0);

    server.set_latency(LATENCY);
    server.reset_counts();
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let workers: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let next = next.clone();
            let results = results.clone();
            let conf = conf.clone();
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= ADDS {
                    return;
                }
                let container = format!("burst-{i}");
                let pod = format!("pod-{i}");
                let node = format!("node-{}", i % NODES);
                let began = Instant::now();
                let reply = run(
                    bin,
                    &Call {
                        command: "ADD",
                        container: &container,
                        ifname: "net1",
                        pod: Some(("bench", &pod)),
                        node: Some(&node),
                        env: vec![],
                    },
                    &conf,
                );
                let took = began.elapsed();
                assert_eq!(reply.code, 0, "ADD {i} failed: {reply:?}");
                results.lock().unwrap().push((took, reply.ips()));
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let wall = start.elapsed();
    let requests = server.requests();
    let by_verb = server.requests_by_verb();

    let results = results.lock().unwrap();
    let mut times: Vec<Duration> = results.iter().map(|(t, _)| *t).collect();
    times.sort();
    let ips: BTreeSet<&String> = results.iter().flat_map(|(_, ips)| ips).collect();
    assert_eq!(ips.len(), ADDS, "duplicate addresses handed out");

    println!("kubernetes burst: {ADDS} ADDs, {PARALLEL} at a time, {NODES} nodes, one range, {LATENCY:?} per API request");
    println!("  wall time      {:>8.1} ms", wall.as_secs_f64() * 1e3);
    println!("  ADD p50        {:>8.1} ms", percentile(&times, 0.50).as_secs_f64() * 1e3);
    println!("  ADD p99        {:>8.1} ms", percentile(&times, 0.99).as_secs_f64() * 1e3);
    println!("  requests/ADD   {:>8.2}", requests as f64 / ADDS as f64);
    println!("  requests       {by_verb:?}");
    println!("  binary         {}", bin.display());
}
