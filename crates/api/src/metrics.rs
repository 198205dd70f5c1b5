//! Prometheus metrics: request counts and latencies by method, route and status, and the job
//! queue (read from the shared database at each scrape, so every node reports the cluster's).

use crate::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job_type: String,
    pub status: String,
}

/// The service's metric registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<HttpLabels, Counter>,
    latency: Family<HttpLabels, Histogram>,
    jobs: Family<JobLabels, Gauge>,
    jobs_expired: Gauge,
    queue_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("openims");
        let requests = Family::<HttpLabels, Counter>::default();
        let latency = Family::<HttpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ])
        });
        registry.register("http_requests", "HTTP requests served", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests",
            latency.clone(),
        );
        let jobs = Family::<JobLabels, Gauge>::default();
        registry.register(
            "jobs",
            "Jobs in the shared database by type and status (cluster-wide)",
            jobs.clone(),
        );
        let jobs_expired = Gauge::default();
        registry.register(
            "jobs_running_on_expired_lease",
            "Running jobs whose node stopped heartbeating (taken over shortly; cluster-wide)",
            jobs_expired.clone(),
        );
        let queue_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "job_queue_oldest_age_seconds",
            "Age of the oldest queued job (0 when none is queued; cluster-wide)",
            queue_age.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            jobs,
            jobs_expired,
            queue_age,
        }
    }

    /// Sets the job-queue gauges from a fresh reading.
    pub fn set_jobs(&self, stats: &openims_core::jobs::JobStats) {
        self.jobs.clear();
        for (job_type, status, n) in &stats.by_type_status {
            self.jobs
                .get_or_create(&JobLabels {
                    job_type: job_type.clone(),
                    status: status.clone(),
                })
                .set(*n);
        }
        self.jobs_expired.set(stats.running_on_expired_lease);
        self.queue_age.set(stats.oldest_queued_age_secs);
    }

    pub fn observe(&self, labels: HttpLabels, seconds: f64) {
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Middleware: records every request.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state.metrics.observe(
        HttpLabels {
            method,
            route,
            status: resp.status().as_u16(),
        },
        start.elapsed().as_secs_f64(),
    );
    resp
}

/// `GET /metrics`.
pub async fn render(State(state): State<AppState>) -> Response {
    match state.svc.db.job_stats().await {
        Ok(stats) => state.metrics.set_jobs(&stats),
        // The request metrics are still worth serving; the job gauges keep their last values.
        Err(e) => tracing::warn!(error = %e, "reading job counts for /metrics failed"),
    }
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
