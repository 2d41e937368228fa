//! The Kubernetes engine against the strict fake API server, at library level.

mod fake_apiserver;

use std::collections::BTreeSet;
use std::net::IpAddr;

use fake_apiserver::harness::*;
use fake_apiserver::FakeApiServer;
use serde_json::json;
use whereabouts::store::StoreError;

const NS: &str = "kube-system";

#[test]
fn add_check_del_roundtrip() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let cfg = config(&ipam_json("10.1.0.0/24", &kubeconfig, json!({})));
    let store = open(&cfg).unwrap();
    store.status().unwrap();
    let who = attachment("c1", "default/pod-1", "net1");
    let ips = store.add(&add_request(&cfg, who.clone())).unwrap();
    assert_eq!(ips.len(), 1);
    let pool = server.get("ippools", NS, "10.1.0.0-24").expect("pool created");
    assert_eq!(pool_ips(&pool), ips);
    let reservation = server
        .get("overlappingrangeipreservations", NS, &ips[0].to_string())
        .expect("reservation created");
    assert_eq!(reservation["spec"]["podref"], "default/pod-1");
    assert_eq!(reservation["spec"]["containerid"], "c1");

    let held = store.check(&del_request(&cfg, "c1", "net1")).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].ip, ips[0]);

    // Idempotent: the same pod and interface get the same address, with the new container ID.
    let again = store
        .add(&add_request(&cfg, attachment("c1-restarted", "default/pod-1", "net1")))
        .unwrap();
    assert_eq!(again, ips);
    let pool = server.get("ippools", NS, "10.1.0.0-24").unwrap();
    let entry = pool["spec"]["allocations"].as_object().unwrap().values().next().unwrap().clone();
    assert_eq!(entry["id"], "c1-restarted");

    let released = store.del(&del_request(&cfg, "c1-restarted", "net1")).unwrap();
    assert_eq!(released.len(), 1);
    let pool = server.get("ippools", NS, "10.1.0.0-24").unwrap();
    assert!(pool_ips(&pool).is_empty());
    assert!(server.list("overlappingrangeipreservations", NS).is_empty());
    // DEL of nothing is fine.
    assert!(store.del(&del_request(&cfg, "c1-restarted", "net1")).unwrap().is_empty());
}

#[test]
fn concurrent_burst_library_level() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let cfg = config(&ipam_json("10.2.0.0/16", &kubeconfig, json!({})));
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let store = open(&cfg).unwrap();
                store
                    .add(&add_request(&cfg, attachment(&format!("c{i}"), &format!("ns/p{i}"), "net1")))
                    .unwrap()[0]
            })
        })
        .collect();
    let ips: Vec<IpAddr> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let unique: BTreeSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), 100);
    let pool = server.get("ippools", NS, "10.2.0.0-16").unwrap();
    assert_eq!(pool_ips(&pool).len(), 100);
    assert_eq!(server.list("overlappingrangeipreservations", NS).len(), 100);
    eprintln!("requests: {} {:?}", server.requests(), server.requests_by_verb());
}

#[test]
fn unreachable_server_is_try_again() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig =
        fake_apiserver::write_kubeconfig(dir.path(), &format!("http://127.0.0.1:{port}"), None);
    let cfg = config(&ipam_json("10.3.0.0/24", &kubeconfig, json!({})));
    let store = open(&cfg).unwrap();
    let err = store
        .add(&add_request(&cfg, attachment("c1", "ns/p", "net1")))
        .unwrap_err();
    assert!(matches!(err, StoreError::TryAgain(_)), "{err:?}");
    assert_eq!(err.code(), 11);
    eprintln!("{err}");
    assert!(store.status().is_err());
}
