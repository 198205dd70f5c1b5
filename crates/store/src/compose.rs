//! Composed chunks: a plaintext chunk stored as byte ranges of other stored chunks.
//!
//! A disk image uploaded to a bucket is already in the store, as the chunks of the object's
//! parts. Importing it cuts the *virtual disk* into chunks, whose bytes lie at other offsets
//! of the file (after a qcow2 header and tables, in clusters): the image's chunks are byte
//! ranges of the object's chunks. Instead of writing those bytes a second time, the ingest
//! stores such a chunk as a small **composition** under `composed/ab/cd/<id>`: the list of
//! pieces (`len` bytes of source chunk `S` from `offset`, `len` zeros, or a few bytes held
//! inline) that make it up. The other way round, an export whose format interleaves the
//! disk's bytes with its own (a VHD block's sector bitmap before its data) stores the chunks
//! of the object it writes as compositions of the image's chunks and those few inline bytes
//! ([`Store::put_chunk_described`]).
//!
//! - The chunk keeps its id: the BLAKE3 of its bytes, hashed by the ingest as for any chunk.
//!   Manifests, dedup, copies, replication and metering see an ordinary chunk; only the store
//!   knows how it is kept.
//! - A read assembles it from its sources, each read whole and verified against its own id,
//!   and verifies the assembled bytes against the chunk's id, like any chunk read. A small
//!   cache of the last sources read keeps a sequential read from reading a source twice.
//! - One level only: sources are stored chunks (`chunks/`), never compositions (a range of a
//!   composed chunk is replaced by the matching range of its own pieces), so a read costs a
//!   bounded number of object reads ([`MAX_SOURCES`]).
//! - GC keeps the sources of every composition it keeps (see [`crate::gc`]); the ingest
//!   touches every source before it writes a composition, as it touches a chunk it reuses,
//!   so a sweep cannot take a source away under it.
//! - Only on backends whose conditional delete is atomic (the local file system, memory):
//!   the sweep-marker protocol of the S3 backend re-checks a manifest's chunks, not their
//!   sources, so an ingest there writes every chunk in full.
//!
//! Wire format: magic `OIMSCMP1`, the chunk's length (u32 LE), the piece count (u32 LE),
//! then per piece a tag byte (0: zeros, `len` u32; 1: source, 32-byte id, `offset` u32,
//! `len` u32; 2: inline, `len` u32 and the bytes), then the BLAKE3 of everything before it.

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
/// Most bytes one composition may hold inline: a chunk with more bytes the store does not
/// hold is written in full.
pub const MAX_INLINE: usize = 64 << 10;
/// Most pieces one composition may hold.
const MAX_PIECES: usize = 4096;
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

/// One piece of a composition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Bytes of a stored chunk, or zeros.
    Slice(StoredSlice),
    /// Bytes held in the composition itself.
    Inline(Vec<u8>),
}

impl Piece {
    /// Pieces of stored chunks' bytes and zeros.
    pub(crate) fn from_slices(slices: Vec<StoredSlice>) -> Vec<Piece> {
        slices.into_iter().map(Piece::Slice).collect()
    }

    fn len(&self) -> u64 {
        match self {
            Piece::Slice(s) => u64::from(s.len()),
            Piece::Inline(b) => b.len() as u64,
        }
    }

    /// Appends `p` to `v`, merging it with the last piece when it continues it.
    fn push(v: &mut Vec<Piece>, p: Piece) {
        if p.len() == 0 {
            return;
        }
        match (v.last_mut(), p) {
            (Some(Piece::Slice(last)), Piece::Slice(s)) => {
                if !last.extend(&s) {
                    v.push(Piece::Slice(s));
                }
            }
            (Some(Piece::Inline(a)), Piece::Inline(b)) => a.extend_from_slice(&b),
            (_, p) => v.push(p),
        }
    }

    /// The part of `pieces` (covering consecutive bytes) that covers `[from, from + len)`.
    fn range(pieces: &[Piece], from: u64, len: u64) -> Vec<Piece> {
        let end = from.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = 0u64;
        for p in pieces {
            let (a, b) = (pos, pos + p.len());
            pos = b;
            let (lo, hi) = (a.max(from), b.min(end));
            if lo >= hi {
                continue;
            }
            let part = match p {
                Piece::Slice(s) => {
                    let r = StoredSlice::range(std::slice::from_ref(s), lo - a, hi - lo);
                    r.into_iter().map(Piece::Slice).collect()
                }
                Piece::Inline(bytes) => vec![Piece::Inline(
                    bytes[(lo - a) as usize..(hi - a) as usize].to_vec(),
                )],
            };
            part.into_iter().for_each(|p| Piece::push(&mut out, p));
        }
        out
    }
}

