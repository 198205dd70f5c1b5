//! VMDK: hosted sparse extent header (`KDMV`), embedded or standalone text descriptor,
//! streamOptimized footer, and checks. Binary fields are little-endian.

use super::bytes::{div_ceil, fits, le16, le32, le64, printable, read_padded, slice};
use super::{for_each_entry, Details, Input, Report, Violation};
use crate::DiskFormat;
use serde::Serialize;

/// Sparse extent magic as bytes on disk.
pub const MAGIC: &[u8] = b"KDMV";
/// VMDK3 / ESX "COWD" sparse magic (refused).
pub const COWD_MAGIC: &[u8] = b"COWD";
/// `gd_offset` value meaning "grain directory location is in the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// Header flag: redundant grain table present.
pub const FLAG_RGD: u32 = 1 << 1;
/// Header flag: GTE value 1 means a zeroed grain.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Header flag: stream markers are used (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Largest descriptor accepted (qemu's limit).
pub const MAX_DESCRIPTOR: u64 = (1 << 20) - 1;
/// Marker type of the footer marker.
pub const MARKER_FOOTER: u32 = 3;

/// The 512-byte hosted sparse extent header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SparseExtentHeader {
    /// 1, 2 or 3.
    pub version: u32,
    /// Flags (see `FLAG_*`).
    pub flags: u32,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    /// Embedded descriptor offset in sectors (0 = none).
    pub descriptor_offset: u64,
    /// Embedded descriptor size in sectors.
    pub descriptor_size: u64,
    /// Grain table entries per grain table (512).
    pub num_gtes_per_gt: u32,
    /// Redundant grain directory offset in sectors.
    pub rgd_offset: u64,
    /// Grain directory offset in sectors (`GD_AT_END` for streamOptimized: see footer).
    pub gd_offset: u64,
    /// Metadata overhead in sectors.
    pub overhead: u64,
    /// Unclean shutdown flag.
    pub unclean_shutdown: bool,
    /// 0 none, 1 deflate.
    pub compress_algorithm: u16,
}

impl SparseExtentHeader {
    /// Parses a header (magic not checked).
    pub fn parse(b: &[u8]) -> SparseExtentHeader {
        SparseExtentHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_size: le64(b, 20),
            descriptor_offset: le64(b, 28),
            descriptor_size: le64(b, 36),
            num_gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            unclean_shutdown: b.get(72).copied().unwrap_or(0) != 0,
            compress_algorithm: le16(b, 77),
        }
    }
    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size.saturating_mul(512)
    }
    /// Number of grain directory entries needed for the capacity.
    pub fn gd_entries(&self) -> u64 {
        div_ceil(
            self.capacity,
            self.grain_size
                .saturating_mul(u64::from(self.num_gtes_per_gt)),
        )
    }
}

/// One extent line of a descriptor: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtentLine {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// Size in sectors.
    pub sectors: u64,
    /// `SPARSE`, `FLAT`, `ZERO`, `VMFS`, `VMFSSPARSE`, ...
    pub kind: String,
    /// File name, if any.
    pub file: Option<String>,
    /// Offset in the extent file, if any.
    pub offset: Option<u64>,
    /// The line as written (printable, truncated to 256 characters).
    pub line: String,
}

/// A parsed VMDK text descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    /// `version=`.
    pub version: Option<String>,
    /// `CID=`.
    pub cid: Option<String>,
    /// `parentCID=` (`ffffffff` = no parent).
    pub parent_cid: Option<String>,
    /// `createType=` without quotes.
    pub create_type: Option<String>,
    /// `parentFileNameHint=`.
    pub parent_file_name_hint: Option<String>,
    /// Extent lines (at most 1024 kept).
    pub extents: Vec<ExtentLine>,
    /// Number of `ddb.*` lines.
    pub ddb_lines: usize,
    /// Other `key=value` lines, capped at 64.
    pub other: Vec<(String, String)>,
}

