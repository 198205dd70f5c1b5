"""Malformed and out-of-range input: each refused with its documented code (spec §C.8, §C.9)
and nothing changed (the state is read back after every refusal)."""

import json

import pytest

from helpers import (
    JSON_PATCH_V21, assert_error, assert_glance_error, describe, glance_create, make_active_image,
    md5_hex, send_reading_early, unique,
)

JSON_UTF8 = "application/json;charset=utf-8"


def show(t, iid):
    r = t.raw.get(f"/v2/images/{iid}")
    assert r.status_code == 200, describe(r)
    return r.json()


def ims_tags(t, iid):
    r = t.raw.get(f"/v2/{t.project_id}/images/{iid}/tags")
    assert r.status_code == 200, describe(r)
    return {x["key"]: x["value"] for x in r.json()["tags"]}


def update(t, iid, ops=None, body=None):
    if body is None:
        body = json.dumps(ops)
    return t.raw.patch(f"/v2/cloudimages/{iid}", body=body, content_type=JSON_UTF8)


@pytest.fixture
def img(tenant):
    return make_active_image(tenant.raw, name=unique("bad"))


def assert_unchanged(t, before):
    now = show(t, before["id"])
    for k in ("name", "status", "checksum", "min_ram", "protected", "tags"):
        assert now.get(k) == before.get(k), (k, before.get(k), now.get(k))
    assert now.get("__description") == before.get("__description")


def test_bad_json(tenant, img):
    r = update(tenant, img["id"], body='[{"op": "replace", "path": "/name", "value": "x"')
    assert_error(r, 400, "IMG.0001")
    r = tenant.raw.post(f"/v2/{tenant.project_id}/images/{img['id']}/tags", body='{"tag": {"key": ',
                        content_type=JSON_UTF8)
    assert_error(r, 400, "IMG.0001")
    r = tenant.raw.put("/v1/cloudimages/tags", body='{"image_id": ', content_type=JSON_UTF8)
    assert_error(r, 400, "IMG.0001")
    r = tenant.raw.post(f"/v2/{tenant.project_id}/images/{img['id']}/tags/action", body="not json",
                        content_type=JSON_UTF8)
    assert_error(r, 400, "IMG.0001")
    assert_unchanged(tenant, img)
    assert ims_tags(tenant, img["id"]) == {}


def test_empty_body_img_0007(tenant, img):
    pid = tenant.project_id
    for method, path in (("PATCH", f"/v2/cloudimages/{img['id']}"),
                         ("POST", f"/v2/{pid}/images/{img['id']}/tags"),
                         ("POST", f"/v2/{pid}/images/{img['id']}/tags/action"),
                         ("PUT", "/v1/cloudimages/tags")):
        r = tenant.raw.request(method, path, body=b"", content_type=JSON_UTF8)
        assert_error(r, 400, "IMG.0007")
    assert_unchanged(tenant, img)
    assert ims_tags(tenant, img["id"]) == {}


def test_unknown_json_patch_op(tenant, img):
    r = update(tenant, img["id"], [{"op": "frobnicate", "path": "/name", "value": "x"}])
    assert_error(r, 400, "IMG.0001")
    # one bad op in a list: nothing of the list is applied
    r = update(tenant, img["id"], [{"op": "replace", "path": "/name", "value": "applied"},
                                   {"op": "frobnicate", "path": "/name", "value": "x"}])
    assert_error(r, 400, "IMG.0001")
    assert_unchanged(tenant, img)
    r = tenant.raw.patch(f"/v2/images/{img['id']}", body=json.dumps([{"op": "frobnicate", "path": "/name",
                                                                      "value": "x"}]),
                         content_type=JSON_PATCH_V21)
    assert_glance_error(r, 400)
    assert_unchanged(tenant, img)


def test_name_too_long_img_0002(tenant, img):
    r = update(tenant, img["id"], [{"op": "replace", "path": "/name", "value": "n" * 129}])
    assert_error(r, 400, "IMG.0002")
    assert_unchanged(tenant, img)
    r = update(tenant, img["id"], [{"op": "replace", "path": "/name", "value": "n" * 128}])
    assert r.status_code == 200, describe(r)
    assert show(tenant, img["id"])["name"] == "n" * 128


@pytest.mark.parametrize("bad", ["a/b", "a<b>", "a*b", " leading", "trailing ", "semi;colon", "tab\tname"])
def test_name_bad_characters_img_0003(tenant, img, bad):
    r = update(tenant, img["id"], [{"op": "replace", "path": "/name", "value": bad}])
    assert_error(r, 400, "IMG.0003")
    assert_unchanged(tenant, img)


def test_name_allowed_characters(tenant, img):
    r = update(tenant, img["id"], [{"op": "replace", "path": "/name", "value": "Ok name-1.2_3"}])
    assert r.status_code == 200, describe(r)
    assert show(tenant, img["id"])["name"] == "Ok name-1.2_3"


def test_description_rules(tenant, img):
    r = update(tenant, img["id"], [{"op": "add", "path": "/__description", "value": "d" * 1025}])
    assert_error(r, 400, "IMG.0004")
    assert_unchanged(tenant, img)
    for bad in ("has <tag>", "cr\rhere"):
        r = update(tenant, img["id"], [{"op": "add", "path": "/__description", "value": bad}])
        assert_error(r, 400, "IMG.0054")
        assert_unchanged(tenant, img)
    r = update(tenant, img["id"], [{"op": "add", "path": "/__description", "value": "d" * 1024}])
    assert r.status_code == 200, describe(r)
    assert show(tenant, img["id"])["__description"] == "d" * 1024


