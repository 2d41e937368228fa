//! The one storage trait. The plugin, the cleanup and the CLI speak only this; nothing above it
//! knows which engine runs.
//!
//! # The contract
//! An engine does not decide. For every range of an ADD it reads a snapshot of the pool (its
//! entries, and with `overlap` the holders of reservations through overlapping ranges of the
//! same `network_name`), asks [`crate::ipam::decide()`], and commits the decision only if what it
//! read is unchanged (SQLite: one `BEGIN IMMEDIATE` transaction; etcd: compares of revisions;
//! Kubernetes: resourceVersion preconditions and creates), retrying otherwise. The decisions:
//! - **keep**: the owner ([`Attachment::same_owner`]) holds an address here and asks for no
//!   other: a repeated ADD, or a pod re-created with a new container ID, gets it back;
//! - **take** the lowest free address (or the static one asked for);
//! - **move**: a static address asked for while the owner holds another here: the new one is
//!   taken and the old one released in the same commit;
//! - **in use** ([`StoreError::InUse`]) by another holder, or **exhausted**
//!   ([`StoreError::Exhausted`]).
//!
//! Spreading over several free addresses happens only when the engine lost a race (the
//! [`crate::ipam::Contention`] hint), never because an overlapping range holds an address.
//! A pool entry and its network-wide overlap reservation change together or not at all.
//! DEL releases what the attachment holds in every pool it holds. `tests/contract.rs` checks
//! all of this on every engine and names the cases where one cannot comply.

use std::net::IpAddr;

use crate::ipam::{Cidr, Range, RangeSpec};

pub mod error;
pub mod etcd;
pub mod kubernetes;
pub mod local;
pub mod node;
pub mod one_at_a_time;
pub mod queues;
pub mod retry;

pub use error::StoreError;

use crate::config::{Datastore, IpamConfig};

/// How a plugin process opens an engine for work no agent took: [`open`] in the full binary,
/// [`open_local`] in the plugin-only build.
pub type Opener = fn(&IpamConfig) -> Result<Box<dyn Store>, StoreError>;

/// Opens the engine the configuration selects.
pub fn open(ipam: &IpamConfig) -> Result<Box<dyn Store>, StoreError> {
    match &ipam.datastore {
        Datastore::Local { path } => local::open(path),
        Datastore::Kubernetes(cfg) => kubernetes::open(ipam, cfg),
        Datastore::Etcd(cfg) => etcd::open(ipam, cfg),
    }
}

/// As [`open`] for the local engine only: the plugin-only build (`whereabouts-plugin`, which
/// the installer puts on hosts whose node agent serves the cluster engines) leaves the cluster
/// engines' clients out, so that every call starts sooner. Without the agent such a host holds
/// no credentials either, and the full binary could not reach the store from it.
pub fn open_local(ipam: &IpamConfig) -> Result<Box<dyn Store>, StoreError> {
    match &ipam.datastore {
        Datastore::Local { path } => local::open(path),
        Datastore::Kubernetes(_) | Datastore::Etcd(_) => Err(StoreError::config(
            "this plugin build reaches the kubernetes and etcd datastores only through the node \
             agent (whereabouts agent); install the full binary to serve them without it",
        )),
    }
}

/// As [`open`], for the operator's commands and the controller, which may run in a pod without
/// the node's kubeconfig: see [`kubernetes::open_for_operator`].
pub fn open_for_operator(ipam: &IpamConfig) -> Result<Box<dyn Store>, StoreError> {
    match &ipam.datastore {
        Datastore::Kubernetes(cfg) => kubernetes::open_for_operator(ipam, cfg),
        _ => open(ipam),
    }
}

/// Who holds an address: the attachment (container ID, interface name), and the pod it belongs
/// to when the runtime says so. Serialized as it is in the agent's protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// `namespace/name`, from `K8S_POD_NAMESPACE` and `K8S_POD_NAME`.
    pub pod_ref: Option<String>,
    pub pod_uid: Option<String>,
}

impl Attachment {
    /// Whether `other` is this very attachment: the same container and interface (what a DEL
    /// names).
    pub fn same_attachment(&self, other: &Attachment) -> bool {
        self.container_id == other.container_id && self.ifname == other.ifname
    }

