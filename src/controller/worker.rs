//! The one thread that owns the store: every release the controller makes goes through it, one
//! batch of work at a time. The store is synchronous (engines run their own I/O), so it lives
//! outside the async runtime; it reaches the Kubernetes API through the runtime's handle.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BlockingRetryable, ExponentialBuilder, Retryable};
use jiff::Timestamp;
use kube::api::DynamicObject;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::Store as Cached;
use kube::{Api, Client};
use tokio::runtime::Handle;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;

use super::events::{self, Released};
use super::leader::Leadership;
use super::metrics::{pool_stats, Metrics};
use crate::cleanup::judge::{
    freed_by_deletion, judge, judge_holder, PodState, SliceHolders, Verdict,
};
use crate::cleanup::plan::{plan, release_if_held};
use crate::cleanup::pods;
use crate::k8s::crd::OverlappingRangeIPReservation;
use crate::k8s::described::described_pools;
use crate::store::error::chain;
use crate::store::{Allocation, PoolRef, Reservation, Store};

pub enum Job {
    /// A pod was deleted (namespace/name, UID).
    Deleted { pod_ref: String, uid: String },
    /// A pod finished (Succeeded or Failed).
    Finished { pod_ref: String },
    /// Judge every allocation against every pod.
    Reconcile { why: &'static str },
}

/// The pacing of the worker's whole reads, over the store's and the client's own retries of
/// one request: two more attempts, half a second and a second later, for a busy store.
fn a_few_times() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_times(2)
}

/// How many Events the worker posts at once.
pub const EVENTS_IN_FLIGHT: usize = 8;

/// Where work for the store's worker goes.
pub type Jobs = UnboundedSender<Job>;

pub struct Worker {
    pub store: Box<dyn Store>,
    pub configured: Vec<PoolRef>,
    /// The cached NetworkAttachmentDefinitions, whose pools' capacities the gauges show; None
    /// where the controller does not follow them (no node slices).
    pub nads: Option<Cached<DynamicObject>>,
    pub handle: Handle,
    pub client: Client,
    /// Where the Kubernetes engine keeps its reservations; None with other engines.
    pub reservations: Option<Api<OverlappingRangeIPReservation>>,
    pub metrics: Arc<Metrics>,
    /// Posts the Events of releases; None when Events are turned off.
    pub reporter: Option<Reporter>,
    /// Bounds the Events being posted at once.
    pub event_permits: Arc<Semaphore>,
    /// Only the leader frees addresses; the others drop their work (the leader's own watch
    /// sees the same deletions, and a new leader starts with a full reconcile).
    pub leadership: Leadership,
    /// The worker's own queue, to come back to work that failed.
    pub requeue: Jobs,
    /// How long after a failed reconcile (or a lost batch of deletions) the next one runs.
    pub retry_after: Duration,
    /// Whether that next one is already on its way: failures meanwhile wait for it.
    pub retry_pending: Arc<AtomicBool>,
}

