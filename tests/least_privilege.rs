//! Least privilege, proven on the real API server (RBAC and TLS on). The deployment manifest is
//! applied with the seed's command; the plugin and the controller run with tokens of its service
//! accounts and do everything they do in a cluster. The API server's audit log then says which
//! requests they made, and the manifest's rules must grant exactly those (derived, not pinned):
//! every rule is used, leaving any one out makes a request fail, and `kubectl auth can-i --list`
//! shows nothing beyond the rules.

mod agent_process;
mod deployment;
mod kube_apiserver;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use deployment::cni::{self, Call, Reply};
use deployment::{bin, roles, user, AuditLog, Deployed, Request, CONTROLLER, NAMESPACE, PLUGIN};
use kube_apiserver::{resource, TestNamespace};
use serde_json::{json, Value};

/// The label of the nodes this test makes, so that those of an interrupted run can be found.
const NODE_LABEL: &str = "whereabouts-test=least-privilege";

/// Why a scenario stopped before doing everything (shown through Debug only).
#[derive(Debug)]
#[allow(dead_code)]
enum Stop {
    Cni(String),
    Refused(Vec<Request>),
    Timeout(String),
}

/// The plugin's and the controller's operations, each with its own service account's token.
struct Scenario<'a> {
    deployed: &'a Deployed,
    /// Where the pods live.
    ns: TestNamespace,
    audit: AuditLog,
    plugin_kubeconfig: PathBuf,
    controller_kubeconfig: PathBuf,
    /// Makes network and node names unique to this run.
    id: String,
    /// Stop at the first refused request rather than waiting for outcomes that cannot come.
    probe: bool,
    nodes: RefCell<Vec<String>>,
}

impl Drop for Scenario<'_> {
    /// Removes what later controllers would otherwise keep working on (namespaces are never
    /// gone: no controller manager runs).
    fn drop(&mut self) {
        let plane = self.deployed.plane;
        let delete = |args: &[&str]| {
            let _ = plane.kubectl_as(&plane.kubeconfig, args);
        };
        for node in self.nodes.borrow().iter() {
            delete(&["delete", "node", node, "--wait=false"]);
        }
        let nads = "network-attachment-definitions.k8s.cni.cncf.io";
        delete(&["delete", nads, "--all", "-n", &self.ns.name, "--wait=false"]);
        let sliced = format!("{}-sliced", self.id);
        delete(&["delete", nads, &sliced, "-n", NAMESPACE, "--wait=false"]);
    }
}

