//! Streaming readers: an image file (`ReadAt`) presented as its virtual disk (`VirtualDisk`).
//!
//! Every reader parses only what it needs from the file, bounds-checks every number against
//! the file size and the limits below, keeps its table caches bounded (a few MiB whatever the
//! virtual size), and answers `extents()` from metadata only.
//!
//! Readers refuse what they can't read on their own: backing files, external data files,
//! encryption, differencing disks, unreplayed logs (`FormatError::Unsupported`).

use crate::io::{Extent, ExtentKind, ReadAt, StoredSlice, VirtualDisk};
use crate::{DiskFormat, FormatError, Result};
use std::sync::Arc;

pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

/// Largest virtual disk any reader accepts (64 TiB, the VHDX maximum).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Budget for cached metadata tables (L2 tables, BAT pages, grain tables) per reader.
pub const TABLE_CACHE_BYTES: usize = 4 << 20;

/// Opens `src` as a virtual disk of the given format (normally after `inspect` passed).
pub fn open(src: Arc<dyn ReadAt>, format: DiskFormat) -> Result<Box<dyn VirtualDisk>> {
    Ok(match format {
        DiskFormat::Raw | DiskFormat::Iso => Box::new(raw::RawReader::open(src)?),
        DiskFormat::Qcow2 => Box::new(qcow2::Qcow2Reader::open(src)?),
        DiskFormat::Vhd => Box::new(vhd::VhdReader::open(src)?),
        DiskFormat::Vhdx => Box::new(vhdx::VhdxReader::open(src)?),
        DiskFormat::Vmdk => Box::new(vmdk::VmdkReader::open(src)?),
        DiskFormat::Vdi => Box::new(vdi::VdiReader::open(src)?),
        other => {
            return Err(FormatError::Unsupported {
                format: other.as_str(),
                reason: "no reader for this format".into(),
            })
        }
    })
}

pub(crate) fn invalid(format: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        format,
        reason: reason.into(),
    }
}

pub(crate) fn unsupported(format: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Unsupported {
        format,
        reason: reason.into(),
    }
}

/// Fixed-offset field readers over a buffer whose length the caller guarantees.
pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}
pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Reads `buf.len()` bytes at `off`, zero-filling whatever lies past the end of the file.
pub(crate) fn read_or_zero(src: &dyn ReadAt, buf: &mut [u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = src.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Reads exactly `len` bytes at `off` (must lie in the file) into a new buffer.
pub(crate) fn read_vec(src: &dyn ReadAt, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    src.read_exact_at(&mut v, off)?;
    Ok(v)
}

/// Builds an extent list, merging adjacent extents of the same kind.
#[derive(Default)]
pub(crate) struct ExtentList {
    pub v: Vec<Extent>,
}

impl ExtentList {
    pub fn push(&mut self, offset: u64, len: u64, kind: ExtentKind) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.v.last_mut() {
            if last.kind == kind && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        self.v.push(Extent { offset, len, kind });
    }
}

/// Clips `[offset, offset + len)` to `[0, size)`; returns the end.
pub(crate) fn clip(offset: u64, len: u64, size: u64) -> u64 {
    offset.saturating_add(len).min(size).max(offset.min(size))
}

/// How table entries are stored in the file.
#[derive(Clone, Copy)]
pub(crate) enum EntryWidth {
    Be64,
    Le64,
    Le32,
}

/// A bounded LRU cache of metadata tables (qcow2 L2, VHDX BAT pages, VMDK grain tables),
/// keyed by file offset, holding decoded entries.
pub(crate) struct TableCache {
    slots: Vec<(u64, u64, Vec<u64>)>,
    max_slots: usize,
    tick: u64,
    raw: Vec<u8>,
}

impl TableCache {
    /// A cache for tables of `table_bytes` bytes, within `TABLE_CACHE_BYTES` (at least 2).
    pub fn new(table_bytes: usize) -> TableCache {
        let max_slots = (TABLE_CACHE_BYTES / table_bytes.max(1)).clamp(2, 4096);
        TableCache {
            slots: Vec::new(),
            max_slots,
            tick: 0,
            raw: Vec::new(),
        }
    }

    /// The `count` entries at file offset `off` (entries past EOF read as 0).
    pub fn get(
        &mut self,
        src: &dyn ReadAt,
        off: u64,
        count: usize,
        width: EntryWidth,
    ) -> Result<&[u64]> {
        self.tick += 1;
        let tick = self.tick;
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.0 == off && s.2.len() == count)
        {
            self.slots[i].1 = tick;
            return Ok(&self.slots[i].2);
        }
        let esz = match width {
            EntryWidth::Be64 | EntryWidth::Le64 => 8,
            EntryWidth::Le32 => 4,
        };
        self.raw.resize(count * esz, 0);
        read_or_zero(src, &mut self.raw, off)?;
        let mut entries = if self.slots.len() >= self.max_slots {
            let i = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.1)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let mut v = self.slots.swap_remove(i).2;
            v.clear();
            v
        } else {
            Vec::with_capacity(count)
        };
        let raw = &self.raw;
        match width {
            EntryWidth::Be64 => entries.extend(raw.chunks_exact(8).map(|c| be64(c, 0))),
            EntryWidth::Le64 => entries.extend(raw.chunks_exact(8).map(|c| le64(c, 0))),
            EntryWidth::Le32 => entries.extend(raw.chunks_exact(4).map(|c| le32(c, 0) as u64)),
        }
        self.slots.push((off, tick, entries));
        let last = self.slots.len() - 1;
        Ok(&self.slots[last].2)
    }
}

