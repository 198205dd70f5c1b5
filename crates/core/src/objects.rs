//! Object bytes: writing a stream into the chunk store ([`PartWriter`], [`ObjectWriter`]) and
//! reading an object back by positional reads ([`ObjectReader`], an
//! [`openims_format::ReadAt`]).
//!
//! Writing never buffers a whole object: bytes are cut into the store's chunks (4 MiB) as they
//! arrive, all-zero chunks are not stored, identical chunks are stored once (shared with
//! images and other objects), and the MD5 for the ETag is computed on the fly. The caller's
//! thread copies and hashes MD5 while `ingest_workers` threads zero-check, BLAKE3-hash and
//! write chunks. Reading loads one chunk at a time, verified against its id.

use crate::buckets::{
    check_part_number, validate_object_key, Action, BucketObjects, CompletePart, ObjectAttrs,
    ObjectInfo, PartRef, StoredPart, UploadInfo, UploadedPart, MAX_PART_SIZE,
};
use crate::error::{CoreError, Result};
use crate::ids::ProjectId;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use md5::{Digest, Md5};
use openims_format::io::StoredSlice;
use openims_format::ReadAt;
use openims_store::{is_all_zero, ChunkId, Manifest, ManifestDisk, ManifestId, Store};
use std::io::Write;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Chunk index and its bytes, on the way to a worker.
type ChunkJob = (usize, Vec<u8>, Vec<(u32, StoredSlice)>);
/// Chunk index and what it became (`None`: all zero, not stored).
type ChunkDone = Result<(usize, Option<ChunkId>)>;

/// How a [`PartWriter`] tags the part it stores (the part's ETag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartTag {
    /// MD5 of the bytes, computed as they are written: what S3 clients expect of the ETag of
    /// a body they sent (and check `Content-MD5` against). Costs one MD5 pass on the writing
    /// thread (~0.5-0.7 GB/s per core).
    Md5,
    /// The first 16 bytes of the part's manifest id, a BLAKE3 hash over the chunk ids (which
    /// are the chunks' BLAKE3 hashes), so no extra pass over the bytes: for objects the
    /// service writes itself (exports), whose ETag, like that of any multipart object, is
    /// not the MD5 of the content.
    ContentId,
}

/// Stores a byte sequence in the chunk store as one manifest, as it is written
/// (`std::io::Write`; blocking, use it from a blocking thread). [`PartWriter::finish`] writes
/// the manifest (durable, with every chunk it references) and returns its id, size and MD5.
/// Dropping a writer without finishing leaves only unreferenced chunks, which GC removes.
pub struct PartWriter {
    store: Arc<Store>,
    chunk_size: usize,
    buf: Vec<u8>,
    /// Where bytes of `buf` already are in the store (offset in `buf`, slice), as
    /// [`PartWriter::append_sliced`] was told.
    known: Vec<(u32, StoredSlice)>,
    md5: Option<Md5>,
    size: u64,
    max_size: u64,
    next_index: usize,
    jobs: Option<SyncSender<ChunkJob>>,
    done: Receiver<ChunkDone>,
    pool: Receiver<Vec<u8>>,
    allocated: usize,
    max_buffers: usize,
    workers: Vec<JoinHandle<()>>,
    chunks: Vec<Option<ChunkId>>,
    failed: Option<CoreError>,
    /// A short chunk was appended by reference: nothing may follow it.
    sealed: bool,
}

impl PartWriter {
    /// A writer of at most `max_size` bytes (`EntityTooLarge` beyond), tagging the part with
    /// the MD5 of its bytes.
    pub fn new(store: Arc<Store>, max_size: u64) -> PartWriter {
        PartWriter::tagged(store, max_size, PartTag::Md5)
    }

