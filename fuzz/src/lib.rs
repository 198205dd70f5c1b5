//! Harness helpers shared by the fuzz targets: each target forces its format's magic and
//! repairs checksums (VHD sums, VHDX CRC-32C) so the fuzzer explores the parser behind them
//! instead of bouncing off the signature or checksum check.
//!
//! `inspect_*` targets call [`check`]; `read_*` targets call [`check_read`], which inspects the
//! file and then drives the streaming reader over it whatever the verdict (see there).

use openims_format::inspect::{inspect, InspectOptions};
use openims_format::io::{Extent, ExtentKind, StoredSlice, VirtualDisk};
use openims_format::{read, DiskFormat, FormatError, ReadAt};
use std::sync::Arc;

/// Runs `inspect` (deep and shallow) on an in-memory file; it must never panic nor fail.
pub fn check(file: Vec<u8>) {
    for deep in [true, false] {
        let opts = InspectOptions {
            deep,
            ..Default::default()
        };
        let ins = inspect(&file, &opts).expect("in-memory inspect never returns Err");
        for v in &ins.violations {
            let _ = (v.name(), v.to_string());
        }
    }
}

/// `data` with `magic` written at `at` (the file is extended when shorter).
pub fn force(data: &[u8], at: usize, magic: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    if v.len() < at + magic.len() {
        v.resize(at + magic.len(), 0);
    }
    v[at..at + magic.len()].copy_from_slice(magic);
    v
}

fn be64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
}

/// Recomputes a VHD-style checksum (one's complement byte sum) stored big-endian at `ck`.
pub fn vhd_sum(b: &mut [u8], off: usize, len: usize, ck: usize) {
    if off + len > b.len() {
        return;
    }
    b[off + ck..off + ck + 4].fill(0);
    let s = b[off..off + len]
        .iter()
        .fold(0u32, |a, &c| a.wrapping_add(u32::from(c)));
    b[off + ck..off + ck + 4].copy_from_slice(&(!s).to_be_bytes());
}

/// Recomputes a CRC-32C stored little-endian at `off + 4` over `len` bytes.
pub fn crc_fix(b: &mut [u8], off: usize, len: usize) {
    if off + len > b.len() {
        return;
    }
    b[off + 4..off + 8].fill(0);
    let c = crc32c::crc32c(&b[off..off + len]);
    b[off + 4..off + 8].copy_from_slice(&c.to_le_bytes());
}

/// VHD: a real VHD (footer at 0 or at the end) gets its checksums repaired; other input is
/// shaped by bit 0 of its first byte: fixed (footer appended at the end) or dynamic (footer at
/// 0 and at the end, dynamic header checksum repaired).
pub fn vhd(data: &[u8]) -> Vec<u8> {
    let n = data.len();
    let at_end = n >= 512 && data[n - 512..].starts_with(b"conectix");
    if data.starts_with(b"conectix") || at_end {
        let mut v = data.to_vec();
        if v.starts_with(b"conectix") {
            vhd_sum(&mut v, 0, 512, 64);
            let dh = be64(&v, 16);
            if dh < v.len() as u64 && dh as usize + 1024 <= v.len() {
                vhd_sum(&mut v, dh as usize, 1024, 36);
            }
        }
        if at_end {
            vhd_sum(&mut v, n - 512, 512, 64);
        }
        return v;
    }
    let dynamic = data.first().is_some_and(|b| b & 1 == 1);
    if dynamic {
        let mut v = force(data, 0, b"conectix");
        if v.len() < 1536 {
            v.resize(1536, 0);
        }
        vhd_sum(&mut v, 0, 512, 64);
        let dh = be64(&v, 16);
        if dh < v.len() as u64 && dh as usize + 1024 <= v.len() {
            let d = dh as usize;
            v[d..d + 8].copy_from_slice(b"cxsparse");
            vhd_sum(&mut v, d, 1024, 36);
        }
        let footer = v[..512].to_vec();
        v.extend_from_slice(&footer);
        v
    } else {
        let mut v = data.to_vec();
        let mut footer = force(
            data.get(..512.min(data.len())).unwrap_or(&[]),
            0,
            b"conectix",
        );
        footer.resize(512, 0);
        vhd_sum(&mut footer, 0, 512, 64);
        v.extend_from_slice(&footer);
        v
    }
}

