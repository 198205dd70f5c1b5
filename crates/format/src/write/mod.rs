//! Streaming writers: a `VirtualDisk` turned into an image file written front to back into an
//! `ImageSink`; only the header window (headers, L1/BAT, refcount table) is patched at the end,
//! so the sink can be a multipart upload.
//!
//! Outputs: raw (holes via `write_zeros`), raw + allocation bitmap, qcow2 v3 (optionally
//! compressed with deflate), VHD dynamic and fixed, VMDK streamOptimized (always compressed).
//!
//! ## Pipeline
//! A reader thread walks the disk in *units* (the output's cluster / grain / block), skips
//! what `extents()` says is a hole without reading it, and reads the rest in batches of a few
//! MiB. Worker threads (all cores when compressing) detect all-zero units word-wise and
//! compress; the calling thread writes batches to the sink strictly in order. A fixed number
//! of batches is in flight (their buffers are recycled), so memory is bounded (about 32 MiB
//! at most) whatever the image size.
//!
//! ## Allocation bitmap format (`OutputFormat::RawWithBitmap`, [`AllocationBitmap`])
//! A small little-endian header followed by the bits:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `OIMSABM1` |
//! | 8 | 4 | version, `1` |
//! | 12 | 4 | `granularity_log2` (16: one bit per 64 KiB) |
//! | 16 | 8 | virtual size in bytes |
//! | 24 | 8 | number of bits `n = ceil(virtual_size / granularity)` |
//! | 32 | `ceil(n / 8)` | bits, LSB first: bit `i` of byte `i / 8` is `(byte >> (i % 8)) & 1` |
//!
//! Bit `i` set means `[i * g, (i + 1) * g)` of the raw output may hold non-zero bytes; clear
//! means it is all zeros (a consumer may skip it).

use crate::io::{Extent, ExtentKind, ImageSink, StoredSlice, VirtualDisk};
use crate::{FormatError, Result};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{mpsc, Arc, Mutex};

mod qcow2;
mod raw;
mod vhd;
mod vmdk;

pub use qcow2::SlottedQcow2;

/// Output formats of [`write_image`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// Raw disk bytes (zeros written as holes when the sink can).
    Raw,
    /// Raw disk bytes plus an allocation bitmap returned in `WriteReport::bitmap`.
    RawWithBitmap,
    /// qcow2 version 3 (compat 1.1); compressed with deflate when `WriteOptions::compress`.
    Qcow2,
    /// VHD dynamic (sparse) disk, 2 MiB blocks.
    Vhd,
    /// VHD fixed disk (raw bytes + footer).
    VhdFixed,
    /// VMDK streamOptimized (deflate-compressed grains with markers), as VMware/ovftool take.
    VmdkStream,
}

impl OutputFormat {
    /// Parses `raw`, `raw+bitmap`, `qcow2`, `vhd`/`vpc`, `vhd-fixed`, `vmdk`/`vmdk-stream`.
    pub fn parse(s: &str) -> Option<OutputFormat> {
        Some(match s.to_ascii_lowercase().as_str() {
            "raw" => OutputFormat::Raw,
            "raw+bitmap" | "rawbitmap" => OutputFormat::RawWithBitmap,
            "qcow2" => OutputFormat::Qcow2,
            "vhd" | "vpc" => OutputFormat::Vhd,
            "vhd-fixed" | "vhdfixed" => OutputFormat::VhdFixed,
            "vmdk" | "vmdk-stream" | "streamoptimized" => OutputFormat::VmdkStream,
            _ => return None,
        })
    }
}

/// Options of [`write_image`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Compress (qcow2). VMDK streamOptimized is always compressed.
    pub compress: bool,
    /// Deflate level 1..=9.
    pub compression_level: u32,
    /// qcow2 cluster size (power of two, 512 B..2 MiB).
    pub cluster_size: u32,
    /// Worker threads; 0 = all cores when compressing, 1 otherwise (reader + writer threads).
    pub threads: usize,
    /// Granularity of the allocation bitmap, log2 bytes (12..=24).
    pub bitmap_granularity_log2: u32,
    /// File name written in the VMDK descriptor's extent line.
    pub vmdk_extent_name: String,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            compress: false,
            compression_level: 6,
            cluster_size: 65536,
            threads: 0,
            bitmap_granularity_log2: 16,
            vmdk_extent_name: "disk.vmdk".into(),
        }
    }
}