impl<'a> Scenario<'a> {
    fn new(deployed: &'a Deployed, probe: bool) -> Scenario<'a> {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let id = format!(
            "lp-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::SeqCst)
        );
        let plane = deployed.plane;
        plane.kubectl(&["delete", "nodes", "-l", NODE_LABEL, "--wait=false"]);
        let ns = plane.namespace("lp");
        // Pods need their namespace's default service account (no controller manager makes it).
        ns.apply(
            &resource("serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
        );
        Scenario {
            deployed,
            ns,
            audit: AuditLog::from_now(deployed.plane),
            plugin_kubeconfig: deployed.kubeconfig(PLUGIN),
            controller_kubeconfig: deployed.kubeconfig(CONTROLLER),
            id,
            probe,
            nodes: RefCell::new(Vec::new()),
        }
    }

    fn run(&self) -> Result<(), Stop> {
        self.plugin_calls()?;
        self.agent_calls()?;
        self.go_lease_calls()?;
        self.node_slice_calls()?;
        self.controller_work()
    }

    /// Waits until the audit log holds everything both accounts did.
    fn flush(&self) {
        let plane = self.deployed.plane;
        self.audit.flush(plane, &self.plugin_kubeconfig);
        self.audit.flush(plane, &self.controller_kubeconfig);
    }

    fn system(&self) -> TestNamespace {
        TestNamespace {
            plane: self.deployed.plane,
            name: NAMESPACE.to_string(),
        }
    }

    fn netconf(&self, network: &str, range: &str, extra: Value) -> String {
        let mut ipam = json!({
            "type": "whereabouts",
            "range": range,
            "network_name": network,
            "log_level": "error",
            "kubernetes": {"kubeconfig": self.plugin_kubeconfig.display().to_string()},
        });
        if let (Some(map), Value::Object(more)) = (ipam.as_object_mut(), extra) {
            map.extend(more);
        }
        cni::netconf(network, &ipam)
    }

    /// One plugin call for the pod named `container` of the test namespace.
    fn cni(
        &self,
        command: &str,
        container: &str,
        node: Option<&str>,
        conf: &str,
    ) -> Result<Reply, Stop> {
        self.cni_with(command, container, node, conf, Vec::new())
    }

    /// As [`Scenario::cni`], with more environment.
    fn cni_with(
        &self,
        command: &str,
        container: &str,
        node: Option<&str>,
        conf: &str,
        mut env: Vec<(&'static str, String)>,
    ) -> Result<Reply, Stop> {
        env.push(("WHEREABOUTS_KUBERNETES_TIMEOUT", "2".into()));
        let call = Call {
            command,
            container,
            ifname: "net1",
            pod: Some((&self.ns.name, container)),
            node,
            env,
        };
        self.answered(&call, conf)
    }

    /// The reply to `call`, if it succeeded.
    fn answered(&self, call: &Call, conf: &str) -> Result<Reply, Stop> {
        let reply = cni::run(bin(), call, conf);
        if reply.code != 0 {
            let (command, container) = (call.command, call.container);
            return Err(Stop::Cni(format!("{command} {container}: {reply:?}")));
        }
        Ok(reply)
    }

    /// Polls `done`; in a probe, a refused request ends the wait at once.
    fn wait(&self, what: &str, mut done: impl FnMut() -> bool) -> Result<(), Stop> {
        let start = Instant::now();
        while !done() {
            if self.probe {
                let mut refused = self.audit.refused(PLUGIN);
                refused.extend(self.audit.refused(CONTROLLER));
                if !refused.is_empty() {
                    return Err(Stop::Refused(refused));
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(Stop::Timeout(what.to_string()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// STATUS, ADD, CHECK, DEL and a GC, which in a pool shared by all nodes asks where the
    /// pod of an unlisted attachment runs (pod `b` does not exist: its address is freed). Pod
    /// `a`'s new sandbox takes its address and reservation over (an update).
    fn plugin_calls(&self) -> Result<(), Stop> {
        let network = format!("{}-plain", self.id);
        let conf = self.netconf(&network, "10.201.0.0/24", json!({}));
        let node = format!("{}-node", self.id);
        self.cni("STATUS", "", None, &conf)?;
        self.cni("ADD", "a", Some(&node), &conf)?;
        self.cni("ADD", "b", Some(&node), &conf)?;
        self.cni("CHECK", "a", None, &conf)?;
        let new_sandbox = Call {
            command: "ADD",
            container: "a-2",
            ifname: "net1",
            pod: Some((&self.ns.name, "a")),
            node: Some(&node),
            env: vec![("WHEREABOUTS_KUBERNETES_TIMEOUT", "2".into())],
        };
        self.answered(&new_sandbox, &conf)?;
        self.cni(
            "GC",
            "",
            Some(&node),
            &with_valid_attachments(&conf, &["a-2"]),
        )?;
        self.cni("DEL", "a-2", None, &conf)?;
        self.assert_empty(&format!("{network}-10.201.0.0-24"));
        Ok(())
    }

    /// ADDs and DELs through a node agent with the plugin's account, as the DaemonSet runs it:
    /// besides what the plugin does, it lists and watches the pools, the reservations and the Go
    /// binaries' Lease.
    fn agent_calls(&self) -> Result<(), Stop> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let temp = std::env::temp_dir()
            .canonicalize()
            .expect("the temporary directory");
        let settings = json!({"datastore": "kubernetes", "log_level": "debug",
                              "kubernetes": {"kubeconfig": self.plugin_kubeconfig},
                              "allow_inline_paths": [temp], "allow_insecure_tls": true});
        let within = Duration::from_secs(if self.probe { 10 } else { 60 });
        let agent = agent_process::Agent::try_start(dir.path(), "lp-agent", settings, within)
            .map_err(Stop::Cni)?;
        let network = format!("{}-agent", self.id);
        let conf = self.netconf(&network, "10.205.0.0/24", json!({}));
        let env = vec![
            agent.env(),
            (
                "WHEREABOUTS_FLAT_FILE",
                agent.flat_file.display().to_string(),
            ),
        ];
        let watched = |resource: &str| {
            self.audit
                .requests(PLUGIN)
                .iter()
                .any(|r| r.verb == "watch" && r.resource == resource && r.code == 200)
        };
        self.wait("the agent's watches", || {
            ["ippools", "overlappingrangeipreservations", "leases"]
                .iter()
                .all(|resource| watched(resource))
        })?;
        for (command, pod) in [("ADD", "x"), ("ADD", "y"), ("DEL", "x"), ("DEL", "y")] {
            self.cni_with(command, pod, None, &conf, env.clone())?;
        }
        if agent.metric("whereabouts_agent_requests_total") < 4.0 {
            return Err(Stop::Cni(format!(
                "the agent did not serve: {}",
                agent.log_text()
            )));
        }
        self.assert_empty(&format!("{network}-10.205.0.0-24"));
        Ok(())
    }

    /// ADDs beside a Go Whereabouts: one after a Go binary released its Lease `whereabouts`
    /// (the plugin notices and takes the Lease: get, update), one with the flat file saying Go
    /// binaries are present while the Lease is missing (create).
    fn go_lease_calls(&self) -> Result<(), Stop> {
        let network = format!("{}-go", self.id);
        let conf = self.netconf(&network, "10.203.0.0/24", json!({}));
        let system = self.system();
        system.delete("leases", "whereabouts");
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        system.create(
            "leases",
            json!({
                "metadata": {"name": "whereabouts"},
                "spec": {"leaseDurationSeconds": 1, "renewTime": now, "acquireTime": now,
                         "leaseTransitions": 3},
            }),
        );
        self.cni("ADD", "g", None, &conf)?;
        let lease = system.get("leases", "whereabouts").unwrap_or_default();
        if !self.probe {
            assert!(
                lease["metadata"]["annotations"]["whereabouts.cni.cncf.io/go-renew-time"]
                    .is_string(),
                "the ADD took part in the Lease: {lease}"
            );
            assert!(
                lease["spec"]["holderIdentity"].is_null(),
                "released: {lease}"
            );
        }
        system.delete("leases", "whereabouts");
        let flat = std::env::temp_dir().join(format!("{}-present.conf", self.id));
        let text = json!({"allow_inline_paths": [std::env::temp_dir()], "allow_insecure_tls": true,
                          "go_whereabouts": "present"});
        std::fs::write(&flat, text.to_string()).expect("write a flat file");
        let present = vec![("WHEREABOUTS_FLAT_FILE", flat.display().to_string())];
        self.cni_with("ADD", "h", None, &conf, present.clone())?;
        if !self.probe {
            assert!(system.get("leases", "whereabouts").is_some(), "created");
        }
        self.cni_with("DEL", "h", None, &conf, present)?;
        let _ = std::fs::remove_file(&flat);
        self.cni("DEL", "g", None, &conf)?;
        system.delete("leases", "whereabouts");
        self.assert_empty(&format!("{network}-10.203.0.0-24"));
        Ok(())
    }

    /// ADD and DEL in a node's slice of a NodeSlicePool, and a GC that frees what the runtime's
    /// list leaves out.
    fn node_slice_calls(&self) -> Result<(), Stop> {
        let network = format!("{}-slices", self.id);
        let node = format!("{}-slice-node", self.id);
        // Labelled as the controller labels its own: its network (no NetworkAttachmentDefinition
        // asks for it) is gone by the time the controller starts, which removes it.
        self.system().create(
            "nodeslicepools",
            json!({
                "metadata": {"name": network,
                             "labels": {"app.kubernetes.io/managed-by": "whereabouts-controller"}},
                "spec": {"range": "10.202.0.0/24", "sliceSize": "/28"},
                "status": {"allocations": [{"nodeName": node, "sliceRange": "10.202.0.16/28"}]},
            }),
        );
        let conf = self.netconf(&network, "10.202.0.0/24", json!({"node_slice_size": "/28"}));
        let reply = self.cni("ADD", "d", Some(&node), &conf)?;
        assert!(reply.ips()[0].starts_with("10.202.0."), "{reply:?}");
        self.cni("ADD", "e", Some(&node), &conf)?;
        self.cni(
            "GC",
            "",
            Some(&node),
            &with_valid_attachments(&conf, &["d"]),
        )?;
        self.cni("DEL", "d", Some(&node), &conf)?;
        self.assert_empty(&format!("{network}-{node}-10.202.0.16-28"));
        Ok(())
    }

    /// A pool of kube-system holds no allocation (when a probe left a request out, it may).
    fn assert_empty(&self, pool: &str) {
        if self.probe {
            return;
        }
        let pool = self
            .system()
            .get("ippools", pool)
            .unwrap_or_else(|| panic!("no pool {pool}"));
        let allocations = &pool["spec"]["allocations"];
        assert!(
            allocations.as_object().is_none_or(|a| a.is_empty()),
            "{allocations}"
        );
    }

    fn add_node(&self, name: &str) {
        self.nodes.borrow_mut().push(name.to_string());
        let (key, value) = NODE_LABEL.split_once('=').unwrap();
        self.ns.apply(
            &resource("nodes"),
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "labels": {key: value}}}),
        );
    }

    /// The nodes the controller gave a slice of `network`'s NodeSlicePool.
    fn sliced_nodes(&self, network: &str) -> Vec<String> {
        let Some(pool) = self.system().get("nodeslicepools", network) else {
            return Vec::new();
        };
        pool["status"]["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["nodeName"].as_str().map(String::from))
            .collect()
    }

    /// The controller frees the address of a deleted pod (with an Event) and keeps a
    /// NodeSlicePool in step with the nodes.
    fn controller_work(&self) -> Result<(), Stop> {
        let network = format!("{}-freed", self.id);
        let conf = self.netconf(&network, "10.204.0.0/24", json!({}));
        self.ns.create(
            "pods",
            json!({"metadata": {"name": "victim"}, "spec": {
                "automountServiceAccountToken": false,
                "containers": [{"name": "c", "image": "registry.invalid/none"}]}}),
        );
        self.cni("ADD", "victim", None, &conf)?;
        let sliced = format!("{}-sliced", self.id);
        let ipam = json!({"type": "whereabouts", "range": "10.203.0.0/24",
                          "node_slice_size": "/28", "network_name": sliced});
        // In the installation's namespace, so that the NodeSlicePool is owned by it: the API
        // server enforces owner references' permissions (hack/control-plane), as OpenShift does.
        self.system().create(
            "network-attachment-definitions",
            json!({"metadata": {"name": sliced},
                   "spec": {"config": cni::netconf(&sliced, &ipam)}}),
        );
        let first = format!("{}-a", self.id);
        self.add_node(&first);

        // A first controller creates its leader Lease; an earlier test's may still be there.
        self.system().delete("leases", "whereabouts-controller");
        let controller = Controller::start(&self.controller_kubeconfig, self.deployed.dir.path());
        let result = self.controller_outcomes(&controller, &network, &sliced, &first);
        if result.is_err() && !self.probe {
            eprintln!("controller log:\n{}", controller.log());
        }
        result
    }

    fn controller_outcomes(
        &self,
        controller: &Controller,
        network: &str,
        sliced: &str,
        first: &str,
    ) -> Result<(), Stop> {
        self.wait("a slice for the first node", || {
            self.sliced_nodes(sliced).iter().any(|n| n == first)
        })?;
        self.wait("the NodeSlicePool no network asks for removed", || {
            let unwanted = format!("{}-slices", self.id);
            self.system().get("nodeslicepools", &unwanted).is_none()
        })?;
        let second = format!("{}-b", self.id);
        self.add_node(&second);
        self.wait("a slice for the second node", || {
            self.sliced_nodes(sliced).iter().any(|n| n == &second)
        })?;
        // Deleted only once the pod watch runs, the leader has renewed its Lease and its
        // start-up and election reconciles are done, so that the watch, not a reconcile, sees
        // the deletion and the controller reads the pod.
        let controller_did = |verb: &str, resource: &str| {
            self.audit
                .requests(CONTROLLER)
                .iter()
                .any(|r| r.verb == verb && r.resource == resource && r.code == 200)
        };
        self.wait("the controller's pod watch", || {
            controller_did("watch", "pods")
        })?;
        self.wait("the leader renewing its Lease", || {
            controller_did("update", "leases")
        })?;
        // The two may run as one reconcile naming both reasons, and a start-up reconcile asked
        // for before the election is left to the election's: either way it is over.
        self.wait("the start-up and election reconciles done", || {
            let settled: Vec<String> = controller
                .log()
                .lines()
                .filter(|l| l.contains(" reconciled why=") || l.contains("left to the leader"))
                .map(String::from)
                .collect();
            let done = |reason: &str| settled.iter().any(|l| l.contains(reason));
            done("start-up") && done("elected")
        })?;
        self.ns.delete("pods", "victim");
        let pool = format!("{network}-10.204.0.0-24");
        self.wait("the deleted pod's address freed", || {
            self.system().get("ippools", &pool).is_some_and(|p| {
                p["spec"]["allocations"]
                    .as_object()
                    .is_none_or(|a| a.is_empty())
            })
        })?;
        self.wait("an Event for the freed address", || {
            self.ns
                .list("events")
                .iter()
                .any(|e| e["reason"] == "AddressReleased")
        })
    }
}

/// `conf` for a CNI GC whose runtime knows only `containers` (on net1).
fn with_valid_attachments(conf: &str, containers: &[&str]) -> String {
    let mut gc: Value = serde_json::from_str(conf).unwrap();
    gc["cni.dev/valid-attachments"] = containers
        .iter()
        .map(|c| json!({"containerID": c, "ifname": "net1"}))
        .collect();
    gc.to_string()
}

/// `whereabouts controller` on the Kubernetes engine, stopped when dropped.
struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn start(kubeconfig: &Path, dir: &Path) -> Controller {
        let log = dir.join("controller.log");
        let child = Command::new(bin())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(cni::trust::FLAT_FILE_ENV, cni::trust::test_flat_file())
            .args(["controller", "--datastore", "kubernetes", "--kubeconfig"])
            .arg(kubeconfig)
            // A short lease: the scenario sees the leader renew it (an update) within seconds.
            .args([
                "--listen",
                "127.0.0.1:0",
                "--watch-timeout",
                "5",
                "--lease-duration",
                "3",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the controller");
        Controller { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One (resource, verb) a rule grants, where it applies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    /// The Role's namespace; None for a ClusterRole (every namespace and cluster scope).
    namespace: Option<String>,
    group: String,
    resource: String,
    verb: String,
    names: Vec<String>,
}

impl Grant {
    fn covers(&self, request: &Request) -> bool {
        self.group == request.group
            && self.resource == request.resource
            && self.verb == request.verb
            && (self.namespace.is_none() || self.namespace == request.namespace)
            && (self.names.is_empty()
                || request
                    .name
                    .as_ref()
                    .is_some_and(|n| self.names.contains(n)))
    }
}

/// Everything the manifest grants `account`, one (resource, verb) at a time.
fn grants(account: &str) -> Vec<Grant> {
    let mut grants = Vec::new();
    for role in roles().into_iter().filter(|r| r.account == account) {
        for rule in &role.rules {
            for group in &rule.groups {
                for resource in &rule.resources {
                    for verb in &rule.verbs {
                        grants.push(Grant {
                            namespace: role.namespace.clone(),
                            group: group.clone(),
                            resource: resource.clone(),
                            verb: verb.clone(),
                            names: rule.names.clone(),
                        });
                    }
                }
            }
        }
    }
    grants
}

#[test]
fn the_rules_grant_exactly_the_requests_the_plugin_and_controller_make() {
    let plane = real_cluster!();
    let deployed = deployment::deploy(plane);
    let scenario = Scenario::new(&deployed, false);
    if let Err(stop) = scenario.run() {
        panic!("with the manifest's rules: {stop:?}");
    }
    scenario.flush();
    for account in [PLUGIN, CONTROLLER] {
        let requests = scenario.audit.requests(account);
        assert!(!requests.is_empty(), "{account} made no request");
        let refused = scenario.audit.refused(account);
        assert!(refused.is_empty(), "{account} was refused: {refused:#?}");
        let grants = grants(account);
        let ungranted: BTreeSet<_> = requests
            .iter()
            .filter(|r| !grants.iter().any(|g| g.covers(r)))
            .collect();
        assert!(
            ungranted.is_empty(),
            "{account}: not granted by the manifest: {ungranted:#?}"
        );
        let unused: Vec<_> = grants
            .iter()
            .filter(|g| !requests.iter().any(|r| g.covers(r)))
            .collect();
        assert!(
            unused.is_empty(),
            "{account}: granted but never used: {unused:#?}"
        );
        let used: BTreeSet<_> = requests
            .iter()
            .map(|r| format!("{} {}.{}", r.verb, r.resource, r.group))
            .collect();
        eprintln!("{account} used: {used:?}");
    }
}

#[test]
fn leaving_out_any_rule_makes_a_request_fail() {
    let plane = real_cluster!();
    let deployed = deployment::deploy(plane);
    let mut not_needed = Vec::new();
    for role in roles() {
        for (index, rule) in role.rules.iter().enumerate() {
            deployed.apply(&role.without_rule(index));
            let mut rest = role.rules.clone();
            rest.remove(index);
            // False when another rule grants the same; the run below then shows no refusal.
            deployed.wait_for_rules(&role, &rest);
            let scenario = Scenario::new(&deployed, true);
            let outcome = scenario.run();
            scenario.flush();
            let refused = scenario.audit.refused(&role.account);
            drop(scenario);
            deployed.apply(&role.object);
            assert!(
                deployed.wait_for_rules(&role, &role.rules),
                "{} not restored",
                role.name
            );
            let first = refused
                .first()
                .map(|r| format!("{} {}", r.verb, r.resource));
            eprintln!(
                "{} {} without {rule:?}: {} refused (first: {first:?}); the run {}",
                role.kind,
                role.name,
                refused.len(),
                if outcome.is_ok() {
                    "completed"
                } else {
                    "stopped"
                }
            );
            if refused.is_empty() {
                not_needed.push(format!("{} {}: {rule:?}", role.kind, role.name));
            }
        }
    }
    assert!(
        not_needed.is_empty(),
        "rules nothing needs: {not_needed:#?}"
    );
}

/// `kubectl auth can-i --list` for a user with a service account's groups: one
/// (resource, resource names, verb) per granted verb.
fn can_i_list(
    deployed: &Deployed,
    user: &str,
    namespace: &str,
) -> BTreeSet<(String, String, String)> {
    let plane = deployed.plane;
    let out = plane.kubectl(&[
        "auth",
        "can-i",
        "--list",
        "-n",
        namespace,
        &format!("--as={user}"),
        "--as-group=system:serviceaccounts",
        &format!("--as-group=system:serviceaccounts:{NAMESPACE}"),
        "--as-group=system:authenticated",
    ]);
    let mut granted = BTreeSet::new();
    for line in out.lines().skip(1) {
        // Columns: resource, non-resource URLs, resource names, verbs; the bracketed ones may
        // be empty ("[]"). Lines without a resource are non-resource URLs (discovery).
        let columns = bracketed_columns(line);
        let [resource, _, names, verbs] = columns.as_slice() else {
            continue;
        };
        for verb in verbs.split_whitespace() {
            granted.insert((resource.clone(), names.clone(), verb.to_string()));
        }
    }
    granted
}

/// A `can-i --list` line as its columns, brackets removed.
fn bracketed_columns(line: &str) -> Vec<String> {
    let mut columns = Vec::new();
    let mut rest = line.trim_start();
    if !rest.starts_with('[') {
        let (first, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        columns.push(first.to_string());
        rest = tail.trim_start();
    }
    while let Some(open) = rest.strip_prefix('[') {
        let (inside, tail) = open.split_once(']').unwrap_or((open, ""));
        columns.push(inside.to_string());
        rest = tail.trim_start();
    }
    columns
}

/// What the manifest's rules say `account` may do in `namespace`, as `can-i --list` shows it.
fn expected_list(account: &str, namespace: &str) -> BTreeSet<(String, String, String)> {
    let mut expected = BTreeSet::new();
    for role in roles().into_iter().filter(|r| r.account == account) {
        if role.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            continue;
        }
        for rule in &role.rules {
            // `can-i --list` shows a rule naming objects once for each name.
            let names = match rule.names.as_slice() {
                [] => vec![String::new()],
                names => names.to_vec(),
            };
            for resource in &rule.resources {
                for (verb, name) in rule
                    .verbs
                    .iter()
                    .flat_map(|v| names.iter().map(move |n| (v, n)))
                {
                    expected.insert((rule.qualified(resource), name.clone(), verb.clone()));
                }
            }
        }
    }
    expected
}

#[test]
fn can_i_list_shows_nothing_beyond_the_rules() {
    let plane = real_cluster!();
    let deployed = deployment::deploy(plane);
    let elsewhere = plane.namespace("least-privilege-elsewhere");
    for namespace in [NAMESPACE, elsewhere.name.as_str()] {
        // What every service account may do (discovery, reviews of itself): not ours to judge.
        let baseline = can_i_list(&deployed, &user("no-such-account"), namespace);
        for account in [PLUGIN, CONTROLLER] {
            let listed = can_i_list(&deployed, &user(account), namespace);
            let beyond_baseline: BTreeSet<_> = listed.difference(&baseline).cloned().collect();
            assert_eq!(
                beyond_baseline,
                expected_list(account, namespace),
                "{account} in {namespace}"
            );
        }
    }
}

/// A certificate authority that did not sign the API server's certificate.
fn unrelated_ca(dir: &Path) -> Vec<u8> {
    let (key, cert) = (dir.join("other-ca.key"), dir.join("other-ca.crt"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", "/CN=not-the-cluster-ca"])
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success());
    std::fs::read(cert).unwrap()
}

#[test]
fn a_kubeconfig_with_another_ca_is_a_clear_error() {
    let plane = real_cluster!();
    let ns = plane.namespace("wrong-ca");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&kubeconfig).unwrap()).unwrap();
    config["clusters"][0]["cluster"]["certificate-authority-data"] =
        json!(base64::engine::general_purpose::STANDARD.encode(unrelated_ca(dir.path())));
    std::fs::write(&kubeconfig, config.to_string()).unwrap();
    let ipam = json!({"type": "whereabouts", "range": "10.205.0.0/24",
                      "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}});
    let call = Call {
        command: "ADD",
        container: "c1",
        ifname: "net1",
        pod: Some((&ns.name, "p1")),
        node: None,
        env: vec![],
    };
    let started = Instant::now();
    let reply = cni::run(bin(), &call, &cni::netconf("wrong-ca", &ipam));
    eprintln!("{:?}: {}", started.elapsed(), reply.stdout);
    assert_ne!(reply.code, 0, "{reply:?}");
    let error = reply.json();
    let msg = error["msg"].as_str().unwrap_or_default().to_string()
        + " "
        + error["details"].as_str().unwrap_or_default();
    assert!(
        [7, 11].contains(&error["code"].as_u64().unwrap_or(0)),
        "{reply:?}"
    );
    // The field, not its value: the path is the admin's, the log's.
    assert!(
        msg.contains("ipam.kubernetes.kubeconfig"),
        "names the kubeconfig: {msg}"
    );
    assert!(
        !msg.contains(&kubeconfig.display().to_string()),
        "shows the path: {msg}"
    );
    assert!(
        reply.stderr.contains(&kubeconfig.display().to_string()),
        "the log names the kubeconfig: {reply:?}"
    );
    assert!(
        msg.to_lowercase().contains("certificate"),
        "says it is the certificate: {msg}"
    );
}
