//! `whereabouts controller` as a process, with allocations made by the real plugin binary or
//! the store library on the local store, etcd and the Kubernetes engine.
//!
//! Leader election and NodeSlicePool removal run against the real API server
//! (`kube_apiserver`). The rest still runs against the strict fake API server: those tests
//! inject faults (`fail_next`, expired watches) or predate the real fixture; the fake is only
//! for what a real server cannot be made to do.

mod common;
mod etcd_cluster;
mod fake_apiserver;
mod kube_apiserver;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bare, ips, Net};
use fake_apiserver::FakeApiServer;
use serde_json::{json, Value};

const NS: &str = "kube-system";

/// A running controller, stopped when dropped.
struct Controller {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds or `limit` passes; panics with `what` otherwise.
fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Controller {
    /// Starts the controller on the configuration file `conf` reading pods through `kubeconfig`.
    fn start(dir: &Path, conf: &Value, kubeconfig: &Path, extra: &[&str]) -> Controller {
        let conf_path = dir.join("controller-net.conf");
        std::fs::write(&conf_path, conf.to_string()).unwrap();
        let log = dir.join("controller.log");
        let child = Command::new(common::bin())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WHEREABOUTS_KUBERNETES_SPOOL", dir.join("spool"))
            .args(["controller", "--config"])
            .arg(&conf_path)
            .arg("--pod-kubeconfig")
            .arg(kubeconfig)
            .args(["--listen", "127.0.0.1:0", "--watch-timeout", "5"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the controller");
        let mut c = Controller {
            child,
            port: 0,
            log,
        };
        // The port it picked, from its start-up line.
        wait_for(
            "the controller's start-up line",
            Duration::from_secs(20),
            || {
                if let Ok(Some(status)) = c.child.try_wait() {
                    panic!("controller exited with {status}: {}", c.log());
                }
                let log = c.log();
                let port = log
                    .split("listen=127.0.0.1:")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|p| p.parse().ok());
                if let Some(port) = port {
                    c.port = port;
                }
                port.is_some()
            },
        );
        wait_for("the controller's /healthz", Duration::from_secs(20), || {
            c.get("/healthz").is_some_and(|(code, _)| code == 200)
        });
        // From here on the pod watch sees every change.
        c.wait_metric("whereabouts_watch_resyncs_total{resource=\"pods\"}", 1.0);
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.get(9..12)?.parse().ok()?;
        Some((code, text.split_once("\r\n\r\n")?.1.to_string()))
    }

    /// The value of the first sample whose name and labels start with `series`.
    fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find(|l| !l.starts_with('#') && l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn wait_metric(&self, series: &str, at_least: f64) {
        let start = Instant::now();
        while !self.metric(series).is_some_and(|v| v >= at_least) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {series} >= {at_least}; controller log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// The addresses the local store holds now, with their pods.
fn held(net: &Net) -> Vec<(IpAddr, String)> {
    let store = whereabouts::store::local::open(&net.db()).unwrap();
    let mut out: Vec<(IpAddr, String)> = store
        .allocations(None)
        .unwrap()
        .into_iter()
        .map(|l| (l.ip, l.attachment.pod_ref.unwrap_or_default()))
        .collect();
    out.sort();
    out
}

fn holds(net: &Net, pod: &str) -> bool {
    held(net).iter().any(|(_, p)| p == pod)
}

/// ADD for pod `default/<name>` (recorded with UID `uid-<name>`); its address.
fn add(net: &Net, name: &str) -> String {
    let reply = net.add_pod(&format!("c-{name}"), "net1", &format!("default/{name}"));
    bare(&ips(&reply.ok())[0])
}

fn setup(range: &str, extra: Value) -> (FakeApiServer, Net, PathBuf) {
    let server = FakeApiServer::start();
    let mut ipam = json!({"range": range, "log_level": "verbose"});
    if let (Some(map), Value::Object(more)) = (ipam.as_object_mut(), extra) {
        map.extend(more);
    }
    let net = Net::local(ipam);
    let kubeconfig = server.write_kubeconfig(net.path(), None);
    (server, net, kubeconfig)
}

#[test]
fn deleted_pod_released_within_seconds_with_an_event() {
    let (server, net, kubeconfig) = setup("10.50.0.0/24", json!({}));
    for name in ["a", "b"] {
        server.add_pod_with_uid("default", name, &format!("uid-{name}"), "Running");
    }
    let ip_a = add(&net, "a");
    add(&net, "b");
    let ctl = Controller::start(net.path(), &net.conf, &kubeconfig, &[]);
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    assert!(
        holds(&net, "default/a") && holds(&net, "default/b"),
        "{}",
        ctl.log()
    );

    let deleted = Instant::now();
    assert!(server.delete_now("pods", "default", "a"));
    wait_for(
        "pod a's address to be released",
        Duration::from_secs(10),
        || !holds(&net, "default/a"),
    );
    eprintln!("released {:?} after the deletion", deleted.elapsed());
    assert!(holds(&net, "default/b"), "the live pod keeps its address");
    wait_for("the AddressReleased event", Duration::from_secs(10), || {
        server.list("events", "default").iter().any(|e| {
            e["reason"] == "AddressReleased"
                && e["regarding"]["name"] == "a"
                && e["regarding"]["uid"] == "uid-a"
                && e["note"].as_str().is_some_and(|m| m.contains(&ip_a))
                && e["reportingController"] == "whereabouts-controller"
                && e["eventTime"].as_str().is_some_and(|t| t.ends_with('Z'))
        })
    });
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 1.0);
}

#[test]
fn statefulset_pod_recreated_with_the_same_name_keeps_its_address() {
    let (server, net, kubeconfig) = setup("10.51.0.0/24", json!({}));
    server.add_pod_with_uid("default", "web-0", "uid-web-0", "Running");
    server.add_pod_with_uid("default", "marker", "uid-marker", "Running");
    let ip = add(&net, "web-0");
    add(&net, "marker");
    let ctl = Controller::start(net.path(), &net.conf, &kubeconfig, &[]);
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);

    // Deleted and created again before the controller can look: the new pod's ADD reclaims
    // the same address, so the controller must leave it alone.
    server.recreate_pod("default", "web-0", "uid-web-0-new", "Pending");
    ctl.wait_metric("whereabouts_pod_deletions_total", 1.0);
    // The worker handles jobs in order: once a later deletion is done, this one is too.
    server.delete_now("pods", "default", "marker");
    wait_for("the marker's release", Duration::from_secs(10), || {
        !holds(&net, "default/marker")
    });
    assert!(
        held(&net)
            .iter()
            .any(|(a, p)| a.to_string() == ip && p == "default/web-0"),
        "web-0 lost its address: {}",
        ctl.log()
    );
    assert!(!server
        .list("events", "default")
        .iter()
        .any(|e| e["regarding"]["name"] == "web-0"));
}

#[test]
fn pending_pod_survives_reconciles_and_finished_pod_does_not() {
    let (server, net, kubeconfig) = setup(
        "10.52.0.0/24",
        json!({"reconciler_cron_expression": "@every 1s"}),
    );
    server.add_pod_with_uid("default", "pending", "uid-pending", "Pending");
    server.add_pod_with_uid("default", "done", "uid-done", "Running");
    add(&net, "pending");
    add(&net, "done");
    let ctl = Controller::start(net.path(), &net.conf, &kubeconfig, &[]);
    // The start-up reconcile and at least two scheduled ones.
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 3.0);
    assert!(holds(&net, "default/pending"), "{}", ctl.log());
    assert_eq!(
        ctl.metric("whereabouts_allocations{reason=\"pod_pending\"}"),
        Some(1.0)
    );
    // A pod that ran to completion no longer needs its address.
    server.set_pod_phase("default", "done", "Succeeded");
    wait_for(
        "the finished pod's release",
        Duration::from_secs(10),
        || !holds(&net, "default/done"),
    );
    assert!(holds(&net, "default/pending"));
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_finished\"}", 1.0);
}

#[test]
fn schedule_from_the_whereabouts_config_configmap() {
    let (server, net, kubeconfig) = setup("10.56.0.0/24", json!({}));
    server.put_configmap(
        NS,
        "whereabouts-config",
        json!({"cron-expression": "@every 1s"}),
    );
    let ctl = Controller::start(net.path(), &net.conf, &kubeconfig, &[]);
    // Without the ConfigMap the next run would be up to 15 minutes away.
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 3.0);
}

