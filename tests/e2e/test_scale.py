"""Scale-out: chunks, manifests and bucket objects in an external S3-compatible store (moto's
server on loopback), and several `openims serve` nodes sharing one PostgreSQL database and one
S3 store, one of which is killed with SIGKILL while it runs jobs.

The multi-node test needs the PostgreSQL server of OPENIMS_TEST_PG_URL (default
postgres://postgres@127.0.0.1:5432); it makes its own fresh database and drops it afterwards."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import boto3
import pytest
import requests
from botocore.config import Config
from huaweicloudsdkims.v2 import CreateImageRequest, CreateImageRequestBody

import helpers
from helpers import (
    VENV, GeneratedBody, Server, describe, glance_create, glance_show, glance_upload, make_active_image,
    make_tenant, md5_hex, raw_bytes, unique, wait_job,
)
from test_crash import start_upload
from test_kms_copy import copy, create_key

MiB = 1 << 20
S3_AK, S3_SK = "scaletestkey", "scaletestsecret"


class Moto:
    """`moto_server` on a free loopback port."""

    def __init__(self, log: Path):
        self.port = helpers.free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([str(VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=helpers._die_with_parent)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, "moto_server exited"
            try:
                if requests.get(self.endpoint + "/moto-api/", timeout=1).status_code < 500:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "moto_server not ready"
            time.sleep(0.1)

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_AK,
                            aws_secret_access_key=S3_SK, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def new_bucket(self) -> str:
        name = "openims-" + secrets.token_hex(4)
        self.client().create_bucket(Bucket=name)
        return name

    def store_url(self, bucket: str, prefix: str = "") -> str:
        path = f"/{prefix}" if prefix else ""
        return (f"s3://{bucket}{path}?endpoint={self.endpoint}&region=us-east-1"
                f"&access_key_id={S3_AK}&secret_access_key={S3_SK}")

    def keys(self, bucket: str, prefix: str = "") -> list:
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    m = Moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield m
    m.stop()


def admin_json(binary, *args, database=None, store=None, data_dir=None, check=True):
    cmd = [str(binary), "admin", "--output", "json"]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    if database:
        cmd += ["--database", database]
    if store:
        cmd += ["--store", store]
    p = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, f"{cmd + list(args)}: {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else None)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_import_source(tmp: Path, fmt: str, seed: int) -> tuple:
    """A 32 MiB raw disk with 16 MiB of data at a few offsets (and holes) converted by qemu-img to `fmt`
    (qcow2 or vhd); returns (path of the converted file, SHA-256 of the raw disk)."""
    rng = hashlib.blake2b(f"import-src-{seed}".encode()).digest()
    raw = tmp / f"imp-{seed}.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
        for k, off in enumerate((0, 7 * MiB + 4096, 17 * MiB, 28 * MiB)):
            f.seek(off)
            f.write(hashlib.shake_256(rng + bytes([k])).digest(4 * MiB))
    out = raw.with_suffix("." + fmt)
    extra = ["-o", "force_size=on"] if fmt == "vhd" else []
    p = subprocess.run(["qemu-img", "convert", "-O", {"vhd": "vpc"}.get(fmt, fmt), *extra, str(raw), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    digest = sha(raw.read_bytes())
    raw.unlink()
    return out, digest


def embedded_s3(t, node):
    """boto3 for tenant `t` on `node`'s embedded S3 endpoint."""
    return helpers.s3_client(node.s3_endpoint, t.ak, t.sk, retries={"mode": "legacy"})


# ---------------------------------------------------------------------------------------------
# One node, S3 store
# ---------------------------------------------------------------------------------------------

