//! Reading a stored image back: [`ManifestDisk`] (a `VirtualDisk`) and [`ManifestReader`]
//! (`std::io::Read + Seek` over the raw virtual disk bytes).

use crate::crypto::Dek;
use crate::error::{Result, StoreError};
use crate::id::ManifestId;
use crate::manifest::Manifest;
use crate::store::Store;
use openims_format::io::{Extent, ExtentKind};
use openims_format::{FormatError, VirtualDisk};
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

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
    cache: Option<(usize, Vec<u8>)>,
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

    /// Loads chunk `index` into the cache (verified, length-checked).
    fn load(&mut self, index: usize) -> Result<&[u8]> {
        if self.cache.as_ref().map(|c| c.0) != Some(index) {
            let id = self.manifest.chunks()[index]
                .ok_or_else(|| StoreError::Invalid(format!("chunk {index} is a zero chunk")))?;
            let data = self.store.read_manifest_chunk(
                self.manifest.is_encrypted(),
                self.dek.as_ref(),
                &id,
            )?;
            let want = self.manifest.chunk_len(index);
            if data.len() as u64 != want {
                return Err(StoreError::corrupt(
                    crate::backend::chunk_key(&id),
                    format!(
                        "chunk {index} of manifest {} is {} bytes, expected {want}",
                        self.id,
                        data.len()
                    ),
                ));
            }
            self.cache = Some((index, data));
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
