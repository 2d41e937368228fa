//! `whereabouts gc` and `whereabouts release` on the local store and on etcd, with pods read
//! from the real API server (one namespace per test).

mod common;
mod kube_apiserver;

use std::path::{Path, PathBuf};

use common::{bare, ips, Net, Reply};
use kube_apiserver::TestNamespace;
use serde_json::{json, Value};

struct Setup {
    pods: TestNamespace,
    net: Net,
    kubeconfig: PathBuf,
    conf: PathBuf,
}

/// None when there is no control plane (never in CI).
fn setup(test: &str) -> Option<Setup> {
    let pods = kube_apiserver::control_plane()?.namespace(test);
    let net = Net::local(json!({"range": "10.80.0.0/24"}));
    let kubeconfig = pods.kubeconfig(net.path());
    let conf = net.path().join("net.conf");
    std::fs::write(&conf, net.conf.to_string()).unwrap();
    Some(Setup {
        pods,
        net,
        kubeconfig,
        conf,
    })
}

impl Setup {
    /// A pod in `phase` holding an address; the address.
    fn pod(&self, name: &str, phase: Option<&str>) -> String {
        // A pod that no longer exists had a UID of its own.
        let uid = match phase {
            Some(phase) => self.pods.add_pod(name, phase),
            None => format!("uid-{name}"),
        };
        let args = common::pod_args_with_uid(&self.pod_ref(name), &uid);
        let reply = self.net.call("ADD", &format!("c-{name}"), "net1", &args);
        bare(&ips(&reply.ok())[0])
    }

    /// `namespace/name` of a pod of this test.
    fn pod_ref(&self, name: &str) -> String {
        format!("{}/{name}", self.pods.name)
    }

    /// Runs the CLI on this network's configuration, pods read from the API server when
    /// `with_pods`.
    fn cli(&self, args: &[&str], with_pods: bool) -> Reply {
        let mut cmd = common::operator();
        cmd.args(args).arg("--config").arg(&self.conf);
        if with_pods {
            cmd.arg("--pod-kubeconfig").arg(&self.kubeconfig);
        }
        let out = cmd.output().expect("run the CLI");
        Reply::from(out)
    }

    fn addresses(&self) -> Vec<String> {
        let reply = self.cli(&["allocations", "-o", "json"], false);
        reply
            .ok()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["address"].as_str().unwrap().to_string())
            .collect()
    }
}

/// One clear line on stderr and a failure exit.
fn assert_refused(reply: &Reply, needle: &str) {
    assert_eq!(reply.code, 1, "{reply:?}");
    assert!(reply.stdout.is_empty(), "{reply:?}");
    let err = reply.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{reply:?}");
    assert!(
        err.starts_with("whereabouts: ") && err.contains(needle),
        "{reply:?}"
    );
}

#[test]
fn gc_dry_run_lists_then_gc_frees() {
    let Some(s) = setup("gc-dry-run-lists-then-gc-frees") else {
        return;
    };
    let alive = s.pod("alive", Some("Running"));
    let pending = s.pod("pending", Some("Pending"));
    let gone = s.pod("gone", None);
    let done = s.pod("done", Some("Succeeded"));
    let dry = s.cli(&["gc", "--dry-run", "-o", "json"], true).ok();
    let rows = dry.as_array().unwrap();
    let summary: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut expected = vec![
        (
            gone.clone(),
            "would release".to_string(),
            "release: pod no longer exists".to_string(),
        ),
        (
            done.clone(),
            "would release".to_string(),
            "release: pod has finished (Succeeded or Failed)".to_string(),
        ),
    ];
    expected.sort();
    let mut summary = summary;
    summary.sort();
    assert_eq!(summary, expected);
    assert_eq!(rows[0]["pool"], "10.80.0.0-24");
    assert_eq!(s.addresses().len(), 4, "a dry run frees nothing");

    let table = s.cli(&["gc", "--dry-run"], true);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.starts_with("ADDRESS"), "{table:?}");
    assert!(table.stdout.contains(&s.pod_ref("gone")), "{table:?}");

    let freed = s.cli(&["gc", "-o", "json"], true).ok();
    assert_eq!(freed.as_array().unwrap().len(), 2);
    assert!(freed
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["action"] == "released"));
    let mut left = s.addresses();
    left.sort();
    let mut want = vec![alive, pending];
    want.sort();
    assert_eq!(left, want);
    // Nothing left to free.
    assert_eq!(s.cli(&["gc", "-o", "json"], true).ok(), json!([]));
}

