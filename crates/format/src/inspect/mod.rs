//! Detection, inspection and safety checks of disk image files.
//!
//! This is the security boundary of the service: uploads are hostile. [`inspect`] reads only
//! headers and metadata tables (never guest data), each read bounded, and answers with an
//! [`Inspection`]: the detected format, sizes, features, the parsed header ([`Details`]) and
//! every [`Violation`] found. Nothing may read *through* an image (decode it as a virtual disk)
//! unless [`Inspection::is_safe`] holds.
//!
//! Rules every parser here follows: all integer reads are bounds-checked (see `bytes`), no
//! arithmetic on file values can overflow (checked/saturating), no allocation is proportional to
//! an untrusted number unless that number was first capped (by the file size or a fixed limit),
//! and structural problems become violations rather than errors: the only `Err` is I/O.
//!
//! See `crates/format/INSPECT.md` for the list of checks and what is refused and why.

pub mod bytes;
pub mod iso;
pub mod luks;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
mod violation;
pub mod vmdk;

pub use violation::Violation;

use crate::{DiskFormat, ReadAt, Result};
use serde::Serialize;

/// 1 TiB, the default [`InspectOptions::max_virtual_size`].
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 1 << 40;

/// How much of the file start the sniffers look at.
pub const HEAD_LEN: usize = 64 * 1024;

/// Knobs for [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectOptions {
    /// Largest accepted virtual disk size in bytes (default 1 TiB).
    pub max_virtual_size: u64,
    /// The format the uploader claimed, if any; a different detected format is a violation.
    pub declared_format: Option<DiskFormat>,
    /// Walk allocation tables (qcow2 L1/L2, vmdk grain directory/tables, vhd/vhdx BAT, vdi block
    /// map, qed L1/L2) and check every pointer. Reads are proportional to the metadata size
    /// (bounded by the file size), never to the virtual size. Default `true`.
    pub deep: bool,
    /// For compressed formats in deep mode: the largest accepted ratio of decompressed bytes
    /// (compressed clusters × cluster size) to file size, once over 1 GiB decompressed.
    /// Default 1024 (zlib can not exceed ~1032:1; anything above is a bomb or a shared blob).
    pub max_compression_ratio: u64,
}

impl Default for InspectOptions {
    fn default() -> Self {
        InspectOptions {
            max_virtual_size: DEFAULT_MAX_VIRTUAL_SIZE,
            declared_format: None,
            deep: true,
            max_compression_ratio: 1024,
        }
    }
}

/// The parsed header of the detected format, for readers that go on to decode the image.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Details {
    /// Raw (and anything not recognised).
    #[default]
    Raw,
    /// Partition table seen in a raw image.
    RawPartitioned(raw::PartitionInfo),
    /// qcow2 header with its extensions.
    Qcow2(Box<qcow2::Qcow2Header>),
    /// Legacy qcow v1 header.
    Qcow(qcow2::QcowV1Header),
    /// VHD footer and, for dynamic/differencing disks, the dynamic header.
    Vhd(Box<vhd::VhdInfo>),
    /// VHDX headers, region table and metadata.
    Vhdx(Box<vhdx::VhdxInfo>),
    /// VMDK sparse header(s) and descriptor.
    Vmdk(Box<vmdk::VmdkInfo>),
    /// ISO 9660 primary volume descriptor summary.
    Iso(iso::IsoInfo),
    /// QED header.
    Qed(qed::QedHeader),
    /// VDI header.
    Vdi(Box<vdi::VdiHeader>),
    /// LUKS header summary.
    Luks(luks::LuksHeader),
}

/// The verdict of [`inspect`].
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The detected format (the first of `matched_formats` by priority, or raw).
    pub format: DiskFormat,
    /// Size of the virtual disk (the guest's view) in bytes.
    pub virtual_size: u64,
    /// Size of the image file in bytes.
    pub file_size: u64,
    /// Best estimate of the guest bytes the file holds data for: allocated clusters × cluster
    /// size in deep mode for table-based formats (compressed clusters counted decompressed),
    /// the file size otherwise (shallow mode, raw, fixed).
    pub allocated_size: u64,
    /// Cluster / grain / block size when the format has one.
    pub cluster_size: Option<u64>,
    /// Notable features, e.g. `compressed-clusters`, `zstd`, `extended-l2`, `lazy-refcounts`,
    /// `monolithicSparse`, `gpt`.
    pub features: Vec<String>,
    /// The file is an ISO 9660 / UDF image.
    pub is_iso: bool,
    /// Every format whose signature the content matches (more than one is a violation).
    pub matched_formats: Vec<DiskFormat>,
    /// Failed safety checks; empty means safe.
    pub violations: Vec<Violation>,
    /// The parsed header of `format`.
    pub details: Details,
}

