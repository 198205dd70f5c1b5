"""Glance v2 compatibility: openstacksdk, the `openstack` CLI, and raw HTTP checks of
/work/shared/spec/glance-behaviour.md (token auth, `Accept: application/json`)."""

import json
import secrets
import uuid

import pytest

from helpers import (
    JSON_PATCH_V21, OCTET, UUID4, assert_glance_error, describe,
    make_qcow2, md5_hex, raw_bytes, sha512_hex, unique,
)


@pytest.fixture(scope="module")
def g(module_tenant):
    """A token-authenticated raw client (what openstack clients send)."""
    return module_tenant.token_client()


def gcreate(g, **fields):
    fields.setdefault("name", unique("g"))
    r = g.post("/v2/images", json_body=fields, auth="token")
    assert r.status_code == 201, describe(r)
    return r.json()


def gshow(g, iid):
    r = g.get(f"/v2/images/{iid}", auth="token")
    assert r.status_code == 200, describe(r)
    return r.json()


def gupload(g, iid, data, content_type=OCTET):
    return g.put(f"/v2/images/{iid}/file", body=data, content_type=content_type, auth="token")


def gpatch(g, iid, ops, content_type=JSON_PATCH_V21):
    return g.patch(f"/v2/images/{iid}", body=json.dumps(ops), content_type=content_type, auth="token")


def active(g, data=None, **fields):
    data = raw_bytes() if data is None else data
    fields.setdefault("disk_format", "raw")
    fields.setdefault("container_format", "bare")
    img = gcreate(g, **fields)
    r = gupload(g, img["id"], data)
    assert r.status_code == 204, describe(r)
    return gshow(g, img["id"]), data


# ------------------------------------------------------------------------------------------
# openstacksdk
# ------------------------------------------------------------------------------------------

def test_openstacksdk_create_upload_download(os_conn, tmp_path):
    data = raw_bytes(300 * 1024)
    name = unique("sdk")
    img = os_conn.image.create_image(name=name, data=data, disk_format="raw", container_format="bare",
                                     validate_checksum=True, allow_duplicates=True)
    try:
        img = os_conn.image.get_image(img.id)
        assert img.status == "active"
        assert img.checksum == md5_hex(data)
        assert img.hash_algo == "sha512" and img.hash_value == sha512_hex(data)
        assert img.size == len(data) and img.virtual_size == len(data)
        resp = os_conn.image.download_image(img)  # openstacksdk verifies Content-MD5 / checksum
        assert resp.content == data
        out = tmp_path / "out.raw"
        os_conn.image.download_image(img, output=str(out))
        assert out.read_bytes() == data
    finally:
        os_conn.image.delete_image(img.id, ignore_missing=True)


def test_openstacksdk_list_update_tags_delete(os_conn):
    import openstack.exceptions
    img = os_conn.image.create_image(name=unique("sdk2"), data=raw_bytes(), disk_format="raw",
                                     container_format="bare", allow_duplicates=True)
    try:
        assert img.id in [i.id for i in os_conn.image.images()]
        new = unique("sdk2-renamed")
        upd = os_conn.image.update_image(img, name=new)
        assert upd.name == new
        assert os_conn.image.get_image(img.id).name == new
        os_conn.image.add_tag(img, "blue")
        assert "blue" in os_conn.image.get_image(img.id).tags
        os_conn.image.remove_tag(img, "blue")
        assert "blue" not in os_conn.image.get_image(img.id).tags
        assert [i.id for i in os_conn.image.images(name=new)] == [img.id]
    finally:
        os_conn.image.delete_image(img.id)
    with pytest.raises(openstack.exceptions.NotFoundException):
        os_conn.image.get_image(img.id)


