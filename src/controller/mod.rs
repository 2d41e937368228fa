//! `whereabouts controller`: one leader among its replicas. It frees the addresses of deleted
//! pods within seconds (a pod watch), reconciles everything at start-up, on taking the lead
//! and on a schedule, keeps the NodeSlicePools of node-sliced networks in step with the nodes
//! and the NetworkAttachmentDefinitions, posts Events for what it frees and serves `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! Shape: kube::runtime follows the API (watchers, reflectors), a Lease elects the leader,
//! axum serves HTTP; one worker thread owns the store, which is synchronous, and does every
//! release, only while this replica leads.

pub mod events;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod schedule;
pub mod slice_sync;
pub mod slices;
pub mod watch;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DynamicObject, PartialObjectMeta};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::store::retry::growing_pauses;

use crate::cleanup::pods;
use crate::config::{Datastore, IpamConfig};
use crate::k8s::cluster::{self, Access};
use crate::k8s::crd::OverlappingRangeIPReservation;
use leader::{Election, Leadership};
use metrics::Metrics;
use worker::{Job, Jobs, Worker, EVENTS_IN_FLIGHT};

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
    pub cluster: Access,
    pub listen: SocketAddr,
    /// Where NodeSlicePools, reservations and the `whereabouts-config` ConfigMap live.
    pub namespace: String,
    pub node_slices: bool,
    pub events: bool,
    /// How long one watch request lasts before it is renewed.
    pub watch_timeout: Duration,
    /// How long after a failed reconcile the next one runs.
    pub retry_after: Duration,
    /// Take the Lease before acting; None: act alone (one replica, or tests).
    pub lease_duration: Option<Duration>,
}

/// The namespace of the whereabouts objects: the Kubernetes engine's (its kubeconfig's context),
/// else `$WHEREABOUTS_NAMESPACE`, else the pod's service account's, else kube-system: the same
/// rule the engine follows when it uses the service account, so both name one namespace.
pub fn default_namespace(ipam: &IpamConfig) -> String {
    if let Datastore::Kubernetes(k) = &ipam.datastore {
        if let Ok(config) = cluster::read_kubeconfig(&k.kubeconfig) {
            return cluster::context_namespace(&config);
        }
    }
    cluster::in_cluster_namespace()
}

/// Runs until the process is stopped; returns only on a start-up failure or at SIGTERM.
pub fn run(opts: Options) -> Result<(), ControllerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ControllerError::Io(format!("cannot start the I/O runtime: {e}")))?;
    runtime.block_on(main(opts))
}

/// This replica's name in the Lease: its pod's name and a random suffix, so a restarted
/// container is a new holder.
fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "whereabouts-controller".into());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// Takes part in the election when a lease duration is set (the metric and a reconcile follow
/// each win); otherwise this replica leads alone. The election, to give the Lease up at exit.
fn start_election(
    opts: &Options,
    client: &Client,
    metrics: &Arc<Metrics>,
    leadership: &Leadership,
    jobs: &Jobs,
) -> Option<Election> {
    let Some(lease_duration) = opts.lease_duration else {
        metrics.leader.set(1);
        return None;
    };
    let election = Election {
        namespace: opts.namespace.clone(),
        identity: identity(),
        lease_duration,
    };
    let (metrics, jobs) = (metrics.clone(), jobs.clone());
    tokio::spawn(leader::run(
        client.clone(),
        election.clone(),
        leadership.clone(),
        move |leading| {
            metrics.leader.set(i64::from(leading));
            if leading {
                // Whatever happened while another replica led (or none did) is judged now.
                let _ = jobs.send(Job::Reconcile { why: "elected" });
            } else {
                metrics.stepped_down();
            }
        },
    ));
    Some(election)
}