    /// A writer of at most `max_size` bytes that tags the part as `tag` says.
    pub fn tagged(store: Arc<Store>, max_size: u64, tag: PartTag) -> PartWriter {
        let chunk_size = store.config().chunk_size as usize;
        let nworkers = store.config().ingest_workers.max(1);
        let (job_tx, job_rx) = sync_channel::<ChunkJob>(nworkers);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = channel::<ChunkDone>();
        let (pool_tx, pool_rx) = channel::<Vec<u8>>();
        let workers = (0..nworkers)
            .map(|_| {
                let store = Arc::clone(&store);
                let job_rx = Arc::clone(&job_rx);
                let done_tx: Sender<ChunkDone> = done_tx.clone();
                let pool_tx = pool_tx.clone();
                std::thread::spawn(move || chunk_worker(&store, &job_rx, &done_tx, &pool_tx))
            })
            .collect();
        PartWriter {
            store,
            chunk_size,
            buf: Vec::with_capacity(chunk_size),
            known: Vec::new(),
            md5: (tag == PartTag::Md5).then(Md5::new),
            size: 0,
            max_size,
            next_index: 0,
            jobs: Some(job_tx),
            done: done_rx,
            pool: pool_rx,
            allocated: 1,
            max_buffers: nworkers + 2,
            workers,
            chunks: Vec::new(),
            failed: None,
            sealed: false,
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn record(&mut self, d: ChunkDone) -> Result<()> {
        let (i, id) = d?;
        if self.chunks.len() <= i {
            self.chunks.resize(i + 1, None);
        }
        self.chunks[i] = id;
        Ok(())
    }

    /// Hands the full buffer to a worker and takes a fresh one.
    fn flush_chunk(&mut self) -> Result<()> {
        while let Ok(d) = self.done.try_recv() {
            self.record(d)?;
        }
        let fresh = match self.pool.try_recv() {
            Ok(b) => b,
            Err(_) if self.allocated < self.max_buffers => {
                self.allocated += 1;
                Vec::with_capacity(self.chunk_size)
            }
            Err(_) => loop {
                match self.pool.recv_timeout(std::time::Duration::from_millis(20)) {
                    Ok(b) => break b,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        while let Ok(d) = self.done.try_recv() {
                            self.record(d)?;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(CoreError::Internal("chunk writers exited".into()))
                    }
                }
            },
        };
        let full = std::mem::replace(&mut self.buf, fresh);
        let known = std::mem::take(&mut self.known);
        let index = self.next_index;
        self.next_index += 1;
        let sent = self.jobs.as_ref().map(|tx| tx.send((index, full, known)));
        if !matches!(sent, Some(Ok(()))) {
            return Err(CoreError::Internal("chunk writers exited".into()));
        }
        Ok(())
    }

    /// Appends bytes (the error form of `write_all`).
    pub fn append(&mut self, data: &[u8]) -> Result<()> {
        self.append_sliced(data, None)
    }

    /// Appends bytes that the store already holds as `slices` (covering `data` exactly): a
    /// chunk of the part made mostly of such bytes is stored as a composition of them
    /// ([`Store::put_chunk_described`]) instead of its bytes.
    pub fn append_sliced(&mut self, mut data: &[u8], slices: Option<&[StoredSlice]>) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(CoreError::Internal(format!(
                "the writer failed earlier: {e}"
            )));
        }
        if self.size + data.len() as u64 > self.max_size {
            return Err(CoreError::EntityTooLarge(self.max_size));
        }
        if self.sealed && !data.is_empty() {
            return Err(CoreError::Internal(
                "append: the part ended with a short chunk".into(),
            ));
        }
        if let Some(h) = &mut self.md5 {
            h.update(data);
        }
        self.size += data.len() as u64;
        let mut done = 0u64;
        while !data.is_empty() {
            let room = self.chunk_size - self.buf.len();
            let n = room.min(data.len());
            if let Some(slices) = slices {
                let mut at = self.buf.len() as u32;
                for s in StoredSlice::range(slices, done, n as u64) {
                    self.known.push((at, s));
                    at += s.len();
                }
            }
            done += n as u64;
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.chunk_size {
                if let Err(e) = self.flush_chunk() {
                    self.failed = Some(CoreError::Internal(e.to_string()));
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Appends a chunk the store already holds (`None`: `len` zero bytes), by reference: no
    /// byte is read or written. Only at a chunk boundary of the part, for a part tagged by
    /// content id (an MD5 tag would need the bytes), and `len` must be the chunk's length: the
    /// chunk size, or less for the part's last chunk.
    pub fn append_chunk(&mut self, id: Option<ChunkId>, len: u64) -> Result<()> {
        let cs = self.chunk_size as u64;
        let misuse = |what: &str| Err(CoreError::Internal(format!("append_chunk: {what}")));
        if self.failed.is_some() || self.md5.is_some() || self.sealed {
            return misuse("the writer failed, tags by MD5, or ended with a short chunk");
        }
        if !self.buf.is_empty() || !self.size.is_multiple_of(cs) {
            return misuse("not at a chunk boundary");
        }
        if len == 0 || len > cs {
            return misuse("not a chunk length");
        }
        if self.size + len > self.max_size {
            return Err(CoreError::EntityTooLarge(self.max_size));
        }
        let index = self.next_index;
        self.next_index += 1;
        self.record(Ok((index, id)))?;
        self.size += len;
        if len < cs {
            // A short chunk ends the part: later bytes would not start at a chunk boundary.
            self.sealed = true;
        }
        Ok(())
    }

    /// Stores the last chunk and the manifest; returns the part (durable on return).
    pub fn finish(mut self) -> Result<StoredPart> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if !self.buf.is_empty() {
            self.flush_chunk()?;
        }
        self.jobs = None;
        for w in std::mem::take(&mut self.workers) {
            w.join()
                .map_err(|_| CoreError::Internal("chunk writer panicked".into()))?;
        }
        while let Ok(d) = self.done.try_recv() {
            self.record(d)?;
        }
        let count = self.next_index;
        if self.chunks.len() != count {
            self.chunks.resize(count, None);
        }
        let chunks = std::mem::take(&mut self.chunks);
        let manifest = Manifest::new(self.size, self.chunk_size as u32, chunks)?;
        let id = self.store.put_manifest(&manifest)?;
        let md5: [u8; 16] = match self.md5.take() {
            Some(h) => h.finalize().into(),
            None => {
                let mut t = [0u8; 16];
                t.copy_from_slice(&id.as_bytes()[..16]);
                t
            }
        };
        Ok(StoredPart {
            manifest: id.to_string(),
            size: self.size,
            md5,
        })
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        self.jobs = None;
        for w in std::mem::take(&mut self.workers) {
            let _ = w.join();
        }
    }
}

impl Write for PartWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn chunk_worker(
    store: &Store,
    jobs: &Mutex<Receiver<ChunkJob>>,
    done: &Sender<ChunkDone>,
    pool: &Sender<Vec<u8>>,
) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok((index, mut buf, known)) = job else {
            return;
        };
        let r = if is_all_zero(&buf) {
            Ok((index, None))
        } else if known.is_empty() {
            store
                .put_chunk(&buf)
                .map(|id| (index, Some(id)))
                .map_err(CoreError::from)
        } else {
            store
                .put_chunk_described(&buf, &known)
                .map(|id| (index, Some(id)))
                .map_err(CoreError::from)
        };
        buf.clear();
        let _ = pool.send(buf);
        if done.send(r).is_err() {
            return;
        }
    }
}

/// What a client declared about a body it sends (PutObject, UploadPart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// `Content-Length`: the body must be exactly this long (`IncompleteBody`).
    pub content_length: Option<u64>,
    /// `Content-MD5`: the body's MD5 must be this (`BadDigest`).
    pub content_md5: Option<[u8; 16]>,
    /// `If-None-Match: *`: refuse to replace an existing object (`ObjectExists`).
    pub if_not_exists: bool,
}

