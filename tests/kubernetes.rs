//! The Kubernetes engine at library level, against the real API server (one namespace per
//! test). The fake server stays for what the real one cannot do on demand: being unreachable,
//! holding a request while the test changes what it reads, and the checks of the fake's own
//! strictness.

mod fake_apiserver;
mod kube_apiserver;

use std::collections::BTreeSet;
use std::net::IpAddr;

use fake_apiserver::harness::*;
use fake_apiserver::FakeApiServer;
use serde_json::json;
use whereabouts::config::{GoPeers, IpamConfig};
use whereabouts::store::{Attachment, StoreError};

#[test]
fn add_check_del_roundtrip() {
    let plane = real_cluster!();
    let ns = plane.namespace("add-check-del-roundtrip");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let cfg = config(&ipam_json("10.1.0.0/24", &kubeconfig, json!({})));
    let store = open(&cfg).unwrap();
    store.status().unwrap();
    let who = attachment("c1", "default/pod-1", "net1");
    let ips = store.add(&add_request(&cfg, who.clone())).unwrap();
    assert_eq!(ips.len(), 1);
    let pool = ns.get("ippools", "10.1.0.0-24").expect("pool created");
    assert_eq!(pool_ips(&pool), ips);
    let reservation = ns
        .get("overlappingrangeipreservations", &ips[0].to_string())
        .expect("reservation created");
    assert_eq!(reservation["spec"]["podref"], "default/pod-1");
    assert_eq!(reservation["spec"]["containerid"], "c1");

    let held = store.check(&del_request(&cfg, "c1", "net1")).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].ip, ips[0]);

    // Idempotent: the same pod and interface get the same address, with the new container ID.
    let again = store
        .add(&add_request(
            &cfg,
            attachment("c1-restarted", "default/pod-1", "net1"),
        ))
        .unwrap();
    assert_eq!(again, ips);
    let pool = ns.get("ippools", "10.1.0.0-24").unwrap();
    let entry = pool["spec"]["allocations"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(entry["id"], "c1-restarted");

    let released = store
        .del(&del_request(&cfg, "c1-restarted", "net1"))
        .unwrap();
    assert_eq!(released.len(), 1);
    let pool = ns.get("ippools", "10.1.0.0-24").unwrap();
    assert!(pool_ips(&pool).is_empty());
    assert!(ns.list("overlappingrangeipreservations").is_empty());
    // DEL of nothing is fine.
    assert!(store
        .del(&del_request(&cfg, "c1-restarted", "net1"))
        .unwrap()
        .is_empty());
}

#[test]
fn concurrent_burst_library_level() {
    let plane = real_cluster!();
    let ns = plane.namespace("concurrent-burst-library-level");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let cfg = config(&ipam_json("10.2.0.0/16", &kubeconfig, json!({})));
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let store = open(&cfg).unwrap();
                store
                    .add(&add_request(
                        &cfg,
                        attachment(&format!("c{i}"), &format!("ns/p{i}"), "net1"),
                    ))
                    .unwrap()[0]
            })
        })
        .collect();
    let ips: Vec<IpAddr> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let unique: BTreeSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), 100);
    let pool = ns.get("ippools", "10.2.0.0-16").unwrap();
    assert_eq!(pool_ips(&pool).len(), 100);
    assert_eq!(ns.list("overlappingrangeipreservations").len(), 100);
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
    assert!(matches!(err, StoreError::TryAgain { .. }), "{err:?}");
    let reply = whereabouts::cni::error::CniError::from(err.clone());
    assert_eq!(reply.code, 11);
    // The cause (the refused connection, at the kubeconfig's server) is kept for the admin's
    // log; the runtime is told what failed.
    assert!(
        reply.msg.contains("kubernetes API server unavailable"),
        "{}",
        reply.msg
    );
    assert!(reply.for_the_log().contains("unavailable: "), "{reply:?}");
    assert!(store.status().is_err());
}

