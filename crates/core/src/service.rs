//! The service: every operation both APIs offer, with its rules, scoped by the caller's
//! project; and the worker pool that runs jobs.

use crate::config::ServiceConfig;
use crate::data::DataPlane;
use crate::db::Db;
use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::ids::{ImageId, ProjectId};
use crate::image::{
    apply_list_query, find_os_version, validate_description, validate_glance_name,
    validate_glance_tag, validate_ims_name, validate_tag, Image, ImageStatus, ListQuery, Origin,
    Page, CONTAINER_FORMATS, DISK_FORMATS, READ_ONLY,
};
use crate::jobs::{failure_of, insert_job, Job, JobType, NewJob, Progress};
use crate::kms::ImageKey;
use crate::members::{Access, MemberStatus, Need, Recipient};
use crate::reencrypt::{image_key_json, CopyKeyPlan};
use crate::tags::TagChange;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// One JSON-patch operation, from either patch dialect.
#[derive(Debug, Clone)]
pub struct PatchOp {
    pub op: PatchKind,
    /// The attribute name (path without the leading `/`).
    pub attr: String,
    pub value: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Add,
    Replace,
    Remove,
}

/// Request of an in-region copy (spec A.2).
#[derive(Debug, Clone, Default)]
pub struct CopyRequest {
    pub name: String,
    pub description: Option<String>,
    pub cmk_id: Option<String>,
    pub enterprise_project_id: Option<String>,
    /// Extension `__reencrypt_data`: re-encrypt every chunk under a fresh data key instead of
    /// re-wrapping the source's data key (for a key that may be compromised).
    pub reencrypt_data: bool,
}

/// The image service.
pub struct Service {
    pub db: Db,
    pub data: DataPlane,
    pub config: ServiceConfig,
    /// This process's identity in leases and upload tokens.
    pub node_id: String,
    /// The embedded key service's root-key operations.
    pub kms: crate::kms::Kms,
    /// Cross-region replication: peer transport and per-peer bandwidth limits.
    pub xr: crate::crossregion::XrState,
    pub(crate) job_ready: Notify,
}

/// IMS `__*` attributes that update_image may change (spec A.3), besides name/min_ram/max_ram.
const IMS_UPDATABLE: &[&str] = &[
    "name",
    "__description",
    "__support_xen",
    "__support_largememory",
    "__support_diskintensive",
    "__support_highperformance",
    "__support_xen_gpu_type",
    "__support_kvm_gpu_type",
    "__support_xen_hana",
    "__is_config_init",
    "enterprise_project_id",
    "min_ram",
    "max_ram",
    "hw_vif_multiqueue_enabled",
    "hw_firmware_type",
    "__support_kvm_infiniband",
    "__support_fc_inject",
    "__support_amd",
    "__support_kvm_hi1822_hisriov",
    "__support_kvm_hi1822_hivirtionet",
];

fn as_int(attr: &str, v: &Value) -> Result<i64> {
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n >= 0 => Ok(n),
        _ if matches!(attr, "min_ram" | "max_ram" | "min_disk") => Err(
            CoreError::InvalidDiskOrMemory(format!("{attr} must be a non-negative integer")),
        ),
        _ => Err(CoreError::InvalidAttribute {
            attr: attr.into(),
            reason: "must be a non-negative integer".into(),
        }),
    }
}

fn as_str<'a>(attr: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str().ok_or_else(|| CoreError::InvalidAttribute {
        attr: attr.into(),
        reason: "must be a string".into(),
    })
}

/// Checks and sets one attribute shared by both APIs' rules (`__*` and custom properties).
fn set_property(img: &mut Image, attr: &str, v: &Value) -> Result<()> {
    let fails = |rule: bool, e: CoreError| if rule { Err(e) } else { Ok(()) };
    match attr {
        "__description" => validate_description(as_str(attr, v)?)?,
        "__os_version" => return img.set_os_version(as_str(attr, v)?),
        "hw_firmware_type" => fails(
            !matches!(as_str(attr, v)?, "bios" | "uefi"),
            CoreError::InvalidFirmware,
        )?,
        "architecture" => fails(
            !matches!(
                as_str(attr, v)?.to_ascii_lowercase().as_str(),
                "x86" | "arm"
            ),
            CoreError::InvalidArchitecture,
        )?,
        "max_ram" => {
            as_int(attr, v)?;
            img.properties
                .insert(attr.into(), Value::String(crate::image::value_string(v)));
            return Ok(());
        }
        _ => {}
    }
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(CoreError::InvalidAttribute {
                attr: attr.into(),
                reason: "must be a string".into(),
            })
        }
    };
    if s.chars().count() > 255 && attr != "__description" {
        return Err(CoreError::InvalidAttribute {
            attr: attr.into(),
            reason: "at most 255 characters".into(),
        });
    }
    img.properties.insert(attr.into(), Value::String(s));
    Ok(())
}

impl Service {
    /// Bucket and object operations of the embedded S3 endpoint (also what import and export
    /// jobs read and write bucket objects through).
    pub fn buckets(&self) -> crate::buckets::BucketObjects {
        crate::buckets::BucketObjects::new(self.db.clone(), std::sync::Arc::clone(&self.data.store))
    }

