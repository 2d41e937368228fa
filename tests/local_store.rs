//! The embedded SQLite engine through its library interface: allocation order, ownership,
//! static addresses, overlapping ranges, DEL/CHECK/GC, big pools and 128-bit offsets.

use std::net::IpAddr;
use std::path::Path;

use whereabouts::ipam::names::pool_name;
use whereabouts::ipam::{parse_exclude, parse_range_text, Range, RangeSpec};
use whereabouts::store::local::{self, LocalStore};
use whereabouts::store::{
    AddRequest, Attachment, AttachmentRequest, GcRequest, Hints, PoolRef, RangeRequest, Store,
    StoreError,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pool_in(network: &str, range: &str, start: Option<&str>, exclude: &[&str]) -> PoolRef {
    let (cidr, s, e) = parse_range_text(range).unwrap();
    let spec = RangeSpec {
        cidr,
        start: start.map(ip).or(s),
        end: e,
        exclude: exclude.iter().map(|x| parse_exclude(x).unwrap()).collect(),
    };
    PoolRef {
        name: pool_name(&cidr, network, None),
        range: Range::resolve(&spec, None).unwrap(),
        spec,
        gateway: None,
    }
}

fn pool(range: &str) -> PoolRef {
    pool_in("", range, None, &[])
}

fn who(container: &str, pod: Option<&str>) -> Attachment {
    Attachment {
        container_id: container.into(),
        ifname: "eth0".into(),
        pod_ref: pod.map(str::to_string),
        pod_uid: pod.map(|p| format!("uid-{p}")),
    }
}

fn add_req(network: &str, pools: &[&PoolRef], attachment: Attachment) -> AddRequest {
    AddRequest {
        cni_network: "net".into(),
        network_name: network.into(),
        overlap: true,
        attachment,
        ranges: pools
            .iter()
            .map(|p| RangeRequest {
                pool: (*p).clone(),
                requested: None,
            })
            .collect(),
        node_slice_size: None,
        sleep_for_race: 0,
        node: Some("node-a".into()),
    }
}

fn del_req(pools: &[&PoolRef], container: &str) -> AttachmentRequest {
    AttachmentRequest {
        cni_network: "net".into(),
        network_name: String::new(),
        container_id: container.into(),
        ifname: "eth0".into(),
        pools: pools.iter().map(|p| (*p).clone()).collect(),
        node_slice_size: None,
        hints: Hints::default(),
    }
}

fn add1(store: &dyn Store, pool: &PoolRef, container: &str) -> IpAddr {
    store
        .add(&add_req("", &[pool], who(container, None)))
        .unwrap()[0]
}

fn fresh() -> (tempfile::TempDir, Box<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = local::open(&dir.path().join("wb.db")).unwrap();
    (dir, store)
}

fn audit(path: &Path) {
    let problems = LocalStore::open(path).unwrap().audit().unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn lowest_free_first_and_freed_addresses_come_back() {
    let (dir, store) = fresh();
    let p = pool("192.168.1.1/24");
    for (i, want) in ["192.168.1.1", "192.168.1.2", "192.168.1.3", "192.168.1.4"]
        .iter()
        .enumerate()
    {
        assert_eq!(add1(&*store, &p, &format!("c{i}")), ip(want));
    }
    assert_eq!(store.del(&del_req(&[&p], "c1")).unwrap().len(), 1);
    assert_eq!(add1(&*store, &p, "c9"), ip("192.168.1.2"));
    assert_eq!(add1(&*store, &p, "c10"), ip("192.168.1.5"));
    audit(&dir.path().join("wb.db"));
}

#[test]
fn exclusions_and_upstream_vectors() {
    let (_dir, store) = fresh();
    let cases: &[(&str, Option<&str>, &[&str], &str)] = &[
        ("192.168.0.0/29", None, &["192.168.0.0/30"], "192.168.0.4"),
        ("192.168.0.0/29", None, &["192.168.0.1"], "192.168.0.2"),
        ("100::2:1/125", None, &["100::2:1/126"], "100::2:4"),
        ("100::2:1/125", None, &["100::2:1"], "100::2:2"),
        ("2001:db8::/30", None, &["2001:db8::0/32"], "2001:db9::"),
        (
            "192.168.0.0/28",
            None,
            &[
                "192.168.0.0/30",
                "192.168.0.6/31",
                "192.168.0.8/31",
                "192.168.0.4/30",
            ],
            "192.168.0.10",
        ),
        ("caa5::/112", None, &[], "caa5::1"),
        ("::1/126", None, &[], "::1"),
        ("fd::1/116", None, &[], "fd::1"),
    ];
    for (i, (range, start, exclude, want)) in cases.iter().enumerate() {
        let p = pool_in(&format!("v{i}"), range, *start, exclude);
        let got = store
            .add(&add_req(&format!("v{i}"), &[&p], who("c", None)))
            .unwrap();
        assert_eq!(got, vec![ip(want)], "{range} exclude {exclude:?}");
    }

    // Vector 14: .4-.6 reserved and .0/30 excluded leave nothing.
    let p = pool_in(
        "v14",
        "192.168.0.0/29",
        Some("192.168.0.0"),
        &["192.168.0.0/30"],
    );
    for c in ["a", "b", "c"] {
        store.add(&add_req("v14", &[&p], who(c, None))).unwrap();
    }
    let err = store
        .add(&add_req("v14", &[&p], who("d", None)))
        .unwrap_err();
    assert!(matches!(err, StoreError::Exhausted { .. }), "{err}");
}

/// Two pairs of network name and range can give one pool name (`2001` with `db8::/64`,
/// none with `2001:db8::/64`): the second is refused while the first holds an address, and
/// takes the name once it holds none, whichever came first on the node.
#[test]
fn a_pool_name_two_networks_share_goes_to_the_one_asking_once_empty() {
    let (dir, store) = fresh();
    let squatter = pool_in("2001", "db8::/64", None, &[]);
    let owner = pool_in("", "2001:db8::/64", None, &[]);
    assert_eq!(squatter.name, owner.name);
    let by = |network: &str, pool: &PoolRef, container: &str| {
        let pod = format!("ns/{container}");
        store.add(&add_req(network, &[pool], who(container, Some(&pod))))
    };
    by("2001", &squatter, "a").unwrap();
    let refused = by("", &owner, "b").unwrap_err();
    assert!(matches!(refused, StoreError::Config { .. }), "{refused:?}");
    store.del(&del_req(&[&squatter], "a")).unwrap();
    assert_eq!(by("", &owner, "b").unwrap(), [ip("2001:db8::1")]);
    assert!(by("2001", &squatter, "c").is_err());
    audit(&dir.path().join("wb.db"));
}

#[test]
fn exhausted_names_the_range() {
    let (dir, store) = fresh();
    let p = pool("10.9.0.0/30");
    add1(&*store, &p, "a");
    add1(&*store, &p, "b");
    let err = store.add(&add_req("", &[&p], who("c", None))).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Exhausted { .. }));
    assert!(text.contains("10.9.0.0/30"), "{text}");
    assert!(text.contains("10.9.0.1-10.9.0.2"), "{text}");
    assert_eq!(whereabouts::cni::error::CniError::from(err).code, 100);
    assert_eq!(store.allocations(None).unwrap().len(), 2);
    audit(&dir.path().join("wb.db"));
}

