//! Image sharing (spec A.5, B.5, C.6): members of an image, the recipient's answer to a share,
//! the access model every image operation goes through, and the repository queries behind it.
//!
//! A member is a project, or a domain (every project of that domain, current and future). A
//! project member carries its own status; a domain member stays `pending` and each project of
//! the domain answers for itself (`image_member_answers`). The effective status of a project
//! for an image is, in order: its own project membership, else its answer to a share with its
//! domain, else `pending` when its domain is a member.

use crate::db::{Db, RowExt};
use crate::error::{CoreError, Result};
use crate::ids::{DomainId, ImageId, ProjectId};
use crate::image::{image_from_row, Image, IMAGE_COLUMNS};
use crate::time::{fmt_seconds, now_ms};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

/// Most members a system- or data-disk image may have (spec C.6).
pub const MAX_MEMBERS: usize = 256;
/// Most members a full-ECS (whole) image may have (spec C.6).
pub const MAX_WHOLE_MEMBERS: usize = 10;

/// A recipient's answer to a share (spec B.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberStatus {
    Pending,
    Accepted,
    Rejected,
}

impl MemberStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Pending => "pending",
            MemberStatus::Accepted => "accepted",
            MemberStatus::Rejected => "rejected",
        }
    }
    /// Parses a status as the APIs spell it (lower case only).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => MemberStatus::Pending,
            "accepted" => MemberStatus::Accepted,
            "rejected" => MemberStatus::Rejected,
            _ => return None,
        })
    }
}

/// What kind of recipient a member row names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberType {
    Project,
    Domain,
}

impl MemberType {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberType::Project => "project",
            MemberType::Domain => "domain",
        }
    }
    fn parse(s: &str) -> Self {
        if s == "domain" {
            MemberType::Domain
        } else {
            MemberType::Project
        }
    }
}

/// How the caller relates to an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The caller's project owns the image.
    Owner,
    /// The image is shared with the caller's project (directly or through its domain) and
    /// the project's answer is this status.
    Member(MemberStatus),
}

/// What an operation needs from the caller's relation to an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Metadata only (show, tags): the owner or any member, whatever its answer.
    Read,
    /// The image's data (download, in-region replication): the owner or an accepted member.
    Use,
    /// Changes to the image or its members: the owner only.
    Manage,
}

/// One member of an image (spec B.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub image_id: String,
    pub member_id: String,
    pub member_type: MemberType,
    pub status: MemberStatus,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Member {
    /// The `Member` body both APIs return.
    pub fn view(&self) -> Value {
        json!({
            "status": self.status.as_str(),
            "created_at": fmt_seconds(self.created_at),
            "updated_at": fmt_seconds(self.updated_at),
            "image_id": self.image_id,
            "member_id": self.member_id,
            "member_type": self.member_type.as_str(),
            "schema": "/v2/schemas/member",
        })
    }
}

/// The recipient side of a caller: its project and that project's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub project: ProjectId,
    pub domain: DomainId,
}

/// Whether adding a member created it or found it already there.
#[derive(Debug, Clone)]
pub enum Added {
    New(Member),
    Existing(Member),
}

fn member_from_row(r: &sqlx::any::AnyRow) -> Member {
    Member {
        image_id: r.s("image_id"),
        member_id: r.s("member_id"),
        member_type: MemberType::parse(&r.s("member_type")),
        status: MemberStatus::parse(&r.s("status")).unwrap_or(MemberStatus::Pending),
        created_at: r.i("created_at"),
        updated_at: r.i("updated_at"),
    }
}

const MEMBER_COLUMNS: &str = "image_id, member_id, member_type, status, created_at, updated_at";

/// The shares that reach project `$1` of domain `$2`: `(image_id, status)`, one row per image.
/// A direct project membership wins over a share with the project's domain.
const SHARES_OF: &str = "SELECT m.image_id AS image_id, m.status AS status FROM image_members m \
     WHERE m.member_id = $1 AND m.member_type = 'project' \
     UNION ALL \
     SELECT d.image_id AS image_id, COALESCE(a.status, 'pending') AS status FROM image_members d \
     LEFT JOIN image_member_answers a ON a.image_id = d.image_id AND a.project_id = $1 \
     WHERE d.member_id = $2 AND d.member_type = 'domain' \
     AND NOT EXISTS (SELECT 1 FROM image_members p WHERE p.image_id = d.image_id AND p.member_id = $1)";

