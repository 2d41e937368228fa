//! The node agent's copies of the runs (`runs`) of the pools it serves, each fed by an etcd
//! watch of the pool's run directory: listed at one revision, then followed from the next
//! one; listed again after the watch fails, is compacted away or seems stuck. A combined ADD
//! plans from them instead of reading (`combine`); its commit still compares every key it
//! relies on, so a copy behind the cluster costs a lost commit and a read, never a duplicate.
//! A pool is followed from its first ADD on this node, and only its runs: a few keys, however
//! many addresses it holds; once no batch has used it for a while (its network gone from the
//! node, say), it is let go, so that an agent running for months does not hold a watch for
//! every pool it ever served.
//!
//! No crate follows an etcd prefix into memory (kube's reflector is for the Kubernetes API),
//! so the list and the watch are written here, on etcd-client's own calls; the retry pacing
//! is backon's.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::Notify;

use super::keys::range_end;
use super::runs::ReadRun;
use super::session::SharedClient;
use super::window::{Window, AHEAD};
use crate::store::queues::{lock, Observer};
use crate::store::retry::growing_pauses;

/// A list or a watch that has not answered within this long is given up and started again.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// A copy that shows nothing new for this long while a batch waits for this agent's own change
/// is listed again: its watch may hang on a member that went silent. A watch lags by less
/// than this when its member applies a commit late (a follower that learns of it with the
/// next message from the leader), and catches up by itself.
const STUCK_AFTER: Duration = Duration::from_secs(1);

/// The node agent lets a pool's copy go once no batch has used it for this long. The next
/// batch of the pool reads, and follows it again.
pub const LET_GO_AFTER: Duration = Duration::from_secs(600);

/// How an agent follows pools: each copy is let go once unused for `let_go_after`, and at most
/// `at_most` are followed at once. The cap bounds what the agent asks of the members: each copy
/// is a watch, and whoever writes network configurations chooses how many ranges the node's
/// pods draw from (64 per configuration, each configuration as many as they like). A batch of a
/// pool beyond the cap reads the pool instead, as without copies; no address depends on it.
#[derive(Clone, Copy, Debug)]
pub struct Following {
    pub let_go_after: Duration,
    pub at_most: usize,
}

impl Following {
    /// The agent's: far more pools than a node's pods use, far fewer watches than would
    /// burden the members.
    pub const AGENT: Following = Following {
        let_go_after: LET_GO_AFTER,
        at_most: 512,
    };
}

/// The copies of the pools this agent serves.
pub(super) struct Copies {
    runtime: tokio::runtime::Handle,
    client: SharedClient,
    followed: Arc<Followed>,
}

/// The copies followed, by run directory, how they are followed, and who is told how many
/// are in step.
struct Followed {
    pools: Mutex<HashMap<String, Arc<PoolCopy>>>,
    following: Following,
    observer: Arc<dyn Observer>,
}

/// One pool's runs as its watch brings them.
pub(super) struct PoolCopy {
    state: Mutex<State>,
    advanced: Condvar,
    /// Wakes the follower to list again: a batch found the copy behind its own change for
    /// [`STUCK_AFTER`].
    relist: Notify,
    /// When a batch last asked for the copy; set under the lock of [`Followed::pools`].
    used: Mutex<Instant>,
}

#[derive(Default)]
struct State {
    /// The runs by key: value and revision.
    runs: BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
    /// Every change up to this revision is applied.
    revision: i64,
    /// Listed and followed since; false after a watch failure until the next list.
    synced: bool,
    /// Since when a batch has found the copy behind its own change, with nothing applied
    /// since.
    behind_since: Option<Instant>,
}

impl Copies {
    /// Copies followed on `runtime` by `client`, as `following` says.
    pub fn new(
        runtime: tokio::runtime::Handle,
        client: SharedClient,
        observer: Arc<dyn Observer>,
        following: Following,
    ) -> Copies {
        Copies {
            runtime,
            client,
            followed: Arc::new(Followed {
                pools: Mutex::new(HashMap::new()),
                following,
                observer,
            }),
        }
    }

