//! The seed's install on a real one-node cluster (`hack/control-plane up --with-node`: kubelet,
//! containerd, Multus over bridge and host-local): `kubectl apply` of the manifest and the two
//! CRD files, the DaemonSet's pod installing the plugin into the node's CNI folders, then pods
//! whose secondary interface (macvlan, `"ipam": {"type": "whereabouts"}`) gets an address from
//! the range, and what happens to those addresses as pods come and go.
//!
//! The node's /opt/cni/bin and /etc/cni/net.d are folders of the cluster's directory (see
//! hack/node), so the files the DaemonSet writes are read here directly.

mod kube_apiserver;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube_apiserver::ControlPlane;
use serde_json::{json, Value};

const SYSTEM: &str = "kube-system";
/// The namespace of the test pods and their network.
const PODS: &str = "wa-pods";
const NETWORK: &str = "wa-net";
const RANGE: &str = "192.168.200.0/24";
const BUSYBOX: &str = "localhost/whereabouts-test/busybox:1";
const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The cluster and the host folders behind the node's CNI folders.
struct Node {
    plane: &'static ControlPlane,
}

impl Node {
    fn cni_bin(&self) -> PathBuf {
        self.plane.dir.join("node/cni/bin")
    }

    fn cni_conf(&self) -> PathBuf {
        self.plane.dir.join("node/cni/net.d")
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.plane.kubectl(args)
    }

    fn get(&self, args: &[&str]) -> Value {
        let mut all = vec!["get", "-o", "json"];
        all.extend(args);
        serde_json::from_str(&self.kubectl(&all)).expect("kubectl get JSON")
    }

    /// `kubectl apply` of objects given as JSON.
    fn apply(&self, objects: &[Value]) {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let mut child = Command::new(self.plane.tools.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.plane.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl apply");
        let mut stdin = child.stdin.take().expect("kubectl stdin");
        stdin.write_all(list.to_string().as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kubectl apply: {out:?}");
    }

    fn node_script(&self, command: &str) {
        let status = Command::new(repo().join("hack/node"))
            .arg(command)
            .arg(&self.plane.dir)
            .status()
            .expect("run hack/node");
        assert!(status.success(), "hack/node {command} failed");
    }
}

/// Polls `done` until it holds; fails with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The seed's command: the manifest and the two CRD files.
fn seed_apply(node: &Node) {
    let files = [
        "deploy/daemonset-install.yaml",
        "deploy/whereabouts.cni.cncf.io_ippools.yaml",
        "deploy/whereabouts.cni.cncf.io_overlappingrangeipreservations.yaml",
    ]
    .map(|f| repo().join(f).display().to_string());
    let mut args = vec!["apply"];
    for file in &files {
        args.extend(["-f", file.as_str()]);
    }
    node.kubectl(&args);
}

fn rollout(node: &Node, what: &str) {
    node.kubectl(&["rollout", "status", what, "-n", SYSTEM, "--timeout=180s"]);
}

/// The static plugin-only build the whereabouts image carries (hack/images/build), next to the
/// full binary: what the installer puts on a node whose agent serves the plugin.
fn static_plugin_build() -> PathBuf {
    let full = match std::env::var_os("WHEREABOUTS_STATIC_BINARY") {
        Some(path) => PathBuf::from(path),
        None => repo().join("target/x86_64-unknown-linux-gnu/release/whereabouts"),
    };
    full.with_file_name("whereabouts-plugin")
}

/// The DaemonSet's pod put the image's plugin-only build (the agent serves the plugin) into the
/// node's CNI bin folder and the flat file (owner-only) into whereabouts.d; the plugin also runs
/// on the host.
fn check_installed_files(node: &Node) {
    let installed = node.cni_bin().join("whereabouts");
    wait_until("the installed plugin", Duration::from_secs(60), || {
        installed.exists()
    });
    assert!(
        std::fs::read(&installed).unwrap() == std::fs::read(static_plugin_build()).unwrap(),
        "the node's plugin is not the image's plugin-only build"
    );
    let folder = node.cni_conf().join("whereabouts.d");
    let mode = std::fs::metadata(folder.join("whereabouts.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "whereabouts.conf has mode {mode:o}");
    let flat: Value =
        serde_json::from_slice(&std::fs::read(folder.join("whereabouts.conf")).unwrap()).unwrap();
    assert_eq!(flat["datastore"], "kubernetes", "flat file: {flat}");
    // With the node agent (the manifest's default) the plugin holds no credentials: the
    // installer writes no host kubeconfig, and the flat file names the agent's socket.
    assert!(
        !folder.join("whereabouts.kubeconfig").exists(),
        "a host kubeconfig beside the agent"
    );
    assert!(flat["agent_socket"].is_string(), "flat file: {flat}");
    let out = Command::new(&installed)
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("run the installed plugin on the host");
    assert!(out.status.success(), "CNI VERSION on the host: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));
}

/// The test pods' namespace and the NetworkAttachmentDefinition: macvlan on the node's uplink,
/// addresses from whereabouts.
fn network(node: &Node) {
    let config = json!({
        "cniVersion": "0.4.0",
        "type": "macvlan",
        "master": "eth0",
        "mode": "bridge",
        "ipam": {"type": "whereabouts", "range": RANGE},
    });
    node.apply(&[
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PODS}}),
        json!({
            "apiVersion": "k8s.cni.cncf.io/v1",
            "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": NETWORK, "namespace": PODS},
            "spec": {"config": config.to_string()},
        }),
    ]);
    // Pods need the namespace's default service account (the controller manager makes it).
    wait_until(
        "the default service account",
        Duration::from_secs(60),
        || {
            node.plane
                .kubectl_as(
                    &node.plane.kubeconfig,
                    &["get", "serviceaccount", "default", "-n", PODS],
                )
                .status
                .success()
        },
    );
}

/// A pod template's spec: busybox that stops at once when asked.
fn pod_spec() -> Value {
    json!({
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "main",
            "image": BUSYBOX,
            "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
        }],
    })
}

