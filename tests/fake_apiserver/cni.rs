//! Calling the real binary as a runtime does: CNI variables in a clean environment and the
//! network configuration on stdin.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

// Shared with `common`, which some test crates also include.
#[allow(clippy::duplicate_mod)]
#[path = "../common/trust.rs"]
pub mod trust;

/// One call of the plugin.
pub struct Call<'a> {
    pub command: &'a str,
    pub container: &'a str,
    pub ifname: &'a str,
    pub pod: Option<(&'a str, &'a str)>,
    /// `$NODENAME`, unset when None.
    pub node: Option<&'a str>,
    /// Extra environment, e.g. the engine's timeout.
    pub env: Vec<(&'a str, String)>,
}

#[derive(Debug)]
pub struct Reply {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }

    /// The CNI error code, 0 on success.
    pub fn cni_code(&self) -> u64 {
        if self.code == 0 {
            0
        } else {
            self.json()["code"].as_u64().unwrap_or(u64::MAX)
        }
    }

    /// The addresses of an ADD result (without prefix length).
    pub fn ips(&self) -> Vec<String> {
        self.json()["ips"]
            .as_array()
            .map(|ips| {
                ips.iter()
                    .filter_map(|ip| ip["address"].as_str())
                    .map(|a| a.split('/').next().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A network configuration delegating to whereabouts with `ipam`.
pub fn netconf(name: &str, ipam: &Value) -> String {
    json!({
        "cniVersion": "1.1.0",
        "name": name,
        "type": "macvlan",
        "ipam": ipam,
    })
    .to_string()
}

pub fn run(bin: &Path, call: &Call, stdin: &str) -> Reply {
    finish(start(bin, call, stdin))
}

/// The reply of a call [`start`]ed.
pub fn finish(child: std::process::Child) -> Reply {
    let out = child.wait_with_output().expect("wait for whereabouts");
    Reply {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The plugin process of `call`, its input written, not waited for.
pub fn start(bin: &Path, call: &Call, stdin: &str) -> std::process::Child {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container)
        .env("CNI_NETNS", "/var/run/netns/fake")
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", "/opt/cni/bin")
        .env(trust::FLAT_FILE_ENV, trust::test_flat_file());
    if let Some((ns, name)) = call.pod {
        cmd.env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
        );
    }
    if let Some(node) = call.node {
        cmd.env("NODENAME", node);
    }
    for (k, v) in &call.env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the whereabouts binary");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    child
}
