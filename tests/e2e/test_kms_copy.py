"""Embedded KMS, encrypted images and the key rules of in-region replication (S1, S2, S6),
driven with the official `huaweicloudsdkkms` and `huaweicloudsdkims` SDKs.

Every copy's disk is downloaded through Glance (`GET /v2/images/{id}/file`) and compared
byte for byte with the source."""

import json

import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions import exceptions as sdk_exc
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkims.v2 import (
    CopyImageInRegionInSafeModeRequest, CopyImageInRegionRequest,
    CopyImageInRegionRequestBody, ShowJobRequest,
)
from huaweicloudsdkkms.v2 import (
    CancelGrantRequest, CancelKeyDeletionRequest, CreateGrantRequest, CreateGrantRequestBody, CreateKeyRequest,
    CreateKeyRequestBody, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, KmsClient, ListGrantsRequest,
    ListGrantsRequestBody, ListKeyDetailRequest, ListKeysRequest, ListKeysRequestBody, OperateKeyRequestBody,
    RevokeGrantRequestBody, ScheduleKeyDeletionRequestBody,
)

from helpers import (
    GeneratedBody, OCTET, admin, describe, error_code, glance_create, glance_show, image_sha256, make_active_image,
    make_tenant, raw_bytes, unique, wait_job,
)

MiB = 1 << 20


def kms_client(t) -> KmsClient:
    cfg = HttpConfig.get_default_config()
    cfg.timeout = (5, 60)
    return (KmsClient.new_builder()
            .with_http_config(cfg)
            .with_credentials(BasicCredentials(t.ak, t.sk, t.project_id))
            .with_endpoints([t.endpoint])
            .build())


def create_key(t, alias=None) -> str:
    r = kms_client(t).create_key(CreateKeyRequest(body=CreateKeyRequestBody(
        key_alias=alias or unique("key"), key_description="e2e key")))
    assert r.key_info.key_id and r.key_info.domain_id == t.domain_id, r
    return r.key_info.key_id


def key_state(t, key_id) -> str:
    return kms_client(t).list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=key_id))).key_info.key_state


def disable(t, key_id):
    r = kms_client(t).disable_key(DisableKeyRequest(body=OperateKeyRequestBody(key_id=key_id)))
    assert r.key_info.key_state == "3", r


def enable(t, key_id):
    r = kms_client(t).enable_key(EnableKeyRequest(body=OperateKeyRequestBody(key_id=key_id)))
    assert r.key_info.key_state == "2", r


def copy(t, image_id, cmk_id=None, name=None, v21=False):
    """Starts an in-region copy with the IMS SDK; returns the job id."""
    if v21:  # POST /v2.1/cloudimages/{id}/copy
        body = CopyImageInRegionRequestBody(name=name or unique("copy"), description="e2e", cmk_id=cmk_id)
        return t.ims.copy_image_in_region_in_safe_mode(
            CopyImageInRegionInSafeModeRequest(image_id=image_id, body=body)).job_id
    body = CopyImageInRegionRequestBody(name=name or unique("copy"), description="e2e", cmk_id=cmk_id)
    return t.ims.copy_image_in_region(CopyImageInRegionRequest(image_id=image_id, body=body)).job_id


def copy_ok(t, image_id, cmk_id=None, v21=False, timeout=120, at_once=False):
    """A copy that ends in SUCCESS; `at_once`: an O(1) copy (shared data, only the data key
    re-wrapped), made within the request, so the first show_job already answers SUCCESS."""
    job_id = copy(t, image_id, cmk_id, v21=v21)
    if at_once:
        first = t.ims.show_job(ShowJobRequest(job_id=job_id))
        assert first.status == "SUCCESS", first
        assert job_view(t, job_id)["entities"]["process_percent"] == 100
    job = wait_job(t.ims, job_id, timeout=timeout)
    assert job.status == "SUCCESS", job
    new_id = job.entities.image_id
    shown = glance_show(t.raw, new_id)
    assert shown["status"] == "active", shown
    return new_id, shown


