//! The job engine survives the death of the node running a job: the job goes back to the
//! queue (at once when the same node restarts, after its lease when another node takes over)
//! and runs to SUCCESS exactly once.

use openims_core::image::{Image, ImageStatus, Origin};
use openims_core::jobs::JobStatus;
use openims_core::kms::NewKey;
use openims_core::service::CopyRequest;
use openims_core::{Caller, Service, ServiceConfig};
use std::sync::Arc;
use std::time::Duration;

async fn open(dir: &std::path::Path, lease_ms: i64) -> Arc<Service> {
    let mut cfg = ServiceConfig::new(dir);
    cfg.job_lease_ms = lease_ms;
    Service::open(cfg).await.expect("service opens")
}

async fn caller(svc: &Service) -> Caller {
    let b = match svc.db.bootstrap().await.expect("bootstrap") {
        Some(b) => b,
        None => panic!("fresh database must bootstrap"),
    };
    svc.db
        .lookup_key(&b.key.access_key)
        .await
        .expect("lookup")
        .expect("key exists")
        .caller
}

/// An active image whose data is a small raw disk in the store.
async fn active_image(svc: &Service, c: &Caller) -> Image {
    let mut img = Image::new(c.project_id.clone(), Some("src".into()), Origin::Metadata);
    img.disk_format = Some("raw".into());
    img.container_format = Some("bare".into());
    svc.db.insert_image(&img, 50).await.expect("insert");
    let bytes: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let data = Arc::new(bytes);
    let mut disk = openims_format::read::open(data, openims_format::DiskFormat::Raw).expect("raw");
    let report = svc
        .data
        .store
        .ingest(disk.as_mut(), &mut |_| {})
        .expect("ingest");
    assert!(svc
        .db
        .transition(&img.id, ImageStatus::Queued, ImageStatus::Saving, Some("t"))
        .await
        .expect("saving"));
    img.disk_manifest = Some(report.manifest_id.to_string());
    img.size = Some(3 * 1024 * 1024);
    img.virtual_size = img.size;
    assert!(svc.db.activate_upload(&img, "t").await.expect("activate"));
    svc.db
        .get_image(&img.id)
        .await
        .expect("get")
        .expect("exists")
}

/// A new enabled master key of the caller's project.
async fn new_key(svc: &Service, c: &Caller) -> String {
    svc.kms_create_key(
        c,
        NewKey {
            alias: format!("k-{}", uuid::Uuid::new_v4().simple()),
            ..NewKey::default()
        },
    )
    .await
    .expect("key created")
    .id
}

/// Requests an encrypting in-region copy of the plaintext `src` named `name`: a job that
/// queues and runs on a worker (a copy that only shares manifests is made within the request).
async fn request_copy_named(
    svc: &Service,
    c: &Caller,
    src: &Image,
    name: &str,
) -> openims_core::ids::JobId {
    let key = new_key(svc, c).await;
    svc.copy_image_in_region(
        c,
        &src.id.to_string(),
        CopyRequest {
            name: name.into(),
            cmk_id: Some(key),
            ..Default::default()
        },
    )
    .await
    .expect("copy accepted")
}

async fn request_copy(svc: &Service, c: &Caller, src: &Image) -> openims_core::ids::JobId {
    request_copy_named(svc, c, src, "copy").await
}

/// The bytes of an image's disk, decrypted with its data key when it is encrypted.
async fn image_bytes(svc: &Service, c: &Caller, img: &Image) -> Vec<u8> {
    let manifest = img.disk_manifest.as_deref().expect("image data");
    let dek = svc.image_dek(c, img).await.expect("data key");
    let mut disk = svc
        .data
        .store
        .open_disk_with(&manifest.parse().expect("manifest id"), dek)
        .expect("open");
    let mut buf = vec![0u8; openims_format::VirtualDisk::virtual_size(&disk) as usize];
    openims_format::VirtualDisk::read_at(&mut disk, 0, &mut buf).expect("read");
    buf
}

