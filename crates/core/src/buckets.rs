//! Buckets and objects of the embedded S3-compatible endpoint: the rules (bucket names, who
//! may do what, bucket policies, multipart limits) and their metadata in the database.
//!
//! - A bucket name is global (S3 rules, [`validate_bucket_name`]); a bucket is owned by the
//!   project that created it. The owner may do everything; another project may only do what
//!   the bucket policy allows ([`BucketPolicy`]), and is refused with `AccessDenied`.
//! - An object is an ordered list of part manifests in the chunk store (`object_parts`),
//!   selected by the object's `version`, so replacing an object is one transaction and a
//!   completed multipart upload keeps its parts (nothing is re-chunked). Copies share
//!   manifests. Bytes are written and read by [`crate::objects`].
//! - Every manifest an object or an unfinished multipart upload references is live for the
//!   store's GC ([`Db::live_manifests`](crate::db::Db)).
//!
//! Entry point: [`BucketObjects`] (`Service::buckets()`), whose functions take the caller's
//! [`ProjectId`] and check it against the bucket's owner and policy before anything else.

use crate::db::{Db, RowExt};
use crate::error::{CoreError, Result};
use crate::ids::ProjectId;
use crate::time::now_ms;
use md5::{Digest, Md5};
use openims_store::Store;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Smallest part of a multipart upload, except the last one (S3: 5 MiB).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Largest part number (S3: 10,000).
pub const MAX_PART_NUMBER: u32 = 10_000;
/// Largest single PUT or part (S3: 5 GiB).
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// Longest object key in bytes (S3: 1024).
pub const MAX_KEY_LEN: usize = 1024;
/// Most keys one list call returns (S3: 1000).
pub const MAX_LIST_KEYS: usize = 1000;
/// Largest bucket policy document accepted, in bytes (S3: 20 KiB).
pub const MAX_POLICY_LEN: usize = 20 * 1024;

/// Checks a bucket name against the S3 rules: 3-63 characters of lowercase letters, digits,
/// dots and hyphens; starts and ends with a letter or digit; no two adjacent dots, no dot next
/// to a hyphen; not an IPv4 address; not one of the reserved prefixes/suffixes
/// (`xn--`, `sthree-`, `-s3alias`, `--ol-s3`).
pub fn validate_bucket_name(name: &str) -> Result<()> {
    let bad = |why: &str| Err(CoreError::InvalidBucketName(format!("{name:?}: {why}")));
    if !(3..=63).contains(&name.len()) {
        return bad("must be 3 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return bad("may contain only lowercase letters, digits, '.' and '-'");
    }
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    if !edge(bytes[0]) || !edge(bytes[bytes.len() - 1]) {
        return bad("must begin and end with a letter or digit");
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return bad("must not contain two adjacent dots or a dot next to a hyphen");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return bad("must not be formatted as an IP address");
    }
    if name.starts_with("xn--")
        || name.starts_with("sthree-")
        || name.ends_with("-s3alias")
        || name.ends_with("--ol-s3")
    {
        return bad("uses a reserved prefix or suffix");
    }
    Ok(())
}

/// Checks an object key: 1 to [`MAX_KEY_LEN`] bytes of UTF-8 without control characters
/// (spaces and any other Unicode are fine).
pub fn validate_object_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(CoreError::InvalidObjectKey(format!(
            "a key must be 1 to {MAX_KEY_LEN} bytes long"
        )));
    }
    if key.chars().any(|c| c.is_control()) {
        return Err(CoreError::InvalidObjectKey(
            "a key must not contain control characters".into(),
        ));
    }
    Ok(())
}

/// What a request does, as named in bucket policies (`s3:GetObject`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// GetObject, HeadObject, and the source of CopyObject.
    GetObject,
    /// PutObject, multipart create/upload/complete, and the target of CopyObject.
    PutObject,
    /// DeleteObject and DeleteObjects.
    DeleteObject,
    /// ListObjects (v1, v2) and HeadBucket.
    ListBucket,
    /// ListMultipartUploads.
    ListBucketMultipartUploads,
    /// ListParts.
    ListMultipartUploadParts,
    /// AbortMultipartUpload.
    AbortMultipartUpload,
    /// GetBucketLocation.
    GetBucketLocation,
}

impl Action {
    /// The policy name, e.g. `s3:GetObject`.
    pub fn name(self) -> &'static str {
        match self {
            Action::GetObject => "s3:GetObject",
            Action::PutObject => "s3:PutObject",
            Action::DeleteObject => "s3:DeleteObject",
            Action::ListBucket => "s3:ListBucket",
            Action::ListBucketMultipartUploads => "s3:ListBucketMultipartUploads",
            Action::ListMultipartUploadParts => "s3:ListMultipartUploadParts",
            Action::AbortMultipartUpload => "s3:AbortMultipartUpload",
            Action::GetBucketLocation => "s3:GetBucketLocation",
        }
    }

    /// Every action a policy may name.
    pub const ALL: [Action; 8] = [
        Action::GetObject,
        Action::PutObject,
        Action::DeleteObject,
        Action::ListBucket,
        Action::ListBucketMultipartUploads,
        Action::ListMultipartUploadParts,
        Action::AbortMultipartUpload,
        Action::GetBucketLocation,
    ];

    /// True for actions on one object (their resource is `bucket/key`).
    fn on_object(self) -> bool {
        matches!(
            self,
            Action::GetObject
                | Action::PutObject
                | Action::DeleteObject
                | Action::ListMultipartUploadParts
                | Action::AbortMultipartUpload
        )
    }
}

/// `*` (any run of characters) and `?` (one character) matching, case-sensitive.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    /// Any authenticated project.
    Any,
    /// These project ids.
    Projects(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    allow: bool,
    principal: Principal,
    /// Action patterns, lower-cased (`s3:getobject`, `s3:*`, `*`).
    actions: Vec<String>,
    /// Resource patterns without the `arn:aws:s3:::` prefix (`bucket`, `bucket/*`); `None`
    /// means the whole bucket and every object in it.
    resources: Option<Vec<String>>,
}

/// A bucket policy: the small JSON subset of the S3 policy language that grants other
/// projects access to a bucket (see `docs/buckets.md`):
///
/// ```json
/// {"Version": "2012-10-17",
///  "Statement": [{"Effect": "Allow",
///                 "Principal": {"project": ["<project id>"]},
///                 "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
///                 "Resource": ["arn:aws:s3:::bucket", "arn:aws:s3:::bucket/*"]}]}
/// ```
///
/// `Effect` is `Allow` or `Deny`; `Principal` is `"*"` (any project), `{"project": id or
/// [ids]}` or `{"AWS": "*" | id | [ids]}`; `Action` is a name or list (`s3:*` and `*` allowed,
/// case-insensitive); `Resource` is optional (default: the bucket and all its objects) and
/// must name this bucket, with `*`/`?` wildcards in the key part. A request of another project
/// is allowed when some `Allow` statement matches and no `Deny` statement does. The owner's
/// project is never restricted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPolicy {
    statements: Vec<Statement>,
}

fn malformed(why: impl Into<String>) -> CoreError {
    CoreError::MalformedPolicy(why.into())
}

/// A JSON string or list of strings.
fn string_list(v: &Value, what: &str) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| malformed(format!("{what} entries must be strings")))
            })
            .collect(),
        _ => Err(malformed(format!(
            "{what} must be a string or a non-empty list of strings"
        ))),
    }
}

