//! `Store::reencrypt`: a stored manifest (plaintext, or encrypted under one data key) ->
//! a new encrypted manifest under another data key, streaming, resumable.
//!
//! Two reader threads fetch source chunk objects, alternate chunks each (I/O only); worker
//! threads verify (or decrypt) them, encrypt and write them; the caller's thread puts the
//! results back in order and reports progress. Zero chunks stay zero chunks; a source chunk
//! repeated in the disk is not read again once its first copy is encrypted. Encryption is
//! deterministic per data key (see [`crate::crypto`]), so a resumed run writes
//! byte-identical objects: every step is idempotent.

use crate::backend::ObjectBuf;
use crate::crypto::Dek;
use crate::error::{Result, StoreError};
use crate::id::{ChunkId, ManifestId};
use crate::lock;
use crate::manifest::Manifest;
use crate::store::Store;
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{channel, sync_channel, Receiver};
use std::sync::{Arc, Mutex};

/// What a re-encryption already did: chunks `[0, next_index)` of the new manifest, durable.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncryptCheckpoint {
    /// First chunk index not yet done (every chunk before it is durably stored).
    pub next_index: u64,
    /// New chunk ids for indexes `[0, next_index)` (`None` = zero chunk).
    pub chunks: Vec<Option<ChunkId>>,
}

/// Progress of a running re-encryption.
#[derive(Debug)]
pub struct EncryptProgress<'a> {
    /// Chunks done, in order (the checkpoint's `next_index`).
    pub chunks_done: u64,
    /// Chunks of the disk.
    pub chunks_total: u64,
    /// Virtual bytes done (zero chunks included).
    pub bytes_done: u64,
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Plaintext bytes encrypted by this run (not counting resumed or repeated chunks).
    pub data_bytes: u64,
    /// True when everything in `checkpoint` is durable: only then may a caller persist it.
    pub durable: bool,
    /// The state to resume from.
    pub checkpoint: &'a EncryptCheckpoint,
}

enum Work {
    Zero,
    Known(ChunkId),
    /// A source chunk's stored object, not yet verified (or decrypted): workers do that,
    /// so the reader thread only does I/O.
    Raw(ChunkId, ObjectBuf, u64),
}

type Done = (u64, Option<ChunkId>, u64);

