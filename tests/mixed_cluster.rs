//! The Go Whereabouts (its plugin built from its Go module by `hack/tools/build`) and ours on
//! one real API server and one set of pools, as a cluster is while its nodes swap binaries:
//! bursts that alternate binaries across simulated nodes with race windows widened on both sides
//! (`sleep_for_race`), ours alone and through a node agent, the runtime's cleanup DEL after a
//! failed ADD, DELs through either binary, a full rollout and a full rollback, the Go reconciler
//! over both binaries' entries, node slices written by either controller. After every step `whereabouts doctor` must find nothing:
//! no address held twice, no pool entry without its reservation, no reservation left behind.
//! `whereabouts doctor` itself is tested here too, on objects broken on purpose.

mod agent_process;
mod common;
mod fake_apiserver;
mod kube_apiserver;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use fake_apiserver::cni::{netconf, run, Call, Reply};
use kube_apiserver::TestNamespace;
use serde_json::{json, Value};

const RESERVATIONS: &str = "overlappingrangeipreservations";

fn ours() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
}

/// The Go plugin; `None` (after a loud notice, failing in CI) when it cannot be built.
fn go_plugin() -> Option<PathBuf> {
    common::tools::go_tools(&["go-whereabouts"]).map(|dir| dir.join("go-whereabouts"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Binary {
    Go,
    Ours,
    /// Ours, through a node agent (whose flat file says Go binaries are present).
    OursViaAgent,
}

/// The files both binaries read, in the test's folder, and the test's namespace.
struct Site {
    ns: TestNamespace,
    /// Holds the files below until the test ends.
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    go: PathBuf,
    /// Our flat file: Go binaries are present (the migration's setting).
    our_flat: PathBuf,
    /// The Go binary's flat file (it fails every call without one), named by
    /// `configuration_path`, so nothing outside the test's folder is read.
    go_flat: PathBuf,
    /// The agent of the nodes that run ours through one.
    agent: agent_process::Agent,
}

impl Site {
    fn new(plane: &'static kube_apiserver::ControlPlane, hint: &str) -> Option<Site> {
        let go = go_plugin()?;
        let ns = plane.namespace(hint);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = ns.kubeconfig(dir.path());
        let our_flat = dir.path().join("ours.conf");
        let temp = std::env::temp_dir().canonicalize().unwrap();
        let flat = json!({"allow_inline_paths": [temp], "allow_insecure_tls": true,
                          "go_whereabouts": "present"});
        std::fs::write(&our_flat, flat.to_string()).unwrap();
        let go_flat = dir.path().join("go.conf");
        let flat = json!({"datastore": "kubernetes",
                          "kubernetes": {"kubeconfig": kubeconfig.display().to_string()}});
        std::fs::write(&go_flat, flat.to_string()).unwrap();
        let settings = json!({"datastore": "kubernetes", "go_whereabouts": "present",
                              "kubernetes": {"kubeconfig": kubeconfig},
                              "allow_inline_paths": [temp], "allow_insecure_tls": true});
        let agent = agent_process::Agent::start(dir.path(), "agent-node", settings);
        Some(Site {
            ns,
            _dir: dir,
            kubeconfig,
            go,
            our_flat,
            go_flat,
            agent,
        })
    }

    /// The network configuration `binary` is given for `range`.
    fn conf(&self, binary: Binary, range: &str, sleep_for_race: u64) -> String {
        netconf("mixednet", &self.ipam(binary, range, sleep_for_race))
    }

    fn ipam(&self, binary: Binary, range: &str, sleep_for_race: u64) -> Value {
        let mut ipam = json!({
            "type": "whereabouts",
            "range": range,
            "kubernetes": {"kubeconfig": self.kubeconfig.display().to_string()},
            "sleep_for_race": sleep_for_race,
        });
        if binary == Binary::Go {
            ipam["configuration_path"] = json!(self.go_flat.display().to_string());
            ipam["log_level"] = json!("panic");
        } else {
            ipam["log_level"] = json!("error");
        }
        ipam
    }

    fn call(
        &self,
        binary: Binary,
        command: &str,
        pod: &str,
        node: &str,
        range: &str,
        sleep: u64,
    ) -> Reply {
        self.call_with(binary, command, pod, node, &self.conf(binary, range, sleep))
    }

    fn call_with(&self, binary: Binary, command: &str, pod: &str, node: &str, conf: &str) -> Reply {
        let mut env = vec![("WHEREABOUTS_FLAT_FILE", self.our_flat.display().to_string())];
        if binary == Binary::OursViaAgent {
            env = vec![
                (
                    "WHEREABOUTS_FLAT_FILE",
                    self.agent.flat_file.display().to_string(),
                ),
                self.agent.env(),
            ];
        }
        let call = Call {
            command,
            container: pod,
            ifname: "net1",
            pod: Some((&self.ns.name, pod)),
            node: Some(node),
            env,
        };
        let bin = match binary {
            Binary::Go => self.go.as_path(),
            Binary::Ours | Binary::OursViaAgent => ours(),
        };
        run(bin, &call, conf)
    }

    /// `whereabouts doctor` on the namespace: its exit status and JSON report.
    fn doctor(&self, extra: &[&str]) -> (bool, Value) {
        let out = Command::new(ours())
            .env_clear()
            .env("WHEREABOUTS_FLAT_FILE", &self.our_flat)
            .args(["doctor", "--output", "json", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(extra)
            .output()
            .expect("run whereabouts doctor");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "doctor printed no report: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), report)
    }

    /// Nothing held twice, nothing lost, nothing left behind: doctor finds nothing.
    fn assert_healthy(&self, step: &str) {
        let (ok, report) = self.doctor(&[]);
        assert!(
            ok && report["findings"].as_array().is_some_and(Vec::is_empty),
            "{step}: {report:#}"
        );
    }

    /// Every address a pool holds, and by which container.
    fn held(&self) -> BTreeMap<String, String> {
        let mut held = BTreeMap::new();
        for pool in self.ns.list("ippools") {
            for ip in fake_apiserver::harness::pool_ips(&pool) {
                let base = pool_base(&pool);
                let key = (to_u128(ip) - base).to_string();
                let id = pool["spec"]["allocations"][&key]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let twice = held.insert(ip.to_string(), id);
                assert!(twice.is_none(), "{ip} is in two pools");
            }
        }
        held
    }
}

fn to_u128(ip: std::net::IpAddr) -> u128 {
    match ip {
        std::net::IpAddr::V4(v4) => u32::from(v4) as u128,
        std::net::IpAddr::V6(v6) => u128::from(v6),
    }
}

fn pool_base(pool: &Value) -> u128 {
    let range = pool["spec"]["range"].as_str().unwrap_or_default();
    to_u128(range.split('/').next().unwrap().parse().unwrap())
}

/// How many times a runtime tries a pod's ADD in these bursts before the test gives up.
const ADD_ATTEMPTS: usize = 5;

/// One pod's ADD of a burst as a runtime makes it: on failure the runtime's cleanup DEL
/// follows, through the same binary, and the runtime tries again (the kubelet creates the
/// sandbox again). Our binary may fail only with code 11 (try again: the Go binaries' Lease
/// held past its deadline); the Go binary's failures under these races are its own. Returns
/// the address handed out.
fn add_like_a_runtime(
    site: &Site,
    binary: Binary,
    pod: &str,
    node: &str,
    range: &str,
    sleep: u64,
) -> String {
    for _ in 0..ADD_ATTEMPTS {
        let reply = site.call(binary, "ADD", pod, node, range, sleep);
        if reply.code == 0 {
            let ips = reply.ips();
            assert_eq!(ips.len(), 1, "{binary:?} ADD {pod}: {reply:?}");
            return ips.into_iter().next().unwrap();
        }
        if binary != Binary::Go {
            assert_eq!(reply.cni_code(), 11, "{binary:?} ADD {pod}: {reply:?}");
        }
        let del = site.call(binary, "DEL", pod, node, range, 0);
        assert_eq!(del.code, 0, "{binary:?} cleanup DEL {pod}: {del:?}");
    }
    panic!("{binary:?} ADD {pod} failed {ADD_ATTEMPTS} times in a row");
}

/// Runs `jobs` (binary, pod, node, range, sleep) `parallel` at a time; the addresses handed out.
fn burst(
    site: &Site,
    jobs: &[(Binary, String, String, String, u64)],
    parallel: usize,
) -> Vec<(String, String)> {
    let next = AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((binary, pod, node, range, sleep)) = jobs.get(i) else {
                    return;
                };
                let ip = add_like_a_runtime(site, *binary, pod, node, range, *sleep);
                results.lock().unwrap().push((pod.clone(), ip));
            });
        }
    });
    results.into_inner().unwrap()
}

