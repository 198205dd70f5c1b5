"""Project isolation: project B's key must not see or touch project A's images through any API.

Accepted refusals: 404 (preferred: no existence leak), or a documented 403 owner/project code,
or IMS' 400 "image does not exist" codes. After all of it A's images are byte-for-byte unchanged."""

import json

import pytest

from helpers import JSON_PATCH_V21, OCTET, describe, glance_create, make_active_image, md5_hex, unique

JSON_UTF8 = "application/json;charset=utf-8"
DENY_403 = {"IMG.0030", "IMG.0047", "IMG.0092", "IMG.0106"}
DENY_400 = {"IMG.0027", "IMG.0144"}


def code_of(r):
    try:
        b = r.json()
    except ValueError:
        return None
    e = b.get("error") if isinstance(b, dict) else None
    return e.get("code") if isinstance(e, dict) else None


def assert_denied(r):
    ok = (r.status_code == 404 or (r.status_code == 403 and code_of(r) in DENY_403)
          or (r.status_code == 400 and code_of(r) in DENY_400))
    assert ok, f"cross-project access not refused: {describe(r)}"
    assert r.headers.get("X-Request-Id")


@pytest.fixture
def a_images(tenant):
    act = make_active_image(tenant.raw, name=unique("a-active"), e2e_owner="a")
    r = tenant.raw.post(f"/v2/{tenant.project_id}/images/{act['id']}/tags",
                        json_body={"tag": {"key": "secret", "value": "a"}})
    assert r.status_code == 204, describe(r)
    q = glance_create(tenant.raw, name=unique("a-queued"), disk_format="raw", container_format="bare")
    return act, q


def snapshot(t, iid):
    r = t.raw.get(f"/v2/images/{iid}")
    assert r.status_code == 200, describe(r)
    b = r.json()
    tags = t.raw.get(f"/v2/{t.project_id}/images/{iid}/tags").json()["tags"]
    return {k: b.get(k) for k in ("name", "status", "checksum", "size", "tags", "protected", "e2e_owner",
                                  "min_ram", "updated_at")}, sorted((x["key"], x["value"]) for x in tags)


def test_b_cannot_see_a(tenant, tenant_b, a_images):
    act, q = a_images
    b = tenant_b.raw
    for iid in (act["id"], q["id"]):
        assert_denied(b.get(f"/v2/images/{iid}"))
    listed = {i["id"] for i in b.get("/v2/images", query={"limit": 1000}).json()["images"]}
    assert not listed & {act["id"], q["id"]}
    r = b.get("/v2/cloudimages")
    assert r.status_code == 200, describe(r)
    assert not {i["id"] for i in r.json()["images"]} & {act["id"], q["id"]}
    for query in ({"id": act["id"]}, {"owner": tenant.project_id}, {"name": act["name"]},
                  {"__imagetype": "private"}, {"__imagetype": "shared"}):
        r = b.get("/v2/cloudimages", query=query)
        assert r.status_code == 200, describe(r)
        assert not {i["id"] for i in r.json()["images"]} & {act["id"], q["id"]}, query
        r = b.get("/v2/images", query=query if "__imagetype" not in query else {})
        assert not {i["id"] for i in r.json()["images"]} & {act["id"], q["id"]}, query
    # tag listings of B never show A's tags
    r = b.get(f"/v2/{tenant_b.project_id}/images/tags")
    assert r.status_code == 200 and r.json()["tags"] == [], describe(r)
    r = b.get("/v1/cloudimages/tags")
    assert r.status_code == 200 and r.json()["tags"] == [], describe(r)
    r = b.post(f"/v2/{tenant_b.project_id}/images/resource_instances/action",
               json_body={"action": "filter", "tags": [{"key": "secret", "values": []}]})
    assert r.status_code == 200 and r.json()["resources"] == [] and r.json()["total_count"] == 0, describe(r)
    # quota of B does not count A's images
    r = b.get("/v1/cloudimages/quota")
    used = {x["type"]: x["used"] for x in r.json()["quotas"]["resources"]}
    assert used["image"] == 0


