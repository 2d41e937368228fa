//! Releasing allocations (DEL, GC, the CLI's release) and reading them (CHECK, allocations). Each
//! release is one transaction: the record, its index entries and its reservation go together,
//! guarded by the revisions that were read, and the run is cut in a nested transaction of its
//! own, or the address marked freed when the run changed since it was read (`freed`).

use std::collections::HashMap;
use std::net::IpAddr;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use super::freed::{after_release, cut_or_mark, run_answer};
use super::keys::{parse_hex, range_end, Keys, Parsed};
use super::plan::Stop;
use super::records::{AllocationRecord, ReservationRecord};
use super::runs::ReadRun;
use super::session::{floor_get, key_get, revision_of, CallFailed, Deadline, Session, MAX_TXN_OPS};
use crate::store::retry::Backoff;
use crate::store::{Allocation, Attachment, AttachmentRequest, GcRequest, Hints, StoreError};

/// Releases `offset` of `pool` if its record satisfies `belongs`, starting from what is
/// `known`; the released allocation, or `None` when there was nothing (left) to release.
/// Retried while the pool changes under the commit.
fn release_one(
    s: &Session,
    backoff: &Backoff,
    dl: &Deadline,
    (pool, offset): (&str, u128),
    belongs: &dyn Fn(&AllocationRecord) -> bool,
    mut known: Known,
) -> Result<Option<Allocation>, StoreError> {
    let mut last = CallFailed::new("no attempt finished");
    for attempt in 0..backoff.attempts.max(1) {
        if attempt > 0 {
            s.pause(dl, backoff.delay(attempt));
        }
        if dl.passed() {
            break;
        }
        match try_release(s, dl, (pool, offset), belongs, &mut known) {
            Ok(Attempt::Done(released)) => return Ok(released),
            Ok(Attempt::Changed) => {
                last = CallFailed::new("the pool changed while releasing (conflicting writer)")
            }
            Err(Stop::Final(err)) => return Err(err),
            Err(Stop::Retry(failed)) => last = failed,
        }
    }
    let what = format!("could not release {pool} offset {offset} in etcd");
    Err(StoreError::try_again(last.answered(&what)).because(last))
}

/// How one release attempt ended. Only ever returned, never stored: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    /// Released (`Some`), or nothing there to release (`None`).
    Done(Option<Allocation>),
    /// A compared revision moved: read again.
    Changed,
}

/// What a release starts from.
enum Known {
    /// Read already, at one revision: by a DEL's first read, or by the failure branch of a
    /// commit that lost.
    Read(ReleaseRead),
    /// Nothing yet. These keys likely point at the record (from the caller's hints or a
    /// scan): they are read with it, and when they are the record's own the release needs
    /// no second read.
    Likely(Vec<String>),
}

/// What one read found of a release: the record, the run at or before the offset, and
/// some keys that may point at the record (`side`, each with its answer).
pub(super) struct ReleaseRead {
    record: Option<KeyValue>,
    floor: Option<KeyValue>,
    side: Vec<(String, Vec<KeyValue>)>,
}

/// The gets of what a release reads: the record of `offset`, the run at or before it, and
/// the keys `side`; [`ReleaseRead::of`] reads their answers.
pub(super) fn release_gets(keys: &Keys, pool: &str, offset: u128, side: &[String]) -> Vec<TxnOp> {
    let mut gets = vec![
        key_get(&keys.allocation(pool, offset)),
        floor_get(&keys.runs_dir(pool), &keys.run(pool, offset)),
    ];
    gets.extend(side.iter().map(|k| key_get(k)));
    gets
}

impl ReleaseRead {
    /// The answers to [`release_gets`] with the same `side` keys; `None` unless there is one
    /// answer per get: a missing record must never read as a released one.
    pub(super) fn of(mut answers: Vec<Vec<KeyValue>>, side: Vec<String>) -> Option<ReleaseRead> {
        if answers.len() != 2 + side.len() {
            return None;
        }
        let side = side.into_iter().zip(answers.split_off(2)).collect();
        let mut first = answers.into_iter().map(|kvs| kvs.into_iter().next());
        Some(ReleaseRead {
            record: first.next().flatten(),
            floor: first.next().flatten(),
            side,
        })
    }

