//! `/healthz`, `/readyz` and `/metrics` (Prometheus text format) of the operator.

use crate::controller::Outcome;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Counters and gauges, updated by the pass loop.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Whether every cache has listed once.
    pub caches_ready: AtomicBool,
    /// Whether this replica leads.
    pub leading: AtomicBool,
    passes: AtomicU64,
    pass_failures: AtomicU64,
    status_patches: AtomicU64,
    keys_written: AtomicU64,
    revocations: AtomicU64,
    failing_objects: AtomicU64,
    snapshot_version: AtomicI64,
    last_pass_micros: AtomicU64,
}

impl Metrics {
    /// Records a successful pass.
    pub fn record_pass(&self, outcome: &Outcome, took: Duration) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.status_patches.fetch_add(outcome.status_patches as u64, Ordering::Relaxed);
        self.keys_written.fetch_add(outcome.keys_written as u64, Ordering::Relaxed);
        self.revocations.fetch_add(outcome.revoked as u64, Ordering::Relaxed);
        self.failing_objects.store(outcome.failing as u64, Ordering::Relaxed);
        self.snapshot_version.store(outcome.version.unwrap_or(0), Ordering::Relaxed);
        self.last_pass_micros.store(took.as_micros().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Records a failed pass.
    pub fn record_failure(&self) {
        self.pass_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let b = |v: &AtomicBool| u8::from(v.load(Ordering::Relaxed));
        let lines = [
            (
                "portcullis_operator_leader",
                "gauge",
                "1 while this replica holds the lease",
                b(&self.leading).to_string(),
            ),
            (
                "portcullis_operator_caches_ready",
                "gauge",
                "1 once every watch has listed",
                b(&self.caches_ready).to_string(),
            ),
            ("portcullis_operator_passes_total", "counter", "Reconcile passes completed", g(&self.passes).to_string()),
            (
                "portcullis_operator_pass_failures_total",
                "counter",
                "Reconcile passes that failed (retried)",
                g(&self.pass_failures).to_string(),
            ),
            (
                "portcullis_operator_status_patches_total",
                "counter",
                "Status patches written",
                g(&self.status_patches).to_string(),
            ),
            (
                "portcullis_operator_keys_written_total",
                "counter",
                "ApiKey Secrets minted or rotated",
                g(&self.keys_written).to_string(),
            ),
            (
                "portcullis_operator_revocations_total",
                "counter",
                "Deleted ApiKeys whose revocation was published",
                g(&self.revocations).to_string(),
            ),
            (
                "portcullis_operator_failing_objects",
                "gauge",
                "Objects left out of the snapshot",
                g(&self.failing_objects).to_string(),
            ),
            (
                "portcullis_operator_snapshot_version",
                "gauge",
                "Snapshot version current after the last pass",
                self.snapshot_version.load(Ordering::Relaxed).to_string(),
            ),
            (
                "portcullis_operator_last_pass_seconds",
                "gauge",
                "Duration of the last pass",
                format!("{:.6}", g(&self.last_pass_micros) as f64 / 1e6),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in lines {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        }
        out
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render())
}

async fn ready(State(m): State<Arc<Metrics>>) -> StatusCode {
    if m.caches_ready.load(Ordering::Relaxed) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

/// Serves the endpoints on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(self::metrics))
        .with_state(metrics);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}