impl Store {
    /// Encrypts every stored chunk of manifest `src` under `dst_dek` and writes the new
    /// encrypted manifest, returning its id. `src_dek` is the data key of `src` if it is
    /// encrypted. `resume` continues an interrupted run. `progress` is called on the
    /// caller's thread as chunks complete in order; every `checkpoint_every` chunks (and at
    /// the end) the store makes written chunks durable first and reports `durable = true`.
    /// An error returned by `progress` aborts the run.
    pub fn reencrypt(
        &self,
        src: &ManifestId,
        src_dek: Option<&Dek>,
        dst_dek: &Dek,
        resume: Option<EncryptCheckpoint>,
        checkpoint_every: u64,
        progress: &mut dyn FnMut(&EncryptProgress<'_>) -> Result<()>,
    ) -> Result<ManifestId> {
        let m = Arc::new(self.manifest(src)?);
        if m.is_encrypted() && src_dek.is_none() {
            return Err(StoreError::Invalid(format!(
                "manifest {src} is encrypted and no data key was given"
            )));
        }
        let total = m.chunks().len() as u64;
        let mut cp = resume.unwrap_or_default();
        if cp.next_index > total || cp.chunks.len() as u64 != cp.next_index {
            return Err(StoreError::Invalid(format!(
                "checkpoint at chunk {} with {} ids does not fit a {total}-chunk manifest",
                cp.next_index,
                cp.chunks.len()
            )));
        }
        let every = checkpoint_every.max(1);
        let workers = self.inner.config.ingest_workers.max(1);
        let seen: Mutex<HashMap<ChunkId, ChunkId>> = Mutex::default();
        let start = cp.next_index;
        let mut data_bytes = 0u64;
        let stop_flag = std::sync::atomic::AtomicBool::new(false);

        let outcome: Result<()> = std::thread::scope(|s| {
            let (work_tx, work_rx) = sync_channel::<(u64, Work)>(workers + 1);
            let work_rx = Arc::new(Mutex::new(work_rx));
            let (done_tx, done_rx) = channel::<Result<Done>>();
            let stop = &stop_flag;
            let seen = &seen;

            // Readers: from the checkpoint, reader k taking every READERS-th chunk from
            // `start + k`, so that one chunk is read while the other reader waits to hand its
            // chunk over (the disk does not wait for the channel).
            for k in 0..READERS {
                let m = Arc::clone(&m);
                let done_tx = done_tx.clone();
                let work_tx = work_tx.clone();
                s.spawn(move || {
                    for i in (start + k..total).step_by(READERS as usize) {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        let idx = i as usize;
                        let w = match m.chunks()[idx] {
                            None => Work::Zero,
                            Some(id) => {
                                let known = lock(seen).get(&id).copied();
                                match known {
                                    Some(new) => Work::Known(new),
                                    None => match self.read_object(m.is_encrypted(), &id) {
                                        Ok(o) => Work::Raw(id, o, m.chunk_len(idx)),
                                        Err(e) => {
                                            let _ = done_tx.send(Err(e));
                                            return;
                                        }
                                    },
                                }
                            }
                        };
                        if work_tx.send((i, w)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(work_tx);
            // Workers: encrypt and write.
            for _ in 0..workers {
                let work_rx = Arc::clone(&work_rx);
                let done_tx = done_tx.clone();
                let src_dek = src_dek.cloned();
                let encrypted = m.is_encrypted();
                s.spawn(move || {
                    worker(
                        self,
                        (encrypted, src_dek.as_ref()),
                        dst_dek,
                        &work_rx,
                        &done_tx,
                        seen,
                    )
                });
            }
            drop(done_tx);

            // Collector: in order, with progress and checkpoints.
            let mut pending: BTreeMap<u64, Option<ChunkId>> = BTreeMap::new();
            let mut since_sync = 0u64;
            let mut result = Ok(());
            for r in done_rx.iter() {
                let (i, id, new_bytes) = match r {
                    Ok(d) => d,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
                data_bytes += new_bytes;
                pending.insert(i, id);
                let mut advanced = false;
                while let Some(id) = pending.remove(&cp.next_index) {
                    cp.chunks.push(id);
                    cp.next_index += 1;
                    since_sync += 1;
                    advanced = true;
                }
                if !advanced {
                    continue;
                }
                let durable = since_sync >= every || cp.next_index == total;
                if durable {
                    if let Err(e) = self.sync() {
                        result = Err(e);
                        break;
                    }
                    since_sync = 0;
                }
                let p = EncryptProgress {
                    chunks_done: cp.next_index,
                    chunks_total: total,
                    bytes_done: m.chunk_offset(cp.next_index as usize).min(m.virtual_size()),
                    virtual_size: m.virtual_size(),
                    data_bytes,
                    durable,
                    checkpoint: &cp,
                };
                if let Err(e) = progress(&p) {
                    result = Err(e);
                    break;
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            // Unblock and drain the threads.
            drop(done_rx);
            result
        });
        outcome?;
        if cp.next_index != total {
            return Err(StoreError::Invalid(format!(
                "re-encryption stopped at chunk {} of {total}",
                cp.next_index
            )));
        }
        if total == 0 {
            let p = EncryptProgress {
                chunks_done: 0,
                chunks_total: 0,
                bytes_done: 0,
                virtual_size: m.virtual_size(),
                data_bytes: 0,
                durable: true,
                checkpoint: &cp,
            };
            progress(&p)?;
        }
        let out = Manifest::new_encrypted(m.virtual_size(), m.chunk_size(), cp.chunks)?;
        self.put_manifest(&out)
    }
}

/// Reader threads of [`Store::reencrypt`].
const READERS: u64 = 2;

/// Encrypts one source object read by the reader under `dek` and stores it: a plaintext
/// source is verified against its id (its new id derives from that id, see
/// [`crate::crypto`]), an encrypted one is decrypted in place. Returns the new id and the
/// plaintext length.
fn encrypt_one(
    store: &Store,
    src: (bool, Option<&Dek>),
    dek: &Dek,
    id: &ChunkId,
    mut obj: ObjectBuf,
    want: u64,
) -> Result<(ChunkId, u64)> {
    let new_id = match src {
        (false, _) => {
            if ChunkId::hash(&obj) != *id {
                return Err(StoreError::corrupt(
                    crate::backend::chunk_key(id),
                    "chunk content does not match its id",
                ));
            }
            crate::crypto::encrypted_id_of(dek, id)
        }
        (true, Some(k)) => {
            let range = crate::crypto::decrypt_chunk_in_place(k, id, &mut obj)?;
            obj.narrow(range);
            crate::crypto::encrypted_chunk_id(dek, &obj)
        }
        (true, None) => {
            return Err(StoreError::Invalid(
                "the manifest is encrypted and no data key was given".into(),
            ))
        }
    };
    if obj.len() as u64 != want {
        return Err(StoreError::corrupt(
            format!("chunk {id}"),
            format!("{} bytes, manifest expects {want}", obj.len()),
        ));
    }
    store.put_encrypted_chunk_as(dek, &new_id, &obj)?;
    Ok((new_id, want))
}

fn worker(
    store: &Store,
    src: (bool, Option<&Dek>),
    dek: &Dek,
    work: &Mutex<Receiver<(u64, Work)>>,
    done: &std::sync::mpsc::Sender<Result<Done>>,
    seen: &Mutex<HashMap<ChunkId, ChunkId>>,
) {
    loop {
        let next = lock(work).recv();
        let Ok((i, w)) = next else { return };
        let r = match w {
            Work::Zero => Ok((i, None, 0)),
            Work::Known(id) => Ok((i, Some(id), 0)),
            Work::Raw(src_id, obj, want) => {
                encrypt_one(store, src, dek, &src_id, obj, want).map(|(id, n)| {
                    lock(seen).insert(src_id, id);
                    (i, Some(id), n)
                })
            }
        };
        if done.send(r).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemBackend, StoreConfig};

    fn store() -> Store {
        Store::open(
            MemBackend::default(),
            StoreConfig {
                chunk_size: 4096,
                ..StoreConfig::default()
            },
        )
        .expect("store")
    }

    fn plain_manifest(s: &Store, chunks: &[Option<&[u8]>], tail: usize) -> ManifestId {
        let ids = chunks
            .iter()
            .map(|c| c.map(|d| s.put_chunk(d).expect("put")))
            .collect();
        let size = (chunks.len() as u64 - 1) * 4096 + tail as u64;
        s.put_manifest(&Manifest::new(size, 4096, ids).expect("m"))
            .expect("put manifest")
    }

    fn read_all(s: &Store, id: &ManifestId, dek: Option<Dek>) -> Vec<u8> {
        use std::io::Read;
        let disk = s.open_disk_with(id, dek).expect("open");
        let mut out = Vec::new();
        crate::ManifestReader::new(disk)
            .read_to_end(&mut out)
            .expect("read");
        out
    }

    #[test]
    fn encrypt_rekey_and_resume_give_the_same_disk() {
        let s = store();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let c = vec![3u8; 100];
        let src = plain_manifest(&s, &[Some(&a), None, Some(&b), Some(&a), Some(&c)], 100);
        let want = read_all(&s, &src, None);
        let dek = Dek::generate();
        let mut calls = 0;
        let enc = s
            .reencrypt(&src, None, &dek, None, 2, &mut |p| {
                calls += 1;
                assert!(p.chunks_done <= p.chunks_total);
                Ok(())
            })
            .expect("encrypt");
        assert!(calls >= 1);
        let m = s.manifest(&enc).expect("m");
        assert!(m.is_encrypted());
        // A repeated chunk is stored once; the zero chunk stays zero.
        assert_eq!(m.chunks()[0], m.chunks()[3]);
        assert_eq!(m.chunks()[1], None);
        assert_eq!(read_all(&s, &enc, Some(dek.clone())), want);
        // Without the key: refused; with another key: refused.
        assert!(s.open_disk(&enc).is_err());
        let mut wrong = s.open_disk_with(&enc, Some(Dek::generate())).expect("open");
        let mut buf = vec![0u8; 10];
        assert!(wrong.read(0, &mut buf).expect_err("wrong key").is_corrupt());

        // Re-key with full re-encryption, interrupted after 2 chunks then resumed.
        let dek2 = Dek::generate();
        let mut saved = None;
        let e = s
            .reencrypt(&enc, Some(&dek), &dek2, None, 1, &mut |p| {
                if p.durable {
                    saved = Some(p.checkpoint.clone());
                }
                if p.chunks_done >= 2 {
                    return Err(StoreError::Invalid("simulated crash".into()));
                }
                Ok(())
            })
            .expect_err("interrupted");
        assert!(e.to_string().contains("simulated crash"));
        let cp = saved.expect("checkpoint");
        // Chunks finish on worker threads: the run stops at the first in-order progress
        // past 2, which may have advanced over several chunks at once.
        assert!(
            (2..=5).contains(&cp.next_index),
            "stopped at {}",
            cp.next_index
        );
        let rekeyed = s
            .reencrypt(&enc, Some(&dek), &dek2, Some(cp), 1, &mut |_| Ok(()))
            .expect("resume");
        assert_eq!(read_all(&s, &rekeyed, Some(dek2.clone())), want);
        // Deterministic: a fresh full run gives the same manifest.
        let again = s
            .reencrypt(&enc, Some(&dek), &dek2, None, 10, &mut |_| Ok(()))
            .expect("again");
        assert_eq!(again, rekeyed);

        // GC keeps what live manifests reference, in both namespaces; fsck is clean.
        let r = s
            .gc(&[src, enc, rekeyed], std::time::Duration::ZERO)
            .expect("gc");
        assert_eq!(r.chunks_deleted, 0);
        let f = s.fsck(&[src, enc, rekeyed]).expect("fsck");
        assert!(f.is_clean(), "{f:?}");
        assert_eq!(f.chunks_checked, 3 + 3 + 3);
        // Dropping the re-keyed manifest frees its encrypted chunks.
        let r = s.gc(&[src, enc], std::time::Duration::ZERO).expect("gc");
        assert_eq!(r.chunks_deleted, 3);
        assert!(s.fsck(&[src, enc]).expect("fsck").is_clean());
    }

    #[test]
    fn bad_checkpoint_is_refused() {
        let s = store();
        let a = vec![1u8; 4096];
        let src = plain_manifest(&s, &[Some(&a)], 4096);
        let cp = EncryptCheckpoint {
            next_index: 2,
            chunks: vec![None, None],
        };
        assert!(s
            .reencrypt(&src, None, &Dek::generate(), Some(cp), 1, &mut |_| Ok(()))
            .is_err());
    }
}
