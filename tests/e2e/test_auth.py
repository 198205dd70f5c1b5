"""Authentication: AK/SK (SDK-HMAC-SHA256, spec §D) and Keystone-style tokens.

Every refused request is a *create* attempt (POST /v2/images with a unique name); after it we
check with a valid request that nothing was created."""

from datetime import timedelta

import pytest
import requests
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkims.v2 import ListImagesRequest

from helpers import (
    assert_error, describe, ims_client, make_active_image, password_token, unique, utcnow,
)


def names_in(t):
    r = t.raw.get("/v2/images", query={"limit": 1000})
    assert r.status_code == 200, describe(r)
    return {i["name"] for i in r.json()["images"]}


def create_attempt(t, **kw):
    name = unique("authprobe")
    r = t.raw.post("/v2/images", json_body={"name": name, "disk_format": "raw", "container_format": "bare"}, **kw)
    return name, r


def test_valid_signature_creates(tenant):
    name, r = create_attempt(tenant)
    assert r.status_code == 201, describe(r)
    assert r.json()["owner"] == tenant.project_id
    assert name in names_in(tenant)


def test_wrong_signature_401(tenant):
    name, r = create_attempt(tenant, sk=tenant.sk[:-1] + ("A" if tenant.sk[-1] != "A" else "B"))
    assert_error(r, 401, "APIGW.0301")
    assert name not in names_in(tenant)


def test_unknown_ak_401(tenant):
    name, r = create_attempt(tenant, ak="AKUNKNOWN" + "0" * 11, sk="S" * 40)
    assert_error(r, 401, "APIGW.0301")
    assert name not in names_in(tenant)


def test_tampered_body_and_query_401(tenant):
    def tamper_body(method, url, headers, body):
        return method, url, headers, body.replace(b"authprobe", b"authprobX")

    name, r = create_attempt(tenant, mutate_after_sign=tamper_body)
    assert_error(r, 401, "APIGW.0301")
    assert name not in names_in(tenant) and name.replace("authprobe", "authprobX") not in names_in(tenant)

    def tamper_query(method, url, headers, body):
        return method, url.replace("limit=5", "limit=6"), headers, body

    r = tenant.raw.get("/v2/cloudimages", query={"limit": 5}, mutate_after_sign=tamper_query)
    assert_error(r, 401, "APIGW.0301")

    def tamper_project(method, url, headers, body):
        headers = dict(headers)
        headers["X-Project-Id"] = "0" * 32
        return method, url, headers, body

    name, r = create_attempt(tenant, mutate_after_sign=tamper_project)
    assert_error(r, 401, "APIGW.0301")  # X-Project-Id is a signed header
    assert name not in names_in(tenant)


def test_unsigned_payload_header_added_after_signing_401(tenant):
    # Declaring the body unsigned is only honoured when that declaration is itself signed:
    # otherwise anyone holding a captured request could swap its body.
    def unsign_and_swap(method, url, headers, body):
        headers = dict(headers)
        headers["X-Sdk-Content-Sha256"] = "UNSIGNED-PAYLOAD"
        return method, url, headers, body.replace(b"authprobe", b"authprobX")

    name, r = create_attempt(tenant, mutate_after_sign=unsign_and_swap)
    assert_error(r, 401, "APIGW.0301")
    assert name.replace("authprobe", "authprobX") not in names_in(tenant)


def test_other_project_id_403(tenant, tenant_b):
    # tenant A's key, but X-Project-Id of B (correctly signed): the key may not act there
    name, r = create_attempt(tenant, project_id=tenant_b.project_id)
    assert_error(r, 403, "IMG.0030")
    assert name not in names_in(tenant) and name not in names_in(tenant_b)
    r = tenant.raw.get("/v2/cloudimages", project_id=tenant_b.project_id)
    assert_error(r, 403, "IMG.0030")
    # {project_id} in the path naming B while signing as A
    r = tenant.raw.get(f"/v2/{tenant_b.project_id}/images/tags")
    assert_error(r, 403, "IMG.0030")


@pytest.mark.parametrize("skew_min", [20, -20, 16, -16])
def test_skewed_date_401(tenant, skew_min):
    name, r = create_attempt(tenant, sdk_date=utcnow() + timedelta(minutes=skew_min))
    assert_error(r, 401, "APIGW.0301")
    assert name not in names_in(tenant)


def test_date_within_window_accepted(tenant):
    name, r = create_attempt(tenant, sdk_date=utcnow() - timedelta(minutes=10))
    assert r.status_code == 201, describe(r)
    name, r = create_attempt(tenant, sdk_date=utcnow() + timedelta(minutes=10))
    assert r.status_code == 201, describe(r)


