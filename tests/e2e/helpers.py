"""Helpers for the OpenIMS end-to-end suite.

Everything here talks to a real `openims` process over loopback, using the real clients
(huaweicloudsdkims, openstacksdk, the `openstack` CLI) or raw HTTP signed with the SDK core's
own `Signer`, so the wire format is exactly what the official SDK produces.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import boto3
import requests
from botocore.config import Config
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from huaweicloudsdkims.v2 import ImsClient

VENV = Path(os.environ.get("OPENIMS_VENV", str(Path.home() / ".cache" / "openims-venv")))
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "openims-target")))
OPENIMS_BIN = Path(os.environ.get("OPENIMS_BIN", str(TARGET_DIR / "debug" / "openims")))

# Metadata backend of every server the suite starts: "sqlite" (default, a file in the data dir)
# or "postgres" (each `Server` gets its own fresh database on OPENIMS_TEST_PG_URL, dropped when
# the test process exits). `admin()` passes the same `--database` for that data dir.
TEST_DB = os.environ.get("OPENIMS_TEST_DB", "sqlite").strip().lower()
PG_URL = os.environ.get("OPENIMS_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432").rstrip("/")

SDK_USER_AGENT = "huaweicloud-usdk-python/3.0"
SDK_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
JSON_PATCH_V21 = "application/openstack-images-v2.1-json-patch"
OCTET = "application/octet-stream"
S3_REGION = "local-1"  # the embedded bucket endpoint's region (SigV4 scope)
_UNSET = object()


# --------------------------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_credentials(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        k, v = line.split("=", 1)
        parts = shlex.split(v) if v else [""]
        out[k.strip()] = parts[0] if parts else ""
    return out


def _die_with_parent():
    """Children get SIGKILL if pytest dies (no orphaned servers holding ports)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


# --------------------------------------------------------------------------------------------
# PostgreSQL test databases
# --------------------------------------------------------------------------------------------

# data dir (str) -> database URL, for servers and admin commands not on the SQLite default.
DATABASES: dict[str, str] = {}
_CREATED_PG: list[str] = []


def psql(sql: str, db: str = "postgres") -> str:
    """Runs one SQL statement with `psql` against `PG_URL/db`; returns unaligned output."""
    p = subprocess.run(["psql", f"{PG_URL}/{db}", "-v", "ON_ERROR_STOP=1", "-X", "-q", "-At", "-c", sql],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"psql {db}: {sql!r} failed: {p.stderr}")
    return p.stdout


def create_pg_database() -> str:
    """A fresh, empty PostgreSQL database; returns its URL. Dropped when this process exits."""
    name = "openims_test_" + secrets.token_hex(6)
    psql(f'CREATE DATABASE "{name}"')
    if not _CREATED_PG:
        atexit.register(drop_pg_databases)
    _CREATED_PG.append(name)
    return f"{PG_URL}/{name}"


