//! Reading a stored image back: [`ManifestDisk`] (a `VirtualDisk`) and [`ManifestReader`]
//! (`std::io::Read + Seek` over the raw virtual disk bytes).

use crate::backend::ObjectBuf;
use crate::crypto::Dek;
use crate::error::{Result, StoreError};
use crate::id::ManifestId;
use crate::manifest::Manifest;
use crate::store::Store;
use openims_format::io::{Extent, ExtentKind};
use openims_format::{FormatError, VirtualDisk};
use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// Stored chunks a sequential reader has fetched and verified ahead of the one it reads.
const READ_AHEAD_CHUNKS: usize = 2;
/// Threads of one read-ahead: with two, one chunk is read from the disk while the other is
/// verified, instead of the disk waiting for each verification.
const READ_AHEAD_THREADS: usize = 2;

/// The read-ahead of a [`ManifestDisk`]: [`READ_AHEAD_THREADS`] threads, started at the first
/// sequential read, that fetch and verify the next stored chunks (I/O, BLAKE3 or AES-GCM) while
/// the reader's thread consumes the current one. Results may come back out of order.
struct ReadAhead {
    requests: Sender<usize>,
    results: Receiver<(usize, Result<ObjectBuf>)>,
    /// Requested chunk indexes whose results have not been taken yet, in request order.
    pending: VecDeque<usize>,
    /// Results received before the chunks requested ahead of them.
    early: Vec<(usize, Result<ObjectBuf>)>,
}

impl ReadAhead {
    /// The result for chunk `index` (requested and not yet taken): stashed, or the next one
    /// for it from the threads. `None` if the threads are gone.
    fn result_for(&mut self, index: usize) -> Option<Result<ObjectBuf>> {
        if let Some(k) = self.early.iter().position(|(i, _)| *i == index) {
            return Some(self.early.swap_remove(k).1);
        }
        loop {
            let (i, r) = self.results.recv().ok()?;
            if i == index {
                return Some(r);
            }
            self.early.push((i, r));
        }
    }
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("pending", &self.pending)
            .finish()
    }
}

/// A stored image as a [`VirtualDisk`]. Every chunk read is verified against its id; the last
/// chunk read is cached so sequential reads of any size fetch each chunk once.
///
/// Errors from the `VirtualDisk` methods are `FormatError::Io` wrapping a [`StoreError`]
/// (retrieve it with [`StoreError::from_format_error`]); [`ManifestDisk::read`] returns the
/// `StoreError` directly.
#[derive(Debug)]
pub struct ManifestDisk {
    store: Store,
    id: ManifestId,
    manifest: Arc<Manifest>,
    dek: Option<Dek>,
    cache: Option<(usize, ObjectBuf)>,
    ahead: Option<ReadAhead>,
}

impl ManifestDisk {
    /// Wraps an already loaded plaintext manifest (an encrypted one fails on first read; use
    /// [`ManifestDisk::with_key`]).
    pub fn new(store: Store, id: ManifestId, manifest: Arc<Manifest>) -> Self {
        Self::with_key(store, id, manifest, None)
    }

    /// Wraps an already loaded manifest with the data key of its encrypted chunks (ignored
    /// for a plaintext manifest).
    pub fn with_key(
        store: Store,
        id: ManifestId,
        manifest: Arc<Manifest>,
        dek: Option<Dek>,
    ) -> Self {
        ManifestDisk {
            store,
            id,
            manifest,
            dek,
            cache: None,
            ahead: None,
        }
    }

