//! The node agent (`whereabouts agent`) against the real API server and a real etcd cluster:
//! several agents, one per simulated node, each on its own socket, serving bursts of real
//! plugin processes; agents killed with SIGKILL in the middle of a burst and started again. And
//! against the fake API server, whose watches can be held back: an agent's stale copy.

mod agent_process;
mod fake_apiserver;
mod kube_apiserver;

#[path = "etcd_cluster/mod.rs"]
mod etcd_cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_process::Agent;
use fake_apiserver::cni::{netconf, run, Call, Reply};
use fake_apiserver::harness::{pool_holders, pool_ips};
use serde_json::{json, Value};

const RESERVATIONS: &str = "overlappingrangeipreservations";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
}

fn kube_settings(kubeconfig: &Path) -> Value {
    json!({
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": kubeconfig},
        "log_level": "debug",
    })
}

/// A fake API server, its kubeconfig in `dir`, and agent `node-0` on it, ready.
fn agent_on_a_fake_server(dir: &Path) -> (fake_apiserver::FakeApiServer, PathBuf, Agent) {
    let server = fake_apiserver::FakeApiServer::start();
    let kubeconfig = server.write_kubeconfig(dir, None);
    let agent = Agent::start(dir, "node-0", kube_settings(&kubeconfig));
    (server, kubeconfig, agent)
}

/// `nodes` agents (`node-0`, `node-1`, ...) on the Kubernetes engine, each with its own flat file
/// and socket in `dir`, ready.
fn kube_agents(dir: &Path, kubeconfig: &Path, nodes: usize) -> Vec<Agent> {
    (0..nodes)
        .map(|n| Agent::start(dir, &format!("node-{n}"), kube_settings(kubeconfig)))
        .collect()
}

fn ipam(range: &str, kubeconfig: &Path) -> Value {
    json!({
        "type": "whereabouts",
        "range": range,
        "log_level": "error",
        "kubernetes": {"kubeconfig": kubeconfig},
    })
}

/// One plugin call of pod `i` on the node whose agent is `agent`.
fn call(command: &str, i: usize, node: &str, agent: &Agent, conf: &str) -> Reply {
    call_by(bin(), command, i, node, agent, conf)
}

/// As [`call`], through the plugin binary `plugin`.
fn call_by(plugin: &Path, command: &str, i: usize, node: &str, agent: &Agent, conf: &str) -> Reply {
    let container = format!("agent-{i}");
    let pod = format!("pod-{i}");
    run(
        plugin,
        &Call {
            command,
            container: &container,
            ifname: "net1",
            pod: Some(("bench", &pod)),
            node: Some(node),
            env: vec![agent.env()],
        },
        conf,
    )
}

