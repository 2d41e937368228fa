//! Test support: a real 3-member etcd cluster on loopback ports picked at start, data in a
//! temporary directory, stopped and removed when dropped.

#![allow(dead_code)]

#[allow(clippy::duplicate_mod)]
#[path = "../common/ci.rs"]
mod ci;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Whether etcd is installed. In CI (`CI=true`) a missing etcd is a failure, never a skip.
pub fn etcd_available() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if ci::in_ci() {
            panic!("etcd is not installed in CI: install etcd-server and etcd-client");
        }
        eprintln!(
            "==== SKIPPING etcd test: `etcd` is not installed (apt install etcd-server) ===="
        );
    }
    found
}

/// Client certificates for a TLS cluster.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub struct Cluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial: String,
    token: String,
    tls: Option<Tls>,
    /// `user:password` once authentication is enabled.
    auth: Option<String>,
    /// Flags every member starts with, besides the cluster's own.
    flags: Vec<String>,
}

/// A loopback port nobody listens on, below the kernel's ephemeral range (32768 and up). A port
/// from the ephemeral range can be taken by any outgoing connection of a test running beside this
/// one between the moment it is picked and the moment etcd binds it; ports here only go to
/// listeners, and the counter keeps this process's clusters apart.
fn free_port() -> u16 {
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN / 100)) as u16 * 100;
    (0..SPAN)
        .map(|_| FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN)
        .find(|port| TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free loopback port below the ephemeral range")
}

impl Cluster {
    /// Starts three members and waits until the cluster answers.
    pub fn start(tls: bool) -> Cluster {
        Cluster::start_with(tls, &[])
    }