    /// Whether `other` is the same attachment for idempotent ADD: same pod and interface when
    /// the pod is known (the container ID changes when a kubelet restarts a sandbox), otherwise
    /// same container and interface.
    pub fn same_owner(&self, other: &Attachment) -> bool {
        if self.ifname != other.ifname {
            return false;
        }
        match (&self.pod_ref, &other.pod_ref) {
            (Some(a), Some(b)) => a == b,
            _ => self.container_id == other.container_id,
        }
    }

    /// How messages name the holder of an address.
    pub fn describe(&self) -> String {
        match self.pod_ref.as_deref().filter(|p| !p.is_empty()) {
            Some(pod) => format!(
                "pod {pod} (container {}, interface {})",
                self.container_id, self.ifname
            ),
            None => format!(
                "container {} (interface {})",
                self.container_id, self.ifname
            ),
        }
    }
}

/// A pool: one range under one network name (and, with node slices, one node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRef {
    /// Upstream's pool name ([`crate::ipam::names::pool_name`]).
    pub name: String,
    /// The range as configured, for engines that re-resolve it (node slices).
    pub spec: RangeSpec,
    pub gateway: Option<IpAddr>,
    /// The resolved range the core allocates from.
    pub range: Range,
}

impl PoolRef {
    pub fn cidr(&self) -> Cidr {
        self.range.cidr
    }
}

/// One range of an ADD: the pool and, for a static address inside it, the offset asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRequest {
    pub pool: PoolRef,
    pub requested: Option<u128>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddRequest {
    /// The CNI network configuration's `name`: the scope of GC.
    pub cni_network: String,
    /// `network_name`: the scope in which overlapping ranges share addresses.
    pub network_name: String,
    /// `enable_overlapping_ranges`: an address is unique across all ranges of `network_name`.
    pub overlap: bool,
    pub attachment: Attachment,
    pub ranges: Vec<RangeRequest>,
    /// `node_slice_size`, for engines that support node slices.
    pub node_slice_size: Option<u8>,
    /// `sleep_for_race` (seconds): pause between read and write, to widen races in tests.
    pub sleep_for_race: u64,
    /// The node making the ADD, where known ([`node::node_name`]); engines shared by many nodes
    /// record it so that a node's CNI GC releases only what that node allocated.
    pub node: Option<String>,
}

/// The pools and attachment of a DEL or CHECK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentRequest {
    pub cni_network: String,
    pub network_name: String,
    pub container_id: String,
    pub ifname: String,
    pub pools: Vec<PoolRef>,
    pub node_slice_size: Option<u8>,
    /// Where the caller believes the attachment's addresses are.
    pub hints: Hints,
}

/// What the caller of a DEL believes the attachment holds: its pod (the runtime's CNI_ARGS)
/// and the addresses of its last result (the runtime's `prevResult`). An engine may read
/// where they point first, to find the allocations in fewer requests; what it releases is
/// still decided by its own records, so a wrong or hostile hint costs a read, nothing more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `namespace/name`.
    pub pod_ref: Option<String>,
    pub ips: Vec<IpAddr>,
}

impl Hints {
    /// Addresses a hint names at most: a DEL reads a few keys for each.
    pub const MAX_IPS: usize = 8;
}

/// A GC: free every allocation of `cni_network` whose attachment is not listed in `valid`.
///
/// The runtime that calls GC knows only its own node's attachments, so on an engine shared by
/// many nodes a GC must release only what this node allocated: what another node holds is not
/// in this node's list, yet alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcRequest {
    pub cni_network: String,
    pub network_name: String,
    pub pools: Vec<PoolRef>,
    /// (container ID, interface name) pairs still in use on this node.
    pub valid: Vec<(String, String)>,
    /// The node the GC runs on, where known.
    pub node: Option<String>,
    /// `node_slice_size`: with node slices, this node's own pools can be collected.
    pub node_slice_size: Option<u8>,
}

