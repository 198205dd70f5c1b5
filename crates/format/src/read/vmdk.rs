//! VMDK reader for single-file sparse extents: monolithicSparse and streamOptimized
//! (compressed grains with markers, grain directory found through the footer when the header
//! says `GD_AT_END`). Grain directory and grain tables go through a bounded cache.
//!
//! Refused: descriptor-only files (their extents are other files), differencing disks
//! (parent hints), compressed grains without markers.

use super::{
    clip, invalid, le16, le32, le64, read_or_zero, read_vec, unsupported, BlockMap, EntryWidth,
    ExtentList, TableCache,
};
use crate::io::{Extent, ExtentKind, ReadAt, StoredSlice, VirtualDisk};
use crate::Result;
use std::sync::Arc;

const F: &str = "vmdk";
const GD_AT_END: u64 = u64::MAX;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
/// Grain directory entries per cache page.
const GD_PAGE: u64 = 4096;

/// The sparse extent header fields this reader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_size: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub gtes_per_gt: u32,
    pub gd_offset: u64,
    pub compress_algorithm: u16,
}

/// Parses a 512-byte sparse extent header (little-endian, `KDMV`).
pub fn parse_sparse_header(b: &[u8]) -> Result<SparseHeader> {
    if b.len() < 512 || &b[0..4] != b"KDMV" {
        return Err(invalid(F, "no sparse header magic"));
    }
    Ok(SparseHeader {
        version: le32(b, 4),
        flags: le32(b, 8),
        capacity: le64(b, 12),
        grain_size: le64(b, 20),
        descriptor_offset: le64(b, 28),
        descriptor_size: le64(b, 36),
        gtes_per_gt: le32(b, 44),
        gd_offset: le64(b, 56),
        compress_algorithm: le16(b, 77),
    })
}

/// Checks the embedded descriptor: a single-file sparse type and no parent.
pub fn check_descriptor(text: &str) -> Result<()> {
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("createType") {
            let v = v.trim_start_matches([' ', '=', '"']).trim_end_matches('"');
            if v != "monolithicSparse" && v != "streamOptimized" {
                return Err(unsupported(F, format!("createType {v}")));
            }
        } else if let Some(v) = l.strip_prefix("parentCID") {
            let v = v.trim_start_matches([' ', '=']).trim();
            if !v.eq_ignore_ascii_case("ffffffff") {
                return Err(unsupported(F, "differencing disk (parentCID)"));
            }
        } else if l.starts_with("parentFileNameHint") {
            return Err(unsupported(F, "differencing disk (parentFileNameHint)"));
        }
    }
    Ok(())
}

enum Map {
    Zero,
    Data(u64),
    Compressed(u64),
}

/// Reader of monolithicSparse and streamOptimized VMDK images.
pub struct VmdkReader {
    src: Arc<dyn ReadAt>,
    h: SparseHeader,
    size: u64,
    file_size: u64,
    grain: u64,
    gd_entries: u64,
    gd: TableCache,
    gt: TableCache,
    cbuf: Vec<u8>,
    dcache: Option<(u64, Vec<u8>)>,
    inflate: flate2::Decompress,
}