def test_openstacksdk_update_custom_property(os_conn):
    """openstacksdk diffs the whole property dict: setting one custom property sends `remove`
    ops for every other extra attribute it saw (here the IMS `__*` ones). That must not fail."""
    img = os_conn.image.create_image(name=unique("sdk3"), data=raw_bytes(), disk_format="raw",
                                     container_format="bare", allow_duplicates=True)
    try:
        os_conn.image.update_image(img, e2e_prop="yes")
        got = os_conn.image.get_image(img.id)
        assert got.properties.get("e2e_prop") == "yes"
        assert got.status == "active"
    finally:
        os_conn.image.delete_image(img.id)


# ------------------------------------------------------------------------------------------
# openstack CLI
# ------------------------------------------------------------------------------------------

def test_openstack_cli_roundtrip(openstack_cli, tmp_path):
    src = tmp_path / "cli.raw"
    data = raw_bytes(3 * 1024 * 1024 + 512)
    src.write_bytes(data)
    name = unique("cli")
    created = openstack_cli("image", "create", "--file", str(src), "--disk-format", "raw",
                            "--container-format", "bare", name)
    iid = created["id"]
    assert UUID4.match(iid)
    listed = openstack_cli("image", "list")
    assert any(row["ID"] == iid and row["Name"] == name and row["Status"] == "active" for row in listed), listed
    shown = openstack_cli("image", "show", iid)
    assert shown["checksum"] == md5_hex(data)
    assert shown["disk_format"] == "raw" and shown["size"] == len(data)
    assert shown["virtual_size"] == len(data)
    out = tmp_path / "saved.raw"
    openstack_cli("image", "save", "--file", str(out), iid, json_out=False)
    assert out.read_bytes() == data
    openstack_cli("image", "set", "--property", "e2e_cli=1", iid, json_out=False)
    shown = openstack_cli("image", "show", iid)
    props = shown.get("properties") or {}
    assert props.get("e2e_cli") == "1" or shown.get("e2e_cli") == "1", shown
    openstack_cli("image", "delete", iid, json_out=False)
    p = openstack_cli("image", "show", iid, check=False)
    assert p.returncode != 0


# ------------------------------------------------------------------------------------------
# raw HTTP: create / upload / download
# ------------------------------------------------------------------------------------------

def test_create_201_location_and_queued_fields(g):
    name = unique("raw")
    r = g.post("/v2/images", json_body={"name": name, "disk_format": "raw", "container_format": "bare",
                                        "e2e_custom": "val"}, auth="token")
    assert r.status_code == 201, describe(r)
    b = r.json()
    assert UUID4.match(b["id"])
    assert r.headers["Location"] == f"{g.endpoint}/v2/images/{b['id']}"
    assert b["name"] == name and b["status"] == "queued"
    for k in ("checksum", "os_hash_algo", "os_hash_value", "size", "virtual_size"):
        assert b[k] is None, (k, b)
    assert b["protected"] is False and b["os_hidden"] is False
    assert b["min_disk"] == 0 and b["min_ram"] == 0
    assert b["tags"] == []
    assert b["self"] == f"/v2/images/{b['id']}"
    assert b["file"] == f"/v2/images/{b['id']}/file"
    assert b["schema"] == "/v2/schemas/image"
    assert b["e2e_custom"] == "val"  # custom properties sit at top level
    assert b["visibility"] in ("shared", "private")
    assert b["disk_format"] == "raw" and b["container_format"] == "bare"


def test_post_ignores_content_type(g):
    r = g.post("/v2/images", body=b"{}", content_type="text/plain", auth="token")
    assert r.status_code == 201, describe(r)
    assert r.json()["status"] == "queued"


def test_upload_raw_checksums_and_sizes(g):
    data = raw_bytes(512 * 1024 + 7)
    img = gcreate(g, disk_format="raw", container_format="bare")
    r = gupload(g, img["id"], data)
    assert r.status_code == 204, describe(r)
    assert r.content == b""
    b = gshow(g, img["id"])
    assert b["status"] == "active"
    assert b["checksum"] == md5_hex(data)
    assert b["os_hash_algo"] == "sha512"
    assert b["os_hash_value"] == sha512_hex(data)
    assert b["size"] == len(data) and b["virtual_size"] == len(data)
    assert b["stores"] == "fs"