    /// The copy of the pool whose runs are in `runs_dir`, followed from now on if it is not
    /// yet; `None` when it is not and the agent already follows as many as it may
    /// ([`Following::at_most`]).
    pub fn pool(&self, runs_dir: &str) -> Option<Arc<PoolCopy>> {
        let mut pools = lock(&self.followed.pools);
        if let Some(copy) = pools.get(runs_dir) {
            *lock(&copy.used) = Instant::now();
            return Some(copy.clone());
        }
        if pools.len() >= self.followed.following.at_most {
            return None;
        }
        let copy = Arc::new(PoolCopy::new());
        pools.insert(runs_dir.to_string(), copy.clone());
        self.followed.tell(&pools);
        let follow = follow_while_used(
            copy.clone(),
            self.client.clone(),
            runs_dir.to_string(),
            self.followed.clone(),
        );
        self.runtime.spawn(follow);
        Some(copy)
    }
}

impl Followed {
    /// Returns once `copy` (of `runs_dir`) has gone unused for `let_go_after`, taken out of
    /// the map: the next batch of the pool starts a new copy.
    async fn until_unused(&self, copy: &PoolCopy, runs_dir: &str) {
        loop {
            let unused = {
                let mut pools = lock(&self.pools);
                // Under the map's lock, where `Copies::pool` marks a use.
                let unused = lock(&copy.used).elapsed();
                if unused >= self.following.let_go_after {
                    pools.remove(runs_dir);
                    self.tell(&pools);
                    return;
                }
                unused
            };
            let left = self.following.let_go_after.saturating_sub(unused);
            tokio::time::sleep(left).await;
        }
    }

    /// Tells the observer how many of the copies followed are in step, after a copy listed,
    /// lost its step, was added or let go.
    fn report(&self) {
        self.tell(&lock(&self.pools));
    }

    /// [`Followed::report`], for a caller that holds the map's lock. Counting and telling under
    /// that lock keeps two reports from reaching the observer in the wrong order.
    fn tell(&self, pools: &HashMap<String, Arc<PoolCopy>>) {
        let in_step = pools.values().filter(|c| lock(&c.state).synced).count();
        self.observer.in_step("etcd", in_step, pools.len());
    }
}

impl State {
    fn window(&self, runs_dir: &str, from_key: &str, from: u128) -> Window {
        let run = |(key, (value, rev)): (&Vec<u8>, &(Vec<u8>, i64))| {
            ReadRun::from_parts(key, value, *rev)
        };
        let dir = runs_dir.as_bytes().to_vec();
        let at = from_key.as_bytes().to_vec();
        let floor = self
            .runs
            .range::<Vec<u8>, _>((Bound::Included(&dir), Bound::Included(&at)))
            .next_back()
            .and_then(run);
        let page: Vec<_> = self
            .runs
            .range::<Vec<u8>, _>((Bound::Excluded(&at), Bound::Excluded(&range_end(runs_dir))))
            .take(AHEAD as usize)
            .collect();
        let page_full = page.len() as i64 >= AHEAD;
        let ahead = page.into_iter().filter_map(run).collect();
        Window::of_runs(from, floor.into_iter().collect(), ahead, page_full)
    }
}

impl PoolCopy {
    fn new() -> PoolCopy {
        PoolCopy {
            state: Mutex::new(State::default()),
            advanced: Condvar::new(),
            relist: Notify::new(),
            used: Mutex::new(Instant::now()),
        }
    }

    /// The window of the runs in `runs_dir` from offset `from` (whose run key is `from_key`),
    /// as `window::gets` would read it, once the copy shows every change up to `revision`;
    /// `None` when it does not within `wait`, or is not in step (being listed). A copy in step
    /// that stays behind for [`STUCK_AFTER`], nothing applied meanwhile, is told to list again.
    pub fn window(
        &self,
        runs_dir: &str,
        from_key: &str,
        from: u128,
        revision: i64,
        wait: Duration,
    ) -> Option<Window> {
        let state = lock(&self.state);
        let (mut state, _) = self
            .advanced
            .wait_timeout_while(state, wait, |s| s.synced && s.revision < revision)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !state.synced {
            return None;
        }
        if state.revision < revision {
            let behind_since = *state.behind_since.get_or_insert_with(Instant::now);
            if behind_since.elapsed() >= STUCK_AFTER {
                self.relist.notify_one();
            }
            return None;
        }
        Some(state.window(runs_dir, from_key, from))
    }

