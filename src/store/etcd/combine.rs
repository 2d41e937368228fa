//! The node agent's etcd engine: a node's concurrent ADDs of a pool wait in a queue
//! ([`crate::store::queues`]); one blocking task serves whatever waits. It plans them from the
//! agent's watch-fed copies of the pools' runs (`copy`), or from one read for all of them when
//! a copy is not in step, and commits them in one transaction that holds each ADD's own commit
//! as a nested transaction. A nested commit that loses reads back, in its failure branch, what
//! the ADD's next attempt plans from: a lost race costs no read. In a pool that other nodes
//! draw from at the same time, the search starts where [`super::contention`] says, not at the
//! lowest free address every node would pick.
//!
//! etcd evaluates the compares of every nested commit against the revision the transaction
//! starts from, then applies the commits whose compares hold, in order. Each commit compares
//! only keys it writes itself, and the batch is planned so that no two commits write the same
//! key: distinct attachments (owner and pod index entries), distinct addresses (allocation,
//! run and reservation keys). So each commit succeeds or fails exactly as it would alone.
//! An ADD that fails, or that is not combined (a static address, an attachment that may hold
//! an address already, a second ADD of the same attachment, an error while planning), runs
//! the engine's own ADD with its reads, retries and alternatives.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Txn, TxnOp, TxnOpResponse, TxnResponse};
use tokio::sync::{oneshot, OwnedMutexGuard};

use super::allocate::{
    self, index_gets, parse_hits, plan_all, refuse_unsupported, search_from, Memory, Planned,
    ReadBack,
};
use super::commit::{build_commit, compact_chain};
use super::contention;
use super::copy::{Copies, Following};
use super::plan::{IndexHits, Plan};
use super::release;
use super::release_together::release_together;
use super::runs::ReadRun;
use super::session::{key_get, revision_of, CallFailed, Deadline, Session, MAX_TXN_OPS};
use super::window::{self, Window};
use super::EtcdStore;
use crate::store::one_at_a_time::OneAtATime;
use crate::store::queues::{drop_abandoned, dropped, Observer, Queues, Serving};
use crate::store::{
    AddRequest, Allocation, Attachment, AttachmentRequest, GcRequest, RangeRequest, Store,
    StoreError,
};

/// How long a batch waits for the copy to show the agent's own latest change to the runs before
/// it reads instead: the watch brings a commit's events right after its answer.
const CATCH_UP: Duration = Duration::from_millis(20);

/// ADDs (or DELs) combined in one batch at most. Each ADD's commit is one operation of the
/// outer transaction, which leaves each commit 64 of the 128 operations etcd accepts
/// ([`super::session::MAX_TXN_OPS`]): ten ranges ([`MAX_COMBINED_RANGES`]).
const MAX_BATCH: usize = 64;

/// The most ranges an ADD may have to share a combined transaction: a range's commit compares
/// at most six keys (record, freed mark, owner and pod entries, reservation, run), within the
/// 64 operations a combined commit has. One with more commits alone, where it fits or is
/// refused as too wide for any transaction.
const MAX_COMBINED_RANGES: usize = (MAX_TXN_OPS - MAX_BATCH) / 6;

/// Combined rounds at most for the ADDs of a batch that lost an address to another writer;
/// each round plans from what the last one read back. Those still left then run alone, with
/// the engine's spreading.
const COMBINED_ROUNDS: usize = 3;

/// What a queued request is answered.
type Reply<T> = Result<T, StoreError>;
type Answer = Reply<Vec<IpAddr>>;
type DelAnswer = Reply<Vec<Allocation>>;

/// A queued request, holding its attachment ([`OneAtATime`]) for as long as it exists: until
/// its batch is done with it, or until it is dropped unserved. A caller that gives up on a
/// started batch leaves its request to go on, so the attachment's next operation (the runtime's
/// DEL after an ADD it timed out) must wait for the request, not for its caller.
struct Held<J> {
    job: J,
    alone: OwnedMutexGuard<()>,
}

/// What one combined round did.
struct Round {
    /// The requests it answered, with their addresses.
    answered: Vec<(usize, Vec<IpAddr>)>,
    /// The requests whose commit found an address taken or an index entry changed, with what
    /// the commit read back for the next attempt.
    lost: Vec<(usize, Option<ReadBack>)>,
}

/// The etcd engine of the node agent: ADDs are combined, everything else is the engine's own.
pub struct Combining {
    inner: Arc<Inner>,
}

