"""benches/scale driver: jobs per minute and API requests per second with 1 and 3 `openims
serve` nodes sharing one PostgreSQL database and one S3 store (moto on loopback), plus the
single-node embedded default (SQLite + local directory) as the baseline of the same run.

Usage (see run.sh): python scale.py [--jobs N] [--secs S] [--procs P]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import helpers  # noqa: E402
from helpers import RawClient, Server, make_active_image, make_tenant, raw_bytes, unique, wait_job  # noqa: E402
from test_kms_copy import copy, create_key  # noqa: E402
from test_scale import Moto  # noqa: E402

MiB = 1 << 20


def _load_worker(args):
    endpoint, ak, sk, pid, path, secs = args
    c = RawClient(endpoint, ak, sk, pid)
    n = errors = 0
    end = time.monotonic() + secs
    while time.monotonic() < end:
        r = c.get(path, query={"limit": "25"})
        if r.status_code == 200:
            n += 1
        else:
            errors += 1
    return n, errors


def api_rps(nodes, t, secs: float, procs: int) -> tuple:
    """Signed GET /v2/cloudimages?limit=25 from `procs` client processes, spread over nodes."""
    work = [(nodes[i % len(nodes)].endpoint, t.ak, t.sk, t.project_id, "/v2/cloudimages", secs)
            for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        res = pool.map(_load_worker, work)
    ok = sum(r[0] for r in res)
    return ok / secs, sum(r[1] for r in res)


def jobs_per_min(nodes, tenants, n_jobs: int, size: int) -> float:
    """n_jobs encrypting in-region copies (every chunk read, encrypted, written), requested
    round-robin through the nodes in projects of at most 5 concurrent jobs; minutes until the
    last one is SUCCESS."""
    srcs = []
    for i, t in enumerate(tenants):
        img = make_active_image(t.raw, raw_bytes(size, seed=f"bench-{i}".encode()), name=unique("src"))
        srcs.append((t, img["id"], create_key(t)))
    start = time.monotonic()
    pending = []
    k = 0
    while k < n_jobs or pending:
        # Keep each project at its limit of 5 open copy jobs.
        while k < n_jobs and len(pending) < 5 * len(srcs):
            t, src, key = srcs[k % len(srcs)]
            on = dataclasses.replace(t, server=nodes[k % len(nodes)], _ims=None, _raw=None)
            if sum(1 for p in pending if p[0].project_id == t.project_id) >= 5:
                break
            pending.append((t, copy(on, src, key)))
            k += 1
        t, job_id = pending.pop(0)
        job = wait_job(t.ims, job_id, timeout=600)
        assert job.status == "SUCCESS", job
    return n_jobs / ((time.monotonic() - start) / 60)


def cluster(tmp: Path, n: int, db_url, store, label: str):
    root_key = tmp / f"{label}-root.key"
    root_key.write_bytes(os.urandom(32))
    common = ["--root-key-file", str(root_key), "--workers", "2", "--image-quota", "100000"]
    if db_url:
        common += ["--database", db_url]
    if store:
        common += ["--store", store]
    nodes = []
    for i in range(n):
        d = tmp / f"{label}-node{i}"
        d.mkdir()
        if db_url:
            helpers.DATABASES[str(d)] = db_url
        if i > 0:
            (d / "credentials").write_text((nodes[0].data_dir / "credentials").read_text())
        nodes.append(Server(d, tmp / f"{label}-node{i}.log", extra_args=common).start())
    return nodes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--size-mib", type=int, default=8)
    ap.add_argument("--secs", type=float, default=10)
    ap.add_argument("--procs", type=int, default=4)
    a = ap.parse_args()
    helpers.TEST_DB = "sqlite"  # databases are passed explicitly below
    tmp = Path(tempfile.mkdtemp(prefix="oims-bench-scale-"))
    moto = Moto(tmp / "moto.log")
    rows = []
    try:
        for label, n, shared in [("sqlite+local", 1, False), ("pg+s3", 1, True), ("pg+s3", 3, True)]:
            db_url = helpers.create_pg_database() if shared else None
            store = moto.store_url(moto.new_bucket()) if shared else None
            nodes = cluster(tmp, n, db_url, store, f"{label.replace('+', '_')}-{n}")
            try:
                tenants = [make_tenant(nodes[0], f"b{i}") for i in range(2)]
                for _ in range(200):  # a listing with something in it
                    helpers.glance_create(tenants[0].raw, name=unique("l"), disk_format="raw",
                                          container_format="bare")
                rps, errs = api_rps(nodes, tenants[0], a.secs, a.procs)
                jpm = jobs_per_min(nodes, tenants, a.jobs, a.size_mib * MiB)
                rows.append((label, n, rps, errs, jpm))
                print(f"{label:13s} nodes={n}  api {rps:8.1f} req/s ({errs} errors)   "
                      f"encrypting copies {jpm:6.1f} jobs/min", flush=True)
            finally:
                for s in nodes:
                    s.terminate(timeout=20)
    finally:
        moto.stop()
        helpers.drop_pg_databases()
    base = rows[0]
    print("\n| setup | nodes | API req/s | ratio | jobs/min | ratio |\n|---|---|---|---|---|---|")
    for label, n, rps, errs, jpm in rows:
        print(f"| {label} | {n} | {rps:.0f} | {rps / base[2]:.2f} | {jpm:.1f} | {jpm / base[4]:.2f} |")


if __name__ == "__main__":
    main()
