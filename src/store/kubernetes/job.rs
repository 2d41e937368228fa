//! One ADD's request for an address of a pool, as the agent queues it to combine it with the
//! node's other ADDs of that pool ([`super::batch`]), and what it is given.

use super::engine::Kept;
use super::reservation::Held;
use crate::ipam::Range;
use crate::store::Attachment;

/// One ADD's request for an address of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    who: Attachment,
    /// A static address, as an offset of the pool's range.
    requested: Option<u128>,
    /// Offsets of the pool's range this ADD already holds through its earlier ranges: an
    /// overlapping range must not answer one of them again (its reservation is the ADD's own,
    /// and would be taken over).
    earlier: Vec<u128>,
}

impl Job {
    pub fn new(who: &Attachment, requested: Option<u128>) -> Job {
        Job {
            who: Attachment {
                pod_uid: None,
                ..who.clone()
            },
            requested,
            earlier: Vec::new(),
        }
    }

    /// The job, passing over the addresses `ips` (those of the ADD's earlier ranges) where
    /// `range` holds them.
    pub fn passing_over(mut self, range: &Range, ips: &[std::net::IpAddr]) -> Job {
        self.earlier = ips
            .iter()
            .filter_map(|ip| range.cidr.offset_of(*ip))
            .collect();
        self
    }

    pub fn earlier(&self) -> &[u128] {
        &self.earlier
    }

    pub fn attachment(&self) -> Attachment {
        self.who.clone()
    }

    pub fn requested(&self) -> Option<u128> {
        self.requested
    }
}

/// What a job was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    pub ip: std::net::IpAddr,
    /// The key of the entry in `spec.allocations`.
    pub key: String,
    /// The reservation made for it by this ADD, to take back on failure.
    pub reservation: Option<Held>,
    /// False when the attachment already held the address (nothing to take back).
    pub fresh: bool,
    /// The entry this ADD moved to the new sandbox (a kept address), for a failed ADD to give
    /// back.
    pub kept: Option<Kept>,
}

/// What requests must share to be combined in one batch: the cluster, the pool, its range and
/// the way of allocating in it.
pub fn pool_key(
    scope: &str,
    pool: &str,
    range: &Range,
    network_name: &str,
    overlap: bool,
) -> String {
    let blocked: Vec<String> = range
        .blocked
        .as_slice()
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect();
    let parts = [
        pool.to_string(),
        range.cidr.to_string(),
        range.first.to_string(),
        range.last.to_string(),
        blocked.join(","),
        network_name.to_string(),
        overlap.to_string(),
        scope.to_string(),
    ];
    // The parts themselves, not a hash of them: requests of two pools never share a queue.
    parts.join("\n")
}
