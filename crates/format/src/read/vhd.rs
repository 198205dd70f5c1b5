//! VHD (Virtual PC / Hyper-V gen 1) reader: fixed and dynamic disks.
//!
//! Dynamic disks: the BAT is loaded (at most 4 MiB: 2 TiB / 2 MiB blocks x 4 bytes); each
//! allocated block's sector bitmap is honoured (clear bit = sector reads as zeros). Differencing
//! disks are refused.

use super::{
    be16, be32, be64, clip, invalid, read_mapped, read_or_zero, unsupported, BlockMap, ExtentList,
};
use crate::io::{Extent, ExtentKind, ReadAt, StoredSlice, VirtualDisk};
use crate::Result;
use std::sync::Arc;

const F: &str = "vhd";
/// What the reader needs from the 512-byte footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdFooter {
    pub data_offset: u64,
    pub creator_app: [u8; 4],
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type: u32,
}

impl VhdFooter {
    /// The virtual size, chosen as qemu does and exactly as `inspect` does
    /// ([`crate::inspect::vhd::qemu_virtual_size`]).
    pub fn virtual_size(&self) -> u64 {
        crate::inspect::vhd::qemu_virtual_size(
            &self.creator_app,
            self.current_size,
            self.cylinders,
            self.heads,
            self.sectors_per_track,
        )
    }
}

/// The VHD checksum: one's complement of the byte sum, skipping the checksum field.
pub fn vhd_checksum(b: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &x) in b.iter().enumerate() {
        if i < checksum_at || i >= checksum_at + 4 {
            sum = sum.wrapping_add(x as u32);
        }
    }
    !sum
}

/// Parses a footer (or its copy at offset 0 of dynamic disks).
pub fn parse_footer(b: &[u8]) -> Result<VhdFooter> {
    if b.len() < 512 || &b[0..8] != b"conectix" {
        return Err(invalid(F, "no footer cookie"));
    }
    if vhd_checksum(&b[..512], 64) != be32(b, 64) {
        return Err(invalid(F, "footer checksum mismatch"));
    }
    let mut creator_app = [0u8; 4];
    creator_app.copy_from_slice(&b[28..32]);
    Ok(VhdFooter {
        data_offset: be64(b, 16),
        creator_app,
        current_size: be64(b, 48),
        cylinders: be16(b, 56),
        heads: b[58],
        sectors_per_track: b[59],
        disk_type: be32(b, 60),
    })
}

enum Kind {
    Fixed,
    Dynamic {
        bat: Vec<u32>,
        block: u64,
        bitmap_bytes: u64,
        /// Cached sector bitmap of one block: (block index, bitmap, all bits set).
        bitmap: Option<(u64, Vec<u8>, bool)>,
    },
}

/// Reader of fixed and dynamic VHD images.
pub struct VhdReader {
    src: Arc<dyn ReadAt>,
    size: u64,
    file_size: u64,
    kind: Kind,
}

impl VhdReader {
    /// Opens a VHD image.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<VhdReader> {
        let file_size = src.size()?;
        if file_size < 512 {
            return Err(invalid(F, "file shorter than a footer"));
        }
        let mut b = [0u8; 512];
        src.read_exact_at(&mut b, file_size - 512)?;
        let footer = match parse_footer(&b) {
            Ok(f) => f,
            Err(e) => {
                // Dynamic disks keep a copy of the footer at offset 0.
                src.read_exact_at(&mut b, 0)?;
                match parse_footer(&b) {
                    Ok(f) if f.disk_type == 3 => f,
                    _ => return Err(e),
                }
            }
        };
        let size = footer.virtual_size();
        super::check_disk_size(F, size)?;
        let kind = match footer.disk_type {
            2 => {
                if size > file_size - 512 {
                    return Err(invalid(F, "fixed disk larger than its file"));
                }
                Kind::Fixed
            }
            3 => Self::open_dynamic(&*src, &footer, size, file_size)?,
            4 => return Err(unsupported(F, "differencing disk (has a parent)")),
            t => return Err(invalid(F, format!("disk type {t}"))),
        };
        Ok(VhdReader {
            src,
            size,
            file_size,
            kind,
        })
    }

    fn open_dynamic(src: &dyn ReadAt, f: &VhdFooter, size: u64, file_size: u64) -> Result<Kind> {
        if f.data_offset.saturating_add(1024) > file_size {
            return Err(invalid(F, "dynamic header outside the file"));
        }
        let mut h = [0u8; 1024];
        src.read_exact_at(&mut h, f.data_offset)?;
        if &h[0..8] != b"cxsparse" {
            return Err(invalid(F, "no dynamic header cookie"));
        }
        if vhd_checksum(&h, 36) != be32(&h, 36) {
            return Err(invalid(F, "dynamic header checksum mismatch"));
        }
        let table_off = be64(&h, 16);
        let entries = be32(&h, 28) as u64;
        let block = be32(&h, 32) as u64;
        if !block.is_power_of_two() || !(512..=(256 << 20)).contains(&block) {
            return Err(invalid(F, format!("block size {block}")));
        }
        if entries.saturating_mul(block) < size {
            return Err(invalid(F, "BAT too small for the disk size"));
        }
        let needed = size.div_ceil(block);
        if needed > (4 << 20) / 4 {
            return Err(unsupported(F, "BAT larger than 4 MiB"));
        }
        if table_off.saturating_add(needed * 4) > file_size {
            return Err(invalid(F, "BAT outside the file"));
        }
        let mut raw = vec![0u8; (needed * 4) as usize];
        src.read_exact_at(&mut raw, table_off)?;
        let bat = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
        let bitmap_bytes = (block / 512).div_ceil(8).div_ceil(512) * 512;
        Ok(Kind::Dynamic {
            bat,
            block,
            bitmap_bytes,
            bitmap: None,
        })
    }
}

