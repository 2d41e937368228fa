//! Runs: the allocated offsets of a pool, kept as a partition into intervals, one key per
//! interval (`r/<start>` -> `<end>`). The run holding an offset is one descending range read
//! away, so finding the lowest free address costs one read per run crossed, however many
//! allocations the pool holds. Runs need not be maximal (two adjacent runs are fine when
//! concurrent writers each made one); they must never overlap and must cover exactly the
//! allocated offsets, which every change guarantees by committing with the allocation itself.

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
        let start = parse_hex(std::str::from_utf8(kv.key()).ok()?)?;
        let end = parse_hex(std::str::from_utf8(kv.value()).ok()?)?;
        (end >= start).then_some(ReadRun {
            run: Run { start, end },
            mod_revision: kv.mod_revision(),
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

/// Taking `offset`: extend `left` (the run ending at `offset - 1`, if any) or start a new run,
/// and absorb `right` (the run starting at `offset + 1`, if any).
pub fn take(offset: u128, left: Option<Run>, right: Option<Run>) -> RunChange {
    let end = right.map_or(offset, |r| r.end);
    let mut change = RunChange::default();
    match left {
        Some(l) => change.puts.push((
            Run {
                start: l.start,
                end,
            },
            false,
        )),
        None => change.puts.push((Run { start: offset, end }, true)),
    }
    if let Some(r) = right {
        change.deletes.push(r.start);
    }
    change
}

/// Releasing `offset` from `run`, which contains it: shrink or split the run.
pub fn release(offset: u128, run: Run) -> RunChange {
    let mut change = RunChange::default();
    if offset > run.start {
        change.puts.push((
            Run {
                start: run.start,
                end: offset - 1,
            },
            false,
        ));
    } else {
        change.deletes.push(run.start);
    }
    if offset < run.end {
        change.puts.push((
            Run {
                start: offset + 1,
                end: run.end,
            },
            true,
        ));
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
    fn take_extends_merges_or_starts() {
        assert_eq!(
            take(5, None, None),
            RunChange {
                puts: vec![(r(5, 5), true)],
                deletes: vec![]
            }
        );
        assert_eq!(
            take(5, Some(r(1, 4)), None),
            RunChange {
                puts: vec![(r(1, 5), false)],
                deletes: vec![]
            }
        );
        assert_eq!(
            take(5, Some(r(1, 4)), Some(r(6, 9))),
            RunChange {
                puts: vec![(r(1, 9), false)],
                deletes: vec![6]
            }
        );
        assert_eq!(
            take(5, None, Some(r(6, 9))),
            RunChange {
                puts: vec![(r(5, 9), true)],
                deletes: vec![6]
            }
        );
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

    /// Any sequence of takes and releases keeps the runs an exact partition.
    #[test]
    fn runs_stay_a_partition() {
        use std::collections::BTreeMap;
        let mut runs: BTreeMap<u128, u128> = BTreeMap::new();
        let mut held = std::collections::BTreeSet::new();
        let apply = |runs: &mut BTreeMap<u128, u128>, c: RunChange| {
            for d in c.deletes {
                runs.remove(&d);
            }
            for (run, fresh) in c.puts {
                assert!(!fresh || !runs.contains_key(&run.start));
                runs.insert(run.start, run.end);
            }
        };
        let mut x: u64 = 7;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let o = u128::from((x >> 33) % 64) + 1;
            let floor = runs.range(..=o).next_back().map(|(s, e)| r(*s, *e));
            if held.contains(&o) {
                let run = floor.expect("a held offset is in a run");
                apply(&mut runs, release(o, run));
                held.remove(&o);
            } else {
                let left = floor.filter(|f| f.end + 1 == o);
                let right = runs.get(&(o + 1)).map(|e| r(o + 1, *e));
                apply(&mut runs, take(o, left, right));
                held.insert(o);
            }
            let covered: Vec<u128> = runs.iter().flat_map(|(s, e)| *s..=*e).collect();
            assert_eq!(covered, held.iter().copied().collect::<Vec<_>>());
        }
    }
}
