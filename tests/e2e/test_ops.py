"""Operability: /healthz, Prometheus /metrics, X-Request-Id everywhere, graceful SIGTERM."""

import re
import threading
import uuid

import pytest
import requests

from helpers import (
    OCTET, RawClient, GeneratedBody, describe, glance_create, glance_show, make_tenant,
)

ROUTE_LABELS = ("route", "path", "endpoint", "handler", "matched_path")
STATUS_LABELS = ("status", "code", "status_code")
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prom(text):
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            types[parts[2]] = parts[3]
        elif line.startswith("#") or not line.strip():
            continue
        else:
            m = SAMPLE.match(line)
            assert m, f"unparsable metrics line: {line!r}"
            samples.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return types, samples


def family_samples(types, samples, kind, suffixes):
    out = {}
    for fam, typ in types.items():
        if typ != kind:
            continue
        names = {fam + s for s in suffixes}
        out[fam] = [s for s in samples if s[0] in names]
    return out


def label(lbls, keys):
    for k in keys:
        if k in lbls:
            return lbls[k]
    return None


def test_healthz(server):
    r = requests.get(server.endpoint + "/healthz", timeout=5)
    assert r.status_code == 200 and r.text.strip() == "ok", describe(r)
    assert r.headers.get("X-Request-Id")


def test_metrics_counters_and_histograms(server, tenant):
    tok = tenant.token()
    h = {"X-Auth-Token": tok, "Accept": "application/json"}
    missing = str(uuid.uuid4())
    assert requests.get(server.endpoint + "/v2/images", headers=h, timeout=10).status_code == 200
    assert requests.get(f"{server.endpoint}/v2/images/{missing}", headers=h, timeout=10).status_code == 404

    def scrape():
        r = requests.get(server.endpoint + "/metrics", timeout=10)
        assert r.status_code == 200, describe(r)
        assert r.headers["Content-Type"].startswith(("text/plain", "application/openmetrics-text"))
        return r.text

    text = scrape()
    types, samples = parse_prom(text)
    counters = family_samples(types, samples, "counter", ("", "_total"))
    hists = family_samples(types, samples, "histogram", ("_bucket", "_sum", "_count"))

    def find_counter(route_pred, status):
        for fam, ss in counters.items():
            for name, lbls, val in ss:
                r, s = label(lbls, ROUTE_LABELS), label(lbls, STATUS_LABELS)
                if r and route_pred(r) and s == status and val >= 1 and lbls.get("method", "GET") == "GET":
                    return fam, lbls, val
        return None

    is_list = lambda r: r.rstrip("/") == "/v2/images"  # noqa: E731
    is_show = lambda r: r.startswith("/v2/images/") and not r.endswith("/file")  # noqa: E731
    ok = find_counter(is_list, "200")
    assert ok, f"no request counter by route+status for GET /v2/images 200:\n{text[:3000]}"
    assert find_counter(is_show, "404"), f"no request counter for the 404:\n{text[:3000]}"
    assert missing not in text, "routes must be templated, not raw paths with ids (label cardinality)"

    bucket_ok = any(
        name.endswith("_bucket") and "le" in lbls and label(lbls, ROUTE_LABELS)
        for ss in hists.values() for name, lbls, _ in ss)
    assert bucket_ok, f"no latency histogram with route label:\n{text[:3000]}"

    # the counter moves
    fam, lbls, val = ok
    assert requests.get(server.endpoint + "/v2/images", headers=h, timeout=10).status_code == 200
    _, samples2 = parse_prom(scrape())
    after = [v for n, l, v in samples2 if l == lbls and n in (fam, fam + "_total")]
    assert after and after[0] >= val + 1, (lbls, val, after)


