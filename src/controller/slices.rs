//! Which node gets which slice of a range: a pure decision over the nodes that exist and what a
//! NodeSlicePool already says. A node keeps its slice for as long as it exists (its pods hold
//! addresses from it); a removed node's slice becomes free; new nodes take the lowest free ones.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::ipam::slices::{slice_at, slice_count, slice_index, SliceError};
use crate::ipam::{Cidr, Intervals, Range};
use crate::k8s::crd::NodeSliceAllocation;

/// Up to this many slices, the status lists every slice, free ones with an empty node name
/// (as upstream does); beyond it (a large IPv6 range), only the assigned ones, so the object
/// stays far below the API server's size limit.
pub const LIST_ALL_LIMIT: u128 = 4096;

/// The outcome for one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub allocations: Vec<NodeSliceAllocation>,
    /// Nodes left without a slice: the range has no free slice left.
    pub unassigned: Vec<String>,
    pub total: u128,
}

/// The index of `slice` in `range`, if it is one of its slices of `size`.
fn index_of(range: &Cidr, size: u8, slice: &Cidr) -> Option<u128> {
    if slice.prefix != size || slice.network() != *slice || !range.contains(slice.addr) {
        return None;
    }
    slice_index(range, size, slice.addr)
}

/// The first slice index from `next` on that no node holds (`taken`) and that overlaps no
/// `busy` range; `total` when none is left. A busy range is passed over whole, not slice by
/// slice: it may span more slices than could ever be counted (the unsliced IPv6 pool of the
/// layout before, cut into /120s).
fn first_free(
    range: &Cidr,
    size: u8,
    (next, total): (u128, u128),
    taken: &BTreeMap<u128, String>,
    busy: &HashSet<Cidr>,
) -> u128 {
    let mut next = next;
    while next < total {
        if taken.contains_key(&next) {
            next += 1;
            continue;
        }
        let slice = slice_at(range, size, next);
        let Some(held) = busy.iter().find(|b| b.overlaps(&slice)) else {
            return next;
        };
        // The slice after the one holding the busy range's last address; none when that
        // address is past the range.
        let last = held.network().at(held.last_offset());
        next = slice_index(range, size, last)
            .and_then(|i| i.checked_add(1))
            .map_or(total, |after| after.max(next + 1));
    }
    total
}

/// Assigns slices of `range` (prefix length `size`) to `nodes`, keeping what `current` gives
/// to nodes that still exist (and that is still a slice of this range and size). A new node
/// never gets a slice overlapping `busy`: the ranges of pools that still hold addresses (pods
/// of a removed node not cleaned up yet, or of the layout before a change of range or slice
/// size), which it would hand out again.
pub fn assign(
    range: &Cidr,
    size: u8,
    nodes: &BTreeSet<String>,
    current: &[NodeSliceAllocation],
    busy: &HashSet<Cidr>,
) -> Result<Assignment, SliceError> {
    let range = range.network();
    let total = slice_count(&range, size)?;
    let mut taken: BTreeMap<u128, String> = BTreeMap::new();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    for a in current {
        if a.node_name.is_empty()
            || !nodes.contains(&a.node_name)
            || placed.contains(a.node_name.as_str())
        {
            continue;
        }
        let Some(slice) = Cidr::parse(&a.slice_range, false) else {
            continue;
        };
        if let Some(i) = index_of(&range, size, &slice) {
            if let std::collections::btree_map::Entry::Vacant(v) = taken.entry(i) {
                v.insert(a.node_name.clone());
                placed.insert(a.node_name.as_str());
            }
        }
    }
    let mut unassigned = Vec::new();
    let mut next: u128 = 0;
    for node in nodes {
        if placed.contains(node.as_str()) {
            continue;
        }
        next = first_free(&range, size, (next, total), &taken, busy);
        if next >= total {
            unassigned.push(node.clone());
            continue;
        }
        taken.insert(next, node.clone());
    }
    let entry = |i: u128, node: &str| NodeSliceAllocation {
        node_name: node.to_string(),
        slice_range: slice_at(&range, size, i).to_string(),
    };
    let allocations = if total <= LIST_ALL_LIMIT {
        (0..total)
            .map(|i| entry(i, taken.get(&i).map(String::as_str).unwrap_or("")))
            .collect()
    } else {
        taken.iter().map(|(i, node)| entry(*i, node)).collect()
    };
    Ok(Assignment {
        allocations,
        unassigned,
        total,
    })
}

