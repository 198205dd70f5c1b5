"""The embedded S3-compatible bucket endpoint, driven with boto3 and the aws CLI.

Every test signs with a tenant's AK/SK (AWS SigV4), region `local-1`, path-style addressing,
against `server.s3_endpoint` (`openims serve --s3-listen`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

import helpers
from helpers import VENV

REGION = "local-1"
MiB = 1024 * 1024


def s3_client(server, tenant, **config):
    return helpers.s3_client(server.s3_endpoint, tenant.ak, tenant.sk, REGION, **config)


def bucket_name(prefix: str = "b") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def error_code(exc: ClientError) -> str:
    return exc.response["Error"]["Code"]


def expect_error(code: str, fn, *args, **kwargs):
    with pytest.raises(ClientError) as ei:
        fn(*args, **kwargs)
    assert error_code(ei.value) == code, ei.value.response
    return ei.value


def store_bytes(server) -> int:
    """Bytes of stored chunks in the server's local chunk store."""
    total = 0
    for root, _dirs, files in os.walk(server.data_dir / "store" / "chunks"):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except FileNotFoundError:
                pass
    return total


class AwsCli:
    """The venv's `aws` CLI against the S3 endpoint, with an isolated config."""

    def __init__(self, server, tenant, home: Path):
        home.mkdir(parents=True, exist_ok=True)
        cfg = home / "config"
        cfg.write_text(f"[default]\nregion = {REGION}\ns3 =\n    addressing_style = path\n")
        self.server = server
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update({
            "HOME": str(home),
            "AWS_CONFIG_FILE": str(cfg),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
            "AWS_ACCESS_KEY_ID": tenant.ak,
            "AWS_SECRET_ACCESS_KEY": tenant.sk,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_MAX_ATTEMPTS": "1",
        })

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(VENV / "bin" / "aws"), "--endpoint-url", self.server.s3_endpoint, *args]
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p


@pytest.fixture
def s3(server, tenant):
    return s3_client(server, tenant)


@pytest.fixture
def aws(server, tenant, tmp_path):
    return AwsCli(server, tenant, tmp_path / "aws-home")


def test_credentials_file_names_the_s3_endpoint(server, creds):
    assert creds["OPENIMS_S3_ENDPOINT"] == server.s3_endpoint


def test_aws_cli_mb_cp_ls_rm_with_spaces_and_unicode(aws, tmp_path):
    b = bucket_name("cli")
    aws("s3", "mb", f"s3://{b}")
    assert b in aws("s3", "ls").stdout

    names = ["Windows Server 2012.qcow2", "образ.raw"]
    contents = {}
    for i, name in enumerate(names):
        data = os.urandom(3 * MiB + 1234 * i)
        src = tmp_path / name
        src.write_bytes(data)
        contents[name] = data
        aws("s3", "cp", str(src), f"s3://{b}/")
    # A nested key (multipart through the CLI: above its 8 MiB threshold).
    big = os.urandom(9 * MiB + 7)
    (tmp_path / "big.bin").write_bytes(big)
    aws("s3", "cp", str(tmp_path / "big.bin"), f"s3://{b}/dir/sub/big.bin")

    top = aws("s3", "ls", f"s3://{b}/").stdout
    for name in names:
        assert name in top, top
    assert "PRE dir/" in top, top
    rec = aws("s3", "ls", "--recursive", f"s3://{b}/").stdout
    assert "dir/sub/big.bin" in rec, rec

    for name, data in contents.items():
        out = tmp_path / f"back-{name}"
        aws("s3", "cp", f"s3://{b}/{name}", str(out))
        assert out.read_bytes() == data, name
    aws("s3", "cp", f"s3://{b}/dir/sub/big.bin", str(tmp_path / "big.back"))
    assert (tmp_path / "big.back").read_bytes() == big

    # rb refuses a non-empty bucket.
    p = aws("s3", "rb", f"s3://{b}", check=False)
    assert p.returncode != 0 and "BucketNotEmpty" in p.stderr, p.stderr

    aws("s3", "rm", f"s3://{b}/Windows Server 2012.qcow2")
    assert "Windows Server 2012.qcow2" not in aws("s3", "ls", f"s3://{b}/").stdout
    aws("s3", "rm", "--recursive", f"s3://{b}/")
    assert aws("s3", "ls", "--recursive", f"s3://{b}/").stdout.strip() == ""
    aws("s3", "rb", f"s3://{b}")
    assert b not in aws("s3", "ls").stdout


