"""Isolation matrix of shared images: for every image operation and every relation of a
project to an image (owner, pending, accepted, rejected, removed, unrelated project of the
owner's domain, project of another domain) the expected allow/deny, generated as a table and
asserted cell by cell. The table is printed (run with `-s` to see it).

A denied cell of a project that is not a member (removed, unrelated, other domain) must also be
indistinguishable from the same operation on an image that does not exist (same status and
code): nothing leaks the image's existence. Operations that change nothing run first; then
the denied changes (after which the image must be unchanged); then the answers; the owner's
changes and finally the owner's delete run last."""

import json
import uuid

import pytest

from helpers import JSON_PATCH_V21, describe, error_code, make_active_image, make_tenant, unique, wait_job
from sharing_helpers import JSON_UTF8, add_members, answer, job_ok, make_project_in, remove_members

RELATIONS = ["owner", "pending", "accepted", "rejected", "removed", "unrelated", "other_domain"]
MEMBERS = {"pending", "accepted", "rejected"}


def listed(r, iid):
    assert r.status_code == 200, describe(r)
    return iid in {i["id"] for i in r.json()["images"]}, None


def http_ok(r):
    return 200 <= r.status_code < 300, r


class JobDenial:
    """A batch request accepted (200) whose job then failed: the denial of an async operation."""

    def __init__(self, r, job):
        self.status_code = 200
        self.job = job
        self.code = job.error_code
        self.text = f"{describe(r)} -> job {job.status} {job.error_code} {job.fail_reason}"


def job_success(t, r):
    """A 200 with a job id is allowed only if the job then succeeds."""
    if r.status_code != 200:
        return False, r
    job = wait_job(t.ims, r.json()["job_id"], timeout=120)
    if job.status == "SUCCESS":
        return True, r
    return False, JobDenial(r, job)


def show(resp):
    return resp.text if isinstance(resp, JobDenial) else describe(resp)


def code_of(resp):
    return resp.code if isinstance(resp, JobDenial) else error_code(resp)


class Ctx:
    def __init__(self, tenants, iid, third):
        self.t = tenants
        self.iid = iid
        self.third = third  # a project no relation is about: the target of re-shares
        self.buckets = {}  # relation -> a bucket of that relation's own project


# Each operation: (name, kind, fn(ctx, relation, tenant, image_id) -> (allowed, response|None),
# relations allowed). kind: "read" (changes nothing), "change" (denied ones change nothing),
# "answer" (the recipient's answer), "delete".
def op_show(c, rel, t, iid):
    return http_ok(t.raw.get(f"/v2/images/{iid}"))


def op_ims_show(c, rel, t, iid):
    # IMS has no GET by id: list_images?id= (default listing: owner's and accepted images).
    r = t.raw.get("/v2/cloudimages", query={"id": iid})
    return listed(r, iid)


def op_list_ims(c, rel, t, iid):
    return listed(t.raw.get("/v2/cloudimages"), iid)


def op_list_glance(c, rel, t, iid):
    return listed(t.raw.get("/v2/images", query={"limit": 1000}), iid)


def op_list_shared(status):
    def f(c, rel, t, iid):
        return listed(t.raw.get("/v2/cloudimages", query={"__imagetype": "shared", "member_status": status}), iid)
    return f


def op_list_glance_shared(status):
    def f(c, rel, t, iid):
        return listed(t.raw.get("/v2/images", query={"visibility": "shared", "member_status": status}), iid)
    return f


def op_download(c, rel, t, iid):
    return http_ok(t.raw.get(f"/v2/images/{iid}/file"))


def op_tags(c, rel, t, iid):
    return http_ok(t.raw.get(f"/v2/{t.project_id}/images/{iid}/tags"))


def op_members_glance(c, rel, t, iid):
    return http_ok(t.raw.get(f"/v2/images/{iid}/members"))


def op_members_ims(c, rel, t, iid):
    return http_ok(t.raw.get(f"/v1/{t.project_id}/cloudimages/{iid}/members"))


def op_show_own_member(c, rel, t, iid):
    return http_ok(t.raw.get(f"/v2/images/{iid}/members/{t.project_id}"))


def op_copy(c, rel, t, iid):
    r = t.raw.post(f"/v1/cloudimages/{iid}/copy", json_body={"name": unique("mx-copy")})
    return job_success(t, r)


def op_export(c, rel, t, iid):
    """Export to a bucket of the caller's own: only the owner may export (spec C.6)."""
    if rel not in c.buckets:
        c.buckets[rel] = f"mx-{rel.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
        t.s3().create_bucket(Bucket=c.buckets[rel])
    r = t.raw.post(f"/v1/cloudimages/{iid}/file",
                   json_body={"bucket_url": f"{c.buckets[rel]}:{uuid.uuid4().hex}.qcow2", "file_format": "qcow2"})
    return job_success(t, r)


