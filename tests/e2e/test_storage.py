"""Stored data: identical data is stored once, deleted images' data is collected, and
`openims admin fsck` verifies every chunk (and notices corruption)."""

import json
import subprocess

import pytest
import requests

import helpers
from helpers import RawClient, make_active_image, raw_bytes


def store_bytes(srv) -> int:
    return sum(p.stat().st_size for p in (srv.data_dir / "store").rglob("*") if p.is_file())


def fsck(srv):
    p = subprocess.run([str(srv.binary), "admin", "--data-dir", str(srv.data_dir),
                        *helpers.admin_db_flags(srv.data_dir), "--output", "json", "fsck"],
                       capture_output=True, text=True, timeout=120)
    return p.returncode, json.loads(p.stdout)


def test_dedup_gc_and_fsck(fresh_server):
    srv = fresh_server
    c = srv.credentials()
    raw = RawClient(srv.endpoint, c["OPENIMS_ACCESS_KEY"], c["OPENIMS_SECRET_KEY"], c["OPENIMS_PROJECT_ID"])
    data = raw_bytes(9 * 1024 * 1024, seed=b"dedup")  # three 4 MiB chunks, the last one short
    a = make_active_image(raw, data)
    after_one = store_bytes(srv)
    b = make_active_image(raw, data)
    after_two = store_bytes(srv)
    # The second upload adds one small manifest at most, never the data again.
    assert after_two - after_one < 64 * 1024, (after_one, after_two)
    code, report = fsck(srv)
    assert code == 0 and report["clean"] and report["chunks_checked"] == 3, report

    # Deleting one image keeps the data the other still uses.
    assert raw.delete(f"/v2/images/{a['id']}").status_code == 204
    gc = srv.admin("gc", "--grace-secs", "0")
    assert gc["chunks_deleted"] == 0, gc
    r = raw.get(f"/v2/images/{b['id']}/file")
    assert r.status_code == 200 and r.content == data
    # Deleting the last user frees it.
    assert raw.delete(f"/v2/images/{b['id']}").status_code == 204
    gc = srv.admin("gc", "--grace-secs", "0")
    assert gc["chunks_deleted"] == 3 and gc["bytes_freed"] >= len(data), gc
    assert store_bytes(srv) < 64 * 1024


def test_fsck_finds_a_corrupted_chunk(fresh_server):
    srv = fresh_server
    c = srv.credentials()
    raw = RawClient(srv.endpoint, c["OPENIMS_ACCESS_KEY"], c["OPENIMS_SECRET_KEY"], c["OPENIMS_PROJECT_ID"])
    data = raw_bytes(1024 * 1024, seed=b"rot")
    img = make_active_image(raw, data)
    chunks = [p for p in (srv.data_dir / "store" / "chunks").rglob("*") if p.is_file()]
    assert len(chunks) == 1
    blob = bytearray(chunks[0].read_bytes())
    blob[100] ^= 0xFF
    chunks[0].write_bytes(bytes(blob))
    code, report = fsck(srv)
    assert code == 1 and not report["clean"] and len(report["corrupt_chunks"]) == 1, report
    # A download never serves corrupted bytes: the stream is cut before the bad chunk, so
    # the client sees a broken transfer, not a 200 with wrong content.
    with pytest.raises(requests.exceptions.RequestException):
        r = raw.get(f"/v2/images/{img['id']}/file")
        # Reaching here means the whole body arrived: it must not (the only chunk is bad).
        raise AssertionError(f"download completed: status {r.status_code}, {len(r.content)} bytes")
