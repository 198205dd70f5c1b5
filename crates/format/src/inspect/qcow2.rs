//! qcow2 (versions 2 and 3) and legacy qcow (version 1) headers and checks.
//!
//! Layout reference: qemu `docs/interop/qcow2.txt`. All fields are big-endian.

use super::bytes::{be32, be64, fits, printable, read_padded, round_up, slice};
use super::{for_each_entry, Details, Input, Report, Violation};
use crate::DiskFormat;
use serde::Serialize;

/// `QFI\xfb`, shared by qcow v1 and qcow2.
pub const MAGIC: &[u8] = b"QFI\xfb";

/// Incompatible feature bit 0: the image was not closed cleanly (refcounts may be stale).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: qemu found corruption.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: L2 entries are 128-bit with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible bits this crate knows.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: persistent bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is raw (guest-visible layout).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// qemu's limit on the L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// L1/L2 entry: offset bits 9..=55.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry: standard cluster offset bits 9..=55.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry flag: compressed cluster.
pub const L2E_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (standard cluster): reads as zeros.
pub const L2E_ZERO: u64 = 1;

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (NUL-trimmed, up to 46 bytes, non-printables replaced).
    pub name: String,
}

/// The persistent bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory in the file.
    pub directory_offset: u64,
}

/// A parsed qcow2 header (v2 fields, v3 fields defaulted for v2) with its extensions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES (legacy), 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Refcount table size in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// v3: incompatible feature bits (see `INCOMPAT_*`).
    pub incompatible_features: u64,
    /// v3: compatible feature bits.
    pub compatible_features: u64,
    /// v3: autoclear feature bits.
    pub autoclear_features: u64,
    /// v3: log2 of the refcount width in bits (v2: 4).
    pub refcount_order: u32,
    /// Header length in bytes (v2: 72).
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// Backing file name, when the offset/size point inside the header cluster.
    pub backing_file: Option<String>,
    /// Backing file format (extension 0xe2792aca).
    pub backing_format: Option<String>,
    /// External data file name (extension 0x44415441).
    pub external_data_file: Option<String>,
    /// Feature name table (extension 0x6803f857), capped at 256 entries.
    pub feature_names: Vec<FeatureName>,
    /// Persistent bitmaps extension.
    pub bitmaps: Option<BitmapsExtension>,
    /// Full disk encryption header (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    /// Types of unknown extensions (ignored by qemu), capped at 64.
    pub unknown_extensions: Vec<u32>,
}

