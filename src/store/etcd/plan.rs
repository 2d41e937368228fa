//! Choosing what one range of an ADD will commit: the address the attachment already holds,
//! a static address, or the lowest free one found by walking run windows. The core decides
//! ([`crate::ipam::decide()`]); this module answers its questions from etcd and shapes the plan.

use std::net::IpAddr;

use etcd_client::KeyValue;
use rand::Rng;

use crate::ipam::Snapshot;

use super::freed::fold_pool;
use super::records::{AllocationRecord, ReservationRecord};
use super::runs::ReadRun;
use super::session::{floor_get, key_get, CallFailed, Deadline, Session};
use super::window::{self, Window};
use crate::ipam::Range;
use crate::store::{AddRequest, RangeRequest, StoreError};

/// Why one attempt did not finish.
pub(super) enum Stop {
    /// Retrying cannot help.
    Final(StoreError),
    /// Read again and retry.
    Retry(CallFailed),
}

impl From<CallFailed> for Stop {
    /// A full database, a user whose roles do not grant the keys, or a cluster that allows
    /// fewer operations per transaction than the engine needs, is final for this
    /// operation: retrying until the deadline would only send the members requests they must
    /// refuse (until an admin acts), and the runtime's retry comes anyway.
    fn from(e: CallFailed) -> Self {
        if e.no_space() || e.misconfigured() {
            Stop::Final(e.into())
        } else {
            Stop::Retry(e)
        }
    }
}

/// What one range of the request will commit.
pub(super) enum Plan {
    /// The attachment already holds `offset`: keep it, updating the record if the container
    /// changed.
    Keep {
        offset: u128,
        ip: IpAddr,
        /// The record's revision as read, which the commit compares.
        mod_revision: i64,
        record: Box<AllocationRecord>,
        /// Its overlap reservation as read, when the new holder changes what it says.
        reservation: Option<KeptReservation>,
    },
    /// Take the free `offset`.
    Take {
        offset: u128,
        ip: IpAddr,
        /// The runs the search crossed: adjacent ones are merged after the commit when they
        /// form a long chain.
        walked: Vec<ReadRun>,
        owner_rev: Option<i64>,
        pod_rev: Option<i64>,
        /// A move: what the attachment held in this pool before, released by the same commit.
        release: Option<Box<Released>>,
        /// The revision of the address's reservation when it is the attachment's own, through
        /// another pool of the network: the commit takes it over (otherwise it must be absent).
        reservation_rev: Option<i64>,
    },
}

/// The overlap reservation of an address kept by a repeated ADD, as read.
pub(super) enum KeptReservation {
    /// It is the kept record's, at this revision: it follows the new container.
    Ours(i64),
    /// It is gone (a hand edit, a restore): it is written again.
    Missing,
    /// It is another holder's, or unreadable: left alone, since the takeover would leave that
    /// holder's address free to a third range once this one is released.
    Others,
}

/// An allocation a move releases, as read.
pub(super) struct Released {
    pub offset: u128,
    pub mod_revision: i64,
    pub record: AllocationRecord,
    /// The run covering `offset`, if one does (it should).
    pub run: Option<ReadRun>,
    /// The revision of its reservation, when it is this allocation's.
    pub reservation_rev: Option<i64>,
}

/// Free offsets after the first choice considered for alternatives.
pub(super) const SPARE: usize = 32;

/// Index entries found for one range: (revision, offset) of the owner and pod keys.
#[derive(Default, Clone, Copy)]
pub(super) struct IndexHits {
    pub owner: Option<(i64, Option<u128>)>,
    pub pod: Option<(i64, Option<u128>)>,
}

/// One range of an ADD as read from etcd, for [`crate::ipam::decide()`]. Every read it makes is
/// either compared by the commit (the allocation, run and reservation keys the commit writes
/// must still be absent) or only steers the search.
pub(super) struct RangeView<'a> {
    pub s: &'a Session,
    pub dl: &'a Deadline,
    pub req: &'a AddRequest,
    pub rr: &'a RangeRequest,
    /// What the attachment already holds in this pool, from the owner and pod index.
    pub held: Option<u128>,
    /// Addresses chosen for earlier ranges, or found reserved through another pool (for a
    /// dynamic choice: a static one reads the reservation again).
    pub taken: &'a dyn Fn(&IpAddr) -> bool,
    pub window: Window,
    /// The runs the search crossed.
    pub walked: Vec<ReadRun>,
    /// A static address the attachment holds through another pool of the network (a range
    /// edited since its ADD), with its reservation's revision: not someone else's.
    pub own_reservation: Option<(u128, i64)>,
}

