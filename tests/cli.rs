//! `whereabouts pools` and `whereabouts allocations` through the real binary, on the local store
//! and on a real etcd cluster.

mod common;
mod etcd_cluster;

use std::path::{Path, PathBuf};

use common::{bare, call_with, ips, pod_args, Reply};
use serde_json::{json, Value};

fn cli(conf: &Path, args: &[&str]) -> Reply {
    let out = common::operator()
        .args(args)
        .arg("--config")
        .arg(conf)
        .output()
        .unwrap();
    Reply::from(out)
}

/// Three pods in the first range and one in the second, through the plugin; the file it wrote.
fn populate(dir: &Path, ipam: Value) -> (std::path::PathBuf, Vec<String>) {
    let mut conf = json!({"cniVersion": "1.1.0", "name": "clinet", "type": "bridge", "ipam": ipam});
    conf["ipam"]["type"] = "whereabouts".into();
    conf["ipam"]["log_level"] = "error".into();
    let path = dir.join("net.conf");
    std::fs::write(&path, conf.to_string()).unwrap();
    let mut got = Vec::new();
    for pod in ["a", "b", "c"] {
        let reply = call_with(
            &conf,
            "ADD",
            &format!("ctr-{pod}"),
            "net1",
            &pod_args(&format!("team/{pod}")),
        );
        got.extend(ips(&reply.ok()).iter().map(|a| bare(a)));
    }
    (path, got)
}

fn check_listings(conf: &Path, got: &[String]) {
    // Every allocation, sorted, with its holder.
    let all = cli(conf, &["allocations", "-o", "json"]).ok();
    let rows = all.as_array().unwrap();
    assert_eq!(rows.len(), got.len(), "{all}");
    let first = rows.iter().find(|r| r["pod"] == "team/a").unwrap();
    assert_eq!(first["container"], "ctr-a");
    assert_eq!(first["interface"], "net1");
    // Filtered by range (CIDR) and by pool name.
    let v4 = cli(conf, &["allocations", "10.90.0.0/24", "-o", "json"]).ok();
    assert_eq!(v4.as_array().unwrap().len(), 3, "{v4}");
    assert!(v4
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["address"].as_str().unwrap().starts_with("10.90.0.")));
    // A wider block holds them too (a node-sliced range's addresses are in its slices' pools).
    let wider = cli(conf, &["allocations", "10.90.0.0/16", "-o", "json"]).ok();
    assert_eq!(wider, v4);
    let by_name = cli(conf, &["allocations", "fd90---120", "-o", "json"]).ok();
    assert_eq!(by_name.as_array().unwrap().len(), 3, "{by_name}");
    // The table names its columns and every address.
    let table = cli(conf, &["allocations"]);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.starts_with("ADDRESS"), "{}", table.stdout);
    for ip in got {
        assert!(
            table.stdout.contains(ip.as_str()),
            "{ip} missing: {}",
            table.stdout
        );
    }
    // Pools: used and free per range, from the configured bounds and exclusions.
    let pools = cli(conf, &["pools", "-o", "json"]).ok();
    let v4 = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["range"] == "10.90.0.0/24")
        .unwrap();
    assert_eq!(v4["used"], 3);
    assert_eq!(
        v4["free"],
        254 - 4 - 3,
        "exclude 10.90.0.0/30 blocks 3 usable addresses, gateway one: {v4}"
    );
    let v6 = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["range"] == "fd90::/120")
        .unwrap();
    assert_eq!(v6["used"], 3);
    assert_eq!(v6["free"], 254 - 3);
    let table = cli(conf, &["pools"]);
    assert!(
        table.stdout.contains("UTILISATION") && table.stdout.contains("fd90---120"),
        "{}",
        table.stdout
    );
}

fn ipam(extra: Value) -> Value {
    let mut ipam = json!({"range": "10.90.0.0/24", "exclude": ["10.90.0.0/30"], "gateway": "10.90.0.254",
        "ipRanges": [{"range": "fd90::/120"}]});
    for (k, v) in extra.as_object().unwrap() {
        ipam[k] = v.clone();
    }
    ipam
}