/// Zero duplicates among the addresses handed out, and every one still held by its pod.
fn assert_granted_and_held(site: &Site, granted: &[(String, String)], step: &str) {
    let held = site.held();
    let mut seen = BTreeSet::new();
    for (pod, ip) in granted {
        assert!(seen.insert(ip.clone()), "{step}: {ip} handed out twice");
        assert_eq!(held.get(ip), Some(pod), "{step}: {ip} of {pod} is not held");
    }
}

/// Overlapping ranges of one network, one served by the Go binary and one by ours, in
/// alternating bursts with widened race windows: the rollout race (a Go ADD checks a
/// reservation, ours takes it, the Go ADD fails and its cleanup DEL deletes the reservation)
/// must not cost an address, because our ADDs take part in the Go binaries' Lease.
#[test]
fn overlapping_ranges_served_by_both_binaries() {
    let plane = real_cluster!();
    let Some(site) = Site::new(plane, "mixed-overlap") else {
        return;
    };
    let (wide, narrow) = ("10.91.0.0/24", "10.91.0.0/26");
    let jobs: Vec<_> = (0..24)
        .map(|i| {
            let (binary, range) = match i % 4 {
                0 | 2 => (Binary::Go, wide),
                1 => (Binary::Ours, narrow),
                _ => (Binary::OursViaAgent, narrow),
            };
            // Every third call of each side holds its read for a second before writing.
            let sleep = u64::from(i % 6 < 2);
            let node = format!("node-{}", i % 4);
            (binary, format!("pod-{i}"), node, range.to_string(), sleep)
        })
        .collect();
    // Every pod gets its address (a runtime tries again), our ADDs failing only as "try again"
    // (add_like_a_runtime fails the test otherwise).
    let granted = burst(&site, &jobs, 8);
    let through_agent = site
        .agent
        .metric("whereabouts_agent_requests_total{operation=\"add\"");
    assert!(
        through_agent >= 6.0,
        "the agent served {through_agent} ADDs"
    );
    assert_granted_and_held(&site, &granted, "after the burst");
    site.assert_healthy("after the burst");
    // DELs through the other binary than the one that added.
    for (binary, pod, node, range, _) in &jobs {
        let other = match binary {
            Binary::Go => Binary::OursViaAgent,
            Binary::Ours | Binary::OursViaAgent => Binary::Go,
        };
        let reply = site.call(other, "DEL", pod, node, range, 0);
        assert_eq!(reply.code, 0, "{other:?} DEL {pod}: {reply:?}");
    }
    assert!(site.held().is_empty(), "{:?}", site.held());
    assert!(site.ns.list(RESERVATIONS).is_empty());
    site.assert_healthy("after the DELs");
}

