//! The real binary, as a runtime calls it, against the real API server (one namespace per
//! test). The strict fake server stays for what a real one cannot be made to do on demand:
//! latency, injected 500s and dropped connections (`slow_failing_or_refusing_servers_...`).
//! A server without the CRDs is a real one of its own (`status_needs_the_crds`).

mod fake_apiserver;
mod kube_apiserver;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fake_apiserver::burst::{container, run_burst, Burst};
use fake_apiserver::cni::{self, netconf, run, Call, Reply};
use fake_apiserver::harness::{pool_holders, pool_ips};
use fake_apiserver::FakeApiServer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use serde_json::{json, Value};

const NS: &str = "kube-system";
const RESERVATIONS: &str = "overlappingrangeipreservations";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
}

fn ipam(range: &str, kubeconfig: &Path, extra: Value) -> Value {
    let mut ipam = json!({
        "type": "whereabouts",
        "range": range,
        "log_level": "error",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()},
    });
    if let (Some(map), Value::Object(more)) = (ipam.as_object_mut(), extra) {
        map.extend(more);
    }
    ipam
}

fn call<'a>(command: &'a str, container: &'a str, pod: &'a str) -> Call<'a> {
    Call {
        command,
        container,
        ifname: "net1",
        pod: Some(("default", pod)),
        node: None,
        env: vec![],
    }
}

/// Polls `done` every 10 ms for at most `limit`: whether it held in time. The caller opens any
/// gate it closed before it fails, so that the binary held there ends too.
fn held_within(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A flat file in `dir` of the tests' trust rules saying Go binaries write the pools (the
/// migration's setting): calls made with it, by [`with_flat_file`].
fn go_present_flat_file(dir: &Path) -> PathBuf {
    let flat = dir.join("go-present.conf");
    let temp = std::env::temp_dir().canonicalize().unwrap();
    let settings = json!({"allow_inline_paths": [temp], "allow_insecure_tls": true,
                          "go_whereabouts": "present"});
    std::fs::write(&flat, settings.to_string()).unwrap();
    flat
}

fn with_flat_file<'a>(flat: &Path, mut c: Call<'a>) -> Call<'a> {
    c.env
        .push(("WHEREABOUTS_FLAT_FILE", flat.display().to_string()));
    c
}

/// A short per-request timeout so failure tests finish quickly.
fn quick<'a>(mut c: Call<'a>) -> Call<'a> {
    c.env.push(("WHEREABOUTS_KUBERNETES_TIMEOUT", "0.3".into()));
    c
}

/// Every pool entry has its reservation and every reservation its pool entry.
fn assert_consistent(pools: &[Value], reservations: &[Value], network_name: &str) {
    let mut in_pools = BTreeSet::new();
    for pool in pools {
        for ip in pool_ips(pool) {
            assert!(in_pools.insert(ip), "{ip} is in two pools");
        }
    }
    let prefix = if network_name.is_empty() {
        String::new()
    } else {
        format!("{network_name}-")
    };
    let reserved: BTreeSet<_> = reservations
        .iter()
        .map(|r| {
            let name = r["metadata"]["name"].as_str().unwrap();
            name.strip_prefix(&prefix).unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(in_pools, reserved, "pools and reservations disagree");
}

/// 200 ADDs from 10 nodes, 40 processes at once, into one pool, then 200 DELs. (Every write of a
/// pool costs the real server far more than the fake, mostly in its field management of a map
/// with hundreds of entries: this size keeps the test to about a minute on two cores.)
#[test]
fn ten_nodes_concurrent_adds_then_del_all() {
    const CALLS: usize = 200;
    let plane = real_cluster!();
    let ns = plane.namespace("ten-nodes-concurrent-adds");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let conf = netconf("burstnet", &ipam("10.80.0.0/20", &kubeconfig, json!({})));
    let burst = Burst {
        calls: CALLS,
        parallel: 40,
        nodes: 10,
        command: "ADD",
    };
    let added = run_burst(bin(), &conf, &burst, &[]);
    let mut ips = BTreeSet::new();
    for (i, _, reply) in &added.calls {
        assert_eq!(reply.code, 0, "ADD {i}: {reply:?}");
        let got = reply.ips();
        assert_eq!(got.len(), 1, "ADD {i}: {reply:?}");
        assert!(ips.insert(got[0].clone()), "{} handed out twice", got[0]);
    }
    assert_eq!(ips.len(), CALLS);
    let pool = ns.get("ippools", "10.80.0.0-20").expect("pool");
    assert_eq!(pool_ips(&pool).len(), CALLS);
    assert_eq!(ns.list(RESERVATIONS).len(), CALLS);
    assert_consistent(&ns.list("ippools"), &ns.list(RESERVATIONS), "");
    eprintln!("{CALLS} ADDs: {:?}", added.wall);

    let deleted = run_burst(
        bin(),
        &conf,
        &Burst {
            command: "DEL",
            ..burst
        },
        &[],
    );
    // A DEL that answers 11 ("try again": the pool kept changing past its deadline) is
    // retried by the runtime, as CNI has it; it must then succeed, and nothing may leak.
    for (i, _, first) in &deleted.calls {
        let mut retried = None;
        for _ in 0..3 {
            let last = retried.as_ref().unwrap_or(first);
            if last.cni_code() != 11 {
                break;
            }
            let call = Call {
                command: "DEL",
                container: &container(*i),
                ifname: "net1",
                pod: Some(("bench", &format!("pod-{i}"))),
                node: Some(&format!("node-{}", i % burst.nodes)),
                env: vec![],
            };
            retried = Some(run(bin(), &call, &conf));
        }
        let reply = retried.as_ref().unwrap_or(first);
        assert_eq!(reply.code, 0, "DEL {i}: {reply:?}");
        if retried.is_some() {
            eprintln!("DEL {i} retried after: {first:?}");
        }
    }
    let pool = ns.get("ippools", "10.80.0.0-20").unwrap();
    assert!(pool_ips(&pool).is_empty(), "pool not empty: {pool}");
    let left: Vec<Value> = ns.list(RESERVATIONS);
    assert!(
        left.is_empty(),
        "reservations left after every DEL: {left:?}"
    );
    let _ = container(0);
}

/// A network name that makes object names Kubernetes refuses is a configuration error found
/// before anything is written (it used to be retried as a lost race until the deadline: code
/// 11, and the runtime retries for ever); DEL of it succeeds, and capitals (upstream
/// lower-cases them) still work.
#[test]
fn network_names_kubernetes_cannot_name_objects_after_are_refused_on_add() {
    let plane = real_cluster!();
    let ns = plane.namespace("network-names-kubernetes-cannot-name-objects-after");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let long = "n".repeat(245);
    for (i, name) in ["my_net", "a/b", "pool?x=1", "net work", &long]
        .into_iter()
        .enumerate()
    {
        let extra = json!({"network_name": name, "enable_overlapping_ranges": true});
        let conf = netconf(
            "named",
            &ipam(&format!("10.91.{i}.0/24"), &kubeconfig, extra),
        );
        let c = format!("bad-{i}");
        let reply = run(bin(), &call("ADD", &c, &c), &conf);
        assert_eq!(reply.cni_code(), 7, "{name:?}: {reply:?}");
        assert!(reply.stdout.contains("ipam.network_name"), "{reply:?}");
        let del = run(bin(), &call("DEL", &c, &c), &conf);
        assert_eq!(del.code, 0, "{name:?}: {del:?}");
    }
    let extra = json!({"network_name": "a b", "node_slice_size": "/28"});
    let conf = netconf("named", &ipam("10.91.8.0/24", &kubeconfig, extra));
    let reply = run(bin(), &call("ADD", "sliced", "sliced"), &conf);
    assert_eq!(reply.cni_code(), 7, "{reply:?}");
    assert!(
        reply.stdout.contains("no NodeSlicePool can be named"),
        "{reply:?}"
    );
    assert_eq!(ns.list("ippools"), Vec::<Value>::new());
    assert_eq!(ns.list(RESERVATIONS), Vec::<Value>::new());
    let extra = json!({"network_name": "Blue.Net", "enable_overlapping_ranges": true});
    let conf = netconf("named", &ipam("10.91.9.0/24", &kubeconfig, extra));
    let reply = run(bin(), &call("ADD", "good", "good"), &conf);
    assert_eq!(reply.ips(), ["10.91.9.1"], "{reply:?}");
    assert!(ns.get("ippools", "blue.net-10.91.9.0-24").is_some());
    assert!(ns.get(RESERVATIONS, "blue.net-10.91.9.1").is_some());
}

/// A fake API server holding `pools` (IPPools of the installation's namespace), and its
/// kubeconfig in a directory of its own.
fn server_with_pools(pools: &[Value]) -> (FakeApiServer, tempfile::TempDir, PathBuf) {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    for pool in pools {
        server.create("ippools", NS, pool.clone());
    }
    (server, dir, kubeconfig)
}

fn upstream_pool(name: &str, range: &str, keys: &[u128]) -> Value {
    let allocations: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| {
            (
                k.to_string(),
                json!({"id": format!("go-{k}"), "podref": format!("legacy/pod-{k}"), "ifname": "net1"}),
            )
        })
        .collect();
    json!({
        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"range": range, "allocations": allocations},
    })
}

