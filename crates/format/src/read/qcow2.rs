//! qcow2 (versions 2 and 3) reader: L1 in memory, L2 tables through a bounded LRU cache,
//! zero clusters, compressed clusters (deflate as qemu writes it, or zstd).
//!
//! Refused: backing files, external data files, encryption, extended L2 entries (subclusters),
//! images marked corrupt, unknown incompatible features.

use super::{
    be32, be64, check_disk_size, clip, invalid, read_or_zero, unsupported, BlockMap, EntryWidth,
    ExtentList, TableCache,
};
use crate::io::{Extent, ExtentKind, ReadAt, StoredSlice, VirtualDisk};
use crate::Result;
use std::sync::Arc;

const F: &str = "qcow2";
/// qemu's limit on the L1 table (QCOW_MAX_L1_SIZE).
const MAX_L1_BYTES: u64 = 32 << 20;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;

/// Compression method of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), qemu's default.
    Zlib,
    /// zstd frames.
    Zstd,
}

/// What the reader needs from a qcow2 header (to be unified with `inspect`'s header struct).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Params {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub compression: Compression,
}

/// Parses and checks the header (first 4 KiB or less of the file) against `file_size`.
pub fn parse_header(h: &[u8], file_size: u64) -> Result<Qcow2Params> {
    if h.len() < 72 || &h[0..4] != b"QFI\xfb" {
        return Err(invalid(F, "bad magic or truncated header"));
    }
    let version = be32(h, 4);
    if version != 2 && version != 3 {
        return Err(unsupported(F, format!("version {version}")));
    }
    if be64(h, 8) != 0 {
        return Err(unsupported(F, "backing file"));
    }
    let cluster_bits = be32(h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(F, format!("cluster_bits {cluster_bits}")));
    }
    let size = be64(h, 24);
    check_disk_size(F, size)?;
    if be32(h, 32) != 0 {
        return Err(unsupported(F, "encryption"));
    }
    let l1_size = be32(h, 36);
    let l1_offset = be64(h, 40);
    let mut compression = Compression::Zlib;
    if version == 3 {
        if h.len() < 104 {
            return Err(invalid(F, "truncated v3 header"));
        }
        let incompat = be64(h, 72);
        let header_len = be32(h, 100) as usize;
        if incompat & 2 != 0 {
            return Err(invalid(F, "image is marked corrupt"));
        }
        if incompat & 4 != 0 {
            return Err(unsupported(F, "external data file"));
        }
        if incompat & 16 != 0 {
            return Err(unsupported(F, "extended L2 entries (subclusters)"));
        }
        if incompat & !0x0f != 0 {
            return Err(unsupported(
                F,
                format!("incompatible features {incompat:#x}"),
            ));
        }
        if incompat & 8 != 0 {
            if header_len < 105 || h.len() < 105 {
                return Err(invalid(F, "compression type bit without the field"));
            }
            compression = match h[104] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                t => return Err(unsupported(F, format!("compression type {t}"))),
            };
        }
    }
    let cs = 1u64 << cluster_bits;
    let per_l2 = cs / 8;
    let needed = size.div_ceil(cs).div_ceil(per_l2);
    if (l1_size as u64) < needed {
        return Err(invalid(F, "L1 table too small for the virtual size"));
    }
    if needed * 8 > MAX_L1_BYTES {
        return Err(unsupported(F, "L1 table larger than 32 MiB"));
    }
    if needed > 0 && (l1_offset & (cs - 1) != 0 || l1_offset.saturating_add(needed * 8) > file_size)
    {
        return Err(invalid(F, "L1 table outside the file"));
    }
    Ok(Qcow2Params {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_offset,
        compression,
    })
}

enum Map {
    Zero,
    Data(u64),
    Compressed { off: u64, len: usize },
}

/// Reader of qcow2 images.
pub struct Qcow2Reader {
    src: Arc<dyn ReadAt>,
    file_size: u64,
    p: Qcow2Params,
    l1: Vec<u64>,
    l2: TableCache,
    cbuf: Vec<u8>,
    /// Last decompressed cluster (L2 entry, bytes).
    dcache: Option<(u64, Vec<u8>)>,
    inflate: flate2::Decompress,
}