/// VHDX: signature forced, header and region table CRCs repaired where their signatures are.
pub fn vhdx(data: &[u8]) -> Vec<u8> {
    let mut v = force(data, 0, b"vhdxfile");
    for h in [64usize << 10, 128 << 10] {
        if v.get(h..h + 4) == Some(b"head") {
            crc_fix(&mut v, h, 4096);
        }
    }
    for r in [192usize << 10, 256 << 10] {
        if v.get(r..r + 4) == Some(b"regi") {
            crc_fix(&mut v, r, 64 << 10);
        }
    }
    v
}

/// Most bytes of virtual disk one input may make the harness read (data extents, zero-extent
/// samples and consistency re-reads together), so a huge virtual size stays fast.
pub const READ_BUDGET: u64 = 64 << 20;
/// How much of the virtual disk `extents()` is walked from the start (plus one window at the
/// end of the disk when it is larger).
pub const WALK_LIMIT: u64 = 256 << 20;
/// `extents()` is asked for windows of this size.
const WINDOW: u64 = 64 << 20;
/// Reads are issued in pieces of at most this size.
const PIECE: usize = 1 << 20;
/// Of each zero extent, only this much is read back to check that it reads as zeros.
const ZERO_SAMPLE: u64 = 64 << 10;

/// What the reader did with one input (for the targets' own assertions).
#[derive(Debug, Default)]
pub struct ReadOutcome {
    /// `read::open` succeeded.
    pub opened: bool,
    /// First error from `read::open`, `extents()` or `read_at()`.
    pub error: Option<String>,
    /// That error is `FormatError::Unsupported` (a refusal, not a failure).
    pub unsupported: bool,
    /// Bytes of virtual disk read.
    pub bytes_read: u64,
    /// The reader's virtual size, when it opened.
    pub virtual_size: Option<u64>,
}

/// Inspects `file` (deep) and then, **whatever the verdict**, opens it with the streaming
/// reader for `format` and walks it: `extents()` over the first [`WALK_LIMIT`] bytes of the
/// virtual disk (and the last window), reading every data extent in pieces of at most 1 MiB,
/// within [`READ_BUDGET`] bytes. Readers are opened only after `inspect` passed in the service,
/// but must be safe on their own: no panic, no hang, bounded memory.
///
/// Checked on every input (these hold for any file, hostile or not):
/// - `extents()` returns ordered, adjacent, non-empty, merged extents exactly covering the
///   requested range clipped to the disk;
/// - a zero extent reads as zeros; bytes past the end of the disk read as zeros;
/// - reading a piece in one call or in two halves gives the same bytes;
/// - where the reader says which bytes of its file a piece is (`stored_slices`, the file
///   being held as 4 KiB chunks, see [`HeldFile`]), those bytes are the bytes it reads.
///
/// When `inspect` found the file safe **and** detected `format`, both must agree on the virtual
/// size, the reader must open it (`Unsupported` is allowed: the reader refuses a few things
/// inspect accepts, e.g. qcow2 extended L2, QED) and `extents()` and `read_at()` must succeed:
/// inspect's deep mode checked every table pointer the reader follows. The one exception is
/// the content of compressed data (a qcow2 cluster that does not decompress, a streamOptimized
/// grain whose marker or deflate stream is bad): inspect never reads guest data, so only the
/// read finds it.
pub fn check_read(file: Vec<u8>, format: DiskFormat) -> ReadOutcome {
    let opts = InspectOptions::default();
    let ins = inspect(&file, &opts).expect("in-memory inspect never returns Err");
    let safe = ins.is_safe() && ins.format == format;
    let src: Arc<dyn ReadAt> = Arc::new(HeldFile(file));
    let out = walk(src, format);
    if std::env::var_os("OPENIMS_FUZZ_DEBUG").is_some() {
        eprintln!(
            "inspect: {} safe={} violations={:?} vsize={}; reader: {out:?}",
            ins.format,
            ins.is_safe(),
            ins.violation_names(),
            ins.virtual_size
        );
    }
    if safe {
        if let Some(v) = out.virtual_size {
            assert_eq!(
                v, ins.virtual_size,
                "inspect and the {format} reader disagree on the virtual size"
            );
        }
        if let Some(e) = &out.error {
            if !out.opened {
                assert!(
                    out.unsupported,
                    "inspect passed this {format} file but the reader refused it: {e}"
                );
            } else {
                let compressed_content = e.contains("does not decompress")
                    || e.contains("does not inflate")
                    || e.contains("compressed grain size");
                assert!(
                    compressed_content,
                    "inspect passed this {format} file but the reader failed on it: {e}"
                );
            }
        }
    }
    out
}

