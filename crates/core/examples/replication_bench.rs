//! Replication benchmark (see `benches/replication/README.md`). Runs the real service core
//! (database, job workers, chunk store, KMS) on a data directory, builds large images
//! directly with the store API, and times in-region copies from the request to job SUCCESS.
//!
//! Usage: `replication_bench DATA_DIR [--sizes-gib 1,100] [--data-gib 1] [--virtual-gib 4]
//! [--runs 5]`. Prints one JSON object per measurement.

use openims_core::image::{Image, ImageStatus, Origin};
use openims_core::jobs::JobStatus;
use openims_core::kms::{ImageKey, KeyRole, NewKey};
use openims_core::service::CopyRequest;
use openims_core::{Caller, DomainId, ProjectId, Service, ServiceConfig, UserId};
use openims_store::{Dek, Manifest, CHUNK_SIZE};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// Inserts an active raw image over `manifest` (with its key row, if encrypted).
async fn add_image(
    svc: &Service,
    caller: &Caller,
    manifest: &str,
    size: u64,
    key: Option<ImageKey>,
) -> R<String> {
    let mut img = Image::new(
        caller.project_id.clone(),
        Some("bench".into()),
        Origin::File,
    );
    img.status = ImageStatus::Active;
    img.disk_format = Some("raw".into());
    img.container_format = Some("bare".into());
    img.size = Some(size as i64);
    img.virtual_size = Some(size as i64);
    img.disk_manifest = Some(manifest.to_string());
    img.active_at = Some(img.created_at);
    if let Some(c) = key.as_ref().and_then(|k| k.cmk_id.clone()) {
        img.properties.insert("__system__cmkid".into(), json!(c));
    }
    svc.db.insert_image_with_key(&img, key.as_ref()).await?;
    Ok(img.id.to_string())
}

