//! `/metrics`, `/healthz` and `/readyz`, served by axum.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::metrics::Metrics;
use super::worker::Jobs;

/// A batch of store work taking longer than this marks the controller unhealthy.
const STUCK_AFTER: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct Probes {
    pub metrics: Arc<Metrics>,
    pub jobs: Jobs,
    /// Set once the pod watch has listed every pod: from then on deletions are followed.
    pub ready: Arc<AtomicBool>,
}

impl Probes {
    /// Alive while the store's worker takes work and no batch has kept it busy for long (a
    /// store that never answers): otherwise a restart is the cure.
    fn alive(&self) -> bool {
        let busy = self.metrics.busy_since.load(Ordering::SeqCst);
        let stuck = busy != 0
            && jiff::Timestamp::now().as_second().saturating_sub(busy)
                > STUCK_AFTER.as_secs() as i64;
        !self.jobs.is_closed() && !stuck
    }
}

pub fn router(probes: Probes) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(probes)
}

pub async fn serve(listener: TcpListener, probes: Probes) {
    crate::probe_port::serve(listener, router(probes)).await
}

async fn metrics(State(probes): State<Probes>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        probes.metrics.render(),
    )
}

async fn healthz(State(probes): State<Probes>) -> impl IntoResponse {
    if probes.alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the store worker is not taking work\n",
        )
    }
}

async fn readyz(State(probes): State<Probes>) -> impl IntoResponse {
    if !probes.alive() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the store worker is not taking work\n",
        )
    } else if probes.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the pod watch has not listed the pods yet\n",
        )
    }
}