impl Qcow2Header {
    /// Cluster size in bytes (0 when `cluster_bits` is out of 9..=21).
    pub fn cluster_size(&self) -> u64 {
        if (9..=21).contains(&self.cluster_bits) {
            1 << self.cluster_bits
        } else {
            0
        }
    }
    /// L2 entries are 16 bytes (extended L2, subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    /// Size of one L2 entry in bytes.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Number of entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// Guest bytes covered by one L1 entry.
    pub fn bytes_per_l1_entry(&self) -> u64 {
        self.l2_entries().saturating_mul(self.cluster_size())
    }
    /// L1 entries needed to cover `size`.
    pub fn l1_entries_needed(&self) -> u64 {
        super::bytes::div_ceil(self.size, self.bytes_per_l1_entry())
    }
    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0 || self.external_data_file.is_some()
    }
    /// Whether the image names a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.backing_file_offset != 0 || self.backing_file_size != 0
    }
    /// Bit shift of the compressed-cluster size field in an L2 entry.
    pub fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits.saturating_sub(8)).min(62)
    }
    /// Decodes a compressed L2 entry into (file offset, bytes to read from it).
    pub fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let shift = self.csize_shift();
        let offset = entry & ((1u64 << shift) - 1);
        let mask = (1u64 << self.cluster_bits.saturating_sub(8).min(62)) - 1;
        let sectors = ((entry >> shift) & mask) + 1;
        (offset, (sectors * 512).saturating_sub(offset & 511))
    }

    /// Parses the fixed header fields from the first bytes of the file (at least 72; 104+ for
    /// v3). Extensions are parsed separately by [`Qcow2Header::parse_extensions`].
    pub fn parse_fixed(b: &[u8]) -> Qcow2Header {
        let version = be32(b, 4);
        let mut h = Qcow2Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            refcount_order: 4,
            header_length: 72,
            ..Default::default()
        };
        if version >= 3 {
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length > 104 {
                h.compression_type = b.get(104).copied().unwrap_or(0);
            }
        }
        h
    }

    /// Parses the header extensions and backing file name out of the header cluster `b`.
    /// Returns the problems found (each becomes a `qcow2.bad_header_extension`).
    pub fn parse_extensions(&mut self, b: &[u8]) -> Vec<String> {
        let mut problems = Vec::new();
        let limit = b.len();
        if self.backing_file_offset != 0 {
            let off = self.backing_file_offset as usize;
            let len = self.backing_file_size as usize;
            if self.backing_file_offset < limit as u64 && len <= 1023 && off + len <= limit {
                self.backing_file = Some(printable(slice(b, off, len), 1023));
            }
        }
        let mut off = if self.version >= 3 {
            self.header_length as usize
        } else {
            72
        };
        let mut count = 0;
        loop {
            if off.checked_add(8).is_none_or(|e| e > limit) {
                // qemu requires the end-of-extensions marker when there is room for it.
                if off < limit {
                    problems.push(format!(
                        "extension header at {off} runs past the header cluster"
                    ));
                }
                break;
            }
            let ty = be32(b, off);
            let len = be32(b, off + 4) as usize;
            if ty == 0 {
                break;
            }
            count += 1;
            if count > 4096 {
                problems.push("too many header extensions".into());
                break;
            }
            let data_off = off + 8;
            if data_off.checked_add(len).is_none_or(|e| e > limit) {
                problems.push(format!(
                    "extension {ty:#x} of {len} bytes runs past the header cluster"
                ));
                break;
            }
            let data = slice(b, data_off, len);
            match ty {
                EXT_BACKING_FORMAT => self.backing_format = Some(printable(data, 1023)),
                EXT_DATA_FILE => self.external_data_file = Some(printable(data, 1023)),
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48).take(256) {
                        let name = &e[2..];
                        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: printable(&name[..end], 46),
                        });
                    }
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        problems.push("bitmaps extension too short".into());
                    } else {
                        self.bitmaps = Some(BitmapsExtension {
                            nb_bitmaps: be32(data, 0),
                            directory_size: be64(data, 8),
                            directory_offset: be64(data, 16),
                        });
                    }
                }
                EXT_CRYPTO => {
                    if len < 16 {
                        problems.push("crypto extension too short".into());
                    } else {
                        self.crypto_header = Some((be64(data, 0), be64(data, 8)));
                    }
                }
                other => {
                    if self.unknown_extensions.len() < 64 {
                        self.unknown_extensions.push(other);
                    }
                }
            }
            off = data_off + round_up(len as u64, 8) as usize;
        }
        problems
    }
}

