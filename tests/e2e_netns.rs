//! End to end as root: Debian's `bridge` and `macvlan` plugins, in network namespaces,
//! delegating IPAM to our binary; the interfaces get the addresses and reach each other.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const PLUGIN_DIR: &str = "/usr/lib/cni";

fn sh(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn must(args: &[&str]) -> String {
    let (ok, text) = sh(args);
    assert!(ok, "{args:?} failed: {text}");
    text
}

/// Whether this machine can run the test; in CI a missing piece fails instead.
fn prerequisites() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let plugins = ["bridge", "macvlan"]
        .iter()
        .all(|p| Path::new(PLUGIN_DIR).join(p).exists());
    let ip = sh(&["ip", "-V"]).0;
    if root && plugins && ip {
        return true;
    }
    !missing_prerequisite(
        "root, iproute2 and containernetworking-plugins (bridge, macvlan) in /usr/lib/cni",
    )
}

/// Network namespaces and links made by a test, removed when it ends.
struct Host {
    namespaces: Vec<String>,
    links: Vec<String>,
}

impl Host {
    fn new() -> Host {
        Host {
            namespaces: Vec::new(),
            links: Vec::new(),
        }
    }

    fn netns(&mut self, name: &str) -> String {
        let _ = sh(&["ip", "netns", "del", name]);
        must(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_string());
        format!("/var/run/netns/{name}")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        for link in &self.links {
            let _ = sh(&["ip", "link", "del", link]);
        }
    }
}

/// Runs a main plugin from Debian with our binary on its CNI_PATH.
fn main_plugin(plugin: &str, command: &str, conf: &Value, container: &str, netns: &str) -> Reply {
    let our_dir = Path::new(bin())
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let cni_path = format!("{PLUGIN_DIR}:{our_dir}");
    let exe = format!("{PLUGIN_DIR}/{plugin}");
    let out = Command::new(&exe)
        .env("CNI_COMMAND", command)
        .env(FLAT_FILE_ENV, test_flat_file())
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", pod_args(&format!("e2e/{container}")))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(conf.to_string().as_bytes())?;
            child.wait_with_output()
        })
        .expect("run the main plugin");
    Reply::from(out)
}

fn address_in(netns_name: &str) -> String {
    must(&[
        "ip", "netns", "exec", netns_name, "ip", "-o", "addr", "show", "dev", "eth0",
    ])
}

fn ping(from_ns: &str, to: &str) -> bool {
    sh(&[
        "ip", "netns", "exec", from_ns, "ping", "-c", "1", "-W", "2", to,
    ])
    .0
}

fn two_pods(plugin: &str, conf: Value, tag: &str) {
    let mut host = Host::new();
    let pid = std::process::id();
    let names = [format!("wb-{tag}-{pid}-a"), format!("wb-{tag}-{pid}-b")];
    let paths: Vec<String> = names.iter().map(|n| host.netns(n)).collect();
    if let Some(bridge) = conf["bridge"].as_str() {
        host.links.push(bridge.to_string());
    }
    let mut addresses = Vec::new();
    for (i, (name, path)) in names.iter().zip(&paths).enumerate() {
        let container = format!("{tag}-{i}");
        let reply = main_plugin(plugin, "ADD", &conf, &container, path);
        let result = reply.ok();
        let address = bare(
            result["ips"][0]["address"]
                .as_str()
                .unwrap_or_else(|| panic!("{result}")),
        );
        assert!(
            address_in(name).contains(&address),
            "{name} lacks {address}: {}",
            address_in(name)
        );
        addresses.push(address);
    }
    assert_ne!(addresses[0], addresses[1]);
    assert!(
        ping(&names[0], &addresses[1]),
        "{} cannot reach {}",
        names[0],
        addresses[1]
    );
    assert!(
        ping(&names[1], &addresses[0]),
        "{} cannot reach {}",
        names[1],
        addresses[0]
    );

    // DEL releases: the first address is handed out again to the next pod.
    main_plugin(plugin, "DEL", &conf, &format!("{tag}-0"), &paths[0]).ok_empty();
    let third = host.netns(&format!("wb-{tag}-{pid}-c"));
    let result = main_plugin(plugin, "ADD", &conf, &format!("{tag}-2"), &third).ok();
    assert_eq!(
        bare(result["ips"][0]["address"].as_str().unwrap()),
        addresses[0]
    );
    main_plugin(plugin, "DEL", &conf, &format!("{tag}-2"), &third).ok_empty();
    main_plugin(plugin, "DEL", &conf, &format!("{tag}-1"), &paths[1]).ok_empty();
}

#[test]
fn bridge_pods_get_addresses_and_reach_each_other() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bridge = format!("wbbr{}", std::process::id() % 100_000);
    let conf = json!({"cniVersion": "1.0.0", "name": "e2e-bridge", "type": "bridge", "bridge": bridge,
        "ipam": {"type": "whereabouts", "range": "10.199.1.0/24", "exclude": ["10.199.1.0/28"],
                 "local_path": dir.path().join("wb.db")}});
    two_pods("bridge", conf, "br");
}

#[test]
fn macvlan_pods_get_addresses_and_reach_each_other() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let master = format!("wbdm{}", std::process::id() % 100_000);
    let mut host = Host::new();
    // A veth end is the parent: it needs no hardware and no kernel module beyond veth.
    let peer = format!("{master}p");
    must(&[
        "ip", "link", "add", &master, "type", "veth", "peer", "name", &peer,
    ]);
    host.links.push(master.clone());
    must(&["ip", "link", "set", &master, "up"]);
    must(&["ip", "link", "set", &peer, "up"]);
    let conf = json!({"cniVersion": "1.0.0", "name": "e2e-macvlan", "type": "macvlan", "master": master, "mode": "bridge",
        "ipam": {"type": "whereabouts", "range": "10.199.2.0/24", "range_start": "10.199.2.100",
                 "local_path": dir.path().join("wb.db")}});
    two_pods("macvlan", conf, "mv");
}