#[test]
fn allocations_of_pods_deleted_while_down_are_reconciled_at_start() {
    let (server, net, kubeconfig) = setup("10.53.0.0/24", json!({}));
    server.add_pod_with_uid("default", "alive", "uid-alive", "Running");
    add(&net, "alive");
    // Pods that came and went while no controller ran.
    for name in ["gone-1", "gone-2", "gone-3"] {
        server.add_pod_with_uid("default", name, &format!("uid-{name}"), "Running");
        add(&net, name);
        server.delete_now("pods", "default", name);
    }
    // And one whose name is reused by a new pod (another UID): kept.
    server.add_pod_with_uid("default", "reused", "uid-other", "Running");
    add(&net, "reused");
    assert_eq!(held(&net).len(), 5);
    let ctl = Controller::start(net.path(), &net.conf, &kubeconfig, &[]);
    wait_for("the start-up reconcile", Duration::from_secs(20), || {
        held(&net).len() == 2
    });
    assert!(holds(&net, "default/alive") && holds(&net, "default/reused"));
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 3.0);
    assert_eq!(
        ctl.metric("whereabouts_allocations{reason=\"pod_recreated\"}"),
        Some(1.0)
    );
}

#[test]
fn watch_gaps_are_covered_by_a_resync() {
    let (server, net, kubeconfig) = setup("10.54.0.0/24", json!({}));
    server.add_pod_with_uid("default", "p", "uid-p", "Running");
    add(&net, "p");
    let ctl = Controller::start(net.path(), &net.conf, &kubeconfig, &[]);
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    // The history is compacted away: a resumed watch is told 410 Expired, lists again and
    // reconciles, so a deletion it never saw as an event is still caught.
    server.end_watches();
    server.delete_now("pods", "default", "p");
    server.compact();
    wait_for(
        "the release after the resync",
        Duration::from_secs(15),
        || !holds(&net, "default/p"),
    );
}

