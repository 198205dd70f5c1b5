//! Import from and export to bucket objects through the service (no HTTP): an object replaced
//! after the import was requested fails the job and nothing becomes active; an unchanged one
//! imports; an export reads back as the same disk; a raw import, a qcow2 export, a quick
//! export and the import of that qcow2 share the data's chunks instead of copying them.

use bytes::Bytes;
use openims_core::buckets::ObjectAttrs;
use openims_core::export::ExportRequest;
use openims_core::image::ImageStatus;
use openims_core::import::{ImportKind, ImportRequest};
use openims_core::jobs::JobStatus;
use openims_core::objects::PutOptions;
use openims_core::{Caller, ImageId, Service, ServiceConfig};
use openims_format::DiskFormat::{Qcow2, Vhd};
use std::sync::Arc;
use std::time::Duration;

async fn caller(svc: &Service) -> Caller {
    let b = svc
        .db
        .bootstrap()
        .await
        .expect("bootstrap")
        .expect("fresh database bootstraps");
    svc.db
        .lookup_key(&b.key.access_key)
        .await
        .expect("lookup")
        .expect("key exists")
        .caller
}

/// A service in a fresh data dir, its bootstrap caller, and that caller's bucket `bkt1`.
async fn service_with_bucket() -> (tempfile::TempDir, Arc<Service>, Caller) {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc: Arc<Service> = Service::open(ServiceConfig::new(dir.path()))
        .await
        .expect("open");
    let c = caller(&svc).await;
    svc.buckets()
        .create_bucket(&c.project_id, "bkt1")
        .await
        .expect("bucket");
    (dir, svc, c)
}

async fn put(svc: &Service, c: &Caller, key: &str, data: Vec<u8>) {
    let body = futures::stream::iter(vec![Ok::<Bytes, std::io::Error>(Bytes::from(data))]);
    svc.buckets()
        .put_object(
            &c.project_id,
            "bkt1",
            key,
            &ObjectAttrs::default(),
            body,
            &PutOptions::default(),
        )
        .await
        .expect("put");
}

