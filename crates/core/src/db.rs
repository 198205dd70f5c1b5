//! The metadata database: one pool over SQLite or PostgreSQL, one schema, one migration set.
//!
//! Queries use `$N` placeholders in increasing order of first use, which both drivers bind the
//! same way, and only portable SQL (`ON CONFLICT`, `RETURNING`); the one place the dialects
//! differ (claiming a job with `FOR UPDATE SKIP LOCKED`) asks [`Db::kind`].

use crate::Result;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::AnyPool;
use std::time::Duration;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// The metadata repository's connection pool.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub kind: DbKind,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Db {
    /// Connects and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("postgres") {
            DbKind::Postgres
        } else {
            DbKind::Sqlite
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if kind == DbKind::Sqlite { 8 } else { 16 })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == DbKind::Sqlite {
                        use sqlx::Executor;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Db { pool, kind })
    }
}

/// Begins a transaction that will write. On SQLite it is `BEGIN IMMEDIATE`: the write lock is
/// taken up front (waiting up to `busy_timeout` for another writer), because a deferred
/// transaction that reads first cannot later upgrade its lock while another connection writes
/// and fails with `SQLITE_BUSY` instead of waiting. On PostgreSQL it is a plain `BEGIN`.
pub async fn begin_write(
    pool: &AnyPool,
) -> std::result::Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
    if pool
        .connect_options()
        .database_url
        .scheme()
        .starts_with("sqlite")
    {
        pool.begin_with("BEGIN IMMEDIATE").await
    } else {
        pool.begin().await
    }
}

/// Small helpers to read portable columns.
pub trait RowExt {
    fn s(&self, col: &str) -> String;
    fn os(&self, col: &str) -> Option<String>;
    fn i(&self, col: &str) -> i64;
    fn oi(&self, col: &str) -> Option<i64>;
    fn f(&self, col: &str) -> f64;
}

impl RowExt for AnyRow {
    fn s(&self, col: &str) -> String {
        use sqlx::Row;
        self.try_get::<String, _>(col).unwrap_or_default()
    }
    fn os(&self, col: &str) -> Option<String> {
        use sqlx::Row;
        self.try_get::<Option<String>, _>(col).ok().flatten()
    }
    fn i(&self, col: &str) -> i64 {
        use sqlx::Row;
        self.try_get::<i64, _>(col).unwrap_or_default()
    }
    fn oi(&self, col: &str) -> Option<i64> {
        use sqlx::Row;
        self.try_get::<Option<i64>, _>(col).ok().flatten()
    }
    fn f(&self, col: &str) -> f64 {
        use sqlx::Row;
        self.try_get::<f64, _>(col).unwrap_or_default()
    }
}
