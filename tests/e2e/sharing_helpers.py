"""Helpers of the sharing tests (S7): more projects in an existing domain, member calls with
the official SDK, listings of shared images, direct database fixtures for states no API can
create (public images, full-ECS images, service default keys, hundreds of projects)."""

from __future__ import annotations

import secrets
import time

from huaweicloudsdkims.v2 import (
    BatchAddMembersRequest, BatchAddMembersRequestBody, BatchDeleteMembersRequest, BatchUpdateMembersRequest,
    BatchUpdateMembersRequestBody,
)

from helpers import HEX32, Tenant, admin, describe, wait_job

JSON_UTF8 = "application/json;charset=utf-8"


def make_project_in(t: Tenant, prefix: str = "p") -> Tenant:
    """A new project (with its own user and AK/SK) in the domain of tenant `t`."""
    srv = t.server
    sfx = secrets.token_hex(4)
    proj = admin(srv.data_dir, "project", "create", f"{prefix}proj{sfx}", "--domain", t.domain, binary=srv.binary)
    pw = "Pw-" + secrets.token_urlsafe(12)
    user = admin(srv.data_dir, "user", "create", f"{prefix}user{sfx}", "--domain", t.domain, "--password", pw,
                 binary=srv.binary)
    admin(srv.data_dir, "user", "grant", user["name"], "--project", proj["id"], "--domain", t.domain,
          binary=srv.binary)
    key = admin(srv.data_dir, "key", "create", "--project", proj["id"], "--user", user["name"], "--domain", t.domain,
                binary=srv.binary)
    assert HEX32.match(proj["id"]), proj
    return Tenant(server=srv, domain=t.domain, domain_id=t.domain_id, project=proj["name"], project_id=proj["id"],
                  user=user["name"], password=pw, ak=key["access_key"], sk=key["secret_key"])


def add_members(owner: Tenant, images, projects=None, domains=None):
    """batch_add_members with the SDK; waits for the job and returns it."""
    body = BatchAddMembersRequestBody(images=list(images), projects=projects, domains=domains)
    job_id = owner.ims.batch_add_members(BatchAddMembersRequest(body=body)).job_id
    return wait_job(owner.ims, job_id)


def remove_members(owner: Tenant, images, projects=None, domains=None):
    body = BatchAddMembersRequestBody(images=list(images), projects=projects, domains=domains)
    job_id = owner.ims.batch_delete_members(BatchDeleteMembersRequest(body=body)).job_id
    return wait_job(owner.ims, job_id)


def answer(recipient: Tenant, images, status: str):
    """batch_update_members (the recipient's answer) with the SDK; waits for the job."""
    body = BatchUpdateMembersRequestBody(images=list(images), project_id=recipient.project_id, status=status)
    job_id = recipient.ims.batch_update_members(BatchUpdateMembersRequest(body=body)).job_id
    return wait_job(recipient.ims, job_id)


def job_ok(job):
    assert job.status == "SUCCESS", job
    for r in job.entities.results or []:
        assert r.status == "success", job
    return job


def shared_ids(t: Tenant, member_status: str | None = None) -> set:
    """Ids from GET /v2/cloudimages?__imagetype=shared[&member_status=...]."""
    q = {"__imagetype": "shared"}
    if member_status:
        q["member_status"] = member_status
    r = t.raw.get("/v2/cloudimages", query=q)
    assert r.status_code == 200, describe(r)
    return {i["id"] for i in r.json()["images"]}


def glance_shared_ids(t: Tenant, member_status: str) -> set:
    r = t.raw.get("/v2/images", query={"visibility": "shared", "member_status": member_status, "limit": 1000})
    assert r.status_code == 200, describe(r)
    return {i["id"] for i in r.json()["images"]}


def default_ids(t: Tenant) -> set:
    r = t.raw.get("/v2/cloudimages")
    assert r.status_code == 200, describe(r)
    return {i["id"] for i in r.json()["images"]}


def copy_job(t: Tenant, image_id: str, name: str, cmk_id=None):
    """POST /v1/cloudimages/{id}/copy with the raw client: (response, finished job or None)."""
    body = {"name": name, "description": "shared copy"}
    if cmk_id:
        body["cmk_id"] = cmk_id
    r = t.raw.post(f"/v1/cloudimages/{image_id}/copy", json_body=body)
    if r.status_code != 200:
        return r, None
    return r, wait_job(t.ims, r.json()["job_id"], timeout=120)


def db_exec(t: Tenant, sql: str, *params) -> None:
    """Runs one statement on the tenant's server's metadata database (SQLite or PostgreSQL)."""
    t.server.sql(sql, *params)


def insert_projects(t: Tenant, n: int) -> list:
    """`n` projects in tenant `t`'s domain, inserted directly (the admin CLI would take a process
    per project); they are ordinary projects for the service."""
    ids = [secrets.token_hex(16) for _ in range(n)]
    now = int(time.time() * 1000)
    values = ", ".join("(?, ?, ?, ?)" for _ in ids)
    params = [v for i in ids for v in (i, t.domain_id, f"bulk-{i[:12]}", now)]
    t.server.sql(f"INSERT INTO projects (id, domain_id, name, created_at) VALUES {values}", *params)
    return ids
