//! [`Store`]: chunks and manifests on a [`Backend`].

use crate::backend::{chunk_key, manifest_key, Backend, ObjectBuf};
use crate::crypto::{self, Dek};
use crate::error::{Result, StoreError};
use crate::id::{ChunkId, ManifestId};
use crate::manifest::{Manifest, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use std::collections::HashSet;
use std::sync::Arc;

/// Default chunk size: 4 MiB.
pub const CHUNK_SIZE: u32 = 4 << 20;

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Chunk size for new ingests (existing manifests keep theirs). Default [`CHUNK_SIZE`];
    /// must lie within [`MIN_CHUNK_SIZE`, `MAX_CHUNK_SIZE`].
    pub chunk_size: u32,
    /// Threads that zero-check, hash and write chunks during an ingest while the caller's
    /// thread reads the disk. Default 2. Memory per ingest is about
    /// `(ingest_workers + 2) * chunk_size`.
    pub ingest_workers: usize,
    /// Largest virtual disk accepted by `ingest` (bounds the manifest: 32 bytes per chunk).
    /// Default 64 TiB.
    pub max_virtual_size: u64,
    /// Store a chunk an ingest finds as byte ranges of chunks already stored (a disk image
    /// imported from a bucket object) as a composition of those ranges instead of writing its
    /// bytes again (see [`crate::compose`]; only on backends with an atomic conditional
    /// delete). Default `true`.
    pub compose: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            chunk_size: CHUNK_SIZE,
            ingest_workers: 2,
            max_virtual_size: 64 << 40,
            compose: true,
        }
    }
}

/// `data` if it hashes to plaintext chunk `id`, else `Corrupt`.
pub(crate) fn verified(id: &ChunkId, data: ObjectBuf) -> Result<ObjectBuf> {
    if ChunkId::hash(&data) != *id {
        return Err(StoreError::corrupt(
            chunk_key(id),
            "chunk content does not match its id",
        ));
    }
    Ok(data)
}

/// How [`Store::put_chunk_from`] stored a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// It was stored already (and is touched).
    Present,
    /// Its bytes were written.
    Written,
    /// A composition of other chunks' bytes was written.
    Composed,
}

/// Logical and physical size of a set of manifests (for metering).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sum of the virtual sizes of the manifests listed (each entry counts, even repeated).
    pub logical_bytes: u64,
    /// Bytes of the distinct stored chunks they reference (shared chunks count once).
    pub physical_bytes: u64,
}

pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: StoreConfig,
    /// Source chunks of composed chunks read lately.
    pub(crate) sources: crate::compose::SourceCache,
}

