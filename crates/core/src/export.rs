//! Export of an image to a bucket object (spec A.2, C.4): `file_format` qcow2, vhd or vmdk
//! (streamOptimized), or a quick export (`is_quick_export`) that writes the raw disk plus its
//! allocation bitmap as `<object>.bitmap` (the pair a quick import takes back).
//!
//! The request is checked at once (what may be exported, the format, the size limit, the
//! object name, bucket access, an existing object, one export per image at a time) and an
//! async job streams chunk store -> format writer -> multipart upload: the leading bytes of
//! the output the writer patches at the end (headers and allocation tables; at least
//! [`MIN_HEADER_WINDOW`]) are held in memory and become part 1; the body is cut into parts as it
//! is written. The object appears atomically when the upload completes, only if the key is
//! still free (IMG.0070); a failed job aborts the upload and leaves nothing behind.

use crate::buckets::{
    validate_bucket_name, validate_object_key, Action, CompletePart, ObjectAttrs, UploadedPart,
};
use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::image::ImageStatus;
use crate::import::{parse_file_url, BITMAP_SUFFIX};
use crate::jobs::{insert_job, Job, JobType, NewJob, Progress};
use crate::objects::{PartTag, PartWriter};
use crate::Service;
use openims_format::write::{write_image, OutputFormat, WriteOptions};
use openims_format::ImageSink;
use openims_store::ManifestId;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Smallest leading part of an export held in memory so the writer can patch it (part 1);
/// the writer's headers and allocation tables make it larger for large disks. S3 parts other
/// than the last must be at least 5 MiB.
pub const MIN_HEADER_WINDOW: u64 = 8 << 20;
/// Size of the body parts of an export.
pub const EXPORT_PART_SIZE: u64 = 64 << 20;
/// Largest image a quick export takes (spec C.4: < 1 TB).
pub const MAX_QUICK_EXPORT: u64 = 1 << 40;
/// Longest object name of an export, in bytes.
pub const MAX_EXPORT_NAME: usize = 1024;
/// Least time between two progress-only heartbeats.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// An export request.
#[derive(Debug, Clone, Default)]
pub struct ExportRequest {
    /// `bucket:object`.
    pub bucket_url: String,
    pub file_format: Option<String>,
    pub is_quick_export: bool,
}

/// Checks an export object name (IMG.0073-0075, IMG.0175).
fn validate_export_name(key: &str) -> Result<()> {
    if key.is_empty() || key.ends_with('/') {
        return Err(CoreError::ExportFileNameEmpty);
    }
    if key.len() > MAX_EXPORT_NAME {
        return Err(CoreError::ExportFileNameTooLong(MAX_EXPORT_NAME));
    }
    if key.contains(' ') {
        return Err(CoreError::ExportFileNameSpaces(key.into()));
    }
    if key
        .chars()
        .any(|c| c.is_control() || matches!(c, '\\' | '"' | '<' | '>' | '|' | '*' | '?'))
    {
        return Err(CoreError::InvalidObjectKey(format!(
            "the file name {key:?} contains characters that are not allowed (control characters, \\ \" < > | * ?)"
        )));
    }
    validate_object_key(key)
}

