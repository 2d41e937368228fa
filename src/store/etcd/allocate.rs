//! ADD: for every range of the request, find what the attachment already holds or the lowest
//! free address, then commit all ranges in one transaction whose compares cover everything
//! that was read. A lost race is retried with what the failed commit read back (and, for a
//! single range, two alternatives ride along in the same commit); a failed call means "read
//! again and retry". Because the owner index is written with the allocation, a retry after a
//! commit whose outcome was unknown finds the committed allocation and returns it instead of
//! taking a second address.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};

use super::commit::{build_commit, compact_chain};
use super::contention::start_past;
use super::freed::fold_pool;
use super::keys::parse_hex;
use super::plan::{
    alternatives, free_after, read_kept_reservation, read_released, IndexHits, Plan, RangeView,
    Released, Stop, SPARE,
};
use super::records::AllocationRecord;
use super::runs::ReadRun;
use super::session::{key_get, revision_of, CallFailed, Deadline, Session, MAX_TXN_OPS};
use super::window::{self, Window};
use crate::ipam::{decide, Ask, Contention, Decision, Range};
use crate::store::retry::Backoff;
use crate::store::{AddRequest, RangeRequest, StoreError};

pub fn add(s: &Session, backoff: &Backoff, req: &AddRequest) -> Result<Vec<IpAddr>, StoreError> {
    add_by(s, backoff, req, &Deadline::after(s.timeouts.deadline), None)
}

/// [`add`], finished by the deadline `dl` (the agent's batch shares its own). An ADD that
/// already lost a combined commit plans its first attempt from what that commit `read_back`
/// instead of reading.
pub(super) fn add_by(
    s: &Session,
    backoff: &Backoff,
    req: &AddRequest,
    dl: &Deadline,
    read_back: Option<ReadBack>,
) -> Result<Vec<IpAddr>, StoreError> {
    refuse_unsupported(req)?;
    let mut memory = Memory::new(req.ranges.len());
    if let Some(read_back) = read_back {
        memory.start_from(read_back);
    }
    let mut last = CallFailed::new("no attempt finished");
    for attempt in 0..backoff.attempts.max(1) {
        if attempt > 0 && memory.wait {
            // Failed calls (no leader, a member gone) back off exponentially so that an
            // election is waited out rather than hammered.
            let step = memory.conflicts.max(memory.failures).min(attempt);
            s.pause(dl, backoff.delay(step));
        } else if attempt > 0 {
            // A light jitter even when spreading, so that retries do not arrive in lockstep.
            s.pause(dl, backoff.delay(0));
        }
        if dl.passed() {
            break;
        }
        match attempt_add(s, req, dl, &mut memory) {
            Ok(Some(ips)) => return Ok(ips),
            // The addresses skipped as held elsewhere may have been freed since (or, learnt
            // in an agent's batch, concern another request): a search that skips none, on a
            // fresh read, decides whether the range is full.
            Err(Stop::Final(StoreError::Exhausted { .. }))
                if !memory.reserved_elsewhere.is_empty() =>
            {
                memory.reserved_elsewhere.clear();
                memory.hits = None;
                memory.prefetched.iter_mut().for_each(|w| *w = None);
                last = CallFailed::new("the range looked full but for addresses held elsewhere");
            }
            Ok(None) => {
                last = CallFailed::new("the pool changed while allocating (conflicting writer)")
            }
            Err(Stop::Final(e)) => return Err(e),
            Err(Stop::Retry(failed)) => {
                memory.call_failed();
                last = failed;
            }
        }
    }
    let what = format!(
        "could not allocate from etcd within {:?}",
        s.timeouts.deadline
    );
    Err(StoreError::try_again(last.answered(&what)).because(last))
}