/// A cluster's nodes swap binaries one by one, Go to ours and back, while pods come and go on
/// every node; doctor finds nothing after every step.
#[test]
fn rollout_and_rollback_node_by_node() {
    let plane = real_cluster!();
    let Some(site) = Site::new(plane, "mixed-rollout") else {
        return;
    };
    let range = "10.92.0.0/24";
    const NODES: usize = 4;
    let mut binaries = [Binary::Go; NODES];
    // Go everywhere, then each node to ours, then each node back to Go.
    let mut schedule: Vec<Option<(usize, Binary)>> = vec![None];
    // Half of the nodes run ours through a node agent.
    let ours_on = |n: usize| {
        if n.is_multiple_of(2) {
            Binary::Ours
        } else {
            Binary::OursViaAgent
        }
    };
    schedule.extend((0..NODES).map(|n| Some((n, ours_on(n)))));
    schedule.extend((0..NODES).map(|n| Some((n, Binary::Go))));
    let mut alive: Vec<(String, usize, String)> = Vec::new();
    for (step, change) in schedule.into_iter().enumerate() {
        if let Some((node, binary)) = change {
            binaries[node] = binary;
        }
        let label = format!("step {step} ({binaries:?})");
        // Two new pods on every node at once, one of each pair with a widened race window.
        let jobs: Vec<_> = (0..NODES * 2)
            .map(|i| {
                let node = i % NODES;
                let pod = format!("s{step}-p{i}");
                let sleep = u64::from(i % 3 == 0);
                (
                    binaries[node],
                    pod,
                    format!("node-{node}"),
                    range.to_string(),
                    sleep,
                )
            })
            .collect();
        let granted = burst(&site, &jobs, NODES * 2);
        let by_pod: BTreeMap<_, _> = granted.iter().cloned().collect();
        for (i, (_, pod, _, _, _)) in jobs.iter().enumerate() {
            alive.push((pod.clone(), i % NODES, by_pod[pod].clone()));
        }
        let granted: Vec<_> = alive
            .iter()
            .map(|(pod, _, ip)| (pod.clone(), ip.clone()))
            .collect();
        assert_granted_and_held(&site, &granted, &label);
        site.assert_healthy(&label);
        // The oldest pod of every node goes, through whatever its node runs now.
        for (node, binary) in binaries.iter().enumerate() {
            if let Some(pos) = alive.iter().position(|(_, n, _)| *n == node) {
                let (pod, _, _) = alive.remove(pos);
                let reply = site.call(*binary, "DEL", &pod, &format!("node-{node}"), range, 0);
                assert_eq!(reply.code, 0, "{label}: DEL {pod}: {reply:?}");
            }
        }
        let granted: Vec<_> = alive
            .iter()
            .map(|(pod, _, ip)| (pod.clone(), ip.clone()))
            .collect();
        assert_granted_and_held(&site, &granted, &format!("{label}, after the DELs"));
        site.assert_healthy(&format!("{label}, after the DELs"));
    }
}

