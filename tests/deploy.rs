//! The install artefacts in deploy/: CRDs in step with the Rust types and with upstream's wire
//! contract (tests/data/upstream-contract.yaml), the plain manifest and the Helm chart well
//! formed, equivalent, least-privileged and in agreement with the installer's flags and the
//! image. The chart is linted and rendered by the real helm, built by hack/tools/build.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{CommandFactory, Parser};
use serde_json::{json, Value};
use whereabouts::cli::crds;
use whereabouts::cli::install::{InstallArgs, Settings};

use common::tools;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn chart_dir() -> PathBuf {
    deploy().join("helm/whereabouts")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a YAML stream, without empty ones.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn yaml_doc(path: &Path) -> Value {
    let mut docs = yaml_docs(&read(path), &path.display().to_string());
    assert_eq!(docs.len(), 1, "{}: expected one document", path.display());
    docs.remove(0)
}

/// A scalar as text, as a template or a container command sees it.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------- CRDs

#[test]
fn committed_crds_match_the_rust_types() {
    for dir in [deploy(), chart_dir().join("crds")] {
        for file in crds::definitions() {
            let path = dir.join(&file.file_name);
            let committed = yaml_doc(&path);
            let generated = serde_json::to_value(&file.crd).unwrap();
            assert_eq!(
                committed,
                generated,
                "{} drifted from src/k8s/crd.rs; regenerate with `{}`",
                path.display(),
                crds::REGENERATE
            );
            // The rendered text parses back to the same object.
            let rendered = yaml_docs(&crds::render(&file).unwrap(), "render");
            assert_eq!(rendered, vec![generated]);
        }
    }
}

// ---------------------------------------------------------------- upstream's wire contract

/// Upstream's three CRDs as facts, written down in tests/data (its header explains the layout).
fn contract() -> Value {
    yaml_doc(&root().join("tests/data/upstream-contract.yaml"))
}

fn contract_resources(contract: &Value) -> &Vec<Value> {
    contract["resources"]
        .as_array()
        .expect("contract: resources")
}

/// The contract's fields of one resource, path -> `type` or `type, required`, with the object
/// itself at the empty path.
fn contract_fields(resource: &Value) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::from([(String::new(), "object".to_string())]);
    let listed = resource["fields"].as_object().expect("contract: fields");
    for (path, description) in listed {
        let description = text_of(description);
        let (kind, rest) = description
            .split_once(", ")
            .unwrap_or((description.as_str(), ""));
        assert!(
            ["string", "object", "array", "integer", "boolean"].contains(&kind)
                && ["", "required"].contains(&rest),
            "contract: {path}: {description:?} is not `type` or `type, required`"
        );
        fields.insert(path.clone(), description);
    }
    fields
}

/// Schema keys that are free text: they change neither what the API server accepts nor how a
/// client decodes.
const FREE_TEXT: [&str; 4] = ["description", "title", "example", "externalDocs"];

/// A CRD schema in the contract's terms, added to `out`: each field's path and its type, whether
/// its parent requires it, and every other key that is not free text (format, enum, nullable,
/// x-kubernetes-*, ...), so such a key shows up as a difference from the contract.
fn schema_fields(schema: &Value, path: &str, required: bool, out: &mut BTreeMap<String, String>) {
    let mut words = vec![schema["type"].as_str().unwrap_or("untyped").to_string()];
    if required {
        words.push("required".into());
    }
    let nested = |key: &str, value: &Value| {
        matches!(key, "properties" | "required")
            || (matches!(key, "items" | "additionalProperties") && value.is_object())
    };
    for (key, value) in schema.as_object().into_iter().flatten() {
        if key != "type" && !FREE_TEXT.contains(&key.as_str()) && !nested(key, value) {
            words.push(format!("{key}={value}"));
        }
    }
    out.insert(path.to_string(), words.join(", "));

    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let properties = schema["properties"].as_object();
    for (name, child) in properties.into_iter().flatten() {
        let child_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        schema_fields(child, &child_path, required.contains(name.as_str()), out);
    }
    for name in required {
        if !properties.is_some_and(|p| p.contains_key(name)) {
            out.insert(format!("{path}.{name}"), "required but not declared".into());
        }
    }
    for (key, suffix) in [("additionalProperties", "{}"), ("items", "[]")] {
        if schema[key].is_object() {
            schema_fields(&schema[key], &format!("{path}{suffix}"), false, out);
        }
    }
}

