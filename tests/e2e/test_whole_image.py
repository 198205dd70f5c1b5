"""Multi-disk file import with the official IMS SDK and boto3: `create_whole_image` from a qcow2
system disk and a vhd data disk (our extension, docs/import-export.md), `create_image` with
`data_images[]` of files, the full-ECS rules on a really imported whole image (export IMG.0128,
in-region copy IMG.0130), deletion, and a hostile second file (job FAIL, nothing active).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from huaweicloudsdkcore.exceptions import exceptions as sdk_exc
from huaweicloudsdkims.v2 import (
    CopyImageInRegionRequest,
    CopyImageInRegionRequestBody,
    CreateImageRequest,
    CreateImageRequestBody,
    CreateWholeImageRequest,
    CreateWholeImageRequestBody,
    ExportImageRequest,
    ExportImageRequestBody,
)

import helpers
from helpers import glance_show, unique, wait_job
from sharing_helpers import insert_projects

REGION = "local-1"
MiB = 1 << 20


class WholeImageFromFilesBody(CreateWholeImageRequestBody):
    """The SDK's create_whole_image body plus the file fields of our extension."""

    openapi_types = dict(CreateWholeImageRequestBody.openapi_types, image_url="str", min_disk="int",
                         os_version="str", data_images="list[object]")
    attribute_map = dict(CreateWholeImageRequestBody.attribute_map, image_url="image_url",
                         min_disk="min_disk", os_version="os_version", data_images="data_images")

    def __init__(self, image_url=None, min_disk=None, os_version=None, data_images=None, **kw):
        super().__init__(**kw)
        self.image_url, self.min_disk, self.os_version, self.data_images = image_url, min_disk, os_version, data_images


class ImageWithDataFilesBody(CreateImageRequestBody):
    """The SDK's create_image body, whose `data_images` entries carry files (spec A.1)."""

    openapi_types = dict(CreateImageRequestBody.openapi_types, data_images="list[object]")


def qemu(*args):
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def make_disk(tmp: Path, fmt: str, mib: int) -> tuple[Path, Path]:
    """(file in `fmt`, the raw disk it holds): data at a few offsets, holes elsewhere."""
    raw = tmp / f"src-{secrets.token_hex(3)}.raw"
    with open(raw, "wb") as f:
        f.truncate(mib * MiB)
        for off in (0, 3 * MiB + 4096, (mib - 1) * MiB):
            f.seek(off)
            f.write(os.urandom(600 * 1024))
    out = raw.with_suffix("." + fmt)
    extra = ["-o", "force_size=on"] if fmt == "vhd" else []
    qemu("convert", "-O", {"vhd": "vpc"}.get(fmt, fmt), *extra, str(raw), str(out))
    return out, raw


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def download(t, image_id) -> bytes:
    r = t.raw.get(f"/v2/images/{image_id}/file")
    assert r.status_code == 200, (r.status_code, r.text[:300])
    return r.content


def whole(t, sys_url, data, min_disk=1, name=None):
    body = WholeImageFromFilesBody(name=name or unique("whole"), image_url=sys_url, min_disk=min_disk,
                                   os_version="Ubuntu 22.04 server 64bit", data_images=data,
                                   description="full-ECS image from files")
    return t.ims.create_whole_image(CreateWholeImageRequest(body=body)).job_id


def refused(code, fn, *args, status=400, **kw):
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        fn(*args, **kw)
    assert e.value.status_code == status and e.value.error_code == code, (e.value.error_code, e.value.error_msg)
    return e.value


@pytest.fixture(scope="module")
def site(server):
    t = helpers.make_tenant(server, "whole")
    b = f"wh-{secrets.token_hex(5)}"
    t.s3().create_bucket(Bucket=b)
    return t, b