def test_s3_store_images_and_bucket_objects(tmp_path, moto):
    bucket = moto.new_bucket()
    url = moto.store_url(bucket, "node-data")
    srv = Server(tmp_path / "data", tmp_path / "s3node.log", extra_args=["--store", url])
    srv.start()
    try:
        t = helpers.default_tenant(srv)
        data = raw_bytes(9 * MiB + 4321, seed=b"s3-store")
        img = make_active_image(t.raw, data, name=unique("s3img"))
        r = t.raw.get(f"/v2/images/{img['id']}/file")
        assert r.status_code == 200 and r.content == data, describe(r)
        # Chunks and manifests are in the bucket (under the prefix), none in the data dir.
        keys = moto.keys(bucket)
        assert any(k.startswith("node-data/chunks/") for k in keys), keys
        assert any(k.startswith("node-data/manifests/") for k in keys), keys
        assert not [p for p in (srv.data_dir / "store").rglob("*") if p.is_file()]
        # An object in the embedded S3 endpoint lands in the external store too.
        c = srv.credentials()
        s3 = helpers.s3_client(srv.s3_endpoint, c["OPENIMS_ACCESS_KEY"], c["OPENIMS_SECRET_KEY"],
                               retries={"mode": "legacy"})
        s3.create_bucket(Bucket="ext-store")
        body = raw_bytes(5 * MiB + 7, seed=b"s3-object")
        s3.put_object(Bucket="ext-store", Key="disk.raw", Body=body)
        assert s3.get_object(Bucket="ext-store", Key="disk.raw")["Body"].read() == body
        db = srv.database_url
        rc, fsck = admin_json(srv.binary, "fsck", data_dir=srv.data_dir, database=db, store=url)
        assert rc == 0 and fsck["clean"] and fsck["chunks_checked"] >= 3, fsck
        # Delete the image, collect garbage with no grace: its chunks leave the bucket.
        assert t.raw.delete(f"/v2/images/{img['id']}").status_code == 204
        before = len([k for k in moto.keys(bucket) if "/chunks/" in k])
        # S3 modification times are whole seconds; GC counts an object as modified at the end
        # of its second: let that second pass so "no grace" really is none.
        time.sleep(1.1)
        _, gc = admin_json(srv.binary, "gc", "--grace-secs", "0", data_dir=srv.data_dir, database=db, store=url)
        after = len([k for k in moto.keys(bucket) if "/chunks/" in k])
        assert gc["chunks_deleted"] >= 3 and after == before - gc["chunks_deleted"], (gc, before, after)
        assert s3.get_object(Bucket="ext-store", Key="disk.raw")["Body"].read() == body
        _, fsck = admin_json(srv.binary, "fsck", data_dir=srv.data_dir, database=db, store=url)
        assert fsck["clean"] and fsck["orphan_chunks"] == 0, fsck
    finally:
        if srv.alive():
            assert srv.terminate(timeout=10) == 0
        helpers.RUNNING_SERVERS.remove(srv)


def test_bad_store_url_is_refused(tmp_path, moto):
    for url, why in [("s3://", "no bucket"), (moto.store_url("no-such-bucket-x"), "NoSuchBucket"),
                     ("s3://b?endpointt=http://x", "unknown parameter")]:
        p = subprocess.run([str(helpers.OPENIMS_BIN), "serve", "--data-dir", str(tmp_path / "d"),
                            "--listen", f"127.0.0.1:{helpers.free_port()}", "--s3-listen", "off",
                            "--store", url], capture_output=True, text=True, timeout=60)
        assert p.returncode != 0, (url, p.stdout, p.stderr)
        assert "store" in (p.stdout + p.stderr).lower(), (url, why, p.stderr)


# ---------------------------------------------------------------------------------------------
# Three nodes, one PostgreSQL database, one S3 store, one node killed mid-way
# ---------------------------------------------------------------------------------------------

def _pg_available() -> bool:
    try:
        helpers.psql("SELECT 1")
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(helpers.TEST_DB != "postgres",
                    reason="multi-node runs in the PostgreSQL pass (OPENIMS_TEST_DB=postgres)")