/// Requests a copy and waits for SUCCESS; returns the elapsed time and the new image id.
async fn timed_copy(
    svc: &Service,
    caller: &Caller,
    src: &str,
    cmk: Option<&str>,
    reencrypt: bool,
) -> R<(Duration, String)> {
    let t0 = Instant::now();
    let job = svc
        .copy_image_in_region(
            caller,
            src,
            CopyRequest {
                name: format!("copy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
                cmk_id: cmk.map(str::to_string),
                reencrypt_data: reencrypt,
                ..CopyRequest::default()
            },
        )
        .await?;
    loop {
        let j = svc.job(caller, job.as_str()).await?;
        match j.status {
            JobStatus::Success => return Ok((t0.elapsed(), j.image_id.unwrap_or_default())),
            JobStatus::Fail => return Err(format!("job failed: {:?}", j.fail_reason).into()),
            _ => tokio::time::sleep(Duration::from_micros(500)).await,
        }
    }
}

fn summary(ms: &mut [f64]) -> (f64, f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    (ms[ms.len() / 2], ms[0], ms[ms.len() - 1])
}

#[tokio::main]
async fn main() -> R<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: replication_bench DATA_DIR [options]")?;
    let sizes: Vec<u64> = arg(&args, "--sizes-gib", "1,100")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let data_gib: u64 = arg(&args, "--data-gib", "1").parse()?;
    let virt_gib: u64 = arg(&args, "--virtual-gib", "4").parse()?;
    let runs: usize = arg(&args, "--runs", "5").parse::<usize>()?.max(1);
    let stream_runs: usize = arg(&args, "--stream-runs", "1").parse::<usize>()?.max(1);

    let mut cfg = ServiceConfig::new(dir);
    cfg.max_image_size = 1 << 50;
    cfg.image_quota = 100_000;
    cfg.max_copy_jobs_per_project = 100;
    cfg.gc_interval_secs = 0;
    let svc: Arc<Service> = Service::open(cfg).await?;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let _workers = svc.spawn_workers(2, stop_rx);
    let caller = Caller {
        user_id: UserId::generate(),
        user_name: "bench".into(),
        domain_id: DomainId::generate(),
        project_id: ProjectId::generate(),
        project_name: "bench".into(),
    };
    let mut keys = Vec::new();
    for _ in 0..2 {
        let alias = format!("bench-{}", uuid::Uuid::new_v4().simple());
        keys.push(
            svc.kms_create_key(
                &caller,
                NewKey {
                    alias,
                    ..NewKey::default()
                },
            )
            .await?
            .id,
        );
    }
    let (k1, k2) = (keys[0].clone(), keys[1].clone());
    let store = svc.data.store.clone();

    // (1) O(1) copies: the manifest lists every chunk of the disk; one non-zero 4 MiB block,
    // stored once (built directly with the store API).
    let block: Vec<u8> = (0..CHUNK_SIZE as usize)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    for gib in &sizes {
        let size = gib << 30;
        let n = size.div_ceil(u64::from(CHUNK_SIZE)) as usize;
        // Unencrypted source.
        let pid = store.put_chunk(&block)?;
        let pm = store.put_manifest(&Manifest::new(size, CHUNK_SIZE, vec![Some(pid); n])?)?;
        let plain = add_image(&svc, &caller, &pm.to_string(), size, None).await?;
        // Encrypted source: a DEK wrapped by k1.
        let dek = Dek::generate();
        let eid = store.put_encrypted_chunk(&dek, &block)?;
        let em = store.put_manifest(&Manifest::new_encrypted(
            size,
            CHUNK_SIZE,
            vec![Some(eid); n],
        )?)?;
        let material = svc.usable_key(&caller, &k1, KeyRole::Target).await?;
        let wrapped = svc.cmk_wrap(&k1, &material, &dek)?;
        let enc = add_image(
            &svc,
            &caller,
            &em.to_string(),
            size,
            Some(ImageKey {
                cmk_id: Some(k1.clone()),
                wrapped_dek: wrapped,
            }),
        )
        .await?;
        let cases: [(&str, &str, Option<&str>); 3] = [
            ("unchanged_key", plain.as_str(), None),
            ("decrypt", enc.as_str(), None),
            ("rekey", enc.as_str(), Some(k2.as_str())),
        ];
        for (case, src, cmk) in cases {
            let mut ms = Vec::new();
            for _ in 0..runs {
                let (d, _) = timed_copy(&svc, &caller, src, cmk, false).await?;
                ms.push(d.as_secs_f64() * 1000.0);
            }
            let (median, min, max) = summary(&mut ms);
            println!(
                "{}",
                json!({"bench": "o1_copy", "case": case, "virtual_gib": gib, "chunks": n,
                    "runs": runs, "median_ms": median, "min_ms": min, "max_ms": max})
            );
        }
    }

    // (2) Streaming: a virt_gib image holding data_gib of random data (evenly spread chunks).
    if data_gib > 0 {
        let size = virt_gib << 30;
        let n = size.div_ceil(u64::from(CHUNK_SIZE)) as usize;
        let data_chunks = ((data_gib << 30) / u64::from(CHUNK_SIZE)) as usize;
        let every = (n / data_chunks.max(1)).max(1);
        let mut chunks = vec![None; n];
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(std::process::id());
        for slot in chunks.iter_mut().step_by(every).take(data_chunks) {
            for w in buf.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                w.copy_from_slice(&state.to_le_bytes());
            }
            *slot = Some(store.put_chunk(&buf)?);
        }
        store.sync()?;
        let mid = store.put_manifest(&Manifest::new(size, CHUNK_SIZE, chunks)?)?;
        let src = add_image(&svc, &caller, &mid.to_string(), size, None).await?;
        let data_bytes = (data_chunks as u64) * u64::from(CHUNK_SIZE);
        // Each run writes new chunks (every copy gets a fresh data key).
        for run in 0..stream_runs {
            let (d, enc) = timed_copy(&svc, &caller, &src, Some(&k1), false).await?;
            println!(
                "{}",
                json!({"bench": "encrypting_copy", "run": run, "virtual_gib": virt_gib,
                    "data_bytes": data_bytes, "seconds": d.as_secs_f64(),
                    "data_mb_s": data_bytes as f64 / 1e6 / d.as_secs_f64()})
            );
            let (d, _) = timed_copy(&svc, &caller, &enc, Some(&k2), true).await?;
            println!(
                "{}",
                json!({"bench": "full_reencryption", "run": run, "virtual_gib": virt_gib,
                    "data_bytes": data_bytes, "seconds": d.as_secs_f64(),
                    "data_mb_s": data_bytes as f64 / 1e6 / d.as_secs_f64()})
            );
        }
    }
    Ok(())
}