#[test]
fn static_addresses_are_reserved() {
    let plane = real_cluster!();
    let ns = plane.namespace("static-addresses-are-reserved");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let cfg = config(&ipam_json("10.4.0.0/24", &kubeconfig, json!({})));
    let store = open(&cfg).unwrap();
    let mut req = add_request(&cfg, attachment("c1", "ns/a", "net1"));
    req.ranges[0].requested = Some(7);
    let ips = store.add(&req).unwrap();
    assert_eq!(ips[0].to_string(), "10.4.0.7");
    let mut other = add_request(&cfg, attachment("c2", "ns/b", "net1"));
    other.ranges[0].requested = Some(7);
    let err = store.add(&other).unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains("ns/a"), "{err}");
    // A dynamic ADD never lands on it either.
    for i in 0..20 {
        let ip = store
            .add(&add_request(
                &cfg,
                attachment(&format!("d{i}"), &format!("ns/d{i}"), "net1"),
            ))
            .unwrap()[0];
        assert_ne!(ip.to_string(), "10.4.0.7");
    }
}

#[test]
fn overlapping_ranges_share_addresses_through_reservations() {
    let plane = real_cluster!();
    let ns = plane.namespace("overlapping-ranges-share-addresses-throu");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let wide = config(&ipam_json(
        "10.5.0.0/28",
        &kubeconfig,
        json!({"network_name": "ovl"}),
    ));
    let narrow = config(&ipam_json(
        "10.5.0.0/29",
        &kubeconfig,
        json!({"network_name": "ovl"}),
    ));
    let store = open(&wide).unwrap();
    let mut seen = BTreeSet::new();
    // The /29 has 6 usable addresses, the /28 14: together 14 distinct addresses, never twice.
    for i in 0..6 {
        let ip = store
            .add(&add_request(
                &narrow,
                attachment(&format!("n{i}"), &format!("ns/n{i}"), "net1"),
            ))
            .unwrap()[0];
        assert!(seen.insert(ip));
    }
    for i in 0..8 {
        let ip = store
            .add(&add_request(
                &wide,
                attachment(&format!("w{i}"), &format!("ns/w{i}"), "net1"),
            ))
            .unwrap()[0];
        assert!(seen.insert(ip), "{ip} handed out twice");
    }
    let err = store
        .add(&add_request(
            &wide,
            attachment("w-extra", "ns/w-extra", "net1"),
        ))
        .unwrap_err();
    assert!(matches!(err, StoreError::Exhausted { .. }), "{err:?}");
    assert_eq!(ns.list("overlappingrangeipreservations").len(), 14);
    assert!(ns
        .get("overlappingrangeipreservations", "ovl-10.5.0.1")
        .is_some());
}

/// A CNI GC comes from one node's runtime, which knows only that node's attachments of this
/// network configuration. In a pool shared by every node (and by every network of the range)
/// it frees an unlisted entry only when its pod is gone: a live pod's entry, on this node too,
/// may be another network's attachment, which the list never names (`unlisted-here`).
#[test]
fn gc_of_a_shared_pool_frees_only_gone_pods_entries() {
    let plane = real_cluster!();
    let ns = plane.namespace("gc-shared-pool");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let cfg = config(&ipam_json("10.6.0.0/24", &kubeconfig, json!({})));
    let store = open(&cfg).unwrap();
    let pod = |name: &str| format!("{}/{name}", ns.name);
    ns.add_pod_on("listed", "Running", Some("node-a"));
    ns.add_pod_on("unlisted-here", "Running", Some("node-a"));
    ns.add_pod_on("other-node", "Running", Some("node-b"));
    ns.add_pod_on("unscheduled", "Pending", None);
    let mut holders: Vec<Attachment> = [
        "listed",
        "unlisted-here",
        "other-node",
        "unscheduled",
        "gone",
    ]
    .iter()
    .map(|c| attachment(c, &pod(c), "net1"))
    .collect();
    let mut podless = attachment("podless", "", "net1");
    podless.pod_ref = None;
    holders.push(podless);
    for who in &holders {
        store.add(&add_request(&cfg, who.clone())).unwrap();
    }
    // Without the node's name a GC cannot tell whose an entry is: it frees nothing.
    let mut nameless = gc_request(&cfg, &[("listed", "net1")]);
    nameless.node = None;
    assert!(store.gc(&nameless).unwrap().is_empty());

    let freed = store.gc(&gc_request(&cfg, &[("listed", "net1")])).unwrap();
    let freed: BTreeSet<String> = freed
        .into_iter()
        .map(|a| a.attachment.container_id)
        .collect();
    assert_eq!(freed, BTreeSet::from(["gone".into()]));
    let left: BTreeSet<String> = store
        .allocations(None)
        .unwrap()
        .into_iter()
        .map(|a| a.attachment.container_id)
        .collect();
    let expected = [
        "listed",
        "unlisted-here",
        "other-node",
        "unscheduled",
        "podless",
    ];
    assert_eq!(left, expected.iter().map(|c| c.to_string()).collect());
    assert_eq!(
        pool_ips(&ns.get("ippools", "10.6.0.0-24").unwrap()).len(),
        5
    );
    assert_eq!(ns.list("overlappingrangeipreservations").len(), 5);
    // The store's release by address, whoever holds it (an entry that records no container).
    let listed = store.check(&del_request(&cfg, "listed", "net1")).unwrap();
    let released = store.release("10.6.0.0-24", listed[0].ip, None).unwrap();
    assert!(released.is_some());
    assert_eq!(ns.list("overlappingrangeipreservations").len(), 4);
}

