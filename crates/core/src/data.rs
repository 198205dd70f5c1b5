//! The core's one door to image bytes: staging files, inspection, ingest into the chunk store,
//! and readers over stored manifests. Everything here is blocking; callers run it on the
//! blocking pool.

use crate::config::ServiceConfig;
use crate::error::{CoreError, Result};
use openims_format::inspect::{inspect, InspectOptions};
use openims_format::{DiskFormat, ReadAt};
use openims_store::{LocalBackend, ManifestId, Store, StoreConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a client declared an upload to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclaredFormat {
    /// Raw bytes (`raw`, and the kernel/ramdisk formats `ami`, `aki`, `ari`).
    Raw,
    /// A structured format that must be detected as such.
    Format(DiskFormat),
}

impl DeclaredFormat {
    /// Maps a Glance `disk_format`; refuses formats that cannot be read.
    pub fn from_disk_format(f: &str) -> Result<DeclaredFormat> {
        Ok(match f {
            "raw" | "ami" | "aki" | "ari" => DeclaredFormat::Raw,
            "qcow2" => DeclaredFormat::Format(DiskFormat::Qcow2),
            "vhd" => DeclaredFormat::Format(DiskFormat::Vhd),
            "vhdx" => DeclaredFormat::Format(DiskFormat::Vhdx),
            "vmdk" => DeclaredFormat::Format(DiskFormat::Vmdk),
            "vdi" => DeclaredFormat::Format(DiskFormat::Vdi),
            "iso" => DeclaredFormat::Format(DiskFormat::Iso),
            "zvhd" | "zvhd2" => {
                return Err(CoreError::InvalidImageFile(format!(
                    "disk_format {f} has no public specification, so its data cannot be read or verified; \
                     upload the image as raw, qcow2, vhd, vhdx or vmdk"
                )))
            }
            other => {
                return Err(CoreError::InvalidImageFile(format!(
                    "image data in disk_format {other} cannot be read; upload it as raw, qcow2, vhd, vhdx or vmdk"
                )))
            }
        })
    }
}

/// What storing a file produced.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub disk_manifest: String,
    pub file_manifest: Option<String>,
    pub virtual_size: u64,
    pub format: DiskFormat,
}

/// Inspects `file` (safety verdict first: nothing reads through a file that fails it), checks
/// the detected format against `declared` (when given) and the virtual size against
/// `max_virtual`, and opens it as a virtual disk. Returns the disk and the detected format
/// (an ISO is opened as raw bytes). Used by Glance uploads and bucket imports alike.
pub fn open_checked(
    file: Arc<dyn ReadAt>,
    declared: Option<DeclaredFormat>,
    max_virtual: u64,
) -> Result<(Box<dyn openims_format::VirtualDisk>, DiskFormat)> {
    let opts = InspectOptions {
        max_virtual_size: max_virtual,
        declared_format: None,
        deep: true,
        ..InspectOptions::default()
    };
    let report = inspect(file.as_ref(), &opts)?;
    let detected = report.format;
    if let Some(declared) = declared {
        let matches = match declared {
            // An ISO is a raw byte image of a CD; declared raw it is read as raw.
            DeclaredFormat::Raw => matches!(detected, DiskFormat::Raw | DiskFormat::Iso),
            DeclaredFormat::Format(DiskFormat::Iso) => detected == DiskFormat::Iso,
            DeclaredFormat::Format(f) => f == detected,
        };
        if !matches {
            let declared_name = match declared {
                DeclaredFormat::Raw => "raw".to_string(),
                DeclaredFormat::Format(f) => f.to_string(),
            };
            return Err(CoreError::FormatMismatch {
                declared: declared_name,
                detected: detected.to_string(),
            });
        }
    }
    if !report.is_safe() {
        let reasons: Vec<String> = report
            .violations
            .iter()
            .map(|v| format!("{}: {v}", v.name()))
            .collect();
        return Err(CoreError::UnsafeImage(reasons.join("; ")));
    }
    let read_as = if detected == DiskFormat::Iso {
        DiskFormat::Raw
    } else {
        detected
    };
    let disk = openims_format::read::open(file, read_as)?;
    let virtual_size = disk.virtual_size();
    if virtual_size > max_virtual {
        return Err(CoreError::UnsafeImage(format!(
            "virtual size {virtual_size} exceeds the maximum of {max_virtual} bytes"
        )));
    }
    Ok((disk, detected))
}