def test_boto3_multipart_upload_and_ranged_multipart_download(s3, tmp_path):
    b = bucket_name("mp")
    s3.create_bucket(Bucket=b)
    data = os.urandom(20 * MiB + 4321)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    s3.upload_file(str(src), b, "images/disk.raw", Config=cfg)

    head = s3.head_object(Bucket=b, Key="images/disk.raw")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-5"), head["ETag"]
    assert head["AcceptRanges"] == "bytes"
    # Multipart ETag as S3 computes it.
    md5s = b"".join(hashlib.md5(data[i:i + 5 * MiB]).digest() for i in range(0, len(data), 5 * MiB))
    assert head["ETag"].strip('"') == f"{hashlib.md5(md5s).hexdigest()}-5"

    out = tmp_path / "back.raw"
    s3.download_file(b, "images/disk.raw", str(out), Config=cfg)  # ranged GETs in parallel
    assert out.read_bytes() == data

    r = s3.get_object(Bucket=b, Key="images/disk.raw", Range="bytes=5242870-5242889")  # across parts
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert r["ContentRange"] == f"bytes 5242870-5242889/{len(data)}"
    assert r["Body"].read() == data[5242870:5242890]
    r = s3.get_object(Bucket=b, Key="images/disk.raw", Range="bytes=-10")
    assert r["Body"].read() == data[-10:]
    r = s3.get_object(Bucket=b, Key="images/disk.raw", Range=f"bytes={len(data) - 5}-")
    assert r["Body"].read() == data[-5:]
    expect_error("InvalidRange", s3.get_object, Bucket=b, Key="images/disk.raw",
                 Range=f"bytes={len(data)}-")
    # Conditional GET (what s3transfer sends with its ranged GETs).
    etag = head["ETag"]
    assert s3.get_object(Bucket=b, Key="images/disk.raw", IfMatch=etag, Range="bytes=0-0")["Body"].read() == data[:1]
    expect_error("PreconditionFailed", s3.get_object, Bucket=b, Key="images/disk.raw", IfMatch='"0000"')