/// How one block of the virtual disk maps to the file (shared by the block-mapped readers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockMap {
    /// Reads as zeros.
    Zero,
    /// Stored uncompressed at this file offset (the block's first byte).
    Data(u64),
}

/// Generic `read_at` for formats whose blocks map to `BlockMap`s: coalesces runs of blocks
/// contiguous in the file into single reads.
pub(crate) fn read_mapped(
    src: &dyn ReadAt,
    vsize: u64,
    block: u64,
    offset: u64,
    buf: &mut [u8],
    mut map: impl FnMut(u64) -> Result<BlockMap>,
) -> Result<()> {
    let end = clip(offset, buf.len() as u64, vsize);
    let valid = (end - offset.min(end)) as usize;
    buf[valid..].fill(0);
    let mut pos = offset;
    // Pending run: (buffer start, file offset, len).
    let mut run: Option<(usize, u64, usize)> = None;
    while pos < end {
        let idx = pos / block;
        let within = pos % block;
        let n = (block - within).min(end - pos) as usize;
        let b = (pos - offset) as usize;
        match map(idx)? {
            BlockMap::Zero => {
                if let Some((rb, ro, rl)) = run.take() {
                    read_or_zero(src, &mut buf[rb..rb + rl], ro)?;
                }
                buf[b..b + n].fill(0);
            }
            BlockMap::Data(host) => {
                let h = host + within;
                match &mut run {
                    Some((rb, ro, rl)) if *rb + *rl == b && *ro + *rl as u64 == h => *rl += n,
                    _ => {
                        if let Some((rb, ro, rl)) = run.take() {
                            read_or_zero(src, &mut buf[rb..rb + rl], ro)?;
                        }
                        run = Some((b, h, n));
                    }
                }
            }
        }
        pos += n as u64;
    }
    if let Some((rb, ro, rl)) = run {
        read_or_zero(src, &mut buf[rb..rb + rl], ro)?;
    }
    Ok(())
}

