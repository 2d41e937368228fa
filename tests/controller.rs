//! `whereabouts controller` as a process, with allocations made by the real plugin binary or
//! the store library on the local store, etcd and the Kubernetes engine.
//!
//! Tests run against the real API server (`kube_apiserver`), one namespace each. The strict
//! fake API server stays only where a real one cannot be made to do what the test needs on
//! demand; each such test says why in its first comment.

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
        let child = common::operator()
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

/// Pods on the real API server (one namespace per test), allocations in a local store made
/// by the plugin binary with the pods' real UIDs.
struct Cluster {
    ns: kube_apiserver::TestNamespace,
    net: Net,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn new(
        plane: &'static kube_apiserver::ControlPlane,
        hint: &str,
        range: &str,
        extra: Value,
    ) -> Cluster {
        let ns = plane.namespace(hint);
        let mut ipam = json!({"range": range, "log_level": "verbose"});
        if let (Some(map), Value::Object(more)) = (ipam.as_object_mut(), extra) {
            map.extend(more);
        }
        let net = Net::local(ipam);
        let kubeconfig = ns.kubeconfig(net.path());
        Cluster {
            ns,
            net,
            kubeconfig,
        }
    }

    fn pod_ref(&self, name: &str) -> String {
        format!("{}/{name}", self.ns.name)
    }

    /// Creates pod `name` and makes its ADD; its UID and address.
    fn pod_with_address(&self, name: &str, phase: &str) -> (String, String) {
        let uid = self.ns.add_pod(name, phase);
        let ip = self.add_as(name, &uid);
        (uid, ip)
    }

    /// The ADD of pod `name` recorded with `uid`; its address.
    fn add_as(&self, name: &str, uid: &str) -> String {
        let args = common::pod_args_with_uid(&self.pod_ref(name), uid);
        let reply = self.net.call("ADD", &format!("c-{name}"), "net1", &args);
        bare(&ips(&reply.ok())[0])
    }

    fn holds(&self, name: &str) -> bool {
        holds(&self.net, &self.pod_ref(name))
    }

    /// Starts the controller on this namespace (its ConfigMap and Lease live here).
    fn controller(&self, extra: &[&str]) -> Controller {
        let args = [&["--namespace", self.ns.name.as_str()], extra].concat();
        Controller::start(self.net.path(), &self.net.conf, &self.kubeconfig, &args)
    }
}

#[test]
fn deleted_pod_released_within_seconds_with_an_event() {
    let plane = real_cluster!();
    let c = Cluster::new(plane, "ctl-deleted-pod", "10.50.0.0/24", json!({}));
    let (uid_a, ip_a) = c.pod_with_address("a", "Running");
    c.pod_with_address("b", "Running");
    let ctl = c.controller(&[]);
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    assert!(c.holds("a") && c.holds("b"), "{}", ctl.log());

    let deleted = Instant::now();
    assert!(c.ns.delete("pods", "a"));
    wait_for(
        "pod a's address to be released",
        Duration::from_secs(10),
        || !c.holds("a"),
    );
    eprintln!("released {:?} after the deletion", deleted.elapsed());
    assert!(c.holds("b"), "the live pod keeps its address");
    wait_for("the AddressReleased event", Duration::from_secs(10), || {
        c.ns.list("events.k8s.io").iter().any(|e| {
            e["reason"] == "AddressReleased"
                && e["regarding"]["name"] == "a"
                && e["regarding"]["uid"] == uid_a.as_str()
                && e["note"].as_str().is_some_and(|m| m.contains(&ip_a))
                && e["reportingController"] == "whereabouts-controller"
                && e["eventTime"].as_str().is_some_and(|t| t.ends_with('Z'))
        })
    });
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 1.0);
}

/// Each address released gets its own Event naming it, also the pod's second one released
/// seconds after the first (a late ADD of the deleted pod on another interface, freed by the
/// next reconcile): it is not folded into the first's Event (a series keeps the first's note,
/// and needs a patch the controller may not make).
#[test]
fn each_address_released_gets_its_own_event() {
    let plane = real_cluster!();
    let every_second = json!({"reconciler_cron_expression": "@every 1s"});
    let c = Cluster::new(plane, "ctl-two-events", "10.59.0.0/24", every_second);
    let uid = c.ns.add_pod("d", "Running");
    let args = common::pod_args_with_uid(&c.pod_ref("d"), &uid);
    let add = |ifname: &str| bare(&ips(&c.net.call("ADD", "c-d", ifname, &args).ok())[0]);
    let first = add("net1");
    let ctl = c.controller(&[]);
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    let event_names = |ip: &str| {
        let events = c.ns.list("events.k8s.io");
        events.iter().any(|e| {
            e["reason"] == "AddressReleased" && e["note"].as_str().is_some_and(|m| m.contains(ip))
        })
    };
    assert!(c.ns.delete("pods", "d"));
    wait_for("the first address's Event", Duration::from_secs(10), || {
        event_names(&first)
    });
    // A live pod takes the first address again, so the second is another.
    c.pod_with_address("keeper", "Running");
    let second = add("net2");
    assert_ne!(second, first);
    wait_for(
        "the second address's Event",
        Duration::from_secs(10),
        || event_names(&second),
    );
    let failed = ctl.metric("whereabouts_errors_total{operation=\"post_event\"}");
    assert_eq!(failed.unwrap_or(0.0), 0.0, "{}", ctl.log());
}

