//! Mark-and-sweep GC and fsck.
//!
//! GC needs no shared counters: the caller (the metadata database) names the live manifests;
//! everything else older than a grace period goes. Safety against concurrent ingests:
//! - a chunk an ingest writes is young (its mtime is "now");
//! - a chunk an ingest finds already stored is touched (mtime refreshed) at that moment and
//!   again by `put_manifest` just before the manifest is written;
//! - deletion is `Backend::delete_if_older`, atomic with respect to touch: a touch before it
//!   keeps the object, a touch after it fails, which makes the ingest rewrite the chunk (or,
//!   in `put_manifest`, fail instead of writing a manifest with a dangling reference);
//! - manifests not (yet) in the live set but younger than the grace period are kept and
//!   their chunks marked.
//!
//! - a composed chunk ([`crate::compose`]) that GC keeps (referenced, young, or refreshed
//!   before its conditional delete) keeps its source chunks: compositions are swept before
//!   chunks, and the sources of every kept one are marked; an ingest touches a composition's
//!   sources before writing it.
//!
//! So `grace` must exceed the longest ingest (a chunk written at its start must survive until
//! its manifest exists) and the longest GC run. Hours are reasonable; tests use seconds.
//!
//! **Backends without an atomic conditional delete** (S3: `delete_if_older` is a HEAD, then a
//! DELETE; [`crate::Backend::atomic_delete_if_older`] is `false`). A touch between GC's HEAD
//! and its DELETE would be lost, and the ingest would reference a deleted chunk. Closed by a
//! sweep marker, in the manner of Dekker's mutual exclusion (each side writes its flag, then
//! reads the other's; with a strongly consistent store at least one sees the other):
//! - GC writes a marker object `gc/sweep-<unique>` before its first conditional delete,
//!   rewrites it every [`MARKER_REFRESH`] and once more when the pass ends (it is deleted by a
//!   later pass once older than [`MARKER_STALE`]), and sends each DELETE only within
//!   [`DELETE_WINDOW`] of the HEAD it follows (else keeps the object);
//! - `put_manifest` touches every chunk (and the manifest if it exists), then lists `gc/`. No
//!   marker written within `MARKER_STALE` means no conditional delete had begun before the
//!   touches (a pass that had is still refreshing its marker, or ended less than
//!   `MARKER_STALE` ago, which `put_manifest` rules out by treating touches that took longer
//!   than half of it like a marker), so every HEAD GC does sees them fresh. Otherwise a HEAD
//!   may have preceded a touch: it waits [`SETTLE`] (> `DELETE_WINDOW`: every such DELETE
//!   has been sent) and checks that every chunk still exists (`NotFound` otherwise, nothing
//!   written) and that the manifest does (rewritten otherwise).
//!
//! What remains: a GC process paused for more than `SETTLE` between its window check and the
//! DELETE reaching S3, or for more than `MARKER_STALE` with its marker unrefreshed, and clock
//! skew between the nodes and the store beyond those margins. `openims admin fsck` reports
//! any loss (`missing_chunks`).

use crate::backend::{chunk_key, manifest_key, CHUNK_PREFIX, MANIFEST_PREFIX};
use crate::compose::{composed_key, sources, COMPOSED_PREFIX};
use crate::crypto::{check_encrypted_chunk, echunk_key, ECHUNK_PREFIX};
use crate::error::{Result, StoreError};
use crate::id::{ChunkId, ManifestId};
use crate::store::Store;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

/// Prefix of the sweep markers a GC pass writes on a backend without atomic conditional
/// deletes (see the module docs).
pub const SWEEP_MARKER_PREFIX: &str = "gc/";
/// The longest time between the HEAD of a non-atomic `delete_if_older` and its DELETE.
pub const DELETE_WINDOW: Duration = Duration::from_secs(1);
/// How long `put_manifest` waits, when a sweep is running, before it checks its chunks.
pub const SETTLE: Duration = Duration::from_secs(3);
/// How often a sweeping GC rewrites its marker.
pub const MARKER_REFRESH: Duration = Duration::from_secs(30);
/// A marker older than this belongs to a pass that ended or died long enough ago to be
/// ignored (and deleted).
pub const MARKER_STALE: Duration = Duration::from_secs(300);