/// What a client would notice between our CRD and the contract's resource: the CRD's identity,
/// names, scope and version, anything beyond them (short names, subresources, printer columns,
/// conversion, ...) and every field of the schema.
fn contract_differences(ours: &Value, contract: &Value, resource: &Value) -> Vec<String> {
    let mut diffs = identity_differences(ours, contract, resource);
    let versions = ours["spec"]["versions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    differ(&mut diffs, "versions", &json!(versions.len()), json!(1));
    let version = versions.first().unwrap_or(&Value::Null);
    diffs.extend(version_differences(version, contract));
    let mut fields = BTreeMap::new();
    let schema = &version["schema"]["openAPIV3Schema"];
    schema_fields(schema, "", false, &mut fields);
    diffs.extend(field_differences(&fields, &contract_fields(resource)));
    diffs
}

fn differ(diffs: &mut Vec<String>, what: &str, ours: &Value, upstream: Value) {
    if *ours != upstream {
        diffs.push(format!("{what}: ours {ours}, upstream {upstream}"));
    }
}

/// The CRD's own name and kind, and the group, scope and names it gives the resource.
fn identity_differences(ours: &Value, contract: &Value, resource: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let group = text_of(&contract["group"]);
    let plural = text_of(&resource["plural"]);
    differ(
        &mut diffs,
        "apiVersion",
        &ours["apiVersion"],
        json!("apiextensions.k8s.io/v1"),
    );
    let crd = json!("CustomResourceDefinition");
    differ(&mut diffs, "kind", &ours["kind"], crd);
    let name = json!(format!("{plural}.{group}"));
    differ(&mut diffs, "metadata.name", &ours["metadata"]["name"], name);
    let spec = &ours["spec"];
    let spec_keys = json!(["group", "names", "scope", "versions"]);
    differ(&mut diffs, "spec keys", &keys(spec), spec_keys);
    differ(&mut diffs, "spec.group", &spec["group"], json!(group));
    differ(
        &mut diffs,
        "spec.scope",
        &spec["scope"],
        contract["scope"].clone(),
    );
    let names = json!({"kind": resource["kind"], "listKind": resource["listKind"],
                       "plural": plural, "singular": resource["singular"]});
    differ(&mut diffs, "spec.names", &spec["names"], names);
    diffs
}

/// The one version: named as upstream's, served and stored, with a schema and nothing else.
fn version_differences(version: &Value, contract: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let version_keys = json!(["name", "schema", "served", "storage"]);
    differ(&mut diffs, "version keys", &keys(version), version_keys);
    differ(
        &mut diffs,
        "version name",
        &version["name"],
        contract["version"].clone(),
    );
    differ(&mut diffs, "served", &version["served"], json!(true));
    differ(&mut diffs, "storage", &version["storage"], json!(true));
    let schema_keys = json!(["openAPIV3Schema"]);
    differ(
        &mut diffs,
        "schema keys",
        &keys(&version["schema"]),
        schema_keys,
    );
    diffs
}

/// The sorted keys of an object, as JSON (empty for anything else).
fn keys(value: &Value) -> Value {
    let mut keys: Vec<&String> = value
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .collect();
    keys.sort();
    json!(keys)
}

/// Fields missing from ours, added by ours, or described differently.
fn field_differences(
    ours: &BTreeMap<String, String>,
    upstream: &BTreeMap<String, String>,
) -> Vec<String> {
    let paths: BTreeSet<&String> = ours.keys().chain(upstream.keys()).collect();
    let shown = |path: &str| {
        if path.is_empty() {
            "(the object)".to_string()
        } else {
            path.to_string()
        }
    };
    paths
        .into_iter()
        .filter(|path| ours.get(*path) != upstream.get(*path))
        .map(|path| match (ours.get(path), upstream.get(path)) {
            (Some(o), Some(t)) => format!("{}: ours {o:?}, upstream {t:?}", shown(path)),
            (Some(o), None) => format!("{}: ours only ({o})", shown(path)),
            (None, _) => format!("{}: missing from ours", shown(path)),
        })
        .collect()
}

fn our_crd(contract: &Value, resource: &Value) -> Value {
    let file = format!(
        "{}_{}.yaml",
        text_of(&contract["group"]),
        text_of(&resource["plural"])
    );
    yaml_doc(&deploy().join(file))
}

#[test]
fn crds_keep_upstreams_wire_contract() {
    let contract = contract();
    let resources = contract_resources(&contract);
    let kinds: BTreeSet<String> = resources.iter().map(|r| text_of(&r["kind"])).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(
            ["IPPool", "NodeSlicePool", "OverlappingRangeIPReservation"].map(String::from)
        ),
        "the contract covers upstream's three kinds"
    );
    for resource in resources {
        let diffs = contract_differences(&our_crd(&contract, resource), &contract, resource);
        assert!(
            diffs.is_empty(),
            "our {} CRD breaks upstream's wire contract:\n{}",
            resource["kind"],
            diffs.join("\n")
        );
    }
    // No CRD of ours goes beyond the contract's three.
    let crd_files = files_with_ext(&deploy(), "yaml")
        .into_iter()
        .filter(|p| p.parent() == Some(deploy().as_path()))
        .filter(|p| {
            yaml_docs(&read(p), "deploy")
                .iter()
                .any(|d| d["kind"] == "CustomResourceDefinition")
        })
        .count();
    assert_eq!(crd_files, resources.len());
}

#[test]
fn the_contract_names_each_fields_parent() {
    for resource in contract_resources(&contract()) {
        let fields = contract_fields(resource);
        for path in fields.keys().filter(|p| !p.is_empty()) {
            let (parent, kind) = if let Some(p) = path.strip_suffix("[]") {
                (p, "array")
            } else if let Some(p) = path.strip_suffix("{}") {
                (p, "object")
            } else {
                (path.rsplit_once('.').map_or("", |(p, _)| p), "object")
            };
            let parent_kind = fields.get(parent).map(|d| d.split(", ").next().unwrap());
            assert_eq!(parent_kind, Some(kind), "contract: parent of {path}");
        }
    }
}

#[test]
fn the_contract_check_notices_what_a_client_relies_on() {
    let contract = contract();
    let resource = &contract_resources(&contract)[0];
    assert_eq!(resource["kind"], "IPPool");
    let ours = our_crd(&contract, resource);
    assert!(contract_differences(&ours, &contract, resource).is_empty());
    // Each mutation sets (or, with null, removes) the value at a JSON pointer of our CRD.
    const SPEC: &str = "/spec/versions/0/schema/openAPIV3Schema/properties/spec";
    let mutations = [
        (
            "type",
            format!("{SPEC}/properties/range/type"),
            json!("integer"),
        ),
        ("required", format!("{SPEC}/required"), json!(["range"])),
        ("field", format!("{SPEC}/properties/range"), Value::Null),
        (
            "extra field",
            format!("{SPEC}/properties/gateway"),
            json!({"type": "string"}),
        ),
        (
            "format",
            format!("{SPEC}/properties/range/format"),
            json!("cidr"),
        ),
        (
            "nullable",
            format!("{SPEC}/properties/range/nullable"),
            json!(true),
        ),
        (
            "nested required",
            format!("{SPEC}/properties/allocations/additionalProperties/required"),
            json!(["id"]),
        ),
        ("listKind", "/spec/names/listKind".into(), json!("Pools")),
        (
            "short name",
            "/spec/names/shortNames".into(),
            json!(["ipp"]),
        ),
        ("scope", "/spec/scope".into(), json!("Cluster")),
        ("served", "/spec/versions/0/served".into(), json!(false)),
        (
            "subresource",
            "/spec/versions/0/subresources".into(),
            json!({"status": {}}),
        ),
    ];
    for (what, pointer, new_value) in mutations {
        let mut changed = ours.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let map = changed
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .unwrap();
        if new_value.is_null() {
            map.remove(key);
        } else {
            map.insert(key.to_string(), new_value);
        }
        assert_ne!(changed, ours, "mutation {what} did not apply");
        assert!(
            !contract_differences(&changed, &contract, resource).is_empty(),
            "{what} went unnoticed"
        );
    }
    // Descriptions are free text.
    let mut described = ours.clone();
    described["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = json!("x");
    assert!(contract_differences(&described, &contract, resource).is_empty());
}

// ---------------------------------------------------------------- the chart, rendered by helm

/// Runs helm with `args`, returning its stdout; None when there is no helm (outside CI).
fn run_helm(args: &[&str]) -> Option<String> {
    let out = Command::new(tools::helm()?)
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).expect("helm prints UTF-8"))
}