/// `calls` plugin calls, `parallel` at a time, call i on node `i % agents.len()` with that
/// node's network configuration (`confs`, repeated when shorter); `during`
/// runs on the test's thread while they go, given the number of calls finished so far.
fn burst(
    command: &'static str,
    calls: usize,
    parallel: usize,
    agents: &Mutex<Vec<Agent>>,
    confs: &[&str],
    during: impl FnOnce(&AtomicUsize),
) -> BTreeMap<usize, Reply> {
    let nodes = agents.lock().unwrap().len();
    let sockets: Vec<(&'static str, String)> =
        agents.lock().unwrap().iter().map(Agent::env).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let replies = Arc::new(Mutex::new(BTreeMap::new()));
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (next, done, replies) = (next.clone(), done.clone(), replies.clone());
            let sockets = sockets.clone();
            let confs: Vec<String> = confs.iter().map(|c| c.to_string()).collect();
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= calls {
                    return;
                }
                let container = format!("agent-{i}");
                let pod = format!("pod-{i}");
                let node = format!("node-{}", i % nodes);
                let reply = run(
                    bin(),
                    &Call {
                        command,
                        container: &container,
                        ifname: "net1",
                        pod: Some(("bench", &pod)),
                        node: Some(&node),
                        env: vec![sockets[i % nodes].clone()],
                    },
                    &confs[i % nodes % confs.len()],
                );
                replies.lock().unwrap().insert(i, reply);
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    during(&done);
    for worker in workers {
        worker.join().expect("burst worker");
    }
    let replies = std::mem::take(&mut *replies.lock().unwrap());
    replies
}

/// Every pool entry has its reservation; returns the addresses held in pools and the
/// reservations no pool entry backs, by holder.
fn pools_and_orphans(
    ns: &kube_apiserver::TestNamespace,
) -> (
    BTreeSet<std::net::IpAddr>,
    BTreeMap<std::net::IpAddr, String>,
) {
    let mut held = BTreeSet::new();
    for pool in ns.list("ippools") {
        for ip in pool_ips(&pool) {
            assert!(held.insert(ip), "{ip} is in two pools");
        }
    }
    let reserved: BTreeMap<std::net::IpAddr, String> = ns
        .list(RESERVATIONS)
        .iter()
        .map(|r| {
            let ip = r["metadata"]["name"].as_str().unwrap().parse().unwrap();
            (
                ip,
                r["spec"]["containerid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for ip in &held {
        assert!(
            reserved.contains_key(ip),
            "{ip} is in a pool without its reservation"
        );
    }
    let orphans = reserved
        .into_iter()
        .filter(|(ip, _)| !held.contains(ip))
        .collect();
    (held, orphans)
}

/// After a burst whose ADDs `failed` answered "try again" in an outage: the runtime retries
/// them (`retry`, given the agents and the call's index), which must succeed; then no address
/// was given twice and every pool holds exactly the burst's. An ADD cut off between its
/// reservation and its pool write leaves the reservation (as a plugin process killed there
/// does): it blocks its address, never hands it out twice, and the GC's orphan sweep (or the
/// controller) removes it once old; only the `in_flight` ADDs can have left one. Repeated ADDs
/// keep what each pod holds, and the DELs leave no entry and no new orphan.
fn after_the_outage(
    ns: &kube_apiserver::TestNamespace,
    agents: &Mutex<Vec<Agent>>,
    confs: &[&str],
    added: &BTreeMap<usize, Reply>,
    failed: Vec<usize>,
    in_flight: usize,
    retry: impl Fn(&[Agent], usize) -> Reply,
) {
    let calls = added.len();
    let mut holders: BTreeMap<usize, String> = added
        .iter()
        .filter(|(_, r)| r.code == 0)
        .map(|(i, r)| (*i, ip_of(r)))
        .collect();
    for i in failed {
        let reply = retry(&agents.lock().unwrap(), i);
        assert_eq!(reply.code, 0, "retried ADD {i}: {reply:?}");
        holders.insert(i, ip_of(&reply));
    }
    let distinct: BTreeSet<&String> = holders.values().collect();
    assert_eq!(distinct.len(), calls, "an address was handed out twice");
    let (held, orphans) = pools_and_orphans(ns);
    assert_eq!(held.len(), calls, "leaked or lost: {held:?}");
    assert!(
        orphans.len() <= in_flight,
        "more orphans than ADDs in flight: {orphans:?}"
    );
    for holder in orphans.values() {
        assert!(holder.starts_with("agent-"), "orphan of {holder}");
    }
    let again = burst("ADD", calls, in_flight, agents, confs, |_| {});
    for (i, reply) in &again {
        assert_eq!(reply.code, 0, "repeated ADD {i}: {reply:?}");
        assert_eq!(ip_of(reply), holders[i], "repeated ADD {i} moved");
    }
    let deleted = burst("DEL", calls, in_flight, agents, confs, |_| {});
    for (i, reply) in &deleted {
        assert_eq!(reply.code, 0, "DEL {i}: {reply:?}");
    }
    let (held, left) = pools_and_orphans(ns);
    assert!(held.is_empty(), "DELs left {held:?}");
    assert!(left.len() <= orphans.len(), "new orphans: {left:?}");
}

/// Waits (bounded) until `ready`, polling.
fn wait_until(what: &str, ready: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(60), "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every pool entry has its reservation and every reservation its pool entry; returns the
/// addresses held.
fn assert_consistent(ns: &kube_apiserver::TestNamespace) -> BTreeSet<std::net::IpAddr> {
    let (held, orphans) = pools_and_orphans(ns);
    assert!(
        orphans.is_empty(),
        "reservations without a pool entry: {orphans:?}"
    );
    held
}

/// `series` summed over the agents.
fn summed(agents: &[Agent], series: &str) -> f64 {
    agents.iter().map(|a| a.metric(series)).sum()
}

/// Two agents (`node-0`, `node-1`) on the etcd engine of a 3-member cluster of their own, each
/// with its own flat file and socket, and a network configuration on that engine. Fields drop
/// in order: the agents before the cluster.
struct EtcdNodes {
    agents: Mutex<Vec<Agent>>,
    conf: String,
    cluster: etcd_cluster::Cluster,
    _dir: tempfile::TempDir,
}

/// [`EtcdNodes`] with network configuration `name` allocating from `range`, ready; `None` (said
/// loudly, and a failure in CI) where etcd is not installed.
fn etcd_nodes(name: &str, range: &str) -> Option<EtcdNodes> {
    if !etcd_cluster::etcd_available() {
        return None;
    }
    let cluster = etcd_cluster::Cluster::start(false);
    let dir = tempfile::tempdir().unwrap();
    let settings = json!({
        "datastore": "etcd",
        "etcd_host": cluster.endpoints(),
        "log_level": "debug",
    });
    let agents = ["node-0", "node-1"].map(|node| Agent::start(dir.path(), node, settings.clone()));
    let ipam = json!({
        "type": "whereabouts",
        "datastore": "etcd",
        "etcd_host": cluster.endpoints(),
        "range": range,
        "log_level": "error",
    });
    Some(EtcdNodes {
        agents: Mutex::new(agents.into()),
        conf: netconf(name, &ipam),
        cluster,
        _dir: dir,
    })
}

/// DELs of the `calls` pods, 20 at a time through the agents: every one succeeds, each went
/// through an agent's queue, and no key of the engine is left.
fn delete_everything(nodes: &EtcdNodes, calls: usize) {
    let EtcdNodes {
        agents,
        conf,
        cluster,
        ..
    } = nodes;
    let deleted = burst("DEL", calls, 20, agents, &[conf], |_| {});
    for (i, reply) in &deleted {
        assert_eq!(reply.code, 0, "DEL {i}: {reply:?}");
    }
    let queued = summed(
        &agents.lock().unwrap(),
        r#"whereabouts_agent_batch_size_sum{operation="del"}"#,
    );
    assert_eq!(
        queued as usize, calls,
        "every DEL went through an agent's queue"
    );
    let left = cluster.left_after_releasing_all("/whereabouts/");
    assert!(
        left.is_empty(),
        "keys left after DEL of everything: {left:?}"
    );
    // Every mark left was written by an agent and not yet folded by one (marks are written
    // only by releases, which came after the agents last started).
    let agents = agents.lock().unwrap();
    let marked = summed(&agents, "whereabouts_agent_freed_marked_total");
    let folded = summed(&agents, "whereabouts_agent_freed_folded_total");
    let marks = cluster.keys("/whereabouts/freed/").len();
    eprintln!("{marked} addresses marked freed, {folded} marks folded, {marks} left");
    assert_eq!(marks as f64, marked - folded, "the agents' counts of marks");
}

/// ADD of pod `i` on `node-0` through its agent, which must succeed: its address.
fn added_on_node_0(agent: &Agent, conf: &str, i: usize) -> String {
    let reply = call("ADD", i, "node-0", agent, conf);
    assert_eq!(reply.code, 0, "ADD {i}: {reply:?}");
    ip_of(&reply)
}

fn ip_of(reply: &Reply) -> String {
    let ips = reply.ips();
    assert_eq!(ips.len(), 1, "{reply:?}");
    ips[0].clone()
}

/// Three nodes, each with its agent; the plugin processes have no credentials of their own
/// (their kubeconfig does not exist), so everything they get comes through the agents.
#[test]
fn agents_serve_bursts_of_credential_less_plugins_without_duplicates() {
    const CALLS: usize = 120;
    let plane = real_cluster!();
    let ns = plane.namespace("agents-serve-bursts");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let agents = kube_agents(dir.path(), &kubeconfig, 3);
    for agent in &agents {
        let mode = std::fs::metadata(&agent.socket)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the socket is root's only");
    }
    let agents = Mutex::new(agents);
    let missing = dir.path().join("no-such.kubeconfig");
    let conf = netconf("agentnet", &ipam("10.140.0.0/22", &missing));

    let added = burst("ADD", CALLS, 30, &agents, &[&conf], |_| {});
    let mut ips = BTreeSet::new();
    for (i, reply) in &added {
        assert_eq!(reply.code, 0, "ADD {i}: {reply:?}");
        assert!(
            ips.insert(ip_of(reply)),
            "{} handed out twice",
            ip_of(reply)
        );
    }
    assert_eq!(assert_consistent(&ns).len(), CALLS);
    let agents_now = agents.lock().unwrap();
    let served = summed(
        &agents_now,
        r#"whereabouts_agent_requests_total{operation="add",result="ok"}"#,
    );
    assert_eq!(served as usize, CALLS, "every ADD went through an agent");
    // Each ADD was counted in one batch, and at 30 in flight a node's ADDs shared writes.
    let batched = summed(
        &agents_now,
        r#"whereabouts_agent_batch_size_sum{operation="add"}"#,
    );
    let batches = summed(
        &agents_now,
        r#"whereabouts_agent_batch_size_count{operation="add"}"#,
    );
    assert_eq!(batched as usize, CALLS);
    assert!(batches < batched, "no two ADDs were combined");
    // Every agent follows the pools and the Go binaries' Lease by watch: its batches start from
    // that copy (each write still conditional), which the burst above changed under it.
    for agent in agents_now.iter() {
        for cache in ["ippools", "reservations", "lease"] {
            let synced = format!("whereabouts_agent_cache_synced{{cache=\"{cache}\"}}");
            assert_eq!(agent.metric(&synced), 1.0, "{cache}: {}", agent.log_text());
        }
    }
    drop(agents_now);

    // A repeated ADD gets the same address; CHECK finds it.
    let again = {
        let agents = agents.lock().unwrap();
        call("ADD", 7, "node-1", &agents[1], &conf)
    };
    assert_eq!(ip_of(&again), ip_of(&added[&7]));
    let checked = {
        let agents = agents.lock().unwrap();
        call("CHECK", 7, "node-1", &agents[1], &conf)
    };
    assert_eq!(checked.code, 0, "{checked:?}");

    let deleted = burst("DEL", CALLS, 30, &agents, &[&conf], |_| {});
    for (i, reply) in &deleted {
        assert_eq!(reply.code, 0, "DEL {i}: {reply:?}");
    }
    assert!(assert_consistent(&ns).is_empty(), "DELs left addresses");
    let agents_now = agents.lock().unwrap();
    let released = summed(
        &agents_now,
        r#"whereabouts_agent_requests_total{operation="del",result="ok"}"#,
    );
    assert_eq!(released as usize, CALLS);
}

/// Without overlapping-range reservations nothing but the pool write keeps nodes apart, and the
/// agents' writes test only the entries they rely on (not the pool's resourceVersion), so those
/// tests alone must stop a second node from taking an address: four agents draw a small range
/// down to its last address at once, from copies of the pool their watches keep, and every
/// address is handed out once. The range is then full for every node.
#[test]
fn agents_without_reservations_never_hand_out_an_address_twice() {
    const CALLS: usize = 60;
    let plane = real_cluster!();
    let ns = plane.namespace("agents-no-reservations");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let agents = kube_agents(dir.path(), &kubeconfig, 4);
    let agents = Mutex::new(agents);
    let mut ipam = ipam("10.143.0.0/26", &dir.path().join("no-such.kubeconfig"));
    ipam["enable_overlapping_ranges"] = json!(false);
    let conf = netconf("keyednet", &ipam);
    let added = burst("ADD", CALLS, 24, &agents, &[&conf], |_| {});
    let mut ips = BTreeSet::new();
    for (i, reply) in &added {
        assert_eq!(reply.code, 0, "ADD {i}: {reply:?}");
        let ip = ip_of(reply);
        assert!(ips.insert(ip.clone()), "{ip} handed out twice");
    }
    let held: BTreeSet<String> = ns
        .list("ippools")
        .iter()
        .flat_map(pool_ips)
        .map(|ip| ip.to_string())
        .collect();
    assert_eq!(held, ips, "the pool holds exactly the addresses handed out");
    assert!(ns.list(RESERVATIONS).is_empty(), "no reservations made");
    // 62 usable addresses: two more, on two nodes, and the third is refused.
    let more = burst("ADD", CALLS + 3, 1, &agents, &[&conf], |_| {});
    let full: Vec<_> = more.values().filter(|r| r.code != 0).collect();
    assert!(
        full.len() == 1 && full[0].cni_code() == 100,
        "only the 63rd ADD is refused: {full:?}"
    );
    // An address freed on one node is at once there for another, whose copy of the pool may
    // not have seen the DEL yet: a refusal read from a copy is checked with the server.
    let agents = agents.lock().unwrap();
    let del = call("DEL", 5, "node-1", &agents[1], &conf);
    assert_eq!(del.code, 0, "{del:?}");
    let reply = call("ADD", CALLS + 2, "node-2", &agents[2], &conf);
    assert_eq!(reply.code, 0, "{reply:?}");
    assert_eq!(ip_of(&reply), ip_of(&added[&5]), "the freed address");
}

/// The agent's copy of a pool made stale on purpose: the fake API server (here because a real
/// one cannot hold its watches back on demand) stops delivering watch events while another node
/// (a plugin process without an agent) takes addresses, frees them and removes the agent's own
/// entry. No reservations: only the agent's per-entry tests stand between a stale copy and a
/// duplicate. The agent never hands out an address held on the server, never answers
/// "exhausted" while the server has a free address, and a repeated ADD whose entry is gone gets
/// an address the pool records.
#[test]
fn a_stale_copy_costs_a_retry_never_a_wrong_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    let mut ipam = ipam("10.144.0.0/28", &kubeconfig);
    ipam["enable_overlapping_ranges"] = json!(false);
    let conf = netconf("stalenet", &ipam);
    let through_agent = |command: &str, i: usize| call(command, i, "node-0", &agent, &conf);
    let elsewhere = |command: &str, i: usize| {
        let (container, pod) = (format!("agent-{i}"), format!("pod-{i}"));
        let call = Call {
            command,
            container: &container,
            ifname: "net1",
            pod: Some(("bench", &pod)),
            node: Some("node-1"),
            env: Vec::new(),
        };
        run(bin(), &call, &conf)
    };
    let held = || -> BTreeMap<String, String> {
        let pool = server.get("ippools", "kube-system", "10.144.0.0-28");
        let pool = pool.expect("the pool");
        let base = 0x0a90_0000u32;
        let allocations = pool["spec"]["allocations"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        allocations
            .iter()
            .map(|(key, entry)| {
                let ip = std::net::Ipv4Addr::from(base + key.parse::<u32>().unwrap());
                (ip.to_string(), entry["id"].as_str().unwrap().to_string())
            })
            .collect()
    };
    let ok = |reply: Reply, what: &str| -> Reply {
        assert_eq!(reply.code, 0, "{what}: {reply:?}");
        reply
    };
    let added = |reply: Reply, what: &str| ip_of(&ok(reply, what));
    let first = added(through_agent("ADD", 0), "agent ADD 0");
    assert_eq!(first, "10.144.0.1");
    let synced = "whereabouts_agent_cache_synced{cache=\"ippools\"}";
    let start = std::time::Instant::now();
    while agent.metric(synced) < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.hold_watches(true);

    // Another node takes .2-.4; the agent's copy still shows them free.
    for i in 1..4 {
        ok(elsewhere("ADD", i), "ADD elsewhere");
    }
    let fifth = added(through_agent("ADD", 4), "agent ADD 4 on a stale copy");
    assert_eq!(fifth, "10.144.0.5", "the lowest address free on the server");
    // The range filled up, the agent's last write shows it full; another node frees .3.
    for i in 5..14 {
        ok(through_agent("ADD", i), "agent ADD filling the range");
    }
    let full = through_agent("ADD", 14);
    assert_eq!(full.cni_code(), 100, "{full:?}");
    ok(elsewhere("DEL", 2), "DEL elsewhere");
    let freed = added(
        through_agent("ADD", 14),
        "agent ADD after a DEL it has not seen",
    );
    assert_eq!(freed, "10.144.0.3");
    // The agent's own entry removed behind its back: its repeated ADD must be recorded again.
    ok(elsewhere("DEL", 0), "the agent's entry removed elsewhere");
    let again = added(through_agent("ADD", 0), "repeated agent ADD 0");
    assert_eq!(held().get(&again).map(String::as_str), Some("agent-0"));

    server.hold_watches(false);
    let held = held();
    let mut holders: Vec<&String> = held.values().collect();
    holders.sort();
    holders.dedup();
    assert_eq!(
        holders.len(),
        held.len(),
        "one address per container: {held:?}"
    );
    assert_eq!(held.len(), 14, "the range is full: {held:?}");
}

/// A lost reservation race costs the agent no read when its watched copy names the holder: the
/// create's 409 and the copy suffice. When the copy has not seen the reservation (its watch
/// held back), the agent reads it from the server and still passes the address over. On the
/// fake API server: its watches can be held back on demand, and it counts this test's
/// requests alone.
#[test]
fn a_reservation_the_copy_shows_taken_costs_no_read() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    let conf = netconf("racenet", &ipam("10.146.0.0/28", &kubeconfig));
    let added = |i: usize| added_on_node_0(&agent, &conf, i);
    let events = r#"whereabouts_agent_cache_events_total{cache="reservations"}"#;
    let foreign = |ip: &str| {
        let seen = agent.metric(events);
        server.create(
            "overlappingrangeipreservations",
            "kube-system",
            json!({
                "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
                "kind": "OverlappingRangeIPReservation",
                "metadata": {"name": ip},
                "spec": {"containerid": "elsewhere", "ifname": "net1", "podref": "other/pod"},
            }),
        );
        seen
    };
    let reads = || {
        let counts = server.requests_by_verb();
        counts
            .get("GET overlappingrangeipreservations")
            .copied()
            .unwrap_or(0)
    };
    // The copy takes in the reservation of .2; the pool is written after it, so the lost race
    // is an overlap, not a contender of this pool, and the next lowest address follows.
    let before = foreign("10.146.0.2");
    wait_until("the watch brings the reservation", || {
        agent.metric(events) > before
    });
    assert_eq!(added(0), "10.146.0.1");
    server.reset_counts();
    assert_eq!(
        added(1),
        "10.146.0.3",
        "the address held elsewhere is passed over"
    );
    assert_eq!(reads(), 0, "{:?}", server.requests_by_verb());
    let creates = server.requests_by_verb();
    let creates = creates.get("POST overlappingrangeipreservations");
    assert_eq!(
        creates,
        Some(&1),
        "the copy's reservation is not even tried"
    );

    // Unseen by the copy: the server is asked.
    server.hold_watches(true);
    foreign("10.146.0.5");
    assert_eq!(added(2), "10.146.0.4");
    server.reset_counts();
    assert_eq!(
        added(3),
        "10.146.0.6",
        "the address held elsewhere is passed over"
    );
    assert_eq!(reads(), 1, "{:?}", server.requests_by_verb());
    server.hold_watches(false);
}

/// ADDs that queue while a batch makes its reservations join that batch: one pool write for
/// all of them, instead of one for the batch and one for the queue after it. On the fake API
/// server, whose gate holds the batch at its reservation's create while the others arrive.
#[test]
fn adds_queued_during_a_batchs_reservations_share_its_pool_write() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    let conf = netconf("joinnet", &ipam("10.148.0.0/28", &kubeconfig));
    let add = |i: usize| added_on_node_0(&agent, &conf, i);
    assert_eq!(add(0), "10.148.0.1");
    let queued = r#"whereabouts_agent_requests_queued_total{operation="add"}"#;
    let queued_before = agent.metric(queued);
    server.close_gate("POST", RESERVATIONS);
    server.reset_counts();
    let ips: Vec<String> = std::thread::scope(|s| {
        let add = &add;
        let first = s.spawn(move || add(1));
        wait_until("the first ADD's reservation waits at the gate", || {
            server.waiting_at_gate() == 1
        });
        let later: Vec<_> = (2..6).map(|i| s.spawn(move || add(i))).collect();
        wait_until("the later ADDs wait in the agent's queue", || {
            agent.metric(queued) - queued_before == 4.0
        });
        server.open_gate();
        std::iter::once(first)
            .chain(later)
            .map(|adding| adding.join().unwrap())
            .collect()
    });
    let distinct: BTreeSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 5, "{ips:?}");
    let counts = server.requests_by_verb();
    assert_eq!(
        counts.get("PATCH ippools"),
        Some(&1),
        "one pool write for the five ADDs: {counts:?}"
    );
    assert_eq!(
        counts.get(&format!("POST {RESERVATIONS}")),
        Some(&5),
        "{counts:?}"
    );
}

/// Pod `pod-1`'s sandboxes on agent `node-0`, on a fake API server: its gate holds the first
/// ADD's reservation create until the second ADD has arrived, which a real server cannot be made
/// to do.
struct Sandboxes {
    server: fake_apiserver::FakeApiServer,
    agent: Agent,
    conf: String,
}

impl Sandboxes {
    fn start(dir: &Path) -> Sandboxes {
        let (server, kubeconfig, agent) = agent_on_a_fake_server(dir);
        let conf = netconf("sandboxnet", &ipam("10.149.0.0/28", &kubeconfig));
        Sandboxes {
            server,
            agent,
            conf,
        }
    }

    fn call(&self, command: &'static str, container: &str) -> Reply {
        let call = Call {
            command,
            container,
            ifname: "net1",
            pod: Some(("bench", "pod-1")),
            node: Some("node-0"),
            env: vec![self.agent.env()],
        };
        run(bin(), &call, &self.conf)
    }

    /// An ADD from container `first`, and a `command` from `second` that arrives while the
    /// first waits in its batch (the gate holds it at its reservation's create): their replies.
    /// Another container's ADD waits in the agent's queue; the same container's ADD or DEL waits
    /// for the first to finish.
    fn while_the_first_waits(
        &self,
        first_container: &str,
        (command, second_container): (&'static str, &str),
    ) -> (Reply, Reply) {
        let queued = r#"whereabouts_agent_requests_queued_total{operation="add"}"#;
        let queued_before = self.agent.metric(queued);
        let waiting = "waiting for this attachment's operation under way";
        let waiting_before = self.agent.log_text().matches(waiting).count();
        self.server.close_gate("POST", RESERVATIONS);
        std::thread::scope(|s| {
            let first = s.spawn(|| self.call("ADD", first_container));
            wait_until("the first ADD's reservation waits at the gate", || {
                self.server.waiting_at_gate() == 1
            });
            let second = s.spawn(|| self.call(command, second_container));
            if first_container == second_container {
                wait_until("the second call waits for the first", || {
                    self.agent.log_text().matches(waiting).count() > waiting_before
                });
            } else {
                wait_until("the second ADD waits in the agent's queue", || {
                    self.agent.metric(queued) - queued_before == 1.0
                });
            }
            self.server.open_gate();
            (first.join().unwrap(), second.join().unwrap())
        })
    }

    /// The containers the pool's entries name.
    fn holders(&self) -> Vec<String> {
        let pool = self.server.get("ippools", "kube-system", "10.149.0.0-28");
        let pool = pool.expect("the pool");
        let entries = pool["spec"]["allocations"].as_object().unwrap().values();
        entries
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// A runtime repeating an ADD (the same container) while the first waits in its batch: both
/// get the address, recorded once. On the fake API server (see [`Sandboxes`]), whose gate holds
/// the first ADD at its reservation's create.
#[test]
fn a_repeated_add_waiting_behind_its_first_gets_the_same_address() {
    let dir = tempfile::tempdir().unwrap();
    let pod = Sandboxes::start(dir.path());
    let (first, again) = pod.while_the_first_waits("first", ("ADD", "first"));
    assert_eq!((first.cni_code(), again.cni_code()), (0, 0), "{again:?}");
    assert_eq!(ip_of(&first), ip_of(&again));
    assert_eq!(pod.holders(), ["first"]);
}

/// A runtime's DEL of a container whose ADD is still under way (the plugin gave up waiting
/// for the agent, and the runtime cleans the sandbox up) waits for that ADD, and releases what
/// it wrote: found nothing yet, it would leave the address held by a sandbox that is gone. On
/// the fake API server (see [`Sandboxes`]), whose gate holds the ADD at its reservation's
/// create.
#[test]
fn a_del_arriving_while_its_add_is_under_way_releases_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let pod = Sandboxes::start(dir.path());
    let (added, deleted) = pod.while_the_first_waits("first", ("DEL", "first"));
    assert_eq!(
        (added.cni_code(), deleted.cni_code()),
        (0, 0),
        "{deleted:?}"
    );
    assert_eq!(pod.holders(), Vec::<String>::new());
}

/// A pod's ADD from a new sandbox (another container ID) that arrives while its first ADD waits
/// in a batch is not that ADD repeated. Answered with the first's address, recorded under the
/// first container, it would hold an address nothing records once the runtime deletes the first
/// sandbox. It is told to try again, and its retry holds the address under its own container.
/// On the fake API server (see [`Sandboxes`]), whose gate holds the first ADD at its
/// reservation's create.
#[test]
fn a_pods_new_sandbox_is_not_served_as_its_first_ones_repetition() {
    let dir = tempfile::tempdir().unwrap();
    let pod = Sandboxes::start(dir.path());
    let (first, second) = pod.while_the_first_waits("first", ("ADD", "second"));
    assert_eq!(first.cni_code(), 0, "{first:?}");
    // The runtime tears the first sandbox down; the second retries.
    assert_eq!(pod.call("DEL", "first").cni_code(), 0);
    assert_eq!(second.cni_code(), 11, "{second:?}");
    let second = pod.call("ADD", "second");
    assert_eq!(second.cni_code(), 0, "{second:?}");
    assert_eq!(pod.holders(), ["second"]);
}

/// The copy steers the search past reservations, but a refusal is never decided on it: a
/// reservation the copy still shows after the server deleted it (its watch held back) does not
/// exhaust the range. On the fake API server, whose watches can be held back on demand.
#[test]
fn a_reservation_the_copy_still_shows_does_not_exhaust_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    let conf = netconf("stalenet", &ipam("10.147.0.0/30", &kubeconfig));
    let events = r#"whereabouts_agent_cache_events_total{cache="reservations"}"#;
    let before = agent.metric(events);
    server.create(
        "overlappingrangeipreservations",
        "kube-system",
        json!({
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "OverlappingRangeIPReservation",
            "metadata": {"name": "10.147.0.2"},
            "spec": {"containerid": "elsewhere", "ifname": "net1", "podref": "other/pod"},
        }),
    );
    wait_until("the watch brings the reservation", || {
        agent.metric(events) > before
    });
    let first = call("ADD", 0, "node-0", &agent, &conf);
    assert_eq!(ip_of(&first), "10.147.0.1", "{first:?}");
    server.hold_watches(true);
    assert!(server.delete_now(
        "overlappingrangeipreservations",
        "kube-system",
        "10.147.0.2"
    ));
    let last = call("ADD", 1, "node-0", &agent, &conf);
    assert_eq!(
        last.code, 0,
        "the range's last address is free on the server: {last:?}"
    );
    assert_eq!(ip_of(&last), "10.147.0.2");
    server.hold_watches(false);
}

/// A batch the server refuses for what it carries (past an admission policy's limit of
/// allocations in a pool, or with one reservation the policy refuses) is served again in halves,
/// down to one ADD: the ADDs that alone pass get their addresses, only the others get code 5
/// with the policy's message, and nothing is left of the refused ones. DELs alike, with one
/// pod's removal refused. Before, every ADD or DEL of a refused batch failed with it. On the
/// real API server, with a ValidatingAdmissionPolicy.
#[test]
fn a_batch_the_server_refuses_is_served_in_halves() {
    let plane = real_cluster!();
    let ns = plane.namespace("agent-refused-batch");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let validations = json!([
        {"expression": "!has(object.spec.allocations) || object.spec.range != '10.154.0.0/24' \
            || size(object.spec.allocations) <= 4",
         "message": "at most 4 allocations in 10.154.0.0/24"},
        {"expression": "!has(object.spec.podref) || !object.spec.podref.startsWith('quarantine/')",
         "message": "no address for a quarantined pod"},
        {"expression": "request.operation != 'UPDATE' || !has(oldObject.spec.allocations) \
            || oldObject.spec.allocations.all(k, \
                !oldObject.spec.allocations[k].podref.startsWith('frozen/') \
                || has(object.spec.allocations) && k in object.spec.allocations)",
         "message": "a frozen pod keeps its address"},
    ]);
    let reservation = json!({"metadata": {"name": "10.154.0.99"},
        "spec": {"containerid": "c", "podref": "quarantine/probe"}});
    let rules = json!(["*", ["CREATE", "UPDATE"]]);
    let probe = ("overlappingrangeipreservations", reservation);
    let policy = ns.admission_policy(dir.path(), rules, validations, probe);
    let agent = Agent::start(dir.path(), "node-0", kube_settings(&kubeconfig));
    let at_once = |command: &str, range: &str, pods: &[(&str, String)]| -> Vec<Reply> {
        let conf = netconf("refusednet", &ipam(range, &kubeconfig));
        std::thread::scope(|s| {
            let calls: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, (namespace, pod))| {
                    let (agent, conf) = (&agent, &conf);
                    s.spawn(move || {
                        let container = format!("refused-{i}");
                        let call = Call {
                            command,
                            container: &container,
                            ifname: "net1",
                            pod: Some((namespace, pod)),
                            node: Some("node-0"),
                            env: vec![agent.env()],
                        };
                        run(bin(), &call, conf)
                    })
                })
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        })
    };
    let refused_with = |replies: &[Reply], reason: &str| -> usize {
        let refused = replies.iter().filter(|r| r.code != 0);
        refused
            .inspect(|r| assert_eq!(r.cni_code(), 5, "{r:?}"))
            .inspect(|r| assert!(r.stdout.contains(reason), "{r:?}"))
            .count()
    };
    let granted = |replies: &[Reply]| -> BTreeSet<String> {
        replies.iter().filter(|r| r.code == 0).map(ip_of).collect()
    };
    let reserved = || -> BTreeSet<String> {
        let reservations = ns.list("overlappingrangeipreservations");
        let names = reservations.iter().map(|r| r["metadata"]["name"].as_str());
        names.map(|name| name.unwrap().to_string()).collect()
    };

    let pods: Vec<(&str, String)> = (0..10).map(|i| ("bench", format!("pod-{i}"))).collect();
    let replies = at_once("ADD", "10.154.0.0/24", &pods);
    assert_eq!(refused_with(&replies, "at most 4 allocations in"), 6);
    let held = granted(&replies);
    assert_eq!(held.len(), 4, "{replies:?}");
    let pool = ns.get("ippools", "10.154.0.0-24").expect("the pool");
    assert_eq!(pool["spec"]["allocations"].as_object().unwrap().len(), 4);
    assert_eq!(
        reserved(),
        held,
        "the refused ADDs' reservations taken back"
    );

    let mut pods: Vec<(&str, String)> = (0..8).map(|i| ("bench", format!("pod-{i}"))).collect();
    pods[5] = ("quarantine", "pod-5".to_string());
    pods[2] = ("frozen", "pod-2".to_string());
    let replies = at_once("ADD", "10.155.0.0/24", &pods);
    assert_eq!(
        refused_with(&replies, "no address for a quarantined pod"),
        1
    );
    assert_ne!(replies[5].code, 0, "the quarantined pod: {:?}", replies[5]);
    assert_eq!(granted(&replies).len(), 7, "{replies:?}");
    let frozen = ip_of(&replies[2]);

    // DELs alike: the frozen pod's removal is refused, the others' go through.
    let replies = at_once("DEL", "10.155.0.0/24", &pods);
    assert_eq!(refused_with(&replies, "a frozen pod keeps its address"), 1);
    assert_ne!(replies[2].code, 0, "the frozen pod: {:?}", replies[2]);
    let pool = ns.get("ippools", "10.155.0.0-24").expect("the pool");
    let left: BTreeSet<String> = pool_ips(&pool).iter().map(|ip| ip.to_string()).collect();
    assert_eq!(
        left,
        BTreeSet::from([frozen]),
        "only the frozen pod's entry stays"
    );
    plane.kubectl(&[
        "delete",
        "validatingadmissionpolicy,validatingadmissionpolicybinding",
        &policy,
    ]);
}

/// The engine's errors keep their CNI code through the agent: a full range is 100.
#[test]
fn errors_through_the_agent_keep_their_code() {
    let plane = real_cluster!();
    let ns = plane.namespace("agent-errors-keep-code");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let agent = Agent::start(dir.path(), "node-0", kube_settings(&kubeconfig));
    let missing = dir.path().join("no-such.kubeconfig");
    let conf = netconf("tiny", &ipam("10.141.0.0/30", &missing));
    for i in 0..2 {
        added_on_node_0(&agent, &conf, i);
    }
    let full = call("ADD", 2, "node-0", &agent, &conf);
    assert_eq!(full.cni_code(), 100, "{full:?}");
    // An agent that is gone, and no credentials here: try again (11), not a configuration error.
    let mut agent = agent;
    agent.kill();
    let gone = call("ADD", 3, "node-0", &agent, &conf);
    assert_eq!(gone.cni_code(), 11, "{gone:?}");
    let status = call("STATUS", 0, "node-0", &agent, &conf);
    assert_ne!(status.code, 0, "{status:?}");
}

/// A network configuration naming a store of its own (a kubeconfig of another cluster, in a
/// folder the flat file allows) is served by the plugin itself, never by the node's agent,
/// which serves the flat file's store: while the agent is down the plugin would serve it itself,
/// and the two stores would hand the network's addresses out apart. A network of the flat
/// file's store is served by the agent. The plugin reads the agent's flat file here, which
/// names the store and the socket, as the installer's does. On two fake servers: the test needs
/// a second cluster, whose objects it reads apart from the first's, and a second real control
/// plane would take minutes to start for one check.
#[test]
fn a_network_with_a_store_of_its_own_is_served_by_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    let other = fake_apiserver::FakeApiServer::start();
    let other_dir = tempfile::tempdir().unwrap();
    let other_kubeconfig = other.write_kubeconfig(other_dir.path(), None);
    let served = || agent.metric(r#"whereabouts_agent_requests_total{operation="add""#);
    let add = |i: usize, conf: &str| {
        let pod = format!("pod-{i}");
        let call = Call {
            command: "ADD",
            container: &format!("agent-{i}"),
            ifname: "net1",
            pod: Some(("bench", &pod)),
            node: Some("node-0"),
            env: vec![(
                "WHEREABOUTS_FLAT_FILE",
                agent.flat_file.display().to_string(),
            )],
        };
        run(bin(), &call, conf)
    };

    let own = netconf("ownstore", &ipam("10.150.0.0/28", &other_kubeconfig));
    let reply = add(1, &own);
    assert_eq!(reply.cni_code(), 0, "{reply:?}");
    assert_eq!(served(), 0.0, "the agent served another store's network");
    assert!(other
        .get("ippools", "kube-system", "10.150.0.0-28")
        .is_some());
    assert!(server
        .get("ippools", "kube-system", "10.150.0.0-28")
        .is_none());

    let flat_files = netconf("flatstore", &ipam("10.151.0.0/28", &kubeconfig));
    let reply = add(2, &flat_files);
    assert_eq!(reply.cni_code(), 0, "{reply:?}");
    assert_eq!(
        served(),
        1.0,
        "the flat file's store not served by the agent"
    );
}

/// The agent follows its flat file's `go_whereabouts` while it runs: the installer and the
/// agent start together, so an upgrade's installer may write `present` (the first step of a
/// rollback to Go binaries) after the agent read `absent`; the agent then takes the Go
/// binaries' Lease around its writes from the change on (creating it, as none is there yet).
#[test]
fn an_agent_follows_its_flat_files_go_whereabouts() {
    let plane = real_cluster!();
    let ns = plane.namespace("agent-follows-go-whereabouts");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let mut settings = kube_settings(&kubeconfig);
    settings["go_whereabouts"] = json!("absent");
    let agent = Agent::start(dir.path(), "node-0", settings);
    let conf = netconf("rollback", &ipam("10.152.0.0/28", &kubeconfig));
    let go_lease = || ns.get("leases", "whereabouts");
    added_on_node_0(&agent, &conf, 0);
    assert_eq!(
        go_lease(),
        None,
        "the Lease taken while Go binaries are absent"
    );

    // As the installer writes it: a new file renamed into place.
    let mut flat: Value =
        serde_json::from_str(&std::fs::read_to_string(&agent.flat_file).unwrap()).unwrap();
    flat["go_whereabouts"] = json!("present");
    let staged = dir.path().join("node-0.conf.new");
    std::fs::write(&staged, flat.to_string()).unwrap();
    std::fs::rename(&staged, &agent.flat_file).unwrap();
    wait_until("the agent to follow the flat file", || {
        agent
            .log_text()
            .contains("the flat file's go_whereabouts changed")
    });
    added_on_node_0(&agent, &conf, 1);
    let lease = go_lease().expect("the Go binaries' Lease, taken for the ADD");
    assert!(
        lease["metadata"]["annotations"]["whereabouts.cni.cncf.io/rust-renew-time"].is_string(),
        "{lease}"
    );
}

/// An agent told to stop (SIGTERM: a rollout, a node drain) first finishes the writes under
/// way, also those of a request whose plugin has hung up: stopping there would leave the
/// reservation, made before the pool's write, without its entry, holding the address until
/// the orphan sweep. On the fake API server, which holds the reservation's create back on
/// demand.
#[test]
fn a_stopping_agent_finishes_the_writes_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubeconfig, mut agent) = agent_on_a_fake_server(dir.path());
    let conf = netconf("stopping", &ipam("10.146.0.0/29", &kubeconfig));
    added_on_node_0(&agent, &conf, 0);
    server.close_gate("POST", RESERVATIONS);
    let call = Call {
        command: "ADD",
        container: "agent-1",
        ifname: "net1",
        pod: Some(("bench", "pod-1")),
        node: Some("node-0"),
        env: vec![agent.env()],
    };
    let mut plugin = fake_apiserver::cni::start(bin(), &call, &conf);
    wait_until("the ADD's reservation held", || {
        server.waiting_at_gate() == 1
    });
    plugin.kill().unwrap();
    plugin.wait().unwrap();

    agent.stop();
    wait_until("the agent to stop serving", || {
        std::os::unix::net::UnixStream::connect(&agent.socket).is_err()
    });
    server.open_gate();
    let status = agent.exited_within(Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    wait_until("the server to carry out what it received", || {
        server.settled()
    });

    let pool = server
        .get("ippools", "kube-system", "10.146.0.0-29")
        .unwrap();
    let entries: BTreeSet<String> = pool_ips(&pool).iter().map(|ip| ip.to_string()).collect();
    let reservations: BTreeSet<String> = server
        .list(RESERVATIONS, "kube-system")
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reservations, entries, "reservations without their entries");
}

