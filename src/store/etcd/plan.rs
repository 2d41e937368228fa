//! Choosing what one range of an ADD will commit: the address the attachment already holds,
//! a static address, or the lowest free one found by walking run windows.

use std::net::IpAddr;

use etcd_client::KeyValue;
use rand::Rng;

use super::records::{AllocationRecord, ReservationRecord};
use super::runs::ReadRun;
use super::session::{floor_get, key_get, CallFailed, Deadline, Session};
use super::window::{self, Window};
use crate::ipam::Range;
use crate::store::{AddRequest, Attachment, RangeRequest, StoreError};

/// Why one attempt did not finish.
pub(super) enum Stop {
    /// Retrying cannot help.
    Final(StoreError),
    /// Read again and retry.
    Retry(String),
}

impl From<CallFailed> for Stop {
    fn from(e: CallFailed) -> Self {
        Stop::Retry(e.0)
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
    },
}

/// Free offsets after the first choice considered for alternatives.
pub(super) const SPARE: usize = 32;

/// Index entries found for one range: (revision, offset) of the owner and pod keys.
#[derive(Default, Clone, Copy)]
pub(super) struct IndexHits {
    pub owner: Option<(i64, Option<u128>)>,
    pub pod: Option<(i64, Option<u128>)>,
}

/// The lowest free offset of the range at or after `start` (or, failing that, from the
/// beginning), and what its commit must compare. Reservations through overlapping ranges are
/// checked by the commit itself: it requires the reservation key to be absent.
pub(super) fn plan_dynamic(
    s: &Session,
    rr: &RangeRequest,
    hit: IndexHits,
    start: u128,
    mut window: Window,
    taken: &dyn Fn(&IpAddr) -> bool,
    dl: &Deadline,
) -> Result<(Plan, Vec<u128>), Stop> {
    let range = &rr.pool.range;
    let pool = &rr.pool.name;
    let mut from = range.clone();
    from.first = start;
    let mut walked: Vec<ReadRun> = Vec::new();
    let mut search = |r: &Range, window: &mut Window| {
        let mut found = None;
        r.lowest_free(|candidate| {
            if taken(&range.ip(candidate)) {
                return Ok(Some(candidate));
            }
            if !window.knows(candidate) {
                let mut res = s
                    .reads(dl, "pool read", window::gets(&s.keys, pool, candidate))?
                    .into_iter();
                let floor = res.next().unwrap_or_default();
                *window = Window::parse(candidate, floor, res.next().unwrap_or_default());
            }
            if let Some(r) = window.covering(candidate) {
                walked.push(r);
                return Ok(Some(r.run.end));
            }
            found = Some(candidate);
            Ok::<_, CallFailed>(None)
        })?;
        Ok::<_, CallFailed>(found)
    };
    let mut found = search(&from, &mut window)?;
    if found.is_none() && start > range.first {
        found = search(range, &mut window)?;
    }
    let Some(offset) = found else {
        return Err(Stop::Final(StoreError::Exhausted {
            range: range.to_string(),
        }));
    };
    let free_after = free_after(range, &window, offset, taken, SPARE);
    let plan = Plan::Take {
        offset,
        ip: range.ip(offset),
        walked,
        owner_rev: hit.owner.map(|(rev, _)| rev),
        pod_rev: hit.pod.map(|(rev, _)| rev),
    };
    Ok((plan, free_after))
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
            });
        }
    }
    out
}

/// A static address asked for: take it unless someone else holds it.
pub(super) fn plan_static(
    s: &Session,
    req: &AddRequest,
    rr: &RangeRequest,
    hit: IndexHits,
    offset: u128,
    chosen: &[IpAddr],
    dl: &Deadline,
) -> Result<Plan, Stop> {
    let range = &rr.pool.range;
    let pool = &rr.pool.name;
    let ip = range.ip(offset);
    let in_use = |holder: String| {
        Stop::Final(StoreError::InUse {
            ip,
            range: range.to_string(),
            holder,
        })
    };
    if chosen.contains(&ip) {
        return Err(in_use("another range of this attachment".into()));
    }
    let mut gets = vec![
        key_get(&s.keys.allocation(pool, offset)),
        floor_get(&s.keys.runs_dir(pool), &s.keys.run(pool, offset)),
    ];
    if req.overlap {
        gets.push(key_get(&s.keys.reservation(&req.network_name, ip)));
    }
    let mut res = s.reads(dl, "pool read", gets)?.into_iter();
    if let Some(kv) = res.next().and_then(|kvs| kvs.into_iter().next()) {
        let holder = AllocationRecord::from_json(kv.value())
            .map(|r| describe(&r.attachment()))
            .unwrap_or_else(|| "an unreadable record".into());
        return Err(in_use(holder));
    }
    let floor = first_run(res.next());
    if floor.is_some_and(|f| f.run.end >= offset) {
        return Err(Stop::Final(StoreError::Io(format!(
            "pool {pool} in etcd is inconsistent: offset {offset} is in a run but has no record"
        ))));
    }
    if req.overlap {
        if let Some(kv) = res.next().and_then(|kvs| kvs.into_iter().next()) {
            let holder = ReservationRecord::from_json(kv.value())
                .map(|r| r.holder())
                .unwrap_or_else(|| "an unreadable reservation".into());
            return Err(in_use(holder));
        }
    }
    Ok(Plan::Take {
        offset,
        ip,
        walked: Vec::new(),
        owner_rev: hit.owner.map(|(rev, _)| rev),
        pod_rev: hit.pod.map(|(rev, _)| rev),
    })
}

pub(super) fn describe(a: &Attachment) -> String {
    match &a.pod_ref {
        Some(pod) => format!("pod {pod} (container {}, {})", a.container_id, a.ifname),
        None => format!("container {} ({})", a.container_id, a.ifname),
    }
}

pub(super) fn first_run(kvs: Option<Vec<KeyValue>>) -> Option<ReadRun> {
    kvs.and_then(|kvs| kvs.into_iter().next())
        .and_then(|kv| ReadRun::from_kv(&kv))
}