#[test]
fn pools_written_by_upstream_are_honoured() {
    let plane = real_cluster!();
    let ns = plane.namespace("pools-written-by-upstream-are-honoured");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    // Offsets 1..=40 and a few scattered ones are held by the Go binary.
    let mut held: Vec<u128> = (1..=40).collect();
    held.extend([42, 44, 50, 61]);
    ns.create(
        "ippools",
        upstream_pool("upnet-10.90.0.0-26", "10.90.0.0/26", &held),
    );
    let conf = netconf(
        "upstream",
        &ipam(
            "10.90.0.0/26",
            &kubeconfig,
            json!({"network_name": "upnet"}),
        ),
    );
    let free = 62 - held.len();
    let mut got = BTreeSet::new();
    for i in 0..free {
        let c = format!("rust-{i}");
        let reply = run(bin(), &call("ADD", &c, &c), &conf);
        assert_eq!(reply.code, 0, "{reply:?}");
        let ip: std::net::Ipv4Addr = reply.ips()[0].parse().unwrap();
        let offset = (u32::from(ip) - u32::from(std::net::Ipv4Addr::new(10, 90, 0, 0))) as u128;
        assert!(
            !held.contains(&offset),
            "{ip} belongs to an upstream allocation"
        );
        assert!(got.insert(offset));
    }
    let reply = run(bin(), &call("ADD", "one-too-many", "one-too-many"), &conf);
    assert_eq!(reply.cni_code(), 100, "{reply:?}");
    // The upstream entries are untouched and ours are in upstream's format.
    let pool = ns.get("ippools", "upnet-10.90.0.0-26").unwrap();
    let allocations = pool["spec"]["allocations"].as_object().unwrap();
    assert_eq!(allocations.len(), 62);
    assert_eq!(allocations["42"]["id"], "go-42");
    let ours = allocations.values().find(|a| a["id"] == "rust-0").unwrap();
    assert_eq!(ours["podref"], "default/rust-0");
    assert_eq!(ours["ifname"], "net1");
}

/// Upstream versions before interface names wrote entries with no `ifname`, and released
/// them by container alone: after a migration, the runtime's DEL of such a pod (which names
/// its interface) frees it, and a CHECK finds it.
#[test]
fn an_entry_without_an_interface_name_is_its_containers() {
    let plane = real_cluster!();
    let ns = plane.namespace("an-entry-without-an-interface-name");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let mut pool = upstream_pool("10.93.0.0-28", "10.93.0.0/28", &[3, 4]);
    for key in ["3", "4"] {
        pool["spec"]["allocations"][key]
            .as_object_mut()
            .unwrap()
            .remove("ifname");
    }
    ns.create("ippools", pool);
    let conf = netconf("old", &ipam("10.93.0.0/28", &kubeconfig, json!({})));
    let check = run(bin(), &call("CHECK", "go-3", "pod-3"), &conf);
    assert_eq!(check.code, 0, "{check:?}");
    let del = run(bin(), &call("DEL", "go-3", "pod-3"), &conf);
    assert_eq!(del.code, 0, "{del:?}");
    let pool = ns.get("ippools", "10.93.0.0-28").unwrap();
    let left: Vec<&String> = pool["spec"]["allocations"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(left, ["4"], "the DEL of go-3 freed {pool}");
}

/// At `log_level: debug` the log is the plugin's: the HTTP and TLS libraries' debug events (a
/// span per request, each handshake's steps) are left out; their warnings would stay.
#[test]
fn a_debug_log_holds_the_plugins_events_not_the_libraries() {
    let plane = real_cluster!();
    let ns = plane.namespace("a-debug-log-holds-the-plugins-events");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let debug = json!({"log_level": "debug"});
    let conf = netconf("logged", &ipam("10.94.0.0/28", &kubeconfig, debug));
    let add = run(bin(), &call("ADD", "logged-1", "pod-1"), &conf);
    assert_eq!(add.code, 0, "{add:?}");
    assert!(add.stderr.contains("allocated"), "{add:?}");
    let lines: Vec<&str> = add.stderr.lines().collect();
    assert!(
        lines.len() < 10 && !add.stderr.contains("http.method"),
        "{lines:#?}"
    );
}

/// An address held twice already (its reservation lost, then taken through an overlapping
/// range) is not handed on to the first holder's new sandbox: its repeated ADD is refused (code
/// 101), and the runtime's DEL of it frees its entry and leaves the other's reservation.
#[test]
fn a_repeated_add_never_hands_on_an_address_another_holds_the_reservation_of() {
    let plane = real_cluster!();
    let ns = plane.namespace("a-repeated-add-never-hands-on");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let wide = netconf("wide", &ipam("10.95.0.0/24", &kubeconfig, json!({})));
    let narrow = netconf("narrow", &ipam("10.95.0.0/28", &kubeconfig, json!({})));
    let first = run(bin(), &call("ADD", "p-1", "p"), &wide);
    assert_eq!(first.ips(), ["10.95.0.1"], "{first:?}");
    // The reservation is lost (a Go DEL that deletes without looking, an admin), and an
    // overlapping range hands the address out again.
    assert!(ns.delete(RESERVATIONS, "10.95.0.1"));
    let other = run(bin(), &call("ADD", "q-1", "q"), &narrow);
    assert_eq!(other.ips(), ["10.95.0.1"], "{other:?}");
    // Pod p's new sandbox.
    let again = run(bin(), &call("ADD", "p-2", "p"), &wide);
    assert_eq!(again.cni_code(), 101, "{again:?}");
    assert_eq!(run(bin(), &call("DEL", "p-2", "p"), &wide).code, 0);
    let reservation = ns.get(RESERVATIONS, "10.95.0.1").expect("q's reservation");
    assert_eq!(reservation["spec"]["containerid"], "q-1");
    let pool = ns.get("ippools", "10.95.0.0-24").unwrap();
    assert_eq!(pool["spec"]["allocations"], json!({}), "{pool}");
}

/// A pod's new sandbox keeps the pod's address (a StatefulSet's pod re-created under its name):
/// its reservation is the new container's from then on, so the old sandbox's late DEL leaves it,
/// and the new sandbox's DEL frees it.
#[test]
fn a_pods_new_sandbox_takes_its_reservation_over() {
    let plane = real_cluster!();
    let ns = plane.namespace("a-pods-new-sandbox-takes-over");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let conf = netconf("web", &ipam("10.96.0.0/28", &kubeconfig, json!({})));
    assert_eq!(
        run(bin(), &call("ADD", "w-1", "w"), &conf).ips(),
        ["10.96.0.1"]
    );
    let again = run(bin(), &call("ADD", "w-2", "w"), &conf);
    assert_eq!(again.ips(), ["10.96.0.1"], "{again:?}");
    let reservation = ns.get(RESERVATIONS, "10.96.0.1").unwrap();
    assert_eq!(reservation["spec"]["containerid"], "w-2", "{reservation}");
    assert_eq!(run(bin(), &call("DEL", "w-1", "w"), &conf).code, 0);
    assert!(ns.get(RESERVATIONS, "10.96.0.1").is_some());
    assert_eq!(run(bin(), &call("DEL", "w-2", "w"), &conf).code, 0);
    assert!(ns.get(RESERVATIONS, "10.96.0.1").is_none());
    let pool = ns.get("ippools", "10.96.0.0-28").unwrap();
    assert_eq!(pool["spec"]["allocations"], json!({}), "{pool}");
}

/// Keys written by hand (`007`, `+8`) hold their addresses as Go reads them: no other pod gets
/// them, the holder's new sandbox keeps its address under the key as stored (a write under `7`
/// would find no entry, and every ADD of the pod would fail), and its DEL frees it.
#[test]
fn keys_written_by_hand_hold_their_addresses_for_their_pods() {
    let plane = real_cluster!();
    let ns = plane.namespace("keys-written-by-hand");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let entry = |id: &str, pod: &str| json!({"id": id, "podref": pod, "ifname": "net1"});
    let mut pool = upstream_pool("10.97.0.0-28", "10.97.0.0/28", &[]);
    pool["spec"]["allocations"] = json!({
        "007": entry("old", "default/w"),
        "+8": entry("v-1", "default/v"),
    });
    ns.create("ippools", pool);
    let conf = netconf("by-hand", &ipam("10.97.0.0/28", &kubeconfig, json!({})));
    let again = run(bin(), &call("ADD", "new", "w"), &conf);
    assert_eq!(again.ips(), ["10.97.0.7"], "{again:?}");
    let pool = ns.get("ippools", "10.97.0.0-28").unwrap();
    let allocations = &pool["spec"]["allocations"];
    assert_eq!(allocations["007"]["id"], "new", "{pool}");
    assert_eq!(allocations["+8"]["id"], "v-1", "{pool}");
    assert_eq!(allocations.as_object().unwrap().len(), 2, "{pool}");
    for i in 1..=12 {
        let c = format!("other-{i}");
        let reply = run(bin(), &call("ADD", &c, &c), &conf);
        let ip = &reply.ips()[0];
        assert!(
            !["10.97.0.7", "10.97.0.8"].contains(&ip.as_str()),
            "{reply:?}"
        );
    }
    assert_eq!(run(bin(), &call("DEL", "new", "w"), &conf).code, 0);
    let pool = ns.get("ippools", "10.97.0.0-28").unwrap();
    assert!(pool["spec"]["allocations"].get("007").is_none(), "{pool}");
}

/// A pod whose entry was taken over by its new sandbox while its reservation kept naming the old
/// container (upstream's binary, or a build before reservations followed, left it so): the new
/// sandbox's DEL frees the reservation with the entry, which nothing else would.
#[test]
fn a_reservation_left_naming_the_pods_old_sandbox_goes_with_its_entry() {
    let plane = real_cluster!();
    let ns = plane.namespace("a-reservation-left-naming");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let conf = netconf("left", &ipam("10.98.0.0/28", &kubeconfig, json!({})));
    let mut pool = upstream_pool("10.98.0.0-28", "10.98.0.0/28", &[]);
    pool["spec"]["allocations"]["1"] =
        json!({"id": "w-2", "podref": "default/w", "ifname": "net1"});
    ns.create("ippools", pool);
    ns.create(
        RESERVATIONS,
        json!({
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "OverlappingRangeIPReservation",
            "metadata": {"name": "10.98.0.1"},
            "spec": {"containerid": "w-1", "podref": "default/w", "ifname": "net1"},
        }),
    );
    assert_eq!(run(bin(), &call("DEL", "w-2", "w"), &conf).code, 0);
    assert!(ns.get(RESERVATIONS, "10.98.0.1").is_none());
    let pool = ns.get("ippools", "10.98.0.0-28").unwrap();
    assert_eq!(pool["spec"]["allocations"], json!({}), "{pool}");
}

/// The old sandbox's DEL has removed its entry and is deleting the reservation when the pod's
/// new sandbox takes the same address: the new sandbox keeps the reservation (taking it over
/// changes it, and the old DEL's delete, conditional on the version it read, is refused). On
/// the fake API server, whose gate holds the old DEL's delete until the new ADD is done.
#[test]
fn a_release_of_the_old_sandbox_leaves_the_reservation_its_new_sandbox_took() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let conf = netconf("taken", &ipam("10.105.0.0/28", &kubeconfig, json!({})));
    assert_eq!(
        run(bin(), &call("ADD", "w-1", "w"), &conf).ips(),
        ["10.105.0.1"]
    );
    server.close_gate("DELETE", RESERVATIONS);
    let (old_del, new_add) = std::thread::scope(|s| {
        let old_del = s.spawn(|| run(bin(), &call("DEL", "w-1", "w"), &conf));
        let held = held_within(Duration::from_secs(30), || server.waiting_at_gate() > 0);
        if !held {
            server.open_gate();
        }
        assert!(
            held,
            "the old sandbox's DEL never reached the gate on reservation deletes"
        );
        let new_add = run(bin(), &call("ADD", "w-2", "w"), &conf);
        server.open_gate();
        (old_del.join().unwrap(), new_add)
    });
    assert_eq!(old_del.code, 0, "{old_del:?}");
    assert_eq!(new_add.ips(), ["10.105.0.1"], "{new_add:?}");
    let reservation = server.get(RESERVATIONS, NS, "10.105.0.1");
    let holder = reservation.map(|r| r["spec"]["containerid"].clone());
    assert_eq!(holder, Some(json!("w-2")));
    assert_consistent(
        &server.list("ippools", NS),
        &server.list(RESERVATIONS, NS),
        "",
    );
}