impl Service {
    /// Checks an export request and queues its job (spec A.2, C.4). Returns the job id.
    pub async fn export_image(
        &self,
        caller: &Caller,
        id: &str,
        req: ExportRequest,
    ) -> Result<crate::ids::JobId> {
        let img = self.own_image(caller, id).await?;
        if img.visibility == "public" || img.prop("__imagetype") == Some("gold") {
            return Err(CoreError::PublicImageExport);
        }
        if img.is_whole() {
            return Err(CoreError::WholeImageExport);
        }
        if img.is_iso() {
            return Err(CoreError::IsoImage);
        }
        if img.status != ImageStatus::Active {
            return Err(CoreError::ImageNotActive(img.status.as_str().into()));
        }
        let format = match (req.is_quick_export, req.file_format.as_deref()) {
            (true, None) => OutputFormat::RawWithBitmap,
            (true, Some(_)) => {
                return Err(CoreError::InvalidRequest(
                    "file_format cannot be specified for a quick export (it writes the raw disk and its allocation bitmap)"
                        .into(),
                ))
            }
            (false, None) => {
                return Err(CoreError::UnsupportedFormat(
                    "file_format is required: qcow2, vhd or vmdk".into(),
                ))
            }
            (false, Some(f)) => match f.to_ascii_lowercase().as_str() {
                "qcow2" => OutputFormat::Qcow2,
                "vhd" => OutputFormat::Vhd,
                "vmdk" => OutputFormat::VmdkStream,
                "zvhd" | "zvhd2" => {
                    return Err(CoreError::UnsupportedFormat(format!(
                        "{f} has no public specification, so OpenIMS cannot write it; export as qcow2, vhd or vmdk, \
                         or use is_quick_export for the raw disk with its allocation bitmap"
                    )))
                }
                _ => {
                    return Err(CoreError::UnsupportedFormat(format!(
                        "{f:?} is not one of qcow2, vhd, vmdk"
                    )))
                }
            },
        };
        let size = img.virtual_size.unwrap_or(0).max(0) as u64;
        if req.is_quick_export {
            if size >= MAX_QUICK_EXPORT {
                return Err(CoreError::ExportTooLarge(MAX_QUICK_EXPORT >> 30));
            }
        } else if size > self.config.max_image_size {
            return Err(CoreError::ExportTooLarge(self.config.max_image_size >> 30));
        }
        let manifest = img
            .disk_manifest
            .clone()
            .ok_or_else(|| CoreError::ImageNotActive("the image has no data".into()))?;
        // An encrypted image is exported decrypted, by whoever may use its key (IMG.0101-0103).
        let dek = self.image_dek(caller, &img).await?;
        if dek.is_some() && req.is_quick_export {
            return Err(CoreError::ExportRefused(
                "an encrypted image cannot be exported quickly; replicate it without cmk_id first, or export it as qcow2, vhd or vmdk"
                    .into(),
            ));
        }
        let (bucket, key) = match req.bucket_url.split_once(':') {
            Some((b, "")) if !b.is_empty() => return Err(CoreError::ExportFileNameEmpty),
            _ => parse_file_url(&req.bucket_url)?,
        };
        validate_bucket_name(&bucket)?;
        validate_export_name(&key)?;
        let objects = self.buckets();
        let mut keys = vec![key.clone()];
        if req.is_quick_export {
            keys.push(format!("{key}{BITMAP_SUFFIX}"));
        }
        for k in &keys {
            objects
                .authorize(&caller.project_id, &bucket, Action::PutObject, Some(k))
                .await?;
            if objects.find_object(&bucket, k).await?.is_some() {
                return Err(CoreError::ObjectExists(format!("{bucket}:{k}")));
            }
        }
        let busy: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE job_type = $1 AND image_id = $2 AND status IN ('INIT', 'RUNNING')",
        )
        .bind(JobType::NativeExport.as_str())
        .bind(img.id.to_string())
        .fetch_one(&self.db.pool)
        .await?;
        if busy > 0 {
            return Err(CoreError::ExportInProgress);
        }
        let digest = img
            .prop("__disk_digest")
            .map(str::to_string)
            .or_else(|| dek.is_none().then(|| format!("blake3-manifest:{manifest}")));
        let fmt_name = match format {
            OutputFormat::Qcow2 => "qcow2",
            OutputFormat::Vhd => "vhd",
            OutputFormat::VmdkStream => "vmdk",
            _ => "raw+bitmap",
        };
        let params = json!({
            "image_id": img.id.to_string(),
            "manifest": manifest,
            "bucket": bucket,
            "key": key,
            "format": fmt_name,
            "dek": match &dek { Some(d) => Some(self.root_wrap(d)?), None => None },
            "disk_digest": digest,
            "virtual_size": size,
        });
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let job_id = insert_job(
            &mut tx,
            NewJob {
                project_id: &caller.project_id,
                job_type: JobType::NativeExport,
                params,
                image_id: Some(img.id.to_string()),
                image_name: img.name.clone(),
            },
        )
        .await?;
        if !crate::jobs::pin_job_source(&mut tx, &job_id, &img.id).await? {
            return Err(CoreError::ImageNotFound(img.id.to_string()));
        }
        tx.commit().await?;
        self.job_ready.notify_one();
        Ok(job_id)
    }

    /// Runs an export job (see the module docs).
    pub(crate) async fn run_export(&self, job: &Job) -> Result<Option<Value>> {
        let p = &job.params;
        let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let (bucket, key) = (s("bucket"), s("key"));
        let format = OutputFormat::parse(&s("format"))
            .ok_or_else(|| CoreError::Internal("export job without a format".into()))?;
        let manifest: ManifestId = s("manifest")
            .parse()
            .map_err(|_| CoreError::Internal("export job with a bad manifest".into()))?;
        let dek = match p.get("dek").and_then(Value::as_str) {
            Some(w) => Some(self.root_unwrap(w)?),
            None => None,
        };
        let objects = self.buckets();
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("openims-image-id".to_string(), s("image_id"));
        meta.insert("openims-format".to_string(), s("format"));
        if let Some(d) = p.get("disk_digest").and_then(Value::as_str) {
            meta.insert("openims-disk-digest".to_string(), d.to_string());
        }
        let attrs = ObjectAttrs {
            content_type: Some("application/octet-stream".into()),
            metadata: meta,
        };
        if objects.find_object(&bucket, &key).await?.is_some() {
            return Err(CoreError::ObjectExists(format!("{bucket}:{key}")));
        }
        // A run of this job on a node that died left its multipart upload behind: abort it,
        // so its parts do not linger (the export starts over in a new upload).
        if let Some(old) = job
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("export_upload"))
            .and_then(Value::as_str)
        {
            if let Err(e) = objects
                .abort_upload(&job.project_id, &bucket, &key, old)
                .await
            {
                tracing::debug!(error = %e, upload_id = old, "previous export upload already gone");
            }
        }
        let upload = objects
            .create_upload(&job.project_id, &bucket, &key, &attrs)
            .await?;
        if !self
            .beat(
                &job.id,
                &Progress {
                    current_task: "exporting".into(),
                    percent: 0.0,
                    bytes_done: 0,
                    bytes_total: 0,
                    checkpoint: Some(json!({ "export_upload": upload.upload_id })),
                },
            )
            .await?
        {
            let _ = objects
                .abort_upload(&job.project_id, &bucket, &key, &upload.upload_id)
                .await;
            return Err(CoreError::Internal("the job's lease was lost".into()));
        }
        let mut sink = UploadSink {
            objects: objects.clone(),
            upload_id: upload.upload_id.clone(),
            head: Vec::new(),
            body: None,
            body_start: MIN_HEADER_WINDOW,
            position: 0,
            parts: Vec::new(),
            handle: tokio::runtime::Handle::current(),
            failed: None,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, u64)>(8);
        let abort = Arc::new(AtomicBool::new(false));
        let abort_w = abort.clone();
        let store = self.data.store.clone();
        let task = tokio::task::spawn_blocking(move || -> Result<(UploadSink, Option<Vec<u8>>)> {
            let mut disk = store.open_disk_with(&manifest, dek)?;
            let vsize = openims_format::VirtualDisk::virtual_size(&disk);
            let opts = WriteOptions {
                vmdk_extent_name: "disk.vmdk".into(),
                ..WriteOptions::default()
            };
            let mut lost = false;
            let report = write_image(&mut disk, format, &opts, &mut sink, &mut |done| {
                if abort_w.load(Ordering::Relaxed) {
                    lost = true;
                }
                let _ = tx.try_send((done, vsize));
            });
            if let Some(e) = sink.failed.take() {
                return Err(e);
            }
            let report = report?;
            if lost {
                return Err(CoreError::Internal("the job's lease was lost".into()));
            }
            sink.close()?;
            Ok((sink, report.bitmap))
        });
        let mut last: Option<Instant> = None;
        while let Some((done, total)) = rx.recv().await {
            if last.is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY) {
                continue;
            }
            last = Some(Instant::now());
            let alive = self
                .beat(&job.id, &Progress::of_bytes("exporting", done, total, None))
                .await?;
            if !alive {
                abort.store(true, Ordering::Relaxed);
            }
        }
        let outcome = task
            .await
            .map_err(|e| CoreError::Internal(format!("export task failed: {e}")))?;
        let (sink, bitmap) = match outcome {
            Ok(v) => v,
            Err(e) => {
                let _ = objects
                    .abort_upload(&job.project_id, &bucket, &key, &upload.upload_id)
                    .await;
                return Err(e);
            }
        };
        if let Some(bm) = bitmap {
            // The bitmap first: the raw object appearing means the pair is complete.
            let bkey = format!("{key}{BITMAP_SUFFIX}");
            let mut w = objects
                .object_writer(&job.project_id, &bucket, &bkey, &attrs, true, 0)
                .await?;
            let (w, r) = tokio::task::spawn_blocking(move || {
                let r = w.append(&bm);
                (w, r)
            })
            .await
            .map_err(|e| CoreError::Internal(format!("bitmap task failed: {e}")))?;
            if let Err(e) = r {
                let _ = w.abort().await;
                let _ = objects
                    .abort_upload(&job.project_id, &bucket, &key, &upload.upload_id)
                    .await;
                return Err(e);
            }
            if let Err(e) = w.finish().await {
                let _ = objects
                    .abort_upload(&job.project_id, &bucket, &key, &upload.upload_id)
                    .await;
                return Err(e);
            }
        }
        let mut parts = sink.parts.clone();
        parts.sort_by_key(|p| p.part_number);
        let wanted: Vec<CompletePart> = parts
            .iter()
            .map(|p| CompletePart {
                part_number: p.part_number,
                etag: Some(p.etag.clone()),
            })
            .collect();
        match objects
            .complete_upload(
                &job.project_id,
                &bucket,
                &key,
                &upload.upload_id,
                &wanted,
                true,
            )
            .await
        {
            Ok(info) => {
                tracing::info!(job_id = %job.id, bucket, key, size = info.size, "image exported");
                Ok(None)
            }
            Err(e) => {
                let _ = objects
                    .abort_upload(&job.project_id, &bucket, &key, &upload.upload_id)
                    .await;
                Err(e)
            }
        }
    }
}

