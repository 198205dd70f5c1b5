"""IMS catalogue APIs driven with the official huaweicloudsdkims SDK (spec §A.3, §A.4, §A.6, §A.7).

Images are made with Glance `POST /v2/images` + `PUT /v2/images/{id}/file` (AK/SK signed), so
they are `active` without the import machinery."""

import secrets

import pytest
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkims.v2 import (
    AddImageTagRequest, AddImageTagRequestBody, AddOrUpdateTagsRequestBody,
    BatchAddOrDeleteTagsRequest, BatchAddOrDeleteTagsRequestBody, BatchDeleteTagsRequest,
    BatchDeleteTagsRequestBody, CreateImageRequest, CreateImageRequestBody,
    CreateOrUpdateTagsRequest, DeleteImageTagRequest, ImageTag, ListImageByTagsRequest,
    ListImageByTagsRequestBody, ListImageTagsRequest, ListImagesRequest, ListImagesTagsRequest,
    ListOsVersionsRequest, ListTagsRequest, ListVersionsRequest, ResourceTag,
    ShowImageQuotaRequest, ShowJobProgressRequest, ShowJobRequest, ShowVersionRequest, TagKeyValue,
    Tags, UpdateImageRequest, UpdateImageRequestBody,
)

from helpers import (
    HEX32, describe, glance_create, make_active_image, make_qcow2, unique, wait_job,
)


def sdk_fails(fn, status, code=None):
    with pytest.raises(ClientRequestException) as ei:
        fn()
    e = ei.value
    assert e.status_code == status, f"expected {status} {code}, got {e}"
    if code is not None:
        assert e.error_code == code, f"expected {code}, got {e}"
    assert e.request_id, f"no X-Request-Id on error: {e}"
    return e


def ids(images):
    return [i.id for i in images]


# ------------------------------------------------------------------------------------------
# A fixed catalogue in one project: alpha (raw), "beta <sfx>" (raw, name with a space),
# gamma (raw, protected), queued (no file).
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def catalogue(module_tenant, tmp_path_factory):
    t = module_tenant
    sfx = secrets.token_hex(3)
    imgs = {
        "alpha": make_active_image(t.raw, name=f"cat-alpha-{sfx}"),
        "beta": make_active_image(t.raw, name=f"cat-beta {sfx}", min_ram=2048),
        "gamma": make_active_image(t.raw, name=f"cat-gamma-{sfx}", protected=True),
        "queued": glance_create(t.raw, name=f"cat-queued-{sfx}", disk_format="raw", container_format="bare"),
    }
    return t, imgs


def test_list_images_private_shape(catalogue):
    t, imgs = catalogue
    r = t.ims.list_images(ListImagesRequest(imagetype="private"))
    assert sorted(ids(r.images)) == sorted(i["id"] for i in imgs.values())
    by_id = {i.id: i for i in r.images}
    a = by_id[imgs["alpha"]["id"]]
    assert a.name == imgs["alpha"]["name"]
    assert a.status == "active"
    assert a.imagetype == "private"
    assert a.isregistered == "true"
    assert a.owner == t.project_id
    assert a.disk_format == "raw"
    assert a.container_format == "bare"
    assert a.protected is False
    assert a.min_ram == 0
    assert a._self == f"/v2/images/{a.id}"
    assert a.file == f"/v2/images/{a.id}/file"
    assert a.schema == "/v2/schemas/image"
    assert a.virtual_env_type == "FusionCompute"
    assert a.image_source_type == "uds"
    assert a.os_type in ("Linux", "Windows", "Other")
    assert int(a.image_size) == len(imgs["alpha"]["_data"])
    assert a.created_at and a.updated_at and a.active_at
    assert isinstance(a.tags, list)
    assert by_id[imgs["queued"]["id"]].status == "queued"
    assert by_id[imgs["gamma"]["id"]].protected is True


def test_list_images_filter_name_with_space(catalogue):
    t, imgs = catalogue
    r = t.ims.list_images(ListImagesRequest(name=imgs["beta"]["name"]))
    assert ids(r.images) == [imgs["beta"]["id"]]
    r = t.ims.list_images(ListImagesRequest(name="no-such-name-" + secrets.token_hex(3)))
    assert r.images == []


def test_list_images_filter_status(catalogue):
    t, imgs = catalogue
    r = t.ims.list_images(ListImagesRequest(imagetype="private", status="queued"))
    assert ids(r.images) == [imgs["queued"]["id"]]
    r = t.ims.list_images(ListImagesRequest(imagetype="private", status="active"))
    assert sorted(ids(r.images)) == sorted(imgs[k]["id"] for k in ("alpha", "beta", "gamma"))