    /// The answers for the keys `wanted`, when every one of them was read.
    fn side_of(&self, wanted: &[String]) -> Option<Vec<Vec<KeyValue>>> {
        let answer = |key: &String| self.side.iter().find(|(k, _)| k == key);
        wanted
            .iter()
            .map(|key| answer(key).map(|(_, kvs)| kvs.clone()))
            .collect()
    }
}

/// The answers of a transaction branch made of gets only; `None` if it holds anything else.
fn gets_answered(resp: TxnResponse) -> Option<Vec<Vec<KeyValue>>> {
    resp.op_responses().into_iter().map(got).collect()
}

/// What a get found; `None` for the answer of anything else.
fn got(answer: TxnOpResponse) -> Option<Vec<KeyValue>> {
    match answer {
        TxnOpResponse::Get(mut get) => Some(get.take_kvs()),
        _ => None,
    }
}

/// One allocation as read, that is its caller's to release.
pub(super) struct Releasable {
    pub record: AllocationRecord,
    pub revision: i64,
    /// The run covering the offset, as read.
    pub run: Option<ReadRun>,
}

impl ReleaseRead {
    /// The allocation read, when it is there and `belongs`.
    pub(super) fn releasable(
        &self,
        keys: &Keys,
        (pool, offset): (&str, u128),
        belongs: &dyn Fn(&AllocationRecord) -> bool,
    ) -> Result<Option<Releasable>, StoreError> {
        let Some(kv) = &self.record else {
            return Ok(None);
        };
        // Broken, not failed: every attempt would read the same, and a DEL that fails for
        // ever holds its pod's teardown. The record stays, so its address is never handed out
        // again; the doctor reports it.
        let record = AllocationRecord::parse(kv.value()).map_err(|err| {
            StoreError::broken(format!(
                "unreadable allocation record at etcd key {}",
                keys.allocation(pool, offset)
            ))
            .because(err)
        })?;
        if !belongs(&record) {
            return Ok(None);
        }
        let run = self
            .floor
            .as_ref()
            .and_then(ReadRun::from_kv)
            .filter(|r| r.run.start <= offset && offset <= r.run.end);
        Ok(Some(Releasable {
            record,
            revision: kv.mod_revision(),
            run,
        }))
    }

    /// The keys `wanted` that point at `record`, with their revisions, when this read took
    /// every one of them.
    pub(super) fn side_read(
        &self,
        wanted: &SideKeys,
        (pool, offset): (&str, u128),
        record: &AllocationRecord,
    ) -> Option<Vec<(String, i64)>> {
        let answers = self.side_of(&wanted.keys)?;
        Some(wanted.ours(answers, pool, offset, record))
    }
}

/// One read of the record and what points at it (or what was read before), and one
/// transaction that deletes them all if none of them changed; if one did, the transaction
/// reads them back for the next attempt.
fn try_release(
    s: &Session,
    dl: &Deadline,
    (pool, offset): (&str, u128),
    belongs: &dyn Fn(&AllocationRecord) -> bool,
    known: &mut Known,
) -> Result<Attempt, Stop> {
    let keys = &s.keys;
    let read = match std::mem::replace(known, Known::Likely(Vec::new())) {
        Known::Read(read) => read,
        Known::Likely(likely) => {
            let gets = release_gets(keys, pool, offset, &likely);
            // What the next attempt starts from, should this read fail.
            *known = Known::Likely(likely.clone());
            let answers = s.reads(dl, "release read", gets)?;
            ReleaseRead::of(answers, likely)
                .ok_or_else(|| CallFailed::new("etcd answered fewer reads than asked"))?
        }
    };
    let Some(held) = read
        .releasable(keys, (pool, offset), belongs)
        .map_err(Stop::Final)?
    else {
        return Ok(Attempt::Done(None));
    };
    let wanted = side_keys(keys, pool, &held.record);
    // What the next attempt starts from, should this one fail before its commit answers.
    *known = Known::Likely(wanted.keys.clone());
    let side = match read.side_read(&wanted, (pool, offset), &held.record) {
        Some(side) => side,
        None => {
            let answers = s.reads(dl, "release read", wanted.gets())?;
            wanted.ours(answers, pool, offset, &held.record)
        }
    };
    let (compares, ops) = release_alone(keys, (pool, offset), held.revision, &side, held.run);
    let read_back = release_gets(keys, pool, offset, &wanted.keys);
    let txn = Txn::new().when(compares).and_then(ops).or_else(read_back);
    let resp = s.txn(dl, "release commit", txn)?;
    if !resp.succeeded() {
        let again = wanted.keys;
        *known = match gets_answered(resp).and_then(|a| ReleaseRead::of(a, again.clone())) {
            Some(read) => Known::Read(read),
            None => Known::Likely(again),
        };
        return Ok(Attempt::Changed);
    }
    let revision = revision_of(&resp);
    // The run's nested commit comes last (`release_alone`).
    let run_answer = held
        .run
        .and_then(|_| resp.op_responses().pop())
        .and_then(run_answer);
    if let Some(answer) = run_answer {
        after_release(s, dl, pool, answer, revision);
    }
    Ok(Attempt::Done(held.record.allocation(pool)))
}

