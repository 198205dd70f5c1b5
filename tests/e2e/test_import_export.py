"""Images from bucket objects and exports to bucket objects, with the official IMS SDK and boto3.

qcow2, vhd, vmdk and raw files made by qemu-img are uploaded to a bucket, imported
(create_image, create_data_image, quick import, register_image, v2.1 variants), exported to
every format, downloaded with boto3 and compared with the original by `qemu-img compare`.
Bad input: hostile files, missing objects, other projects' buckets, min_disk too small, and
every export refusal code.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from huaweicloudsdkcore.exceptions import exceptions as sdk_exc
from huaweicloudsdkims.v2 import (
    CreateDataImageRequest,
    CreateDataImageRequestBody,
    CreateImageInSafeModeRequest,
    CreateImageRequest,
    CreateImageRequestBody,
    ExportImageInSafeModeRequest,
    ExportImageRequest,
    ExportImageRequestBody,
    GlanceCreateImageMetadataRequest,
    GlanceCreateImageMetadataRequestBody,
    ImportImageQuickRequest,
    QuickImportImageByFileRequestBody,
    RegisterImageRequest,
    RegisterImageRequestBody,
)

import helpers
from helpers import glance_show, unique, wait_job

ROOT = Path(__file__).resolve().parents[2]
REGION = "local-1"
MiB = 1 << 20


def qemu(*args):
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def make_disk(tmp: Path, fmt: str, size="48M") -> Path:
    """A raw disk with data at a few offsets (and holes), converted to `fmt` by qemu-img."""
    raw = tmp / f"src-{fmt}-{secrets.token_hex(3)}.raw"
    with open(raw, "wb") as f:
        f.truncate(48 * MiB)
        for off in (0, 5 * MiB + 4096, 20 * MiB, 47 * MiB):
            f.seek(off)
            f.write(os.urandom(700 * 1024 if off < 47 * MiB else 1024 * 1024))
    if fmt == "raw":
        return raw
    out = raw.with_suffix("." + fmt)
    extra = {"vmdk": ["-o", "subformat=streamOptimized"], "vhd": ["-o", "force_size=on"]}.get(fmt, [])
    qemu("convert", "-O", {"vhd": "vpc"}.get(fmt, fmt), *extra, str(raw), str(out))
    return out


def upload(t, bucket, key, path: Path):
    t.s3().upload_file(str(path), bucket, key)


def bucket_for(t) -> str:
    b = f"io-{secrets.token_hex(5)}"
    t.s3().create_bucket(Bucket=b)
    return b


def job_ok(t, job_id, timeout=180):
    job = wait_job(t.ims, job_id, timeout=timeout)
    assert job.status == "SUCCESS", job
    return job


def job_failed(t, job_id, timeout=180):
    job = wait_job(t.ims, job_id, timeout=timeout)
    assert job.status == "FAIL", job
    assert job.fail_reason and job.error_code, job
    return job


def create_image(t, url, min_disk=1, v21=False, **kw):
    body = CreateImageRequestBody(name=unique("imp"), image_url=url, min_disk=min_disk, **kw)
    if v21:
        return t.ims.create_image_in_safe_mode(CreateImageInSafeModeRequest(body=body)).job_id
    return t.ims.create_image(CreateImageRequest(body=body)).job_id


def export(t, image_id, url, fmt=None, quick=None, v21=False):
    body = ExportImageRequestBody(bucket_url=url, file_format=fmt, is_quick_export=quick)
    if v21:
        return t.ims.export_image_in_safe_mode(ExportImageInSafeModeRequest(image_id=image_id, body=body)).job_id
    return t.ims.export_image(ExportImageRequest(image_id=image_id, body=body)).job_id


def refused(code, fn, *args, status=400, **kw):
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        fn(*args, **kw)
    assert e.value.status_code == status and e.value.error_code == code, (e.value.error_code, e.value.error_msg)
    return e.value


def same_disk(a: Path, b: Path):
    p = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{a.name} and {b.name} differ: {p.stdout} {p.stderr}"


def images_of(t):
    return t.raw.get("/v2/cloudimages").json()["images"]


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(server):
    t = helpers.make_tenant(server, "io")
    return t, bucket_for(t)


def test_import_every_format_and_export_to_every_format(site, tmp_path):
    t, bucket = site
    srcs = {fmt: make_disk(tmp_path, fmt) for fmt in ("qcow2", "vhd", "vmdk", "raw")}
    jobs = {}
    for i, (fmt, path) in enumerate(srcs.items()):
        key = f"in/Windows Server 2012 {fmt}.{fmt}"  # spaces are fine in an import
        upload(t, bucket, key, path)
        jobs[fmt] = create_image(t, f"{bucket}:{key}", min_disk=1, v21=(i % 2 == 1),
                                 os_version="Ubuntu 22.04 server 64bit")
    images = {}
    for fmt, job_id in jobs.items():
        job = job_ok(t, job_id)
        assert job.job_type == "imsImportImageJob", job
        img = glance_show(t.raw, job.entities.image_id)
        assert img["status"] == "active", img
        assert img["virtual_size"] == 48 * MiB and img["__root_origin"] == "file", img
        assert img["__os_version"] == "Ubuntu 22.04 server 64bit", img
        images[fmt] = img["id"]
    # Every image exports to every format and reads back as the original disk.
    for src_fmt, image_id in images.items():
        for i, out_fmt in enumerate(("qcow2", "vhd", "vmdk")):
            key = f"out/{src_fmt}-to-{out_fmt}.{out_fmt}"
            job = job_ok(t, export(t, image_id, f"{bucket}:{key}", out_fmt, v21=(i == 1)))
            assert job.job_type == "imsNativeExportImageJob", job
            local = tmp_path / f"dl-{src_fmt}-{out_fmt}.{out_fmt}"
            t.s3().download_file(bucket, key, str(local))
            info = json.loads(qemu("info", "--output=json", str(local)))
            assert info["format"] == {"vhd": "vpc"}.get(out_fmt, out_fmt), info
            if out_fmt == "vmdk":
                assert "streamOptimized" in qemu("info", str(local)), info
            same_disk(srcs[src_fmt], local)


def test_quick_export_and_quick_import_round_trip(site, tmp_path):
    t, bucket = site
    src = make_disk(tmp_path, "qcow2")
    upload(t, bucket, "q/src.qcow2", src)
    image_id = job_ok(t, create_image(t, f"{bucket}:q/src.qcow2")).entities.image_id
    job_ok(t, export(t, image_id, f"{bucket}:q/quick.raw", quick=True))
    heads = {k: t.s3().head_object(Bucket=bucket, Key=k) for k in ("q/quick.raw", "q/quick.raw.bitmap")}
    assert heads["q/quick.raw"]["ContentLength"] == 48 * MiB
    assert heads["q/quick.raw"]["Metadata"]["openims-disk-digest"].startswith("blake3-manifest:")
    local = tmp_path / "quick.raw"
    t.s3().download_file(bucket, "q/quick.raw", str(local))
    same_disk(src, local)
    # Quick import of the pair (bitmap used) and of a plain raw file (no bitmap).
    body = QuickImportImageByFileRequestBody(name=unique("quick"), image_url=f"{bucket}:q/quick.raw", min_disk=10,
                                             os_version="Ubuntu 22.04 server 64bit")
    job = job_ok(t, t.ims.import_image_quick(ImportImageQuickRequest(body=body)).job_id)
    img = glance_show(t.raw, job.entities.image_id)
    assert img["status"] == "active" and img["__lazyloading"] == "true", img
    # The same content gives the same disk digest whichever way it came in.
    assert img["__disk_digest"] == glance_show(t.raw, image_id)["__disk_digest"]
    t.s3().copy_object(Bucket=bucket, Key="q/plain.raw", CopySource={"Bucket": bucket, "Key": "q/quick.raw"})
    body = QuickImportImageByFileRequestBody(name=unique("quickdata"), image_url=f"{bucket}:q/plain.raw",
                                             min_disk=10, type="DataImage", os_type="Linux")
    job = job_ok(t, t.ims.import_image_quick(ImportImageQuickRequest(body=body)).job_id)
    img = glance_show(t.raw, job.entities.image_id)
    assert img["virtual_env_type"] == "DataImage" and img["__disk_digest"] == glance_show(t.raw, image_id)["__disk_digest"]
    # Quick import takes raw only.
    job = job_failed(t, t.ims.import_image_quick(ImportImageQuickRequest(body=QuickImportImageByFileRequestBody(
        name=unique("quickq"), image_url=f"{bucket}:q/src.qcow2", min_disk=10,
        os_version="Ubuntu 22.04 server 64bit"))).job_id)
    assert "raw" in job.fail_reason, job


def test_data_image_and_register_flow(site, tmp_path):
    t, bucket = site
    src = make_disk(tmp_path, "vhd")
    upload(t, bucket, "d/data.vhd", src)
    body = CreateDataImageRequestBody(name=unique("data"), image_url=f"{bucket}:d/data.vhd", min_disk=1,
                                      os_type="Windows", description="data disk")
    job = job_ok(t, t.ims.create_data_image(CreateDataImageRequest(body=body)).job_id)
    assert job.job_type == "imsImportDataImageJob"
    img = glance_show(t.raw, job.entities.image_id)
    assert img["virtual_env_type"] == "DataImage" and img["__os_type"] == "Windows", img
    # Register: metadata first, then the file.
    meta = t.ims.glance_create_image_metadata(GlanceCreateImageMetadataRequest(body=GlanceCreateImageMetadataRequestBody(
        name=unique("reg"), container_format="bare", disk_format="vhd", min_disk=1,
        os_version="Ubuntu 22.04 server 64bit")))
    assert meta.status == "queued"
    job = job_ok(t, t.ims.register_image(RegisterImageRequest(
        image_id=meta.id, body=RegisterImageRequestBody(image_url=f"{bucket}:d/data.vhd"))).job_id)
    assert job.job_type == "imsNativeImportImageJob" and job.entities.image_id == meta.id
    img = glance_show(t.raw, meta.id)
    assert img["status"] == "active" and img["virtual_size"] == 48 * MiB, img
    # Its data, downloaded through Glance, is the disk.
    r = t.raw.get(f"/v2/images/{meta.id}/file")
    assert r.status_code == 200
    (tmp_path / "reg.raw").write_bytes(r.content)
    same_disk(src, tmp_path / "reg.raw")
    # Registering an active image again is refused; a format that does not match fails the job.
    refused_reg = pytest.raises(sdk_exc.ClientRequestException)
    with refused_reg:
        t.ims.register_image(RegisterImageRequest(image_id=meta.id, body=RegisterImageRequestBody(
            image_url=f"{bucket}:d/data.vhd")))
    meta2 = t.ims.glance_create_image_metadata(GlanceCreateImageMetadataRequest(body=GlanceCreateImageMetadataRequestBody(
        name=unique("reg"), container_format="bare", disk_format="qcow2")))
    job = job_failed(t, t.ims.register_image(RegisterImageRequest(
        image_id=meta2.id, body=RegisterImageRequestBody(image_url=f"{bucket}:d/data.vhd"))).job_id)
    assert "qcow2" in job.fail_reason and glance_show(t.raw, meta2.id)["status"] == "killed"


def test_encrypted_import_with_cmk(site, tmp_path):
    from test_kms_copy import create_key
    t, bucket = site
    src = make_disk(tmp_path, "qcow2")
    upload(t, bucket, "k/src.qcow2", src)
    key = create_key(t)
    job = job_ok(t, create_image(t, f"{bucket}:k/src.qcow2", cmk_id=key))
    img = glance_show(t.raw, job.entities.image_id)
    assert img["__system__cmkid"] == key and img["status"] == "active", img
    job_ok(t, export(t, img["id"], f"{bucket}:k/out.qcow2", "qcow2"))
    t.s3().download_file(bucket, "k/out.qcow2", str(tmp_path / "out.qcow2"))
    same_disk(src, tmp_path / "out.qcow2")
    refused("IMG.0071", export, t, img["id"], f"{bucket}:k/quick.raw", quick=True)
    refused("IMG.0095", create_image, t, f"{bucket}:k/src.qcow2", cmk_id="0" * 8 + "-0000-0000-0000-" + "0" * 12)


# ---- bad input --------------------------------------------------------------------------------

def hostile_corpus() -> tuple[Path, list]:
    """The formats corpus, generated once per script version (cached: it takes minutes)."""
    script = ROOT / "scripts" / "make-hostile-corpus.sh"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:16]
    out = Path.home() / ".cache" / f"openims-hostile-corpus-{digest}"
    if not (out / "expected.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["bash", str(script), str(tmp)], check=True, capture_output=True, timeout=900, cwd=ROOT)
        try:
            tmp.rename(out)
        except OSError:
            pass  # another worker made it first
    return out, json.loads((out / "expected.json").read_text())


def test_hostile_files_fail_the_job_and_nothing_becomes_active(tenant):
    t, bucket = tenant, bucket_for(tenant)
    out, entries = hostile_corpus()
    # A representative sample: one file of each family (the prefix of its name).
    seen, sample = set(), []
    for e in entries:
        family = e["file"].split("-")[0] + "-" + e["file"].split("-")[1] if "-" in e["file"] else e["file"]
        if family not in seen:
            seen.add(family)
            sample.append(e)
    assert len(sample) >= 10
    sample = sample[:40]  # the private-image quota is 50
    started = {}
    for e in sample:
        key = f"hostile/{e['file']}"
        upload(t, bucket, key, out / e["file"])
        try:
            started[e["file"]] = create_image(t, f"{bucket}:{key}", min_disk=1024,
                                              os_version="Ubuntu 22.04 server 64bit")
        except sdk_exc.ClientRequestException as exc:
            # Refused at once (an ISO-looking or empty file): also fine, nothing was created.
            assert exc.error_code in ("IMG.0057", "IMG.0166", "IMG.0059"), (e["file"], exc.error_msg)
    problems = []
    for name, job_id in started.items():
        job = wait_job(t.ims, job_id, timeout=180)
        e = next(x for x in sample if x["file"] == name)
        if job.status != "FAIL":
            problems.append(f"{name}: job {job.status}")
            continue
        img = glance_show(t.raw, job.entities.image_id)
        if img["status"] == "active":
            problems.append(f"{name}: image active")
        if job.error_code != "IMG.0057" or not any(v in job.fail_reason for v in e["expected"]):
            problems.append(f"{name}: {job.error_code} {job.fail_reason!r}, expected one of {e['expected']}")
    assert not problems, "\n".join(problems)
    assert not [i for i in images_of(t) if i["name"].startswith("imp") and i["status"] == "active"
                and i.get("__data_origin", "").startswith(f"file,{bucket}:hostile/")]


def test_missing_object_other_bucket_min_disk_and_request_checks(site, tenant_b, tmp_path):
    t, bucket = site
    src = make_disk(tmp_path, "qcow2")
    upload(t, bucket, "m/src.qcow2", src)
    refused("IMG.0057", create_image, t, f"{bucket}:m/missing.qcow2")
    refused("IMG.0017", create_image, t, "no-colon-here")
    refused("IMG.0068", create_image, t, ":m/src.qcow2")
    refused("IMG.0069", create_image, t, f"nosuchbucket-{secrets.token_hex(4)}:m/src.qcow2")
    # Another project's bucket: denied, for imports and for exports.
    refused("IMG.0069", create_image, tenant_b, f"{bucket}:m/src.qcow2")
    refused("IMG.0055", create_image, t, f"{bucket}:m/src.qcow2", min_disk=0)
    refused("IMG.0056", create_image, t, f"{bucket}:m/src.qcow2", os_version="Not An OS 1.0")
    # min_disk smaller than the disk in the file: the job fails, nothing active.
    big = tmp_path / "big.qcow2"
    qemu("create", "-f", "qcow2", str(big), "3G")
    upload(t, bucket, "m/big.qcow2", big)
    job = job_failed(t, create_image(t, f"{bucket}:m/big.qcow2", min_disk=2))
    assert job.error_code == "IMG.0055" and "min_disk" in job.fail_reason, job
    assert glance_show(t.raw, job.entities.image_id)["status"] == "killed"
    job_ok(t, create_image(t, f"{bucket}:m/big.qcow2", min_disk=3))
    # ISO files need os_version.
    iso = tmp_path / "cd.iso"
    with open(iso, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(0x8001)
        f.write(b"CD001")
    upload(t, bucket, "m/cd.iso", iso)
    refused("IMG.0166", create_image, t, f"{bucket}:m/cd.iso")


def test_every_export_refusal(site, tenant_b, tmp_path):
    t, bucket = site
    src = make_disk(tmp_path, "raw")
    upload(t, bucket, "e/src.raw", src)
    image_id = job_ok(t, create_image(t, f"{bucket}:e/src.raw")).entities.image_id
    job_ok(t, export(t, image_id, f"{bucket}:e/exists.qcow2", "qcow2"))
    refused("IMG.0070", export, t, image_id, f"{bucket}:e/exists.qcow2", "qcow2")
    b_bucket = bucket_for(tenant_b)
    refused("IMG.0069", export, t, image_id, f"{b_bucket}:x.qcow2", "qcow2")
    refused("IMG.0069", export, t, image_id, f"nosuch-{secrets.token_hex(4)}:x.qcow2", "qcow2")
    refused("IMG.0068", export, t, image_id, ":x.qcow2", "qcow2")
    refused("IMG.0073", export, t, image_id, f"{bucket}:", "qcow2")
    refused("IMG.0073", export, t, image_id, f"{bucket}:folder/", "qcow2")
    refused("IMG.0074", export, t, image_id, f"{bucket}:" + "a" * 1100, "qcow2")
    refused("IMG.0075", export, t, image_id, f"{bucket}:bad\\name.qcow2", "qcow2")
    refused("IMG.0175", export, t, image_id, f"{bucket}:my folder/x.qcow2", "qcow2")
    refused("IMG.0109", export, t, image_id, "Bad_Bucket!:x.qcow2", "qcow2")
    e = refused("IMG.0072", export, t, image_id, f"{bucket}:x.zvhd2", "zvhd2")
    assert "no public specification" in e.error_msg
    refused("IMG.0072", export, t, image_id, f"{bucket}:x.zvhd", "zvhd")
    refused("IMG.0072", export, t, image_id, f"{bucket}:x.vdi", "vdi")
    refused("IMG.0001", export, t, image_id, f"{bucket}:x.raw", "qcow2", quick=True)
    refused("IMG.0027", export, tenant_b, image_id, f"{b_bucket}:x.qcow2", "qcow2", status=404)
    # Public and too-large images (states the API cannot produce, set in the database); the
    # full-ECS refusal (IMG.0128) is shown on an imported whole image in test_whole_image.py.
    for attrs, code in ((("visibility", "public"), "IMG.0077"), (("virtual_size", 129 << 30), "IMG.0160")):
        other = job_ok(t, create_image(t, f"{bucket}:e/src.raw")).entities.image_id
        t.server.sql(f"UPDATE images SET {attrs[0]} = ? WHERE id = ?", attrs[1], other)
        refused(code, export, t, other, f"{bucket}:e/never.qcow2", "qcow2")
    # One export of an image at a time.
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
        for off in range(0, 1 << 30, 64 * MiB):
            f.seek(off)
            f.write(os.urandom(2 * MiB))
    upload(t, bucket, "e/big.raw", big)
    big_id = job_ok(t, create_image(t, f"{bucket}:e/big.raw", min_disk=1)).entities.image_id
    first = export(t, big_id, f"{bucket}:e/big1.vmdk", "vmdk")
    refused("IMG.0148", export, t, big_id, f"{bucket}:e/big2.vmdk", "vmdk")
    job_ok(t, first)
    # ISO images cannot be exported.
    iso = tmp_path / "cd.iso"
    with open(iso, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(0x8001)
        f.write(b"CD001")
    upload(t, bucket, "e/cd.iso", iso)
    job = wait_job(t.ims, create_image(t, f"{bucket}:e/cd.iso", os_version="Ubuntu 22.04 server 64bit",
                                       type="IsoImage"), timeout=120)
    if job.status == "SUCCESS":
        refused("IMG.0167", export, t, job.entities.image_id, f"{bucket}:e/cd.qcow2", "qcow2")
    else:
        assert job.error_code == "IMG.0057", job
    # A queued image (no data) cannot be exported.
    meta = t.ims.glance_create_image_metadata(GlanceCreateImageMetadataRequest(body=GlanceCreateImageMetadataRequestBody(
        name=unique("q"), container_format="bare", disk_format="raw")))
    refused("IMG.0046", export, t, meta.id, f"{bucket}:e/q.qcow2", "qcow2")
