//! Request extractors that answer with `IMG.xxxx` errors instead of axum's plain-text ones.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use openims_core::Caller;
use serde_json::Value;

/// The authenticated caller (put there by the auth middleware).
pub struct Auth(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Auth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .map(Auth)
            .ok_or_else(|| ApiError::unauthorized("The request is not authenticated."))
    }
}

/// A JSON body: empty -> IMG.0007, malformed -> IMG.0001, over 12 MB -> 413.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let glance = crate::auth::is_glance_path(req.uri().path());
        let wrap = |e: ApiError| if glance { e.glance() } else { e };
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                wrap(ApiError::too_large(crate::auth::MAX_SIGNED_BODY))
            } else {
                wrap(ApiError::bad_request(
                    "IMG.0001",
                    format!("The request body could not be read: {e}"),
                ))
            }
        })?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(wrap(ApiError::bad_request(
                "IMG.0007",
                "The request body is empty.",
            )));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            wrap(ApiError::bad_request(
                "IMG.0001",
                format!("The request message format is invalid: {e}"),
            ))
        })
    }
}

/// An optional JSON body: empty is `None`.
pub struct OptionalJson(pub Option<Value>);

impl<S: Send + Sync> FromRequest<S> for OptionalJson {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|_| ApiError::too_large(crate::auth::MAX_SIGNED_BODY))?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(OptionalJson(None));
        }
        serde_json::from_slice(&bytes)
            .map(|v| OptionalJson(Some(v)))
            .map_err(|e| {
                ApiError::bad_request(
                    "IMG.0001",
                    format!("The request message format is invalid: {e}"),
                )
            })
    }
}

/// The raw query pairs, percent-decoded, in order (repeated keys kept).
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .map(QueryPairs)
            .map_err(|e| {
                ApiError::bad_request("IMG.0001", format!("The query string is invalid: {e}"))
            })
    }
}

/// Checks that a `{project_id}` in the path is the caller's own project.
pub fn own_project(caller: &Caller, pid: &str) -> Result<(), ApiError> {
    if caller.project_id.as_str() == pid {
        Ok(())
    } else {
        Err(ApiError::forbidden_project(format!(
            "The project ID and token in the request are invalid: the credentials may not act in project {pid}."
        )))
    }
}
