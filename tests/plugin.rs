//! The plugin through the real binary, called the way a runtime calls it.

mod common;

use common::*;
use serde_json::json;

#[test]
fn version_lists_every_supported_version() {
    let reply = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
    let v = reply.ok();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    assert_eq!(
        run(&[("CNI_COMMAND", "VERSION")], "").ok()["cniVersion"],
        "1.1.0"
    );
    let spelled = run(&[("CNI_COMMAND", "VERSION")], r#"{"CNIVersion":"0.3.1"}"#);
    assert_eq!(spelled.ok()["cniVersion"], "0.3.1");
}

#[test]
fn about_goes_to_stderr_without_cni_command() {
    let reply = run::<&str, &str>(&[], "");
    assert_eq!(reply.code, 0);
    assert!(reply.stdout.is_empty(), "{reply:?}");
    assert!(
        reply.stderr.contains("whereabouts") && reply.stderr.contains("1.1.0"),
        "{reply:?}"
    );
}

#[test]
fn result_shape_follows_the_version() {
    for version in [
        "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
    ] {
        let mut net = Net::local(json!({"range": "10.10.0.0/24", "gateway": "10.10.0.1",
            "ipRanges": [{"range": "fd10::/64"}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.10.0.53"]}}));
        net.conf["cniVersion"] = version.into();
        let r = net.add("c1", "eth0").ok();
        assert_eq!(r["cniVersion"], version);
        assert!(r.get("interfaces").is_none());
        assert_eq!(r["dns"]["nameservers"][0], "10.10.0.53");
        if version < "0.3.0" {
            assert_eq!(r["ip4"]["ip"], "10.10.0.2/24", "{version}: {r}");
            assert_eq!(r["ip4"]["gateway"], "10.10.0.1");
            assert_eq!(r["ip4"]["routes"][0]["dst"], "0.0.0.0/0");
            assert_eq!(r["ip6"]["ip"], "fd10::1/64");
            assert!(r.get("ips").is_none());
        } else {
            assert_eq!(ips(&r), ["10.10.0.2/24", "fd10::1/64"], "{version}");
            assert_eq!(r["ips"][0]["gateway"], "10.10.0.1");
            assert!(r["ips"][1].get("gateway").is_none());
            assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
            let versioned = r["ips"][0].get("version").is_some();
            assert_eq!(versioned, version < "1.0.0", "{version}: {r}");
        }
    }
}

#[test]
fn dns_is_always_present_before_1_0_and_omitted_when_empty_after() {
    let mut net = Net::local(json!({"range": "10.11.0.0/24"}));
    net.conf["cniVersion"] = "0.4.0".into();
    assert!(net.add("a", "eth0").ok().get("dns").is_some());
    net.conf["cniVersion"] = "1.0.0".into();
    assert!(net.add("b", "eth0").ok().get("dns").is_none());
}

#[test]
fn cni_versions_negotiates_the_highest_common_version() {
    let mut net = Net::local(json!({"range": "10.12.0.0/24"}));
    net.conf["cniVersion"] = "1.0.0".into();
    net.conf["cniVersions"] = json!(["0.4.0", "1.0.0", "1.1.0", "9.0.0"]);
    assert_eq!(net.add("c1", "eth0").ok()["cniVersion"], "1.1.0");
}

#[test]
fn unsupported_version_is_code_1() {
    let mut net = Net::local(json!({"range": "10.13.0.0/24"}));
    net.conf["cniVersion"] = "7.0.0".into();
    let reply = net.add("c1", "eth0");
    assert_eq!(reply.err_code(), 1);
    assert!(reply.msg().contains("7.0.0"));
}

#[test]
fn bad_json_is_code_6_with_the_position() {
    let reply = run(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ],
        r#"{"cniVersion":"1.0.0","ipam": { asdf }}"#,
    );
    assert_eq!(reply.err_code(), 6);
    assert!(reply.msg().contains("line 1 column"), "{reply:?}");
}

#[test]
fn config_errors_are_code_7_naming_field_and_value() {
    let cases = [
        (
            json!({"range": "10.0.0.0/33"}),
            vec!["ipam.range", "10.0.0.0/33"],
        ),
        (
            json!({"range": "192.168.0.0/29", "exclude": ["192.168.0.1/123"]}),
            vec!["ipam.exclude[0]", "192.168.0.1/123"],
        ),
        (
            json!({"range": "10.0.0.0/24", "range_start": "10.0.1.5"}),
            vec!["10.0.1.5", "10.0.0.0/24"],
        ),
        (
            json!({"range": "10.0.0.0/24", "gateway": "10.0.0.x"}),
            vec!["ipam.gateway", "10.0.0.x"],
        ),
        (
            json!({"range": "10.0.0.0/24", "datastore": "kubernetes"}),
            vec!["kubeconfig"],
        ),
    ];
    for (ipam, needles) in cases {
        let reply = Net::local(ipam.clone()).add("c1", "eth0");
        assert_eq!(reply.err_code(), 7, "{ipam}");
        for needle in needles {
            assert!(
                reply.msg().contains(needle),
                "{ipam}: {:?} lacks {needle}",
                reply.msg()
            );
        }
    }
    let mut net = Net::local(json!({"range": "10.0.0.0/24"}));
    net.conf.as_object_mut().unwrap().remove("ipam");
    let reply = net.add("c1", "eth0");
    assert_eq!(reply.err_code(), 7);
    assert_eq!(reply.msg(), "IPAM config missing 'ipam' key");
}

#[test]
fn missing_variables_are_code_4_naming_them() {
    let net = Net::local(json!({"range": "10.14.0.0/24"}));
    let conf = net.conf.to_string();
    let full = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
    ];
    for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let vars: Vec<_> = full
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let reply = run(&vars, &conf);
        assert_eq!(reply.err_code(), 4, "{missing}");
        assert!(reply.msg().contains(missing), "{reply:?}");
    }
    // DEL may lack CNI_NETNS.
    let vars = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
    ];
    run(&vars, &conf).ok_empty();
    assert_eq!(run(&[("CNI_COMMAND", "FROB")], &conf).err_code(), 4);
}

/// A level Go's plugin ignores (`info`) must not fail the calls of the pods it served.
#[test]
fn an_unknown_log_level_fails_no_call() {
    let net = Net::local(json!({"range": "10.31.0.0/24", "log_level": "info"}));
    let added = net.add("a", "eth0");
    assert_eq!(ips(&added.ok()), ["10.31.0.1/24"]);
    assert!(added.stderr.contains("ipam.log_level"), "{added:?}");
    net.del("a", "eth0").ok_empty();
    assert_eq!(ips(&net.add("b", "eth0").ok()), ["10.31.0.1/24"]);
}

/// A configuration whose `range_start` lies outside its range (Go's plugin ignores it) is
/// refused for ADD, and still releases what its pods hold: a node whose binary is swapped
/// tears down the pods Go's plugin served.
#[test]
fn a_start_outside_the_range_refuses_adds_but_not_dels() {
    let net = Net::local(json!({"range": "10.32.0.0/24"}));
    assert_eq!(ips(&net.add("a", "eth0").ok()), ["10.32.0.1/24"]);
    let mut wrong = net.conf.clone();
    wrong["ipam"]["range_start"] = "10.33.0.1".into();
    assert_eq!(call_with(&wrong, "ADD", "b", "eth0", "").err_code(), 7);
    let del = call_with(&wrong, "DEL", "a", "eth0", "");
    del.ok_empty();
    assert!(del.stderr.contains("without its range_start"), "{del:?}");
    assert_eq!(ips(&net.add("c", "eth0").ok()), ["10.32.0.1/24"]);
}

/// Ranges Go's plugin accepts but which leave nothing to hand out (a /32, a /31) or are listed
/// twice are refused for ADDs only: the DELs of the pods Go served still succeed, and a DEL
/// still releases what the attachment holds.
#[test]
fn a_range_without_addresses_or_listed_twice_refuses_adds_but_not_dels() {
    let net = Net::local(json!({"range": "10.34.0.0/24"}));
    assert_eq!(ips(&net.add("a", "eth0").ok()), ["10.34.0.1/24"]);
    for range in ["10.34.9.9/32", "10.34.9.8/31"] {
        let mut tiny = net.conf.clone();
        tiny["ipam"]["range"] = range.into();
        assert_eq!(
            call_with(&tiny, "ADD", "t", "eth0", "").err_code(),
            7,
            "{range}"
        );
        call_with(&tiny, "DEL", "t", "eth0", "").ok_empty();
    }
    let mut twice = net.conf.clone();
    twice["ipam"]["ipRanges"] = json!([{"range": "10.34.0.0/24"}]);
    assert_eq!(call_with(&twice, "ADD", "b", "eth0", "").err_code(), 7);
    let del = call_with(&twice, "DEL", "a", "eth0", "");
    del.ok_empty();
    assert!(del.stderr.contains("configured twice"), "{del:?}");
    assert_eq!(ips(&net.add("c", "eth0").ok()), ["10.34.0.1/24"]);
}

#[test]
fn exhausted_pool_names_the_range() {
    let net = Net::local(json!({"range": "10.15.0.0/30"}));
    assert_eq!(ips(&net.add("a", "eth0").ok()), ["10.15.0.1/30"]);
    assert_eq!(ips(&net.add("b", "eth0").ok()), ["10.15.0.2/30"]);
    let reply = net.add("c", "eth0");
    assert_eq!(reply.err_code(), 100);
    assert!(reply.msg().contains("10.15.0.0/30"), "{reply:?}");
}

#[test]
fn repeated_add_returns_the_same_address() {
    let net = Net::local(json!({"range": "10.16.0.0/24"}));
    let first = ips(&net.add_pod("c1", "net1", "ns/pod-a").ok());
    // A kubelet restart repeats ADD with a new sandbox: same pod and interface, same address.
    assert_eq!(ips(&net.add_pod("c2", "net1", "ns/pod-a").ok()), first);
    // Another interface of the same pod is another attachment.
    assert_ne!(ips(&net.add_pod("c2", "net2", "ns/pod-a").ok()), first);
    // Without pod information the container and interface identify the attachment.
    let anon = ips(&net.add("c9", "eth0").ok());
    assert_eq!(ips(&net.add("c9", "eth0").ok()), anon);
    // The container ID was updated: DEL with the new one releases it.
    net.del("c2", "net1").ok_empty();
    assert_eq!(ips(&net.add_pod("c3", "net1", "ns/pod-b").ok()), first);
}

/// A network configuration written `"IPAM"` (or `"Name"`, `"RuntimeConfig"`) works with the
/// runtime's plugins and with upstream's, whose decoder matches keys in any case: a node that
/// swaps binaries keeps serving it.
#[test]
fn the_network_configurations_keys_are_read_in_any_case() {
    let net = Net::local(json!({"range": "10.18.0.0/24"}));
    let mut conf = net.conf.clone();
    let map = conf.as_object_mut().unwrap();
    let ipam = map.remove("ipam").unwrap();
    map.insert("IPAM".into(), ipam);
    map.insert("RuntimeConfig".into(), json!({"IPs": ["10.18.0.9/24"]}));
    assert_eq!(
        ips(&call_with(&conf, "ADD", "a", "eth0", "").ok()),
        ["10.18.0.9/24"]
    );
    // The same pool as the configuration spelled as the specification spells it.
    let taken = net.call("ADD", "b", "eth0", "IgnoreUnknown=1;IP=10.18.0.9");
    assert_eq!(taken.err_code(), 101, "{taken:?}");
    call_with(&conf, "DEL", "a", "eth0", "").ok_empty();
    let freed = net.call("ADD", "b", "eth0", "IgnoreUnknown=1;IP=10.18.0.9");
    assert_eq!(ips(&freed.ok()), ["10.18.0.9/24"]);
}

#[test]
fn del_releases_and_is_idempotent() {
    let net = Net::local(json!({"range": "10.17.0.0/24", "ipRanges": [{"range": "fd17::/120"}]}));
    let a = ips(&net.add("a", "eth0").ok());
    net.add("b", "eth0").ok();
    net.del("a", "eth0").ok_empty();
    net.del("a", "eth0").ok_empty();
    net.del("never-seen", "eth0").ok_empty();
    // Lowest free first: the released addresses come back, in both ranges.
    assert_eq!(ips(&net.add("c", "eth0").ok()), a);
}

#[test]
fn check_fails_when_nothing_is_recorded() {
    let net = Net::local(json!({"range": "10.18.0.0/24"}));
    net.add("a", "eth0").ok();
    net.call("CHECK", "a", "eth0", "").ok_empty();
    net.del("a", "eth0").ok_empty();
    let reply = net.call("CHECK", "a", "eth0", "");
    assert_eq!(reply.err_code(), 102);
    assert!(reply.msg().contains("10.18.0.0/24"));
}

/// CHECK consults prevResult, as the CNI specification asks: an address the runtime was given
/// inside a configured range must still be the attachment's; others (a static address outside
/// every range, another plugin's) are not this plugin's to check.
#[test]
fn check_compares_the_addresses_of_prev_result() {
    let net = Net::local(json!({"range": "10.31.0.0/24"}));
    net.add("a", "eth0").ok();
    let with_prev = |addresses: &[&str]| {
        let mut conf = net.conf.clone();
        let ips: Vec<_> = addresses.iter().map(|a| json!({"address": a})).collect();
        conf["prevResult"] = json!({"cniVersion": "1.1.0", "ips": ips});
        call_with(&conf, "CHECK", "a", "eth0", "")
    };
    with_prev(&["10.31.0.1/24", "192.0.2.7/24"]).ok_empty();
    let reply = with_prev(&["10.31.0.9/24"]);
    assert_eq!(reply.err_code(), 102, "{reply:?}");
    assert!(reply.msg().contains("10.31.0.9"), "{reply:?}");
}

#[test]
fn gc_releases_what_is_not_valid() {
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let mut net = Net::local(json!({"range": "10.19.0.0/24"}));
        for c in ["a", "b", "c"] {
            net.add(c, "eth0").ok();
        }
        // Another network in the same store is out of GC's reach.
        let other = net.sibling("othernet", json!({"range": "10.20.0.0/24"}));
        call_with(&other, "ADD", "z", "eth0", "").ok();
        net.conf[key] = json!([{"containerID": "b", "ifname": "eth0"}]);
        net.call("GC", "", "", "").ok_empty();
        net.conf.as_object_mut().unwrap().remove(key);
        // a (.1) and c (.3) were freed: the next two ADDs get them back; b keeps .2.
        assert_eq!(ips(&net.add("d", "eth0").ok()), ["10.19.0.1/24"], "{key}");
        assert_eq!(ips(&net.add("e", "eth0").ok()), ["10.19.0.3/24"], "{key}");
        assert_eq!(ips(&net.add("b", "eth0").ok()), ["10.19.0.2/24"], "{key}");
        assert_eq!(
            ips(&call_with(&other, "ADD", "z", "eth0", "").ok()),
            ["10.20.0.1/24"]
        );
    }
}

