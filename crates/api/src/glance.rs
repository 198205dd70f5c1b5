//! OpenStack Glance v2: images, image data, tags, members, schemas, version documents.

use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody, QueryPairs};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use openims_core::image::{parse_time_filter, ListQuery, SORT_KEYS};
use openims_core::members::MemberStatus;
use openims_core::service::{PatchKind, PatchOp};
use serde_json::{json, Map, Value};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2/images", get(list).post(create))
        .route("/v2/images/{id}", get(show).patch(patch).delete(delete))
        .route("/v2/images/{id}/file", put(upload).get(download))
        .route(
            "/v2/images/{id}/tags/{tag}",
            put(add_tag).delete(delete_tag),
        )
        .route(
            "/v2/images/{id}/members",
            get(list_members).post(add_member),
        )
        .route(
            "/v2/images/{id}/members/{member}",
            get(show_member).put(update_member).delete(delete_member),
        )
}

/// Routes that need no authentication (discovery and schemas).
pub fn public_routes() -> Router<AppState> {
    let mut r = Router::new()
        .route("/", get(versions))
        .route("/v2/schemas/image", get(|| async { Json(image_schema()) }))
        .route(
            "/v2/schemas/images",
            get(|| async { Json(images_schema()) }),
        )
        .route(
            "/v2/schemas/member",
            get(|| async { Json(member_schema()) }),
        )
        .route(
            "/v2/schemas/members",
            get(|| async { Json(members_schema()) }),
        );
    for v in ["v2", "v2.0", "v2.1", "v2.2", "v1", "v1.0", "v1.1"] {
        let id = v.to_string();
        r = r.route(
            &format!("/{v}"),
            get(move |headers: HeaderMap| {
                let id = id.clone();
                async move { show_version(&headers, &id) }
            }),
        );
    }
    r
}

fn g(e: impl Into<ApiError>) -> ApiError {
    e.into().glance()
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn version_list(base: &str) -> Vec<Value> {
    [
        ("v2.2", "CURRENT"),
        ("v2.1", "SUPPORTED"),
        ("v2.0", "SUPPORTED"),
        ("v1.1", "DEPRECATED"),
        ("v1.0", "DEPRECATED"),
    ]
    .iter()
    .map(|(id, status)| {
        let major = &id[..2];
        json!({"id": id, "status": status, "links": [{"rel": "self", "href": format!("{base}/{major}/")}]})
    })
    .collect()
}

/// `GET /`: the version document (300 Multiple Choices, as Glance answers).
async fn versions(headers: HeaderMap) -> Response {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(json!({"versions": version_list(&base_url(&headers))})),
    )
        .into_response()
}

fn show_version(headers: &HeaderMap, id: &str) -> Response {
    let all = version_list(&base_url(headers));
    let want = if id.len() == 2 {
        format!("{id}.")
    } else {
        id.to_string()
    };
    let picked: Vec<Value> = all
        .into_iter()
        .filter(|v| {
            let vid = v["id"].as_str().unwrap_or("");
            vid == want || (want.ends_with('.') && vid.starts_with(&want))
        })
        .collect();
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(json!({"versions": picked})),
    )
        .into_response()
}