    /// Opens the database and the data plane, recovers from an earlier crash of this node.
    pub async fn open(config: ServiceConfig) -> Result<Arc<Service>> {
        std::fs::create_dir_all(&config.data_dir)?;
        let node_id = node_id(&config)?;
        let db = Db::connect(&config.database_url()).await?;
        let data = DataPlane::open(&config)?;
        let root_key = crate::kms::load_or_create_root_key(&config.root_key_path())?;
        db.check_root_key(&root_key).await?;
        let kms = crate::kms::Kms::new(root_key);
        let svc = Arc::new(Service {
            db,
            data,
            config,
            node_id,
            kms,
            xr: Default::default(),
            job_ready: Notify::new(),
        });
        let reset = svc
            .db
            .reset_interrupted_uploads(&format!("{}:", svc.node_id))
            .await?;
        if reset > 0 {
            tracing::warn!(
                images = reset,
                "uploads interrupted by a restart are queued again"
            );
        }
        svc.data.clear_staging()?;
        let released = svc.db.release_jobs_of(&svc.node_id).await?;
        if released > 0 {
            tracing::warn!(jobs = released, "jobs interrupted by a restart will resume");
        }
        Ok(svc)
    }

    // ---- images ----------------------------------------------------------------------------

    /// The caller's project and that project's domain (the recipient side of sharing).
    pub async fn recipient(&self, caller: &Caller) -> Result<Recipient> {
        let domain = self
            .db
            .project_domain(&caller.project_id)
            .await?
            .unwrap_or_else(|| caller.domain_id.clone());
        Ok(Recipient {
            project: caller.project_id.clone(),
            domain,
        })
    }

    /// The access model: an image as the caller may use it for `need`.
    ///
    /// - The owner may do anything.
    /// - A member (pending, accepted or rejected) may read the metadata (`Need::Read`); only
    ///   an accepted member may use the data (`Need::Use`, else `ShareNotAccepted`); no
    ///   member may change the image or its members (`Need::Manage`: `NotOwner`).
    /// - Anyone else gets `ImageNotFound`, exactly as for an image that does not exist.
    ///
    /// The returned image carries the caller's [`Access`].
    pub async fn visible_image(&self, caller: &Caller, id: &str, need: Need) -> Result<Image> {
        let Some(iid) = ImageId::parse(id) else {
            return Err(CoreError::ImageNotFound(id.to_string()));
        };
        let Some(mut img) = self.db.get_image(&iid).await? else {
            return Err(CoreError::ImageNotFound(id.to_string()));
        };
        if img.owner == caller.project_id {
            img.access = Access::Owner;
            img.shared_out = !self.db.members(&img.id).await?.is_empty();
            return Ok(img);
        }
        let r = self.recipient(caller).await?;
        let Some((_, status)) = self.db.membership(&img.id, &r).await? else {
            return Err(CoreError::ImageNotFound(id.to_string()));
        };
        img.access = Access::Member(status);
        match (need, status) {
            (Need::Read, _) | (Need::Use, MemberStatus::Accepted) => Ok(img),
            (Need::Use, _) => Err(CoreError::ShareNotAccepted),
            (Need::Manage, _) => Err(CoreError::NotOwner),
        }
    }

    /// An image the caller's project owns, or `ImageNotFound` for everyone else, members of a
    /// shared image included. The safe default for operations that are not sharing-aware:
    /// they behave exactly as before sharing existed. Sharing-aware operations call
    /// [`Service::readable_image`] (metadata), [`Service::visible_image`] with `Need::Use`
    /// (data), or [`Service::own_image`] (changes, with IMG.0047 for members).
    pub async fn image(&self, caller: &Caller, id: &str) -> Result<Image> {
        match self.visible_image(caller, id, Need::Manage).await {
            Err(CoreError::NotOwner) => Err(CoreError::ImageNotFound(id.to_string())),
            r => r,
        }
    }

    /// An image whose metadata the caller may read: the owner, or a member of a shared image
    /// whatever its answer (pending, accepted, rejected); `ImageNotFound` for everyone else.
    pub async fn readable_image(&self, caller: &Caller, id: &str) -> Result<Image> {
        self.visible_image(caller, id, Need::Read).await
    }

    /// An image the caller owns (for changes): `NotOwner` for members, `ImageNotFound` for
    /// everyone else.
    pub async fn own_image(&self, caller: &Caller, id: &str) -> Result<Image> {
        self.visible_image(caller, id, Need::Manage).await
    }

    /// Images the caller may see, filtered, sorted and paged.
    ///
    /// Which images are candidates depends on `__imagetype` and `member_status` (spec A.3,
    /// A.7): `private` -> the caller's own; `shared` or any `member_status` -> images shared
    /// with the caller whose answer is `member_status` (default `accepted`); `gold`/`market`
    /// -> none (this service has no public or marketplace images); no type -> own images plus
    /// accepted shares. Pending and rejected shares are listed only when asked for.
    pub async fn list_images(&self, caller: &Caller, q: &ListQuery) -> Result<Page> {
        let mut q = q.clone();
        let mut image_type: Option<String> = None;
        let mut member_status: Option<MemberStatus> = None;
        let mut bad_status: Option<String> = None;
        q.equals.retain(|(k, v)| match k.as_str() {
            "__imagetype" => {
                image_type = Some(v.clone());
                false
            }
            "member_status" => {
                match MemberStatus::parse(v) {
                    Some(s) => member_status = Some(s),
                    None => bad_status = Some(v.clone()),
                }
                false
            }
            _ => true,
        });
        if let Some(v) = bad_status {
            return Err(CoreError::InvalidRequest(format!(
                "member_status must be accepted, rejected or pending, not {v:?}"
            )));
        }
        let (own, shared) = match (image_type.as_deref(), member_status) {
            (Some("private"), Some(_)) => (false, None),
            (Some("private"), None) => (true, None),
            (Some("shared"), s) | (None, s @ Some(_)) => {
                (false, Some(s.unwrap_or(MemberStatus::Accepted)))
            }
            (None, None) => (true, Some(MemberStatus::Accepted)),
            _ => (false, None),
        };
        let shared_images = match shared {
            Some(status) => {
                let r = self.recipient(caller).await?;
                self.db.shared_with(&r, status).await?
            }
            None => Vec::new(),
        };
        if own && shared_images.is_empty() {
            // Only the caller's own images: the database pages them (cost independent of the
            // number of images) when the query allows it.
            if let Some(mut page) = self.db.page_of(&caller.project_id, &q).await? {
                let out = self.db.shared_out_ids(&caller.project_id).await?;
                for img in &mut page.images {
                    img.shared_out = out.contains(&img.id.to_string());
                }
                return Ok(page);
            }
        }
        let mut images = Vec::new();
        if own {
            let out = self.db.shared_out_ids(&caller.project_id).await?;
            images = self.db.images_of(&caller.project_id).await?;
            for img in &mut images {
                img.shared_out = out.contains(&img.id.to_string());
            }
        }
        images.extend(shared_images);
        apply_list_query(images, &q)
    }