def test_upload_qcow2_virtual_size(g, tmp_path):
    data = make_qcow2(tmp_path / "v.qcow2", "64M")
    img, _ = active(g, data, disk_format="qcow2")
    assert img["size"] == len(data)
    assert img["virtual_size"] == 64 * 1024 * 1024
    assert img["checksum"] == md5_hex(data)


def test_qcow2_declared_raw_is_refused(g, tmp_path):
    # Deliberately safer than stock Glance (which accepts this with virtual_size = file size):
    # a qcow2 header in a file declared raw is format confusion, a named safety violation
    # (a guest reading it as raw could later be handed to something that follows its backing
    # file). The upload is refused with 415 and the image stays queued.
    data = make_qcow2(tmp_path / "r.qcow2", "64M")
    img = gcreate(g, disk_format="raw", container_format="bare")
    r = gupload(g, img["id"], data)
    assert r.status_code == 415, describe(r)
    assert "qcow2" in r.json()["message"]
    assert gshow(g, img["id"])["status"] == "queued"


def test_download_md5_header_and_ranges(g):
    img, data = active(g, raw_bytes(100_000))
    r = g.get(f"/v2/images/{img['id']}/file", auth="token", accept=None)
    assert r.status_code == 200, describe(r)
    assert r.content == data
    assert r.headers["Content-MD5"] == md5_hex(data)  # hex, not base64
    assert int(r.headers["Content-Length"]) == len(data)
    assert "Accept-Ranges" not in r.headers
    r = g.get(f"/v2/images/{img['id']}/file", auth="token", accept=None, headers={"Range": "bytes=0-9"})
    assert r.status_code == 206, describe(r)
    assert r.headers["Content-Range"] == f"bytes 0-9/{len(data)}"
    assert r.content == data[:10]
    r = g.get(f"/v2/images/{img['id']}/file", auth="token", accept=None,
              headers={"Range": f"bytes={len(data) + 10}-{len(data) + 20}"})
    assert r.status_code == 416, describe(r)


def test_download_queued_is_204_no_body(g):
    img = gcreate(g, disk_format="raw", container_format="bare")
    r = g.get(f"/v2/images/{img['id']}/file", auth="token")
    assert r.status_code == 204, describe(r)
    assert r.content == b""


def test_upload_to_active_409(g):
    img, data = active(g)
    r = gupload(g, img["id"], b"other bytes" * 100)
    assert_glance_error(r, 409)
    b = gshow(g, img["id"])
    assert b["status"] == "active" and b["checksum"] == md5_hex(data)


def test_upload_before_formats_400(g):
    img = gcreate(g)  # no disk_format / container_format
    # A body small enough to sit in the socket buffers: the server answers before reading it.
    r = gupload(g, img["id"], raw_bytes(4096))
    assert_glance_error(r, 400)
    b = gshow(g, img["id"])
    assert b["status"] == "queued" and b["checksum"] is None


def test_upload_non_octet_stream_415(g):
    img = gcreate(g, disk_format="raw", container_format="bare")
    r = gupload(g, img["id"], raw_bytes(), content_type="text/plain")
    assert_glance_error(r, 415)
    assert gshow(g, img["id"])["status"] == "queued"


def test_random_bytes_declared_qcow2_415_stays_queued(g):
    img = gcreate(g, disk_format="qcow2", container_format="bare")
    r = gupload(g, img["id"], secrets.token_bytes(200_000))
    assert_glance_error(r, 415)
    b = gshow(g, img["id"])
    assert b["status"] == "queued" and b["checksum"] is None and b["size"] is None


def test_upload_unknown_image_404(g):
    r = gupload(g, str(uuid.uuid4()), b"x" * 1024)
    assert_glance_error(r, 404)


def test_get_unknown_image_glance_style_404(g):
    r = g.get(f"/v2/images/{uuid.uuid4()}", auth="token")
    assert_glance_error(r, 404)
    assert r.json()["code"] == "404 Not Found"


# ------------------------------------------------------------------------------------------
# raw HTTP: list
# ------------------------------------------------------------------------------------------