/// The compares and writes of one release: the record of `offset` (at `revision`), the keys
/// `side` that point at it, and last its offset out of `run`, the run covering it (cut or
/// marked freed, [`cut_or_mark`]).
fn release_alone(
    keys: &Keys,
    (pool, offset): (&str, u128),
    revision: i64,
    side: &[(String, i64)],
    run: Option<ReadRun>,
) -> (Vec<Compare>, Vec<TxnOp>) {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    push_release(
        keys,
        (pool, offset),
        revision,
        side,
        &mut compares,
        &mut ops,
    );
    match run {
        Some(read) => ops.push(cut_or_mark(keys, pool, &[offset], read)),
        None => tracing::warn!(
            pool,
            offset,
            "etcd: no run covers a held offset; releasing the record alone"
        ),
    }
    (compares, ops)
}

/// The compares and deletes that release the record of `offset` (at `revision`) and the index
/// entries and reservation `side` (as [`side_keys`] found them).
pub(super) fn push_release(
    keys: &Keys,
    (pool, offset): (&str, u128),
    revision: i64,
    side: &[(String, i64)],
    compares: &mut Vec<Compare>,
    ops: &mut Vec<TxnOp>,
) {
    let akey = keys.allocation(pool, offset);
    compares.push(Compare::mod_revision(
        akey.clone(),
        CompareOp::Equal,
        revision,
    ));
    ops.push(TxnOp::delete(akey, None));
    for (key, rev) in side {
        compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, *rev));
        ops.push(TxnOp::delete(key.clone(), None));
    }
}

/// The keys that may point at an allocation: its owner and pod index entries and its
/// reservation.
pub(super) struct SideKeys {
    keys: Vec<String>,
    /// How many of `keys` are index entries (the rest is the reservation).
    index_count: usize,
}

pub(super) fn side_keys(keys: &Keys, pool: &str, record: &AllocationRecord) -> SideKeys {
    let reservation = record
        .reserved
        .then_some((record.network_name.as_str(), record.ip));
    let who = Holder {
        attachment: (&record.container_id, &record.ifname),
        pod_ref: record.pod_ref.as_deref(),
        reservation,
    };
    who.side_keys(keys, pool)
}

/// What the keys pointing at an allocation are made of: its attachment (container ID and
/// interface), its pod, and the network name and address of its reservation.
struct Holder<'a> {
    attachment: (&'a str, &'a str),
    pod_ref: Option<&'a str>,
    reservation: Option<(&'a str, IpAddr)>,
}

impl Holder<'_> {
    /// Its owner and pod index entries in `pool`, then its reservation.
    fn side_keys(&self, keys: &Keys, pool: &str) -> SideKeys {
        let (container_id, ifname) = self.attachment;
        let mut wanted = vec![keys.owner(container_id, ifname, pool)];
        if let Some(pod) = self.pod_ref {
            wanted.push(keys.pod(pod, ifname, pool));
        }
        let index_count = wanted.len();
        if let Some((network_name, ip)) = self.reservation {
            wanted.push(keys.reservation(network_name, ip));
        }
        SideKeys {
            keys: wanted,
            index_count,
        }
    }
}

impl SideKeys {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn gets(&self) -> Vec<TxnOp> {
        self.keys.iter().map(|k| key_get(k)).collect()
    }

    /// Those of the keys, as read (`res`, one answer per get), that point at this allocation,
    /// with their revisions. Entries that now point elsewhere (a newer allocation of the same
    /// owner) are left alone.
    pub fn ours(
        &self,
        res: impl IntoIterator<Item = Vec<KeyValue>>,
        pool: &str,
        offset: u128,
        record: &AllocationRecord,
    ) -> Vec<(String, i64)> {
        let mut side = Vec::new();
        for (i, (key, kvs)) in self.keys.iter().zip(res).enumerate() {
            let Some(kv) = kvs.into_iter().next() else {
                continue;
            };
            let ours = if i < self.index_count {
                std::str::from_utf8(kv.value()).ok().and_then(parse_hex) == Some(offset)
            } else {
                ReservationRecord::from_json(kv.value()).is_some_and(|r| r.is_for(pool, record))
            };
            if ours {
                side.push((key.clone(), kv.mod_revision()));
            }
        }
        side
    }
}