fn pod(name: &str, label: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": PODS,
            "labels": {"test": label},
            "annotations": {"k8s.v1.cni.cncf.io/networks": NETWORK},
        },
        "spec": pod_spec(),
    })
}

/// Pods `label-NN` for NN in `numbers`, labelled `test=label`.
fn create_pods(node: &Node, label: &str, numbers: std::ops::Range<usize>) -> Vec<String> {
    let names: Vec<String> = numbers.map(|i| format!("{label}-{i:02}")).collect();
    let pods: Vec<Value> = names.iter().map(|n| pod(n, label)).collect();
    node.apply(&pods);
    names
}

fn wait_ready(node: &Node, selector: &str) {
    node.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "-l",
        selector,
        "-n",
        PODS,
        "--timeout=300s",
    ]);
}

/// The address of `net1` as the pod itself sees it (`ip addr` inside the pod).
fn address_inside(node: &Node, pod: &str) -> Ipv4Addr {
    let out = node.kubectl(&[
        "exec", "-n", PODS, pod, "--", "ip", "-4", "-o", "addr", "show", "dev", "net1", "up",
    ]);
    let cidr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no IPv4 address on net1 of {pod}: {out}"));
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// The address Multus reported for the secondary network in the pod's annotation.
fn address_reported(node: &Node, pod: &str) -> Ipv4Addr {
    let object = node.get(&["pod", pod, "-n", PODS]);
    let text = object["metadata"]["annotations"][NETWORK_STATUS]
        .as_str()
        .unwrap_or_else(|| panic!("{pod} has no network-status annotation"));
    let statuses: Vec<Value> = serde_json::from_str(text).unwrap();
    let ours = statuses
        .iter()
        .find(|s| s["name"] == format!("{PODS}/{NETWORK}"))
        .unwrap_or_else(|| panic!("{pod}: no status for {NETWORK}: {text}"));
    assert_eq!(ours["interface"], "net1", "{pod}: {text}");
    ours["ips"][0].as_str().unwrap().parse().unwrap()
}

/// Each pod's address, read inside the pod and from its annotation (which must agree).
fn addresses_of(node: &Node, pods: &[String]) -> BTreeMap<String, Ipv4Addr> {
    pods.iter()
        .map(|pod| {
            let inside = address_inside(node, pod);
            assert_eq!(inside, address_reported(node, pod), "{pod}");
            (pod.clone(), inside)
        })
        .collect()
}

/// What the store holds (address -> `namespace/pod`) once the IPPool's allocations and the
/// reservations agree: they are two objects, read one after the other, and an allocation or
/// release in flight between the two reads shows in one and not yet in the other.
fn held(node: &Node) -> BTreeMap<Ipv4Addr, String> {
    let limit = Instant::now() + Duration::from_secs(60);
    loop {
        let (from_pools, from_reservations) = pools_and_reservations(node);
        if from_pools == from_reservations {
            return from_pools;
        }
        assert!(
            Instant::now() < limit,
            "pool and reservations differ: {from_pools:?} against {from_reservations:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

type Held = BTreeMap<Ipv4Addr, String>;

/// The IPPools' allocations by offset and the reservations (one per address).
fn pools_and_reservations(node: &Node) -> (Held, Held) {
    let pools = node.get(&["ippools.whereabouts.cni.cncf.io", "-n", SYSTEM]);
    let mut from_pools = BTreeMap::new();
    for pool in pools["items"].as_array().unwrap() {
        let range = pool["spec"]["range"].as_str().unwrap();
        let base: Ipv4Addr = range.split('/').next().unwrap().parse().unwrap();
        let allocations = pool["spec"]["allocations"].as_object().cloned();
        for (offset, who) in allocations.unwrap_or_default() {
            let ip = Ipv4Addr::from(u32::from(base) + offset.parse::<u32>().unwrap());
            let podref = who["podref"].as_str().unwrap().to_string();
            assert!(from_pools.insert(ip, podref).is_none(), "{ip} twice");
        }
    }
    let reservations = node.get(&[
        "overlappingrangeipreservations.whereabouts.cni.cncf.io",
        "-n",
        SYSTEM,
    ]);
    let from_reservations: BTreeMap<Ipv4Addr, String> = reservations["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ip = r["metadata"]["name"].as_str().unwrap().parse().unwrap();
            (ip, r["spec"]["podref"].as_str().unwrap().to_string())
        })
        .collect();
    (from_pools, from_reservations)
}

/// The store holds exactly these pods' addresses.
/// The store holds exactly these pods' addresses once the runtime's DELs of sandboxes torn down
/// before them (failed ADDs retried, pods deleted just before) have landed.
fn assert_held(node: &Node, addresses: &BTreeMap<String, Ipv4Addr>) {
    let expected: BTreeMap<Ipv4Addr, String> = addresses
        .iter()
        .map(|(pod, ip)| (*ip, format!("{PODS}/{pod}")))
        .collect();
    let limit = Instant::now() + Duration::from_secs(60);
    let mut now_held = held(node);
    while now_held != expected && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(250));
        now_held = held(node);
    }
    assert_eq!(now_held, expected);
}

fn assert_distinct_in_range(addresses: &BTreeMap<String, Ipv4Addr>) {
    let distinct: BTreeSet<&Ipv4Addr> = addresses.values().collect();
    assert_eq!(distinct.len(), addresses.len(), "duplicates: {addresses:?}");
    for ip in addresses.values() {
        assert_eq!(ip.octets()[..3], [192, 168, 200], "{ip} is outside {RANGE}");
    }
}

fn delete_pods(node: &Node, selector: &str) {
    node.kubectl(&["delete", "pod", "-l", selector, "-n", PODS, "--wait=true"]);
}

fn wait_released(node: &Node, pods: &BTreeMap<String, Ipv4Addr>) {
    wait_until("the addresses' release", Duration::from_secs(120), || {
        let held = held(node);
        pods.values().all(|ip| !held.contains_key(ip))
    });
}

/// `whereabouts pools` and `allocations` in the DaemonSet's agent container, with the pod's
/// service account (no kubeconfig file there).
fn cli_in_daemonset(node: &Node, command: &str) -> Value {
    let out = node.kubectl(&[
        "exec",
        "-n",
        SYSTEM,
        "daemonset/whereabouts",
        "-c",
        "agent",
        "--",
        "/whereabouts",
        command,
        "--datastore",
        "kubernetes",
        "-o",
        "json",
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("whereabouts {command}: {e}: {out}"))
}

fn check_cli(node: &Node, addresses: &BTreeMap<String, Ipv4Addr>) {
    let rows = cli_in_daemonset(node, "allocations");
    let shown: BTreeMap<Ipv4Addr, String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ip = r["address"].as_str().unwrap().parse().unwrap();
            (ip, r["pod"].as_str().unwrap().to_string())
        })
        .collect();
    let expected: BTreeMap<Ipv4Addr, String> = addresses
        .iter()
        .map(|(pod, ip)| (*ip, format!("{PODS}/{pod}")))
        .collect();
    assert_eq!(shown, expected, "whereabouts allocations");
    let pools = cli_in_daemonset(node, "pools");
    let pool = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["range"] == RANGE)
        .unwrap_or_else(|| panic!("whereabouts pools has no {RANGE}: {pools}"));
    assert_eq!(pool["used"], addresses.len(), "whereabouts pools: {pools}");
}

