//! 1000 allocations from 10 simulated nodes against a real 3-member etcd cluster, compared with
//! the cluster's raw rate for sequential single-key transactions measured in the same run.
//!
//! Two figures: through the library (10 nodes, each with its own connection, allocating one
//! after another) and through the real binary (one process per ADD, as a runtime calls it),
//! the latter with and without a node agent per simulated node in the same run.
//!
//! The same number of bare `VERSION` processes at the same concurrency gives the machine's
//! floor: what starting the processes alone allows, with no engine behind them.
//!
//! With `WHEREABOUTS_EARLIER_BINARY`, an earlier build runs the binary measurements (without
//! the agent) first, for before/after figures.
//!
//! With `WHEREABOUTS_AGENT_BUILDS` (binaries of `whereabouts` separated by `:`), only the
//! plugin-only build's ADDs and DELs through the agents at 20 in flight are measured, once per
//! build in turn, for `WHEREABOUTS_BENCH_ROUNDS` rounds (3 by default): agent builds side by
//! side on one cluster, the machine's drift spread over both.
//!
//! Run: `cargo bench --bench etcd_burst` (needs etcd-server and etcd-client).

mod earlier;
mod shipped;
#[path = "../tests/common/trust.rs"]
mod trust;

#[path = "../tests/etcd_cluster/mod.rs"]
mod etcd_cluster;

#[path = "../tests/agent_process/mod.rs"]
mod agent_process;

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use etcd_cluster::{etcd_available, Cluster};
use serde_json::json;
use whereabouts::config::Datastore;
use whereabouts::store::etcd::{open_with, Timeouts};
use whereabouts::store::{AddRequest, Attachment, RangeRequest};

const NODES: usize = 10;
const PER_NODE: usize = 100;
const RAW_TXNS: usize = 1000;
/// Plugin processes in flight in the binary run.
const IN_FLIGHT: usize = 20;
/// Plugin processes in flight in the busier run through the agents (5 per node).
const BUSIER: usize = 50;