def copy_refused(t, image_id, cmk_id, code):
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        copy(t, image_id, cmk_id)
    assert e.value.status_code == 400 and e.value.error_code == code, (e.value.error_code, e.value.error_msg)


def download(t, image_id):
    return t.raw.get(f"/v2/images/{image_id}/file")


def assert_same_disk(t, image_id, data):
    r = download(t, image_id)
    assert r.status_code == 200, describe(r)
    assert len(r.content) == len(data) and r.content == data, f"image {image_id}: content differs from the source"


def assert_download_refused(t, image_id, code):
    r = download(t, image_id)
    assert r.status_code == 400 and error_code(r) == code, describe(r)


@pytest.fixture
def src(tenant):
    return make_active_image(tenant.raw, raw_bytes(3 * MiB + 12345), name=unique("src"))


# ---------------------------------------------------------------------------------------------
# KMS with the official SDK
# ---------------------------------------------------------------------------------------------

def test_kms_key_lifecycle_with_the_sdk(tenant, tenant_b):
    kms = kms_client(tenant)
    a = create_key(tenant, "alias-a")
    b = create_key(tenant)
    with pytest.raises(sdk_exc.ClientRequestException):  # alias taken
        create_key(tenant, "alias-a")
    listed = kms.list_keys(ListKeysRequest(body=ListKeysRequestBody(limit="10")))
    assert listed.keys == [a, b] and listed.total == 2 and listed.truncated == "false"
    assert {d.key_id for d in listed.key_details} == {a, b}
    page = kms.list_keys(ListKeysRequest(body=ListKeysRequestBody(limit="1")))
    assert page.keys == [a] and page.truncated == "true" and page.next_marker == a
    page2 = kms.list_keys(ListKeysRequest(body=ListKeysRequestBody(limit="1", marker=page.next_marker)))
    assert page2.keys == [b]
    d = kms.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=a))).key_info
    assert (d.key_alias, d.key_state, d.key_spec, d.domain_id) == ("alias-a", "2", "AES_256", tenant.domain_id)

    disable(tenant, a)
    assert key_state(tenant, a) == "3"
    with pytest.raises(sdk_exc.ClientRequestException):  # already disabled
        kms.disable_key(DisableKeyRequest(body=OperateKeyRequestBody(key_id=a)))
    enable(tenant, a)
    r = kms.delete_key(DeleteKeyRequest(body=ScheduleKeyDeletionRequestBody(key_id=b, pending_days="7")))
    assert r.key_state == "4"
    d = kms.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=b))).key_info
    assert d.key_state == "4" and d.scheduled_deletion_date
    with pytest.raises(sdk_exc.ClientRequestException):  # pending_days outside 7..1096
        kms.delete_key(DeleteKeyRequest(body=ScheduleKeyDeletionRequestBody(key_id=a, pending_days="3")))
    r = kms.cancel_key_deletion(CancelKeyDeletionRequest(body=OperateKeyRequestBody(key_id=b)))
    assert r.key_state == "3"
    only_enabled = kms.list_keys(ListKeysRequest(body=ListKeysRequestBody(key_state="2")))
    assert only_enabled.keys == [a]

    # Grants.
    g = kms.create_grant(CreateGrantRequest(body=CreateGrantRequestBody(
        key_id=a, grantee_principal=tenant_b.project_id, operations=["describe-key", "decrypt-datakey"],
        name="to-b"))).grant_id
    grants = kms.list_grants(ListGrantsRequest(body=ListGrantsRequestBody(key_id=a)))
    assert [x.grant_id for x in grants.grants] == [g] and grants.total == 1
    assert grants.grants[0].grantee_principal == tenant_b.project_id
    assert key_state(tenant_b, a) == "2"  # the grantee may describe it
    kms.cancel_grant(CancelGrantRequest(body=RevokeGrantRequestBody(key_id=a, grant_id=g)))
    assert kms.list_grants(ListGrantsRequest(body=ListGrantsRequestBody(key_id=a))).total == 0

    # Another project sees neither the keys nor may manage them; wrong project in the path.
    assert kms_client(tenant_b).list_keys(ListKeysRequest(body=ListKeysRequestBody())).total == 0
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        kms_client(tenant_b).disable_key(DisableKeyRequest(body=OperateKeyRequestBody(key_id=a)))
    assert e.value.error_code == "IMG.0099"
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        key_state(tenant_b, a)
    assert e.value.error_code == "IMG.0099"
    r = tenant.raw.post(f"/v1.0/{tenant_b.project_id}/kms/list-keys", json_body={})
    assert r.status_code == 403, describe(r)
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        key_state(tenant, "00000000-0000-0000-0000-000000000000")
    assert e.value.error_code == "IMG.0095"


