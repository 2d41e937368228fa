//! Kubernetes Events for what the controller frees, on the pod's namespace, so `kubectl
//! describe pod` and `kubectl get events` show who took an address away and why.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::cleanup::cron::rfc3339;
use crate::cleanup::judge::Verdict;
use crate::store::Lease;

pub const REASON: &str = "AddressReleased";
pub const COMPONENT: &str = "whereabouts-controller";

pub struct Released<'a> {
    pub lease: &'a Lease,
    pub pod_uid: Option<String>,
    pub verdict: &'a Verdict,
}

fn now() -> Option<Time> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    serde_json::from_value(serde_json::Value::String(rfc3339(secs))).ok()
}

/// The Event for one release; None when the lease names no pod to attach it to.
pub fn event(released: &Released) -> Option<Event> {
    let (ns, name) = released
        .lease
        .attachment
        .pod_ref
        .as_deref()?
        .split_once('/')?;
    if ns.is_empty() || name.is_empty() {
        return None;
    }
    let lease = released.lease;
    Some(Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(ns.to_string()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            uid: released.pod_uid.clone().filter(|u| !u.is_empty()),
            ..ObjectReference::default()
        },
        reason: Some(REASON.into()),
        message: Some(format!(
            "whereabouts released {} (pool {}, container {}, interface {}): {}",
            lease.ip,
            lease.pool,
            lease.attachment.container_id,
            lease.attachment.ifname,
            released.verdict
        )),
        type_: Some("Normal".into()),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: None,
        }),
        reporting_component: Some(COMPONENT.into()),
        count: Some(1),
        first_timestamp: now(),
        last_timestamp: now(),
        ..Event::default()
    })
}

pub async fn post(client: &Client, released: &Released<'_>) -> Result<(), kube::Error> {
    let Some(event) = event(released) else {
        return Ok(());
    };
    let ns = event.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &event).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::judge::ReleaseReason;
    use crate::ipam::Cidr;
    use crate::store::Attachment;

    #[test]
    fn event_on_the_pods_namespace() {
        let lease = Lease {
            pool: "10.0.0.0-24".into(),
            range: Cidr::parse("10.0.0.0/24", false).unwrap(),
            ip: "10.0.0.7".parse().unwrap(),
            network_name: String::new(),
            cni_network: None,
            attachment: Attachment {
                container_id: "c1".into(),
                ifname: "net1".into(),
                pod_ref: Some("team/web-0".into()),
                pod_uid: None,
            },
        };
        let verdict = Verdict::Release(ReleaseReason::PodGone);
        let e = event(&Released {
            lease: &lease,
            pod_uid: Some("u1".into()),
            verdict: &verdict,
        })
        .unwrap();
        assert_eq!(e.metadata.namespace.as_deref(), Some("team"));
        assert_eq!(e.involved_object.name.as_deref(), Some("web-0"));
        assert_eq!(e.involved_object.uid.as_deref(), Some("u1"));
        assert_eq!(e.reason.as_deref(), Some(REASON));
        assert!(e.message.unwrap().contains("10.0.0.7"));
        let mut no_pod = lease.clone();
        no_pod.attachment.pod_ref = None;
        assert!(event(&Released {
            lease: &no_pod,
            pod_uid: None,
            verdict: &verdict,
        })
        .is_none());
    }
}
