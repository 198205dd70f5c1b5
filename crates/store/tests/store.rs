mod common;

use common::*;
use openims_format::io::{ExtentKind, StoredSlice};
use openims_format::VirtualDisk;
use openims_store::backend::{chunk_key, manifest_key};
use openims_store::{
    Backend, ChunkId, IngestProgress, LocalBackend, Manifest, MemBackend, Store, StoreConfig,
    StoreError, SyncMode,
};
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const CS: u64 = 4096;

fn config() -> StoreConfig {
    StoreConfig {
        chunk_size: CS as u32,
        ..StoreConfig::default()
    }
}

fn local_store() -> (tempfile::TempDir, Arc<LocalBackend>, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Arc::new(LocalBackend::open(dir.path()).expect("open"));
    let s = Store::open(Arc::clone(&b), config()).expect("store");
    (dir, b, s)
}

/// 11 chunks, the last one short (1000 bytes):
/// 0 random | 1 hole | 2 allocated zeros | 3 = copy of 0 | 4 half data, half hole |
/// 5,6 hole | 7 random | 8 = copy of 7 | 9 hole | 10 short random.
fn sample_disk() -> MemDisk {
    let mut d = MemDisk::new(10 * CS + 1000);
    let a = random_bytes(1, CS as usize);
    let b = random_bytes(2, CS as usize);
    d.write(0, &a);
    d.write(2 * CS, &vec![0u8; CS as usize]);
    d.write(3 * CS, &a);
    d.write(4 * CS, &random_bytes(3, (CS / 2) as usize));
    d.write(7 * CS, &b);
    d.write(8 * CS, &b);
    d.write(10 * CS, &random_bytes(4, 1000));
    d
}

fn read_all(s: &Store, id: &openims_store::ManifestId) -> Vec<u8> {
    let mut out = Vec::new();
    s.stream_raw(id)
        .expect("stream")
        .read_to_end(&mut out)
        .expect("read");
    out
}

#[test]
fn ingest_round_trip_with_holes_zeros_repeats_and_short_tail() {
    let (_dir, b, s) = local_store();
    let mut disk = sample_disk();
    let mut events: Vec<IngestProgress> = Vec::new();
    let r = s
        .ingest(&mut disk, &mut |p| events.push(p))
        .expect("ingest");

    assert_eq!(r.virtual_size, 10 * CS + 1000);
    assert_eq!(r.chunk_count, 11);
    // Holes: 1, 5, 6, 9; zero data: 2.
    assert_eq!(r.zero_chunks, 5);
    // Distinct: a, half-chunk, b, tail.
    assert_eq!(r.stored_chunks, 4);
    assert_eq!(r.new_chunks, 4);
    assert_eq!(r.new_bytes, 3 * CS + 1000);
    // Holes were not read: 6 data chunk reads (0, 2, 3, 4, 7, 8, 10 = 7).
    assert_eq!(disk.reads, 7);

    // Progress: monotonic, ends complete.
    let last = events.last().expect("progress");
    assert_eq!(last.bytes_done, r.virtual_size);
    assert_eq!(last.chunks_done, 11);
    assert_eq!(last.new_chunks, 4);
    assert!(events
        .windows(2)
        .all(|w| w[0].bytes_done <= w[1].bytes_done));

    // Stored objects: 4 chunks, tail at its real length, 1 manifest.
    let chunks = keys(&*b, "chunks/");
    assert_eq!(chunks.len(), 4);
    let tail = ChunkId::hash(&disk.data[(10 * CS) as usize..]);
    assert_eq!(
        b.head(&chunk_key(&tail)).expect("head").expect("tail").size,
        1000
    );
    assert_eq!(keys(&*b, "manifests/"), vec![manifest_key(&r.manifest_id)]);

    // Read back: whole stream, random reads, extents.
    assert_eq!(read_all(&s, &r.manifest_id), disk.data);
    let mut md = s.open_disk(&r.manifest_id).expect("open");
    assert_eq!(md.virtual_size(), disk.virtual_size());
    for (off, len) in [
        (0u64, 1usize),
        (CS - 7, 20),
        (3 * CS + 5, 9000),
        (10 * CS, 1000),
        (10 * CS + 990, 100),
        (0, (11 * CS) as usize),
    ] {
        let mut got = vec![0xAAu8; len];
        md.read_at(off, &mut got).expect("read_at");
        let mut want = vec![0u8; len];
        disk.read_at(off, &mut want).expect("mem read");
        assert_eq!(got, want, "read at {off} len {len}");
    }
    let ext = md.extents(0, u64::MAX).expect("extents");
    let kinds: Vec<(u64, u64, ExtentKind)> =
        ext.iter().map(|e| (e.offset, e.len, e.kind)).collect();
    use ExtentKind::*;
    assert_eq!(
        kinds,
        vec![
            (0, CS, Data),
            (CS, 2 * CS, Zero),
            (3 * CS, 2 * CS, Data),
            (5 * CS, 2 * CS, Zero),
            (7 * CS, 2 * CS, Data),
            (9 * CS, CS, Zero),
            (10 * CS, 1000, Data),
        ]
    );
    assert_eq!(md.extents(CS + 10, 5).expect("extents")[0].len, 5);

    // Seek + read.
    let mut rd = s.stream_raw(&r.manifest_id).expect("stream");
    rd.seek(SeekFrom::End(-500)).expect("seek");
    let mut tailbuf = Vec::new();
    rd.read_to_end(&mut tailbuf).expect("read");
    assert_eq!(tailbuf, &disk.data[disk.data.len() - 500..]);
}

