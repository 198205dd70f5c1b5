//! Test helpers: an in-memory `VirtualDisk` with holes, a failing backend, pseudo-random data.
#![allow(dead_code)]

use openims_format::io::{Extent, ExtentKind};
use openims_format::{FormatError, VirtualDisk};
use openims_store::backend::ObjectIter;
use openims_store::{Backend, ObjectMeta, Result, StoreError};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// Allocation granularity of `MemDisk`.
pub const CLUSTER: u64 = 512;

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A virtual disk in memory: bytes plus a per-cluster allocation map. Unallocated clusters
/// are holes (read as zeros, reported as `Zero` extents).
#[derive(Debug, Clone)]
pub struct MemDisk {
    pub data: Vec<u8>,
    pub alloc: Vec<bool>,
    /// Fail `read_at` at or after this offset (to test source errors).
    pub fail_at: Option<u64>,
    pub reads: u64,
}

impl MemDisk {
    pub fn new(size: u64) -> Self {
        MemDisk {
            data: vec![0u8; size as usize],
            alloc: vec![false; size.div_ceil(CLUSTER) as usize],
            fail_at: None,
            reads: 0,
        }
    }

    /// Writes `bytes` at `offset` (clipped to the disk), allocating the clusters touched.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) {
        let size = self.data.len() as u64;
        if offset >= size || bytes.is_empty() {
            return;
        }
        let end = (offset + bytes.len() as u64).min(size);
        self.data[offset as usize..end as usize].copy_from_slice(&bytes[..(end - offset) as usize]);
        for c in offset / CLUSTER..end.div_ceil(CLUSTER) {
            self.alloc[c as usize] = true;
        }
    }
}

impl VirtualDisk for MemDisk {
    fn virtual_size(&self) -> u64 {
        self.data.len() as u64
    }

    fn extents(&mut self, offset: u64, len: u64) -> openims_format::Result<Vec<Extent>> {
        let size = self.data.len() as u64;
        let (start, end) = (offset.min(size), offset.saturating_add(len).min(size));
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = start;
        while pos < end {
            let c = pos / CLUSTER;
            let cend = ((c + 1) * CLUSTER).min(end);
            let kind = if self.alloc[c as usize] {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            match out.last_mut() {
                Some(l) if l.kind == kind => l.len += cend - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: cend - pos,
                    kind,
                }),
            }
            pos = cend;
        }
        Ok(out)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> openims_format::Result<()> {
        if let Some(f) = self.fail_at {
            if offset + buf.len() as u64 > f {
                return Err(FormatError::Io(std::io::Error::other(
                    "injected read error",
                )));
            }
        }
        self.reads += 1;
        buf.fill(0);
        let size = self.data.len() as u64;
        if offset < size {
            let n = ((size - offset) as usize).min(buf.len());
            buf[..n].copy_from_slice(&self.data[offset as usize..offset as usize + n]);
        }
        Ok(())
    }
}

/// Wraps a backend and fails on demand.
pub struct FailingBackend<B> {
    pub inner: Arc<B>,
    /// Chunk puts that still succeed; negative = never fail.
    pub chunk_puts_left: AtomicI64,
    pub fail_sync: AtomicBool,
}

impl<B: Backend> FailingBackend<B> {
    pub fn new(inner: Arc<B>) -> Self {
        FailingBackend {
            inner,
            chunk_puts_left: AtomicI64::new(-1),
            fail_sync: AtomicBool::new(false),
        }
    }
}

fn injected() -> StoreError {
    StoreError::Io(std::io::Error::other("injected backend failure"))
}

impl<B: Backend> Backend for FailingBackend<B> {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        if key.starts_with("chunks/") && self.chunk_puts_left.fetch_sub(1, Ordering::SeqCst) == 0 {
            self.chunk_puts_left.store(0, Ordering::SeqCst);
            return Err(injected());
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.inner.head(key)
    }
    fn touch(&self, key: &str) -> Result<bool> {
        self.inner.touch(key)
    }
    fn delete(&self, key: &str) -> Result<bool> {
        self.inner.delete(key)
    }
    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>> {
        self.inner.delete_if_older(key, cutoff)
    }
    fn list<'a>(&'a self, prefix: &str) -> Result<ObjectIter<'a>> {
        self.inner.list(prefix)
    }
    fn sync(&self) -> Result<()> {
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(injected());
        }
        self.inner.sync()
    }
}

/// Keys under `prefix`.
pub fn keys(b: &dyn Backend, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = b
        .list(prefix)
        .expect("list")
        .map(|m| m.expect("list item").key)
        .collect();
    v.sort();
    v
}
