//! # openims-store
//!
//! The data plane's content-addressed chunk store.
//!
//! This crate owns:
//! - **chunks**: a virtual disk is cut into fixed-size chunks ([`CHUNK_SIZE`], 4 MiB by
//!   default); all-zero chunks are not stored; each stored chunk is addressed by the BLAKE3 of
//!   its plaintext ([`ChunkId`]), so identical data is stored once across images and tenants;
//! - **manifests** ([`Manifest`]): the immutable, content-addressed ([`ManifestId`]) chunk list
//!   of one virtual disk, in a compact checksummed binary form;
//! - **backends** ([`Backend`]): a small synchronous object-store interface, with
//!   [`LocalBackend`] (files under a directory, atomic renames, explicit durability barrier)
//!   and [`MemBackend`] (in memory, for tests);
//! - **the store** ([`Store`]): ingesting a `VirtualDisk` ([`Store::ingest`]), reading one back
//!   verified ([`Store::open_disk`], [`Store::stream_raw`]), metering ([`Store::usage`]),
//!   mark-and-sweep **GC** ([`Store::gc`]) and **fsck** ([`Store::fsck`]).
//!
//! It must not: use a database, know about tenants, images or quotas (callers pass the live
//! manifest ids), speak HTTP, or run an async runtime. All methods block; async callers use
//! `spawn_blocking`.
//!
//! Invariant: a manifest is written only after every chunk it references is durably stored,
//! and nothing GC deletes can be referenced by a manifest written concurrently (see [`gc`]).
//!
//! ## Design notes
//! - Keys: `chunks/ab/cd/<hex>`, `echunks/ab/cd/<hex>` (encrypted chunks, see [`crypto`]),
//!   `composed/ab/cd/<hex>` (a plaintext chunk kept as byte ranges of other chunks, see
//!   [`compose`]) and `manifests/<hex>`; the serialized manifest format is in [`manifest`]
//!   (version 2 marks a manifest of encrypted chunks).
//! - Envelope encryption: [`crypto`] encrypts chunk bytes under a data key ([`Dek`]) with
//!   AES-256-GCM; the store never sees key-encryption keys (the core wraps DEKs).
//!   [`Store::open_disk_with`] reads an encrypted manifest with its DEK;
//!   [`Store::reencrypt`] streams a manifest's chunks into a new encrypted manifest,
//!   resumable from an [`EncryptCheckpoint`].
//! - Ingest pipeline: the caller's thread asks the disk for its allocation map (64 chunks at a
//!   time) and never reads chunks that are wholly holes; data chunks go through a pool of
//!   `ingest_workers + 2` buffers to worker threads that zero-check, hash and write them. A
//!   chunk the disk reports as byte ranges of chunks already stored (a disk image uploaded to
//!   a bucket) is written as a small composition of those ranges instead of its bytes.
//! - Dedup check = [`Backend::touch`]: "exists" and "refresh the modification time" in one
//!   call, so a chunk reused by a running ingest looks young to GC. [`Store::put_manifest`]
//!   touches every referenced chunk again (failing if one vanished) before `sync` and the
//!   manifest write: a manifest can never reference a missing chunk.
//! - GC deletes through [`Backend::delete_if_older`], atomic with respect to `touch` (the
//!   local backend renames the object aside, re-checks its mtime, then deletes or restores).
//! - Reads verify every chunk and its length (a plaintext chunk by its BLAKE3, an encrypted
//!   one by its AES-GCM tag, decrypting in place); `ManifestDisk` caches the last chunk and
//!   reads ahead. The local backend reads and writes chunk-sized objects with `O_DIRECT`
//!   through pooled aligned buffers ([`backend::ObjectBuf`], [`Backend::put_with`]): no
//!   page-cache copies, and an encrypted chunk is encrypted straight into the buffer written.
//! - Durability: see [`SyncMode`] (measured; per-file `fdatasync` before rename is the
//!   default because a surviving name must mean complete content).

pub mod backend;
pub mod compose;
pub mod crypto;
mod disk;
mod encrypt;
pub mod error;
pub mod gc;
mod id;
mod ingest;
pub mod manifest;
mod store;

pub use backend::{Backend, LocalBackend, MemBackend, ObjectMeta, S3Backend, SyncMode};
pub use crypto::Dek;
pub use disk::{ManifestDisk, ManifestReader};
pub use encrypt::{EncryptCheckpoint, EncryptProgress};
pub use error::{Result, StoreError};
pub use gc::{FsckReport, GcReport};
pub use id::{ChunkId, ManifestId};
pub use ingest::{is_all_zero, Checkpointing, IngestCheckpoint, IngestProgress, IngestReport};
pub use manifest::Manifest;
pub use store::{Store, StoreConfig, Usage, CHUNK_SIZE};

/// Locks `m`, going on with the data of a poisoned mutex: the store's mutexes guard plain
/// sets, queues and buffer pools that a panicking holder cannot leave half-updated.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