/// The plugin-only build, which the installer puts on hosts with the agent: ADD, CHECK and DEL
/// of the Kubernetes engine go through the agent exactly as with the full binary; with the
/// agent gone it answers "try again", as the full binary does on a host without credentials.
#[test]
fn the_plugin_only_build_reaches_the_cluster_engine_through_the_agent() {
    let plane = real_cluster!();
    let ns = plane.namespace("plugin-only-build");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let mut agent = Agent::start(dir.path(), "node-0", kube_settings(&kubeconfig));
    // Credentials the plugin could use if it would: it must not need them.
    let conf = netconf("plugin-only", &ipam("10.142.0.0/29", &kubeconfig));
    let plugin_only = Path::new(env!("CARGO_BIN_EXE_whereabouts-plugin"));
    let through =
        |command, i: usize, agent: &Agent| call_by(plugin_only, command, i, "node-0", agent, &conf);
    let first = ip_of(&through("ADD", 0, &agent));
    let second = ip_of(&through("ADD", 1, &agent));
    assert_ne!(first, second);
    // The full binary sees the same allocations: one store, whichever build asked.
    assert_eq!(call("CHECK", 0, "node-0", &agent, &conf).code, 0);
    assert_eq!(through("CHECK", 1, &agent).code, 0);
    assert_eq!(through("DEL", 0, &agent).code, 0);
    assert_eq!(call("CHECK", 0, "node-0", &agent, &conf).cni_code(), 102);
    assert_eq!(ip_of(&call("ADD", 2, "node-0", &agent, &conf)), first);

    agent.kill();
    let gone = through("ADD", 3, &agent);
    assert_eq!(gone.cni_code(), 11, "{gone:?}");
}

