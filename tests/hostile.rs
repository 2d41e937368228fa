//! A NetworkAttachmentDefinition is written by namespace users and run as root: what such a
//! configuration (and a broken environment) must not be able to do, through the real binary.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use common::*;
use serde_json::json;

/// Runs the binary with `vars` (raw bytes allowed) on top of a DEL's environment.
fn run_raw(vars: &[(&OsStr, &OsStr)], stdin: &str) -> Reply {
    let mut all: Vec<(&OsStr, &OsStr)> = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
    .iter()
    .map(|(k, v)| (OsStr::new(k), OsStr::new(v)))
    .collect();
    all.extend_from_slice(vars);
    run(&all, stdin)
}

#[test]
fn a_variable_that_is_not_utf8_is_code_4_when_ours_and_ignored_otherwise() {
    let net = Net::local(json!({"range": "10.60.0.0/24"}));
    let conf = net.conf.to_string();
    let bad = OsStr::from_bytes(b"\xff\xfe");
    let unrelated = run_raw(&[(OsStr::new("LANG"), bad)], &conf);
    unrelated.ok_empty();
    let ours = run_raw(&[(OsStr::new("CNI_ARGS"), bad)], &conf);
    assert_eq!(ours.err_code(), 4);
    assert!(ours.msg().contains("CNI_ARGS"), "{ours:?}");
}

#[test]
fn stdin_larger_than_the_cap_is_code_6() {
    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(2 << 20));
    let reply = run(&[("CNI_COMMAND", "DEL")], &huge);
    assert_eq!(reply.err_code(), 6);
}

/// A flat file `flat` of the admin's in `net`'s folder; the calls' environment naming it.
fn admin_flat_file(net: &Net, flat: serde_json::Value) -> String {
    let path = net.path().join("admin.conf");
    std::fs::write(&path, flat.to_string()).unwrap();
    path.to_string_lossy().into_owned()
}

fn call_as(net: &Net, flat_file: &str, command: &str, container: &str) -> Reply {
    run(
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", &pod_args(container)),
            (FLAT_FILE_ENV, flat_file),
        ],
        &net.conf.to_string(),
    )
}

#[test]
fn a_network_configuration_cannot_choose_where_root_writes() {
    let mut net = Net::local(json!({"range": "10.61.0.0/24"}));
    let db = net.db();
    net.conf["ipam"]
        .as_object_mut()
        .unwrap()
        .remove("local_path");
    let flat = admin_flat_file(&net, json!({"local_path": db}));
    let victim = net.path().join("authorized_keys");
    net.conf["ipam"]["log_file"] = victim.to_string_lossy().into();
    net.conf["ipam"]["network_name"] = "a\nssh-ed25519 AAAA attacker".into();
    let reply = call_as(&net, &flat, "ADD", "c1");
    reply.ok();
    assert!(!victim.exists(), "the inline log_file was opened");
    assert!(reply.stderr.contains("ipam.log_file"), "{reply:?}");
    assert!(
        !reply.stderr.lines().any(|l| l.starts_with("ssh-ed25519")),
        "{reply:?}"
    );
    net.conf["ipam"]["local_path"] = net.path().join("other.db").to_string_lossy().into();
    let reply = call_as(&net, &flat, "ADD", "c2");
    assert_eq!(reply.err_code(), 7);
    assert!(reply.msg().contains("ipam.local_path"), "{reply:?}");
    assert!(!net.path().join("other.db").exists());
}

