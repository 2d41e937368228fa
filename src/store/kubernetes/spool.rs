//! Combining the ADDs of one node: a burst of pods on a node starts many plugin processes at
//! once, and if each wrote the pool on its own they would mostly collide (every write is a
//! compare-and-swap of the whole pool object). Instead each process drops its request into a
//! spool folder of the pool; whoever holds the folder's lock serves every request waiting there
//! with one read and one write of the pool, and leaves each answer in a file. A process that
//! finds its answer is done; one that gets the lock serves the others too.
//!
//! The lock is a node-local `flock`, released by the kernel when its holder dies; requests a
//! dead leader left half-served are served again (a repeated ADD is idempotent, and its
//! reservation is adopted).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::ipam::decide::stable_hash;
use crate::ipam::Range;
use crate::store::{Attachment, StoreError};

/// Where the spool folders live (one per pool); overridable, e.g. to give simulated nodes on one
/// machine a spool each.
pub const SPOOL_ENV: &str = "WHEREABOUTS_KUBERNETES_SPOOL";
const DEFAULT_SPOOL: &str = "/run/whereabouts/kubernetes";

/// One ADD's request for an address of the pool.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Job {
    pub container_id: String,
    pub ifname: String,
    pub pod_ref: Option<String>,
    /// A static address: its offset in decimal (128-bit).
    pub requested: Option<String>,
}

impl Job {
    pub fn new(who: &Attachment, requested: Option<u128>) -> Job {
        Job {
            container_id: who.container_id.clone(),
            ifname: who.ifname.clone(),
            pod_ref: who.pod_ref.clone(),
            requested: requested.map(|r| r.to_string()),
        }
    }

    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
            pod_ref: self.pod_ref.clone(),
            pod_uid: None,
        }
    }

    pub fn requested(&self) -> Option<u128> {
        self.requested.as_deref().and_then(|r| r.parse().ok())
    }
}

/// What a job was given.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Granted {
    pub ip: std::net::IpAddr,
    /// The key of the entry in `spec.allocations`.
    pub key: String,
    /// The reservation made for it by this ADD (name, uid), to take back on failure.
    pub reservation: Option<(String, Option<String>)>,
    /// False when the attachment already held the address (nothing to take back).
    pub fresh: bool,
}

/// A store error as it travels through an answer file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Failure {
    Exhausted {
        range: String,
    },
    InUse {
        ip: std::net::IpAddr,
        range: String,
        holder: String,
    },
    TryAgain(String),
    Config(String),
    Io(String),
}