#[test]
fn controller_needs_pods() {
    let Some(s) = setup("controller-needs-pods") else {
        return;
    };
    let reply = s.cli(&["controller", "--listen", "127.0.0.1:0"], false);
    assert_refused(&reply, "the controller reads pods from the Kubernetes API");
}

#[test]
fn gc_needs_pods() {
    let Some(s) = setup("gc-needs-pods") else {
        return;
    };
    s.pod("gone", None);
    let reply = s.cli(&["gc", "--dry-run"], false);
    assert_refused(&reply, "cannot tell which pods are alive");
}

/// Not one pod the allocations name exists where pods are read (a kubeconfig of another
/// cluster would read so): a sweep is refused, as it would free every address, unless forced.
#[test]
fn gc_refuses_to_free_everything_unless_forced() {
    let Some(s) = setup("gc-refuses-to-free-everything") else {
        return;
    };
    let gone = s.pod("gone", None);
    let other = s.pod("other-gone", None);
    assert_refused(
        &s.cli(&["gc"], true),
        "refusing to free addresses of pods not found",
    );
    assert_eq!(s.addresses().len(), 2);
    // A dry run lists them all: what the check stops.
    let dry = s.cli(&["gc", "--dry-run", "-o", "json"], true).ok();
    assert_eq!(dry.as_array().map(Vec::len), Some(2));
    let freed = s.cli(&["gc", "--force", "-o", "json"], true).ok();
    let mut released: Vec<&str> = freed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["address"].as_str())
        .collect();
    released.sort();
    let mut want = [gone.as_str(), other.as_str()];
    want.sort();
    assert_eq!(released, want);
    assert!(s.addresses().is_empty());
}

#[test]
fn release_refuses_a_live_pod_unless_forced() {
    let Some(s) = setup("release-refuses-a-live-pod-unless-forced") else {
        return;
    };
    let alive = s.pod("alive", Some("Running"));
    let reply = s.cli(&["release", &alive], true);
    assert_refused(&reply, "pod is alive");
    assert!(reply.stderr.contains("--force"), "{reply:?}");
    assert_eq!(s.addresses(), vec![alive.clone()]);
    let forced = s
        .cli(&["release", &alive, "--force", "-o", "json"], true)
        .ok();
    assert_eq!(forced[0]["address"], Value::from(alive.clone()));
    assert_eq!(forced[0]["pod"], Value::from(s.pod_ref("alive")));
    assert_eq!(forced[0]["reason"], "forced: pod is alive");
    assert!(s.addresses().is_empty());
}

#[test]
fn release_frees_the_address_of_a_gone_pod() {
    let Some(s) = setup("release-frees-the-address-of-a-gone-pod") else {
        return;
    };
    let gone = s.pod("gone", None);
    let pending = s.pod("pending", Some("Pending"));
    assert_refused(&s.cli(&["release", &pending], true), "pod is pending");
    let out = s
        .cli(
            &["release", &gone, "--pool", "10.80.0.0-24", "-o", "json"],
            true,
        )
        .ok();
    assert_eq!(out[0]["reason"], "release: pod no longer exists");
    assert_eq!(s.addresses(), vec![pending]);
}

/// Not one pod the store names exists where pods are read: the pod of the address asked
/// for is not taken for gone (every pod is "gone" in another cluster) unless forced.
#[test]
fn release_refuses_a_pod_not_found_where_no_pod_is_found() {
    let Some(s) = setup("release-refuses-where-no-pod-is-found") else {
        return;
    };
    let gone = s.pod("gone", None);
    let reply = s.cli(&["release", &gone], true);
    assert_refused(&reply, "refusing to free addresses of pods not found");
    assert_eq!(s.addresses(), vec![gone.clone()]);
    let forced = s
        .cli(&["release", &gone, "--force", "-o", "json"], true)
        .ok();
    assert_eq!(forced[0]["reason"], "release: pod no longer exists");
    assert!(s.addresses().is_empty());
}