#[test]
fn statefulset_pod_recreated_with_the_same_name_keeps_its_address() {
    // On the fake: it deletes and re-creates the pod in one step, before the controller can
    // look; on a real server the controller may see the gap in between, which is another test.
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
    let plane = real_cluster!();
    let c = Cluster::new(
        plane,
        "ctl-pending-finished",
        "10.52.0.0/24",
        json!({"reconciler_cron_expression": "@every 1s"}),
    );
    c.pod_with_address("pending", "Pending");
    c.pod_with_address("done", "Running");
    let ctl = c.controller(&[]);
    // The start-up reconcile and at least two scheduled ones.
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 3.0);
    assert!(c.holds("pending"), "{}", ctl.log());
    assert_eq!(
        ctl.metric("whereabouts_allocations{reason=\"pod_pending\"}"),
        Some(1.0)
    );
    // A pod that ran to completion no longer needs its address.
    c.ns.set_pod_phase("done", "Succeeded");
    wait_for(
        "the finished pod's release",
        Duration::from_secs(10),
        || !c.holds("done"),
    );
    assert!(c.holds("pending"));
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_finished\"}", 1.0);
}

#[test]
fn schedule_from_the_whereabouts_config_configmap() {
    let plane = real_cluster!();
    let c = Cluster::new(plane, "ctl-configmap-schedule", "10.56.0.0/24", json!({}));
    c.ns.create(
        "configmaps",
        json!({"metadata": {"name": "whereabouts-config"},
               "data": {"cron-expression": "@every 1s"}}),
    );
    let ctl = c.controller(&[]);
    // Without the ConfigMap the next run would be up to 15 minutes away.
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 3.0);
}

#[test]
fn allocations_of_pods_deleted_while_down_are_reconciled_at_start() {
    let plane = real_cluster!();
    let c = Cluster::new(plane, "ctl-deleted-while-down", "10.53.0.0/24", json!({}));
    c.pod_with_address("alive", "Running");
    // Pods that came and went while no controller ran.
    for name in ["gone-1", "gone-2", "gone-3"] {
        c.pod_with_address(name, "Running");
        assert!(c.ns.delete("pods", name));
    }
    // And one whose name now belongs to a new pod (another UID): kept.
    c.ns.add_pod("reused", "Running");
    c.add_as("reused", "uid-of-the-earlier-pod");
    assert_eq!(held(&c.net).len(), 5);
    let ctl = c.controller(&[]);
    wait_for("the start-up reconcile", Duration::from_secs(20), || {
        held(&c.net).len() == 2
    });
    assert!(c.holds("alive") && c.holds("reused"));
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 3.0);
    // The gauges are set once the reconcile is done, just after its releases.
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    assert_eq!(
        ctl.metric("whereabouts_allocations{reason=\"pod_recreated\"}"),
        Some(1.0)
    );
}