/// A server at the agent's socket that runs as another user than root (an admin's socket
/// folder that others can write in) is not asked: it could answer any address. The plugin does
/// the work itself, as without an agent.
#[test]
fn a_server_at_the_socket_not_run_by_root_is_not_asked() {
    // SAFETY: geteuid reads the process's user id; it has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!kube_apiserver::in_ci(), "CI runs the tests as root");
        eprintln!("\n*** SKIPPED: root, to start a server as another user ***\n");
        return;
    }
    let plane = real_cluster!();
    let ns = plane.namespace("impostor-at-the-socket");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    // In /tmp, which every user can reach (a $TMPDIR may sit under a folder only root can).
    let open_to_all = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(open_to_all.path(), PermissionsExt::from_mode(0o777)).unwrap();
    let socket = open_to_all.path().join("agent.sock");
    let impostor = r#"
import os, socket, sys
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
server.listen(8)
print("ready", flush=True)
body = b'{"ips":["192.0.2.66"]}'
while True:
    client, _ = server.accept()
    client.recv(65536)
    client.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    client.close()
"#;
    // Killed when the test ends, however it ends.
    struct Impostor(std::process::Child);
    impl Drop for Impostor {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(impostor)
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) and Debian's python3");
    let answers = server.stdout.take().unwrap();
    let _server = Impostor(server);
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(answers), &mut ready).unwrap();
    assert_eq!(ready, "ready\n");
    let conf = netconf("impostor", &ipam("10.143.0.0/29", &kubeconfig));
    let env = ("WHEREABOUTS_AGENT_SOCKET", socket.display().to_string());
    let reply = run(
        bin(),
        &Call {
            command: "ADD",
            container: "c-1",
            ifname: "net1",
            pod: Some(("default", "p-1")),
            node: Some("node-0"),
            env: vec![env],
        },
        &conf,
    );
    assert_eq!(reply.ips(), ["10.143.0.1"], "{reply:?}");
    assert_eq!(assert_consistent(&ns).len(), 1);
}