impl BucketPolicy {
    /// Parses and checks a policy document for `bucket` (`MalformedPolicy` on any problem).
    pub fn parse(bucket: &str, text: &str) -> Result<BucketPolicy> {
        if text.len() > MAX_POLICY_LEN {
            return Err(malformed(format!(
                "the policy exceeds {MAX_POLICY_LEN} bytes"
            )));
        }
        let doc: Value =
            serde_json::from_str(text).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
        let obj = doc
            .as_object()
            .ok_or_else(|| malformed("the policy must be a JSON object"))?;
        for k in obj.keys() {
            if !matches!(k.as_str(), "Version" | "Id" | "Statement") {
                return Err(malformed(format!("unsupported policy element {k:?}")));
            }
        }
        let stmts = match obj.get("Statement") {
            Some(Value::Array(a)) if !a.is_empty() => a.clone(),
            Some(Value::Object(o)) => vec![Value::Object(o.clone())],
            _ => {
                return Err(malformed(
                    "Statement must be a non-empty list of statements",
                ))
            }
        };
        let mut statements = Vec::with_capacity(stmts.len());
        for s in &stmts {
            let s = s
                .as_object()
                .ok_or_else(|| malformed("each statement must be an object"))?;
            for k in s.keys() {
                if !matches!(
                    k.as_str(),
                    "Sid" | "Effect" | "Principal" | "Action" | "Resource"
                ) {
                    return Err(malformed(format!("unsupported statement element {k:?}")));
                }
            }
            let allow = match s.get("Effect").and_then(Value::as_str) {
                Some("Allow") => true,
                Some("Deny") => false,
                _ => return Err(malformed("Effect must be \"Allow\" or \"Deny\"")),
            };
            let principal = match s.get("Principal") {
                Some(Value::String(x)) if x == "*" => Principal::Any,
                Some(Value::Object(p)) if p.len() == 1 => {
                    let (k, v) = p
                        .iter()
                        .next()
                        .ok_or_else(|| malformed("empty Principal"))?;
                    if k != "project" && k != "AWS" {
                        return Err(malformed(format!(
                            "Principal must be \"*\", {{\"project\": ...}} or {{\"AWS\": ...}}, not {k:?}"
                        )));
                    }
                    let ids = string_list(v, "Principal")?;
                    if ids.iter().any(|i| i == "*") {
                        Principal::Any
                    } else {
                        Principal::Projects(ids)
                    }
                }
                _ => {
                    return Err(malformed(
                        "Principal must be \"*\" or an object with one key, \"project\" or \"AWS\"",
                    ))
                }
            };
            let actions: Vec<String> = string_list(
                s.get("Action")
                    .ok_or_else(|| malformed("a statement needs an Action"))?,
                "Action",
            )?
            .into_iter()
            .map(|a| a.to_ascii_lowercase())
            .collect();
            for a in &actions {
                let known = a == "*"
                    || a == "s3:*"
                    || Action::ALL
                        .iter()
                        .any(|x| glob_match(a, &x.name().to_ascii_lowercase()));
                if !known {
                    return Err(malformed(format!(
                        "unsupported action {a:?} (supported: {})",
                        Action::ALL.map(Action::name).join(", ")
                    )));
                }
            }
            let resources = match s.get("Resource") {
                None => None,
                Some(v) => {
                    let mut out = Vec::new();
                    for r in string_list(v, "Resource")? {
                        let rest = r.strip_prefix("arn:aws:s3:::").ok_or_else(|| {
                            malformed(format!("Resource {r:?} must start with arn:aws:s3:::"))
                        })?;
                        let (b, _) = rest.split_once('/').unwrap_or((rest, ""));
                        if b != bucket {
                            return Err(malformed(format!(
                                "Resource {r:?} does not name bucket {bucket}"
                            )));
                        }
                        out.push(rest.to_string());
                    }
                    Some(out)
                }
            };
            statements.push(Statement {
                allow,
                principal,
                actions,
                resources,
            });
        }
        Ok(BucketPolicy { statements })
    }

    /// Whether the policy lets `project` do `action` on `bucket` (and `key` for object
    /// actions). Deny wins over Allow; nothing matching means no.
    pub fn allows(&self, project: &str, action: Action, bucket: &str, key: Option<&str>) -> bool {
        let action_name = action.name().to_ascii_lowercase();
        let resource = match (action.on_object(), key) {
            (true, Some(k)) => format!("{bucket}/{k}"),
            _ => bucket.to_string(),
        };
        let mut allowed = false;
        for s in &self.statements {
            let who = match &s.principal {
                Principal::Any => true,
                Principal::Projects(ids) => ids.iter().any(|i| i == project),
            };
            let what = s.actions.iter().any(|a| glob_match(a, &action_name));
            let which = match &s.resources {
                None => true,
                Some(rs) => rs.iter().any(|r| glob_match(r, &resource)),
            };
            if who && what && which {
                if !s.allow {
                    return false;
                }
                allowed = true;
            }
        }
        allowed
    }
}

/// A bucket as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub name: String,
    pub project_id: ProjectId,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The policy document as given, if any.
    pub policy: Option<String>,
}

/// An object's metadata (its bytes are in its parts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub bucket: String,
    pub key: String,
    /// Names this object's rows in `object_parts`.
    pub version: String,
    pub size: u64,
    /// The ETag without quotes: hex MD5 for single-part objects, `<hex>-<parts>` for
    /// completed multipart uploads (as S3 computes it).
    pub etag: String,
    pub content_type: Option<String>,
    /// User metadata (`x-amz-meta-*` without the prefix).
    pub metadata: BTreeMap<String, String>,
    /// Unix milliseconds of the write that made this version.
    pub created_at: i64,
}

/// One part of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRef {
    pub part_number: u32,
    /// Manifest id (hex) of the part's bytes.
    pub manifest: String,
    pub size: u64,
    /// Byte offset of the part in the object.
    pub offset: u64,
}

/// Content type and user metadata given when an object is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectAttrs {
    pub content_type: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// Bytes stored in the chunk store as one manifest, not yet part of any object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPart {
    /// Manifest id (hex).
    pub manifest: String,
    pub size: u64,
    /// The part's 128-bit tag: the MD5 of the bytes for parts clients upload (S3 clients
    /// compare it with their own), or, for parts the service writes itself (exports), the
    /// first half of the part's manifest id (a BLAKE3 content hash; see
    /// [`crate::objects::PartTag`]).
    pub md5: [u8; 16],
}

impl StoredPart {
    /// Hex tag (the part's ETag).
    pub fn md5_hex(&self) -> String {
        hex::encode(self.md5)
    }
}

/// A list request (ListObjects v1 and v2).
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub prefix: String,
    pub delimiter: Option<String>,
    /// Start after this key or common prefix (v1 `marker`, v2 `start-after` or the decoded
    /// continuation token).
    pub after: Option<String>,
    /// At most this many keys and common prefixes together (capped at [`MAX_LIST_KEYS`]).
    pub max_keys: usize,
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    pub common_prefixes: Vec<String>,
    /// More keys follow; continue after [`ListPage::next_after`].
    pub is_truncated: bool,
    /// The last key or common prefix returned, when truncated.
    pub next_after: Option<String>,
}

/// An unfinished multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInfo {
    pub upload_id: String,
    pub bucket: String,
    pub key: String,
    /// The initiator's project.
    pub project_id: ProjectId,
    pub attrs: ObjectAttrs,
    pub created_at: i64,
}

/// One uploaded part of an unfinished multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedPart {
    pub part_number: u32,
    pub manifest: String,
    pub size: u64,
    /// Hex MD5 of the part, without quotes.
    pub etag: String,
    pub created_at: i64,
}

/// A part named in CompleteMultipartUpload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletePart {
    pub part_number: u32,
    /// The ETag the client got for the part (quotes allowed); `None` skips the check.
    pub etag: Option<String>,
}