/// What [`write_image`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Virtual size of the disk written (VHD and qcow2 round it up to 512 bytes).
    pub virtual_size: u64,
    /// Size of the output in bytes.
    pub output_size: u64,
    /// Virtual bytes stored as data (non-zero units).
    pub data_bytes: u64,
    /// Virtual bytes of allocated-but-zero units that were not stored.
    pub zero_bytes_skipped: u64,
    /// The allocation bitmap (`OutputFormat::RawWithBitmap` only), see the module docs.
    pub bitmap: Option<Vec<u8>>,
}

fn make_writer(
    disk: &mut dyn VirtualDisk,
    fmt: OutputFormat,
    opts: &WriteOptions,
) -> Result<Box<dyn FormatWriter>> {
    let vsize = disk.virtual_size();
    Ok(match fmt {
        OutputFormat::Raw => Box::new(raw::RawWriter::new(vsize, None, false)?),
        OutputFormat::RawWithBitmap => Box::new(raw::RawWriter::new(
            vsize,
            Some(opts.bitmap_granularity_log2),
            false,
        )?),
        OutputFormat::VhdFixed => Box::new(raw::RawWriter::new(vsize, None, true)?),
        OutputFormat::Qcow2 => Box::new(qcow2::Qcow2Writer::new(disk, opts)?),
        OutputFormat::Vhd => Box::new(vhd::VhdDynWriter::new(vsize)?),
        OutputFormat::VmdkStream => Box::new(vmdk::VmdkStreamWriter::new(vsize, opts)?),
    })
}

/// Writes `disk` as `fmt` into `sink`, calling `progress` with the virtual bytes done.
pub fn write_image(
    disk: &mut dyn VirtualDisk,
    fmt: OutputFormat,
    opts: &WriteOptions,
    sink: &mut dyn ImageSink,
    progress: &mut dyn FnMut(u64),
) -> Result<WriteReport> {
    write_image_resumable(disk, fmt, opts, sink, progress, None, None)
}

/// A point an interrupted [`write_image_resumable`] can continue from, given to its checkpoint
/// callback once everything before it is durable in the sink ([`ImageSink::seal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteCheckpoint {
    /// First unit (the output's cluster, block or grain) not written yet.
    pub next_unit: u64,
    /// Output bytes written (and sealed) before it.
    pub position: u64,
    /// Virtual bytes before it.
    pub virtual_done: u64,
    /// The format writer's state there (opaque).
    pub state: Vec<u8>,
}

/// Called at each checkpoint; an error stops the write.
pub type CheckpointFn<'a> = &'a mut dyn FnMut(&WriteCheckpoint) -> Result<()>;