impl Inspection {
    /// No safety check failed.
    pub fn is_safe(&self) -> bool {
        self.violations.is_empty()
    }

    /// Whether a violation with this machine name was found.
    pub fn has_violation(&self, name: &str) -> bool {
        self.violations.iter().any(|v| v.name() == name)
    }

    /// The machine names of all violations, in order found.
    pub fn violation_names(&self) -> Vec<&'static str> {
        self.violations.iter().map(|v| v.name()).collect()
    }

    /// `Ok(())` when safe, else `FormatError::Unsafe` listing every violation.
    pub fn ensure_safe(&self) -> Result<()> {
        if self.is_safe() {
            return Ok(());
        }
        let msg = self
            .violations
            .iter()
            .map(|v| format!("{}: {}", v.name(), v))
            .collect::<Vec<_>>()
            .join("; ");
        Err(crate::FormatError::Unsafe(msg))
    }
}

/// What a format analyser fills in.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub virtual_size: u64,
    pub allocated_size: Option<u64>,
    pub cluster_size: Option<u64>,
    pub features: Vec<String>,
    pub violations: Vec<Violation>,
    pub details: Details,
}

impl Report {
    pub(crate) fn v(&mut self, v: Violation) {
        if !self.violations.contains(&v) {
            self.violations.push(v);
        }
    }
    pub(crate) fn feature(&mut self, f: &str) {
        if !self.features.iter().any(|x| x == f) {
            self.features.push(f.to_string());
        }
    }
    pub(crate) fn invalid(&mut self, format: DiskFormat, reason: impl Into<String>) {
        self.v(Violation::InvalidHeader {
            format,
            reason: reason.into(),
        });
    }
    pub(crate) fn truncated(&mut self, format: DiskFormat, needed: u64, file_size: u64) {
        self.v(Violation::Truncated {
            format,
            needed,
            file_size,
        });
    }
}

/// What an analyser gets to look at.
pub(crate) struct Input<'a> {
    pub src: &'a dyn ReadAt,
    pub file_size: u64,
    /// The first `min(file_size, HEAD_LEN)` bytes.
    pub head: &'a [u8],
    pub opts: &'a InspectOptions,
}

/// Cheap signature sniff of the first bytes of a file (at least 64 KiB for ISO detection).
///
/// Returns the highest-priority match, or `Raw`. Footer-only formats (fixed VHD) can not be seen
/// here; [`inspect`] is authoritative.
pub fn detect(first_bytes: &[u8]) -> DiskFormat {
    head_matches(first_bytes)
        .into_iter()
        .next()
        .unwrap_or(DiskFormat::Raw)
}

/// Formats whose signature appears in the file head, by priority.
fn head_matches(h: &[u8]) -> Vec<DiskFormat> {
    let mut m = Vec::new();
    if h.starts_with(qcow2::MAGIC) {
        if bytes::be32(h, 4) == 1 {
            m.push(DiskFormat::Qcow);
        } else {
            m.push(DiskFormat::Qcow2);
        }
    }
    if h.starts_with(qed::MAGIC) {
        m.push(DiskFormat::Qed);
    }
    if bytes::le32(h, 0x40) == vdi::MAGIC {
        m.push(DiskFormat::Vdi);
    }
    if h.starts_with(vhdx::FILE_SIGNATURE) {
        m.push(DiskFormat::Vhdx);
    }
    if vmdk::probe(h) {
        m.push(DiskFormat::Vmdk);
    }
    if h.starts_with(luks::MAGIC) {
        m.push(DiskFormat::Luks);
    }
    if h.starts_with(vhd::COOKIE) {
        m.push(DiskFormat::Vhd);
    }
    if iso::probe(h) {
        m.push(DiskFormat::Iso);
    }
    m
}

