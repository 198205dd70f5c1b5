//! VDI (VirtualBox) reader: static and dynamic images. The block map (4 bytes per block,
//! 1 MiB blocks by default) is loaded whole, capped at 16 MiB. Differencing images are refused.

use super::{check_disk_size, invalid, le32, le64, read_mapped, read_vec, unsupported, BlockMap};
use crate::io::{Extent, ExtentKind, ReadAt, StoredSlice, VirtualDisk};
use crate::Result;
use std::sync::Arc;

const F: &str = "vdi";
const SIGNATURE: u32 = 0xbeda_107f;
const UNALLOCATED: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;

/// The header fields this reader uses (version 1.1 layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiHeader {
    pub image_type: u32,
    pub offset_bmap: u64,
    pub offset_data: u64,
    pub disk_size: u64,
    pub block_size: u64,
    pub block_extra: u64,
    pub blocks: u64,
}

/// Parses the first 512 bytes of a VDI file.
pub fn parse_header(h: &[u8]) -> Result<VdiHeader> {
    if h.len() < 512 || le32(h, 0x40) != SIGNATURE {
        return Err(invalid(F, "no signature"));
    }
    if le32(h, 0x44) >> 16 != 1 {
        return Err(unsupported(F, format!("version {:#x}", le32(h, 0x44))));
    }
    Ok(VdiHeader {
        image_type: le32(h, 0x4c),
        offset_bmap: le32(h, 0x154) as u64,
        offset_data: le32(h, 0x158) as u64,
        disk_size: le64(h, 0x170),
        block_size: le32(h, 0x178) as u64,
        block_extra: le32(h, 0x17c) as u64,
        blocks: le32(h, 0x180) as u64,
    })
}

/// Reader of VDI images.
pub struct VdiReader {
    src: Arc<dyn ReadAt>,
    h: VdiHeader,
    bmap: Vec<u32>,
}

impl VdiReader {
    /// Opens a VDI image.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<VdiReader> {
        let file_size = src.size()?;
        let h = parse_header(&read_vec(&*src, 0, 512)?)?;
        match h.image_type {
            1 | 2 => {}
            4 => return Err(unsupported(F, "differencing image")),
            t => return Err(unsupported(F, format!("image type {t}"))),
        }
        check_disk_size(F, h.disk_size)?;
        if !h.block_size.is_power_of_two() || !(512..=(64 << 20)).contains(&h.block_size) {
            return Err(invalid(F, format!("block size {}", h.block_size)));
        }
        if h.block_extra != 0 {
            return Err(unsupported(F, "extra block data"));
        }
        if h.blocks.saturating_mul(h.block_size) < h.disk_size {
            return Err(invalid(F, "block map too small for the disk size"));
        }
        let needed = h.disk_size.div_ceil(h.block_size);
        if needed * 4 > 16 << 20 || h.offset_bmap.saturating_add(needed * 4) > file_size {
            return Err(invalid(F, "block map too large or outside the file"));
        }
        let raw = read_vec(&*src, h.offset_bmap, (needed * 4) as usize)?;
        let bmap = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Ok(VdiReader { src, h, bmap })
    }

    fn map(&self, block: u64) -> BlockMap {
        match self
            .bmap
            .get(block as usize)
            .copied()
            .unwrap_or(UNALLOCATED)
        {
            UNALLOCATED | ZERO => BlockMap::Zero,
            e => BlockMap::Data(self.h.offset_data + e as u64 * self.h.block_size),
        }
    }
}

impl VirtualDisk for VdiReader {
    fn virtual_size(&self) -> u64 {
        self.h.disk_size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        super::extents_mapped(self.h.disk_size, self.h.block_size, offset, len, |b| {
            Ok(match self.map(b) {
                BlockMap::Zero => ExtentKind::Zero,
                BlockMap::Data(_) => ExtentKind::Data,
            })
        })
    }

    fn stored_slices(&mut self, offset: u64, len: u64) -> Result<Option<Vec<StoredSlice>>> {
        let this = &*self;
        let (size, block) = (this.h.disk_size, this.h.block_size);
        super::slices_mapped(&*this.src, size, block, offset, len, |b| {
            Ok(Some(this.map(b)))
        })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let this = &*self;
        read_mapped(
            &*this.src,
            this.h.disk_size,
            this.h.block_size,
            offset,
            buf,
            |b| Ok(this.map(b)),
        )
    }
}
