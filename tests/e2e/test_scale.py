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
        s3 = boto3.client("s3", endpoint_url=srv.s3_endpoint, aws_access_key_id=c["OPENIMS_ACCESS_KEY"],
                          aws_secret_access_key=c["OPENIMS_SECRET_KEY"], region_name="local-1",
                          config=Config(s3={"addressing_style": "path"}))
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

        # An upload through node 1 that is mid-way (paused) when node 1 dies.
        victim = nodes[1]
        ut = on(tenants[0], victim)
        stalled = glance_create(ut.raw, name=unique("stalled"), disk_format="raw", container_format="bare")
        body = GeneratedBody(total=64 * MiB, pause_at=8 * MiB)
        up_thread, up_result = start_upload(ut, stalled["id"], body)
        assert body.reached.wait(120), f"upload did not reach 8 MiB: {up_result}"
        assert glance_show(ut.raw, stalled["id"])["status"] == "saving"

        # Kill node 1 once it holds a running job's lease.
        deadline = time.monotonic() + 120
        while True:
            if q(f"SELECT COUNT(*) FROM jobs WHERE status = 'RUNNING' AND lease_owner = '{node_ids[1]}'") > 0:
                break
            assert q("SELECT COUNT(*) FROM jobs WHERE status IN ('SUCCESS', 'FAIL')") < 20, "every job finished before node 1 ran one (make the images larger)"
            assert time.monotonic() < deadline, "node 1 never ran a job"
            time.sleep(0.05)
        victim.kill9()
        body.stop = True
        body.resume.set()
        killed_jobs = q(f"SELECT COUNT(*) FROM jobs WHERE status = 'RUNNING' AND lease_owner = '{node_ids[1]}'")

        # Every job ends SUCCESS (those of the dead node after their lease expires).
        survivor = nodes[0]
        results = []
        for t, job_id in jobs:
            job = wait_job(on(t, survivor).ims, job_id, timeout=300)
            assert job.status == "SUCCESS", job
            results.append((t, job.entities.image_id))
        # The jobs the dead node held were taken over (a second attempt) by another node.
        taken_over = q("SELECT COUNT(*) FROM jobs WHERE attempts > 1")
        assert killed_jobs >= 1 and taken_over >= killed_jobs, (killed_jobs, taken_over)

        # The dead node's interrupted upload is queued again by a live node (liveness lease)
        # and can be uploaded through another node.
        up_thread.join(60)
        t0 = on(tenants[0], nodes[0])
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
        assert fsck["manifests_checked"] >= 4 + 6, fsck
    finally:
        for n in nodes:
            if n.alive():
                n.kill9()
            if n in helpers.RUNNING_SERVERS:
                helpers.RUNNING_SERVERS.remove(n)
