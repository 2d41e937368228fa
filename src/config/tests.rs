//! The configuration vectors of upstream's tests, and our own validation cases.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::*;

fn load(ipam: Value) -> Result<IpamConfig, ConfigError> {
    load_with_flat_files(Some(&ipam), &[])
}

/// The message the runtime gets for a configuration refused as invalid (CNI code 7).
fn err(ipam: Value) -> String {
    let e = crate::cni::error::CniError::from(load(ipam).unwrap_err());
    assert_eq!(e.code, 7, "{}", e.msg);
    e.msg
}

#[test]
fn dash_range_sets_start_and_end() {
    let cfg = load(json!({"type": "whereabouts", "range": "192.168.1.5-192.168.1.25/24"})).unwrap();
    let r = &cfg.ranges[0];
    assert_eq!(r.cidr.to_string(), "192.168.1.0/24");
    assert_eq!(r.start.unwrap().to_string(), "192.168.1.5");
    assert_eq!(r.end.unwrap().to_string(), "192.168.1.25");
    assert_eq!(
        cfg.datastore,
        Datastore::Local {
            path: DEFAULT_LOCAL_PATH.into()
        }
    );
    assert!(cfg.enable_overlapping_ranges);
}

#[test]
fn ipv4_mapped_range_is_an_ipv4_range() {
    let cfg = load(
        json!({"type": "whereabouts", "range": "::ffff:10.0.0.0/120",
        "ipRanges": [{"range": "::ffff:10.1.0.0/112", "range_start": "::ffff:10.1.0.9",
        "exclude": ["::ffff:10.1.0.16/124"]}], "gateway": "::ffff:10.0.0.1"}),
    )
    .unwrap();
    assert_eq!(cfg.ranges[0].cidr.to_string(), "10.0.0.0/24");
    assert_eq!(cfg.ranges[1].cidr.to_string(), "10.1.0.0/16");
    assert_eq!(cfg.ranges[1].start.unwrap().to_string(), "10.1.0.9");
    assert_eq!(cfg.ranges[1].exclude[0].to_string(), "10.1.0.16/28");
    assert_eq!(cfg.gateway.unwrap().to_string(), "10.0.0.1");
}

#[test]
fn flat_file_fills_what_inline_leaves_empty() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("whereabouts.conf");
    std::fs::write(
        &flat,
        r#"{"kubernetes":{"kubeconfig":"/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
            "log_file":"/var/log/whereabouts.log","log_level":"debug","gateway":"192.168.5.5"}"#,
    )
    .unwrap();
    let cfg = load(json!({
        "type": "whereabouts", "configuration_path": flat,
        "range": "192.168.2.230/24", "range_start": "192.168.2.223", "gateway": "192.168.10.1"
    }))
    .unwrap();
    assert_eq!(cfg.ranges[0].cidr.to_string(), "192.168.2.0/24");
    assert_eq!(cfg.ranges[0].start.unwrap().to_string(), "192.168.2.223");
    assert_eq!(cfg.gateway.unwrap().to_string(), "192.168.10.1");
    assert_eq!(
        cfg.log_file,
        Some(PathBuf::from("/var/log/whereabouts.log"))
    );
    assert_eq!(cfg.log_level, Some(LogLevel::Debug));
    assert_eq!(
        cfg.datastore,
        Datastore::Kubernetes(KubernetesConfig {
            kubeconfig: "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig".into(),
            namespace: None,
        })
    );
    // configuration_path may also name the folder holding whereabouts.conf.
    let by_dir = load(
        json!({"type": "whereabouts", "configuration_path": dir.path(), "range": "10.0.0.0/24"}),
    )
    .unwrap();
    assert_eq!(by_dir.log_level, Some(LogLevel::Debug));
}

#[test]
fn overlapping_ranges_flag_is_inline_only() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("f.conf");
    let with_file = |file_value: bool, inline: Option<bool>| {
        std::fs::write(
            &flat,
            json!({"enable_overlapping_ranges": file_value}).to_string(),
        )
        .unwrap();
        let mut ipam =
            json!({"type": "whereabouts", "range": "10.0.0.0/24", "configuration_path": flat});
        if let Some(v) = inline {
            ipam["enable_overlapping_ranges"] = v.into();
        }
        load(ipam).unwrap().enable_overlapping_ranges
    };
    assert!(with_file(false, Some(true)));
    assert!(!with_file(true, Some(false)));
    assert!(with_file(false, None));
}

#[test]
fn missing_flat_file_is_not_an_error() {
    let cfg = load_with_flat_files(
        Some(&json!({"type": "whereabouts", "range": "10.0.0.0/24", "configuration_path": "/nonexistent/x.conf"})),
        &[PathBuf::from("/nonexistent/y.conf")],
    )
    .unwrap();
    assert_eq!(cfg.ranges.len(), 1);
}

