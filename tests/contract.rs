//! The store contract: one set of behaviours, written once, run unchanged against every engine
//! (SQLite in a temporary database, a real etcd cluster, the real Kubernetes API server).
//! Every behaviour opens a fresh store, so engines and behaviours never see each other's state.
//!
//! Where an engine cannot give the shared answer, [`differs`] says so and why, in this one
//! place; the README's differences section says the same.

#[path = "etcd_cluster/mod.rs"]
mod etcd_cluster;
mod kube_apiserver;

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::json;
use whereabouts::config::{load_with_flat_files, Datastore};
use whereabouts::ipam::names::pool_name;
use whereabouts::ipam::{parse_exclude, parse_range_text, Range, RangeSpec};
use whereabouts::store::{
    AddRequest, Attachment, AttachmentRequest, GcRequest, Hints, PoolRef, RangeRequest, Store,
    StoreError,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Local,
    Etcd,
    Kubernetes,
}

/// The behaviours an engine answers differently, and why. Nothing else may differ.
fn differs(engine: Engine, behaviour: &str) -> Option<&'static str> {
    match (engine, behaviour) {
        (Engine::Kubernetes, "gc_follows_a_kept_address_to_its_new_network") => Some(
            "an IPPool entry does not record the network configuration that wrote it; GC frees \
             an unlisted entry only when its pod is gone or re-created, and the contract's pods \
             are not in the API server.",
        ),
        (Engine::Kubernetes, "del_releases_unconfigured_ranges") => Some(
            "an IPPool is found by the name of a configured range; finding the attachment's \
             entries in ranges no longer configured would mean listing every IPPool of the \
             namespace on every DEL. The controller's cleanup releases those.",
        ),
        (
            Engine::Kubernetes,
            "a_dynamic_add_passes_over_what_its_pod_holds_through_another_range",
        ) => Some(
            "a reservation names a pod and container, not the pool of its entry: a dynamic ADD of \
             the pod's next sandbox that finds the pod's reservation adopts it (one left by a \
             failed ADD whose take-back failed would otherwise keep the address from everyone \
             while the pod lives), so it may get the address the pod's earlier sandbox holds \
             through another range (10.26.0.1): the same pod twice, never two pods.",
        ),
        (Engine::Local, "overlap_taken_part_in_by_some_adds_only") => Some(
            "the local engine keeps no reservations: an ADD that takes part looks at the \
             overlapping pools' allocations themselves, so it never takes an address an \
             overlapping range holds, even one an ADD that took no part made (10.23.0.2 for \
             the second ADD, 10.23.0.1 for the third, which looks at its own pool only).",
        ),
        _ => None,
    }
}

/// Opens a fresh store for one behaviour.
type Opener<'a> = &'a dyn Fn(&str) -> Box<dyn Store>;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn pool_in(network: &str, range: &str, exclude: &[&str]) -> PoolRef {
    let (cidr, start, end) = parse_range_text(range).unwrap();
    let spec = RangeSpec {
        cidr,
        start,
        end,
        exclude: exclude.iter().map(|e| parse_exclude(e).unwrap()).collect(),
    };
    PoolRef {
        name: pool_name(&cidr, network, None),
        range: Range::resolve(&spec, None).unwrap(),
        spec,
        gateway: None,
    }
}

fn pool(range: &str) -> PoolRef {
    pool_in("", range, &[])
}

fn who(container: &str, pod: &str) -> Attachment {
    Attachment {
        container_id: container.into(),
        ifname: "net1".into(),
        pod_ref: Some(format!("default/{pod}")),
        pod_uid: None,
    }
}

fn add(pools: &[PoolRef], attachment: Attachment) -> AddRequest {
    AddRequest {
        cni_network: "contract".into(),
        network_name: String::new(),
        overlap: true,
        attachment,
        ranges: pools
            .iter()
            .map(|pool| RangeRequest {
                pool: pool.clone(),
                requested: None,
            })
            .collect(),
        node_slice_size: None,
        sleep_for_race: 0,
        node: Some("node-a".into()),
    }
}

