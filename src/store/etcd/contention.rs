//! Where the agent's combined ADDs start their search in a pool that other nodes allocate from
//! at the same time.
//!
//! Every agent plans from the same picture of a pool, so left alone they would all pick its
//! lowest free address and all but one commit would fail, round after round. Once combined
//! commits of this agent lose addresses in a pool again and again ([`CONTENDED_AFTER`]), its
//! later searches there start a random distance past the last one lost (the core's
//! [`Contention::StartAt`](crate::ipam::Contention)), and after each address it takes, just
//! past that one: contending nodes drift apart and then each takes addresses from its own
//! stretch of the range. A search that finds nothing from its start goes back to the lowest
//! free address, so no address is ever out of reach, and the next search starts past what that
//! one took: around the range like a ring. A pool that lost nothing for [`CONTENDED_FOR`] is
//! searched from its lowest free address again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::store::queues::lock;

/// How long a pool is searched from this agent's own start after its last lost address.
pub const CONTENDED_FOR: Duration = Duration::from_secs(10);

/// Addresses lost in a pool (none [`CONTENDED_FOR`] apart) before the agent leaves the lowest
/// free address: one race with a lone writer (the CLI, a plugin without an agent) costs a
/// read and leaves the pool lowest-free first.
pub const CONTENDED_AFTER: u32 = 2;

/// How much wider than a single ADD's retries the agent's first spread is (8 << 3: up to 64
/// addresses past the lost one): its contenders are whole nodes, each with a stream of ADDs to
/// place, and a wider first step parts them with fewer lost commits (a quarter fewer, in the
/// etcd burst benchmark, against the single ADD's 8).
const WIDER: u32 = 3;

/// Where a search starts after losing `offset` to a concurrent writer, with `conflicts` lost
/// before: a random distance past it, the spread growing with repeated conflicts (up to 256).
pub fn start_past(offset: u128, conflicts: u32) -> Option<u128> {
    let spread = 8u128 << conflicts.min(5);
    offset.checked_add(1 + rand::rng().random_range(0..spread))
}

/// One contended pool.
struct Contended {
    /// Where the next search starts.
    start: u128,
    /// Addresses lost in this pool since it became contended.
    conflicts: u32,
    last_lost: Instant,
}

/// The contended pools of one agent, by pool name.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, Contended>>,
}

impl Pools {
    /// Where each contended pool's search starts now; pools not listed start from their lowest
    /// free address. Forgets the pools that lost nothing for [`CONTENDED_FOR`].
    pub fn starts(&self) -> HashMap<String, u128> {
        let mut pools = lock(&self.pools);
        pools.retain(|_, pool| pool.last_lost.elapsed() < CONTENDED_FOR);
        pools
            .iter()
            .filter(|(_, pool)| pool.conflicts >= CONTENDED_AFTER)
            .map(|(name, pool)| (name.clone(), pool.start))
            .collect()
    }

    /// A combined commit lost `offset` of pool `name`.
    pub fn lost(&self, name: &str, offset: u128) {
        let mut pools = lock(&self.pools);
        let pool = pools.entry(name.to_string()).or_insert(Contended {
            start: 0,
            conflicts: 0,
            last_lost: Instant::now(),
        });
        // Past the range's end, the search starts from the lowest free address.
        pool.start = start_past(offset, pool.conflicts.saturating_add(WIDER)).unwrap_or(0);
        pool.conflicts = pool.conflicts.saturating_add(1);
        pool.last_lost = Instant::now();
    }

    /// A combined commit took `offset` of pool `name`: a contended pool's next search starts
    /// after it (after the batch's last one, as the batch is planned in search order).
    pub fn took(&self, name: &str, offset: u128) {
        if let Some(pool) = lock(&self.pools).get_mut(name) {
            pool.start = offset.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_searched_from_its_lowest_address_until_it_loses_again() {
        let pools = Pools::default();
        pools.took("a", 5);
        assert!(pools.starts().is_empty());
        pools.lost("a", 5);
        assert!(pools.starts().is_empty(), "one race is not contention");
        pools.lost("a", 6);
        let start = pools.starts()["a"];
        // The second loss spreads twice as wide as the first.
        assert!((7..7 + 128).contains(&start), "{start}");
    }

    #[test]
    fn a_contended_pool_is_searched_past_what_the_agent_took_last_around_the_range() {
        let pools = Pools::default();
        pools.lost("a", 5);
        pools.lost("a", 6);
        pools.took("a", 100);
        assert_eq!(pools.starts()["a"], 101);
        // Nothing was free past the start: the search went back to the lowest free address,
        // and the next one goes on from there.
        pools.took("a", 2);
        assert_eq!(pools.starts()["a"], 3);
        assert!(!pools.starts().contains_key("b"));
    }

    #[test]
    fn the_spread_grows_with_conflicts_and_never_overflows() {
        for conflicts in 0..40 {
            let start = start_past(1000, conflicts).unwrap();
            assert!(start > 1000 && start <= 1000 + (8 << conflicts.min(5)));
        }
        assert_eq!(start_past(u128::MAX, 1), None);
    }
}
