//! Taking part in the Go Whereabouts' Lease while Go binaries may still write the pools.
//!
//! A Go binary holds the Lease `whereabouts` (in the engine's namespace) for the whole of its
//! ADD or DEL: it reads the pool, checks the address's overlapping-range reservation, writes the
//! pool, then creates the reservation; when that create fails, its runtime's DEL deletes the
//! reservation without looking at who holds it. An ADD of ours between its check and its create
//! would lose its reservation that way, and its address would be handed out again. So while Go
//! binaries remain, our ADD holds the same Lease, as client-go's leader election takes it: a
//! free or released Lease is taken at once, someone else's only once it has not changed for its
//! `leaseDurationSeconds` as seen here, every write conditional on the resourceVersion read; it is
//! renewed while the ADD runs and released (holder emptied) at the end, as a Go binary does.
//!
//! Whether a Go binary is still around (`go_whereabouts: auto`) is read from the same Lease: a
//! Go write leaves `renewTime` different from the time our last write recorded in an annotation,
//! and our writes carry the last Go renewal forward in another annotation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::ObjectMeta;
use tokio::sync::{Mutex, Notify};

use super::api::{ApiError, Kube};
use crate::config::{GoPeers, GO_ACTIVE_WINDOW_SECS};
use crate::store::StoreError;

/// The Go binary's Lease (outside node-slice mode), in the engine's namespace.
pub const GO_LEASE_NAME: &str = "whereabouts";
/// The `renewTime` of our last write of the Lease: a different `renewTime` is a Go write.
pub const OUR_RENEWAL: &str = "whereabouts.cni.cncf.io/rust-renew-time";
/// The last `renewTime` a Go binary wrote, as our writes saw it.
pub const GO_RENEWAL: &str = "whereabouts.cni.cncf.io/go-renew-time";

/// How long our hold lasts without renewal: a process that dies holding the Lease delays the
/// next ADD (ours or Go's) by this much.
const HOLD: Duration = Duration::from_secs(4);
/// How often the hold is renewed while the ADD runs. Go binaries built on client-go before
/// v0.27 wait their own lease duration (1.5 s), not the record's: renewed every 300 ms, the
/// hold changes well within it even when a renewal's request takes a while.
const RENEW_EVERY: Duration = Duration::from_millis(300);
/// How recent the last renewal that landed must be for the hold to count. A Go binary on
/// client-go before v0.27 takes the Lease 1.5 s after it last saw it change, whatever the record
/// says; a renewal that hangs (a slow server, retries) must stop our writes before that, with a
/// margin for the write that follows the check. Renewals go out every [`RENEW_EVERY`] from the
/// last send, so a check fails only once a renewal has taken over 700 ms to land.
const FRESH_WITHIN: Duration = Duration::from_secs(1);
/// The least a held Lease must stay unchanged before it is taken. A Go binary writes its 1.5 s
/// lease duration as `leaseDurationSeconds: 1`, and renews every 500 ms plus a read and a write:
/// on a slow API server its record can stay unchanged for a second while it still holds it.
const TAKE_AFTER_AT_LEAST: Duration = Duration::from_secs(2);
/// How often a waiting ADD looks at the Lease again (client-go's retry period, upstream's
/// default, is 500 ms).
const POLL: Duration = Duration::from_millis(100);

fn now() -> jiff::Timestamp {
    // Microseconds, as the API server stores a MicroTime: the annotation must equal it.
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now)
}

/// When a Go binary last wrote the Lease, if ever (as far as the Lease tells).
pub fn last_go_renewal(lease: &Lease) -> Option<jiff::Timestamp> {
    let annotations = lease.metadata.annotations.as_ref();
    let annotated = |key: &str| {
        annotations
            .and_then(|a| a.get(key))
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    };
    let renewed = lease.spec.as_ref().and_then(|s| s.renew_time.as_ref())?.0;
    if annotated(OUR_RENEWAL) == Some(renewed) {
        annotated(GO_RENEWAL)
    } else {
        Some(renewed)
    }
}

/// Whether a Go binary wrote the Lease within the last `GO_ACTIVE_WINDOW_SECS`.
pub fn recently_renewed_by_go(lease: &Lease) -> bool {
    last_go_renewal(lease).is_some_and(|at| {
        let age = now().duration_since(at).unsigned_abs();
        age < Duration::from_secs(GO_ACTIVE_WINDOW_SECS)
    })
}

