//! Composed chunks: a plaintext chunk stored as byte ranges of other stored chunks.
//!
//! A disk image uploaded to a bucket is already in the store, as the chunks of the object's
//! parts. Importing it cuts the *virtual disk* into chunks, whose bytes lie at other offsets
//! of the file (after a qcow2 header and tables, in clusters): the image's chunks are byte
//! ranges of the object's chunks. Instead of writing those bytes a second time, the ingest
//! stores such a chunk as a small **composition** under `composed/ab/cd/<id>`: the list of
//! slices (`len` bytes of source chunk `S` from `offset`, or `len` zeros) that make it up.
//!
//! - The chunk keeps its id: the BLAKE3 of its bytes, hashed by the ingest as for any chunk.
//!   Manifests, dedup, copies, replication and metering see an ordinary chunk; only the store
//!   knows how it is kept.
//! - A read assembles it from its sources, each read whole and verified against its own id,
//!   and verifies the assembled bytes against the chunk's id, like any chunk read. A small
//!   cache of the last sources read keeps a sequential read from reading a source twice.
//! - One level only: sources are stored chunks (`chunks/`), never compositions, so a read
//!   costs a bounded number of object reads ([`MAX_SOURCES`]).
//! - GC keeps the sources of every composition it keeps (see [`crate::gc`]); the ingest
//!   touches every source before it writes a composition, as it touches a chunk it reuses,
//!   so a sweep cannot take a source away under it.
//! - Only on backends whose conditional delete is atomic (the local file system, memory):
//!   the sweep-marker protocol of the S3 backend re-checks a manifest's chunks, not their
//!   sources, so an ingest there writes every chunk in full.
//!
//! Wire format: magic `OIMSCMP1`, the chunk's length (u32 LE), the slice count (u32 LE),
//! then per slice a tag byte (0: zeros, `len` u32; 1: source, 32-byte id, `offset` u32,
//! `len` u32), then the BLAKE3 of everything before it.

use crate::backend::{chunk_key, ObjectBuf};
use crate::error::{Result, StoreError};
use crate::id::ChunkId;
use crate::manifest::MAX_CHUNK_SIZE;
use crate::store::Store;
use openims_format::io::StoredSlice;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

const MAGIC: &[u8; 8] = b"OIMSCMP1";
/// Most distinct source chunks one composition may name: a chunk whose slices come from more
/// places is written in full (a read of it would read that many objects).
pub const MAX_SOURCES: usize = 8;
/// Most slices one composition may hold.
const MAX_SLICES: usize = 4096;
/// Source chunks kept by the read cache (each up to a chunk in size): a chunk drawn from two
/// sources and the one its successor, read ahead at the same time, adds.
const SOURCE_CACHE: usize = 3;

/// Key of a composed chunk: `composed/ab/cd/<hex>`.
pub fn composed_key(id: &ChunkId) -> String {
    let h = id.to_hex();
    format!("composed/{}/{}/{}", &h[0..2], &h[2..4], h)
}

/// Prefix under which all composed chunks live.
pub const COMPOSED_PREFIX: &str = "composed/";