/// The chart's objects for a release, as `helm template` renders them with `--set` values;
/// None when there is no helm (outside CI).
fn render_chart(release: &str, namespace: &str, set: &[&str]) -> Option<Vec<Value>> {
    let chart = chart_dir().to_string_lossy().into_owned();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    for value in set {
        args.extend(["--set", value]);
    }
    let text = run_helm(&args)?;
    Some(yaml_docs(&text, &format!("helm template {set:?}")))
}

fn default_chart() -> Option<Vec<Value>> {
    render_chart("whereabouts", "kube-system", &[])
}

fn plain_manifest() -> Vec<Value> {
    let path = deploy().join("daemonset-install.yaml");
    yaml_docs(&read(&path), "daemonset-install.yaml")
}

/// The plain manifest, and the chart's default rendering when helm is at hand: the two ways to
/// install, which must agree.
fn both_installs() -> Vec<(&'static str, Vec<Value>)> {
    let mut installs = vec![("plain", plain_manifest())];
    installs.extend(default_chart().map(|chart| ("chart", chart)));
    installs
}

#[test]
fn helm_lints_the_chart() {
    let chart = chart_dir().to_string_lossy().into_owned();
    // The defaults, and values that take the templates' other branches.
    for set in [
        None,
        Some("logLevel=debug"),
        Some("controller.enabled=false"),
        Some("prometheusRule.enabled=true"),
        Some("grafanaDashboard.enabled=true"),
        Some("cniConf.confDir=/etc/kubernetes/cni/net.d"),
    ] {
        let mut args = vec!["lint", "--strict", &chart];
        args.extend(set.iter().flat_map(|value| ["--set", value]));
        let Some(report) = run_helm(&args) else {
            return;
        };
        assert!(report.contains("0 chart(s) failed"), "{set:?}: {report}");
    }
}

/// A CNI configuration folder the plugin does not read its flat file under is refused: the
/// plugin would fall back to a database of each node's own, and nodes would hand out each
/// other's addresses.
#[test]
fn the_chart_refuses_a_conf_dir_the_plugin_does_not_read() {
    let Some(helm) = tools::helm() else {
        return;
    };
    let chart = chart_dir().to_string_lossy().into_owned();
    let out = Command::new(helm)
        .args([
            "template",
            "whereabouts",
            &chart,
            "--namespace",
            "kube-system",
        ])
        .args([
            "--set",
            "cniConf.confDir=/var/lib/rancher/k3s/agent/etc/cni/net.d",
        ])
        .output()
        .expect("run helm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cniConf.confDir"), "{stderr}");
}

// ---------------------------------------------------------------- manifests and chart

fn kinds(objects: &[Value]) -> Vec<(String, String)> {
    objects
        .iter()
        .map(|o| (text_of(&o["kind"]), text_of(&o["metadata"]["name"])))
        .collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} in {:?}",
        kinds(objects)
    );
    found[0]
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<_> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name} in {:?}",
        kinds(objects)
    );
    found[0]
}

#[test]
fn every_yaml_file_parses_and_objects_have_required_fields() {
    let templates = chart_dir().join("templates");
    for path in files_with_ext(&deploy(), "yaml") {
        if path.starts_with(&templates) {
            continue; // rendered by helm in the chart tests
        }
        if path.starts_with(chart_dir().join("files")) {
            continue; // alert rules and a dashboard, not objects: tests/monitoring.rs
        }
        let name = path.strip_prefix(root()).unwrap().display().to_string();
        let docs = yaml_docs(&read(&path), &name);
        assert!(!docs.is_empty(), "{name} is empty");
        if name.ends_with("Chart.yaml") || name.ends_with("values.yaml") {
            continue;
        }
        for doc in &docs {
            check_object(doc, &name);
        }
    }
}

fn check_object(o: &Value, source: &str) {
    for field in ["apiVersion", "kind"] {
        assert!(
            o[field].as_str().is_some_and(|s| !s.is_empty()),
            "{source}: object without {field}: {o}"
        );
    }
    let name = o["metadata"]["name"].as_str().unwrap_or("");
    assert!(
        !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
        "{source}: bad metadata.name {name:?}"
    );
    if o["kind"] == "DaemonSet" || o["kind"] == "Deployment" {
        let selector = o["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("selector");
        let labels = &o["spec"]["template"]["metadata"]["labels"];
        assert!(!selector.is_empty(), "{source}: empty selector");
        for (k, v) in selector {
            assert_eq!(
                &labels[k], v,
                "{source}: selector {k} does not match the template labels"
            );
        }
        let containers = o["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers");
        assert!(!containers.is_empty());
        for c in containers {
            assert!(
                c["name"].as_str().is_some_and(|s| !s.is_empty()),
                "{source}: container without name"
            );
            assert!(
                c["image"].as_str().is_some_and(|s| !s.is_empty()),
                "{source}: container without image"
            );
        }
    }
}

#[test]
fn chart_metadata_and_values() {
    let chart = yaml_doc(&chart_dir().join("Chart.yaml"));
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "whereabouts");
    assert_eq!(chart["type"], "application");
    assert!(chart["version"].is_string());
    // The default image tag is the crate's version.
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));

    // Every `.Values.x.y` the templates mention is in values.yaml, including in branches the
    // default values do not take.
    let values = yaml_doc(&chart_dir().join("values.yaml"));
    for path in files_with_ext(&chart_dir().join("templates"), "yaml")
        .into_iter()
        .chain([chart_dir().join("templates/NOTES.txt")])
    {
        let text = read(&path);
        for (i, _) in text.match_indices(".Values.") {
            let key: String = text[i + ".Values.".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .collect();
            let mut v = &values;
            for part in key.trim_end_matches('.').split('.') {
                v = v.get(part).unwrap_or_else(|| {
                    panic!("{}: .Values.{key} is not in values.yaml", path.display())
                });
            }
        }
    }
}