#[test]
fn a_failed_pod_read_is_retried_by_a_reconcile() {
    // A yearly schedule: no scheduled run interferes.
    let (server, net, kubeconfig) = setup(
        "10.57.0.0/24",
        json!({"reconciler_cron_expression": "0 0 1 1 *"}),
    );
    server.add_pod_with_uid("default", "p", "uid-p", "Running");
    add(&net, "p");
    let ctl = Controller::start(
        net.path(),
        &net.conf,
        &kubeconfig,
        &["--retry-after", "1", "--no-node-slices"],
    );
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    // The next read of a built-in resource (the controller's look at pod p) fails.
    server.fail_next("GET", "", 1);
    server.delete_now("pods", "default", "p");
    wait_for("the release by the retry", Duration::from_secs(15), || {
        !holds(&net, "default/p")
    });
    assert_eq!(
        ctl.metric("whereabouts_errors_total{operation=\"get_pod\"}"),
        Some(1.0)
    );
    assert!(ctl
        .metric("whereabouts_retries_total")
        .is_some_and(|v| v >= 1.0));
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 2.0);
}

#[test]
fn metrics_reflect_a_burst() {
    let (server, net, kubeconfig) = setup("10.55.0.0/26", json!({}));
    let names: Vec<String> = (0..24).map(|i| format!("burst-{i}")).collect();
    for name in &names {
        server.add_pod_with_uid("default", name, &format!("uid-{name}"), "Running");
    }
    let ctl = Controller::start(net.path(), &net.conf, &kubeconfig, &[]);
    std::thread::scope(|s| {
        for chunk in names.chunks(6) {
            let net = &net;
            s.spawn(move || {
                for name in chunk {
                    add(net, name);
                }
            });
        }
    });
    let pool = "whereabouts_pool_used{pool=\"10.55.0.0-26\",range=\"10.55.0.0/26\"}";
    for name in &names[..10] {
        server.delete_now("pods", "default", name);
    }
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 10.0);
    // Pool gauges are set by the work that read the store (this batch), not by the scrape.
    wait_for("the pool gauges", Duration::from_secs(10), || {
        ctl.metric(pool) == Some(14.0)
    });
    assert_eq!(
        ctl.metric("whereabouts_pool_size{pool=\"10.55.0.0-26\""),
        Some(62.0)
    );
    assert_eq!(
        ctl.metric("whereabouts_pool_free{pool=\"10.55.0.0-26\""),
        Some(48.0)
    );
    assert_eq!(ctl.metric("whereabouts_pod_deletions_total"), Some(10.0));
    assert!(ctl
        .metric("whereabouts_events_total")
        .is_some_and(|v| v >= 10.0));
    assert!(ctl
        .metric("whereabouts_last_reconcile_duration_seconds")
        .is_some());
}

