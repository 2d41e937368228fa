//! Releasing allocations (DEL, GC, the CLI's release) and reading them (CHECK, allocations). Each
//! release is one transaction: the record, its run, its index entries and its reservation go
//! together, guarded by the revisions that were read.

use std::net::IpAddr;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use super::commit::push_run_change;
use super::keys::{parse_hex, unescape, Keys};
use super::plan::Stop;
use super::records::{AllocationRecord, ReservationRecord};
use super::runs::{self, ReadRun};
use super::session::{floor_get, key_get, revision_of, CallFailed, Deadline, Session};
use crate::store::retry::Backoff;
use crate::store::{Allocation, AttachmentRequest, GcRequest, StoreError};

/// Releases `offset` of `pool` if its record satisfies `belongs`; the released allocation, or `None`
/// when there was nothing (left) to release. Retried while the pool changes under the commit.
pub fn release_one(
    s: &Session,
    backoff: &Backoff,
    dl: &Deadline,
    pool: &str,
    offset: u128,
    belongs: &dyn Fn(&AllocationRecord) -> bool,
) -> Result<Option<Allocation>, StoreError> {
    let mut last = CallFailed::new("no attempt finished");
    // What the last failed commit read back: the next attempt starts from it.
    let mut read_back = None;
    for attempt in 0..backoff.attempts.max(1) {
        if attempt > 0 {
            s.pause(dl, backoff.delay(attempt));
        }
        if dl.passed() {
            break;
        }
        match try_release(s, dl, (pool, offset), belongs, &mut read_back) {
            Ok(Attempt::Done(released)) => return Ok(released),
            Ok(Attempt::Changed) => {
                last = CallFailed::new("the pool changed while releasing (conflicting writer)")
            }
            Err(Stop::Final(err)) => return Err(err),
            Err(Stop::Retry(failed)) => last = failed,
        }
    }
    Err(
        StoreError::try_again(format!("could not release {pool} offset {offset} in etcd"))
            .because(last),
    )
}

/// How one release attempt ended. Only ever returned, never stored: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    /// Released (`Some`), or nothing there to release (`None`).
    Done(Option<Allocation>),
    /// A compared revision moved: read again.
    Changed,
}

/// What a release commit that failed read back, at the revision it failed at: the record, the
/// run at or before the offset, and the keys that pointed at the record then (`side_keys`,
/// one answer each). The next attempt starts from them instead of reading.
struct ReleaseRead {
    record: Option<KeyValue>,
    floor: Option<KeyValue>,
    side_keys: Vec<String>,
    side: Vec<Vec<KeyValue>>,
}

/// One read of the record and what points at it (or what the last failed commit read back),
/// and one transaction that deletes them all if none of them changed; if one did, the
/// transaction reads them back for the next attempt.
fn try_release(
    s: &Session,
    dl: &Deadline,
    (pool, offset): (&str, u128),
    belongs: &dyn Fn(&AllocationRecord) -> bool,
    read_back: &mut Option<ReleaseRead>,
) -> Result<Attempt, Stop> {
    let keys = &s.keys;
    let akey = keys.allocation(pool, offset);
    let first_gets = || {
        vec![
            key_get(&akey),
            floor_get(&keys.runs_dir(pool), &keys.run(pool, offset)),
        ]
    };
    let earlier = read_back.take();
    let (record_kv, floor_kv) = match &earlier {
        Some(read) => (read.record.clone(), read.floor.clone()),
        None => {
            let read = s.reads(dl, "release read", first_gets())?;
            let mut read = read.into_iter().map(|kvs| kvs.into_iter().next());
            (read.next().flatten(), read.next().flatten())
        }
    };
    let Some(kv) = record_kv else {
        return Ok(Attempt::Done(None));
    };
    let Some(record) = AllocationRecord::from_json(kv.value()) else {
        return Err(Stop::Final(StoreError::io(format!(
            "unreadable allocation record at etcd key {akey}"
        ))));
    };
    if !belongs(&record) {
        return Ok(Attempt::Done(None));
    }
    let run = floor_kv
        .and_then(|kv| ReadRun::from_kv(&kv))
        .filter(|r| r.run.start <= offset && offset <= r.run.end);
    let wanted = side_keys(keys, pool, &record);
    let side_keys = wanted.keys.clone();
    let side_gets = wanted.gets();
    let side = match earlier {
        // The same record read back points through the same keys.
        Some(read) if read.side_keys == side_keys => read.side,
        _ => s.reads(dl, "release read", side_gets.clone())?,
    };
    let side = wanted.ours(side, pool, offset, &record);
    let (compares, ops) = release_alone(keys, (pool, offset), kv.mod_revision(), &side, run);
    let reads = [first_gets(), side_gets].concat();
    let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
    let resp = s.txn(dl, "release commit", txn)?;
    if !resp.succeeded() {
        *read_back = ReleaseRead::of(resp, side_keys);
        return Ok(Attempt::Changed);
    }
    if run.is_some() {
        s.runs_written.note(pool, revision_of(&resp));
    }
    Ok(Attempt::Done(record.allocation(pool)))
}

/// The compares and writes of one release: the record of `offset` (at `revision`), the keys
/// `side` that point at it, and its offset out of `run`, the run covering it.
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
        Some(read) => push_run_release(keys, pool, &[offset], read, &mut compares, &mut ops),
        None => tracing::warn!(
            pool,
            offset,
            "etcd: no run covers a held offset; releasing the record alone"
        ),
    }
    (compares, ops)
}