    fn replace(&self, runs: BTreeMap<Vec<u8>, (Vec<u8>, i64)>, revision: i64) {
        *lock(&self.state) = State {
            runs,
            revision,
            synced: true,
            behind_since: None,
        };
        self.advanced.notify_all();
    }

    fn apply(&self, events: &[etcd_client::Event], revision: i64) {
        let mut state = lock(&self.state);
        for event in events {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => {
                    let stored = (kv.value().to_vec(), kv.mod_revision());
                    state.runs.insert(kv.key().to_vec(), stored);
                }
                EventType::Delete => {
                    state.runs.remove(kv.key());
                }
            }
        }
        state.revision = state.revision.max(revision);
        state.behind_since = None;
        self.advanced.notify_all();
    }

    fn lost_step(&self) {
        lock(&self.state).synced = false;
        self.advanced.notify_all();
    }
}

/// Follows a pool's runs while batches use them (`keep_following`). A copy let go is out of
/// step for whoever still holds it: a batch that asked just before reads instead.
async fn follow_while_used(
    copy: Arc<PoolCopy>,
    client: SharedClient,
    runs_dir: String,
    followed: Arc<Followed>,
) {
    let following = keep_following(&copy, client, &runs_dir, &followed);
    tokio::select! {
        () = following => {}
        () = followed.until_unused(&copy, &runs_dir) => {}
    }
    copy.lost_step();
}

/// Lists and follows a pool's runs; after a failure, again after a pause that grows while
/// failures repeat. Each list takes the session's client as it is then (it is replaced when
/// its TLS files are renewed).
async fn keep_following(
    copy: &PoolCopy,
    client: SharedClient,
    runs_dir: &str,
    followed: &Followed,
) {
    let pauses = || {
        growing_pauses(Duration::from_millis(100), Duration::from_secs(10))
            .with_jitter()
            .build()
    };
    let mut pause = pauses();
    loop {
        match list_and_watch(copy, &mut client.current(), runs_dir, followed).await {
            Ok(()) => pause = pauses(),
            Err(err) => tracing::debug!("etcd: following {runs_dir} failed: {err}"),
        }
        copy.lost_step();
        followed.observer.cache("etcd", false);
        followed.report();
        tokio::time::sleep(pause.next().unwrap_or(Duration::from_secs(10))).await;
    }
}

/// One list and the watch after it, until the watch ends; `Ok` when it ended cleanly
/// (cancelled or compacted away by the cluster, or found stuck by a batch).
async fn list_and_watch(
    copy: &PoolCopy,
    client: &mut Client,
    runs_dir: &str,
    followed: &Followed,
) -> Result<(), String> {
    let listed = tokio::time::timeout(CALL_LIMIT, list(client, runs_dir)).await;
    let (runs, revision) = listed
        .map_err(|_| format!("no list within {CALL_LIMIT:?}"))?
        .map_err(|e| e.to_string())?;
    copy.replace(runs, revision);
    followed.observer.cache("etcd", true);
    followed.report();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let watching = tokio::time::timeout(CALL_LIMIT, client.watch(runs_dir, Some(options))).await;
    let mut stream = watching
        .map_err(|_| format!("no watch within {CALL_LIMIT:?}"))?
        .map_err(|e| e.to_string())?;
    loop {
        let resp = tokio::select! {
            resp = stream.message() => resp.map_err(|e| e.to_string())?,
            () = copy.relist.notified() => return Ok(()),
        };
        let Some(resp) = resp else { return Ok(()) };
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
        followed.observer.cache("etcd", true);
    }
}

