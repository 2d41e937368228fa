//! The engine's shared state: the API, the limits, and how to find this node's pools.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::api::{ApiError, Kube};
use super::batch::Batches;
use super::cache::Cache;
use super::go_lease;
use super::node_slice;
use super::reservation::Held;
use super::settings::Settings;
use crate::config::GoPeers;
use crate::ipam::names::is_valid_object_name;
use crate::ipam::Cidr;
use crate::k8s::crd::IPPool;
use crate::store::queues::lock;
use crate::store::{Attachment, PoolRef, StoreError};

#[derive(Clone)]
pub struct Engine {
    pub kube: Kube,
    /// The API server and namespace: requests for different clusters never share a batch.
    pub scope: String,
    pub settings: Settings,
    pub configuration_path: Option<PathBuf>,
    /// The agent's in-memory combining of the node's requests; `None` in a plugin process.
    pub batches: Option<Arc<Batches>>,
    /// The agent's watch-fed copies of the pools, the reservations and the Go binaries' Lease:
    /// guesses that spare a read, never trusted for a decision without a conditional write.
    pub cache: Option<Arc<Cache>>,
    /// Whether Go binaries may still write the pools (the flat file's `go_whereabouts`), as last
    /// read: the agent reads its flat file again while it runs.
    pub go_peers: Arc<Mutex<GoPeers>>,
    /// Reservations whose pool entries are removed and that are not released yet.
    pub unreleased: Arc<Unreleased>,
}

impl Engine {
    /// The agent's best guess of pool `name` without reading it: the newer of the pool as the
    /// agent last wrote it and as its watch last saw it. `None` in a plugin process, or when the
    /// agent has neither.
    pub fn guess_pool(&self, name: &str) -> Option<IPPool> {
        let written = self.batches.as_ref()?.last_written(name);
        let Some(cache) = self.cache.as_ref() else {
            return written;
        };
        let watched_newer = match (&written, cache.pool_version(name)) {
            (Some(w), Some(c)) => newer(Some(&c), w.metadata.resource_version.as_deref()),
            (None, watched) => watched.is_some(),
            (Some(_), None) => false,
        };
        // Decoded only when it is the one used.
        match watched_newer.then(|| cache.pool(name)).flatten() {
            Some(watched) => Some(watched),
            None => written,
        }
    }

    /// Whether Go binaries may write the pools now ([`go_lease::go_present`]); the agent asks
    /// its watched copy of their Lease while that copy is in step with the server.
    pub async fn go_present(&self) -> Result<bool, StoreError> {
        let go_peers = *lock(&self.go_peers);
        if go_peers == GoPeers::Auto {
            if let Some(lease) = self.cache.as_ref().and_then(|c| c.go_lease()) {
                return Ok(lease.as_ref().is_some_and(go_lease::recently_renewed_by_go));
            }
        }
        go_lease::go_present(&self.kube, go_peers).await
    }

    /// The Go binaries' Lease, taken for this process within the operation's deadline.
    pub async fn hold_go_lease(&self) -> Result<go_lease::Hold, StoreError> {
        let identity = format!(
            "whereabouts-rs/{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let deadline = std::time::Instant::now() + self.settings.deadline;
        go_lease::take(&self.kube, &identity, deadline).await
    }

    /// Runs the release `op` holding the Go binaries' Lease while they may write the pools (a
    /// node's slice pool excepted, which one node alone writes), as their own DEL does. A Go ADD
    /// of a pod's new sandbox that finds the old sandbox's reservation keeps it unwritten, since
    /// it names the pod, and then writes its pool entry: a release of the old sandbox between
    /// the two would delete the reservation the new entry relies on. `op` is given the hold, to
    /// check before each write and to serve alone (not combined by the agent).
    pub async fn releasing<T>(
        &self,
        node_slices: bool,
        op: impl AsyncFnOnce(Option<&go_lease::Hold>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if node_slices || !self.go_present().await? {
            return op(None).await;
        }
        let hold = self.hold_go_lease().await?;
        let result = op(Some(&hold)).await;
        hold.release().await;
        result
    }
}

/// Whether resourceVersion `a` was written after `b`. resourceVersions of one API server grow
/// (the engine relies on that elsewhere too); an unreadable one is never newer, so the agent's
/// own write wins.
pub(super) fn newer(a: Option<&str>, b: Option<&str>) -> bool {
    let version = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok());
    matches!((version(a), version(b)), (Some(a), Some(b)) if a > b)
}

/// The reservations of the entries a DEL (or GC, or release) removed, until each is released.
/// It lives outside the operation's future: a release cut off by the deadline, after its entry
/// left the pool, is finished afterwards. Otherwise the runtime's retry finds no entry and the
/// reservation stays behind, blocking the address until the orphan sweep.
#[derive(Default)]
pub struct Unreleased(Ledger<Owed>);

/// The release of the reservation of `who`'s address `ip` in `network_name`, owed since its
/// pool entry left the pool: by a write of resourceVersion `removed_at` where this process saw
/// that write's answer.
#[derive(Clone, Debug)]
pub struct Owed {
    pub ip: IpAddr,
    /// The IPPool the entry was removed from.
    pub pool: String,
    pub network_name: String,
    pub who: Attachment,
    pub removed_at: Option<String>,
}

impl Unreleased {
    pub fn add(&self, owed: Owed) {
        self.0.push(owed);
    }

