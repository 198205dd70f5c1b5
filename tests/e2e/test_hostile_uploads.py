"""Every file of the hostile corpus (scripts/make-hostile-corpus.sh: backing files, external data
files, foreign VMDK extents, format confusion, size lies, table pointers outside the file,
compression bombs, encrypted containers, ...) is refused by `PUT /v2/images/{id}/file` with its
named reason, and the image stays `queued` with nothing stored."""

import json
import subprocess
from pathlib import Path

import pytest

import helpers
from helpers import RawClient, describe, glance_create, glance_show

ROOT = Path(__file__).resolve().parents[2]
GLANCE_FORMATS = {"raw", "qcow2", "vhd", "vhdx", "vmdk", "vdi", "iso"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    subprocess.run(["bash", str(ROOT / "scripts" / "make-hostile-corpus.sh"), str(out)], check=True,
                   capture_output=True, timeout=900, cwd=ROOT)
    entries = json.loads((out / "expected.json").read_text())
    assert len(entries) >= 30
    return out, entries


def detected_format(path: Path) -> str:
    p = subprocess.run([str(helpers.OPENIMS_BIN), "image", "inspect", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode in (0, 1), p.stderr
    report = json.loads(p.stdout)
    assert report["safe"] is False, f"{path.name} is in the hostile corpus but inspects as safe"
    return report["format"]


def test_every_hostile_file_is_refused(fresh_server, corpus):
    out, entries = corpus
    c = fresh_server.credentials()
    raw = RawClient(fresh_server.endpoint, c["OPENIMS_ACCESS_KEY"], c["OPENIMS_SECRET_KEY"], c["OPENIMS_PROJECT_ID"])
    failures = []
    for e in entries:
        path = out / e["file"]
        declared = e["declared_format"] or detected_format(path)
        if declared not in GLANCE_FORMATS:
            declared = "raw"  # what a user would try for a format Glance does not list
        img = glance_create(raw, name=f"hostile-{len(failures)}", disk_format=declared, container_format="bare")
        r = raw.put(f"/v2/images/{img['id']}/file", body=path.read_bytes(), content_type="application/octet-stream")
        status = glance_show(raw, img["id"])["status"]
        problem = None
        if r.status_code not in (400, 415):
            problem = f"accepted or wrong status: {describe(r)}"
        elif status != "queued":
            problem = f"image is {status} after the refusal"
        elif r.status_code == 400:
            msg = r.json().get("message") or r.json()["error"]["message"]
            if not any(name in msg for name in e["expected"]):
                problem = f"refused for another reason: {msg!r}, expected one of {e['expected']}"
        if problem:
            failures.append(f"{e['file']} (declared {declared}): {problem}")
        assert raw.delete(f"/v2/images/{img['id']}").status_code == 204
    assert not failures, "\n".join(failures)
    # Nothing of any hostile file was stored.
    chunks = [p for p in (fresh_server.data_dir / "store" / "chunks").rglob("*") if p.is_file()]
    assert chunks == [], f"{len(chunks)} chunks stored from refused uploads"