async fn wait_status(svc: &Service, c: &Caller, job: &str, want: JobStatus) {
    for _ in 0..200 {
        let j = svc.job(c, job).await.expect("job");
        if j.status == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {job} never reached {want:?}");
}

#[tokio::test]
async fn a_job_of_a_dead_node_is_taken_over_and_finishes_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path(), 200).await;
    let c = caller(&svc).await;
    let src = active_image(&svc, &c).await;
    let job = request_copy(&svc, &c, &src).await;
    // Another node claims the job and dies without a heartbeat.
    let claimed = svc
        .db
        .claim_job("node-dead", 200)
        .await
        .expect("claim")
        .expect("a job");
    assert_eq!(claimed.id, job);
    assert_eq!(
        svc.job(&c, job.as_str()).await.expect("job").status,
        JobStatus::Running
    );
    // This node's workers take it over once the lease has expired.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = svc.spawn_workers(1, stop_rx);
    wait_status(&svc, &c, job.as_str(), JobStatus::Success).await;
    let done = svc.job(&c, job.as_str()).await.expect("job");
    assert_eq!(
        done.attempts, 2,
        "claimed once by the dead node, once by the survivor"
    );
    let copy_id = done.image_id.expect("copy id");
    let copy = svc.image(&c, &copy_id).await.expect("copy exists");
    assert_eq!(copy.status, ImageStatus::Active);
    assert_eq!(
        image_bytes(&svc, &c, &copy).await,
        image_bytes(&svc, &c, &src).await,
        "the copy holds the source's data"
    );
    // The dead node coming back cannot finish the job a second time.
    assert!(!svc
        .db
        .finish_job(&job, "node-dead", Ok(None))
        .await
        .expect("finish"));
    let _ = stop_tx.send(true);
    for w in workers {
        w.await.expect("worker stops");
    }
}

#[tokio::test]
async fn restarting_the_same_node_releases_its_jobs_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, job, node) = {
        // A long lease: only the restart itself may release the job.
        let svc = open(dir.path(), 3_600_000).await;
        let c = caller(&svc).await;
        let src = active_image(&svc, &c).await;
        let job = request_copy(&svc, &c, &src).await;
        let node = svc.node_id.clone();
        svc.db
            .claim_job(&node, 3_600_000)
            .await
            .expect("claim")
            .expect("a job");
        svc.db.pool.close().await;
        (c, job, node)
    };
    let svc = open(dir.path(), 3_600_000).await;
    assert_eq!(svc.node_id, node, "the node id survives restarts");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = svc.spawn_workers(1, stop_rx);
    wait_status(&svc, &c, job.as_str(), JobStatus::Success).await;
    let _ = stop_tx.send(true);
    for w in workers {
        w.await.expect("worker stops");
    }
}

#[tokio::test]
async fn an_interrupted_upload_is_queued_again_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, id) = {
        let svc = open(dir.path(), 30_000).await;
        let c = caller(&svc).await;
        let mut img = Image::new(c.project_id.clone(), Some("u".into()), Origin::Metadata);
        img.disk_format = Some("raw".into());
        img.container_format = Some("bare".into());
        svc.db.insert_image(&img, 50).await.expect("insert");
        let token = format!("{}:upload", svc.node_id);
        assert!(svc
            .db
            .transition(
                &img.id,
                ImageStatus::Queued,
                ImageStatus::Saving,
                Some(&token)
            )
            .await
            .expect("saving"));
        std::fs::write(svc.data.staging_path("leftover"), b"partial").expect("staging file");
        svc.db.pool.close().await;
        (c, img.id.to_string())
    };
    let svc = open(dir.path(), 30_000).await;
    let img = svc.image(&c, &id).await.expect("image");
    assert_eq!(
        img.status,
        ImageStatus::Queued,
        "re-uploadable, never active with partial data"
    );
    assert!(
        !svc.data.staging_path("leftover").exists(),
        "staging is cleared"
    );
}

#[tokio::test]
async fn the_job_list_is_newest_first_filtered_and_project_scoped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No workers run here: the jobs stay queued, with their queue positions.
    let svc = open(dir.path(), 30_000).await;
    let c = caller(&svc).await;
    let src = active_image(&svc, &c).await;
    let mut made = Vec::new();
    for n in 0..3 {
        let job = request_copy_named(&svc, &c, &src, &format!("copy-{n}")).await;
        made.push(job.as_str().to_string());
        // created_at has millisecond resolution: keep the three apart.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let listed = svc.list_jobs(&c, None, 100).await.expect("list");
    let ids: Vec<String> = listed.iter().map(|j| j.id.as_str().to_string()).collect();
    let newest_first: Vec<String> = made.iter().rev().cloned().collect();
    assert_eq!(ids, newest_first);
    let positions: Vec<Option<u64>> = listed.iter().map(|j| j.queue_position).collect();
    assert_eq!(positions, vec![Some(2), Some(1), Some(0)]);
    assert_eq!(svc.list_jobs(&c, None, 2).await.expect("list").len(), 2);
    assert_eq!(
        svc.list_jobs(&c, Some(JobStatus::Init), 100)
            .await
            .expect("list")
            .len(),
        3
    );
    assert!(svc
        .list_jobs(&c, Some(JobStatus::Success), 100)
        .await
        .expect("list")
        .is_empty());
    let mut other = c.clone();
    other.project_id = openims_core::ids::ProjectId("0123456789abcdef0123456789abcdef".into());
    assert!(svc
        .list_jobs(&other, None, 100)
        .await
        .expect("list")
        .is_empty());
}

