//! The Huawei Cloud IMS API: catalogue, update, tags, quotas, OS versions, jobs, in-region copy,
//! sharing (members).

use crate::error::{ApiError, ApiResult};
use crate::extract::{own_project, Auth, JsonBody, QueryPairs};
use crate::glance::{glance_list_query, parse_patch};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use openims_core::image::{Image, ImageStatus, OS_VERSIONS};
use openims_core::jobs::JobStatus;
use openims_core::members::{Member, MemberStatus};
use openims_core::service::CopyRequest;
use openims_core::sharing::MemberTargets;
use openims_core::tags::TagChange;
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2/cloudimages", get(list_images))
        .route("/v2/cloudimages/{id}", patch(update_image))
        .route("/v1/cloudimages/{id}/copy", post(copy_in_region))
        .route("/v2.1/cloudimages/{id}/copy", post(copy_in_region))
        .route("/v1/cloudimages/os_version", get(os_versions))
        .route("/v1/cloudimages/quota", get(quota))
        .route("/v1/cloudimages/usage", get(usage))
        .route("/v1/{project_id}/jobs", get(list_jobs))
        .route("/v1/{project_id}/jobs/{job_id}", get(show_job))
        .route("/v1/cloudimages/job/{job_id}", get(show_job_progress))
        .route(
            "/v2/{project_id}/images/{id}/tags",
            post(add_tag).get(image_tags),
        )
        .route("/v2/{project_id}/images/{id}/tags/action", post(batch_tags))
        .route(
            "/v2/{project_id}/images/{id}/tags/{key}",
            delete(delete_tag),
        )
        .route("/v2/{project_id}/images/tags", get(project_tags))
        .route(
            "/v2/{project_id}/images/resource_instances/action",
            post(by_tags),
        )
        .route(
            "/v1/{project_id}/cloudimages/{id}/tags/delete",
            delete(batch_delete_tags),
        )
        .route(
            "/v1/cloudimages/tags",
            put(create_or_update_tags).get(list_tags),
        )
        .route(
            "/v1/cloudimages/members",
            post(add_members).put(update_members).delete(delete_members),
        )
        .route(
            "/v1/{project_id}/cloudimages/{id}/members",
            get(list_members),
        )
        .route(
            "/v1/{project_id}/cloudimages/{id}/members/{member_id}",
            get(show_member),
        )
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("IMG.0001", msg)
}

fn field<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    body.get(name).and_then(|v| v.as_str())
}

async fn list_images(
    State(st): State<AppState>,
    Auth(c): Auth,
    QueryPairs(pairs): QueryPairs,
) -> ApiResult<Json<Value>> {
    for (k, v) in &pairs {
        if k == "__imagetype" && !["gold", "private", "shared", "market"].contains(&v.as_str()) {
            return Err(ApiError::bad_request(
                "IMG.0024",
                "The imagetype is invalid.",
            ));
        }
        if k == "limit" {
            match v.parse::<i64>() {
                Ok(n) if (1..=1000).contains(&n) => {}
                _ => {
                    return Err(bad(format!(
                        "limit must be an integer from 1 to 1000, not {v:?}"
                    )))
                }
            }
        }
    }
    let pairs: Vec<(String, String)> = pairs
        .into_iter()
        .map(|(k, v)| {
            // Booleans are spelled in lower case in the view.
            let v = if v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false") {
                v.to_ascii_lowercase()
            } else {
                v
            };
            (k, v)
        })
        .collect();
    let q = glance_list_query(&pairs, 500)?;
    let page = st.svc.list_images(&c, &q).await?;
    let mut body = json!({
        "images": page.images.iter().map(|i| Value::Object(i.view())).collect::<Vec<_>>(),
    });
    if page.more {
        if let Some(last) = page.images.last() {
            body["page_info"] = json!({"next_marker": last.id.to_string()});
        }
    }
    Ok(Json(body))
}

async fn update_image(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let ops = parse_patch(&body, false)?;
    let img = st.svc.patch_image_ims(&c, &id, &ops).await?;
    Ok(Json(Value::Object(img.view())))
}

async fn copy_in_region(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let name = match body.get("name") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("name must be a string")),
        None => {
            return Err(ApiError::bad_request(
                "IMG.0013",
                "The image name is not specified.",
            ))
        }
    };
    let req = CopyRequest {
        name,
        description: field(&body, "description").map(str::to_string),
        cmk_id: field(&body, "cmk_id").map(str::to_string),
        enterprise_project_id: field(&body, "enterprise_project_id").map(str::to_string),
        reencrypt_data: match body.get("__reencrypt_data") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            Some(_) => return Err(bad("__reencrypt_data must be a boolean")),
        },
    };
    let job = st.svc.copy_image_in_region(&c, &id, req).await?;
    Ok(Json(json!({"job_id": job})))
}

