"""ForwardAuth against a real auth server (URL) and an in-process WSGI auth app."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3

from oxypy import ConfigurationError, Forward, ForwardAuth

from _servers import RawUpstream

HTTP = urllib3.PoolManager(retries=False, timeout=10)
DENIED_BODY = b"<h1>login required</h1>\n" * 20


class AuthService:
    """The auth decision: Bearer good -> 200 + X-User; Bearer anon -> 200 without
    X-User; a cookie -> 302 to a login page; anything else -> 401 with a body."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterator[bytes]:
        body = environ["wsgi.input"].read()
        self.seen.append(
            {
                "method": environ["REQUEST_METHOD"],
                "path": environ.get("PATH_INFO"),
                "query": environ.get("QUERY_STRING"),
                "body": body,
                "peer_port": environ.get("REMOTE_PORT"),
                "headers": {
                    k[5:].replace("_", "-").lower(): v
                    for k, v in environ.items()
                    if k.startswith("HTTP_")
                },
            }
        )
        auth = environ.get("HTTP_AUTHORIZATION")
        if auth == "Bearer good":
            start_response(
                "200 OK",
                [
                    ("X-User", "alice"),
                    ("X-Groups", "admin"),
                    ("X-Groups", "dev"),
                    ("Content-Length", "2"),
                ],
            )
            yield b"ok"
        elif auth == "Bearer anon":
            start_response("204 No Content", [])
        elif "HTTP_COOKIE" in environ:
            start_response(
                "302 Found",
                [("Location", "https://login.example/?next=/x"), ("Content-Length", "0")],
            )
        else:
            start_response(
                "401 Unauthorized",
                [
                    ("WWW-Authenticate", 'Bearer realm="api"'),
                    ("Content-Type", "text/html"),
                    ("X-Auth-Reason", "no token"),
                    ("Content-Length", str(len(DENIED_BODY))),
                ],
            )
            # in two pieces: streamed back to the client as sent
            yield DENIED_BODY[:100]
            yield DENIED_BODY[100:]


class Upstream:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["wsgi.input"].read()
        doc = {
            "method": environ["REQUEST_METHOD"],
            "headers": {
                k[5:].replace("_", "-").lower(): v
                for k, v in environ.items()
                if k.startswith("HTTP_")
            },
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        self.seen.append(doc)
        out = json.dumps(doc).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))]
        )
        return [out]


@pytest.fixture(params=["url", "wsgi"])
def setup(
    request: Any, pywsgi: Any, proxy: Any
) -> Callable[..., tuple[str, AuthService, Upstream]]:
    """``make(**kwargs) -> (proxy_url, auth_service, upstream)`` for each kind of auth."""

    def make(**kwargs: Any) -> tuple[str, AuthService, Upstream]:
        service, upstream = AuthService(), Upstream()
        auth: Any = pywsgi(service) + "/verify?realm=api" if request.param == "url" else service
        block = ForwardAuth(Forward(pywsgi(upstream)), auth, **kwargs)
        return proxy(block), service, upstream

    make.kind = request.param  # type: ignore[attr-defined]
    return make


def test_granted_request_carries_the_auth_headers(setup: Any) -> None:
    url, service, upstream = setup(
        request_headers=["Authorization"], response_headers=["X-User", "X-Groups"]
    )
    body = b"payload" * 1000
    resp = HTTP.request(
        "POST",
        url + "/api/items?id=7",
        body=body,
        headers={
            "Authorization": "Bearer good",
            "Cookie": "s=1",
            "X-User": "mallory",
            "Host": "shop.example",
            "X-Forwarded-Method": "FORGED",
        },
    )
    assert resp.status == 200
    seen = json.loads(resp.data)
    assert seen["headers"]["x-user"] == "alice"
    assert seen["headers"]["x-groups"] == "admin, dev"
    assert seen["headers"]["cookie"] == "s=1"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    [asked] = service.seen
    assert asked["method"] == "GET"
    assert asked["body"] == b""
    h = asked["headers"]
    assert h["authorization"] == "Bearer good"
    assert "cookie" not in h  # not listed in request_headers
    assert "x-user" not in h
    assert h["x-forwarded-method"] == "POST"
    assert h["x-forwarded-uri"] == "/api/items?id=7"
    assert h["x-forwarded-host"] == "shop.example"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-for"] == "127.0.0.1"
    if setup.kind == "url":
        assert (asked["path"], asked["query"]) == ("/verify", "realm=api")
    else:
        assert (asked["path"], asked["query"]) == ("/api/items", "id=7")


def test_all_request_headers_when_none_listed(setup: Any) -> None:
    url, service, _ = setup()
    HTTP.request(
        "PUT",
        url + "/x",
        body=b"abc",
        headers={
            "Authorization": "Bearer good",
            "Cookie": "s=1",
            "X-Trace": "t1",
            "Expect": "100-continue",
        },
    )
    h = service.seen[0]["headers"]
    assert (h["authorization"], h["cookie"], h["x-trace"]) == ("Bearer good", "s=1", "t1")
    assert "content-length" not in h and "expect" not in h and "transfer-encoding" not in h