/// Builds a list query from Glance's query string.
pub fn glance_list_query(pairs: &[(String, String)], default_limit: usize) -> ApiResult<ListQuery> {
    let mut q = ListQuery {
        limit: default_limit,
        ..Default::default()
    };
    let mut sort_keys: Vec<String> = Vec::new();
    let mut sort_dirs: Vec<bool> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => {
                let n: i64 = v.parse().map_err(|_| {
                    ApiError::bad_request(
                        "IMG.0001",
                        format!("limit param must be an integer: {v:?}"),
                    )
                })?;
                if n < 0 {
                    return Err(ApiError::bad_request(
                        "IMG.0001",
                        "limit param must be positive",
                    ));
                }
                q.limit = (n as usize).min(1000);
            }
            "marker" => q.marker = Some(v.clone()),
            "sort_key" => sort_keys.push(v.clone()),
            "sort_dir" => sort_dirs.push(match v.as_str() {
                "asc" => true,
                "desc" => false,
                _ => {
                    return Err(ApiError::bad_request(
                        "IMG.0001",
                        format!("Invalid sort direction: {v}"),
                    ))
                }
            }),
            "sort" => {
                for part in v.split(',') {
                    let (key, dir) = part.split_once(':').unwrap_or((part, "desc"));
                    sort_keys.push(key.trim().to_string());
                    sort_dirs.push(match dir.trim() {
                        "asc" => true,
                        "desc" => false,
                        d => {
                            return Err(ApiError::bad_request(
                                "IMG.0001",
                                format!("Invalid sort direction: {d}"),
                            ))
                        }
                    });
                }
            }
            "tag" => q.tags.push(v.clone()),
            "created_at" | "updated_at" => {
                let f = parse_time_filter(v).ok_or_else(|| {
                    ApiError::bad_request("IMG.0001", format!("Invalid time filter {k}={v}"))
                })?;
                if k == "created_at" {
                    q.created_at.push(f);
                } else {
                    q.updated_at.push(f);
                }
            }
            "__imagetype" | "member_status" => q.equals.push((k.clone(), v.clone())),
            _ => q.equals.push((k.clone(), v.clone())),
        }
    }
    for key in &sort_keys {
        if !SORT_KEYS.contains(&key.as_str()) {
            return Err(ApiError::bad_request(
                "IMG.0001",
                format!("Invalid sort key: {key}"),
            ));
        }
    }
    let default_dir = sort_dirs.first().copied().unwrap_or(false);
    q.sort = sort_keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, sort_dirs.get(i).copied().unwrap_or(default_dir)))
        .collect();
    Ok(q)
}

async fn list(
    State(st): State<AppState>,
    Auth(c): Auth,
    QueryPairs(pairs): QueryPairs,
) -> ApiResult<Json<Value>> {
    let q = glance_list_query(&pairs, 25).map_err(g)?;
    let page = st.svc.list_images(&c, &q).await.map_err(g)?;
    let mut body = json!({
        "images": page.images.iter().map(|i| Value::Object(i.view())).collect::<Vec<_>>(),
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    });
    if page.more {
        if let Some(last) = page.images.last() {
            let mut next: Vec<(String, String)> = pairs
                .iter()
                .filter(|(k, _)| k != "marker")
                .cloned()
                .collect();
            next.push(("marker".into(), last.id.to_string()));
            body["next"] = json!(format!(
                "/v2/images?{}",
                serde_urlencoded::to_string(&next).unwrap_or_default()
            ));
        }
    }
    Ok(Json(body))
}

