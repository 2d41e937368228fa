//! The node agent (`whereabouts agent`): one long-lived process per node, run by the DaemonSet,
//! that serves the plugin's ADD, DEL, CHECK, GC and STATUS on the cluster engines over a
//! root-only unix socket. It holds the engine's one client and combines the node's concurrent
//! ADDs (and DELs) of a pool into one conditional write (`store::kubernetes` batches); the
//! plugin does the work itself whenever no agent answers (`client`).

pub mod client;
pub mod metrics;
mod server;
pub mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::IpamConfig;

pub use server::Backend;

/// Names the socket over the flat file's `agent_socket` and the default (so that several
/// simulated nodes can share a machine).
pub const SOCKET_ENV: &str = "WHEREABOUTS_AGENT_SOCKET";

/// Where the agent listens unless the environment or the flat file says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/whereabouts/agent.sock";

/// The socket of this node: `$WHEREABOUTS_AGENT_SOCKET`, else the flat file's `agent_socket`
/// (the admin's: a network configuration cannot set it), else [`DEFAULT_SOCKET`].
pub fn socket_path(cfg: &IpamConfig) -> PathBuf {
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    cfg.agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// The file a plugin leaves next to the socket when it found no agent, so that it says so once
/// per outage; the agent removes it when it starts serving.
pub fn fallback_marker(socket: &Path) -> PathBuf {
    beside(socket, ".fallback")
}

/// A file next to the socket: its path with `suffix` added.
fn beside(socket: &Path, suffix: &str) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// Reads the agent's configuration again (its flat file, as at the start).
pub type Reread = std::sync::Arc<dyn Fn() -> Result<IpamConfig, String> + Send + Sync>;

/// What `whereabouts agent` runs with.
pub struct Options {
    pub ipam: IpamConfig,
    /// The configuration read again while the agent runs, for what may change under it: the
    /// flat file's `go_whereabouts` (see `server::follow_go_peers`).
    pub reread: Reread,
    pub socket: PathBuf,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` over TCP too (the DaemonSet's
    /// probes); they are always served on the socket.
    pub listen: Option<SocketAddr>,
}

/// Runs the agent until SIGTERM or SIGINT; requests in flight are finished first.
pub fn run(options: Options) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the agent's runtime: {err}"))?;
    runtime.block_on(server::serve(options))
}

/// Whether `path` is a unix socket (one nothing listens on, left by an agent that died, is
/// replaced; anything else at the path is an error, never removed).
fn is_socket(path: &Path) -> std::io::Result<Option<bool>> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta.file_type().is_socket())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}
