"""Sharing images between projects (S7; spec A.5, B.5, C.6), driven with `huaweicloudsdkims`
and `openstacksdk`: share -> pending -> accept -> use (download) -> replicate -> owner removes
-> access gone; reject and re-accept; domain-wide shares; encrypted images and KMS grants;
owner deletion; quotas.

Projects: A (owner) and A2 in one domain, B and B2 in another (made per test)."""

import hashlib

import openstack
import pytest
from huaweicloudsdkims.v2 import (
    GlanceAddImageMemberRequest, GlanceAddImageMemberRequestBody, GlanceListImageMembersRequest,
    GlanceShowImageMemberRequest, GlanceUpdateImageMemberRequest, GlanceUpdateImageMemberRequestBody,
    ListImageMembersRequest, ListImagesRequest, ShowImageMemberRequest, ShowImageQuotaRequest,
)
from huaweicloudsdkkms.v2 import (
    CancelGrantRequest, CreateGrantRequest, CreateGrantRequestBody, RevokeGrantRequestBody,
)

from helpers import describe, error_code, glance_show, make_active_image, unique
from sharing_helpers import (
    add_members, answer, copy_job, db_exec, default_ids, glance_shared_ids, job_ok, make_project_in,
    remove_members, shared_ids,
)
from test_kms_copy import create_key, kms_client


def download(t, image_id):
    return t.raw.get(f"/v2/images/{image_id}/file")


def assert_code(r, status, code):
    assert r.status_code == status and error_code(r) == code, describe(r)


def os_conn_of(t):
    return openstack.connection.Connection(
        auth_url=t.endpoint + "/v3", username=t.user, password=t.password, project_name=t.project,
        user_domain_name=t.domain, project_domain_name=t.domain, identity_api_version="3",
        image_api_version="2", api_timeout=60)


@pytest.fixture
def image_a(tenant):
    return make_active_image(tenant.raw, name=unique("to-share"))


def test_share_pending_accept_use_replicate_remove(tenant, tenant_b, image_a):
    a, b, iid, data = tenant, tenant_b, image_a["id"], image_a["_data"]
    job = job_ok(add_members(a, [iid], projects=[b.project_id]))
    assert job.job_type == "imsAddImageMembersJob"
    assert [(r.image_id, r.project_id, r.status) for r in job.entities.results] == [(iid, b.project_id, "success")]

    # Pending: listed only when asked for; metadata readable, data not.
    assert iid in shared_ids(b, "pending") and iid in glance_shared_ids(b, "pending")
    assert iid not in shared_ids(b) and iid not in default_ids(b)
    assert iid not in shared_ids(b, "accepted") and iid not in glance_shared_ids(b, "accepted")
    members = a.ims.list_image_members(ListImageMembersRequest(image_id=iid))
    assert [(m.member_id, m.status, m.member_type) for m in members.members] == [(b.project_id, "pending", "project")]
    assert members.schema == "/v2/schemas/members"
    shown = glance_show(b.raw, iid)
    assert shown["visibility"] == "shared" and shown["owner"] == a.project_id
    assert_code(download(b, iid), 403, "IMG.0196")
    r, _ = copy_job(b, iid, unique("early"))
    assert_code(r, 400, "IMG.0196")

    # Accept (recipient, SDK): listed by default and as accepted, usable.
    job = job_ok(answer(b, [iid], "accepted"))
    assert job.job_type == "imsUpdateImageMembersJob"
    assert iid in default_ids(b) and iid in shared_ids(b) and iid in shared_ids(b, "accepted")
    assert iid not in shared_ids(b, "pending")
    lst = b.ims.list_images(ListImagesRequest(imagetype="shared", member_status="accepted"))
    row = [i for i in lst.images if i.id == iid]
    assert row and row[0].imagetype == "shared", lst
    me = b.ims.show_image_member(ShowImageMemberRequest(image_id=iid, member_id=b.project_id))
    assert me.status == "accepted" and me.member_id == b.project_id
    r = download(b, iid)
    assert r.status_code == 200 and r.content == data, describe(r)

    # Replicate into B's own project: a private image of B with the same bytes.
    r, job = copy_job(b, iid, unique("mine"))
    assert job is not None and job.status == "SUCCESS", (describe(r), job)
    copy_id = job.entities.image_id
    mine = glance_show(b.raw, copy_id)
    assert mine["owner"] == b.project_id and mine["visibility"] == "private" and mine["status"] == "active"
    assert download(b, copy_id).content == data
    assert_code(a.raw.get(f"/v2/images/{copy_id}"), 404, "IMG.0027")  # the owner does not see B's copy

    # Quota: the shared image does not count for B; B's copy does.
    used = {x.type: x.used for x in b.ims.show_image_quota(ShowImageQuotaRequest()).quotas.resources}
    assert used["image"] == 1, used
    used_a = {x.type: x.used for x in a.ims.show_image_quota(ShowImageQuotaRequest()).quotas.resources}
    assert used_a["image_shared"] == 1 and used_a["image_member"] == 1, used_a

    # The owner removes B: access ends at once, B's own copy stays.
    job = job_ok(remove_members(a, [iid], projects=[b.project_id]))
    assert job.job_type == "imsDelImageMembersJob"
    assert_code(b.raw.get(f"/v2/images/{iid}"), 404, "IMG.0027")
    assert_code(download(b, iid), 404, "IMG.0027")
    assert iid not in default_ids(b) | shared_ids(b) | shared_ids(b, "pending") | shared_ids(b, "rejected")
    r, _ = copy_job(b, iid, unique("late"))
    assert_code(r, 404, "IMG.0027")
    assert download(b, copy_id).content == data
    assert a.ims.list_image_members(ListImageMembersRequest(image_id=iid)).members == []


