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

use super::{
    count_data_units, werr, Batch, Codec, FormatWriter, StateReader, StateWriter, Unit,
    WriteOptions,
};
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
        header(
            self.cb,
            self.vsize,
            self.l1.len() as u64,
            self.l1_clusters,
            self.rt_clusters,
        )
    }
}

/// The v3 header of both layouts: L1 at cluster 1, then the refcount table (16-bit refcounts).
/// The size is rounded up to whole 512-byte sectors, as qemu reads it rounded down (the bytes
/// past the disk's end in its last cluster are zeros).
fn header(cb: u32, vsize: u64, l1_len: u64, l1_clusters: u64, rt_clusters: u64) -> Vec<u8> {
    let cs = 1u64 << cb;
    let vsize = vsize.next_multiple_of(512);
    let mut h = vec![0u8; HEADER_LEN];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&cb.to_be_bytes());
    h[24..32].copy_from_slice(&vsize.to_be_bytes());
    h[36..40].copy_from_slice(&(l1_len as u32).to_be_bytes());
    h[40..48].copy_from_slice(&cs.to_be_bytes());
    h[48..56].copy_from_slice(&((1 + l1_clusters) * cs).to_be_bytes());
    h[56..60].copy_from_slice(&(rt_clusters as u32).to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&(HEADER_LEN as u32).to_be_bytes());
    h
}

/// A qcow2 v3 image laid out in *slots*: all metadata first, then the disk's allocated slots
/// (fixed-size, slot-aligned ranges of the virtual disk, in order), each copied whole and
/// unchanged at a slot-aligned offset of the file. Built from the allocation map alone, so the
/// metadata can be written before any data, and a slot's bytes in the file are exactly the
/// disk's bytes (a store of fixed-size chunks can reference the disk's own chunks).
#[derive(Debug, Clone)]
pub struct SlottedQcow2 {
    /// Header, L1 table, refcount table and blocks, L2 tables, zero-padded to a multiple of
    /// the slot size: the first `metadata.len()` bytes of the file.
    pub metadata: Vec<u8>,
    vsize: u64,
    cs: u64,
    slot: u64,
}

