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
