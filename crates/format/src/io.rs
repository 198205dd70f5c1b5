//! The three I/O traits the rest of the crate is written against.

/// Positional reads from an image file (a local file, a bucket object read by ranges, memory).
///
/// Implementations must be safe to call with any offset: reads past the end return 0 bytes.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
    /// Total size of the file in bytes.
    fn size(&self) -> std::io::Result<u64>;

    /// The ranges `(offset, len)` of `[offset, offset + len)` that may hold data, as the
    /// storage knows it without reading (e.g. `SEEK_DATA`/`SEEK_HOLE` on a local file).
    /// `None` means "unknown: treat everything as data" (the default).
    fn allocated_ranges(
        &self,
        _offset: u64,
        _len: u64,
    ) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }

    /// The content address of `[offset, offset + len)` when the storage holds exactly these
    /// bytes as one whole chunk of a content-addressed store (the BLAKE3 hash of the bytes;
    /// `Some(None)`: a chunk of zeros); `None` when it does not know (the default). Lets a store
    /// that already holds the bytes reference them instead of copying them.
    fn stored_chunk(&self, _offset: u64, _len: u64) -> Option<Option<[u8; 32]>> {
        None
    }

    /// `[offset, offset + len)` as runs of chunks a content-addressed store holds (and runs of
    /// zeros), in order, when the storage knows it without reading; `None` when it does not
    /// (the default). Lets a store compose a chunk of a disk image from byte ranges of chunks
    /// it already holds instead of copying them (see [`VirtualDisk::stored_slices`]).
    fn stored_slices(&self, _offset: u64, _len: u64) -> Option<Vec<StoredSlice>> {
        None
    }

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
    fn allocated_ranges(&self, offset: u64, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        file_allocated_ranges(self, offset, len)
    }
}

