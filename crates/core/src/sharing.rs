//! Sharing operations (spec A.5, B.5, C.6): the owner adds and removes members, the recipient
//! accepts or rejects, both list and show members. The batch IMS operations are jobs whose
//! `results` carry one outcome per (image, member); whatever can be checked at once (body,
//! ownership, sharing with yourself, public images, limits) is refused synchronously.

use crate::error::{CoreError, Result};
use crate::identity::Caller;
use crate::ids::{is_hex_id, ImageId, JobId};
use crate::image::{Image, Origin};
use crate::jobs::{insert_job, Job, JobType, NewJob};
use crate::members::{
    Access, Added, Member, MemberStatus, MemberType, Need, Recipient, MAX_MEMBERS,
    MAX_WHOLE_MEMBERS,
};
use crate::service::Service;
use crate::time::now_ms;
use serde_json::{json, Value};

/// The recipients of a batch add or delete.
#[derive(Debug, Clone, Default)]
pub struct MemberTargets {
    /// Project ids.
    pub projects: Vec<String>,
    /// Domain (account) ids: every project of the domain.
    pub domains: Vec<String>,
}

impl MemberTargets {
    /// `(member id, type)` pairs, without duplicates, in request order.
    fn members(&self) -> Vec<(String, MemberType)> {
        let mut out: Vec<(String, MemberType)> = Vec::new();
        for (ids, t) in [
            (&self.projects, MemberType::Project),
            (&self.domains, MemberType::Domain),
        ] {
            for id in ids {
                if !out.iter().any(|(m, _)| m == id) {
                    out.push((id.clone(), t));
                }
            }
        }
        out
    }
}

/// The member limit of an image (spec C.6): 10 for full-ECS images, 256 otherwise.
pub fn member_limit(img: &Image) -> usize {
    if img.origin == Origin::Whole {
        MAX_WHOLE_MEMBERS
    } else {
        MAX_MEMBERS
    }
}

/// The `error_code` a failed member outcome shows.
fn member_code(e: &CoreError) -> &'static str {
    match e {
        CoreError::ImageNotFound(_) => "IMG.0027",
        CoreError::MemberLimit(_) => "IMG.0088",
        CoreError::KeyNotGranted(_) => "IMG.0099",
        CoreError::EncryptedNotShareable => "IMG.0098",
        CoreError::UnknownMember(_) => "IMG.0145",
        CoreError::ShareWithSelf => "IMG.0076",
        CoreError::NotOwner => "IMG.0047",
        CoreError::OwnedByOther => "IMG.0106",
        CoreError::PublicNotShareable => "IMG.0089",
        _ => "IMG.1075",
    }
}