async fn create(
    State(st): State<AppState>,
    Auth(c): Auth,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let Value::Object(map) = body else {
        return Err(g(ApiError::bad_request(
            "IMG.0001",
            "The request body must be a JSON object.",
        )));
    };
    let img = st.svc.create_image_metadata(&c, &map).await.map_err(g)?;
    let location = format!("{}/v2/images/{}", base_url(&headers), img.id);
    let mut resp = (StatusCode::CREATED, Json(Value::Object(img.view()))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

async fn show(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let img = st.svc.readable_image(&c, &id).await.map_err(g)?;
    Ok(Json(Value::Object(img.view())))
}

/// Parses both JSON-patch dialects into operations.
pub fn parse_patch(body: &Value, dialect_v20: bool) -> ApiResult<Vec<PatchOp>> {
    let Value::Array(items) = body else {
        return Err(ApiError::bad_request(
            "IMG.0001",
            "The patch must be a JSON array of operations.",
        ));
    };
    let mut ops = Vec::new();
    for item in items {
        let Value::Object(o) = item else {
            return Err(ApiError::bad_request(
                "IMG.0001",
                "Each patch operation must be a JSON object.",
            ));
        };
        let (kind, path) = if dialect_v20 {
            let found = ["add", "replace", "remove"]
                .iter()
                .find_map(|k| o.get(*k).map(|p| (*k, p)));
            let Some((k, p)) = found else {
                return Err(ApiError::bad_request(
                    "IMG.0001",
                    "Unknown patch operation: expected add, replace or remove.",
                ));
            };
            (k.to_string(), p.clone())
        } else {
            let op = o.get("op").and_then(|v| v.as_str()).unwrap_or("");
            (
                op.to_string(),
                o.get("path").cloned().unwrap_or(Value::Null),
            )
        };
        let op = match kind.as_str() {
            "add" => PatchKind::Add,
            "replace" => PatchKind::Replace,
            "remove" => PatchKind::Remove,
            other => {
                return Err(ApiError::bad_request(
                    "IMG.0001",
                    format!("Unknown patch operation {other:?}: expected add, replace or remove."),
                ))
            }
        };
        let path = path.as_str().unwrap_or("");
        let attr = path.strip_prefix('/').unwrap_or("");
        if attr.is_empty() || attr.contains('/') {
            return Err(ApiError::bad_request(
                "IMG.0001",
                format!("Invalid patch path {path:?}."),
            ));
        }
        ops.push(PatchOp {
            op,
            attr: attr.to_string(),
            value: o.get("value").cloned(),
        });
    }
    Ok(ops)
}

async fn patch(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ct = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let v20 = match ct.as_str() {
        "application/openstack-images-v2.1-json-patch" => false,
        "application/openstack-images-v2.0-json-patch" => true,
        _ => {
            return Err(g(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "IMG.0001",
                format!(
                "Unsupported Content-Type {ct:?}: use application/openstack-images-v2.1-json-patch"
            ),
            )))
        }
    };
    let ops = parse_patch(&body, v20).map_err(g)?;
    let img = st.svc.patch_image_glance(&c, &id, &ops).await.map_err(g)?;
    Ok(Json(Value::Object(img.view())))
}

async fn delete(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    st.svc.delete_image(&c, &id).await.map_err(g)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn upload(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.split(';').next().unwrap_or("").trim() != "application/octet-stream" {
        return Err(g(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "IMG.0001",
            format!("Image data must be sent as application/octet-stream, not {ct:?}"),
        )));
    }
    st.svc
        .upload_image_data(&c, &id, body.into_data_stream())
        .await
        .map_err(g)?;
    Ok(StatusCode::NO_CONTENT)
}

fn parse_range(v: &str, len: u64) -> Option<Option<(u64, u64)>> {
    // Some(None): unsatisfiable; None: not a byte range we understand (ignored).
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return Some(None);
        }
        (len.saturating_sub(n), len.saturating_sub(1))
    } else {
        let s: u64 = a.parse().ok()?;
        let e: u64 = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse().ok()?
        };
        (s, e.min(len.saturating_sub(1)))
    };
    if len == 0 || start >= len || start > end {
        return Some(None);
    }
    Some(Some((start, end)))
}