impl Snapshot for RangeView<'_> {
    type Holder = String;
    type Error = Stop;

    fn owned(&mut self) -> Result<Vec<u128>, Stop> {
        Ok(self.held.into_iter().collect())
    }

    fn holder(&mut self, offset: u128) -> Result<Option<String>, Stop> {
        let (s, req) = (self.s, self.req);
        let pool = &self.rr.pool.name;
        let ip = self.rr.pool.range.ip(offset);
        if (self.taken)(&ip) {
            return Ok(Some("another range of this attachment".into()));
        }
        let mut gets = vec![
            key_get(&s.keys.allocation(pool, offset)),
            floor_get(&s.keys.runs_dir(pool), &s.keys.run(pool, offset)),
            key_get(&s.keys.freed(pool, offset)),
        ];
        if req.overlap {
            gets.push(key_get(&s.keys.reservation(&req.network_name, ip)));
        }
        let mut res = s.reads(self.dl, "pool read", gets)?.into_iter();
        if let Some(kv) = res.next().and_then(|kvs| kvs.into_iter().next()) {
            return Ok(Some(
                AllocationRecord::from_json(kv.value())
                    .map(|r| r.attachment().describe())
                    .unwrap_or_else(|| "an unreadable record".into()),
            ));
        }
        let floor = first_run(res.next());
        let marked = res.next().is_some_and(|kvs| !kvs.is_empty());
        if marked {
            // Released, its run not cut yet: cut it, then decide again.
            fold_pool(s, self.dl, pool)?;
            return Err(Stop::Retry(CallFailed::new(
                "the address asked for was released and not yet free",
            )));
        }
        if floor.is_some_and(|f| f.run.end >= offset) {
            return Err(Stop::Final(StoreError::io(format!(
                "pool {pool} in etcd is inconsistent: offset {offset} is in a run but has no record"
            ))));
        }
        if let Some(kv) = res.next().and_then(|kvs| kvs.into_iter().next()) {
            let found = ReservationRecord::from_json(kv.value());
            if found.as_ref().is_some_and(|r| r.owner_elsewhere(req)) {
                // The attachment's own, through a pool this ADD does not name (a range edited
                // since): the commit takes it over, as the other engines take such an address.
                // Through another range of this same ADD, which keeps it, it stays in use.
                self.own_reservation = Some((offset, kv.mod_revision()));
                return Ok(None);
            }
            return Ok(Some(
                found
                    .map(|r| r.holder())
                    .unwrap_or_else(|| "an unreadable reservation".into()),
            ));
        }
        Ok(None)
    }

    fn taken_until(&mut self, candidate: u128) -> Result<Option<u128>, Stop> {
        if (self.taken)(&self.rr.pool.range.ip(candidate)) {
            return Ok(Some(candidate));
        }
        let pool = &self.rr.pool.name;
        if !self.window.knows(candidate) {
            let gets = window::gets(&self.s.keys, pool, candidate);
            let mut res = self.s.reads(self.dl, "pool read", gets)?.into_iter();
            self.window = window::parse(candidate, &mut res);
        }
        Ok(self.window.covering(candidate).map(|r| {
            self.walked.push(r);
            r.run.end
        }))
    }
}

/// What the commit of a move must read of the allocation it releases: the record's run and
/// its reservation, with their revisions.
pub(super) fn read_released(
    s: &Session,
    dl: &Deadline,
    pool: &str,
    offset: u128,
    mod_revision: i64,
    record: AllocationRecord,
) -> Result<Released, Stop> {
    let mut gets = vec![floor_get(&s.keys.runs_dir(pool), &s.keys.run(pool, offset))];
    if record.reserved {
        gets.push(key_get(
            &s.keys.reservation(&record.network_name, record.ip),
        ));
    }
    let mut res = s.reads(dl, "release read", gets)?.into_iter();
    let run = first_run(res.next()).filter(|r| r.run.start <= offset && offset <= r.run.end);
    let reservation_rev = res
        .next()
        .and_then(|kvs| kvs.into_iter().next())
        .filter(|kv| {
            ReservationRecord::from_json(kv.value()).is_some_and(|r| r.is_for(pool, &record))
        })
        .map(|kv| kv.mod_revision());
    Ok(Released {
        offset,
        mod_revision,
        record,
        run,
        reservation_rev,
    })
}