/// Receives `body` into a [`PartWriter`] on a blocking thread; the async side only forwards
/// buffers (bounded channel: a slow store slows the client down). The declared length and
/// MD5 in `opts` are checked at the end (`IncompleteBody`, `BadDigest`).
pub async fn store_stream<S, E>(
    store: Arc<Store>,
    mut body: S,
    opts: &PutOptions,
    max_size: u64,
) -> Result<StoredPart>
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    let expected = opts.content_length;
    if let Some(n) = expected {
        if n > max_size {
            return Err(CoreError::EntityTooLarge(max_size));
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    let writer = tokio::task::spawn_blocking(move || -> Result<StoredPart> {
        let mut w = PartWriter::new(store, max_size);
        while let Some(b) = rx.blocking_recv() {
            w.append(&b)?;
        }
        w.finish()
    });
    let mut failure = None;
    let mut received = 0u64;
    while let Some(item) = body.next().await {
        match item {
            Ok(b) => {
                received += b.len() as u64;
                if tx.send(b).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                failure = Some(CoreError::IncompleteBody(format!(
                    "the request body could not be read: {e}"
                )));
                break;
            }
        }
    }
    drop(tx);
    let part = writer
        .await
        .map_err(|e| CoreError::Internal(format!("object writer task failed: {e}")))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let part = part?;
    if let Some(n) = expected {
        if n != received {
            return Err(CoreError::IncompleteBody(format!(
                "received {received} bytes, Content-Length said {n}"
            )));
        }
    }
    if let Some(md5) = opts.content_md5 {
        if md5 != part.md5 {
            return Err(CoreError::BadDigest(format!(
                "received MD5 {}, Content-MD5 said {}",
                part.md5_hex(),
                hex::encode(md5)
            )));
        }
    }
    Ok(part)
}

/// An object's bytes by positional reads, across its parts, without loading the object: each
/// read loads (and verifies) only the chunks it touches. Safe to share between threads
/// (reads are serialized by an internal lock around the open part).
pub struct ObjectReader {
    info: ObjectInfo,
    parts: Vec<PartRef>,
    store: Arc<Store>,
    open: Mutex<Option<(usize, ManifestDisk)>>,
    /// The manifest of the part last asked about by `stored_chunk`/`stored_slices` (kept apart
    /// from `open`, so those questions do not stop the open part's read-ahead).
    mapped: Mutex<Option<(usize, Arc<Manifest>)>>,
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectReader")
            .field("info", &self.info)
            .field("parts", &self.parts.len())
            .finish_non_exhaustive()
    }
}

