//! The embedded KMS API: the subset of Huawei Cloud KMS (`huaweicloudsdkkms` `KmsClient`)
//! that image encryption needs, on the same port as IMS: `POST /v1.0/{project_id}/kms/`
//! `create-key`, `list-keys`, `describe-key`, `enable-key`, `disable-key`,
//! `schedule-key-deletion`, `cancel-key-deletion`, `create-grant`, `list-grants`,
//! `revoke-grant`. Request and response bodies follow the SDK's models; the rules live in
//! `openims_core::kms`.

use crate::error::{ApiError, ApiResult};
use crate::extract::{own_project, Auth, JsonBody};
use crate::AppState;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use openims_core::kms::{KeyOp, ListKeys, NewGrant, NewKey};
use serde_json::{json, Value};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1.0/{project_id}/kms/create-key", post(create_key))
        .route("/v1.0/{project_id}/kms/list-keys", post(list_keys))
        .route("/v1.0/{project_id}/kms/describe-key", post(describe_key))
        .route(
            "/v1.0/{project_id}/kms/enable-key",
            post(state_handler(KeyOp::Enable)),
        )
        .route(
            "/v1.0/{project_id}/kms/disable-key",
            post(state_handler(KeyOp::Disable)),
        )
        .route(
            "/v1.0/{project_id}/kms/schedule-key-deletion",
            post(state_handler(KeyOp::ScheduleDeletion)),
        )
        .route(
            "/v1.0/{project_id}/kms/cancel-key-deletion",
            post(state_handler(KeyOp::CancelDeletion)),
        )
        .route("/v1.0/{project_id}/kms/create-grant", post(create_grant))
        .route("/v1.0/{project_id}/kms/list-grants", post(list_grants))
        .route("/v1.0/{project_id}/kms/revoke-grant", post(revoke_grant))
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("KMS.0201", msg)
}

fn opt_str(body: &Value, name: &str) -> ApiResult<Option<String>> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(format!("{name} must be a string"))),
    }
}

fn req_str(body: &Value, name: &str) -> ApiResult<String> {
    opt_str(body, name)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid(format!("{name} is required")))
}

/// The SDK sends numbers as strings (`limit`, `pending_days`); accept both.
fn opt_int(body: &Value, name: &str) -> ApiResult<Option<i64>> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{name} must be an integer"))),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| invalid(format!("{name} must be an integer"))),
        Some(_) => Err(invalid(format!("{name} must be an integer"))),
    }
}

fn opt_limit(body: &Value) -> ApiResult<Option<usize>> {
    match opt_int(body, "limit")? {
        None => Ok(None),
        Some(n) if (1..=1000).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(invalid(format!("limit {n} must be between 1 and 1000"))),
    }
}

async fn create_key(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let k = st
        .svc
        .kms_create_key(
            &c,
            NewKey {
                alias: req_str(&body, "key_alias")?,
                description: opt_str(&body, "key_description")?,
                key_spec: opt_str(&body, "key_spec")?,
                key_usage: opt_str(&body, "key_usage")?,
                origin: opt_str(&body, "origin")?,
            },
        )
        .await?;
    Ok(Json(json!({"key_info": {
        "key_id": k.id,
        "domain_id": k.domain_id,
        "region_id": st.svc.config.region,
    }})))
}

async fn list_keys(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let page = st
        .svc
        .kms_list_keys(
            &c,
            ListKeys {
                limit: opt_limit(&body)?,
                marker: opt_str(&body, "marker")?,
                key_state: opt_str(&body, "key_state")?,
            },
        )
        .await?;
    let region = &st.svc.config.region;
    Ok(Json(json!({
        "keys": page.keys.iter().map(|k| k.id.clone()).collect::<Vec<_>>(),
        "key_details": page.keys.iter().map(|k| k.details(region)).collect::<Vec<_>>(),
        "next_marker": page.next_marker.clone().unwrap_or_default(),
        "truncated": if page.next_marker.is_some() { "true" } else { "false" },
        "total": page.total,
    })))
}

async fn describe_key(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let k = st
        .svc
        .kms_describe_key(&c, &req_str(&body, "key_id")?)
        .await?;
    Ok(Json(json!({"key_info": k.details(&st.svc.config.region)})))
}

/// The four key state changes (`enable-key`, `disable-key`, `schedule-key-deletion`,
/// `cancel-key-deletion`) share one handler; enable and disable answer inside `key_info`, as
/// the KMS API does.
async fn change_state(
    st: AppState,
    c: openims_core::Caller,
    pid: String,
    body: Value,
    op: KeyOp,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let pending = if op == KeyOp::ScheduleDeletion {
        opt_int(&body, "pending_days")?
    } else {
        None
    };
    let k = st
        .svc
        .kms_change_state(&c, &req_str(&body, "key_id")?, op, pending)
        .await?;
    let state = json!({"key_id": k.id, "key_state": k.state.code()});
    Ok(Json(match op {
        KeyOp::Enable | KeyOp::Disable => json!({ "key_info": state }),
        _ => state,
    }))
}

/// What a key state change handler returns.
type StateChange =
    std::pin::Pin<Box<dyn std::future::Future<Output = ApiResult<Json<Value>>> + Send>>;

/// A route handler for one key state change.
fn state_handler(
    op: KeyOp,
) -> impl Fn(State<AppState>, Auth, Path<String>, JsonBody) -> StateChange + Clone + Send + Sync + 'static
{
    move |State(st), Auth(c), Path(pid), JsonBody(body)| {
        Box::pin(change_state(st, c, pid, body, op))
    }
}

async fn create_grant(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let operations = match body.get("operations") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid("operations must be strings"))
            })
            .collect::<ApiResult<Vec<_>>>()?,
        _ => return Err(invalid("operations is required (a list)")),
    };
    let id = st
        .svc
        .kms_create_grant(
            &c,
            NewGrant {
                key_id: req_str(&body, "key_id")?,
                grantee_principal: req_str(&body, "grantee_principal")?,
                grantee_type: opt_str(&body, "grantee_principal_type")?,
                operations,
                name: opt_str(&body, "name")?,
                retiring_principal: opt_str(&body, "retiring_principal")?,
            },
        )
        .await?;
    Ok(Json(json!({"grant_id": id})))
}

async fn list_grants(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let marker = opt_str(&body, "marker")?;
    let (grants, next, total) = st
        .svc
        .kms_list_grants(
            &c,
            &req_str(&body, "key_id")?,
            opt_limit(&body)?,
            marker.as_deref(),
        )
        .await?;
    Ok(Json(json!({
        "grants": grants.iter().map(|g| g.view()).collect::<Vec<_>>(),
        "next_marker": next.clone().unwrap_or_default(),
        "truncated": if next.is_some() { "true" } else { "false" },
        "total": total,
    })))
}

async fn revoke_grant(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    st.svc
        .kms_revoke_grant(&c, &req_str(&body, "key_id")?, &req_str(&body, "grant_id")?)
        .await?;
    Ok(Json(json!({})))
}
