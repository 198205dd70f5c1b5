//! Manifests: the ordered chunk list of one virtual disk, immutable and content-addressed.
//!
//! Serialized form (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `OIMSMANI` |
//! | 8 | 4 | format version: 1 = plaintext chunks, 2 = encrypted chunks (see [`crate::crypto`]) |
//! | 12 | 4 | chunk size in bytes |
//! | 16 | 8 | virtual size in bytes |
//! | 24 | 8 | chunk count (must equal `ceil(virtual_size / chunk_size)`) |
//! | 32 | 32 x count | chunk ids; all-zero = zero chunk (not stored) |
//! | end - 32 | 32 | BLAKE3 of everything before it |
//!
//! The `ManifestId` is the BLAKE3 of the whole serialized form, so the trailing checksum lets a
//! manifest be verified on its own (e.g. in a backup) while the id verifies it in the store.

use crate::error::{Result, StoreError};
use crate::id::{ChunkId, ManifestId};
use openims_format::io::StoredSlice;
use std::collections::HashSet;

const MAGIC: &[u8; 8] = b"OIMSMANI";
const HEADER_LEN: usize = 32;
const TRAILER_LEN: usize = 32;

/// Manifest format version of plaintext manifests (chunks under `chunks/`).
pub const MANIFEST_VERSION: u32 = 1;
/// Manifest format version of encrypted manifests (chunks under `echunks/`, ids depend on
/// the data key; see [`crate::crypto`]). Same layout as version 1.
pub const MANIFEST_VERSION_ENCRYPTED: u32 = 2;
/// Smallest chunk size a manifest may declare.
pub const MIN_CHUNK_SIZE: u32 = 512;
/// Largest chunk size a manifest may declare (bounds memory per chunk read).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Most chunks one manifest may hold (64 TiB at 4 MiB; a 512 MiB manifest).
pub const MAX_CHUNKS: u64 = 1 << 24;

/// The content of one virtual disk: its size and its chunks in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    version: u32,
    virtual_size: u64,
    chunk_size: u32,
    chunks: Vec<Option<ChunkId>>,
}

/// Number of chunks a disk of `virtual_size` bytes has at `chunk_size`.
pub fn chunk_count(virtual_size: u64, chunk_size: u32) -> u64 {
    virtual_size.div_ceil(u64::from(chunk_size.max(1)))
}