impl ObjectReader {
    /// A reader over `parts` (ordered, contiguous) of the object `info`.
    pub fn new(store: Arc<Store>, info: ObjectInfo, parts: Vec<PartRef>) -> Result<ObjectReader> {
        let mut offset = 0u64;
        for p in &parts {
            if p.offset != offset {
                return Err(CoreError::Internal(format!(
                    "object {}/{} part {} starts at {} instead of {offset}",
                    info.bucket, info.key, p.part_number, p.offset
                )));
            }
            offset += p.size;
        }
        if offset != info.size {
            return Err(CoreError::Internal(format!(
                "object {}/{} parts hold {offset} bytes, the object {}",
                info.bucket, info.key, info.size
            )));
        }
        Ok(ObjectReader {
            info,
            parts,
            store,
            open: Mutex::new(None),
            mapped: Mutex::new(None),
        })
    }

    /// The object's metadata.
    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    /// The object's size in bytes.
    pub fn len(&self) -> u64 {
        self.info.size
    }

    /// True for an empty object.
    pub fn is_empty(&self) -> bool {
        self.info.size == 0
    }

    /// The id of part `index`'s manifest.
    fn part_manifest_id(&self, index: usize) -> Result<ManifestId> {
        self.parts[index].manifest.parse().map_err(|_| {
            CoreError::Internal(format!("bad manifest id {}", self.parts[index].manifest))
        })
    }

    /// The plaintext manifest of the part holding byte `offset`, with the part's start; `None`
    /// past the end, for an encrypted part or one that cannot be loaded.
    fn mapped_part(&self, offset: u64) -> Option<(u64, Arc<Manifest>)> {
        let i = self
            .parts
            .partition_point(|p| p.offset <= offset)
            .checked_sub(1)?;
        let part = self.parts.get(i)?;
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if mapped.as_ref().map(|m| m.0) != Some(i) {
            let m = self.store.manifest(&self.part_manifest_id(i).ok()?).ok()?;
            if m.virtual_size() != part.size {
                return None;
            }
            *mapped = Some((i, Arc::new(m)));
        }
        let m = &mapped.as_ref()?.1;
        (!m.is_encrypted()).then(|| (part.offset, Arc::clone(m)))
    }

    /// Runs `f` on part `index`, opened (and kept open for the next call).
    fn with_part<T>(
        &self,
        index: usize,
        f: impl FnOnce(&mut ManifestDisk) -> Result<T>,
    ) -> Result<T> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.as_ref().map(|o| o.0) != Some(index) {
            let id = self.part_manifest_id(index)?;
            let disk = self.store.open_disk(&id)?;
            if disk.manifest().virtual_size() != self.parts[index].size {
                return Err(CoreError::Internal(format!(
                    "manifest {id} holds {} bytes, the part {}",
                    disk.manifest().virtual_size(),
                    self.parts[index].size
                )));
            }
            *open = Some((index, disk));
        }
        match open.as_mut() {
            Some((_, disk)) => f(disk),
            None => Err(CoreError::Internal("no open part".into())),
        }
    }

    /// Reads from part `index` at `within` into `buf` (which fits in the part).
    fn read_part(&self, index: usize, within: u64, buf: &mut [u8]) -> Result<()> {
        self.with_part(index, |disk| Ok(disk.read(within, buf)?))
    }

    /// Reads up to `buf.len()` bytes at `offset` (fewer only at the end of the object).
    pub fn read_range(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0usize;
        let mut pos = offset;
        while done < buf.len() && pos < self.info.size {
            // The part holding `pos`: the last one starting at or before it.
            let i = self.parts.partition_point(|p| p.offset <= pos) - 1;
            let p = &self.parts[i];
            let within = pos - p.offset;
            let n = ((p.size - within) as usize).min(buf.len() - done);
            if n == 0 {
                break;
            }
            self.read_part(i, within, &mut buf[done..done + n])?;
            done += n;
            pos += n as u64;
        }
        Ok(done)
    }
}

