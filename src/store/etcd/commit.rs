//! The transactions of an ADD: the commit of every plan at once, and the best-effort merge of
//! run chains afterwards.

use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use rand::Rng;

use super::keys::{hex, Keys};
use super::plan::{kept, KeptReservation, Plan, Released};
use super::records::{AllocationRecord, ReservationRecord};
use super::runs::{self, ReadRun, Run};
use super::session::{revision_of, Deadline, Session};
use crate::store::{AddRequest, RangeRequest};

/// Chains of adjacent runs shorter than this (plus a random part) are left alone.
pub(super) const COMPACT_AT: usize = 16;

/// Runs merged by one commit at most: keeps the transaction well under etcd's operation limit.
pub(super) const MERGE_CAP: usize = 32;

/// Merges chains of adjacent runs the searches crossed, the new runs `[offset, offset]`
/// (committed at `revision`) included, when they have grown long. Best effort: the allocations
/// are already committed, a failed or conflicting merge leaves a valid partition and the next
/// search tries again.
pub(super) fn compact_chain(
    s: &Session,
    dl: &Deadline,
    pool: &str,
    walked: &[ReadRun],
    new_runs: &[u128],
    revision: i64,
) {
    // A threshold that differs between writers, so that they rarely all merge the same chain.
    let threshold = COMPACT_AT + rand::rng().random_range(0..COMPACT_AT);
    let mut runs = walked.to_vec();
    runs.extend(new_runs.iter().map(|&offset| ReadRun {
        run: Run {
            start: offset,
            end: offset,
        },
        mod_revision: revision,
    }));
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
        match s.txn(dl, "run merge", Txn::new().when(compares).and_then(ops)) {
            Ok(resp) if resp.succeeded() => s.runs_written.note(pool, revision_of(&resp)),
            Ok(_) => {}
            Err(e) => tracing::debug!(
                "etcd: merging runs of {pool} failed (harmless): {}",
                crate::store::error::chain(&e)
            ),
        }
    }
}

/// A compare that `key` is still as read: absent (`None`) or at revision `rev`.
pub(super) fn unchanged(key: &str, rev: Option<i64>) -> Compare {
    match rev {
        Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    }
}

/// The compares and writes that commit every plan at once.
pub(super) fn build_commit(
    s: &Session,
    req: &AddRequest,
    plans: &[Plan],
) -> (Vec<Compare>, Vec<TxnOp>) {
    let mut txn = Commit::default();
    for (rr, plan) in req.ranges.iter().zip(plans) {
        let pool = &rr.pool.name;
        match plan {
            Plan::Keep {
                offset,
                mod_revision,
                record,
                reservation,
                ..
            } => {
                let read = (*offset, *mod_revision, record.as_ref());
                keep(&s.keys, (req, pool), read, reservation.as_ref(), &mut txn)
            }
            Plan::Take {
                offset,
                ip,
                owner_rev,
                pod_rev,
                release: released,
                reservation_rev,
                ..
            } => {
                if let Some(released) = released {
                    release(&s.keys, req, pool, released, &mut txn);
                }
                take(
                    &s.keys,
                    req,
                    rr,
                    (*offset, *ip),
                    (*owner_rev, *pod_rev, *reservation_rev),
                    &mut txn,
                );
            }
        }
    }
    (txn.compares, txn.ops)
}

/// The compares and writes of one commit, as they are gathered.
#[derive(Default)]
struct Commit {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
}

/// A repeated ADD: the record (read at `mod_revision`) follows the attachment's new container,
/// and so does its reservation unless that is another holder's.
fn keep(
    keys: &Keys,
    (req, pool): (&AddRequest, &str),
    (offset, mod_revision, record): (u128, i64, &AllocationRecord),
    reservation: Option<&KeptReservation>,
    txn: &mut Commit,
) {
    let who = &req.attachment;
    let akey = keys.allocation(pool, offset);
    txn.compares.push(Compare::mod_revision(
        akey.clone(),
        CompareOp::Equal,
        mod_revision,
    ));
    let updated = kept(req, record);
    if updated == *record {
        return;
    }
    txn.ops.push(TxnOp::put(akey, updated.to_json(), None));
    if record.container_id != who.container_id {
        txn.ops.push(TxnOp::delete(
            keys.owner(&record.container_id, &record.ifname, pool),
            None,
        ));
        txn.ops.push(TxnOp::put(
            keys.owner(&who.container_id, &who.ifname, pool),
            hex(offset),
            None,
        ));
    }
    if let (Some(pod), None) = (&who.pod_ref, &record.pod_ref) {
        txn.ops.push(TxnOp::put(
            keys.pod(pod, &who.ifname, pool),
            hex(offset),
            None,
        ));
    }
    let rev = match reservation {
        Some(KeptReservation::Ours(rev)) => Some(*rev),
        Some(KeptReservation::Missing) => None,
        Some(KeptReservation::Others) | None => return,
    };
    let rkey = keys.reservation(&record.network_name, record.ip);
    txn.compares.push(unchanged(&rkey, rev));
    let value = ReservationRecord::of(pool, &updated).to_json();
    txn.ops.push(TxnOp::put(rkey, value, None));
}

