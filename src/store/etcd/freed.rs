//! Freed marks: releases that do not wait for each other's cut of a shared run.
//!
//! A release cuts its offset out of the run covering it, and the cut compares the run's
//! revision. The allocations of many nodes end up in one run (merging adjacent runs ignores who
//! took them), so releases of different nodes in flight at once would all compare one key, and
//! only one of them could commit per round. Instead the cut rides in a nested transaction: when
//! the run is as read, it is cut; otherwise the release writes a mark `freed/<pool>/<offset>`
//! and leaves the run covering the offset. The record, the entries pointing at it and the
//! reservation go either way, guarded by their own revisions, so a release never loses to a
//! release of another address.
//!
//! The runs then cover exactly the allocated and the marked offsets, and no offset is both: a
//! mark is written only with the deletion of its record, and a new record's commit compares the
//! mark absent. A covered offset looks taken to every search, so a mark only keeps its address
//! out of use until a fold cuts the marked offsets out of their run and deletes the marks, in
//! one transaction comparing both. Folds happen after a release whose run holds enough marks,
//! when a pool looks full, when a static address asked for is marked, and at every reconcile
//! of the controller (`Store::free_released`).

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use rand::Rng;

use super::commit::{push_run_change, unchanged};
use super::keys::{parse_hex, range_end, Keys, Parsed};
use super::runs::{self, ReadRun};
use super::session::{floor_get, revision_of, CallFailed, Deadline, Session};

/// Marks a fold cuts out of runs at most, and a release reads back at most: a fold's commit
/// then holds at most 66 compares (the run, the marks, the new run keys) and 66 writes.
pub(super) const FOLD_CAP: usize = 32;

/// A run is folded after a release once it holds this many marks, plus a random part so that
/// the nodes releasing from one run rarely fold it at the same time.
const FOLD_AT: usize = 8;

/// The nested transaction that takes `offsets` (not empty) out of `read`, the run covering
/// them as read: a cut when the run is unchanged, otherwise a mark for each offset and the
/// read of what a fold needs ([`Marked`]).
pub(super) fn cut_or_mark(keys: &Keys, pool: &str, offsets: &[u128], read: ReadRun) -> TxnOp {
    let mut compares = vec![unchanged(
        &keys.run(pool, read.run.start),
        Some(read.mod_revision),
    )];
    let mut cut = Vec::new();
    let change = runs::release_many(offsets, read.run);
    push_run_change(keys, pool, change, &mut compares, &mut cut);
    let mut mark: Vec<TxnOp> = offsets
        .iter()
        .map(|o| TxnOp::put(keys.freed(pool, *o), "", None))
        .collect();
    let first = offsets.iter().min().copied().unwrap_or(read.run.start);
    mark.push(floor_get(&keys.runs_dir(pool), &keys.run(pool, first)));
    mark.push(marks_get(keys, pool, read.run.start, read.run.end));
    TxnOp::txn(Txn::new().when(compares).and_then(cut).or_else(mark))
}

/// The marks of `pool` from `first` to `last`, at most [`FOLD_CAP`].
fn marks_get(keys: &Keys, pool: &str, first: u128, last: u128) -> TxnOp {
    let end = match last.checked_add(1) {
        Some(next) => keys.freed(pool, next).into_bytes(),
        None => range_end(&keys.freed_dir(pool)),
    };
    let options = GetOptions::new()
        .with_range(end)
        .with_limit(FOLD_CAP as i64);
    TxnOp::get(keys.freed(pool, first), Some(options))
}

/// How a [`cut_or_mark`] went.
pub(super) enum RunAnswer {
    Cut,
    Marked(Marked),
}

/// After marking: how many offsets this release marked, the run covering them now, and
/// marks inside it (this release's among them), as the transaction read them.
pub(super) struct Marked {
    count: usize,
    run: Option<ReadRun>,
    marks: Vec<Mark>,
}

/// A mark as read: its offset and revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Mark {
    offset: u128,
    mod_revision: i64,
}

impl Mark {
    fn from_kv(kv: &KeyValue) -> Option<Mark> {
        let offset = parse_hex(std::str::from_utf8(kv.key()).ok()?)?;
        Some(Mark {
            offset,
            mod_revision: kv.mod_revision(),
        })
    }
}

/// The answer of a [`cut_or_mark`]; `None` for the answer of anything else.
pub(super) fn run_answer(answer: TxnOpResponse) -> Option<RunAnswer> {
    let TxnOpResponse::Txn(t) = answer else {
        return None;
    };
    if t.succeeded() {
        return Some(RunAnswer::Cut);
    }
    let answers = t.op_responses();
    let count = answers
        .iter()
        .filter(|r| matches!(r, TxnOpResponse::Put(_)))
        .count();
    let mut gets = answers.into_iter().rev().filter_map(|r| match r {
        TxnOpResponse::Get(mut g) => Some(g.take_kvs()),
        _ => None,
    });
    let (marks, floor) = (gets.next()?, gets.next()?);
    let run = floor.first().and_then(ReadRun::from_kv);
    let marks = marks.iter().filter_map(Mark::from_kv).collect();
    Some(RunAnswer::Marked(Marked { count, run, marks }))
}