impl VmdkReader {
    /// Opens a VMDK sparse extent file.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<VmdkReader> {
        let file_size = src.size()?;
        let mut b = [0u8; 512];
        read_or_zero(&*src, &mut b, 0)?;
        if b.starts_with(b"# Disk DescriptorFile") {
            return Err(unsupported(
                F,
                "descriptor file: extents live in other files",
            ));
        }
        let mut h = parse_sparse_header(&b)?;
        if !(1..=3).contains(&h.version) {
            return Err(unsupported(F, format!("version {}", h.version)));
        }
        if h.descriptor_offset != 0 {
            let len = h.descriptor_size.saturating_mul(512).min(64 << 10);
            let off = h.descriptor_offset.saturating_mul(512);
            if off.saturating_add(len) > file_size {
                return Err(invalid(F, "descriptor outside the file"));
            }
            let d = read_vec(&*src, off, len as usize)?;
            let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
            check_descriptor(&String::from_utf8_lossy(&d[..end]))?;
        }
        if h.gd_offset == GD_AT_END {
            if file_size < 1536 {
                return Err(invalid(F, "no room for a footer"));
            }
            let tail = read_vec(&*src, file_size - 1536, 1536)?;
            if le32(&tail, 12) != 3 {
                return Err(invalid(F, "GD at end but no footer marker"));
            }
            let f = parse_sparse_header(&tail[512..1024])?;
            if f.gd_offset == GD_AT_END {
                return Err(invalid(F, "footer has no grain directory offset"));
            }
            h = f;
        }
        if h.flags & FLAG_COMPRESSED != 0 {
            if h.flags & FLAG_MARKERS == 0 {
                return Err(unsupported(F, "compressed grains without markers"));
            }
            if h.compress_algorithm != 1 {
                return Err(unsupported(
                    F,
                    format!("compression algorithm {}", h.compress_algorithm),
                ));
            }
        }
        if !h.grain_size.is_power_of_two() || !(1..=4096).contains(&h.grain_size) {
            return Err(invalid(F, format!("grain size {} sectors", h.grain_size)));
        }
        if !(1..=65536).contains(&h.gtes_per_gt) {
            return Err(invalid(F, "grain table entries per table"));
        }
        let size = h.capacity.saturating_mul(512);
        super::check_disk_size(F, size)?;
        let grain = h.grain_size * 512;
        let gt_span = grain * h.gtes_per_gt as u64;
        let gd_entries = size.div_ceil(gt_span);
        let gd_off = h.gd_offset.saturating_mul(512);
        if gd_entries > 0 && gd_off.saturating_add(gd_entries * 4) > file_size {
            return Err(invalid(F, "grain directory outside the file"));
        }
        let gt_bytes = h.gtes_per_gt as usize * 4;
        Ok(VmdkReader {
            src,
            size,
            file_size,
            grain,
            gd_entries,
            gd: TableCache::new((GD_PAGE * 4) as usize),
            gt: TableCache::new(gt_bytes),
            cbuf: Vec::new(),
            dcache: None,
            inflate: flate2::Decompress::new(true),
            h,
        })
    }

    fn map(&mut self, g: u64) -> Result<Map> {
        let per = self.h.gtes_per_gt as u64;
        let gdi = g / per;
        if gdi >= self.gd_entries {
            return Ok(Map::Zero);
        }
        let page = gdi / GD_PAGE;
        let count = (self.gd_entries - page * GD_PAGE).min(GD_PAGE) as usize;
        let gd_off = self.h.gd_offset * 512 + page * GD_PAGE * 4;
        let gt_sector = self
            .gd
            .get(&*self.src, gd_off, count, EntryWidth::Le32)?
            .get((gdi % GD_PAGE) as usize)
            .copied()
            .unwrap_or(0);
        if gt_sector == 0 {
            return Ok(Map::Zero);
        }
        let gt_off = gt_sector * 512;
        if gt_off.saturating_add(per * 4) > self.file_size {
            return Err(invalid(F, "grain table outside the file"));
        }
        let e = self
            .gt
            .get(&*self.src, gt_off, per as usize, EntryWidth::Le32)?
            .get((g % per) as usize)
            .copied()
            .unwrap_or(0);
        if e == 0 || (e == 1 && self.h.flags & FLAG_ZERO_GRAIN != 0) {
            return Ok(Map::Zero);
        }
        let off = e * 512;
        if off >= self.file_size {
            return Err(invalid(F, "grain outside the file"));
        }
        Ok(if self.h.flags & FLAG_COMPRESSED != 0 {
            Map::Compressed(off)
        } else {
            Map::Data(off)
        })
    }

    fn decompress(&mut self, off: u64) -> Result<()> {
        if matches!(&self.dcache, Some((k, _)) if *k == off) {
            return Ok(());
        }
        let mut m = [0u8; 12];
        read_or_zero(&*self.src, &mut m, off)?;
        let clen = le32(&m, 8) as u64;
        if clen > 2 * self.grain + 4096 || off + 12 + clen > self.file_size {
            return Err(invalid(F, "compressed grain size out of range"));
        }
        self.cbuf.resize(clen as usize, 0);
        self.src.read_exact_at(&mut self.cbuf, off + 12)?;
        let mut out = self.dcache.take().map(|(_, v)| v).unwrap_or_default();
        out.clear();
        out.resize(self.grain as usize, 0);
        self.inflate.reset(true);
        let r = self
            .inflate
            .decompress(&self.cbuf, &mut out, flate2::FlushDecompress::Finish);
        if r.is_err() {
            return Err(invalid(F, "compressed grain does not inflate"));
        }
        // A grain shorter than a full grain (last one) reads as zero-padded.
        self.dcache = Some((off, out));
        Ok(())
    }
}