/// What this engine cannot serve, before anything is read.
pub(super) fn refuse_unsupported(req: &AddRequest) -> Result<(), StoreError> {
    if req.node_slice_size.is_some() {
        return Err(StoreError::config(
            "node_slice_size is not supported with datastore \"etcd\" yet",
        ));
    }
    for (i, a) in req.ranges.iter().enumerate() {
        if req.ranges[..i].iter().any(|b| b.pool.name == a.pool.name) {
            return Err(StoreError::config(format!(
                "two ranges of this configuration map to the same pool {}",
                a.pool.name
            )));
        }
    }
    Ok(())
}

/// Refuses, as the configuration's, a commit etcd would refuse for its size (`counts`: its
/// compares, operations and failure operations, each held to [`MAX_TXN_OPS`]). All ranges of an
/// ADD commit together, so no retry makes it fit, and etcd's "too many operations" would read
/// as the members' setting.
fn refuse_oversized(req: &AddRequest, counts: [usize; 3]) -> Result<(), Stop> {
    let most = counts.into_iter().max().unwrap_or(0);
    if most <= MAX_TXN_OPS {
        return Ok(());
    }
    Err(Stop::Final(StoreError::config(format!(
        "ipam.ipRanges: an ADD of these {} ranges commits {most} operations in one etcd \
         transaction, more than the {MAX_TXN_OPS} it holds: configure fewer ranges",
        req.ranges.len()
    ))))
}

/// What a lost commit read back in its failure branch, at the revision it lost at: the
/// request's index entries and, per range, the offset its search started from with the run
/// window there. The next attempt plans from it without reading.
#[derive(Clone)]
pub(super) struct ReadBack {
    pub hits: Vec<IndexHits>,
    pub windows: Vec<(u128, Window)>,
    /// Addresses the next search skips: reserved through an overlapping range, or answered to
    /// another request of the agent's batch.
    pub avoid: HashSet<IpAddr>,
}

/// What one ADD learns across its attempts.
pub(super) struct Memory {
    /// Addresses found reserved network-wide by another pool.
    pub reserved_elsewhere: HashSet<IpAddr>,
    /// Per range, where the next search starts: after losing an offset to a concurrent
    /// writer, a random distance past it, so that contenders stop colliding on one address.
    start_hint: Vec<Option<u128>>,
    /// Per range, the run window at `start_hint`, read by the failed commit itself.
    prefetched: Vec<Option<Window>>,
    /// The index entries as the failed commit read them back, at the revision it lost at
    /// (the next commit compares them again anyway).
    hits: Option<Vec<IndexHits>>,
    conflicts: u32,
    /// Calls that failed (transport errors, timeouts).
    failures: u32,
    /// Whether to back off before the next attempt.
    wait: bool,
}

impl Memory {
    pub fn new(ranges: usize) -> Memory {
        Memory {
            reserved_elsewhere: HashSet::new(),
            start_hint: vec![None; ranges],
            prefetched: vec![None; ranges],
            hits: None,
            conflicts: 0,
            failures: 0,
            wait: false,
        }
    }

    /// The next attempt plans from `read_back` instead of reading.
    fn start_from(&mut self, read_back: ReadBack) {
        let ranges = self.prefetched.len();
        for (i, (from, window)) in read_back.windows.into_iter().enumerate().take(ranges) {
            self.start_search_at(i, from);
            self.prefetched[i] = Some(window);
        }
        self.hits = Some(read_back.hits);
        self.reserved_elsewhere.extend(read_back.avoid);
    }

    fn start(&self, i: usize, range: &Range) -> u128 {
        search_from(self.start_hint.get(i).copied().flatten(), range)
    }

    /// What the core is asked for range `i`: its static address, or a search from where the
    /// last conflict left it. Go binaries never write an etcd store: the whole range is ours.
    fn ask(&self, i: usize, rr: &RangeRequest) -> Ask {
        let range = &rr.pool.range;
        let start = self.start(i, range);
        Ask {
            requested: rr.requested,
            contention: if start > range.first {
                Contention::StartAt(start)
            } else {
                Contention::None
            },
            limit: None,
        }
    }

