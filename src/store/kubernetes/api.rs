//! The API calls the engine makes, each under a timeout, with failures sorted by what the caller
//! should do about them.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use k8s_openapi::api::coordination::v1::Lease;

use k8s_openapi::api::core::v1::Pod;

use crate::cleanup::judge::{PodPlace, PodState};
use crate::cleanup::pods::PodError;
use crate::files::without_values;
use crate::ipam::names::is_valid_object_name;
use crate::k8s::cluster::is_transient;
use crate::k8s::crd::{
    nad_resource, IPPool, IPPoolSpec, NodeSlicePool, OverlappingRangeIPReservation,
};
use crate::k8s::throttle;
use crate::store::error::chain;
use crate::store::kubernetes::settings::Settings;
use crate::store::StoreError;

/// A failed API call, by what to do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The object changed since it was read (409 Conflict, or a failed `test` op: 422).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Create of a name that exists (409 AlreadyExists).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// Unreachable, too slow, overloaded (5xx): nothing is known to have been written.
    #[error("{0}")]
    Transient(String),
    /// Shed by the server before it handled the request (429: over its flow's share under API
    /// Priority and Fairness, or over its in-flight limits), with the wait it asked for.
    #[error("{text}")]
    Throttled {
        text: String,
        asked: Option<Duration>,
    },
    /// Refused for good (401, 403, 400, ...): retrying cannot help.
    #[error("{0}")]
    Refused(String),
    /// The object would be larger than the server stores (etcd's request limit, 1.5 MiB by
    /// default): no retry can write it; only a smaller object fits.
    #[error("{0}")]
    TooLarge(String),
    /// The server's certificate is not signed by the CA the configuration trusts: a wrong CA
    /// (or server address) in the kubeconfig, which no retry can fix.
    #[error("{0}")]
    Untrusted(String),
    /// The client failed before the server answered (no connection, its credentials, its TLS
    /// settings); `transient` as [`is_transient`] judges it. Its text is the library's, which
    /// quotes the kubeconfig's server and files: the runtime is shown it without its values
    /// ([`ApiError::answered`]), the log whole.
    #[error("{text}")]
    Client { text: String, transient: bool },
}

impl ApiError {
    fn from_kube(what: &str, err: kube::Error) -> ApiError {
        let transient = is_transient(&err);
        match err {
            kube::Error::Api(status) => {
                let text = format!("{what}: {} ({})", status.message, status.code);
                match status.code {
                    _ if too_large(&status) => ApiError::TooLarge(text),
                    429 => ApiError::Throttled {
                        asked: throttle::asked_wait(&status),
                        text,
                    },
                    _ if transient => ApiError::Transient(text),
                    409 if status.reason == "AlreadyExists" => ApiError::AlreadyExists(text),
                    409 => ApiError::Conflict(text),
                    404 => ApiError::NotFound(text),
                    // A JSON patch whose `test` op fails is answered 422; the caller re-reads to
                    // tell it from a validation error.
                    422 => ApiError::Conflict(text),
                    _ => ApiError::Refused(text),
                }
            }
            other => ApiError::Client {
                text: format!("{what}: {}", chain(&other)),
                transient,
            },
        }
    }

    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Transient(_)
                | ApiError::Throttled { .. }
                | ApiError::Client {
                    transient: true,
                    ..
                }
        )
    }

    /// Whether the request was refused for good: by the server (401, 403, 400, ...) or by the
    /// client before it was sent.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            ApiError::Refused(_)
                | ApiError::Client {
                    transient: false,
                    ..
                }
        )
    }

    /// `what`, followed by this error's text: the server's answer (an admission policy's
    /// message is written for whoever made the request, the pod's owner) or the client's
    /// failure without its values ([`ApiError::from_kube`]). A store error's causes go to the
    /// log only, so the text the runtime may be shown is put in its message.
    pub fn answered(&self, what: &str) -> String {
        match self {
            ApiError::Client { text, .. } | ApiError::Untrusted(text) => {
                format!("{what}: {}", without_values(text))
            }
            answer => format!("{what}: {}", without_identities(&answer.to_string())),
        }
    }

    /// As a store error: transient failures are "try again" (CNI code 11).
    pub fn into_store(self) -> StoreError {
        let error = match &self {
            ApiError::Transient(_)
            | ApiError::Client {
                transient: true, ..
            } => StoreError::try_again(self.answered("kubernetes API server unavailable")),
            ApiError::Client {
                transient: false, ..
            } => StoreError::io(self.answered("the kubernetes client failed")),
            ApiError::Throttled { .. } => StoreError::try_again(
                "the kubernetes API server kept shedding the requests (429 Too Many Requests: \
                 see its API Priority and Fairness settings)",
            ),
            ApiError::Conflict(_) => {
                StoreError::try_again("kubernetes object kept changing, gave up")
            }
            ApiError::Refused(_) | ApiError::AlreadyExists(_) | ApiError::NotFound(_) => {
                StoreError::io(self.answered("kubernetes API server refused"))
            }
            ApiError::TooLarge(_) => {
                StoreError::io(self.answered("kubernetes object too large to store"))
            }
            ApiError::Untrusted(_) => {
                StoreError::config(self.answered("cannot trust the API server"))
            }
        };
        error.because(self)
    }
}

