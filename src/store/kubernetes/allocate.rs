//! ADD: read the pool, choose, reserve the address network-wide, write the pool entry only if
//! the pool is unchanged; on conflict wait a jittered while and do it again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::api::{ApiError, RefusedWrite};
use super::batch::{in_halves, Batches, Served};
use super::cache::Cache;
use super::choose::SPREAD;
use super::engine::{newer, Engine, Kept, Step, UndoLog};
use super::go_lease::Hold;
use super::job::{pool_key, Granted, Job};
use super::node_slice::slice_pool_name;
use super::pool_doc::{absent_test, add_op, holder_test, remove_op, replace_id_op, Entry, PoolDoc};
use super::reservation::{self, Held};
use crate::ipam::decide::{stable_hash, GO_OFFSET_LIMIT};
use crate::ipam::names::{is_valid_object_name, object_name};
use crate::ipam::{decide, Ask, Cidr, Contention, Decision, OffsetRuns, Range, Snapshot};
use crate::k8s::crd::{IPPool, OverlappingRangeIPReservation};
use crate::store::queues::{dropped, Serving};
use crate::store::{AddRequest, Attachment, PoolRef, StoreError};

/// What reserving an address found.
enum Reserve {
    Ours(Held),
    /// Held by another attachment (described for the error message). `raced`: the reservation
    /// is newer than the pool as read, so a concurrent ADD took it (the contention hint); an
    /// older one belongs to an overlapping range and is simply skipped.
    Taken {
        holder: String,
        raced: bool,
    },
}

/// An address whose reservation `found` (named `name`) another attachment holds; `raced` when
/// that reservation is newer than the pool as read (`pool_rv`): another writer of this pool.
/// An unreadable resourceVersion is not newer: at worst a lost race is taken for an overlap and
/// retried without spreading.
fn taken_by(found: &OverlappingRangeIPReservation, name: &str, pool_rv: Option<&str>) -> Reserve {
    Reserve::Taken {
        holder: format!(
            "{} (reservation {name})",
            reservation::holder(found).describe()
        ),
        raced: newer(found.metadata.resource_version.as_deref(), pool_rv),
    }
}

/// What a batch's reservations are made under: the network name they are unique in, the pool's
/// resourceVersion as the batch read it (a reservation newer than it is a lost race, an older one
/// an overlap), and the batch's undo log, which holds every reservation made.
struct Claim<'a> {
    network_name: &'a str,
    pool_rv: Option<&'a str>,
    undo: &'a UndoLog,
}

/// How long a create that found a reservation taken waits for the watch to bring it, before
/// reading it from the server instead. The event left the server with the create's answer; on
/// a healthy node it arrives within milliseconds.
const WATCH_CATCH_UP: Duration = Duration::from_millis(20);

/// One job's view of the pool for [`crate::ipam::decide()`]: the entries as read, what the batch
/// chose already, and what this job found reserved through overlapping ranges.
struct BatchView<'a> {
    doc: &'a PoolDoc,
    held: &'a BTreeMap<u128, Entry>,
    taken: &'a OffsetRuns,
    slot: &'a Slot,
    /// The agent's watched reservations, which steer the search past addresses another node
    /// has reserved and not yet written to the pool.
    hints: Option<Hints<'a>>,
    /// Whether a hint passed an address over.
    hinted: bool,
}

/// Reservations of one network as the agent's copy shows them.
struct Hints<'a> {
    cache: &'a Cache,
    range: &'a Range,
    network_name: &'a str,
}

impl Hints<'_> {
    /// Whether the copy shows `offset` reserved by an attachment other than `who`.
    fn reserved_elsewhere(&self, offset: u128, who: &Attachment) -> bool {
        let name = reservation::name(self.range.ip(offset), self.network_name);
        self.cache
            .reservation(&name)
            .is_some_and(|found| !reservation::held_by(&found, who))
    }
}

impl Snapshot for BatchView<'_> {
    type Holder = String;
    type Error = std::convert::Infallible;

    fn owned(&mut self) -> Result<Vec<u128>, Self::Error> {
        let who = &self.slot.who;
        Ok(self
            .held
            .iter()
            .filter(|(_, h)| h.attachment.same_owner(who))
            .map(|(offset, _)| *offset)
            .collect())
    }

    fn holder(&mut self, offset: u128) -> Result<Option<String>, Self::Error> {
        Ok(match self.held.get(&offset) {
            Some(h) => Some(h.attachment.describe()),
            // This job's own reservation of an earlier attempt is no one else's.
            None if self.taken.contains(offset)
                && self.slot.reserved.as_ref().map(|r| r.0) != Some(offset) =>
            {
                Some("another ADD served in the same batch".into())
            }
            None => None,
        })
    }

    fn taken_until(&mut self, offset: u128) -> Result<Option<u128>, Self::Error> {
        if let Some(end) = self.taken.run_containing(offset) {
            return Ok(Some(end));
        }
        if let Some(end) = self.doc.unaddressable_until(offset) {
            return Ok(Some(end));
        }
        let skip = self.slot.avoid.contains(&offset);
        if !skip
            && self
                .hints
                .as_ref()
                .is_some_and(|h| h.reserved_elsewhere(offset, &self.slot.who))
        {
            self.hinted = true;
            return Ok(Some(offset));
        }
        Ok(skip.then_some(offset))
    }
}

/// How an ADD lives with Go binaries that may write the same pools.
struct GoTerms<'a> {
    /// A Go binary may rewrite the pool: no offset it would drop is handed out.
    present: bool,
    /// The Go binaries' Lease, held while serving (outside node-slice mode).
    hold: Option<&'a Hold>,
}

/// The terms of the agent's batches, which serve only while no Go binary writes the pools.
const NO_GO: GoTerms<'static> = GoTerms {
    present: false,
    hold: None,
};

impl GoTerms<'_> {
    fn check(&self) -> Result<(), StoreError> {
        self.hold.map_or(Ok(()), Hold::check)
    }
}

/// Refuses an ADD whose IPPool or reservation names Kubernetes would refuse, before anything
/// is written. The names come from `ipam.network_name` (and, with node slices, the node's name);
/// a create under such a name is refused as invalid, which reads like a lost race and would be
/// retried until the deadline, and the runtime would retry the ADD for ever. The name also goes
/// into request paths unescaped, where a `/` or `?` would point at another object.
fn check_names(pool: &PoolRef, req: &AddRequest) -> Result<(), StoreError> {
    let reservation = req
        .overlap
        .then(|| reservation::name(pool.cidr().network().addr, &req.network_name));
    let refused = |name: &str| !is_valid_object_name(name);
    if refused(&object_name(&pool.name)) || reservation.as_deref().is_some_and(refused) {
        return Err(StoreError::config(format!(
            "the Kubernetes objects of range {} cannot be named: ipam.network_name (and, with \
             node_slice_size, the node's name) may hold only letters, digits, '-' and '.', and \
             with the range make at most 253 characters",
            pool.cidr()
        )));
    }
    Ok(())
}

/// The answer when the API server refuses to store IPPool `name` with `more` new entries: an
/// IPPool is one object, and etcd stores none larger than its request limit (1.5 MiB by
/// default: about 10,000 allocations). The pool takes more once some are released; retrying
/// sooner only sends the server the same oversized object again.
fn pool_full(name: &str, more: usize, refused: ApiError) -> StoreError {
    let what = format!(
        "IPPool {name} cannot take {more} more allocation(s): the API server cannot store it \
         that large (an IPPool holds about 10,000); node_slice_size gives each node's slice an \
         IPPool of its own"
    );
    StoreError::io(refused.answered(&what)).because(refused)
}

