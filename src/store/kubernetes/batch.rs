//! Combining a node's concurrent requests in the agent: every ADD (and every DEL) of a pool
//! waits in an in-memory queue of that pool; one task per busy queue serves whatever waits with
//! one read and one conditional write of the pool, then whatever arrived meanwhile, until the
//! queue is empty. ADDs that arrive while a batch makes its reservations join it (once per
//! round) and share its write. The write tests every entry it relies on (the whole pool's
//! resourceVersion while Go binaries may write it), so combining saves requests and collisions,
//! never a check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio_util::task::TaskTracker;

use super::api::ApiError;
use super::job::{Granted, Job};
use crate::k8s::crd::IPPool;
use crate::store::queues::{lock, Observer, Queues};
use crate::store::{Allocation, StoreError};

/// A DEL of one attachment in one pool.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PendingRelease {
    pub container_id: String,
    pub ifname: String,
}

/// How long after losing a reservation race in a pool the agent's next ADDs of that pool spread
/// from their first try: other nodes are still taking the lowest free addresses.
pub const CONTENDED_FOR: Duration = Duration::from_secs(2);

/// The agent's queues, one per pool (and way of allocating in it).
pub struct Batches {
    pub adds: Queues<Job, Result<Granted, StoreError>>,
    pub releases: Queues<PendingRelease, Result<Vec<Allocation>, StoreError>>,
    pub observer: Arc<dyn Observer>,
    /// When each pool last lost a reservation race to another writer.
    last_race: Mutex<HashMap<String, Instant>>,
    /// Each pool as the agent last wrote it. The watch may not have brought the agent's own
    /// write yet, and a guess that lacked it could miss an attachment's entry.
    written: Mutex<HashMap<String, IPPool>>,
    /// The tasks that write for the queues and for requests whose caller may have hung up: a
    /// stopping agent waits for them, or a write half done (a reservation without its pool
    /// entry) would be left to the orphan sweep.
    pub work: TaskTracker,
}

impl Batches {
    pub fn new(observer: Arc<dyn Observer>) -> Batches {
        Batches {
            adds: Queues::new("add", observer.clone()),
            releases: Queues::new("del", observer.clone()),
            observer,
            last_race: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
            work: TaskTracker::new(),
        }
    }

    /// Remembers `pool` as the agent wrote it (the server's answer to the write), without the
    /// managedFields no batch reads, as the watched copies keep it.
    pub fn wrote(&self, pool: &IPPool) {
        if let Some(name) = &pool.metadata.name {
            let mut kept = pool.clone();
            kept.metadata.managed_fields = None;
            lock(&self.written).insert(name.clone(), kept);
        }
    }

    /// Pool `name` as the agent last wrote it.
    pub fn last_written(&self, name: &str) -> Option<IPPool> {
        lock(&self.written).get(name).cloned()
    }

    /// Another writer took an address an ADD of `pool` had chosen.
    pub fn lost_race(&self, pool: &str) {
        let mut races = lock(&self.last_race);
        races.retain(|_, at| at.elapsed() < CONTENDED_FOR);
        races.insert(pool.to_string(), Instant::now());
    }

    /// Whether `pool` lost a race lately: the contention hint of its next ADDs
    /// ([`crate::ipam::Contention`]), which an uncontended pool never gets.
    pub fn contended(&self, pool: &str) -> bool {
        lock(&self.last_race)
            .get(pool)
            .is_some_and(|at| at.elapsed() < CONTENDED_FOR)
    }
}

/// Whether `entry`, among the pool's `entries`, is one the DEL `pending` releases.
pub fn released_by(
    entry: &super::pool_doc::Entry,
    entries: &[super::pool_doc::Entry],
    pending: &PendingRelease,
) -> bool {
    let others = super::pool_doc::holders(entries);
    super::pool_doc::named_by(
        &entry.attachment,
        others,
        &pending.container_id,
        &pending.ifname,
    )
}

/// Whether the released entry of `holder`, among the batch's `released` holders, is handed back
/// to the DEL `pending`: as [`released_by`] picked it.
pub fn answers(
    holder: &crate::store::Attachment,
    released: &[&crate::store::Attachment],
    pending: &PendingRelease,
) -> bool {
    let others = released.iter().copied();
    super::pool_doc::named_by(holder, others, &pending.container_id, &pending.ifname)
}

/// One batch served: each job's answer, or the failure of the batch as a whole.
pub type Served<T> = Result<Vec<Result<T, StoreError>>, StoreError>;