    /// Glance `POST /v2/images`.
    pub async fn create_image_metadata(
        &self,
        caller: &Caller,
        body: &Map<String, Value>,
    ) -> Result<Image> {
        let mut img = Image::new(caller.project_id.clone(), None, Origin::Metadata);
        img.visibility = "shared".into();
        for (k, v) in body {
            match k.as_str() {
                "id" => {
                    let s = as_str(k, v)?;
                    img.id = ImageId::parse(s).ok_or_else(|| CoreError::InvalidAttribute {
                        attr: "id".into(),
                        reason: format!("{s:?} is not a UUID"),
                    })?;
                }
                "name" => {
                    if !v.is_null() {
                        let n = as_str(k, v)?;
                        validate_glance_name(n)?;
                        img.name = Some(n.to_string());
                    }
                }
                "tags" => {
                    let Value::Array(tags) = v else {
                        return Err(CoreError::InvalidAttribute {
                            attr: "tags".into(),
                            reason: "must be a list".into(),
                        });
                    };
                    for t in tags {
                        let t = as_str("tags", t)?;
                        validate_glance_tag(t)?;
                        if !img.tags.iter().any(|(k, _)| k == t) {
                            img.tags.push((t.to_string(), String::new()));
                        }
                    }
                    if img.tags.len() > self.config.tag_quota {
                        return Err(CoreError::TagQuotaExceeded(self.config.tag_quota));
                    }
                }
                _ => self.apply_glance_attr(&mut img, k, v, true)?,
            }
        }
        self.db.insert_image(&img, self.config.image_quota).await?;
        Ok(img)
    }

    fn apply_glance_attr(
        &self,
        img: &mut Image,
        attr: &str,
        v: &Value,
        creating: bool,
    ) -> Result<()> {
        if attr.starts_with("os_glance") {
            return Err(CoreError::ReservedAttribute(attr.into()));
        }
        if READ_ONLY.contains(&attr) {
            return Err(CoreError::ReadOnlyAttribute(attr.into()));
        }
        match attr {
            "name" => {
                let n = if v.is_null() { None } else { Some(as_str(attr, v)?.to_string()) };
                if let Some(n) = &n {
                    validate_glance_name(n)?;
                }
                img.name = n;
            }
            "visibility" => match as_str(attr, v)? {
                "private" | "shared" => img.visibility = as_str(attr, v)?.to_string(),
                "public" | "community" => {
                    return Err(CoreError::Forbidden(format!(
                        "Setting visibility to {} is not allowed: only private and shared images are supported",
                        as_str(attr, v)?
                    )))
                }
                other => {
                    return Err(CoreError::InvalidAttribute {
                        attr: attr.into(),
                        reason: format!("'{other}' is not one of ['community', 'public', 'private', 'shared']"),
                    })
                }
            },
            "protected" | "os_hidden" => {
                let b = v.as_bool().ok_or_else(|| CoreError::InvalidAttribute {
                    attr: attr.into(),
                    reason: "must be a boolean".into(),
                })?;
                if attr == "protected" {
                    img.protected = b;
                }
            }
            "min_disk" => img.min_disk = as_int(attr, v)?,
            "min_ram" => img.min_ram = as_int(attr, v)?,
            "disk_format" | "container_format" => {
                if !creating && img.status != ImageStatus::Queued {
                    return Err(CoreError::Forbidden(format!(
                        "Attribute {attr} can be only replaced for a queued image."
                    )));
                }
                let allowed = if attr == "disk_format" { DISK_FORMATS } else { CONTAINER_FORMATS };
                let val = if v.is_null() { None } else { Some(as_str(attr, v)?) };
                if let Some(f) = val {
                    if !allowed.contains(&f) {
                        return Err(CoreError::InvalidAttribute {
                            attr: attr.into(),
                            reason: format!("'{f}' is not one of [None, '{}']", allowed.join("', '")),
                        });
                    }
                }
                let val = val.map(str::to_string);
                if attr == "disk_format" {
                    img.disk_format = val;
                } else {
                    img.container_format = val;
                }
            }
            _ => set_property(img, attr, v)?,
        }
        Ok(())
    }

