//! `whereabouts install` against a temporary host root: the directories the DaemonSet mounts and
//! a fake service-account directory, all given by flags.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use serde_json::{json, Value};
use whereabouts::cli::install::{self, InstallArgs, InstallError, Settings};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    install: InstallArgs,
}

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

/// A temporary host root with `host/opt/cni/bin`, `host/etc/cni/net.d` and a service-account
/// directory, plus a binary to install.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let host = Host {
            dir: tempfile::tempdir().unwrap(),
        };
        fs::create_dir_all(host.sa()).unwrap();
        fs::write(host.sa().join("token"), "token-one\n").unwrap();
        fs::write(host.sa().join("ca.crt"), CA).unwrap();
        fs::write(host.sa().join("namespace"), "whereabouts-ns").unwrap();
        fs::write(host.path("source"), b"#!/bin/sh\necho new plugin\n").unwrap();
        host
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn sa(&self) -> PathBuf {
        self.path("serviceaccount")
    }

    fn bin_dir(&self) -> PathBuf {
        self.path("host/opt/cni/bin")
    }

    fn wd(&self) -> PathBuf {
        self.path("host/etc/cni/net.d/whereabouts.d")
    }

    /// The flags the DaemonSet's environment would give, with `extra` added.
    fn args(&self, extra: &[&str]) -> InstallArgs {
        let mut argv: Vec<String> = vec![
            "install".into(),
            format!("--cni-bin-dir={}", self.bin_dir().display()),
            format!(
                "--cni-conf-dir={}",
                self.path("host/etc/cni/net.d").display()
            ),
            "--host-cni-conf-dir=/etc/cni/net.d".into(),
            format!("--cni-bin-src={}", self.path("source").display()),
            format!("--service-account-path={}", self.sa().display()),
            format!("--kube-ca-file={}", self.sa().join("ca.crt").display()),
            "--kubernetes-service-host=10.96.0.1".into(),
            "--kubernetes-service-port=443".into(),
            "--node-name=node-a".into(),
            "--reconciler-cron=30 4 * * *".into(),
        ];
        // A flag given in `extra` replaces the default one (clap refuses a flag given twice).
        let flag = |a: &str| a.split('=').next().unwrap_or("").to_string();
        argv.retain(|a| !extra.iter().any(|e| flag(e) == flag(a)));
        argv.extend(extra.iter().map(|s| s.to_string()));
        Cli::try_parse_from(argv).unwrap().install
    }

    fn settings(&self, extra: &[&str]) -> Settings {
        Settings::from_args(&self.args(extra)).unwrap()
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn kubeconfig(host: &Host) -> Value {
    serde_saphyr::from_str(&fs::read_to_string(host.wd().join("whereabouts.kubeconfig")).unwrap())
        .unwrap()
}

#[test]
fn installs_binary_flat_file_kubeconfig_and_node_name() {
    let host = Host::new();
    install::run(host.args(&["--once"])).unwrap();

    let binary = host.bin_dir().join("whereabouts");
    assert_eq!(
        fs::read(&binary).unwrap(),
        fs::read(host.path("source")).unwrap()
    );
    assert_eq!(mode(&binary), 0o755);

    // Upstream's flat file, with the paths as the host sees them.
    let flat: Value =
        serde_json::from_str(&fs::read_to_string(host.wd().join("whereabouts.conf")).unwrap())
            .unwrap();
    assert_eq!(
        flat,
        json!({
            "datastore": "kubernetes",
            "configuration_path": "/etc/cni/net.d/whereabouts.d",
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
            "reconciler_cron_expression": "30 4 * * *",
        })
    );
    // And the plugin's own config loader accepts it and picks the Kubernetes store from it.
    let ipam = json!({"type": "whereabouts", "range": "10.0.0.0/24"});
    let conf = whereabouts::config::load_with_flat_files(
        Some(&ipam),
        &[host.wd().join("whereabouts.conf")],
    )
    .unwrap();
    assert_eq!(
        conf.datastore,
        whereabouts::config::Datastore::Kubernetes(whereabouts::config::KubernetesConfig {
            kubeconfig: "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig".into(),
            namespace: None,
        })
    );

    assert_eq!(
        fs::read_to_string(host.wd().join("nodename")).unwrap(),
        "node-a\n"
    );

    let path = host.wd().join("whereabouts.kubeconfig");
    assert_eq!(mode(&path), 0o600);
    // kube-rs (the plugin's client) reads it...
    kube::config::Kubeconfig::read_from(&path).unwrap();
    // ...and it says what it should: https, CA verification on, the token, the namespace.
    let kc = kubeconfig(&host);
    assert_eq!(kc["current-context"], "whereabouts-context");
    let cluster = &kc["clusters"][0]["cluster"];
    assert_eq!(cluster["server"], "https://10.96.0.1:443");
    assert!(cluster.get("insecure-skip-tls-verify").is_none());
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cluster["certificate-authority-data"].as_str().unwrap())
        .unwrap();
    assert_eq!(ca, CA.as_bytes());
    assert_eq!(kc["users"][0]["user"]["token"], "token-one");
    assert_eq!(kc["contexts"][0]["context"]["namespace"], "whereabouts-ns");
    assert_eq!(
        kc["contexts"][0]["context"]["cluster"],
        kc["clusters"][0]["name"]
    );
    assert_eq!(kc["contexts"][0]["context"]["user"], kc["users"][0]["name"]);

    // Nothing else is left in the directories (no temporary files).
    let names = |dir: PathBuf| {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(host.bin_dir()), ["whereabouts"]);
    assert_eq!(
        names(host.wd()),
        ["nodename", "whereabouts.conf", "whereabouts.kubeconfig"]
    );
}