/// 30 pods at once: each gets a distinct address, the store and the CLI say so, and deleting
/// the pods frees every address.
fn thirty_pods(node: &Node) {
    let pods = create_pods(node, "many", 0..30);
    served_then_released(node, "many", &pods);
    assert_eq!(held(node), BTreeMap::new());
}

/// The pods labelled `test=<label>` become Ready, each with a distinct address of the range
/// that the store and the CLI show; once they are deleted, every address is free.
fn served_then_released(node: &Node, label: &str, pods: &[String]) {
    let selector = format!("test={label}");
    wait_ready(node, &selector);
    let addresses = addresses_of(node, pods);
    assert_distinct_in_range(&addresses);
    assert_held(node, &addresses);
    check_cli(node, &addresses);
    delete_pods(node, &selector);
    wait_released(node, &addresses);
}

/// A drain evicts the controller's replicas one at a time. With the node cordoned (as a drain
/// does) the first replica's replacement cannot start, so the budget refuses the second
/// eviction for as long as the drain would retry it, and one replica stays running.
fn a_drain_leaves_one_controller(node: &Node) {
    rollout(node, "deployment/whereabouts-controller");
    let budget = || node.get(&["pdb", "whereabouts-controller", "-n", SYSTEM]);
    wait_until(
        "the controller's budget to count both replicas",
        Duration::from_secs(60),
        || budget()["status"]["disruptionsAllowed"] == 1,
    );
    let node_name = text(&node.get(&["nodes"])["items"][0]["metadata"]["name"]);
    node.kubectl(&["cordon", &node_name]);

    let selector = ["pods", "-n", SYSTEM, "-l", "app=whereabouts-controller"];
    // Pods of the rollout's old replica set may still be terminating.
    let replicas: Vec<String> = node.get(&selector)["items"]
        .as_array()
        .expect("pod list")
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| text(&p["metadata"]["name"]))
        .collect();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    // kubectl, as a drain sends them: the client library here retries a 429 on its own.
    let evict = |name: &str| {
        let eviction = node.plane.dir.join(format!("eviction-{name}.json"));
        let body = json!({"apiVersion": "policy/v1", "kind": "Eviction",
                          "metadata": {"name": name, "namespace": SYSTEM}});
        std::fs::write(&eviction, body.to_string()).unwrap();
        let path = format!("/api/v1/namespaces/{SYSTEM}/pods/{name}/eviction");
        let eviction = eviction.display().to_string();
        let args = ["create", "--raw", &path, "-f", &eviction];
        node.plane.kubectl_as(&node.plane.kubeconfig, &args)
    };
    let first = evict(&replicas[0]);
    assert!(
        first.status.success(),
        "the first replica's eviction: {first:?}"
    );
    let second = evict(&replicas[1]);
    assert!(
        !second.status.success()
            && String::from_utf8_lossy(&second.stderr).contains("disruption budget"),
        "the second replica's eviction was not refused by the budget: {second:?}"
    );
    let running = node.get(&["pod", &replicas[1], "-n", SYSTEM]);
    assert_eq!(running["status"]["phase"], "Running");
    assert!(running["metadata"]["deletionTimestamp"].is_null());

    node.kubectl(&["uncordon", &node_name]);
    rollout(node, "deployment/whereabouts-controller");
}

