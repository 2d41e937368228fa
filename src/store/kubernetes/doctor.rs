//! `whereabouts doctor` on the Kubernetes engine: what in the pools, reservations and node
//! slices is inconsistent, or would be dropped or misread by a Go Whereabouts binary, and the
//! repairs that are safe to make without a human (with `--fix`), each a conditional write.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use super::api::{ApiError, Kube};
use super::engine::Engine;
use super::pool_doc::{Entry, PoolDoc};
use super::release::Unbacked;
use super::reservation;
use crate::cleanup::judge::{judge_holder, Verdict};
use crate::ipam::decide::GO_OFFSET_LIMIT;
use crate::ipam::names::{object_name, pool_name};
use crate::ipam::Cidr;
use crate::k8s::crd::{IPPool, NodeSlicePool, OverlappingRangeIPReservation};
use crate::k8s::described::{
    plain_pools, pools_without_reservations, slice_pools_without_reservations,
};
use crate::store::error::chain;
use crate::store::{Attachment, StoreError};

/// A reservation without a pool entry is left alone this long after its creation, by default:
/// our ADD creates the reservation before the pool entry, so a young one may belong to an ADD
/// in progress. Longer than an ADD's deadline at the default timeout; past it, the ADD's pod,
/// which exists while its ADD runs, still keeps the reservation (see `release_orphan`).
pub const ORPHAN_AGE: Duration = Duration::from_secs(300);

/// What is wrong, one kind per rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// A pool entry without its OverlappingRangeIPReservation (another range may hand the
    /// address out again; networks with `enable_overlapping_ranges: false` have none).
    MissingReservation,
    /// A reservation that no pool entry holds (a leak: the address is never handed out again).
    OrphanReservation,
    /// The entry's reservation is held by another attachment.
    ReservationHolderDiffers,
    /// One address of a network held by two attachments (a duplicate).
    HeldTwice,
    /// An entry whose key is 2^63 or more: a Go binary drops it from every pool it writes.
    BeyondGoOffsets,
    /// An entry without a pod (`podref: ""`): a Go reconciler deletes its reservation.
    Podless,
    /// An object named in our valid form of a name the Go binary would write invalid
    /// (`0---126` for `---126`): a Go binary looks for the invalid name and does not find it.
    MadeValidName,
    /// A key that is not an address of the pool's range: every implementation ignores it.
    UnreadableEntry,
    /// A node's slice pool holding addresses although the NodeSlicePool gives that node
    /// another slice (or none).
    SliceMismatch,
    /// A node's slice pool that is also the pool of a network the NetworkAttachmentDefinitions
    /// describe (`net-w1` over node `w1`'s slice of `net`): the two networks keep their entries
    /// in one object.
    SharedName,
}

/// What the NetworkAttachmentDefinitions say of the pools, by object name.
#[derive(Debug, Default)]
pub struct Described {
    /// The pools whose networks keep no reservations (`enable_overlapping_ranges: false`): an
    /// entry there needs none.
    pub unreserved: BTreeSet<String>,
    /// The NodeSlicePools (by name) of sliced networks that keep no reservations: an entry of
    /// a node's slice pool of theirs needs none.
    pub unreserved_slices: BTreeSet<String>,
    /// The pools of networks outside node slices.
    pub plain: BTreeSet<String>,
}

/// One finding, and what `--fix` did or would do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub problem: Problem,
    /// `IPPool/<name>` or `OverlappingRangeIPReservation/<name>`.
    pub object: String,
    pub address: Option<String>,
    /// The reservation the finding is about, if any.
    pub reservation: Option<String>,
    pub detail: String,
    /// "none" (needs a human), "fixable", "fixed", or why it was not.
    pub action: String,
}

/// A pool as read, with what its name says.
struct Pool {
    name: String,
    doc: PoolDoc,
    network: String,
    /// The network of the name's other reading, for a name that reads as a node's slice pool
    /// and as a plain pool (`n1-<range>`: node n1's slice of a network without a name, or
    /// network n1's pool): a reservation of either reading is its entry's, and neither is
    /// deleted as an orphan.
    also_network: Option<String>,
    /// The NodeSlicePool whose node slice this pool is, if it is one.
    slice_pool: Option<String>,
}

