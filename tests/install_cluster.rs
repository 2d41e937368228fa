//! `whereabouts install` and `whereabouts controller` as their pods run them, against the real
//! API server: the manifest's command and environment, what the kubelet adds to a pod
//! (`KUBERNETES_SERVICE_HOST`/`PORT`, a projected service-account token and the cluster CA), all
//! under a temporary root that stands for the container's and the host's file systems.

mod deployment;
mod kube_apiserver;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deployment::cni::{self, Call};
use deployment::{bin, manifest, AuditLog, Deployed, CONTROLLER, NAMESPACE, PLUGIN};
use serde_json::{json, Value};

/// The kubelet's mount of the service account, inside a pod.
const SERVICE_ACCOUNT_MOUNT: &str = "var/run/secrets/kubernetes.io/serviceaccount";

/// A process stopped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pod's file system under `root`: the service-account mount with a token bound to a Secret
/// (deleting the Secret revokes the token), the cluster CA and the namespace.
struct Pod {
    root: PathBuf,
}

impl Pod {
    fn new(root: &Path, deployed: &Deployed) -> Pod {
        let pod = Pod {
            root: root.to_path_buf(),
        };
        fs::create_dir_all(pod.service_account()).unwrap();
        fs::copy(deployed.plane.ca(), pod.service_account().join("ca.crt")).unwrap();
        fs::write(pod.service_account().join("namespace"), NAMESPACE).unwrap();
        pod
    }

    fn service_account(&self) -> PathBuf {
        self.root.join(SERVICE_ACCOUNT_MOUNT)
    }

    /// Where the container sees `path` (an absolute path of the pod).
    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Writes a token the way the kubelet rotates one: a new file renamed over the old.
    fn rotate_token(&self, token: &str) {
        let next = self.service_account().join("..token.next");
        fs::write(&next, token).unwrap();
        fs::rename(next, self.service_account().join("token")).unwrap();
    }

    /// What the kubelet puts in every container's environment.
    fn kubelet_env(&self, deployed: &Deployed) -> Vec<(String, String)> {
        let port = deployed
            .plane
            .server
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        vec![
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), port),
            // The one thing a test cannot do as the kubelet does: mount at the fixed path.
            (
                "SERVICE_ACCOUNT_PATH".into(),
                self.service_account().display().to_string(),
            ),
        ]
    }
}

/// A token of `account` bound to a Secret of that name, so that deleting the Secret revokes it.
fn bound_token(deployed: &Deployed, account: &str, holder: &str) -> String {
    let plane = deployed.plane;
    plane.kubectl(&["create", "secret", "generic", holder, "-n", NAMESPACE]);
    plane
        .kubectl(&[
            "create",
            "token",
            account,
            "-n",
            NAMESPACE,
            "--bound-object-kind=Secret",
            &format!("--bound-object-name={holder}"),
        ])
        .trim()
        .to_string()
}

/// The first container of the manifest's object `kind`/`name` of kube-system.
fn container(kind: &str, name: &str) -> Value {
    let object = manifest()
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifest"));
    object["spec"]["template"]["spec"]["containers"][0].clone()
}

/// A container's process: its arguments after `/whereabouts` and its environment.
struct Process {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Process {
    /// The process with the binary under test, stopped when dropped, logging to `log`.
    fn spawn(&self, log: &Path) -> Running {
        let child = Command::new(bin())
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .expect("start whereabouts");
        Running(child)
    }
}

/// The container's command and environment: paths under the pod's root, fieldRefs as the
/// kubelet would fill them in, plus what the kubelet adds.
fn process(container: &Value, pod: &Pod, deployed: &Deployed) -> Process {
    let argv: Vec<String> = ["command", "args"]
        .iter()
        .flat_map(|key| container[*key].as_array().into_iter().flatten())
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(argv[0], "/whereabouts");
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap();
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("spec.nodeName") => "node-a".to_string(),
            Some("metadata.namespace") => NAMESPACE.to_string(),
            Some(other) => panic!("no value for fieldRef {other}"),
            None => var["value"].as_str().unwrap().to_string(),
        };
        let value = if value.starts_with('/') {
            pod.at(&value).display().to_string()
        } else {
            value
        };
        env.push((name.to_string(), value));
    }
    env.extend(pod.kubelet_env(deployed));
    Process {
        args: argv[1..].to_vec(),
        env,
    }
}

fn kubeconfig_token(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let config: Value = serde_saphyr::from_str(&text).ok()?;
    config["users"][0]["user"]["token"]
        .as_str()
        .map(String::from)
}

