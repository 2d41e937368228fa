//! DELs combined by the node agent (`combine`): the owner index entries of every DEL waiting,
//! then their records and runs, then the index entries and reservations pointing at them, each
//! in one read; then one transaction with a nested commit per run. The releases of one run
//! share a commit, since each changes the run: the commit takes all their offsets out of it at
//! once and compares everything read (the records, the entries, the run). Commits of
//! different runs write different keys (one DEL per attachment in a batch), so each succeeds
//! or fails as it would alone; a DEL whose commit failed is read again in the next round.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::keys::range_end;
use super::records::AllocationRecord;
use super::release::{owned_by, owner_entry, push_release, push_run_release, side_keys};
use super::runs::ReadRun;
use super::session::{floor_get, key_get, revision_of, CallFailed, Deadline, Session};
use crate::store::{Allocation, AttachmentRequest};

/// Owner index entries read per DEL at most: one per pool it holds. A DEL holding more runs
/// alone, which pages through them.
const POOLS_PER_DEL: i64 = 64;

/// Releases of one run in one commit at most, and commits in one transaction at most: a
/// commit of 12 releases has at most 49 compares and 62 writes, which with 64 commits stays
/// within what etcd accepts ([`super::session::MAX_TXN_OPS`]). The rest waits for the next round.
const RELEASES_PER_COMMIT: usize = 12;
const COMMITS_PER_TXN: usize = 64;

/// What one combined round of DELs did.
pub(super) struct Released {
    /// What each DEL released in this round (a DEL may be answered over several rounds).
    pub released: Vec<(usize, Allocation)>,
    /// The DELs with nothing left to release.
    pub answered: Vec<usize>,
    /// The DELs whose commit failed (something changed since it was read), or that must run
    /// alone.
    pub lost: Vec<usize>,
    /// The DELs left for the next round by the limits of one transaction.
    pub deferred: Vec<usize>,
}

/// One allocation a DEL of the batch holds, as read.
struct Held {
    del: usize,
    pool: String,
    offset: u128,
    revision: i64,
    record: AllocationRecord,
    run: Option<ReadRun>,
    side: Vec<(String, i64)>,
}

/// Releases what the DELs `together` (distinct attachments) hold, in one round.
pub(super) fn release_together(
    s: &Session,
    reqs: &[AttachmentRequest],
    together: &[usize],
    dl: &Deadline,
) -> Result<Released, CallFailed> {
    let mut entries = Vec::new();
    // DELs left to a later round or to run alone.
    let mut lost = BTreeSet::new();
    for (&del, entry) in together
        .iter()
        .zip(read_owner_entries(s, reqs, together, dl)?)
    {
        match entry {
            Some(found) => entries.extend(found.into_iter().map(|(p, o)| (del, p, o))),
            None => drop(lost.insert(del)),
        }
    }
    let mut by_run: BTreeMap<(String, u128), Vec<Held>> = BTreeMap::new();
    for found in read_held(s, reqs, entries, dl)? {
        match found {
            // Without a covering run (never written so) the record goes alone, keyed by itself.
            Ok(h) => by_run
                .entry((h.pool.clone(), h.run.map_or(h.offset, |r| r.run.start)))
                .or_default()
                .push(h),
            Err(del) => drop(lost.insert(del)),
        }
    }
    let mut deferred = BTreeSet::new();
    let mut groups: Vec<Vec<Held>> = Vec::new();
    for mut group in by_run.into_values() {
        let later = group.split_off(group.len().min(RELEASES_PER_COMMIT));
        if groups.len() == COMMITS_PER_TXN {
            deferred.extend(group.iter().map(|h| h.del));
        } else {
            groups.push(group);
        }
        deferred.extend(later.iter().map(|h| h.del));
    }
    let mut released = Vec::new();
    if !groups.is_empty() {
        let commits: Vec<TxnOp> = groups.iter().map(|g| group_commit(s, g)).collect();
        let resp = s.txn(dl, "combined release commit", Txn::new().and_then(commits))?;
        let revision = revision_of(&resp);
        for (group, answer) in groups.into_iter().zip(resp.op_responses()) {
            let applied = matches!(answer, TxnOpResponse::Txn(t) if t.succeeded());
            // A group shares one run, or has none and releases records alone.
            if let Some(h) = group.first().filter(|h| applied && h.run.is_some()) {
                s.runs_written.note(&h.pool, revision);
            }
            for h in group {
                if !applied {
                    lost.insert(h.del);
                } else if let Some(allocation) = h.record.allocation(&h.pool) {
                    released.push((h.del, allocation));
                }
            }
        }
    }
    deferred.retain(|d| !lost.contains(d));
    Ok(Released {
        released,
        answered: together
            .iter()
            .copied()
            .filter(|d| !lost.contains(d) && !deferred.contains(d))
            .collect(),
        lost: lost.into_iter().collect(),
        deferred: deferred.into_iter().collect(),
    })
}