/// A list of valid attachments written as `null` (what a runtime written in Go sends for a
/// network with no pod left on the node: a nil list) names none: everything of the network
/// goes, as with `[]`.
#[test]
fn gc_with_a_null_list_releases_everything_of_the_network() {
    let mut net = Net::local(json!({"range": "10.29.0.0/24"}));
    net.add("a", "eth0").ok();
    net.conf["cni.dev/valid-attachments"] = serde_json::Value::Null;
    net.call("GC", "", "", "").ok_empty();
    net.conf
        .as_object_mut()
        .unwrap()
        .remove("cni.dev/valid-attachments");
    assert_eq!(ips(&net.add("b", "eth0").ok()), ["10.29.0.1/24"]);
}

/// A pod's own `cni-args` that do not read (Multus passes them on unchecked) fail its ADD,
/// never its DEL: what it holds is released.
#[test]
fn unreadable_static_addresses_fail_the_add_but_not_the_del() {
    let net = Net::local(json!({"range": "10.30.0.0/24"}));
    net.add("a", "eth0").ok();
    let mut conf = net.conf.clone();
    conf["args"] = json!({"cni": {"ips": "10.30.0.5"}});
    let reply = call_with(&conf, "ADD", "b", "eth0", "");
    assert_eq!(reply.err_code(), 6, "{reply:?}");
    assert!(reply.msg().contains("args.cni.ips"), "{reply:?}");
    call_with(&conf, "DEL", "a", "eth0", "").ok_empty();
    assert_eq!(ips(&net.add("c", "eth0").ok()), ["10.30.0.1/24"]);
}