/// The slices `before` gives to nodes and `after` does not give them: what a change takes from
/// its nodes (a node removed, a new layout).
pub fn withdrawn(before: &[NodeSliceAllocation], after: &[NodeSliceAllocation]) -> Vec<Cidr> {
    let given = |list: &'_ [NodeSliceAllocation]| {
        let slices = list.iter().filter(|a| !a.node_name.is_empty());
        slices
            .filter_map(|a| {
                Some((
                    a.node_name.clone(),
                    Cidr::parse(&a.slice_range, false)?.network(),
                ))
            })
            .collect::<Vec<_>>()
    };
    let kept: HashSet<(String, Cidr)> = given(after).into_iter().collect();
    let taken = given(before)
        .into_iter()
        .filter(|pair| !kept.contains(pair));
    taken.map(|(_, slice)| slice).collect()
}

/// The slices of `range` (prefix length `size`) from which a node could hand out no address of
/// `usable` (the configured range resolved), as blocks a new node passes over like busy ranges:
/// those wholly before `range_start` or after `range_end`, and the exclusions that cover whole
/// slices. A slice's pool loses its own first and last address too, as the plugin resolves it
/// (`store::kubernetes::node_slice`). Blocks, not slices: a bound far into an IPv6 range leaves
/// more slices before it than could be counted one by one.
pub fn unusable_slices(range: &Cidr, size: u8, usable: &Range) -> Vec<Cidr> {
    let range = range.network();
    let step_bits = u32::from(range.bits().saturating_sub(size));
    let span_bits = u32::from(size.saturating_sub(range.prefix));
    // A slice of fewer than four addresses has none to hand out (the plugin refuses such sizes);
    // one slice of the whole range is the range itself.
    if step_bits < 2 || span_bits == 0 || step_bits >= 128 || span_bits >= 128 {
        return Vec::new();
    }
    let step = 1u128 << step_bits;
    let total = 1u128 << span_bits;
    // What the node may not hand out: the exclusions, and all before `first` and after `last`,
    // as one set of intervals, so that a slice the bounds and an exclusion empty together is
    // found too.
    let mut blocked = usable.blocked.as_slice().to_vec();
    if usable.first > 0 {
        blocked.push((0, usable.first - 1));
    }
    if usable.last < range.last_offset() {
        blocked.push((usable.last + 1, range.last_offset()));
    }
    let blocked = Intervals::from_unsorted(blocked);
    let mut blocks = Vec::new();
    for &(a, b) in blocked.as_slice() {
        // The slices whose usable offsets (all but their first and last) lie within `a..=b`.
        let from = a.saturating_sub(1).div_ceil(step);
        let to = match b.checked_sub(step - 2) {
            Some(rest) => (rest / step + 1).min(total),
            None => 0,
        };
        if from < to {
            blocks.extend(index_blocks(&range, size, (from, to)));
        }
    }
    blocks
}