#[test]
fn watch_gaps_are_covered_by_a_resync() {
    // On the fake: it ends the watches and compacts the history on demand (410 Expired).
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

/// Pod `default/p` holding an address in `range`, and a controller that has reconciled once and
/// then waits `retry_after` seconds before a retry. Nothing else reads a built-in resource
/// meanwhile (no node watch, no Lease renewal; a yearly schedule, so no scheduled run
/// interferes): the next such read is the controller's look at pod p.
fn pod_p_and_its_controller(range: &str, retry_after: &str) -> (FakeApiServer, Net, Controller) {
    let (server, net, kubeconfig) =
        setup(range, json!({"reconciler_cron_expression": "0 0 1 1 *"}));
    server.add_pod_with_uid("default", "p", "uid-p", "Running");
    add(&net, "p");
    let ctl = Controller::start(
        net.path(),
        &net.conf,
        &kubeconfig,
        &[
            "--retry-after",
            retry_after,
            "--no-node-slices",
            "--no-leader-election",
        ],
    );
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    (server, net, ctl)
}

#[test]
fn a_failed_pod_read_is_retried_by_a_reconcile() {
    // On the fake: it makes pod reads fail on demand.
    let (server, net, ctl) = pod_p_and_its_controller("10.57.0.0/24", "1");
    // The next reads of pod p fail: more of them than one read's own quick retries (five
    // attempts), so the read fails.
    server.fail_next("GET", "pods", 5);
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

/// While pods cannot be read, every batch of deletions fails and is left to a full reconcile:
/// one for them all. A retry of each (each failing and scheduling its own again for as long as
/// the outage lasts) would multiply the reads a recovering server gets.
#[test]
fn failed_batches_during_an_outage_share_one_retry() {
    // On the fake: it makes pod reads fail on demand, for as long as the test needs.
    let (server, net, ctl) = pod_p_and_its_controller("10.62.0.0/24", "600");
    let more = ["q1", "q2", "q3", "q4"];
    for name in more {
        server.add_pod_with_uid("default", name, &format!("uid-{name}"), "Running");
        add(&net, name);
    }
    server.fail_next("GET", "pods", 1_000_000);
    for (i, name) in std::iter::once("p").chain(more).enumerate() {
        server.delete_now("pods", "default", name);
        // Each deletion its own batch: the next waits for this one's failure.
        ctl.wait_metric(
            "whereabouts_errors_total{operation=\"get_pod\"}",
            (i + 1) as f64,
        );
    }
    assert_eq!(
        ctl.metric("whereabouts_retries_total"),
        Some(1.0),
        "retries scheduled for five failed batches"
    );
    assert!(
        holds(&net, "default/q4"),
        "released without reading its pod"
    );
}

#[test]
fn a_pod_read_that_fails_once_is_retried_at_once() {
    // On the fake: it makes one pod read fail on demand (a 500, as from a server restarting).
    let (server, net, ctl) = pod_p_and_its_controller("10.58.0.0/24", "600");
    server.fail_next("GET", "pods", 1);
    server.delete_now("pods", "default", "p");
    // Released by the deletion's own handling: the controller's retry is ten minutes away.
    wait_for("the release", Duration::from_secs(15), || {
        !holds(&net, "default/p")
    });
    assert_eq!(
        ctl.metric("whereabouts_errors_total{operation=\"get_pod\"}"),
        Some(0.0),
        "the failed attempt was retried within the read"
    );
}

#[test]
fn metrics_reflect_a_burst() {
    let plane = real_cluster!();
    let c = Cluster::new(plane, "ctl-metrics-burst", "10.55.0.0/26", json!({}));
    let names: Vec<String> = (0..24).map(|i| format!("burst-{i}")).collect();
    let uids: Vec<String> = names.iter().map(|n| c.ns.add_pod(n, "Running")).collect();
    let ctl = c.controller(&[]);
    std::thread::scope(|s| {
        for (chunk, uids) in names.chunks(6).zip(uids.chunks(6)) {
            let c = &c;
            s.spawn(move || {
                for (name, uid) in chunk.iter().zip(uids) {
                    c.add_as(name, uid);
                }
            });
        }
    });
    let pool = "whereabouts_pool_used{pool=\"10.55.0.0-26\",range=\"10.55.0.0/26\"}";
    for name in &names[..10] {
        assert!(c.ns.delete("pods", name));
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
    // The watch follows every namespace: tests running beside this one on the shared plane
    // delete pods too.
    let deletions = ctl.metric("whereabouts_pod_deletions_total");
    assert!(deletions.is_some_and(|d| d >= 10.0), "{deletions:?}");
    // Events are posted in the background once the addresses are free.
    ctl.wait_metric("whereabouts_events_total", 10.0);
    assert!(ctl
        .metric("whereabouts_last_reconcile_duration_seconds")
        .is_some());
}

/// A pool's size is what its network hands out: the controller (configured without a range,
/// as the chart runs it) reads the range, its end and its exclusions from the
/// NetworkAttachmentDefinition that draws from the pool. An IPPool holds only the CIDR, which
/// would make a full pool read some addresses free.
#[test]
fn a_pools_size_is_what_its_network_hands_out() {
    let plane = real_cluster!();
    let narrow = json!({"range_end": "10.89.0.10", "exclude": ["10.89.0.4/30"]});
    let c = Cluster::new(plane, "ctl-pool-capacity", "10.89.0.0/28", narrow);
    let ipam = c.net.conf["ipam"].clone();
    let nad = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "narrow"},
        "spec": {"config": json!({"cniVersion": "0.3.1", "name": "narrow", "type": "macvlan",
            "ipam": ipam}).to_string()}});
    c.ns.create("network-attachment-definitions", nad);
    for name in ["a", "b"] {
        c.pod_with_address(name, "Running");
    }
    // The controller's own configuration names no range.
    let mut conf = c.net.conf.clone();
    for key in ["range", "range_end", "exclude"] {
        conf["ipam"].as_object_mut().unwrap().remove(key);
    }
    let args = ["--namespace", c.ns.name.as_str()];
    let ctl = Controller::start(c.net.path(), &conf, &c.kubeconfig, &args);
    // A release refreshes the gauges, after the controller's first lists.
    assert!(c.ns.delete("pods", "b"));
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 1.0);
    let gauge = |name: &str| {
        let labels = "pool=\"10.89.0.0-28\",range=\"10.89.0.0/28\"";
        ctl.metric(&format!("whereabouts_{name}{{{labels}}}"))
    };
    // Hosts 1 to 10 less 4 to 7; the CIDR alone would say 14.
    wait_for(
        "the gauges after the release",
        Duration::from_secs(30),
        || gauge("pool_used") == Some(1.0),
    );
    assert_eq!(gauge("pool_size"), Some(6.0));
    assert_eq!(gauge("pool_free"), Some(5.0));
    c.ns.delete("network-attachment-definitions", "narrow");
}

/// Where a test reads the controller's NodeSlicePools from.
trait SlicePools {
    fn slice_pool(&self, name: &str) -> Option<Value>;
}

impl SlicePools for FakeApiServer {
    fn slice_pool(&self, name: &str) -> Option<Value> {
        self.get("nodeslicepools", NS, name)
    }
}

/// A real control plane of one test's own (CRDs applied) for the node-slice tests whose exact
/// layout depends on every Node of the cluster: the shared plane holds other tests' Nodes. The
/// controller keeps its NodeSlicePools in kube-system, as installed.
struct SlicePlane {
    system: kube_apiserver::TestNamespace,
    dir: tempfile::TempDir,
}