/// An old reservation without an interface name (upstream's before interface names) is not
/// taken for this ADD's own: the pod's other interface holds the address through it.
#[test]
fn an_old_reservation_of_the_pods_other_interface_is_not_adopted() {
    let plane = real_cluster!();
    let ns = plane.namespace("an-old-reservation-is-not-adopted");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    ns.create(
        RESERVATIONS,
        json!({
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "OverlappingRangeIPReservation",
            "metadata": {"name": "10.97.0.1"},
            "spec": {"containerid": "old", "podref": "default/p"},
        }),
    );
    let conf = netconf("second", &ipam("10.97.0.0/28", &kubeconfig, json!({})));
    let mut add = call("ADD", "new", "p");
    add.ifname = "net2";
    let reply = run(bin(), &add, &conf);
    assert_eq!(reply.ips(), ["10.97.0.2"], "{reply:?}");
    let old = ns.get(RESERVATIONS, "10.97.0.1").unwrap();
    assert_eq!(old["spec"]["containerid"], "old");
}

#[test]
fn ipv6_offsets_beyond_two_to_the_63() {
    let plane = real_cluster!();
    let ns = plane.namespace("ipv6-offsets-beyond-two-to-the-63");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let high = (1u128 << 63) + 1;
    ns.create(
        "ippools",
        upstream_pool("fd00-0-0-7---64", "fd00:0:0:7::/64", &[high]),
    );
    let conf = netconf(
        "v6",
        &ipam(
            "fd00:0:0:7::/64",
            &kubeconfig,
            json!({"range_start": "fd00:0:0:7:8000::1", "range_end": "fd00:0:0:7:8000::2"}),
        ),
    );
    // While Go binaries write the pools, nothing at or beyond 2^63, which they would drop: a
    // range wholly beyond is exhausted, saying why.
    let flat = go_present_flat_file(dir.path());
    let with_go = with_flat_file(&flat, call("ADD", "v6-a", "v6-a"));
    let reply = run(bin(), &with_go, &conf);
    assert_eq!(reply.cni_code(), 100, "{reply:?}");
    assert!(reply.stdout.contains("go_whereabouts"), "{reply:?}");
    let reply = run(bin(), &call("ADD", "v6-a", "v6-a"), &conf);
    let want: std::net::Ipv6Addr = "fd00:0:0:7:8000::2".parse().unwrap();
    assert_eq!(reply.ips().len(), 1, "{reply:?}");
    assert_eq!(reply.ips()[0].parse::<std::net::Ipv6Addr>().unwrap(), want);
    let pool = ns.get("ippools", "fd00-0-0-7---64").unwrap();
    assert!(
        pool["spec"]["allocations"][(high + 1).to_string()].is_object(),
        "{pool}"
    );
    let reply = run(bin(), &call("ADD", "v6-b", "v6-b"), &conf);
    assert_eq!(reply.cni_code(), 100, "{reply:?}");
    // An invalid upstream name (range ::/126 gives ---126) gets a valid, deterministic one.
    let conf = netconf("v6zero", &ipam("::/126", &kubeconfig, json!({})));
    let reply = run(bin(), &call("ADD", "zero", "zero"), &conf);
    assert_eq!(reply.code, 0, "{reply:?}");
    assert!(ns.get("ippools", "0---126").is_some());
}

/// An operator command shows what went wrong on its way, beside its answer: the refused
/// requests of a release that fails are logged on its stderr before its one-line error. On the
/// fake API server, which refuses the deletes on demand.
#[test]
fn an_operator_command_shows_what_went_wrong_on_its_way() {
    let (server, dir, kubeconfig) = server_with_pools(&[]);
    let conf = netconf("ops", &ipam("10.123.0.0/24", &kubeconfig, json!({})));
    let add = run(bin(), &call("ADD", "held", "held"), &conf);
    assert_eq!(add.ips(), ["10.123.0.1"], "{add:?}");
    let conf_path = dir.path().join("ops.conf");
    std::fs::write(&conf_path, &conf).unwrap();
    server.fail_next("DELETE", RESERVATIONS, 1000);
    let out = std::process::Command::new(bin())
        .env_clear()
        .env(cni::trust::FLAT_FILE_ENV, cni::trust::test_flat_file())
        .args(["release", "10.123.0.1", "--force", "--config"])
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let (error, log) = lines.split_last().unwrap();
    assert!(
        error.starts_with("whereabouts: cannot release 10.123.0.1"),
        "{out:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains(" ERROR ") && l.contains("500")),
        "{out:?}"
    );
}

fn failure(server: &FakeApiServer, conf: &str, what: &str) -> Reply {
    let reply = run(bin(), &quick(call("ADD", "victim", "victim")), conf);
    assert_eq!(reply.cni_code(), 11, "{what}: {reply:?}");
    assert_consistent(
        &server.list("ippools", NS),
        &server.list(RESERVATIONS, NS),
        "",
    );
    reply
}

/// A failed ADD takes its writes back; when its pool entry cannot be removed, its reservation
/// stays with it, or an overlapping range would hand the address out again. On the fake API
/// server, which fails the removal on demand.
#[test]
fn an_entry_a_failed_add_cannot_take_back_keeps_its_reservation() {
    // The second range is full: the ADD fails there, after its first range's pool is created.
    let (server, _dir, kubeconfig) =
        server_with_pools(&[upstream_pool("10.102.0.0-30", "10.102.0.0/30", &[1, 2])]);
    let ranges = json!({"ipRanges": [{"range": "10.102.0.0/30"}]});
    let conf = netconf("undo", &ipam("10.101.0.0/24", &kubeconfig, ranges));
    // The pool is created, so the only update is the removal that takes the entry back.
    server.fail_next("PATCH", "ippools", 4);
    let reply = run(bin(), &call("ADD", "x", "x"), &conf);
    assert_ne!(reply.code, 0, "{reply:?}");
    let pool = server.get("ippools", NS, "10.101.0.0-24");
    let pool = pool.unwrap_or_else(|| panic!("no pool created: {reply:?}"));
    let entry = &pool["spec"]["allocations"]["1"];
    assert_eq!(entry["id"], "x", "{pool}");
    let reservation = server.get(RESERVATIONS, NS, "10.101.0.1");
    assert!(
        reservation.is_some(),
        "the standing entry lost its reservation"
    );
    // The runtime's DEL frees both.
    assert_eq!(run(bin(), &call("DEL", "x", "x"), &conf).code, 0);
    assert!(server.get(RESERVATIONS, NS, "10.101.0.1").is_none());
}

