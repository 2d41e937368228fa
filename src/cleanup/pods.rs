//! What the cluster says about pods: the one place cleanup reads them, for the controller
//! (async, inside its runtime) and for the operator's commands (a small runtime of their own).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

use super::judge::{PodPhase, PodState};
use crate::config::{Datastore, IpamConfig};
use crate::ipam::names::is_valid_object_name;
use crate::k8s::cluster::{self, is_transient, Access, ClusterError};

/// How pod reads are retried through transient failures (a server answering 429 while it
/// starts, a 5xx, a dropped connection): a few attempts within about two seconds, so a command
/// or a sweep rides out a hiccup but a server that is down is reported soon.
fn patiently() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_millis(800))
        .with_max_times(4)
        .with_jitter()
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("cannot read pods")]
    Cluster(#[from] ClusterError),
    #[error("cannot read pods from the Kubernetes API")]
    Api(#[from] kube::Error),
    #[error("cannot start the I/O runtime")]
    Runtime(#[from] std::io::Error),
}

/// Chooses how pods are read: an explicit kubeconfig, else the Kubernetes engine's own (when
/// it exists or no service account is at hand), else `$KUBECONFIG`, else the in-cluster
/// service account; None when there is none of these.
pub fn cluster_source(explicit: Option<&Path>, ipam: &IpamConfig) -> Option<Access> {
    if let Some(path) = explicit {
        return Some(Access::Kubeconfig(path.to_path_buf()));
    }
    let in_pod = cluster::in_pod();
    if let Datastore::Kubernetes(k) = &ipam.datastore {
        // Inside a pod, the node's kubeconfig path may not exist: the service account then.
        if !in_pod || k.kubeconfig.exists() {
            return Some(Access::Kubeconfig(k.kubeconfig.clone()));
        }
    }
    if let Some(first) = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()))
    {
        return Some(Access::Kubeconfig(first));
    }
    in_pod.then_some(Access::InCluster)
}

/// Builds a client; must run inside a tokio runtime. `read_timeout` must outlast watches.
/// The kubeconfig is read and screened as the engine reads its own, with the admin's
/// `allow_insecure_tls`.
pub async fn client(
    source: &Access,
    read_timeout: Duration,
    insecure_tls: bool,
) -> Result<Client, PodError> {
    let timeouts = cluster::Timeouts {
        connect: Duration::from_secs(10),
        read: read_timeout,
        write: Duration::from_secs(10),
        library_retries: true,
    };
    Ok(cluster::connect(source, timeouts, insecure_tls)
        .await?
        .client)
}

/// The part of a pod cleanup decides on.
pub fn pod_state(pod: &Pod) -> PodState {
    PodState {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        phase: PodPhase::parse(pod.status.as_ref().and_then(|s| s.phase.as_deref())),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        node: pod.spec.as_ref().and_then(|spec| spec.node_name.clone()),
    }
}

/// `namespace/name` of a pod.
pub fn pod_ref(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The pod named `namespace/name` as it is now; None when it does not exist (or the reference
/// is not of that form, so no pod can have it).
pub async fn get(client: &Client, reference: &str) -> Result<Option<PodState>, PodError> {
    let Some((ns, name)) = namespace_and_name(reference) else {
        return Ok(None);
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    (|| api.get_opt(name))
        .retry(patiently())
        .when(is_transient)
        .await
        .map(|pod| pod.as_ref().map(pod_state))
        .map_err(PodError::from)
}

/// The parts of a `namespace/name` reference that a pod can have: both valid object names.
/// References come from the store, where anyone who could write it put them, and kube's
/// requests put the parts into the path as they are: a `/`, `..`, `?` or `%` would ask for
/// another object than the pod.
pub(crate) fn namespace_and_name(reference: &str) -> Option<(&str, &str)> {
    let (ns, name) = reference.split_once('/')?;
    (is_valid_object_name(ns) && is_valid_object_name(name)).then_some((ns, name))
}

/// Every pod of the cluster, keyed by `namespace/name`.
pub async fn list(client: &Client) -> Result<HashMap<String, PodState>, PodError> {
    let api: Api<Pod> = Api::all(client.clone());
    let mut out = HashMap::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = (|| api.list(&params))
            .retry(patiently())
            .when(is_transient)
            .await?;
        for pod in &page.items {
            out.insert(pod_ref(pod), pod_state(pod));
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// Pods for the operator's commands: a client on a small runtime of its own.
pub struct PodReader {
    runtime: tokio::runtime::Runtime,
    client: Client,
    pub source: Access,
}

impl PodReader {
    pub fn open(source: Access, insecure_tls: bool) -> Result<PodReader, PodError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime.block_on(client(&source, Duration::from_secs(30), insecure_tls))?;
        Ok(PodReader {
            runtime,
            client,
            source,
        })
    }

    pub fn get(&self, reference: &str) -> Result<Option<PodState>, PodError> {
        self.runtime.block_on(get(&self.client, reference))
    }

    pub fn list(&self) -> Result<HashMap<String, PodState>, PodError> {
        self.runtime.block_on(list(&self.client))
    }
}

#[cfg(test)]
mod tests {
    use super::namespace_and_name;

    #[test]
    fn only_references_a_pod_can_have_are_asked_for() {
        assert_eq!(namespace_and_name("ns/pod-1"), Some(("ns", "pod-1")));
        assert_eq!(
            namespace_and_name("kube-system/a.b"),
            Some(("kube-system", "a.b"))
        );
        for reference in [
            "pod",
            "/pod",
            "ns/",
            "ns/a/../../secrets/x",
            "ns/..",
            "ns/pod?watch=true",
            "ns/pod%2F",
            "../x/pod",
            "NS/pod",
            "ns/pod\n",
        ] {
            assert_eq!(namespace_and_name(reference), None, "{reference}");
        }
    }
}