/// While Go binaries write the pools, an ADD without a pod (no `K8S_POD_NAME`), which would be
/// written with `podref: ""`, is refused, as they refuse it: a Go reconciler deletes such an
/// entry's reservation as an orphan's, and an overlapping range then hands the address out
/// again. A network without reservations is spared.
fn refuse_podless(req: &AddRequest) -> Result<(), StoreError> {
    if !req.overlap || req.attachment.pod_ref.is_some() {
        return Ok(());
    }
    Err(StoreError::config(format!(
        "an ADD without K8S_POD_NAME in CNI_ARGS, in network {:?}, holds an address the Go \
         Whereabouts' reconciler would free: refused while Go binaries write the pools (the \
         flat file's go_whereabouts), unless enable_overlapping_ranges is false",
        req.cni_network
    )))
}

/// What the batches of one queue share: the pool, the request they were queued for, and the
/// deadline of the first batch, which its halves served apart keep.
struct Batch<'a> {
    pool: &'a PoolRef,
    req: &'a AddRequest,
    deadline: tokio::time::Instant,
}

impl Engine {
    /// One address per range, in order; what was written is in `undo` for the caller to take
    /// back if this fails.
    pub async fn add(&self, req: &AddRequest, undo: &UndoLog) -> Result<Vec<IpAddr>, StoreError> {
        let go_present = self.go_present().await?;
        if go_present {
            refuse_podless(req)?;
        }
        let mut ips = Vec::with_capacity(req.ranges.len());
        let mut slices = Vec::with_capacity(req.ranges.len());
        for wanted in &req.ranges {
            let pool = self
                .pool_for_add(
                    &wanted.pool,
                    req.node_slice_size,
                    &req.network_name,
                    &req.cni_network,
                )
                .await?;
            check_names(&pool, req)?;
            let requested = match wanted.requested {
                // A static address is given as an offset of the configured range; the node's
                // pool counts from its slice.
                Some(offset) => {
                    let ip = wanted.pool.range.cidr.at(offset);
                    Some(pool.range.cidr.offset_of(ip).ok_or_else(|| {
                        StoreError::config(format!(
                            "requested address {ip} is outside this node's slice {}",
                            pool.range.cidr
                        ))
                    })?)
                }
                None => None,
            };
            // Passing over the addresses of the ADD's earlier ranges (an overlapping range
            // would find their reservations its own).
            let job = Job::new(&req.attachment, requested).passing_over(&pool.range, &ips);
            ips.push(self.allocate(&pool, job, req, undo, go_present).await?);
            slices.push(pool.range.cidr);
        }
        if req.node_slice_size.is_some() && !req.overlap {
            self.confirm_slices(req, &slices).await?;
        }
        Ok(ips)
    }

    /// Whether the node still holds the slices the ADD wrote into. Without reservations only
    /// the NodeSlicePool keeps two nodes' pools apart, and the controller may have withdrawn a
    /// slice from this node while the ADD ran (the node removed, a new layout): another node's
    /// pool, which does not see this entry, may then cover it. The controller gives a withdrawn
    /// slice out only in a later pass, which lists the pools again, so an entry written before
    /// this read is seen there; one whose slice this read finds withdrawn is taken back (the
    /// error makes the caller undo the ADD) and the runtime's retry reads the new slice.
    async fn confirm_slices(&self, req: &AddRequest, used: &[Cidr]) -> Result<(), StoreError> {
        let held = self.node_slice(&req.network_name, &req.cni_network).await?;
        let held = held.map(|(slice, _)| slice);
        if used.iter().all(|slice| Some(*slice) == held) {
            return Ok(());
        }
        let name = slice_pool_name(&req.network_name, &req.cni_network);
        Err(StoreError::try_again(format!(
            "NodeSlicePool {name} withdrew this node's slice while the ADD ran: what the ADD \
             wrote there is taken back; a retry allocates from the slice the node has then"
        )))
    }

    /// One address of one pool: in the agent, combined with the node's other ADDs of the pool
    /// (so that a burst on the node costs one pool write); in a plugin process, alone.
    async fn allocate(
        &self,
        pool: &PoolRef,
        job: Job,
        req: &AddRequest,
        undo: &UndoLog,
        go_present: bool,
    ) -> Result<IpAddr, StoreError> {
        // A node's slice pool is written by that node alone, and a node runs one binary: the
        // Go binary's per-slice Lease is not needed to keep the two apart.
        if go_present && req.node_slice_size.is_none() {
            let hold = self.hold_go_lease().await?;
            let go = GoTerms {
                present: true,
                hold: Some(&hold),
            };
            let result = self.allocate_as(pool, job, req, undo, &go).await;
            hold.release().await;
            return result;
        }
        let go = GoTerms {
            present: go_present,
            hold: None,
        };
        self.allocate_as(pool, job, req, undo, &go).await
    }

    async fn allocate_as(
        &self,
        pool: &PoolRef,
        job: Job,
        req: &AddRequest,
        undo: &UndoLog,
        go: &GoTerms<'_>,
    ) -> Result<IpAddr, StoreError> {
        // While Go binaries may write the pools, each ADD holds their Lease and is served on
        // its own; the agent combines the rest. Without the agent, each process writes alone.
        match (&self.batches, go.present) {
            (Some(batches), false) => {
                let granted = self.through_batch(batches, pool, req, job).await;
                self.accept(granted, pool, req, undo)
            }
            _ => self.serve_one(pool, req, job, undo, go).await,
        }
    }

    /// The agent: queues the job in the pool's batch (starting the task that serves it when
    /// none does) and waits for its answer.
    async fn through_batch(
        &self,
        batches: &Arc<Batches>,
        pool: &PoolRef,
        req: &AddRequest,
        job: Job,
    ) -> Result<Granted, StoreError> {
        let key = pool_key(
            &self.scope,
            &object_name(&pool.name),
            &pool.range,
            &req.network_name,
            req.overlap,
        );
        let (answer, start) = batches.adds.submit(&key, job);
        if start {
            // A task of its own: a request that gives up (its caller gone, its deadline passed)
            // must not cancel a write made for its neighbours too.
            let (engine, batches, work) = (self.clone(), batches.clone(), batches.work.clone());
            let (pool, req) = (pool.clone(), req.clone());
            work.spawn(async move { engine.serve_queue(&batches, &key, &pool, &req).await });
        }
        answer.await.unwrap_or_else(|_| Err(dropped()))
    }

    /// Serves the pool's queue in batches until it is empty. Each batch starts from the agent's
    /// guess of the pool (as it last wrote it or as its watch last saw it), so a batch usually
    /// costs a single request to the pool; a stale guess costs a refused test and a read, never
    /// a duplicate (the write tests every entry it relies on).
    async fn serve_queue(&self, batches: &Batches, key: &str, pool: &PoolRef, req: &AddRequest) {
        let name = object_name(&pool.name);
        let _serving = Serving {
            queues: &batches.adds,
            key,
        };
        loop {
            let waiting = batches.adds.take_or_close(key);
            if waiting.is_empty() {
                return;
            }
            let (mut jobs, mut replies): (Vec<Job>, Vec<_>) = waiting.into_iter().unzip();
            let mut joined = Vec::new();
            let mut refill = || {
                let (jobs, replies): (Vec<Job>, Vec<_>) =
                    batches.adds.take(key).into_iter().unzip();
                joined.push((jobs.clone(), replies));
                jobs
            };
            let deadline = tokio::time::Instant::now() + self.settings.deadline;
            let started = self.guess_pool(&name);
            let batch = Batch {
                pool,
                req,
                deadline,
            };
            let served = self
                .serve_batch(batches, &batch, jobs.clone(), started, &mut refill)
                .await;
            for (more, their_replies) in joined {
                jobs.extend(more);
                replies.extend(their_replies);
            }
            batches.observer.batch("add", replies.len());
            let owners: Vec<Attachment> = jobs.iter().map(Job::attachment).collect();
            let results = match served {
                Ok(results) => results,
                Err(err) => self.after_refusal(batches, &batch, jobs, err).await,
            };
            let mut unreceived = Vec::new();
            let mut received = BTreeSet::new();
            for ((reply, result), who) in replies.into_iter().zip(results).zip(&owners) {
                let key = result.as_ref().ok().map(|granted| granted.key.clone());
                match reply.send(result) {
                    Ok(()) => received.extend(key),
                    Err(Ok(granted)) => unreceived.push(granted_steps(granted, pool, who)),
                    Err(Err(_)) => {}
                }
            }
            self.take_back_unreceived(unreceived, &received).await;
        }
    }

