//! ISO 9660 / UDF detection. An ISO is read as its own bytes (virtual size = file size).

use super::bytes::{le16, le32, slice};
use super::{Details, Input, Report};
use crate::DiskFormat;
use serde::Serialize;

/// Volume descriptor set offsets probed (sectors 16, 17, 18 of 2048 bytes).
pub const DESCRIPTOR_OFFSETS: [usize; 3] = [0x8000, 0x8800, 0x9000];
/// Standard identifiers of ISO 9660 and UDF volume descriptors.
pub const IDENTIFIERS: [&[u8]; 5] = [b"CD001", b"BEA01", b"NSR02", b"NSR03", b"TEA01"];

/// Primary volume descriptor summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IsoInfo {
    /// Offset of the primary volume descriptor, if one was found.
    pub pvd_offset: Option<u64>,
    /// Volume space size in logical blocks.
    pub volume_space_size: u32,
    /// Logical block size.
    pub logical_block_size: u16,
    /// Volume identifier (printable).
    pub volume_id: String,
}

/// Does the head hold an ISO 9660 / UDF volume descriptor at 0x8001, 0x8801 or 0x9001?
pub fn probe(h: &[u8]) -> bool {
    DESCRIPTOR_OFFSETS
        .iter()
        .any(|&o| IDENTIFIERS.contains(&slice(h, o + 1, 5)))
}

pub(crate) fn analyze(inp: &Input, rep: &mut Report) {
    let mut info = IsoInfo::default();
    for o in DESCRIPTOR_OFFSETS {
        let d = slice(inp.head, o, 2048);
        if d.first() == Some(&1) && slice(d, 1, 5) == b"CD001" {
            info.pvd_offset = Some(o as u64);
            info.volume_space_size = le32(d, 80);
            info.logical_block_size = le16(d, 128);
            info.volume_id = super::bytes::printable(slice(d, 40, 32), 32)
                .trim_end()
                .to_string();
            break;
        }
    }
    rep.virtual_size = inp.file_size;
    let vol = u64::from(info.volume_space_size) * u64::from(info.logical_block_size);
    if vol > inp.file_size {
        rep.truncated(DiskFormat::Iso, vol, inp.file_size);
    }
    if info.pvd_offset.is_none() {
        rep.feature("udf");
    }
    rep.details = Details::Iso(info);
}
