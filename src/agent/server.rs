//! The agent's HTTP server (axum) on the unix socket, and the engine behind it.

use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixListener;

use super::metrics::Metrics;
use super::wire::{
    AddBody, AddedBody, AllocationsBody, AttachmentBody, EngineKind, ErrorBody, GcBody, StatusBody,
    WireError,
};
use super::{is_socket, Options};
use crate::config::Datastore;
use crate::store::kubernetes::{self, SharedEngine};
use crate::store::{etcd, AddRequest, Allocation, AttachmentRequest, GcRequest, Store, StoreError};

/// The engine the agent serves.
#[derive(Clone)]
pub enum Backend {
    Kubernetes(Arc<SharedEngine>),
    /// The etcd engine is synchronous: it combines concurrent ADDs and DELs itself, in a task
    /// of the blocking pool per busy pool (`store::etcd::open_shared`), which the requests
    /// wait for; its other calls run on the blocking pool.
    Etcd(Arc<etcd::Combining>),
}

async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(op)
        .await
        .unwrap_or_else(|err| Err(StoreError::io("the agent's task failed").because(err)))
}

impl Backend {
    pub async fn open(
        ipam: &crate::config::IpamConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Backend, String> {
        match &ipam.datastore {
            Datastore::Kubernetes(cfg) => kubernetes::open_agent(ipam, cfg, metrics)
                .await
                .map(|engine| Backend::Kubernetes(Arc::new(engine)))
                .map_err(|err| err.to_string()),
            Datastore::Etcd(cfg) => {
                let (ipam, cfg) = (ipam.clone(), cfg.clone());
                let runtime = tokio::runtime::Handle::current();
                let following = etcd::Following::AGENT;
                blocking(move || etcd::open_shared(runtime, &ipam, &cfg, metrics, following))
                    .await
                    .map(Backend::Etcd)
                    .map_err(|err| err.to_string())
            }
            Datastore::Local { .. } => Err(
                "the agent serves the cluster engines (kubernetes, etcd); the local engine runs in the plugin"
                    .into(),
            ),
        }
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            Backend::Kubernetes(_) => EngineKind::Kubernetes,
            Backend::Etcd(_) => EngineKind::Etcd,
        }
    }

    pub async fn add(&self, req: AddRequest) -> Result<Vec<IpAddr>, StoreError> {
        match self {
            Backend::Kubernetes(e) => {
                let engine = e.clone();
                e.detached(async move { engine.add(&req).await }).await
            }
            // Queued once no other operation of the attachment is under way; once its batch has
            // started, the ADD is done even if the caller hangs up (before, it is left out: see
            // `queues::drop_abandoned`).
            Backend::Etcd(s) => s.add_waiting(&req).await,
        }
    }

    pub async fn del(&self, req: AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        match self {
            Backend::Kubernetes(e) => {
                let engine = e.clone();
                e.detached(async move { engine.del(&req).await }).await
            }
            Backend::Etcd(s) => s.del_waiting(&req).await,
        }
    }

    pub async fn check(&self, req: AttachmentRequest) -> Result<Vec<Allocation>, StoreError> {
        match self {
            Backend::Kubernetes(e) => e.check(&req).await,
            Backend::Etcd(s) => {
                let s = s.clone();
                blocking(move || s.check(&req)).await
            }
        }
    }

    pub async fn gc(&self, req: GcRequest) -> Result<Vec<Allocation>, StoreError> {
        match self {
            Backend::Kubernetes(e) => {
                let engine = e.clone();
                e.detached(async move { engine.gc(&req).await }).await
            }
            Backend::Etcd(s) => {
                let s = s.clone();
                blocking(move || s.gc(&req)).await
            }
        }
    }

    pub async fn status(&self) -> Result<(), StoreError> {
        match self {
            Backend::Kubernetes(e) => e.status().await,
            Backend::Etcd(s) => {
                let s = s.clone();
                blocking(move || s.status()).await
            }
        }
    }
}

