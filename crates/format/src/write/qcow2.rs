//! qcow2 v3 writer (uncompressed or deflate-compressed), streaming with bounded memory.
//!
//! Layout: `[header][L1][refcount table]` form the header window, patched at the end. Then,
//! strictly appended: data clusters (or packed compressed clusters), each L2 table right after
//! the data it maps, and each refcount block as soon as the write position has left the range
//! of clusters it counts. Only one L2 table and one refcount block are in memory at a time.
//!
//! Allocated-but-zero clusters get the v3 zero flag; holes stay unallocated. Refcounts are
//! 16-bit; a host cluster shared by several compressed clusters counts each reference (as
//! `qemu-img check` expects). A compressed run never straddles two refcount blocks' ranges.

use super::{count_data_units, werr, Batch, Codec, FormatWriter, Unit, WriteOptions};
use crate::io::{ImageSink, VirtualDisk};
use crate::Result;

const F: &str = "qcow2";
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO_FLAG: u64 = 1;
const HEADER_LEN: usize = 112;

pub(crate) struct Qcow2Writer {
    vsize: u64,
    cb: u32,
    cs: u64,
    compress: Option<u32>,
    /// Entries per L2 table / refcounts per refcount block.
    l2e: u64,
    rbe: u64,
    l1: Vec<u64>,
    l1_clusters: u64,
    rt_clusters: u64,
    reftable: Vec<u64>,
    rb_idx: u64,
    rb: Vec<u16>,
    l2: Vec<u64>,
    l2_idx: u64,
    l2_dirty: bool,
    pos: u64,
    data_start: u64,
}

impl Qcow2Writer {
    pub fn new(disk: &mut dyn VirtualDisk, opts: &WriteOptions) -> Result<Qcow2Writer> {
        let cs = opts.cluster_size as u64;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(werr(F, format!("cluster size {cs}")));
        }
        let cb = cs.trailing_zeros();
        let vsize = disk.virtual_size();
        let l2e = cs / 8;
        let rbe = cs / 2;
        let n_clusters = vsize.div_ceil(cs);
        let l1_len = n_clusters.div_ceil(l2e);
        let l1_clusters = (l1_len * 8).div_ceil(cs).max(1);
        let data_ub = count_data_units(disk, cs)?;
        let data_ub = if opts.compress { data_ub * 2 } else { data_ub };
        // Upper bound of host clusters: header + L1 + data + L2 tables (+ padding before each).
        let fixed = 1 + l1_clusters + data_ub + 2 * l1_len + 2;
        let mut nrb = 1u64;
        let rt_clusters = loop {
            let rt_clusters = (nrb * 8).div_ceil(cs).max(1);
            let total = fixed + rt_clusters + 2 * nrb;
            let need = total.div_ceil(rbe);
            if need <= nrb {
                break rt_clusters;
            }
            nrb = need;
        };
        let data_start = (1 + l1_clusters + rt_clusters) * cs;
        let mut rb = vec![0u16; rbe as usize];
        for c in rb.iter_mut().take((data_start / cs) as usize) {
            *c = 1;
        }
        Ok(Qcow2Writer {
            vsize,
            cb,
            cs,
            compress: opts.compress.then_some(opts.compression_level.clamp(1, 9)),
            l2e,
            rbe,
            l1: vec![0; l1_len as usize],
            l1_clusters,
            rt_clusters,
            reftable: vec![0; (rt_clusters * cs / 8) as usize],
            rb_idx: 0,
            rb,
            l2: vec![0; l2e as usize],
            l2_idx: 0,
            l2_dirty: false,
            pos: 0,
            data_start,
        })
    }

    fn range_end(&self) -> u64 {
        (self.rb_idx + 1) * self.rbe * self.cs
    }

    fn pad_to(&mut self, align: u64, sink: &mut dyn ImageSink) -> Result<()> {
        let r = self.pos % align;
        if r != 0 {
            sink.write_zeros(align - r)?;
            self.pos += align - r;
        }
        Ok(())
    }

    fn account(&mut self, start: u64, len: u64) -> Result<()> {
        let base = self.rb_idx * self.rbe;
        for c in start / self.cs..=(start + len - 1) / self.cs {
            let slot = c
                .checked_sub(base)
                .and_then(|i| self.rb.get_mut(i as usize))
                .ok_or_else(|| werr(F, "internal: refcount outside the current block"))?;
            *slot = slot.saturating_add(1);
        }
        Ok(())
    }

    /// Writes the current refcount block at `pos` (cluster aligned, past its range).
    fn flush_rb(&mut self, sink: &mut dyn ImageSink) -> Result<()> {
        let bytes: Vec<u8> = self.rb.iter().flat_map(|c| c.to_be_bytes()).collect();
        let slot = self
            .reftable
            .get_mut(self.rb_idx as usize)
            .ok_or_else(|| werr(F, "internal: refcount table too small"))?;
        *slot = self.pos;
        self.rb_idx += 1;
        self.rb.fill(0);
        self.account(self.pos, self.cs)?;
        sink.write_all(&bytes)?;
        self.pos += self.cs;
        Ok(())
    }

    /// Reserves `len` bytes at the write position (after padding), accounting refcounts.
    fn alloc(&mut self, len: u64, aligned: bool, sink: &mut dyn ImageSink) -> Result<u64> {
        if aligned {
            self.pad_to(self.cs, sink)?;
        }
        let span = (self.pos + len).div_ceil(512) * 512 - self.pos;
        let end = self.range_end();
        if self.pos < end && self.pos + span > end {
            sink.write_zeros(end - self.pos)?;
            self.pos = end;
        }
        while self.pos >= self.range_end() {
            self.pad_to(self.cs, sink)?;
            self.flush_rb(sink)?;
        }
        let off = self.pos;
        self.account(off, (off + len).div_ceil(512) * 512 - off)?;
        Ok(off)
    }

    fn write(&mut self, data: &[u8], sink: &mut dyn ImageSink) -> Result<()> {
        sink.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn flush_l2(&mut self, sink: &mut dyn ImageSink) -> Result<()> {
        if !self.l2_dirty {
            return Ok(());
        }
        let off = self.alloc(self.cs, true, sink)?;
        let bytes: Vec<u8> = self.l2.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write(&bytes, sink)?;
        if let Some(e) = self.l1.get_mut(self.l2_idx as usize) {
            *e = off | COPIED;
        }
        self.l2_dirty = false;
        self.l2.fill(0);
        Ok(())
    }

    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&self.cb.to_be_bytes());
        h[24..32].copy_from_slice(&self.vsize.to_be_bytes());
        h[36..40].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
        h[40..48].copy_from_slice(&self.cs.to_be_bytes());
        h[48..56].copy_from_slice(&((1 + self.l1_clusters) * self.cs).to_be_bytes());
        h[56..60].copy_from_slice(&(self.rt_clusters as u32).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        h
    }
}

