"""Deadlines (issue 14): Timeout, Forward(response_header_timeout), Buffer(per_try_timeout),
and Buffer deciding on the response head and streaming the body.

Every upstream is a real server on 127.0.0.1 (raw sockets for the hanging,
trickling and slow-head peers); every bound is measured on the client side
with generous margins (the machine is shared).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
import urllib3

from oxypy import (
    Buffer,
    ConfigurationError,
    DeadlineExceeded,
    Forward,
    RoundRobin,
    Timeout,
    Trace,
    UpstreamTimeout,
)
from oxypy import environ as keys

from _servers import RawUpstream, start_pywsgi, url_of

HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=20))
#: Added to every bound: the machine is shared by several test runs.
MARGIN = 1.5
App = Callable[..., Any]


def wait_lines(lines: list[str], count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout
    while len(lines) < count and time.monotonic() < end:
        gevent.sleep(0.01)
    assert len(lines) == count, lines
    return [json.loads(line) for line in lines]


class Upstreams:
    """Raw upstreams started by a test, released and stopped at its end."""

    def __init__(self) -> None:
        self.release = gevent.event.Event()
        self.started: list[RawUpstream] = []

    def hanging(self) -> RawUpstream:
        """Reads the request and never answers (until the test ends)."""

        def handler(sock: socket.socket, data: bytes) -> None:
            self.release.wait(30)

        return self._start(handler)

    def trickling(self, length: int, every: float) -> RawUpstream:
        """Sends a head with Content-Length ``length``, then one byte every ``every`` s."""

        def handler(sock: socket.socket, data: bytes) -> None:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
            for _ in range(length):
                if self.release.wait(every):
                    return
                sock.sendall(b"x")

        return self._start(handler)

    def slow_head(self, every: float) -> RawUpstream:
        """Sends its response head one byte every ``every`` s (each read is quick)."""
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\nok"

        def handler(sock: socket.socket, data: bytes) -> None:
            for i in range(len(head)):
                sock.sendall(head[i : i + 1])
                if self.release.wait(every):
                    return

        return self._start(handler)

    def first_chunk_then_pause(self, pause: float) -> RawUpstream:
        """A chunked response: its first chunk at once, the rest after ``pause`` s."""

        def handler(sock: socket.socket, data: bytes) -> None:
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
            )
            self.release.wait(pause)
            sock.sendall(b"4\r\nrest\r\n0\r\n\r\n")

        return self._start(handler)

    def _start(self, handler: Callable[[socket.socket, bytes], None]) -> RawUpstream:
        up = RawUpstream(handler)
        self.started.append(up)
        return up

    def stop(self) -> None:
        self.release.set()
        for up in self.started:
            up.stop()


@pytest.fixture
def ups() -> Iterator[Upstreams]:
    found = Upstreams()
    yield found
    found.stop()


def ok_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def read_until_close(url: str, path: str = "/", timeout: float = 10.0) -> tuple[bytes, float]:
    """GET ``path`` on a raw socket; everything received until the server closes, and when."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                chunks.append(piece)
        except ConnectionResetError:
            pass
        return b"".join(chunks), time.monotonic() - started


# -- Timeout ----------------------------------------------------------------------------


def test_hanging_upstream_under_timeout_is_504_at_the_deadline(proxy: Any, ups: Upstreams) -> None:
    up = ups.hanging()
    lines: list[str] = []
    url = proxy(Trace(Timeout(Forward(up.url, read_timeout=30), 0.4), sink=lines.append))
    started = time.monotonic()
    r = HTTP.request("GET", url + "/hang")
    elapsed = time.monotonic() - started
    assert r.status == 504
    assert r.data == b"request deadline reached\n"
    assert 0.4 <= elapsed < 0.4 + MARGIN
    (rec,) = wait_lines(lines)
    assert (rec["status"], rec["error"]) == (504, "deadline_exceeded")
    assert rec["upstream"][0]["error"] == "deadline_exceeded"