struct Inner {
    store: EtcdStore,
    adds: Queues<Held<AddRequest>, Answer>,
    dels: Queues<Held<AttachmentRequest>, DelAnswer>,
    /// The attachments with a request queued or under way.
    attachments: OneAtATime,
    observer: Arc<dyn Observer>,
    runtime: tokio::runtime::Handle,
    /// The pools' runs as the watch brings them.
    copies: Copies,
    /// The pools where this agent lost addresses to other writers lately, and where its
    /// searches start there.
    contended: contention::Pools,
}

impl Combining {
    pub(super) fn new(
        store: EtcdStore,
        observer: Arc<dyn Observer>,
        runtime: tokio::runtime::Handle,
        following: Following,
    ) -> Combining {
        let client = store.session.client();
        let copies = Copies::new(runtime.clone(), client, observer.clone(), following);
        Combining {
            inner: Arc::new(Inner {
                store,
                adds: Queues::new("add", observer.clone()),
                dels: Queues::new("del", observer.clone()),
                attachments: OneAtATime::default(),
                observer,
                runtime,
                copies,
                contended: contention::Pools::default(),
            }),
        }
    }
}

impl Inner {
    /// Serves the queue `key` until it is empty, a batch at a time with `serve_batch`.
    fn serve<J, R>(
        &self,
        queues: &Queues<Held<J>, R>,
        key: &str,
        serve_batch: impl Fn(&Self, &[J]) -> Vec<R>,
    ) {
        let _serving = Serving { queues, key };
        loop {
            let mut waiting = queues.take_or_close(key);
            if waiting.is_empty() {
                return;
            }
            while !waiting.is_empty() {
                let mut rest = waiting.split_off(waiting.len().min(MAX_BATCH));
                let (held, replies): (Vec<Held<J>>, Vec<_>) = waiting.into_iter().unzip();
                let (jobs, alone): (Vec<J>, Vec<_>) =
                    held.into_iter().map(|h| (h.job, h.alone)).unzip();
                self.observer.batch(queues.operation(), jobs.len());
                let answers = serve_batch(self, &jobs);
                // Counted before the answers go: whoever reads the metrics after an answer
                // finds its batch in them.
                let (marked, folded) = self.store.session.freed.take();
                if marked > 0 || folded > 0 {
                    self.observer.freed(marked, folded);
                }
                for ((reply, answer), alone) in replies.into_iter().zip(answers).zip(alone) {
                    // Done with: the attachment's next operation may start, and need not meet
                    // this one still held once its caller has the answer.
                    drop(alone);
                    // The plugin may have hung up; what was done stays done.
                    let _ = reply.send(answer);
                }
                drop_abandoned(&mut rest);
                waiting = rest;
            }
        }
    }
}

impl Combining {
    /// Queues `job`, which holds its attachment, in the queue of pool `key` (of the queues
    /// `queues` picks); its answer comes on the receiver. The first job of an idle queue starts
    /// the blocking task that serves it with `serve_batch`. A caller that drops the receiver
    /// before its batch starts is not served; once the batch has started, its job is done.
    fn queue<J: Send + 'static, T: Send + 'static>(
        &self,
        key: String,
        job: Held<J>,
        queues: fn(&Inner) -> &Queues<Held<J>, Reply<T>>,
        serve_batch: fn(&Inner, &[J]) -> Vec<Reply<T>>,
    ) -> oneshot::Receiver<Reply<T>> {
        let (answer, start) = queues(&self.inner).submit(&key, job);
        if start {
            let inner = self.inner.clone();
            self.inner
                .runtime
                .spawn_blocking(move || inner.serve(queues(&inner), &key, serve_batch));
        }
        answer
    }

    fn add_queued(
        &self,
        req: &AddRequest,
        alone: OwnedMutexGuard<()>,
    ) -> oneshot::Receiver<Answer> {
        let key = req.ranges.first().map(|rr| rr.pool.name.clone());
        let job = Held {
            job: req.clone(),
            alone,
        };
        self.queue(key.unwrap_or_default(), job, |i| &i.adds, Inner::add_many)
    }

    fn del_queued(
        &self,
        req: &AttachmentRequest,
        alone: OwnedMutexGuard<()>,
    ) -> oneshot::Receiver<DelAnswer> {
        let key = req.pools.first().map(|pool| pool.name.clone());
        let job = Held {
            job: req.clone(),
            alone,
        };
        self.queue(key.unwrap_or_default(), job, |i| &i.dels, Inner::del_many)
    }

    /// [`Store::add`] for a caller on the runtime: it waits for the attachment's operation
    /// under way, if any, then for the batch, without holding a thread of the blocking pool.
    pub async fn add_waiting(&self, req: &AddRequest) -> Answer {
        let who = &req.attachment;
        let alone = self
            .inner
            .attachments
            .enter(&who.container_id, &who.ifname)
            .await;
        self.add_queued(req, alone)
            .await
            .unwrap_or_else(|_| Err(dropped()))
    }

