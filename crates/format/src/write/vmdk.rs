//! VMDK streamOptimized writer (the layout VMware's exporter and ovftool produce):
//!
//! `[sparse header (GD at end)][descriptor]` padded to 64 KiB, then for every 32 MiB of the
//! disk: its non-zero grains (grain marker: LBA + compressed size, zlib data, padded to a
//! sector) followed by a GT marker and the grain table (only if a grain was stored); then a GD
//! marker + grain directory, a footer marker + footer (header copy with the GD offset), and an
//! end-of-stream marker. Nothing is ever patched; all-zero grains are omitted.

use super::{werr, Batch, Codec, FormatWriter, StateReader, StateWriter, Unit, WriteOptions};
use crate::io::ImageSink;
use crate::Result;

const F: &str = "vmdk";
const GRAIN_SECTORS: u64 = 128;
const GRAIN: u64 = GRAIN_SECTORS * 512;
const GTES: u64 = 512;
const OVERHEAD_SECTORS: u64 = 128;
const GD_AT_END: u64 = u64::MAX;
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

pub(crate) struct VmdkStreamWriter {
    sectors: u64,
    level: u32,
    name: String,
    gd: Vec<u32>,
    gt: Vec<u32>,
    gt_idx: u64,
    gt_dirty: bool,
    pos: u64,
    descriptor: Vec<u8>,
    zbuf: Vec<u8>,
}

fn sparse_header(capacity: u64, desc_sectors: u64, gd_offset: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&3u32.to_le_bytes());
    h[8..12].copy_from_slice(&0x0003_0001u32.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    h[28..36].copy_from_slice(&1u64.to_le_bytes());
    h[36..44].copy_from_slice(&desc_sectors.to_le_bytes());
    h[44..48].copy_from_slice(&(GTES as u32).to_le_bytes());
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    h[64..72].copy_from_slice(&OVERHEAD_SECTORS.to_le_bytes());
    h[73] = b'\n';
    h[74] = b' ';
    h[75] = b'\r';
    h[76] = b'\n';
    h[77..79].copy_from_slice(&1u16.to_le_bytes());
    h
}

