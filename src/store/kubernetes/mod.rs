//! The Kubernetes engine: the upstream CRDs (IPPool, OverlappingRangeIPReservation,
//! NodeSlicePool), compare-and-swap on resourceVersion, no Lease of its own and no leader
//! election (only the Go binaries' Lease while they remain: `go_lease`).
//!
//! Contenders only wait for each other when they write the same pool at the same moment; a
//! conflict is retried after a jittered pause, a bounded number of times, and an ADD that cannot
//! finish takes back what it wrote before reporting "try again".

mod allocate;
mod api;
mod batch;
mod cache;
mod choose;
pub mod doctor;
mod engine;
mod go_lease;
mod job;
mod node_slice;
pub(crate) mod pool_doc;
mod release;
pub(crate) mod reservation;
mod settings;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::runtime::Runtime;

use crate::config::{Datastore, GoPeers, IpamConfig, KubernetesConfig};
use crate::k8s::cluster::{self, in_pod, operator_access, Access};
use crate::store::one_at_a_time::OneAtATime;
use crate::store::{
    AddRequest, Allocation, Attachment, AttachmentRequest, GcRequest, Reservation, Store,
    StoreError,
};

pub use crate::store::queues::Observer;
pub use go_lease::{last_go_renewal, GO_LEASE_NAME};
pub use node_slice::{slice_pool_name, NODENAME_ENV};
pub use settings::TIMEOUT_ENV;

use api::{ApiError, Kube};
use batch::Batches;
use engine::{Engine, UndoLog};
use settings::Settings;

/// Connects to the API server named by the kubeconfig (the plugin: a missing file is an error).
pub fn open(ipam: &IpamConfig, cfg: &KubernetesConfig) -> Result<Box<dyn Store>, StoreError> {
    open_with(ipam, &Access::Kubeconfig(cfg.kubeconfig.clone()))
}

/// As [`open`], for the operator's commands and the controller: inside a pod whose file system
/// lacks the kubeconfig (the controller's Deployment), the pod's service account.
pub fn open_for_operator(
    ipam: &IpamConfig,
    cfg: &KubernetesConfig,
) -> Result<Box<dyn Store>, StoreError> {
    let access = operator_access(&cfg.kubeconfig, in_pod());
    if access == Access::InCluster {
        tracing::info!(
            kubeconfig = %cfg.kubeconfig.display(),
            "no kubeconfig file in this pod: the kubernetes datastore uses the pod's service account"
        );
    }
    open_with(ipam, &access)
}

/// What `whereabouts doctor` found, and where it looked.
pub struct DoctorReport {
    /// The server and the namespace.
    pub scope: String,
    pub findings: Vec<doctor::Finding>,
    /// What it could not read there, which the findings suffer from.
    pub unread: Option<String>,
}

/// `whereabouts doctor`: the findings in the engine's namespace, repaired where safe with `fix`.
pub fn doctor(
    ipam: &IpamConfig,
    cfg: &KubernetesConfig,
    fix: bool,
    orphan_age: std::time::Duration,
) -> Result<DoctorReport, StoreError> {
    let access = operator_access(&cfg.kubeconfig, in_pod());
    let store = connect_store(ipam, &access)?;
    let shared = &store.shared;
    let kube = &shared.engine.kube;
    let survey = || {
        let survey = doctor::survey(kube, orphan_age);
        store.runtime.block_on(shared.run("doctor", survey))
    };
    let mut found = survey()?;
    if !fix {
        store.runtime.block_on(shared.run("doctor", async {
            doctor::judge_orphans(&shared.engine, &mut found).await;
            Ok(())
        }))?;
    }
    if fix && found.fixable() {
        // Each survey within its own deadline: the wait is not the API server's time.
        std::thread::sleep(doctor::SETTLE);
        let earlier = std::mem::replace(&mut found, survey()?);
        found.confirm(&earlier);
        store.runtime.block_on(shared.run("doctor", async {
            doctor::fix(&shared.engine, &mut found).await;
            Ok(())
        }))?;
    }
    let mut findings = found.findings().to_vec();
    findings.sort_by(|a, b| {
        (a.problem, &a.object, &a.address).cmp(&(b.problem, &b.object, &b.address))
    });
    let namespace = kube.pools.namespace().unwrap_or_default();
    Ok(DoctorReport {
        scope: format!("namespace {namespace} at {}", shared.server),
        findings,
        unread: found.unread.take(),
    })
}

