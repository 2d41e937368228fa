//! Kubernetes Events for what the controller frees, on the pod's namespace, so `kubectl
//! describe pod` and `kubectl get events` show who took an address away and why. Posted by
//! kube's `Recorder` (events.k8s.io), a new one for each Event: a recorder folds an Event of
//! the same pod and reason within minutes into the first's series, by a patch that keeps the
//! first's note, so a pod's second address released would be reported as its first (and the
//! controller may only create Events).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

use crate::cleanup::judge::Verdict;
use crate::store::Allocation;

pub const REASON: &str = "AddressReleased";
pub const COMPONENT: &str = "whereabouts-controller";

pub struct Released<'a> {
    pub allocation: &'a Allocation,
    pub pod_uid: Option<String>,
    pub verdict: &'a Verdict,
}

/// Who reports this replica's Events: the reporting instance is the pod's name where known.
pub fn reporter() -> Reporter {
    let instance = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty());
    Reporter {
        controller: COMPONENT.into(),
        instance,
    }
}

/// Posts `released`'s Event, regarding `pod`, as a new Event (see the module's note).
pub async fn publish(
    client: Client,
    reporter: Reporter,
    released: Event,
    pod: &ObjectReference,
) -> Result<(), kube::Error> {
    Recorder::new(client, reporter)
        .publish(&released, pod)
        .await
}

/// The pod an Event is about; None when the allocation names no pod (or a reference no pod
/// can have).
pub fn regarding(released: &Released) -> Option<ObjectReference> {
    let pod_ref = released.allocation.attachment.pod_ref.as_deref()?;
    let (ns, name) = crate::cleanup::pods::namespace_and_name(pod_ref)?;
    Some(ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.to_string()),
        namespace: Some(ns.to_string()),
        uid: released.pod_uid.clone().filter(|u| !u.is_empty()),
        ..ObjectReference::default()
    })
}

pub fn event(released: &Released) -> Event {
    let allocation = released.allocation;
    Event {
        type_: EventType::Normal,
        reason: REASON.into(),
        note: Some(format!(
            "whereabouts released {} (pool {}, container {}, interface {}): {}",
            allocation.ip,
            allocation.pool,
            allocation.attachment.container_id,
            allocation.attachment.ifname,
            released.verdict
        )),
        action: "Release".into(),
        secondary: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::judge::ReleaseReason;
    use crate::ipam::Cidr;
    use crate::store::Attachment;

    #[test]
    fn event_on_the_pods_namespace() {
        let allocation = Allocation {
            pool: "10.0.0.0-24".into(),
            range: Cidr::parse("10.0.0.0/24", false).unwrap(),
            ip: "10.0.0.7".parse().unwrap(),
            network_name: String::new(),
            cni_network: None,
            slice_node: None,
            attachment: Attachment {
                container_id: "c1".into(),
                ifname: "net1".into(),
                pod_ref: Some("team/web-0".into()),
                pod_uid: None,
            },
        };
        let verdict = Verdict::Release(ReleaseReason::PodGone);
        let released = Released {
            allocation: &allocation,
            pod_uid: Some("u1".into()),
            verdict: &verdict,
        };
        let pod = regarding(&released).unwrap();
        assert_eq!(pod.namespace.as_deref(), Some("team"));
        assert_eq!(pod.name.as_deref(), Some("web-0"));
        assert_eq!(pod.uid.as_deref(), Some("u1"));
        let e = event(&released);
        assert_eq!(e.reason, REASON);
        assert!(e.note.unwrap().contains("10.0.0.7"));
        let mut no_pod = allocation.clone();
        no_pod.attachment.pod_ref = None;
        assert!(regarding(&Released {
            allocation: &no_pod,
            pod_uid: None,
            verdict: &verdict,
        })
        .is_none());
    }
}