def test_multipart_rules_and_listing(s3):
    b = bucket_name("mpr")
    s3.create_bucket(Bucket=b)
    key = "Windows Server 2012.qcow2"
    up = s3.create_multipart_upload(Bucket=b, Key=key, ContentType="application/x-qcow2")["UploadId"]
    uploads = s3.list_multipart_uploads(Bucket=b)["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [(key, up)]
    p1 = s3.upload_part(Bucket=b, Key=key, UploadId=up, PartNumber=1, Body=b"a" * 1000)["ETag"]
    p2 = s3.upload_part(Bucket=b, Key=key, UploadId=up, PartNumber=2, Body=b"b" * 1000)["ETag"]
    parts = s3.list_parts(Bucket=b, Key=key, UploadId=up)["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in parts] == [(1, 1000, p1), (2, 1000, p2)]
    # Non-last part below 5 MiB.
    expect_error("EntityTooSmall", s3.complete_multipart_upload, Bucket=b, Key=key, UploadId=up,
                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p1}, {"PartNumber": 2, "ETag": p2}]})
    expect_error("InvalidPart", s3.complete_multipart_upload, Bucket=b, Key=key, UploadId=up,
                 MultipartUpload={"Parts": [{"PartNumber": 3, "ETag": p1}]})
    # Only the last part may be small: complete with part 2 alone.
    s3.complete_multipart_upload(Bucket=b, Key=key, UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": p2}]})
    obj = s3.get_object(Bucket=b, Key=key)
    assert obj["Body"].read() == b"b" * 1000
    assert obj["ContentType"] == "application/x-qcow2"
    expect_error("NoSuchUpload", s3.list_parts, Bucket=b, Key=key, UploadId=up)
    # Abort.
    up2 = s3.create_multipart_upload(Bucket=b, Key="aborted")["UploadId"]
    s3.upload_part(Bucket=b, Key="aborted", UploadId=up2, PartNumber=1, Body=b"x")
    s3.abort_multipart_upload(Bucket=b, Key="aborted", UploadId=up2)
    assert s3.list_multipart_uploads(Bucket=b).get("Uploads", []) == []
    expect_error("NoSuchKey", s3.get_object, Bucket=b, Key="aborted")


def test_objects_with_prefix_delimiter_paging_metadata(s3):
    b = bucket_name("ls")
    s3.create_bucket(Bucket=b)
    keys = ["a.txt", "dir/one", "dir/sub/two", "dir/three", "Windows Server 2012.qcow2", "образ.raw",
            "plus+and%percent", "z"]
    for k in keys:
        s3.put_object(Bucket=b, Key=k, Body=k.encode(), Metadata={"origin": "e2e"})
    got = s3.get_object(Bucket=b, Key="образ.raw")
    assert got["Body"].read() == "образ.raw".encode()
    assert got["Metadata"] == {"origin": "e2e"}
    h = s3.head_object(Bucket=b, Key="Windows Server 2012.qcow2")
    assert h["ContentLength"] == len("Windows Server 2012.qcow2")
    assert h["ETag"] == '"%s"' % hashlib.md5(b"Windows Server 2012.qcow2").hexdigest()

    # v2 with delimiter (boto3 sends encoding-type=url and decodes).
    r = s3.list_objects_v2(Bucket=b, Delimiter="/")
    assert sorted(o["Key"] for o in r["Contents"]) == sorted(k for k in keys if "/" not in k)
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["dir/"]
    r = s3.list_objects_v2(Bucket=b, Prefix="dir/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["dir/one", "dir/three"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["dir/sub/"]
    # Paging (v2 continuation tokens and v1 markers).
    seen, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = s3.list_objects_v2(Bucket=b, MaxKeys=3, **kw)
        assert r["KeyCount"] <= 3
        seen += [o["Key"] for o in r.get("Contents", [])]
        if not r["IsTruncated"]:
            break
        token = r["NextContinuationToken"]
    assert seen == sorted(keys, key=lambda k: k.encode())
    pages = s3.get_paginator("list_objects").paginate(Bucket=b, PaginationConfig={"PageSize": 2})
    assert [o["Key"] for p in pages for o in p.get("Contents", [])] == seen

    # Copy shares the bytes; DeleteObjects removes several.
    s3.copy_object(Bucket=b, Key="copy of a", CopySource={"Bucket": b, "Key": "a.txt"})
    assert s3.get_object(Bucket=b, Key="copy of a")["Body"].read() == b"a.txt"
    r = s3.delete_objects(Bucket=b, Delete={"Objects": [{"Key": k} for k in keys + ["copy of a", "missing"]]})
    assert len(r["Deleted"]) == len(keys) + 2 and not r.get("Errors")
    assert s3.list_objects_v2(Bucket=b)["KeyCount"] == 0
    s3.delete_bucket(Bucket=b)
    with pytest.raises(ClientError) as ei:
        s3.head_bucket(Bucket=b)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_bucket_rules(s3, server, tenant_b):
    b = bucket_name("rules")
    s3.create_bucket(Bucket=b)
    expect_error("BucketAlreadyOwnedByYou", s3.create_bucket, Bucket=b)
    expect_error("BucketAlreadyExists", s3_client(server, tenant_b).create_bucket, Bucket=b)
    expect_error("InvalidBucketName", s3.create_bucket, Bucket="Bad_Bucket")
    expect_error("NoSuchBucket", s3.list_objects_v2, Bucket=bucket_name("missing"))
    expect_error("NoSuchKey", s3.get_object, Bucket=b, Key="nothing")
    assert s3.get_bucket_location(Bucket=b)["LocationConstraint"] == REGION
    assert b in [x["Name"] for x in s3.list_buckets()["Buckets"]]
    assert b not in [x["Name"] for x in s3_client(server, tenant_b).list_buckets()["Buckets"]]
    s3.put_object(Bucket=b, Key="k", Body=b"data")
    expect_error("BucketNotEmpty", s3.delete_bucket, Bucket=b)
    # If-None-Match: * refuses to replace.
    expect_error("PreconditionFailed", s3.put_object, Bucket=b, Key="k", Body=b"other", IfNoneMatch="*")
    s3.delete_object(Bucket=b, Key="k")
    s3.delete_bucket(Bucket=b)


def test_bad_credentials_are_refused(server, tenant):
    class Wrong:
        ak, sk = tenant.ak, "x" * 40
    expect_error("SignatureDoesNotMatch", s3_client(server, Wrong).list_buckets)

    class Unknown:
        ak, sk = "NOSUCHKEY0000000000", tenant.sk
    expect_error("InvalidAccessKeyId", s3_client(server, Unknown).list_buckets)


def test_other_project_denied_until_bucket_policy_allows(server, tenant, tenant_b):
    a, other = s3_client(server, tenant), s3_client(server, tenant_b)
    b = bucket_name("shared")
    a.create_bucket(Bucket=b)
    a.put_object(Bucket=b, Key="Windows Server 2012.qcow2", Body=b"owned by A")

    expect_error("AccessDenied", other.list_objects_v2, Bucket=b)
    expect_error("AccessDenied", other.get_object, Bucket=b, Key="Windows Server 2012.qcow2")
    expect_error("AccessDenied", other.put_object, Bucket=b, Key="from-b", Body=b"x")
    expect_error("AccessDenied", other.delete_object, Bucket=b, Key="Windows Server 2012.qcow2")
    expect_error("AccessDenied", other.create_multipart_upload, Bucket=b, Key="from-b")
    expect_error("AccessDenied", other.delete_bucket, Bucket=b)
    expect_error("AccessDenied", other.put_bucket_policy, Bucket=b, Policy="{}")

    expect_error("NoSuchBucketPolicy", a.get_bucket_policy, Bucket=b)
    expect_error("MalformedPolicy", a.put_bucket_policy, Bucket=b, Policy='{"Statement": "nope"}')
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"project": [tenant_b.project_id]},
        "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject"],
        "Resource": [f"arn:aws:s3:::{b}", f"arn:aws:s3:::{b}/*"]}]}
    a.put_bucket_policy(Bucket=b, Policy=json.dumps(policy))
    assert json.loads(a.get_bucket_policy(Bucket=b)["Policy"]) == policy

    keys = [o["Key"] for o in other.list_objects_v2(Bucket=b)["Contents"]]
    assert keys == ["Windows Server 2012.qcow2"]
    assert other.get_object(Bucket=b, Key="Windows Server 2012.qcow2")["Body"].read() == b"owned by A"
    other.put_object(Bucket=b, Key="from-b", Body=b"written by B")
    assert a.get_object(Bucket=b, Key="from-b")["Body"].read() == b"written by B"
    other.delete_object(Bucket=b, Key="from-b")
    # Administration stays with the owner.
    expect_error("AccessDenied", other.delete_bucket, Bucket=b)
    expect_error("AccessDenied", other.get_bucket_policy, Bucket=b)
    # A third project is still refused.
    a.delete_bucket_policy(Bucket=b)
    expect_error("AccessDenied", other.get_object, Bucket=b, Key="Windows Server 2012.qcow2")