    /// Starts the search of range `i` at `offset` (a search that finds nothing from there
    /// starts over from the beginning of the range).
    pub fn start_search_at(&mut self, i: usize, offset: u128) {
        if let Some(hint) = self.start_hint.get_mut(i) {
            *hint = Some(offset);
        }
    }

    /// Where to search next if `offset` is lost: a random distance past it, the spread growing
    /// with repeated conflicts. A search that finds nothing from there starts over from the
    /// beginning of the range, so no free address is ever missed.
    fn next_hint(&self, offset: u128) -> Option<u128> {
        start_past(offset, self.conflicts)
    }

    /// Forgets what a failed call may have made stale.
    fn call_failed(&mut self) {
        self.hits = None;
        self.prefetched.iter_mut().for_each(|w| *w = None);
        self.failures += 1;
        self.wait = true;
    }
}

/// Where a search of `range` starts given a `hint`: the hint when it lies past the range's
/// first offset and within it, else the first offset.
pub(super) fn search_from(hint: Option<u128>, range: &Range) -> u128 {
    hint.filter(|h| *h > range.first && *h <= range.last)
        .unwrap_or(range.first)
}

/// One read-decide-commit round. `Ok(None)` when a compare failed.
fn attempt_add(
    s: &Session,
    req: &AddRequest,
    dl: &Deadline,
    memory: &mut Memory,
) -> Result<Option<Vec<IpAddr>>, Stop> {
    let (hits, mut windows) = first_read(s, req, dl, memory)?;
    let held = read_held(s, req, &hits, dl)?;
    let Planned {
        plans,
        mut chosen,
        spare,
        ..
    } = plan_all(s, req, &hits, held, &mut windows, memory, dl)?;
    if req.sleep_for_race > 0 {
        s.pause(dl, Duration::from_secs(req.sleep_for_race));
    }
    let (compares, ops) = build_commit(s, req, &plans);
    if ops.is_empty() {
        // Every range is already held by this attachment, unchanged: nothing to write.
        return Ok(Some(chosen));
    }
    let alternatives = alternatives(req, &plans, &spare);
    let (probes, probe_gets) = probes_for(s, req, &plans, &spare, memory);
    let otherwise = fallbacks(s, req, &plans, &alternatives, probe_gets);
    refuse_oversized(req, [compares.len(), ops.len(), otherwise.len()])?;
    let txn = Txn::new().when(compares).and_then(ops).or_else(otherwise);
    let resp = s.txn(dl, "allocation commit", txn)?;
    let revision = revision_of(&resp);
    let mut levels = branches_taken(resp, alternatives.len());
    if let Some(level) = levels.iter().position(|r| r.succeeded()) {
        if level > 0 {
            if let Some(Plan::Take { ip, .. }) = alternatives.get(level - 1) {
                chosen = vec![*ip];
            }
        }
        let who = &req.attachment;
        tracing::debug!(container = %who.container_id, ips = ?chosen, "etcd: allocated");
        for (rr, plan) in req.ranges.iter().zip(&plans) {
            if let Plan::Take { offset, walked, .. } = plan {
                s.runs_written.note(&rr.pool.name, revision);
                let new_run = (level == 0).then_some(*offset);
                compact_chain(s, dl, &rr.pool.name, walked, new_run.as_slice(), revision);
            }
        }
        return Ok(Some(chosen));
    }
    if let Some(resp) = levels.pop() {
        learn_from_probes(req, resp, probes, memory);
    }
    Ok(None)
}

/// The plan of every range, in order.
pub(super) struct Planned {
    /// Which of a batch's requests it is for (`combine`); 0 otherwise.
    pub index: usize,
    pub plans: Vec<Plan>,
    /// The address each plan gives, in the same order.
    pub chosen: Vec<IpAddr>,
    /// The free offsets after the last dynamic range's choice: the alternatives tried in the
    /// same round trip.
    spare: Vec<u128>,
}

