//! The three I/O traits the rest of the crate is written against.

/// Positional reads from an image file (a local file, a bucket object read by ranges, memory).
///
/// Implementations must be safe to call with any offset: reads past the end return 0 bytes.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
    /// Total size of the file in bytes.
    fn size(&self) -> std::io::Result<u64>;

    /// Reads exactly `buf.len()` bytes at `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "read past end of image file",
                    ))
                }
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let len = self.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let start = offset as usize;
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        (**self).size()
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        (**self).size()
    }
}

/// What a range of the virtual disk holds, as far as the image's metadata tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Reads as zeros and is not allocated in the image (a hole).
    Zero,
    /// Allocated: may hold data (it may still happen to be all zeros).
    Data,
}

/// A contiguous range of the virtual disk with one `ExtentKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// An image file seen as the guest sees it: a virtual disk of `virtual_size()` bytes.
///
/// Readers keep bounded memory whatever the virtual size (table caches are bounded).
pub trait VirtualDisk: Send {
    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// The allocation map of `[offset, offset + len)`, clipped to the disk, as ordered,
    /// non-overlapping, adjacent extents covering the whole range (adjacent extents of the same
    /// kind are merged). Answered from metadata only: no data cluster is read.
    fn extents(&mut self, offset: u64, len: u64) -> crate::Result<Vec<Extent>>;

    /// Fills `buf` with the virtual disk's bytes at `offset` (zeros for holes and past the end).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> crate::Result<()>;
}

/// Where writers put an image file: written front to back, with a bounded window at the start
/// (`header_window`) that may be rewritten once the body is known (headers, allocation tables).
///
/// A local file implements it with seeks; a multipart upload keeps the first part in memory
/// until `finish`.
pub trait ImageSink {
    /// Appends bytes at the current end.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()>;
    /// Appends `len` zero bytes (a file sink may leave a hole instead).
    fn write_zeros(&mut self, len: u64) -> std::io::Result<()> {
        static Z: [u8; 65536] = [0u8; 65536];
        let mut left = len;
        while left > 0 {
            let n = left.min(Z.len() as u64) as usize;
            self.write_all(&Z[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
    /// Rewrites already-written bytes at `offset`; `offset + buf.len()` must lie within the
    /// first `header_window()` bytes and within what was written so far.
    fn patch(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()>;
    /// How many leading bytes `patch` may rewrite.
    fn header_window(&self) -> u64;
    /// Bytes written so far.
    fn position(&self) -> u64;
}
