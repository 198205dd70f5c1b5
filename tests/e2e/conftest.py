"""Fixtures for the OpenIMS end-to-end suite.

* `server`: one `openims serve` per pytest session (per xdist worker: each worker has its own
  temporary data dir and ports, so `-n N` is safe), stopped with SIGTERM at the end; the
  teardown asserts a clean exit within 10 s. `server.s3_endpoint` is its embedded S3 endpoint
  (`--s3-listen` on a free port).
* `fresh_server`: a dedicated server for one test (crash / signal tests).
* `tenant` / `tenant_b`: a fresh domain + project + user (with password) + AK/SK key, made with
  the admin CLI; `.ims` is a huaweicloudsdkims client, `.raw` a raw signed-request helper.
* `default_tenant`: the `admin` user of project `default` from `<data-dir>/credentials`.
* `os_conn`: an openstacksdk Connection (password auth against `/v3`, admin/default).
* `openstack_cli`: runs the venv's `openstack` CLI against the server, returns parsed JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import helpers
from helpers import Server, VENV


def pytest_configure(config):
    config.addinivalue_line("markers", "crash: kills the server with SIGKILL (dedicated server)")


def pytest_sessionfinish(session, exitstatus):
    # PostgreSQL databases made for servers (OPENIMS_TEST_DB=postgres): dropped here, since
    # xdist workers may exit without running atexit handlers.
    helpers.drop_pg_databases()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for srv in list(helpers.RUNNING_SERVERS):
            tail = re.sub(r"\x1b\[[0-9;]*m", "", srv.log_tail(40))
            rep.sections.append((f"openims log {srv.log_path}", tail))


def _start(tmp: Path, name: str, extra=()) -> Server:
    data = tmp / f"{name}-data"
    srv = Server(data, tmp / f"{name}.log", extra_args=extra)
    srv.start()
    return srv


def _stop_checked(srv: Server) -> None:
    try:
        if srv.alive():
            rc = srv.terminate(timeout=10)
            assert rc == 0, f"openims exited with {rc} after SIGTERM:\n{srv.log_tail()}"
    finally:
        if srv in helpers.RUNNING_SERVERS:
            helpers.RUNNING_SERVERS.remove(srv)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    if not helpers.OPENIMS_BIN.exists():
        pytest.fail(f"openims binary not found at {helpers.OPENIMS_BIN}; build it or set OPENIMS_BIN")
    tmp = tmp_path_factory.mktemp("openims")
    srv = _start(tmp, "session")
    yield srv
    _stop_checked(srv)


@pytest.fixture
def fresh_server(tmp_path):
    if not helpers.OPENIMS_BIN.exists():
        pytest.fail(f"openims binary not found at {helpers.OPENIMS_BIN}; build it or set OPENIMS_BIN")
    srv = _start(tmp_path, "fresh")
    yield srv
    _stop_checked(srv)


@pytest.fixture(scope="session")
def creds(server):
    return server.credentials()


@pytest.fixture(scope="session")
def default_tenant(server):
    return helpers.default_tenant(server)


@pytest.fixture
def tenant(server):
    return helpers.make_tenant(server, "a")


@pytest.fixture
def tenant_b(server):
    return helpers.make_tenant(server, "b")


@pytest.fixture(scope="module")
def module_tenant(server):
    return helpers.make_tenant(server, "m")


@pytest.fixture(scope="session")
def os_conn(server, creds):
    import openstack
    conn = openstack.connection.Connection(
        auth_url=server.endpoint + "/v3",
        username=creds["OPENIMS_USER"],
        password=creds["OPENIMS_PASSWORD"],
        project_name=creds["OPENIMS_PROJECT"],
        user_domain_name=creds["OPENIMS_DOMAIN"],
        project_domain_name=creds["OPENIMS_DOMAIN"],
        identity_api_version="3",
        image_api_version="2",
        api_timeout=60,
    )
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def openstack_cli(server, creds, tmp_path_factory):
    home = tmp_path_factory.mktemp("oscli-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env.update({
        "HOME": str(home),
        "OS_AUTH_URL": server.endpoint + "/v3",
        "OS_AUTH_TYPE": "password",
        "OS_USERNAME": creds["OPENIMS_USER"],
        "OS_PASSWORD": creds["OPENIMS_PASSWORD"],
        "OS_PROJECT_NAME": creds["OPENIMS_PROJECT"],
        "OS_USER_DOMAIN_NAME": creds["OPENIMS_DOMAIN"],
        "OS_PROJECT_DOMAIN_NAME": creds["OPENIMS_DOMAIN"],
        "OS_IDENTITY_API_VERSION": "3",
        "OS_IMAGE_API_VERSION": "2",
    })

    def run(*args: str, json_out: bool = True, check: bool = True, timeout: float = 90):
        cmd = [str(VENV / "bin" / "openstack"), *args]
        if json_out:
            cmd += ["-f", "json"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        if not check:
            return p
        return json.loads(p.stdout) if json_out and p.stdout.strip() else p

    return run