fn main() {
    if !etcd_available() {
        return;
    }
    let cluster = Cluster::start(false);
    if let Ok(builds) = std::env::var("WHEREABOUTS_AGENT_BUILDS") {
        let builds: Vec<&Path> = builds.split(':').map(Path::new).collect();
        agent_builds_side_by_side(&cluster, &builds);
        return;
    }
    let (raw, raw_ms) = members_ms_per(&cluster, RAW_TXNS, || raw_rate(&cluster, "first"));
    println!(
        "raw etcd rate: {raw:.0} sequential single-key transactions/s ({RAW_TXNS} txns), members' CPU {raw_ms:.2} ms per transaction"
    );
    let (raw_parallel, parallel_ms) =
        members_ms_per(&cluster, RAW_TXNS, || raw_parallel_rate(&cluster));
    println!(
        "raw etcd rate, {NODES} clients at once: {raw_parallel:.0} single-key transactions/s (for context), members' CPU {parallel_ms:.2} ms per transaction"
    );
    for watchers in [0, NODES] {
        let (shaped, shaped_ms) = members_ms_per(&cluster, RAW_TXNS, || {
            add_shaped_rate(&cluster, &format!("w{watchers}"), watchers)
        });
        println!(
            "raw etcd rate, {NODES} clients at once, transactions shaped like an ADD's commit, {watchers} watchers of the runs: {shaped:.0} transactions/s (for context), members' CPU {shaped_ms:.2} ms per transaction"
        );
    }
    let one = library_rate(&cluster, 1, "10.50.0.0/16");
    println!(
        "library: {PER_NODE} allocations from 1 node, one after another: {one:.0} allocations/s, ratio to raw {:.2}",
        one / raw
    );
    let allocations = NODES * PER_NODE;
    let txns_before = cluster.transactions_served();
    let (lib, lib_ms) = members_ms_per(&cluster, allocations, || {
        library_rate(&cluster, NODES, "10.60.0.0/16")
    });
    let txns_lib = (cluster.transactions_served() - txns_before) / allocations as f64;
    println!(
        "library: {allocations} allocations from {NODES} nodes: {lib:.0} allocations/s, ratio to raw {:.2}; members' CPU {lib_ms:.2} ms and {txns_lib:.2} transactions per allocation",
        lib / raw
    );
    let ours = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    if let Some(earlier) = earlier::binary() {
        let seq = binary_rate(&earlier, &cluster, 1, 1, "10.81.0.0/16", &[]).0;
        println!(
            "EARLIER BUILD: {PER_NODE} ADDs, one process at a time: {seq:.0} allocations/s, ratio to raw {:.2}",
            seq / raw
        );
        let bin = binary_rate(&earlier, &cluster, NODES, IN_FLIGHT, "10.71.0.0/16", &[]).0;
        println!(
            "EARLIER BUILD: {} ADDs from {NODES} nodes, {IN_FLIGHT} processes in flight: {bin:.0} allocations/s, ratio to raw {:.2}",
            NODES * PER_NODE,
            bin / raw
        );
    }
    let seq = binary_rate(ours, &cluster, 1, 1, "10.80.0.0/16", &[]).0;
    println!(
        "binary: {PER_NODE} ADDs, one process at a time: {seq:.0} allocations/s, ratio to raw {:.2}",
        seq / raw
    );
    let bin = binary_rate(ours, &cluster, NODES, IN_FLIGHT, "10.70.0.0/16", &[]).0;
    println!(
        "binary: {} ADDs from {NODES} nodes, {IN_FLIGHT} processes in flight: {bin:.0} allocations/s, ratio to raw {:.2}",
        NODES * PER_NODE,
        bin / raw
    );
    let floor = version_rate(ours, IN_FLIGHT);
    println!(
        "process floor: {} bare VERSION calls, {IN_FLIGHT} processes in flight: {floor:.0} calls/s, ratio to raw {:.2}",
        NODES * PER_NODE,
        floor / raw
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let agents: Vec<agent_process::Agent> = (0..NODES)
        .map(|n| {
            let settings = json!({
                "datastore": "etcd",
                "etcd_host": cluster.endpoints(),
                "log_level": "error",
            });
            agent_process::Agent::start(dir.path(), &format!("node-{n}"), settings)
        })
        .collect();
    let full = through_agents(
        ours,
        &cluster,
        &agents,
        IN_FLIGHT,
        ("10.90.0.0/16", &mut Results::new()),
        Operation::Add,
    );
    full.print(
        &format!("binary through an agent per node: {} ADDs from {NODES} nodes, {IN_FLIGHT} processes in flight", NODES * PER_NODE),
        raw,
    );
    // What a host with the agent runs: the static plugin-only build, when hack/images/build
    // has made it.
    let Some(plugin_only) = shipped::static_build("whereabouts-plugin") else {
        println!("no static plugin-only build (hack/images/build makes it): not measured");
        return;
    };
    for (in_flight, range) in [(IN_FLIGHT, "10.91.0.0/16"), (BUSIER, "10.92.0.0/16")] {
        let mut added = Results::new();
        for operation in [Operation::Add, Operation::Del] {
            let run = through_agents(
                &plugin_only,
                &cluster,
                &agents,
                in_flight,
                (range, &mut added),
                operation,
            );
            run.print(
                &format!(
                    "plugin-only build (static) through an agent per node: {} {}s, {in_flight} processes in flight",
                    NODES * PER_NODE,
                    operation.name()
                ),
                raw,
            );
        }
    }
    let floor = version_rate(&plugin_only, IN_FLIGHT);
    println!(
        "  its process floor: {IN_FLIGHT} bare VERSION calls in flight: {floor:.0} calls/s, ratio to raw {:.2}",
        floor / raw
    );
}

/// The plugin-only build's ADDs and DELs through ten agents of each build in `builds`, in
/// turns, round after round; each turn in a range of its own.
fn agent_builds_side_by_side(cluster: &Cluster, builds: &[&Path]) {
    let plugin_only = shipped::static_build("whereabouts-plugin")
        .expect("the static plugin-only build (hack/images/build makes it)");
    let rounds: usize = std::env::var("WHEREABOUTS_BENCH_ROUNDS").map_or(3, |r| {
        r.parse().expect("WHEREABOUTS_BENCH_ROUNDS is a number")
    });
    let raw = raw_rate(cluster, "first");
    println!("raw etcd rate: {raw:.0} sequential single-key transactions/s");
    for round in 0..rounds {
        for (b, build) in builds.iter().enumerate() {
            let dir = tempfile::tempdir().expect("temp dir");
            let settings = json!({
                "datastore": "etcd",
                "etcd_host": cluster.endpoints(),
                "log_level": "error",
            });
            let agents: Vec<agent_process::Agent> = (0..NODES)
                .map(|n| {
                    let node = format!("node-{n}");
                    agent_process::Agent::start_build(build, dir.path(), &node, settings.clone())
                })
                .collect();
            let range = format!("10.{}.0.0/16", 100 + round * builds.len() + b);
            let mut added = Results::new();
            for operation in [Operation::Add, Operation::Del] {
                let run = through_agents(
                    &plugin_only,
                    cluster,
                    &agents,
                    IN_FLIGHT,
                    (&range, &mut added),
                    operation,
                );
                let what = format!(
                    "round {round}, agents of {}: {} {}s, {IN_FLIGHT} processes in flight",
                    build.display(),
                    NODES * PER_NODE,
                    operation.name()
                );
                run.print(&what, raw);
            }
        }
    }
}

/// What `work` returns, and the CPU time the members spent meanwhile, in milliseconds per each
/// of the `count` operations it did.
fn members_ms_per<T>(cluster: &Cluster, count: usize, work: impl FnOnce() -> T) -> (T, f64) {
    let members = || CpuSpent::now(cluster, &[]).members;
    let before = members();
    let done = work();
    (done, (members() - before) * 1e3 / count as f64)
}

/// A run through the agents, and what the members and the agents counted during it.
struct AgentRun {
    operation: Operation,
    rate: f64,
    /// The raw rate measured right before the run: the machine's speed drifts within a run.
    raw_before: f64,
    /// etcd transactions per request, the members' own count.
    transactions: f64,
    /// etcd plain reads per request, likewise.
    plain_reads: f64,
    /// Requests per combined batch.
    batch: f64,
    /// Combined commits that lost a race.
    lost: f64,
    /// CPU time per request, by part.
    cpu: CpuSpent,
}

/// CPU seconds spent, by part of the run (or per ADD, once divided).
#[derive(Clone, Copy)]
struct CpuSpent {
    members: f64,
    agents: f64,
    /// The plugin processes (and the few curl calls that read counters): every child this
    /// process has waited for.
    plugins: f64,
    /// This process: it starts the plugin processes and collects their answers.
    harness: f64,
}

impl CpuSpent {
    fn now(cluster: &Cluster, agents: &[agent_process::Agent]) -> CpuSpent {
        let of = |pids: &mut dyn Iterator<Item = u32>| pids.map(process_cpu).sum::<f64>();
        CpuSpent {
            members: of(&mut cluster.pids().into_iter()),
            agents: of(&mut agents.iter().filter_map(|a| a.pid())),
            plugins: rusage_cpu(libc::RUSAGE_CHILDREN),
            harness: rusage_cpu(libc::RUSAGE_SELF),
        }
    }

    fn per(self, before: CpuSpent, adds: f64) -> CpuSpent {
        CpuSpent {
            members: (self.members - before.members) / adds,
            agents: (self.agents - before.agents) / adds,
            plugins: (self.plugins - before.plugins) / adds,
            harness: (self.harness - before.harness) / adds,
        }
    }
}

/// The CPU time process `pid` has spent, from its CPU-time clock.
fn process_cpu(pid: u32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    let mut spent = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write the out-parameters passed to them.
    let read = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
            && libc::clock_gettime(clock, &mut spent) == 0
    };
    assert!(read, "the CPU time of process {pid}");
    spent.tv_sec as f64 + spent.tv_nsec as f64 / 1e9
}

