//! [`S3Backend`]: objects in an external S3-compatible object store, through the
//! `object_store` crate.
//!
//! The [`Backend`] trait is synchronous (the store's callers run it on blocking threads); the
//! S3 client is async. The backend owns a small tokio runtime of its own and every operation is
//! spawned onto it and waited for with a blocking channel receive, so calls work from any
//! thread — a `spawn_blocking` thread, a plain thread, even (though it blocks the worker) an
//! async task of another runtime — without "runtime within runtime" panics.
//!
//! URL form: `s3://BUCKET[/PREFIX]?endpoint=http://host:port&region=R&access_key_id=..&secret_access_key=..`.
//! Credentials and region default to the usual `AWS_*` environment variables; `endpoint` makes
//! the client use path-style requests (MinIO, Ceph RGW, moto, ...), and an `http://` endpoint is
//! allowed explicitly.
//!
//! S3 has no "touch": [`S3Backend::touch`] refreshes an object's modification time with two
//! server-side copies (object -> scratch key -> object; no bytes pass through this process).
//! [`S3Backend::delete_if_older`] is a HEAD followed by a DELETE: S3 offers no conditional
//! delete on modification time, so a touch landing between the two is lost. The service closes
//! that window above the backend (one GC at a time across nodes, and the GC cutoff never later
//! than the start of the oldest unfinished ingest recorded in the database).

use super::{validate_key, Backend, ObjectIter, ObjectMeta};
use crate::error::{Result, StoreError};
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as OsPath;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