#[test]
fn the_installed_kubeconfig_reaches_the_server_and_follows_token_rotation() {
    let plane = real_cluster!();
    let deployed = deployment::deploy(plane);
    let root = tempfile::tempdir().unwrap();
    let pod = Pod::new(root.path(), &deployed);
    let holder = format!("install-token-{}", std::process::id());
    let first = bound_token(&deployed, PLUGIN, &holder);
    pod.rotate_token(&first);

    let mut installer = process(&container("DaemonSet", "whereabouts"), &pod, &deployed);
    // The DaemonSet keeps the default of 5 s; a test need not wait that long for a rotation.
    installer.args.push("--poll-interval-ms=100".into());
    // The host directories are under the test's folder, where no plugin looks for a flat file
    // unless told (the plugin calls below name it).
    installer.args.push("--any-conf-dir".into());
    // The host kubeconfig is written only with the node agent switched off, as the manifest
    // says to do it (WHEREABOUTS_AGENT "false").
    installer
        .env
        .retain(|(name, _)| name != "WHEREABOUTS_AGENT");
    installer
        .env
        .push(("WHEREABOUTS_AGENT".into(), "false".into()));
    let log = root.path().join("installer.log");
    let _installer = installer.spawn(&log);

    let whereabouts_d = pod.at("/host/etc/cni/net.d/whereabouts.d");
    let kubeconfig = whereabouts_d.join("whereabouts.kubeconfig");
    let installed = pod.at("/host/opt/cni/bin/whereabouts");
    wait_for("the installed binary", || installed.exists());
    assert_eq!(
        kubeconfig_token(&kubeconfig).as_deref(),
        Some(first.as_str())
    );

    // The plugin as the runtime on that host runs it: the installed binary, the flat file.
    let ipam = json!({"type": "whereabouts", "range": "10.206.0.0/24",
                      "network_name": format!("install-{}", std::process::id()),
                      "configuration_path": whereabouts_d.display().to_string()});
    let conf = cni::netconf("installed", &ipam);
    let add = |container: &str| {
        let call = Call {
            command: "ADD",
            container,
            ifname: "net1",
            pod: Some(("default", container)),
            node: None,
            env: vec![],
        };
        cni::run(&installed, &call, &conf)
    };
    let reply = add("before-rotation");
    assert_eq!(reply.code, 0, "{reply:?}");

    // The kubelet rotates the token; the old one is then revoked.
    let second = bound_token(&deployed, PLUGIN, &format!("{holder}-2"));
    pod.rotate_token(&second);
    wait_for("the kubeconfig with the new token", || {
        kubeconfig_token(&kubeconfig).as_deref() == Some(second.as_str())
    });
    plane.kubectl(&["delete", "secret", &holder, "-n", NAMESPACE]);
    let old = plane.token_kubeconfig(root.path(), NAMESPACE, &first);
    // (The API server caches a token's authentication for a few seconds.)
    wait_for("the old token to be refused", || {
        let out = plane.kubectl_as(&old, &["get", "--raw", "/api/v1/namespaces/kube-system"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        stderr.contains("Unauthorized") || stderr.contains("provide credentials")
    });
    let reply = add("after-rotation");
    assert_eq!(reply.code, 0, "{reply:?}");
    plane.kubectl(&["delete", "secret", &format!("{holder}-2"), "-n", NAMESPACE]);
    assert!(
        fs::read_to_string(&log)
            .unwrap()
            .contains("wrote the kubeconfig"),
        "installer log"
    );
}

#[test]
fn the_controller_reaches_the_server_with_its_pods_service_account() {
    let plane = real_cluster!();
    let deployed = deployment::deploy(plane);
    let root = tempfile::tempdir().unwrap();
    let pod = Pod::new(root.path(), &deployed);
    pod.rotate_token(&deployed.token(CONTROLLER));
    let audit = AuditLog::from_now(plane);

    let mut controller = process(
        &container("Deployment", "whereabouts-controller"),
        &pod,
        &deployed,
    );
    // Only its port changes: 9090 may be taken on a shared machine.
    for arg in &mut controller.args {
        *arg = arg.replace("[::]:9090", "127.0.0.1:0");
    }
    let log = root.path().join("controller.log");
    let _controller = controller.spawn(&log);

    // The API server saw the controller's account list pools and watch pods: the in-cluster
    // configuration (host, port, token file, CA file) reached it over verified TLS.
    wait_for("the controller's requests", || {
        let requests = audit.requests(CONTROLLER);
        requests
            .iter()
            .any(|r| r.resource == "ippools" && r.code == 200)
            && requests
                .iter()
                .any(|r| r.resource == "pods" && r.verb == "watch" && r.code == 200)
    });
    let log = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        audit.refused(CONTROLLER).is_empty(),
        "{:?}\n{log}",
        audit.refused(CONTROLLER)
    );
    // Both its store and its pod reads took the service account (no kubeconfig file here).
    assert!(log.contains("uses the pod's service account"), "{log}");
}