/// User and system time of this process (`RUSAGE_SELF`) or its waited-for children.
fn rusage_cpu(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(who, &mut usage) }, 0, "getrusage");
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// What the plugin processes of a run through the agents ask.
#[derive(Clone, Copy)]
enum Operation {
    Add,
    Del,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Add => "ADD",
            Operation::Del => "DEL",
        }
    }

    /// The `operation` label of the agents' metrics.
    fn label(self) -> &'static str {
        match self {
            Operation::Add => "add",
            Operation::Del => "del",
        }
    }

    /// What the run's rate counts.
    fn done(self) -> &'static str {
        match self {
            Operation::Add => "allocations",
            Operation::Del => "releases",
        }
    }
}

impl AgentRun {
    /// The run's rate as `what`, against the first raw rate `raw` and the one just before it,
    /// then what the members and the agents did.
    fn print(&self, what: &str, raw: f64) {
        let (op, done) = (self.operation.name(), self.operation.done());
        println!(
            "{what}: {:.0} {done}/s, ratio to raw {:.2} ({:.2} to the raw rate measured just before it, {:.0}/s)",
            self.rate,
            self.rate / raw,
            self.rate / self.raw_before,
            self.raw_before
        );
        println!(
            "  {:.2} etcd transactions and {:.2} plain reads per {op} (the members' own count), {:.2} {op}s per batch, {} combined commits lost a race",
            self.transactions, self.plain_reads, self.batch, self.lost as u64
        );
        let ms = |seconds: f64| seconds * 1e3;
        println!(
            "  CPU per {op}: etcd members {:.2} ms, agents {:.2} ms, plugin processes {:.2} ms, harness {:.2} ms",
            ms(self.cpu.members),
            ms(self.cpu.agents),
            ms(self.cpu.plugins),
            ms(self.cpu.harness)
        );
    }
}

