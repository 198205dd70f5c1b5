//! `Store::ingest`: virtual disk -> chunks + manifest.
//!
//! The caller's thread walks the disk (allocation map first, so holes are never read) and
//! reads data chunks into a small pool of buffers; `ingest_workers` threads zero-check, hash
//! and write them. Read, hash and write overlap; memory stays at a few chunks whatever the
//! disk size.

use crate::error::{Result, StoreError};
use crate::id::{ChunkId, ManifestId};
use crate::manifest::{chunk_count, Manifest, MAX_CHUNKS};
use crate::store::{Put, Store};
use openims_format::io::{Extent, ExtentKind, StoredSlice};
use openims_format::VirtualDisk;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver};
use std::sync::{Arc, Mutex};

/// Chunks whose allocation map is asked for at once.
const EXTENT_WINDOW_CHUNKS: u64 = 64;
/// Progress is reported at least every this many zero (hole) chunks.
const ZERO_PROGRESS_EVERY: u64 = 1024;

/// Progress of a running ingest, reported from the caller's thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestProgress {
    /// Virtual bytes fully processed (chunks finished, in any order).
    pub bytes_done: u64,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Chunks finished.
    pub chunks_done: u64,
    /// Total chunks.
    pub chunks_total: u64,
    /// Chunks written so far (not already stored).
    pub new_chunks: u64,
    /// Bytes written so far.
    pub new_bytes: u64,
}

/// Outcome of a successful ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestReport {
    /// The manifest written (durable).
    pub manifest_id: ManifestId,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Total chunks in the manifest (zero ones included).
    pub chunk_count: u64,
    /// Distinct stored (non-zero) chunks the manifest references.
    pub stored_chunks: u64,
    /// Chunks this ingest wrote (the rest were already stored or repeated).
    pub new_chunks: u64,
    /// Bytes this ingest wrote (chunk payloads).
    pub new_bytes: u64,
    /// Of the new chunks, those stored as compositions of chunks the store held (bytes of an
    /// uploaded file, see [`crate::compose`]): counted in `new_chunks`, not in `new_bytes`.
    pub composed_chunks: u64,
    /// All-zero chunks (holes or zero data), not stored.
    pub zero_chunks: u64,
    /// Chunks taken over from a resume checkpoint (not read by this run).
    pub resumed_chunks: u64,
}

/// A resumable ingest's progress: chunks `[0, next_index)` are durably stored and listed by
/// `partial`, a manifest of exactly those chunks (virtual size `next_index * chunk_size`).
/// Whoever persists a checkpoint must keep `partial` alive (GC) until the ingest ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestCheckpoint {
    pub partial: ManifestId,
    pub next_index: u64,
}

/// Checkpointing of [`Store::ingest_resumable`]: once `every` chunks were read from the
/// source since the last checkpoint, a partial manifest of the finished prefix is written and
/// `save` is called; an error from `save` stops the ingest. Holes and chunks referenced
/// without reading cost nothing to redo, so they do not count: a sparse disk is not synced
/// and recorded once per `every` chunks of its empty space.
pub struct Checkpointing<'a> {
    pub every: u64,
    pub save: &'a mut dyn FnMut(IngestCheckpoint) -> Result<()>,
}