/// As above, in a pool whose `spec.range` carries host bits (written by hand or by another
/// tool): its keys count from that address, so the entry's key alone does not name its address.
/// On the fake API server, which fails the removal on demand.
#[test]
fn an_entry_keyed_from_host_bits_a_failed_add_cannot_take_back_keeps_its_reservation() {
    let (server, _dir, kubeconfig) = server_with_pools(&[
        upstream_pool("10.104.0.0-30", "10.104.0.0/30", &[1, 2]),
        upstream_pool("10.103.0.0-24", "10.103.0.4/24", &[]),
    ]);
    let ranges = json!({"ipRanges": [{"range": "10.104.0.0/30"}]});
    let conf = netconf("undo", &ipam("10.103.0.0/24", &kubeconfig, ranges));
    // The entry's write lands but its answer is lost; every later write of the pool fails
    // (the ADD answers "try again"), the removal that takes the entry back among them.
    server.fail_next_after_applying("PATCH", "ippools", 1);
    server.fail_next("PATCH", "ippools", 100);
    let reply = run(bin(), &call("ADD", "x", "x"), &conf);
    assert_eq!(reply.cni_code(), 11, "{reply:?}");
    let pool = server.get("ippools", NS, "10.103.0.0-24").unwrap();
    // Key 0: the address of spec.range, 10.103.0.4.
    assert_eq!(pool["spec"]["allocations"]["0"]["id"], "x", "{pool}");
    let held = pool_ips(&pool);
    assert_eq!(held.len(), 1, "{pool}");
    let name = held[0].to_string();
    assert!(
        server.get(RESERVATIONS, NS, &name).is_some(),
        "the standing entry {name} lost its reservation: {:?}",
        server.list(RESERVATIONS, NS)
    );
}

/// A pool whose `spec.range` carries host bits far into an IPv6 range (`fd00::1:0:0:0/64`) has
/// no key for the 2^48 addresses below that one: the search passes them as one block, and the
/// ADD gets the first address that has a key (one address at a time, it would never end). The
/// pool is written as another tool would.
#[test]
fn a_pool_keyed_from_host_bits_far_into_its_range_is_searched_in_one_step() {
    let plane = real_cluster!();
    let ns = plane.namespace("pool-keyed-from-host-bits");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    ns.create(
        "ippools",
        upstream_pool("fd00---64", "fd00::1:0:0:0/64", &[]),
    );
    let conf = netconf("hostbits", &ipam("fd00::/64", &kubeconfig, json!({})));
    let reply = run(bin(), &call("ADD", "x", "x"), &conf);
    assert_eq!(reply.ips(), ["fd00::1:0:0:0"], "{reply:?}");
}

/// A reservation whose create landed but whose every answer was lost is taken back with the
/// failed ADD: nothing else names it until the controller's orphan pass. On the fake API server,
/// which applies a request and then answers 504.
#[test]
fn a_failed_add_takes_back_a_reservation_whose_create_went_unanswered() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let conf = netconf("unanswered", &ipam("10.104.0.0/24", &kubeconfig, json!({})));
    // The first create lands; it and every retry are answered 504.
    server.fail_next_after_applying("POST", RESERVATIONS, 4);
    let reply = run(bin(), &call("ADD", "x", "x"), &conf);
    assert_eq!(reply.cni_code(), 11, "{reply:?}");
    assert_eq!(server.list(RESERVATIONS, NS), Vec::<Value>::new());
    // The runtime's retry finds the address free and everything agrees.
    let reply = run(bin(), &call("ADD", "x", "x"), &conf);
    assert_eq!(reply.ips(), ["10.104.0.1"], "{reply:?}");
    assert_consistent(
        &server.list("ippools", NS),
        &server.list(RESERVATIONS, NS),
        "",
    );
}

/// A failed ADD that took over the reservation of its pod's earlier sandbox (which holds the
/// address through another range, edited since) gives it back to that sandbox also when the
/// take-over's answer was lost: deleted, the earlier sandbox's entry would stand unguarded and
/// another pod could take the address through the new range. On the fake API server, which
/// applies the take-over and then answers 504.
#[test]
fn a_failed_add_gives_back_a_reservation_whose_take_over_went_unanswered() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let conf = |ranges: &[&str], static_ip: Option<&str>| {
        let mut ipam = ipam(ranges[0], &kubeconfig, json!({}));
        ipam.as_object_mut().unwrap().remove("range");
        ipam["ipRanges"] = ranges.iter().map(|r| json!({"range": r})).collect();
        let mut conf: Value = serde_json::from_str(&netconf("takeover", &ipam)).unwrap();
        if let Some(ip) = static_ip {
            conf["runtimeConfig"] = json!({"ips": [ip]});
        }
        conf.to_string()
    };
    let (old, new, full) = ("10.106.0.0/24", "10.106.0.0/25", "10.106.1.0/30");
    let added = |container: &str, pod: &str, conf: &str| {
        let reply = run(bin(), &call("ADD", container, pod), conf);
        assert_eq!(reply.code, 0, "{reply:?}");
    };
    added("c1", "p", &conf(&[old], Some("10.106.0.9/24")));
    added("f1", "f1", &conf(&[full], None));
    added("f2", "f2", &conf(&[full], None));
    server.fail_next_after_applying("PUT", RESERVATIONS, 1);
    let both = conf(&[new, full], Some("10.106.0.9/25"));
    let reply = run(bin(), &call("ADD", "c2", "p"), &both);
    assert_ne!(reply.code, 0, "{reply:?}");
    let reservation = server.get(RESERVATIONS, NS, "10.106.0.9");
    let holder = reservation
        .as_ref()
        .map(|r| r["spec"]["containerid"].clone());
    assert_eq!(holder, Some(json!("c1")), "{reservation:?}");
}

/// A flat file in `dir` for the fake API server saying Go binaries write the pools, the ADD
/// waiting `sleep_for_race` seconds between choosing and writing.
fn go_present_on_fake(server: &FakeApiServer, dir: &Path, sleep_for_race: u64) -> PathBuf {
    let kubeconfig = server.write_kubeconfig(dir, None);
    let flat = dir.join("whereabouts.conf");
    let settings = json!({"go_whereabouts": "present", "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": kubeconfig}, "allow_insecure_tls": true,
        "sleep_for_race": sleep_for_race});
    std::fs::write(&flat, settings.to_string()).unwrap();
    flat
}

/// Who holds the Go binaries' Lease on `server`, if anyone.
fn go_lease_holder(server: &FakeApiServer) -> Option<String> {
    let lease = server.get("leases", NS, "whereabouts").expect("the Lease");
    let holder = lease["spec"]["holderIdentity"].as_str().map(String::from);
    holder.filter(|h| !h.is_empty())
}

/// While Go binaries may write the pools, an ADD writes only while its hold of their Lease is
/// fresh: a renewal that hangs (a slow server) stops it before a Go binary, which takes the
/// Lease 1.5 s after it last saw it change, could write too. On the fake API server, whose gate
/// holds the renewals.
#[test]
fn an_add_whose_lease_renewals_hang_writes_nothing() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let flat = go_present_on_fake(&server, dir.path(), 2);
    let ipam = json!({"type": "whereabouts", "range": "10.103.0.0/28"});
    let conf = netconf("leased", &ipam);
    server.close_gate("PUT", "leases");
    let mut add = call("ADD", "slow", "slow");
    add.env
        .push(("WHEREABOUTS_FLAT_FILE", flat.display().to_string()));
    let reply = std::thread::scope(|s| {
        // Once the ADD has written its pool, or stopped and gives the Lease up (a second PUT,
        // the first renewal still held), the gate opens: the ADD ends without waiting for its
        // requests' timeouts.
        s.spawn(|| {
            let decided = || {
                let counts = server.requests_by_verb();
                counts.contains_key("POST ippools") || counts.get("PUT leases") >= Some(&2)
            };
            // The ADD waits 2 s before it writes, then each of its requests at most its
            // timeout: a minute without either is a hang, not a slow ADD.
            let held = held_within(Duration::from_secs(60), decided);
            server.open_gate();
            assert!(
                held,
                "within 60 s the ADD neither wrote its pool nor gave the Lease up: {:?}",
                server.requests_by_verb()
            );
        });
        run(bin(), &add, &conf)
    });
    assert_eq!(reply.cni_code(), 11, "{reply:?}");
    assert!(
        reply.json()["msg"].as_str().unwrap().contains("Lease"),
        "{reply:?}"
    );
    let pool = server.get("ippools", NS, "10.103.0.0-28");
    let held = pool.map(|p| p["spec"]["allocations"].clone());
    assert!(held.as_ref().is_none_or(|a| *a == json!({})), "{held:?}");
}

/// A renewal of the Go binaries' Lease that the server applied though its answer was lost (a
/// gateway timing out after the write) meets its own version when retried: the hold goes on,
/// the ADD writes, and the release gives the Lease up (before, the ADD stopped, and the release,
/// a version behind, left the Lease held for four seconds, which every Go binary's and every
/// other process's next operation waited out). On the fake API server, which can lose an answer
/// on demand.
#[test]
fn a_hold_whose_renewal_answer_was_lost_goes_on_and_gives_the_lease_up() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let flat = go_present_on_fake(&server, dir.path(), 1);
    let conf = netconf(
        "leased",
        &json!({"type": "whereabouts", "range": "10.105.0.0/28"}),
    );
    server.fail_next_after_applying("PUT", "leases", 1);
    let reply = run(
        bin(),
        &with_flat_file(&flat, call("ADD", "c1", "p1")),
        &conf,
    );
    assert_eq!(reply.ips(), ["10.105.0.1"], "{reply:?}");
    assert_eq!(go_lease_holder(&server), None, "{reply:?}");
}