def signed_head(server, tenant, method: str, bucket: str, key: str, body: bytes, **headers) -> bytes:
    """The request line and headers of a SigV4-signed S3 request, for a raw socket."""
    from urllib.parse import quote, urlsplit
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    url = f"{server.s3_endpoint}/{bucket}/{quote(key)}"
    req = AWSRequest(method=method, url=url, data=body, headers=headers)
    S3SigV4Auth(Credentials(tenant.ak, tenant.sk), "s3", REGION).add_auth(req)
    u = urlsplit(url)
    lines = [f"{method} {u.path} HTTP/1.1", f"Host: {u.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in req.headers.items() if k.lower() not in ("host", "content-length")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(f) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response (status, lower-case headers, body) from a socket file."""
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers.get("content-length", 0)))


def test_refused_upload_keeps_the_connection_in_step(server, tenant, tenant_b):
    """A refused PutObject sent with `Expect: 100-continue` (as boto3 sends it) must not leave the
    connection out of step. A small body is read before the answer, so the connection stays usable
    and the next request on it is parsed whole; a large unread body makes the answer say
    `Connection: close`. (Before, a client that got the early 403, sent no body and reused the
    connection could lose the first byte of its next request to the server's late drain: a
    `DELETE` arrived as `ELETE` and failed its signature.)"""
    import socket
    a = s3_client(server, tenant)
    b = bucket_name("expect")
    a.create_bucket(Bucket=b)
    a.put_object(Bucket=b, Key="Windows Server 2012.qcow2", Body=b"owned by A")
    host, port = server.s3_endpoint.removeprefix("http://").rsplit(":", 1)

    with socket.create_connection((host, int(port)), timeout=30) as sock, sock.makefile("rb") as f:
        sock.sendall(signed_head(server, tenant_b, "PUT", b, "from-b", b"x", Expect="100-continue"))
        assert f.readline().split()[1] == b"100", "a small body is read before the answer"
        assert f.readline() == b"\r\n"
        sock.sendall(b"x")
        status, headers, body = read_response(f)
        assert (status, headers.get("connection")) == (403, None), (status, headers, body)
        assert b"<Code>AccessDenied</Code>" in body, body
        sock.sendall(signed_head(server, tenant_b, "DELETE", b, "Windows Server 2012.qcow2", b""))
        status, headers, body = read_response(f)
        assert status == 403 and b"<Code>AccessDenied</Code>" in body, (status, body)

    big = b"y" * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as sock, sock.makefile("rb") as f:
        sock.sendall(signed_head(server, tenant_b, "PUT", b, "from-b", big, Expect="100-continue"))
        status, headers, body = read_response(f)
        assert status == 403 and b"<Code>AccessDenied</Code>" in body, (status, body)
        assert headers.get("connection") == "close", headers
        assert f.read() == b"", "the server closes the connection after the answer"
    assert [o["Key"] for o in a.list_objects_v2(Bucket=b)["Contents"]] == ["Windows Server 2012.qcow2"]


