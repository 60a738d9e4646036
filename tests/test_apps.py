"""Real applications behind Forward: redirects, prefixes, cookies, Max-Forwards, trailers."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httptools
import pytest
import urllib3
from flask import Flask, redirect, request, url_for
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response

from oxypy import Forward, Rewrite, Router
from oxypy.environ import SEND_TRAILERS

from _servers import RawUpstream, proxy_server, raw_request, start_pywsgi, url_of

HTTP = urllib3.PoolManager(retries=False, timeout=10)


def flask_app() -> Flask:
    app = Flask(__name__)

    def target() -> Any:
        return {
            "script_name": request.script_root,
            "prefix": request.headers.get("X-Forwarded-Prefix"),
        }

    for base in ("", "/app", "/base"):
        name = base.strip("/") + "target"
        app.add_url_rule(base + "/target", name, target)
        app.add_url_rule(
            base + "/go",
            base + "go",
            lambda name=name: redirect(url_for(name, _external=True)),
        )

    @app.route("/rel")
    def rel() -> Any:
        return redirect("/elsewhere")

    @app.route("/other")
    def other() -> Any:
        return redirect("http://other.example:8000/x?y=1")

    @app.route("/created")
    def created() -> Any:
        resp = Response("made", status=201)
        resp.headers["Content-Location"] = url_for("target", _external=True) + "?id=7#top"
        return resp

    @app.route("/cookies")
    def cookies() -> Any:
        resp = Response("ok")
        resp.headers.add("Set-Cookie", "a=1; Domain=upstream.internal; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "b=2; path=/two/x; domain=.Upstream.Internal")
        resp.headers.add("Set-Cookie", "c=3; Path=/other; Domain=keep.example")
        return resp

    return app


@pytest.fixture
def flask_upstream() -> Iterator[str]:
    server = start_pywsgi(flask_app())
    try:
        yield url_of(server)
    finally:
        server.stop(timeout=1)


@pytest.fixture
def serve(proxy: Any) -> Any:
    return proxy


def location(url: str, path: str, **kw: Any) -> str:
    resp = HTTP.request("GET", url + path, redirect=False, **kw)
    assert resp.status == 302, resp.data
    return str(resp.headers["Location"])


# -- Location ---------------------------------------------------------------------------


def test_flask_external_redirect_comes_back_rewritten(serve: Any, flask_upstream: str) -> None:
    url = serve(Forward(flask_upstream))
    assert location(url, "/go") == url + "/target"
    # The redirect works when followed: it lands on the proxy, not the upstream.
    resp = HTTP.request("GET", url + "/go", retries=urllib3.Retry(total=None, redirect=1))
    assert (resp.status, json.loads(resp.data)["prefix"]) == (200, None)


def test_location_rewrite_can_be_turned_off(serve: Any, flask_upstream: str) -> None:
    url = serve(Forward(flask_upstream, rewrite_location=False))
    assert location(url, "/go") == flask_upstream + "/target"


def test_router_mount_keeps_full_path_and_sends_no_prefix(serve: Any, flask_upstream: str) -> None:
    url = serve(Router([(None, "/app", Forward(flask_upstream))]))
    assert location(url, "/app/go") == url + "/app/target"
    doc = json.loads(HTTP.request("GET", url + "/app/target").data)
    assert doc == {"script_name": "", "prefix": None}


@pytest.mark.parametrize("mount", ["router-strip", "rewrite-strip"])
def test_stripped_prefix_is_sent_and_put_back(serve: Any, flask_upstream: str, mount: str) -> None:
    forward = Forward(flask_upstream)
    app: Any
    if mount == "router-strip":
        app = Router([(None, "/app", forward)], strip=True)
    else:
        app = Rewrite(forward, strip_prefix="/app")
    url = serve(app)
    assert location(url, "/app/go") == url + "/app/target"
    doc = json.loads(HTTP.request("GET", url + "/app/target").data)
    assert doc == {"script_name": "", "prefix": "/app"}


def test_flask_proxyfix_builds_the_client_url_itself(serve: Any) -> None:
    app = flask_app()
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_prefix=1)  # type: ignore[method-assign]
    server = start_pywsgi(app)
    try:
        url = serve(Router([(None, "/app", Forward(url_of(server)))], strip=True))
        # Flask already answers with the client's address; Forward leaves it alone.
        assert location(url, "/app/go") == url + "/app/target"
        doc = json.loads(HTTP.request("GET", url + "/app/target").data)
        assert doc == {"script_name": "/app", "prefix": "/app"}
    finally:
        server.stop(timeout=1)


def test_target_base_path_becomes_the_client_prefix(serve: Any, flask_upstream: str) -> None:
    url = serve(Forward(flask_upstream + "/base"))
    assert location(url, "/go") == url + "/target"


def test_relative_and_foreign_locations_are_untouched(serve: Any, flask_upstream: str) -> None:
    url = serve(Forward(flask_upstream), lint=False)  # lint refuses a relative Location
    assert location(url, "/rel") == "/elsewhere"
    assert location(url, "/other") == "http://other.example:8000/x?y=1"


def test_content_location_is_rewritten_with_query_and_fragment(
    serve: Any, flask_upstream: str
) -> None:
    url = serve(Forward(flask_upstream))
    resp = HTTP.request("GET", url + "/created")
    assert resp.status == 201
    assert resp.headers["Content-Location"] == url + "/target?id=7#top"


def test_trusted_front_proxy_address_and_prefix(serve: Any, flask_upstream: str) -> None:
    app = Router(
        [(None, "/app", Forward(flask_upstream, trusted_proxies=["127.0.0.1"]))], strip=True
    )
    url = serve(app)
    front = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "front.example",
        "X-Forwarded-Prefix": "/outer/",
    }
    assert location(url, "/app/go", headers=front) == "https://front.example/outer/app/target"
    doc = json.loads(HTTP.request("GET", url + "/app/target", headers=front).data)
    assert doc["prefix"] == "/outer/app"


def test_untrusted_forwarded_prefix_is_replaced_or_removed(serve: Any, flask_upstream: str) -> None:
    forged = {"X-Forwarded-Prefix": "/evil", "X-Forwarded-Host": "evil.example"}
    plain = serve(Forward(flask_upstream))
    doc = json.loads(HTTP.request("GET", plain + "/target", headers=forged).data)
    assert doc["prefix"] is None
    assert location(plain, "/go", headers=forged) == plain + "/target"
    stripped = serve(Router([(None, "/app", Forward(flask_upstream))], strip=True))
    doc = json.loads(HTTP.request("GET", stripped + "/app/target", headers=forged).data)
    assert doc["prefix"] == "/app"


def test_pass_host_header_location_gets_the_client_scheme(serve: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(
            "302 Found",
            [("Location", f"http://{environ['HTTP_HOST']}/next"), ("Content-Length", "0")],
        )
        return [b""]

    server = start_pywsgi(app)
    try:
        url = serve(Forward(url_of(server), pass_host_header=True, trusted_proxies=["127.0.0.1"]))
        host = url.split("//", 1)[1]
        loc = location(url, "/x", headers={"X-Forwarded-Proto": "https"})
        assert loc == f"https://{host}/next"
    finally:
        server.stop(timeout=1)


# -- Set-Cookie -------------------------------------------------------------------------


def cookies_of(resp: Any) -> list[str]:
    return list(resp.headers.getlist("Set-Cookie"))


def test_cookies_untouched_by_default(serve: Any, flask_upstream: str) -> None:
    url = serve(Forward(flask_upstream))
    assert cookies_of(HTTP.request("GET", url + "/cookies")) == [
        "a=1; Domain=upstream.internal; Path=/; HttpOnly",
        "b=2; path=/two/x; domain=.Upstream.Internal",
        "c=3; Path=/other; Domain=keep.example",
    ]


def test_cookie_domain_and_path_mappings(serve: Any, flask_upstream: str) -> None:
    forward = Forward(
        flask_upstream,
        cookie_domain={"upstream.internal": "example.com"},
        cookie_path={"/": "/app/", "/two/": "/"},
    )
    url = serve(forward)
    assert cookies_of(HTTP.request("GET", url + "/cookies")) == [
        "a=1; Domain=example.com; Path=/app/; HttpOnly",
        "b=2; path=/x; domain=example.com",
        "c=3; Path=/app/other; Domain=keep.example",
    ]


def test_cookie_callables_rewrite_or_remove(serve: Any, flask_upstream: str) -> None:
    forward = Forward(
        flask_upstream,
        cookie_domain=lambda d: None if d.lower().endswith("upstream.internal") else d,
        cookie_path=lambda p: p.upper(),
    )
    url = serve(forward)
    assert cookies_of(HTTP.request("GET", url + "/cookies")) == [
        "a=1; Path=/; HttpOnly",
        "b=2; path=/TWO/X",
        "c=3; Path=/OTHER; Domain=keep.example",
    ]


@pytest.mark.parametrize(
    "option", [{"cookie_domain": {"": "x"}}, {"cookie_path": {"/": "/a;b"}}, {"cookie_path": 3}]
)
def test_cookie_options_are_checked(option: dict[str, Any]) -> None:
    from oxypy.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="cookie_"):
        Forward("http://127.0.0.1:1", **option)


# -- Max-Forwards -----------------------------------------------------------------------


def test_max_forwards_zero_is_answered_by_the_proxy(serve: Any) -> None:
    up = RawUpstream(
        lambda sock, data: sock.sendall(b"HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n")
    )
    try:
        url = serve(Forward(up.url), lint=False)  # lint refuses PATH_INFO "*"
        out = raw_request(
            url, b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\nMax-Forwards: 0\r\n\r\n"
        )
        head = out.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert (
            b"\r\nAllow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE\r\n" in head + b"\r\n"
        )
        assert b"\r\nContent-Length: 0" in head
        out = raw_request(
            url,
            b"TRACE /a%20b?q=1 HTTP/1.1\r\nHost: example.test\r\nMax-Forwards: 0\r\n"
            b"X-Probe: yes\r\nCookie: s=secret\r\nAuthorization: Basic c2VjcmV0\r\n\r\n",
        )
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nContent-Type: message/http\r\n" in head
        assert body.startswith(b"TRACE /a%20b?q=1 HTTP/1.1\r\n")
        assert body.endswith(b"\r\n\r\n")
        fields = set(body.split(b"\r\n")[1:-2])
        assert {b"Host: example.test", b"Max-Forwards: 0", b"X-Probe: yes"} <= fields
        assert b"secret" not in body and b"c2VjcmV0" not in body
        assert up.connections == 0
    finally:
        up.stop()


@pytest.mark.parametrize("method", [b"OPTIONS", b"TRACE"])
def test_max_forwards_is_decremented(serve: Any, method: bytes) -> None:
    up = RawUpstream(lambda sock, data: sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"))
    try:
        url = serve(Forward(up.url))
        out = raw_request(url, method + b" /x HTTP/1.1\r\nHost: h\r\nMax-Forwards: 5\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 204 ")
        assert b"\r\nMax-Forwards: 4\r\n" in up.requests[0]
    finally:
        up.stop()


def test_max_forwards_on_other_methods_passes_unchanged(serve: Any) -> None:
    up = RawUpstream(lambda sock, data: sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"))
    try:
        url = serve(Forward(up.url))
        out = raw_request(url, b"GET /x HTTP/1.1\r\nHost: h\r\nMax-Forwards: 0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 204 ")
        assert b"\r\nMax-Forwards: 0\r\n" in up.requests[0]
    finally:
        up.stop()


@pytest.mark.parametrize("value", [b"abc", b"-1", b"+1", b"1, 2", b"", b"1.0"])
def test_invalid_max_forwards_is_400(serve: Any, value: bytes) -> None:
    up = RawUpstream(lambda sock, data: sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"))
    try:
        url = serve(Forward(up.url))
        out = raw_request(
            url, b"OPTIONS /x HTTP/1.1\r\nHost: h\r\nMax-Forwards: " + value + b"\r\n\r\n"
        )
        assert out.startswith(b"HTTP/1.1 400 ")
        assert out.endswith(b"invalid Max-Forwards\n")
        assert up.connections == 0
    finally:
        up.stop()


# -- bytes after a complete response ----------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, list[tuple[str, str]]]:
    """One response from a kept-alive raw connection: status, headers, body, trailers."""

    class Sink:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.trailers: list[tuple[str, str]] = []
            self.body = b""
            self.head_done = False
            self.done = False

        def on_header(self, name: bytes, value: bytes) -> None:
            pair = (name.decode("latin-1"), value.decode("latin-1"))
            if self.head_done:
                self.trailers.append(pair)
            else:
                self.headers[pair[0]] = pair[1]

        def on_headers_complete(self) -> None:
            self.head_done = True

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.done = True

    sink = Sink()
    parser = httptools.HttpResponseParser(sink)
    while not sink.done:
        data = sock.recv(65536)
        assert data, "connection closed mid-response"
        parser.feed_data(data)
    return parser.get_status_code(), sink.headers, sink.body, sink.trailers


EXTRA = {
    "junk": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA-BYTES",
    "second-response": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSMUGG"
    ),
    "after-chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nJUNKJUNK"
    ),
}


@pytest.mark.parametrize("answer", list(EXTRA), ids=list(EXTRA))
def test_bytes_after_a_complete_response_are_dropped(serve: Any, answer: str) -> None:
    def handler(sock: socket.socket, data: bytes) -> None:
        # Answer every request on this connection the same broken way.
        while True:
            sock.sendall(EXTRA[answer])
            more = sock.recv(65536)
            if not more:
                return

    up = RawUpstream(handler)
    try:
        url = serve(Forward(up.url))
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            for _ in range(2):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                status, headers, body, _ = read_response(sock)
                assert (status, body) == (200, b"hello")
                assert headers.get("Connection") != "close"
        assert up.connections == 2  # the dirty connection was never pooled
    finally:
        up.stop()


# -- trailers ---------------------------------------------------------------------------


def trailer_upstream() -> RawUpstream:
    def handler(sock: socket.socket, data: bytes) -> None:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n"
            b"0\r\nX-Checksum: abc123\r\nContent-Type: text/evil\r\nX_Under: 1\r\n"
            b"Grpc-Status: 0\r\n\r\n"
        )
        sock.recv(65536)

    return RawUpstream(handler)


def test_trailers_relayed_when_the_client_asks(serve: Any) -> None:
    up = trailer_upstream()
    try:
        url = serve(Forward(up.url))
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nConnection: TE\r\n\r\n")
            status, headers, body, trailers = read_response(sock)
            assert (status, body) == (200, b"hello world")
            assert headers["Transfer-Encoding"] == "chunked"
            assert trailers == [("X-Checksum", "abc123"), ("Grpc-Status", "0")]
            # The keep-alive connection carries the next request.
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            status, _, body, trailers = read_response(sock)
            assert (status, body, trailers) == (200, b"hello world", [])
        assert b"\r\nTE: trailers\r\n" in up.requests[0]
        assert b"\r\nTE:" not in up.requests[1]
    finally:
        up.stop()


def test_trailers_dropped_under_a_server_without_send_trailers() -> None:
    up = trailer_upstream()
    server = start_pywsgi(Forward(up.url))
    try:
        out = raw_request(url_of(server), b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ")
        assert out.endswith(b"hello world\r\n0\r\n\r\n")
    finally:
        server.stop(timeout=1)
        up.stop()


def test_server_writes_trailers_only_on_a_chunked_response() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        headers = [("Content-Length", "2")] if environ["PATH_INFO"] == "/fixed" else []
        start_response("200 OK", headers)
        yield b"ok"
        environ[SEND_TRAILERS]([("X-Done", "yes")])

    server = proxy_server(app, lint=False)
    try:
        out = raw_request(server.url, b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\n")
        assert out.endswith(b"\r\n\r\n2\r\nok\r\n0\r\nX-Done: yes\r\n\r\n")
        out = raw_request(server.url, b"GET /fixed HTTP/1.1\r\nHost: h\r\n\r\n")
        assert out.endswith(b"\r\nContent-Length: 2\r\n\r\nok") or out.endswith(b"\r\n\r\nok")
        assert b"X-Done" not in out
    finally:
        server.stop(timeout=1)


def test_server_refuses_an_invalid_trailer_field() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with pytest.raises(ValueError, match="invalid trailer field"):
            environ[SEND_TRAILERS]([("X-Bad", "a\r\nInjected: 1")])
        start_response("200 OK", [])
        return [b"ok"]

    server = proxy_server(app, lint=False)
    try:
        out = raw_request(server.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and b"Injected" not in out
    finally:
        server.stop(timeout=1)
