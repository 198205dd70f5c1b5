//! Durable jobs: every asynchronous operation is a row in `jobs`, claimed by a worker with a
//! lease, heartbeated with progress, and finished as SUCCESS or FAIL. A job whose lease expires
//! (its process died) goes back to the queue and resumes from its checkpoint; every step of
//! every job kind is idempotent.

use crate::db::{Db, DbKind, RowExt};
use crate::error::{CoreError, Result};
use crate::ids::{JobId, ProjectId};
use crate::time::{fmt_millis, now_ms};
use serde_json::{json, Value};

/// Job statuses as the API shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Init,
    Running,
    Success,
    Fail,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Init => "INIT",
            JobStatus::Running => "RUNNING",
            JobStatus::Success => "SUCCESS",
            JobStatus::Fail => "FAIL",
        }
    }
    pub fn parse(s: &str) -> JobStatus {
        match s {
            "RUNNING" => JobStatus::Running,
            "SUCCESS" => JobStatus::Success,
            "FAIL" => JobStatus::Fail,
            _ => JobStatus::Init,
        }
    }
}

/// The kinds of job this service runs (their `job_type` names are the contract's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    CopyImageInRegion,
    /// batch_add_members (owner).
    AddImageMembers,
    /// batch_delete_members (owner).
    DelImageMembers,
    /// batch_update_members (recipient).
    UpdateImageMembers,
    /// System-disk (or ISO) image from a bucket object (`create_image` with `image_url`,
    /// quick import of a system disk).
    ImportImage,
    /// Data-disk image from a bucket object.
    ImportDataImage,
    /// `register_image` on an image made by `POST /v2/images`.
    NativeImport,
    /// Export of an image to a bucket object.
    NativeExport,
    CrossRegionCopy,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::CopyImageInRegion => "imsCopyImageInRegionJob",
            JobType::AddImageMembers => "imsAddImageMembersJob",
            JobType::DelImageMembers => "imsDelImageMembersJob",
            JobType::UpdateImageMembers => "imsUpdateImageMembersJob",
            JobType::ImportImage => "imsImportImageJob",
            JobType::ImportDataImage => "imsImportDataImageJob",
            JobType::NativeImport => "imsNativeImportImageJob",
            JobType::NativeExport => "imsNativeExportImageJob",
            JobType::CrossRegionCopy => "imsCrossRegionCopyImageJob",
        }
    }
    pub fn parse(s: &str) -> Option<JobType> {
        Some(match s {
            "imsCopyImageInRegionJob" => JobType::CopyImageInRegion,
            "imsAddImageMembersJob" => JobType::AddImageMembers,
            "imsDelImageMembersJob" => JobType::DelImageMembers,
            "imsUpdateImageMembersJob" => JobType::UpdateImageMembers,
            "imsImportImageJob" => JobType::ImportImage,
            "imsImportDataImageJob" => JobType::ImportDataImage,
            "imsNativeImportImageJob" => JobType::NativeImport,
            "imsNativeExportImageJob" => JobType::NativeExport,
            "imsCrossRegionCopyImageJob" => JobType::CrossRegionCopy,
            _ => return None,
        })
    }
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: JobId,
    pub project_id: ProjectId,
    pub job_type: String,
    pub status: JobStatus,
    pub params: Value,
    pub checkpoint: Option<Value>,
    pub image_id: Option<String>,
    pub image_name: Option<String>,
    pub current_task: Option<String>,
    pub process_percent: f64,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub results: Option<Value>,
    pub error_code: Option<String>,
    pub fail_reason: Option<String>,
    pub attempts: i64,
    pub created_at: i64,
    pub begin_time: Option<i64>,
    pub end_time: Option<i64>,
    pub updated_at: i64,
    /// Jobs ahead of this one in the queue (INIT only).
    pub queue_position: Option<u64>,
}