/// Device, inode and the time of the last change of content of the file at `path` (a file
/// made at the path of a removed one may get its inode), None when there is none.
type FileId = (u64, u64, i64, i64);

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    Some((meta.dev(), meta.ino(), meta.mtime(), meta.mtime_nsec()))
}

/// Waits (bounded) for `agent`, started on the socket of another, to exit without touching
/// that socket (still the file `id` all along): its exit status.
fn exits_leaving_the_socket(agent: &mut Agent, id: FileId) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        let exited = agent.exited_within(Duration::from_millis(20));
        assert_eq!(
            file_id(&agent.socket),
            Some(id),
            "the new agent replaced the socket of the other one: {}",
            agent.log_text()
        );
        if let Some(status) = exited {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the new agent never exited: {}",
            agent.log_text()
        );
    }
}

/// An agent `node-0` on the real API server, in a namespace of its own, that has served the
/// first ADD (`first`) of network `net` (range `range`) for a plugin without credentials, which
/// cannot do the work itself: where the socket tests start.
struct ServingAgent {
    agent: Agent,
    conf: String,
    first: String,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    _ns: kube_apiserver::TestNamespace,
}

fn serving_agent(
    plane: &'static kube_apiserver::ControlPlane,
    net: &str,
    range: &str,
) -> ServingAgent {
    let ns = plane.namespace(&format!("agent-socket-{net}"));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let agent = Agent::start(dir.path(), "node-0", kube_settings(&kubeconfig));
    let missing = dir.path().join("no-such.kubeconfig");
    let conf = netconf(net, &ipam(range, &missing));
    let first = added_on_node_0(&agent, &conf, 0);
    ServingAgent {
        agent,
        conf,
        first,
        kubeconfig,
        dir,
        _ns: ns,
    }
}

/// A second agent started on the socket of a live one (a DaemonSet pod replaced while the old
/// one still runs, an admin starting one by hand) refuses to start, naming the socket, and
/// leaves it alone: the first agent still serves its plugins, which cannot do the work
/// themselves (no credentials).
#[test]
fn a_second_agent_leaves_a_live_agents_socket_alone() {
    let live = serving_agent(real_cluster!(), "live", "10.156.0.0/29");
    let (first, dir) = (&live.agent, live.dir.path());
    let id = file_id(&first.socket).expect("the first agent's socket");

    let settings = kube_settings(&live.kubeconfig);
    let second = Agent::launch_on(dir, "second", settings, &first.socket, &[]);
    let said = format!("another agent serves {}", first.socket.display());
    refused_beside(&live, second, id, &said);
}

/// `second`, started on the socket of `live` (the file `id`), exits in failure saying `said`,
/// without touching that socket, and `live` serves on.
fn refused_beside(live: &ServingAgent, mut second: Agent, id: FileId, said: &str) {
    let status = exits_leaving_the_socket(&mut second, id);
    assert!(!status.success(), "{status}: {}", second.log_text());
    assert!(
        second.log_text().contains(said),
        "{said:?} not in: {}",
        second.log_text()
    );
    added_on_node_0(&live.agent, &live.conf, 1);
}

/// A socket left by an agent killed with SIGKILL (nothing listens on it) is replaced by the
/// next agent, which serves.
#[test]
fn a_stale_socket_of_a_killed_agent_is_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let mut stale_one = serving_agent(real_cluster!(), "stale", "10.157.0.0/29");
    let (agent, conf, first) = (&mut stale_one.agent, &stale_one.conf, &stale_one.first);
    agent.kill();
    let stale = std::fs::symlink_metadata(&agent.socket).expect("the killed agent's socket");
    assert!(stale.file_type().is_socket());
    let refused = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    // Serving means it replaced the file: a bind on an existing path fails.
    agent.restart();
    assert_eq!(
        &added_on_node_0(agent, conf, 0),
        first,
        "a repeated ADD keeps its address"
    );
    added_on_node_0(agent, conf, 1);
}

