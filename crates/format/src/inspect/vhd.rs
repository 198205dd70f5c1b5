//! VHD (Virtual PC / "vpc") footer, dynamic header and checks. All fields big-endian.

use super::bytes::{array, be32, be64, div_ceil, fits, read_padded, round_up};
use super::{for_each_entry, Details, Input, Report, Violation};
use crate::DiskFormat;
use serde::Serialize;

/// Footer cookie.
pub const COOKIE: &[u8] = b"conectix";
/// Dynamic header cookie.
pub const DYN_COOKIE: &[u8] = b"cxsparse";
/// Disk type: fixed.
pub const TYPE_FIXED: u32 = 2;
/// Disk type: dynamic (sparse).
pub const TYPE_DYNAMIC: u32 = 3;
/// Disk type: differencing (has a parent).
pub const TYPE_DIFFERENCING: u32 = 4;
/// BAT entry of an unallocated block.
pub const BAT_UNUSED: u32 = 0xffff_ffff;

/// The 512-byte VHD footer (also copied at offset 0 of dynamic disks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VhdFooter {
    /// Feature bits.
    pub features: u32,
    /// Format version (0x00010000).
    pub format_version: u32,
    /// Offset of the dynamic header (`u64::MAX` / 0xFFFFFFFF for fixed disks).
    pub data_offset: u64,
    /// Seconds since 2000-01-01.
    pub timestamp: u32,
    /// Creator application, e.g. `qemu`, `qem2`, `win `, `vpc `.
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_host_os: u32,
    /// Original size in bytes.
    pub original_size: u64,
    /// Current size in bytes.
    pub current_size: u64,
    /// CHS geometry: cylinders.
    pub cylinders: u16,
    /// CHS geometry: heads.
    pub heads: u8,
    /// CHS geometry: sectors per track.
    pub sectors_per_track: u8,
    /// 2 fixed, 3 dynamic, 4 differencing.
    pub disk_type: u32,
    /// Stored checksum.
    pub checksum: u32,
    /// Computed checksum (one's complement of the byte sum without the checksum field).
    pub computed_checksum: u32,
    /// Unique id.
    pub uuid: [u8; 16],
    /// Saved state flag.
    pub saved_state: u8,
}

/// The checksum VHD uses: one's complement of the byte sum, with bytes `skip..skip+4` as zero.
pub fn vhd_checksum(b: &[u8], skip: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &c) in b.iter().enumerate() {
        if i < skip || i >= skip + 4 {
            sum = sum.wrapping_add(u32::from(c));
        }
    }
    !sum
}

impl VhdFooter {
    /// Parses a 512-byte footer (cookie not checked).
    pub fn parse(b: &[u8]) -> VhdFooter {
        let geo = be32(b, 56);
        VhdFooter {
            features: be32(b, 8),
            format_version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: array(b, 28),
            creator_version: be32(b, 32),
            creator_host_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            cylinders: (geo >> 16) as u16,
            heads: (geo >> 8) as u8,
            sectors_per_track: geo as u8,
            disk_type: be32(b, 60),
            checksum: be32(b, 64),
            computed_checksum: vhd_checksum(super::bytes::slice(b, 0, 512), 64),
            uuid: array(b, 68),
            saved_state: b.get(84).copied().unwrap_or(0),
        }
    }

    /// The virtual size qemu uses (see [`qemu_virtual_size`]).
    pub fn virtual_size(&self) -> u64 {
        qemu_virtual_size(
            &self.creator_app,
            self.current_size,
            self.cylinders,
            self.heads,
            self.sectors_per_track,
        )
    }
}

/// CHS geometry (in sectors) at which qemu switches to `current_size` whatever the creator.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

