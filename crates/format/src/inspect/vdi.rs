//! VirtualBox VDI header and checks. Little-endian.

use super::bytes::{array, div_ceil, fits, le32, le64};
use super::{for_each_entry, Details, Input, Report, Violation};
use crate::DiskFormat;
use serde::Serialize;

/// Signature at offset 0x40.
pub const MAGIC: u32 = 0xbeda_107f;
/// Version 1.1.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Image type: dynamic.
pub const TYPE_DYNAMIC: u32 = 1;
/// Image type: static (preallocated).
pub const TYPE_STATIC: u32 = 2;
/// Block map entry: unallocated.
pub const BLOCK_FREE: u32 = 0xffff_ffff;
/// Block map entry: reads as zeros.
pub const BLOCK_ZERO: u32 = 0xffff_fffe;

/// The VDI 1.1 header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VdiHeader {
    /// Version (0x00010001).
    pub version: u32,
    /// Header size.
    pub header_size: u32,
    /// 1 dynamic, 2 static, 3 undo, 4 differencing.
    pub image_type: u32,
    /// Flags.
    pub image_flags: u32,
    /// Offset of the block map.
    pub offset_bmap: u32,
    /// Offset of the data area.
    pub offset_data: u32,
    /// Sector size (512).
    pub sector_size: u32,
    /// Virtual size in bytes.
    pub disk_size: u64,
    /// Block size (1 MiB).
    pub block_size: u32,
    /// Extra bytes before each block.
    pub block_extra: u32,
    /// Block map entries.
    pub blocks_in_image: u32,
    /// Allocated blocks.
    pub blocks_allocated: u32,
    /// Image UUID.
    pub uuid_image: [u8; 16],
    /// Parent UUID (differencing).
    pub uuid_parent: [u8; 16],
}

impl VdiHeader {
    /// Parses the header (signature not checked).
    pub fn parse(b: &[u8]) -> VdiHeader {
        VdiHeader {
            version: le32(b, 0x44),
            header_size: le32(b, 0x48),
            image_type: le32(b, 0x4c),
            image_flags: le32(b, 0x50),
            offset_bmap: le32(b, 0x154),
            offset_data: le32(b, 0x158),
            sector_size: le32(b, 0x168),
            disk_size: le64(b, 0x170),
            block_size: le32(b, 0x178),
            block_extra: le32(b, 0x17c),
            blocks_in_image: le32(b, 0x180),
            blocks_allocated: le32(b, 0x184),
            uuid_image: array(b, 0x188),
            uuid_parent: array(b, 0x1b8),
        }
    }
}

pub(crate) fn analyze(inp: &Input, rep: &mut Report) -> std::io::Result<()> {
    let fs = inp.file_size;
    let h = VdiHeader::parse(inp.head);
    rep.virtual_size = h.disk_size;
    if inp.head.len() < 0x190 {
        rep.truncated(DiskFormat::Vdi, 0x190, fs);
    }
    if h.version != VERSION_1_1 {
        rep.v(Violation::VdiUnsupportedVersion { version: h.version });
        rep.details = Details::Vdi(Box::new(h));
        return Ok(());
    }
    if h.image_type != TYPE_DYNAMIC && h.image_type != TYPE_STATIC {
        rep.v(Violation::VdiDifferencing {
            image_type: h.image_type,
        });
    }
    rep.feature(if h.image_type == TYPE_STATIC {
        "static"
    } else {
        "dynamic"
    });
    let bs = u64::from(h.block_size);
    let blocks = u64::from(h.blocks_in_image);
    let mut geo = Vec::new();
    if h.sector_size != 512 {
        geo.push(format!("sector size {}", h.sector_size));
    }
    if h.block_size != 1 << 20 || h.block_extra != 0 {
        geo.push(format!(
            "block size {} (+{} extra)",
            h.block_size, h.block_extra
        ));
    }
    if blocks < div_ceil(h.disk_size, bs.max(1)) || blocks > (1 << 30) / 4 {
        geo.push(format!("{} blocks for {} bytes", blocks, h.disk_size));
    }
    if h.blocks_allocated > h.blocks_in_image {
        geo.push("more blocks allocated than exist".into());
    }
    if !h.offset_bmap.is_multiple_of(512)
        || !h.offset_data.is_multiple_of(512)
        || u64::from(h.offset_data) < u64::from(h.offset_bmap) + blocks * 4
    {
        geo.push("block map / data offsets misaligned or overlapping".into());
    }
    if !geo.is_empty() {
        rep.v(Violation::VdiBadGeometry {
            reason: geo.join(", "),
        });
        rep.details = Details::Vdi(Box::new(h));
        return Ok(());
    }
    rep.cluster_size = Some(bs);
    if !fits(u64::from(h.offset_bmap), blocks * 4, fs) {
        rep.v(Violation::VdiBlockMapOutOfBounds {
            offset: u64::from(h.offset_bmap),
            entries: blocks,
        });
        rep.details = Details::Vdi(Box::new(h));
        return Ok(());
    }
    let data = u64::from(h.offset_data);
    if h.image_type == TYPE_STATIC && !fits(data, h.disk_size, fs) {
        rep.truncated(DiskFormat::Vdi, data.saturating_add(h.disk_size), fs);
    }
    if inp.opts.deep {
        let mut bad = None;
        let mut allocated = 0u64;
        for_each_entry(inp.src, u64::from(h.offset_bmap), blocks, 4, |i, e| {
            let entry = le32(e, 0);
            if entry == BLOCK_FREE || entry == BLOCK_ZERO {
                return true;
            }
            let off = data.saturating_add(u64::from(entry).saturating_mul(bs));
            if u64::from(entry) >= blocks || !fits(off, bs, fs) {
                bad = Some(Violation::VdiBlockOutOfBounds { index: i, entry });
                return false;
            }
            allocated += bs;
            true
        })?;
        match bad {
            Some(v) => rep.v(v),
            None => rep.allocated_size = Some(allocated),
        }
    }
    rep.details = Details::Vdi(Box::new(h));
    Ok(())
}