    /// Takes back the grants whose requests gave up (their deadline passed, their plugin
    /// answered "try again" and its runtime's DEL may have found nothing yet), unless a
    /// repetition of the same request received the address: fresh entries are removed, kept
    /// ones name their earlier sandbox again. Before the queue's next batch: a retry of the
    /// request waiting there finds the address free (or its pod's), or, if taking it back
    /// failed, its own entry to keep.
    async fn take_back_unreceived(&self, unreceived: Vec<Vec<Step>>, received: &BTreeSet<String>) {
        let steps: Vec<Step> = unreceived
            .into_iter()
            .filter(|steps| {
                !steps
                    .iter()
                    .any(|s| step_key(s).is_some_and(|key| received.contains(key)))
            })
            .flatten()
            .collect();
        if steps.is_empty() {
            return;
        }
        tracing::info!(
            grants = steps.len(),
            "taking back grants whose requests gave up"
        );
        // Bounded as a failed ADD's undo: the pool's next batch waits for it, and requests give
        // up when the server is slow; what is left goes with the runtime's DEL or the controller.
        let budget = self.settings.undo_budget;
        let failed = match tokio::time::timeout(budget, self.undo(steps)).await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("not done within {budget:?}"),
        };
        tracing::error!(failed, "could not take back grants whose requests gave up");
    }

    /// One batch of the agent, before `batch.deadline`; its writes are taken back if it fails.
    async fn serve_batch(
        &self,
        batches: &Batches,
        batch: &Batch<'_>,
        jobs: Vec<Job>,
        started: Option<IPPool>,
        refill: &mut (dyn FnMut() -> Vec<Job> + Send),
    ) -> Served<Granted> {
        let undo = UndoLog::default();
        let serving = self.serve(batch.pool, batch.req, jobs, started, &undo, refill, &NO_GO);
        let served = tokio::time::timeout_at(batch.deadline, serving)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::try_again(format!(
                    "the batch of IPPool {} did not complete within {:?}",
                    object_name(&batch.pool.name),
                    self.settings.deadline
                )))
            });
        match served {
            Ok((results, written)) => {
                // Served: each ADD is answerable for its own writes from here on.
                undo.take();
                if let Some(written) = &written {
                    batches.wrote(written);
                }
                Ok(results)
            }
            Err(err) => {
                if let Err(undo_err) = self.undo(undo.take()).await {
                    tracing::error!(%undo_err, "could not take back a failed batch");
                }
                Err(err)
            }
        }
    }

    /// The answers of `jobs`, whose batch failed with `err`: see [`in_halves`].
    async fn after_refusal(
        &self,
        batches: &Batches,
        batch: &Batch<'_>,
        jobs: Vec<Job>,
        err: StoreError,
    ) -> Vec<Result<Granted, StoreError>> {
        let serve = |half: Vec<Job>| -> BoxFuture<'_, Served<Granted>> {
            Box::pin(async move {
                let started = self.guess_pool(&object_name(&batch.pool.name));
                self.serve_batch(batches, batch, half, started, &mut Vec::new)
                    .await
            })
        };
        in_halves(jobs, err, &serve).await
    }

    /// Takes the answer of the process or task that served this request.
    fn accept(
        &self,
        granted: Result<Granted, StoreError>,
        pool: &PoolRef,
        req: &AddRequest,
        undo: &UndoLog,
    ) -> Result<IpAddr, StoreError> {
        let granted = granted?;
        let ip = granted.ip;
        for step in granted_steps(granted, pool, &req.attachment) {
            undo.push(step);
        }
        Ok(ip)
    }

    async fn serve_one(
        &self,
        pool: &PoolRef,
        req: &AddRequest,
        job: Job,
        undo: &UndoLog,
        go: &GoTerms<'_>,
    ) -> Result<IpAddr, StoreError> {
        let (mut results, _) = self
            .serve(pool, req, vec![job], None, undo, &mut Vec::new, go)
            .await?;
        results
            .pop()
            .unwrap_or_else(|| Err(StoreError::io("no result")))
            .map(|granted| granted.ip)
    }

    /// Allocates for every job with one read and one write of the pool (more on conflict).
    /// A job that cannot be served (pool full, static address held) gets its error; a failure
    /// of the pool itself fails the whole call, its writes left in `undo`.
    /// `known` is a guess of the pool (the agent's), tried before reading it.
    /// Returns the results and the pool as written.
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        pool: &PoolRef,
        req: &AddRequest,
        jobs: Vec<Job>,
        mut known: Option<IPPool>,
        undo: &UndoLog,
        refill: &mut (dyn FnMut() -> Vec<Job> + Send),
        go: &GoTerms<'_>,
    ) -> Result<(Vec<Result<Granted, StoreError>>, Option<IPPool>), StoreError> {
        let cx = BatchCx {
            pool,
            req,
            undo,
            go,
        };
        let name = object_name(&pool.name);
        // Spread from the first try while the agent sees other writers take this pool's
        // addresses; lowest free first otherwise.
        let contended = || self.batches.as_ref().is_some_and(|b| b.contended(&name));
        let new_slot = |job: Job| Slot::new(job, contended());
        let mut slots: Vec<Slot> = jobs.into_iter().map(new_slot).collect();
        // The same attachment twice (a runtime retrying while the first call waits) is one job.
        let mut twin_of: Vec<Option<usize>> = Vec::new();
        let mut conflicts = 0u32;
        // The last write that failed: reading its pool back unchanged means it was refused for
        // another reason than a concurrent change.
        let mut failed: Option<RefusedWrite> = None;
        let mut first = true;
        loop {
            if !first {
                // Requests that arrived while this batch waited join it.
                slots.extend(refill().into_iter().map(new_slot));
            }
            first = false;
            note_twins(&slots, &mut twin_of);
            let guessed = known.is_some();
            let (mut round, answered) = self
                .decide_round(
                    &cx,
                    known.take(),
                    failed.as_ref(),
                    &mut slots,
                    &mut twin_of,
                    || refill().into_iter().map(new_slot).collect(),
                )
                .await?;
            if guessed && withdraw_refusals(&mut slots, &answered) {
                // Refused on a guess (the pool as last written or as watched): no write can
                // confirm a refusal, so the server's pool decides again.
                continue;
            }
            self.plan_entries(&cx, &mut round, &mut slots)?;
            if req.sleep_for_race > 0 && !round.ops.is_empty() {
                tokio::time::sleep(Duration::from_secs(req.sleep_for_race)).await;
            }
            go.check()?;
            // The agent's batches (no Go binary writing) test each entry they rely on instead of
            // the whole pool's resourceVersion: other nodes' writes to other addresses of the
            // pool do not turn them back. The jobs of one attachment all come through this one
            // batch, so nothing but those entries bears on its answers.
            let keyed = self.batches.is_some() && !go.present;
            match self.write_round(&round, keyed, &mut failed).await {
                Ok(written) => {
                    self.settle(&cx, round.planned, &mut slots).await?;
                    let results = results_of(&mut slots, &twin_of);
                    return Ok((results, written));
                }
                Err(ApiError::Conflict(_)) | Err(ApiError::AlreadyExists(_)) => {
                    conflicts = self.after_conflict("add", &name, conflicts).await?;
                }
                Err(err @ ApiError::TooLarge(_)) => {
                    return Err(pool_full(&name, round.fresh_entries.len(), err))
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Reads the pool (or takes `known`), decides every slot's address and reserves the new
    /// ones. Requests that queued meanwhile (`join`) join once: one more round of creates, after
    /// which they share the round's pool write instead of waiting for it and writing the pool
    /// again. Returns the round and which slots were answered before it.
    async fn decide_round(
        &self,
        cx: &BatchCx<'_>,
        known: Option<IPPool>,
        failed: Option<&RefusedWrite>,
        slots: &mut Vec<Slot>,
        twin_of: &mut Vec<Option<usize>>,
        join: impl FnOnce() -> Vec<Slot>,
    ) -> Result<(Round, Vec<bool>), StoreError> {
        let mut round = self.read_round(cx, known, failed, slots).await?;
        let mut answered: Vec<bool> = slots.iter().map(|s| s.done.is_some()).collect();
        let needs = self
            .keep_or_reuse(cx, &mut round, slots, twin_of, 0)
            .await?;
        self.reserve_new(cx, &mut round, slots, needs).await?;
        let joined = slots.len();
        slots.extend(join());
        if slots.len() > joined {
            note_twins(slots, twin_of);
            answered.resize(slots.len(), false);
            let needs = self
                .keep_or_reuse(cx, &mut round, slots, twin_of, joined)
                .await?;
            self.reserve_new(cx, &mut round, slots, needs).await?;
        }
        Ok((round, answered))
    }

    /// Reads the pool (or takes `known`, the pool as last written) for a round of the batch.
    async fn read_round(
        &self,
        cx: &BatchCx<'_>,
        known: Option<IPPool>,
        failed: Option<&RefusedWrite>,
        slots: &[Slot],
    ) -> Result<Round, StoreError> {
        let name = object_name(&cx.pool.name);
        let object = match known {
            Some(object) => Some(object),
            None => self.kube.get_pool(&name).await?,
        };
        let doc = PoolDoc::new(&name, cx.pool.range.cidr, object)?;
        RefusedWrite::still_refused(failed, doc.resource_version(), || {
            format!("the API server refused the update of IPPool {name} although it is unchanged")
        })?;
        let held: BTreeMap<u128, Entry> =
            doc.entries().into_iter().map(|e| (e.offset, e)).collect();
        let mut taken = doc.taken();
        for (offset, _) in slots.iter().filter_map(|slot| slot.reserved.as_ref()) {
            taken.insert(*offset);
        }
        Ok(Round {
            limit: cx.go.present.then(|| doc.offset_limit(GO_OFFSET_LIMIT)),
            doc,
            held,
            taken,
            ops: Vec::new(),
            fresh_entries: Vec::new(),
            planned: Vec::new(),
            chosen: Vec::new(),
        })
    }

    /// Pass 1: what the core decides for each job (from slot `from` on) on this read of the
    /// pool. Repeated ADDs are answered here, and reservations of an earlier attempt kept while
    /// still free. Returns the jobs that still need an address reserved.
    async fn keep_or_reuse(
        &self,
        cx: &BatchCx<'_>,
        round: &mut Round,
        slots: &mut [Slot],
        twin_of: &[Option<usize>],
        from: usize,
    ) -> Result<Vec<usize>, StoreError> {
        let mut needs = Vec::new();
        for i in from..slots.len() {
            if slots[i].done.is_some() || twin_of[i].is_some() {
                continue;
            }
            let decision = self.pick(cx, round, &mut slots[i]);
            let earlier = slots[i].reserved.take();
            slots[i].kept = None;
            match decision {
                Some(Decision::Keep { offset, release }) => {
                    // A repeated ADD: hand back what the owner holds, with the new container ID.
                    if let Some((reserved, r)) = earlier {
                        if reserved == offset {
                            cx.undo.forget_reservation(&r);
                        } else {
                            self.drop_reservation(&r, cx.undo).await?;
                        }
                    }
                    let who = slots[i].who.clone();
                    // Under the entry's key as stored: a key written by hand (`007`) names
                    // the same address as the one upstream writes (`7`), which is not there.
                    let held = round.held.get(&offset);
                    let key = held.map(|h| h.key.clone()).unwrap_or_default();
                    let held_id = held.map(|h| h.attachment.container_id.clone());
                    // The answer stands only if the entry is still there as read.
                    round
                        .ops
                        .push(holder_test(&key, held_id.as_deref().unwrap_or_default()));
                    if held_id.as_ref() != Some(&who.container_id) {
                        round.ops.push(replace_id_op(&key, &who.container_id));
                        // In the log before the write: a failure after it (this ADD's reservation
                        // work, another range) gives the entry back. A write that never landed
                        // leaves the entry as it was, and giving back then finds nothing to do.
                        let at = (key.as_str(), cx.pool.range.ip(offset));
                        let kept = held.map(|h| kept(cx.pool, cx.req, at, &h.attachment, &who));
                        if let Some(kept) = &kept {
                            cx.undo.push(Step::Kept(kept.clone()));
                        }
                        slots[i].kept = kept;
                    }
                    slots[i].releasing = round.releasing(&release);
                    round.planned.push((i, offset, key, false));
                }
                Some(Decision::Take { .. } | Decision::Move { .. }) => match earlier {
                    Some((offset, r)) if round.doc.taken().contains(offset) => {
                        // Written meanwhile by someone that does not use reservations.
                        self.drop_reservation(&r, cx.undo).await?;
                        slots[i].avoid.insert(offset);
                        needs.push(i);
                    }
                    Some((offset, r)) => {
                        slots[i].reserved = Some((offset, r));
                        round.chosen.push((i, offset));
                    }
                    None => needs.push(i),
                },
                _ => {
                    if let Some((_, r)) = earlier {
                        self.drop_reservation(&r, cx.undo).await?;
                    }
                }
            }
        }
        Ok(needs)
    }

    /// Pass 2: chooses for the jobs in `needs` and reserves all their addresses at once;
    /// chooses again for those whose address turned out to be held elsewhere.
    async fn reserve_new(
        &self,
        cx: &BatchCx<'_>,
        round: &mut Round,
        slots: &mut [Slot],
        mut needs: Vec<usize>,
    ) -> Result<(), StoreError> {
        let range = &cx.pool.range;
        while !needs.is_empty() {
            let mut picks = Vec::new();
            for i in std::mem::take(&mut needs) {
                if let Some(offset) = self.pick(cx, round, &mut slots[i]).and_then(|d| d.offset()) {
                    round.taken.insert(offset);
                    picks.push((i, offset));
                }
            }
            if !cx.req.overlap {
                round.chosen.extend(picks);
                continue;
            }
            let wanted: Vec<(IpAddr, Attachment)> = picks
                .iter()
                .map(|(i, offset)| (range.ip(*offset), slots[*i].who.clone()))
                .collect();
            cx.go.check()?;
            let claim = Claim {
                network_name: &cx.req.network_name,
                pool_rv: round.doc.resource_version(),
                undo: cx.undo,
            };
            let outcomes = self.reserve_all(wanted, &claim).await?;
            for ((i, offset), outcome) in picks.into_iter().zip(outcomes) {
                match outcome {
                    Reserve::Ours(r) => {
                        slots[i].reserved = Some((offset, r));
                        round.chosen.push((i, offset));
                    }
                    Reserve::Taken { holder, .. } if slots[i].requested.is_some() => {
                        slots[i].done = Some(Err(StoreError::InUse {
                            ip: range.ip(offset),
                            range: range.to_string(),
                            holder,
                        }));
                    }
                    Reserve::Taken { raced, .. } => {
                        // Held through an overlapping range: skipped, as the core skips
                        // what it knows. Lost to a concurrent writer: spread from now on.
                        slots[i].avoid.insert(offset);
                        slots[i].salt += u32::from(raced);
                        if let (true, Some(batches)) = (raced, &self.batches) {
                            batches.lost_race(&round.doc.name);
                        }
                        needs.push(i);
                    }
                }
            }
        }
        Ok(())
    }

    /// Pass 3: the pool entries of the chosen addresses.
    fn plan_entries(
        &self,
        cx: &BatchCx<'_>,
        round: &mut Round,
        slots: &mut [Slot],
    ) -> Result<(), StoreError> {
        let range = &cx.pool.range;
        for (i, offset) in std::mem::take(&mut round.chosen) {
            if let Some(Decision::Move { release, .. }) = slots[i].decision.take() {
                slots[i].releasing = round.releasing(&release);
            }
            let who = slots[i].who.clone();
            let key = round.doc.key_of(offset).ok_or_else(|| {
                let name = &round.doc.name;
                StoreError::io(format!("IPPool {name} cannot record {}", range.ip(offset)))
            })?;
            cx.undo.push(Step::PoolEntry {
                pool: round.doc.name.clone(),
                cidr: range.cidr,
                key: key.clone(),
                ip: range.ip(offset),
                container_id: who.container_id.clone(),
                ifname: who.ifname.clone(),
            });
            round.ops.push(absent_test(&key));
            round.ops.push(add_op(&key, &who));
            round.fresh_entries.push((key.clone(), who));
            round.planned.push((i, offset, key, true));
        }
        Ok(())
    }

    /// Writes the round's changes: a patch conditional on the resourceVersion read, or the
    /// pool's creation. A failed patch leaves the resourceVersion it was sent for, and the
    /// refusal, in `failed`.
    async fn write_round(
        &self,
        round: &Round,
        keyed: bool,
        failed: &mut Option<RefusedWrite>,
    ) -> Result<Option<IPPool>, ApiError> {
        let name = &round.doc.name;
        match (round.ops.is_empty(), round.doc.resource_version()) {
            (true, _) => Ok(round.doc.object.clone()),
            (false, Some(rv)) => {
                let whole = (!keyed).then_some(rv);
                let result = self.kube.patch_pool(name, whole, &round.ops).await;
                *failed = result.as_ref().err().map(|refusal| RefusedWrite {
                    rv: rv.to_string(),
                    refusal: refusal.clone(),
                });
                result.map(Some).map_err(|err| match err {
                    // Deleted since it was read (or since the copy it came from): a change like
                    // any other, which the next read sees.
                    ApiError::NotFound(msg) => ApiError::Conflict(msg),
                    err => err,
                })
            }
            (false, None) => {
                *failed = None;
                let object = round.doc.new_object(&round.fresh_entries);
                self.kube.create_pool(&object).await.map(Some)
            }
        }
    }

    /// After the write: the reservations of moved addresses go, a kept address gets its
    /// reservation back if it had none, and every planned job its answer.
    async fn settle(
        &self,
        cx: &BatchCx<'_>,
        planned: Vec<(usize, u128, String, bool)>,
        slots: &mut [Slot],
    ) -> Result<(), StoreError> {
        let network_name = &cx.req.network_name;
        for (i, offset, key, fresh) in planned {
            if cx.req.overlap {
                self.release_moved(&slots[i].releasing, network_name).await;
            }
            let ip = cx.pool.range.ip(offset);
            if !fresh && cx.req.overlap {
                let pool = object_name(&cx.pool.name);
                match self
                    .ensure_reservation(ip, &slots[i].who, network_name)
                    .await?
                {
                    Err(holder) => {
                        // Held twice already (a reservation lost and the address taken through
                        // an overlapping range): handing it on would keep the duplicate.
                        // Refused, the runtime's DEL frees this entry, never the other's
                        // reservation (so it is not given back to the old sandbox).
                        cx.undo.forget_kept(&pool, &key);
                        slots[i].done = Some(Err(StoreError::InUse {
                            ip,
                            range: cx.pool.range.cidr.to_string(),
                            holder,
                        }));
                        continue;
                    }
                    // Taken over from another sandbox of the pod than the entry's (one holding
                    // the address through another pool): a give-back names that one again.
                    Ok(Some(from)) => {
                        cx.undo.kept_reservation_from(&pool, &key, &from);
                        if let Some(kept) = &mut slots[i].kept {
                            kept.reservation_before = from;
                        }
                    }
                    Ok(None) => {}
                }
            }
            let reservation = slots[i].reserved.take().map(|(_, held)| held);
            slots[i].done = Some(Ok(Granted {
                ip,
                key,
                reservation,
                fresh,
                kept: slots[i].kept.take(),
            }));
        }
        Ok(())
    }

    /// What the core decides for the job on this read of the pool (`taken` adds what this batch
    /// chose); `None`, with the job's error recorded, when the job cannot be served.
    fn pick(&self, cx: &BatchCx<'_>, round: &Round, slot: &mut Slot) -> Option<Decision<String>> {
        let pool = cx.pool;
        let (doc, range) = (&round.doc, &pool.range);
        if let Some(offset) = slot.requested {
            if let Err(err) = self.check_requested(pool, doc, offset) {
                slot.done = Some(Err(err));
                return None;
            }
        }
        let contention = match slot.salt {
            0 => Contention::None,
            salt => Contention::Spread {
                seed: stable_hash(&[&slot.who.container_id, &slot.who.ifname], salt),
                among: SPREAD,
            },
        };
        let ask = Ask {
            requested: slot.requested,
            contention,
            limit: round.limit,
        };
        // Only the agent has a copy; only reservations of overlapping ranges are ever made.
        let hints = self
            .cache
            .as_deref()
            .filter(|_| cx.req.overlap && slot.requested.is_none())
            .map(|cache| Hints {
                cache,
                range,
                network_name: &cx.req.network_name,
            });
        let mut view = BatchView {
            doc,
            held: &round.held,
            taken: &round.taken,
            slot,
            hints,
            hinted: false,
        };
        let Ok(mut decision) = decide(range, &ask, &mut view);
        if decision.offset().is_none() && view.hinted {
            // A refusal is never decided on a copy: without the hints, the reservations are
            // created (or found held) on the server.
            view.hints = None;
            let Ok(again) = decide(range, &ask, &mut view);
            decision = again;
        }
        if decision.offset().is_some() {
            slot.decision = Some(decision.clone());
            return Some(decision);
        }
        let limit = format!(
            "the first 2^63 addresses of {range}, which a Go Whereabouts binary would drop from \
             pool {} (beyond them only while no Go binary writes the pools: the flat file's \
             go_whereabouts)",
            doc.name
        );
        let cut_by_limit = round.limit.is_some_and(|limit| range.last >= limit);
        slot.done = Some(Err(match decision {
            Decision::Exhausted if cut_by_limit => StoreError::Exhausted {
                range: format!("{range} within {limit}"),
            },
            refusal => StoreError::refusing(range, refusal, &limit),
        }));
        None
    }

    /// Releases the reservations of entries a move or a repeated ADD gave back. A failure leaves
    /// a reservation of this same owner behind, which a later DEL or the cleanup takes back: it
    /// must not fail the ADD whose pool write already succeeded.
    async fn release_moved(&self, released: &[(IpAddr, Attachment)], network_name: &str) {
        for (ip, who) in released {
            // Under the ADD's own hold, if any: it is its own pod's address.
            let released = self.release_reservation(*ip, network_name, who, None, None);
            if let Err(err) = released.await {
                tracing::warn!(%ip, %err, "could not release the reservation of a moved address");
            }
        }
    }

    /// Creates the reservations of `wanted` concurrently (one round trip for a whole batch);
    /// for each, whether it is now ours or held by another attachment. Every reservation made
    /// is in `undo` before a failure is reported.
    async fn reserve_all(
        &self,
        wanted: Vec<(IpAddr, Attachment)>,
        claim: &Claim<'_>,
    ) -> Result<Vec<Reserve>, StoreError> {
        if wanted.len() == 1 {
            let (ip, who) = &wanted[0];
            return Ok(vec![self.reserve(*ip, who, claim).await?]);
        }
        let names: Vec<String> = wanted
            .iter()
            .map(|(ip, _)| reservation::name(*ip, claim.network_name))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (index, ((_, who), name)) in wanted.iter().zip(&names).enumerate() {
            let kube = self.kube.clone();
            let object = reservation::new_object(name, who);
            claim.undo.push(Step::Asked {
                name: name.clone(),
                who: who.clone(),
            });
            tasks.spawn(async move { (index, kube.create_reservation(&object).await) });
        }
        let mut created: Vec<Option<Result<Held, ApiError>>> = vec![None; wanted.len()];
        while let Some(joined) = tasks.join_next().await {
            let Ok((index, result)) = joined else {
                continue;
            };
            let result = result.map(|object| Held::of(&object));
            if let Ok(held) = &result {
                claim.undo.push(Step::Reservation { held: held.clone() });
            }
            created[index] = Some(result);
        }
        let mut outcomes = Vec::with_capacity(wanted.len());
        let mut failure = None;
        for (((ip, who), result), name) in wanted.iter().zip(created).zip(&names) {
            match self.settle_create(result, *ip, who, claim).await {
                Ok(outcome) => {
                    claim.undo.answered(name);
                    outcomes.push(outcome);
                }
                Err(err) => {
                    failure.get_or_insert(err);
                    outcomes.push(Reserve::Taken {
                        holder: String::new(),
                        raced: false,
                    });
                }
            }
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(outcomes),
        }
    }

    /// What one of [`Self::reserve_all`]'s creates came to: for a reservation that exists
    /// already, who holds it; for a create whose task was lost, the one-at-a-time way.
    async fn settle_create(
        &self,
        created: Option<Result<Held, ApiError>>,
        ip: IpAddr,
        who: &Attachment,
        claim: &Claim<'_>,
    ) -> Result<Reserve, StoreError> {
        match created {
            Some(Ok(held)) => Ok(Reserve::Ours(held)),
            Some(Err(ApiError::AlreadyExists(_))) => {
                let name = reservation::name(ip, claim.network_name);
                match self.holder(&name, who, claim).await? {
                    Some(outcome) => Ok(outcome),
                    // Gone since the create: try it again.
                    None => self.reserve(ip, who, claim).await,
                }
            }
            None => self.reserve(ip, who, claim).await,
            Some(Err(err)) => Err(err.into()),
        }
    }

    /// Counts a conflict of `operation` ("add" or "del") on `pool` and waits before the next
    /// attempt; gives up when the bound is reached.
    pub(super) async fn after_conflict(
        &self,
        operation: &'static str,
        pool: &str,
        conflicts: u32,
    ) -> Result<u32, StoreError> {
        let conflicts = conflicts + 1;
        if let Some(batches) = &self.batches {
            batches.observer.conflict(operation);
        }
        let backoff = &self.settings.conflicts;
        if conflicts >= backoff.attempts {
            return Err(StoreError::try_again(format!(
                "IPPool {pool} kept changing under {conflicts} attempts to update it; gave up"
            )));
        }
        tokio::time::sleep(backoff.delay(conflicts)).await;
        Ok(conflicts)
    }

    fn check_requested(
        &self,
        pool: &PoolRef,
        doc: &PoolDoc,
        offset: u128,
    ) -> Result<(), StoreError> {
        let range = &pool.range;
        if offset > range.cidr.last_offset() || doc.unaddressable_until(offset).is_some() {
            return Err(StoreError::config(format!(
                "requested address {} cannot be held in pool {}",
                range.ip(offset),
                doc.name
            )));
        }
        Ok(())
    }

    /// Creates the reservation of `ip`, or finds who holds it. Until that is known, the undo
    /// log holds the asking: a create that landed unanswered is taken back too.
    async fn reserve(
        &self,
        ip: IpAddr,
        who: &Attachment,
        claim: &Claim<'_>,
    ) -> Result<Reserve, StoreError> {
        let name = reservation::name(ip, claim.network_name);
        claim.undo.push(Step::Asked {
            name: name.clone(),
            who: who.clone(),
        });
        let outcome = self.create_or_find(&name, who, claim).await;
        if outcome.is_ok() {
            claim.undo.answered(&name);
        }
        outcome
    }

    async fn create_or_find(
        &self,
        name: &str,
        who: &Attachment,
        claim: &Claim<'_>,
    ) -> Result<Reserve, StoreError> {
        let object = reservation::new_object(name, who);
        // A reservation can vanish between the failed create and the read; try again then.
        for _ in 0..3 {
            match self.kube.create_reservation(&object).await {
                Ok(created) => {
                    let held = Held::of(&created);
                    claim.undo.push(Step::Reservation { held: held.clone() });
                    return Ok(Reserve::Ours(held));
                }
                Err(ApiError::AlreadyExists(_)) => {}
                Err(err) => return Err(err.into()),
            }
            if let Some(outcome) = self.holder(name, who, claim).await? {
                return Ok(outcome);
            }
        }
        Err(StoreError::try_again(format!(
            "reservation {name} keeps appearing and disappearing"
        )))
    }

    /// Who holds reservation `name`, which a create just found taken; `None` if it is gone.
    async fn holder(
        &self,
        name: &str,
        who: &Attachment,
        claim: &Claim<'_>,
    ) -> Result<Option<Reserve>, StoreError> {
        if let Some(taken) = self.held_elsewhere_by_copy(name, who, claim.pool_rv).await {
            return Ok(Some(taken));
        }
        Ok(match self.kube.get_reservation(name).await? {
            // Left by an earlier attempt of this same attachment, or by the pod's sandbox
            // before: adopt it. Ours always name the interface; an old one without (upstream's
            // before interface names) is the pod's other interface's as likely, and stays its
            // holder's.
            Some(found) if found.spec.ifname == who.ifname && reservation::held_by(&found, who) => {
                let before = if reservation::names_container(&found, who) {
                    // Ours already: made by an earlier attempt, or taken over by one whose
                    // answer was lost (then from whom that attempt logged).
                    claim.undo.taking_over_from(name)
                } else {
                    let before = reservation::holder(&found);
                    claim.undo.push(Step::TakingOver {
                        name: name.to_string(),
                        uid: found.metadata.uid.clone(),
                        before: before.clone(),
                        after: who.clone(),
                    });
                    Some(before)
                };
                // Refused (changed meanwhile, or a resent write that had landed): the step
                // stays for the next look, which may find the object ours.
                let Some(adopted) = self.take_over(found, who).await? else {
                    return Ok(None);
                };
                claim.undo.took_over(name);
                let held = Held {
                    before,
                    ..Held::of(&adopted)
                };
                claim.undo.push(Step::Reservation { held: held.clone() });
                Some(Reserve::Ours(held))
            }
            Some(found) => Some(taken_by(&found, name, claim.pool_rv)),
            None => None,
        })
    }

    /// `found`, held by `who`'s own container from now on: the other sandbox's release (its DEL,
    /// or the cleanup of its entry) then leaves it alone, and a release that read it before is
    /// refused by its resourceVersion. `None` when it changed or went away meanwhile.
    async fn take_over(
        &self,
        found: OverlappingRangeIPReservation,
        who: &Attachment,
    ) -> Result<Option<OverlappingRangeIPReservation>, StoreError> {
        if reservation::names_container(&found, who) {
            return Ok(Some(found));
        }
        let update = reservation::taken_over(&found, who);
        match self.kube.replace_reservation(&update).await {
            Ok(updated) => Ok(Some(updated)),
            Err(ApiError::Conflict(_) | ApiError::NotFound(_)) => Ok(None),
            // Rules from before reservations were taken over (not applied yet): kept as it
            // is, as then, rather than failing every ADD of the pod.
            Err(why) if why.is_refused() => {
                tracing::warn!(%why, "cannot take a reservation over: the plugin's Role lacks update of reservations; apply the manifest again");
                Ok(Some(found))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// After a create found `name` taken: the agent's watched copy names the holder without a
    /// read once the watch brings the reservation (its event is on its way). Only "someone
    /// else holds it" is trusted from the copy, since passing an address over never hands it
    /// out twice; adopting one as ours is decided on the server's object.
    async fn held_elsewhere_by_copy(
        &self,
        name: &str,
        who: &Attachment,
        pool_rv: Option<&str>,
    ) -> Option<Reserve> {
        let cache = self.cache.as_ref()?;
        let found = cache.reservation_within(name, WATCH_CATCH_UP).await?;
        (!reservation::held_by(&found, who)).then(|| taken_by(&found, name, pool_rv))
    }

    /// A repeated ADD keeps its reservation: re-create it if it is missing, take it over from
    /// the pod's sandbox before (as its pool entry was). Returns whom it took it over from (a
    /// sandbox other than `who`'s), or, as the error, who else holds it if another attachment
    /// does.
    async fn ensure_reservation(
        &self,
        ip: IpAddr,
        who: &Attachment,
        network_name: &str,
    ) -> Result<Result<Option<Attachment>, String>, StoreError> {
        let name = reservation::name(ip, network_name);
        let object = reservation::new_object(&name, who);
        // Each turn loses only to a change made meanwhile.
        for _ in 0..3 {
            match self.kube.create_reservation(&object).await {
                Ok(_) => return Ok(Ok(None)),
                Err(ApiError::AlreadyExists(_)) => {}
                Err(err) => return Err(err.into()),
            }
            let Some(found) = self.kube.get_reservation(&name).await? else {
                continue;
            };
            if !reservation::held_by(&found, who) {
                return Ok(Err(reservation::holder(&found).describe()));
            }
            let from =
                (!reservation::names_container(&found, who)).then(|| reservation::holder(&found));
            if self.take_over(found, who).await?.is_some() {
                return Ok(Ok(from));
            }
        }
        Err(StoreError::try_again(format!(
            "reservation {name} keeps changing"
        )))
    }

    async fn drop_reservation(&self, held: &Held, undo: &UndoLog) -> Result<(), StoreError> {
        match self.take_back_held(held).await {
            // A failed precondition: the object is no longer the one we wrote.
            Ok(()) | Err(ApiError::Conflict(_)) => {
                undo.forget_reservation(held);
                Ok(())
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Takes back what a failed ADD wrote: pool entries first (only those still held by the
    /// attachment), then reservations, so an address is never in a pool without its
    /// reservation. Returns the first failure, after trying everything.
    pub async fn undo(&self, steps: Vec<Step>) -> Result<(), StoreError> {
        let mut first_error = None;
        let mut standing = Vec::new();
        let (entries, reservations): (Vec<_>, Vec<_>) = steps
            .into_iter()
            .partition(|s| matches!(s, Step::PoolEntry { .. } | Step::Kept(_)));
        for step in entries.into_iter().rev() {
            if let Step::Kept(kept) = step {
                if let Err(err) = self.give_back_kept(kept).await {
                    first_error.get_or_insert(err);
                }
            } else if let Step::PoolEntry {
                pool,
                cidr,
                key,
                ip,
                container_id,
                ifname,
            } = step
            {
                let result = self
                    .remove_entries(&pool, cidr, |e, _| {
                        e.key == key
                            && e.attachment.container_id == container_id
                            && e.attachment.ifname == ifname
                    })
                    .await;
                if let Err(err) = result {
                    first_error.get_or_insert(err);
                    standing.push(ip);
                }
            }
        }
        for step in reservations.into_iter().rev() {
            let name = match &step {
                Step::Reservation { held } => &held.name,
                Step::Asked { name, .. } => name,
                Step::TakingOver { name, .. } => name,
                Step::PoolEntry { .. } | Step::Kept(_) => continue,
            };
            // An entry that could not be removed may still stand, and without its reservation
            // an overlapping range would hand its address out again.
            if standing
                .iter()
                .any(|ip| reservation::names_address(name, *ip))
            {
                continue;
            }
            match self.take_back_reservation(step).await {
                Ok(()) | Err(ApiError::Conflict(_)) => {}
                Err(err) => {
                    first_error.get_or_insert(err.into());
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Names the sandbox that held a kept entry before this ADD again, if the entry still names
    /// this ADD's sandbox (the test of the patch); then its reservation likewise.
    async fn give_back_kept(&self, kept: Kept) -> Result<(), StoreError> {
        let Kept {
            pool,
            key,
            ip,
            before,
            after,
            network_name,
            reservation_before,
        } = kept;
        let ops = [
            holder_test(&key, &after.container_id),
            replace_id_op(&key, &before.container_id),
        ];
        match self.kube.patch_pool(&pool, None, &ops).await {
            Ok(_) => {}
            // Released or kept again since: no longer this ADD's to give back.
            Err(ApiError::Conflict(_) | ApiError::NotFound(_)) => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        let Some(network_name) = network_name else {
            return Ok(());
        };
        let name = reservation::name(ip, &network_name);
        match self.kube.get_reservation(&name).await? {
            Some(found) if reservation::names_container(&found, &after) => {
                self.take_over(found, &reservation_before).await.map(drop)
            }
            _ => Ok(()),
        }
    }

    /// Takes back the reservation a step made: exactly the object written, or, for a create
    /// that went unanswered, the object of that name if it names the asking container and
    /// interface (as the create wrote them; an adoption would have taken it as this ADD's too).
    async fn take_back_reservation(&self, step: Step) -> Result<(), ApiError> {
        let held = match step {
            Step::Reservation { held } => held,
            Step::Asked { name, who } => match self.kube.get_reservation(&name).await? {
                Some(found) if reservation::names_container(&found, &who) => Held::of(&found),
                _ => return Ok(()),
            },
            Step::TakingOver {
                name,
                uid,
                before,
                after,
            } => {
                return match self.kube.get_reservation(&name).await? {
                    Some(found)
                        if found.metadata.uid == uid
                            && reservation::names_container(&found, &after) =>
                    {
                        let back = reservation::taken_over(&found, &before);
                        self.kube.replace_reservation(&back).await.map(drop)
                    }
                    _ => Ok(()),
                }
            }
            Step::PoolEntry { .. } | Step::Kept(_) => return Ok(()),
        };
        self.take_back_held(&held).await
    }

    /// Deletes exactly the reservation object this ADD wrote or, if the ADD took it over from
    /// an earlier sandbox of the pod, names that sandbox again: it may hold the address
    /// through another pool of the network, and the reservation is its guard there. Changed
    /// since (a Conflict, or another object or version read), it is no longer this ADD's.
    async fn take_back_held(&self, held: &Held) -> Result<(), ApiError> {
        let (uid, rv) = (held.uid.as_deref(), held.rv.as_deref());
        let Some(before) = &held.before else {
            return self.kube.delete_reservation(&held.name, uid, rv).await;
        };
        match self.kube.get_reservation(&held.name).await? {
            // Still naming `before` (the Role could not take it over): nothing to give back.
            Some(found)
                if found.metadata.uid.as_deref() == uid
                    && found.metadata.resource_version.as_deref() == rv
                    && !reservation::names_container(&found, before) =>
            {
                let back = reservation::taken_over(&found, before);
                self.kube.replace_reservation(&back).await.map(drop)
            }
            _ => Ok(()),
        }
    }
}

/// What stays the same through the rounds of a batch.
struct BatchCx<'a> {
    pool: &'a PoolRef,
    req: &'a AddRequest,
    undo: &'a UndoLog,
    go: &'a GoTerms<'a>,
}

/// One read of the pool in a batch, and the write planned on it.
struct Round {
    doc: PoolDoc,
    held: BTreeMap<u128, Entry>,
    /// The pool's addresses and those this batch reserved.
    taken: OffsetRuns,
    /// No offset at or beyond it is handed out (a Go binary may rewrite the pool).
    limit: Option<u128>,
    ops: Vec<serde_json::Value>,
    fresh_entries: Vec<(String, Attachment)>,
    /// Jobs whose address is reserved and whose pool entry is still to be planned.
    chosen: Vec<(usize, u128)>,
    /// Jobs the write answers: slot, offset, entry key, and whether the entry is new.
    planned: Vec<(usize, u128, String, bool)>,
}

impl Round {
    /// Remove operations for the entries a decision releases; those entries, whose reservations
    /// go once the pool is written.
    fn releasing(&mut self, release: &[u128]) -> Vec<(IpAddr, Attachment)> {
        let mut out = Vec::new();
        for offset in release {
            if let Some(held) = self.held.get(offset) {
                self.ops
                    .push(holder_test(&held.key, &held.attachment.container_id));
                self.ops.push(remove_op(&held.key));
                out.push((held.ip, held.attachment.clone()));
            }
        }
        out
    }
}

/// What taking back a grant to `who` in `pool` undoes: a kept entry's move to `who`'s sandbox;
/// a fresh grant's entry, then its reservation.
fn granted_steps(granted: Granted, pool: &PoolRef, who: &Attachment) -> Vec<Step> {
    let mut steps: Vec<Step> = granted.kept.map(Step::Kept).into_iter().collect();
    if !granted.fresh {
        return steps;
    }
    steps.push(Step::PoolEntry {
        pool: object_name(&pool.name),
        cidr: pool.range.cidr,
        key: granted.key,
        ip: granted.ip,
        container_id: who.container_id.clone(),
        ifname: who.ifname.clone(),
    });
    if let Some(held) = granted.reservation {
        steps.push(Step::Reservation { held });
    }
    steps
}

/// What gives entry `key` (of address `ip`) of `pool`, kept for `after`'s sandbox, back to
/// `before`'s. `req` is any request of the pool's batch (they share network and overlap).
fn kept(
    pool: &PoolRef,
    req: &AddRequest,
    (key, ip): (&str, IpAddr),
    before: &Attachment,
    after: &Attachment,
) -> Kept {
    Kept {
        pool: object_name(&pool.name),
        key: key.to_string(),
        ip,
        before: before.clone(),
        after: after.clone(),
        network_name: req.overlap.then(|| req.network_name.clone()),
        reservation_before: before.clone(),
    }
}

/// The entry key an undo step names, if any.
fn step_key(step: &Step) -> Option<&str> {
    match step {
        Step::PoolEntry { key, .. } | Step::Kept(Kept { key, .. }) => Some(key),
        Step::Reservation { .. } | Step::Asked { .. } | Step::TakingOver { .. } => None,
    }
}

/// Marks each slot added since the last call that repeats an earlier slot's attachment (a
/// runtime retrying while the first call waits): it gets that slot's answer.
fn note_twins(slots: &[Slot], twin_of: &mut Vec<Option<usize>>) {
    for i in twin_of.len()..slots.len() {
        let twin = (0..i).find(|j| slots[*j].who.same_owner(&slots[i].who));
        twin_of.push(twin);
    }
}

/// Takes back the refusals (exhausted, in use) given in this round to jobs not answered before
/// it (`answered`); whether there were any.
fn withdraw_refusals(slots: &mut [Slot], answered: &[bool]) -> bool {
    let mut any = false;
    for (slot, before) in slots.iter_mut().zip(answered) {
        if !before && matches!(slot.done, Some(Err(_))) {
            slot.done = None;
            any = true;
        }
    }
    any
}

/// Each job's answer once the pool is written: a repeated job (the same attachment twice in the
/// batch) gets its first's address, with nothing of its own to take back. A job of the same pod
/// and interface from another sandbox (another container ID) is told to try again: the entry
/// names the first's container, whose DEL, as the runtime tears it down, would free the address
/// under the new sandbox. Its retry finds the entry and takes it over.
fn results_of(slots: &mut [Slot], twin_of: &[Option<usize>]) -> Vec<Result<Granted, StoreError>> {
    let mut results: Vec<Result<Granted, StoreError>> = Vec::with_capacity(slots.len());
    for i in 0..slots.len() {
        let result = match twin_of[i] {
            Some(first) if slots[first].who.container_id != slots[i].who.container_id => {
                Err(StoreError::try_again(format!(
                    "the pod's ADD from container {} was being served; try again",
                    slots[first].who.container_id
                )))
            }
            // The first comes earlier: its answer is in `results` already.
            Some(first) => match &results[first] {
                Ok(granted) => Ok(Granted {
                    fresh: false,
                    reservation: None,
                    kept: None,
                    ..Granted::clone(granted)
                }),
                Err(err) => Err(StoreError::clone(err)),
            },
            None => slots[i]
                .done
                .take()
                .unwrap_or_else(|| Err(StoreError::io("not served"))),
        };
        results.push(result);
    }
    results
}

/// One job of a batch while it is being served.
struct Slot {
    who: Attachment,
    requested: Option<u128>,
    /// Addresses whose reservation another attachment holds (the pool does not show them).
    avoid: BTreeSet<u128>,
    reserved: Option<(u128, Held)>,
    salt: u32,
    /// The last decision that takes an address, kept for the write.
    decision: Option<Decision<String>>,
    /// Entries the write gives back (a move, a duplicate): their reservations go after it.
    releasing: Vec<(IpAddr, Attachment)>,
    /// Who held the entry a keep moves to this job's sandbox.
    kept: Option<Kept>,
    done: Option<Result<Granted, StoreError>>,
}

impl Slot {
    /// `contended`: the pool lost races lately, so the job spreads from its first try.
    fn new(job: Job, contended: bool) -> Slot {
        Slot {
            who: job.attachment(),
            requested: job.requested(),
            avoid: job.earlier().iter().copied().collect(),
            reserved: None,
            salt: u32::from(contended),
            decision: None,
            releasing: Vec::new(),
            kept: None,
            done: None,
        }
    }
}