/// The virtual size of a VHD as qemu computes it, shared by `inspect` and the reader so both
/// always agree: the CHS geometry (cylinders × heads × sectors × 512) for images made by
/// Virtual PC (`vpc `) and old qemu (`qemu`), unless that geometry has the maximum sector count
/// (any triple whose product is 65535 × 16 × 255); `current_size` rounded down to whole
/// sectors otherwise (Hyper-V, newer qemu, disk2vhd, XenServer, Azure, unknown creators).
pub fn qemu_virtual_size(
    creator_app: &[u8; 4],
    current_size: u64,
    cylinders: u16,
    heads: u8,
    sectors_per_track: u8,
) -> u64 {
    let chs = u64::from(cylinders) * u64::from(heads) * u64::from(sectors_per_track);
    let chs_creator = creator_app == b"vpc " || creator_app == b"qemu";
    if chs_creator && chs != MAX_GEOMETRY_SECTORS {
        chs * 512
    } else {
        current_size / 512 * 512
    }
}

/// A parent locator entry of the dynamic header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ParentLocator {
    /// Platform code (e.g. `W2ku`, `Mac `); 0 = unused.
    pub platform_code: u32,
    /// Sectors reserved for the locator data.
    pub data_space: u32,
    /// Length of the locator data.
    pub data_length: u32,
    /// Offset of the locator data.
    pub data_offset: u64,
}

/// The 1024-byte dynamic disk header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VhdDynamicHeader {
    /// Next structure (unused, `u64::MAX`).
    pub data_offset: u64,
    /// Offset of the block allocation table.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub header_version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes (default 2 MiB).
    pub block_size: u32,
    /// Stored checksum.
    pub checksum: u32,
    /// Computed checksum.
    pub computed_checksum: u32,
    /// Parent UUID (differencing disks).
    pub parent_uuid: [u8; 16],
    /// Parent timestamp.
    pub parent_timestamp: u32,
    /// Parent locators.
    pub parent_locators: [ParentLocator; 8],
}

impl VhdDynamicHeader {
    /// Parses a 1024-byte dynamic header (cookie not checked).
    pub fn parse(b: &[u8]) -> VhdDynamicHeader {
        let mut pl = [ParentLocator::default(); 8];
        for (i, p) in pl.iter_mut().enumerate() {
            let o = 576 + i * 24;
            *p = ParentLocator {
                platform_code: be32(b, o),
                data_space: be32(b, o + 4),
                data_length: be32(b, o + 8),
                data_offset: be64(b, o + 16),
            };
        }
        VhdDynamicHeader {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            header_version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            checksum: be32(b, 36),
            computed_checksum: vhd_checksum(super::bytes::slice(b, 0, 1024), 36),
            parent_uuid: array(b, 40),
            parent_timestamp: be32(b, 56),
            parent_locators: pl,
        }
    }
    /// Bytes of the per-block sector bitmap preceding each block (rounded to 512).
    pub fn bitmap_size(&self) -> u64 {
        round_up(div_ceil(u64::from(self.block_size) / 512, 8), 512)
    }
}

/// What `inspect` learnt about a VHD.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VhdInfo {
    /// The authoritative footer (end of file; the start copy for dynamic disks if the end one
    /// is missing).
    pub footer: VhdFooter,
    /// Dynamic header, for dynamic and differencing disks.
    pub dynamic: Option<VhdDynamicHeader>,
}

