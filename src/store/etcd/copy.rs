//! The node agent's copy of the pools' runs (`runs`), fed by an etcd watch: listed at one
//! revision, then followed from the next one; listed again after the watch fails or is
//! compacted away. A combined ADD plans from it instead of reading (`combine`); its commit
//! still compares every key it relies on, so a copy behind the cluster costs a lost commit and
//! a read, never a duplicate. Only the runs are kept: a few keys per pool, however many
//! addresses it holds (allocation records and index entries would cost memory per address).
//!
//! No crate follows an etcd prefix into memory (kube's reflector is for the Kubernetes API),
//! so the list and the watch are written here, on etcd-client's own calls; the retry pacing
//! is backon's.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};

use super::keys::range_end;
use super::runs::ReadRun;
use super::window::{Window, AHEAD};
use crate::store::queues::{lock, Observer};

/// What the copy holds of one key.
struct Stored {
    value: Vec<u8>,
    mod_revision: i64,
}

#[derive(Default)]
struct State {
    keys: BTreeMap<Vec<u8>, Stored>,
    /// Every change up to this revision is applied.
    revision: i64,
    /// Listed and followed since; false after a watch failure until the next list.
    synced: bool,
}

/// The copy, shared by the task that follows the cluster and the batches that plan from it.
pub(super) struct Copy {
    state: Mutex<State>,
    advanced: Condvar,
}

/// The copy at one revision, while a batch reads it.
pub(super) struct Seen<'a>(MutexGuard<'a, State>);

impl Copy {
    /// Starts following the runs under `pools_dir` on `runtime`, for as long as it runs.
    pub fn follow(
        runtime: &tokio::runtime::Handle,
        client: Client,
        pools_dir: String,
        observer: Arc<dyn Observer>,
    ) -> Arc<Copy> {
        let copy = Arc::new(Copy {
            state: Mutex::new(State::default()),
            advanced: Condvar::new(),
        });
        runtime.spawn(keep_following(copy.clone(), client, pools_dir, observer));
        copy
    }

    /// The copy once it has applied every change up to `revision`, if it does within `wait`
    /// and is in step with the cluster.
    pub fn at_least(&self, revision: i64, wait: Duration) -> Option<Seen<'_>> {
        let state = lock(&self.state);
        let (state, _) = self
            .advanced
            .wait_timeout_while(state, wait, |s| s.synced && s.revision < revision)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (state.synced && state.revision >= revision).then_some(Seen(state))
    }

    fn replace(&self, keys: BTreeMap<Vec<u8>, Stored>, revision: i64) {
        let mut state = lock(&self.state);
        *state = State {
            keys,
            revision,
            synced: true,
        };
        self.advanced.notify_all();
    }

    fn apply(&self, events: &[etcd_client::Event], revision: i64) {
        let mut state = lock(&self.state);
        for event in events {
            let Some(kv) = event.kv().filter(|kv| is_run(kv.key())) else {
                continue;
            };
            match event.event_type() {
                EventType::Put => {
                    let stored = Stored {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    };
                    state.keys.insert(kv.key().to_vec(), stored);
                }
                EventType::Delete => {
                    state.keys.remove(kv.key());
                }
            }
        }
        state.revision = state.revision.max(revision);
        self.advanced.notify_all();
    }

    fn lost_step(&self) {
        lock(&self.state).synced = false;
        self.advanced.notify_all();
    }
}

impl Seen<'_> {
    /// The window of runs from `from`, as `window::gets` would read it.
    pub fn window(&self, runs_dir: &str, run_key: &str, from: u128) -> Window {
        let run = |(key, stored): (&Vec<u8>, &Stored)| {
            ReadRun::from_parts(key, &stored.value, stored.mod_revision)
        };
        let dir = runs_dir.as_bytes().to_vec();
        let at = run_key.as_bytes().to_vec();
        let floor = self
            .0
            .keys
            .range::<Vec<u8>, _>((Bound::Included(&dir), Bound::Included(&at)))
            .next_back()
            .and_then(run);
        let ahead = self
            .0
            .keys
            .range::<Vec<u8>, _>((Bound::Excluded(&at), Bound::Excluded(&range_end(runs_dir))))
            .take(AHEAD as usize)
            .filter_map(run)
            .collect();
        Window::of_runs(from, floor.into_iter().collect(), ahead)
    }
}

/// Whether `key` (under the pools' directory) is a run key: `<pool>/r/<start>`.
fn is_run(key: &[u8]) -> bool {
    // Pool names are escaped, so the run directory is always the second segment from the end.
    key.rsplit(|b| *b == b'/').nth(1) == Some(b"r")
}

/// Lists and follows the pools' directory until the runtime stops; after a failure, again after a pause
/// that grows while failures repeat.
async fn keep_following(
    copy: Arc<Copy>,
    mut client: Client,
    prefix: String,
    observer: Arc<dyn Observer>,
) {
    let pauses = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut pause = pauses();
    loop {
        match list_and_watch(&copy, &mut client, &prefix, &*observer).await {
            Ok(()) => pause = pauses(),
            Err(err) => tracing::debug!("etcd: following {prefix} failed: {err}"),
        }
        copy.lost_step();
        observer.cache("etcd", false);
        tokio::time::sleep(pause.next().unwrap_or(Duration::from_secs(10))).await;
    }
}

/// One list and the watch after it, until the watch ends; `Ok` when it ended cleanly
/// (cancelled or compacted away by the cluster).
async fn list_and_watch(
    copy: &Copy,
    client: &mut Client,
    prefix: &str,
    observer: &dyn Observer,
) -> Result<(), etcd_client::Error> {
    let (keys, revision) = list(client, prefix).await?;
    copy.replace(keys, revision);
    observer.cache("etcd", true);
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = client.watch(prefix, Some(options)).await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() || resp.compact_revision() > 0 {
            return Ok(());
        }
        // Events come in revision order; a response without events reports progress.
        let revision = match resp.events().last().and_then(|e| e.kv()) {
            Some(kv) => kv.mod_revision(),
            None if resp.created() => continue,
            None => resp.header().map_or(0, |h| h.revision()),
        };
        copy.apply(resp.events(), revision);
        observer.cache("etcd", true);
    }
    Ok(())
}

/// Every key under `prefix` at one revision, page by page.
async fn list(
    client: &mut Client,
    prefix: &str,
) -> Result<(BTreeMap<Vec<u8>, Stored>, i64), etcd_client::Error> {
    const PAGE: i64 = 1000;
    let end = range_end(prefix);
    let mut keys = BTreeMap::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut resp = client.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        for kv in resp.take_kvs() {
            from = kv.key().to_vec();
            if is_run(kv.key()) {
                let stored = Stored {
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                };
                keys.insert(kv.key().to_vec(), stored);
            }
        }
        if !more {
            return Ok((keys, revision));
        }
        from.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::keys::Keys;

    #[test]
    fn only_run_keys_are_kept() {
        let keys = Keys::new("/w/");
        for pool in ["net-10.0.0.0-24", "r", "a/r"] {
            assert!(is_run(keys.run(pool, 7).as_bytes()), "{pool}");
            assert!(!is_run(keys.allocation(pool, 7).as_bytes()), "{pool}");
        }
    }
}