/// Inspects an image file: detects its format, parses its headers and runs every safety check.
///
/// Returns `Err` only when reading the file fails; everything wrong with the content is
/// reported in [`Inspection::violations`].
pub fn inspect(src: &dyn ReadAt, opts: &InspectOptions) -> Result<Inspection> {
    let file_size = src.size()?;
    let (head, got) = bytes::read_padded(src, 0, HEAD_LEN)?;
    let head = &head[..got];

    let mut matched = head_matches(head);
    // Footer-only VHD (fixed disk): "conectix" in the last 512 bytes.
    if file_size >= 512 && !matched.contains(&DiskFormat::Vhd) {
        let (tail, n) = bytes::read_padded(src, file_size - 512, 512)?;
        if n == 512 && tail.starts_with(vhd::COOKIE) {
            matched.push(DiskFormat::Vhd);
        }
    }

    let format = matched.first().copied().unwrap_or(DiskFormat::Raw);
    let input = Input {
        src,
        file_size,
        head,
        opts,
    };
    let mut rep = Report::default();
    match format {
        DiskFormat::Raw => raw::analyze(&input, &mut rep)?,
        DiskFormat::Qcow2 => qcow2::analyze(&input, &mut rep)?,
        DiskFormat::Qcow => qcow2::analyze_v1(&input, &mut rep),
        DiskFormat::Vhd => vhd::analyze(&input, &mut rep)?,
        DiskFormat::Vhdx => vhdx::analyze(&input, &mut rep)?,
        DiskFormat::Vmdk => vmdk::analyze(&input, &mut rep)?,
        DiskFormat::Iso => iso::analyze(&input, &mut rep),
        DiskFormat::Qed => qed::analyze(&input, &mut rep)?,
        DiskFormat::Vdi => vdi::analyze(&input, &mut rep)?,
        DiskFormat::Luks => luks::analyze(&input, &mut rep),
    }

    // Format confusion: a partition table (MBR/GPT) inside a header that owns offset 0.
    let mut confusion: Vec<String> = matched.iter().map(|f| f.to_string()).collect();
    let fixed_vhd = format == DiskFormat::Vhd && !head.starts_with(vhd::COOKIE);
    let header_at_zero = !matches!(format, DiskFormat::Raw | DiskFormat::Iso) && !fixed_vhd;
    if header_at_zero {
        if let Some(pt) = raw::partition_table(head) {
            confusion.push(pt.to_string());
        }
    }
    if confusion.len() > 1 {
        rep.violations
            .insert(0, Violation::MultipleFormats { formats: confusion });
    }
    if format == DiskFormat::Raw {
        if let Some(name) = raw::foreign_signature(src, head, file_size)? {
            rep.v(Violation::ForeignFormat {
                name: name.to_string(),
            });
        }
    }

    if let Some(declared) = opts.declared_format {
        let compatible =
            declared == format || (declared == DiskFormat::Raw && format == DiskFormat::Iso);
        if !compatible {
            rep.v(Violation::DeclaredFormatMismatch {
                declared,
                detected: format,
            });
        }
    }

    if rep.virtual_size == 0 {
        // Only meaningful when the header could be read: otherwise the size is just unknown.
        if rep.violations.is_empty() {
            rep.v(Violation::VirtualSizeZero);
        }
    } else if rep.virtual_size > opts.max_virtual_size {
        rep.v(Violation::VirtualSizeTooLarge {
            size: rep.virtual_size,
            max: opts.max_virtual_size,
        });
    }

    Ok(Inspection {
        format,
        virtual_size: rep.virtual_size,
        file_size,
        allocated_size: rep.allocated_size.unwrap_or(file_size),
        cluster_size: rep.cluster_size,
        features: rep.features,
        is_iso: format == DiskFormat::Iso,
        matched_formats: matched,
        violations: rep.violations,
        details: rep.details,
    })
}

/// Walks a table of fixed-size entries stored at `offset` in the file, calling `f(index,
/// entry_bytes)` for each of `count` entries, reading at most 1 MiB at a time.
pub(crate) fn for_each_entry(
    src: &dyn ReadAt,
    offset: u64,
    count: u64,
    entry_size: usize,
    mut f: impl FnMut(u64, &[u8]) -> bool,
) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let per_chunk = CHUNK / entry_size as u64;
    let mut idx = 0u64;
    while idx < count {
        let n = (count - idx).min(per_chunk);
        let off = offset.saturating_add(idx * entry_size as u64);
        let (buf, _) = bytes::read_padded(src, off, (n as usize) * entry_size)?;
        for (i, e) in buf.chunks_exact(entry_size).enumerate() {
            if !f(idx + i as u64, e) {
                return Ok(());
            }
        }
        idx += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