/// A NetworkAttachmentDefinition written for Go's etcd days (`datastore`, `etcd_host`, its
/// credentials and TLS files) on a node whose flat file names the engine: Go's plugin ignores
/// those keys, so the pods it served must still be torn down, and new ones served, by the
/// flat file's engine; the endpoint is never dialled, the files never opened.
#[test]
fn another_engines_settings_are_set_aside_for_the_flat_files_engine() {
    let mut net = Net::local(json!({"range": "10.66.0.0/24"}));
    let db = net.db();
    let flat = admin_flat_file(&net, json!({"datastore": "local", "local_path": db}));
    let key_file = net.path().join("tenant.key");
    let ipam = net.conf["ipam"].as_object_mut().unwrap();
    ipam.remove("local_path");
    for (key, value) in [
        ("datastore", json!("etcd")),
        ("etcd_host", json!("https://192.0.2.1:2379")),
        ("etcd_username", json!("tenant")),
        ("etcd_password", json!("tenant-secret")),
        ("etcd_key_file", json!(key_file)),
        ("etcd_cert_file", json!("/root/tenant.pem")),
    ] {
        ipam.insert(key.into(), value);
    }
    let added = call_as(&net, &flat, "ADD", "c1");
    assert_eq!(ips(&added.ok()), ["10.66.0.1/24"]);
    assert!(added.stderr.contains("ipam.etcd_host"), "{added:?}");
    // In the flat file's database, where a configuration naming no engine finds it.
    let plain = Net::local(json!({"range": "10.66.0.0/24", "local_path": db}));
    assert_eq!(ips(&plain.add("c2", "eth0").ok()), ["10.66.0.2/24"]);
    call_as(&net, &flat, "DEL", "c1").ok_empty();
    assert_eq!(ips(&plain.add("c3", "eth0").ok()), ["10.66.0.1/24"]);
}

/// A process in a mount namespace of its own, its root a tmpfs holding `file` with `content`:
/// a tenant's container. From the host, `/proc/<pid>/root` is a link whose text is `/`.
struct Container {
    unshare: std::process::Child,
    pid: u32,
}