/// True if every byte of `buf` is zero. Word-wise with early exit; vectorizes.
pub fn is_all_zero(buf: &[u8]) -> bool {
    const BLOCK: usize = 256;
    let mut blocks = buf.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            acc |= u64::from_ne_bytes(a);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Whether `[start, end)` is entirely covered by `Zero` extents of `extents` (ordered).
fn range_is_hole(extents: &[Extent], start: u64, end: u64) -> bool {
    let first = extents.partition_point(|e| e.offset.saturating_add(e.len) <= start);
    let mut pos = start;
    for e in &extents[first..] {
        if pos >= end {
            break;
        }
        if e.offset > pos || e.kind != ExtentKind::Zero {
            return false;
        }
        pos = e.offset.saturating_add(e.len);
    }
    pos >= end
}

enum Outcome {
    Zero,
    Stored { id: ChunkId, put: Put },
}

struct Job {
    index: usize,
    buf: Vec<u8>,
    len: usize,
    /// Where the chunk's bytes already are in the store, if the disk knows.
    slices: Option<Vec<StoredSlice>>,
}

struct Done {
    index: usize,
    len: u64,
    outcome: Outcome,
}

struct Tally {
    chunks: Vec<Option<ChunkId>>,
    /// Which chunks are finished (the caller's checkpoints need the finished prefix).
    finished: Vec<bool>,
    /// Every chunk before this index is finished.
    prefix: usize,
    progress: IngestProgress,
    zero_chunks: u64,
    composed_chunks: u64,
    zeros_unreported: u64,
}

impl Tally {
    fn record(&mut self, d: Done, progress: &mut dyn FnMut(IngestProgress)) {
        if let Some(f) = self.finished.get_mut(d.index) {
            *f = true;
        }
        while self.finished.get(self.prefix).copied().unwrap_or(false) {
            self.prefix += 1;
        }
        let p = &mut self.progress;
        p.chunks_done += 1;
        p.bytes_done += d.len;
        let report = match d.outcome {
            Outcome::Zero => {
                self.zero_chunks += 1;
                self.zeros_unreported += 1;
                self.zeros_unreported >= ZERO_PROGRESS_EVERY
            }
            Outcome::Stored { id, put } => {
                if let Some(slot) = self.chunks.get_mut(d.index) {
                    *slot = Some(id);
                }
                match put {
                    Put::Present => {}
                    Put::Written => {
                        p.new_chunks += 1;
                        p.new_bytes += d.len;
                    }
                    Put::Composed => {
                        p.new_chunks += 1;
                        self.composed_chunks += 1;
                    }
                }
                true
            }
        };
        if report || p.chunks_done == p.chunks_total {
            self.zeros_unreported = 0;
            progress(*p);
        }
    }
}

impl Store {
    /// Stores a virtual disk: chunks not already stored, then its manifest. Returns once the
    /// manifest and every chunk it references are durable. On any error no manifest is
    /// written (chunks already written stay until GC removes them).
    pub fn ingest(
        &self,
        disk: &mut dyn VirtualDisk,
        progress: &mut dyn FnMut(IngestProgress),
    ) -> Result<IngestReport> {
        self.ingest_resumable(disk, None, None, progress)
    }

    /// [`Store::ingest`] that checkpoints (`checkpointing`) and resumes from a checkpoint of
    /// an earlier run over the same disk (`resume`): chunks before its `next_index` are taken
    /// from its partial manifest and not read again. A checkpoint that does not fit the disk
    /// (another chunk size or length, partial manifest gone) is ignored: the ingest starts
    /// over. `IngestReport::resumed_chunks` says how many chunks were taken over.
    pub fn ingest_resumable(
        &self,
        disk: &mut dyn VirtualDisk,
        resume: Option<IngestCheckpoint>,
        mut checkpointing: Option<Checkpointing<'_>>,
        progress: &mut dyn FnMut(IngestProgress),
    ) -> Result<IngestReport> {
        let cfg = &self.inner.config;
        let virtual_size = disk.virtual_size();
        if virtual_size > cfg.max_virtual_size {
            return Err(StoreError::Invalid(format!(
                "virtual size {virtual_size} exceeds the limit {}",
                cfg.max_virtual_size
            )));
        }
        let cs = u64::from(cfg.chunk_size);
        let total = chunk_count(virtual_size, cfg.chunk_size);
        if total > MAX_CHUNKS {
            return Err(StoreError::Invalid(format!(
                "{total} chunks exceed the per-manifest limit {MAX_CHUNKS}; raise chunk_size"
            )));
        }
        let total_usize =
            usize::try_from(total).map_err(|_| StoreError::Invalid("too many chunks".into()))?;
        let mut tally = Tally {
            chunks: vec![None; total_usize],
            finished: vec![false; total_usize],
            prefix: 0,
            progress: IngestProgress {
                bytes_done: 0,
                virtual_size,
                chunks_done: 0,
                chunks_total: total,
                new_chunks: 0,
                new_bytes: 0,
            },
            zero_chunks: 0,
            composed_chunks: 0,
            zeros_unreported: 0,
        };
        let resumed = match resume {
            Some(r) => self.take_over(r, virtual_size, total, &mut tally),
            None => 0,
        };
        if total == 0 || resumed > 0 {
            progress(tally.progress);
        }

        let workers = cfg.ingest_workers.max(1);
        let max_buffers = workers + 2;
        let claimed: Mutex<HashSet<ChunkId>> = Mutex::default();
        let abort = AtomicBool::new(false);

        let result: Result<()> = std::thread::scope(|s| {
            let (job_tx, job_rx) = sync_channel::<Job>(workers);
            let job_rx = Arc::new(Mutex::new(job_rx));
            let (pool_tx, pool_rx) = channel::<Vec<u8>>();
            let (done_tx, done_rx) = channel::<Result<Done>>();
            for _ in 0..workers {
                let job_rx = Arc::clone(&job_rx);
                let pool_tx = pool_tx.clone();
                let done_tx = done_tx.clone();
                let (claimed, abort) = (&claimed, &abort);
                s.spawn(move || worker(self, &job_rx, &pool_tx, &done_tx, claimed, abort));
            }
            drop(done_tx);
            drop(pool_tx);

            let read = self.feed(
                disk,
                cs,
                virtual_size,
                (resumed, total),
                checkpointing.as_mut(),
                max_buffers,
                &pool_rx,
                &job_tx,
                &done_rx,
                &mut tally,
                progress,
            );
            drop(job_tx);
            if read.is_err() {
                abort.store(true, Ordering::Relaxed);
            }
            // Drain: workers exit once the job channel is closed and empty.
            let mut first_err = read.err();
            for r in done_rx.iter() {
                match r {
                    Ok(d) if first_err.is_none() => tally.record(d, progress),
                    Ok(_) => {}
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        first_err.get_or_insert(e);
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(()),
            }
        });
        result?;

        if tally.progress.chunks_done != total {
            return Err(StoreError::Invalid(format!(
                "ingest finished {} of {total} chunks",
                tally.progress.chunks_done
            )));
        }
        let manifest = Manifest::new(virtual_size, cfg.chunk_size, tally.chunks)?;
        let stored_chunks = manifest.stored_chunks().len() as u64;
        let manifest_id = self.put_manifest(&manifest)?;
        tracing::debug!(%manifest_id, virtual_size, new_chunks = tally.progress.new_chunks, "ingested");
        Ok(IngestReport {
            manifest_id,
            virtual_size,
            chunk_count: total,
            stored_chunks,
            new_chunks: tally.progress.new_chunks,
            new_bytes: tally.progress.new_bytes,
            composed_chunks: tally.composed_chunks,
            zero_chunks: tally.zero_chunks,
            resumed_chunks: resumed,
        })
    }

    /// Applies a resume checkpoint to `tally` if it fits this disk; returns the chunks taken.
    fn take_over(
        &self,
        r: IngestCheckpoint,
        virtual_size: u64,
        total: u64,
        tally: &mut Tally,
    ) -> u64 {
        let cfg = &self.inner.config;
        let cs = u64::from(cfg.chunk_size);
        let n = r.next_index;
        let fits = |m: &Manifest| {
            n < total
                && m.chunk_size() == cfg.chunk_size
                && m.chunks().len() as u64 == n
                && m.virtual_size() == n * cs
                && !m.is_encrypted()
        };
        let m = match self.manifest(&r.partial) {
            Ok(m) if fits(&m) => m,
            Ok(_) => {
                tracing::warn!(partial = %r.partial, "ingest checkpoint does not fit the disk; starting over");
                return 0;
            }
            Err(e) => {
                tracing::warn!(partial = %r.partial, error = %e, "ingest checkpoint unreadable; starting over");
                return 0;
            }
        };
        let n_usize = n as usize;
        tally.chunks[..n_usize].copy_from_slice(m.chunks());
        tally.finished[..n_usize].fill(true);
        tally.prefix = n_usize;
        tally.zero_chunks = m.chunks().iter().filter(|c| c.is_none()).count() as u64;
        let p = &mut tally.progress;
        p.chunks_done = n;
        p.bytes_done = (n * cs).min(virtual_size);
        n
    }

    /// Writes a partial manifest of the finished prefix and hands it to `cp.save` when
    /// `cp.every` chunks were read (`read`, reset here) since the last checkpoint and the
    /// prefix grew past it (`last`).
    fn maybe_checkpoint(
        &self,
        cp: &mut Checkpointing<'_>,
        tally: &Tally,
        total: u64,
        (last, read): (&mut u64, &mut u64),
    ) -> Result<()> {
        let n = tally.prefix as u64;
        if n >= total || n <= *last || *read < cp.every.max(1) {
            return Ok(());
        }
        let cfg = &self.inner.config;
        let m = Manifest::new(
            n * u64::from(cfg.chunk_size),
            cfg.chunk_size,
            tally.chunks[..tally.prefix].to_vec(),
        )?;
        // Durable with every chunk it lists before the caller may persist it.
        let partial = self.put_manifest(&m)?;
        (cp.save)(IngestCheckpoint {
            partial,
            next_index: n,
        })?;
        *last = n;
        *read = 0;
        Ok(())
    }

    /// The reading side of `ingest` (caller's thread). Stops at the first error, its own or a
    /// worker's.
    #[allow(clippy::too_many_arguments)]
    fn feed(
        &self,
        disk: &mut dyn VirtualDisk,
        cs: u64,
        virtual_size: u64,
        (first, total): (u64, u64),
        mut checkpointing: Option<&mut Checkpointing<'_>>,
        max_buffers: usize,
        pool_rx: &Receiver<Vec<u8>>,
        job_tx: &std::sync::mpsc::SyncSender<Job>,
        done_rx: &Receiver<Result<Done>>,
        tally: &mut Tally,
        progress: &mut dyn FnMut(IngestProgress),
    ) -> Result<()> {
        let mut allocated = 0usize;
        let mut window: Vec<Extent> = Vec::new();
        let mut window_end = 0u64;
        let mut last_checkpoint = first;
        let mut read_since_checkpoint = 0u64;
        for index in first..total {
            // Handle finished chunks; stop early on a worker error.
            while let Ok(r) = done_rx.try_recv() {
                tally.record(r?, progress);
            }
            if let Some(cp) = checkpointing.as_deref_mut() {
                self.maybe_checkpoint(
                    cp,
                    tally,
                    total,
                    (&mut last_checkpoint, &mut read_since_checkpoint),
                )?;
            }
            let start = index * cs;
            let len = (virtual_size - start).min(cs);
            if start >= window_end {
                let wlen = (virtual_size - start).min(cs * EXTENT_WINDOW_CHUNKS);
                window = disk.extents(start, wlen)?;
                window_end = start + wlen;
            }
            if range_is_hole(&window, start, start + len) {
                tally.record(
                    Done {
                        index: index as usize,
                        len,
                        outcome: Outcome::Zero,
                    },
                    progress,
                );
                continue;
            }
            // A chunk the image stores verbatim as a chunk this store already holds (an
            // uploaded file laid out in whole chunks) is referenced, not read and written.
            let known = match disk.stored_chunk(start, len)? {
                Some(None) => Some(Outcome::Zero),
                Some(Some(h)) if self.has_chunk(&ChunkId(h))? => Some(Outcome::Stored {
                    id: ChunkId(h),
                    put: Put::Present,
                }),
                _ => None,
            };
            // Where the chunk's bytes lie in chunks the store holds: it is read (to hash it)
            // but, if new, stored as a composition of those ranges instead of written again.
            let slices = match known {
                None if self.composes() => disk.stored_slices(start, len)?,
                _ => None,
            };
            let known = match &slices {
                Some(s) if s.iter().all(|s| matches!(s, StoredSlice::Zero { .. })) => {
                    Some(Outcome::Zero)
                }
                _ => known,
            };
            if let Some(outcome) = known {
                tally.record(
                    Done {
                        index: index as usize,
                        len,
                        outcome,
                    },
                    progress,
                );
                continue;
            }
            let mut buf = match pool_rx.try_recv() {
                Ok(b) => b,
                Err(_) if allocated < max_buffers => {
                    allocated += 1;
                    vec![0u8; cs as usize]
                }
                Err(_) => loop {
                    // All buffers are with the workers: wait for one, handling results.
                    match pool_rx.recv_timeout(std::time::Duration::from_millis(20)) {
                        Ok(b) => break b,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            while let Ok(r) = done_rx.try_recv() {
                                tally.record(r?, progress);
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            return Err(StoreError::Invalid("ingest workers exited".into()));
                        }
                    }
                },
            };
            let n = len as usize;
            disk.read_at(start, &mut buf[..n])?;
            read_since_checkpoint += 1;
            if job_tx
                .send(Job {
                    index: index as usize,
                    buf,
                    len: n,
                    slices,
                })
                .is_err()
            {
                return Err(StoreError::Invalid("ingest workers exited".into()));
            }
        }
        Ok(())
    }
}

fn worker(
    store: &Store,
    jobs: &Mutex<Receiver<Job>>,
    pool: &std::sync::mpsc::Sender<Vec<u8>>,
    done: &std::sync::mpsc::Sender<Result<Done>>,
    claimed: &Mutex<HashSet<ChunkId>>,
    abort: &AtomicBool,
) {
    loop {
        let job = crate::lock(jobs).recv();
        let Ok(job) = job else { return };
        if abort.load(Ordering::Relaxed) {
            let _ = pool.send(job.buf);
            continue;
        }
        let data = &job.buf[..job.len];
        let r = if is_all_zero(data) {
            Ok(Outcome::Zero)
        } else {
            let id = ChunkId::hash(data);
            let first = claimed.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
            if first {
                store
                    .put_chunk_from(id, data, job.slices.map(crate::compose::Piece::from_slices))
                    .map(|put| Outcome::Stored { id, put })
            } else {
                // Repeated within this ingest: another worker handles (or handled) it.
                Ok(Outcome::Stored {
                    id,
                    put: Put::Present,
                })
            }
        };
        let len = job.len as u64;
        let _ = pool.send(job.buf);
        let _ = done.send(r.map(|outcome| Done {
            index: job.index,
            len,
            outcome,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check() {
        assert!(is_all_zero(&[]));
        for len in [1usize, 7, 255, 256, 257, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(is_all_zero(&v));
            for i in [0, len / 2, len - 1] {
                v[i] = 1;
                assert!(!is_all_zero(&v), "len {len} byte {i}");
                v[i] = 0;
            }
        }
    }

    #[test]
    fn hole_detection() {
        let e = |offset, len, kind| Extent { offset, len, kind };
        let ex = vec![
            e(0, 100, ExtentKind::Zero),
            e(100, 50, ExtentKind::Data),
            e(150, 100, ExtentKind::Zero),
        ];
        assert!(range_is_hole(&ex, 0, 100));
        assert!(range_is_hole(&ex, 10, 90));
        assert!(!range_is_hole(&ex, 50, 120));
        assert!(!range_is_hole(&ex, 100, 150));
        assert!(range_is_hole(&ex, 150, 250));
        // Not covered by the extents: not a hole (read it).
        assert!(!range_is_hole(&ex, 200, 300));
        assert!(!range_is_hole(&[], 0, 10));
        // A gap between extents is not a hole.
        let gap = vec![e(0, 10, ExtentKind::Zero), e(20, 10, ExtentKind::Zero)];
        assert!(!range_is_hole(&gap, 0, 30));
    }
}