/// [`write_image`] that can stop and continue. With `checkpoints = Some((every, f))`, after
/// the batch that takes the output `every` bytes past the last checkpoint, the sink is asked to
/// seal what was written, and when it does, `f` gets a [`WriteCheckpoint`] (formats that cannot
/// resume, raw and bitmap outputs, never checkpoint). With `resume = Some(cp)`, the write
/// continues from `cp` instead of starting: the sink must hold, and be positioned at, exactly
/// the first `cp.position` bytes of the interrupted write (its header window as it was, since
/// `finish` patches it); `disk`, `fmt` and `opts` must be the same. The output is then byte for
/// byte what one uninterrupted write gives (the VMDK descriptor's random CID aside, which the
/// restored header window keeps).
pub fn write_image_resumable(
    disk: &mut dyn VirtualDisk,
    fmt: OutputFormat,
    opts: &WriteOptions,
    sink: &mut dyn ImageSink,
    progress: &mut dyn FnMut(u64),
    resume: Option<&WriteCheckpoint>,
    mut checkpoints: Option<(u64, CheckpointFn<'_>)>,
) -> Result<WriteReport> {
    let vsize = disk.virtual_size();
    let mut w = make_writer(disk, fmt, opts)?;
    // Uncompressed outputs: 1 = the reader thread also does zero detection, this thread
    // writes (read and write overlap). Compression uses all cores.
    let threads = match (opts.threads, w.codec()) {
        (0, Codec::None) => 1,
        (0, _) => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        (n, _) => n,
    };
    let first_unit = match resume {
        None => {
            sink.reserve_header(w.header_bytes())?;
            w.begin(sink)?;
            0
        }
        Some(cp) => {
            if sink.position() != cp.position {
                return Err(werr(
                    "writer",
                    "the sink is not where the checkpoint was taken",
                ));
            }
            w.restore(&cp.state)?;
            cp.next_unit
        }
    };
    let mut report = WriteReport {
        virtual_size: vsize,
        ..Default::default()
    };
    let mut last_checkpoint = sink.position();
    let unit = w.unit();
    let want_slices = sink.wants_slices() && w.writes_slices();
    run_pipeline(
        disk,
        (unit, want_slices),
        w.codec(),
        threads,
        first_unit,
        &mut |b: &Batch| {
            w.batch(b, sink)?;
            for u in &b.units {
                match u {
                    Unit::Hole => {}
                    Unit::Zero => report.zero_bytes_skipped += b.unit,
                    Unit::Raw(_) | Unit::Comp(..) => report.data_bytes += b.unit,
                }
            }
            let next_unit = b.first + b.units.len() as u64;
            let virtual_done = (next_unit * b.unit).min(vsize);
            progress(virtual_done);
            if let Some((every, f)) = &mut checkpoints {
                let position = sink.position();
                if position >= last_checkpoint.saturating_add(*every) {
                    if let Some(state) = w.save() {
                        if sink.seal()? {
                            last_checkpoint = position;
                            f(&WriteCheckpoint {
                                next_unit,
                                position,
                                virtual_done,
                                state,
                            })?;
                        }
                    }
                }
            }
            Ok(())
        },
    )?;
    report.bitmap = w.finish(sink)?;
    report.output_size = sink.position();
    report.virtual_size = w.virtual_size();
    report.data_bytes = report.data_bytes.min(report.virtual_size);
    sink.finish()?;
    Ok(report)
}

/// Computes the allocation bitmap of `disk` (see the module docs) without writing the raw
/// bytes anywhere: holes from `extents()`, then zero detection of the allocated ranges.
pub fn write_bitmap(disk: &mut dyn VirtualDisk, granularity_log2: u32) -> Result<Vec<u8>> {
    let mut bm = AllocationBitmap::new(disk.virtual_size(), granularity_log2)?;
    let unit = bm.granularity();
    run_pipeline(disk, (unit, false), Codec::None, 0, 0, &mut |b: &Batch| {
        for (i, u) in b.units.iter().enumerate() {
            if matches!(u, Unit::Raw(_)) {
                bm.set(b.first + i as u64);
            }
        }
        Ok(())
    })?;
    Ok(bm.to_bytes())
}

/// An allocation bitmap (format in the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationBitmap {
    /// log2 of the bytes per bit.
    pub granularity_log2: u32,
    /// Virtual size covered.
    pub virtual_size: u64,
    bits: Vec<u8>,
}

const BITMAP_MAGIC: &[u8; 8] = b"OIMSABM1";

impl AllocationBitmap {
    /// An all-clear bitmap.
    pub fn new(virtual_size: u64, granularity_log2: u32) -> Result<AllocationBitmap> {
        if !(12..=24).contains(&granularity_log2) {
            return Err(FormatError::Unsupported {
                format: "bitmap",
                reason: format!("granularity 2^{granularity_log2}"),
            });
        }
        let n = virtual_size.div_ceil(1 << granularity_log2);
        Ok(AllocationBitmap {
            granularity_log2,
            virtual_size,
            bits: vec![0u8; n.div_ceil(8) as usize],
        })
    }
    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_log2
    }
    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.virtual_size.div_ceil(self.granularity())
    }
    /// Whether the bitmap covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.virtual_size == 0
    }
    /// Marks unit `i` allocated.
    pub fn set(&mut self, i: u64) {
        if let Some(b) = self.bits.get_mut((i / 8) as usize) {
            *b |= 1 << (i % 8);
        }
    }
    /// Whether unit `i` is allocated.
    pub fn get(&self, i: u64) -> bool {
        self.bits
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
    /// Serializes header + bits.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.bits.len());
        v.extend_from_slice(BITMAP_MAGIC);
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&self.granularity_log2.to_le_bytes());
        v.extend_from_slice(&self.virtual_size.to_le_bytes());
        v.extend_from_slice(&self.len().to_le_bytes());
        v.extend_from_slice(&self.bits);
        v
    }
    /// Parses what `to_bytes` produced.
    pub fn from_bytes(b: &[u8]) -> Result<AllocationBitmap> {
        let bad = |r: &str| FormatError::Invalid {
            format: "bitmap",
            reason: r.into(),
        };
        if b.len() < 32 || &b[0..8] != BITMAP_MAGIC {
            return Err(bad("bad magic"));
        }
        let version = crate::read::le32(b, 8);
        let g = crate::read::le32(b, 12);
        let vs = crate::read::le64(b, 16);
        let n = crate::read::le64(b, 24);
        if version != 1 {
            return Err(bad("unknown version"));
        }
        let mut bm = AllocationBitmap::new(vs, g)?;
        if n != bm.len() || (b.len() - 32) as u64 != n.div_ceil(8) {
            return Err(bad("length mismatch"));
        }
        bm.bits.copy_from_slice(&b[32..]);
        Ok(bm)
    }
}

