//! Cross-region replication over HTTP: the caller-facing
//! `POST /v1/cloudimages/{id}/cross_region_copy`, the internal peer API another region calls
//! (`/peer/v1/...`, signed with the AK/SK of a peer service account; see
//! [`openims_core::crossregion`] for the protocol), and [`HttpPeerLink`], the signed HTTP
//! client this deployment uses to call its peers.

use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody};
use crate::sign;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Json, Router};
use futures::future::BoxFuture;
use openims_core::config::PeerConfig;
use openims_core::crossregion::{CommitOutcome, CrossRegionRequest, PeerLink, PeerReply};
use openims_core::CoreError;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Routes (behind the signature check).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/cloudimages/{id}/cross_region_copy",
            post(cross_region_copy),
        )
        .route("/peer/v1/preflight", post(preflight))
        .route("/peer/v1/chunks/missing", post(missing))
        .route("/peer/v1/chunks/{kind}/{id}", put(put_chunk))
        .route("/peer/v1/commit", post(commit))
}

fn text(body: &Value, k: &str) -> ApiResult<Option<String>> {
    match body.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(
            "IMG.0001",
            format!("The request message format is invalid: {k} must be a string"),
        )),
    }
}

async fn cross_region_copy(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let name = text(&body, "name")?
        .ok_or_else(|| ApiError::bad_request("IMG.0013", "The image name is not specified."))?;
    let req = CrossRegionRequest {
        name,
        description: text(&body, "description")?,
        region: text(&body, "region")?.unwrap_or_default(),
        project_name: text(&body, "project_name")?.unwrap_or_default(),
        agency_name: text(&body, "agency_name")?.unwrap_or_default(),
        vault_id: text(&body, "vault_id")?,
        cmk_id: text(&body, "cmk_id")?,
    };
    let job = st.svc.cross_region_copy(&c, &id, req).await?;
    Ok(Json(json!({"job_id": job})))
}

async fn preflight(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    Ok(Json(st.svc.peer_preflight(&c, &body).await?))
}

async fn missing(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    Ok(Json(st.svc.peer_missing(&c, &body).await?))
}

async fn put_chunk(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((kind, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let encrypted = match kind.as_str() {
        "enc" => true,
        "plain" => false,
        _ => {
            return Err(ApiError::not_found(
                "The requested resource does not exist.",
            ))
        }
    };
    let new = st.svc.peer_put_chunk(&c, encrypted, &id, body).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"stored": true, "new": new}))).into_response())
}

async fn commit(
    State(st): State<AppState>,
    Auth(c): Auth,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    // The transport key of a sealed data key derives from the calling key's secret.
    let ak = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(sign::parse_auth_header)
        .map(|a| a.access)
        .ok_or_else(|| ApiError::from(CoreError::NotPeerService))?;
    let grant = st
        .svc
        .db
        .lookup_key(&ak)
        .await?
        .ok_or_else(|| ApiError::from(CoreError::NotPeerService))?;
    match st.svc.peer_commit(&c, &grant.secret_key, &body).await? {
        CommitOutcome::Done(id) => Ok(Json(json!({"image_id": id})).into_response()),
        CommitOutcome::Missing(m) => Ok((
            StatusCode::CONFLICT,
            Json(json!({
                "error": {"code": "IMG.9032", "message": format!("{} chunks are missing", m.len())},
                "missing": m.iter().map(|(e, id)| json!({"encrypted": e, "id": id})).collect::<Vec<_>>(),
            })),
        )
            .into_response()),
    }
}

/// Calls peers over plain HTTP/1.1 (one request per connection), signing every request with
/// the peer service account's AK/SK exactly as the Huawei Cloud SDK signs.
pub struct HttpPeerLink {
    /// Time allowed for one request.
    pub timeout: Duration,
}

impl Default for HttpPeerLink {
    fn default() -> Self {
        HttpPeerLink {
            timeout: Duration::from_secs(120),
        }
    }
}

fn sdk_date() -> String {
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::now_utc()
        .format(&f)
        .unwrap_or_default()
}

fn unavailable(what: impl std::fmt::Display) -> CoreError {
    CoreError::PeerUnavailable(what.to_string())
}

async fn http_call(
    peer: &PeerConfig,
    method: &str,
    path: &str,
    body: Vec<u8>,
    binary: bool,
) -> Result<PeerReply, CoreError> {
    let host = peer
        .endpoint
        .strip_prefix("http://")
        .map(|h| h.trim_end_matches('/'))
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .ok_or_else(|| {
            unavailable(format!(
                "peer endpoint must be http://HOST:PORT, not {}",
                peer.endpoint
            ))
        })?;
    let date = sdk_date();
    let content_type = if binary {
        "application/octet-stream"
    } else {
        "application/json"
    };
    let headers = vec![
        ("content-type".to_string(), content_type.to_string()),
        ("host".to_string(), host.to_string()),
        ("x-sdk-date".to_string(), date.clone()),
    ];
    let signed: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
    let payload = hex::encode(Sha256::digest(&body));
    let cr = sign::canonical_request(method, path, "", &headers, &signed, &payload);
    let sig = sign::signature(&peer.secret_key, &sign::string_to_sign(&date, &cr));
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "authorization: {} Access={}, SignedHeaders={}, Signature={sig}\r\n",
        sign::ALGORITHM,
        peer.access_key,
        signed.join(";")
    ));
    head.push_str(&format!(
        "content-length: {}\r\naccept: application/json\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| unavailable(format!("cannot connect to {host}: {e}")))?;
    s.set_nodelay(true).ok();
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| unavailable(format!("sending to {host}: {e}")))?;
    s.write_all(&body)
        .await
        .map_err(|e| unavailable(format!("sending to {host}: {e}")))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .await
        .map_err(|e| unavailable(format!("reading from {host}: {e}")))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| unavailable("malformed HTTP response from peer"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unavailable("malformed HTTP status line from peer"))?;
    let mut body = raw[split + 4..].to_vec();
    if head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    }) {
        body = dechunk(&body).ok_or_else(|| unavailable("bad chunked body from peer"))?;
    }
    Ok(PeerReply { status, body })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_txt = String::from_utf8_lossy(&b[..eol]).to_string();
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

impl PeerLink for HttpPeerLink {
    fn call<'a>(
        &'a self,
        peer: &'a PeerConfig,
        method: &'a str,
        path: &'a str,
        body: Vec<u8>,
        binary: bool,
    ) -> BoxFuture<'a, Result<PeerReply, CoreError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, http_call(peer, method, path, body, binary))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(unavailable(format!(
                    "{method} {path} at {} timed out",
                    peer.endpoint
                ))),
            }
        })
    }
}
