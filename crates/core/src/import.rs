//! Images from bucket objects (spec A.1, C.5): `create_image` with `image_url` (system disk or
//! ISO), `create_data_image`, `import_image_quick` (raw, optionally with the allocation bitmap
//! our quick export writes next to it) and `register_image` (data for an image made by
//! `POST /v2/images`).
//!
//! The request is checked at once (names, sizes, OS version, key, bucket access, the object's
//! existence, the ISO rule) and an async job is queued; the image row exists from then on in
//! `saving`, owned by the job through an upload token. The job:
//! 1. opens the object as of the request (its version and ETag are in the job) and refuses an
//!    object that changed since;
//! 2. inspects it: the safety verdict comes first, nothing reads through a hostile file;
//! 3. opens it with the format reader, checks `min_disk` against the virtual size (IMG.0055);
//! 4. streams the virtual disk into the chunk store (progress and ETA in the job);
//! 5. for a `cmk_id`, re-encrypts the stored disk under a fresh data key wrapped by that key
//!    (the same store path the encrypting in-region copy uses);
//! 6. checks again that the object did not change, then marks the image `active` in one
//!    conditional update (with its key row) that succeeds only while the job still owns it.
//!
//! A failed job leaves the image `killed` (deletable); nothing becomes `active`.

use crate::data::{open_checked, DeclaredFormat};
use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::image::{validate_description, validate_ims_name, validate_tag, Image, ImageStatus};
use crate::jobs::{insert_job, Job, JobType, NewJob, Progress};
use crate::kms::KeyRole;
use crate::objects::ObjectReader;
use crate::Service;
use openims_format::write::AllocationBitmap;
use openims_format::{DiskFormat, ReadAt};
use openims_store::{Dek, ManifestId};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest file a standard import takes (spec C.5: 128 GB).
pub const MAX_IMPORT_FILE: u64 = 128 << 30;
/// Largest file a quick import takes (spec C.5: 1 TB).
pub const MAX_QUICK_IMPORT_FILE: u64 = 1 << 40;
/// Import jobs a project may have queued or running at once (IMG.0194).
pub const MAX_CONCURRENT_IMPORTS: u64 = 40;
/// Suffix of the allocation-bitmap object that accompanies a quick-export raw file.
pub const BITMAP_SUFFIX: &str = ".bitmap";
/// Least time between two progress-only heartbeats.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// Which import operation a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportKind {
    /// `create_image` with `image_url`, or quick import of a system disk.
    System,
    /// `create_data_image`, or quick import with `type` DataImage.
    Data,
    /// `register_image` on an existing queued image.
    Register,
}

/// An import request, as the API parsed it.
#[derive(Debug, Clone, Default)]
pub struct ImportRequest {
    pub name: Option<String>,
    pub description: Option<String>,
    /// `bucket:object`.
    pub image_url: String,
    pub min_disk: Option<i64>,
    pub min_ram: Option<i64>,
    pub max_ram: Option<i64>,
    pub os_version: Option<String>,
    /// Data disks: `Linux` (default) or `Windows`.
    pub os_type: Option<String>,
    /// `ECS`/`FusionCompute`, `BMS`/`Ironic`, `IsoImage`, `DataImage`.
    pub image_type: Option<String>,
    pub architecture: Option<String>,
    pub hw_firmware_type: Option<String>,
    pub tags: Vec<(String, String)>,
    pub cmk_id: Option<String>,
    pub is_config: bool,
    pub license_type: Option<String>,
    pub enterprise_project_id: Option<String>,
    /// `import_image_quick`: raw only (with an optional allocation bitmap), up to 1 TB.
    pub quick: bool,
}

/// Splits `bucket:object` (the first colon separates them; keys may contain colons).
pub fn parse_file_url(url: &str) -> Result<(String, String)> {
    let Some((bucket, key)) = url.split_once(':') else {
        return Err(CoreError::BadFileUrl(format!(
            "{url:?} is not of the form bucket:object"
        )));
    };
    if bucket.is_empty() {
        return Err(CoreError::BucketNameEmpty);
    }
    if key.is_empty() {
        return Err(CoreError::BadFileUrl(format!("{url:?} names no object")));
    }
    Ok((bucket.to_string(), key.to_string()))
}

/// Whether the bytes at 32769 of the object say "CD001" (an ISO 9660 volume descriptor).
fn looks_like_iso(r: &ObjectReader) -> bool {
    let mut b = [0u8; 5];
    matches!(r.read_range(&mut b, 0x8001), Ok(5)) && &b == b"CD001"
}

/// A raw file seen through the allocation bitmap of a quick export: clear bits are holes
/// (read as zeros, never fetched), so only the allocated ranges are read and stored.
struct BitmapReadAt {
    inner: Arc<ObjectReader>,
    bitmap: AllocationBitmap,
}

impl ReadAt for BitmapReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.inner.len())
    }
    fn allocated_ranges(&self, offset: u64, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        let g = self.bitmap.granularity();
        let end = (offset + len).min(self.inner.len());
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut i = offset / g;
        while i * g < end {
            if self.bitmap.get(i) {
                let s = (i * g).max(offset);
                let e = ((i + 1) * g).min(end);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == s => last.1 += e - s,
                    _ => out.push((s, e - s)),
                }
            }
            i += 1;
        }
        Ok(Some(out))
    }
}

/// Progress from the blocking ingest to the job loop.
struct Update {
    task: &'static str,
    done: u64,
    total: u64,
    /// A checkpoint to persist (never dropped, unlike progress-only updates).
    checkpoint: Option<Value>,
}