    /// Glance `PATCH /v2/images/{id}`.
    pub async fn patch_image_glance(
        &self,
        caller: &Caller,
        id: &str,
        ops: &[PatchOp],
    ) -> Result<Image> {
        let mut img = self.own_image(caller, id).await?;
        let mut tag_changes: Option<Vec<(String, String)>> = None;
        for op in ops {
            let attr = op.attr.as_str();
            match op.op {
                PatchKind::Add | PatchKind::Replace => {
                    let v = op.value.clone().ok_or_else(|| {
                        CoreError::InvalidRequest(format!("operation on /{attr} needs a value"))
                    })?;
                    if attr == "tags" {
                        let Value::Array(list) = &v else {
                            return Err(CoreError::InvalidAttribute {
                                attr: "tags".into(),
                                reason: "must be a list".into(),
                            });
                        };
                        let mut tags = Vec::new();
                        for t in list {
                            let t = as_str("tags", t)?;
                            validate_glance_tag(t)?;
                            if !tags.iter().any(|(k, _): &(String, String)| k == t) {
                                tags.push((t.to_string(), String::new()));
                            }
                        }
                        if tags.len() > self.config.tag_quota {
                            return Err(CoreError::TagQuotaExceeded(self.config.tag_quota));
                        }
                        tag_changes = Some(tags);
                    } else {
                        self.apply_glance_attr(&mut img, attr, &v, false)?;
                    }
                }
                PatchKind::Remove => {
                    if attr.starts_with("os_glance") {
                        return Err(CoreError::ReservedAttribute(attr.into()));
                    }
                    if READ_ONLY.contains(&attr) {
                        // openstacksdk removes every extra attribute it does not carry over
                        // when it updates properties; attributes the service computes are
                        // not the client's to remove, so such a removal changes nothing.
                        continue;
                    }
                    if matches!(
                        attr,
                        "name"
                            | "visibility"
                            | "protected"
                            | "min_disk"
                            | "min_ram"
                            | "disk_format"
                            | "container_format"
                            | "tags"
                            | "os_hidden"
                    ) {
                        return Err(CoreError::Forbidden(format!(
                            "Cannot remove core property '{attr}'."
                        )));
                    }
                    if img.properties.remove(attr).is_none() {
                        return Err(CoreError::BadTransition {
                            from: format!("property {attr}"),
                            to: "removed (it does not exist)".into(),
                        });
                    }
                }
            }
        }
        self.db.save_image_attrs(&img).await?;
        if let Some(tags) = tag_changes {
            let mut changes: Vec<TagChange> = img
                .tags
                .iter()
                .filter(|(k, _)| !tags.iter().any(|(t, _)| t == k))
                .map(|(k, _)| TagChange::Remove(k.clone()))
                .collect();
            changes.extend(tags.into_iter().map(|(k, v)| TagChange::Upsert(k, v)));
            self.db
                .change_tags(&img.id, &changes, self.config.tag_quota)
                .await?;
        }
        self.image(caller, id).await
    }

