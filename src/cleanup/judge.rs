//! Whether cleanup may free an allocation, and why: a pure decision over the allocation and what the
//! cluster says about its pod. The controller, `whereabouts gc --dry-run` and
//! `whereabouts release` all decide with this one function, so they never disagree.

use std::collections::HashSet;
use std::fmt;

use crate::store::Allocation;

/// What the cluster says about a pod, as far as cleanup cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    pub uid: String,
    pub phase: PodPhase,
    /// Being deleted (a deletion timestamp is set), but still there.
    pub terminating: bool,
    /// The node it is scheduled on, once it is.
    pub node: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    pub fn parse(text: Option<&str>) -> PodPhase {
        match text {
            Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }
}

/// The decision about one allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep(KeepReason),
    Release(ReleaseReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// Recorded without a pod, or with a reference no pod can have (a runtime outside
    /// Kubernetes): only its runtime's DEL or GC can free it.
    NoPodReference,
    /// The pod is alive (running, or in an unknown phase that may still be running).
    PodAlive,
    /// The pod has not started yet; its ADD may still be in flight.
    PodPending,
    /// A pod of the same name exists with another UID: re-created (a StatefulSet), and its
    /// repeated ADD claims this same address.
    PodRecreated,
    /// The pod is being deleted; its runtime's DEL is still to come.
    PodTerminating,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    /// No pod of that name exists.
    PodGone,
    /// The pod ran to completion or failed: its sandbox is gone.
    PodFinished,
    /// The address is in a node's slice pool, and the pod of that name runs on another node,
    /// where it holds an address of the same network and interface from that node's slice: a
    /// new pod (a StatefulSet's, its node lost), whose ADD drew from its own node's slice.
    PodMoved,
}

impl KeepReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            KeepReason::NoPodReference => "no pod reference recorded",
            KeepReason::PodAlive => "pod is alive",
            KeepReason::PodPending => "pod is pending",
            KeepReason::PodRecreated => "pod was re-created with the same name",
            KeepReason::PodTerminating => "pod is terminating",
        }
    }
}

impl KeepReason {
    /// A short stable label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            KeepReason::NoPodReference => "no_pod_reference",
            KeepReason::PodAlive => "pod_alive",
            KeepReason::PodPending => "pod_pending",
            KeepReason::PodRecreated => "pod_recreated",
            KeepReason::PodTerminating => "pod_terminating",
        }
    }
}

impl ReleaseReason {
    /// A short stable label, for metrics and events.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReleaseReason::PodGone => "pod_deleted",
            ReleaseReason::PodFinished => "pod_finished",
            ReleaseReason::PodMoved => "pod_moved",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Keep(r) => write!(f, "keep: {}", r.as_str()),
            Verdict::Release(ReleaseReason::PodGone) => write!(f, "release: pod no longer exists"),
            Verdict::Release(ReleaseReason::PodFinished) => {
                write!(f, "release: pod has finished (Succeeded or Failed)")
            }
            Verdict::Release(ReleaseReason::PodMoved) => {
                write!(
                    f,
                    "release: pod runs on another node than the slice holding it"
                )
            }
        }
    }
}

/// Where pods hold addresses from node slices: (network, pod, interface, node) of every
/// allocation of a slice pool.
#[derive(Debug, Default)]
pub struct SliceHolders(HashSet<(String, String, String, String)>);

impl SliceHolders {
    pub fn of<'a>(allocations: impl IntoIterator<Item = &'a Allocation>) -> SliceHolders {
        let held = allocations.into_iter().filter_map(|a| {
            Some((
                a.network_name.clone(),
                a.attachment.pod_ref.clone()?,
                a.attachment.ifname.clone(),
                a.slice_node.clone()?,
            ))
        });
        SliceHolders(held.collect())
    }

    /// Whether the pod of `allocation` holds an address of its network and interface from the
    /// slice of `node`.
    fn holds_on(&self, allocation: &Allocation, node: &str) -> bool {
        let Some(pod_ref) = &allocation.attachment.pod_ref else {
            return false;
        };
        let key = (
            allocation.network_name.clone(),
            pod_ref.clone(),
            allocation.attachment.ifname.clone(),
            node.to_string(),
        );
        self.0.contains(&key)
    }
}

