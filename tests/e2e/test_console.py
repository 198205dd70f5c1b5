"""The web console (`/console`) in headless Chromium, driven by playwright-core.

Each test runs one step group of `console/tests/browser.mjs` (Node) against this session's
real server, then checks what the page did through the API. Screenshots of every page go to
`target/console-screenshots/` at the repository root.

Step groups and what they need:

* `signin_upload`, `bad_input`, `keys_replicate_usage_delete`: this branch (token sign-in,
  Glance upload, in-region copy, jobs list, usage, KMS).
* `import_from_bucket`: `POST /v2/cloudimages/action` with `image_url` (branch `io`).
* `share_accept_replicate`: `POST/PUT /v1/cloudimages/members` and the shared image list
  (branch `share`).
* `export`: `POST /v1/cloudimages/{id}/file` (branch `io`).

A test whose endpoints this server does not serve yet (answers 404 "The requested resource does
not exist." or 405) is skipped with the name of the branch it waits for; once that branch is
merged it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import helpers

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "console"
SCRIPT = CONSOLE / "tests" / "browser.mjs"
SCREENSHOTS = ROOT / "target" / "console-screenshots"
CHROMIUM = os.environ.get("OPENIMS_CHROMIUM", "/usr/bin/chromium")
MIB = 1024 * 1024


def _check_tools():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup-test-env.sh (installs Debian's chromium)")
    if not (CONSOLE / "node_modules" / "playwright-core").exists():
        pytest.fail("console/node_modules/playwright-core is missing: run scripts/setup-test-env.sh")
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH (Node.js >= 18.18 is needed to build and test the console)")


def user_of(t: helpers.Tenant) -> dict:
    return {"name": t.user, "password": t.password, "domain": t.domain, "project": t.project,
            "project_id": t.project_id}


def run_group(group: str, cfg: dict, timeout: float = 280) -> dict:
    _check_tools()
    cfg = {"screenshots": str(SCREENSHOTS), "chromium": CHROMIUM, **cfg}
    env = dict(os.environ, CONSOLE_TEST=json.dumps(cfg))
    p = subprocess.run(["node", str(SCRIPT), group], cwd=CONSOLE, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"browser step group {group} failed:\n{p.stderr[-6000:]}\n{p.stdout[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def token_client(t: helpers.Tenant) -> helpers.RawClient:
    return t.token_client()


def jobs_of(t: helpers.Tenant) -> list:
    r = t.raw.get(f"/v1/{t.project_id}/jobs", query={"limit": "1000"})
    helpers.assert_status(r, 200)
    return r.json()["jobs"]


@pytest.fixture(scope="module")
def ta(server):
    return helpers.make_tenant(server, "ca")


@pytest.fixture(scope="module")
def tb(server):
    return helpers.make_tenant(server, "cb")


@pytest.fixture(scope="module")
def base_image(ta):
    """An active 4 MiB raw image of project A, made through the API."""
    return helpers.make_active_image(ta.raw, helpers.raw_bytes(4 * MIB), name=helpers.unique("console-base"))


def test_jobs_list_is_project_scoped_and_checks_its_query(ta, tb, base_image):
    r = ta.raw.post(f"/v1/cloudimages/{base_image['id']}/copy", json_body={"name": helpers.unique("listed")})
    helpers.assert_status(r, 200)
    job_id = r.json()["job_id"]
    listed = [j["job_id"] for j in jobs_of(ta)]
    assert job_id in listed
    assert job_id not in [j["job_id"] for j in jobs_of(tb)]
    # Another project's list is refused; bad filters are IMG.0001.
    helpers.assert_error(ta.raw.get(f"/v1/{tb.project_id}/jobs"), 403)
    helpers.assert_error(ta.raw.get(f"/v1/{ta.project_id}/jobs", query={"status": "DONE"}), 400, "IMG.0001")
    helpers.assert_error(ta.raw.get(f"/v1/{ta.project_id}/jobs", query={"limit": "0"}), 400, "IMG.0001")
    r = ta.raw.get(f"/v1/{ta.project_id}/jobs", query={"status": "INIT", "limit": "5"})
    helpers.assert_status(r, 200)
    assert all(j["status"] == "INIT" for j in r.json()["jobs"])
    # The token the console uses works the same.
    r = ta.token_client().get(f"/v1/{ta.project_id}/jobs", auth="token")
    helpers.assert_status(r, 200)
    assert job_id in [j["job_id"] for j in r.json()["jobs"]]


def test_console_is_served_embedded_with_a_strict_policy(server):
    import requests
    r = requests.get(server.endpoint + "/console/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "/console/assets/" in r.text and "https://" not in r.text
    r2 = requests.get(server.endpoint + "/console/images", timeout=10)  # a deep link is the app
    assert r2.status_code == 200 and r2.text == r.text
    assert requests.get(server.endpoint + "/console/assets/nope.js", timeout=10).status_code == 404


def test_console_sign_in_and_upload_from_the_browser_with_progress(tenant, tmp_path):
    ta = tenant  # a fresh project: the list starts empty
    data = helpers.raw_bytes(8 * MIB)
    f = tmp_path / "console-disk.raw"
    f.write_bytes(data)
    name = helpers.unique("uploaded")
    out = run_group("signin_upload", {
        "endpoint": ta.endpoint,
        "users": {"a": user_of(ta)},
        # 8 MiB at 4 MiB/s: the bar is seen part-way for about two seconds.
        "upload": {"file": str(f), "name": name, "size_text": "8.00 MiB",
                   "throttle_bytes_per_second": 4 * MIB},
    })
    assert 0 < out["upload_midway_percent"] < 100
    shown = helpers.glance_show(ta.raw, out["image_id"])
    assert shown["name"] == name and shown["status"] == "active"
    r = ta.raw.get(f"/v2/images/{out['image_id']}/file")
    assert r.status_code == 200 and r.content == data


def test_console_bad_input_shows_next_to_the_field_and_sends_nothing(ta, base_image):
    before_jobs = {j["job_id"] for j in jobs_of(ta)}
    run_group("bad_input", {"endpoint": ta.endpoint, "users": {"a": user_of(ta)},
                            "image_name": base_image["name"]})
    assert {j["job_id"] for j in jobs_of(ta)} == before_jobs


def test_console_keys_replicate_jobs_usage_delete(ta, base_image):
    alias = helpers.unique("console-key")
    copy = helpers.unique("console-copy")
    out = run_group("keys_replicate_usage_delete", {
        "endpoint": ta.endpoint, "users": {"a": user_of(ta)}, "image_name": base_image["name"],
        "key_alias": alias, "copy_name": copy,
    })
    job = ta.raw.get(f"/v1/{ta.project_id}/jobs/{out['copy_job_id']}").json()
    assert job["status"] == "SUCCESS" and job["entities"]["image_id"] == out["copy_id"]
    # The copy was encrypted with the key made on the Keys page, and is gone after Delete.
    r = ta.raw.get(f"/v2/images/{out['copy_id']}")
    assert r.status_code == 404, helpers.describe(r)
    keys = ta.raw.post(f"/v1.0/{ta.project_id}/kms/list-keys", json_body={"limit": 1000}).json()["key_details"]
    mine = [k for k in keys if k["key_alias"] == alias]
    assert len(mine) == 1 and mine[0]["key_id"] == out["key_id"] and mine[0]["key_state"] == "2"
    # The Usage page showed the service's numbers: both images counted logically.
    assert out["logical_bytes"] >= 2 * 4 * MIB
    assert 0 < out["billable_bytes"] <= out["logical_bytes"]
    assert out["image_count"] >= 2


# ---- step groups of import from a bucket, sharing and export ------------------------------

def _bucket_with_image(t, tmp_path) -> tuple[str, str, bytes]:
    s3 = t.s3()
    bucket = f"console-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    data = helpers.raw_bytes(6 * MIB)
    obj = "images/disk.raw"
    s3.put_object(Bucket=bucket, Key=obj, Body=data)
    return bucket, obj, data


def test_console_import_from_bucket(ta, tmp_path):
    bucket, obj, data = _bucket_with_image(ta, tmp_path)
    # A qcow2 whose backing file is on the server's disk: refused by inspection, in the job.
    hostile = tmp_path / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw",
                    str(hostile), "64M"], check=True)
    ta.s3().put_object(Bucket=bucket, Key="images/hostile.qcow2", Body=hostile.read_bytes())
    name = helpers.unique("imported")
    out = run_group("import_from_bucket", {"endpoint": ta.endpoint, "users": {"a": user_of(ta)},
                                           "import": {"name": name, "bucket": bucket, "object": obj,
                                                      "bad_object": "images/hostile.qcow2",
                                                      "bad_error_text": "The image file is empty, missing, in the wrong format, or not readable."}})
    r = ta.raw.get(f"/v2/images/{out['image_id']}/file")
    assert r.status_code == 200 and r.content == data
    bad = ta.raw.get(f"/v1/{ta.project_id}/jobs/{out['bad_job_id']}").json()
    assert bad["status"] == "FAIL" and bad["error_code"] == "IMG.0057", bad


def test_console_share_accept_replicate(ta, tb, base_image):
    b_copy = helpers.unique("b-copy")
    out = run_group("share_accept_replicate", {
        "endpoint": ta.endpoint, "users": {"a": user_of(ta), "b": user_of(tb)},
        "image_name": base_image["name"], "b_copy_name": b_copy,
    })
    shown = helpers.glance_show(tb.raw, out["b_copy_id"])
    assert shown["owner"] == tb.project_id and shown["status"] == "active"


def test_console_export(ta, base_image):
    s3 = ta.s3()
    bucket = f"console-exp-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    before_jobs = {j["job_id"] for j in jobs_of(ta)}
    out = run_group("export", {"endpoint": ta.endpoint, "users": {"a": user_of(ta)}, "export": {
        "image_name": base_image["name"], "bucket": bucket, "missing_bucket": f"missing-{uuid.uuid4().hex[:10]}",
        "object": "exported/disk.qcow2"}})
    new_jobs = {j["job_id"] for j in jobs_of(ta)} - before_jobs
    assert new_jobs == {out["job_id"]}, "the export to a missing bucket must not have made a job"
    head = s3.head_object(Bucket=bucket, Key="exported/disk.qcow2")
    assert head["ContentLength"] > 0


def test_console_full_flow_import_share_accept_replicate_export(ta, tb, tmp_path):
    """The whole S8 story: import from a bucket, share to B, B accepts and replicates, export."""
    bucket, obj, data = _bucket_with_image(ta, tmp_path)
    name = helpers.unique("flow")
    users = {"a": user_of(ta), "b": user_of(tb)}
    imp = run_group("import_from_bucket", {"endpoint": ta.endpoint, "users": users,
                                           "import": {"name": name, "bucket": bucket, "object": obj}})
    shared = run_group("share_accept_replicate", {"endpoint": ta.endpoint, "users": users,
                                                  "image_name": name, "b_copy_name": name + "-b"})
    out_bucket = f"console-flow-{uuid.uuid4().hex[:10]}"
    tb.s3().create_bucket(Bucket=out_bucket)
    run_group("export", {"endpoint": ta.endpoint, "users": users, "export": {
        "user": "b", "image_name": name + "-b", "bucket": out_bucket,
        "missing_bucket": f"missing-{uuid.uuid4().hex[:10]}", "object": "flow.qcow2"}})
    assert imp["image_id"] != shared["b_copy_id"]
    assert tb.s3().head_object(Bucket=out_bucket, Key="flow.qcow2")["ContentLength"] > 0