impl From<ApiError> for StoreError {
    fn from(err: ApiError) -> StoreError {
        err.into_store()
    }
}

/// A write the server refused: the resourceVersion of the object it was sent for, and the
/// server's answer.
pub struct RefusedWrite {
    pub rv: String,
    pub refusal: ApiError,
}

impl RefusedWrite {
    /// Fails when the object, read again (its resourceVersion `now`), is the one the write was
    /// refused for, unchanged: the server refused it for another reason than a concurrent
    /// change (an admission policy, say), which no retry overcomes. The refusal says why.
    pub fn still_refused(
        refused: Option<&RefusedWrite>,
        now: Option<&str>,
        what: impl FnOnce() -> String,
    ) -> Result<(), StoreError> {
        match refused {
            Some(refused) if now == Some(refused.rv.as_str()) => {
                let what = refused.refusal.answered(&what());
                Err(StoreError::io(what).because(refused.refusal.clone()))
            }
            _ => Ok(()),
        }
    }
}

/// The waits of one call the server sheds: each as long as the server asks, stretched by up to
/// a half at random so that the requests it shed together do not all come back together; none
/// once they would pass the budget. A server that names no wait gets the transient pacing's,
/// and no more retries than it allows.
struct Throttled {
    budget: Duration,
    waited: Duration,
}

impl Throttled {
    fn within(budget: Duration) -> Throttled {
        Throttled {
            budget,
            waited: Duration::ZERO,
        }
    }

    fn next_wait(&mut self, asked: Option<Duration>, pause: Option<Duration>) -> Option<Duration> {
        let base = asked.or(pause)?;
        let wait = base.mul_f64(1.0 + rand::random::<f64>() / 2.0);
        self.waited += wait;
        (self.waited <= self.budget).then_some(wait)
    }
}

/// A create's failure as what it is: a create tests nothing, so a 422 (read as a failed
/// JSON-patch test elsewhere) is a refusal for good: the object is invalid, or an admission
/// policy of the cluster refuses it. (A name taken is `AlreadyExists`.)
fn refused_create(err: ApiError) -> ApiError {
    match err {
        ApiError::Conflict(text) => ApiError::Refused(text),
        err => err,
    }
}

/// Whether the server refused to store an object for its size. The API server answers 500
/// with etcd's own message when the object is over etcd's request limit (413 is what it
/// answers to a request body over its own limit).
fn too_large(status: &kube::core::Status) -> bool {
    status.code == 413
        || (status.code == 500 && status.message.contains("etcdserver: request is too large"))
}