/// What a release that committed must still do about its run: note its cut (the agent's copy
/// waits for it), or fold the run when it holds enough marks. A fold is best effort: the
/// release is done, and a mark left only keeps its address out of use until a later fold.
pub(super) fn after_release(
    s: &Session,
    dl: &Deadline,
    pool: &str,
    answer: RunAnswer,
    revision: i64,
) {
    let RunAnswer::Marked(Marked { count, run, marks }) = answer else {
        s.runs_written.note(pool, revision);
        return;
    };
    s.freed.marked(count);
    let Some(run) = run else {
        return;
    };
    let inside: Vec<Mark> = marks
        .into_iter()
        .filter(|m| run.run.start <= m.offset && m.offset <= run.run.end)
        .collect();
    let threshold = FOLD_AT + rand::rng().random_range(0..FOLD_AT);
    if inside.len() >= threshold {
        if let Err(e) = fold(s, dl, pool, run, &inside) {
            tracing::debug!(
                "etcd: folding marks of {pool} failed (harmless): {}",
                crate::store::error::chain(&e)
            );
        }
    }
}

/// The nested commit that cuts `marks` out of `run` (which covers them) and deletes them, if
/// neither changed since read.
fn fold_commit(keys: &Keys, pool: &str, run: ReadRun, marks: &[Mark]) -> TxnOp {
    let mut compares = vec![unchanged(
        &keys.run(pool, run.run.start),
        Some(run.mod_revision),
    )];
    let mut ops = Vec::new();
    push_marks_deleted(keys, pool, marks, &mut compares, &mut ops);
    let offsets: Vec<u128> = marks.iter().map(|m| m.offset).collect();
    let change = runs::release_many(&offsets, run.run);
    push_run_change(keys, pool, change, &mut compares, &mut ops);
    TxnOp::txn(Txn::new().when(compares).and_then(ops))
}

/// Folds `marks` into `run`, one transaction.
fn fold(
    s: &Session,
    dl: &Deadline,
    pool: &str,
    run: ReadRun,
    marks: &[Mark],
) -> Result<(), CallFailed> {
    let commit = fold_commit(&s.keys, pool, run, marks);
    commit_folds(s, dl, pool, vec![(commit, marks.len())], None).map(drop)
}

/// Folds the marks of `pool` (see [`fold_pages`]). Whether there were marks: the addresses they
/// held back may be free now. For a pool that looks full, or a static address that is marked.
pub(super) fn fold_pool(s: &Session, dl: &Deadline, pool: &str) -> Result<bool, CallFailed> {
    Ok(fold_pages(s, dl, pool)?.found)
}

/// Folds every mark under the prefix, pool by pool, [`FOLD_CAP`] at a time, as one scan found
/// them: how many. For the controller's reconcile: marks below their run's fold threshold
/// otherwise wait for a later release in the run, a full pool or a static address asked for.
pub(super) fn fold_everywhere(s: &Session, dl: &Deadline) -> Result<usize, CallFailed> {
    let root = s.keys.freed_root();
    let mut by_pool: BTreeMap<String, Vec<Mark>> = BTreeMap::new();
    s.scan(dl, &root, |kv| {
        let parsed = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| s.keys.parse(k));
        if let (Some(Parsed::Freed { pool, .. }), Some(mark)) = (parsed, Mark::from_kv(&kv)) {
            by_pool.entry(pool).or_default().push(mark);
        }
    })?;
    let mut folded = 0;
    for (pool, marks) in by_pool {
        for page in marks.chunks(FOLD_CAP) {
            folded += fold_marks(s, dl, &pool, page)?;
        }
    }
    Ok(folded)
}

/// What [`fold_pages`] found and did.
struct Folded {
    found: bool,
    folded: usize,
}

/// Folds the marks of `pool`, a page of [`FOLD_CAP`] at a time, until none is left, a page folds
/// nothing (another writer changed those runs: whoever asked sees what it did on its next
/// attempt) or the deadline passes.
fn fold_pages(s: &Session, dl: &Deadline, pool: &str) -> Result<Folded, CallFailed> {
    let mut done = Folded {
        found: false,
        folded: 0,
    };
    while !dl.passed() {
        match fold_page(s, dl, pool)? {
            Some(folded) if folded > 0 => {
                done.found = true;
                done.folded += folded;
            }
            Some(_) => {
                done.found = true;
                break;
            }
            None => break,
        }
    }
    Ok(done)
}