#[test]
fn dedup_same_disk_twice_writes_nothing_new() {
    let (_dir, b, s) = local_store();
    let mut disk = sample_disk();
    let r1 = s.ingest(&mut disk, &mut |_| {}).expect("ingest 1");
    let r2 = s.ingest(&mut disk, &mut |_| {}).expect("ingest 2");
    assert_eq!(r1.manifest_id, r2.manifest_id);
    assert_eq!(r2.new_chunks, 0);
    assert_eq!(r2.new_bytes, 0);
    assert_eq!(keys(&*b, "chunks/").len(), 4);

    // A second disk sharing chunk 0: only its new chunk is written.
    let mut other = MemDisk::new(2 * CS);
    other.write(0, &disk.data[..CS as usize]);
    other.write(CS, &random_bytes(99, CS as usize));
    let r3 = s.ingest(&mut other, &mut |_| {}).expect("ingest 3");
    assert_eq!((r3.stored_chunks, r3.new_chunks, r3.new_bytes), (2, 1, CS));
    assert_eq!(keys(&*b, "chunks/").len(), 5);
    assert_eq!(read_all(&s, &r3.manifest_id), other.data);

    // Metering: a copy sharing a manifest adds logical size but no physical bytes.
    let u1 = s.usage(&[r1.manifest_id]).expect("usage");
    assert_eq!(u1.logical_bytes, 10 * CS + 1000);
    assert_eq!(u1.physical_bytes, 3 * CS + 1000);
    let u2 = s.usage(&[r1.manifest_id, r1.manifest_id]).expect("usage");
    assert_eq!(u2.logical_bytes, 2 * u1.logical_bytes);
    assert_eq!(u2.physical_bytes, u1.physical_bytes);
    let u3 = s.usage(&[r1.manifest_id, r3.manifest_id]).expect("usage");
    assert_eq!(u3.physical_bytes, u1.physical_bytes + CS);
    let m = s.manifest(&r1.manifest_id).expect("manifest");
    assert_eq!(m.physical_bytes(&|_| 1), 4);
    assert_eq!(m.plain_physical_bytes(), u1.physical_bytes);
}

#[test]
fn zero_chunks_are_not_stored() {
    let (_dir, b, s) = local_store();
    let mut disk = MemDisk::new(5 * CS + 17);
    disk.write(CS, &vec![0u8; 3 * CS as usize]); // allocated but zero
    let r = s.ingest(&mut disk, &mut |_| {}).expect("ingest");
    assert_eq!((r.stored_chunks, r.new_chunks, r.zero_chunks), (0, 0, 6));
    assert!(keys(&*b, "chunks/").is_empty());
    assert_eq!(read_all(&s, &r.manifest_id), disk.data);
    assert!(s
        .manifest(&r.manifest_id)
        .expect("m")
        .chunks()
        .iter()
        .all(Option::is_none));

    // Empty disk.
    let mut empty = MemDisk::new(0);
    let r = s.ingest(&mut empty, &mut |_| {}).expect("ingest empty");
    assert_eq!(r.chunk_count, 0);
    assert!(read_all(&s, &r.manifest_id).is_empty());
}

#[test]
fn corrupt_chunk_fails_reads_and_fsck_reports_it() {
    let (_dir, b, s) = local_store();
    let mut disk = sample_disk();
    let r = s.ingest(&mut disk, &mut |_| {}).expect("ingest");
    assert!(s.fsck(&[r.manifest_id]).expect("fsck").is_clean());

    let a = ChunkId::hash(&disk.data[..CS as usize]);
    let path = b.path_of(&chunk_key(&a)).expect("path");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[100] ^= 1;
    std::fs::write(&path, &bytes).expect("write");

    let e = s.get_chunk(&a).expect_err("corrupt chunk must fail");
    assert!(e.is_corrupt(), "{e}");

    let mut md = s.open_disk(&r.manifest_id).expect("open");
    let mut buf = vec![0u8; 4096];
    let e = md.read_at(0, &mut buf).expect_err("corrupt read");
    assert!(
        StoreError::from_format_error(&e).is_some_and(StoreError::is_corrupt),
        "{e}"
    );
    // Chunks elsewhere still read fine.
    md.read_at(7 * CS, &mut buf).expect("other chunk");

    let mut out = Vec::new();
    let e = s
        .stream_raw(&r.manifest_id)
        .expect("stream")
        .read_to_end(&mut out)
        .expect_err("stream");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(StoreError::from_io_error(&e).is_some_and(StoreError::is_corrupt));

    // A chunk of the wrong length under the right name is corrupt too (hash mismatch).
    let b_id = ChunkId::hash(&disk.data[(7 * CS) as usize..(8 * CS) as usize]);
    std::fs::remove_file(b.path_of(&chunk_key(&b_id)).expect("path")).expect("rm");

    let missing = openims_store::ManifestId::hash(b"nope");
    let rep = s.fsck(&[r.manifest_id, missing]).expect("fsck");
    assert!(!rep.is_clean());
    assert_eq!(rep.corrupt_chunks.len(), 1);
    assert_eq!(rep.corrupt_chunks[0].0, a);
    assert_eq!(rep.missing_chunks, vec![b_id]);
    assert_eq!(rep.missing_manifests, vec![missing]);
    assert_eq!(rep.chunks_checked, 4);
    assert!(rep.orphan_chunks.is_empty() && rep.orphan_manifests.is_empty());

    // Corrupt manifest.
    let mpath = b.path_of(&manifest_key(&r.manifest_id)).expect("path");
    let mut mb = std::fs::read(&mpath).expect("read");
    mb[40] ^= 0x80;
    std::fs::write(&mpath, &mb).expect("write");
    assert!(s
        .manifest(&r.manifest_id)
        .expect_err("corrupt manifest")
        .is_corrupt());
    let rep = s.fsck(&[r.manifest_id]).expect("fsck");
    assert_eq!(rep.corrupt_manifests.len(), 1);
    // With the manifest unreadable, its chunks look orphaned.
    assert_eq!(rep.orphan_chunks.len(), 3);
}

#[test]
fn fsck_reports_orphans_and_foreign_keys() {
    let (_dir, b, s) = local_store();
    let r = s.ingest(&mut sample_disk(), &mut |_| {}).expect("ingest");
    let mut d2 = MemDisk::new(CS);
    d2.write(0, &random_bytes(50, CS as usize));
    let r2 = s.ingest(&mut d2, &mut |_| {}).expect("ingest");
    b.put("chunks/zz/junk", b"x").expect("put");
    let rep = s.fsck(&[r.manifest_id]).expect("fsck");
    assert!(rep.is_clean());
    assert_eq!(rep.orphan_manifests, vec![r2.manifest_id]);
    assert_eq!(rep.orphan_chunks, vec![ChunkId::hash(&d2.data)]);
    assert_eq!(rep.foreign_keys, vec!["chunks/zz/junk".to_string()]);
}

