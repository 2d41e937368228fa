//! The real control plane (etcd and kube-apiserver with TLS and RBAC, from `hack/control-plane`)
//! as a test fixture. One control plane serves every test binary of a run: the first test to ask
//! starts it in `target/control-plane` and later ones find it running. Each test works in a
//! namespace of its own, so tests running at once never see each other's pools and reservations.
//!
//! Under `CI=true` a control plane that cannot be started fails the test; elsewhere the test is
//! skipped with a loud message (building the tools needs Go and a few minutes once).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use base64::Engine as _;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

pub const GROUP: &str = "whereabouts.cni.cncf.io";

/// A running control plane.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// Where kubectl, helm and the other Go tools are.
    pub tools: PathBuf,
    pub server: String,
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[allow(clippy::duplicate_mod)]
#[path = "../common/ci.rs"]
mod ci;
pub use ci::in_ci;

/// The shared control plane, started on first use; `None` (after a loud message) when it cannot
/// be started outside CI.
pub fn control_plane() -> Option<&'static ControlPlane> {
    static PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    usable(PLANE.get_or_init(|| start(target().join("control-plane"), true)))
}

/// A control plane whose API server applies API Priority and Fairness, as production's do
/// (`hack/control-plane up --flow-control`), in `target/control-plane-flow-control`: for the
/// tests of a client the server throttles. CRDs applied, as on the shared plane.
pub fn flow_control_plane() -> Option<&'static ControlPlane> {
    static PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    usable(PLANE.get_or_init(|| {
        let dir = target().join("control-plane-flow-control");
        start_with(dir, &["--flow-control"], true)
    }))
}

/// A control plane of its own, in `target/control-plane-<name>`, for tests that install
/// cluster-wide objects (the manifest, the Helm release) and so cannot share one. Nothing is
/// applied to it: the test installs the CRDs the way a user would.
pub fn dedicated_control_plane(name: &str) -> Option<&'static ControlPlane> {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    type Planes = BTreeMap<String, &'static Result<ControlPlane, String>>;
    static PLANES: Mutex<Planes> = Mutex::new(BTreeMap::new());
    let mut planes = PLANES.lock().unwrap_or_else(|e| e.into_inner());
    let plane = *planes.entry(name.to_string()).or_insert_with(|| {
        let dir = target().join(format!("control-plane-{name}"));
        // Fresh for every run: what an earlier run installed must not decide this one.
        let _ = Command::new(repo().join("hack/control-plane"))
            .arg("down")
            .arg(&dir)
            .status();
        Box::leak(Box::new(start(dir, false)))
    });
    usable(plane)
}

/// A control plane of its own with one node that runs pods (`hack/control-plane up --with-node`:
/// controller manager, scheduler, kubelet, containerd, Multus), in `target/node-cluster-<name>`.
/// Fresh for every run, like [`dedicated_control_plane`]; nothing is applied to it beyond
/// Multus's NetworkAttachmentDefinition CRD. [`ControlPlane::down`] stops it.
pub fn node_cluster(name: &str) -> Option<&'static ControlPlane> {
    let dir = target().join(format!("node-cluster-{name}"));
    let _ = Command::new(repo().join("hack/control-plane"))
        .arg("down")
        .arg(&dir)
        .status();
    let plane = start_with(dir, &["--with-node"], false);
    usable(Box::leak(Box::new(plane)))
}

fn usable(plane: &'static Result<ControlPlane, String>) -> Option<&'static ControlPlane> {
    match plane {
        Ok(plane) => Some(plane),
        Err(why) if in_ci() => panic!("the real control plane is needed in CI: {why}"),
        Err(why) => {
            eprintln!("\n*** SKIPPED: no real control plane ({why}) ***\n");
            None
        }
    }
}

/// The cargo target folder (the parent of the integration tests' temporary folder).
fn target() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target folder")
        .to_path_buf()
}

/// Returns from the test when there is no control plane (never in CI).
#[macro_export]
macro_rules! real_cluster {
    () => {
        match kube_apiserver::control_plane() {
            Some(plane) => plane,
            None => return,
        }
    };
}

fn start(dir: PathBuf, with_crds: bool) -> Result<ControlPlane, String> {
    start_with(dir, &[], with_crds)
}

