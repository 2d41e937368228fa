//! The allocation decision: what one range of an ADD does, given what the engine read.
//!
//! Every engine asks this one function, so they all answer a request the same way:
//! - the owner (same pod and interface, or same container and interface) already holds an
//!   address here and asks for nothing in particular, or for that address: **keep** it (a
//!   repeated ADD, or a pod re-created with a new container ID);
//! - it asks for a static address held by someone else (in this pool, or through an overlapping
//!   range of the same network): **in use**;
//! - it asks for a static address it does not hold yet while holding another here: **move**
//!   (take the new one, release the old ones, in one commit);
//! - otherwise **take** the lowest free address, or report the range **exhausted**.
//! - an offset at or beyond the ask's [`Ask::limit`] is never handed out: a static request for
//!   one is **beyond the limit**, and the search stops below it.
//!
//! Spreading over several free addresses is never triggered by what the pool holds: only by an
//! explicit [`Contention`] hint, which an engine gives after it lost a race to a concurrent
//! writer. An address held through an overlapping range is simply taken, and skipped.
//!
//! The snapshot is a trait rather than a value: a pool may hold millions of entries, so engines
//! answer the few questions the search asks from their transaction (SQLite) or from reads whose
//! revisions their commit compares (etcd, Kubernetes). The decision itself does no I/O, keeps no
//! state and writes nothing.

use super::range::Range;

/// What one range of an ADD asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// A static address, as an offset of the range's network.
    pub requested: Option<u128>,
    pub contention: Contention,
    /// Offsets at or beyond this are never handed out (what the owner holds already is kept).
    /// The Kubernetes engine sets it while a Go binary may rewrite the pool: the Go binary reads
    /// a pool's keys as signed 64-bit numbers and drops the others from every pool it writes,
    /// which would lose the allocation and free its address for a second pod.
    pub limit: Option<u128>,
}

/// The first offset a Go binary cannot keep in a pool: keys are signed 64-bit numbers there.
pub const GO_OFFSET_LIMIT: u128 = 1 << 63;

/// How the dynamic search starts. Only an engine that lost a race gives anything but `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Contention {
    /// Lowest free first.
    #[default]
    None,
    /// The lowest free address at or after this offset, else the lowest free one: after losing
    /// an address, start a random distance past it so contenders stop meeting.
    StartAt(u128),
    /// One of the lowest `among` free addresses, chosen by `seed`: contenders that read the same
    /// pool rarely choose the same one.
    Spread { seed: u64, among: usize },
}

/// What the engine read of one pool, answered on demand.
pub trait Snapshot {
    /// Who holds an address, as the engine describes it.
    type Holder;
    type Error;

    /// The offsets of this pool held by the asking owner, lowest first.
    fn owned(&mut self) -> Result<Vec<u128>, Self::Error>;

    /// Who other than the asking owner holds `offset`: an entry of this pool, or a reservation
    /// through an overlapping range of the same network.
    fn holder(&mut self, offset: u128) -> Result<Option<Self::Holder>, Self::Error>;

    /// `Some(end)` when `offset` is taken (here, or through an overlapping range), `end` being
    /// the last offset of the taken block that contains it (`offset` at the least).
    fn taken_until(&mut self, offset: u128) -> Result<Option<u128>, Self::Error>;
}

/// What to commit for one range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<H> {
    /// The owner holds `offset` already: keep it (refreshing the container ID); anything else it
    /// holds in this pool is released (one address per range).
    Keep { offset: u128, release: Vec<u128> },
    /// Take the free `offset`.
    Take { offset: u128 },
    /// Take the free static `to` and release what the owner held here, in one commit.
    Move { to: u128, release: Vec<u128> },
    /// The static address asked for is held by `holder`.
    InUse { offset: u128, holder: H },
    /// The static address asked for is at or beyond the ask's limit.
    BeyondLimit { offset: u128 },
    /// No free address is left.
    Exhausted,
}

impl<H> Decision<H> {
    /// The same decision with its holder (of `InUse`) turned into another form.
    pub fn map_holder<G>(self, f: impl FnOnce(H) -> G) -> Decision<G> {
        match self {
            Decision::Keep { offset, release } => Decision::Keep { offset, release },
            Decision::Take { offset } => Decision::Take { offset },
            Decision::Move { to, release } => Decision::Move { to, release },
            Decision::InUse { offset, holder } => Decision::InUse {
                offset,
                holder: f(holder),
            },
            Decision::BeyondLimit { offset } => Decision::BeyondLimit { offset },
            Decision::Exhausted => Decision::Exhausted,
        }
    }