fn text(value: &Value) -> String {
    value.as_str().expect("a string").to_string()
}

/// Pods force-deleted while the node's runtime is stopped get no DEL: the controller frees
/// their addresses. The runtime's late DEL, once it is back, changes nothing.
fn force_deleted_while_runtime_stopped(node: &Node) {
    rollout(node, "deployment/whereabouts-controller");
    let pods = create_pods(node, "gone", 0..5);
    wait_ready(node, "test=gone");
    let addresses = addresses_of(node, &pods);
    assert_held(node, &addresses);

    node.node_script("stop-runtime");
    node.kubectl(&[
        "delete",
        "pod",
        "-l",
        "test=gone",
        "-n",
        PODS,
        "--force",
        "--grace-period=0",
    ]);
    wait_released(node, &addresses);
    node.node_script("start-runtime");

    // The node works on, and the pods' sandboxes, torn down now, free nothing twice.
    let pods = create_pods(node, "after", 0..5);
    wait_ready(node, "test=after");
    let after = addresses_of(node, &pods);
    assert_distinct_in_range(&after);
    assert_held(node, &after);
    delete_pods(node, "test=after");
    wait_released(node, &after);
}

/// A StatefulSet's pod deleted and re-created under the same name has a working interface and
/// exactly one address.
fn statefulset_pod_recreated(node: &Node) {
    let mut template = pod("unused", "keep");
    template["metadata"] = json!({
        "labels": {"test": "keep"},
        "annotations": {"k8s.v1.cni.cncf.io/networks": NETWORK},
    });
    node.apply(&[json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "keep", "namespace": PODS},
        "spec": {
            "serviceName": "keep",
            "replicas": 1,
            "selector": {"matchLabels": {"test": "keep"}},
            "template": {"metadata": template["metadata"], "spec": pod_spec()},
        },
    })]);
    let pods = vec!["keep-0".to_string()];
    wait_for_pod(node, "keep-0");
    wait_ready(node, "test=keep");
    let first_uid = node.get(&["pod", "keep-0", "-n", PODS])["metadata"]["uid"].clone();
    assert_held(node, &addresses_of(node, &pods));

    node.kubectl(&["delete", "pod", "keep-0", "-n", PODS, "--wait=true"]);
    wait_until("keep-0 re-created", Duration::from_secs(120), || {
        let out = node.plane.kubectl_as(
            &node.plane.kubeconfig,
            &[
                "get",
                "pod",
                "keep-0",
                "-n",
                PODS,
                "-o",
                "jsonpath={.metadata.uid}",
            ],
        );
        out.status.success() && String::from_utf8_lossy(&out.stdout) != first_uid.as_str().unwrap()
    });
    wait_ready(node, "test=keep");
    let again = addresses_of(node, &pods);
    assert_held(node, &again);

    node.kubectl(&["delete", "statefulset", "keep", "-n", PODS, "--wait=true"]);
    wait_until("keep-0 gone", Duration::from_secs(120), || {
        !node
            .plane
            .kubectl_as(
                &node.plane.kubeconfig,
                &["get", "pod", "keep-0", "-n", PODS],
            )
            .status
            .success()
    });
    wait_released(node, &again);
}

