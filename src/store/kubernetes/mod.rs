//! The Kubernetes engine: the upstream CRDs, compare-and-swap on resourceVersion, no Lease.

use crate::config::{IpamConfig, KubernetesConfig};
use crate::store::{Store, StoreError};

/// Connects to the API server named by the kubeconfig.
pub fn open(_ipam: &IpamConfig, _cfg: &KubernetesConfig) -> Result<Box<dyn Store>, StoreError> {
    Err(StoreError::Config(
        "datastore \"kubernetes\" is not available in this build yet".into(),
    ))
}
