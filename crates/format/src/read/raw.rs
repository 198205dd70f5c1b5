//! Raw images: the file is the disk. Extents come from the storage's allocation map when it
//! has one (`SEEK_DATA`/`SEEK_HOLE`), else the whole file is `Data`.

use super::{clip, read_or_zero, ExtentList};
use crate::io::{Extent, ExtentKind, ReadAt, StoredSlice, VirtualDisk};
use crate::Result;
use std::sync::Arc;

/// Reader of raw images.
pub struct RawReader {
    src: Arc<dyn ReadAt>,
    size: u64,
}

impl RawReader {
    /// Opens a raw image; its virtual size is the file size.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<RawReader> {
        let size = src.size()?;
        Ok(RawReader { src, size })
    }
}

impl VirtualDisk for RawReader {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = clip(offset, len, self.size);
        let start = offset.min(end);
        let mut out = ExtentList::default();
        match self.src.allocated_ranges(start, end - start)? {
            None => out.push(start, end - start, ExtentKind::Data),
            Some(ranges) => {
                let mut pos = start;
                for (o, l) in ranges {
                    let o = o.clamp(pos, end);
                    let e = o.saturating_add(l).min(end);
                    out.push(pos, o - pos, ExtentKind::Zero);
                    out.push(o, e - o, ExtentKind::Data);
                    pos = pos.max(e);
                }
                out.push(pos, end - pos, ExtentKind::Zero);
            }
        }
        Ok(out.v)
    }

    fn stored_chunk(&mut self, offset: u64, len: u64) -> Result<Option<Option<[u8; 32]>>> {
        if offset.saturating_add(len) > self.size {
            return Ok(None);
        }
        Ok(self.src.stored_chunk(offset, len))
    }

    fn stored_slices(&mut self, offset: u64, len: u64) -> Result<Option<Vec<StoredSlice>>> {
        if offset.saturating_add(len) > self.size {
            return Ok(None);
        }
        Ok(self.src.stored_slices(offset, len))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_or_zero(&*self.src, buf, offset)
    }
}