    /// The offset the owner holds once this decision is committed.
    pub fn offset(&self) -> Option<u128> {
        match self {
            Decision::Keep { offset, .. } | Decision::Take { offset } => Some(*offset),
            Decision::Move { to, .. } => Some(*to),
            Decision::InUse { .. } | Decision::BeyondLimit { .. } | Decision::Exhausted => None,
        }
    }
}

/// Decides one range of an ADD from what `snapshot` holds.
pub fn decide<S: Snapshot>(
    range: &Range,
    ask: &Ask,
    snapshot: &mut S,
) -> Result<Decision<S::Holder>, S::Error> {
    let owned = snapshot.owned()?;
    if let Some(wanted) = ask.requested {
        return decide_static(wanted, owned, ask, snapshot);
    }
    if let Some((&first, rest)) = owned.split_first() {
        return Ok(Decision::Keep {
            offset: first,
            release: rest.to_vec(),
        });
    }
    Ok(match find_free(range, ask, snapshot)? {
        Some(offset) => Decision::Take { offset },
        None => Decision::Exhausted,
    })
}

/// Decides an ask for the static offset `wanted`, the owner holding `owned` in this pool.
fn decide_static<S: Snapshot>(
    wanted: u128,
    owned: Vec<u128>,
    ask: &Ask,
    snapshot: &mut S,
) -> Result<Decision<S::Holder>, S::Error> {
    if owned.contains(&wanted) {
        let release = owned.into_iter().filter(|o| *o != wanted).collect();
        return Ok(Decision::Keep {
            offset: wanted,
            release,
        });
    }
    if let Some(holder) = snapshot.holder(wanted)? {
        return Ok(Decision::InUse {
            offset: wanted,
            holder,
        });
    }
    if ask.limit.is_some_and(|limit| wanted >= limit) {
        return Ok(Decision::BeyondLimit { offset: wanted });
    }
    Ok(if owned.is_empty() {
        Decision::Take { offset: wanted }
    } else {
        Decision::Move {
            to: wanted,
            release: owned,
        }
    })
}

/// The free offset an ask without a static address takes, below its limit and where its
/// contention says to look; `None` when none is left.
fn find_free<S: Snapshot>(
    range: &Range,
    ask: &Ask,
    snapshot: &mut S,
) -> Result<Option<u128>, S::Error> {
    let mut range = range.clone();
    if let Some(limit) = ask.limit {
        match limit.checked_sub(1) {
            Some(below) if below >= range.first => range.last = range.last.min(below),
            _ => return Ok(None),
        }
    }
    let range = &range;
    let mut taken = |o| snapshot.taken_until(o);
    Ok(match ask.contention {
        Contention::None => range.lowest_free(&mut taken)?,
        Contention::StartAt(start) => {
            let mut tail = range.clone();
            tail.first = start.clamp(range.first, range.last);
            match tail.lowest_free(&mut taken)? {
                Some(found) => Some(found),
                None => range.lowest_free(&mut taken)?,
            }
        }
        Contention::Spread { seed, among } => {
            let free = lowest_free_n(range, among.max(1), &mut taken)?;
            match free.len() {
                0 => None,
                n => Some(free[(seed % n as u64) as usize]),
            }
        }
    })
}

/// The lowest `limit` free offsets of `range`, ascending; `taken` as for
/// [`Range::lowest_free`].
pub fn lowest_free_n<E>(
    range: &Range,
    limit: usize,
    mut taken: impl FnMut(u128) -> Result<Option<u128>, E>,
) -> Result<Vec<u128>, E> {
    let mut found = Vec::with_capacity(limit.min(64));
    let mut tail = range.clone();
    while found.len() < limit && tail.first <= tail.last {
        match tail.lowest_free(&mut taken)? {
            Some(offset) => {
                found.push(offset);
                match offset.checked_add(1) {
                    Some(next) => tail.first = next,
                    None => break,
                }
            }
            None => break,
        }
    }
    Ok(found)
}

