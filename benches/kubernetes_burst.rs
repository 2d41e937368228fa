//! A burst of ADDs through the real binary against the fake API server with 2 ms added per
//! request: 100 ADDs, 20 at a time, over 10 nodes into one range. Prints the wall time, p50/p99
//! per ADD and API requests per ADD, for two set-ups:
//! - without the agent: every plugin process reads and writes the pool on its own;
//! - an agent per node: each simulated node runs `whereabouts agent` on a socket of its own and
//!   the plugin processes ask it (one client per node, ADDs and DELs combined per pool in memory).
//!
//! Both run in the same run, at 2 ms and at 10 ms per request, and then on the real API server (kube-apiserver and etcd from
//! `hack/control-plane`, TLS, no added latency): requests per ADD there come from the server's
//! own `apiserver_request_total`. After each burst of ADDs, the same pods are deleted in a burst
//! of DELs.
//!
//! With `WHEREABOUTS_EARLIER_BINARY`, an earlier build runs the bursts of the fake server
//! without the agent (its processes combining through a spool folder per simulated node, as it
//! did) right before this build does, for before/after figures.
//!
//! Parts can be chosen: `cargo bench --bench kubernetes_burst -- large share`.
//!
//! Run: `cargo bench --bench kubernetes_burst` (builds the release binary).

#[path = "../tests/agent_process/mod.rs"]
mod agent_process;
mod earlier;
#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;
#[path = "../tests/kube_apiserver/mod.rs"]
mod kube_apiserver;
mod shipped;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_process::Agent;
use fake_apiserver::burst::{run_burst_per_node, Burst, Outcome};
use fake_apiserver::cni::{netconf, run, Call};
use fake_apiserver::FakeApiServer;
use serde_json::json;

/// The burst of every scenario; the large one runs too, with and without the agent.
const BURST: Size = Size {
    calls: 100,
    parallel: 20,
};
const LARGE: Size = Size {
    calls: 1000,
    parallel: 50,
};
const NODES: usize = 10;
const LATENCY: Duration = Duration::from_millis(2);

/// How many ADDs (then as many DELs) a scenario makes, and how many at a time.
#[derive(Clone, Copy)]
struct Size {
    calls: usize,
    parallel: usize,
}

/// How the plugin processes of a scenario reach the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Each process on its own.
    Plugin,
    /// Through an agent per node.
    Agent,
    /// An earlier build, whose processes combined through a spool folder per node.
    EarlierSpool,
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

    /// Requests so far (the fake counts every request, and by verb; the real server's count is
    /// of the whereabouts objects and the Leases, the Go binaries' that the plugin reads while
    /// they may write the pools among them).
    fn requests(&self) -> (u64, String) {
        match self {
            Server::Fake(server) => (
                server.requests(),
                format!("{:?}", server.requests_by_verb()),
            ),
            Server::Real(namespace) => (
                namespace.plane.requests_for_group(kube_apiserver::GROUP)
                    + namespace.plane.requests_for_leases(),
                String::from("(apiserver_request_total: whereabouts objects and Leases)"),
            ),
        }
    }
}

fn scenario(title: &str, server: Server, via: Via, latency: Duration) {
    let bin = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    scenario_of(bin, title, server, via, latency, BURST);
}

