//! The etcd engine against a real 3-member etcd cluster, through the real binary where the
//! runtime's view matters and through the library where the store's own semantics do.

#[path = "etcd_cluster/mod.rs"]
mod etcd_cluster;
#[path = "common/trust.rs"]
mod trust;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_cluster::{etcd_available, Cluster};
use serde_json::{json, Value};

/// The heavy tests share two cores with everything else: run one cluster at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Processes in flight during a burst: enough to contend, few enough for two cores.
const IN_FLIGHT: usize = 24;

struct Net {
    ipam: Value,
}

impl Net {
    fn new(cluster: &Cluster, range: &str) -> Net {
        let mut ipam = json!({
            "type": "whereabouts",
            "datastore": "etcd",
            "etcd_host": cluster.endpoints(),
            "range": range,
            "log_level": "error",
        });
        if let Some(tls) = cluster.tls() {
            ipam["etcd_host"] = json!(cluster.endpoint_urls().join(","));
            ipam["etcd_ca_cert_file"] = json!(tls.ca);
            ipam["etcd_cert_file"] = json!(tls.cert);
            ipam["etcd_key_file"] = json!(tls.key);
        }
        Net { ipam }
    }

    /// The runtime's reply (which the network configuration's author reads) names the
    /// endpoints by their field, never their addresses, nor the TLS files.
    fn shows_no_endpoint(&self, reply: &Reply) {
        let text = reply.stdout.to_string();
        let endpoints = self.ipam["etcd_host"].as_str().unwrap().split(',');
        for host in endpoints.map(|e| e.rsplit("://").next().unwrap()) {
            assert!(!text.contains(host), "{host} shown: {text}");
        }
        for file in ["etcd_ca_cert_file", "etcd_cert_file", "etcd_key_file"] {
            if let Some(path) = self.ipam[file].as_str() {
                assert!(!text.contains(path), "{path} shown: {text}");
            }
        }
    }

    fn conf(&self, version: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "cniVersion": version,
            "name": "net",
            "type": "bridge",
            "ipam": self.ipam,
        }))
        .unwrap()
    }
}

/// One simulated pod: node `n`, pod `i`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Pod {
    node: usize,
    index: usize,
}

impl Pod {
    fn container(&self) -> String {
        format!("node{}-ctr{}", self.node, self.index)
    }
}

/// What one plugin call returned.
#[derive(Debug)]
struct Reply {
    exit: i32,
    stdout: Value,
    elapsed: Duration,
}

impl Reply {
    fn ip(&self) -> Option<IpAddr> {
        let text = self.stdout["ips"][0]["address"].as_str()?;
        text.split('/').next()?.parse().ok()
    }

    fn code(&self) -> Option<u64> {
        self.stdout["code"].as_u64()
    }
}

fn plugin(command: &str, pod: Option<&Pod>, conf: &[u8], env: &[(&str, &str)]) -> Reply {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_whereabouts"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/usr/lib/cni")
        .env(trust::FLAT_FILE_ENV, trust::test_flat_file())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(pod) = pod {
        cmd.env("CNI_CONTAINERID", pod.container())
            .env("CNI_NETNS", format!("/var/run/netns/{}", pod.container()))
            .env("CNI_IFNAME", "net1")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=node{};K8S_POD_NAME=pod{};K8S_POD_UID=uid-{}",
                    pod.node,
                    pod.index,
                    pod.container()
                ),
            );
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("the plugin binary starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf)
        .expect("config written");
    let out = child.wait_with_output().expect("the plugin finishes");
    let elapsed = start.elapsed();
    let stdout = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    Reply {
        exit: out.status.code().unwrap_or(-1),
        stdout,
        elapsed,
    }
}

/// Runs `command` for every pod with `IN_FLIGHT` processes at a time; `progress` counts
/// finished calls.
fn burst(
    command: &str,
    pods: &[Pod],
    conf: &[u8],
    progress: &AtomicUsize,
    env: &[(&str, &str)],
) -> BTreeMap<Pod, Reply> {
    let queue = Mutex::new(pods.to_vec());
    let replies = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..IN_FLIGHT {
            scope.spawn(|| loop {
                let Some(pod) = queue.lock().unwrap().pop() else {
                    return;
                };
                let reply = plugin(command, Some(&pod), conf, env);
                progress.fetch_add(1, Ordering::SeqCst);
                replies.lock().unwrap().insert(pod, reply);
            });
        }
    });
    replies.into_inner().unwrap()
}