def drop_pg_databases() -> None:
    while _CREATED_PG:
        name = _CREATED_PG.pop()
        try:
            psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _sql_literal(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


# Every server started in this process, so a failing test can print their logs.
RUNNING_SERVERS: list["Server"] = []


class Server:
    """One `openims serve` process on a loopback port with its own data directory."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args: Iterable[str] = (), binary: Path = OPENIMS_BIN):
        self.binary = Path(binary)
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.port: Optional[int] = None
        # The embedded S3 endpoint's port (`--s3-listen`), unless the caller passes its own.
        self.s3_port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log_fh = None
        # Metadata database: SQLite in the data dir, or (OPENIMS_TEST_DB=postgres) a fresh
        # PostgreSQL database of its own, unless the caller passes `--database`.
        self.database_url: Optional[str] = None
        if TEST_DB == "postgres" and not any(a.startswith("--database") for a in self.extra_args):
            self.database_url = create_pg_database()
            DATABASES[str(self.data_dir)] = self.database_url

    @property
    def is_postgres(self) -> bool:
        return self.database_url is not None

    def sql(self, query: str, *params) -> list:
        """Runs one SQL statement on this server's metadata database (`?` placeholders);
        returns the rows as tuples of strings (PostgreSQL) or native values (SQLite)."""
        if self.database_url is None:
            import sqlite3
            con = sqlite3.connect(str(self.data_dir / "openims.db"), timeout=30)
            try:
                rows = con.execute(query, params).fetchall()
                con.commit()
                return rows
            finally:
                con.close()
        parts = query.split("?")
        assert len(parts) == len(params) + 1, "placeholder count"
        text = parts[0] + "".join(_sql_literal(v) + rest for v, rest in zip(params, parts[1:]))
        out = psql(text, db=self.database_url.rsplit("/", 1)[1])
        return [tuple(line.split("|")) for line in out.splitlines() if line]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def s3_endpoint(self) -> str:
        """URL of the embedded S3-compatible bucket endpoint."""
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, port: Optional[int] = None, ready_timeout: float = 60.0) -> "Server":
        if not self.binary.exists():
            raise RuntimeError(f"openims binary not found at {self.binary} (set OPENIMS_BIN)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or self.port or free_port()
        self._close_log()
        self._log_fh = open(self.log_path, "ab", buffering=0)
        self._log_fh.write(f"\n===== start {datetime.now().isoformat()} port {self.port} =====\n".encode())
        cmd = [str(self.binary), "serve", "--data-dir", str(self.data_dir),
               "--listen", f"127.0.0.1:{self.port}"]
        if not any(a.startswith("--s3-listen") for a in self.extra_args):
            self.s3_port = self.s3_port or free_port()
            cmd += ["--s3-listen", f"127.0.0.1:{self.s3_port}"]
        if self.database_url is not None:
            cmd += ["--database", self.database_url]
        cmd += self.extra_args
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        if self not in RUNNING_SERVERS:
            RUNNING_SERVERS.append(self)
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(f"openims exited with {rc} before becoming ready:\n{self.log_tail()}")
            try:
                r = requests.get(self.endpoint + "/healthz", timeout=1)
                if r.status_code == 200 and (self.data_dir / "credentials").exists():
                    return
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:  # not listening yet
                last = repr(e)
            time.sleep(0.05)
        raise RuntimeError(f"openims not ready after {timeout}s (last: {last}):\n{self.log_tail()}")

    def credentials(self) -> dict:
        return parse_credentials(self.data_dir / "credentials")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code, raises if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"openims did not exit within {timeout}s of SIGTERM:\n{self.log_tail()}")
        finally:
            self._close_log()
        return rc

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_log()

    def _close_log(self):
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    def log_tail(self, n: int = 150) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # ---- admin CLI ----
    def admin(self, *args: str) -> Any:
        return admin(self.data_dir, *args, binary=self.binary)


def admin_db_flags(data_dir: Path) -> list:
    """`--database URL` when the server of `data_dir` is not on its SQLite default."""
    url = DATABASES.get(str(Path(data_dir)))
    return ["--database", url] if url else []


def admin(data_dir: Path, *args: str, binary: Path = OPENIMS_BIN) -> Any:
    """`openims admin --data-dir D --output json ...`; returns the parsed JSON output.

    If the CLI rejects the flags in that position (clap: defined on the leaf commands), the
    same command is retried with the flags after the subcommand."""
    flags = ["--data-dir", str(data_dir), *admin_db_flags(data_dir), "--output", "json"]
    tries = [[str(binary), "admin", *flags, *args], [str(binary), "admin", *args, *flags]]
    for i, cmd in enumerate(tries):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if p.returncode == 2 and "unexpected argument" in p.stderr and i == 0:
            continue
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\nstdout: {p.stdout}\nstderr: {p.stderr}")
        out = p.stdout.strip()
        return json.loads(out) if out else None


# --------------------------------------------------------------------------------------------
# Raw HTTP (AK/SK signed with the SDK's Signer, token, or unauthenticated)
# --------------------------------------------------------------------------------------------

class _Creds:
    def __init__(self, ak, sk):
        self.ak, self.sk = ak, sk


def canonical_query(query) -> list:
    if query is None:
        return []
    if isinstance(query, dict):
        return list(query.items())
    return list(query)


class RawClient:
    """Sends arbitrary requests, signed exactly like the SDK does (or not at all)."""

    def __init__(self, endpoint: str, ak: Optional[str] = None, sk: Optional[str] = None,
                 project_id: Optional[str] = None, token: Optional[str] = None):
        self.endpoint = endpoint.rstrip("/")
        self.netloc = self.endpoint.split("://", 1)[1]
        self.ak, self.sk, self.project_id, self.token = ak, sk, project_id, token
        self.session = requests.Session()

    def request(self, method: str, path: str, *, query=None, body: Any = None, json_body: Any = _UNSET,
                content_type: Any = _UNSET, headers: Optional[dict] = None, auth: str = "aksk",
                ak: Optional[str] = None, sk: Optional[str] = None, project_id: Any = _UNSET,
                sdk_date: Optional[datetime] = None, token: Optional[str] = None,
                stream_body: Any = None, timeout: float = 60, stream: bool = False,
                accept: Optional[str] = "application/json",
                mutate_after_sign=None) -> requests.Response:
        """auth: "aksk" (SDK-HMAC-SHA256), "token" (X-Auth-Token) or "none".

        `json_body` is serialised like the SDK (json.dumps default separators, UTF-8).
        `stream_body` (an iterable/file-like) is sent instead of `body` (signed as
        UNSIGNED-PAYLOAD, which is what the signer does for non-JSON content types).
        `mutate_after_sign(method, url, headers, body)` may tamper with the signed request.
        """
        if json_body is not _UNSET:
            body = json.dumps(json_body).encode("utf-8")
            if content_type is _UNSET:
                content_type = "application/json;charset=utf-8"
        if isinstance(body, str):
            body = body.encode("utf-8")
        if content_type is _UNSET:
            content_type = "application/json"
        hdrs: dict = {"User-Agent": SDK_USER_AGENT}
        if content_type is not None:
            hdrs["Content-Type"] = content_type
        pid = self.project_id if project_id is _UNSET else project_id
        if pid is not None and auth == "aksk":
            hdrs["X-Project-Id"] = pid
        if sdk_date is not None:
            hdrs["X-Sdk-Date"] = sdk_date.strftime(SDK_DATE_FORMAT)
        if headers:
            hdrs.update(headers)
        q = canonical_query(query)

        if auth == "aksk":
            sign_body = body if stream_body is None else b"streamed"
            req = SdkRequest(method=method.upper(), schema="http", host=self.netloc, resource_path=path,
                             query_params=list(q), header_params=hdrs, body=sign_body or b"")
            Signer(_Creds(ak or self.ak, sk or self.sk)).sign(req)
            url = self.endpoint + req.uri
            send_headers = dict(req.header_params)
        else:
            req = SdkRequest(method=method.upper(), schema="http", host=self.netloc, resource_path=path,
                             query_params=list(q), header_params=hdrs, body=b"")
            Signer.process_request_uri(req)
            url = self.endpoint + req.uri
            send_headers = dict(hdrs)
            if auth == "token":
                send_headers["X-Auth-Token"] = token or self.token
        if accept:
            send_headers.setdefault("Accept", accept)
        data = stream_body if stream_body is not None else body
        if mutate_after_sign:
            method, url, send_headers, data = mutate_after_sign(method, url, send_headers, data)
        return self.session.request(method.upper(), url, data=data, headers=send_headers, timeout=timeout,
                                    allow_redirects=False, stream=stream)

    # shortcuts
    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)

    def put(self, path, **kw):
        return self.request("PUT", path, **kw)

    def patch(self, path, **kw):
        return self.request("PATCH", path, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)


class _Prepared(Exception):
    def __init__(self, method, url, headers, body):
        super().__init__("prepared")
        self.method, self.url, self.headers, self.body = method, url, headers, body


@dataclass
class EarlyResponse:
    status_code: int
    headers: dict
    content: bytes
    sent: int

    def json(self):
        return json.loads(self.content)


def send_reading_early(client: "RawClient", method: str, path: str, body: bytes, timeout: float = 60,
                       **kw) -> EarlyResponse:
    """Send a (signed) request over a raw socket while watching for an early response, the way
    curl does: a server may answer 413 before the body is complete and close the connection,
    which python's http.client only notices as a reset."""
    import select
    from urllib.parse import urlsplit

    def capture(m, url, headers, data):
        raise _Prepared(m, url, headers, data)

    try:
        client.request(method, path, body=body, mutate_after_sign=capture, **kw)
    except _Prepared as p:
        prep = p
    u = urlsplit(prep.url)
    target = u.path + (f"?{u.query}" if u.query else "")
    head = [f"{method.upper()} {target} HTTP/1.1", f"Host: {u.netloc}", f"Content-Length: {len(body)}",
            "Connection: close"]
    head += [f"{k}: {v}" for k, v in prep.headers.items() if k.lower() not in ("host", "content-length")]
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    view, sent, resp = memoryview(body), 0, b""
    deadline = time.monotonic() + timeout
    try:
        while sent < len(body) and time.monotonic() < deadline:
            r, w, _ = select.select([sock], [sock], [], 1)
            if r:
                break
            if w:
                try:
                    sent += sock.send(view[sent:sent + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    break
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            resp += chunk
            if b"\r\n\r\n" in resp:
                hdr, _, rest = resp.partition(b"\r\n\r\n")
                m = re.search(rb"(?im)^content-length:\s*(\d+)", hdr)
                if m and len(rest) >= int(m.group(1)):
                    break
    finally:
        sock.close()
    if not resp:
        raise ConnectionError(f"no response at all (sent {sent}/{len(body)} bytes)")
    hdr, _, content = resp.partition(b"\r\n\r\n")
    lines = hdr.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return EarlyResponse(status, headers, content, sent)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def describe(resp: requests.Response) -> str:
    req = resp.request
    try:
        text = resp.text[:800]
    except Exception:  # streamed
        text = "(stream)"
    return f"{req.method} {req.url} -> {resp.status_code} {dict(resp.headers)} {text}"


def error_code(resp: requests.Response) -> Optional[str]:
    """The IMG/APIGW code of an error body ({"error":{"code"}} or top-level error_code)."""
    try:
        b = resp.json()
    except ValueError:
        return None
    if isinstance(b, dict):
        e = b.get("error")
        if isinstance(e, dict) and "code" in e:
            return e["code"]
        for k in ("error_code", "errorCode"):
            if k in b:
                return b[k]
        c = b.get("code")
        if isinstance(c, str) and (c.startswith("IMG.") or c.startswith("APIGW.")):
            return c
    return None


def assert_status(resp: requests.Response, *statuses: int) -> None:
    assert resp.status_code in statuses, f"expected {statuses}, got: {describe(resp)}"


def assert_error(resp: requests.Response, status: int, code: Optional[str] = None,
                 code_prefix: Optional[str] = None) -> None:
    assert resp.status_code == status, f"expected HTTP {status} {code or ''}, got: {describe(resp)}"
    assert resp.headers.get("X-Request-Id"), f"error response without X-Request-Id: {describe(resp)}"
    got = error_code(resp)
    if code is not None:
        assert got == code, f"expected error code {code}, got {got!r}: {describe(resp)}"
    if code_prefix is not None:
        assert got and got.startswith(code_prefix), f"expected a {code_prefix}* code, got {got!r}: {describe(resp)}"


def assert_glance_error(resp: requests.Response, status: int) -> None:
    """Glance-style JSON error (client sent Accept: application/json)."""
    assert resp.status_code == status, f"expected HTTP {status}, got: {describe(resp)}"
    assert resp.headers.get("X-Request-Id"), describe(resp)
    b = resp.json()
    assert isinstance(b.get("message"), str) and b["message"], describe(resp)
    assert isinstance(b.get("code"), str) and b["code"].startswith(f"{status} "), describe(resp)
    assert "title" in b, describe(resp)


# --------------------------------------------------------------------------------------------
# Identity / tenants
# --------------------------------------------------------------------------------------------

@dataclass
class Tenant:
    server: Server
    domain: str
    domain_id: str
    project: str
    project_id: str
    user: str
    password: str
    ak: str
    sk: str
    _ims: Any = field(default=None, repr=False)
    _raw: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def ims(self) -> ImsClient:
        if self._ims is None:
            self._ims = ims_client(self.ak, self.sk, self.project_id, self.endpoint)
        return self._ims

    @property
    def raw(self) -> RawClient:
        if self._raw is None:
            self._raw = RawClient(self.endpoint, self.ak, self.sk, self.project_id)
        return self._raw

    def token(self) -> str:
        r = password_token(self.endpoint, self.user, self.password, self.domain,
                           project_name=self.project, project_domain=self.domain)
        assert r.status_code == 201, describe(r)
        return r.headers["X-Subject-Token"]

    def token_client(self) -> RawClient:
        return RawClient(self.endpoint, token=self.token())

    def s3(self, region: str = S3_REGION, **config):
        """boto3 for this tenant on its server's embedded bucket endpoint."""
        return s3_client(self.server.s3_endpoint, self.ak, self.sk, region, **config)


def s3_client(endpoint: str, ak: str, sk: str, region: str = S3_REGION, **config):
    """boto3 on an S3 endpoint (path-style, SigV4, no retries: a refused request is seen as is)."""
    opts = {"s3": {"addressing_style": "path"}, "signature_version": "s3v4",
            "retries": {"max_attempts": 1}, **config}
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ak, aws_secret_access_key=sk,
                        region_name=region, config=Config(**opts))


def make_tenant(server: Server, prefix: str = "t") -> Tenant:
    sfx = secrets.token_hex(4)
    dom = admin(server.data_dir, "domain", "create", f"{prefix}dom{sfx}", binary=server.binary)
    proj = admin(server.data_dir, "project", "create", f"{prefix}proj{sfx}", "--domain", dom["name"],
                 binary=server.binary)
    pw = "Pw-" + secrets.token_urlsafe(12)
    user = admin(server.data_dir, "user", "create", f"{prefix}user{sfx}", "--domain", dom["name"],
                 "--password", pw, binary=server.binary)
    admin(server.data_dir, "user", "grant", user["name"], "--project", proj["id"], "--domain", dom["name"],
          binary=server.binary)
    key = admin(server.data_dir, "key", "create", "--project", proj["id"], "--user", user["name"],
                "--domain", dom["name"], binary=server.binary)
    assert HEX32.match(proj["id"]), proj
    assert key["project_id"] == proj["id"], key
    return Tenant(server=server, domain=dom["name"], domain_id=dom["id"], project=proj["name"],
                  project_id=proj["id"], user=user["name"], password=pw,
                  ak=key["access_key"], sk=key["secret_key"])


def default_tenant(server: Server) -> Tenant:
    c = server.credentials()
    return Tenant(server=server, domain=c["OPENIMS_DOMAIN"], domain_id=c["OPENIMS_DOMAIN_ID"],
                  project=c["OPENIMS_PROJECT"], project_id=c["OPENIMS_PROJECT_ID"],
                  user=c["OPENIMS_USER"], password=c["OPENIMS_PASSWORD"],
                  ak=c["OPENIMS_ACCESS_KEY"], sk=c["OPENIMS_SECRET_KEY"])


def password_token(endpoint: str, user: str, password: str, user_domain: str, *,
                   project_name: Optional[str] = None, project_domain: Optional[str] = None,
                   project_id: Optional[str] = None) -> requests.Response:
    scope = None
    if project_id:
        scope = {"project": {"id": project_id}}
    elif project_name:
        scope = {"project": {"name": project_name, "domain": {"name": project_domain or user_domain}}}
    body = {"auth": {"identity": {"methods": ["password"], "password": {
        "user": {"name": user, "domain": {"name": user_domain}, "password": password}}}}}
    if scope:
        body["auth"]["scope"] = scope
    return requests.post(endpoint + "/v3/auth/tokens", json=body, timeout=30)


def ims_client(ak: str, sk: str, project_id: str, endpoint: str) -> ImsClient:
    assert endpoint.startswith("http://"), "always pass http:// (spec E.2 pitfall 1)"
    cfg = HttpConfig.get_default_config()
    cfg.timeout = (5, 60)
    return (ImsClient.new_builder()
            .with_http_config(cfg)
            .with_credentials(BasicCredentials(ak, sk, project_id))
            .with_endpoints([endpoint])
            .build())


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def unique(prefix: str = "img") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def raw_bytes(size: int = 256 * 1024, seed: Optional[bytes] = None) -> bytes:
    """Deterministic non-trivial raw disk content (no recognisable format magic)."""
    seed = seed or secrets.token_bytes(16)
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    data = bytes(out[:size])
    # make sure no format magic at the start (QFI, vhdx, KDMV, conectix, ...)
    return b"\x00" * 512 + data[512:]


def make_qcow2(path: Path, virtual_size: str = "64M", write_pattern: bool = True) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), virtual_size], check=True)
    if write_pattern:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 128k", str(path)],
                       check=True, capture_output=True)
    return path.read_bytes()