/// `add` in network `network_name`.
fn add_in(network_name: &str, pools: &[PoolRef], attachment: Attachment) -> AddRequest {
    AddRequest {
        network_name: network_name.into(),
        ..add(pools, attachment)
    }
}

/// `add` asking for `static_ip` in the first range.
fn add_static(pools: &[PoolRef], attachment: Attachment, static_ip: &str) -> AddRequest {
    let mut req = add(pools, attachment);
    let offset = req.ranges[0].pool.range.cidr.offset_of(ip(static_ip));
    req.ranges[0].requested = Some(offset.expect("inside the range"));
    req
}

fn attachment_req(pools: &[PoolRef], container: &str) -> AttachmentRequest {
    AttachmentRequest {
        cni_network: "contract".into(),
        network_name: String::new(),
        container_id: container.into(),
        ifname: "net1".into(),
        pools: pools.to_vec(),
        node_slice_size: None,
        hints: Hints::default(),
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

fn held(store: &dyn Store, pools: &[PoolRef], container: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = store
        .check(&attachment_req(pools, container))
        .unwrap()
        .into_iter()
        .map(|l| l.ip)
        .collect();
    out.sort();
    out
}

// ---- the behaviours ----

fn repeated_add_and_recreated_pod(open: Opener) {
    let store = open("repeated");
    let p = [pool("10.10.0.0/24")];
    let first = store.add(&add(&p, who("c1", "a"))).unwrap();
    assert_eq!(first, ips(&["10.10.0.1"]));
    assert_eq!(store.add(&add(&p, who("c1", "a"))).unwrap(), first);
    // A new sandbox of the same pod: the same address, now held by the new container.
    assert_eq!(store.add(&add(&p, who("c1-new", "a"))).unwrap(), first);
    assert_eq!(held(&*store, &p, "c1-new"), first);
    assert!(held(&*store, &p, "c1").is_empty());
    assert_eq!(
        store.add(&add(&p, who("c2", "b"))).unwrap(),
        ips(&["10.10.0.2"])
    );
}

fn static_addresses(open: Opener) {
    let store = open("static");
    let p = [pool("10.11.0.0/24")];
    let got = store
        .add(&add_static(&p, who("c1", "a"), "10.11.0.50"))
        .unwrap();
    assert_eq!(got, ips(&["10.11.0.50"]));
    // Repeated with the same static address: kept.
    let again = store
        .add(&add_static(&p, who("c1", "a"), "10.11.0.50"))
        .unwrap();
    assert_eq!(again, got);
    // Someone else asking for it: in use.
    let err = store
        .add(&add_static(&p, who("c2", "b"), "10.11.0.50"))
        .unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    // A dynamic ADD skips it; the lowest free is still .1.
    assert_eq!(
        store.add(&add(&p, who("c3", "c"))).unwrap(),
        ips(&["10.11.0.1"])
    );
    // A static address held dynamically by another: in use.
    let err = store
        .add(&add_static(&p, who("c4", "d"), "10.11.0.1"))
        .unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
}

fn changing_a_static_address_moves_it(open: Opener) {
    let store = open("move");
    let p = [pool("10.12.0.0/24")];
    store
        .add(&add_static(&p, who("c1", "a"), "10.12.0.10"))
        .unwrap();
    let moved = store
        .add(&add_static(&p, who("c1", "a"), "10.12.0.20"))
        .unwrap();
    assert_eq!(moved, ips(&["10.12.0.20"]));
    assert_eq!(held(&*store, &p, "c1"), moved);
    // The old one is free again.
    let other = store
        .add(&add_static(&p, who("c2", "b"), "10.12.0.10"))
        .unwrap();
    assert_eq!(other, ips(&["10.12.0.10"]));
    // Moving onto a held address is refused, and the old one stays.
    let err = store
        .add(&add_static(&p, who("c1", "a"), "10.12.0.10"))
        .unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    assert_eq!(held(&*store, &p, "c1"), moved);
}

fn overlapping_ranges(open: Opener) {
    let store = open("overlap");
    let wide = [pool("10.13.0.0/24")];
    let narrow = [pool("10.13.0.0/25")];
    store.add(&add(&wide, who("c1", "a"))).unwrap();
    store.add(&add(&wide, who("c2", "b"))).unwrap();
    // On (the default): unique across the network's ranges, lowest free, no spreading.
    assert_eq!(
        store.add(&add(&narrow, who("c3", "c"))).unwrap(),
        ips(&["10.13.0.3"])
    );
    // A static address held through the overlapping range: in use.
    let err = store
        .add(&add_static(&narrow, who("c4", "d"), "10.13.0.1"))
        .unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    // Off: each range on its own.
    let other = [pool("10.13.0.0/26")];
    let mut req = add(&other, who("c5", "e"));
    req.overlap = false;
    assert_eq!(store.add(&req).unwrap(), ips(&["10.13.0.1"]));
    // One ADD with two overlapping ranges: an address for each, never one twice (the second
    // range would find the first's reservation the ADD's own); the same again when repeated.
    let both = [pool("10.13.1.0/24"), pool("10.13.1.0/25")];
    let got = store.add(&add(&both, who("c6", "f"))).unwrap();
    assert_eq!(got, ips(&["10.13.1.1", "10.13.1.2"]));
    assert_eq!(store.add(&add(&both, who("c6", "f"))).unwrap(), got);
}

/// An ADD that fails in one of its ranges leaves every range as it was. A pod re-created under
/// its name (a new sandbox) whose ADD finds a range added since full keeps its first range's
/// address under its old sandbox: the runtime's DEL of the failed sandbox releases nothing, and
/// the next try gets the address again.
fn a_failed_add_leaves_a_kept_address_as_it_was(open: Opener) {
    let store = open("failedadd");
    let first = [pool("10.24.0.0/24")];
    store.add(&add(&first, who("c0", "x"))).unwrap();
    let kept = store.add(&add(&first, who("c1", "a"))).unwrap();
    assert_eq!(kept, ips(&["10.24.0.2"]));
    // The lowest address is free again: a freed sticky address would be given another one.
    store.del(&attachment_req(&first, "c0")).unwrap();
    let both = [first[0].clone(), filled(&*store, "10.24.1.0/30")];
    refused_exhausted(store.add(&add(&both, who("c2", "a"))));
    assert!(store.del(&attachment_req(&both, "c2")).unwrap().is_empty());
    assert_eq!(held(&*store, &first, "c1"), kept);
    assert_eq!(store.add(&add(&first, who("c3", "a"))).unwrap(), kept);
}

/// Asserts that an ADD was refused because its static address is someone else's.
fn refused_in_use(result: Result<Vec<IpAddr>, StoreError>) {
    let err = result.unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
}

/// Asserts that an ADD was refused because a range of it is full.
fn refused_exhausted(result: Result<Vec<IpAddr>, StoreError>) {
    let err = result.unwrap_err();
    assert!(matches!(err, StoreError::Exhausted { .. }), "{err}");
}

/// The pool of the /30 `range`, its two addresses held by two other pods.
fn filled(store: &dyn Store, range: &str) -> PoolRef {
    let full = pool(range);
    for (container, pod) in [("f1", "f1"), ("f2", "f2")] {
        let req = add(std::slice::from_ref(&full), who(container, pod));
        store.add(&req).unwrap();
    }
    full
}

/// The static `ip` taken through `old` by `first`, then through `new` by `second`, a later
/// sandbox of the same pod (a range edited since).
fn held_through_both(
    store: &dyn Store,
    (old, new): (&[PoolRef], &[PoolRef]),
    (first, second): (Attachment, Attachment),
    ip: &str,
) -> Vec<IpAddr> {
    store.add(&add_static(old, first, ip)).unwrap();
    store.add(&add_static(new, second, ip)).unwrap()
}

/// A static address the attachment holds through another range of the network (the range
/// edited since its ADD) is its own, not someone else's: the pod's new sandbox asking for it
/// through the new range gets it, nobody else can take it through either range, and the old
/// sandbox's DEL frees only what that sandbox held.
fn a_static_address_its_owner_holds_through_another_range(open: Opener) {
    let store = open("staticown");
    let (old, new) = ([pool("10.25.0.0/24")], [pool("10.25.0.0/25")]);
    let ranges = (&old[..], &new[..]);
    let got = held_through_both(
        &*store,
        ranges,
        (who("c1", "a"), who("c2", "a")),
        "10.25.0.9",
    );
    assert_eq!(got, ips(&["10.25.0.9"]));
    refused_in_use(store.add(&add_static(&new, who("c3", "b"), "10.25.0.9")));
    assert_eq!(store.del(&attachment_req(&old, "c1")).unwrap().len(), 1);
    assert_eq!(held(&*store, &new, "c2"), got);
    refused_in_use(store.add(&add_static(&old, who("c4", "d"), "10.25.0.9")));
    // Edited back: the pod's next sandbox keeps the old range's entry, and the DEL of the
    // sandbox that held the address through the new range leaves it reserved for the pod.
    let other = "10.25.0.10";
    held_through_both(&*store, ranges, (who("c5", "e"), who("c6", "e")), other);
    let kept = store.add(&add_static(&old, who("c7", "e"), other)).unwrap();
    assert_eq!(kept, ips(&[other]));
    assert_eq!(store.del(&attachment_req(&new, "c6")).unwrap().len(), 1);
    refused_in_use(store.add(&add_static(&new, who("c8", "f"), other)));
    // Held through both ranges, by two sandboxes: a later sandbox naming both ranges keeps
    // what the pod holds in each, the address twice (etcd writes its reservation once).
    let fourth = "10.25.0.12";
    held_through_both(&*store, ranges, (who("c12", "i"), who("c13", "i")), fourth);
    let both = [old[0].clone(), new[0].clone()];
    let twice = store
        .add(&add_static(&both, who("c14", "i"), fourth))
        .unwrap();
    assert_eq!(twice, ips(&[fourth, fourth]));
}

/// A pod's next sandbox whose ADD fails in a full range leaves what the pod holds through
/// other ranges of the network as it was: asked for through the new range, the address stays
/// with the sandbox that holds it through the old one; kept through the old range while a
/// later sandbox holds it through the new one, its reservation stays with that later sandbox,
/// so the old sandbox's DEL does not free an address in use.
fn a_failed_add_leaves_what_its_pod_holds_through_another_range(open: Opener) {
    let store = open("staticownfailed");
    let (old, new) = ([pool("10.25.0.0/24")], [pool("10.25.0.0/25")]);
    let full = filled(&*store, "10.25.1.0/30");
    let third = "10.25.0.11";
    store.add(&add_static(&old, who("c9", "g"), third)).unwrap();
    let new_and_full = [new[0].clone(), full.clone()];
    refused_exhausted(store.add(&add_static(&new_and_full, who("c10", "g"), third)));
    store.del(&attachment_req(&new_and_full, "c10")).unwrap();
    refused_in_use(store.add(&add_static(&new, who("c11", "h"), third)));

    let fifth = "10.25.0.13";
    let ranges = (&old[..], &new[..]);
    held_through_both(&*store, ranges, (who("c15", "j"), who("c16", "j")), fifth);
    let old_and_full = [old[0].clone(), full];
    refused_exhausted(store.add(&add_static(&old_and_full, who("c17", "j"), fifth)));
    store.del(&attachment_req(&old_and_full, "c17")).unwrap();
    assert_eq!(store.del(&attachment_req(&old, "c15")).unwrap().len(), 1);
    assert_eq!(held(&*store, &new, "c16"), ips(&[fifth]));
    refused_in_use(store.add(&add_static(&old, who("c18", "k"), fifth)));
}

/// What the pod's earlier sandbox holds through another range of the network is not free for
/// a dynamic ADD of its next sandbox: it gets the next address (only a static ask takes it).
fn a_dynamic_add_passes_over_what_its_pod_holds_through_another_range(open: Opener) {
    let store = open("dynown");
    let (old, new) = ([pool("10.26.0.0/24")], [pool("10.26.0.0/25")]);
    let first = store.add(&add(&old, who("c1", "a"))).unwrap();
    assert_eq!(first, ips(&["10.26.0.1"]));
    let next = store.add(&add(&new, who("c2", "a"))).unwrap();
    assert_eq!(next, ips(&["10.26.0.2"]));
}

fn network_name_scopes_pools(open: Opener) {
    let store = open("netname");
    let blue = [pool_in("blue", "10.14.0.0/24", &[])];
    let red = [pool_in("red", "10.14.0.0/24", &[])];
    let req = add_in("blue", &blue, who("c1", "a"));
    assert_eq!(store.add(&req).unwrap(), ips(&["10.14.0.1"]));
    let req = add_in("red", &red, who("c2", "b"));
    assert_eq!(store.add(&req).unwrap(), ips(&["10.14.0.1"]));
}

/// Network `a` with `2001:db8::/64` and network `a-2001` with `db8::/64` share the pool name
/// `a-2001-db8---64`. An engine may refuse the second, but never answer it with an address
/// outside its range, nor disturb the first's; each one's addresses can be released.
fn a_pool_name_two_networks_share(open: Opener) {
    let store = open("samename");
    let first = [pool_in("a", "2001:db8::/64", &[])];
    let second = [pool_in("a-2001", "db8::/64", &[])];
    assert_eq!(first[0].name, second[0].name);
    let req = add_in("a", &first, who("c1", "a"));
    assert_eq!(store.add(&req).unwrap(), ips(&["2001:db8::1"]));
    let req = add_in("a-2001", &second, who("c2", "b"));
    let second_cidr = second[0].range.cidr;
    match store.add(&req) {
        Ok(got) => {
            assert!(got.len() == 1 && second_cidr.contains(got[0]), "{got:?}");
            let mut req = attachment_req(&second, "c2");
            req.network_name = "a-2001".into();
            let got: Vec<IpAddr> = store.check(&req).unwrap().iter().map(|l| l.ip).collect();
            assert_eq!(got.len(), 1);
            assert!(second_cidr.contains(got[0]), "{got:?} outside db8::/64");
            // Cleanup and the operator's release find it, though the pool's first record is
            // the other network's.
            let released = store.release(&second[0].name, got[0], None).unwrap();
            assert_eq!(released.map(|a| a.ip), Some(got[0]));
        }
        Err(err @ (StoreError::Config { .. } | StoreError::Io { .. })) => {
            eprintln!("refused: {err}");
        }
        Err(err) => panic!("{err}"),
    }
    let mut req = attachment_req(&first, "c1");
    req.network_name = "a".into();
    let got: Vec<IpAddr> = store.check(&req).unwrap().iter().map(|l| l.ip).collect();
    assert_eq!(got, ips(&["2001:db8::1"]));
}

/// A re-created pod attached through another network configuration of the same range keeps
/// its address; GC of the configuration it came through before does not free it.
fn gc_follows_a_kept_address_to_its_new_network(open: Opener) {
    let store = open("gcmoved");
    let p = [pool("10.16.0.0/24")];
    let mut req = add(&p, who("c1", "db-0"));
    req.cni_network = "net-a".into();
    assert_eq!(store.add(&req).unwrap(), ips(&["10.16.0.1"]));
    let mut req = add(&p, who("c2", "db-0"));
    req.cni_network = "net-b".into();
    assert_eq!(store.add(&req).unwrap(), ips(&["10.16.0.1"]));
    let gc = |cni_network: &str, valid: &[&str]| GcRequest {
        cni_network: cni_network.into(),
        network_name: String::new(),
        pools: p.to_vec(),
        valid: valid
            .iter()
            .map(|c| (c.to_string(), "net1".into()))
            .collect(),
        node: Some("node-a".into()),
        node_slice_size: None,
    };
    assert_eq!(store.gc(&gc("net-a", &[])).unwrap(), []);
    assert_eq!(store.gc(&gc("net-b", &["c2"])).unwrap(), []);
    assert_eq!(held(&*store, &p, "c2"), ips(&["10.16.0.1"]));
}

fn exhaustion(open: Opener) {
    let store = open("exhaust");
    let p = [pool("10.15.0.0/30")];
    store.add(&add(&p, who("c1", "a"))).unwrap();
    store.add(&add(&p, who("c2", "b"))).unwrap();
    let err = store.add(&add(&p, who("c3", "c"))).unwrap_err();
    assert!(matches!(err, StoreError::Exhausted { .. }), "{err}");
    // A repeated ADD of a holder still succeeds in a full range.
    assert_eq!(
        store.add(&add(&p, who("c1", "a"))).unwrap(),
        ips(&["10.15.0.1"])
    );
}

fn del_and_check(open: Opener) {
    let store = open("delcheck");
    let p = [pool("10.16.0.0/24"), pool("fd16::/120")];
    let got = store.add(&add(&p, who("c1", "a"))).unwrap();
    assert_eq!(got, ips(&["10.16.0.1", "fd16::1"]));
    assert_eq!(held(&*store, &p, "c1"), got);
    let released = store.del(&attachment_req(&p, "c1")).unwrap();
    assert_eq!(released.len(), 2);
    assert!(held(&*store, &p, "c1").is_empty());
    // DEL of what is gone already: success.
    assert!(store.del(&attachment_req(&p, "c1")).unwrap().is_empty());
    assert_eq!(store.add(&add(&p, who("c2", "b"))).unwrap(), got);
}

/// A release of one address while its holder holds it (an operator's `release`, the cleanup's
/// verdict on one allocation) frees that address only: the holder's address in its other range
/// (dual stack) stays. Named with another holder, nothing goes.
fn release_while_held_frees_one_address(open: Opener) {
    let store = open("releaseone");
    let p = [pool("10.21.0.0/24"), pool("fd21::/120")];
    let got = store.add(&add(&p, who("c1", "a"))).unwrap();
    let listed = store.allocations(None).unwrap();
    let v4 = listed.iter().find(|a| a.ip == got[0]).unwrap();
    let new_sandbox = who("c2", "a");
    let refused = store.release(&v4.pool, v4.ip, Some(&new_sandbox)).unwrap();
    assert_eq!(refused, None);
    let released = store
        .release(&v4.pool, v4.ip, Some(&v4.attachment))
        .unwrap();
    assert_eq!(released.map(|r| r.ip), Some(got[0]));
    assert_eq!(held(&*store, &p, "c1"), [got[1]]);
}

fn del_releases_unconfigured_ranges(open: Opener) {
    let store = open("delall");
    let before = [pool("10.17.0.0/24"), pool("10.18.0.0/24")];
    store.add(&add(&before, who("c1", "a"))).unwrap();
    // The configuration lost its second range before the DEL.
    let after = [pool("10.17.0.0/24")];
    let released = store.del(&attachment_req(&after, "c1")).unwrap();
    assert_eq!(released.len(), 2);
    assert_eq!(
        store.add(&add(&before, who("c2", "b"))).unwrap(),
        ips(&["10.17.0.1", "10.18.0.1"])
    );
}

fn gc_keeps_valid_attachments(open: Opener) {
    let store = open("gc");
    let p = [pool("10.19.0.0/24")];
    store.add(&add(&p, who("c1", "a"))).unwrap();
    store.add(&add(&p, who("c2", "b"))).unwrap();
    let released = store
        .gc(&GcRequest {
            cni_network: "contract".into(),
            network_name: String::new(),
            pools: p.to_vec(),
            valid: vec![("c2".into(), "net1".into())],
            node: Some("node-a".into()),
            node_slice_size: None,
        })
        .unwrap();
    let released: Vec<IpAddr> = released.into_iter().map(|l| l.ip).collect();
    assert_eq!(released, ips(&["10.19.0.1"]));
    assert_eq!(held(&*store, &p, "c2"), ips(&["10.19.0.2"]));
    assert!(held(&*store, &p, "c1").is_empty());
}

fn range_edits_between_adds(open: Opener) {
    let store = open("edits");
    let p = [pool("10.20.0.0/24")];
    store.add(&add(&p, who("c1", "a"))).unwrap();
    // The admin excludes the first addresses: a holder keeps its address, newcomers skip them.
    let edited = [pool_in("", "10.20.0.0/24", &["10.20.0.0/29"])];
    assert_eq!(
        store.add(&add(&edited, who("c1", "a"))).unwrap(),
        ips(&["10.20.0.1"])
    );
    assert_eq!(
        store.add(&add(&edited, who("c2", "b"))).unwrap(),
        ips(&["10.20.0.8"])
    );
}

/// IPv4 bounds (`range_start`-`range_end`), an exclusion inside them and a gateway on the first
/// address: every engine hands out the addresses left, lowest first, and then none.
fn bounds_gateway_and_exclusions(open: Opener) {
    let store = open("bounds");
    let mut bounded = pool_in("", "10.22.0.9-10.22.0.13/24", &["10.22.0.11"]);
    let gateway = ip("10.22.0.9");
    bounded.range = Range::resolve(&bounded.spec, Some(gateway)).unwrap();
    bounded.gateway = Some(gateway);
    let p = [bounded];
    let mut got = Vec::new();
    for (container, pod) in [("c1", "a"), ("c2", "b"), ("c3", "c")] {
        got.extend(store.add(&add(&p, who(container, pod))).unwrap());
    }
    assert_eq!(got, ips(&["10.22.0.10", "10.22.0.12", "10.22.0.13"]));
    let err = store.add(&add(&p, who("c4", "d"))).unwrap_err();
    assert!(matches!(err, StoreError::Exhausted { .. }), "{err}");
}

/// Overlapping ranges of one network whose ADDs disagree on `enable_overlapping_ranges`: an
/// ADD that takes no part writes no reservation and looks at none, so an ADD that takes part
/// through an overlapping range cannot see its address (as upstream's reservations).
fn overlap_taken_part_in_by_some_adds_only(open: Opener) {
    let store = open("overlapmix");
    let (wide, narrow) = ([pool("10.23.0.0/24")], [pool("10.23.0.0/25")]);
    let apart = |pools: &[PoolRef], attachment| AddRequest {
        overlap: false,
        ..add(pools, attachment)
    };
    assert_eq!(
        store.add(&apart(&wide, who("c1", "a"))).unwrap(),
        ips(&["10.23.0.1"])
    );
    assert_eq!(
        store.add(&add(&narrow, who("c2", "b"))).unwrap(),
        ips(&["10.23.0.1"])
    );
    assert_eq!(
        store.add(&apart(&narrow, who("c3", "c"))).unwrap(),
        ips(&["10.23.0.2"])
    );
}

fn ipv6_beyond_63_bits(open: Opener) {
    let store = open("v6");
    let p = [pool("fd20::8000:0:0:5-fd20::ffff:ffff:ffff:fff0/64")];
    assert_eq!(
        store.add(&add(&p, who("c1", "a"))).unwrap(),
        ips(&["fd20::8000:0:0:5"])
    );
    let got = store
        .add(&add_static(&p, who("c2", "b"), "fd20::ffff:0:0:1"))
        .unwrap();
    assert_eq!(got, ips(&["fd20::ffff:0:0:1"]));
}

/// One behaviour: its name and the function checking it.
type Behaviour = (&'static str, fn(Opener));

const BEHAVIOURS: &[Behaviour] = &[
    (
        "repeated_add_and_recreated_pod",
        repeated_add_and_recreated_pod,
    ),
    ("static_addresses", static_addresses),
    (
        "changing_a_static_address_moves_it",
        changing_a_static_address_moves_it,
    ),
    ("overlapping_ranges", overlapping_ranges),
    (
        "a_failed_add_leaves_a_kept_address_as_it_was",
        a_failed_add_leaves_a_kept_address_as_it_was,
    ),
    (
        "a_static_address_its_owner_holds_through_another_range",
        a_static_address_its_owner_holds_through_another_range,
    ),
    (
        "a_failed_add_leaves_what_its_pod_holds_through_another_range",
        a_failed_add_leaves_what_its_pod_holds_through_another_range,
    ),
    (
        "a_dynamic_add_passes_over_what_its_pod_holds_through_another_range",
        a_dynamic_add_passes_over_what_its_pod_holds_through_another_range,
    ),
    ("network_name_scopes_pools", network_name_scopes_pools),
    (
        "a_pool_name_two_networks_share",
        a_pool_name_two_networks_share,
    ),
    (
        "gc_follows_a_kept_address_to_its_new_network",
        gc_follows_a_kept_address_to_its_new_network,
    ),
    ("exhaustion", exhaustion),
    ("del_and_check", del_and_check),
    (
        "release_while_held_frees_one_address",
        release_while_held_frees_one_address,
    ),
    (
        "del_releases_unconfigured_ranges",
        del_releases_unconfigured_ranges,
    ),
    ("gc_keeps_valid_attachments", gc_keeps_valid_attachments),
    ("range_edits_between_adds", range_edits_between_adds),
    (
        "bounds_gateway_and_exclusions",
        bounds_gateway_and_exclusions,
    ),
    ("ipv6_beyond_63_bits", ipv6_beyond_63_bits),
    (
        "overlap_taken_part_in_by_some_adds_only",
        overlap_taken_part_in_by_some_adds_only,
    ),
];

/// Runs every behaviour against `engine`, each with a fresh store from `open`; a behaviour the
/// engine is known to answer differently is skipped with its reason.
fn run_contract(engine: Engine, open: &dyn Fn(&str, &str) -> Box<dyn Store>) {
    let mut failures = Vec::new();
    for (name, behaviour) in BEHAVIOURS {
        if let Some(why) = differs(engine, name) {
            eprintln!("{engine:?}: {name} differs by design: {why}");
            continue;
        }
        let opener = |hint: &str| open(name, hint);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| behaviour(&opener)));
        if outcome.is_err() {
            failures.push(*name);
        }
    }
    assert!(failures.is_empty(), "{engine:?} fails: {failures:?}");
}

#[test]
fn contract_local() {
    let dir = tempfile::tempdir().unwrap();
    run_contract(Engine::Local, &|name, _| {
        let path = dir.path().join(format!("{name}.db"));
        whereabouts::store::local::open(&path).unwrap()
    });
}

#[test]
fn contract_etcd() {
    if !etcd_cluster::etcd_available() {
        eprintln!("\n*** SKIPPED: no etcd-server ***\n");
        return;
    }
    let cluster = etcd_cluster::Cluster::start(false);
    let cfg = load_with_flat_files(
        Some(&json!({
            "type": "whereabouts",
            "datastore": "etcd",
            "etcd_host": cluster.endpoints(),
            "range": "10.0.0.0/24",
        })),
        &[],
    )
    .unwrap();
    let Datastore::Etcd(etcd) = &cfg.datastore else {
        panic!("etcd datastore expected");
    };
    run_contract(Engine::Etcd, &|name, _| {
        let prefix = format!("/contract/{name}");
        whereabouts::store::etcd::open_with(&cfg, etcd, Default::default(), &prefix).unwrap()
    });
}

#[test]
fn contract_kubernetes() {
    let plane = real_cluster!();
    let dir = tempfile::tempdir().unwrap();
    run_contract(Engine::Kubernetes, &|name, _| {
        let ns = plane.namespace(&name.replace('_', "-"));
        let kubeconfig: PathBuf = ns.kubeconfig(dir.path());
        let cfg = load_with_flat_files(
            Some(&json!({
                "type": "whereabouts",
                "range": "10.0.0.0/24",
                "kubernetes": {"kubeconfig": kubeconfig.display().to_string()},
            })),
            &[],
        )
        .unwrap();
        let Datastore::Kubernetes(k) = &cfg.datastore else {
            panic!("kubernetes datastore expected");
        };
        whereabouts::store::kubernetes::open(&cfg, k).unwrap()
    });
}