fn start_with(dir: PathBuf, options: &[&str], with_crds: bool) -> Result<ControlPlane, String> {
    let kubeconfig = PathBuf::from(script_output(
        Command::new(repo().join("hack/control-plane"))
            .arg("up")
            .args(options)
            .arg(&dir),
    )?);
    let tools = PathBuf::from(script_output(
        Command::new(repo().join("hack/tools/build")).args(["kubectl", "helm"]),
    )?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (client, server) = runtime.block_on(admin_client(&kubeconfig))?;
    let plane = ControlPlane {
        dir,
        kubeconfig,
        tools,
        server,
        runtime,
        client,
    };
    if with_crds {
        plane.apply_crds()?;
    }
    Ok(plane)
}

/// The last line a script printed on stdout; its stderr goes to the test's output.
fn script_output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed with {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().last().unwrap_or_default().trim().to_string())
}

async fn admin_client(kubeconfig: &Path) -> Result<(kube::Client, String), String> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?,
        &Default::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
    Ok((client, server.trim_end_matches('/').to_string()))
}

impl ControlPlane {
    /// Runs kubectl as cluster-admin; panics with its output when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_as(&self.kubeconfig, args);
        assert!(out.status.success(), "kubectl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> std::process::Output {
        Command::new(self.tools.join("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// Our three CRDs and a NetworkAttachmentDefinition CRD, applied once and established.
    pub fn apply_crds(&self) -> Result<(), String> {
        let mut args = vec!["apply", "--server-side", "--force-conflicts"];
        let files = [
            "deploy/whereabouts.cni.cncf.io_ippools.yaml",
            "deploy/whereabouts.cni.cncf.io_overlappingrangeipreservations.yaml",
            "deploy/whereabouts.cni.cncf.io_nodeslicepools.yaml",
            "tests/data/network-attachment-definition-crd.yaml",
        ]
        .map(|f| repo().join(f).display().to_string());
        for file in &files {
            args.extend(["-f", file.as_str()]);
        }
        let out = self.kubectl_as(&self.kubeconfig, &args);
        if !out.status.success() {
            return Err(format!("kubectl apply of the CRDs: {out:?}"));
        }
        let out = self.kubectl_as(
            &self.kubeconfig,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd",
                "--all",
            ],
        );
        if !out.status.success() {
            return Err(format!("CRDs not established: {out:?}"));
        }
        Ok(())
    }

    /// A fresh namespace for one test.
    pub fn namespace(&'static self, hint: &str) -> TestNamespace {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}-{}-{}",
            hint.to_lowercase().replace('_', "-"),
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        );
        let name = name.trim_start_matches('-').chars().take(63).collect();
        let ns = TestNamespace { plane: self, name };
        ns.apply(
            &resource("namespaces"),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns.name}}),
        );
        // Pods need their namespace's default service account, which a controller-manager
        // would create; this plane runs none.
        ns.apply(
            &resource("serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
        );
        ns
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A kubeconfig for the admin (client certificate), its context in `namespace`.
    pub fn admin_kubeconfig(&self, dir: &Path, namespace: &str) -> PathBuf {
        let pki = self.dir.join("pki");
        let user = json!({
            "client-certificate-data": b64_file(&pki.join("admin.crt")),
            "client-key-data": b64_file(&pki.join("admin.key")),
        });
        self.write_kubeconfig(dir, namespace, user)
    }

    /// A kubeconfig holding `token`, its context in `namespace`, verifying the server with the
    /// control plane's CA.
    pub fn token_kubeconfig(&self, dir: &Path, namespace: &str, token: &str) -> PathBuf {
        self.write_kubeconfig(dir, namespace, json!({ "token": token }))
    }

    fn write_kubeconfig(&self, dir: &Path, namespace: &str, user: Value) -> PathBuf {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.server,
                "certificate-authority-data": b64_file(&self.ca()),
            }}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "test", "context": {
                "cluster": "test", "user": "user", "namespace": namespace,
            }}],
            "current-context": "test",
        });
        let path = dir.join("whereabouts.kubeconfig");
        // JSON is YAML: every kubeconfig reader takes it.
        std::fs::write(&path, config.to_string()).expect("write kubeconfig");
        path
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// Stops the API server and starts it again as it was (`hack/control-plane
    /// restart-apiserver`): its clients' connections and watches break, as in a control-plane
    /// upgrade. Returns once it is ready again.
    pub fn restart_apiserver(&self) {
        self.script("restart-apiserver");
    }

    /// Stops everything `hack/control-plane up` started in this plane's folder.
    pub fn down(&self) {
        self.script("down");
    }

    /// `hack/control-plane COMMAND` on this plane's folder, which must succeed.
    fn script(&self, command: &str) {
        let status = Command::new(repo().join("hack/control-plane"))
            .arg(command)
            .arg(&self.dir)
            .status()
            .unwrap_or_else(|e| panic!("run hack/control-plane {command}: {e}"));
        assert!(status.success(), "hack/control-plane {command} failed");
    }

    /// Metrics of the API server: the number of requests served so far for `group` (all verbs),
    /// read from `apiserver_request_total`.
    pub fn requests_for_group(&self, group: &str) -> u64 {
        self.requests_matching(&[format!("group=\"{group}\"")])
    }

    /// As [`Self::requests_for_group`], for Leases: the Go binaries' Lease that our plugin
    /// reads while they may write the pools, and the API server's own (renewed every 10 s).
    pub fn requests_for_leases(&self) -> u64 {
        self.requests_matching(&[
            "group=\"coordination.k8s.io\"".to_string(),
            "resource=\"leases\"".to_string(),
        ])
    }

    fn requests_matching(&self, labels: &[String]) -> u64 {
        let text = self.kubectl(&["get", "--raw", "/metrics"]);
        text.lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
            .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

fn b64_file(path: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).expect("read pki file"))
}

