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
//!
//! An unencrypted image exported as qcow2 or quick-exported takes a shorter way
//! ([`shared_plan`]): the object references the image's own chunks, so only the qcow2
//! metadata and the object's manifests are written and no data is read or copied. Its qcow2
//! file puts every allocated 4 MiB chunk whole at a chunk-aligned offset after the metadata
//! (zero clusters inside an allocated chunk are stored as data), and its quick-export bitmap
//! marks whole chunks (a bit set may cover zeros; a clear bit never covers data).

use crate::buckets::{
    validate_bucket_name, validate_object_key, Action, CompletePart, ObjectAttrs, UploadedPart,
    MIN_PART_SIZE,
};
use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::image::ImageStatus;
use crate::import::{parse_file_url, BITMAP_SUFFIX};
use crate::jobs::{insert_job, Job, JobType, NewJob, Progress};
use crate::objects::{PartTag, PartWriter};
use crate::Service;
use openims_format::io::StoredSlice;
use openims_format::write::{
    write_image_resumable, AllocationBitmap, OutputFormat, SlottedQcow2, WriteCheckpoint,
    WriteOptions,
};
use openims_format::ImageSink;
use openims_store::{ChunkId, Manifest, ManifestId};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
        // A run of this job on a node that died left its multipart upload behind, and, if its
        // streaming writer reached a checkpoint, where to continue: the new run continues that
        // upload from there. Otherwise the upload is aborted (its parts do not linger) and the
        // export starts over in a new one.
        let old_upload = job
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("export_upload"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let resumed = match &old_upload {
            Some(old) => match self.export_resume_point(job, &bucket, &key, old).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, upload_id = old, "export checkpoint unusable; starting over");
                    None
                }
            },
            None => None,
        };
        if let (None, Some(old)) = (&resumed, &old_upload) {
            if let Err(e) = objects
                .abort_upload(&job.project_id, &bucket, &key, old)
                .await
            {
                tracing::debug!(error = %e, upload_id = old, "previous export upload already gone");
            }
        }
        let upload_id = match &resumed {
            Some(r) => r.upload_id.clone(),
            None => {
                objects
                    .create_upload(&job.project_id, &bucket, &key, &attrs)
                    .await?
                    .upload_id
            }
        };
        let resumed_from = resumed.as_ref().map_or(0, |r| r.at.virtual_done);
        let start = match &resumed {
            Some(r) => {
                tracing::info!(job_id = %job.id, resumed_from_bytes = r.at.virtual_done, "export resumed from its checkpoint");
                let mut cp = r.checkpoint.clone();
                cp["export"]["resumed_from_bytes"] = json!(r.at.virtual_done);
                cp
            }
            None => json!({ "export_upload": upload_id }),
        };
        if !self
            .beat(
                &job.id,
                &Progress::of_bytes("exporting", resumed_from, 0, Some(start)),
            )
            .await?
        {
            if resumed.is_none() {
                let _ = objects
                    .abort_upload(&job.project_id, &bucket, &key, &upload_id)
                    .await;
            }
            return Err(CoreError::Internal("the job's lease was lost".into()));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ExportMsg>(8);
        let abort = Arc::new(AtomicBool::new(false));
        let abort_w = abort.clone();
        let store = self.data.store.clone();
        let (objects_w, upload_w) = (objects.clone(), upload_id.clone());
        let handle = tokio::runtime::Handle::current();
        let checkpoint_every = self.config.import_checkpoint_bytes.max(MIN_PART_SIZE);
        type Written = (Vec<UploadedPart>, Option<Vec<u8>>, bool);
        let task = tokio::task::spawn_blocking(move || -> Result<Written> {
            let lost = || abort_w.load(Ordering::Relaxed);
            let shared = match (&dek, &resumed) {
                (None, None) => {
                    let m = store.manifest(&manifest)?;
                    shared_plan(&store, &m, format)?.map(|plan| (m, plan))
                }
                _ => None,
            };
            let written = match shared {
                Some((m, plan)) => {
                    let mut seq = PartSequence::new(objects_w, upload_w, 1, handle);
                    let vsize = m.virtual_size();
                    let bitmap = write_shared(&store, &m, &plan, &mut seq, &mut |d| {
                        let _ = tx.try_send(ExportMsg::Progress(d, vsize));
                    })?;
                    (seq.finish()?, bitmap, true)
                }
                None => {
                    let mut disk = store.open_disk_with(&manifest, dek)?;
                    let vsize = openims_format::VirtualDisk::virtual_size(&disk);
                    let opts = WriteOptions {
                        vmdk_extent_name: "disk.vmdk".into(),
                        ..WriteOptions::default()
                    };
                    let mut body = PartSequence::new(objects_w, upload_w.clone(), 2, handle);
                    let (head, body_start, position, stored_head) = match &resumed {
                        Some(r) => {
                            body.next_number = 2 + r.parts.len() as u32;
                            body.parts = r.parts.clone();
                            let at = r.at.position;
                            (
                                r.head.clone(),
                                r.head.len() as u64,
                                at,
                                Some(r.head_manifest.clone()),
                            )
                        }
                        None => (Vec::new(), MIN_HEADER_WINDOW, 0, None),
                    };
                    let head_manifest = Arc::new(Mutex::new(stored_head));
                    let mut sink = UploadSink {
                        head,
                        body,
                        body_start,
                        position,
                        failed: None,
                        head_manifest: head_manifest.clone(),
                    };
                    // At each checkpoint (the sink sealed: every body part so far recorded,
                    // the header window stored once) the writer's state is stored and the job
                    // records where a new run continues; both stay pinned against GC.
                    let cp_store = store.clone();
                    let cp_tx = tx.clone();
                    let mut on_checkpoint = |cp: &WriteCheckpoint| -> openims_format::Result<()> {
                        let fail =
                            |e: String| openims_format::FormatError::Io(std::io::Error::other(e));
                        let head = head_manifest
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone()
                            .ok_or_else(|| fail("sealed without a stored header window".into()))?;
                        let state =
                            store_blob(&cp_store, &cp.state).map_err(|e| fail(e.to_string()))?;
                        let mut export = json!({
                            "next_unit": cp.next_unit,
                            "position": cp.position,
                            "virtual_done": cp.virtual_done,
                            "state": state,
                            "head": head,
                        });
                        if resumed_from > 0 {
                            export["resumed_from_bytes"] = json!(resumed_from);
                        }
                        let json = json!({
                            "export_upload": upload_w,
                            "export": export,
                            "pinned_manifests": [head, state],
                        });
                        cp_tx
                            .blocking_send(ExportMsg::Checkpoint(cp.virtual_done, vsize, json))
                            .map_err(|_| fail("the job loop stopped".into()))?;
                        if lost() {
                            return Err(fail("the job's lease was lost".into()));
                        }
                        Ok(())
                    };
                    let report = write_image_resumable(
                        &mut disk,
                        format,
                        &opts,
                        &mut sink,
                        &mut |d| {
                            let _ = tx.try_send(ExportMsg::Progress(d, vsize));
                        },
                        resumed.as_ref().map(|r| &r.at),
                        Some((checkpoint_every, &mut on_checkpoint)),
                    );
                    if let Some(e) = sink.failed.take() {
                        return Err(e);
                    }
                    let report = report?;
                    (sink.close()?, report.bitmap, false)
                }
            };
            if lost() {
                return Err(CoreError::Internal("the job's lease was lost".into()));
            }
            Ok(written)
        });
        let mut last: Option<Instant> = None;
        while let Some(msg) = rx.recv().await {
            let progress = match msg {
                ExportMsg::Progress(done, total) => {
                    if last.is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY) {
                        continue;
                    }
                    Progress::of_bytes("exporting", done, total, None)
                }
                ExportMsg::Checkpoint(done, total, cp) => {
                    Progress::of_bytes("exporting", done, total, Some(cp))
                }
            };
            last = Some(Instant::now());
            if !self.beat(&job.id, &progress).await? {
                abort.store(true, Ordering::Relaxed);
            }
        }
        let outcome = task
            .await
            .map_err(|e| CoreError::Internal(format!("export task failed: {e}")))?;
        let (mut parts, bitmap, shared) = match outcome {
            Ok(v) => v,
            Err(e) => {
                // A run that lost its lease leaves the upload to the node that took the job.
                if !abort.load(Ordering::Relaxed) {
                    let _ = objects
                        .abort_upload(&job.project_id, &bucket, &key, &upload_id)
                        .await;
                }
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
                    .abort_upload(&job.project_id, &bucket, &key, &upload_id)
                    .await;
                return Err(e);
            }
            if let Err(e) = w.finish().await {
                let _ = objects
                    .abort_upload(&job.project_id, &bucket, &key, &upload_id)
                    .await;
                return Err(e);
            }
        }
        parts.sort_by_key(|p| p.part_number);
        let wanted: Vec<CompletePart> = parts
            .iter()
            .map(|p| CompletePart {
                part_number: p.part_number,
                etag: Some(p.etag.clone()),
            })
            .collect();
        match objects
            .complete_upload(&job.project_id, &bucket, &key, &upload_id, &wanted, true)
            .await
        {
            Ok(info) => {
                tracing::info!(job_id = %job.id, bucket, key, size = info.size, shared_chunks = shared, "image exported");
                Ok(None)
            }
            Err(e) => {
                let _ = objects
                    .abort_upload(&job.project_id, &bucket, &key, &upload_id)
                    .await;
                Err(e)
            }
        }
    }
}