/// Drops the labels only Helm adds, so the chart's objects compare with the plain manifest's.
fn without_helm_labels(mut o: Value) -> Value {
    for pointer in ["/metadata/labels", "/spec/template/metadata/labels"] {
        if let Some(labels) = o.pointer_mut(pointer).and_then(Value::as_object_mut) {
            labels
                .retain(|k, _| !k.starts_with("app.kubernetes.io/") && !k.starts_with("helm.sh/"));
            if labels.is_empty() {
                o.pointer_mut(pointer.rsplit_once('/').unwrap().0)
                    .and_then(Value::as_object_mut)
                    .map(|m| m.remove("labels"));
            }
        }
    }
    o
}

#[test]
fn the_chart_renders_the_plain_manifest() {
    let key = |o: &Value| (text_of(&o["kind"]), text_of(&o["metadata"]["name"]));
    let Some(chart) = default_chart() else {
        return;
    };
    for object in &chart {
        check_object(object, "chart");
    }
    let mut chart: Vec<Value> = chart.into_iter().map(without_helm_labels).collect();
    let mut plain = plain_manifest();
    chart.sort_by_key(key);
    plain.sort_by_key(key);
    assert_eq!(kinds(&chart), kinds(&plain));
    for (c, p) in chart.iter().zip(&plain) {
        assert_eq!(
            c,
            p,
            "chart and daemonset-install.yaml differ for {:?}",
            key(p)
        );
    }
}

/// The plugin's rules themselves are derived from the API server's audit log in
/// tests/least_privilege.rs; here: no wildcard, and the accounts, bindings and workloads fit.
#[test]
fn rbac_wiring_and_no_wildcards() {
    for (source, objects) in both_installs() {
        let sa = named(&objects, "ServiceAccount", "whereabouts");
        let namespace = &sa["metadata"]["namespace"];
        let role = named(&objects, "Role", "whereabouts-cni");
        let cluster_role = named(&objects, "ClusterRole", "whereabouts-cni");
        for r in [role, cluster_role] {
            assert!(
                !r["rules"].to_string().contains('*'),
                "{source}: wildcard in RBAC"
            );
        }
        // The plugin's objects are in its namespace, and so are its grants on them; cluster
        // wide it reads pods alone (GC asks where a pod runs).
        assert_eq!(&role["metadata"]["namespace"], namespace, "{source}");
        let cluster_wide: Vec<_> = cluster_role["rules"].as_array().unwrap().iter().collect();
        assert_eq!(
            cluster_wide,
            [&json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]})],
            "{source}: the plugin's cluster-wide rules"
        );
        let roles: Vec<_> = objects.iter().filter(|o| o["kind"] == "Role").collect();
        assert!(
            roles.iter().all(|r| {
                let name = &r["metadata"]["name"];
                name == "whereabouts-controller" || name == "whereabouts-cni"
            }),
            "{source}: unexpected Role"
        );
        let subjects = json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
            "namespace": namespace}]);
        for (kind, bound) in [("RoleBinding", role), ("ClusterRoleBinding", cluster_role)] {
            let binding = named(&objects, kind, "whereabouts");
            assert_eq!(binding["roleRef"]["name"], bound["metadata"]["name"]);
            assert_eq!(binding["roleRef"]["kind"], bound["kind"]);
            assert_eq!(binding["subjects"], subjects, "{source}: {kind}");
        }
        let ds = one(&objects, "DaemonSet");
        assert_eq!(
            ds["spec"]["template"]["spec"]["serviceAccountName"],
            sa["metadata"]["name"]
        );
        assert_eq!(ds["metadata"]["namespace"], sa["metadata"]["namespace"]);
    }
}

/// The installer settings a DaemonSet's container ends up with: its plain `env` values turned
/// into the flags they stand for (through clap's own env names), fieldRef values filled in.
fn settings_of(ds: &Value, source: &str) -> Settings {
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let command = argv_of(container, source);
    assert_eq!(command, ["/whereabouts", "install"], "{source}: command");

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        install: InstallArgs,
    }
    let cmd = Cli::command();
    let flag_for_env: BTreeMap<String, String> = cmd
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_string_lossy().into_owned(),
                a.get_long()?.to_string(),
            ))
        })
        .collect();
    let mut argv = vec!["install".to_string()];
    for env in container["env"].as_array().expect("env") {
        let name = text_of(&env["name"]);
        let flag = flag_for_env
            .get(&name)
            .unwrap_or_else(|| panic!("{source}: env {name} is not read by `whereabouts install`"));
        let value = match env["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("spec.nodeName") => "node-a".to_string(),
            Some("metadata.namespace") => text_of(&ds["metadata"]["namespace"]),
            Some(other) => panic!("{source}: unexpected fieldRef {other}"),
            None => text_of(&env["value"]),
        };
        argv.push(format!("--{flag}={value}"));
    }
    // What the kubelet provides in every pod.
    argv.push("--kubernetes-service-host=10.96.0.1".into());
    argv.push("--kubernetes-service-port=443".into());
    argv.push("--cni-bin-src=/whereabouts".into());
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{source}: {argv:?}: {e}"));
    Settings::from_args(&cli.install).unwrap_or_else(|e| panic!("{source}: {e}"))
}