/// An agent that finds the lock beside the socket held (another agent binding the path right
/// now) stops without touching the socket, even a stale one; once the lock is free, it
/// replaces the stale socket and serves.
#[test]
fn an_agent_leaves_the_socket_another_is_binding_alone() {
    let mut stale_one = serving_agent(real_cluster!(), "binding", "10.160.0.0/29");
    stale_one.agent.kill();
    let id = file_id(&stale_one.agent.socket).expect("the killed agent's socket");
    let mut lock_path = stale_one.agent.socket.clone().into_os_string();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .unwrap();
    lock.try_lock().expect("nobody holds the lock");

    let settings = kube_settings(&stale_one.kubeconfig);
    let (dir, socket) = (stale_one.dir.path(), &stale_one.agent.socket);
    let mut second = Agent::launch_on(dir, "second", settings, socket, &[]);
    let status = exits_leaving_the_socket(&mut second, id);
    assert!(!status.success(), "{status}: {}", second.log_text());
    let said = format!("another agent is starting on {}", socket.display());
    assert!(second.log_text().contains(&said), "{}", second.log_text());

    drop(lock);
    second.restart();
    let (conf, first) = (&stale_one.conf, &stale_one.first);
    assert_eq!(&added_on_node_0(&second, conf, 0), first);
}