fn open_with(ipam: &IpamConfig, access: &Access) -> Result<Box<dyn Store>, StoreError> {
    Ok(Box::new(connect_store(ipam, access)?))
}

fn connect_store(ipam: &IpamConfig, access: &Access) -> Result<KubernetesStore, StoreError> {
    // The plugin is a short-lived process: one thread, only around the API calls.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| StoreError::io("cannot start the I/O runtime").because(err))?;
    let shared = runtime.block_on(connect_engine(ipam, access, None))?;
    Ok(KubernetesStore { runtime, shared })
}

async fn connect_engine(
    ipam: &IpamConfig,
    access: &Access,
    batches: Option<Arc<Batches>>,
) -> Result<SharedEngine, StoreError> {
    let settings = Settings::from_env();
    let timeouts = cluster::Timeouts {
        connect: settings.request_timeout,
        read: settings.request_timeout,
        write: settings.request_timeout,
        library_retries: false,
    };
    let connection = connect(access, timeouts, ipam).await?;
    tracing::debug!(
        server = %connection.server,
        namespace = %connection.namespace,
        "kubernetes datastore"
    );
    let kube = Kube::new(
        connection.client,
        &connection.namespace,
        &settings,
        &connection.origin,
    );
    // The agent (the only caller with batches) follows the pools, the reservations and the Go
    // binaries' Lease; a plugin process lives too short for a watch to pay off. The watches
    // have a client of their own: the requests' read timeout would cut a watch that is quiet
    // for that long (its copy then not trusted until the watcher's back-off lets it list again).
    let cache = match &batches {
        Some(batches) => {
            let observer = batches.observer.clone();
            let watching = cluster::Timeouts {
                read: cache::watch_read_timeout(settings.request_timeout),
                ..timeouts
            };
            let watches = connect(access, watching, ipam).await?;
            let copies = cache::Cache::follow(watches.client, &connection.namespace, observer);
            Some(Arc::new(copies))
        }
        None => None,
    };
    Ok(SharedEngine {
        server: connection.server.clone(),
        engine: Engine {
            kube,
            scope: format!("{} {}", connection.server, connection.namespace),
            settings,
            configuration_path: ipam.configuration_path.clone(),
            batches,
            cache,
            go_peers: Arc::new(std::sync::Mutex::new(ipam.go_peers)),
            unreleased: Arc::default(),
        },
        attachments: Arc::default(),
    })
}

/// A client of the engine's cluster, with `timeouts`.
async fn connect(
    access: &Access,
    timeouts: cluster::Timeouts,
    ipam: &IpamConfig,
) -> Result<cluster::Connection, StoreError> {
    let mut connection = cluster::connect(access, timeouts, ipam.trust.insecure_tls)
        .await
        .map_err(|err| {
            // What is wrong with the kubeconfig, for the runtime without its values (the
            // file's names, paths and server); the log has them.
            let what = crate::files::without_values(&err.to_string());
            StoreError::config(format!(
                "kubernetes datastore (ipam.kubernetes.kubeconfig): {what}"
            ))
            .because(err)
        })?;
    if let Datastore::Kubernetes(KubernetesConfig {
        namespace: Some(namespace),
        ..
    }) = &ipam.datastore
    {
        connection.namespace = namespace.clone();
    }
    Ok(connection)
}

/// How long one operation may take, its undo included: how long a plugin waits for the agent.
pub fn operation_bound() -> std::time::Duration {
    Settings::from_env().operation_bound()
}