def test_three_nodes_share_pg_and_s3_and_survive_kill9(tmp_path, moto):
    if not _pg_available():
        pytest.fail(f"PostgreSQL not reachable at {helpers.PG_URL} (the multi-node test needs it)")
    db_url = helpers.create_pg_database()
    store = moto.store_url(moto.new_bucket())
    root_key = tmp_path / "root.key"
    root_key.write_bytes(os.urandom(32))
    root_key.chmod(0o600)
    common = ["--database", db_url, "--store", store, "--root-key-file", str(root_key),
              "--job-lease-secs", "3", "--workers", "2", "--gc-interval-secs", "2", "--gc-grace-secs", "600"]
    nodes = []

    def q(sql: str) -> int:
        return int(helpers.psql(sql, db=db_url.rsplit("/", 1)[1]).strip())

    try:
        for i in range(3):
            d = tmp_path / f"node{i}"
            d.mkdir()
            helpers.DATABASES[str(d)] = db_url
            if i > 0:  # the first node bootstraps; the others share its identities
                (d / "credentials").write_text((nodes[0].data_dir / "credentials").read_text())
            n = Server(d, tmp_path / f"node{i}.log", extra_args=common)
            n.start()
            nodes.append(n)
        # A node with another root key refuses to start.
        bad_key = tmp_path / "other.key"
        bad_key.write_bytes(os.urandom(32))
        bad_key.chmod(0o600)
        p = subprocess.run([str(helpers.OPENIMS_BIN), "serve", "--data-dir", str(tmp_path / "bad"),
                            "--listen", f"127.0.0.1:{helpers.free_port()}", "--s3-listen", "off",
                            "--database", db_url, "--store", store, "--root-key-file", str(bad_key)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "root key" in (p.stdout + p.stderr), p.stderr

        node_ids = [(n.data_dir / "node-id").read_text().strip() for n in nodes]
        # Four projects (a project runs at most 5 copies at once), each with a source image
        # uploaded through a different node and a KMS key made through another.
        tenants = [make_tenant(nodes[i % 3], f"s{i}") for i in range(4)]
        sources = {}
        for i, t in enumerate(tenants):
            data = raw_bytes(12 * MiB + 999 * i, seed=f"scale-src-{i}".encode())
            img = make_active_image(t.raw, data, name=unique("src"))
            key = create_key(dataclasses.replace(t, server=nodes[(i + 1) % 3], _ims=None, _raw=None))
            sources[t.project_id] = (img["id"], data, key)

        def on(t, node):
            return dataclasses.replace(t, server=node, _ims=None, _raw=None)

        # Nine imports from bucket objects (qcow2 and vhd files made by qemu-img), each uploaded
        # through one node's embedded S3 endpoint and imported through another, over the four
        # projects (the files are made and uploaded first, the jobs queued below).
        buckets = {}
        for i, t in enumerate(tenants):
            buckets[t.project_id] = f"scale-imp-{secrets.token_hex(4)}"
            embedded_s3(t, nodes[i % 3]).create_bucket(Bucket=buckets[t.project_id])
        imports = []
        for k in range(9):
            t = tenants[k % 4]
            fmt = ("qcow2", "vhd")[k % 2]
            path, raw_sha = make_import_source(tmp_path, fmt, k)
            key = f"disks/src-{k}.{fmt}"
            embedded_s3(t, nodes[(k + 1) % 3]).upload_file(str(path), buckets[t.project_id], key)
            imports.append((t, key, raw_sha))

        # An upload through node 1 that is mid-way (paused) when node 1 dies.
        victim = nodes[1]
        ut = on(tenants[0], victim)
        stalled = glance_create(ut.raw, name=unique("stalled"), disk_format="raw", container_format="bare")
        body = GeneratedBody(total=64 * MiB, pause_at=8 * MiB)
        up_thread, up_result = start_upload(ut, stalled["id"], body)
        assert body.reached.wait(120), f"upload did not reach 8 MiB: {up_result}"
        assert glance_show(ut.raw, stalled["id"])["status"] == "saving"

        # The imports are queued first (every node runs some when node 1 dies), then the copies.
        for k, (t, key, raw_sha) in enumerate(imports):
            req = CreateImageRequestBody(name=unique("imp"), image_url=f"{buckets[t.project_id]}:{key}", min_disk=1)
            imports[k] = (t, on(t, nodes[k % 3]).ims.create_image(CreateImageRequest(body=req)).job_id, raw_sha)
        # 20 copies (every other one encrypting with the project's key), spread over nodes.
        jobs = []
        for j in range(20):
            t = tenants[j % 4]
            src_id, _, key = sources[t.project_id]
            node = nodes[j % 3]
            jobs.append((t, copy(on(t, node), src_id, key if j % 2 == 0 else None)))

        # Concurrent uploads through the nodes that stay up while the copies run.
        def upload(k):
            t = on(tenants[k % 4], nodes[k % 2 * 2])  # nodes 0 and 2
            d = raw_bytes(3 * MiB + k, seed=f"upl-{k}".encode())
            return t, make_active_image(t.raw, d, name=unique("upl"))["id"], d

        pool = cf.ThreadPoolExecutor(4)
        uploads = [pool.submit(upload, k) for k in range(6)]

        # Kill node 1 once it holds the lease of a running import job.
        n_jobs = len(jobs) + len(imports)
        assert n_jobs >= 20
        running_import_on_1 = (f"SELECT COUNT(*) FROM jobs WHERE status = 'RUNNING' AND lease_owner = '{node_ids[1]}' "
                               "AND job_type LIKE 'imsImport%'")
        deadline = time.monotonic() + 120
        while True:
            if q(running_import_on_1) > 0:
                break
            assert q("SELECT COUNT(*) FROM jobs WHERE status IN ('SUCCESS', 'FAIL') AND job_type LIKE 'imsImport%'") \
                < len(imports), "every import finished before node 1 ran one (make the files larger)"
            assert time.monotonic() < deadline, "node 1 never ran an import job"
            time.sleep(0.05)
        victim.kill9()
        body.stop = True
        body.resume.set()
        killed_jobs = q(f"SELECT COUNT(*) FROM jobs WHERE status = 'RUNNING' AND lease_owner = '{node_ids[1]}'")
        killed_imports = helpers.psql(
            f"SELECT id || ' ' || image_id FROM jobs WHERE status = 'RUNNING' AND lease_owner = '{node_ids[1]}' "
            "AND job_type LIKE 'imsImport%'", db=db_url.rsplit("/", 1)[1]).split()
        killed_imports = dict(zip(killed_imports[::2], killed_imports[1::2]))
        assert killed_imports, "node 1 died without a running import"

        # While the dead node's imports wait for their lease to expire and run again on another
        # node, their images stay `saving` (owned by the job): the reset of the dead node's
        # interrupted uploads (back to `queued`) must not touch them.
        t0 = on(tenants[0], nodes[0])
        deadline = time.monotonic() + 300
        pending = dict(killed_imports)
        while pending:
            for job_id, image_id in list(pending.items()):
                st = helpers.psql(f"SELECT status FROM images WHERE id = '{image_id}'",
                                  db=db_url.rsplit("/", 1)[1]).strip()
                assert st in ("saving", "active"), f"image {image_id} of the taken-over import {job_id} is {st}"
                if st == "active":
                    del pending[job_id]
            assert time.monotonic() < deadline, pending
            time.sleep(0.2)

        # Every job ends SUCCESS (those of the dead node after their lease expires).
        survivor = nodes[0]
        results = []
        for t, job_id in jobs:
            job = wait_job(on(t, survivor).ims, job_id, timeout=300)
            assert job.status == "SUCCESS", job
            results.append((t, job.entities.image_id))
        imported = []
        for t, job_id, raw_sha in imports:
            job = wait_job(on(t, survivor).ims, job_id, timeout=300)
            assert job.status == "SUCCESS", job
            imported.append((t, job.entities.image_id, raw_sha))
        # The jobs the dead node held were taken over (a second attempt) by another node,
        # its imports among them.
        taken_over = q("SELECT COUNT(*) FROM jobs WHERE attempts > 1")
        assert killed_jobs >= 1 and taken_over >= killed_jobs, (killed_jobs, taken_over)
        for job_id in killed_imports:
            assert q(f"SELECT COUNT(*) FROM jobs WHERE id = '{job_id}' AND attempts > 1 AND status = 'SUCCESS'") == 1, \
                job_id

        # The dead node's interrupted upload is queued again by a live node (liveness lease)
        # and can be uploaded through another node.
        up_thread.join(60)
        deadline = time.monotonic() + 90
        while glance_show(t0.raw, stalled["id"])["status"] != "queued":
            assert time.monotonic() < deadline, glance_show(t0.raw, stalled["id"])
            time.sleep(0.2)
        small = raw_bytes(300 * 1024, seed=b"retry")
        r = glance_upload(t0.raw, stalled["id"], small)
        assert r.status_code == 204, describe(r)
        assert glance_show(t0.raw, stalled["id"])["checksum"] == md5_hex(small)

        # Every copy (downloaded through a surviving node) equals its source.
        for k, (t, image_id) in enumerate(results):
            _, data, _ = sources[t.project_id]
            r = on(t, nodes[0 if k % 2 else 2]).raw.get(f"/v2/images/{image_id}/file")
            assert r.status_code == 200, describe(r)
            assert sha(r.content) == sha(data), f"copy {image_id} differs from its source"
        # Every imported image is its source's virtual disk (served raw by Glance).
        for k, (t, image_id, raw_sha) in enumerate(imported):
            img = glance_show(on(t, nodes[0]).raw, image_id)
            assert img["status"] == "active" and img["disk_format"] == "raw" and img["virtual_size"] == 32 * MiB, img
            r = on(t, nodes[2 if k % 2 else 0]).raw.get(f"/v2/images/{image_id}/file")
            assert r.status_code == 200, describe(r)
            assert sha(r.content) == raw_sha, f"import {image_id} differs from its source"
        for f in uploads:
            t, image_id, d = f.result(timeout=300)
            r = on(t, nodes[2]).raw.get(f"/v2/images/{image_id}/file")
            assert r.status_code == 200 and sha(r.content) == sha(d), describe(r)
        pool.shutdown()

        # Nothing lost; after a collection with no grace period, nothing leaked either.
        rc, fsck = admin_json(helpers.OPENIMS_BIN, "fsck", data_dir=tmp_path / "admin", database=db_url,
                              store=store)
        assert rc == 0 and fsck["clean"], fsck
        for n in (nodes[0], nodes[2]):
            assert n.terminate(timeout=20) == 0
        # S3 keeps modification times in whole seconds and GC counts an object as modified at
        # the end of its second: let the last second pass so "no grace" really is none.
        time.sleep(1.1)
        _, gc = admin_json(helpers.OPENIMS_BIN, "gc", "--grace-secs", "0", data_dir=tmp_path / "admin",
                           database=db_url, store=store)
        rc, fsck = admin_json(helpers.OPENIMS_BIN, "fsck", data_dir=tmp_path / "admin", database=db_url,
                              store=store)
        assert rc == 0 and fsck["clean"], fsck
        assert fsck["orphan_chunks"] == 0 and fsck["orphan_manifests"] == 0, (fsck, gc)
        assert fsck["manifests_checked"] >= 4 + 6 + 9, fsck
    finally:
        for n in nodes:
            if n.alive():
                n.kill9()
            if n in helpers.RUNNING_SERVERS:
                helpers.RUNNING_SERVERS.remove(n)
