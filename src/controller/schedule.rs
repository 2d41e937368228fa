//! The scheduled full reconcile: the `whereabouts-config` ConfigMap's `cron-expression` when it
//! has one (read again before every wait, so a change applies without a restart), else the
//! configuration's `reconciler_cron_expression`, else every 15 minutes.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use super::worker::{Job, Jobs};
use crate::cleanup::cron::{Schedule, DEFAULT_EXPRESSION};

pub const CONFIGMAP: &str = "whereabouts-config";
pub const CONFIGMAP_KEY: &str = "cron-expression";

/// Longest single wait: the ConfigMap is looked at again at least this often.
const RECHECK: Duration = Duration::from_secs(60);

/// The ConfigMap's expression; `Ok(None)` when it has none (or there is no ConfigMap).
async fn from_configmap(client: &Client, namespace: &str) -> Result<Option<String>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let found = api.get_opt(CONFIGMAP).await?;
    Ok(found
        .and_then(|cm| cm.data)
        .and_then(|data| data.get(CONFIGMAP_KEY).cloned())
        .filter(|e| !e.trim().is_empty()))
}

/// The expression to follow after a read of the ConfigMap. A read that failed keeps the one in
/// effect: falling back for a moment would start the schedule over (a new expression resets
/// when the next reconcile is due), and failures coming back within every period of a long one
/// (`@every 30m`) would keep its reconcile from ever coming.
fn expression_after(
    read: Result<Option<String>, kube::Error>,
    in_effect: Option<&str>,
    configured: Option<&str>,
) -> String {
    let fallback = || configured.unwrap_or(DEFAULT_EXPRESSION).to_string();
    match read {
        Ok(Some(expression)) => expression,
        Ok(None) => fallback(),
        Err(err) => {
            tracing::warn!(
                error = %crate::store::error::chain(&err),
                "cannot read ConfigMap {CONFIGMAP}: the schedule stays"
            );
            in_effect.map_or_else(fallback, str::to_string)
        }
    }
}

/// The schedule of `expression`, or the default one when it cannot be read or names no time
/// after `now` (30 February): a controller without scheduled reconciles would leave every
/// leak its watch misses for ever.
/// Returns it with the expression in effect.
fn usable(expression: &str, now: Timestamp) -> (Schedule, &str) {
    let why = match Schedule::parse(expression) {
        Ok(schedule) if schedule.next_after(now).is_some() => return (schedule, expression),
        Ok(_) => "it names no time to come".to_string(),
        Err(err) => err.to_string(),
    };
    tracing::error!(%expression, why, "using the default schedule {DEFAULT_EXPRESSION:?}");
    let default = Schedule::parse(DEFAULT_EXPRESSION)
        .unwrap_or(Schedule::Every(jiff::SignedDuration::from_mins(15)));
    (default, DEFAULT_EXPRESSION)
}

pub async fn run(client: Client, namespace: String, configured: Option<String>, jobs: Jobs) {
    let mut current: Option<(String, Schedule)> = None;
    let mut due: Option<Timestamp> = None;
    loop {
        let read = from_configmap(&client, &namespace).await;
        let in_effect = current.as_ref().map(|(e, _)| e.as_str());
        let expression = expression_after(read, in_effect, configured.as_deref());
        if current.as_ref().map(|(e, _)| e) != Some(&expression) {
            let (schedule, in_effect) = usable(&expression, Timestamp::now());
            due = schedule.next_after(Timestamp::now());
            tracing::info!(expression = in_effect, next = ?due, "reconcile schedule");
            current = Some((expression, schedule));
        }
        let now = Timestamp::now();
        if let (Some(at), Some((_, schedule))) = (due, &current) {
            if now >= at {
                let _ = jobs.send(Job::Reconcile { why: "schedule" });
                due = schedule.next_after(now);
            }
        }
        let wait = due
            .map(|at| {
                let left = at
                    .duration_since(now)
                    .as_secs()
                    .clamp(1, RECHECK.as_secs() as i64);
                Duration::from_secs(left as u64)
            })
            .unwrap_or(RECHECK);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_that_never_comes_is_replaced_by_the_default() {
        let now = Timestamp::from_second(1_764_547_200).unwrap();
        let next = |expression: &str| usable(expression, now).0.next_after(now);
        // The default comes every 15 minutes, an hourly one on the hour.
        let quarter = Some(now + jiff::SignedDuration::from_mins(15));
        assert_eq!(next("0 0 30 2 *"), quarter);
        assert_eq!(next("not a schedule"), quarter);
        assert_eq!(
            next("0 * * * *"),
            Some(now + jiff::SignedDuration::from_mins(60))
        );
    }

    #[test]
    fn a_failed_read_keeps_the_schedule_in_effect() {
        let failed = || Err(kube::Error::LinesCodecMaxLineLengthExceeded);
        let configured = Some("@hourly");
        assert_eq!(
            expression_after(failed(), Some("@every 30m"), configured),
            "@every 30m"
        );
        // Before any read succeeded: the configuration's, else the default.
        assert_eq!(expression_after(failed(), None, configured), "@hourly");
        assert_eq!(expression_after(failed(), None, None), DEFAULT_EXPRESSION);
        // The ConfigMap says nothing: the configuration's.
        assert_eq!(
            expression_after(Ok(None), Some("@every 30m"), configured),
            "@hourly"
        );
        assert_eq!(
            expression_after(Ok(Some("@daily".into())), Some("@every 30m"), configured),
            "@daily"
        );
    }
}
