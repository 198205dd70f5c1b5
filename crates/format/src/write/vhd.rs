//! VHD writers: dynamic (footer copy, dynamic header, BAT in the header window; 2 MiB blocks
//! each preceded by a full sector bitmap; all-zero blocks left out) and the fixed footer.
//!
//! The creator application is `qem2`, the tag qemu and Hyper-V-style readers take as "the
//! size is `current_size`", so odd sizes that CHS geometry can't express survive a round trip.

use super::{werr, Batch, Codec, FormatWriter, StateReader, StateWriter, Unit};
use crate::io::ImageSink;
use crate::read::vhd::vhd_checksum;
use crate::Result;

const F: &str = "vhd";
/// The VHD limit (2040 GiB).
const MAX_SIZE: u64 = 2040 << 30;
const BLOCK: u64 = 2 << 20;
const BITMAP: usize = 512;
const HEADER_AT: u64 = 512;
const BAT_AT: u64 = 1536;

/// Rounds the size up to whole sectors and checks the VHD limit.
pub(crate) fn check_vhd_size(vsize: u64) -> Result<u64> {
    let s = vsize.div_ceil(512) * 512;
    if s > MAX_SIZE {
        return Err(werr(F, "VHD disks are limited to 2040 GiB"));
    }
    Ok(s)
}

/// CHS geometry per the VHD specification (cylinders, heads, sectors per track).
pub(crate) fn geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads).min(65535) as u16, heads as u8, spt as u8)
}

fn vhd_timestamp() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now.saturating_sub(946_684_800) as u32
}

/// A 512-byte footer. `disk_type` 2 = fixed, 3 = dynamic.
pub(crate) fn footer(size: u64, disk_type: u32, data_offset: u64) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[24..28].copy_from_slice(&vhd_timestamp().to_be_bytes());
    f[28..32].copy_from_slice(b"qem2");
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&super::unique_bytes());
    let sum = vhd_checksum(&f, 64);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

pub(crate) struct VhdDynWriter {
    vsize: u64,
    bat: Vec<u32>,
    data_start: u64,
    footer: [u8; 512],
}

impl VhdDynWriter {
    pub fn new(vsize: u64) -> Result<VhdDynWriter> {
        let vsize = check_vhd_size(vsize)?;
        let blocks = vsize.div_ceil(BLOCK);
        let bat_bytes = (blocks * 4).div_ceil(512) * 512;
        Ok(VhdDynWriter {
            vsize,
            bat: vec![u32::MAX; blocks as usize],
            data_start: BAT_AT + bat_bytes,
            footer: footer(vsize, 3, HEADER_AT),
        })
    }

    fn dyn_header(&self) -> [u8; 1024] {
        let mut h = [0u8; 1024];
        h[0..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&BAT_AT.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(self.bat.len() as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(BLOCK as u32).to_be_bytes());
        let sum = vhd_checksum(&h, 36);
        h[36..40].copy_from_slice(&sum.to_be_bytes());
        h
    }
}

impl FormatWriter for VhdDynWriter {
    fn unit(&self) -> u64 {
        BLOCK
    }
    fn codec(&self) -> Codec {
        Codec::None
    }
    fn virtual_size(&self) -> u64 {
        self.vsize
    }
    fn header_bytes(&self) -> u64 {
        self.data_start
    }

    fn begin(&mut self, sink: &mut dyn ImageSink) -> Result<()> {
        if sink.header_window() < self.data_start || sink.position() != 0 {
            return Err(werr(
                F,
                "sink header window smaller than the VHD header + BAT",
            ));
        }
        sink.write_zeros(self.data_start)?;
        Ok(())
    }
    fn writes_slices(&self) -> bool {
        true
    }
    fn batch(&mut self, b: &Batch, sink: &mut dyn ImageSink) -> Result<()> {
        const BM: [u8; BITMAP] = [0xff; BITMAP];
        for (i, &u) in b.units.iter().enumerate() {
            if let Unit::Raw(_) = u {
                let pos = sink.position();
                let sector = u32::try_from(pos / 512)
                    .map_err(|_| werr(F, "file beyond 2 TiB of sectors"))?;
                let idx = (b.first + i as u64) as usize;
                if let Some(e) = self.bat.get_mut(idx) {
                    *e = sector;
                }
                sink.write_all(&BM)?;
                super::write_unit(sink, b, i)?;
            }
        }
        Ok(())
    }
    fn save(&self) -> Option<Vec<u8>> {
        // The footer too: it carries the creation time and a unique id.
        let mut s = StateWriter(Vec::new());
        s.bytes(&self.footer).u32s(&self.bat);
        Some(s.0)
    }
    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let mut r = StateReader::new(state, F);
        r.bytes(&mut self.footer)?;
        r.u32s(&mut self.bat)?;
        r.end()
    }
    fn finish(&mut self, sink: &mut dyn ImageSink) -> Result<Option<Vec<u8>>> {
        sink.write_all(&self.footer)?;
        sink.patch(0, &self.footer)?;
        sink.patch(HEADER_AT, &self.dyn_header())?;
        let mut bat = Vec::with_capacity((self.data_start - BAT_AT) as usize);
        for e in &self.bat {
            bat.extend_from_slice(&e.to_be_bytes());
        }
        bat.resize((self.data_start - BAT_AT) as usize, 0xff);
        sink.patch(BAT_AT, &bat)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_spec_examples() {
        // 127 MiB-ish disks use 17 or 31 sectors per track; large ones 63/255.
        let (c, h, s) = geometry(1 << 30);
        assert_eq!((h, s), (16, 63));
        assert!(c as u64 * 16 * 63 * 512 <= 1 << 30);
        let (_, h, s) = geometry(3000 << 30);
        assert_eq!((h, s), (16, 255));
    }
}