def test_identical_data_is_stored_once(server, s3, tenant, tmp_path):
    b = bucket_name("dedup")
    s3.create_bucket(Bucket=b)
    data = os.urandom(8 * MiB)
    before = store_bytes(server)
    s3.put_object(Bucket=b, Key="first.raw", Body=data)
    after_first = store_bytes(server)
    assert after_first - before >= 8 * MiB, (before, after_first)
    s3.put_object(Bucket=b, Key="second copy.raw", Body=data)
    after_second = store_bytes(server)
    assert after_second - after_first < 64 * 1024, (after_first, after_second)
    # The same bytes as a Glance image (raw): shared with the objects.
    img = helpers.make_active_image(tenant.raw, data)
    assert img["status"] == "active"
    after_image = store_bytes(server)
    assert after_image - after_second < 64 * 1024, (after_second, after_image)
    # A multipart upload whose part size is a multiple of 4 MiB shares the chunks too.
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=8 * MiB)
    src = tmp_path / "twice.raw"
    src.write_bytes(data + data)
    s3.upload_file(str(src), b, "multipart.raw", Config=cfg)
    assert s3.head_object(Bucket=b, Key="multipart.raw")["ETag"].strip('"').endswith("-2")
    assert store_bytes(server) - after_image < 64 * 1024
    assert s3.get_object(Bucket=b, Key="multipart.raw")["Body"].read() == data + data
    for k in ("first.raw", "second copy.raw"):
        assert s3.get_object(Bucket=b, Key=k)["Body"].read() == data