fn age_all(b: &MemBackend, age: Duration) {
    let t = SystemTime::now() - age;
    for k in keys(b, "") {
        b.set_modified(&k, t);
    }
}

#[test]
fn gc_deletes_exactly_old_unreferenced_objects() {
    let b = Arc::new(MemBackend::new());
    let s = Store::open(Arc::clone(&b), config()).expect("store");
    let disk_a = sample_disk();
    let mut disk_b = MemDisk::new(2 * CS);
    disk_b.write(0, &disk_a.data[..CS as usize]); // shared with A
    disk_b.write(CS, &random_bytes(7, CS as usize)); // only in B
    let ra = s.ingest(&mut disk_a.clone(), &mut |_| {}).expect("a");
    let rb = s.ingest(&mut disk_b.clone(), &mut |_| {}).expect("b");
    let orphan_old = s.put_chunk(&random_bytes(8, 100)).expect("orphan");
    age_all(&b, Duration::from_secs(3600));
    let orphan_young = s.put_chunk(&random_bytes(9, 100)).expect("young orphan");
    let b_only = ChunkId::hash(&disk_b.data[CS as usize..]);

    let grace = Duration::from_secs(600);
    let rep = s.gc(&[ra.manifest_id], grace).expect("gc");
    assert_eq!(rep.manifests_deleted, 1);
    assert_eq!(rep.manifests_live, 1);
    assert_eq!(rep.chunks_deleted, 2); // b_only + orphan_old
    assert_eq!(rep.chunk_bytes_freed, CS + 100);
    assert_eq!(rep.chunks_live, 4);
    assert_eq!(rep.chunks_young, 1);
    assert!(!b.exists(&manifest_key(&rb.manifest_id)).expect("exists"));
    assert!(!s.has_chunk(&b_only).expect("has"));
    assert!(!s.has_chunk(&orphan_old).expect("has"));
    assert!(s.has_chunk(&orphan_young).expect("has"));
    assert_eq!(read_all(&s, &ra.manifest_id), disk_a.data);
    let f = s.fsck(&[ra.manifest_id]).expect("fsck");
    assert!(f.is_clean());
    assert_eq!(f.orphan_chunks, vec![orphan_young]);

    // Second run with nothing old to delete is a no-op.
    let rep = s.gc(&[ra.manifest_id], grace).expect("gc");
    assert_eq!((rep.manifests_deleted, rep.chunks_deleted), (0, 0));

    // Nothing live and everything old: everything goes.
    age_all(&b, Duration::from_secs(3600));
    let rep = s.gc(&[], grace).expect("gc");
    assert_eq!((rep.manifests_deleted, rep.chunks_deleted), (1, 5));
    assert!(b.is_empty());
}

#[test]
fn gc_keeps_young_manifests_and_chunks_reused_by_a_new_ingest() {
    let b = Arc::new(MemBackend::new());
    let s = Store::open(Arc::clone(&b), config()).expect("store");
    let disk = sample_disk();
    let r1 = s.ingest(&mut disk.clone(), &mut |_| {}).expect("ingest");
    age_all(&b, Duration::from_secs(3600));
    // The image was deleted (manifest no longer live), then the same content is ingested
    // again before the database records the new manifest: it reuses the old chunks.
    let r2 = s.ingest(&mut disk.clone(), &mut |_| {}).expect("ingest");
    assert_eq!(r2.new_chunks, 0);
    assert_eq!(r1.manifest_id, r2.manifest_id);
    let rep = s.gc(&[], Duration::from_secs(600)).expect("gc");
    assert_eq!((rep.manifests_deleted, rep.chunks_deleted), (0, 0));
    assert_eq!((rep.manifests_young, rep.chunks_live), (1, 4));
    assert_eq!(read_all(&s, &r2.manifest_id), disk.data);
}

#[test]
fn gc_refuses_to_sweep_when_a_live_manifest_is_unreadable() {
    let b = Arc::new(MemBackend::new());
    let s = Store::open(Arc::clone(&b), config()).expect("store");
    let r = s.ingest(&mut sample_disk(), &mut |_| {}).expect("ingest");
    age_all(&b, Duration::from_secs(3600));
    b.corrupt(&manifest_key(&r.manifest_id), vec![1, 2, 3]);
    let e = s
        .gc(&[r.manifest_id], Duration::from_secs(1))
        .expect_err("must refuse");
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    assert_eq!(keys(&*b, "chunks/").len(), 4);
}

#[test]
fn local_gc_honours_grace_and_touch() {
    let (_dir, b, s) = local_store();
    let r = s.ingest(&mut sample_disk(), &mut |_| {}).expect("ingest");
    assert_eq!(keys(&*b, "").len(), 5);
    assert!(b.exists(&manifest_key(&r.manifest_id)).expect("exists"));
    let old = SystemTime::now() - Duration::from_secs(7200);
    for k in keys(&*b, "") {
        let f = std::fs::File::options()
            .write(true)
            .open(b.path_of(&k).expect("path"))
            .expect("open");
        f.set_modified(old).expect("set mtime");
    }
    // Touch one chunk: it becomes young and survives.
    let a = ChunkId::hash(&sample_disk().data[..CS as usize]);
    assert!(b.touch(&chunk_key(&a)).expect("touch"));
    let rep = s.gc(&[], Duration::from_secs(600)).expect("gc");
    assert_eq!(
        (rep.manifests_deleted, rep.chunks_deleted, rep.chunks_young),
        (1, 3, 1)
    );
    assert_eq!(keys(&*b, ""), vec![chunk_key(&a)]);
    // delete_if_older directly: young kept, old deleted, absent is None.
    let cutoff = SystemTime::now() - Duration::from_secs(600);
    assert_eq!(
        b.delete_if_older(&chunk_key(&a), cutoff).expect("dio"),
        None
    );
    assert!(b.exists(&chunk_key(&a)).expect("exists"));
    assert_eq!(
        b.delete_if_older(&chunk_key(&a), SystemTime::now() + Duration::from_secs(5))
            .expect("dio"),
        Some(CS)
    );
    assert_eq!(
        b.delete_if_older(&chunk_key(&a), SystemTime::now())
            .expect("dio"),
        None
    );
    assert!(!b.touch(&chunk_key(&a)).expect("touch"));
}

