"""Cross-region replication (spec C.2) between two `openims serve` deployments on loopback,
configured as peer regions, driven with the official `huaweicloudsdkims` SDK.

Region A replicates to region B with the AK/SK of a peer service account made on B. A tenant's
account (domain) exists in both regions under the same name. Every result is downloaded from B
through Glance and compared byte for byte with the source."""

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest
from huaweicloudsdkcore.exceptions import exceptions as sdk_exc
from huaweicloudsdkims.v2 import CopyImageCrossRegionRequest, CopyImageCrossRegionRequestBody

from helpers import (
    Server, Tenant, describe, glance_create, make_active_image, unique, wait_job,
)
from test_kms_copy import copy_ok, create_key, disable

MiB = 1 << 20
CHUNK = 4 * MiB
# An encrypted chunk object: magic, nonce, ciphertext checksum (52 bytes) + data + GCM tag (16).
ECHUNK_OVERHEAD = 52 + 16


@dataclass
class Regions:
    a: Server
    b: Server
    tmp: Path


def start_regions(tmp: Path, bandwidth_mb: float = 0.0, max_jobs: int = 5) -> Regions:
    b = Server(tmp / "b-data", tmp / "b.log", extra_args=["--region", "region-b"])
    b.start()
    svc = b.admin("peer-account", "create")
    cfg = tmp / "a.toml"
    cfg.write_text(
        f"max_copy_jobs_per_project = {max_jobs}\n"
        "[peers.region-b]\n"
        f'endpoint = "{b.endpoint}"\n'
        f'access_key = "{svc["access_key"]}"\n'
        f'secret_key = "{svc["secret_key"]}"\n'
        f"bandwidth_mb_per_sec = {bandwidth_mb}\n"
    )
    a = Server(tmp / "a-data", tmp / "a.log", extra_args=["--region", "region-a", "--config", str(cfg)])
    a.start()
    return Regions(a=a, b=b, tmp=tmp)


def stop_regions(r: Regions) -> None:
    for s in (r.a, r.b):
        if s.alive():
            s.terminate(timeout=15)


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    r = start_regions(tmp_path_factory.mktemp("xr"))
    yield r
    stop_regions(r)


def tenant_in(srv: Server, domain: str, project: str, *, create_domain: bool) -> Tenant:
    """A tenant of `domain` in `srv` (the domain is made there when `create_domain`)."""
    if create_domain:
        dom = srv.admin("domain", "create", domain)
    else:
        dom = [d for d in srv.admin("domain", "list") if d["name"] == domain][0]
    proj = srv.admin("project", "create", project, "--domain", domain)
    user = f"u{secrets.token_hex(3)}"
    pw = "Pw-" + secrets.token_urlsafe(12)
    srv.admin("user", "create", user, "--domain", domain, "--password", pw)
    srv.admin("user", "grant", user, "--project", proj["id"], "--domain", domain)
    key = srv.admin("key", "create", "--project", proj["id"], "--user", user, "--domain", domain)
    return Tenant(server=srv, domain=domain, domain_id=dom["id"], project=project, project_id=proj["id"],
                  user=user, password=pw, ak=key["access_key"], sk=key["secret_key"])


@dataclass
class Account:
    a: Tenant  # the account's project in region A
    b: Tenant  # its project in region B
    agency: str


def account(r: Regions, *, agency: bool = True) -> Account:
    dom = f"acct{secrets.token_hex(4)}"
    ta = tenant_in(r.a, dom, "region-a", create_domain=True)
    tb = tenant_in(r.b, dom, "region-b", create_domain=True)
    name = "ims_admin_agency"
    if agency:
        r.a.admin("agency", "create", name, "--domain", dom)
    return Account(a=ta, b=tb, agency=name)


def xr_copy(t: Tenant, image_id: str, *, region="region-b", project_name="region-b", agency="ims_admin_agency",
            name=None, vault_id=None) -> str:
    body = CopyImageCrossRegionRequestBody(name=name or unique("xr"), description="e2e", region=region,
                                           project_name=project_name, agency_name=agency, vault_id=vault_id)
    return t.ims.copy_image_cross_region(CopyImageCrossRegionRequest(image_id=image_id, body=body)).job_id