/// What the blocking side of an export tells the job loop.
enum ExportMsg {
    /// Virtual bytes done of the total (a heartbeat, at most every [`HEARTBEAT_EVERY`]).
    Progress(u64, u64),
    /// A checkpoint to record in the job at once (with the bytes done and total).
    Checkpoint(u64, u64, Value),
}

/// Where an export taken over from a dead node continues (see `Service::export_resume_point`).
struct ExportResume {
    upload_id: String,
    /// The header window as it was stored at the first checkpoint, and its manifest.
    head: Vec<u8>,
    head_manifest: String,
    /// The body parts recorded before the checkpoint (numbers 2, 3, ...).
    parts: Vec<UploadedPart>,
    at: WriteCheckpoint,
    /// The job's checkpoint as recorded.
    checkpoint: Value,
}

/// Stores `bytes` as one manifest (a writer state or a header window kept for a resume).
fn store_blob(store: &Arc<openims_store::Store>, bytes: &[u8]) -> Result<String> {
    let mut w = PartWriter::tagged(Arc::clone(store), u64::MAX, PartTag::ContentId);
    w.append(bytes)?;
    Ok(w.finish()?.manifest)
}

/// Reads back what [`store_blob`] stored.
fn read_blob(store: &openims_store::Store, id: &str) -> Result<Vec<u8>> {
    let id: ManifestId = id
        .parse()
        .map_err(|_| CoreError::Internal(format!("bad manifest id {id}")))?;
    let mut disk = store.open_disk(&id)?;
    let len = usize::try_from(disk.manifest().virtual_size())
        .map_err(|_| CoreError::Internal("blob too large".into()))?;
    let mut buf = vec![0u8; len];
    disk.read(0, &mut buf)?;
    Ok(buf)
}