/// Agents started all at once on a killed agent's socket (a node's restart, an admin's script):
/// one serves there, every other one stops saying why. None goes on serving a socket another
/// has unlinked, which no plugin could reach.
#[test]
fn of_agents_started_at_once_on_a_stale_socket_one_serves() {
    let mut stale_one = serving_agent(real_cluster!(), "atonce", "10.162.0.0/29");
    stale_one.agent.kill();
    let (dir, socket) = (stale_one.dir.path(), &stale_one.agent.socket);
    let mut agents: Vec<Agent> = (0..8)
        .map(|i| {
            let settings = kube_settings(&stale_one.kubeconfig);
            Agent::launch_on(dir, &format!("rival-{i}"), settings, socket, &[])
        })
        .collect();

    let serving = |agent: &Agent| agent.log_text().contains("agent serving");
    let mut stopped = Vec::new();
    let started = std::time::Instant::now();
    while stopped.len() + agents.iter().filter(|a| serving(a)).count() < agents.len() {
        for (i, agent) in agents.iter_mut().enumerate() {
            if let Some(status) = agent.exited_within(Duration::ZERO) {
                stopped.push((i, status));
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still starting"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let servers: Vec<usize> = (0..agents.len()).filter(|&i| serving(&agents[i])).collect();
    assert_eq!(servers.len(), 1, "agents {servers:?} serve");
    let server = &agents[servers[0]];
    assert!(server.pid().is_some(), "{}", server.log_text());
    for (i, status) in stopped.iter().filter(|(i, _)| *i != servers[0]) {
        let log = agents[*i].log_text();
        assert!(
            !status.success() && log.contains("another agent"),
            "{status}: {log}"
        );
    }
    let (conf, first) = (&stale_one.conf, &stale_one.first);
    assert_eq!(&added_on_node_0(server, conf, 0), first);
}

/// An agent that cannot have its probe port (another agent's, on the host network) exits on
/// that, before it touches the socket: the live agent's socket stays, and it serves.
#[test]
fn an_agent_without_its_probe_port_leaves_the_socket_alone() {
    let live = serving_agent(real_cluster!(), "port", "10.158.0.0/29");
    let (first, dir) = (&live.agent, live.dir.path());
    let id = file_id(&first.socket).expect("the first agent's socket");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let settings = kube_settings(&live.kubeconfig);
    let args = ["--listen", port.as_str()];
    let second = Agent::launch_on(dir, "second", settings, &first.socket, &args);
    // It failed on the port, before looking at the socket.
    refused_beside(&live, second, id, &format!("cannot listen on {port}"));
}

/// An agent that exits removes its socket only while the path is still that socket: here its
/// socket was removed and a successor serves at the path when it gets SIGTERM, and the
/// successor goes on serving.
#[test]
fn an_agent_that_exits_leaves_its_successors_socket() {
    let mut live = serving_agent(real_cluster!(), "successor", "10.159.0.0/29");
    let (old, conf, dir) = (&mut live.agent, &live.conf, live.dir.path());
    std::fs::remove_file(&old.socket).unwrap();
    let settings = kube_settings(&live.kubeconfig);
    let mut new = Agent::launch_on(dir, "successor", settings, &old.socket, &[]);
    new.wait_ready();

    let status = old.terminate(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        old.log_text()
    );
    added_on_node_0(&new, conf, 1);
    // Its own socket, the successor removes as it exits.
    let status = new.terminate(Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "{}", new.log_text());
    assert!(
        !new.socket.exists(),
        "the socket stayed: {}",
        new.log_text()
    );
}

/// Two nodes: node-0's plugin has credentials of its own (it falls back while its agent is
/// down), node-1's has none (it must answer "try again"). Both agents are killed in the middle
/// of a burst and started again: no address twice, none lost, none leaked once the runtime has
/// retried what failed, and a repeated ADD after the restart returns what each pod holds.
#[test]
fn agents_killed_mid_burst_lose_nothing_and_leak_nothing() {
    const CALLS: usize = 80;
    let plane = real_cluster!();
    let ns = plane.namespace("agents-killed-mid-burst");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let agents = Mutex::new(kube_agents(dir.path(), &kubeconfig, 2));
    let missing = dir.path().join("no-such.kubeconfig");
    // The kubeconfig differs per node: the network configuration is the same on both, so the
    // credential-less node gets its own copy naming a file that does not exist.
    let with_creds = netconf("killnet", &ipam("10.142.0.0/22", &kubeconfig));
    let without = netconf("killnet", &ipam("10.142.0.0/22", &missing));

    let confs = [with_creds.as_str(), without.as_str()];
    let added = burst("ADD", CALLS, 20, &agents, &confs, |done| {
        while done.load(Ordering::SeqCst) < CALLS / 4 {
            std::thread::sleep(Duration::from_millis(5));
        }
        for agent in agents.lock().unwrap().iter_mut() {
            agent.kill();
        }
    });
    let mut failed = Vec::new();
    for (i, reply) in &added {
        match reply.cni_code() {
            0 => {}
            // Only the node without credentials of its own may fail, and only with "try again".
            11 if i % 2 == 1 => failed.push(*i),
            other => panic!("ADD {i}: code {other}: {reply:?}"),
        }
    }
    assert!(!failed.is_empty(), "no call met the outage");
    eprintln!(
        "{} of {CALLS} ADDs answered \"try again\" while the agents were down",
        failed.len()
    );
    for agent in agents.lock().unwrap().iter_mut() {
        agent.restart();
    }
    // The runtime retries what failed; only the node without credentials of its own failed.
    let retry = |agents: &[Agent], i: usize| call("ADD", i, "node-1", &agents[1], &without);
    after_the_outage(&ns, &agents, &confs, &added, failed, 20, retry);
}

/// Two nodes' agents (processes, each with its own etcd client and copy of the runs) fill a
/// /28 to its last address at once, plugin processes asking them, then again once everything
/// was released: the contention the in-process tests of tests/etcd_store.rs model, between
/// processes. Every address is handed out once, the pods beyond them are told the pool is full
/// (code 100) and nothing is lost to freed marks.
#[test]
fn etcd_agents_fill_a_small_pool_completely_and_again() {
    const FREE: usize = 14;
    const PODS: usize = FREE + 2;
    let Some(nodes) = etcd_nodes("etcdfill", "10.149.0.0/28") else {
        return;
    };
    let EtcdNodes {
        agents,
        conf,
        cluster,
        ..
    } = &nodes;
    let mut first_round = None;
    for round in ["first", "second"] {
        let added = burst("ADD", PODS, PODS, agents, &[conf], |_| {});
        let mut given = BTreeSet::new();
        let mut full = 0;
        for (i, reply) in added {
            // A runtime tries again what it is told to: an agent that kept losing the last
            // addresses to the other node's commits answers "try again".
            let mut reply = reply;
            for _ in 0..10 {
                if reply.cni_code() != 11 {
                    break;
                }
                let agents = agents.lock().unwrap();
                let node = i % agents.len();
                reply = call("ADD", i, &format!("node-{node}"), &agents[node], conf);
            }
            match reply.cni_code() {
                0 => assert!(
                    given.insert(ip_of(&reply)),
                    "{round} round: {} handed out twice",
                    ip_of(&reply)
                ),
                100 => full += 1,
                other => panic!("{round} round: ADD {i}: code {other}: {reply:?}"),
            }
        }
        assert_eq!(given.len(), FREE, "{round} round: {given:?}");
        assert_eq!(full, PODS - FREE, "{round} round");
        assert_eq!(first_round.get_or_insert_with(|| given.clone()), &given);
        cluster.assert_doctor_healthy();
        let deleted = burst("DEL", PODS, PODS, agents, &[conf], |_| {});
        for (i, reply) in &deleted {
            assert_eq!(reply.code, 0, "{round} round: DEL {i}: {reply:?}");
        }
    }
    let left = cluster.left_after_releasing_all("/whereabouts/");
    assert!(left.is_empty(), "keys left after every DEL: {left:?}");
}

/// The etcd engine's agents killed with SIGKILL in the middle of a burst (their batches and
/// copies lost with them) and started again: every ADD answers an address or "try again", no
/// address twice once the runtime has retried, repeated ADDs keep what each pod holds, and
/// the DELs leave no key (no allocation leaked, the runs intact).
#[test]
fn etcd_agents_killed_mid_burst_lose_nothing_and_leak_nothing() {
    const CALLS: usize = 80;
    let Some(nodes) = etcd_nodes("etcdkill", "10.148.0.0/24") else {
        return;
    };
    let EtcdNodes {
        agents,
        conf,
        cluster,
        ..
    } = &nodes;
    let added = burst("ADD", CALLS, 20, agents, &[conf], |done| {
        while done.load(Ordering::SeqCst) < CALLS / 4 {
            std::thread::sleep(Duration::from_millis(5));
        }
        for agent in agents.lock().unwrap().iter_mut() {
            agent.kill();
        }
    });
    let mut holders = BTreeMap::new();
    let mut failed = Vec::new();
    for (i, reply) in &added {
        match reply.cni_code() {
            0 => drop(holders.insert(*i, ip_of(reply))),
            11 => failed.push(*i),
            other => panic!("ADD {i}: code {other}: {reply:?}"),
        }
    }
    // The kill met the burst: calls in flight failed, or later ones found no agent and served
    // themselves (the plugin's configuration names the cluster; its first such call leaves a
    // marker next to the socket, which the agent removes when it starts again).
    let served_themselves = agents
        .lock()
        .unwrap()
        .iter()
        .any(|agent| whereabouts::agent::fallback_marker(&agent.socket).exists());
    assert!(
        !failed.is_empty() || served_themselves,
        "no call met the outage"
    );
    for agent in agents.lock().unwrap().iter_mut() {
        agent.restart();
    }
    for i in failed {
        let agents = agents.lock().unwrap();
        let node = i % agents.len();
        let reply = call("ADD", i, &format!("node-{node}"), &agents[node], conf);
        assert_eq!(reply.code, 0, "retried ADD {i}: {reply:?}");
        holders.insert(i, ip_of(&reply));
    }
    let distinct: BTreeSet<&String> = holders.values().collect();
    assert_eq!(distinct.len(), CALLS, "an address was handed out twice");
    let records = cluster
        .keys("/whereabouts/pools/")
        .into_iter()
        .filter(|k| k.contains("/a/"))
        .count();
    assert_eq!(records, CALLS, "allocations leaked or lost");
    cluster.assert_doctor_healthy();

    let again = burst("ADD", CALLS, 20, agents, &[conf], |_| {});
    for (i, reply) in &again {
        assert_eq!(reply.code, 0, "repeated ADD {i}: {reply:?}");
        assert_eq!(ip_of(reply), holders[i], "repeated ADD {i} moved");
    }
    delete_everything(&nodes, CALLS);
}

/// The etcd engine through two agents: a burst of ADDs from both nodes, unique, then DELs
/// that leave no key behind.
#[test]
fn etcd_agents_serve_a_burst() {
    const CALLS: usize = 60;
    let Some(nodes) = etcd_nodes("etcdnet", "10.143.0.0/24") else {
        return;
    };
    let EtcdNodes { agents, conf, .. } = &nodes;
    let added = burst("ADD", CALLS, 20, agents, &[conf], |_| {});
    let mut ips = BTreeSet::new();
    for (i, reply) in &added {
        assert_eq!(reply.code, 0, "ADD {i}: {reply:?}");
        assert!(
            ips.insert(ip_of(reply)),
            "{} handed out twice",
            ip_of(reply)
        );
    }
    let agents_now = agents.lock().unwrap();
    let served = summed(
        &agents_now,
        r#"whereabouts_agent_requests_total{operation="add",result="ok"}"#,
    );
    assert_eq!(served as usize, CALLS, "every ADD went through an agent");
    // Each ADD was counted in one batch, and at 20 in flight a node's ADDs shared transactions.
    let batched = summed(
        &agents_now,
        r#"whereabouts_agent_batch_size_sum{operation="add"}"#,
    );
    let batches = summed(
        &agents_now,
        r#"whereabouts_agent_batch_size_count{operation="add"}"#,
    );
    // Each agent follows the one pool its ADDs used.
    for agent in agents_now.iter() {
        let copies = agent.metric(r#"whereabouts_agent_cache_copies{cache="etcd"}"#);
        assert_eq!(copies, 1.0, "pools followed by {}", agent.socket.display());
    }
    drop(agents_now);
    assert_eq!(batched as usize, CALLS);
    assert!(batches < batched, "no two ADDs were combined");
    // The combined commits left runs, records, entries and reservations in agreement.
    nodes.cluster.assert_doctor_healthy();
    delete_everything(&nodes, CALLS);
}

/// Whether `agent`'s three copies (pools, reservations, the Go binaries' Lease) are in step.
fn copies_in_step(agent: &Agent) -> bool {
    ["ippools", "reservations", "lease"].iter().all(|cache| {
        agent.metric(&format!(
            "whereabouts_agent_cache_synced{{cache=\"{cache}\"}}"
        )) == 1.0
    })
}

/// A node with nothing to do keeps its copies in step: a watch quiet for longer than a request
/// may take is not cut for it (the watches' client reads for as long as a watch lasts). The
/// agent runs with a request timeout of one second and stays quiet for three. Before, the
/// requests' read timeout cut every quiet watch, and the copies were not trusted until the
/// watcher's back-off (up to half a minute) let them list again.
#[test]
fn a_quiet_agent_keeps_its_copies_in_step() {
    let plane = real_cluster!();
    let ns = plane.namespace("a-quiet-agent-keeps-its-copies");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let settings = kube_settings(&kubeconfig);
    let timeout = [("WHEREABOUTS_KUBERNETES_TIMEOUT", "1")];
    let agent = Agent::start_with_env(dir.path(), "node-0", settings, &timeout);
    let conf = netconf("quietnet", &ipam("10.152.0.0/24", &kubeconfig));
    added_on_node_0(&agent, &conf, 0);
    wait_until("the copies in step", || copies_in_step(&agent));
    let failures = "whereabouts_agent_cache_failures_total";
    let failed_before = agent.metric(failures);
    // The quiet under test: three request timeouts without a call.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        agent.metric(failures),
        failed_before,
        "a quiet watch was cut"
    );
    assert!(copies_in_step(&agent));
    added_on_node_0(&agent, &conf, 1);
}

/// A watch that fails and then resumes where it was, nothing having changed meanwhile, brings
/// no event to say the copy is in step again: the copies list again after a failure, and are
/// in step by themselves. On the fake API server: a real one, restarted, lets a watch resume or
/// answers 410 Gone (which lists again anyway) depending on what else it wrote meanwhile; the
/// fake keeps its history and refuses connections on demand. Before, the copies stayed out of
/// step until their next change.
#[test]
fn copies_list_again_after_their_watches_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    let conf = netconf("relistnet", &ipam("10.153.0.0/28", &kubeconfig));
    added_on_node_0(&agent, &conf, 0);
    wait_until("the copies in step", || copies_in_step(&agent));
    let failures = "whereabouts_agent_cache_failures_total";
    let failed_before = agent.metric(failures);
    server.set_down(true);
    server.end_watches();
    wait_until("each copy's watch failed", || {
        agent.metric(failures) >= failed_before + 3.0
    });
    server.set_down(false);
    copies_back_in_step(std::slice::from_ref(&agent));
    added_on_node_0(&agent, &conf, 1);
}

/// The API server restarted in the middle of a burst, as a control-plane upgrade does: the
/// agents' connections and watches break. Every ADD answers an address or "try again"; the
/// agents follow the pools again by themselves (their copies in step, no restart); once the
/// runtime has retried, no address was given twice and every pool entry has its reservation;
/// repeated ADDs keep what each pod holds, and the DELs leave nothing but what ADDs cut off by
/// the outage left (reservations without an entry, which block their address until the GC's
/// orphan sweep removes them).
#[test]
fn agents_ride_out_an_api_server_restart_mid_burst() {
    const CALLS: usize = 60;
    const IN_FLIGHT: usize = 10;
    let Some(plane) = kube_apiserver::dedicated_control_plane("apiserver-restart") else {
        return;
    };
    plane.apply_crds().expect("the CRDs");
    let ns = plane.namespace("agents-api-server-restart");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let agents = Mutex::new(kube_agents(dir.path(), &kubeconfig, 2));
    let conf = netconf("restartnet", &ipam("10.151.0.0/22", &kubeconfig));
    let added = burst("ADD", CALLS, IN_FLIGHT, &agents, &[&conf], |done| {
        while done.load(Ordering::SeqCst) < CALLS / 4 {
            std::thread::sleep(Duration::from_millis(5));
        }
        plane.restart_apiserver();
    });
    let failed: Vec<usize> = added
        .iter()
        .filter(|(i, reply)| match reply.cni_code() {
            0 => false,
            11 => true,
            other => panic!("ADD {i}: code {other}: {reply:?}"),
        })
        .map(|(i, _)| *i)
        .collect();
    assert!(!failed.is_empty(), "no call met the outage");
    copies_back_in_step(&agents.lock().unwrap());
    let retry = |agents: &[Agent], i: usize| {
        call("ADD", i, &format!("node-{}", i % 2), &agents[i % 2], &conf)
    };
    after_the_outage(&ns, &agents, &[&conf], &added, failed, IN_FLIGHT, retry);
    // Restarted while nothing changes, the watches could resume where they were, and no event
    // would say the copies are in step again: they list again.
    let agents = agents.into_inner().unwrap();
    let failures = "whereabouts_agent_cache_failures_total";
    let failed_before = summed(&agents, failures);
    plane.restart_apiserver();
    // The agents count a broken watch when they notice it, after the restart returns.
    wait_until("a watch of an agent breaks at the restart", || {
        summed(&agents, failures) > failed_before
    });
    copies_back_in_step(&agents);
    plane.down();
}

/// Waits until every agent's copies are in step again after an outage, as long as their
/// pauses before listing again (up to half a minute) may take.
fn copies_back_in_step(agents: &[Agent]) {
    let start = std::time::Instant::now();
    while !agents.iter().all(copies_in_step) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the copies never came back in step"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Readiness answers from the agent's copies while every one follows the server: the
/// DaemonSet's probe on every node, every ten seconds, would otherwise be a steady stream of
/// lists. Once the server is gone (the watches fail), readiness asks it again and fails, and
/// it comes back with the server. On the fake: it counts the requests it serves and can be
/// taken down on demand.
#[test]
fn readiness_asks_the_server_only_while_the_copies_are_out_of_step() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    let ready = || agent_process::get(&agent.socket, "/readyz").map(|(status, _)| status);
    wait_until("the copies in step", || copies_in_step(&agent));
    server.reset_counts();
    for _ in 0..5 {
        assert_eq!(ready(), Some(200));
    }
    assert_eq!(
        server.requests(),
        0,
        "readiness asked the server: {:?}",
        server.requests_by_verb()
    );
    // The server goes away: new connections are dropped, and so are the watches (a crash's
    // closed connections).
    server.set_down(true);
    server.end_watches();
    wait_until("not ready without the server", || ready() == Some(503));
    server.set_down(false);
    wait_until("ready again", || ready() == Some(200));
}

/// While the copies are out of step, readiness asks the server once for the probes that come
/// together: readiness is served on the node's TCP port too, where any process on the host may
/// ask it as often as it likes. On the fake: it is taken down (the copies' watches end and
/// fail), then back up with its pool lists held at its gate, where it counts what waits.
#[test]
fn probes_at_once_while_out_of_step_ask_the_server_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    wait_until("the copies in step", || copies_in_step(&agent));
    server.set_down(true);
    server.end_watches();
    wait_until("out of step", || !copies_in_step(&agent));
    server.close_gate("GET", "ippools");
    server.set_down(false);

    let probes: Vec<_> = (0..20)
        .map(|_| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || agent_process::get(&socket, "/readyz").map(|(s, _)| s))
        })
        .collect();
    for probe in probes {
        assert_eq!(probe.join().unwrap(), Some(503));
    }
    // One list of readiness's, and the pool copy's own.
    let waiting = server.waiting_at_gate();
    server.open_gate();
    assert!(waiting <= 2, "{waiting} pool lists waited");
}

