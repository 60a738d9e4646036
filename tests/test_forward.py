"""Forward: paths, headers and bodies, observed at real upstreams on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import urllib3

from oxypy import Forward, OutgoingRequest, ResponseHead
from oxypy.environ import EXCHANGES

from _servers import RawUpstream, raw_request, read_exact_body

HTTP = urllib3.PoolManager(retries=False, timeout=10)


def get_json(url: str, **kw: Any) -> tuple[urllib3.BaseHTTPResponse, dict[str, Any]]:
    resp = HTTP.request(kw.pop("method", "GET"), url, **kw)
    return resp, json.loads(resp.data)


def recording_upstream(response: bytes = b"") -> RawUpstream:
    """A raw upstream that records the request and answers ``response`` (default 200 ok)."""
    answer = response or b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    def handler(sock: socket.socket, data: bytes) -> None:
        sock.sendall(answer)

    return RawUpstream(handler)


def request_line(raw: bytes) -> bytes:
    return raw.split(b"\r\n", 1)[0]


def header_lines(raw: bytes) -> list[tuple[str, str]]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    out = []
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        out.append((name, value.strip()))
    return out


# -- paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(b"/hello", id="plain"),
        pytest.param(b"//hello", id="double-slash"),
        pytest.param(b"///hello", id="triple-slash"),
        pytest.param(b"/hello?abc=def&def=123", id="query"),
        pytest.param(b"/log/http%3A%2F%2Fwww.site.com%2Fsomething?a=b", id="encoded-url"),
        pytest.param(b"/a%2Fb/c", id="encoded-slash"),
        pytest.param(b"/x;param=1/y", id="semicolon"),
        pytest.param(b"/%E2%82%AC/caf%C3%A9", id="encoded-unicode"),
        pytest.param(b"/q?x=%20%2B+&y", id="query-encodings"),
        pytest.param(b"/empty-query?", id="empty-query"),
    ],
)
def test_path_and_query_forwarded_byte_exact(proxy: Any, path: bytes) -> None:
    up = recording_upstream()
    try:
        url = proxy(Forward(up.url))
        out = raw_request(url, b"GET " + path + b" HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ")
        assert request_line(up.requests[0]) == b"GET " + path + b" HTTP/1.1"
    finally:
        up.stop()


@pytest.mark.parametrize(
    ("base", "path", "expected"),
    [
        pytest.param("/api", b"/x?y=1", b"/api/x?y=1", id="prefix"),
        pytest.param("/api/", b"/x", b"/api/x", id="prefix-trailing-slash"),
        pytest.param("", b"/x", b"/x", id="no-prefix"),
        pytest.param("/api", b"/", b"/api/", id="root"),
        pytest.param("/v1/svc", b"/a%2Fb", b"/v1/svc/a%2Fb", id="encoded-kept"),
    ],
)
def test_target_base_path_is_prefixed(proxy: Any, base: str, path: bytes, expected: bytes) -> None:
    up = recording_upstream()
    try:
        url = proxy(Forward(up.url + base))
        raw_request(url, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        assert request_line(up.requests[0]) == b"GET " + expected + b" HTTP/1.1"
    finally:
        up.stop()


def test_rewritten_path_info_is_requoted(proxy: Any) -> None:
    up = recording_upstream()

    def rewrite(environ: dict[str, Any], start_response: Any) -> Any:
        environ["PATH_INFO"] = "/new path/ü".encode().decode("latin-1")
        return fwd(environ, start_response)

    fwd = Forward(up.url)
    try:
        raw_request(proxy(rewrite), b"GET /old?k=v HTTP/1.1\r\nHost: a\r\n\r\n")
        assert request_line(up.requests[0]) == b"GET /new%20path/%C3%BC?k=v HTTP/1.1"
    finally:
        up.stop()


def test_target_from_environ_and_missing_target(proxy: Any, echo_upstream: str) -> None:
    fwd = Forward()

    def choose(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] != "/none":
            environ["oxypy.target"] = echo_upstream
        return fwd(environ, start_response)

    url = proxy(choose)
    resp, doc = get_json(url + "/x")
    assert resp.status == 200 and doc["path"] == "/x"
    resp = HTTP.request("GET", url + "/none")
    assert resp.status == 500
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert resp.data == b"no upstream target set for this request\n"


# -- request headers ------------------------------------------------------------------


def test_hop_by_hop_request_headers_removed_and_forwarding_headers_added(proxy: Any) -> None:
    up = recording_upstream()
    try:
        url = proxy(Forward(up.url))
        raw_request(
            url,
            b"GET /h HTTP/1.1\r\nHost: front.example:8080\r\n"
            b"Connection: keep-alive, X-Client-Hop, X-Forwarded-For, X-Real-Ip\r\n"
            b"X-Client-Hop: secret\r\nKeep-Alive: timeout=600\r\nTE: gzip, trailers\r\n"
            b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n"
            b"Trailer: X-T\r\nUpgrade: h2c\r\nX-Forwarded-For: 1.2.3.4\r\n"
            b"X-Keep: yes\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
        )
        headers = header_lines(up.requests[0])
        names = [n.lower() for n, _ in headers]
        for hop in (
            "connection",
            "x-client-hop",
            "keep-alive",
            "proxy-authorization",
            "proxy-connection",
            "trailer",
            "upgrade",
        ):
            assert hop not in names, hop
        values = dict((n.lower(), v) for n, v in headers)
        assert values["te"] == "trailers"
        assert values["x-keep"] == "yes"
        assert values["cookie"] == "a=1; b=2"
        # The client named them in Connection: its own values are hop-by-hop and
        # dropped, but the proxy's are added after stripping, so they survive.
        assert values["x-forwarded-for"] == "127.0.0.1"
        assert values["x-real-ip"] == "127.0.0.1"
        assert values["x-forwarded-host"] == "front.example:8080"
        assert values["x-forwarded-port"] == "8080"
        assert values["x-forwarded-proto"] == "http"
        assert values["host"] == up.url.split("//")[1]
        assert "user-agent" not in names and "accept-encoding" not in names
    finally:
        up.stop()


def forwarding(raw: bytes) -> dict[str, str]:
    return {
        n.lower(): v for n, v in header_lines(raw) if n.lower().startswith(("x-", "forw", "via"))
    }


SPOOFED = (
    b"GET / HTTP/1.1\r\nHost: h.example\r\nX-Forwarded-For: 9.9.9.9, 10.0.0.7\r\n"
    b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
    b"X-Forwarded-Port: 443\r\nX-Real-Ip: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
    b"Via: 1.1 edge\r\n\r\n"
)


def test_untrusted_peer_cannot_spoof_forwarding_headers(proxy: Any) -> None:
    up = recording_upstream()
    try:
        raw_request(proxy(Forward(up.url)), SPOOFED)
        got = forwarding(up.requests[0])
        assert got == {
            "x-forwarded-for": "9.9.9.9, 10.0.0.7, 127.0.0.1",
            "x-forwarded-proto": "http",
            "x-forwarded-host": "h.example",
            "x-forwarded-port": "80",
            "x-real-ip": "127.0.0.1",
            "via": "1.1 edge",
        }
    finally:
        up.stop()


def test_trusted_peer_forwarding_headers_believed(proxy: Any) -> None:
    up = recording_upstream()
    try:
        fwd = Forward(
            up.url, trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"], forwarded=True, via="oxypy"
        )
        raw_request(proxy(fwd), SPOOFED)
        got = forwarding(up.requests[0])
        assert got == {
            "x-forwarded-for": "9.9.9.9, 10.0.0.7, 127.0.0.1",
            "x-forwarded-proto": "https",
            "x-forwarded-host": "evil.example",
            "x-forwarded-port": "443",
            "x-real-ip": "6.6.6.6",
            "forwarded": 'for=6.6.6.6, for=127.0.0.1;host="h.example";proto=http',
            "via": "1.1 edge, 1.1 oxypy",
        }
    finally:
        up.stop()


def test_untrusted_forwarded_header_replaced(proxy: Any) -> None:
    up = recording_upstream()
    try:
        raw_request(proxy(Forward(up.url, forwarded=True)), SPOOFED)
        assert forwarding(up.requests[0])["forwarded"] == (
            'for=127.0.0.1;host="h.example";proto=http'
        )
    finally:
        up.stop()


@pytest.mark.parametrize("pass_host", [False, True])
def test_host_header(proxy: Any, echo_upstream: str, pass_host: bool) -> None:
    url = proxy(Forward(echo_upstream, pass_host_header=pass_host))
    _, doc = get_json(url + "/", headers={"Host": "client.example"})
    expected = "client.example" if pass_host else echo_upstream.split("//")[1]
    assert doc["headers"]["host"] == expected
    assert doc["headers"]["x-forwarded-host"] == "client.example"


def test_modify_request_and_response_hooks(proxy: Any, echo_upstream: str) -> None:
    def director(environ: dict[str, Any], req: OutgoingRequest) -> None:
        req.headers.append(("X-Director", req.method))
        req.path = "/rewritten"

    def modify(environ: dict[str, Any], head: ResponseHead) -> None:
        head.headers.append(("X-Test", "CUSTOM"))
        head.status = 203
        head.reason = ""

    url = proxy(Forward(echo_upstream, modify_request=director, modify_response=modify))
    resp, doc = get_json(url + "/orig")
    assert resp.status == 203 and resp.headers["X-Test"] == "CUSTOM"
    assert doc["path"] == "/rewritten" and doc["headers"]["x-director"] == "GET"


# -- response headers -----------------------------------------------------------------


def test_response_hop_by_hop_removed_duplicates_kept_in_order(proxy: Any) -> None:
    up = recording_upstream(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Up-Hop\r\nX-Up-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nSet-Cookie: a=1; Path=/\r\n"
        b"X-Dup: one\r\nSet-Cookie: b=2; Path=/\r\nX-Dup: two\r\nX-CamelCase-Header: v\r\n"
        b"Server: upstream/1\r\nTrailer: X-T\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\nhello"
    )
    try:
        out = raw_request(proxy(Forward(up.url)), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")[1:]
        names = [line.split(b":")[0].lower() for line in lines]
        for hop in (b"x-up-hop", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
            assert hop not in names
        assert [ln for ln in lines if ln.lower().startswith((b"set-cookie", b"x-dup"))] == [
            b"Set-Cookie: a=1; Path=/",
            b"X-Dup: one",
            b"Set-Cookie: b=2; Path=/",
            b"X-Dup: two",
        ]
        assert b"X-CamelCase-Header: v" in lines and b"Server: upstream/1" in lines
        assert body == b"hello"
    finally:
        up.stop()


def test_many_and_large_response_headers_are_relayed(proxy: Any) -> None:
    many = b"".join(b"X-H-%d: %d\r\n" % (i, i) for i in range(150))
    big = b"X-Big: " + b"v" * 8192 + b"\r\n"
    up = recording_upstream(b"HTTP/1.1 200 OK\r\n" + many + big + b"Content-Length: 2\r\n\r\nok")
    try:
        # http.client (urllib3) refuses > 100 headers itself: read raw bytes.
        out = raw_request(proxy(Forward(up.url)), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"ok"
        assert many in head + b"\r\n" and big in head + b"\r\n"
    finally:
        up.stop()


@pytest.mark.parametrize("interim", [b"100 Continue", b"103 Early Hints\r\nLink: </a.css>"])
def test_interim_responses_are_not_the_final_response(proxy: Any, interim: bytes) -> None:
    up = recording_upstream(
        b"HTTP/1.1 " + interim + b"\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
    )
    try:
        resp = HTTP.request("GET", proxy(Forward(up.url)) + "/")
        assert resp.status == 201 and resp.data == b"done"
        assert "Link" not in resp.headers
    finally:
        up.stop()


# -- bodies -------------------------------------------------------------------------------


def test_content_length_upload_streams_byte_exact(proxy: Any, echo_upstream: str) -> None:
    body = os.urandom(5 * 1024 * 1024 + 17)
    url = proxy(Forward(echo_upstream))
    resp, doc = get_json(url + "/up", method="POST", body=body)
    assert doc["body_len"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["headers"]["content-length"] == str(len(body))


def test_chunked_upload_is_forwarded_chunked(proxy: Any, echo_upstream: str) -> None:
    parts = [os.urandom(n) for n in (1, 70000, 3, 200000)]

    def gen() -> Iterator[bytes]:
        yield from parts

    url = proxy(Forward(echo_upstream))
    resp, doc = get_json(url + "/up", method="POST", body=gen(), chunked=True)
    whole = b"".join(parts)
    assert doc["body_sha256"] == hashlib.sha256(whole).hexdigest()
    assert doc["headers"]["transfer-encoding"] == "chunked"
    assert "content-length" not in doc["headers"]


def test_upload_reaches_upstream_before_client_finishes(proxy: Any) -> None:
    arrivals: list[tuple[float, int]] = []

    def handler(sock: socket.socket, data: bytes) -> None:
        got = len(data.partition(b"\r\n\r\n")[2])
        arrivals.append((time.monotonic(), got))
        while got < 20:
            piece = sock.recv(65536)
            if not piece:
                break
            got += len(piece)
            arrivals.append((time.monotonic(), got))
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    up = RawUpstream(handler)
    try:
        # No LintMiddleware here: its input wrapper hides oxypy.serve's read1(),
        # which is what lets a partial upload go on at once (other servers only
        # offer read(n), which waits for n bytes or the end of the body).
        url = proxy(Forward(up.url), lint=False)
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n0123456789")
            sent_first = time.monotonic()
            gevent.sleep(0.5)
            sock.sendall(b"abcdefghij")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        first_arrival = next(t for t, n in arrivals if n >= 10)
        assert first_arrival - sent_first < 0.4  # the rest follows 0.5 s later: not held back
    finally:
        up.stop()


def test_expect_100_continue(proxy: Any, echo_upstream: str) -> None:
    url = proxy(Forward(echo_upstream))
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"PUT /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        data = b""
        while b'"body_len"' not in data:
            data += sock.recv(65536)
        assert b'"body_len": 5' in data


def test_expect_final_answer_before_body_is_relayed(proxy: Any) -> None:
    def handler(sock: socket.socket, data: bytes) -> None:
        sock.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")

    up = RawUpstream(handler)
    try:
        url = proxy(Forward(up.url))
        out = raw_request(
            url,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert out.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and out.endswith(b"nope")
        assert b"100 Continue" not in out
    finally:
        up.stop()


def test_server_sent_events_arrive_event_by_event(proxy: Any, pywsgi: Any) -> None:
    written: list[float] = []

    def sse(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        for i in range(5):
            written.append(time.monotonic())
            yield b"data: event %d\n\n" % i
            gevent.sleep(0.2)

    url = proxy(Forward(pywsgi(sse)))
    resp = HTTP.request("GET", url + "/events", preload_content=False)
    received = []
    buf = b""
    for chunk in resp.stream(decode_content=False):
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            received.append((time.monotonic(), event))
    resp.release_conn()
    assert [e for _, e in received] == [b"data: event %d" % i for i in range(5)]
    for (arrived, _), sent in zip(received, written, strict=True):
        assert arrived - sent < 0.1


def test_compressed_response_passes_through_undecoded(proxy: Any, pywsgi: Any) -> None:
    payload = gzip.compress(b"hello " * 1000)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(
            "200 OK",
            [("Content-Encoding", "gzip"), ("Content-Length", str(len(payload)))],
        )
        return [payload]

    resp = HTTP.request(
        "GET", proxy(Forward(pywsgi(app))) + "/", decode_content=False, preload_content=True
    )
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Content-Length"] == str(len(payload))
    assert resp.data == payload


@pytest.mark.parametrize(
    ("method", "status", "answer"),
    [
        pytest.param(b"HEAD", 200, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", id="head"),
        pytest.param(b"GET", 204, b"HTTP/1.1 204 No Content\r\n\r\n", id="204"),
        pytest.param(b"GET", 304, b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n', id="304"),
    ],
)
def test_no_body_responses(proxy: Any, method: bytes, status: int, answer: bytes) -> None:
    up = recording_upstream(answer)
    try:
        url = proxy(Forward(up.url))
        out = raw_request(url, method + b" / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status)
        assert body == b""
        if method == b"HEAD":
            assert b"Content-Length: 1234" in head
    finally:
        up.stop()


def test_keepalive_connections_are_reused(proxy: Any, pywsgi: Any) -> None:
    ports: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ports.append(environ["REMOTE_PORT"])
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    url = proxy(Forward(pywsgi(app)))
    for _ in range(20):
        assert HTTP.request("GET", url + "/").data == b"ok"
    assert len(set(ports)) == 1


def test_stale_keepalive_connection_is_retried_for_get(proxy: Any) -> None:
    # The upstream answers keep-alive but closes right after: the next GET meets
    # a dead pooled connection and must still succeed on a fresh one.
    def handler(sock: socket.socket, data: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = RawUpstream(handler)
    try:
        url = proxy(Forward(up.url))
        for _ in range(3):
            resp = HTTP.request("GET", url + "/")
            assert resp.status == 200 and resp.data == b"ok"
            gevent.sleep(0.05)
    finally:
        up.stop()


def test_exchange_is_recorded(proxy: Any, echo_upstream: str) -> None:
    seen: list[Any] = []
    fwd = Forward(echo_upstream)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.append(environ)
        return fwd(environ, start_response)

    HTTP.request("GET", proxy(app) + "/x")
    (record,) = seen[0][EXCHANGES]
    assert record.target == echo_upstream and record.status == 200
    assert record.error is None and record.bytes_received > 0 and record.ended is not None


def test_large_download_streams_with_content_length(proxy: Any, pywsgi: Any) -> None:
    block = os.urandom(1024 * 1024)

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Length", str(len(block) * 20))])
        for _ in range(20):
            yield block

    resp = HTTP.request("GET", proxy(Forward(pywsgi(app))) + "/", preload_content=False)
    digest = hashlib.sha256()
    for chunk in resp.stream(65536):
        digest.update(chunk)
    resp.release_conn()
    assert digest.hexdigest() == hashlib.sha256(block * 20).hexdigest()


def test_raw_helper_reads_body() -> None:
    # read_exact_body is shared with other tests: keep it honest.
    a, b = socket.socketpair()
    b.sendall(b"rest")
    assert read_exact_body(a, b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nab") == b"abrest"
    a.close()
    b.close()


class _ReadOnlyInput:
    """A ``wsgi.input`` with ``read(n)`` only, as gunicorn's and pywsgi's are:
    each read waits for ``n`` bytes.  Read number ``slow_read`` takes 0.1 s."""

    def __init__(self, data: bytes, slow_read: int = 0) -> None:
        self.data = data
        self.pos = 0
        self.sizes: list[int] = []
        self.slow_read = slow_read

    def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        if len(self.sizes) == self.slow_read:
            time.sleep(0.1)
        out = self.data[self.pos : self.pos + size]
        self.pos += len(out)
        return out


def _post_through(url: str, stream: Any, length: int) -> dict[str, Any]:
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/up",
        "QUERY_STRING": "",
        "SERVER_NAME": "proxy",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "proxy",
        "CONTENT_LENGTH": str(length),
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": stream,
    }
    got: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        got.append(status)
        return None

    body = b"".join(Forward(url)(environ, start_response))
    assert got == ["200 OK"]
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_upload_reads_grow_when_the_input_has_no_read1(echo_upstream: str) -> None:
    """Without read1 each read waits for its size: 64 KiB reads cost gunicorn's
    Body a copy of its read-ahead buffer each; reads double up to 1 MiB."""
    data = os.urandom(12 << 20)
    stream = _ReadOnlyInput(data, slow_read=8)
    doc = _post_through(echo_upstream, stream, len(data))
    assert doc["body_len"] == len(data)
    assert doc["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert stream.sizes[0] == 65536 and max(stream.sizes) == 1 << 20
    # A read that waited (a slow client) brings the size back to 64 KiB.
    assert stream.sizes[8] == 65536


def test_upload_reads_stay_small_with_read1(echo_upstream: str) -> None:
    class WithRead1(_ReadOnlyInput):
        def read1(self, size: int = -1) -> bytes:
            return self.read(size)

    data = os.urandom(3 << 20)
    stream = WithRead1(data)
    assert _post_through(echo_upstream, stream, len(data))["body_len"] == len(data)
    assert set(stream.sizes) == {65536}


def test_proxied_requests_leave_no_reference_cycles() -> None:
    """What a request allocates is freed by reference counting when it ends:
    no upstream response, response writer or environ waits for the cyclic GC
    (which scans them at every collection: CPU and pauses under load)."""
    import gc

    from oxypy._client.exchange import UpstreamResponse
    from oxypy._server.wsgi_io import Input, ResponseWriter

    from _servers import echo_app, proxy_server, start_pywsgi, url_of

    upstream = start_pywsgi(echo_app)
    proxy = proxy_server(Forward(url_of(upstream)), lint=False)
    request = b"GET /cycle HTTP/1.1\r\nHost: t\r\n\r\n"
    raw_request(url_of(proxy), request)  # warm: the pool and the imports
    enabled, debug = gc.isenabled(), gc.get_debug()
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            assert raw_request(url_of(proxy), request).startswith(b"HTTP/1.1 200 ")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = (UpstreamResponse, ResponseWriter, Input)
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, ours)]
        assert left == []
    finally:
        gc.set_debug(debug)
        gc.garbage.clear()
        if enabled:
            gc.enable()
        proxy.stop()
        upstream.stop()