impl Container {
    fn start(dir: &std::path::Path, file: &str, content: &str) -> Option<Container> {
        let runs = |tool: &str, arg: &str| {
            let mut command = std::process::Command::new(tool);
            command.arg(arg);
            command.stdout(std::process::Stdio::null());
            command.stderr(std::process::Stdio::null());
            command.status().is_ok_and(|s| s.success())
        };
        // SAFETY: geteuid reads the process's user id; it has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let tools = runs("unshare", "--version")
            && runs("pivot_root", "--version")
            && runs("busybox", "true");
        if !root || !tools {
            missing_prerequisite(
                "root, unshare, pivot_root and busybox (util-linux, busybox-static)",
            );
            return None;
        }
        let (root, pid_file, source) = (dir.join("root"), dir.join("pid"), dir.join("content"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(&source, content).unwrap();
        let inside = file.trim_start_matches('/');
        let script = format!(
            "set -e; mount -t tmpfs none {root}; cd {root}; mkdir -p old {folder}; \
             cp \"$(command -v busybox)\" busybox; cp {source} {inside}; \
             pivot_root . old; echo $$ > /old{pid}; exec /busybox sleep 600",
            root = root.display(),
            folder = std::path::Path::new(inside).parent().unwrap().display(),
            source = source.display(),
            pid = pid_file.display(),
        );
        let mut container = Container {
            pid: 0,
            unshare: std::process::Command::new("unshare")
                .args([
                    "--mount",
                    "--propagation",
                    "private",
                    "--fork",
                    "--kill-child",
                ])
                .args(["sh", "-c", &script])
                .spawn()
                .unwrap(),
        };
        // Dropped (killed and waited for) should it never start. The pid is written once the
        // root has moved, and the test's premise holds from then: the link reads `/`.
        let started = std::time::Instant::now();
        loop {
            let pid = std::fs::read_to_string(&pid_file).ok();
            if let Some(pid) = pid.and_then(|p| p.trim().parse::<u32>().ok()) {
                let root_link = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
                assert_eq!(root_link, std::path::Path::new("/"));
                container.pid = pid;
                return Some(container);
            }
            assert!(
                started.elapsed().as_secs() < 30,
                "the container never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// `configuration_path` through `/proc/<pid>/root`: from another mount namespace that link
/// reads `/`, so the path passes by its text for the installer's folder, while an open reaches
/// the container's own file. A tenant's flat file there would decide every trust rule (here:
/// root writes the store where it says); it is refused, and nothing is written.
#[test]
fn a_flat_file_in_a_containers_root_is_not_the_admins() {
    let mut net = Net::local(json!({"range": "10.62.0.0/24"}));
    let victim = net.path().join("victim.db");
    let tenants = json!({"allow_inline_paths": ["/"], "local_path": victim});
    let file = "/etc/cni/net.d/whereabouts.d/tenant.conf";
    let Some(container) = Container::start(net.path(), file, &tenants.to_string()) else {
        return;
    };
    let flat = admin_flat_file(&net, json!({"local_path": net.db()}));
    let named = format!("/proc/{}/root{file}", container.pid);
    assert!(
        std::fs::read(&named).is_ok(),
        "the tenant's file is readable"
    );
    net.conf["ipam"]["configuration_path"] = named.into();
    let ipam = net.conf["ipam"].as_object_mut().unwrap();
    ipam.remove("local_path");

    let reply = call_as(&net, &flat, "ADD", "c1");
    assert_eq!(reply.err_code(), 7, "{reply:?}");
    assert!(reply.msg().contains("ipam.configuration_path"), "{reply:?}");
    assert!(
        !victim.exists(),
        "the tenant's flat file was read as the admin's"
    );
}

/// The admin's flat file for `net` (as the tests' own) that also lets network configurations
/// name files in `/dev`: the trust screen lets those through, so what refuses them is the
/// plugin's check when it opens them.
fn flat_file_allowing_dev(net: &Net) -> String {
    let temp = std::env::temp_dir();
    let temp = temp.canonicalize().unwrap_or(temp);
    admin_flat_file(
        net,
        json!({"allow_inline_paths": [temp, "/dev"], "allow_inline_endpoints": true,
            "allow_insecure_tls": true}),
    )
}

#[test]
fn log_file_is_never_a_symlink_a_fifo_or_stdout() {
    let mut net = Net::local(json!({"range": "10.62.0.0/24", "log_level": "debug"}));
    let flat = flat_file_allowing_dev(&net);
    let target = net.path().join("target");
    std::fs::write(&target, "").unwrap();
    let link = net.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let fifo = net.path().join("fifo.log");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let cases: [(&std::path::Path, &str); 4] = [
        (&link, "is a symbolic link"),
        (&fifo, "is not a regular file"),
        // A character device.
        ("/dev/null".as_ref(), "is not a regular file"),
        // The runtime's pipe, through /dev's link to /proc/self/fd/1.
        ("/dev/stdout".as_ref(), "is a symbolic link"),
    ];
    for (i, (path, why)) in cases.into_iter().enumerate() {
        net.conf["ipam"]["log_file"] = path.to_string_lossy().into();
        let reply = call_as(&net, &flat, "ADD", &format!("c{i}"));
        // stdout holds the result and nothing else: no log line reached it.
        let expected = format!("10.62.0.{}/24", i + 1);
        assert_eq!(ips(&reply.ok()), [expected.as_str()], "{reply:?}");
        let refusal = format!(
            "whereabouts: log_file not used, logging to stderr: {} {why}",
            path.display()
        );
        assert!(reply.stderr.contains(&refusal), "{refusal}: {reply:?}");
        assert!(!reply.stderr.contains("allow_inline_paths"), "{reply:?}");
        // The logs went to stderr instead.
        assert!(reply.stderr.contains(&bare(&expected)), "{reply:?}");
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "");
}

/// A runtime that sends the plugin's stdout to a regular file, and a log_file naming that
/// file: the logs must not mix into the result.
#[test]
fn log_file_that_is_the_processes_stdout_is_refused() {
    let mut net = Net::local(json!({"range": "10.62.1.0/24", "log_level": "debug"}));
    let out = net.path().join("stdout.json");
    net.conf["ipam"]["log_file"] = out.to_string_lossy().into();
    let mut child = std::process::Command::new(bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(FLAT_FILE_ENV, test_flat_file())
        .envs([
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(net.conf.to_string().as_bytes())
        .unwrap();
    let done = child.wait_with_output().unwrap();
    let reply = Reply {
        code: done.status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: String::from_utf8_lossy(&done.stderr).into_owned(),
    };
    assert_eq!(ips(&reply.ok()), ["10.62.1.1/24"], "{reply:?}");
    let refusal = format!(
        "whereabouts: log_file not used, logging to stderr: {} is this process's standard output or error",
        out.display()
    );
    assert!(reply.stderr.contains(&refusal), "{reply:?}");
    assert!(reply.stderr.contains("10.62.1.1"), "{reply:?}");
}

/// Even where the admin allows the folder, the database path is never followed through a link
/// and never a FIFO (SQLite would write through the one and hang on the other).
#[test]
fn local_path_is_never_a_symlink_or_a_fifo() {
    let mut net = Net::local(json!({"range": "10.63.0.0/24"}));
    let target = net.path().join("precious");
    std::fs::write(&target, "keep me").unwrap();
    let link = net.path().join("link.db");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let fifo = net.path().join("fifo.db");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (i, path) in [&link, &fifo].iter().enumerate() {
        net.conf["ipam"]["local_path"] = path.to_string_lossy().into();
        let reply = net.add(&format!("c{i}"), "eth0");
        assert_ne!(reply.code, 0, "{reply:?}");
        assert!(reply.msg().contains("local"), "{reply:?}");
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
}

#[test]
fn kubeconfigs_that_run_commands_hang_or_flood_are_refused() {
    let mut net = Net::local(json!({"range": "10.63.0.0/24"}));
    let marker = net.path().join("ran");
    let kubeconfig = net.path().join("exec.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n      args: [\"-c\", \"touch {}\"]\n",
            marker.display()
        ),
    )
    .unwrap();
    let fifo = net.path().join("fifo.kubeconfig");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A usable kubeconfig but for its size: a comment takes it past the 1 MiB cap.
    let flood = net.path().join("flood.kubeconfig");
    let cap = 1 << 20;
    std::fs::write(
        &flood,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user: {{token: t}}\n# {}\n",
            "x".repeat(cap)
        ),
    )
    .unwrap();
    // /dev is allowed: the trust screen lets /dev/zero through to the reader.
    let flat = flat_file_allowing_dev(&net);
    let cases: [(&std::path::Path, String); 4] = [
        (&kubeconfig, "user \"u\" runs a command (exec)".into()),
        (&fifo, format!("{} is not a regular file", fifo.display())),
        (
            "/dev/zero".as_ref(),
            "/dev/zero is not a regular file".into(),
        ),
        (
            &flood,
            format!("{} is larger than {cap} bytes", flood.display()),
        ),
    ];
    for (path, why) in cases {
        net.conf["ipam"]["datastore"] = "kubernetes".into();
        net.conf["ipam"]["kubernetes"] = json!({"kubeconfig": path});
        let reply = call_as(&net, &flat, "ADD", "c1");
        assert_eq!(reply.err_code(), 7, "{reply:?}");
        // The reply names the field; why it was refused (the file's path, its user's name)
        // is the log's.
        let msg = reply.msg();
        assert!(msg.contains("ipam.kubernetes.kubeconfig"), "{reply:?}");
        if path == kubeconfig {
            // What is wrong, without the user's name.
            assert!(msg.contains("runs a command (exec)"), "{reply:?}");
        }
        assert!(!msg.contains(&why), "{why}: {reply:?}");
        assert!(reply.stderr.contains(&why), "{why}: {reply:?}");
        assert!(!msg.contains("allow_inline_paths"), "{reply:?}");
    }
    assert!(!marker.exists(), "the kubeconfig's command ran");
}

#[test]
fn static_addresses_a_pod_may_not_hold_are_refused() {
    let mut net = Net::local(json!({"range": "10.64.0.0/24", "gateway": "10.64.0.1",
        "exclude": ["10.64.0.16/28"]}));
    for ip in ["10.64.0.0", "10.64.0.255", "10.64.0.1", "10.64.0.20"] {
        let reply = net.call("ADD", "c1", "eth0", &format!("IP={ip}"));
        assert_eq!(reply.err_code(), 7, "{ip}: {reply:?}");
        net.conf["runtimeConfig"] = json!({"ips": [format!("{ip}/24")]});
        assert_eq!(net.add("c1", "eth0").err_code(), 7, "{ip}");
        net.conf.as_object_mut().unwrap().remove("runtimeConfig");
    }
    assert_eq!(
        ips(&net.call("ADD", "c1", "eth0", "IP=10.64.0.9").ok()),
        ["10.64.0.9/24"]
    );
    let start_on_broadcast =
        Net::local(json!({"range": "10.65.0.0/24", "range_start": "10.65.0.255"}));
    assert_eq!(start_on_broadcast.add("c1", "eth0").err_code(), 7);
    let nothing_left = Net::local(json!({"range": "10.66.0.0/29", "exclude": ["10.66.0.0/29"]}));
    assert_eq!(nothing_left.add("c1", "eth0").err_code(), 7);
}

#[test]
fn gc_without_the_list_of_valid_attachments_is_refused() {
    let net = Net::local(json!({"range": "10.67.0.0/24"}));
    net.add("c1", "eth0").ok();
    let reply = net.call("GC", "", "", "");
    assert_eq!(reply.err_code(), 7);
    assert!(reply.msg().contains("valid-attachments"), "{reply:?}");
    assert_eq!(ips(&net.add("c1", "eth0").ok()), ["10.67.0.1/24"]);
}

#[test]
fn a_damaged_store_fails_status_and_add_but_not_del() {
    let net = Net::local(json!({"range": "10.68.0.0/24"}));
    net.add("c1", "eth0").ok();
    net.call("STATUS", "", "", "").ok_empty();
    let db = net.db();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[..16].copy_from_slice(b"not a database!!");
    std::fs::write(&db, bytes).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    assert_eq!(net.call("STATUS", "", "", "").err_code(), 50);
    assert_eq!(net.add("c2", "eth0").err_code(), 5);
    let del = net.del("c1", "eth0");
    del.ok_empty();
    assert!(del.stderr.contains("broken"), "{del:?}");
}

/// Refused on their length, before any entry is parsed or the store is opened.
#[test]
fn lists_longer_than_their_caps_are_refused_before_the_store_is_opened() {
    let many_ranges: Vec<_> = (0..100)
        .map(|i| json!({"range": format!("10.{i}.0.0/24")}))
        .collect();
    let routes: Vec<_> = (0..5000).map(|_| json!({"dst": "0.0.0.0/0"})).collect();
    for ipam in [
        json!({"ipRanges": many_ranges}),
        json!({"range": "10.69.0.0/24", "routes": routes}),
    ] {
        let net = Net::local(ipam);
        let reply = net.add("c1", "eth0");
        assert_eq!(reply.err_code(), 7);
        assert!(reply.msg().contains("allowed"), "{reply:?}");
        assert!(!net.db().exists(), "the store was opened");
    }
}

/// The interface name comes from whoever writes the pod's network selection: an ADD refuses
/// names the CNI specification does not allow, before it takes an address, while a DEL with
/// any name still succeeds (what was attached before must stay removable).
#[test]
fn names_a_pod_may_not_use_are_refused_before_an_address_is_taken() {
    let net = Net::local(json!({"range": "10.62.0.0/30"}));
    let long = "n".repeat(10_000);
    let hostile = [
        ("c1", long.as_str()),
        ("c1", "net1\nforged log line"),
        ("c1", "../../etc"),
        ("c1", "net1\u{1b}[2J"),
        ("c/../../x", "eth0"),
        ("c1\u{1b}[2J", "eth0"),
    ];
    for (container, ifname) in hostile {
        let reply = net.add(container, ifname);
        assert_eq!(reply.err_code(), 4, "{container:?} {ifname:?}");
        let variable = if container == "c1" {
            "CNI_IFNAME"
        } else {
            "CNI_CONTAINERID"
        };
        assert!(reply.msg().contains(variable), "{reply:?}");
        assert!(!reply.stdout.contains("forged") && !reply.stdout.contains("nnnnnnnn"));
        net.del(container, ifname).ok_empty();
    }
    // A /30 holds two addresses: had any refused ADD taken one, the second would find none.
    let first = net.add("c1", "eth0").json();
    let second = net.add("c2", "eth0").json();
    assert_ne!(ips(&first), ips(&second));
}

/// Both network names are stored with every allocation: an ADD refuses them beyond a
/// Kubernetes object name's length, so a configuration cannot make each of its pods cost the
/// shared store a megabyte. A DEL still succeeds.
#[test]
fn network_names_longer_than_an_object_name_are_refused_on_add() {
    let long = "n".repeat(254);
    for field in ["name", "ipam.network_name"] {
        let mut net = Net::local(json!({"range": "10.63.0.0/30"}));
        match field {
            "name" => net.conf["name"] = long.as_str().into(),
            _ => net.conf["ipam"]["network_name"] = long.as_str().into(),
        }
        let reply = net.add("c1", "eth0");
        assert_eq!(reply.err_code(), 7, "{field}");
        assert!(
            reply.msg().starts_with(&format!("{field} is longer")),
            "{reply:?}"
        );
        assert!(!reply.msg().contains(long.as_str()));
        net.del("c1", "eth0").ok_empty();
        net.conf["name"] = "n".repeat(253).into();
        net.conf["ipam"]["network_name"] = "n".repeat(253).into();
        // Nothing was taken: the /30's two addresses are both there.
        let first = ips(&net.add("c1", "eth0").json());
        assert_ne!(first, ips(&net.add("c2", "eth0").json()));
    }
}