/// As [`operation_bound`] with the default timeouts: what the manifests run with.
pub fn default_operation_bound() -> std::time::Duration {
    Settings::default().operation_bound()
}

/// The node agent's engine: one long-lived client, shared by every request of the node, whose
/// ADDs and DELs are combined per pool (see `batch`). Built on the agent's runtime.
pub async fn open_agent(
    ipam: &IpamConfig,
    cfg: &KubernetesConfig,
    observer: Arc<dyn Observer>,
) -> Result<SharedEngine, StoreError> {
    let access = operator_access(&cfg.kubeconfig, in_pod());
    connect_engine(ipam, &access, Some(Arc::new(Batches::new(observer)))).await
}

/// The engine as async operations, each bounded by the operation's deadline.
#[derive(Clone)]
pub struct SharedEngine {
    server: String,
    engine: Engine,
    /// An attachment's ADD (with its undo) and DEL one at a time.
    attachments: Arc<OneAtATime>,
}

impl SharedEngine {
    /// Where the engine writes, for logs.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Runs `op` in a task of its own, which a stopping agent waits for ([`Self::finish`]):
    /// a caller that hangs up does not cancel a write half done.
    pub async fn detached<T: Send + 'static>(
        &self,
        op: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let task = match &self.engine.batches {
            Some(batches) => batches.work.spawn(op),
            None => tokio::spawn(op),
        };
        task.await
            .unwrap_or_else(|err| Err(StoreError::io("the agent's task failed").because(err)))
    }

    /// Takes the flat file's `go_whereabouts` as read again (the agent's flat file changed: an
    /// upgrade's installer may write it after the agent started, or the admin edits it); whether
    /// it changed.
    pub fn set_go_peers(&self, go_peers: GoPeers) -> bool {
        let mut now = crate::store::queues::lock(&self.engine.go_peers);
        std::mem::replace(&mut *now, go_peers) != go_peers
    }

    /// Waits, for at most one operation's bound, for the writes under way (the queues' and
    /// those of requests whose caller hung up): the agent stops serving first, so no new one
    /// starts.
    pub async fn finish(&self) {
        let Some(batches) = &self.engine.batches else {
            return;
        };
        batches.work.close();
        let bound = self.engine.settings.operation_bound();
        if tokio::time::timeout(bound, batches.work.wait())
            .await
            .is_err()
        {
            tracing::warn!(?bound, "writes still under way when the agent stopped");
        }
    }

    /// Runs one operation to completion or to the deadline; when it fails, the reservations of
    /// the entries it removed are released still.
    async fn run<T>(
        &self,
        what: &str,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let deadline = self.engine.settings.deadline;
        let result = tokio::time::timeout(deadline, op)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::try_again(format!(
                    "{what}: the kubernetes API server did not complete it within {deadline:?}"
                ))
                .logging(format!("the API server at {}", self.server)))
            });
        if result.is_err() {
            // A failed DEL's retry finds its entries gone: their reservations go now.
            self.engine.finish_owed_releases().await;
        }
        result
    }

    /// An ADD; what it wrote is taken back if it fails.
    pub async fn add(&self, req: &AddRequest) -> Result<Vec<IpAddr>, StoreError> {
        let who = &req.attachment;
        let _alone = self.attachments.enter(&who.container_id, &who.ifname).await;
        let undo = UndoLog::default();
        let result = self.run("ADD", self.engine.add(req, &undo)).await;
        if result.is_err() {
            let steps = undo.take();
            if !steps.is_empty() {
                let budget = self.engine.settings.undo_budget;
                match tokio::time::timeout(budget, self.engine.undo(steps)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::error!(%err, "could not take back a failed ADD"),
                    Err(_) => tracing::error!("could not take back a failed ADD in time"),
                }
            }
        }
        result
    }

    pub async fn del(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        let _alone = self.attachments.enter(&req.container_id, &req.ifname).await;
        self.run("DEL", self.engine.del(req)).await
    }

    pub async fn check(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        self.run("CHECK", self.engine.check(req)).await
    }

    pub async fn gc(&self, req: &GcRequest) -> Result<Vec<Allocation>, StoreError> {
        self.run("GC", self.engine.gc(req)).await
    }

    /// Ok when both CustomResourceDefinitions answer and the namespace exists.
    pub async fn status(&self) -> Result<(), StoreError> {
        self.run("STATUS", async {
            let kube = &self.engine.kube;
            let missing = |crd: &str| {
                StoreError::config(format!(
                    "the CustomResourceDefinition {crd} is not installed on the API server"
                ))
                .logging(format!("the API server at {}", self.server))
            };
            match kube.list_pools(Some(1)).await {
                Ok(_) => {}
                Err(ApiError::NotFound(_)) => {
                    return Err(missing("ippools.whereabouts.cni.cncf.io"))
                }
                Err(err) => return Err(err.into()),
            }
            match kube.list_reservations(Some(1)).await {
                Ok(_) => {}
                Err(ApiError::NotFound(_)) => {
                    return Err(missing(
                        "overlappingrangeipreservations.whereabouts.cni.cncf.io",
                    ))
                }
                Err(err) => return Err(err.into()),
            }
            if kube.namespace_exists().await? {
                return Ok(());
            }
            // Its name comes with the kubeconfig's context: the log's.
            let namespace = kube.pools.namespace().unwrap_or_default();
            Err(StoreError::config(format!(
                "the engine's namespace does not exist on the API server (the namespace of {})",
                kube.origin
            ))
            .logging(format!("namespace {namespace} at {}", self.server)))
        })
        .await
    }

    pub async fn allocations(&self, pool: Option<&str>) -> Result<Vec<Allocation>, StoreError> {
        self.run("list", self.engine.allocations(pool)).await
    }

    pub async fn release(
        &self,
        pool: &str,
        ip: IpAddr,
        holder: Option<&Attachment>,
    ) -> Result<Option<Allocation>, StoreError> {
        self.run("release", self.engine.release(pool, ip, holder))
            .await
    }

    pub async fn unbacked_reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        let found = self
            .run("list reservations", self.engine.unbacked_reservations())
            .await?;
        Ok(found.into_iter().map(|u| u.reservation).collect())
    }

    pub async fn release_reservation(&self, reservation: &Reservation) -> Result<bool, StoreError> {
        self.run(
            "release reservation",
            self.engine.release_unbacked(reservation),
        )
        .await
    }
}