impl Qcow2Reader {
    /// Opens a qcow2 image.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<Qcow2Reader> {
        let file_size = src.size()?;
        let mut h = vec![0u8; 4096];
        read_or_zero(&*src, &mut h, 0)?;
        let h = &h[..(file_size.min(4096) as usize)];
        let p = parse_header(h, file_size)?;
        let cs = 1u64 << p.cluster_bits;
        let needed = p.size.div_ceil(cs).div_ceil(cs / 8) as usize;
        let mut raw = vec![0u8; needed * 8];
        src.read_exact_at(&mut raw, p.l1_offset)?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        for &e in &l1 {
            let off = e & OFFSET_MASK;
            if off != 0 && (off & (cs - 1) != 0 || off.saturating_add(cs) > file_size) {
                return Err(invalid(F, "L2 table outside the file"));
            }
        }
        Ok(Qcow2Reader {
            src,
            file_size,
            l2: TableCache::new(cs as usize),
            p,
            l1,
            cbuf: Vec::new(),
            dcache: None,
            inflate: flate2::Decompress::new(false),
        })
    }

    fn cs(&self) -> u64 {
        1u64 << self.p.cluster_bits
    }

    fn l2_entry(&mut self, cluster: u64) -> Result<u64> {
        let per_l2 = self.cs() / 8;
        let l1e = self
            .l1
            .get((cluster / per_l2) as usize)
            .copied()
            .unwrap_or(0);
        let l2off = l1e & OFFSET_MASK;
        if l2off == 0 {
            return Ok(0);
        }
        let t = self
            .l2
            .get(&*self.src, l2off, per_l2 as usize, EntryWidth::Be64)?;
        Ok(t.get((cluster % per_l2) as usize).copied().unwrap_or(0))
    }

    fn decode(&self, e: u64) -> Result<Map> {
        let cs = self.cs();
        if e & COMPRESSED != 0 {
            let cb = self.p.cluster_bits;
            let x = 62 - (cb - 8);
            let off = e & ((1u64 << x) - 1);
            let nsec = ((e >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
            let len = nsec * 512 - (off & 511);
            if off >= self.file_size {
                return Err(invalid(F, "compressed cluster outside the file"));
            }
            return Ok(Map::Compressed {
                off,
                len: len as usize,
            });
        }
        if self.p.version >= 3 && e & ZERO_FLAG != 0 {
            return Ok(Map::Zero);
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(Map::Zero);
        }
        if off & (cs - 1) != 0 || off >= self.file_size {
            return Err(invalid(F, "data cluster outside the file or misaligned"));
        }
        Ok(Map::Data(off))
    }

    fn decompress(&mut self, e: u64, off: u64, len: usize) -> Result<()> {
        if matches!(&self.dcache, Some((k, _)) if *k == e) {
            return Ok(());
        }
        let cs = self.cs() as usize;
        self.cbuf.resize(len, 0);
        read_or_zero(&*self.src, &mut self.cbuf, off)?;
        let mut out = match self.dcache.take() {
            Some((_, v)) => v,
            None => vec![0u8; cs],
        };
        out.resize(cs, 0);
        let ok = match self.p.compression {
            Compression::Zlib => {
                self.inflate.reset(false);
                let r =
                    self.inflate
                        .decompress(&self.cbuf, &mut out, flate2::FlushDecompress::Finish);
                r.is_ok() && self.inflate.total_out() == cs as u64
            }
            Compression::Zstd => zstd_fill(&self.cbuf, &mut out),
        };
        if !ok {
            return Err(invalid(
                F,
                "compressed cluster does not decompress to a full cluster",
            ));
        }
        self.dcache = Some((e, out));
        Ok(())
    }
}

/// Decodes zstd frames from `input` until `out` is full (as qemu does); false on error/short.
pub(crate) fn zstd_fill(mut input: &[u8], out: &mut [u8]) -> bool {
    use std::io::Read;
    let mut done = 0;
    while done < out.len() {
        let Ok(mut dec) = ruzstd::decoding::StreamingDecoder::new(&mut input) else {
            return false;
        };
        loop {
            match dec.read(&mut out[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) => return false,
            }
            if done == out.len() {
                return true;
            }
        }
    }
    true
}

impl VirtualDisk for Qcow2Reader {
    fn virtual_size(&self) -> u64 {
        self.p.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = clip(offset, len, self.p.size);
        let cs = self.cs();
        let per_l2 = cs / 8;
        let span = cs * per_l2;
        let mut out = ExtentList::default();
        let mut pos = offset.min(end);
        while pos < end {
            let l1e = self.l1.get((pos / span) as usize).copied().unwrap_or(0);
            if l1e & OFFSET_MASK == 0 {
                let n = (span - pos % span).min(end - pos);
                out.push(pos, n, ExtentKind::Zero);
                pos += n;
                continue;
            }
            let c = pos / cs;
            let n = (cs - pos % cs).min(end - pos);
            let e = self.l2_entry(c)?;
            let kind = match self.decode(e)? {
                Map::Zero => ExtentKind::Zero,
                _ => ExtentKind::Data,
            };
            out.push(pos, n, kind);
            pos += n;
        }
        Ok(out.v)
    }

    /// A cluster-aligned range whose clusters are all plain data clusters at consecutive host
    /// offsets is stored verbatim at the first one: ask the source about that file range.
    fn stored_chunk(&mut self, offset: u64, len: u64) -> Result<Option<Option<[u8; 32]>>> {
        let cs = self.cs();
        if len == 0 || !offset.is_multiple_of(cs) || offset.saturating_add(len) > self.p.size {
            return Ok(None);
        }
        let mut first = None;
        for (i, c) in (offset / cs..(offset + len).div_ceil(cs)).enumerate() {
            let e = self.l2_entry(c)?;
            match (self.decode(e)?, first) {
                (Map::Data(h), None) => first = Some(h),
                (Map::Data(h), Some(f)) if h == f + i as u64 * cs => {}
                _ => return Ok(None),
            }
        }
        Ok(first.and_then(|h| self.src.stored_chunk(h, len)))
    }

    /// Plain data clusters and holes as the source stores them; compressed ones: `None`.
    fn stored_slices(&mut self, offset: u64, len: u64) -> Result<Option<Vec<StoredSlice>>> {
        let src = Arc::clone(&self.src);
        super::slices_mapped(&*src, self.p.size, self.cs(), offset, len, |c| {
            let e = self.l2_entry(c)?;
            Ok(match self.decode(e)? {
                Map::Zero => Some(BlockMap::Zero),
                Map::Data(h) => Some(BlockMap::Data(h)),
                Map::Compressed { .. } => None,
            })
        })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.p.size;
        let cs = self.cs();
        let end = clip(offset, buf.len() as u64, size);
        let valid = (end - offset.min(end)) as usize;
        buf[valid..].fill(0);
        let mut pos = offset;
        let mut run: Option<(usize, u64, usize)> = None;
        while pos < end {
            let within = pos % cs;
            let n = (cs - within).min(end - pos) as usize;
            let b = (pos - offset) as usize;
            let e = self.l2_entry(pos / cs)?;
            match self.decode(e)? {
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
                    match m {
                        Map::Compressed { off, len } => {
                            self.decompress(e, off, len)?;
                            if let Some((_, d)) = &self.dcache {
                                let w = within as usize;
                                buf[b..b + n].copy_from_slice(&d[w..w + n]);
                            }
                        }
                        _ => buf[b..b + n].fill(0),
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

    fn header(version: u32) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&65536u64.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    #[test]
    fn refuses_backing_encryption_datafile() {
        let ok = header(3);
        assert!(parse_header(&ok, 1 << 20).is_ok());
        let mut b = ok.clone();
        b[15] = 1;
        assert!(matches!(
            parse_header(&b, 1 << 20),
            Err(crate::FormatError::Unsupported { .. })
        ));
        let mut e = ok.clone();
        e[35] = 1;
        assert!(matches!(
            parse_header(&e, 1 << 20),
            Err(crate::FormatError::Unsupported { .. })
        ));
        let mut d = ok.clone();
        d[79] = 4;
        assert!(matches!(
            parse_header(&d, 1 << 20),
            Err(crate::FormatError::Unsupported { .. })
        ));
        // L1 outside the file.
        assert!(parse_header(&ok, 1000).is_err());
    }
}
