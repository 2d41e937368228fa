//! A whole sweep decided at once: every allocation judged against the pods that exist. Shared by the
//! controller's reconcile and `whereabouts gc`, so both free exactly the same addresses.

use std::collections::HashMap;

use super::judge::{judge, PodState, SliceHolders, Verdict};
use crate::store::{Allocation, Store, StoreError};

/// One allocation and what cleanup decides about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allocation: Allocation,
    pub verdict: Verdict,
}

/// Judges every allocation against `pods` (keyed by `namespace/name`).
///
/// The pods must have been listed *after* the allocations: a allocation is written only once its pod
/// exists, so every allocation of the list then has its pod in the pod list unless that pod is gone.
/// Listing in the other order would free the address of a pod created in between.
pub fn plan(allocations: Vec<Allocation>, pods: &HashMap<String, PodState>) -> Vec<Decision> {
    let slices = SliceHolders::of(&allocations);
    allocations
        .into_iter()
        .map(|allocation| {
            let pod = allocation
                .attachment
                .pod_ref
                .as_ref()
                .and_then(|r| pods.get(r));
            let verdict = judge(&allocation, pod, &slices);
            Decision {
                allocation,
                verdict,
            }
        })
        .collect()
}

/// Frees one allocation *only while the attachment judged still holds it*: that container and
/// interface, in that pool, at that address. Between the decision and this write the runtime's
/// own DEL may have freed the address and another pod taken it; an unconditional release would
/// then take the new pod's address away. The attachment's other addresses (another range of a
/// dual-stack network) are judged and freed on their own: a release asked for one address must
/// not free another a live pod still uses.
pub fn release_if_held(
    store: &dyn Store,
    allocation: &Allocation,
) -> Result<Option<Allocation>, StoreError> {
    store.release(
        &allocation.pool,
        allocation.ip,
        Some(&allocation.attachment),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::judge::{KeepReason, PodPhase, ReleaseReason};
    use crate::ipam::Cidr;
    use crate::store::Attachment;

    fn allocation(ip: &str, pod: &str) -> Allocation {
        Allocation {
            pool: "p".into(),
            range: Cidr::parse("10.0.0.0/24", false).unwrap(),
            ip: ip.parse().unwrap(),
            network_name: String::new(),
            cni_network: None,
            slice_node: None,
            attachment: Attachment {
                container_id: "c".into(),
                ifname: "net1".into(),
                pod_ref: Some(pod.into()),
                pod_uid: None,
            },
        }
    }

    #[test]
    fn each_allocation_judged_against_its_pod() {
        let mut pods = HashMap::new();
        pods.insert(
            "ns/alive".to_string(),
            PodState {
                uid: "u".into(),
                phase: PodPhase::Running,
                terminating: false,
                node: None,
            },
        );
        let out = plan(
            vec![
                allocation("10.0.0.1", "ns/alive"),
                allocation("10.0.0.2", "ns/gone"),
            ],
            &pods,
        );
        assert_eq!(out[0].verdict, Verdict::Keep(KeepReason::PodAlive));
        assert_eq!(out[1].verdict, Verdict::Release(ReleaseReason::PodGone));
    }
}
