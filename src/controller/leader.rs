//! One leader among the replicas: a coordination.k8s.io Lease, taken and renewed with
//! resourceVersion preconditions (kube's `replace`), as client-go's leader election does.
//!
//! A replica leads until `renew_deadline` after the start of its last successful renewal; the
//! others take over only once they have seen the Lease unchanged for a whole
//! `lease_duration` on their own clock. The deadline is shorter than the duration, so a leader
//! that cannot renew stops acting before anyone else starts: no clock is compared across
//! machines, only elapsed time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::store::error::chain;

/// The Lease's name, in the controller's namespace (its RBAC names it).
pub const LEASE_NAME: &str = "whereabouts-controller";

#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    /// This replica: its pod name and a random suffix, so a restarted pod is a new holder.
    pub identity: String,
    pub lease_duration: Duration,
}

impl Election {
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    pub fn retry_period(&self) -> Duration {
        (self.lease_duration / 5).max(Duration::from_millis(200))
    }
}

/// Whether this replica leads now; cheap to ask before every release.
#[derive(Clone, Default)]
pub struct Leadership(Arc<Mutex<Option<Instant>>>);

impl Leadership {
    /// Always leading (leader election turned off).
    pub fn always() -> Leadership {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
        Leadership(Arc::new(Mutex::new(Some(far))))
    }

    /// Stops leading now (at shutdown, before the Lease is given up).
    pub fn step_down(&self) {
        self.hold_until(None);
    }

    pub fn is_leader(&self) -> bool {
        self.0
            .lock()
            .map(|d| d.is_some_and(|until| Instant::now() < until))
            .unwrap_or(false)
    }

    fn hold_until(&self, until: Option<Instant>) {
        if let Ok(mut d) = self.0.lock() {
            *d = until;
        }
    }
}

/// What was last seen of someone else's Lease, and since when (on our clock).
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// Runs forever: tries to take or renew the Lease every retry period, calling `changed(true)`
/// each time this replica becomes the leader and `changed(false)` when it stops. An attempt
/// that has no answer by the renew deadline has failed: waiting longer would keep this replica
/// saying it leads after its deadline passed.
pub async fn run(
    client: Client,
    election: Election,
    leadership: Leadership,
    changed: impl Fn(bool),
) {
    let api: Api<Lease> = Api::namespaced(client, &election.namespace);
    let mut observed: Option<Observed> = None;
    let mut leading = false;
    loop {
        let attempt = Instant::now();
        let answer = tokio::time::timeout(
            election.renew_deadline(),
            try_hold(&api, &election, &mut observed),
        );
        let answer = answer.await;
        // Still taken for the leader, but the deadline passed while the attempt was out: work
        // was dropped meanwhile (the worker leaves it to a new leader's reconcile).
        let lapsed = leading && !leadership.is_leader();
        match answer {
            Ok(Ok(true)) => leadership.hold_until(Some(attempt + election.renew_deadline())),
            Ok(Ok(false)) => {
                if leading {
                    tracing::warn!(identity = %election.identity, "another replica took the lead");
                }
                leadership.hold_until(None);
            }
            // A failed renewal: still the leader until the deadline, then not.
            Ok(Err(err)) => {
                tracing::warn!(error = %chain(&err), lease = LEASE_NAME, "cannot read or write the Lease");
            }
            Err(_) => tracing::warn!(
                lease = LEASE_NAME,
                within = ?election.renew_deadline(),
                "no answer about the Lease"
            ),
        }
        // Whatever the answer, what counts is whether the deadline still lies ahead: a renewal
        // that landed late leaves this replica not leading, and the next one that lands in
        // time makes it lead again, with the reconcile of a new leader.
        let now_leading = leadership.is_leader();
        if let Some(news) = news(leading, lapsed, now_leading) {
            match (news, lapsed && leading) {
                (true, true) => {
                    tracing::info!(identity = %election.identity, "leading again after a late renewal")
                }
                (true, false) => tracing::info!(identity = %election.identity, "leading"),
                (false, _) => tracing::warn!(identity = %election.identity, "not leading"),
            }
            changed(news);
        }
        leading = now_leading;
        tokio::time::sleep(election.retry_period()).await;
    }
}

/// What an attempt tells the rest of the controller, if anything: whether it now leads. A
/// replica that leads again after its deadline passed while it still took itself for the
/// leader (a renewal that landed late, but before anyone else could take the Lease) is news
/// too: the worker dropped what came meanwhile, which a new leader's reconcile judges.
fn news(was_leading: bool, lapsed: bool, leads_now: bool) -> Option<bool> {
    if leads_now != was_leading {
        Some(leads_now)
    } else if lapsed && leads_now {
        Some(true)
    } else {
        None
    }
}

/// One attempt; Ok(true) when this replica holds the Lease afterwards.
async fn try_hold(
    api: &Api<Lease>,
    election: &Election,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let duration = i32::try_from(election.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(election.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return written(api.create(&PostParams::default(), &lease).await);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let mine = holder.as_deref() == Some(election.identity.as_str());
    if !mine && holder.is_some() && !expired(&spec, election, observed) {
        return Ok(false);
    }
    let mut next = spec;
    if !mine {
        next.acquire_time = Some(now());
        next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
        next.holder_identity = Some(election.identity.clone());
    }
    next.renew_time = Some(now());
    next.lease_duration_seconds = Some(duration);
    lease.spec = Some(next);
    lease.metadata.managed_fields = None;
    // The resourceVersion read above is the precondition: of two replicas taking over at
    // once, one wins.
    written(
        api.replace(LEASE_NAME, &PostParams::default(), &lease)
            .await,
    )
}

/// Whether another replica's Lease (`spec`) has expired: only once it has not changed for a
/// whole lease duration, as seen from here (`observed`, which this reading updates).
fn expired(spec: &LeaseSpec, election: &Election, observed: &mut Option<Observed>) -> bool {
    let record = (spec.holder_identity.clone(), spec.renew_time.clone());
    let their_duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(s.max(1) as u64))
        .unwrap_or(election.lease_duration);
    match observed {
        Some(o) if o.record == record => o.since.elapsed() >= their_duration,
        _ => {
            *observed = Some(Observed {
                record,
                since: Instant::now(),
            });
            false
        }
    }
}

fn written(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

/// Gives the Lease up (at shutdown) so another replica takes over at once instead of after a
/// lease duration; only if this replica still holds it.
pub async fn release(client: Client, election: &Election) {
    let api: Api<Lease> = Api::namespaced(client, &election.namespace);
    let Ok(Some(mut lease)) = api.get_opt(LEASE_NAME).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = Some(now());
    lease.metadata.managed_fields = None;
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => tracing::info!("gave up the lead"),
        Err(err) => {
            tracing::warn!(error = %chain(&err), "cannot give up the Lease; it expires by itself")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::news;

    /// Each change of leadership is news, and so is leading again after a lapse; a renewal in
    /// time, or a standby staying one, is not.
    #[test]
    fn leadership_news() {
        assert_eq!(news(false, false, true), Some(true), "elected");
        assert_eq!(news(true, false, false), Some(false), "stepped down");
        assert_eq!(news(true, true, false), Some(false), "lapsed and lost");
        assert_eq!(news(true, true, true), Some(true), "lapsed, then renewed");
        assert_eq!(news(true, false, true), None, "renewed in time");
        assert_eq!(news(false, false, false), None, "still a standby");
    }
}