pub(crate) fn analyze(inp: &Input, rep: &mut Report) -> std::io::Result<()> {
    let f = DiskFormat::Qcow2;
    let mut h = Qcow2Header::parse_fixed(inp.head);
    rep.virtual_size = h.size;
    if inp.head.len() < 72 || (h.version >= 3 && inp.head.len() < 104) {
        rep.truncated(f, if h.version >= 3 { 104 } else { 72 }, inp.file_size);
        rep.details = Details::Qcow2(Box::new(h));
        return Ok(());
    }
    if h.version != 2 && h.version != 3 {
        rep.v(Violation::Qcow2UnsupportedVersion { version: h.version });
        rep.details = Details::Qcow2(Box::new(h));
        return Ok(());
    }
    rep.feature(if h.version == 2 {
        "compat=0.10"
    } else {
        "compat=1.1"
    });
    if !(9..=21).contains(&h.cluster_bits) {
        rep.v(Violation::Qcow2BadClusterBits {
            bits: h.cluster_bits,
        });
        rep.details = Details::Qcow2(Box::new(h));
        return Ok(());
    }
    let cs = h.cluster_size();
    rep.cluster_size = Some(cs);
    if h.version == 3
        && (h.header_length < 104
            || !h.header_length.is_multiple_of(8)
            || u64::from(h.header_length) > cs)
    {
        rep.v(Violation::Qcow2BadHeaderLength {
            length: h.header_length,
        });
        rep.details = Details::Qcow2(Box::new(h));
        return Ok(());
    }
    // The header cluster holds the extensions and the backing file name.
    let hc_len = cs.min(inp.file_size) as usize;
    let hc_owned;
    let hc: &[u8] = if hc_len <= inp.head.len() {
        &inp.head[..hc_len]
    } else {
        hc_owned = read_padded(inp.src, 0, hc_len)?.0;
        &hc_owned
    };
    for p in h.parse_extensions(hc) {
        rep.v(Violation::Qcow2BadHeaderExtension { reason: p });
    }

    // Features.
    let incompat = h.incompatible_features;
    if incompat & INCOMPAT_DIRTY != 0 {
        rep.feature("dirty");
    }
    if h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0 {
        rep.feature("lazy-refcounts");
    }
    if h.extended_l2() {
        rep.feature("extended-l2");
        if h.cluster_bits < 14 {
            rep.invalid(f, "extended L2 entries need clusters of at least 16 KiB");
        }
    }
    if h.bitmaps.is_some() || h.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
        rep.feature("bitmaps");
    }
    match h.compression_type {
        0 => {
            if incompat & INCOMPAT_COMPRESSION != 0 {
                rep.invalid(f, "compression-type feature bit set with zlib compression");
            }
        }
        1 => {
            rep.feature("zstd");
            if incompat & INCOMPAT_COMPRESSION == 0 {
                rep.invalid(
                    f,
                    "zstd compression without the compression-type feature bit",
                );
            }
        }
        t => rep.v(Violation::Qcow2UnknownCompressionType { ctype: t }),
    }

    // Safety checks on the header.
    if h.has_backing_file() {
        rep.v(Violation::Qcow2BackingFile {
            name: h.backing_file.clone(),
        });
    }
    if h.has_data_file() || h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
        rep.v(Violation::Qcow2DataFile {
            name: h.external_data_file.clone(),
        });
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        rep.v(Violation::Qcow2UnknownIncompatibleFeatures {
            bits: incompat & !INCOMPAT_KNOWN,
        });
    }
    if incompat & INCOMPAT_CORRUPT != 0 {
        rep.v(Violation::Qcow2Corrupt);
    }
    if h.crypt_method != 0 || h.crypto_header.is_some() {
        rep.v(Violation::Qcow2Encrypted {
            method: h.crypt_method,
        });
    }
    if h.refcount_order > 6 {
        rep.invalid(f, format!("refcount_order {} over 6", h.refcount_order));
    }
    if h.nb_snapshots != 0 {
        rep.v(Violation::Qcow2Snapshots {
            count: h.nb_snapshots,
        });
    }

    // Tables.
    let fs = inp.file_size;
    let table = |rep: &mut Report, name: &'static str, off: u64, len: u64, max: u64| -> bool {
        let entries = len / 8;
        if len > max {
            rep.v(Violation::Qcow2TableTooLarge {
                table: name,
                entries,
            });
            return false;
        }
        if !off.is_multiple_of(cs) {
            rep.v(Violation::Qcow2TableUnaligned {
                table: name,
                offset: off,
            });
            return false;
        }
        if off == 0 || !fits(off, len, fs) {
            rep.v(Violation::Qcow2TableOutOfBounds {
                table: name,
                offset: off,
                len,
            });
            return false;
        }
        true
    };
    let l1_bytes = u64::from(h.l1_size) * 8;
    let needed = h.l1_entries_needed();
    let mut l1_ok = true;
    if u64::from(h.l1_size) < needed {
        rep.v(Violation::Qcow2L1TooSmall {
            l1_size: u64::from(h.l1_size),
            needed,
        });
        l1_ok = false;
    }
    if h.l1_size > 0 {
        l1_ok &= table(rep, "l1", h.l1_table_offset, l1_bytes, MAX_L1_BYTES);
    }
    let rt_bytes = u64::from(h.refcount_table_clusters).saturating_mul(cs);
    if h.refcount_table_clusters == 0 {
        rep.v(Violation::Qcow2TableOutOfBounds {
            table: "refcount",
            offset: h.refcount_table_offset,
            len: 0,
        });
    } else {
        table(
            rep,
            "refcount",
            h.refcount_table_offset,
            rt_bytes,
            MAX_REFTABLE_BYTES,
        );
    }
    if h.nb_snapshots != 0 {
        // Each snapshot entry is at least 40 bytes; qemu caps the count at 65536.
        let min_len = u64::from(h.nb_snapshots).saturating_mul(40);
        table(rep, "snapshot", h.snapshots_offset, min_len, 65536 * 1024);
    }
    if let Some(b) = h.bitmaps {
        table(
            rep,
            "bitmap directory",
            b.directory_offset,
            b.directory_size,
            64 << 20,
        );
    }
    if let Some((off, len)) = h.crypto_header {
        if !fits(off, len, fs) {
            rep.v(Violation::Qcow2TableOutOfBounds {
                table: "encryption header",
                offset: off,
                len,
            });
        }
    }

    if inp.opts.deep && l1_ok && h.size > 0 && h.size <= inp.opts.max_virtual_size {
        deep_walk(inp, &h, rep)?;
    }
    rep.details = Details::Qcow2(Box::new(h));
    Ok(())
}