struct Agent {
    backend: Backend,
    metrics: Arc<Metrics>,
    /// The engine's last answer to readiness, and when it came (see [`readyz`]).
    readiness: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
    /// The socket the plugins ask, as bound: the probes fail once it is gone or replaced.
    socket: BoundSocket,
    /// The agent's own settings its errors may quote (its kubeconfig, its endpoints): shown
    /// to the plugins, and so to the runtime, as their fields.
    admin_values: Vec<(String, &'static str)>,
}

impl Agent {
    /// Why no plugin can reach this agent, if none can: its socket file removed (a folder
    /// cleaned by hand) or replaced. Only a restart binds it again, which the liveness probe
    /// then asks for.
    fn unreachable(&self) -> Option<Readiness> {
        if self.socket.is_still_ours() {
            return None;
        }
        let why = format!(
            "the socket {} is gone or replaced\n",
            self.socket.path.display()
        );
        Some((StatusCode::SERVICE_UNAVAILABLE, why))
    }
}

type Readiness = (StatusCode, String);

type Shared = Arc<Agent>;

impl Agent {
    /// Reads a request body of this version, for this agent's engine.
    fn parse<B: DeserializeOwned>(
        &self,
        bytes: &[u8],
        engine: impl Fn(&B) -> EngineKind,
    ) -> Result<B, WireError> {
        let body: B = serde_json::from_slice(bytes)
            .map_err(|err| WireError::bad_request(format!("unreadable request: {err}")))?;
        let asked = engine(&body);
        if asked != self.backend.kind() {
            return Err(WireError::WrongEngine {
                message: format!(
                    "this agent serves the {:?} engine, the request is for {asked:?}",
                    self.backend.kind()
                ),
            });
        }
        Ok(body)
    }

