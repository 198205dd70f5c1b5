//! Writing object files with `O_DIRECT` (the local backend's path for chunk-sized objects).
//!
//! Measured on the virtio/ext4 machines this runs on (4 MiB files, 2 writer threads, each
//! file `fdatasync`ed before its rename, as [`super::local::SyncMode::FsyncEach`] does):
//! buffered writes reach 0.3-0.5 GB/s and spend most of their CPU copying into freshly
//! allocated page-cache pages, `O_DIRECT` writes reach 1.6-1.7 GB/s with almost no CPU (the
//! device reads the user buffer). Chunks are written once and read back rarely (exports,
//! downloads, replication), so bypassing the page cache costs little on reads.
//!
//! `O_DIRECT` needs the buffer, the file offset and the length aligned to the device's
//! logical block size: the bytes are copied into a reused, [`ALIGN`]-aligned buffer padded to
//! a multiple of [`ALIGN`], written, and the file is truncated back to its real length.
//! File systems without `O_DIRECT` (tmpfs) are detected when the backend opens and keep
//! buffered writes.
//!
//! Reads of large objects use `O_DIRECT` too ([`read_file`]), into the same pooled aligned
//! buffers, handed out as [`ObjectBuf`]s that return to the pool when dropped. Measured on
//! the same machines: a buffered read of a chunk file written with `O_DIRECT` (so not in the
//! page cache) costs the disk read plus a kernel copy into a fresh user buffer, which showed
//! as the largest single cost (12-38 % of cycles) of streaming encryption; the direct read
//! costs the disk read only. Writers can also fill the aligned buffer in place
//! ([`write_with`]): an encrypted chunk is encrypted straight into the buffer that is written.
//!
//! A file whose pages are all in the page cache is read from there instead (a memory copy
//! rather than a disk read; `cachestat(2)` tells, see [`read_file`]). Bucket objects put
//! there on purpose: after an object's chunk is written (with `O_DIRECT`, as any other) the
//! kernel is asked to read it back in the background ([`prefetch`]), because an uploaded
//! image file is usually imported right away (S4: upload, then register). An upload is
//! bound by the network and the hashing of the request, and leaves the disk idle most of the
//! time; the import then reads the object from memory and only writes. Measured (1 GiB of
//! data in a 4 GiB qcow2 file, boto3 upload then `create_image`): import 0.66-0.87 s instead
//! of 1.18-1.84 s, upload unchanged within the noise (3.0-3.6 s). Writing the object through
//! the page cache instead (buffered writes) cached it too, but its copy cost the upload
//! 10-40 % (4.3-5.5 s).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Alignment of buffer, offsets and lengths: 4096 covers 512- and 4096-byte sector devices.
pub const ALIGN: usize = 4096;
/// Objects smaller than this are written buffered (manifests, small tails: the copy is cheap
/// and the padding would dominate).
pub const MIN_DIRECT: usize = 256 << 10;
/// Aligned buffers kept for reuse (readers and writers of a few concurrent pipelines; more
/// are freed after use). At 4-5 MiB each this bounds the retained memory to ~40 MiB.
const POOL_MAX: usize = 8;

/// A heap buffer aligned to [`ALIGN`] whose pages stay mapped across reuses.
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the buffer is plain owned memory; it is only accessed through `&mut self`.
unsafe impl Send for AlignedBuf {}
// SAFETY: no interior mutability: shared references only give shared slices.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn new(cap: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(cap, ALIGN).ok()?;
        // SAFETY: `cap` > 0 (callers pass a rounded-up length >= MIN_DIRECT).
        let ptr = unsafe { alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(AlignedBuf { ptr, cap })
    }

    fn as_slice(&self, len: usize) -> &[u8] {
        assert!(len <= self.cap);
        // SAFETY: `ptr` is valid for `cap` bytes and initialized (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr, len) }
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.cap);
        // SAFETY: `ptr` is valid for `cap` bytes, initialized (zeroed at allocation), and
        // borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.cap, ALIGN)) }
    }
}

static POOL: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());