impl Manifest {
    /// Builds a manifest, checking that `chunks` has exactly one entry per chunk of the disk,
    /// that `chunk_size` is within [`MIN_CHUNK_SIZE`, `MAX_CHUNK_SIZE`] and that no entry uses
    /// the reserved all-zero id.
    pub fn new(virtual_size: u64, chunk_size: u32, chunks: Vec<Option<ChunkId>>) -> Result<Self> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(StoreError::Invalid(format!(
                "chunk size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            )));
        }
        let want = chunk_count(virtual_size, chunk_size);
        if want > MAX_CHUNKS {
            return Err(StoreError::Invalid(format!(
                "a {virtual_size}-byte disk at {chunk_size} needs {want} chunks (limit {MAX_CHUNKS})"
            )));
        }
        if chunks.len() as u64 != want {
            return Err(StoreError::Invalid(format!(
                "manifest has {} chunks, a {virtual_size}-byte disk at {chunk_size} needs {want}",
                chunks.len()
            )));
        }
        if chunks.contains(&Some(ChunkId::RESERVED_ZERO)) {
            return Err(StoreError::Invalid(
                "manifest references the reserved all-zero chunk id".into(),
            ));
        }
        Ok(Manifest {
            version: MANIFEST_VERSION,
            virtual_size,
            chunk_size,
            chunks,
        })
    }

    /// Builds an encrypted manifest: like [`Manifest::new`], but its chunk ids name encrypted
    /// chunks (readable only with the data key they were made with).
    pub fn new_encrypted(
        virtual_size: u64,
        chunk_size: u32,
        chunks: Vec<Option<ChunkId>>,
    ) -> Result<Self> {
        let mut m = Manifest::new(virtual_size, chunk_size, chunks)?;
        m.version = MANIFEST_VERSION_ENCRYPTED;
        Ok(m)
    }

    /// Whether the chunks are encrypted chunks (format version 2).
    pub fn is_encrypted(&self) -> bool {
        self.version == MANIFEST_VERSION_ENCRYPTED
    }

    /// Format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Virtual disk size in bytes (same as [`Manifest::logical_size`]).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Chunk size in bytes (every chunk but possibly the last has this length).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The chunks in order; `None` is an all-zero chunk.
    pub fn chunks(&self) -> &[Option<ChunkId>] {
        &self.chunks
    }

    /// Logical size: the virtual disk size in bytes.
    pub fn logical_size(&self) -> u64 {
        self.virtual_size
    }

    /// Byte offset of chunk `index` in the virtual disk.
    pub fn chunk_offset(&self, index: usize) -> u64 {
        index as u64 * u64::from(self.chunk_size)
    }

    /// `[offset, offset + len)` of the disk as slices of its chunks (zero chunks as zeros);
    /// `None` for an encrypted manifest (its chunk ids are not content addresses of the
    /// bytes) or a range past the end.
    pub fn slices(&self, offset: u64, len: u64) -> Option<Vec<StoredSlice>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.virtual_size && len <= u64::from(u32::MAX))?;
        if self.is_encrypted() {
            return None;
        }
        let cs = u64::from(self.chunk_size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let k = (pos / cs) as usize;
            let at = pos % cs;
            let n = (cs - at).min(end - pos) as u32;
            let s = match self.chunks.get(k)? {
                Some(id) => StoredSlice::Chunk {
                    chunk: id.0,
                    offset: at as u32,
                    len: n,
                },
                None => StoredSlice::Zero { len: n },
            };
            StoredSlice::push(&mut out, s);
            pos += u64::from(n);
        }
        Some(out)
    }

    /// Length of chunk `index` (the last chunk may be short; 0 past the end).
    pub fn chunk_len(&self, index: usize) -> u64 {
        let start = self.chunk_offset(index);
        self.virtual_size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size))
    }

    /// Distinct stored (non-zero) chunk ids, in order of first appearance.
    pub fn stored_chunks(&self) -> Vec<ChunkId> {
        self.stored_chunks_with_len()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Distinct stored chunk ids with their plaintext length, in order of first appearance.
    pub fn stored_chunks_with_len(&self) -> Vec<(ChunkId, u64)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, c) in self.chunks.iter().enumerate() {
            if let Some(id) = c {
                if seen.insert(*id) {
                    out.push((*id, self.chunk_len(i)));
                }
            }
        }
        out
    }

    /// Physical bytes: the sum of `chunk_len(id)` over distinct stored chunks. Pass the stored
    /// object size (e.g. with encryption overhead), or use [`Manifest::plain_physical_bytes`].
    pub fn physical_bytes(&self, chunk_len: &dyn Fn(&ChunkId) -> u64) -> u64 {
        self.stored_chunks().iter().map(chunk_len).sum()
    }

    /// Physical bytes counting each distinct stored chunk at its plaintext length, which the
    /// manifest itself knows (no backend access).
    pub fn plain_physical_bytes(&self) -> u64 {
        self.stored_chunks_with_len().iter().map(|(_, l)| l).sum()
    }

    /// Serializes to the binary form described in the module docs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32 * self.chunks.len() + TRAILER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.virtual_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(c.unwrap_or(ChunkId::RESERVED_ZERO).as_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// The id this manifest is stored under (BLAKE3 of [`Manifest::to_bytes`]).
    pub fn id(&self) -> ManifestId {
        ManifestId::hash(&self.to_bytes())
    }

    /// Parses and verifies a serialized manifest. `key` names it in errors. Every failure is a
    /// `Corrupt` error: a manifest is only ever written by this crate.
    pub fn from_bytes(bytes: &[u8], key: &str) -> Result<Self> {
        let bad = |reason: String| StoreError::corrupt(key, reason);
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(bad(format!("manifest too short ({} bytes)", bytes.len())));
        }
        let (body, sum) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("manifest checksum mismatch".into()));
        }
        if &body[0..8] != MAGIC {
            return Err(bad("bad manifest magic".into()));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != MANIFEST_VERSION && version != MANIFEST_VERSION_ENCRYPTED {
            return Err(bad(format!("unsupported manifest version {version}")));
        }
        let chunk_size = u32_at(12);
        let virtual_size = u64_at(16);
        let count = u64_at(24);
        let ids = &body[HEADER_LEN..];
        if ids.len() % 32 != 0 || (ids.len() / 32) as u64 != count {
            return Err(bad(format!(
                "manifest declares {count} chunks but holds {} bytes of ids",
                ids.len()
            )));
        }
        let chunks = ids
            .chunks_exact(32)
            .map(|c| {
                let mut id = [0u8; 32];
                id.copy_from_slice(c);
                (id != [0u8; 32]).then_some(ChunkId(id))
            })
            .collect();
        let m = if version == MANIFEST_VERSION_ENCRYPTED {
            Manifest::new_encrypted(virtual_size, chunk_size, chunks)
        } else {
            Manifest::new(virtual_size, chunk_size, chunks)
        };
        m.map_err(|e| bad(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let a = ChunkId::hash(b"a");
        let b = ChunkId::hash(b"b");
        Manifest::new(
            4096 * 4 + 10,
            4096,
            vec![Some(a), None, Some(b), Some(a), Some(b)],
        )
        .expect("valid")
    }

    #[test]
    fn round_trip_and_id() {
        let m = sample();
        let bytes = m.to_bytes();
        assert_eq!(bytes.len(), HEADER_LEN + 5 * 32 + TRAILER_LEN);
        assert_eq!(Manifest::from_bytes(&bytes, "k").expect("parse"), m);
        assert_eq!(m.id(), ManifestId::hash(&bytes));
        assert_eq!(m.stored_chunks().len(), 2);
        assert_eq!(m.chunk_len(4), 10);
        assert_eq!(m.chunk_len(5), 0);
        assert_eq!(m.plain_physical_bytes(), 4096 * 2);
        assert_eq!(m.physical_bytes(&|_| 7), 14);
        assert_eq!(m.logical_size(), 4096 * 4 + 10);
    }

    #[test]
    fn encrypted_flag_round_trips_and_changes_the_id() {
        let m = sample();
        let e = Manifest::new_encrypted(m.virtual_size(), m.chunk_size(), m.chunks().to_vec())
            .expect("valid");
        assert!(e.is_encrypted() && !m.is_encrypted());
        assert_ne!(e.id(), m.id());
        let back = Manifest::from_bytes(&e.to_bytes(), "k").expect("parse");
        assert!(back.is_encrypted());
        assert_eq!(back, e);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample().to_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            let e = Manifest::from_bytes(&b, "k").expect_err("flip must fail");
            assert!(e.is_corrupt(), "byte {i}: {e}");
        }
        assert!(Manifest::from_bytes(&bytes[..40], "k").is_err());
        assert!(Manifest::from_bytes(&[], "k").is_err());
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        // Wrong count.
        assert!(Manifest::new(4097, 4096, vec![None]).is_err());
        assert!(Manifest::new(0, 4096, vec![None]).is_err());
        assert!(Manifest::new(0, 4096, vec![]).is_ok());
        // Bad chunk sizes.
        assert!(Manifest::new(0, 0, vec![]).is_err());
        assert!(Manifest::new(0, MAX_CHUNK_SIZE + 1, vec![]).is_err());
        // Reserved id.
        assert!(Manifest::new(4096, 4096, vec![Some(ChunkId::RESERVED_ZERO)]).is_err());
        // A well-checksummed body with a count that does not match the size.
        let mut body = Manifest::new(8192, 4096, vec![None, None])
            .expect("m")
            .to_bytes();
        body.truncate(body.len() - TRAILER_LEN);
        body[16..24].copy_from_slice(&100_000u64.to_le_bytes());
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        assert!(Manifest::from_bytes(&body, "k")
            .expect_err("count mismatch")
            .is_corrupt());
    }

    #[test]
    fn ids_round_trip_as_hex_and_json() {
        let id = ChunkId::hash(b"x");
        assert_eq!(id.to_hex().parse::<ChunkId>().expect("parse"), id);
        let json = serde_json::to_string(&id).expect("json");
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).expect("de"), id);
        assert!("zz".parse::<ManifestId>().is_err());
    }
}