    /// [`Store::del`] for a caller on the runtime, as [`Combining::add_waiting`].
    pub async fn del_waiting(&self, req: &AttachmentRequest) -> DelAnswer {
        let alone = self
            .inner
            .attachments
            .enter(&req.container_id, &req.ifname)
            .await;
        self.del_queued(req, alone)
            .await
            .unwrap_or_else(|_| Err(dropped()))
    }
}

impl Store for Combining {
    fn add(&self, req: &AddRequest) -> Answer {
        let who = &req.attachment;
        let alone = (self.inner.attachments).enter_blocking(&who.container_id, &who.ifname);
        let answer = self.add_queued(req, alone).blocking_recv();
        answer.unwrap_or_else(|_| Err(dropped()))
    }

    fn del(&self, req: &AttachmentRequest) -> DelAnswer {
        let alone = (self.inner.attachments).enter_blocking(&req.container_id, &req.ifname);
        let answer = self.del_queued(req, alone).blocking_recv();
        answer.unwrap_or_else(|_| Err(dropped()))
    }

    fn check(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        self.inner.store.check(req)
    }

    fn gc(&self, req: &GcRequest) -> Result<Vec<Allocation>, StoreError> {
        self.inner.store.gc(req)
    }

    fn status(&self) -> Result<(), StoreError> {
        self.inner.store.status()
    }

    fn allocations(&self, pool: Option<&str>) -> Result<Vec<Allocation>, StoreError> {
        self.inner.store.allocations(pool)
    }

    fn release(
        &self,
        pool: &str,
        ip: IpAddr,
        holder: Option<&Attachment>,
    ) -> Result<Option<Allocation>, StoreError> {
        self.inner.store.release(pool, ip, holder)
    }

    fn free_released(&self) -> Result<usize, StoreError> {
        self.inner.store.free_released()
    }
}

impl Inner {
    /// Every request's answer, in order: those combined in shared transactions, then the rest
    /// through the engine's own ADD, side by side.
    fn add_many(&self, reqs: &[AddRequest]) -> Vec<Answer> {
        let store = &self.store;
        // One deadline for the batch: an ADD is answered within the engine's deadline of its
        // batch starting, whether it was combined, ran alone, or both.
        let dl = Deadline::after(store.session.timeouts.deadline);
        let mut answers: Vec<Option<Answer>> = (0..reqs.len()).map(|_| None).collect();
        // What each request's last lost commit read back.
        let mut read_back: HashMap<usize, ReadBack> = HashMap::new();
        let mut skipped = Skipped::default();
        let mut together = combinable(reqs);
        for round in 0..COMBINED_ROUNDS {
            // The first round plans from the copies, when they are in step: one ADD alone then
            // costs its commit only. After a lost race a copy is likely behind: the next round
            // plans from what the lost commits read back.
            let starts = self.contended.starts();
            let found = match round {
                0 => self.found_in_copies(reqs, &together, &starts),
                _ => read_back_of(&together, &read_back),
            };
            // A lone ADD runs alone (the engine's own ADD, with its alternatives) when no copy
            // is in step and after a lost race.
            if together.len() < 2 && (round > 0 || found.is_none()) {
                break;
            }
            let planned = self.plan_together(found, (reqs, &skipped), &together, &starts, &dl);
            match planned.and_then(|planned| self.commit_together(reqs, planned, &starts, &dl)) {
                Ok(done) => {
                    for (i, ips) in done.answered {
                        skipped.answered(&reqs[i], &ips);
                        answers[i] = Some(Ok(ips));
                    }
                    together = done.lost.iter().map(|(i, _)| *i).collect();
                    for (i, lost) in done.lost {
                        match lost {
                            Some(lost) => {
                                skipped.reserved(&reqs[i], lost.avoid.iter().copied());
                                read_back.insert(i, lost)
                            }
                            None => read_back.remove(&i),
                        };
                    }
                }
                // Whether it applied is unknown: each ADD alone first reads what it holds.
                Err(failed) => {
                    each_alone_after("ADD", &failed);
                    read_back.clear();
                    break;
                }
            }
        }
        let left = answers
            .iter_mut()
            .zip(reqs)
            .enumerate()
            .filter(|(_, (answer, _))| answer.is_none())
            .map(|(i, (answer, req))| {
                let mut read_back = read_back.remove(&i);
                if let Some(read_back) = &mut read_back {
                    read_back.avoid.extend(skipped.for_request(req));
                }
                (answer, (req, read_back))
            });
        side_by_side(left.collect(), |(req, read_back)| {
            allocate::add_by(&store.session, &store.backoff, req, &dl, read_back)
        });
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or_else(|| Err(dropped())))
            .collect()
    }

    /// Every DEL's answer, in order: what combined rounds released (each DEL of an attachment
    /// once), then the engine's own DEL for the rest, side by side.
    fn del_many(&self, reqs: &[AttachmentRequest]) -> Vec<DelAnswer> {
        let store = &self.store;
        let dl = Deadline::after(store.session.timeouts.deadline);
        let mut released: Vec<Vec<Allocation>> = vec![Vec::new(); reqs.len()];
        let mut answers: Vec<Option<DelAnswer>> = (0..reqs.len()).map(|_| None).collect();
        let mut together = one_per_attachment(reqs.iter().map(|r| (&r.container_id, &r.ifname)));
        // Rounds that lost a commit count against the limit; a round only deferred by the
        // limits of a transaction released something, so the rounds end.
        let mut losing_rounds = 0;
        while together.len() > 1 && losing_rounds < COMBINED_ROUNDS {
            match release_together(&store.session, reqs, &together, &dl) {
                Ok(round) => {
                    for (i, allocation) in round.released {
                        released[i].push(allocation);
                    }
                    for i in round.answered {
                        answers[i] = Some(Ok(Vec::new()));
                    }
                    for _ in &round.lost {
                        self.observer.conflict("del");
                    }
                    losing_rounds += usize::from(!round.lost.is_empty());
                    together = round.lost;
                    together.extend(round.deferred);
                    together.sort_unstable();
                }
                Err(failed) => {
                    each_alone_after("DEL", &failed);
                    break;
                }
            }
        }
        let left = answers.iter_mut().zip(reqs).filter(|(a, _)| a.is_none());
        side_by_side(left.collect(), |req| {
            release::del_by(&store.session, &store.backoff, req, &dl)
        });
        answers
            .into_iter()
            .zip(released)
            .map(|(answer, mut earlier)| {
                let alone = answer.unwrap_or_else(|| Err(dropped()))?;
                earlier.extend(alone);
                Ok(earlier)
            })
            .collect()
    }
}