impl Service {
    /// The point an export job's previous run reached (its checkpoint: the upload, the
    /// recorded body parts, the stored header window and writer state), checked against what
    /// the upload holds; `None` when there is none to continue from.
    async fn export_resume_point(
        &self,
        job: &Job,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<ExportResume>> {
        let Some(cp) = job.checkpoint.as_ref() else {
            return Ok(None);
        };
        let Some(e) = cp.get("export") else {
            return Ok(None);
        };
        let num = |k: &str| e.get(k).and_then(Value::as_u64);
        let text = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(next_unit), Some(position), Some(virtual_done), Some(state), Some(head)) = (
            num("next_unit"),
            num("position"),
            num("virtual_done"),
            text("state"),
            text("head"),
        ) else {
            return Ok(None);
        };
        let (parts, _) = self
            .buckets()
            .list_parts(&job.project_id, bucket, key, upload_id, 1, usize::MAX)
            .await?;
        let store = self.data.store.clone();
        let (head_bytes, state_bytes) = {
            let (h, st) = (head.clone(), state.clone());
            tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, Vec<u8>)> {
                Ok((read_blob(&store, &h)?, read_blob(&store, &st)?))
            })
            .await
            .map_err(|e| CoreError::Internal(format!("resume task failed: {e}")))??
        };
        // The body parts before the checkpoint: 2, 3, ... ending exactly at its position.
        let mut body = Vec::new();
        let mut end = head_bytes.len() as u64;
        for p in parts {
            if end >= position {
                break;
            }
            if p.part_number != body.len() as u32 + 2 {
                return Ok(None);
            }
            end += p.size;
            body.push(p);
        }
        if end != position {
            return Ok(None);
        }
        Ok(Some(ExportResume {
            upload_id: upload_id.to_string(),
            head: head_bytes,
            head_manifest: head,
            parts: body,
            at: WriteCheckpoint {
                next_unit,
                position,
                virtual_done,
                state: state_bytes,
            },
            checkpoint: cp.clone(),
        }))
    }
}