/// The marker of one GC pass (see the module docs): written before the first conditional
/// delete, refreshed, deleted when dropped. Does nothing on a backend with atomic deletes.
struct SweepMarker<'a> {
    backend: &'a dyn crate::Backend,
    key: String,
    written: Option<std::time::Instant>,
}

impl<'a> SweepMarker<'a> {
    fn new(backend: &'a dyn crate::Backend) -> Self {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!(
            "{SWEEP_MARKER_PREFIX}sweep-{}-{nanos}-{seq}",
            std::process::id()
        );
        SweepMarker {
            backend,
            key,
            written: None,
        }
    }

    /// Called before every conditional delete.
    fn before_delete(&mut self) -> Result<()> {
        if self.backend.atomic_delete_if_older() {
            return Ok(());
        }
        if self.written.is_none_or(|t| t.elapsed() >= MARKER_REFRESH) {
            self.backend.put(&self.key, b"gc sweep in progress")?;
            self.written = Some(std::time::Instant::now());
        }
        Ok(())
    }
}

impl Drop for SweepMarker<'_> {
    fn drop(&mut self) {
        // Rewritten, not deleted: an ingest whose touch came between one of this pass's
        // HEADs and DELETEs may look for it later; a later pass deletes it once stale.
        if self.written.is_some() {
            if let Err(e) = self.backend.put(&self.key, b"gc sweep ended") {
                tracing::warn!(key = %self.key, error = %e, "gc sweep marker not rewritten");
            }
        }
    }
}

/// Deletes sweep markers older than [`MARKER_STALE`] (ended or dead passes).
fn delete_stale_markers(b: &dyn crate::Backend) -> Result<()> {
    if b.atomic_delete_if_older() {
        return Ok(());
    }
    let stale = SystemTime::now()
        .checked_sub(MARKER_STALE)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    for meta in b.list(SWEEP_MARKER_PREFIX)? {
        let meta = meta?;
        if meta.modified < stale {
            b.delete(&meta.key)?;
        }
    }
    Ok(())
}