/// Whether Go binaries may write the pools now, by the admin's word or the Lease's.
pub async fn go_present(kube: &Kube, peers: GoPeers) -> Result<bool, StoreError> {
    match peers {
        GoPeers::Present => Ok(true),
        GoPeers::Absent => Ok(false),
        GoPeers::Auto => match kube.get_lease(GO_LEASE_NAME).await {
            Ok(Some(lease)) => Ok(recently_renewed_by_go(&lease)),
            Ok(None) => Ok(false),
            // Not allowed to read it: an installation whose RBAC predates this check, which
            // has no Go binary to protect either (upstream's RBAC grants every Lease).
            Err(err) if err.is_refused() => {
                tracing::debug!(%err, "cannot read the Go Whereabouts' Lease; taken as absent");
                Ok(false)
            }
            Err(err) => Err(err.into()),
        },
    }
}

/// The Lease as held by this process, renewed in the background until released.
pub struct Hold {
    kube: Kube,
    lease: Arc<Mutex<Lease>>,
    lost: Arc<AtomicBool>,
    /// When the last renewal that landed (or the taking) was sent.
    renewed: Arc<std::sync::Mutex<Instant>>,
    /// Tells the renewer to stop after the renewal it may be sending.
    stop: Arc<Notify>,
    renewer: Option<tokio::task::JoinHandle<()>>,
    /// Whether [`Hold::release`] gave it up (else dropping it does, in the background).
    released: bool,
}

impl Hold {
    /// Fails when the hold was lost (a renewal failed) or may be (no renewal landed for
    /// [`FRESH_WITHIN`]): nothing may be written any more.
    pub fn check(&self) -> Result<(), StoreError> {
        let renewed = *self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        if self.lost.load(Ordering::SeqCst) || renewed.elapsed() > FRESH_WITHIN {
            return Err(StoreError::try_again(format!(
                "lost the Lease {GO_LEASE_NAME} shared with the Go Whereabouts before writing \
                 (not renewed within {FRESH_WITHIN:?})"
            )));
        }
        Ok(())
    }

    /// Gives the Lease up as client-go does (no holder, one second), so the next one takes it
    /// at once. A failure only delays the next holder by [`HOLD`].
    pub async fn release(mut self) {
        self.released = true;
        stop_renewing(&self.stop, self.renewer.take()).await;
        give_up(&self.kube, &self.lease).await;
    }
}

/// Stops the renewer once a renewal it is sending has landed, and its written Lease is kept:
/// cut off mid-request, a renewal the server applied would leave the Lease a version ahead of
/// the one the release writes against, and the release would fail (the Lease then stays held
/// for [`HOLD`], stalling every Go binary's and every other process's next operation).
async fn stop_renewing(stop: &Notify, renewer: Option<tokio::task::JoinHandle<()>>) {
    let Some(mut renewer) = renewer else {
        return;
    };
    stop.notify_one();
    if tokio::time::timeout(FRESH_WITHIN, &mut renewer)
        .await
        .is_err()
    {
        renewer.abort();
    }
}

impl Drop for Hold {
    /// A hold dropped unreleased (its operation cut off by the deadline) is given up in the
    /// background: the next taker (this process's owed releases, a Go binary) would otherwise
    /// wait [`HOLD`] for it to expire.
    fn drop(&mut self) {
        let renewer = self.renewer.take();
        if self.released {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let (kube, lease, stop) =
                    (self.kube.clone(), self.lease.clone(), self.stop.clone());
                runtime.spawn(async move {
                    stop_renewing(&stop, renewer).await;
                    give_up(&kube, &lease).await;
                });
            }
            Err(_) => renewer.into_iter().for_each(|r| r.abort()),
        }
    }
}

/// Writes the Lease as given up (no holder, one second), conditional on the version last
/// written. When another version is there (a write of ours whose answer was lost), it is read
/// and given up if it still names this hold; any other failure leaves it to expire.
async fn give_up(kube: &Kube, lease: &Mutex<Lease>) {
    let held = lease.lock().await.clone();
    let ours = holder_of(&held);
    let mut written = kube.replace_lease(&given_up(held)).await;
    if matches!(written, Err(ApiError::Conflict(_))) {
        written = match kube.get_lease(GO_LEASE_NAME).await {
            Ok(Some(now)) if holder_of(&now) == ours => kube.replace_lease(&given_up(now)).await,
            Ok(_) => return,
            Err(err) => Err(err),
        };
    }
    if let Err(err) = written {
        tracing::debug!(%err, "could not release the Go Whereabouts' Lease; it expires");
    }
}