    /// IMS `PATCH /v2/cloudimages/{id}` (update_image).
    pub async fn patch_image_ims(
        &self,
        caller: &Caller,
        id: &str,
        ops: &[PatchOp],
    ) -> Result<Image> {
        let mut img = self.own_image(caller, id).await?;
        if img.status != ImageStatus::Active {
            return Err(CoreError::ImageNotActive(img.status.as_str().into()));
        }
        for op in ops {
            let attr = op.attr.as_str();
            let is_extension = !IMS_UPDATABLE.contains(&attr)
                && !attr.starts_with("__")
                && !READ_ONLY.contains(&attr)
                && !matches!(
                    attr,
                    "min_disk"
                        | "protected"
                        | "visibility"
                        | "disk_format"
                        | "container_format"
                        | "tags"
                        | "status"
                );
            if !IMS_UPDATABLE.contains(&attr) && !is_extension {
                return Err(CoreError::InvalidAttribute {
                    attr: attr.into(),
                    reason: "this attribute cannot be updated".into(),
                });
            }
            if is_extension && attr.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(CoreError::InvalidAttribute {
                    attr: attr.into(),
                    reason: "extension attribute names must not contain upper-case letters".into(),
                });
            }
            match op.op {
                PatchKind::Remove => {
                    if matches!(attr, "name" | "min_ram") {
                        return Err(CoreError::InvalidAttribute {
                            attr: attr.into(),
                            reason: "cannot be removed".into(),
                        });
                    }
                    img.properties.remove(attr);
                }
                PatchKind::Add | PatchKind::Replace => {
                    let v = op.value.clone().ok_or_else(|| {
                        CoreError::InvalidRequest(format!("operation on /{attr} needs a value"))
                    })?;
                    match attr {
                        "name" => {
                            let n = as_str(attr, &v)?;
                            validate_ims_name(n)?;
                            img.name = Some(n.to_string());
                        }
                        "min_ram" => img.min_ram = as_int(attr, &v)?,
                        _ => set_property(&mut img, attr, &v)?,
                    }
                }
            }
        }
        self.db.save_image_attrs(&img).await?;
        self.image(caller, id).await
    }

    /// Deletes an image the caller owns (both APIs). Its members go with it, so recipients
    /// lose access at once; an image shared with a whole domain cannot be deleted (spec C.6).
    pub async fn delete_image(&self, caller: &Caller, id: &str) -> Result<()> {
        let img = self.own_image(caller, id).await.map_err(|e| match e {
            CoreError::NotOwner => CoreError::DeleteNotOwner,
            e => e,
        })?;
        if self.db.domain_member_count(&img.id).await? > 0 {
            return Err(CoreError::SharedWithDomain);
        }
        if img.protected {
            return Err(CoreError::ImageProtected);
        }
        if img.status == ImageStatus::Saving {
            return Err(CoreError::ImageBeingCreated);
        }
        // A disk of a whole image goes only with its whole image (docs/import-export.md).
        if let Some(w) = img
            .prop(crate::import::WHOLE_OF_PROP)
            .and_then(crate::ids::ImageId::parse)
        {
            if self.db.get_image(&w).await?.is_some() {
                return Err(CoreError::WholeImageMember(w.to_string()));
            }
        }
        // A whole image takes its member disks with it; each must be deletable too.
        let mut members = Vec::new();
        if img.is_whole() {
            for m in img
                .prop(crate::import::WHOLE_DISKS_PROP)
                .unwrap_or("")
                .split(',')
                .filter_map(crate::ids::ImageId::parse)
            {
                let Some(disk) = self.db.get_image(&m).await? else {
                    continue;
                };
                if disk.owner != img.owner {
                    continue;
                }
                if self.db.domain_member_count(&disk.id).await? > 0 {
                    return Err(CoreError::SharedWithDomain);
                }
                if disk.protected {
                    return Err(CoreError::ImageProtected);
                }
                if disk.status == ImageStatus::Saving {
                    return Err(CoreError::ImageBeingCreated);
                }
                members.push(disk.id);
            }
        }
        if !self.db.delete_image_row(&img.id).await? {
            return Err(CoreError::ImageNotFound(id.to_string()));
        }
        for m in members {
            self.db.delete_image_row(&m).await?;
        }
        Ok(())
    }

    // ---- tags --------------------------------------------------------------------------------

    /// Applies IMS tag changes (validated per the creation rules for upserts).
    pub async fn change_tags(
        &self,
        caller: &Caller,
        id: &str,
        changes: Vec<TagChange>,
    ) -> Result<Vec<(String, String)>> {
        let img = self.own_image(caller, id).await?;
        for c in &changes {
            if let TagChange::Upsert(k, v) = c {
                validate_tag(k, v)?;
            }
        }
        self.db
            .change_tags(&img.id, &changes, self.config.tag_quota)
            .await
    }

    /// Adds a Glance tag.
    pub async fn add_glance_tag(&self, caller: &Caller, id: &str, tag: &str) -> Result<()> {
        let img = self.own_image(caller, id).await?;
        validate_glance_tag(tag)?;
        self.db
            .change_tags(
                &img.id,
                &[TagChange::Upsert(tag.into(), String::new())],
                self.config.tag_quota,
            )
            .await?;
        Ok(())
    }

    /// Removes a tag; `TagNotFound` when absent.
    pub async fn remove_tag_strict(&self, caller: &Caller, id: &str, key: &str) -> Result<()> {
        let img = self.own_image(caller, id).await?;
        if !img.tags.iter().any(|(k, _)| k == key) {
            return Err(CoreError::TagNotFound(key.into()));
        }
        self.db
            .change_tags(
                &img.id,
                &[TagChange::Remove(key.into())],
                self.config.tag_quota,
            )
            .await?;
        Ok(())
    }

    /// All images of the caller's project with their tags (tag queries).
    pub async fn project_images(&self, caller: &Caller) -> Result<Vec<Image>> {
        self.db.images_of(&caller.project_id).await
    }

    // ---- quotas ------------------------------------------------------------------------------

    /// `show_image_quota` resources.
    pub async fn quota(&self, caller: &Caller) -> Result<Value> {
        // Shared images do not count against the recipient's private images (spec C.6): only
        // images the project owns are counted.
        let used = self.db.count_images(&caller.project_id).await?;
        // image_shared: own images shared with at least one member that answered (pending
        // shares do not consume the sharer's quota); image_member: most members of one image.
        let (shared, most_members) = self.db.sharing_usage(&caller.project_id).await?;
        Ok(json!({"quotas": {"resources": [
            {"type": "image", "used": used, "quota": self.config.image_quota, "min": 1, "max": 1000},
            {"type": "image_shared", "used": shared, "quota": 1000, "min": 1, "max": 1000},
            {"type": "image_member", "used": most_members, "quota": crate::members::MAX_MEMBERS, "min": 1, "max": crate::members::MAX_MEMBERS},
        ]}}))
    }

    // ---- jobs --------------------------------------------------------------------------------

    pub async fn job(&self, caller: &Caller, id: &str) -> Result<Job> {
        self.db
            .get_job(&caller.project_id, id)
            .await?
            .ok_or_else(|| CoreError::JobNotFound(id.to_string()))
    }

    /// The caller's project's newest jobs (extension `GET /v1/{project_id}/jobs`), newest
    /// first; `limit` is 1..=1000 (checked by the API layer).
    pub async fn list_jobs(
        &self,
        caller: &Caller,
        status: Option<crate::jobs::JobStatus>,
        limit: u32,
    ) -> Result<Vec<Job>> {
        self.db.list_jobs(&caller.project_id, status, limit).await
    }

    /// In-region replication (spec C.1): a new private image of the caller sharing the source's
    /// manifests, so it costs the same whatever the size.
    pub async fn copy_image_in_region(
        &self,
        caller: &Caller,
        id: &str,
        req: CopyRequest,
    ) -> Result<crate::ids::JobId> {
        validate_ims_name(&req.name)?;
        if let Some(d) = &req.description {
            validate_description(d)?;
        }
        // Own images, or shared images the caller has accepted (spec C.1): a pending or
        // rejected share answers IMG.0196.
        let src = self.visible_image(caller, id, Need::Use).await?;
        if src.status != ImageStatus::Active {
            return Err(CoreError::ImageNotActive(src.status.as_str().into()));
        }
        if src.is_whole() {
            return Err(CoreError::WholeImageNotReplicable);
        }
        if src.is_iso() {
            return Err(CoreError::IsoImage);
        }
        let size = src.virtual_size.unwrap_or(0).max(src.size.unwrap_or(0)) as u64;
        if size > self.config.max_image_size {
            return Err(CoreError::ImageTooLargeToCopy(
                self.config.max_image_size >> 30,
            ));
        }
        self.check_shared_copy(caller, &src, req.cmk_id.as_deref())
            .await?;
        let plan = self.plan_copy_keys(caller, &src, &req).await?;
        let new_id = ImageId::generate();
        let (image_key, work_dek, src_dek) = match plan {
            CopyKeyPlan::Share { image_key } => {
                return self
                    .share_copy(caller, &src, new_id, &req, image_key.as_ref())
                    .await
            }
            CopyKeyPlan::Encrypt {
                image_key,
                work_dek,
                src_dek,
            } => (image_key, work_dek, src_dek),
        };
        // The image is inserted when the job ends; a project already at its quota is told now.
        if self.db.count_images(&caller.project_id).await? >= self.config.image_quota {
            return Err(CoreError::ImageQuotaExceeded(self.config.image_quota));
        }
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        // The per-project limit holds across nodes: counting and inserting happen under the
        // project's row lock (PostgreSQL) / the write lock (SQLite).
        if crate::jobs::count_open_jobs_locked(
            &mut tx,
            &caller.project_id,
            JobType::CopyImageInRegion,
        )
        .await?
            >= self.config.max_copy_jobs_per_project
        {
            return Err(CoreError::FlowControl(format!(
                "at most {} replication jobs may run at once per project",
                self.config.max_copy_jobs_per_project
            )));
        }
        let job = copy_job(
            caller,
            src.id,
            new_id,
            &req,
            json!({
                "mode": "encrypt",
                "image_key": image_key_json(Some(&image_key)),
                "work_dek": work_dek,
                "src_dek": src_dek,
            }),
        );
        let job_id = insert_job(&mut tx, job).await?;
        if !crate::jobs::pin_job_source(&mut tx, &job_id, &src.id).await? {
            return Err(CoreError::ImageNotFound(src.id.to_string()));
        }
        tx.commit().await?;
        self.job_ready.notify_one();
        Ok(job_id)
    }

    /// An in-region copy that shares the source's manifests (and, for encrypted data, holds
    /// the source's data key re-wrapped at request time): made here, in one transaction with
    /// its job, which is recorded as already succeeded. Nothing runs in the background, so it
    /// never counts against the per-project limit of running replications.
    async fn share_copy(
        &self,
        caller: &Caller,
        src: &Image,
        new_id: ImageId,
        req: &CopyRequest,
        image_key: Option<&ImageKey>,
    ) -> Result<crate::ids::JobId> {
        let img = copied_image(
            src,
            new_id,
            &caller.project_id,
            &req.name,
            req.description.as_deref(),
            image_key,
        );
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        // The source must still be active when the copy commits: its row stays locked until
        // then (PostgreSQL; SQLite holds the write lock), so a concurrent delete waits and its
        // manifests stay referenced by the copy.
        if !crate::image::lock_active_image(&mut tx, &src.id).await? {
            return Err(CoreError::ImageNotFound(src.id.to_string()));
        }
        crate::image::insert_image_in(&mut tx, &img, self.config.image_quota).await?;
        if let Some(k) = image_key {
            crate::kms::insert_image_key_in(&mut tx, &img.id, k).await?;
        }
        let job = copy_job(caller, src.id, new_id, req, json!({"mode": "share"}));
        let job_id = crate::jobs::insert_done_job(&mut tx, job).await?;
        tx.commit().await?;
        tracing::info!(job_id = %job_id, image_id = %new_id, source = %src.id, "image copied (manifests shared)");
        Ok(job_id)
    }

    /// The encrypting copy job (and share jobs queued before copies sharing manifests were
    /// made within the request).
    async fn run_copy(&self, job: &Job) -> Result<Option<Value>> {
        let p = &job.params;
        let get = |k: &str| p.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let src_id = get("source_image_id")
            .ok_or_else(|| CoreError::Internal("job without source".into()))?;
        let new_id =
            get("new_image_id").ok_or_else(|| CoreError::Internal("job without target".into()))?;
        let new_iid =
            ImageId::parse(&new_id).ok_or_else(|| CoreError::Internal("bad target id".into()))?;
        // Idempotent: a resumed job whose image already exists is done.
        if let Some(existing) = self.db.get_image(&new_iid).await? {
            if existing.status == ImageStatus::Active {
                return Ok(None);
            }
        }
        let src_iid =
            ImageId::parse(&src_id).ok_or_else(|| CoreError::Internal("bad source id".into()))?;
        // A source deleted since the request was accepted is read from the job's snapshot
        // (its manifests stay pinned until the job ends): deleting it never breaks the copy.
        let src = match self.db.get_image(&src_iid).await? {
            Some(s) if self.may_use_at_run(&s, &job.project_id).await? => s,
            Some(_) => return Err(CoreError::ImageNotFound(src_id)),
            None => match self.db.job_source(&job.id).await? {
                Some(s) => s,
                None => return Err(CoreError::ImageNotFound(src_id)),
            },
        };
        if src.status != ImageStatus::Active {
            return Err(CoreError::ImageNotActive(src.status.as_str().into()));
        }
        let image_key = crate::reencrypt::job_image_key(p)?;
        let name = get("name").unwrap_or_default();
        let description = get("description");
        let mut img = copied_image(
            &src,
            new_iid,
            &job.project_id,
            &name,
            description.as_deref(),
            image_key.as_ref(),
        );
        if get("mode").as_deref() == Some("encrypt") {
            // Plaintext (or re-keyed) chunks are streamed through AES under a fresh DEK.
            let (disk, file) = self.encrypt_image_data(job, &src).await?;
            img.disk_manifest = Some(disk);
            img.file_manifest = file;
        }
        match self
            .db
            .insert_image_with_key(&img, image_key.as_ref())
            .await
        {
            Ok(()) | Err(CoreError::DuplicateImage(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// When a job runs, the share it was accepted under may be gone: the job's project must
    /// still own the image or be an accepted member of it.
    async fn may_use_at_run(&self, img: &Image, project: &ProjectId) -> Result<bool> {
        if img.owner == *project {
            return Ok(true);
        }
        let Some(domain) = self.db.project_domain(project).await? else {
            return Ok(false);
        };
        let r = Recipient {
            project: project.clone(),
            domain,
        };
        Ok(matches!(
            self.db.membership(&img.id, &r).await?,
            Some((_, MemberStatus::Accepted))
        ))
    }

    /// Renews a job's lease held by this node and records its progress (and checkpoint, if
    /// any); `false` when the lease was lost to another node.
    pub(crate) async fn beat(
        &self,
        job: &crate::ids::JobId,
        progress: &crate::jobs::Progress,
    ) -> Result<bool> {
        self.db
            .heartbeat(job, &self.node_id, self.config.job_lease_ms, progress)
            .await
    }

    /// Wakes a worker for a newly queued job.
    pub(crate) fn notify_jobs(&self) {
        self.job_ready.notify_one();
    }

    /// Starts `n` workers that run queued jobs until `shutdown` fires.
    pub fn spawn_workers(
        self: &Arc<Self>,
        n: usize,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut handles = vec![self.spawn_node_heartbeat(shutdown.clone())];
        for w in 0..n.max(1) {
            let svc = self.clone();
            let mut stop = shutdown.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    if *stop.borrow() {
                        break;
                    }
                    if w == 0 {
                        if let Err(e) = svc.db.recover_expired_jobs(5).await {
                            tracing::error!(error = %e, "job recovery failed");
                        }
                    }
                    match svc
                        .db
                        .claim_job(&svc.node_id, svc.config.job_lease_ms)
                        .await
                    {
                        Ok(Some(job)) => svc.run_job(job).await,
                        Ok(None) => {
                            tokio::select! {
                                _ = svc.job_ready.notified() => {}
                                _ = stop.changed() => {}
                                _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "claiming a job failed");
                            tokio::select! {
                                _ = stop.changed() => {}
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            }));
        }
        handles
    }

    /// Renews this node's liveness lease (3 job leases, at least 10 s) every third of it,
    /// requeueing uploads left in `saving` by nodes that died ([`Db::node_heartbeat`]).
    fn spawn_node_heartbeat(
        self: &Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let svc = self.clone();
        let lease_ms = (svc.config.job_lease_ms * 3).max(10_000);
        tokio::spawn(async move {
            loop {
                match svc.db.node_heartbeat(&svc.node_id, lease_ms).await {
                    Ok(n) if n > 0 => {
                        tracing::warn!(images = n, "uploads of a node that died are queued again")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "node heartbeat failed"),
                }
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(lease_ms as u64 / 3)) => {}
                }
            }
            let _ = svc
                .db
                .release_lease(
                    &format!("{}{}", crate::cluster::NODE_LEASE_PREFIX, svc.node_id),
                    &svc.node_id,
                )
                .await;
        })
    }

    async fn run_job(&self, job: Job) {
        tracing::info!(job_id = %job.id, job_type = %job.job_type, attempt = job.attempts, "job started");
        let _ = self
            .beat(
                &job.id,
                &Progress {
                    current_task: "running".into(),
                    percent: 0.0,
                    ..Default::default()
                },
            )
            .await;
        let outcome = match JobType::parse(&job.job_type) {
            Some(JobType::CopyImageInRegion) => self.run_copy(&job).await,
            Some(JobType::AddImageMembers) => self.run_add_members(&job).await,
            Some(JobType::DelImageMembers) => self.run_del_members(&job).await,
            Some(JobType::UpdateImageMembers) => self.run_update_members(&job).await,
            Some(JobType::ImportImage | JobType::ImportDataImage | JobType::NativeImport) => {
                self.run_import(&job).await
            }
            Some(JobType::NativeExport) => self.run_export(&job).await,
            Some(JobType::CrossRegionCopy) => self.run_cross_region(&job).await,
            None => Err(CoreError::Internal(format!(
                "unknown job type {}",
                job.job_type
            ))),
        };
        let result = match &outcome {
            Ok(r) => Ok(r.clone()),
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "job failed");
                Err(failure_of(e))
            }
        };
        match self.db.finish_job(&job.id, &self.node_id, result).await {
            Ok(true) => tracing::info!(job_id = %job.id, ok = outcome.is_ok(), "job finished"),
            Ok(false) => tracing::warn!(job_id = %job.id, "job lease was lost before it finished"),
            Err(e) => tracing::error!(job_id = %job.id, error = %e, "recording a job's end failed"),
        }
    }

    /// One garbage-collection pass: data nothing references, older than the grace period and
    /// than every open job and upload ([`Db::gc_inputs`](crate::db::Db)).
    ///
    /// With several nodes on one database only one collects at a time (cluster lease
    /// [`crate::cluster::GC_LEASE`]); `None` when another node holds it.
    pub async fn collect_garbage(
        &self,
        grace: Duration,
    ) -> Result<Option<openims_store::GcReport>> {
        let holder = format!("{}:gc", self.node_id);
        // Short and renewed while the pass runs, so a node that dies mid-pass blocks GC on
        // the others for one lease at most.
        let lease_ms = (self.config.job_lease_ms * 3).max(10_000);
        if !self
            .db
            .try_lease(crate::cluster::GC_LEASE, &holder, lease_ms)
            .await?
        {
            return Ok(None);
        }
        let renew = {
            let db = self.db.clone();
            let holder = holder.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(lease_ms as u64 / 3)).await;
                    if let Err(e) = db
                        .try_lease(crate::cluster::GC_LEASE, &holder, lease_ms)
                        .await
                    {
                        tracing::warn!(error = %e, "renewing the GC lease failed");
                    }
                }
            })
        };
        let r = async {
            let (live, grace) = self.db.gc_inputs(grace).await?;
            let data = self.data.clone();
            tokio::task::spawn_blocking(move || data.gc(&live, grace))
                .await
                .map_err(|e| CoreError::Internal(format!("gc task failed: {e}")))?
        }
        .await;
        renew.abort();
        self.db
            .release_lease(crate::cluster::GC_LEASE, &holder)
            .await?;
        r.map(Some)
    }

    /// Collects garbage every `gc_interval_secs` until `shutdown` fires.
    pub fn spawn_gc(
        self: &Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.config.gc_interval_secs;
        if every == 0 {
            return None;
        }
        let svc = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(every)) => {}
                }
                match svc
                    .collect_garbage(Duration::from_secs(svc.config.gc_grace_secs))
                    .await
                {
                    Ok(None) => tracing::info!("garbage collection runs on another node"),
                    Ok(Some(r)) => tracing::info!(
                        chunks_deleted = r.chunks_deleted,
                        bytes_freed = r.chunk_bytes_freed + r.manifest_bytes_freed,
                        "garbage collected"
                    ),
                    Err(e) => tracing::error!(error = %e, "garbage collection failed"),
                }
            }
        }))
    }

    /// Validates an OS version string (for list filters and creation).
    pub fn os_version_known(v: &str) -> bool {
        find_os_version(v).is_some()
    }

    /// The owner project of an image id, if it exists (for diagnostics in admin tools).
    pub async fn image_owner(&self, id: &ImageId) -> Result<Option<ProjectId>> {
        Ok(self.db.get_image(id).await?.map(|i| i.owner))
    }
}