/// The offsets the attachment holds, from the owner index: in every pool with `any_pool`
/// (DEL: a range removed from the configuration since the ADD must not leak), otherwise in the
/// request's pools.
fn owned(
    s: &Session,
    dl: &Deadline,
    req: &AttachmentRequest,
    any_pool: bool,
) -> Result<Vec<(String, u128)>, StoreError> {
    let dir = s.keys.owner_dir(&req.container_id, &req.ifname);
    let mut found = Vec::new();
    s.scan(dl, &dir, |kv| {
        if let Some((pool, offset)) = owner_entry(&s.keys, &kv) {
            if any_pool || req.pools.iter().any(|p| p.name == pool) {
                found.push((pool, offset));
            }
        }
    })?;
    Ok(found)
}

/// The pool and offset of an owner index entry (its key names the pool, its value the offset).
fn owner_entry(keys: &Keys, kv: &KeyValue) -> Option<(String, u128)> {
    let key = std::str::from_utf8(kv.key()).ok()?;
    let Some(Parsed::Owner { pool, .. }) = keys.parse(key) else {
        return None;
    };
    let offset = std::str::from_utf8(kv.value()).ok().and_then(parse_hex)?;
    Some((pool, offset))
}

pub fn del(
    s: &Session,
    backoff: &Backoff,
    req: &AttachmentRequest,
) -> Result<Vec<Allocation>, StoreError> {
    del_by(s, backoff, req, &Deadline::after(s.timeouts.deadline))
}

/// [`del`], finished by the deadline `dl` (the agent's batch shares its own).
pub(super) fn del_by(
    s: &Session,
    backoff: &Backoff,
    req: &AttachmentRequest,
    dl: &Deadline,
) -> Result<Vec<Allocation>, StoreError> {
    // The owner entries take one get of the transaction.
    let named = Named::of(&s.keys, req, MAX_TXN_OPS - 1);
    let gets = first_gets(&s.keys, req, &named);
    let resp = s.txn(dl, "release read", Txn::new().and_then(gets))?;
    let (owned_page, mut read) =
        first_answers(&s.keys, &mut resp.op_responses().into_iter(), named);
    let held = match owned_page {
        Some(held) => held,
        None => owned(s, dl, req, true)?,
    };
    let mut released = Vec::new();
    let mut broken = None;
    for (pool, offset) in held {
        let known = match read.remove(&(pool.clone(), offset)) {
            Some(read) => Known::Read(read),
            None => Known::Likely(likely_side_keys(&s.keys, req, &pool, offset)),
        };
        let at = (pool.as_str(), offset);
        match release_one(s, backoff, dl, at, &owned_by(req), known) {
            Ok(allocation) => released.extend(allocation),
            // The attachment's other pools are released all the same; the DEL then says so.
            Err(err @ StoreError::Broken { .. }) => {
                tracing::error!(err = %err.describe(), "an allocation of the attachment cannot be released");
                broken.get_or_insert(err);
            }
            Err(err) => return Err(err),
        }
    }
    match broken {
        Some(err) => Err(err),
        None => Ok(released),
    }
}

/// Owner index entries a DEL's first read takes at most: one per pool it holds. A DEL holding
/// more pages through them.
const POOLS_PER_DEL: i64 = 64;

/// An allocation the caller of a DEL named (`hints.ips`) in one of the request's pools, with
/// the keys likely to point at it.
pub(super) struct Named {
    pool: String,
    offset: u128,
    likely: Vec<String>,
}