async fn wait(svc: &Service, c: &Caller, job: &str) -> openims_core::jobs::Job {
    for _ in 0..400 {
        let j = svc.job(c, job).await.expect("job");
        if matches!(j.status, JobStatus::Success | JobStatus::Fail) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {job} did not finish");
}

/// Imports `bkt1:<key>` as a system disk image and waits for the job to succeed.
async fn import_ok(svc: &Service, c: &Caller, key: &str) -> openims_core::jobs::Job {
    let job = svc
        .import_image(c, ImportKind::System, None, request(key))
        .await
        .expect("import accepted");
    let j = wait(svc, c, job.as_str()).await;
    assert_eq!(j.status, JobStatus::Success, "{j:?}");
    j
}

/// Exports `image` to `bkt1:<key>` as `format`, waits for the job to succeed and reads the
/// exported disk back (`len` bytes).
async fn export_and_read(
    svc: &Service,
    c: &Caller,
    image: &str,
    key: &str,
    format: openims_format::DiskFormat,
    len: usize,
) -> Vec<u8> {
    let job = svc
        .export_image(
            c,
            image,
            ExportRequest {
                bucket_url: format!("bkt1:{key}"),
                file_format: Some(format.to_string()),
                is_quick_export: false,
            },
        )
        .await
        .expect("export accepted");
    let j = wait(svc, c, job.as_str()).await;
    assert_eq!(j.status, JobStatus::Success, "{j:?}");
    let reader = svc
        .buckets()
        .open_object_reader(&c.project_id, "bkt1", key)
        .await
        .expect("exported object");
    let mut d = openims_format::read::open(Arc::new(reader), format).expect("readable");
    let mut back = vec![0u8; len];
    d.read_at(0, &mut back).expect("read");
    back
}

fn disk(seed: u8) -> Vec<u8> {
    (0..3 * 1024 * 1024u32)
        .map(|i| (i % 251) as u8 ^ seed)
        .collect()
}

fn request(key: &str) -> ImportRequest {
    ImportRequest {
        name: Some("imp".into()),
        image_url: format!("bkt1:{key}"),
        min_disk: Some(1),
        ..ImportRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_object_fails_the_import_and_an_unchanged_one_imports_and_exports() {
    let (_dir, svc, c) = service_with_bucket().await;
    put(&svc, &c, "disk.raw", disk(0)).await;

    // Requested, then the object is replaced before a worker runs the job.
    let job = svc
        .import_image(&c, ImportKind::System, None, request("disk.raw"))
        .await
        .expect("import accepted");
    put(&svc, &c, "disk.raw", disk(7)).await;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let _workers = svc.spawn_workers(1, stop);
    let j = wait(&svc, &c, job.as_str()).await;
    assert_eq!(j.status, JobStatus::Fail, "{j:?}");
    assert_eq!(j.error_code.as_deref(), Some("IMG.0057"));
    assert!(
        j.fail_reason.as_deref().unwrap_or("").contains("replaced"),
        "{j:?}"
    );
    let id = ImageId::parse(j.image_id.as_deref().expect("image id")).expect("uuid");
    let img = svc.db.get_image(&id).await.expect("get").expect("exists");
    assert_eq!(img.status, ImageStatus::Killed);
    assert!(img.disk_manifest.is_none());

    // Unchanged: imports, and exports back as the same disk.
    let j = import_ok(&svc, &c, "disk.raw").await;
    let image_id = j.image_id.expect("image id");
    let img = svc.image(&c, &image_id).await.expect("image");
    assert_eq!(img.status, ImageStatus::Active);
    assert_eq!(img.virtual_size, Some(3 * 1024 * 1024));

    let back = export_and_read(&svc, &c, &image_id, "out.qcow2", Qcow2, 3 * 1024 * 1024).await;
    assert!(back == disk(7), "the export differs from the imported disk");
}

/// Chunk files in the store of a service whose data dir is `dir`.
fn stored_chunks(dir: &std::path::Path) -> usize {
    store_files(dir, "chunks")
}

/// Files under the store directory `sub` (`chunks`, `composed`) of a service whose data dir
/// is `dir`.
fn store_files(dir: &std::path::Path, sub: &str) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => walk(&e.path()),
                        _ => 1,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join("store").join(sub))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_and_exports_of_unencrypted_images_reference_chunks_instead_of_copying() {
    const MIB: usize = 1 << 20;
    let (dir, svc, c) = service_with_bucket().await;
    // 21 MiB: data, zeros, data, zeros, data, then a 1 MiB last chunk of data.
    let mut raw = vec![0u8; 21 * MIB];
    for (k, seed) in [(0usize, 3u8), (2, 5), (4, 9), (5, 11)] {
        let end = ((k + 1) * 4 * MIB).min(raw.len());
        for (i, b) in raw[k * 4 * MIB..end].iter_mut().enumerate() {
            *b = (i % 253) as u8 ^ seed;
        }
    }
    put(&svc, &c, "src.raw", raw.clone()).await;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let _workers = svc.spawn_workers(1, stop);
    // A raw object stored as whole chunks is imported by reference: nothing is written.
    let before = stored_chunks(dir.path());
    let j = import_ok(&svc, &c, "src.raw").await;
    assert_eq!(stored_chunks(dir.path()), before, "the import wrote chunks");
    let image_id = j.image_id.expect("image id");
    let img = svc.image(&c, &image_id).await.expect("image");
    assert_eq!(img.virtual_size, Some(raw.len() as i64));

    for (key, format, quick) in [
        ("out.qcow2", Some("qcow2"), false),
        ("quick.raw", None, true),
    ] {
        let before = stored_chunks(dir.path());
        let job = svc
            .export_image(
                &c,
                &image_id,
                ExportRequest {
                    bucket_url: format!("bkt1:{key}"),
                    file_format: format.map(str::to_string),
                    is_quick_export: quick,
                },
            )
            .await
            .expect("export accepted");
        let j = wait(&svc, &c, job.as_str()).await;
        assert_eq!(j.status, JobStatus::Success, "{j:?}");
        // Only the qcow2 metadata (or the bitmap) is new: the data is the image's chunks.
        let added = stored_chunks(dir.path()) - before;
        assert!(added <= 1, "{key}: {added} chunks written");
        let reader = svc
            .buckets()
            .open_object_reader(&c.project_id, "bkt1", key)
            .await
            .expect("exported object");
        let fmt = if quick {
            openims_format::DiskFormat::Raw
        } else {
            openims_format::DiskFormat::Qcow2
        };
        let mut d = openims_format::read::open(Arc::new(reader), fmt).expect("readable");
        assert_eq!(d.virtual_size(), raw.len() as u64, "{key}");
        let mut back = vec![0u8; raw.len()];
        d.read_at(0, &mut back).expect("read");
        assert!(back == raw, "{key}: the export differs from the image");
    }
    // The exported qcow2 imported back: its data clusters are the object's chunks, laid out
    // verbatim, so the import references them and writes nothing.
    let before = stored_chunks(dir.path());
    let j = import_ok(&svc, &c, "out.qcow2").await;
    assert_eq!(
        stored_chunks(dir.path()),
        before,
        "the qcow2 import wrote chunks"
    );
    let back = svc
        .image(&c, &j.image_id.expect("image id"))
        .await
        .expect("image");
    let orig = svc.image(&c, &image_id).await.expect("image");
    assert_eq!(back.disk_manifest, orig.disk_manifest, "the same disk");
    // The quick export's bitmap marks the chunks with data, never a chunk of zeros.
    let reader = svc
        .buckets()
        .open_object_reader(&c.project_id, "bkt1", "quick.raw.bitmap")
        .await
        .expect("bitmap object");
    let mut bytes = vec![0u8; 4096];
    let n = openims_format::ReadAt::read_at(&reader, &mut bytes, 0).expect("read bitmap");
    let bm = openims_format::write::AllocationBitmap::from_bytes(&bytes[..n]).expect("bitmap");
    let per_chunk = (4 * MIB) as u64 / bm.granularity();
    for bit in 0..bm.len() {
        let chunk = bit / per_chunk;
        assert_eq!(bm.get(bit), matches!(chunk, 0 | 2 | 4 | 5), "bit {bit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_imports_and_vhd_exports_compose_chunks_from_the_other_sides_chunks() {
    const MIB: usize = 1 << 20;
    let (dir, svc, c) = service_with_bucket().await;
    // 13 MiB of data from 0.5 MiB on in a 24 MiB disk, as a compact qcow2 (64 KiB clusters
    // after the header and tables): no data cluster of the file is chunk-aligned.
    let mut raw = vec![0u8; 24 * MIB];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut raw[MIB / 2..MIB / 2 + 13 * MIB] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut sink = openims_format::MemSink::default();
    openims_format::write_image(
        &mut openims_format::read::open(Arc::new(raw.clone()), openims_format::DiskFormat::Raw)
            .expect("raw"),
        openims_format::OutputFormat::Qcow2,
        &openims_format::WriteOptions::default(),
        &mut sink,
        &mut |_| {},
    )
    .expect("qcow2");
    put(&svc, &c, "src.qcow2", sink.data).await;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let _workers = svc.spawn_workers(1, stop);

    let before = stored_chunks(dir.path());
    let j = import_ok(&svc, &c, "src.qcow2").await;
    assert_eq!(
        stored_chunks(dir.path()),
        before,
        "the import wrote chunk bytes"
    );
    // 14 MiB touched by data in 4 MiB chunks: chunks 0 to 3 hold data.
    assert_eq!(store_files(dir.path(), "composed"), 4);
    let image_id = j.image_id.expect("image id");

    // The uploaded object goes and GC runs: the image's compositions keep its bytes.
    assert!(svc
        .buckets()
        .delete_object(&c.project_id, "bkt1", "src.qcow2")
        .await
        .expect("delete"));
    svc.collect_garbage(Duration::ZERO).await.expect("gc");
    let back = export_and_read(&svc, &c, &image_id, "back.qcow2", Qcow2, raw.len()).await;
    assert!(back == raw, "the image differs from the uploaded disk");

    // A vhd export interleaves sector bitmaps with the image's bytes: the body's chunks are
    // compositions of the image's (composed) chunks and the bitmaps; only the header window
    // (footer copy, header, BAT) is written as bytes.
    let (chunks_before, composed_before) = (
        stored_chunks(dir.path()),
        store_files(dir.path(), "composed"),
    );
    let back = export_and_read(&svc, &c, &image_id, "back.vhd", Vhd, raw.len()).await;
    let added = stored_chunks(dir.path()) - chunks_before;
    assert!(added <= 2, "the vhd export wrote {added} chunks");
    assert!(store_files(dir.path(), "composed") > composed_before);
    assert!(back == raw, "the vhd export differs from the image");
}