/// `NODES * PER_NODE` ADDs through `bin` in `range` (or their DELs), each node's plugin
/// processes asking its agent. The ADDs leave their results in `added`, the DELs are given
/// them.
fn through_agents(
    bin: &Path,
    cluster: &Cluster,
    agents: &[agent_process::Agent],
    in_flight: usize,
    (range, added): (&str, &mut Results),
    operation: Operation,
) -> AgentRun {
    let raw_before = raw_rate(cluster, &format!("{range}-{}", operation.label()));
    let before = Counted::now(cluster, agents, operation);
    let cpu_before = CpuSpent::now(cluster, agents);
    let rate = match operation {
        Operation::Add => {
            let (rate, results) = binary_rate(bin, cluster, NODES, in_flight, range, agents);
            *added = results;
            rate
        }
        Operation::Del => del_rate(bin, cluster, agents, in_flight, (range, added)),
    };
    let cpu = CpuSpent::now(cluster, agents);
    let after = Counted::now(cluster, agents, operation);
    let served = after.served - before.served;
    assert_eq!(
        served as usize,
        NODES * PER_NODE,
        "every {} went through an agent",
        operation.name()
    );
    AgentRun {
        operation,
        rate,
        raw_before,
        transactions: (after.transactions - before.transactions) / served,
        plain_reads: (after.plain_reads - before.plain_reads) / served,
        batch: served / (after.batches - before.batches).max(1.0),
        lost: after.lost - before.lost,
        cpu: cpu.per(cpu_before, served),
    }
}

/// What the members and the agents have counted so far.
struct Counted {
    /// Transactions the members served.
    transactions: f64,
    /// Plain reads (outside transactions) the members served.
    plain_reads: f64,
    /// Requests of the operation the agents answered.
    served: f64,
    /// Batches of the operation the agents committed.
    batches: f64,
    /// Combined commits of the operation that lost a race.
    lost: f64,
}

impl Counted {
    fn now(cluster: &Cluster, agents: &[agent_process::Agent], operation: Operation) -> Counted {
        let op = operation.label();
        let total = |name: &str| -> f64 { agents.iter().map(|a| a.metric(name)).sum() };
        Counted {
            transactions: cluster.transactions_served(),
            plain_reads: cluster.plain_reads_served(),
            served: total(&format!(
                "whereabouts_agent_requests_total{{operation=\"{op}\",result=\"ok\"}}"
            )),
            batches: total(&format!(
                "whereabouts_agent_batch_size_count{{operation=\"{op}\"}}"
            )),
            lost: total(&format!(
                "whereabouts_agent_conflicts_total{{operation=\"{op}\"}}"
            )),
        }
    }
}

