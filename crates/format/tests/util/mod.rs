//! Test helpers: qemu-img wrappers and small file builders (test-only use of qemu-img).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use openims_format::inspect::{inspect, InspectOptions, Inspection};

pub const MIB: u64 = 1 << 20;

/// Runs `qemu-img ARGS`, panicking with its stderr on failure.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img {:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json` of a file, as JSON.
pub fn qemu_info(path: &Path, fmt: &str) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img info failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON")
}

/// Writes a sparse raw file of `size` bytes with recognisable data at a few offsets.
pub fn make_source_raw(path: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut block = vec![0u8; 256 * 1024];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    for off in [0, MIB, 33 * MIB + 4096, size.saturating_sub(256 * 1024)] {
        if off + block.len() as u64 <= size {
            f.write_all_at(&block, off).unwrap();
        }
    }
}

/// Inspects a file on disk with default options (deep).
pub fn inspect_path(path: &Path) -> Inspection {
    inspect_path_with(path, &InspectOptions::default())
}

/// Inspects a file on disk.
pub fn inspect_path_with(path: &Path, opts: &InspectOptions) -> Inspection {
    let f = std::fs::File::open(path).unwrap();
    inspect(&f, opts).unwrap()
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Turns a qemu-made streamOptimized vmdk (grain directory located by the header) into the
/// VMware layout: header `gd_offset = GD_AT_END`, then footer marker, footer header (holding
/// the real grain directory offset) and end-of-stream marker at the end.
pub fn vmdk_stream_with_footer(stream: &[u8]) -> Vec<u8> {
    let mut b = stream.to_vec();
    let mut footer = stream[..512].to_vec();
    b[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut marker = vec![0u8; 512];
    marker[0..8].copy_from_slice(&1u64.to_le_bytes());
    marker[12..16].copy_from_slice(&3u32.to_le_bytes());
    b.resize(b.len().next_multiple_of(512), 0);
    b.extend_from_slice(&marker);
    footer[72] = 0;
    b.extend_from_slice(&footer);
    b.extend_from_slice(&[0u8; 512]);
    b
}