impl Named {
    /// The allocations the caller of `req` named, in its pools, each once, as many as
    /// `budget` gets read: a configuration of many ranges over one network must not make the
    /// first read bigger than a transaction may be.
    pub(super) fn of(keys: &Keys, req: &AttachmentRequest, mut budget: usize) -> Vec<Named> {
        let mut named: Vec<Named> = Vec::new();
        for ip in req.hints.ips.iter().take(Hints::MAX_IPS) {
            for pool in &req.pools {
                let Some(offset) = pool.range.cidr.offset_of(*ip) else {
                    continue;
                };
                if named
                    .iter()
                    .any(|n| n.pool == pool.name && n.offset == offset)
                {
                    continue;
                }
                let likely = likely_side_keys(keys, req, &pool.name, offset);
                let n = Named {
                    pool: pool.name.clone(),
                    offset,
                    likely,
                };
                match budget.checked_sub(n.gets()) {
                    Some(left) => budget = left,
                    None => return named,
                }
                named.push(n);
            }
        }
        named
    }

    /// How many gets [`first_gets`] spends on it.
    pub(super) fn gets(&self) -> usize {
        2 + self.likely.len()
    }
}

/// The gets of a DEL's first read, in one transaction: a page of the attachment's owner index
/// entries, then what a release reads of each allocation `named`.
pub(super) fn first_gets(keys: &Keys, req: &AttachmentRequest, named: &[Named]) -> Vec<TxnOp> {
    let dir = keys.owner_dir(&req.container_id, &req.ifname);
    let options = GetOptions::new()
        .with_range(range_end(&dir))
        .with_limit(POOLS_PER_DEL);
    let mut gets = vec![TxnOp::get(dir, Some(options))];
    for n in named {
        gets.extend(release_gets(keys, &n.pool, n.offset, &n.likely));
    }
    gets
}

/// The answers of [`first_gets`], taken from `answers`: the owner index entries (`None` when
/// they fill more than a page), and what was read of each allocation `named`, by pool and
/// offset.
pub(super) fn first_answers(
    keys: &Keys,
    answers: &mut impl Iterator<Item = TxnOpResponse>,
    named: Vec<Named>,
) -> (Option<PoolsHeld>, HashMap<(String, u128), ReleaseRead>) {
    let owned = match answers.next() {
        Some(TxnOpResponse::Get(page)) if !page.more() => Some(
            page.kvs()
                .iter()
                .filter_map(|kv| owner_entry(keys, kv))
                .collect(),
        ),
        _ => None,
    };
    let mut read = HashMap::new();
    for n in named {
        // Every answer of this allocation is taken, even after one that is not a get's.
        let got: Vec<Option<Vec<KeyValue>>> = answers.by_ref().take(n.gets()).map(got).collect();
        let got: Option<Vec<Vec<KeyValue>>> = got.into_iter().collect();
        if let Some(found) = got.and_then(|got| ReleaseRead::of(got, n.likely)) {
            read.insert((n.pool, n.offset), found);
        }
    }
    (owned, read)
}

/// The pools an attachment holds an address in, with the offset.
pub(super) type PoolsHeld = Vec<(String, u128)>;

/// The keys likely to point at the allocation of `offset` in `pool` that `req` holds, as far
/// as the request tells: its owner entry, its pod entry when the caller named the pod, and
/// its reservation when the pool is one of the request's (its address known then).
pub(super) fn likely_side_keys(
    keys: &Keys,
    req: &AttachmentRequest,
    pool: &str,
    offset: u128,
) -> Vec<String> {
    let configured = req.pools.iter().find(|p| p.name == pool);
    let who = Holder {
        attachment: (&req.container_id, &req.ifname),
        pod_ref: req.hints.pod_ref.as_deref(),
        reservation: configured.map(|p| (req.network_name.as_str(), p.range.ip(offset))),
    };
    who.side_keys(keys, pool).keys
}

/// Whether a record is the DEL's to release: the same container and interface.
pub(super) fn owned_by(req: &AttachmentRequest) -> impl Fn(&AllocationRecord) -> bool + '_ {
    |r: &AllocationRecord| r.is_of(&req.container_id, &req.ifname)
}

pub fn check(s: &Session, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
    let dl = Deadline::after(s.timeouts.deadline);
    let owned = owned(s, &dl, req, false)?;
    let gets = owned
        .iter()
        .map(|(pool, offset)| key_get(&s.keys.allocation(pool, *offset)))
        .collect();
    let res = s.reads(&dl, "check read", gets)?;
    let mut allocations = Vec::new();
    for ((pool, _), kvs) in owned.iter().zip(res) {
        let record = kvs
            .into_iter()
            .next()
            .and_then(|kv| AllocationRecord::from_json(kv.value()));
        if let Some(r) =
            record.filter(|r| r.container_id == req.container_id && r.ifname == req.ifname)
        {
            allocations.extend(r.allocation(pool));
        }
    }
    Ok(allocations)
}