#[test]
fn repeated_add_is_idempotent_and_updates_the_container() {
    let (_dir, store) = fresh();
    let p = pool("10.1.0.0/24");
    let first = store
        .add(&add_req("", &[&p], who("c1", Some("ns/a"))))
        .unwrap();
    // Same container again, and the same pod from a restarted sandbox.
    let again = store
        .add(&add_req("", &[&p], who("c1", Some("ns/a"))))
        .unwrap();
    let mut restarted = who("c2", Some("ns/a"));
    restarted.pod_uid = Some("uid-new".into());
    let after_restart = store.add(&add_req("", &[&p], restarted)).unwrap();
    assert_eq!(first, again);
    assert_eq!(first, after_restart);
    let allocations = store.allocations(Some(&p.name)).unwrap();
    assert_eq!(allocations.len(), 1);
    assert_eq!(allocations[0].attachment.container_id, "c2");
    assert_eq!(
        allocations[0].attachment.pod_uid.as_deref(),
        Some("uid-new")
    );
    assert_eq!(allocations[0].cni_network.as_deref(), Some("net"));

    // Another interface of the same pod is another attachment.
    let mut net1 = who("c2", Some("ns/a"));
    net1.ifname = "net1".into();
    let second_if = store.add(&add_req("", &[&p], net1)).unwrap();
    assert_ne!(second_if, first);

    // Without a pod reference the container decides.
    let anon = add1(&*store, &p, "x1");
    assert_eq!(add1(&*store, &p, "x1"), anon);
    assert_ne!(add1(&*store, &p, "x2"), anon);

    // DEL with the old container ID releases nothing; with the new one, the address.
    assert!(store.del(&del_req(&[&p], "c1")).unwrap().is_empty());
    let released = store.del(&del_req(&[&p], "c2")).unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].ip, first[0]);
}