    /// The manifest's id.
    pub fn id(&self) -> &ManifestId {
        &self.id
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Fetches and verifies chunk `index` (length-checked).
    fn fetch(
        store: &Store,
        id: &ManifestId,
        manifest: &Manifest,
        dek: Option<&Dek>,
        index: usize,
    ) -> Result<ObjectBuf> {
        let chunk = manifest.chunks()[index]
            .ok_or_else(|| StoreError::Invalid(format!("chunk {index} is a zero chunk")))?;
        let data = store.read_manifest_chunk(manifest.is_encrypted(), dek, &chunk)?;
        let want = manifest.chunk_len(index);
        if data.len() as u64 != want {
            return Err(StoreError::corrupt(
                crate::backend::chunk_key(&chunk),
                format!(
                    "chunk {index} of manifest {id} is {} bytes, expected {want}",
                    data.len()
                ),
            ));
        }
        Ok(data)
    }

    /// The next stored (non-zero) chunk after `index`.
    fn next_stored(&self, index: usize) -> Option<usize> {
        let chunks = self.manifest.chunks();
        (index + 1..chunks.len()).find(|&i| chunks[i].is_some())
    }

    /// Takes chunk `index` from the read-ahead if it was requested (results requested before
    /// it are dropped). `None` when it was not: the read-ahead is then stopped (its thread
    /// ends after the chunk it is fetching) rather than waited for.
    fn take_ahead(&mut self, index: usize) -> Option<Result<ObjectBuf>> {
        let ahead = self.ahead.as_mut()?;
        let mut found = None;
        if ahead.pending.contains(&index) {
            while let Some(front) = ahead.pending.pop_front() {
                match ahead.result_for(front) {
                    Some(r) if front == index => {
                        found = Some(r);
                        break;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
        if found.is_none() {
            self.ahead = None;
        }
        found
    }

    /// Asks the read-ahead for the stored chunks after `index` (starting its thread).
    fn request_ahead(&mut self, index: usize) {
        if self.ahead.is_none() {
            let (req_tx, req_rx) = channel::<usize>();
            let (res_tx, res_rx) = channel();
            let req_rx = Arc::new(Mutex::new(req_rx));
            let mut started = 0;
            for _ in 0..READ_AHEAD_THREADS {
                let (store, id, manifest, dek, req_rx, res_tx) = (
                    self.store.clone(),
                    self.id,
                    Arc::clone(&self.manifest),
                    self.dek.clone(),
                    Arc::clone(&req_rx),
                    res_tx.clone(),
                );
                let spawned = std::thread::Builder::new()
                    .name("chunk-read-ahead".into())
                    .spawn(move || loop {
                        let next = crate::lock(&req_rx).recv();
                        let Ok(i) = next else { return };
                        let r = Self::fetch(&store, &id, &manifest, dek.as_ref(), i);
                        if res_tx.send((i, r)).is_err() {
                            return;
                        }
                    });
                if spawned.is_ok() {
                    started += 1;
                }
            }
            if started == 0 {
                return; // No thread: read synchronously.
            }
            self.ahead = Some(ReadAhead {
                requests: req_tx,
                results: res_rx,
                pending: VecDeque::new(),
                early: Vec::new(),
            });
        }
        let mut from = index;
        loop {
            let (len, last) = match &self.ahead {
                Some(a) => (a.pending.len(), a.pending.back().copied()),
                None => return,
            };
            if len >= READ_AHEAD_CHUNKS {
                return;
            }
            if let Some(l) = last {
                from = from.max(l);
            }
            let Some(next) = self.next_stored(from) else {
                return;
            };
            let Some(a) = self.ahead.as_mut() else { return };
            if a.requests.send(next).is_err() {
                self.ahead = None;
                return;
            }
            a.pending.push_back(next);
            from = next;
        }
    }

    /// Loads chunk `index` into the cache (verified, length-checked). Reads that follow each
    /// other chunk by chunk start a read-ahead of the next stored chunks.
    fn load(&mut self, index: usize) -> Result<&[u8]> {
        if self.cache.as_ref().map(|c| c.0) != Some(index) {
            let sequential = self
                .cache
                .as_ref()
                .is_some_and(|c| self.next_stored(c.0) == Some(index));
            let data = match self.take_ahead(index) {
                Some(r) => r?,
                None => Self::fetch(
                    &self.store,
                    &self.id,
                    &self.manifest,
                    self.dek.as_ref(),
                    index,
                )?,
            };
            self.cache = Some((index, data));
            if sequential || self.ahead.is_some() {
                self.request_ahead(index);
            }
        }
        match &self.cache {
            Some((_, d)) => Ok(d),
            None => Err(StoreError::Invalid("chunk cache empty".into())),
        }
    }

    /// Fills `buf` with the virtual disk's bytes at `offset` (zeros past the end).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let m = Arc::clone(&self.manifest);
        let cs = u64::from(m.chunk_size());
        let vs = m.virtual_size();
        let mut pos = offset;
        let mut out = buf;
        while !out.is_empty() {
            if pos >= vs {
                out.fill(0);
                break;
            }
            let index = (pos / cs) as usize;
            let within = pos % cs;
            let n = (m.chunk_len(index) - within).min(out.len() as u64) as usize;
            let (head, rest) = out.split_at_mut(n);
            match m.chunks()[index] {
                None => head.fill(0),
                Some(_) => {
                    let data = self.load(index)?;
                    let w = within as usize;
                    head.copy_from_slice(&data[w..w + n]);
                }
            }
            out = rest;
            pos += n as u64;
        }
        Ok(())
    }
}

impl VirtualDisk for ManifestDisk {
    fn virtual_size(&self) -> u64 {
        self.manifest.virtual_size()
    }

    fn extents(&mut self, offset: u64, len: u64) -> openims_format::Result<Vec<Extent>> {
        let m = &self.manifest;
        let vs = m.virtual_size();
        let start = offset.min(vs);
        let end = offset.saturating_add(len).min(vs);
        let cs = u64::from(m.chunk_size());
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = start;
        while pos < end {
            let index = (pos / cs) as usize;
            let chunk_end = (index as u64 + 1).saturating_mul(cs).min(end);
            let kind = match m.chunks()[index] {
                None => ExtentKind::Zero,
                Some(_) => ExtentKind::Data,
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.len += chunk_end - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: chunk_end - pos,
                    kind,
                }),
            }
            pos = chunk_end;
        }
        Ok(out)
    }

    /// The manifest's own chunks (a plaintext manifest only).
    fn stored_slices(
        &mut self,
        offset: u64,
        len: u64,
    ) -> openims_format::Result<Option<Vec<openims_format::io::StoredSlice>>> {
        Ok(self.manifest.slices(offset, len))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> openims_format::Result<()> {
        self.read(offset, buf)
            .map_err(|e| FormatError::Io(e.into_io_error()))
    }
}

/// The raw bytes of a stored virtual disk as `Read + Seek` (for HTTP downloads). Errors are
/// `io::Error`s wrapping a [`StoreError`] (see [`StoreError::from_io_error`]).
#[derive(Debug)]
pub struct ManifestReader {
    disk: ManifestDisk,
    pos: u64,
}

impl ManifestReader {
    /// Reads `disk` from the start.
    pub fn new(disk: ManifestDisk) -> Self {
        ManifestReader { disk, pos: 0 }
    }

    /// Total length in bytes (the virtual size).
    pub fn len(&self) -> u64 {
        self.disk.manifest.virtual_size()
    }

    /// True for an empty disk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Current position.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl Read for ManifestReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.disk
            .read(self.pos, &mut buf[..n])
            .map_err(StoreError::into_io_error)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ManifestReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start",
            )),
        }
    }
}