#[test]
fn unparsable_flat_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("bad.conf");
    std::fs::write(&flat, "{ nope").unwrap();
    let msg =
        err(json!({"type": "whereabouts", "range": "10.0.0.0/24", "configuration_path": flat}));
    assert!(msg.contains("bad.conf"), "{msg}");
}

#[test]
fn not_ours_or_missing() {
    assert!(err(json!({"type": "static"})).contains("static"));
    let missing = load_with_flat_files(None, &[]).unwrap_err();
    assert_eq!(missing.to_string(), "IPAM config missing 'ipam' key");
}

#[test]
fn keys_are_case_insensitive() {
    let cfg = load(
        json!({"Type": "whereabouts", "RANGE": "10.0.0.0/24", "Network_Name": "blue",
        "IPRanges": [{"Range": "fd00::/64", "Exclude": ["fd00::1"]}]}),
    )
    .unwrap();
    assert_eq!(cfg.network_name, "blue");
    assert_eq!(cfg.ranges.len(), 2);
    assert_eq!(cfg.ranges[1].exclude.len(), 1);
}

/// Keys match as Go's decoder matches them, under Unicode case folding: KELVIN SIGN is `k`,
/// LONG S is `s` (a Go node reads `networK_name` as `network_name`, so this node must too).
#[test]
fn keys_fold_as_upstreams_decoder_folds_them() {
    let cfg = load(json!({"type": "whereabouts", "range": "10.0.0.0/24",
        "networ\u{212A}_name": "blue", "range_\u{17F}tart": "10.0.0.9"}))
    .unwrap();
    assert_eq!(cfg.network_name, "blue");
    assert_eq!(cfg.ranges[0].start.unwrap().to_string(), "10.0.0.9");
}

/// Two keys of one object naming the same field: Go's decoder takes the later in the
/// document, an order the parse does not keep, so reading either could differ from a Go
/// node's reading (another pool, another range). Refused, naming both; in a range too.
#[test]
fn keys_naming_the_same_field_are_refused() {
    let msg = err(json!({"type": "whereabouts", "range": "10.0.0.0/24",
        "network_name": "a", "Network_name": "b"}));
    assert!(
        msg.contains("Network_name") && msg.contains("network_name"),
        "{msg}"
    );
    let msg = err(
        json!({"type": "whereabouts", "ipRanges": [{"range": "10.0.0.0/24",
        "range_start": "10.0.0.5", "range_\u{17F}tart": "10.0.0.9"}]}),
    );
    assert!(msg.contains("same field"), "{msg}");
}

#[test]
fn top_level_range_comes_first() {
    let cfg = load(json!({"type": "whereabouts", "ipRanges": [{"range": "10.1.0.0/24"}], "range": "10.0.0.0/24"})).unwrap();
    let cidrs: Vec<String> = cfg.ranges.iter().map(|r| r.cidr.to_string()).collect();
    assert_eq!(cidrs, ["10.0.0.0/24", "10.1.0.0/24"]);
}

#[test]
fn bad_values_are_named() {
    let base = |k: &str, v: Value| {
        let mut ipam = json!({"type": "whereabouts", "range": "192.168.0.0/29"});
        ipam[k] = v;
        err(ipam)
    };
    assert!(base("range", "192.168.1.5-192.168.2.25/28".into())
        .contains("invalid range start for CIDR 192.168.2.16/28: 192.168.1.5"));
    let m = base("range", "10.0.0.0/33".into());
    assert!(m.contains("ipam.range") && m.contains("10.0.0.0/33"), "{m}");
    let m = base("exclude", json!(["192.168.0.1/123"]));
    assert!(
        m.contains("ipam.exclude[0]") && m.contains("192.168.0.1/123"),
        "{m}"
    );
    let m = base("range_start", "192.168.0.300".into());
    assert!(
        m.contains("ipam.range_start") && m.contains("192.168.0.300"),
        "{m}"
    );
    let m = base("range_start", "10.0.0.1".into());
    assert!(
        m.contains("10.0.0.1") && m.contains("192.168.0.0/29"),
        "{m}"
    );
    let m = base("gateway", "nope".into());
    assert!(m.contains("ipam.gateway") && m.contains("nope"), "{m}");
    let m = base("exclude", "192.168.0.1".into());
    assert!(m.contains("ipam.exclude"), "{m}");
    let m = base("datastore", "redis".into());
    assert!(m.contains("redis"), "{m}");
    let m = base("node_slice_size", "/x".into());
    assert!(m.contains("node_slice_size"), "{m}");
    let m = err(
        json!({"type": "whereabouts", "ipRanges": [{"range": "100::2:1/125", "exclude": ["100::2::1"]}]}),
    );
    assert!(
        m.contains("ipam.ipRanges[0].exclude[0]") && m.contains("100::2::1"),
        "{m}"
    );
    let m = err(json!({"type": "whereabouts", "range": "192.168.0.0/31"}));
    assert!(m.contains("no usable"), "{m}");
    let m = err(json!({"type": "whereabouts"}));
    assert!(m.contains("range"), "{m}");
    let m = err(
        json!({"type": "whereabouts", "range": "10.0.0.0/24", "ipRanges": [{"range": "10.0.0.7/24"}]}),
    );
    assert!(m.contains("twice"), "{m}");
    let m = err(json!({"type": "whereabouts", "range": "10.0.0.0/24", "datastore": "etcd"}));
    assert!(m.contains("etcd_host"), "{m}");
}