#[test]
fn gc_and_status_need_1_1_0_and_check_0_4_0() {
    let mut net = Net::local(json!({"range": "10.21.0.0/24"}));
    net.conf["cniVersion"] = "1.0.0".into();
    assert_eq!(net.call("GC", "", "", "").err_code(), 1);
    assert_eq!(net.call("STATUS", "", "", "").err_code(), 1);
    // CHECK came with 0.4.0.
    net.conf["cniVersion"] = "0.3.1".into();
    assert_eq!(net.call("CHECK", "a", "eth0", "").err_code(), 1);
    // From 0.4.0 CHECK runs: an attachment never added is "not recorded" (102), not a version
    // error.
    net.conf["cniVersion"] = "0.4.0".into();
    assert_eq!(net.call("CHECK", "a", "eth0", "").err_code(), 102);
}

#[test]
fn status_reports_an_unusable_store_as_code_50() {
    let net = Net::local(json!({"range": "10.22.0.0/24"}));
    net.call("STATUS", "", "", "").ok_empty();
    // A database path below a regular file cannot be created.
    let blocker = net.path().join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    let bad = Net::local(json!({"range": "10.22.0.0/24", "local_path": blocker.join("db.sqlite")}));
    let reply = bad.call("STATUS", "", "", "");
    assert_eq!(reply.err_code(), 50);
    assert!(reply.msg().contains("ipam.local_path"), "{reply:?}");
    assert!(!reply.msg().contains("not-a-dir"), "{reply:?}");
    assert!(reply.stderr.contains("not-a-dir"), "{reply:?}");
    // A configuration every ADD would refuse: not available either, and why.
    let refused = Net::local(json!({"range": "10.22.0.0/33"}));
    let reply = refused.call("STATUS", "", "", "");
    assert_eq!(reply.err_code(), 50);
    assert!(reply.msg().contains("range"), "{reply:?}");
}