/// The Go reconciler (`ip-control-loop`, its cron job and its pod controller) over pools both
/// binaries wrote: it keeps every address a live pod's Multus network-status lists, whichever
/// binary handed it out, frees the addresses of pods that are gone, and leaves pools both
/// binaries go on serving without a duplicate.
#[test]
fn go_reconciler_over_entries_of_both_binaries() {
    // A control plane of its own: the Go reconciler works on every namespace, and would free
    // the addresses other tests hand to pods that have no Pod object.
    let Some((site, tools)) = site_of_its_own("mixed-reconciler", "go-whereabouts-ip-control-loop")
    else {
        return;
    };
    let (wide, narrow) = ("10.95.0.0/24", "10.95.0.0/26");
    let jobs = |round: &str| -> Vec<_> {
        (0..12)
            .map(|i| {
                let (binary, range) = if i % 2 == 0 {
                    (Binary::Go, wide)
                } else {
                    (Binary::Ours, narrow)
                };
                let node = format!("node-{}", i % 3);
                let pod = format!("{round}-{i}");
                (binary, pod, node, range.to_string(), u64::from(i % 6 == 1))
            })
            .collect()
    };
    let granted = burst(&site, &jobs("first"), 6);
    // Pods 2, 3, 6, 7, 10 and 11 (half of each binary's) are gone without a DEL; the others
    // run, and Multus lists their addresses.
    let index = |pod: &str| pod.rsplit('-').next().unwrap().parse::<usize>().unwrap();
    let (gone, live): (Vec<_>, Vec<_>) = granted
        .into_iter()
        .partition(|(pod, _)| index(pod) % 4 >= 2);
    for (pod, ip) in &live {
        add_pod_with_network_status(&site.ns, pod, ip);
    }

    let mut control_loop = GoControlLoop::start(&site, &tools);
    control_loop.wait_for_a_reconcile();
    assert_granted_and_held(&site, &live, "after the Go reconciler");
    let held = site.held();
    let reserved: BTreeSet<String> = site
        .ns
        .list(RESERVATIONS)
        .iter()
        .filter_map(|r| r["metadata"]["name"].as_str().map(String::from))
        .collect();
    for (pod, ip) in &gone {
        assert!(
            !held.contains_key(ip),
            "{ip} of gone pod {pod} is still held"
        );
        assert!(
            !reserved.contains(ip),
            "{ip} of gone pod {pod} is still reserved"
        );
    }
    site.assert_healthy("after the Go reconciler");

    // Both binaries go on serving the reconciled pools: nothing handed out twice.
    let more = burst(&site, &jobs("second"), 6);
    let mut all = live.clone();
    all.extend(more);
    assert_granted_and_held(&site, &all, "a burst after the Go reconciler");
    site.assert_healthy("a burst after the Go reconciler");
    drop(control_loop);
}

/// A Running pod of `ns` whose Multus network-status annotation lists `ip` on `net1`, as the
/// Go reconciler requires of a pod whose address it keeps.
fn add_pod_with_network_status(ns: &TestNamespace, pod: &str, ip: &str) {
    let status = json!([{"name": format!("{}/mixednet", ns.name), "interface": "net1",
                         "ips": [ip], "default": false}]);
    let annotations = json!({"k8s.v1.cni.cncf.io/network-status": status.to_string()});
    ns.create(
        "pods",
        json!({"metadata": {"name": pod, "annotations": annotations},
               "spec": {"automountServiceAccountToken": false,
                        "containers": [{"name": "main", "image": "test.invalid/pause"}]}}),
    );
    ns.set_pod_phase(pod, "Running");
}