/// Sets the modification time of every file under `dir` to `age` ago.
fn age_files(dir: &std::path::Path, age: Duration) {
    let when = std::time::SystemTime::now() - age;
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            age_files(&p, age);
        } else {
            let f = std::fs::File::options().write(true).open(&p).expect("open");
            f.set_modified(when).expect("set mtime");
        }
    }
}

#[tokio::test]
async fn deleting_the_source_of_a_queued_copy_does_not_break_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path(), 5_000).await;
    let c = caller(&svc).await;
    let src = active_image(&svc, &c).await;
    let want = image_bytes(&svc, &c, &src).await;
    // The source's data is old: only the job's pin, not its age, can keep it from GC.
    age_files(dir.path(), Duration::from_secs(3600));
    let job = request_copy(&svc, &c, &src).await;
    // The source goes, and a garbage collection with no grace runs before the job does: the
    // job's snapshot keeps the source's data alive (the data is older than the job, so the
    // GC's open-work cutoff does not cover it).
    svc.delete_image(&c, &src.id.to_string())
        .await
        .expect("source deleted");
    let gc = svc
        .collect_garbage(Duration::ZERO)
        .await
        .expect("gc")
        .expect("this node collects");
    assert_eq!(gc.manifests_deleted, 0, "the queued copy pins the source");
    assert_eq!(gc.chunks_deleted, 0, "the queued copy pins the source");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = svc.spawn_workers(1, stop_rx);
    wait_status(&svc, &c, job.as_str(), JobStatus::Success).await;
    let copy_id = svc.job(&c, job.as_str()).await.expect("job").image_id;
    let copy = svc
        .image(&c, &copy_id.expect("copy id"))
        .await
        .expect("copy exists");
    assert_eq!(copy.status, ImageStatus::Active);
    assert_ne!(copy.disk_manifest, src.disk_manifest, "encrypted anew");
    assert_eq!(
        copy.properties.get("__originalimagename"),
        Some(&serde_json::json!(src.id.to_string()))
    );
    let _ = stop_tx.send(true);
    for w in workers {
        w.await.expect("worker stops");
    }
    // The job ended: its pin is gone, so the deleted source's plaintext data is collected,
    // and the copy's own data is left intact.
    let gc = svc
        .collect_garbage(Duration::ZERO)
        .await
        .expect("gc")
        .expect("this node collects");
    assert!(
        gc.manifests_deleted >= 1 && gc.chunks_deleted >= 1,
        "{gc:?}"
    );
    assert_eq!(
        image_bytes(&svc, &c, &copy).await,
        want,
        "the copy reads the source's bytes"
    );
    // Once the copy goes too, nothing holds its data and it is collected: no leak.
    svc.delete_image(&c, &copy.id.to_string())
        .await
        .expect("copy deleted");
    let gc = svc
        .collect_garbage(Duration::ZERO)
        .await
        .expect("gc")
        .expect("this node collects");
    assert!(
        gc.manifests_deleted >= 1 && gc.chunks_deleted >= 1,
        "{gc:?}"
    );
    assert_eq!(job_sources(&svc).await, 0, "an ended job keeps no snapshot");
}

