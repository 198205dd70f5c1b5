//! The embedded key service (KMS) and the envelope-encryption rules of images.
//!
//! - **Root key**: 32 random bytes in `<data-dir>/root.key` (mode 0600, created on first
//!   start) or the configured `root_key_file`. It wraps (AES-256-GCM) every master key and
//!   the data keys the service itself holds.
//! - **Master keys (CMKs)**: per project, created, listed, described, enabled, disabled,
//!   scheduled for deletion (7-1096 days; a key past its date counts as deleted), cancelled,
//!   granted to other projects (Huawei `huaweicloudsdkkms` semantics and `key_state` codes:
//!   "2" enabled, "3" disabled, "4" pending deletion). Key material is stored only sealed by
//!   the root key and never leaves the service.
//! - **Image data keys (DEKs)**: an image whose manifests are encrypted has a row in
//!   `image_keys`: its DEK sealed by its CMK (an encrypted image, `__system__cmkid` set) or by
//!   the root key (`cmk_id` NULL: an "unencrypted" image whose data stays encrypted at rest,
//!   e.g. the decrypted copy of an encrypted image). Chunk bytes are encrypted by
//!   `openims_store::crypto`; this module only wraps and unwraps keys and applies the rules.
//!
//! Errors: a target key (the `cmk_id` of a request) answers IMG.0095 (missing), IMG.0097 (not
//! enabled), IMG.0099 (no permission); the key of an existing image answers IMG.0101-0103.

use crate::db::{Db, RowExt};
use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::image::Image;
use crate::time::now_ms;
use crate::Service;
use openims_store::crypto::{open, seal};
use openims_store::Dek;
use serde_json::{json, Value};
use std::path::Path;

/// Huawei `key_state` codes this service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// "2": usable.
    Enabled,
    /// "3": kept, unusable until enabled.
    Disabled,
    /// "4": unusable; deleted at `scheduled_deletion_date` unless cancelled.
    PendingDeletion,
}

impl KeyState {
    /// The wire code.
    pub fn code(self) -> &'static str {
        match self {
            KeyState::Enabled => "2",
            KeyState::Disabled => "3",
            KeyState::PendingDeletion => "4",
        }
    }

    /// Parses a wire code.
    pub fn parse(s: &str) -> Option<KeyState> {
        Some(match s {
            "2" => KeyState::Enabled,
            "3" => KeyState::Disabled,
            "4" => KeyState::PendingDeletion,
            _ => return None,
        })
    }
}

/// A key-management operation that changes a key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOp {
    Enable,
    Disable,
    ScheduleDeletion,
    CancelDeletion,
}

/// The key state machine: the state after `op`, or `KmsBadState`.
/// enable: disabled -> enabled; disable: enabled -> disabled; schedule deletion: enabled or
/// disabled -> pending deletion; cancel deletion: pending deletion -> disabled (as Huawei
/// KMS does: the key must be enabled again explicitly).
pub fn transition(from: KeyState, op: KeyOp) -> Result<KeyState> {
    use KeyOp::*;
    use KeyState::*;
    match (from, op) {
        (Disabled, Enable) => Ok(Enabled),
        (Enabled, Disable) => Ok(Disabled),
        (Enabled | Disabled, ScheduleDeletion) => Ok(PendingDeletion),
        (PendingDeletion, CancelDeletion) => Ok(Disabled),
        (s, op) => Err(CoreError::KmsBadState(format!(
            "the key is in state {} and cannot be {}",
            s.code(),
            match op {
                Enable => "enabled",
                Disable => "disabled",
                ScheduleDeletion => "scheduled for deletion",
                CancelDeletion => "restored (it is not pending deletion)",
            }
        ))),
    }
}