async fn os_versions(QueryPairs(pairs): QueryPairs) -> ApiResult<Json<Value>> {
    let tag = pairs
        .iter()
        .find(|(k, _)| k == "tag")
        .map(|(_, v)| v.as_str());
    if let Some(t) = tag {
        if !["bms", "uefi", "arm", "x86"].contains(&t) {
            return Err(bad(format!(
                "tag must be one of bms, uefi, arm, x86, not {t:?}"
            )));
        }
    }
    let mut by_platform: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for o in OS_VERSIONS
        .iter()
        .filter(|o| tag.is_none_or(|t| o.tags.contains(&t)))
    {
        by_platform.entry(o.platform).or_default().push(json!({
            "platform": o.platform,
            "os_version_key": o.os_version,
            "os_version": o.os_version,
            "os_bit": o.os_bit,
            "os_type": o.os_type,
        }));
    }
    Ok(Json(Value::Array(
        by_platform
            .into_iter()
            .map(|(p, list)| json!({"platform": p, "version_list": list}))
            .collect(),
    )))
}

/// Extension: storage usage of the caller's project (logical vs billable bytes; see
/// `openims_core::metering`).
async fn usage(State(st): State<AppState>, Auth(c): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(st.svc.usage(&c).await?))
}

async fn quota(State(st): State<AppState>, Auth(c): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(st.svc.quota(&c).await?))
}

async fn show_job(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((pid, job_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    Ok(Json(st.svc.job(&c, &job_id).await?.view()))
}

/// Extension: the caller's project's jobs, newest first (`?status=INIT|RUNNING|SUCCESS|FAIL`,
/// `?limit=1..1000`, default 100). Each item is a `show_job` body. Used by the web console's
/// Jobs page; see docs/console.md.
async fn list_jobs(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
    QueryPairs(pairs): QueryPairs,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let mut status = None;
    let mut limit = 100u32;
    for (k, v) in &pairs {
        match k.as_str() {
            "status" => {
                status = Some(match v.as_str() {
                    "INIT" => JobStatus::Init,
                    "RUNNING" => JobStatus::Running,
                    "SUCCESS" => JobStatus::Success,
                    "FAIL" => JobStatus::Fail,
                    _ => {
                        return Err(bad(format!(
                            "status must be one of INIT, RUNNING, SUCCESS, FAIL, not {v:?}"
                        )))
                    }
                })
            }
            "limit" => {
                limit = match v.parse::<u32>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => {
                        return Err(bad(format!(
                            "limit must be an integer from 1 to 1000, not {v:?}"
                        )))
                    }
                }
            }
            _ => {}
        }
    }
    let jobs = st.svc.list_jobs(&c, status, limit).await?;
    Ok(Json(json!({
        "jobs": jobs.iter().map(|j| j.view()).collect::<Vec<_>>(),
        "count": jobs.len(),
    })))
}

async fn show_job_progress(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(job_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = st.svc.job(&c, &job_id).await?;
    let mut v = job.view();
    if let Some(e) = v.get_mut("entities").and_then(|e| e.as_object_mut()) {
        e.insert("subJobId".into(), Value::Null);
        e.insert("sub_jobs_result".into(), json!([]));
        e.insert("sub_jobs_list".into(), json!([]));
    }
    Ok(Json(v))
}

// ---- tags ----------------------------------------------------------------------------------

fn key_value(v: &Value) -> ApiResult<(String, String)> {
    let key = v
        .get("key")
        .and_then(|k| k.as_str())
        .ok_or_else(|| ApiError::bad_request("IMG.0115", "A tag needs a string key."))?;
    let value = match v.get("value") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "IMG.0115",
                "A tag value must be a string.",
            ))
        }
    };
    Ok((key.trim().to_string(), value.trim().to_string()))
}

fn tags_json(tags: &[(String, String)]) -> Value {
    Value::Array(
        tags.iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect(),
    )
}