impl Db {
    /// The domain a project belongs to.
    pub async fn project_domain(&self, project: &ProjectId) -> Result<Option<DomainId>> {
        let d: Option<String> = sqlx::query_scalar("SELECT domain_id FROM projects WHERE id = $1")
            .bind(project.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(d.map(DomainId))
    }

    /// True if a domain with this id exists.
    pub async fn domain_exists(&self, id: &str) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM domains WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// The member row through which `r` reaches `image` and `r`'s effective status, if any.
    pub async fn membership(
        &self,
        image: &ImageId,
        r: &Recipient,
    ) -> Result<Option<(Member, MemberStatus)>> {
        let rows = sqlx::query(&format!(
            "SELECT {MEMBER_COLUMNS} FROM image_members WHERE image_id = $1 AND member_id IN ($2, $3)"
        ))
        .bind(image.to_string())
        .bind(r.project.as_str())
        .bind(r.domain.as_str())
        .fetch_all(&self.pool)
        .await?;
        let members: Vec<Member> = rows.iter().map(member_from_row).collect();
        if let Some(m) = members
            .iter()
            .find(|m| m.member_type == MemberType::Project && m.member_id == r.project.as_str())
        {
            return Ok(Some((m.clone(), m.status)));
        }
        let Some(d) = members
            .into_iter()
            .find(|m| m.member_type == MemberType::Domain && m.member_id == r.domain.as_str())
        else {
            return Ok(None);
        };
        let answer: Option<String> = sqlx::query_scalar(
            "SELECT status FROM image_member_answers WHERE image_id = $1 AND project_id = $2",
        )
        .bind(image.to_string())
        .bind(r.project.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let status = answer
            .as_deref()
            .and_then(MemberStatus::parse)
            .unwrap_or(MemberStatus::Pending);
        Ok(Some((d, status)))
    }

    /// Every member of an image, oldest first (ties by member id), for stable paging.
    pub async fn members(&self, image: &ImageId) -> Result<Vec<Member>> {
        let rows = sqlx::query(&format!(
            "SELECT {MEMBER_COLUMNS} FROM image_members WHERE image_id = $1 ORDER BY created_at, member_id"
        ))
        .bind(image.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(member_from_row).collect())
    }

    /// One member row of an image.
    pub async fn member(&self, image: &ImageId, member_id: &str) -> Result<Option<Member>> {
        let row = sqlx::query(&format!(
            "SELECT {MEMBER_COLUMNS} FROM image_members WHERE image_id = $1 AND member_id = $2"
        ))
        .bind(image.to_string())
        .bind(member_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(member_from_row))
    }

    /// Adds a member (status `pending`) unless it is already one; refuses the member that
    /// would exceed `limit` members on the image.
    pub async fn add_member(
        &self,
        image: &ImageId,
        member_id: &str,
        member_type: MemberType,
        limit: usize,
    ) -> Result<Added> {
        let now = now_ms();
        let m = Member {
            image_id: image.to_string(),
            member_id: member_id.to_string(),
            member_type,
            status: MemberStatus::Pending,
            created_at: now,
            updated_at: now,
        };
        // Write first, then check (see `Db::insert_image`): on SQLite a transaction that reads
        // before it writes cannot wait for a concurrent writer, so the insert takes the write
        // lock and the limit check counts the new row too.
        let mut tx = crate::db::begin_write(&self.pool).await?;
        let inserted = sqlx::query(
            "INSERT INTO image_members (image_id, member_id, member_type, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (image_id, member_id) DO NOTHING",
        )
        .bind(&m.image_id)
        .bind(&m.member_id)
        .bind(member_type.as_str())
        .bind(m.status.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            let row = sqlx::query(&format!(
                "SELECT {MEMBER_COLUMNS} FROM image_members WHERE image_id = $1 AND member_id = $2"
            ))
            .bind(image.to_string())
            .bind(member_id)
            .fetch_optional(&mut *tx)
            .await?;
            return match row {
                Some(row) => Ok(Added::Existing(member_from_row(&row))),
                None => Err(CoreError::MemberExists(member_id.to_string())),
            };
        }
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM image_members WHERE image_id = $1")
            .bind(image.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if n as usize > limit {
            // Dropping the transaction rolls the insert back.
            return Err(CoreError::MemberLimit(limit));
        }
        tx.commit().await?;
        Ok(Added::New(m))
    }

    /// Removes a member (and, for a domain, every project's answer); false if it was none.
    pub async fn remove_member(&self, image: &ImageId, member_id: &str) -> Result<bool> {
        let mut tx = crate::db::begin_write(&self.pool).await?;
        sqlx::query("DELETE FROM image_member_answers WHERE image_id = $1 AND domain_id = $2")
            .bind(image.to_string())
            .bind(member_id)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM image_members WHERE image_id = $1 AND member_id = $2")
            .bind(image.to_string())
            .bind(member_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records `r`'s answer through the member row `via`: on the row itself for a project
    /// member, as the project's answer for a domain member.
    pub async fn answer_share(
        &self,
        via: &Member,
        r: &Recipient,
        status: MemberStatus,
    ) -> Result<bool> {
        let now = now_ms();
        let res = match via.member_type {
            MemberType::Project => sqlx::query(
                "UPDATE image_members SET status = $1, updated_at = $2 WHERE image_id = $3 AND member_id = $4",
            )
            .bind(status.as_str())
            .bind(now)
            .bind(&via.image_id)
            .bind(r.project.as_str())
            .execute(&self.pool)
            .await?,
            MemberType::Domain => {
                let mut tx = crate::db::begin_write(&self.pool).await?;
                // Write first (see `add_member`), then check that the domain share still
                // exists: the answer hangs off it.
                sqlx::query("DELETE FROM image_member_answers WHERE image_id = $1 AND project_id = $2")
                    .bind(&via.image_id)
                    .bind(r.project.as_str())
                    .execute(&mut *tx)
                    .await?;
                let still: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM image_members WHERE image_id = $1 AND member_id = $2",
                )
                .bind(&via.image_id)
                .bind(&via.member_id)
                .fetch_one(&mut *tx)
                .await?;
                if still == 0 {
                    return Ok(false);
                }
                let res = sqlx::query(
                    "INSERT INTO image_member_answers (image_id, domain_id, project_id, status, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $5)",
                )
                .bind(&via.image_id)
                .bind(&via.member_id)
                .bind(r.project.as_str())
                .bind(status.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                res
            }
        };
        Ok(res.rows_affected() == 1)
    }

    /// Images shared with `r` whose effective status is `status`, with their tags; never
    /// the recipient's own images.
    pub async fn shared_with(&self, r: &Recipient, status: MemberStatus) -> Result<Vec<Image>> {
        let cols = IMAGE_COLUMNS
            .split(',')
            .map(|c| format!("i.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(&format!(
            "SELECT {cols} FROM images i JOIN ({SHARES_OF}) s ON s.image_id = i.id \
             WHERE s.status = $3 AND i.owner <> $1"
        ))
        .bind(r.project.as_str())
        .bind(r.domain.as_str())
        .bind(status.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut images = rows
            .iter()
            .map(image_from_row)
            .collect::<Result<Vec<_>>>()?;
        if images.is_empty() {
            return Ok(images);
        }
        let tag_rows = sqlx::query(&format!(
            "SELECT t.image_id, t.tag_key, t.tag_value FROM image_tags t \
             JOIN ({SHARES_OF}) s ON s.image_id = t.image_id WHERE s.status = $3 \
             ORDER BY t.created_at, t.tag_key"
        ))
        .bind(r.project.as_str())
        .bind(r.domain.as_str())
        .bind(status.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut by_id: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for t in &tag_rows {
            by_id
                .entry(t.s("image_id"))
                .or_default()
                .push((t.s("tag_key"), t.s("tag_value")));
        }
        for img in &mut images {
            img.access = Access::Member(status);
            if let Some(t) = by_id.remove(&img.id.to_string()) {
                img.tags = t;
            }
        }
        Ok(images)
    }

    /// Ids of `owner`'s images that have at least one member.
    pub async fn shared_out_ids(&self, owner: &ProjectId) -> Result<HashSet<String>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT m.image_id FROM image_members m JOIN images i ON i.id = m.image_id WHERE i.owner = $1",
        )
        .bind(owner.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().collect())
    }

    /// Quota usage of `owner`: (images shared with at least one member that is not pending,
    /// most members on any one image).
    pub async fn sharing_usage(&self, owner: &ProjectId) -> Result<(u64, u64)> {
        let shared: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM images i WHERE i.owner = $1 AND (\
             EXISTS (SELECT 1 FROM image_members m WHERE m.image_id = i.id AND m.status <> 'pending') \
             OR EXISTS (SELECT 1 FROM image_member_answers a WHERE a.image_id = i.id AND a.status <> 'pending'))",
        )
        .bind(owner.as_str())
        .fetch_one(&self.pool)
        .await?;
        let most: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM image_members m JOIN images i ON i.id = m.image_id \
             WHERE i.owner = $1 GROUP BY m.image_id) c",
        )
        .bind(owner.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok((shared as u64, most.unwrap_or(0) as u64))
    }

    /// Number of domain members of an image (an image shared with a domain cannot be deleted).
    pub async fn domain_member_count(&self, image: &ImageId) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM image_members WHERE image_id = $1 AND member_type = 'domain'",
        )
        .bind(image.to_string())
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in [
            MemberStatus::Pending,
            MemberStatus::Accepted,
            MemberStatus::Rejected,
        ] {
            assert_eq!(MemberStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(MemberStatus::parse("Accepted"), None);
        assert_eq!(MemberStatus::parse(""), None);
    }

    #[test]
    fn member_view_has_the_contract_fields() {
        let m = Member {
            image_id: "i".into(),
            member_id: "p".into(),
            member_type: MemberType::Domain,
            status: MemberStatus::Pending,
            created_at: 0,
            updated_at: 1000,
        };
        let v = m.view();
        for k in [
            "status",
            "created_at",
            "updated_at",
            "image_id",
            "member_id",
            "member_type",
            "schema",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["member_type"], "domain");
        assert_eq!(v["updated_at"], "1970-01-01T00:00:01Z");
    }
}
