//! Runs: the allocated offsets of a pool, kept as a partition into intervals, one key per
//! interval (`r/<start>` -> `<end>`). The run holding an offset is one descending range read
//! away, so finding the lowest free address costs one read per few runs crossed, however many
//! allocations the pool holds.
//!
//! An allocation never touches an existing run: it creates the run `[x, x]` (a key that must
//! not exist), so two writers taking different addresses never conflict. Runs left adjacent
//! that way are merged later by [`compact`], in a transaction of its own that may fail
//! harmlessly. The runs must never overlap and must cover exactly the allocated offsets and the
//! offsets marked freed (`freed`), which every change guarantees by committing with the
//! allocation, the release, the marks it folds or the revisions of the runs it merges.

use etcd_client::KeyValue;

use super::keys::parse_hex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u128,
    pub end: u128,
}

/// A run as read, with the revision the commit must still find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRun {
    pub run: Run,
    pub mod_revision: i64,
}

impl ReadRun {
    /// The run stored in `kv`, if it is well formed.
    pub fn from_kv(kv: &KeyValue) -> Option<ReadRun> {
        ReadRun::from_parts(kv.key(), kv.value(), kv.mod_revision())
    }

    /// The run stored under `key` with `value`, as read or as the agent's copy holds it.
    pub fn from_parts(key: &[u8], value: &[u8], mod_revision: i64) -> Option<ReadRun> {
        let start = parse_hex(std::str::from_utf8(key).ok()?)?;
        let end = parse_hex(std::str::from_utf8(value).ok()?)?;
        (end >= start).then_some(ReadRun {
            run: Run { start, end },
            mod_revision,
        })
    }
}

/// How the run keys change with one allocation or release.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunChange {
    /// Runs to write; `true` marks a key that must not exist yet.
    pub puts: Vec<(Run, bool)>,
    /// Starts of runs to delete.
    pub deletes: Vec<u128>,
}

/// Taking `offset`: a run of its own, which must not exist yet.
pub fn take(offset: u128) -> RunChange {
    RunChange {
        puts: vec![(
            Run {
                start: offset,
                end: offset,
            },
            true,
        )],
        deletes: Vec::new(),
    }
}

/// Adjacent runs among those a search walked over, grouped into chains that can be merged:
/// sorted, each chain at least two runs long, at most `cap` runs in all (a transaction has a
/// bounded number of operations).
pub fn chains(walked: &[ReadRun], cap: usize) -> Vec<Vec<ReadRun>> {
    let mut sorted = walked.to_vec();
    sorted.sort_by_key(|r| r.run.start);
    sorted.dedup_by_key(|r| r.run.start);
    let mut chains: Vec<Vec<ReadRun>> = Vec::new();
    let mut current: Vec<ReadRun> = Vec::new();
    for r in sorted {
        let adjacent = current
            .last()
            .is_some_and(|prev| prev.run.end.checked_add(1) == Some(r.run.start));
        if !adjacent && current.len() >= 2 {
            chains.push(std::mem::take(&mut current));
        } else if !adjacent {
            current.clear();
        }
        current.push(r);
    }
    if current.len() >= 2 {
        chains.push(current);
    }
    let mut budget = cap;
    chains
        .into_iter()
        .filter_map(|mut c| {
            if budget < 2 {
                return None;
            }
            c.truncate(budget);
            budget -= c.len();
            Some(c)
        })
        .collect()
}

/// Merging a chain of adjacent runs into one.
pub fn compact(chain: &[Run]) -> RunChange {
    let mut change = RunChange::default();
    if let (Some(first), Some(last)) = (chain.first(), chain.last()) {
        change.puts.push((
            Run {
                start: first.start,
                end: last.end,
            },
            false,
        ));
        change.deletes.extend(chain.iter().skip(1).map(|r| r.start));
    }
    change
}

/// Releasing `offset` from `run`, which contains it: shrink or split the run.
pub fn release(offset: u128, run: Run) -> RunChange {
    release_many(&[offset], run)
}

