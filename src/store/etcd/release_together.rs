//! DELs combined by the node agent (`combine`): the owner index entries of every DEL waiting,
//! with what a release reads of each allocation its caller named (`Hints`), in one read; then
//! the records and runs no hint named, and the keys pointing at them that were not read with
//! them, in one read each when there are any; then one transaction with a nested commit per
//! run. The releases of one run share a commit, since each cuts the run: the commit takes all
//! their offsets out of the latest version of it any of them read (reads at different
//! revisions may find different ones), or marks them freed when that version is no longer the
//! run's (`freed`), and compares everything else read (the records, the entries). Commits of
//! different runs write different keys (one DEL per attachment in a batch), so each succeeds
//! or fails as it would alone; a DEL whose commit failed is read again in the next round.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use etcd_client::{KeyValue, Txn, TxnOp, TxnOpResponse};

use super::freed::{after_release, cut_or_mark, run_answer};
use super::release::{
    first_answers, first_gets, likely_side_keys, owned_by, push_release, release_gets, side_keys,
    Named, PoolsHeld, Releasable, ReleaseRead,
};
use super::session::{revision_of, CallFailed, Deadline, Session, MAX_TXN_OPS};
use crate::store::{Allocation, AttachmentRequest};

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
    /// The record and its run, as read.
    read: Releasable,
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
    let (owned, read) = read_first(s, reqs, together, dl)?;
    for (&del, entry) in together.iter().zip(owned) {
        match entry {
            Some(found) => entries.extend(found.into_iter().map(|(p, o)| (del, p, o))),
            None => drop(lost.insert(del)),
        }
    }
    let mut held = Vec::new();
    for found in read_held(s, reqs, entries, read, dl)? {
        match found {
            Ok(h) => held.push(h),
            Err(del) => drop(lost.insert(del)),
        }
    }
    let mut deferred = BTreeSet::new();
    let groups = commits_of(held, &mut lost, &mut deferred);
    let released = commit_all(s, groups, dl, &mut lost)?;
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

/// The commit a release joins: that of the run covering it (pool, start), or its own for a
/// record without a covering run (never written so).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CommitOf {
    Run(String, u128),
    Alone(String, u128),
}

impl Held {
    fn commit_of(&self) -> CommitOf {
        match self.read.run {
            Some(r) => CommitOf::Run(self.pool.clone(), r.run.start),
            None => CommitOf::Alone(self.pool.clone(), self.offset),
        }
    }
}

/// Gives every release of `group` (one run's) the latest version of the run any of them read,
/// and takes out the DELs of those whose offset it no longer covers (the run was cut since
/// their read: they are read again in the next round). Releases read at different revisions
/// (with the batch's first read, or after it) may have found different versions of the run;
/// the commit changes the one version it compares, which must cover every offset it takes out.
fn latest_run_for_all(group: &mut Vec<Held>) -> Vec<usize> {
    let Some(latest) = group
        .iter()
        .filter_map(|h| h.read.run)
        .max_by_key(|r| r.mod_revision)
    else {
        return Vec::new();
    };
    let (covered, cut): (Vec<Held>, Vec<Held>) = std::mem::take(group)
        .into_iter()
        .partition(|h| latest.run.start <= h.offset && h.offset <= latest.run.end);
    *group = covered;
    for h in group.iter_mut() {
        h.read.run = Some(latest);
    }
    cut.into_iter().map(|h| h.del).collect()
}

/// The commits of one transaction: the releases of each run, which take its latest version
/// read out of it, at most [`RELEASES_PER_COMMIT`] each and [`COMMITS_PER_TXN`] in all. The
/// DELs of the rest are `deferred`; those whose run was cut since their read are `lost`.
fn commits_of(
    held: Vec<Held>,
    lost: &mut BTreeSet<usize>,
    deferred: &mut BTreeSet<usize>,
) -> Vec<Vec<Held>> {
    let mut by_run: BTreeMap<CommitOf, Vec<Held>> = BTreeMap::new();
    for h in held {
        by_run.entry(h.commit_of()).or_default().push(h);
    }
    let mut groups: Vec<Vec<Held>> = Vec::new();
    for mut group in by_run.into_values() {
        lost.extend(latest_run_for_all(&mut group));
        let later = group.split_off(group.len().min(RELEASES_PER_COMMIT));
        if groups.len() == COMMITS_PER_TXN {
            deferred.extend(group.iter().map(|h| h.del));
        } else {
            groups.push(group);
        }
        deferred.extend(later.iter().map(|h| h.del));
    }
    groups
}

