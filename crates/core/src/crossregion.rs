//! Cross-region replication (spec C.2): `POST /v1/cloudimages/{id}/cross_region_copy`.
//!
//! Regions are separate deployments. A deployment knows its peers from its configuration
//! ([`crate::config::PeerConfig`]: endpoint and the AK/SK of a *peer service account* at the
//! peer, made there with `openims admin peer-account create`). The caller names an agency of
//! its own domain that delegates to the image service (`openims admin agency create`), and a
//! project of its account in the target region.
//!
//! ## Peer protocol (internal API on the target, signed with the service account's AK/SK)
//! - `POST /peer/v1/preflight` `{domain_name, project_name, cmk_id}`: resolves the project in
//!   the target (IMG.0145 / IMG.0104), checks the target key (IMG.0095/0097/0099) and quota.
//!   Run synchronously when the copy is requested, so these errors reach the caller.
//! - `POST /peer/v1/chunks/missing` `{encrypted, ids}`: which chunk ids the target lacks.
//! - `PUT /peer/v1/chunks/{plain|enc}/{id}`: one chunk; the target checks it against its id
//!   (BLAKE3 of the plaintext; for encrypted objects the nonce/id binding and ciphertext
//!   checksum) before storing it.
//! - `POST /peer/v1/commit`: the manifests (whose every chunk must now be stored, else `409`
//!   with the missing ids), the image's metadata, and for encrypted data the data key sealed
//!   under a transport key derived from the service account's secret and the transfer id; the
//!   target re-wraps it under its own KMS key (or its root key) and creates the image `active`
//!   in one transaction. Idempotent: the image id is chosen by the source job.
//!
//! Only chunks the target lacks travel, so an interrupted copy resumes without resending
//! anything the target has, and a second copy of a slightly changed image sends only the
//! changed chunks. Encrypted chunks travel as stored (ciphertext); a data key never travels in
//! plaintext.

use crate::config::PeerConfig;
use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::ids::{ImageId, JobId, ProjectId};
use crate::image::{validate_description, validate_ims_name, Image, ImageStatus, Origin};
use crate::jobs::{insert_job, Job, JobType, NewJob, Progress};
use crate::kms::{ImageKey, KeyRole};
use crate::Service;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::future::BoxFuture;
use openims_store::{ChunkId, Dek, Manifest};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The service name an agency must delegate to for cross-region replication.
pub const IMS_SERVICE: &str = "op_svc_ims";
/// The role of a peer service account in its project.
pub const PEER_ROLE: &str = "peer";
/// Chunks asked about (and held in memory when encrypting) per batch.
const BATCH: usize = 16;
/// How long a job keeps retrying a peer that cannot be reached before it fails.
const PEER_RETRY_FOR: Duration = Duration::from_secs(60);
/// Least time between two progress-only heartbeats.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// One answer from a peer.
#[derive(Debug, Clone)]
pub struct PeerReply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl PeerReply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// How this deployment talks to its peers (HTTP and request signing live in the api crate).
pub trait PeerLink: Send + Sync {
    /// Sends one signed request; `body` is JSON unless `binary`.
    fn call<'a>(
        &'a self,
        peer: &'a PeerConfig,
        method: &'a str,
        path: &'a str,
        body: Vec<u8>,
        binary: bool,
    ) -> BoxFuture<'a, Result<PeerReply>>;
}

/// A token bucket limiting the bytes sent per second (burst: one second's worth).
pub struct TokenBucket {
    rate: u64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket of `rate` bytes per second (0 = unlimited).
    pub fn new(rate: u64) -> Self {
        TokenBucket {
            rate,
            state: tokio::sync::Mutex::new((rate as f64, Instant::now())),
        }
    }

    /// Waits until `n` bytes may be sent.
    pub async fn take(&self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let rate = self.rate as f64;
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * rate).min(rate);
        st.1 = now;
        st.0 -= n as f64;
        if st.0 < 0.0 {
            // Holding the lock while waiting queues the other senders behind this one.
            tokio::time::sleep(Duration::from_secs_f64(-st.0 / rate)).await;
            st.0 = 0.0;
            st.1 = Instant::now();
        }
    }
}

/// Cross-region state of a running service: the peer transport and per-peer bandwidth.
#[derive(Default)]
pub struct XrState {
    link: OnceLock<Arc<dyn PeerLink>>,
    buckets: Mutex<HashMap<String, Arc<TokenBucket>>>,
}

impl XrState {
    /// Installs the transport (once, at start-up).
    pub fn set_link(&self, link: Arc<dyn PeerLink>) {
        let _ = self.link.set(link);
    }

    fn link(&self) -> Result<Arc<dyn PeerLink>> {
        self.link
            .get()
            .cloned()
            .ok_or_else(|| CoreError::PeerUnavailable("no peer transport configured".into()))
    }

    fn bucket(&self, region: &str, rate: u64) -> Arc<TokenBucket> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        b.entry(region.to_string())
            .or_insert_with(|| Arc::new(TokenBucket::new(rate)))
            .clone()
    }
}

/// Request of a cross-region copy (spec A.2, plus the extension `cmk_id`).
#[derive(Debug, Clone, Default)]
pub struct CrossRegionRequest {
    pub name: String,
    pub description: Option<String>,
    pub region: String,
    pub project_name: String,
    pub agency_name: String,
    pub vault_id: Option<String>,
    /// Extension: a key of the target region; required for encrypted images.
    pub cmk_id: Option<String>,
}