#[test]
fn failed_chunk_write_never_writes_a_manifest() {
    for puts_ok in [0i64, 1, 2, 3] {
        let inner = Arc::new(MemBackend::new());
        let fb = Arc::new(FailingBackend::new(Arc::clone(&inner)));
        fb.chunk_puts_left
            .store(puts_ok, std::sync::atomic::Ordering::SeqCst);
        let s = Store::open(Arc::clone(&fb), config()).expect("store");
        let e = s
            .ingest(&mut sample_disk(), &mut |_| {})
            .expect_err("must fail");
        assert!(matches!(e, StoreError::Io(_)), "{e}");
        assert!(
            keys(&*inner, "manifests/").is_empty(),
            "after {puts_ok} puts"
        );
    }
    // A failing durability barrier also prevents the manifest.
    let inner = Arc::new(MemBackend::new());
    let fb = Arc::new(FailingBackend::new(Arc::clone(&inner)));
    fb.fail_sync
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let s = Store::open(Arc::clone(&fb), config()).expect("store");
    assert!(s.ingest(&mut sample_disk(), &mut |_| {}).is_err());
    assert!(keys(&*inner, "manifests/").is_empty());
    assert_eq!(keys(&*inner, "chunks/").len(), 4);
}

#[test]
fn failed_source_read_never_writes_a_manifest() {
    let (_dir, b, s) = local_store();
    let mut disk = sample_disk();
    disk.fail_at = Some(8 * CS);
    let e = s.ingest(&mut disk, &mut |_| {}).expect_err("must fail");
    assert!(matches!(e, StoreError::Format(_)), "{e}");
    assert!(keys(&*b, "manifests/").is_empty());
}

#[test]
fn put_manifest_requires_stored_chunks() {
    let (_dir, b, s) = local_store();
    let present = s.put_chunk(&random_bytes(1, CS as usize)).expect("put");
    let absent = ChunkId::hash(b"absent");
    let m = Manifest::new(2 * CS, CS as u32, vec![Some(present), Some(absent)]).expect("m");
    assert!(s
        .put_manifest(&m)
        .expect_err("missing chunk")
        .is_not_found());
    assert!(keys(&*b, "manifests/").is_empty());
    assert_eq!(
        s.missing_chunks(&[present, absent, absent])
            .expect("missing"),
        vec![absent]
    );
    let m = Manifest::new(2 * CS, CS as u32, vec![Some(present), None]).expect("m");
    let id = s.put_manifest(&m).expect("put");
    assert_eq!(id, m.id());
    assert_eq!(s.manifest(&id).expect("get"), m);
    assert!(s
        .manifest(&openims_store::ManifestId::hash(b"x"))
        .expect_err("nf")
        .is_not_found());
}

#[test]
fn local_backend_basics_in_every_sync_mode() {
    for mode in [SyncMode::FsyncEach, SyncMode::FsyncAtSync, SyncMode::Syncfs] {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = LocalBackend::open_with(dir.path(), mode).expect("open");
        b.put("a/b/c", b"hello world").expect("put");
        b.put("a/b/c", b"hello world").expect("put again");
        b.put("a/x", b"x").expect("put");
        b.put("ab", b"y").expect("put");
        b.sync().expect("sync");
        assert_eq!(b.get("a/b/c").expect("get"), b"hello world");
        assert_eq!(b.get_range("a/b/c", 6, 100).expect("range"), b"world");
        assert_eq!(b.get_range("a/b/c", 60, 1).expect("range"), b"");
        assert!(b.get("nope").expect_err("nf").is_not_found());
        assert_eq!(keys(&b, "a/"), vec!["a/b/c", "a/x"]);
        assert_eq!(keys(&b, "a"), vec!["a/b/c", "a/x", "ab"]);
        assert_eq!(keys(&b, "a/b"), vec!["a/b/c"]);
        assert_eq!(keys(&b, ""), vec!["a/b/c", "a/x", "ab"]);
        assert!(keys(&b, "zz/").is_empty());
        assert!(b.delete("a/x").expect("delete"));
        assert!(!b.delete("a/x").expect("delete"));
        for bad in [
            "",
            "/a",
            "a//b",
            "../x",
            "a/../b",
            ".tmp/x",
            "a/.hidden",
            "a b",
            "a/",
        ] {
            assert!(b.put(bad, b"x").is_err(), "{bad:?} accepted");
        }
        // No temp files left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join(".tmp"))
                .expect("tmp")
                .count(),
            0
        );
    }
}

#[test]
fn store_rejects_bad_config_and_huge_disks() {
    let b = MemBackend::new();
    let bad = StoreConfig {
        chunk_size: 100,
        ..StoreConfig::default()
    };
    assert!(Store::open(b, bad).is_err());
    let s = Store::open(
        MemBackend::new(),
        StoreConfig {
            max_virtual_size: CS,
            ..config()
        },
    )
    .expect("store");
    assert!(matches!(
        s.ingest(&mut MemDisk::new(CS + 1), &mut |_| {}),
        Err(StoreError::Invalid(_))
    ));
    // Too many chunks for one manifest (tiny chunks, huge disk): refused before allocating.
    let s = Store::open(
        MemBackend::new(),
        StoreConfig {
            chunk_size: 512,
            ..StoreConfig::default()
        },
    )
    .expect("store");
    let mut huge = HugeEmptyDisk(1 << 40);
    assert!(matches!(
        s.ingest(&mut huge, &mut |_| {}),
        Err(StoreError::Invalid(_))
    ));
}

#[test]
fn many_workers_and_default_chunk_size() {
    let b = Arc::new(MemBackend::new());
    let s = Store::open(
        Arc::clone(&b),
        StoreConfig {
            ingest_workers: 4,
            ..StoreConfig::default()
        },
    )
    .expect("store");
    let mut disk = MemDisk::new(9 * (4 << 20) + 3);
    for i in 0..9u64 {
        if i % 3 != 1 {
            disk.write(i * (4 << 20) + 11, &random_bytes(i % 4, 5 << 19));
        }
    }
    let r = s.ingest(&mut disk, &mut |_| {}).expect("ingest");
    assert_eq!(r.chunk_count, 10);
    assert_eq!(read_all(&s, &r.manifest_id), disk.data);
}

