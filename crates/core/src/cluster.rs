//! Coordination between nodes sharing one metadata database: named leases that at most one
//! holder owns at a time (garbage collection runs on one node at a time).

use crate::db::Db;
use crate::time::now_ms;
use crate::Result;

/// The lease garbage collection runs under.
pub const GC_LEASE: &str = "gc";

impl Db {
    /// Takes the named lease for `holder` for `lease_ms` if it is free, expired, or already
    /// held by `holder`; `false` if another holder has it. Atomic on both databases (one
    /// upsert whose update only applies to an expired or own lease).
    pub async fn try_lease(&self, name: &str, holder: &str, lease_ms: i64) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "INSERT INTO cluster_leases (name, holder, until_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
             WHERE cluster_leases.until_ms < $4 OR cluster_leases.holder = excluded.holder",
        )
        .bind(name)
        .bind(holder)
        .bind(now + lease_ms)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the named lease up if `holder` has it.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM cluster_leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl Db {
    /// Checks that this node's KMS root key is the one every other node sharing the database
    /// uses (the first node records a keyed check value; the key itself is never stored).
    pub async fn check_root_key(&self, root: &openims_store::crypto::Dek) -> Result<()> {
        let check = blake3::keyed_hash(root.as_bytes(), b"openims root key check v1").to_hex();
        sqlx::query(
            "INSERT INTO cluster_settings (name, value) VALUES ('root_key_check', $1) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(check.as_str())
        .execute(&self.pool)
        .await?;
        let stored: String =
            sqlx::query_scalar("SELECT value FROM cluster_settings WHERE name = 'root_key_check'")
                .fetch_one(&self.pool)
                .await?;
        if stored != check.as_str() {
            return Err(crate::CoreError::Internal(
                "this node's KMS root key differs from the one recorded in the database by the \
                 other nodes: give every node the same root key file (--root-key-file)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The lease the first start's identities are created under.
pub const BOOTSTRAP_LEASE: &str = "bootstrap";

impl Db {
    /// [`Db::bootstrap`] for several nodes starting at once on an empty database: one node
    /// (the holder of the `bootstrap` lease) creates the first identities; the others wait
    /// until they exist and get `None`.
    pub async fn bootstrap_once(&self, node: &str) -> Result<Option<crate::identity::Bootstrap>> {
        for _ in 0..600 {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM domains")
                .fetch_one(&self.pool)
                .await?;
            if n > 0 {
                return Ok(None);
            }
            if self.try_lease(BOOTSTRAP_LEASE, node, 120_000).await? {
                let r = self.bootstrap().await;
                self.release_lease(BOOTSTRAP_LEASE, node).await?;
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Err(crate::CoreError::Internal(
            "another node has been creating the first identities for 2 minutes".into(),
        ))
    }
}

/// Prefix of the liveness lease each serving node renews (`node:<node id>`).
pub const NODE_LEASE_PREFIX: &str = "node:";

impl Db {
    /// Renews `node`'s liveness lease for `lease_ms`, and puts back to `queued` the uploads
    /// that nodes whose liveness lease expired (they died) left in `saving` (their clients'
    /// connections broke; the image can be uploaded again through any node). Returns the
    /// number of uploads requeued.
    pub async fn node_heartbeat(&self, node: &str, lease_ms: i64) -> Result<u64> {
        self.try_lease(&format!("{NODE_LEASE_PREFIX}{node}"), node, lease_ms)
            .await?;
        let now = now_ms();
        let dead: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM cluster_leases WHERE name LIKE 'node:%' AND until_ms < $1",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut requeued = 0;
        for name in dead {
            let Some(id) = name.strip_prefix(NODE_LEASE_PREFIX) else {
                continue;
            };
            requeued += self.reset_interrupted_uploads(&format!("{id}:")).await?;
            sqlx::query("DELETE FROM cluster_leases WHERE name = $1 AND until_ms < $2")
                .bind(&name)
                .bind(now)
                .execute(&self.pool)
                .await?;
        }
        Ok(requeued)
    }
}