#[test]
fn static_addresses_are_reserved() {
    let (dir, store) = fresh();
    let p = pool_in("", "10.2.0.0/24", None, &["10.2.0.0/28"]);
    let mut req = add_req("", &[&p], who("s1", Some("ns/static")));
    // Inside an excluded block: the user asked for it explicitly.
    req.ranges[0].requested = Some(5);
    assert_eq!(store.add(&req).unwrap(), vec![ip("10.2.0.5")]);
    assert_eq!(store.add(&req).unwrap(), vec![ip("10.2.0.5")]);

    let mut thief = add_req("", &[&p], who("s2", Some("ns/other")));
    thief.ranges[0].requested = Some(5);
    let err = store.add(&thief).unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("10.2.0.5") && text.contains("ns/static"),
        "{text}"
    );

    // The dynamic choice skips a static address.
    let q = pool("10.3.0.0/24");
    let mut fixed = add_req("", &[&q], who("s3", None));
    fixed.ranges[0].requested = Some(1);
    store.add(&fixed).unwrap();
    assert_eq!(add1(&*store, &q, "d1"), ip("10.3.0.2"));
    let err = store.add(&{
        let mut r = add_req("", &[&q], who("s4", None));
        r.ranges[0].requested = Some(2);
        r
    });
    assert!(err.unwrap_err().to_string().contains("container d1"));

    // The same owner asking for another address moves: no second address in the range.
    req.ranges[0].requested = Some(200);
    assert_eq!(store.add(&req).unwrap(), vec![ip("10.2.0.200")]);
    let allocations = store.allocations(Some(&p.name)).unwrap();
    assert_eq!(allocations.len(), 1);
    assert_eq!(allocations[0].ip, ip("10.2.0.200"));
    // ...and a dynamic ADD after that returns the static one.
    assert_eq!(
        store
            .add(&add_req("", &[&p], who("s1-new", Some("ns/static"))))
            .unwrap(),
        vec![ip("10.2.0.200")]
    );
    audit(&dir.path().join("wb.db"));
}

#[test]
fn dual_stack_is_all_or_nothing() {
    let (dir, store) = fresh();
    let v4 = pool("10.4.0.0/24");
    let v6 = pool("fd04::/126");
    let both = add_req("", &[&v4, &v6], who("a", None));
    assert_eq!(
        store.add(&both).unwrap(),
        vec![ip("10.4.0.1"), ip("fd04::1")]
    );
    store
        .add(&add_req("", &[&v4, &v6], who("b", None)))
        .unwrap();
    let err = store
        .add(&add_req("", &[&v4, &v6], who("c", None)))
        .unwrap_err();
    assert!(err.to_string().contains("fd04::/126"), "{err}");
    // The IPv4 address chosen before the IPv6 range failed was not kept.
    assert_eq!(store.allocations(Some(&v4.name)).unwrap().len(), 2);
    assert!(store.check(&del_req(&[&v4, &v6], "c")).unwrap().is_empty());
    audit(&dir.path().join("wb.db"));
}