def test_b_cannot_modify_a(tenant, tenant_b, a_images):
    act, q = a_images
    before_a, before_q = snapshot(tenant, act["id"]), snapshot(tenant, q["id"])
    b, bpid, iid = tenant_b.raw, tenant_b.project_id, act["id"]
    attempts = [
        ("PATCH", f"/v2/images/{iid}", json.dumps([{"op": "replace", "path": "/name", "value": "pwned"}]),
         JSON_PATCH_V21),
        ("PATCH", f"/v2/cloudimages/{iid}", json.dumps([{"op": "replace", "path": "/name", "value": "pwned"}]),
         JSON_UTF8),
        ("DELETE", f"/v2/images/{iid}", None, "application/json"),
        ("PUT", f"/v2/images/{iid}/tags/pwned", None, "application/json"),
        ("DELETE", f"/v2/images/{iid}/tags/secret", None, "application/json"),
        ("POST", f"/v2/{bpid}/images/{iid}/tags", json.dumps({"tag": {"key": "pwned", "value": "b"}}), JSON_UTF8),
        ("POST", f"/v2/{bpid}/images/{iid}/tags/action",
         json.dumps({"action": "delete", "tags": [{"key": "secret", "value": "a"}]}), JSON_UTF8),
        ("POST", f"/v2/{bpid}/images/{iid}/tags/action",
         json.dumps({"action": "create", "tags": [{"key": "pwned", "value": "b"}]}), JSON_UTF8),
        ("DELETE", f"/v2/{bpid}/images/{iid}/tags/secret", None, "application/json"),
        ("DELETE", f"/v1/{bpid}/cloudimages/{iid}/tags/delete",
         json.dumps({"tags": [{"key": "secret", "value": "a"}]}), JSON_UTF8),
        ("PUT", "/v1/cloudimages/tags", json.dumps({"image_id": iid, "tag": "pwned.b"}), JSON_UTF8),
        ("PUT", "/v1/cloudimages/tags", json.dumps({"image_id": iid, "image_tag": {"key": "pwned", "value": "b"}}),
         JSON_UTF8),
        ("GET", f"/v2/{bpid}/images/{iid}/tags", None, "application/json"),
        ("GET", f"/v2/images/{iid}/file", None, "application/json"),
        ("GET", f"/v2/images/{q['id']}/file", None, "application/json"),
        ("PUT", f"/v2/images/{q['id']}/file", b"\0" * 4096, OCTET),
    ]
    for method, path, body, ctype in attempts:
        r = b.request(method, path, body=body, content_type=ctype)
        try:
            assert_denied(r)
        except AssertionError as e:
            raise AssertionError(f"{method} {path}: {e}") from None
    assert snapshot(tenant, act["id"]) == before_a
    assert snapshot(tenant, q["id"]) == before_q
    r = tenant.raw.get(f"/v2/images/{iid}/file")
    assert r.status_code == 200 and md5_hex(r.content) == act["checksum"]


def test_b_cannot_touch_a_members(tenant, tenant_b, a_images):
    act, _ = a_images
    b, bpid, iid = tenant_b.raw, tenant_b.project_id, act["id"]
    for method, path, body, ctype in [
        ("GET", f"/v2/images/{iid}/members", None, "application/json"),
        ("GET", f"/v1/{bpid}/cloudimages/{iid}/members", None, "application/json"),
        ("POST", f"/v2/images/{iid}/members", json.dumps({"member": bpid}), JSON_UTF8),
    ]:
        r = b.request(method, path, body=body, content_type=ctype)
        assert_denied(r)
    r = tenant.raw.get(f"/v2/images/{iid}/members")
    assert r.status_code == 200 and r.json()["members"] == [], describe(r)
    r = b.get(f"/v1/{tenant.project_id}/cloudimages/{iid}/members")
    assert r.status_code == 403 and code_of(r) == "IMG.0030", describe(r)


def test_b_naming_a_project_in_path_is_403(tenant, tenant_b, a_images):
    act, _ = a_images
    b = tenant_b.raw
    for method, path, body in (
        ("GET", f"/v2/{tenant.project_id}/images/{act['id']}/tags", None),
        ("GET", f"/v2/{tenant.project_id}/images/tags", None),
        ("POST", f"/v2/{tenant.project_id}/images/{act['id']}/tags", {"tag": {"key": "pwned", "value": "b"}}),
    ):
        kw = {"json_body": body} if body is not None else {}
        r = b.request(method, path, **kw)
        assert r.status_code == 403 and code_of(r) == "IMG.0030", f"{method} {path}: {describe(r)}"
    assert snapshot(tenant, act["id"])[1] == [("secret", "a")]
