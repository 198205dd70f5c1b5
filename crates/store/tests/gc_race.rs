//! GC against an ingest on a backend without an atomic conditional delete (like S3, where
//! `delete_if_older` is a HEAD then a DELETE): an ingest that reuses an old unreferenced chunk
//! exactly between GC's HEAD and its DELETE must not end with a manifest whose chunk is gone.

use openims_store::backend::ObjectIter;
use openims_store::{Backend, Manifest, MemBackend, ObjectMeta, Result, Store, StoreConfig};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A `MemBackend` whose `delete_if_older` checks then deletes, running a hook in between.
struct CheckThenDelete {
    inner: MemBackend,
    /// Run once, between the HEAD and the DELETE of a chunk.
    between: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Signalled on every touch.
    touched: Mutex<Option<mpsc::Sender<String>>>,
}

impl Backend for CheckThenDelete {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
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
        let r = self.inner.touch(key);
        if let Some(tx) = self.touched.lock().unwrap().as_ref() {
            let _ = tx.send(key.to_string());
        }
        r
    }
    fn delete(&self, key: &str) -> Result<bool> {
        self.inner.delete(key)
    }
    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>> {
        match self.inner.head(key)? {
            Some(m) if m.modified < cutoff => {
                if key.starts_with("chunks/") {
                    if let Some(hook) = self.between.lock().unwrap().take() {
                        hook();
                    }
                }
                Ok(self.inner.delete(key)?.then_some(m.size))
            }
            _ => Ok(None),
        }
    }
    fn list<'a>(&'a self, prefix: &str) -> Result<ObjectIter<'a>> {
        self.inner.list(prefix)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn atomic_delete_if_older(&self) -> bool {
        false
    }
}

#[test]
fn chunk_reused_between_gc_check_and_delete_is_not_lost() {
    let backend = Arc::new(CheckThenDelete {
        inner: MemBackend::new(),
        between: Mutex::new(None),
        touched: Mutex::new(None),
    });
    let store = Store::open(
        Arc::clone(&backend),
        StoreConfig {
            chunk_size: 4096,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    // An old chunk no manifest references.
    let data = vec![7u8; 4096];
    let chunk = store.put_chunk(&data).unwrap();
    store.sync().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let manifest = Manifest::new(4096, 4096, vec![Some(chunk)]).unwrap();

    // Between GC's check and its delete, an ingest reuses the chunk: it touches it (the
    // hook returns once it has) and writes a manifest referencing it.
    let (tx, rx) = mpsc::channel();
    *backend.touched.lock().unwrap() = Some(tx);
    let ingest: Arc<Mutex<Option<std::thread::JoinHandle<_>>>> = Arc::default();
    {
        let (store, ingest) = (store.clone(), Arc::clone(&ingest));
        *backend.between.lock().unwrap() = Some(Box::new(move || {
            let m = manifest.clone();
            *ingest.lock().unwrap() = Some(std::thread::spawn(move || store.put_manifest(&m)));
            let key = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("ingest touched");
            assert!(key.starts_with("chunks/"), "{key}");
        }));
    }
    let gc = store.gc(&[], Duration::ZERO).unwrap();
    assert_eq!(gc.chunks_deleted, 1, "{gc:?}");
    let handle = ingest.lock().unwrap().take().expect("the ingest ran");
    match handle.join().unwrap() {
        // The ingest noticed the sweep and that its chunk went: nothing was written, the
        // caller rewrites or fails.
        Err(openims_store::StoreError::NotFound(_)) => {}
        // Or it wrote a manifest: then every chunk it references must exist.
        Ok(id) => {
            let fsck = store.fsck(&[id]).unwrap();
            assert!(
                fsck.missing_chunks.is_empty(),
                "the manifest references a chunk GC deleted: {fsck:?}"
            );
        }
        Err(e) => panic!("{e}"),
    }
    // The sweep marker stays after the pass (a later pass deletes it once stale).
    assert_eq!(backend.inner.list("gc/").unwrap().count(), 1);
}