/// Chunk size of the store a fuzzed file is said to be held in (small: slices cross chunks).
const HELD_CHUNK: u64 = 4096;

/// A fuzzed file that answers `stored_slices` as if a chunk store held it in [`HELD_CHUNK`]
/// chunks whose ids are their indexes (all-zero chunks as zeros), so that what a reader says a
/// range of its disk is made of can be compared with what it reads.
pub struct HeldFile(pub Vec<u8>);

impl ReadAt for HeldFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn stored_slices(&self, offset: u64, len: u64) -> Option<Vec<StoredSlice>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.0.len() as u64)?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let k = pos / HELD_CHUNK;
            let chunk_end = ((k + 1) * HELD_CHUNK).min(self.0.len() as u64);
            let n = (chunk_end - pos).min(end - pos);
            let bytes = &self.0[(k * HELD_CHUNK) as usize..chunk_end as usize];
            let s = if bytes.iter().all(|&b| b == 0) {
                StoredSlice::Zero { len: n as u32 }
            } else {
                let mut chunk = [0u8; 32];
                chunk[..8].copy_from_slice(&k.to_le_bytes());
                StoredSlice::Chunk {
                    chunk,
                    offset: (pos % HELD_CHUNK) as u32,
                    len: n as u32,
                }
            };
            StoredSlice::push(&mut out, s);
            pos += n;
        }
        Some(out)
    }
}

/// The bytes `slices` of a [`HeldFile`] (read through `src`) stand for.
fn held_bytes(src: &dyn ReadAt, slices: &[StoredSlice]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in slices {
        match *s {
            StoredSlice::Zero { len } => out.resize(out.len() + len as usize, 0),
            StoredSlice::Chunk { chunk, offset, len } => {
                let mut k = [0u8; 8];
                k.copy_from_slice(&chunk[..8]);
                let at = u64::from_le_bytes(k) * HELD_CHUNK + u64::from(offset);
                let start = out.len();
                out.resize(start + len as usize, 0);
                src.read_exact_at(&mut out[start..], at)
                    .expect("a slice lies inside the file");
            }
        }
    }
    out
}

fn note(out: &mut ReadOutcome, what: &str, e: FormatError) {
    if out.error.is_none() {
        out.unsupported = matches!(e, FormatError::Unsupported { .. });
        out.error = Some(format!("{what}: {e}"));
    }
}