/// How the workers transform allocated units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// Zero detection only.
    None,
    /// Raw deflate with a 4 KiB window (what qemu's qcow2 decompressor accepts).
    QcowDeflate(u32),
    /// zlib-wrapped deflate (VMDK grains).
    Zlib(u32),
}

/// One unit of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Unallocated in the source: never read.
    Hole,
    /// Allocated but all zeros.
    Zero,
    /// Data at this offset of `Batch::buf` (a full unit, zero-padded past the disk end).
    Raw(usize),
    /// Compressed data: range of `Batch::cbuf`.
    Comp(usize, usize),
}

/// A run of consecutive units, as read and transformed.
pub(crate) struct Batch {
    pub first: u64,
    pub unit: u64,
    pub units: Vec<Unit>,
    pub buf: Vec<u8>,
    pub cbuf: Vec<u8>,
    /// Per unit, where the disk holds its bytes in a chunk store (only when the sink wants
    /// them, see [`ImageSink::wants_slices`]; empty otherwise).
    pub slices: Vec<Option<Vec<StoredSlice>>>,
}

/// What a format writer implements; the driver feeds it batches in order.
pub(crate) trait FormatWriter {
    fn unit(&self) -> u64;
    fn codec(&self) -> Codec;
    fn virtual_size(&self) -> u64;
    fn begin(&mut self, sink: &mut dyn ImageSink) -> Result<()>;
    /// Leading bytes of the output patched by `finish` (the header window `begin` needs).
    fn header_bytes(&self) -> u64 {
        0
    }
    fn batch(&mut self, b: &Batch, sink: &mut dyn ImageSink) -> Result<()>;
    /// Writes the tail and patches the header window; may return a side output (bitmap).
    fn finish(&mut self, sink: &mut dyn ImageSink) -> Result<Option<Vec<u8>>>;
    /// Whether the writer hands units to the sink with their slices ([`write_unit`]): only
    /// then does the pipeline ask the disk for them. Default: `false`.
    fn writes_slices(&self) -> bool {
        false
    }
    /// The writer's state between two batches: with it, a writer made the same way continues
    /// ([`FormatWriter::restore`]) exactly as this one would. `None`: cannot resume.
    fn save(&self) -> Option<Vec<u8>> {
        None
    }
    /// Takes the state [`FormatWriter::save`] gave, instead of `begin`.
    fn restore(&mut self, _state: &[u8]) -> Result<()> {
        Err(werr("writer", "this output format cannot resume"))
    }
}

/// Little-endian encoding of a writer's state ([`FormatWriter::save`]): fixed fields, then
/// length-prefixed arrays.
pub(crate) struct StateWriter(pub Vec<u8>);

impl StateWriter {
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64s(&mut self, v: &[u64]) -> &mut Self {
        self.u64(v.len() as u64);
        for x in v {
            self.u64(*x);
        }
        self
    }
    pub fn u32s(&mut self, v: &[u32]) -> &mut Self {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        self
    }
    pub fn u16s(&mut self, v: &[u16]) -> &mut Self {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
}

/// Reads what a [`StateWriter`] wrote; every array must have the length the writer has.
pub(crate) struct StateReader<'a> {
    b: &'a [u8],
    f: &'static str,
}