/// Serializes a composition of `len` bytes.
fn to_bytes(len: u32, pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + pieces.len() * 41 + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for p in pieces {
        match p {
            Piece::Slice(StoredSlice::Zero { len }) => {
                out.push(0);
                out.extend_from_slice(&len.to_le_bytes());
            }
            Piece::Slice(StoredSlice::Chunk { chunk, offset, len }) => {
                out.push(1);
                out.extend_from_slice(chunk);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Piece::Inline(bytes) => {
                out.push(2);
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Parses a composition: `(length, pieces)`; `Corrupt` (naming `key`) on any inconsistency.
fn from_bytes(b: &[u8], key: &str) -> Result<(u32, Vec<Piece>)> {
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
    if len == 0 || len > MAX_CHUNK_SIZE || count == 0 || count > MAX_PIECES {
        return Err(bad("length or piece count out of range"));
    }
    let mut pieces = Vec::with_capacity(count);
    let mut p = 16;
    let mut total = 0u64;
    for _ in 0..count {
        let piece = match body.get(p) {
            Some(0) => {
                p += 5;
                Piece::Slice(StoredSlice::Zero {
                    len: u32_at(p - 4)?,
                })
            }
            Some(1) => {
                let chunk: [u8; 32] = body
                    .get(p + 1..p + 33)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| bad("truncated"))?;
                p += 41;
                Piece::Slice(StoredSlice::Chunk {
                    chunk,
                    offset: u32_at(p - 8)?,
                    len: u32_at(p - 4)?,
                })
            }
            Some(2) => {
                let n = u32_at(p + 1)? as usize;
                if n > MAX_INLINE {
                    return Err(bad("inline piece too long"));
                }
                let bytes = body.get(p + 5..p + 5 + n).ok_or_else(|| bad("truncated"))?;
                p += 5 + n;
                Piece::Inline(bytes.to_vec())
            }
            _ => return Err(bad("bad piece tag")),
        };
        if piece.len() == 0 {
            return Err(bad("empty piece"));
        }
        total += piece.len();
        pieces.push(piece);
    }
    if p != body.len() || total != u64::from(len) {
        return Err(bad("pieces do not add up to the chunk"));
    }
    Ok((len, pieces))
}

/// The distinct source chunks of `pieces`, in order of first appearance.
pub(crate) fn sources(pieces: &[Piece]) -> Vec<ChunkId> {
    let mut out: Vec<ChunkId> = Vec::new();
    for p in pieces {
        if let Piece::Slice(StoredSlice::Chunk { chunk, .. }) = p {
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

    /// Stores `data` (a chunk's bytes, not all zeros) and returns its id: as a composition
    /// when `known` says where most of its bytes already are (`(offset in data, slice)`,
    /// ordered, not overlapping; the rest is held inline, at most [`MAX_INLINE`] bytes), else
    /// as its bytes. Not durable until [`Store::sync`] or [`Store::put_manifest`].
    pub fn put_chunk_described(
        &self,
        data: &[u8],
        known: &[(u32, StoredSlice)],
    ) -> Result<ChunkId> {
        let mut pieces = Vec::new();
        let mut pos = 0usize;
        for (at, s) in known {
            let at = *at as usize;
            let end = at + s.len() as usize;
            if at < pos || end > data.len() {
                return Err(StoreError::Invalid(
                    "put_chunk_described: slices out of order or past the data".into(),
                ));
            }
            Piece::push(&mut pieces, Piece::Inline(data[pos..at].to_vec()));
            Piece::push(&mut pieces, Piece::Slice(*s));
            pos = end;
        }
        Piece::push(&mut pieces, Piece::Inline(data[pos..].to_vec()));
        let id = ChunkId::hash(data);
        self.put_chunk_from(id, data, Some(pieces))?;
        Ok(id)
    }

    /// Stores chunk `id` (the hash of `data`) as a composition of `pieces` if they add up to
    /// `data` and, once every range of a composed source is replaced by that source's own
    /// pieces, name at most [`MAX_SOURCES`] stored chunks (each is touched, so a running GC
    /// keeps it) and hold at most [`MAX_INLINE`] bytes inline. Returns `false` without writing
    /// anything otherwise (the caller stores the bytes). The caller has checked that the chunk
    /// is not stored yet.
    pub(crate) fn put_composed(
        &self,
        id: &ChunkId,
        data: &[u8],
        pieces: Vec<Piece>,
    ) -> Result<bool> {
        let total: u64 = pieces.iter().map(Piece::len).sum();
        if total != data.len() as u64 {
            return Ok(false);
        }
        let b = &self.inner.backend;
        let mut flat = Vec::new();
        for p in pieces {
            match p {
                Piece::Slice(StoredSlice::Chunk { chunk, offset, len })
                    if !b.exists(&chunk_key(&ChunkId(chunk)))? =>
                {
                    let Some(sub) = self.composition(&ChunkId(chunk))? else {
                        return Ok(false);
                    };
                    let part = Piece::range(&sub, u64::from(offset), u64::from(len));
                    part.into_iter().for_each(|p| Piece::push(&mut flat, p));
                }
                p => Piece::push(&mut flat, p),
            }
        }
        let srcs = sources(&flat);
        let inline: usize = flat
            .iter()
            .map(|p| match p {
                Piece::Inline(b) => b.len(),
                Piece::Slice(_) => 0,
            })
            .sum();
        if flat.len() > MAX_PIECES
            || srcs.is_empty()
            || srcs.len() > MAX_SOURCES
            || inline > MAX_INLINE
            || srcs.contains(id)
        {
            return Ok(false);
        }
        for s in &srcs {
            if !b.touch(&chunk_key(s))? {
                return Ok(false);
            }
        }
        b.put(&composed_key(id), &to_bytes(data.len() as u32, &flat))?;
        // Test builds read every composition back: a reader whose slices disagree with its
        // bytes fails the ingest there instead of leaving an unreadable chunk.
        #[cfg(debug_assertions)]
        if self.read_composed(id)?.as_deref() != Some(data) {
            let _ = b.delete(&composed_key(id));
            return Err(StoreError::Invalid(format!(
                "the pieces given for chunk {id} do not reproduce its bytes"
            )));
        }
        Ok(true)
    }

    /// The pieces of composed chunk `id`; `None` if it is not stored as a composition.
    pub(crate) fn composition(&self, id: &ChunkId) -> Result<Option<Vec<Piece>>> {
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
        let Some(pieces) = self.composition(id)? else {
            return Ok(None);
        };
        let len: u64 = pieces.iter().map(Piece::len).sum();
        let mut out = ObjectBuf::pooled(len as usize);
        let mut pos = 0usize;
        for p in &pieces {
            let n = p.len() as usize;
            let to = &mut out[pos..pos + n];
            match p {
                Piece::Slice(StoredSlice::Zero { .. }) => to.fill(0),
                Piece::Inline(bytes) => to.copy_from_slice(bytes),
                Piece::Slice(StoredSlice::Chunk { chunk, offset, .. }) => {
                    let src = self.source_chunk(&ChunkId(*chunk))?;
                    let at = *offset as usize;
                    let part = src.get(at..at + n).ok_or_else(|| {
                        StoreError::corrupt(
                            composed_key(id),
                            format!(
                                "slice {at}+{n} lies outside its source chunk of {} bytes",
                                src.len()
                            ),
                        )
                    })?;
                    to.copy_from_slice(part);
                }
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
        crate::store::verified(id, self.read_stored(false, id)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let pieces = vec![
            Piece::Slice(StoredSlice::Chunk {
                chunk: [7; 32],
                offset: 4096,
                len: 1000,
            }),
            Piece::Slice(StoredSlice::Zero { len: 24 }),
            Piece::Inline(vec![0xff; 512]),
            Piece::Slice(StoredSlice::Chunk {
                chunk: [9; 32],
                offset: 0,
                len: 2560,
            }),
        ];
        let b = to_bytes(4096, &pieces);
        assert_eq!(from_bytes(&b, "k").unwrap(), (4096, pieces.clone()));
        // Any flipped byte is caught by the checksum.
        for i in [0, 9, 17, 50, 80, b.len() - 1] {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(from_bytes(&c, "k").unwrap_err().is_corrupt(), "byte {i}");
        }
        // Pieces that do not add up to the length are refused.
        let short = to_bytes(5000, &pieces);
        assert!(from_bytes(&short, "k").unwrap_err().is_corrupt());
        assert_eq!(sources(&pieces), vec![ChunkId([7; 32]), ChunkId([9; 32])]);
        // A range of the pieces, across all three kinds.
        let r = Piece::range(&pieces, 990, 1000);
        assert_eq!(
            r,
            vec![
                Piece::Slice(StoredSlice::Chunk {
                    chunk: [7; 32],
                    offset: 5086,
                    len: 10,
                }),
                Piece::Slice(StoredSlice::Zero { len: 24 }),
                Piece::Inline(vec![0xff; 512]),
                Piece::Slice(StoredSlice::Chunk {
                    chunk: [9; 32],
                    offset: 0,
                    len: 454,
                }),
            ]
        );
    }
}
