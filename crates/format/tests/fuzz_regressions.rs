//! Regression tests for what the fuzz targets of `fuzz/` found (see INSPECT.md, "Fuzzing").
//! Each test names the target and the invariant that failed.

use openims_format::inspect::{inspect, InspectOptions};
use openims_format::read::vhd::vhd_checksum;
use openims_format::{read, DiskFormat, ReadAt};
use std::sync::Arc;

/// A fixed VHD: `data` bytes of guest data, then a footer with the given creator, size and
/// CHS geometry (checksum correct).
fn fixed_vhd(data: usize, creator: &[u8; 4], current_size: u64, chs: (u16, u8, u8)) -> Vec<u8> {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // version 1.0
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // no data offset (fixed)
    f[28..32].copy_from_slice(creator);
    f[40..48].copy_from_slice(&current_size.to_be_bytes()); // original size
    f[48..56].copy_from_slice(&current_size.to_be_bytes());
    f[56..58].copy_from_slice(&chs.0.to_be_bytes());
    f[58] = chs.1;
    f[59] = chs.2;
    f[60..64].copy_from_slice(&2u32.to_be_bytes()); // fixed
    let ck = vhd_checksum(&f, 64);
    f[64..68].copy_from_slice(&ck.to_be_bytes());
    let mut v = vec![0u8; data];
    v.extend_from_slice(&f);
    v
}

/// (inspect's verdict is safe, inspect's virtual size, the reader's virtual size)
fn sizes(file: Vec<u8>, opts: &InspectOptions) -> (bool, u64, u64) {
    let ins = inspect(&file, opts).unwrap();
    assert_eq!(ins.format, DiskFormat::Vhd);
    let src: Arc<dyn ReadAt> = Arc::new(file);
    let disk = read::open(src, DiskFormat::Vhd).unwrap();
    (ins.is_safe(), ins.virtual_size, disk.virtual_size())
}

/// read_vhd: "inspect and the vhd reader disagree on the virtual size". A creator the two
/// didn't both know (here the fuzzer's `q\x1eqe`) made inspect take `current_size` and the
/// reader the CHS geometry (0 here): inspect passed a 256-byte disk the reader opened as empty.
/// Now both take `current_size` in whole sectors: 256 bytes is no sector, a zero-size disk
/// (refused), 1024 bytes is 1024 for both.
#[test]
fn vhd_unknown_creator_same_size_in_inspect_and_reader() {
    let file = fixed_vhd(1024, b"q\x1eqe", 256, (0, 0, 0));
    assert_eq!(sizes(file, &InspectOptions::default()), (false, 0, 0));
    let file = fixed_vhd(1024, b"q\x1eqe", 1024, (0, 0, 0));
    assert_eq!(sizes(file, &InspectOptions::default()), (true, 1024, 1024));
}

/// The same disagreement the other way round is a size-limit bypass: inspect checked
/// `current_size` (1 MiB) against `max_virtual_size` (2 MiB), the reader served the CHS size
/// (4 MiB).
#[test]
fn vhd_unknown_creator_reader_does_not_exceed_the_inspected_size() {
    let opts = InspectOptions {
        max_virtual_size: 2 << 20,
        ..Default::default()
    };
    let file = fixed_vhd(4 << 20, b"abcd", 1 << 20, (128, 4, 16));
    assert_eq!(sizes(file, &opts), (true, 1 << 20, 1 << 20));
}

/// qemu switches to `current_size` when the geometry has the maximum sector count, whatever
/// triple makes it up; inspect only recognised 65535/16/255.
#[test]
fn vhd_max_geometry_by_product() {
    let file = fixed_vhd(8192, b"qemu", 4096, (65535, 255, 16));
    assert_eq!(sizes(file, &InspectOptions::default()), (true, 4096, 4096));
    // A CHS creator with an ordinary geometry keeps the CHS size.
    let file = fixed_vhd(8192, b"qemu", 4096, (1, 2, 8));
    assert_eq!(sizes(file, &InspectOptions::default()), (true, 8192, 8192));
}

/// `current_size` counts whole sectors (qemu divides by 512); inspect used it unrounded.
#[test]
fn vhd_current_size_rounds_down_to_sectors() {
    let file = fixed_vhd(4096, b"win ", 1000, (0, 0, 0));
    assert_eq!(sizes(file, &InspectOptions::default()), (true, 512, 512));
}
