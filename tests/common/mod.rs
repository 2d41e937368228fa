//! Driving the real binary the way a runtime does: CNI environment variables and the network
//! configuration on stdin.
#![allow(dead_code)]

pub mod tools;

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

mod trust;
pub use trust::{test_flat_file, FLAT_FILE_ENV};
#[allow(clippy::duplicate_mod)]
mod ci;
pub use ci::in_ci;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_whereabouts")
}

/// The binary for an operator's command (or the controller), in an environment of its own:
/// PATH, and the tests' flat file in place of whatever flat file the host has.
pub fn operator() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(FLAT_FILE_ENV, test_flat_file());
    cmd
}

/// What one call printed and returned.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Reply {
    fn from(out: std::process::Output) -> Reply {
        Reply {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Reply {
    /// stdout as JSON; panics with the whole reply when it is not exactly one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }

    /// The result of a successful call.
    pub fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "call failed: {self:?}");
        self.json()
    }

    /// Asserts success with nothing on stdout (DEL, CHECK, GC, STATUS).
    pub fn ok_empty(&self) {
        assert_eq!(self.code, 0, "call failed: {self:?}");
        assert!(
            self.stdout.trim().is_empty(),
            "stdout must be empty: {self:?}"
        );
    }

    /// The CNI error code of a failed call, checking the error JSON's shape.
    pub fn err_code(&self) -> u64 {
        assert_ne!(self.code, 0, "call should fail: {self:?}");
        let v = self.json();
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error without msg: {self:?}"
        );
        assert!(
            v["cniVersion"].is_string(),
            "error without cniVersion: {self:?}"
        );
        v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without code: {self:?}"))
    }

    pub fn msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or_default().to_string()
    }
}

/// Runs the binary with a clean environment plus `vars`, feeding `stdin`. The tests' flat file
/// applies unless `vars` names another.
pub fn run<K: AsRef<OsStr>, V: AsRef<OsStr>>(vars: &[(K, V)], stdin: &str) -> Reply {
    run_bin(bin(), vars, stdin)
}

/// As [`run`], with another build of the plugin.
pub fn run_bin<K: AsRef<OsStr>, V: AsRef<OsStr>>(bin: &str, vars: &[(K, V)], stdin: &str) -> Reply {
    let mut child = Command::new(bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(FLAT_FILE_ENV, test_flat_file())
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the whereabouts binary");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("wait for whereabouts");
    Reply::from(out)
}

/// The addresses of a 0.3.0-or-later result, in order.
pub fn ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap_or_else(|| panic!("result without ips: {result}"))
        .iter()
        .map(|ip| ip["address"].as_str().unwrap().to_string())
        .collect()
}

/// The address without its prefix length.
pub fn bare(address: &str) -> String {
    address.split('/').next().unwrap().to_string()
}

/// A network configuration using the local store in its own temporary folder.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub conf: Value,
}

impl Net {
    /// A 1.1.0 network named `testnet` whose ipam is `ipam` plus a private `local_path`.
    pub fn local(ipam: Value) -> Net {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut conf =
            json!({"cniVersion": "1.1.0", "name": "testnet", "type": "bridge", "ipam": ipam});
        conf["ipam"]["type"] = "whereabouts".into();
        if conf["ipam"].get("local_path").is_none() {
            conf["ipam"]["local_path"] = dir.path().join("whereabouts.db").to_string_lossy().into();
        }
        Net { dir, conf }
    }

    /// Another network configuration (name, ipam) sharing this one's database.
    pub fn sibling(&self, name: &str, ipam: Value) -> Value {
        let mut conf = json!({"cniVersion": "1.1.0", "name": name, "type": "bridge", "ipam": ipam});
        conf["ipam"]["type"] = "whereabouts".into();
        conf["ipam"]["local_path"] = self.conf["ipam"]["local_path"].clone();
        conf
    }

    pub fn db(&self) -> PathBuf {
        PathBuf::from(self.conf["ipam"]["local_path"].as_str().unwrap())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn call(&self, command: &str, container: &str, ifname: &str, args: &str) -> Reply {
        call_with(&self.conf, command, container, ifname, args)
    }

    pub fn add(&self, container: &str, ifname: &str) -> Reply {
        self.call("ADD", container, ifname, "")
    }

    /// ADD for pod `ns/name`.
    pub fn add_pod(&self, container: &str, ifname: &str, pod: &str) -> Reply {
        self.call("ADD", container, ifname, &pod_args(pod))
    }

    pub fn del(&self, container: &str, ifname: &str) -> Reply {
        self.call("DEL", container, ifname, "")
    }
}

/// CNI_ARGS naming pod `ns/name` (its UID made up from the name).
pub fn pod_args(pod: &str) -> String {
    let name = pod.split_once('/').map_or(pod, |(_, name)| name);
    pod_args_with_uid(pod, &format!("uid-{name}"))
}

/// CNI_ARGS naming pod `ns/name` with its UID.
pub fn pod_args_with_uid(pod: &str, uid: &str) -> String {
    let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}")
}

/// One CNI call with `conf` on stdin.
pub fn call_with(conf: &Value, command: &str, container: &str, ifname: &str, args: &str) -> Reply {
    call_bin(bin(), conf, command, container, ifname, args)
}

/// As [`call_with`], with another build of the plugin.
pub fn call_bin(
    bin: &str,
    conf: &Value,
    command: &str,
    container: &str,
    ifname: &str,
    args: &str,
) -> Reply {
    let conf = conf.to_string();
    run_bin(
        bin,
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", "/var/run/netns/whereabouts-test"),
            ("CNI_IFNAME", ifname),
            ("CNI_ARGS", args),
            ("CNI_PATH", "/opt/cni/bin"),
        ],
        &conf,
    )
}

/// Fails in CI, otherwise prints a loud notice: for prerequisites a test cannot run without.
/// Returns true when the test should be skipped.
pub fn missing_prerequisite(what: &str) -> bool {
    if in_ci() {
        panic!("prerequisite missing in CI: {what} (.ci/run must install it)");
    }
    eprintln!("\n*** SKIPPED: {what} ***\n");
    true
}