#[test]
fn overlapping_ranges_share_addresses_only_when_asked() {
    let (dir, store) = fresh();
    let wide = pool_in("blue", "10.5.0.0/16", None, &[]);
    let narrow = pool_in("blue", "10.5.0.0/24", None, &[]);
    let mut req = add_req("blue", &[&wide], who("w1", None));
    assert_eq!(store.add(&req).unwrap(), vec![ip("10.5.0.1")]);
    req.attachment = who("w2", None);
    assert_eq!(store.add(&req).unwrap(), vec![ip("10.5.0.2")]);

    // Overlap on (the default): the narrow range skips what the wide one holds.
    let mut n = add_req("blue", &[&narrow], who("n1", None));
    assert_eq!(store.add(&n).unwrap(), vec![ip("10.5.0.3")]);
    // And the wide one skips what the narrow one holds.
    req.attachment = who("w3", None);
    assert_eq!(store.add(&req).unwrap(), vec![ip("10.5.0.4")]);

    // A static request colliding across pools is refused.
    n.attachment = who("n2", None);
    n.ranges[0].requested = Some(1);
    let err = store.add(&n).unwrap_err();
    assert!(err.to_string().contains("container w1"), "{err}");

    // Overlap off: only the own pool counts.
    let mut off = add_req("blue", &[&narrow], who("n3", None));
    off.overlap = false;
    assert_eq!(store.add(&off).unwrap(), vec![ip("10.5.0.1")]);

    // Another network name is another address space even with overlap on.
    let red = pool_in("red", "10.5.0.0/24", None, &[]);
    assert_eq!(
        store
            .add(&add_req("red", &[&red], who("r1", None)))
            .unwrap(),
        vec![ip("10.5.0.1")]
    );
    audit(&dir.path().join("wb.db"));
}

/// The local engine keeps no reservations: an ADD that takes part in overlap checks looks at the
/// overlapping pools' allocations, so it skips even one an ADD that took no part made, where the
/// cluster engines (reservations, as upstream) cannot see it (tests/contract.rs says so too).
#[test]
fn an_add_that_takes_part_skips_what_one_that_did_not_holds() {
    let (dir, store) = fresh();
    let wide = pool_in("", "10.23.0.0/24", None, &[]);
    let narrow = pool_in("", "10.23.0.0/25", None, &[]);
    let apart = |p: &PoolRef, container: &str| {
        let mut req = add_req("", &[p], who(container, None));
        req.overlap = false;
        req
    };
    assert_eq!(store.add(&apart(&wide, "c1")).unwrap(), [ip("10.23.0.1")]);
    let taking_part = add_req("", &[&narrow], who("c2", None));
    assert_eq!(store.add(&taking_part).unwrap(), [ip("10.23.0.2")]);
    assert_eq!(store.add(&apart(&narrow, "c3")).unwrap(), [ip("10.23.0.1")]);
    audit(&dir.path().join("wb.db"));
}

#[test]
fn overlap_collisions_jump_whole_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wb.db");
    let store = LocalStore::open(&path).unwrap();
    let wide = pool_in("g", "10.6.0.0/16", None, &[]);
    // 10.6.0.1 - 10.6.3.232 held by the wide pool, one hole at 10.6.2.0 (offset 512).
    store
        .import(
            &wide,
            "g",
            "net",
            (1..=1000u128)
                .filter(|o| *o != 512)
                .map(|o| (o, who(&format!("bulk{o}"), None))),
        )
        .unwrap();
    // A narrower pool starting inside the wide one: its own offsets differ from the wide one's.
    let narrow = pool_in("g", "10.6.2.0/23", None, &[]);
    let got = store
        .add(&add_req("g", &[&narrow], who("n", None)))
        .unwrap();
    // Offset 0 of the /23 is its network address; 10.6.2.0 of the wide pool is the hole but is
    // not usable in the /23, so the first free one is just after the wide pool's run.
    assert_eq!(got, vec![ip("10.6.3.233")]);
    // The hole is still free for the wide pool.
    assert_eq!(
        store.add(&add_req("g", &[&wide], who("w", None))).unwrap(),
        vec![ip("10.6.2.0")]
    );
    // A pool fully covered by another one's run is exhausted.
    let covered = pool_in("g", "10.6.1.0/24", None, &[]);
    let err = store
        .add(&add_req("g", &[&covered], who("c", None)))
        .unwrap_err();
    assert!(matches!(err, StoreError::Exhausted { .. }), "{err}");
    assert!(store.audit().unwrap().is_empty());
}