fn take_buf(len: usize) -> Option<AlignedBuf> {
    let len = len.max(ALIGN);
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = pool.iter().position(|b| b.cap >= len) {
        return Some(pool.swap_remove(i));
    }
    drop(pool);
    // Round capacities up to 1 MiB steps so buffers fit the next objects too.
    AlignedBuf::new(len.div_ceil(1 << 20) * (1 << 20))
}

fn give_buf(b: AlignedBuf) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_MAX {
        pool.push(b);
    }
}

/// Whether `dir`'s file system accepts `O_DIRECT` writes of [`ALIGN`]-aligned buffers
/// (probed with a temp file that is removed again).
pub fn supported(dir: &Path) -> bool {
    let probe = dir.join(format!(".direct-probe-{}", std::process::id()));
    let ok = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)?;
        let mut b = AlignedBuf::new(ALIGN).ok_or_else(|| std::io::Error::other("alloc"))?;
        f.write_all(b.as_mut_slice(ALIGN))
    })()
    .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Writes `data` as the whole content of the new file `path` with `O_DIRECT`, and
/// `fdatasync`s it when `sync` is set (an existing file is truncated first). Errors leave a
/// partial file for the caller to remove.
pub fn write_file(path: &Path, data: &[u8], sync: bool) -> std::io::Result<()> {
    write_with(path, data.len(), sync, |b| {
        b.copy_from_slice(data);
        Ok::<(), std::io::Error>(())
    })
}

/// Like [`write_file`] for content that `fill` writes into the (aligned) buffer itself: it
/// gets exactly `len` bytes to fill, and the file is written only if it returns `Ok`.
pub fn write_with<E: From<std::io::Error>>(
    path: &Path,
    len: usize,
    sync: bool,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    let padded = len.div_ceil(ALIGN) * ALIGN;
    let mut buf = take_buf(padded).ok_or_else(|| std::io::Error::other("no aligned buffer"))?;
    let res = (|| {
        let b = buf.as_mut_slice(padded);
        fill(&mut b[..len])?;
        b[len..].fill(0);
        let write = || -> std::io::Result<()> {
            let mut f: File = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)?;
            f.write_all(b)?;
            if padded != len {
                f.set_len(len as u64)?;
            }
            if sync {
                f.sync_data()?;
            }
            Ok(())
        };
        write().map_err(E::from)
    })();
    give_buf(buf);
    res
}

/// Reads the whole file `path` into a pooled aligned buffer: from the page cache if all of
/// it is there, else with `O_DIRECT`. Files smaller
/// than [`MIN_DIRECT`] are read buffered (they may well be in the page cache). An `EINVAL`
/// error means the file system refused direct reads; the caller reads buffered instead.
pub fn read_file(path: &Path) -> std::io::Result<ObjectBuf> {
    read_file_from(path).map(|(buf, _)| buf)
}

