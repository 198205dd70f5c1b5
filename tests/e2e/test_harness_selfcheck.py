"""Self-check of the suite's raw signer against the spec §D.4 test vectors (no server needed):
if these fail, the harness (not the server) is wrong."""

from datetime import datetime

import pytest

from helpers import RawClient

AK, SK = "AKEXAMPLE000000000001", "SKEXAMPLEsecret0000000000000000000000001"
PID = "0123456789abcdef0123456789abcdef"


class _Captured(Exception):
    pass


def signed(method, path, **kw):
    box = {}

    def capture(m, url, headers, body):
        box.update(method=m, url=url, headers=headers, body=body)
        raise _Captured()

    c = RawClient("http://127.0.0.1:8080", AK, SK, PID)
    with pytest.raises(_Captured):
        c.request(method, path, sdk_date=datetime(2025, 1, 1), mutate_after_sign=capture, **kw)
    return box


def test_vector_a_post_json():
    b = signed("POST", "/v1/cloudimages/465076de-dc36-4aec-80f5-ef9d8009428f/copy", json_body={"name": "copy1"})
    assert b["body"] == b'{"name": "copy1"}'
    assert b["headers"]["Authorization"] == (
        f"SDK-HMAC-SHA256 Access={AK}, SignedHeaders=content-type;host;user-agent;x-project-id;x-sdk-date, "
        "Signature=4c223084c4c110c3c4e3904457468fb34db6d21e7de89724ed4acce2728f030f")


def test_vector_b_get_query():
    b = signed("GET", "/v2/cloudimages",
               query=[("name", "my img"), ("__imagetype", "private"), ("limit", 10), ("protected", True)])
    assert b["url"] == "http://127.0.0.1:8080/v2/cloudimages?__imagetype=private&limit=10&name=my%20img&protected=true"
    assert b["headers"]["Authorization"].endswith(
        "Signature=9662c1fbefba132648be33d1678c7af1dbc1b3c602526672524e480b884c51cb")