/// Serializes a composition of `len` bytes.
fn to_bytes(len: u32, slices: &[StoredSlice]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + slices.len() * 41 + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(slices.len() as u32).to_le_bytes());
    for s in slices {
        match s {
            StoredSlice::Zero { len } => {
                out.push(0);
                out.extend_from_slice(&len.to_le_bytes());
            }
            StoredSlice::Chunk { chunk, offset, len } => {
                out.push(1);
                out.extend_from_slice(chunk);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Parses a composition: `(length, slices)`; `Corrupt` (naming `key`) on any inconsistency.
fn from_bytes(b: &[u8], key: &str) -> Result<(u32, Vec<StoredSlice>)> {
    let bad = |why: &str| StoreError::corrupt(key, format!("composed chunk: {why}"));
    if b.len() < 16 + 32 || &b[..8] != MAGIC {
        return Err(bad("bad magic or too short"));
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("checksum mismatch"));
    }
    let u32_at = |p: usize| -> Result<u32> {
        body.get(p..p + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
            .ok_or_else(|| bad("truncated"))
    };
    let len = u32_at(8)?;
    let count = u32_at(12)? as usize;
    if len == 0 || len > MAX_CHUNK_SIZE || count == 0 || count > MAX_SLICES {
        return Err(bad("length or slice count out of range"));
    }
    let mut slices = Vec::with_capacity(count);
    let mut p = 16;
    let mut total = 0u64;
    for _ in 0..count {
        let s = match body.get(p) {
            Some(0) => {
                p += 5;
                StoredSlice::Zero {
                    len: u32_at(p - 4)?,
                }
            }
            Some(1) => {
                let chunk: [u8; 32] = body
                    .get(p + 1..p + 33)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| bad("truncated"))?;
                p += 41;
                StoredSlice::Chunk {
                    chunk,
                    offset: u32_at(p - 8)?,
                    len: u32_at(p - 4)?,
                }
            }
            _ => return Err(bad("bad slice tag")),
        };
        if s.is_empty() {
            return Err(bad("empty slice"));
        }
        total += u64::from(s.len());
        slices.push(s);
    }
    if p != body.len() || total != u64::from(len) {
        return Err(bad("slices do not add up to the chunk"));
    }
    Ok((len, slices))
}

/// The distinct source chunks of `slices`, in order of first appearance.
pub(crate) fn sources(slices: &[StoredSlice]) -> Vec<ChunkId> {
    let mut out: Vec<ChunkId> = Vec::new();
    for s in slices {
        if let StoredSlice::Chunk { chunk, .. } = s {
            let id = ChunkId(*chunk);
            if !out.contains(&id) {
                out.push(id);
            }
        }
    }
    out
}

/// One source chunk in the cache: filled once by the first reader that needs it, while
/// readers asking at the same time wait for it instead of reading it too (`None`: that read
/// failed).
type Slot = Arc<OnceLock<Option<Arc<ObjectBuf>>>>;

/// The last source chunks composed reads fetched (verified), shared by the store's readers
/// (a sequential read and its read-ahead threads ask for the same sources).
#[derive(Default)]
pub(crate) struct SourceCache {
    recent: Mutex<VecDeque<(ChunkId, Slot)>>,
}

impl SourceCache {
    /// The slot of `id`, made (evicting the oldest) if absent.
    fn slot(&self, id: &ChunkId) -> Slot {
        let mut recent = crate::lock(&self.recent);
        if let Some((_, s)) = recent.iter().find(|(c, _)| c == id) {
            return Arc::clone(s);
        }
        if recent.len() >= SOURCE_CACHE {
            recent.pop_front();
        }
        let s = Slot::default();
        recent.push_back((*id, Arc::clone(&s)));
        s
    }

    /// Drops the slot of `id` (its read failed).
    fn forget(&self, id: &ChunkId) {
        crate::lock(&self.recent).retain(|(c, _)| c != id);
    }
}

impl Store {
    /// Whether compositions may be written here (see the module docs).
    pub(crate) fn composes(&self) -> bool {
        self.inner.config.compose && self.inner.backend.atomic_delete_if_older()
    }

    /// Stores chunk `id` (the hash of `data`, `data.len()` bytes) as a composition of
    /// `slices`, if they add up to `data`, name at most [`MAX_SOURCES`] chunks and every source
    /// is a stored chunk (each is touched, so a running GC keeps it). Returns `false` without
    /// writing anything otherwise (the caller stores the bytes). The caller has checked that
    /// the chunk is not stored yet.
    pub(crate) fn put_composed(
        &self,
        id: &ChunkId,
        data: &[u8],
        slices: &[StoredSlice],
    ) -> Result<bool> {
        let total: u64 = slices.iter().map(|s| u64::from(s.len())).sum();
        let srcs = sources(slices);
        if total != data.len() as u64
            || slices.len() > MAX_SLICES
            || srcs.is_empty()
            || srcs.len() > MAX_SOURCES
            || srcs.contains(id)
        {
            return Ok(false);
        }
        let b = &self.inner.backend;
        for s in &srcs {
            if !b.touch(&chunk_key(s))? {
                return Ok(false);
            }
        }
        b.put(&composed_key(id), &to_bytes(data.len() as u32, slices))?;
        // Test builds read every composition back: a reader whose slices disagree with its
        // bytes fails the ingest there instead of leaving an unreadable chunk.
        #[cfg(debug_assertions)]
        if self.read_composed(id)?.as_deref() != Some(data) {
            let _ = b.delete(&composed_key(id));
            return Err(StoreError::Invalid(format!(
                "the slices given for chunk {id} do not reproduce its bytes"
            )));
        }
        Ok(true)
    }

    /// The slices of composed chunk `id`; `None` if it is not stored as a composition.
    pub(crate) fn composition(&self, id: &ChunkId) -> Result<Option<Vec<StoredSlice>>> {
        let key = composed_key(id);
        match self.inner.backend.get(&key) {
            Ok(b) => Ok(Some(from_bytes(&b, &key)?.1)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Assembles composed chunk `id` from its sources (each verified against its id); `None`
    /// if it is not stored as a composition. The caller verifies the result against `id`.
    pub(crate) fn read_composed(&self, id: &ChunkId) -> Result<Option<ObjectBuf>> {
        let key = composed_key(id);
        let bytes = match self.inner.backend.get(&key) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (len, slices) = from_bytes(&bytes, &key)?;
        let mut out = ObjectBuf::pooled(len as usize);
        let mut pos = 0usize;
        for s in &slices {
            let n = s.len() as usize;
            if let StoredSlice::Zero { .. } = s {
                out[pos..pos + n].fill(0);
            }
            if let StoredSlice::Chunk { chunk, offset, .. } = s {
                let src = self.source_chunk(&ChunkId(*chunk))?;
                let at = *offset as usize;
                let part = src.get(at..at + n).ok_or_else(|| {
                    StoreError::corrupt(
                        &key,
                        format!(
                            "slice {at}+{n} lies outside its source chunk of {} bytes",
                            src.len()
                        ),
                    )
                })?;
                out[pos..pos + n].copy_from_slice(part);
            }
            pos += n;
        }
        Ok(Some(out))
    }

    /// A source chunk of a composition, from the cache or read and verified.
    fn source_chunk(&self, id: &ChunkId) -> Result<Arc<ObjectBuf>> {
        let slot = self.inner.sources.slot(id);
        let mut failed = None;
        let got = slot.get_or_init(|| match self.read_source(id) {
            Ok(b) => Some(Arc::new(b)),
            Err(e) => {
                failed = Some(e);
                None
            }
        });
        match (got, failed) {
            (Some(b), _) => Ok(Arc::clone(b)),
            (None, failed) => {
                self.inner.sources.forget(id);
                match failed {
                    Some(e) => Err(e),
                    // Another reader's read failed: try once more, for this reader's error.
                    None => self.read_source(id).map(Arc::new),
                }
            }
        }
    }

    /// Reads a source chunk's own object (never a composition) and verifies it.
    fn read_source(&self, id: &ChunkId) -> Result<ObjectBuf> {
        let data = self.read_stored(false, id)?;
        if ChunkId::hash(&data) != *id {
            return Err(StoreError::corrupt(
                chunk_key(id),
                "chunk content does not match its id",
            ));
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let slices = vec![
            StoredSlice::Chunk {
                chunk: [7; 32],
                offset: 4096,
                len: 1000,
            },
            StoredSlice::Zero { len: 24 },
            StoredSlice::Chunk {
                chunk: [9; 32],
                offset: 0,
                len: 3072,
            },
        ];
        let b = to_bytes(4096, &slices);
        assert_eq!(from_bytes(&b, "k").unwrap(), (4096, slices.clone()));
        // Any flipped byte is caught by the checksum.
        for i in [0, 9, 17, 50, b.len() - 1] {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(from_bytes(&c, "k").unwrap_err().is_corrupt(), "byte {i}");
        }
        // Slices that do not add up to the length are refused.
        let short = to_bytes(5000, &slices);
        assert!(from_bytes(&short, "k").unwrap_err().is_corrupt());
        assert_eq!(sources(&slices), vec![ChunkId([7; 32]), ChunkId([9; 32])]);
    }
}