/// The slices `from..to` of `range` as the fewest CIDRs, each whole slices.
fn index_blocks(range: &Cidr, size: u8, (mut from, to): (u128, u128)) -> Vec<Cidr> {
    let mut blocks = Vec::new();
    while from < to {
        // The largest aligned run of slices that starts at `from` and ends by `to`.
        let mut bits = from.trailing_zeros().min(127);
        while bits > 0 && to - from < 1u128 << bits {
            bits -= 1;
        }
        let first = slice_at(range, size, from);
        let prefix = size.saturating_sub(u8::try_from(bits).unwrap_or(u8::MAX));
        blocks.push(Cidr {
            addr: first.addr,
            prefix: prefix.max(range.prefix),
        });
        from += 1u128 << bits;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn given(pairs: &[(&str, &str)]) -> Vec<NodeSliceAllocation> {
        let given = pairs.iter().map(|(node, slice)| NodeSliceAllocation {
            node_name: node.to_string(),
            slice_range: slice.to_string(),
        });
        given.collect()
    }

    #[test]
    fn withdrawn_slices_are_those_no_longer_given_to_their_node() {
        let cidr = |text: &str| Cidr::parse(text, false).unwrap().network();
        let before = given(&[
            ("a", "10.0.0.0/26"),
            ("b", "10.0.0.64/26"),
            // Twice in the status: the second is not the node's any more.
            ("a", "10.0.0.128/26"),
            // Written with host bits: the slice it names.
            ("c", "10.0.0.197/26"),
            ("d", "not a slice"),
            ("", "10.0.1.0/26"),
        ]);
        let after = given(&[("a", "10.0.0.0/26"), ("b", "10.0.0.64/26"), ("c", "")]);
        assert_eq!(
            withdrawn(&before, &after),
            [cidr("10.0.0.128/26"), cidr("10.0.0.192/26")]
        );
        // The same slice written otherwise is kept, not withdrawn.
        let after = given(&[
            ("a", "10.0.0.0/26"),
            ("a", "10.0.0.128/26"),
            ("c", "10.0.0.192/26"),
        ]);
        assert_eq!(withdrawn(&before, &after), [cidr("10.0.0.64/26")]);
    }

    fn none() -> HashSet<Cidr> {
        HashSet::new()
    }

    fn owner(a: &Assignment, slice: &str) -> String {
        a.allocations
            .iter()
            .find(|x| x.slice_range == slice)
            .map(|x| x.node_name.clone())
            .unwrap_or_else(|| panic!("no slice {slice}"))
    }

    #[test]
    fn join_and_leave_ipv4() {
        let range = Cidr::parse("10.0.0.0/24", false).unwrap();
        let first = assign(&range, 26, &nodes(&["a", "b"]), &[], &none()).unwrap();
        assert_eq!(first.allocations.len(), 4);
        assert_eq!(owner(&first, "10.0.0.0/26"), "a");
        assert_eq!(owner(&first, "10.0.0.64/26"), "b");
        // a leaves, c joins: b keeps its slice, c takes the lowest free one.
        let second = assign(&range, 26, &nodes(&["b", "c"]), &first.allocations, &none()).unwrap();
        assert_eq!(owner(&second, "10.0.0.64/26"), "b");
        assert_eq!(owner(&second, "10.0.0.0/26"), "c");
        assert_eq!(owner(&second, "10.0.0.128/26"), "");
        let full = assign(&range, 26, &nodes(&["a", "b", "c", "d", "e"]), &[], &none()).unwrap();
        assert_eq!(full.unassigned, vec!["e".to_string()]);
        // a's old slice still holds addresses: c gets another one, b keeps its own.
        let busy: HashSet<Cidr> = [Cidr::parse("10.0.0.0/26", false).unwrap()].into();
        let third = assign(&range, 26, &nodes(&["b", "c"]), &first.allocations, &busy).unwrap();
        assert_eq!(owner(&third, "10.0.0.128/26"), "c");
        assert_eq!(owner(&third, "10.0.0.0/26"), "");
    }

    #[test]
    fn a_changed_layout_keeps_valid_slices_and_avoids_held_addresses() {
        let old_range = Cidr::parse("10.0.0.0/24", false).unwrap();
        let before = assign(&old_range, 26, &nodes(&["a", "b"]), &[], &none()).unwrap();
        // The range grows: both nodes keep their slices.
        let grown = Cidr::parse("10.0.0.0/23", false).unwrap();
        let after = assign(
            &grown,
            26,
            &nodes(&["a", "b"]),
            &before.allocations,
            &none(),
        )
        .unwrap();
        assert_eq!(owner(&after, "10.0.0.0/26"), "a");
        assert_eq!(owner(&after, "10.0.0.64/26"), "b");
        // The slice size grows while both old pools hold addresses: the new slices avoid them.
        let busy: HashSet<Cidr> = ["10.0.0.0/26", "10.0.0.64/26"]
            .iter()
            .map(|c| Cidr::parse(c, false).unwrap())
            .collect();
        let resized = assign(&grown, 25, &nodes(&["a", "b"]), &before.allocations, &busy).unwrap();
        assert_eq!(owner(&resized, "10.0.0.0/25"), "");
        assert_eq!(owner(&resized, "10.0.0.128/25"), "a");
        assert_eq!(owner(&resized, "10.0.1.0/25"), "b");
    }

    /// A pool of the layout before may hold more slices of the new one than can be counted:
    /// an unsliced /64 cut into /120s is 2^56 of them. They are passed over at once.
    #[test]
    fn busy_ranges_are_passed_over_whole_however_many_slices_they_span() {
        let range = Cidr::parse("fd00::/64", false).unwrap();
        let busy = |cidrs: &[&str]| -> HashSet<Cidr> {
            cidrs
                .iter()
                .map(|c| Cidr::parse(c, false).unwrap())
                .collect()
        };
        let two = nodes(&["a", "b"]);
        let whole = assign(&range, 120, &two, &[], &busy(&["fd00::/64"])).unwrap();
        assert_eq!(whole.unassigned, vec!["a".to_string(), "b".to_string()]);
        let wider = assign(&range, 120, &two, &[], &busy(&["fd00::/48"])).unwrap();
        assert_eq!(wider.unassigned.len(), 2);
        let halves = busy(&["fd00::/65", "fd00::8000:0:0:0/66", "fd00::c000:0:0:100/120"]);
        let after = assign(&range, 120, &two, &[], &halves).unwrap();
        assert_eq!(owner(&after, "fd00::c000:0:0:0/120"), "a");
        assert_eq!(owner(&after, "fd00::c000:0:0:200/120"), "b");
        // A busy range smaller than a slice still keeps its whole slice from a new node.
        let v4 = Cidr::parse("10.0.0.0/24", false).unwrap();
        let small = assign(&v4, 26, &two, &[], &busy(&["10.0.0.5/32"])).unwrap();
        assert_eq!(owner(&small, "10.0.0.64/26"), "a");
        assert_eq!(owner(&small, "10.0.0.0/26"), "");
    }

    fn usable(range: &str, start: Option<&str>, end: Option<&str>, exclude: &[&str]) -> Range {
        let spec = crate::ipam::RangeSpec {
            cidr: Cidr::parse(range, false).unwrap(),
            start: start.map(|s| s.parse().unwrap()),
            end: end.map(|s| s.parse().unwrap()),
            exclude: exclude
                .iter()
                .map(|e| Cidr::parse(e, false).unwrap())
                .collect(),
        };
        Range::resolve(&spec, None).unwrap()
    }

    fn shown(blocks: &[Cidr]) -> Vec<String> {
        blocks.iter().map(Cidr::to_string).collect()
    }

    /// A new node gets a slice it can hand addresses out of: none wholly before `range_start`
    /// or after `range_end`, none wholly excluded.
    #[test]
    fn slices_without_a_usable_address_are_passed_over() {
        let range = Cidr::parse("10.0.0.0/16", false).unwrap();
        let bounded = usable("10.0.0.0/16", Some("10.0.100.0"), Some("10.0.101.255"), &[]);
        let blocks = unusable_slices(&range, 24, &bounded);
        assert_eq!(
            shown(&blocks),
            [
                "10.0.0.0/18",
                "10.0.64.0/19",
                "10.0.96.0/22",
                "10.0.102.0/23",
                "10.0.104.0/21",
                "10.0.112.0/20",
                "10.0.128.0/17"
            ]
        );
        let busy: HashSet<Cidr> = blocks.into_iter().collect();
        let plan = assign(&range, 24, &nodes(&["a", "b", "c"]), &[], &busy).unwrap();
        assert_eq!(owner(&plan, "10.0.100.0/24"), "a");
        assert_eq!(owner(&plan, "10.0.101.0/24"), "b");
        assert_eq!(plan.unassigned, ["c"]);
        // A bound on a slice's own last address (its broadcast) leaves that slice nothing.
        let edge = usable("10.0.0.0/24", Some("10.0.0.63"), None, &[]);
        assert_eq!(
            shown(&unusable_slices(
                &Cidr::parse("10.0.0.0/24", false).unwrap(),
                26,
                &edge
            )),
            ["10.0.0.0/26"]
        );
        let edge = usable("10.0.0.0/24", Some("10.0.0.62"), None, &[]);
        assert!(unusable_slices(&Cidr::parse("10.0.0.0/24", false).unwrap(), 26, &edge).is_empty());
        // Exclusions covering whole slices, and only those.
        let excluded = usable("10.0.0.0/16", None, None, &["10.0.0.0/20", "10.0.16.5/32"]);
        assert_eq!(
            shown(&unusable_slices(&range, 24, &excluded)),
            ["10.0.0.0/20"]
        );
        // A slice the bounds and an exclusion empty together, at either end.
        let start_and_exclude = usable("10.0.0.0/16", Some("10.0.0.128"), None, &["10.0.0.128/25"]);
        let blocks = unusable_slices(&range, 24, &start_and_exclude);
        assert_eq!(shown(&blocks), ["10.0.0.0/24"]);
        let exclude_and_end = usable(
            "10.0.0.0/16",
            None,
            Some("10.0.255.127"),
            &["10.0.255.0/25"],
        );
        let blocks = unusable_slices(&range, 24, &exclude_and_end);
        assert_eq!(shown(&blocks), ["10.0.255.0/24"]);
        // Far into an IPv6 range: blocks, at once.
        let v6 = Cidr::parse("fd00::/64", false).unwrap();
        let far = usable("fd00::/64", Some("fd00::8000:0:0:0"), None, &[]);
        assert_eq!(shown(&unusable_slices(&v6, 120, &far)), ["fd00::/65"]);
        // One slice of the whole range, or slices too small to hold an address: nothing.
        assert!(unusable_slices(&range, 16, &bounded).is_empty());
        assert!(unusable_slices(&range, 31, &bounded).is_empty());
    }

    #[test]
    fn ipv6_large_range_lists_assigned_only() {
        let range = Cidr::parse("fd00::/48", false).unwrap();
        let a = assign(&range, 64, &nodes(&["n1", "n2"]), &[], &none()).unwrap();
        assert_eq!(a.total, 65536);
        assert_eq!(a.allocations.len(), 2);
        assert_eq!(owner(&a, "fd00::/64"), "n1");
        assert_eq!(owner(&a, "fd00:0:0:1::/64"), "n2");
        let b = assign(&range, 64, &nodes(&["n2", "n3"]), &a.allocations, &none()).unwrap();
        assert_eq!(owner(&b, "fd00:0:0:1::/64"), "n2");
        assert_eq!(owner(&b, "fd00::/64"), "n3");
        // A slice of the wrong size or outside the range is not kept.
        let bad = vec![NodeSliceAllocation {
            node_name: "n2".into(),
            slice_range: "fd01::/64".into(),
        }];
        let c = assign(&range, 64, &nodes(&["n2"]), &bad, &none()).unwrap();
        assert_eq!(owner(&c, "fd00::/64"), "n2");
        assert!(assign(&range, 40, &nodes(&["n"]), &[], &none()).is_err());
    }
}