async fn download(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Some(data) = st.svc.image_data(&c, &id).await.map_err(g)? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, data.len));
    let (status, start, len) = match range {
        Some(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        Some(None) => {
            let mut r = g(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "IMG.0001",
                "Requested range not satisfiable",
            ))
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", data.len)) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
        None => (StatusCode::OK, 0, data.len),
    };
    let reader = st
        .svc
        .data
        .reader_with(&data.manifest, data.dek.clone(), start, len)
        .map_err(g)?;
    let mut resp = Response::new(stream_reader(reader));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(md5) = data
        .md5
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
    {
        h.insert("content-md5", md5);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) =
            HeaderValue::from_str(&format!("bytes {}-{}/{}", start, start + len - 1, data.len))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

/// Streams a blocking reader as a response body (1 MiB pieces, read on a blocking thread).
pub fn stream_reader(mut reader: Box<dyn std::io::Read + Send>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || loop {
        let mut buf = vec![0u8; 1 << 20];
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
        if filled == 0 {
            return;
        }
        buf.truncate(filled);
        if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
            return;
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

async fn add_tag(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    st.svc.add_glance_tag(&c, &id, &tag).await.map_err(g)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_tag(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    st.svc.remove_tag_strict(&c, &id, &tag).await.map_err(g)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_members(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    QueryPairs(pairs): QueryPairs,
) -> ApiResult<Json<Value>> {
    let members = st.svc.list_members(&c, &id).await.map_err(g)?;
    let (page, next) = crate::ims::page_members(members, &pairs).map_err(g)?;
    Ok(Json(crate::ims::members_body(&page, next)))
}

async fn add_member(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let member = body.get("member").and_then(|m| m.as_str()).ok_or_else(|| {
        g(ApiError::bad_request(
            "IMG.0001",
            "The body needs a member (a project id).",
        ))
    })?;
    let m = st.svc.add_member_now(&c, &id, member).await.map_err(g)?;
    Ok(Json(m.view()))
}

async fn show_member(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((id, member)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        st.svc
            .show_member(&c, &id, &member)
            .await
            .map_err(g)?
            .view(),
    ))
}

async fn update_member(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((id, member)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let status = body
        .get("status")
        .and_then(|s| s.as_str())
        .and_then(MemberStatus::parse)
        .ok_or_else(|| {
            g(ApiError::bad_request(
                "IMG.0001",
                "status must be accepted or rejected.",
            ))
        })?;
    let m = st
        .svc
        .answer_member_now(&c, &id, &member, status)
        .await
        .map_err(g)?;
    Ok(Json(m.view()))
}

async fn delete_member(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((id, member)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    st.svc
        .remove_member_now(&c, &id, &member)
        .await
        .map_err(g)?;
    Ok(StatusCode::NO_CONTENT)
}

fn prop(t: &str) -> Value {
    json!({"type": t})
}

pub fn image_schema() -> Value {
    let mut props = Map::new();
    for (k, v) in [
        (
            "id",
            json!({"type": "string", "pattern": "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$"}),
        ),
        (
            "name",
            json!({"type": ["null", "string"], "maxLength": 255}),
        ),
        (
            "status",
            json!({"type": "string", "readOnly": true, "enum": ["queued", "saving", "active", "killed", "deleted"]}),
        ),
        (
            "visibility",
            json!({"type": "string", "enum": ["community", "public", "private", "shared"]}),
        ),
        ("protected", prop("boolean")),
        ("os_hidden", prop("boolean")),
        (
            "checksum",
            json!({"type": ["null", "string"], "readOnly": true, "maxLength": 32}),
        ),
        (
            "os_hash_algo",
            json!({"type": ["null", "string"], "readOnly": true}),
        ),
        (
            "os_hash_value",
            json!({"type": ["null", "string"], "readOnly": true}),
        ),
        (
            "owner",
            json!({"type": ["null", "string"], "readOnly": true}),
        ),
        (
            "size",
            json!({"type": ["null", "integer"], "readOnly": true}),
        ),
        (
            "virtual_size",
            json!({"type": ["null", "integer"], "readOnly": true}),
        ),
        (
            "container_format",
            json!({"type": ["null", "string"], "enum": [null, "ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed"]}),
        ),
        (
            "disk_format",
            json!({"type": ["null", "string"], "enum": [null, "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop", "zvhd", "zvhd2"]}),
        ),
        ("created_at", json!({"type": "string", "readOnly": true})),
        ("updated_at", json!({"type": "string", "readOnly": true})),
        (
            "tags",
            json!({"type": "array", "items": {"type": "string", "maxLength": 255}}),
        ),
        ("min_ram", prop("integer")),
        ("min_disk", prop("integer")),
        ("self", json!({"type": "string", "readOnly": true})),
        ("file", json!({"type": "string", "readOnly": true})),
        ("schema", json!({"type": "string", "readOnly": true})),
        ("stores", json!({"type": "string", "readOnly": true})),
        ("__os_version", prop("string")),
        ("__imagetype", prop("string")),
        ("__isregistered", prop("string")),
        ("__image_size", prop("string")),
        ("__description", prop("string")),
        ("virtual_env_type", prop("string")),
    ] {
        props.insert(k.to_string(), v);
    }
    json!({
        "name": "image",
        "properties": props,
        "additionalProperties": {"type": "string"},
        "links": [
            {"href": "{self}", "rel": "self"},
            {"href": "{file}", "rel": "enclosure"},
            {"href": "{schema}", "rel": "describedby"}
        ]
    })
}

pub fn images_schema() -> Value {
    json!({
        "name": "images",
        "properties": {
            "images": {"type": "array", "items": image_schema()},
            "schema": prop("string"),
            "first": prop("string"),
            "next": prop("string")
        },
        "links": [
            {"href": "{first}", "rel": "first"},
            {"href": "{next}", "rel": "next"},
            {"href": "{schema}", "rel": "describedby"}
        ]
    })
}

pub fn member_schema() -> Value {
    json!({
        "name": "member",
        "properties": {
            "created_at": prop("string"),
            "updated_at": prop("string"),
            "image_id": prop("string"),
            "member_id": prop("string"),
            "status": {"type": "string", "enum": ["pending", "accepted", "rejected"]},
            "schema": {"type": "string", "readOnly": true},
            "member_type": prop("string")
        },
        "links": [{"href": "{schema}", "rel": "describedby"}]
    })
}

pub fn members_schema() -> Value {
    json!({
        "name": "members",
        "properties": {
            "members": {"type": "array", "items": member_schema()},
            "schema": prop("string")
        },
        "links": [{"href": "{schema}", "rel": "describedby"}]
    })
}
