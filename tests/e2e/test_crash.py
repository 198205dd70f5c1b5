"""Crash safety: SIGKILL in the middle of a 1 GiB upload, and SIGKILL while idle.

Each test has its own server (`fresh_server`) and restarts it on the same data dir and port."""

import threading

import pytest
import requests
from boto3.s3.transfer import TransferConfig

from helpers import (
    OCTET, RawClient, GeneratedBody, describe, glance_create, glance_show, glance_upload, image_sha256,
    make_active_image, make_tenant, md5_hex, raw_bytes, unique,
)

pytestmark = [pytest.mark.crash, pytest.mark.timeout(300)]

GiB = 1 << 30
MiB = 1 << 20
# Upload parts of 6 MiB, mostly not whole 4 MiB chunks: an import then streams most of the
# object through the reader (and can be killed mid-way) instead of referencing its chunks.
STREAMED_PARTS = TransferConfig(multipart_threshold=6 * MiB, multipart_chunksize=6 * MiB)


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


def sparse_disk(path, total):
    """A raw disk of `total` bytes with a random 64 KiB block at the start of every 4 MiB chunk
    (every chunk is data; the file stays sparse on the local disk); returns its SHA-256."""
    import hashlib
    import os

    with open(path, "wb") as f:
        f.truncate(total)
        for off in range(0, total, 4 * MiB):
            f.seek(off)
            f.write(os.urandom(64 * 1024))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(8 * MiB), b""):
            h.update(piece)
    return h.hexdigest()


def kill9_between(srv, t, job_id, low, high):
    """Polls the job and kills the server (kill -9) once the job is RUNNING with
    `low <= bytes_done < high`; fails if the job ends or the window passes unseen."""
    import time

    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        v = t.raw.get(f"/v1/{t.project_id}/jobs/{job_id}").json()
        seen.append((v["status"], v["entities"].get("bytes_done")))
        if v["status"] in ("SUCCESS", "FAIL"):
            break
        if v["status"] == "RUNNING" and low <= (v["entities"].get("bytes_done") or 0) < high:
            srv.kill9()
            return
    raise AssertionError(f"the job was not caught between {low} and {high} bytes: {seen[-5:]}")


def kill_mid_job_and_see_it_resume(srv, t, job_id, total, kind):
    """Kills the server (kill -9) while the job is past 128 MiB of a `total`-byte disk (its
    16 MiB checkpoints well behind it), restarts it, and checks the job ends SUCCESS having
    resumed from a checkpoint (`entities.resumed_from_bytes`, the `<kind> resumed` log line)."""
    from helpers import wait_job

    kill9_between(srv, t, job_id, 128 * MiB, total - 128 * MiB)
    srv.start(port=srv.port)
    job = wait_job(t.ims, job_id, timeout=240)
    assert job.status == "SUCCESS", job
    v = t.raw.get(f"/v1/{t.project_id}/jobs/{job_id}").json()
    resumed = v["entities"].get("resumed_from_bytes")
    assert resumed and 16 * MiB <= resumed < total, v
    assert f"{kind} resumed from its checkpoint" in srv.log_tail(400)
    return job