/// Largest metadata a chunk-sharing qcow2 export builds in memory (its L2 tables grow with the
/// allocated part of the disk: 64 MiB maps about 512 GiB of data); a larger one takes the
/// streaming writer.
const MAX_SHARED_METADATA: u64 = 64 << 20;
/// Cluster size of exported qcow2 files (the writer's default, qemu-img's too).
const QCOW2_CLUSTER: u64 = 65536;

/// How a chunk-sharing export lays out its object (see [`shared_plan`]).
enum SharedPlan {
    /// Metadata, then every allocated chunk whole in its own slot.
    Qcow2(SlottedQcow2),
    /// The disk's chunks in order, and an allocation bitmap at chunk granularity.
    RawWithBitmap,
}

/// Whether the export of this disk as `format` can reference the disk's chunks instead of
/// copying them, and how. It can when every chunk of the output that carries data is a chunk
/// of the disk, byte for byte: the disk's chunks are plaintext (stored under their content
/// hash, as bucket objects' chunks are), of the store's chunk size, which divides the part
/// size; the output is raw (chunk `k` of the disk is chunk `k` of the object) or qcow2 in the
/// slotted layout (each allocated chunk whole at a chunk-aligned offset). Then the export
/// writes only the qcow2 metadata and the object's manifests: no chunk is read or written,
/// whatever the disk's size, and the object is stored once with the image (deduplicated
/// like any other object). Compressed, VHD and VMDK outputs change the bytes (or their
/// alignment), and an encrypted disk's chunks are ciphertext: those take the streaming writer.
fn shared_plan(
    store: &openims_store::Store,
    m: &Manifest,
    format: OutputFormat,
) -> Result<Option<SharedPlan>> {
    let cs = u64::from(m.chunk_size());
    if m.is_encrypted()
        || cs != u64::from(store.config().chunk_size)
        || !EXPORT_PART_SIZE.is_multiple_of(cs)
        || !MIN_HEADER_WINDOW.is_multiple_of(cs)
    {
        return Ok(None);
    }
    Ok(match format {
        OutputFormat::RawWithBitmap => Some(SharedPlan::RawWithBitmap),
        OutputFormat::Qcow2
            if cs.is_multiple_of(QCOW2_CLUSTER)
                && (QCOW2_CLUSTER / 8 * QCOW2_CLUSTER).is_multiple_of(cs) =>
        {
            let allocated: Vec<u64> = (0..m.chunks().len() as u64)
                .filter(|&k| m.chunks()[k as usize].is_some())
                .collect();
            SlottedQcow2::new(
                m.virtual_size(),
                QCOW2_CLUSTER,
                cs,
                &allocated,
                MIN_HEADER_WINDOW,
                MAX_SHARED_METADATA,
            )?
            .map(SharedPlan::Qcow2)
        }
        _ => None,
    })
}