/// The runs under `runs_dir` at one revision, page by page.
async fn list(
    client: &mut Client,
    runs_dir: &str,
) -> Result<(BTreeMap<Vec<u8>, (Vec<u8>, i64)>, i64), etcd_client::Error> {
    const PAGE: i64 = 1000;
    let end = range_end(runs_dir);
    let mut runs = BTreeMap::new();
    let mut from = runs_dir.as_bytes().to_vec();
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
            runs.insert(kv.key().to_vec(), (kv.value().to_vec(), kv.mod_revision()));
        }
        if !more {
            return Ok((runs, revision));
        }
        from.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/w/pools/p/r/";

    fn key(offset: u128) -> String {
        format!("{DIR}{offset:032x}")
    }

    /// A copy listed at revision 5 with one run, 1 to 3.
    fn listed() -> PoolCopy {
        let copy = PoolCopy::new();
        let run = (key(3).into_bytes(), 4);
        copy.replace(BTreeMap::from([(key(1).into_bytes(), run)]), 5);
        copy
    }

    fn window(copy: &PoolCopy, revision: i64, wait: Duration) -> Option<Window> {
        copy.window(DIR, &key(1), 1, revision, wait)
    }

    /// Whether the copy has been told to list again (a permit waits on `relist`).
    fn told_to_relist(copy: &PoolCopy) -> bool {
        use futures::FutureExt;
        copy.relist.notified().now_or_never().is_some()
    }

    #[test]
    fn a_copy_in_step_at_the_revision_asked_gives_its_window() {
        let copy = listed();
        assert!(window(&copy, 5, Duration::ZERO).is_some());
        assert!(window(&copy, 4, Duration::ZERO).is_some());
        copy.lost_step();
        assert!(window(&copy, 5, Duration::ZERO).is_none(), "out of step");
        assert!(
            !told_to_relist(&copy),
            "a copy out of step lists again by itself"
        );
    }

    /// A full page of runs with an unreadable one among them still may have more after it:
    /// the window ends with the page's last readable run, and what lies beyond is read, not
    /// taken for free.
    #[test]
    fn a_page_with_an_unreadable_run_still_ends_the_window() {
        let copy = PoolCopy::new();
        let mut runs: BTreeMap<Vec<u8>, (Vec<u8>, i64)> = (1..=AHEAD as u128)
            .map(|i| {
                (
                    key(i * 10).into_bytes(),
                    (format!("{:032x}", i * 10).into_bytes(), 2),
                )
            })
            .collect();
        runs.insert(key(200).into_bytes(), (b"not an offset".to_vec(), 2));
        copy.replace(runs, 5);
        let window = copy.window(DIR, &key(1), 1, 5, Duration::ZERO).unwrap();
        let last = AHEAD as u128 * 10;
        // The page holds the runs at 10, 20, ..., the one at 200 unreadable: it is full, so
        // the window ends with its last run, short of what the page left unread.
        assert!(window.knows(last));
        assert!(
            !window.knows(last + 1),
            "the window claims the rest of the range"
        );
    }

    /// A copy behind the agent's own change waits for its watch, briefly; one behind for
    /// longer than its watch may lag is listed again, in case the watch hangs on a member gone
    /// silent. A change applied meanwhile shows the watch alive.
    #[test]
    fn a_copy_behind_for_too_long_is_told_to_list_again() {
        let copy = listed();
        assert!(window(&copy, 6, Duration::ZERO).is_none());
        assert!(!told_to_relist(&copy), "behind for a moment only");

        lock(&copy.state).behind_since = Some(Instant::now() - STUCK_AFTER);
        assert!(window(&copy, 6, Duration::ZERO).is_none());
        assert!(told_to_relist(&copy), "behind for STUCK_AFTER");

        lock(&copy.state).behind_since = Some(Instant::now() - STUCK_AFTER);
        copy.apply(&[], 5);
        assert!(window(&copy, 6, Duration::ZERO).is_none());
        assert!(!told_to_relist(&copy), "its watch delivered meanwhile");
    }
}