impl Store {
    /// Opens a stored plaintext image for reading (loads and verifies its manifest). An
    /// encrypted manifest is refused (`Invalid`): use [`Store::open_disk_with`].
    pub fn open_disk(&self, id: &ManifestId) -> Result<ManifestDisk> {
        self.open_disk_with(id, None)
    }

    /// Opens a stored image for reading with the data key of its chunks when it is
    /// encrypted. An encrypted manifest without a key is refused here, before any read.
    pub fn open_disk_with(&self, id: &ManifestId, dek: Option<Dek>) -> Result<ManifestDisk> {
        let m = self.manifest(id)?;
        if m.is_encrypted() && dek.is_none() {
            return Err(StoreError::Invalid(format!(
                "manifest {id} is encrypted and no data key was given"
            )));
        }
        Ok(ManifestDisk::with_key(self.clone(), *id, Arc::new(m), dek))
    }

    /// The raw virtual disk bytes of a stored plaintext image, in order.
    pub fn stream_raw(&self, id: &ManifestId) -> Result<ManifestReader> {
        Ok(ManifestReader::new(self.open_disk(id)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two read-ahead threads may finish out of order: each request still gets its own
    /// result, and one that arrives early waits for its turn.
    #[test]
    fn read_ahead_results_are_matched_to_their_requests() {
        let (requests, _unused) = channel();
        let (tx, results) = channel();
        let mut ahead = ReadAhead {
            requests,
            results,
            pending: VecDeque::from([4, 5, 6]),
            early: Vec::new(),
        };
        for i in [6usize, 4, 5] {
            tx.send((i, Ok(ObjectBuf::from(vec![i as u8; 3])))).unwrap();
        }
        for i in [4usize, 5, 6] {
            let got = ahead.result_for(i).expect("a result").expect("ok");
            assert_eq!(&got[..], &[i as u8; 3][..]);
        }
        assert!(ahead.early.is_empty());
        drop(tx);
        assert!(ahead.result_for(7).is_none(), "threads gone");
    }
}