def test_kill9_mid_whole_image_import_resumes_per_disk(tmp_path):
    """A whole image imported from two files is killed (kill -9) while the second disk is being
    read; on restart the job skips the finished system disk, resumes the data disk from its
    checkpoint, and both member images equal their files."""
    from conftest import _start, _stop_checked
    from helpers import admin, wait_job
    from test_import_export import bucket_for
    from test_whole_image import whole

    srv = _start(tmp_path, "whole", extra=("--import-checkpoint-mib", "16"))
    try:
        t = make_tenant(srv, "wr")
        bucket = bucket_for(t)
        sizes = {"system.raw": 256 * MiB, "data.raw": 512 * MiB}
        want = {}
        for name, size in sizes.items():
            want[name] = sparse_disk(tmp_path / name, size)
            t.s3().upload_file(str(tmp_path / name), bucket, name, Config=STREAMED_PARTS)
        job_id = whole(t, f"{bucket}:system.raw", [{"name": unique("data"), "image_url": f"{bucket}:data.raw",
                                                    "min_disk": 1}])
        total = sum(sizes.values())
        # The system disk is done and the data disk has checkpoints behind the reader.
        kill9_between(srv, t, job_id, sizes["system.raw"] + 96 * MiB, total - 96 * MiB)
        srv.start(port=srv.port)
        job = wait_job(t.ims, job_id, timeout=240)
        assert job.status == "SUCCESS", job
        v = t.raw.get(f"/v1/{t.project_id}/jobs/{job_id}").json()
        resumed = v["entities"].get("resumed_from_bytes")
        assert resumed and sizes["system.raw"] + 16 * MiB <= resumed < total, v
        assert "disk set import resumed from its checkpoint" in srv.log_tail(400)
        w = glance_show(t.raw, job.entities.image_id)
        sys_id, data_id = w["__whole_image_disks"].split(",")
        assert image_sha256(t.raw, sys_id) == (want["system.raw"], sizes["system.raw"])
        assert image_sha256(t.raw, data_id) == (want["data.raw"], sizes["data.raw"])
        fsck = admin(srv.data_dir, "fsck", binary=srv.binary)
        assert fsck["clean"], fsck
    finally:
        _stop_checked(srv)


def test_kill9_mid_import_resumes_from_its_checkpoint(tmp_path):
    """An import from a bucket object is killed (kill -9) after a checkpoint; on restart the
    job continues from the checkpoint (bytes before it are not read again) and the image
    equals the file."""
    from conftest import _start, _stop_checked
    from helpers import admin
    from test_import_export import bucket_for, create_image

    # A checkpoint every 16 MiB of virtual disk, so one exists long before the end.
    srv = _start(tmp_path, "imp", extra=("--import-checkpoint-mib", "16"))
    try:
        t = make_tenant(srv, "ir")
        bucket = bucket_for(t)
        # 768 MiB raw, a random 64 KiB block at the start of every 4 MiB chunk.
        total = 768 * MiB
        path = tmp_path / "disk.raw"
        want = sparse_disk(path, total)
        t.s3().upload_file(str(path), bucket, "disk.raw", Config=STREAMED_PARTS)
        job_id = create_image(t, f"{bucket}:disk.raw")
        job = kill_mid_job_and_see_it_resume(srv, t, job_id, total, "import")
        image_id = job.entities.image_id
        shown = glance_show(t.raw, image_id)
        assert shown["status"] == "active" and shown["virtual_size"] == total, shown
        assert image_sha256(t.raw, image_id) == (want, total)
        fsck = admin(srv.data_dir, "fsck", binary=srv.binary)
        assert fsck["clean"], fsck
    finally:
        _stop_checked(srv)


def test_kill9_mid_export_resumes_from_its_checkpoint(tmp_path):
    """An export through the streaming writer (vhd) is killed (kill -9) after a checkpoint; on
    restart the job continues the same multipart upload from the checkpoint (the disk before it
    is not read again) and the exported file equals the source disk."""
    import subprocess

    from conftest import _start, _stop_checked
    from helpers import admin, wait_job
    from test_import_export import bucket_for, create_image, export

    # Checkpoints every 16 MiB of output, so one exists long before the end.
    srv = _start(tmp_path, "exp", extra=("--import-checkpoint-mib", "16"))
    try:
        t = make_tenant(srv, "er")
        bucket = bucket_for(t)
        total = 768 * MiB
        path = tmp_path / "disk.raw"
        sparse_disk(path, total)
        t.s3().upload_file(str(path), bucket, "disk.raw")
        job = wait_job(t.ims, create_image(t, f"{bucket}:disk.raw"), timeout=120)
        assert job.status == "SUCCESS", job
        image_id = job.entities.image_id
        job_id = export(t, image_id, f"{bucket}:out/disk.vhd", fmt="vhd")
        kill_mid_job_and_see_it_resume(srv, t, job_id, total, "export")
        out = tmp_path / "disk.vhd"
        t.s3().download_file(bucket, "out/disk.vhd", str(out))
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vpc", str(path), str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert t.s3().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        fsck = admin(srv.data_dir, "fsck", binary=srv.binary)
        assert fsck["clean"], fsck
    finally:
        _stop_checked(srv)