/// An address held in a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub pool: String,
    pub range: Cidr,
    pub ip: IpAddr,
    pub network_name: String,
    /// The CNI network that allocated it, where the engine records it.
    pub cni_network: Option<String>,
    /// The node whose slice pool holds it (node slices), where the engine can tell.
    pub slice_node: Option<String>,
    pub attachment: Attachment,
}

/// A network-wide reservation (overlapping ranges), for engines that keep reservations apart
/// from their pool entries and may therefore hold one that no entry backs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The engine's name for it.
    pub name: String,
    /// Who it names as its holder.
    pub attachment: Attachment,
    /// The reservation as listed: a release removes it only if it is still this one.
    pub version: String,
}

/// What every engine provides. Methods are synchronous: engines that need async I/O run it on a
/// runtime of their own, with explicit timeouts.
pub trait Store {
    /// Allocates one address per range, in the order of `req.ranges`, all or nothing, as
    /// [`crate::ipam::decide()`] decides (see the module's contract). A repeated ADD for the same
    /// owner ([`Attachment::same_owner`]) returns what it already holds; a changed static address
    /// moves.
    fn add(&self, req: &AddRequest) -> Result<Vec<IpAddr>, StoreError>;

    /// Releases everything the attachment holds, in every pool (also ranges no longer in the
    /// configuration, where the engine can find them); succeeds when it holds nothing.
    fn del(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError>;

    /// What the attachment holds in the request's pools.
    fn check(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError>;

    /// Releases the allocations of `req.cni_network` whose attachment is not in `req.valid`.
    fn gc(&self, req: &GcRequest) -> Result<Vec<Allocation>, StoreError>;

    /// Ok when the engine can serve an ADD now.
    fn status(&self) -> Result<(), StoreError>;

    /// Every allocation, or those of one pool.
    fn allocations(&self, pool: Option<&str>) -> Result<Vec<Allocation>, StoreError>;

    /// Releases one address of one pool: whoever holds it, or only while `holder` (its
    /// container and interface) does. Returns what was released.
    fn release(
        &self,
        pool: &str,
        ip: IpAddr,
        holder: Option<&Attachment>,
    ) -> Result<Option<Allocation>, StoreError>;

    /// Makes free again the addresses released but still held back from searches (etcd's freed
    /// marks, which a later fold cuts out of their runs); how many. The controller's reconcile
    /// calls it; engines that free an address with its release have none.
    fn free_released(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Reservations that no pool entry backs: left by an ADD or DEL stopped half-way, or an ADD
    /// still in flight (its reservation lands first), which the caller must tell apart. Engines
    /// that commit a reservation together with its pool entry never have one.
    fn unbacked_reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        Ok(Vec::new())
    }

    /// Releases a reservation found unbacked if it is unchanged since then; whether it did.
    fn release_reservation(&self, _reservation: &Reservation) -> Result<bool, StoreError> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(settings: serde_json::Value) -> IpamConfig {
        let mut ipam = serde_json::json!({"type": "whereabouts", "range": "192.0.2.0/24"});
        ipam.as_object_mut()
            .unwrap()
            .extend(settings.as_object().unwrap().clone());
        crate::config::load_with_flat_files(Some(&ipam), &[]).unwrap()
    }

    /// The plugin-only build opens the local engine and refuses the cluster engines with a
    /// configuration error that says what it needs, without touching their settings' files.
    #[test]
    fn open_local_serves_only_the_local_engine() {
        let dir = tempfile::tempdir().unwrap();
        let local = ipam(serde_json::json!({"local_path": dir.path().join("db")}));
        assert!(open_local(&local).is_ok());
        let cluster = [
            serde_json::json!({"datastore": "kubernetes",
                               "kubernetes": {"kubeconfig": dir.path().join("none")}}),
            serde_json::json!({"datastore": "etcd", "etcd_host": "https://127.0.0.1:1"}),
        ];
        for settings in cluster {
            match open_local(&ipam(settings.clone())) {
                Err(StoreError::Config { what, .. }) => {
                    assert!(what.contains("only through the node agent"), "{what}")
                }
                Err(other) => panic!("{settings}: {other:?}"),
                Ok(_) => panic!("{settings}: opened"),
            }
        }
    }
}