/// What a running job reports.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub current_task: String,
    pub percent: f64,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub checkpoint: Option<Value>,
}

impl Progress {
    /// A running job's progress as `done` of `total` bytes: `percent` rounded down to 0.1 and
    /// at most 99 (100 is for SUCCESS), 0 while the total is not known (or is zero).
    pub fn of_bytes(
        task: impl Into<String>,
        done: u64,
        total: u64,
        checkpoint: Option<Value>,
    ) -> Progress {
        let percent = if total == 0 {
            0.0
        } else {
            (done as f64 * 100.0 / total as f64).min(99.0)
        };
        Progress {
            current_task: task.into(),
            percent: (percent * 10.0).floor() / 10.0,
            bytes_done: i64::try_from(done).unwrap_or(i64::MAX),
            bytes_total: i64::try_from(total).unwrap_or(i64::MAX),
            checkpoint,
        }
    }
}

impl Job {
    /// `show_job` body (spec A.4), with extension fields for progress.
    pub fn view(&self) -> Value {
        let throughput = match (self.begin_time, self.status) {
            (Some(b), JobStatus::Running) => {
                let secs = ((now_ms() - b).max(1)) as f64 / 1000.0;
                Some(self.bytes_done as f64 / secs)
            }
            _ => None,
        };
        let eta = match throughput {
            Some(t) if t > 0.0 && self.bytes_total > self.bytes_done => {
                Some(((self.bytes_total - self.bytes_done) as f64 / t).ceil() as i64)
            }
            _ => None,
        };
        let mut entities = json!({
            "image_id": self.image_id,
            "image_name": self.image_name,
            "current_task": self.current_task,
            "process_percent": self.process_percent,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "throughput_bytes_per_second": throughput,
            "eta_seconds": eta,
            "queue_position": self.queue_position,
        });
        if let Some(r) = &self.results {
            entities["results"] = r.clone();
        }
        // Cross-region copies: what actually went over the wire.
        if let Some(xr) = self.checkpoint.as_ref().and_then(|c| c.get("xr")) {
            for k in ["bytes_sent", "chunks_sent", "chunks_present"] {
                entities[k] = xr.get(k).cloned().unwrap_or(Value::Null);
            }
        }
        // Imports taken over after a crash: bytes not read again.
        if let Some(b) = self.checkpoint.as_ref().and_then(|c| {
            c.pointer("/ingest/resumed_from_bytes")
                .or_else(|| c.pointer("/set/resumed_from_bytes"))
                .or_else(|| c.pointer("/export/resumed_from_bytes"))
        }) {
            entities["resumed_from_bytes"] = b.clone();
        }
        if self.status == JobStatus::Fail {
            entities["error_code"] = json!(self.error_code);
            entities["error"] = json!(self.fail_reason);
        }
        json!({
            "status": self.status.as_str(),
            "job_id": self.id.as_str(),
            "job_type": self.job_type,
            "begin_time": self.begin_time.map(fmt_millis),
            "end_time": self.end_time.map(fmt_millis),
            "error_code": self.error_code,
            "fail_reason": self.fail_reason,
            "entities": entities,
        })
    }
}

const JOB_COLUMNS: &str = "id, project_id, job_type, status, params, checkpoint, image_id, \
    image_name, current_task, process_percent, bytes_done, bytes_total, results, error_code, \
    fail_reason, attempts, created_at, begin_time, end_time, updated_at";

fn job_from_row(r: &sqlx::any::AnyRow) -> Job {
    let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Job {
        id: JobId(r.s("id")),
        project_id: ProjectId(r.s("project_id")),
        job_type: r.s("job_type"),
        status: JobStatus::parse(&r.s("status")),
        params: parse(r.os("params")).unwrap_or(Value::Null),
        checkpoint: parse(r.os("checkpoint")),
        image_id: r.os("image_id"),
        image_name: r.os("image_name"),
        current_task: r.os("current_task"),
        process_percent: r.f("process_percent"),
        bytes_done: r.i("bytes_done"),
        bytes_total: r.i("bytes_total"),
        results: parse(r.os("results")),
        error_code: r.os("error_code"),
        fail_reason: r.os("fail_reason"),
        attempts: r.i("attempts"),
        created_at: r.i("created_at"),
        begin_time: r.oi("begin_time"),
        end_time: r.oi("end_time"),
        updated_at: r.i("updated_at"),
        queue_position: None,
    }
}

