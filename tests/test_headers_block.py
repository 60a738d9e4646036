"""Headers: request fields reach a real upstream changed, response fields come back changed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import urllib3

from oxypy import ConfigurationError, Forward, Headers

from _servers import raw_request

HTTP = urllib3.PoolManager(retries=False, timeout=10)
BODY = b"upstream body\n" * 100


def headed_upstream(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(BODY))),
            ("Server", "upstream/1.0"),
            ("X-Powered-By", "php"),
            ("x-powered-by", "asp"),
            ("X-Frame-Options", "ALLOWALL"),
            ("Set-Cookie", "a=1"),
        ],
    )
    return [BODY]


def test_request_fields_set_replace_and_remove(proxy: Any, echo_upstream: str) -> None:
    app = Headers(
        Forward(echo_upstream),
        request={
            "X-Env": "prod",
            "X-Client": "set-by-proxy",
            "Cookie": None,
            "Authorization": None,
            "Content-Type": "application/x-test",
        },
    )
    url = proxy(app)
    resp = HTTP.request(
        "POST",
        url + "/p?q=1",
        body=b"payload",
        headers={
            "X-Client": "forged",
            "Cookie": "session=secret",
            "Authorization": "Basic eDp5",
            "Content-Type": "text/plain",
            "X-Other": "kept",
        },
    )
    assert resp.status == 200
    seen = json.loads(resp.data)
    assert seen["headers"]["x-env"] == "prod"
    assert seen["headers"]["x-client"] == "set-by-proxy"
    assert "cookie" not in seen["headers"]
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["content-type"] == "application/x-test"
    assert seen["headers"]["x-other"] == "kept"
    assert seen["body_sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert (seen["path"], seen["query"]) == ("/p", "q=1")


def test_response_fields_set_replace_and_remove(proxy: Any, pywsgi: Any) -> None:
    app = Headers(
        Forward(pywsgi(headed_upstream)),
        response={
            "Server": None,
            "X-Powered-By": None,
            "x-frame-options": "DENY",
            "Strict-Transport-Security": "max-age=63072000",
        },
    )
    url = proxy(app)
    raw = raw_request(url, b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    assert b"x-powered-by" not in names
    # the upstream's Server is gone; the proxy's own server may not add one either
    assert not any(line.lower() == b"server: upstream/1.0" for line in lines)
    assert names.count(b"x-frame-options") == 1
    assert b"x-frame-options: DENY" in lines
    assert b"strict-transport-security: max-age=63072000" in [x.lower() for x in lines]
    assert b"Set-Cookie: a=1" in lines
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(BODY).hexdigest()


def test_request_fields_added_keep_existing_values(proxy: Any, echo_upstream: str) -> None:
    app = Headers(
        Forward(echo_upstream),
        request={"X-Env": "prod"},
        add_request={"X-Tag": ["proxy-a", "proxy-b"], "Cookie": "edge=1", "X-New": "n"},
    )
    url = proxy(app)
    resp = HTTP.request(
        "GET", url + "/", headers={"X-Tag": "client", "Cookie": "session=s", "X-Env": "dev"}
    )
    assert resp.status == 200
    seen = json.loads(resp.data)["headers"]
    assert seen["x-tag"] == "client, proxy-a, proxy-b"
    assert seen["cookie"] == "session=s; edge=1"
    assert seen["x-new"] == "n"
    assert seen["x-env"] == "prod"
    bare = json.loads(HTTP.request("GET", url + "/").data)["headers"]
    assert (bare["x-tag"], bare["cookie"]) == ("proxy-a, proxy-b", "edge=1")


def test_response_fields_added_after_existing_ones(proxy: Any, pywsgi: Any) -> None:
    app = Headers(
        Forward(pywsgi(headed_upstream)),
        response={"Server": None, "X-Powered-By": None},
        add_response={"Set-Cookie": ["b=2", "c=3; Path=/"], "X-Frame-Options": "DENY"},
    )
    url = proxy(app)
    raw = raw_request(url, b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    cookies = [line for line in lines if line.lower().startswith(b"set-cookie:")]
    assert cookies == [b"Set-Cookie: a=1", b"Set-Cookie: b=2", b"Set-Cookie: c=3; Path=/"]
    frames = [line for line in lines if line.lower().startswith(b"x-frame-options:")]
    assert frames == [b"X-Frame-Options: ALLOWALL", b"X-Frame-Options: DENY"]
    assert not any(line.lower().startswith(b"x-powered-by") for line in lines)
    assert body == BODY


def test_skip_leaves_request_and_response_alone(proxy: Any, echo_upstream: str) -> None:
    app = Headers(
        Forward(echo_upstream),
        request={"X-Env": "prod"},
        response={"Content-Type": "text/x-changed"},
        skip=lambda environ: "HTTP_X_SKIP" in environ,
    )
    url = proxy(app)
    changed = HTTP.request("GET", url + "/")
    assert json.loads(changed.data)["headers"]["x-env"] == "prod"
    assert changed.headers["Content-Type"] == "text/x-changed"
    skipped = HTTP.request("GET", url + "/", headers={"X-Skip": "1"})
    assert "x-env" not in json.loads(skipped.data)["headers"]
    assert skipped.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"request": {"Content-Length": "5"}}, "request: 'Content-Length'", id="cl"),
        pytest.param(
            {"response": {"Transfer-Encoding": None}}, "response: 'Transfer-Encoding'", id="te"
        ),
        pytest.param({"request": {"connection": "close"}}, "request: 'connection'", id="conn"),
        pytest.param({"response": {"Upgrade": "x"}}, "response: 'Upgrade'", id="upgrade"),
        pytest.param({"request": {"Keep-Alive": "5"}}, "request: 'Keep-Alive'", id="keepalive"),
        pytest.param({"request": {"Host": None}}, "'Host' cannot be removed", id="host-remove"),
        pytest.param({"request": {"X_Bad": "1"}}, "invalid header name 'X_Bad'", id="underscore"),
        pytest.param({"request": {"X Bad": "1"}}, "invalid header name", id="space"),
        pytest.param({"response": {"X-A": "a\r\nX-B: b"}}, "CR, LF or NUL", id="injection"),
        pytest.param({"response": {"X-A": 5}}, "value of 'X-A'", id="not-str"),
        pytest.param({"request": {"X-A": "1", "x-a": "2"}}, "given twice", id="dup"),
        pytest.param({"request": [("X-A", "1")]}, "request must be a mapping", id="not-mapping"),
        pytest.param({"add_request": {"Host": "h"}}, "'Host' holds one value", id="add-host"),
        pytest.param({"add_response": {"Content-Length": "1"}}, "'Content-Length'", id="add-cl"),
        pytest.param({"add_response": {"X-A": []}}, "non-empty list of strings", id="add-empty"),
        pytest.param({"add_response": {"X-A": None}}, "value of 'X-A'", id="add-none"),
        pytest.param({"add_response": {"X-A": ["ok", "a\nb"]}}, "CR, LF or NUL", id="add-lf"),
        pytest.param(
            {"response": {"X-A": None}, "add_response": {"x-a": "1"}}, "one rule", id="add-overlap"
        ),
        pytest.param({"add_request": {"X-A": "1", "x-a": "2"}}, "one rule", id="add-dup"),
        pytest.param({"add_request": "X-A"}, "add_request must be a mapping", id="add-not-map"),
    ],
)
def test_bad_rules_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Headers(Forward("http://127.0.0.1:1"), **kwargs)
    assert message in str(info.value)


def test_host_can_be_set_for_pass_host_header(proxy: Any, echo_upstream: str) -> None:
    app = Headers(Forward(echo_upstream, pass_host_header=True), request={"Host": "internal.test"})
    url = proxy(app)
    seen = json.loads(HTTP.request("GET", url + "/").data)
    assert seen["headers"]["host"] == "internal.test"


def test_add_rules_from_a_config_file(proxy: Any, echo_upstream: str) -> None:
    from oxypy import load_config

    gateway = load_config(
        f"""
[services.echo]
servers = ["{echo_upstream}"]
[[routes]]
prefix = "/"
service = "echo"
chain = [
  {{ block = "Headers", add_request = {{ X-Tag = ["p1", "p2"] }}, add_response = {{ X-S = "y" }} }},
]
"""
    )
    try:
        resp = HTTP.request("GET", proxy(gateway) + "/", headers={"X-Tag": "c"})
        assert json.loads(resp.data)["headers"]["x-tag"] == "c, p1, p2"
        assert resp.headers.getlist("X-S") == ["y"]
    finally:
        gateway.close()