def test_bad_min_ram_and_firmware(tenant, img):
    r = update(tenant, img["id"], [{"op": "replace", "path": "/min_ram", "value": "-1"}])
    assert_error(r, 400, "IMG.0055")
    r = update(tenant, img["id"], [{"op": "add", "path": "/hw_firmware_type", "value": "coreboot"}])
    assert_error(r, 400, "IMG.0141")
    assert_unchanged(tenant, img)
    assert "hw_firmware_type" not in show(tenant, img["id"]) or \
        show(tenant, img["id"])["hw_firmware_type"] in (None, "bios")


def test_eleventh_tag_img_0116(tenant, img):
    pid, iid = tenant.project_id, img["id"]
    ten = [{"key": f"k{i}", "value": f"v{i}"} for i in range(10)]
    r = tenant.raw.post(f"/v2/{pid}/images/{iid}/tags/action", json_body={"action": "create", "tags": ten})
    assert r.status_code == 204, describe(r)
    want = {t["key"]: t["value"] for t in ten}
    assert ims_tags(tenant, iid) == want
    r = tenant.raw.post(f"/v2/{pid}/images/{iid}/tags", json_body={"tag": {"key": "k10", "value": "v"}})
    assert_error(r, 400, "IMG.0116")
    r = tenant.raw.put("/v1/cloudimages/tags", json_body={"image_id": iid, "image_tag": {"key": "k10", "value": "v"}})
    assert_error(r, 400, "IMG.0116")
    r = tenant.raw.post(f"/v2/{pid}/images/{iid}/tags/action",
                        json_body={"action": "create", "tags": [{"key": "k0", "value": "new"},
                                                               {"key": "k11", "value": "v"}]})
    assert_error(r, 400, "IMG.0116")
    assert ims_tags(tenant, iid) == want, "a refused batch must not be partly applied"
    # updating an existing key at the limit is not a new tag
    r = tenant.raw.post(f"/v2/{pid}/images/{iid}/tags", json_body={"tag": {"key": "k0", "value": "upd"}})
    assert r.status_code == 204, describe(r)
    assert ims_tags(tenant, iid) == {**want, "k0": "upd"}


def test_eleven_tags_in_one_batch_img_0116(tenant, img):
    pid, iid = tenant.project_id, img["id"]
    eleven = [{"key": f"k{i}", "value": "v"} for i in range(11)]
    r = tenant.raw.post(f"/v2/{pid}/images/{iid}/tags/action", json_body={"action": "create", "tags": eleven})
    assert_error(r, 400, "IMG.0116")
    assert ims_tags(tenant, iid) == {}


@pytest.mark.parametrize("key,value", [("k" * 37, "v"), ("k", "v" * 44), ("", "v")])
def test_invalid_tag_img_0115(tenant, img, key, value):
    r = tenant.raw.post(f"/v2/{tenant.project_id}/images/{img['id']}/tags",
                        json_body={"tag": {"key": key, "value": value}})
    assert_error(r, 400, "IMG.0115")
    assert ims_tags(tenant, img["id"]) == {}


def test_body_over_12mb(tenant, img):
    before = {i["id"] for i in tenant.raw.get("/v2/images", query={"limit": 1000}).json()["images"]}
    big = json.dumps({"name": unique("big"), "disk_format": "raw", "container_format": "bare",
                      "e2e_blob": "x" * (13 * 1024 * 1024)}).encode()
    r = send_reading_early(tenant.raw, "POST", "/v2/images", big, content_type=JSON_UTF8)
    assert r.status_code == 413, (r.status_code, r.headers, r.content[:300])
    assert r.headers.get("x-request-id")
    b = r.json()
    assert "error" in b or "message" in b, b
    after = {i["id"] for i in tenant.raw.get("/v2/images", query={"limit": 1000}).json()["images"]}
    assert after == before
    big_patch = json.dumps([{"op": "add", "path": "/__description", "value": "d" * (13 * 1024 * 1024)}]).encode()
    r = send_reading_early(tenant.raw, "PATCH", f"/v2/cloudimages/{img['id']}", big_patch, content_type=JSON_UTF8)
    assert r.status_code == 413, (r.status_code, r.headers, r.content[:300])
    assert_unchanged(tenant, img)


def test_download_queued_image_204(tenant):
    q = glance_create(tenant.raw, disk_format="raw", container_format="bare")
    r = tenant.raw.get(f"/v2/images/{q['id']}/file")
    assert r.status_code == 204, describe(r)
    assert r.content == b""
    assert show(tenant, q["id"])["status"] == "queued"


def test_delete_protected_image(tenant):
    from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
    from huaweicloudsdkims.v2 import GlanceDeleteImageRequest, GlanceDeleteImageRequestBody

    p = make_active_image(tenant.raw, protected=True)
    r = tenant.raw.delete(f"/v2/images/{p['id']}")
    assert_glance_error(r, 403)
    assert r.json()["error"]["code"] == "IMG.0028", describe(r)
    with pytest.raises(ClientRequestException) as ei:
        tenant.ims.glance_delete_image(GlanceDeleteImageRequest(
            image_id=p["id"], body=GlanceDeleteImageRequestBody(delete_backup=False)))
    assert ei.value.status_code == 403, ei.value
    now = show(tenant, p["id"])
    assert now["status"] == "active" and now["protected"] is True and now["checksum"] == md5_hex(p["_data"])
    r = tenant.raw.get(f"/v2/images/{p['id']}/file")
    assert r.status_code == 200 and r.content == p["_data"]
