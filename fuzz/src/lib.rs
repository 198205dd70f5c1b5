//! Harness helpers shared by the fuzz targets: each target forces its format's magic and
//! repairs checksums (VHD sums, VHDX CRC-32C) so the fuzzer explores the parser behind them
//! instead of bouncing off the signature or checksum check.

use openims_format::inspect::{inspect, InspectOptions};

/// Runs `inspect` (deep and shallow) on an in-memory file; it must never panic nor fail.
pub fn check(file: Vec<u8>) {
    for deep in [true, false] {
        let opts = InspectOptions { deep, ..Default::default() };
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
    b.get(o..o + 8).map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
}

/// Recomputes a VHD-style checksum (one's complement byte sum) stored big-endian at `ck`.
pub fn vhd_sum(b: &mut [u8], off: usize, len: usize, ck: usize) {
    if off + len > b.len() {
        return;
    }
    b[off + ck..off + ck + 4].fill(0);
    let s = b[off..off + len].iter().fold(0u32, |a, &c| a.wrapping_add(u32::from(c)));
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
        let mut footer = force(data.get(..512.min(data.len())).unwrap_or(&[]), 0, b"conectix");
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