/// Generic `stored_slices` for block-mapped formats: each block of
/// `[offset, offset + len)` is a hole (zeros) or stored verbatim in the file, whose bytes the
/// source is asked about once per run of blocks contiguous in the file. `map` answers `None`
/// for a block that is neither (compressed, partly present): then the answer is `None`, as it
/// is when the source does not know a range.
pub(crate) fn slices_mapped(
    src: &dyn ReadAt,
    vsize: u64,
    block: u64,
    offset: u64,
    len: u64,
    mut map: impl FnMut(u64) -> Result<Option<BlockMap>>,
) -> Result<Option<Vec<StoredSlice>>> {
    let end = offset.saturating_add(len);
    if len == 0 || len > u64::from(u32::MAX) || end > vsize {
        return Ok(None);
    }
    let mut out = Vec::new();
    // The pending run of stored bytes: (file offset, length).
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: &mut Option<(u64, u64)>, out: &mut Vec<StoredSlice>| match run.take() {
        None => true,
        Some((h, n)) => match src.stored_slices(h, n) {
            Some(slices) => {
                slices.into_iter().for_each(|s| StoredSlice::push(out, s));
                true
            }
            None => false,
        },
    };
    let mut pos = offset;
    while pos < end {
        let within = pos % block;
        let n = (block - within).min(end - pos);
        match map(pos / block)? {
            Some(BlockMap::Data(host)) => {
                let h = host.saturating_add(within);
                match run.as_mut() {
                    Some((start, rlen)) if *start + *rlen == h => *rlen += n,
                    _ => {
                        if !flush(&mut run, &mut out) {
                            return Ok(None);
                        }
                        run = Some((h, n));
                    }
                }
            }
            Some(BlockMap::Zero) => {
                if !flush(&mut run, &mut out) {
                    return Ok(None);
                }
                StoredSlice::push(&mut out, StoredSlice::Zero { len: n as u32 });
            }
            None => return Ok(None),
        }
        pos += n;
    }
    Ok(flush(&mut run, &mut out).then_some(out))
}

/// Generic `extents` for block-mapped formats (one `map` call per block; no data read).
pub(crate) fn extents_mapped(
    vsize: u64,
    block: u64,
    offset: u64,
    len: u64,
    mut map: impl FnMut(u64) -> Result<ExtentKind>,
) -> Result<Vec<Extent>> {
    let end = clip(offset, len, vsize);
    let mut out = ExtentList::default();
    let mut pos = offset.min(end);
    while pos < end {
        let idx = pos / block;
        let n = (block - pos % block).min(end - pos);
        out.push(pos, n, map(idx)?);
        pos += n;
    }
    Ok(out.v)
}

/// Shorthand used by readers' `read_at` to reject nothing and clip reads to the disk.
pub(crate) fn check_disk_size(format: &'static str, size: u64) -> Result<()> {
    if size > MAX_VIRTUAL_SIZE {
        return Err(unsupported(
            format,
            format!("virtual size {size} exceeds 64 TiB"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_list_merges() {
        let mut l = ExtentList::default();
        l.push(0, 10, ExtentKind::Data);
        l.push(10, 5, ExtentKind::Data);
        l.push(15, 5, ExtentKind::Zero);
        l.push(20, 0, ExtentKind::Data);
        assert_eq!(l.v.len(), 2);
        assert_eq!(l.v[0].len, 15);
    }

    #[test]
    fn read_mapped_coalesces_and_zero_fills() {
        let file: Vec<u8> = (0..64u8).collect();
        let mut buf = [0xffu8; 40];
        // blocks of 8: block 0 -> file 16, block 1 -> file 24 (contiguous), block 2 zero.
        read_mapped(&file, 36, 8, 4, &mut buf, |i| {
            Ok(match i {
                0 => BlockMap::Data(16),
                1 => BlockMap::Data(24),
                _ => BlockMap::Zero,
            })
        })
        .unwrap();
        assert_eq!(&buf[..12], &(20u8..32).collect::<Vec<_>>()[..]);
        assert!(buf[12..].iter().all(|&b| b == 0));
    }
}
