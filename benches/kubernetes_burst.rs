//! A burst of ADDs through the real binary against the fake API server with 2 ms added per
//! request: 100 ADDs, 20 at a time, over 10 nodes into one range. Prints the wall time, p50/p99
//! per ADD and API requests per ADD, for three set-ups:
//! - 10 machines: each simulated node has a spool of its own, as separate machines would;
//! - one machine: the 10 node names share the machine's spool;
//! - no spool: every ADD writes the pool on its own.
//!
//! Run: `cargo bench --bench kubernetes_burst` (builds the release binary).

#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use fake_apiserver::burst::{run_burst, Burst};
use fake_apiserver::cni::{netconf, run, Call};
use fake_apiserver::FakeApiServer;
use serde_json::json;

const ADDS: usize = 100;
const PARALLEL: usize = 20;
const NODES: usize = 10;
const LATENCY: Duration = Duration::from_millis(2);

fn scenario(title: &str, spool: Option<String>) {
    let bin = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let ipam = json!({
        "type": "whereabouts",
        "range": "10.50.0.0/16",
        "log_level": "error",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()},
    });
    let conf = netconf("burst", &ipam);
    let env: Vec<(&'static str, String)> = spool
        .map(|s| vec![("WHEREABOUTS_KUBERNETES_SPOOL", s)])
        .unwrap_or_default();

    // One warm-up ADD/DEL so the pool exists, as in a running cluster.
    let warm = Call {
        command: "ADD",
        container: "warm-up",
        ifname: "net1",
        pod: Some(("bench", "warm-up")),
        node: Some("node-0"),
        env: env.clone(),
    };
    assert_eq!(run(bin, &warm, &conf).code, 0);
    assert_eq!(
        run(
            bin,
            &Call {
                command: "DEL",
                ..warm
            },
            &conf
        )
        .code,
        0
    );

    server.set_latency(LATENCY);
    server.reset_counts();
    let burst = Burst {
        calls: ADDS,
        parallel: PARALLEL,
        nodes: NODES,
        command: "ADD",
    };
    let out = run_burst(bin, &conf, &burst, &env);
    let requests = server.requests();
    let mut ips = BTreeSet::new();
    for (i, _, reply) in &out.calls {
        assert_eq!(reply.code, 0, "ADD {i} failed: {reply:?}");
        for ip in reply.ips() {
            assert!(ips.insert(ip.clone()), "{ip} handed out twice");
        }
    }
    assert_eq!(ips.len(), ADDS);
    println!("{title}");
    println!("  wall time      {:>8.1} ms", out.wall.as_secs_f64() * 1e3);
    println!(
        "  ADD p50        {:>8.1} ms",
        out.percentile(0.50).as_secs_f64() * 1e3
    );
    println!(
        "  ADD p99        {:>8.1} ms",
        out.percentile(0.99).as_secs_f64() * 1e3
    );
    println!("  requests/ADD   {:>8.2}", requests as f64 / ADDS as f64);
    println!("  requests       {:?}", server.requests_by_verb());
}

fn main() {
    println!(
        "kubernetes burst: {ADDS} ADDs, {PARALLEL} at a time, {NODES} nodes, one range, {LATENCY:?} added per API request"
    );
    println!("binary: {}", env!("CARGO_BIN_EXE_whereabouts"));
    let base = std::env::temp_dir().join(format!("wb-bench-spool-{}", std::process::id()));
    scenario("10 machines (a spool per node)", None);
    scenario(
        "one machine (the 10 node names share its spool)",
        Some(base.join("shared").display().to_string()),
    );
    // A spool below a regular file cannot be made: every ADD writes on its own.
    let file = base.join("not-a-folder");
    let _ = std::fs::create_dir_all(&base);
    let _ = std::fs::write(&file, b"");
    scenario(
        "no spool (every ADD writes alone)",
        Some(file.join("x").display().to_string()),
    );
    let _ = std::fs::remove_dir_all(&base);
}