#[test]
fn release_without_pod_information_needs_force() {
    let Some(s) = setup("release-without-pod-information-needs-fo") else {
        return;
    };
    let gone = s.pod("gone", None);
    let reply = s.cli(&["release", &gone], false);
    assert_refused(&reply, "cannot tell whether its pod is alive");
    let forced = s.cli(&["release", &gone, "--force"], false);
    assert_eq!(forced.code, 0, "{forced:?}");
    assert!(
        forced.stdout.contains("forced: pod state unknown"),
        "{forced:?}"
    );
    assert!(s.addresses().is_empty());
}

#[test]
fn release_errors_are_one_clear_line() {
    let Some(s) = setup("release-errors-are-one-clear-line") else {
        return;
    };
    let held = s.pod("alive", Some("Running"));
    assert_refused(
        &s.cli(&["release", "10.80.0.99"], true),
        "10.80.0.99 is not allocated",
    );
    assert_refused(
        &s.cli(&["release", "not-an-ip"], true),
        "is not an IP address",
    );
    assert_refused(
        &s.cli(&["release", &held, "--pool", "10.99.0.0-24"], true),
        "is not allocated in pool 10.99.0.0-24",
    );
    let missing = Path::new("/nonexistent/kubeconfig");
    let reply = {
        let mut cmd = common::operator();
        cmd.args(["release", &held, "--config"])
            .arg(&s.conf)
            .arg("--pod-kubeconfig")
            .arg(missing);
        let out = cmd.output().unwrap();
        Reply::from(out)
    };
    assert_refused(&reply, "cannot read kubeconfig");
    // Forced, a pod state that cannot be read does not stand in the way, as --force says.
    let mut cmd = common::operator();
    cmd.args(["release", &held, "--force", "--config"])
        .arg(&s.conf)
        .arg("--pod-kubeconfig")
        .arg(missing);
    let forced = Reply::from(cmd.output().unwrap());
    assert_eq!(forced.code, 0, "{forced:?}");
    assert!(
        forced.stdout.contains("forced: pod state unreadable"),
        "{forced:?}"
    );
    assert!(s.addresses().is_empty());
}

mod etcd_cluster;

#[test]
fn gc_and_release_on_etcd() {
    if !etcd_cluster::etcd_available() {
        return;
    }
    let Some(plane) = kube_apiserver::control_plane() else {
        return;
    };
    let pods = plane.namespace("gc-and-release-on-etcd");
    let pod_ref = |name: &str| format!("{}/{name}", pods.name);
    let cluster = etcd_cluster::Cluster::start(false);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = pods.kubeconfig(dir.path());
    let conf_value = json!({"cniVersion": "1.1.0", "name": "etcdnet", "type": "bridge",
        "ipam": {"type": "whereabouts", "datastore": "etcd", "etcd_host": cluster.endpoints(),
                 "range": "10.81.0.0/24", "log_level": "error"}});
    let conf = dir.path().join("net.conf");
    std::fs::write(&conf, conf_value.to_string()).unwrap();
    let mut addr = std::collections::BTreeMap::new();
    for (name, phase) in [
        ("alive", Some("Running")),
        ("gone", None),
        ("other-gone", None),
        ("marked", None),
    ] {
        let uid = match phase {
            Some(phase) => pods.add_pod(name, phase),
            None => format!("uid-{name}"),
        };
        let reply = common::call_with(
            &conf_value,
            "ADD",
            &format!("c-{name}"),
            "net1",
            &common::pod_args_with_uid(&pod_ref(name), &uid),
        );
        addr.insert(name, bare(&ips(&reply.ok())[0]));
    }
    let cli = |args: &[&str]| {
        let mut cmd = common::operator();
        cmd.args(args).arg("--config").arg(&conf);
        if matches!(args[0], "gc" | "release") {
            cmd.arg("--pod-kubeconfig").arg(&kubeconfig);
        }
        let out = cmd.output().unwrap();
        Reply::from(out)
    };
    assert_refused(&cli(&["release", &addr["alive"]]), "pod is alive");
    let released = cli(&["release", &addr["other-gone"], "-o", "json"]).ok();
    assert_eq!(released[0]["reason"], "release: pod no longer exists");
    // "marked" was released by a DEL that found its run cut by another release: only its
    // freed mark is left, which holds its address back until a fold.
    cluster.release_by_marking("/whereabouts/", "c-marked");
    let marks = || cluster.keys("/whereabouts/freed/");
    let dry = cli(&["gc", "--dry-run", "-o", "json"]).ok();
    assert_eq!(dry.as_array().unwrap().len(), 1);
    assert_eq!(dry[0]["address"], Value::from(addr["gone"].clone()));
    assert_eq!(marks().len(), 1, "a dry run folds nothing");
    let done = cli(&["gc", "-o", "json"]);
    assert!(
        done.stderr
            .contains("1 released addresses held back by freed marks are free again"),
        "{}",
        done.stderr
    );
    assert_eq!(done.ok()[0]["action"], "released");
    assert!(marks().is_empty(), "marks left after gc: {:?}", marks());
    let left = cli(&["allocations", "-o", "json"]).ok();
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["pod"], Value::from(pod_ref("alive")));
    assert_eq!(
        cli(&["release", &addr["alive"], "--force", "-o", "json"]).ok()[0]["reason"],
        "forced: pod is alive"
    );
    assert_eq!(cli(&["pools", "-o", "json"]).ok()[0]["used"], 0);
}

