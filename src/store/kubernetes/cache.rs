//! The agent's watch-fed copies of its namespace's IPPools and OverlappingRangeIPReservations
//! and of the Go binaries' Lease, kept by kube::runtime's watcher and reflector's store (list,
//! watch, and after a failure list again, after a pause).
//!
//! A copy is a guess, never a verdict. A batch starts from the cached pool instead of reading it,
//! and its write stays conditional on every entry it relies on: a copy the watch has not brought
//! up to date yet costs a refused test and a read, never a duplicate. What a copy lacks proves
//! nothing (an entry written a moment ago, a pool just created): those cases read the server.
//! Pools are kept undecoded until a batch uses one ([`Cache::pool`]).

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::Notify;

use super::go_lease::GO_LEASE_NAME;
use crate::k8s::crd::{IPPool, IPPoolSpec, OverlappingRangeIPReservation};
use crate::store::queues::Observer;
use crate::store::retry::growing_pauses;

/// How long one watch of a copy lasts (`timeoutSeconds`): the server ends it then and the
/// watcher resumes it from where it was. The client the copies use reads for that long and a
/// request's timeout more ([`watch_read_timeout`]), so a quiet watch is never cut for silence,
/// and a connection gone dead without a word is found within that time.
pub const WATCH_SECONDS: u32 = 60;

/// The read timeout of the copies' client, for a request timeout of `request`.
pub fn watch_read_timeout(request: Duration) -> Duration {
    Duration::from_secs(WATCH_SECONDS.into()) + request
}

/// An IPPool as its watch delivers it, the spec kept as the server's JSON text. Every agent
/// receives every write of every pool of its namespace, while it needs a pool's entries only
/// for its own batches: decoding them is left to [`Cache::pool`].
#[derive(Clone, Debug, Deserialize)]
struct WatchedPool {
    metadata: ObjectMeta,
    spec: Box<RawValue>,
}

impl Resource for WatchedPool {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        IPPool::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        IPPool::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        IPPool::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        IPPool::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// One watched resource: the reflector's store, and whether it holds a complete list that the
/// watch has followed since (false before the first list and from a failure to the next list).
struct Copy<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    synced: Arc<AtomicBool>,
    /// Woken after every event the copy took in.
    changed: Arc<Notify>,
    namespace: String,
}

impl<K> Copy<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
{
    /// Starts following `api` (restricted by `config`) on the current runtime; the task ends
    /// with the runtime.
    fn follow(
        api: Api<K>,
        config: watcher::Config,
        namespace: &str,
        what: &'static str,
        observer: Arc<dyn Observer>,
    ) -> Copy<K> {
        let (store, writer) = reflector::store();
        let synced = Arc::new(AtomicBool::new(false));
        let changed = Arc::new(Notify::new());
        let follower = Follower {
            api,
            config,
            writer,
            synced: synced.clone(),
            changed: changed.clone(),
            what,
            observer,
        };
        tokio::spawn(follower.run());
        Copy {
            store,
            synced,
            changed,
            namespace: namespace.to_string(),
        }
    }

    fn get(&self, name: &str) -> Option<Arc<K>> {
        let key = ObjectRef::new(name).within(&self.namespace);
        self.store.get(&key)
    }

    fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The object once the copy holds it, waiting at most `within` for the watch to bring it.
    async fn get_within(&self, name: &str, within: Duration) -> Option<Arc<K>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the look, so an event between the two is not missed.
            let next_event = self.changed.notified();
            let mut next_event = std::pin::pin!(next_event);
            next_event.as_mut().enable();
            if let Some(found) = self.get(name) {
                return Some(found);
            }
            tokio::time::timeout_at(deadline, next_event).await.ok()?;
        }
    }
}

/// The longest pause between a copy's failure and its next list; a copy in step for longer
/// than this starts its pauses over.
const RELIST_PAUSE_MAX: Duration = Duration::from_secs(30);

/// The pauses before a failed copy lists again: from 0.8 s, doubling up to half a minute (as
/// kube::runtime's default back-off), each stretched at random so that the agents of every
/// node do not list a restarted API server at the same moment.
fn relist_pauses() -> backon::ExponentialBackoff {
    growing_pauses(Duration::from_millis(800), RELIST_PAUSE_MAX)
        .with_jitter()
        .build()
}

/// What keeps one copy: its watcher, the reflector's writer, and where it says whether the copy
/// is in step.
struct Follower<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    synced: Arc<AtomicBool>,
    changed: Arc<Notify>,
    what: &'static str,
    observer: Arc<dyn Observer>,
}

impl<K> Follower<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
{
    /// Lists and watches; after a failure, lists again after a pause that grows while failures
    /// repeat.
    async fn run(mut self) {
        let mut pauses = relist_pauses();
        loop {
            if self.list_and_watch().await > RELIST_PAUSE_MAX {
                pauses = relist_pauses();
            }
            tokio::time::sleep(pauses.next().unwrap_or(RELIST_PAUSE_MAX)).await;
        }
    }