impl SlicePlane {
    fn start(name: &str) -> Option<SlicePlane> {
        let plane = kube_apiserver::dedicated_control_plane(name)?;
        plane.apply_crds().expect("the CRDs");
        Some(SlicePlane {
            system: kube_apiserver::TestNamespace {
                plane,
                name: NS.into(),
            },
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// The admin's kubeconfig, its context in kube-system.
    fn kubeconfig(&self) -> PathBuf {
        self.system.kubeconfig(self.dir.path())
    }

    /// A controller whose own store is the Kubernetes engine on this plane.
    fn controller(&self) -> Controller {
        let kubeconfig = self.kubeconfig();
        let conf = json!({"name": "controller", "ipam": {"type": "whereabouts",
            "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}, "log_level": "verbose"}});
        Controller::start(self.dir.path(), &conf, &kubeconfig, &[])
    }

    fn add_node(&self, node: &str) {
        self.system.create(
            "nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        );
    }

    fn remove_node(&self, node: &str) {
        assert!(self.system.delete("nodes", node), "no node {node}");
    }

    /// A namespace of this plane holding a NetworkAttachmentDefinition `name` of `config`.
    fn namespace_with_nad(&self, name: &str, config: &Value) -> kube_apiserver::TestNamespace {
        let ns = self.system.plane.namespace(name);
        ns.create(
            "network-attachment-definitions",
            json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                   "metadata": {"name": name}, "spec": {"config": config.to_string()}}),
        );
        ns
    }
}

impl SlicePools for SlicePlane {
    fn slice_pool(&self, name: &str) -> Option<Value> {
        self.system.get("nodeslicepools", name)
    }
}

/// The NodeSlicePool's slice per node ("" for free slices).
fn slices(server: &impl SlicePools, name: &str) -> Vec<(String, String)> {
    server
        .slice_pool(name)
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

fn slice_of(server: &impl SlicePools, pool: &str, node: &str) -> Option<String> {
    slices(server, pool)
        .into_iter()
        .find(|(n, _)| n == node)
        .map(|(_, s)| s)
}

/// The slice of `node` in NodeSlicePool `pool`, once it has one (waiting at most `limit`).
fn awaited_slice(server: &impl SlicePools, pool: &str, node: &str, limit: Duration) -> String {
    wait_for(&format!("{node}'s slice of {pool}"), limit, || {
        slice_of(server, pool, node).is_some()
    });
    slice_of(server, pool, node).unwrap_or_default()
}

/// A node or network watch that fails is counted and logged, not only retried: one refused
/// for good (a role without the resource) would otherwise leave the node slices silently
/// behind. On the fake API server, which fails a list on demand.
#[test]
fn failing_node_and_network_watches_are_counted() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    server.fail_next("GET", "nodes", 1);
    server.fail_next("GET", "network-attachment-definitions", 1);
    let conf = json!({"name": "controller", "ipam": {"type": "whereabouts",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}});
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    for operation in ["watch_nodes", "watch_nads"] {
        ctl.wait_metric(
            &format!("whereabouts_errors_total{{operation=\"{operation}\"}}"),
            1.0,
        );
    }
    assert!(ctl.log().contains("watch failed"), "{}", ctl.log());
}

/// A pass over the node slices that fails (the server refuses the NodeSlicePool's creation,
/// twice) is tried again after a pause, without waiting for another event: the slices are
/// there within seconds, and each failure is counted. On the fake: its failures on demand.
#[test]
fn a_failed_node_slice_pass_is_tried_again() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    server.add_node("node-a");
    server.fail_next("POST", "nodeslicepools", 2);
    let nad = json!({"cniVersion": "0.3.1", "name": "retried", "type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "10.61.0.0/24", "node_slice_size": "/26"}});
    server.add_nad("default", "retried", &nad);
    let conf = json!({"name": "controller", "ipam": {"type": "whereabouts",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}, "log_level": "verbose"}});
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    assert_eq!(
        awaited_slice(&server, "retried", "node-a", Duration::from_secs(20)),
        "10.61.0.0/26"
    );
    assert!(
        ctl.metric("whereabouts_retries_total")
            .is_some_and(|v| v >= 2.0),
        "both refused passes counted"
    );
}

/// A removed node's slice goes to a new node only in a pass after the one that withdrew it,
/// which lists the IPPools again: an ADD on the removed node that read the NodeSlicePool before
/// the withdrawal may still write into the slice's pool meanwhile, and the slice is then not
/// free. On the fake: the NodeSlicePool is written before the controller starts, still naming
/// a node the server no longer has, so that one pass sees the removal and the new node, and the
/// withdrawing write is held at the gate while that ADD's entry lands.
#[test]
fn a_removed_nodes_slice_is_not_given_out_while_its_late_add_lands() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    server.add_node("node-b");
    server.add_node("node-c");
    let nad = json!({"cniVersion": "0.3.1", "name": "full", "type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "10.64.0.0/25", "node_slice_size": "/26"}});
    server.add_nad("default", "full", &nad);
    let given = [("node-a", "10.64.0.0/26"), ("node-b", "10.64.0.64/26")];
    let allocations: Vec<Value> = given
        .iter()
        .map(|(node, slice)| json!({"nodeName": node, "sliceRange": slice}))
        .collect();
    server.create(
        "nodeslicepools",
        NS,
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "NodeSlicePool",
               "metadata": {"name": "full"},
               "spec": {"range": "10.64.0.0/25", "sliceSize": "/26"},
               "status": {"allocations": allocations}}),
    );
    server.close_gate("PUT", "nodeslicepools");
    let conf = json!({"name": "controller", "ipam": {"type": "whereabouts",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}, "log_level": "verbose"}});
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    wait_for(
        "the first write at the gate",
        Duration::from_secs(20),
        || server.waiting_at_gate() > 0,
    );
    // node-a's late ADD, into its pool of the slice.
    server.create(
        "ippools",
        NS,
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool",
               "metadata": {"name": "node-a-10.64.0.0-26"},
               "spec": {"range": "10.64.0.0/26",
                        "allocations": {"5": {"id": "late", "podref": "default/late"}}}}),
    );
    server.open_gate();
    wait_for(
        "a pass after the withdrawal",
        Duration::from_secs(20),
        || {
            ctl.log().contains("no free slice left")
                || slice_of(&server, "full", "node-c").is_some()
        },
    );
    assert_eq!(slice_of(&server, "full", "node-c"), None, "{}", ctl.log());
    assert_eq!(slice_of(&server, "full", "node-a"), None);
    assert_eq!(
        slice_of(&server, "full", "node-b").as_deref(),
        Some("10.64.0.64/26")
    );
}

/// A network that cannot be sliced (a slice size larger than its range) fails no pass: it is
/// logged, and another network's new node gets its slice in the next pass, not after a
/// back-off that grows while the broken network stays. On a control plane of its own (the
/// slices given depend on every Node of the cluster).
#[test]
fn a_network_that_cannot_be_sliced_holds_no_other_back() {
    let Some(server) = SlicePlane::start("unsliceable") else {
        return;
    };
    server.add_node("node-a");
    let broken = json!({"cniVersion": "0.3.1", "name": "too-wide", "type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "10.62.0.0/24", "node_slice_size": "/16"}});
    let fine = json!({"cniVersion": "0.3.1", "name": "fine", "type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "10.63.0.0/24", "node_slice_size": "/26"}});
    server.namespace_with_nad("too-wide", &broken);
    server.namespace_with_nad("fine", &fine);
    let ctl = server.controller();
    awaited_slice(&server, "fine", "node-a", Duration::from_secs(20));
    // A node added once the first pass is over is served by a later pass.
    server.add_node("node-b");
    assert_eq!(
        awaited_slice(&server, "fine", "node-b", Duration::from_secs(20)),
        "10.63.0.64/26"
    );
    assert!(ctl.log().contains("too-wide"), "{}", ctl.log());
    assert!(
        server.slice_pool("too-wide").is_none(),
        "a pool made for a layout that cannot be sliced"
    );
    assert_eq!(
        ctl.metric("whereabouts_retries_total").unwrap_or(0.0),
        0.0,
        "a pass failed for the network that cannot be sliced"
    );
    drop(ctl);
    server.system.plane.down();
}

/// Node slices follow the cluster's Nodes, IPv4 and IPv6, and the plugin allocates from its
/// node's slice. On a control plane of its own: the exact layout needs a cluster whose only
/// Nodes are this test's.
#[test]
fn node_slices_follow_nodes_ipv4_and_ipv6() {
    let Some(server) = SlicePlane::start("slices-follow-nodes") else {
        return;
    };
    let kubeconfig = server.kubeconfig();
    server.add_node("node-a");
    server.add_node("node-b");
    let v4 = json!({"cniVersion": "0.3.1", "name": "slices-v4", "type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "10.60.0.0/24", "node_slice_size": "/26",
                 "network_name": "blue",
                 "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}});
    let v6 = json!({"cniVersion": "0.3.1", "name": "slices-v6", "plugins": [{"type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "fd00:60::/64", "node_slice_size": "80"}}]});
    let pods = server.namespace_with_nad("blue", &v4);
    server.namespace_with_nad("v6", &v6);
    let ctl = server.controller();
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
    let pool = server.slice_pool("blue").unwrap();
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
    let add_on = |node: &str, pod: &str| {
        pods.add_pod(pod, "Running");
        let reply = fake_apiserver::cni::run(
            Path::new(common::bin()),
            &fake_apiserver::cni::Call {
                command: "ADD",
                container: pod,
                ifname: "net1",
                pod: Some((&pods.name, pod)),
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
    assert!(
        (65..=126).contains(&add_on("node-b", "on-b")),
        "not from node-b's slice"
    );
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
    // Once on-a is gone (a pod no node runs goes at once) and its address freed, the slice is
    // free for the next node.
    assert!(pods.delete("pods", "on-a"));
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 1.0);
    server.add_node("node-d");
    assert_eq!(
        awaited_slice(&server, "blue", "node-d", Duration::from_secs(10)),
        "10.60.0.0/26"
    );
    assert_eq!(
        ctl.metric("whereabouts_node_slices_assigned{nodeslicepool=\"blue\"}"),
        Some(3.0)
    );
    drop(ctl);
    server.system.plane.down();
}

#[test]
fn kubernetes_engine_pool_entries_and_reservations_released() {
    let plane = real_cluster!();
    let ns = plane.namespace("ctl-kubernetes-engine");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let ipam = json!({"type": "whereabouts", "range": "10.70.0.0/24", "log_level": "verbose",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}});
    let conf = json!({"cniVersion": "1.1.0", "name": "k8snet", "type": "macvlan", "ipam": ipam});
    let pod_ref = |name: &str| format!("{}/{name}", ns.name);
    for name in ["k-1", "k-2"] {
        ns.add_pod(name, "Running");
        let reply = fake_apiserver::cni::run(
            Path::new(common::bin()),
            &fake_apiserver::cni::Call {
                command: "ADD",
                container: &format!("c-{name}"),
                ifname: "net1",
                pod: Some((&ns.name, name)),
                node: None,
                env: vec![],
            },
            &conf.to_string(),
        );
        assert_eq!(reply.code, 0, "{reply:?}");
    }
    // A reservation left behind by a pod long gone, with no pool entry (upstream's drift).
    ns.create(
        "overlappingrangeipreservations",
        json!({"metadata": {"name": "10.70.0.200"},
               "spec": {"podref": pod_ref("long-gone"), "containerid": "old"}}),
    );
    // k-2's reservation names a pod long gone (the two drifted apart): a pool entry backs it,
    // so it still protects k-2's live address and stays.
    let pool = ns.get("ippools", "10.70.0.0-24").unwrap();
    let k2_ip = pool["spec"]["allocations"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, a)| a["podref"] == pod_ref("k-2").as_str())
        .map(|(offset, _)| format!("10.70.0.{offset}"))
        .unwrap();
    let reservations = kube_apiserver::resource("overlappingrangeipreservations");
    ns.apply(
        &reservations,
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
               "kind": "OverlappingRangeIPReservation",
               "metadata": {"name": k2_ip},
               "spec": {"podref": pod_ref("drifted-away"), "containerid": "c-k-2"}}),
    );
    let count = || ns.list("overlappingrangeipreservations").len();
    assert_eq!(count(), 3);
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    wait_for(
        "the orphaned reservation deleted",
        Duration::from_secs(20),
        || count() == 2,
    );
    assert!(ns.delete("pods", "k-1"));
    wait_for(
        "k-1's pool entry and reservation released",
        Duration::from_secs(10),
        || {
            let pool = ns.get("ippools", "10.70.0.0-24").unwrap();
            pool["spec"]["allocations"]
                .as_object()
                .is_some_and(|a| a.len() == 1)
                && count() == 1
        },
    );
    let left = ns.list("overlappingrangeipreservations");
    assert_eq!(left[0]["metadata"]["name"], Value::from(k2_ip));
    ctl.wait_metric(
        "whereabouts_releases_total{reason=\"orphan_reservation\"}",
        1.0,
    );
}

/// An orphaned reservation (no pool entry; its pod gone when the reconcile listed pods) whose
/// pod is created before the controller gets to it stays: that pod's ADD may have taken it
/// over as it stands (same pod, nothing written), so the listed version cannot tell. On the
/// fake: the reconcile is held at its first release (a gate on IPPool patches) while the pod
/// appears, which a real server cannot be made to do at that step.
#[test]
fn an_orphaned_reservation_whose_pod_appears_meanwhile_stays() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let conf = json!({"cniVersion": "1.1.0", "name": "held", "type": "macvlan",
        "ipam": {"type": "whereabouts", "range": "10.72.0.0/24", "log_level": "verbose",
                 "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}});
    // A pool entry of a pod that is gone: the reconcile's release of it meets the gate.
    let reply = fake_apiserver::cni::run(
        Path::new(common::bin()),
        &fake_apiserver::cni::Call {
            command: "ADD",
            container: "c-dead",
            ifname: "net1",
            pod: Some(("default", "dead")),
            node: None,
            env: vec![],
        },
        &conf.to_string(),
    );
    assert_eq!(reply.code, 0, "{reply:?}");
    // Beside the pool, in the engine's namespace (the kubeconfig names none: kube-system).
    assert!(server
        .get("ippools", "kube-system", "10.72.0.0-24")
        .is_some());
    server.create(
        "overlappingrangeipreservations",
        "kube-system",
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
               "kind": "OverlappingRangeIPReservation",
               "metadata": {"name": "10.72.0.200"},
               "spec": {"podref": "default/web-0", "containerid": "old", "ifname": "net1"}}),
    );
    server.close_gate("PATCH", "ippools");
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    wait_for(
        "the reconcile at its first release",
        Duration::from_secs(20),
        || server.waiting_at_gate() > 0,
    );
    server.add_pod_with_uid("default", "web-0", "uid-web-0", "Pending");
    server.open_gate();
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    assert!(
        server
            .get(
                "overlappingrangeipreservations",
                "kube-system",
                "10.72.0.200"
            )
            .is_some(),
        "the reservation of a pod created meanwhile was deleted: {}",
        ctl.log()
    );
    assert_eq!(
        ctl.metric("whereabouts_releases_total{reason=\"orphan_reservation\"}")
            .unwrap_or_default(),
        0.0
    );
    assert_eq!(
        ctl.metric("whereabouts_releases_total{reason=\"pod_deleted\"}"),
        Some(1.0),
        "the gone pod's entry: {}",
        ctl.log()
    );
}

#[test]
fn etcd_engine_deleted_pod_released() {
    if !etcd_cluster::etcd_available() {
        return;
    }
    let plane = real_cluster!();
    let ns = plane.namespace("ctl-etcd-engine");
    let cluster = etcd_cluster::Cluster::start(false);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let conf = json!({"cniVersion": "1.1.0", "name": "etcdnet", "type": "bridge",
        "ipam": {"type": "whereabouts", "datastore": "etcd", "etcd_host": cluster.endpoints(),
                 "range": "10.90.0.0/24", "log_level": "verbose"}});
    let pod_ref = |name: &str| format!("{}/{name}", ns.name);
    for name in ["e-1", "e-2", "e-gone", "e-marked"] {
        let uid = ns.add_pod(name, "Running");
        let args = common::pod_args_with_uid(&pod_ref(name), &uid);
        common::call_with(&conf, "ADD", &format!("c-{name}"), "net1", &args).ok();
    }
    assert!(ns.delete("pods", "e-gone"));
    // e-marked's release left a freed mark, as when another node's release had just cut its
    // run: the reconcile folds it (its address free again) and counts it.
    cluster.release_by_marking("/whereabouts/", "c-e-marked");
    let marks = || cluster.keys("/whereabouts/freed/");
    assert_eq!(marks().len(), 1);
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &[]);
    let pods_held = || -> Vec<String> {
        let out = common::operator()
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
        || pods_held() == [pod_ref("e-1"), pod_ref("e-2")],
    );
    assert!(ns.delete("pods", "e-1"));
    wait_for("e-1's release on etcd", Duration::from_secs(10), || {
        pods_held() == [pod_ref("e-2")]
    });
    ctl.wait_metric("whereabouts_releases_total{reason=\"pod_deleted\"}", 2.0);
    ctl.wait_metric("whereabouts_freed_folded_total", 1.0);
    assert!(marks().is_empty(), "marks left: {:?}", marks());
    // The fold left the runs covering exactly the allocated offsets, and everything else in
    // agreement.
    cluster.assert_doctor_healthy();
}

// ---------------------------------------------------------------- in a pod (the Deployment)

/// The variables the kubelet sets in every container; the port is never reached in these tests.
const POD_ENV: [(&str, &str); 2] = [
    ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
    ("KUBERNETES_SERVICE_PORT", "9"),
];

fn controller_command(pod: bool, args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = common::operator();
    cmd.arg("controller")
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
    let plane = real_cluster!();
    let ns = plane.namespace("ctl-in-a-pod");
    let dir = tempfile::tempdir().unwrap();
    // The pod's service-account folder, absent: the test's own (`$SERVICE_ACCOUNT_PATH`), so
    // that a machine that is itself a pod does not lend its account.
    let sa = dir.path().join("serviceaccount");
    let sa = sa.to_str().unwrap();
    let pods = ns.kubeconfig(dir.path());
    // The engine's kubeconfig: the Deployment's default path, which no pod has, stands for
    // a path of the test's own that does not exist (the host's may).
    let absent = dir.path().join("absent.kubeconfig");
    let datastore = ["--datastore", "kubernetes", "--pod-kubeconfig"].map(std::ffi::OsStr::new);
    let kubeconfig = [std::ffi::OsStr::new("--kubeconfig"), absent.as_os_str()];
    let args = [&datastore[..], &[pods.as_os_str()], &kubeconfig[..]].concat();

    // As the Deployment runs it: no kubeconfig file anywhere, in a pod. The engine goes for
    // the pod's service account (absent on this machine, so start-up stops, naming it).
    let mut in_a_pod = controller_command(true, &args);
    in_a_pod.env("SERVICE_ACCOUNT_PATH", sa);
    let stderr = failed_start(in_a_pod);
    assert!(
        stderr.contains("service account") && stderr.contains(sa),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot read kubeconfig"), "{stderr}");

    // Outside a pod the same command names the kubeconfig it looked for.
    let stderr = failed_start(controller_command(false, &args));
    assert!(
        stderr.contains("cannot read kubeconfig") && stderr.contains(&*absent.to_string_lossy()),
        "{stderr}"
    );

    // In a pod, a kubeconfig that exists still wins: the controller starts on it.
    let with_file = [&args[..4], &[kubeconfig[0], pods.as_os_str()]].concat();
    let log = dir.path().join("controller.log");
    let child = controller_command(true, &with_file)
        .env("SERVICE_ACCOUNT_PATH", sa)
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
    // What failed, by its field; the path is the log's.
    let msg = reply.msg();
    assert!(
        msg.contains("cannot read kubeconfig") && msg.contains("ipam.kubernetes.kubeconfig"),
        "{reply:?}"
    );
    assert!(!msg.contains(&*missing.to_string_lossy()), "{reply:?}");
    assert!(
        reply.stderr.contains(&*missing.to_string_lossy()),
        "{reply:?}"
    );
}

/// Two replicas: the leader is killed in the middle of its start-up reconcile. The standby
/// leads within the Lease's duration and finishes the work: every gone pod's address freed,
/// the live pods' (Pending for ever: no kubelet) kept, nothing released twice.
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
    let node = ns.add_node();
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
    // Another network's NAD whose configuration Multus reads from a file on the node: it
    // cannot be read here, and holds up no removal.
    let from_file = format!("{}-from-file", ns.name);
    ns.create(
        "network-attachment-definitions",
        json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
               "metadata": {"name": from_file}, "spec": {"config": ""}}),
    );
    // A NodeSlicePool made by hand, for a network configured in files on the nodes: no
    // NetworkAttachmentDefinition asks for it, and it stays.
    let by_hand = format!("{}-by-hand", ns.name);
    ns.create(
        "nodeslicepools",
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "NodeSlicePool",
               "metadata": {"name": by_hand},
               "spec": {"range": "10.75.0.0/24", "sliceSize": "/26"},
               "status": {"allocations": [{"nodeName": node, "sliceRange": "10.75.0.0/26"}]}}),
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
    assert!(has_slice(&by_hand), "{}", ctl.log());
    // Nodes and NetworkAttachmentDefinitions are seen by every controller on the shared plane.
    ns.delete("network-attachment-definitions", &keep);
    ns.delete("network-attachment-definitions", &from_file);
    ns.delete("nodes", &node);
}

/// A leader whose Lease renewals hang past its deadline says it no longer leads, and once a
/// renewal lands again it judges everything as a new leader does: a pod deleted meanwhile,
/// whose deletion it left to the leader, is freed then. On the fake API server, whose gate
/// holds the renewals.
#[test]
fn a_leader_whose_renewals_hang_steps_down_and_catches_up() {
    let (server, net, kubeconfig) = setup("10.60.0.0/24", json!({}));
    server.add_pod_with_uid("default", "a", "uid-a", "Running");
    add(&net, "a");
    let lease = ["--lease-duration", "3"];
    let ctl = Controller::start(net.path(), &net.conf, &kubeconfig, &lease);
    ctl.wait_metric("whereabouts_leader", 1.0);
    ctl.wait_metric("whereabouts_reconcile_duration_seconds_count", 1.0);
    server.close_gate("PUT", "leases");
    wait_for("the leader to step down", Duration::from_secs(10), || {
        ctl.metric("whereabouts_leader") == Some(0.0)
    });
    server.delete_now("pods", "default", "a");
    ctl.wait_metric("whereabouts_pod_deletions_total", 1.0);
    assert!(holds(&net, "default/a"), "released while not leading");
    server.open_gate();
    ctl.wait_metric("whereabouts_leader", 1.0);
    wait_for("a's release", Duration::from_secs(10), || {
        !holds(&net, "default/a")
    });
}

#[test]
fn a_leader_stopped_with_sigterm_hands_over_at_once() {
    let plane = real_cluster!();
    let c = Cluster::new(plane, "ctl-sigterm-handover", "10.75.0.0/24", json!({}));
    // A Lease that would last a minute: only its hand-over lets the standby lead sooner.
    let lease = ["--namespace", c.ns.name.as_str(), "--lease-duration", "60"];
    let start = |sub: &str| {
        let dir = c.net.path().join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        Controller::start(&dir, &c.net.conf, &c.kubeconfig, &lease)
    };
    let (first, second) = (start("a"), start("b"));
    let leads = |c: &Controller| c.metric("whereabouts_leader") == Some(1.0);
    wait_for("a leader", Duration::from_secs(20), || {
        leads(&first) || leads(&second)
    });
    let (mut leader, standby) = if leads(&first) {
        (first, second)
    } else {
        (second, first)
    };
    // As a Deployment's rollout stops a pod.
    let pid = libc::pid_t::try_from(leader.child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = leader.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", leader.log());
    assert!(
        leader.log().contains("gave up the lead"),
        "{}",
        leader.log()
    );
    wait_for(
        "the standby to lead, long before the Lease would expire",
        Duration::from_secs(20),
        || leads(&standby),
    );
    let lease = c.ns.get("leases", "whereabouts-controller").unwrap();
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
    assert!(
        standby.log().contains(holder),
        "{holder} is not the standby"
    );
}

#[test]
fn a_changed_slice_size_gives_new_slices_and_never_a_live_address_twice() {
    let plane = real_cluster!();
    let ns = plane.namespace("ctl-nad-changed");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let node = ns.add_node();
    let network = format!("{}-net", ns.name);
    let netconf = |slice: &str| {
        json!({"cniVersion": "0.3.1", "name": network, "type": "macvlan",
               "ipam": {"type": "whereabouts", "range": "10.74.0.0/24", "node_slice_size": slice,
                        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}})
    };
    let nad = |slice: &str| {
        json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
               "metadata": {"name": network}, "spec": {"config": netconf(slice).to_string()}})
    };
    let nads = kube_apiserver::resource("network-attachment-definitions");
    ns.apply(&nads, nad("/26"));
    let conf = json!({"name": "controller", "ipam": {"type": "whereabouts",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}});
    let ctl = Controller::start(dir.path(), &conf, &kubeconfig, &["--lease-duration", "4"]);
    let slice_of_node = || -> Option<whereabouts::ipam::Cidr> {
        let pool = ns.get("nodeslicepools", &network)?;
        let slices = pool["status"]["allocations"].as_array()?.clone();
        let mine = slices.iter().find(|s| s["nodeName"] == node.as_str())?;
        whereabouts::ipam::Cidr::parse(mine["sliceRange"].as_str()?, false)
    };
    wait_for("the node's /26 slice", Duration::from_secs(30), || {
        slice_of_node().is_some_and(|s| s.prefix == 26)
    });
    let add = |pod: &str, slice: &str| -> IpAddr {
        let call = fake_apiserver::cni::Call {
            command: "ADD",
            container: pod,
            ifname: "net1",
            pod: Some((&ns.name, pod)),
            node: Some(&node),
            env: vec![],
        };
        let reply = fake_apiserver::cni::run(bin_path(), &call, &netconf(slice).to_string());
        assert_eq!(reply.code, 0, "{reply:?}");
        reply.ips()[0].split('/').next().unwrap().parse().unwrap()
    };
    let old_slice = slice_of_node().unwrap();
    let live = add("before", "/26");
    assert!(old_slice.contains(live), "{live} outside {old_slice}");

    // The admin halves the slices. The node's /26 is no slice of the new layout, and its pool
    // still holds a live address: the node's new slice must keep clear of it.
    ns.apply(&nads, nad("/27"));
    wait_for("the node's /27 slice", Duration::from_secs(30), || {
        slice_of_node().is_some_and(|s| s.prefix == 27)
    });
    let new_slice = slice_of_node().unwrap();
    assert!(
        !new_slice.contains(live),
        "{new_slice} hands out the live {live} again: {}",
        ctl.log()
    );
    let after = add("after", "/27");
    assert!(new_slice.contains(after) && after != live, "{after}");
    // The live address is still recorded in the pool of the slice it came from.
    let pools = ns.list("ippools");
    let old_pool = pools
        .iter()
        .find(|p| p["spec"]["range"] == old_slice.to_string().as_str())
        .unwrap_or_else(|| panic!("no pool for {old_slice}: {pools:?}"));
    let held = old_pool["spec"]["allocations"].as_object().unwrap();
    assert_eq!(held.len(), 1, "{old_pool}");
    let holder = &held.values().next().unwrap()["podref"];
    assert_eq!(holder, format!("{}/before", ns.name).as_str());
    ns.delete("network-attachment-definitions", &network);
    ns.delete("nodes", &node);
}

fn bin_path() -> &'static Path {
    Path::new(common::bin())
}