impl ReadAt for ObjectReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.read_range(buf, offset)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
    /// A range that is exactly one plaintext chunk of one part's manifest.
    fn stored_chunk(&self, offset: u64, len: u64) -> Option<Option<[u8; 32]>> {
        let (start, m) = self.mapped_part(offset)?;
        let within = offset - start;
        let cs = u64::from(m.chunk_size());
        let k = (within / cs) as usize;
        (within.is_multiple_of(cs) && k < m.chunks().len() && m.chunk_len(k) == len)
            .then(|| m.chunks()[k].map(|id| *id.as_bytes()))
    }
    /// The chunks (whole or in part) of the plaintext parts holding `[offset, offset + len)`.
    fn stored_slices(&self, offset: u64, len: u64) -> Option<Vec<StoredSlice>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.info.size)?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (start, m) = self.mapped_part(pos)?;
            let n = (start + m.virtual_size()).min(end) - pos;
            if n == 0 {
                return None;
            }
            for s in m.slices(pos - start, n)? {
                StoredSlice::push(&mut out, s);
            }
            pos += n;
        }
        Some(out)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.info.size)
    }
}

/// Default part size of an [`ObjectWriter`]: 256 MiB.
pub const WRITER_PART_SIZE: u64 = 256 << 20;

/// Writes an object sequentially (`std::io::Write`, blocking: use it from a blocking thread)
/// as a multipart upload: every `part_size` bytes become a recorded part, so written data is
/// safe from GC and visible in ListMultipartUploads while the write goes on.
/// [`ObjectWriter::finish`] makes the object visible atomically; [`ObjectWriter::abort`]
/// drops it. Made by [`BucketObjects::object_writer`].
pub struct ObjectWriter {
    objects: BucketObjects,
    project: ProjectId,
    upload: UploadInfo,
    if_not_exists: bool,
    part_size: u64,
    current: Option<PartWriter>,
    parts: Vec<UploadedPart>,
    handle: tokio::runtime::Handle,
}

impl ObjectWriter {
    /// The multipart upload behind this writer.
    pub fn upload_id(&self) -> &str {
        &self.upload.upload_id
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum::<u64>()
            + self.current.as_ref().map_or(0, PartWriter::size)
    }

    /// Stores the current part and records it in the upload (blocking).
    fn close_part(&mut self) -> Result<()> {
        let Some(w) = self.current.take() else {
            return Ok(());
        };
        let part = w.finish()?;
        let number = self.parts.len() as u32 + 1;
        check_part_number(number)?;
        let objects = self.objects.clone();
        let id = self.upload.upload_id.clone();
        let recorded = self
            .handle
            .block_on(async move { objects.record_part(&id, number, &part).await })?;
        self.parts.push(recorded);
        Ok(())
    }