def test_missing_authorization_401(tenant):
    name, r = create_attempt(tenant, auth="none", headers={"X-Project-Id": tenant.project_id})
    assert_error(r, 401, code_prefix="APIGW.")
    assert name not in names_in(tenant)
    r = tenant.raw.get("/v2/cloudimages", auth="none")
    assert_error(r, 401, code_prefix="APIGW.")


def test_garbage_authorization_401(tenant):
    name, r = create_attempt(tenant, auth="none", headers={
        "Authorization": "SDK-HMAC-SHA256 garbage", "X-Project-Id": tenant.project_id})
    assert_error(r, 401, code_prefix="APIGW.")
    assert name not in names_in(tenant)


def test_sdk_with_wrong_secret_raises_401(tenant):
    bad = ims_client(tenant.ak, "wrong" + tenant.sk[5:], tenant.project_id, tenant.endpoint)
    with pytest.raises(ClientRequestException) as ei:
        bad.list_images(ListImagesRequest())
    assert ei.value.status_code == 401 and ei.value.error_code == "APIGW.0301", ei.value
    assert ei.value.request_id


# ------------------------------------------------------------------------------------------
# Tokens
# ------------------------------------------------------------------------------------------

def test_password_token_and_catalog(tenant):
    r = password_token(tenant.endpoint, tenant.user, tenant.password, tenant.domain,
                       project_name=tenant.project, project_domain=tenant.domain)
    assert r.status_code == 201, describe(r)
    tok = r.headers.get("X-Subject-Token")
    assert tok
    body = r.json()["token"]
    assert body["project"]["id"] == tenant.project_id
    assert body["user"]["name"] == tenant.user
    assert "expires_at" in body and "password" in body["methods"]
    image = [s for s in body["catalog"] if s["type"] == "image"]
    assert len(image) == 1, body["catalog"]
    urls = [e["url"] for e in image[0]["endpoints"]]
    assert any(u.rstrip("/") in (tenant.endpoint, tenant.endpoint + "/v2") for u in urls), urls
    assert any(e["interface"] == "public" for e in image[0]["endpoints"])
    # the token works on Glance and IMS paths, scoped to the project
    r = requests.get(tenant.endpoint + "/v2/images", headers={"X-Auth-Token": tok}, timeout=10)
    assert r.status_code == 200, describe(r)
    r = requests.post(tenant.endpoint + "/v2/images", headers={"X-Auth-Token": tok},
                      json={"name": unique("tok")}, timeout=10)
    assert r.status_code == 201 and r.json()["owner"] == tenant.project_id, describe(r)


def test_token_by_project_id(tenant):
    r = password_token(tenant.endpoint, tenant.user, tenant.password, tenant.domain,
                       project_id=tenant.project_id)
    assert r.status_code == 201, describe(r)
    assert r.json()["token"]["project"]["id"] == tenant.project_id


def test_token_for_a_cannot_act_in_b(tenant, tenant_b):
    img_b = make_active_image(tenant_b.raw, name=unique("b-img"))
    tok = tenant.token()
    h = {"X-Auth-Token": tok}
    # B's project named in the path
    r = requests.get(f"{tenant.endpoint}/v2/{tenant_b.project_id}/images/tags", headers=h, timeout=10)
    assert_error(r, 403, "IMG.0030")
    # B's project in X-Project-Id next to A's token
    r = requests.get(f"{tenant.endpoint}/v2/cloudimages", headers={**h, "X-Project-Id": tenant_b.project_id},
                     timeout=10)
    assert_error(r, 403, "IMG.0030")
    # B's image is invisible to A
    r = requests.get(f"{tenant.endpoint}/v2/images/{img_b['id']}", headers={**h, "Accept": "application/json"},
                     timeout=10)
    assert r.status_code == 404, describe(r)
    # A user without a role in B cannot get a B-scoped token
    r = password_token(tenant.endpoint, tenant.user, tenant.password, tenant.domain,
                       project_id=tenant_b.project_id)
    assert r.status_code == 401, describe(r)


def test_bad_password_and_bad_token_401(tenant):
    r = password_token(tenant.endpoint, tenant.user, tenant.password + "x", tenant.domain,
                       project_name=tenant.project)
    assert r.status_code == 401, describe(r)
    assert "X-Subject-Token" not in r.headers
    r = password_token(tenant.endpoint, "nosuchuser", "pw", tenant.domain, project_name=tenant.project)
    assert r.status_code == 401, describe(r)
    r = requests.get(tenant.endpoint + "/v2/images", headers={"X-Auth-Token": "not-a-token"}, timeout=10)
    assert r.status_code == 401, describe(r)
    assert r.headers.get("X-Request-Id")