impl<'a> StateReader<'a> {
    pub fn new(b: &'a [u8], f: &'static str) -> Self {
        StateReader { b, f }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(werr(self.f, "saved writer state is truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn len(&mut self, want: usize) -> Result<usize> {
        let n = self.u64()?;
        if n != want as u64 {
            return Err(werr(self.f, "saved writer state is for another disk"));
        }
        Ok(want)
    }
    pub fn u64s(&mut self, out: &mut [u64]) -> Result<()> {
        let n = self.len(out.len())?;
        let b = self.take(n * 8)?;
        for (o, c) in out.iter_mut().zip(b.chunks_exact(8)) {
            *o = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
        Ok(())
    }
    pub fn u32s(&mut self, out: &mut [u32]) -> Result<()> {
        let n = self.len(out.len())?;
        let b = self.take(n * 4)?;
        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *o = u32::from_le_bytes(c.try_into().unwrap_or([0; 4]));
        }
        Ok(())
    }
    pub fn u16s(&mut self, out: &mut [u16]) -> Result<()> {
        let n = self.len(out.len())?;
        let b = self.take(n * 2)?;
        for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
            *o = u16::from_le_bytes(c.try_into().unwrap_or([0; 2]));
        }
        Ok(())
    }
    pub fn bytes(&mut self, out: &mut [u8]) -> Result<()> {
        let n = self.len(out.len())?;
        out.copy_from_slice(self.take(n)?);
        Ok(())
    }
    pub fn end(&self) -> Result<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(werr(self.f, "saved writer state has trailing bytes"))
        }
    }
}

