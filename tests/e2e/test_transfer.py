"""`openims transfer` between two `openims serve` instances (two regions) on loopback: export at
the source, download, upload to the target's bucket, register there, verify the disk digest end
to end. The transfer is killed in the middle of its download and again in the middle of its
upload; each re-run resumes (ranged download from the bytes on disk, ListParts for the upload)
instead of starting over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import helpers
from helpers import OPENIMS_BIN, Server, default_tenant, glance_show, unique, wait_job
from huaweicloudsdkims.v2 import CreateImageRequest, CreateImageRequestBody

MiB = 1 << 20


@pytest.fixture
def two_sites(tmp_path):
    a = Server(tmp_path / "a-data", tmp_path / "a.log", extra_args=["--region", "region-a"]).start()
    b = Server(tmp_path / "b-data", tmp_path / "b.log", extra_args=["--region", "region-b"]).start()
    try:
        yield a, b
    finally:
        for srv in (a, b):
            srv.terminate()
            if srv in helpers.RUNNING_SERVERS:
                helpers.RUNNING_SERVERS.remove(srv)


def wait_for(pred, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_transfer_resumes_after_kills_and_verifies(two_sites, tmp_path):
    a, b = two_sites
    ta, tb = default_tenant(a), default_tenant(b)
    sa, sb = ta.s3("region-a"), tb.s3("region-b")
    sa.create_bucket(Bucket="src-bucket")
    sb.create_bucket(Bucket="dst-bucket")
    # A 160 MiB disk with 96 MiB of incompressible data.
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(160 * MiB)
        for i in range(12):
            f.seek(i * 13 * MiB)
            f.write(os.urandom(8 * MiB))
    src = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(src)], check=True, timeout=120)
    sa.upload_file(str(src), "src-bucket", "disk.qcow2")
    job = wait_job(ta.ims, ta.ims.create_image(CreateImageRequest(body=CreateImageRequestBody(
        name=unique("xfer"), image_url="src-bucket:disk.qcow2", min_disk=1,
        os_version="Ubuntu 22.04 server 64bit"))).job_id, timeout=120)
    assert job.status == "SUCCESS", job
    image_id = job.entities.image_id

    work = tmp_path / "work"
    args = [str(OPENIMS_BIN), "transfer", "--image", image_id, "--format", "qcow2", "--work-dir", str(work),
            "--part-size-mib", "8", "--no-progress", "--json", "--keep-file",
            "--from-endpoint", a.endpoint, "--from-s3-endpoint", a.s3_endpoint, "--from-region", "region-a",
            "--from-access-key", ta.ak, "--from-secret-key", ta.sk, "--from-project-id", ta.project_id,
            "--from-bucket", "src-bucket",
            "--to-endpoint", b.endpoint, "--to-s3-endpoint", b.s3_endpoint, "--to-region", "region-b",
            "--to-access-key", tb.ak, "--to-secret-key", tb.sk, "--to-project-id", tb.project_id,
            "--to-bucket", "dst-bucket"]
    state = work / f"{image_id}.qcow2.transfer.json"
    part = work / f"{image_id}.qcow2.part"

    def start(rate, n):
        err = open(tmp_path / f"run{n}.err", "w")
        return subprocess.Popen(args + ["--limit-rate", str(rate)], stdout=subprocess.PIPE, stderr=err, text=True)

    # Run 1: killed in the middle of the download.
    p = start(16 * MiB, 1)
    wait_for(lambda: part.exists() and part.stat().st_size >= 24 * MiB or p.poll() is not None, "download progress")
    assert p.poll() is None, "the transfer ended before it could be interrupted"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    downloaded_before = part.stat().st_size
    st = json.loads(state.read_text())
    assert st["exported"] and not st["downloaded"] and 0 < downloaded_before < st["size"], st

    # Run 2: resumes the download, killed in the middle of the upload.
    p = start(16 * MiB, 2)

    def parts_at_target():
        s = json.loads(state.read_text()) if state.exists() else {}
        if not s.get("upload_id"):
            return 0
        r = sb.list_parts(Bucket="dst-bucket", Key=s["object"], UploadId=s["upload_id"])
        return len(r.get("Parts", []))

    wait_for(lambda: p.poll() is not None or parts_at_target() >= 3, "upload progress")
    assert p.poll() is None, "the transfer ended before it could be interrupted"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    err2 = (tmp_path / "run2.err").read_text()
    resumed_at = int(err2.split("download: resuming at byte ")[1].split()[0])
    assert resumed_at >= downloaded_before - 32 * MiB and resumed_at > 0, err2
    st = json.loads(state.read_text())
    assert st["downloaded"] and not st["uploaded"], st

    # Run 3: resumes the upload and finishes.
    p = start(0, 3)
    out, _ = p.communicate(timeout=300)
    err3 = (tmp_path / "run3.err").read_text()
    assert p.returncode == 0, err3
    assert "upload: resuming" in err3, err3
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["verified"] is True
    assert summary["parts_already_uploaded"] >= 3, summary
    assert summary["bytes_uploaded"] < summary["bytes"], summary
    assert summary["bytes_downloaded"] == 0, summary  # the download had finished in run 2
    assert not state.exists()

    # The target's image is the source's disk; the kept file is the export.
    target = glance_show(tb.raw, summary["target_image_id"])
    assert target["status"] == "active", target
    assert target["__disk_digest"] == glance_show(ta.raw, image_id)["__disk_digest"]
    r = tb.raw.get(f"/v2/images/{target['id']}/file")
    assert r.status_code == 200
    (tmp_path / "target.raw").write_bytes(r.content)
    for f in (tmp_path / "target.raw", Path(summary["file"])):
        c = subprocess.run(["qemu-img", "compare", str(src), str(f)], capture_output=True, text=True, timeout=120)
        assert c.returncode == 0, c.stdout + c.stderr

    # Running again after success starts a new transfer (the state file is gone) and the
    # export refuses to overwrite the existing file: a clear error, nothing changed.
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "IMG.0070" in again.stderr, again.stderr