/// [`scenario`] with the plugin processes of binary `bin`.
fn scenario_of(bin: &Path, title: &str, server: Server, via: Via, latency: Duration, size: Size) {
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = server.kubeconfig(dir.path());
    let agents: Vec<Agent> = match via {
        Via::Plugin | Via::EarlierSpool => Vec::new(),
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
    let node_env: Vec<Vec<(&'static str, String)>> = match via {
        Via::EarlierSpool => (0..NODES)
            .map(|n| {
                let spool = dir.path().join(format!("spool-{n}"));
                vec![("WHEREABOUTS_KUBERNETES_SPOOL", spool.display().to_string())]
            })
            .collect(),
        _ => agents.iter().map(|a| vec![a.env()]).collect(),
    };
    let ipam = json!({
        "type": "whereabouts",
        "range": "10.50.0.0/16",
        "log_level": "error",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()},
    });
    let conf = netconf("burst", &ipam);
    let env: Vec<(&'static str, String)> = Vec::new();

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
        calls: size.calls,
        parallel: size.parallel,
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
    assert_eq!(ips.len(), size.calls);
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
        "kubernetes burst: {} ADDs, {} at a time, {NODES} nodes, one range, {LATENCY:?} added per API request",
        BURST.calls, BURST.parallel
    );
    println!("binary: {}", env!("CARGO_BIN_EXE_whereabouts"));
    let part = parts();
    let fake = || Server::Fake(FakeApiServer::start());
    let earlier: Option<PathBuf> = earlier::binary();
    for latency in [LATENCY, Duration::from_millis(10)] {
        if !part("burst") {
            break;
        }
        if let Some(bin) = &earlier {
            let title =
                format!("EARLIER BUILD, 10 machines (a spool per node), {latency:?} per request");
            scenario_of(bin, &title, fake(), Via::EarlierSpool, latency, BURST);
        }
        let title = format!("10 machines without the agent, {latency:?} per request");
        scenario(&title, fake(), Via::Plugin, latency);
        let title = format!("10 machines (an agent per node), {latency:?} per request");
        scenario(&title, fake(), Via::Agent, latency);
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    for (name, via) in [
        ("without the agent", Via::Plugin),
        ("an agent per node", Via::Agent),
    ] {
        if !part("large") {
            break;
        }
        let title = format!(
            "LARGE: {} ADDs, {} at a time, 10 machines ({name}), {LATENCY:?} per request",
            LARGE.calls, LARGE.parallel
        );
        scenario_of(bin, &title, fake(), via, LATENCY, LARGE);
    }
    match part("real").then(kube_apiserver::control_plane) {
        Some(None) => println!("real API server: not available (see above)"),
        None => {}
        Some(Some(plane)) => {
            scenario(
                "real API server, 10 machines without the agent, no added latency",
                Server::Real(plane.namespace("bench-burst")),
                Via::Plugin,
                Duration::ZERO,
            );
            scenario(
                "real API server, 10 machines (an agent per node), no added latency",
                Server::Real(plane.namespace("bench-burst-agent")),
                Via::Agent,
                Duration::ZERO,
            );
        }
    }
    if part("share") {
        plugin_share();
    }
}

/// Which parts to run: those named on the command line (`burst`, `large`, `real`, `share`,
/// as in `cargo bench --bench kubernetes_burst -- large`), or all of them.
fn parts() -> impl Fn(&str) -> bool {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    move |part| named.is_empty() || named.iter().any(|n| n == part)
}

/// The plugin's own share of an ADD through the agent: ADDs one after another through one agent
/// (fake server, no added latency), each timed from outside, less the agent's own time for it
/// (its `request_duration_seconds`) and less a bare `VERSION` call (process start). What is left
/// is the socket round trip, the configuration read and the JSON.
///
/// Measured for cargo's release build, for the static plugin-only build the image ships (and
/// the installer copies to nodes with the agent) when `hack/images/build` has made it, and for
/// an earlier build with
/// `WHEREABOUTS_EARLIER_BINARY`; each from a fresh copy, in rounds that take turns so that all
/// meet the same machine.
fn plugin_share() {
    const ROUNDS: usize = 4;
    const CALLS: usize = 50;
    let copies = tempfile::tempdir().expect("temp dir");
    let plugins: Vec<(&str, PathBuf)> = [
        ("cargo's build", Some(cargo_build())),
        ("plugin-only (static)", shipped_build()),
        ("earlier build", earlier::binary()),
    ]
    .into_iter()
    .filter_map(|(name, bin)| Some((name, fresh_copy(&bin?, copies.path(), name))))
    .collect();
    if shipped_build().is_none() {
        println!("no static plugin-only build (hack/images/build makes it): not measured");
    }
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let settings = json!({"datastore": "kubernetes", "kubernetes": {"kubeconfig": kubeconfig},
                          "log_level": "error"});
    let agent = Agent::start(dir.path(), "node-0", settings);
    // A pool of its own for each plugin's round, so that the agent's writes stay small and
    // alike (a pool's write grows with its entries).
    let conf = |block: usize| {
        let ipam = json!({"type": "whereabouts", "range": format!("10.60.{block}.0/24"),
                          "log_level": "error",
                          "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}});
        netconf("share", &ipam)
    };
    let call = |bin: &Path, conf: &str, command: &'static str, container: &str| {
        let call = Call {
            command,
            container,
            ifname: "net1",
            pod: Some(("bench", container)),
            node: Some("node-0"),
            env: vec![agent.env()],
        };
        let started = std::time::Instant::now();
        let reply = run(bin, &call, conf);
        assert_eq!(reply.code, 0, "{command} {container}: {reply:?}");
        started.elapsed().as_secs_f64()
    };
    let served = |what: &str| {
        agent.metric(&format!(
            "whereabouts_agent_request_duration_seconds_{what}{{operation=\"add\"}}"
        ))
    };
    let mut shares = vec![Share::default(); plugins.len()];
    for round in 0..ROUNDS {
        for (p, ((_, bin), share)) in plugins.iter().zip(&mut shares).enumerate() {
            let conf = conf(round * plugins.len() + p);
            call(bin, &conf, "ADD", &format!("warm-up-{p}-{round}"));
            let timed = |command, i| call(bin, &conf, command, &format!("share-{p}-{round}-{i}"));
            share.versions += (0..CALLS).map(|i| timed("VERSION", i)).sum::<f64>();
            let (sum_before, count_before) = (served("sum"), served("count"));
            share.adds += (0..CALLS).map(|i| timed("ADD", i)).sum::<f64>();
            let count = served("count") - count_before;
            assert_eq!(count as usize, CALLS, "every ADD went through the agent");
            share.agent += served("sum") - sum_before;
            share.calls += CALLS as f64;
        }
    }
    println!(
        "the plugin's own share of an ADD through the agent, {} one after another:",
        ROUNDS * CALLS
    );
    for ((name, _), share) in plugins.iter().zip(&shares) {
        share.print(name);
    }
}

/// Seconds summed over a plugin's calls in [`plugin_share`].
#[derive(Clone, Default)]
struct Share {
    versions: f64,
    adds: f64,
    agent: f64,
    calls: f64,
}

impl Share {
    fn print(&self, name: &str) {
        let [adds, agent, versions] =
            [self.adds, self.agent, self.versions].map(|total| total / self.calls * 1e3);
        println!("  {name}:");
        println!("    ADD, whole process  {adds:>8.3} ms");
        println!("    the agent's time    {agent:>8.3} ms");
        println!("    bare VERSION        {versions:>8.3} ms");
        println!(
            "    the plugin's share beyond VERSION {:>6.3} ms",
            adds - agent - versions
        );
    }
}

fn cargo_build() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_whereabouts"))
}

/// The static plugin-only build that `hack/images/build` makes, when it is there: what the
/// installer puts on nodes whose agent serves the plugin.
fn shipped_build() -> Option<PathBuf> {
    shipped::static_build("whereabouts-plugin")
}

/// A plain copy of `bin`: cargo's hard-linked output starts measurably slower than a copy.
fn fresh_copy(bin: &Path, dir: &Path, name: &str) -> PathBuf {
    let copy = dir.join(name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
    std::fs::copy(bin, &copy).expect("copy of the plugin");
    copy
}