/// Everything read, in one place.
pub struct Survey {
    pools: Vec<Pool>,
    /// What the NetworkAttachmentDefinitions say of the pools.
    described: Described,
    reservations: BTreeMap<String, OverlappingRangeIPReservation>,
    findings: Vec<Finding>,
    /// What the survey could not read, for the operator (stderr): the report is the poorer.
    pub unread: Option<String>,
}

fn finding(problem: Problem, object: String, address: Option<IpAddr>, detail: String) -> Finding {
    let action = match problem {
        Problem::MissingReservation | Problem::OrphanReservation => "fixable",
        _ => "none",
    };
    Finding {
        problem,
        object,
        address: address.map(|a| a.to_string()),
        reservation: None,
        detail,
        action: action.into(),
    }
}

/// An address of one network held by more than one attachment, across the network's pools.
fn held_twice(holders: BTreeMap<(String, IpAddr), Vec<(String, Attachment)>>) -> Vec<Finding> {
    let mut findings = Vec::new();
    for ((network, ip), held) in holders {
        let owners: BTreeSet<String> = held.iter().map(|(_, a)| a.describe()).collect();
        if owners.len() > 1 {
            let pools: Vec<&str> = held.iter().map(|(p, _)| p.as_str()).collect();
            let mut f = finding(
                Problem::HeldTwice,
                format!("IPPool/{}", pools.join(",IPPool/")),
                Some(ip),
                format!(
                    "network {network:?}: held by {}",
                    owners.into_iter().collect::<Vec<_>>().join(" and ")
                ),
            );
            f.reservation = Some(reservation::name(ip, &network));
            findings.push(f);
        }
    }
    findings
}

/// Reads the namespace's pools, reservations and node slices, and finds what is wrong.
pub async fn survey(kube: &Kube, orphan_age: Duration) -> Result<Survey, StoreError> {
    let pools = kube.list_pools(None).await?;
    let reservations = kube.list_reservations(None).await?;
    // Without the NodeSlicePool resource there are no node slices to check.
    let slices = kube.list_slices().await?;
    // A kubeconfig that may not list them leaves every entry needing its reservation.
    let (described, unread) = match kube.list_nads().await {
        Ok(nads) => {
            let described = Described {
                unreserved: pools_without_reservations(&nads),
                unreserved_slices: slice_pools_without_reservations(&nads),
                plain: plain_pools(&nads),
            };
            (described, None)
        }
        Err(err) => (
            Described::default(),
            Some(format!(
                "NetworkAttachmentDefinitions not read ({}): the entries of networks that keep \
                 no reservations are reported missing_reservation, and a node's slice pool \
                 another network shares is not reported",
                chain(&err)
            )),
        ),
    };
    let mut survey = Survey::of(pools, reservations, (&slices, described), orphan_age);
    survey.unread = unread;
    Ok(survey)
}

/// The network and node a pool's name stands for (`[network-][node-]<range>`), the node's
/// slice checked against the NodeSlicePools.
fn identify(name: &str, range: &Cidr, slices: &[NodeSlicePool]) -> Reading {
    for slice_pool in slices {
        let network = slice_pool.metadata.name.clone().unwrap_or_default();
        let Some(whole) = Cidr::parse(&slice_pool.spec.range, false) else {
            continue;
        };
        if !whole.overlaps(range) {
            continue;
        }
        let assigned = slice_pool
            .status
            .as_ref()
            .map(|s| s.allocations.clone())
            .unwrap_or_default();
        for net in [network.as_str(), ""] {
            let prefix = if net.is_empty() {
                String::new()
            } else {
                format!("{net}-")
            };
            let suffix = format!("-{}", object_name(&pool_name(range, "", None)));
            let Some(node) = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(&suffix))
            else {
                continue;
            };
            // Without a network name the pool's name cannot tell a node from a network: only a
            // node the NodeSlicePool names counts.
            if node.is_empty() || (net.is_empty() && !assigned.iter().any(|a| a.node_name == node))
            {
                continue;
            }
            let holds = assigned.iter().any(|a| {
                a.node_name == node
                    && Cidr::parse(&a.slice_range, false).map(|c| c.network())
                        == Some(range.network())
            });
            return Reading {
                network: net.to_string(),
                node: Some((node.to_string(), holds)),
                plain: plain_network(name, range),
                slice_pool: Some(network.clone()),
            };
        }
    }
    let network = plain_network(name, range);
    Reading {
        network: network.clone(),
        node: None,
        plain: network,
        slice_pool: None,
    }
}

