//! `whereabouts controller`: one per cluster. It frees the addresses of deleted pods within
//! seconds (a pod watch), reconciles everything at start-up and on a schedule, keeps the
//! NodeSlicePools of node-sliced networks in step with the nodes, posts Events for what it frees
//! and serves `/metrics` and `/healthz`.
//!
//! Shape: an async runtime follows the API (watches, schedule, HTTP); one worker thread owns the
//! store, which is synchronous, and does every release.

pub mod events;
pub mod http;
pub mod metrics;
pub mod schedule;
pub mod slice_sync;
pub mod slices;
pub mod watch;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::DynamicObject;
use kube::Api;
use tokio::sync::Notify;

use crate::cleanup::judge::PodPhase;
use crate::cleanup::pods::{self, ClusterSource};
use crate::config::{Datastore, IpamConfig};
use crate::k8s::crd::OverlappingRangeIPReservation;
use metrics::Metrics;
use watch::Change;
use worker::{Job, Worker};

/// The longest an API request other than a watch may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
}

#[derive(Clone, Debug)]
pub struct Options {
    pub ipam: IpamConfig,
    pub cluster: ClusterSource,
    pub listen: SocketAddr,
    /// Where NodeSlicePools, reservations and the `whereabouts-config` ConfigMap live.
    pub namespace: String,
    pub node_slices: bool,
    pub events: bool,
    /// How long one watch request lasts before it is renewed.
    pub watch_timeout: Duration,
    /// How long after a failed reconcile the next one runs.
    pub retry_after: Duration,
}

/// The namespace of the whereabouts objects: the Kubernetes engine's (its kubeconfig's context),
/// else `$WHEREABOUTS_NAMESPACE`, else the pod's service account's, else kube-system: the same
/// rule the engine follows when it uses the service account, so both name one namespace.
pub fn default_namespace(ipam: &IpamConfig) -> String {
    if let Datastore::Kubernetes(k) = &ipam.datastore {
        if let Ok(config) = kube::config::Kubeconfig::read_from(&k.kubeconfig) {
            return crate::store::kubernetes::context_namespace(&config);
        }
    }
    crate::store::kubernetes::in_cluster_namespace()
}

fn send(jobs: &Mutex<Sender<Job>>, job: Job) {
    if let Ok(j) = jobs.lock() {
        let _ = j.send(job);
    }
}

/// Runs until the process is stopped; returns only on a start-up failure.
pub fn run(opts: Options) -> Result<(), ControllerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ControllerError::Io(format!("cannot start the I/O runtime: {e}")))?;
    runtime.block_on(main(opts))
}

async fn main(opts: Options) -> Result<(), ControllerError> {
    // Watches hold a response open for their whole timeout; every other request must finish
    // quickly, so a hung call cannot stall the store worker for minutes.
    let client = pods::client(&opts.cluster, REQUEST_TIMEOUT)
        .await
        .map_err(|e| ControllerError::Config(e.to_string()))?;
    let watch_client = pods::client(&opts.cluster, opts.watch_timeout + REQUEST_TIMEOUT)
        .await
        .map_err(|e| ControllerError::Config(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| ControllerError::Io(format!("cannot listen on {}: {e}", opts.listen)))?;
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let requeue = tx.clone();
    let retry_after = opts.retry_after;
    let jobs = Arc::new(Mutex::new(tx));

    // The store is opened on the worker's thread and stays there.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let worker_parts = (
        opts.ipam.clone(),
        tokio::runtime::Handle::current(),
        client.clone(),
        metrics.clone(),
        opts.events,
        matches!(opts.ipam.datastore, Datastore::Kubernetes(_)).then(|| {
            Api::<OverlappingRangeIPReservation>::namespaced(client.clone(), &opts.namespace)
        }),
    );
    std::thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            let (ipam, handle, client, metrics, post_events, reservations) = worker_parts;
            let store = match crate::store::open_for_operator(&ipam) {
                Ok(store) => store,
                Err(err) => {
                    let _ = ready_tx.send(Err(format!("cannot open the store: {err}")));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let configured = crate::plugin::pools(&ipam).unwrap_or_default();
            Worker {
                store,
                configured,
                handle,
                client,
                reservations,
                metrics,
                post_events,
                requeue,
                retry_after,
            }
            .run(rx);
        })
        .map_err(|e| ControllerError::Io(format!("cannot start the store worker: {e}")))?;
    ready_rx
        .await
        .map_err(|_| ControllerError::Io("the store worker stopped".into()))?
        .map_err(ControllerError::Config)?;
    // The address actually bound (a port of 0 picks a free one).
    let listening = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| opts.listen.to_string());
    tracing::info!(listen = %listening, namespace = %opts.namespace, "controller started");

    tokio::spawn(http::serve(listener, metrics.clone(), jobs.clone()));
    tokio::spawn(schedule::run(
        client.clone(),
        opts.namespace.clone(),
        opts.ipam.reconciler_cron_expression.clone(),
        jobs.clone(),
    ));
    if opts.node_slices {
        let notify = Arc::new(Notify::new());
        for what in ["nodes", "network-attachment-definitions"] {
            let notify = notify.clone();
            let client = watch_client.clone();
            let timeout = opts.watch_timeout;
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let poke = |resynced: bool| {
                    if resynced {
                        metrics.resynced(what);
                    }
                    notify.notify_one();
                };
                if what == "nodes" {
                    let api = Api::<Node>::all(client);
                    watch::follow(api, what, timeout, |c| poke(matches!(c, Change::Resynced))).await
                } else {
                    let api = Api::<DynamicObject>::all_with(client, &slice_sync::nad_resource());
                    watch::follow(api, what, timeout, |c| poke(matches!(c, Change::Resynced))).await
                }
            });
        }
        let client = client.clone();
        let namespace = opts.namespace.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(500);
            loop {
                match slice_sync::sync(&client, &namespace, &metrics).await {
                    Ok(()) => pause = Duration::from_millis(500),
                    Err(err) => {
                        tracing::warn!(%err, retry_in = ?pause, "node slices");
                        metrics.retries.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(60));
                        notify.notify_one();
                    }
                }
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        });
    }
    let mut first = true;
    watch::follow(
        Api::<Pod>::all(watch_client),
        "pods",
        opts.watch_timeout,
        |change| match change {
            Change::Deleted(pod) => {
                metrics.pod_deletions.fetch_add(1, Ordering::SeqCst);
                send(
                    &jobs,
                    Job::Deleted {
                        pod_ref: pods::pod_ref(&pod),
                        uid: pod.metadata.uid.clone().unwrap_or_default(),
                    },
                );
            }
            Change::Applied(pod) => {
                let phase = pods::pod_state(&pod).phase;
                if matches!(phase, PodPhase::Succeeded | PodPhase::Failed) {
                    send(
                        &jobs,
                        Job::Finished {
                            pod_ref: pods::pod_ref(&pod),
                        },
                    );
                }
            }
            Change::Resynced => {
                // The watch follows every change from this list on; a full reconcile now covers
                // what happened before it: at start-up, everything deleted while no controller
                // ran; after a gap, the deletions the watch missed.
                metrics.resynced("pods");
                let why = if first { "start-up" } else { "watch resynced" };
                send(&jobs, Job::Reconcile { why });
                first = false;
            }
        },
    )
    .await;
    Ok(())
}