def op_patch_glance(c, rel, t, iid):
    body = json.dumps([{"op": "replace", "path": "/name", "value": f"by-{rel}"}])
    return http_ok(t.raw.patch(f"/v2/images/{iid}", body=body, content_type=JSON_PATCH_V21))


def op_patch_ims(c, rel, t, iid):
    body = json.dumps([{"op": "replace", "path": "/name", "value": f"ims-by-{rel}"}])
    return http_ok(t.raw.patch(f"/v2/cloudimages/{iid}", body=body, content_type=JSON_UTF8))


def op_tag_glance(c, rel, t, iid):
    return http_ok(t.raw.put(f"/v2/images/{iid}/tags/by-{rel}"))


def op_tag_ims(c, rel, t, iid):
    return http_ok(t.raw.post(f"/v2/{t.project_id}/images/{iid}/tags",
                              json_body={"tag": {"key": f"by-{rel}", "value": "x"}}))


def op_add_member_glance(c, rel, t, iid):
    return http_ok(t.raw.post(f"/v2/images/{iid}/members", json_body={"member": c.third.project_id}))


def op_add_member_ims(c, rel, t, iid):
    r = t.raw.post("/v1/cloudimages/members", json_body={"images": [iid], "projects": [c.third.project_id]})
    return job_success(t, r)


def op_remove_member_glance(c, rel, t, iid):
    return http_ok(t.raw.delete(f"/v2/images/{iid}/members/{c.third.project_id}"))


def op_remove_member_ims(c, rel, t, iid):
    r = t.raw.delete("/v1/cloudimages/members", json_body={"images": [iid], "projects": [c.third.project_id]},
                     content_type=JSON_UTF8)
    return job_success(t, r)


def same_status(rel):
    return "rejected" if rel == "rejected" else "accepted"


def op_answer_glance(c, rel, t, iid):
    return http_ok(t.raw.put(f"/v2/images/{iid}/members/{t.project_id}", json_body={"status": same_status(rel)}))


def op_answer_ims(c, rel, t, iid):
    r = t.raw.put("/v1/cloudimages/members",
                  json_body={"images": [iid], "project_id": t.project_id, "status": same_status(rel)})
    return job_success(t, r)


def op_delete(c, rel, t, iid):
    return http_ok(t.raw.delete(f"/v2/images/{iid}"))


OWNER = {"owner"}
READERS = {"owner"} | MEMBERS
USERS = {"owner", "accepted"}
OPS = [
    ("show (Glance GET)", "read", op_show, READERS),
    ("IMS list ?id=", "read", op_ims_show, USERS),
    ("IMS list (default)", "read", op_list_ims, USERS),
    ("Glance list (default)", "read", op_list_glance, USERS),
    ("IMS list shared pending", "read", op_list_shared("pending"), {"pending"}),
    ("IMS list shared accepted", "read", op_list_shared("accepted"), {"accepted"}),
    ("IMS list shared rejected", "read", op_list_shared("rejected"), {"rejected"}),
    ("Glance list shared pending", "read", op_list_glance_shared("pending"), {"pending"}),
    ("Glance list shared accepted", "read", op_list_glance_shared("accepted"), {"accepted"}),
    ("Glance list shared rejected", "read", op_list_glance_shared("rejected"), {"rejected"}),
    ("download", "read", op_download, USERS),
    ("IMS list image tags", "read", op_tags, READERS),
    ("Glance list members", "read", op_members_glance, READERS),
    ("IMS list members", "read", op_members_ims, READERS),
    ("show own membership", "read", op_show_own_member, MEMBERS),
    ("replicate in region", "read", op_copy, USERS),
    ("export to own bucket", "read", op_export, OWNER),
    ("Glance PATCH", "change", op_patch_glance, OWNER),
    ("IMS PATCH", "change", op_patch_ims, OWNER),
    ("Glance add tag", "change", op_tag_glance, OWNER),
    ("IMS add tag", "change", op_tag_ims, OWNER),
    ("Glance add member (re-share)", "change", op_add_member_glance, OWNER),
    ("Glance remove member", "change", op_remove_member_glance, OWNER),
    ("IMS batch add member (re-share)", "change", op_add_member_ims, OWNER),
    ("IMS batch remove member", "change", op_remove_member_ims, OWNER),
    ("Glance answer (accept/reject)", "answer", op_answer_glance, MEMBERS),
    ("IMS answer (batch_update)", "answer", op_answer_ims, MEMBERS),
    ("delete", "delete", op_delete, OWNER),
]


