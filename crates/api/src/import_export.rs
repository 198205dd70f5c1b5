//! IMS image-file operations: create_image from a bucket object (and v2.1), create_data_image
//! (and v2.1), import_image_quick (and v2.1), register_image, export_image (and v2.1).
//! Every one answers `{"job_id"}`; the rules live in `openims_core::import` / `export`.

use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody};
use crate::AppState;
use axum::extract::{Path, State};
use axum::routing::{post, put};
use axum::{Json, Router};
use openims_core::export::ExportRequest;
use openims_core::import::{DataDiskFile, ImportKind, ImportRequest};
use serde_json::{json, Value};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2/cloudimages/action", post(create_image))
        .route("/v2.1/cloudimages/action", post(create_image))
        .route("/v1/cloudimages/dataimages/action", post(create_data_image))
        .route(
            "/v2.1/cloudimages/dataimages/action",
            post(create_data_image),
        )
        .route(
            "/v1/cloudimages/wholeimages/action",
            post(create_whole_image),
        )
        .route("/v2/cloudimages/quickimport/action", post(quick_import))
        .route("/v2.1/cloudimages/quickimport/action", post(quick_import))
        .route("/v1/cloudimages/{id}/upload", put(register_image))
        .route("/v1/cloudimages/{id}/file", post(export_image))
        .route("/v2.1/cloudimages/{id}/file", post(export_image))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("IMG.0001", msg)
}

fn opt_str(body: &Value, name: &str) -> ApiResult<Option<String>> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("{name} must be a string"))),
    }
}

fn opt_int(body: &Value, name: &str) -> ApiResult<Option<i64>> {
    let invalid = || {
        ApiError::bad_request(
            "IMG.0055",
            format!("The memory or disk size is invalid: {name} must be an integer"),
        )
    };
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(invalid),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| invalid()),
        Some(_) => Err(invalid()),
    }
}

fn opt_bool(body: &Value, name: &str) -> ApiResult<bool> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
        Some(_) => Err(bad(format!("{name} must be a boolean"))),
    }
}

/// `tags` (`"key.value"`) or `image_tags` (`{key, value}`), never both.
fn parse_tags(body: &Value) -> ApiResult<Vec<(String, String)>> {
    let tag_err = |m: &str| ApiError::bad_request("IMG.0115", m.to_string());
    match (body.get("tags"), body.get("image_tags")) {
        (Some(t), Some(i)) if !t.is_null() && !i.is_null() => {
            Err(bad("tags and image_tags cannot both be given"))
        }
        (Some(Value::Array(list)), _) => list
            .iter()
            .map(|t| {
                let s = t
                    .as_str()
                    .ok_or_else(|| tag_err("A tag must be a string."))?;
                let (k, v) = s.split_once('.').unwrap_or((s, ""));
                Ok((k.trim().to_string(), v.trim().to_string()))
            })
            .collect(),
        (_, Some(Value::Array(list))) => list
            .iter()
            .map(|t| {
                let k = t
                    .get("key")
                    .and_then(Value::as_str)
                    .ok_or_else(|| tag_err("A tag needs a string key."))?;
                let v = t.get("value").and_then(Value::as_str).unwrap_or("");
                Ok((k.trim().to_string(), v.trim().to_string()))
            })
            .collect(),
        (None | Some(Value::Null), None | Some(Value::Null)) => Ok(vec![]),
        _ => Err(tag_err("tags and image_tags must be lists.")),
    }
}

fn import_request(body: &Value) -> ApiResult<ImportRequest> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "IMG.0007",
            "The request body is empty.",
        ));
    }
    Ok(ImportRequest {
        name: opt_str(body, "name")?,
        description: opt_str(body, "description")?,
        image_url: opt_str(body, "image_url")?.unwrap_or_default(),
        min_disk: opt_int(body, "min_disk")?,
        min_ram: opt_int(body, "min_ram")?,
        max_ram: opt_int(body, "max_ram")?,
        os_version: opt_str(body, "os_version")?,
        os_type: opt_str(body, "os_type")?,
        image_type: opt_str(body, "type")?,
        architecture: opt_str(body, "architecture")?,
        hw_firmware_type: opt_str(body, "hw_firmware_type")?,
        tags: parse_tags(body)?,
        cmk_id: opt_str(body, "cmk_id")?,
        is_config: opt_bool(body, "is_config")?,
        license_type: opt_str(body, "license_type")?,
        enterprise_project_id: opt_str(body, "enterprise_project_id")?,
        quick: false,
    })
}

fn need_url(req: &ImportRequest) -> ApiResult<()> {
    if req.image_url.is_empty() {
        return Err(ApiError::bad_request(
            "IMG.0017",
            "The URL format is incorrect: image_url (bucket:object) is required.",
        ));
    }
    Ok(())
}