#[test]
fn store_is_send_sync_and_concurrent_ingests_agree() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Store>();
    fn assert_send<T: Send>() {}
    assert_send::<openims_store::ManifestDisk>();
    assert_send::<openims_store::ManifestReader>();

    let (_dir, b, s) = local_store();
    let disk = sample_disk();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            let mut d = disk.clone();
            std::thread::spawn(move || s.ingest(&mut d, &mut |_| {}).expect("ingest"))
        })
        .collect();
    let reports: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("join"))
        .collect();
    assert!(reports
        .iter()
        .all(|r| r.manifest_id == reports[0].manifest_id));
    // Racing ingests may each write a chunk, but the store holds each once.
    assert_eq!(keys(&*b, "chunks/").len(), 4);
    assert!(s.fsck(&[reports[0].manifest_id]).expect("fsck").is_clean());
}

/// A disk that claims a huge size (never read in the test that uses it).
struct HugeEmptyDisk(u64);

impl VirtualDisk for HugeEmptyDisk {
    fn virtual_size(&self) -> u64 {
        self.0
    }
    fn extents(
        &mut self,
        offset: u64,
        len: u64,
    ) -> openims_format::Result<Vec<openims_format::io::Extent>> {
        let end = offset.saturating_add(len).min(self.0);
        Ok(vec![openims_format::io::Extent {
            offset,
            len: end.saturating_sub(offset),
            kind: ExtentKind::Zero,
        }])
    }
    fn read_at(&mut self, _offset: u64, buf: &mut [u8]) -> openims_format::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

#[test]
fn read_ahead_gives_the_same_bytes_for_any_access_pattern_and_reports_corruption_in_place() {
    let (_dir, b, s) = local_store();
    // 40 chunks: data, holes and repeats, so the read-ahead skips holes and refetches repeats.
    let mut disk = MemDisk::new(40 * CS);
    for i in 0..40u64 {
        if i % 5 != 2 {
            // Repeats below chunk 20, unique content above.
            let seed = if i < 20 { 100 + i % 7 } else { 1000 + i };
            disk.write(i * CS, &random_bytes(seed, CS as usize));
        }
    }
    let r = s.ingest(&mut disk, &mut |_| {}).expect("ingest");
    assert_eq!(read_all(&s, &r.manifest_id), disk.data);

    // Sequential in odd-sized pieces, then backwards, then strided: always the disk's bytes.
    let mut md = s.open_disk(&r.manifest_id).expect("open");
    let mut got = vec![0u8; disk.data.len()];
    for (n, piece) in got.chunks_mut(1531).enumerate() {
        md.read_at(n as u64 * 1531, piece).expect("read");
    }
    assert_eq!(got, disk.data);
    let mut buf = vec![0u8; 777];
    for i in (0..40u64).rev().chain((0..40).step_by(3)).chain(0..40) {
        let off = i * CS + 100;
        md.read_at(off, &mut buf).expect("read");
        assert_eq!(
            buf[..],
            disk.data[off as usize..off as usize + 777],
            "chunk {i}"
        );
    }

    // A corrupt chunk far ahead: reads before it succeed (its read-ahead failure is not
    // reported early), the read of it fails, and reads after it succeed again.
    let bad = 30usize;
    let id = ChunkId::hash(&disk.data[bad * CS as usize..(bad + 1) * CS as usize]);
    let path = b.path_of(&chunk_key(&id)).expect("path");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[9] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    let mut md = s.open_disk(&r.manifest_id).expect("open");
    let mut one = vec![0u8; CS as usize];
    for i in 0..40u64 {
        let res = md.read_at(i * CS, &mut one);
        if i as usize == bad {
            let e = res.expect_err("corrupt chunk");
            assert!(StoreError::from_format_error(&e).is_some_and(StoreError::is_corrupt));
        } else {
            res.unwrap_or_else(|e| panic!("chunk {i}: {e}"));
            assert_eq!(
                one[..],
                disk.data[(i * CS) as usize..((i + 1) * CS) as usize]
            );
        }
    }
}

/// Ingests a copy of `disk` from the start, checkpointing every `every` chunks read.
fn ingest_checkpointed(
    s: &Store,
    disk: &MemDisk,
    every: u64,
    save: &mut dyn FnMut(openims_store::IngestCheckpoint) -> openims_store::Result<()>,
) -> openims_store::Result<openims_store::IngestReport> {
    s.ingest_resumable(
        &mut disk.clone(),
        None,
        Some(openims_store::Checkpointing { every, save }),
        &mut |_| {},
    )
}

#[test]
fn an_interrupted_ingest_resumes_from_its_checkpoint_without_reading_again() {
    let (_dir, _b, s) = local_store();
    // 40 data chunks, each different, so every chunk read is counted.
    let mut disk = MemDisk::new(40 * CS);
    for i in 0..40u64 {
        disk.write(i * CS, &random_bytes(100 + i, CS as usize));
    }
    let whole = {
        let (_d2, _b2, s2) = local_store();
        s2.ingest(&mut disk.clone(), &mut |_| {})
            .expect("plain ingest")
            .manifest_id
    };
    // First run: checkpoints every 8 chunks, "dies" (save fails) at the second checkpoint.
    let mut saved = Vec::new();
    let err = ingest_checkpointed(&s, &disk, 8, &mut |cp| {
        saved.push(cp);
        if saved.len() == 2 {
            Err(StoreError::Invalid("node died".into()))
        } else {
            Ok(())
        }
    })
    .expect_err("interrupted");
    assert!(err.to_string().contains("node died"), "{err}");
    let cp = saved[1];
    assert!(
        cp.next_index > saved[0].next_index && saved[0].next_index > 0 && cp.next_index < 40,
        "{saved:?}"
    );
    // Its partial manifest lists exactly the finished prefix.
    let partial = s.manifest(&cp.partial).expect("partial manifest");
    assert_eq!(partial.chunks().len() as u64, cp.next_index);

    // Second run resumes: chunks before the checkpoint are not read again.
    let mut again = disk.clone();
    again.reads = 0;
    let r = s
        .ingest_resumable(&mut again, Some(cp), None, &mut |_| {})
        .expect("resumed");
    assert_eq!(r.resumed_chunks, cp.next_index);
    assert_eq!(again.reads, 40 - cp.next_index);
    assert_eq!(
        r.manifest_id, whole,
        "same manifest as an uninterrupted ingest"
    );
    assert_eq!(read_all(&s, &r.manifest_id), disk.data);

    // A checkpoint that does not fit the disk (another length) is ignored: full ingest.
    let mut other = MemDisk::new(10 * CS);
    other.write(0, &random_bytes(7, CS as usize));
    let r = s
        .ingest_resumable(&mut other, Some(cp), None, &mut |_| {})
        .expect("fresh");
    assert_eq!(r.resumed_chunks, 0);
    assert_eq!(read_all(&s, &r.manifest_id), other.data);
}

/// Checkpoints are paced by chunks read from the source: a sparse disk's holes (and chunks
/// referenced without reading) cost nothing to redo, so they trigger no checkpoint.
#[test]
fn a_sparse_disk_checkpoints_by_chunks_read_not_by_its_holes() {
    let (_dir, _b, s) = local_store();
    // 40 chunks: data in 0..4, 20..24 and 36..40 (12 chunks), holes elsewhere.
    let mut disk = MemDisk::new(40 * CS);
    for i in (0..4u64).chain(20..24).chain(36..40) {
        disk.write(i * CS, &random_bytes(300 + i, CS as usize));
    }
    let mut saved = Vec::new();
    let r = ingest_checkpointed(&s, &disk, 8, &mut |cp| {
        saved.push(cp);
        Ok(())
    })
    .expect("ingest");
    // At most one checkpoint: after the 8th chunk read, once the finished prefix has grown
    // (how far depends on the writers, so whether it comes before the last reads does too).
    // Paced by the finished prefix, holes included, there were 3.
    assert!(saved.len() <= 1, "{saved:?}");
    assert!(
        saved
            .iter()
            .all(|c| c.next_index >= 1 && c.next_index <= 24),
        "{saved:?}"
    );
    assert_eq!(read_all(&s, &r.manifest_id), disk.data);
}

/// Chunk-sized objects on the local backend go through `O_DIRECT` reads and writes into
/// pooled aligned buffers (when the file system allows it): plaintext and encrypted disks
/// read back exactly, re-encryption between keys keeps the disk, and a flipped byte in a
/// plaintext or an encrypted chunk file is reported as corruption (by BLAKE3, by the GCM tag).
#[test]
fn large_chunks_on_the_local_backend_round_trip_and_corruption_is_caught() {
    use openims_store::crypto::echunk_key;
    use openims_store::Dek;
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Arc::new(LocalBackend::open(dir.path()).expect("open"));
    let s = Store::open(Arc::clone(&b), StoreConfig::default()).expect("store");
    let cs = u64::from(s.config().chunk_size);
    // 3 full chunks and a short tail that is not a multiple of the 4096-byte alignment.
    let size = 3 * cs + 300_001;
    let mut disk = MemDisk::new(size);
    disk.write(0, &random_bytes(11, cs as usize));
    disk.write(cs, &random_bytes(12, cs as usize));
    disk.write(2 * cs, &random_bytes(13, cs as usize));
    disk.write(3 * cs, &random_bytes(14, 300_001));
    let want = disk.data.clone();
    let plain = s
        .ingest(&mut disk, &mut |_| {})
        .expect("ingest")
        .manifest_id;
    assert_eq!(read_all(&s, &plain), want);

    let (k1, k2) = (Dek::generate(), Dek::generate());
    let enc = s
        .reencrypt(&plain, None, &k1, None, 2, &mut |_| Ok(()))
        .expect("encrypt");
    let rekeyed = s
        .reencrypt(&enc, Some(&k1), &k2, None, 2, &mut |_| Ok(()))
        .expect("re-encrypt");
    for (m, k) in [(enc, &k1), (rekeyed, &k2)] {
        let mut out = Vec::new();
        openims_store::ManifestReader::new(s.open_disk_with(&m, Some(k.clone())).expect("open"))
            .read_to_end(&mut out)
            .expect("read");
        assert!(out == want, "encrypted disk reads back different bytes");
    }

    let flip = |key: &str, at: u64| {
        let path = b.path_of(key).expect("path");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[at as usize] ^= 0x40;
        std::fs::write(&path, bytes).expect("write");
    };
    // Plaintext: the second chunk's BLAKE3 no longer matches.
    let pm = s.manifest(&plain).expect("manifest");
    let second = pm.chunks()[1].expect("data chunk");
    flip(&chunk_key(&second), cs / 2);
    let e = s.get_chunk(&second).expect_err("corrupt plaintext chunk");
    assert!(e.is_corrupt(), "{e}");
    // Encrypted: a ciphertext byte of the tail chunk fails its tag.
    let em = s.manifest(&rekeyed).expect("manifest");
    let tail = em.chunks()[3].expect("data chunk");
    flip(&echunk_key(&tail), 100_000);
    let e = s
        .get_encrypted_chunk(&k2, &tail)
        .expect_err("corrupt encrypted chunk");
    assert!(e.is_corrupt(), "{e}");
    // The keyless check (fsck, cross-region receive) sees it too.
    let f = s.fsck(&[plain, enc, rekeyed]).expect("fsck");
    assert!(!f.is_clean(), "{f:?}");
}

/// A file in memory whose whole, chunk-aligned chunks at `stored` offsets this store holds: it
/// answers `ReadAt::stored_chunk` for them (as a bucket object does) and records its reads.
struct ChunkedFile {
    data: Vec<u8>,
    stored: std::collections::HashSet<u64>,
    reads: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl ChunkedFile {
    /// Bytes read at or after `from`.
    fn read_from(&self, from: u64) -> u64 {
        let reads = self.reads.lock().expect("lock");
        reads
            .iter()
            .map(|&(o, n)| (o + n).saturating_sub(o.max(from)))
            .sum()
    }
}

impl openims_format::ReadAt for ChunkedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.data.as_slice().read_at(buf, offset)?;
        self.reads.lock().expect("lock").push((offset, n as u64));
        Ok(n)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.data.len() as u64)
    }
    fn stored_chunk(&self, offset: u64, len: u64) -> Option<Option<[u8; 32]>> {
        let end = offset.checked_add(len)?;
        let whole = len == CS || end == self.data.len() as u64;
        (self.stored.contains(&offset) && whole && end <= self.data.len() as u64).then(|| {
            let b = &self.data[offset as usize..end as usize];
            b.iter()
                .any(|&x| x != 0)
                .then(|| *ChunkId::hash(b).as_bytes())
        })
    }
}