#[test]
fn del_releases_in_every_pool_check_only_in_the_requested_ones() {
    let (dir, store) = fresh();
    let old = pool("10.7.0.0/24");
    let new = pool("10.8.0.0/24");
    let v6 = pool("fd07::/64");
    store
        .add(&add_req("", &[&old, &v6], who("c1", None)))
        .unwrap();
    store.add(&add_req("", &[&new], who("c2", None))).unwrap();

    let checked = store.check(&del_req(&[&old], "c1")).unwrap();
    assert_eq!(checked.len(), 1);
    assert_eq!(checked[0].ip, ip("10.7.0.1"));
    assert!(store.check(&del_req(&[&new], "c1")).unwrap().is_empty());

    // The configuration now names only the new pool: DEL must still free the old addresses.
    let released = store.del(&del_req(&[&new], "c1")).unwrap();
    let mut ips: Vec<_> = released.iter().map(|l| l.ip).collect();
    ips.sort();
    assert_eq!(ips, vec![ip("10.7.0.1"), ip("fd07::1")]);
    assert_eq!(released[0].range.to_string(), "10.7.0.0/24");
    // Nothing held: still a success.
    assert!(store.del(&del_req(&[&new], "c1")).unwrap().is_empty());
    assert!(store.del(&del_req(&[&new], "never")).unwrap().is_empty());
    assert_eq!(store.allocations(None).unwrap().len(), 1);
    audit(&dir.path().join("wb.db"));
}

#[test]
fn gc_keeps_valid_attachments_and_other_networks() {
    let (dir, store) = fresh();
    let p = pool("10.10.0.0/24");
    for c in ["keep", "drop1", "drop2"] {
        store.add(&add_req("", &[&p], who(c, None))).unwrap();
    }
    let mut other = add_req("", &[&p], who("elsewhere", None));
    other.cni_network = "other".into();
    store.add(&other).unwrap();
    let gc = GcRequest {
        cni_network: "net".into(),
        network_name: String::new(),
        pools: vec![p.clone()],
        valid: vec![
            ("keep".into(), "eth0".into()),
            ("drop2".into(), "net1".into()),
        ],
        node: Some("node-a".into()),
        node_slice_size: None,
    };
    let mut released: Vec<_> = store
        .gc(&gc)
        .unwrap()
        .into_iter()
        .map(|l| l.attachment.container_id)
        .collect();
    released.sort();
    assert_eq!(released, vec!["drop1", "drop2"]);
    let mut left: Vec<_> = store
        .allocations(None)
        .unwrap()
        .into_iter()
        .map(|l| l.attachment.container_id)
        .collect();
    left.sort();
    assert_eq!(left, vec!["elsewhere", "keep"]);
    assert!(store.gc(&gc).unwrap().is_empty());
    audit(&dir.path().join("wb.db"));
}

#[test]
fn release_and_leases_for_the_cli() {
    let (_dir, store) = fresh();
    let p = pool("10.11.0.0/24");
    add1(&*store, &p, "a");
    add1(&*store, &p, "b");
    assert_eq!(store.allocations(Some("nope")).unwrap().len(), 0);
    let gone = store
        .release(&p.name, ip("10.11.0.1"), None)
        .unwrap()
        .unwrap();
    assert_eq!(gone.attachment.container_id, "a");
    assert_eq!(store.release(&p.name, ip("10.11.0.1"), None).unwrap(), None);
    assert_eq!(store.release(&p.name, ip("10.99.0.1"), None).unwrap(), None);
    assert_eq!(store.release("nope", ip("10.11.0.2"), None).unwrap(), None);
    assert_eq!(add1(&*store, &p, "c"), ip("10.11.0.1"));
}