impl SlottedQcow2 {
    /// Lays out a disk of `vsize` bytes whose allocated slots are `allocated` (slot indices,
    /// strictly increasing), with `cluster_size` clusters and `slot`-byte slots (a multiple of
    /// the cluster size dividing the range of one L2 table). The metadata is padded to at
    /// least `min_len` bytes; `None` when it would exceed `max_len` (the caller then uses the
    /// streaming writer, whose memory does not grow with the disk).
    pub fn new(
        vsize: u64,
        cluster_size: u64,
        slot: u64,
        allocated: &[u64],
        min_len: u64,
        max_len: u64,
    ) -> Result<Option<SlottedQcow2>> {
        let cs = cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(werr(F, format!("cluster size {cs}")));
        }
        let l2e = cs / 8;
        if slot == 0 || !slot.is_multiple_of(cs) || !(l2e * cs).is_multiple_of(slot) {
            return Err(werr(F, format!("slot size {slot} for {cs}-byte clusters")));
        }
        let n_slots = vsize.div_ceil(slot);
        if allocated.windows(2).any(|w| w[0] >= w[1]) || allocated.last() >= Some(&n_slots) {
            return Err(werr(F, "allocated slots out of order or past the disk"));
        }
        let cb = cs.trailing_zeros();
        let rbe = cs / 2;
        let n_clusters = vsize.div_ceil(cs);
        let l1_len = n_clusters.div_ceil(l2e);
        if l1_len > u32::MAX as u64 {
            return Err(werr(F, "disk too large for the cluster size"));
        }
        let l1_clusters = (l1_len * 8).div_ceil(cs).max(1);
        let per_l2 = l2e * cs / slot;
        let mut l2_of: Vec<u64> = allocated.iter().map(|k| k / per_l2).collect();
        l2_of.dedup();
        let n_l2 = l2_of.len() as u64;
        let data_clusters = allocated.len() as u64 * (slot / cs);
        let mut nrb = 1u64;
        let (rt_clusters, meta_len) = loop {
            let rt_clusters = (nrb * 8).div_ceil(cs).max(1);
            let meta = (1 + l1_clusters + rt_clusters + nrb + n_l2) * cs;
            let meta_len = meta.max(min_len).next_multiple_of(slot);
            let need = (meta_len / cs + data_clusters).div_ceil(rbe);
            if need <= nrb {
                break (rt_clusters, meta_len);
            }
            nrb = need;
        };
        if meta_len > max_len {
            return Ok(None);
        }
        let len = usize::try_from(meta_len).map_err(|_| werr(F, "metadata too large"))?;
        let mut m = vec![0u8; len];
        m[..HEADER_LEN].copy_from_slice(&header(cb, vsize, l1_len, l1_clusters, rt_clusters));
        let rt_at = (1 + l1_clusters) * cs;
        let rb_at = rt_at + rt_clusters * cs;
        let l2_at = rb_at + nrb * cs;
        let put = |m: &mut [u8], at: u64, v: &[u8]| {
            m[at as usize..at as usize + v.len()].copy_from_slice(v);
        };
        // Refcounts: every metadata cluster and every data cluster is used once.
        let used = (l2_at + n_l2 * cs) / cs;
        let data_first = meta_len / cs;
        for b in 0..nrb {
            put(&mut m, rt_at + b * 8, &(rb_at + b * cs).to_be_bytes());
        }
        let count = |m: &mut [u8], c: u64| {
            put(m, rb_at + c * 2, &1u16.to_be_bytes());
        };
        for c in 0..used {
            count(&mut m, c);
        }
        for (i, &k) in allocated.iter().enumerate() {
            let first = data_first + i as u64 * (slot / cs);
            for c in first..first + slot_clusters(vsize, cs, slot, k) {
                count(&mut m, c);
            }
        }
        // L1 and L2: slot `k`, the `i`-th allocated one, holds virtual clusters
        // `k * slot / cs ..` at file cluster `data_first + i * slot / cs ..`.
        let mut l2_index = 0u64;
        let mut current = None;
        for (i, &k) in allocated.iter().enumerate() {
            let j = k / per_l2;
            if current != Some(j) {
                current = Some(j);
                let at = l2_at + l2_index * cs;
                l2_index += 1;
                put(&mut m, cs + j * 8, &(at | COPIED).to_be_bytes());
            }
            let table = l2_at + (l2_index - 1) * cs;
            let first_virtual = k * (slot / cs);
            let first_host = data_first + i as u64 * (slot / cs);
            for d in 0..slot_clusters(vsize, cs, slot, k) {
                let entry = ((first_host + d) * cs) | COPIED;
                put(
                    &mut m,
                    table + ((first_virtual + d) % l2e) * 8,
                    &entry.to_be_bytes(),
                );
            }
        }
        Ok(Some(SlottedQcow2 {
            metadata: m,
            vsize,
            cs,
            slot,
        }))
    }

    /// Bytes of slot `k` in the file: the slot's part of the disk rounded up to whole
    /// clusters (less than the slot size only for the disk's last slot).
    pub fn data_len(&self, k: u64) -> u64 {
        slot_clusters(self.vsize, self.cs, self.slot, k) * self.cs
    }
}

/// Clusters of slot `k` that lie within the disk.
fn slot_clusters(vsize: u64, cs: u64, slot: u64, k: u64) -> u64 {
    (slot / cs).min(vsize.div_ceil(cs).saturating_sub(k * (slot / cs)))
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
        self.vsize.next_multiple_of(512)
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

    fn save(&self) -> Option<Vec<u8>> {
        let mut s = StateWriter(Vec::new());
        s.u64(self.pos)
            .u64(self.rb_idx)
            .u64(self.l2_idx)
            .u64(u64::from(self.l2_dirty))
            .u64s(&self.l1)
            .u64s(&self.reftable)
            .u16s(&self.rb)
            .u64s(&self.l2);
        Some(s.0)
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, F);
        self.pos = r.u64()?;
        self.rb_idx = r.u64()?;
        self.l2_idx = r.u64()?;
        self.l2_dirty = r.u64()? != 0;
        r.u64s(&mut self.l1)?;
        r.u64s(&mut self.reftable)?;
        r.u16s(&mut self.rb)?;
        r.u64s(&mut self.l2)?;
        r.end()
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