/// Stores `file`'s chunks at `offsets` and wraps it, as the readers see a source.
fn chunked(s: &Store, data: Vec<u8>, offsets: &[u64]) -> Arc<ChunkedFile> {
    for &o in offsets {
        let end = (o + CS).min(data.len() as u64) as usize;
        if data[o as usize..end].iter().any(|&x| x != 0) {
            s.put_chunk(&data[o as usize..end]).expect("put");
        }
    }
    Arc::new(ChunkedFile {
        data,
        stored: offsets.iter().copied().collect(),
        reads: Default::default(),
    })
}

#[test]
fn ingest_references_chunks_its_source_stores_verbatim_instead_of_reading_them() {
    use openims_format::write::SlottedQcow2;
    use openims_format::{read, DiskFormat, ReadAt};
    let (_dir, _b, s) = local_store();
    let raw = read_all_of(&mut sample_disk());
    let want = s
        .ingest(
            read::open(Arc::new(raw.clone()), DiskFormat::Raw)
                .expect("raw")
                .as_mut(),
            &mut |_| {},
        )
        .expect("ingest")
        .manifest_id;

    // Raw: the stored chunks (0, 2, 3, 10) are referenced, the others read; the source is
    // behind `Arc<dyn ReadAt>`, as an import has it.
    let src = chunked(&s, raw.clone(), &[0, 2 * CS, 3 * CS, 10 * CS]);
    let dyn_src: Arc<dyn ReadAt> = src.clone();
    let mut disk = read::open(dyn_src, DiskFormat::Raw).expect("raw");
    let got = s.ingest(disk.as_mut(), &mut |_| {}).expect("ingest");
    assert_eq!(got.manifest_id, want, "the same disk");
    // Read: chunks 4, 7 and 8 (1, 5, 6, 9 are holes of the source disk but the raw file has
    // no holes here: they are read too).
    assert_eq!(
        src.read_from(0),
        7 * CS,
        "only the chunks the source does not store are read"
    );

    // qcow2 in the slotted layout our exports write: every data chunk is a stored chunk.
    let allocated: Vec<u64> = (0..raw.len().div_ceil(CS as usize) as u64)
        .filter(|&k| {
            let end = ((k + 1) * CS).min(raw.len() as u64) as usize;
            raw[(k * CS) as usize..end].iter().any(|&x| x != 0)
        })
        .collect();
    let layout = SlottedQcow2::new(raw.len() as u64, 512, CS, &allocated, 0, u64::MAX)
        .expect("layout")
        .expect("fits");
    let mut file = layout.metadata.clone();
    let mut slots = Vec::new();
    for &k in &allocated {
        slots.push(file.len() as u64);
        let end = ((k + 1) * CS).min(raw.len() as u64) as usize;
        let mut slot = raw[(k * CS) as usize..end].to_vec();
        slot.resize(layout.data_len(k) as usize, 0);
        file.extend_from_slice(&slot);
        file.resize(file.len().next_multiple_of(CS as usize), 0);
    }
    file.truncate(slots.last().map_or(file.len(), |&o| {
        o as usize + layout.data_len(*allocated.last().expect("some")) as usize
    }));
    let last_slot = *slots.last().expect("some");
    let src = chunked(&s, file, &slots);
    let dyn_src: Arc<dyn ReadAt> = src.clone();
    let mut disk = read::open(dyn_src, DiskFormat::Qcow2).expect("qcow2");
    let got = s.ingest(disk.as_mut(), &mut |_| {}).expect("ingest");
    // Of the data, only the last chunk (1000 bytes in a 1024-byte slot: not a whole object
    // chunk of the disk's length) is read; the metadata before the slots is read as usual.
    let data_read = src.read_from(slots[0]);
    assert_eq!(
        data_read,
        src.read_from(last_slot),
        "a referenced slot was read"
    );
    assert!(data_read <= 1024, "read {data_read} bytes of the last slot");
    // qcow2 sizes are whole sectors: the same disk, zero-padded to 512 bytes.
    let mut padded = raw.clone();
    padded.resize(raw.len().next_multiple_of(512), 0);
    let want_padded = s
        .ingest(
            read::open(Arc::new(padded), DiskFormat::Raw)
                .expect("raw")
                .as_mut(),
            &mut |_| {},
        )
        .expect("ingest")
        .manifest_id;
    assert_eq!(got.manifest_id, want_padded, "the same disk");
}

