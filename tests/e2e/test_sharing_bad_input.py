"""Bad input to the sharing APIs gets the documented code and changes nothing: sharing with
yourself (IMG.0076), public images (IMG.0089), member limits (10 for full-ECS images, 256
otherwise: IMG.0088), owner-only management and no re-sharing (IMG.0047/0106/0092), unknown and
malformed member ids, malformed paging markers, answers addressed to someone else, bad bodies."""

import base64
import secrets

import pytest
from huaweicloudsdkcore.exceptions import exceptions as sdk_exc
from huaweicloudsdkims.v2 import BatchAddMembersRequest, BatchAddMembersRequestBody

from helpers import describe, error_code, make_active_image, unique
from sharing_helpers import (
    JSON_UTF8, add_members, answer, db_exec, insert_projects, job_ok, make_project_in, shared_ids,
)


def assert_code(r, status, code):
    assert r.status_code == status and error_code(r) == code, describe(r)


def members_of(t, iid):
    r = t.raw.get(f"/v2/images/{iid}/members")
    assert r.status_code == 200, describe(r)
    return [(m["member_id"], m["status"]) for m in r.json()["members"]]


@pytest.fixture
def img(tenant):
    return make_active_image(tenant.raw, name=unique("bad"))["id"]


def batch_add(t, body):
    return t.raw.post("/v1/cloudimages/members", json_body=body)


def test_not_with_yourself(tenant, img):
    a = tenant
    assert_code(batch_add(a, {"images": [img], "projects": [a.project_id]}), 400, "IMG.0076")
    assert_code(batch_add(a, {"images": [img], "domains": [a.domain_id]}), 400, "IMG.0076")
    assert_code(a.raw.post(f"/v2/images/{img}/members", json_body={"member": a.project_id}), 400, "IMG.0076")
    assert_code(a.raw.post(f"/v2/images/{img}/members", json_body={"member": a.domain_id}), 400, "IMG.0076")
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        a.ims.batch_add_members(BatchAddMembersRequest(body=BatchAddMembersRequestBody(
            images=[img], projects=[a.project_id])))
    assert e.value.status_code == 400 and e.value.error_code == "IMG.0076"
    assert members_of(a, img) == []


def test_public_images_cannot_be_shared(tenant, tenant_b, img):
    # No API makes an image public in this deployment: the row is changed directly.
    db_exec(tenant, "UPDATE images SET visibility = 'public' WHERE id = ?", img)
    assert_code(batch_add(tenant, {"images": [img], "projects": [tenant_b.project_id]}), 400, "IMG.0089")
    assert_code(tenant.raw.post(f"/v2/images/{img}/members", json_body={"member": tenant_b.project_id}),
                400, "IMG.0089")
    assert members_of(tenant, img) == []


def test_whole_images_take_at_most_10_members(tenant, img):
    db_exec(tenant, "UPDATE images SET origin = 'whole' WHERE id = ?", img)
    ids = insert_projects(tenant, 12)
    assert_code(batch_add(tenant, {"images": [img], "projects": ids[:11]}), 400, "IMG.0088")
    assert members_of(tenant, img) == []
    job = job_ok(add_members(tenant, [img], projects=ids[:10]))
    assert len(job.entities.results) == 10
    assert_code(batch_add(tenant, {"images": [img], "projects": [ids[10]]}), 400, "IMG.0088")
    assert_code(tenant.raw.post(f"/v2/images/{img}/members", json_body={"member": ids[11]}), 400, "IMG.0088")
    # Re-adding existing members is not a new member.
    job_ok(add_members(tenant, [img], projects=ids[:3]))
    assert len(members_of(tenant, img)) == 10