def test_reject_and_reaccept_with_openstacksdk(tenant, tenant_b, image_a):
    a, b, iid = tenant, tenant_b, image_a["id"]
    ca, cb = os_conn_of(a), os_conn_of(b)
    try:
        m = ca.image.add_member(iid, member=b.project_id)
        assert m.status == "pending"
        assert [x.status for x in ca.image.members(iid)] == ["pending"]
        pending = [i.id for i in cb.image.images(visibility="shared", member_status="pending")]
        assert iid in pending
        m = cb.image.update_member(b.project_id, iid, status="rejected")
        assert m.status == "rejected"
        assert iid in glance_shared_ids(b, "rejected") and iid not in glance_shared_ids(b, "pending")
        assert iid not in {i.id for i in cb.image.images()}  # rejected: hidden from the default list
        assert_code(download(b, iid), 403, "IMG.0196")
        # Re-accept while still shared.
        m = cb.image.update_member(b.project_id, iid, status="accepted")
        assert m.status == "accepted"
        assert iid in {i.id for i in cb.image.images()}
        assert cb.image.get_member(b.project_id, iid).status == "accepted"
        got = b"".join(cb.image.download_image(iid, stream=True).iter_content(1 << 16))
        assert hashlib.md5(got).hexdigest() == image_a["checksum"]
        # Accepted -> rejected -> accepted again with the IMS SDK (Glance member calls).
        r = b.ims.glance_update_image_member(GlanceUpdateImageMemberRequest(
            image_id=iid, member_id=b.project_id, body=GlanceUpdateImageMemberRequestBody(status="rejected")))
        assert r.status == "rejected"
        job_ok(answer(b, [iid], "accepted"))
        assert iid in shared_ids(b, "accepted")
        # The owner stops sharing: re-accepting is impossible.
        ca.image.remove_member(b.project_id, iid)
        r = b.raw.put(f"/v2/images/{iid}/members/{b.project_id}", json_body={"status": "accepted"})
        assert r.status_code == 404, describe(r)
        job = answer(b, [iid], "accepted")
        assert job.status == "FAIL" and job.entities.results[0].status == "failed", job
        assert iid not in shared_ids(b, "accepted")
    finally:
        ca.close()
        cb.close()