/// One release of a sweep refused (here by an admission policy that freezes one pool) does not
/// stop the others: `gc` frees what it can, marks the refused row failed with the server's
/// reason, exits non-zero, and leaves the refused allocation whole (its pool entry and its
/// reservation), for the next sweep to free.
#[test]
fn gc_frees_what_it_can_and_fails_for_the_rest() {
    let Some(plane) = kube_apiserver::control_plane() else {
        return;
    };
    let ns = plane.namespace("gc-frees-what-it-can");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let network = |range: &str| {
        json!({"cniVersion": "1.1.0", "name": "kubenet", "type": "bridge",
            "ipam": {"type": "whereabouts", "range": range, "log_level": "error",
                     "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}})
    };
    let (open, frozen) = (network("10.83.0.0/24"), network("10.82.0.0/24"));
    let mut addr = std::collections::BTreeMap::new();
    for (name, phase, conf) in [
        ("alive", Some("Running"), &open),
        ("gone", None, &open),
        ("gone-frozen", None, &frozen),
    ] {
        let uid = match phase {
            Some(phase) => ns.add_pod(name, phase),
            None => format!("uid-{name}"),
        };
        let pod_ref = format!("{}/{name}", ns.name);
        let args = common::pod_args_with_uid(&pod_ref, &uid);
        let reply = common::call_with(conf, "ADD", &format!("c-{name}"), "net1", &args);
        addr.insert(name, bare(&ips(&reply.ok())[0]));
    }
    let validations = json!([
        {"expression": "object.metadata.name != 'policy-probe'", "message": "probe"},
        {"expression": "request.operation != 'UPDATE' || object.metadata.name != '10.82.0.0-24' \
            || size(object.spec.allocations) >= size(oldObject.spec.allocations)",
         "message": "pool 10.82.0.0-24 is frozen"},
    ]);
    let probe = json!({"metadata": {"name": "policy-probe"},
                       "spec": {"range": "10.85.0.0/24", "allocations": {}}});
    let rules = json!(["ippools", ["CREATE", "UPDATE"]]);
    let policy = ns.admission_policy(dir.path(), rules, validations, ("ippools", probe.clone()));

    let conf = dir.path().join("net.conf");
    std::fs::write(&conf, open.to_string()).unwrap();
    let gc = || {
        let out = common::operator()
            .args(["gc", "-o", "json", "--config"])
            .arg(&conf)
            .arg("--pod-kubeconfig")
            .arg(&kubeconfig)
            .output()
            .unwrap();
        Reply::from(out)
    };
    let reservations = || reservation_names(&ns);

    let partial = gc();
    assert_eq!(partial.code, 1, "{partial:?}");
    assert!(
        partial.stderr.contains("1 of the releases failed"),
        "{partial:?}"
    );
    let rows: Value = serde_json::from_str(&partial.stdout).expect("the rows as JSON");
    let actions: Vec<(&str, &str)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap(),
                r["action"].as_str().unwrap(),
            )
        })
        .collect();
    // The frozen pool sorts first: the sweep goes on past its failure.
    assert_eq!(
        actions,
        [
            (addr["gone-frozen"].as_str(), "failed"),
            (addr["gone"].as_str(), "released")
        ]
    );
    assert!(
        rows[0]["reason"]
            .as_str()
            .unwrap()
            .contains("pool 10.82.0.0-24 is frozen"),
        "{rows}"
    );
    let frozen_pool = ns.get("ippools", "10.82.0.0-24").unwrap();
    assert_eq!(
        frozen_pool["spec"]["allocations"]
            .as_object()
            .unwrap()
            .len(),
        1,
        "the refused release took nothing: {frozen_pool}"
    );
    let mut whole = vec![addr["alive"].clone(), addr["gone-frozen"].clone()];
    whole.sort();
    assert_eq!(reservations(), whole);

    plane.kubectl(&[
        "delete",
        "validatingadmissionpolicy,validatingadmissionpolicybinding",
        &policy,
    ]);
    // The server stops enforcing a deleted policy shortly after.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ns.dry_run_create("ippools", probe.clone()).is_err() {
        assert!(
            std::time::Instant::now() < until,
            "the policy stays enforced"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let rest = gc();
    assert_eq!(rest.code, 0, "{rest:?}");
    let rows: Value = serde_json::from_str(&rest.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["address"], Value::from(addr["gone-frozen"].clone()));
    assert_eq!(rows[0]["action"], "released");
    assert_eq!(reservations(), [addr["alive"].clone()]);
}

/// `gc` frees an overlapping-range reservation no allocation backs once its pod is gone (an
/// ADD or DEL stopped half-way leaves one, and it blocks the address in every range of the
/// network), and keeps one whose pod exists (an ADD in flight writes its reservation first)
/// and every reservation an allocation backs.
#[test]
fn gc_frees_orphaned_reservations_of_gone_pods() {
    let Some(plane) = kube_apiserver::control_plane() else {
        return;
    };
    let ns = plane.namespace("gc-frees-orphaned-reservations");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let network = json!({"cniVersion": "1.1.0", "name": "kubenet", "type": "bridge",
        "ipam": {"type": "whereabouts", "range": "10.86.0.0/24", "log_level": "error",
                 "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}});
    let uid = ns.add_pod("alive", "Running");
    let args = common::pod_args_with_uid(&format!("{}/alive", ns.name), &uid);
    let reply = common::call_with(&network, "ADD", "c-alive", "net1", &args);
    let alive = bare(&ips(&reply.ok())[0]);
    ns.add_pod("starting", "Pending");
    for (address, pod) in [("10.86.0.200", "long-gone"), ("10.86.0.201", "starting")] {
        ns.create(
            "overlappingrangeipreservations",
            json!({"metadata": {"name": address},
                   "spec": {"podref": format!("{}/{pod}", ns.name), "containerid": "c-x"}}),
        );
    }
    let conf = dir.path().join("net.conf");
    std::fs::write(&conf, network.to_string()).unwrap();
    let gc = |dry_run: bool| gc_json(&conf, &kubeconfig, dry_run);
    let reservations = || reservation_names(&ns);
    let mut all = vec![alive.clone(), "10.86.0.200".into(), "10.86.0.201".into()];
    all.sort();

    let dry = gc(true);
    assert_eq!(dry.as_array().unwrap().len(), 1, "{dry}");
    assert_eq!(dry[0]["reservation"], "10.86.0.200");
    assert_eq!(dry[0]["pod"], Value::from(format!("{}/long-gone", ns.name)));
    assert_eq!(dry[0]["action"], "would release");
    assert_eq!(reservations(), all, "a dry run frees nothing");

    let done = gc(false);
    assert_eq!(done.as_array().unwrap().len(), 1, "{done}");
    assert_eq!(done[0]["action"], "released");
    all.retain(|name| name != "10.86.0.200");
    assert_eq!(reservations(), all);
    assert_eq!(gc(false), json!([]));
}

/// `doctor --fix` deletes an orphan reservation as `gc` does: once its pod is gone. One whose
/// pod runs stays, reported unfixed: its pool entry was lost (an IPPool deleted or restored by
/// hand), and the reservation is all that keeps the pod's address from another pod.
#[test]
fn doctor_fix_keeps_an_orphan_reservation_whose_pod_runs() {
    let Some(plane) = kube_apiserver::control_plane() else {
        return;
    };
    let ns = plane.namespace("doctor-keeps-a-running-pods-orphan");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    ns.add_pod("alive", "Running");
    for (address, pod) in [("10.88.0.5", "alive"), ("10.88.0.6", "long-gone")] {
        ns.create(
            "overlappingrangeipreservations",
            json!({"metadata": {"name": address},
                   "spec": {"podref": format!("{}/{pod}", ns.name), "containerid": "c-x"}}),
        );
    }
    let doctor = |fix: &[&str]| {
        let out = common::operator()
            .args(["doctor", "--orphan-age", "0", "-o", "json", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(fix)
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.success(), report)
    };
    // Without --fix the report says which --fix would keep, and why.
    let (_, survey) = doctor(&[]);
    let action_for = |report: &Value, name: &str| {
        let findings = report["findings"].as_array().unwrap();
        let orphan = findings
            .iter()
            .find(|f| f["problem"] == "orphan_reservation" && f["reservation"] == name);
        let action = orphan.and_then(|f| f["action"].as_str());
        action.unwrap_or_else(|| panic!("{report:#}")).to_string()
    };
    assert!(
        action_for(&survey, "10.88.0.5").starts_with("none: pod is alive"),
        "{survey:#}"
    );
    assert_eq!(action_for(&survey, "10.88.0.6"), "fixable", "{survey:#}");
    let (healthy, report) = doctor(&["--fix"]);
    assert!(!healthy, "{report:#}");
    assert_eq!(reservation_names(&ns), ["10.88.0.5"], "{report:#}");
    let action = action_for(&report, "10.88.0.5");
    assert!(action.starts_with("not fixed: pod is alive"), "{report:#}");
}

/// A network with `enable_overlapping_ranges: false` keeps no reservations: the doctor, which
/// reads the NetworkAttachmentDefinitions, reports none missing for a pool only such networks
/// describe, and creates none with `--fix`; a pool a network with reservations draws from
/// still needs its own.
#[test]
fn doctor_needs_no_reservation_where_the_networks_keep_none() {
    let Some(plane) = kube_apiserver::control_plane() else {
        return;
    };
    let ns = plane.namespace("doctor-needs-no-reservation");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let entry = |pod: &str| json!({"id": format!("c-{pod}"), "podref": format!("{}/{pod}", ns.name), "ifname": "net1"});
    for (network, range, overlap) in [
        ("doctor-unreserved", "10.98.0.0/28", false),
        ("doctor-reserved", "10.98.0.16/28", true),
    ] {
        let config = json!({"cniVersion": "0.4.0", "name": network, "type": "macvlan",
            "ipam": {"type": "whereabouts", "range": range, "network_name": network,
                     "enable_overlapping_ranges": overlap}});
        ns.create(
            "network-attachment-definitions",
            json!({"metadata": {"name": network}, "spec": {"config": config.to_string()}}),
        );
        let pool = format!("{network}-{}", range.replace('/', "-"));
        ns.add_pod(network, "Running");
        ns.create(
            "ippools",
            json!({"metadata": {"name": pool},
                   "spec": {"range": range, "allocations": {"3": entry(network)}}}),
        );
    }
    let report = doctor_report(&kubeconfig, &["--fix"]);
    let missing = objects_of(&report, "missing_reservation");
    assert_eq!(
        missing,
        ["IPPool/doctor-reserved-10.98.0.16-28"],
        "{report:#}"
    );
    assert_eq!(
        reservation_names(&ns),
        ["doctor-reserved-10.98.0.19"],
        "{report:#}"
    );
}

/// The names of the namespace's overlapping-range reservations, sorted.
/// `whereabouts gc` (a dry run when `dry_run`) on the configuration `conf`, pods read with
/// `kubeconfig`: its JSON report.
fn gc_json(conf: &Path, kubeconfig: &Path, dry_run: bool) -> Value {
    let mut cmd = common::operator();
    cmd.args(["gc", "-o", "json", "--config"])
        .arg(conf)
        .arg("--pod-kubeconfig")
        .arg(kubeconfig);
    if dry_run {
        cmd.arg("--dry-run");
    }
    Reply::from(cmd.output().unwrap()).ok()
}

/// `whereabouts doctor -o json` with `flags`, its report.
fn doctor_report(kubeconfig: &Path, flags: &[&str]) -> Value {
    let out = common::operator()
        .args(["doctor", "-o", "json", "--kubeconfig"])
        .arg(kubeconfig)
        .args(flags)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The objects of a doctor's `report` with findings of `problem`.
fn objects_of<'a>(report: &'a Value, problem: &str) -> Vec<&'a str> {
    let findings = report["findings"].as_array().unwrap().iter();
    findings
        .filter(|f| f["problem"] == problem)
        .map(|f| f["object"].as_str().unwrap())
        .collect()
}

fn reservation_names(ns: &TestNamespace) -> Vec<String> {
    let mut names: Vec<String> = ns
        .list("overlappingrangeipreservations")
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// A plain network whose name reads like a sliced network's node (`sriov-w1` beside the sliced
/// network `sriov` and its node `w1`) has the IPPool name of that node's slice pool when its
/// range is that slice. Its pods run on any node: cleanup must not free their addresses as
/// pods moved off the slice's node. (A pod that did move holds its network's address from its
/// new node's slice; the unit tests of `judge` hold that case.) The doctor reports the shared
/// object.
#[test]
fn a_plain_pool_named_like_a_nodes_slice_keeps_its_pods_on_other_nodes() {
    let Some(plane) = kube_apiserver::control_plane() else {
        return;
    };
    let ns = plane.namespace("plain-pool-named-like-a-slice");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let network = json!({"cniVersion": "1.1.0", "name": "plain", "type": "bridge",
        "ipam": {"type": "whereabouts", "range": "10.87.1.0/24", "network_name": "sriov-w1",
                 "log_level": "error",
                 "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}}});
    ns.create(
        "nodeslicepools",
        json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "NodeSlicePool",
               "metadata": {"name": "sriov"},
               "spec": {"range": "10.87.0.0/16", "sliceSize": "/24"},
               "status": {"allocations": [{"nodeName": "w1", "sliceRange": "10.87.1.0/24"}]}}),
    );
    let uid = ns.add_pod_on("db-0", "Running", Some("w2"));
    let args = common::pod_args_with_uid(&format!("{}/db-0", ns.name), &uid);
    let reply = common::call_with(&network, "ADD", "c-db", "net1", &args);
    let held = bare(&ips(&reply.ok())[0]);
    assert!(ns.get("ippools", "sriov-w1-10.87.1.0-24").is_some());
    let conf = dir.path().join("net.conf");
    std::fs::write(&conf, network.to_string()).unwrap();
    let gc = |dry_run: bool| gc_json(&conf, &kubeconfig, dry_run);
    assert_eq!(gc(true), json!([]));
    assert_eq!(gc(false), json!([]));
    let check = common::call_with(&network, "CHECK", "c-db", "net1", &args);
    assert_eq!(check.code, 0, "{check:?}: {held} no longer held");
    // The doctor says the two networks share the object, once a NetworkAttachmentDefinition
    // describes the plain one.
    ns.create(
        "network-attachment-definitions",
        json!({"metadata": {"name": "plain"}, "spec": {"config": network.to_string()}}),
    );
    let report = doctor_report(&kubeconfig, &[]);
    let shared = objects_of(&report, "shared_name");
    assert_eq!(shared, ["IPPool/sriov-w1-10.87.1.0-24"], "{report:#}");
}