fn wait_for_pod(node: &Node, name: &str) {
    wait_until(name, Duration::from_secs(120), || {
        node.plane
            .kubectl_as(&node.plane.kubeconfig, &["get", "pod", name, "-n", PODS])
            .status
            .success()
    });
}

/// Pods created while the DaemonSet's pod restarts and then rolls to a new image tag: every pod
/// gets a distinct address and the store holds exactly theirs.
fn daemonset_restarted_and_upgraded_midway(node: &Node) {
    let mut pods = create_pods(node, "during", 0..10);
    node.kubectl(&["rollout", "restart", "daemonset/whereabouts", "-n", SYSTEM]);
    pods.extend(create_pods(node, "during", 10..20));
    node.kubectl(&[
        "set",
        "image",
        "daemonset/whereabouts",
        "-n",
        SYSTEM,
        "whereabouts=ghcr.io/whereabouts-rs/whereabouts:next",
    ]);
    pods.extend(create_pods(node, "during", 20..30));
    rollout(node, "daemonset/whereabouts");
    // The rollout is complete once the new pod is ready; the old one may still be terminating
    // for a moment, and is listed until it is gone.
    let images = || -> Vec<String> {
        let running = node.get(&["pods", "-n", SYSTEM, "-l", "name=whereabouts"]);
        running["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["spec"]["containers"][0]["image"].as_str())
            .map(String::from)
            .collect()
    };
    wait_until(
        "only the upgraded agent pod",
        Duration::from_secs(120),
        || images() == ["ghcr.io/whereabouts-rs/whereabouts:next"],
    );

    served_then_released(node, "during", &pods);
}

/// One node cluster at a time: each is a kubelet and a runtime on a 2-core machine.
static ONE_NODE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_seed_manifest_on_a_real_node() {
    let _one = ONE_NODE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(plane) = kube_apiserver::node_cluster("seed") else {
        return;
    };
    let node = Node { plane };
    seed_apply(&node);
    rollout(&node, "daemonset/whereabouts");
    check_installed_files(&node);
    network(&node);

    thirty_pods(&node);
    a_drain_leaves_one_controller(&node);
    force_deleted_while_runtime_stopped(&node);
    statefulset_pod_recreated(&node);
    daemonset_restarted_and_upgraded_midway(&node);
    plane.down();
}

#[test]
fn the_seed_helm_chart_on_a_fresh_node() {
    let _one = ONE_NODE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(plane) = kube_apiserver::node_cluster("helm") else {
        return;
    };
    let node = Node { plane };
    let out = Command::new(plane.tools.join("helm"))
        .current_dir(repo())
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args([
            "upgrade",
            "--install",
            "whereabouts",
            "./deploy/helm/whereabouts",
        ])
        .args(["--namespace", SYSTEM])
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm upgrade --install: {out:?}");
    rollout(&node, "daemonset/whereabouts");
    check_installed_files(&node);
    network(&node);

    let pods = create_pods(&node, "chart", 0..10);
    wait_ready(&node, "test=chart");
    let addresses = addresses_of(&node, &pods);
    assert_distinct_in_range(&addresses);
    assert_held(&node, &addresses);
    delete_pods(&node, "test=chart");
    wait_released(&node, &addresses);
    plane.down();
}