async fn create_image(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    if body.get("image_url").is_none_or(Value::is_null) {
        let source = ["instance_id", "volume_id", "data_images"]
            .into_iter()
            .find(|k| body.get(*k).is_some_and(|v| !v.is_null()));
        return Err(match source {
            Some(k) => ApiError::bad_request(
                "IMG.9002",
                format!(
                    "Creating an image from {k} needs a compute service, which this deployment does not provide; \
                     import an image file with image_url instead."
                ),
            ),
            None => ApiError::bad_request(
                "IMG.0017",
                "The URL format is incorrect: image_url (bucket:object) is required.",
            ),
        });
    }
    let mut req = import_request(&body)?;
    req.quick = opt_bool(&body, "is_quick_import")?;
    need_url(&req)?;
    if let Some(data) = data_disk_files(&body)? {
        let job = st.svc.import_disk_set(&c, req, data, false).await?;
        return Ok(Json(json!({"job_id": job})));
    }
    let job = st
        .svc
        .import_image(&c, ImportKind::System, None, req)
        .await?;
    Ok(Json(json!({"job_id": job})))
}

/// `data_images[]` of files (`name`, `image_url`, `min_disk`, `description`, `tags`), or
/// `None` when absent. An entry with `volume_id` needs a block-storage service.
fn data_disk_files(body: &Value) -> ApiResult<Option<Vec<DataDiskFile>>> {
    let list = match body.get("data_images") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(l)) => l,
        Some(_) => return Err(bad("data_images must be a list")),
    };
    let mut out = Vec::with_capacity(list.len());
    for d in list {
        if !d.is_object() {
            return Err(bad("every entry of data_images must be an object"));
        }
        if d.get("volume_id").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request(
                "IMG.9002",
                "A data disk from volume_id needs a block-storage service, which this deployment does not provide; \
                 give image_url (bucket:object) instead.",
            ));
        }
        let image_url = opt_str(d, "image_url")?.unwrap_or_default();
        if image_url.is_empty() {
            return Err(ApiError::bad_request(
                "IMG.0017",
                "The URL format is incorrect: every entry of data_images needs image_url (bucket:object).",
            ));
        }
        out.push(DataDiskFile {
            name: opt_str(d, "name")?,
            description: opt_str(d, "description")?,
            image_url,
            min_disk: opt_int(d, "min_disk")?,
            tags: parse_tags(d)?,
        });
    }
    Ok(Some(out))
}

/// `create_whole_image` from files (our extension, docs/import-export.md): `image_url` and
/// `min_disk` of the system disk plus `data_images[]` of files. `instance_id` / `backup_id`
/// need compute and backup services this deployment does not have.
async fn create_whole_image(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    if body.get("image_url").is_none_or(Value::is_null) {
        let source = ["instance_id", "backup_id"]
            .into_iter()
            .find(|k| body.get(*k).is_some_and(|v| !v.is_null()));
        return Err(match source {
            Some(k) => ApiError::bad_request(
                "IMG.9002",
                format!(
                    "Creating a full-ECS image from {k} needs a compute or backup service, which this deployment does not provide; \
                     import disk files with image_url and data_images instead."
                ),
            ),
            None => ApiError::bad_request(
                "IMG.0017",
                "The URL format is incorrect: image_url (bucket:object) of the system disk is required.",
            ),
        });
    }
    let req = import_request(&body)?;
    need_url(&req)?;
    let data = data_disk_files(&body)?.unwrap_or_default();
    let job = st.svc.import_disk_set(&c, req, data, true).await?;
    Ok(Json(json!({"job_id": job})))
}

async fn create_data_image(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let req = import_request(&body)?;
    need_url(&req)?;
    let job = st.svc.import_image(&c, ImportKind::Data, None, req).await?;
    Ok(Json(json!({"job_id": job})))
}

async fn quick_import(
    State(st): State<AppState>,
    Auth(c): Auth,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let mut req = import_request(&body)?;
    req.quick = true;
    need_url(&req)?;
    let kind = if req.image_type.as_deref() == Some("DataImage") {
        ImportKind::Data
    } else {
        ImportKind::System
    };
    let job = st.svc.import_image(&c, kind, None, req).await?;
    Ok(Json(json!({"job_id": job})))
}

async fn register_image(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let req = ImportRequest {
        image_url: opt_str(&body, "image_url")?.unwrap_or_default(),
        ..ImportRequest::default()
    };
    need_url(&req)?;
    let job = st
        .svc
        .import_image(&c, ImportKind::Register, Some(&id), req)
        .await?;
    Ok(Json(json!({"job_id": job})))
}

async fn export_image(
    State(st): State<AppState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let bucket_url = match opt_str(&body, "bucket_url")? {
        Some(u) if !u.is_empty() => u,
        _ => {
            return Err(ApiError::bad_request(
                "IMG.0068",
                "The specified bucket name is empty: bucket_url (bucket:object) is required.",
            ))
        }
    };
    let req = ExportRequest {
        bucket_url,
        file_format: opt_str(&body, "file_format")?.filter(|f| !f.is_empty()),
        is_quick_export: opt_bool(&body, "is_quick_export")?,
    };
    let job = st.svc.export_image(&c, &id, req).await?;
    Ok(Json(json!({"job_id": job})))
}