/// Staging area and chunk store.
#[derive(Clone)]
pub struct DataPlane {
    pub store: Arc<Store>,
    staging: PathBuf,
}

fn parse_manifest(s: &str) -> Result<ManifestId> {
    s.parse::<ManifestId>()
        .map_err(|_| CoreError::Internal(format!("bad manifest id {s}")))
}

impl DataPlane {
    pub fn open(config: &ServiceConfig) -> Result<DataPlane> {
        let staging = config.staging_dir();
        std::fs::create_dir_all(&staging)?;
        let backend: Arc<dyn openims_store::Backend> = match config.store_url.as_deref() {
            None | Some("") => Arc::new(LocalBackend::open(config.store_dir())?),
            Some(url) if url.starts_with("s3://") => {
                let b = openims_store::S3Backend::open_url(url)?;
                tracing::info!(store = %b.url(), "object store: S3");
                Arc::new(b)
            }
            Some(url) => {
                let path = url.strip_prefix("file://").unwrap_or(url);
                Arc::new(LocalBackend::open(path)?)
            }
        };
        let store = Store::open_shared(
            backend,
            StoreConfig {
                max_virtual_size: config.max_virtual_size,
                ..StoreConfig::default()
            },
        )?;
        Ok(DataPlane {
            store: Arc::new(store),
            staging,
        })
    }

    pub fn staging_path(&self, name: &str) -> PathBuf {
        self.staging.join(name)
    }

    /// Removes leftovers of uploads a crash interrupted.
    pub fn clear_staging(&self) -> Result<()> {
        for e in std::fs::read_dir(&self.staging)? {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }

    /// Inspects a staged file and, if it is safe and what was declared, stores it.
    pub fn ingest_file(
        &self,
        path: &Path,
        declared: DeclaredFormat,
        max_virtual: u64,
    ) -> Result<Ingested> {
        let file: Arc<dyn ReadAt> = Arc::new(std::fs::File::open(path)?);
        let (mut disk, detected) = open_checked(file.clone(), Some(declared), max_virtual)?;
        let read_as = if detected == DiskFormat::Iso {
            DiskFormat::Raw
        } else {
            detected
        };
        let virtual_size = disk.virtual_size();
        let disk_report = self.store.ingest(disk.as_mut(), &mut |_| {})?;
        let file_manifest = if read_as == DiskFormat::Raw {
            None
        } else {
            let mut raw = openims_format::read::open(file, DiskFormat::Raw)?;
            Some(
                self.store
                    .ingest(raw.as_mut(), &mut |_| {})?
                    .manifest_id
                    .to_string(),
            )
        };
        Ok(Ingested {
            disk_manifest: disk_report.manifest_id.to_string(),
            file_manifest,
            virtual_size,
            format: detected,
        })
    }

    /// Deletes stored data no live manifest references and older than `grace`.
    pub fn gc(
        &self,
        live: &[String],
        grace: std::time::Duration,
    ) -> Result<openims_store::GcReport> {
        let ids = live
            .iter()
            .map(|m| parse_manifest(m))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.store.gc(&ids, grace)?)
    }

    /// Verifies every live manifest and every chunk it references (reads and hashes them).
    pub fn fsck(&self, live: &[String]) -> Result<openims_store::FsckReport> {
        let ids = live
            .iter()
            .map(|m| parse_manifest(m))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.store.fsck(&ids)?)
    }

    /// Length of the data a manifest describes.
    pub fn manifest_len(&self, manifest: &str) -> Result<u64> {
        Ok(self
            .store
            .manifest(&parse_manifest(manifest)?)?
            .virtual_size())
    }

    /// A reader of `[offset, offset+len)` of a plaintext manifest's data.
    pub fn reader(
        &self,
        manifest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send>> {
        self.reader_with(manifest, None, offset, len)
    }

    /// A reader of `[offset, offset+len)` of a manifest's data, with the data key of its
    /// chunks when it is encrypted.
    pub fn reader_with(
        &self,
        manifest: &str,
        dek: Option<openims_store::Dek>,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn std::io::Read + Send>> {
        let disk = self.store.open_disk_with(&parse_manifest(manifest)?, dek)?;
        Ok(Box::new(RangeReader {
            disk,
            pos: offset,
            end: offset + len,
        }))
    }
}

struct RangeReader<D> {
    disk: D,
    pos: u64,
    end: u64,
}

impl<D: openims_format::VirtualDisk> std::io::Read for RangeReader<D> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.end - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.disk
            .read_at(self.pos, &mut buf[..n])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}
