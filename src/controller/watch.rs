//! The watches, on kube::runtime: its watcher lists, watches from the version listed, resumes
//! after a watch ends, lists again (a resync) when the version is too old or the connection
//! failed, and backs off between failures.

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::Store;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::metrics::Metrics;
use super::worker::{Job, Jobs};
use crate::cleanup::judge::PodPhase;
use crate::cleanup::pods;

/// Follows pods for ever: every deletion and every pod reaching Succeeded or Failed goes to the
/// worker; every completed list (at start, after a gap) asks for a full reconcile, which covers
/// what happened before it (at start-up, everything deleted while no controller ran; after a
/// gap, the deletions the watch missed). `ready` is set after the first list.
pub async fn pods(
    api: Api<Pod>,
    config: watcher::Config,
    jobs: Jobs,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) {
    let mut first = true;
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(event) = stream.next().await {
        let job = match event {
            Ok(Event::Delete(pod)) => {
                metrics.pod_deletions.inc();
                Job::Deleted {
                    pod_ref: pods::pod_ref(&pod),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                }
            }
            Ok(Event::Apply(pod)) => {
                let phase = pods::pod_state(&pod).phase;
                if !matches!(phase, PodPhase::Succeeded | PodPhase::Failed) {
                    continue;
                }
                Job::Finished {
                    pod_ref: pods::pod_ref(&pod),
                }
            }
            // Listed pods: the reconcile at the end of the list judges them all.
            Ok(Event::Init | Event::InitApply(_)) => continue,
            Ok(Event::InitDone) => {
                metrics.resynced("pods");
                ready.store(true, Ordering::SeqCst);
                let why = if first { "start-up" } else { "watch resynced" };
                first = false;
                Job::Reconcile { why }
            }
            Err(err) => {
                metrics.error("watch_pods");
                tracing::warn!(%err, "pod watch failed; trying again");
                continue;
            }
        };
        if jobs.send(job).is_err() {
            tracing::error!("the store worker stopped");
            return;
        }
    }
}

/// A cache of `api`'s objects kept by a reflector, and the future that keeps it: every change
/// (and every completed list) wakes `changed`.
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    what: &'static str,
    metrics: Arc<Metrics>,
    changed: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + Hash,
{
    let writer = Writer::new(dyntype);
    let reader = writer.as_reader();
    let follow = async move {
        let stream = watcher(api, config).default_backoff().reflect(writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init | Event::InitApply(_)) => continue,
                Ok(Event::InitDone) => metrics.resynced(what),
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(%err, what, "watch failed; trying again");
                    continue;
                }
            }
            changed.notify_one();
        }
    };
    (reader, follow)
}