/// A database a newer binary wrote (after a downgrade) is broken for this one: ADD and STATUS
/// fail, naming it, while DEL succeeds so that pods' teardown is not held until the newer
/// binary is back.
#[test]
fn a_database_of_a_newer_schema_lets_del_through() {
    let net = Net::local(json!({"range": "10.27.0.0/24"}));
    assert_eq!(ips(&net.add("a", "eth0").ok()), ["10.27.0.1/24"]);
    let db = rusqlite::Connection::open(net.db()).unwrap();
    db.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(db);
    let reply = net.call("ADD", "b", "eth0", "");
    assert_eq!(reply.err_code(), 5, "{reply:?}");
    assert!(reply.msg().contains("newer"), "{reply:?}");
    assert_eq!(net.call("STATUS", "", "", "").err_code(), 50);
    net.call("DEL", "a", "eth0", "").ok_empty();
}

#[test]
fn static_addresses_are_reserved() {
    let net = Net::local(
        json!({"range": "10.23.0.0/24", "addresses": [{"address": "192.0.2.10/24", "gateway": "192.0.2.1"}]}),
    );
    // runtimeConfig.ips inside the range replaces the dynamic choice; outside addresses are returned as-is.
    let mut conf = net.conf.clone();
    conf["runtimeConfig"] = json!({"ips": ["10.23.0.7/24"]});
    let r = call_with(&conf, "ADD", "a", "eth0", &pod_args("team-a/holder")).ok();
    assert_eq!(ips(&r), ["10.23.0.7/24", "192.0.2.10/24"]);
    assert_eq!(r["ips"][1]["gateway"], "192.0.2.1");
    // Another pod cannot take it, by CNI_ARGS IP= either. The holder may be another tenant's
    // pod: the reply does not name it, the log does.
    let reply = net.call("ADD", "b", "eth0", "IgnoreUnknown=1;IP=10.23.0.7");
    assert_eq!(reply.err_code(), 101);
    assert!(reply.msg().contains("10.23.0.7"), "{reply:?}");
    let asked = format!("{};IP=10.23.0.7", pod_args("team-b/asker"));
    let reply = net.call("ADD", "b", "eth1", &asked);
    assert_eq!(reply.err_code(), 101);
    assert!(!reply.msg().contains("team-a"), "{reply:?}");
    assert!(reply.stderr.contains("team-a/holder"), "{reply:?}");
    // Dynamic allocation skips it.
    for expected in [
        "10.23.0.1/24",
        "10.23.0.2/24",
        "10.23.0.3/24",
        "10.23.0.4/24",
        "10.23.0.5/24",
        "10.23.0.6/24",
        "10.23.0.8/24",
    ] {
        let c = format!("dyn-{}", bare(expected));
        assert_eq!(ips(&net.add(&c, "eth0").ok())[0], expected);
    }
    // Released with its attachment.
    call_with(&conf, "DEL", "a", "eth0", "").ok_empty();
    let r = net.call("ADD", "b", "eth0", "IgnoreUnknown=1;IP=10.23.0.7/24");
    assert_eq!(ips(&r.ok())[0], "10.23.0.7/24");
}