/// The Go `ip-control-loop` as its DaemonSet runs it. It reads its schedule from
/// `/cron-schedule/config` and its credentials from the in-cluster service-account folder, both
/// fixed paths: it runs chrooted into a folder of the test that holds them, its shared libraries
/// and a ServiceAccount token bound to cluster-admin, so nothing on the host is written.
struct GoControlLoop {
    daemon: Daemon,
    log: PathBuf,
}

impl GoControlLoop {
    fn start(site: &Site, tools: &Path) -> GoControlLoop {
        let plane = site.ns.plane;
        let root = site._dir.path().join("go-root");
        let binary = tools.join("go-whereabouts-ip-control-loop");
        copy_into(&root, &binary, Path::new("/ip-control-loop"));
        let ldd = Command::new("ldd").arg(&binary).output().expect("run ldd");
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            copy_into(&root, Path::new(lib), Path::new(lib));
        }
        std::fs::create_dir_all(root.join("cron-schedule")).unwrap();
        // Every minute: the shortest schedule its five-field cron takes.
        std::fs::write(root.join("cron-schedule/config"), "* * * * *").unwrap();
        let account = root.join("var/run/secrets/kubernetes.io/serviceaccount");
        std::fs::create_dir_all(&account).unwrap();
        let ns = &site.ns.name;
        plane.kubectl(&["create", "serviceaccount", "go-reconciler", "-n", ns]);
        let binding = format!("go-reconciler-{ns}");
        let subject = format!("--serviceaccount={ns}:go-reconciler");
        plane.kubectl(&[
            "create",
            "clusterrolebinding",
            &binding,
            "--clusterrole=cluster-admin",
            &subject,
        ]);
        let token = plane.kubectl(&[
            "create",
            "token",
            "go-reconciler",
            "-n",
            ns,
            "--duration=1h",
        ]);
        std::fs::write(account.join("token"), token.trim()).unwrap();
        std::fs::copy(plane.ca(), account.join("ca.crt")).unwrap();
        std::fs::write(account.join("namespace"), ns).unwrap();
        let port = plane
            .server
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/');
        let log = site._dir.path().join("go-control-loop.log");
        let child = Command::new("chroot")
            .arg(&root)
            .arg("/ip-control-loop")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", port)
            // Its pod controller serves one node, which must exist.
            .env("NODENAME", site.ns.add_node())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the Go ip-control-loop (chroot)");
        GoControlLoop {
            daemon: Daemon(child),
            log,
        }
    }

    /// Waits for the first scheduled reconcile to finish, and fails if it failed.
    fn wait_for_a_reconcile(&mut self) {
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.daemon.0.try_wait() {
                panic!(
                    "the Go ip-control-loop exited ({status}): {}",
                    tail(&self.log)
                );
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains("reconciler success") {
                return;
            }
            assert!(
                !log.contains("reconciler failure"),
                "the Go reconciler failed: {}",
                tail(&self.log)
            );
            assert!(
                start.elapsed() < std::time::Duration::from_secs(90),
                "no Go reconcile within 90 s: {}",
                tail(&self.log)
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

/// Copies `file` to `at` inside `root`, making the folders on the way.
fn copy_into(root: &Path, file: &Path, at: &Path) {
    let target = root.join(at.strip_prefix("/").unwrap());
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(file, &target).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
}

/// doctor on objects broken on purpose: each problem found, the safe ones repaired with
/// `--fix`, the others left for a human, and nothing changed without `--fix`.
#[test]
fn doctor_finds_and_repairs() {
    let plane = real_cluster!();
    let ns = plane.namespace("doctor");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let flat = dir.path().join("flat.conf");
    std::fs::write(&flat, "{}").unwrap();
    let doctor = |extra: &[&str]| -> (bool, Value) {
        let out = Command::new(ours())
            .env_clear()
            .env("WHEREABOUTS_FLAT_FILE", &flat)
            .args(["doctor", "--output", "json", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(extra)
            .output()
            .unwrap();
        let report = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.success(), report)
    };
    let problems = |report: &Value| -> BTreeSet<(String, String)> {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["problem"].as_str().unwrap().to_string(),
                    f["address"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let (ok, report) = doctor(&[]);
    assert!(ok && problems(&report).is_empty(), "{report:#}");
    let entry = |id: &str, podref: &str| json!({"id": id, "podref": podref, "ifname": "net1"});
    let big = ((1u128 << 63) + 1).to_string();
    ns.create(
        "ippools",
        json!({"metadata": {"name": "10.93.0.0-24"}, "spec": {"range": "10.93.0.0/24",
            "allocations": {"1": entry("c1", "default/a"), "2": entry("c2", "default/b"),
                            "3": entry("c3", "")}}}),
    );
    ns.create(
        "ippools",
        json!({"metadata": {"name": "10.93.0.0-25"}, "spec": {"range": "10.93.0.0/25",
            "allocations": {"2": entry("c9", "default/z")}}}),
    );
    ns.create(
        "ippools",
        json!({"metadata": {"name": "fd00-93---64"}, "spec": {"range": "fd00:93::/64",
            "allocations": {big.as_str(): entry("c4", "default/d")}}}),
    );
    let reservation = |name: &str, podref: &str, id: &str| {
        ns.create(
            RESERVATIONS,
            json!({"metadata": {"name": name},
                   "spec": {"podref": podref, "containerid": id, "ifname": "net1"}}),
        );
    };
    // 10.93.0.1 lacks its reservation; 10.93.0.2 has one of two holders; 10.93.0.3 is podless;
    // 10.93.0.9 is reserved by no one.
    reservation("10.93.0.2", "default/b", "c2");
    reservation("10.93.0.3", "", "c3");
    reservation("10.93.0.9", "default/gone", "c8");
    reservation("fd00-93--8000-0-0-1", "default/d", "c4");
    // Kubernetes refuses the Go binary's name for ::/126 (`---126`); ours is made valid.
    ns.create(
        "ippools",
        json!({"metadata": {"name": "0---126"}, "spec": {"range": "::/126", "allocations": {}}}),
    );
    // An entry that is no address of its range.
    ns.create(
        "ippools",
        json!({"metadata": {"name": "10.93.1.0-24"}, "spec": {"range": "10.93.1.0/24",
            "allocations": {"300": entry("c5", "default/e")}}}),
    );
    // node-x holds an address in a slice its NodeSlicePool does not give it.
    ns.create(
        "nodeslicepools",
        json!({"metadata": {"name": "slicenet"},
               "spec": {"range": "10.96.0.0/16", "sliceSize": "24"},
               "status": {"allocations": [{"nodeName": "node-x", "sliceRange": "10.96.1.0/24"}]}}),
    );
    ns.create(
        "ippools",
        json!({"metadata": {"name": "slicenet-node-x-10.96.0.0-24"},
               "spec": {"range": "10.96.0.0/24", "allocations": {"1": entry("c6", "default/f")}}}),
    );
    reservation("10.96.0.1", "default/f", "c6");
    let before = (ns.list("ippools"), ns.list(RESERVATIONS));
    let (ok, report) = doctor(&[]);
    assert!(!ok, "findings fail the command");
    let found = problems(&report);
    for expected in [
        ("missing_reservation", "10.93.0.1"),
        ("held_twice", "10.93.0.2"),
        ("reservation_holder_differs", "10.93.0.2"),
        ("podless", "10.93.0.3"),
        ("orphan_reservation", ""),
        ("beyond_go_offsets", "fd00:93::8000:0:0:1"),
        ("made_valid_name", ""),
        ("unreadable_entry", ""),
        ("slice_mismatch", ""),
    ] {
        let expected = (expected.0.to_string(), expected.1.to_string());
        assert!(found.contains(&expected), "{expected:?} not in {report:#}");
    }
    // Read-only without --fix.
    assert_eq!(before, (ns.list("ippools"), ns.list(RESERVATIONS)));
    // Another namespace named over the kubeconfig's context: its own (no) findings, and the
    // namespace read is said, so an empty report of the wrong one is not taken for healthy.
    let elsewhere = plane.namespace("doctor-elsewhere");
    let (ok, report) = doctor(&["--namespace", &elsewhere.name]);
    assert!(ok && problems(&report).is_empty(), "{report:#}");
    let out = Command::new(ours())
        .env_clear()
        .env("WHEREABOUTS_FLAT_FILE", &flat)
        .args(["doctor", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("namespace {} at", ns.name)),
        "{said}"
    );
    // A young orphan is left alone even with --fix (an ADD may be creating its pool entry).
    let (_, report) = doctor(&["--fix"]);
    let orphan = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["problem"] == "orphan_reservation")
        .cloned()
        .unwrap();
    assert!(
        orphan["action"].as_str().unwrap().starts_with("none yet"),
        "{orphan}"
    );
    assert!(
        ns.get(RESERVATIONS, "10.93.0.1").is_some(),
        "missing one created"
    );
    let (_, report) = doctor(&["--fix", "--orphan-age", "0"]);
    assert!(ns.get(RESERVATIONS, "10.93.0.9").is_none(), "{report:#}");
    let (ok, report) = doctor(&[]);
    assert!(!ok);
    let left: BTreeSet<String> = problems(&report).into_iter().map(|(p, _)| p).collect();
    let expected: BTreeSet<String> = [
        "held_twice",
        "reservation_holder_differs",
        "podless",
        "beyond_go_offsets",
        "made_valid_name",
        "unreadable_entry",
        "slice_mismatch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(left, expected, "{report:#}");
}

/// A process of a test, killed when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Nodes of the shared control plane made by one test, deleted when dropped.
struct Nodes<'a>(&'a TestNamespace, Vec<String>);

impl Nodes<'_> {
    fn add(&mut self, name: &str) {
        self.0.apply(
            &kube_apiserver::resource("nodes"),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
        );
        self.1.push(name.to_string());
    }
}

impl Drop for Nodes<'_> {
    fn drop(&mut self) {
        for node in &self.1 {
            self.0
                .plane
                .kubectl(&["delete", "node", node, "--wait=false"]);
        }
    }
}

/// The slice each node holds in NodeSlicePool `name`, once `nodes` all hold one.
fn slices_once_assigned(
    ns: &TestNamespace,
    name: &str,
    nodes: &[String],
    log: &Path,
) -> BTreeMap<String, String> {
    let start = std::time::Instant::now();
    loop {
        let assigned: BTreeMap<String, String> = ns
            .get("nodeslicepools", name)
            .and_then(|p| p["status"]["allocations"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|a| {
                let node = a["nodeName"].as_str().filter(|n| !n.is_empty())?;
                Some((node.to_string(), a["sliceRange"].as_str()?.to_string()))
            })
            .collect();
        if nodes.iter().all(|n| assigned.contains_key(n)) {
            return assigned;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "no slice for every node of {nodes:?}: {:#}\ncontroller log (end): {}",
            ns.get("nodeslicepools", name).unwrap_or_default(),
            tail(log)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// NodeSlicePools written by the Go controller are read by ours and the other way round: no
/// node changes slice when the controllers swap (in both directions), the slice size keeps the
/// NetworkAttachmentDefinition's text and the owner reference stays; each binary's ADD lands
/// in its node's slice.
#[test]
fn node_slices_written_by_either_controller() {
    // A control plane of its own: the Go controller stops serving every network as soon as one
    // NetworkAttachmentDefinition anywhere in the cluster cannot be read with a flat file, which
    // other tests' NetworkAttachmentDefinitions cannot be.
    let Some((site, tools)) =
        site_of_its_own("mixed-slices", "go-whereabouts-node-slice-controller")
    else {
        return;
    };
    let ns = &site.ns;
    let tag = format!("{}-{}", std::process::id(), ns.name.len());
    let mut nodes = Nodes(ns, Vec::new());
    let name = |n: &str| format!("mixslice-{n}-{tag}");
    nodes.add(&name("a"));
    nodes.add(&name("b"));
    let mut ipam = site.ipam(Binary::Go, "10.94.0.0/16", 0);
    ipam["node_slice_size"] = json!("24");
    let config = netconf("slicenet", &ipam);
    let nad = ns.create(
        "network-attachment-definitions",
        json!({"metadata": {"name": "slicenet"}, "spec": {"config": config}}),
    );
    let nad_uid = nad["metadata"]["uid"].as_str().unwrap().to_string();
    let go_log = site._dir.path().join("go-controller.log");
    let our_log = site._dir.path().join("our-controller.log");
    let go_controller = || {
        Daemon(
            Command::new(tools.join("go-whereabouts-node-slice-controller"))
                .env_clear()
                .env("WHEREABOUTS_NAMESPACE", &ns.name)
                .arg("--kubeconfig")
                .arg(&site.kubeconfig)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&go_log).unwrap())
                .spawn()
                .expect("start the Go node-slice controller"),
        )
    };
    let check_pool = |step: &str| {
        let pool = ns.get("nodeslicepools", "slicenet").unwrap();
        assert_eq!(pool["spec"]["sliceSize"], "24", "{step}: {pool:#}");
        let owners = pool["metadata"]["ownerReferences"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            owners
                .iter()
                .any(|o| o["uid"] == nad_uid.as_str() && o["controller"] == true),
            "{step}: {pool:#}"
        );
    };

    let go = go_controller();
    let first = slices_once_assigned(ns, "slicenet", &nodes.1, &go_log);
    drop(go);
    check_pool("written by the Go controller");

    let ours_controller = Daemon(
        Command::new(ours())
            .env_clear()
            .env("WHEREABOUTS_FLAT_FILE", &site.our_flat)
            .args(["controller", "--datastore", "kubernetes", "--kubeconfig"])
            .arg(&site.kubeconfig)
            .args(["--namespace", &ns.name, "--listen", "127.0.0.1:0"])
            .args([
                "--no-leader-election",
                "--no-events",
                "--watch-timeout",
                "5",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&our_log).unwrap())
            .spawn()
            .expect("start our controller"),
    );
    nodes.add(&name("c"));
    let second = slices_once_assigned(ns, "slicenet", &nodes.1, &our_log);
    drop(ours_controller);
    for (node, slice) in &first {
        assert_eq!(second.get(node), Some(slice), "our controller moved {node}");
    }
    check_pool("after our controller");

    let go = go_controller();
    nodes.add(&name("d"));
    let third = slices_once_assigned(ns, "slicenet", &nodes.1, &go_log);
    drop(go);
    for (node, slice) in &second {
        assert_eq!(
            third.get(node),
            Some(slice),
            "the Go controller moved {node}"
        );
    }
    check_pool("back to the Go controller");

    // Each binary's ADD in its own node's slice, side by side.
    for (binary, node, pod) in [
        (Binary::Go, name("a"), "slice-pod-a"),
        (Binary::Ours, name("b"), "slice-pod-b"),
    ] {
        let mut ipam = site.ipam(binary, "10.94.0.0/16", 0);
        ipam["node_slice_size"] = json!("24");
        let conf = netconf("slicenet", &ipam);
        let reply = site.call_with(binary, "ADD", pod, &node, &conf);
        assert_eq!(reply.code, 0, "{binary:?} ADD on {node}: {reply:?}");
        let slice = kube_cidr(&third[&node]);
        let ip: std::net::IpAddr = reply.ips()[0].parse().unwrap();
        assert!(
            slice.0 <= to_u128(ip) && to_u128(ip) < slice.1,
            "{ip} outside {}",
            third[&node]
        );
    }
    site.assert_healthy("ADDs in node slices");
}

/// A site on a control plane of its own (see [`kube_apiserver::dedicated_control_plane`]) with
/// our CRDs and the NetworkAttachmentDefinition CRD installed, for a Go daemon that works
/// cluster-wide, and the folder of that daemon's binary `go_tool`. `None` (after a loud notice,
/// failing in CI) when a part cannot be had.
fn site_of_its_own(name: &str, go_tool: &str) -> Option<(Site, PathBuf)> {
    let plane = kube_apiserver::dedicated_control_plane(name)?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut apply = vec!["apply".to_string(), "--server-side".into()];
    for crd in [
        "deploy/whereabouts.cni.cncf.io_ippools.yaml",
        "deploy/whereabouts.cni.cncf.io_overlappingrangeipreservations.yaml",
        "deploy/whereabouts.cni.cncf.io_nodeslicepools.yaml",
        "tests/data/network-attachment-definition-crd.yaml",
    ] {
        apply.extend(["-f".into(), repo.join(crd).display().to_string()]);
    }
    plane.kubectl(&apply.iter().map(String::as_str).collect::<Vec<_>>());
    plane.kubectl(&["wait", "--for=condition=Established", "crd", "--all"]);
    let site = Site::new(plane, name)?;
    Some((site, common::tools::go_tools(&[go_tool])?))
}

/// The last lines of a log file.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// The first address of a CIDR and the first one past it.
fn kube_cidr(text: &str) -> (u128, u128) {
    let (ip, len) = text.split_once('/').unwrap();
    let base = to_u128(ip.parse().unwrap());
    let len: u32 = len.parse().unwrap();
    (base, base + (1u128 << (32 - len)))
}