/// An ADD without a pod would be written with `podref: ""`, whose reservation a Go reconciler
/// deletes as an orphan's (an overlapping range then hands the address out again): refused
/// while Go binaries write the pools, as they refuse it, unless the network keeps no
/// reservations.
#[test]
fn an_add_without_a_pod_is_refused_while_go_binaries_write() {
    let plane = real_cluster!();
    let ns = plane.namespace("podless-add");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let podless = || {
        let mut who = attachment("podless", "", "net1");
        who.pod_ref = None;
        who
    };
    let add = |cfg: &IpamConfig| open(cfg).unwrap().add(&add_request(cfg, podless()));

    let with_go = |range: &str, extra| {
        let mut cfg = config(&ipam_json(range, &kubeconfig, extra));
        cfg.go_peers = GoPeers::Present;
        cfg
    };
    let err = add(&with_go("10.7.0.0/24", json!({}))).unwrap_err();
    assert!(matches!(err, StoreError::Config { .. }), "{err:?}");
    assert!(
        err.describe().contains("K8S_POD_NAME"),
        "{}",
        err.describe()
    );
    assert!(ns.list("ippools").iter().all(|p| pool_ips(p).is_empty()));

    let overlap_off = json!({"enable_overlapping_ranges": false});
    let cfg = with_go("10.7.1.0/24", overlap_off);
    assert_eq!(add(&cfg).unwrap(), ["10.7.1.1".parse::<IpAddr>().unwrap()]);
    // No Go binary seen (`auto`, and no Lease a Go binary renewed): taken.
    let cfg = config(&ipam_json("10.7.2.0/24", &kubeconfig, json!({})));
    assert_eq!(add(&cfg).unwrap(), ["10.7.2.1".parse::<IpAddr>().unwrap()]);
}

#[test]
fn a_failed_second_range_takes_back_the_first() {
    let plane = real_cluster!();
    let ns = plane.namespace("a-failed-second-range-takes-back-the-fir");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let cfg = config(&ipam_json(
        "10.7.0.0/24",
        &kubeconfig,
        json!({"ipRanges": [{"range": "10.8.0.0/30"}]}),
    ));
    let store = open(&cfg).unwrap();
    // Fill the small second range.
    for c in ["x1", "x2"] {
        store
            .add(&add_request(
                &cfg,
                attachment(c, &format!("ns/{c}"), "net1"),
            ))
            .unwrap();
    }
    let err = store
        .add(&add_request(&cfg, attachment("late", "ns/late", "net1")))
        .unwrap_err();
    assert!(matches!(err, StoreError::Exhausted { .. }), "{err:?}");
    let first = ns.get("ippools", "10.7.0.0-24").unwrap();
    assert_eq!(
        pool_ips(&first).len(),
        2,
        "the first range kept the failed ADD's address"
    );
    assert_eq!(ns.list("overlappingrangeipreservations").len(), 4);
}