#[test]
fn flags_and_environment_variables_shape_the_output() {
    let host = Host::new();
    let settings = host.settings(&[
        "--kubernetes-service-host=fd00:10:96::1",
        "--kubernetes-service-port=6443",
        "--namespace=net",
        "--log-level=verbose",
        "--reconciler-cron=*/5 * * * *",
    ]);
    install::install_once(&settings).unwrap();
    let kc = kubeconfig(&host);
    assert_eq!(
        kc["clusters"][0]["cluster"]["server"],
        "https://[fd00:10:96::1]:6443"
    );
    assert_eq!(kc["contexts"][0]["context"]["namespace"], "net");
    let flat: Value =
        serde_json::from_str(&fs::read_to_string(host.wd().join("whereabouts.conf")).unwrap())
            .unwrap();
    assert_eq!(flat["log_level"], "verbose");
    assert_eq!(flat["reconciler_cron_expression"], "*/5 * * * *");

    // Without the host flag, the container's /host prefix is dropped, as the DaemonSet needs.
    let mut args = host.args(&[]);
    args.cni_conf_dir = PathBuf::from("/host/etc/cni/net.d");
    args.host_cni_conf_dir = None;
    let settings = Settings::from_args(&args).unwrap();
    assert_eq!(settings.host_cni_conf_dir, Path::new("/etc/cni/net.d"));
    assert_eq!(settings.cni_conf_dir, Path::new("/host/etc/cni/net.d"));
}