    fn answer<T: Serialize>(
        &self,
        operation: &'static str,
        started: Instant,
        result: Result<T, WireError>,
    ) -> Response {
        let seconds = started.elapsed().as_secs_f64();
        let (status, bytes) = match result {
            Ok(value) => {
                self.metrics.request(operation, "ok", seconds);
                (StatusCode::OK, serde_json::to_vec(&value))
            }
            Err(error) => {
                self.metrics.request(operation, error.kind(), seconds);
                let status = match &error {
                    WireError::BadRequest { .. } => StatusCode::BAD_REQUEST,
                    WireError::WrongEngine { .. } => StatusCode::CONFLICT,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                (status, serde_json::to_vec(&ErrorBody { error }))
            }
        };
        match bytes {
            Ok(bytes) => {
                (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
            }
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    }
}

impl Agent {
    /// The answer to a plugin, which passes it on to the runtime: the causes, which may quote
    /// the agent's settings, stay in the agent's log, and its settings show as their fields.
    fn wire(&self, err: StoreError) -> WireError {
        if !matches!(err, StoreError::Exhausted { .. } | StoreError::InUse { .. }) {
            tracing::warn!("{}", err.describe());
        }
        let mut wire = WireError::from(&err);
        if let Some(message) = wire.message_mut() {
            *message = crate::cni::error::hide_values(message, &self.admin_values);
        }
        wire
    }
}

async fn add(State(agent): State<Shared>, body: Bytes) -> Response {
    let started = Instant::now();
    let result = async {
        let body: AddBody = agent.parse(&body, |b: &AddBody| b.engine)?;
        let ips = agent
            .backend
            .add(body.request()?)
            .await
            .map_err(|e| agent.wire(e))?;
        Ok(AddedBody { ips })
    }
    .await;
    agent.answer("add", started, result)
}

async fn del(State(agent): State<Shared>, body: Bytes) -> Response {
    let started = Instant::now();
    let result = async {
        let body: AttachmentBody = agent.parse(&body, |b: &AttachmentBody| b.engine)?;
        let released = agent
            .backend
            .del(body.request()?)
            .await
            .map_err(|e| agent.wire(e))?;
        Ok(AllocationsBody::of(&released))
    }
    .await;
    agent.answer("del", started, result)
}

async fn check(State(agent): State<Shared>, body: Bytes) -> Response {
    let started = Instant::now();
    let result = async {
        let body: AttachmentBody = agent.parse(&body, |b: &AttachmentBody| b.engine)?;
        let held = agent
            .backend
            .check(body.request()?)
            .await
            .map_err(|e| agent.wire(e))?;
        Ok(AllocationsBody::of(&held))
    }
    .await;
    agent.answer("check", started, result)
}

async fn gc(State(agent): State<Shared>, body: Bytes) -> Response {
    let started = Instant::now();
    let result = async {
        let body: GcBody = agent.parse(&body, |b: &GcBody| b.engine)?;
        let released = agent
            .backend
            .gc(body.request()?)
            .await
            .map_err(|e| agent.wire(e))?;
        Ok(AllocationsBody::of(&released))
    }
    .await;
    agent.answer("gc", started, result)
}

async fn status(State(agent): State<Shared>, body: Bytes) -> Response {
    let started = Instant::now();
    let result = async {
        agent.parse(&body, |b: &StatusBody| b.engine)?;
        agent.backend.status().await.map_err(|e| agent.wire(e))?;
        Ok(serde_json::json!({}))
    }
    .await;
    agent.answer("status", started, result)
}

async fn metrics(State(agent): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        agent.metrics.render(),
    )
}

/// How long readiness waits for the engine: less than the probe's own timeout (5 s in the
/// manifests), so that a server that does not answer reads "not ready", said, not a timeout.
const READY_WITHIN: Duration = Duration::from_secs(4);

/// How long the engine's answer to readiness stands: far below the probe's period (10 s), so a
/// probe never reads an old answer, yet readiness on the node's TCP port, which any process on
/// the host may ask as often as it likes, asks the engine at most once a second.
const READINESS_STANDS: Duration = Duration::from_secs(1);

/// Ready when the engine could serve an ADD now (reachable, CRDs installed): while the copies
/// follow their servers (see [`Metrics::copies_in_step`]) that is shown already; otherwise
/// (starting, a watch failed, no etcd pool served yet) the engine is asked, once for every
/// probe that comes meanwhile and for [`READINESS_STANDS`] after.
async fn readyz(State(agent): State<Shared>) -> impl IntoResponse {
    if let Some(unreachable) = agent.unreachable() {
        return unreachable;
    }
    if agent.metrics.copies_in_step() {
        return (StatusCode::OK, "ok\n".to_string());
    }
    // A task of its own: a probe that hangs up while it asks must not take the answer the
    // probes queued behind it wait for (they would ask again, each after the last).
    tokio::spawn(latest_readiness(agent))
        .await
        .unwrap_or_else(|err| {
            let why = format!("readiness failed: {err}\n");
            (StatusCode::SERVICE_UNAVAILABLE, why)
        })
}

/// The engine's answer to readiness, asked unless another came within [`READINESS_STANDS`].
async fn latest_readiness(agent: Shared) -> Readiness {
    let mut last = agent.readiness.lock().await;
    if let Some((_, answer)) = last
        .as_ref()
        .filter(|(at, _)| at.elapsed() < READINESS_STANDS)
    {
        return answer.clone();
    }
    let answer = ask_readiness(&agent.backend).await;
    *last = Some((Instant::now(), answer.clone()));
    answer
}

async fn ask_readiness(backend: &Backend) -> Readiness {
    match tokio::time::timeout(READY_WITHIN, backend.status()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n".to_string()),
        Ok(Err(err)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the engine did not answer within {READY_WITHIN:?}\n"),
        ),
    }
}

async fn healthz(State(agent): State<Shared>) -> Readiness {
    agent
        .unreachable()
        .unwrap_or_else(|| (StatusCode::OK, "ok\n".to_string()))
}

fn probe_routes() -> Router<Shared> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

fn probes(agent: Shared) -> Router {
    probe_routes().with_state(agent)
}

fn router(agent: Shared) -> Router {
    let prefix = super::wire::PREFIX;
    Router::new()
        .route(&format!("{prefix}/add"), post(add))
        .route(&format!("{prefix}/del"), post(del))
        .route(&format!("{prefix}/check"), post(check))
        .route(&format!("{prefix}/gc"), post(gc))
        .route(&format!("{prefix}/status"), post(status))
        .merge(probe_routes())
        .with_state(agent)
}

/// The socket file as this agent bound it, told from a file put at its path since.
#[derive(Clone)]
struct BoundSocket {
    path: PathBuf,
    id: FileId,
}

impl BoundSocket {
    fn is_still_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.file_type().is_socket() && file_id(&meta) == self.id)
    }
}

/// The socket file this agent made: at exit it removes the path only while it is still that
/// file, never a socket another agent has bound there since (a rolling update's successor).
struct SocketFile(BoundSocket);

/// A file told from its successors at the same path: device and inode, which a file system
/// may give the next file made as soon as this one is removed (ext4 does), and the time of the
/// last change of its content, which a bind sets and a chmod leaves.
type FileId = (u64, u64, i64, i64);

fn file_id(meta: &std::fs::Metadata) -> FileId {
    (meta.dev(), meta.ino(), meta.mtime(), meta.mtime_nsec())
}

impl Drop for SocketFile {
    /// Under the binding lock: a successor that finds the socket stale and binds its own
    /// between the check and the removal would otherwise lose it. A successor holding the lock
    /// replaces the stale socket itself.
    fn drop(&mut self) {
        let Ok(_binding) = lock_binding(&self.0.path) else {
            return;
        };
        if self.0.is_still_ours() {
            let _ = std::fs::remove_file(&self.0.path);
        }
    }
}

/// Removes a socket at `path` only when nobody listens on it (left by an agent that died):
/// deleting a live agent's socket would cut its plugins off while it goes on passing probes.
fn remove_stale(path: &Path) -> Result<(), String> {
    use std::io::ErrorKind::{ConnectionRefused, NotFound, TimedOut, WouldBlock};
    match connect_within(path, Duration::from_secs(1)) {
        Ok(()) => Err(another_agent("serves", path)),
        // A full backlog (a busy agent) does not take the connection at once: served all the same.
        Err(err) if matches!(err.kind(), WouldBlock | TimedOut) => {
            Err(another_agent("serves", path))
        }
        Err(err) if err.kind() == ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| format!("cannot replace the stale socket {}: {e}", path.display())),
        // Gone meanwhile: nothing to replace.
        Err(err) if err.kind() == NotFound => Ok(()),
        Err(err) => Err(format!(
            "cannot tell whether an agent serves {}: {err}",
            path.display()
        )),
    }
}