    /// One watcher, from its list to its first failure; returns how long the copy was in step.
    ///
    /// The watcher alone would resume a failed watch where it was without listing again, and
    /// say nothing when the watch is back: a copy marked out of step at the failure would stay
    /// so until its next change, for ever on a quiet namespace. A new watcher lists, and its
    /// list's end says when the copy is in step again.
    async fn list_and_watch(&mut self) -> Duration {
        let stream = watcher(self.api.clone(), self.config.clone());
        let mut stream = std::pin::pin!(stream);
        let mut in_step_since = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    // No copy's managedFields are read (a reservation's age is read from the
                    // server's list, see `unbacked_reservations`), and they would be most of
                    // each object's size.
                    let event = event.modify(|k| k.meta_mut().managed_fields = None);
                    self.writer.apply_watcher_event(&event);
                    if !matches!(event, Event::Init | Event::InitApply(_)) {
                        in_step_since.get_or_insert_with(std::time::Instant::now);
                        self.tell(true);
                    }
                }
                Err(err) => {
                    let what = self.what;
                    tracing::debug!(%err, what, "watch failed; the copy is not trusted until listed again");
                    break;
                }
            }
        }
        self.tell(false);
        in_step_since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// Records whether the copy is in step and wakes whoever waits for its next event.
    fn tell(&self, in_step: bool) {
        self.synced.store(in_step, Ordering::Release);
        self.observer.cache(self.what, in_step);
        self.observer.in_step(self.what, usize::from(in_step), 1);
        self.changed.notify_waiters();
    }
}

/// The agent's copies of the namespace's IPPools, reservations and of the Lease `whereabouts`.
pub struct Cache {
    pools: Copy<WatchedPool>,
    reservations: Copy<OverlappingRangeIPReservation>,
    go_lease: Copy<Lease>,
}

impl Cache {
    /// Starts the watches on the current runtime.
    pub fn follow(client: kube::Client, namespace: &str, observer: Arc<dyn Observer>) -> Cache {
        // Lists may come from the API server's watch cache: a copy is a guess that every write
        // checks against the server, and after an API server restart every node's agent lists
        // again at once, which must not all reach etcd.
        let watch = || {
            watcher::Config::default()
                .any_semantic()
                .timeout(WATCH_SECONDS)
        };
        let pools = Copy::follow(
            Api::namespaced(client.clone(), namespace),
            watch(),
            namespace,
            "ippools",
            observer.clone(),
        );
        let reservations = Copy::follow(
            Api::namespaced(client.clone(), namespace),
            watch(),
            namespace,
            "reservations",
            observer.clone(),
        );
        let one_lease = watch().fields(&format!("metadata.name={GO_LEASE_NAME}"));
        let go_lease = Copy::follow(
            Api::namespaced(client, namespace),
            one_lease,
            namespace,
            "lease",
            observer,
        );
        Cache {
            pools,
            reservations,
            go_lease,
        }
    }

    /// The reservation as the watch last saw it, if it saw it at all.
    pub fn reservation(&self, name: &str) -> Option<OverlappingRangeIPReservation> {
        self.reservations.get(name).map(|found| (*found).clone())
    }

    /// The reservation as the watch shows it, waiting at most `within` for it to appear: for
    /// one the server just said exists, whose event is on its way.
    pub async fn reservation_within(
        &self,
        name: &str,
        within: Duration,
    ) -> Option<OverlappingRangeIPReservation> {
        let found = self.reservations.get_within(name, within).await?;
        Some((*found).clone())
    }

    /// The resourceVersion of the pool as the watch last saw it, if it saw it at all.
    pub fn pool_version(&self, name: &str) -> Option<String> {
        self.pools.get(name)?.metadata.resource_version.clone()
    }

    /// The pool as the watch last saw it, decoded; `None` if it never saw it (or cannot decode
    /// it: then the server is asked, as for any pool the copy lacks).
    pub fn pool(&self, name: &str) -> Option<IPPool> {
        let watched = self.pools.get(name)?;
        match serde_json::from_str::<IPPoolSpec>(watched.spec.get()) {
            Ok(spec) => Some(IPPool {
                metadata: watched.metadata.clone(),
                spec,
            }),
            Err(err) => {
                tracing::debug!(%err, pool = name, "the watched copy of the pool does not decode");
                None
            }
        }
    }

    /// The Go binaries' Lease as the watch sees it: `Some(None)` when the followed list has no
    /// such Lease, `None` when the copy cannot tell (not listed yet, or the watch failed).
    pub fn go_lease(&self) -> Option<Option<Lease>> {
        self.go_lease.synced().then(|| {
            self.go_lease
                .get(GO_LEASE_NAME)
                .map(|lease| (*lease).clone())
        })
    }
}