/// An IPPool is one object, and the API server stores none larger than etcd's request limit
/// (1.5 MiB by default: about 10,000 allocations). An ADD into a pool at that size is refused
/// at once as such, naming the pool, instead of "try again" after retries that send the server
/// the same oversized object; it leaves no reservation, and the pool takes the next ADD once
/// an allocation is released.
#[test]
fn a_pool_the_server_cannot_store_larger_refuses_adds_until_one_is_released() {
    let plane = real_cluster!();
    let ns = plane.namespace("a-pool-the-server-cannot-store-larger");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    // Entries as a runtime's container IDs and pod names make them, as many as fit (the
    // largest count the server stores, found by trying).
    let pool = |count: usize| {
        let entry = |i: usize| {
            let (id, podref) = (format!("{i:064x}"), format!("default/pod-{i:08}"));
            json!({"id": id, "podref": podref, "ifname": "net1"})
        };
        let allocations: serde_json::Map<String, serde_json::Value> =
            (1..=count).map(|i| (i.to_string(), entry(i))).collect();
        json!({
            "metadata": {"name": "10.9.0.0-16"},
            "spec": {"range": "10.9.0.0/16", "allocations": allocations},
        })
    };
    let (mut stored, mut refused) = (8_000, 16_000);
    while refused - stored > 4 {
        let count = (stored + refused) / 2;
        match ns.try_create("ippools", pool(count)) {
            Ok(_) => {
                assert!(ns.delete("ippools", "10.9.0.0-16"));
                stored = count;
            }
            Err(kube::Error::Api(status)) if status.message.contains("too large") => {
                refused = count
            }
            Err(err) => panic!("create the pool: {err}"),
        }
    }
    ns.create("ippools", pool(stored));
    assert!(stored > 9_000, "only {stored} entries stored");
    let cfg = config(&ipam_json("10.9.0.0/16", &kubeconfig, json!({})));
    let store = open(&cfg).unwrap();
    let who = |i: usize| {
        attachment(
            &format!("{:064x}", 1 << 20 | i),
            &format!("default/late-{i:08}"),
            "net1",
        )
    };
    let mut added = 0;
    let err = loop {
        match store.add(&add_request(&cfg, who(added))) {
            Ok(_) => added += 1,
            Err(err) => break err,
        }
        assert!(added < 20, "the pool of {stored} entries still grows");
    };
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    let text = whereabouts::store::error::chain(&err);
    assert!(
        text.contains("IPPool 10.9.0.0-16 cannot take 1 more allocation"),
        "{text}"
    );
    let pool = ns.get("ippools", "10.9.0.0-16").unwrap();
    assert_eq!(pool_ips(&pool).len(), stored + added);
    assert_eq!(ns.list("overlappingrangeipreservations").len(), added);

    // One of the first entries released: room for the next ADD.
    let released = store
        .del(&del_request(&cfg, &format!("{:064x}", 1), "net1"))
        .unwrap();
    assert_eq!(released.len(), 1);
    store.add(&add_request(&cfg, who(added))).unwrap();
}