def test_denial_is_relayed_exactly_and_upstream_never_sees_it(setup: Any) -> None:
    url, _, upstream = setup(response_headers=["X-User"])
    resp = HTTP.request("GET", url + "/secret", headers={"X-User": "mallory"})
    assert resp.status == 401
    assert resp.data == DENIED_BODY
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert resp.headers["Content-Type"] == "text/html"
    assert resp.headers["X-Auth-Reason"] == "no token"
    assert resp.headers["Content-Length"] == str(len(DENIED_BODY))
    redirect = HTTP.request("GET", url + "/secret", headers={"Cookie": "s=expired"}, redirect=False)
    assert redirect.status == 302
    assert redirect.headers["Location"] == "https://login.example/?next=/x"
    assert redirect.data == b""
    assert upstream.seen == []


def test_forged_header_is_removed_when_auth_does_not_send_it(setup: Any) -> None:
    url, _, upstream = setup(response_headers=["X-User"])
    resp = HTTP.request(
        "GET", url + "/", headers={"Authorization": "Bearer anon", "X-User": "admin"}
    )
    assert resp.status == 200
    assert "x-user" not in json.loads(resp.data)["headers"]
    assert len(upstream.seen) == 1


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/verify"


def test_auth_unreachable_is_502(proxy: Any, pywsgi: Any) -> None:
    upstream = Upstream()
    url = proxy(ForwardAuth(Forward(pywsgi(upstream)), closed_port_url()))
    resp = HTTP.request("GET", url + "/", headers={"Authorization": "Bearer good"})
    assert resp.status == 502
    assert resp.data == b"authentication service unavailable\n"
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert upstream.seen == []


def test_auth_silent_times_out_to_502(proxy: Any, pywsgi: Any) -> None:
    def hang(sock: socket.socket, data: bytes) -> None:
        sock.recv(1)  # never answers; returns when the proxy gives up

    silent = RawUpstream(hang)
    try:
        upstream = Upstream()
        app = ForwardAuth(Forward(pywsgi(upstream)), silent.url + "/verify", timeout=0.3)
        url = proxy(app)
        resp = HTTP.request("GET", url + "/")
        assert resp.status == 502
        assert resp.data == b"authentication service unavailable\n"
        assert upstream.seen == []
        assert silent.requests[0].startswith(b"GET /verify HTTP/1.1\r\n")
    finally:
        silent.stop()


@pytest.mark.parametrize("status", [b"200 OK", b"401 Unauthorized"], ids=["grant", "deny"])
def test_auth_dying_before_its_body_is_502(proxy: Any, pywsgi: Any, status: bytes) -> None:
    def cut(sock: socket.socket, data: bytes) -> None:
        # A head promising 10 bytes, then the connection closes: no body byte.
        sock.sendall(b"HTTP/1.1 " + status + b"\r\nX-User: alice\r\nContent-Length: 10\r\n\r\n")

    broken = RawUpstream(cut)
    try:
        upstream = Upstream()
        url = proxy(
            ForwardAuth(
                Forward(pywsgi(upstream)), broken.url + "/verify", response_headers=["X-User"]
            )
        )
        resp = HTTP.request("GET", url + "/")
        assert resp.status == 502
        assert resp.data == b"authentication service unavailable\n"
        assert upstream.seen == []
    finally:
        broken.stop()


def test_auth_connections_are_reused(proxy: Any, pywsgi: Any) -> None:
    service = AuthService()
    url = proxy(ForwardAuth(Forward(pywsgi(Upstream())), pywsgi(service) + "/verify"))
    for _ in range(5):
        assert (
            HTTP.request("GET", url + "/", headers={"Authorization": "Bearer good"}).status == 200
        )
    # one pooled keep-alive connection carried all five auth requests
    assert len({asked["peer_port"] for asked in service.seen}) == 1
    assert len(service.seen) == 5


def test_skip_passes_without_asking(setup: Any) -> None:
    url, service, upstream = setup(skip=lambda e: e["PATH_INFO"] == "/public")
    assert HTTP.request("GET", url + "/public").status == 200
    assert service.seen == [] and len(upstream.seen) == 1


@pytest.mark.parametrize(
    ("auth", "kwargs", "message"),
    [
        pytest.param("ftp://h/x", {}, "auth must be an http:// or https:// URL", id="scheme"),
        pytest.param("http://h/x#frag", {}, "fragment", id="fragment"),
        pytest.param(42, {}, "auth must be", id="type"),
        pytest.param("http://h/", {"request_headers": "Cookie"}, "request_headers", id="str"),
        pytest.param("http://h/", {"response_headers": ["X User"]}, "response_headers", id="name"),
        pytest.param(
            "http://h/", {"response_headers": ["Connection"]}, "cannot be copied", id="hop"
        ),
        pytest.param("http://h/", {"timeout": 0}, "timeout", id="timeout"),
        pytest.param("http://h/", {"trusted_proxies": ["x"]}, "trusted_proxies", id="trusted"),
    ],
)
def test_bad_configuration_is_named(auth: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ForwardAuth(Forward("http://127.0.0.1:1"), auth, **kwargs)
    assert message in str(info.value)