/// Bucket and object operations, each checked against the caller's project. Cheap to clone.
#[derive(Clone)]
pub struct BucketObjects {
    pub(crate) db: Db,
    pub(crate) store: Arc<Store>,
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn bucket_from_row(r: &sqlx::any::AnyRow) -> Bucket {
    Bucket {
        name: r.s("name"),
        project_id: ProjectId(r.s("project_id")),
        created_at: r.i("created_at"),
        policy: r.os("policy"),
    }
}

fn metadata_from_json(s: &str) -> BTreeMap<String, String> {
    serde_json::from_str(s).unwrap_or_default()
}

fn metadata_to_json(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}

const OBJECT_COLUMNS: &str =
    "bucket, object_key, version, size, etag, content_type, metadata, created_at";

fn object_from_row(r: &sqlx::any::AnyRow) -> ObjectInfo {
    ObjectInfo {
        bucket: r.s("bucket"),
        key: r.s("object_key"),
        version: r.s("version"),
        size: r.i("size").max(0) as u64,
        etag: r.s("etag"),
        content_type: r.os("content_type"),
        metadata: metadata_from_json(&r.s("metadata")),
        created_at: r.i("created_at"),
    }
}

/// Strips the quotes (and a weak `W/` marker) from an ETag.
pub fn bare_etag(etag: &str) -> &str {
    etag.trim().trim_start_matches("W/").trim_matches('"')
}

/// The ETag of a completed multipart upload: hex MD5 of the concatenated binary part MD5s,
/// then `-<number of parts>`.
pub fn multipart_etag(part_md5s: &[[u8; 16]]) -> String {
    let mut h = Md5::new();
    for m in part_md5s {
        h.update(m);
    }
    format!("{}-{}", hex::encode(h.finalize()), part_md5s.len())
}

fn md5_from_hex(s: &str) -> Option<[u8; 16]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

impl BucketObjects {
    /// Bucket and object operations over `db` and `store`.
    pub fn new(db: Db, store: Arc<Store>) -> Self {
        BucketObjects { db, store }
    }

    /// The chunk store objects live in.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    // ---------------------------------------------------------------------------------
    // Buckets
    // ---------------------------------------------------------------------------------