def glance_create(client: RawClient, *, auth: str = "aksk", **fields) -> dict:
    fields.setdefault("name", unique())
    r = client.post("/v2/images", json_body=fields, auth=auth)
    assert r.status_code == 201, describe(r)
    return r.json()


def glance_upload(client: RawClient, image_id: str, data: bytes, *, auth: str = "aksk",
                  content_type: str = OCTET) -> requests.Response:
    return client.put(f"/v2/images/{image_id}/file", body=data, content_type=content_type, auth=auth)


def glance_show(client: RawClient, image_id: str, *, auth: str = "aksk") -> dict:
    r = client.get(f"/v2/images/{image_id}", auth=auth)
    assert r.status_code == 200, describe(r)
    return r.json()


def image_sha256(client: RawClient, image_id: str) -> tuple[str, int]:
    """(SHA-256 hex, length) of an image's bytes, downloaded through Glance in pieces."""
    r = client.get(f"/v2/images/{image_id}/file", stream=True)
    assert r.status_code == 200, describe(r)
    h, n = hashlib.sha256(), 0
    for piece in r.iter_content(8 << 20):
        h.update(piece)
        n += len(piece)
    return h.hexdigest(), n


def make_active_image(client: RawClient, data: Optional[bytes] = None, *, auth: str = "aksk",
                      disk_format: str = "raw", container_format: str = "bare", **fields) -> dict:
    data = raw_bytes() if data is None else data
    img = glance_create(client, auth=auth, disk_format=disk_format, container_format=container_format, **fields)
    r = glance_upload(client, img["id"], data, auth=auth)
    assert r.status_code == 204, describe(r)
    shown = glance_show(client, img["id"], auth=auth)
    assert shown["status"] == "active", shown
    shown["_data"] = data
    return shown