/// The NodeSlicePool's slice per node ("" for free slices).
fn slices(server: &FakeApiServer, name: &str) -> Vec<(String, String)> {
    server
        .get("nodeslicepools", NS, name)
        .map(|p| {
            p["status"]["allocations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|a| {
                    (
                        a["nodeName"].as_str().unwrap_or_default().to_string(),
                        a["sliceRange"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn slice_of(server: &FakeApiServer, pool: &str, node: &str) -> Option<String> {
    slices(server, pool)
        .into_iter()
        .find(|(n, _)| n == node)
        .map(|(_, s)| s)
}

#[test]
fn node_slices_follow_nodes_ipv4_and_ipv6() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    server.add_node("node-a");
    server.add_node("node-b");
    let v4 = json!({"cniVersion": "0.3.1", "name": "slices-v4", "type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "10.60.0.0/24", "node_slice_size": "/26",
                 "network_name": "blue",
                 "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}});
    let v6 = json!({"cniVersion": "0.3.1", "name": "slices-v6", "plugins": [{"type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "fd00:60::/64", "node_slice_size": "80"}}]});
    server.add_nad("default", "blue", &v4);
    server.add_nad("other", "v6", &v6);
    // The controller's own store: the Kubernetes engine on the same server.
    let conf = json!({"name": "controller", "ipam": {"type": "whereabouts",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}, "log_level": "verbose"}});
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    wait_for(
        "both pools with both nodes",
        Duration::from_secs(20),
        || {
            slice_of(&server, "blue", "node-b").is_some()
                && slice_of(&server, "slices-v6", "node-b").is_some()
        },
    );
    assert_eq!(
        slice_of(&server, "blue", "node-a").as_deref(),
        Some("10.60.0.0/26")
    );
    assert_eq!(
        slice_of(&server, "blue", "node-b").as_deref(),
        Some("10.60.0.64/26")
    );
    assert_eq!(slices(&server, "blue").len(), 4, "every slice listed");
    let pool = server.get("nodeslicepools", NS, "blue").unwrap();
    assert_eq!(
        pool["spec"],
        json!({"range": "10.60.0.0/24", "sliceSize": "/26"})
    );
    assert_eq!(
        slice_of(&server, "slices-v6", "node-a").as_deref(),
        Some("fd00:60::/80")
    );
    assert_eq!(
        slice_of(&server, "slices-v6", "node-b").as_deref(),
        Some("fd00:60:0:0:1::/80")
    );
    assert_eq!(
        slices(&server, "slices-v6").len(),
        2,
        "a large range lists assigned slices only"
    );

    // The plugin allocates from its node's slice.
    let add_on = |node: &'static str, pod: &'static str| {
        let reply = fake_apiserver::cni::run(
            Path::new(common::bin()),
            &fake_apiserver::cni::Call {
                command: "ADD",
                container: pod,
                ifname: "net1",
                pod: Some(("default", pod)),
                node: Some(node),
                env: vec![],
            },
            &v4.to_string(),
        );
        assert_eq!(reply.code, 0, "{reply:?}");
        reply.ips()[0]
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .octets()[3]
    };
    server.add_pod("default", "on-b", "Running");
    assert!(
        (65..=126).contains(&add_on("node-b", "on-b")),
        "not from node-b's slice"
    );
    server.add_pod("default", "on-a", "Running");
    assert!(
        (1..=62).contains(&add_on("node-a", "on-a")),
        "not from node-a's slice"
    );

    // node-a leaves: its slices are freed, node-b keeps its own.
    server.remove_node("node-a");
    wait_for("node-a's slices freed", Duration::from_secs(10), || {
        slice_of(&server, "blue", "node-a").is_none()
            && slice_of(&server, "slices-v6", "node-a").is_none()
    });
    assert_eq!(
        slice_of(&server, "blue", "node-b").as_deref(),
        Some("10.60.0.64/26")
    );
    // node-c joins while node-a's pool still holds on-a's address: it gets a slice nobody's
    // addresses are in. The IPv6 slice of node-a held nothing, so node-c takes it.
    server.add_node("node-c");
    wait_for("node-c's slices", Duration::from_secs(10), || {
        slice_of(&server, "blue", "node-c").is_some()
            && slice_of(&server, "slices-v6", "node-c").is_some()
    });
    assert_eq!(
        slice_of(&server, "blue", "node-c").as_deref(),
        Some("10.60.0.128/26")
    );
    assert_eq!(
        slice_of(&server, "slices-v6", "node-c").as_deref(),
        Some("fd00:60::/80")
    );
    assert_eq!(
        slice_of(&server, "slices-v6", "node-b").as_deref(),
        Some("fd00:60:0:0:1::/80")
    );
    // Once on-a is gone and its address freed, the slice is free for the next node.
    server.delete_now("pods", "default", "on-a");
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 1.0);
    server.add_node("node-d");
    wait_for("node-d's slice", Duration::from_secs(10), || {
        slice_of(&server, "blue", "node-d").is_some()
    });
    assert_eq!(
        slice_of(&server, "blue", "node-d").as_deref(),
        Some("10.60.0.0/26")
    );
    assert_eq!(
        ctl.metric("whereabouts_node_slices_assigned{nodeslicepool=\"blue\"}"),
        Some(3.0)
    );
}

#[test]
fn kubernetes_engine_pool_entries_and_reservations_released() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let ipam = json!({"type": "whereabouts", "range": "10.70.0.0/24", "log_level": "verbose",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}});
    let conf = json!({"cniVersion": "1.1.0", "name": "k8snet", "type": "macvlan", "ipam": ipam});
    for name in ["k-1", "k-2"] {
        server.add_pod("default", name, "Running");
        let reply = fake_apiserver::cni::run(
            Path::new(common::bin()),
            &fake_apiserver::cni::Call {
                command: "ADD",
                container: &format!("c-{name}"),
                ifname: "net1",
                pod: Some(("default", name)),
                node: None,
                env: vec![],
            },
            &conf.to_string(),
        );
        assert_eq!(reply.code, 0, "{reply:?}");
    }
    // A reservation left behind by a pod long gone, with no pool entry (upstream's drift).
    server.create(
        "overlappingrangeipreservations",
        NS,
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
               "kind": "OverlappingRangeIPReservation",
               "metadata": {"name": "10.70.0.200"},
               "spec": {"podref": "default/long-gone", "containerid": "old"}}),
    );
    // k-2's reservation names a pod long gone (the two drifted apart): it still protects k-2's
    // live address, so it stays.
    let pool = server.get("ippools", NS, "10.70.0.0-24").unwrap();
    let k2_ip = pool["spec"]["allocations"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, a)| a["podref"] == "default/k-2")
        .map(|(offset, _)| format!("10.70.0.{offset}"))
        .unwrap();
    let mut stale = server
        .get("overlappingrangeipreservations", NS, &k2_ip)
        .unwrap();
    stale["spec"]["podref"] = json!("default/drifted-away");
    let (code, body) = server.raw(
        "PUT",
        &format!("/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{NS}/overlappingrangeipreservations/{k2_ip}"),
        "application/json",
        &stale.to_string(),
    );
    assert_eq!(code, 200, "{body}");
    let reservations =
        |server: &FakeApiServer| server.list("overlappingrangeipreservations", NS).len();
    assert_eq!(reservations(&server), 3);
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    wait_for(
        "the orphaned reservation deleted",
        Duration::from_secs(20),
        || reservations(&server) == 2,
    );
    server.delete_now("pods", "default", "k-1");
    wait_for(
        "k-1's pool entry and reservation released",
        Duration::from_secs(10),
        || {
            let pool = server.get("ippools", NS, "10.70.0.0-24").unwrap();
            pool["spec"]["allocations"]
                .as_object()
                .is_some_and(|a| a.len() == 1)
                && reservations(&server) == 1
        },
    );
    let left = server.list("overlappingrangeipreservations", NS);
    assert_eq!(left[0]["metadata"]["name"], Value::from(k2_ip));
    ctl.wait_metric(
        "whereabouts_releases_total{reason=\"orphan_reservation\"}",
        1.0,
    );
}

#[test]
fn etcd_engine_deleted_pod_released() {
    if !etcd_cluster::etcd_available() {
        return;
    }
    let cluster = etcd_cluster::Cluster::start(false);
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let conf = json!({"cniVersion": "1.1.0", "name": "etcdnet", "type": "bridge",
        "ipam": {"type": "whereabouts", "datastore": "etcd", "etcd_host": cluster.endpoints(),
                 "range": "10.90.0.0/24", "log_level": "verbose"}});
    for name in ["e-1", "e-2", "e-gone"] {
        server.add_pod_with_uid("default", name, &format!("uid-{name}"), "Running");
        let reply = common::call_with(
            &conf,
            "ADD",
            &format!("c-{name}"),
            "net1",
            &common::pod_args(&format!("default/{name}")),
        );
        reply.ok();
    }
    server.delete_now("pods", "default", "e-gone");
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    let pods_held = || -> Vec<String> {
        let out = Command::new(common::bin())
            .args([
                "allocations",
                "-o",
                "json",
                "--datastore",
                "etcd",
                "--etcd-host",
                &cluster.endpoints(),
            ])
            .output()
            .unwrap();
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let mut pods: Vec<String> = rows
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| r["pod"].as_str().unwrap_or_default().to_string())
            .collect();
        pods.sort();
        pods
    };
    wait_for(
        "the start-up reconcile on etcd",
        Duration::from_secs(20),
        || pods_held() == ["default/e-1", "default/e-2"],
    );
    server.delete_now("pods", "default", "e-1");
    wait_for("e-1's release on etcd", Duration::from_secs(10), || {
        pods_held() == ["default/e-2"]
    });
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 2.0);
}

// ---------------------------------------------------------------- in a pod (the Deployment)

/// The variables the kubelet sets in every container; the port is never reached in these tests.
const POD_ENV: [(&str, &str); 2] = [
    ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
    ("KUBERNETES_SERVICE_PORT", "9"),
];

fn controller_command(pod: bool, args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("controller")
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null());
    if pod {
        cmd.envs(POD_ENV);
    }
    cmd
}

/// Runs to its exit (a start-up failure); its stderr.
fn failed_start(mut cmd: Command) -> String {
    let out = cmd.output().expect("run the controller");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the controller should have stopped: {stderr}"
    );
    stderr
}