/// The reservation of `record`, kept by `req` in `pool`, when the commit rewrites it (the
/// record is reserved and its new holder changes what the reservation says).
pub(super) fn read_kept_reservation(
    s: &Session,
    dl: &Deadline,
    (req, pool): (&AddRequest, &str),
    record: &AllocationRecord,
) -> Result<Option<KeptReservation>, Stop> {
    let before = ReservationRecord::of(pool, record);
    if !record.reserved || ReservationRecord::of(pool, &kept(req, record)) == before {
        return Ok(None);
    }
    let key = s.keys.reservation(&record.network_name, record.ip);
    let mut res = s.reads(dl, "reservation read", vec![key_get(&key)])?;
    let read = res.pop().and_then(|kvs| kvs.into_iter().next());
    Ok(Some(match read {
        None => KeptReservation::Missing,
        Some(kv) => match ReservationRecord::from_json(kv.value()) {
            // Or the pod's through a pool this ADD does not name (a later sandbox took the
            // address over through a range edited since): the keep takes it back, or that
            // sandbox's DEL would leave this record without one. Through a pool the ADD names,
            // that range's own plan writes the key (one transaction cannot write it twice).
            Some(r) if r.is_for(pool, record) || r.owner_elsewhere(req) => {
                KeptReservation::Ours(kv.mod_revision())
            }
            _ => {
                tracing::warn!(
                    key = %key,
                    "etcd: a repeated ADD keeps {} whose reservation is not its own; \
                     left as is (`whereabouts doctor` reports it)",
                    record.ip
                );
                KeptReservation::Others
            }
        },
    }))
}

/// `record` as kept by the repeated ADD `req`: it follows the attachment's new container (and
/// pod, node, network configuration).
pub(super) fn kept(req: &AddRequest, record: &AllocationRecord) -> AllocationRecord {
    let who = &req.attachment;
    AllocationRecord {
        container_id: who.container_id.clone(),
        pod_uid: who.pod_uid.clone().or_else(|| record.pod_uid.clone()),
        pod_ref: who.pod_ref.clone().or_else(|| record.pod_ref.clone()),
        // A repeated ADD comes from the node the pod runs on now: unknown when that node's
        // name is, and then no node's GC touches it (the old node's GC does not list it).
        node: req.node.clone(),
        // And through the network configuration that attaches it now: GC of the one it came
        // through before does not list it.
        cni_network: req.cni_network.clone(),
        ..record.clone()
    }
}

/// Up to `max` offsets after `offset` that the window shows free (no reads): candidates for
/// the alternatives of a contended commit.
pub(super) fn free_after(
    range: &Range,
    window: &Window,
    offset: u128,
    taken: &dyn Fn(&IpAddr) -> bool,
    max: usize,
) -> Vec<u128> {
    let mut out = Vec::new();
    let mut from = range.clone();
    let mut next = offset.checked_add(1);
    while let Some(first) = next.filter(|n| *n <= range.last && out.len() < max) {
        from.first = first;
        let found = from.lowest_free(|c| {
            if taken(&range.ip(c)) {
                return Ok(Some(c));
            }
            if !window.knows(c) {
                return Err(());
            }
            Ok(window.covering(c).map(|r| r.run.end))
        });
        match found {
            Ok(Some(c)) => {
                out.push(c);
                next = c.checked_add(1);
            }
            _ => break,
        }
    }
    out
}

/// For a request with one dynamic range: alternative offsets to try in the same commit if the
/// first choice is lost to a concurrent writer, one close after it and one further on, picked
/// at random so that the losers of a race spread out instead of colliding again.
pub(super) fn alternatives(req: &AddRequest, plans: &[Plan], spare: &[u128]) -> Vec<Plan> {
    let (
        [rr],
        [Plan::Take {
            owner_rev, pod_rev, ..
        }],
    ) = (req.ranges.as_slice(), plans)
    else {
        return Vec::new();
    };
    if rr.requested.is_some() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (lo, hi) in [(0, SPARE / 4), (SPARE / 4, SPARE)] {
        let hi = hi.min(spare.len());
        if lo < hi {
            let offset = spare[rand::rng().random_range(lo..hi)];
            out.push(Plan::Take {
                offset,
                ip: rr.pool.range.ip(offset),
                walked: Vec::new(),
                owner_rev: *owner_rev,
                pod_rev: *pod_rev,
                release: None,
                // Dynamic: the commit requires the reservation absent, whoever holds it.
                reservation_rev: None,
            });
        }
    }
    out
}

pub(super) fn first_run(kvs: Option<Vec<KeyValue>>) -> Option<ReadRun> {
    kvs.and_then(|kvs| kvs.into_iter().next())
        .and_then(|kv| ReadRun::from_kv(&kv))
}