fn check_daemonset(ds: &Value, host_bin: &str, host_conf: &str, source: &str) {
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "{source}");
    assert!(
        pod["tolerations"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none())),
        "{source}: must tolerate every taint"
    );
    let container = &pod["containers"][0];
    assert_ne!(
        container["securityContext"]["privileged"], true,
        "{source}: privileged"
    );

    let envs = container["env"].as_array().unwrap();
    let field = |name: &str| {
        envs.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    };
    assert_eq!(field("NODENAME"), Some(json!("spec.nodeName")), "{source}");

    // The agent finishes what is in flight at SIGTERM; cut short, an operation leaves
    // reservations for cleanup and its plugin a code 11.
    let grace =
        std::time::Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
    let longest = whereabouts::store::kubernetes::default_operation_bound()
        .max(whereabouts::store::etcd::Timeouts::default().deadline);
    assert!(
        grace > longest,
        "{source}: terminationGracePeriodSeconds {grace:?} cuts an operation of {longest:?}"
    );

    let settings = settings_of(ds, source);
    assert_eq!(settings.node_name, "node-a");
    // The directories the installer writes are the mounts of the host directories, and the
    // paths it writes into the flat file are the host's.
    let mount_of = |host: &str| -> String {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["hostPath"]["path"] == host)
            .unwrap_or_else(|| panic!("{source}: no hostPath volume for {host}"));
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("{source}: {host} is not mounted"));
        assert_ne!(mount["readOnly"], true);
        text_of(&mount["mountPath"])
    };
    assert_eq!(
        settings.cni_bin_dir,
        Path::new(&mount_of(host_bin)),
        "{source}"
    );
    // Only whereabouts' own folder of the CNI configuration directory is mounted.
    assert_eq!(
        settings.whereabouts_d(),
        Path::new(&mount_of(&format!("{host_conf}/whereabouts.d"))),
        "{source}"
    );
    assert_eq!(settings.host_cni_conf_dir, Path::new(host_conf), "{source}");
    let flat: Value = serde_json::from_str(&settings.flat_file()).unwrap();
    assert_eq!(
        flat["kubernetes"]["kubeconfig"],
        format!("{host_conf}/whereabouts.d/whereabouts.kubeconfig"),
        "{source}"
    );
    assert_eq!(flat["reconciler_cron_expression"], "30 4 * * *");
}

#[test]
fn daemonsets_agree_with_the_installer_and_the_image() {
    let installs = both_installs();
    for (source, objects) in &installs {
        let ds = one(objects, "DaemonSet");
        check_daemonset(ds, "/opt/cni/bin", "/etc/cni/net.d", source);
    }

    // One image everywhere, tagged with the crate version, and it holds the binary the
    // command runs.
    let image = |objects: &[Value]| {
        text_of(&one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"])
    };
    for (source, objects) in &installs {
        assert!(
            image(objects).ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
            "{source}: image tag"
        );
    }
    let dockerfile = read(&root().join("Dockerfile"));
    assert!(
        dockerfile.contains("FROM scratch"),
        "runtime image is not minimal"
    );
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("COPY --from=") && l.trim_end().ends_with(" /whereabouts")),
        "the image does not put the binary at /whereabouts"
    );
}

#[test]
fn chart_values_reach_the_installer() {
    // Other host directories (k3s, OpenShift-like layouts) flow through to the flat file.
    let Some(custom) = render_chart(
        "wa",
        "net",
        &[
            "cniConf.binDir=/var/lib/cni/bin",
            "cniConf.confDir=/etc/kubernetes/cni/net.d",
            "logLevel=debug",
            "image.tag=dev",
        ],
    ) else {
        return;
    };
    let ds = one(&custom, "DaemonSet");
    check_daemonset(
        ds,
        "/var/lib/cni/bin",
        "/etc/kubernetes/cni/net.d",
        "chart, custom dirs",
    );
    let settings = settings_of(ds, "custom");
    assert_eq!(settings.log_level.as_deref(), Some("debug"));
    assert_eq!(settings.namespace, "net");
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/whereabouts-rs/whereabouts:dev"
    );
}

#[test]
fn the_crds_command_prints_and_writes_them() {
    let bin = env!("CARGO_BIN_EXE_whereabouts");
    let out = std::process::Command::new(bin)
        .arg("crds")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = yaml_docs(&String::from_utf8(out.stdout).unwrap(), "crds output");
    let generated: Vec<Value> = crds::definitions()
        .iter()
        .map(|f| serde_json::to_value(&f.crd).unwrap())
        .collect();
    assert_eq!(printed, generated);

    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .args(["crds", "--output-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for file in crds::definitions() {
        // Byte for byte what is committed: regenerating is a no-op while nothing drifted.
        assert_eq!(
            read(&dir.path().join(&file.file_name)),
            read(&deploy().join(&file.file_name)),
            "{} is stale; run `{}`",
            file.file_name,
            crds::REGENERATE
        );
    }
}

// ---------------------------------------------------------------- the controller

/// The controller's objects of a manifest, by kind (named `<base>-controller`, and the
/// ConfigMap by the fixed name the controller reads).
struct ControllerObjects<'a> {
    sa: &'a Value,
    cluster_role: &'a Value,
    cluster_binding: &'a Value,
    role: &'a Value,
    binding: &'a Value,
    config: &'a Value,
    deployment: &'a Value,
}

fn controller_objects<'a>(objects: &'a [Value], base: &str) -> ControllerObjects<'a> {
    let name = format!("{base}-controller");
    ControllerObjects {
        sa: named(objects, "ServiceAccount", &name),
        cluster_role: named(objects, "ClusterRole", &name),
        cluster_binding: named(objects, "ClusterRoleBinding", &name),
        role: named(objects, "Role", &name),
        binding: named(objects, "RoleBinding", &name),
        config: named(
            objects,
            "ConfigMap",
            whereabouts::controller::schedule::CONFIGMAP,
        ),
        deployment: named(objects, "Deployment", &name),
    }
}

/// A container's command line: its command and its arguments, both set, so that a `kubectl
/// apply` over an object written otherwise (Go Whereabouts' chart, whose container has `args`)
/// leaves none of the other's in place.
fn argv_of(container: &Value, source: &str) -> Vec<String> {
    let part = |key: &str| -> Vec<String> {
        let list = container[key].as_array();
        let list = list.unwrap_or_else(|| panic!("{source}: {} without {key}", container["name"]));
        list.iter().map(text_of).collect()
    };
    let mut argv = part("command");
    argv.extend(part("args"));
    argv
}

/// The container's command parsed by the binary's own command line definition.
fn controller_args(
    deployment: &Value,
    source: &str,
) -> whereabouts::cli::controller::ControllerArgs {
    use whereabouts::cli::{Cli, Command};
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let argv = argv_of(container, source);
    assert_eq!(argv[0], "/whereabouts", "{source}: the image's binary");
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{source}: {argv:?}: {e}"));
    match cli.command {
        Command::Controller(args) => args,
        other => panic!("{source}: {argv:?} runs {other:?}, not the controller"),
    }
}