/// A taking of the Go binaries' Lease that the server applied though its answer was lost finds
/// the Lease naming its own hold when it looks again, and goes on at once: waiting the hold out
/// (four seconds) would outlast this ADD's deadline (three, with half-second requests). On the
/// fake API server, which can lose an answer on demand.
#[test]
fn a_taking_whose_answer_was_lost_goes_on_at_once() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let flat = go_present_on_fake(&server, dir.path(), 0);
    let conf = netconf(
        "leased",
        &json!({"type": "whereabouts", "range": "10.106.0.0/28"}),
    );
    server.fail_next_after_applying("POST", "leases", 1);
    let mut add = with_flat_file(&flat, call("ADD", "c1", "p1"));
    add.env
        .push(("WHEREABOUTS_KUBERNETES_TIMEOUT", "0.5".into()));
    let reply = run(bin(), &add, &conf);
    assert_eq!(reply.ips(), ["10.106.0.1"], "{reply:?}");
    assert_eq!(go_lease_holder(&server), None);
}

/// While Go binaries may write the pools, a DEL holds their Lease, as their own DEL does: a Go
/// ADD of the pod's new sandbox keeps the old sandbox's reservation (it names the pod) without
/// writing it, then writes its pool entry, so a DEL of the old sandbox between the two would
/// delete the reservation the new entry relies on. A Lease a Go binary holds keeps the DEL
/// waiting: it answers "try again" and removes nothing, then goes through once it is free.
#[test]
fn a_del_waits_for_the_go_binaries_lease() {
    let plane = real_cluster!();
    let ns = plane.namespace("del-go-lease");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let conf = netconf("gonet", &ipam("10.83.0.0/24", &kubeconfig, json!({})));
    let flat = go_present_flat_file(dir.path());
    let as_migrating = |command| with_flat_file(&flat, quick(call(command, "g-1", "g")));
    let added = run(bin(), &as_migrating("ADD"), &conf);
    assert_eq!(added.ips(), ["10.83.0.1"], "{added:?}");
    let go_holds = |holder: Option<&str>| {
        let now = serde_json::to_value(MicroTime(jiff::Timestamp::now())).unwrap();
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "whereabouts"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 60,
                     "acquireTime": now, "renewTime": now},
        });
        ns.apply(&kube_apiserver::resource("leases"), lease);
    };
    let held = || ns.list("ippools").iter().flat_map(pool_ips).count();

    go_holds(Some("go-node-1"));
    let waited = run(bin(), &as_migrating("DEL"), &conf);
    assert_eq!(waited.cni_code(), 11, "{waited:?}");
    assert_eq!(held(), 1, "the DEL removed the entry without the Lease");
    assert_eq!(ns.list(RESERVATIONS).len(), 1);

    go_holds(None);
    let del = run(bin(), &as_migrating("DEL"), &conf);
    assert_eq!(del.code, 0, "{del:?}");
    assert_eq!(held(), 0);
    assert!(ns.list(RESERVATIONS).is_empty());
}

/// While Go binaries may write the pools, a release keeps a reservation whose address the pool
/// holds again for the same pod: a Go ADD of the pod's next sandbox that found the reservation
/// naming its pod kept it unwritten and wrote its own entry (here, between the DEL's removal
/// of the old sandbox's entry and its release of the reservation, as a Go binary that lost
/// sight of the Lease might). On the fake API server, whose gate holds the DEL's reservation
/// read while the test writes that entry.
#[test]
fn a_release_keeps_the_reservation_a_go_add_of_the_pods_next_sandbox_kept() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let conf = netconf("gonet", &ipam("10.105.0.0/24", &kubeconfig, json!({})));
    let flat = go_present_flat_file(dir.path());
    let migrating = |command, container| with_flat_file(&flat, call(command, container, "g"));
    let added = run(bin(), &migrating("ADD", "g-1"), &conf);
    assert_eq!(added.ips(), ["10.105.0.1"], "{added:?}");

    server.close_gate("GET", RESERVATIONS);
    let del = std::thread::scope(|s| {
        let del = s.spawn(|| run(bin(), &migrating("DEL", "g-1"), &conf));
        let held = held_within(Duration::from_secs(30), || server.waiting_at_gate() > 0);
        if held {
            let go_entry = json!([{"op": "add", "path": "/spec/allocations/1",
                "value": {"id": "g-2", "podref": "default/g", "ifname": "net1"}}]);
            let path = format!(
                "/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{NS}/ippools/10.105.0.0-24"
            );
            let (code, body) = server.raw(
                "PATCH",
                &path,
                "application/json-patch+json",
                &go_entry.to_string(),
            );
            assert_eq!(code, 200, "{body}");
        }
        server.open_gate();
        assert!(held, "the DEL never read the reservation");
        del.join().unwrap()
    });
    assert_eq!(del.code, 0, "{del:?}");
    let pool = server.get("ippools", NS, "10.105.0.0-24").unwrap();
    assert_eq!(pool["spec"]["allocations"]["1"]["id"], "g-2", "{pool}");
    let reservation = server.get(RESERVATIONS, NS, "10.105.0.1");
    let reservation = reservation.expect("the next sandbox's address lost its reservation");
    assert_eq!(reservation["spec"]["podref"], "default/g");
}

/// Runs `release` (a GC, a doctor) against an old orphan reservation of `{net}.5` while Go
/// binaries are counted present: the fake's gate holds its taking of the Go Lease while a Go ADD
/// of the orphan's pod writes the address's entry into the pool (the Go binary keeps the
/// reservation unwritten for it). The reservation must stay. Returns what `release` returned.
/// On the fake API server, whose gate holds a request on demand and which backdates the
/// reservation (only old orphans go).
fn release_while_a_go_add_takes_the_orphan<T: Send>(
    server: &FakeApiServer,
    net: &str,
    release: impl FnOnce() -> T + Send,
) -> T {
    let address = format!("{net}.5");
    let orphan = json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
        "kind": "OverlappingRangeIPReservation", "metadata": {"name": address},
        "spec": {"containerid": "o-1", "podref": "default/o", "ifname": "net1"}});
    server.create(RESERVATIONS, NS, orphan);
    server.set_created(RESERVATIONS, NS, &address, "2020-01-01T00:00:00Z");

    server.close_gate("POST", "leases");
    let released = std::thread::scope(|s| {
        let released = s.spawn(release);
        let held = held_within(Duration::from_secs(30), || server.waiting_at_gate() > 0);
        if held {
            let (name, range) = (format!("{net}.0-24"), format!("{net}.0/24"));
            let mut pool = upstream_pool(&name, &range, &[]);
            pool["spec"]["allocations"]["5"] =
                json!({"id": "o-2", "podref": "default/o", "ifname": "net1"});
            server.create("ippools", NS, pool);
        }
        server.open_gate();
        assert!(held, "the Lease was never taken to delete the orphan");
        released.join().unwrap()
    });
    assert!(
        server.get(RESERVATIONS, NS, &address).is_some(),
        "the reservation the pod's next sandbox holds was deleted"
    );
    released
}

/// While Go binaries may write the pools, a GC deletes an orphan reservation under their
/// Lease, and only if no pool holds its address by then.
#[test]
fn a_gc_keeps_an_orphan_reservation_a_go_add_of_its_pod_took_meanwhile() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let mut gc_conf: Value = serde_json::from_str(&netconf(
        "gcnet",
        &ipam("10.106.0.0/24", &kubeconfig, json!({})),
    ))
    .unwrap();
    gc_conf["cni.dev/valid-attachments"] = json!([]);
    let flat = go_present_flat_file(dir.path());
    let gc = with_flat_file(&flat, call("GC", "", ""));
    let reply = release_while_a_go_add_takes_the_orphan(&server, "10.106.0", || {
        run(bin(), &gc, &gc_conf.to_string())
    });
    assert_eq!(reply.code, 0, "{reply:?}");
}

/// A node's GC deletes an old reservation that no pool entry backs only once its pod is gone:
/// a pool entry lost while its pod runs (its IPPool deleted or restored by hand) leaves the
/// reservation the one guard of the pod's address, and the valid list names this node's
/// attachments only. On the fake API server, which backdates the reservations (only old
/// orphans go).
#[test]
fn a_gc_keeps_an_orphan_reservation_whose_pod_runs() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    server.add_pod("default", "alive", "Running");
    let orphans = [
        ("10.108.0.4", ""),
        ("10.108.0.5", "default/alive"),
        ("10.108.0.6", "default/gone"),
    ];
    for (address, pod) in orphans {
        let orphan = json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "OverlappingRangeIPReservation", "metadata": {"name": address},
            "spec": {"containerid": format!("c-{address}"), "podref": pod, "ifname": "net1"}});
        server.create(RESERVATIONS, NS, orphan);
        server.set_created(RESERVATIONS, NS, address, "2020-01-01T00:00:00Z");
    }
    let conf = netconf("gcnet", &ipam("10.108.0.0/29", &kubeconfig, json!({})));
    let mut gc_conf: Value = serde_json::from_str(&conf).unwrap();
    gc_conf["cni.dev/valid-attachments"] = json!([]);
    let reply = run(bin(), &call("GC", "", ""), &gc_conf.to_string());
    assert_eq!(reply.code, 0, "{reply:?}");
    assert!(server.get(RESERVATIONS, NS, "10.108.0.6").is_none());
    assert!(
        server.get(RESERVATIONS, NS, "10.108.0.5").is_some(),
        "the running pod's address lost its guard"
    );
    // Naming no pod, it may be another node's attachment: kept too.
    assert!(server.get(RESERVATIONS, NS, "10.108.0.4").is_some());
    // The range's other addresses go; the guarded ones are never handed out.
    for i in 0..4 {
        let c = format!("new-{i}");
        let reply = run(bin(), &call("ADD", &c, &c), &conf);
        assert_eq!(reply.code, 0, "{reply:?}");
        let ip = reply.ips()[0].clone();
        assert!(
            !["10.108.0.4", "10.108.0.5"].contains(&ip.as_str()),
            "{reply:?}"
        );
    }
    let full = run(bin(), &call("ADD", "one-more", "one-more"), &conf);
    assert_eq!(full.cni_code(), 100, "{full:?}");
}