def test_root_key_file_and_no_plaintext_key_material(server, tenant):
    root = server.data_dir / "root.key"
    assert root.stat().st_size == 32 and (root.stat().st_mode & 0o777) == 0o600
    key_id = create_key(tenant)
    ((material,),) = server.sql("SELECT material FROM kms_keys WHERE id = ?", key_id)
    # Sealed: nonce + 32-byte key + tag, never the bare 32 bytes.
    assert len(bytes.fromhex(material)) == 12 + 32 + 16


# ---------------------------------------------------------------------------------------------
# S1: encrypt, re-key, decrypt; every copy equals the source
# ---------------------------------------------------------------------------------------------

def test_encrypt_rekey_decrypt_chain_keeps_the_disk(tenant, src):
    data = src["_data"]
    k1, k2 = create_key(tenant), create_key(tenant)

    # Unencrypted -> encrypted: a streaming job with progress.
    enc_job = copy(tenant, src["id"], k1)
    job = wait_job(tenant.ims, enc_job, timeout=120)
    assert job.status == "SUCCESS", job
    enc_id = job.entities.image_id
    raw_job = tenant.raw.get(f"/v1/{tenant.project_id}/jobs/{enc_job}").json()
    ent = raw_job["entities"]
    assert ent["bytes_total"] >= len(data) and ent["bytes_done"] == ent["bytes_total"], raw_job
    assert ent["process_percent"] == 100, raw_job
    enc = glance_show(tenant.raw, enc_id)
    assert enc["__system__cmkid"] == k1 and enc["status"] == "active"
    assert_same_disk(tenant, enc_id, data)

    # Same key: IMG.0096.
    copy_refused(tenant, enc_id, k1, "IMG.0096")

    # Re-key (v2.1) and decrypt (v1): O(1) copies of the same data.
    rek_id, rek = copy_ok(tenant, enc_id, k2, v21=True, at_once=True)
    assert rek["__system__cmkid"] == k2
    assert_same_disk(tenant, rek_id, data)
    dec_id, dec = copy_ok(tenant, enc_id, None, at_once=True)
    assert "__system__cmkid" not in dec
    assert_same_disk(tenant, dec_id, data)
    # Unencrypted copy of the decrypted copy, and re-encryption of it with a key.
    dec2_id, _ = copy_ok(tenant, dec_id, "", at_once=True)
    assert_same_disk(tenant, dec2_id, data)
    enc2_id, enc2 = copy_ok(tenant, dec_id, k2)
    assert enc2["__system__cmkid"] == k2
    assert_same_disk(tenant, enc2_id, data)

    # Full re-encryption on request (extension field), through the raw API.
    r = tenant.raw.post(f"/v1/cloudimages/{rek_id}/copy",
                        json_body={"name": unique("reenc"), "cmk_id": k1, "__reencrypt_data": True})
    assert r.status_code == 200, describe(r)
    job = wait_job(tenant.ims, r.json()["job_id"], timeout=120)
    assert job.status == "SUCCESS", job
    assert_same_disk(tenant, job.entities.image_id, data)

    # Disabling the source's key, then deleting the source, never breaks the copies made from it.
    disable(tenant, k1)
    assert_download_refused(tenant, enc_id, "IMG.0102")
    for i in (rek_id, dec_id, dec2_id):
        assert_same_disk(tenant, i, data)
    enable(tenant, k1)
    tenant.raw.delete(f"/v2/images/{enc_id}")
    tenant.raw.delete(f"/v2/images/{src['id']}")
    for i in (rek_id, dec_id, dec2_id, enc2_id):
        assert_same_disk(tenant, i, data)


