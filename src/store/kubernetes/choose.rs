//! Which free address an ADD tries.
//!
//! The first try is the lowest free address, as everywhere else. Every contender of a burst on
//! other machines reads the same pool, though, so after losing a reservation race an ADD does
//! not chase the next-lowest address (the losers would all meet again, and the requests of a
//! burst would grow with the square of its size): it takes one of the lowest [`SPREAD`] free
//! addresses, picked by a hash of its container ID and interface, so contenders rarely meet
//! twice, and a repeated ADD of the same attachment lands where it landed before.

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::ipam::{OffsetRuns, Range};
use crate::store::Attachment;

/// How many of the lowest free addresses an ADD chooses among.
pub const SPREAD: usize = 128;

/// A stable seed for the attachment.
pub fn seed(who: &Attachment, salt: u32) -> u64 {
    let mut hasher = DefaultHasher::new();
    who.container_id.hash(&mut hasher);
    who.ifname.hash(&mut hasher);
    salt.hash(&mut hasher);
    hasher.finish()
}

/// The lowest `limit` usable offsets that are neither in `taken` nor in `avoid`, ascending.
pub fn lowest_free_n(
    range: &Range,
    taken: &OffsetRuns,
    avoid: &BTreeSet<u128>,
    limit: usize,
) -> Vec<u128> {
    let mut found = Vec::with_capacity(limit.min(64));
    // Everything below `floor` counts as taken, so each search resumes after the last find.
    let mut floor = range.first;
    while found.len() < limit {
        let next = range.lowest_free(|offset| -> Result<Option<u128>, ()> {
            if offset < floor {
                return Ok(Some(floor - 1));
            }
            if let Some(end) = taken.run_containing(offset) {
                return Ok(Some(end));
            }
            Ok(avoid.contains(&offset).then_some(offset))
        });
        match next {
            Ok(Some(offset)) => {
                found.push(offset);
                match offset.checked_add(1) {
                    Some(after) => floor = after,
                    None => break,
                }
            }
            _ => break,
        }
    }
    found
}

/// The offset to try: the lowest free one, or with `spread` one of the lowest [`SPREAD`] free
/// ones by `seed`; None when full.
pub fn candidate(
    range: &Range,
    taken: &OffsetRuns,
    avoid: &BTreeSet<u128>,
    seed: u64,
    spread: bool,
) -> Option<u128> {
    let free = lowest_free_n(range, taken, avoid, if spread { SPREAD } else { 1 });
    if free.is_empty() {
        return None;
    }
    free.get((seed % free.len() as u64) as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{parse_range_text, RangeSpec};

    fn range(text: &str) -> Range {
        let (cidr, start, end) = parse_range_text(text).unwrap();
        Range::resolve(
            &RangeSpec {
                cidr,
                start,
                end,
                exclude: vec![],
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn skips_taken_and_avoided() {
        let r = range("10.0.0.0/29");
        let taken: OffsetRuns = [1u128, 2, 4].into_iter().collect();
        let avoid: BTreeSet<u128> = [5u128].into_iter().collect();
        assert_eq!(lowest_free_n(&r, &taken, &avoid, 10), vec![3, 6]);
        let full: OffsetRuns = (1u128..=6).collect();
        assert_eq!(candidate(&r, &full, &avoid, 7, true), None);
        // The first try is the lowest free address, whatever the seed.
        for seed in 0..8 {
            assert_eq!(candidate(&r, &taken, &avoid, seed, false), Some(3));
        }
        // After a lost race, the seed spreads contenders over the lowest free addresses.
        let spread: BTreeSet<u128> = (0..64)
            .filter_map(|seed| candidate(&r, &taken, &avoid, seed, true))
            .collect();
        assert_eq!(spread, [3u128, 6].into_iter().collect());
    }

    #[test]
    fn huge_ranges_are_cheap() {
        let r = range("fd00::/64");
        let taken: OffsetRuns = (1u128..=1000).collect();
        let free = lowest_free_n(&r, &taken, &BTreeSet::new(), SPREAD);
        assert_eq!(free.len(), SPREAD);
        assert_eq!(free[0], 1001);
    }
}
