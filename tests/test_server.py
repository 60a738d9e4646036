"""oxypy.serve's front door: strict parsing, framing, keep-alive, errors, graceful stop."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import psutil
import pytest
import urllib3

from _servers import raw_request, wait_for

HTTP = urllib3.PoolManager(retries=False, timeout=10)


class Counter:
    """An app that counts the requests it served and answers its path."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        self.seen.append(environ["PATH_INFO"])
        out = b"path=" + environ["PATH_INFO"].encode("latin-1") + b" body=" + body
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))]
        )
        return [out]


MALFORMED = [
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        "400 Bad Request",
        id="cl-and-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "400 Bad Request",
        id="two-content-lengths",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "400 Bad Request",
        id="repeated-content-length",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        "400 Bad Request",
        id="plus-cl",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
        "400 Bad Request",
        id="cl-list",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",
        "400 Bad Request",
        id="space-before-colon",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\rX-Smuggle: 1\r\nContent-Length: 5\r\n\r\nhello",
        "400 Bad Request",
        id="bare-cr",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
        "400 Bad Request",
        id="vertical-tab-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        "400 Bad Request",
        id="folded-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        "501 Not Implemented",
        id="te-list",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
        "400 Bad Request",
        id="two-te",
    ),
    pytest.param(
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "400 Bad Request",
        id="te-in-http10",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n",
        "400 Bad Request",
        id="bad-chunk-size",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        "400 Bad Request",
        id="chunk-without-crlf",
    ),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", "400 Bad Request", id="missing-host"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400 Bad Request", id="two-hosts"
    ),
    pytest.param(b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", "400 Bad Request", id="space-in-target"),
    pytest.param(b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", "400 Bad Request", id="bad-method"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", "400 Bad Request", id="lf-only"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", "400 Bad Request", id="nul"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX\t: y\r\n\r\n", "400 Bad Request", id="tab-in-name"
    ),
    pytest.param(
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "505 HTTP Version Not Supported", id="http2-line"
    ),
    pytest.param(b"GET nohost HTTP/1.1\r\nHost: a\r\n\r\n", "400 Bad Request", id="bad-target"),
    pytest.param(
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", "405 Method Not Allowed", id="connect"
    ),
]


@pytest.mark.parametrize(("request_bytes", "status"), MALFORMED)
def test_malformed_request_gets_400_and_connection_closes(
    proxy: Any, request_bytes: bytes, status: str
) -> None:
    app = Counter()
    url = proxy(app)
    # A well-formed request follows the bad one on the same connection: it must
    # never be read as a request.
    follow = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    out = raw_request(url, request_bytes + follow, until="close", timeout=3)
    assert out.startswith(f"HTTP/1.1 {status}\r\n".encode())
    assert b"Connection: close\r\n" in out
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in out
    assert out.count(b"HTTP/1.1 ") == 1
    assert app.seen == []


def test_head_too_large_is_431(proxy: Any) -> None:
    app = Counter()
    url = proxy(app)
    big = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n"
    out = raw_request(url, big, until="close")
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert app.seen == []


def test_keepalive_and_pipelining_in_order(proxy: Any) -> None:
    app = Counter()
    url = proxy(app)
    reqs = b"".join(
        b"POST /%d HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nab%d" % (i, i) for i in range(5)
    )
    out = raw_request(
        url, reqs + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", until="close"
    )
    bodies = [
        part.split(b"\r\n\r\n", 1)[1][: len(b"path=/0 body=ab0")]
        for part in out.split(b"HTTP/1.1 200 OK\r\n")[1:]
    ]
    assert bodies[:5] == [b"path=/%d body=ab%d" % (i, i) for i in range(5)]
    assert app.seen == ["/0", "/1", "/2", "/3", "/4", "/last"]