/// What a pool's name says.
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    network: String,
    /// The node whose slice pool this is, and whether its NodeSlicePool gives it this slice.
    node: Option<(String, bool)>,
    /// The network the name stands for read as a plain pool (`<network>-<range>`).
    plain: String,
    /// The NodeSlicePool of the node's slice, when the name reads as one.
    slice_pool: Option<String>,
}

impl Reading {
    /// The network of the plain reading, when the name reads as a slice pool too.
    fn other_network(&self) -> Option<String> {
        (self.node.is_some() && self.plain != self.network).then(|| self.plain.clone())
    }
}

/// The network of a plain pool named `name` (`<network>-<range>` or `<range>`).
fn plain_network(name: &str, range: &Cidr) -> String {
    let plain = object_name(&pool_name(range, "", None));
    let network = name
        .strip_suffix(&plain)
        .and_then(|rest| rest.strip_suffix('-'))
        .unwrap_or_default();
    network.to_string()
}

impl Survey {
    /// What is wrong with these pools, reservations and node slices: one namespace's, as
    /// read. An orphan reservation younger than `orphan_age` is reported, not to be fixed yet.
    pub fn of(
        pools: Vec<IPPool>,
        reservations: Vec<OverlappingRangeIPReservation>,
        (slices, described): (&[NodeSlicePool], Described),
        orphan_age: Duration,
    ) -> Survey {
        let mut survey = Survey {
            pools: Vec::new(),
            described,
            reservations: reservations
                .into_iter()
                .filter_map(|r| Some((r.metadata.name.clone()?, r)))
                .collect(),
            findings: Vec::new(),
            unread: None,
        };
        for object in pools {
            survey.read_pool(object, slices);
        }
        survey.check_entries();
        survey.check_orphans(orphan_age);
        survey
    }

    fn read_pool(&mut self, object: IPPool, slices: &[NodeSlicePool]) {
        let name = object.metadata.name.clone().unwrap_or_default();
        let what = format!("IPPool/{name}");
        let Some(range) = Cidr::parse(&object.spec.range, false) else {
            self.findings.push(finding(
                Problem::UnreadableEntry,
                what,
                None,
                format!("spec.range {:?} is not a CIDR", object.spec.range),
            ));
            return;
        };
        let reading = identify(&name, &range.network(), slices);
        let node = &reading.node;
        let upstream = pool_name(
            &range,
            &reading.network,
            node.as_ref().map(|(n, _)| n.as_str()),
        );
        if upstream != name && object_name(&upstream) == name {
            self.findings.push(finding(
                Problem::MadeValidName,
                what.clone(),
                None,
                format!("the Go binary names this pool {upstream:?}, which Kubernetes refuses"),
            ));
        }
        let keys: Vec<String> = object.spec.allocations.keys().cloned().collect();
        let Ok(doc) = PoolDoc::new(&name, range.network(), Some(object)) else {
            return;
        };
        let readable: BTreeSet<String> = doc.entries().into_iter().map(|e| e.key).collect();
        for key in keys.iter().filter(|k| !readable.contains(*k)) {
            self.findings.push(finding(
                Problem::UnreadableEntry,
                what.clone(),
                None,
                format!("key {key:?} is not an address of {range}"),
            ));
        }
        if let Some((node, true)) = node {
            if self.described.plain.contains(&name) {
                self.findings.push(finding(
                    Problem::SharedName,
                    what.clone(),
                    None,
                    format!(
                        "node {node}'s slice pool of network {:?} is also the pool of network \
                         {:?}: give one of them another network_name",
                        reading.network, reading.plain
                    ),
                ));
            }
        }
        if let Some((node, false)) = node {
            if !doc.entries().is_empty() {
                self.findings.push(finding(
                    Problem::SliceMismatch,
                    what.clone(),
                    None,
                    format!(
                        "node {node} holds addresses here but its NodeSlicePool gives it another slice or none"
                    ),
                ));
            }
        }
        self.pools.push(Pool {
            name,
            doc,
            also_network: reading.other_network(),
            network: reading.network,
            slice_pool: reading.slice_pool,
        });
    }

    /// Whether the networks of `pool` keep no reservations: its entries need none. A name
    /// that reads as a node's slice pool and as a described network's plain pool needs them
    /// unless both networks keep none.
    fn needs_no_reservation(&self, pool: &Pool) -> bool {
        let described = &self.described;
        let sliced = pool.slice_pool.as_ref();
        described.unreserved.contains(&pool.name)
            || (sliced.is_some_and(|s| described.unreserved_slices.contains(s))
                && !described.plain.contains(&pool.name))
    }