def test_list_images_filter_protected_and_min_ram(catalogue):
    t, imgs = catalogue
    r = t.ims.list_images(ListImagesRequest(imagetype="private", protected=True))
    assert ids(r.images) == [imgs["gamma"]["id"]]
    r = t.ims.list_images(ListImagesRequest(imagetype="private", protected=False))
    assert imgs["gamma"]["id"] not in ids(r.images) and imgs["alpha"]["id"] in ids(r.images)
    r = t.ims.list_images(ListImagesRequest(imagetype="private", min_ram=2048))
    assert ids(r.images) == [imgs["beta"]["id"]]


def test_list_images_filter_disk_format(tenant, tmp_path):
    raw = make_active_image(tenant.raw, name=unique("fmt-raw"))
    q = make_active_image(tenant.raw, make_qcow2(tmp_path / "f.qcow2", "32M"), disk_format="qcow2",
                          name=unique("fmt-qcow2"))
    r = tenant.ims.list_images(ListImagesRequest(imagetype="private", disk_format="qcow2"))
    assert ids(r.images) == [q["id"]]
    r = tenant.ims.list_images(ListImagesRequest(imagetype="private", disk_format="raw"))
    assert ids(r.images) == [raw["id"]]


def test_list_images_sort_by_name(catalogue):
    t, imgs = catalogue
    order = [imgs[k]["id"] for k in ("alpha", "beta", "gamma", "queued")]
    r = t.ims.list_images(ListImagesRequest(imagetype="private", sort_key="name", sort_dir="asc"))
    assert ids(r.images) == order
    r = t.ims.list_images(ListImagesRequest(imagetype="private", sort_key="name", sort_dir="desc"))
    assert ids(r.images) == order[::-1]


def test_list_images_limit_marker_paging(catalogue):
    t, imgs = catalogue
    want = sorted(i["id"] for i in imgs.values())
    full = t.ims.list_images(ListImagesRequest(imagetype="private"))
    seen, marker = [], None
    for _ in range(10):  # bounded: 4 images, limit 1
        r = t.ims.list_images(ListImagesRequest(imagetype="private", limit=1, marker=marker))
        assert len(r.images) <= 1
        seen += ids(r.images)
        marker = r.page_info.next_marker if r.page_info else None
        if not marker or not r.images:
            break
        assert marker == r.images[-1].id, "next_marker must be the last image id of the page"
    assert seen == ids(full.images), "paging must walk the default order without gaps/duplicates"
    assert sorted(seen) == want
    # the first page of a limited listing must announce the next page
    r = t.ims.list_images(ListImagesRequest(imagetype="private", limit=2))
    assert len(r.images) == 2 and r.page_info and r.page_info.next_marker == r.images[-1].id


def test_list_images_created_at_filters(catalogue):
    t, imgs = catalogue
    every = sorted(i["id"] for i in imgs.values())
    r = t.ims.list_images(ListImagesRequest(imagetype="private", created_at="gt:2000-01-01T00:00:00Z"))
    assert sorted(ids(r.images)) == every
    r = t.ims.list_images(ListImagesRequest(imagetype="private", created_at="gt:2999-01-01T00:00:00Z"))
    assert r.images == []
    r = t.ims.list_images(ListImagesRequest(imagetype="private", created_at="lt:2000-01-01T00:00:00Z"))
    assert r.images == []
    # the documented alternative time format (with a space, signed as %20)
    r = t.ims.list_images(ListImagesRequest(imagetype="private", created_at="gte:2000-01-01 00:00:00"))
    assert sorted(ids(r.images)) == every
    # gte/lt of an image's own created_at: in / out
    a = next(i for i in t.ims.list_images(ListImagesRequest(id=imgs["alpha"]["id"])).images)
    r = t.ims.list_images(ListImagesRequest(imagetype="private", created_at=f"gte:{a.created_at}"))
    assert a.id in ids(r.images)
    r = t.ims.list_images(ListImagesRequest(imagetype="private", created_at=f"lt:{a.created_at}"))
    assert a.id not in ids(r.images)


# ------------------------------------------------------------------------------------------
# update_image
# ------------------------------------------------------------------------------------------