/// Logs a combined round whose call failed: every request of the batch left then runs alone.
fn each_alone_after(operation: &str, failed: &CallFailed) {
    tracing::debug!(
        "etcd: a combined {operation} failed, each is tried alone: {}",
        crate::store::error::chain(failed)
    );
}

/// Runs `op` for each request left, each on a thread of its own when there are several (the
/// engine's calls block), and puts its answer in place. A thread the system refuses (a pod's
/// process limit) leaves its request unanswered, which its caller answers "try again"; so does
/// a request whose `op` panics, while the batch's other answers (some of them committed) stand.
fn side_by_side<T: Send, R: Send>(left: Vec<(&mut Option<R>, T)>, op: impl Fn(T) -> R + Sync) {
    if left.len() == 1 {
        for (answer, req) in left {
            *answer = unless_panicking(&op, req);
        }
        return;
    }
    std::thread::scope(|scope| {
        for (answer, req) in left {
            let op = &op;
            let thread = std::thread::Builder::new();
            let run = move || *answer = unless_panicking(op, req);
            if let Err(err) = thread.spawn_scoped(scope, run) {
                tracing::warn!(%err, "cannot start a thread for a request: it is to try again");
            }
        }
    });
}

/// `op(req)`, or none when it panics (logged; the panic's message went to stderr already).
fn unless_panicking<T, R>(op: &impl Fn(T) -> R, req: T) -> Option<R> {
    let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(req)));
    if answered.is_err() {
        tracing::error!("a request panicked in the etcd engine: it is to try again");
    }
    answered.ok()
}

/// The indexes of the first request of each attachment (container ID, interface): two of one
/// attachment in a batch would write the same keys.
fn one_per_attachment<'a>(who: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<usize> {
    let mut seen = HashSet::new();
    who.enumerate()
        .filter(|(_, (container, ifname))| seen.insert((*container, *ifname)))
        .map(|(i, _)| i)
        .collect()
}

/// The requests that may share one transaction: every range dynamic, not too many of them
/// ([`MAX_COMBINED_RANGES`]), and no two of the same attachment (they would write the same
/// index entries).
fn combinable(reqs: &[AddRequest]) -> Vec<usize> {
    let mut owners = HashSet::new();
    let mut pods = HashSet::new();
    let mut out = Vec::new();
    for (i, req) in reqs.iter().enumerate() {
        let who = &req.attachment;
        let plain = refuse_unsupported(req).is_ok()
            && req.sleep_for_race == 0
            && !req.ranges.is_empty()
            && req.ranges.len() <= MAX_COMBINED_RANGES
            && req.ranges.iter().all(|rr| rr.requested.is_none());
        let first_of_owner = owners.insert((who.container_id.clone(), who.ifname.clone()));
        let first_of_pod = match &who.pod_ref {
            Some(pod) => pods.insert((pod.clone(), who.ifname.clone())),
            None => true,
        };
        if plain && first_of_owner && first_of_pod {
            out.push(i);
        }
    }
    out
}