pub(super) fn plan_all(
    s: &Session,
    req: &AddRequest,
    hits: &[IndexHits],
    held: Vec<Option<(u128, i64, AllocationRecord)>>,
    windows: &mut [Option<Window>],
    memory: &mut Memory,
    dl: &Deadline,
) -> Result<Planned, Stop> {
    let mut plans = Vec::with_capacity(req.ranges.len());
    let mut chosen: Vec<IpAddr> = Vec::new();
    let mut spare: Vec<u128> = Vec::new();
    for (i, ((rr, hit), held)) in req.ranges.iter().zip(hits).zip(held).enumerate() {
        let taken = |ip: &IpAddr| chosen.contains(ip) || memory.reserved_elsewhere.contains(ip);
        let view = RangeView {
            s,
            dl,
            req,
            rr,
            held: held.as_ref().map(|(offset, _, _)| *offset),
            taken: &taken,
            window: windows[i].take().unwrap_or_default(),
            walked: Vec::new(),
            own_reservation: None,
        };
        let (plan, free_after) = plan_range(view, memory.ask(i, rr), *hit, held)?;
        if rr.requested.is_none() {
            spare = free_after;
        }
        chosen.push(match &plan {
            Plan::Keep { ip, .. } | Plan::Take { ip, .. } => *ip,
        });
        plans.push(plan);
    }
    Ok(Planned {
        index: 0,
        plans,
        chosen,
        spare,
    })
}

/// What a failed compare reads back, so the next attempt needs no extra round trip: the
/// attachment's index entries, whether each chosen offset is now held in its pool, whether its
/// address is reserved through another pool, and the run window where the next search would
/// start.
fn probes_for(
    s: &Session,
    req: &AddRequest,
    plans: &[Plan],
    spare: &[u128],
    memory: &Memory,
) -> (Probes, Vec<TxnOp>) {
    let mut probes = Vec::new();
    // The index entries first: a commit may have lost on them (the same attachment's ADD
    // committed meanwhile, or its pod's other container was released), and the next attempt
    // must plan from what they are now, not from what they were.
    let mut gets = index_gets(s, req);
    for (i, (rr, plan)) in req.ranges.iter().zip(plans).enumerate() {
        if let Plan::Take { offset, ip, .. } = plan {
            let akey = s.keys.allocation(&rr.pool.name, *offset);
            gets.push(key_get(&akey));
            gets.push(key_get(&if req.overlap {
                s.keys.reservation(&req.network_name, *ip)
            } else {
                akey
            }));
            let hint = memory
                .next_hint(*offset)
                .filter(|h| *h <= rr.pool.range.last && rr.requested.is_none());
            if let Some(h) = hint {
                gets.extend(window::gets(&s.keys, &rr.pool.name, h));
            }
            probes.push(Probe {
                range: i,
                ip: *ip,
                hint,
            });
        }
    }
    let spare = spare_addresses(req, plans, spare, PROBE_GETS.saturating_sub(gets.len()));
    gets.extend(
        spare
            .iter()
            .map(|ip| key_get(&s.keys.reservation(&req.network_name, *ip))),
    );
    let probes = Probes {
        each: probes,
        spare,
    };
    (probes, gets)
}

/// The gets of a failed commit's probes, at most. They sit up to three levels deep (below the
/// gate and two alternatives: [`fallbacks`]), and etcd gives a nested transaction what its
/// parent's largest list leaves of the parent's own budget, from [`MAX_TXN_OPS`]: the commit's
/// lists (below 32), the gate's (the probes), the first alternative's (below 32) leave the
/// deepest branch 32.
const PROBE_GETS: usize = MAX_TXN_OPS / 4;

/// What a failed commit reads back to learn from.
struct Probes {
    each: Vec<Probe>,
    /// The addresses of free offsets after the last dynamic choice, whose reservations are read
    /// after the probes' keys: every one held through an overlapping range is then skipped by
    /// the next search, instead of being found one lost commit at a time.
    spare: Vec<IpAddr>,
}

/// One chosen address of a failed commit, and where its next search would start.
struct Probe {
    range: usize,
    ip: IpAddr,
    hint: Option<u128>,
}