/// Sends `groups` in one transaction, a nested commit each: what the commits that applied
/// released. The DELs of the others are `lost`.
fn commit_all(
    s: &Session,
    groups: Vec<Vec<Held>>,
    dl: &Deadline,
    lost: &mut BTreeSet<usize>,
) -> Result<Vec<(usize, Allocation)>, CallFailed> {
    let mut released = Vec::new();
    if groups.is_empty() {
        return Ok(released);
    }
    let commits: Vec<TxnOp> = groups.iter().map(|g| group_commit(s, g)).collect();
    let resp = s.txn(dl, "combined release commit", Txn::new().and_then(commits))?;
    let revision = revision_of(&resp);
    for (group, answer) in groups.into_iter().zip(resp.op_responses()) {
        let (applied, last) = match answer {
            // The run's nested commit comes last (`group_commit`).
            TxnOpResponse::Txn(t) if t.succeeded() => (true, t.op_responses().pop()),
            _ => (false, None),
        };
        // A group shares one run, or has none and releases records alone.
        let pool = group.first().map(|h| h.pool.clone());
        if let (Some(pool), Some(answer)) = (pool, last.and_then(run_answer)) {
            after_release(s, dl, &pool, answer, revision);
        }
        for h in group {
            if !applied {
                lost.insert(h.del);
            } else if let Some(allocation) = h.read.record.allocation(&h.pool) {
                released.push((h.del, allocation));
            }
        }
    }
    Ok(released)
}

/// What a release read of an allocation a DEL of the batch holds, by DEL, pool and offset.
type Reads = HashMap<(usize, String, u128), ReleaseRead>;

/// Each DEL's owner index entries (pool, offset; `None` for a DEL holding more than one
/// read's page), and what a release reads of each allocation its caller named, as far as one
/// transaction holds them: one read.
fn read_first(
    s: &Session,
    reqs: &[AttachmentRequest],
    together: &[usize],
    dl: &Deadline,
) -> Result<(Vec<Option<PoolsHeld>>, Reads), CallFailed> {
    // Every DEL's owner entries first; the named allocations fill what is left of the
    // transaction, and those that do not fit are read with the unnamed ones.
    let mut spare = MAX_TXN_OPS.saturating_sub(together.len());
    let mut gets = Vec::new();
    let mut named_of = Vec::new();
    for &i in together {
        let named = Named::of(&s.keys, &reqs[i], spare);
        spare -= named.iter().map(Named::gets).sum::<usize>();
        gets.extend(first_gets(&s.keys, &reqs[i], &named));
        named_of.push(named);
    }
    let resp = s.txn(dl, "combined release read", Txn::new().and_then(gets))?;
    let mut answers = resp.op_responses().into_iter();
    let mut owned = Vec::new();
    let mut read = Reads::new();
    for (&del, named) in together.iter().zip(named_of) {
        let (page, found) = first_answers(&s.keys, &mut answers, named);
        owned.push(page);
        let found = found.into_iter();
        read.extend(found.map(|((pool, offset), r)| ((del, pool, offset), r)));
    }
    Ok((owned, read))
}

/// Adds to `read` what a release reads of the `entries` it lacks (allocations no hint named,
/// or that did not fit the first read): one read for them all, none when there are none.
fn read_unnamed(
    s: &Session,
    reqs: &[AttachmentRequest],
    entries: &[(usize, String, u128)],
    read: &mut Reads,
    dl: &Deadline,
) -> Result<(), CallFailed> {
    let keys = &s.keys;
    let unread: Vec<_> = entries
        .iter()
        .filter(|(del, pool, offset)| !read.contains_key(&(*del, pool.clone(), *offset)))
        .map(|(del, pool, offset)| {
            let likely = likely_side_keys(keys, &reqs[*del], pool, *offset);
            (*del, pool.clone(), *offset, likely)
        })
        .collect();
    let gets = unread
        .iter()
        .flat_map(|(_, pool, offset, likely)| release_gets(keys, pool, *offset, likely))
        .collect();
    let mut answers = s.reads(dl, "combined release read", gets)?.into_iter();
    for (del, pool, offset, likely) in unread {
        let got = answers.by_ref().take(2 + likely.len()).collect();
        if let Some(found) = ReleaseRead::of(got, likely) {
            read.insert((del, pool, offset), found);
        }
    }
    Ok(())
}