/// What a batch's later searches skip: per pool, the addresses answered already (a lost
/// commit's read-back may predate the batch's later winners); per network name, those reserved
/// (answered with overlapping ranges, or found held through one). Kept apart, so that another
/// network's or pool's address never stops a search.
#[derive(Default)]
struct Skipped {
    answered: HashSet<(String, IpAddr)>,
    reserved: HashSet<(String, IpAddr)>,
}

impl Skipped {
    /// `req` was answered `ips`, one per range.
    fn answered(&mut self, req: &AddRequest, ips: &[IpAddr]) {
        for (rr, ip) in req.ranges.iter().zip(ips) {
            self.answered.insert((rr.pool.name.clone(), *ip));
        }
        self.reserved(req, ips.iter().copied());
    }

    /// `ips` are reserved in `req`'s network (when it reserves network-wide).
    fn reserved(&mut self, req: &AddRequest, ips: impl Iterator<Item = IpAddr>) {
        if req.overlap {
            self.reserved
                .extend(ips.map(|ip| (req.network_name.clone(), ip)));
        }
    }

    /// The addresses `req`'s searches skip.
    fn for_request<'a>(&'a self, req: &'a AddRequest) -> impl Iterator<Item = IpAddr> + 'a {
        let in_its_pools = self
            .answered
            .iter()
            .filter(|(pool, _)| req.ranges.iter().any(|rr| rr.pool.name == *pool));
        let in_its_network = self
            .reserved
            .iter()
            .filter(|(network, _)| req.overlap && *network == req.network_name);
        in_its_pools.chain(in_its_network).map(|(_, ip)| *ip)
    }
}

/// What each ADD of a batch holds, as the copies show it or as one read finds it: per ADD, its
/// index entries and the run window of each range.
type Found = Vec<(Vec<IndexHits>, Vec<Option<Window>>)>;

/// Per pool, the runs a round's searches crossed and the offsets its commits took: what the
/// pool's runs are merged from after the commit.
type Merges<'a> = HashMap<&'a str, (Vec<ReadRun>, Vec<u128>)>;

/// The offsets `plans` would have taken, by pool.
fn taken_offsets<'a>(req: &'a AddRequest, plans: &[Plan]) -> Vec<(&'a str, u128)> {
    let pools = req.ranges.iter().map(|rr| rr.pool.name.as_str());
    pools
        .zip(plans)
        .filter_map(|(pool, plan)| match plan {
            Plan::Take { offset, .. } => Some((pool, *offset)),
            Plan::Keep { .. } => None,
        })
        .collect()
}

impl Inner {
    /// A plan for each of the requests `together` that holds nothing yet, every address
    /// distinct from the others', from what was `found` (in the copies, or read back by lost
    /// commits) or else from one read. Requests without a plan (one may hold an address
    /// already, or its plan failed) are neither answered nor lost: they run alone.
    fn plan_together(
        &self,
        found: Option<Found>,
        (reqs, skipped): (&[AddRequest], &Skipped),
        together: &[usize],
        starts: &Starts,
        dl: &Deadline,
    ) -> Result<Vec<Planned>, CallFailed> {
        let s = &self.store.session;
        let found = match found {
            Some(found) => found,
            None => read_together(s, reqs, together, starts, dl)?,
        };
        let mut taken = HashSet::new();
        let mut planned = Vec::new();
        for (&i, (hits, mut windows)) in together.iter().zip(found) {
            let req = &reqs[i];
            if hits.iter().any(|h| h.owner.is_some() || h.pod.is_some()) {
                continue; // It may hold an address already: alone, it reads what.
            }
            let mut memory = Memory::new(req.ranges.len());
            memory.reserved_elsewhere = taken.clone();
            memory.reserved_elsewhere.extend(skipped.for_request(req));
            for (r, rr) in req.ranges.iter().enumerate() {
                memory.start_search_at(r, search_start(rr, starts));
            }
            let held = vec![None; req.ranges.len()];
            let Ok(mut plan) = plan_all(s, req, &hits, held, &mut windows, &mut memory, dl) else {
                continue; // Alone, it gets the answer its plan failed with.
            };
            taken.extend(plan.chosen.iter().copied());
            plan.index = i;
            planned.push(plan);
        }
        Ok(planned)
    }