/// Loads the root key from `path`, creating it (32 random bytes, mode 0600) if absent.
pub fn load_or_create_root_key(path: &Path) -> Result<Dek> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read(path) {
        Ok(b) => Dek::from_slice(&b).map_err(|_| {
            CoreError::Internal(format!(
                "root key file {} must hold exactly 32 bytes",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let key = Dek::generate();
            let tmp = path.with_extension("key.tmp");
            {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(key.as_bytes())?;
                f.sync_all()?;
            }
            // Never replace a key another process created meanwhile.
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => {
                    std::fs::remove_file(&tmp)?;
                    if let Some(dir) = path.parent() {
                        std::fs::File::open(dir)?.sync_all()?;
                    }
                    tracing::info!(path = %path.display(), "created the KMS root key");
                    Ok(key)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::remove_file(&tmp)?;
                    load_or_create_root_key(path)
                }
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Wraps and unwraps keys with the root key.
#[derive(Clone)]
pub struct Kms {
    root: Dek,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kms(..)")
    }
}

fn cmk_aad(key_id: &str) -> Vec<u8> {
    format!("openims-cmk:{key_id}").into_bytes()
}

fn dek_aad(wrapper: Option<&str>) -> Vec<u8> {
    format!("openims-dek:{}", wrapper.unwrap_or("root")).into_bytes()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    hex::decode(s).map_err(|_| CoreError::Internal("stored key is not hex".into()))
}

impl Kms {
    /// A KMS over a root key.
    pub fn new(root: Dek) -> Kms {
        Kms { root }
    }

    /// Seals fresh key material for master key `key_id` (hex, for the database).
    fn seal_material(&self, key_id: &str, material: &Dek) -> Result<String> {
        Ok(hex::encode(seal(
            &self.root,
            &cmk_aad(key_id),
            material.as_bytes(),
        )?))
    }

    fn open_material(&self, key_id: &str, sealed: &str) -> Result<Dek> {
        let b = open(&self.root, &cmk_aad(key_id), &unhex(sealed)?).map_err(|_| {
            CoreError::Internal(format!(
                "master key {key_id} cannot be unsealed: wrong root key?"
            ))
        })?;
        Ok(Dek::from_slice(&b)?)
    }

    /// Wraps a DEK under a master key's material (`Some((id, material))`) or the root key.
    pub fn wrap_dek(&self, cmk: Option<(&str, &Dek)>, dek: &Dek) -> Result<String> {
        let (key, aad) = match cmk {
            Some((id, m)) => (m, dek_aad(Some(id))),
            None => (&self.root, dek_aad(None)),
        };
        Ok(hex::encode(seal(key, &aad, dek.as_bytes())?))
    }

    /// Unwraps a DEK wrapped by [`Kms::wrap_dek`] with the same key.
    pub fn unwrap_dek(&self, cmk: Option<(&str, &Dek)>, wrapped: &str) -> Result<Dek> {
        let (key, aad) = match cmk {
            Some((id, m)) => (m, dek_aad(Some(id))),
            None => (&self.root, dek_aad(None)),
        };
        let b = open(key, &aad, &unhex(wrapped)?)
            .map_err(|_| CoreError::Internal("a data key cannot be unwrapped".into()))?;
        Ok(Dek::from_slice(&b)?)
    }
}

/// A master key as stored (without its material).
#[derive(Debug, Clone)]
pub struct KmsKey {
    pub id: String,
    pub project_id: String,
    pub domain_id: String,
    pub alias: String,
    pub description: String,
    pub key_spec: String,
    pub key_usage: String,
    pub origin: String,
    pub state: KeyState,
    pub created_at: i64,
    pub deletion_at: Option<i64>,
    material: String,
}

impl KmsKey {
    /// A service default key (alias `<service>/default`, e.g. `ims/default`): such keys are
    /// created by the service for a project, never through `create-key`, and images encrypted
    /// with one can never be shared (spec C.3, C.6).
    pub fn is_default(&self) -> bool {
        self.alias.ends_with("/default")
    }

    /// Past its scheduled deletion date: gone for every purpose.
    pub fn is_deleted(&self, now: i64) -> bool {
        self.state == KeyState::PendingDeletion && self.deletion_at.is_some_and(|d| d <= now)
    }

    /// `KeyDetails` of the KMS API.
    pub fn details(&self, region: &str) -> Value {
        json!({
            "key_id": self.id,
            "domain_id": self.domain_id,
            "key_alias": self.alias,
            "realm": region,
            "key_spec": self.key_spec,
            "key_usage": self.key_usage,
            "key_description": self.description,
            "creation_date": self.created_at.to_string(),
            "scheduled_deletion_date": self.deletion_at.map(|d| d.to_string()).unwrap_or_default(),
            "key_state": self.state.code(),
            "default_key_flag": if self.is_default() { "1" } else { "0" },
            "key_type": "1",
            "expiration_time": "",
            "origin": self.origin,
            "key_rotation_enabled": "false",
            "sys_enterprise_project_id": "0",
            "keystore_id": "0",
        })
    }
}

const KEY_COLUMNS: &str = "id, project_id, domain_id, alias, description, key_spec, key_usage, \
    origin, key_state, material, created_at, deletion_at";

fn key_from_row(r: &sqlx::any::AnyRow) -> KmsKey {
    KmsKey {
        id: r.s("id"),
        project_id: r.s("project_id"),
        domain_id: r.s("domain_id"),
        alias: r.s("alias"),
        description: r.s("description"),
        key_spec: r.s("key_spec"),
        key_usage: r.s("key_usage"),
        origin: r.s("origin"),
        state: KeyState::parse(&r.s("key_state")).unwrap_or(KeyState::Disabled),
        material: r.s("material"),
        created_at: r.i("created_at"),
        deletion_at: r.oi("deletion_at"),
    }
}

/// A grant as the KMS API shows it.
#[derive(Debug, Clone)]
pub struct KmsGrant {
    pub id: String,
    pub key_id: String,
    pub name: String,
    pub grantee_principal: String,
    pub grantee_type: String,
    pub operations: Vec<String>,
    pub issuing_principal: String,
    pub retiring_principal: Option<String>,
    pub created_at: i64,
}

impl KmsGrant {
    /// `Grants` of the KMS API.
    pub fn view(&self) -> Value {
        json!({
            "key_id": self.key_id,
            "grant_id": self.id,
            "grantee_principal": self.grantee_principal,
            "grantee_principal_type": self.grantee_type,
            "operations": self.operations,
            "issuing_principal": self.issuing_principal,
            "creation_date": self.created_at.to_string(),
            "name": self.name,
            "retiring_principal": self.retiring_principal.clone().unwrap_or_default(),
        })
    }
}

/// Grant operations accepted (the KMS API's names).
pub const GRANT_OPERATIONS: &[&str] = &[
    "create-datakey",
    "create-datakey-without-plaintext",
    "encrypt-datakey",
    "decrypt-datakey",
    "describe-key",
    "create-grant",
    "retire-grant",
    "encrypt-data",
    "decrypt-data",
];

/// What a key is used for in an image operation (selects the error codes and the grant
/// operations needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// The `cmk_id` of a request: a new DEK will be wrapped under it (IMG.0095/0097/0099).
    Target,
    /// The key of an existing image: its DEK will be unwrapped (IMG.0101/0102/0103).
    Source,
}

/// A key-list request.
#[derive(Debug, Clone, Default)]
pub struct ListKeys {
    pub limit: Option<usize>,
    pub marker: Option<String>,
    pub key_state: Option<String>,
}

/// One page of keys.
#[derive(Debug, Clone)]
pub struct KeyPage {
    pub keys: Vec<KmsKey>,
    pub next_marker: Option<String>,
    pub total: usize,
}

/// A new master key request.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub alias: String,
    pub description: Option<String>,
    pub key_spec: Option<String>,
    pub key_usage: Option<String>,
    pub origin: Option<String>,
}

/// A new grant request.
#[derive(Debug, Clone, Default)]
pub struct NewGrant {
    pub key_id: String,
    pub grantee_principal: String,
    pub grantee_type: Option<String>,
    pub operations: Vec<String>,
    pub name: Option<String>,
    pub retiring_principal: Option<String>,
}

/// The stored encryption of an image (`image_keys` row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageKey {
    /// The wrapping master key; `None` = the service root key.
    pub cmk_id: Option<String>,
    /// The DEK sealed by that key (hex).
    pub wrapped_dek: String,
}

fn validate_alias(a: &str) -> Result<()> {
    let ok = !a.is_empty()
        && a.len() <= 255
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'/' | b'_' | b'-'))
        && !a.ends_with("/default");
    if ok {
        Ok(())
    } else {
        Err(CoreError::KmsInvalid(format!(
            "key_alias {a:?} must be 1-255 characters of letters, digits, ':', '/', '_' and '-', \
             and must not end with /default"
        )))
    }
}