/// Sequential transactions, each creating one key if absent: the engine's own limit for a
/// client that waits for every commit. `tag` keeps the keys of each measurement apart.
fn raw_rate(cluster: &Cluster, tag: &str) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = Client::connect(cluster.endpoint_urls(), None)
            .await
            .expect("connect");
        // Warm up the connection.
        client
            .put(format!("/raw/{tag}/warm"), "x", None)
            .await
            .expect("put");
        let start = Instant::now();
        for i in 0..RAW_TXNS {
            let txn = absent_puts(&format!("/raw/{tag}/"), &format!("{i:08}"), &[1]);
            let resp = client.txn(txn).await.expect("txn");
            assert!(resp.succeeded());
        }
        RAW_TXNS as f64 / start.elapsed().as_secs_f64()
    })
}

/// The same transactions from `NODES` clients at once: what the cluster can absorb when it can
/// batch commits.
fn raw_parallel_rate(cluster: &Cluster) -> f64 {
    parallel_rate(cluster, "/rawp/", &[1])
}

/// The sizes of the values an ADD's commit puts (with an overlap reservation, the default):
/// its allocation record, owner and pod index entries, reservation and run.
const ADD_SHAPE: [usize; 5] = [300, 32, 32, 200, 32];

/// Transactions shaped like an agent's commit of one ADD (its five keys compared absent and
/// put, the last one a run key) from `NODES` clients at once, with `watchers` clients following
/// the run keys as the agents follow a pool's runs: what the members spend per commit with
/// nothing else competing for the cores.
fn add_shaped_rate(cluster: &Cluster, tag: &str, watchers: usize) -> f64 {
    let prefix = format!("/shaped/{tag}/");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let following: Vec<_> = (0..watchers)
        .map(|_| runtime.block_on(follow(cluster, format!("{prefix}r/"))))
        .collect();
    let rate = parallel_rate(cluster, &prefix, &ADD_SHAPE);
    for watcher in following {
        watcher.abort();
    }
    rate
}

/// A client that watches `dir` and drops the events, started once its watch is in place.
async fn follow(cluster: &Cluster, dir: String) -> tokio::task::JoinHandle<()> {
    let mut client = Client::connect(cluster.endpoint_urls(), None)
        .await
        .expect("connect");
    let options = etcd_client::WatchOptions::new().with_prefix();
    let mut events = client.watch(dir, Some(options)).await.expect("watch");
    tokio::spawn(async move {
        // The client lives as long as its watch is read.
        let _client = client;
        while let Ok(Some(_)) = events.message().await {}
    })
}

/// `RAW_TXNS` transactions from `NODES` clients at once, each putting one new key under
/// `prefix` per value size in `values` (the last under `<prefix>r/`) if all are absent.
fn parallel_rate(cluster: &Cluster, prefix: &str, values: &[usize]) -> f64 {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for node in 0..NODES {
            scope.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let mut client = Client::connect(cluster.endpoint_urls(), None)
                        .await
                        .expect("connect");
                    for i in 0..RAW_TXNS / NODES {
                        let txn = absent_puts(prefix, &format!("{node}-{i:08}"), values);
                        let resp = client.txn(txn).await.expect("txn");
                        assert!(resp.succeeded());
                    }
                })
            });
        }
    });
    RAW_TXNS as f64 / start.elapsed().as_secs_f64()
}

/// One transaction that puts a key `<prefix><k>/<name>` per value size if none exists yet; the
/// last key is `<prefix>r/<name>`.
fn absent_puts(prefix: &str, name: &str, values: &[usize]) -> Txn {
    let keys: Vec<String> = (0..values.len())
        .map(|k| {
            if k + 1 == values.len() {
                format!("{prefix}r/{name}")
            } else {
                format!("{prefix}{k}/{name}")
            }
        })
        .collect();
    let compares: Vec<Compare> = keys
        .iter()
        .map(|key| Compare::create_revision(key.clone(), CompareOp::Equal, 0))
        .collect();
    let puts: Vec<TxnOp> = keys
        .into_iter()
        .zip(values)
        .map(|(key, &size)| TxnOp::put(key, "v".repeat(size), None))
        .collect();
    Txn::new().when(compares).and_then(puts)
}