def xr_refused(t: Tenant, image_id: str, code: str, status: int = 400, **kw):
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        xr_copy(t, image_id, **kw)
    assert (e.value.status_code, e.value.error_code) == (status, code), (e.value.error_code, e.value.error_msg)


def job_view(t: Tenant, job_id: str) -> dict:
    r = t.raw.get(f"/v1/{t.project_id}/jobs/{job_id}")
    assert r.status_code == 200, describe(r)
    return r.json()


def xr_ok(acct: Account, image_id: str, timeout: float = 240, **kw):
    job_id = xr_copy(acct.a, image_id, agency=acct.agency, **kw)
    job = wait_job(acct.a.ims, job_id, timeout=timeout)
    assert job.status == "SUCCESS", job
    assert job.job_type == "imsCrossRegionCopyImageJob", job
    v = job_view(acct.a, job_id)
    new_id = v["entities"]["image_id"]
    shown = acct.b.raw.get(f"/v2/images/{new_id}")
    assert shown.status_code == 200, describe(shown)
    assert shown.json()["status"] == "active", shown.json()
    return new_id, v


def assert_same_disk(t: Tenant, image_id: str, data: bytes):
    r = t.raw.get(f"/v2/images/{image_id}/file")
    assert r.status_code == 200, describe(r)
    assert len(r.content) == len(data), (len(r.content), len(data))
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(data).digest(), f"{image_id} differs from source"


def test_copy_equals_source_and_second_copy_sends_only_changes(regions):
    acct = account(regions)
    size = 64 * MiB
    data = bytearray(os.urandom(size))
    src = make_active_image(acct.a.raw, bytes(data), name=unique("src"))
    new_id, v = xr_ok(acct, src["id"])
    assert_same_disk(acct.b, new_id, bytes(data))
    sent1 = v["entities"]["bytes_sent"]
    assert size <= sent1 <= size + CHUNK, v["entities"]
    assert v["entities"]["bytes_done"] == v["entities"]["bytes_total"] == size, v["entities"]
    shown = acct.b.raw.get(f"/v2/images/{new_id}").json()
    assert shown["owner"] == acct.b.project_id and shown.get("__originalimagename") == src["id"], shown

    # A new version with 1% of the disk changed (one contiguous range): only its chunk travels.
    changed = size // 100
    off = 20 * MiB + 12345
    data[off:off + changed] = os.urandom(changed)
    src2 = make_active_image(acct.a.raw, bytes(data), name=unique("src-v2"))
    new2, v2 = xr_ok(acct, src2["id"])
    assert_same_disk(acct.b, new2, bytes(data))
    sent2 = v2["entities"]["bytes_sent"]
    print(f"cross-region bytes sent: first copy {sent1}, after changing {changed} bytes: {sent2}")
    assert changed <= sent2 <= 2 * CHUNK, v2["entities"]
    assert v2["entities"]["chunks_present"] >= size // CHUNK - 2, v2["entities"]