    /// Appends bytes, cutting a part every `part_size` bytes (blocking).
    pub fn append(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let w = match &mut self.current {
                Some(w) => w,
                None => self.current.insert(PartWriter::tagged(
                    Arc::clone(&self.objects.store),
                    self.part_size,
                    PartTag::ContentId,
                )),
            };
            let room = (self.part_size - w.size()) as usize;
            let n = room.min(data.len());
            w.append(&data[..n])?;
            data = &data[n..];
            if w.size() == self.part_size {
                self.close_part()?;
            }
        }
        Ok(())
    }

    /// Stores what is left and makes the object visible, atomically (fails with
    /// `ObjectExists` if asked `if_not_exists` and the key exists; the upload is then
    /// aborted).
    pub async fn finish(mut self) -> Result<ObjectInfo> {
        let this = tokio::task::spawn_blocking(move || -> Result<ObjectWriter> {
            if self.current.is_some() || self.parts.is_empty() {
                // An empty object is one empty part.
                if self.current.is_none() {
                    self.current = Some(PartWriter::tagged(
                        Arc::clone(&self.objects.store),
                        0,
                        PartTag::ContentId,
                    ));
                }
                self.close_part()?;
            }
            Ok(self)
        })
        .await
        .map_err(|e| CoreError::Internal(format!("object writer task failed: {e}")))??;
        let wanted: Vec<CompletePart> = this
            .parts
            .iter()
            .map(|p| CompletePart {
                part_number: p.part_number,
                etag: Some(p.etag.clone()),
            })
            .collect();
        let r = this
            .objects
            .complete_upload(
                &this.project,
                &this.upload.bucket,
                &this.upload.key,
                &this.upload.upload_id,
                &wanted,
                this.if_not_exists,
            )
            .await;
        if r.is_err() {
            let _ = this
                .objects
                .abort_upload(
                    &this.project,
                    &this.upload.bucket,
                    &this.upload.key,
                    &this.upload.upload_id,
                )
                .await;
        }
        r
    }

    /// Drops the object being written (its parts become garbage).
    pub async fn abort(self) -> Result<()> {
        self.objects
            .abort_upload(
                &self.project,
                &self.upload.bucket,
                &self.upload.key,
                &self.upload.upload_id,
            )
            .await
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl BucketObjects {
    /// Stores a single-part object from a byte stream (PutObject). Authorization is checked
    /// before any byte is read; nothing is visible under the key unless the whole body
    /// arrived and matched `opts`.
    pub async fn put_object<S, E>(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        attrs: &ObjectAttrs,
        body: S,
        opts: &PutOptions,
    ) -> Result<ObjectInfo>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        validate_object_key(key)?;
        self.authorize(project, bucket, Action::PutObject, Some(key))
            .await?;
        if opts.if_not_exists && self.find_object(bucket, key).await?.is_some() {
            return Err(CoreError::ObjectExists(format!("{bucket}/{key}")));
        }
        let part = store_stream(Arc::clone(&self.store), body, opts, MAX_PART_SIZE).await?;
        self.put_stored(project, bucket, key, &part, attrs, opts.if_not_exists)
            .await
    }

    /// Stores one part of a multipart upload from a byte stream (UploadPart).
    /// `opts.if_not_exists` does not apply to parts.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_part<S, E>(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: S,
        opts: &PutOptions,
    ) -> Result<UploadedPart>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        check_part_number(part_number)?;
        self.upload(project, bucket, key, upload_id, Action::PutObject)
            .await?;
        let part = store_stream(Arc::clone(&self.store), body, opts, MAX_PART_SIZE).await?;
        self.record_part(upload_id, part_number, &part).await
    }

    /// A positional reader of the object (range reads over its parts), if `project` may
    /// read it. Import jobs read bucket objects through this.
    pub async fn open_object_reader(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectReader> {
        let (info, parts) = self.object_with_parts(project, bucket, key).await?;
        ObjectReader::new(Arc::clone(&self.store), info, parts)
    }

    /// A sequential writer of `bucket/key` (export jobs write through this), checked for
    /// `PutObject` now; with `if_not_exists` it refuses an existing key now and again,
    /// atomically, at [`ObjectWriter::finish`]. `part_size` 0 means [`WRITER_PART_SIZE`].
    /// Its parts are tagged [`PartTag::ContentId`]: the object's ETag has the multipart form
    /// and is derived from content hashes already computed, with no MD5 pass over the bytes.
    pub async fn object_writer(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        attrs: &ObjectAttrs,
        if_not_exists: bool,
        part_size: u64,
    ) -> Result<ObjectWriter> {
        validate_object_key(key)?;
        self.authorize(project, bucket, Action::PutObject, Some(key))
            .await?;
        if if_not_exists && self.find_object(bucket, key).await?.is_some() {
            return Err(CoreError::ObjectExists(format!("{bucket}/{key}")));
        }
        let part_size = match part_size {
            0 => WRITER_PART_SIZE,
            n => n.clamp(crate::buckets::MIN_PART_SIZE, MAX_PART_SIZE),
        };
        let upload = self.create_upload(project, bucket, key, attrs).await?;
        Ok(ObjectWriter {
            objects: self.clone(),
            project: project.clone(),
            upload,
            if_not_exists,
            part_size,
            current: None,
            parts: Vec::new(),
            handle: tokio::runtime::Handle::current(),
        })
    }
}
