//! The etcd v3 engine.

use crate::config::{EtcdConfig, IpamConfig};
use crate::store::{Store, StoreError};

/// Connects to the etcd cluster.
pub fn open(_ipam: &IpamConfig, _cfg: &EtcdConfig) -> Result<Box<dyn Store>, StoreError> {
    Err(StoreError::Config(
        "datastore \"etcd\" is not available in this build yet".into(),
    ))
}