def test_whole_image_from_qcow2_system_and_vhd_data_disk(site, tmp_path):
    t, bucket = site
    sys_file, sys_raw = make_disk(tmp_path, "qcow2", 40)
    data_file, data_raw = make_disk(tmp_path, "vhd", 24)
    t.s3().upload_file(str(sys_file), bucket, "w/system.qcow2")
    t.s3().upload_file(str(data_file), bucket, "w/data disk.vhd")
    name = unique("whole")
    job = wait_job(t.ims, whole(t, f"{bucket}:w/system.qcow2",
                                [{"name": unique("data"), "image_url": f"{bucket}:w/data disk.vhd", "min_disk": 1}],
                                name=name), timeout=180)
    assert job.status == "SUCCESS", job
    w = glance_show(t.raw, job.entities.image_id)
    assert w["status"] == "active" and w["__whole_image"] == "true" and w["name"] == name, w
    members = w["__whole_image_disks"].split(",")
    assert len(members) == 2, w
    sys_img, data_img = (glance_show(t.raw, m) for m in members)
    for m in (sys_img, data_img):
        assert m["status"] == "active" and m["__whole_image_id"] == w["id"], m
    assert sys_img["__source_format"] == "qcow2" and data_img["__source_format"] == "vhd"
    assert data_img["virtual_env_type"] == "DataImage" and sys_img["virtual_env_type"] == "FusionCompute"
    # Each member's bytes are its source disk.
    got_sys, got_data = download(t, sys_img["id"]), download(t, data_img["id"])
    assert sha256(got_sys) == sha256(sys_raw.read_bytes())
    raw_len = data_raw.stat().st_size  # qemu-img may round a vhd's size up; the tail must be zero
    assert sha256(got_data[:raw_len]) == sha256(data_raw.read_bytes()) and not got_data[raw_len:].strip(b"\0")
    # Full-ECS rules, on the image the API made.
    refused("IMG.0128", t.ims.export_image, ExportImageRequest(
        image_id=w["id"], body=ExportImageRequestBody(bucket_url=f"{bucket}:w/never.qcow2", file_format="qcow2")))
    refused("IMG.0130", t.ims.copy_image_in_region, CopyImageInRegionRequest(
        image_id=w["id"], body=CopyImageInRegionRequestBody(name=unique("copy"))))
    # At most 10 members when shared (256 for its disks).
    projects = insert_projects(t, 11)
    r = t.raw.post("/v1/cloudimages/members", json_body={"images": [w["id"]], "projects": projects})
    assert r.status_code == 400 and r.json()["error"]["code"] == "IMG.0088", (r.status_code, r.text)
    job = wait_job(t.ims, t.raw.post("/v1/cloudimages/members", json_body={
        "images": [sys_img["id"]], "projects": projects}).json()["job_id"], timeout=60)
    assert job.status == "SUCCESS", job
    # A member goes only with its whole image; the whole image takes its members along.
    r = t.raw.delete(f"/v2/images/{data_img['id']}")
    assert r.status_code >= 400 and "full-ECS" in r.text, (r.status_code, r.text)
    r = t.raw.delete(f"/v2/images/{w['id']}")
    assert r.status_code == 204, (r.status_code, r.text)
    for m in members + [w["id"]]:
        assert t.raw.get(f"/v2/images/{m}").status_code == 404


def test_create_image_with_data_image_files(site, tmp_path):
    t, bucket = site
    sys_file, sys_raw = make_disk(tmp_path, "qcow2", 16)
    data_file, data_raw = make_disk(tmp_path, "qcow2", 8)
    t.s3().upload_file(str(sys_file), bucket, "c/sys.qcow2")
    t.s3().upload_file(str(data_file), bucket, "c/data.qcow2")
    dname = unique("cdata")
    body = ImageWithDataFilesBody(name=unique("csys"), image_url=f"{bucket}:c/sys.qcow2", min_disk=1,
                                  data_images=[{"name": dname, "image_url": f"{bucket}:c/data.qcow2", "min_disk": 1}])
    job = wait_job(t.ims, t.ims.create_image(CreateImageRequest(body=body)).job_id, timeout=180)
    assert job.status == "SUCCESS", job
    sys_img = glance_show(t.raw, job.entities.image_id)
    assert sys_img["status"] == "active" and "__whole_image_id" not in sys_img, sys_img
    data = [i for i in t.raw.get("/v2/cloudimages", query={"name": dname}).json()["images"]]
    assert len(data) == 1 and data[0]["status"] == "active", data
    assert sha256(download(t, sys_img["id"])) == sha256(sys_raw.read_bytes())
    assert sha256(download(t, data[0]["id"])) == sha256(data_raw.read_bytes())


def test_hostile_second_file_fails_the_job_and_nothing_becomes_active(site, tmp_path):
    t, bucket = site
    sys_file, _ = make_disk(tmp_path, "qcow2", 8)
    t.s3().upload_file(str(sys_file), bucket, "h/sys.qcow2")
    hostile = tmp_path / "backing.qcow2"  # a backing file would read the host's /etc/passwd
    qemu("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(hostile), "8M")
    t.s3().upload_file(str(hostile), bucket, "h/hostile.qcow2")
    name, dname = unique("hwhole"), unique("hdata")
    job = wait_job(t.ims, whole(t, f"{bucket}:h/sys.qcow2",
                                [{"name": dname, "image_url": f"{bucket}:h/hostile.qcow2", "min_disk": 1}],
                                name=name), timeout=180)
    assert job.status == "FAIL" and job.fail_reason and "backing_file" in job.fail_reason and "h/hostile.qcow2" in job.fail_reason, job
    listed = t.raw.get("/v2/cloudimages").json()["images"]
    mine = [i for i in listed if i["name"] in (name, name + "-system", dname)]
    assert len(mine) == 3 and all(i["status"] != "active" for i in mine), mine
    # A missing second file is refused at the request; nothing is created.
    refused("IMG.0057", whole, t, f"{bucket}:h/sys.qcow2",
            [{"name": unique("m"), "image_url": f"{bucket}:h/missing.qcow2", "min_disk": 1}], name=unique("mw"))
    # A second disk larger than its min_disk fails the job too.
    big, _ = make_disk(tmp_path, "qcow2", 8)
    qemu("resize", str(big), "2G")
    t.s3().upload_file(str(big), bucket, "h/big.qcow2")
    name2 = unique("bwhole")
    job = wait_job(t.ims, whole(t, f"{bucket}:h/sys.qcow2",
                                [{"name": unique("b"), "image_url": f"{bucket}:h/big.qcow2", "min_disk": 1}],
                                name=name2), timeout=180)
    assert job.status == "FAIL" and job.error_code == "IMG.0055", job
    w = glance_show(t.raw, job.entities.image_id)
    assert w["status"] == "killed", w
