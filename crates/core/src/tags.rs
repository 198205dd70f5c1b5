//! Image tags: one (key, value) set per image, shared by the IMS tag APIs (key/value pairs,
//! legacy `key.value` strings) and Glance tags (a key with an empty value).

use crate::db::{Db, RowExt};
use crate::error::{CoreError, Result};
use crate::ids::ImageId;
use crate::time::now_ms;

/// A change to an image's tag set.
#[derive(Debug, Clone)]
pub enum TagChange {
    /// Add or replace the value of `key`.
    Upsert(String, String),
    /// Remove `key` (no error when absent).
    Remove(String),
}

impl Db {
    pub async fn image_tags(&self, id: &ImageId) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT tag_key, tag_value FROM image_tags WHERE image_id = $1 ORDER BY created_at, tag_key",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.s("tag_key"), r.s("tag_value")))
            .collect())
    }

    /// Applies `changes` atomically; refuses the whole set if the result has more than `quota`
    /// tags. Returns the resulting tags.
    pub async fn change_tags(
        &self,
        id: &ImageId,
        changes: &[TagChange],
        quota: usize,
    ) -> Result<Vec<(String, String)>> {
        let now = now_ms();
        let mut tx = crate::db::begin_write(&self.pool).await?;
        // Write first (see `insert_image`): take the write lock before reading.
        sqlx::query("UPDATE images SET updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query("SELECT tag_key, tag_value FROM image_tags WHERE image_id = $1")
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await?;
        let mut current: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r.s("tag_key"), r.s("tag_value")))
            .collect();
        for c in changes {
            match c {
                TagChange::Upsert(k, v) => {
                    if let Some(e) = current.iter_mut().find(|(ck, _)| ck == k) {
                        e.1 = v.clone();
                    } else {
                        current.push((k.clone(), v.clone()));
                    }
                }
                TagChange::Remove(k) => current.retain(|(ck, _)| ck != k),
            }
        }
        if current.len() > quota {
            return Err(CoreError::TagQuotaExceeded(quota));
        }
        for c in changes {
            match c {
                TagChange::Upsert(k, v) => {
                    sqlx::query(
                        "INSERT INTO image_tags (image_id, tag_key, tag_value, created_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (image_id, tag_key) DO UPDATE SET tag_value = excluded.tag_value",
                    )
                    .bind(id.to_string())
                    .bind(k)
                    .bind(v)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                TagChange::Remove(k) => {
                    sqlx::query("DELETE FROM image_tags WHERE image_id = $1 AND tag_key = $2")
                        .bind(id.to_string())
                        .bind(k)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(current)
    }
}