/// An [`ImageSink`] into a multipart upload: the header window in memory (part 1, written at
/// the end), the body cut into [`EXPORT_PART_SIZE`] parts (2, 3, ...) as it is written.
/// Blocking: used from a blocking thread.
struct UploadSink {
    objects: crate::buckets::BucketObjects,
    upload_id: String,
    head: Vec<u8>,
    body: Option<PartWriter>,
    body_start: u64,
    position: u64,
    parts: Vec<UploadedPart>,
    handle: tokio::runtime::Handle,
    failed: Option<CoreError>,
}

impl UploadSink {
    fn record(&mut self, number: u32, part: crate::buckets::StoredPart) -> Result<()> {
        let objects = self.objects.clone();
        let id = self.upload_id.clone();
        let recorded = self
            .handle
            .block_on(async move { objects.record_part(&id, number, &part).await })?;
        self.parts.push(recorded);
        Ok(())
    }

    fn close_body_part(&mut self) -> Result<()> {
        if let Some(w) = self.body.take() {
            let part = w.finish()?;
            let number = self.parts.len() as u32 + 2;
            self.record(number, part)?;
        }
        Ok(())
    }

    fn append_body(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let store = Arc::clone(self.objects.store());
            let w = self.body.get_or_insert_with(|| {
                PartWriter::tagged(store, EXPORT_PART_SIZE, PartTag::ContentId)
            });
            let room = (EXPORT_PART_SIZE - w.size()) as usize;
            let n = room.min(data.len());
            w.append(&data[..n])?;
            data = &data[n..];
            if w.size() == EXPORT_PART_SIZE {
                self.close_body_part()?;
            }
        }
        Ok(())
    }

    /// Stores the last body part and the header part.
    fn close(&mut self) -> Result<()> {
        self.close_body_part()?;
        let mut w = PartWriter::tagged(
            Arc::clone(self.objects.store()),
            self.body_start,
            PartTag::ContentId,
        );
        w.append(&self.head)?;
        let part = w.finish()?;
        self.record(1, part)?;
        self.head = Vec::new();
        Ok(())
    }

    fn io<T>(&mut self, r: Result<T>) -> std::io::Result<T> {
        r.map_err(|e| {
            let msg = e.to_string();
            self.failed.get_or_insert(e);
            std::io::Error::other(msg)
        })
    }
}

impl ImageSink for UploadSink {
    fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        if self.position < self.body_start {
            let n = ((self.body_start - self.position) as usize).min(buf.len());
            self.head.extend_from_slice(&buf[..n]);
            self.position += n as u64;
            buf = &buf[n..];
        }
        if !buf.is_empty() {
            let r = self.append_body(buf);
            self.io(r)?;
            self.position += buf.len() as u64;
        }
        Ok(())
    }

    fn patch(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.head.len() as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "patch outside the header window",
            ));
        }
        self.head[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn header_window(&self) -> u64 {
        self.body_start
    }

    /// Held in memory: only what the writer patches (at least the S3 part minimum).
    fn reserve_header(&mut self, len: u64) -> std::io::Result<()> {
        if self.position != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the header window is set before the first write",
            ));
        }
        self.body_start = len.max(MIN_HEADER_WINDOW).next_multiple_of(1 << 20);
        Ok(())
    }

    fn position(&self) -> u64 {
        self.position
    }
}