/// Which rules the controller needs is derived from the API server's audit log in
/// tests/least_privilege.rs; here: every install (the manifest, the chart under any release
/// name and namespace) grants the same rules, without wildcards, Leases only in its namespace.
#[test]
fn controller_rbac_is_the_same_in_every_install() {
    let mut installs: Vec<_> = both_installs()
        .into_iter()
        .map(|(source, objects)| (source, objects, "whereabouts", "kube-system"))
        .collect();
    installs.extend(
        render_chart("wa", "net", &[])
            .map(|objects| ("chart, other release", objects, "wa", "net")),
    );
    let reference = controller_objects(&installs[0].1, installs[0].2);
    for (source, objects, base, ns) in &installs {
        let (source, base, ns) = (*source, *base, *ns);
        let c = controller_objects(objects, base);
        assert_eq!(
            c.cluster_role["rules"], reference.cluster_role["rules"],
            "{source}: ClusterRole"
        );
        assert_eq!(c.role["rules"], reference.role["rules"], "{source}: Role");
        for rules in [&c.cluster_role["rules"], &c.role["rules"]] {
            let text = rules.to_string();
            assert!(!text.contains('*'), "{source}: wildcard in RBAC");
        }
        // Leases only in its own namespace.
        assert!(
            !c.cluster_role["rules"].to_string().contains("lease"),
            "{source}: a Lease outside the controller's namespace"
        );
        let subject = json!([{"kind": "ServiceAccount", "name": c.sa["metadata"]["name"],
                              "namespace": ns}]);
        assert_eq!(c.cluster_binding["subjects"], subject, "{source}");
        assert_eq!(
            c.cluster_binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                   "name": c.cluster_role["metadata"]["name"]}),
            "{source}"
        );
        assert_eq!(c.binding["subjects"], subject, "{source}");
        assert_eq!(
            c.binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                   "name": c.role["metadata"]["name"]}),
            "{source}"
        );
        // Everything namespaced sits with the DaemonSet, whose namespace the installer writes
        // into the plugin's kubeconfig: the objects the plugin writes are the ones granted.
        for o in [c.sa, c.role, c.binding, c.config, c.deployment] {
            assert_eq!(o["metadata"]["namespace"], ns, "{source}: {:?}", o["kind"]);
        }
        assert_eq!(one(objects, "DaemonSet")["metadata"]["namespace"], ns);
        assert_eq!(
            c.deployment["spec"]["template"]["spec"]["serviceAccountName"],
            c.sa["metadata"]["name"],
            "{source}"
        );
        // The plugin's account is not the controller's.
        assert_ne!(c.sa["metadata"]["name"], base, "{source}");
    }
}

/// A drain or a node's loss takes one controller replica, not both: the budget lets one be
/// evicted at a time (and only one: `minAvailable` below the replicas), and the replicas prefer
/// different nodes.
fn check_one_controller_survives(objects: &[Value], base: &str, source: &str) {
    let d = controller_objects(objects, base).deployment;
    let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
    let selects_the_replicas = |selector: &Value| {
        let labels = selector["matchLabels"].as_object().expect("matchLabels");
        !labels.is_empty() && labels.iter().all(|(k, v)| &pod_labels[k] == v)
    };
    let budget = named(
        objects,
        "PodDisruptionBudget",
        &format!("{base}-controller"),
    );
    assert_eq!(budget["apiVersion"], "policy/v1", "{source}");
    assert_eq!(
        budget["metadata"]["namespace"], d["metadata"]["namespace"],
        "{source}"
    );
    assert!(
        selects_the_replicas(&budget["spec"]["selector"]),
        "{source}: the budget selects {:?}",
        budget["spec"]["selector"]
    );
    assert_eq!(
        budget["spec"]["minAvailable"], 1,
        "{source}: one of the two replicas may go"
    );
    assert_eq!(
        budget["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow",
        "{source}: replicas that are not ready never hold a drain up"
    );
    let spread = &d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname", "{source}");
    assert!(
        selects_the_replicas(&spread["labelSelector"]),
        "{source}: the anti-affinity selects {:?}",
        spread["labelSelector"]
    );
}

fn check_controller(objects: &[Value], base: &str, port: u16, source: &str) {
    let c = controller_objects(objects, base);
    let d = c.deployment;
    assert_eq!(d["spec"]["replicas"], 2, "{source}: a leader and a standby");
    assert_eq!(
        d["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        "{source}: a rollout keeps a replica running"
    );
    check_one_controller_survives(objects, base, source);
    // The Go Whereabouts' node-slice controller Deployment has this name and selector: applied
    // over it, ours replaces it (a selector cannot change).
    assert_eq!(
        d["metadata"]["name"],
        format!("{base}-controller"),
        "{source}"
    );
    assert_eq!(
        d["spec"]["selector"],
        json!({"matchLabels": {"app": format!("{base}-controller")}}),
        "{source}"
    );
    // The selector is not the DaemonSet's: neither adopts the other's pods.
    let ds = one(objects, "DaemonSet");
    assert_ne!(
        d["spec"]["selector"], ds["spec"]["selector"],
        "{source}: selectors overlap"
    );
    let pod = &d["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        pod["containers"].as_array().map(Vec::len),
        Some(1),
        "{source}"
    );

    // The same image as the installer: one binary.
    assert_eq!(
        container["image"], ds["spec"]["template"]["spec"]["containers"][0]["image"],
        "{source}"
    );

    // Whether Go binaries remain, as the nodes are told: the controller reads no flat file.
    let go_peers = |container: &Value| {
        let env = container["env"].as_array().cloned().unwrap_or_default();
        let peers = env.iter().find(|e| e["name"] == "WHEREABOUTS_GO_PEERS");
        peers.map(|e| e["value"].clone())
    };
    let installer = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(go_peers(installer).is_some(), "{source}");
    assert_eq!(go_peers(container), go_peers(installer), "{source}");

    // Its flags, as the binary parses them.
    let args = controller_args(d, source);
    assert_eq!(
        args.store.datastore.as_deref(),
        Some("kubernetes"),
        "{source}"
    );
    assert_eq!(
        args.store.kubeconfig, None,
        "{source}: no kubeconfig file exists in the pod; the service account is used"
    );
    assert_eq!(args.listen.port(), port, "{source}");
    assert!(
        args.listen.is_ipv6() && args.listen.ip().is_unspecified(),
        "{source}: the kubelet's probes and Prometheus reach the pod's address, of either \
         family (the IPv6 wildcard takes IPv4 connections too)"
    );
    let env: Vec<(String, Value)> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                text_of(&e["name"]),
                e["valueFrom"]["fieldRef"]["fieldPath"].clone(),
            )
        })
        .filter(|(name, _)| name != "WHEREABOUTS_GO_PEERS")
        .collect();
    assert_eq!(
        env,
        [(
            whereabouts::k8s::cluster::NAMESPACE_ENV.to_string(),
            json!("metadata.namespace")
        )],
        "{source}: the engine's namespace is the pod's (and whether Go binaries remain, above)"
    );

    // The metrics port: named, probed, announced to Prometheus.
    assert_eq!(
        container["ports"],
        json!([{"name": "metrics", "containerPort": port, "protocol": "TCP"}]),
        "{source}"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            container[probe]["httpGet"],
            json!({"path": path, "port": "metrics"}),
            "{source}: {probe}"
        );
    }
    let annotations = &d["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true", "{source}");
    assert_eq!(
        annotations["prometheus.io/port"],
        port.to_string(),
        "{source}"
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics", "{source}");

    // Least privilege: it only talks to the API server.
    assert!(pod.get("hostNetwork").is_none(), "{source}: host network");
    assert!(pod.get("volumes").is_none(), "{source}: volumes");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{source}");
    assert!(
        pod["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u != 0),
        "{source}: runAsNonRoot needs a numeric user (the image has no /etc/passwd)"
    );
    let sc = &container["securityContext"];
    assert_eq!(sc["privileged"], false, "{source}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{source}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{source}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{source}");
    assert!(
        container["resources"]["requests"]["memory"].is_string(),
        "{source}"
    );
    assert!(
        container["resources"]["limits"]["memory"].is_string(),
        "{source}"
    );
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["key"] == "node-role.kubernetes.io/control-plane")),
        "{source}: may run on control-plane nodes"
    );
}

