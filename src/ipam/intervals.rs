//! Sets of offsets kept as sorted, disjoint, merged closed intervals.
//!
//! Both the blocked part of a range (exclusions, gateway) and the allocated part of a pool
//! held in memory are interval sets: their size follows how fragmented they are, not how many
//! addresses they cover, so a /8 that is 90% full costs no more to search than a /24.

use std::collections::BTreeMap;

/// An immutable set of closed intervals, sorted and merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intervals(Vec<(u128, u128)>);

impl Intervals {
    /// Builds the set from intervals in any order, overlapping or not.
    pub fn from_unsorted(mut items: Vec<(u128, u128)>) -> Intervals {
        items.retain(|(a, b)| a <= b);
        items.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(items.len());
        for (start, end) in items {
            match merged.last_mut() {
                Some(last) if last.1 == u128::MAX || start <= last.1 + 1 => {
                    last.1 = last.1.max(end);
                }
                _ => merged.push((start, end)),
            }
        }
        Intervals(merged)
    }

    /// The end of the interval containing `offset`, if any.
    pub fn covering(&self, offset: u128) -> Option<u128> {
        let idx = self.0.partition_point(|(start, _)| *start <= offset);
        let (_, end) = *self.0.get(idx.checked_sub(1)?)?;
        (end >= offset).then_some(end)
    }

    pub fn contains(&self, offset: u128) -> bool {
        self.covering(offset).is_some()
    }

    /// How many offsets of `[first, last]` the set covers.
    pub fn count_within(&self, first: u128, last: u128) -> u128 {
        self.0
            .iter()
            .filter(|(a, b)| *b >= first && *a <= last)
            .map(|(a, b)| (*b).min(last) - (*a).max(first) + 1)
            .sum()
    }

    pub fn as_slice(&self) -> &[(u128, u128)] {
        &self.0
    }
}

/// A mutable set of allocated offsets stored as maximal runs (start -> end).
/// Lookups and updates are O(log runs).
#[derive(Clone, Debug, Default)]
pub struct OffsetRuns {
    runs: BTreeMap<u128, u128>,
    len: u128,
}

impl OffsetRuns {
    pub fn new() -> OffsetRuns {
        OffsetRuns::default()
    }

    /// Number of offsets held.
    pub fn len(&self) -> u128 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of runs (a measure of fragmentation).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// The end of the run containing `offset`, if `offset` is held.
    pub fn run_containing(&self, offset: u128) -> Option<u128> {
        let (_, end) = self.runs.range(..=offset).next_back()?;
        (*end >= offset).then_some(*end)
    }

    pub fn contains(&self, offset: u128) -> bool {
        self.run_containing(offset).is_some()
    }

    /// Adds `offset`; returns false if it was already held.
    pub fn insert(&mut self, offset: u128) -> bool {
        if self.contains(offset) {
            return false;
        }
        let mut start = offset;
        let mut end = offset;
        if let Some(prev) = offset.checked_sub(1) {
            if let Some((&s, &e)) = self.runs.range(..=prev).next_back() {
                if e == prev {
                    start = s;
                }
            }
        }
        if let Some(next) = offset.checked_add(1) {
            if let Some(e) = self.runs.remove(&next) {
                end = e;
            }
        }
        self.runs.insert(start, end);
        self.len += 1;
        true
    }

    /// Removes `offset`; returns false if it was not held.
    pub fn remove(&mut self, offset: u128) -> bool {
        let Some((&start, &end)) = self.runs.range(..=offset).next_back() else {
            return false;
        };
        if end < offset {
            return false;
        }
        self.runs.remove(&start);
        if start < offset {
            self.runs.insert(start, offset - 1);
        }
        if offset < end {
            self.runs.insert(offset + 1, end);
        }
        self.len -= 1;
        true
    }

    /// The held offsets in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u128> + '_ {
        self.runs.iter().flat_map(|(s, e)| *s..=*e)
    }
}

impl FromIterator<u128> for OffsetRuns {
    fn from_iter<T: IntoIterator<Item = u128>>(iter: T) -> Self {
        let mut runs = OffsetRuns::new();
        for offset in iter {
            runs.insert(offset);
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_cover() {
        let set = Intervals::from_unsorted(vec![(8, 9), (0, 3), (6, 7), (4, 5), (20, 10)]);
        assert_eq!(set.as_slice(), &[(0, 9)]);
        assert_eq!(set.covering(5), Some(9));
        assert_eq!(set.covering(10), None);
        let top = Intervals::from_unsorted(vec![(u128::MAX - 1, u128::MAX), (0, 0)]);
        assert_eq!(top.covering(u128::MAX), Some(u128::MAX));
        assert_eq!(top.count_within(0, u128::MAX), 3);
    }

    #[test]
    fn runs_merge_and_split() {
        let mut runs = OffsetRuns::new();
        for o in [1, 3, 2, 5] {
            assert!(runs.insert(o));
        }
        assert!(!runs.insert(2));
        assert_eq!(runs.run_count(), 2);
        assert_eq!(runs.run_containing(1), Some(3));
        assert!(runs.remove(2));
        assert_eq!(runs.run_containing(1), Some(1));
        assert_eq!(runs.run_containing(3), Some(3));
        assert!(!runs.remove(2));
        assert_eq!(runs.len(), 3);
        assert_eq!(runs.iter().collect::<Vec<_>>(), vec![1, 3, 5]);
        let mut edge = OffsetRuns::new();
        assert!(edge.insert(u128::MAX));
        assert!(edge.insert(0));
        assert!(edge.remove(u128::MAX));
        assert_eq!(edge.len(), 1);
    }
}
