//! Raw output (optionally with an allocation bitmap) and VHD fixed (raw + footer).

use super::{AllocationBitmap, Batch, Codec, FormatWriter, Unit};
use crate::io::ImageSink;
use crate::Result;

pub(crate) struct RawWriter {
    vsize: u64,
    unit: u64,
    bitmap: Option<AllocationBitmap>,
    vhd_footer: bool,
}

impl RawWriter {
    /// `bitmap`: granularity log2 of the allocation bitmap to build. `vhd_footer`: VHD fixed.
    pub fn new(vsize: u64, bitmap: Option<u32>, vhd_footer: bool) -> Result<RawWriter> {
        let vsize = if vhd_footer {
            super::vhd::check_vhd_size(vsize)?
        } else {
            vsize
        };
        let bitmap = bitmap
            .map(|g| AllocationBitmap::new(vsize, g))
            .transpose()?;
        let unit = bitmap.as_ref().map(|b| b.granularity()).unwrap_or(64 << 10);
        Ok(RawWriter {
            vsize,
            unit,
            bitmap,
            vhd_footer,
        })
    }
}

impl FormatWriter for RawWriter {
    fn unit(&self) -> u64 {
        self.unit
    }
    fn codec(&self) -> Codec {
        Codec::None
    }
    fn virtual_size(&self) -> u64 {
        self.vsize
    }
    fn begin(&mut self, sink: &mut dyn ImageSink) -> Result<()> {
        sink.size_hint(self.vsize)?;
        Ok(())
    }

    fn batch(&mut self, b: &Batch, sink: &mut dyn ImageSink) -> Result<()> {
        let unit = self.unit;
        // Pending contiguous data run in b.buf: (start, len).
        let mut run: Option<(usize, usize)> = None;
        let mut zeros = 0u64;
        for (i, &u) in b.units.iter().enumerate() {
            let s = (b.first + i as u64) * unit;
            let len = unit.min(self.vsize - s) as usize;
            match u {
                Unit::Raw(off) => {
                    if let Some(bm) = &mut self.bitmap {
                        bm.set(b.first + i as u64);
                    }
                    if zeros > 0 {
                        sink.write_zeros(zeros)?;
                        zeros = 0;
                    }
                    match &mut run {
                        Some((rs, rl)) if *rs + *rl == off => *rl += len,
                        _ => {
                            if let Some((rs, rl)) = run.take() {
                                sink.write_all(&b.buf[rs..rs + rl])?;
                            }
                            run = Some((off, len));
                        }
                    }
                }
                _ => {
                    if let Some((rs, rl)) = run.take() {
                        sink.write_all(&b.buf[rs..rs + rl])?;
                    }
                    zeros += len as u64;
                }
            }
        }
        if let Some((rs, rl)) = run.take() {
            sink.write_all(&b.buf[rs..rs + rl])?;
        }
        if zeros > 0 {
            sink.write_zeros(zeros)?;
        }
        Ok(())
    }

    fn finish(&mut self, sink: &mut dyn ImageSink) -> Result<Option<Vec<u8>>> {
        // Disks whose size the reader rounded (VHD) end with what the units didn't cover.
        let written = sink.position();
        if written < self.vsize {
            sink.write_zeros(self.vsize - written)?;
        }
        if self.vhd_footer {
            let f = super::vhd::footer(self.vsize, 2, u64::MAX);
            sink.write_all(&f)?;
        }
        Ok(self.bitmap.as_ref().map(|b| b.to_bytes()))
    }
}