/// The records (with their runs) the entries point at, those that are the DELs' own, and the
/// index entries and reservations pointing at them: what `read` holds already, the rest in
/// at most two reads. A record that is not readable gives its DEL (`Err`), which then runs
/// alone and reports it.
fn read_held(
    s: &Session,
    reqs: &[AttachmentRequest],
    entries: Vec<(usize, String, u128)>,
    mut read: Reads,
    dl: &Deadline,
) -> Result<Vec<Result<Held, usize>>, CallFailed> {
    let keys = &s.keys;
    read_unnamed(s, reqs, &entries, &mut read, dl)?;
    let mut held = Vec::new();
    let mut unreadable = Vec::new();
    // The held whose side keys were not all read, with the keys to read.
    let mut to_read = Vec::new();
    for (del, pool, offset) in entries {
        // Only an answer short of its gets leaves an entry unread: its DEL runs alone.
        let Some(found) = read.remove(&(del, pool.clone(), offset)) else {
            unreadable.push(Err(del));
            continue;
        };
        let held_by = match found.releasable(keys, (&pool, offset), &owned_by(&reqs[del])) {
            Ok(Some(h)) => h,
            // Released already, or another's now: nothing to do, as for a DEL alone.
            Ok(None) => continue,
            Err(_) => {
                unreadable.push(Err(del));
                continue;
            }
        };
        let wanted = side_keys(keys, &pool, &held_by.record);
        let side = found.side_read(&wanted, (&pool, offset), &held_by.record);
        if side.is_none() {
            to_read.push((held.len(), wanted));
        }
        held.push(Held {
            del,
            pool,
            offset,
            read: held_by,
            side: side.unwrap_or_default(),
        });
    }
    let gets = to_read.iter().flat_map(|(_, w)| w.gets()).collect();
    let mut answers = s.reads(dl, "combined release read", gets)?.into_iter();
    for (i, wanted) in to_read {
        let h = &mut held[i];
        let got: Vec<Vec<KeyValue>> = answers.by_ref().take(wanted.len()).collect();
        h.side = wanted.ours(got, &h.pool, h.offset, &h.read.record);
    }
    Ok(held.into_iter().map(Ok).chain(unreadable).collect())
}

/// The nested commit of the releases of one run: every record and what points at it, and the
/// run without their offsets.
fn group_commit(s: &Session, group: &[Held]) -> TxnOp {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    for h in group {
        let at = (h.pool.as_str(), h.offset);
        push_release(
            &s.keys,
            at,
            h.read.revision,
            &h.side,
            &mut compares,
            &mut ops,
        );
    }
    if let Some(run) = group.first().and_then(|h| h.read.run) {
        let offsets: Vec<u128> = group.iter().map(|h| h.offset).collect();
        ops.push(cut_or_mark(&s.keys, &group[0].pool, &offsets, run));
    }
    TxnOp::txn(Txn::new().when(compares).and_then(ops))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::records::AllocationRecord;
    use crate::store::etcd::runs::{ReadRun, Run};

    /// DEL `del`'s release of `offset`, whose run was read as `(start, end, revision)`.
    fn held(del: usize, offset: u128, (start, end, revision): (u128, u128, i64)) -> Held {
        let record =
            br#"{"ip":"10.0.0.4","range":"10.0.0.0/24","container_id":"c","ifname":"eth0"}"#;
        Held {
            del,
            pool: "p".into(),
            offset,
            read: Releasable {
                record: AllocationRecord::from_json(record).unwrap(),
                revision: 1,
                run: Some(ReadRun {
                    run: Run { start, end },
                    mod_revision: revision,
                }),
            },
            side: Vec::new(),
        }
    }

    #[test]
    fn one_commit_cuts_the_latest_version_of_a_run_read_twice() {
        // Read first as [4, 6]; read later as [4, 4], after another node released 5.
        let mut group = vec![held(0, 6, (4, 6, 10)), held(1, 4, (4, 4, 12))];
        assert_eq!(
            latest_run_for_all(&mut group),
            [0],
            "6 left for the next round"
        );
        assert_eq!(group.len(), 1);
        assert_eq!(
            group[0].read.run.map(|r| r.run),
            Some(Run { start: 4, end: 4 })
        );
        // Both offsets still in the latest version: one commit of it takes both out.
        let mut group = vec![held(0, 4, (4, 6, 10)), held(1, 5, (4, 5, 12))];
        assert!(latest_run_for_all(&mut group).is_empty());
        assert!(group
            .iter()
            .all(|h| h.read.run.map(|r| r.mod_revision) == Some(12)));
    }
}