/// `args.cni.ips` is the pod's own say (Multus fills it from the pod's `cni-args` whatever the
/// network configuration declares): inside a range's `range_start..range_end` it is reserved
/// like any static address. Outside that window (where admins keep routers and appliances) it
/// is refused; the network configuration's own static addresses (CNI_ARGS `IP`) may lie there.
#[test]
fn a_pods_own_address_must_lie_within_range_start_and_range_end() {
    let net = Net::local(
        json!({"range": "10.27.0.0/24", "range_start": "10.27.0.100",
                                "range_end": "10.27.0.200"}),
    );
    let mut conf = net.conf.clone();
    for (below_or_above, container) in [("10.27.0.2/24", "a"), ("10.27.0.201/24", "b")] {
        conf["args"] = json!({"cni": {"ips": [below_or_above]}});
        let reply = call_with(&conf, "ADD", container, "eth0", "");
        assert_eq!(reply.err_code(), 7, "{below_or_above}: {reply:?}");
        assert!(reply.msg().contains("range_start"), "{reply:?}");
    }
    conf["args"] = json!({"cni": {"ips": ["10.27.0.150/24"]}});
    assert_eq!(
        ips(&call_with(&conf, "ADD", "c", "eth0", "").ok()),
        ["10.27.0.150/24"]
    );
    let r = net.call("ADD", "d", "eth0", "IgnoreUnknown=1;IP=10.27.0.2/24");
    assert_eq!(ips(&r.ok()), ["10.27.0.2/24"]);

    // A range inside another's CIDR, with a window of its own: the address is its.
    let net = Net::local(json!({"ipRanges": [
        {"range": "10.28.0.0/16", "range_start": "10.28.0.10", "range_end": "10.28.0.50"},
        {"range": "10.28.5.0/24", "range_start": "10.28.5.100", "range_end": "10.28.5.200"}]}));
    let mut conf = net.conf.clone();
    conf["args"] = json!({"cni": {"ips": ["10.28.5.150/24"]}});
    let r = call_with(&conf, "ADD", "e", "eth0", "").ok();
    assert!(ips(&r).contains(&"10.28.5.150/24".to_string()), "{r}");
}

