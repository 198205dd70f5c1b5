//! QED (QEMU Enhanced Disk) header and checks. Little-endian.

use super::bytes::{div_ceil, fits, le32, le64, read_padded};
use super::{for_each_entry, Details, Input, Report, Violation};
use crate::DiskFormat;
use serde::Serialize;

/// `QED\0`.
pub const MAGIC: &[u8] = b"QED\0";
/// Feature: has a backing file.
pub const F_BACKING_FILE: u64 = 1;
/// Feature: needs a consistency check (not closed cleanly).
pub const F_NEED_CHECK: u64 = 2;
/// Feature: backing file format is raw, no probing.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 4;
/// Known feature bits.
pub const F_KNOWN: u64 = 7;

/// The QED header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QedHeader {
    /// Cluster size in bytes (power of two, 4 KiB..=64 MiB).
    pub cluster_size: u32,
    /// L1/L2 table size in clusters (power of two, 1..=16).
    pub table_size: u32,
    /// Header size in clusters.
    pub header_size: u32,
    /// Feature bits.
    pub features: u64,
    /// Compatible feature bits.
    pub compat_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// Virtual size in bytes.
    pub image_size: u64,
    /// Backing file name offset.
    pub backing_filename_offset: u32,
    /// Backing file name size.
    pub backing_filename_size: u32,
}

impl QedHeader {
    /// Parses the header (magic not checked).
    pub fn parse(b: &[u8]) -> QedHeader {
        QedHeader {
            cluster_size: le32(b, 4),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_table_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_filename_offset: le32(b, 56),
            backing_filename_size: le32(b, 60),
        }
    }
    /// Bytes of one L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * u64::from(self.cluster_size)
    }
}

pub(crate) fn analyze(inp: &Input, rep: &mut Report) -> std::io::Result<()> {
    let fs = inp.file_size;
    let h = QedHeader::parse(inp.head);
    rep.virtual_size = h.image_size;
    if inp.head.len() < 64 {
        rep.truncated(DiskFormat::Qed, 64, fs);
    }
    if h.features & F_BACKING_FILE != 0
        || h.backing_filename_offset != 0
        || h.backing_filename_size != 0
    {
        rep.v(Violation::QedBackingFile);
    }
    if h.features & !F_KNOWN != 0 {
        rep.v(Violation::QedUnknownFeatures {
            bits: h.features & !F_KNOWN,
        });
    }
    if h.features & F_NEED_CHECK != 0 {
        rep.feature("need-check");
    }
    let cs = u64::from(h.cluster_size);
    let geometry_ok = h.cluster_size.is_power_of_two()
        && ((4 << 10)..=(64 << 20)).contains(&cs)
        && h.table_size.is_power_of_two()
        && (1..=16).contains(&h.table_size)
        && h.header_size >= 1
        && u64::from(h.header_size) * cs <= (64 << 20);
    if !geometry_ok {
        rep.v(Violation::QedBadGeometry {
            reason: format!(
                "cluster size {}, table size {}, header size {}",
                h.cluster_size, h.table_size, h.header_size
            ),
        });
        rep.details = Details::Qed(h);
        return Ok(());
    }
    rep.cluster_size = Some(cs);
    let tb = h.table_bytes();
    let entries = tb / 8;
    let max_size = entries.saturating_mul(entries).saturating_mul(cs);
    if h.image_size > max_size || !h.image_size.is_multiple_of(512) {
        rep.v(Violation::QedBadGeometry {
            reason: format!("image size {} not representable", h.image_size),
        });
    }
    if !h.l1_table_offset.is_multiple_of(cs)
        || h.l1_table_offset == 0
        || !fits(h.l1_table_offset, tb, fs)
    {
        rep.v(Violation::QedTableOutOfBounds {
            what: "L1 table",
            offset: h.l1_table_offset,
        });
        rep.details = Details::Qed(h);
        return Ok(());
    }
    if inp.opts.deep && h.image_size <= inp.opts.max_virtual_size && h.image_size <= max_size {
        let per_l1 = entries * cs;
        let n = div_ceil(h.image_size, per_l1).min(entries);
        let mut l2s = Vec::new();
        let mut bad = None;
        for_each_entry(inp.src, h.l1_table_offset, n, 8, |_, e| {
            let off = le64(e, 0);
            if off == 0 {
                return true;
            }
            if !off.is_multiple_of(cs) || !fits(off, tb, fs) {
                bad = Some(Violation::QedTableOutOfBounds {
                    what: "L2 table",
                    offset: off,
                });
                return false;
            }
            l2s.push(off);
            true
        })?;
        let mut sorted = l2s.clone();
        sorted.sort_unstable();
        if bad.is_none() {
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                bad = Some(Violation::QedTableOutOfBounds {
                    what: "shared L2 table",
                    offset: w[0],
                });
            }
        }
        let mut allocated = 0u64;
        if bad.is_none() {
            'outer: for off in l2s {
                let (t, _) = read_padded(inp.src, off, tb as usize)?;
                for e in t.chunks_exact(8) {
                    let c = le64(e, 0);
                    if c <= 1 {
                        continue;
                    }
                    if !c.is_multiple_of(cs)
                        || !fits(c, cs, fs.saturating_add(cs - 1) / cs * cs)
                        || c >= fs
                    {
                        bad = Some(Violation::QedTableOutOfBounds {
                            what: "data cluster",
                            offset: c,
                        });
                        break 'outer;
                    }
                    allocated += cs;
                }
            }
        }
        match bad {
            Some(v) => rep.v(v),
            None => rep.allocated_size = Some(allocated),
        }
    }
    rep.details = Details::Qed(h);
    Ok(())
}