/// The client for every request but the watches, and the watches' own. Watches hold a
/// response open for their whole timeout; every other request must finish quickly, so a hung
/// call cannot stall the store worker for minutes.
async fn clients(opts: &Options) -> Result<(Client, Client), ControllerError> {
    let insecure_tls = opts.ipam.trust.insecure_tls;
    let client = |timeout| pods::client(&opts.cluster, timeout, insecure_tls);
    let config_error = |e| ControllerError::Config(crate::store::error::chain(&e));
    let requests = client(REQUEST_TIMEOUT).await.map_err(config_error)?;
    let watches = client(opts.watch_timeout + REQUEST_TIMEOUT)
        .await
        .map_err(config_error)?;
    Ok((requests, watches))
}

async fn main(opts: Options) -> Result<(), ControllerError> {
    let (client, watch_client) = clients(&opts).await?;
    let listener = crate::probe_port::bind(opts.listen)
        .map_err(|e| ControllerError::Io(format!("cannot listen on {}: {e}", opts.listen)))?;
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = tokio::sync::mpsc::unbounded_channel();
    let leadership = match opts.lease_duration {
        Some(_) => Leadership::default(),
        None => Leadership::always(),
    };
    // Lists may come from the API server's watch cache: the watches only wake the worker, and
    // every reconcile lists the pods afresh after reading the allocations (`cleanup::plan`).
    let config = watcher::Config::default()
        .any_semantic()
        .timeout(watch_seconds(opts.watch_timeout));
    let nads = opts.node_slices.then(|| {
        start_node_slices(
            &opts,
            &client,
            &watch_client,
            &metrics,
            &leadership,
            &config,
        )
    });
    start_worker(&opts, &client, &metrics, &leadership, &jobs, queue, nads).await?;
    let ready = serve_probes(listener, &opts, &metrics, &jobs);
    tokio::spawn(schedule::run(
        client.clone(),
        opts.namespace.clone(),
        opts.ipam.reconciler_cron_expression.clone(),
        jobs.clone(),
    ));
    let election = start_election(&opts, &client, &metrics, &leadership, &jobs);
    let pods = watch::pods(
        Api::<Pod>::all(watch_client),
        config,
        jobs,
        metrics.clone(),
        ready,
    );
    tokio::select! {
        _ = pods => {}
        _ = terminated() => {
            tracing::info!("stopping");
            leadership.step_down();
            if let Some(election) = &election {
                leader::release(client, election).await;
            }
        }
    }
    Ok(())
}

/// Serves the probes and `/metrics` on `listener`. The flag returned turns the readiness probe
/// on once the pods are listed.
fn serve_probes(
    listener: tokio::net::TcpListener,
    opts: &Options,
    metrics: &Arc<Metrics>,
    jobs: &Jobs,
) -> Arc<AtomicBool> {
    // The address actually bound (a port of 0 picks a free one).
    let listening = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| opts.listen.to_string());
    tracing::info!(listen = %listening, namespace = %opts.namespace, "controller started");
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(http::serve(
        listener,
        http::Probes {
            metrics: metrics.clone(),
            jobs: jobs.clone(),
            ready: ready.clone(),
        },
    ));
    ready
}

fn watch_seconds(timeout: Duration) -> u32 {
    timeout.as_secs().clamp(1, 3600) as u32
}

/// SIGTERM (a Deployment's rollout) or Ctrl-C.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The store is opened on the worker's thread and stays there.
async fn start_worker(
    opts: &Options,
    client: &Client,
    metrics: &Arc<Metrics>,
    leadership: &Leadership,
    jobs: &Jobs,
    queue: tokio::sync::mpsc::UnboundedReceiver<Job>,
    nads: Option<Store<DynamicObject>>,
) -> Result<(), ControllerError> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let ipam = opts.ipam.clone();
    let handle = tokio::runtime::Handle::current();
    let client = client.clone();
    let metrics = metrics.clone();
    let leadership = leadership.clone();
    let requeue = jobs.clone();
    let retry_after = opts.retry_after;
    let reporter = opts.events.then(events::reporter);
    let reservations = matches!(opts.ipam.datastore, Datastore::Kubernetes(_))
        .then(|| Api::<OverlappingRangeIPReservation>::namespaced(client.clone(), &opts.namespace));
    std::thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            let store = match crate::store::open_for_operator(&ipam) {
                Ok(store) => store,
                Err(err) => {
                    let _ =
                        ready_tx.send(Err(format!("cannot open the store: {}", err.describe())));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let configured = crate::plugin::pools(&ipam).unwrap_or_default();
            Worker {
                store,
                configured,
                nads,
                handle,
                client,
                reservations,
                metrics,
                reporter,
                event_permits: Arc::new(tokio::sync::Semaphore::new(EVENTS_IN_FLIGHT)),
                leadership,
                requeue,
                retry_after,
                retry_pending: Arc::default(),
            }
            .run(queue);
        })
        .map_err(|e| ControllerError::Io(format!("cannot start the store worker: {e}")))?;
    ready_rx
        .await
        .map_err(|_| ControllerError::Io("the store worker stopped".into()))?
        .map_err(ControllerError::Config)
}