    pub fn done(&self, ip: IpAddr, network_name: &str) {
        self.0
            .retain(|o| !(o.ip == ip && o.network_name == network_name));
    }

    /// What is owed now; each stays owed until its release is done.
    pub fn pending(&self) -> Vec<Owed> {
        self.0.entries()
    }
}

/// A list kept outside the future that fills it ([`Unreleased`], [`UndoLog`]). A panic while
/// it was held loses nothing: every change is one push, one retain, one take or one field set
/// per entry, so a poisoned lock still holds a consistent list, and it is used as is.
struct Ledger<T>(Mutex<Vec<T>>);

impl<T> Default for Ledger<T> {
    fn default() -> Self {
        Ledger(Mutex::new(Vec::new()))
    }
}

impl<T: Clone> Ledger<T> {
    fn push(&self, entry: T) {
        lock(&self.0).push(entry);
    }

    fn retain(&self, keep: impl FnMut(&T) -> bool) {
        lock(&self.0).retain(keep);
    }

    fn update(&self, change: impl FnMut(&mut T)) {
        lock(&self.0).iter_mut().for_each(change);
    }

    fn entries(&self) -> Vec<T> {
        lock(&self.0).clone()
    }

    fn take(&self) -> Vec<T> {
        std::mem::take(&mut *lock(&self.0))
    }
}

/// Something an ADD wrote that must be taken back if the ADD cannot finish.
#[derive(Clone, Debug)]
pub enum Step {
    /// A reservation this ADD created (or adopted from an earlier attempt of the same owner).
    Reservation { held: Held },
    /// A reservation this ADD asked to create and got no answer for (the request failed after
    /// retries, or the ADD ran out of time while it was on its way): it may exist, naming `who`.
    Asked { name: String, who: Attachment },
    /// A pool entry this ADD sent (it may or may not have landed).
    PoolEntry {
        pool: String,
        cidr: Cidr,
        key: String,
        /// The entry's address (its key counts from `spec.range`'s address, which may carry
        /// host bits: the key alone does not name it).
        ip: IpAddr,
        container_id: String,
        ifname: String,
    },
    /// An entry this ADD kept for the owner's new sandbox.
    Kept(Kept),
    /// A reservation (object `uid`) this ADD is taking over from an earlier sandbox of the pod,
    /// `before`, for `after`, the answer not known yet: taken back, it names `before` again if
    /// it names `after`.
    TakingOver {
        name: String,
        uid: Option<String>,
        before: Attachment,
        after: Attachment,
    },
}

/// An entry an ADD kept for the owner's new sandbox: its container ID (and, with overlapping
/// ranges, its reservation) moved from `before`'s to `after`'s. Taken back, it names `before`
/// again, so the runtime's DEL of the failed sandbox leaves the pod's address for its next try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    pub pool: String,
    pub key: String,
    pub ip: IpAddr,
    pub before: Attachment,
    pub after: Attachment,
    /// The reservation's network, when the ADD takes part in overlapping ranges.
    pub network_name: Option<String>,
    /// Whom the reservation named before the keep took it over: `before`, unless another
    /// sandbox of the pod held it (through another pool of the network).
    pub reservation_before: Attachment,
}

/// The steps of the running ADD. It lives outside the ADD's future so that the steps survive
/// the future being dropped at the deadline.
#[derive(Default)]
pub struct UndoLog(Ledger<Step>);

impl UndoLog {
    pub fn push(&self, step: Step) {
        self.0.push(step);
    }

    /// Forgets a reservation that was released on the way, or that turned out to belong to an
    /// allocation made before this ADD.
    pub fn forget_reservation(&self, held: &Held) {
        self.0
            .retain(|s| !matches!(s, Step::Reservation { held: h, .. } if h == held));
    }

    /// Forgets the keep of entry `key` of `pool`: refused after its write, the entry is for the
    /// runtime's DEL to free rather than to give back.
    pub fn forget_kept(&self, pool: &str, key: &str) {
        self.0
            .retain(|s| !matches!(s, Step::Kept(k) if k.pool == pool && k.key == key));
    }