/// Loads the sector bitmap of block `idx` (BAT entry `e`, `bmb` bytes) into the cache.
fn load_bitmap(
    src: &dyn ReadAt,
    bitmap: &mut Option<(u64, Vec<u8>, bool)>,
    idx: u64,
    e: u32,
    bmb: u64,
) -> Result<()> {
    if matches!(bitmap, Some((i, _, _)) if *i == idx) {
        return Ok(());
    }
    let mut bm = match bitmap.take() {
        Some((_, v, _)) => v,
        None => Vec::new(),
    };
    bm.resize(bmb as usize, 0);
    read_or_zero(src, &mut bm, e as u64 * 512)?;
    let full = bm.iter().all(|&b| b == 0xff);
    *bitmap = Some((idx, bm, full));
    Ok(())
}

impl VirtualDisk for VhdReader {
    /// A fixed disk's range is the file's; a dynamic disk's blocks are holes or, when their
    /// sector bitmap is full, the file's bytes after the bitmap. A block with clear bits: `None`.
    fn stored_slices(&mut self, offset: u64, len: u64) -> Result<Option<Vec<StoredSlice>>> {
        let src = Arc::clone(&self.src);
        let Kind::Dynamic {
            bat,
            block,
            bitmap_bytes,
            bitmap,
        } = &mut self.kind
        else {
            let inside = offset.checked_add(len).is_some_and(|e| e <= self.size);
            return Ok(src.stored_slices(offset, len).filter(|_| inside));
        };
        let (block, bmb) = (*block, *bitmap_bytes);
        super::slices_mapped(&*src, self.size, block, offset, len, |idx| {
            let e = bat.get(idx as usize).copied().unwrap_or(u32::MAX);
            if e == u32::MAX {
                return Ok(Some(BlockMap::Zero));
            }
            load_bitmap(&*src, bitmap, idx, e, bmb)?;
            let whole = matches!(bitmap, Some((_, _, true)));
            Ok(whole.then_some(BlockMap::Data((e as u64 * 512).saturating_add(bmb))))
        })
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = clip(offset, len, self.size);
        let mut out = ExtentList::default();
        let start = offset.min(end);
        match &self.kind {
            Kind::Fixed => out.push(start, end - start, ExtentKind::Data),
            Kind::Dynamic { bat, block, .. } => {
                let mut pos = start;
                while pos < end {
                    let n = (block - pos % block).min(end - pos);
                    let e = bat.get((pos / block) as usize).copied().unwrap_or(u32::MAX);
                    let kind = if e == u32::MAX {
                        ExtentKind::Zero
                    } else {
                        ExtentKind::Data
                    };
                    out.push(pos, n, kind);
                    pos += n;
                }
            }
        }
        Ok(out.v)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size;
        let file_size = self.file_size;
        let src = &*self.src;
        match &mut self.kind {
            Kind::Fixed => {
                let end = clip(offset, buf.len() as u64, size);
                let valid = (end - offset.min(end)) as usize;
                read_or_zero(src, &mut buf[..valid], offset)?;
                buf[valid..].fill(0);
                Ok(())
            }
            Kind::Dynamic {
                bat,
                block,
                bitmap_bytes,
                bitmap,
            } => {
                let block = *block;
                let bmb = *bitmap_bytes;
                // Pass 1: whole-block mapping (coalesced reads).
                read_mapped(src, size, block, offset, buf, |i| {
                    let e = bat.get(i as usize).copied().unwrap_or(u32::MAX);
                    if e == u32::MAX {
                        return Ok(BlockMap::Zero);
                    }
                    let start = e as u64 * 512;
                    if start.saturating_add(bmb) > file_size {
                        return Err(invalid(F, "block outside the file"));
                    }
                    Ok(BlockMap::Data(start + bmb))
                })?;
                // Pass 2: clear the sectors the bitmaps mark absent.
                let end = clip(offset, buf.len() as u64, size);
                let mut pos = offset;
                while pos < end {
                    let idx = pos / block;
                    let n = (block - pos % block).min(end - pos);
                    let e = bat.get(idx as usize).copied().unwrap_or(u32::MAX);
                    if e != u32::MAX {
                        load_bitmap(src, bitmap, idx, e, bmb)?;
                        if let Some((_, bm, false)) = bitmap {
                            let first = pos % block / 512;
                            let last = (pos % block + n).div_ceil(512);
                            for s in first..last {
                                let set = bm[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
                                if !set {
                                    let s0 = (idx * block + s * 512).max(pos);
                                    let s1 = (idx * block + (s + 1) * 512).min(pos + n);
                                    let b0 = (s0 - offset) as usize;
                                    let b1 = (s1 - offset) as usize;
                                    buf[b0..b1].fill(0);
                                }
                            }
                        }
                    }
                    pos += n;
                }
                Ok(())
            }
        }
    }
}