    /// Every entry against its reservation, the Go binary's limits, and the other entries.
    fn check_entries(&mut self) {
        let mut holders: BTreeMap<(String, IpAddr), Vec<(String, Attachment)>> = BTreeMap::new();
        let mut findings = Vec::new();
        for pool in &self.pools {
            for entry in pool.doc.entries() {
                findings.extend(self.entry_findings(pool, &entry));
                holders
                    .entry((pool.network.clone(), entry.ip))
                    .or_default()
                    .push((pool.name.clone(), entry.attachment));
            }
        }
        findings.extend(held_twice(holders));
        // Creating the reservation of an address two attachments hold would pick one of them:
        // a human decides which.
        let disputed: BTreeSet<Option<String>> = findings
            .iter()
            .filter(|f| f.problem == Problem::HeldTwice)
            .map(|f| f.reservation.clone())
            .collect();
        for f in &mut findings {
            if f.problem == Problem::MissingReservation && disputed.contains(&f.reservation) {
                f.action = "none: the address is held twice (held_twice)".into();
            }
        }
        self.findings.extend(findings);
    }

    /// What is wrong with one entry of `pool` alone: its key, its pod, its reservation.
    fn entry_findings(&self, pool: &Pool, entry: &Entry) -> Vec<Finding> {
        let what = format!("IPPool/{}", pool.name);
        let ip = Some(entry.ip);
        let mut findings = Vec::new();
        if entry
            .key
            .parse::<u128>()
            .is_ok_and(|k| k >= GO_OFFSET_LIMIT)
        {
            findings.push(finding(
                Problem::BeyondGoOffsets,
                what.clone(),
                ip,
                format!("key {} is 2^63 or more", entry.key),
            ));
        }
        if entry.attachment.pod_ref.is_none() {
            findings.push(finding(
                Problem::Podless,
                what.clone(),
                ip,
                format!("container {} has no pod", entry.attachment.container_id),
            ));
        }
        let name = reservation::name(entry.ip, &pool.network);
        let held_by_entry = |network: &String| {
            let r = self.reservations.get(&reservation::name(entry.ip, network));
            r.is_some_and(|r| reservation::held_by(r, &entry.attachment))
        };
        if pool.also_network.as_ref().is_some_and(held_by_entry) {
            return findings;
        }
        let problem = match self.reservations.get(&name) {
            None if self.needs_no_reservation(pool) => None,
            None => Some((
                Problem::MissingReservation,
                format!("no reservation for {}", entry.attachment.describe()),
            )),
            Some(r) if !reservation::held_by(r, &entry.attachment) => Some((
                Problem::ReservationHolderDiffers,
                format!(
                    "the entry is {}, the reservation {}/{}",
                    entry.attachment.describe(),
                    r.spec.podref,
                    r.spec.containerid
                ),
            )),
            Some(_) => None,
        };
        if let Some((problem, detail)) = problem {
            let mut f = finding(problem, what, ip, detail);
            f.reservation = Some(name);
            findings.push(f);
        }
        findings
    }

    /// The reservation every pool entry needs, by name, with the entry's attachment; for a
    /// pool whose name reads two ways, under both readings' networks.
    fn reserved_by_entries(&self) -> BTreeMap<String, Attachment> {
        let mut reserved = BTreeMap::new();
        for pool in &self.pools {
            for e in pool.doc.entries() {
                reserved.insert(reservation::name(e.ip, &pool.network), e.attachment);
            }
        }
        // The other readings come second: a repair creates what a pool's own reading needs.
        for pool in &self.pools {
            let Some(network) = &pool.also_network else {
                continue;
            };
            for e in pool.doc.entries() {
                let name = reservation::name(e.ip, network);
                reserved.entry(name).or_insert(e.attachment);
            }
        }
        reserved
    }

