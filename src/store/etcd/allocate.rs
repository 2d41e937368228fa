//! ADD: for every range of the request, find what the attachment already holds or the lowest
//! free address, then commit all ranges in one transaction whose compares cover everything
//! that was read. A failed compare or a failed call means "read again and retry"; because the
//! owner index is written with the allocation, a retry after a commit whose outcome was unknown
//! finds the committed allocation and returns it instead of taking a second address.

use std::net::IpAddr;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};

use super::keys::{hex, parse_hex};
use super::records::{AllocationRecord, ReservationRecord};
use super::runs::{self, ReadRun, Run};
use super::session::{floor_get, key_get, CallFailed, Deadline, Session};
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
        kv: KeyValue,
        record: AllocationRecord,
    },
    /// Take the free `offset`.
    Take {
        offset: u128,
        ip: IpAddr,
        left: Option<ReadRun>,
        right: Option<ReadRun>,
        owner_rev: Option<i64>,
        pod_rev: Option<i64>,
    },
}

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
    let mut last = String::from("no attempt finished");
    for attempt in 0..backoff.attempts.max(1) {
        if attempt > 0 {
            s.pause(&dl, backoff.delay(attempt));
        }
        if dl.passed() {
            break;
        }
        match attempt_add(s, req, &dl) {
            Ok(Some(ips)) => return Ok(ips),
            Ok(None) => last = "the pool changed while allocating (conflicting writer)".into(),
            Err(Stop::Final(e)) => return Err(e),
            Err(Stop::Retry(msg)) => last = msg,
        }
    }
    Err(StoreError::TryAgain(format!(
        "could not allocate from etcd within {:?}: {last}",
        s.timeouts.deadline
    )))
}

/// One read-decide-commit round. `Ok(None)` when a compare failed.
fn attempt_add(s: &Session, req: &AddRequest, dl: &Deadline) -> Result<Option<Vec<IpAddr>>, Stop> {
    let who = &req.attachment;
    let hits = read_index(s, req, dl)?;
    let held = read_held(s, req, &hits, dl)?;
    let mut plans = Vec::with_capacity(req.ranges.len());
    let mut chosen: Vec<IpAddr> = Vec::new();
    for ((rr, hit), held) in req.ranges.iter().zip(&hits).zip(held) {
        let plan = match held {
            Some((offset, kv, record)) => {
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
                    kv,
                    record,
                }
            }
            None => match rr.requested {
                Some(offset) => plan_static(s, req, rr, *hit, offset, &chosen, dl)?,
                None => plan_dynamic(s, req, rr, *hit, &chosen, dl)?,
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
    let resp = s.txn(
        dl,
        "allocation commit",
        Txn::new().when(compares).and_then(ops),
    )?;
    if resp.succeeded() {
        tracing::debug!(container = %who.container_id, ips = ?chosen, "etcd: allocated");
        Ok(Some(chosen))
    } else {
        Ok(None)
    }
}

/// The owner and pod index entries of the attachment in every pool of the request.
fn read_index(s: &Session, req: &AddRequest, dl: &Deadline) -> Result<Vec<IndexHits>, Stop> {
    let who = &req.attachment;
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
    let mut results = s.reads(dl, "index read", gets)?.into_iter();
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
    Ok(hits)
}

/// For every range, the allocation the attachment already holds there, if any.
#[allow(clippy::type_complexity)]
fn read_held(
    s: &Session,
    req: &AddRequest,
    hits: &[IndexHits],
    dl: &Deadline,
) -> Result<Vec<Option<(u128, KeyValue, AllocationRecord)>>, Stop> {
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
                        found = Some((*o, kv, record));
                    }
                }
            }
        }
        held.push(found);
    }
    Ok(held)
}

/// The lowest free offset of the range, and what its commit must compare.
fn plan_dynamic(
    s: &Session,
    req: &AddRequest,
    rr: &RangeRequest,
    hit: IndexHits,
    chosen: &[IpAddr],
    dl: &Deadline,
) -> Result<Plan, Stop> {
    let range = &rr.pool.range;
    let pool = &rr.pool.name;
    let runs_dir = s.keys.runs_dir(pool);
    let mut found: Option<Plan> = None;
    let result = range.lowest_free(|candidate| {
        let ip = range.ip(candidate);
        if chosen.contains(&ip) {
            return Ok(Some(candidate));
        }
        let mut gets = vec![floor_get(&runs_dir, &s.keys.run(pool, candidate))];
        let next = candidate.checked_add(1);
        if let Some(n) = next {
            gets.push(key_get(&s.keys.run(pool, n)));
        }
        if req.overlap {
            gets.push(key_get(&s.keys.reservation(&req.network_name, ip)));
        }
        let mut res = s.reads(dl, "pool read", gets)?.into_iter();
        let floor = first_run(res.next());
        if let Some(f) = floor.filter(|f| f.run.end >= candidate) {
            return Ok(Some(f.run.end));
        }
        let right = if next.is_some() {
            first_run(res.next())
        } else {
            None
        };
        if req.overlap && res.next().is_some_and(|kvs| !kvs.is_empty()) {
            // Held network-wide through an overlapping range.
            return Ok(Some(candidate));
        }
        found = Some(Plan::Take {
            offset: candidate,
            ip,
            left: floor.filter(|f| f.run.end.checked_add(1) == Some(candidate)),
            right,
            owner_rev: hit.owner.map(|(rev, _)| rev),
            pod_rev: hit.pod.map(|(rev, _)| rev),
        });
        Ok::<_, CallFailed>(None)
    })?;
    match (result, found) {
        (Some(_), Some(plan)) => Ok(plan),
        _ => Err(Stop::Final(StoreError::Exhausted {
            range: range.to_string(),
        })),
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
    let next = offset.checked_add(1);
    if let Some(n) = next {
        gets.push(key_get(&s.keys.run(pool, n)));
    }
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
    let right = if next.is_some() {
        first_run(res.next())
    } else {
        None
    };
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
        left: floor.filter(|f| f.run.end.checked_add(1) == Some(offset)),
        right,
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
                offset, kv, record, ..
            } => {
                let akey = keys.allocation(pool, *offset);
                compares.push(Compare::mod_revision(
                    akey.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                ));
                let updated = AllocationRecord {
                    container_id: who.container_id.clone(),
                    pod_uid: who.pod_uid.clone().or_else(|| record.pod_uid.clone()),
                    pod_ref: who.pod_ref.clone().or_else(|| record.pod_ref.clone()),
                    ..record.clone()
                };
                if &updated == record {
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
                left,
                right,
                owner_rev,
                pod_rev,
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
                for read in left.iter().chain(right.iter()) {
                    compares.push(unchanged(
                        &keys.run(pool, read.run.start),
                        Some(read.mod_revision),
                    ));
                }
                let change = runs::take(*offset, left.map(|l| l.run), right.map(|r| r.run));
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