impl Db {
    /// A master key by id, whoever owns it.
    pub async fn kms_key(&self, id: &str) -> Result<Option<KmsKey>> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM kms_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(key_from_row))
    }

    /// Grants of a key.
    pub async fn kms_grants(&self, key_id: &str) -> Result<Vec<KmsGrant>> {
        let rows = sqlx::query(
            "SELECT id, key_id, name, grantee_principal, grantee_type, operations, \
             issuing_principal, retiring_principal, created_at FROM kms_grants \
             WHERE key_id = $1 ORDER BY created_at, id",
        )
        .bind(key_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| KmsGrant {
                id: r.s("id"),
                key_id: r.s("key_id"),
                name: r.s("name"),
                grantee_principal: r.s("grantee_principal"),
                grantee_type: r.s("grantee_type"),
                operations: serde_json::from_str(&r.s("operations")).unwrap_or_default(),
                issuing_principal: r.s("issuing_principal"),
                retiring_principal: r.os("retiring_principal"),
                created_at: r.i("created_at"),
            })
            .collect())
    }

    /// The stored encryption of an image, if its manifests are encrypted.
    pub async fn image_key(&self, image_id: &str) -> Result<Option<ImageKey>> {
        let row = sqlx::query("SELECT cmk_id, wrapped_dek FROM image_keys WHERE image_id = $1")
            .bind(image_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| ImageKey {
            cmk_id: r.os("cmk_id"),
            wrapped_dek: r.s("wrapped_dek"),
        }))
    }

    /// Inserts a new image and, for encrypted manifests, its wrapped data key, atomically.
    pub async fn insert_image_with_key(&self, img: &Image, key: Option<&ImageKey>) -> Result<()> {
        let mut tx = crate::db::begin_write(&self.pool).await?;
        crate::image::insert_image_row(&mut tx, img).await?;
        if let Some(k) = key {
            insert_image_key_in(&mut tx, &img.id, k).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Records an image's wrapped data key inside the caller's transaction.
pub(crate) async fn insert_image_key_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    image: &crate::ids::ImageId,
    key: &ImageKey,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO image_keys (image_id, cmk_id, wrapped_dek, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(image.to_string())
    .bind(&key.cmk_id)
    .bind(&key.wrapped_dek)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Service {
    // ---- key management (KMS API) -------------------------------------------------------

    /// Creates an enabled AES-256 master key in the caller's project.
    pub async fn kms_create_key(&self, caller: &Caller, req: NewKey) -> Result<KmsKey> {
        validate_alias(&req.alias)?;
        let description = req.description.unwrap_or_default();
        if description.chars().count() > 255 {
            return Err(CoreError::KmsInvalid(
                "key_description exceeds 255 characters".into(),
            ));
        }
        let key_spec = req.key_spec.unwrap_or_else(|| "AES_256".into());
        if key_spec != "AES_256" {
            return Err(CoreError::KmsInvalid(format!(
                "key_spec {key_spec} is not supported; this key service creates AES_256 keys"
            )));
        }
        let key_usage = req.key_usage.unwrap_or_else(|| "ENCRYPT_DECRYPT".into());
        if key_usage != "ENCRYPT_DECRYPT" {
            return Err(CoreError::KmsInvalid(format!(
                "key_usage {key_usage} is not supported for AES_256 keys"
            )));
        }
        let origin = req.origin.unwrap_or_else(|| "kms".into());
        if origin != "kms" {
            return Err(CoreError::KmsInvalid(format!(
                "origin {origin} is not supported (importing key material is not offered)"
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let material = self.kms.seal_material(&id, &Dek::generate())?;
        let now = now_ms();
        let r = sqlx::query(&format!(
            "INSERT INTO kms_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL) \
             ON CONFLICT (project_id, alias) DO NOTHING"
        ))
        .bind(&id)
        .bind(caller.project_id.as_str())
        .bind(caller.domain_id.as_str())
        .bind(&req.alias)
        .bind(&description)
        .bind(&key_spec)
        .bind(&key_usage)
        .bind(&origin)
        .bind(KeyState::Enabled.code())
        .bind(&material)
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(CoreError::KmsInvalid(format!(
                "a key with alias {} already exists",
                req.alias
            )));
        }
        self.db
            .kms_key(&id)
            .await?
            .ok_or_else(|| CoreError::Internal("created key vanished".into()))
    }

    /// The caller's keys (deleted ones excluded), oldest first, paged by key id marker.
    pub async fn kms_list_keys(&self, caller: &Caller, q: ListKeys) -> Result<KeyPage> {
        if let Some(s) = &q.key_state {
            if !["1", "2", "3", "4", "5"].contains(&s.as_str()) {
                return Err(CoreError::KmsInvalid(format!("key_state {s} is invalid")));
            }
        }
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM kms_keys WHERE project_id = $1 ORDER BY created_at, id"
        ))
        .bind(caller.project_id.as_str())
        .fetch_all(&self.db.pool)
        .await?;
        let now = now_ms();
        let keys: Vec<KmsKey> = rows
            .iter()
            .map(key_from_row)
            .filter(|k| !k.is_deleted(now))
            .filter(|k| q.key_state.as_deref().is_none_or(|s| s == k.state.code()))
            .collect();
        let total = keys.len();
        let start = match &q.marker {
            Some(m) if !m.is_empty() => match keys.iter().position(|k| &k.id == m) {
                Some(p) => p + 1,
                None => return Err(CoreError::KmsInvalid(format!("marker {m} is invalid"))),
            },
            _ => 0,
        };
        let limit = q.limit.unwrap_or(1000).clamp(1, 1000);
        let page: Vec<KmsKey> = keys.into_iter().skip(start).take(limit).collect();
        let next_marker = (start + page.len() < total)
            .then(|| page.last().map(|k| k.id.clone()))
            .flatten();
        Ok(KeyPage {
            keys: page,
            next_marker,
            total,
        })
    }

    /// Whether `caller` holds a grant on `key` for one of `ops`.
    async fn kms_granted(&self, caller: &Caller, key: &KmsKey, ops: &[&str]) -> Result<bool> {
        let principals = [
            caller.project_id.as_str(),
            caller.user_id.as_str(),
            caller.domain_id.as_str(),
        ];
        Ok(self.db.kms_grants(&key.id).await?.iter().any(|g| {
            principals.contains(&g.grantee_principal.as_str())
                && g.operations.iter().any(|o| ops.contains(&o.as_str()))
        }))
    }

    /// A live key of the caller's project, for management operations: another project's
    /// key answers IMG.0099, a missing or deleted one IMG.0095.
    async fn kms_own_key(&self, caller: &Caller, key_id: &str) -> Result<KmsKey> {
        match self.db.kms_key(key_id).await? {
            Some(k) if k.is_deleted(now_ms()) => Err(CoreError::KmsKeyNotFound(key_id.into())),
            Some(k) if k.project_id == caller.project_id.as_str() => Ok(k),
            Some(_) => Err(CoreError::KmsNoPermission(key_id.into())),
            None => Err(CoreError::KmsKeyNotFound(key_id.into())),
        }
    }

    /// Describes a key of the caller's project or one granted to it.
    pub async fn kms_describe_key(&self, caller: &Caller, key_id: &str) -> Result<KmsKey> {
        match self.db.kms_key(key_id).await? {
            Some(k) if k.is_deleted(now_ms()) => Err(CoreError::KmsKeyNotFound(key_id.into())),
            Some(k) if k.project_id == caller.project_id.as_str() => Ok(k),
            Some(k) if self.kms_granted(caller, &k, GRANT_OPERATIONS).await? => Ok(k),
            Some(_) => Err(CoreError::KmsNoPermission(key_id.into())),
            None => Err(CoreError::KmsKeyNotFound(key_id.into())),
        }
    }

    /// Applies a state change to a key of the caller's project. `pending_days` is required
    /// (7-1096) for `ScheduleDeletion`.
    pub async fn kms_change_state(
        &self,
        caller: &Caller,
        key_id: &str,
        op: KeyOp,
        pending_days: Option<i64>,
    ) -> Result<KmsKey> {
        let k = self.kms_own_key(caller, key_id).await?;
        let to = transition(k.state, op)?;
        let deletion_at = match op {
            KeyOp::ScheduleDeletion => {
                let days = pending_days.ok_or_else(|| {
                    CoreError::KmsInvalid("pending_days is required (7-1096)".into())
                })?;
                if !(7..=1096).contains(&days) {
                    return Err(CoreError::KmsInvalid(format!(
                        "pending_days {days} must be between 7 and 1096"
                    )));
                }
                Some(now_ms() + days * 86_400_000)
            }
            _ => None,
        };
        let r = sqlx::query(
            "UPDATE kms_keys SET key_state = $1, deletion_at = $2 WHERE id = $3 AND key_state = $4",
        )
        .bind(to.code())
        .bind(deletion_at)
        .bind(&k.id)
        .bind(k.state.code())
        .execute(&self.db.pool)
        .await?;
        if r.rows_affected() != 1 {
            return Err(CoreError::KmsBadState(
                "the key changed state concurrently; retry".into(),
            ));
        }
        tracing::info!(key_id = %k.id, from = k.state.code(), to = to.code(), "kms key state changed");
        self.kms_own_key(caller, key_id).await
    }

    /// Grants a key of the caller's project to a principal (a project, user or domain id).
    pub async fn kms_create_grant(&self, caller: &Caller, req: NewGrant) -> Result<String> {
        let k = self.kms_own_key(caller, &req.key_id).await?;
        if req.grantee_principal.is_empty() || req.grantee_principal.len() > 64 {
            return Err(CoreError::KmsInvalid(
                "grantee_principal must be a project, user or domain id".into(),
            ));
        }
        if req.operations.is_empty() {
            return Err(CoreError::KmsInvalid("operations must not be empty".into()));
        }
        if let Some(op) = req
            .operations
            .iter()
            .find(|o| !GRANT_OPERATIONS.contains(&o.as_str()))
        {
            return Err(CoreError::KmsInvalid(format!(
                "operation {op} is invalid (one of {})",
                GRANT_OPERATIONS.join(", ")
            )));
        }
        let gtype = req.grantee_type.unwrap_or_else(|| "user".into());
        if gtype != "user" && gtype != "domain" {
            return Err(CoreError::KmsInvalid(format!(
                "grantee_principal_type {gtype} must be user or domain"
            )));
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        sqlx::query(
            "INSERT INTO kms_grants (id, key_id, name, grantee_principal, grantee_type, operations, \
             issuing_principal, retiring_principal, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&id)
        .bind(&k.id)
        .bind(req.name.unwrap_or_default())
        .bind(&req.grantee_principal)
        .bind(&gtype)
        .bind(json!(req.operations).to_string())
        .bind(caller.user_id.as_str())
        .bind(&req.retiring_principal)
        .bind(now_ms())
        .execute(&self.db.pool)
        .await?;
        Ok(id)
    }

    /// Grants of a key of the caller's project (paged by grant id marker).
    pub async fn kms_list_grants(
        &self,
        caller: &Caller,
        key_id: &str,
        limit: Option<usize>,
        marker: Option<&str>,
    ) -> Result<(Vec<KmsGrant>, Option<String>, usize)> {
        let k = self.kms_own_key(caller, key_id).await?;
        let all = self.db.kms_grants(&k.id).await?;
        let total = all.len();
        let start = match marker.filter(|m| !m.is_empty()) {
            Some(m) => all
                .iter()
                .position(|g| g.id == m)
                .map(|p| p + 1)
                .ok_or_else(|| CoreError::KmsInvalid(format!("marker {m} is invalid")))?,
            None => 0,
        };
        let page: Vec<KmsGrant> = all
            .into_iter()
            .skip(start)
            .take(limit.unwrap_or(100).clamp(1, 100))
            .collect();
        let next = (start + page.len() < total)
            .then(|| page.last().map(|g| g.id.clone()))
            .flatten();
        Ok((page, next, total))
    }

    /// Revokes a grant of a key of the caller's project.
    pub async fn kms_revoke_grant(&self, caller: &Caller, key_id: &str, grant: &str) -> Result<()> {
        let k = self.kms_own_key(caller, key_id).await?;
        let r = sqlx::query("DELETE FROM kms_grants WHERE id = $1 AND key_id = $2")
            .bind(grant)
            .bind(&k.id)
            .execute(&self.db.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(CoreError::KmsInvalid(format!(
                "grant {grant} of key {key_id} does not exist"
            )));
        }
        Ok(())
    }

    // ---- keys of images -----------------------------------------------------------------

    /// The material of key `key_id` if `caller` may use it in `role`: it exists (not
    /// deleted), belongs to the caller's project or is granted to it, and is enabled.
    pub async fn usable_key(&self, caller: &Caller, key_id: &str, role: KeyRole) -> Result<Dek> {
        let (missing, denied, disabled): (fn(String) -> CoreError, _, _) = match role {
            KeyRole::Target => (
                CoreError::KmsKeyNotFound as fn(String) -> CoreError,
                CoreError::KmsNoPermission as fn(String) -> CoreError,
                CoreError::KmsKeyNotEnabled as fn(String) -> CoreError,
            ),
            KeyRole::Source => (
                CoreError::SourceKeyNotFound as fn(String) -> CoreError,
                CoreError::SourceKeyNoPermission as fn(String) -> CoreError,
                CoreError::SourceKeyNotEnabled as fn(String) -> CoreError,
            ),
        };
        let k = match self.db.kms_key(key_id).await? {
            Some(k) if !k.is_deleted(now_ms()) => k,
            _ => return Err(missing(key_id.into())),
        };
        if k.project_id != caller.project_id.as_str() {
            let ops: &[&str] = match role {
                KeyRole::Target => &["create-datakey", "encrypt-datakey"],
                KeyRole::Source => &["decrypt-datakey"],
            };
            if !self.kms_granted(caller, &k, ops).await? {
                return Err(denied(key_id.into()));
            }
        }
        if k.state != KeyState::Enabled {
            return Err(disabled(key_id.into()));
        }
        self.kms.open_material(&k.id, &k.material)
    }

    /// The data key of an image whose manifests are encrypted (`None` for plaintext
    /// manifests), checking its master key for `caller` (IMG.0101-0103).
    pub async fn image_dek(&self, caller: &Caller, img: &Image) -> Result<Option<Dek>> {
        let Some(k) = self.db.image_key(&img.id.to_string()).await? else {
            return Ok(None);
        };
        match &k.cmk_id {
            Some(cmk) => {
                let material = self.usable_key(caller, cmk, KeyRole::Source).await?;
                Ok(Some(self.kms.unwrap_dek(
                    Some((cmk.as_str(), &material)),
                    &k.wrapped_dek,
                )?))
            }
            None => Ok(Some(self.kms.unwrap_dek(None, &k.wrapped_dek)?)),
        }
    }

    /// `image_dek` for a job that holds the image's key wrapped by the root key.
    pub fn root_unwrap(&self, wrapped: &str) -> Result<Dek> {
        self.kms.unwrap_dek(None, wrapped)
    }

    /// Wraps a DEK under the root key (for job parameters and service-held image keys).
    pub fn root_wrap(&self, dek: &Dek) -> Result<String> {
        self.kms.wrap_dek(None, dek)
    }

    /// Wraps a DEK under master key `cmk_id` (material from [`Service::usable_key`]).
    pub fn cmk_wrap(&self, cmk_id: &str, material: &Dek, dek: &Dek) -> Result<String> {
        self.kms.wrap_dek(Some((cmk_id, material)), dek)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_state_machine() {
        use KeyOp::*;
        use KeyState::*;
        assert_eq!(transition(Enabled, Disable).expect("ok"), Disabled);
        assert_eq!(transition(Disabled, Enable).expect("ok"), Enabled);
        assert_eq!(
            transition(Enabled, ScheduleDeletion).expect("ok"),
            PendingDeletion
        );
        assert_eq!(
            transition(Disabled, ScheduleDeletion).expect("ok"),
            PendingDeletion
        );
        assert_eq!(
            transition(PendingDeletion, CancelDeletion).expect("ok"),
            Disabled
        );
        for (s, op) in [
            (Enabled, Enable),
            (Disabled, Disable),
            (PendingDeletion, Enable),
            (PendingDeletion, Disable),
            (PendingDeletion, ScheduleDeletion),
            (Enabled, CancelDeletion),
            (Disabled, CancelDeletion),
        ] {
            assert!(
                matches!(transition(s, op), Err(CoreError::KmsBadState(_))),
                "{s:?} {op:?}"
            );
        }
        for s in [Enabled, Disabled, PendingDeletion] {
            assert_eq!(KeyState::parse(s.code()), Some(s));
        }
        assert_eq!(KeyState::parse("9"), None);
    }

    #[test]
    fn deletion_date_makes_a_key_deleted() {
        let mut k = KmsKey {
            id: "k".into(),
            project_id: "p".into(),
            domain_id: "d".into(),
            alias: "a".into(),
            description: String::new(),
            key_spec: "AES_256".into(),
            key_usage: "ENCRYPT_DECRYPT".into(),
            origin: "kms".into(),
            state: KeyState::PendingDeletion,
            created_at: 0,
            deletion_at: Some(100),
            material: String::new(),
        };
        assert!(k.is_deleted(100) && !k.is_deleted(99));
        k.state = KeyState::Disabled;
        assert!(!k.is_deleted(1000));
        assert_eq!(k.details("r")["key_state"], "3");
    }

    #[test]
    fn envelope_wrap_unwrap_and_wrong_keys() {
        let kms = Kms::new(Dek::generate());
        let cmk = Dek::generate();
        let dek = Dek::generate();
        let w = kms.wrap_dek(Some(("key-1", &cmk)), &dek).expect("wrap");
        assert_eq!(
            kms.unwrap_dek(Some(("key-1", &cmk)), &w).expect("unwrap"),
            dek
        );
        // Another CMK, the same material under another id, or the root key: refused.
        assert!(kms
            .unwrap_dek(Some(("key-1", &Dek::generate())), &w)
            .is_err());
        assert!(kms.unwrap_dek(Some(("key-2", &cmk)), &w).is_err());
        assert!(kms.unwrap_dek(None, &w).is_err());
        // Root-wrapped DEKs: only the same root key opens them.
        let r = kms.wrap_dek(None, &dek).expect("wrap");
        assert_eq!(kms.unwrap_dek(None, &r).expect("unwrap"), dek);
        assert!(Kms::new(Dek::generate()).unwrap_dek(None, &r).is_err());
        // Master key material sealed under the root key is bound to the key id.
        let sealed = kms.seal_material("key-1", &cmk).expect("seal");
        assert_eq!(kms.open_material("key-1", &sealed).expect("open"), cmk);
        assert!(kms.open_material("key-2", &sealed).is_err());
        assert!(!sealed.contains(&hex::encode(cmk.as_bytes())));
    }

    #[test]
    fn root_key_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("sub/root.key");
        let a = load_or_create_root_key(&p).expect("create");
        let b = load_or_create_root_key(&p).expect("load");
        assert_eq!(a, b);
        let md = std::fs::metadata(&p).expect("md");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(md.len(), 32);
        std::fs::write(&p, b"short").expect("write");
        assert!(load_or_create_root_key(&p).is_err());
    }

    #[test]
    fn aliases() {
        assert!(validate_alias("my-key_1:a/b").is_ok());
        assert!(validate_alias("").is_err());
        assert!(validate_alias("a b").is_err());
        assert!(validate_alias("ims/default").is_err());
        assert!(validate_alias(&"a".repeat(256)).is_err());
    }
}
