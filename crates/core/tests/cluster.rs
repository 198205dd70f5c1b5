//! Coordination between nodes sharing one database: cluster leases, the root-key check and
//! one-time bootstrap, on SQLite and (when `OPENIMS_TEST_PG_URL`'s server answers, default
//! postgres://postgres@127.0.0.1:5432) on a fresh PostgreSQL database of its own.

use openims_core::db::Db;
use openims_core::ids::{ImageId, ProjectId};
use openims_core::image::{Image, ImageStatus, Origin};
use openims_store::Dek;

async fn check(db: &Db) {
    // Leases: one holder at a time; re-entrant for the holder; free after release/expiry.
    assert!(db.try_lease("l", "a", 60_000).await.unwrap());
    assert!(db.try_lease("l", "a", 60_000).await.unwrap());
    assert!(!db.try_lease("l", "b", 60_000).await.unwrap());
    db.release_lease("l", "b").await.unwrap(); // not b's: no effect
    assert!(!db.try_lease("l", "b", 60_000).await.unwrap());
    db.release_lease("l", "a").await.unwrap();
    assert!(db.try_lease("l", "b", 1).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(
        db.try_lease("l", "c", 60_000).await.unwrap(),
        "expired lease is taken over"
    );
    // Concurrent takers: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            db.try_lease("race", &format!("n{i}"), 60_000)
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap() as u32;
    }
    assert_eq!(winners, 1);

    // Root key: the first recorded wins; another key is refused with a clear message.
    let k1 = Dek::generate();
    db.check_root_key(&k1).await.unwrap();
    db.check_root_key(&k1).await.unwrap();
    let e = db.check_root_key(&Dek::generate()).await.unwrap_err();
    assert!(e.to_string().contains("root key"), "{e}");

    // Bootstrap: several nodes at once, exactly one creates the first identities.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            db.bootstrap_once(&format!("node-{i}"))
                .await
                .unwrap()
                .is_some()
        }));
    }
    let mut made = 0;
    for t in tasks {
        made += t.await.unwrap() as u32;
    }
    assert_eq!(made, 1);
    assert_eq!(db.list_domains().await.unwrap().len(), 1);

    dead_node_reset(db).await;
}

/// An image in `saving` with `token` (and, for an import, an open job owning it).
async fn saving_image(db: &Db, token: &str, job: Option<&str>) -> ImageId {
    let owner = ProjectId::generate();
    let img = Image::new(owner.clone(), Some("x".into()), Origin::File);
    db.insert_image(&img, 100).await.unwrap();
    assert!(db
        .transition(
            &img.id,
            ImageStatus::Queued,
            ImageStatus::Saving,
            Some(token)
        )
        .await
        .unwrap());
    if let Some(job) = job {
        sqlx::query(
            "INSERT INTO jobs (id, project_id, job_type, status, params, image_id, attempts, \
             lease_owner, lease_until, created_at, updated_at) \
             VALUES ($1, $2, 'imsImportImageJob', 'RUNNING', '{}', $3, 1, 'import', 0, 0, 0)",
        )
        .bind(job)
        .bind(owner.as_str())
        .bind(img.id.to_string())
        .execute(&db.pool)
        .await
        .unwrap();
    }
    img.id
}

async fn status(db: &Db, id: &ImageId) -> ImageStatus {
    db.get_image(id).await.unwrap().unwrap().status
}

/// A live node puts back to `queued` the uploads a dead node left `saving`, and only those:
/// not an image an import job owns (`import:<job id>`) while that job is open, even when the
/// dead node's id is a prefix of that token, and not another node's upload whose id the dead
/// one's matches only as a `LIKE` pattern (`_` is a wildcard there).
async fn dead_node_reset(db: &Db) {
    let job = format!("job{}", hex::encode(rand::random::<[u8; 6]>()));
    let import = saving_image(db, &format!("import:{job}"), Some(&job)).await;
    let upload_of_dead = saving_image(db, "n_1:abc", None).await;
    let upload_of_dead_too = saving_image(db, "import:def", None).await;
    let upload_of_live = saving_image(db, "nx1:abc", None).await;
    // Nodes `n_1` and `import` die (their liveness leases expire); `nx1` is alive.
    db.node_heartbeat("nx1", 60_000).await.unwrap();
    assert!(db.try_lease("node:n_1", "n_1", 1).await.unwrap());
    assert!(db.try_lease("node:import", "import", 1).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(db.node_heartbeat("nx1", 60_000).await.unwrap(), 2);
    assert_eq!(status(db, &upload_of_dead).await, ImageStatus::Queued);
    assert_eq!(status(db, &upload_of_dead_too).await, ImageStatus::Queued);
    assert_eq!(status(db, &upload_of_live).await, ImageStatus::Saving);
    assert_eq!(status(db, &import).await, ImageStatus::Saving);
    // Once the import job is over, its image is no longer protected (a failed import
    // leaves it `killed` itself; here nothing did).
    sqlx::query("UPDATE jobs SET status = 'FAIL' WHERE id = $1")
        .bind(&job)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(db.reset_interrupted_uploads("import:").await.unwrap(), 1);
    assert_eq!(status(db, &import).await, ImageStatus::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_coordination_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
    check(&Db::connect(&url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_coordination_postgres() {
    let base = std::env::var("OPENIMS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let base = base.trim_end_matches('/').to_string();
    sqlx::any::install_default_drivers();
    let admin = match sqlx::AnyPool::connect(&format!("{base}/postgres")).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("PostgreSQL not reachable at {base} ({e}); skipped");
            return;
        }
    };
    let name = format!("openims_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&admin)
        .await
        .unwrap();
    let db = Db::connect(&format!("{base}/{name}")).await.unwrap();
    check(&db).await;
    db.pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}