fn read_all_of(d: &mut MemDisk) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_at(0, &mut v).expect("read");
    v
}

/// A file this store holds as the chunks of a manifest of its bytes (as a bucket object's
/// part is held): it answers `ReadAt::stored_slices` for any range from that manifest.
struct SlicedFile {
    data: Vec<u8>,
    manifest: Manifest,
}

impl SlicedFile {
    fn store(s: &Store, data: Vec<u8>) -> Arc<SlicedFile> {
        let chunks = data
            .chunks(CS as usize)
            .map(|c| {
                c.iter()
                    .any(|&x| x != 0)
                    .then(|| s.put_chunk(c).expect("put"))
            })
            .collect();
        let manifest = Manifest::new(data.len() as u64, CS as u32, chunks).expect("manifest");
        Arc::new(SlicedFile { data, manifest })
    }
}

impl openims_format::ReadAt for SlicedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.data.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.data.len() as u64)
    }
    fn stored_slices(&self, offset: u64, len: u64) -> Option<Vec<StoredSlice>> {
        self.manifest.slices(offset, len)
    }
}

/// The sample disk as a file of `fmt` (qcow2 with 512-byte clusters): the data of every
/// format but raw lies at file offsets that are not chunk-aligned.
fn sample_file(fmt: openims_format::OutputFormat) -> Vec<u8> {
    let mut sink = openims_format::MemSink::default();
    let opts = openims_format::WriteOptions {
        cluster_size: 512,
        threads: 1,
        ..Default::default()
    };
    openims_format::write_image(&mut sample_disk(), fmt, &opts, &mut sink, &mut |_| {})
        .expect("write");
    sink.data
}

