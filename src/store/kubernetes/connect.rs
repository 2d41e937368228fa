//! From the kubeconfig file to a client: the server, the credentials, the namespace, timeouts.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

use super::settings::Settings;
use crate::store::StoreError;

/// Where the objects live when the kubeconfig's context names no namespace (as upstream).
pub const DEFAULT_NAMESPACE: &str = "kube-system";

pub struct Connection {
    pub client: kube::Client,
    pub namespace: String,
    pub server: String,
}

/// The namespace of the kubeconfig's current context, else [`DEFAULT_NAMESPACE`].
pub fn context_namespace(kubeconfig: &Kubeconfig) -> String {
    let current = kubeconfig.current_context.as_deref();
    kubeconfig
        .contexts
        .iter()
        .find(|named| Some(named.name.as_str()) == current)
        .and_then(|named| named.context.as_ref())
        .and_then(|context| context.namespace.clone())
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

/// Builds the client. Must run inside the engine's runtime: the client starts a task there.
pub async fn connect(path: &Path, settings: &Settings) -> Result<Connection, StoreError> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|err| {
        StoreError::Config(format!(
            "cannot read kubeconfig {} (ipam.kubernetes.kubeconfig): {err}",
            path.display()
        ))
    })?;
    let namespace = context_namespace(&kubeconfig);
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|err| {
                StoreError::Config(format!("cannot use kubeconfig {}: {err}", path.display()))
            })?;
    config.connect_timeout = Some(settings.request_timeout);
    config.read_timeout = Some(settings.request_timeout);
    config.write_timeout = Some(settings.request_timeout);
    // Our own retry loop knows which requests are safe to repeat and keeps the deadline.
    config.default_retry = false;
    config.default_namespace = namespace.clone();
    if config.cluster_url.scheme_str() == Some("http") && config.root_cert.is_none() {
        // Plain HTTP never verifies a certificate: skip loading the system trust store, which
        // costs several milliseconds of every plugin call.
        config.root_cert = Some(Vec::new());
    }
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|err| {
        StoreError::Config(format!(
            "cannot build a client for {server} from {}: {err}",
            path.display()
        ))
    })?;
    Ok(Connection {
        client,
        namespace,
        server,
    })
}
