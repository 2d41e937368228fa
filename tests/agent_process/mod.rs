//! A node agent (`whereabouts agent`) run as a process for tests and benchmarks: its own flat
//! file and socket (one per simulated node), started, killed and restarted on demand.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// This package's binary, the agent unless a test or benchmark names another build.
fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
}

/// One node's agent: its flat file, socket and log, and the process while it runs.
pub struct Agent {
    /// The binary run as the agent.
    binary: PathBuf,
    pub flat_file: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Environment of the agent's process beyond `PATH` and the flat file's path.
    env: Vec<(String, String)>,
    /// Arguments after `agent`.
    args: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent whose flat file holds `settings` and its socket's path, and waits until
    /// it is ready (its engine answers).
    pub fn start(dir: &Path, node: &str, settings: Value) -> Agent {
        Agent::start_build(bin(), dir, node, settings)
    }

    /// As [`Agent::start`], running `binary` (another build of `whereabouts`) as the agent.
    pub fn start_build(binary: &Path, dir: &Path, node: &str, settings: Value) -> Agent {
        let socket = dir.join(format!("{node}.sock"));
        let mut agent = Agent::spawn(binary, dir, node, settings, &socket, &[], &[]);
        agent.wait_ready();
        agent
    }

    /// As [`Agent::start`], with `env` in the agent's environment (the engine's timeouts, say).
    pub fn start_with_env(dir: &Path, node: &str, settings: Value, env: &[(&str, &str)]) -> Agent {
        let socket = dir.join(format!("{node}.sock"));
        let mut agent = Agent::spawn(bin(), dir, node, settings, &socket, env, &[]);
        agent.wait_ready();
        agent
    }

    /// As [`Agent::start`], for a test that expects the agent may never become ready: the
    /// reason (its log) instead of a panic.
    pub fn try_start(
        dir: &Path,
        node: &str,
        settings: Value,
        within: Duration,
    ) -> Result<Agent, String> {
        let socket = dir.join(format!("{node}.sock"));
        let mut agent = Agent::spawn(bin(), dir, node, settings, &socket, &[], &[]);
        agent.ready_within(within).map(|()| agent)
    }

    /// Starts an agent on `socket` (which another agent may serve) with `args` after `agent`,
    /// without waiting for anything: for a test of an agent that must not start.
    pub fn launch_on(
        dir: &Path,
        node: &str,
        settings: Value,
        socket: &Path,
        args: &[&str],
    ) -> Agent {
        Agent::spawn(bin(), dir, node, settings, socket, &[], args)
    }

    fn spawn(
        binary: &Path,
        dir: &Path,
        node: &str,
        settings: Value,
        socket: &Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Agent {
        let socket = socket.to_path_buf();
        let flat_file = dir.join(format!("{node}.conf"));
        let mut flat = settings;
        flat["agent_socket"] = json!(socket);
        // A test's plugin may read this file too: the tests' trust rules, unless the test sets
        // its own.
        let temp = std::env::temp_dir();
        let temp = temp.canonicalize().unwrap_or(temp);
        for (key, value) in [
            ("allow_inline_paths", json!([temp])),
            ("allow_inline_endpoints", json!(true)),
            ("allow_insecure_tls", json!(true)),
        ] {
            if flat.get(key).is_none() {
                flat[key] = value;
            }
        }
        std::fs::write(&flat_file, flat.to_string()).unwrap();
        let mut agent = Agent {
            binary: binary.to_path_buf(),
            flat_file,
            socket,
            log: dir.join(format!("{node}.log")),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        agent.launch();
        agent
    }

    pub fn restart(&mut self) {
        self.launch();
        self.wait_ready();
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.binary)
            .arg("agent")
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WHEREABOUTS_FLAT_FILE", &self.flat_file)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent");
        self.child = Some(child);
    }

    /// Polls `/readyz` until it answers 200 (the agent connects and checks its engine first).
    pub fn wait_ready(&mut self) {
        if let Err(why) = self.ready_within(Duration::from_secs(60)) {
            panic!("{why}");
        }
    }

    fn ready_within(&mut self, within: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some((200, _)) = get(&self.socket, "/readyz") {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("the agent exited ({status}): {}", self.log_text()));
            }
            if started.elapsed() > within {
                return Err(format!("the agent is not ready: {}", self.log_text()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded by `within`) for the process to exit: its status, or None while it runs.
    pub fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("the agent's status") {
                self.child = None;
                return Some(status);
            }
            if started.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits (bounded by `within`) for the process to finish and exit.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        self.stop();
        self.exited_within(within)
    }

    /// SIGTERM, as the kubelet stops a pod, without waiting.
    pub fn stop(&self) {
        let pid = libc::pid_t::try_from(self.pid().expect("a running agent")).expect("a pid");
        // SAFETY: signals our own child, not yet waited for (so its pid is not reused).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: nothing is finished, nothing cleaned up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The value of a metric line starting with `prefix` (0 when absent).
    pub fn metric(&self, prefix: &str) -> f64 {
        let (status, text) = get(&self.socket, "/metrics").expect("metrics");
        assert_eq!(status, 200);
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The environment of this node's plugin: the agent's socket. The plugin reads the tests'
    /// flat file, which names no store: the network configuration's is the node's.
    pub fn env(&self) -> (&'static str, String) {
        (
            "WHEREABOUTS_AGENT_SOCKET",
            self.socket.display().to_string(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A GET on the agent's socket: status and body, or None when nothing answers.
pub fn get(socket: &Path, path: &str) -> Option<(u16, String)> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}