    /// Creates a bucket owned by `project`.
    pub async fn create_bucket(&self, project: &ProjectId, name: &str) -> Result<Bucket> {
        validate_bucket_name(name)?;
        let now = now_ms();
        let r =
            sqlx::query("INSERT INTO buckets (name, project_id, created_at) VALUES ($1, $2, $3)")
                .bind(name)
                .bind(project.as_str())
                .bind(now)
                .execute(&self.db.pool)
                .await;
        match r {
            Ok(_) => Ok(Bucket {
                name: name.into(),
                project_id: project.clone(),
                created_at: now,
                policy: None,
            }),
            Err(e) if is_unique_violation(&e) => match self.find_bucket(name).await? {
                Some(b) if &b.project_id == project => {
                    Err(CoreError::BucketAlreadyOwnedByYou(name.into()))
                }
                _ => Err(CoreError::BucketAlreadyExists(name.into())),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The bucket named `name`, whoever owns it.
    pub async fn find_bucket(&self, name: &str) -> Result<Option<Bucket>> {
        let row =
            sqlx::query("SELECT name, project_id, created_at, policy FROM buckets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.db.pool)
                .await?;
        Ok(row.as_ref().map(bucket_from_row))
    }

    /// The bucket, if `project` may do `action` on it (and on `key`, for object actions):
    /// `NoSuchBucket` if it does not exist, `AccessDenied` if neither owner nor allowed by
    /// the bucket policy.
    pub async fn authorize(
        &self,
        project: &ProjectId,
        bucket: &str,
        action: Action,
        key: Option<&str>,
    ) -> Result<Bucket> {
        let b = self
            .find_bucket(bucket)
            .await?
            .ok_or_else(|| CoreError::NoSuchBucket(bucket.into()))?;
        if &b.project_id == project {
            return Ok(b);
        }
        let allowed = match &b.policy {
            Some(text) => {
                BucketPolicy::parse(bucket, text)?.allows(project.as_str(), action, bucket, key)
            }
            None => false,
        };
        if allowed {
            Ok(b)
        } else {
            Err(CoreError::AccessDenied(format!(
                "{} on bucket {bucket} is not allowed for project {project}",
                action.name()
            )))
        }
    }

    /// The bucket, if `project` owns it (bucket administration: delete, policies).
    async fn owned(&self, project: &ProjectId, bucket: &str) -> Result<Bucket> {
        let b = self
            .find_bucket(bucket)
            .await?
            .ok_or_else(|| CoreError::NoSuchBucket(bucket.into()))?;
        if &b.project_id != project {
            return Err(CoreError::AccessDenied(format!(
                "only the owner of bucket {bucket} may administer it"
            )));
        }
        Ok(b)
    }

    /// Buckets owned by `project`, by name.
    pub async fn list_buckets(&self, project: &ProjectId) -> Result<Vec<Bucket>> {
        let rows = sqlx::query(
            "SELECT name, project_id, created_at, policy FROM buckets WHERE project_id = $1 ORDER BY name",
        )
        .bind(project.as_str())
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows.iter().map(bucket_from_row).collect())
    }

    /// Deletes an empty bucket (`BucketNotEmpty` while it holds objects or unfinished uploads).
    pub async fn delete_bucket(&self, project: &ProjectId, bucket: &str) -> Result<()> {
        self.owned(project, bucket).await?;
        // One statement, so it is atomic against a concurrent first upload.
        let deleted = sqlx::query(
            "DELETE FROM buckets WHERE name = $1 \
             AND NOT EXISTS (SELECT 1 FROM objects WHERE bucket = $1) \
             AND NOT EXISTS (SELECT 1 FROM multipart_uploads WHERE bucket = $1)",
        )
        .bind(bucket)
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        if deleted == 0 {
            let objects: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM objects WHERE bucket = $1")
                .bind(bucket)
                .fetch_one(&self.db.pool)
                .await?;
            let uploads: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM multipart_uploads WHERE bucket = $1")
                    .bind(bucket)
                    .fetch_one(&self.db.pool)
                    .await?;
            return Err(CoreError::BucketNotEmpty(format!(
                "{bucket} holds {objects} object(s) and {uploads} unfinished upload(s)"
            )));
        }
        Ok(())
    }

    /// Sets the bucket policy (owner only; checked with [`BucketPolicy::parse`]).
    pub async fn put_policy(&self, project: &ProjectId, bucket: &str, policy: &str) -> Result<()> {
        self.owned(project, bucket).await?;
        BucketPolicy::parse(bucket, policy)?;
        sqlx::query("UPDATE buckets SET policy = $1 WHERE name = $2")
            .bind(policy)
            .bind(bucket)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    /// The bucket policy (owner only; `NoSuchBucketPolicy` when none).
    pub async fn get_policy(&self, project: &ProjectId, bucket: &str) -> Result<String> {
        self.owned(project, bucket)
            .await?
            .policy
            .ok_or_else(|| CoreError::NoSuchBucketPolicy(bucket.into()))
    }

    /// Removes the bucket policy (owner only; no error when there is none).
    pub async fn delete_policy(&self, project: &ProjectId, bucket: &str) -> Result<()> {
        self.owned(project, bucket).await?;
        sqlx::query("UPDATE buckets SET policy = NULL WHERE name = $1")
            .bind(bucket)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Objects
    // ---------------------------------------------------------------------------------

    /// The object's metadata, if `project` may read it.
    pub async fn head_object(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectInfo> {
        self.authorize(project, bucket, Action::GetObject, Some(key))
            .await?;
        self.find_object(bucket, key)
            .await?
            .ok_or_else(|| CoreError::NoSuchKey(key.into()))
    }

    pub(crate) async fn find_object(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>> {
        let row = sqlx::query(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 AND object_key = $2"
        ))
        .bind(bucket)
        .bind(key)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.as_ref().map(object_from_row))
    }

    /// The parts of one object version, in order.
    pub(crate) async fn parts_of(&self, version: &str) -> Result<Vec<PartRef>> {
        let rows = sqlx::query(
            "SELECT part_number, manifest, size, part_offset FROM object_parts \
             WHERE version = $1 ORDER BY part_number",
        )
        .bind(version)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| PartRef {
                part_number: r.i("part_number").max(0) as u32,
                manifest: r.s("manifest"),
                size: r.i("size").max(0) as u64,
                offset: r.i("part_offset").max(0) as u64,
            })
            .collect())
    }

    /// The object's metadata and parts, if `project` may read it.
    pub async fn object_with_parts(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
    ) -> Result<(ObjectInfo, Vec<PartRef>)> {
        let info = self.head_object(project, bucket, key).await?;
        let parts = self.parts_of(&info.version).await?;
        let total: u64 = parts.iter().map(|p| p.size).sum();
        if total != info.size {
            // The version was replaced between the two reads: read the new one.
            let info = self
                .find_object(bucket, key)
                .await?
                .ok_or_else(|| CoreError::NoSuchKey(key.into()))?;
            let parts = self.parts_of(&info.version).await?;
            return Ok((info, parts));
        }
        Ok((info, parts))
    }

    /// Makes `parts` (in order) the object `bucket/key`, replacing any previous version, in
    /// one transaction. With `if_not_exists`, an existing object makes it fail with
    /// `ObjectExists` instead. The caller has authorized the write.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn commit_object(
        &self,
        bucket: &str,
        key: &str,
        parts: &[(u32, String, u64)],
        etag: String,
        attrs: &ObjectAttrs,
        if_not_exists: bool,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ) -> Result<ObjectInfo> {
        let version = uuid::Uuid::new_v4().simple().to_string();
        let size: u64 = parts.iter().map(|p| p.2).sum();
        let now = now_ms();
        let info = ObjectInfo {
            bucket: bucket.into(),
            key: key.into(),
            version: version.clone(),
            size,
            etag,
            content_type: attrs.content_type.clone(),
            metadata: attrs.metadata.clone(),
            created_at: now,
        };
        // Every statement writes (no read-then-write: on SQLite that cannot wait for a
        // concurrent writer). The object row first: on PostgreSQL it locks the key, so
        // concurrent writers of the same key serialize here and each then removes the parts
        // of every other version, committed before it.
        let upsert = if if_not_exists {
            ""
        } else {
            " ON CONFLICT (bucket, object_key) DO UPDATE SET version = excluded.version, \
             size = excluded.size, etag = excluded.etag, content_type = excluded.content_type, \
             metadata = excluded.metadata, created_at = excluded.created_at"
        };
        let r = sqlx::query(&format!(
            "INSERT INTO objects ({OBJECT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8){upsert}"
        ))
        .bind(bucket)
        .bind(key)
        .bind(&version)
        .bind(size as i64)
        .bind(&info.etag)
        .bind(&info.content_type)
        .bind(metadata_to_json(&info.metadata))
        .bind(now)
        .execute(&mut **tx)
        .await;
        match r {
            Ok(_) => {}
            Err(e) if if_not_exists && is_unique_violation(&e) => {
                return Err(CoreError::ObjectExists(format!("{bucket}/{key}")))
            }
            Err(e) => return Err(e.into()),
        }
        sqlx::query(
            "DELETE FROM object_parts WHERE bucket = $1 AND object_key = $2 AND version <> $3",
        )
        .bind(bucket)
        .bind(key)
        .bind(&version)
        .execute(&mut **tx)
        .await?;
        let mut offset = 0u64;
        for (number, manifest, psize) in parts {
            sqlx::query(
                "INSERT INTO object_parts (version, part_number, bucket, object_key, manifest, size, part_offset) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&version)
            .bind(i64::from(*number))
            .bind(bucket)
            .bind(key)
            .bind(manifest)
            .bind(*psize as i64)
            .bind(offset as i64)
            .execute(&mut **tx)
            .await?;
            offset += psize;
        }
        Ok(info)
    }

    /// Stores a single-part object whose bytes are already in the store (see
    /// [`BucketObjects::put_object`] for the streaming form). Authorizes `PutObject`.
    pub async fn put_stored(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        part: &StoredPart,
        attrs: &ObjectAttrs,
        if_not_exists: bool,
    ) -> Result<ObjectInfo> {
        validate_object_key(key)?;
        self.authorize(project, bucket, Action::PutObject, Some(key))
            .await?;
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let info = self
            .commit_object(
                bucket,
                key,
                &[(1, part.manifest.clone(), part.size)],
                part.md5_hex(),
                attrs,
                if_not_exists,
                &mut tx,
            )
            .await?;
        tx.commit().await?;
        Ok(info)
    }

    /// Deletes an object; `false` if there was none (S3 answers success either way).
    pub async fn delete_object(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
    ) -> Result<bool> {
        self.authorize(project, bucket, Action::DeleteObject, Some(key))
            .await?;
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let deleted = sqlx::query("DELETE FROM objects WHERE bucket = $1 AND object_key = $2")
            .bind(bucket)
            .bind(key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM object_parts WHERE bucket = $1 AND object_key = $2")
            .bind(bucket)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted > 0)
    }

    /// Copies an object by sharing its part manifests (no byte is copied). Needs `GetObject`
    /// on the source and `PutObject` on the target; `attrs` replaces the source's content
    /// type and metadata when given.
    pub async fn copy_object(
        &self,
        project: &ProjectId,
        src_bucket: &str,
        src_key: &str,
        dst_bucket: &str,
        dst_key: &str,
        attrs: Option<ObjectAttrs>,
    ) -> Result<ObjectInfo> {
        validate_object_key(dst_key)?;
        let (src, parts) = self.object_with_parts(project, src_bucket, src_key).await?;
        self.authorize(project, dst_bucket, Action::PutObject, Some(dst_key))
            .await?;
        let attrs = attrs.unwrap_or(ObjectAttrs {
            content_type: src.content_type.clone(),
            metadata: src.metadata.clone(),
        });
        let parts: Vec<(u32, String, u64)> = parts
            .into_iter()
            .map(|p| (p.part_number, p.manifest, p.size))
            .collect();
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let info = self
            .commit_object(
                dst_bucket, dst_key, &parts, src.etag, &attrs, false, &mut tx,
            )
            .await?;
        tx.commit().await?;
        Ok(info)
    }

    /// Lists objects with prefix, delimiter and paging (S3 order: by UTF-8 bytes of the key).
    pub async fn list_objects(
        &self,
        project: &ProjectId,
        bucket: &str,
        req: &ListRequest,
    ) -> Result<ListPage> {
        self.authorize(project, bucket, Action::ListBucket, None)
            .await?;
        let max = req.max_keys.min(MAX_LIST_KEYS);
        let mut page = ListPage::default();
        if max == 0 {
            return Ok(page);
        }
        let delim = req.delimiter.as_deref().filter(|d| !d.is_empty());
        // Resume point: keys <= `after` were returned, and so were keys under `after` when it
        // is a common prefix.
        let mut cursor = match &req.after {
            Some(a) if a.as_str() >= req.prefix.as_str() => a.clone(),
            _ => req.prefix.clone(),
        };
        let mut inclusive = req.after.as_deref().is_none_or(|a| a < req.prefix.as_str());
        let skip_under = req
            .after
            .clone()
            .filter(|a| delim.is_some_and(|d| a.ends_with(d)) && a.starts_with(&req.prefix));
        let mut count = 0usize;
        const BATCH: i64 = 1000;
        'outer: loop {
            let op = if inclusive { ">=" } else { ">" };
            let rows = sqlx::query(&format!(
                "SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 AND object_key {op} $2 \
                 ORDER BY object_key LIMIT {BATCH}"
            ))
            .bind(bucket)
            .bind(&cursor)
            .fetch_all(&self.db.pool)
            .await?;
            let n = rows.len();
            for r in &rows {
                let o = object_from_row(r);
                cursor = o.key.clone();
                inclusive = false;
                if !o.key.starts_with(&req.prefix) {
                    if o.key.as_str() > req.prefix.as_str() {
                        break 'outer;
                    }
                    continue;
                }
                if let Some(s) = &skip_under {
                    if o.key.starts_with(s.as_str()) {
                        continue;
                    }
                }
                let rest = &o.key[req.prefix.len()..];
                let common = delim.and_then(|d| {
                    rest.find(d)
                        .map(|i| format!("{}{}", req.prefix, &rest[..i + d.len()]))
                });
                match common {
                    Some(cp) => {
                        if page.common_prefixes.last() == Some(&cp) {
                            continue;
                        }
                        if count == max {
                            page.is_truncated = true;
                            break 'outer;
                        }
                        page.common_prefixes.push(cp);
                    }
                    None => {
                        if count == max {
                            page.is_truncated = true;
                            break 'outer;
                        }
                        page.objects.push(o);
                    }
                }
                count += 1;
            }
            if (n as i64) < BATCH {
                break;
            }
        }
        if page.is_truncated {
            let last_key = page.objects.last().map(|o| o.key.clone());
            let last_cp = page.common_prefixes.last().cloned();
            page.next_after = match (last_key, last_cp) {
                (Some(k), Some(c)) => Some(if k > c { k } else { c }),
                (k, c) => k.or(c),
            };
        }
        Ok(page)
    }

    // ---------------------------------------------------------------------------------
    // Multipart uploads
    // ---------------------------------------------------------------------------------

    /// Starts a multipart upload of `bucket/key`.
    pub async fn create_upload(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        attrs: &ObjectAttrs,
    ) -> Result<UploadInfo> {
        validate_object_key(key)?;
        self.authorize(project, bucket, Action::PutObject, Some(key))
            .await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO multipart_uploads (upload_id, bucket, object_key, project_id, content_type, metadata, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(bucket)
        .bind(key)
        .bind(project.as_str())
        .bind(&attrs.content_type)
        .bind(metadata_to_json(&attrs.metadata))
        .bind(now)
        .execute(&self.db.pool)
        .await?;
        Ok(UploadInfo {
            upload_id: id,
            bucket: bucket.into(),
            key: key.into(),
            project_id: project.clone(),
            attrs: attrs.clone(),
            created_at: now,
        })
    }

    /// The upload, if it exists for `bucket/key` and `project` may do `action` there.
    pub async fn upload(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        upload_id: &str,
        action: Action,
    ) -> Result<UploadInfo> {
        self.authorize(project, bucket, action, Some(key)).await?;
        let row = sqlx::query(
            "SELECT upload_id, bucket, object_key, project_id, content_type, metadata, created_at \
             FROM multipart_uploads WHERE upload_id = $1 AND bucket = $2 AND object_key = $3",
        )
        .bind(upload_id)
        .bind(bucket)
        .bind(key)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| CoreError::NoSuchUpload(upload_id.into()))?;
        Ok(upload_from_row(&row))
    }

    /// Records an uploaded part (replacing an earlier upload of the same part number).
    pub async fn record_part(
        &self,
        upload_id: &str,
        part_number: u32,
        part: &StoredPart,
    ) -> Result<UploadedPart> {
        check_part_number(part_number)?;
        let now = now_ms();
        let r = sqlx::query(
            "INSERT INTO upload_parts (upload_id, part_number, manifest, size, etag, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (upload_id, part_number) DO UPDATE SET \
             manifest = excluded.manifest, size = excluded.size, etag = excluded.etag, \
             created_at = excluded.created_at",
        )
        .bind(upload_id)
        .bind(i64::from(part_number))
        .bind(&part.manifest)
        .bind(part.size as i64)
        .bind(part.md5_hex())
        .bind(now)
        .execute(&self.db.pool)
        .await;
        match r {
            Ok(_) => {}
            // The upload was completed or aborted meanwhile (foreign key).
            Err(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => {
                return Err(CoreError::NoSuchUpload(upload_id.into()))
            }
            Err(e) => return Err(e.into()),
        }
        Ok(UploadedPart {
            part_number,
            manifest: part.manifest.clone(),
            size: part.size,
            etag: part.md5_hex(),
            created_at: now,
        })
    }

    /// Uploaded parts of an upload with a number above `after`, at most `max`.
    pub async fn list_parts(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        upload_id: &str,
        after: u32,
        max: usize,
    ) -> Result<(Vec<UploadedPart>, bool)> {
        self.upload(
            project,
            bucket,
            key,
            upload_id,
            Action::ListMultipartUploadParts,
        )
        .await?;
        let mut parts = self.parts_of_upload(upload_id).await?;
        parts.retain(|p| p.part_number > after);
        let truncated = parts.len() > max;
        parts.truncate(max);
        Ok((parts, truncated))
    }

    async fn parts_of_upload(&self, upload_id: &str) -> Result<Vec<UploadedPart>> {
        let rows = sqlx::query(
            "SELECT part_number, manifest, size, etag, created_at FROM upload_parts \
             WHERE upload_id = $1 ORDER BY part_number",
        )
        .bind(upload_id)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| UploadedPart {
                part_number: r.i("part_number").max(0) as u32,
                manifest: r.s("manifest"),
                size: r.i("size").max(0) as u64,
                etag: r.s("etag"),
                created_at: r.i("created_at"),
            })
            .collect())
    }

    /// Completes an upload: the listed parts (ascending, each but the last at least
    /// [`MIN_PART_SIZE`], ETags matching) become the object, atomically; the upload and its
    /// unlisted parts are dropped. With `if_not_exists`, fails with `ObjectExists` if the key
    /// exists (the upload then stays, so it can be aborted or completed elsewhere).
    pub async fn complete_upload(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        upload_id: &str,
        wanted: &[CompletePart],
        if_not_exists: bool,
    ) -> Result<ObjectInfo> {
        let up = self
            .upload(project, bucket, key, upload_id, Action::PutObject)
            .await?;
        if wanted.is_empty() {
            return Err(CoreError::InvalidPart(
                "the upload must name at least one part".into(),
            ));
        }
        let have: BTreeMap<u32, UploadedPart> = self
            .parts_of_upload(upload_id)
            .await?
            .into_iter()
            .map(|p| (p.part_number, p))
            .collect();
        let mut chosen = Vec::with_capacity(wanted.len());
        let mut md5s = Vec::with_capacity(wanted.len());
        let mut last = 0u32;
        for (i, w) in wanted.iter().enumerate() {
            if w.part_number <= last {
                return Err(CoreError::InvalidPartOrder(format!(
                    "part {} follows part {last}",
                    w.part_number
                )));
            }
            last = w.part_number;
            let p = have.get(&w.part_number).ok_or_else(|| {
                CoreError::InvalidPart(format!("part {} was not uploaded", w.part_number))
            })?;
            if let Some(e) = &w.etag {
                if bare_etag(e) != p.etag {
                    return Err(CoreError::InvalidPart(format!(
                        "part {} has ETag \"{}\", not {e}",
                        w.part_number, p.etag
                    )));
                }
            }
            if i + 1 < wanted.len() && p.size < MIN_PART_SIZE {
                return Err(CoreError::EntityTooSmall(format!(
                    "part {} is {} bytes; every part but the last must be at least {MIN_PART_SIZE}",
                    w.part_number, p.size
                )));
            }
            md5s.push(md5_from_hex(&p.etag).ok_or_else(|| {
                CoreError::Internal(format!("stored part ETag {} is not an MD5", p.etag))
            })?);
            chosen.push((p.part_number, p.manifest.clone(), p.size));
        }
        let etag = multipart_etag(&md5s);
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        // Claim the upload first: of two concurrent completions only one proceeds.
        let claimed = sqlx::query("DELETE FROM multipart_uploads WHERE upload_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if claimed == 0 {
            return Err(CoreError::NoSuchUpload(upload_id.into()));
        }
        sqlx::query("DELETE FROM upload_parts WHERE upload_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        let info = self
            .commit_object(
                bucket,
                key,
                &chosen,
                etag,
                &up.attrs,
                if_not_exists,
                &mut tx,
            )
            .await?;
        tx.commit().await?;
        Ok(info)
    }

    /// Aborts an upload; its parts become garbage.
    pub async fn abort_upload(
        &self,
        project: &ProjectId,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<()> {
        self.upload(
            project,
            bucket,
            key,
            upload_id,
            Action::AbortMultipartUpload,
        )
        .await?;
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        sqlx::query("DELETE FROM upload_parts WHERE upload_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM multipart_uploads WHERE upload_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Unfinished uploads in a bucket whose key starts with `prefix`, ordered by key then
    /// start time, at most `max`.
    pub async fn list_uploads(
        &self,
        project: &ProjectId,
        bucket: &str,
        prefix: &str,
        key_after: Option<&str>,
        max: usize,
    ) -> Result<(Vec<UploadInfo>, bool)> {
        self.authorize(project, bucket, Action::ListBucketMultipartUploads, None)
            .await?;
        let rows = sqlx::query(
            "SELECT upload_id, bucket, object_key, project_id, content_type, metadata, created_at \
             FROM multipart_uploads WHERE bucket = $1 AND object_key >= $2 \
             ORDER BY object_key, created_at, upload_id",
        )
        .bind(bucket)
        .bind(key_after.unwrap_or(prefix).max(prefix))
        .fetch_all(&self.db.pool)
        .await?;
        let mut out: Vec<UploadInfo> = rows
            .iter()
            .map(upload_from_row)
            .filter(|u| u.key.starts_with(prefix))
            .filter(|u| key_after.is_none_or(|a| u.key.as_str() > a))
            .collect();
        let truncated = out.len() > max;
        out.truncate(max);
        Ok((out, truncated))
    }
}

fn upload_from_row(r: &sqlx::any::AnyRow) -> UploadInfo {
    UploadInfo {
        upload_id: r.s("upload_id"),
        bucket: r.s("bucket"),
        key: r.s("object_key"),
        project_id: ProjectId(r.s("project_id")),
        attrs: ObjectAttrs {
            content_type: r.os("content_type"),
            metadata: metadata_from_json(&r.s("metadata")),
        },
        created_at: r.i("created_at"),
    }
}

/// Part numbers are 1 to [`MAX_PART_NUMBER`].
pub fn check_part_number(n: u32) -> Result<()> {
    if (1..=MAX_PART_NUMBER).contains(&n) {
        Ok(())
    } else {
        Err(CoreError::InvalidRequest(format!(
            "part number {n} is outside 1..={MAX_PART_NUMBER}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{ObjectReader, PutOptions};
    use openims_format::ReadAt;
    use openims_store::{MemBackend, StoreConfig};
    use std::io::Write;

    async fn setup() -> (tempfile::TempDir, BucketObjects) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = Db::connect(&url).await.expect("db");
        let store = Store::open(
            MemBackend::new(),
            StoreConfig {
                chunk_size: 64 * 1024,
                ..StoreConfig::default()
            },
        )
        .expect("store");
        (dir, BucketObjects::new(db, Arc::new(store)))
    }

    fn body(
        data: &[u8],
    ) -> impl Stream<Item = std::result::Result<bytes::Bytes, std::io::Error>> + Unpin {
        let pieces: Vec<_> = data
            .chunks(10_000)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(pieces)
    }
    use futures::Stream;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn p(s: &str) -> ProjectId {
        ProjectId(s.into())
    }

    #[test]
    fn bucket_names_follow_s3_rules() {
        for ok in [
            "abc",
            "my-bucket",
            "my.bucket.1",
            "a1b",
            &"a".repeat(63),
            "0bucket9",
        ] {
            assert!(validate_bucket_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            "My-Bucket",
            "my_bucket",
            "-abc",
            "abc-",
            ".abc",
            "a..b",
            "a.-b",
            "a-.b",
            "192.168.1.1",
            "xn--abc",
            "sthree-abc",
            "abc-s3alias",
            "abc--ol-s3",
            "with space",
            "émoji",
        ] {
            assert!(
                matches!(
                    validate_bucket_name(bad),
                    Err(CoreError::InvalidBucketName(_))
                ),
                "{bad}"
            );
        }
        assert!(validate_object_key("Windows Server 2012.qcow2").is_ok());
        assert!(validate_object_key("образ.raw").is_ok());
        assert!(validate_object_key("").is_err());
        assert!(validate_object_key(&"k".repeat(1025)).is_err());
        assert!(validate_object_key("a\nb").is_err());
    }

    #[test]
    fn glob() {
        assert!(glob_match("*", ""));
        assert!(glob_match("b/*", "b/x/y"));
        assert!(glob_match("b/pre*", "b/prefix"));
        assert!(!glob_match("b/pre*", "b/other"));
        assert!(glob_match("s3:get*", "s3:getobject"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*x*y", "aaxbby"));
    }

    #[test]
    fn policy_evaluation() {
        let pol = BucketPolicy::parse(
            "bkt",
            r#"{"Version":"2012-10-17","Statement":[
                {"Effect":"Allow","Principal":{"project":["p2"]},
                 "Action":["s3:GetObject","s3:ListBucket"]},
                {"Effect":"Allow","Principal":{"project":"p3"},"Action":"s3:*",
                 "Resource":"arn:aws:s3:::bkt/shared/*"},
                {"Effect":"Deny","Principal":"*","Action":"s3:DeleteObject",
                 "Resource":["arn:aws:s3:::bkt/shared/keep*"]}]}"#,
        )
        .expect("valid policy");
        assert!(pol.allows("p2", Action::GetObject, "bkt", Some("any")));
        assert!(pol.allows("p2", Action::ListBucket, "bkt", None));
        assert!(!pol.allows("p2", Action::PutObject, "bkt", Some("any")));
        assert!(!pol.allows("p2", Action::DeleteObject, "bkt", Some("any")));
        assert!(!pol.allows("p9", Action::GetObject, "bkt", Some("any")));
        // Resource-scoped grant.
        assert!(pol.allows("p3", Action::PutObject, "bkt", Some("shared/x")));
        assert!(pol.allows("p3", Action::DeleteObject, "bkt", Some("shared/x")));
        assert!(!pol.allows("p3", Action::PutObject, "bkt", Some("private/x")));
        assert!(!pol.allows("p3", Action::ListBucket, "bkt", None));
        // Deny wins.
        assert!(!pol.allows("p3", Action::DeleteObject, "bkt", Some("shared/keep1")));

        let any = BucketPolicy::parse(
            "bkt",
            r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"s3:Get*"}}"#,
        )
        .expect("valid");
        assert!(any.allows("whoever", Action::GetObject, "bkt", Some("k")));
        assert!(any.allows("whoever", Action::GetBucketLocation, "bkt", None));
        assert!(!any.allows("whoever", Action::PutObject, "bkt", Some("k")));

        for bad in [
            "not json",
            "[]",
            r#"{"Statement":[]}"#,
            r#"{"Statement":[{"Effect":"Maybe","Principal":"*","Action":"s3:GetObject"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"s3:Fly"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":{"user":"x"},"Action":"s3:GetObject"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"s3:GetObject","Resource":"arn:aws:s3:::other/*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"s3:GetObject","Condition":{}}]}"#,
        ] {
            assert!(
                matches!(
                    BucketPolicy::parse("bkt", bad),
                    Err(CoreError::MalformedPolicy(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn buckets_are_owned_and_guarded() {
        let (_d, b) = setup().await;
        let (p1, p2) = (p("p1"), p("p2"));
        b.create_bucket(&p1, "alpha").await.expect("create");
        assert!(matches!(
            b.create_bucket(&p1, "alpha").await,
            Err(CoreError::BucketAlreadyOwnedByYou(_))
        ));
        assert!(matches!(
            b.create_bucket(&p2, "alpha").await,
            Err(CoreError::BucketAlreadyExists(_))
        ));
        assert!(matches!(
            b.create_bucket(&p1, "Bad_Name").await,
            Err(CoreError::InvalidBucketName(_))
        ));
        assert_eq!(b.list_buckets(&p1).await.expect("list").len(), 1);
        assert!(b.list_buckets(&p2).await.expect("list").is_empty());

        let attrs = ObjectAttrs::default();
        let data = pattern(100_000, 1);
        b.put_object(
            &p1,
            "alpha",
            "k",
            &attrs,
            body(&data),
            &PutOptions {
                content_length: Some(data.len() as u64),
                ..Default::default()
            },
        )
        .await
        .expect("put");
        // Another project: denied everything.
        let denied = |r: Result<_>| matches!(r, Err(CoreError::AccessDenied(_)));
        assert!(denied(b.head_object(&p2, "alpha", "k").await.map(|_| ())));
        assert!(denied(
            b.list_objects(
                &p2,
                "alpha",
                &ListRequest {
                    max_keys: 10,
                    ..Default::default()
                }
            )
            .await
            .map(|_| ())
        ));
        assert!(denied(
            b.put_object(
                &p2,
                "alpha",
                "x",
                &attrs,
                body(b"x"),
                &PutOptions::default()
            )
            .await
            .map(|_| ())
        ));
        assert!(denied(b.delete_object(&p2, "alpha", "k").await.map(|_| ())));
        assert!(denied(b.delete_bucket(&p2, "alpha").await));
        assert!(denied(b.put_policy(&p2, "alpha", "{}").await));
        assert!(matches!(
            b.head_object(&p2, "nope", "k").await,
            Err(CoreError::NoSuchBucket(_))
        ));
        // A policy grants read.
        b.put_policy(
            &p1,
            "alpha",
            r#"{"Statement":[{"Effect":"Allow","Principal":{"project":["p2"]},"Action":["s3:GetObject","s3:ListBucket"]}]}"#,
        )
        .await
        .expect("policy");
        assert_eq!(
            b.head_object(&p2, "alpha", "k").await.expect("head").size,
            100_000
        );
        assert!(denied(b.delete_object(&p2, "alpha", "k").await.map(|_| ())));
        assert!(matches!(
            b.put_policy(&p1, "alpha", "{").await,
            Err(CoreError::MalformedPolicy(_))
        ));
        b.delete_policy(&p1, "alpha").await.expect("delete policy");
        assert!(matches!(
            b.get_policy(&p1, "alpha").await,
            Err(CoreError::NoSuchBucketPolicy(_))
        ));
        assert!(denied(b.head_object(&p2, "alpha", "k").await.map(|_| ())));

        // Not empty: refused; live manifests include the object's part.
        assert!(matches!(
            b.delete_bucket(&p1, "alpha").await,
            Err(CoreError::BucketNotEmpty(_))
        ));
        let (_, parts) = b.object_with_parts(&p1, "alpha", "k").await.expect("parts");
        let live = b.db.live_manifests().await.expect("live");
        assert!(live.contains(&parts[0].manifest));
        assert!(b.delete_object(&p1, "alpha", "k").await.expect("delete"));
        assert!(!b
            .delete_object(&p1, "alpha", "k")
            .await
            .expect("delete again"));
        assert!(!b
            .db
            .live_manifests()
            .await
            .expect("live")
            .contains(&parts[0].manifest));
        b.delete_bucket(&p1, "alpha").await.expect("delete bucket");
        assert!(b.find_bucket("alpha").await.expect("find").is_none());
    }

    #[tokio::test]
    async fn listing_with_prefix_delimiter_and_paging() {
        let (_d, b) = setup().await;
        let pr = p("p1");
        b.create_bucket(&pr, "list").await.expect("create");
        let keys = [
            "a.txt",
            "dir/one",
            "dir/sub/two",
            "dir/three",
            "dir2/x",
            "z",
            "Windows Server 2012.qcow2",
            "образ.raw",
        ];
        for k in keys {
            b.put_object(
                &pr,
                "list",
                k,
                &ObjectAttrs::default(),
                body(k.as_bytes()),
                &PutOptions::default(),
            )
            .await
            .expect("put");
        }
        let list = |prefix: &str, delim: Option<&str>, after: Option<&str>, max: usize| {
            let req = ListRequest {
                prefix: prefix.into(),
                delimiter: delim.map(str::to_string),
                after: after.map(str::to_string),
                max_keys: max,
            };
            let b = b.clone();
            let pr = pr.clone();
            async move { b.list_objects(&pr, "list", &req).await.expect("list") }
        };
        let all = list("", None, None, 1000).await;
        let got: Vec<&str> = all.objects.iter().map(|o| o.key.as_str()).collect();
        let mut want = keys.to_vec();
        want.sort(); // byte order of UTF-8
        assert_eq!(got, want);
        assert!(!all.is_truncated);

        let top = list("", Some("/"), None, 1000).await;
        let got: Vec<&str> = top.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(
            got,
            ["Windows Server 2012.qcow2", "a.txt", "z", "образ.raw"]
        );
        assert_eq!(top.common_prefixes, ["dir/", "dir2/"]);

        let dir = list("dir/", Some("/"), None, 1000).await;
        let got: Vec<&str> = dir.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(got, ["dir/one", "dir/three"]);
        assert_eq!(dir.common_prefixes, ["dir/sub/"]);

        let pre = list("dir", None, None, 1000).await;
        assert_eq!(pre.objects.len(), 4);

        // Paging with a delimiter: prefixes count toward max-keys and are skipped on resume.
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = list("", Some("/"), after.as_deref(), 2).await;
            assert!(page.objects.len() + page.common_prefixes.len() <= 2);
            seen.extend(page.objects.iter().map(|o| o.key.clone()));
            seen.extend(page.common_prefixes.iter().cloned());
            if !page.is_truncated {
                break;
            }
            after = page.next_after.clone();
            assert!(after.is_some());
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "Windows Server 2012.qcow2",
                "a.txt",
                "dir/",
                "dir2/",
                "z",
                "образ.raw"
            ]
        );
        // Paging without delimiter, one key per page.
        let mut n = 0;
        let mut after: Option<String> = None;
        loop {
            let page = list("", None, after.as_deref(), 1).await;
            n += page.objects.len();
            if !page.is_truncated {
                break;
            }
            after = page.next_after;
        }
        assert_eq!(n, keys.len());
        assert!(list("", None, None, 0).await.objects.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn object_reader_reads_ranges_across_parts() {
        let (_d, b) = setup().await;
        let pr = p("p1");
        b.create_bucket(&pr, "mpu").await.expect("create");
        let attrs = ObjectAttrs {
            content_type: Some("application/octet-stream".into()),
            ..Default::default()
        };
        let up = b
            .create_upload(&pr, "mpu", "big object", &attrs)
            .await
            .expect("upload");
        let sizes = [
            MIN_PART_SIZE as usize,
            MIN_PART_SIZE as usize + 12_345,
            70_001,
        ];
        let mut data = Vec::new();
        let mut etags = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            // The middle part has a run of zeros (a zero chunk, not stored).
            let mut part = pattern(n, i as u8);
            if i == 1 {
                part[100_000..400_000].fill(0);
            }
            let got = b
                .upload_part(
                    &pr,
                    "mpu",
                    "big object",
                    &up.upload_id,
                    i as u32 + 1,
                    body(&part),
                    &PutOptions {
                        content_length: Some(n as u64),
                        ..Default::default()
                    },
                )
                .await
                .expect("part");
            etags.push(got.etag.clone());
            data.extend_from_slice(&part);
        }
        // Live while the upload is unfinished.
        let (parts, _) = b
            .list_parts(&pr, "mpu", "big object", &up.upload_id, 0, 1000)
            .await
            .expect("parts");
        assert_eq!(parts.len(), 3);
        let live = b.db.live_manifests().await.expect("live");
        assert!(parts.iter().all(|p| live.contains(&p.manifest)));
        // Wrong order / wrong ETag / too small are refused.
        let cp = |n: u32, e: Option<&str>| CompletePart {
            part_number: n,
            etag: e.map(|s| format!("\"{s}\"")),
        };
        assert!(matches!(
            b.complete_upload(
                &pr,
                "mpu",
                "big object",
                &up.upload_id,
                &[cp(2, None), cp(1, None)],
                false
            )
            .await,
            Err(CoreError::InvalidPartOrder(_))
        ));
        assert!(matches!(
            b.complete_upload(
                &pr,
                "mpu",
                "big object",
                &up.upload_id,
                &[cp(1, Some("00"))],
                false
            )
            .await,
            Err(CoreError::InvalidPart(_))
        ));
        assert!(matches!(
            b.complete_upload(
                &pr,
                "mpu",
                "big object",
                &up.upload_id,
                &[cp(3, None), cp(4, None)],
                false
            )
            .await,
            Err(CoreError::EntityTooSmall(_) | CoreError::InvalidPart(_))
        ));
        let wanted: Vec<_> = etags
            .iter()
            .enumerate()
            .map(|(i, e)| cp(i as u32 + 1, Some(e)))
            .collect();
        let info = b
            .complete_upload(&pr, "mpu", "big object", &up.upload_id, &wanted, false)
            .await
            .expect("complete");
        assert_eq!(info.size, data.len() as u64);
        assert!(info.etag.ends_with("-3"), "{}", info.etag);
        assert!(matches!(
            b.abort_upload(&pr, "mpu", "big object", &up.upload_id)
                .await,
            Err(CoreError::NoSuchUpload(_))
        ));

        let reader: ObjectReader = b
            .open_object_reader(&pr, "mpu", "big object")
            .await
            .expect("reader");
        assert_eq!(reader.size().expect("size"), data.len() as u64);
        let boundary = MIN_PART_SIZE;
        let cases: &[(u64, usize)] = &[
            (0, 10),
            (boundary - 5, 10), // across part 1 -> 2
            (boundary - 1, 1),
            (boundary, 1),
            (2 * boundary + 12_345 - 3, 6), // across part 2 -> 3
            (boundary + 99_990, 300_020),   // into and out of the zero run
            (65_530, 20),                   // across a chunk boundary
            (data.len() as u64 - 7, 7),
            (0, data.len()), // everything at once
        ];
        for &(off, len) in cases {
            let mut buf = vec![0xAAu8; len];
            reader.read_exact_at(&mut buf, off).expect("read");
            assert_eq!(
                &buf[..],
                &data[off as usize..off as usize + len],
                "at {off}+{len}"
            );
        }
        // Past the end: short and zero reads.
        let mut buf = vec![0u8; 100];
        assert_eq!(
            reader
                .read_at(&mut buf, data.len() as u64 - 40)
                .expect("read"),
            40
        );
        assert_eq!(
            reader
                .read_at(&mut buf, data.len() as u64 + 1)
                .expect("read"),
            0
        );

        // A copy shares the parts.
        let copy = b
            .copy_object(&pr, "mpu", "big object", "mpu", "copy", None)
            .await
            .expect("copy");
        assert_eq!(copy.etag, info.etag);
        let (_, orig_parts) = b
            .object_with_parts(&pr, "mpu", "big object")
            .await
            .expect("p");
        let (_, copy_parts) = b.object_with_parts(&pr, "mpu", "copy").await.expect("p");
        let m = |v: &[PartRef]| v.iter().map(|p| p.manifest.clone()).collect::<Vec<_>>();
        assert_eq!(m(&orig_parts), m(&copy_parts));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn object_writer_stores_sequential_writes_atomically() {
        let (_d, b) = setup().await;
        let pr = p("p1");
        b.create_bucket(&pr, "exp").await.expect("create");
        let data = pattern(11 * 1024 * 1024 + 17, 7);
        let mut w = b
            .object_writer(
                &pr,
                "exp",
                "out.qcow2",
                &ObjectAttrs::default(),
                true,
                MIN_PART_SIZE,
            )
            .await
            .expect("writer");
        let chunk = data.clone();
        let w = tokio::task::spawn_blocking(move || {
            for piece in chunk.chunks(333_333) {
                w.write_all(piece).expect("write");
            }
            w
        })
        .await
        .expect("join");
        // Not visible before finish.
        assert!(matches!(
            b.head_object(&pr, "exp", "out.qcow2").await,
            Err(CoreError::NoSuchKey(_))
        ));
        let info = w.finish().await.expect("finish");
        assert_eq!(info.size, data.len() as u64);
        let (_, parts) = b
            .object_with_parts(&pr, "exp", "out.qcow2")
            .await
            .expect("parts");
        assert_eq!(parts.len(), 3);
        let r = b
            .open_object_reader(&pr, "exp", "out.qcow2")
            .await
            .expect("reader");
        let mut all = vec![0u8; data.len()];
        r.read_exact_at(&mut all, 0).expect("read");
        assert!(all == data);
        // if_not_exists: refused up front, and atomically at finish.
        assert!(matches!(
            b.object_writer(&pr, "exp", "out.qcow2", &ObjectAttrs::default(), true, 0)
                .await,
            Err(CoreError::ObjectExists(_))
        ));
        let w2 = b
            .object_writer(&pr, "exp", "late", &ObjectAttrs::default(), true, 0)
            .await
            .expect("writer");
        b.put_object(
            &pr,
            "exp",
            "late",
            &ObjectAttrs::default(),
            body(b"first"),
            &PutOptions::default(),
        )
        .await
        .expect("put");
        assert!(matches!(w2.finish().await, Err(CoreError::ObjectExists(_))));
        // An empty object.
        let w3 = b
            .object_writer(&pr, "exp", "empty", &ObjectAttrs::default(), false, 0)
            .await
            .expect("writer");
        assert_eq!(w3.finish().await.expect("finish").size, 0);
        let (uploads, _) = b
            .list_uploads(&pr, "exp", "", None, 100)
            .await
            .expect("uploads");
        assert!(uploads.is_empty(), "{uploads:?}");
    }
}