/// Decides about `allocation` given the pod its pod reference names (`None`: no such pod) and
/// where pods hold addresses from node slices.
pub fn judge(allocation: &Allocation, pod: Option<&PodState>, slices: &SliceHolders) -> Verdict {
    let verdict = judge_holder(
        allocation.attachment.pod_ref.as_deref(),
        allocation.attachment.pod_uid.as_deref(),
        pod,
    );
    // Only a node's own pods draw from its slice: a pod of that name elsewhere is another
    // pod (an entry records no UID to say so), and nothing else would ever free this address.
    // It counts as moved once it holds the same network's address from its new node's slice:
    // a pool read as a node's slice may be another network's plain pool whose name reads
    // alike (a network `net-w1` beside a sliced network `net` with a node `w1`), whose pods
    // run anywhere and hold nothing from slices.
    let elsewhere = |pod: &PodState| {
        let on = pod.node.as_deref();
        allocation.slice_node.as_deref().is_some_and(|slice| {
            on.is_some_and(|on| on != slice && slices.holds_on(allocation, on))
        })
    };
    match (verdict, pod) {
        (Verdict::Keep(_), Some(pod)) if elsewhere(pod) => {
            Verdict::Release(ReleaseReason::PodMoved)
        }
        (verdict, _) => verdict,
    }
}

/// As [`judge`], for any record naming a pod (and maybe its UID), such as an overlapping-range
/// reservation.
pub fn judge_holder(
    pod_ref: Option<&str>,
    pod_uid: Option<&str>,
    pod: Option<&PodState>,
) -> Verdict {
    // Only `namespace/name` of two object names can name a pod; anything else was not
    // recorded by a pod's ADD (runtimes outside Kubernetes pass K8S_POD_NAMESPACE and
    // K8S_POD_NAME too: podman's CNI library sets both to the container's name, `web_1`), so
    // no pod's absence says anything about it.
    let names_a_pod = pod_ref.and_then(super::pods::namespace_and_name).is_some();
    if !names_a_pod {
        return Verdict::Keep(KeepReason::NoPodReference);
    }
    let Some(pod) = pod else {
        return Verdict::Release(ReleaseReason::PodGone);
    };
    let same_pod = pod_uid.is_none_or(|uid| uid.is_empty() || uid == pod.uid);
    if !same_pod {
        return Verdict::Keep(KeepReason::PodRecreated);
    }
    if pod.terminating {
        return Verdict::Keep(KeepReason::PodTerminating);
    }
    match pod.phase {
        PodPhase::Pending => Verdict::Keep(KeepReason::PodPending),
        PodPhase::Running | PodPhase::Unknown => Verdict::Keep(KeepReason::PodAlive),
        PodPhase::Succeeded | PodPhase::Failed => Verdict::Release(ReleaseReason::PodFinished),
    }
}

/// Where the pod an allocation names is, as a node's CNI GC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodPlace {
    /// No pod of that name exists.
    Gone,
    /// The pod exists, with this UID, scheduled on this node (`None`: not scheduled yet).
    Exists { uid: String, node: Option<String> },
}

/// Whether a node's CNI GC may release an entry its runtime left out of the valid list. That
/// list holds this network configuration's attachments on this node only, and an entry in the
/// upstream format records neither its node nor its network configuration: every network of
/// the same range and `network_name` draws from one pool, so a live pod's entry may be another
/// network's attachment, which this list never names. So the entry is a leak only when its pod
/// is gone, or the name is a new pod's (another UID), or, in this node's slice pool (which only
/// this node's pods draw from), the pod runs on another node and holds an address of the
/// network from that node's slice (`moved_off`, which the caller looks up: a plain pool of
/// another network may be named like this node's slice pool, and its pods run anywhere). A pod
/// not scheduled yet, and a record that names no pod, are never touched.
pub fn leaked_on_node(
    pod_ref: Option<&str>,
    pod_uid: Option<&str>,
    place: &PodPlace,
    node: &str,
    moved_off: bool,
) -> bool {
    // A reference no pod can have (a runtime outside Kubernetes: see `judge_holder`) says
    // nothing about the entry's owner.
    if pod_ref.and_then(super::pods::namespace_and_name).is_none() {
        return false;
    }
    match place {
        PodPlace::Gone => true,
        PodPlace::Exists { uid, node: on } => {
            let recreated = pod_uid.is_some_and(|recorded| !recorded.is_empty() && recorded != uid);
            let elsewhere = moved_off && on.as_deref().is_some_and(|on| on != node);
            recreated || elsewhere
        }
    }
}