/// Walks L1 and every L2 table, checking each pointer against the file.
fn deep_walk(inp: &Input, h: &Qcow2Header, rep: &mut Report) -> std::io::Result<()> {
    let fs = inp.file_size;
    let cs = h.cluster_size();
    let n = u64::from(h.l1_size).min(h.l1_entries_needed());
    let mut l2_tables: Vec<(u64, u64)> = Vec::new(); // (l1 index, l2 offset)
    let mut bad = None;
    for_each_entry(inp.src, h.l1_table_offset, n, 8, |i, e| {
        let entry = be64(e, 0);
        let off = entry & L1E_OFFSET_MASK;
        if off == 0 {
            return true;
        }
        if !off.is_multiple_of(cs) || !fits(off, cs, fs) {
            bad = Some(Violation::Qcow2L1EntryOutOfBounds { index: i, entry });
            return false;
        }
        l2_tables.push((i, off));
        true
    })?;
    if let Some(v) = bad {
        rep.v(v);
        return Ok(());
    }
    let mut offs: Vec<u64> = l2_tables.iter().map(|&(_, o)| o).collect();
    offs.sort_unstable();
    if let Some(w) = offs.windows(2).find(|w| w[0] == w[1]) {
        rep.v(Violation::Qcow2L2TableShared { offset: w[0] });
        return Ok(());
    }
    drop(offs);

    let per_l1 = h.bytes_per_l1_entry();
    let esz = h.l2_entry_size() as usize;
    let data_file = h.has_data_file();
    let (mut data_clusters, mut compressed) = (0u64, 0u64);
    let slack_end = round_up(fs, 512);
    for (l1i, l2off) in l2_tables {
        let (tbl, _) = read_padded(inp.src, l2off, cs as usize)?;
        for (j, e) in tbl.chunks_exact(esz).enumerate() {
            let guest = l1i * per_l1 + j as u64 * cs;
            if guest >= h.size {
                break;
            }
            let entry = be64(e, 0);
            if entry & L2E_COMPRESSED != 0 {
                if h.extended_l2() && be64(e, 8) != 0 {
                    bad = Some(Violation::Qcow2L2EntryOutOfBounds {
                        guest_offset: guest,
                        entry,
                    });
                    break;
                }
                let (coff, clen) = h.compressed_extent(entry);
                if coff == 0 || coff >= fs || coff.saturating_add(clen) > slack_end {
                    bad = Some(Violation::Qcow2CompressedClusterOutOfBounds {
                        guest_offset: guest,
                    });
                    break;
                }
                compressed += 1;
                continue;
            }
            let off = entry & L2E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) || (!data_file && !fits(off, cs, fs)) {
                bad = Some(Violation::Qcow2L2EntryOutOfBounds {
                    guest_offset: guest,
                    entry,
                });
                break;
            }
            if h.extended_l2() || entry & L2E_ZERO == 0 {
                data_clusters += 1;
            }
        }
        if bad.is_some() {
            break;
        }
    }
    if let Some(v) = bad {
        rep.v(v);
        return Ok(());
    }
    if compressed > 0 {
        rep.feature("compressed-clusters");
        let expanded = compressed.saturating_mul(cs);
        let ratio = inp.opts.max_compression_ratio;
        if expanded > (1 << 30) && expanded / fs.max(1) > ratio {
            rep.v(Violation::Qcow2CompressionBomb {
                expanded,
                file_size: fs,
                max_ratio: ratio,
            });
        }
    }
    rep.allocated_size = Some(data_clusters.saturating_add(compressed).saturating_mul(cs));
    Ok(())
}

/// A legacy qcow (version 1) header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QcowV1Header {
    /// Always 1.
    pub version: u32,
    /// Offset of the backing file name (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u8,
    /// log2 of the L2 table entry count.
    pub l2_bits: u8,
    /// 0 none, 1 AES.
    pub crypt_method: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
}

pub(crate) fn analyze_v1(inp: &Input, rep: &mut Report) {
    let b = inp.head;
    let h = QcowV1Header {
        version: be32(b, 4),
        backing_file_offset: be64(b, 8),
        backing_file_size: be32(b, 16),
        size: be64(b, 24),
        cluster_bits: b.get(32).copied().unwrap_or(0),
        l2_bits: b.get(33).copied().unwrap_or(0),
        crypt_method: be32(b, 36),
        l1_table_offset: be64(b, 40),
    };
    if b.len() < 48 {
        rep.truncated(DiskFormat::Qcow, 48, inp.file_size);
    }
    rep.virtual_size = h.size;
    if (9..=16).contains(&h.cluster_bits) {
        rep.cluster_size = Some(1 << h.cluster_bits);
    }
    rep.v(Violation::QcowLegacy);
    if h.backing_file_offset != 0 {
        rep.v(Violation::Qcow2BackingFile { name: None });
    }
    rep.details = Details::Qcow(h);
}
