//! Whole-process benchmark: ADD and DEL through our binary and through Debian's `host-local`,
//! on the same machine in the same run, one at a time and 8 at a time. Prints per-operation
//! medians and our/host-local ratio; with `WHEREABOUTS_EARLIER_BINARY` also an earlier build
//! of ours, and the ratio this build/the earlier one. The static builds that the image ships
//! (the plugin-only build and the full binary) are measured too when `hack/images/build` has
//! made them, and every plugin's bare `VERSION` call (process start alone).
//!
//! Run: `cargo bench --bench plugin_vs_host_local` (needs containernetworking-plugins).

mod earlier;
mod shipped;
#[path = "../tests/common/trust.rs"]
mod trust;

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HOST_LOCAL: &str = "/usr/lib/cni/host-local";
const OPS_PER_WORKER: usize = 200;
/// Rounds in which the plugins take turns.
const ROUNDS: usize = 4;

struct Plugin {
    name: &'static str,
    exe: PathBuf,
    conf: String,
}

fn call(plugin: &Plugin, command: &str, container: &str) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(&plugin.exe)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(trust::FLAT_FILE_ENV, trust::test_flat_file())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start plugin");
    // A plugin may answer without reading its input (host-local's VERSION, once started from
    // a fresh copy, often did): its status says whether it failed.
    let mut stdin = child.stdin.take().unwrap();
    let written = stdin.write_all(plugin.conf.as_bytes());
    drop(stdin);
    if let Err(err) = written {
        let name = plugin.name;
        assert_eq!(err.kind(), ErrorKind::BrokenPipe, "write to {name}: {err}");
    }
    let out = child.wait_with_output().expect("wait plugin");
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{} {command} failed: {}",
        plugin.name,
        String::from_utf8_lossy(&out.stdout)
    );
    elapsed
}

/// Runs `workers` threads, each doing `ops` ADDs then as many DELs; returns the ADD and DEL
/// latencies and the wall time. `round` keeps the container IDs of rounds apart.
fn measure(
    plugin: &Plugin,
    workers: usize,
    ops: usize,
    round: usize,
) -> (Vec<Duration>, Vec<Duration>, Duration) {
    let start = Instant::now();
    let results: Vec<(Vec<Duration>, Vec<Duration>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    let ids: Vec<String> = (0..ops)
                        .map(|i| format!("bench-{workers}-{round}-{w}-{i}"))
                        .collect();
                    let adds = ids.iter().map(|id| call(plugin, "ADD", id)).collect();
                    let dels = ids.iter().map(|id| call(plugin, "DEL", id)).collect();
                    (adds, dels)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = start.elapsed();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for (a, d) in results {
        adds.extend(a);
        dels.extend(d);
    }
    (adds, dels, wall)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if !Path::new(HOST_LOCAL).exists() {
        eprintln!("{HOST_LOCAL} is missing: apt-get install containernetworking-plugins");
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().unwrap();
    // Each build, and host-local, runs from a fresh copy in one folder: where a binary's file
    // lies (cargo's hard-linked output against a plain copy) moved process start by a tenth of
    // a millisecond.
    let whereabouts = |name: &'static str, exe: PathBuf, db: &str| Plugin {
        name,
        exe: {
            let copy = dir.path().join(format!("{name}.bin"));
            std::fs::copy(&exe, &copy).expect("copy the binary");
            copy
        },
        conf: serde_json::json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge",
            "ipam": {"type": "whereabouts", "range": "10.0.0.0/16", "log_level": "error",
                     "local_path": dir.path().join(db)}})
        .to_string(),
    };
    let mut plugins = vec![
        whereabouts(
            "whereabouts",
            PathBuf::from(env!("CARGO_BIN_EXE_whereabouts")),
            "wb.db",
        ),
        Plugin {
            name: "host-local",
            exe: {
                let copy = dir.path().join("host-local.bin");
                std::fs::copy(HOST_LOCAL, &copy).expect("copy host-local");
                copy
            },
            conf: serde_json::json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge",
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.0.0/16"}]],
                         "dataDir": dir.path().join("host-local")}})
            .to_string(),
        },
    ];
    // What the image ships, the static builds that `hack/images/build` makes: the installer
    // copies the plugin-only build to nodes whose agent serves the plugin (the default), the
    // full binary to the others. Both start faster than cargo's dynamically linked build.
    let shipped = [
        ("plugin-only", "whereabouts-plugin"),
        ("full static", "whereabouts"),
    ];
    for (name, file) in shipped {
        match shipped::static_build(file) {
            Some(exe) => plugins.push(whereabouts(name, exe, &format!("{file}.db"))),
            None => println!("no static {file} (hack/images/build makes it): not measured"),
        }
    }
    if let Some(exe) = earlier::binary() {
        plugins.push(whereabouts("earlier", exe, "earlier.db"));
    }
    // Process start alone: a VERSION call reads no configuration and opens no store.
    for p in &plugins {
        let starts = (0..OPS_PER_WORKER)
            .map(|_| call(p, "VERSION", "none"))
            .collect();
        println!("{:<12} VERSION p50 {:.3} ms", p.name, ms(median(starts)));
    }
    // Warm every plugin up (page cache, database creation) before measuring.
    for p in &plugins {
        call(p, "ADD", "warm");
        call(p, "DEL", "warm");
    }
    println!(
        "{:<12} {:>8} {:>12} {:>12} {:>12}",
        "plugin", "workers", "ADD p50 ms", "DEL p50 ms", "ops/s"
    );
    for workers in [1, 8] {
        // The plugins take turns, a few rounds each, so that a drift of the machine (other
        // load, the cache, the clock) falls on all of them alike.
        let mut samples: Vec<(Vec<Duration>, Vec<Duration>, Duration)> =
            vec![(Vec::new(), Vec::new(), Duration::ZERO); plugins.len()];
        for round in 0..ROUNDS {
            for (p, sample) in plugins.iter().zip(&mut samples) {
                let (adds, dels, wall) = measure(p, workers, OPS_PER_WORKER / ROUNDS, round);
                sample.0.extend(adds);
                sample.1.extend(dels);
                sample.2 += wall;
            }
        }
        let mut medians = Vec::new();
        for (p, (adds, dels, wall)) in plugins.iter().zip(samples) {
            let ops = (adds.len() + dels.len()) as f64 / wall.as_secs_f64();
            let (a, d) = (median(adds), median(dels));
            println!(
                "{:<12} {:>8} {:>12.3} {:>12.3} {:>12.0}",
                p.name,
                workers,
                ms(a),
                ms(d),
                ops
            );
            medians.push((a, d, ops));
        }
        // Every build of ours against host-local (plugins[1]), and this build against the
        // earlier one (the last plugin) when there is one.
        let mut pairs: Vec<(usize, usize)> = (0..plugins.len())
            .filter(|i| *i != 1)
            .map(|i| (i, 1))
            .collect();
        if plugins.last().is_some_and(|p| p.name == "earlier") {
            pairs.push((0, plugins.len() - 1));
        }
        for (a, b) in pairs {
            let (x, y) = (medians[a], medians[b]);
            println!(
                "ratio {}/{}, {workers} at a time: ADD {:.2}, DEL {:.2}, throughput {:.2}x",
                plugins[a].name,
                plugins[b].name,
                ms(x.0) / ms(y.0),
                ms(x.1) / ms(y.1),
                x.2 / y.2
            );
        }
    }
}