impl VirtualDisk for VmdkReader {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = clip(offset, len, self.size);
        let span = self.grain * self.h.gtes_per_gt as u64;
        let mut out = ExtentList::default();
        let mut pos = offset.min(end);
        while pos < end {
            let g = pos / self.grain;
            let n = (self.grain - pos % self.grain).min(end - pos);
            let kind = match self.map(g)? {
                Map::Zero => ExtentKind::Zero,
                _ => ExtentKind::Data,
            };
            // Skip a whole missing grain table at once.
            if kind == ExtentKind::Zero && pos / span * span == pos {
                let gdi = g / self.h.gtes_per_gt as u64;
                let page = gdi / GD_PAGE;
                if gdi < self.gd_entries {
                    let count = (self.gd_entries - page * GD_PAGE).min(GD_PAGE) as usize;
                    let gd_off = self.h.gd_offset * 512 + page * GD_PAGE * 4;
                    let t = self.gd.get(&*self.src, gd_off, count, EntryWidth::Le32)?;
                    if t.get((gdi % GD_PAGE) as usize).copied().unwrap_or(0) == 0 {
                        let n = span.min(end - pos);
                        out.push(pos, n, ExtentKind::Zero);
                        pos += n;
                        continue;
                    }
                }
            }
            out.push(pos, n, kind);
            pos += n;
        }
        Ok(out.v)
    }

    /// Plain grains and holes as the source stores them; compressed grains: `None`.
    fn stored_slices(&mut self, offset: u64, len: u64) -> Result<Option<Vec<StoredSlice>>> {
        let src = Arc::clone(&self.src);
        super::slices_mapped(&*src, self.size, self.grain, offset, len, |g| {
            Ok(match self.map(g)? {
                Map::Zero => Some(BlockMap::Zero),
                Map::Data(h) => Some(BlockMap::Data(h)),
                Map::Compressed(_) => None,
            })
        })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = clip(offset, buf.len() as u64, self.size);
        let valid = (end - offset.min(end)) as usize;
        buf[valid..].fill(0);
        let grain = self.grain;
        let mut pos = offset;
        let mut run: Option<(usize, u64, usize)> = None;
        while pos < end {
            let within = pos % grain;
            let n = (grain - within).min(end - pos) as usize;
            let b = (pos - offset) as usize;
            match self.map(pos / grain)? {
                Map::Data(host) => {
                    let h = host + within;
                    match &mut run {
                        Some((rb, ro, rl)) if *rb + *rl == b && *ro + *rl as u64 == h => *rl += n,
                        _ => {
                            if let Some((rb, ro, rl)) = run.take() {
                                read_or_zero(&*self.src, &mut buf[rb..rb + rl], ro)?;
                            }
                            run = Some((b, h, n));
                        }
                    }
                }
                m => {
                    if let Some((rb, ro, rl)) = run.take() {
                        read_or_zero(&*self.src, &mut buf[rb..rb + rl], ro)?;
                    }
                    if let Map::Compressed(off) = m {
                        self.decompress(off)?;
                        if let Some((_, d)) = &self.dcache {
                            let w = within as usize;
                            buf[b..b + n].copy_from_slice(&d[w..w + n]);
                        }
                    } else {
                        buf[b..b + n].fill(0);
                    }
                }
            }
            pos += n as u64;
        }
        if let Some((rb, ro, rl)) = run {
            read_or_zero(&*self.src, &mut buf[rb..rb + rl], ro)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_checks() {
        assert!(check_descriptor("createType=\"streamOptimized\"\nparentCID=ffffffff\n").is_ok());
        assert!(check_descriptor("createType=\"monolithicFlat\"\n").is_err());
        assert!(check_descriptor("createType=\"monolithicSparse\"\nparentCID=12345678\n").is_err());
        assert!(check_descriptor("parentFileNameHint=\"base.vmdk\"\n").is_err());
        let src: Arc<dyn ReadAt> = Arc::new(b"# Disk DescriptorFile\nversion=1\n".to_vec());
        assert!(matches!(
            VmdkReader::open(src),
            Err(crate::FormatError::Unsupported { .. })
        ));
    }
}