def md5_hex(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def sha512_hex(b: bytes) -> str:
    return hashlib.sha512(b).hexdigest()


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------

def wait_job(client: ImsClient, job_id: str, timeout: float = 60.0, interval: float = 0.2):
    """Poll show_job until SUCCESS/FAIL; returns the last ShowJobResponse."""
    from huaweicloudsdkims.v2 import ShowJobRequest
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = client.show_job(ShowJobRequest(job_id=job_id))
        if last.status in ("SUCCESS", "FAIL"):
            return last
        assert last.status in ("INIT", "RUNNING"), f"unknown job status {last.status!r}"
        time.sleep(interval)
    raise AssertionError(f"job {job_id} not finished after {timeout}s: last={last}")


# --------------------------------------------------------------------------------------------
# Streaming bodies
# --------------------------------------------------------------------------------------------

class GeneratedBody:
    """A file-like request body of `total` bytes produced on the fly: zeros with a random
    64 KiB block every `random_every` bytes. Sets `reached` once `mark` bytes were read and
    can pause (`pause_at`) until `resume` is set. `requests` sends it with Content-Length."""

    def __init__(self, total: int, mark: int = 0, random_every: int = 32 << 20,
                 pause_at: Optional[int] = None):
        self.total = total
        self.mark = mark
        self.random_every = random_every
        self.pos = 0
        self.reached = threading.Event()
        self.resume = threading.Event()
        self.pause_at = pause_at
        self.stop = False
        self.md5 = hashlib.md5()
        self._zeros = bytes(1 << 20)

    def __len__(self):
        return self.total

    def read(self, n: int = -1) -> bytes:
        if self.stop or self.pos >= self.total:
            return b""
        if n is None or n < 0:
            n = 1 << 20
        n = min(n, 1 << 20, self.total - self.pos)
        if self.pause_at is not None and self.pos >= self.pause_at and not self.resume.is_set():
            self.reached.set()
            self.resume.wait(timeout=60)
        block_off = self.pos % self.random_every
        if block_off < 65536:
            n = min(n, 65536 - block_off)
            chunk = hashlib.sha512(self.pos.to_bytes(8, "big")).digest() * ((n + 63) // 64)
            chunk = chunk[:n]
        else:
            n = min(n, self.random_every - block_off)
            chunk = self._zeros[:n]
        self.pos += len(chunk)
        self.md5.update(chunk)
        if self.mark and self.pos >= self.mark:
            self.reached.set()
        return chunk