/// Releasing `offsets` (each in `run`) from `run` at once: what is left of it, as runs. The
/// run keeps its key while its first offset stays; every other run left is a new key.
pub fn release_many(offsets: &[u128], run: Run) -> RunChange {
    let mut sorted = offsets.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut change = RunChange::default();
    let mut left = Vec::new();
    let mut next = Some(run.start);
    for &offset in &sorted {
        match next {
            Some(from) if from < offset => left.push(Run {
                start: from,
                end: offset - 1,
            }),
            _ => {}
        }
        next = offset.checked_add(1);
    }
    if let Some(from) = next.filter(|from| *from <= run.end) {
        left.push(Run {
            start: from,
            end: run.end,
        });
    }
    if left.first().is_none_or(|first| first.start != run.start) {
        change.deletes.push(run.start);
    }
    for r in left {
        change.puts.push((r, r.start != run.start));
    }
    change
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u128, end: u128) -> Run {
        Run { start, end }
    }

    #[test]
    fn release_shrinks_or_splits() {
        assert_eq!(
            release(5, r(5, 5)),
            RunChange {
                puts: vec![],
                deletes: vec![5]
            }
        );
        assert_eq!(
            release(5, r(5, 9)),
            RunChange {
                puts: vec![(r(6, 9), true)],
                deletes: vec![5]
            }
        );
        assert_eq!(
            release(9, r(5, 9)),
            RunChange {
                puts: vec![(r(5, 8), false)],
                deletes: vec![]
            }
        );
        assert_eq!(
            release(7, r(5, 9)),
            RunChange {
                puts: vec![(r(5, 6), false), (r(8, 9), true)],
                deletes: vec![]
            }
        );
    }

    #[test]
    fn releasing_many_at_once_leaves_the_rest_of_the_run() {
        assert_eq!(
            release_many(&[5, 9], r(5, 9)),
            RunChange {
                puts: vec![(r(6, 8), true)],
                deletes: vec![5]
            }
        );
        assert_eq!(
            release_many(&[8, 6], r(5, 9)),
            RunChange {
                puts: vec![(r(5, 5), false), (r(7, 7), true), (r(9, 9), true)],
                deletes: vec![]
            }
        );
        assert_eq!(
            release_many(&[5, 6, 7], r(5, 7)),
            RunChange {
                puts: vec![],
                deletes: vec![5]
            }
        );
        let top = u128::MAX;
        assert_eq!(
            release_many(&[top], r(top - 1, top)),
            RunChange {
                puts: vec![(r(top - 1, top - 1), false)],
                deletes: vec![]
            }
        );
    }

    #[test]
    fn chains_group_adjacent_runs_and_compaction_merges_them() {
        let rr = |start, end| ReadRun {
            run: r(start, end),
            mod_revision: 1,
        };
        let walked = [
            rr(1, 3),
            rr(4, 4),
            rr(5, 9),
            rr(11, 12),
            rr(13, 13),
            rr(20, 20),
        ];
        let c = chains(&walked, 64);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].len(), 3);
        assert_eq!(c[1].len(), 2);
        let runs: Vec<Run> = c[0].iter().map(|x| x.run).collect();
        assert_eq!(
            compact(&runs),
            RunChange {
                puts: vec![(r(1, 9), false)],
                deletes: vec![4, 5],
            }
        );
        assert_eq!(chains(&walked, 3).iter().map(Vec::len).sum::<usize>(), 3);
    }

    /// The runs of a pool in a model of its keys: start to end.
    type Runs = std::collections::BTreeMap<u128, u128>;

    fn apply(runs: &mut Runs, c: RunChange) {
        for d in c.deletes {
            runs.remove(&d);
        }
        for (run, fresh) in c.puts {
            assert!(!fresh || !runs.contains_key(&run.start));
            runs.insert(run.start, run.end);
        }
    }

    /// Merges every chain of adjacent runs, as searches crossing them do.
    fn compact_all(runs: &mut Runs) {
        let walked: Vec<ReadRun> = runs
            .iter()
            .map(|(s, e)| ReadRun {
                run: r(*s, *e),
                mod_revision: 0,
            })
            .collect();
        for chain in chains(&walked, 8) {
            let chain: Vec<Run> = chain.iter().map(|c| c.run).collect();
            apply(runs, compact(&chain));
        }
    }

    /// The next of a sequence of pseudo-random numbers (a fixed sequence for every run).
    fn next(x: &mut u64) -> u64 {
        *x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x
    }

    /// The run covering `o`, if one does.
    fn covering(runs: &Runs, o: u128) -> Option<Run> {
        let (s, e) = runs.range(..=o).next_back()?;
        (o <= *e).then_some(r(*s, *e))
    }

    fn covered(runs: &Runs) -> Vec<u128> {
        runs.iter().flat_map(|(s, e)| *s..=*e).collect()
    }

    /// Any sequence of takes, releases and compactions keeps the runs an exact partition.
    #[test]
    fn runs_stay_a_partition() {
        let mut runs = Runs::new();
        let mut held = std::collections::BTreeSet::new();
        let mut x: u64 = 7;
        for _ in 0..2000 {
            let o = u128::from((next(&mut x) >> 33) % 64) + 1;
            if held.contains(&o) {
                let run = covering(&runs, o).expect("a held offset is in a run");
                apply(&mut runs, release(o, run));
                held.remove(&o);
            } else {
                apply(&mut runs, take(o));
                held.insert(o);
            }
            if x.is_multiple_of(3) {
                compact_all(&mut runs);
            }
            assert_eq!(covered(&runs), held.iter().copied().collect::<Vec<_>>());
        }
    }

    /// With releases that mark their offset instead of cutting it (`freed`), and folds that cut
    /// the marks of a run out of it all at once, the runs cover exactly the held and the marked
    /// offsets, and an offset is never both.
    #[test]
    fn runs_stay_a_partition_of_held_and_marked_offsets() {
        use std::collections::BTreeSet;
        let mut runs = Runs::new();
        let (mut held, mut marked) = (BTreeSet::new(), BTreeSet::new());
        let mut x: u64 = 11;
        for _ in 0..4000 {
            let o = u128::from((next(&mut x) >> 33) % 64) + 1;
            let run = covering(&runs, o);
            if held.contains(&o) && x % 5 < 3 {
                held.remove(&o);
                marked.insert(o);
            } else if held.contains(&o) {
                apply(
                    &mut runs,
                    release(o, run.expect("a held offset is in a run")),
                );
                held.remove(&o);
            } else if marked.contains(&o) {
                // A fold of every mark of the run covering `o`.
                let run = run.expect("a marked offset is in a run");
                let folded: Vec<u128> = marked.range(run.start..=run.end).copied().collect();
                apply(&mut runs, release_many(&folded, run));
                for m in &folded {
                    marked.remove(m);
                }
            } else {
                apply(&mut runs, take(o));
                held.insert(o);
            }
            if x.is_multiple_of(3) {
                compact_all(&mut runs);
            }
            let expected: Vec<u128> = held.union(&marked).copied().collect();
            assert_eq!(covered(&runs), expected);
            assert!(held.is_disjoint(&marked));
        }
    }
}