@pytest.fixture
def three(tenant):
    t = tenant.token_client()
    made = [gcreate(t, name=f"page-{i}-{secrets.token_hex(2)}", e2e_color="red" if i == 1 else "blue")
            for i in range(3)]
    return t, made


def test_list_paging_first_next(three):
    t, made = three
    r = t.get("/v2/images", query={"limit": 2}, auth="token")
    assert r.status_code == 200, describe(r)
    b = r.json()
    assert set(b) >= {"images", "first", "schema", "next"}
    assert b["schema"] == "/v2/schemas/images"
    assert len(b["images"]) == 2
    assert b["next"].startswith("/v2/images?") and f"marker={b['images'][-1]['id']}" in b["next"]
    path, _, qs = b["next"].partition("?")
    query = [tuple(p.split("=", 1)) for p in qs.split("&")]
    r2 = t.get(path, query=query, auth="token")
    assert r2.status_code == 200, describe(r2)
    b2 = r2.json()
    assert "next" not in b2
    got = [i["id"] for i in b["images"] + b2["images"]]
    assert sorted(got) == sorted(i["id"] for i in made) and len(set(got)) == 3
    created = [i["created_at"] for i in b["images"] + b2["images"]]
    assert created == sorted(created, reverse=True), "default sort is created_at desc"


def test_list_bad_params(three):
    t, made = three
    assert_glance_error(t.get("/v2/images", query={"marker": str(uuid.uuid4())}, auth="token"), 400)
    assert_glance_error(t.get("/v2/images", query={"limit": "-1"}, auth="token"), 400)
    assert_glance_error(t.get("/v2/images", query={"limit": "abc"}, auth="token"), 400)
    assert_glance_error(t.get("/v2/images", query={"sort_key": "bogus"}, auth="token"), 400)
    assert_glance_error(t.get("/v2/images", query={"sort_dir": "sideways"}, auth="token"), 400)
    r = t.get("/v2/images", query={"limit": "100000"}, auth="token")
    assert r.status_code == 200 and len(r.json()["images"]) == 3, describe(r)
    r = t.get("/v2/images", query={"status": "bogus"}, auth="token")
    assert r.status_code == 200 and r.json()["images"] == [], describe(r)


def test_list_sort_and_custom_property_filter(three):
    t, made = three
    r = t.get("/v2/images", query={"sort_key": "name", "sort_dir": "asc"}, auth="token")
    assert r.status_code == 200, describe(r)
    assert [i["id"] for i in r.json()["images"]] == [i["id"] for i in sorted(made, key=lambda x: x["name"])]
    r = t.get("/v2/images", query={"e2e_color": "red"}, auth="token")
    assert [i["id"] for i in r.json()["images"]] == [made[1]["id"]]


# ------------------------------------------------------------------------------------------
# raw HTTP: PATCH, delete, schemas, versions
# ------------------------------------------------------------------------------------------

def test_patch_media_types(g):
    img = gcreate(g, disk_format="raw", container_format="bare")
    ops = [{"op": "replace", "path": "/name", "value": "patched"}]
    assert_glance_error(gpatch(g, img["id"], ops, content_type="application/json"), 415)
    assert gshow(g, img["id"])["name"] == img["name"]
    r = gpatch(g, img["id"], ops + [{"op": "add", "path": "/e2e_k", "value": "v"}])
    assert r.status_code == 200, describe(r)
    assert r.json()["name"] == "patched" and r.json()["e2e_k"] == "v"
    r = gpatch(g, img["id"], [{"op": "remove", "path": "/e2e_k"}])
    assert r.status_code == 200 and "e2e_k" not in r.json(), describe(r)
    # the v2.0 dialect
    r = gpatch(g, img["id"], [{"replace": "/name", "value": "patched20"}],
               content_type="application/openstack-images-v2.0-json-patch")
    assert r.status_code == 200 and r.json()["name"] == "patched20", describe(r)


