//! The real binary fed mutated configurations and environments, as a hostile namespace user or
//! a broken runtime could: it never panics (exit 101), never dies of a signal, never hangs,
//! stays within 1 GiB of address space, and prints exactly one JSON value or nothing.

mod common;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, test_flat_file, FLAT_FILE_ENV};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const ROUNDS: usize = 400;
const TIMEOUT: Duration = Duration::from_secs(20);
const ADDRESS_SPACE: libc::rlim_t = 1 << 30;

/// Values a hostile configuration might hold anywhere.
fn hostile_values(dir: &std::path::Path) -> Vec<Value> {
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    vec![
        json!("/dev/zero"),
        json!("/dev/stdout"),
        json!(fifo),
        json!(dir.join("sub/../../x")),
        json!("a\nb\u{1b}[2J"),
        json!("x".repeat(100_000)),
        json!(-1),
        json!(1e300),
        json!(u64::MAX),
        json!(null),
        json!(true),
        json!([[[[[[[[["deep"]]]]]]]]]),
        json!({"range": "10.0.0.0/8"}),
        json!((0..3000)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect::<Vec<_>>()),
        json!("::/0"),
        json!("255.255.255.255"),
        json!("10.0.0.0/31"),
    ]
}

fn base(dir: &std::path::Path) -> Value {
    json!({"cniVersion": "1.1.0", "name": "mut", "type": "bridge",
        "ipam": {"type": "whereabouts", "range": "10.70.0.0/24", "gateway": "10.70.0.1",
            "exclude": ["10.70.0.16/28"], "routes": [{"dst": "0.0.0.0/0"}],
            "ipRanges": [{"range": "fd70::/120"}], "addresses": [{"address": "192.0.2.5/24"}],
            "local_path": dir.join("m.db"), "log_level": "debug"},
        "runtimeConfig": {"ips": ["10.70.0.40"]},
        "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]})
}

/// Replaces one value somewhere in the configuration.
fn mutate_json(rng: &mut StdRng, node: &mut Value, hostile: &[Value]) {
    let width = match node {
        Value::Object(map) => map.len(),
        Value::Array(items) => items.len(),
        _ => 0,
    };
    if width == 0 {
        *node = hostile[rng.random_range(0..hostile.len())].clone();
        return;
    }
    let pick = rng.random_range(0..width);
    let child = match node {
        Value::Object(map) => map.values_mut().nth(pick).unwrap(),
        Value::Array(items) => &mut items[pick],
        _ => unreachable!("width is 0 for scalars"),
    };
    if rng.random_bool(0.6) {
        mutate_json(rng, child, hostile);
    } else {
        *child = hostile[rng.random_range(0..hostile.len())].clone();
    }
}

fn mutate_text(rng: &mut StdRng, text: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..4) {
        let at = rng.random_range(0..text.len().max(1));
        match rng.random_range(0..3) {
            0 if at < text.len() => text[at] = rng.random(),
            1 => text.insert(at.min(text.len()), b"\"{[\n,:"[rng.random_range(0..6)]),
            _ => text.truncate(at),
        }
    }
}

fn environment(rng: &mut StdRng) -> Vec<(OsString, OsString)> {
    let commands = [
        "ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "add", "", "ADD\n",
    ];
    let mut vars: Vec<(OsString, OsString)> = vec![
        (
            "CNI_COMMAND".into(),
            commands[rng.random_range(0..commands.len())].into(),
        ),
        (
            "CNI_CONTAINERID".into(),
            format!("c{}", rng.random_range(0..4)).into(),
        ),
        ("CNI_NETNS".into(), "/var/run/netns/x".into()),
        ("CNI_IFNAME".into(), "eth0".into()),
        (
            "CNI_ARGS".into(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p".into(),
        ),
        (FLAT_FILE_ENV.into(), test_flat_file().into()),
    ];
    match rng.random_range(0..6) {
        0 => {
            let i = rng.random_range(1..5);
            vars.remove(i);
        }
        1 => vars[4].1 = OsString::from_vec(vec![b'I', b'P', b'=', 0xff, b'1']),
        2 => vars[4].1 = "IP=10.70.0.0;GATEWAY=x;;=;K8S_POD_NAME=\n".into(),
        3 => vars.push(("LANG".into(), OsString::from_vec(vec![0xc3, 0x28]))),
        _ => {}
    }
    vars
}

fn run(vars: &[(OsString, OsString)], stdin: &[u8]) -> (Option<i32>, String, Duration) {
    let mut command = Command::new(bin());
    command
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: ADDRESS_SPACE,
                rlim_max: ADDRESS_SPACE,
            };
            libc::setrlimit(libc::RLIMIT_AS, &limit);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = command.spawn().expect("start the binary");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("the binary hung on {vars:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = writer.join();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn mutated_calls_never_panic_hang_or_break_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = hostile_values(dir.path());
    let mut rng = StdRng::seed_from_u64(10);
    for round in 0..ROUNDS {
        let mut conf = base(dir.path());
        for _ in 0..rng.random_range(1..4) {
            mutate_json(&mut rng, &mut conf, &hostile);
        }
        let mut stdin = conf.to_string().into_bytes();
        if rng.random_bool(0.2) {
            mutate_text(&mut rng, &mut stdin);
        }
        let vars = environment(&mut rng);
        let (code, stdout, _) = run(&vars, &stdin);
        let context = format!(
            "round {round}: {vars:?} {}",
            String::from_utf8_lossy(&stdin)
                .chars()
                .take(400)
                .collect::<String>()
        );
        let code = code.unwrap_or_else(|| panic!("killed by a signal: {context}"));
        assert_ne!(code, 101, "panicked: {context}");
        if stdout.trim().is_empty() {
            assert_eq!(code, 0, "failed without an error on stdout: {context}");
            continue;
        }
        let value: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {stdout:?} {context}"));
        if code != 0 {
            assert!(
                value["code"].is_u64() && value["msg"].is_string(),
                "{stdout} {context}"
            );
        }
    }
}