/// `SEEK_DATA`/`SEEK_HOLE` walk of `[offset, offset + len)`; `None` if the filesystem can't say.
fn file_allocated_ranges(
    f: &std::fs::File,
    offset: u64,
    len: u64,
) -> std::io::Result<Option<Vec<(u64, u64)>>> {
    use std::os::unix::io::AsRawFd;
    let size = f.metadata()?.len();
    let end = offset.saturating_add(len).min(size);
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        // SAFETY: lseek on a valid fd owned by `f`; only the (unused) file cursor moves, all
        // reads in this crate are positional.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(Some(out)),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Ok(None);
        }
        let hole = (hole as u64).min(end);
        if hole <= data {
            return Ok(None);
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(Some(out))
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
    fn stored_slices(&self, offset: u64, len: u64) -> Option<Vec<StoredSlice>> {
        (**self).stored_slices(offset, len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        (**self).size()
    }
    fn allocated_ranges(&self, offset: u64, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        (**self).allocated_ranges(offset, len)
    }
    fn stored_chunk(&self, offset: u64, len: u64) -> Option<Option<[u8; 32]>> {
        (**self).stored_chunk(offset, len)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Box<T> {
    fn stored_slices(&self, offset: u64, len: u64) -> Option<Vec<StoredSlice>> {
        (**self).stored_slices(offset, len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        (**self).size()
    }
    fn allocated_ranges(&self, offset: u64, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        (**self).allocated_ranges(offset, len)
    }
    fn stored_chunk(&self, offset: u64, len: u64) -> Option<Option<[u8; 32]>> {
        (**self).stored_chunk(offset, len)
    }
}

/// A run of bytes as a content-addressed chunk store holds it ([`ReadAt::stored_slices`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredSlice {
    /// `len` bytes of the stored chunk whose content address (BLAKE3) is `chunk`, from
    /// byte `offset` of that chunk.
    Chunk {
        chunk: [u8; 32],
        offset: u32,
        len: u32,
    },
    /// `len` zero bytes.
    Zero { len: u32 },
}

impl StoredSlice {
    /// Bytes the slice stands for.
    pub fn len(&self) -> u32 {
        match self {
            StoredSlice::Chunk { len, .. } | StoredSlice::Zero { len } => *len,
        }
    }

    /// True for a slice of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The part of `slices` (covering consecutive bytes) that covers bytes
    /// `[from, from + len)` of them.
    pub fn range(slices: &[StoredSlice], from: u64, len: u64) -> Vec<StoredSlice> {
        let end = from.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = 0u64;
        for s in slices {
            let (a, b) = (pos, pos + u64::from(s.len()));
            pos = b;
            let (lo, hi) = (a.max(from), b.min(end));
            if lo >= hi {
                continue;
            }
            let (skip, n) = ((lo - a) as u32, (hi - lo) as u32);
            let part = match *s {
                StoredSlice::Chunk { chunk, offset, .. } => StoredSlice::Chunk {
                    chunk,
                    offset: offset + skip,
                    len: n,
                },
                StoredSlice::Zero { .. } => StoredSlice::Zero { len: n },
            };
            StoredSlice::push(&mut out, part);
        }
        out
    }

    /// Appends `s` to `v`, merging it into the last slice when it continues it (the next
    /// bytes of the same chunk, or more zeros); empty slices are dropped.
    pub fn push(v: &mut Vec<StoredSlice>, s: StoredSlice) {
        if s.is_empty() {
            return;
        }
        if !v.last_mut().is_some_and(|last| last.extend(&s)) {
            v.push(s);
        }
    }

    /// Extends `self` by `next` when `next` continues it (the next bytes of the same chunk, or
    /// more zeros); `false` (and `self` unchanged) otherwise.
    pub fn extend(&mut self, next: &StoredSlice) -> bool {
        match (self, *next) {
            (
                StoredSlice::Chunk { chunk, offset, len },
                StoredSlice::Chunk {
                    chunk: c,
                    offset: o,
                    len: l,
                },
            ) if *chunk == c && offset.checked_add(*len) == Some(o) => *len += l,
            (StoredSlice::Zero { len }, StoredSlice::Zero { len: l }) => *len += l,
            _ => return false,
        }
        true
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

    /// When the image stores the virtual range `[offset, offset + len)` verbatim and
    /// contiguously, and its source knows those bytes as one stored chunk
    /// ([`ReadAt::stored_chunk`]), that chunk's content address; `None` otherwise (read the
    /// range). Answered from metadata only. Default: `None`.
    fn stored_chunk(&mut self, _offset: u64, _len: u64) -> crate::Result<Option<Option<[u8; 32]>>> {
        Ok(None)
    }

    /// The virtual range `[offset, offset + len)` as byte ranges of chunks the image's source
    /// holds in a content-addressed store ([`ReadAt::stored_slices`]) and runs of zeros, when
    /// the image stores every cluster of the range verbatim (no compression) or as a hole;
    /// `None` otherwise (read the range). Answered from metadata only. Default: `None`.
    fn stored_slices(
        &mut self,
        _offset: u64,
        _len: u64,
    ) -> crate::Result<Option<Vec<StoredSlice>>> {
        Ok(None)
    }
}

impl<T: VirtualDisk + ?Sized> VirtualDisk for Box<T> {
    fn virtual_size(&self) -> u64 {
        (**self).virtual_size()
    }
    fn extents(&mut self, offset: u64, len: u64) -> crate::Result<Vec<Extent>> {
        (**self).extents(offset, len)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn stored_chunk(&mut self, offset: u64, len: u64) -> crate::Result<Option<Option<[u8; 32]>>> {
        (**self).stored_chunk(offset, len)
    }
    fn stored_slices(&mut self, offset: u64, len: u64) -> crate::Result<Option<Vec<StoredSlice>>> {
        (**self).stored_slices(offset, len)
    }
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
    /// Called once before the first write with how many leading bytes the writer will patch
    /// at the end (its headers and allocation tables): a sink that holds its header window in
    /// memory sizes it from this. Default: no-op (a file sink can patch anywhere).
    fn reserve_header(&mut self, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    /// Bytes written so far.
    fn position(&self) -> u64;
    /// Tells the sink the output will be at least `len` bytes long (a file sink may size the
    /// file up front: writes inside the file are cheaper than extending ones). Default: no-op.
    fn size_hint(&mut self, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    /// Called once after the last write or patch: flush buffers, fix the final length (a file
    /// sink ending in a hole). The default does nothing.
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Makes everything written so far durable where the sink can at this point (a multipart
    /// upload closes its part), so a write that stops here can be resumed from here (see
    /// `write::write_image_resumable`). `Ok(false)`: not now (try again later). Default: never.
    fn seal(&mut self) -> std::io::Result<bool> {
        Ok(false)
    }
    /// Whether the sink uses [`ImageSink::write_sliced`]'s slices (writers then ask the disk
    /// for them). Default: `false`.
    fn wants_slices(&self) -> bool {
        false
    }
    /// Appends `buf`, which the disk being written holds as `slices` of chunks of a
    /// content-addressed store (they cover `buf` exactly): a sink storing into that store may
    /// reference them instead of storing the bytes again. Default: [`ImageSink::write_all`].
    fn write_sliced(&mut self, buf: &[u8], _slices: &[StoredSlice]) -> std::io::Result<()> {
        self.write_all(buf)
    }
}
