//! What the cluster says about pods: the one place cleanup reads them, for the controller
//! (async, inside its runtime) and for the operator's commands (a small runtime of their own).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use super::judge::{PodPhase, PodState};
use crate::config::{Datastore, IpamConfig};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("cannot read pods: {0}")]
    Config(String),
    #[error("cannot read pods from the Kubernetes API: {0}")]
    Api(String),
}

/// Where the cluster's pods are read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterSource {
    Kubeconfig(PathBuf),
    InCluster,
}

impl std::fmt::Display for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterSource::Kubeconfig(p) => write!(f, "kubeconfig {}", p.display()),
            ClusterSource::InCluster => write!(f, "in-cluster service account"),
        }
    }
}

/// Chooses the source of pods: an explicit kubeconfig, else the Kubernetes engine's own (when
/// it exists or no service account is at hand), else `$KUBECONFIG`, else the in-cluster
/// service account; None when there is none of these.
pub fn cluster_source(explicit: Option<&Path>, ipam: &IpamConfig) -> Option<ClusterSource> {
    if let Some(path) = explicit {
        return Some(ClusterSource::Kubeconfig(path.to_path_buf()));
    }
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if let Datastore::Kubernetes(k) = &ipam.datastore {
        // Inside a pod, the node's kubeconfig path may not exist: the service account then.
        if !in_cluster || k.kubeconfig.exists() {
            return Some(ClusterSource::Kubeconfig(k.kubeconfig.clone()));
        }
    }
    if let Some(first) = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()))
    {
        return Some(ClusterSource::Kubeconfig(first));
    }
    if in_cluster {
        return Some(ClusterSource::InCluster);
    }
    None
}

/// Builds a client; must run inside a tokio runtime. `read_timeout` must outlast watches.
pub async fn client(source: &ClusterSource, read_timeout: Duration) -> Result<Client, PodError> {
    let mut config = match source {
        ClusterSource::Kubeconfig(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                PodError::Config(format!("cannot read kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    PodError::Config(format!("cannot use kubeconfig {}: {e}", path.display()))
                })?
        }
        ClusterSource::InCluster => crate::store::kubernetes::in_cluster_config()
            .await
            .map_err(|e| PodError::Config(format!("in-cluster configuration: {e}")))?,
    };
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(read_timeout);
    config.write_timeout = Some(Duration::from_secs(10));
    if config.cluster_url.scheme_str() == Some("http") && config.root_cert.is_none() {
        // Plain HTTP never verifies a certificate: no need for the system trust store.
        config.root_cert = Some(Vec::new());
    }
    Client::try_from(config).map_err(|e| PodError::Config(format!("cannot build a client: {e}")))
}

/// The part of a pod cleanup decides on.
pub fn pod_state(pod: &Pod) -> PodState {
    PodState {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        phase: PodPhase::parse(pod.status.as_ref().and_then(|s| s.phase.as_deref())),
        terminating: pod.metadata.deletion_timestamp.is_some(),
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
    let Some((ns, name)) = reference.split_once('/') else {
        return Ok(None);
    };
    if ns.is_empty() || name.is_empty() {
        return Ok(None);
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.get_opt(name)
        .await
        .map(|pod| pod.as_ref().map(pod_state))
        .map_err(|e| PodError::Api(e.to_string()))
}

/// Every pod of the cluster, keyed by `namespace/name`.
pub async fn list(client: &Client) -> Result<HashMap<String, PodState>, PodError> {
    let api: Api<Pod> = Api::all(client.clone());
    let mut out = HashMap::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(|e| PodError::Api(e.to_string()))?;
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
    pub source: ClusterSource,
}

impl PodReader {
    pub fn open(source: ClusterSource) -> Result<PodReader, PodError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PodError::Config(format!("cannot start the I/O runtime: {e}")))?;
        let client = runtime.block_on(client(&source, Duration::from_secs(30)))?;
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