#[test]
fn pools_and_allocations_on_the_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, got) = populate(
        dir.path(),
        ipam(json!({"local_path": dir.path().join("wb.db")})),
    );
    check_listings(&conf, &got);
    // Flags override the file: another database (made by a plugin's STATUS) is empty.
    let other = dir.path().join("other.db");
    let mut status = json!({"cniVersion": "1.1.0", "name": "clinet", "type": "bridge",
        "ipam": ipam(json!({"local_path": other}))});
    status["ipam"]["type"] = "whereabouts".into();
    call_with(&status, "STATUS", "", "", "").ok_empty();
    let empty = cli(
        &conf,
        &[
            "allocations",
            "-o",
            "json",
            "--local-path",
            other.to_str().unwrap(),
        ],
    )
    .ok();
    assert_eq!(empty, json!([]));
    // The doctor checks the cluster engines; on this one it says what checks the file.
    let doctor = cli(&conf, &["doctor"]);
    assert_eq!(doctor.code, 1, "{doctor:?}");
    assert!(
        doctor.stderr.contains("PRAGMA integrity_check"),
        "{doctor:?}"
    );
    assert_eq!(doctor.stderr.trim().lines().count(), 1, "{doctor:?}");
}

#[test]
fn cli_errors_are_one_line_and_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.conf");
    let reply = cli(&missing, &["pools"]);
    assert_ne!(reply.code, 0);
    assert!(reply.stdout.is_empty());
    assert_eq!(reply.stderr.trim().lines().count(), 1, "{reply:?}");
    assert!(reply.stderr.contains("nope.conf"), "{reply:?}");
    let bad = dir.path().join("bad.conf");
    std::fs::write(
        &bad,
        r#"{"ipam": {"type": "whereabouts", "range": "10.0.0.0/24", "datastore": "etcd"}}"#,
    )
    .unwrap();
    let reply = cli(&bad, &["allocations"]);
    assert_ne!(reply.code, 0);
    assert_eq!(reply.stderr.trim().lines().count(), 1, "{reply:?}");
    assert!(reply.stderr.contains("etcd_host"), "{reply:?}");
    // A local database that is not there (a mistyped path) is no empty store: nothing made.
    let typo = dir.path().join("typo/whereabouts.db");
    let conf = dir.path().join("local.conf");
    let ipam = json!({"ipam": {"type": "whereabouts", "range": "10.0.0.0/24", "local_path": typo}});
    std::fs::write(&conf, ipam.to_string()).unwrap();
    for command in ["allocations", "pools", "gc", "release"] {
        let mut args = vec![command];
        if command == "release" {
            args.push("10.0.0.1");
        }
        let reply = cli(&conf, &args);
        assert_ne!(reply.code, 0, "{command}: {reply:?}");
        assert!(
            reply.stderr.contains("no local database"),
            "{command}: {reply:?}"
        );
    }
    assert!(!typo.parent().unwrap().exists());
}

/// The agent serves the store of the node's flat file, which the plugin uses when no agent
/// answers: a flag naming another store (or the namespace) is refused before anything starts.
#[test]
fn the_agent_serves_no_store_but_the_flat_files() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("other.kubeconfig");
    let kubeconfig = kubeconfig.to_str().unwrap();
    let socket = dir.path().join("agent.sock");
    let socket = socket.to_str().unwrap();
    for (flag, value) in [
        ("--kubeconfig", kubeconfig),
        ("--etcd-host", "https://other:2379"),
        ("--config", kubeconfig),
        ("--namespace", "elsewhere"),
    ] {
        let out = common::operator()
            .args(["agent", "--socket", socket, flag, value])
            .output()
            .unwrap();
        let reply = Reply::from(out);
        assert_ne!(reply.code, 0, "{flag}: {reply:?}");
        assert!(reply.stderr.contains(flag), "{flag}: {reply:?}");
        assert!(
            reply.stderr.contains("is not the agent's"),
            "{flag}: {reply:?}"
        );
    }
    assert!(!Path::new(socket).exists());
}