def test_deleting_the_source_and_disabling_its_key_during_copies_breaks_neither(tenant):
    """Copies accepted before their source is deleted (and, for an encrypted source, its key
    disabled) still succeed with the source's disk, even with a GC pass (no grace) in between:
    the job's snapshot of the source keeps the data."""
    t = tenant
    total = 128 * MiB
    img = glance_create(t.raw, name=unique("big"), disk_format="raw", container_format="bare")
    r = t.raw.put(f"/v2/images/{img['id']}/file", stream_body=GeneratedBody(total=total, random_every=4 * MiB),
                  content_type=OCTET, timeout=300)
    assert r.status_code == 204, describe(r)
    want = image_sha256(t.raw, img["id"])
    k1, k2 = create_key(t), create_key(t)
    # An encrypted source (k1) to re-key from, made first.
    enc_job = wait_job(t.ims, copy(t, img["id"], k1), timeout=240)
    assert enc_job.status == "SUCCESS", enc_job
    enc_id = enc_job.entities.image_id

    # Encrypting copy (plaintext source -> k2, every chunk re-encrypted) and full re-encryption
    # of the encrypted source (k1 -> k2): both stream the source's chunks.
    jobs = [copy(t, img["id"], k2)]
    r = t.raw.post(f"/v1/cloudimages/{enc_id}/copy",
                   json_body={"name": unique("reenc"), "cmk_id": k2, "__reencrypt_data": True})
    assert r.status_code == 200, describe(r)
    jobs.append(r.json()["job_id"])
    # The sources go, the old key is disabled, and GC runs with no grace, while the jobs run.
    disable(t, k1)
    for i in (img["id"], enc_id):
        assert t.raw.delete(f"/v2/images/{i}").status_code == 204
    states = [t.raw.get(f"/v1/{t.project_id}/jobs/{j}").json()["status"] for j in jobs]
    admin(t.server.data_dir, "gc", "--grace-secs", "0", binary=t.server.binary)
    print(f"job states when the sources were deleted: {states}")
    for j in jobs:
        job = wait_job(t.ims, j, timeout=240)
        assert job.status == "SUCCESS", job
        shown = glance_show(t.raw, job.entities.image_id)
        assert shown["status"] == "active" and shown["__system__cmkid"] == k2, shown
        assert image_sha256(t.raw, job.entities.image_id) == want
    enable(t, k1)
    fsck = admin(t.server.data_dir, "fsck", binary=t.server.binary)
    assert fsck["clean"], fsck


def test_disabling_a_key_makes_exactly_its_images_unusable(tenant, src):
    data = src["_data"]
    k1, k2 = create_key(tenant), create_key(tenant)
    a_id, _ = copy_ok(tenant, src["id"], k1)
    b_id, _ = copy_ok(tenant, src["id"], k2)
    a2_id, _ = copy_ok(tenant, a_id, k2)  # re-keyed away from k1

    disable(tenant, k1)
    assert_download_refused(tenant, a_id, "IMG.0102")
    copy_refused(tenant, a_id, None, "IMG.0102")      # decrypt needs the source key
    copy_refused(tenant, a_id, k2, "IMG.0102")        # so does re-keying
    copy_refused(tenant, src["id"], k1, "IMG.0097")   # a disabled target key
    for i in (b_id, a2_id, src["id"]):
        assert_same_disk(tenant, i, data)

    enable(tenant, k1)
    assert_same_disk(tenant, a_id, data)
    copy_ok(tenant, a_id, None)

    # Pending deletion also makes the key (and its images) unusable; cancelling + enabling restores.
    kms = kms_client(tenant)
    kms.delete_key(DeleteKeyRequest(body=ScheduleKeyDeletionRequestBody(key_id=k1, pending_days="7")))
    assert_download_refused(tenant, a_id, "IMG.0102")
    copy_refused(tenant, src["id"], k1, "IMG.0097")
    kms.cancel_key_deletion(CancelKeyDeletionRequest(body=OperateKeyRequestBody(key_id=k1)))
    enable(tenant, k1)
    assert_same_disk(tenant, a_id, data)


