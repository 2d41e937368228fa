//! A burst of ADDs through the real binary against the fake API server with 2 ms added per
//! request: 100 ADDs, 20 at a time, over 10 nodes into one range. Prints the wall time, p50/p99
//! per ADD and API requests per ADD, for three set-ups:
//! - 10 machines: each simulated node has a spool of its own, as separate machines would;
//! - one machine: the 10 node names share the machine's spool;
//! - no spool: every ADD writes the pool on its own.
//!
//! Then the same burst, 10 machines, on the real API server (kube-apiserver and etcd from
//! `hack/control-plane`, TLS, no added latency): requests per ADD there come from the server's
//! own `apiserver_request_total`.
//!
//! Run: `cargo bench --bench kubernetes_burst` (builds the release binary).

#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;
#[path = "../tests/kube_apiserver/mod.rs"]
mod kube_apiserver;

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

/// The server a scenario runs against, and how its requests are counted.
enum Server {
    Fake(FakeApiServer),
    Real(kube_apiserver::TestNamespace),
}

impl Server {
    fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        match self {
            Server::Fake(server) => server.write_kubeconfig(dir, None),
            Server::Real(namespace) => namespace.kubeconfig(dir),
        }
    }

    /// Requests for the whereabouts objects so far (the fake also counts by verb).
    fn requests(&self) -> (u64, String) {
        match self {
            Server::Fake(server) => (
                server.requests(),
                format!("{:?}", server.requests_by_verb()),
            ),
            Server::Real(namespace) => (
                namespace.plane.requests_for_group(kube_apiserver::GROUP),
                String::from("(apiserver_request_total)"),
            ),
        }
    }
}

fn scenario(title: &str, server: Server, spool: Option<String>) {
    let bin = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = server.kubeconfig(dir.path());
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

    if let Server::Fake(fake) = &server {
        fake.set_latency(LATENCY);
    }
    let (before, _) = server.requests();
    let burst = Burst {
        calls: ADDS,
        parallel: PARALLEL,
        nodes: NODES,
        command: "ADD",
    };
    let out = run_burst(bin, &conf, &burst, &env);
    let (after, by_verb) = server.requests();
    let requests = after - before;
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
    println!("  requests       {by_verb}");
}

fn main() {
    println!(
        "kubernetes burst: {ADDS} ADDs, {PARALLEL} at a time, {NODES} nodes, one range, {LATENCY:?} added per API request"
    );
    println!("binary: {}", env!("CARGO_BIN_EXE_whereabouts"));
    let base = std::env::temp_dir().join(format!("wb-bench-spool-{}", std::process::id()));
    let fake = || Server::Fake(FakeApiServer::start());
    scenario("10 machines (a spool per node)", fake(), None);
    scenario(
        "one machine (the 10 node names share its spool)",
        fake(),
        Some(base.join("shared").display().to_string()),
    );
    // A spool below a regular file cannot be made: every ADD writes on its own.
    let file = base.join("not-a-folder");
    let _ = std::fs::create_dir_all(&base);
    let _ = std::fs::write(&file, b"");
    scenario(
        "no spool (every ADD writes alone)",
        fake(),
        Some(file.join("x").display().to_string()),
    );
    match kube_apiserver::control_plane() {
        Some(plane) => scenario(
            "real API server, 10 machines (a spool per node), no added latency",
            Server::Real(plane.namespace("bench-burst")),
            None,
        ),
        None => println!("real API server: not available (see above)"),
    }
    let _ = std::fs::remove_dir_all(&base);
}