/// The addresses of `spare` (the free offsets after the last dynamic range's choice), at most
/// `budget`, when the ADD reserves its addresses network-wide and that range took one.
fn spare_addresses(req: &AddRequest, plans: &[Plan], spare: &[u128], budget: usize) -> Vec<IpAddr> {
    let last_dynamic = req
        .ranges
        .iter()
        .zip(plans)
        .rev()
        .find(|(rr, _)| rr.requested.is_none());
    match last_dynamic {
        Some((rr, Plan::Take { .. })) if req.overlap => spare
            .iter()
            .take(budget)
            .map(|offset| rr.pool.range.ip(*offset))
            .collect(),
        _ => Vec::new(),
    }
}

/// The failure branch of the commit. The first choice, then, only if it was lost to a writer of
/// the same pool (its record now exists), each alternative in the failure branch of the one
/// before: one round trip tries them in order, and the cluster applies at most one. A first
/// choice refused for another reason (reserved through another range) falls through to the
/// probes, so the next attempt still takes the lowest free address.
fn fallbacks(
    s: &Session,
    req: &AddRequest,
    plans: &[Plan],
    alternatives: &[Plan],
    probe_gets: Vec<TxnOp>,
) -> Vec<TxnOp> {
    let mut inner: Option<Txn> = None;
    for alt in alternatives.iter().rev() {
        let (c, o) = build_commit(s, req, std::slice::from_ref(alt));
        let otherwise = match inner.take() {
            Some(t) => vec![TxnOp::txn(t)],
            None => probe_gets.clone(),
        };
        inner = Some(Txn::new().when(c).and_then(o).or_else(otherwise));
    }
    match (inner, plans, req.ranges.as_slice()) {
        (Some(first_alt), [Plan::Take { offset, .. }], [rr]) => {
            let lost = Compare::create_revision(
                s.keys.allocation(&rr.pool.name, *offset),
                CompareOp::Greater,
                0,
            );
            let gate = Txn::new()
                .when([lost])
                .and_then([TxnOp::txn(first_alt)])
                .or_else(probe_gets);
            vec![TxnOp::txn(gate)]
        }
        _ => probe_gets,
    }
}

/// The commit's response and the nested failure branches it went down, in order: the last is
/// the one that applied, or the one that answered the probes.
fn branches_taken(resp: TxnResponse, alternatives: usize) -> Vec<TxnResponse> {
    let mut levels = vec![resp];
    if alternatives == 0 || levels[0].succeeded() {
        return levels;
    }
    let Some(TxnOpResponse::Txn(gate)) = levels[0].op_responses().into_iter().next() else {
        return levels;
    };
    if !gate.succeeded() {
        levels.push(gate);
        return levels;
    }
    let mut current = gate;
    for _ in 0..alternatives {
        match current.op_responses().into_iter().next() {
            Some(TxnOpResponse::Txn(next)) => {
                levels.push(next.clone());
                if next.succeeded() {
                    break;
                }
                current = next;
            }
            _ => break,
        }
    }
    levels
}