/// Whether a connection failed because the server's certificate did not verify. The TLS
/// library's error is not reachable as a type through the client's error, so its message is
/// what tells (rustls: "invalid peer certificate: UnknownIssuer", "... NotValidForName").
fn is_untrusted_certificate(chain: &str) -> bool {
    chain.contains("invalid peer certificate")
}

/// A server's answer without the identities it may quote: an RBAC refusal names the
/// credential's user (`User "system:serviceaccount:…"`) and the engine's namespace, which are
/// the kubeconfig's, not the network configuration author's to see.
fn without_identities(answer: &str) -> String {
    static QUOTED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"(User|[Nn]amespaces?) "[^"]*""#).expect("a valid pattern")
    });
    QUOTED.replace_all(answer, r#"$1 "…""#).into_owned()
}

/// The three custom resources in the engine's namespace.
#[derive(Clone)]
pub struct Kube {
    pub pools: Api<IPPool>,
    pub reservations: Api<OverlappingRangeIPReservation>,
    pub slices: Api<NodeSlicePool>,
    /// The Go Whereabouts' Lease, taken part in while Go binaries may write the pools.
    pub leases: Api<Lease>,
    /// For pods, which live in every namespace (a node's GC asks where a pod runs).
    client: kube::Client,
    /// The request timeout, the transient pacing and the budget of waits for a server that
    /// sheds requests.
    settings: Settings,
    /// Where the server and its CA came from ("kubeconfig /path"), named when TLS fails.
    pub origin: String,
}

impl Kube {
    pub fn new(client: kube::Client, namespace: &str, settings: &Settings, origin: &str) -> Kube {
        Kube {
            pools: Api::namespaced(client.clone(), namespace),
            reservations: Api::namespaced(client.clone(), namespace),
            slices: Api::namespaced(client.clone(), namespace),
            leases: Api::namespaced(client.clone(), namespace),
            client,
            settings: settings.clone(),
            origin: origin.to_string(),
        }
    }

    fn error(&self, what: &str, err: kube::Error) -> ApiError {
        match ApiError::from_kube(what, err) {
            ApiError::Client { text: msg, .. } if is_untrusted_certificate(&msg) => {
                // Named by its field, which the runtime's reply keeps (the path it drops).
                let trusting = if self.origin.starts_with("kubeconfig") {
                    "the kubeconfig, ipam.kubernetes.kubeconfig,"
                } else {
                    "the pod's service account"
                };
                ApiError::Untrusted(format!(
                    "{msg}: the API server's TLS certificate is not signed by the CA that \
                     {trusting} trusts (check its certificate-authority and server): {}",
                    self.origin
                ))
            }
            other => other,
        }
    }

    /// Runs one request under the request timeout, retrying transient failures a few times,
    /// and a request the server shed (429) after the wait it asks for, for as long as the
    /// settings' `throttled_wait` allows. Retrying is safe for every call made here: a create that did
    /// land is seen as AlreadyExists, a patch that did land fails its resourceVersion test, a
    /// delete that did land is NotFound; each caller handles those outcomes. (A shed request
    /// was not handled at all.)
    async fn call<T, F, Fut>(&self, what: &str, mut request: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let limit = self.settings.request_timeout;
        let attempt = || {
            let answer = tokio::time::timeout(limit, request());
            async move {
                match answer.await {
                    Ok(result) => result.map_err(|err| self.error(what, err)),
                    Err(_) => Err(ApiError::Transient(format!(
                        "{what}: no answer within {limit:?}"
                    ))),
                }
            }
        };
        let mut throttled = Throttled::within(self.settings.throttled_wait);
        attempt
            .retry(self.settings.transient.pacing())
            .when(ApiError::is_transient)
            .adjust(|err, pause| match err {
                ApiError::Throttled { asked, .. } => throttled.next_wait(*asked, pause),
                _ => pause,
            })
            .notify(|err, pause| tracing::debug!(%err, ?pause, "transient failure, retrying"))
            .await
    }

