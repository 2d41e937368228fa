//! The real binary against a real API server that sheds its requests: API Priority and Fairness
//! on (`hack/control-plane up --flow-control`), the plugin's service account in a priority level
//! of a few seats that rejects what does not fit (429 with `Retry-After`), as an admin protecting
//! the API server from a node's bursts would set it.

mod fake_apiserver;
mod kube_apiserver;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fake_apiserver::burst::{run_burst, Burst};
use fake_apiserver::cni::{netconf, run, Call};
use fake_apiserver::harness::pool_ips;
use fake_apiserver::FakeApiServer;
use kube_apiserver::{ControlPlane, TestNamespace};
use serde_json::{json, Value};

const RESERVATIONS: &str = "overlappingrangeipreservations";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
}

/// The plugin's identity in `ns`, limited by a priority level of its own: the least share of the
/// server's seats, and what does not fit rejected at once (no queue). Returns a kubeconfig of the
/// account and the name of its flow schema (and level).
fn throttled_account(ns: &TestNamespace, dir: &Path) -> (PathBuf, String) {
    let name = &ns.name;
    let level = format!("{name}-plugin");
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "plugin", "namespace": name}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "plugin", "namespace": name},
         "rules": [
            {"apiGroups": ["whereabouts.cni.cncf.io"], "resources": ["*"], "verbs": ["*"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "plugin", "namespace": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "plugin"},
         "subjects": [{"kind": "ServiceAccount", "name": "plugin", "namespace": name}]},
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "PriorityLevelConfiguration",
         "metadata": {"name": level},
         "spec": {"type": "Limited", "limited": {
            "nominalConcurrencyShares": 1, "lendablePercent": 0,
            "limitResponse": {"type": "Reject"}}}},
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
         "metadata": {"name": level},
         "spec": {"priorityLevelConfiguration": {"name": level}, "matchingPrecedence": 500,
            "rules": [{
                "subjects": [{"kind": "ServiceAccount",
                              "serviceAccount": {"name": "plugin", "namespace": name}}],
                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                   "namespaces": ["*"]}]}]}},
    ]});
    let path = dir.join("throttled.json");
    std::fs::write(&path, objects.to_string()).unwrap();
    ns.plane
        .kubectl(&["apply", "-f", &path.display().to_string()]);
    in_effect(ns.plane, &level);
    let token = ns
        .plane
        .kubectl(&["create", "token", "plugin", "-n", name])
        .trim()
        .to_string();
    (ns.plane.token_kubeconfig(dir, name, &token), level)
}

/// Waits until the server has taken in the priority level `level` (its seats are among the
/// metrics): until then, its flow schema matches nothing.
fn in_effect(plane: &ControlPlane, level: &str) {
    let seats = format!("apiserver_flowcontrol_nominal_limit_seats{{priority_level=\"{level}\"}}");
    let since = std::time::Instant::now();
    while !plane
        .kubectl(&["get", "--raw", "/metrics"])
        .contains(&seats)
    {
        assert!(
            since.elapsed() < std::time::Duration::from_secs(60),
            "the API server never took in the priority level {level}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// How many requests of `flow_schema` the server has shed so far.
fn shed(plane: &ControlPlane, flow_schema: &str) -> u64 {
    let text = plane.kubectl(&["get", "--raw", "/metrics"]);
    let schema = format!("flow_schema=\"{flow_schema}\"");
    text.lines()
        .filter(|l| l.starts_with("apiserver_flowcontrol_rejected_requests_total{"))
        .filter(|l| l.contains(&schema))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn remove_flow(plane: &ControlPlane, level: &str) {
    plane.kubectl(&[
        "delete",
        "flowschema,prioritylevelconfiguration",
        level,
        "--ignore-not-found",
    ]);
}

fn conf(range: &str, kubeconfig: &Path) -> String {
    let ipam = json!({
        "type": "whereabouts",
        "range": range,
        "log_level": "error",
        "kubernetes": {"kubeconfig": kubeconfig.display().to_string()},
    });
    netconf("throttled", &ipam)
}

/// A burst the server sheds part of goes through: each request shed waits as long as the
/// server asks and comes back, every ADD gets a distinct address, and the pool and the
/// reservations hold exactly those. (Retried a few times within half a second, as transient
/// failures are, ADDs of the burst failed with "try again" while the server asked for a second.)
#[test]
fn a_burst_the_server_sheds_waits_as_it_asks_and_every_add_gets_an_address() {
    let Some(plane) = kube_apiserver::flow_control_plane() else {
        return;
    };
    let ns = plane.namespace("burst-the-server-sheds");
    let dir = tempfile::tempdir().unwrap();
    let (kubeconfig, level) = throttled_account(&ns, dir.path());
    let before = shed(plane, &level);
    let burst = Burst {
        calls: 100,
        parallel: 50,
        nodes: 10,
        command: "ADD",
    };
    let outcome = run_burst(bin(), &conf("10.60.0.0/16", &kubeconfig), &burst, &[]);
    let shed_in_burst = shed(plane, &level) - before;
    remove_flow(plane, &level);
    assert!(
        shed_in_burst > 0,
        "the server shed none of the burst's requests: the test proves nothing"
    );
    let mut given = BTreeSet::new();
    for (i, _, reply) in &outcome.calls {
        assert_eq!(reply.cni_code(), 0, "ADD {i}: {}", reply.stdout);
        let ip = reply.json()["ips"][0]["address"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(given.insert(ip.clone()), "{ip} given twice");
    }
    let pool = ns.get("ippools", "10.60.0.0-16").expect("the pool");
    let in_pool: BTreeSet<String> = pool_ips(&pool)
        .iter()
        .map(|ip| format!("{ip}/16"))
        .collect();
    assert_eq!(in_pool, given);
    assert_eq!(ns.list(RESERVATIONS).len(), given.len());
    eprintln!(
        "{shed_in_burst} requests shed, all {} ADDs served",
        given.len()
    );
}

/// A server that sheds every request of the plugin: the ADD waits as the server asks, more than
/// once, then answers "try again" (code 11) naming the shedding, and writes nothing. On the fake
/// server: a real one cannot be made to shed every request (API Priority and Fairness lets one
/// through whenever the level runs none).
#[test]
fn a_server_that_sheds_every_request_gets_try_again_naming_it() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), Some("kube-system"));
    server.set_shedding(1);
    let call = Call {
        command: "ADD",
        container: "c1",
        ifname: "net1",
        pod: Some(("default", "pod-1")),
        node: None,
        // Waits of one request within 3 s in all (three times the request timeout).
        env: vec![("WHEREABOUTS_KUBERNETES_TIMEOUT", "1".into())],
    };
    let reply = run(bin(), &call, &conf("10.61.0.0/24", &kubeconfig));
    assert_eq!(reply.cni_code(), 11, "{}", reply.stdout);
    let answer: Value = reply.json();
    let msg = answer["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("429"), "{msg}");
    assert!(msg.contains("Priority and Fairness"), "{msg}");
    let shed = server.requests();
    assert!(
        shed >= 2,
        "the ADD gave up after {shed} shed request(s), without waiting as asked"
    );
    server.set_shedding(0);
    assert!(server.list("ippools", "kube-system").is_empty());
    assert!(server.list(RESERVATIONS, "kube-system").is_empty());
}