/// A pool entry's pod reference comes from whoever wrote the pool: one no pod can have
/// (`ns/web/status`) names no pod, and is never put into a request's path (where it read pod
/// `web`'s status). Like an entry naming no pod, no node's GC can tell it is gone: it stays for
/// its runtime's DEL (a runtime outside Kubernetes records its container's name, `web_1/web_1`,
/// for an address in use; freed, it was handed out twice). The live pod's entry stays too.
#[test]
fn a_gc_asks_for_no_object_an_entrys_pod_reference_cannot_name() {
    let plane = real_cluster!();
    let ns = plane.namespace("gc-pod-references-that-name-no-pod");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    ns.add_pod("web", "Running");
    let mut pool = upstream_pool("10.109.0.0-29", "10.109.0.0/29", &[]);
    let entry = |id: &str, pod: String| json!({"id": id, "podref": pod, "ifname": "net1"});
    pool["spec"]["allocations"] = json!({
        "1": entry("c-web", format!("{}/web", ns.name)),
        "2": entry("c-forged", format!("{}/web/status", ns.name)),
    });
    ns.create("ippools", pool);
    let conf = netconf("forged", &ipam("10.109.0.0/29", &kubeconfig, json!({})));
    let mut gc_conf: Value = serde_json::from_str(&conf).unwrap();
    gc_conf["cni.dev/valid-attachments"] = json!([]);
    let gc = Call {
        node: Some("node-a"),
        ..call("GC", "", "")
    };
    let reply = run(bin(), &gc, &gc_conf.to_string());
    assert_eq!(reply.code, 0, "{reply:?}");
    let pool = ns.get("ippools", "10.109.0.0-29").unwrap();
    let left: Vec<String> = pool_ips(&pool).iter().map(|ip| ip.to_string()).collect();
    assert_eq!(left, ["10.109.0.1", "10.109.0.2"], "{pool}");
}

/// `doctor --fix` releases an old orphan reservation as a GC does: while Go binaries may write
/// the pools, under their Lease and only if no pool holds its address by then.
#[test]
fn doctor_keeps_an_orphan_reservation_a_go_add_of_its_pod_took_meanwhile() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let flat = go_present_flat_file(dir.path());
    let out = release_while_a_go_add_takes_the_orphan(&server, "10.107.0", || {
        std::process::Command::new(bin())
            .env_clear()
            .env(cni::trust::FLAT_FILE_ENV, &flat)
            .args(["doctor", "--fix", "--output", "json", "--kubeconfig"])
            .arg(&kubeconfig)
            .output()
            .expect("run whereabouts doctor")
    });
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("held again meanwhile"), "{report}");
}

/// On the fake API server: a real one cannot be made on demand to answer slowly, answer 500s,
/// apply a write and answer 504, or drop its connections.
#[test]
fn slow_failing_or_refusing_servers_give_try_again_and_leave_consistent_objects() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let conf = netconf("faults", &ipam("10.100.0.0/24", &kubeconfig, json!({})));
    // Something allocated before the trouble starts.
    assert_eq!(run(bin(), &call("ADD", "before", "before"), &conf).code, 0);

    server.set_latency(Duration::from_millis(1500));
    let reply = failure(&server, &conf, "latency");
    assert!(
        reply.json()["msg"].as_str().unwrap().contains("within"),
        "{reply:?}"
    );
    server.set_latency(Duration::ZERO);

    server.set_fail_all(true);
    let reply = failure(&server, &conf, "500s");
    assert!(
        reply.json()["msg"]
            .as_str()
            .unwrap()
            .contains("fault injected"),
        "{reply:?}"
    );
    server.set_fail_all(false);

    // The pool write fails after the reservation was made: the reservation is taken back.
    server.fail_next("PATCH", "ippools", 4);
    failure(&server, &conf, "pool write fails");
    assert_eq!(server.list(RESERVATIONS, NS).len(), 1);

    // A DEL removes the pool entry, then deleting the reservation keeps failing (four answers
    // of 500: every retry of the request): the DEL answers 11 and still releases the
    // reservation before it exits, so the runtime's retry, which finds no entry, leaves none.
    assert_eq!(run(bin(), &call("ADD", "gone", "gone"), &conf).code, 0);
    server.fail_next("DELETE", RESERVATIONS, 4);
    let reply = run(bin(), &quick(call("DEL", "gone", "gone")), &conf);
    assert_eq!(reply.cni_code(), 11, "{reply:?}");
    let retried = run(bin(), &quick(call("DEL", "gone", "gone")), &conf);
    assert_eq!(retried.code, 0, "{retried:?}");
    assert_eq!(
        server.list(RESERVATIONS, NS).len(),
        1,
        "only before's is left"
    );

    // The DEL's pool write is applied but its answer lost (a 504): sent again, its test fails.
    // The entry is gone when read again, so the DEL still releases the reservation.
    assert_eq!(run(bin(), &call("ADD", "lost", "lost"), &conf).code, 0);
    server.fail_next_after_applying("PATCH", "ippools", 1);
    let reply = run(bin(), &call("DEL", "lost", "lost"), &conf);
    assert_eq!(reply.code, 0, "{reply:?}");
    assert_eq!(
        server.list(RESERVATIONS, NS).len(),
        1,
        "the reservation of the entry removed by the lost write is released"
    );

    server.set_down(true);
    failure(&server, &conf, "connections dropped");
    server.set_down(false);

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let nowhere = tempfile::tempdir().unwrap();
    let refused =
        fake_apiserver::write_kubeconfig(nowhere.path(), &format!("http://127.0.0.1:{port}"), None);
    let refused_conf = netconf("faults", &ipam("10.100.0.0/24", &refused, json!({})));
    let reply = run(
        bin(),
        &quick(call("ADD", "victim", "victim")),
        &refused_conf,
    );
    assert_eq!(reply.cni_code(), 11, "{reply:?}");
    assert!(
        reply.json()["msg"].as_str().unwrap().contains("refused"),
        "{reply:?}"
    );
    let status = run(bin(), &quick(call("STATUS", "", "")), &refused_conf);
    assert_eq!(status.cni_code(), 50, "{status:?}");

    // Healthy again: the victim gets an address and everything agrees.
    let reply = run(bin(), &call("ADD", "victim", "victim"), &conf);
    assert_eq!(reply.code, 0, "{reply:?}");
    assert_consistent(
        &server.list("ippools", NS),
        &server.list(RESERVATIONS, NS),
        "",
    );
    assert_eq!(server.list(RESERVATIONS, NS).len(), 2);
}

/// The server without the CRDs is a control plane of its own: the shared one has them
/// installed (cluster-wide, so they cannot be taken away from one test).
#[test]
fn status_needs_the_crds() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bare) = kube_apiserver::dedicated_control_plane("without-crds") else {
        return;
    };
    let kubeconfig = bare.namespace("status").kubeconfig(dir.path());
    let conf = netconf("status", &ipam("10.110.0.0/24", &kubeconfig, json!({})));
    let reply = run(bin(), &call("STATUS", "", ""), &conf);
    bare.down();
    assert_eq!(reply.cni_code(), 50, "{reply:?}");
    assert!(reply.json()["msg"]
        .as_str()
        .unwrap()
        .contains("ippools.whereabouts.cni.cncf.io"));

    let plane = real_cluster!();
    let ns = plane.namespace("status-needs-the-crds");
    let kubeconfig = ns.kubeconfig(dir.path());
    let conf = netconf("status", &ipam("10.110.0.0/24", &kubeconfig, json!({})));
    let reply = run(bin(), &call("STATUS", "", ""), &conf);
    assert_eq!(reply.code, 0, "{reply:?}");
    // The kubeconfig context's namespace is where the objects go.
    assert_eq!(run(bin(), &call("ADD", "ns-a", "ns-a"), &conf).code, 0);
    assert!(ns.get("ippools", "10.110.0.0-24").is_some());
    let default_namespace = kube_apiserver::TestNamespace {
        plane,
        name: NS.into(),
    };
    assert!(default_namespace.get("ippools", "10.110.0.0-24").is_none());
}