@pytest.fixture
def relations(server, tenant, tenant_b):
    owner = tenant
    t = {
        "owner": owner,
        "pending": tenant_b,
        "accepted": make_project_in(tenant_b, "acc"),
        "rejected": make_project_in(tenant_b, "rej"),
        "removed": make_project_in(tenant_b, "rem"),
        "unrelated": make_project_in(owner, "unrel"),
        "other_domain": make_tenant(server, "other"),
    }
    third = make_project_in(tenant_b, "third")
    img = make_active_image(owner.raw, name=unique("matrix"))
    iid = img["id"]
    r = owner.raw.post(f"/v2/{owner.project_id}/images/{iid}/tags", json_body={"tag": {"key": "k", "value": "v"}})
    assert r.status_code == 204, describe(r)
    job_ok(add_members(owner, [iid], projects=[t[r].project_id for r in ("pending", "accepted", "rejected",
                                                                          "removed")]))
    job_ok(answer(t["accepted"], [iid], "accepted"))
    job_ok(answer(t["rejected"], [iid], "rejected"))
    job_ok(answer(t["removed"], [iid], "accepted"))
    job_ok(remove_members(owner, [iid], projects=[t["removed"].project_id]))
    return Ctx(t, iid, third)


def snapshot(owner, iid):
    img = owner.raw.get(f"/v2/images/{iid}").json()
    members = owner.raw.get(f"/v2/images/{iid}/members").json()["members"]
    return ({k: img.get(k) for k in ("name", "status", "checksum", "tags", "updated_at", "protected")},
            sorted((m["member_id"], m["status"]) for m in members))


def render(table):
    w0 = max(len(op) for op, _ in table)
    widths = [max(len(r), 5) for r in RELATIONS]
    lines = [" " * w0 + " | " + " | ".join(r.ljust(w) for r, w in zip(RELATIONS, widths))]
    lines.append("-" * len(lines[0]))
    for op, cells in table:
        lines.append(op.ljust(w0) + " | " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def test_isolation_matrix(relations):
    c = relations
    iid, owner = c.iid, c.t["owner"]
    ghost = str(uuid.uuid4())  # an image that does not exist
    order_non_owner_first = [r for r in RELATIONS if r != "owner"] + ["owner"]
    results = {}
    before = None
    for name, kind, fn, allowed in OPS:
        if kind in ("change", "answer") and before is None:
            before = snapshot(owner, iid)
        rels = RELATIONS if kind == "read" else order_non_owner_first
        for rel in rels:
            if kind in ("change", "delete") and rel == "owner":
                continue
            results[(name, rel)] = fn(c, rel, c.t[rel], iid)
    # Denied changes by everyone else changed nothing.
    assert snapshot(owner, iid)[0] == before[0], "a denied change modified the image"
    # The owner's changes, then the owner's delete (last).
    for name, kind, fn, allowed in OPS:
        if kind == "change":
            results[(name, "owner")] = fn(c, "owner", owner, iid)
    for name, kind, fn, allowed in OPS:
        if kind == "delete":
            results[(name, "owner")] = fn(c, "owner", owner, iid)

    table, failures = [], []
    for name, kind, fn, allowed in OPS:
        cells = []
        for rel in RELATIONS:
            got, resp = results[(name, rel)]
            want = rel in allowed
            cell = ("allow" if got else "deny") + ("" if got == want else " (!)")
            cells.append(cell)
            if got != want:
                failures.append(f"{name} / {rel}: expected {'allow' if want else 'deny'}, got "
                                f"{show(resp) if resp is not None else 'listed' if got else 'not listed'}")
            elif not got and resp is not None:
                if not (400 <= resp.status_code < 500 or isinstance(resp, JobDenial)) or not code_of(resp):
                    failures.append(f"{name} / {rel}: denial is not a 4xx with a code: {show(resp)}")
                if rel in ("removed", "unrelated", "other_domain"):
                    # Same answer as for an image that does not exist.
                    _, ghost_resp = fn(c, rel, c.t[rel], ghost)
                    if ghost_resp is not None and (ghost_resp.status_code, code_of(ghost_resp)) != (
                            resp.status_code, code_of(resp)):
                        failures.append(f"{name} / {rel}: denial differs from a missing image: "
                                        f"{show(resp)} vs {show(ghost_resp)}")
        table.append((name, cells))
    print("\n" + render(table))
    assert not failures, render(table) + "\n\n" + "\n".join(failures)
    # Cell by cell (the table above is the same data).
    for (name, cells) in table:
        for rel, cell in zip(RELATIONS, cells):
            assert "(!)" not in cell, (name, rel, cell)
    # The image is gone for everyone.
    for rel in RELATIONS:
        assert c.t[rel].raw.get(f"/v2/images/{iid}").status_code == 404