fn ipam(cluster: &Cluster, range: &str) -> serde_json::Value {
    json!({
        "type": "whereabouts",
        "datastore": "etcd",
        "etcd_host": cluster.endpoints(),
        "range": range,
        "log_level": "error",
    })
}

/// `nodes` threads, each with its own store (connection and runtime), allocating `PER_NODE`
/// addresses one after another from the same range.
fn library_rate(cluster: &Cluster, nodes: usize, range: &str) -> f64 {
    let cfg = whereabouts::config::load_with_flat_files(Some(&ipam(cluster, range)), &[])
        .expect("config");
    let Datastore::Etcd(etcd) = &cfg.datastore else {
        unreachable!("etcd configured")
    };
    let range = cfg.ranges[0].clone();
    let resolved = whereabouts::ipam::Range::resolve(&range, None).expect("range");
    let pool = whereabouts::store::PoolRef {
        name: whereabouts::ipam::names::pool_name(&range.cidr, "", None),
        spec: range,
        gateway: None,
        range: resolved,
    };
    let seen = Mutex::new(Vec::<IpAddr>::new());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for node in 0..nodes {
            let (cfg, etcd, pool, seen) = (&cfg, etcd, &pool, &seen);
            scope.spawn(move || {
                let store =
                    open_with(cfg, etcd, Timeouts::default(), "/whereabouts/").expect("store");
                for i in 0..PER_NODE {
                    let req = AddRequest {
                        cni_network: "net".into(),
                        network_name: String::new(),
                        overlap: true,
                        attachment: Attachment {
                            container_id: format!("lib-node{node}-{i}"),
                            ifname: "eth0".into(),
                            pod_ref: Some(format!("node{node}/pod{i}")),
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
                    let ips = store.add(&req).expect("allocation");
                    seen.lock().unwrap().extend(ips);
                }
            });
        }
    });
    let rate = (nodes * PER_NODE) as f64 / start.elapsed().as_secs_f64();
    check_unique(seen.into_inner().unwrap(), nodes * PER_NODE);
    rate
}

/// The results of ADDs by node and pod, which runtimes give the pod's DEL as `prevResult`.
type Results = HashMap<(usize, usize), serde_json::Value>;

/// `nodes * PER_NODE` ADDs through `bin` (each node's through its agent when `agents` has
/// one), `in_flight` processes at a time: allocations per second, and the ADDs' results.
/// Every address is distinct.
fn binary_rate(
    bin: &Path,
    cluster: &Cluster,
    nodes: usize,
    in_flight: usize,
    range: &str,
    agents: &[agent_process::Agent],
) -> (f64, Results) {
    let conf = network(cluster, range);
    let (replies, rate) = side_by_side(nodes, in_flight, |node, i| {
        let socket = agents.get(node).map(agent_process::Agent::env);
        (
            (node, i),
            call_binary(bin, "ADD", (&conf, range), node, i, socket),
        )
    });
    let ips = replies.iter().map(|(_, reply)| {
        reply["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<IpAddr>().ok())
            .expect("an address")
    });
    check_unique(ips.collect(), nodes * PER_NODE);
    (rate, replies.into_iter().collect())
}

/// The DELs of the ADDs [`binary_rate`] made in `range` from `NODES` nodes, each node's
/// through its agent, `in_flight` at a time, each given its ADD's result as `prevResult` as a
/// runtime gives it: DELs per second. Nothing of the pool is left.
fn del_rate(
    bin: &Path,
    cluster: &Cluster,
    agents: &[agent_process::Agent],
    in_flight: usize,
    (range, added): (&str, &Results),
) -> f64 {
    let conf: serde_json::Value = serde_json::from_slice(&network(cluster, range)).unwrap();
    let (_, rate) = side_by_side(NODES, in_flight, |node, i| {
        let socket = agents.get(node).map(agent_process::Agent::env);
        let mut conf = conf.clone();
        conf["prevResult"] = added[&(node, i)].clone();
        let conf = serde_json::to_vec(&conf).expect("config");
        call_binary(bin, "DEL", (&conf, range), node, i, socket);
    });
    // Every address released: the pool's records are gone, and its runs cover nothing but
    // released addresses marked freed.
    let pool = format!("/{}/", range.replace('/', "-"));
    let left: Vec<String> = cluster
        .left_after_releasing_all("/whereabouts/")
        .into_iter()
        .filter(|k| k.contains(&pool))
        .collect();
    assert!(
        left.is_empty(),
        "{} keys left after every DEL: {left:?}",
        left.len()
    );
    rate
}

/// The network configuration of the binary runs, allocating from `range`.
fn network(cluster: &Cluster, range: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "cniVersion": "1.0.0",
        "name": "net",
        "type": "bridge",
        "ipam": ipam(cluster, range),
    }))
    .expect("config")
}