/// After the renewal `sent` met another version of the Lease: the Lease as it is, when that
/// version is this very renewal (the server applied it, its answer was lost, and the retry met
/// it), which holds on; `None` when anyone else wrote it.
async fn landed(kube: &Kube, sent: &Lease) -> Option<Lease> {
    let now = kube.get_lease(GO_LEASE_NAME).await.ok()??;
    let record = |l: &Lease| {
        let spec = l.spec.as_ref()?;
        Some((spec.holder_identity.clone(), spec.renew_time.clone()))
    };
    (record(&now) == record(sent)).then_some(now)
}

/// `lease` as given up: no holder, one second.
fn given_up(mut lease: Lease) -> Lease {
    let stamp = now();
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(stamp));
        spec.acquire_time = Some(MicroTime(stamp));
    }
    mark(&mut lease.metadata, stamp, None);
    lease
}

/// Who holds `lease`, if anyone.
fn holder_of(lease: &Lease) -> Option<String> {
    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
    holder.filter(|h| !h.is_empty())
}

/// Records our write's time, and the last Go renewal seen, in the Lease's annotations.
fn mark(meta: &mut ObjectMeta, stamp: jiff::Timestamp, go_seen: Option<jiff::Timestamp>) {
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(OUR_RENEWAL.into(), stamp.to_string());
    if let Some(go) = go_seen {
        annotations.insert(GO_RENEWAL.into(), go.to_string());
    }
    meta.managed_fields = None;
}