/// Where a plural lives: group, version, kind, namespaced.
pub fn resource(plural: &str) -> (ApiResource, bool) {
    let (group, version, kind, namespaced) = match plural {
        "ippools" => (GROUP, "v1alpha1", "IPPool", true),
        "overlappingrangeipreservations" => {
            (GROUP, "v1alpha1", "OverlappingRangeIPReservation", true)
        }
        "nodeslicepools" => (GROUP, "v1alpha1", "NodeSlicePool", true),
        "network-attachment-definitions" => {
            ("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition", true)
        }
        "pods" => ("", "v1", "Pod", true),
        "configmaps" => ("", "v1", "ConfigMap", true),
        "events" => ("", "v1", "Event", true),
        // The same Events as events.k8s.io shows them (regarding, note, reportingController).
        "events.k8s.io" => ("events.k8s.io", "v1", "Event", true),
        "serviceaccounts" => ("", "v1", "ServiceAccount", true),
        "leases" => ("coordination.k8s.io", "v1", "Lease", true),
        "nodes" => ("", "v1", "Node", false),
        "namespaces" => ("", "v1", "Namespace", false),
        other => panic!("no resource {other} in the fixture"),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let plural = plural.strip_suffix(".events.k8s.io").unwrap_or(plural);
    let plural = if plural == "events.k8s.io" {
        "events"
    } else {
        plural
    };
    (ApiResource::from_gvk_with_plural(&gvk, plural), namespaced)
}

/// One test's namespace on the real control plane.
pub struct TestNamespace {
    pub plane: &'static ControlPlane,
    pub name: String,
}

impl TestNamespace {
    fn api(&self, plural: &str) -> (Api<DynamicObject>, ApiResource) {
        let (ar, namespaced) = resource(plural);
        let client = self.plane.client();
        let api = if namespaced {
            Api::namespaced_with(client, &self.name, &ar)
        } else {
            Api::all_with(client, &ar)
        };
        (api, ar)
    }

    /// An admin kubeconfig whose context is this namespace.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        self.plane.admin_kubeconfig(dir, &self.name)
    }

    pub fn get(&self, plural: &str, name: &str) -> Option<Value> {
        let (api, _) = self.api(plural);
        let object = self
            .plane
            .block_on(api.get_opt(name))
            .unwrap_or_else(|e| panic!("get {plural}/{name}: {e}"))?;
        Some(serde_json::to_value(object).expect("object as JSON"))
    }

    pub fn list(&self, plural: &str) -> Vec<Value> {
        let (api, _) = self.api(plural);
        let list = self
            .plane
            .block_on(api.list(&ListParams::default()))
            .unwrap_or_else(|e| panic!("list {plural}: {e}"));
        list.items
            .into_iter()
            .map(|o| serde_json::to_value(o).expect("object as JSON"))
            .collect()
    }

    /// Creates an object (apiVersion and kind are filled in); panics if refused.
    pub fn create(&self, plural: &str, object: Value) -> Value {
        self.try_create(plural, object)
            .unwrap_or_else(|e| panic!("create {plural}: {e}"))
    }

    /// As [`TestNamespace::create`], the server's refusal returned.
    pub fn try_create(&self, plural: &str, object: Value) -> Result<Value, kube::Error> {
        self.create_with(plural, object, &PostParams::default())
    }

    /// A ValidatingAdmissionPolicy of `validations` on the `rules` (resources, operations) of
    /// this namespace alone, in `dir`. Returns its name once the server refuses `refused` (a
    /// server-side dry run of that create).
    pub fn admission_policy(
        &self,
        dir: &Path,
        rules: Value,
        validations: Value,
        refused: (&str, Value),
    ) -> String {
        let name = self.name.clone();
        let policy = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
             "metadata": {"name": name},
             "spec": {"failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": ["whereabouts.cni.cncf.io"],
                    "apiVersions": ["*"], "resources": [rules[0]], "operations": rules[1]}]},
                "validations": validations}},
            {"apiVersion": "admissionregistration.k8s.io/v1",
             "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": name},
             "spec": {"policyName": name, "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": name}}}}},
        ]});
        let path = dir.join("policy.json");
        std::fs::write(&path, policy.to_string()).unwrap();
        self.plane
            .kubectl(&["apply", "-f", &path.display().to_string()]);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        // The server starts evaluating a new policy shortly after its creation.
        while self.dry_run_create(refused.0, refused.1.clone()).is_ok() {
            assert!(
                std::time::Instant::now() < until,
                "the policy is never enforced"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        name
    }

    /// Whether the server would create `object` (a server-side dry run: admission runs, nothing
    /// is stored), its refusal returned.
    pub fn dry_run_create(&self, plural: &str, object: Value) -> Result<Value, kube::Error> {
        let params = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        self.create_with(plural, object, &params)
    }

    fn create_with(
        &self,
        plural: &str,
        object: Value,
        params: &PostParams,
    ) -> Result<Value, kube::Error> {
        let (api, ar) = self.api(plural);
        let mut object = object;
        object["apiVersion"] = json!(ar.api_version);
        object["kind"] = json!(ar.kind);
        let object: DynamicObject = serde_json::from_value(object).expect("an object");
        let made = self.plane.block_on(api.create(params, &object))?;
        Ok(serde_json::to_value(made).unwrap())
    }

    /// Creates or updates an object by server-side apply.
    pub fn apply(&self, target: &(ApiResource, bool), object: Value) {
        let (ar, namespaced) = target;
        let client = self.plane.client();
        let api: Api<DynamicObject> = if *namespaced {
            Api::namespaced_with(client, &self.name, ar)
        } else {
            Api::all_with(client, ar)
        };
        let name = object["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        let params = PatchParams::apply("whereabouts-tests").force();
        self.plane
            .block_on(api.patch(&name, &params, &Patch::Apply(object)))
            .unwrap_or_else(|e| panic!("apply {}/{name}: {e}", ar.plural));
    }

    /// A pod of this namespace in `phase` (no node runs it: the phase is set through the status
    /// subresource, as a kubelet would). Returns its UID.
    pub fn add_pod(&self, name: &str, phase: &str) -> String {
        self.add_pod_on(name, phase, None)
    }

    /// A Node named after this namespace (`<namespace>-node`); Nodes are cluster-wide, so the
    /// test deletes it when done.
    pub fn add_node(&self) -> String {
        let node = format!("{}-node", self.name);
        self.create(
            "nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        );
        node
    }

    /// As [`Self::add_pod`], scheduled on `node` (no such Node object needs to exist).
    pub fn add_pod_on(&self, name: &str, phase: &str, node: Option<&str>) -> String {
        let mut spec = json!({
            "automountServiceAccountToken": false,
            "containers": [{"name": "main", "image": "test.invalid/pause"}],
        });
        if let Some(node) = node {
            spec["nodeName"] = node.into();
        }
        let pod = self.create("pods", json!({"metadata": {"name": name}, "spec": spec}));
        self.set_pod_phase(name, phase);
        pod["metadata"]["uid"].as_str().expect("a uid").to_string()
    }

    pub fn set_pod_phase(&self, name: &str, phase: &str) {
        let (api, _) = self.api("pods");
        let patch = Patch::Merge(json!({"status": {"phase": phase}}));
        self.plane
            .block_on(api.patch_status(name, &PatchParams::default(), &patch))
            .unwrap_or_else(|e| panic!("set the phase of pod {name}: {e}"));
    }

    /// Deletes an object; false when it was not there.
    pub fn delete(&self, plural: &str, name: &str) -> bool {
        let (api, _) = self.api(plural);
        match self.plane.block_on(api.delete(name, &Default::default())) {
            Ok(_) => true,
            Err(kube::Error::Api(status)) if status.code == 404 => false,
            Err(e) => panic!("delete {plural}/{name}: {e}"),
        }
    }
}