    /// One transaction of the planned commits, each nested with its own compares and, for
    /// when they fail, the reads of its next attempt (searches from `starts`).
    fn commit_together(
        &self,
        reqs: &[AddRequest],
        planned: Vec<Planned>,
        starts: &Starts,
        dl: &Deadline,
    ) -> Result<Round, CallFailed> {
        let s = &self.store.session;
        let mut round = Round {
            answered: Vec::new(),
            lost: Vec::new(),
        };
        if planned.is_empty() {
            return Ok(round);
        }
        let (mut commits, read_back_sizes) = nested_commits(s, reqs, &planned, starts);
        // Last, after the answers zipped with `planned`: a put of the commit's own, which etcd
        // refuses when its database is full (the nested ones pass; see `Keys::quota`).
        commits.push(TxnOp::put(s.keys.quota(), "", None));
        let resp = s.txn(
            dl,
            "combined allocation commit",
            Txn::new().and_then(commits),
        )?;
        let revision = revision_of(&resp);
        let mut merges = Merges::new();
        let mut lost_offsets = Vec::new();
        let answers = resp.op_responses().into_iter().zip(read_back_sizes);
        for (plan, (answer, read_back_size)) in planned.into_iter().zip(answers) {
            let req = &reqs[plan.index];
            let lost = match answer {
                TxnOpResponse::Txn(t) if t.succeeded() => None,
                TxnOpResponse::Txn(t) => {
                    Some(parse_read_back(req, &plan.plans, starts, t, read_back_size))
                }
                _ => Some(None),
            };
            if let Some(read_back) = lost {
                self.observer.conflict("add");
                // Only an offset another writer of its pool took is contention; an address
                // held through an overlapping range is skipped, the pool not spread.
                let read_back = match read_back {
                    Some((read_back, raced)) => {
                        lost_offsets.extend(raced);
                        Some(read_back)
                    }
                    None => {
                        lost_offsets.extend(taken_offsets(req, &plan.plans));
                        None
                    }
                };
                round.lost.push((plan.index, read_back));
                continue;
            }
            self.note_won(req, plan.plans, &mut merges, revision);
            round.answered.push((plan.index, plan.chosen));
        }
        // After the batch's own addresses: a lost one moves the next search past another
        // node's, even when the batch took addresses beyond it.
        for (pool, offset) in lost_offsets {
            self.contended.lost(pool, offset);
        }
        for (pool, (walked, new_runs)) in merges {
            compact_chain(s, dl, pool, &walked, &new_runs, revision);
        }
        Ok(round)
    }

    /// Notes the offsets a request's commit took (to merge into its pools' runs, and as this
    /// node's in the pools' contention) and the revision its pools were written at.
    fn note_won<'r>(
        &self,
        req: &'r AddRequest,
        plans: Vec<Plan>,
        merges: &mut Merges<'r>,
        revision: i64,
    ) {
        for (rr, taken) in req.ranges.iter().zip(plans) {
            if let Plan::Take { offset, walked, .. } = taken {
                self.contended.took(&rr.pool.name, offset);
                let merge = merges.entry(rr.pool.name.as_str()).or_default();
                merge.0.extend(walked);
                merge.1.push(offset);
            }
        }
        for rr in &req.ranges {
            self.store
                .session
                .runs_written
                .note(&rr.pool.name, revision);
        }
    }
}

impl Inner {
    /// What the ADDs `together` find in the copies, in the shape [`read_together`] reads it;
    /// `None` when a pool's copy does not show this agent's latest change to its runs within
    /// [`CATCH_UP`]. The copies have no index entries: the commit compares them absent, so an
    /// attachment that holds an address already loses its commit, and the next round reads
    /// what it holds.
    fn found_in_copies(
        &self,
        reqs: &[AddRequest],
        together: &[usize],
        starts: &Starts,
    ) -> Option<Found> {
        let s = &self.store.session;
        let mut windows = HashMap::new();
        for (pool, from) in searched_pools(reqs, together, starts) {
            let since = s.runs_written.latest(pool);
            let (dir, key) = (s.keys.runs_dir(pool), s.keys.run(pool, from));
            let copy = self.copies.pool(&dir)?;
            let window = copy.window(&dir, &key, from, since, CATCH_UP)?;
            windows.insert((pool, from), window);
        }
        let hits = together
            .iter()
            .map(|&i| vec![IndexHits::default(); reqs[i].ranges.len()]);
        Some(with_windows(reqs, together, hits, &windows, starts))
    }
}