def test_request_id_on_every_response(server, tenant):
    e = server.endpoint
    tok = tenant.token()
    h = {"X-Auth-Token": tok, "Accept": "application/json"}
    responses = [
        requests.get(e + "/healthz", timeout=5),
        requests.get(e + "/metrics", timeout=5),
        requests.get(e + "/", timeout=5),
        requests.get(e + "/v2/images", headers=h, timeout=5),
        requests.get(f"{e}/v2/images/{uuid.uuid4()}", headers=h, timeout=5),
        requests.get(e + "/v2/images", timeout=5),  # 401
        requests.get(e + "/v2/images", headers={"X-Auth-Token": "bogus"}, timeout=5),
        requests.post(e + "/v2/images", headers={**h, "Content-Type": "application/json"}, data=b"{bad",
                      timeout=5),
        requests.get(e + "/no/such/route", timeout=5),
        tenant.raw.get("/v2/cloudimages"),
        tenant.raw.get("/v2/cloudimages", sk="wrong-secret"),
        tenant.raw.patch(f"/v2/cloudimages/{uuid.uuid4()}", body=b"", content_type="application/json"),
    ]
    ids = []
    for r in responses:
        rid = r.headers.get("X-Request-Id")
        assert rid, f"missing X-Request-Id: {describe(r)}"
        ids.append(rid)
    assert len(set(ids)) == len(ids), "request ids must be unique per request"
    statuses = {r.status_code for r in responses}
    assert {200, 401, 404}.issubset(statuses) and any(s >= 400 for s in statuses)


@pytest.mark.timeout(180)
def test_sigterm_finishes_inflight_upload(fresh_server):
    srv = fresh_server
    t = make_tenant(srv, "term")
    img = glance_create(t.raw, disk_format="raw", container_format="bare")
    body = GeneratedBody(total=48 << 20, pause_at=16 << 20, random_every=8 << 20)
    result = {}

    def run():
        try:
            uploader = RawClient(t.endpoint, t.ak, t.sk, t.project_id)  # own session/connection
            result["resp"] = uploader.put(f"/v2/images/{img['id']}/file", stream_body=body, content_type=OCTET,
                                       timeout=120)
        except Exception as ex:  # noqa: BLE001
            result["exc"] = ex

    th = threading.Thread(target=run, daemon=True)
    th.start()
    assert body.reached.wait(60), "upload never started"
    srv.proc.terminate()  # SIGTERM while the request is in flight
    body.resume.set()
    th.join(120)
    assert "exc" not in result, f"in-flight upload broken by SIGTERM: {result.get('exc')!r}"
    assert result["resp"].status_code == 204, describe(result["resp"])
    rc = srv.proc.wait(timeout=10)
    assert rc == 0, f"exit code {rc} after SIGTERM"
    srv.start(port=srv.port)
    shown = glance_show(t.raw, img["id"])
    assert shown["status"] == "active" and shown["size"] == 48 << 20
    assert shown["checksum"] == body.md5.hexdigest()


def test_sigterm_idle_exits_cleanly(fresh_server):
    rc = fresh_server.terminate(timeout=10)
    assert rc == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(fresh_server.endpoint + "/healthz", timeout=2)


def test_metrics_show_the_job_queue(server, tenant):
    """`/metrics` carries the job queue, read from the database at each scrape: jobs by type and
    status, running jobs on an expired lease, and the age of the oldest queued job."""
    from huaweicloudsdkims.v2 import CopyImageInRegionRequest, CopyImageInRegionRequestBody

    from helpers import make_active_image, unique, wait_job

    def jobs_gauge(text, job_type, status):
        _, samples = parse_prom(text)
        return sum(v for n, l, v in samples
                   if n == "openims_jobs" and l.get("job_type") == job_type and l.get("status") == status)

    def scrape():
        r = requests.get(server.endpoint + "/metrics", timeout=10)
        assert r.status_code == 200, describe(r)
        return r.text

    before = jobs_gauge(scrape(), "imsCopyImageInRegionJob", "SUCCESS")
    img = make_active_image(tenant.raw)
    job_id = tenant.ims.copy_image_in_region(CopyImageInRegionRequest(
        image_id=img["id"], body=CopyImageInRegionRequestBody(name=unique("m")))).job_id
    assert wait_job(tenant.ims, job_id, timeout=60).status == "SUCCESS"
    text = scrape()
    assert jobs_gauge(text, "imsCopyImageInRegionJob", "SUCCESS") >= before + 1, text[-3000:]
    types, samples = parse_prom(text)
    names = {n for n, _, _ in samples}
    assert "openims_jobs_running_on_expired_lease" in names, sorted(names)
    assert "openims_job_queue_oldest_age_seconds" in names, sorted(names)