#[test]
fn a_million_allocations_do_not_slow_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wb.db");
    let store = LocalStore::open(&path).unwrap();
    let eight = pool("10.0.0.0/8");
    let hole = 777_777u128;
    let added = store
        .import(
            &eight,
            "",
            "net",
            (1..=1_000_000u128)
                .filter(|o| *o != hole)
                .map(|o| (o, who(&format!("c{o:07}"), None))),
        )
        .unwrap();
    assert_eq!(added, 999_999);
    assert_eq!(add1(&store, &eight, "x"), eight.range.ip(hole));
    assert_eq!(add1(&store, &eight, "y"), eight.range.ip(1_000_001));
    assert_eq!(add1(&store, &eight, "y"), eight.range.ip(1_000_001));
    store.del(&del_req(&[&eight], "c0500000")).unwrap();
    assert_eq!(add1(&store, &eight, "z"), eight.range.ip(500_000));

    // An IPv6 /64 whose range starts beyond 2^63, with a large block allocated there.
    let far = (1u128 << 63) + 5;
    let v6 = pool_in("", "fd00:64::/64", Some("fd00:64::8000:0:0:5"), &[]);
    assert_eq!(v6.range.first, far);
    let hole = far + 12_345;
    store
        .import(
            &v6,
            "",
            "net",
            (far..far + 40_000)
                .filter(|o| *o != hole)
                .map(|o| (o, who(&format!("v{o:040}"), None))),
        )
        .unwrap();
    assert_eq!(add1(&store, &v6, "first"), ip("fd00:64::8000:0:0:303e"));
    assert_eq!(v6.range.ip(hole), ip("fd00:64::8000:0:0:303e"));
    assert_eq!(add1(&store, &v6, "second"), v6.range.ip(far + 40_000));
    store
        .del(&del_req(&[&v6], &format!("v{:040}", far + 7)))
        .unwrap();
    assert_eq!(add1(&store, &v6, "third"), v6.range.ip(far + 7));
    assert_eq!(store.allocations(Some(&v6.name)).unwrap().len(), 40_001);
}

