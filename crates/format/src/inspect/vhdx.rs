//! VHDX headers, region table, metadata and checks. All fields little-endian; structures carry
//! CRC-32C checksums.

use super::bytes::{array, div_ceil, fits, guid_string, le16, le32, le64, read_padded};
use super::{for_each_entry, Details, Input, Report, Violation};
use crate::DiskFormat;
use serde::Serialize;

/// File type identifier at offset 0.
pub const FILE_SIGNATURE: &[u8] = b"vhdxfile";
/// Offsets of the two headers.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Offsets of the two region tables.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Region GUID of the block allocation table.
pub const BAT_GUID: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
/// Region GUID of the metadata region.
pub const METADATA_GUID: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
/// Metadata item: file parameters (block size, flags).
pub const FILE_PARAMETERS_GUID: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE_GUID: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
/// Metadata item: virtual disk id.
pub const VIRTUAL_DISK_ID_GUID: &str = "BECA12AB-B2E6-4523-93EF-C309E000C746";
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_SIZE_GUID: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_SIZE_GUID: &str = "CDA348C7-445D-4471-9CC9-E9885251C556";
/// Metadata item: parent locator (differencing disks).
pub const PARENT_LOCATOR_GUID: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";
/// BAT payload state: block fully present in the file.
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
/// BAT payload state: partially present (differencing only).
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;

/// One of the two 4 KiB headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VhdxHeader {
    /// Where it was read from.
    pub offset: u64,
    /// Signature `head` and CRC-32C both valid.
    pub valid: bool,
    /// Sequence number (the valid header with the highest one is current).
    pub sequence_number: u64,
    /// Log GUID; non-zero means the log must be replayed.
    pub log_guid: String,
    /// Log format version.
    pub log_version: u16,
    /// Format version (1).
    pub version: u16,
    /// Log length.
    pub log_length: u32,
    /// Log offset.
    pub log_offset: u64,
}

/// A region table entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionEntry {
    /// Region GUID.
    pub guid: String,
    /// Offset in the file (1 MiB aligned).
    pub file_offset: u64,
    /// Length (multiple of 1 MiB).
    pub length: u32,
    /// Required flag.
    pub required: bool,
}

/// A metadata table entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetadataEntry {
    /// Item GUID.
    pub item_id: String,
    /// Offset relative to the metadata region.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
    /// Flags: bit 0 user, bit 1 virtual disk, bit 2 required.
    pub flags: u32,
}

/// Parsed metadata values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VhdxMetadata {
    /// Payload block size in bytes (1 MiB..=256 MiB, power of two).
    pub block_size: u32,
    /// File parameter flags: bit 0 leave blocks allocated, bit 1 has parent.
    pub file_parameter_flags: u32,
    /// Virtual disk size in bytes.
    pub virtual_disk_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u32,
    /// A parent locator item is present.
    pub has_parent_locator: bool,
}

/// Everything `inspect` parsed from a VHDX file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VhdxInfo {
    /// Both headers as read.
    pub headers: Vec<VhdxHeader>,
    /// Index into `headers` of the current one.
    pub current_header: Option<usize>,
    /// Region table entries (capped at 2047).
    pub regions: Vec<RegionEntry>,
    /// Metadata table entries (capped at 2047).
    pub metadata_entries: Vec<MetadataEntry>,
    /// Parsed metadata values.
    pub metadata: VhdxMetadata,
    /// BAT region offset and length.
    pub bat_offset: u64,
    /// BAT region length in bytes.
    pub bat_length: u64,
    /// Data blocks per sector-bitmap block (`2^23 * logical_sector_size / block_size`).
    pub chunk_ratio: u64,
    /// Total BAT entries needed (payload + interleaved sector bitmap entries).
    pub bat_entries: u64,
}

fn crc_ok(buf: &[u8], crc_at: usize) -> bool {
    let stored = le32(buf, crc_at);
    let mut c = buf.to_vec();
    if let Some(s) = c.get_mut(crc_at..crc_at + 4) {
        s.fill(0);
    }
    crc32c::crc32c(&c) == stored
}

/// Parses a 4 KiB header buffer read at `offset`.
pub fn parse_header(b: &[u8], offset: u64) -> VhdxHeader {
    VhdxHeader {
        offset,
        valid: b.len() >= 4096 && b.starts_with(b"head") && crc_ok(&b[..4096], 4),
        sequence_number: le64(b, 8),
        log_guid: guid_string(&array(b, 48)),
        log_version: le16(b, 64),
        version: le16(b, 66),
        log_length: le32(b, 68),
        log_offset: le64(b, 72),
    }
}

const ZERO_GUID: &str = "00000000-0000-0000-0000-000000000000";