/// Go's plugin ignores a level it does not know: configurations written for it carry `info`.
#[test]
fn an_unknown_log_level_is_a_warning() {
    let range = json!({"type": "whereabouts", "range": "10.0.0.0/24"});
    let with = |level: Value| {
        let mut ipam = range.clone();
        ipam["log_level"] = level;
        load(ipam)
    };
    let cfg = with("info".into()).unwrap();
    assert_eq!(cfg.log_level, None);
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(
        cfg.warnings[0].contains("ipam.log_level"),
        "{:?}",
        cfg.warnings
    );
    let cfg = with("Verbose".into()).unwrap();
    assert_eq!(
        (cfg.log_level, cfg.warnings.len()),
        (Some(LogLevel::Verbose), 0)
    );
    // Go's decoder refuses a level that is not text: so does this one.
    assert!(
        err(json!({"type": "whereabouts", "range": "10.0.0.0/24", "log_level": 3}))
            .contains("ipam.log_level")
    );
}

/// A range's narrowing keys that an ADD refuses (Go's plugin ignores a start outside the
/// range, and checks exclusions only when it allocates) are left out, with a warning, for the
/// calls that release: the pods a configuration served keep being torn down.
#[test]
fn wrong_narrowing_keys_refuse_adds_only() {
    use super::load::{load_inner, Caller, Narrowing};
    let to_release = |ipam: Value| load_inner(Some(&ipam), &[], Caller::Admin, Narrowing::Warned);
    let cases = [
        (
            json!({"range": "10.1.0.0/24", "range_start": "10.2.0.1"}),
            "10.1.0.0/24",
        ),
        (
            json!({"range": "10.1.0.0/24", "exclude": ["10.1.0.300/32"]}),
            "10.1.0.0/24",
        ),
        (
            json!({"range": "10.1.0.0/30", "exclude": ["10.1.0.0/30"]}),
            "10.1.0.0/30",
        ),
        (
            json!({"ipRanges": [{"range": "10.3.0.0/24", "range_start": "10.2.0.1",
                "exclude": ["10.3.0.7/32"]}]}),
            "10.3.0.0/24",
        ),
    ];
    for (mut ipam, cidr) in cases {
        ipam["type"] = "whereabouts".into();
        assert!(load(ipam.clone()).is_err(), "{ipam}");
        let cfg = to_release(ipam.clone()).unwrap();
        assert_eq!(cfg.ranges.len(), 1, "{ipam}");
        assert_eq!(cfg.ranges[0].cidr.to_string(), cidr);
        assert!(
            cfg.ranges[0].start.is_none() && cfg.ranges[0].exclude.is_empty(),
            "{ipam}"
        );
        assert_eq!(cfg.warnings.len(), 1, "{ipam}: {:?}", cfg.warnings);
    }
    // Beside ipRanges without a range: nothing to apply them to.
    let beside = json!({"type": "whereabouts", "exclude": ["10.1.0.1/32"],
        "ipRanges": [{"range": "10.1.0.0/24"}]});
    assert!(err(beside.clone()).contains("ipam.exclude"));
    let cfg = to_release(beside).unwrap();
    assert!(cfg.ranges[0].exclude.is_empty());
    assert!(
        cfg.warnings[0].contains("ipam.exclude"),
        "{:?}",
        cfg.warnings
    );
    // The range itself stays required: it names the pool.
    assert!(to_release(json!({"type": "whereabouts", "range": "10.1.0.0/33"})).is_err());
}