#[test]
fn controller_deployment_runs_the_controller_as_the_binary_parses_it() {
    for (source, objects) in both_installs() {
        check_controller(&objects, "whereabouts", 9090, source);
    }

    let Some(custom) = render_chart(
        "wa",
        "net",
        &[
            "controller.metricsPort=9100",
            "controller.logLevel=debug",
            "controller.cronExpression=@hourly",
            "controller.podAnnotations.team=net",
            "image.tag=dev",
            "goWhereabouts=present",
        ],
    ) else {
        return;
    };
    check_controller(&custom, "wa", 9100, "chart, custom");
    let c = controller_objects(&custom, "wa");
    let args = controller_args(c.deployment, "chart, custom");
    assert_eq!(args.log_level.as_deref(), Some("debug"));
    assert_eq!(c.config["data"]["cron-expression"], "@hourly");
    let annotations = &c.deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["team"], "net");
    assert_eq!(annotations["prometheus.io/port"], "9100");

    // An operator's annotation takes the place of the default one of its key (a key twice is
    // refused by strict YAML readers).
    let set = [r"controller.podAnnotations.prometheus\.io/scrape=false"];
    let Some(unscraped) = render_chart("wa", "net", &set) else {
        return;
    };
    let deployment = controller_objects(&unscraped, "wa").deployment;
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "false");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    // The DaemonSet's too are strings, as the API server takes annotations only.
    let set = [r"podAnnotations.sidecar\.istio\.io/inject=false"];
    let Some(uninjected) = render_chart("wa", "net", &set) else {
        return;
    };
    let ds = one(&uninjected, "DaemonSet");
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["sidecar.istio.io/inject"], "false");
}

/// An affinity of the operator's replaces the default spread of the replicas, as the values
/// file says; the budget stays unless switched off (a one-node cluster's drain would wait for it
/// for ever).
#[test]
fn the_controllers_affinity_and_budget_can_be_changed() {
    let zone = "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution\
                .nodeSelectorTerms[0].matchExpressions[0]";
    let set = [
        format!("{zone}.key=zone"),
        format!("{zone}.operator=In"),
        format!("{zone}.values[0]=a"),
    ];
    let set: Vec<&str> = set.iter().map(String::as_str).collect();
    let Some(objects) = render_chart("whereabouts", "kube-system", &set) else {
        return;
    };
    let d = controller_objects(&objects, "whereabouts").deployment;
    let affinity = &d["spec"]["template"]["spec"]["affinity"];
    assert_eq!(
        affinity,
        &json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}),
    );
    named(&objects, "PodDisruptionBudget", "whereabouts-controller");

    let Some(without) = render_chart(
        "whereabouts",
        "kube-system",
        &["controller.disruptionBudget.enabled=false"],
    ) else {
        return;
    };
    assert!(
        !without.iter().any(|o| o["kind"] == "PodDisruptionBudget"),
        "{:?}",
        kinds(&without)
    );
    controller_objects(&without, "whereabouts");
}

#[test]
fn controller_schedule_configmap_is_what_the_controller_reads() {
    use whereabouts::cleanup::cron::{Schedule, DEFAULT_EXPRESSION};
    for (source, objects) in both_installs() {
        let c = controller_objects(&objects, "whereabouts");
        let data = c.config["data"].as_object().expect("data");
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            [whereabouts::controller::schedule::CONFIGMAP_KEY],
            "{source}"
        );
        let expression = text_of(&data[whereabouts::controller::schedule::CONFIGMAP_KEY]);
        assert_eq!(
            expression, DEFAULT_EXPRESSION,
            "{source}: the documented default"
        );
        Schedule::parse(&expression).unwrap_or_else(|e| panic!("{source}: {e:?}"));
    }
}

#[test]
fn the_controller_can_be_left_out_of_the_chart() {
    let Some(without) = render_chart("whereabouts", "kube-system", &["controller.enabled=false"])
    else {
        return;
    };
    // Exactly the plugin's objects remain.
    let mut left = kinds(&without);
    left.sort();
    let mut plugin: Vec<(String, String)> = kinds(&plain_manifest())
        .into_iter()
        .filter(|(kind, name)| {
            let controllers = name.ends_with("-controller")
                || (kind == "ConfigMap" && name == "whereabouts-config");
            !controllers
        })
        .collect();
    plugin.sort();
    assert_eq!(left, plugin);
}

