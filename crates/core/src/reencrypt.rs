//! The key rules of in-region replication (spec C.1/C.3) and the encrypting copy job.
//!
//! At request time [`Service::plan_copy_keys`] checks both keys and decides:
//! - **share** (O(1)): the copy references the source's manifests. For an encrypted source
//!   (unchanged key holder, re-key, or decryption) only the data key is re-wrapped: under the
//!   new CMK, or under the service root key for an "unencrypted" copy, whose data therefore
//!   stays encrypted at rest. Nothing is read or written in the store, and the copy is made
//!   within the request: the new image and its job, already SUCCESS, commit in one
//!   transaction.
//! - **encrypt** (streaming job): the source's chunks are plaintext (an unencrypted image
//!   being encrypted), or a full re-encryption was asked for (`__reencrypt_data`, or the
//!   `reencrypt_on_rekey` policy): every chunk goes through AES-256-GCM under a fresh DEK.
//!   The job records progress and a checkpoint (last durable chunk index + the partial chunk
//!   list) and resumes from it after a crash.
//!
//! Every key is resolved once, at request time, and what the job needs is carried in its
//! parameters wrapped by the root key: disabling the source's key later, or deleting the
//! source image once the copy exists, cannot break the copy.

use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::image::Image;
use crate::jobs::{Job, Progress};
use crate::kms::{ImageKey, KeyRole};
use crate::service::CopyRequest;
use crate::Service;
use openims_store::{Dek, EncryptCheckpoint, ManifestId};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunks between durable checkpoints of an encrypting copy (64 MiB at 4 MiB chunks).
const CHECKPOINT_EVERY_CHUNKS: u64 = 16;
/// Least time between two progress-only heartbeats.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// What a copy does with keys and data.
#[derive(Debug, Clone)]
pub enum CopyKeyPlan {
    /// O(1): the copy references the source's manifests, made within the request. `image_key`
    /// is the copy's key row (the source's DEK re-wrapped), `None` for plaintext data.
    Share { image_key: Option<ImageKey> },
    /// Streaming job: every chunk is encrypted under a fresh DEK.
    Encrypt {
        /// The copy's key row (the fresh DEK wrapped by the target key or the root key).
        image_key: ImageKey,
        /// The fresh DEK wrapped by the root key, for the job.
        work_dek: String,
        /// The source's DEK wrapped by the root key (encrypted sources).
        src_dek: Option<String>,
    },
}

/// A key row as stored in a copy job's parameters.
pub fn image_key_json(key: Option<&ImageKey>) -> Value {
    match key {
        Some(k) => json!({"cmk_id": k.cmk_id, "wrapped_dek": k.wrapped_dek}),
        None => Value::Null,
    }
}

/// The new image's key row from a copy job's parameters.
pub fn job_image_key(params: &Value) -> Result<Option<ImageKey>> {
    match params.get("image_key") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let wrapped = v
                .get("wrapped_dek")
                .and_then(Value::as_str)
                .ok_or_else(|| CoreError::Internal("copy job key without wrapped_dek".into()))?;
            Ok(Some(ImageKey {
                cmk_id: v.get("cmk_id").and_then(Value::as_str).map(str::to_string),
                wrapped_dek: wrapped.to_string(),
            }))
        }
    }
}

/// Checkpoint of an encrypting copy: manifests already done, and the running one's state.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct CopyCheckpoint {
    /// New manifests of the finished stages (disk, then file).
    done: Vec<String>,
    /// The stage in progress.
    current: Option<EncryptCheckpoint>,
}

/// Progress sent from the blocking encryption to the async job loop.
struct Update {
    bytes_done: u64,
    checkpoint: Option<CopyCheckpoint>,
}