/// A stable id for this node, kept in the data directory.
fn node_id(config: &ServiceConfig) -> Result<String> {
    let path = config.data_dir.join("node-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    std::fs::write(&path, &id)?;
    Ok(id)
}

/// The job of an in-region copy of `src` into the new image `new_id`: its parameters are the
/// request's plus `extra` (the mode, and what an encrypting copy needs).
fn copy_job<'a>(
    caller: &'a Caller,
    src: ImageId,
    new_id: ImageId,
    req: &CopyRequest,
    extra: Value,
) -> NewJob<'a> {
    let mut params = json!({
        "source_image_id": src.to_string(),
        "new_image_id": new_id.to_string(),
        "name": req.name,
        "description": req.description,
    });
    if let (Some(p), Value::Object(extra)) = (params.as_object_mut(), extra) {
        p.extend(extra);
    }
    NewJob {
        project_id: &caller.project_id,
        job_type: JobType::CopyImageInRegion,
        params,
        image_id: Some(new_id.to_string()),
        image_name: Some(req.name.clone()),
    }
}

/// The row of an in-region copy of `src` owned by `owner`: a new private image with the
/// source's data (manifests) and attributes, and the copy's own name, description and key.
fn copied_image(
    src: &Image,
    id: ImageId,
    owner: &ProjectId,
    name: &str,
    description: Option<&str>,
    key: Option<&ImageKey>,
) -> Image {
    let mut img = src.clone();
    img.access = Access::Owner;
    img.shared_out = false;
    img.id = id;
    img.owner = owner.clone();
    img.name = Some(name.to_string());
    img.origin = Origin::Copy;
    img.protected = false;
    img.visibility = "private".into();
    img.tags = Vec::new();
    let now = crate::time::now_ms();
    img.created_at = now;
    img.updated_at = now;
    img.active_at = Some(now);
    img.properties
        .insert("__originalimagename".into(), json!(src.id.to_string()));
    img.properties
        .insert("__data_origin".into(), json!(format!("image,{}", src.id)));
    img.properties
        .insert("__imagetype".into(), json!("private"));
    img.properties.insert(
        "__description".into(),
        json!(description.unwrap_or_default()),
    );
    match key.and_then(|k| k.cmk_id.clone()) {
        Some(cmk) => {
            img.properties.insert("__system__cmkid".into(), json!(cmk));
        }
        None => {
            img.properties.remove("__system__cmkid");
        }
    }
    img
}