def test_missing_key_and_other_projects_keys(tenant, tenant_b, src):
    copy_refused(tenant, src["id"], "00000000-0000-0000-0000-000000000000", "IMG.0095")
    copy_refused(tenant, src["id"], "not-a-key", "IMG.0095")
    kb = create_key(tenant_b)
    # Not granted: IMG.0099.
    copy_refused(tenant, src["id"], kb, "IMG.0099")
    # Granted: the copy is encrypted with the other project's key.
    g = kms_client(tenant_b).create_grant(CreateGrantRequest(body=CreateGrantRequestBody(
        key_id=kb, grantee_principal=tenant.project_id,
        operations=["create-datakey", "encrypt-datakey", "decrypt-datakey", "describe-key"]))).grant_id
    enc_id, enc = copy_ok(tenant, src["id"], kb)
    assert enc["__system__cmkid"] == kb
    assert_same_disk(tenant, enc_id, src["_data"])
    # The owner revokes the grant: the image's key becomes inaccessible (IMG.0103).
    kms_client(tenant_b).cancel_grant(CancelGrantRequest(body=RevokeGrantRequestBody(key_id=kb, grant_id=g)))
    assert_download_refused(tenant, enc_id, "IMG.0103")
    copy_refused(tenant, enc_id, None, "IMG.0103")


def test_deleted_key_codes(tenant, src):
    """A key past its deletion date no longer exists: IMG.0095 as a target, IMG.0101 for its images."""
    k = create_key(tenant)
    enc_id, _ = copy_ok(tenant, src["id"], k)
    kms_client(tenant).delete_key(DeleteKeyRequest(body=ScheduleKeyDeletionRequestBody(key_id=k, pending_days="7")))
    # Move the deletion date into the past (the service checks it on every use).
    tenant.server.sql("UPDATE kms_keys SET deletion_at = 1 WHERE id = ?", k)
    copy_refused(tenant, src["id"], k, "IMG.0095")
    assert_download_refused(tenant, enc_id, "IMG.0101")
    copy_refused(tenant, enc_id, None, "IMG.0101")


def test_copy_rules_still_hold_for_encrypted_requests(tenant, src):
    k = create_key(tenant)
    # Non-active image.
    q = glance_create(tenant.raw, name=unique("queued"), disk_format="raw", container_format="bare")
    copy_refused(tenant, q["id"], k, "IMG.0046")
    # Another project's image is invisible.
    other = make_tenant(tenant.server, "o")
    with pytest.raises(sdk_exc.ClientRequestException) as e:
        copy(other, src["id"], None)
    assert e.value.status_code == 404


# ---------------------------------------------------------------------------------------------
# S6: metering
# ---------------------------------------------------------------------------------------------