impl Store {
    /// Whether a GC pass may be deleting objects or did lately (a sweep marker younger than
    /// [`MARKER_STALE`] exists); always `false` on a backend with atomic deletes.
    pub(crate) fn sweep_running(&self) -> Result<bool> {
        let b = &self.inner.backend;
        if b.atomic_delete_if_older() {
            return Ok(false);
        }
        let stale = SystemTime::now()
            .checked_sub(MARKER_STALE)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        for meta in b.list(SWEEP_MARKER_PREFIX)? {
            if meta?.modified >= stale {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// What a GC run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests deleted.
    pub manifests_deleted: u64,
    /// Bytes of deleted manifests.
    pub manifest_bytes_freed: u64,
    /// Chunks deleted.
    pub chunks_deleted: u64,
    /// Bytes of deleted chunks.
    pub chunk_bytes_freed: u64,
    /// Manifests kept because they are live.
    pub manifests_live: u64,
    /// Manifests kept because they are younger than the grace period (or were refreshed).
    pub manifests_young: u64,
    /// Chunks kept because a kept manifest references them.
    pub chunks_live: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub chunks_young: u64,
    /// Objects under the store's prefixes whose keys are not ours (left alone).
    pub foreign_keys: u64,
}

/// What fsck found. Orphans are not errors (GC removes them); everything else is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsckReport {
    /// Live manifests checked.
    pub manifests_checked: u64,
    /// Distinct referenced chunks checked (read and hashed).
    pub chunks_checked: u64,
    /// Bytes read and hashed.
    pub bytes_checked: u64,
    /// Live manifests that do not exist.
    pub missing_manifests: Vec<ManifestId>,
    /// Live manifests that exist but fail verification, with the reason.
    pub corrupt_manifests: Vec<(ManifestId, String)>,
    /// Referenced chunks that do not exist.
    pub missing_chunks: Vec<ChunkId>,
    /// Referenced chunks whose content does not match their id or expected length.
    pub corrupt_chunks: Vec<(ChunkId, String)>,
    /// Stored manifests not in the live set.
    pub orphan_manifests: Vec<ManifestId>,
    /// Stored chunks no live manifest references.
    pub orphan_chunks: Vec<ChunkId>,
    /// Keys under the store's prefixes that do not name a chunk or manifest.
    pub foreign_keys: Vec<String>,
}

impl FsckReport {
    /// True if nothing is missing or corrupt (orphans and foreign keys are tolerated).
    pub fn is_clean(&self) -> bool {
        self.missing_manifests.is_empty()
            && self.corrupt_manifests.is_empty()
            && self.missing_chunks.is_empty()
            && self.corrupt_chunks.is_empty()
    }
}

/// The manifest id named by a key, if it is exactly a manifest key.
fn parse_manifest_key(key: &str) -> Option<ManifestId> {
    let id = ManifestId::from_hex(key.strip_prefix(MANIFEST_PREFIX)?).ok()?;
    (manifest_key(&id) == key).then_some(id)
}

/// The chunk id named by a key, if it is exactly a chunk key.
fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    let id = ChunkId::from_hex(key.rsplit('/').next()?).ok()?;
    (chunk_key(&id) == key).then_some(id)
}

/// The encrypted chunk id named by a key, if it is exactly an encrypted chunk key.
fn parse_echunk_key(key: &str) -> Option<ChunkId> {
    let id = ChunkId::from_hex(key.rsplit('/').next()?).ok()?;
    (echunk_key(&id) == key).then_some(id)
}

/// The composed chunk id named by a key, if it is exactly a composed chunk key.
fn parse_composed_key(key: &str) -> Option<ChunkId> {
    let id = ChunkId::from_hex(key.rsplit('/').next()?).ok()?;
    (composed_key(&id) == key).then_some(id)
}

/// The two chunk namespaces: plaintext (`chunks/`) and encrypted (`echunks/`).
const NAMESPACES: [(bool, &str); 2] = [(false, CHUNK_PREFIX), (true, ECHUNK_PREFIX)];

fn parse_key(encrypted: bool, key: &str) -> Option<ChunkId> {
    if encrypted {
        parse_echunk_key(key)
    } else {
        parse_chunk_key(key)
    }
}

impl Store {
    /// Deletes manifests not in `live` and chunks referenced by no kept manifest, but only
    /// objects last modified more than `grace` ago (see the module docs for why this is safe
    /// with concurrent ingests). Refuses to sweep (returns the error) if a live or young
    /// manifest cannot be loaded: its chunks would be unknown.
    pub fn gc(&self, live: &[ManifestId], grace: Duration) -> Result<GcReport> {
        let b = &self.inner.backend;
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let live: HashSet<ManifestId> = live.iter().copied().collect();
        let mut report = GcReport::default();
        delete_stale_markers(b.as_ref())?;
        let mut marker = SweepMarker::new(b.as_ref());

        // 1. Manifests: delete old unlisted ones, keep the rest.
        let mut keep: Vec<ManifestId> = live.iter().copied().collect();
        for meta in b.list(MANIFEST_PREFIX)? {
            let meta = meta?;
            let Some(id) = parse_manifest_key(&meta.key) else {
                report.foreign_keys += 1;
                continue;
            };
            if live.contains(&id) {
                report.manifests_live += 1;
                continue;
            }
            if meta.modified >= cutoff {
                report.manifests_young += 1;
                keep.push(id);
                continue;
            }
            marker.before_delete()?;
            match b.delete_if_older(&meta.key, cutoff)? {
                Some(size) => {
                    report.manifests_deleted += 1;
                    report.manifest_bytes_freed += size;
                }
                None => {
                    report.manifests_young += 1;
                    keep.push(id);
                }
            }
        }

        // 2. Mark.
        // Plaintext and encrypted chunks are marked apart (index 0 and 1).
        let mut marked: [HashSet<ChunkId>; 2] = Default::default();
        for id in &keep {
            let m = match self.manifest(id) {
                Ok(m) => m,
                // A young manifest deleted meanwhile (by a concurrent GC) references nothing.
                Err(StoreError::NotFound(_)) if !live.contains(id) => continue,
                Err(e) => {
                    return Err(StoreError::Invalid(format!(
                        "gc refused: manifest {id} cannot be loaded ({e}); run fsck"
                    )))
                }
            };
            marked[usize::from(m.is_encrypted())].extend(m.chunks().iter().flatten().copied());
        }

        // 3. Composed chunks: sweep the unmarked old ones; a kept one keeps its sources.
        for meta in b.list(COMPOSED_PREFIX)? {
            let meta = meta?;
            let Some(id) = parse_composed_key(&meta.key) else {
                report.foreign_keys += 1;
                continue;
            };
            if marked[0].contains(&id) {
                report.chunks_live += 1;
            } else if meta.modified >= cutoff {
                report.chunks_young += 1;
            } else {
                marker.before_delete()?;
                if let Some(size) = b.delete_if_older(&meta.key, cutoff)? {
                    report.chunks_deleted += 1;
                    report.chunk_bytes_freed += size;
                    continue;
                }
                report.chunks_young += 1;
            }
            match self.composition(&id) {
                Ok(Some(slices)) => marked[0].extend(sources(&slices)),
                // Deleted meanwhile by a concurrent GC: it keeps nothing.
                Ok(None) => {}
                Err(e) => {
                    return Err(StoreError::Invalid(format!(
                        "gc refused: composed chunk {id} cannot be read ({e}); run fsck"
                    )))
                }
            }
        }

        // 4. Sweep chunks of both namespaces.
        for (encrypted, prefix) in NAMESPACES {
            let marked = &marked[usize::from(encrypted)];
            for meta in b.list(prefix)? {
                let meta = meta?;
                let Some(id) = parse_key(encrypted, &meta.key) else {
                    report.foreign_keys += 1;
                    continue;
                };
                if marked.contains(&id) {
                    report.chunks_live += 1;
                } else if meta.modified >= cutoff {
                    report.chunks_young += 1;
                } else {
                    marker.before_delete()?;
                    match b.delete_if_older(&meta.key, cutoff)? {
                        Some(size) => {
                            report.chunks_deleted += 1;
                            report.chunk_bytes_freed += size;
                        }
                        None => report.chunks_young += 1,
                    }
                }
            }
        }
        tracing::info!(?report, "gc finished");
        Ok(report)
    }