/// [`read_file`], and whether the bytes came from the page cache.
fn read_file_from(path: &Path) -> std::io::Result<(ObjectBuf, bool)> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let size = usize::try_from(size).map_err(|_| std::io::Error::other("file too large"))?;
    if size < MIN_DIRECT {
        let mut v = Vec::with_capacity(size);
        std::io::Read::read_to_end(&mut &f, &mut v)?;
        return Ok((ObjectBuf::from(v), false));
    }
    // Objects never change once written, so the size read above is the size to read.
    let padded = size.div_ceil(ALIGN) * ALIGN;
    let mut buf = take_buf(padded).ok_or_else(|| std::io::Error::other("no aligned buffer"))?;
    if read_cached(&f, buf.as_mut_slice(size)) {
        let buf = ObjectBuf {
            mem: Mem::Aligned(Some(buf)),
            start: 0,
            end: size,
        };
        return Ok((buf, true));
    }
    // Not (all) in the page cache: switch the open file to direct I/O (Linux allows it with
    // F_SETFL).
    // SAFETY: `f` is an open descriptor for the duration of the calls.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) < 0 {
            let e = std::io::Error::last_os_error();
            give_buf(buf);
            return Err(e);
        }
    }
    let mut done = 0usize;
    let res = (|| {
        let b = buf.as_mut_slice(padded);
        while done < padded {
            let n = f.read_at(&mut b[done..], done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
            if done % ALIGN != 0 {
                break; // A short read ends at the end of the file.
            }
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok((
            ObjectBuf {
                mem: Mem::Aligned(Some(buf)),
                start: 0,
                end: done,
            },
            false,
        )),
        Err(e) => {
            give_buf(buf);
            Err(e)
        }
    }
}

/// Asks the kernel to read the file `path` into the page cache in the background
/// (`POSIX_FADV_WILLNEED`); errors are ignored (it is only a hint).
pub fn prefetch(path: &Path) {
    if let Ok(f) = File::open(path) {
        // SAFETY: `f` is an open descriptor for the duration of the call.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
}

/// `cachestat(2)` (Linux 6.5): how many pages of a file range are in the page cache. The
/// number is the same on every architecture (the unified syscall table from 424 on).
const SYS_CACHESTAT: libc::c_long = 451;
/// Cleared when the kernel (or a seccomp filter) refuses `cachestat`: reads then go to the
/// disk directly, as before it existed.
static CACHESTAT: AtomicBool = AtomicBool::new(true);

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Reads all of `out.len()` bytes of `f` from the page cache if every page of the file is
/// there; `false` otherwise (the caller then reads from the disk with `O_DIRECT`). Bucket
/// objects are written through the page cache ([`crate::Backend::put_cached`]), so an object
/// read soon after its upload costs a memory copy instead of a disk read.
///
/// The check comes first because a buffered read that misses starts a readahead, so a cold
/// file would be read from the disk twice (measured with `preadv2(RWF_NOWAIT)` as the check,
/// which starts that readahead too: 0.7 GB/s instead of 1.2-1.5 GB/s for cold 4 MiB files).
fn read_cached(f: &File, out: &mut [u8]) -> bool {
    if !CACHESTAT.load(Ordering::Relaxed) {
        return false;
    }
    let range = CachestatRange { off: 0, len: 0 }; // len 0: to the end of the file
    let mut cs = Cachestat::default();
    // SAFETY: both pointers are valid for the call; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
        ) {
            CACHESTAT.store(false, Ordering::Relaxed);
        }
        return false;
    }
    if (cs.nr_cache as usize).saturating_mul(page_size()) < out.len() {
        return false;
    }
    // Every page is there, though perhaps still being read in by a prefetch: a plain read
    // waits for it rather than reading the disk a second time.
    let mut done = 0usize;
    while done < out.len() {
        match std::os::unix::fs::FileExt::read_at(f, &mut out[done..], done as u64) {
            Ok(0) | Err(_) => return false,
            Ok(n) => done += n,
        }
    }
    true
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

enum Mem {
    Vec(Vec<u8>),
    /// Always `Some` until dropped (then returned to the pool).
    Aligned(Option<AlignedBuf>),
}

/// An object's bytes as read by [`crate::Backend::get_buf`]: a plain `Vec` or a pooled
/// aligned buffer (returned to the pool on drop), seen through a window that
/// [`ObjectBuf::narrow`] can shrink (e.g. to the plaintext of a chunk decrypted in place).
pub struct ObjectBuf {
    mem: Mem,
    start: usize,
    end: usize,
}

impl ObjectBuf {
    /// Shrinks the window to `range` (relative to the current window).
    pub fn narrow(&mut self, range: std::ops::Range<usize>) {
        assert!(range.start <= range.end && range.end <= self.end - self.start);
        self.end = self.start + range.end;
        self.start += range.start;
    }

    /// The bytes as a `Vec` (free for a `Vec`-backed buffer seen whole, a copy otherwise).
    pub fn into_vec(mut self) -> Vec<u8> {
        match &mut self.mem {
            Mem::Vec(v) if self.start == 0 && self.end == v.len() => std::mem::take(v),
            _ => self.to_vec(),
        }
    }
}

impl From<Vec<u8>> for ObjectBuf {
    fn from(v: Vec<u8>) -> Self {
        let end = v.len();
        ObjectBuf {
            mem: Mem::Vec(v),
            start: 0,
            end,
        }
    }
}

impl std::ops::Deref for ObjectBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.mem {
            Mem::Vec(v) => &v[self.start..self.end],
            Mem::Aligned(Some(b)) => &b.as_slice(self.end)[self.start..],
            Mem::Aligned(None) => &[],
        }
    }
}