/// Whether a pod deletion seen by a watch concerns `allocation`: it names that pod, and the UID (when
/// both are known) is the deleted pod's. A candidate only: the final word is [`judge`] against
/// the pod of that name as it is now, so a StatefulSet pod re-created in the meantime keeps its
/// address.
pub fn freed_by_deletion(allocation: &Allocation, pod_ref: &str, deleted_uid: &str) -> bool {
    allocation.attachment.pod_ref.as_deref() == Some(pod_ref)
        && allocation
            .attachment
            .pod_uid
            .as_deref()
            .is_none_or(|uid| uid.is_empty() || uid == deleted_uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Cidr;
    use crate::store::Attachment;

    fn allocation(pod: Option<&str>, uid: Option<&str>) -> Allocation {
        Allocation {
            pool: "10.0.0.0-24".into(),
            range: Cidr::parse("10.0.0.0/24", false).unwrap(),
            ip: "10.0.0.1".parse().unwrap(),
            network_name: String::new(),
            cni_network: None,
            slice_node: None,
            attachment: Attachment {
                container_id: "c".into(),
                ifname: "net1".into(),
                pod_ref: pod.map(String::from),
                pod_uid: uid.map(String::from),
            },
        }
    }

    fn pod(uid: &str, phase: PodPhase, terminating: bool) -> PodState {
        PodState {
            uid: uid.into(),
            phase,
            terminating,
            node: None,
        }
    }

    #[test]
    fn a_slice_entry_of_a_pod_now_on_another_node_is_released() {
        let mut l = allocation(Some("ns/web-0"), None);
        l.network_name = "net".into();
        l.slice_node = Some("node-a".into());
        // Its ADD on node-b drew from node-b's slice.
        let mut there = allocation(Some("ns/web-0"), Some("u2"));
        there.network_name = "net".into();
        there.slice_node = Some("node-b".into());
        let slices = SliceHolders::of([&l, &there]);
        let on = |node: Option<&str>, phase, terminating| PodState {
            node: node.map(String::from),
            ..pod("u2", phase, terminating)
        };
        let judged = |l: &Allocation, pod: PodState| judge(l, Some(&pod), &slices);
        let moved = Verdict::Release(ReleaseReason::PodMoved);
        assert_eq!(
            judged(&l, on(Some("node-b"), PodPhase::Running, false)),
            moved
        );
        assert_eq!(
            judged(&l, on(Some("node-b"), PodPhase::Pending, true)),
            moved
        );
        // On the slice's own node, or not scheduled yet: the pod may hold it.
        let alive = Verdict::Keep(KeepReason::PodAlive);
        assert_eq!(
            judged(&l, on(Some("node-a"), PodPhase::Running, false)),
            alive
        );
        let pending = Verdict::Keep(KeepReason::PodPending);
        assert_eq!(judged(&l, on(None, PodPhase::Pending, false)), pending);
        // On a node where it holds nothing from a slice of the network (yet, or ever: the pool
        // is another network's whose name reads like a node's slice pool), it keeps it.
        assert_eq!(
            judged(&l, on(Some("node-c"), PodPhase::Running, false)),
            alive
        );
        let mut other_interface = l.clone();
        other_interface.attachment.ifname = "net2".into();
        assert_eq!(
            judged(
                &other_interface,
                on(Some("node-b"), PodPhase::Running, false)
            ),
            alive
        );
        // Outside node slices, a pod that moved keeps its address (a StatefulSet's).
        l.slice_node = None;
        assert_eq!(
            judged(&l, on(Some("node-b"), PodPhase::Running, false)),
            alive
        );
    }

    #[test]
    fn decisions() {
        let l = allocation(Some("ns/a"), Some("u1"));
        // No node slices here.
        let verdict =
            |l: &Allocation, pod: Option<&PodState>| judge(l, pod, &SliceHolders::default());
        assert_eq!(verdict(&l, None), Verdict::Release(ReleaseReason::PodGone));
        assert_eq!(
            verdict(&l, Some(&pod("u1", PodPhase::Running, false))),
            Verdict::Keep(KeepReason::PodAlive)
        );
        assert_eq!(
            verdict(&l, Some(&pod("u1", PodPhase::Pending, false))),
            Verdict::Keep(KeepReason::PodPending)
        );
        assert_eq!(
            verdict(&l, Some(&pod("u2", PodPhase::Pending, false))),
            Verdict::Keep(KeepReason::PodRecreated)
        );
        assert_eq!(
            verdict(&l, Some(&pod("u1", PodPhase::Running, true))),
            Verdict::Keep(KeepReason::PodTerminating)
        );
        assert_eq!(
            verdict(&l, Some(&pod("u1", PodPhase::Succeeded, false))),
            Verdict::Release(ReleaseReason::PodFinished)
        );
        assert_eq!(
            verdict(&l, Some(&pod("u1", PodPhase::Unknown, false))),
            Verdict::Keep(KeepReason::PodAlive)
        );
        // Without a recorded UID the pod of that name is taken to be the one.
        let no_uid = allocation(Some("ns/a"), None);
        assert_eq!(
            verdict(&no_uid, Some(&pod("u9", PodPhase::Failed, false))),
            Verdict::Release(ReleaseReason::PodFinished)
        );
        for no_pod in [
            None,
            Some(""),
            Some("bare-name"),
            Some("/x"),
            Some("ns/"),
            Some("a/b/c"),
            Some("web_1/web_1"),
            Some("Team/pod"),
            Some("ns/..x"),
        ] {
            assert_eq!(
                verdict(&allocation(no_pod, None), None),
                Verdict::Keep(KeepReason::NoPodReference),
                "{no_pod:?}"
            );
        }
    }

    #[test]
    fn deletions_match_by_uid() {
        let l = allocation(Some("ns/a"), Some("u1"));
        assert!(freed_by_deletion(&l, "ns/a", "u1"));
        assert!(
            !freed_by_deletion(&l, "ns/a", "u0"),
            "an older pod of the same name"
        );
        assert!(!freed_by_deletion(&l, "ns/b", "u1"));
        assert!(freed_by_deletion(
            &allocation(Some("ns/a"), None),
            "ns/a",
            "anything"
        ));
    }

    #[test]
    fn a_node_gc_frees_only_gone_pods_and_its_slices_strays() {
        let on = |node: &str| PodPlace::Exists {
            uid: "u1".into(),
            node: Some(node.into()),
        };
        let pod = Some("ns/a");
        for in_slice in [false, true] {
            assert!(leaked_on_node(pod, None, &PodPlace::Gone, "n1", in_slice));
            // A live pod on this node: its entry may be another network's attachment.
            assert!(!leaked_on_node(pod, Some("u1"), &on("n1"), "n1", in_slice));
            let unscheduled = PodPlace::Exists {
                uid: "u1".into(),
                node: None,
            };
            assert!(!leaked_on_node(pod, None, &unscheduled, "n1", in_slice));
            // The name now belongs to a new pod elsewhere: the recorded pod is gone.
            assert!(leaked_on_node(pod, Some("u0"), &on("n2"), "n1", in_slice));
            // No pod named: nothing says whose it is.
            assert!(!leaked_on_node(None, None, &PodPlace::Gone, "n1", in_slice));
            for no_pod in ["no-slash", "web_1/web_1", "Team/pod"] {
                let gone = &PodPlace::Gone;
                assert!(!leaked_on_node(Some(no_pod), None, gone, "n1", in_slice));
            }
        }
        // Another node's live pod: kept in a shared pool, or in this node's slice pool unless it
        // holds the network's address from its own node's slice; then a stray.
        assert!(!leaked_on_node(pod, Some("u1"), &on("n2"), "n1", false));
        assert!(leaked_on_node(pod, None, &on("n2"), "n1", true));
    }
}