def test_glance_member_calls_with_the_ims_sdk(tenant, tenant_b, image_a):
    a, b, iid = tenant, tenant_b, image_a["id"]
    m = a.ims.glance_add_image_member(GlanceAddImageMemberRequest(
        image_id=iid, body=GlanceAddImageMemberRequestBody(member=b.project_id)))
    assert (m.member_id, m.status, m.image_id, m.schema) == (b.project_id, "pending", iid, "/v2/schemas/member")
    lst = a.ims.glance_list_image_members(GlanceListImageMembersRequest(image_id=iid))
    assert [x.member_id for x in lst.members] == [b.project_id]
    one = a.ims.glance_show_image_member(GlanceShowImageMemberRequest(image_id=iid, member_id=b.project_id))
    assert one.status == "pending"
    # The recipient sees only itself.
    lst_b = b.ims.glance_list_image_members(GlanceListImageMembersRequest(image_id=iid))
    assert [x.member_id for x in lst_b.members] == [b.project_id]
    r = a.raw.delete(f"/v2/images/{iid}/members/{b.project_id}")
    assert r.status_code == 204, describe(r)
    r = a.raw.delete(f"/v2/images/{iid}/members/{b.project_id}")
    assert r.status_code == 404, describe(r)


def test_domain_wide_share(tenant, tenant_b, image_a):
    a, b, iid = tenant, tenant_b, image_a["id"]
    b2 = make_project_in(b, "b2")      # same domain as B
    a2 = make_project_in(a, "a2")      # the owner's domain, not a member
    job = job_ok(add_members(a, [iid], domains=[b.domain_id]))
    assert job.entities.results[0].project_id == b.domain_id
    members = a.ims.list_image_members(ListImageMembersRequest(image_id=iid)).members
    assert [(m.member_id, m.member_type, m.status) for m in members] == [(b.domain_id, "domain", "pending")]
    # Every project of the domain sees it pending and answers for itself.
    for t in (b, b2):
        assert iid in shared_ids(t, "pending")
    assert iid not in shared_ids(a2, "pending") and iid not in default_ids(a2)
    assert_code(a2.raw.get(f"/v2/images/{iid}"), 404, "IMG.0027")
    job_ok(answer(b, [iid], "accepted"))
    assert iid in shared_ids(b, "accepted") and iid in shared_ids(b2, "pending")
    assert download(b, iid).content == image_a["_data"]
    assert_code(download(b2, iid), 403, "IMG.0196")
    job_ok(answer(b2, [iid], "rejected"))
    assert iid in shared_ids(b2, "rejected") and iid in shared_ids(b, "accepted")
    # A recipient sees only its own membership (its project id, its own answer).
    r = b2.raw.get(f"/v2/images/{iid}/members")
    assert [(m["member_id"], m["member_type"], m["status"]) for m in r.json()["members"]] == [
        (b2.project_id, "domain", "rejected")], describe(r)
    # An image shared with a domain cannot be deleted (spec C.6).
    r = a.raw.delete(f"/v2/images/{iid}")
    assert_code(r, 409, "IMG.9022")
    # Removing the domain ends every project's access.
    job_ok(remove_members(a, [iid], domains=[b.domain_id]))
    for t in (b, b2):
        assert_code(t.raw.get(f"/v2/images/{iid}"), 404, "IMG.0027")
        assert iid not in shared_ids(t, "accepted") | shared_ids(t, "rejected") | shared_ids(t, "pending")
    assert a.raw.delete(f"/v2/images/{iid}").status_code == 204


def test_owner_delete_removes_access_at_once(tenant, tenant_b, image_a):
    a, b, iid = tenant, tenant_b, image_a["id"]
    job_ok(add_members(a, [iid], projects=[b.project_id]))
    job_ok(answer(b, [iid], "accepted"))
    assert download(b, iid).status_code == 200
    # A member cannot delete the owner's image.
    assert_code(b.raw.delete(f"/v2/images/{iid}"), 403, "IMG.0092")
    assert a.raw.delete(f"/v2/images/{iid}").status_code == 204
    assert_code(b.raw.get(f"/v2/images/{iid}"), 404, "IMG.0027")
    assert_code(download(b, iid), 404, "IMG.0027")
    assert iid not in default_ids(b) | shared_ids(b, "accepted")


def grant(owner, key_id, grantee, ops=("decrypt-datakey", "describe-key")):
    return kms_client(owner).create_grant(CreateGrantRequest(body=CreateGrantRequestBody(
        key_id=key_id, grantee_principal=grantee, operations=list(ops), name=unique("g")))).grant_id