def test_head_response_has_no_body(proxy: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"this must not be sent"

    out = raw_request(
        proxy(app, lint=False),
        b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        until="close",
    )
    head_resp, _, rest = out.partition(b"\r\n\r\n")
    assert head_resp.startswith(b"HTTP/1.1 200 OK")
    assert rest.startswith(b"HTTP/1.1 200 OK")  # the next response follows at once


def test_framing_of_responses(proxy: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/list":
            start_response("200 OK", [])
            return [b"one piece"]
        start_response("200 OK", [("Transfer-Encoding", "chunked"), ("Connection", "x")])

        def gen() -> Iterator[bytes]:
            yield b"abc"
            yield b""
            yield b"defg"

        return gen()

    url = proxy(app, lint=False)
    out = raw_request(url, b"GET /list HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"Content-Length: 9\r\n" in out and out.endswith(b"\r\n\r\none piece")
    assert b"Date: " in out
    out = raw_request(url, b"GET /gen HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.count(b"Transfer-Encoding: chunked") == 1  # the app's own one is not doubled
    assert b"Connection: x" not in head
    assert body == b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    out = raw_request(url, b"GET /gen HTTP/1.0\r\n\r\n", until="close")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"abcdefg"


def test_chunked_upload_streams_into_the_app(proxy: Any) -> None:
    got: list[tuple[float, bytes]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        assert environ["wsgi.input_terminated"] is True and "CONTENT_LENGTH" not in environ
        while True:
            piece = environ["wsgi.input"].read1(65536)
            if not piece:
                break
            got.append((time.monotonic(), piece))
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    url = proxy(app, lint=False)
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        sent = time.monotonic()
        gevent.sleep(0.4)
        sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200 OK")
    assert b"".join(p for _, p in got) == b"hello world"
    assert got[0][0] - sent < 0.3  # the rest was sent 0.4 s later


def test_underscore_headers_are_dropped(proxy: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    raw_request(proxy(app), b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded_For: 6.6.6.6\r\n\r\n")
    assert "HTTP_X_FORWARDED_FOR" not in seen


def test_absolute_form_target(proxy: Any) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    raw_request(proxy(app), b"GET http://other.example:81/p%20q?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert seen["HTTP_HOST"] == "other.example:81"
    assert seen["PATH_INFO"] == "/p q" and seen["QUERY_STRING"] == "x=1"
    assert seen["RAW_URI"] == "http://other.example:81/p%20q?x=1"


def test_app_error_is_plain_500_without_traceback(proxy: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("secret internals")

    out = raw_request(proxy(app, lint=False), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", until="close")
    assert out.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert out.endswith(b"\r\n\r\nInternal Server Error\n")
    assert b"secret" not in out and b"Traceback" not in out


def test_error_after_headers_aborts_connection(proxy: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Length", "100")])
        yield b"partial"
        raise RuntimeError("boom")

    out = raw_request(proxy(app, lint=False), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", until="close")
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"\r\n\r\npartial")


def test_keepalive_responses_do_not_wait_for_delayed_ack(proxy: Any) -> None:
    """Head and body go out in one send with TCP_NODELAY: no ~40 ms stall per request."""
    url = proxy(Counter())
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        start = time.monotonic()
        for i in range(100):
            sock.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            data = b""
            while not data.endswith(b"body="):
                data += sock.recv(65536)
        elapsed = time.monotonic() - start
    # 100 delayed ACKs would take >= 4 s; generous bound for a noisy machine.
    assert elapsed < 2.0


GRACEFUL_APP = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import sys, gevent
    from oxypy import serve

    def app(environ, start_response):
        n = 20
        start_response("200 OK", [("Content-Length", str(n * 65536))])
        for _ in range(n):
            gevent.sleep(0.1)
            yield b"z" * 65536

    serve(app, "127.0.0.1:" + sys.argv[1], graceful_timeout=float(sys.argv[2]))
    """
)


def _listening_ports(proc: subprocess.Popen[bytes]) -> set[int]:
    """The TCP ports ``proc`` listens on now (none once it has exited)."""
    try:
        process = psutil.Process(proc.pid)
        conns = process.net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return set()
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}


def _wait_listening(proc: subprocess.Popen[bytes]) -> int:
    """The port the subprocess bound (it listens on port 0, so no port is ever reused)."""
    wait_for(lambda: proc.poll() is not None or _listening_ports(proc), timeout=20)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    (port,) = _listening_ports(proc)
    return port


@pytest.mark.parametrize(
    "graceful", [pytest.param(5.0, id="finishes"), pytest.param(0.5, id="cut")]
)
def test_sigterm_lets_a_long_download_finish_within_the_deadline(
    tmp_path: Path, graceful: float
) -> None:
    script = tmp_path / "graceful_app.py"
    script.write_text(GRACEFUL_APP)
    proc = subprocess.Popen(
        [sys.executable, str(script), "0", str(graceful)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        port = _wait_listening(proc)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not _listening_ports(proc))  # the listener closes first
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        data = first.partition(b"\r\n\r\n")[2]
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        sock.close()
        proc.wait(timeout=15)
        elapsed = time.monotonic() - start
        if graceful >= 5:
            assert hashlib.sha256(data).hexdigest() == hashlib.sha256(b"z" * 20 * 65536).hexdigest()
            assert elapsed < 5
        else:
            assert len(data) < 20 * 65536  # cut at the deadline, never completed falsely
            assert elapsed < 3
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1:8080", ("127.0.0.1", 8080), id="v4"),
        pytest.param("[::1]:0", ("::1", 0), id="v6"),
        pytest.param(":8080", ("0.0.0.0", 8080), id="any"),
        pytest.param("localhost:65535", ("localhost", 65535), id="name"),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    from oxypy._core.net import parse_listen

    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["8080", "host:", "host:http", "host:65536", "[::1:80", "::1]:80", ""]
)
def test_parse_listen_rejects(text: str) -> None:
    from oxypy._core.net import parse_listen
    from oxypy.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="listen address|brackets"):
        parse_listen(text)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param("http://h:81/p?q", ("http", "h:81", "/p?q"), id="full"),
        pytest.param("HTTPS://h", ("HTTPS", "h", "/"), id="no-path"),
        pytest.param("http://h?x=1", ("http", "h", "/?x=1"), id="query-only"),
        pytest.param("ftp://h/x", ("ftp", "h", "/x"), id="other-scheme"),
        pytest.param("/p", None, id="origin-form"),
        pytest.param("*", None, id="asterisk"),
        pytest.param("nohost", None, id="no-scheme"),
    ],
)
def test_split_absolute_form(target: str, expected: tuple[str, str, str] | None) -> None:
    from oxypy._core.urls import origin_form, split_absolute_form

    assert split_absolute_form(target) == expected
    assert origin_form(target) == (target if expected is None else expected[2])


def test_status_phrases_come_from_one_table() -> None:
    from oxypy._core.status import status_line
    from oxypy.exceptions import BadRequest, ClientDisconnected

    assert status_line(408) == "408 Request Timeout"
    assert status_line(499) == "499 Client Closed Request"
    assert BadRequest("x", status=431).status_line == "431 Request Header Fields Too Large"
    assert ClientDisconnected().status_line == "499 Client Closed Request"