fn another_agent(doing: &str, path: &Path) -> String {
    format!(
        "another agent {doing} {}: stop it first, or give this one another --socket",
        path.display()
    )
}

/// Connects to the socket at `path` within `limit` (a blocking connect would wait on a live
/// agent's full backlog), then hangs up.
fn connect_within(path: &Path, limit: Duration) -> std::io::Result<()> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    socket.connect_timeout(&SockAddr::unix(path)?, limit)
}

/// Locks `<socket>.lock` (made if missing, root's only, never removed: a removed lock file
/// would let a third agent lock another file) for the check and replacement of the socket.
/// Another agent holding it is binding the path right now, so this one stops; its restart
/// finds that agent serving.
fn lock_binding(socket: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = super::beside(socket, ".lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|err| format!("cannot open the lock {}: {err}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(another_agent("is starting on", socket)),
        Err(std::fs::TryLockError::Error(err)) => {
            Err(format!("cannot lock {}: {err}", path.display()))
        }
    }
}

/// Binds the socket, readable and writable by root only: whoever can connect can allocate.
fn bind(path: &Path) -> Result<(UnixListener, SocketFile), String> {
    let fail = |what: &str, err: std::io::Error| format!("{what} {}: {err}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail("cannot make the folder of", e))?;
    }
    // Held until the socket is bound: without it, two agents started at once on a killed one's
    // socket both find it stale, and the second unlinks the socket the first has just bound.
    let _binding = lock_binding(path)?;
    match is_socket(path).map_err(|e| fail("cannot look at", e))? {
        Some(true) => remove_stale(path)?,
        Some(false) => return Err(format!("{} exists and is not a socket", path.display())),
        None => {}
    }
    // The socket is made without group or other permissions, not opened up and then closed.
    // SAFETY: umask only swaps the process's file-creation mask; no memory is involved.
    let previous = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    let listener = listener.map_err(|e| fail("cannot listen on", e))?;
    // The file is ours (made just now, under the lock): on an error below, it is removed.
    let restricted = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail("cannot restrict", e))
        .and_then(|()| std::fs::symlink_metadata(path).map_err(|e| fail("cannot look at", e)));
    match restricted {
        Ok(meta) => {
            let id = file_id(&meta);
            let path = path.to_path_buf();
            Ok((listener, SocketFile(BoundSocket { path, id })))
        }
        Err(err) => {
            let _ = std::fs::remove_file(path);
            Err(err)
        }
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// How often the agent reads its flat file again.
const REREAD_EVERY: Duration = Duration::from_secs(2);

/// Follows the flat file's `go_whereabouts` while the agent runs. The installer and the agent
/// start together, so an upgrade's installer (`helm upgrade --set goWhereabouts=present`, the
/// first step of a rollback to Go binaries) may write the file after the agent read it; an agent
/// that kept the old `absent` would never take the Go binaries' Lease. A small file read every
/// two seconds: polling, rather than a file watch, follows a hostPath whose file is replaced by
/// rename as well as any edit.
async fn follow_go_peers(engine: Arc<SharedEngine>, reread: super::Reread) {
    loop {
        tokio::time::sleep(REREAD_EVERY).await;
        let reread = reread.clone();
        match tokio::task::spawn_blocking(move || reread()).await {
            Ok(Ok(ipam)) => {
                if engine.set_go_peers(ipam.go_peers) {
                    tracing::info!(go_whereabouts = ?ipam.go_peers, "the flat file's go_whereabouts changed: followed");
                }
            }
            Ok(Err(err)) => {
                tracing::debug!(%err, "cannot read the flat file again; keeping what was read")
            }
            Err(err) => tracing::debug!(%err, "the flat file's reader failed"),
        }
    }
}

pub async fn serve(options: Options) -> Result<(), String> {
    let metrics = Arc::new(Metrics::new());
    let backend = Backend::open(&options.ipam, metrics.clone()).await?;
    // The probe port first: an agent that cannot have it (another agent's, on the host
    // network) exits before it touches the socket.
    let tcp = match options.listen {
        Some(addr) => Some(
            crate::probe_port::bind(addr)
                .map_err(|err| format!("cannot listen on {addr}: {err}"))?,
        ),
        None => None,
    };
    let (listener, socket_file) = bind(&options.socket)?;
    let agent = Arc::new(Agent {
        backend,
        metrics,
        readiness: tokio::sync::Mutex::new(None),
        socket: socket_file.0.clone(),
        admin_values: options.ipam.admin_values(),
    });
    let _ = std::fs::remove_file(super::fallback_marker(&options.socket));
    if let Some(tcp) = tcp {
        let app = probes(agent.clone());
        tokio::spawn(crate::probe_port::serve(tcp, app));
    }
    if let Backend::Kubernetes(engine) = &agent.backend {
        tokio::spawn(follow_go_peers(engine.clone(), options.reread.clone()));
    }
    tracing::info!(socket = %options.socket.display(), engine = ?agent.backend.kind(), "agent serving");
    let served = axum::serve(listener, router(agent.clone()))
        .with_graceful_shutdown(shutdown())
        .await;
    // The etcd engine's writes run on the blocking pool, which the runtime waits for.
    if let Backend::Kubernetes(engine) = &agent.backend {
        engine.finish().await;
    }
    drop(socket_file);
    served.map_err(|err| format!("the agent's server stopped: {err}"))
}
