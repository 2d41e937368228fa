//! `deploy/daemonset-install.yaml` on the real control plane, applied with the seed's command,
//! and what the tests of the deployment need around it: service-account tokens, the manifest's
//! RBAC as data, and the API server's audit log (every request a service account makes).
//!
//! The manifest's objects are shared (kube-system and cluster-scoped), so a test holds the
//! [`Deployed`] guard for as long as it relies on them: a file lock next to the control plane
//! serialises such tests across threads and test binaries alike.

#![allow(dead_code)]

#[path = "../fake_apiserver/cni.rs"]
pub mod cni;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::kube_apiserver::ControlPlane;

/// Where the manifest puts everything namespaced.
pub const NAMESPACE: &str = "kube-system";
/// The plugin's (and installer's) service account.
pub const PLUGIN: &str = "whereabouts";
/// The controller's service account.
pub const CONTROLLER: &str = "whereabouts-controller";

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
}

/// The seed's install command: the manifest and the three CRDs.
const SEED_FILES: [&str; 4] = [
    "deploy/daemonset-install.yaml",
    "deploy/whereabouts.cni.cncf.io_ippools.yaml",
    "deploy/whereabouts.cni.cncf.io_overlappingrangeipreservations.yaml",
    "deploy/whereabouts.cni.cncf.io_nodeslicepools.yaml",
];

/// The manifest applied, and the lock on the objects it made.
pub struct Deployed {
    pub plane: &'static ControlPlane,
    _lock: File,
    pub dir: tempfile::TempDir,
}

/// Takes the lock, applies the manifest as the seed does (which also restores any rule a test
/// left out) and waits until its RBAC is in force. Leftover whereabouts objects of kube-system
/// are removed so that a controller started later judges only this test's allocations.
pub fn deploy(plane: &'static ControlPlane) -> Deployed {
    let lock = File::create(plane.dir.join("deployment.lock")).expect("create the lock file");
    // SAFETY: flock on a file descriptor we own; released when the file is closed.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(locked, 0, "flock: {}", std::io::Error::last_os_error());
    apply_seed(plane);
    plane.kubectl(&[
        "delete",
        "--all",
        "-n",
        NAMESPACE,
        "--wait=false",
        "ippools.whereabouts.cni.cncf.io,overlappingrangeipreservations.whereabouts.cni.cncf.io,nodeslicepools.whereabouts.cni.cncf.io",
    ]);
    let deployed = Deployed {
        plane,
        _lock: lock,
        dir: tempfile::tempdir().unwrap(),
    };
    for role in roles() {
        assert!(
            deployed.wait_for_rules(&role, &role.rules),
            "the rules of {} {} are not in force",
            role.kind,
            role.name
        );
    }
    deployed
}

/// `kubectl apply --server-side` of the seed's files. Only when another tool (a Helm test on
/// the same control plane) owns some fields does it take them over with --force-conflicts.
fn apply_seed(plane: &ControlPlane) {
    let files: Vec<String> = SEED_FILES
        .iter()
        .map(|f| repo().join(f).display().to_string())
        .collect();
    let mut args = vec!["apply", "--server-side"];
    for file in &files {
        args.extend(["-f", file.as_str()]);
    }
    let out = plane.kubectl_as(&plane.kubeconfig, &args);
    if out.status.success() {
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("conflict"), "kubectl {args:?}: {out:?}");
    eprintln!("the manifest's objects were managed by another tool; taking them over");
    args.push("--force-conflicts");
    plane.kubectl(&args);
}

impl Deployed {
    /// A fresh token of a service account of the manifest (TokenRequest).
    pub fn token(&self, account: &str) -> String {
        self.plane
            .kubectl(&["create", "token", account, "-n", NAMESPACE])
            .trim()
            .to_string()
    }

    /// A kubeconfig holding a fresh token of `account`, its context in kube-system.
    pub fn kubeconfig(&self, account: &str) -> PathBuf {
        let dir = self.dir.path().join(account);
        std::fs::create_dir_all(&dir).unwrap();
        self.plane
            .token_kubeconfig(&dir, NAMESPACE, &self.token(account))
    }

    /// Applies one object the way the manifest is applied (same field manager).
    pub fn apply(&self, object: &Value) {
        let path = self.dir.path().join("object.json");
        std::fs::write(&path, object.to_string()).unwrap();
        let path = path.display().to_string();
        self.plane.kubectl(&["apply", "--server-side", "-f", &path]);
    }