fn unquote(s: &str) -> String {
    s.trim().trim_matches('"').to_string()
}

impl Descriptor {
    /// Parses descriptor text (stops at the first NUL). Rejects non-ASCII text and any line
    /// that is not a comment, `key=value`, `ddb...` or extent line.
    pub fn parse(raw: &[u8]) -> Result<Descriptor, String> {
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let raw = &raw[..end];
        if !raw.is_ascii() {
            return Err("descriptor is not ASCII text".into());
        }
        let text = std::str::from_utf8(raw).map_err(|_| "descriptor is not text".to_string())?;
        let mut d = Descriptor::default();
        for (n, line) in text.lines().enumerate() {
            if n > 100_000 {
                return Err("descriptor has too many lines".into());
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            let upper = first.to_ascii_uppercase();
            if line.starts_with("ddb") {
                d.ddb_lines += 1;
            } else if matches!(upper.as_str(), "RW" | "RDONLY" | "NOACCESS") {
                if d.extents.len() >= 1024 {
                    return Err("descriptor has too many extents".into());
                }
                d.extents.push(parse_extent(line)?);
            } else if let Some((k, v)) = line.split_once('=') {
                let k = k.trim();
                if k.is_empty() || k.contains(char::is_whitespace) {
                    return Err(format!("invalid line {:?}", printable(line.as_bytes(), 80)));
                }
                let v = unquote(v);
                match k.to_ascii_lowercase().as_str() {
                    "version" => d.version = Some(v),
                    "cid" => d.cid = Some(v),
                    "parentcid" => d.parent_cid = Some(v),
                    "createtype" => d.create_type = Some(v),
                    "parentfilenamehint" => d.parent_file_name_hint = Some(v),
                    _ => {
                        if d.other.len() < 64 {
                            d.other.push((k.to_string(), v));
                        }
                    }
                }
            } else {
                return Err(format!("invalid line {:?}", printable(line.as_bytes(), 80)));
            }
        }
        Ok(d)
    }
}

fn parse_extent(line: &str) -> Result<ExtentLine, String> {
    let bad = || format!("invalid extent line {:?}", printable(line.as_bytes(), 80));
    let mut rest = line;
    let mut word = || {
        let t = rest.trim_start();
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        let (w, r) = t.split_at(end);
        rest = r;
        w
    };
    let access = word().to_string();
    let sectors = word().parse::<u64>().map_err(|_| bad())?;
    let kind = word().to_ascii_uppercase();
    if kind.is_empty() {
        return Err(bad());
    }
    let t = rest.trim();
    let (file, tail) = if let Some(q) = t.strip_prefix('"') {
        let close = q.find('"').ok_or_else(bad)?;
        (Some(q[..close].to_string()), q[close + 1..].trim())
    } else if t.is_empty() {
        (None, "")
    } else {
        return Err(bad());
    };
    let offset = if tail.is_empty() {
        None
    } else {
        Some(tail.parse::<u64>().map_err(|_| bad())?)
    };
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
        line: printable(line.as_bytes(), 256),
    })
}

/// Everything `inspect` parsed from a VMDK file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VmdkInfo {
    /// The sparse header (absent for text descriptor files).
    pub header: Option<SparseExtentHeader>,
    /// The streamOptimized footer header, when the grain directory is at the end.
    pub footer: Option<SparseExtentHeader>,
    /// The grain directory offset in bytes actually in force (header or footer).
    pub gd_offset_bytes: Option<u64>,
    /// The parsed descriptor.
    pub descriptor: Option<Descriptor>,
}