impl From<&StoreError> for Failure {
    fn from(err: &StoreError) -> Failure {
        match err.clone() {
            StoreError::Exhausted { range } => Failure::Exhausted { range },
            StoreError::InUse { ip, range, holder } => Failure::InUse { ip, range, holder },
            // The answer file carries the words; the cause's type stays in this process.
            err @ StoreError::TryAgain { .. } => Failure::TryAgain(err.describe()),
            err @ StoreError::Config { .. } => Failure::Config(err.describe()),
            err @ (StoreError::Io { .. } | StoreError::Broken { .. }) => {
                Failure::Io(err.describe())
            }
        }
    }
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> StoreError {
        match f {
            Failure::Exhausted { range } => StoreError::Exhausted { range },
            Failure::InUse { ip, range, holder } => StoreError::InUse { ip, range, holder },
            Failure::TryAgain(m) => StoreError::try_again(m),
            Failure::Config(m) => StoreError::config(m),
            Failure::Io(m) => StoreError::io(m),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer(pub Result<Granted, Failure>);

/// What requests must share to be served together: the cluster, the pool, its range and the
/// way of allocating in it. A hash that every release computes alike: during an upgrade the
/// old and the new binary's ADDs still meet in one spool folder.
pub fn pool_key(
    scope: &str,
    pool: &str,
    range: &Range,
    network_name: &str,
    overlap: bool,
) -> String {
    let blocked: Vec<String> = range
        .blocked
        .as_slice()
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect();
    let parts = [
        pool.to_string(),
        range.cidr.to_string(),
        range.first.to_string(),
        range.last.to_string(),
        blocked.join(","),
        network_name.to_string(),
        overlap.to_string(),
        scope.to_string(),
    ];
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    format!("{:016x}", stable_hash(&parts, 0))
}

/// The spool folder of one pool on this node.
pub struct Spool {
    dir: PathBuf,
}

/// A request waiting in the spool; withdrawn when dropped unanswered (the ADD gave up).
pub struct Ticket {
    pub id: String,
    request: PathBuf,
}

impl Ticket {
    /// Takes the request out of the spool.
    pub fn withdraw(&self) {
        let _ = fs::remove_file(&self.request);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// The folder's lock, held while serving.
pub struct Lock(#[allow(dead_code)] File);

impl Spool {
    /// The spool of a pool on this machine: one folder per cluster, pool and way of allocating
    /// in it, so only requests that can be served together meet. None when no folder can be
    /// made (then every ADD writes on its own).
    pub fn open(
        scope: &str,
        pool: &str,
        range: &Range,
        network_name: &str,
        overlap: bool,
    ) -> Option<Spool> {
        let base = std::env::var_os(SPOOL_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL));
        let hash = pool_key(scope, pool, range, network_name, overlap);
        let dir = base.join(format!("{}.{hash}", sanitize(pool)));
        fs::create_dir_all(&dir).ok()?;
        Some(Spool { dir })
    }

    /// Leaves a request in the spool.
    pub fn submit(&self, job: &Job) -> std::io::Result<Ticket> {
        let id = format!(
            "{}-{}-{:x}",
            std::process::id(),
            sanitize(&job.container_id),
            rand::random::<u32>()
        );
        let request = self.dir.join(format!("req-{id}.json"));
        write_atomically(&self.dir, &request, &serde_json::to_vec(job)?)?;
        Ok(Ticket { id, request })
    }

    /// The lock, if nobody holds it.
    pub fn try_lock(&self) -> Option<Lock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))
            .ok()?;
        file.try_lock().ok()?;
        Some(Lock(file))
    }

    /// The answer to `ticket`, if there is one (consumed, with the request: a request without
    /// an answer would be served again).
    pub fn answer(&self, ticket: &Ticket) -> Option<Answer> {
        let path = self.dir.join(format!("res-{}.json", ticket.id));
        let bytes = fs::read(&path).ok()?;
        ticket.withdraw();
        let _ = fs::remove_file(&path);
        serde_json::from_slice(&bytes).ok()
    }

    /// The requests waiting to be served (while holding the lock), oldest first.
    pub fn pending(&self, _lock: &Lock) -> Vec<(String, Job)> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_prefix("req-")
                .and_then(|n| n.strip_suffix(".json"))
            else {
                if name.starts_with("res-") {
                    self.drop_if_stale(&entry.path());
                }
                continue;
            };
            if self.dir.join(format!("res-{id}.json")).exists() {
                continue;
            }
            let Ok(bytes) = fs::read(entry.path()) else {
                continue;
            };
            match serde_json::from_slice::<Job>(&bytes) {
                Ok(job) => {
                    let age = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((age, id.to_string(), job));
                }
                Err(_) => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        found.into_iter().map(|(_, id, job)| (id, job)).collect()
    }

    /// Answers a request (while holding the lock).
    pub fn reply(&self, _lock: &Lock, id: &str, answer: &Answer) {
        let path = self.dir.join(format!("res-{id}.json"));
        if let Ok(bytes) = serde_json::to_vec(answer) {
            let _ = write_atomically(&self.dir, &path, &bytes);
        }
    }

    /// Answers nobody collected (their ADD gave up) are removed after a while.
    fn drop_if_stale(&self, path: &Path) {
        let old = fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if old {
            let _ = fs::remove_file(path);
        }
    }
}

fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect()
}

/// Writes a file so that readers see all of it or nothing.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(
        ".tmp-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    fs::rename(&tmp, path)
}