async fn add_tag(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((pid, id)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> ApiResult<StatusCode> {
    own_project(&c, &pid)?;
    let tag = body
        .get("tag")
        .ok_or_else(|| ApiError::bad_request("IMG.0115", "The body needs a tag object."))?;
    let (k, v) = key_value(tag)?;
    st.svc
        .change_tags(&c, &id, vec![TagChange::Upsert(k, v)])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn batch_tags(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((pid, id)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> ApiResult<StatusCode> {
    own_project(&c, &pid)?;
    let action = field(&body, "action").unwrap_or("");
    let list = body
        .get("tags")
        .and_then(|t| t.as_array())
        .ok_or_else(|| ApiError::bad_request("IMG.0115", "tags must be a list of {key, value}."))?;
    let mut pairs = Vec::new();
    for t in list {
        let kv = key_value(t)?;
        if pairs.iter().any(|(k, _): &(String, String)| *k == kv.0) {
            return Err(ApiError::bad_request(
                "IMG.0115",
                format!("Tag key {:?} appears twice in the request.", kv.0),
            ));
        }
        pairs.push(kv);
    }
    let changes = match action {
        "create" => pairs
            .into_iter()
            .map(|(k, v)| TagChange::Upsert(k, v))
            .collect(),
        "delete" => {
            for (k, v) in &pairs {
                validate_delete_tag(k, v)?;
            }
            pairs
                .into_iter()
                .map(|(k, _)| TagChange::Remove(k))
                .collect()
        }
        other => {
            return Err(bad(format!(
                "action must be create or delete, not {other:?}"
            )))
        }
    };
    st.svc.change_tags(&c, &id, changes).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn validate_delete_tag(k: &str, v: &str) -> ApiResult<()> {
    if k.trim().is_empty() || k.chars().count() > 127 || v.chars().count() > 255 {
        return Err(ApiError::bad_request(
            "IMG.0115",
            "A tag key must be 1-127 and a value at most 255 characters.",
        ));
    }
    Ok(())
}

async fn delete_tag(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((pid, id, key)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    own_project(&c, &pid)?;
    st.svc.remove_tag_strict(&c, &id, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn image_tags(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((pid, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let img = st.svc.readable_image(&c, &id).await?;
    Ok(Json(json!({"tags": tags_json(&img.tags)})))
}

async fn project_tags(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for img in st.svc.project_images(&c).await? {
        for (k, v) in img.tags {
            let values = by_key.entry(k).or_default();
            if !values.contains(&v) {
                values.push(v);
            }
        }
    }
    Ok(Json(
        json!({"tags": by_key.into_iter().map(|(k, v)| json!({"key": k, "values": v})).collect::<Vec<_>>()}),
    ))
}

async fn batch_delete_tags(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((pid, id)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> ApiResult<StatusCode> {
    own_project(&c, &pid)?;
    let list = body
        .get("tags")
        .and_then(|t| t.as_array())
        .ok_or_else(|| ApiError::bad_request("IMG.0115", "tags must be a list of {key, value}."))?;
    let mut changes = Vec::new();
    for t in list {
        let (k, v) = key_value(t)?;
        validate_delete_tag(&k, &v)?;
        changes.push(TagChange::Remove(k));
    }
    st.svc.change_tags(&c, &id, changes).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_or_update_tags(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<StatusCode> {
    let id = field(&body, "image_id").ok_or_else(|| bad("image_id is required."))?;
    let (k, v) = match (body.get("tag"), body.get("image_tag")) {
        (Some(Value::String(t)), None) => {
            let (k, v) = t.split_once('.').unwrap_or((t.as_str(), ""));
            (k.trim().to_string(), v.trim().to_string())
        }
        (None, Some(t)) => key_value(t)?,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "IMG.0115",
                "Give either tag or image_tag, not both.",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "IMG.0115",
                "tag (\"key.value\") or image_tag ({key, value}) is required.",
            ))
        }
    };
    st.svc
        .change_tags(&c, id, vec![TagChange::Upsert(k, v)])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tags(
    State(st): State<AppState>,
    Auth(c): Auth,
    QueryPairs(pairs): QueryPairs,
) -> ApiResult<Json<Value>> {
    let mut limit: Option<usize> = None;
    let mut page = 1usize;
    let mut filters = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => {
                limit = Some(
                    v.parse()
                        .map_err(|_| bad("limit must be a positive integer"))?,
                )
            }
            "page" => {
                page = v
                    .parse()
                    .ok()
                    .filter(|p| *p >= 1)
                    .ok_or_else(|| bad("page must be a positive integer"))?
            }
            _ => filters.push((k, v)),
        }
    }
    let q = glance_list_query(&filters, usize::MAX)?;
    let images = st.svc.list_images(&c, &q).await?.images;
    let mut tags: Vec<String> = Vec::new();
    for img in &images {
        for (k, v) in &img.tags {
            let t = format!("{k}.{v}");
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
    }
    let tags: Vec<String> = match limit {
        Some(l) => tags
            .into_iter()
            .skip((page - 1).saturating_mul(l))
            .take(l)
            .collect(),
        None => tags,
    };
    Ok(Json(json!({"tags": tags})))
}

/// One `{key, values[]}` condition of a tag query.
struct TagCond {
    key: String,
    values: Vec<String>,
}

fn parse_conds(body: &Value, name: &str) -> ApiResult<Vec<TagCond>> {
    let Some(list) = body.get(name) else {
        return Ok(vec![]);
    };
    let list = list
        .as_array()
        .ok_or_else(|| bad(format!("{name} must be a list")))?;
    if list.len() > 10 {
        return Err(bad(format!("{name}: at most 10 keys")));
    }
    let mut out: Vec<TagCond> = Vec::new();
    for item in list {
        let key = item
            .get("key")
            .and_then(|k| k.as_str())
            .ok_or_else(|| bad(format!("{name}: each item needs a key")))?;
        if key.is_empty() || key.chars().count() > 127 {
            return Err(bad(format!("{name}: key must be 1-127 characters")));
        }
        if out.iter().any(|c| c.key == key) {
            return Err(bad(format!("{name}: key {key:?} repeats")));
        }
        let values: Vec<String> = match item.get("values") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("values must be strings"))
                })
                .collect::<ApiResult<_>>()?,
            Some(_) => return Err(bad("values must be a list")),
        };
        if values.len() > 10 {
            return Err(bad(format!("{name}: at most 10 values per key")));
        }
        let mut seen = values.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != values.len() {
            return Err(bad(format!("{name}: values of {key:?} repeat")));
        }
        out.push(TagCond {
            key: key.to_string(),
            values,
        });
    }
    Ok(out)
}

fn cond_matches(img: &Image, c: &TagCond) -> bool {
    img.tags
        .iter()
        .any(|(k, v)| *k == c.key && (c.values.is_empty() || c.values.contains(v)))
}

fn str_number(
    body: &Value,
    name: &str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> ApiResult<usize> {
    let n = match body.get(name) {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::String(s)) => s.parse::<usize>().ok(),
        Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
        _ => None,
    };
    n.filter(|n| range.contains(n))
        .ok_or_else(|| bad(format!("{name} must be a number in {range:?}")))
}

async fn by_tags(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(pid): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let action = field(&body, "action").unwrap_or("");
    if action != "filter" && action != "count" {
        return Err(bad(format!(
            "action must be filter or count, not {action:?}"
        )));
    }
    let tags = parse_conds(&body, "tags")?;
    let tags_any = parse_conds(&body, "tags_any")?;
    let not_tags = parse_conds(&body, "not_tags")?;
    let not_tags_any = parse_conds(&body, "not_tags_any")?;
    let without_any_tag = body
        .get("without_any_tag")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let limit = str_number(&body, "limit", 10, 1..=1000)?;
    let offset = str_number(&body, "offset", 0, 0..=usize::MAX)?;
    let matches: Vec<(String, String)> = match body.get("matches") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|m| {
                let k = m.get("key").and_then(|k| k.as_str()).unwrap_or("");
                let v = m.get("value").and_then(|v| v.as_str()).unwrap_or("");
                if k != "resource_name" && k != "resource_id" {
                    return Err(bad("matches key must be resource_name or resource_id"));
                }
                Ok((k.to_string(), v.to_string()))
            })
            .collect::<ApiResult<_>>()?,
        Some(_) => return Err(bad("matches must be a list")),
    };
    let mut images = st.svc.project_images(&c).await?;
    images.sort_by_key(|i| std::cmp::Reverse(i.created_at));
    let selected: Vec<&Image> = images
        .iter()
        .filter(|img| {
            let tag_ok = if without_any_tag {
                img.tags.is_empty()
            } else {
                tags.iter().all(|t| cond_matches(img, t))
                    && (tags_any.is_empty() || tags_any.iter().any(|t| cond_matches(img, t)))
                    && (not_tags.is_empty() || !not_tags.iter().all(|t| cond_matches(img, t)))
                    && !not_tags_any.iter().any(|t| cond_matches(img, t))
            };
            let match_ok = matches.iter().all(|(k, v)| match k.as_str() {
                "resource_id" => img.id.to_string() == *v,
                _ => img.name.as_deref().unwrap_or("").contains(v.as_str()),
            });
            tag_ok && match_ok && img.status != ImageStatus::Killed
        })
        .collect();
    let total = selected.len();
    if action == "count" {
        return Ok(Json(json!({"total_count": total})));
    }
    let resources: Vec<Value> = selected
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|img| {
            json!({
                "resource_id": img.id.to_string(),
                "resource_name": img.name.clone().unwrap_or_default(),
                "resource_detail": {"status": img.status.as_str()},
                "tags": tags_json(&img.tags),
            })
        })
        .collect();
    Ok(Json(json!({"resources": resources, "total_count": total})))
}

// ---- sharing (members) -----------------------------------------------------------------------

fn string_list(body: &Value, name: &str, required: bool) -> ApiResult<Vec<String>> {
    match body.get(name) {
        None | Some(Value::Null) if !required => Ok(vec![]),
        None | Some(Value::Null) => Err(bad(format!("{name} is required."))),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("{name} must be a list of strings.")))
            })
            .collect(),
        Some(_) => Err(bad(format!("{name} must be a list of strings."))),
    }
}

/// The body of batch_add_members / batch_delete_members.
fn member_targets(body: &Value) -> ApiResult<(Vec<String>, MemberTargets)> {
    if !body.is_object() {
        return Err(bad("The request body must be a JSON object."));
    }
    let images = string_list(body, "images", true)?;
    let targets = MemberTargets {
        projects: string_list(body, "projects", false)?,
        domains: string_list(body, "domains", false)?,
    };
    if !string_list(body, "organizations", false)?.is_empty() {
        return Err(bad(
            "Sharing with organizations is not supported: name projects or domains.",
        ));
    }
    Ok((images, targets))
}

async fn add_members(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let (images, targets) = member_targets(&body)?;
    let job = st.svc.add_members(&c, &images, &targets).await?;
    Ok(Json(json!({"job_id": job})))
}

async fn delete_members(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let (images, targets) = member_targets(&body)?;
    let job = st.svc.remove_members(&c, &images, &targets).await?;
    Ok(Json(json!({"job_id": job})))
}

async fn update_members(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    if !body.is_object() {
        return Err(bad("The request body must be a JSON object."));
    }
    let images = string_list(&body, "images", true)?;
    let project_id = field(&body, "project_id").ok_or_else(|| bad("project_id is required."))?;
    // Only the recipient project itself answers a share addressed to it.
    own_project(&c, project_id)?;
    let status = field(&body, "status")
        .and_then(MemberStatus::parse)
        .ok_or_else(|| bad("status must be accepted or rejected."))?;
    let job = st
        .svc
        .answer_members(&c, &images, project_id, status)
        .await?;
    Ok(Json(json!({"job_id": job})))
}

/// Pages a member list: `limit` 1-1000 (default 500), `marker` the base64 of the last member
/// id of the previous page. Returns the page and the next marker, if more follow.
pub fn page_members(
    members: Vec<Member>,
    pairs: &[(String, String)],
) -> ApiResult<(Vec<Member>, Option<String>)> {
    use base64::Engine;
    let mut limit = 500usize;
    let mut start = 0usize;
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        bad(format!(
                            "limit must be an integer from 1 to 1000, not {v:?}"
                        ))
                    })?
            }
            "marker" => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| bad(format!("marker {v:?} is not base64 content.")))?;
                let pos = members
                    .iter()
                    .position(|m| m.member_id == decoded)
                    .ok_or_else(|| bad(format!("marker {v:?} names no member of this image.")))?;
                start = pos + 1;
            }
            _ => {}
        }
    }
    let total = members.len();
    let page: Vec<Member> = members.into_iter().skip(start).take(limit).collect();
    let next = if start + page.len() < total {
        page.last()
            .map(|m| base64::engine::general_purpose::STANDARD.encode(m.member_id.as_bytes()))
    } else {
        None
    };
    Ok((page, next))
}

/// `{"members", "schema", "page_info"}` (spec A.5), shared with Glance's member list.
pub fn members_body(page: &[Member], next: Option<String>) -> Value {
    json!({
        "members": page.iter().map(Member::view).collect::<Vec<_>>(),
        "schema": "/v2/schemas/members",
        "page_info": {"next_marker": next, "current_count": page.len()},
    })
}

async fn list_members(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((pid, id)): Path<(String, String)>,
    QueryPairs(pairs): QueryPairs,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    let members = st.svc.list_members(&c, &id).await?;
    let (page, next) = page_members(members, &pairs)?;
    Ok(Json(members_body(&page, next)))
}

async fn show_member(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path((pid, id, member)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    own_project(&c, &pid)?;
    Ok(Json(st.svc.show_member(&c, &id, &member).await?.view()))
}