/// An agency: a domain lets a cloud service act for it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Agency {
    pub id: String,
    pub domain_id: String,
    pub name: String,
    pub delegated_service: String,
    pub description: String,
    pub created_at: i64,
}

impl crate::db::Db {
    /// Creates an agency in a domain.
    pub async fn create_agency(
        &self,
        domain_id: &str,
        name: &str,
        delegated_service: &str,
        description: &str,
    ) -> Result<Agency> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(CoreError::InvalidRequest(format!(
                "agency name {name:?} must be 1-64 letters, digits, '_', '-' or '.'"
            )));
        }
        let a = Agency {
            id: uuid::Uuid::new_v4().simple().to_string(),
            domain_id: domain_id.into(),
            name: name.into(),
            delegated_service: delegated_service.into(),
            description: description.into(),
            created_at: crate::time::now_ms(),
        };
        sqlx::query(
            "INSERT INTO agencies (id, domain_id, name, delegated_service, description, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&a.id)
        .bind(&a.domain_id)
        .bind(&a.name)
        .bind(&a.delegated_service)
        .bind(&a.description)
        .bind(a.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.message().to_lowercase().contains("unique") => {
                CoreError::InvalidRequest(format!("agency {name:?} already exists"))
            }
            _ => CoreError::Db(e),
        })?;
        Ok(a)
    }

    /// Agencies of a domain (all domains if `None`).
    pub async fn list_agencies(&self, domain_id: Option<&str>) -> Result<Vec<Agency>> {
        use crate::db::RowExt;
        let rows = sqlx::query(
            "SELECT id, domain_id, name, delegated_service, description, created_at FROM agencies \
             ORDER BY domain_id, name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Agency {
                id: r.s("id"),
                domain_id: r.s("domain_id"),
                name: r.s("name"),
                delegated_service: r.s("delegated_service"),
                description: r.s("description"),
                created_at: r.i("created_at"),
            })
            .filter(|a| domain_id.is_none_or(|d| d == a.domain_id))
            .collect())
    }

    /// Deletes an agency; false if absent.
    pub async fn delete_agency(&self, domain_id: &str, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM agencies WHERE domain_id = $1 AND name = $2")
            .bind(domain_id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// The role of a user in a project, if any.
    pub async fn role_of(&self, user_id: &str, project_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT role FROM role_assignments WHERE user_id = $1 AND project_id = $2",
        )
        .bind(user_id)
        .bind(project_id)
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// The key that protects a data key in transit to a peer: derived from the peer service
/// account's secret (known to both ends, never sent) and the transfer id.
fn transport_key(secret_key: &str, transfer_id: &str) -> Dek {
    let mut material = Vec::with_capacity(secret_key.len() + transfer_id.len() + 1);
    material.extend_from_slice(secret_key.as_bytes());
    material.push(0);
    material.extend_from_slice(transfer_id.as_bytes());
    Dek::from_bytes(blake3::derive_key(
        "openims 2026-11 peer data-key transport v1",
        &material,
    ))
}

/// Seals a data key for a peer.
pub fn seal_dek_for_peer(
    secret_key: &str,
    transfer_id: &str,
    image_id: &str,
    dek: &Dek,
) -> Result<String> {
    let sealed = openims_store::crypto::seal(
        &transport_key(secret_key, transfer_id),
        image_id.as_bytes(),
        dek.as_bytes(),
    )?;
    Ok(B64.encode(sealed))
}

/// Opens a data key sealed by [`seal_dek_for_peer`].
pub fn open_dek_from_peer(
    secret_key: &str,
    transfer_id: &str,
    image_id: &str,
    sealed: &str,
) -> Result<Dek> {
    let bytes = B64
        .decode(sealed)
        .map_err(|_| CoreError::InvalidRequest("sealed data key is not base64".into()))?;
    let plain = openims_store::crypto::open(
        &transport_key(secret_key, transfer_id),
        image_id.as_bytes(),
        &bytes,
    )
    .map_err(|_| CoreError::InvalidRequest("the sealed data key does not open".into()))?;
    Ok(Dek::from_slice(&plain)?)
}

/// Maps an error a peer answered with back to the domain error it stands for.
fn peer_error(reply: &PeerReply) -> CoreError {
    let v = reply.json();
    let code = v["error"]["code"].as_str().unwrap_or("");
    let msg = v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {}", reply.status));
    match code {
        "IMG.0145" => CoreError::ProjectNameIncorrect(msg),
        "IMG.0104" => CoreError::ProjectNameRequired,
        "IMG.0095" => CoreError::KmsKeyNotFound(msg),
        "IMG.0097" => CoreError::KmsKeyNotEnabled(msg),
        "IMG.0099" => CoreError::KmsNoPermission(msg),
        "IMG.0015" => CoreError::ImageQuotaExceeded(0),
        "IMG.0189" => CoreError::VaultNotSupported(msg),
        _ => CoreError::PeerUnavailable(format!("{code} {msg}").trim().to_string()),
    }
}

fn hex_ids(ids: &[ChunkId]) -> Vec<String> {
    ids.iter().map(|c| c.to_hex()).collect()
}

fn parse_ids(v: &Value) -> Result<Vec<ChunkId>> {
    v.as_array()
        .ok_or_else(|| CoreError::InvalidRequest("ids must be a list".into()))?
        .iter()
        .map(|s| {
            s.as_str()
                .and_then(|s| ChunkId::from_hex(s).ok())
                .ok_or_else(|| CoreError::InvalidRequest("bad chunk id".into()))
        })
        .collect()
}

/// What a peer commit did.
#[derive(Debug, Clone)]
pub enum CommitOutcome {
    /// The image exists (made now or by an earlier attempt of the same transfer).
    Done(String),
    /// These chunks must be sent first: `(encrypted, id)`.
    Missing(Vec<(bool, String)>),
}

/// Running totals of a cross-region job (kept in its checkpoint).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct XrCheckpoint {
    bytes_sent: u64,
    chunks_sent: u64,
    chunks_present: u64,
    attempts: u64,
    /// Manifests (disk, file) whose chunks were all offered to the target.
    #[serde(default)]
    stage: usize,
    /// Within manifest `stage`: stored chunks already offered (a multiple of the batch size).
    #[serde(default)]
    next_chunk: usize,
}

/// How a source manifest's chunks are sent, with the data key the copy is made under.
#[derive(Clone)]
enum SendMode {
    /// Plaintext chunks, sent as they are.
    Plain,
    /// Encrypted chunks, sent as stored (ciphertext) under the source's data key.
    Encrypted(Dek),
    /// Plaintext chunks encrypted under the job's fresh data key on the way.
    Encrypt(Dek),
}

impl SendMode {
    /// The data key of the copy (sealed for the target at commit), if it is encrypted.
    fn dek(&self) -> Option<&Dek> {
        match self {
            SendMode::Plain => None,
            SendMode::Encrypted(k) | SendMode::Encrypt(k) => Some(k),
        }
    }

    /// True when the chunks travel (and are stored at the target) encrypted.
    fn encrypted_out(&self) -> bool {
        !matches!(self, SendMode::Plain)
    }

    /// Target id of a source chunk: the same, except when encrypting on the way, where it is
    /// the keyed hash of the source id under the new data key (no chunk is read).
    fn target_id(&self, id: ChunkId) -> ChunkId {
        match self {
            SendMode::Encrypt(k) => openims_store::crypto::encrypted_id_of(k, &id),
            _ => id,
        }
    }
}

impl Service {
    fn peer(&self, region: &str) -> Result<PeerConfig> {
        self.config
            .peers
            .get(region)
            .cloned()
            .ok_or_else(|| CoreError::UnknownRegion(region.to_string()))
    }

    async fn peer_json(&self, peer: &PeerConfig, path: &str, body: Value) -> Result<PeerReply> {
        let link = self.xr.link()?;
        link.call(peer, "POST", path, body.to_string().into_bytes(), false)
            .await
    }

    /// Cross-region replication request (spec C.2): checks every rule, resolves the target
    /// project and key at the peer, and queues an `imsCrossRegionCopyImageJob`.
    pub async fn cross_region_copy(
        &self,
        caller: &Caller,
        id: &str,
        req: CrossRegionRequest,
    ) -> Result<JobId> {
        validate_ims_name(&req.name)?;
        if let Some(d) = &req.description {
            validate_description(d)?;
        }
        let region = req.region.trim();
        if region.is_empty() {
            return Err(CoreError::InvalidRequest("region is required".into()));
        }
        if region == self.config.region {
            return Err(CoreError::SameRegion(region.into()));
        }
        let agency_name = req.agency_name.trim();
        if agency_name.is_empty() {
            return Err(CoreError::InvalidRequest("agency_name is required".into()));
        }
        let src = self.image(caller, id).await?;
        let peer = self.peer(region)?;
        let agencies = self
            .db
            .list_agencies(Some(caller.domain_id.as_str()))
            .await?;
        match agencies.iter().find(|a| a.name == agency_name) {
            None => {
                return Err(CoreError::AgencyInvalid(format!(
                    "your account has no agency named {agency_name:?}"
                )))
            }
            Some(a) if a.delegated_service != IMS_SERVICE => {
                return Err(CoreError::AgencyInvalid(format!(
                    "agency {agency_name:?} delegates to {}, not to the image service ({IMS_SERVICE})",
                    a.delegated_service
                )))
            }
            Some(_) => {}
        }
        if src.status != ImageStatus::Active {
            return Err(CoreError::ImageNotActive(src.status.as_str().into()));
        }
        if src.is_iso() {
            return Err(CoreError::IsoImage);
        }
        if src.is_whole() {
            return match req.vault_id.as_deref().map(str::trim) {
                None | Some("") => Err(CoreError::InvalidRequest(
                    "vault_id is required to replicate a full-ECS image".into(),
                )),
                Some(v) => Err(CoreError::VaultNotSupported(format!(
                    "vault {v}: the target region has no backup service"
                ))),
            };
        }
        let size = src.virtual_size.unwrap_or(0).max(src.size.unwrap_or(0)) as u64;
        if size > self.config.max_image_size {
            return Err(CoreError::ImageTooLargeToCopy(
                self.config.max_image_size >> 30,
            ));
        }
        let cmk = req
            .cmk_id
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string);
        let src_key = self.db.image_key(&src.id.to_string()).await?;
        if let Some(k) = src_key.as_ref().and_then(|k| k.cmk_id.clone()) {
            if cmk.is_none() {
                return Err(CoreError::EncryptedCrossRegion(format!(
                    "the image is encrypted with key {k}; name a key of region {region} in cmk_id"
                )));
            }
        }
        if cmk.is_some() && src.prop("virtual_env_type") == Some("Ironic") {
            return Err(CoreError::BmsNoEncryption);
        }
        // Unwrapping the source's data key checks its key (IMG.0101-0103).
        let src_dek = self.image_dek(caller, &src).await?;
        let (mode, work_dek) = match (&src_dek, &cmk) {
            (Some(d), _) => ("encrypted", Some(self.root_wrap(d)?)),
            (None, Some(_)) => ("encrypt", Some(self.root_wrap(&Dek::generate())?)),
            (None, None) => ("plain", None),
        };
        if self
            .db
            .count_open_jobs(&caller.project_id, JobType::CrossRegionCopy)
            .await?
            >= self.config.max_copy_jobs_per_project
        {
            return Err(CoreError::FlowControl(format!(
                "at most {} cross-region replication jobs may run at once per project",
                self.config.max_copy_jobs_per_project
            )));
        }
        let domain = self.db.find_domain(caller.domain_id.as_str()).await?;
        let reply = self
            .peer_json(
                &peer,
                "/peer/v1/preflight",
                json!({
                    "domain_name": domain.name,
                    "project_name": req.project_name.trim(),
                    "cmk_id": cmk,
                }),
            )
            .await?;
        if reply.status != 200 {
            return Err(peer_error(&reply));
        }
        let target = reply.json();
        let target_project = target["project_id"]
            .as_str()
            .ok_or_else(|| CoreError::PeerUnavailable("preflight without project_id".into()))?
            .to_string();
        let new_id = ImageId::generate();
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let job_id = insert_job(
            &mut tx,
            NewJob {
                project_id: &caller.project_id,
                job_type: JobType::CrossRegionCopy,
                params: json!({
                    "source_image_id": src.id.to_string(),
                    "new_image_id": new_id.to_string(),
                    "name": req.name,
                    "description": req.description,
                    "region": region,
                    "target_project_id": target_project,
                    "target_project_name": target["project_name"],
                    "agency_name": agency_name,
                    "cmk_id": cmk,
                    "mode": mode,
                    "work_dek": work_dek,
                }),
                image_id: Some(new_id.to_string()),
                image_name: Some(req.name.clone()),
            },
        )
        .await?;
        if !crate::jobs::pin_job_source(&mut tx, &job_id, &src.id).await? {
            return Err(CoreError::ImageNotFound(src.id.to_string()));
        }
        tx.commit().await?;
        self.notify_jobs();
        Ok(job_id)
    }

    /// Runs a cross-region copy job: sends the chunks the target lacks, then commits.
    pub(crate) async fn run_cross_region(&self, job: &Job) -> Result<Option<Value>> {
        let p = &job.params;
        let get = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
        let need = |k: &str| get(k).ok_or_else(|| CoreError::Internal(format!("job without {k}")));
        let src_id = need("source_image_id")?;
        let new_id = need("new_image_id")?;
        let region = need("region")?;
        let peer = self.peer(&region)?;
        let bucket = self.xr.bucket(&region, peer.bandwidth_bytes_per_sec);
        let src_iid =
            ImageId::parse(&src_id).ok_or_else(|| CoreError::Internal("bad source id".into()))?;
        // A source deleted since the request was accepted is read from the job's snapshot
        // (its manifests stay pinned until the job ends): deleting it never breaks the copy.
        let src = match self.db.get_image(&src_iid).await? {
            Some(s) if s.owner == job.project_id && s.status == ImageStatus::Active => s,
            Some(s) if s.owner == job.project_id => {
                return Err(CoreError::ImageNotActive(s.status.as_str().into()))
            }
            Some(_) => return Err(CoreError::ImageNotFound(src_id)),
            None => match self.db.job_source(&job.id).await? {
                Some(s) => s,
                None => return Err(CoreError::ImageNotFound(src_id)),
            },
        };
        let dek = match get("work_dek") {
            Some(w) => Some(self.root_unwrap(&w)?),
            None => None,
        };
        let mode = match (get("mode").as_deref(), dek) {
            (Some("encrypted"), Some(k)) => SendMode::Encrypted(k),
            (Some("encrypt"), Some(k)) => SendMode::Encrypt(k),
            (Some("encrypted" | "encrypt"), None) => {
                return Err(CoreError::Internal(
                    "encrypted copy job without a data key".into(),
                ))
            }
            _ => SendMode::Plain,
        };
        let store = self.data.store.clone();
        let mut manifests = Vec::new();
        for m in [&src.disk_manifest, &src.file_manifest]
            .into_iter()
            .flatten()
        {
            let id = m
                .parse::<openims_store::ManifestId>()
                .map_err(|_| CoreError::Internal(format!("bad manifest id {m}")))?;
            let st = store.clone();
            manifests.push(
                tokio::task::spawn_blocking(move || st.manifest(&id))
                    .await
                    .map_err(|e| CoreError::Internal(format!("task failed: {e}")))??,
            );
        }
        if manifests.is_empty() {
            return Err(CoreError::ImageNotActive("no data".into()));
        }
        let bytes_total: u64 = manifests
            .iter()
            .map(|m| {
                m.stored_chunks_with_len()
                    .iter()
                    .map(|(_, l)| *l)
                    .sum::<u64>()
            })
            .sum();
        let mut cp: XrCheckpoint = job
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("xr"))
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default();
        cp.attempts += 1;
        if cp.attempts > 1 {
            tracing::info!(job_id = %job.id, bytes_sent = cp.bytes_sent, stage = cp.stage,
                chunk = cp.next_chunk, "cross-region copy resumes from its checkpoint");
        }
        // Every mode resumes after the batches already offered: encrypting on the way derives
        // each chunk's new id from its source id alone (see `SendCtx::target_id`).
        let mut ctx = SendCtx {
            svc: self,
            job,
            peer: &peer,
            bucket: &bucket,
            cp,
            bytes_done: 0,
            bytes_total,
            last_beat: None,
        };
        let mut out_manifests = Vec::new();
        for (stage, m) in manifests.iter().enumerate() {
            if stage < ctx.cp.stage {
                ctx.bytes_done += m
                    .stored_chunks_with_len()
                    .iter()
                    .map(|(_, l)| *l)
                    .sum::<u64>();
                out_manifests.push(m.clone());
                continue;
            }
            let skip = if stage == ctx.cp.stage {
                ctx.cp.next_chunk
            } else {
                0
            };
            out_manifests.push(ctx.send_manifest(m, &mode, skip).await?);
            ctx.cp.stage = stage + 1;
            ctx.cp.next_chunk = 0;
        }
        // Commit; chunks the target reports missing (lost by a crash of the target) are sent
        // again, a bounded number of times.
        let key = match mode.dek() {
            Some(d) => Some(json!({
                "sealed_dek": seal_dek_for_peer(&peer.secret_key, job.id.as_str(), &new_id, d)?,
                "cmk_id": get("cmk_id"),
            })),
            None => None,
        };
        let body = json!({
            "transfer_id": job.id.as_str(),
            "access_key": peer.access_key,
            "new_image_id": new_id,
            "target_project_id": get("target_project_id"),
            "image": image_meta(&src, get("name"), get("description")),
            "source_region": self.config.region,
            "manifests": out_manifests.iter().map(|m| B64.encode(m.to_bytes())).collect::<Vec<_>>(),
            "key": key,
        });
        for _ in 0..3 {
            ctx.beat("committing", true).await?;
            let reply = ctx
                .call(
                    "POST",
                    "/peer/v1/commit",
                    body.to_string().into_bytes(),
                    false,
                )
                .await?;
            match reply.status {
                200 | 201 => {
                    ctx.bytes_done = bytes_total;
                    ctx.beat("done", true).await?;
                    return Ok(None);
                }
                409 => {
                    let v = reply.json();
                    let missing: Vec<(bool, ChunkId)> = v["missing"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|m| {
                                    Some((
                                        m["encrypted"].as_bool()?,
                                        ChunkId::from_hex(m["id"].as_str()?).ok()?,
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    tracing::warn!(job_id = %job.id, missing = missing.len(),
                        "the target lacks chunks at commit; sending them again");
                    let lost: HashSet<ChunkId> = missing.iter().map(|(_, c)| *c).collect();
                    for m in &manifests {
                        ctx.resend(m, &mode, &lost).await?;
                    }
                }
                _ => return Err(peer_error(&reply)),
            }
        }
        Err(CoreError::PeerUnavailable(
            "the target kept reporting missing chunks".into(),
        ))
    }

    // ---- the peer side ----------------------------------------------------------------------

    /// Checks that `caller` is a peer service account of this deployment.
    pub async fn require_peer(&self, caller: &Caller) -> Result<()> {
        match self
            .db
            .role_of(caller.user_id.as_str(), caller.project_id.as_str())
            .await?
        {
            Some(r) if r == PEER_ROLE => Ok(()),
            _ => Err(CoreError::NotPeerService),
        }
    }

    /// The caller the service acts as in a target project (for key checks).
    async fn target_caller(&self, peer: &Caller, project_id: &str) -> Result<Caller> {
        let p = self
            .db
            .project_by_id(project_id)
            .await?
            .ok_or_else(|| CoreError::ProjectNameIncorrect(project_id.into()))?;
        Ok(Caller {
            user_id: peer.user_id.clone(),
            user_name: peer.user_name.clone(),
            domain_id: p.domain_id.clone(),
            project_id: p.id.clone(),
            project_name: p.name.clone(),
        })
    }

    /// Peer API: resolves the target project and checks the target key and quota.
    pub async fn peer_preflight(&self, caller: &Caller, body: &Value) -> Result<Value> {
        self.require_peer(caller).await?;
        let domain_name = body["domain_name"].as_str().unwrap_or("");
        let project_name = body["project_name"].as_str().unwrap_or("").trim();
        let Ok(domain) = self.db.find_domain(domain_name).await else {
            return Err(CoreError::ProjectNameIncorrect(project_name.into()));
        };
        let projects = self.db.list_projects(Some(&domain)).await?;
        let project = if project_name.is_empty() {
            match projects.as_slice() {
                [one] => one.clone(),
                [] => return Err(CoreError::ProjectNameIncorrect(String::new())),
                _ => return Err(CoreError::ProjectNameRequired),
            }
        } else {
            projects
                .iter()
                .find(|p| p.name == project_name)
                .cloned()
                .ok_or_else(|| CoreError::ProjectNameIncorrect(project_name.into()))?
        };
        let target = self.target_caller(caller, project.id.as_str()).await?;
        if let Some(k) = body["cmk_id"].as_str().filter(|k| !k.is_empty()) {
            self.usable_key(&target, k, KeyRole::Target).await?;
        }
        if self.db.count_images(&project.id).await? >= self.config.image_quota {
            return Err(CoreError::ImageQuotaExceeded(self.config.image_quota));
        }
        Ok(json!({
            "project_id": project.id,
            "project_name": project.name,
            "region": self.config.region,
        }))
    }

    /// Peer API: the chunk ids of `body.ids` this deployment does not store.
    pub async fn peer_missing(&self, caller: &Caller, body: &Value) -> Result<Value> {
        self.require_peer(caller).await?;
        let encrypted = body["encrypted"].as_bool().unwrap_or(false);
        let ids = parse_ids(&body["ids"])?;
        if ids.len() > 4096 {
            return Err(CoreError::InvalidRequest(
                "at most 4096 ids per request".into(),
            ));
        }
        let st = self.data.store.clone();
        let missing = tokio::task::spawn_blocking(move || -> Result<Vec<ChunkId>> {
            if encrypted {
                let mut out = Vec::new();
                let mut seen = HashSet::new();
                for id in ids {
                    if seen.insert(id) && !st.has_encrypted_chunk(&id)? {
                        out.push(id);
                    }
                }
                Ok(out)
            } else {
                Ok(st.missing_chunks(&ids)?)
            }
        })
        .await
        .map_err(|e| CoreError::Internal(format!("task failed: {e}")))??;
        Ok(json!({"missing": hex_ids(&missing)}))
    }

    /// Peer API: stores one chunk after checking it against its id.
    pub async fn peer_put_chunk(
        &self,
        caller: &Caller,
        encrypted: bool,
        id: &str,
        data: bytes::Bytes,
    ) -> Result<bool> {
        self.require_peer(caller).await?;
        let id = ChunkId::from_hex(id)
            .map_err(|_| CoreError::InvalidRequest(format!("bad chunk id {id:?}")))?;
        if data.is_empty() {
            return Err(CoreError::InvalidRequest("empty chunk".into()));
        }
        let st = self.data.store.clone();
        tokio::task::spawn_blocking(move || {
            if encrypted {
                st.put_encrypted_object(&id, &data)
            } else {
                st.put_chunk_checked(&id, &data)
            }
        })
        .await
        .map_err(|e| CoreError::Internal(format!("task failed: {e}")))?
        .map_err(|e| {
            if e.is_corrupt() {
                CoreError::InvalidRequest(format!("chunk refused: {e}"))
            } else {
                CoreError::Store(e)
            }
        })
    }

    /// Peer API: stores the manifests and creates the image, `active`, in the target project.
    pub async fn peer_commit(
        &self,
        caller: &Caller,
        secret_key: &str,
        body: &Value,
    ) -> Result<CommitOutcome> {
        self.require_peer(caller).await?;
        let s = |k: &str| body[k].as_str().map(str::to_string);
        let bad = |w: &str| CoreError::InvalidRequest(format!("commit without {w}"));
        let transfer = s("transfer_id").ok_or_else(|| bad("transfer_id"))?;
        let new_id = s("new_image_id").ok_or_else(|| bad("new_image_id"))?;
        let new_iid = ImageId::parse(&new_id).ok_or_else(|| bad("a valid new_image_id"))?;
        let project = s("target_project_id").ok_or_else(|| bad("target_project_id"))?;
        let target = self.target_caller(caller, &project).await?;
        if let Some(existing) = self.db.get_image(&new_iid).await? {
            return if existing.owner.as_str() == project {
                Ok(CommitOutcome::Done(new_id))
            } else {
                Err(CoreError::DuplicateImage(new_id))
            };
        }
        let mut manifests = Vec::new();
        for m in body["manifests"]
            .as_array()
            .ok_or_else(|| bad("manifests"))?
        {
            let bytes = B64
                .decode(m.as_str().unwrap_or(""))
                .map_err(|_| bad("base64 manifests"))?;
            manifests.push(Manifest::from_bytes(&bytes, "peer manifest")?);
        }
        if manifests.is_empty() || manifests.len() > 2 {
            return Err(bad("one or two manifests"));
        }
        let encrypted = manifests[0].is_encrypted();
        if manifests.iter().any(|m| m.is_encrypted() != encrypted) {
            return Err(CoreError::InvalidRequest(
                "manifests of one image must all be encrypted or all plaintext".into(),
            ));
        }
        // Every chunk must be here; otherwise say which.
        let st = self.data.store.clone();
        let all: Vec<ChunkId> = manifests.iter().flat_map(|m| m.stored_chunks()).collect();
        let missing = tokio::task::spawn_blocking(move || -> Result<Vec<ChunkId>> {
            let mut out = Vec::new();
            let mut seen = HashSet::new();
            for id in all {
                let here = if encrypted {
                    st.has_encrypted_chunk(&id)?
                } else {
                    st.has_chunk(&id)?
                };
                if seen.insert(id) && !here {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| CoreError::Internal(format!("task failed: {e}")))??;
        if !missing.is_empty() {
            return Ok(CommitOutcome::Missing(
                missing.iter().map(|c| (encrypted, c.to_hex())).collect(),
            ));
        }
        let image_key = match (&body["key"], encrypted) {
            (Value::Object(k), true) => {
                let sealed = k
                    .get("sealed_dek")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("sealed_dek"))?;
                let dek = open_dek_from_peer(secret_key, &transfer, &new_id, sealed)?;
                let cmk = k
                    .get("cmk_id")
                    .and_then(Value::as_str)
                    .filter(|c| !c.is_empty())
                    .map(str::to_string);
                let wrapped = match &cmk {
                    Some(c) => {
                        let material = self.usable_key(&target, c, KeyRole::Target).await?;
                        self.cmk_wrap(c, &material, &dek)?
                    }
                    None => self.root_wrap(&dek)?,
                };
                Some(ImageKey {
                    cmk_id: cmk,
                    wrapped_dek: wrapped,
                })
            }
            (_, true) => return Err(bad("the data key of encrypted manifests")),
            (_, false) => None,
        };
        let st = self.data.store.clone();
        let ms = manifests.clone();
        let ids = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            ms.iter()
                .map(|m| Ok(st.put_manifest(m)?.to_string()))
                .collect()
        })
        .await
        .map_err(|e| CoreError::Internal(format!("task failed: {e}")))??;
        let mut img = image_from_meta(&body["image"], ProjectId(project.clone()), new_iid)?;
        img.disk_manifest = ids.first().cloned();
        img.file_manifest = ids.get(1).cloned();
        img.properties.insert(
            "__data_origin".into(),
            json!(format!(
                "image,{},{}",
                body["source_region"].as_str().unwrap_or(""),
                body["image"]["source_image_id"].as_str().unwrap_or("")
            )),
        );
        match image_key.as_ref().and_then(|k| k.cmk_id.clone()) {
            Some(c) => {
                img.properties.insert("__system__cmkid".into(), json!(c));
            }
            None => {
                img.properties.remove("__system__cmkid");
            }
        }
        if self.db.count_images(&target.project_id).await? >= self.config.image_quota {
            return Err(CoreError::ImageQuotaExceeded(self.config.image_quota));
        }
        match self
            .db
            .insert_image_with_key(&img, image_key.as_ref())
            .await
        {
            Ok(()) | Err(CoreError::DuplicateImage(_)) => Ok(CommitOutcome::Done(new_id)),
            Err(e) => Err(e),
        }
    }
}

/// The metadata a target image takes from its source.
fn image_meta(src: &Image, name: Option<String>, description: Option<String>) -> Value {
    let mut props = src.properties.clone();
    for k in [
        "__system__cmkid",
        "__originalimagename",
        "__data_origin",
        "__imagetype",
    ] {
        props.remove(k);
    }
    json!({
        "source_image_id": src.id.to_string(),
        "name": name,
        "description": description.unwrap_or_default(),
        "disk_format": src.disk_format,
        "container_format": src.container_format,
        "min_disk": src.min_disk,
        "min_ram": src.min_ram,
        "size": src.size,
        "virtual_size": src.virtual_size,
        "checksum": src.checksum,
        "os_hash_algo": src.os_hash_algo,
        "os_hash_value": src.os_hash_value,
        "properties": props,
    })
}

fn image_from_meta(v: &Value, owner: ProjectId, id: ImageId) -> Result<Image> {
    let s = |k: &str| v[k].as_str().map(str::to_string);
    let name = s("name").ok_or_else(|| CoreError::InvalidRequest("image without name".into()))?;
    validate_ims_name(&name)?;
    let mut img = Image::new(owner, Some(name), Origin::Copy);
    img.id = id;
    if let Some(Value::Object(props)) = v.get("properties") {
        for (k, val) in props {
            img.properties.insert(k.clone(), val.clone());
        }
    }
    img.properties
        .insert("__imagetype".into(), json!("private"));
    img.properties.insert(
        "__description".into(),
        json!(s("description").unwrap_or_default()),
    );
    img.properties.insert(
        "__originalimagename".into(),
        json!(s("source_image_id").unwrap_or_default()),
    );
    img.disk_format = s("disk_format");
    img.container_format = s("container_format");
    img.min_disk = v["min_disk"].as_i64().unwrap_or(0);
    img.min_ram = v["min_ram"].as_i64().unwrap_or(0);
    img.size = v["size"].as_i64();
    img.virtual_size = v["virtual_size"].as_i64();
    img.checksum = s("checksum");
    img.os_hash_algo = s("os_hash_algo");
    img.os_hash_value = s("os_hash_value");
    img.status = ImageStatus::Active;
    img.visibility = "private".into();
    let now = crate::time::now_ms();
    img.created_at = now;
    img.updated_at = now;
    img.active_at = Some(now);
    Ok(img)
}

/// The sending side of one job.
struct SendCtx<'a> {
    svc: &'a Service,
    job: &'a Job,
    peer: &'a PeerConfig,
    bucket: &'a TokenBucket,
    cp: XrCheckpoint,
    bytes_done: u64,
    bytes_total: u64,
    last_beat: Option<Instant>,
}

impl SendCtx<'_> {
    async fn beat(&mut self, task: &str, durable: bool) -> Result<()> {
        if !durable
            && self
                .last_beat
                .is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY)
        {
            return Ok(());
        }
        self.last_beat = Some(Instant::now());
        // The totals are always consistent (`next_chunk` only moves after a whole batch was
        // offered), so every heartbeat may record them.
        let progress = Progress::of_bytes(
            task,
            self.bytes_done,
            self.bytes_total,
            Some(json!({"xr": self.cp})),
        );
        let alive = self.svc.beat(&self.job.id, &progress).await?;
        if !alive {
            return Err(CoreError::Internal("the job's lease was lost".into()));
        }
        Ok(())
    }

    /// Reads chunk `id` of a source manifest as it will travel: `(target id, bytes)`.
    async fn load(&self, mode: &SendMode, id: ChunkId) -> Result<(ChunkId, Vec<u8>)> {
        let st = self.svc.data.store.clone();
        let mode = mode.clone();
        tokio::task::spawn_blocking(move || -> Result<(ChunkId, Vec<u8>)> {
            Ok(match mode {
                SendMode::Plain => (id, st.get_chunk(&id)?),
                SendMode::Encrypted(_) => (id, st.encrypted_object(&id)?),
                SendMode::Encrypt(k) => {
                    // `get_chunk` verified the bytes against `id`.
                    let plain = st.get_chunk(&id)?;
                    openims_store::crypto::encrypt_chunk_of(&k, &id, &plain)?
                }
            })
        })
        .await
        .map_err(|e| CoreError::Internal(format!("task failed: {e}")))?
    }

    /// One peer call; while the peer cannot be reached (restarting, network down) it is
    /// retried with backoff for about a minute, heartbeating so the job keeps its lease.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        binary: bool,
    ) -> Result<PeerReply> {
        let link = self.svc.xr.link()?;
        let mut wait = Duration::from_millis(250);
        let mut waited = Duration::ZERO;
        loop {
            match link
                .call(self.peer, method, path, body.clone(), binary)
                .await
            {
                Err(CoreError::PeerUnavailable(why)) if waited < PEER_RETRY_FOR => {
                    tracing::warn!(job_id = %self.job.id, error = %why, "peer unavailable; retrying");
                    self.beat("waiting for the peer region", true).await?;
                    tokio::time::sleep(wait).await;
                    waited += wait;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    async fn put(&mut self, encrypted: bool, id: ChunkId, data: Vec<u8>) -> Result<()> {
        let n = data.len() as u64;
        self.bucket.take(n).await;
        let kind = if encrypted { "enc" } else { "plain" };
        let reply = self
            .call(
                "PUT",
                &format!("/peer/v1/chunks/{kind}/{}", id.to_hex()),
                data,
                true,
            )
            .await?;
        if !(200..300).contains(&reply.status) {
            return Err(peer_error(&reply));
        }
        self.cp.bytes_sent += n;
        self.cp.chunks_sent += 1;
        Ok(())
    }

    /// Sends the chunks of `m` the target lacks; returns the manifest the target stores.
    async fn send_manifest(
        &mut self,
        m: &Manifest,
        mode: &SendMode,
        skip: usize,
    ) -> Result<Manifest> {
        let encrypted_out = mode.encrypted_out();
        let chunks = m.stored_chunks_with_len();
        let skip = skip.min(chunks.len());
        // Batches before the checkpoint were offered to the target already (their chunks are
        // there, or the commit reports them missing and they are sent then).
        self.bytes_done += chunks[..skip].iter().map(|(_, l)| *l).sum::<u64>();
        let mut offered = skip;
        for batch in chunks[skip..].chunks(BATCH) {
            let src_ids: Vec<ChunkId> = batch.iter().map(|(c, _)| *c).collect();
            let tgt_ids: Vec<ChunkId> = src_ids.iter().map(|c| mode.target_id(*c)).collect();
            let reply = self
                .call(
                    "POST",
                    "/peer/v1/chunks/missing",
                    json!({"encrypted": encrypted_out, "ids": hex_ids(&tgt_ids)})
                        .to_string()
                        .into_bytes(),
                    false,
                )
                .await?;
            if reply.status != 200 {
                return Err(peer_error(&reply));
            }
            let missing: HashSet<ChunkId> =
                parse_ids(&reply.json()["missing"])?.into_iter().collect();
            for ((src, len), tgt) in batch.iter().zip(&tgt_ids) {
                if missing.contains(tgt) {
                    let (id, data) = self.load(mode, *src).await?;
                    if id != *tgt {
                        return Err(CoreError::Internal(
                            "a chunk's id changed while it was sent".into(),
                        ));
                    }
                    self.put(encrypted_out, id, data).await?;
                } else {
                    self.cp.chunks_present += 1;
                }
                self.bytes_done += len;
                self.beat("sending chunks", false).await?;
            }
            offered += batch.len();
            self.cp.next_chunk = offered;
            self.beat("sending chunks", true).await?;
        }
        if !matches!(mode, SendMode::Encrypt(_)) {
            return Ok(m.clone());
        }
        // Every chunk's target id, those of batches offered before a resume included.
        let mapped = m
            .chunks()
            .iter()
            .map(|c| c.map(|c| mode.target_id(c)))
            .collect();
        Ok(Manifest::new_encrypted(
            m.virtual_size(),
            m.chunk_size(),
            mapped,
        )?)
    }

    /// Sends again the chunks of `m` whose target ids are in `lost`.
    async fn resend(
        &mut self,
        m: &Manifest,
        mode: &SendMode,
        lost: &HashSet<ChunkId>,
    ) -> Result<()> {
        let encrypted_out = mode.encrypted_out();
        let mut done = HashSet::new();
        for (src, _) in m.stored_chunks_with_len() {
            let tgt = mode.target_id(src);
            if lost.contains(&tgt) && done.insert(tgt) {
                let (id, data) = self.load(mode, src).await?;
                self.put(encrypted_out, id, data).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_seal_round_trip_and_binding() {
        let dek = Dek::generate();
        let sealed = seal_dek_for_peer("sk", "job-1", "img-1", &dek).expect("seal");
        let back = open_dek_from_peer("sk", "job-1", "img-1", &sealed).expect("open");
        assert_eq!(back.as_bytes(), dek.as_bytes());
        assert!(open_dek_from_peer("other", "job-1", "img-1", &sealed).is_err());
        assert!(open_dek_from_peer("sk", "job-2", "img-1", &sealed).is_err());
        assert!(open_dek_from_peer("sk", "job-1", "img-2", &sealed).is_err());
        assert!(!sealed.contains(&B64.encode(dek.as_bytes())));
    }

    #[tokio::test]
    async fn token_bucket_limits_rate() {
        let b = TokenBucket::new(1_000_000);
        let t = Instant::now();
        for _ in 0..3 {
            b.take(500_000).await;
        }
        // 1.5 MB at 1 MB/s with a 1 MB burst: at least ~0.5 s.
        assert!(
            t.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t.elapsed()
        );
        let free = TokenBucket::new(0);
        let t = Instant::now();
        free.take(u64::MAX / 2).await;
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
