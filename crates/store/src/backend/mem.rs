//! [`MemBackend`]: objects in memory, for tests of this crate and of its users.

use super::{validate_key, Backend, ObjectIter, ObjectMeta};
use crate::error::{Result, StoreError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

type Objects = BTreeMap<String, (Arc<Vec<u8>>, SystemTime)>;

/// A [`Backend`] keeping objects in a map. `sync` is a no-op: objects live as long as the
/// backend. Thread-safe; every operation is atomic.
#[derive(Debug, Default)]
pub struct MemBackend {
    objects: Mutex<Objects>,
}

impl MemBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Objects> {
        crate::lock(&self.objects)
    }

    /// Sets an object's modification time (tests use it to age objects past a GC grace
    /// period); `false` if absent.
    pub fn set_modified(&self, key: &str, at: SystemTime) -> bool {
        match self.lock().get_mut(key) {
            Some(o) => {
                o.1 = at;
                true
            }
            None => false,
        }
    }

    /// Replaces an object's bytes without changing its modification time (tests use it to
    /// simulate corruption); `false` if absent.
    pub fn corrupt(&self, key: &str, data: Vec<u8>) -> bool {
        match self.lock().get_mut(key) {
            Some(o) => {
                o.0 = Arc::new(data);
                true
            }
            None => false,
        }
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True if no object is stored.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Backend for MemBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        validate_key(key)?;
        self.lock().insert(
            key.to_string(),
            (Arc::new(data.to_vec()), SystemTime::now()),
        );
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        validate_key(key)?;
        match self.lock().get(key) {
            Some(o) => Ok(o.0.as_ref().clone()),
            None => Err(StoreError::NotFound(key.to_string())),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let data = self.get(key)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
        Ok(data[start..end.min(data.len())].to_vec())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        Ok(self.lock().contains_key(key))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        validate_key(key)?;
        Ok(self.lock().get(key).map(|o| ObjectMeta {
            key: key.to_string(),
            size: o.0.len() as u64,
            modified: o.1,
        }))
    }

    fn touch(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        Ok(self.set_modified(key, SystemTime::now()))
    }

    fn delete(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        Ok(self.lock().remove(key).is_some())
    }

    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>> {
        validate_key(key)?;
        let mut objects = self.lock();
        match objects.get(key) {
            Some(o) if o.1 < cutoff => {
                let size = o.0.len() as u64;
                objects.remove(key);
                Ok(Some(size))
            }
            _ => Ok(None),
        }
    }

    fn list<'a>(&'a self, prefix: &str) -> Result<ObjectIter<'a>> {
        let snapshot: Vec<Result<ObjectMeta>> = self
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, o)| {
                Ok(ObjectMeta {
                    key: k.clone(),
                    size: o.0.len() as u64,
                    modified: o.1,
                })
            })
            .collect();
        Ok(Box::new(snapshot.into_iter()))
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }
}