def test_usage_counts_replicas_once(tenant, src):
    size = len(src["_data"])
    u0 = tenant.raw.get("/v1/cloudimages/usage").json()
    assert u0["logical_bytes"] == size and u0["billable_bytes"] <= size and u0["images"] == 1, u0
    copy_ok(tenant, src["id"])
    k = create_key(tenant)
    enc_id, _ = copy_ok(tenant, src["id"], k)
    copy_ok(tenant, enc_id, None)  # decrypted copy shares the encrypted chunks
    u = tenant.raw.get("/v1/cloudimages/usage").json()
    assert u["images"] == 4 and u["logical_bytes"] == 4 * size, u
    # One plaintext set + one encrypted set; the plain and decrypted replicas add nothing.
    assert u["billable_bytes"] == 2 * u0["billable_bytes"], u
    assert "each project" in u["cross_project_policy"]
    # The CLI client prints the same numbers.
    import subprocess
    from helpers import OPENIMS_BIN
    out = subprocess.run([str(OPENIMS_BIN), "usage", "--endpoint", tenant.endpoint, "--access-key", tenant.ak,
                          "--secret-key", tenant.sk, "--project-id", tenant.project_id, "--output", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli["billable_bytes"] == u["billable_bytes"] and cli["logical_bytes"] == u["logical_bytes"]


# ---------------------------------------------------------------------------------------------
# Crash: kill -9 during an encrypting copy
# ---------------------------------------------------------------------------------------------

def job_view(t, job_id):
    r = t.raw.get(f"/v1/{t.project_id}/jobs/{job_id}")
    assert r.status_code == 200, describe(r)
    return r.json()


@pytest.mark.crash
@pytest.mark.timeout(600)
def test_kill9_during_encrypting_copy_resumes(fresh_server):
    srv = fresh_server
    t = make_tenant(srv, "kc")
    total = 256 * MiB
    img = glance_create(t.raw, name=unique("big"), disk_format="raw", container_format="bare")
    body = GeneratedBody(total=total, random_every=4 * MiB)  # a random 64 KiB block in every chunk
    r = t.raw.put(f"/v2/images/{img['id']}/file", stream_body=body, content_type=OCTET, timeout=300)
    assert r.status_code == 204, describe(r)
    k = create_key(t)
    job_id = copy(t, img["id"], k)

    # Kill as soon as the job reports a durable checkpoint (progress past the first 64 MiB).
    seen = []
    killed = False
    while True:
        v = job_view(t, job_id)
        seen.append((v["status"], v["entities"]["bytes_done"]))
        if v["status"] in ("SUCCESS", "FAIL"):
            break
        if v["status"] == "RUNNING" and v["entities"]["bytes_done"] >= 64 * MiB:
            srv.kill9()
            killed = True
            break
    assert seen[-1][0] != "FAIL", seen
    print(f"kill -9 mid-job: {killed}; last observations: {seen[-3:]}")
    if killed:
        new_id = v["entities"]["image_id"]
        srv.start(port=srv.port)
        # Nothing half-written is visible: the target image does not exist yet (or is complete).
        r = t.raw.get(f"/v2/images/{new_id}")
        assert r.status_code == 404 or r.json()["status"] == "active", describe(r)
    job = wait_job(t.ims, job_id, timeout=300)
    assert job.status == "SUCCESS", job
    if killed:
        assert "resumes from its checkpoint" in srv.log_tail(400), "the job restarted instead of resuming"
    else:
        # Too fast to catch on this machine: the checkpoints were still recorded in order.
        progress = [b for s, b in seen if s == "RUNNING"]
        assert progress == sorted(progress), seen
    new_id = job.entities.image_id
    shown = glance_show(t.raw, new_id)
    assert shown["status"] == "active" and shown["__system__cmkid"] == k
    # The copy equals the source, compared as streams (256 MiB).
    a = t.raw.get(f"/v2/images/{img['id']}/file", stream=True)
    b = t.raw.get(f"/v2/images/{new_id}/file", stream=True)
    assert a.status_code == 200 and b.status_code == 200
    n = 0
    for ca, cb in zip(a.iter_content(4 * MiB), b.iter_content(4 * MiB)):
        assert ca == cb, f"differs near offset {n}"
        n += len(ca)
    assert n == total
    # No half-written active image, and the store is consistent.
    for i in t.raw.get("/v2/images").json()["images"]:
        assert i["status"] == "active" or i["id"] == img["id"], i
    fsck = admin(srv.data_dir, "fsck", binary=srv.binary)
    assert fsck["clean"], fsck