def test_encrypted_image_needs_target_key_and_data_key_is_rewrapped(regions):
    acct = account(regions)
    data = os.urandom(9 * MiB)
    plain = make_active_image(acct.a.raw, data, name=unique("plain"))
    ka = create_key(acct.a)
    enc_id, enc = copy_ok(acct.a, plain["id"], ka)
    assert enc["__system__cmkid"] == ka
    # Without a key of the target region: refused (spec C.2).
    xr_refused(acct.a, enc_id, "IMG.9033", agency=acct.agency)
    kb = create_key(acct.b)

    def raw_xr(image_id, cmk):
        return acct.a.raw.post(f"/v1/cloudimages/{image_id}/cross_region_copy", json_body={
            "name": unique("xrenc"), "region": "region-b", "project_name": "region-b",
            "agency_name": acct.agency, "cmk_id": cmk})

    r = raw_xr(enc_id, "0" * 8 + "-0000-0000-0000-" + "0" * 12)
    assert r.status_code == 400 and r.json()["error"]["code"] == "IMG.0095", describe(r)
    r = raw_xr(enc_id, ka)  # a key of region A means nothing in region B
    assert r.status_code == 400 and r.json()["error"]["code"] == "IMG.0095", describe(r)
    other = tenant_in(regions.b, acct.b.domain, "region-b_other", create_domain=False)
    r = raw_xr(enc_id, create_key(other))  # another project's key, not granted
    assert r.status_code == 400 and r.json()["error"]["code"] == "IMG.0099", describe(r)
    kb_off = create_key(acct.b)
    disable(acct.b, kb_off)
    r = raw_xr(enc_id, kb_off)
    assert r.status_code == 400 and r.json()["error"]["code"] == "IMG.0097", describe(r)

    r = raw_xr(enc_id, kb)
    assert r.status_code == 200, describe(r)
    job = wait_job(acct.a.ims, r.json()["job_id"], timeout=120)
    assert job.status == "SUCCESS", job
    new_id = job.entities.image_id
    shown = acct.b.raw.get(f"/v2/images/{new_id}").json()
    assert shown["status"] == "active" and shown["__system__cmkid"] == kb, shown
    assert_same_disk(acct.b, new_id, data)
    # The data key is wrapped by region B's key: disabling it makes the copy unusable there.
    disable(acct.b, kb)
    r = acct.b.raw.get(f"/v2/images/{new_id}/file")
    assert r.status_code == 400 and r.json()["error"]["code"] == "IMG.0102", describe(r)

    # An unencrypted image copied with a key of region B arrives encrypted with it.
    kb2 = create_key(acct.b)
    r = raw_xr(plain["id"], kb2)
    assert r.status_code == 200, describe(r)
    job = wait_job(acct.a.ims, r.json()["job_id"], timeout=120)
    assert job.status == "SUCCESS", job
    shown = acct.b.raw.get(f"/v2/images/{job.entities.image_id}").json()
    assert shown["__system__cmkid"] == kb2, shown
    assert_same_disk(acct.b, job.entities.image_id, data)


def test_rules_and_codes(regions):
    acct = account(regions)
    img = make_active_image(acct.a.raw, os.urandom(MiB), name=unique("r"))
    iid = img["id"]
    xr_refused(acct.a, iid, "IMG.9031", region="region-x", agency=acct.agency)
    xr_refused(acct.a, iid, "IMG.9030", region="region-a", agency=acct.agency)
    xr_refused(acct.a, iid, "IMG.0145", project_name="no-such-project", agency=acct.agency)
    xr_refused(acct.a, iid, "IMG.0179", agency="no_such_agency")
    # An agency that delegates to another service does not let IMS act.
    regions.a.admin("agency", "create", "ecs_agency", "--domain", acct.a.domain, "--service", "op_svc_ecs")
    xr_refused(acct.a, iid, "IMG.0179", agency="ecs_agency")
    # No project name while the account has several projects in the target region.
    tenant_in(regions.b, acct.b.domain, "region-b_second", create_domain=False)
    xr_refused(acct.a, iid, "IMG.0104", project_name="", agency=acct.agency)
    xr_refused(acct.a, iid, "IMG.0001", region="", agency=acct.agency)
    # An ISO image.
    iso_data = bytearray(MiB)
    for off, kind in ((0x8000, 1), (0x8800, 0xFF)):  # primary volume descriptor, terminator
        iso_data[off] = kind
        iso_data[off + 1:off + 6] = b"CD001"
        iso_data[off + 6] = 1
    iso = make_active_image(acct.a.raw, bytes(iso_data), name=unique("iso"), disk_format="iso")
    xr_refused(acct.a, iso["id"], "IMG.0167", agency=acct.agency)
    # Not active.
    queued = glance_create(acct.a.raw, name=unique("q"), disk_format="raw", container_format="bare")
    xr_refused(acct.a, queued["id"], "IMG.0046", agency=acct.agency)
    # Unknown image.
    xr_refused(acct.a, "7a3c8d3e-0000-4000-8000-000000000000", "IMG.0027", status=404, agency=acct.agency)
    # Name checks.
    xr_refused(acct.a, iid, "IMG.0002", name="x" * 129, agency=acct.agency)
    # Nothing was created in region B by any refused request.
    r = acct.b.raw.get("/v2/images")
    assert r.status_code == 200 and r.json()["images"] == [], r.json()


