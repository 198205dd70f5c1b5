//! Ingest throughput on a local backend.
//!
//! Writes a 1 GiB raw file (dense: zeros are written, not holes) with 256 MiB of random data
//! in 64 scattered 4 MiB chunks, drops it from the page cache, then ingests it into a fresh
//! `LocalBackend`; then ingests it again (every chunk already stored: read + hash only).
//! Baseline in the same run: writing the same 256 MiB to one file + fsync.
//!
//! ```text
//! cargo run --release -p openims-store --example ingest_bench -- [DIR]
//! env: SYNC_MODE=each|atsync|syncfs (default each), WORKERS=n (default 2), SIZE_MIB, DATA_MIB
//! ```

use openims_format::io::{Extent, ExtentKind};
use openims_format::VirtualDisk;
use openims_store::{LocalBackend, Store, StoreConfig, SyncMode};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

/// A raw image file as a virtual disk (no holes reported: the file is dense).
struct RawDisk {
    file: File,
    size: u64,
}

impl VirtualDisk for RawDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn extents(&mut self, offset: u64, len: u64) -> openims_format::Result<Vec<Extent>> {
        let start = offset.min(self.size);
        let end = offset.saturating_add(len).min(self.size);
        Ok(if end > start {
            vec![Extent {
                offset: start,
                len: end - start,
                kind: ExtentKind::Data,
            }]
        } else {
            vec![]
        })
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> openims_format::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }
}

fn drop_cache(f: &File) {
    // SAFETY: valid fd; advisory call.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base)?;
    let mode = match std::env::var("SYNC_MODE").as_deref() {
        Ok("syncfs") => SyncMode::Syncfs,
        Ok("atsync") => SyncMode::FsyncAtSync,
        _ => SyncMode::FsyncEach,
    };
    let workers = env_u64("WORKERS", 2) as usize;
    let mib = 1u64 << 20;
    let size = env_u64("SIZE_MIB", 1024) * mib;
    let data = env_u64("DATA_MIB", 256) * mib;
    let chunk = 4 * mib;
    let data_chunks = data / chunk;
    let total_chunks = size / chunk;
    let stride = (total_chunks / data_chunks.max(1)).max(1);

    // The source image.
    let img_path = dir.path().join("image.raw");
    let mut img = File::create(&img_path)?;
    let zeros = vec![0u8; chunk as usize];
    let mut rnd = vec![0u8; chunk as usize];
    let mut written_data = 0;
    for i in 0..total_chunks {
        if i % stride == 0 && written_data < data_chunks {
            blake3::Hasher::new()
                .update(&i.to_le_bytes())
                .finalize_xof()
                .fill(&mut rnd);
            img.write_all(&rnd)?;
            written_data += 1;
        } else {
            img.write_all(&zeros)?;
        }
    }
    img.sync_all()?;
    drop_cache(&img);

    // Baseline: the same amount of data written to one file, then fsync.
    let t = Instant::now();
    let mut base_f = File::create(dir.path().join("baseline"))?;
    for i in 0..data_chunks {
        blake3::Hasher::new()
            .update(&(i + 1_000_000).to_le_bytes())
            .finalize_xof()
            .fill(&mut rnd);
        base_f.write_all(&rnd)?;
    }
    base_f.sync_all()?;
    let base_s = t.elapsed().as_secs_f64();
    drop(base_f);
    std::fs::remove_file(dir.path().join("baseline"))?;

    let backend = LocalBackend::open_with(dir.path().join("store"), mode)?;
    let store = Store::open(
        backend,
        StoreConfig {
            ingest_workers: workers,
            ..StoreConfig::default()
        },
    )?;
    let mb = |b: u64, s: f64| b as f64 / 1e6 / s;

    let mut disk = RawDisk {
        file: File::open(&img_path)?,
        size,
    };
    let t = Instant::now();
    let r = store.ingest(&mut disk, &mut |_| {})?;
    let s1 = t.elapsed().as_secs_f64();

    drop_cache(&disk.file);
    let t = Instant::now();
    let r2 = store.ingest(&mut disk, &mut |_| {})?;
    let s2 = t.elapsed().as_secs_f64();

    println!(
        "mode={mode:?} workers={workers} virtual={} MiB data={} MiB",
        size / mib,
        data / mib
    );
    println!(
        "baseline write+fsync {} MiB: {base_s:.2}s = {:.0} MB/s",
        data / mib,
        mb(data, base_s)
    );
    println!(
        "ingest (new): {s1:.2}s = {:.0} MB/s virtual, {:.0} MB/s stored; {} new chunks, {} zero; stored/baseline ratio {:.2}",
        mb(size, s1),
        mb(r.new_bytes, s1),
        r.new_chunks,
        r.zero_chunks,
        mb(r.new_bytes, s1) / mb(data, base_s)
    );
    println!(
        "ingest (dedup, nothing new): {s2:.2}s = {:.0} MB/s virtual; {} new chunks",
        mb(size, s2),
        r2.new_chunks
    );
    Ok(())
}