#[test]
fn missing_or_bad_input_is_an_error_not_a_panic() {
    let host = Host::new();
    let mut args = host.args(&[]);
    args.node_name = None;
    assert!(matches!(
        Settings::from_args(&args),
        Err(InstallError::Missing(_))
    ));

    let mut args = host.args(&[]);
    args.kubernetes_service_host = Some(" ".into());
    assert!(Settings::from_args(&args).is_err());

    assert!(Settings::from_args(&host.args(&["--kubernetes-service-port=http"])).is_err());
    assert!(Settings::from_args(&host.args(&["--log-level=loud"])).is_err());
    assert!(Settings::from_args(&host.args(&["--host-cni-conf-dir=etc/cni"])).is_err());
    // A folder the plugin does not read its flat file under (the plugin would fall back to a
    // database of each node's own).
    let k3s = "--host-cni-conf-dir=/var/lib/rancher/k3s/agent/etc/cni/net.d";
    let err = Settings::from_args(&host.args(&[k3s])).unwrap_err();
    assert!(err.to_string().contains("HOST_CNI_CONF_DIR"), "{err}");
    assert!(
        Settings::from_args(&host.args(&["--host-cni-conf-dir=/etc/kubernetes/cni/net.d/"]))
            .is_ok()
    );

    fs::write(host.sa().join("token"), "\n").unwrap();
    let err = install::install_once(&host.settings(&[])).unwrap_err();
    assert!(err.to_string().contains("token"), "{err}");

    fs::remove_file(host.sa().join("token")).unwrap();
    let err = install::install_once(&host.settings(&[])).unwrap_err();
    assert!(err.to_string().contains("serviceaccount/token"), "{err}");
}

/// Polls `check` until it holds or `limit` passes.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn replaces_the_binary_while_the_old_one_runs() {
    let host = Host::new();
    // The "old plugin" is a copy of sleep, so it can be left running.
    let sleep = ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("sleep(1)");
    fs::copy(sleep, host.path("source")).unwrap();
    install::install_once(&host.settings(&[])).unwrap();
    let installed = host.bin_dir().join("whereabouts");
    let mut old = Running(Command::new(&installed).arg("30").spawn().unwrap());
    let pid = old.0.id();
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    assert!(eventually(Duration::from_secs(5), || fs::read_link(&exe)
        .is_ok_and(|p| p == installed)));

    // Writing over a running binary in place is what Linux refuses: the hazard is real here.
    let in_place = fs::OpenOptions::new().write(true).open(&installed);
    assert_eq!(
        in_place.err().and_then(|e| e.raw_os_error()),
        Some(libc::ETXTBSY)
    );

    // The installer renames a new file over it instead.
    fs::write(host.path("new"), b"#!/bin/sh\necho the new plugin\n").unwrap();
    let mut args = host.args(&[]);
    args.cni_bin_src = Some(host.path("new"));
    install::install_once(&Settings::from_args(&args).unwrap()).unwrap();

    assert!(old.0.try_wait().unwrap().is_none(), "the old process died");
    assert_eq!(
        fs::read(&installed).unwrap(),
        fs::read(host.path("new")).unwrap()
    );
    assert_eq!(mode(&installed), 0o755);
    // The running process keeps the old, now unlinked, file.
    let link = fs::read_link(&exe).unwrap();
    assert!(link.to_string_lossy().ends_with("(deleted)"), "{link:?}");
    let out = Command::new(&installed).output().unwrap();
    assert_eq!(out.stdout, b"the new plugin\n");
}

/// With the agent, a kubeconfig that appears after the start (an earlier installer stopping
/// during the rollout, a hand-made one) is removed by the watcher: the host keeps no credential.
#[test]
fn with_the_agent_the_watcher_keeps_the_host_without_a_kubeconfig() {
    let host = Host::new();
    let settings = host.settings(&["--poll-interval-ms=20", "--agent=true"]);
    install::install_once(&settings).unwrap();
    let path = host.wd().join("whereabouts.kubeconfig");
    assert!(!path.exists());
    let watcher = Watcher::start(&settings);
    fs::write(&path, "left by another writer").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !path.exists()),
        "the kubeconfig stayed on the host"
    );
    watcher.stop();
}

/// A flat file removed while the installer runs (by hand, by a clean-up of the folder) is
/// written again: without it the plugin would use a local database of its own on the node and
/// hand out the other nodes' addresses again.
#[test]
fn the_watcher_writes_a_removed_flat_file_again() {
    let host = Host::new();
    let settings = host.settings(&["--poll-interval-ms=20", "--agent=true"]);
    install::install_once(&settings).unwrap();
    let flat = host.wd().join("whereabouts.conf");
    let written = fs::read_to_string(&flat).unwrap();
    let watcher = Watcher::start(&settings);
    fs::remove_file(&flat).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || fs::read_to_string(&flat)
            .is_ok_and(|now| now == written)),
        "the flat file stayed away"
    );
    watcher.stop();
}