pub(crate) fn analyze(inp: &Input, rep: &mut Report) -> std::io::Result<()> {
    let f = DiskFormat::Vhdx;
    let fs = inp.file_size;
    let mut info = VhdxInfo::default();
    if fs < (1 << 20) {
        rep.truncated(f, 1 << 20, fs);
    }
    for off in HEADER_OFFSETS {
        let (b, _) = read_padded(inp.src, off, 4096)?;
        info.headers.push(parse_header(&b, off));
    }
    info.current_header = info
        .headers
        .iter()
        .enumerate()
        .filter(|(_, h)| h.valid)
        .max_by_key(|(_, h)| h.sequence_number)
        .map(|(i, _)| i);
    let Some(cur) = info.current_header else {
        rep.v(Violation::VhdxBadHeaderChecksum);
        rep.details = Details::Vhdx(Box::new(info));
        return Ok(());
    };
    let h = &info.headers[cur];
    if h.version != 1 {
        rep.invalid(f, format!("header version {}", h.version));
    }
    if h.log_guid != ZERO_GUID {
        rep.v(Violation::VhdxLogNotEmpty);
    }
    if h.log_length != 0 && !fits(h.log_offset, u64::from(h.log_length), fs) {
        rep.v(Violation::VhdxRegionOutOfBounds {
            what: "log",
            offset: h.log_offset,
            len: u64::from(h.log_length),
        });
    }

    // Region table: the first with a valid CRC (both copies must be identical per spec).
    let mut table = None;
    for off in REGION_TABLE_OFFSETS {
        let (b, _) = read_padded(inp.src, off, 64 << 10)?;
        if b.starts_with(b"regi") && crc_ok(&b, 4) {
            table = Some(b);
            break;
        }
    }
    let Some(rt) = table else {
        rep.v(Violation::VhdxBadRegionTableChecksum);
        rep.details = Details::Vhdx(Box::new(info));
        return Ok(());
    };
    let count = le32(&rt, 8);
    if count > 2047 {
        rep.invalid(f, format!("region table has {count} entries (limit 2047)"));
    }
    let (mut bat, mut meta) = (None, None);
    for i in 0..count.min(2047) as usize {
        let e = 16 + i * 32;
        let r = RegionEntry {
            guid: guid_string(&array(&rt, e)),
            file_offset: le64(&rt, e + 16),
            length: le32(&rt, e + 24),
            required: le32(&rt, e + 28) & 1 != 0,
        };
        let len = u64::from(r.length);
        let known = r.guid == BAT_GUID || r.guid == METADATA_GUID;
        if !known && r.required {
            rep.v(Violation::VhdxUnknownRequiredRegion {
                guid: r.guid.clone(),
            });
        }
        if !r.file_offset.is_multiple_of(1 << 20)
            || r.file_offset < (1 << 20)
            || len == 0
            || !fits(r.file_offset, len, fs)
        {
            rep.v(Violation::VhdxRegionOutOfBounds {
                what: "region",
                offset: r.file_offset,
                len,
            });
        } else if r.guid == BAT_GUID {
            bat = Some((r.file_offset, len));
        } else if r.guid == METADATA_GUID {
            meta = Some((r.file_offset, len));
        }
        info.regions.push(r);
    }
    let (Some((bat_off, bat_len)), Some((meta_off, meta_len))) = (bat, meta) else {
        rep.v(Violation::VhdxBadMetadata {
            reason: "BAT or metadata region missing".into(),
        });
        rep.details = Details::Vhdx(Box::new(info));
        return Ok(());
    };
    info.bat_offset = bat_off;
    info.bat_length = bat_len;

    // Metadata region: table (64 KiB) then items.
    let (m, _) = read_padded(inp.src, meta_off, (meta_len as usize).min(1 << 20))?;
    if !m.starts_with(b"metadata") {
        rep.v(Violation::VhdxBadMetadata {
            reason: "metadata table signature missing".into(),
        });
        rep.details = Details::Vhdx(Box::new(info));
        return Ok(());
    }
    let mcount = le16(&m, 10);
    if mcount > 2047 {
        rep.v(Violation::VhdxBadMetadata {
            reason: format!("{mcount} metadata entries (limit 2047)"),
        });
    }
    let md = &mut info.metadata;
    let mut seen = 0u8;
    for i in 0..mcount.min(2047) as usize {
        let e = 32 + i * 32;
        let me = MetadataEntry {
            item_id: guid_string(&array(&m, e)),
            offset: le32(&m, e + 16),
            length: le32(&m, e + 20),
            flags: le32(&m, e + 24),
        };
        let (ioff, ilen) = (u64::from(me.offset), u64::from(me.length));
        let in_region = ilen == 0 || (ioff >= (64 << 10) && fits(ioff, ilen, meta_len));
        if !in_region {
            rep.v(Violation::VhdxRegionOutOfBounds {
                what: "metadata item",
                offset: meta_off + ioff,
                len: ilen,
            });
            info.metadata_entries.push(me);
            continue;
        }
        let item = super::bytes::slice(&m, me.offset as usize, me.length as usize);
        match me.item_id.as_str() {
            FILE_PARAMETERS_GUID => {
                md.block_size = le32(item, 0);
                md.file_parameter_flags = le32(item, 4);
                seen |= 1;
            }
            VIRTUAL_DISK_SIZE_GUID => {
                md.virtual_disk_size = le64(item, 0);
                seen |= 2;
            }
            LOGICAL_SECTOR_SIZE_GUID => {
                md.logical_sector_size = le32(item, 0);
                seen |= 4;
            }
            PHYSICAL_SECTOR_SIZE_GUID => md.physical_sector_size = le32(item, 0),
            VIRTUAL_DISK_ID_GUID => {}
            PARENT_LOCATOR_GUID => md.has_parent_locator = true,
            _ => {
                if me.flags & 4 != 0 {
                    rep.v(Violation::VhdxUnknownRequiredMetadata {
                        guid: me.item_id.clone(),
                    });
                }
            }
        }
        info.metadata_entries.push(me);
    }
    let md = info.metadata.clone();
    rep.virtual_size = md.virtual_disk_size;
    if md.has_parent_locator || md.file_parameter_flags & 2 != 0 {
        rep.v(Violation::VhdxDifferencing);
    }
    if seen != 7 {
        rep.v(Violation::VhdxBadMetadata {
            reason: "file parameters, virtual disk size or logical sector size missing".into(),
        });
        rep.details = Details::Vhdx(Box::new(info));
        return Ok(());
    }
    let bs = u64::from(md.block_size);
    if !md.block_size.is_power_of_two() || !((1 << 20)..=(256 << 20)).contains(&bs) {
        rep.v(Violation::VhdxBadMetadata {
            reason: format!("block size {bs}"),
        });
        rep.details = Details::Vhdx(Box::new(info));
        return Ok(());
    }
    if md.logical_sector_size != 512 && md.logical_sector_size != 4096 {
        rep.v(Violation::VhdxBadMetadata {
            reason: format!("logical sector size {}", md.logical_sector_size),
        });
        rep.details = Details::Vhdx(Box::new(info));
        return Ok(());
    }
    rep.cluster_size = Some(bs);
    if md.file_parameter_flags & 1 != 0 {
        rep.feature("leave-blocks-allocated");
    }
    let chunk_ratio = ((1u64 << 23) * u64::from(md.logical_sector_size)) / bs;
    let data_blocks = div_ceil(md.virtual_disk_size, bs);
    let bat_entries = if data_blocks == 0 {
        0
    } else {
        data_blocks + (data_blocks - 1) / chunk_ratio
    };
    info.chunk_ratio = chunk_ratio;
    info.bat_entries = bat_entries;
    if bat_entries.saturating_mul(8) > bat_len {
        rep.v(Violation::VhdxBatTooSmall {
            have: bat_len / 8,
            needed: bat_entries,
        });
        rep.details = Details::Vhdx(Box::new(info));
        return Ok(());
    }
    if inp.opts.deep && md.virtual_disk_size <= inp.opts.max_virtual_size {
        let mut bad = None;
        let mut allocated = 0u64;
        for_each_entry(inp.src, bat_off, bat_entries, 8, |i, e| {
            let entry = le64(e, 0);
            let state = entry & 7;
            let off = entry & !0xf_ffff;
            let is_bitmap = (i + 1) % (chunk_ratio + 1) == 0;
            if is_bitmap {
                // Sector bitmap blocks are only present in differencing disks.
                if state == PAYLOAD_FULLY_PRESENT && !fits(off, 1 << 20, fs) {
                    bad = Some(Violation::VhdxBlockOutOfBounds { index: i, entry });
                    return false;
                }
                return true;
            }
            match state {
                0..=3 => true,
                PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT => {
                    if off < (1 << 20) || !fits(off, bs, fs) {
                        bad = Some(Violation::VhdxBlockOutOfBounds { index: i, entry });
                        return false;
                    }
                    allocated += bs;
                    true
                }
                _ => {
                    bad = Some(Violation::VhdxBlockOutOfBounds { index: i, entry });
                    false
                }
            }
        })?;
        match bad {
            Some(v) => rep.v(v),
            None => rep.allocated_size = Some(allocated),
        }
    }
    rep.details = Details::Vhdx(Box::new(info));
    Ok(())
}