    /// Reservations that no entry accounts for, and reservation names made valid.
    fn check_orphans(&mut self, orphan_age: Duration) {
        let expected = self.reserved_by_entries();
        for (name, r) in &self.reservations {
            let what = format!("OverlappingRangeIPReservation/{name}");
            if !expected.contains_key(name) {
                let mut f = finding(
                    Problem::OrphanReservation,
                    what.clone(),
                    None,
                    format!(
                        "held by {}/{} but in no pool",
                        r.spec.podref, r.spec.containerid
                    ),
                );
                f.reservation = Some(name.clone());
                if young(r, orphan_age, jiff::Timestamp::now()) {
                    f.action = "none yet: younger than an ADD's deadline".into();
                }
                self.findings.push(f);
            }
            if let Some(upstream) = name.strip_prefix('0').filter(|u| u.starts_with('-')) {
                self.findings.push(finding(
                    Problem::MadeValidName,
                    what,
                    None,
                    format!("the Go binary names this reservation {upstream:?}, which Kubernetes refuses"),
                ));
            }
        }
    }

    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }
}

/// Whether the reservation may still be an ADD's under way (made, or taken over from an
/// earlier sandbox, before its pool entry). One made "in the future" (the operator's clock
/// behind the API server's) counts as young: taken as old, an ADD's reservation could be
/// removed before its entry is written.
fn young(r: &OverlappingRangeIPReservation, orphan_age: Duration, now: jiff::Timestamp) -> bool {
    let Some(since) = reservation::held_since(r) else {
        return true;
    };
    let age = now.as_second() - since;
    age < 0 || age.unsigned_abs() < orphan_age.as_secs()
}

impl Survey {
    /// Whether a repair is to be made.
    pub fn fixable(&self) -> bool {
        self.findings.iter().any(|f| f.action == "fixable")
    }

    /// Leaves unfixed what `earlier` did not find as well. A Go binary's ADD writes its pool
    /// entry first and its reservation a moment later, and the reservation a DEL leaves for
    /// last: a repair between the two would make that ADD fail, or leave a reservation no DEL
    /// removes. What two surveys some seconds apart both find is no write in flight.
    pub fn confirm(&mut self, earlier: &Survey) {
        // The detail names the holder: an address freed and taken again meanwhile is another
        // finding.
        let key = |f: &Finding| {
            let what = (f.object.clone(), f.reservation.clone(), f.detail.clone());
            (f.problem, what)
        };
        let seen: BTreeSet<_> = earlier.findings.iter().map(key).collect();
        for f in &mut self.findings {
            if f.action == "fixable" && !seen.contains(&key(f)) {
                f.action = "not fixed: found by the second survey only (a write may be in flight); run again".into();
            }
        }
    }
}

/// How long `doctor --fix` waits between its two surveys: longer than a Go binary's ADD takes
/// from its pool entry to its reservation.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Deletes an orphan reservation as `whereabouts gc` does: only once its pod is gone or has
/// finished (read just before), since a pool entry lost while its pod runs (an IPPool deleted
/// or restored by hand, a Go binary dropping an offset beyond 2^63) leaves the reservation the
/// one guard of a live address; and only while it is as listed. Returns the finding's action.
async fn release_orphan(engine: &Engine, orphan: &Unbacked) -> String {
    match kept_for_its_pod(engine, orphan).await {
        Ok(None) => {}
        Ok(Some(why)) => return format!("not fixed: {why}"),
        Err(err) => return format!("not fixed: {err}"),
    }
    match engine.release_unbacked(&orphan.reservation).await {
        Ok(true) => "fixed".into(),
        Ok(false) => "not fixed: changed or held again meanwhile; run again".into(),
        Err(err) => format!("not fixed: {}", err.describe()),
    }
}

/// Why an orphan reservation stays for its pod (alive, or not finished), read just now; none
/// when its pod is gone or has finished. The error says which pod could not be read.
async fn kept_for_its_pod(engine: &Engine, orphan: &Unbacked) -> Result<Option<String>, String> {
    let pod_ref = orphan.reservation.attachment.pod_ref.as_deref();
    let pod = match pod_ref.filter(|r| !r.is_empty()) {
        Some(reference) => engine
            .kube
            .pod(reference)
            .await
            .map_err(|err| format!("cannot read pod {reference}: {}", chain(&err)))?,
        None => None,
    };
    Ok(match judge_holder(pod_ref, None, pod.as_ref()) {
        Verdict::Keep(why) => Some(format!(
            "{}, and the address may be in use (its pool entry lost?)",
            why.as_str()
        )),
        _ => None,
    })
}

