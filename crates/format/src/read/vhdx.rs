//! VHDX reader: headers (the valid one with the highest sequence number), region table,
//! metadata (block size, virtual size, logical sector size), BAT read in pages through a
//! bounded cache, payload block states.
//!
//! Refused: differencing disks (`HasParent`), logs that still hold entries to replay.

use super::{
    clip, invalid, le16, le32, le64, read_mapped, read_vec, unsupported, BlockMap, EntryWidth,
    TableCache,
};
use crate::io::{Extent, ExtentKind, ReadAt, StoredSlice, VirtualDisk};
use crate::Result;
use std::sync::Arc;

const F: &str = "vhdx";
const MIB: u64 = 1 << 20;
/// BAT entries per cache page (64 KiB).
const BAT_PAGE: u64 = 8192;

/// GUIDs as stored on disk (first three fields little-endian).
const BAT_GUID: [u8; 16] = guid(
    0x2DC27766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const META_GUID: [u8; 16] = guid(
    0x8B7CA206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMS: [u8; 16] = guid(
    0xCAA16737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VDISK_SIZE: [u8; 16] = guid(
    0x2FA54224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);

/// Encodes a GUID in the on-disk byte order.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// crc32c of `b` with the 4-byte checksum field at `at` taken as zero.
pub fn crc32c_with_hole(b: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[at + 4..])
}

/// The active header's fields this reader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxHeader {
    pub sequence: u64,
    pub log_guid: [u8; 16],
    pub log_length: u32,
    pub log_offset: u64,
}

/// Parses one 4 KiB header; `None` if its signature or checksum is wrong.
pub fn parse_header(b: &[u8]) -> Option<VhdxHeader> {
    if b.len() < 4096 || &b[0..4] != b"head" || crc32c_with_hole(&b[..4096], 4) != le32(b, 4) {
        return None;
    }
    let mut log_guid = [0u8; 16];
    log_guid.copy_from_slice(&b[48..64]);
    Some(VhdxHeader {
        sequence: le64(b, 8),
        log_guid,
        log_length: le32(b, 68),
        log_offset: le64(b, 72),
    })
}

/// The parameters the reader needs from the region table and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxParams {
    pub block_size: u64,
    pub virtual_size: u64,
    pub logical_sector: u64,
    pub bat_offset: u64,
    pub bat_length: u64,
}

/// Parses a 64 KiB region table: (BAT offset, BAT length, metadata offset, metadata length).
pub fn parse_region_table(b: &[u8]) -> Option<(u64, u64, u64, u64)> {
    if b.len() < 65536 || &b[0..4] != b"regi" || crc32c_with_hole(&b[..65536], 4) != le32(b, 4) {
        return None;
    }
    let count = le32(b, 8) as usize;
    if count > 2047 {
        return None;
    }
    let (mut bat, mut meta) = (None, None);
    for i in 0..count {
        let e = b.get(16 + i * 32..16 + (i + 1) * 32)?;
        let (off, len) = (le64(e, 16), le32(e, 24) as u64);
        if e[0..16] == BAT_GUID {
            bat = Some((off, len));
        } else if e[0..16] == META_GUID {
            meta = Some((off, len));
        } else if le32(e, 28) & 1 != 0 {
            return None; // unknown required region
        }
    }
    let ((bo, bl), (mo, ml)) = (bat?, meta?);
    Some((bo, bl, mo, ml))
}

/// Parses the metadata region; returns (block size, virtual size, logical sector size).
pub fn parse_metadata(m: &[u8]) -> Result<(u64, u64, u64)> {
    if m.len() < 65536 || &m[0..8] != b"metadata" {
        return Err(invalid(F, "bad metadata table"));
    }
    let count = le16(m, 10) as usize;
    if count > 2047 {
        return Err(invalid(F, "too many metadata entries"));
    }
    let item = |id: &[u8; 16], want: usize| -> Result<Option<&[u8]>> {
        for i in 0..count {
            let Some(e) = m.get(32 + i * 32..32 + (i + 1) * 32) else {
                break;
            };
            if &e[0..16] == id {
                let (off, len) = (le32(e, 16) as usize, le32(e, 20) as usize);
                if len < want || off.checked_add(want).is_none_or(|end| end > m.len()) {
                    return Err(invalid(F, "metadata item outside the region"));
                }
                return Ok(Some(&m[off..off + want]));
            }
        }
        Ok(None)
    };
    let fp = item(&FILE_PARAMS, 8)?.ok_or_else(|| invalid(F, "no file parameters"))?;
    let block = le32(fp, 0) as u64;
    if le32(fp, 4) & 2 != 0 {
        return Err(unsupported(F, "differencing disk (has a parent)"));
    }
    let vs = le64(
        item(&VDISK_SIZE, 8)?.ok_or_else(|| invalid(F, "no virtual disk size"))?,
        0,
    );
    let lss = le32(
        item(&LOGICAL_SECTOR, 4)?.ok_or_else(|| invalid(F, "no logical sector size"))?,
        0,
    ) as u64;
    if !block.is_power_of_two() || !(MIB..=256 * MIB).contains(&block) {
        return Err(invalid(F, format!("block size {block}")));
    }
    if lss != 512 && lss != 4096 {
        return Err(invalid(F, format!("logical sector size {lss}")));
    }
    Ok((block, vs, lss))
}

/// Reader of VHDX images (fixed and dynamic).
pub struct VhdxReader {
    src: Arc<dyn ReadAt>,
    p: VhdxParams,
    chunk_ratio: u64,
    file_size: u64,
    bat: TableCache,
}