/// One read of what the requests `together` hold: their index entries, and the window of each
/// pool they search, once.
fn read_together(
    s: &Session,
    reqs: &[AddRequest],
    together: &[usize],
    starts: &Starts,
    dl: &Deadline,
) -> Result<Found, CallFailed> {
    let pools = searched_pools(reqs, together, starts);
    let mut gets: Vec<TxnOp> = together
        .iter()
        .flat_map(|&i| index_gets(s, &reqs[i]))
        .collect();
    for (pool, from) in &pools {
        gets.extend(window::gets(&s.keys, pool, *from));
    }
    let mut results = s.reads(dl, "combined pool read", gets)?.into_iter();
    let hits: Vec<Vec<IndexHits>> = together
        .iter()
        .map(|&i| parse_hits(&reqs[i], &mut results))
        .collect();
    let windows = pools
        .into_iter()
        .map(|(pool, from)| ((pool, from), window::parse(from, &mut results)))
        .collect();
    Ok(with_windows(
        reqs,
        together,
        hits.into_iter(),
        &windows,
        starts,
    ))
}

/// Each planned request's commit as a nested transaction, with [`read_back_gets`] as its
/// failure branch; and how many gets each failure branch holds.
fn nested_commits(
    s: &Session,
    reqs: &[AddRequest],
    planned: &[Planned],
    starts: &Starts,
) -> (Vec<TxnOp>, Vec<usize>) {
    planned
        .iter()
        .map(|p| {
            let req = &reqs[p.index];
            let (compares, ops) = build_commit(s, req, &p.plans);
            let read_back = read_back_gets(s, req, &p.plans, starts);
            let size = read_back.len();
            let commit = Txn::new().when(compares).and_then(ops).or_else(read_back);
            (TxnOp::txn(commit), size)
        })
        .unzip()
}

/// The failure branch of `req`'s commit: its index entries, the run window where each of its
/// searches starts, and for each offset it took the record there and (with overlapping ranges)
/// the address's reservation, read at the revision the commit lost at: whether another writer
/// of the pool took the offset, or an overlapping range holds the address. Nothing when that is
/// more than a branch may hold (its next attempt reads).
fn read_back_gets(s: &Session, req: &AddRequest, plans: &[Plan], starts: &Starts) -> Vec<TxnOp> {
    let mut gets = index_gets(s, req);
    for rr in &req.ranges {
        gets.extend(window::gets(
            &s.keys,
            &rr.pool.name,
            search_start(rr, starts),
        ));
    }
    for (rr, plan) in req.ranges.iter().zip(plans) {
        if let Plan::Take { offset, ip, .. } = plan {
            gets.push(key_get(&s.keys.allocation(&rr.pool.name, *offset)));
            if req.overlap {
                gets.push(key_get(&s.keys.reservation(&req.network_name, *ip)));
            }
        }
    }
    // A nested branch holds what the outer transaction's operations leave of etcd's limit.
    if gets.len() > MAX_TXN_OPS - MAX_BATCH {
        return Vec::new();
    }
    gets
}

/// What a lost commit of `req` read back ([`read_back_gets`], `size` answers), with the offsets
/// it lost in a race with another writer (the pool is contended): all but those whose address
/// an overlapping range holds, which the next search skips, and those still free where the
/// attachment already holds an address (it lost on its own index entries). `None` when it did
/// not read that.
fn parse_read_back<'r>(
    req: &'r AddRequest,
    plans: &[Plan],
    starts: &Starts,
    lost: TxnResponse,
    size: usize,
) -> Option<(ReadBack, Vec<(&'r str, u128)>)> {
    let answers = lost.op_responses();
    if size == 0 || answers.len() != size {
        return None;
    }
    let mut results = answers.into_iter().map(|r| match r {
        TxnOpResponse::Get(mut g) => g.take_kvs(),
        _ => Vec::new(),
    });
    let hits = parse_hits(req, &mut results);
    let windows = req
        .ranges
        .iter()
        .map(|rr| {
            let from = search_start(rr, starts);
            (from, window::parse(from, &mut results))
        })
        .collect();
    // A first round plans from the copies with no index entries: a repeated ADD, or a pod's
    // next sandbox, loses its commit on its own entries, which is no race in the pool.
    let holds_already = hits.iter().any(|h| h.owner.is_some() || h.pod.is_some());
    let mut avoid = HashSet::new();
    let mut raced = Vec::new();
    for (rr, plan) in req.ranges.iter().zip(plans) {
        if let Plan::Take { offset, ip, .. } = plan {
            let held = !results.next().unwrap_or_default().is_empty();
            let reserved = req.overlap && !results.next().unwrap_or_default().is_empty();
            if reserved && !held {
                avoid.insert(*ip);
            } else if held || !holds_already {
                raced.push((rr.pool.name.as_str(), *offset));
            }
        }
    }
    let read_back = ReadBack {
        hits,
        windows,
        avoid,
    };
    Some((read_back, raced))
}

/// What the requests `together` read back when their commits lost, in the shape
/// [`read_together`] reads it; `None` unless every one of them read back.
fn read_back_of(together: &[usize], read_back: &HashMap<usize, ReadBack>) -> Option<Found> {
    together
        .iter()
        .map(|i| {
            let ReadBack { hits, windows, .. } = read_back.get(i)?.clone();
            Some((hits, windows.into_iter().map(|(_, w)| Some(w)).collect()))
        })
        .collect()
}

/// Where the contended pools' searches start ([`contention::Pools::starts`]).
type Starts = HashMap<String, u128>;

/// The offset the search of range `rr` starts from: the pool's lowest, unless it is contended.
fn search_start(rr: &RangeRequest, starts: &Starts) -> u128 {
    search_from(starts.get(&rr.pool.name).copied(), &rr.pool.range)
}

/// The pools the requests `together` search (every range of a combined request is dynamic),
/// each once, with the offset its search starts from.
fn searched_pools<'a>(
    reqs: &'a [AddRequest],
    together: &[usize],
    starts: &Starts,
) -> BTreeSet<(&'a str, u128)> {
    together
        .iter()
        .flat_map(|&i| &reqs[i].ranges)
        .map(|rr| (rr.pool.name.as_str(), search_start(rr, starts)))
        .collect()
}