def test_trickling_body_is_cut_at_the_deadline_never_completed(proxy: Any, ups: Upstreams) -> None:
    up = ups.trickling(100, 0.3)
    url = proxy(Timeout(Forward(up.url, read_timeout=30), 1.0))
    data, elapsed = read_until_close(url)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 100" in head
    # About 3 bytes (one per 0.3 s) before the deadline: the connection is
    # closed short of the declared length, never padded to it.
    assert 1 <= len(body) < 10
    assert set(body) == {ord("x")}
    assert 1.0 <= elapsed < 1.0 + MARGIN


def test_an_app_ignoring_the_deadline_is_interrupted_before_its_head(proxy: Any) -> None:
    done = gevent.event.Event()

    def sleepy(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        try:
            gevent.sleep(10)
        finally:
            done.set()
        return ok_app(environ, start_response)

    lines: list[str] = []
    url = proxy(Trace(Timeout(sleepy, 0.3), sink=lines.append))
    started = time.monotonic()
    r = HTTP.request("GET", url + "/")
    elapsed = time.monotonic() - started
    assert (r.status, r.data) == (
        504,
        b"request deadline of 0.3 s reached before the response head\n",
    )
    assert 0.3 <= elapsed < 0.3 + MARGIN
    assert done.wait(2)  # the app was interrupted, not left running
    (rec,) = wait_lines(lines)
    assert (rec["status"], rec["error"]) == (504, "deadline_exceeded")


def test_an_app_streaming_past_the_deadline_has_its_connection_aborted(proxy: Any) -> None:
    def slow_stream(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        yield b"12345"
        gevent.sleep(10)
        yield b"67890"

    url = proxy(Timeout(slow_stream, 0.3), lint=False)
    data, elapsed = read_until_close(url)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"12345"  # 5 of the 10 declared bytes, then the close
    assert 0.3 <= elapsed < 0.3 + MARGIN


def test_a_generator_app_silent_before_its_first_chunk_gets_504(proxy: Any) -> None:
    def late(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        gevent.sleep(10)
        start_response("200 OK", [("Content-Length", "2")])
        yield b"ok"

    url = proxy(Timeout(late, 0.3))
    started = time.monotonic()
    r = HTTP.request("GET", url + "/")
    assert r.status == 504
    assert r.data == b"request deadline of 0.3 s reached while the response was produced\n"
    assert time.monotonic() - started < 0.3 + MARGIN


def test_nested_timeouts_keep_the_earlier_deadline(proxy: Any) -> None:
    def report(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = b"%.3f" % (environ[keys.DEADLINE] - time.monotonic())
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    for app in (Timeout(Timeout(report, 5.0), 0.5), Timeout(Timeout(report, 0.5), 5.0)):
        r = HTTP.request("GET", proxy(app) + "/")
        assert r.status == 200
        assert 0.0 < float(r.data) <= 0.5


def test_a_fast_answer_under_timeout_is_untouched(proxy: Any) -> None:
    server = start_pywsgi(ok_app)
    try:
        url = proxy(Timeout(Forward(url_of(server)), 5.0))
        for _ in range(3):
            r = HTTP.request("GET", url + "/")
            assert (r.status, r.data) == (200, b"ok")
    finally:
        server.stop()


def test_deadline_header_tells_the_upstream_what_remains(proxy: Any, echo_upstream: str) -> None:
    fwd = Forward(echo_upstream, deadline_header="X-Request-Timeout-Ms")
    r = HTTP.request("GET", proxy(Timeout(fwd, 2.0)) + "/", headers={"X-Request-Timeout-Ms": "1"})
    sent = json.loads(r.data)["headers"]["x-request-timeout-ms"]
    assert 1000 < int(sent) <= 2000
    # No deadline: nothing is sent, and the client's own copy never passes.
    r = HTTP.request("GET", proxy(fwd) + "/", headers={"X-Request-Timeout-Ms": "99999"})
    assert "x-request-timeout-ms" not in json.loads(r.data)["headers"]
    # Off by default: the client's header passes like any other.
    r = HTTP.request(
        "GET",
        proxy(Timeout(Forward(echo_upstream), 2.0)) + "/",
        headers={"X-Request-Timeout-Ms": "7"},
    )
    assert json.loads(r.data)["headers"]["x-request-timeout-ms"] == "7"


def test_bad_options_are_configuration_errors() -> None:
    for seconds in (0, -1, float("inf"), float("nan"), "1", True):
        with pytest.raises(ConfigurationError, match="Timeout seconds"):
            Timeout(ok_app, seconds)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="response_header_timeout"):
        Forward(response_header_timeout=0)
    with pytest.raises(ConfigurationError, match="deadline_header"):
        Forward(deadline_header="Bad Header")
    for value in (0, -0.5, float("inf"), True):
        with pytest.raises(ConfigurationError, match="per_try_timeout"):
            Buffer(ok_app, per_try_timeout=value)


def test_deadline_exceeded_is_an_upstream_timeout() -> None:
    exc = DeadlineExceeded()
    assert isinstance(exc, UpstreamTimeout)
    assert (exc.status, exc.kind) == (504, "deadline_exceeded")


# -- Forward(response_header_timeout) ------------------------------------------------------


def test_slow_head_upstream_is_504_at_response_header_timeout(proxy: Any, ups: Upstreams) -> None:
    up = ups.slow_head(0.05)  # each read is quick: read_timeout alone never fires
    lines: list[str] = []
    fwd = Forward(up.url, read_timeout=5, response_header_timeout=0.5)
    url = proxy(Trace(fwd, sink=lines.append))
    started = time.monotonic()
    r = HTTP.request("GET", url + "/")
    elapsed = time.monotonic() - started
    assert r.status == 504
    assert r.data == b"upstream sent no response head within 0.5 s (response_header_timeout)\n"
    assert 0.5 <= elapsed < 0.5 + MARGIN
    (rec,) = wait_lines(lines)
    assert (rec["status"], rec["error"]) == (504, "upstream_header_timeout")


def test_response_header_timeout_does_not_bound_the_body(proxy: Any, ups: Upstreams) -> None:
    up = ups.trickling(4, 0.2)  # head at once, body over 0.8 s
    url = proxy(Forward(up.url, read_timeout=5, response_header_timeout=0.3))
    r = HTTP.request("GET", url + "/")
    assert (r.status, r.data) == (200, b"xxxx")


# -- Buffer(per_try_timeout) ---------------------------------------------------------------


def test_per_try_timeout_moves_on_from_a_hung_server(proxy: Any, ups: Upstreams) -> None:
    hang = ups.hanging()
    good = start_pywsgi(ok_app)
    try:
        lb = RoundRobin(Forward(read_timeout=30), [hang.url, url_of(good)])
        lines: list[str] = []
        app = Trace(
            Buffer(lb, retry="IsNetworkError() && Attempts() < 3", per_try_timeout=0.3),
            sink=lines.append,
        )
        url = proxy(app)
        for _ in range(2):  # one of the two starts on the hung server
            started = time.monotonic()
            r = HTTP.request("GET", url + "/")
            assert (r.status, r.data) == (200, b"ok")
            assert time.monotonic() - started < 0.3 + MARGIN
        assert len(hang.requests) == 1
        recs = wait_lines(lines, 2)
        tried = [rec for rec in recs if rec["attempts"] == 2]
        assert len(tried) == 1
        assert tried[0]["upstream"][0]["error"] == "upstream_try_timeout"
        assert tried[0]["upstream"][0]["target"] == hang.url
        assert tried[0]["status"] == 200
    finally:
        good.stop()


def test_per_try_timeout_interrupts_an_app_that_ignores_it(proxy: Any) -> None:
    calls: list[int] = []

    def first_hangs(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        calls.append(environ[keys.ATTEMPT])
        if environ[keys.ATTEMPT] == 1:
            gevent.sleep(10)
        return ok_app(environ, start_response)

    url = proxy(
        Buffer(first_hangs, retry="IsNetworkError() && Attempts() < 2", per_try_timeout=0.3)
    )
    started = time.monotonic()
    r = HTTP.request("GET", url + "/")
    assert (r.status, r.data) == (200, b"ok")
    assert time.monotonic() - started < 0.3 + MARGIN
    assert calls == [1, 2]


def test_per_try_timeout_without_retry_is_504(proxy: Any, ups: Upstreams) -> None:
    hang = ups.hanging()
    url = proxy(Buffer(Forward(hang.url, read_timeout=30), per_try_timeout=0.3))
    started = time.monotonic()
    r = HTTP.request("GET", url + "/")
    assert (r.status, r.data) == (504, b"upstream attempt timed out (per_try_timeout)\n")
    assert 0.3 <= time.monotonic() - started < 0.3 + MARGIN


def test_per_try_timeout_bounds_the_head_not_the_streamed_body(proxy: Any, ups: Upstreams) -> None:
    up = ups.trickling(4, 0.2)  # head at once, body over 0.8 s
    url = proxy(Buffer(Forward(up.url), retry="IsNetworkError()", per_try_timeout=0.3))
    r = HTTP.request("GET", url + "/")
    assert (r.status, r.data) == (200, b"xxxx")
    assert len(up.requests) == 1


def _unavailable(calls: list[float]) -> Callable[..., list[bytes]]:
    """Answers 503 "busy N"; records the seconds left to the deadline at each attempt."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        calls.append(environ[keys.DEADLINE] - time.monotonic())
        body = b"busy %d" % environ[keys.ATTEMPT]
        start_response("503 Service Unavailable", [("Content-Length", str(len(body)))])
        return [body]

    return app


def test_buffer_stops_retrying_and_backing_off_at_the_deadline(proxy: Any) -> None:
    calls: list[float] = []
    buffer = Buffer(
        _unavailable(calls),
        retry="ResponseCode() == 503",
        max_attempts=50,
        retry_backoff=(0.1, 0.1),
        rng=random.Random(7),
    )

    def deadline_only(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        # The deadline alone, without Timeout's interruption: Buffer must honour it.
        environ[keys.DEADLINE] = time.monotonic() + 0.5
        return buffer(environ, start_response)

    started = time.monotonic()
    r = HTTP.request("GET", proxy(deadline_only) + "/")
    # The last attempt's own answer, and no attempt after the deadline
    # (50 attempts with ~50 ms backoffs would take ~2.5 s).
    assert r.status == 503
    assert r.data == b"busy %d" % len(calls)
    assert 1 < len(calls) < 50
    assert all(left > 0 for left in calls)
    assert time.monotonic() - started < 0.5 + MARGIN
    count = len(calls)
    gevent.sleep(0.3)
    assert len(calls) == count  # nothing retried in the background


def test_timeout_over_buffer_with_backoff_ends_at_the_deadline(proxy: Any) -> None:
    calls: list[float] = []
    buffer = Buffer(
        _unavailable(calls),
        retry="ResponseCode() == 503",
        max_attempts=50,
        retry_backoff=(0.1, 0.1),
        rng=random.Random(7),
    )
    started = time.monotonic()
    r = HTTP.request("GET", proxy(Timeout(buffer, 0.5)) + "/")
    # Usually the last answer (Buffer stops before the deadline); on a loaded
    # machine a backoff sleep may overrun it, and Timeout answers instead.
    assert (r.status, r.data) in (
        (503, b"busy %d" % len(calls)),
        (504, b"request deadline of 0.5 s reached before the response head\n"),
    )
    assert 1 < len(calls) < 50
    assert all(left > 0 for left in calls)
    assert time.monotonic() - started < 0.5 + MARGIN


# -- Buffer streams the response ----------------------------------------------------------


def first_chunk_after(url: str) -> tuple[float, bytes]:
    """Seconds until the first body chunk's bytes arrive, and everything until close."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    started = time.monotonic()
    first = None
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
            if first is None and b"first" in data:
                first = time.monotonic() - started
    assert first is not None, data
    return first, data


def test_buffer_with_retry_streams_the_first_chunk_at_once(proxy: Any, ups: Upstreams) -> None:
    up = ups.first_chunk_then_pause(2.0)
    url = proxy(Buffer(Forward(up.url), retry="IsNetworkError() && Attempts() < 3"))
    first, data = first_chunk_after(url)
    assert first < 0.5
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"5\r\nfirst\r\n4\r\nrest\r\n0\r\n\r\n"


def test_buffer_with_a_response_limit_still_buffers(proxy: Any, ups: Upstreams) -> None:
    up = ups.first_chunk_then_pause(0.6)
    buffer = Buffer(Forward(up.url), retry="IsNetworkError()", max_response_body_bytes=1024)
    first, data = first_chunk_after(proxy(buffer))
    assert first >= 0.6
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 9" in head
    assert body == b"firstrest"


def test_a_streamed_body_failing_mid_way_aborts_the_client_connection(
    proxy: Any, ups: Upstreams
) -> None:
    def handler(sock: socket.socket, data: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        sock.shutdown(socket.SHUT_RDWR)  # cut short: 5 of 10 bytes

    up = RawUpstream(handler)
    ups.started.append(up)
    url = proxy(Buffer(Forward(up.url), retry="IsNetworkError() && Attempts() < 3"))
    data, _ = read_until_close(url)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"12345"  # never padded, never retried after the head went out
    assert len(up.requests) == 1


def two_chunks_at_once() -> RawUpstream:
    """Sends the head with the first chunk (``one``), the second 50 ms later."""

    def handler(sock: socket.socket, data: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        gevent.sleep(0.05)
        sock.sendall(b"3\r\ntwo\r\n0\r\n\r\n")
        sock.settimeout(5)
        while sock.recv(65536):
            pass

    return RawUpstream(handler)


@pytest.mark.parametrize("first_taken", [False, True], ids=["before-first-byte", "mid-body"])
def test_chunks_in_hand_are_not_handed_out_after_the_deadline(first_taken: bool) -> None:
    # The server is this test: it takes the head, then dawdles (a slow client)
    # until the deadline has passed although every byte arrived long before.
    up = two_chunks_at_once()
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    try:
        env = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": None,
            "HTTP_HOST": "example.test",
        }
        body = Timeout(Forward(up.url), 0.3)(env, start_response)
        chunks = iter(body)
        if first_taken:
            assert next(chunks) == b"one"
        gevent.sleep(0.4)
        if first_taken:
            with pytest.raises(DeadlineExceeded):
                next(chunks)  # cut: the server aborts the client connection
        else:
            rest = b"".join(chunks)  # nothing went out yet: a 504 instead
            assert statuses == ["200 OK", "504 Gateway Timeout"]
            assert rest.startswith(b"request deadline ")
        assert isinstance(env[keys.ERROR], DeadlineExceeded)
        getattr(body, "close", lambda: None)()
    finally:
        up.stop()


def test_a_resetting_upstream_under_timeout_is_502_at_once_not_504_later(proxy: Any) -> None:
    def reset(sock: socket.socket, data: bytes) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    up = RawUpstream(reset)  # closes with RST as soon as the request head arrived
    try:
        lines: list[str] = []
        url = proxy(Trace(Timeout(Forward(up.url), 5.0), sink=lines.append))
        started = time.monotonic()
        r = HTTP.request("GET", url + "/")
        assert r.status == 502
        assert time.monotonic() - started < 2.5  # the reset answers, not the deadline
        (rec,) = wait_lines(lines)
        assert (rec["status"], rec["error"]) == (502, "upstream_read_error")
    finally:
        up.stop()