#[test]
fn engines_are_selected() {
    let ds = |ipam: Value| load(ipam).unwrap().datastore;
    assert_eq!(
        ds(json!({"type": "whereabouts", "range": "10.0.0.0/24", "local_path": "/tmp/a.db"})),
        Datastore::Local {
            path: "/tmp/a.db".into()
        }
    );
    match ds(
        json!({"type": "whereabouts", "range": "10.0.0.0/24", "datastore": "etcd",
        "etcd_host": "https://a:2379, b:2379", "etcd_username": "u"}),
    ) {
        Datastore::Etcd(e) => {
            assert_eq!(e.endpoints, ["https://a:2379", "b:2379"]);
            assert_eq!(e.username.as_deref(), Some("u"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ds(
            json!({"type": "whereabouts", "range": "10.0.0.0/24", "kubernetes": {"kubeconfig": "/k"}})
        ),
        Datastore::Kubernetes(_)
    ));
}

#[test]
fn statics_routes_and_dns() {
    let cfg = load(json!({"type": "whereabouts", "range": "10.0.0.0/24",
        "addresses": [{"address": "10.0.0.9/24", "gateway": "10.0.0.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
        "dns": {"nameservers": ["10.0.0.53"]}}))
    .unwrap();
    assert_eq!(cfg.addresses[0].address.to_string(), "10.0.0.9/24");
    assert_eq!(cfg.routes[0].gw.as_deref(), Some("10.0.0.1"));
    assert_eq!(cfg.dns.unwrap().nameservers, ["10.0.0.53"]);
    let m = err(
        json!({"type": "whereabouts", "range": "10.0.0.0/24", "addresses": [{"address": "10.0.0.9"}]}),
    );
    assert!(m.contains("ipam.addresses[0].address"), "{m}");
    let m = err(json!({"type": "whereabouts", "range": "10.0.0.0/24", "routes": [{"dst": "x"}]}));
    assert!(m.contains("ipam.routes[0].dst"), "{m}");
}

#[test]
fn kubernetes_engine_without_kubeconfig_defaults_only_for_operators() {
    let ipam = json!({"type": "whereabouts", "range": "10.0.0.0/24", "datastore": "kubernetes"});
    // The plugin must be told where its kubeconfig is.
    assert!(err(ipam.clone()).contains("ipam.kubernetes.kubeconfig is not set"));
    // The operator's commands and the controller take the node's (or, in a pod, the service
    // account when that file is absent: see k8s::cluster::operator_access).
    let cfg = super::load::load_inner(
        Some(&ipam),
        &[],
        super::load::Caller::Operator,
        super::load::Narrowing::Refused,
    )
    .unwrap();
    assert_eq!(
        cfg.datastore,
        Datastore::Kubernetes(KubernetesConfig {
            kubeconfig: DEFAULT_KUBECONFIG.into(),
            namespace: None,
        })
    );
}

/// A flat file `flat` in a fresh folder, and the network configuration's loader using it.
fn untrusted(
    flat: Value,
) -> (
    tempfile::TempDir,
    impl Fn(Value) -> Result<IpamConfig, String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("whereabouts.conf");
    std::fs::write(&file, flat.to_string()).unwrap();
    let load = move |mut ipam: Value| {
        ipam["type"] = "whereabouts".into();
        if ipam.get("range").is_none() {
            ipam["range"] = "10.0.0.0/24".into();
        }
        load_untrusted(Some(&ipam), std::slice::from_ref(&file)).map_err(|e| {
            let e = crate::cni::error::CniError::from(e);
            assert_eq!(e.code, 7, "{}", e.msg);
            e.msg
        })
    };
    (dir, load)
}

/// The node-slice controller makes a NodeSlicePool from the NetworkAttachmentDefinition alone:
/// a slice key the flat file sets is warned about, naming the key.
#[test]
fn slice_keys_from_the_flat_file_are_warned_about() {
    let (_dir, sliced) = untrusted(json!({"network_name": "blue", "node_slice_size": "/28"}));
    let cfg = sliced(json!({})).unwrap();
    assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
    assert!(
        cfg.warnings[0].contains("ipam.network_name"),
        "{:?}",
        cfg.warnings
    );
    assert!(
        cfg.warnings[1].contains("ipam.node_slice_size"),
        "{:?}",
        cfg.warnings
    );
    // Set in the network configuration, the flat file's network name alone is warned about;
    // without node slices, nothing is.
    let cfg = sliced(json!({"node_slice_size": "/28"})).unwrap();
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    let (_dir, named) = untrusted(json!({"network_name": "blue"}));
    assert_eq!(named(json!({})).unwrap().warnings.len(), 0);
}

#[test]
fn a_network_configuration_names_paths_only_inside_allowed_folders() {
    let allowed = tempfile::tempdir().unwrap();
    let inside = allowed.path().join("net.db");
    let (_dir, load) = untrusted(json!({"allow_inline_paths": [allowed.path()]}));
    let cfg = load(json!({"local_path": inside})).unwrap();
    assert_eq!(
        cfg.datastore,
        Datastore::Local {
            path: inside.clone()
        }
    );
    let msg = load(json!({"local_path": "/etc/cron.d/x.db"})).unwrap_err();
    assert!(
        msg.contains("ipam.local_path") && msg.contains("allow_inline_paths"),
        "{msg}"
    );
    let msg = load(json!({"etcd_host": "https://h:2379"})).unwrap_err();
    assert!(msg.contains("etcd_host"), "{msg}");
    let msg = load(json!({"etcd_ca_cert_file": "/root/ca"})).unwrap_err();
    assert!(msg.contains("etcd_ca_cert_file"), "{msg}");
    // Nothing is allowed by default; a log_file is ignored rather than failing every call.
    let (_dir, strict) = untrusted(json!({}));
    assert!(strict(json!({"local_path": inside})).is_err());
    let cfg =
        strict(json!({"log_file": "/root/.ssh/authorized_keys", "sleep_for_race": 9})).unwrap();
    assert_eq!(cfg.log_file, None);
    assert_eq!(cfg.sleep_for_race, 0);
    assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
    // The installer's kubeconfig may be named (upstream's examples do); no other.
    let kubeconfig = "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig";
    assert!(strict(json!({"kubernetes": {"kubeconfig": kubeconfig}})).is_ok());
    let msg =
        strict(json!({"kubernetes": {"kubeconfig": "/var/lib/kubelet/pods/x/k"}})).unwrap_err();
    assert!(msg.contains("ipam.kubernetes.kubeconfig"), "{msg}");
    let msg = strict(json!({"configuration_path": "/tmp/evil.conf"})).unwrap_err();
    assert!(msg.contains("ipam.configuration_path"), "{msg}");
}

#[test]
fn test_hooks_and_log_file_come_from_the_flat_file() {
    let (dir, load) = untrusted(json!({"sleep_for_race": 2}));
    let log = dir.path().join("wb.log");
    std::fs::write(
        dir.path().join("whereabouts.conf"),
        json!({"sleep_for_race": 2, "log_file": log}).to_string(),
    )
    .unwrap();
    let cfg = load(json!({})).unwrap();
    assert_eq!(cfg.sleep_for_race, 2);
    assert_eq!(cfg.log_file, Some(log.clone()));
    // The same value inline is no decision of the network configuration's.
    assert_eq!(load(json!({"log_file": log})).unwrap().warnings.len(), 0);
}

#[test]
fn credentials_stay_with_their_endpoint() {
    let admin = json!({"etcd_host": "https://etcd.admin:2379", "etcd_username": "root",
        "etcd_password": "admin-secret"});
    let (_dir, load) = untrusted(admin.clone());
    // A configuration logged whole shows no password.
    let shown = format!("{:?}", load(json!({})).unwrap());
    assert!(
        shown.contains("etcd.admin") && !shown.contains("admin-secret") && !shown.contains("root"),
        "{shown}"
    );
    let msg = load(json!({"etcd_host": "http://attacker:2379"})).unwrap_err();
    assert!(
        msg.contains("etcd_host") && !msg.contains("admin-secret"),
        "{msg}"
    );
    let msg = load(json!({"etcd_password": "mine"})).unwrap_err();
    assert!(
        msg.contains("etcd_password") && !msg.contains("mine"),
        "{msg}"
    );
    let mut open = admin;
    open["allow_inline_endpoints"] = true.into();
    let (_dir, load) = untrusted(open);
    match load(json!({"etcd_host": "https://mine:2379"}))
        .unwrap()
        .datastore
    {
        Datastore::Etcd(etcd) => {
            assert_eq!(etcd.endpoints, ["https://mine:2379"]);
            assert_eq!((etcd.username, etcd.password), (None, None));
        }
        other => panic!("{other:?}"),
    }
    // The admin's credentials named again (the same path, another spelling of it) do not
    // follow the network configuration's own endpoint.
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (
        certs.path().join("client.crt"),
        certs.path().join("client.key"),
    );
    std::fs::write(&cert, "cert").unwrap();
    std::fs::write(&key, "key").unwrap();
    let tls = json!({"etcd_host": "https://etcd.admin:2379", "etcd_cert_file": cert,
        "etcd_key_file": key, "allow_inline_endpoints": true,
        "allow_inline_paths": [certs.path()]});
    let (_dir, load) = untrusted(tls);
    let respelled = format!("{}/./client.crt", certs.path().display());
    let asked = json!({"etcd_host": "https://mine:2379", "etcd_cert_file": respelled,
        "etcd_key_file": key});
    let msg = load(asked).unwrap_err();
    assert!(
        msg.contains("ipam.etcd_cert_file") && msg.contains("flat file's credential"),
        "{msg}"
    );
    assert!(load(json!({"etcd_host": "https://mine:2379"})).is_ok());
    // A user name is no secret: etcd's superuser is `root` on every cluster.
    let (_dir, load) = untrusted(json!({"etcd_host": "https://etcd.admin:2379",
        "etcd_username": "root", "etcd_password": "admin-secret",
        "allow_inline_endpoints": true}));
    let own = json!({"etcd_host": "https://mine:2379", "etcd_username": "root",
        "etcd_password": "mine"});
    match load(own).unwrap().datastore {
        Datastore::Etcd(etcd) => assert_eq!(etcd.password.as_deref(), Some("mine")),
        other => panic!("{other:?}"),
    }
    let (_dir, load) = untrusted(json!({"datastore": "kubernetes",
        "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"}}));
    // Another engine's name is set aside (the_engine_the_flat_file_implies_stands).
    assert!(matches!(
        load(json!({"datastore": "local"})).unwrap().datastore,
        Datastore::Kubernetes(_)
    ));
    assert!(load(json!({"datastore": "Kubernetes"})).is_ok());
}

#[test]
fn flat_file_errors_never_show_its_content() {
    let (dir, load) = untrusted(json!(["-----BEGIN PRIVATE KEY-----"]));
    let msg = load(json!({})).unwrap_err();
    assert!(
        msg.contains("an array") && !msg.contains("PRIVATE"),
        "{msg}"
    );
    std::fs::write(
        dir.path().join("whereabouts.conf"),
        "{\"a\": 1,\n secret-line }",
    )
    .unwrap();
    let msg = load(json!({})).unwrap_err();
    assert!(msg.contains("line 2") && !msg.contains("secret"), "{msg}");
    let msg =
        err(json!({"type": "whereabouts", "range": format!("10.0.0.0/24\n{}", "x".repeat(9000))}));
    assert!(msg.chars().count() <= 601 && !msg.contains("\n"), "{msg}");
}

#[test]
fn the_agent_socket_is_the_flat_files_only() {
    let (_dir, load) = untrusted(json!({"agent_socket": "/run/node/agent.sock"}));
    let cfg = load(json!({})).unwrap();
    assert_eq!(cfg.agent_socket, Some("/run/node/agent.sock".into()));
    // A network configuration cannot point the plugin at another socket.
    let cfg = load(json!({"agent_socket": "/tmp/evil.sock"})).unwrap();
    assert_eq!(cfg.agent_socket, Some("/run/node/agent.sock".into()));
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    let (_dir, bare) = untrusted(json!({}));
    let cfg = bare(json!({"agent_socket": "/tmp/evil.sock"})).unwrap();
    assert_eq!(cfg.agent_socket, None);
}

#[test]
fn a_network_configuration_cannot_blank_the_admins_settings() {
    let kubeconfig = "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig";
    let (_dir, load) = untrusted(json!({"datastore": "kubernetes",
        "kubernetes": {"kubeconfig": kubeconfig}}));
    // Blank values read as absent; they must not keep the admin's from filling them.
    let cfg = load(json!({"datastore": " ", "kubernetes": {"kubeconfig": "\t"}})).unwrap();
    assert_eq!(
        cfg.datastore,
        Datastore::Kubernetes(KubernetesConfig {
            kubeconfig: kubeconfig.into(),
            namespace: None,
        })
    );
    let (_dir, load) = untrusted(json!({"local_path": "/var/lib/admin/net.db"}));
    let cfg = load(json!({"local_path": "  "})).unwrap();
    assert_eq!(
        cfg.datastore,
        Datastore::Local {
            path: "/var/lib/admin/net.db".into()
        }
    );
    let (_dir, load) = untrusted(json!({"etcd_host": "etcd.admin:2379",
        "etcd_ca_cert_file": "/etc/admin/ca.pem"}));
    match load(json!({"etcd_ca_cert_file": " "})).unwrap().datastore {
        Datastore::Etcd(etcd) => assert_eq!(etcd.ca_cert_file, Some("/etc/admin/ca.pem".into())),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_admins_path_written_otherwise_is_another_path() {
    let (_dir, load) = untrusted(json!({"local_path": "/var/lib/admin/net.db"}));
    for other in [" /var/lib/admin/net.db", "/var/lib/admin/net.db "] {
        let msg = load(json!({ "local_path": other })).unwrap_err();
        assert!(msg.contains("ipam.local_path"), "{msg}");
    }
    assert!(load(json!({"local_path": "/var/lib/admin/net.db"})).is_ok());
}

/// The flat file's engine serves the node whatever a network configuration selects: another
/// engine's name and settings are set aside with a warning, as Go's plugin (one engine)
/// ignores them, never refused (that failed the DELs of pods Go served) nor used (another
/// engine would hand out the other nodes' addresses again).
#[test]
fn the_engine_the_flat_file_implies_stands() {
    let kubeconfig = "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig";
    let (_dir, etcd) = untrusted(json!({"etcd_host": "https://etcd.admin:2379",
        "etcd_username": "root", "etcd_password": "admin-secret"}));
    for (other, key) in [
        (json!({"datastore": "local"}), "ipam.datastore"),
        (
            json!({"datastore": "local", "local_path": "/tmp/x.db"}),
            "ipam.local_path",
        ),
        (
            json!({"kubernetes": {"kubeconfig": "/tmp/tenant.kubeconfig"}}),
            "ipam.kubernetes.kubeconfig",
        ),
    ] {
        let cfg = etcd(other.clone()).unwrap();
        let Datastore::Etcd(settings) = &cfg.datastore else {
            panic!("{other}: {:?}", cfg.datastore);
        };
        assert_eq!(settings.endpoints, ["https://etcd.admin:2379"], "{other}");
        assert!(!cfg.own_store, "{other}");
        let warning = cfg.warnings.join("\n");
        assert!(
            warning.contains(key) && warning.contains("ignored"),
            "{other}: {warning}"
        );
    }
    assert!(etcd(json!({"datastore": "ETCD"}))
        .unwrap()
        .warnings
        .is_empty());

    // A NetworkAttachmentDefinition written for Go's etcd days on a Kubernetes node: its etcd
    // endpoint, credentials and TLS files (outside every allowed folder) are never screened,
    // opened or dialled.
    let (_dir, kubernetes) = untrusted(json!({"kubernetes": {"kubeconfig": kubeconfig}}));
    let old_etcd = json!({"datastore": "etcd", "etcd_host": "https://10.0.0.1:2379",
        "etcd_username": "u", "etcd_password": "p", "etcd_cert_file": "/root/tenant.pem",
        "etcd_key_file": "/root/tenant.key", "etcd_ca_cert_file": "/root/ca.pem"});
    for ipam in [
        old_etcd,
        json!({"datastore": "local", "local_path": "/root/x.db"}),
    ] {
        let cfg = kubernetes(ipam.clone()).unwrap();
        assert!(
            matches!(&cfg.datastore, Datastore::Kubernetes(k) if k.kubeconfig == Path::new(kubeconfig)),
            "{ipam}: {:?}",
            cfg.datastore
        );
        let warning = cfg.warnings.join("\n");
        assert!(warning.contains("ipam.datastore"), "{ipam}: {warning}");
        assert!(!warning.contains("10.0.0.1"), "{warning}");
    }
    let named_again = kubernetes(json!({"datastore": "Kubernetes"})).unwrap();
    assert!(
        named_again.warnings.is_empty(),
        "{:?}",
        named_again.warnings
    );
    // A datastore that is not text is still wrong, as it is for Go's decoder.
    assert!(kubernetes(json!({"datastore": 3}))
        .unwrap_err()
        .contains("ipam.datastore"));
    // A flat file that says nothing of the engine leaves it to the network configuration.
    let (_dir, silent) = untrusted(json!({"log_level": "error"}));
    assert!(matches!(
        silent(json!({"datastore": "local"})).unwrap().datastore,
        Datastore::Local { .. }
    ));
    assert!(matches!(
        silent(json!({"kubernetes": {"kubeconfig": kubeconfig}}))
            .unwrap()
            .datastore,
        Datastore::Kubernetes(_)
    ));
}

#[test]
fn refusals_never_show_the_flat_files_values() {
    let (_dir, load) = untrusted(json!({"allow_inline_paths": ["/srv/admin-only"],
        "go_whereabouts": "admin-typo"}));
    let msg = load(json!({})).unwrap_err();
    assert!(
        msg.contains("go_whereabouts") && !msg.contains("admin-typo"),
        "{msg}"
    );
    let (_dir, load) = untrusted(json!({"allow_inline_paths": ["/srv/admin-only"]}));
    let msg = load(json!({"local_path": "/etc/x.db"})).unwrap_err();
    assert!(
        msg.contains("allow_inline_paths") && !msg.contains("admin-only"),
        "{msg}"
    );
    let (_dir, load) = untrusted(json!({"allow_inline_paths": ["srv/admin-only"]}));
    let msg = load(json!({})).unwrap_err();
    assert!(
        msg.contains("allow_inline_paths") && !msg.contains("admin-only"),
        "{msg}"
    );
    let (_dir, load) = untrusted(json!({"allow_inline_paths": "/srv/admin-only"}));
    let msg = load(json!({})).unwrap_err();
    assert!(
        msg.contains("flat file allow_inline_paths") && !msg.contains("admin-only"),
        "{msg}"
    );
    let (_dir, load) = untrusted(json!({"datastore": "admin-typo"}));
    let msg = load(json!({})).unwrap_err();
    assert!(
        msg.contains("flat file datastore") && !msg.contains("admin-typo"),
        "{msg}"
    );
    // Wrong only once merged: the field is named, the flat file's value is not shown (a blank
    // range is unset, for the flat file to fill).
    let (_dir, load) = untrusted(json!({"range": "10.77.0.0/24", "gateway": "admin-gateway"}));
    let msg = load(json!({"range": "", "range_start": "10.99.0.1"})).unwrap_err();
    assert!(
        msg.contains("ipam.range") && !msg.contains("10.77.0.0"),
        "{msg}"
    );
    // The flat file's value shown, whichever field the message names.
    let (_dir, load_v6) = untrusted(json!({"range": "fd00:77::/64"}));
    let msg = load_v6(json!({"range": "", "range_start": "10.99.0.1"})).unwrap_err();
    assert!(!msg.contains("fd00:77"), "{msg}");
    let msg = load(json!({"range": "", "range_start": "10.77.0.1"})).unwrap_err();
    assert!(
        msg.contains("ipam.gateway") && !msg.contains("admin-gateway"),
        "{msg}"
    );
    // Shown as parsed, which is not as written.
    let (_dir, load) = untrusted(json!({"exclude": ["10.77.5.5/16"]}));
    let msg = load(json!({"range": "fd00::/64"})).unwrap_err();
    assert!(!msg.contains("10.77"), "{msg}");
    // A value too long to be shown whole is hidden all the same: cut, it once left a quote
    // open, and the hiding took what serde quotes again for text outside quotes.
    let long = "correct horse battery staple ".repeat(5);
    let (_dir, load) = untrusted(json!({"sleep_for_race": long}));
    let msg = load(json!({})).unwrap_err();
    assert!(
        msg.contains("ipam.sleep_for_race") && !msg.contains("horse"),
        "{msg}"
    );
    // A refusal of the network configuration's own values shows them.
    let (_dir, load) = untrusted(json!({"log_level": "error"}));
    let msg = load(json!({"range": "10.88.0.0/33"})).unwrap_err();
    assert!(msg.contains("10.88.0.0/33"), "{msg}");
}

/// A network configuration naming a store of its own (its own etcd endpoint, a kubeconfig of
/// an allowed folder) is served by the plugin itself, never by the node's agent, which serves
/// the flat file's store; the flat file's store named again, or the installer's kubeconfig as
/// upstream's NADs name it, is not a store of its own.
#[test]
fn a_store_of_its_own_is_told() {
    let elsewhere = tempfile::tempdir().unwrap();
    let kubeconfig = elsewhere.path().join("tenant.kubeconfig");
    let installer = "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig";
    let (_dir, load) = untrusted(json!({"datastore": "kubernetes",
        "kubernetes": {"kubeconfig": installer},
        "allow_inline_paths": [elsewhere.path()]}));
    let own = |ipam: Value| load(ipam).unwrap().own_store;
    assert!(!own(json!({})));
    assert!(!own(json!({"kubernetes": {"kubeconfig": installer}})));
    let other_installer = "/etc/kubernetes/cni/net.d/whereabouts.d/whereabouts.kubeconfig";
    assert!(!own(json!({"kubernetes": {"kubeconfig": other_installer}})));
    assert!(own(json!({"kubernetes": {"kubeconfig": kubeconfig}})));
    let (_dir, load) = untrusted(json!({"etcd_host": "https://etcd.admin:2379",
        "allow_inline_endpoints": true}));
    let own = |ipam: Value| load(ipam).unwrap().own_store;
    assert!(!own(json!({})));
    assert!(!own(json!({"etcd_host": "https://etcd.admin:2379"})));
    assert!(own(json!({"etcd_host": "https://mine:2379"})));
    // On a Kubernetes node, an etcd_host left in the flat file and another one inline are
    // no store of the node's engine.
    let (_dir, load) = untrusted(json!({"datastore": "kubernetes",
        "kubernetes": {"kubeconfig": installer}, "etcd_host": "https://etcd.old:2379",
        "allow_inline_endpoints": true}));
    assert!(
        !load(json!({"etcd_host": "https://mine:2379"}))
            .unwrap()
            .own_store
    );
    // A flat file that names no store leaves the network configuration's as the node's.
    let (_dir, load) = untrusted(json!({"allow_inline_paths": [elsewhere.path()],
        "allow_inline_endpoints": true}));
    let own = |ipam: Value| load(ipam).unwrap().own_store;
    assert!(!own(json!({"kubernetes": {"kubeconfig": kubeconfig}})));
    assert!(!own(json!({"etcd_host": "https://mine:2379"})));
}