fn pods(nodes: usize, per_node: usize) -> Vec<Pod> {
    (0..nodes)
        .flat_map(|node| (0..per_node).map(move |index| Pod { node, index }))
        .collect()
}

/// The allocation records in etcd: container ID -> address.
fn recorded(cluster: &Cluster) -> BTreeMap<String, IpAddr> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", cluster.endpoint_urls().join(",")))
        .args(["get", "--prefix", "/whereabouts/pools/", "-w", "json"])
        .output()
        .expect("etcdctl");
    let v: Value = serde_json::from_slice(&out.stdout).expect("etcdctl JSON");
    let mut map = BTreeMap::new();
    for kv in v["kvs"].as_array().into_iter().flatten() {
        let key = decode(kv["key"].as_str().unwrap_or_default());
        if !key.contains("/a/") {
            continue;
        }
        let record: Value =
            serde_json::from_slice(decode(kv["value"].as_str().unwrap_or_default()).as_bytes())
                .expect("record JSON");
        let ip = record["ip"].as_str().unwrap().parse().unwrap();
        let previous = map.insert(record["container_id"].as_str().unwrap().to_string(), ip);
        assert!(
            previous.is_none(),
            "two records for one container: {record}"
        );
    }
    map
}

/// etcdctl's JSON output carries keys and values in base64.
fn decode(b64: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in b64.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        bits = (bits << 6) | v as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_unique(replies: &BTreeMap<Pod, Reply>) -> BTreeMap<String, IpAddr> {
    let mut by_ip: HashMap<IpAddr, &Pod> = HashMap::new();
    let mut got = BTreeMap::new();
    for (pod, reply) in replies {
        if let Some(ip) = reply.ip() {
            if let Some(other) = by_ip.insert(ip, pod) {
                panic!("{ip} handed out twice: {other:?} and {pod:?}");
            }
            got.insert(pod.container(), ip);
        }
    }
    got
}

#[test]
fn burst_of_1000_adds_is_unique_and_del_leaves_nothing() {
    if !etcd_available() {
        return;
    }
    let _serial = serial();
    let cluster = Cluster::start(false);
    let net = Net::new(&cluster, "10.20.0.0/16");
    let conf = net.conf("1.0.0");
    let all = pods(10, 100);
    let started = Instant::now();
    let replies = burst("ADD", &all, &conf, &AtomicUsize::new(0), &[]);
    let took = started.elapsed();
    for (pod, reply) in &replies {
        assert_eq!(reply.exit, 0, "ADD {pod:?} failed: {}", reply.stdout);
    }
    let got = assert_unique(&replies);
    assert_eq!(got.len(), all.len());
    assert_eq!(
        recorded(&cluster),
        got,
        "etcd records differ from the results"
    );
    eprintln!("1000 ADDs through the binary in {took:?}");
    cluster.assert_doctor_healthy();

    // A repeated ADD returns the same address.
    let again = plugin("ADD", Some(&all[7]), &conf, &[]);
    assert_eq!(again.ip(), got.get(&all[7].container()).copied());

    let check = plugin("CHECK", Some(&all[3]), &conf, &[]);
    assert_eq!(check.exit, 0, "CHECK: {}", check.stdout);

    // A DEL given the ADD's result as `prevResult`, as runtimes give it, finds the address in
    // its first read: one read and the commit.
    let told = &all[11];
    let mut with_prev: Value = serde_json::from_slice(&conf).unwrap();
    with_prev["prevResult"] = replies[told].stdout.clone();
    let with_prev = serde_json::to_vec(&with_prev).unwrap();
    let requests = || cluster.transactions_served() + cluster.plain_reads_served();
    let before = requests();
    let del = plugin("DEL", Some(told), &with_prev, &[]);
    assert_eq!(del.exit, 0, "DEL with prevResult: {}", del.stdout);
    assert_eq!(
        requests() - before,
        2.0,
        "etcd requests of a DEL told its address"
    );
    assert!(!recorded(&cluster).contains_key(&told.container()));

    let dels = burst("DEL", &all, &conf, &AtomicUsize::new(0), &[]);
    for (pod, reply) in &dels {
        assert_eq!(reply.exit, 0, "DEL {pod:?} failed: {}", reply.stdout);
    }
    let left = cluster.left_after_releasing_all("/whereabouts/");
    assert!(
        left.is_empty(),
        "keys left after DEL of everything: {left:?}"
    );
}

#[test]
fn leader_killed_mid_burst_gives_unique_addresses_or_code_11_and_no_leak() {
    if !etcd_available() {
        return;
    }
    let _serial = serial();
    let mut cluster = Cluster::start(false);
    let net = Net::new(&cluster, "10.30.0.0/16");
    let conf = net.conf("1.0.0");
    let all = pods(10, 100);
    let progress = Arc::new(AtomicUsize::new(0));

    // A short deadline so that ADDs caught while the cluster has no quorum give up (code 11)
    // instead of waiting it out.
    let env = [("WHEREABOUTS_ETCD_TIMEOUT_MS", "2500")];
    let wait_for = |n: usize, runner: &std::thread::ScopedJoinHandle<'_, _>| {
        while progress.load(Ordering::SeqCst) < n && !runner.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Whether the burst was still running once each kill had been made (checked after the
    // fact, so "still running" is certain).
    let mut mid_burst = Vec::new();
    let replies = std::thread::scope(|scope| {
        let runner = scope.spawn(|| burst("ADD", &all, &conf, &progress, &env));
        wait_for(all.len() / 4, &runner);
        let leader = cluster.leader();
        eprintln!(
            "killing leader m{leader} after {} ADDs",
            progress.load(Ordering::SeqCst)
        );
        cluster.kill(leader);
        mid_burst.push(("the first leader's kill", !runner.is_finished()));
        // Then the new leader too: no quorum until the first one is back.
        wait_for(all.len() / 2, &runner);
        let second = cluster.leader();
        eprintln!(
            "killing leader m{second} after {} ADDs: no quorum for 3 s",
            progress.load(Ordering::SeqCst)
        );
        cluster.kill(second);
        mid_burst.push(("the second leader's kill", !runner.is_finished()));
        std::thread::sleep(Duration::from_secs(3));
        cluster.restart(leader);
        let replies = runner.join().expect("burst thread");
        cluster.restart(second);
        replies
    });
    cluster.wait_healthy(Duration::from_secs(30));
    for (event, running) in &mid_burst {
        assert!(
            running,
            "the burst of {} ADDs had finished before {event}: it was too short for the outage \
             to land in it, so this run checked nothing about one",
            all.len()
        );
    }

    let mut failed = Vec::new();
    for (pod, reply) in &replies {
        if reply.exit != 0 {
            assert_eq!(
                reply.code(),
                Some(11),
                "ADD {pod:?} failed with something other than code 11: {}",
                reply.stdout
            );
            failed.push(pod.clone());
        }
    }
    eprintln!("{} of {} ADDs failed with code 11", failed.len(), all.len());
    let mut got = assert_unique(&replies);

    // The runtime retries the failed ones once the cluster is healthy again.
    for pod in &failed {
        let reply = plugin("ADD", Some(pod), &conf, &[]);
        assert_eq!(reply.exit, 0, "retried ADD {pod:?}: {}", reply.stdout);
        got.insert(pod.container(), reply.ip().expect("an address"));
    }
    let distinct: BTreeSet<IpAddr> = got.values().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "duplicate addresses after retries"
    );
    assert_eq!(
        recorded(&cluster),
        got,
        "etcd holds allocations that no ADD returned (a leak) or misses some"
    );
    cluster.assert_doctor_healthy();

    let dels = burst("DEL", &all, &conf, &AtomicUsize::new(0), &[]);
    assert!(dels.values().all(|r| r.exit == 0));
    let left = cluster.left_after_releasing_all("/whereabouts/");
    assert!(
        left.is_empty(),
        "keys left after DEL of everything: {left:?}"
    );
}

#[test]
fn gc_then_all_members_down_add_is_code_11_within_the_timeout_and_status_is_50() {
    if !etcd_available() {
        return;
    }
    let _serial = serial();
    let mut cluster = Cluster::start(false);
    let net = Net::new(&cluster, "10.40.0.0/24");
    let pod = Pod { node: 0, index: 0 };
    let up = plugin("STATUS", None, &net.conf("1.1.0"), &[]);
    assert_eq!(up.exit, 0, "STATUS with a healthy cluster: {}", up.stdout);
    let first = plugin("ADD", Some(&pod), &net.conf("1.0.0"), &[]);
    assert_eq!(first.exit, 0, "{}", first.stdout);

    // GC through the binary: only the attachments listed as valid keep their address.
    let stale = Pod { node: 5, index: 5 };
    let gone = plugin("ADD", Some(&stale), &net.conf("1.0.0"), &[]);
    assert_eq!(gone.exit, 0, "{}", gone.stdout);
    let mut gc_conf: Value = serde_json::from_slice(&net.conf("1.1.0")).unwrap();
    gc_conf["cni.dev/valid-attachments"] =
        json!([{"containerID": pod.container(), "ifname": "net1"}]);
    let gc = plugin("GC", None, &serde_json::to_vec(&gc_conf).unwrap(), &[]);
    assert_eq!(gc.exit, 0, "GC: {}", gc.stdout);
    let held = recorded(&cluster);
    assert_eq!(held.keys().collect::<Vec<_>>(), vec![&pod.container()]);
    let check = plugin("CHECK", Some(&stale), &net.conf("1.0.0"), &[]);
    assert_ne!(
        check.exit, 0,
        "CHECK after GC released it: {}",
        check.stdout
    );

    cluster.stop_all();
    let timeout = [("WHEREABOUTS_ETCD_TIMEOUT_MS", "3000")];
    let other = Pod { node: 0, index: 1 };
    let add = plugin("ADD", Some(&other), &net.conf("1.0.0"), &timeout);
    assert_ne!(add.exit, 0);
    assert_eq!(add.code(), Some(11), "{}", add.stdout);
    net.shows_no_endpoint(&add);
    assert!(
        add.elapsed < Duration::from_millis(3000 + 2000),
        "ADD took {:?} with a 3 s deadline",
        add.elapsed
    );
    let status = plugin("STATUS", None, &net.conf("1.1.0"), &timeout);
    assert_eq!(status.code(), Some(50), "{}", status.stdout);
    net.shows_no_endpoint(&status);
    assert!(
        status.elapsed < Duration::from_millis(5000),
        "{:?}",
        status.elapsed
    );
    // DEL cannot succeed either: the runtime must retry it rather than believe it done.
    let del = plugin("DEL", Some(&pod), &net.conf("1.0.0"), &timeout);
    assert_eq!(del.code(), Some(11), "{}", del.stdout);
}

#[test]
fn tls_with_client_certificates() {
    if !etcd_available() {
        return;
    }
    let _serial = serial();
    let cluster = Cluster::start(true);
    let net = Net::new(&cluster, "10.50.0.0/24");
    let conf = net.conf("1.0.0");
    let all = pods(2, 3);
    let mut ips = BTreeSet::new();
    for pod in &all {
        let reply = plugin("ADD", Some(pod), &conf, &[]);
        assert_eq!(reply.exit, 0, "ADD over TLS: {}", reply.stdout);
        assert!(ips.insert(reply.ip().unwrap()));
    }
    assert_eq!(
        ips.iter().next().map(|ip| ip.to_string()).as_deref(),
        Some("10.50.0.1")
    );
    let check = plugin("CHECK", Some(&all[0]), &conf, &[]);
    assert_eq!(check.exit, 0, "CHECK over TLS: {}", check.stdout);
    let status = plugin("STATUS", None, &net.conf("1.1.0"), &[]);
    assert_eq!(status.exit, 0, "STATUS over TLS: {}", status.stdout);

    // Without a client certificate the cluster refuses the connection.
    let mut no_cert = Net::new(&cluster, "10.50.0.0/24");
    let ipam = no_cert.ipam.as_object_mut().unwrap();
    ipam.remove("etcd_cert_file");
    ipam.remove("etcd_key_file");
    let refused = plugin(
        "ADD",
        Some(&Pod { node: 9, index: 9 }),
        &no_cert.conf("1.0.0"),
        &[("WHEREABOUTS_ETCD_TIMEOUT_MS", "2000")],
    );
    assert_eq!(refused.code(), Some(11), "{}", refused.stdout);
    no_cert.shows_no_endpoint(&refused);

    for pod in &all {
        let reply = plugin("DEL", Some(pod), &conf, &[]);
        assert_eq!(reply.exit, 0, "DEL over TLS: {}", reply.stdout);
    }
    assert!(cluster.keys("/whereabouts/").is_empty());
}

/// A user whose role does not grant the engine's keys (a role for another prefix, or read only)
/// is told at once: code 7 naming the prefix its role needs, not "try again" after the whole
/// deadline (every retry refused the same way). Once the role grants it, the same ADD succeeds.
#[test]
fn a_user_whose_role_lacks_the_prefix_is_told_what_it_needs() {
    if !etcd_available() {
        return;
    }
    let _serial = serial();
    let mut cluster = Cluster::start(false);
    cluster.enable_auth("s3cret");
    cluster.add_user_with_role("ipam", "1pam");
    cluster.grant("ipam", "readwrite", "/other/");
    let mut net = Net::new(&cluster, "10.61.0.0/24");
    net.ipam["etcd_username"] = json!("ipam");
    net.ipam["etcd_password"] = json!("1pam");
    let conf = net.conf("1.1.0");
    let pod = Pod { node: 1, index: 1 };
    let denied = |reply: &Reply, what: &str| {
        assert_eq!(reply.code(), Some(7), "{what}: {}", reply.stdout);
        let msg = reply.stdout["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains("readwrite on the prefix /whereabouts/"),
            "{what}: {msg}"
        );
        assert!(msg.contains("permission denied"), "{what}: {msg}");
    };
    denied(
        &plugin("ADD", Some(&pod), &conf, &[]),
        "ADD, another prefix",
    );
    denied(
        &plugin("DEL", Some(&pod), &conf, &[]),
        "DEL, another prefix",
    );
    let status = plugin("STATUS", None, &conf, &[]);
    assert_eq!(status.code(), Some(50), "{}", status.stdout);
    assert!(status.stdout["msg"]
        .as_str()
        .unwrap_or_default()
        .contains("readwrite"));

    // Reads pass, the commit is refused: nothing is written.
    cluster.grant("ipam", "read", "/whereabouts/");
    denied(&plugin("ADD", Some(&pod), &conf, &[]), "ADD, read only");
    assert!(cluster.keys("/whereabouts/").is_empty());

    cluster.grant("ipam", "readwrite", "/whereabouts/");
    let add = plugin("ADD", Some(&pod), &conf, &[]);
    assert_eq!(add.exit, 0, "ADD, read and write: {}", add.stdout);
    let del = plugin("DEL", Some(&pod), &conf, &[]);
    assert_eq!(del.exit, 0, "{}", del.stdout);
    assert!(cluster.keys("/whereabouts/").is_empty());
}

/// A cluster whose members allow fewer operations per transaction (`--max-txn-ops`) than the
/// engine's transactions hold: ADD and STATUS say so at once, naming the flag and what the
/// engine needs (codes 7 and 50), and nothing is written. Before, every ADD retried the refused
/// commit until its 15 s deadline and answered "try again", and STATUS said the cluster was
/// healthy.
#[test]
fn a_cluster_allowing_too_few_operations_per_transaction_is_named() {
    if !etcd_available() {
        return;
    }
    let _serial = serial();
    let cluster = Cluster::start_with(false, &["--max-txn-ops", "16"]);
    let net = Net::new(&cluster, "10.62.0.0/24");
    let conf = net.conf("1.1.0");
    let pod = Pod { node: 1, index: 1 };
    let named = |reply: &Reply, code: u64, what: &str| {
        assert_eq!(reply.code(), Some(code), "{what}: {}", reply.stdout);
        let msg = reply.stdout["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains("--max-txn-ops of at least 128"),
            "{what}: {msg}"
        );
    };
    named(&plugin("ADD", Some(&pod), &conf, &[]), 7, "ADD");
    named(&plugin("STATUS", None, &conf, &[]), 50, "STATUS");
    assert!(cluster.keys("/whereabouts/").is_empty());
    let del = plugin("DEL", Some(&pod), &conf, &[]);
    assert_eq!(del.exit, 0, "a DEL of nothing: {}", del.stdout);
}

#[test]
fn username_and_password() {
    if !etcd_available() {
        return;
    }
    let _serial = serial();
    let mut cluster = Cluster::start(false);
    cluster.enable_auth("s3cret");
    let mut net = Net::new(&cluster, "10.60.0.0/24");
    net.ipam["etcd_username"] = json!("root");
    net.ipam["etcd_password"] = json!("s3cret");
    let pod = Pod { node: 1, index: 1 };
    let add = plugin("ADD", Some(&pod), &net.conf("1.0.0"), &[]);
    assert_eq!(add.exit, 0, "ADD with credentials: {}", add.stdout);
    assert_eq!(cluster.keys("/whereabouts/pools/").len(), 2);

    // A wrong password is a configuration error, not something to retry.
    net.ipam["etcd_password"] = json!("wrong");
    let refused = plugin(
        "ADD",
        Some(&Pod { node: 1, index: 2 }),
        &net.conf("1.0.0"),
        &[],
    );
    assert_eq!(refused.code(), Some(7), "{}", refused.stdout);

    net.ipam["etcd_password"] = json!("s3cret");
    let del = plugin("DEL", Some(&pod), &net.conf("1.0.0"), &[]);
    assert_eq!(del.exit, 0, "{}", del.stdout);
    assert!(cluster.keys("/whereabouts/").is_empty());
}
