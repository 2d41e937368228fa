//! The seed's Helm command against a real API server: `helm upgrade --install whereabouts
//! ./deploy/helm/whereabouts --namespace kube-system` installs the CRDs, the DaemonSet, the
//! controller and their RBAC; an upgrade with changed values changes what it should. The
//! release's objects are cluster-wide, so this test has a control plane of its own.

mod common;
mod kube_apiserver;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const CHART: &str = "deploy/helm/whereabouts";

fn helm(plane: &kube_apiserver::ControlPlane, args: &[&str]) -> String {
    let helm = common::tools::helm().expect("helm");
    let out = Command::new(&helm)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig)
        .args(args)
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn get(plane: &kube_apiserver::ControlPlane, what: &[&str]) -> Value {
    let mut args = vec!["get", "-o", "json"];
    args.extend(what);
    serde_json::from_str(&plane.kubectl(&args)).expect("kubectl JSON")
}

/// The installer container of the DaemonSet.
fn installer(plane: &kube_apiserver::ControlPlane) -> Value {
    let daemonset = get(plane, &["daemonset", "whereabouts", "-n", "kube-system"]);
    daemonset["spec"]["template"]["spec"]["containers"][0].clone()
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .map(String::from)
}

#[test]
fn the_seed_helm_command_installs_and_upgrades() {
    if common::tools::helm().is_none() {
        return;
    }
    let Some(plane) = kube_apiserver::dedicated_control_plane("helm") else {
        return;
    };
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(CHART).is_dir());
    let install = [
        "upgrade",
        "--install",
        "whereabouts",
        CHART,
        "--namespace",
        "kube-system",
    ];
    helm(plane, &install);

    // The chart's CRDs are installed and served.
    for crd in [
        "ippools.whereabouts.cni.cncf.io",
        "overlappingrangeipreservations.whereabouts.cni.cncf.io",
        "nodeslicepools.whereabouts.cni.cncf.io",
    ] {
        plane.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            crd,
        ]);
    }
    // The objects of the plain manifest, under the same names.
    for object in [
        ["serviceaccount", "whereabouts"],
        ["serviceaccount", "whereabouts-controller"],
        ["daemonset", "whereabouts"],
        ["deployment", "whereabouts-controller"],
        ["configmap", "whereabouts-config"],
    ] {
        get(plane, &[object[0], object[1], "-n", "kube-system"]);
    }
    get(plane, &["clusterrole", "whereabouts-cni"]);
    get(plane, &["clusterrolebinding", "whereabouts"]);
    get(plane, &["role", "whereabouts-cni", "-n", "kube-system"]);
    get(plane, &["rolebinding", "whereabouts", "-n", "kube-system"]);
    let before = installer(plane);

    // An upgrade with changed values reaches the DaemonSet; the release is at revision 2.
    let mut upgrade = install.to_vec();
    upgrade.extend(["--set", "logLevel=error", "--set", "image.tag=upgrade-test"]);
    helm(plane, &upgrade);
    let after = installer(plane);
    assert_ne!(before["image"], after["image"]);
    assert!(
        after["image"].as_str().unwrap().ends_with(":upgrade-test"),
        "{after}"
    );
    assert_eq!(
        env_value(&after, "WHEREABOUTS_LOG_LEVEL").as_deref(),
        Some("error"),
        "{after}"
    );
    let history: Value = serde_json::from_str(&helm(
        plane,
        &["history", "whereabouts", "-n", "kube-system", "-o", "json"],
    ))
    .unwrap();
    let last = history.as_array().and_then(|h| h.last()).cloned();
    assert_eq!(last.as_ref().map(|r| r["revision"].clone()), Some(2.into()));
    assert_eq!(last.map(|r| r["status"].clone()), Some("deployed".into()));
}