/// Node and NetworkAttachmentDefinition caches, and the loop that keeps the NodeSlicePools in
/// step with them: at every change, and every minute in any case. Only the leader writes.
/// Returns the NetworkAttachmentDefinitions' cache (the pool gauges read it too).
fn start_node_slices(
    opts: &Options,
    client: &Client,
    watch_client: &Client,
    metrics: &Arc<Metrics>,
    leadership: &Leadership,
    config: &watcher::Config,
) -> Store<DynamicObject> {
    let changed = Arc::new(Notify::new());
    // The passes need the nodes' names only: their metadata is watched, not their status.
    let (nodes, follow_nodes) = watch::reflect(
        watcher::watcher(
            Api::<PartialObjectMeta<Node>>::all(watch_client.clone()),
            config.clone(),
        ),
        (),
        ("nodes", "watch_nodes", watch::Wake::OnMembership),
        metrics.clone(),
        changed.clone(),
    );
    let nad = crate::k8s::crd::nad_resource();
    let (nads, follow_nads) = watch::reflect(
        watcher::watcher(
            Api::<DynamicObject>::all_with(watch_client.clone(), &nad),
            config.clone(),
        ),
        nad,
        (
            "network-attachment-definitions",
            "watch_nads",
            watch::Wake::OnEveryChange,
        ),
        metrics.clone(),
        changed.clone(),
    );
    tokio::spawn(follow_nodes);
    tokio::spawn(follow_nads);
    tokio::spawn(keep_node_slices(
        client.clone(),
        opts.namespace.clone(),
        (nads.clone(), nodes),
        metrics.clone(),
        leadership.clone(),
        changed,
    ));
    nads
}

async fn keep_node_slices(
    client: Client,
    namespace: String,
    (nads, nodes): (Store<DynamicObject>, Store<PartialObjectMeta<Node>>),
    metrics: Arc<Metrics>,
    leadership: Leadership,
    changed: Arc<Notify>,
) {
    // Without the NetworkAttachmentDefinition resource (no Multus) its cache never fills:
    // there is nothing to slice, and nothing is taken for deleted.
    if nads.wait_until_ready().await.is_err() || nodes.wait_until_ready().await.is_err() {
        return;
    }
    // A failed pass is tried again after a pause that doubles while failures repeat.
    let pauses = || growing_pauses(Duration::from_millis(500), Duration::from_secs(60)).build();
    let mut pause = pauses();
    loop {
        if !leadership.is_leader() {
            // A standby: its caches stay warm; it writes once it leads.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        match slice_sync::sync(&client, &namespace, (&nads, &nodes), &metrics, &leadership).await {
            Ok(pass) => {
                pause = pauses();
                if pass == slice_sync::Pass::Again {
                    // Soon, not at once: something that gives the slices back as fast as they
                    // are withdrawn (another controller) must not keep the loop spinning.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    changed.notify_one();
                }
            }
            // Stopped for the Lease, not failed: the loop waits to lead again.
            Err(_) if !leadership.is_leader() => continue,
            Err(err) => {
                let wait = pause.next().unwrap_or(Duration::from_secs(60));
                tracing::warn!(%err, retry_in = ?wait, "node slices");
                metrics.retries.inc();
                tokio::time::sleep(wait).await;
                changed.notify_one();
            }
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}