/// The pools an attachment holds an address in, with the offset.
type PoolsHeld = Vec<(String, u128)>;

/// Each DEL's owner index entries (pool, offset), in one read; `None` for a DEL holding more
/// than one read's page.
fn read_owner_entries(
    s: &Session,
    reqs: &[AttachmentRequest],
    together: &[usize],
    dl: &Deadline,
) -> Result<Vec<Option<PoolsHeld>>, CallFailed> {
    let gets: Vec<TxnOp> = together
        .iter()
        .map(|&i| {
            let dir = s.keys.owner_dir(&reqs[i].container_id, &reqs[i].ifname);
            let options = GetOptions::new()
                .with_range(range_end(&dir))
                .with_limit(POOLS_PER_DEL);
            TxnOp::get(dir, Some(options))
        })
        .collect();
    let resp = s.txn(dl, "combined release read", Txn::new().and_then(gets))?;
    Ok(resp
        .op_responses()
        .into_iter()
        .map(|answer| match answer {
            TxnOpResponse::Get(g) if !g.more() => {
                Some(g.kvs().iter().filter_map(owner_entry).collect())
            }
            _ => None,
        })
        .collect())
}

/// The records (with their runs) the entries point at, those that are the DELs' own, and the
/// index entries and reservations pointing at them: two reads. A record that is not readable gives its DEL (`Err`), which then runs alone and reports it.
fn read_held(
    s: &Session,
    reqs: &[AttachmentRequest],
    entries: Vec<(usize, String, u128)>,
    dl: &Deadline,
) -> Result<Vec<Result<Held, usize>>, CallFailed> {
    let keys = &s.keys;
    let gets = entries
        .iter()
        .flat_map(|(_, pool, offset)| {
            [
                key_get(&keys.allocation(pool, *offset)),
                floor_get(&keys.runs_dir(pool), &keys.run(pool, *offset)),
            ]
        })
        .collect();
    let mut answers = s.reads(dl, "combined release read", gets)?.into_iter();
    let mut held = Vec::new();
    let mut unreadable = Vec::new();
    for (del, pool, offset) in entries {
        let first = |kvs: Option<Vec<KeyValue>>| kvs.and_then(|kvs| kvs.into_iter().next());
        let (found, floor) = (first(answers.next()), first(answers.next()));
        let Some(kv) = found else {
            continue; // Released already: nothing to do, as for a DEL alone.
        };
        let Some(record) = AllocationRecord::from_json(kv.value()) else {
            unreadable.push(Err(del));
            continue;
        };
        if !owned_by(&reqs[del])(&record) {
            continue;
        }
        let run = floor
            .and_then(|kv| ReadRun::from_kv(&kv))
            .filter(|r| r.run.start <= offset && offset <= r.run.end);
        held.push(Held {
            del,
            pool,
            offset,
            revision: kv.mod_revision(),
            record,
            run,
            side: Vec::new(),
        });
    }
    let wanted: Vec<_> = held
        .iter()
        .map(|h| side_keys(keys, &h.pool, &h.record))
        .collect();
    let gets = wanted.iter().flat_map(|w| w.gets()).collect();
    let mut answers = s.reads(dl, "combined release read", gets)?.into_iter();
    for (h, w) in held.iter_mut().zip(wanted) {
        let res: Vec<Vec<KeyValue>> = answers.by_ref().take(w.len()).collect();
        h.side = w.ours(res, &h.pool, h.offset, &h.record);
    }
    Ok(held.into_iter().map(Ok).chain(unreadable).collect())
}

/// The nested commit of the releases of one run: every record and what points at it, and the
/// run without their offsets.
fn group_commit(s: &Session, group: &[Held]) -> TxnOp {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    for h in group {
        let at = (h.pool.as_str(), h.offset);
        push_release(&s.keys, at, h.revision, &h.side, &mut compares, &mut ops);
    }
    if let Some(run) = group.first().and_then(|h| h.run) {
        let offsets: Vec<u128> = group.iter().map(|h| h.offset).collect();
        push_run_release(
            &s.keys,
            &group[0].pool,
            &offsets,
            run,
            &mut compares,
            &mut ops,
        );
    }
    TxnOp::txn(Txn::new().when(compares).and_then(ops))
}