#[test]
fn in_a_pod_without_a_kubeconfig_the_store_turns_to_the_service_account() {
    let sa = whereabouts::k8s::cluster::SERVICE_ACCOUNT_DIR;
    if Path::new(sa).exists() {
        // This test process itself runs in a pod: the account would reach a real cluster.
        eprintln!("skipped: {sa} exists here");
        return;
    }
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let pods = server.write_kubeconfig(dir.path(), None);
    let datastore = ["--datastore", "kubernetes", "--pod-kubeconfig"].map(std::ffi::OsStr::new);
    let args = [&datastore[..], &[pods.as_os_str()]].concat();

    // As the Deployment runs it: no kubeconfig file anywhere, in a pod. The engine goes for
    // the pod's service account (absent on this machine, so start-up stops, naming it).
    let stderr = failed_start(controller_command(true, &args));
    assert!(
        stderr.contains("service account") && stderr.contains(sa),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot read kubeconfig"), "{stderr}");

    // Outside a pod the same command names the kubeconfig it looked for.
    let stderr = failed_start(controller_command(false, &args));
    assert!(
        stderr.contains("cannot read kubeconfig")
            && stderr.contains(whereabouts::config::DEFAULT_KUBECONFIG),
        "{stderr}"
    );

    // In a pod, a kubeconfig that exists still wins: the controller starts on it.
    let with_file = [
        &args[..],
        &[std::ffi::OsStr::new("--kubeconfig"), pods.as_os_str()],
    ]
    .concat();
    let log = dir.path().join("controller.log");
    let child = controller_command(true, &with_file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut c = Controller {
        child,
        port: 0,
        log,
    };
    wait_for("the controller's start", Duration::from_secs(20), || {
        if let Ok(Some(status)) = c.child.try_wait() {
            panic!("controller exited with {status}: {}", c.log());
        }
        c.log().contains("controller started")
    });
}

#[test]
fn the_plugin_never_falls_back_to_a_service_account() {
    // Even with the kubelet's variables set, a plugin whose kubeconfig is missing fails on it.
    // (The tests' flat file allows kubeconfigs below the temporary folder.)
    let missing = std::env::temp_dir().join("nonexistent-whereabouts/whereabouts.kubeconfig");
    let conf = json!({"cniVersion": "1.0.0", "name": "net", "type": "bridge",
        "ipam": {"type": "whereabouts", "range": "10.90.0.0/24",
                 "kubernetes": {"kubeconfig": missing}}});
    let mut vars = vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/whereabouts-test"),
        ("CNI_IFNAME", "net1"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    vars.extend(POD_ENV);
    let reply = common::run(&vars, &conf.to_string());
    let msg = reply.msg();
    assert!(
        msg.contains("cannot read kubeconfig") && msg.contains(&*missing.to_string_lossy()),
        "{reply:?}"
    );
}

/// Pods that exist (Pending for ever: no kubelet) keep their addresses; the others go.
#[test]
fn a_standby_takes_over_from_a_killed_leader_and_nothing_is_released_twice() {
    use fake_apiserver::harness::{add_request, attachment, config, ipam_json, open};
    let plane = real_cluster!();
    let ns = plane.namespace("ctl-leader-failover");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let ipam = ipam_json("10.71.0.0/24", &kubeconfig, json!({}));
    let cfg = config(&ipam);
    let store = open(&cfg).unwrap();
    let pod_ref = |name: &str| format!("{}/{name}", ns.name);
    for i in 0..5 {
        let name = format!("live-{i}");
        ns.add_pod(&name, "Running");
        store
            .add(&add_request(
                &cfg,
                attachment(&format!("c-{name}"), &pod_ref(&name), "net1"),
            ))
            .unwrap();
    }
    const GONE: usize = 40;
    for i in 0..GONE {
        let name = format!("gone-{i}");
        store
            .add(&add_request(
                &cfg,
                attachment(&format!("c-{name}"), &pod_ref(&name), "net1"),
            ))
            .unwrap();
    }
    let conf = json!({"name": "controller", "ipam": ipam});
    let lease = ["--lease-duration", "4"];
    for sub in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let first = Controller::start(&dir.path().join("a"), &conf, &kubeconfig, &lease);
    let second = Controller::start(&dir.path().join("b"), &conf, &kubeconfig, &lease);
    let leads = |c: &Controller| c.metric("whereabouts_leader") == Some(1.0);
    wait_for("a leader", Duration::from_secs(20), || {
        leads(&first) || leads(&second)
    });
    let (leader, standby) = if leads(&first) {
        (first, second)
    } else {
        (second, first)
    };
    assert!(!leads(&standby), "one leader");
    // Killed in the middle of its start-up reconcile: after its first release.
    wait_for(
        "the leader's first release",
        Duration::from_secs(20),
        || leader.log().contains("released"),
    );
    let leader_log = leader.log.clone();
    drop(leader);
    let killed = Instant::now();
    wait_for("the standby to lead", Duration::from_secs(15), || {
        leads(&standby)
    });
    let takeover = killed.elapsed();
    eprintln!("the standby led {takeover:?} after the leader was killed");
    // Within the lease duration (4 s) and one retry period (0.8 s), with slack for the test.
    assert!(takeover < Duration::from_secs(7), "{takeover:?}");
    let held = || -> Vec<String> {
        store
            .allocations(None)
            .unwrap()
            .into_iter()
            .filter_map(|l| l.attachment.pod_ref)
            .collect()
    };
    wait_for(
        "every deleted pod's address released",
        Duration::from_secs(30),
        || held().iter().all(|p| p.contains("/live-")),
    );
    let live = held();
    assert_eq!(live.len(), 5, "no live pod lost its address: {live:?}");
    // Releases are conditional: what the killed leader freed, the new one found gone. Its
    // log may lack the very last release it made; never more than there were.
    let by_leader = std::fs::read_to_string(&leader_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" released") && l.contains("gone-"))
        .count();
    let by_standby = standby
        .metric("whereabouts_releases_total{reason=\"pod_deleted\"}")
        .unwrap_or(0.0) as usize;
    assert!(by_leader >= 1, "the leader released before it died");
    assert!(
        by_leader + by_standby <= GONE,
        "released twice: {by_leader} by the killed leader, {by_standby} by the new one"
    );
}

#[test]
fn node_slice_pools_of_deleted_networks_are_removed() {
    let plane = real_cluster!();
    let ns = plane.namespace("ctl-nad-deleted");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let node = format!("{}-node", ns.name);
    ns.create(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
    );
    let nad = |name: &str, range: &str| {
        json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
               "metadata": {"name": name},
               "spec": {"config": json!({"cniVersion": "0.3.1", "name": name, "type": "macvlan",
                   "ipam": {"type": "whereabouts", "range": range, "node_slice_size": "/26"}})
                   .to_string()}})
    };
    let keep = format!("{}-keep", ns.name);
    let drop_it = format!("{}-drop", ns.name);
    ns.create("network-attachment-definitions", nad(&keep, "10.72.0.0/24"));
    ns.create(
        "network-attachment-definitions",
        nad(&drop_it, "10.73.0.0/24"),
    );
    let conf = json!({"name": "controller", "ipam": {"type": "whereabouts",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}});
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &["--lease-duration", "4"]);
    let has_slice = |pool: &str| {
        ns.get("nodeslicepools", pool).is_some_and(|p| {
            p["status"]["allocations"]
                .as_array()
                .is_some_and(|a| a.iter().any(|s| s["nodeName"] == node.as_str()))
        })
    };
    wait_for("both NodeSlicePools", Duration::from_secs(30), || {
        has_slice(&keep) && has_slice(&drop_it)
    });
    assert!(ns.delete("network-attachment-definitions", &drop_it));
    wait_for(
        "the deleted network's NodeSlicePool gone",
        Duration::from_secs(30),
        || ns.get("nodeslicepools", &drop_it).is_none(),
    );
    assert!(has_slice(&keep), "{}", ctl.log());
    ns.delete("nodes", &node);
}