/// [`populate`] on a 3-member etcd cluster of its own: the cluster, the folder, the file and
/// the addresses; `None` (said loudly, and a failure in CI) where etcd is not installed.
fn populated_etcd() -> Option<(
    etcd_cluster::Cluster,
    tempfile::TempDir,
    PathBuf,
    Vec<String>,
)> {
    if !etcd_cluster::etcd_available() {
        return None;
    }
    let cluster = etcd_cluster::Cluster::start(false);
    let dir = tempfile::tempdir().unwrap();
    let (conf, got) = populate(
        dir.path(),
        ipam(json!({"datastore": "etcd", "etcd_host": cluster.endpoints()})),
    );
    Some((cluster, dir, conf, got))
}

#[test]
fn pools_and_allocations_on_etcd() {
    let Some((_cluster, _dir, conf, got)) = populated_etcd() else {
        return;
    };
    check_listings(&conf, &got);
}

/// The etcd doctor through the binary: a store the plugin wrote is healthy, freed marks
/// included; a lost record and a stray mark are found (by key, with what they cost), and
/// `--fix` folds the marks and nothing else.
#[test]
fn doctor_on_etcd_finds_what_disagrees_and_folds_marks() {
    let Some((cluster, _dir, conf, _)) = populated_etcd() else {
        return;
    };
    let doctor = |fix: &[&str]| cli(&conf, &[&["doctor", "-o", "json"], fix].concat());
    assert_eq!(doctor(&[]).ok(), json!({"healthy": true, "findings": []}));
    cluster.release_by_marking("/whereabouts/", "ctr-a");
    assert_eq!(
        doctor(&[]).ok()["healthy"],
        true,
        "a freed mark is no fault"
    );

    // A hand edit loses ctr-b's record in one pool, and leaves a mark no run covers.
    let kvs = cluster.key_values("/whereabouts/owners/ctr-b/");
    let (owner, offset) = &kvs[0];
    let pool = owner.rsplit('/').next().unwrap();
    let record = format!("/whereabouts/pools/{pool}/a/{offset}");
    cluster.delete(&record);
    let stray = format!("/whereabouts/freed/{pool}/{:032x}", 200);
    cluster.put(&stray, "");
    let found = |reply: &Reply| -> Vec<(String, String, String)> {
        assert_eq!(reply.code, 1, "findings make the exit status 1: {reply:?}");
        let report = reply.json();
        assert_eq!(report["healthy"], false);
        let mut rows: Vec<(String, String, String)> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let text = |field: &str| f[field].as_str().unwrap_or_default().to_string();
                (text("problem"), text("object"), text("action"))
            })
            .collect();
        rows.sort();
        rows
    };
    let none = |problem: &str, object: &str| (problem.into(), object.into(), "none".into());
    let findings = found(&doctor(&[]));
    let reservation = findings
        .iter()
        .find(|(problem, ..)| problem == "orphan_reservation")
        .map(|(_, object, _)| object.clone())
        .expect("ctr-b's reservation found orphaned");
    let hex = |text: &str| u128::from_str_radix(text.rsplit('/').next().unwrap(), 16).unwrap();
    let (run, _) = cluster
        .key_values(&format!("/whereabouts/pools/{pool}/r/"))
        .into_iter()
        .find(|(start, end)| (hex(start)..=hex(end)).contains(&hex(offset)))
        .expect("the run covering the lost record");
    let mut sick = vec![
        none("dangling_owner_entry", owner),
        none("leaked_offsets", &run),
        none("mark_outside_runs", &stray),
        none("orphan_reservation", &reservation),
    ];
    assert_eq!(findings, sick);

    sick[2].2 = "fixed".into();
    assert_eq!(found(&doctor(&["--fix"])), sick);
    let marks = cluster.keys("/whereabouts/freed/");
    assert!(marks.is_empty(), "marks left after --fix: {marks:?}");
}