/// Folds the first [`FOLD_CAP`] marks of `pool` into their runs: how many were folded, `None`
/// when there were none.
fn fold_page(s: &Session, dl: &Deadline, pool: &str) -> Result<Option<usize>, CallFailed> {
    let dir = s.keys.freed_dir(pool);
    let options = GetOptions::new()
        .with_range(range_end(&dir))
        .with_limit(FOLD_CAP as i64);
    let page = s.get(dl, "freed marks read", dir, Some(options))?;
    let marks: Vec<Mark> = page.kvs().iter().filter_map(Mark::from_kv).collect();
    if marks.is_empty() {
        return Ok(None);
    }
    fold_marks(s, dl, pool, &marks).map(Some)
}

/// Folds `marks` of `pool` (as read, at most [`FOLD_CAP`]) into the runs covering them: one
/// read of those runs and one transaction. How many were folded.
fn fold_marks(s: &Session, dl: &Deadline, pool: &str, marks: &[Mark]) -> Result<usize, CallFailed> {
    let floors = marks
        .iter()
        .map(|m| floor_get(&s.keys.runs_dir(pool), &s.keys.run(pool, m.offset)))
        .collect();
    let floors = s.reads(dl, "freed marks read", floors)?;
    let (by_run, orphans) = marks_by_run(marks, floors);
    let commits: Vec<(TxnOp, usize)> = by_run
        .iter()
        .map(|(run, marks)| (fold_commit(&s.keys, pool, *run, marks), marks.len()))
        .collect();
    let orphans =
        (!orphans.is_empty()).then(|| (orphans_deleted(&s.keys, pool, &orphans), orphans.len()));
    commit_folds(s, dl, pool, commits, orphans)
}

/// Sends the fold `commits` of `pool` (each with how many marks it deletes), and the deletion
/// of marks no run covers, in one transaction: how many marks the commits that applied
/// deleted.
fn commit_folds(
    s: &Session,
    dl: &Deadline,
    pool: &str,
    commits: Vec<(TxnOp, usize)>,
    orphans: Option<(TxnOp, usize)>,
) -> Result<usize, CallFailed> {
    let folds = commits.len();
    let (commits, sizes): (Vec<TxnOp>, Vec<usize>) = commits.into_iter().chain(orphans).unzip();
    let resp = s.txn(dl, "fold of freed marks", Txn::new().and_then(commits))?;
    let (mut folded, mut runs_changed) = (0, false);
    for (i, (size, answer)) in sizes.into_iter().zip(resp.op_responses()).enumerate() {
        if matches!(answer, TxnOpResponse::Txn(t) if t.succeeded()) {
            folded += size;
            runs_changed |= i < folds;
        }
    }
    // Only a fold writes runs: an agent's copy waits to show the revision noted here, and
    // never would for a deletion of marks alone.
    if runs_changed {
        s.runs_written.note(pool, revision_of(&resp));
    }
    if folded > 0 {
        s.freed.folded(folded);
    }
    Ok(folded)
}

/// Marks grouped by the run covering them, and the marks no run covers.
type Grouped = (Vec<(ReadRun, Vec<Mark>)>, Vec<Mark>);

/// The marks grouped by the run covering each (`floors`: the run at or before each mark, one
/// answer per mark), and the marks no run covers.
fn marks_by_run(marks: &[Mark], floors: Vec<Vec<KeyValue>>) -> Grouped {
    let mut by_run: BTreeMap<u128, (ReadRun, Vec<Mark>)> = BTreeMap::new();
    let mut orphans = Vec::new();
    for (m, floor) in marks.iter().zip(floors) {
        let run = floor.first().and_then(ReadRun::from_kv);
        match run.filter(|r| r.run.start <= m.offset && m.offset <= r.run.end) {
            Some(run) => by_run
                .entry(run.run.start)
                .or_insert((run, Vec::new()))
                .1
                .push(*m),
            None => orphans.push(*m),
        }
    }
    (by_run.into_values().collect(), orphans)
}

/// The nested commit deleting marks that no run covers, as read. No release writes one so;
/// left, they would hold up every fold of the pool at the start of its marks.
fn orphans_deleted(keys: &Keys, pool: &str, orphans: &[Mark]) -> TxnOp {
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    push_marks_deleted(keys, pool, orphans, &mut compares, &mut ops);
    TxnOp::txn(Txn::new().when(compares).and_then(ops))
}

/// The compares and deletes of `marks`, each as read.
fn push_marks_deleted(
    keys: &Keys,
    pool: &str,
    marks: &[Mark],
    compares: &mut Vec<Compare>,
    ops: &mut Vec<TxnOp>,
) {
    for m in marks {
        let key = keys.freed(pool, m.offset);
        compares.push(Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            m.mod_revision,
        ));
        ops.push(TxnOp::delete(key, None));
    }
}