/// A new job, ready to insert.
pub struct NewJob<'a> {
    pub project_id: &'a ProjectId,
    pub job_type: JobType,
    pub params: Value,
    pub image_id: Option<String>,
    pub image_name: Option<String>,
}

/// Inserts a queued job inside the caller's transaction (with the intent of its effects).
pub async fn insert_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: NewJob<'_>,
) -> Result<JobId> {
    insert_job_row(tx, job, false).await
}

/// Inserts a job that already succeeded, inside the transaction that made its effects: for
/// work done within the request itself (an in-region copy that only shares manifests), so the
/// job and its result commit together and no worker has to pick it up.
pub async fn insert_done_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: NewJob<'_>,
) -> Result<JobId> {
    insert_job_row(tx, job, true).await
}

async fn insert_job_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: NewJob<'_>,
    done: bool,
) -> Result<JobId> {
    let id = JobId::generate();
    let now = now_ms();
    let sql = if done {
        "INSERT INTO jobs (id, project_id, job_type, status, params, image_id, image_name, \
         current_task, process_percent, attempts, created_at, begin_time, end_time, updated_at) \
         VALUES ($1, $2, $3, 'SUCCESS', $4, $5, $6, 'done', 100, 1, $7, $7, $7, $7)"
    } else {
        "INSERT INTO jobs (id, project_id, job_type, status, params, image_id, image_name, \
         current_task, created_at, updated_at) VALUES ($1, $2, $3, 'INIT', $4, $5, $6, 'queued', $7, $7)"
    };
    sqlx::query(sql)
        .bind(id.as_str())
        .bind(job.project_id.as_str())
        .bind(job.job_type.as_str())
        .bind(job.params.to_string())
        .bind(job.image_id)
        .bind(job.image_name)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(id)
}