def test_256_members_then_refused_and_paged(tenant, img):
    ids = insert_projects(tenant, 258)
    job = job_ok(add_members(tenant, [img], projects=ids[:256]))
    assert len(job.entities.results) == 256
    assert_code(batch_add(tenant, {"images": [img], "projects": [ids[256]]}), 400, "IMG.0088")
    assert_code(tenant.raw.post(f"/v2/images/{img}/members", json_body={"member": ids[257]}), 400, "IMG.0088")
    # Paging (IMS and Glance): base64 markers, every member once, in order.
    for path in (f"/v1/{tenant.project_id}/cloudimages/{img}/members", f"/v2/images/{img}/members"):
        seen, marker, pages = [], None, 0
        while True:
            q = {"limit": 100}
            if marker:
                q["marker"] = marker
            r = tenant.raw.get(path, query=q)
            assert r.status_code == 200, describe(r)
            b = r.json()
            assert b["page_info"]["current_count"] == len(b["members"]) <= 100
            seen += [m["member_id"] for m in b["members"]]
            pages += 1
            marker = b["page_info"]["next_marker"]
            if not marker:
                break
            assert base64.b64decode(marker).decode() == seen[-1]
            assert pages < 10
        assert pages == 3 and len(seen) == 256 and set(seen) == set(ids[:256]), path
    assert len(tenant.raw.get(f"/v2/images/{img}/members").json()["members"]) == 256  # default limit 500


def test_unknown_and_malformed_member_ids(tenant, tenant_b, img):
    a = tenant
    ghost = secrets.token_hex(16)  # well formed, no such project or domain
    job = add_members(a, [img], projects=[tenant_b.project_id, ghost])
    assert job.status == "FAIL" and job.error_code == "IMG.0145", job
    res = {r.project_id: r.status for r in job.entities.results}
    assert res == {tenant_b.project_id: "success", ghost: "failed"}, job
    assert members_of(a, img) == [(tenant_b.project_id, "pending")]
    job = add_members(a, [img], domains=[ghost])
    assert job.status == "FAIL" and job.error_code == "IMG.0145", job
    assert_code(a.raw.post(f"/v2/images/{img}/members", json_body={"member": ghost}), 400, "IMG.0145")
    for bad in ("not-a-project", tenant_b.project_id.upper(), "", "0" * 31, "../" + ghost):
        assert_code(batch_add(a, {"images": [img], "projects": [bad]}), 400, "IMG.0001")
        assert_code(a.raw.post(f"/v2/images/{img}/members", json_body={"member": bad}), 400, "IMG.0145")
    # Unknown members in show/delete; a member added twice.
    assert_code(a.raw.get(f"/v2/images/{img}/members/{ghost}"), 404, "IMG.9020")
    assert_code(a.raw.get(f"/v1/{a.project_id}/cloudimages/{img}/members/{ghost}"), 404, "IMG.9020")
    assert_code(a.raw.delete(f"/v2/images/{img}/members/{ghost}"), 404, "IMG.9020")
    assert_code(a.raw.post(f"/v2/images/{img}/members", json_body={"member": tenant_b.project_id}),
                409, "IMG.9021")
    # Unknown images.
    missing = "00000000-0000-4000-8000-000000000000"
    assert_code(batch_add(a, {"images": [missing], "projects": [tenant_b.project_id]}), 404, "IMG.0027")
    assert_code(batch_add(a, {"images": ["not-an-id"], "projects": [tenant_b.project_id]}), 404, "IMG.0027")
    assert_code(a.raw.get(f"/v2/images/{missing}/members"), 404, "IMG.0027")
    assert members_of(a, img) == [(tenant_b.project_id, "pending")]


def test_malformed_markers_and_limits(tenant, tenant_b, img):
    a = tenant
    job_ok(add_members(a, [img], projects=[tenant_b.project_id]))
    for path in (f"/v1/{a.project_id}/cloudimages/{img}/members", f"/v2/images/{img}/members"):
        for marker in ("%%%not-base64", "abc", base64.b64encode(b"\xff\xfe").decode(),
                       base64.b64encode(secrets.token_hex(16).encode()).decode()):
            r = a.raw.get(path, query={"marker": marker})
            assert r.status_code == 400 and error_code(r) == "IMG.0001", (marker, describe(r))
        for limit in ("0", "1001", "-1", "ten"):
            r = a.raw.get(path, query={"limit": limit})
            assert r.status_code == 400 and error_code(r) == "IMG.0001", (limit, describe(r))
        r = a.raw.get(path, query={"limit": "1000"})
        assert r.status_code == 200 and len(r.json()["members"]) == 1, describe(r)
    r = a.raw.get("/v2/cloudimages", query={"__imagetype": "shared", "member_status": "maybe"})
    assert_code(r, 400, "IMG.0001")