/// Writes a chunk-sharing export (see [`shared_plan`]) into `seq`; returns the bitmap of a
/// raw export. `progress` gets the virtual bytes done.
fn write_shared(
    store: &openims_store::Store,
    m: &Manifest,
    plan: &SharedPlan,
    seq: &mut PartSequence,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<Vec<u8>>> {
    let cs = u64::from(m.chunk_size());
    let chunks = m.chunks();
    match plan {
        SharedPlan::RawWithBitmap => {
            let mut bm = AllocationBitmap::new(m.virtual_size(), 16)?;
            let g = bm.granularity();
            for (k, id) in chunks.iter().enumerate() {
                let (off, len) = (m.chunk_offset(k), m.chunk_len(k));
                if id.is_some() {
                    for bit in off / g..(off + len).div_ceil(g) {
                        bm.set(bit);
                    }
                }
                seq.append_chunk(*id, len, cs)?;
                progress(off + len);
            }
            Ok(Some(bm.to_bytes()))
        }
        SharedPlan::Qcow2(layout) => {
            seq.append(&layout.metadata)?;
            for (k, id) in chunks.iter().enumerate() {
                let Some(id) = id else { continue };
                let (want, have) = (layout.data_len(k as u64), m.chunk_len(k));
                if want == have {
                    seq.append_chunk(Some(*id), have, cs)?;
                } else {
                    // The disk's last chunk, whose end is not on a cluster boundary: its
                    // slot is padded to whole clusters, so it is written, not referenced.
                    let mut bytes = store.get_chunk(id)?;
                    bytes.resize(want as usize, 0);
                    seq.append(&bytes)?;
                }
                progress(m.chunk_offset(k) + have);
            }
            progress(m.virtual_size());
            Ok(None)
        }
    }
}

/// Parts of a multipart upload written in order and numbered from a given one, each cut at
/// [`EXPORT_PART_SIZE`]: bytes are cut into the store's chunks, chunks the store already holds
/// are referenced. Blocking: used from a blocking thread.
struct PartSequence {
    objects: crate::buckets::BucketObjects,
    upload_id: String,
    current: Option<PartWriter>,
    /// The part being stored in the background (its number and the thread finishing it):
    /// storing a part drains its writers and syncs its chunks and manifest, which the next
    /// part's bytes need not wait for. At most one at a time; recorded in order.
    closing: Option<(
        u32,
        std::thread::JoinHandle<Result<crate::buckets::StoredPart>>,
    )>,
    next_number: u32,
    parts: Vec<UploadedPart>,
    handle: tokio::runtime::Handle,
}

impl PartSequence {
    fn new(
        objects: crate::buckets::BucketObjects,
        upload_id: String,
        first_number: u32,
        handle: tokio::runtime::Handle,
    ) -> PartSequence {
        PartSequence {
            objects,
            upload_id,
            current: None,
            closing: None,
            next_number: first_number,
            parts: Vec::new(),
            handle,
        }
    }

    fn record(&mut self, number: u32, part: crate::buckets::StoredPart) -> Result<()> {
        let objects = self.objects.clone();
        let id = self.upload_id.clone();
        let recorded = self
            .handle
            .block_on(async move { objects.record_part(&id, number, &part).await })?;
        self.parts.push(recorded);
        Ok(())
    }

    fn writer(&mut self) -> &mut PartWriter {
        let store = Arc::clone(self.objects.store());
        self.current
            .get_or_insert_with(|| PartWriter::tagged(store, EXPORT_PART_SIZE, PartTag::ContentId))
    }

    /// Starts storing the open part, if any, in the background (after the previous one is
    /// stored and recorded); [`PartSequence::settle`] waits for it.
    fn close_part(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            self.settle()?;
            let number = self.next_number;
            self.next_number += 1;
            let finishing = std::thread::Builder::new()
                .name("export-part".into())
                .spawn(move || w.finish())
                .map_err(|e| CoreError::Internal(format!("cannot start a thread: {e}")))?;
            self.closing = Some((number, finishing));
        }
        Ok(())
    }

    /// Waits until every closed part is stored and recorded.
    fn settle(&mut self) -> Result<()> {
        if let Some((number, finishing)) = self.closing.take() {
            let part = finishing
                .join()
                .map_err(|_| CoreError::Internal("storing an export part panicked".into()))??;
            self.record(number, part)?;
        }
        Ok(())
    }

    /// Stores the open part, if any, and waits until every closed part is recorded.
    fn flush(&mut self) -> Result<()> {
        self.close_part()?;
        self.settle()
    }

    /// Stores the open part and returns every recorded part.
    fn finish(mut self) -> Result<Vec<UploadedPart>> {
        self.flush()?;
        Ok(self.parts)
    }

    fn append(&mut self, data: &[u8]) -> Result<()> {
        self.append_sliced(data, None)
    }

    /// Appends bytes the store holds as `slices` (see [`PartWriter::append_sliced`]).
    fn append_sliced(&mut self, mut data: &[u8], slices: Option<&[StoredSlice]>) -> Result<()> {
        let mut done = 0u64;
        while !data.is_empty() {
            let w = self.writer();
            let room = (EXPORT_PART_SIZE - w.size()) as usize;
            let n = room.min(data.len());
            match slices {
                Some(s) => {
                    let part = StoredSlice::range(s, done, n as u64);
                    w.append_sliced(&data[..n], Some(&part))?
                }
                None => w.append(&data[..n])?,
            }
            done += n as u64;
            data = &data[n..];
            if w.size() == EXPORT_PART_SIZE {
                self.close_part()?;
            }
        }
        Ok(())
    }

    /// Appends a stored chunk by reference (see [`PartWriter::append_chunk`]).
    fn append_chunk(&mut self, id: Option<ChunkId>, len: u64, chunk_size: u64) -> Result<()> {
        let w = self.writer();
        w.append_chunk(id, len)?;
        if w.size() == EXPORT_PART_SIZE || len < chunk_size {
            self.close_part()?;
        }
        Ok(())
    }
}