/// The chart's PrometheusRule carries the alert rules file as is, with the labels asked for, and
/// only when asked for: a cluster without the Prometheus Operator has no CRD for it.
#[test]
fn the_chart_installs_the_alert_rules_when_asked() {
    let Some(default) = default_chart() else {
        return;
    };
    let asked = [
        "prometheusRule.enabled=true",
        "prometheusRule.labels.release=monitoring",
    ];
    let Some(with_rules) = render_chart("whereabouts", "kube-system", &asked) else {
        return;
    };
    assert!(default.iter().all(|o| o["kind"] != "PrometheusRule"));
    let rule = one(&with_rules, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["namespace"], "kube-system");
    assert_eq!(rule["metadata"]["labels"]["release"], "monitoring");
    assert_eq!(
        rule["metadata"]["labels"]["app.kubernetes.io/name"],
        "whereabouts"
    );
    let rules = yaml_doc(&chart_dir().join("files/whereabouts-alerts.yaml"));
    assert_eq!(
        rule["spec"], rules,
        "the PrometheusRule's spec is not the rules file"
    );
    // Prometheus' templates reach it untouched by Helm's.
    let text = rule["spec"].to_string();
    assert!(text.contains("{{ $labels.pool }}"), "{text}");
    // Nothing else changes.
    let others: Vec<&Value> = with_rules
        .iter()
        .filter(|o| o["kind"] != "PrometheusRule")
        .collect();
    assert_eq!(others, default.iter().collect::<Vec<_>>());
}

/// The chart's dashboard ConfigMap carries the dashboard file as is, with the labels Grafana's
/// sidecar looks for, and only when asked for.
#[test]
fn the_chart_installs_the_dashboard_when_asked() {
    let Some(default) = default_chart() else {
        return;
    };
    let asked = ["grafanaDashboard.enabled=true"];
    let Some(with_dashboard) = render_chart("whereabouts", "kube-system", &asked) else {
        return;
    };
    let is_dashboard = |o: &&Value| o["metadata"]["name"] == "whereabouts-dashboard";
    assert!(default.iter().find(is_dashboard).is_none());
    let config_map = named(&with_dashboard, "ConfigMap", "whereabouts-dashboard");
    assert_eq!(config_map["metadata"]["namespace"], "kube-system");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let file = read(&chart_dir().join("files/whereabouts-dashboard.json"));
    assert_eq!(config_map["data"]["whereabouts.json"], file.trim_end());
    let others: Vec<&Value> = with_dashboard.iter().filter(|o| !is_dashboard(o)).collect();
    assert_eq!(others, default.iter().collect::<Vec<_>>());
}

/// The DaemonSet's agent container: `whereabouts agent` as the binary parses it, its probes on
/// the port it listens on, the host's /run/whereabouts for the socket; the installer told that
/// the agent serves the plugin (so it writes no host kubeconfig).
fn check_agent(ds: &Value, port: u16, source: &str) {
    use whereabouts::cli::agent::AgentArgs;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }
    let pod = &ds["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    let agent = containers
        .iter()
        .find(|c| c["name"] == "agent")
        .unwrap_or_else(|| panic!("{source}: no agent container"));
    assert_eq!(
        agent["image"], containers[0]["image"],
        "{source}: same image"
    );
    let command = argv_of(agent, source);
    assert_eq!(command[..2], ["/whereabouts", "agent"], "{source}");
    let mut argv = vec!["agent".to_string()];
    argv.extend(command[2..].iter().cloned());
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{source}: {argv:?}: {e}"));
    let listen = cli.agent.listen.expect("--listen");
    assert_eq!(listen.port(), port, "{source}");
    assert_eq!(cli.agent.store.datastore.as_deref(), Some("kubernetes"));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"], path, "{source}: {probe}");
        assert_eq!(get["port"], port, "{source}: {probe}");
        assert_eq!(
            text_of(&get["host"]),
            listen.ip().to_string(),
            "{source}: {probe}"
        );
    }
    assert_ne!(agent["securityContext"]["privileged"], true, "{source}");
    let socket_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == "/run/whereabouts")
        .unwrap_or_else(|| panic!("{source}: no hostPath /run/whereabouts"));
    let mounted = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == socket_volume["name"] && m["mountPath"] == "/run/whereabouts");
    assert!(mounted, "{source}: the socket's folder is not mounted");
    assert!(
        settings_of(ds, source).agent,
        "{source}: installer not told about the agent"
    );
}

#[test]
fn the_daemonset_runs_the_agent_unless_switched_off() {
    for (source, objects) in both_installs() {
        check_agent(named(&objects, "DaemonSet", "whereabouts"), 9094, source);
    }
    let Some(custom) = render_chart("whereabouts", "kube-system", &["agent.probePort=9200"]) else {
        return;
    };
    check_agent(
        named(&custom, "DaemonSet", "whereabouts"),
        9200,
        "chart, custom",
    );
    // An IPv6 host is written as an address with a port can be: in brackets, given or not. The
    // probes ask the address listened on (a wildcard's on the loopback), or the agent listening
    // elsewhere would never be ready and be restarted for ever.
    let hosts = [
        ("::", "[::]:9094", "127.0.0.1"),
        ("[::]", "[::]:9094", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0:9094", "127.0.0.1"),
        ("::1", "[::1]:9094", "::1"),
        ("192.0.2.7", "192.0.2.7:9094", "192.0.2.7"),
    ];
    for (host, listened, probed) in hosts {
        let set = format!("agent.listenHost={host}");
        let Some(rendered) = render_chart("whereabouts", "kube-system", &[&set]) else {
            return;
        };
        let ds = named(&rendered, "DaemonSet", "whereabouts");
        let agent = ds["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .expect("the agent");
        let command = argv_of(agent, &set);
        let listen = command.iter().skip_while(|a| *a != "--listen").nth(1);
        assert_eq!(listen.map(String::as_str), Some(listened), "{command:?}");
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(agent[probe]["httpGet"]["host"], probed, "{set}: {probe}");
        }
    }
    let Some(off) = render_chart("whereabouts", "kube-system", &["agent.enabled=false"]) else {
        return;
    };
    let ds = named(&off, "DaemonSet", "whereabouts");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["containers"].as_array().unwrap().len(), 1);
    assert!(!pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["hostPath"]["path"] == "/run/whereabouts"));
    assert!(!settings_of(ds, "chart, agent off").agent);
}