pub(crate) fn analyze(inp: &Input, rep: &mut Report) -> std::io::Result<()> {
    let f = DiskFormat::Vhd;
    let fs = inp.file_size;
    let start = inp.head.starts_with(COOKIE);
    let (tail, n) = if fs >= 512 {
        read_padded(inp.src, fs - 512, 512)?
    } else {
        (vec![0; 512], 0)
    };
    let end = n == 512 && tail.starts_with(COOKIE);
    let fbytes: &[u8] = if end { &tail } else { inp.head };
    let footer = VhdFooter::parse(fbytes);
    if start && !end {
        // qemu reads the copy at offset 0, but a dynamic disk must end with its footer.
        rep.truncated(f, fs.saturating_add(512), fs);
    }
    if start && end && super::bytes::slice(inp.head, 0, 512) != &tail[..] {
        rep.v(Violation::VhdFooterMismatch);
    }
    if footer.checksum != footer.computed_checksum {
        rep.v(Violation::VhdBadFooterChecksum {
            stored: footer.checksum,
            computed: footer.computed_checksum,
        });
    }
    rep.virtual_size = footer.virtual_size();
    rep.feature(match footer.disk_type {
        TYPE_FIXED => "fixed",
        TYPE_DYNAMIC => "dynamic",
        TYPE_DIFFERENCING => "differencing",
        _ => "unknown-disk-type",
    });
    let mut info = VhdInfo {
        footer: footer.clone(),
        dynamic: None,
    };
    match footer.disk_type {
        TYPE_FIXED => {
            let data = fs.saturating_sub(512);
            if footer.current_size > data || rep.virtual_size > data {
                rep.v(Violation::VhdSizeMismatch {
                    declared: footer.current_size,
                    actual: data,
                });
            }
            rep.allocated_size = Some(data);
        }
        TYPE_DYNAMIC | TYPE_DIFFERENCING => {
            if footer.disk_type == TYPE_DIFFERENCING {
                rep.v(Violation::VhdDifferencing);
            }
            let off = footer.data_offset;
            if !fits(off, 1024, fs) {
                rep.v(Violation::VhdDynamicHeaderOutOfBounds { offset: off });
            } else {
                let (b, _) = read_padded(inp.src, off, 1024)?;
                let d = VhdDynamicHeader::parse(&b);
                if !b.starts_with(DYN_COOKIE) {
                    rep.invalid(f, "dynamic header cookie is not cxsparse");
                } else {
                    dynamic_checks(inp, &footer, &d, rep)?;
                }
                info.dynamic = Some(d);
            }
        }
        t => rep.v(Violation::VhdUnsupportedDiskType { disk_type: t }),
    }
    rep.details = Details::Vhd(Box::new(info));
    Ok(())
}

fn dynamic_checks(
    inp: &Input,
    footer: &VhdFooter,
    d: &VhdDynamicHeader,
    rep: &mut Report,
) -> std::io::Result<()> {
    let fs = inp.file_size;
    if d.checksum != d.computed_checksum {
        rep.v(Violation::VhdBadDynamicHeaderChecksum {
            stored: d.checksum,
            computed: d.computed_checksum,
        });
    }
    if footer.disk_type == TYPE_DYNAMIC && d.parent_locators.iter().any(|p| p.platform_code != 0) {
        rep.v(Violation::VhdDifferencing);
    }
    let bs = u64::from(d.block_size);
    if !d.block_size.is_power_of_two() || d.block_size < 512 || bs > (256 << 20) {
        rep.v(Violation::VhdBadBlockSize {
            block_size: d.block_size,
        });
        return Ok(());
    }
    rep.cluster_size = Some(bs);
    let entries = u64::from(d.max_table_entries);
    let bat_len = round_up(entries * 4, 512);
    let needed = div_ceil(rep.virtual_size.max(footer.current_size), bs);
    if entries < needed || !d.table_offset.is_multiple_of(512) || !fits(d.table_offset, bat_len, fs)
    {
        rep.v(Violation::VhdBatOutOfBounds {
            offset: d.table_offset,
            entries,
        });
        return Ok(());
    }
    if !inp.opts.deep {
        return Ok(());
    }
    let span = d.bitmap_size() + bs;
    // Data blocks must end before the footer.
    let data_end = fs.saturating_sub(512);
    let mut bad = None;
    let mut allocated = 0u64;
    for_each_entry(inp.src, d.table_offset, entries.min(needed), 4, |i, e| {
        let sector = be32(e, 0);
        if sector == BAT_UNUSED {
            return true;
        }
        if !fits(u64::from(sector) * 512, span, data_end) {
            bad = Some(Violation::VhdBlockOutOfBounds { index: i, sector });
            return false;
        }
        allocated += bs;
        true
    })?;
    match bad {
        Some(v) => rep.v(v),
        None => rep.allocated_size = Some(allocated),
    }
    Ok(())
}
