"""Trace: the JSON line per request, observed through real servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
import urllib3
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from oxypy import Forward
from oxypy._core.exchange import Exchange
from oxypy.environ import EXCHANGES
from oxypy.exceptions import ConfigurationError, UpstreamTimeout
from oxypy.requestid import RequestID
from oxypy.trace import Trace, tls_info, tls_version_name

HTTP = urllib3.PoolManager(retries=False, timeout=10)


def wait_for(lines: list[str], count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(lines) < count and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert len(lines) == count, lines
    return [json.loads(line) for line in lines]


def refused_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


# -- through real servers -----------------------------------------------------------


def test_success_line_fields(proxy: Any, echo_upstream: str) -> None:
    lines: list[str] = []
    trace = Trace(
        RequestID(Forward(echo_upstream)),
        sink=lines.append,
        request_headers=["X-Req-A", "Content-Type"],
        response_headers=["Content-Type", "X-Request-Id"],
    )
    url = proxy(trace)
    before = time.time()
    resp = HTTP.request(
        "POST",
        url + "/hello%20there?x=1&y=%2F",
        body=b"123456",
        headers={"X-Req-A": "a1", "X-Req-B": "b", "Content-Type": "text/plain"},
    )
    assert resp.status == 200
    (rec,) = wait_for(lines)
    assert rec["method"] == "POST"
    assert rec["url"] == "/hello%20there?x=1&y=%2F"
    assert rec["host"] == url.split("//")[1]
    assert rec["proto"] == "HTTP/1.1"
    assert rec["client_ip"] == "127.0.0.1"
    assert rec["status"] == 200
    assert rec["request_bytes"] == 6
    assert rec["response_bytes"] == len(resp.data)
    assert rec["request_id"] == resp.headers["X-Request-Id"]
    assert len(rec["request_id"]) == 32
    assert rec["request_headers"] == {"x-req-a": ["a1"], "content-type": ["text/plain"]}
    assert rec["response_headers"] == {
        "content-type": ["application/json"],
        "x-request-id": [rec["request_id"]],
    }
    assert rec["target"] == echo_upstream
    assert rec["attempts"] == 1
    (up,) = rec["upstream"]
    assert up["target"] == echo_upstream and up["status"] == 200 and "error" not in up
    assert up["bytes"] == len(resp.data)
    assert "error" not in rec and "tls" not in rec
    assert 0 < rec["duration_ms"] < 5000
    stamp = rec["time"]
    assert stamp.endswith("Z") and "T" in stamp
    from datetime import datetime

    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    assert before - 1 <= parsed <= time.time() + 1
    assert "123456" not in lines[0]  # bodies are never logged


def test_refused_upstream_is_502_with_kind(proxy: Any) -> None:
    lines: list[str] = []
    target = refused_url()
    url = proxy(Trace(Forward(target), sink=lines.append))
    resp = HTTP.request("GET", url + "/x")
    assert resp.status == 502
    (rec,) = wait_for(lines)
    assert rec["status"] == 502
    assert rec["error"] == "upstream_connect_error"
    assert rec["upstream"][0]["error"] == "upstream_connect_error"
    assert rec["upstream"][0]["status"] == 0
    assert rec["target"] == target
    assert rec["response_bytes"] == len(resp.data) > 0


def test_upstream_timeout_is_504_with_kind(proxy: Any, pywsgi: Any) -> None:
    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        gevent.sleep(3)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    lines: list[str] = []
    url = proxy(Trace(Forward(pywsgi(slow), read_timeout=0.3), sink=lines.append))
    started = time.monotonic()
    resp = HTTP.request("GET", url + "/slow")
    assert resp.status == 504
    assert time.monotonic() - started < 2.5
    (rec,) = wait_for(lines)
    assert rec["status"] == 504
    assert rec["error"] == "upstream_timeout"
    assert 250 <= rec["duration_ms"] < 2500


def _streaming(chunks: int, size: int, pause: float) -> Callable[..., Iterator[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for i in range(chunks):
            if pause:
                gevent.sleep(pause)
            yield bytes([65 + i % 26]) * (size + i)

    return app


def test_chunked_response_bytes_counted_exactly(proxy: Any, pywsgi: Any) -> None:
    lines: list[str] = []
    url = proxy(Trace(Forward(pywsgi(_streaming(7, 1000, 0))), sink=lines.append))
    resp = HTTP.request("GET", url + "/stream")
    assert resp.status == 200
    assert "content-length" not in resp.headers
    expected = sum(1000 + i for i in range(7))
    assert len(resp.data) == expected
    (rec,) = wait_for(lines)
    assert rec["response_bytes"] == expected
    assert rec["upstream"][0]["bytes"] == expected
    assert rec["status"] == 200 and "error" not in rec


def test_chunked_request_bytes_counted(proxy: Any, echo_upstream: str) -> None:
    lines: list[str] = []
    url = proxy(Trace(Forward(echo_upstream), sink=lines.append))
    body = [b"a" * 3000, b"b" * 5000, b"c"]
    resp = HTTP.request("PUT", url + "/up", body=iter(body), chunked=True)
    assert resp.status == 200
    doc = json.loads(resp.data)
    assert doc["body_len"] == 8001
    (rec,) = wait_for(lines)
    assert rec["request_bytes"] == 8001


def test_requests_without_a_body_count_zero_bytes(proxy: Any, echo_upstream: str) -> None:
    """No Content-Length (or 0) and not chunked: ``request_bytes`` is 0 without
    counting; a declared body is still counted as the app reads it."""
    lines: list[str] = []
    url = proxy(Trace(Forward(echo_upstream), sink=lines.append))
    assert HTTP.request("GET", url + "/a").status == 200
    assert HTTP.request("POST", url + "/b", body=b"").status == 200
    assert HTTP.request("POST", url + "/c", body=b"xyz").status == 200
    records = wait_for(lines, 3)
    assert [(r["url"], r["request_bytes"]) for r in records] == [("/a", 0), ("/b", 0), ("/c", 3)]


def test_client_abort_recorded_as_499(proxy: Any, pywsgi: Any) -> None:
    lines: list[str] = []
    upstream = pywsgi(_streaming(200, 4096, 0.02))
    url = proxy(Trace(Forward(upstream), sink=lines.append))
    host, port = url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        got = sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    (rec,) = wait_for(lines, timeout=10)
    assert rec["status"] == 499
    assert rec["status_sent"] == 200
    assert rec["error"] == "client_disconnected"
    assert rec["upstream"][0]["error"] == "client_disconnected"
    assert 0 < rec["response_bytes"] < 200 * 4096


def test_multi_valued_response_headers(proxy: Any, pywsgi: Any) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(
            "201 Created",
            [("X-Re-1", "one"), ("X-Re-1", "two"), ("X-Re-2", "z"), ("Content-Length", "0")],
        )
        return [b""]

    lines: list[str] = []
    trace = Trace(
        Forward(pywsgi(app)),
        sink=lines.append,
        request_headers=["X-Req-B"],
        response_headers=["x-re-1", "X-RE-2", "X-Absent"],
    )
    url = proxy(trace)
    resp = HTTP.request("GET", url + "/h", headers={"X-Req-A": "a", "X-Req-B": "b"})
    assert resp.status == 201
    (rec,) = wait_for(lines)
    assert rec["request_headers"] == {"x-req-b": ["b"]}
    assert rec["response_headers"] == {"x-re-1": ["one", "two"], "x-re-2": ["z"]}
    assert rec["response_bytes"] == 0


def test_trusted_proxy_client_ip(proxy: Any, echo_upstream: str) -> None:
    lines: list[str] = []
    url = proxy(Trace(Forward(echo_upstream), sink=lines.append, trusted_proxies=["127.0.0.0/8"]))
    HTTP.request("GET", url + "/", headers={"X-Forwarded-For": "203.0.113.9"})
    (rec,) = wait_for(lines)
    assert rec["client_ip"] == "203.0.113.9"


def test_untrusted_forwarded_for_ignored(proxy: Any, echo_upstream: str) -> None:
    lines: list[str] = []
    url = proxy(Trace(Forward(echo_upstream), sink=lines.append))
    HTTP.request("GET", url + "/", headers={"X-Forwarded-For": "203.0.113.9"})
    (rec,) = wait_for(lines)
    assert rec["client_ip"] == "127.0.0.1"


# -- in-process: status rules, sinks, the queue -------------------------------------


def ok_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def test_skip_writes_no_line() -> None:
    lines: list[str] = []
    trace = Trace(ok_app, sink=lines.append, skip=lambda e: e["PATH_INFO"] == "/healthz")
    client = Client(LintMiddleware(trace))
    assert client.get("/healthz", buffered=True).data == b"hello"
    assert client.get("/other", buffered=True).data == b"hello"
    trace.close()
    assert [json.loads(line)["url"] for line in lines] == ["/other"]


def test_app_error_before_start_response_is_500_and_reraised() -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise KeyError("bug")

    lines: list[str] = []
    trace = Trace(broken, sink=lines.append)
    with pytest.raises(KeyError):
        Client(LintMiddleware(trace)).get("/", buffered=True)
    trace.close()
    rec = json.loads(lines[0])
    assert rec["status"] == 500 and rec["error"] == "KeyError"


def test_error_mid_stream_keeps_status_and_reraises() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"abc"
        raise UpstreamTimeout()

    lines: list[str] = []
    trace = Trace(app, sink=lines.append)
    with pytest.raises(UpstreamTimeout):
        Client(LintMiddleware(trace)).get("/", buffered=True)
    trace.close()
    rec = json.loads(lines[0])
    assert (rec["status"], rec["error"], rec["response_bytes"]) == (200, "upstream_timeout", 3)


def test_write_callable_bytes_counted() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"12345")
        return [b"678"]

    lines: list[str] = []
    trace = Trace(app, sink=lines.append)
    sent: list[bytes] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return sent.append

    body = trace({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, start_response)
    sent.extend(body)
    body.close()  # type: ignore[attr-defined]
    assert b"".join(sent) == b"12345678"
    trace.close()
    assert json.loads(lines[0])["response_bytes"] == 8


def test_attempts_and_attempt_from_environ() -> None:
    def fake(target: str, status: int) -> Exchange:
        return Exchange(target, "GET", 1.0, status=status, ended=1.25, bytes_received=5)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ[EXCHANGES].extend([fake("http://a", 502), fake("http://b", 200)])
        return ok_app(environ, start_response)

    lines: list[str] = []
    trace = Trace(app, sink=lines.append)
    Client(LintMiddleware(trace)).get("/", environ_overrides={"oxypy.attempt": 2}, buffered=True)
    trace.close()
    rec = json.loads(lines[0])
    assert rec["attempts"] == 2 and rec["attempt"] == 2 and rec["target"] == "http://b"
    assert [u["status"] for u in rec["upstream"]] == [502, 200]
    assert rec["upstream"][0]["duration_ms"] == 250.0


def test_every_field_rendered_byte_for_byte() -> None:
    """The line the writer renders is the compact ``json`` encoding of the record,
    fields in their documented order, non-ASCII escaped, every optional field present."""
    failed = UpstreamTimeout()
    failed.detail = "read timed out é"

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ[EXCHANGES].extend(
            [
                Exchange("http://a", "GET", 1.0, status=0, error=failed, ended=1.5),
                Exchange("http://b", "GET", 2.0, status=200, ended=2.125, bytes_received=5),
            ]
        )
        start_response(
            "200 OK", [("X-Multi", "1"), ("Content-Length", "5"), ("x-multi", "2\u00ff")]
        )
        return [b"hello"]

    ticks = iter([10.0, 10.5])
    lines: list[str] = []
    trace = Trace(
        app,
        sink=lines.append,
        request_headers=["X-Name", "X-Absent"],
        response_headers=["X-Multi"],
        trusted_proxies=["10.0.0.0/8"],
        clock=lambda: next(ticks),
        wall_clock=lambda: 1700000000.042,
    )
    Client(LintMiddleware(trace)).post(
        '/caf%C3%A9?q="x"',
        data=b"abc",
        headers={"X-Name": "caf\u00e9", "X-Forwarded-For": "203.0.113.7"},
        environ_overrides={
            "REMOTE_ADDR": "10.1.2.3",
            "SSL_PROTOCOL": "TLSv1.3",
            "SSL_CIPHER": "TLS_AES_128_GCM_SHA256",
            "oxypy.request_id": "rid-1",
            "oxypy.attempt": 2,
        },
        buffered=True,
    )
    trace.close()
    (line,) = lines
    assert line == json.dumps(json.loads(line), separators=(",", ":"))
    assert line == (
        '{"time":"2023-11-14T22:13:20.042Z","client_ip":"203.0.113.7","method":"POST",'
        '"url":"/caf%C3%A9?q=\\"x\\"","host":"localhost","proto":"HTTP/1.1",'
        '"request_headers":{"x-name":["caf\\u00e9"]},'
        '"tls":{"version":"TLSv1.3","cipher":"TLS_AES_128_GCM_SHA256"},'
        '"duration_ms":500.0,"request_id":"rid-1","request_bytes":0,"response_bytes":5,'
        '"response_headers":{"x-multi":["1","2\\u00ff"]},"status":200,'
        '"upstream":[{"target":"http://a","status":0,"duration_ms":500.0,"bytes":0,'
        '"error":"upstream_timeout","error_detail":"read timed out \\u00e9"},'
        '{"target":"http://b","status":200,"duration_ms":125.0,"bytes":5}],'
        '"target":"http://b","attempts":2,"attempt":2}'
    )


def test_slow_sink_never_blocks_requests() -> None:
    written: list[str] = []

    def slow_sink(line: str) -> None:
        time.sleep(0.2)  # cooperative under gevent's monkey patching
        written.append(line)

    trace = Trace(ok_app, sink=slow_sink, queue_size=3)
    client = Client(LintMiddleware(trace))
    started = time.monotonic()
    for _ in range(10):
        assert client.get("/", buffered=True).status_code == 200
    assert time.monotonic() - started < 1.0  # a blocking sink would need >= 2 s
    assert trace.dropped >= 1
    trace.close()
    assert len(written) + trace.dropped == 10
    assert len(written) >= 3


@pytest.mark.parametrize("kind", ["file", "logger", "callable"])
def test_sink_kinds(kind: str) -> None:
    out: list[str] = []
    sink: Any
    if kind == "file":
        sink = io.StringIO()
    elif kind == "logger":
        sink = logging.getLogger("test.trace.sink")
        sink.propagate = False

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                out.append(record.getMessage())

        sink.handlers = [Keep()]
        sink.setLevel(logging.INFO)
    else:
        sink = out.append
    trace = Trace(ok_app, sink=sink)
    Client(LintMiddleware(trace)).get("/p?q=1", buffered=True)
    trace.close()
    text = sink.getvalue().splitlines() if kind == "file" else out
    assert len(text) == 1 and json.loads(text[0])["url"] == "/p?q=1"


def test_broken_sink_is_counted_not_fatal() -> None:
    def bad(line: str) -> None:
        raise OSError("disk full")

    trace = Trace(ok_app, sink=bad)
    assert Client(LintMiddleware(trace)).get("/", buffered=True).status_code == 200
    trace.close()
    assert trace.failed == 1


def test_injected_clocks() -> None:
    ticks = iter([10.0, 10.5])
    lines: list[str] = []
    trace = Trace(ok_app, sink=lines.append, clock=lambda: next(ticks), wall_clock=lambda: 0.25)
    Client(LintMiddleware(trace)).get("/", buffered=True)
    trace.close()
    rec = json.loads(lines[0])
    assert rec["duration_ms"] == 500.0 and rec["time"] == "1970-01-01T00:00:00.250Z"


# -- pure logic tables ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        pytest.param("TLSv1.3", "TLSv1.3", id="python-name"),
        pytest.param("TLS1.3", "TLSv1.3", id="no-v"),
        pytest.param(0x0304, "TLSv1.3", id="number-1.3"),
        pytest.param("772", "TLSv1.3", id="decimal-text"),
        pytest.param(0x0303, "TLSv1.2", id="number-1.2"),
        pytest.param("TLSv1", "TLSv1.0", id="tls1.0"),
        pytest.param(0x7F12, "unknown:0x7f12", id="unknown"),
        pytest.param(None, None, id="none"),
    ],
)
def test_tls_version_name(value: Any, name: str | None) -> None:
    assert tls_version_name(value) == name


def test_tls_info_sources() -> None:
    class FakeSSLSocket:
        def version(self) -> str:
            return "TLSv1.3"

        def cipher(self) -> tuple[str, str, int]:
            return ("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128)

    assert tls_info({}) is None
    assert tls_info({"SSL_PROTOCOL": "TLSv1.2", "SSL_CIPHER": "ECDHE-RSA-AES128-GCM-SHA256"}) == {
        "version": "TLSv1.2",
        "cipher": "ECDHE-RSA-AES128-GCM-SHA256",
    }
    assert tls_info({"gunicorn.socket": FakeSSLSocket()}) == {
        "version": "TLSv1.3",
        "cipher": "TLS_AES_128_GCM_SHA256",
    }
    with socket.socket() as plain:
        assert tls_info({"gunicorn.socket": plain}) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"sink": 42}, id="bad-sink"),
        pytest.param({"request_headers": "X-A"}, id="string-not-list"),
        pytest.param({"response_headers": ["bad name"]}, id="bad-header"),
        pytest.param({"queue_size": 0}, id="queue-size"),
        pytest.param({"trusted_proxies": ["nope"]}, id="bad-cidr"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Trace(ok_app, **kwargs)


def test_never_logs_bodies_hash_check() -> None:
    body = b"secret-body-" * 100
    lines: list[str] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [hashlib.sha256(data).hexdigest().encode(), body]

    trace = Trace(app, sink=lines.append)
    Client(LintMiddleware(trace)).post("/", data=body, buffered=True)
    trace.close()
    assert "secret" not in lines[0]
    assert json.loads(lines[0])["request_bytes"] == len(body)


def test_lines_still_queued_at_exit_are_written() -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import sys
        from oxypy import Trace

        def app(environ, start_response):
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]

        trace = Trace(app, sink=sys.stdout)
        for i in range(50):
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/%d" % i, "REMOTE_ADDR": "1.2.3.4"}
            body = trace(environ, lambda status, headers: None)
            list(body)
            body.close()
        # no trace.close(): the process just ends
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    urls = [json.loads(line)["url"] for line in out.stdout.splitlines()]
    assert urls == [f"/{i}" for i in range(50)]