#[test]
fn offsets_beyond_two_to_the_63() {
    let (dir, store) = fresh();
    // range_start beyond 2^63 in a /64.
    let high = pool_in("", "fd00:1::/64", Some("fd00:1::8000:0:0:1"), &[]);
    assert_eq!(add1(&*store, &high, "a"), ip("fd00:1::8000:0:0:1"));
    assert_eq!(add1(&*store, &high, "b"), ip("fd00:1::8000:0:0:2"));
    // Static addresses at the very top of the /64 and of all of IPv6.
    let mut top = add_req("", &[&high], who("t", None));
    top.ranges[0].requested = Some(u64::MAX as u128 - 1);
    assert_eq!(
        store.add(&top).unwrap(),
        vec![ip("fd00:1::ffff:ffff:ffff:fffe")]
    );
    let all = pool("::/0");
    let mut edge = add_req("", &[&all], who("e", None));
    edge.ranges[0].requested = Some(u128::MAX - 1);
    assert_eq!(
        store.add(&edge).unwrap(),
        vec![ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")]
    );
    edge.attachment = who("e2", None);
    edge.ranges[0].requested = Some(u128::MAX - 2);
    store.add(&edge).unwrap();
    store.del(&del_req(&[&all], "e")).unwrap();
    // Narrow /64 near the end: the last address after a run is exhausted correctly.
    let tail = pool_in("", "fd00:2::/64", Some("fd00:2::ffff:ffff:ffff:fffd"), &[]);
    assert_eq!(add1(&*store, &tail, "x"), ip("fd00:2::ffff:ffff:ffff:fffd"));
    assert_eq!(add1(&*store, &tail, "y"), ip("fd00:2::ffff:ffff:ffff:fffe"));
    assert!(matches!(
        store.add(&add_req("", &[&tail], who("z", None))),
        Err(StoreError::Exhausted { .. })
    ));
    let offsets: Vec<_> = store
        .allocations(Some(&high.name))
        .unwrap()
        .into_iter()
        .map(|l| l.ip)
        .collect();
    assert_eq!(
        offsets,
        vec![
            ip("fd00:1::8000:0:0:1"),
            ip("fd00:1::8000:0:0:2"),
            ip("fd00:1::ffff:ffff:ffff:fffe")
        ]
    );
    audit(&dir.path().join("wb.db"));
}

#[test]
fn status_and_open_errors() {
    let (dir, store) = fresh();
    store.status().unwrap();
    // A nested directory is created.
    let nested = dir.path().join("a/b/c/wb.db");
    local::open(&nested).unwrap().status().unwrap();
    // A parent that is a file cannot hold a database: an I/O error naming the path.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("wb.db");
    let err = local::open(&bad).err().unwrap();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(err.to_string().contains("plain"), "{err}");
    // A file that is not a database.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![b'z'; 8192]).unwrap();
    let err = local::open(&junk).err().unwrap();
    assert!(err.to_string().contains("junk.db"), "{err}");
}

#[test]
fn sleep_for_race_does_not_let_two_adds_collide() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wb.db");
    let p = pool("10.12.0.0/24");
    LocalStore::open(&path).unwrap();
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let path = path.clone();
            let p = p.clone();
            std::thread::spawn(move || {
                let store = local::open(&path).unwrap();
                let mut req = add_req("", &[&p], who(&format!("r{i}"), None));
                req.sleep_for_race = 1;
                store.add(&req).unwrap()[0]
            })
        })
        .collect();
    let mut got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    got.sort();
    assert_eq!(got, vec![ip("10.12.0.1"), ip("10.12.0.2")]);
}

/// Every CNI call opens the database alone and closes it; the write-ahead log must still stay
/// short, or every later call reads all of it when it opens the database.
#[test]
fn the_wal_stays_short_across_many_one_call_processes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("wb.db");
    let p = pool("10.40.0.0/16");
    for i in 0..600 {
        // A fresh connection per call, as each plugin process has.
        let store = LocalStore::open(&db).unwrap();
        let container = format!("c{}", i % 300);
        if i < 300 {
            add1(&store, &p, &container);
        } else {
            store.del(&del_req(&[&p], &container)).unwrap();
        }
    }
    let wal = std::fs::metadata(dir.path().join("wb.db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        wal <= 2 * local::WAL_TRIM_BYTES,
        "the WAL grew to {wal} bytes over 600 calls"
    );
    audit(&db);
}

/// The database and the `-wal` and `-shm` files beside it are their owner's alone, whether the
/// store creates them or finds them readable by all (as an earlier release left them): anyone
/// who could open the `-shm` file could hold the lock every writer needs.
#[test]
fn the_database_files_are_their_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, store) = fresh();
    let p = pool("10.70.0.0/24");
    add1(store.as_ref(), &p, "c1");
    let files = || {
        ["wb.db", "wb.db-wal", "wb.db-shm"]
            .map(|name| dir.path().join(name))
            .into_iter()
            .filter(|f| f.exists())
            .collect::<Vec<_>>()
    };
    let modes = || {
        files()
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().permissions().mode() & 0o777)
            .collect::<Vec<_>>()
    };
    // The write-ahead log is kept between calls.
    assert_eq!(files().len(), 3, "{:?}", files());
    assert_eq!(modes(), [0o600; 3]);
    drop(store);
    for f in files() {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let store = local::open(&dir.path().join("wb.db")).unwrap();
    add1(store.as_ref(), &p, "c2");
    assert_eq!(modes(), [0o600; 3]);
}