    /// As [`Cluster::start`], every member also started with `flags`.
    pub fn start_with(tls: bool, flags: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let tls = tls.then(|| make_certs(dir.path()));
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("wb-test-{}-{}", std::process::id(), members[0].client_port);
        let mut cluster = Cluster {
            dir,
            members,
            initial,
            token,
            tls,
            auth: None,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn spawn(&mut self, i: usize) {
        let scheme = self.scheme();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("member log file");
        let client_url = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&self.initial)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(self.dir.path().join("server.pem"))
                .arg("--key-file")
                .arg(self.dir.path().join("server.key"))
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd.spawn().expect("etcd starts");
        self.members[i].child = Some(child);
    }

    /// `host:port` of every member, comma separated, as `etcd_host` takes them.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn endpoint_urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect()
    }

    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=3s");
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.cert.display()))
                .arg(format!("--key={}", tls.key.display()));
        }
        if let Some(auth) = &self.auth {
            cmd.arg(format!("--user={auth}"));
        }
        cmd.args(args)
            .output()
            .expect("etcdctl runs (apt install etcd-client)")
    }

    fn running_urls(&self) -> Vec<String> {
        self.members
            .iter()
            .zip(self.endpoint_urls())
            .filter(|(m, _)| m.child.is_some())
            .map(|(_, u)| u)
            .collect()
    }

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&self, within: Duration) {
        let start = Instant::now();
        loop {
            let out = self.etcdctl(&self.running_urls(), &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            if start.elapsed() > within {
                panic!(
                    "etcd cluster not healthy after {within:?}: {}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of every member's log, for a failure message: a member that could not
    /// bind its port or join says so there.
    fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let path = self.dir.path().join(format!("{}.log", m.name));
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                format!("--- {} ({}):\n{tail}", m.name, path.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The index of the current leader, waiting for an election if there is none yet.
    pub fn leader(&self) -> usize {
        let start = Instant::now();
        loop {
            if let Some(i) = self.find_leader() {
                return i;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!("no etcd leader elected within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn find_leader(&self) -> Option<usize> {
        let out = self.etcdctl(&self.running_urls(), &["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        for entry in v.as_array().into_iter().flatten() {
            let status = &entry["Status"];
            let member = status["header"]["member_id"].as_u64();
            if member.is_some() && member == status["leader"].as_u64() {
                let endpoint = entry["Endpoint"].as_str().unwrap_or_default();
                return self
                    .members
                    .iter()
                    .position(|m| endpoint.ends_with(&format!(":{}", m.client_port)));
            }
        }
        None
    }

    /// Adds `root` with `password` and turns authentication on.
    pub fn enable_auth(&mut self, password: &str) {
        self.add_user("root", password);
        self.etcdctl_ok(&["auth", "enable"]);
        self.auth = Some(format!("root:{password}"));
    }

    /// Adds user `name` with `password` and no role: a change of the cluster's auth store.
    pub fn add_user(&self, name: &str, password: &str) {
        self.etcdctl_ok(&[
            "user",
            "add",
            name,
            "--interactive=false",
            "--new-user-password",
            password,
        ]);
    }

    /// Adds user `name` with `password` and a role of the same name, granting nothing yet.
    pub fn add_user_with_role(&self, name: &str, password: &str) {
        self.add_user(name, password);
        self.etcdctl_ok(&["role", "add", name]);
        self.etcdctl_ok(&["user", "grant-role", name, name]);
    }

    /// Grants role `role` `permission` (read, write or readwrite) on the keys under `prefix`.
    pub fn grant(&self, role: &str, permission: &str, prefix: &str) {
        self.etcdctl_ok(&[
            "role",
            "grant-permission",
            role,
            permission,
            prefix,
            "--prefix",
        ]);
    }

    /// Grants role `role` `permission` on the keys from `from` up to, not including, `to`.
    pub fn grant_range(&self, role: &str, permission: &str, from: &str, to: &str) {
        self.etcdctl_ok(&["role", "grant-permission", role, permission, from, to]);
    }

    /// Runs etcdctl on the running members, which must succeed.
    fn etcdctl_ok(&self, args: &[&str]) {
        let out = self.etcdctl(&self.running_urls(), args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Kills member `i` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts member `i` on its existing data.
    pub fn restart(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.spawn(i);
        }
    }

    /// Certificates of a new CA at the same paths, and every member restarted with them and
    /// trusting that CA alone: a client still holding the old files is refused, and the old
    /// CA does not verify the members.
    pub fn rotate_certs(&mut self) {
        assert!(
            self.tls.is_some(),
            "rotating the certificates of a cluster without TLS"
        );
        self.stop_all();
        self.tls = Some(make_certs(self.dir.path()));
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        self.wait_healthy(Duration::from_secs(30));
    }

    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// The ids of the members' processes that run.
    pub fn pids(&self) -> Vec<u32> {
        let running = self.members.iter().filter_map(|m| m.child.as_ref());
        running.map(Child::id).collect()
    }

    /// The transactions the members have served since they started, by their own counters
    /// (`grpc_server_handled_total` of `Txn`, summed). A cluster without TLS only.
    pub fn transactions_served(&self) -> f64 {
        self.members_metric(|line| {
            line.starts_with("grpc_server_handled_total{") && line.contains("grpc_method=\"Txn\"")
        })
    }

    /// The plain reads (`Range`, outside transactions) the members have served since they
    /// started, counted as [`Cluster::transactions_served`]. A cluster without TLS only.
    pub fn plain_reads_served(&self) -> f64 {
        self.members_metric(|line| {
            line.starts_with("grpc_server_handled_total{") && line.contains("grpc_method=\"Range\"")
        })
    }

    /// The watches the members hold open for their clients (`etcd_debugging_mvcc_watcher_total`,
    /// summed). A cluster without TLS only.
    pub fn watchers(&self) -> f64 {
        self.members_metric(|line| line.starts_with("etcd_debugging_mvcc_watcher_total "))
    }

    /// The sum over the members of the values of the metric lines that `pick` selects.
    fn members_metric(&self, pick: impl Fn(&str) -> bool) -> f64 {
        let mut sum = 0.0;
        for url in self.endpoint_urls() {
            let out = Command::new("curl")
                .args(["-sf", &format!("{url}/metrics")])
                .output()
                .expect("curl runs");
            assert!(out.status.success(), "metrics of {url}");
            sum += String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|line| pick(line))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        sum
    }

    /// Every key under `prefix`, as text.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.etcdctl(
            &self.running_urls(),
            &["get", "--prefix", "--keys-only", prefix],
        );
        assert!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }
}

impl Cluster {
    /// Every key under `prefix` with its value, as text.
    pub fn key_values(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.etcdctl(&self.running_urls(), &["get", "--prefix", prefix]);
        assert!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .map(|kv| (kv[0].to_string(), kv.get(1).unwrap_or(&"").to_string()))
            .collect()
    }

    /// Releases the allocation of `container` (in the first pool its owner entries name) as a
    /// release that found its run cut by another one does: its record and the keys pointing at
    /// it go, and its offset is marked freed (`freed/<pool>/<offset>`), still covered by its
    /// run until a fold.
    pub fn release_by_marking(&self, prefix: &str, container: &str) {
        let owners = format!("{prefix}owners/{container}/");
        let kvs = self.key_values(prefix);
        let (owner, offset) = kvs
            .iter()
            .find(|(k, _)| k.starts_with(&owners))
            .unwrap_or_else(|| panic!("no owner entry of {container}: {kvs:?}"));
        let pool = owner.rsplit('/').next().unwrap();
        let record = format!("{prefix}pools/{pool}/a/{offset}");
        let pod_entry = |k: &str, v: &str| {
            k.starts_with(&format!("{prefix}pods/"))
                && k.ends_with(&format!("/{pool}"))
                && v == offset
        };
        let reservation = |k: &str, v: &str| {
            k.starts_with(&format!("{prefix}reservations/"))
                && v.contains(&format!("\"pool\":\"{pool}\""))
                && v.contains(&format!("\"container_id\":\"{container}\""))
        };
        for (key, value) in &kvs {
            if *key == record || key == owner || pod_entry(key, value) || reservation(key, value) {
                self.etcdctl_ok(&["del", key]);
            }
        }
        self.etcdctl_ok(&["put", &format!("{prefix}freed/{pool}/{offset}"), ""]);
    }

    /// Asserts that `whereabouts doctor` (this package's binary) finds nothing wrong under the
    /// default prefix: runs, marks, records, owner entries and reservations agree, whatever
    /// failed while they were written.
    pub fn assert_doctor_healthy(&self) {
        let mut ipam = serde_json::json!({
            "type": "whereabouts",
            "datastore": "etcd",
            "etcd_host": self.endpoint_urls().join(","),
        });
        if let Some(tls) = &self.tls {
            ipam["etcd_ca_cert_file"] = serde_json::json!(tls.ca);
            ipam["etcd_cert_file"] = serde_json::json!(tls.cert);
            ipam["etcd_key_file"] = serde_json::json!(tls.key);
        }
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ipam.json");
        std::fs::write(&conf, ipam.to_string()).unwrap();
        // A flat file of its own: the doctor would otherwise read the host's, if it has one.
        let flat = dir.path().join("whereabouts.conf");
        std::fs::write(&flat, "{}").unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
            .env_clear()
            .env("WHEREABOUTS_FLAT_FILE", &flat)
            .args(["doctor", "-o", "json", "--config"])
            .arg(&conf)
            .output()
            .expect("the doctor runs");
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        assert_eq!(
            report,
            serde_json::json!({"healthy": true, "findings": []}),
            "doctor: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes a key of its own (under no prefix the engine uses) and compacts the cluster's
    /// history up to that write, as auto-compaction does: no earlier revision can be read.
    pub fn compact_now(&self) {
        let out = self.etcdctl(
            &self.running_urls(),
            &["put", "-w", "json", "compacted", ""],
        );
        assert!(
            out.status.success(),
            "etcdctl put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let put: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcdctl's JSON");
        let revision = put["header"]["revision"]
            .as_i64()
            .expect("a put answers its revision");
        self.etcdctl_ok(&["compact", &revision.to_string()]);
    }

    /// Writes `key`; false when the cluster refuses.
    pub fn try_put(&self, key: &str, value: &str) -> bool {
        let out = self.etcdctl(&self.running_urls(), &["put", key, value]);
        out.status.success()
    }

    /// Writes `key` (a hand edit, or what a bug would leave).
    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl_ok(&["put", key, value]);
    }

    /// Deletes `key` (a hand edit, or what a bug would leave).
    pub fn delete(&self, key: &str) {
        self.etcdctl_ok(&["del", key]);
    }

    /// What is left under `prefix` once every allocation is released, that should not be:
    /// anything but freed marks (`freed/<pool>/<offset>`, released addresses whose run is not
    /// cut yet) and runs covering nothing but marked offsets. Empty when all was released.
    pub fn left_after_releasing_all(&self, prefix: &str) -> Vec<String> {
        let offset = |key: &str| u128::from_str_radix(key.rsplit('/').next()?, 16).ok();
        let kvs = self.key_values(prefix);
        let freed = format!("{prefix}freed/");
        let marked: std::collections::BTreeSet<(String, u128)> = kvs
            .iter()
            .filter(|(k, _)| k.starts_with(&freed))
            .filter_map(|(k, _)| {
                let pool = k[freed.len()..].split('/').next()?.to_string();
                Some((pool, offset(k)?))
            })
            .collect();
        let mut covered = std::collections::BTreeSet::new();
        let mut left = Vec::new();
        // The key every combined ADD commit puts (docs/etcd.md): no pool's.
        let quota = format!("{prefix}quota");
        for (key, value) in &kvs {
            if key.starts_with(&freed) || *key == quota {
                continue;
            }
            let run = key
                .strip_prefix(&format!("{prefix}pools/"))
                .and_then(|rest| rest.split_once("/r/"))
                .and_then(|(pool, _)| Some((pool, offset(key)?, offset(value)?)));
            let Some((pool, start, end)) = run else {
                left.push(key.clone());
                continue;
            };
            if (start..=end).all(|o| marked.contains(&(pool.to_string(), o))) {
                covered.extend((start..=end).map(|o| (pool.to_string(), o)));
            } else {
                left.push(format!(
                    "{key} = {value} (covers an offset that is not marked)"
                ));
            }
        }
        left.extend(
            marked
                .difference(&covered)
                .map(|(pool, o)| format!("{freed}{pool}/{o:032x} (no run covers it)")),
        );
        left
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with `openssl`.
fn make_certs(dir: &Path) -> Tls {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=wb-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("extension file");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
        .expect("extension file");
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=wb-test-{name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            &format!("{name}.pem"),
        ]);
    }
    Tls {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
    }
}