impl VhdxReader {
    /// Opens a VHDX image.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<VhdxReader> {
        let file_size = src.size()?;
        if file_size < MIB || read_vec(&*src, 0, 8)? != b"vhdxfile" {
            return Err(invalid(F, "no file identifier"));
        }
        let h1 = parse_header(&read_vec(&*src, 64 << 10, 4096)?);
        let h2 = parse_header(&read_vec(&*src, 128 << 10, 4096)?);
        let h = match (h1, h2) {
            (Some(a), Some(b)) => {
                if a.sequence >= b.sequence {
                    a
                } else {
                    b
                }
            }
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Err(invalid(F, "no valid header")),
        };
        if h.log_guid != [0u8; 16] && log_has_entries(&*src, &h, file_size)? {
            return Err(unsupported(F, "log needs replay"));
        }
        let rt = parse_region_table(&read_vec(&*src, 192 << 10, 65536)?)
            .or_else(|| {
                read_vec(&*src, 256 << 10, 65536)
                    .ok()
                    .and_then(|b| parse_region_table(&b))
            })
            .ok_or_else(|| invalid(F, "no valid region table"))?;
        let (bat_offset, bat_length, mo, ml) = rt;
        if !(65536..=16 * MIB).contains(&ml) || mo.saturating_add(ml) > file_size {
            return Err(invalid(F, "metadata region outside the file"));
        }
        let meta = read_vec(&*src, mo, ml as usize)?;
        let (block_size, virtual_size, logical_sector) = parse_metadata(&meta)?;
        super::check_disk_size(F, virtual_size)?;
        let chunk_ratio = ((1u64 << 23) * logical_sector) / block_size;
        let blocks = virtual_size.div_ceil(block_size);
        let entries = if blocks == 0 {
            0
        } else {
            blocks + (blocks - 1) / chunk_ratio
        };
        if bat_length < entries * 8 || bat_offset.saturating_add(entries * 8) > file_size {
            return Err(invalid(F, "BAT too small or outside the file"));
        }
        let p = VhdxParams {
            block_size,
            virtual_size,
            logical_sector,
            bat_offset,
            bat_length,
        };
        Ok(VhdxReader {
            src,
            p,
            chunk_ratio,
            file_size,
            bat: TableCache::new((BAT_PAGE * 8) as usize),
        })
    }

    fn map(&mut self, block: u64) -> Result<BlockMap> {
        let idx = block + block / self.chunk_ratio;
        let page = idx / BAT_PAGE;
        let total = self.p.bat_length / 8;
        let count = (total - page * BAT_PAGE).min(BAT_PAGE) as usize;
        let t = self.bat.get(
            &*self.src,
            self.p.bat_offset + page * BAT_PAGE * 8,
            count,
            EntryWidth::Le64,
        )?;
        let e = t.get((idx % BAT_PAGE) as usize).copied().unwrap_or(0);
        match e & 7 {
            0..=3 => Ok(BlockMap::Zero),
            6 => {
                let off = (e >> 20).saturating_mul(MIB);
                if off < MIB || off >= self.file_size {
                    return Err(invalid(F, "payload block outside the file"));
                }
                Ok(BlockMap::Data(off))
            }
            7 => Err(unsupported(F, "partially present block (differencing)")),
            s => Err(invalid(F, format!("block state {s}"))),
        }
    }
}

/// Whether the log region holds an entry with the header's log GUID and a valid checksum.
fn log_has_entries(src: &dyn ReadAt, h: &VhdxHeader, file_size: u64) -> Result<bool> {
    let len = h.log_length as u64;
    if len == 0 || len > 256 * MIB || h.log_offset.saturating_add(len) > file_size {
        return Err(invalid(F, "log outside the file"));
    }
    let mut page = vec![0u8; 4096];
    let mut off = 0;
    while off < len {
        src.read_exact_at(&mut page, h.log_offset + off)?;
        if &page[0..4] == b"loge" && page[32..48] == h.log_guid {
            let entry_len = le32(&page, 8) as u64;
            if entry_len >= 4096 && entry_len & 4095 == 0 && off + entry_len <= len {
                let e = read_vec(src, h.log_offset + off, entry_len as usize)?;
                if crc32c_with_hole(&e, 4) == le32(&e, 4) {
                    return Ok(true);
                }
            }
        }
        off += 4096;
    }
    Ok(false)
}

impl VirtualDisk for VhdxReader {
    fn virtual_size(&self) -> u64 {
        self.p.virtual_size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let bs = self.p.block_size;
        super::extents_mapped(self.p.virtual_size, bs, offset, len, |b| {
            Ok(match self.map(b)? {
                BlockMap::Zero => ExtentKind::Zero,
                BlockMap::Data(_) => ExtentKind::Data,
            })
        })
    }

    fn stored_slices(&mut self, offset: u64, len: u64) -> Result<Option<Vec<StoredSlice>>> {
        let (vs, bs) = (self.p.virtual_size, self.p.block_size);
        let src = self.src.clone();
        super::slices_mapped(&*src, vs, bs, offset, len, |b| self.map(b).map(Some))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = clip(offset, buf.len() as u64, self.p.virtual_size);
        let (vs, bs) = (self.p.virtual_size, self.p.block_size);
        let src = self.src.clone();
        // Resolve the mapping first (the closure can't borrow self mutably alongside src).
        let first = offset.min(end) / bs;
        let last = if end > offset { (end - 1) / bs } else { first };
        let mut maps = Vec::with_capacity((last - first + 1) as usize);
        if end > offset {
            for b in first..=last {
                maps.push(self.map(b)?);
            }
        }
        read_mapped(&*src, vs, bs, offset, buf, |b| {
            Ok(maps
                .get((b - first) as usize)
                .copied()
                .unwrap_or(BlockMap::Zero))
        })
    }
}