/// A namespace that does not exist (a typo in the flat file or the kubeconfig's context)
/// answers every list empty, as a fresh one does; STATUS tells them apart and names it, so the
/// runtime does not count on a network whose ADDs all fail.
#[test]
fn status_fails_while_the_namespace_is_missing() {
    let plane = real_cluster!();
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("whereabouts-missing-{}", std::process::id());
    let kubeconfig = plane.admin_kubeconfig(dir.path(), &missing);
    let conf = netconf("missing", &ipam("10.111.0.0/24", &kubeconfig, json!({})));

    let reply = run(bin(), &call("STATUS", "", ""), &conf);
    assert_eq!(reply.cni_code(), 50, "{reply:?}");
    // The namespace comes with the kubeconfig's context: named in the log, not to the runtime.
    let message = reply.json()["msg"].as_str().unwrap().to_string();
    assert!(
        message.contains("the engine's namespace does not exist"),
        "{message}"
    );
    assert!(!message.contains(&missing), "{message}");
    assert!(reply.stderr.contains(&missing), "{reply:?}");
    // The kubeconfig by its field: its path is the admin's, the log's.
    assert!(
        message.contains("(the namespace of kubeconfig <ipam.kubernetes.kubeconfig>)"),
        "{message}"
    );
    assert!(
        !message.contains(&kubeconfig.display().to_string()),
        "{message}"
    );
    let reply = run(bin(), &call("ADD", "ns-missing", "ns-missing"), &conf);
    assert_ne!(reply.code, 0, "{reply:?}");
    assert!(!reply.stdout.contains(&missing), "{reply:?}");
    assert!(reply.stderr.contains(&missing), "{reply:?}");

    let ns = kube_apiserver::TestNamespace {
        plane,
        name: missing,
    };
    ns.apply(
        &kube_apiserver::resource("namespaces"),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns.name}}),
    );
    let reply = run(bin(), &call("STATUS", "", ""), &conf);
    assert_eq!(reply.code, 0, "{reply:?}");
    // The check stored nothing.
    assert!(ns.list("ippools").is_empty());
    assert_eq!(
        run(bin(), &call("ADD", "ns-there", "ns-there"), &conf).code,
        0
    );
    ns.delete("namespaces", &ns.name);
}

/// A NodeSlicePool of /28 slices of `range`, giving each node its slice ("" for a free one).
fn node_slice_pool(name: &str, range: &str, slices: &[(&str, &str)]) -> Value {
    let allocations: Vec<Value> = slices
        .iter()
        .map(|(node, slice)| json!({"nodeName": node, "sliceRange": slice}))
        .collect();
    json!({
        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
        "kind": "NodeSlicePool",
        "metadata": {"name": name},
        "spec": {"range": range, "sliceSize": "/28"},
        "status": {"allocations": allocations},
    })
}

/// A namespace named after `hint` whose NodeSlicePool `name` gives `slices` of `range`, with a
/// kubeconfig for it (in the folder returned, which must outlive it).
fn sliced_namespace(
    plane: &'static kube_apiserver::ControlPlane,
    hint: &str,
    (name, range): (&str, &str),
    slices: &[(&str, &str)],
) -> (kube_apiserver::TestNamespace, tempfile::TempDir, PathBuf) {
    let ns = plane.namespace(hint);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    ns.create("nodeslicepools", node_slice_pool(name, range, slices));
    (ns, dir, kubeconfig)
}

/// A DEL on a node whose slice the configuration does not allocate from (its bounds changed
/// since the ADD, or the network was renumbered and the runtime deletes with the ADD's
/// configuration) succeeds and frees what the node's pool holds for the attachment: a DEL
/// that fails leaves the pod's sandbox for ever in teardown.
#[test]
fn a_del_succeeds_whatever_the_nodes_slice_is_to_its_configuration() {
    let plane = real_cluster!();
    let slices = [("node-a", "10.121.0.0/28"), ("node-b", "10.121.0.16/28")];
    let (ns, _dir, kubeconfig) = sliced_namespace(
        plane,
        "a-del-succeeds-whatever-the-nodes-slice",
        ("bounded", "10.121.0.0/24"),
        &slices,
    );
    let conf = |range: &str, extra: Value| {
        let mut extra = extra;
        extra["network_name"] = "bounded".into();
        extra["node_slice_size"] = "/28".into();
        netconf("bounded", &ipam(range, &kubeconfig, extra))
    };
    let on_a = |command: &'static str, c: &'static str| Call {
        node: Some("node-a"),
        ..call(command, c, c)
    };
    let whole = conf("10.121.0.0/24", json!({}));
    let add = run(bin(), &on_a("ADD", "held"), &whole);
    assert_eq!(add.ips(), ["10.121.0.1"], "{add:?}");
    // The range now starts past node-a's slice: no ADD there, but the DEL frees the entry.
    let bounded = conf("10.121.0.0/24", json!({"range_start": "10.121.0.16"}));
    let refused = run(bin(), &on_a("ADD", "new"), &bounded);
    assert_ne!(refused.code, 0, "{refused:?}");
    for c in ["new", "held"] {
        let del = run(bin(), &on_a("DEL", c), &bounded);
        assert_eq!(del.code, 0, "{del:?}");
    }
    let pool = ns.get("ippools", "bounded-node-a-10.121.0.0-28").unwrap();
    assert!(pool_ips(&pool).is_empty(), "{pool}");
    // Renumbered: the NodeSlicePool follows the new range, the DEL brings the old one.
    let add = run(bin(), &on_a("ADD", "before"), &whole);
    assert_eq!(add.code, 0, "{add:?}");
    let old = conf("10.99.0.0/24", json!({}));
    let del = run(bin(), &on_a("DEL", "old"), &old);
    assert_eq!(del.code, 0, "{del:?}");
    let check = run(bin(), &on_a("CHECK", "before"), &old);
    assert_eq!(check.cni_code(), 102, "{check:?}");
}

/// Without reservations only the NodeSlicePool keeps two nodes' pools apart: an ADD whose
/// node's slice is withdrawn while it writes (the node removed, a new layout) takes its entry
/// back and asks the runtime to try again, since the slice may be another node's by then. On the
/// fake API server, which holds the ADD's pool write while the NodeSlicePool changes: a real
/// server cannot be paused between two requests of one client.
#[test]
fn an_add_whose_slice_is_withdrawn_meanwhile_takes_its_address_back() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let assigned = [("node-a", "10.122.0.0/28"), ("node-b", "10.122.0.16/28")];
    let withdrawn = [("", "10.122.0.0/28"), ("node-b", "10.122.0.16/28")];
    let slices = |given: &[(&str, &str)]| node_slice_pool("loose", "10.122.0.0/24", given);
    server.create("nodeslicepools", NS, slices(&assigned));
    let extra = json!({"network_name": "loose", "node_slice_size": "/28",
                       "enable_overlapping_ranges": false});
    let conf = netconf("loose", &ipam("10.122.0.0/24", &kubeconfig, extra));
    let on_a = |c: &'static str| Call {
        node: Some("node-a"),
        ..call("ADD", c, c)
    };
    let first = run(bin(), &on_a("first"), &conf);
    assert_eq!(first.ips(), ["10.122.0.1"], "{first:?}");
    // The pool exists: the next ADD's write of it is an update, held at the gate.
    server.close_gate("PATCH", "ippools");
    let second = cni::start(bin(), &on_a("second"), &conf);
    let reached = held_within(Duration::from_secs(30), || server.waiting_at_gate() > 0);
    if reached {
        assert!(server.delete_now("nodeslicepools", NS, "loose"));
        server.create("nodeslicepools", NS, slices(&withdrawn));
    }
    server.open_gate();
    let reply = cni::finish(second);
    assert!(reached, "the ADD's write never reached the gate");
    assert_eq!(reply.cni_code(), 11, "{reply:?}");
    assert!(
        reply.stdout.contains("withdrew this node's slice"),
        "{reply:?}"
    );
    let pool = server
        .get("ippools", NS, "loose-node-a-10.122.0.0-28")
        .unwrap();
    assert_eq!(
        pool_holders(&pool),
        ["first"],
        "the withdrawn slice's entry stayed: {pool}"
    );
    // Given its slice back, the runtime's retry gets an address.
    assert!(server.delete_now("nodeslicepools", NS, "loose"));
    server.create("nodeslicepools", NS, slices(&assigned));
    let retried = run(bin(), &on_a("second"), &conf);
    assert_eq!(retried.ips(), ["10.122.0.2"], "{retried:?}");
}

/// A plain network named like a sliced network's node (`slicenet-node-a` beside `slicenet`
/// and its node `node-a`), over node-a's slice, writes the IPPool named like node-a's slice
/// pool. node-a's CNI GC for the sliced network, whose list names none of that network's pods,
/// keeps the entry of its pod running on node-b: the pod holds nothing from node-b's slice, so
/// it is no pod of the sliced network that moved. A pod of the sliced network that moved to
/// node-b, and holds an address from its slice, has its entry freed.
#[test]
fn a_nodes_gc_keeps_a_plain_pools_pod_that_runs_elsewhere() {
    let plane = real_cluster!();
    let slices = [("node-a", "10.122.0.0/28"), ("node-b", "10.122.0.16/28")];
    let (ns, _dir, kubeconfig) = sliced_namespace(
        plane,
        "a-nodes-gc-keeps-a-plain-pools-pod",
        ("slicenet", "10.122.0.0/24"),
        &slices,
    );
    let sliced = netconf(
        "slices",
        &ipam(
            "10.122.0.0/24",
            &kubeconfig,
            json!({"network_name": "slicenet", "node_slice_size": "/28"}),
        ),
    );
    let plain = netconf(
        "plain",
        &ipam(
            "10.122.0.0/28",
            &kubeconfig,
            json!({"network_name": "slicenet-node-a"}),
        ),
    );
    ns.add_pod_on("db-0", "Running", Some("node-b"));
    let add = Call {
        node: Some("node-b"),
        pod: Some((ns.name.as_str(), "db-0")),
        ..call("ADD", "db", "db-0")
    };
    assert_eq!(run(bin(), &add, &plain).code, 0);
    // A pod of the sliced network that did move: re-created on node-b, its ADD there drew
    // from node-b's slice, and its address from node-a's slice is a leak.
    ns.add_pod_on("web-0", "Running", Some("node-b"));
    for (node, container) in [("node-a", "web-a"), ("node-b", "web-b")] {
        let add = Call {
            node: Some(node),
            pod: Some((ns.name.as_str(), "web-0")),
            ..call("ADD", container, "web-0")
        };
        assert_eq!(run(bin(), &add, &sliced).code, 0);
    }
    let shared = "slicenet-node-a-10.122.0.0-28";
    let holders = || {
        let pool = ns.get("ippools", shared).unwrap();
        let entries = pool["spec"]["allocations"].as_object().cloned().unwrap();
        let mut pods: Vec<String> = entries
            .values()
            .map(|e| e["podref"].as_str().unwrap().to_string())
            .collect();
        pods.sort();
        pods
    };
    let (db, web) = (format!("{}/db-0", ns.name), format!("{}/web-0", ns.name));
    assert_eq!(holders(), [db.clone(), web]);
    let mut gc_conf: Value = serde_json::from_str(&sliced).unwrap();
    gc_conf["cni.dev/valid-attachments"] = json!([]);
    let gc = Call {
        node: Some("node-a"),
        ..call("GC", "", "")
    };
    let reply = run(bin(), &gc, &gc_conf.to_string());
    assert_eq!(reply.code, 0, "{reply:?}");
    assert_eq!(holders(), [db], "node-a's GC");
}

