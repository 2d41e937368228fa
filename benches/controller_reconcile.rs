//! A full reconcile of many allocations by the controller: 10,000 allocations in the local
//! store, 9,000 of whose pods exist on the real API server (`hack/control-plane`, TLS) and
//! 1,000 of which are gone. The controller (the release binary) starts, lists every pod and
//! judges every allocation; the figure is its start-up reconcile, as its own
//! `whereabouts_last_reconcile_duration_seconds` reports it, and the time until the last gone
//! pod's address is free.
//!
//! With `WHEREABOUTS_EARLIER_BINARY`, an earlier build's controller reconciles the same
//! allocations (a store of its own, filled the same way) first, for before/after figures.
//!
//! Run: `cargo bench --bench controller_reconcile` (builds the release binary; creating the
//! pods takes a minute or two).

mod earlier;
#[path = "../tests/kube_apiserver/mod.rs"]
mod kube_apiserver;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use whereabouts::ipam::{parse_range_text, Range, RangeSpec};
use whereabouts::store::{AddRequest, Attachment, PoolRef, RangeRequest};

const ALLOCATIONS: usize = 10_000;
const GONE: usize = 1_000;
const RANGE: &str = "10.128.0.0/16";

fn main() {
    let plane = kube_apiserver::control_plane().expect("a control plane (hack/control-plane)");
    let ns = plane.namespace("bench-reconcile");
    let dir = tempfile::tempdir().unwrap();

    let started = Instant::now();
    create_pods(plane, &ns.name, ALLOCATIONS - GONE);
    println!(
        "{} pods created in {:.1} s",
        ALLOCATIONS - GONE,
        started.elapsed().as_secs_f64()
    );
    let kubeconfig = ns.kubeconfig(dir.path());
    if let Some(earlier) = earlier::binary() {
        // The earlier build's controller has no leader election to turn off.
        reconcile(
            &earlier,
            "EARLIER BUILD",
            dir.path(),
            &kubeconfig,
            &ns.name,
            &[],
        );
    }
    let ours = Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let extra = ["--no-leader-election"];
    reconcile(
        ours,
        "this build",
        dir.path(),
        &kubeconfig,
        &ns.name,
        &extra,
    );
    // The control plane is shared and has no namespace controller: pods left behind would be
    // listed by every later run and test.
    let api: Api<Pod> = Api::namespaced(plane.client(), &ns.name);
    plane
        .block_on(api.delete_collection(&DeleteParams::default(), &ListParams::default()))
        .expect("the pods deleted");
}

/// Fills a new store, runs `bin`'s controller on it until its start-up reconcile is over and
/// prints the figures under `label`.
fn reconcile(
    bin: &Path,
    label: &str,
    dir: &Path,
    kubeconfig: &Path,
    namespace: &str,
    extra: &[&str],
) {
    let folder = dir.join(label.replace(' ', "-"));
    std::fs::create_dir_all(&folder).unwrap();
    let db = folder.join("whereabouts.db");
    let started = Instant::now();
    allocate(&db, namespace);
    println!(
        "{label}: {ALLOCATIONS} allocations made in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let conf = folder.join("net.conf");
    let ipam = json!({"type": "whereabouts", "range": RANGE, "local_path": db,
                      "reconciler_cron_expression": "0 0 1 1 *"});
    std::fs::write(&conf, json!({"name": "bench", "ipam": ipam}).to_string()).unwrap();
    let log = folder.join("controller.log");
    // A flat file of its own: the controller would otherwise read the host's, if it has one.
    let flat = folder.join("whereabouts.conf");
    std::fs::write(&flat, "{}").unwrap();
    let started = Instant::now();
    let mut child = Command::new(bin)
        .env("WHEREABOUTS_FLAT_FILE", &flat)
        .args(["controller", "--config"])
        .arg(&conf)
        .arg("--pod-kubeconfig")
        .arg(kubeconfig)
        .args(["--listen", "127.0.0.1:0", "--no-node-slices"])
        .args(extra)
        .args(["--namespace", namespace])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the controller");
    let port = wait_for_port(&log);
    let reconcile = loop {
        let done = metric(port, "whereabouts_reconcile_duration_seconds_count");
        if done.is_some_and(|count| count >= 1.0) {
            break metric(port, "whereabouts_last_reconcile_duration_seconds").unwrap_or(0.0);
        }
        assert!(started.elapsed() < Duration::from_secs(600), "no reconcile");
        std::thread::sleep(Duration::from_millis(50));
    };
    let until_free = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let store = whereabouts::store::local::open(&db).unwrap();
    let left = store.allocations(None).unwrap().len();
    assert_eq!(left, ALLOCATIONS - GONE, "what the reconcile left");
    println!(
        "{label}: full reconcile of {ALLOCATIONS} allocations ({GONE} released): {reconcile:.2} s \
         ({:.0} allocations/s); controller start to the last release: {:.2} s",
        ALLOCATIONS as f64 / reconcile,
        until_free.as_secs_f64()
    );
}

/// Pods `p-0`.. in `namespace`, many requests at a time.
fn create_pods(plane: &kube_apiserver::ControlPlane, namespace: &str, count: usize) {
    let api: Api<Pod> = Api::namespaced(plane.client(), namespace);
    plane.block_on(async {
        futures::stream::iter(0..count)
            .map(|i| {
                let api = api.clone();
                async move {
                    let pod: Pod = serde_json::from_value(json!({
                        "metadata": {"name": format!("p-{i}")},
                        "spec": {"automountServiceAccountToken": false,
                                 "containers": [{"name": "main", "image": "test.invalid/pause"}]},
                    }))
                    .unwrap();
                    api.create(&PostParams::default(), &pod).await.unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
    });
}

/// One allocation per pod name `p-0`..`p-9999`, through the store library.
fn allocate(db: &Path, namespace: &str) {
    let store = whereabouts::store::local::open(db).unwrap();
    let (cidr, start, end) = parse_range_text(RANGE).unwrap();
    let spec = RangeSpec {
        cidr,
        start,
        end,
        exclude: Vec::new(),
    };
    let pool = PoolRef {
        name: whereabouts::ipam::names::pool_name(&cidr, "", None),
        range: Range::resolve(&spec, None).unwrap(),
        spec,
        gateway: None,
    };
    for i in 0..ALLOCATIONS {
        let attachment = Attachment {
            container_id: format!("c-{i}"),
            ifname: "net1".into(),
            pod_ref: Some(format!("{namespace}/p-{i}")),
            pod_uid: None,
        };
        store
            .add(&AddRequest {
                cni_network: "bench".into(),
                network_name: String::new(),
                overlap: true,
                attachment,
                ranges: vec![RangeRequest {
                    pool: pool.clone(),
                    requested: None,
                }],
                node_slice_size: None,
                sleep_for_race: 0,
                node: None,
            })
            .unwrap();
    }
}

fn wait_for_port(log: &Path) -> u16 {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let port = text
            .split("listen=127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok());
        if let Some(port) = port {
            return port;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the first sample of `series` on the controller's /metrics.
fn metric(port: u16, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