def test_isolation(regions):
    acct = account(regions)
    img = make_active_image(acct.a.raw, os.urandom(MiB), name=unique("mine"))
    intruder = account(regions)
    xr_refused(intruder.a, img["id"], "IMG.0027", status=404, agency=intruder.agency)
    # Tenants cannot call the peer API: it is for peer service accounts only.
    r = acct.a.raw.post("/peer/v1/chunks/missing", json_body={"encrypted": False, "ids": []})
    assert r.status_code == 403 and r.json()["error"]["code"] == "IMG.9034", describe(r)
    r = acct.b.raw.post("/peer/v1/preflight", json_body={"domain_name": acct.b.domain, "project_name": "region-b"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "IMG.9034", describe(r)


def test_job_watch_cli(regions):
    acct = account(regions)
    img = make_active_image(acct.a.raw, os.urandom(5 * MiB), name=unique("w"))
    job_id = xr_copy(acct.a, img["id"], agency=acct.agency)
    import subprocess
    from helpers import OPENIMS_BIN
    p = subprocess.run([str(OPENIMS_BIN), "job", "watch", job_id, "--endpoint", acct.a.endpoint,
                        "--access-key", acct.a.ak, "--secret-key", acct.a.sk, "--project-id", acct.a.project_id,
                        "--output", "json", "--timeout", "120"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    import json
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert lines and lines[-1]["status"] == "SUCCESS", lines[-3:]
    assert lines[-1]["entities"]["bytes_sent"] >= 5 * MiB, lines[-1]
    # The progress-bar view of the finished job ends with its outcome.
    p = subprocess.run([str(OPENIMS_BIN), "job", "watch", job_id, "--endpoint", acct.a.endpoint,
                        "--access-key", acct.a.ak, "--secret-key", acct.a.sk, "--project-id", acct.a.project_id],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and f"job {job_id} SUCCESS" in p.stdout, (p.stdout, p.stderr)
    # Another project cannot watch it.
    other = account(regions)
    p = subprocess.run([str(OPENIMS_BIN), "job", "watch", job_id, "--endpoint", other.a.endpoint,
                        "--access-key", other.a.ak, "--secret-key", other.a.sk, "--project-id", other.a.project_id],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "IMG.9001" in p.stderr, (p.stdout, p.stderr)


@pytest.mark.crash
@pytest.mark.timeout(600)
@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypting"])
def test_kill9_source_during_cross_region_copy_resumes(tmp_path, encrypt):
    """kill -9 of the source region mid-copy; with `encrypting`, an unencrypted image copied
    with a key of the target region (chunks encrypted on the way): the resumed job must still
    name every chunk by its encrypted id, those of the batch offered before the kill too."""
    # A bandwidth limit towards the peer keeps the copy running long enough to be killed.
    r = start_regions(tmp_path, bandwidth_mb=16.0, max_jobs=1)
    try:
        acct = account(r)
        size = 96 * MiB  # 24 chunks: a first batch of 16, then 8
        data = os.urandom(size)
        src = make_active_image(acct.a.raw, data, name=unique("big"))
        if encrypt:
            kb = create_key(acct.b)
            resp = acct.a.raw.post(f"/v1/cloudimages/{src['id']}/cross_region_copy", json_body={
                "name": unique("xrenc"), "region": "region-b", "project_name": "region-b",
                "agency_name": acct.agency, "cmk_id": kb})
            assert resp.status_code == 200, describe(resp)
            job_id = resp.json()["job_id"]
        else:
            job_id = xr_copy(acct.a, src["id"], agency=acct.agency)
        seen = []
        while True:
            v = job_view(acct.a, job_id)
            seen.append((v["status"], v["entities"].get("bytes_sent")))
            assert v["status"] != "FAIL", v
            if v["status"] == "SUCCESS":
                break
            # Past the first batch (64 MiB offered, a durable checkpoint), before the end.
            if v["status"] == "RUNNING" and (v["entities"].get("bytes_sent") or 0) >= 72 * MiB:
                break
        assert v["status"] == "RUNNING", f"the copy ended before it could be interrupted: {seen[-3:]}"
        # The per-project limit on concurrent replications (configured to 1 here).
        xr_refused(acct.a, src["id"], "IMG.0060", agency=acct.agency)
        r.a.kill9()
        new_id = v["entities"]["image_id"]
        # Nothing half-written is visible in region B while the source is down.
        rb = acct.b.raw.get(f"/v2/images/{new_id}")
        assert rb.status_code == 404, describe(rb)
        # Region B loses every chunk it received so far (say, restored from an older backup).
        # The resumed job skips the batch it already offered, so only the commit can notice:
        # B must report the lost chunks and A must send them again.
        kind, stored = ("echunks", CHUNK + ECHUNK_OVERHEAD) if encrypt else ("chunks", CHUNK)
        lost = [f for f in (tmp_path / "b-data").rglob("*") if f.is_file() and kind in f.parts
                and f.stat().st_size == stored]
        assert len(lost) >= 16, f"region B should hold the first batch: {len(lost)} chunks"
        for f in lost:
            f.unlink()
        r.a.start(port=r.a.port)
        job = wait_job(acct.a.ims, job_id, timeout=300)
        assert job.status == "SUCCESS", job
        log = re.sub(r"\x1b\[[0-9;]*m", "", r.a.log_tail(400))
        assert "cross-region copy resumes from its checkpoint" in log, "the job did not resume"
        assert "stage=0 chunk=16" in log, "the resumed job did not skip the batch already offered"
        assert "the target lacks chunks at commit; sending them again" in log, "no re-send at commit"
        final = job_view(acct.a, job_id)
        sent = final["entities"]["bytes_sent"]
        present = final["entities"].get("chunks_present") or 0
        # Only the lost chunks were sent twice (plus at most the ones in flight at the kill),
        # and every chunk reached the target: sent by this job, or found already there (a chunk
        # that arrived just before the kill, after the last recorded count).
        assert sent <= size + (len(lost) + 2) * CHUNK, final["entities"]
        assert sent + present * CHUNK >= size, final["entities"]
        assert_same_disk(acct.b, new_id, data)
        if encrypt:
            shown = acct.b.raw.get(f"/v2/images/{new_id}").json()
            assert shown["__system__cmkid"] == kb, shown
        fsck = r.b.admin("fsck")
        assert fsck["clean"], fsck
    finally:
        stop_regions(r)


@pytest.mark.crash
@pytest.mark.timeout(600)
def test_kill9_target_during_cross_region_copy_is_retried(tmp_path):
    """The peer region dies (kill -9) and comes back: the job waits for it and completes."""
    r = start_regions(tmp_path, bandwidth_mb=16.0)
    try:
        acct = account(r)
        size = 64 * MiB
        data = os.urandom(size)
        src = make_active_image(acct.a.raw, data, name=unique("big"))
        job_id = xr_copy(acct.a, src["id"], agency=acct.agency)
        while True:
            v = job_view(acct.a, job_id)
            assert v["status"] not in ("FAIL", "SUCCESS"), f"the copy ended before the peer could be killed: {v}"
            if v["status"] == "RUNNING" and (v["entities"].get("bytes_sent") or 0) >= 16 * MiB:
                break
        r.b.kill9()
        # The job notices and waits for the peer (bounded: it retries for about a minute).
        for _ in range(600):
            v = job_view(acct.a, job_id)
            assert v["status"] == "RUNNING", v
            if v["entities"]["current_task"] == "waiting for the peer region":
                break
        else:
            raise AssertionError(f"the job never waited for the peer: {v}")
        r.b.start(port=r.b.port)
        job = wait_job(acct.a.ims, job_id, timeout=300)
        assert job.status == "SUCCESS", job
        assert "peer unavailable; retrying" in r.a.log_tail(400)
        final = job_view(acct.a, job_id)
        assert_same_disk(acct.b, final["entities"]["image_id"], data)
        fsck = r.b.admin("fsck")
        assert fsck["clean"], fsck
    finally:
        stop_regions(r)