#[test]
fn node_slices_from_a_nodeslicepool() {
    let plane = real_cluster!();
    let slices = [
        ("node-a", "10.120.0.0/28"),
        ("node-b", "10.120.0.16/28"),
        ("", "10.120.0.32/28"),
    ];
    let (ns, _dir, kubeconfig) = sliced_namespace(
        plane,
        "node-slices-from-a-nodeslicepool",
        ("slicenet", "10.120.0.0/24"),
        &slices,
    );
    let conf = netconf(
        "slices",
        &ipam(
            "10.120.0.0/24",
            &kubeconfig,
            json!({
                "network_name": "slicenet",
                "node_slice_size": "/28",
                "exclude": ["10.120.0.1/32", "10.120.0.17/32"],
                "gateway": "10.120.0.2",
            }),
        ),
    );
    let on = |node: &'static str, c: &'static str| Call {
        node: Some(node),
        ..call("ADD", c, c)
    };
    let mut got = BTreeSet::new();
    // node-a's slice: .1-.14 usable, minus .1 (excluded) and .2 (gateway): 12 addresses.
    for i in 0..12 {
        let c = format!("a-{i}");
        let reply = run(
            bin(),
            &Call {
                node: Some("node-a"),
                ..call("ADD", &c, &c)
            },
            &conf,
        );
        assert_eq!(reply.code, 0, "{reply:?}");
        let ip: std::net::Ipv4Addr = reply.ips()[0].parse().unwrap();
        let last = ip.octets()[3];
        assert!(
            (3..=14).contains(&last),
            "{ip} is outside node-a's usable slice"
        );
        assert!(got.insert(last));
    }
    let reply = run(bin(), &on("node-a", "a-full"), &conf);
    assert_eq!(reply.cni_code(), 100, "{reply:?}");
    let reply = run(bin(), &on("node-b", "b-0"), &conf);
    let ip = reply.ips()[0].clone();
    assert!(
        ip.starts_with("10.120.0.") && ip != "10.120.0.17",
        "{reply:?}"
    );
    let pool = ns
        .get("ippools", "slicenet-node-a-10.120.0.0-28")
        .expect("node pool");
    assert_eq!(pool["spec"]["range"], "10.120.0.0/28");
    assert_eq!(pool_ips(&pool).len(), 12);
    assert!(ns
        .get("ippools", "slicenet-node-b-10.120.0.16-28")
        .is_some());

    let reply = run(bin(), &on("node-c", "c-0"), &conf);
    assert_ne!(reply.code, 0);
    assert!(
        reply.json()["msg"].as_str().unwrap().contains("node-c"),
        "{reply:?}"
    );

    let reply = run(
        bin(),
        &Call {
            node: Some("node-a"),
            ..call("CHECK", "a-1", "a-1")
        },
        &conf,
    );
    assert_eq!(reply.code, 0, "CHECK in a node slice: {reply:?}");
    let reply = run(
        bin(),
        &Call {
            node: Some("node-a"),
            ..call("DEL", "a-0", "a-0")
        },
        &conf,
    );
    assert_eq!(reply.code, 0, "{reply:?}");
    let pool = ns.get("ippools", "slicenet-node-a-10.120.0.0-28").unwrap();
    assert_eq!(pool_ips(&pool).len(), 11);

    // A CNI GC on node-a lists node-a's attachments only: it frees node-a's stale entry (a-5)
    // and leaves node-b's pool, whose pod is not in node-a's list, as it is.
    let mut gc_conf: serde_json::Value = serde_json::from_str(&conf).unwrap();
    gc_conf["cni.dev/valid-attachments"] = (1..12)
        .filter(|i| *i != 5)
        .map(|i| json!({"containerID": format!("a-{i}"), "ifname": "net1"}))
        .collect();
    let reply = run(
        bin(),
        &Call {
            node: Some("node-a"),
            ..call("GC", "", "")
        },
        &gc_conf.to_string(),
    );
    assert_eq!(reply.code, 0, "{reply:?}");
    let pool = ns.get("ippools", "slicenet-node-a-10.120.0.0-28").unwrap();
    assert_eq!(pool_ips(&pool).len(), 10);
    let pool_b = ns.get("ippools", "slicenet-node-b-10.120.0.16-28").unwrap();
    assert_eq!(
        pool_ips(&pool_b).len(),
        1,
        "node-a's GC touched node-b's pool"
    );

    // Two live pods with addresses of node-a's slice: one runs on node-a, the other now runs
    // on node-b (a StatefulSet's pod re-created there after node-a was lost; its ADD drew from
    // node-b's slice), which nothing else would ever free.
    for (pod, on) in [("stays", "node-a"), ("moved", "node-b")] {
        ns.add_pod_on(pod, "Running", Some(on));
        let add = Call {
            node: Some("node-a"),
            pod: Some((ns.name.as_str(), pod)),
            ..call("ADD", pod, pod)
        };
        assert_eq!(run(bin(), &add, &conf).code, 0);
    }
    let again = Call {
        node: Some("node-b"),
        pod: Some((ns.name.as_str(), "moved")),
        ..call("ADD", "moved-b", "moved-b")
    };
    assert_eq!(run(bin(), &again, &conf).code, 0);
    // The operator's gc (the cleanup controller's judgement and release): the a-* pods do not
    // exist and `moved` runs elsewhere, holding an address from node-b's slice, so all of
    // node-a's slice but `stays` goes, each with its reservation, which is named after the
    // network, not after the node-slice pool's name.
    let gc = std::process::Command::new(bin())
        .args(["gc", "-o", "json", "--kubeconfig"])
        .arg(&kubeconfig)
        .env_clear()
        .env(cni::trust::FLAT_FILE_ENV, cni::trust::test_flat_file())
        .output()
        .unwrap();
    assert!(gc.status.success(), "{gc:?}");
    let freed: Vec<Value> = serde_json::from_slice(&gc.stdout).unwrap();
    assert_eq!(freed.len(), 12, "{freed:?}");
    let moved = format!("{}/moved", ns.name);
    assert!(
        freed.iter().any(|row| row["pod"] == moved.as_str()
            && row["reason"]
                .as_str()
                .is_some_and(|r| r.contains("another node"))),
        "{freed:?}"
    );
    let left: Vec<Value> = ns.list(RESERVATIONS);
    let mut holders: Vec<&str> = left
        .iter()
        .filter_map(|r| r["spec"]["podref"].as_str())
        .collect();
    holders.sort();
    let (stays, moved) = (format!("{}/stays", ns.name), format!("{}/moved", ns.name));
    assert_eq!(holders, [moved.as_str(), stays.as_str()], "{left:?}");
}

#[test]
fn one_node_without_the_agent_every_add_writes_alone_and_still_never_duplicates() {
    let plane = real_cluster!();
    let ns = plane.namespace("one-node-without-the-agent-every-add-writes-a");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let conf = netconf("alone", &ipam("10.130.0.0/24", &kubeconfig, json!({})));
    let env = Vec::new();
    let burst = Burst {
        calls: 40,
        parallel: 10,
        nodes: 1,
        command: "ADD",
    };
    let added = run_burst(bin(), &conf, &burst, &env);
    let mut ips = BTreeSet::new();
    for (i, _, reply) in &added.calls {
        assert_eq!(reply.code, 0, "ADD {i}: {reply:?}");
        assert!(ips.insert(reply.ips()[0].clone()));
    }
    assert_consistent(&ns.list("ippools"), &ns.list(RESERVATIONS), "");
    // A DEL of every other one, then the same ADDs again: the holders keep their addresses.
    for i in (0..40).step_by(2) {
        let c = container(i);
        let reply = run(
            bin(),
            &Call {
                env: env.clone(),
                pod: Some(("bench", "x")),
                ..call("DEL", &c, "x")
            },
            &conf,
        );
        assert_eq!(reply.code, 0, "{reply:?}");
    }
    assert_eq!(ns.list(RESERVATIONS).len(), 20);
    let again = run_burst(bin(), &conf, &burst, &env);
    for (i, _, reply) in &again.calls {
        assert_eq!(reply.code, 0, "ADD {i}: {reply:?}");
        if i % 2 == 1 {
            assert_eq!(reply.ips(), added.calls[*i].2.ips(), "a repeated ADD moved");
        }
    }
    assert_consistent(&ns.list("ippools"), &ns.list(RESERVATIONS), "");
    assert_eq!(ns.list(RESERVATIONS).len(), 40);
}