#[tokio::test]
async fn a_copy_that_shares_manifests_is_made_within_the_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No workers run here: the copy must not need one.
    let svc = open(dir.path(), 30_000).await;
    let c = caller(&svc).await;
    let src = active_image(&svc, &c).await;
    let job = svc
        .copy_image_in_region(
            &c,
            &src.id.to_string(),
            CopyRequest {
                name: "shared".into(),
                description: Some("a copy".into()),
                ..Default::default()
            },
        )
        .await
        .expect("copy accepted");
    let done = svc.job(&c, job.as_str()).await.expect("job");
    assert_eq!(done.status, JobStatus::Success);
    assert_eq!(done.process_percent, 100.0);
    assert_eq!(done.queue_position, None);
    assert!(done.begin_time.is_some() && done.end_time.is_some());
    let copy = svc
        .image(&c, &done.image_id.expect("copy id"))
        .await
        .expect("copy exists");
    assert_eq!(copy.status, ImageStatus::Active);
    assert_eq!(copy.name.as_deref(), Some("shared"));
    assert_eq!(
        copy.disk_manifest, src.disk_manifest,
        "the copy shares the source's data"
    );
    assert_eq!(
        copy.properties.get("__description"),
        Some(&serde_json::json!("a copy"))
    );
    assert_eq!(
        job_sources(&svc).await,
        0,
        "nothing is pinned for a done job"
    );
    // It never counts against the limit of running replications.
    let open_jobs = svc
        .db
        .count_open_jobs(
            &c.project_id,
            openims_core::jobs::JobType::CopyImageInRegion,
        )
        .await
        .expect("count");
    assert_eq!(open_jobs, 0);
    // A source deleted before the request gives no copy and no job.
    svc.delete_image(&c, &src.id.to_string())
        .await
        .expect("source deleted");
    let err = svc
        .copy_image_in_region(
            &c,
            &src.id.to_string(),
            CopyRequest {
                name: "late".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("source gone");
    assert!(
        matches!(err, openims_core::CoreError::ImageNotFound(_)),
        "{err:?}"
    );
    assert_eq!(svc.list_jobs(&c, None, 100).await.expect("list").len(), 1);
}

/// A node claims the queued job with a lease that is over at once, and the job has no
/// attempts left: recovery fails it.
async fn fail_on_recovery(svc: &Service) {
    svc.db
        .claim_job("node-dead", 1)
        .await
        .expect("claim")
        .expect("a job");
    tokio::time::sleep(Duration::from_millis(5)).await;
    svc.db.recover_expired_jobs(1).await.expect("recover");
}

async fn job_sources(svc: &Service) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM job_sources")
        .fetch_one(&svc.db.pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn a_job_that_fails_on_recovery_drops_its_source_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path(), 5_000).await;
    let c = caller(&svc).await;
    let src = active_image(&svc, &c).await;
    request_copy(&svc, &c, &src).await;
    assert_eq!(job_sources(&svc).await, 1);
    fail_on_recovery(&svc).await;
    assert_eq!(
        job_sources(&svc).await,
        0,
        "the failed job's snapshot is gone"
    );
}

#[tokio::test]
async fn gc_keeps_what_open_jobs_wrote_even_with_no_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path(), 5_000).await;
    let c = caller(&svc).await;
    let src = active_image(&svc, &c).await;
    // A queued job (never run here): its outputs are unreferenced until it ends.
    request_copy(&svc, &c, &src).await;
    // Something the job "wrote": a chunk and a manifest nobody references yet.
    let bytes: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 13) as u8).collect();
    let mut disk =
        openims_format::read::open(Arc::new(bytes), openims_format::DiskFormat::Raw).expect("raw");
    let written = svc
        .data
        .store
        .ingest(disk.as_mut(), &mut |_| {})
        .expect("ingest")
        .manifest_id;
    let gc = svc
        .collect_garbage(Duration::ZERO)
        .await
        .expect("gc")
        .expect("this node collects");
    assert_eq!(gc.manifests_deleted, 0, "{gc:?}");
    assert_eq!(gc.chunks_deleted, 0, "{gc:?}");
    assert!(svc.data.store.manifest(&written).is_ok());
}

#[tokio::test]
async fn an_import_that_fails_on_recovery_kills_its_image() {
    use openims_core::import::{ImportKind, ImportRequest};
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path(), 5_000).await;
    let c = caller(&svc).await;
    svc.buckets()
        .create_bucket(&c.project_id, "bkt1")
        .await
        .expect("bucket");
    let body = futures::stream::iter(vec![Ok::<bytes::Bytes, std::io::Error>(
        bytes::Bytes::from(vec![7u8; 1 << 20]),
    )]);
    svc.buckets()
        .put_object(
            &c.project_id,
            "bkt1",
            "disk.raw",
            &openims_core::buckets::ObjectAttrs::default(),
            body,
            &openims_core::objects::PutOptions::default(),
        )
        .await
        .expect("put");
    let job = svc
        .import_image(
            &c,
            ImportKind::System,
            None,
            ImportRequest {
                name: Some("imp".into()),
                image_url: "bkt1:disk.raw".into(),
                min_disk: Some(1),
                ..ImportRequest::default()
            },
        )
        .await
        .expect("import accepted");
    fail_on_recovery(&svc).await;
    let j = svc.job(&c, job.as_str()).await.expect("job");
    assert_eq!(j.status, JobStatus::Fail, "{j:?}");
    let img = svc
        .image(&c, j.image_id.as_deref().expect("image id"))
        .await
        .expect("image");
    assert_eq!(img.status, ImageStatus::Killed, "never left saving");
}