impl Service {
    /// Applies the key rules of a copy request and decides how the copy is made. Errors:
    /// IMG.0096 (same key), IMG.0118 (BMS image), IMG.0101-0103 (source key),
    /// IMG.0095/0097/0099 (requested key).
    pub async fn plan_copy_keys(
        &self,
        caller: &Caller,
        src: &Image,
        req: &CopyRequest,
    ) -> Result<CopyKeyPlan> {
        let target = req
            .cmk_id
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string);
        let src_key = self.db.image_key(&src.id.to_string()).await?;
        let src_cmk = src_key.as_ref().and_then(|k| k.cmk_id.clone());
        if target.is_some() && target == src_cmk {
            return Err(CoreError::SameKmsKey);
        }
        if target.is_some() && src.prop("virtual_env_type") == Some("Ironic") {
            return Err(CoreError::BmsNoEncryption);
        }
        // Unwrapping the source's DEK checks its key (IMG.0101-0103).
        let src_dek = self.image_dek(caller, src).await?;
        let target_material = match &target {
            Some(k) => Some(self.usable_key(caller, k, KeyRole::Target).await?),
            None => None,
        };
        let wrap_new = |dek: &Dek| -> Result<ImageKey> {
            let wrapped_dek = match (&target, &target_material) {
                (Some(id), Some(m)) => self.cmk_wrap(id, m, dek)?,
                _ => self.root_wrap(dek)?,
            };
            Ok(ImageKey {
                cmk_id: target.clone(),
                wrapped_dek,
            })
        };
        let rekey = src_cmk.is_some() && target.is_some();
        let reencrypt = req.reencrypt_data || (self.config.reencrypt_on_rekey && rekey);
        Ok(match (&src_dek, reencrypt, &target) {
            // Plaintext source, no key asked: share everything.
            (None, _, None) => CopyKeyPlan::Share { image_key: None },
            // Encrypted source, same data key re-wrapped: share the manifests.
            (Some(dek), false, _) => CopyKeyPlan::Share {
                image_key: Some(wrap_new(dek)?),
            },
            // Plaintext source encrypted, or full re-encryption: a fresh DEK, streamed.
            _ => {
                let fresh = Dek::generate();
                CopyKeyPlan::Encrypt {
                    image_key: wrap_new(&fresh)?,
                    work_dek: self.root_wrap(&fresh)?,
                    src_dek: match &src_dek {
                        Some(d) => Some(self.root_wrap(d)?),
                        None => None,
                    },
                }
            }
        })
    }

    /// The encrypting part of a copy job: re-encrypts the source's manifests (disk, then
    /// file if any) under the job's DEK, resuming from the job's checkpoint, heartbeating
    /// progress. Returns the new (disk, file) manifest ids.
    pub(crate) async fn encrypt_image_data(
        &self,
        job: &Job,
        src: &Image,
    ) -> Result<(String, Option<String>)> {
        let p = &job.params;
        let work =
            self.root_unwrap(p.get("work_dek").and_then(Value::as_str).ok_or_else(|| {
                CoreError::Internal("encrypting copy without a data key".into())
            })?)?;
        let src_dek = match p.get("src_dek").and_then(Value::as_str) {
            Some(w) => Some(self.root_unwrap(w)?),
            None => None,
        };
        let parse = |m: &str| {
            m.parse::<ManifestId>()
                .map_err(|_| CoreError::Internal(format!("bad manifest id {m}")))
        };
        let mut sources = Vec::new();
        if let Some(m) = &src.disk_manifest {
            sources.push(parse(m)?);
        }
        if let Some(m) = &src.file_manifest {
            sources.push(parse(m)?);
        }
        if sources.is_empty() {
            return Err(CoreError::ImageNotActive("no data".into()));
        }
        let store = self.data.store.clone();
        let mut sizes = Vec::new();
        for m in &sources {
            let st = store.clone();
            let m = *m;
            sizes.push(
                tokio::task::spawn_blocking(move || st.manifest(&m).map(|m| m.virtual_size()))
                    .await
                    .map_err(|e| CoreError::Internal(format!("task failed: {e}")))??,
            );
        }
        let bytes_total: u64 = sizes.iter().sum();
        let mut cp: CopyCheckpoint = job
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("encrypt"))
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default();
        if cp.done.len() > sources.len() {
            cp = CopyCheckpoint::default();
        }
        if cp.done.len() as u64 + u64::from(cp.current.is_some()) > 0 {
            tracing::info!(job_id = %job.id, stage = cp.done.len(),
                chunk = cp.current.as_ref().map(|c| c.next_index).unwrap_or(0),
                "encrypting copy resumes from its checkpoint");
        }
        while cp.done.len() < sources.len() {
            let stage = cp.done.len();
            let src_m = sources[stage];
            let before: u64 = sizes[..stage].iter().sum();
            let resume = cp.current.take();
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Update>(8);
            let abort = Arc::new(AtomicBool::new(false));
            let st = store.clone();
            let (work_k, src_k, abort_w) = (work.clone(), src_dek.clone(), abort.clone());
            let done_so_far = cp.done.clone();
            let task = tokio::task::spawn_blocking(move || {
                st.reencrypt(
                    &src_m,
                    src_k.as_ref(),
                    &work_k,
                    resume,
                    CHECKPOINT_EVERY_CHUNKS,
                    &mut |pr| {
                        if abort_w.load(Ordering::Relaxed) {
                            return Err(openims_store::StoreError::Invalid(
                                "the job's lease was lost".into(),
                            ));
                        }
                        let checkpoint = pr.durable.then(|| CopyCheckpoint {
                            done: done_so_far.clone(),
                            current: Some(pr.checkpoint.clone()),
                        });
                        let u = Update {
                            bytes_done: before + pr.bytes_done,
                            checkpoint,
                        };
                        // A full channel applies back-pressure; progress-only updates may
                        // be dropped instead.
                        if u.checkpoint.is_some() {
                            tx.blocking_send(u).map_err(|_| {
                                openims_store::StoreError::Invalid("job loop stopped".into())
                            })
                        } else {
                            let _ = tx.try_send(u);
                            Ok(())
                        }
                    },
                )
            });
            let mut last_beat: Option<Instant> = None;
            while let Some(u) = rx.recv().await {
                let durable = u.checkpoint.is_some();
                if !durable && last_beat.is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY) {
                    continue;
                }
                last_beat = Some(Instant::now());
                let progress = Progress::of_bytes(
                    "encrypting",
                    u.bytes_done,
                    bytes_total,
                    u.checkpoint.map(|c| json!({"encrypt": c})),
                );
                let alive = self.beat(&job.id, &progress).await?;
                if !alive {
                    abort.store(true, Ordering::Relaxed);
                }
            }
            let new_m = task
                .await
                .map_err(|e| CoreError::Internal(format!("encryption task failed: {e}")))??;
            if abort.load(Ordering::Relaxed) {
                return Err(CoreError::Internal("the job's lease was lost".into()));
            }
            cp.done.push(new_m.to_string());
            cp.current = None;
            let progress = Progress::of_bytes(
                "encrypting",
                sizes[..=stage].iter().sum(),
                bytes_total,
                Some(json!({"encrypt": cp})),
            );
            self.beat(&job.id, &progress).await?;
        }
        let mut it = cp.done.into_iter();
        let disk = it
            .next()
            .ok_or_else(|| CoreError::Internal("no manifest encrypted".into()))?;
        Ok((disk, it.next()))
    }
}