def test_update_image_name_description_min_ram(tenant):
    img = make_active_image(tenant.raw, name=unique("upd"))
    new_name = unique("renamed")
    body = [
        UpdateImageRequestBody(op="replace", path="/name", value=new_name),
        UpdateImageRequestBody(op="add", path="/__description", value="a test image"),
        UpdateImageRequestBody(op="replace", path="/min_ram", value="1024"),
    ]
    r = tenant.ims.update_image(UpdateImageRequest(image_id=img["id"], body=body))
    assert r.id == img["id"]
    assert r.name == new_name
    assert r.description == "a test image"
    assert r.min_ram == 1024
    assert r.status == "active"
    # persisted, visible from both APIs
    listed = tenant.ims.list_images(ListImagesRequest(id=img["id"])).images
    assert [(i.name, i.description, i.min_ram) for i in listed] == [(new_name, "a test image", 1024)]
    g = tenant.raw.get(f"/v2/images/{img['id']}").json()
    assert g["name"] == new_name and g["min_ram"] == 1024


def test_update_image_refused_when_not_active(tenant):
    q = glance_create(tenant.raw, name=unique("q"), disk_format="raw", container_format="bare")
    body = [UpdateImageRequestBody(op="replace", path="/name", value="changed")]
    # IMS: update is only allowed on active images -> 400 IMG.0046 "The image is unavailable."
    sdk_fails(lambda: tenant.ims.update_image(UpdateImageRequest(image_id=q["id"], body=body)), 400, "IMG.0046")
    assert tenant.raw.get(f"/v2/images/{q['id']}").json()["name"] == q["name"]


# ------------------------------------------------------------------------------------------
# OS versions, quota, versions, jobs
# ------------------------------------------------------------------------------------------

def test_list_os_versions_bare_array(tenant):
    raw = tenant.raw.get("/v1/cloudimages/os_version")
    assert raw.status_code == 200, describe(raw)
    doc = raw.json()
    assert isinstance(doc, list) and doc, "list_os_versions must answer a top-level JSON array"
    r = tenant.ims.list_os_versions(ListOsVersionsRequest())
    assert len(r.body) == len(doc)
    all_versions = set()
    for plat in r.body:
        assert plat.platform and plat.version_list
        for v in plat.version_list:
            assert v.platform == plat.platform
            assert v.os_version_key == v.os_version
            assert v.os_bit in (32, 64)
            assert v.os_type in ("Linux", "Windows", "Other")
            all_versions.add(v.os_version)
    assert "Other Linux(64 bit)" in all_versions  # the documented default __os_version
    for tag in ("x86", "arm", "uefi", "bms"):
        sub = tenant.ims.list_os_versions(ListOsVersionsRequest(tag=tag))
        tagged = {v.os_version for p in sub.body for v in p.version_list}
        assert tagged <= all_versions, f"tag={tag} lists versions the unfiltered list lacks"
    x86 = {v.os_version for p in tenant.ims.list_os_versions(ListOsVersionsRequest(tag="x86")).body
           for v in p.version_list}
    assert x86, "tag=x86 must list something"


def test_show_image_quota(tenant):
    def image_quota():
        r = tenant.ims.show_image_quota(ShowImageQuotaRequest())
        res = {q.type: q for q in r.quotas.resources}
        assert "image" in res, r
        return res["image"]

    q = image_quota()
    assert (q.used, q.quota) == (0, 50)
    assert q.min is not None and q.max is not None and q.min <= q.quota <= q.max
    make_active_image(tenant.raw, name=unique("quota"))
    assert image_quota().used == 1


def test_list_versions_and_show_version(tenant):
    r = tenant.ims.list_versions(ListVersionsRequest())
    assert r.status_code in (200, 300)
    vids = {v.id: v for v in r.versions}
    assert any(v.startswith("v2") for v in vids), vids
    assert any(v.status == "CURRENT" for v in r.versions)
    for v in r.versions:
        assert v.status in ("CURRENT", "SUPPORTED", "DEPRECATED")
        assert v.links and v.links[0].href and v.links[0].rel == "self"
    r = tenant.ims.show_version(ShowVersionRequest(version="v2.0"))
    assert r.status_code in (200, 300)
    assert r.versions and all(v.id.startswith("v2") for v in r.versions), r.versions


def test_show_job_unknown_id(tenant):
    jid = secrets.token_hex(16)
    e = sdk_fails(lambda: tenant.ims.show_job(ShowJobRequest(job_id=jid)), 404)
    assert e.error_code and e.error_code.startswith("IMG."), e
    e = sdk_fails(lambda: tenant.ims.show_job_progress(ShowJobProgressRequest(job_id=jid)), 404)
    assert e.error_code and e.error_code.startswith("IMG."), e


