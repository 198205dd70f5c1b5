//! Glance image data: `PUT /v2/images/{id}/file` (upload) and `GET /v2/images/{id}/file`
//! (download).
//!
//! An upload streams the body to a staging file while hashing it (MD5 for `checksum`,
//! SHA-512 for `os_hash_value`) on two threads, then inspects the file (safety verdict and
//! declared-vs-detected format) before anything reads through it, then stores its virtual disk
//! (and, for non-raw formats, the file as uploaded, so downloads are byte-exact) in the chunk
//! store, and only then marks the image `active`, in one conditional update that succeeds only
//! if the same upload still owns the image.

use crate::data::{DeclaredFormat, Ingested};
use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::image::{Image, ImageStatus};
use crate::service::Service;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use md5::Md5;
use sha2::{Digest, Sha512};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;

/// What a finished upload measured.
#[derive(Debug, Clone)]
pub struct UploadOutcome {
    pub size: u64,
    pub md5: String,
    pub sha512: String,
}

/// Image data ready to stream to a client.
pub struct ImageData {
    /// Total length of the data.
    pub len: u64,
    /// Hex MD5 of the whole data, when known (Glance uploads).
    pub md5: Option<String>,
    /// Which manifest holds the data.
    pub manifest: String,
    /// The data key of its chunks when the manifest is encrypted.
    pub dek: Option<openims_store::Dek>,
}

struct Staged {
    path: PathBuf,
    outcome: UploadOutcome,
}

impl Service {
    /// Receives image data for a `queued` image.
    pub async fn upload_image_data<S, E>(&self, caller: &Caller, id: &str, body: S) -> Result<Image>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let img = self.own_image(caller, id).await?;
        let (Some(disk_format), Some(_)) = (img.disk_format.clone(), img.container_format.clone())
        else {
            return Err(CoreError::FormatsNotSet);
        };
        let declared = DeclaredFormat::from_disk_format(&disk_format)?;
        if img.status != ImageStatus::Queued {
            return Err(CoreError::BadTransition {
                from: img.status.as_str().into(),
                to: "saving".into(),
            });
        }
        let token = format!("{}:{}", self.node_id, uuid::Uuid::new_v4().simple());
        if !self
            .db
            .transition(
                &img.id,
                ImageStatus::Queued,
                ImageStatus::Saving,
                Some(&token),
            )
            .await?
        {
            return Err(CoreError::BadTransition {
                from: "queued".into(),
                to: "saving".into(),
            });
        }
        let staging =
            self.data
                .staging_path(&format!("{}-{}", img.id, uuid::Uuid::new_v4().simple()));
        let result = self
            .receive_and_store(&img, &token, staging.clone(), declared, body)
            .await;
        let _ = std::fs::remove_file(&staging);
        match result {
            Ok(()) => self.image(caller, id).await,
            Err(e) => {
                // Nothing was marked active; the image can be uploaded again.
                let _ = self
                    .db
                    .transition(&img.id, ImageStatus::Saving, ImageStatus::Queued, None)
                    .await;
                Err(e)
            }
        }
    }

    async fn receive_and_store<S, E>(
        &self,
        img: &Image,
        token: &str,
        staging: PathBuf,
        declared: DeclaredFormat,
        body: S,
    ) -> Result<()>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let staged = receive(staging, body, self.config.max_upload_size).await?;
        let data = self.data.clone();
        let path = staged.path.clone();
        let max_virtual = self.config.max_virtual_size;
        let ingested: Ingested =
            tokio::task::spawn_blocking(move || data.ingest_file(&path, declared, max_virtual))
                .await
                .map_err(|e| CoreError::Internal(format!("ingest task failed: {e}")))??;
        let mut done = img.clone();
        done.size = Some(staged.outcome.size as i64);
        done.virtual_size = Some(ingested.virtual_size as i64);
        done.checksum = Some(staged.outcome.md5.clone());
        done.os_hash_algo = Some("sha512".into());
        done.os_hash_value = Some(staged.outcome.sha512.clone());
        done.disk_manifest = Some(ingested.disk_manifest.clone());
        done.file_manifest = ingested.file_manifest.clone();
        done.properties.insert(
            "__image_size".into(),
            serde_json::Value::String(staged.outcome.size.to_string()),
        );
        if !self.db.activate_upload(&done, token).await? {
            return Err(CoreError::UploadInterrupted(
                "the image was deleted or changed during the upload".into(),
            ));
        }
        tracing::info!(image_id = %img.id, size = staged.outcome.size, virtual_size = ingested.virtual_size, "image uploaded");
        Ok(())
    }

    /// Where an active image's data can be read from, or `None` for an image without data
    /// (Glance answers 204). The owner and accepted members may read it; a pending or
    /// rejected member gets `ShareNotAccepted`.
    pub async fn image_data(&self, caller: &Caller, id: &str) -> Result<Option<ImageData>> {
        let img = self
            .visible_image(caller, id, crate::members::Need::Use)
            .await?;
        if img.status != ImageStatus::Active {
            return Ok(None);
        }
        let manifest = match img.file_manifest.clone().or(img.disk_manifest.clone()) {
            Some(m) => m,
            None => return Ok(None),
        };
        // An encrypted image is readable only while its key is usable (IMG.0101-0103).
        let dek = self.image_dek(caller, &img).await?;
        let len = self.data.manifest_len(&manifest)?;
        Ok(Some(ImageData {
            len,
            md5: img.checksum.clone(),
            manifest,
            dek,
        }))
    }
}

/// Streams `body` into `path`, hashing MD5 and SHA-512 on two threads while the async side
/// keeps receiving. The channels are bounded, so a slow disk applies back-pressure.
async fn receive<S, E>(path: PathBuf, mut body: S, max: u64) -> Result<Staged>
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let file_path = path.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<(u64, String, String)> {
        let (tx_m, rx_m) = mpsc::sync_channel::<Bytes>(64);
        let hasher = std::thread::spawn(move || {
            let mut md5 = Md5::new();
            for b in rx_m {
                md5.update(&b);
            }
            hex::encode(md5.finalize())
        });
        let f = std::fs::File::create(&file_path)?;
        let mut w = std::io::BufWriter::with_capacity(4 << 20, f);
        let mut sha = Sha512::new();
        let mut n = 0u64;
        let mut res = Ok(());
        while let Some(b) = rx.blocking_recv() {
            if let Err(e) = w.write_all(&b) {
                res = Err(e);
                break;
            }
            sha.update(&b);
            n += b.len() as u64;
            if tx_m.send(b).is_err() {
                break;
            }
        }
        drop(tx_m);
        let md5 = hasher
            .join()
            .map_err(|_| std::io::Error::other("hasher panicked"))?;
        res?;
        w.flush()?;
        Ok((n, hex::encode(sha.finalize()), md5))
    });
    let mut received = 0u64;
    let mut failure: Option<CoreError> = None;
    while let Some(item) = body.next().await {
        match item {
            Ok(b) => {
                received += b.len() as u64;
                if received > max {
                    failure = Some(CoreError::ImageTooLarge(max));
                    break;
                }
                if tx.send(b).await.is_err() {
                    failure = Some(CoreError::Internal("staging writer stopped".into()));
                    break;
                }
            }
            Err(e) => {
                failure = Some(CoreError::UploadInterrupted(e.to_string()));
                break;
            }
        }
    }
    drop(tx);
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| CoreError::Internal(format!("staging task failed: {e}")))?
        .map_err(|_| CoreError::Internal("staging writer panicked".into()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let (size, sha512, md5) = written?;
    Ok(Staged {
        path,
        outcome: UploadOutcome { size, md5, sha512 },
    })
}
