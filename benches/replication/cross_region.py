#!/usr/bin/env python3
"""Case (3) of benches/replication: cross-region bytes on the wire.

Starts two `openims serve` deployments on loopback (region-a replicating to region-b) with a
byte-counting TCP proxy in front of region-b's API, so every byte of the peer protocol (chunk
bodies, HTTP headers, "which chunks do you lack" queries, commit) is counted in both
directions. Then:
  1. uploads an image of SIZE random bytes to region-a and replicates it (first copy);
  2. changes 1% of the disk (one contiguous range), uploads it as a new image, replicates it
     again (second copy).
Prints, for each copy, the bytes on the wire, the job's own `bytes_sent`, the time, and the
ratio of wire bytes to the image size (copy 1) and to the changed bytes (copy 2).

Usage: OPENIMS_BIN=target/release/openims benches/replication/cross_region.py [SIZE_MIB]
(run with the e2e venv's python: ~/.cache/openims-venv/bin/python)."""

import asyncio
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from helpers import Server, Tenant, free_port, make_active_image, unique, wait_job  # noqa: E402
from huaweicloudsdkims.v2 import CopyImageCrossRegionRequest, CopyImageCrossRegionRequestBody  # noqa: E402

MiB = 1 << 20


class CountingProxy:
    """TCP proxy 127.0.0.1:port -> target that counts bytes in each direction."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.up = 0  # towards the target (region-b)
        self.down = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        ready = time.monotonic() + 10
        while not getattr(self, "_server", None) and time.monotonic() < ready:
            time.sleep(0.01)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def pipe(r, w, up):
            try:
                while data := await r.read(1 << 16):
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    w.write(data)
                    await w.drain()
            finally:
                w.close()

        async def handle(cr, cw):
            tr, tw = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(pipe(cr, tw, True), pipe(tr, cw, False), return_exceptions=True)

        async def main():
            self._server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            await self._server.serve_forever()

        self.loop.run_until_complete(main())

    def total(self) -> int:
        return self.up + self.down


def tenant_in(srv: Server, domain: str, project: str) -> Tenant:
    dom = srv.admin("domain", "create", domain)
    proj = srv.admin("project", "create", project, "--domain", domain)
    user = f"u{secrets.token_hex(3)}"
    pw = "Pw-" + secrets.token_urlsafe(12)
    srv.admin("user", "create", user, "--domain", domain, "--password", pw)
    srv.admin("user", "grant", user, "--project", proj["id"], "--domain", domain)
    key = srv.admin("key", "create", "--project", proj["id"], "--user", user, "--domain", domain)
    return Tenant(server=srv, domain=domain, domain_id=dom["id"], project=project, project_id=proj["id"],
                  user=user, password=pw, ak=key["access_key"], sk=key["secret_key"])


def main():
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 1024 * MiB
    tmp = Path(tempfile.mkdtemp(prefix="oims-xr-bench-"))
    b = Server(tmp / "b", tmp / "b.log", extra_args=["--region", "region-b"]).start()
    proxy = CountingProxy(b.port)
    svc = b.admin("peer-account", "create")
    (tmp / "a.toml").write_text(
        f'[peers.region-b]\nendpoint = "http://127.0.0.1:{proxy.port}"\n'
        f'access_key = "{svc["access_key"]}"\nsecret_key = "{svc["secret_key"]}"\n')
    a = Server(tmp / "a", tmp / "a.log", extra_args=["--region", "region-a", "--config", str(tmp / "a.toml")]).start()
    try:
        dom = f"bench{secrets.token_hex(3)}"
        ta = tenant_in(a, dom, "region-a")
        tenant_in(b, dom, "region-b")
        a.admin("agency", "create", "ims_agency", "--domain", dom)
        data = bytearray(os.urandom(size))

        def copy(image_id):
            before = proxy.total()
            t0 = time.monotonic()
            body = CopyImageCrossRegionRequestBody(name=unique("bench"), region="region-b",
                                                   project_name="region-b", agency_name="ims_agency")
            job_id = ta.ims.copy_image_cross_region(CopyImageCrossRegionRequest(image_id=image_id, body=body)).job_id
            job = wait_job(ta.ims, job_id, timeout=3600, interval=0.1)
            secs = time.monotonic() - t0
            assert job.status == "SUCCESS", job
            v = ta.raw.get(f"/v1/{ta.project_id}/jobs/{job_id}").json()
            return proxy.total() - before, v["entities"]["bytes_sent"], secs

        src = make_active_image(ta.raw, bytes(data), name=unique("v1"))
        wire1, sent1, s1 = copy(src["id"])
        changed = size // 100
        off = size // 3 + 4321
        data[off:off + changed] = os.urandom(changed)
        src2 = make_active_image(ta.raw, bytes(data), name=unique("v2"))
        wire2, sent2, s2 = copy(src2["id"])
        rows = [
            {"case": "first_copy", "image_bytes": size, "wire_bytes": wire1, "job_bytes_sent": sent1,
             "seconds": round(s1, 2), "wire_over_image": round(wire1 / size, 4)},
            {"case": "second_copy_1pct_changed", "image_bytes": size, "changed_bytes": changed,
             "wire_bytes": wire2, "job_bytes_sent": sent2, "seconds": round(s2, 2),
             "wire_over_changed": round(wire2 / changed, 3), "wire_over_image": round(wire2 / size, 4)},
        ]
        for r in rows:
            print(json.dumps(r))
    finally:
        a.terminate()
        b.terminate()


if __name__ == "__main__":
    main()