    /// The object `name` of `api`, if it exists. No object has a name Kubernetes refuses, and
    /// kube puts names into request paths as they are (a `/` or `?` there would address another
    /// object, and a space cannot be sent at all): a read of such a name finds nothing, without
    /// a request, so a DEL of what an invalid network name could never have written succeeds.
    async fn get_named<K>(
        &self,
        api: &Api<K>,
        kind: &str,
        name: &str,
    ) -> Result<Option<K>, ApiError>
    where
        K: Clone + DeserializeOwned + Debug,
    {
        if !is_valid_object_name(name) {
            return Ok(None);
        }
        let what = format!("get {kind} {name}");
        self.call(&what, || api.get_opt(name)).await
    }

    pub async fn get_pool(&self, name: &str) -> Result<Option<IPPool>, ApiError> {
        self.get_named(&self.pools, "IPPool", name).await
    }

    pub async fn create_pool(&self, pool: &IPPool) -> Result<IPPool, ApiError> {
        let name = pool.metadata.name.as_deref().unwrap_or_default();
        let what = format!("create IPPool {name}");
        let pp = PostParams::default();
        let created = self.call(&what, || self.pools.create(&pp, pool)).await;
        created.map_err(refused_create)
    }

    /// A JSON patch of the pool: `ops` (with their own `test`s), and when `whole_rv` is given,
    /// only if the pool is still at that resourceVersion.
    pub async fn patch_pool(
        &self,
        name: &str,
        whole_rv: Option<&str>,
        ops: &[Value],
    ) -> Result<IPPool, ApiError> {
        let what = format!("update IPPool {name}");
        let mut all = Vec::with_capacity(ops.len() + 1);
        if let Some(rv) = whole_rv {
            all.push(
                serde_json::json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}),
            );
        }
        all.extend_from_slice(ops);
        let patch = serde_json::from_value(Value::Array(all))
            .map_err(|err| ApiError::Refused(format!("{what}: cannot build patch: {err}")))?;
        let patch: Patch<()> = Patch::Json(patch);
        let pp = PatchParams::default();
        self.call(&what, || self.pools.patch(name, &pp, &patch))
            .await
    }

    /// Whether the engine's namespace exists. A list there answers empty either way, so this
    /// sends a pool's create as a dry run (nothing is stored): the server refuses it NotFound
    /// only for a namespace that does not exist, once the IPPool resource is known to be
    /// served. A create refused for another reason (a policy, a webhook, the plugin's role)
    /// says nothing about the namespace, which counts as there.
    pub async fn namespace_exists(&self) -> Result<bool, ApiError> {
        let probe = IPPool::new(
            "whereabouts-namespace-probe",
            IPPoolSpec {
                range: "192.0.2.0/32".into(),
                allocations: Default::default(),
            },
        );
        let dry_run = PostParams {
            dry_run: true,
            field_manager: None,
        };
        let what = "create IPPool (dry run)";
        match self
            .call(what, || self.pools.create(&dry_run, &probe))
            .await
        {
            Ok(_) | Err(ApiError::AlreadyExists(_) | ApiError::Conflict(_)) => Ok(true),
            Err(err) if err.is_refused() => Ok(true),
            Err(ApiError::NotFound(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    pub async fn list_pools(&self, limit: Option<u32>) -> Result<Vec<IPPool>, ApiError> {
        let mut lp = ListParams::default();
        if let Some(limit) = limit {
            lp = lp.limit(limit);
        }
        Ok(self
            .call("list IPPools", || self.pools.list(&lp))
            .await?
            .items)
    }

    /// Every NodeSlicePool of the namespace; none where the cluster lacks the resource.
    pub async fn list_slices(&self) -> Result<Vec<NodeSlicePool>, ApiError> {
        let lp = ListParams::default();
        match self
            .call("list NodeSlicePools", || self.slices.list(&lp))
            .await
        {
            Ok(list) => Ok(list.items),
            Err(ApiError::NotFound(_)) => Ok(Vec::new()),
            Err(err) => Err(err),
        }
    }

    /// Every NetworkAttachmentDefinition of the cluster; none where the cluster lacks the
    /// resource (no Multus).
    pub async fn list_nads(&self) -> Result<Vec<Arc<DynamicObject>>, ApiError> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &nad_resource());
        let lp = ListParams::default();
        match self
            .call("list NetworkAttachmentDefinitions", || api.list(&lp))
            .await
        {
            Ok(list) => Ok(list.items.into_iter().map(Arc::new).collect()),
            Err(ApiError::NotFound(_)) => Ok(Vec::new()),
            Err(err) => Err(err),
        }
    }

    pub async fn get_reservation(
        &self,
        name: &str,
    ) -> Result<Option<OverlappingRangeIPReservation>, ApiError> {
        let kind = "OverlappingRangeIPReservation";
        self.get_named(&self.reservations, kind, name).await
    }

    pub async fn create_reservation(
        &self,
        reservation: &OverlappingRangeIPReservation,
    ) -> Result<OverlappingRangeIPReservation, ApiError> {
        let name = reservation.metadata.name.as_deref().unwrap_or_default();
        let what = format!("create OverlappingRangeIPReservation {name}");
        let pp = PostParams::default();
        let created = self.call(&what, || self.reservations.create(&pp, reservation));
        created.await.map_err(refused_create)
    }

    /// Replaces the reservation only if its resourceVersion is still the one in `reservation`.
    pub async fn replace_reservation(
        &self,
        reservation: &OverlappingRangeIPReservation,
    ) -> Result<OverlappingRangeIPReservation, ApiError> {
        let name = reservation.metadata.name.as_deref().unwrap_or_default();
        let what = format!("update OverlappingRangeIPReservation {name}");
        let pp = PostParams::default();
        self.call(&what, || self.reservations.replace(name, &pp, reservation))
            .await
    }

    /// Deletes the reservation only if it is still the object read (same uid and version), so a
    /// reservation re-created by someone else in between is never removed. Gone already is fine.
    pub async fn delete_reservation(
        &self,
        name: &str,
        uid: Option<&str>,
        rv: Option<&str>,
    ) -> Result<(), ApiError> {
        let what = format!("delete OverlappingRangeIPReservation {name}");
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: uid.map(str::to_string),
                resource_version: rv.map(str::to_string),
            }),
            ..DeleteParams::default()
        };
        match self
            .call(&what, || self.reservations.delete(name, &dp))
            .await
        {
            Ok(_) | Err(ApiError::NotFound(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    pub async fn list_reservations(
        &self,
        limit: Option<u32>,
    ) -> Result<Vec<OverlappingRangeIPReservation>, ApiError> {
        let mut lp = ListParams::default();
        if let Some(limit) = limit {
            lp = lp.limit(limit);
        }
        Ok(self
            .call("list OverlappingRangeIPReservations", || {
                self.reservations.list(&lp)
            })
            .await?
            .items)
    }

    pub async fn get_slice_pool(&self, name: &str) -> Result<Option<NodeSlicePool>, ApiError> {
        self.get_named(&self.slices, "NodeSlicePool", name).await
    }

    pub async fn get_lease(&self, name: &str) -> Result<Option<Lease>, ApiError> {
        self.get_named(&self.leases, "Lease", name).await
    }

    pub async fn create_lease(&self, lease: &Lease) -> Result<Lease, ApiError> {
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        let what = format!("create Lease {name}");
        let pp = PostParams::default();
        let created = self.call(&what, || self.leases.create(&pp, lease)).await;
        created.map_err(refused_create)
    }

    /// Replaces the Lease only if its resourceVersion is still the one in `lease`.
    pub async fn replace_lease(&self, lease: &Lease) -> Result<Lease, ApiError> {
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        let what = format!("update Lease {name}");
        let pp = PostParams::default();
        self.call(&what, || self.leases.replace(name, &pp, lease))
            .await
    }

    /// The pod `namespace/name` as cleanup judges pods; `None` when there is no such pod.
    pub async fn pod(&self, reference: &str) -> Result<Option<PodState>, PodError> {
        crate::cleanup::pods::get(&self.client, reference).await
    }

    /// Where the pod `namespace/name` is; [`PodPlace::Gone`] when there is no such pod. The
    /// parts come from the store, where anyone who could write it put them: parts no object can
    /// have (a `/`, `..`, `?`) name no pod, and are not put into a request's path, where they
    /// would ask for another object.
    pub async fn pod_place(&self, namespace: &str, name: &str) -> Result<PodPlace, ApiError> {
        if !is_valid_object_name(namespace) || !is_valid_object_name(name) {
            return Ok(PodPlace::Gone);
        }
        let what = format!("get pod {namespace}/{name}");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = self.call(&what, || pods.get_opt(name)).await?;
        Ok(match pod {
            None => PodPlace::Gone,
            Some(pod) => PodPlace::Exists {
                uid: pod.metadata.uid.unwrap_or_default(),
                node: pod.spec.and_then(|spec| spec.node_name),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_told_the_servers_answer_and_the_clients_failure_without_their_values() {
        let denied = ApiError::Refused(
            "patch IPPool 10.0.0.0-24: ippools.whereabouts.cni.cncf.io \"10.0.0.0-24\" is \
             forbidden: User \"system:serviceaccount:infra:wb\" cannot patch resource \
             \"ippools\" in the namespace \"infra\" (403)"
                .into(),
        );
        let told = denied.answered("refused");
        assert!(told.contains("User \"…\" cannot patch"), "{told}");
        assert!(told.contains("in the namespace \"…\" (403)"), "{told}");
        assert!(!told.contains("infra"), "{told}");
        // An admission policy's message is the pod owner's to read, whole.
        let policy =
            ApiError::Refused("update IPPool x: at most 4 allocations in 10.0.0.0/24 (422)".into());
        assert!(policy
            .answered("refused")
            .ends_with("at most 4 allocations in 10.0.0.0/24 (422)"));
        let client = ApiError::Client {
            text: "list IPPools: client error (Connect): tcp connect error to \
                   https://api.infra.example:6443: Connection refused"
                .into(),
            transient: true,
        };
        let told = client.answered("unavailable");
        assert!(!told.contains("infra"), "{told}");
        assert!(told.ends_with("Connection refused"), "{told}");
        let store = StoreError::from(client.clone());
        assert!(matches!(store, StoreError::TryAgain { .. }));
        assert!(
            store.describe().contains("api.infra.example"),
            "the log keeps it"
        );
        assert!(client.is_transient() && !client.is_refused());
    }

    #[test]
    fn shed_requests_wait_as_asked_until_the_budget_is_spent() {
        let second = Duration::from_secs(1);
        let mut throttled = Throttled::within(Duration::from_secs(3));
        let first = throttled.next_wait(Some(second), None).unwrap();
        assert!(first >= second && first <= second.mul_f64(1.5), "{first:?}");
        let mut waited = first;
        while let Some(wait) = throttled.next_wait(Some(second), None) {
            assert!(wait >= second, "{wait:?}");
            waited += wait;
        }
        assert!(waited <= Duration::from_secs(3), "{waited:?}");
        assert!(waited >= Duration::from_secs(2), "{waited:?}");
        // Without a wait from the server, the transient pacing's.
        let mut unasked = Throttled::within(Duration::from_secs(3));
        let paced = unasked.next_wait(None, Some(Duration::from_millis(100)));
        assert!(paced.unwrap() <= Duration::from_millis(150));
        assert_eq!(
            unasked.next_wait(None, None),
            None,
            "the pacing's retries are spent"
        );
    }
}