def test_create_image_from_url_job(tenant, tmp_path):
    bucket = unique("cat").lower()
    s3 = tenant.s3()
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="disk.qcow2", Body=make_qcow2(tmp_path / "disk.qcow2"))
    body = CreateImageRequestBody(name=unique("imp"), image_url=f"{bucket}:disk.qcow2", min_disk=40,
                                  os_version="Other Linux(64 bit)")
    r = tenant.ims.create_image(CreateImageRequest(body=body))
    assert HEX32.match(r.job_id)
    job = wait_job(tenant.ims, r.job_id, timeout=120)
    assert job.job_type == "imsImportImageJob"
    assert job.status == "SUCCESS", job
    prog = tenant.ims.show_job_progress(ShowJobProgressRequest(job_id=r.job_id))
    assert prog.job_id == r.job_id and prog.status == "SUCCESS"
    assert prog.entities.image_id == job.entities.image_id and prog.entities.process_percent == 100, prog
    img = tenant.ims.list_images(ListImagesRequest(id=job.entities.image_id)).images
    # The stored form is the virtual disk itself (docs/import-export.md: `disk_format` raw).
    assert [(i.status, i.disk_format, i.min_disk) for i in img] == [("active", "raw", 40)], img


# ------------------------------------------------------------------------------------------
# Tags (#25-#33)
# ------------------------------------------------------------------------------------------

def tag_map(t, image_id):
    r = t.ims.list_image_tags(ListImageTagsRequest(image_id=image_id))
    return {x.key: x.value for x in r.tags}


def add_tag(t, image_id, key, value):
    return t.ims.add_image_tag(AddImageTagRequest(
        image_id=image_id, body=AddImageTagRequestBody(tag=ResourceTag(key=key, value=value))))


def test_add_image_tag_upsert(tenant):
    img = make_active_image(tenant.raw)
    r = add_tag(tenant, img["id"], "env", "dev")
    assert r.status_code == 204
    assert tag_map(tenant, img["id"]) == {"env": "dev"}
    add_tag(tenant, img["id"], "env", "prod")
    assert tag_map(tenant, img["id"]) == {"env": "prod"}


def test_batch_add_or_delete_tags(tenant):
    img = make_active_image(tenant.raw)

    def batch(action, pairs):
        return tenant.ims.batch_add_or_delete_tags(BatchAddOrDeleteTagsRequest(
            image_id=img["id"], body=BatchAddOrDeleteTagsRequestBody(
                action=action, tags=[ResourceTag(key=k, value=v) for k, v in pairs])))

    assert batch("create", [("a", "1"), ("b", "2")]).status_code == 204
    assert tag_map(tenant, img["id"]) == {"a": "1", "b": "2"}
    assert batch("delete", [("a", "1")]).status_code == 204
    assert tag_map(tenant, img["id"]) == {"b": "2"}
    assert batch("delete", [("missing", "x")]).status_code == 204  # deleting a missing tag succeeds
    assert tag_map(tenant, img["id"]) == {"b": "2"}
    # action is case-sensitive; duplicate keys in one request are refused; nothing changes
    sdk_fails(lambda: batch("CREATE", [("c", "3")]), 400)
    sdk_fails(lambda: batch("create", [("d", "1"), ("d", "2")]), 400)
    assert tag_map(tenant, img["id"]) == {"b": "2"}


def test_delete_image_tag_404_when_absent(tenant):
    img = make_active_image(tenant.raw)
    add_tag(tenant, img["id"], "k", "v")
    r = tenant.ims.delete_image_tag(DeleteImageTagRequest(image_id=img["id"], key="k"))
    assert r.status_code == 204
    assert tag_map(tenant, img["id"]) == {}
    sdk_fails(lambda: tenant.ims.delete_image_tag(DeleteImageTagRequest(image_id=img["id"], key="k")), 404)