impl FormatWriter for Qcow2Writer {
    fn unit(&self) -> u64 {
        self.cs
    }
    fn codec(&self) -> Codec {
        match self.compress {
            Some(l) => Codec::QcowDeflate(l),
            None => Codec::None,
        }
    }
    fn virtual_size(&self) -> u64 {
        self.vsize
    }

    fn header_bytes(&self) -> u64 {
        self.data_start
    }

    fn begin(&mut self, sink: &mut dyn ImageSink) -> Result<()> {
        if sink.header_window() < self.data_start || sink.position() != 0 {
            return Err(werr(
                F,
                "sink header window smaller than header + L1 + refcount table",
            ));
        }
        if self.l1.len() as u64 > u32::MAX as u64 {
            return Err(werr(F, "disk too large for the cluster size"));
        }
        sink.write_zeros(self.data_start)?;
        self.pos = self.data_start;
        Ok(())
    }

    fn batch(&mut self, b: &Batch, sink: &mut dyn ImageSink) -> Result<()> {
        let x = 62 - (self.cb - 8);
        let cs = self.cs as usize;
        // Run of uncompressed clusters contiguous in `b.buf` and in the output, written in one
        // go: (buffer offset, length). `self.pos` already counts it.
        let mut run: Option<(usize, usize)> = None;
        fn flush(
            run: &mut Option<(usize, usize)>,
            b: &Batch,
            sink: &mut dyn ImageSink,
        ) -> Result<()> {
            if let Some((o, l)) = run.take() {
                sink.write_all(&b.buf[o..o + l])?;
            }
            Ok(())
        }
        for (i, &u) in b.units.iter().enumerate() {
            let c = b.first + i as u64;
            let j = c / self.l2e;
            if j != self.l2_idx {
                flush(&mut run, b, sink)?;
                self.flush_l2(sink)?;
                self.l2_idx = j;
            }
            let slot = (c % self.l2e) as usize;
            let entry = match u {
                Unit::Hole => continue,
                Unit::Zero => ZERO_FLAG,
                Unit::Raw(o) => {
                    // alloc writes nothing (no padding, no refcount block) in this case.
                    let silent =
                        self.pos & (self.cs - 1) == 0 && self.pos + self.cs <= self.range_end();
                    if !silent {
                        flush(&mut run, b, sink)?;
                    }
                    let off = self.alloc(self.cs, true, sink)?;
                    match &mut run {
                        Some((ro, rl)) if *ro + *rl == o => *rl += cs,
                        _ => {
                            flush(&mut run, b, sink)?;
                            run = Some((o, cs));
                        }
                    }
                    self.pos += self.cs;
                    off | COPIED
                }
                Unit::Comp(_, n) => {
                    flush(&mut run, b, sink)?;
                    let off = self.alloc(n as u64, false, sink)?;
                    self.write(super::unit_bytes(b, u), sink)?;
                    let field = (off + n as u64 - 1) / 512 - off / 512;
                    COMPRESSED | (field << x) | off
                }
            };
            self.l2[slot] = entry;
            self.l2_dirty = true;
        }
        flush(&mut run, b, sink)
    }

    fn finish(&mut self, sink: &mut dyn ImageSink) -> Result<Option<Vec<u8>>> {
        self.flush_l2(sink)?;
        self.pad_to(self.cs, sink)?;
        // Last refcount block(s): the final one counts itself.
        loop {
            if self.pos >= self.range_end() {
                self.flush_rb(sink)?;
                continue;
            }
            let off = self.pos;
            self.account(off, self.cs)?;
            let slot = self
                .reftable
                .get_mut(self.rb_idx as usize)
                .ok_or_else(|| werr(F, "internal: refcount table too small"))?;
            *slot = off;
            let bytes: Vec<u8> = self.rb.iter().flat_map(|c| c.to_be_bytes()).collect();
            self.write(&bytes, sink)?;
            break;
        }
        sink.patch(0, &self.header())?;
        let l1: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        if !l1.is_empty() {
            sink.patch(self.cs, &l1)?;
        }
        let rt: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        sink.patch((1 + self.l1_clusters) * self.cs, &rt)?;
        Ok(None)
    }
}