/// A [`Backend`] on an S3 bucket (optionally under a key prefix).
pub struct S3Backend {
    store: Arc<AmazonS3>,
    prefix: String,
    rt: Option<tokio::runtime::Runtime>,
    url: String,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn err(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { path, .. } => StoreError::NotFound(path),
        other => StoreError::Io(std::io::Error::other(format!("s3: {other}"))),
    }
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3Backend {
    /// Opens the bucket named by an `s3://` URL (see the module docs) and checks that it is
    /// reachable (one LIST request).
    pub fn open_url(url: &str) -> Result<S3Backend> {
        let parsed = url::Url::parse(url)
            .map_err(|e| StoreError::Invalid(format!("bad store URL {url:?}: {e}")))?;
        if parsed.scheme() != "s3" {
            return Err(StoreError::Invalid(format!(
                "store URL {url:?}: scheme must be s3://"
            )));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| StoreError::Invalid(format!("store URL {url:?}: no bucket")))?
            .to_string();
        let prefix = parsed.path().trim_matches('/').to_string();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        let mut region_set = false;
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "endpoint" => {
                    if v.starts_with("http://") {
                        b = b.with_allow_http(true);
                    }
                    b = b
                        .with_endpoint(v.to_string())
                        .with_virtual_hosted_style_request(false);
                }
                "region" => {
                    b = b.with_region(v.to_string());
                    region_set = true;
                }
                "access_key_id" => b = b.with_access_key_id(v.to_string()),
                "secret_access_key" => b = b.with_secret_access_key(v.to_string()),
                "allow_http" => b = b.with_allow_http(v == "true"),
                other => {
                    return Err(StoreError::Invalid(format!(
                        "store URL {url:?}: unknown parameter {other:?} (endpoint, region, \
                         access_key_id, secret_access_key, allow_http)"
                    )))
                }
            }
        }
        if !region_set && std::env::var_os("AWS_REGION").is_none() {
            b = b.with_region("us-east-1");
        }
        let store = b
            .build()
            .map_err(|e| StoreError::Invalid(format!("store URL {url:?}: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("openims-s3")
            .enable_all()
            .build()?;
        let redacted = {
            let mut u = parsed.clone();
            let kept: Vec<(String, String)> = parsed
                .query_pairs()
                .filter(|(k, _)| k != "secret_access_key")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            u.query_pairs_mut().clear().extend_pairs(kept);
            u.to_string()
        };
        let backend = S3Backend {
            store: Arc::new(store),
            prefix,
            rt: Some(rt),
            url: redacted,
        };
        // Fail fast on a wrong endpoint, bucket or credentials.
        let s = backend.store.clone();
        let p = backend.prefix_path("");
        backend
            .run(async move {
                let mut l = s.list(p.as_ref());
                match l.next().await {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                }
            })?
            .map_err(|e| StoreError::Io(std::io::Error::other(format!("s3 store {url}: {e}"))))?;
        Ok(backend)
    }

    /// The store URL without its secret.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn path(&self, key: &str) -> Result<OsPath> {
        validate_key(key)?;
        Ok(OsPath::from(self.full(key)))
    }

    fn prefix_path(&self, p: &str) -> Option<OsPath> {
        let full = self.full(p.trim_end_matches('/'));
        let full = full.trim_end_matches('/');
        if full.is_empty() {
            None
        } else {
            Some(OsPath::from(full))
        }
    }

    /// Runs a future on the backend's runtime and waits for it on this thread.
    fn run<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .expect("runtime lives as long as the backend");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Io(std::io::Error::other("s3 task was cancelled")))
    }

    fn meta(&self, m: object_store::ObjectMeta) -> ObjectMeta {
        let key = m.location.to_string();
        let key = if self.prefix.is_empty() {
            key
        } else {
            key.strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(&key)
                .to_string()
        };
        ObjectMeta {
            key,
            size: m.size,
            modified: SystemTime::from(m.last_modified),
        }
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Backend for S3Backend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let s = self.store.clone();
        let payload = PutPayload::from(data.to_vec());
        self.run(async move { s.put(&path, payload).await })?
            .map_err(err)?;
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let s = self.store.clone();
        let bytes = self
            .run(async move { s.get(&path).await?.bytes().await })?
            .map_err(err)?;
        Ok(bytes.to_vec())
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            self.head(key)?
                .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
            return Ok(Vec::new());
        }
        let path = self.path(key)?;
        let s = self.store.clone();
        let end = offset.saturating_add(len);
        let r = self.run(async move {
            let opts = GetOptions {
                range: Some(GetRange::Bounded(offset..end)),
                ..Default::default()
            };
            s.get_opts(&path, opts).await?.bytes().await
        })?;
        match r {
            Ok(b) => Ok(b.to_vec()),
            Err(e) if is_not_found(&e) => Err(err(e)),
            Err(e) => {
                // A range starting at or past the end is "not satisfiable" in S3; the trait
                // answers it with no bytes.
                match self.head(key)? {
                    Some(m) if offset >= m.size => Ok(Vec::new()),
                    Some(_) => Err(err(e)),
                    None => Err(StoreError::NotFound(key.to_string())),
                }
            }
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.head(key)?.is_some())
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        let s = self.store.clone();
        match self.run(async move { s.head(&path).await })? {
            Ok(m) => Ok(Some(self.meta(m))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    fn touch(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        let scratch = OsPath::from(self.full(&format!(
            "tmp/touch-{}",
            hex::encode(rand::random::<[u8; 12]>())
        )));
        let s = self.store.clone();
        let r = self.run(async move {
            match s.copy(&path, &scratch).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
            let back = s.copy(&scratch, &path).await;
            let _ = s.delete(&scratch).await;
            back.map(|()| true)
        })?;
        r.map_err(err)
    }

    fn delete(&self, key: &str) -> Result<bool> {
        if self.head(key)?.is_none() {
            return Ok(false);
        }
        let path = self.path(key)?;
        let s = self.store.clone();
        match self.run(async move { s.delete(&path).await })? {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    fn delete_if_older(&self, key: &str, cutoff: SystemTime) -> Result<Option<u64>> {
        // S3 keeps modification times in whole seconds (truncated): an object counts as
        // modified at the end of its second, so a touch in the cutoff's second keeps it.
        // Not atomic (HEAD, then DELETE): the DELETE is only sent within
        // `gc::DELETE_WINDOW` of the HEAD, which `put_manifest` waits out (see `crate::gc`).
        let started = std::time::Instant::now();
        match self.head(key)? {
            Some(m)
                if m.modified + std::time::Duration::from_secs(1) < cutoff
                    && started.elapsed() < crate::gc::DELETE_WINDOW =>
            {
                let path = self.path(key)?;
                let s = self.store.clone();
                match self.run(async move { s.delete(&path).await })? {
                    Ok(()) => Ok(Some(m.size)),
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(err(e)),
                }
            }
            _ => Ok(None),
        }
    }

    fn list<'a>(&'a self, prefix: &str) -> Result<ObjectIter<'a>> {
        // S3 lists by whole path segments here; list the enclosing directory and filter, so
        // a prefix like "chunks/" or "manifests/ab" works as a plain string prefix.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let base = self.prefix_path(dir);
        let s = self.store.clone();
        let metas = self
            .run(async move {
                let mut out = Vec::new();
                let mut l = s.list(base.as_ref());
                while let Some(m) = l.next().await {
                    out.push(m?);
                }
                Ok::<_, object_store::Error>(out)
            })?
            .map_err(err)?;
        let prefix = prefix.to_string();
        let items: Vec<Result<ObjectMeta>> = metas
            .into_iter()
            .map(|m| self.meta(m))
            .filter(|m| m.key.starts_with(&prefix))
            .map(Ok)
            .collect();
        Ok(Box::new(items.into_iter()))
    }

    fn sync(&self) -> Result<()> {
        // A successful PUT is durable in S3.
        Ok(())
    }

    fn atomic_delete_if_older(&self) -> bool {
        false
    }
}