/// Outside every range, the pod's own address is refused, or a pod could take its segment's
/// router address.
#[test]
fn a_pods_own_address_must_lie_in_a_range() {
    let net = Net::local(json!({"range": "10.25.0.0/24"}));
    let mut conf = net.conf.clone();
    conf["args"] = json!({"cni": {"ips": ["192.0.2.1/24"]}});
    let reply = call_with(&conf, "ADD", "a", "eth0", "");
    assert_eq!(reply.err_code(), 7);
    assert!(reply.msg().contains("args.cni.ips"), "{reply:?}");
    conf["args"] = json!({"cni": {"ips": ["10.25.0.9/24"]}});
    assert_eq!(
        ips(&call_with(&conf, "ADD", "a", "eth0", "").ok()),
        ["10.25.0.9/24"]
    );
    // The network configuration's own addresses may lie outside.
    let mut conf = net.conf.clone();
    conf["ipam"]["addresses"] = json!([{"address": "192.0.2.10/24"}]);
    let r = call_with(&conf, "ADD", "b", "eth0", "").ok();
    assert_eq!(ips(&r), ["10.25.0.1/24", "192.0.2.10/24"]);
}

/// A static address inside a range is answered with the gateway it was asked with.
#[test]
fn a_static_address_keeps_its_gateway() {
    let net = Net::local(json!({"range": "10.26.0.0/24"}));
    let r = net
        .call(
            "ADD",
            "a",
            "eth0",
            "IgnoreUnknown=1;IP=10.26.0.5;GATEWAY=10.26.0.254",
        )
        .ok();
    assert_eq!(ips(&r), ["10.26.0.5/24"]);
    assert_eq!(r["ips"][0]["gateway"], "10.26.0.254");
    let mut conf = net.conf.clone();
    conf["ipam"]["addresses"] = json!([{"address": "10.26.0.50/24", "gateway": "10.26.0.1"}]);
    let r = call_with(&conf, "ADD", "b", "eth0", "").ok();
    assert_eq!(ips(&r), ["10.26.0.50/24"]);
    assert_eq!(r["ips"][0]["gateway"], "10.26.0.1");
}

