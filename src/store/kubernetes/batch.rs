//! Combining a node's concurrent requests in the agent: every ADD (and every DEL) of a pool
//! waits in an in-memory queue of that pool; one task per busy queue serves whatever waits with
//! one read and one conditional write of the pool, then whatever arrived meanwhile, until the
//! queue is empty. ADDs that arrive while a batch makes its reservations join it (once per
//! round) and share its write. The write tests every entry it relies on (the whole pool's
//! resourceVersion while Go binaries may write it), so combining saves requests and collisions,
//! never a check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::job::{Granted, Job};
use crate::k8s::crd::IPPool;
use crate::store::queues::{lock, Observer, Queues};
use crate::store::{Allocation, StoreError};

/// A DEL of one attachment in one pool.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PendingRelease {
    pub container_id: String,
    pub ifname: String,
}

/// How long after losing a reservation race in a pool the agent's next ADDs of that pool spread
/// from their first try: other nodes are still taking the lowest free addresses.
pub const CONTENDED_FOR: Duration = Duration::from_secs(2);

/// The agent's queues, one per pool (and way of allocating in it).
pub struct Batches {
    pub adds: Queues<Job, Result<Granted, StoreError>>,
    pub releases: Queues<PendingRelease, Result<Vec<Allocation>, StoreError>>,
    pub observer: Arc<dyn Observer>,
    /// When each pool last lost a reservation race to another writer.
    last_race: Mutex<HashMap<String, Instant>>,
    /// Each pool as the agent last wrote it. The watch may not have brought the agent's own
    /// write yet, and a guess that lacked it could miss an attachment's entry.
    written: Mutex<HashMap<String, IPPool>>,
}

impl Batches {
    pub fn new(observer: Arc<dyn Observer>) -> Batches {
        Batches {
            adds: Queues::new("add", observer.clone()),
            releases: Queues::new("del", observer.clone()),
            observer,
            last_race: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers `pool` as the agent wrote it (the server's answer to the write).
    pub fn wrote(&self, pool: &IPPool) {
        if let Some(name) = &pool.metadata.name {
            lock(&self.written).insert(name.clone(), pool.clone());
        }
    }

    /// Pool `name` as the agent last wrote it.
    pub fn last_written(&self, name: &str) -> Option<IPPool> {
        lock(&self.written).get(name).cloned()
    }

    /// Another writer took an address an ADD of `pool` had chosen.
    pub fn lost_race(&self, pool: &str) {
        let mut races = lock(&self.last_race);
        races.retain(|_, at| at.elapsed() < CONTENDED_FOR);
        races.insert(pool.to_string(), Instant::now());
    }

    /// Whether `pool` lost a race lately: the contention hint of its next ADDs
    /// ([`crate::ipam::Contention`]), which an uncontended pool never gets.
    pub fn contended(&self, pool: &str) -> bool {
        lock(&self.last_race)
            .get(pool)
            .is_some_and(|at| at.elapsed() < CONTENDED_FOR)
    }
}

/// A released entry, for handing back to the DEL that asked.
pub fn released_by(allocation: &Allocation, pending: &PendingRelease) -> bool {
    allocation.attachment.container_id == pending.container_id
        && allocation.attachment.ifname == pending.ifname
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;

    impl Observer for Quiet {
        fn batch(&self, _: &'static str, _: usize) {}
        fn conflict(&self, _: &'static str) {}
        fn queued(&self, _: &'static str) {}
        fn cache(&self, _: &'static str, _: bool) {}
    }

    #[test]
    fn only_a_pool_that_lost_a_race_is_contended() {
        let batches = Batches::new(Arc::new(Quiet));
        assert!(!batches.contended("a"), "no race yet: lowest free first");
        batches.lost_race("a");
        assert!(batches.contended("a"));
        assert!(
            !batches.contended("b"),
            "another pool keeps lowest free first"
        );
    }

    #[test]
    fn a_race_is_forgotten_after_its_time() {
        let batches = Batches::new(Arc::new(Quiet));
        let long_ago = Instant::now().checked_sub(CONTENDED_FOR * 2);
        let Some(long_ago) = long_ago else {
            return; // A clock this young cannot stand for the past.
        };
        lock(&batches.last_race).insert("a".into(), long_ago);
        assert!(!batches.contended("a"));
        batches.lost_race("b");
        assert!(
            !lock(&batches.last_race).contains_key("a"),
            "old races are dropped"
        );
    }
}