/// Call `i` of each of `nodes` nodes (`call(node, i)`, `PER_NODE` each), `in_flight` at a time:
/// their results and the calls per second. The nodes take turns, as pods land on every node
/// of a cluster at once.
fn side_by_side<T: Send>(
    nodes: usize,
    in_flight: usize,
    call: impl Fn(usize, usize) -> T + Sync,
) -> (Vec<T>, f64) {
    let calls = nodes * PER_NODE;
    let next = AtomicUsize::new(0);
    let running = AtomicUsize::new(0);
    let most_running = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(calls));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..in_flight {
            scope.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= calls {
                    return;
                }
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most_running.fetch_max(now, Ordering::SeqCst);
                // The process runs before the lock is taken: the calls overlap.
                let result = call(n % nodes, n / nodes);
                running.fetch_sub(1, Ordering::SeqCst);
                results.lock().unwrap().push(result);
            });
        }
    });
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    // Guards the harness: a process run while the results' lock is held runs alone.
    assert!(
        in_flight == 1 || most_running.into_inner() > 1,
        "the plugin processes never overlapped"
    );
    (results.into_inner().unwrap(), rate)
}

/// `command` (ADD or DEL) of pod `i` on `node` through `bin` with the network configuration
/// `conf` (of `range`), which must succeed: its answer.
fn call_binary(
    bin: &Path,
    cni_command: &str,
    (conf, range): (&[u8], &str),
    node: usize,
    i: usize,
    agent: Option<(&'static str, String)>,
) -> serde_json::Value {
    // Each measurement's pods are new containers, as they would be: a DEL releases what its
    // container holds in every pool, so a container ID shared with an earlier measurement's
    // ADD (never deleted) would make its DEL release that allocation too.
    let container = format!("bin-{}-node{node}-{i}", range.replace(['.', '/'], "-"));
    let mut command = Command::new(bin);
    command
        .env_clear()
        .env("CNI_COMMAND", cni_command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(trust::FLAT_FILE_ENV, trust::test_flat_file())
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=node{node};K8S_POD_NAME=pod{i}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some((name, socket)) = agent {
        command.env(name, socket);
    }
    let mut child = command.spawn().expect("plugin starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf)
        .expect("config written");
    let out = child.wait_with_output().expect("plugin finishes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{cni_command} failed: {stdout}");
    match cni_command {
        "DEL" => serde_json::Value::Null,
        _ => serde_json::from_str(&stdout).expect("JSON reply"),
    }
}

/// `NODES * PER_NODE` bare `VERSION` calls, `in_flight` processes at a time: what starting
/// the processes alone allows on this machine, with no engine behind them. No binary
/// measurement can exceed it.
fn version_rate(bin: &Path, in_flight: usize) -> f64 {
    let calls = Mutex::new(NODES * PER_NODE);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..in_flight {
            scope.spawn(|| loop {
                {
                    let mut left = calls.lock().unwrap();
                    if *left == 0 {
                        return;
                    }
                    *left -= 1;
                }
                let out = Command::new(bin)
                    .env_clear()
                    .env("CNI_COMMAND", "VERSION")
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .expect("plugin runs");
                assert!(out.status.success(), "VERSION failed");
            });
        }
    });
    (NODES * PER_NODE) as f64 / start.elapsed().as_secs_f64()
}

fn check_unique(mut ips: Vec<IpAddr>, expected: usize) {
    let n = ips.len();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), n, "duplicate addresses handed out");
    assert_eq!(n, expected);
}