/// The content-addressed chunk store. Cheap to clone (shared state), `Send + Sync`; all
/// methods block, so call them from `spawn_blocking` in async code.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens a store on `backend`, checking the config.
    pub fn open<B: Backend + 'static>(backend: B, config: StoreConfig) -> Result<Store> {
        Self::open_shared(Arc::new(backend), config)
    }

    /// Opens a store on a shared backend.
    pub fn open_shared(backend: Arc<dyn Backend>, config: StoreConfig) -> Result<Store> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&config.chunk_size) {
            return Err(StoreError::Invalid(format!(
                "chunk_size {} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]",
                config.chunk_size
            )));
        }
        if config.ingest_workers == 0 || config.ingest_workers > 64 {
            return Err(StoreError::Invalid(format!(
                "ingest_workers {} outside [1, 64]",
                config.ingest_workers
            )));
        }
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                config,
                sources: Default::default(),
            }),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    /// The config.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Loads a manifest, verifying that its bytes hash to `id` and that it parses.
    pub fn manifest(&self, id: &ManifestId) -> Result<Manifest> {
        let key = manifest_key(id);
        let bytes = self.inner.backend.get(&key).map_err(|e| match e {
            StoreError::NotFound(_) => StoreError::NotFound(format!("manifest {id}")),
            e => e,
        })?;
        if ManifestId::hash(&bytes) != *id {
            return Err(StoreError::corrupt(
                key,
                "manifest content does not match its id",
            ));
        }
        Manifest::from_bytes(&bytes, &key)
    }

    /// Stores a manifest and returns its id. Every chunk it references must already be stored:
    /// each is touched (which also protects it from a concurrent GC, see [`Store::gc`]); a
    /// missing one fails with `NotFound` and nothing is written. Chunks are made durable
    /// (`sync`) before the manifest is written, and the manifest is durable on return.
    pub fn put_manifest(&self, m: &Manifest) -> Result<ManifestId> {
        let b = &self.inner.backend;
        let encrypted = m.is_encrypted();
        let missing = |id: &crate::ChunkId| {
            StoreError::NotFound(format!(
                "chunk {id} referenced by the manifest is not stored"
            ))
        };
        let touching = std::time::Instant::now();
        for id in m.stored_chunks() {
            if !self.touch_chunk(encrypted, &id)? {
                return Err(missing(&id));
            }
        }
        b.sync()?;
        let bytes = m.to_bytes();
        let id = ManifestId::hash(&bytes);
        let key = manifest_key(&id);
        // Same id = same bytes: refreshing the existing object is enough (and keeps GC off it).
        let mut present = b.touch(&key)?;
        // Without atomic conditional deletes a sweep that began before the touches may still
        // delete what they refreshed: wait until its deletes are sent, then check (see
        // `crate::gc`).
        if !b.atomic_delete_if_older()
            && (touching.elapsed() > crate::gc::MARKER_STALE / 2 || self.sweep_running()?)
        {
            std::thread::sleep(crate::gc::SETTLE);
            for id in m.stored_chunks() {
                let stored = if encrypted {
                    self.has_encrypted_chunk(&id)?
                } else {
                    self.has_chunk(&id)?
                };
                if !stored {
                    return Err(missing(&id));
                }
            }
            present = present && b.exists(&key)?;
        }
        if !present {
            b.put(&key, &bytes)?;
            b.sync()?;
        }
        Ok(id)
    }

    /// Whether a chunk is stored (its bytes, or a composition of other chunks).
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        let b = &self.inner.backend;
        Ok(b.exists(&chunk_key(id))? || b.exists(&crate::compose::composed_key(id))?)
    }

    /// Refreshes a stored chunk's modification time (see [`crate::gc`]): an encrypted chunk
    /// object, or a plaintext chunk's bytes or composition. `false` if it is not stored.
    pub(crate) fn touch_chunk(&self, encrypted: bool, id: &ChunkId) -> Result<bool> {
        let b = &self.inner.backend;
        if encrypted {
            return b.touch(&crypto::echunk_key(id));
        }
        Ok(b.touch(&chunk_key(id))? || b.touch(&crate::compose::composed_key(id))?)
    }

    /// The ids in `ids` that are not stored (duplicates reported once, in input order).
    pub fn missing_chunks(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for id in ids {
            if seen.insert(*id) && !self.has_chunk(id)? {
                out.push(*id);
            }
        }
        Ok(out)
    }

    /// Reads a chunk (its bytes, or assembled from its composition) and verifies that its
    /// content hashes to `id` (`Corrupt` otherwise).
    pub fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.get_chunk_buf(id).map(ObjectBuf::into_vec)
    }

    /// Like [`Store::get_chunk`], into a (possibly pooled, see [`Backend::get_buf`]) buffer.
    pub fn get_chunk_buf(&self, id: &ChunkId) -> Result<ObjectBuf> {
        verified(id, self.read_object(false, id)?)
    }

    /// Stores a chunk (if not already stored) and returns its id. Not durable until
    /// [`Store::sync`] or [`Store::put_manifest`]. Empty or over-sized data is refused.
    pub fn put_chunk(&self, data: &[u8]) -> Result<ChunkId> {
        Ok(self.put_chunk_inner(data)?.0)
    }

    /// Stores a chunk unless present (touching it if present); returns its id and whether it
    /// was newly written.
    pub(crate) fn put_chunk_inner(&self, data: &[u8]) -> Result<(ChunkId, bool)> {
        self.put_chunk_as(ChunkId::hash(data), data)
    }

    /// [`Store::put_chunk_inner`] for `data` whose content id the caller has computed
    /// (`id` must be `ChunkId::hash(data)`), so it is not hashed twice.
    pub(crate) fn put_chunk_as(&self, id: ChunkId, data: &[u8]) -> Result<(ChunkId, bool)> {
        let put = self.put_chunk_from(id, data, None)?;
        Ok((id, put == Put::Written))
    }

    /// Stores chunk `id` (`ChunkId::hash(data)`) unless it is stored (touching it then): as
    /// a composition of `pieces` when they are given and usable (see [`crate::compose`]),
    /// else its bytes.
    pub(crate) fn put_chunk_from(
        &self,
        id: ChunkId,
        data: &[u8],
        pieces: Option<Vec<crate::compose::Piece>>,
    ) -> Result<Put> {
        if data.is_empty() || data.len() > MAX_CHUNK_SIZE as usize {
            return Err(StoreError::Invalid(format!(
                "chunk of {} bytes (must be 1..={MAX_CHUNK_SIZE})",
                data.len()
            )));
        }
        debug_assert_eq!(id, ChunkId::hash(data));
        if id == ChunkId::RESERVED_ZERO {
            return Err(StoreError::Invalid(
                "chunk hashes to the reserved id".into(),
            ));
        }
        if self.touch_chunk(false, &id)? {
            return Ok(Put::Present);
        }
        if let Some(pieces) = pieces.filter(|_| self.composes()) {
            if self.put_composed(&id, data, pieces)? {
                return Ok(Put::Composed);
            }
        }
        self.inner.backend.put(&chunk_key(&id), data)?;
        Ok(Put::Written)
    }

    /// Encrypts `plaintext` under `dek` and stores it (unless an object with its id is
    /// already stored, which is then touched); returns its id under `dek`. Not durable until
    /// [`Store::sync`] or [`Store::put_manifest`].
    pub fn put_encrypted_chunk(&self, dek: &Dek, plaintext: &[u8]) -> Result<ChunkId> {
        Ok(self.put_encrypted_chunk_inner(dek, plaintext)?.0)
    }

    /// Like [`Store::put_encrypted_chunk`]; also says whether the object was newly written.
    pub(crate) fn put_encrypted_chunk_inner(
        &self,
        dek: &Dek,
        plaintext: &[u8],
    ) -> Result<(ChunkId, bool)> {
        if plaintext.is_empty() || plaintext.len() > MAX_CHUNK_SIZE as usize {
            return Err(StoreError::Invalid(format!(
                "chunk of {} bytes (must be 1..={MAX_CHUNK_SIZE})",
                plaintext.len()
            )));
        }
        let id = crypto::encrypted_chunk_id(dek, plaintext);
        Ok((id, self.put_encrypted_chunk_as(dek, &id, plaintext)?))
    }

    /// Stores `plaintext` encrypted under `dek` as chunk `id`, which the caller computed with
    /// [`crypto::encrypted_chunk_id`] (or [`crypto::encrypted_id_of`]); touches it
    /// instead if present. Returns whether it was newly written. The plaintext is encrypted
    /// straight into the backend's write buffer.
    pub(crate) fn put_encrypted_chunk_as(
        &self,
        dek: &Dek,
        id: &ChunkId,
        plaintext: &[u8],
    ) -> Result<bool> {
        if self.touch_chunk(true, id)? {
            return Ok(false);
        }
        let len = plaintext.len() + crypto::ECHUNK_OVERHEAD;
        self.inner
            .backend
            .put_with(&crypto::echunk_key(id), len, &mut |out| {
                crypto::encrypt_chunk_into(dek, id, plaintext, out)
            })?;
        Ok(true)
    }

    /// Reads and decrypts an encrypted chunk (see [`crypto::decrypt_chunk`] for the checks).
    pub fn get_encrypted_chunk(&self, dek: &Dek, id: &ChunkId) -> Result<Vec<u8>> {
        self.get_encrypted_chunk_buf(dek, id)
            .map(ObjectBuf::into_vec)
    }

    /// Like [`Store::get_encrypted_chunk`], decrypted in place in a (possibly pooled) buffer.
    pub fn get_encrypted_chunk_buf(&self, dek: &Dek, id: &ChunkId) -> Result<ObjectBuf> {
        let mut obj = self.read_object(true, id)?;
        let plain = crypto::decrypt_chunk_in_place(dek, id, &mut obj)?;
        obj.narrow(plain);
        Ok(obj)
    }

    /// The stored object of an encrypted chunk, checked without any key (magic, nonce bound to
    /// `id`, ciphertext checksum): what a replication to another deployment sends as is.
    pub fn encrypted_object(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let obj = self.read_object(true, id)?;
        crypto::check_encrypted_chunk(id, &obj)?;
        Ok(obj.into_vec())
    }

    /// Whether an encrypted chunk object is stored.
    pub fn has_encrypted_chunk(&self, id: &ChunkId) -> Result<bool> {
        self.inner.backend.exists(&crypto::echunk_key(id))
    }

    /// Stores an encrypted chunk object received from elsewhere (another deployment's
    /// [`Store::encrypted_object`]) after checking it against `id` without any key; touches
    /// it when already stored. Returns whether it was newly written. Not durable until
    /// [`Store::sync`] or [`Store::put_manifest`].
    pub fn put_encrypted_object(&self, id: &ChunkId, obj: &[u8]) -> Result<bool> {
        if obj.len() > MAX_CHUNK_SIZE as usize + crypto::ECHUNK_OVERHEAD {
            return Err(StoreError::Invalid(format!(
                "encrypted chunk object of {} bytes is too large",
                obj.len()
            )));
        }
        crypto::check_encrypted_chunk(id, obj)?;
        if self.touch_chunk(true, id)? {
            return Ok(false);
        }
        self.inner.backend.put(&crypto::echunk_key(id), obj)?;
        Ok(true)
    }

    /// Stores a plaintext chunk received from elsewhere, checking that it hashes to `id`.
    /// Returns whether it was newly written.
    pub fn put_chunk_checked(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        if ChunkId::hash(data) != *id {
            return Err(StoreError::corrupt(
                chunk_key(id),
                "received chunk does not hash to its id",
            ));
        }
        Ok(self.put_chunk_as(*id, data)?.1)
    }

    /// The stored object of chunk `id` of a plaintext or encrypted manifest, unverified; a
    /// plaintext chunk stored as a composition is assembled from its (verified) sources.
    pub(crate) fn read_object(&self, encrypted: bool, id: &ChunkId) -> Result<ObjectBuf> {
        match self.read_stored(encrypted, id) {
            Err(StoreError::NotFound(what)) if !encrypted => match self.read_composed(id)? {
                Some(data) => Ok(data),
                None => Err(StoreError::NotFound(what)),
            },
            r => r,
        }
    }

    /// The object stored under chunk `id`'s own key (no composition), unverified.
    pub(crate) fn read_stored(&self, encrypted: bool, id: &ChunkId) -> Result<ObjectBuf> {
        let (key, what) = if encrypted {
            (crypto::echunk_key(id), "encrypted chunk")
        } else {
            (chunk_key(id), "chunk")
        };
        self.inner.backend.get_buf(&key).map_err(|e| match e {
            StoreError::NotFound(_) => StoreError::NotFound(format!("{what} {id}")),
            e => e,
        })
    }

    /// Reads chunk `id` of a manifest: plaintext chunks are verified against their id;
    /// encrypted ones need the manifest's data key (`Invalid` without it).
    pub fn read_manifest_chunk(
        &self,
        encrypted: bool,
        dek: Option<&Dek>,
        id: &ChunkId,
    ) -> Result<ObjectBuf> {
        match (encrypted, dek) {
            (false, _) => self.get_chunk_buf(id),
            (true, Some(k)) => self.get_encrypted_chunk_buf(k, id),
            (true, None) => Err(StoreError::Invalid(
                "the manifest is encrypted and no data key was given".into(),
            )),
        }
    }

    /// Durability barrier for chunks written with [`Store::put_chunk`].
    pub fn sync(&self) -> Result<()> {
        self.inner.backend.sync()
    }

    /// Logical and physical bytes of `manifests`. Physical counts each distinct chunk once at
    /// its plaintext length (known from the manifests; no chunk is read).
    pub fn usage(&self, manifests: &[ManifestId]) -> Result<Usage> {
        let mut seen_chunks = HashSet::new();
        let mut logical: std::collections::HashMap<ManifestId, u64> = Default::default();
        let mut u = Usage::default();
        for id in manifests {
            let size = match logical.get(id) {
                Some(size) => *size,
                None => {
                    let m = self.manifest(id)?;
                    for (c, len) in m.stored_chunks_with_len() {
                        if seen_chunks.insert(c) {
                            u.physical_bytes += len;
                        }
                    }
                    logical.insert(*id, m.logical_size());
                    m.logical_size()
                }
            };
            u.logical_bytes += size;
        }
        Ok(u)
    }
}
