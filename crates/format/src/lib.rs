//! # openims-format
//!
//! Everything that touches the bytes of a disk image file, and nothing else.
//!
//! This crate owns:
//! - **detection and inspection** of image files from their first bytes (`inspect`), with
//!   **safety checks** that reject hostile files (backing files, external data files, foreign
//!   VMDK extents, format confusion, size lies, table pointers outside the file, bombs) before
//!   anything reads through them;
//! - **streaming readers** that present an image file as its virtual disk (`read`: raw, qcow2,
//!   VHD, VHDX, VMDK sparse/streamOptimized, VDI; bounded memory, extents from metadata);
//! - **streaming writers** that turn a virtual disk into an image file written sequentially
//!   (`write`: raw, raw + allocation bitmap, qcow2, VHD, VMDK streamOptimized; parallel
//!   compression), so output can go straight into a multipart upload;
//! - sinks for local files and memory (`sink`) and a file-to-file `convert`.
//!
//! It must not: do network or database I/O, know about tenants, images or chunks, spawn async
//! tasks, or trust any number read from a file without checking it against the file size and the
//! configured limits. All input is treated as hostile.
//!
//! Data flows: `ReadAt` (the file) -> `inspect::inspect` (verdict) -> `read::open` (a
//! `VirtualDisk`) -> `write::write_image` (to a `ImageSink`).

pub mod convert;
pub mod error;
pub mod inspect;
pub mod io;
pub mod read;
pub mod sink;
pub mod write;

pub use error::{FormatError, Result};
pub use io::{ImageSink, ReadAt, VirtualDisk};
pub use sink::{FileSink, MemSink};
pub use write::{write_image, OutputFormat, WriteOptions, WriteReport};

use serde::{Deserialize, Serialize};

/// Disk image formats this crate knows about (detected; not all are readable or writable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    /// Legacy qcow version 1: detected and refused.
    Qcow,
    Vhd,
    Vhdx,
    Vmdk,
    Iso,
    Qed,
    Vdi,
    /// LUKS-encrypted container: detected and refused.
    Luks,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Qcow => "qcow",
            DiskFormat::Vhd => "vhd",
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Iso => "iso",
            DiskFormat::Qed => "qed",
            DiskFormat::Vdi => "vdi",
            DiskFormat::Luks => "luks",
        }
    }

    pub fn parse(s: &str) -> Option<DiskFormat> {
        Some(match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => DiskFormat::Raw,
            "qcow2" => DiskFormat::Qcow2,
            "qcow" => DiskFormat::Qcow,
            "vhd" | "vpc" => DiskFormat::Vhd,
            "vhdx" => DiskFormat::Vhdx,
            "vmdk" => DiskFormat::Vmdk,
            "iso" => DiskFormat::Iso,
            "qed" => DiskFormat::Qed,
            "vdi" => DiskFormat::Vdi,
            "luks" => DiskFormat::Luks,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