/// A free address: its record, owner and pod index entries, reservation and run.
fn take(
    keys: &Keys,
    req: &AddRequest,
    rr: &RangeRequest,
    (offset, ip): (u128, IpAddr),
    (owner_rev, pod_rev, reservation_rev): (Option<i64>, Option<i64>, Option<i64>),
    txn: &mut Commit,
) {
    let who = &req.attachment;
    let pool = &rr.pool.name;
    let akey = keys.allocation(pool, offset);
    txn.compares.push(unchanged(&akey, None));
    // A marked offset is still in a run (`freed`): it is free once a fold cuts it out.
    txn.compares
        .push(unchanged(&keys.freed(pool, offset), None));
    let record = AllocationRecord {
        ip,
        range: rr.pool.cidr().to_string(),
        container_id: who.container_id.clone(),
        ifname: who.ifname.clone(),
        pod_ref: who.pod_ref.clone(),
        pod_uid: who.pod_uid.clone(),
        cni_network: req.cni_network.clone(),
        network_name: req.network_name.clone(),
        reserved: req.overlap,
        node: req.node.clone(),
    };
    txn.ops.push(TxnOp::put(akey, record.to_json(), None));
    let owner_key = keys.owner(&who.container_id, &who.ifname, pool);
    txn.compares.push(unchanged(&owner_key, owner_rev));
    txn.ops.push(TxnOp::put(owner_key, hex(offset), None));
    if let Some(pod) = &who.pod_ref {
        let pod_key = keys.pod(pod, &who.ifname, pool);
        txn.compares.push(unchanged(&pod_key, pod_rev));
        txn.ops.push(TxnOp::put(pod_key, hex(offset), None));
    }
    if req.overlap {
        let rkey = keys.reservation(&req.network_name, ip);
        txn.compares.push(unchanged(&rkey, reservation_rev));
        let value = ReservationRecord::of(pool, &record).to_json();
        txn.ops.push(TxnOp::put(rkey, value, None));
    }
    push_run_change(
        keys,
        pool,
        runs::take(offset),
        &mut txn.compares,
        &mut txn.ops,
    );
}

/// What a move gives back, in the same commit as the take: the old record, its reservation and
/// its run. Index entries are overwritten by the take, except an owner entry of an older
/// container, which goes.
fn release(keys: &Keys, req: &AddRequest, pool: &str, released: &Released, txn: &mut Commit) {
    let record = &released.record;
    let akey = keys.allocation(pool, released.offset);
    txn.compares.push(Compare::mod_revision(
        akey.clone(),
        CompareOp::Equal,
        released.mod_revision,
    ));
    txn.ops.push(TxnOp::delete(akey, None));
    if record.container_id != req.attachment.container_id {
        txn.ops.push(TxnOp::delete(
            keys.owner(&record.container_id, &record.ifname, pool),
            None,
        ));
    }
    if let Some(rev) = released.reservation_rev {
        let rkey = keys.reservation(&record.network_name, record.ip);
        txn.compares
            .push(Compare::mod_revision(rkey.clone(), CompareOp::Equal, rev));
        txn.ops.push(TxnOp::delete(rkey, None));
    }
    if let Some(read) = &released.run {
        txn.compares.push(Compare::mod_revision(
            keys.run(pool, read.run.start),
            CompareOp::Equal,
            read.mod_revision,
        ));
        let change = runs::release(released.offset, read.run);
        push_run_change(keys, pool, change, &mut txn.compares, &mut txn.ops);
    }
}

/// Adds the writes of a run change, with a must-not-exist compare for every new run key.
pub(super) fn push_run_change(
    keys: &Keys,
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