impl ReleaseRead {
    /// What the failure branch of a release commit read: the record, the floor run, then one
    /// answer per key of `side_keys`. `None` unless it answered every get (the next attempt
    /// reads): a missing record must never read as a released one.
    fn of(resp: TxnResponse, side_keys: Vec<String>) -> Option<ReleaseRead> {
        let mut answers = Vec::new();
        for answer in resp.op_responses() {
            let TxnOpResponse::Get(mut get) = answer else {
                return None;
            };
            answers.push(get.take_kvs());
        }
        if answers.len() != 2 + side_keys.len() {
            return None;
        }
        let side = answers.split_off(2);
        let mut first = answers.into_iter().map(|kvs| kvs.into_iter().next());
        Some(ReleaseRead {
            record: first.next().flatten(),
            floor: first.next().flatten(),
            side_keys,
            side,
        })
    }
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

/// The compares and writes that take `offsets` out of `read`, the run covering them.
pub(super) fn push_run_release(
    keys: &Keys,
    pool: &str,
    offsets: &[u128],
    read: ReadRun,
    compares: &mut Vec<Compare>,
    ops: &mut Vec<TxnOp>,
) {
    compares.push(Compare::mod_revision(
        keys.run(pool, read.run.start),
        CompareOp::Equal,
        read.mod_revision,
    ));
    let change = runs::release_many(offsets, read.run);
    push_run_change(keys, pool, change, compares, ops);
}

/// The keys that may point at an allocation: its owner and pod index entries and its
/// reservation.
pub(super) struct SideKeys {
    keys: Vec<String>,
    /// How many of `keys` are index entries (the rest is the reservation).
    index_count: usize,
}

pub(super) fn side_keys(keys: &Keys, pool: &str, record: &AllocationRecord) -> SideKeys {
    let mut wanted = vec![keys.owner(&record.container_id, &record.ifname, pool)];
    if let Some(pod) = &record.pod_ref {
        wanted.push(keys.pod(pod, &record.ifname, pool));
    }
    let index_count = wanted.len();
    if record.reserved {
        wanted.push(keys.reservation(&record.network_name, record.ip));
    }
    SideKeys {
        keys: wanted,
        index_count,
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
        self,
        res: impl IntoIterator<Item = Vec<KeyValue>>,
        pool: &str,
        offset: u128,
        record: &AllocationRecord,
    ) -> Vec<(String, i64)> {
        let mut side = Vec::new();
        for (i, (key, kvs)) in self.keys.into_iter().zip(res).enumerate() {
            let Some(kv) = kvs.into_iter().next() else {
                continue;
            };
            let ours = if i < self.index_count {
                std::str::from_utf8(kv.value()).ok().and_then(parse_hex) == Some(offset)
            } else {
                ReservationRecord::from_json(kv.value()).is_some_and(|r| {
                    r.pool == pool
                        && r.container_id == record.container_id
                        && r.ifname == record.ifname
                })
            };
            if ours {
                side.push((key, kv.mod_revision()));
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
        if let Some((pool, offset)) = owner_entry(&kv) {
            if any_pool || req.pools.iter().any(|p| p.name == pool) {
                found.push((pool, offset));
            }
        }
    })?;
    Ok(found)
}

/// The pool and offset of an owner index entry.
pub(super) fn owner_entry(kv: &KeyValue) -> Option<(String, u128)> {
    let key = std::str::from_utf8(kv.key()).ok()?;
    let pool = unescape(key.rsplit('/').next().unwrap_or_default());
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
    let mut released = Vec::new();
    for (pool, offset) in owned(s, dl, req, true)? {
        if let Some(allocation) = release_one(s, backoff, dl, &pool, offset, &owned_by(req))? {
            released.push(allocation);
        }
    }
    Ok(released)
}

/// Whether a record is the DEL's to release: the same container and interface.
pub(super) fn owned_by(req: &AttachmentRequest) -> impl Fn(&AllocationRecord) -> bool + '_ {
    |r: &AllocationRecord| r.container_id == req.container_id && r.ifname == req.ifname
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
            if let Some(allocation) = release_one(s, backoff, &dl, &pool.name, offset, &belongs)? {
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
        let Ok(key) = std::str::from_utf8(kv.key()) else {
            return;
        };
        // <prefix>pools/<pool>/a/<offset>; run keys share the pools directory.
        let mut parts = key.rsplit('/');
        let (_, kind, name) = (parts.next(), parts.next(), parts.next());
        if kind != Some("a") {
            return;
        }
        if let (Some(name), Some(record)) = (name, AllocationRecord::from_json(kv.value())) {
            out.extend(record.allocation(&unescape(name)));
        }
    })?;
    Ok(out)
}

pub fn release(
    s: &Session,
    backoff: &Backoff,
    pool: &str,
    ip: IpAddr,
) -> Result<Option<Allocation>, StoreError> {
    let dl = Deadline::after(s.timeouts.deadline);
    // Any record of the pool names its range, which turns the address into an offset.
    let first = s.get(
        &dl,
        "pool read",
        s.keys.allocations_dir(pool),
        Some(GetOptions::new().with_prefix().with_limit(1)),
    )?;
    let Some(range) = first
        .kvs()
        .first()
        .and_then(|kv| AllocationRecord::from_json(kv.value()))
        .and_then(|r| crate::ipam::Cidr::parse(&r.range, false))
    else {
        return Ok(None);
    };
    let Some(offset) = range.offset_of(ip) else {
        return Ok(None);
    };
    release_one(s, backoff, &dl, pool, offset, &|r| r.ip == ip)
}

fn parse_allocation(kv: &KeyValue) -> Option<(u128, AllocationRecord)> {
    let offset = parse_hex(std::str::from_utf8(kv.key()).ok()?)?;
    Some((offset, AllocationRecord::from_json(kv.value())?))
}