/// A hash that stays the same across releases and machines (FNV-1a over the parts), for
/// spreading seeds and names that persist: the same attachment spreads the same way on every
/// machine and in every release.
pub fn stable_hash(parts: &[&str], salt: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for part in parts {
        eat(part.as_bytes());
        eat(&[0xff]);
    }
    eat(&salt.to_le_bytes());
    hash
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    use super::*;
    use crate::ipam::{parse_exclude, parse_range_text, RangeSpec};

    /// A pool as a map offset -> holder name; `me` is the asking owner.
    struct Pool {
        entries: BTreeMap<u128, &'static str>,
        /// Offsets held through an overlapping range, by whom.
        elsewhere: BTreeMap<u128, &'static str>,
        me: &'static str,
    }

    impl Snapshot for Pool {
        type Holder = &'static str;
        type Error = Infallible;

        fn owned(&mut self) -> Result<Vec<u128>, Infallible> {
            Ok(self
                .entries
                .iter()
                .filter(|(_, h)| **h == self.me)
                .map(|(o, _)| *o)
                .collect())
        }

        fn holder(&mut self, offset: u128) -> Result<Option<&'static str>, Infallible> {
            Ok(self
                .entries
                .get(&offset)
                .or_else(|| self.elsewhere.get(&offset))
                .copied()
                .filter(|h| *h != self.me))
        }

        fn taken_until(&mut self, offset: u128) -> Result<Option<u128>, Infallible> {
            let taken = self.entries.contains_key(&offset) || self.elsewhere.contains_key(&offset);
            Ok(taken.then_some(offset))
        }
    }

    fn range(text: &str, exclude: &[&str]) -> Range {
        let (cidr, start, end) = parse_range_text(text).unwrap();
        let exclude = exclude.iter().map(|e| parse_exclude(e).unwrap()).collect();
        Range::resolve(
            &RangeSpec {
                cidr,
                start,
                end,
                exclude,
            },
            None,
        )
        .unwrap()
    }

    fn pool(entries: &[(u128, &'static str)], elsewhere: &[(u128, &'static str)]) -> Pool {
        Pool {
            entries: entries.iter().copied().collect(),
            elsewhere: elsewhere.iter().copied().collect(),
            me: "me",
        }
    }

    fn ask(requested: Option<u128>) -> Ask {
        Ask {
            requested,
            contention: Contention::None,
            limit: None,
        }
    }

    type Row = (
        &'static str,
        &'static [(u128, &'static str)],
        &'static [(u128, &'static str)],
        Option<u128>,
        Decision<&'static str>,
    );

    #[test]
    fn the_table() {
        use Decision::*;
        let rows: &[Row] = &[
            ("empty pool: lowest", &[], &[], None, Take { offset: 1 }),
            (
                "skips held",
                &[(1, "a"), (2, "b")],
                &[],
                None,
                Take { offset: 3 },
            ),
            (
                "fills a hole",
                &[(1, "a"), (3, "b")],
                &[],
                None,
                Take { offset: 2 },
            ),
            (
                "repeated ADD keeps",
                &[(1, "a"), (2, "me")],
                &[],
                None,
                Keep {
                    offset: 2,
                    release: vec![],
                },
            ),
            (
                "two held: keep the lowest, release the rest",
                &[(2, "me"), (5, "me")],
                &[],
                None,
                Keep {
                    offset: 2,
                    release: vec![5],
                },
            ),
            (
                "overlap reservation is skipped, not spread over",
                &[],
                &[(1, "x"), (2, "y")],
                None,
                Take { offset: 3 },
            ),
            ("static free", &[], &[], Some(4), Take { offset: 4 }),
            (
                "static held by me",
                &[(4, "me")],
                &[],
                Some(4),
                Keep {
                    offset: 4,
                    release: vec![],
                },
            ),
            (
                "static held by another",
                &[(4, "a")],
                &[],
                Some(4),
                InUse {
                    offset: 4,
                    holder: "a",
                },
            ),
            (
                "static held through an overlapping range",
                &[],
                &[(4, "x")],
                Some(4),
                InUse {
                    offset: 4,
                    holder: "x",
                },
            ),
            (
                "changed static moves",
                &[(4, "me")],
                &[],
                Some(5),
                Move {
                    to: 5,
                    release: vec![4],
                },
            ),
            (
                "changed static to a held one: in use, old kept",
                &[(4, "me"), (5, "a")],
                &[],
                Some(5),
                InUse {
                    offset: 5,
                    holder: "a",
                },
            ),
            (
                "static outside the dynamic bounds is allowed",
                &[],
                &[],
                Some(7),
                Take { offset: 7 },
            ),
            (
                "full",
                &[(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e"), (6, "f")],
                &[],
                None,
                Exhausted,
            ),
        ];
        let r = range("10.0.0.0/29", &[]);
        for (name, entries, elsewhere, requested, expected) in rows {
            let got = decide(&r, &ask(*requested), &mut pool(entries, elsewhere)).unwrap();
            assert_eq!(&got, expected, "{name}");
        }
    }

    #[test]
    fn exclusions_and_ipv6_beyond_64_bits() {
        let r = range("10.0.0.0/29", &["10.0.0.0/30"]);
        let got = decide(&r, &ask(None), &mut pool(&[], &[])).unwrap();
        assert_eq!(got, Decision::Take { offset: 4 });
        let big = range("fd00::/56", &[]);
        let high = 1u128 << 70;
        let got = decide(&big, &ask(Some(high)), &mut pool(&[], &[])).unwrap();
        assert_eq!(got, Decision::Take { offset: high });
    }

    #[test]
    fn contention_hints() {
        let r = range("10.0.0.0/28", &[]);
        let start = Ask {
            requested: None,
            contention: Contention::StartAt(9),
            limit: None,
        };
        let got = decide(&r, &start, &mut pool(&[(9, "a")], &[])).unwrap();
        assert_eq!(got, Decision::Take { offset: 10 });
        // Nothing free after the start: from the beginning again.
        let full_tail: Vec<(u128, &str)> = (9..=14).map(|o| (o, "a")).collect();
        let tail: &'static [(u128, &str)] = Box::leak(full_tail.into_boxed_slice());
        let got = decide(&r, &start, &mut pool(tail, &[])).unwrap();
        assert_eq!(got, Decision::Take { offset: 1 });
        // Spread: within the lowest `among` free, by seed; a seed always lands the same way.
        let picks: std::collections::BTreeSet<u128> = (0..64)
            .map(|seed| {
                let a = Ask {
                    requested: None,
                    contention: Contention::Spread { seed, among: 3 },
                    limit: None,
                };
                decide(&r, &a, &mut pool(&[(2, "a")], &[]))
                    .unwrap()
                    .offset()
                    .unwrap()
            })
            .collect();
        assert_eq!(picks, [1u128, 3, 4].into_iter().collect());
    }

    #[test]
    fn nothing_handed_out_beyond_the_limit() {
        let big = range("fd00::/64", &[]);
        let below = GO_OFFSET_LIMIT - 1;
        let limited = |requested, contention| Ask {
            requested,
            contention,
            limit: Some(GO_OFFSET_LIMIT),
        };
        // A static address beyond the limit is refused; one below it, or one already held, is not.
        let got = decide(
            &big,
            &limited(Some(GO_OFFSET_LIMIT), Contention::None),
            &mut pool(&[], &[]),
        );
        assert_eq!(
            got.unwrap(),
            Decision::BeyondLimit {
                offset: GO_OFFSET_LIMIT
            }
        );
        let got = decide(
            &big,
            &limited(Some(below), Contention::None),
            &mut pool(&[], &[]),
        );
        assert_eq!(got.unwrap(), Decision::Take { offset: below });
        let held: &'static [(u128, &str)] = Box::leak(Box::new([(GO_OFFSET_LIMIT + 5, "me")]));
        let got = decide(&big, &limited(None, Contention::None), &mut pool(held, &[]));
        assert_eq!(
            got.unwrap(),
            Decision::Keep {
                offset: GO_OFFSET_LIMIT + 5,
                release: vec![]
            }
        );
        // The search stops below the limit, from any starting point.
        let narrow = Range {
            first: below - 1,
            ..big.clone()
        };
        let taken: &'static [(u128, &str)] = Box::leak(Box::new([(below - 1, "a")]));
        for contention in [
            Contention::None,
            Contention::StartAt(GO_OFFSET_LIMIT + 9),
            Contention::Spread { seed: 7, among: 4 },
        ] {
            let got = decide(&narrow, &limited(None, contention), &mut pool(taken, &[]));
            assert_eq!(
                got.unwrap(),
                Decision::Take { offset: below },
                "{contention:?}"
            );
        }
        let full: &'static [(u128, &str)] = Box::leak(Box::new([(below - 1, "a"), (below, "b")]));
        let got = decide(
            &narrow,
            &limited(None, Contention::None),
            &mut pool(full, &[]),
        );
        assert_eq!(got.unwrap(), Decision::Exhausted);
        // A range that starts at or beyond the limit has nothing to give.
        let beyond = Range {
            first: GO_OFFSET_LIMIT,
            ..big
        };
        let got = decide(
            &beyond,
            &limited(None, Contention::None),
            &mut pool(&[], &[]),
        );
        assert_eq!(got.unwrap(), Decision::Exhausted);
    }

    #[test]
    fn hashes_are_stable() {
        // Fixed across releases: persisted choices depend on it.
        assert_eq!(stable_hash(&[], 0), 5_558_979_605_539_197_941);
        assert_ne!(stable_hash(&["a", "b"], 0), stable_hash(&["ab", ""], 0));
        assert_ne!(stable_hash(&["a"], 0), stable_hash(&["a"], 1));
    }
}