    /// Notes that the keep of entry `key` of `pool` took its reservation over from `from`.
    pub fn kept_reservation_from(&self, pool: &str, key: &str, from: &Attachment) {
        self.0.update(|s| {
            if let Step::Kept(k) = s {
                if k.pool == pool && k.key == key {
                    k.reservation_before = from.clone();
                }
            }
        });
    }

    /// Whom a take-over of reservation `name` still in the log took it from.
    pub fn taking_over_from(&self, name: &str) -> Option<Attachment> {
        self.0.entries().into_iter().find_map(|s| match s {
            Step::TakingOver {
                name: n, before, ..
            } if n == name => Some(before),
            _ => None,
        })
    }

    /// Forgets the taking over of reservation `name`: answered, and what it came to is in the
    /// log if it is ours.
    pub fn took_over(&self, name: &str) {
        self.0
            .retain(|s| !matches!(s, Step::TakingOver { name: n, .. } if n == name));
    }

    /// Forgets the asking for reservation `name`: its create was answered, and what it came to
    /// is in the log if it is ours.
    pub fn answered(&self, name: &str) {
        self.0
            .retain(|s| !matches!(s, Step::Asked { name: n, .. } if n == name));
    }

    pub fn take(&self) -> Vec<Step> {
        self.0.take()
    }
}

impl Engine {
    /// The pool an ADD allocates from: the configured one, or this node's slice of it.
    async fn effective_pool(
        &self,
        configured: &PoolRef,
        node_slice_size: Option<u8>,
        network_name: &str,
        cni_network: &str,
    ) -> Result<Option<PoolRef>, StoreError> {
        if node_slice_size.is_none() {
            return Ok(Some(configured.clone()));
        }
        let Some((slice, node)) = self.node_slice(network_name, cni_network).await? else {
            return Ok(None);
        };
        node_slice::node_pool(configured, slice, network_name, &node).map(Some)
    }

    /// This node's slice of a sliced network, and the node's name: none while the
    /// NodeSlicePool assigns it none.
    pub async fn node_slice(
        &self,
        network_name: &str,
        cni_network: &str,
    ) -> Result<Option<(Cidr, String)>, StoreError> {
        let node = node_slice::node_name(self.configuration_path.as_deref())?;
        let name = node_slice::slice_pool_name(network_name, cni_network);
        let Some(slices) = self
            .kube
            .get_slice_pool(&name)
            .await
            .map_err(ApiError::into_store)?
        else {
            return Ok(None);
        };
        Ok(node_slice::slice_of(&slices, &node)?.map(|slice| (slice, node)))
    }

    /// As [`Engine::effective_pool`], for an ADD: a missing slice is a clear error.
    pub async fn pool_for_add(
        &self,
        configured: &PoolRef,
        node_slice_size: Option<u8>,
        network_name: &str,
        cni_network: &str,
    ) -> Result<PoolRef, StoreError> {
        // Named only for a sliced network: most ADDs have no NodeSlicePool.
        let slice_pool_name = || node_slice::slice_pool_name(network_name, cni_network);
        if node_slice_size.is_some() && !is_valid_object_name(&slice_pool_name()) {
            return Err(StoreError::config(
                "node_slice_size is set but no NodeSlicePool can be named after the network: \
                 ipam.network_name (else the configuration's name) may hold only letters, \
                 digits, '-' and '.'",
            ));
        }
        match self
            .effective_pool(configured, node_slice_size, network_name, cni_network)
            .await?
        {
            Some(pool) => Ok(pool),
            None => {
                let node = node_slice::node_name(self.configuration_path.as_deref())?;
                let slice_pool = slice_pool_name();
                Err(StoreError::config(format!(
                    "node_slice_size is set but NodeSlicePool {slice_pool} assigns no slice of {} to node {node} yet; the node slice controller assigns slices",
                    configured.range.cidr
                ))
                .logging(format!(
                    "the NodeSlicePool's namespace: {}",
                    self.kube.pools.namespace().unwrap_or_default()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_keeps_its_entries_through_a_panic_that_held_it() {
        let ledger = Arc::new(Ledger::default());
        ledger.push(1);
        let held = ledger.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = held.0.lock().unwrap();
            panic!("a task panics while it holds the ledger");
        })
        .join();
        assert!(panicked.is_err() && ledger.0.is_poisoned());
        ledger.push(2);
        ledger.retain(|&n| n != 1);
        assert_eq!(
            ledger.entries(),
            [2],
            "nothing pushed after the panic is lost"
        );
        assert_eq!(ledger.take(), [2]);
        assert!(ledger.entries().is_empty());
    }
}