/// The plugin's and the operator's engine: the shared engine on a runtime of its own.
struct KubernetesStore {
    runtime: Runtime,
    shared: SharedEngine,
}

impl Store for KubernetesStore {
    fn add(&self, req: &AddRequest) -> Result<Vec<IpAddr>, StoreError> {
        self.runtime.block_on(self.shared.add(req))
    }

    fn del(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        self.runtime.block_on(self.shared.del(req))
    }

    fn check(&self, req: &AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        self.runtime.block_on(self.shared.check(req))
    }

    fn gc(&self, req: &GcRequest) -> Result<Vec<Allocation>, StoreError> {
        self.runtime.block_on(self.shared.gc(req))
    }

    fn status(&self) -> Result<(), StoreError> {
        self.runtime.block_on(self.shared.status())
    }

    fn allocations(&self, pool: Option<&str>) -> Result<Vec<Allocation>, StoreError> {
        self.runtime.block_on(self.shared.allocations(pool))
    }

    fn release(
        &self,
        pool: &str,
        ip: IpAddr,
        holder: Option<&Attachment>,
    ) -> Result<Option<Allocation>, StoreError> {
        self.runtime.block_on(self.shared.release(pool, ip, holder))
    }

    fn unbacked_reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        self.runtime.block_on(self.shared.unbacked_reservations())
    }

    fn release_reservation(&self, reservation: &Reservation) -> Result<bool, StoreError> {
        self.runtime
            .block_on(self.shared.release_reservation(reservation))
    }
}
