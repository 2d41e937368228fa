//! A burst of concurrent ADDs (and DELs) through the real binary, as many nodes' runtimes would
//! issue them.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cni::{run, Call, Reply};

pub struct Burst {
    pub calls: usize,
    pub parallel: usize,
    pub nodes: usize,
    pub command: &'static str,
}

pub struct Outcome {
    pub wall: Duration,
    /// Per call: (index, time taken, reply).
    pub calls: Vec<(usize, Duration, Reply)>,
}

impl Outcome {
    /// The `p`-quantile of the call times.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut times: Vec<Duration> = self.calls.iter().map(|c| c.1).collect();
        times.sort();
        if times.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((times.len() as f64 - 1.0) * p).round() as usize;
        times[idx.min(times.len() - 1)]
    }
}

pub fn container(i: usize) -> String {
    format!("burst-{i}")
}

/// Runs `burst.calls` calls, `burst.parallel` at a time; call i is container `burst-<i>`, pod
/// `bench/pod-<i>`, on node `node-<i % nodes>`.
pub fn run_burst(bin: &Path, conf: &str, burst: &Burst, env: &[(&'static str, String)]) -> Outcome {
    run_burst_per_node(bin, conf, burst, env, &[])
}

/// As [`run_burst`], with extra environment per node (`node_env[n]` for node `node-<n>`, e.g.
/// its agent's socket).
pub fn run_burst_per_node(
    bin: &Path,
    conf: &str,
    burst: &Burst,
    env: &[(&'static str, String)],
    node_env: &[Vec<(&'static str, String)>],
) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let workers: Vec<_> = (0..burst.parallel)
        .map(|_| {
            let next = next.clone();
            let results = results.clone();
            let conf = conf.to_string();
            let bin = bin.to_path_buf();
            let env = env.to_vec();
            let node_env = node_env.to_vec();
            let (calls, nodes, command) = (burst.calls, burst.nodes, burst.command);
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= calls {
                    return;
                }
                let container = container(i);
                let pod = format!("pod-{i}");
                let node = format!("node-{}", i % nodes.max(1));
                let mut env = env.clone();
                if let Some(more) = node_env.get(i % nodes.max(1)) {
                    env.extend(more.iter().cloned());
                }
                let began = Instant::now();
                let reply = run(
                    &bin,
                    &Call {
                        command,
                        container: &container,
                        ifname: "net1",
                        pod: Some(("bench", &pod)),
                        node: Some(&node),
                        env: env.clone(),
                    },
                    &conf,
                );
                results.lock().unwrap().push((i, began.elapsed(), reply));
            })
        })
        .collect();
    for w in workers {
        w.join().expect("burst worker");
    }
    let wall = start.elapsed();
    let mut calls = std::mem::take(&mut *results.lock().unwrap());
    calls.sort_by_key(|c| c.0);
    Outcome { wall, calls }
}