/// Stores `file` (a `fmt` image) as the chunks of its bytes in a new store, then ingests the
/// disk it holds. Returns the store, its backend, the file, the report and the disk's bytes.
fn ingest_held_file(
    fmt: openims_format::DiskFormat,
    file: Vec<u8>,
    config: StoreConfig,
) -> (
    Store,
    Arc<MemBackend>,
    Arc<SlicedFile>,
    openims_store::IngestReport,
    Vec<u8>,
) {
    use openims_format::{read, ReadAt};
    let b = Arc::new(MemBackend::new());
    let s = Store::open(Arc::clone(&b), config).expect("store");
    let file = SlicedFile::store(&s, file);
    let src: Arc<dyn ReadAt> = file.clone();
    let mut disk = read::open(src, fmt).expect("open");
    let mut bytes = vec![0u8; disk.virtual_size() as usize];
    disk.read_at(0, &mut bytes).expect("read");
    let r = s.ingest(disk.as_mut(), &mut |_| {}).expect("ingest");
    (s, b, file, r, bytes)
}

#[test]
fn ingest_composes_chunks_from_byte_ranges_its_source_stores() {
    use openims_format::{read, DiskFormat, OutputFormat, ReadAt};
    for (out, fmt) in [
        (OutputFormat::Qcow2, DiskFormat::Qcow2),
        (OutputFormat::Vhd, DiskFormat::Vhd),
        (OutputFormat::VhdFixed, DiskFormat::Vhd),
    ] {
        let file = sample_file(out);
        let (s, b, _, r, bytes) = ingest_held_file(fmt, file.clone(), config());
        // The same manifest as an ordinary ingest of the disk, in another store.
        let other = Store::open(MemBackend::new(), config()).expect("store");
        let mut plain = MemDisk::new(bytes.len() as u64);
        plain.write(0, &bytes);
        let want = other.ingest(&mut plain, &mut |_| {}).expect("ingest");
        assert_eq!(
            r.manifest_id, want.manifest_id,
            "{fmt:?}: the same chunk ids"
        );
        // Every new chunk was composed: no chunk bytes written besides the file's (a chunk
        // of the disk may happen to be one of the file's chunks: then it is reused).
        assert_eq!(r.new_bytes, 0, "{fmt:?}: {r:?}");
        assert_eq!(r.composed_chunks, r.new_chunks, "{fmt:?}: {r:?}");
        assert!(r.composed_chunks >= 1, "{fmt:?}: {r:?}");
        assert_eq!(keys(&*b, "composed/").len() as u64, r.composed_chunks);
        assert_eq!(read_all(&s, &r.manifest_id), bytes, "{fmt:?}");
    }
    // A compressed file (streamOptimized VMDK) is read and written in full.
    let (_, b, _, r, bytes) = ingest_held_file(
        DiskFormat::Vmdk,
        sample_file(OutputFormat::VmdkStream),
        config(),
    );
    assert_eq!(r.composed_chunks, 0);
    assert!(r.new_bytes > 0 && keys(&*b, "composed/").is_empty());
    assert!(bytes.len() as u64 >= 10 * CS);

    let (s, b, file, r, bytes) = ingest_held_file(
        DiskFormat::Qcow2,
        sample_file(OutputFormat::Qcow2),
        config(),
    );
    // A second ingest of the same disk finds every chunk stored.
    let src: Arc<dyn ReadAt> = file.clone();
    let mut disk = read::open(src, DiskFormat::Qcow2).expect("qcow2");
    let r2 = s.ingest(disk.as_mut(), &mut |_| {}).expect("ingest");
    assert_eq!((r2.new_chunks, r2.composed_chunks), (0, 0));

    // The file's chunks are in no manifest, but the compositions keep those they use: GC of
    // everything old but the image keeps the image readable, and fsck calls nothing orphan.
    // (Chunks of the file no composition uses, such as its header's, go.)
    age_all(&b, Duration::from_secs(3600));
    let grace = Duration::from_secs(600);
    let composed = keys(&*b, "composed/");
    let held = keys(&*b, "chunks/").len() as u64;
    let rep = s.gc(&[r.manifest_id], grace).expect("gc");
    assert!(rep.chunks_deleted < held, "{rep:?}");
    assert_eq!(keys(&*b, "composed/"), composed);
    assert_eq!(read_all(&s, &r.manifest_id), bytes);
    let f = s.fsck(&[r.manifest_id]).expect("fsck");
    assert!(f.is_clean(), "{f:?}");
    assert_eq!(f.orphan_chunks, vec![], "{f:?}");

    // A damaged composition is caught on read and by fsck, and GC refuses to sweep.
    let key = keys(&*b, "composed/").remove(0);
    let mut damaged = b.get(&key).expect("get");
    damaged[20] ^= 1;
    b.put(&key, &damaged).expect("put");
    let id = ChunkId::from_hex(key.rsplit('/').next().expect("id")).expect("hex");
    assert!(s.get_chunk(&id).expect_err("corrupt").is_corrupt());
    assert!(!s.fsck(&[r.manifest_id]).expect("fsck").is_clean());
    assert!(s.gc(&[r.manifest_id], grace).is_err(), "gc refuses");

    // Nothing live: the compositions go, then their sources.
    b.delete(&key).expect("delete");
    age_all(&b, Duration::from_secs(3600));
    s.gc(&[], grace).expect("gc");
    assert!(b.is_empty(), "{:?}", keys(&*b, ""));
}

#[test]
fn ingest_writes_chunk_bytes_when_composing_is_off() {
    let (_, b, _, r, _) = ingest_held_file(
        openims_format::DiskFormat::Qcow2,
        sample_file(openims_format::OutputFormat::Qcow2),
        StoreConfig {
            compose: false,
            ..config()
        },
    );
    assert_eq!(r.composed_chunks, 0);
    assert!(r.new_bytes > 0);
    assert!(keys(&*b, "composed/").is_empty());
}