def test_answers_addressed_to_someone_else(tenant, tenant_b, img):
    a, b = tenant, tenant_b
    c = make_project_in(b, "c")  # same domain as B, not a member
    job_ok(add_members(a, [img], projects=[b.project_id]))
    # C answers in B's name: refused before anything runs.
    r = c.raw.put("/v1/cloudimages/members", json_body={"images": [img], "project_id": b.project_id,
                                                         "status": "accepted"})
    assert_code(r, 403, "IMG.0030")
    # C answers for itself: the image is not shared with C (per-image failure, like a missing image).
    job = answer(c, [img], "accepted")
    assert job.status == "FAIL" and job.entities.results[0].status == "failed" and job.error_code == "IMG.0027", job
    assert_code(c.raw.put(f"/v2/images/{img}/members/{b.project_id}", json_body={"status": "accepted"}),
                404, "IMG.0027")
    assert_code(c.raw.put(f"/v2/images/{img}/members/{c.project_id}", json_body={"status": "accepted"}),
                404, "IMG.0027")
    # B answers for C, and the owner answers for B: refused.
    assert_code(b.raw.put(f"/v2/images/{img}/members/{c.project_id}", json_body={"status": "accepted"}),
                403, "IMG.0026")
    assert_code(a.raw.put(f"/v2/images/{img}/members/{b.project_id}", json_body={"status": "accepted"}),
                403, "IMG.0026")
    assert members_of(a, img) == [(b.project_id, "pending")]
    assert img not in shared_ids(c, "accepted") | shared_ids(c, "pending")


def test_only_the_owner_manages_and_recipients_cannot_reshare(tenant, tenant_b, img):
    a, b = tenant, tenant_b
    c = make_project_in(b, "c")
    job_ok(add_members(a, [img], projects=[b.project_id]))
    job_ok(answer(b, [img], "accepted"))
    assert_code(batch_add(b, {"images": [img], "projects": [c.project_id]}), 400, "IMG.0106")
    r = b.raw.delete("/v1/cloudimages/members", json_body={"images": [img], "projects": [b.project_id]},
                     content_type=JSON_UTF8)
    assert_code(r, 400, "IMG.0106")
    assert_code(b.raw.post(f"/v2/images/{img}/members", json_body={"member": c.project_id}), 403, "IMG.0106")
    assert_code(b.raw.delete(f"/v2/images/{img}/members/{b.project_id}"), 403, "IMG.0106")
    assert_code(b.raw.patch(f"/v2/cloudimages/{img}", body='[{"op":"replace","path":"/name","value":"x"}]',
                            content_type=JSON_UTF8), 400, "IMG.0047")
    assert_code(b.raw.delete(f"/v2/images/{img}"), 403, "IMG.0092")
    assert members_of(a, img) == [(b.project_id, "accepted")]
    assert img not in shared_ids(c, "pending")


def test_bad_bodies(tenant, tenant_b, img):
    a, b = tenant, tenant_b
    p = b.project_id
    for body in ({}, {"images": []}, {"images": [img]}, {"images": [img], "projects": []},
                 {"images": img, "projects": [p]}, {"images": [img], "projects": p},
                 {"images": [img], "projects": [1]}, {"images": [img], "organizations": ["organizations::x"]},
                 [img]):
        r = batch_add(a, body)
        assert r.status_code == 400 and error_code(r) == "IMG.0001", (body, describe(r))
    job_ok(add_members(a, [img], projects=[p]))
    for body in ({"images": [img], "project_id": p, "status": "pending"},
                 {"images": [img], "project_id": p, "status": "Accepted"},
                 {"images": [img], "project_id": p},
                 {"images": [], "project_id": p, "status": "accepted"},
                 {"images": [img], "status": "accepted"}):
        r = b.raw.put("/v1/cloudimages/members", json_body=body)
        assert r.status_code == 400 and error_code(r) == "IMG.0001", (body, describe(r))
    for body in ({"status": "pending"}, {"status": "bogus"}, {}):
        r = b.raw.put(f"/v2/images/{img}/members/{p}", json_body=body)
        assert r.status_code == 400 and error_code(r) == "IMG.0001", (body, describe(r))
    for body in ({}, {"member": 5}, {"members": [p]}):
        r = a.raw.post(f"/v2/images/{img}/members", json_body=body)
        assert r.status_code == 400 and error_code(r) == "IMG.0001", (body, describe(r))
    assert members_of(a, img) == [(p, "pending")]