fn marker(num_sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&num_sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

impl VmdkStreamWriter {
    pub fn new(vsize: u64, opts: &WriteOptions) -> Result<VmdkStreamWriter> {
        let sectors = vsize.div_ceil(512);
        if sectors > (64u64 << 40) / 512 {
            return Err(werr(F, "disk larger than 64 TiB"));
        }
        let gd_entries = sectors.div_ceil(GRAIN_SECTORS * GTES);
        let name: String = opts
            .vmdk_extent_name
            .chars()
            .filter(|c| !c.is_control() && *c != '"')
            .collect();
        let mut w = VmdkStreamWriter {
            sectors,
            level: opts.compression_level.clamp(1, 9),
            name: if name.is_empty() {
                "disk.vmdk".into()
            } else {
                name
            },
            gd: vec![0; gd_entries as usize],
            gt: vec![0; GTES as usize],
            gt_idx: 0,
            gt_dirty: false,
            pos: 0,
            descriptor: Vec::new(),
            zbuf: Vec::new(),
        };
        w.descriptor = w.descriptor_text().into_bytes();
        if w.descriptor.len() as u64 > (OVERHEAD_SECTORS - 1) * 512 {
            return Err(werr(F, "descriptor too long"));
        }
        Ok(w)
    }

    fn descriptor_text(&self) -> String {
        let u = super::unique_bytes();
        let cid = u32::from_le_bytes([u[0], u[1], u[2], u[3]]) | 1;
        let cyl = (self.sectors / (16 * 63)).min(16383);
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
             createType=\"streamOptimized\"\n\n# Extent description\nRW {} SPARSE \"{}\"\n\n\
             # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n\
             ddb.geometry.cylinders = \"{cyl}\"\nddb.geometry.heads = \"16\"\n\
             ddb.geometry.sectors = \"63\"\nddb.adapterType = \"lsilogic\"\n",
            self.sectors, self.name
        )
    }

    fn desc_sectors(&self) -> u64 {
        (self.descriptor.len() as u64).div_ceil(512)
    }

    fn write(&mut self, data: &[u8], sink: &mut dyn ImageSink) -> Result<()> {
        sink.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn pad_sector(&mut self, sink: &mut dyn ImageSink) -> Result<()> {
        let r = self.pos % 512;
        if r != 0 {
            sink.write_zeros(512 - r)?;
            self.pos += 512 - r;
        }
        Ok(())
    }

    fn sector(&self) -> Result<u32> {
        u32::try_from(self.pos / 512).map_err(|_| werr(F, "file beyond 2 TiB of sectors"))
    }

    fn flush_gt(&mut self, sink: &mut dyn ImageSink) -> Result<()> {
        if !self.gt_dirty {
            return Ok(());
        }
        self.write(&marker(GTES * 4 / 512, MARKER_GT), sink)?;
        let at = self.sector()?;
        let bytes: Vec<u8> = self.gt.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.write(&bytes, sink)?;
        if let Some(e) = self.gd.get_mut(self.gt_idx as usize) {
            *e = at;
        }
        self.gt.fill(0);
        self.gt_dirty = false;
        Ok(())
    }

    fn grain(&mut self, lba: u64, compressed: &[u8], sink: &mut dyn ImageSink) -> Result<u32> {
        let at = self.sector()?;
        let mut m = [0u8; 12];
        m[0..8].copy_from_slice(&lba.to_le_bytes());
        m[8..12].copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        self.write(&m, sink)?;
        self.write(compressed, sink)?;
        self.pad_sector(sink)?;
        Ok(at)
    }
}

impl FormatWriter for VmdkStreamWriter {
    fn unit(&self) -> u64 {
        GRAIN
    }
    fn codec(&self) -> Codec {
        Codec::Zlib(self.level)
    }
    fn virtual_size(&self) -> u64 {
        self.sectors * 512
    }

    fn begin(&mut self, sink: &mut dyn ImageSink) -> Result<()> {
        let h = sparse_header(self.sectors, self.desc_sectors(), GD_AT_END);
        self.write(&h, sink)?;
        let d = std::mem::take(&mut self.descriptor);
        self.write(&d, sink)?;
        self.descriptor = d;
        let rest = OVERHEAD_SECTORS * 512 - self.pos;
        sink.write_zeros(rest)?;
        self.pos += rest;
        Ok(())
    }

    fn batch(&mut self, b: &Batch, sink: &mut dyn ImageSink) -> Result<()> {
        for (i, &u) in b.units.iter().enumerate() {
            let g = b.first + i as u64;
            if g / GTES != self.gt_idx {
                self.flush_gt(sink)?;
                self.gt_idx = g / GTES;
            }
            let at = match u {
                Unit::Hole | Unit::Zero => continue,
                Unit::Comp(..) => self.grain(g * GRAIN_SECTORS, super::unit_bytes(b, u), sink)?,
                Unit::Raw(_) => {
                    // The workers keep every grain compressed; this is only a fallback.
                    let mut z = flate2::Compress::new(flate2::Compression::new(self.level), true);
                    let mut out = std::mem::take(&mut self.zbuf);
                    out.clear();
                    out.reserve(GRAIN as usize * 2);
                    z.compress_vec(
                        super::unit_bytes(b, u),
                        &mut out,
                        flate2::FlushCompress::Finish,
                    )
                    .map_err(|e| werr(F, format!("deflate: {e}")))?;
                    let at = self.grain(g * GRAIN_SECTORS, &out, sink)?;
                    self.zbuf = out;
                    at
                }
            };
            self.gt[(g % GTES) as usize] = at;
            self.gt_dirty = true;
        }
        Ok(())
    }

    fn save(&self) -> Option<Vec<u8>> {
        let mut s = StateWriter(Vec::new());
        s.u64(self.pos)
            .u64(self.gt_idx)
            .u64(u64::from(self.gt_dirty))
            .u32s(&self.gd)
            .u32s(&self.gt);
        Some(s.0)
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, F);
        self.pos = r.u64()?;
        self.gt_idx = r.u64()?;
        self.gt_dirty = r.u64()? != 0;
        r.u32s(&mut self.gd)?;
        r.u32s(&mut self.gt)?;
        r.end()
    }

    fn finish(&mut self, sink: &mut dyn ImageSink) -> Result<Option<Vec<u8>>> {
        self.flush_gt(sink)?;
        let gd_bytes: Vec<u8> = self.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        let gd_sectors = (gd_bytes.len() as u64).div_ceil(512);
        self.write(&marker(gd_sectors, MARKER_GD), sink)?;
        let gd_at = self.pos / 512;
        self.write(&gd_bytes, sink)?;
        self.pad_sector(sink)?;
        self.write(&marker(1, MARKER_FOOTER), sink)?;
        let footer = sparse_header(self.sectors, self.desc_sectors(), gd_at);
        self.write(&footer, sink)?;
        self.write(&marker(0, MARKER_EOS), sink)?;
        Ok(None)
    }
}
