//! The scheduled full reconcile: the `whereabouts-config` ConfigMap's `cron-expression` when it
//! has one (read again before every wait, so a change applies without a restart), else the
//! configuration's `reconciler_cron_expression`, else every 15 minutes.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use super::worker::Job;
use crate::cleanup::cron::{Schedule, DEFAULT_EXPRESSION};

pub const CONFIGMAP: &str = "whereabouts-config";
pub const CONFIGMAP_KEY: &str = "cron-expression";

/// Longest single wait: the ConfigMap is looked at again at least this often.
const RECHECK: Duration = Duration::from_secs(60);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn from_configmap(client: &Client, namespace: &str) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(CONFIGMAP).await {
        Ok(cm) => cm?
            .data?
            .get(CONFIGMAP_KEY)
            .cloned()
            .filter(|e| !e.trim().is_empty()),
        Err(err) => {
            tracing::debug!(%err, "cannot read ConfigMap {CONFIGMAP}");
            None
        }
    }
}

pub async fn run(
    client: Client,
    namespace: String,
    configured: Option<String>,
    jobs: Arc<Mutex<Sender<Job>>>,
) {
    let mut current: Option<(String, Schedule)> = None;
    let mut due: Option<i64> = None;
    loop {
        let expression = from_configmap(&client, &namespace)
            .await
            .or_else(|| configured.clone())
            .unwrap_or_else(|| DEFAULT_EXPRESSION.to_string());
        if current.as_ref().map(|(e, _)| e) != Some(&expression) {
            let schedule = Schedule::parse(&expression).unwrap_or_else(|err| {
                tracing::error!(%err, "using the default schedule {DEFAULT_EXPRESSION:?}");
                Schedule::parse(DEFAULT_EXPRESSION)
                    .unwrap_or(Schedule::Every(Duration::from_secs(15 * 60)))
            });
            due = schedule.next_after(now());
            tracing::info!(%expression, next = ?due, "reconcile schedule");
            current = Some((expression, schedule));
        }
        let now = now();
        if let (Some(at), Some((_, schedule))) = (due, &current) {
            if now >= at {
                if let Ok(j) = jobs.lock() {
                    let _ = j.send(Job::Reconcile { why: "schedule" });
                }
                due = schedule.next_after(now);
            }
        }
        let wait = due
            .map(|at| Duration::from_secs((at - now).clamp(1, RECHECK.as_secs() as i64) as u64))
            .unwrap_or(RECHECK);
        tokio::time::sleep(wait).await;
    }
}
