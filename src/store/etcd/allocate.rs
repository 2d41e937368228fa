//! ADD: for every range of the request, find what the attachment already holds or the lowest
//! free address, then commit all ranges in one transaction whose compares cover everything
//! that was read. A failed compare or a failed call means "read again and retry"; because the
//! owner index is written with the allocation, a retry after a commit whose outcome was unknown
//! finds the committed allocation and returns it instead of taking a second address.

use std::net::IpAddr;
use std::time::Duration;

use std::collections::HashSet;

use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse};
use rand::Rng;

use super::keys::{hex, parse_hex};
use super::records::{AllocationRecord, ReservationRecord};
use super::runs::{self, ReadRun, Run};
use super::session::{floor_get, key_get, CallFailed, Deadline, Session};
use super::window::{self, Window};
use crate::ipam::Range;
use crate::store::retry::Backoff;
use crate::store::{AddRequest, Attachment, RangeRequest, StoreError};

/// Why one attempt did not finish.
enum Stop {
    /// Retrying cannot help.
    Final(StoreError),
    /// Read again and retry.
    Retry(String),
}

impl From<CallFailed> for Stop {
    fn from(e: CallFailed) -> Self {
        Stop::Retry(e.0)
    }
}

/// What one range of the request will commit.
enum Plan {
    /// The attachment already holds `offset`: keep it, updating the record if the container
    /// changed.
    Keep {
        offset: u128,
        ip: IpAddr,
        /// The record's revision as read, which the commit compares.
        mod_revision: i64,
        record: Box<AllocationRecord>,
    },
    /// Take the free `offset`.
    Take {
        offset: u128,
        ip: IpAddr,
        /// The runs the search crossed: adjacent ones are merged after the commit when they
        /// form a long chain.
        walked: Vec<ReadRun>,
        owner_rev: Option<i64>,
        pod_rev: Option<i64>,
    },
}

/// Free offsets after the first choice considered for alternatives.
const SPARE: usize = 32;

/// Chains of adjacent runs shorter than this (plus a random part) are left alone.
const COMPACT_AT: usize = 16;

/// Runs merged by one commit at most: keeps the transaction well under etcd's operation limit.
const MERGE_CAP: usize = 32;

/// Index entries found for one range: (revision, offset) of the owner and pod keys.
#[derive(Default, Clone, Copy)]
struct IndexHits {
    owner: Option<(i64, Option<u128>)>,
    pod: Option<(i64, Option<u128>)>,
}

pub fn add(s: &Session, backoff: &Backoff, req: &AddRequest) -> Result<Vec<IpAddr>, StoreError> {
    if req.node_slice_size.is_some() {
        return Err(StoreError::Config(
            "node_slice_size is not supported with datastore \"etcd\" yet".into(),
        ));
    }
    for (i, a) in req.ranges.iter().enumerate() {
        if req.ranges[..i].iter().any(|b| b.pool.name == a.pool.name) {
            return Err(StoreError::Config(format!(
                "two ranges of this configuration map to the same pool {}",
                a.pool.name
            )));
        }
    }
    let dl = Deadline::after(s.timeouts.deadline);
    let mut memory = Memory::new(req.ranges.len());
    let mut last = String::from("no attempt finished");
    for attempt in 0..backoff.attempts.max(1) {
        if attempt > 0 && memory.wait {
            // Failed calls (no leader, a member gone) back off exponentially so that an
            // election is waited out rather than hammered.
            let step = memory.conflicts.max(memory.failures).min(attempt);
            s.pause(&dl, backoff.delay(step));
        } else if attempt > 0 {
            // A light jitter even when spreading, so that retries do not arrive in lockstep.
            s.pause(&dl, backoff.delay(0));
        }
        if dl.passed() {
            break;
        }
        match attempt_add(s, req, &dl, &mut memory) {
            Ok(Some(ips)) => return Ok(ips),
            Ok(None) => last = "the pool changed while allocating (conflicting writer)".into(),
            Err(Stop::Final(e)) => return Err(e),
            Err(Stop::Retry(msg)) => {
                memory.call_failed();
                last = msg;
            }
        }
    }
    Err(StoreError::TryAgain(format!(
        "could not allocate from etcd within {:?}: {last}",
        s.timeouts.deadline
    )))
}