/// Opens `src` as `format` and walks it (see [`check_read`]); never asserts on errors.
pub fn walk(src: Arc<dyn ReadAt>, format: DiskFormat) -> ReadOutcome {
    let mut out = ReadOutcome::default();
    let mut disk = match read::open(Arc::clone(&src), format) {
        Ok(d) => d,
        Err(e) => {
            note(&mut out, "open", e);
            return out;
        }
    };
    out.opened = true;
    let vsize = disk.virtual_size();
    out.virtual_size = Some(vsize);
    assert!(
        vsize <= read::MAX_VIRTUAL_SIZE,
        "virtual size {vsize} over the reader limit"
    );
    let mut budget = READ_BUDGET;
    let mut windows = Vec::new();
    let mut pos = 0;
    while pos < vsize.min(WALK_LIMIT) {
        windows.push((pos, WINDOW));
        pos += WINDOW;
    }
    if vsize > WALK_LIMIT {
        windows.push((vsize - WINDOW, WINDOW));
    }
    // Past the end: no extents.
    windows.push((vsize, WINDOW));
    for (off, len) in windows {
        let ext = match disk.extents(off, len) {
            Ok(x) => x,
            Err(e) => {
                note(&mut out, "extents", e);
                return out;
            }
        };
        check_extents(&ext, off, len, vsize);
        for x in ext {
            if budget == 0 {
                break;
            }
            let span = match x.kind {
                ExtentKind::Data => x.len,
                ExtentKind::Zero => x.len.min(ZERO_SAMPLE),
            };
            if let Err(e) = read_extent(&mut *disk, &*src, x, span, &mut budget, &mut out) {
                note(&mut out, "read", e);
                return out;
            }
        }
    }
    // Ranges reaching past u64::MAX are clipped, not overflowed; empty reads are no-ops.
    match disk.extents(vsize / 2, u64::MAX) {
        Ok(ext) => check_extents(&ext, vsize / 2, u64::MAX, vsize),
        Err(e) => note(&mut out, "extents", e),
    }
    let mut far = [0xa5u8; 16];
    match disk.read_at(u64::MAX - 8, &mut far) {
        Ok(()) => assert!(far.iter().all(|&b| b == 0), "bytes past u64::MAX not zero"),
        Err(e) => note(&mut out, "read", e),
    }
    if let Err(e) = disk.read_at(vsize / 2, &mut []) {
        note(&mut out, "read", e);
    }
    // A read straddling the end of the disk zero-fills what lies past it.
    let at = vsize.saturating_sub(4096);
    let mut tail = vec![0xa5u8; 8192];
    match disk.read_at(at, &mut tail) {
        Ok(()) => {
            let past = (vsize - at) as usize;
            assert!(
                tail[past..].iter().all(|&b| b == 0),
                "bytes past the end of the disk are not zero"
            );
        }
        Err(e) => note(&mut out, "read", e),
    }
    out
}

fn check_extents(ext: &[Extent], off: u64, len: u64, vsize: u64) {
    let start = off.min(vsize);
    let end = off.saturating_add(len).min(vsize).max(start);
    let mut pos = start;
    for (i, x) in ext.iter().enumerate() {
        assert_eq!(
            x.offset, pos,
            "extents not adjacent: {ext:?} for [{off}, +{len}) of {vsize}"
        );
        assert!(x.len > 0, "empty extent: {x:?}");
        if i > 0 {
            assert!(
                ext[i - 1].kind != x.kind,
                "adjacent extents of one kind not merged: {ext:?}"
            );
        }
        pos = x.offset.checked_add(x.len).expect("extent end overflows");
    }
    assert_eq!(pos, end, "extents {ext:?} do not cover [{start}, {end})");
}

fn read_extent(
    disk: &mut dyn VirtualDisk,
    src: &dyn ReadAt,
    x: Extent,
    span: u64,
    budget: &mut u64,
    out: &mut ReadOutcome,
) -> Result<(), FormatError> {
    let mut pos = x.offset;
    let end = x.offset + span;
    let mut buf = Vec::new();
    let mut first = true;
    while pos < end && *budget > 0 {
        let n = (end - pos).min(PIECE as u64).min(*budget) as usize;
        buf.resize(n, 0xa5);
        disk.read_at(pos, &mut buf)?;
        *budget -= n as u64;
        out.bytes_read += n as u64;
        if x.kind == ExtentKind::Zero {
            assert!(
                buf.iter().all(|&b| b == 0),
                "zero extent {x:?} reads non-zero bytes near {pos}"
            );
        }
        if let Some(slices) = disk.stored_slices(pos, n as u64)? {
            let total: u64 = slices.iter().map(|s| u64::from(s.len())).sum();
            assert_eq!(
                total, n as u64,
                "slices of [{pos}, +{n}) cover {total} bytes"
            );
            assert!(
                held_bytes(src, &slices) == buf,
                "the slices of [{pos}, +{n}) are not the bytes read there: {slices:?}"
            );
        }
        // Once per extent: the same bytes read in two unaligned halves.
        if first && n > 1 && *budget >= n as u64 {
            first = false;
            let cut = n / 2 + 1;
            let mut again = vec![0x5au8; n];
            disk.read_at(pos, &mut again[..cut])?;
            disk.read_at(pos + cut as u64, &mut again[cut..])?;
            *budget -= n as u64;
            assert!(
                again == buf,
                "read of [{pos}, +{n}) differs when split at {cut}"
            );
        }
        pos += n as u64;
    }
    Ok(())
}
