//! What the chart ships for monitoring (deploy/helm/whereabouts/files/): the alert rules (also
//! its PrometheusRule), valid for Prometheus, firing on what they are for and not on healthy
//! series (promtool's own rule checks and unit tests, tests/data/alerts.test.yaml), each
//! explained in docs/install.md; the Grafana dashboard, well formed, its queries valid for
//! Prometheus. Both name only metrics the agent and the controller export.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use whereabouts::controller::metrics::PoolStat;
use whereabouts::store::queues::Observer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rules_file() -> PathBuf {
    root().join("deploy/helm/whereabouts/files/whereabouts-alerts.yaml")
}

fn dashboard() -> Value {
    let path = root().join("deploy/helm/whereabouts/files/whereabouts-dashboard.json");
    serde_json::from_str(&read(&path)).expect("the dashboard is JSON")
}

/// The dashboard's queries: (panel title, expression).
fn queries() -> Vec<(String, String)> {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a query");
            queries.push((title.to_string(), expr.to_string()));
        }
    }
    queries
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The rules: (alert name, expression).
fn rules() -> Vec<(String, String)> {
    let doc: Value = serde_saphyr::from_str(&read(&rules_file())).expect("the rules are YAML");
    let groups = doc["groups"].as_array().expect("groups");
    let rules = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"));
    let text = |v: &Value| v.as_str().expect("a string").to_string();
    rules
        .map(|r| (text(&r["alert"]), text(&r["expr"])))
        .collect()
}

/// promtool, built once per version of its module; `None` (said loudly, and a failure in CI)
/// when it cannot be built.
fn promtool() -> Option<PathBuf> {
    common::tools::go_tools(&["promtool"]).map(|dir| dir.join("promtool"))
}

fn promtool_passes(promtool: &Path, args: &[&Path]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(root())
        .output()
        .expect("promtool runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{stdout}\n{stderr}"
    );
}

/// Prometheus' own checks: the expressions parse, the templates of the annotations render.
#[test]
fn the_rules_are_valid_for_prometheus() {
    let Some(promtool) = promtool() else { return };
    promtool_passes(
        &promtool,
        &[Path::new("check"), Path::new("rules"), &rules_file()],
    );
}

/// Each alert fires on the series it is for, after its `for`, with its labels and annotations,
/// and stays quiet on the healthy series beside them.
#[test]
fn each_alert_fires_on_what_it_is_for_and_only_then() {
    let Some(promtool) = promtool() else { return };
    let tests = root().join("tests/data/alerts.test.yaml");
    promtool_passes(&promtool, &[Path::new("test"), Path::new("rules"), &tests]);
    // Every alert has a unit test.
    let tested = read(&tests);
    for (alert, _) in rules() {
        assert!(
            tested.contains(&format!("alertname: {alert}\n")),
            "{alert} is not tested"
        );
    }
}

/// The sample names a prometheus-client registry's text exposes: counters add `_total`,
/// histograms `_bucket`, `_sum` and `_count`.
fn exported(rendered: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in rendered.lines() {
        let Some(declared) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let Some((name, kind)) = declared.split_once(' ') else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// What an agent exports once it has served, combined and followed copies (a family shows
/// only once it has a series).
fn agent_exports() -> String {
    let metrics = whereabouts::agent::metrics::Metrics::new();
    metrics.request("add", "ok", 0.001);
    metrics.batch("add", 2);
    metrics.conflict("add");
    metrics.queued("add");
    metrics.cache("etcd", true);
    metrics.cache("etcd", false);
    metrics.in_step("etcd", 0, 1);
    metrics.freed(1, 1);
    metrics.render()
}

/// What a leading controller exports once it has reconciled, released and assigned slices.
fn controller_exports() -> String {
    let metrics = whereabouts::controller::metrics::Metrics::default();
    metrics.set_pools(&[PoolStat {
        pool: "10.0.0.0-24".into(),
        range: "10.0.0.0/24".into(),
        size: 254,
        used: 1,
    }]);
    metrics.error("release");
    metrics.released("pod_deleted", 1);
    metrics.resynced("pods");
    metrics.reconciled(0.1, BTreeMap::from([("pod_alive", 1)]), 1);
    metrics.set_slices("slices", 1, 2);
    metrics.render()
}

/// A rule or a panel naming a metric nobody exports never fires or stays empty: every name in
/// an expression is one the agent or the controller exports.
#[test]
fn the_rules_and_the_dashboard_name_only_exported_metrics() {
    let mut known = exported(&agent_exports());
    known.extend(exported(&controller_exports()));
    for (user, expr) in rules().into_iter().chain(queries()) {
        let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
        for name in words.filter(|w| w.starts_with("whereabouts_")) {
            assert!(
                known.contains(name),
                "{user} names {name}, which nothing exports"
            );
        }
    }
}

/// Every query of the dashboard parses for Prometheus: promtool checks them as recording rules
/// of a scratch rule file.
#[test]
fn the_dashboards_queries_are_valid_for_prometheus() {
    let Some(promtool) = promtool() else { return };
    let records: Vec<Value> = (0..)
        .zip(queries())
        .map(|(i, (_, expr))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": records}]});
    let dir = tempfile::tempdir().unwrap();
    // JSON is YAML: promtool reads it as a rule file.
    let path = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&path, file.to_string()).unwrap();
    promtool_passes(&promtool, &[Path::new("check"), Path::new("rules"), &path]);
}

/// Grafana imports the dashboard as it is: panels with ids of their own, inside the 24 columns
/// of its grid, every query on the data source the dashboard asks for.
#[test]
fn the_dashboard_is_well_formed() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "whereabouts");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(variables
        .iter()
        .any(|v| v["name"] == "datasource" && v["query"] == "prometheus"));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id taken"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && grid["h"].as_u64() > Some(0),
            "{title}: {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets.iter().chain([panel]) {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    assert!(queries().len() >= 10, "{} queries", queries().len());
}

/// Whoever gets an alert finds what it means and what to do in the install guide.
#[test]
fn each_alert_is_explained() {
    let guide = read(&root().join("docs/install.md"));
    for (alert, _) in rules() {
        assert!(
            guide.contains(&format!("`{alert}`")),
            "{alert} is not in docs/install.md"
        );
    }
}