/// What one ADD learns across its attempts.
struct Memory {
    /// Addresses found reserved network-wide by another pool.
    reserved_elsewhere: HashSet<IpAddr>,
    /// Per range, where the next search starts: after losing an offset to a concurrent
    /// writer, a random distance past it, so that contenders stop colliding on one address.
    start_hint: Vec<Option<u128>>,
    /// Per range, the run window at `start_hint`, read by the failed commit itself.
    prefetched: Vec<Option<Window>>,
    /// The index entries as last read; valid after a cleanly failed compare, whose commit
    /// certainly did not apply (the next commit compares them again anyway).
    hits: Option<Vec<IndexHits>>,
    conflicts: u32,
    /// Calls that failed (transport errors, timeouts).
    failures: u32,
    /// Whether to back off before the next attempt.
    wait: bool,
}

impl Memory {
    fn new(ranges: usize) -> Memory {
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

    fn start(&self, i: usize, range: &Range) -> u128 {
        self.start_hint[i]
            .filter(|h| *h > range.first && *h <= range.last)
            .unwrap_or(range.first)
    }

    /// Where to search next if `offset` is lost: a random distance past it, the spread growing
    /// with repeated conflicts. A search that finds nothing from there starts over from the
    /// beginning of the range, so no free address is ever missed.
    fn next_hint(&self, offset: u128) -> Option<u128> {
        let spread = 8u128 << self.conflicts.min(5);
        offset.checked_add(1 + rand::rng().random_range(0..spread))
    }

    /// Forgets what a failed call may have made stale.
    fn call_failed(&mut self) {
        self.hits = None;
        self.prefetched.iter_mut().for_each(|w| *w = None);
        self.failures += 1;
        self.wait = true;
    }
}

/// One read-decide-commit round. `Ok(None)` when a compare failed.
fn attempt_add(
    s: &Session,
    req: &AddRequest,
    dl: &Deadline,
    memory: &mut Memory,
) -> Result<Option<Vec<IpAddr>>, Stop> {
    let who = &req.attachment;
    let (hits, mut windows) = first_read(s, req, dl, memory)?;
    let hits_for_memory = hits.clone();
    let held = read_held(s, req, &hits, dl)?;
    let mut plans = Vec::with_capacity(req.ranges.len());
    let mut chosen: Vec<IpAddr> = Vec::new();
    let mut spare: Vec<u128> = Vec::new();
    for (i, ((rr, hit), held)) in req.ranges.iter().zip(&hits).zip(held).enumerate() {
        let plan = match held {
            Some((offset, mod_revision, record)) => {
                if let Some(wanted) = rr.requested.filter(|w| *w != offset) {
                    return Err(Stop::Final(StoreError::InUse {
                        ip: rr.pool.range.ip(wanted),
                        range: rr.pool.range.to_string(),
                        holder: format!(
                            "this attachment, which already holds {} in that range",
                            record.ip
                        ),
                    }));
                }
                Plan::Keep {
                    offset,
                    ip: rr.pool.range.ip(offset),
                    mod_revision,
                    record: Box::new(record),
                }
            }
            None => match rr.requested {
                Some(offset) => plan_static(s, req, rr, *hit, offset, &chosen, dl)?,
                None => {
                    let window = windows[i].take().unwrap_or_default();
                    let start = memory.start(i, &rr.pool.range);
                    let taken =
                        |ip: &IpAddr| chosen.contains(ip) || memory.reserved_elsewhere.contains(ip);
                    let (plan, free_after) = plan_dynamic(s, rr, *hit, start, window, &taken, dl)?;
                    spare = free_after;
                    plan
                }
            },
        };
        chosen.push(match &plan {
            Plan::Keep { ip, .. } | Plan::Take { ip, .. } => *ip,
        });
        plans.push(plan);
    }
    if req.sleep_for_race > 0 {
        s.pause(dl, Duration::from_secs(req.sleep_for_race));
    }
    let (compares, ops) = build_commit(s, req, &plans);
    if ops.is_empty() {
        // Every range is already held by this attachment, unchanged: nothing to write.
        return Ok(Some(chosen));
    }
    let alternatives = alternatives(req, &plans, &spare);
    // On a failed compare, learn why without another round trip: which chosen offsets are now
    // held in their pool, which addresses are reserved through another pool; and read the run
    // window where the next search would start.
    let mut probes = Vec::new();
    let mut probe_gets = Vec::new();
    for (i, (rr, plan)) in req.ranges.iter().zip(&plans).enumerate() {
        if let Plan::Take { offset, ip, .. } = plan {
            let akey = s.keys.allocation(&rr.pool.name, *offset);
            probe_gets.push(key_get(&akey));
            probe_gets.push(key_get(&if req.overlap {
                s.keys.reservation(&req.network_name, *ip)
            } else {
                akey
            }));
            let hint = memory
                .next_hint(*offset)
                .filter(|h| *h <= rr.pool.range.last && rr.requested.is_none());
            if let Some(h) = hint {
                probe_gets.extend(window::gets(&s.keys, &rr.pool.name, h));
            }
            probes.push((i, *ip, hint));
        }
    }
    // The first choice, then, only if it was lost to a writer of the same pool (its record
    // now exists), each alternative in the failure branch of the one before: one round trip
    // tries them in order, and the cluster applies at most one. A first choice refused for
    // another reason (reserved through another range) falls through to the probes, so the
    // next attempt still takes the lowest free address.
    let mut inner: Option<Txn> = None;
    for alt in alternatives.iter().rev() {
        let (c, o) = build_commit(s, req, std::slice::from_ref(alt));
        let otherwise = match inner.take() {
            Some(t) => vec![TxnOp::txn(t)],
            None => probe_gets.clone(),
        };
        inner = Some(Txn::new().when(c).and_then(o).or_else(otherwise));
    }
    let otherwise = match (inner, plans.as_slice(), req.ranges.as_slice()) {
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
    };
    let txn = Txn::new().when(compares).and_then(ops).or_else(otherwise);
    let resp = s.txn(dl, "allocation commit", txn)?;
    let revision = resp.header().map_or(0, |h| h.revision());
    // Walk down the failure branches to the one that applied, or to the probes.
    let mut levels = vec![resp];
    if !alternatives.is_empty() && !levels[0].succeeded() {
        if let Some(TxnOpResponse::Txn(gate)) = levels[0].op_responses().into_iter().next() {
            let mut current = gate;
            if current.succeeded() {
                for _ in 0..alternatives.len() {
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
            } else {
                levels.push(current);
            }
        }
    }
    let winner = levels.iter().position(|r| r.succeeded());
    if let Some(level) = winner {
        if level > 0 {
            if let Some(Plan::Take { ip, .. }) = alternatives.get(level - 1) {
                chosen = vec![*ip];
            }
        }
        tracing::debug!(container = %who.container_id, ips = ?chosen, "etcd: allocated");
        for (rr, plan) in req.ranges.iter().zip(&plans) {
            if let Plan::Take { offset, walked, .. } = plan {
                let new_run = (level == 0).then_some(*offset);
                compact_chain(s, dl, &rr.pool.name, walked, new_run, revision);
            }
        }
        return Ok(Some(chosen));
    }
    let Some(resp) = levels.pop() else {
        return Ok(None);
    };
    let mut answers = resp.op_responses().into_iter().map(|r| match r {
        TxnOpResponse::Get(mut g) => g.take_kvs(),
        _ => Vec::new(),
    });
    memory.wait = false;
    memory.prefetched.iter_mut().for_each(|w| *w = None);
    memory.hits = Some(hits_for_memory);
    let mut lost_any = false;
    for (i, ip, hint) in probes {
        let held = !answers.next().unwrap_or_default().is_empty();
        let reserved = !answers.next().unwrap_or_default().is_empty();
        let window = hint.map(|h| {
            let floor = answers.next().unwrap_or_default();
            (
                h,
                Window::parse(h, floor, answers.next().unwrap_or_default()),
            )
        });
        if held {
            lost_any = true;
            memory.start_hint[i] = window.as_ref().map(|(h, _)| *h);
            memory.prefetched[i] = window.map(|(_, w)| w);
        } else if req.overlap && reserved {
            // Reserved through an overlapping range: not contention; search again at once.
            memory.reserved_elsewhere.insert(ip);
        } else {
            // A run or index entry changed under us: contention all the same.
            memory.wait = true;
        }
    }
    if lost_any {
        memory.conflicts += 1;
        memory.wait |= memory.conflicts > 2;
    }
    Ok(None)
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
    let who = &req.attachment;
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
    let mut gets = Vec::new();
    for rr in &req.ranges {
        gets.push(key_get(&s.keys.owner(
            &who.container_id,
            &who.ifname,
            &rr.pool.name,
        )));
        if let Some(pod) = &who.pod_ref {
            gets.push(key_get(&s.keys.pod(pod, &who.ifname, &rr.pool.name)));
        }
    }
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
    let mut hits = Vec::with_capacity(req.ranges.len());
    let hit = |kvs: Option<Vec<KeyValue>>| {
        kvs.and_then(|kvs| kvs.into_iter().next()).map(|kv| {
            let offset = std::str::from_utf8(kv.value()).ok().and_then(parse_hex);
            (kv.mod_revision(), offset)
        })
    };
    for _ in &req.ranges {
        let owner = hit(results.next());
        let pod = if who.pod_ref.is_some() {
            hit(results.next())
        } else {
            None
        };
        hits.push(IndexHits { owner, pod });
    }
    let windows = starts
        .into_iter()
        .map(|start| {
            start.map(|from| {
                let floor = results.next().unwrap_or_default();
                let ahead = results.next().unwrap_or_default();
                Window::parse(from, floor, ahead)
            })
        })
        .collect();
    Ok((hits, windows))
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

/// The lowest free offset of the range at or after `start` (or, failing that, from the
/// beginning), and what its commit must compare. Reservations through overlapping ranges are
/// checked by the commit itself: it requires the reservation key to be absent.
fn plan_dynamic(
    s: &Session,
    rr: &RangeRequest,
    hit: IndexHits,
    start: u128,
    mut window: Window,
    taken: &dyn Fn(&IpAddr) -> bool,
    dl: &Deadline,
) -> Result<(Plan, Vec<u128>), Stop> {
    let range = &rr.pool.range;
    let pool = &rr.pool.name;
    let mut from = range.clone();
    from.first = start;
    let mut walked: Vec<ReadRun> = Vec::new();
    let mut search = |r: &Range, window: &mut Window| {
        let mut found = None;
        r.lowest_free(|candidate| {
            if taken(&range.ip(candidate)) {
                return Ok(Some(candidate));
            }
            if !window.knows(candidate) {
                let mut res = s
                    .reads(dl, "pool read", window::gets(&s.keys, pool, candidate))?
                    .into_iter();
                let floor = res.next().unwrap_or_default();
                *window = Window::parse(candidate, floor, res.next().unwrap_or_default());
            }
            if let Some(r) = window.covering(candidate) {
                walked.push(r);
                return Ok(Some(r.run.end));
            }
            found = Some(candidate);
            Ok::<_, CallFailed>(None)
        })?;
        Ok::<_, CallFailed>(found)
    };
    let mut found = search(&from, &mut window)?;
    if found.is_none() && start > range.first {
        found = search(range, &mut window)?;
    }
    let Some(offset) = found else {
        return Err(Stop::Final(StoreError::Exhausted {
            range: range.to_string(),
        }));
    };
    let free_after = free_after(range, &window, offset, taken, SPARE);
    let plan = Plan::Take {
        offset,
        ip: range.ip(offset),
        walked,
        owner_rev: hit.owner.map(|(rev, _)| rev),
        pod_rev: hit.pod.map(|(rev, _)| rev),
    };
    Ok((plan, free_after))
}

/// Up to `max` offsets after `offset` that the window shows free (no reads): candidates for
/// the alternatives of a contended commit.
fn free_after(
    range: &Range,
    window: &Window,
    offset: u128,
    taken: &dyn Fn(&IpAddr) -> bool,
    max: usize,
) -> Vec<u128> {
    let mut out = Vec::new();
    let mut from = range.clone();
    let mut next = offset.checked_add(1);
    while let Some(first) = next.filter(|n| *n <= range.last && out.len() < max) {
        from.first = first;
        let found = from.lowest_free(|c| {
            if taken(&range.ip(c)) {
                return Ok(Some(c));
            }
            if !window.knows(c) {
                return Err(());
            }
            Ok(window.covering(c).map(|r| r.run.end))
        });
        match found {
            Ok(Some(c)) => {
                out.push(c);
                next = c.checked_add(1);
            }
            _ => break,
        }
    }
    out
}

/// For a request with one dynamic range: alternative offsets to try in the same commit if the
/// first choice is lost to a concurrent writer, one close after it and one further on, picked
/// at random so that the losers of a race spread out instead of colliding again.
fn alternatives(req: &AddRequest, plans: &[Plan], spare: &[u128]) -> Vec<Plan> {
    let (
        [rr],
        [Plan::Take {
            owner_rev, pod_rev, ..
        }],
    ) = (req.ranges.as_slice(), plans)
    else {
        return Vec::new();
    };
    if rr.requested.is_some() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (lo, hi) in [(0, SPARE / 4), (SPARE / 4, SPARE)] {
        let hi = hi.min(spare.len());
        if lo < hi {
            let offset = spare[rand::rng().random_range(lo..hi)];
            out.push(Plan::Take {
                offset,
                ip: rr.pool.range.ip(offset),
                walked: Vec::new(),
                owner_rev: *owner_rev,
                pod_rev: *pod_rev,
            });
        }
    }
    out
}

/// Merges chains of adjacent runs the search crossed, the new run `[offset, offset]`
/// (committed at `revision`) included, when they have grown long. Best effort: the allocation is already committed, a
/// failed or conflicting merge leaves a valid partition and the next search tries again.
fn compact_chain(
    s: &Session,
    dl: &Deadline,
    pool: &str,
    walked: &[ReadRun],
    new_run: Option<u128>,
    revision: i64,
) {
    // A threshold that differs between writers, so that they rarely all merge the same chain.
    let threshold = COMPACT_AT + rand::rng().random_range(0..COMPACT_AT);
    let mut runs = walked.to_vec();
    if let Some(offset) = new_run {
        runs.push(ReadRun {
            run: Run {
                start: offset,
                end: offset,
            },
            mod_revision: revision,
        });
    }
    for chain in runs::chains(&runs, MERGE_CAP) {
        if chain.len() < threshold {
            continue;
        }
        let mut compares: Vec<Compare> = chain
            .iter()
            .map(|r| unchanged(&s.keys.run(pool, r.run.start), Some(r.mod_revision)))
            .collect();
        let mut ops = Vec::new();
        let plain: Vec<Run> = chain.iter().map(|r| r.run).collect();
        push_run_change(
            &s.keys,
            pool,
            runs::compact(&plain),
            &mut compares,
            &mut ops,
        );
        if let Err(e) = s.txn(dl, "run merge", Txn::new().when(compares).and_then(ops)) {
            tracing::debug!("etcd: merging runs of {pool} failed (harmless): {}", e.0);
        }
    }
}

/// A static address asked for: take it unless someone else holds it.
fn plan_static(
    s: &Session,
    req: &AddRequest,
    rr: &RangeRequest,
    hit: IndexHits,
    offset: u128,
    chosen: &[IpAddr],
    dl: &Deadline,
) -> Result<Plan, Stop> {
    let range = &rr.pool.range;
    let pool = &rr.pool.name;
    let ip = range.ip(offset);
    let in_use = |holder: String| {
        Stop::Final(StoreError::InUse {
            ip,
            range: range.to_string(),
            holder,
        })
    };
    if chosen.contains(&ip) {
        return Err(in_use("another range of this attachment".into()));
    }
    let mut gets = vec![
        key_get(&s.keys.allocation(pool, offset)),
        floor_get(&s.keys.runs_dir(pool), &s.keys.run(pool, offset)),
    ];
    if req.overlap {
        gets.push(key_get(&s.keys.reservation(&req.network_name, ip)));
    }
    let mut res = s.reads(dl, "pool read", gets)?.into_iter();
    if let Some(kv) = res.next().and_then(|kvs| kvs.into_iter().next()) {
        let holder = AllocationRecord::from_json(kv.value())
            .map(|r| describe(&r.attachment()))
            .unwrap_or_else(|| "an unreadable record".into());
        return Err(in_use(holder));
    }
    let floor = first_run(res.next());
    if floor.is_some_and(|f| f.run.end >= offset) {
        return Err(Stop::Final(StoreError::Io(format!(
            "pool {pool} in etcd is inconsistent: offset {offset} is in a run but has no record"
        ))));
    }
    if req.overlap {
        if let Some(kv) = res.next().and_then(|kvs| kvs.into_iter().next()) {
            let holder = ReservationRecord::from_json(kv.value())
                .map(|r| r.holder())
                .unwrap_or_else(|| "an unreadable reservation".into());
            return Err(in_use(holder));
        }
    }
    Ok(Plan::Take {
        offset,
        ip,
        walked: Vec::new(),
        owner_rev: hit.owner.map(|(rev, _)| rev),
        pod_rev: hit.pod.map(|(rev, _)| rev),
    })
}

fn describe(a: &Attachment) -> String {
    match &a.pod_ref {
        Some(pod) => format!("pod {pod} (container {}, {})", a.container_id, a.ifname),
        None => format!("container {} ({})", a.container_id, a.ifname),
    }
}

fn first_run(kvs: Option<Vec<KeyValue>>) -> Option<ReadRun> {
    kvs.and_then(|kvs| kvs.into_iter().next())
        .and_then(|kv| ReadRun::from_kv(&kv))
}

/// A compare that `key` is still as read: absent (`None`) or at revision `rev`.
fn unchanged(key: &str, rev: Option<i64>) -> Compare {
    match rev {
        Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    }
}

/// The compares and writes that commit every plan at once.
fn build_commit(s: &Session, req: &AddRequest, plans: &[Plan]) -> (Vec<Compare>, Vec<TxnOp>) {
    let who = &req.attachment;
    let keys = &s.keys;
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for (rr, plan) in req.ranges.iter().zip(plans) {
        let pool = &rr.pool.name;
        match plan {
            Plan::Keep {
                offset,
                mod_revision,
                record,
                ..
            } => {
                let akey = keys.allocation(pool, *offset);
                compares.push(Compare::mod_revision(
                    akey.clone(),
                    CompareOp::Equal,
                    *mod_revision,
                ));
                let updated = AllocationRecord {
                    container_id: who.container_id.clone(),
                    pod_uid: who.pod_uid.clone().or_else(|| record.pod_uid.clone()),
                    pod_ref: who.pod_ref.clone().or_else(|| record.pod_ref.clone()),
                    ..(**record).clone()
                };
                if updated == **record {
                    continue;
                }
                ops.push(TxnOp::put(akey, updated.to_json(), None));
                if record.container_id != who.container_id {
                    ops.push(TxnOp::delete(
                        keys.owner(&record.container_id, &record.ifname, pool),
                        None,
                    ));
                    ops.push(TxnOp::put(
                        keys.owner(&who.container_id, &who.ifname, pool),
                        hex(*offset),
                        None,
                    ));
                }
                if let (Some(pod), None) = (&who.pod_ref, &record.pod_ref) {
                    ops.push(TxnOp::put(
                        keys.pod(pod, &who.ifname, pool),
                        hex(*offset),
                        None,
                    ));
                }
                if record.reserved {
                    let reservation = ReservationRecord {
                        pool: pool.clone(),
                        container_id: who.container_id.clone(),
                        ifname: who.ifname.clone(),
                        pod_ref: updated.pod_ref.clone(),
                    };
                    ops.push(TxnOp::put(
                        keys.reservation(&record.network_name, record.ip),
                        reservation.to_json(),
                        None,
                    ));
                }
            }
            Plan::Take {
                offset,
                ip,
                owner_rev,
                pod_rev,
                ..
            } => {
                let akey = keys.allocation(pool, *offset);
                compares.push(unchanged(&akey, None));
                let record = AllocationRecord {
                    ip: *ip,
                    range: rr.pool.cidr().to_string(),
                    container_id: who.container_id.clone(),
                    ifname: who.ifname.clone(),
                    pod_ref: who.pod_ref.clone(),
                    pod_uid: who.pod_uid.clone(),
                    cni_network: req.cni_network.clone(),
                    network_name: req.network_name.clone(),
                    reserved: req.overlap,
                };
                ops.push(TxnOp::put(akey, record.to_json(), None));
                let owner_key = keys.owner(&who.container_id, &who.ifname, pool);
                compares.push(unchanged(&owner_key, *owner_rev));
                ops.push(TxnOp::put(owner_key, hex(*offset), None));
                if let Some(pod) = &who.pod_ref {
                    let pod_key = keys.pod(pod, &who.ifname, pool);
                    compares.push(unchanged(&pod_key, *pod_rev));
                    ops.push(TxnOp::put(pod_key, hex(*offset), None));
                }
                if req.overlap {
                    let rkey = keys.reservation(&req.network_name, *ip);
                    compares.push(unchanged(&rkey, None));
                    let reservation = ReservationRecord {
                        pool: pool.clone(),
                        container_id: who.container_id.clone(),
                        ifname: who.ifname.clone(),
                        pod_ref: who.pod_ref.clone(),
                    };
                    ops.push(TxnOp::put(rkey, reservation.to_json(), None));
                }
                let change = runs::take(*offset);
                push_run_change(keys, pool, change, &mut compares, &mut ops);
            }
        }
    }
    (compares, ops)
}

/// Adds the writes of a run change, with a must-not-exist compare for every new run key.
pub fn push_run_change(
    keys: &super::keys::Keys,
    pool: &str,
    change: runs::RunChange,
    compares: &mut Vec<Compare>,
    ops: &mut Vec<TxnOp>,
) {
    for start in change.deletes {
        ops.push(TxnOp::delete(keys.run(pool, start), None));
    }
    for (Run { start, end }, fresh) in change.puts {
        let key = keys.run(pool, start);
        if fresh {
            compares.push(unchanged(&key, None));
        }
        ops.push(TxnOp::put(key, hex(end), None));
    }
}
