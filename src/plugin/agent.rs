//! The cluster engines through the node's agent when one answers; otherwise the plugin does
//! the work itself, as it always could (a cluster without the agent, or with upstream's
//! DaemonSet, keeps working). The local engine always runs in the plugin.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::agent::client::{ask, NotServed};
use crate::agent::wire::{
    AddBody, AddedBody, AllocationsBody, AttachmentBody, EngineKind, GcBody, StatusBody,
};
use crate::agent::{fallback_marker, socket_path};
use crate::config::{Datastore, IpamConfig};
use crate::store::{
    etcd, kubernetes, AddRequest, Allocation, AttachmentRequest, GcRequest, Opener, Store,
    StoreError,
};

/// How long the plugin waits for the agent: the engine's bound on one operation, and a margin
/// for the agent's own queueing.
fn patience(datastore: &Datastore) -> Duration {
    let margin = Duration::from_secs(5);
    match datastore {
        Datastore::Etcd(_) => etcd::Timeouts::from_env().deadline + margin,
        _ => kubernetes::operation_bound() + margin,
    }
}

/// Asks the agent at `path`; `None` when no agent served the request, or when the plugin
/// serves it itself (the local engine, or a store of the network configuration's own, which
/// the agent does not serve).
fn through_agent<B: Serialize, R: DeserializeOwned>(
    cfg: &IpamConfig,
    path: &str,
    body: impl FnOnce(EngineKind) -> B,
) -> Result<Result<R, StoreError>, Fallback> {
    if cfg.own_store {
        return Err(Fallback::Local);
    }
    let kind = EngineKind::of(&cfg.datastore).ok_or(Fallback::Local)?;
    let socket = socket_path(cfg);
    let url = format!("{}/{path}", crate::agent::wire::PREFIX);
    ask(&socket, &url, &body(kind), patience(&cfg.datastore))
        .map_err(|NotServed(why)| Fallback::NoAgent { socket, why })
}

enum Fallback {
    /// Served here: the local engine, or the network configuration's own store.
    Local,
    NoAgent {
        socket: PathBuf,
        why: String,
    },
}

/// Says once per outage (a marker next to the socket, which the agent removes when it starts)
/// that the plugin works without the agent; later calls log it at debug level.
fn log_fallback(socket: &Path, why: &str) {
    let first = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fallback_marker(socket))
        .is_ok();
    if first {
        tracing::warn!(socket = %socket.display(), %why, "no whereabouts agent answers: the plugin serves this call itself");
    } else {
        tracing::debug!(socket = %socket.display(), %why, "no whereabouts agent answers: the plugin serves this call itself");
    }
}

/// Whether this node is meant to have an agent: the admin named its socket (the installer does
/// when it runs the agent), or one was there (a socket file left by an agent that died). On a
/// node that never had one, the plugin's own errors keep their codes.
fn agent_expected(cfg: &IpamConfig, socket: &Path) -> bool {
    cfg.agent_socket.is_some()
        || std::env::var_os(crate::agent::SOCKET_ENV).is_some_and(|v| !v.is_empty())
        || std::fs::symlink_metadata(socket).is_ok()
}

/// Runs `op` on the agent, else on the engine opened here. When the agent was expected but
/// did not answer and this node has no access of its own (with the agent, the host holds no
/// credentials), the call is "try again": the agent is back soon, or the DaemonSet is broken.
fn served<B: Serialize, R: DeserializeOwned, T>(
    cfg: &IpamConfig,
    path: &str,
    body: impl FnOnce(EngineKind) -> B,
    decode: impl FnOnce(R) -> Result<T, StoreError>,
    open: Opener,
    itself: impl FnOnce(&dyn Store) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let socket = match through_agent(cfg, path, body) {
        Ok(answer) => return answer.and_then(decode),
        Err(Fallback::Local) => None,
        Err(Fallback::NoAgent { socket, why }) => {
            log_fallback(&socket, &why);
            agent_expected(cfg, &socket).then_some((socket, why))
        }
    };
    let store = open(cfg).map_err(|err| match (&socket, &err) {
        (Some((socket, why)), StoreError::Config { .. } | StoreError::Io { .. }) => {
            StoreError::try_again(format!(
                "the whereabouts agent at {} does not answer ({why}) and this node cannot reach the store itself: {}",
                socket.display(),
                err.public()
            ))
            .because(err)
        }
        _ => err,
    })?;
    itself(&*store)
}

pub fn add(cfg: &IpamConfig, req: &AddRequest, open: Opener) -> Result<Vec<IpAddr>, StoreError> {
    served(
        cfg,
        "add",
        |kind| AddBody::of(kind, req),
        |answer: AddedBody| Ok(answer.ips),
        open,
        |store| store.add(req),
    )
}

pub fn del(
    cfg: &IpamConfig,
    req: &AttachmentRequest,
    open: Opener,
) -> Result<Vec<Allocation>, StoreError> {
    served(
        cfg,
        "del",
        |kind| AttachmentBody::of(kind, req),
        AllocationsBody::allocations,
        open,
        |store| store.del(req),
    )
}

pub fn check(
    cfg: &IpamConfig,
    req: &AttachmentRequest,
    open: Opener,
) -> Result<Vec<Allocation>, StoreError> {
    served(
        cfg,
        "check",
        |kind| AttachmentBody::of(kind, req),
        AllocationsBody::allocations,
        open,
        |store| store.check(req),
    )
}

pub fn gc(cfg: &IpamConfig, req: &GcRequest, open: Opener) -> Result<Vec<Allocation>, StoreError> {
    served(
        cfg,
        "gc",
        |kind| GcBody::of(kind, req),
        AllocationsBody::allocations,
        open,
        |store| store.gc(req),
    )
}

pub fn status(cfg: &IpamConfig, open: Opener) -> Result<(), StoreError> {
    served(
        cfg,
        "status",
        |engine| StatusBody { engine },
        |_: serde_json::Value| Ok(()),
        open,
        |store| store.status(),
    )
}