#[test]
fn overlapping_ranges_share_uniqueness_within_a_network_name() {
    let net = Net::local(json!({"range": "10.24.0.0/24", "network_name": "blue"}));
    let wide = net.sibling(
        "wide",
        json!({"range": "10.24.0.0/16", "network_name": "blue"}),
    );
    let a = ips(&net.add("a", "eth0").ok());
    let b = ips(&call_with(&wide, "ADD", "b", "eth0", "").ok());
    assert_eq!(bare(&a[0]), "10.24.0.1");
    assert_eq!(
        bare(&b[0]),
        "10.24.0.2",
        "overlapping range must skip 10.24.0.1"
    );
    // Without overlap protection, the same address can be handed out twice.
    let mut loose = net.sibling(
        "loose",
        json!({"range": "10.24.0.0/16", "network_name": "blue"}),
    );
    loose["ipam"]["enable_overlapping_ranges"] = false.into();
    let c = ips(&call_with(&loose, "ADD", "c", "eth0", "").ok());
    assert_eq!(bare(&c[0]), "10.24.0.1");
    // A different network name is a separate pool.
    let red = net.sibling(
        "red",
        json!({"range": "10.24.0.0/24", "network_name": "red"}),
    );
    assert_eq!(
        bare(&ips(&call_with(&red, "ADD", "d", "eth0", "").ok())[0]),
        "10.24.0.1"
    );
}

#[test]
fn ipv6_offsets_beyond_2_pow_63() {
    let net = Net::local(json!({"range": "fd25::/64", "range_start": "fd25::ffff:ffff:ffff:fff0"}));
    assert_eq!(
        ips(&net.add("a", "eth0").ok()),
        ["fd25::ffff:ffff:ffff:fff0/64"]
    );
    assert_eq!(
        ips(&net.add("b", "eth0").ok()),
        ["fd25::ffff:ffff:ffff:fff1/64"]
    );
}

#[test]
fn exclusions_gateway_and_leading_zeros() {
    let net = Net::local(json!({"range": "00192.00168.26.5-000000192.168.26.25/24",
        "exclude": ["192.168.26.6/31", "192.168.26.9"], "gateway": "192.168.26.5"}));
    let got: Vec<String> = (0..4)
        .map(|i| ips(&net.add(&format!("c{i}"), "eth0").ok())[0].clone())
        .collect();
    assert_eq!(
        got,
        [
            "192.168.26.8/24",
            "192.168.26.10/24",
            "192.168.26.11/24",
            "192.168.26.12/24"
        ]
    );
}

#[test]
fn log_file_receives_the_logs() {
    let net = Net::local(json!({"range": "10.27.0.0/24", "log_level": "debug"}));
    let log = net.path().join("plugin.log");
    let mut conf = net.conf.clone();
    conf["ipam"]["log_file"] = log.to_string_lossy().into();
    let reply = call_with(&conf, "ADD", "a", "eth0", "");
    reply.ok();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("10.27.0.1"), "{text}");
    assert!(
        !reply.stderr.contains("10.27.0.1"),
        "logs went to stderr too: {}",
        reply.stderr
    );
}