/// What was last seen of someone else's hold, and since when on our clock.
struct Seen {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

/// Takes the Lease for `identity`, waiting for the holder to release it or to let it expire,
/// until `deadline`.
pub async fn take(kube: &Kube, identity: &str, deadline: Instant) -> Result<Hold, StoreError> {
    let mut seen: Option<Seen> = None;
    loop {
        if Instant::now() > deadline {
            return Err(StoreError::try_again(format!(
                "the Lease {GO_LEASE_NAME} shared with the Go Whereabouts stayed held by another process"
            )));
        }
        if let Some((lease, sent)) = try_take(kube, identity, &mut seen).await? {
            return Ok(start_renewing(kube, lease, sent));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One attempt: the Lease as written when taken, and when that write was sent; `None` when
/// someone else holds it.
async fn try_take(
    kube: &Kube,
    identity: &str,
    seen: &mut Option<Seen>,
) -> Result<Option<(Lease, Instant)>, StoreError> {
    let stamp = now();
    let ours = |transitions: i32| LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(HOLD.as_secs() as i32),
        acquire_time: Some(MicroTime(stamp)),
        renew_time: Some(MicroTime(stamp)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(mut lease) = kube.get_lease(GO_LEASE_NAME).await? else {
        let mut lease = Lease {
            metadata: ObjectMeta {
                name: Some(GO_LEASE_NAME.into()),
                ..ObjectMeta::default()
            },
            spec: Some(ours(0)),
        };
        mark(&mut lease.metadata, stamp, None);
        let sent = Instant::now();
        return Ok(written(kube.create_lease(&lease).await)?.map(|l| (l, sent)));
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = holder_of(&lease);
    // Held by this very take: an earlier write of it landed though its answer was lost (a
    // request retried after a timeout then finds its own version). It is taken again at once.
    if holder.as_ref().is_some_and(|h| h != identity) {
        let record = (holder, spec.renew_time.clone());
        let duration = expires_after(spec.lease_duration_seconds);
        match seen {
            Some(s) if s.record == record && s.since.elapsed() >= duration => {}
            Some(s) if s.record == record => return Ok(None),
            _ => {
                *seen = Some(Seen {
                    record,
                    since: Instant::now(),
                });
                return Ok(None);
            }
        }
    }
    let go_seen = last_go_renewal(&lease);
    lease.spec = Some(ours(spec.lease_transitions.unwrap_or(0) + 1));
    mark(&mut lease.metadata, stamp, go_seen);
    let sent = Instant::now();
    Ok(written(kube.replace_lease(&lease).await)?.map(|l| (l, sent)))
}

/// How long a held Lease must stay unchanged, as seen here, before it is taken: its record's
/// `leaseDurationSeconds`, and never less than [`TAKE_AFTER_AT_LEAST`].
fn expires_after(lease_duration_seconds: Option<i32>) -> Duration {
    let recorded = u64::try_from(lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
    Duration::from_secs(recorded).max(TAKE_AFTER_AT_LEAST)
}

/// The written Lease; `None` when another process wrote it first.
fn written(result: Result<Lease, ApiError>) -> Result<Option<Lease>, StoreError> {
    match result {
        Ok(lease) => Ok(Some(lease)),
        Err(ApiError::Conflict(_) | ApiError::AlreadyExists(_)) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Renews the Lease `lease`, taken by a write sent at `taken`, until the hold is dropped.
fn start_renewing(kube: &Kube, lease: Lease, taken: Instant) -> Hold {
    let lease = Arc::new(Mutex::new(lease));
    let stop = Arc::new(Notify::new());
    let lost = Arc::new(AtomicBool::new(false));
    let renewed = Arc::new(std::sync::Mutex::new(taken));
    let renewer = {
        let (kube, lease, lost) = (kube.clone(), lease.clone(), lost.clone());
        let renewed = renewed.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut last_sent = taken;
            loop {
                // Every RENEW_EVERY from the last send, however long its request took.
                // The stop first: a renewal that took longer than RENEW_EVERY finds both ready.
                tokio::select! {
                    biased;
                    _ = stop.notified() => return,
                    _ = tokio::time::sleep_until((last_sent + RENEW_EVERY).into()) => {}
                }
                let mut held = lease.lock().await;
                let mut next = held.clone();
                let stamp = now();
                if let Some(spec) = next.spec.as_mut() {
                    spec.renew_time = Some(MicroTime(stamp));
                }
                mark(&mut next.metadata, stamp, None);
                let sent = Instant::now();
                last_sent = sent;
                let written = match kube.replace_lease(&next).await {
                    Ok(written) => Ok(written),
                    Err(ApiError::Conflict(err)) => landed(&kube, &next).await.ok_or(err),
                    Err(err) => Err(err.to_string()),
                };
                match written {
                    Ok(written) => {
                        *held = written;
                        *renewed.lock().unwrap_or_else(|p| p.into_inner()) = sent;
                    }
                    Err(err) => {
                        tracing::warn!(%err, "could not renew the Go Whereabouts' Lease");
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        })
    };
    Hold {
        kube: kube.clone(),
        lease,
        lost,
        renewed,
        stop,
        renewer: Some(renewer),
        released: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_go_binarys_lease_is_taken_only_after_it_could_have_renewed() {
        // The Go binary's 1.5 s, written as 1: it renews every 500 ms and a read and a write.
        assert_eq!(expires_after(Some(1)), Duration::from_secs(2));
        assert_eq!(expires_after(None), Duration::from_secs(2));
        assert_eq!(expires_after(Some(-5)), Duration::from_secs(2));
        // Ours (4 s), and longer ones, as recorded.
        assert_eq!(expires_after(Some(4)), Duration::from_secs(4));
        assert_eq!(expires_after(Some(15)), Duration::from_secs(15));
    }

    fn lease(renewed: &str, ours: Option<&str>, go: Option<&str>) -> Lease {
        let mut annotations = std::collections::BTreeMap::new();
        if let Some(t) = ours {
            annotations.insert(OUR_RENEWAL.to_string(), t.to_string());
        }
        if let Some(t) = go {
            annotations.insert(GO_RENEWAL.to_string(), t.to_string());
        }
        Lease {
            metadata: ObjectMeta {
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(renewed.parse().unwrap())),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn tells_go_writes_from_ours() {
        let t1 = "2026-01-01T00:00:01.000001Z";
        let t2 = "2026-01-01T00:00:02Z";
        // Never written by us: a Go write.
        assert_eq!(last_go_renewal(&lease(t1, None, None)), t1.parse().ok());
        // Our write, carrying an earlier Go renewal forward.
        assert_eq!(
            last_go_renewal(&lease(t2, Some(t2), Some(t1))),
            t1.parse().ok()
        );
        // Our write, no Go renewal ever seen.
        assert_eq!(last_go_renewal(&lease(t2, Some(t2), None)), None);
        // Go wrote after us: its renewTime differs from our annotation.
        assert_eq!(last_go_renewal(&lease(t2, Some(t1), None)), t2.parse().ok());
    }
}
