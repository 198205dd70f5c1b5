"""Crash safety: SIGKILL in the middle of a 1 GiB upload, and SIGKILL while idle.

Each test has its own server (`fresh_server`) and restarts it on the same data dir and port."""

import threading

import pytest
import requests

from helpers import (
    OCTET, RawClient, GeneratedBody, describe, glance_create, glance_show, glance_upload, make_active_image,
    make_tenant, md5_hex, raw_bytes, unique,
)

pytestmark = [pytest.mark.crash, pytest.mark.timeout(300)]

GiB = 1 << 30
MiB = 1 << 20


def start_upload(t, image_id, body):
    result = {}

    def run():
        try:
            uploader = RawClient(t.endpoint, t.ak, t.sk, t.project_id)  # own session/connection
            result["resp"] = uploader.put(f"/v2/images/{image_id}/file", stream_body=body, content_type=OCTET,
                                       timeout=120)
        except Exception as e:  # noqa: BLE001 - the connection is expected to break
            result["exc"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, result


def test_kill9_mid_upload_never_active(fresh_server):
    srv = fresh_server
    t = make_tenant(srv, "crash")
    keep = make_active_image(t.raw, name=unique("keep"))
    img = glance_create(t.raw, name=unique("big"), disk_format="raw", container_format="bare")

    body = GeneratedBody(total=GiB, pause_at=200 * MiB)
    th, result = start_upload(t, img["id"], body)
    assert body.reached.wait(120), f"upload did not reach 200 MiB (at {body.pos}): {result}"
    during = glance_show(t.raw, img["id"])
    assert during["status"] == "saving", during

    srv.kill9()
    body.stop = True
    body.resume.set()
    th.join(60)
    assert not th.is_alive()
    assert "resp" not in result or result["resp"].status_code != 204, result

    srv.start(port=srv.port)
    after = glance_show(t.raw, img["id"])
    assert after["status"] in ("queued", "killed"), f"interrupted upload must not survive as {after['status']}"
    assert after["checksum"] is None and after["os_hash_value"] is None, after
    r = t.raw.get(f"/v2/images/{img['id']}/file")
    assert r.status_code != 200 and len(r.content) < 1024, describe(r)

    small = raw_bytes(64 * 1024)
    target = img["id"]
    if after["status"] == "killed":
        target = glance_create(t.raw, name=unique("retry"), disk_format="raw", container_format="bare")["id"]
    r = glance_upload(t.raw, target, small)
    assert r.status_code == 204, describe(r)
    shown = glance_show(t.raw, target)
    assert shown["status"] == "active" and shown["checksum"] == md5_hex(small) and shown["size"] == len(small)
    r = t.raw.get(f"/v2/images/{target}/file")
    assert r.status_code == 200 and r.content == small

    # the image that was complete before the crash is intact
    r = t.raw.get(f"/v2/images/{keep['id']}/file")
    assert r.status_code == 200 and r.content == keep["_data"]
    assert glance_show(t.raw, keep["id"])["checksum"] == md5_hex(keep["_data"])


def test_kill9_idle_restart_data_intact(fresh_server):
    srv = fresh_server
    t = make_tenant(srv, "idle")
    img = make_active_image(t.raw, name=unique("persist"), e2e_prop="x")
    r = t.raw.post(f"/v2/{t.project_id}/images/{img['id']}/tags", json_body={"tag": {"key": "k", "value": "v"}})
    assert r.status_code == 204, describe(r)
    q = glance_create(t.raw, name=unique("queued"), disk_format="raw", container_format="bare")
    creds_before = srv.credentials()

    srv.kill9()
    srv.start(port=srv.port)

    assert srv.credentials() == creds_before
    shown = glance_show(t.raw, img["id"])  # the same AK/SK still works
    assert shown["status"] == "active" and shown["checksum"] == img["checksum"]
    assert shown["name"] == img["name"] and shown["e2e_prop"] == "x"
    r = t.raw.get(f"/v2/images/{img['id']}/file")
    assert r.status_code == 200 and r.content == img["_data"]
    tags = t.raw.get(f"/v2/{t.project_id}/images/{img['id']}/tags").json()["tags"]
    assert tags == [{"key": "k", "value": "v"}]
    assert glance_show(t.raw, q["id"])["status"] == "queued"
    # password login of the bootstrap admin still works
    tok = requests.post(srv.endpoint + "/v3/auth/tokens", timeout=10, json={"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": creds_before["OPENIMS_USER"], "domain": {"name": creds_before["OPENIMS_DOMAIN"]},
            "password": creds_before["OPENIMS_PASSWORD"]}}},
        "scope": {"project": {"name": creds_before["OPENIMS_PROJECT"],
                              "domain": {"name": creds_before["OPENIMS_DOMAIN"]}}}}})
    assert tok.status_code == 201, describe(tok)