/// Would qemu probe these first bytes as VMDK? (`KDMV`, `COWD`, or a text descriptor whose
/// first non-comment line is `version=1|2|3`.)
pub fn probe(h: &[u8]) -> bool {
    if h.starts_with(MAGIC) || h.starts_with(COWD_MAGIC) {
        return true;
    }
    let mut p = 0usize;
    while p < h.len() {
        match h[p] {
            b'#' => {
                while p < h.len() && h[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < h.len() && h[p] == b' ' {
                    p += 1;
                }
                if p < h.len() && h[p] == b'\r' {
                    p += 1;
                }
                if p >= h.len() || h[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &h[p..];
                return [b"version=1", b"version=2", b"version=3"].iter().any(|v| {
                    rest.starts_with(*v)
                        && (rest.get(9) == Some(&b'\n')
                            || (rest.get(9) == Some(&b'\r') && rest.get(10) == Some(&b'\n')))
                });
            }
        }
    }
    false
}

fn check_descriptor(d: &Descriptor, rep: &mut Report) {
    let ct = d.create_type.clone().unwrap_or_default();
    if !ct.is_empty() {
        rep.feature(&ct);
    }
    let lc = ct.to_ascii_lowercase();
    if lc != "monolithicsparse" && lc != "streamoptimized" {
        rep.v(Violation::VmdkUnsupportedCreateType {
            create_type: printable(ct.as_bytes(), 64),
        });
    }
    if d.parent_cid
        .as_deref()
        .is_some_and(|p| !p.eq_ignore_ascii_case("ffffffff"))
        || d.parent_file_name_hint.is_some()
    {
        rep.v(Violation::VmdkParent);
    }
    if d.extents.len() != 1 {
        rep.v(Violation::VmdkExtentCount {
            count: d.extents.len(),
        });
    }
    for e in &d.extents {
        if e.kind != "SPARSE" {
            rep.v(Violation::VmdkExternalExtent {
                line: e.line.clone(),
            });
        }
        if let Some(f) = &e.file {
            if f.is_empty()
                || f.contains(['/', '\\', ':'])
                || f.starts_with('.')
                || f.contains("..")
            {
                rep.v(Violation::VmdkExtentPath {
                    file: printable(f.as_bytes(), 256),
                });
            }
        }
    }
}

pub(crate) fn analyze(inp: &Input, rep: &mut Report) -> std::io::Result<()> {
    let f = DiskFormat::Vmdk;
    let fs = inp.file_size;
    let mut info = VmdkInfo::default();
    if inp.head.starts_with(COWD_MAGIC) {
        rep.v(Violation::VmdkUnsupportedVersion {
            version: le32(inp.head, 4),
        });
        rep.feature("vmfsSparse");
        rep.details = Details::Vmdk(Box::new(info));
        return Ok(());
    }
    if !inp.head.starts_with(MAGIC) {
        // A text descriptor file: the data lives in other files, by definition.
        rep.v(Violation::VmdkDescriptorOnly);
        match Descriptor::parse(inp.head) {
            Ok(d) => {
                check_descriptor(&d, rep);
                rep.virtual_size = d
                    .extents
                    .iter()
                    .fold(0u64, |a, e| a.saturating_add(e.sectors.saturating_mul(512)));
                info.descriptor = Some(d);
            }
            Err(reason) => rep.v(Violation::VmdkInvalidDescriptor { reason }),
        }
        rep.details = Details::Vmdk(Box::new(info));
        return Ok(());
    }
    if inp.head.len() < 512 {
        rep.truncated(f, 512, fs);
    }
    let h = SparseExtentHeader::parse(inp.head);
    rep.virtual_size = h.capacity.saturating_mul(512);
    info.header = Some(h.clone());
    if !(1..=3).contains(&h.version) {
        rep.v(Violation::VmdkUnsupportedVersion { version: h.version });
        rep.details = Details::Vmdk(Box::new(info));
        return Ok(());
    }
    if h.flags & FLAG_COMPRESSED != 0 {
        rep.feature("compressed-grains");
    }
    if h.flags & FLAG_MARKERS != 0 {
        rep.feature("markers");
    }
    if h.compress_algorithm > 1 {
        rep.v(Violation::VmdkUnknownCompression {
            algorithm: h.compress_algorithm,
        });
    }

    // Embedded descriptor.
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        rep.v(Violation::VmdkMissingDescriptor);
    } else {
        let off = h.descriptor_offset.saturating_mul(512);
        let len = h.descriptor_size.saturating_mul(512);
        if len > MAX_DESCRIPTOR + 1 || !fits(off, len.min(fs), fs) || off >= fs {
            rep.v(Violation::VmdkDescriptorOutOfBounds { offset: off, len });
        } else {
            let (b, _) = read_padded(inp.src, off, len as usize)?;
            match Descriptor::parse(&b) {
                Ok(d) => {
                    check_descriptor(&d, rep);
                    info.descriptor = Some(d);
                }
                Err(reason) => rep.v(Violation::VmdkInvalidDescriptor { reason }),
            }
        }
    }

    // Grain geometry.
    if !h.grain_size.is_power_of_two() || h.grain_size > 2048 {
        rep.v(Violation::VmdkBadGrainSize {
            reason: format!("grain size {} sectors", h.grain_size),
        });
        rep.details = Details::Vmdk(Box::new(info));
        return Ok(());
    }
    if h.num_gtes_per_gt == 0 || h.num_gtes_per_gt > 512 {
        rep.v(Violation::VmdkBadGrainSize {
            reason: format!("{} entries per grain table", h.num_gtes_per_gt),
        });
        rep.details = Details::Vmdk(Box::new(info));
        return Ok(());
    }
    rep.cluster_size = Some(h.grain_bytes());

    // Grain directory, possibly from the streamOptimized footer.
    let mut gd = h.gd_offset;
    if gd == GD_AT_END {
        match read_footer(inp, &h)? {
            Ok(foot) => {
                gd = foot.gd_offset;
                info.footer = Some(foot);
            }
            Err(reason) => {
                rep.v(Violation::VmdkBadFooter { reason });
                rep.details = Details::Vmdk(Box::new(info));
                return Ok(());
            }
        }
    }
    let gd_off = gd.saturating_mul(512);
    let entries = h.gd_entries();
    let gd_len = entries.saturating_mul(4);
    info.gd_offset_bytes = Some(gd_off);
    if gd == 0 || !fits(gd_off, gd_len, fs) {
        rep.v(Violation::VmdkGrainDirectoryOutOfBounds {
            offset: gd_off,
            len: gd_len,
        });
        rep.details = Details::Vmdk(Box::new(info));
        return Ok(());
    }
    if h.flags & FLAG_RGD != 0
        && h.gd_offset != GD_AT_END
        && !fits(h.rgd_offset.saturating_mul(512), gd_len, fs)
    {
        rep.v(Violation::VmdkGrainDirectoryOutOfBounds {
            offset: h.rgd_offset.saturating_mul(512),
            len: gd_len,
        });
    }
    if inp.opts.deep && rep.virtual_size <= inp.opts.max_virtual_size {
        deep_walk(inp, &h, gd_off, entries, rep)?;
    }
    rep.details = Details::Vmdk(Box::new(info));
    Ok(())
}

/// Reads and checks the streamOptimized footer: footer marker, footer header, end-of-stream.
fn read_footer(
    inp: &Input,
    h: &SparseExtentHeader,
) -> std::io::Result<Result<SparseExtentHeader, String>> {
    let fs = inp.file_size;
    if fs < 1536 + 512 {
        return Ok(Err("file too small for a footer".into()));
    }
    let (b, _) = read_padded(inp.src, fs - 1536, 1536)?;
    let marker = slice(&b, 0, 512);
    let fh = slice(&b, 512, 512);
    let eos = slice(&b, 1024, 512);
    if le32(marker, 8) != 0
        || le32(marker, 12) != MARKER_FOOTER
        || marker[16..].iter().any(|&c| c != 0)
    {
        return Ok(Err("footer marker is invalid".into()));
    }
    if eos.iter().any(|&c| c != 0) {
        return Ok(Err("end-of-stream marker is invalid".into()));
    }
    if !fh.starts_with(MAGIC) {
        return Ok(Err("footer signature is not KDMV".into()));
    }
    let f = SparseExtentHeader::parse(fh);
    if f.version != h.version {
        return Ok(Err("header and footer versions differ".into()));
    }
    if f.descriptor_offset != h.descriptor_offset || f.descriptor_size != h.descriptor_size {
        return Ok(Err("footer names a different descriptor".into()));
    }
    if f.capacity != h.capacity
        || f.grain_size != h.grain_size
        || f.num_gtes_per_gt != h.num_gtes_per_gt
    {
        return Ok(Err("footer geometry differs from the header".into()));
    }
    if f.gd_offset == GD_AT_END {
        return Ok(Err("footer points at another footer".into()));
    }
    Ok(Ok(f))
}

fn deep_walk(
    inp: &Input,
    h: &SparseExtentHeader,
    gd_off: u64,
    entries: u64,
    rep: &mut Report,
) -> std::io::Result<()> {
    let fs = inp.file_size;
    let gt_len = u64::from(h.num_gtes_per_gt) * 4;
    let mut gts = Vec::new();
    let mut bad = None;
    for_each_entry(inp.src, gd_off, entries, 4, |i, e| {
        let sector = u64::from(le32(e, 0));
        if sector == 0 {
            return true;
        }
        if !fits(sector * 512, gt_len, fs) {
            bad = Some(Violation::VmdkGrainTableOutOfBounds {
                index: i,
                offset: sector * 512,
            });
            return false;
        }
        gts.push((i, sector * 512));
        true
    })?;
    if let Some(v) = bad {
        rep.v(v);
        return Ok(());
    }
    let mut sorted: Vec<u64> = gts.iter().map(|g| g.1).collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        let index = gts.iter().find(|g| g.1 == w[0]).map_or(0, |g| g.0);
        rep.v(Violation::VmdkGrainTableOutOfBounds {
            index,
            offset: w[0],
        });
        return Ok(());
    }
    drop(sorted);
    let gb = h.grain_bytes();
    let compressed = h.flags & FLAG_COMPRESSED != 0;
    let zero_grain = h.flags & FLAG_ZERO_GRAIN != 0;
    let (mut grains, mut cgrains) = (0u64, 0u64);
    let per_gt = u64::from(h.num_gtes_per_gt) * gb;
    let size = rep.virtual_size;
    'outer: for (gi, off) in gts {
        let (t, _) = read_padded(inp.src, off, gt_len as usize)?;
        for (j, e) in t.chunks_exact(4).enumerate() {
            let guest = gi * per_gt + j as u64 * gb;
            if guest >= size {
                break;
            }
            let s = u64::from(le32(e, 0));
            if s == 0 || (s == 1 && zero_grain) {
                continue;
            }
            let goff = s * 512;
            let ok = if compressed {
                fits(goff, 12, fs)
            } else {
                fits(goff, gb, fs)
            };
            if !ok || goff < 512 {
                bad = Some(Violation::VmdkGrainOutOfBounds {
                    guest_offset: guest,
                });
                break 'outer;
            }
            if compressed {
                cgrains += 1;
            } else {
                grains += 1;
            }
        }
    }
    if let Some(v) = bad {
        rep.v(v);
        return Ok(());
    }
    if cgrains > 0 {
        let expanded = cgrains.saturating_mul(gb);
        let ratio = inp.opts.max_compression_ratio;
        if expanded > (1 << 30) && expanded / fs.max(1) > ratio {
            rep.v(Violation::VmdkCompressionBomb {
                expanded,
                file_size: fs,
                max_ratio: ratio,
            });
        }
    }
    rep.allocated_size = Some(grains.saturating_add(cgrains).saturating_mul(gb));
    Ok(())
}