def test_patch_read_only_and_reserved_403(g):
    img, data = active(g)
    for path, value in (("/status", "queued"), ("/checksum", "0" * 32), ("/os_glance_e2e", "x"),
                        ("/disk_format", "qcow2")):
        r = gpatch(g, img["id"], [{"op": "replace", "path": path, "value": value}])
        assert_glance_error(r, 403)
    b = gshow(g, img["id"])
    assert (b["status"], b["checksum"], b["disk_format"]) == ("active", md5_hex(data), "raw")
    assert "os_glance_e2e" not in b


def test_delete_204_then_404(g):
    img = gcreate(g)
    r = g.delete(f"/v2/images/{img['id']}", auth="token")
    assert r.status_code == 204 and r.content == b"", describe(r)
    assert_glance_error(g.get(f"/v2/images/{img['id']}", auth="token"), 404)
    assert_glance_error(g.delete(f"/v2/images/{img['id']}", auth="token"), 404)


def test_protected_delete_403(g):
    img = gcreate(g, protected=True)
    assert_glance_error(g.delete(f"/v2/images/{img['id']}", auth="token"), 403)
    assert gshow(g, img["id"])["protected"] is True
    r = gpatch(g, img["id"], [{"op": "replace", "path": "/protected", "value": False}])
    assert r.status_code == 200, describe(r)
    assert g.delete(f"/v2/images/{img['id']}", auth="token").status_code == 204


def test_create_validation(g):
    before = {i["id"] for i in g.get("/v2/images", query={"limit": 1000}, auth="token").json()["images"]}
    bad = [
        {"name": "x", "disk_format": "foo"},
        {"name": "x", "container_format": "foo"},
        {"id": "not-a-uuid", "name": "x"},
        {"name": "n" * 256},
        {"name": "x", "visibility": "bogus"},
        {"name": "x", "tags": "notalist"},
        {"name": "x", "min_disk": -1},
    ]
    for body in bad:
        r = g.post("/v2/images", json_body=body, auth="token")
        assert_glance_error(r, 400)
    r = g.post("/v2/images", body=b'{"name": "x",', auth="token")
    assert_glance_error(r, 400)
    after = {i["id"] for i in g.get("/v2/images", query={"limit": 1000}, auth="token").json()["images"]}
    assert after == before, "a refused create must not create anything"
    r = g.post("/v2/images", json_body={"name": "x", "disk_format": "foo"}, auth="token")
    assert "is not one of" in r.json()["message"]
    iid = str(uuid.uuid4())
    assert g.post("/v2/images", json_body={"id": iid, "name": "dup"}, auth="token").status_code == 201
    assert_glance_error(g.post("/v2/images", json_body={"id": iid, "name": "dup"}, auth="token"), 409)


@pytest.mark.parametrize("which,name", [("image", "image"), ("images", "images"),
                                        ("member", "member"), ("members", "members")])
def test_schemas(g, which, name):
    r = g.get(f"/v2/schemas/{which}", auth="token")
    assert r.status_code == 200, describe(r)
    b = r.json()
    assert b["name"] == name
    assert isinstance(b["properties"], dict) and b["properties"]
    assert isinstance(b["links"], list) and all("href" in x and "rel" in x for x in b["links"])
    if which == "image":
        assert {"id", "name", "status", "disk_format", "container_format", "checksum"} <= set(b["properties"])
        assert isinstance(b["additionalProperties"], dict) and "type" in b["additionalProperties"]
        assert None in b["properties"]["disk_format"]["enum"] and "qcow2" in b["properties"]["disk_format"]["enum"]


def test_versions_root(server):
    import requests
    r = requests.get(server.endpoint + "/", timeout=10)
    assert r.status_code == 300, describe(r)
    vs = r.json()["versions"]
    assert any(v["status"] == "CURRENT" and v["id"].startswith("v2") for v in vs), vs
    for v in vs:
        assert v["status"] in ("CURRENT", "SUPPORTED", "DEPRECATED")
        assert v["links"][0]["rel"] == "self" and v["links"][0]["href"].startswith("http://127.0.0.1:")