/// An [`ImageSink`] into a multipart upload: the header window in memory (part 1, written at
/// the end), the body cut into [`EXPORT_PART_SIZE`] parts (2, 3, ...) as it is written.
/// Blocking: used from a blocking thread.
struct UploadSink {
    head: Vec<u8>,
    body: PartSequence,
    body_start: u64,
    position: u64,
    failed: Option<CoreError>,
    /// Manifest of the header window, stored at the first [`ImageSink::seal`] (the writer
    /// only patches it at the end, so it does not change until then); shared with the
    /// checkpoint that follows a seal.
    head_manifest: Arc<Mutex<Option<String>>>,
}

impl UploadSink {
    /// Stores the last body part and the header part; returns every part.
    fn close(mut self) -> Result<Vec<UploadedPart>> {
        self.body.flush()?;
        let mut w = PartWriter::tagged(
            Arc::clone(self.body.objects.store()),
            self.body_start,
            PartTag::ContentId,
        );
        w.append(&self.head)?;
        let part = w.finish()?;
        self.body.record(1, part)?;
        Ok(self.body.parts)
    }

    fn io<T>(&mut self, r: Result<T>) -> std::io::Result<T> {
        r.map_err(|e| {
            let msg = e.to_string();
            self.failed.get_or_insert(e);
            std::io::Error::other(msg)
        })
    }
}

impl UploadSink {
    /// Appends `buf` (whose bytes the store holds as `slices`, if given): the header window
    /// first, then the body parts.
    fn append(&mut self, mut buf: &[u8], slices: Option<&[StoredSlice]>) -> std::io::Result<()> {
        let mut head = 0usize;
        if self.position < self.body_start {
            head = ((self.body_start - self.position) as usize).min(buf.len());
            self.head.extend_from_slice(&buf[..head]);
            self.position += head as u64;
            buf = &buf[head..];
        }
        if !buf.is_empty() {
            let rest = slices.map(|s| StoredSlice::range(s, head as u64, buf.len() as u64));
            let r = self.body.append_sliced(buf, rest.as_deref());
            self.io(r)?;
            self.position += buf.len() as u64;
        }
        Ok(())
    }
}

impl ImageSink for UploadSink {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.append(buf, None)
    }

    /// The body's chunks made of the image's bytes are stored as compositions of the image's
    /// chunks (a plaintext image; an encrypted one has no slices to give).
    fn wants_slices(&self) -> bool {
        true
    }

    fn write_sliced(&mut self, buf: &[u8], slices: &[StoredSlice]) -> std::io::Result<()> {
        self.append(buf, Some(slices))
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

    /// Closes the open body part (unless it is under the S3 minimum part size, or the header
    /// window is not full yet) and stores the header window once: then everything written so
    /// far is in recorded parts or stored, and an export can continue from here.
    fn seal(&mut self) -> std::io::Result<bool> {
        if self.position < self.body_start {
            return Ok(false);
        }
        let open = self.body.current.as_ref().map_or(0, PartWriter::size);
        if open > 0 && open < MIN_PART_SIZE {
            return Ok(false);
        }
        let r = self.body.flush();
        self.io(r)?;
        let stored = self
            .head_manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !stored {
            let r = store_blob(self.body.objects.store(), &self.head);
            let id = self.io(r)?;
            *self.head_manifest.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
        }
        Ok(true)
    }
}
