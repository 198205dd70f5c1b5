"""`openims image share|unshare|accept|reject|shared-with-me` against the running service
(AK/SK-signed client commands), checked through the API."""

import json
import subprocess

from helpers import OPENIMS_BIN, make_active_image, unique
from sharing_helpers import shared_ids


def cli(t, *args, check=True):
    cmd = [str(OPENIMS_BIN), "image", *args, "--endpoint", t.endpoint, "--access-key", t.ak,
           "--secret-key", t.sk, "--project-id", t.project_id]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, f"{cmd}: {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def test_cli_share_accept_reject_unshare(tenant, tenant_b):
    a, b = tenant, tenant_b
    iid = make_active_image(a.raw, name=unique("cli"))["id"]
    out = cli(a, "share", iid, "--project", b.project_id).stdout
    assert iid in out and b.project_id in out and "success" in out, out
    rows = json.loads(cli(b, "shared-with-me", "--output", "json").stdout)
    assert [(r["member_status"], r["image"]["id"]) for r in rows] == [("pending", iid)], rows
    table = cli(b, "shared-with-me").stdout
    assert iid in table and "pending" in table and a.project_id in table, table
    cli(b, "accept", iid)
    assert iid in shared_ids(b, "accepted")
    rows = json.loads(cli(b, "shared-with-me", "--status", "accepted", "--output", "json").stdout)
    assert [r["image"]["id"] for r in rows] == [iid]
    cli(b, "reject", iid)
    assert iid in shared_ids(b, "rejected") and iid not in shared_ids(b, "accepted")
    cli(a, "unshare", iid, "--project", b.project_id)
    assert json.loads(cli(b, "shared-with-me", "--output", "json").stdout) == []
    assert b.raw.get(f"/v2/images/{iid}").status_code == 404


def test_cli_errors_are_reported(tenant, tenant_b):
    a, b = tenant, tenant_b
    iid = make_active_image(a.raw, name=unique("cli-bad"))["id"]
    p = cli(a, "share", iid, "--project", a.project_id, check=False)
    assert p.returncode != 0 and "IMG.0076" in p.stderr, p
    # Accepting an image that is not shared with you: the job's per-image failure is shown.
    p = cli(b, "accept", iid, check=False)
    assert p.returncode != 0 and "IMG.0027" in p.stdout + p.stderr and "failed" in p.stdout, p
    p = cli(b, "share", iid, check=False)
    assert p.returncode != 0 and "--project or --domain" in p.stderr, p
    p = cli(b, "shared-with-me", "--status", "maybe", check=False)
    assert p.returncode != 0, p
