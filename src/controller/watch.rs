//! The watches, on kube::runtime: its watcher lists, watches from the version listed, resumes
//! after a watch ends, lists again (a resync) when the version is too old or the connection
//! failed, and backs off between failures.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::Store;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};
use tokio::sync::Notify;

use super::metrics::Metrics;
use super::worker::{Job, Jobs};
use crate::cleanup::judge::PodPhase;
use crate::cleanup::pods;
use crate::store::error::chain;

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

/// Which changes of a reflected kind wake its follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Every change of an object.
    OnEveryChange,
    /// Only an object that appears or goes away: a node's status changes every few minutes,
    /// and at a thousand nodes that would be a pass, with its list of every IPPool, without
    /// end, while the passes need only the nodes' names.
    OnMembership,
}

/// What a follower has seen of the names of its cache, to tell which events wake it.
struct Seen<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    wake: Wake,
    names: BTreeSet<String>,
    cached: Store<K>,
}

impl<K: Resource + Clone + 'static> Seen<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn new(wake: Wake, cached: Store<K>) -> Seen<K> {
        let names = BTreeSet::new();
        Seen {
            wake,
            names,
            cached,
        }
    }

    /// Whether `event`, already applied to the cache, wakes the follower.
    fn wakes(&mut self, event: &Event<K>) -> bool {
        let every = self.wake == Wake::OnEveryChange;
        match event {
            Event::Init | Event::InitApply(_) => false,
            Event::InitDone => {
                let now: BTreeSet<String> =
                    self.cached.state().iter().map(|o| o.name_any()).collect();
                std::mem::replace(&mut self.names, now) != self.names || every
            }
            Event::Apply(object) => self.names.insert(object.name_any()) || every,
            Event::Delete(object) => self.names.remove(&object.name_any()) || every,
        }
    }
}

/// A cache of the objects `stream` (a watcher) reports, kept by a reflector, and the future that
/// keeps it: the changes `wake` names (and every completed list that changed what is cached)
/// wake `changed`. A failure of the watch counts as `failure` (one of the metrics'
/// operations): a watch refused for good (its role lacks the resource) never lists, and the
/// node slices then never follow the nodes and networks.
pub fn reflect<K>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    dyntype: K::DynamicType,
    (what, failure, wake): (&'static str, &'static str, Wake),
    metrics: Arc<Metrics>,
    changed: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()>)
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + Hash,
{
    let writer = Writer::new(dyntype);
    let reader = writer.as_reader();
    let mut seen = Seen::new(wake, reader.clone());
    let follow = async move {
        let stream = stream.default_backoff().reflect(writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match &event {
                Ok(Event::Init | Event::InitApply(_)) => continue,
                Ok(Event::InitDone) => metrics.resynced(what),
                Ok(_) => {}
                Err(err) => {
                    metrics.error(failure);
                    tracing::warn!(error = %chain(err), what, "watch failed; trying again");
                    continue;
                }
            }
            if event.is_ok_and(|event| seen.wakes(&event)) {
                changed.notify_one();
            }
        }
    };
    (reader, follow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{ObjectMeta, PartialObjectMeta};

    fn node(name: &str, version: &str) -> PartialObjectMeta<Node> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
    }

    /// Which of `events` wake a follower of nodes, each applied to the cache first as the
    /// reflector does.
    fn woken(wake: Wake, events: Vec<Event<PartialObjectMeta<Node>>>) -> Vec<bool> {
        let mut writer = Writer::new(());
        let mut seen = Seen::new(wake, writer.as_reader());
        let mut woken = Vec::new();
        for event in events {
            writer.apply_watcher_event(&event);
            if !matches!(event, Event::Init | Event::InitApply(_)) {
                woken.push(seen.wakes(&event));
            }
        }
        woken
    }

    #[test]
    fn nodes_wake_the_slices_only_as_they_come_and_go() {
        let events = || {
            vec![
                Event::Init,
                Event::InitApply(node("a", "1")),
                Event::InitDone,
                Event::Apply(node("a", "2")),
                Event::Apply(node("b", "3")),
                Event::Delete(node("a", "2")),
                // A resync that finds what was cached.
                Event::Init,
                Event::InitApply(node("b", "4")),
                Event::InitDone,
                // One that finds a node gone meanwhile.
                Event::Init,
                Event::InitDone,
            ]
        };
        assert_eq!(
            woken(Wake::OnMembership, events()),
            [true, false, true, true, false, true]
        );
        assert_eq!(woken(Wake::OnEveryChange, events()), [true; 6]);
    }
}