#[test]
fn rewrites_the_kubeconfig_when_the_token_or_ca_rotates() {
    let host = Host::new();
    let settings = host.settings(&["--poll-interval-ms=20"]);
    install::install_once(&settings).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let log = Log::default();
    let watcher = {
        let (settings, stop, log) = (settings.clone(), stop.clone(), log.clone());
        let logger = tracing_subscriber::fmt()
            .with_writer(move || log.clone())
            .with_ansi(false)
            .finish();
        std::thread::spawn(move || {
            tracing::subscriber::with_default(logger, || install::watch(&settings, &stop))
        })
    };
    let path = host.wd().join("whereabouts.kubeconfig");
    let limit = Duration::from_secs(10);

    // The kubelet swaps the projected token atomically; do the same.
    fs::write(host.sa().join(".token.new"), "token-two").unwrap();
    fs::rename(host.sa().join(".token.new"), host.sa().join("token")).unwrap();
    assert!(
        eventually(limit, || kubeconfig(&host)["users"][0]["user"]["token"]
            == "token-two"),
        "the kubeconfig was not rewritten after the token rotated"
    );
    assert_eq!(mode(&path), 0o600);

    let new_ca = "-----BEGIN CERTIFICATE-----\nMIIBrotated\n-----END CERTIFICATE-----\n";
    fs::write(host.sa().join("ca.crt"), new_ca).unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode(new_ca);
    assert!(
        eventually(limit, || kubeconfig(&host)["clusters"][0]["cluster"]
            ["certificate-authority-data"]
            == encoded.as_str()),
        "the kubeconfig was not rewritten after the CA rotated"
    );

    // A deleted kubeconfig comes back.
    fs::remove_file(&path).unwrap();
    assert!(eventually(limit, || path.exists()));

    // A token missing for a while (the watcher fails to refresh) does not end the watcher.
    fs::remove_file(host.sa().join("token")).unwrap();
    assert!(
        eventually(limit, || log
            .text()
            .contains("cannot refresh the kubeconfig")),
        "the watcher never met the missing token"
    );
    fs::write(host.sa().join("token"), "token-three").unwrap();
    assert!(eventually(limit, || kubeconfig(&host)["users"][0]["user"]
        ["token"]
        == "token-three"));

    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
}

/// `install::watch` on a thread of its own, until stopped.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Watcher {
    fn start(settings: &Settings) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let (settings, flag) = (settings.clone(), stop.clone());
        let thread = std::thread::spawn(move || install::watch(&settings, &flag));
        Watcher { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// What the watcher logs, kept for the test to read.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The real binary, with a clean environment (the DaemonSet's variables are given as flags).
fn binary(host: &Host) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_whereabouts"));
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("CNI_BIN_DIR", host.bin_dir())
        .env("CNI_CONF_DIR", host.path("host/etc/cni/net.d"))
        .env("HOST_CNI_CONF_DIR", "/etc/cni/net.d")
        .env("SERVICE_ACCOUNT_PATH", host.sa())
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .env("NODENAME", "node-b");
    cmd
}