/// Records, inside the transaction that inserts `job`, the source image as it is now
/// (`job_sources`): the job reads from this snapshot when the source is gone by the time it
/// runs, and the GC keeps the snapshot's manifests until the job ends. `false` when the source
/// no longer exists (deleted since the request was checked).
pub async fn pin_job_source(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: &JobId,
    source: &crate::ids::ImageId,
) -> Result<bool> {
    let cols = crate::image::IMAGE_COLUMNS;
    let r = sqlx::query(&format!(
        "INSERT INTO job_sources (job_id, {cols}) SELECT $1, {cols} FROM images WHERE id = $2"
    ))
    .bind(job.as_str())
    .bind(source.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Open (queued or running) jobs of a type in a project, counted inside `tx` after locking
/// the project's row, so that a check-then-insert of a per-project limit is atomic across
/// concurrent requests on any node until `tx` ends.
pub async fn count_open_jobs_locked(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    project: &ProjectId,
    job_type: JobType,
) -> Result<u64> {
    sqlx::query("UPDATE projects SET name = name WHERE id = $1")
        .bind(project.as_str())
        .execute(&mut **tx)
        .await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE project_id = $1 AND job_type = $2 AND status IN ('INIT', 'RUNNING')",
    )
    .bind(project.as_str())
    .bind(job_type.as_str())
    .fetch_one(&mut **tx)
    .await?;
    Ok(n as u64)
}

/// Job counts for monitoring ([`Db::job_stats`]).
#[derive(Debug, Clone, Default)]
pub struct JobStats {
    /// (job type, status, count).
    pub by_type_status: Vec<(String, String, i64)>,
    pub running_on_expired_lease: i64,
    pub oldest_queued_age_secs: f64,
}

impl Db {
    /// A job of `project` (None when absent or another project's).
    pub async fn get_job(&self, project: &ProjectId, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND project_id = $2"
        ))
        .bind(id)
        .bind(project.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut job = job_from_row(&row);
        if job.status == JobStatus::Init {
            let ahead: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs WHERE status = 'INIT' AND created_at < $1",
            )
            .bind(job.created_at)
            .fetch_one(&self.pool)
            .await?;
            job.queue_position = Some(ahead as u64);
        }
        Ok(Some(job))
    }

    /// The source image recorded when `job` was accepted ([`pin_job_source`]).
    pub async fn job_source(&self, job: &JobId) -> Result<Option<crate::image::Image>> {
        let cols = crate::image::IMAGE_COLUMNS;
        let row = sqlx::query(&format!("SELECT {cols} FROM job_sources WHERE job_id = $1"))
            .bind(job.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(crate::image::image_from_row).transpose()
    }

    /// Drops the source snapshots of ended jobs (their manifests are no longer pinned):
    /// those of jobs failed by [`Db::recover_expired_jobs`]; `finish_job` drops its own.
    pub async fn release_job_sources(&self) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM job_sources WHERE EXISTS (SELECT 1 FROM jobs j \
             WHERE j.id = job_sources.job_id AND j.status IN ('SUCCESS', 'FAIL'))",
        )
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Cluster-wide job counts for `/metrics`: jobs by (type, status), jobs running on an
    /// expired lease (their node died; they are taken over shortly), and the age in seconds
    /// of the oldest queued job.
    pub async fn job_stats(&self) -> Result<JobStats> {
        let rows = sqlx::query(
            "SELECT job_type, status, COUNT(*) AS n FROM jobs GROUP BY job_type, status",
        )
        .fetch_all(&self.pool)
        .await?;
        let by_type_status = rows
            .iter()
            .map(|r| (r.s("job_type"), r.s("status"), r.i("n")))
            .collect();
        let now = now_ms();
        let expired: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE status = 'RUNNING' AND lease_until < $1",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<i64> =
            sqlx::query_scalar("SELECT MIN(created_at) FROM jobs WHERE status = 'INIT'")
                .fetch_one(&self.pool)
                .await?;
        Ok(JobStats {
            by_type_status,
            running_on_expired_lease: expired,
            oldest_queued_age_secs: oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
        })
    }

    /// The newest jobs of `project` (newest first, at most `limit`), optionally only those in
    /// `status`; queued jobs carry their queue position. Backs `GET /v1/{project_id}/jobs`.
    pub async fn list_jobs(
        &self,
        project: &ProjectId,
        status: Option<JobStatus>,
        limit: u32,
    ) -> Result<Vec<Job>> {
        let rows = match status {
            Some(st) => {
                sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE project_id = $1 AND status = $2 \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                ))
                .bind(project.as_str())
                .bind(st.as_str())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE project_id = $1 \
                     ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(project.as_str())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
        };
        let mut jobs: Vec<Job> = rows.iter().map(job_from_row).collect();
        for job in jobs.iter_mut().filter(|j| j.status == JobStatus::Init) {
            let ahead: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs WHERE status = 'INIT' AND created_at < $1",
            )
            .bind(job.created_at)
            .fetch_one(&self.pool)
            .await?;
            job.queue_position = Some(ahead as u64);
        }
        Ok(jobs)
    }

    /// Running or queued jobs of a type in a project (per-project concurrency limits).
    pub async fn count_open_jobs(&self, project: &ProjectId, job_type: JobType) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE project_id = $1 AND job_type = $2 AND status IN ('INIT', 'RUNNING')",
        )
        .bind(project.as_str())
        .bind(job_type.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    /// Claims the oldest queued job for `node` with a lease of `lease_ms`.
    pub async fn claim_job(&self, node: &str, lease_ms: i64) -> Result<Option<Job>> {
        let now = now_ms();
        let pick = match self.kind {
            DbKind::Postgres => {
                "SELECT id FROM jobs WHERE status = 'INIT' ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED"
            }
            DbKind::Sqlite => "SELECT id FROM jobs WHERE status = 'INIT' ORDER BY created_at LIMIT 1",
        };
        let row = sqlx::query(&format!(
            "UPDATE jobs SET status = 'RUNNING', lease_owner = $1, lease_until = $2, \
             attempts = attempts + 1, begin_time = COALESCE(begin_time, $3), updated_at = $3 \
             WHERE id = ({pick}) AND status = 'INIT' RETURNING {JOB_COLUMNS}"
        ))
        .bind(node)
        .bind(now + lease_ms)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(job_from_row))
    }

    /// Records progress and extends the lease; false if the lease was lost.
    pub async fn heartbeat(
        &self,
        job: &JobId,
        node: &str,
        lease_ms: i64,
        p: &Progress,
    ) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE jobs SET current_task = $1, process_percent = $2, bytes_done = $3, bytes_total = $4, \
             checkpoint = COALESCE($5, checkpoint), lease_until = $6, updated_at = $7 \
             WHERE id = $8 AND lease_owner = $9 AND status = 'RUNNING'",
        )
        .bind(&p.current_task)
        .bind(p.percent)
        .bind(p.bytes_done)
        .bind(p.bytes_total)
        .bind(p.checkpoint.as_ref().map(|c| c.to_string()))
        .bind(now + lease_ms)
        .bind(now)
        .bind(job.as_str())
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a running job's per-member `results` (kept whether the job then succeeds or
    /// fails); false if the lease was lost.
    pub async fn record_results(&self, job: &JobId, node: &str, results: &Value) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET results = $1, updated_at = $2 WHERE id = $3 AND lease_owner = $4 AND status = 'RUNNING'",
        )
        .bind(results.to_string())
        .bind(now_ms())
        .bind(job.as_str())
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Ends a job. `Err((code, reason))` marks it FAIL.
    pub async fn finish_job(
        &self,
        job: &JobId,
        node: &str,
        outcome: std::result::Result<Option<Value>, (String, String)>,
    ) -> Result<bool> {
        let now = now_ms();
        // The end and the release of the source snapshot commit together.
        let mut tx = crate::db::begin_write(&self.pool).await?;
        let r = match outcome {
            Ok(results) => sqlx::query(
                "UPDATE jobs SET status = 'SUCCESS', process_percent = 100, current_task = 'done', \
                 results = COALESCE($1, results), end_time = $2, updated_at = $2, lease_owner = NULL, lease_until = NULL \
                 WHERE id = $3 AND lease_owner = $4 AND status = 'RUNNING'",
            )
            .bind(results.map(|r| r.to_string()))
            .bind(now)
            .bind(job.as_str())
            .bind(node)
            .execute(&mut *tx)
            .await?,
            Err((code, reason)) => sqlx::query(
                "UPDATE jobs SET status = 'FAIL', current_task = 'failed', error_code = $1, fail_reason = $2, \
                 end_time = $3, updated_at = $3, lease_owner = NULL, lease_until = NULL \
                 WHERE id = $4 AND lease_owner = $5 AND status = 'RUNNING'",
            )
            .bind(code)
            .bind(reason)
            .bind(now)
            .bind(job.as_str())
            .bind(node)
            .execute(&mut *tx)
            .await?,
        };
        if r.rows_affected() == 1 {
            // Its result (if any) references the data now; the source snapshot may go.
            sqlx::query("DELETE FROM job_sources WHERE job_id = $1")
                .bind(job.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Jobs whose lease expired (their worker died) go back to the queue, or fail after
    /// `max_attempts`. Returns how many were requeued.
    pub async fn recover_expired_jobs(&self, max_attempts: i64) -> Result<u64> {
        let now = now_ms();
        let mut tx = crate::db::begin_write(&self.pool).await?;
        // The images an import job that fails here still holds (`saving`, with its upload
        // token) become `killed`, as when the job fails by itself: never left `saving`.
        sqlx::query(
            "UPDATE images SET status = 'killed', upload_token = NULL, updated_at = $1 \
             WHERE status = 'saving' AND upload_token IN (SELECT $3 || id FROM jobs \
             WHERE status = 'RUNNING' AND lease_until < $1 AND attempts >= $2)",
        )
        .bind(now)
        .bind(max_attempts)
        .bind(crate::import::UPLOAD_TOKEN_PREFIX)
        .execute(&mut *tx)
        .await?;
        let failed = sqlx::query(
            "UPDATE jobs SET status = 'FAIL', error_code = 'IMG.0000', \
             fail_reason = 'The job was interrupted too many times.', end_time = $1, updated_at = $1, \
             lease_owner = NULL, lease_until = NULL \
             WHERE status = 'RUNNING' AND lease_until < $1 AND attempts >= $2",
        )
        .bind(now)
        .bind(max_attempts)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let r = sqlx::query(
            "UPDATE jobs SET status = 'INIT', lease_owner = NULL, lease_until = NULL, current_task = 'resuming', \
             updated_at = $1 WHERE status = 'RUNNING' AND lease_until < $1",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        if failed.rows_affected() > 0 {
            self.release_job_sources().await?;
        }
        Ok(r.rows_affected())
    }

    /// Jobs this node was running when it stopped: give up their leases at once on restart.
    pub async fn release_jobs_of(&self, node: &str) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE jobs SET lease_until = 0 WHERE status = 'RUNNING' AND lease_owner = $1",
        )
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }
}

/// Maps a domain error to the `(error_code, fail_reason)` a FAIL job shows.
pub fn failure_of(e: &CoreError) -> (String, String) {
    let code = match e {
        CoreError::ImageNotFound(_) => "IMG.0027",
        CoreError::ImageNotActive(_) => "IMG.0046",
        CoreError::ImageQuotaExceeded(_) => "IMG.0015",
        CoreError::UnsafeImage(_)
        | CoreError::InvalidImageFile(_)
        | CoreError::FormatMismatch { .. }
        | CoreError::Format(_)
        | CoreError::NoSuchKey(_)
        | CoreError::ObjectChanged(_) => "IMG.0057",
        CoreError::InvalidDiskOrMemory(_) => "IMG.0055",
        CoreError::IsoNeedsOsVersion => "IMG.0166",
        CoreError::NoSuchBucket(_) | CoreError::AccessDenied(_) => "IMG.0069",
        CoreError::ObjectExists(_) => "IMG.0070",
        CoreError::ImageTooLarge(_) => "IMG.0059",
        CoreError::KmsKeyNotFound(_) => "IMG.0095",
        CoreError::KmsKeyNotEnabled(_) => "IMG.0097",
        CoreError::KmsNoPermission(_) => "IMG.0099",
        CoreError::SourceKeyNotFound(_) => "IMG.0101",
        CoreError::SourceKeyNotEnabled(_) => "IMG.0102",
        CoreError::SourceKeyNoPermission(_) => "IMG.0103",
        CoreError::MemberJobFailed { code, .. } => code,
        CoreError::ShareNotAccepted => "IMG.0196",
        CoreError::EncryptedSharedCopy => "IMG.0197",
        CoreError::ProjectNameIncorrect(_) => "IMG.0145",
        CoreError::UnknownRegion(_) => "IMG.9031",
        CoreError::PeerUnavailable(_) | CoreError::ChunksMissing(_) => "IMG.9032",
        _ => "IMG.1075",
    };
    (code.to_string(), e.to_string())
}
