//! Raw images: partition table detection (fine in raw) and signatures of formats this
//! service refuses but qemu would interpret (bochs, parallels, cloop, dmg).

use super::bytes::{le16, read_padded, slice};
use super::{Details, Input, Report};
use crate::ReadAt;
use serde::Serialize;

/// What partitioning a raw image carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartitionInfo {
    /// `mbr` or `gpt`.
    pub scheme: String,
    /// Number of non-empty MBR partition entries.
    pub mbr_partitions: u8,
}

/// `Some("gpt")` / `Some("mbr")` when the first sectors hold a plausible partition table:
/// boot signature 0x55AA, every entry with boot flag 0x00/0x80, at least one non-empty entry,
/// and not a FAT boot sector. GPT additionally needs `EFI PART` at 512 or 4096.
pub fn partition_table(h: &[u8]) -> Option<&'static str> {
    if le16(h, 510) != 0xaa55 {
        return None;
    }
    // A FAT volume boot record also ends in 0x55AA.
    if h.get(0x10) == Some(&2) && h.get(0x15) == Some(&0xf8) {
        return None;
    }
    let mut used = 0;
    for i in 0..4 {
        let e = slice(h, 446 + i * 16, 16);
        let boot = e.first().copied().unwrap_or(0xff);
        if boot != 0 && boot != 0x80 {
            return None;
        }
        if e.get(4).copied().unwrap_or(0) != 0 {
            used += 1;
        }
    }
    if used == 0 {
        return None;
    }
    if slice(h, 512, 8) == b"EFI PART" || slice(h, 4096, 8) == b"EFI PART" {
        Some("gpt")
    } else {
        Some("mbr")
    }
}

/// The name of a refused image format whose signature the file carries, if any.
pub fn foreign_signature(
    src: &dyn ReadAt,
    h: &[u8],
    file_size: u64,
) -> std::io::Result<Option<&'static str>> {
    if h.starts_with(b"Bochs Virtual HD Image") {
        return Ok(Some("bochs"));
    }
    if h.starts_with(b"WithoutFreeSpace") || h.starts_with(b"WithouFreSpacExt") {
        return Ok(Some("parallels"));
    }
    if slice(h, 0, 128).windows(12).any(|w| w == b"#V2.0 Format") && h.starts_with(b"#!/bin/sh") {
        return Ok(Some("cloop"));
    }
    if file_size >= 512 {
        let (t, n) = read_padded(src, file_size - 512, 512)?;
        if n == 512 && t.starts_with(b"koly") && u32::from_be_bytes([t[4], t[5], t[6], t[7]]) == 4 {
            return Ok(Some("dmg"));
        }
    }
    Ok(None)
}

pub(crate) fn analyze(inp: &Input, rep: &mut Report) -> std::io::Result<()> {
    rep.virtual_size = inp.file_size;
    if let Some(pt) = partition_table(inp.head) {
        rep.feature(pt);
        let used = (0..4)
            .filter(|i| slice(inp.head, 446 + i * 16 + 4, 1) != [0])
            .count() as u8;
        rep.details = Details::RawPartitioned(PartitionInfo {
            scheme: pt.to_string(),
            mbr_partitions: used,
        });
    }
    Ok(())
}
