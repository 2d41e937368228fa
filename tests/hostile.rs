//! A NetworkAttachmentDefinition is written by namespace users and run as root: what such a
//! configuration (and a broken environment) must not be able to do, through the real binary.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

/// Runs the binary with `vars` (raw bytes allowed) on top of a DEL's environment.
fn run_raw(vars: &[(&OsStr, &OsStr)], stdin: &str) -> Reply {
    let mut child = Command::new(bin())
        .env_clear()
        .envs([
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ])
        .env(FLAT_FILE_ENV, test_flat_file())
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the whereabouts binary");
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("wait for whereabouts");
    Reply {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
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