fn param_list(p: &Value, key: &str) -> Vec<String> {
    p.get(key)
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Per-member outcomes of a member job.
struct Outcomes {
    results: Vec<Value>,
    failed: Vec<&'static str>,
}

impl Outcomes {
    fn new() -> Self {
        Outcomes {
            results: Vec::new(),
            failed: Vec::new(),
        }
    }
    fn push(&mut self, image: &str, member: &str, t: MemberType, outcome: Result<()>) {
        let mut r = json!({"image_id": image, "project_id": member, "status": "success"});
        if t == MemberType::Domain {
            r["member_type"] = json!("domain");
        }
        if let Err(e) = outcome {
            let code = member_code(&e);
            r["status"] = json!("failed");
            r["error_code"] = json!(code);
            r["error_msg"] = json!(e.to_string());
            self.failed.push(code);
        }
        self.results.push(r);
    }
}

impl Service {
    /// An image the caller owns, for member management: a recipient trying to manage (or
    /// re-share) gets IMG.0106, anyone else `ImageNotFound`.
    async fn image_to_share(&self, caller: &Caller, id: &str) -> Result<Image> {
        self.visible_image(caller, id, Need::Manage)
            .await
            .map_err(|e| match e {
                CoreError::NotOwner => CoreError::OwnedByOther,
                e => e,
            })
    }

    /// The rules on the image itself (spec C.6): not public; not encrypted with a default key
    /// (IMG.0098); a custom key must still exist (IMG.0101).
    async fn check_shareable(&self, img: &Image) -> Result<()> {
        if img.visibility == "public" || img.prop("__imagetype") == Some("gold") {
            return Err(CoreError::PublicNotShareable);
        }
        if let Some(cmk) = self.image_cmk(img).await? {
            match self.db.kms_key(&cmk).await? {
                Some(k) if k.is_deleted(now_ms()) => return Err(CoreError::SourceKeyNotFound(cmk)),
                Some(k) if k.is_default() => return Err(CoreError::EncryptedNotShareable),
                Some(_) => {}
                None => return Err(CoreError::SourceKeyNotFound(cmk)),
            }
        }
        Ok(())
    }

    /// The master key of an encrypted image (`None` for unencrypted images, including those
    /// whose data the service keeps encrypted under its root key).
    pub async fn image_cmk(&self, img: &Image) -> Result<Option<String>> {
        Ok(self
            .db
            .image_key(&img.id.to_string())
            .await?
            .and_then(|k| k.cmk_id))
    }

    /// Checks one recipient when the member is added: it exists, is not the owner, and may
    /// decrypt the image when it is encrypted: the image's custom key is granted (with
    /// `decrypt-datakey`) to the recipient project, or to its domain for a domain member
    /// (IMG.0099 otherwise).
    async fn check_recipient(
        &self,
        img: &Image,
        member: &str,
        t: MemberType,
        owner_domain: &str,
    ) -> Result<()> {
        match t {
            MemberType::Project => {
                if member == img.owner.as_str() {
                    return Err(CoreError::ShareWithSelf);
                }
                let Some(p) = self.db.project_by_id(member).await? else {
                    return Err(CoreError::UnknownMember(member.to_string()));
                };
                if let Some(cmk) = self.image_cmk(img).await? {
                    if !self
                        .key_granted_to(&cmk, &[member, p.domain_id.as_str()])
                        .await?
                    {
                        return Err(CoreError::KeyNotGranted(cmk));
                    }
                }
            }
            MemberType::Domain => {
                if member == owner_domain {
                    return Err(CoreError::ShareWithSelf);
                }
                if !self.db.domain_exists(member).await? {
                    return Err(CoreError::UnknownMember(member.to_string()));
                }
                if let Some(cmk) = self.image_cmk(img).await? {
                    if !self.key_granted_to(&cmk, &[member]).await? {
                        return Err(CoreError::KeyNotGranted(cmk));
                    }
                }
            }
        }
        Ok(())
    }

    /// True if master key `cmk` has a grant with `decrypt-datakey` to one of `principals`.
    async fn key_granted_to(&self, cmk: &str, principals: &[&str]) -> Result<bool> {
        Ok(self.db.kms_grants(cmk).await?.iter().any(|g| {
            principals.contains(&g.grantee_principal.as_str())
                && g.operations.iter().any(|o| o == "decrypt-datakey")
        }))
    }

    /// The shared-source rules of in-region replication (spec C.1, C.3), applied before the
    /// copy key rules (`plan_copy_keys`): `src` was loaded for `Need::Use`, so a pending or
    /// rejected share has already answered IMG.0196. A recipient copying an image encrypted
    /// with the owner's key must re-key it into a key of its own project: without `cmk_id`
    /// IMG.0197, with a key of another project IMG.0099.
    pub async fn check_shared_copy(
        &self,
        caller: &Caller,
        src: &Image,
        cmk_id: Option<&str>,
    ) -> Result<()> {
        if matches!(src.access, Access::Owner) {
            return Ok(());
        }
        if self.image_cmk(src).await?.is_none() {
            return Ok(());
        }
        let Some(target) = cmk_id.map(str::trim).filter(|k| !k.is_empty()) else {
            return Err(CoreError::EncryptedSharedCopy);
        };
        match self.db.kms_key(target).await? {
            Some(k) if k.project_id != caller.project_id.as_str() => {
                Err(CoreError::KmsNoPermission(format!(
                    "{target}: a shared image is re-keyed into a key of your own project"
                )))
            }
            // Missing, deleted or disabled keys answer from plan_copy_keys.
            _ => Ok(()),
        }
    }

    /// IMS batch_add_members: checks synchronously, then queues `imsAddImageMembersJob`.
    pub async fn add_members(
        &self,
        caller: &Caller,
        images: &[String],
        targets: &MemberTargets,
    ) -> Result<JobId> {
        let members = targets.members();
        if images.is_empty() {
            return Err(CoreError::InvalidRequest("images must not be empty".into()));
        }
        if members.is_empty() {
            return Err(CoreError::InvalidRequest(
                "at least one of projects or domains must name a recipient".into(),
            ));
        }
        for (m, t) in &members {
            if !is_hex_id(m) {
                return Err(CoreError::InvalidRequest(format!(
                    "{m:?} is not a {} id (32 lowercase hex characters)",
                    t.as_str()
                )));
            }
        }
        let me = self.recipient(caller).await?;
        if members
            .iter()
            .any(|(m, _)| m == me.project.as_str() || m == me.domain.as_str())
        {
            return Err(CoreError::ShareWithSelf);
        }
        for id in images {
            let img = self.image_to_share(caller, id).await?;
            self.check_shareable(&img).await?;
            let existing = self.db.members(&img.id).await?;
            let new = members
                .iter()
                .filter(|(m, _)| !existing.iter().any(|e| e.member_id == *m))
                .count();
            let limit = member_limit(&img);
            if existing.len() + new > limit {
                return Err(CoreError::MemberLimit(limit));
            }
        }
        self.queue_member_job(
            caller,
            JobType::AddImageMembers,
            json!({"images": images, "projects": targets.projects, "domains": targets.domains}),
        )
        .await
    }

    /// IMS batch_delete_members: checks ownership synchronously, then queues
    /// `imsDelImageMembersJob`.
    pub async fn remove_members(
        &self,
        caller: &Caller,
        images: &[String],
        targets: &MemberTargets,
    ) -> Result<JobId> {
        if images.is_empty() || targets.members().is_empty() {
            return Err(CoreError::InvalidRequest(
                "images and at least one of projects or domains are required".into(),
            ));
        }
        for id in images {
            self.image_to_share(caller, id).await?;
        }
        self.queue_member_job(
            caller,
            JobType::DelImageMembers,
            json!({"images": images, "projects": targets.projects, "domains": targets.domains}),
        )
        .await
    }

    /// IMS batch_update_members (the recipient's answer): `project_id` must be the caller's
    /// own project; the per-image outcome is in the job's results.
    pub async fn answer_members(
        &self,
        caller: &Caller,
        images: &[String],
        project_id: &str,
        status: MemberStatus,
    ) -> Result<JobId> {
        if project_id != caller.project_id.as_str() {
            return Err(CoreError::Forbidden(format!(
                "Only project {project_id} can answer a share addressed to it."
            )));
        }
        if status == MemberStatus::Pending {
            return Err(CoreError::InvalidRequest(
                "status must be accepted or rejected".into(),
            ));
        }
        if images.is_empty() {
            return Err(CoreError::InvalidRequest("images must not be empty".into()));
        }
        for id in images {
            if ImageId::parse(id).is_none() {
                return Err(CoreError::InvalidRequest(format!(
                    "{id:?} is not an image id"
                )));
            }
        }
        self.queue_member_job(
            caller,
            JobType::UpdateImageMembers,
            json!({"images": images, "project_id": project_id, "status": status.as_str()}),
        )
        .await
    }

    async fn queue_member_job(
        &self,
        caller: &Caller,
        job_type: JobType,
        params: Value,
    ) -> Result<JobId> {
        let mut tx = crate::db::begin_write(&self.db.pool).await?;
        let id = insert_job(
            &mut tx,
            NewJob {
                project_id: &caller.project_id,
                job_type,
                params,
                image_id: None,
                image_name: None,
            },
        )
        .await?;
        tx.commit().await?;
        self.job_ready.notify_one();
        Ok(id)
    }

    /// Ends a member job: results recorded, FAIL (with the first failure's code) if any
    /// member failed.
    async fn finish_members(&self, job: &Job, o: Outcomes) -> Result<Option<Value>> {
        let results = Value::Array(o.results);
        self.db
            .record_results(&job.id, &self.node_id, &results)
            .await?;
        match o.failed.first() {
            None => Ok(Some(results)),
            Some(code) => Err(CoreError::MemberJobFailed {
                code,
                failed: o.failed.len(),
                total: results.as_array().map_or(0, |a| a.len()),
            }),
        }
    }

    /// The owner of a job's images, re-checked when the job runs.
    async fn job_owned_image(&self, job: &Job, id: &str) -> Result<Image> {
        let iid = ImageId::parse(id).ok_or_else(|| CoreError::ImageNotFound(id.to_string()))?;
        match self.db.get_image(&iid).await? {
            Some(img) if img.owner == job.project_id => Ok(img),
            _ => Err(CoreError::ImageNotFound(id.to_string())),
        }
    }

    pub(crate) async fn run_add_members(&self, job: &Job) -> Result<Option<Value>> {
        let targets = MemberTargets {
            projects: param_list(&job.params, "projects"),
            domains: param_list(&job.params, "domains"),
        };
        let owner_domain = self
            .db
            .project_domain(&job.project_id)
            .await?
            .map(|d| d.0)
            .unwrap_or_default();
        let mut o = Outcomes::new();
        for id in param_list(&job.params, "images") {
            let img = self.job_owned_image(job, &id).await;
            for (m, t) in targets.members() {
                let outcome = match &img {
                    Err(_) => Err(CoreError::ImageNotFound(id.clone())),
                    Ok(img) => {
                        async {
                            self.check_shareable(img).await?;
                            self.check_recipient(img, &m, t, &owner_domain).await?;
                            match self.db.add_member(&img.id, &m, t, member_limit(img)).await {
                                Ok(Added::New(_) | Added::Existing(_))
                                | Err(CoreError::MemberExists(_)) => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                        .await
                    }
                };
                o.push(&id, &m, t, outcome);
            }
        }
        self.finish_members(job, o).await
    }

    pub(crate) async fn run_del_members(&self, job: &Job) -> Result<Option<Value>> {
        let targets = MemberTargets {
            projects: param_list(&job.params, "projects"),
            domains: param_list(&job.params, "domains"),
        };
        let mut o = Outcomes::new();
        for id in param_list(&job.params, "images") {
            let img = self.job_owned_image(job, &id).await;
            for (m, t) in targets.members() {
                // Removing a member that is not (or no longer) one is a success: the goal,
                // "this recipient has no access", holds, and a resumed job stays idempotent.
                let outcome = match &img {
                    Err(_) => Err(CoreError::ImageNotFound(id.clone())),
                    Ok(img) => self.db.remove_member(&img.id, &m).await.map(|_| ()),
                };
                o.push(&id, &m, t, outcome);
            }
        }
        self.finish_members(job, o).await
    }

    pub(crate) async fn run_update_members(&self, job: &Job) -> Result<Option<Value>> {
        let status = job
            .params
            .get("status")
            .and_then(|s| s.as_str())
            .and_then(MemberStatus::parse)
            .ok_or_else(|| CoreError::Internal("member job without status".into()))?;
        let domain = self
            .db
            .project_domain(&job.project_id)
            .await?
            .ok_or_else(|| CoreError::Internal("job of a deleted project".into()))?;
        let r = Recipient {
            project: job.project_id.clone(),
            domain,
        };
        let mut o = Outcomes::new();
        for id in param_list(&job.params, "images") {
            let outcome = self.answer_one(&r, &id, status).await.map(|_| ());
            o.push(&id, r.project.as_str(), MemberType::Project, outcome);
        }
        self.finish_members(job, o).await
    }

    /// Records `r`'s answer for one image; `ImageNotFound` unless the image is shared with
    /// `r` (an image not shared with the caller looks like no image at all).
    async fn answer_one(&self, r: &Recipient, id: &str, status: MemberStatus) -> Result<Member> {
        let nf = || CoreError::ImageNotFound(id.to_string());
        let iid = ImageId::parse(id).ok_or_else(nf)?;
        let img = self.db.get_image(&iid).await?.ok_or_else(nf)?;
        if img.owner == r.project {
            return Err(nf());
        }
        let (via, _) = self.db.membership(&iid, r).await?.ok_or_else(nf)?;
        if !self.db.answer_share(&via, r, status).await? {
            return Err(nf());
        }
        let (via, now) = self.db.membership(&iid, r).await?.ok_or_else(nf)?;
        Ok(own_view(&via, r, now))
    }

    // ---- Glance and IMS synchronous member operations ----------------------------------

    /// Glance `POST /v2/images/{id}/members`: adds one project (or domain) at once.
    pub async fn add_member_now(&self, caller: &Caller, id: &str, member: &str) -> Result<Member> {
        let img = self.image_to_share(caller, id).await?;
        self.check_shareable(&img).await?;
        if !is_hex_id(member) {
            return Err(CoreError::UnknownMember(member.to_string()));
        }
        let me = self.recipient(caller).await?;
        if member == me.project.as_str() || member == me.domain.as_str() {
            return Err(CoreError::ShareWithSelf);
        }
        let t = if self.db.project_by_id(member).await?.is_some() {
            MemberType::Project
        } else if self.db.domain_exists(member).await? {
            MemberType::Domain
        } else {
            return Err(CoreError::UnknownMember(member.to_string()));
        };
        self.check_recipient(&img, member, t, me.domain.as_str())
            .await?;
        match self
            .db
            .add_member(&img.id, member, t, member_limit(&img))
            .await?
        {
            Added::New(m) => Ok(m),
            Added::Existing(_) => Err(CoreError::MemberExists(member.to_string())),
        }
    }

    /// Glance `DELETE /v2/images/{id}/members/{member}`.
    pub async fn remove_member_now(&self, caller: &Caller, id: &str, member: &str) -> Result<()> {
        let img = self.image_to_share(caller, id).await?;
        if !self.db.remove_member(&img.id, member).await? {
            return Err(CoreError::MemberNotFound(member.to_string()));
        }
        Ok(())
    }

    /// Members as the caller may see them: the owner sees every member; a recipient sees
    /// only itself (its project, with its own answer); anyone else `ImageNotFound`.
    pub async fn list_members(&self, caller: &Caller, id: &str) -> Result<Vec<Member>> {
        let img = self.readable_image(caller, id).await?;
        match img.access {
            Access::Owner => self.db.members(&img.id).await,
            Access::Member(_) => {
                let r = self.recipient(caller).await?;
                Ok(self
                    .db
                    .membership(&img.id, &r)
                    .await?
                    .map(|(via, s)| own_view(&via, &r, s))
                    .into_iter()
                    .collect())
            }
        }
    }

    /// One member: the owner may show any; a recipient only itself.
    pub async fn show_member(&self, caller: &Caller, id: &str, member: &str) -> Result<Member> {
        self.list_members(caller, id)
            .await?
            .into_iter()
            .find(|m| m.member_id == member)
            .ok_or_else(|| CoreError::MemberNotFound(member.to_string()))
    }

    /// Glance `PUT /v2/images/{id}/members/{member}`: only the member itself answers.
    pub async fn answer_member_now(
        &self,
        caller: &Caller,
        id: &str,
        member: &str,
        status: MemberStatus,
    ) -> Result<Member> {
        let img = self.readable_image(caller, id).await?;
        if img.access == Access::Owner {
            return Err(CoreError::Forbidden(
                "The image owner cannot change a member's status; only the member can.".into(),
            ));
        }
        if member != caller.project_id.as_str() {
            return Err(CoreError::Forbidden(format!(
                "Only project {member} can answer a share addressed to it."
            )));
        }
        if status == MemberStatus::Pending {
            return Err(CoreError::InvalidRequest(
                "status must be accepted or rejected".into(),
            ));
        }
        let r = self.recipient(caller).await?;
        self.answer_one(&r, id, status).await
    }
}

/// A recipient's own membership: its project id, the type of the row that reaches it, and
/// its own answer.
fn own_view(via: &Member, r: &Recipient, status: MemberStatus) -> Member {
    Member {
        image_id: via.image_id.clone(),
        member_id: r.project.to_string(),
        member_type: via.member_type,
        status,
        created_at: via.created_at,
        updated_at: via.updated_at,
    }
}