/// Whether `b` is all zeros (OR-folds 256-byte chunks: vectorized, early exit per chunk).
pub fn is_zero(b: &[u8]) -> bool {
    let mut it = b.chunks_exact(256);
    for c in &mut it {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    it.remainder().iter().all(|&x| x == 0)
}

/// Walks `extents()` in windows, answering "does `[s, e)` touch a Data extent?".
struct ExtentCursor {
    list: VecDeque<Extent>,
    fetched_to: u64,
    vsize: u64,
}

const EXTENT_WINDOW: u64 = 1 << 30;

impl ExtentCursor {
    /// A cursor for queries at or after `from`.
    fn new(vsize: u64, from: u64) -> ExtentCursor {
        ExtentCursor {
            list: VecDeque::new(),
            fetched_to: from.min(vsize),
            vsize,
        }
    }
    fn has_data(&mut self, disk: &mut dyn VirtualDisk, s: u64, e: u64) -> Result<bool> {
        let e = e.min(self.vsize);
        while self.fetched_to < e {
            let len = EXTENT_WINDOW.max(e - self.fetched_to);
            let got = disk.extents(self.fetched_to, len)?;
            let next = self.fetched_to.saturating_add(len).min(self.vsize);
            // Anything the reader failed to describe is treated as data.
            let mut pos = self.fetched_to;
            for x in got {
                if x.offset > pos {
                    self.list.push_back(Extent {
                        offset: pos,
                        len: x.offset - pos,
                        kind: ExtentKind::Data,
                    });
                }
                pos = pos.max(x.offset + x.len);
                self.list.push_back(x);
            }
            if pos < next {
                self.list.push_back(Extent {
                    offset: pos,
                    len: next - pos,
                    kind: ExtentKind::Data,
                });
            }
            self.fetched_to = next;
        }
        while self.list.front().is_some_and(|x| x.offset + x.len <= s) {
            self.list.pop_front();
        }
        Ok(self
            .list
            .iter()
            .take_while(|x| x.offset < e)
            .any(|x| x.kind == ExtentKind::Data))
    }
}

/// Counts units touching Data extents (an upper bound of what a writer will store).
pub(crate) fn count_data_units(disk: &mut dyn VirtualDisk, unit: u64) -> Result<u64> {
    let vsize = disk.virtual_size();
    let mut n = 0u64;
    let mut pos = 0u64;
    let mut last_counted: Option<u64> = None;
    while pos < vsize {
        let ext = disk.extents(pos, EXTENT_WINDOW)?;
        let next = pos.saturating_add(EXTENT_WINDOW).min(vsize);
        for x in ext
            .iter()
            .filter(|x| x.kind == ExtentKind::Data && x.len > 0)
        {
            let mut a = x.offset / unit;
            let b = (x.offset + x.len - 1) / unit;
            if last_counted == Some(a) {
                a += 1;
            }
            if b >= a {
                n += b - a + 1;
            }
            last_counted = Some(b);
        }
        pos = next;
    }
    Ok(n)
}

/// Batch limits: bytes of data read per batch, units per batch.
const BATCH_BYTES: usize = 2 << 20;
const BATCH_BYTES_COMPRESSED: usize = 2 << 20;
const BATCH_MAX_UNITS: usize = 1 << 16;

fn produce(
    disk: &mut dyn VirtualDisk,
    cur: &mut ExtentCursor,
    (unit, want_slices): (u64, bool),
    first: u64,
    max_bytes: usize,
    mut b: Batch,
) -> Result<Batch> {
    let vsize = disk.virtual_size();
    let total = vsize.div_ceil(unit);
    let us = unit as usize;
    let cap = max_bytes.max(us);
    if b.buf.len() < cap {
        b.buf.resize(cap, 0);
    }
    b.first = first;
    b.unit = unit;
    b.units.clear();
    b.cbuf.clear();
    b.slices.clear();
    let mut used = 0usize;
    // Pending read: (virtual offset, buffer offset, len).
    let mut pend: Option<(u64, usize, usize)> = None;
    let mut u = first;
    while u < total && b.units.len() < BATCH_MAX_UNITS && used + us <= cap {
        let s = u * unit;
        if cur.has_data(disk, s, s + unit)? {
            b.units.push(Unit::Raw(used));
            if want_slices {
                b.slices.push(unit_slices(disk, s, unit)?);
            }
            match &mut pend {
                Some((_, _, l)) => *l += us,
                None => pend = Some((s, used, us)),
            }
            used += us;
        } else {
            if let Some((vo, bo, l)) = pend.take() {
                disk.read_at(vo, &mut b.buf[bo..bo + l])?;
            }
            b.units.push(Unit::Hole);
            if want_slices {
                b.slices.push(None);
            }
        }
        u += 1;
    }
    if let Some((vo, bo, l)) = pend.take() {
        disk.read_at(vo, &mut b.buf[bo..bo + l])?;
    }
    Ok(b)
}

/// Where the disk holds unit `[s, s + unit)` (zeros past its end) in a chunk store.
fn unit_slices(disk: &mut dyn VirtualDisk, s: u64, unit: u64) -> Result<Option<Vec<StoredSlice>>> {
    let inside = unit.min(disk.virtual_size().saturating_sub(s));
    let Some(mut v) = disk.stored_slices(s, inside)? else {
        return Ok(None);
    };
    if inside < unit {
        StoredSlice::push(
            &mut v,
            StoredSlice::Zero {
                len: (unit - inside) as u32,
            },
        );
    }
    Ok(Some(v))
}

/// Writes the bytes of unit `i` of `b` (Raw or Comp), with the unit's slices when known.
pub(crate) fn write_unit(sink: &mut dyn ImageSink, b: &Batch, i: usize) -> Result<()> {
    let u = b.units[i];
    match (u, b.slices.get(i).and_then(Option::as_deref)) {
        (Unit::Raw(_), Some(slices)) => sink.write_sliced(unit_bytes(b, u), slices)?,
        _ => sink.write_all(unit_bytes(b, u))?,
    }
    Ok(())
}

/// Per-worker compressor state.
struct Compressor {
    codec: Codec,
    z: Option<flate2::Compress>,
    /// Level-1 compressor for the incompressibility probe (same window as `z`).
    probe: Option<flate2::Compress>,
    /// Level-0 (stored blocks) zlib compressor: VMDK grains that deflate can't shrink.
    store: Option<flate2::Compress>,
    scratch: Vec<u8>,
}

/// Bytes of a unit deflated at level 1 to probe whether it is worth compressing.
const PROBE_BYTES: usize = 8192;
/// Order-0 entropy (bits per byte) above which a unit whose probe didn't shrink is stored
/// as is. Uniformly random 64 KiB measure ~7.997.
const INCOMPRESSIBLE_BITS: f64 = 7.99;

/// Shannon entropy of the byte histogram of `data`, in bits per byte.
pub(crate) fn byte_entropy(data: &[u8]) -> f64 {
    let mut h = [[0u32; 256]; 4];
    let mut it = data.chunks_exact(4);
    for c in &mut it {
        h[0][c[0] as usize] += 1;
        h[1][c[1] as usize] += 1;
        h[2][c[2] as usize] += 1;
        h[3][c[3] as usize] += 1;
    }
    for &b in it.remainder() {
        h[0][b as usize] += 1;
    }
    let n = data.len() as f64;
    let mut e = 0.0;
    for (((a, b), c), d) in h[0].iter().zip(&h[1]).zip(&h[2]).zip(&h[3]) {
        let c = (a + b + c + d) as f64;
        if c > 0.0 {
            let p = c / n;
            e -= p * p.log2();
        }
    }
    e
}

impl Compressor {
    fn new(codec: Codec) -> Compressor {
        let mk = |level: u32, zlib: bool| -> flate2::Compress {
            if zlib {
                flate2::Compress::new(flate2::Compression::new(level), true)
            } else {
                flate2::Compress::new_with_window_bits(flate2::Compression::new(level), false, 12)
            }
        };
        let (z, probe, store) = match codec {
            Codec::None => (None, None, None),
            Codec::QcowDeflate(l) => (Some(mk(l, false)), Some(mk(1, false)), None),
            Codec::Zlib(l) => (Some(mk(l, true)), Some(mk(1, true)), Some(mk(0, true))),
        };
        Compressor {
            codec,
            z,
            probe,
            store,
            scratch: Vec::new(),
        }
    }

    /// Cheap test that deflate won't shrink `data`: a level-1 probe of its first 8 KiB saves
    /// under 3 % and the byte entropy of the whole unit is near 8 bits (random or already
    /// compressed data). Skips the expensive full deflate of such units.
    fn incompressible(&mut self, data: &[u8]) -> bool {
        let Some(p) = &mut self.probe else {
            return false;
        };
        let sample = &data[..data.len().min(PROBE_BYTES)];
        self.scratch.resize(PROBE_BYTES * 2 + 1024, 0);
        p.reset();
        let st = p.compress(sample, &mut self.scratch, flate2::FlushCompress::Finish);
        let n = p.total_out() as usize;
        if !matches!(st, Ok(flate2::Status::StreamEnd)) || n * 100 < sample.len() * 97 {
            return false;
        }
        byte_entropy(data) > INCOMPRESSIBLE_BITS
    }

    fn transform(&mut self, b: &mut Batch) {
        let us = b.unit as usize;
        for i in 0..b.units.len() {
            let Unit::Raw(off) = b.units[i] else { continue };
            let data = &b.buf[off..off + us];
            if is_zero(data) {
                b.units[i] = Unit::Zero;
                continue;
            }
            if self.z.is_none() {
                continue;
            }
            let incompressible = self.incompressible(data);
            let z = match (incompressible, &mut self.store, &mut self.z) {
                // qcow2 stores such clusters uncompressed, as qemu does when deflate fails.
                (true, None, _) => continue,
                (true, Some(s), _) => s,
                (false, _, Some(z)) => z,
                (false, _, None) => continue,
            };
            z.reset();
            let start = b.cbuf.len();
            // Always give deflate room for incompressible input (a bounded output makes
            // some deflate implementations misbehave), then decide: qcow2 stores a cluster
            // compressed only if that saves a sector; VMDK streams compress every grain.
            let room = us + us / 8 + 1024;
            let keep = match self.codec {
                Codec::Zlib(_) => room,
                _ => us.saturating_sub(512),
            };
            b.cbuf.resize(start + room, 0);
            let st = z.compress(data, &mut b.cbuf[start..], flate2::FlushCompress::Finish);
            let n = z.total_out() as usize;
            if matches!(st, Ok(flate2::Status::StreamEnd)) && n < keep {
                b.cbuf.truncate(start + n);
                b.units[i] = Unit::Comp(start, n);
            } else {
                b.cbuf.truncate(start);
            }
        }
    }
}

/// Runs reader thread -> workers -> in-order consumer (the calling thread).
fn run_pipeline(
    disk: &mut dyn VirtualDisk,
    (unit, want_slices): (u64, bool),
    codec: Codec,
    threads: usize,
    first_unit: u64,
    consume: &mut dyn FnMut(&Batch) -> Result<()>,
) -> Result<()> {
    let vsize = disk.virtual_size();
    let total = vsize.div_ceil(unit);
    if first_unit >= total {
        return Ok(());
    }
    let max_bytes = if codec == Codec::None {
        BATCH_BYTES
    } else {
        BATCH_BYTES_COMPRESSED
    };
    if threads == 0 {
        let mut cur = ExtentCursor::new(vsize, first_unit * unit);
        let mut c = Compressor::new(codec);
        let mut b = Batch {
            first: 0,
            unit,
            units: Vec::new(),
            buf: Vec::new(),
            cbuf: Vec::new(),
            slices: Vec::new(),
        };
        let mut next = first_unit;
        while next < total {
            b = produce(disk, &mut cur, (unit, want_slices), next, max_bytes, b)?;
            c.transform(&mut b);
            consume(&b)?;
            next += b.units.len() as u64;
        }
        return Ok(());
    }
    let threads = threads.clamp(1, 64);
    // Without compression the reader thread detects zeros itself and feeds the writer.
    let inline = codec == Codec::None && threads == 1;
    // Deep enough to ride out scheduling delays of busy machines (bounded: ~8 x 2 MiB).
    let in_flight = if inline { 8 } else { threads + 2 };
    std::thread::scope(|scope| -> Result<()> {
        let (tok_tx, tok_rx) = mpsc::channel::<Option<Batch>>();
        let (job_tx, job_rx) = mpsc::channel::<(u64, Result<Batch>)>();
        let (res_tx, res_rx) = mpsc::channel::<(u64, Result<Batch>)>();
        for _ in 0..in_flight {
            let _ = tok_tx.send(None);
        }
        let reader_res = res_tx.clone();
        scope.spawn(move || {
            let mut cur = ExtentCursor::new(vsize, first_unit * unit);
            let mut c = Compressor::new(codec);
            let mut next_unit = first_unit;
            let mut seq = 0u64;
            while next_unit < total {
                let Ok(recycled) = tok_rx.recv() else { return };
                let b = recycled.unwrap_or(Batch {
                    first: 0,
                    unit,
                    units: Vec::new(),
                    buf: Vec::new(),
                    cbuf: Vec::new(),
                    slices: Vec::new(),
                });
                let r = produce(disk, &mut cur, (unit, want_slices), next_unit, max_bytes, b);
                let stop = r.is_err();
                if let Ok(b) = &r {
                    next_unit += b.units.len() as u64;
                }
                let sent = if inline {
                    let r = r.map(|mut b| {
                        c.transform(&mut b);
                        b
                    });
                    reader_res.send((seq, r)).is_ok()
                } else {
                    job_tx.send((seq, r)).is_ok()
                };
                if !sent || stop {
                    return;
                }
                seq += 1;
            }
        });
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..if inline { 0 } else { threads } {
            let res_tx = res_tx.clone();
            let job_rx = job_rx.clone();
            scope.spawn(move || {
                let mut c = Compressor::new(codec);
                loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, r)) = job else { return };
                    let r = r.map(|mut b| {
                        c.transform(&mut b);
                        b
                    });
                    if res_tx.send((seq, r)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(res_tx);
        let mut pending: BTreeMap<u64, Batch> = BTreeMap::new();
        let mut expected = 0u64;
        let mut done_units = first_unit;
        for (seq, r) in res_rx.iter() {
            pending.insert(seq, r?);
            while let Some(b) = pending.remove(&expected) {
                consume(&b)?;
                done_units += b.units.len() as u64;
                expected += 1;
                let _ = tok_tx.send(Some(b));
            }
            if done_units >= total {
                break;
            }
        }
        if done_units < total {
            return Err(FormatError::Io(std::io::Error::other(
                "conversion pipeline stopped early",
            )));
        }
        Ok(())
    })
}

/// Bytes of `b` for unit `u` (data of Raw units, compressed bytes of Comp units).
pub(crate) fn unit_bytes(b: &Batch, u: Unit) -> &[u8] {
    match u {
        Unit::Raw(o) => &b.buf[o..o + b.unit as usize],
        Unit::Comp(o, n) => &b.cbuf[o..o + n],
        _ => &[],
    }
}

/// Pseudo-random 16 bytes (UUIDs, CIDs) from the clock and process id: unique, not secret.
pub(crate) fn unique_bytes() -> [u8; 16] {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut x = (t as u64) ^ ((std::process::id() as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = [0u8; 16];
    for c in out.chunks_exact_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        c.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// Errors for writers.
pub(crate) fn werr(format: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::Unsupported {
        format,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 70000];
        assert!(is_zero(&v));
        v[69999] = 1;
        assert!(!is_zero(&v));
        v[69999] = 0;
        v[300] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn entropy_and_probe() {
        let mut x = 88172645463325252u64;
        let rnd: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(byte_entropy(&rnd) > INCOMPRESSIBLE_BITS);
        let mut c = Compressor::new(Codec::QcowDeflate(6));
        assert!(c.incompressible(&rnd));
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        assert!(!c.incompressible(&text));
        // Random bytes repeated every 1 KiB: the probe sees the repeats.
        let rep: Vec<u8> = rnd[..1024].iter().cycle().take(65536).copied().collect();
        assert!(!c.incompressible(&rep));
    }

    #[test]
    fn bitmap_roundtrip() {
        let mut b = AllocationBitmap::new(1 << 20, 16).unwrap();
        b.set(3);
        b.set(15);
        let back = AllocationBitmap::from_bytes(&b.to_bytes()).unwrap();
        assert_eq!(back, b);
        assert!(back.get(3) && back.get(15) && !back.get(4));
        assert_eq!(back.len(), 16);
    }
}