/// An admission policy of the cluster's (a ValidatingAdmissionPolicy, evaluated in the API
/// server) that refuses an IPPool write: the ADD or DEL fails at once with code 5, the policy's
/// message in the answer, and the ADD takes back its reservation. Before, the refusal (422, as a
/// failed JSON-patch test is) made the ADD fail without the reason, and a DEL retry until its
/// deadline and answer "did not complete it within 60s". Once the policy is gone, the DEL
/// goes through.
#[test]
fn a_pool_write_an_admission_policy_refuses_is_answered_with_its_reason() {
    let plane = real_cluster!();
    let ns = plane.namespace("a-pool-write-an-admission-policy-refuses");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let cfg = config(&ipam_json("10.10.0.0/24", &kubeconfig, json!({})));
    let store = open(&cfg).unwrap();
    store
        .add(&add_request(&cfg, attachment("c0", "default/p0", "net1")))
        .unwrap();
    let policy = pool_size_policy(&ns, dir.path());
    let refused = |err: StoreError, reason: &str| {
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        let reply = whereabouts::cni::error::CniError::from(err);
        assert_eq!(reply.code, 5, "{}", reply.msg);
        assert!(reply.msg.contains(reason), "{}", reply.msg);
    };
    store
        .add(&add_request(&cfg, attachment("c1", "default/p1", "net1")))
        .unwrap();
    let third = store.add(&add_request(&cfg, attachment("c2", "default/p2", "net1")));
    refused(third.unwrap_err(), "at most 2 allocations per pool");
    assert_eq!(ns.list("overlappingrangeipreservations").len(), 2);
    let del = store.del(&del_request(&cfg, "c0", "net1"));
    refused(del.unwrap_err(), "allocations are frozen");
    let pool = ns.get("ippools", "10.10.0.0-24").unwrap();
    assert_eq!(pool_ips(&pool).len(), 2);

    plane.kubectl(&[
        "delete",
        "validatingadmissionpolicy,validatingadmissionpolicybinding",
        &policy,
    ]);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // The server drops the policy from its evaluation shortly after its deletion.
    while store.del(&del_request(&cfg, "c0", "net1")).is_err() {
        assert!(
            std::time::Instant::now() < until,
            "the DEL is still refused"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let pool = ns.get("ippools", "10.10.0.0-24").unwrap();
    assert_eq!(pool_ips(&pool).len(), 1);
    assert_eq!(ns.list("overlappingrangeipreservations").len(), 1);
}

/// A ValidatingAdmissionPolicy bound to `ns` alone: no IPPool with more than two allocations,
/// no allocation removed from one. Returns its name once the server enforces it.
fn pool_size_policy(ns: &kube_apiserver::TestNamespace, dir: &std::path::Path) -> String {
    let validations = json!([
        {"expression": "size(object.spec.allocations) <= 2",
         "message": "at most 2 allocations per pool"},
        {"expression": "request.operation != 'UPDATE' || \
            size(object.spec.allocations) >= size(oldObject.spec.allocations)",
         "message": "allocations are frozen"},
    ]);
    let allocation = json!({"id": "probe", "podref": "default/probe"});
    let refused = json!({
        "metadata": {"name": "policy-probe"},
        "spec": {"range": "10.11.0.0/24",
                 "allocations": {"1": allocation, "2": allocation, "3": allocation}},
    });
    let rules = json!(["ippools", ["CREATE", "UPDATE"]]);
    ns.admission_policy(dir, rules, validations, ("ippools", refused))
}

/// Creates an admission policy refuses (a new IPPool, a reservation): the ADD fails at once
/// with code 5 and the policy's message, and leaves nothing. Before, a 422 answer to a create
/// was read as a lost race: a reservation refused answered "kept changing" (11), a pool
/// refused retried until the deadline.
#[test]
fn creates_an_admission_policy_refuses_are_answered_with_its_reason() {
    let plane = real_cluster!();
    let ns = plane.namespace("creates-an-admission-policy-refuses");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = ns.kubeconfig(dir.path());
    let validations = json!([
        {"expression": "!has(object.spec.range) || object.spec.range != '10.12.0.0/24'",
         "message": "no pool for 10.12.0.0/24"},
        {"expression": "!has(object.spec.podref) || !object.spec.podref.startsWith('quarantine/')",
         "message": "no address for a quarantined pod"},
    ]);
    let reservation = json!({"metadata": {"name": "10.13.0.99"},
        "spec": {"containerid": "c", "podref": "quarantine/probe"}});
    let rules = json!(["*", ["CREATE"]]);
    let probe = ("overlappingrangeipreservations", reservation);
    let policy = ns.admission_policy(dir.path(), rules, validations, probe);
    let refused = |range: &str, pod: &str, reason: &str| {
        let cfg = config(&ipam_json(range, &kubeconfig, json!({})));
        let store = open(&cfg).unwrap();
        let err = store
            .add(&add_request(&cfg, attachment("c1", pod, "net1")))
            .unwrap_err();
        let reply = whereabouts::cni::error::CniError::from(err);
        assert_eq!(reply.code, 5, "{}", reply.msg);
        assert!(reply.msg.contains(reason), "{}", reply.msg);
    };
    refused("10.12.0.0/24", "default/p1", "no pool for 10.12.0.0/24");
    assert!(ns.list("overlappingrangeipreservations").is_empty());
    refused(
        "10.13.0.0/24",
        "quarantine/p2",
        "no address for a quarantined pod",
    );
    let cfg = config(&ipam_json("10.13.0.0/24", &kubeconfig, json!({})));
    let store = open(&cfg).unwrap();
    let ips = store
        .add(&add_request(&cfg, attachment("c3", "default/p3", "net1")))
        .unwrap();
    let pool = ns.get("ippools", "10.13.0.0-24").unwrap();
    assert_eq!(pool_ips(&pool), ips);
    assert_eq!(ns.list("overlappingrangeipreservations").len(), 1);
    plane.kubectl(&[
        "delete",
        "validatingadmissionpolicy,validatingadmissionpolicybinding",
        &policy,
    ]);
}

#[test]
fn the_fake_server_is_strict() {
    let server = FakeApiServer::start();
    let base = "/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/kube-system/ippools";
    let pool = |rv: Option<&str>| {
        let mut p = json!({
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "IPPool",
            "metadata": {"name": "10.9.0.0-24"},
            "spec": {"range": "10.9.0.0/24", "allocations": {}, "unknown": 1},
        });
        if let Some(rv) = rv {
            p["metadata"]["resourceVersion"] = json!(rv);
        }
        p.to_string()
    };
    let (code, created) = server.raw("POST", base, "application/json", &pool(None));
    assert_eq!(code, 201);
    assert!(
        created["spec"].get("unknown").is_none(),
        "unknown fields are pruned"
    );
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, body) = server.raw("POST", base, "application/json", &pool(None));
    assert_eq!(
        (code, body["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
    assert_eq!(body["kind"], "Status");
    let item = format!("{base}/10.9.0.0-24");
    let (code, body) = server.raw("PUT", &item, "application/json", &pool(None));
    assert_eq!((code, body["reason"].as_str()), (422, Some("Invalid")));
    let (code, body) = server.raw("PUT", &item, "application/json", &pool(Some("999")));
    assert_eq!((code, body["reason"].as_str()), (409, Some("Conflict")));
    let (code, _) = server.raw("PUT", &item, "application/json", &pool(Some(&rv)));
    assert_eq!(code, 200);
    let stale = json!([{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                       {"op": "add", "path": "/spec/allocations/1", "value": {"id": "c", "podref": "a/b"}}]);
    let (code, _) = server.raw(
        "PATCH",
        &item,
        "application/json-patch+json",
        &stale.to_string(),
    );
    assert_eq!(code, 422);
    let missing = json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool",
                         "metadata": {"name": "bad"}, "spec": {"range": "10.9.1.0/24"}});
    let (code, body) = server.raw("POST", base, "application/json", &missing.to_string());
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("spec.allocations"),
        "{body}"
    );
    let invalid_name = json!({"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool",
                         "metadata": {"name": "---126"}, "spec": {"range": "::/126", "allocations": {}}});
    let (code, _) = server.raw("POST", base, "application/json", &invalid_name.to_string());
    assert_eq!(code, 422);
    let (code, body) = server.raw("GET", &format!("{base}/nope"), "application/json", "");
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")));
    let (code, _) = server.raw(
        "DELETE",
        &item,
        "application/json",
        &json!({"preconditions": {"uid": "someone-else"}}).to_string(),
    );
    assert_eq!(code, 409);
    let (code, _) = server.raw("DELETE", &item, "application/json", "");
    assert_eq!(code, 200);
    assert!(server.requests() >= 10);
}

/// Counts nothing: the agent's engine wants an observer.
struct Unobserved;

impl whereabouts::store::kubernetes::Observer for Unobserved {
    fn batch(&self, _: &'static str, _: usize) {}
    fn conflict(&self, _: &'static str) {}
    fn queued(&self, _: &'static str) {}
    fn cache(&self, _: &'static str, _: bool) {}
}

/// An agent's request that gives up (its deadline passed: its plugin answered "try again")
/// while its batch goes on: what the batch then grants it is taken back, as the runtime's DEL
/// may have come first and found nothing. On the fake API server, whose gate holds the batch's
/// pool write while the request gives up.
#[test]
fn an_agents_grant_whose_request_gave_up_is_taken_back() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let cfg = config(&ipam_json("10.151.0.0/28", &kubeconfig, json!({})));
    let whereabouts::config::Datastore::Kubernetes(kube) = &cfg.datastore else {
        panic!("the Kubernetes engine expected");
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let holders = || -> Vec<String> {
        let pool = server.get("ippools", "kube-system", "10.151.0.0-28");
        let pool = pool.expect("the pool");
        let entries = pool["spec"]["allocations"].as_object().unwrap().values();
        entries
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    let reserved_by = |container: &str| {
        let all = server.list("overlappingrangeipreservations", "kube-system");
        all.iter().any(|r| r["spec"]["containerid"] == container)
    };
    runtime.block_on(async {
        let observer = std::sync::Arc::new(Unobserved);
        let engine = whereabouts::store::kubernetes::open_agent(&cfg, kube, observer);
        let engine = engine.await.unwrap();
        // The pool exists: the next write of it is an update.
        let first = add_request(&cfg, attachment("c0", "default/p0", "net1"));
        engine.add(&first).await.unwrap();
        server.close_gate("PATCH", "ippools");
        let abandoned = add_request(&cfg, attachment("c1", "default/p1", "net1"));
        let request = tokio::spawn({
            let engine = engine.clone();
            async move { engine.add(&abandoned).await }
        });
        let start = std::time::Instant::now();
        while server.waiting_at_gate() == 0 {
            assert!(
                start.elapsed().as_secs() < 30,
                "the write never reached the gate"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The request gives up, as at its deadline; its batch goes on.
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        server.open_gate();
        while holders() != ["c0"] || reserved_by("c1") {
            assert!(start.elapsed().as_secs() < 30, "never taken back");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
}

/// A CNI GC judges each pool's unlisted entries by their pods as they are after that pool is
/// read: a pod gone when an earlier pool was judged may be created again meanwhile (a
/// StatefulSet's), and its ADD write its new sandbox into this pool's entry,
/// which must stay. On the fake API server, which holds the GC's first release at its gate
/// while that happens.
#[test]
fn a_gc_judges_each_pool_by_its_pods_as_they_are_then() {
    let server = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path(), None);
    let ranges = json!({"ipRanges": [{"range": "10.9.1.0/24"}]});
    let cfg = config(&ipam_json("10.9.0.0/24", &kubeconfig, ranges));
    let store = open(&cfg).unwrap();
    let ips = store
        .add(&add_request(
            &cfg,
            attachment("c1", "default/web-0", "net1"),
        ))
        .unwrap();
    assert_eq!(ips.len(), 2);
    server.close_gate("PATCH", "ippools");
    let (gc, second_pool) = std::thread::scope(|s| {
        // A store of its own: a process's, as the runtime's GC call is.
        let gc = s.spawn(|| open(&cfg).unwrap().gc(&gc_request(&cfg, &[])));
        let start = std::time::Instant::now();
        while server.waiting_at_gate() == 0 && start.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let reached = server.waiting_at_gate() > 0;
        if reached {
            // web-0 again, its ADD keeping its address of the second range (with a new sandbox
            // it writes its new container into the entry).
            server.add_pod("default", "web-0", "Running");
            let mut pool = server.get("ippools", "kube-system", "10.9.1.0-24").unwrap();
            let entries = pool["spec"]["allocations"].as_object_mut().unwrap();
            for entry in entries.values_mut() {
                entry["id"] = json!("c2");
            }
            let path =
                "/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/kube-system/ippools/10.9.1.0-24";
            let (code, _) = server.raw("PUT", path, "application/json", &pool.to_string());
            assert_eq!(code, 200);
        }
        server.open_gate();
        assert!(reached, "the GC's first release never reached the gate");
        (
            gc.join().unwrap(),
            server.get("ippools", "kube-system", "10.9.1.0-24"),
        )
    });
    let freed: Vec<IpAddr> = gc.unwrap().into_iter().map(|a| a.ip).collect();
    assert_eq!(
        freed,
        ips[..1],
        "only the first range's entry is the gone pod's"
    );
    let second_pool = second_pool.unwrap();
    assert_eq!(pool_holders(&second_pool), ["c2"], "{second_pool}");
}
