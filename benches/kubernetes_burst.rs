//! A burst of ADDs through the real binary against the fake API server with 2 ms added per
//! request: 100 ADDs, 20 at a time, over 10 nodes into one range. Prints the wall time, p50/p99
//! per ADD and API requests per ADD, for three set-ups:
//! - 10 machines: each simulated node has a spool of its own, as separate machines would;
//! - one machine: the 10 node names share the machine's spool;
//! - no spool: every ADD writes the pool on its own.
//!
//! - an agent per node: each simulated node runs `whereabouts agent` on a socket of its own and
//!   the plugin processes ask it (one client per node, ADDs and DELs combined per pool in memory).
//!
//! The 10-machine set-ups run with and without the agent in the same run, at 2 ms and at 10 ms
//! per request, and then on the real API server (kube-apiserver and etcd from
//! `hack/control-plane`, TLS, no added latency): requests per ADD there come from the server's
//! own `apiserver_request_total`. After each burst of ADDs, the same pods are deleted in a burst
//! of DELs.
//!
//! Run: `cargo bench --bench kubernetes_burst` (builds the release binary).

#[path = "../tests/agent_process/mod.rs"]
mod agent_process;
#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;
#[path = "../tests/kube_apiserver/mod.rs"]
mod kube_apiserver;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use agent_process::Agent;
use fake_apiserver::burst::{run_burst_per_node, Burst, Outcome};
use fake_apiserver::cni::{netconf, run, Call};
use fake_apiserver::FakeApiServer;
use serde_json::json;

const ADDS: usize = 100;
const PARALLEL: usize = 20;
const NODES: usize = 10;
const LATENCY: Duration = Duration::from_millis(2);

/// How the plugin processes of a scenario reach the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Each process on its own (combining through the node's spool folder).
    Plugin,
    /// Through an agent per node.
    Agent,
}

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

fn scenario(title: &str, server: Server, spool: Option<String>, via: Via, latency: Duration) {
    let bin = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = server.kubeconfig(dir.path());
    let agents: Vec<Agent> = match via {
        Via::Plugin => Vec::new(),
        Via::Agent => (0..NODES)
            .map(|n| {
                let settings = json!({
                    "datastore": "kubernetes",
                    "kubernetes": {"kubeconfig": kubeconfig},
                    "log_level": "error",
                });
                Agent::start(dir.path(), &format!("node-{n}"), settings)
            })
            .collect(),
    };
    let node_env: Vec<Vec<(&'static str, String)>> = agents.iter().map(|a| vec![a.env()]).collect();
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
        env: env
            .iter()
            .chain(node_env.first().into_iter().flatten())
            .cloned()
            .collect(),
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
        fake.set_latency(latency);
    }
    let (before, _) = server.requests();
    let burst = Burst {
        calls: ADDS,
        parallel: PARALLEL,
        nodes: NODES,
        command: "ADD",
    };
    let out = run_burst_per_node(bin, &conf, &burst, &env, &node_env);
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
    report("ADD", &out, requests, &by_verb);

    let (before, _) = server.requests();
    let dels = run_burst_per_node(
        bin,
        &conf,
        &Burst {
            command: "DEL",
            ..burst
        },
        &env,
        &node_env,
    );
    let (after, by_verb) = server.requests();
    for (i, _, reply) in &dels.calls {
        assert_eq!(reply.code, 0, "DEL {i} failed: {reply:?}");
    }
    report("DEL", &dels, after - before, &by_verb);
    for operation in ["add", "del"] {
        let metric = |name: &str| -> f64 {
            let prefix =
                format!("whereabouts_agent_batch_size_{name}{{operation=\"{operation}\"}}");
            agents.iter().map(|a| a.metric(&prefix)).sum()
        };
        let (sum, count) = (metric("sum"), metric("count"));
        if count > 0.0 {
            println!(
                "  {operation} batches {count:>6} (mean size {:.1})",
                sum / count
            );
        }
    }
}

fn report(what: &str, out: &Outcome, requests: u64, by_verb: &str) {
    let calls = out.calls.len().max(1) as f64;
    println!(
        "  {what} wall time  {:>8.1} ms",
        out.wall.as_secs_f64() * 1e3
    );
    println!(
        "  {what} p50        {:>8.1} ms",
        out.percentile(0.50).as_secs_f64() * 1e3
    );
    println!(
        "  {what} p99        {:>8.1} ms",
        out.percentile(0.99).as_secs_f64() * 1e3
    );
    println!("  requests/{what}   {:>8.2}", requests as f64 / calls);
    println!("  requests       {by_verb}");
}

fn main() {
    println!(
        "kubernetes burst: {ADDS} ADDs, {PARALLEL} at a time, {NODES} nodes, one range, {LATENCY:?} added per API request"
    );
    println!("binary: {}", env!("CARGO_BIN_EXE_whereabouts"));
    let base = std::env::temp_dir().join(format!("wb-bench-spool-{}", std::process::id()));
    let fake = || Server::Fake(FakeApiServer::start());
    for latency in [LATENCY, Duration::from_millis(10)] {
        scenario(
            &format!("10 machines (a spool per node), {latency:?} per request"),
            fake(),
            None,
            Via::Plugin,
            latency,
        );
        scenario(
            &format!("10 machines (an agent per node), {latency:?} per request"),
            fake(),
            None,
            Via::Agent,
            latency,
        );
    }
    scenario(
        "one machine (the 10 node names share its spool)",
        fake(),
        Some(base.join("shared").display().to_string()),
        Via::Plugin,
        LATENCY,
    );
    // A spool below a regular file cannot be made: every ADD writes on its own.
    let file = base.join("not-a-folder");
    let _ = std::fs::create_dir_all(&base);
    let _ = std::fs::write(&file, b"");
    scenario(
        "no spool (every ADD writes alone)",
        fake(),
        Some(file.join("x").display().to_string()),
        Via::Plugin,
        LATENCY,
    );
    match kube_apiserver::control_plane() {
        Some(plane) => {
            scenario(
                "real API server, 10 machines (a spool per node), no added latency",
                Server::Real(plane.namespace("bench-burst")),
                None,
                Via::Plugin,
                Duration::ZERO,
            );
            scenario(
                "real API server, 10 machines (an agent per node), no added latency",
                Server::Real(plane.namespace("bench-burst-agent")),
                None,
                Via::Agent,
                Duration::ZERO,
            );
        }
        None => println!("real API server: not available (see above)"),
    }
    let _ = std::fs::remove_dir_all(&base);
}