/// Each request's index entries, with the window of every one of its ranges.
fn with_windows(
    reqs: &[AddRequest],
    together: &[usize],
    hits: impl Iterator<Item = Vec<IndexHits>>,
    windows: &HashMap<(&str, u128), Window>,
    starts: &Starts,
) -> Found {
    together
        .iter()
        .zip(hits)
        .map(|(&i, hits)| {
            let ranges = &reqs[i].ranges;
            let searched = ranges.iter().map(|rr| {
                let pool = (rr.pool.name.as_str(), search_start(rr, starts));
                windows.get(&pool).cloned()
            });
            (hits, searched.collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{Cidr, Range, RangeSpec};
    use crate::store::{Attachment, PoolRef};

    /// A request that panics leaves only its own answer unset (its caller: "try again"); the
    /// others, run beside it, keep theirs, alone or several.
    #[test]
    fn a_panicking_request_costs_only_its_own_answer() {
        let op = |n: u32| {
            assert!(n != 2, "request {n} panics");
            n * 10
        };
        let mut answers = [None, None, None];
        let left = answers.iter_mut().zip(1..).collect();
        side_by_side(left, op);
        assert_eq!(answers, [Some(10), None, Some(30)]);
        let mut alone = [None];
        side_by_side(alone.iter_mut().zip([2]).collect(), op);
        assert_eq!(alone, [None]);
    }

    fn request(pool: &str, network_name: &str, overlap: bool) -> AddRequest {
        let spec = RangeSpec {
            cidr: Cidr::parse("10.0.0.0/24", false).unwrap(),
            start: None,
            end: None,
            exclude: Vec::new(),
        };
        let pool = PoolRef {
            name: pool.into(),
            range: Range::resolve(&spec, None).unwrap(),
            spec,
            gateway: None,
        };
        AddRequest {
            cni_network: "net".into(),
            network_name: network_name.into(),
            overlap,
            attachment: Attachment::default(),
            ranges: vec![RangeRequest {
                pool,
                requested: None,
            }],
            node_slice_size: None,
            sleep_for_race: 0,
            node: None,
        }
    }

    /// What a batch skips stops only the searches it concerns: an address answered in a pool,
    /// those of that pool (and, reserved, of its network); one held through an overlapping
    /// range, those that reserve in that network. Another network's or pool's address never
    /// makes a request's range look full.
    #[test]
    fn skipped_addresses_stop_only_the_searches_they_concern() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let mut skipped = Skipped::default();
        let a = request("p", "blue", true);
        skipped.answered(&a, &[ip("10.0.0.1")]);
        skipped.reserved(&a, [ip("10.0.0.2")].into_iter());
        let set = |req: &AddRequest| skipped.for_request(req).collect::<BTreeSet<_>>();
        let both = BTreeSet::from([ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(set(&request("p", "blue", true)), both);
        // The same pool without network-wide reservations: only what its pool holds.
        assert_eq!(
            set(&request("p", "blue", false)),
            BTreeSet::from([ip("10.0.0.1")])
        );
        // Another pool of the network: what the network reserves.
        assert_eq!(set(&request("q", "blue", true)), both);
        // Another network: nothing.
        assert_eq!(set(&request("r", "green", true)), BTreeSet::new());
    }
}
