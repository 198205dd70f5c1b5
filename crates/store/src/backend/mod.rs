//! Object-store-like backends the chunk store writes to.
//!
//! The interface is synchronous and small enough for an S3 backend: whole-object `put`/`get`,
//! ranged reads, listing by prefix with size and modification time, and a durability barrier.
//! Two extra operations make GC safe against concurrent ingests without shared counters:
//! [`Backend::touch`] (refresh an object's modification time, used when an ingest reuses an
//! existing chunk) and [`Backend::delete_if_older`] (delete only if not refreshed since a cutoff).

pub mod direct;
mod local;
mod mem;
mod s3;

pub use direct::ObjectBuf;
pub use local::{LocalBackend, SyncMode};
pub use mem::MemBackend;
pub use s3::S3Backend;

use crate::error::{Result, StoreError};
use std::sync::Arc;
use std::time::SystemTime;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification (write or [`Backend::touch`]).
    pub modified: SystemTime,
}

/// Iterator over listed objects.
pub type ObjectIter<'a> = Box<dyn Iterator<Item = Result<ObjectMeta>> + Send + 'a>;

/// A flat key -> bytes object store. Keys are `/`-separated paths of `[A-Za-z0-9._-]`
/// components (see [`validate_key`]). Objects written by this crate are content-addressed, so a
/// key's bytes never change once written; `put` over an existing key writes the same bytes.
pub trait Backend: Send + Sync {
    /// Writes an object atomically: readers see either nothing or all of `data`. The object is
    /// visible on return but durable only after the next [`Backend::sync`].
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Reads a whole object; `NotFound` if absent.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Like [`Backend::get`], into a buffer the backend may take from a pool (the local
    /// backend reads large objects with `O_DIRECT` into reused aligned buffers).
    fn get_buf(&self, key: &str) -> Result<ObjectBuf> {
        self.get(key).map(ObjectBuf::from)
    }
    /// Like [`Backend::put`] for an object of `len` bytes that `fill` writes into the
    /// backend's own buffer (saving a copy where the backend writes from an aligned one).
    /// Nothing is written if `fill` fails.
    fn put_with(
        &self,
        key: &str,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let mut v = vec![0u8; len];
        fill(&mut v)?;
        self.put(key, &v)
    }
    /// Reads up to `len` bytes at `offset` (fewer at the end of the object, none past it).
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Whether the object exists.
    fn exists(&self, key: &str) -> Result<bool>;
    /// Size and modification time of one object, `None` if absent.
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// Sets the object's modification time to now; `false` if it does not exist.
    fn touch(&self, key: &str) -> Result<bool>;
    /// Deletes an object; `false` if it did not exist.
    fn delete(&self, key: &str) -> Result<bool>;
    /// Deletes the object only if its modification time is before `cutoff`, atomically with
    /// respect to concurrent [`Backend::touch`] and [`Backend::put`] (a touch that happens
    /// before the delete keeps the object; one after it reports the object absent). Returns the
    /// freed size, or `None` if the object was absent or kept.
    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>>;
    /// Lists objects whose key starts with `prefix`, in no particular order.
    fn list<'a>(&'a self, prefix: &str) -> Result<ObjectIter<'a>>;
    /// Durability barrier: everything written (put) before the call is durable on return.
    fn sync(&self) -> Result<()>;
    /// Whether [`Backend::delete_if_older`] is really atomic with respect to `touch`. `false`
    /// for a backend that can only check then delete (S3 has no conditional delete): GC and
    /// `put_manifest` then follow the sweep-marker protocol of [`crate::gc`].
    fn atomic_delete_if_older(&self) -> bool {
        true
    }
}

macro_rules! forward_backend {
    ($t:ty) => {
        impl<T: Backend + ?Sized> Backend for $t {
            fn put(&self, key: &str, data: &[u8]) -> Result<()> {
                (**self).put(key, data)
            }
            fn get(&self, key: &str) -> Result<Vec<u8>> {
                (**self).get(key)
            }
            fn get_buf(&self, key: &str) -> Result<ObjectBuf> {
                (**self).get_buf(key)
            }
            fn put_with(
                &self,
                key: &str,
                len: usize,
                fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
            ) -> Result<()> {
                (**self).put_with(key, len, fill)
            }
            fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
                (**self).get_range(key, offset, len)
            }
            fn exists(&self, key: &str) -> Result<bool> {
                (**self).exists(key)
            }
            fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
                (**self).head(key)
            }
            fn touch(&self, key: &str) -> Result<bool> {
                (**self).touch(key)
            }
            fn delete(&self, key: &str) -> Result<bool> {
                (**self).delete(key)
            }
            fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>> {
                (**self).delete_if_older(key, cutoff)
            }
            fn list<'a>(&'a self, prefix: &str) -> Result<ObjectIter<'a>> {
                (**self).list(prefix)
            }
            fn sync(&self) -> Result<()> {
                (**self).sync()
            }
            fn atomic_delete_if_older(&self) -> bool {
                (**self).atomic_delete_if_older()
            }
        }
    };
}

forward_backend!(Arc<T>);
forward_backend!(Box<T>);

/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 1024;

/// Checks a key: non-empty, at most [`MAX_KEY_LEN`] bytes, `/`-separated components of
/// `[A-Za-z0-9._-]` that are not empty and do not start with `.` (no `..`, no hidden names).
pub fn validate_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("bad object key {key:?}")))
    }
}

/// Key of a chunk: `chunks/ab/cd/<hex>`.
pub fn chunk_key(id: &crate::ChunkId) -> String {
    let h = id.to_hex();
    format!("chunks/{}/{}/{}", &h[0..2], &h[2..4], h)
}

/// Key of a manifest: `manifests/<hex>`.
pub fn manifest_key(id: &crate::ManifestId) -> String {
    format!("manifests/{}", id.to_hex())
}

/// Prefix under which all chunks live.
pub const CHUNK_PREFIX: &str = "chunks/";
/// Prefix under which all manifests live.
pub const MANIFEST_PREFIX: &str = "manifests/";
