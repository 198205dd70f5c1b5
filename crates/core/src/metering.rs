//! Storage metering per project (scenario S6): logical bytes vs billable physical bytes.
//!
//! - **Logical bytes**: the sum, over the project's images, of the sizes of the data each one
//!   holds (its virtual disk, plus the uploaded file when it was kept in another format).
//! - **Billable bytes**: the bytes of the *distinct* stored chunks the project's images
//!   reference, counted once each, at their plaintext length. An in-region replica shares
//!   its source's manifest (or, decrypted/re-keyed, the same encrypted chunks), so it adds
//!   logical bytes but no billable bytes. All-zero chunks are never stored, never billed.
//! - **Chunks shared across projects** (identical plaintext deduplicated between tenants)
//!   are billed **to each project that references them**: a project pays for what its own
//!   images need, independently of what other projects store (deduplication across tenants
//!   saves the operator storage; it never makes one tenant's bill depend on another's).
//!
//! Encrypted chunks live in their own namespace (their ids depend on the data key), so an
//! encrypted copy made with a fresh data key is billed for its own chunks.

use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::Service;
use openims_store::{ChunkId, Manifest, ManifestId};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

/// How chunks shared between projects are billed (shown by the usage API).
pub const CROSS_PROJECT_POLICY: &str = "each project is billed for every distinct chunk its \
    own images reference, whether or not other projects reference it too";

/// A project's storage usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Images counted.
    pub images: u64,
    /// Images holding data.
    pub images_with_data: u64,
    /// Sum of the images' data sizes.
    pub logical_bytes: u64,
    /// Bytes of distinct stored chunks (what is billed).
    pub billable_bytes: u64,
    /// Distinct stored chunks.
    pub chunks: u64,
}

/// The metering math: `images` lists, per image, the manifests it references.
pub fn compute(images: &[Vec<&Manifest>]) -> Usage {
    let mut u = Usage {
        images: images.len() as u64,
        ..Usage::default()
    };
    let mut seen: HashSet<(bool, ChunkId)> = HashSet::new();
    for manifests in images {
        if !manifests.is_empty() {
            u.images_with_data += 1;
        }
        for m in manifests {
            u.logical_bytes += m.logical_size();
            for (c, len) in m.stored_chunks_with_len() {
                if seen.insert((m.is_encrypted(), c)) {
                    u.billable_bytes += len;
                    u.chunks += 1;
                }
            }
        }
    }
    u
}

impl Service {
    /// Storage usage of the caller's project (`GET /v1/cloudimages/usage`).
    pub async fn usage(&self, caller: &Caller) -> Result<Value> {
        let images = self.db.images_of(&caller.project_id).await?;
        let mut per_image: Vec<Vec<ManifestId>> = Vec::with_capacity(images.len());
        for img in &images {
            let mut ms = Vec::new();
            for m in [&img.disk_manifest, &img.file_manifest]
                .into_iter()
                .flatten()
            {
                ms.push(
                    m.parse::<ManifestId>()
                        .map_err(|_| CoreError::Internal(format!("bad manifest id {m}")))?,
                );
            }
            per_image.push(ms);
        }
        let store = self.data.store.clone();
        let u = tokio::task::spawn_blocking(move || -> Result<Usage> {
            let mut loaded: HashMap<ManifestId, Manifest> = HashMap::new();
            for id in per_image.iter().flatten() {
                if !loaded.contains_key(id) {
                    loaded.insert(*id, store.manifest(id)?);
                }
            }
            let lists: Vec<Vec<&Manifest>> = per_image
                .iter()
                .map(|ms| ms.iter().filter_map(|id| loaded.get(id)).collect())
                .collect();
            Ok(compute(&lists))
        })
        .await
        .map_err(|e| CoreError::Internal(format!("usage task failed: {e}")))??;
        Ok(json!({
            "project_id": caller.project_id.as_str(),
            "images": u.images,
            "images_with_data": u.images_with_data,
            "logical_bytes": u.logical_bytes,
            "billable_bytes": u.billable_bytes,
            "physical_bytes": u.billable_bytes,
            "stored_chunks": u.chunks,
            "saved_bytes": u.logical_bytes.saturating_sub(u.billable_bytes),
            "cross_project_policy": CROSS_PROJECT_POLICY,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 4096;

    fn m(chunks: &[Option<u8>], encrypted: bool) -> Manifest {
        let ids = chunks
            .iter()
            .map(|c| c.map(|b| ChunkId::hash(&[b])))
            .collect();
        let size = chunks.len() as u64 * u64::from(CS);
        if encrypted {
            Manifest::new_encrypted(size, CS, ids).expect("m")
        } else {
            Manifest::new(size, CS, ids).expect("m")
        }
    }

    #[test]
    fn replicas_add_logical_but_no_billable_bytes() {
        let src = m(&[Some(1), None, Some(2), Some(1)], false);
        // One image: 4 chunks logical, 2 distinct stored chunks (zero not stored).
        let one = compute(&[vec![&src]]);
        assert_eq!(one.logical_bytes, 4 * 4096);
        assert_eq!(one.billable_bytes, 2 * 4096);
        // Two in-region copies share the manifest: logical triples, billable unchanged.
        let three = compute(&[vec![&src], vec![&src], vec![&src]]);
        assert_eq!(three.logical_bytes, 12 * 4096);
        assert_eq!(three.billable_bytes, 2 * 4096);
        assert_eq!(three.images, 3);
        // Another image sharing one chunk: only its new chunk is added.
        let other = m(&[Some(2), Some(3)], false);
        let u = compute(&[vec![&src], vec![&other]]);
        assert_eq!(u.billable_bytes, 3 * 4096);
        assert_eq!(u.chunks, 3);
        // An encrypted copy (fresh data key) has its own chunks, even with equal ids.
        let enc = m(&[Some(1), None, Some(2), Some(1)], true);
        let u = compute(&[vec![&src], vec![&enc]]);
        assert_eq!(u.billable_bytes, 4 * 4096);
        // An image without data counts as an image, nothing else.
        let u = compute(&[vec![], vec![&src]]);
        assert_eq!((u.images, u.images_with_data), (2, 1));
        assert_eq!(compute(&[]), Usage::default());
    }
}
