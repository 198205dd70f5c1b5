//! Who is calling: AK/SK signatures (`SDK-HMAC-SHA256`) or Keystone-style tokens
//! (`X-Auth-Token`). The middleware puts a [`Caller`] into the request, or answers 401/403.

use crate::error::ApiError;
use crate::sign;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use openims_core::Caller;
use sha2::{Digest, Sha256};

/// Largest signed body (spec C.8 / D.2).
pub const MAX_SIGNED_BODY: usize = 12 * 1024 * 1024;
/// Allowed clock difference for `X-Sdk-Date`.
pub const DATE_WINDOW_SECS: i64 = 15 * 60;

pub fn is_glance_path(path: &str) -> bool {
    path.starts_with("/v2/images") || path.starts_with("/v2/schemas")
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Authenticates the request; on success the handler finds the `Caller` in the extensions.
pub async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let glance = is_glance_path(req.uri().path());
    match verify(&state, req).await {
        Ok(req) => next.run(req).await,
        Err(e) => if glance { e.glance() } else { e }.into_response(),
    }
}

async fn verify(state: &AppState, req: Request) -> Result<Request, ApiError> {
    let headers = req.headers().clone();
    let (caller, req) = if let Some(auth) = header(&headers, "authorization") {
        verify_signature(state, auth, req).await?
    } else if let Some(token) = header(&headers, "x-auth-token") {
        let (caller, _, _) = state
            .svc
            .db
            .validate_token(token)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::unauthorized("The token is invalid or has expired."))?;
        (caller, req)
    } else {
        return Err(ApiError::unauthorized(
            "The request is not authenticated: sign it with an AK/SK (SDK-HMAC-SHA256) or send X-Auth-Token.",
        ));
    };
    if let Some(pid) = header(&headers, "x-project-id") {
        if pid != caller.project_id.as_str() {
            return Err(ApiError::forbidden_project(format!(
                "The project ID and token in the request are invalid: the credentials may not act in project {pid}."
            )));
        }
    }
    let mut req = req;
    req.extensions_mut().insert(caller);
    Ok(req)
}

async fn verify_signature(
    state: &AppState,
    auth: &str,
    req: Request,
) -> Result<(Caller, Request), ApiError> {
    let parsed = sign::parse_auth_header(auth).ok_or_else(|| {
        ApiError::unauthorized("Unsupported Authorization header: expected SDK-HMAC-SHA256 Access=..., SignedHeaders=..., Signature=...")
    })?;
    let headers = req.headers().clone();
    let date = header(&headers, "x-sdk-date")
        .ok_or_else(|| ApiError::unauthorized("The X-Sdk-Date header is missing."))?;
    let t = sign::parse_sdk_date(date).ok_or_else(|| {
        ApiError::unauthorized("The X-Sdk-Date header is not of the form YYYYMMDDTHHMMSSZ.")
    })?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if (now - t).abs() > DATE_WINDOW_SECS {
        return Err(ApiError::unauthorized(
            "The request has expired: X-Sdk-Date differs from the server's time by more than 15 minutes.",
        ));
    }
    if !parsed.signed_headers.iter().any(|h| h == "x-sdk-date") {
        return Err(ApiError::unauthorized(
            "X-Sdk-Date must be a signed header.",
        ));
    }
    let grant = state
        .svc
        .db
        .lookup_key(&parsed.access)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::unauthorized("The access key does not exist."))?;
    // The body is hashed unless the client declared it unsigned.
    let unsigned = header(&headers, "x-sdk-content-sha256").map(str::trim);
    let (req, payload_hash) = match unsigned {
        Some(v) if v.eq_ignore_ascii_case("UNSIGNED-PAYLOAD") => {
            // Only a signed declaration counts: an unsigned one could be added to a captured
            // request to swap its body.
            if !parsed
                .signed_headers
                .iter()
                .any(|h| h == "x-sdk-content-sha256")
            {
                return Err(ApiError::unauthorized(
                    "X-Sdk-Content-Sha256 must be a signed header when the payload is unsigned.",
                ));
            }
            (req, v.to_string())
        }
        _ => {
            let (parts, body) = req.into_parts();
            let limited = http_body_util::Limited::new(body, MAX_SIGNED_BODY);
            let bytes = match limited.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(ApiError::too_large(MAX_SIGNED_BODY))
                }
                Err(e) => {
                    return Err(ApiError::bad_request(
                        "IMG.0001",
                        format!("The request body could not be read: {e}"),
                    ))
                }
            };
            let hash = if bytes.is_empty() {
                sign::EMPTY_SHA256.to_string()
            } else {
                hex::encode(Sha256::digest(&bytes))
            };
            (Request::from_parts(parts, Body::from(bytes)), hash)
        }
    };
    let header_list: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let cr = sign::canonical_request(
        req.method().as_str(),
        req.uri().path(),
        req.uri().query().unwrap_or(""),
        &header_list,
        &parsed.signed_headers,
        &payload_hash,
    );
    let expected = sign::signature(&grant.secret_key, &sign::string_to_sign(date, &cr));
    if !sign::same_signature(&expected, &parsed.signature) {
        tracing::debug!(canonical_request = %cr, "signature mismatch");
        return Err(ApiError::unauthorized(
            "The request signature does not match: check the secret key and that the host, path, query and body were not changed on the way.",
        ));
    }
    Ok((grant.caller, req))
}
