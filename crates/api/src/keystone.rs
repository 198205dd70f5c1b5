//! Keystone v3-style identity for OpenStack tools: version discovery, password tokens with a
//! project scope, and a service catalog whose `image` endpoint is this service.

use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use openims_core::identity::IssuedToken;
use openims_core::time::fmt_millis;
use serde_json::{json, Value};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v3", get(discovery))
        .route("/v3/", get(discovery))
        .route(
            "/v3/auth/tokens",
            get(validate).post(issue).delete(revoke).head(validate),
        )
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

async fn discovery(headers: HeaderMap) -> Json<Value> {
    let base = base_url(&headers);
    Json(json!({"version": {
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{base}/v3/")}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}]
    }}))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

fn token_body(t: &IssuedToken, region: &str, base: &str, domain_name: &str) -> Value {
    let c = &t.caller;
    let endpoints = |url: String| {
        ["public", "internal", "admin"]
            .iter()
            .map(|i| json!({"id": format!("{}-{i}", c.project_id.as_str().get(..8).unwrap_or("ep")), "interface": i, "region": region, "region_id": region, "url": url}))
            .collect::<Vec<_>>()
    };
    json!({"token": {
        "methods": ["password"],
        "user": {"id": c.user_id, "name": c.user_name, "domain": {"id": c.domain_id, "name": domain_name}, "password_expires_at": null},
        "project": {"id": c.project_id, "name": c.project_name, "domain": {"id": c.domain_id, "name": domain_name}},
        "roles": [{"id": "0000000000000000000000000000a0d1", "name": "admin"}, {"id": "0000000000000000000000000000a0d2", "name": "member"}],
        "issued_at": fmt_millis(t.issued_at),
        "expires_at": fmt_millis(t.expires_at),
        "is_domain": false,
        "catalog": [
            {"type": "image", "name": "glance", "id": "image", "endpoints": endpoints(base.to_string())},
            {"type": "ims", "name": "ims", "id": "ims", "endpoints": endpoints(base.to_string())},
            {"type": "identity", "name": "keystone", "id": "identity", "endpoints": endpoints(format!("{base}/v3"))}
        ]
    }})
}

async fn issue(
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let auth = body.get("auth").ok_or_else(|| {
        ApiError::bad_request("IMG.0001", "Expecting to find auth in the request body.")
    })?;
    let methods = auth["identity"]["methods"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !methods.iter().any(|m| m == "password") {
        return Err(ApiError::unauthorized(
            "Only the password authentication method is supported.",
        ));
    }
    let user = &auth["identity"]["password"]["user"];
    let password = user["password"].as_str().unwrap_or("");
    let user_name = user["name"].as_str().or(user["id"].as_str()).unwrap_or("");
    let user_domain = str_at(user, &["domain", "name"])
        .or(str_at(user, &["domain", "id"]))
        .unwrap_or("default");
    let scope = &auth["scope"]["project"];
    let Some(project) = scope["id"].as_str().or(scope["name"].as_str()) else {
        return Err(ApiError::bad_request(
            "IMG.0001",
            "A project scope is required (auth.scope.project).",
        ));
    };
    let project_domain = str_at(scope, &["domain", "name"]).or(str_at(scope, &["domain", "id"]));
    let caller = st
        .svc
        .db
        .authenticate(user_name, user_domain, password, project, project_domain)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized("The request you have made requires authentication.")
        })?;
    let token = st
        .svc
        .db
        .issue_token(&caller, st.svc.config.token_ttl_secs)
        .await?;
    let domain_name = st
        .svc
        .db
        .find_domain(caller.domain_id.as_str())
        .await
        .map(|d| d.name)
        .unwrap_or_default();
    let body = token_body(
        &token,
        &st.svc.config.region,
        &base_url(&headers),
        &domain_name,
    );
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&token.token) {
        resp.headers_mut().insert("x-subject-token", v);
    }
    Ok(resp)
}

async fn validate(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let get = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (Some(auth), Some(subject)) = (get("x-auth-token"), get("x-subject-token")) else {
        return Err(ApiError::unauthorized(
            "X-Auth-Token and X-Subject-Token are required.",
        ));
    };
    st.svc
        .db
        .validate_token(&auth)
        .await?
        .ok_or_else(|| ApiError::unauthorized("The token is invalid or has expired."))?;
    let (caller, issued_at, expires_at) = st
        .svc
        .db
        .validate_token(&subject)
        .await?
        .ok_or_else(|| ApiError::not_found("The subject token is invalid or has expired."))?;
    let domain_name = st
        .svc
        .db
        .find_domain(caller.domain_id.as_str())
        .await
        .map(|d| d.name)
        .unwrap_or_default();
    let t = IssuedToken {
        token: subject.clone(),
        issued_at,
        expires_at,
        caller,
    };
    let mut resp = Json(token_body(
        &t,
        &st.svc.config.region,
        &base_url(&headers),
        &domain_name,
    ))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&subject) {
        resp.headers_mut().insert("x-subject-token", v);
    }
    Ok(resp)
}

async fn revoke(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<StatusCode> {
    let get = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (Some(auth), Some(subject)) = (get("x-auth-token"), get("x-subject-token")) else {
        return Err(ApiError::unauthorized(
            "X-Auth-Token and X-Subject-Token are required.",
        ));
    };
    st.svc
        .db
        .validate_token(&auth)
        .await?
        .ok_or_else(|| ApiError::unauthorized("The token is invalid or has expired."))?;
    if st.svc.db.revoke_token(&subject).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("The subject token does not exist."))
    }
}