/// What the probes of a failed commit say about the next attempt, which plans from the index
/// entries they read back: an offset lost to another writer of the pool (contention: back
/// off, start past it), a dynamic choice reserved through an overlapping range (search again
/// at once), or a changed run or index entry (contention; a static address's reservation is
/// read again as the next attempt decides).
fn learn_from_probes(req: &AddRequest, resp: TxnResponse, probes: Probes, memory: &mut Memory) {
    let mut answers = resp.op_responses().into_iter().map(|r| match r {
        TxnOpResponse::Get(mut g) => g.take_kvs(),
        _ => Vec::new(),
    });
    memory.hits = Some(parse_hits(req, &mut answers));
    memory.wait = false;
    memory.prefetched.iter_mut().for_each(|w| *w = None);
    let mut lost_any = false;
    for probe in probes.each {
        let held = !answers.next().unwrap_or_default().is_empty();
        let reserved = !answers.next().unwrap_or_default().is_empty();
        let window = probe.hint.map(|h| (h, window::parse(h, &mut answers)));
        if held {
            lost_any = true;
            memory.start_hint[probe.range] = window.as_ref().map(|(h, _)| *h);
            memory.prefetched[probe.range] = window.map(|(_, w)| w);
        } else if req.overlap && reserved && req.ranges[probe.range].requested.is_none() {
            // A static address's reservation is read again as the next attempt decides (it
            // may be the attachment's own, through another pool).
            memory.reserved_elsewhere.insert(probe.ip);
        } else {
            memory.wait = true;
        }
    }
    for ip in probes.spare {
        if !answers.next().unwrap_or_default().is_empty() {
            memory.reserved_elsewhere.insert(ip);
        }
    }
    if lost_any {
        memory.conflicts += 1;
        memory.wait |= memory.conflicts > 2;
    }
}

/// What one range of the request commits, as the core decides it from what etcd holds
/// (`view`); with the free offsets after a dynamic choice (for alternatives).
fn plan_range(
    mut view: RangeView<'_>,
    ask: Ask,
    hit: IndexHits,
    held: Option<(u128, i64, AllocationRecord)>,
) -> Result<(Plan, Vec<u128>), Stop> {
    let (s, dl, rr) = (view.s, view.dl, view.rr);
    let range = &rr.pool.range;
    let decision = decide(range, &ask, &mut view)?;
    let own_reservation = view.own_reservation;
    let take = |offset: u128, walked: Vec<ReadRun>, release: Option<Box<Released>>| Plan::Take {
        offset,
        ip: range.ip(offset),
        walked,
        owner_rev: hit.owner.map(|(rev, _)| rev),
        pod_rev: hit.pod.map(|(rev, _)| rev),
        release,
        reservation_rev: own_reservation
            .filter(|(own, _)| *own == offset)
            .map(|(_, rev)| rev),
    };
    let vanished = || {
        Stop::Retry(CallFailed::new(
            "the held allocation vanished while deciding",
        ))
    };
    let plan = match decision {
        Decision::Keep { offset, .. } => {
            let (_, mod_revision, record) = held.ok_or_else(vanished)?;
            let reservation = read_kept_reservation(s, dl, (view.req, &rr.pool.name), &record)?;
            Plan::Keep {
                offset,
                ip: range.ip(offset),
                mod_revision,
                record: Box::new(record),
                reservation,
            }
        }
        Decision::Take { offset } => {
            let free = free_after(range, &view.window, offset, view.taken, SPARE);
            return Ok((take(offset, view.walked, None), free));
        }
        Decision::Move { to, .. } => {
            let (offset, mod_revision, record) = held.ok_or_else(vanished)?;
            let released = read_released(s, dl, &rr.pool.name, offset, mod_revision, record)?;
            take(to, Vec::new(), Some(Box::new(released)))
        }
        Decision::Exhausted if fold_pool(s, dl, &rr.pool.name)? => {
            return Err(Stop::Retry(CallFailed::new(
                "the pool looked full until its released addresses were cut out of its runs",
            )));
        }
        // Not asked for (no limit), so never beyond it.
        refusal => {
            let limit = "the offsets this pool may hold";
            return Err(Stop::Final(StoreError::refusing(range, refusal, limit)));
        }
    };
    Ok((plan, Vec::new()))
}