#[test]
fn an_engine_not_reachable_is_an_error_not_a_panic() {
    // Inside the folder the flat file allows (the trust screen lets it through), below a
    // regular file: the local engine cannot create its database there.
    let mut net = Net::local(json!({"range": "10.28.0.0/24"}));
    let blocker = net.path().join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    net.conf["ipam"]["local_path"] = blocker.join("nope.db").to_string_lossy().into();
    let reply = net.add("a", "eth0");
    // An I/O failure of the engine (5), not the plugin's defect (999) nor a refused
    // configuration (7).
    assert_eq!(reply.err_code(), 5, "{reply:?}");
    assert!(!reply.stderr.contains("panicked"), "{reply:?}");
    // The reply names the field and the kind of failure; the path, the admin's, is the log's
    // (with the system's own words).
    let msg = reply.msg();
    assert!(msg.contains("local database"), "{reply:?}");
    assert!(msg.contains("<ipam.local_path's folder>"), "{reply:?}");
    assert!(msg.contains("entity already exists"), "{reply:?}");
    assert!(!msg.contains(&*blocker.to_string_lossy()), "{reply:?}");
    assert!(
        reply.stderr.contains(&*blocker.to_string_lossy()),
        "{reply:?}"
    );
    assert!(reply.stderr.contains("File exists"), "{reply:?}");
    assert!(!msg.contains("allow_inline_paths"), "{reply:?}");
}

/// The README's first command, after its build step, run as written (with this build's binary and
/// a temporary folder in place of /tmp): it prints what the README says it prints, twice.
#[test]
fn the_readme_quick_start_prints_what_the_readme_says() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let build = "cargo build --release && ";
    let line = readme
        .lines()
        .find(|l| l.contains(build))
        .expect("the quick start line");
    let dir = tempfile::tempdir().unwrap();
    // The folder first: the binary's own path may lie below /tmp.
    let command = line[line.find(build).unwrap() + build.len()..]
        .replace("/tmp/", &format!("{}/", dir.path().display()))
        .replace("./target/release/whereabouts", bin());
    let promised = readme
        .split("The first command prints `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("the README names the output");
    for _ in 0..2 {
        let out = std::process::Command::new("bash")
            .args(["-c", &command])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .expect("run bash");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), promised);
    }
}

/// The plugin-only build (what the installer puts on hosts with the node agent) is the same
/// plugin for the local engine: VERSION, ADD, CHECK, DEL and GC on the store the full binary
/// uses, each seeing what the other wrote. Without a CNI command it says what it is.
#[test]
fn the_plugin_only_build_serves_the_local_engine_as_the_full_binary_does() {
    let plugin_only = env!("CARGO_BIN_EXE_whereabouts-plugin");
    let net = Net::local(json!({"range": "10.21.0.0/24"}));
    let by = |bin, command, container| call_bin(bin, &net.conf, command, container, "eth0", "");
    let version = |bin| run_bin(bin, &[("CNI_COMMAND", "VERSION")], "").ok();
    assert_eq!(version(plugin_only), version(bin()));

    assert_eq!(ips(&by(plugin_only, "ADD", "a").ok()), ["10.21.0.1/24"]);
    by(bin(), "CHECK", "a").ok_empty();
    assert_eq!(ips(&by(bin(), "ADD", "b").ok()), ["10.21.0.2/24"]);
    by(plugin_only, "CHECK", "b").ok_empty();
    by(plugin_only, "DEL", "a").ok_empty();
    assert_eq!(by(bin(), "CHECK", "a").err_code(), 102);
    let mut gc = net.conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    call_bin(plugin_only, &gc, "GC", "", "", "").ok_empty();
    assert_eq!(by(bin(), "CHECK", "b").err_code(), 102);
    assert_eq!(ips(&by(bin(), "ADD", "c").ok()), ["10.21.0.1/24"]);

    let about = run_bin::<&str, &str>(plugin_only, &[], "");
    assert_eq!(about.code, 0, "{about:?}");
    assert!(about.stderr.contains("plugin-only build"), "{about:?}");
    let command = std::process::Command::new(plugin_only)
        .arg("agent")
        .output()
        .unwrap();
    assert_eq!(command.status.code(), Some(2), "{command:?}");
    assert!(String::from_utf8_lossy(&command.stderr).contains("full binary"));
}