impl std::ops::DerefMut for ObjectBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.mem {
            Mem::Vec(v) => &mut v[self.start..self.end],
            Mem::Aligned(Some(b)) => &mut b.as_mut_slice(self.end)[self.start..],
            Mem::Aligned(None) => &mut [],
        }
    }
}

impl Drop for ObjectBuf {
    fn drop(&mut self) {
        if let Mem::Aligned(b) = &mut self.mem {
            if let Some(b) = b.take() {
                give_buf(b);
            }
        }
    }
}

impl std::fmt::Debug for ObjectBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectBuf")
            .field("len", &(self.end - self.start))
            .field("aligned", &matches!(self.mem, Mem::Aligned(_)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `f` in the page cache, `None` where the kernel has no `cachestat`.
    fn cached_pages(f: &File) -> Option<u64> {
        let range = CachestatRange { off: 0, len: 0 };
        let mut cs = Cachestat::default();
        // SAFETY: as in `read_cached`.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                &range as *const CachestatRange,
                &mut cs as *mut Cachestat,
                0u32,
            )
        };
        (rc == 0).then_some(cs.nr_cache)
    }

    #[test]
    fn a_read_takes_the_page_cache_only_when_the_whole_file_is_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !supported(dir.path()) {
            return; // tmpfs and the like: no direct I/O, everything is cached.
        }
        let len = (4 << 20) + 68;
        let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
        let (cold, warm, half) = (
            dir.path().join("cold"),
            dir.path().join("warm"),
            dir.path().join("half"),
        );
        write_file(&cold, &data, true).expect("direct write");
        std::fs::write(&warm, &data).expect("buffered write");
        write_file(&half, &data, true).expect("direct write");
        // Half of `half` read buffered, without readahead (which would read it all).
        let mut head = vec![0u8; len / 2];
        let mut h = File::open(&half).expect("open");
        // SAFETY: `h` is open for the call.
        unsafe { libc::posix_fadvise(h.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        std::io::Read::read_exact(&mut h, &mut head).expect("read");
        let Some(n) = cached_pages(&File::open(&warm).expect("open")) else {
            return; // No cachestat (kernel < 6.5 or filtered): every read is direct.
        };
        assert!(
            n * page_size() as u64 >= len as u64,
            "a buffered write is cached"
        );

        for (path, want_cached) in [(&cold, false), (&warm, true), (&half, false)] {
            let (buf, from_cache) = read_file_from(path).expect("read");
            assert_eq!(&buf[..], &data[..], "{}", path.display());
            assert_eq!(from_cache, want_cached, "{}", path.display());
        }
        // A cold file asked for is read into the cache in the background, then served
        // from there.
        prefetch(&cold);
        let f = File::open(&cold).expect("open");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cached_pages(&f).unwrap_or(0) * (page_size() as u64) < len as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "prefetch never completed"
            );
            std::thread::yield_now();
        }
        let (buf, from_cache) = read_file_from(&cold).expect("read");
        assert!(from_cache && buf[..] == data[..]);
    }

    #[test]
    fn direct_writes_keep_exact_content_and_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !supported(dir.path()) {
            return; // tmpfs and the like: the backend writes buffered there.
        }
        for len in [
            MIN_DIRECT,
            MIN_DIRECT + 1,
            (4 << 20) + 68,
            4 << 20,
            3 * ALIGN - 5,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
            let p = dir.path().join(format!("f{len}"));
            write_file(&p, &data, true).expect("write");
            assert_eq!(std::fs::read(&p).expect("read"), data, "len {len}");
            // A leftover file of the same name is replaced whole.
            let back = read_file(&p).expect("direct read");
            assert_eq!(&back[..], &data[..], "len {len}");
            write_file(&p, &data[..len / 2], false).expect("rewrite");
            assert_eq!(&read_file(&p).expect("read")[..], &data[..len / 2]);
            assert_eq!(
                std::fs::read(&p).expect("read"),
                &data[..len / 2],
                "len {len}"
            );
        }
    }
}