impl Service {
    /// Checks an import request and queues its job (spec A.1). Returns the job id.
    pub async fn import_image(
        &self,
        caller: &Caller,
        kind: ImportKind,
        register_id: Option<&str>,
        req: ImportRequest,
    ) -> Result<crate::ids::JobId> {
        // ---- the request's own fields ----
        let data = kind == ImportKind::Data
            || req.image_type.as_deref() == Some("DataImage") && kind != ImportKind::Register;
        let kind = if data { ImportKind::Data } else { kind };
        if kind != ImportKind::Register {
            match &req.name {
                Some(n) => validate_ims_name(n)?,
                None => return Err(CoreError::NameMissing),
            }
        }
        if let Some(d) = &req.description {
            validate_description(d)?;
        }
        for (k, v) in &req.tags {
            validate_tag(k, v)?;
        }
        if req.tags.len() > self.config.tag_quota {
            return Err(CoreError::TagQuotaExceeded(self.config.tag_quota));
        }
        let env = match (kind, req.image_type.as_deref()) {
            (ImportKind::Data, _) => "DataImage",
            (_, None | Some("ECS") | Some("FusionCompute")) => "FusionCompute",
            (_, Some("BMS") | Some("Ironic")) => "Ironic",
            (_, Some("IsoImage")) if !req.quick => "IsoImage",
            (_, Some(other)) => {
                return Err(CoreError::InvalidRequest(format!(
                "type {other:?} is not one of ECS, FusionCompute, BMS, Ironic, IsoImage, DataImage"
            )))
            }
        };
        if env == "Ironic" && req.cmk_id.as_deref().is_some_and(|k| !k.trim().is_empty()) {
            return Err(CoreError::BmsNoEncryption);
        }
        if let Some(f) = &req.hw_firmware_type {
            if !matches!(f.as_str(), "bios" | "uefi") {
                return Err(CoreError::InvalidFirmware);
            }
        }
        if let Some(a) = &req.architecture {
            if !matches!(a.to_ascii_lowercase().as_str(), "x86" | "arm") {
                return Err(CoreError::InvalidArchitecture);
            }
        }
        let os_type = match (kind, req.os_type.as_deref()) {
            (ImportKind::Data, None | Some("Linux")) => Some("Linux"),
            (ImportKind::Data, Some("Windows")) => Some("Windows"),
            (ImportKind::Data, Some(o)) => {
                return Err(CoreError::InvalidRequest(format!(
                    "os_type {o:?} is not Linux or Windows"
                )))
            }
            _ => None,
        };
        if let Some(v) = &req.os_version {
            if crate::image::find_os_version(v).is_none() {
                return Err(CoreError::InvalidOsVersion(v.clone()));
            }
        } else if req.quick && kind == ImportKind::System {
            return Err(CoreError::InvalidOsVersion(
                "os_version is required to import a system disk quickly".into(),
            ));
        }
        let windows = os_type == Some("Windows")
            || req
                .os_version
                .as_deref()
                .and_then(crate::image::find_os_version)
                .is_some_and(|o| o.os_type == "Windows");
        let min_disk = match (kind, req.min_disk) {
            (ImportKind::Register, m) => m,
            (_, None) => {
                return Err(CoreError::InvalidDiskOrMemory(
                    "min_disk is required when importing an image file".into(),
                ))
            }
            (_, Some(m)) => {
                let (lo, hi) = match (kind, req.quick, windows) {
                    (ImportKind::Data, _, _) => (1, 2048),
                    (_, true, false) => (10, 1024),
                    (_, true, true) => (20, 1024),
                    _ => (1, 1024),
                };
                if !(lo..=hi).contains(&m) {
                    return Err(CoreError::InvalidDiskOrMemory(format!(
                        "min_disk {m} GB is outside {lo}-{hi}"
                    )));
                }
                Some(m)
            }
        };
        for (n, v) in [("min_ram", req.min_ram), ("max_ram", req.max_ram)] {
            if v.is_some_and(|v| v < 0) {
                return Err(CoreError::InvalidDiskOrMemory(format!(
                    "{n} must be a non-negative integer"
                )));
            }
        }

        // ---- the object ----
        let (bucket, key) = parse_file_url(&req.image_url)?;
        crate::buckets::validate_bucket_name(&bucket)?;
        let reader = self
            .buckets()
            .open_object_reader(&caller.project_id, &bucket, &key)
            .await?;
        if reader.is_empty() {
            return Err(CoreError::InvalidImageFile(format!(
                "the image file {bucket}:{key} is empty"
            )));
        }
        let limit = if req.quick {
            MAX_QUICK_IMPORT_FILE
        } else {
            MAX_IMPORT_FILE
        };
        if reader.len() > limit {
            return Err(CoreError::ImageTooLarge(limit));
        }
        let iso = looks_like_iso(&reader);
        if iso && (req.quick || kind == ImportKind::Data) {
            return Err(CoreError::InvalidImageFile(
                "an ISO file can only become a system-disk image (create_image with type IsoImage)"
                    .into(),
            ));
        }
        if iso && req.os_version.is_none() && kind != ImportKind::Register {
            return Err(CoreError::IsoNeedsOsVersion);
        }
        if env == "IsoImage" && !iso {
            return Err(CoreError::InvalidImageFile(format!(
                "type IsoImage needs an ISO file; {bucket}:{key} is not one"
            )));
        }
        let info = reader.info().clone();

        // ---- the key ----
        let mut key_params = json!({"image_key": null, "work_dek": null});
        if let Some(cmk) = req
            .cmk_id
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
        {
            let material = self.usable_key(caller, cmk, KeyRole::Target).await?;
            let dek = Dek::generate();
            key_params = json!({
                "image_key": {"cmk_id": cmk, "wrapped_dek": self.cmk_wrap(cmk, &material, &dek)?},
                "work_dek": self.root_wrap(&dek)?,
            });
        }

        // ---- concurrency ----
        let mut open = 0;
        for t in [
            JobType::ImportImage,
            JobType::ImportDataImage,
            JobType::NativeImport,
        ] {
            open += self.db.count_open_jobs(&caller.project_id, t).await?;
        }
        if open >= MAX_CONCURRENT_IMPORTS {
            return Err(CoreError::TooManyImports(MAX_CONCURRENT_IMPORTS));
        }

        // ---- the image row and the job, atomically ----
        let job_type = match kind {
            ImportKind::System => JobType::ImportImage,
            ImportKind::Data => JobType::ImportDataImage,
            ImportKind::Register => JobType::NativeImport,
        };
        let mut img = match register_id {
            Some(id) => {
                let img = self.own_image(caller, id).await?;
                if img.status != ImageStatus::Queued {
                    return Err(CoreError::BadTransition {
                        from: img.status.as_str().into(),
                        to: "saving".into(),
                    });
                }
                if let Some(f) = &img.disk_format {
                    // The declared format must be readable; it is checked against the file.
                    DeclaredFormat::from_disk_format(f)?;
                }
                img
            }
            None => {
                let mut img = Image::new(
                    caller.project_id.clone(),
                    req.name.clone(),
                    if iso {
                        crate::image::Origin::Iso
                    } else {
                        crate::image::Origin::File
                    },
                );
                img.container_format = Some("bare".into());
                img.disk_format = Some(if iso { "iso" } else { "raw" }.into());
                img.min_disk = min_disk.unwrap_or(0);
                img.min_ram = req.min_ram.unwrap_or(0);
                if let Some(v) = &req.os_version {
                    img.set_os_version(v)?;
                }
                let env = if iso { "IsoImage" } else { env };
                let props = &mut img.properties;
                props.insert("virtual_env_type".into(), json!(env));
                if let Some(t) = os_type {
                    props.insert("__os_type".into(), json!(t));
                }
                if let Some(d) = &req.description {
                    props.insert("__description".into(), json!(d));
                }
                hardware_properties(
                    props,
                    req.max_ram,
                    req.hw_firmware_type.as_deref(),
                    req.architecture.as_deref(),
                );
                if let Some(l) = &req.license_type {
                    props.insert("__license_type".into(), json!(l));
                }
                if let Some(e) = &req.enterprise_project_id {
                    props.insert("enterprise_project_id".into(), json!(e));
                }
                props.insert("__is_config_init".into(), json!(req.is_config.to_string()));
                props.insert("__root_origin".into(), json!("file"));
                props.insert(
                    "__data_origin".into(),
                    json!(format!("file,{bucket}:{key}")),
                );
                if req.quick {
                    props.insert("__lazyloading".into(), json!("true"));
                }
                if let Some(cmk) = key_params["image_key"]["cmk_id"].as_str() {
                    props.insert("__system__cmkid".into(), json!(cmk));
                }
                img.tags = req.tags.clone();
                img
            }
        };
        img.status = ImageStatus::Saving;
        let params = json!({
            "image_id": img.id.to_string(),
            "bucket": bucket,
            "key": key,
            "version": info.version,
            "etag": info.etag,
            "size": info.size,
            "quick": req.quick,
            "register": register_id.is_some(),
            "min_disk": min_disk,
            "image_key": key_params["image_key"],
            "work_dek": key_params["work_dek"],
        });
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let job_id = insert_job(
            &mut tx,
            NewJob {
                project_id: &caller.project_id,
                job_type,
                params,
                image_id: Some(img.id.to_string()),
                image_name: img.name.clone(),
            },
        )
        .await?;
        let token = upload_token(job_id.as_str());
        if register_id.is_some() {
            let r = sqlx::query(
                "UPDATE images SET status = 'saving', upload_token = $1, updated_at = $2 \
                 WHERE id = $3 AND status = 'queued'",
            )
            .bind(&token)
            .bind(crate::time::now_ms())
            .bind(img.id.to_string())
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() != 1 {
                return Err(CoreError::BadTransition {
                    from: "not queued".into(),
                    to: "saving".into(),
                });
            }
        } else {
            crate::image::insert_image_in(&mut tx, &img, self.config.image_quota).await?;
            sqlx::query("UPDATE images SET upload_token = $1 WHERE id = $2")
                .bind(&token)
                .bind(img.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.job_ready.notify_one();
        Ok(job_id)
    }

    /// Runs an import job (see the module docs); on failure the image becomes `killed`.
    pub(crate) async fn run_import(&self, job: &Job) -> Result<Option<Value>> {
        if job.params.get("disks").is_some_and(Value::is_array) {
            return self.run_import_set(job).await;
        }
        let token = upload_token(job.id.as_str());
        let image_id = job
            .params
            .get("image_id")
            .and_then(Value::as_str)
            .ok_or_else(|| CoreError::Internal("import job without image".into()))?
            .to_string();
        let r = sqlx::query(
            "UPDATE images SET status = 'saving', upload_token = $1, updated_at = $2 \
             WHERE id = $3 AND owner = $4 AND (status = 'queued' OR (status = 'saving' AND upload_token = $1))",
        )
        .bind(&token)
        .bind(crate::time::now_ms())
        .bind(&image_id)
        .bind(job.project_id.as_str())
        .execute(&self.db.pool)
        .await?;
        if r.rows_affected() != 1 {
            // A resumed job whose image is already active is done.
            let iid = crate::ids::ImageId::parse(&image_id)
                .ok_or_else(|| CoreError::Internal("bad image id".into()))?;
            if let Some(img) = self.db.get_image(&iid).await? {
                if img.status == ImageStatus::Active {
                    return Ok(None);
                }
            }
            return Err(CoreError::UploadInterrupted(
                "the image was deleted or changed before its data was imported".into(),
            ));
        }
        let outcome = self.import_data(job, &image_id, &token).await;
        if outcome.is_err() {
            let _ = sqlx::query(
                "UPDATE images SET status = 'killed', upload_token = NULL, updated_at = $1 \
                 WHERE id = $2 AND status = 'saving' AND upload_token = $3",
            )
            .bind(crate::time::now_ms())
            .bind(&image_id)
            .bind(&token)
            .execute(&self.db.pool)
            .await;
        }
        outcome
    }

    async fn import_data(&self, job: &Job, image_id: &str, token: &str) -> Result<Option<Value>> {
        let p = &job.params;
        let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let (bucket, key) = (s("bucket"), s("key"));
        let quick = p.get("quick").and_then(Value::as_bool).unwrap_or(false);
        let register = p.get("register").and_then(Value::as_bool).unwrap_or(false);
        let min_disk = p.get("min_disk").and_then(Value::as_i64);
        let objects = self.buckets();
        let reader = objects
            .open_object_reader(&job.project_id, &bucket, &key)
            .await?;
        let same =
            |i: &crate::buckets::ObjectInfo| i.version == s("version") && i.etag == s("etag");
        if !same(reader.info()) {
            return Err(CoreError::ObjectChanged(format!(
                "{bucket}:{key} was replaced after the import was requested"
            )));
        }
        let reader = Arc::new(reader);
        let bitmap = if quick {
            match objects
                .open_object_reader(&job.project_id, &bucket, &format!("{key}{BITMAP_SUFFIX}"))
                .await
            {
                Ok(b) => {
                    if b.len() > 64 << 20 {
                        return Err(CoreError::InvalidImageFile(
                            "the allocation bitmap is too large".into(),
                        ));
                    }
                    let mut buf = vec![0u8; b.len() as usize];
                    let n = b.read_range(&mut buf, 0)?;
                    buf.truncate(n);
                    let bm = AllocationBitmap::from_bytes(&buf).map_err(|e| {
                        CoreError::InvalidImageFile(format!(
                            "{bucket}:{key}{BITMAP_SUFFIX} is not an allocation bitmap: {e}"
                        ))
                    })?;
                    if bm.virtual_size != reader.len() {
                        return Err(CoreError::InvalidImageFile(format!(
                            "the allocation bitmap covers {} bytes, the raw file has {}",
                            bm.virtual_size,
                            reader.len()
                        )));
                    }
                    Some(bm)
                }
                Err(CoreError::NoSuchKey(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let iid = crate::ids::ImageId::parse(image_id)
            .ok_or_else(|| CoreError::Internal("bad image id".into()))?;
        let img = self
            .db
            .get_image(&iid)
            .await?
            .ok_or_else(|| CoreError::ImageNotFound(image_id.into()))?;
        let declared = match (&img.disk_format, register) {
            (Some(f), true) => Some(DeclaredFormat::from_disk_format(f)?),
            _ => None,
        };
        let work_dek = match p.get("work_dek").and_then(Value::as_str) {
            Some(w) => Some(self.root_unwrap(w)?),
            None => None,
        };

        let resume = job
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("ingest"))
            .and_then(ingest_point_of);

        // ---- blocking: inspect, open, check, ingest, encrypt ----
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Update>(8);
        let abort = Arc::new(AtomicBool::new(false));
        let store = self.data.store.clone();
        let max_virtual = self.config.max_virtual_size;
        let checkpoint_every =
            (self.config.import_checkpoint_bytes / u64::from(store.config().chunk_size)).max(1);
        let abort_w = abort.clone();
        let dek = work_dek.clone();
        let task = tokio::task::spawn_blocking(move || -> Result<Ingest> {
            let src: Arc<dyn ReadAt> = match bitmap {
                Some(bm) => Arc::new(BitmapReadAt {
                    inner: reader.clone(),
                    bitmap: bm,
                }),
                None => reader.clone(),
            };
            let _ = tx.try_send(Update {
                task: "inspecting",
                done: 0,
                total: 0,
                checkpoint: None,
            });
            let (mut disk, detected) = open_checked(src, declared, max_virtual)?;
            if quick && detected != DiskFormat::Raw {
                return Err(CoreError::InvalidImageFile(format!(
                    "quick import takes raw files (with an optional allocation bitmap); this file is {detected} \
                     (ZVHD2 has no public specification and is not supported)"
                )));
            }
            let vsize = disk.virtual_size();
            if let Some(m) = min_disk {
                if vsize > (m as u64) << 30 {
                    return Err(CoreError::InvalidDiskOrMemory(format!(
                        "min_disk {m} GB is smaller than the disk in the file ({vsize} bytes = {:.2} GiB)",
                        vsize as f64 / (1u64 << 30) as f64
                    )));
                }
            }
            let check_abort = |a: &AtomicBool| {
                if a.load(Ordering::Relaxed) {
                    Err(openims_store::StoreError::Invalid(
                        "the job's lease was lost".into(),
                    ))
                } else {
                    Ok(())
                }
            };
            // Checkpoints: a partial manifest of the finished prefix every
            // `import_checkpoint_bytes`, persisted in the job (which pins it against GC);
            // a job taken over after a crash resumes from there instead of reading it all again.
            let cp_tx = tx.clone();
            let mut save = |cp: openims_store::IngestCheckpoint| {
                cp_tx
                    .blocking_send(Update {
                        task: "importing",
                        done: cp.next_index * u64::from(store.config().chunk_size),
                        total: vsize,
                        checkpoint: Some(ingest_checkpoint_json(&cp)),
                    })
                    .map_err(|_| openims_store::StoreError::Invalid("job loop stopped".into()))?;
                check_abort(&abort_w)
            };
            // A raw file stored in whole chunks (or a qcow2 laid out like ours) is not read:
            // the ingest references the object's chunks it stores verbatim
            // (`VirtualDisk::stored_chunk`).
            let report = ingest_checkpointed(
                &store,
                disk.as_mut(),
                resume,
                (checkpoint_every, &mut save),
                &tx,
                (0, vsize),
            )?;
            if report.resumed_chunks > 0 {
                let bytes = report.resumed_chunks * u64::from(store.config().chunk_size);
                tracing::info!(
                    resumed_from_bytes = bytes,
                    "import resumed from its checkpoint"
                );
                // Shown by the job (`entities.resumed_from_bytes`); the finished manifest
                // stays pinned until the image references it.
                let _ = tx.blocking_send(Update {
                    task: "importing",
                    done: vsize,
                    total: vsize,
                    checkpoint: Some(json!({
                        "ingest": { "resumed_from_bytes": bytes },
                        "pinned_manifests": [report.manifest_id.to_string()],
                    })),
                });
            }
            let plain = report.manifest_id;
            check_abort(&abort_w)?;
            let stored = match &dek {
                Some(dek) => store.reencrypt(&plain, None, dek, None, 16, &mut |pr| {
                    check_abort(&abort_w)?;
                    let _ = tx.try_send(Update {
                        task: "encrypting",
                        done: pr.bytes_done,
                        total: vsize,
                        checkpoint: None,
                    });
                    Ok(())
                })?,
                None => plain,
            };
            Ok(Ingest {
                digest: plain,
                manifest: stored,
                virtual_size: vsize,
                format: detected,
            })
        });
        self.pump_progress(job, &mut rx, &abort).await?;
        let ing = task
            .await
            .map_err(|e| CoreError::Internal(format!("import task failed: {e}")))??;
        if abort.load(Ordering::Relaxed) {
            return Err(CoreError::Internal("the job's lease was lost".into()));
        }

        // ---- the object must still be what was read ----
        match objects.head_object(&job.project_id, &bucket, &key).await {
            Ok(i) if same(&i) => {}
            Ok(_) | Err(CoreError::NoSuchKey(_)) => {
                return Err(CoreError::ObjectChanged(format!(
                    "{bucket}:{key} was replaced or deleted during the import"
                )))
            }
            Err(e) => return Err(e),
        }

        // ---- activate ----
        let mut done = img.clone();
        let size = p.get("size").and_then(Value::as_u64).unwrap_or(0);
        done.size = Some(size as i64);
        done.virtual_size = Some(ing.virtual_size as i64);
        let etag = s("etag");
        done.checksum = (!etag.contains('-') && etag.len() == 32).then_some(etag);
        done.disk_manifest = Some(ing.manifest.to_string());
        done.file_manifest = None;
        if register {
            done.container_format = Some(done.container_format.unwrap_or_else(|| "bare".into()));
            if ing.format == DiskFormat::Iso {
                done.origin = crate::image::Origin::Iso;
                done.properties
                    .insert("virtual_env_type".into(), json!("IsoImage"));
            }
            if done
                .disk_format
                .as_deref()
                .is_none_or(|f| f != "raw" && f != "iso")
            {
                // The stored data is the virtual disk; it is served as raw bytes.
                done.disk_format = Some(
                    if ing.format == DiskFormat::Iso {
                        "iso"
                    } else {
                        "raw"
                    }
                    .into(),
                );
            }
            done.properties
                .insert("__root_origin".into(), json!("file"));
            done.properties.insert(
                "__data_origin".into(),
                json!(format!("file,{bucket}:{key}")),
            );
        }
        let props = &mut done.properties;
        props.insert("__image_size".into(), json!(size.to_string()));
        props.insert("__source_format".into(), json!(ing.format.as_str()));
        props.insert(
            "__disk_digest".into(),
            json!(format!("blake3-manifest:{}", ing.digest)),
        );
        let image_key = crate::reencrypt::job_image_key(p)?;
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let now = crate::time::now_ms();
        let r = sqlx::query(
            "UPDATE images SET status = 'active', size = $1, virtual_size = $2, checksum = $3, \
             disk_format = $4, container_format = $5, disk_manifest = $6, file_manifest = NULL, \
             properties = $7, origin = $8, updated_at = $9, active_at = $9, upload_token = NULL \
             WHERE id = $10 AND status = 'saving' AND upload_token = $11",
        )
        .bind(done.size)
        .bind(done.virtual_size)
        .bind(&done.checksum)
        .bind(&done.disk_format)
        .bind(&done.container_format)
        .bind(&done.disk_manifest)
        .bind(Value::Object(done.properties.clone()).to_string())
        .bind(done.origin.as_str())
        .bind(now)
        .bind(image_id)
        .bind(token)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Err(CoreError::UploadInterrupted(
                "the image was deleted or changed during the import".into(),
            ));
        }
        if let Some(k) = image_key {
            sqlx::query("DELETE FROM image_keys WHERE image_id = $1")
                .bind(image_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO image_keys (image_id, cmk_id, wrapped_dek, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(image_id)
            .bind(&k.cmk_id)
            .bind(&k.wrapped_dek)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::info!(image_id, bucket, key, virtual_size = ing.virtual_size, format = %ing.format, "image imported");
        Ok(None)
    }
}

/// The job checkpoint of an import: where to resume, and the partial manifest the GC must
/// keep (`pinned_manifests`, see `Db::live_manifests`).
fn ingest_checkpoint_json(cp: &openims_store::IngestCheckpoint) -> Value {
    json!({
        "ingest": ingest_point_json(cp),
        "pinned_manifests": [cp.partial.to_string()],
    })
}

/// An ingest checkpoint as the `ingest` object of a job checkpoint.
fn ingest_point_json(cp: &openims_store::IngestCheckpoint) -> Value {
    json!({ "partial": cp.partial.to_string(), "next_index": cp.next_index })
}

/// Reads what [`ingest_point_json`] wrote (`None` if unreadable: the ingest starts over).
fn ingest_point_of(v: &Value) -> Option<openims_store::IngestCheckpoint> {
    Some(openims_store::IngestCheckpoint {
        partial: v.get("partial")?.as_str()?.parse().ok()?,
        next_index: v.get("next_index")?.as_u64()?,
    })
}

/// Ingests `disk` (resuming from `from`), saving a checkpoint every `every` chunks through
/// `save`, and reports progress on `tx` as `before + bytes done` of `total` (`progress`).
fn ingest_checkpointed(
    store: &openims_store::Store,
    disk: &mut dyn openims_format::VirtualDisk,
    from: Option<openims_store::IngestCheckpoint>,
    (every, save): (
        u64,
        &mut dyn FnMut(openims_store::IngestCheckpoint) -> openims_store::Result<()>,
    ),
    tx: &tokio::sync::mpsc::Sender<Update>,
    (before, total): (u64, u64),
) -> openims_store::Result<openims_store::IngestReport> {
    store.ingest_resumable(
        disk,
        from,
        Some(openims_store::Checkpointing { every, save }),
        &mut |pr| {
            let _ = tx.try_send(Update {
                task: "importing",
                done: before + pr.bytes_done,
                total,
                checkpoint: None,
            });
        },
    )
}

/// Where a multi-disk import stands: the plaintext manifests of the disks finished (in
/// order) and the ingest checkpoint of the disk in progress. Persisted as the job checkpoint
/// `{"set": {"done": [..], "ingest": {..}, "resumed_from_bytes": n}, "pinned_manifests": [..]}`;
/// the pins keep every listed manifest (and its chunks) from the GC.
#[derive(Debug, Default)]
struct SetCheckpoint {
    done: Vec<ManifestId>,
    current: Option<openims_store::IngestCheckpoint>,
}

impl SetCheckpoint {
    /// The checkpoint a job left (an unreadable one counts as none: the import starts over).
    fn from_job(job: &Job) -> SetCheckpoint {
        let Some(set) = job.checkpoint.as_ref().and_then(|c| c.get("set")) else {
            return SetCheckpoint::default();
        };
        let done = set
            .get("done")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map_while(|m| m.as_str().and_then(|m| m.parse().ok()))
                    .collect()
            })
            .unwrap_or_default();
        let current = set.get("ingest").and_then(ingest_point_of);
        SetCheckpoint { done, current }
    }

    fn to_json(&self) -> Value {
        let mut pins: Vec<String> = self.done.iter().map(ToString::to_string).collect();
        let mut set = json!({ "done": pins.clone() });
        if let Some(c) = &self.current {
            set["ingest"] = ingest_point_json(c);
            pins.push(c.partial.to_string());
        }
        json!({ "set": set, "pinned_manifests": pins })
    }
}

/// What the blocking part of an import stored.
struct Ingest {
    /// The plaintext manifest: a content digest of the virtual disk.
    digest: ManifestId,
    /// The manifest the image references (encrypted when a key was asked for).
    manifest: ManifestId,
    virtual_size: u64,
    format: DiskFormat,
}

/// Prefix of the upload token an import job holds its images by (`import:<job id>`).
pub(crate) const UPLOAD_TOKEN_PREFIX: &str = "import:";

/// The upload token an import job holds on its image.
fn upload_token(job_id: &str) -> String {
    format!("{UPLOAD_TOKEN_PREFIX}{job_id}")
}

/// Most data-disk files one request imports with its system disk (spec A.1: at most 3 data
/// disks per file import).
pub const MAX_DATA_DISK_FILES: usize = 3;
/// Property of a whole image: its member disk images, system disk first, comma-separated.
pub const WHOLE_DISKS_PROP: &str = "__whole_image_disks";
/// Property of a member disk image: the whole image it belongs to.
pub const WHOLE_OF_PROP: &str = "__whole_image_id";

/// One data-disk file of a multi-disk import (`data_images[]` with `image_url`).
#[derive(Debug, Clone, Default)]
pub struct DataDiskFile {
    pub name: Option<String>,
    pub description: Option<String>,
    /// `bucket:object`.
    pub image_url: String,
    pub min_disk: Option<i64>,
    pub tags: Vec<(String, String)>,
}

/// A file checked at the request: where it is and what it was then.
struct CheckedFile {
    bucket: String,
    key: String,
    info: crate::buckets::ObjectInfo,
}

/// One disk of a multi-disk import job, as the job reads it back from its params.
#[derive(Debug, Clone)]
struct SetDisk {
    image_id: String,
    bucket: String,
    key: String,
    version: String,
    etag: String,
    size: u64,
    min_disk: i64,
}

/// What the blocking part of a multi-disk import stored for one disk.
struct SetIngest {
    digest: ManifestId,
    virtual_size: u64,
    format: DiskFormat,
}

impl Service {
    /// Checks one file of a multi-disk import at the request (bucket, object, size, not ISO).
    async fn check_set_file(&self, caller: &Caller, url: &str) -> Result<CheckedFile> {
        if url.is_empty() {
            return Err(CoreError::BadFileUrl(
                "image_url (bucket:object) is required for every disk".into(),
            ));
        }
        let (bucket, key) = parse_file_url(url)?;
        crate::buckets::validate_bucket_name(&bucket)?;
        let reader = self
            .buckets()
            .open_object_reader(&caller.project_id, &bucket, &key)
            .await?;
        if reader.is_empty() {
            return Err(CoreError::InvalidImageFile(format!(
                "the image file {bucket}:{key} is empty"
            )));
        }
        if reader.len() > MAX_IMPORT_FILE {
            return Err(CoreError::ImageTooLarge(MAX_IMPORT_FILE));
        }
        if looks_like_iso(&reader) {
            return Err(CoreError::InvalidImageFile(format!(
                "{bucket}:{key} is an ISO file; a multi-disk import takes disk image files only"
            )));
        }
        Ok(CheckedFile {
            bucket,
            key,
            info: reader.info().clone(),
        })
    }

    /// Imports a system disk and up to [`MAX_DATA_DISK_FILES`] data disks from bucket objects
    /// in ONE job: `create_image` with `image_url` and `data_images[]` of files (`whole` false:
    /// independent system and data images) or `create_whole_image` from files (`whole` true:
    /// additionally a full-ECS image, origin `whole`, that records its member disks).
    ///
    /// Every file is inspected before any is read through; if one is hostile, missing,
    /// changed or larger than its `min_disk`, the job fails and no image of the set becomes
    /// `active`; on success all become `active` in one transaction.
    pub async fn import_disk_set(
        &self,
        caller: &Caller,
        req: ImportRequest,
        data: Vec<DataDiskFile>,
        whole: bool,
    ) -> Result<crate::ids::JobId> {
        // ---- the request's own fields ----
        let name = match &req.name {
            Some(n) => {
                validate_ims_name(n)?;
                n.clone()
            }
            None => return Err(CoreError::NameMissing),
        };
        if let Some(d) = &req.description {
            validate_description(d)?;
        }
        for (k, v) in &req.tags {
            validate_tag(k, v)?;
        }
        if req.tags.len() > self.config.tag_quota {
            return Err(CoreError::TagQuotaExceeded(self.config.tag_quota));
        }
        if req.quick {
            return Err(CoreError::InvalidRequest(
                "a multi-disk import cannot be a quick import; import the disks one by one with import_image_quick".into(),
            ));
        }
        if req.cmk_id.as_deref().is_some_and(|k| !k.trim().is_empty()) {
            return Err(CoreError::InvalidRequest(
                "cmk_id is not supported for a multi-disk import; import the disks one by one to encrypt them".into(),
            ));
        }
        match req.image_type.as_deref() {
            None | Some("ECS") | Some("FusionCompute") => {}
            Some(other) => {
                return Err(CoreError::InvalidRequest(format!(
                    "type {other:?}: a multi-disk import makes ECS images only"
                )))
            }
        }
        if let Some(f) = &req.hw_firmware_type {
            if !matches!(f.as_str(), "bios" | "uefi") {
                return Err(CoreError::InvalidFirmware);
            }
        }
        if let Some(a) = &req.architecture {
            if !matches!(a.to_ascii_lowercase().as_str(), "x86" | "arm") {
                return Err(CoreError::InvalidArchitecture);
            }
        }
        if let Some(v) = &req.os_version {
            if crate::image::find_os_version(v).is_none() {
                return Err(CoreError::InvalidOsVersion(v.clone()));
            }
        }
        for (n, v) in [("min_ram", req.min_ram), ("max_ram", req.max_ram)] {
            if v.is_some_and(|v| v < 0) {
                return Err(CoreError::InvalidDiskOrMemory(format!(
                    "{n} must be a non-negative integer"
                )));
            }
        }
        let sys_min = match req.min_disk {
            None => {
                return Err(CoreError::InvalidDiskOrMemory(
                    "min_disk is required when importing an image file".into(),
                ))
            }
            Some(m) if !(1..=1024).contains(&m) => {
                return Err(CoreError::InvalidDiskOrMemory(format!(
                    "min_disk {m} GB is outside 1-1024"
                )))
            }
            Some(m) => m,
        };
        if data.len() > MAX_DATA_DISK_FILES {
            return Err(CoreError::InvalidRequest(format!(
                "data_images has {} entries; at most {MAX_DATA_DISK_FILES} data disks are imported with a system disk",
                data.len()
            )));
        }
        if !whole && data.is_empty() {
            return Err(CoreError::InvalidRequest(
                "data_images is empty; give at least one data disk file or leave it out".into(),
            ));
        }
        for d in &data {
            match &d.name {
                Some(n) => validate_ims_name(n)?,
                None => {
                    return Err(CoreError::InvalidRequest(
                        "every entry of data_images needs a name".into(),
                    ))
                }
            }
            if let Some(s) = &d.description {
                validate_description(s)?;
            }
            for (k, v) in &d.tags {
                validate_tag(k, v)?;
            }
            match d.min_disk {
                None => {
                    return Err(CoreError::InvalidDiskOrMemory(
                        "min_disk is required for every data disk file".into(),
                    ))
                }
                Some(m) if !(1..=2048).contains(&m) => {
                    return Err(CoreError::InvalidDiskOrMemory(format!(
                        "min_disk {m} GB of data disk is outside 1-2048"
                    )))
                }
                Some(_) => {}
            }
        }

        // ---- the objects ----
        let sys_file = self.check_set_file(caller, &req.image_url).await?;
        let mut data_files = Vec::with_capacity(data.len());
        for d in &data {
            data_files.push(self.check_set_file(caller, &d.image_url).await?);
        }

        // ---- concurrency ----
        let mut open = 0;
        for t in [
            JobType::ImportImage,
            JobType::ImportDataImage,
            JobType::NativeImport,
        ] {
            open += self.db.count_open_jobs(&caller.project_id, t).await?;
        }
        if open >= MAX_CONCURRENT_IMPORTS {
            return Err(CoreError::TooManyImports(MAX_CONCURRENT_IMPORTS));
        }

        // ---- the image rows ----
        let origin_props = |img: &mut Image, f: &CheckedFile| {
            let props = &mut img.properties;
            props.insert("__root_origin".into(), json!("file"));
            props.insert(
                "__data_origin".into(),
                json!(format!("file,{}:{}", f.bucket, f.key)),
            );
            if let Some(e) = &req.enterprise_project_id {
                props.insert("enterprise_project_id".into(), json!(e));
            }
            img.container_format = Some("bare".into());
            img.disk_format = Some("raw".into());
            img.min_ram = req.min_ram.unwrap_or(0);
            img.status = ImageStatus::Saving;
        };
        let ecs_props = |img: &mut Image| -> Result<()> {
            if let Some(v) = &req.os_version {
                img.set_os_version(v)?;
            }
            let props = &mut img.properties;
            props.insert("virtual_env_type".into(), json!("FusionCompute"));
            hardware_properties(
                props,
                req.max_ram,
                req.hw_firmware_type.as_deref(),
                req.architecture.as_deref(),
            );
            props.insert("__is_config_init".into(), json!(req.is_config.to_string()));
            Ok(())
        };
        // The system disk: named like the request (a whole image's system disk gets `-system`).
        let sys_name = if whole {
            let base: String = name.chars().take(121).collect();
            format!("{base}-system")
        } else {
            name.clone()
        };
        let mut sys = Image::new(
            caller.project_id.clone(),
            Some(sys_name),
            crate::image::Origin::File,
        );
        origin_props(&mut sys, &sys_file);
        ecs_props(&mut sys)?;
        sys.min_disk = sys_min;
        if !whole {
            if let Some(d) = &req.description {
                sys.properties.insert("__description".into(), json!(d));
            }
            sys.tags = req.tags.clone();
        }
        let mut disks = vec![sys];
        for (d, f) in data.iter().zip(&data_files) {
            let mut img = Image::new(
                caller.project_id.clone(),
                d.name.clone(),
                crate::image::Origin::File,
            );
            origin_props(&mut img, f);
            img.min_disk = d.min_disk.unwrap_or(1);
            img.properties
                .insert("virtual_env_type".into(), json!("DataImage"));
            img.properties.insert("__os_type".into(), json!("Linux"));
            if let Some(s) = &d.description {
                img.properties.insert("__description".into(), json!(s));
            }
            img.tags = d.tags.clone();
            disks.push(img);
        }
        let whole_img = if whole {
            let mut w = Image::new(
                caller.project_id.clone(),
                Some(name.clone()),
                crate::image::Origin::Whole,
            );
            origin_props(&mut w, &sys_file);
            ecs_props(&mut w)?;
            w.min_disk = sys_min;
            let ids: Vec<String> = disks.iter().map(|d| d.id.to_string()).collect();
            w.properties.insert("__whole_image".into(), json!("true"));
            w.properties
                .insert(WHOLE_DISKS_PROP.into(), json!(ids.join(",")));
            if let Some(d) = &req.description {
                w.properties.insert("__description".into(), json!(d));
            }
            w.tags = req.tags.clone();
            for d in &mut disks {
                d.properties
                    .insert(WHOLE_OF_PROP.into(), json!(w.id.to_string()));
            }
            Some(w)
        } else {
            None
        };
        let files: Vec<&CheckedFile> = std::iter::once(&sys_file).chain(&data_files).collect();
        let disk_params: Vec<Value> = disks
            .iter()
            .zip(&files)
            .map(|(img, f)| {
                json!({
                    "image_id": img.id.to_string(),
                    "bucket": f.bucket,
                    "key": f.key,
                    "version": f.info.version,
                    "etag": f.info.etag,
                    "size": f.info.size,
                    "min_disk": img.min_disk,
                })
            })
            .collect();
        let head = whole_img.as_ref().unwrap_or(&disks[0]);
        let params = json!({
            "image_id": head.id.to_string(),
            "whole_image_id": whole_img.as_ref().map(|w| w.id.to_string()),
            "disks": disk_params,
        });

        // ---- the rows and the job, atomically ----
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let job_id = insert_job(
            &mut tx,
            NewJob {
                project_id: &caller.project_id,
                job_type: JobType::ImportImage,
                params,
                image_id: Some(head.id.to_string()),
                image_name: head.name.clone(),
            },
        )
        .await?;
        let token = upload_token(job_id.as_str());
        // Every image of the set counts against the quota (checked after each insert; the
        // count only grows, so this refuses exactly when the whole set does not fit).
        for img in disks.iter().chain(whole_img.iter()) {
            crate::image::insert_image_in(&mut tx, img, self.config.image_quota).await?;
            sqlx::query("UPDATE images SET upload_token = $1 WHERE id = $2")
                .bind(&token)
                .bind(img.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.job_ready.notify_one();
        Ok(job_id)
    }

    /// Runs a multi-disk import job; on failure every image of the set becomes `killed`.
    async fn run_import_set(&self, job: &Job) -> Result<Option<Value>> {
        let token = upload_token(job.id.as_str());
        let p = &job.params;
        let mut disks = Vec::new();
        for d in p
            .get("disks")
            .and_then(Value::as_array)
            .ok_or_else(|| CoreError::Internal("import job without disks".into()))?
        {
            let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            disks.push(SetDisk {
                image_id: s("image_id"),
                bucket: s("bucket"),
                key: s("key"),
                version: s("version"),
                etag: s("etag"),
                size: d.get("size").and_then(Value::as_u64).unwrap_or(0),
                min_disk: d.get("min_disk").and_then(Value::as_i64).unwrap_or(0),
            });
        }
        let whole_id = p
            .get("whole_image_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut ids: Vec<String> = disks.iter().map(|d| d.image_id.clone()).collect();
        ids.extend(whole_id.clone());
        let mut saving = 0;
        for id in &ids {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM images WHERE id = $1 AND owner = $2 AND status = 'saving' AND upload_token = $3",
            )
            .bind(id)
            .bind(job.project_id.as_str())
            .bind(&token)
            .fetch_one(&self.db.pool)
            .await?;
            saving += n;
        }
        if saving as usize != ids.len() {
            // A resumed job whose images are already active is done.
            if let Some(iid) = ids.last().and_then(|i| crate::ids::ImageId::parse(i)) {
                if let Some(img) = self.db.get_image(&iid).await? {
                    if img.status == ImageStatus::Active && saving == 0 {
                        return Ok(None);
                    }
                }
            }
            let outcome = Err(CoreError::UploadInterrupted(
                "an image of the set was deleted or changed before its data was imported".into(),
            ));
            self.kill_set(&token).await;
            return outcome;
        }
        let outcome = self
            .import_set_data(job, &disks, whole_id.as_deref(), &token)
            .await;
        if outcome.is_err() {
            self.kill_set(&token).await;
        }
        outcome
    }

    /// Marks every image a multi-disk job still holds `killed`.
    async fn kill_set(&self, token: &str) {
        let _ = sqlx::query(
            "UPDATE images SET status = 'killed', upload_token = NULL, updated_at = $1 \
             WHERE status = 'saving' AND upload_token = $2",
        )
        .bind(crate::time::now_ms())
        .bind(token)
        .execute(&self.db.pool)
        .await;
    }

    async fn import_set_data(
        &self,
        job: &Job,
        disks: &[SetDisk],
        whole_id: Option<&str>,
        token: &str,
    ) -> Result<Option<Value>> {
        let objects = self.buckets();
        let mut readers = Vec::with_capacity(disks.len());
        for d in disks {
            let r = objects
                .open_object_reader(&job.project_id, &d.bucket, &d.key)
                .await?;
            if r.info().version != d.version || r.info().etag != d.etag {
                return Err(CoreError::ObjectChanged(format!(
                    "{}:{} was replaced after the import was requested",
                    d.bucket, d.key
                )));
            }
            readers.push(Arc::new(r));
        }

        // ---- blocking: inspect and check EVERY file, then ingest each ----
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Update>(8);
        let abort = Arc::new(AtomicBool::new(false));
        let store = self.data.store.clone();
        let max_virtual = self.config.max_virtual_size;
        let checkpoint_every =
            (self.config.import_checkpoint_bytes / u64::from(store.config().chunk_size)).max(1);
        let mut resume = SetCheckpoint::from_job(job);
        let abort_w = abort.clone();
        let meta: Vec<(String, i64)> = disks
            .iter()
            .map(|d| (format!("{}:{}", d.bucket, d.key), d.min_disk))
            .collect();
        let task = tokio::task::spawn_blocking(move || -> Result<Vec<SetIngest>> {
            let _ = tx.try_send(Update {
                task: "inspecting",
                done: 0,
                total: 0,
                checkpoint: None,
            });
            let mut opened = Vec::with_capacity(readers.len());
            for (r, (url, min_disk)) in readers.into_iter().zip(&meta) {
                let src: Arc<dyn ReadAt> = r;
                let (disk, detected) =
                    open_checked(src, None, max_virtual).map_err(|e| match e {
                        CoreError::InvalidImageFile(m) => {
                            CoreError::InvalidImageFile(format!("{url}: {m}"))
                        }
                        CoreError::UnsafeImage(m) => CoreError::UnsafeImage(format!("{url}: {m}")),
                        e => e,
                    })?;
                let vsize = disk.virtual_size();
                if vsize > (*min_disk as u64) << 30 {
                    return Err(CoreError::InvalidDiskOrMemory(format!(
                        "{url}: min_disk {min_disk} GB is smaller than the disk in the file ({vsize} bytes = {:.2} GiB)",
                        vsize as f64 / (1u64 << 30) as f64
                    )));
                }
                opened.push((disk, detected));
            }
            let total: u64 = opened.iter().map(|(d, _)| d.virtual_size()).sum();
            let lease_lost = || {
                if abort_w.load(Ordering::Relaxed) {
                    Err(openims_store::StoreError::Invalid(
                        "the job's lease was lost".into(),
                    ))
                } else {
                    Ok(())
                }
            };
            // Checkpoints, as for one disk (see `import_data`), plus the manifests of the disks
            // already finished: a job taken over after a crash skips those disks and resumes
            // the one in progress from its partial manifest.
            let mut before = 0u64;
            let mut resumed_bytes = 0u64;
            let mut done: Vec<ManifestId> = Vec::with_capacity(opened.len());
            let mut out = Vec::with_capacity(opened.len());
            for (i, (mut disk, format)) in opened.into_iter().enumerate() {
                let vsize = disk.virtual_size();
                let finished = resume
                    .done
                    .get(i)
                    .filter(|m| store.manifest(m).is_ok_and(|m| m.virtual_size() == vsize));
                let digest = match finished {
                    Some(m) => {
                        resumed_bytes += vsize;
                        *m
                    }
                    None => {
                        let from = if i == resume.done.len() {
                            resume.current.take()
                        } else {
                            None
                        };
                        let mut save = |c: openims_store::IngestCheckpoint| {
                            let cp = SetCheckpoint {
                                done: done.clone(),
                                current: Some(c),
                            };
                            tx.blocking_send(Update {
                                task: "importing",
                                done: before
                                    + cp.current.as_ref().map_or(0, |c| c.next_index)
                                        * u64::from(store.config().chunk_size),
                                total,
                                checkpoint: Some(cp.to_json()),
                            })
                            .map_err(|_| {
                                openims_store::StoreError::Invalid("job loop stopped".into())
                            })?;
                            lease_lost()
                        };
                        let report = ingest_checkpointed(
                            &store,
                            disk.as_mut(),
                            from,
                            (checkpoint_every, &mut save),
                            &tx,
                            (before, total),
                        )?;
                        resumed_bytes +=
                            report.resumed_chunks * u64::from(store.config().chunk_size);
                        report.manifest_id
                    }
                };
                lease_lost()?;
                before += vsize;
                done.push(digest);
                let cp = SetCheckpoint {
                    done: done.clone(),
                    current: None,
                };
                let mut cp_json = cp.to_json();
                if resumed_bytes > 0 {
                    cp_json["set"]["resumed_from_bytes"] = json!(resumed_bytes);
                }
                tx.blocking_send(Update {
                    task: "importing",
                    done: before,
                    total,
                    checkpoint: Some(cp_json),
                })
                .map_err(|_| CoreError::Internal("job loop stopped".into()))?;
                out.push(SetIngest {
                    digest,
                    virtual_size: vsize,
                    format,
                });
            }
            if resumed_bytes > 0 {
                tracing::info!(
                    resumed_from_bytes = resumed_bytes,
                    "disk set import resumed from its checkpoint"
                );
            }
            Ok(out)
        });
        self.pump_progress(job, &mut rx, &abort).await?;
        let ings = task
            .await
            .map_err(|e| CoreError::Internal(format!("import task failed: {e}")))??;
        if abort.load(Ordering::Relaxed) {
            return Err(CoreError::Internal("the job's lease was lost".into()));
        }

        // ---- every object must still be what was read ----
        for d in disks {
            match objects
                .head_object(&job.project_id, &d.bucket, &d.key)
                .await
            {
                Ok(i) if i.version == d.version && i.etag == d.etag => {}
                Ok(_) | Err(CoreError::NoSuchKey(_)) => {
                    return Err(CoreError::ObjectChanged(format!(
                        "{}:{} was replaced or deleted during the import",
                        d.bucket, d.key
                    )))
                }
                Err(e) => return Err(e),
            }
        }

        // ---- activate the whole set in one transaction ----
        let mut rows = Vec::with_capacity(disks.len() + 1);
        for (d, ing) in disks.iter().zip(&ings) {
            let iid = crate::ids::ImageId::parse(&d.image_id)
                .ok_or_else(|| CoreError::Internal("bad image id".into()))?;
            let mut img = self
                .db
                .get_image(&iid)
                .await?
                .ok_or_else(|| CoreError::ImageNotFound(d.image_id.clone()))?;
            img.size = Some(d.size as i64);
            img.virtual_size = Some(ing.virtual_size as i64);
            img.checksum = (!d.etag.contains('-') && d.etag.len() == 32).then(|| d.etag.clone());
            img.disk_manifest = Some(ing.digest.to_string());
            let props = &mut img.properties;
            props.insert("__image_size".into(), json!(d.size.to_string()));
            props.insert("__source_format".into(), json!(ing.format.as_str()));
            props.insert(
                "__disk_digest".into(),
                json!(format!("blake3-manifest:{}", ing.digest)),
            );
            rows.push(img);
        }
        if let Some(w) = whole_id {
            let iid = crate::ids::ImageId::parse(w)
                .ok_or_else(|| CoreError::Internal("bad image id".into()))?;
            let mut img = self
                .db
                .get_image(&iid)
                .await?
                .ok_or_else(|| CoreError::ImageNotFound(w.to_string()))?;
            // The whole image serves its system disk's data (the same stored manifest).
            let sys = &rows[0];
            img.size = Some(disks.iter().map(|d| d.size as i64).sum());
            img.virtual_size = sys.virtual_size;
            img.checksum = None;
            img.disk_manifest = sys.disk_manifest.clone();
            img.properties.insert(
                "__disk_digest".into(),
                sys.properties
                    .get("__disk_digest")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
            rows.push(img);
        }
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let now = crate::time::now_ms();
        for img in &rows {
            let r = sqlx::query(
                "UPDATE images SET status = 'active', size = $1, virtual_size = $2, checksum = $3, \
                 disk_manifest = $4, file_manifest = NULL, properties = $5, updated_at = $6, \
                 active_at = $6, upload_token = NULL \
                 WHERE id = $7 AND status = 'saving' AND upload_token = $8",
            )
            .bind(img.size)
            .bind(img.virtual_size)
            .bind(&img.checksum)
            .bind(&img.disk_manifest)
            .bind(Value::Object(img.properties.clone()).to_string())
            .bind(now)
            .bind(img.id.to_string())
            .bind(token)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() != 1 {
                return Err(CoreError::UploadInterrupted(
                    "an image of the set was deleted or changed during the import".into(),
                ));
            }
        }
        tx.commit().await?;
        tracing::info!(
            images = rows.len(),
            whole = whole_id.is_some(),
            "disk set imported"
        );
        Ok(None)
    }
}

impl Service {
    /// Relays an import task's progress to the job row (at most every [`HEARTBEAT_EVERY`]),
    /// which also renews the job's lease; when the lease is lost, sets `abort` so the task
    /// stops at its next check. Returns when the task drops its sender.
    async fn pump_progress(
        &self,
        job: &Job,
        rx: &mut tokio::sync::mpsc::Receiver<Update>,
        abort: &AtomicBool,
    ) -> Result<()> {
        let mut last: Option<Instant> = None;
        while let Some(u) = rx.recv().await {
            if u.checkpoint.is_none() && last.is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY) {
                continue;
            }
            last = Some(Instant::now());
            let alive = self
                .beat(
                    &job.id,
                    &Progress::of_bytes(u.task, u.done, u.total, u.checkpoint),
                )
                .await?;
            if !alive {
                abort.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// The hardware attributes a system-disk import records: `max_ram`, `hw_firmware_type`, and
/// `architecture` (lower-cased; `arm` also means UEFI firmware and `__support_arm`).
fn hardware_properties(
    props: &mut serde_json::Map<String, Value>,
    max_ram: Option<i64>,
    hw_firmware_type: Option<&str>,
    architecture: Option<&str>,
) {
    if let Some(m) = max_ram {
        props.insert("max_ram".into(), json!(m.to_string()));
    }
    if let Some(f) = hw_firmware_type {
        props.insert("hw_firmware_type".into(), json!(f));
    }
    if let Some(a) = architecture {
        let a = a.to_ascii_lowercase();
        if a == "arm" {
            props.insert("hw_firmware_type".into(), json!("uefi"));
            props.insert("__support_arm".into(), json!("true"));
        }
        props.insert("architecture".into(), json!(a));
    }
}
