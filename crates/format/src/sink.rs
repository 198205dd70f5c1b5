//! `ImageSink` implementations: a local file (holes for zeros, buffered writes) and memory.

use crate::io::ImageSink;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Write buffer of a [`FileSink`]: small writes (one cluster) are gathered into large `pwrite`s.
const FILE_BUF: usize = 4 << 20;
/// Writes at least this large bypass the buffer (no extra copy).
const DIRECT_WRITE: usize = 256 << 10;

/// An [`ImageSink`] over a local file: positional writes through a 4 MiB buffer, zeros left
/// as holes (the final length is fixed by `finish`), `patch` anywhere already written.
pub struct FileSink {
    file: File,
    /// Offset of `buf[0]` in the file.
    buf_start: u64,
    buf: Vec<u8>,
    window: u64,
}

impl FileSink {
    /// Wraps a file opened for writing (normally freshly created or truncated to 0). Writing
    /// starts at offset 0; `header_window` bounds what `patch` may rewrite.
    pub fn new(file: File, header_window: u64) -> FileSink {
        FileSink {
            file,
            buf_start: 0,
            buf: Vec::with_capacity(FILE_BUF),
            window: header_window,
        }
    }

    /// A sink whose whole output is patchable (a local file can be rewritten anywhere).
    pub fn unbounded(file: File) -> FileSink {
        FileSink::new(file, u64::MAX)
    }

    fn flush_buf(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.buf_start)?;
            self.buf_start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Flushes and returns the file.
    pub fn into_file(mut self) -> std::io::Result<File> {
        self.finish()?;
        Ok(self.file)
    }
}

impl ImageSink for FileSink {
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.buf.len() + data.len() > FILE_BUF || data.len() >= DIRECT_WRITE {
            self.flush_buf()?;
        }
        if data.len() >= DIRECT_WRITE {
            self.file.write_all_at(data, self.buf_start)?;
            self.buf_start += data.len() as u64;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(())
    }

    fn write_zeros(&mut self, len: u64) -> std::io::Result<()> {
        if len < 4096 && (self.buf.len() as u64 + len) <= FILE_BUF as u64 {
            self.buf.resize(self.buf.len() + len as usize, 0);
            return Ok(());
        }
        self.flush_buf()?;
        self.buf_start += len;
        Ok(())
    }

    fn patch(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.window || end > self.position() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "patch outside the header window or past the written end",
            ));
        }
        self.flush_buf()?;
        self.file.write_all_at(data, offset)
    }

    fn header_window(&self) -> u64 {
        self.window
    }

    fn position(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    fn size_hint(&mut self, len: u64) -> std::io::Result<()> {
        if self.file.metadata()?.len() < len {
            self.file.set_len(len)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.flush_buf()?;
        if self.file.metadata()?.len() != self.buf_start {
            self.file.set_len(self.buf_start)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sink_mixed_writes_land_in_order() {
        let f = tempfile::tempfile().unwrap();
        let mut s = FileSink::new(f.try_clone().unwrap(), 16);
        let big = vec![7u8; DIRECT_WRITE];
        s.write_all(b"abc").unwrap();
        s.write_zeros(5).unwrap();
        s.write_all(&big).unwrap();
        s.write_zeros(10_000).unwrap();
        s.write_all(b"z").unwrap();
        s.write_zeros(100).unwrap();
        s.patch(1, b"X").unwrap();
        assert!(s.patch(10, b"0123456789").is_err());
        s.finish().unwrap();
        let mut want = b"aXc".to_vec();
        want.extend_from_slice(&[0; 5]);
        want.extend_from_slice(&big);
        want.extend_from_slice(&vec![0; 10_000]);
        want.push(b'z');
        want.extend_from_slice(&[0; 100]);
        let mut got = vec![0u8; want.len() + 1];
        let n = crate::io::ReadAt::read_at(&f, &mut got, 0).unwrap();
        assert_eq!(n, want.len());
        assert!(got[..n] == want[..]);
    }
}

/// An [`ImageSink`] into memory (tests, small images). Patchable everywhere.
#[derive(Debug, Default, Clone)]
pub struct MemSink {
    /// The bytes written so far.
    pub data: Vec<u8>,
}

impl MemSink {
    /// An empty sink.
    pub fn new() -> MemSink {
        MemSink::default()
    }
}

impl ImageSink for MemSink {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }
    fn write_zeros(&mut self, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::OutOfMemory, "too large"))?;
        self.data.resize(self.data.len() + len, 0);
        Ok(())
    }
    fn patch(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self
            .data
            .get_mut(start..)
            .and_then(|s| s.get_mut(..buf.len()))
        {
            Some(dst) => {
                dst.copy_from_slice(buf);
                Ok(())
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "patch past the written end",
            )),
        }
    }
    fn header_window(&self) -> u64 {
        u64::MAX
    }
    fn position(&self) -> u64 {
        self.data.len() as u64
    }
}