    /// Verifies the store against the live manifests: each parses and matches its id, each
    /// chunk they reference exists with the right content and length. Lists orphans. Reads
    /// every referenced chunk (using `ingest_workers` threads).
    pub fn fsck(&self, live: &[ManifestId]) -> Result<FsckReport> {
        let b = &self.inner.backend;
        let mut report = FsckReport::default();
        let live_set: HashSet<ManifestId> = live.iter().copied().collect();
        // (chunk, encrypted?) -> plaintext length.
        let mut expected: HashMap<(ChunkId, bool), u64> = HashMap::new();
        let mut checked = HashSet::new();
        for id in live {
            if !checked.insert(*id) {
                continue;
            }
            report.manifests_checked += 1;
            match self.manifest(id) {
                Ok(m) => {
                    let enc = m.is_encrypted();
                    expected.extend(
                        m.stored_chunks_with_len()
                            .into_iter()
                            .map(|(c, l)| ((c, enc), l)),
                    )
                }
                Err(StoreError::NotFound(_)) => report.missing_manifests.push(*id),
                Err(StoreError::Corrupt { reason, .. }) => {
                    report.corrupt_manifests.push((*id, reason))
                }
                Err(e) => return Err(e),
            }
        }

        // Verify chunks in parallel.
        let todo: Vec<((ChunkId, bool), u64)> = expected.iter().map(|(k, v)| (*k, *v)).collect();
        let threads = self.inner.config.ingest_workers.max(1);
        let per = todo.len().div_ceil(threads).max(1);
        type Part = (Vec<ChunkId>, Vec<(ChunkId, String)>, u64, u64);
        let parts: Vec<Result<Part>> = std::thread::scope(|s| {
            let handles: Vec<_> = todo
                .chunks(per)
                .map(|part| {
                    s.spawn(move || -> Result<Part> {
                        let (mut missing, mut corrupt, mut n, mut bytes) =
                            (Vec::new(), Vec::new(), 0u64, 0u64);
                        for ((id, enc), len) in part {
                            n += 1;
                            // Encrypted chunks are checked without a key: framing, nonce
                            // bound to the id, ciphertext checksum, length.
                            let got = if *enc {
                                self.read_object(true, id)
                                    .and_then(|o| check_encrypted_chunk(id, &o))
                            } else {
                                self.get_chunk_buf(id).map(|d| d.len() as u64)
                            };
                            match got {
                                Ok(l) if l == *len => bytes += *len,
                                Ok(l) => corrupt
                                    .push((*id, format!("{l} bytes, manifests expect {len}"))),
                                Err(StoreError::NotFound(_)) => missing.push(*id),
                                Err(StoreError::Corrupt { reason, .. }) => {
                                    corrupt.push((*id, reason))
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        Ok((missing, corrupt, n, bytes))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(StoreError::Invalid("fsck thread panicked".into())))
                })
                .collect()
        });
        for p in parts {
            let (missing, corrupt, n, bytes) = p?;
            report.missing_chunks.extend(missing);
            report.corrupt_chunks.extend(corrupt);
            report.chunks_checked += n;
            report.bytes_checked += bytes;
        }
        report.missing_chunks.sort();
        report.corrupt_chunks.sort();

        // Composed chunks: referenced ones hold their sources (checked above by the read of
        // the composed chunk); unreferenced ones are orphans.
        let mut held: HashSet<ChunkId> = HashSet::new();
        for meta in b.list(COMPOSED_PREFIX)? {
            let meta = meta?;
            match parse_composed_key(&meta.key) {
                Some(id) if expected.contains_key(&(id, false)) => {
                    if let Ok(Some(slices)) = self.composition(&id) {
                        held.extend(sources(&slices));
                    }
                }
                Some(id) => report.orphan_chunks.push(id),
                None => report.foreign_keys.push(meta.key),
            }
        }

        for meta in b.list(MANIFEST_PREFIX)? {
            let meta = meta?;
            match parse_manifest_key(&meta.key) {
                Some(id) if !live_set.contains(&id) => report.orphan_manifests.push(id),
                Some(_) => {}
                None => report.foreign_keys.push(meta.key),
            }
        }
        for (encrypted, prefix) in NAMESPACES {
            for meta in b.list(prefix)? {
                let meta = meta?;
                match parse_key(encrypted, &meta.key) {
                    Some(id)
                        if !expected.contains_key(&(id, encrypted))
                            && (encrypted || !held.contains(&id)) =>
                    {
                        report.orphan_chunks.push(id)
                    }
                    Some(_) => {}
                    None => report.foreign_keys.push(meta.key),
                }
            }
        }
        report.orphan_manifests.sort();
        report.orphan_chunks.sort();
        report.foreign_keys.sort();
        Ok(report)
    }
}