/// For a run without `--fix`: an orphan reservation `--fix` would keep for its pod (see
/// [`release_orphan`]) is reported so, not as fixable; its pod is read as `--fix` reads it.
pub async fn judge_orphans(engine: &Engine, survey: &mut Survey) {
    for f in &mut survey.findings {
        if f.problem != Problem::OrphanReservation || f.action != "fixable" {
            continue;
        }
        let reservation = f.reservation.as_deref();
        let listed = reservation.and_then(|name| survey.reservations.get(name));
        let Some(orphan) = listed.cloned().and_then(Unbacked::of) else {
            continue;
        };
        match kept_for_its_pod(engine, &orphan).await {
            Ok(None) => {}
            Ok(Some(why)) => f.action = format!("none: {why}"),
            Err(err) => f.action = format!("fixable unless its pod runs: {err}"),
        }
    }
}

/// Repairs what is safe to repair, each with a conditional write, and records the outcome in
/// the findings: a missing reservation is created for the entry's attachment (a create fails
/// if someone made it meanwhile); an orphan reservation old enough whose pod is gone or has
/// finished is released as the engine releases one (see [`release_orphan`]): only if it is
/// still the object read (uid and resourceVersion), and while Go binaries may write the pools,
/// under their Lease and only if no pool holds its address again (a Go ADD of a pod's next
/// sandbox reuses the reservation unwritten, then writes its entry).
pub async fn fix(engine: &Engine, survey: &mut Survey) {
    let kube = &engine.kube;
    let entries = survey.reserved_by_entries();
    for f in &mut survey.findings {
        if f.action != "fixable" {
            continue;
        }
        let outcome = match f.problem {
            Problem::MissingReservation => {
                let Some(name) = f.reservation.clone() else {
                    continue;
                };
                match entries.get(&name) {
                    Some(who) => kube
                        .create_reservation(&reservation::new_object(&name, who))
                        .await
                        .map(|_| ()),
                    None => continue,
                }
            }
            Problem::OrphanReservation => {
                let Some(name) = f.reservation.as_deref() else {
                    continue;
                };
                let Some(orphan) = survey
                    .reservations
                    .get(name)
                    .cloned()
                    .and_then(Unbacked::of)
                else {
                    continue;
                };
                f.action = release_orphan(engine, &orphan).await;
                continue;
            }
            _ => continue,
        };
        f.action = match outcome {
            Ok(()) => "fixed".into(),
            Err(ApiError::AlreadyExists(_) | ApiError::Conflict(_)) => {
                "not fixed: changed meanwhile; run again".into()
            }
            Err(err) => format!("not fixed: {err}"),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{NodeSliceAllocation, NodeSlicePoolSpec, NodeSlicePoolStatus};

    #[test]
    fn a_reservation_made_after_the_operators_now_is_young() {
        let now = jiff::Timestamp::from_second(1_764_547_200).unwrap();
        let made = |minutes: i64| {
            let mut r = OverlappingRangeIPReservation::new("10.0.0.1", Default::default());
            let at = now + jiff::SignedDuration::from_mins(minutes);
            r.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
            r
        };
        let age = Duration::from_secs(300);
        assert!(young(&made(-1), age, now));
        assert!(!young(&made(-10), age, now));
        // The API server's clock ahead of the operator's.
        assert!(young(&made(10), age, now));
    }

    fn slices() -> Vec<NodeSlicePool> {
        let mut pool = NodeSlicePool::new(
            "blue",
            NodeSlicePoolSpec {
                range: "10.0.0.0/16".into(),
                slice_size: "24".into(),
            },
        );
        pool.status = Some(NodeSlicePoolStatus {
            allocations: vec![NodeSliceAllocation {
                node_name: "n1".into(),
                slice_range: "10.0.1.0/24".into(),
            }],
        });
        vec![pool]
    }

    #[test]
    fn a_repair_waits_for_a_second_survey_to_find_it_too() {
        use crate::k8s::crd::{IPAllocation, IPPoolSpec};
        // A pool of entries (key, container), with no reservations.
        let survey = |held: &[(&str, &str)]| {
            let allocations = held
                .iter()
                .map(|(k, container)| {
                    let entry = IPAllocation {
                        id: container.to_string(),
                        podref: format!("ns/{container}"),
                        ifname: "net1".into(),
                    };
                    (k.to_string(), entry)
                })
                .collect();
            let range = "10.9.0.0/24".into();
            let pool = IPPool::new("10.9.0.0-24", IPPoolSpec { range, allocations });
            Survey::of(
                vec![pool],
                Vec::new(),
                (&[], Described::default()),
                Duration::ZERO,
            )
        };
        let action = |survey: &Survey, address: &str| {
            let found = survey.findings().iter();
            let f = found
                .clone()
                .find(|f| f.address.as_deref() == Some(address));
            f.map(|f| f.action.clone()).unwrap_or_default()
        };
        let earlier = survey(&[("3", "a")]);
        // .4's entry is there, its reservation not yet: a write in flight.
        let mut later = survey(&[("3", "a"), ("4", "b")]);
        later.confirm(&earlier);
        assert_eq!(action(&later, "10.9.0.3"), "fixable");
        assert!(action(&later, "10.9.0.4").starts_with("not fixed"));
        // .3 freed and taken again meanwhile: its new holder's write may be in flight.
        let mut retaken = survey(&[("3", "c")]);
        retaken.confirm(&earlier);
        assert!(action(&retaken, "10.9.0.3").starts_with("not fixed"));
    }

    #[test]
    fn names_tell_network_and_node() {
        let c = |s: &str| Cidr::parse(s, false).unwrap();
        let s = slices();
        let read = |name: &str, range: &str| {
            let r = identify(name, &c(range), &s);
            (r.network, r.node, r.plain)
        };
        assert_eq!(
            read("10.9.0.0-24", "10.9.0.0/24"),
            (String::new(), None, String::new())
        );
        assert_eq!(
            read("red-10.9.0.0-24", "10.9.0.0/24"),
            ("red".into(), None, "red".into())
        );
        assert_eq!(
            read("blue-n1-10.0.1.0-24", "10.0.1.0/24"),
            ("blue".into(), Some(("n1".into(), true)), "blue-n1".into())
        );
        assert_eq!(
            read("blue-n2-10.0.2.0-24", "10.0.2.0/24"),
            ("blue".into(), Some(("n2".into(), false)), "blue-n2".into())
        );
        assert_eq!(
            read("n1-10.0.1.0-24", "10.0.1.0/24"),
            (String::new(), Some(("n1".into(), true)), "n1".into())
        );
    }

    /// A pool that is node n1's slice pool of `blue` and the pool a NetworkAttachmentDefinition
    /// describes for network `blue-n1` is reported; the slice pool of another node, or a name
    /// no description has, is not.
    #[test]
    fn a_slice_pool_that_is_another_networks_pool_is_reported() {
        use crate::k8s::crd::IPPoolSpec;
        let pool = |name: &str, range: &str| {
            let spec = IPPoolSpec {
                range: range.into(),
                allocations: Default::default(),
            };
            IPPool::new(name, spec)
        };
        let shared = "blue-n1-10.0.1.0-24";
        let found = |plain: &[&str]| {
            let described = Described {
                plain: plain.iter().map(|p| p.to_string()).collect(),
                ..Described::default()
            };
            let pools = vec![
                pool(shared, "10.0.1.0/24"),
                pool("blue-n2-10.0.2.0-24", "10.0.2.0/24"),
            ];
            let survey = Survey::of(pools, Vec::new(), (&slices(), described), Duration::ZERO);
            let found: Vec<(Problem, String)> = survey
                .findings()
                .iter()
                .map(|f| (f.problem, f.object.clone()))
                .collect();
            found
        };
        assert_eq!(
            found(&[shared, "blue-n2-10.0.2.0-24"]),
            [(Problem::SharedName, format!("IPPool/{shared}"))]
        );
        assert_eq!(found(&["10.0.1.0-24"]), []);
    }

    /// The entries of a node's slice pool of a sliced network that keeps no reservations need
    /// none: not reported missing, and `--fix` makes none. With reservations, one is missing.
    #[test]
    fn a_sliced_network_without_reservations_needs_none() {
        use crate::k8s::crd::{IPAllocation, IPPoolSpec};
        use crate::k8s::described::slice_pools_without_reservations;
        let entry = IPAllocation {
            id: "c1".into(),
            podref: "ns/p1".into(),
            ifname: "net1".into(),
        };
        let spec = IPPoolSpec {
            range: "10.0.1.0/24".into(),
            allocations: [("5".to_string(), entry)].into(),
        };
        let missing = |overlap: bool, plain: &[&str]| {
            let config = serde_json::json!({"cniVersion": "0.3.1", "name": "nad", "type": "macvlan",
                "ipam": {"type": "whereabouts", "range": "10.0.0.0/16", "node_slice_size": "24",
                         "network_name": "blue", "enable_overlapping_ranges": overlap}});
            let resource =
                kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&());
            let mut nad = kube::api::DynamicObject::new("nad", &resource).within("ns");
            nad.data = serde_json::json!({"spec": {"config": config.to_string()}});
            let described = Described {
                unreserved_slices: slice_pools_without_reservations(&[std::sync::Arc::new(nad)]),
                plain: plain.iter().map(|p| p.to_string()).collect(),
                ..Described::default()
            };
            let pools = vec![IPPool::new("blue-n1-10.0.1.0-24", spec.clone())];
            let survey = Survey::of(pools, Vec::new(), (&slices(), described), Duration::ZERO);
            let found = survey.findings().iter();
            found
                .filter(|f| f.problem == Problem::MissingReservation)
                .count()
        };
        assert_eq!(missing(false, &[]), 0);
        assert_eq!(missing(true, &[]), 1);
        // Also the pool of network `blue-n1`, which keeps reservations: its entry needs one.
        assert_eq!(missing(false, &["blue-n1-10.0.1.0-24"]), 1);
    }

    /// A pool named `n1-<range>` is node n1's slice pool of a network without a name, or the
    /// pool of network `n1`: a reservation of either reading is its entry's, none is deleted
    /// as an orphan, and a missing one is made for the slice reading.
    #[test]
    fn a_name_of_two_readings_keeps_the_reservations_of_both() {
        use crate::k8s::crd::{IPAllocation, IPPoolSpec, OverlappingRangeIPReservationSpec};
        let held = |ip: &str| {
            let entry = IPAllocation {
                id: format!("c{ip}"),
                podref: format!("ns/p{ip}"),
                ifname: "net1".into(),
            };
            (ip.to_string(), entry)
        };
        let spec = IPPoolSpec {
            range: "10.0.1.0/24".into(),
            allocations: [held("3"), held("4")].into_iter().collect(),
        };
        let pool = IPPool::new("n1-10.0.1.0-24", spec);
        // .3 reserved under network "n1" (the plain reading), .4 under none.
        let spec = OverlappingRangeIPReservationSpec {
            containerid: "c3".into(),
            podref: "ns/p3".into(),
            ifname: "net1".into(),
        };
        let name = reservation::name("10.0.1.3".parse().unwrap(), "n1");
        let r = OverlappingRangeIPReservation::new(&name, spec);
        let survey = Survey::of(
            vec![pool],
            vec![r],
            (&slices(), Described::default()),
            Duration::ZERO,
        );
        let problems: Vec<_> = survey.findings().iter().map(|f| f.problem).collect();
        assert_eq!(problems, [Problem::MissingReservation]);
        let missing = &survey.findings()[0];
        assert_eq!(missing.address.as_deref(), Some("10.0.1.4"));
        assert_eq!(missing.reservation.as_deref(), Some("10.0.1.4"));
    }

    /// An address two attachments hold gets no reservation from a repair, which would pick
    /// one of them: a human decides.
    #[test]
    fn an_address_held_twice_is_left_to_a_human() {
        use crate::k8s::crd::{IPAllocation, IPPoolSpec};
        let pool = |name: &str, range: &str, key: &str, container: &str| {
            let entry = IPAllocation {
                id: container.into(),
                podref: format!("ns/{container}"),
                ifname: "net1".into(),
            };
            let spec = IPPoolSpec {
                range: range.into(),
                allocations: [(key.to_string(), entry)].into_iter().collect(),
            };
            IPPool::new(name, spec)
        };
        // 10.9.0.5 in both: key 5 of the /24, key 1 of the /30 at .4.
        let pools = vec![
            pool("10.9.0.0-24", "10.9.0.0/24", "5", "a"),
            pool("10.9.0.4-30", "10.9.0.4/30", "1", "b"),
        ];
        let survey = Survey::of(
            pools,
            Vec::new(),
            (&[], Described::default()),
            Duration::ZERO,
        );
        let actions: BTreeSet<(Problem, String)> = survey
            .findings()
            .iter()
            .map(|f| (f.problem, f.action.clone()))
            .collect();
        let left = "none: the address is held twice (held_twice)".to_string();
        assert_eq!(
            actions,
            BTreeSet::from([
                (Problem::HeldTwice, "none".to_string()),
                (Problem::MissingReservation, left),
            ]),
            "{:?}",
            survey.findings()
        );
    }
}