#[test]
fn the_binary_installs_itself_from_its_environment() {
    let host = Host::new();
    let out = binary(&host).args(["install", "--once"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "stdout is for CNI results only");
    // With no --cni-bin-src it copies itself.
    assert_eq!(
        fs::read(host.bin_dir().join("whereabouts")).unwrap(),
        fs::read(env!("CARGO_BIN_EXE_whereabouts")).unwrap()
    );
    assert_eq!(
        fs::read_to_string(host.wd().join("nodename")).unwrap(),
        "node-b\n"
    );
    assert_eq!(
        kubeconfig(&host)["contexts"][0]["context"]["namespace"],
        "whereabouts-ns"
    );

    // A missing setting is a clear error and a failing exit code.
    let out = binary(&host)
        .env_remove("NODENAME")
        .args(["install", "--once"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NODENAME"),
        "{out:?}"
    );
}

/// The installer's log is its container's: what it wrote and what it replaced, on stderr,
/// without the content of a file it found.
#[test]
fn the_installer_says_what_it_did_on_stderr() {
    let host = Host::new();
    fs::create_dir_all(host.wd()).unwrap();
    fs::write(host.wd().join("whereabouts.conf"), "secret-looking {").unwrap();
    let out = binary(&host).args(["install", "--once"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("replaced whole"), "{log}");
    assert!(log.contains("wrote the kubeconfig"), "{log}");
    assert!(
        !log.contains("secret-looking"),
        "the file's content shown: {log}"
    );
}

/// With the agent the host gets the plugin-only build (next to the installer, as in the image)
/// under the plugin's name; with the agent switched off again, the full binary.
#[test]
fn with_the_agent_it_installs_the_plugin_only_build() {
    let host = Host::new();
    let installed = || fs::read(host.bin_dir().join("whereabouts")).unwrap();
    for (agent, expected) in [
        ("--agent=true", env!("CARGO_BIN_EXE_whereabouts-plugin")),
        ("--agent=false", env!("CARGO_BIN_EXE_whereabouts")),
        ("--agent=true", env!("CARGO_BIN_EXE_whereabouts-plugin")),
    ] {
        let out = binary(&host)
            .args(["install", "--once", agent])
            .output()
            .unwrap();
        assert!(out.status.success(), "{agent}: {out:?}");
        assert!(installed() == fs::read(expected).unwrap(), "{agent}");
    }
}

#[test]
fn the_watcher_stops_on_sigterm() {
    let host = Host::new();
    let mut child = Running(
        binary(&host)
            .args(["install", "--poll-interval-ms=50"])
            .spawn()
            .unwrap(),
    );
    let path = host.wd().join("whereabouts.kubeconfig");
    assert!(eventually(Duration::from_secs(10), || path.exists()));
    // It stays up...
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.0.try_wait().unwrap().is_none());
    // ...and, as pid 1 of its container would, ends promptly and cleanly on SIGTERM.
    let pid = libc::pid_t::try_from(child.0.id()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut status = None;
    assert!(eventually(Duration::from_secs(5), || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "{status:?}");
}

/// The admin's rules live in the flat file and no flag carries them: a start keeps every key
/// it does not write itself, and sets or removes its own by its settings alone.
#[test]
fn a_start_keeps_the_admins_keys_in_the_flat_file() {
    let host = Host::new();
    fs::create_dir_all(host.wd()).unwrap();
    let flat_path = host.wd().join("whereabouts.conf");
    let admins = json!({
        "allow_inline_paths": ["/srv/kubeconfigs"],
        "allow_insecure_tls": true,
        "log_file": "/var/log/whereabouts.log",
    });
    let mut found = admins.clone();
    found["datastore"] = json!("Kubernetes");
    found["agent_socket"] = json!("/elsewhere.sock");
    // The plugin reads keys in any case, and folds them as Go does (the Kelvin sign is `k`).
    found["Log_Level"] = json!("debug");
    found["\u{212A}ubernetes"] = json!({"kubeconfig": "/elsewhere/kubeconfig"});
    fs::write(&flat_path, found.to_string()).unwrap();

    install::run(host.args(&["--once"])).unwrap();
    let flat: Value = serde_json::from_str(&fs::read_to_string(&flat_path).unwrap()).unwrap();
    let mut expected = json!({
        "datastore": "kubernetes",
        "configuration_path": "/etc/cni/net.d/whereabouts.d",
        "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
        "reconciler_cron_expression": "30 4 * * *",
    });
    expected
        .as_object_mut()
        .unwrap()
        .extend(admins.as_object().unwrap().clone());
    assert_eq!(flat, expected);
    assert_eq!(mode(&flat_path), 0o600);

    // A file that is no JSON object, and a symbolic link, are replaced by the installer's own
    // keys.
    let ours = |host: &Host| {
        let flat: Value = serde_json::from_str(&fs::read_to_string(&flat_path).unwrap()).unwrap();
        assert!(flat.get("allow_inline_paths").is_none(), "{flat}");
        assert_eq!(flat["datastore"], "kubernetes");
        assert!(fs::symlink_metadata(host.wd().join("whereabouts.conf"))
            .unwrap()
            .file_type()
            .is_file());
    };
    fs::write(&flat_path, "not json {").unwrap();
    install::run(host.args(&["--once"])).unwrap();
    ours(&host);
    let elsewhere = host.path("elsewhere.conf");
    fs::write(&elsewhere, found.to_string()).unwrap();
    fs::remove_file(&flat_path).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &flat_path).unwrap();
    install::run(host.args(&["--once"])).unwrap();
    ours(&host);
    assert_eq!(fs::read_to_string(&elsewhere).unwrap(), found.to_string());
}

/// A flat file that selects another engine (an etcd cluster's, written by hand) stops the
/// start, and stays as it was: written over, the node would switch to the Kubernetes engine in
/// silence and hand out the etcd store's live addresses again.
#[test]
fn a_flat_file_of_another_engine_stops_the_start() {
    let host = Host::new();
    fs::create_dir_all(host.wd()).unwrap();
    let flat_path = host.wd().join("whereabouts.conf");
    let etcd = "https://etcd.example:2379";
    for (found, key) in [
        (json!({"datastore": "etcd", "etcd_host": etcd}), "datastore"),
        (json!({"DataStore": " local "}), "datastore"),
        (json!({"etcd_host": etcd}), "etcd_host"),
    ] {
        fs::write(&flat_path, found.to_string()).unwrap();
        let err = install::run(host.args(&["--once"])).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains(&format!("its {key} selects another engine")),
            "{err}"
        );
        assert!(
            !err.contains("etcd.example"),
            "the file's content shown: {err}"
        );
        assert_eq!(fs::read_to_string(&flat_path).unwrap(), found.to_string());
        assert!(!host.bin_dir().join("whereabouts").exists());
    }
    // An etcd_host beside the Kubernetes engine's kubeconfig is not the engine's choice.
    let beside = json!({"etcd_host": etcd,
                        "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/k"}});
    fs::write(&flat_path, beside.to_string()).unwrap();
    install::run(host.args(&["--once"])).unwrap();
}

/// With the node agent the host gets no credential: no kubeconfig is written, one left by an
/// earlier install (the agent switched on later) is removed, and the flat file names the
/// agent's socket.
#[test]
fn with_the_agent_the_host_keeps_no_kubeconfig() {
    let host = Host::new();
    install::run(host.args(&["--once"])).unwrap();
    let path = host.wd().join("whereabouts.kubeconfig");
    assert!(path.exists());
    let flat = |host: &Host| -> Value {
        serde_json::from_str(&fs::read_to_string(host.wd().join("whereabouts.conf")).unwrap())
            .unwrap()
    };
    let mut flat_before = flat(&host);
    install::run(host.args(&["--once", "--agent=true"])).unwrap();
    assert!(!path.exists(), "the kubeconfig stayed on the host");
    // The flat file names the agent's socket, so the plugin knows one is meant to answer.
    flat_before["agent_socket"] = json!("/run/whereabouts/agent.sock");
    assert_eq!(flat(&host), flat_before);
    assert_eq!(
        fs::read_to_string(host.wd().join("nodename")).unwrap(),
        "node-a\n"
    );
    // Switched off again: the kubeconfig is back.
    install::run(host.args(&["--once", "--agent=false"])).unwrap();
    kube::config::Kubeconfig::read_from(&path).unwrap();
}