/// Through the agent too (its DELs are combined per pool), an entry upstream wrote without an
/// interface name is its container's, for an interface the container holds no entry of its
/// own for: the DEL of net1 frees it, and the other interface's entry stays. On the fake: a
/// pool written as an old upstream wrote it, beside an agent, without a control plane.
#[test]
fn the_agents_del_frees_an_entry_without_an_interface_name() {
    let dir = tempfile::tempdir().unwrap();
    let (server, kubeconfig, agent) = agent_on_a_fake_server(dir.path());
    let entry = |ifname: Option<&str>| {
        let mut entry = json!({"id": "agent-7", "podref": "bench/pod-7"});
        if let Some(ifname) = ifname {
            entry["ifname"] = json!(ifname);
        }
        entry
    };
    server.create(
        "ippools",
        "kube-system",
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool",
               "metadata": {"name": "10.161.0.0-28"},
               "spec": {"range": "10.161.0.0/28",
                        "allocations": {"3": entry(None), "4": entry(Some("net2"))}}}),
    );
    let mut ipam = ipam("10.161.0.0/28", &kubeconfig);
    ipam["enable_overlapping_ranges"] = json!(false);
    let conf = netconf("oldnet", &ipam);
    // The DEL of pod-7's net1 through the agent; the keys the pool holds after it.
    let del_leaves = |keys: &[&str]| {
        let reply = call("DEL", 7, "node-0", &agent, &conf);
        assert_eq!(reply.code, 0, "{reply:?}");
        let pool = server
            .get("ippools", "kube-system", "10.161.0.0-28")
            .unwrap();
        let left: Vec<&String> = pool["spec"]["allocations"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(left, keys, "{pool}");
    };
    let path =
        "/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/kube-system/ippools/10.161.0.0-28";
    let add = |key: &str, ifname: Option<&str>| {
        let patch = json!({"spec": {"allocations": {key: entry(ifname)}}}).to_string();
        let (status, _) = server.raw("PATCH", path, "application/merge-patch+json", &patch);
        assert_eq!(status, 200);
    };
    del_leaves(&["4"]);
    assert_eq!(
        agent.metric("whereabouts_agent_requests_total{operation=\"del\",result=\"ok\"}"),
        1.0,
        "the DEL went through the agent"
    );

    // The agent's copy cannot prove that the container has no entry of its own: with the
    // copy held behind while net1 gets one, the DEL of net1 frees that entry, not the old one.
    let events = || agent.metric("whereabouts_agent_cache_events_total{cache=\"ippools\"}");
    let before = events();
    add("5", None);
    wait_until("the copy holds the old entry", || events() > before);
    server.hold_watches(true);
    add("6", Some("net1"));
    del_leaves(&["4", "5"]);
    server.hold_watches(false);
}

/// A pod re-created under its name whose ADD through the agent fails in a range added since
/// (full) leaves its first range's address under its old sandbox, as the plugin's own ADD does
/// (the contract's `a_failed_add_leaves_a_kept_address_as_it_was`): the entry and its
/// reservation name the old sandbox again, the runtime's DEL of the failed one releases
/// nothing, and the pod's next sandbox gets the address.
#[test]
fn a_failed_add_through_the_agent_leaves_a_kept_address_as_it_was() {
    let plane = real_cluster!();
    let ns = plane.namespace("agent-failed-keep");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let agent = Agent::start(dir.path(), "node-0", kube_settings(&kubeconfig));
    let conf = |ranges: &[&str]| {
        let mut ipam = ipam(ranges[0], &dir.path().join("no-such.kubeconfig"));
        ipam.as_object_mut().unwrap().remove("range");
        ipam["ipRanges"] = ranges.iter().map(|r| json!({"range": r})).collect();
        netconf("keptnet", &ipam)
    };
    let (first, full) = (conf(&["10.163.0.0/24"]), conf(&["10.163.1.0/30"]));
    let both = conf(&["10.163.0.0/24", "10.163.1.0/30"]);
    let sandbox = |command: &'static str, container: &str, pod: &str, conf: &str| {
        let call = Call {
            command,
            container,
            ifname: "net1",
            pod: Some(("bench", pod)),
            node: Some("node-0"),
            env: vec![agent.env()],
        };
        run(bin(), &call, conf)
    };
    let added = |container: &str, pod: &str, conf: &str| {
        let reply = sandbox("ADD", container, pod, conf);
        assert_eq!(reply.code, 0, "{reply:?}");
        ip_of(&reply)
    };
    added("c0", "x", &first);
    let kept = added("c1", "a", &first);
    // The lowest address is free again: a freed address would give the pod another one.
    assert_eq!(sandbox("DEL", "c0", "x", &first).code, 0);
    added("f1", "f1", &full);
    added("f2", "f2", &full);
    let failed = sandbox("ADD", "c2", "a", &both);
    assert_eq!(failed.cni_code(), 100, "{failed:?}");
    assert_eq!(sandbox("DEL", "c2", "a", &both).code, 0);
    let reservation_holder = || {
        let reservations = ns.list(RESERVATIONS);
        let of_kept = reservations
            .iter()
            .find(|r| r["metadata"]["name"].as_str().unwrap().ends_with(&kept));
        of_kept.map(|r| r["spec"]["containerid"].clone())
    };
    assert_eq!(reservation_holder(), Some(json!("c1")));
    assert_eq!(added("c3", "a", &first), kept);
    assert_eq!(reservation_holder(), Some(json!("c3")));
    assert_eq!(
        agent.metric("whereabouts_agent_requests_total{operation=\"add\",result=\"exhausted\"}"),
        1.0,
        "the failed ADD went through the agent"
    );
}

/// Through the agent too, an ADD in a sliced network without reservations whose node's slice is
/// withdrawn while it writes takes its entry back and asks the runtime to try again
/// (`an_add_whose_slice_is_withdrawn_meanwhile_takes_its_address_back` of the plugin's own
/// path). On the fake: it holds the agent's pool write while the NodeSlicePool changes.
#[test]
fn the_agent_takes_back_an_add_whose_slice_is_withdrawn_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let server = fake_apiserver::FakeApiServer::start();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    // The agent allocates from its own node's slice.
    let settings = kube_settings(&kubeconfig);
    let agent = Agent::start_with_env(dir.path(), "node-0", settings, &[("NODENAME", "node-0")]);
    let slices = |node: &str| {
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "NodeSlicePool",
               "metadata": {"name": "loose"},
               "spec": {"range": "10.162.0.0/24", "sliceSize": "/28"},
               "status": {"allocations": [{"nodeName": node, "sliceRange": "10.162.0.0/28"}]}})
    };
    server.create("nodeslicepools", "kube-system", slices("node-0"));
    let mut ipam = ipam("10.162.0.0/24", &kubeconfig);
    ipam["enable_overlapping_ranges"] = json!(false);
    ipam["node_slice_size"] = json!("/28");
    ipam["network_name"] = json!("loose");
    let conf = netconf("loose", &ipam);
    assert_eq!(added_on_node_0(&agent, &conf, 1), "10.162.0.1");
    // The pool exists: the next ADD's write of it is an update, held at the gate.
    server.close_gate("PATCH", "ippools");
    let reply = std::thread::scope(|s| {
        let second = s.spawn(|| call("ADD", 2, "node-0", &agent, &conf));
        wait_until("the ADD's write at the gate", || {
            server.waiting_at_gate() > 0
        });
        assert!(server.delete_now("nodeslicepools", "kube-system", "loose"));
        server.create("nodeslicepools", "kube-system", slices(""));
        server.open_gate();
        second.join().unwrap()
    });
    assert_eq!(reply.cni_code(), 11, "{reply:?}");
    assert!(
        agent.metric("whereabouts_agent_requests_total{operation=\"add\",result=\"try_again\"}")
            >= 1.0,
        "the ADD did not go through the agent"
    );
    let pool = server
        .get("ippools", "kube-system", "loose-node-0-10.162.0.0-28")
        .unwrap();
    assert_eq!(
        pool_holders(&pool),
        ["agent-1"],
        "the withdrawn slice's entry stayed: {pool}"
    );
}

/// An empty `WHEREABOUTS_AGENT_SOCKET` is unset for the agent as for the plugin: both look for
/// the flat file's socket (the agent refused to start on it while the plugins answered "try
/// again").
#[test]
fn an_empty_socket_variable_is_unset_for_the_agent_too() {
    let plane = real_cluster!();
    let ns = plane.namespace("agent-empty-socket-variable");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let settings = kube_settings(&kubeconfig);
    let empty = [("WHEREABOUTS_AGENT_SOCKET", "")];
    // Ready once it answers on the flat file's socket.
    let agent = Agent::start_with_env(dir.path(), "node-0", settings, &empty);
    assert!(agent.socket.exists());
}

/// The probes fail once the socket the plugins ask is gone (a folder cleaned by hand) or
/// replaced: no plugin reaches the agent any more, and the liveness probe's restart binds it
/// again.
#[test]
fn an_agent_whose_socket_is_gone_fails_its_probes() {
    let plane = real_cluster!();
    let ns = plane.namespace("agent-socket-gone");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let socket = dir.path().join("node-0.sock");
    let settings = kube_settings(&kubeconfig);
    let args = ["--listen", port.as_str()];
    let mut agent = Agent::launch_on(dir.path(), "node-0", settings, &socket, &args);
    agent.wait_ready();
    let probe = |path: &str| -> u16 {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&port).unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer[9..12].parse().unwrap()
    };
    assert_eq!(probe("/healthz"), 200);
    assert_eq!(probe("/readyz"), 200);
    std::fs::remove_file(&socket).unwrap();
    assert_eq!(probe("/healthz"), 503, "{}", agent.log_text());
    assert_eq!(probe("/readyz"), 503);
}