impl Worker {
    pub fn run(self, mut jobs: UnboundedReceiver<Job>) {
        while let Some(first) = jobs.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = jobs.try_recv() {
                batch.push(more);
            }
            let mut deleted = Vec::new();
            let mut finished = Vec::new();
            // Reconciles asked for together run once, naming every reason.
            let mut reasons: Vec<&str> = Vec::new();
            for job in batch {
                match job {
                    Job::Deleted { pod_ref, uid } => deleted.push((pod_ref, uid)),
                    Job::Finished { pod_ref } => finished.push(pod_ref),
                    Job::Reconcile { why } if !reasons.contains(&why) => reasons.push(why),
                    Job::Reconcile { .. } => {}
                }
            }
            if !self.leadership.is_leader() {
                // A new leader starts with a full reconcile, which covers whatever is dropped.
                if reasons.is_empty() {
                    tracing::debug!("not the leader: pod events left to the leader");
                } else {
                    let why = reasons.join(", ");
                    tracing::info!(why, "not the leader: reconcile left to the leader");
                }
                continue;
            }
            self.metrics
                .busy_since
                .store(Timestamp::now().as_second(), Ordering::SeqCst);
            if !reasons.is_empty() {
                // A full reconcile judges every allocation: it covers the deletions too.
                self.reconcile(&reasons.join(", "));
            } else if !deleted.is_empty() || !finished.is_empty() {
                self.on_pods(&deleted, &finished);
            }
            self.metrics.busy_since.store(0, Ordering::SeqCst);
        }
    }

    /// A full reconcile in a while: what failed now is judged again then. One at a time: while
    /// the store cannot be read, each batch of deletions fails, and a retry of each (each failing
    /// and retrying in turn) would multiply the reads a recovering server gets.
    fn retry_later(&self) {
        if self.retry_pending.swap(true, Ordering::SeqCst) {
            return;
        }
        self.metrics.retries.inc();
        let queue = self.requeue.clone();
        let (wait, pending) = (self.retry_after, self.retry_pending.clone());
        self.handle.spawn(async move {
            tokio::time::sleep(wait).await;
            // Cleared first: a failure of this retry schedules the next.
            pending.store(false, Ordering::SeqCst);
            let _ = queue.send(Job::Reconcile { why: "retry" });
        });
    }

    /// Pool gauges from the allocations just read, less those released since.
    fn refresh_stats(&self, allocations: &[Allocation], released: &HashSet<(String, IpAddr)>) {
        let kept: Vec<Allocation> = allocations
            .iter()
            .filter(|l| !released.contains(&(l.pool.clone(), l.ip)))
            .cloned()
            .collect();
        let mut described = match &self.nads {
            Some(nads) => described_pools(&nads.state()),
            None => Vec::new(),
        };
        // The later description of a pool wins: the configuration's.
        described.extend(self.configured.iter().cloned());
        self.metrics.set_pools(&pool_stats(&described, &kept));
    }

    /// Leases, tried a few times: a busy store must not lose a deletion.
    fn allocations(&self) -> Option<Vec<Allocation>> {
        let read = || self.store.allocations(None);
        let result = read
            .retry(a_few_times())
            .sleep(std::thread::sleep)
            .notify(|err, _| {
                self.metrics.retries.inc();
                self.failed("list_allocations", &err.describe());
            })
            .call();
        result
            .map_err(|err| self.failed("list_allocations", &err.describe()))
            .ok()
    }

    /// Every pod, tried a few times: a reconcile skipped waits for the next schedule.
    fn list_pods(&self) -> Option<HashMap<String, PodState>> {
        let list = || pods::list(&self.client);
        let result = self
            .handle
            .block_on(list.retry(a_few_times()).notify(|err, _| {
                self.metrics.retries.inc();
                self.failed("list_pods", &chain(err));
            }));
        result
            .map_err(|err| self.failed("list_pods", &chain(&err)))
            .ok()
    }

    fn failed(&self, operation: &'static str, err: &str) {
        self.metrics.error(operation);
        tracing::warn!(err, operation, "failed");
    }

    /// Deletions and completions seen by the watch: the allocations they concern, each judged against
    /// the pod of that name as it is now.
    fn on_pods(&self, deleted: &[(String, String)], finished: &[String]) {
        let Some(allocations) = self.allocations() else {
            tracing::error!(retry_in = ?self.retry_after, "deletions left to a reconcile: the allocations cannot be read");
            self.retry_later();
            return;
        };
        let candidates: Vec<Allocation> = allocations
            .iter()
            .filter(|l| {
                deleted.iter().any(|(r, u)| freed_by_deletion(l, r, u))
                    || l.attachment
                        .pod_ref
                        .as_ref()
                        .is_some_and(|r| finished.contains(r))
            })
            .cloned()
            .collect();
        let slices = SliceHolders::of(&allocations);
        let mut now: HashMap<String, Option<PodState>> = HashMap::new();
        let mut unread = false;
        let mut released = HashSet::new();
        for allocation in candidates {
            let Some(pod_ref) = allocation.attachment.pod_ref.clone() else {
                continue;
            };
            if !now.contains_key(&pod_ref) {
                match self.handle.block_on(pods::get(&self.client, &pod_ref)) {
                    Ok(state) => {
                        now.insert(pod_ref.clone(), state);
                    }
                    Err(err) => {
                        self.metrics.error("get_pod");
                        tracing::warn!(err = %chain(&err), pod = %pod_ref, retry_in = ?self.retry_after, "left to a reconcile");
                        unread = true;
                        continue;
                    }
                }
            }
            let pod = now.get(&pod_ref).and_then(Option::as_ref);
            let verdict = judge(&allocation, pod, &slices);
            let uid = deleted
                .iter()
                .find(|(r, _)| *r == pod_ref)
                .map(|(_, u)| u.clone());
            if self.act(&allocation, &verdict, uid) {
                released.insert((allocation.pool.clone(), allocation.ip));
            }
        }
        self.refresh_stats(&allocations, &released);
        if unread {
            self.retry_later();
        }
    }

    /// Frees `allocation` when the verdict says so (and this replica still leads); returns whether
    /// it did.
    fn act(&self, allocation: &Allocation, verdict: &Verdict, uid: Option<String>) -> bool {
        let Verdict::Release(reason) = verdict else {
            tracing::debug!(ip = %allocation.ip, pool = %allocation.pool, %verdict, "kept");
            return false;
        };
        // Asked before every release: a leader that cannot renew its Lease stops here, before
        // another replica may start.
        if !self.leadership.is_leader() {
            tracing::debug!(ip = %allocation.ip, pool = %allocation.pool, "not the leader any more: left");
            return false;
        }
        let released = release_if_held(self.store.as_ref(), allocation);
        self.metrics.progressed();
        match released {
            Ok(Some(r)) => {
                self.metrics.released(reason.as_str(), 1);
                tracing::info!(ip = %r.ip, pool = %r.pool, pod = ?r.attachment.pod_ref, %verdict, "released");
                self.post_event(&Released {
                    allocation: &r,
                    pod_uid: uid.or_else(|| r.attachment.pod_uid.clone()),
                    verdict,
                });
                true
            }
            // Its runtime's DEL came first: nothing left to free.
            Ok(None) => false,
            Err(err) => {
                self.metrics.error("release");
                tracing::warn!(err = %err.describe(), ip = %allocation.ip, pool = %allocation.pool, "cannot release");
                false
            }
        }
    }

    /// Posts the Event of a release without holding up the next release: the address is free
    /// already, and the Event is for people. At most [`EVENTS_IN_FLIGHT`] are posted at once;
    /// those still waiting when the process stops are lost.
    fn post_event(&self, released: &Released) {
        let (Some(reporter), Some(pod)) = (&self.reporter, events::regarding(released)) else {
            return;
        };
        let event = events::event(released);
        let (client, reporter) = (self.client.clone(), reporter.clone());
        let (metrics, permits) = (self.metrics.clone(), self.event_permits.clone());
        self.handle.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            match events::publish(client, reporter, event, &pod).await {
                Ok(()) => {
                    metrics.events_posted.inc();
                }
                Err(err) => {
                    metrics.error("post_event");
                    tracing::warn!(%err, "cannot post the event");
                }
            }
        });
    }

    fn reconcile(&self, why: &str) {
        let started = Instant::now();
        // Leases (and reservations) first, pods second: see `cleanup::plan`.
        let Some(allocations) = self.allocations() else {
            tracing::error!(why, retry_in = ?self.retry_after, "reconcile skipped: the allocations cannot be read");
            self.retry_later();
            return;
        };
        let reservations = match self.store.unbacked_reservations() {
            Ok(found) => found,
            Err(err) => {
                self.metrics.error("list_reservations");
                tracing::warn!(err = %err.describe(), "cannot list reservations");
                Vec::new()
            }
        };
        let Some(pods) = self.list_pods() else {
            tracing::error!(why, retry_in = ?self.retry_after, "reconcile skipped: pods cannot be listed");
            self.retry_later();
            return;
        };
        let mut held: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut released = HashSet::new();
        for decision in plan(allocations.clone(), &pods) {
            if let Verdict::Keep(reason) = decision.verdict {
                *held.entry(reason.label()).or_default() += 1;
            }
            if self.act(&decision.allocation, &decision.verdict, None) {
                released.insert((decision.allocation.pool.clone(), decision.allocation.ip));
            }
        }
        let orphans = self.release_orphan_reservations(reservations, &pods);
        let refreed = self.free_released();
        let elapsed = started.elapsed();
        self.metrics
            .reconciled(elapsed.as_secs_f64(), held, Timestamp::now().as_second());
        tracing::info!(
            why,
            released = released.len(),
            orphans,
            refreed,
            elapsed_ms = elapsed.as_millis() as u64,
            "reconciled"
        );
        self.refresh_stats(&allocations, &released);
    }

    /// Whether the pod `pod_ref` still says its reservation may go, read now; not when it
    /// cannot be read (the next reconcile judges it again).
    fn holder_still_gone(&self, pod_ref: &str) -> bool {
        match self.handle.block_on(pods::get(&self.client, pod_ref)) {
            Ok(now) => matches!(
                judge_holder(Some(pod_ref), None, now.as_ref()),
                Verdict::Release(_)
            ),
            Err(err) => {
                self.metrics.error("get_pod");
                tracing::warn!(err = %chain(&err), pod = %pod_ref, "reservation left to the next reconcile");
                false
            }
        }
    }

    /// Addresses released but held back from searches (etcd's freed marks), made free again:
    /// how many. Only the leader writes.
    fn free_released(&self) -> usize {
        if !self.leadership.is_leader() {
            return 0;
        }
        match self.store.free_released() {
            Ok(folded) => {
                self.metrics.freed_folded.inc_by(folded as u64);
                folded
            }
            Err(err) => {
                self.metrics.error("free_released");
                tracing::warn!(err = %err.describe(), "cannot free the addresses released and held back");
                0
            }
        }
    }

    /// Reservations that no pool entry backs and whose pod is gone (an ADD or DEL stopped
    /// half-way): released through the store, only if unchanged since listed. One whose pod
    /// exists may be an ADD in flight (the reservation lands before the pool entry) and stays.
    /// The pod is read again just before: since the reconcile listed pods (minutes ago in a
    /// large one), a pod of that name may have been created and its ADD taken the reservation
    /// over as it stands (same pod, no write), which the store's check of the listed version
    /// cannot see.
    fn release_orphan_reservations(
        &self,
        reservations: Vec<Reservation>,
        pods: &HashMap<String, PodState>,
    ) -> usize {
        let mut freed = 0;
        for found in reservations {
            let pod_ref = found.attachment.pod_ref.as_deref().unwrap_or_default();
            let verdict = judge_holder(Some(pod_ref), None, pods.get(pod_ref));
            if !matches!(verdict, Verdict::Release(_)) {
                continue;
            }
            if !self.leadership.is_leader() {
                break;
            }
            if !self.holder_still_gone(pod_ref) {
                continue;
            }
            let released = self.store.release_reservation(&found);
            // Each orphan costs requests of its own (a pod read, and the Go binaries' Lease
            // while they may write): a long list of them is progress, not a stuck batch.
            self.metrics.progressed();
            match released {
                Ok(true) => {
                    freed += 1;
                    self.metrics.released("orphan_reservation", 1);
                    tracing::info!(reservation = %found.name, pod = %pod_ref, "released an orphaned overlapping-range reservation");
                }
                // Changed since listed: the next reconcile judges it again.
                Ok(false) => {
                    self.metrics.conflicts.inc();
                }
                Err(err) => {
                    self.metrics.error("release_reservation");
                    tracing::warn!(err = %err.describe(), reservation = %found.name, "cannot release");
                }
            }
        }
        freed
    }
}