/// The answers of `jobs`, whose batch failed with `err`. When the server refused the batch's
/// writes for what they carry ([`refused_for_its_content`]), fewer jobs may pass where all of
/// them together did not: each half is served apart with `serve`, down to one job, so that a
/// job which alone passes is not failed for its neighbours. At most one batch less than twice
/// as many jobs, and only when refused; any other failure answers every job.
pub fn in_halves<'a, J, T>(
    mut jobs: Vec<J>,
    err: StoreError,
    serve: &'a (dyn Fn(Vec<J>) -> BoxFuture<'a, Served<T>> + Send + Sync),
) -> BoxFuture<'a, Vec<Result<T, StoreError>>>
where
    J: Clone + Send + 'a,
    T: Send + 'a,
{
    Box::pin(async move {
        if jobs.len() < 2 || !refused_for_its_content(&err) {
            return jobs.iter().map(|_| Err(err.clone())).collect();
        }
        tracing::debug!(jobs = jobs.len(), %err, "batch refused; serving its halves apart");
        let second = jobs.split_off(jobs.len() / 2);
        let mut answers = Vec::new();
        for half in [jobs, second] {
            answers.extend(match serve(half.clone()).await {
                Ok(served) => served,
                Err(err) => in_halves(half, err, serve).await,
            });
        }
        answers
    })
}

/// Whether the server refused a batch's writes for what they carry, so that fewer jobs may pass:
/// the pool too large to store, a pool update refused while the pool was unchanged (an
/// admission policy), a create refused (a policy on reservations or new pools).
fn refused_for_its_content(err: &StoreError) -> bool {
    let StoreError::Io {
        cause: Some(cause), ..
    } = err
    else {
        return false;
    };
    cause.downcast_ref::<ApiError>().is_some_and(|err| {
        err.is_refused() || matches!(err, ApiError::TooLarge(_) | ApiError::Conflict(_))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::queues::Quiet;

    #[test]
    fn only_refusals_of_what_a_batch_carries_split_it() {
        let refused = |cause: ApiError| StoreError::io("refused").because(cause);
        let too_large = ApiError::TooLarge("etcdserver: request is too large".into());
        assert!(refused_for_its_content(&refused(too_large)));
        let policy = ApiError::Conflict("denied by a policy, the pool unchanged".into());
        assert!(refused_for_its_content(&refused(policy)));
        let create: StoreError = ApiError::Refused("forbidden".into()).into();
        assert!(refused_for_its_content(&create));
        // Nothing the server said about the batch's content: splitting cannot help.
        let unavailable: StoreError = ApiError::Transient("503".into()).into();
        assert!(!refused_for_its_content(&unavailable));
        assert!(!refused_for_its_content(&StoreError::io(
            "the pool does not decode"
        )));
        let exhausted = StoreError::Exhausted {
            range: "10.0.0.0/30".into(),
        };
        assert!(!refused_for_its_content(&exhausted));
    }

    /// Jobs "ok" pass, any batch holding "no" is refused: only "no" fails, in order.
    #[tokio::test]
    async fn a_refused_batch_is_served_in_halves_down_to_the_job_refused() {
        let served = std::sync::atomic::AtomicUsize::new(0);
        let serve = |half: Vec<&'static str>| -> BoxFuture<'_, Served<&'static str>> {
            served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                if half.contains(&"no") {
                    return Err(StoreError::io("refused").because(ApiError::Refused("no".into())));
                }
                Ok(half.into_iter().map(Ok).collect())
            })
        };
        let jobs = vec!["ok", "ok", "no", "ok", "ok"];
        let err = StoreError::io("refused").because(ApiError::Refused("no".into()));
        let answers = in_halves(jobs, err, &serve).await;
        let passed: Vec<bool> = answers.iter().map(Result::is_ok).collect();
        assert_eq!(passed, [true, true, false, true, true]);
        let batches = served.load(std::sync::atomic::Ordering::SeqCst);
        // [ok ok] passes; [no ok ok] is refused, then [no] alone and [ok ok] passes.
        assert_eq!(batches, 4);
        let busy = StoreError::try_again("busy");
        let answers = in_halves(vec!["ok", "ok"], busy, &serve).await;
        assert!(
            answers.iter().all(Result::is_err),
            "not refused: every job answered so"
        );
    }

    #[test]
    fn only_a_pool_that_lost_a_race_is_contended() {
        let batches = Batches::new(Arc::new(Quiet));
        assert!(!batches.contended("a"), "no race yet: lowest free first");
        batches.lost_race("a");
        assert!(batches.contended("a"));
        assert!(
            !batches.contended("b"),
            "another pool keeps lowest free first"
        );
    }

    #[test]
    fn a_race_is_forgotten_after_its_time() {
        let batches = Batches::new(Arc::new(Quiet));
        let long_ago = Instant::now().checked_sub(CONTENDED_FOR * 2);
        let Some(long_ago) = long_ago else {
            return; // A clock this young cannot stand for the past.
        };
        lock(&batches.last_race).insert("a".into(), long_ago);
        assert!(!batches.contended("a"));
        batches.lost_race("b");
        assert!(
            !lock(&batches.last_race).contains_key("a"),
            "old races are dropped"
        );
    }
}
