//! A panic in a CNI call, which only a defect can cause, still answers the runtime with a CNI
//! error. Its own test binary: it points `WHEREABOUTS_FLAT_FILE` at an empty file for the
//! whole process, so that nothing is read from the machine's standard places.

use std::collections::HashMap;

use whereabouts::config::IpamConfig;
use whereabouts::store::{Store, StoreError};

fn panics(_: &IpamConfig) -> Result<Box<dyn Store>, StoreError> {
    panic!("an engine's defect")
}

#[test]
fn a_panic_is_answered_as_an_internal_error() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("whereabouts.conf");
    std::fs::write(&flat, "{}").unwrap();
    // The only test of this process: nothing else reads the environment meanwhile.
    std::env::set_var("WHEREABOUTS_FLAT_FILE", &flat);
    let vars: HashMap<String, String> = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/var/run/netns/x"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "n",
        "ipam": {"type": "whereabouts", "range": "10.0.0.0/24"}});
    let outcome = whereabouts::plugin::run(&vars, conf.to_string().as_bytes(), panics);
    assert_eq!(outcome.exit_code, 1);
    let reply = outcome.stdout.unwrap();
    assert_eq!(reply["code"], 999, "{reply}");
    let msg = reply["msg"].as_str().unwrap();
    assert!(msg.contains("a defect of the plugin"), "{reply}");
    // The panic's own text may quote anything the plugin held: it is the log's.
    assert!(!msg.contains("an engine's defect"), "{reply}");
}