    /// Whether `account` may do `verb` on what `rule` names (its first resource and name).
    pub fn can(&self, account: &str, verb: &str, rule: &Rule, namespace: &str) -> bool {
        let mut target = rule.qualified(&rule.resources[0]);
        if let Some(name) = rule.names.first() {
            target = format!("{target}/{name}");
        }
        let out = self.plane.kubectl_as(
            &self.plane.kubeconfig,
            &[
                "auth",
                "can-i",
                verb,
                &target,
                "-n",
                namespace,
                &format!("--as={}", user(account)),
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    }

    /// Waits (up to 20 s) until the authorizer's cache grants what `granted` says of `role`'s
    /// rules and denies the others; false when it never does (another rule grants the same).
    pub fn wait_for_rules(&self, role: &Role, granted: &[Rule]) -> bool {
        let start = Instant::now();
        loop {
            let settled = role.rules.iter().all(|rule| {
                let verb = &rule.verbs[0];
                self.can(&role.account, verb, rule, role.probe_namespace())
                    == granted.contains(rule)
            });
            if settled {
                return true;
            }
            if start.elapsed() > Duration::from_secs(20) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The user name of a service account of kube-system.
pub fn user(account: &str) -> String {
    format!("system:serviceaccount:{NAMESPACE}:{account}")
}

/// Every document of `deploy/daemonset-install.yaml`.
pub fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(SEED_FILES[0])).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("the manifest parses");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// One rule of a Role or ClusterRole.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub names: Vec<String>,
}

impl Rule {
    fn from_json(rule: &Value) -> Rule {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        Rule {
            groups: strings("apiGroups"),
            resources: strings("resources"),
            verbs: strings("verbs"),
            names: strings("resourceNames"),
        }
    }

    /// `resource.group` as kubectl names it (`pods` for the core group).
    pub fn qualified(&self, resource: &str) -> String {
        match self.groups.first().map(String::as_str) {
            None | Some("") => resource.to_string(),
            Some(group) => format!("{resource}.{group}"),
        }
    }
}

/// A Role or ClusterRole of the manifest with the service account bound to it.
#[derive(Clone, Debug)]
pub struct Role {
    pub object: Value,
    pub kind: String,
    pub name: String,
    /// The Role's namespace; None for a ClusterRole.
    pub namespace: Option<String>,
    pub account: String,
    pub rules: Vec<Rule>,
}

impl Role {
    /// A namespace in which the role's rules apply.
    pub fn probe_namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(NAMESPACE)
    }

    /// The object with rule `index` left out.
    pub fn without_rule(&self, index: usize) -> Value {
        let mut object = self.object.clone();
        object["rules"].as_array_mut().unwrap().remove(index);
        object
    }
}

/// Every Role and ClusterRole of the manifest, with the service account its binding names.
pub fn roles() -> Vec<Role> {
    let docs = manifest();
    let bindings: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
        .collect();
    docs.iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
        .map(|role| {
            let binding = bindings
                .iter()
                .find(|b| {
                    b["roleRef"]["kind"] == role["kind"]
                        && b["roleRef"]["name"] == role["metadata"]["name"]
                })
                .unwrap_or_else(|| panic!("nothing binds {role}"));
            let subject = &binding["subjects"][0];
            assert_eq!(subject["kind"], "ServiceAccount");
            assert_eq!(subject["namespace"], NAMESPACE);
            Role {
                object: role.clone(),
                kind: role["kind"].as_str().unwrap().to_string(),
                name: role["metadata"]["name"].as_str().unwrap().to_string(),
                namespace: role["metadata"]["namespace"].as_str().map(String::from),
                account: subject["name"].as_str().unwrap().to_string(),
                rules: role["rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(Rule::from_json)
                    .collect(),
            }
        })
        .collect()
}

/// The API server's audit log (JSON lines; the control plane logs service accounts' requests).
pub struct AuditLog {
    path: PathBuf,
    /// Where this test's part of the log starts.
    from: u64,
}

/// One request as the audit log records it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    pub user: String,
    pub verb: String,
    pub group: String,
    /// With its subresource, as `nodeslicepools/status`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub code: u64,
}

impl AuditLog {
    /// The log from now on.
    pub fn from_now(plane: &ControlPlane) -> AuditLog {
        let path = plane.dir.join("audit.log");
        let from = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        AuditLog { path, from }
    }

    fn events(&self) -> Vec<Value> {
        let Ok(mut file) = File::open(&self.path) else {
            return Vec::new();
        };
        let mut text = String::new();
        file.seek(SeekFrom::Start(self.from)).unwrap();
        file.read_to_string(&mut text).unwrap();
        // The last line may be half written.
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Requests for API objects (not discovery) made since the start, by `account`.
    pub fn requests(&self, account: &str) -> Vec<Request> {
        let user = user(account);
        self.events()
            .iter()
            .filter(|e| e["user"]["username"] == user.as_str())
            .filter(|e| e["objectRef"]["resource"].is_string())
            .map(|e| {
                let object = &e["objectRef"];
                let text = |v: &Value| v.as_str().map(String::from);
                let mut resource = text(&object["resource"]).unwrap();
                if let Some(sub) = text(&object["subresource"]) {
                    resource = format!("{resource}/{sub}");
                }
                Request {
                    user: user.clone(),
                    verb: text(&e["verb"]).unwrap_or_default(),
                    group: text(&object["apiGroup"]).unwrap_or_default(),
                    resource,
                    namespace: text(&object["namespace"]),
                    name: text(&object["name"]),
                    code: e["responseStatus"]["code"].as_u64().unwrap_or(0),
                }
            })
            .collect()
    }

    /// The requests of `account` the API server refused (403).
    pub fn refused(&self, account: &str) -> Vec<Request> {
        let mut refused = self.requests(account);
        refused.retain(|r| r.code == 403);
        refused
    }

    /// Waits until everything `kubeconfig`'s user did so far is in the log: the log is written
    /// in batches, so a marker request of that user is made and waited for.
    pub fn flush(&self, plane: &ControlPlane, kubeconfig: &Path) {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let marker = format!(
            "/version?flush={}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        );
        let out = plane.kubectl_as(kubeconfig, &["get", "--raw", &marker]);
        assert!(out.status.success(), "marker request: {out:?}");
        let start = Instant::now();
        while !self
            .events()
            .iter()
            .any(|e| e["requestURI"] == marker.as_str() && e["stage"] == "ResponseComplete")
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the marker never reached the audit log"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