def test_list_images_tags_and_list_image_by_tags(tenant):
    i1 = make_active_image(tenant.raw, name=unique("bytag1"))
    i2 = make_active_image(tenant.raw, name=unique("bytag2"))
    i3 = make_active_image(tenant.raw, name=unique("untagged"))
    add_tag(tenant, i1["id"], "k", "v1")
    add_tag(tenant, i1["id"], "j", "x")
    add_tag(tenant, i2["id"], "k", "v2")

    r = tenant.ims.list_images_tags(ListImagesTagsRequest())
    got = {t.key: sorted(t.values) for t in r.tags}
    assert got == {"k": ["v1", "v2"], "j": ["x"]}

    def by_tags(**kw):
        return tenant.ims.list_image_by_tags(ListImageByTagsRequest(body=ListImageByTagsRequestBody(**kw)))

    r = by_tags(action="filter", tags=[Tags(key="k", values=["v1"])], limit="10", offset="0")
    assert [x.resource_id for x in r.resources] == [i1["id"]]
    res = r.resources[0]
    assert res.resource_name == i1["name"]
    assert res.resource_detail.status == "active"
    assert sorted((x.key, x.value) for x in res.tags) == [("j", "x"), ("k", "v1")]
    assert r.total_count == 1

    r = by_tags(action="filter", tags=[Tags(key="k", values=[])])  # empty values: any value
    assert sorted(x.resource_id for x in r.resources) == sorted([i1["id"], i2["id"]])
    r = by_tags(action="filter", tags=[Tags(key="k", values=["v1", "v2"])])  # values are ORed
    assert r.total_count == 2
    r = by_tags(action="count", tags=[Tags(key="k", values=["v2"])])
    assert r.total_count == 1
    r = by_tags(action="filter", not_tags=[Tags(key="k", values=[])])
    assert [x.resource_id for x in r.resources] == [i3["id"]]
    r = by_tags(action="filter", without_any_tag=True)
    assert [x.resource_id for x in r.resources] == [i3["id"]]
    r = by_tags(action="filter", matches=[TagKeyValue(key="resource_name", value=i2["name"])],
                tags=[Tags(key="k", values=[])])
    assert [x.resource_id for x in r.resources] == [i2["id"]]
    r = by_tags(action="filter", tags=[Tags(key="k", values=[])], limit="1", offset="0")
    assert len(r.resources) == 1 and r.total_count == 2


def test_batch_delete_tags(tenant):
    img = make_active_image(tenant.raw)
    add_tag(tenant, img["id"], "a", "1")
    add_tag(tenant, img["id"], "b", "2")
    body = BatchDeleteTagsRequestBody(tags=[ResourceTag(key="a", value="1"), ResourceTag(key="zz", value="")])
    r = tenant.ims.batch_delete_tags(BatchDeleteTagsRequest(image_id=img["id"], body=body))
    assert r.status_code == 204
    assert tag_map(tenant, img["id"]) == {"b": "2"}
    # idempotent
    r = tenant.ims.batch_delete_tags(BatchDeleteTagsRequest(image_id=img["id"], body=body))
    assert r.status_code == 204
    assert tag_map(tenant, img["id"]) == {"b": "2"}


def test_create_or_update_tags_legacy_and_image_tag(tenant):
    img = make_active_image(tenant.raw)
    r = tenant.ims.create_or_update_tags(CreateOrUpdateTagsRequest(
        body=AddOrUpdateTagsRequestBody(image_id=img["id"], tag="owner.alice")))
    assert r.status_code == 204
    assert tag_map(tenant, img["id"]) == {"owner": "alice"}
    r = tenant.ims.create_or_update_tags(CreateOrUpdateTagsRequest(
        body=AddOrUpdateTagsRequestBody(image_id=img["id"], image_tag=ImageTag(key="owner", value="bob"))))
    assert r.status_code == 204
    assert tag_map(tenant, img["id"]) == {"owner": "bob"}
    r = tenant.ims.create_or_update_tags(CreateOrUpdateTagsRequest(
        body=AddOrUpdateTagsRequestBody(image_id=img["id"], image_tag=ImageTag(key="  tier ", value=" gold "))))
    assert r.status_code == 204
    assert tag_map(tenant, img["id"]) == {"owner": "bob", "tier": "gold"}  # trimmed


def test_list_tags(tenant):
    i1 = make_active_image(tenant.raw)
    i2 = make_active_image(tenant.raw)
    add_tag(tenant, i1["id"], "app", "web")
    add_tag(tenant, i2["id"], "app", "db")
    r = tenant.ims.list_tags(ListTagsRequest())
    assert sorted(r.tags) == ["app.db", "app.web"]
    r = tenant.ims.list_tags(ListTagsRequest(id=i1["id"]))
    assert r.tags == ["app.web"]


def test_concurrent_creates_and_tag_changes_all_succeed(tenant):
    # Many writers at once must queue for the database, never fail (SQLite lock upgrades).
    from concurrent.futures import ThreadPoolExecutor

    def create(i):
        r = tenant.raw.post("/v2/images", json_body={"name": f"conc-{i}", "disk_format": "raw",
                                                     "container_format": "bare"})
        return r.status_code, r.text

    with ThreadPoolExecutor(max_workers=8) as ex:
        results = list(ex.map(create, range(24)))
    assert all(code == 201 for code, _ in results), [r for r in results if r[0] != 201][:3]
    first = tenant.raw.get("/v2/images", query={"limit": 1}).json()["images"][0]["id"]

    def tag(i):
        return tenant.raw.put(f"/v2/images/{first}/tags/t{i}").status_code

    with ThreadPoolExecutor(max_workers=8) as ex:
        codes = list(ex.map(tag, range(8)))
    assert codes == [204] * 8, codes