/// One read for the whole request: the attachment's owner and pod index entries in every pool,
/// and for every range to be chosen dynamically, the run window where its search starts.
#[allow(clippy::type_complexity)]
fn first_read(
    s: &Session,
    req: &AddRequest,
    dl: &Deadline,
    memory: &mut Memory,
) -> Result<(Vec<IndexHits>, Vec<Option<Window>>), Stop> {
    // After a lost race the failed commit already read everything the next attempt needs.
    let all_prefetched = req
        .ranges
        .iter()
        .zip(&memory.prefetched)
        .all(|(rr, w)| rr.requested.is_some() || w.is_some());
    if all_prefetched {
        if let Some(hits) = memory.hits.take() {
            let windows = memory.prefetched.iter_mut().map(Option::take).collect();
            return Ok((hits, windows));
        }
    }
    let mut gets = index_gets(s, req);
    let mut starts = Vec::with_capacity(req.ranges.len());
    for (i, rr) in req.ranges.iter().enumerate() {
        let start = rr
            .requested
            .is_none()
            .then(|| memory.start(i, &rr.pool.range));
        if let Some(start) = start {
            gets.extend(window::gets(&s.keys, &rr.pool.name, start));
        }
        starts.push(start);
    }
    let mut results = s.reads(dl, "pool read", gets)?.into_iter();
    let hits = parse_hits(req, &mut results);
    let windows = starts
        .into_iter()
        .map(|start| start.map(|from| window::parse(from, &mut results)))
        .collect();
    Ok((hits, windows))
}

/// The gets of the attachment's owner and pod index entries in every pool of the request.
pub(super) fn index_gets(s: &Session, req: &AddRequest) -> Vec<TxnOp> {
    let who = &req.attachment;
    let mut gets = Vec::new();
    for rr in &req.ranges {
        let pool = &rr.pool.name;
        gets.push(key_get(&s.keys.owner(&who.container_id, &who.ifname, pool)));
        if let Some(pod) = &who.pod_ref {
            gets.push(key_get(&s.keys.pod(pod, &who.ifname, pool)));
        }
    }
    gets
}

/// The index entries, from the answers to [`index_gets`] (consumed in order).
pub(super) fn parse_hits(
    req: &AddRequest,
    results: &mut impl Iterator<Item = Vec<KeyValue>>,
) -> Vec<IndexHits> {
    let hit = |kvs: Option<Vec<KeyValue>>| {
        kvs.and_then(|kvs| kvs.into_iter().next()).map(|kv| {
            let offset = std::str::from_utf8(kv.value()).ok().and_then(parse_hex);
            (kv.mod_revision(), offset)
        })
    };
    req.ranges
        .iter()
        .map(|_| IndexHits {
            owner: hit(results.next()),
            pod: req
                .attachment
                .pod_ref
                .as_ref()
                .and_then(|_| hit(results.next())),
        })
        .collect()
}

/// For every range, the allocation the attachment already holds there, if any.
#[allow(clippy::type_complexity)]
fn read_held(
    s: &Session,
    req: &AddRequest,
    hits: &[IndexHits],
    dl: &Deadline,
) -> Result<Vec<Option<(u128, i64, AllocationRecord)>>, Stop> {
    // The pod entry first: it survives a sandbox restart that changes the container ID.
    let candidates: Vec<Vec<u128>> = hits
        .iter()
        .map(|h| {
            let mut c: Vec<u128> = [h.pod, h.owner]
                .into_iter()
                .flatten()
                .filter_map(|(_, o)| o)
                .collect();
            c.dedup();
            c
        })
        .collect();
    let mut gets = Vec::new();
    for (rr, offsets) in req.ranges.iter().zip(&candidates) {
        for o in offsets {
            gets.push(key_get(&s.keys.allocation(&rr.pool.name, *o)));
        }
    }
    let mut results = s.reads(dl, "allocation read", gets)?.into_iter();
    let mut held = Vec::with_capacity(req.ranges.len());
    for (_, offsets) in req.ranges.iter().zip(&candidates) {
        let mut found = None;
        for o in offsets {
            let kv = results.next().and_then(|kvs| kvs.into_iter().next());
            if found.is_some() {
                continue;
            }
            if let Some(kv) = kv {
                if let Some(record) = AllocationRecord::from_json(kv.value()) {
                    if record.attachment().same_owner(&req.attachment) {
                        found = Some((*o, kv.mod_revision(), record));
                    }
                }
            }
        }
        held.push(found);
    }
    Ok(held)
}