/// Releases this node's allocations of the CNI network that are not valid. The valid list is
/// this node's runtime's: an allocation of another node (or of an unknown node) is never
/// touched, and a GC from a node whose name is unknown releases nothing.
pub fn gc(s: &Session, backoff: &Backoff, req: &GcRequest) -> Result<Vec<Allocation>, StoreError> {
    let dl = Deadline::after(s.timeouts.deadline);
    let Some(node) = req.node.as_deref() else {
        tracing::warn!("GC releases nothing: this node's name is unknown (set NODENAME)");
        return Ok(Vec::new());
    };
    let valid = |r: &AllocationRecord| {
        r.node.as_deref() != Some(node)
            || req
                .valid
                .iter()
                .any(|(c, i)| *c == r.container_id && *i == r.ifname)
    };
    let mut released = Vec::new();
    for pool in &req.pools {
        let mut stale = Vec::new();
        s.scan(&dl, &s.keys.allocations_dir(&pool.name), |kv| {
            if let Some((offset, record)) = parse_allocation(&kv) {
                if record.cni_network == req.cni_network && !valid(&record) {
                    stale.push((offset, record));
                }
            }
        })?;
        for (offset, record) in stale {
            // Only the same attachment, and only while it is still not valid.
            let belongs = |r: &AllocationRecord| {
                r.container_id == record.container_id && r.ifname == record.ifname && !valid(r)
            };
            let known = Known::Likely(side_keys(&s.keys, &pool.name, &record).keys);
            let at = (pool.name.as_str(), offset);
            if let Some(allocation) = release_one(s, backoff, &dl, at, &belongs, known)? {
                released.push(allocation);
            }
        }
    }
    Ok(released)
}

pub fn allocations(s: &Session, pool: Option<&str>) -> Result<Vec<Allocation>, StoreError> {
    let dl = Deadline::after(s.timeouts.deadline);
    let dir = match pool {
        Some(p) => s.keys.allocations_dir(p),
        None => s.keys.pools_dir(),
    };
    let mut out = Vec::new();
    s.scan(&dl, &dir, |kv| {
        // Run keys share the pools directory.
        let pool = match std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| s.keys.parse(k))
        {
            Some(Parsed::Record { pool, .. }) => pool,
            _ => return,
        };
        if let Some(record) = AllocationRecord::from_json(kv.value()) {
            out.extend(record.allocation(&pool));
        }
    })?;
    Ok(out)
}

/// The offset of `ip` within the prefix of length `prefix` that holds it.
fn offset_within_own_prefix(ip: IpAddr, prefix: u8) -> Option<u128> {
    crate::ipam::Cidr::new(ip, prefix)?.network().offset_of(ip)
}

pub fn release(
    s: &Session,
    backoff: &Backoff,
    (pool, ip): (&str, IpAddr),
    holder: Option<&Attachment>,
) -> Result<Option<Allocation>, StoreError> {
    let dl = Deadline::after(s.timeouts.deadline);
    // Any record of the pool names its range's prefix length, which turns the address into an
    // offset. Two networks' ranges may share a pool (their pool names coincide: `a` with
    // `2001:db8::/64` and `a-2001` with `db8::/64`), always of one length since the name ends
    // with it: the offset is taken within the address's own prefix of that length, and the
    // record found there must name the address. A few records are read, so that one damaged
    // record does not stop every release of its pool.
    let first = s.get(
        &dl,
        "pool read",
        s.keys.allocations_dir(pool),
        Some(GetOptions::new().with_prefix().with_limit(8)),
    )?;
    let Some(range) = first.kvs().iter().find_map(|kv| {
        let record = AllocationRecord::from_json(kv.value())?;
        crate::ipam::Cidr::parse(&record.range, false)
    }) else {
        return Ok(None);
    };
    let Some(offset) = offset_within_own_prefix(ip, range.prefix) else {
        return Ok(None);
    };
    release_one(
        s,
        backoff,
        &dl,
        (pool, offset),
        &|r| r.ip == ip && holder.is_none_or(|who| r.is_of(&who.container_id, &who.ifname)),
        Known::Likely(Vec::new()),
    )
}

fn parse_allocation(kv: &KeyValue) -> Option<(u128, AllocationRecord)> {
    let offset = parse_hex(std::str::from_utf8(kv.key()).ok()?)?;
    Some((offset, AllocationRecord::from_json(kv.value())?))
}