def test_encrypted_images_need_a_key_grant_and_are_rekeyed_by_the_recipient(tenant, tenant_b, image_a):
    a, b = tenant, tenant_b
    ka = create_key(a)
    r, job = copy_job(a, image_a["id"], unique("enc"), cmk_id=ka)
    assert job.status == "SUCCESS", job
    enc = job.entities.image_id
    assert glance_show(a.raw, enc)["__system__cmkid"] == ka
    # Key not granted to B: refused per member (batch job) and at once (Glance).
    job = add_members(a, [enc], projects=[b.project_id])
    assert job.status == "FAIL" and job.error_code == "IMG.0099", job
    assert [(x.project_id, x.status) for x in job.entities.results] == [(b.project_id, "failed")]
    assert_code(a.raw.post(f"/v2/images/{enc}/members", json_body={"member": b.project_id}), 400, "IMG.0099")
    assert enc not in shared_ids(b, "pending")
    # Granted: shareable, and B can read it once accepted.
    g = grant(a, ka, b.project_id)
    job_ok(add_members(a, [enc], projects=[b.project_id]))
    job_ok(answer(b, [enc], "accepted"))
    assert download(b, enc).content == image_a["_data"]
    # B replicates it: only into a key of its own (IMG.0197 without a key; IMG.0099 with A's key).
    r, _ = copy_job(b, enc, unique("nokey"))
    assert_code(r, 400, "IMG.0197")
    r, _ = copy_job(b, enc, unique("akey"), cmk_id=ka)
    assert_code(r, 400, "IMG.0099")
    kb = create_key(b)
    r, job = copy_job(b, enc, unique("rekeyed"), cmk_id=kb)
    assert job is not None and job.status == "SUCCESS", (describe(r), job)
    mine = job.entities.image_id
    shown = glance_show(b.raw, mine)
    assert shown["__system__cmkid"] == kb and shown["owner"] == b.project_id and shown["visibility"] == "private"
    assert download(b, mine).content == image_a["_data"]
    # The owner withdraws the grant: the shared image becomes unusable for B, B's copy does not.
    kms_client(a).cancel_grant(CancelGrantRequest(body=RevokeGrantRequestBody(key_id=ka, grant_id=g)))
    assert_code(download(b, enc), 400, "IMG.0103")
    assert download(b, mine).content == image_a["_data"]


def test_default_key_images_are_never_shared(tenant, tenant_b, image_a):
    a, b = tenant, tenant_b
    k = create_key(a)
    r, job = copy_job(a, image_a["id"], unique("enc"), cmk_id=k)
    assert job.status == "SUCCESS", job
    enc = job.entities.image_id
    grant(a, k, b.project_id)
    # The service's own default key of a project (alias "ims/default"): no API creates one, so
    # the key row is turned into it directly.
    db_exec(a, "UPDATE kms_keys SET alias = 'ims/default' WHERE id = ?", k)
    assert_code(a.raw.post(f"/v2/images/{enc}/members", json_body={"member": b.project_id}), 400, "IMG.0098")
    r = a.raw.post("/v1/cloudimages/members", json_body={"images": [enc], "projects": [b.project_id]})
    assert_code(r, 400, "IMG.0098")
    assert a.raw.get(f"/v2/images/{enc}/members").json()["members"] == []


def test_concurrent_member_adds_and_answers(tenant, tenant_b, image_a):
    """Concurrent Glance adds on one image (SQLite write locks) never fail with 500, never pass
    the limit, and every member lands once; concurrent answers of a domain's projects too."""
    from concurrent.futures import ThreadPoolExecutor

    from sharing_helpers import insert_projects
    a, iid = tenant, image_a["id"]
    ids = insert_projects(a, 24)

    def add(pid):
        return a.raw.post(f"/v2/images/{iid}/members", json_body={"member": pid}).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(add, ids + ids[:8]))
    assert sorted(codes) == [200] * 24 + [409] * 8, codes
    got = a.raw.get(f"/v2/images/{iid}/members").json()["members"]
    assert sorted(m["member_id"] for m in got) == sorted(ids)
    # A domain share answered by several projects at once.
    img2 = make_active_image(a.raw, name=unique("dom"))["id"]
    projects = [tenant_b] + [make_project_in(tenant_b, f"c{i}") for i in range(3)]
    job_ok(add_members(a, [img2], domains=[tenant_b.domain_id]))

    def acc(t):
        return t.raw.put(f"/v2/images/{img2}/members/{t.project_id}", json_body={"status": "accepted"}).status_code

    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(acc, projects)) == [200] * 4
    for t in projects:
        assert img2 in shared_ids(t, "accepted")
