//! # openims-api
//!
//! The HTTP surface of the service: the Huawei Cloud IMS API (v1, v2, v2.1), OpenStack Glance
//! v2, Keystone-style tokens, the embedded KMS API ([`kms`]), health and metrics; and, on its own port, the embedded
//! S3-compatible bucket endpoint ([`s3::router`]). It owns wire formats (paths, query parsing,
//! JSON shapes, status codes), AK/SK signature verification, and the single mapping from domain
//! errors to `IMG.xxxx` codes ([`error`]).
//!
//! It must not hold rules of its own: every decision about images, jobs and tenants is made by
//! `openims-core`, which every handler calls with the authenticated [`openims_core::Caller`].

pub mod auth;
pub mod conn;
pub mod error;
pub mod extract;
pub mod glance;
pub mod import_export;
pub mod ims;
pub mod keystone;
pub mod kms;
pub mod metrics;
pub mod peer;
pub mod s3;
pub mod sign;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::middleware;
use axum::routing::get;
use axum::Router;
use openims_core::Service;
use std::sync::Arc;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub svc: Arc<Service>,
    pub metrics: Arc<metrics::Metrics>,
}

/// The request's `X-Request-Id` (set by `SetRequestIdLayer`), or `-`, for the trace spans of
/// both endpoints.
pub(crate) fn request_id_of<B>(req: &Request<B>) -> &str {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// The whole API.
pub fn router(svc: Arc<Service>) -> Router {
    let state = AppState {
        svc,
        metrics: Arc::new(metrics::Metrics::new()),
    };
    let protected = Router::new()
        .merge(glance::routes())
        .merge(ims::routes())
        .merge(import_export::routes())
        .merge(kms::routes())
        .merge(peer::routes())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let open = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::render))
        .merge(keystone::routes())
        .merge(glance::public_routes())
        .merge(openims_console::routes());
    let request_id = HeaderName::from_static("x-request-id");
    Router::new()
        .merge(protected)
        .merge(open)
        .route_layer(middleware::from_fn_with_state(state.clone(), metrics::track))
        .fallback(|| async {
            error::ApiError::not_found("The requested resource does not exist.")
        })
        .layer(DefaultBodyLimit::max(auth::MAX_SIGNED_BODY))
        .layer(middleware::from_fn(conn::settle_body))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %request_id_of(req))
            }),
        )
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}
