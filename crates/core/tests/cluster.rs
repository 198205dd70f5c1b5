//! Coordination between nodes sharing one database: cluster leases, the root-key check and
//! one-time bootstrap, on SQLite and (when `OPENIMS_TEST_PG_URL`'s server answers, default
//! postgres://postgres@127.0.0.1:5432) on a fresh PostgreSQL database of its own.

use openims_core::db::Db;
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
