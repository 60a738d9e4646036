"""Faults and hostile clients through real sockets: every failure classified once.

A client that goes away is 499 everywhere and never counts against an
upstream; an upstream that misbehaves under Buffer is retried or answered 502,
never 500; everything a request held is given back.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
import urllib3
from prometheus_client import CollectorRegistry

from oxypy import (
    Buffer,
    CircuitBreaker,
    ConnLimit,
    Forward,
    OutlierDetection,
    PrometheusMetrics,
    RoundRobin,
    Trace,
    UpstreamProtocolError,
)
from oxypy.cbreaker import State
from oxypy.connlimit import MemoryConnStore

from _servers import RawUpstream, raw_request

HTTP = urllib3.PoolManager(retries=False, timeout=10)
MiB = 1 << 20


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        gevent.sleep(0.01)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP reset, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- (a) clients that abort their uploads -------------------------------------------


def test_aborting_uploaders_never_trip_the_breaker(proxy: Any, pywsgi: Any) -> None:
    started, ended = [], []

    def sink(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        started.append(environ["PATH_INFO"])
        try:
            environ["wsgi.input"].read()
        except OSError:
            pass  # the proxy gave up on the upload: its connection to us closed
        finally:
            ended.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    upstream = pywsgi(sink)
    lines: list[str] = []
    registry = CollectorRegistry()
    slots = MemoryConnStore()
    breaker = CircuitBreaker(Forward(upstream), "NetworkErrorRatio() > 0.5", check_period=0)
    app = Trace(
        PrometheusMetrics(ConnLimit(breaker, max_conns=64, store=slots), registry=registry),
        sink=lines.append,
    )
    url = proxy(app)
    clients = []
    for _ in range(10):
        sock = socket.create_connection(host_port(url), timeout=10)
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (10 * MiB))
        sock.sendall(b"x" * (5 * MiB))
        clients.append(sock)
    # all ten reached the chain, and their uploads the upstream
    wait_for(lambda: slots.in_flight("127.0.0.1") == 10 and len(started) == 10)
    for sock in clients:
        reset(sock)
    wait_for(lambda: len(lines) == 10 and len(slots) == 0)
    wait_for(lambda: len(ended) == 10)  # every upstream connection was closed too

    for _ in range(5):
        r = HTTP.request("GET", url + "/healthy")
        assert (r.status, r.data) == (200, b"ok")
    assert breaker.state is State.STANDBY
    assert breaker.metrics.network_error_count() == 0
    wait_for(lambda: len(lines) == 15)
    records = [json.loads(line) for line in lines]
    aborted = [rec for rec in records if rec["url"] == "/up"]
    assert len(aborted) == 10
    for rec in aborted:
        assert rec["status"] == 499, rec
        assert rec["error"] == "client_disconnected", rec
        assert [up.get("error") for up in rec["upstream"]] == ["client_disconnected"]
    assert [rec["status"] for rec in records if rec["url"] == "/healthy"] == [200] * 5
    assert metric(registry, "oxypy_requests_total", method="POST", code_class="4xx") == 10
    assert metric(registry, "oxypy_requests_total", method="POST", code_class="5xx") == 0
    assert metric(registry, "oxypy_requests_total", method="GET", code_class="2xx") == 5
    assert metric(registry, "oxypy_requests_in_flight") == 0
    assert len(slots) == 0


def test_client_leaving_mid_download_is_499_and_frees_everything(proxy: Any) -> None:
    sent_head = gevent.event.Event()
    upstream_closed = gevent.event.Event()

    def trickle(sock: socket.socket, data: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 1000)
        sent_head.set()
        try:
            while True:
                sock.sendall(b"a" * 1000)
                gevent.sleep(0.01)
        except OSError:
            upstream_closed.set()  # the proxy closed its upstream connection

    raw = RawUpstream(trickle)
    try:
        lines: list[str] = []
        slots = MemoryConnStore()
        breaker = CircuitBreaker(Forward(raw.url), "NetworkErrorRatio() > 0.5", check_period=0)
        app = Trace(ConnLimit(breaker, max_conns=8, store=slots), sink=lines.append)
        url = proxy(app)
        for _ in range(3):
            sent_head.clear()
            upstream_closed.clear()
            sock = socket.create_connection(host_port(url), timeout=10)
            sock.sendall(b"GET /dl HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
            reset(sock)
            assert upstream_closed.wait(10)
        wait_for(lambda: len(lines) == 3 and len(slots) == 0)
        for rec in map(json.loads, lines):
            assert (rec["status"], rec["status_sent"], rec["error"]) == (
                499,
                200,
                "client_disconnected",
            )
        assert breaker.metrics.network_error_count() == 0
        assert breaker.metrics.status_code_counts() == {499: 3}
    finally:
        raw.stop()


# -- (b) an upstream that cuts its body short, under Buffer --------------------------


def short_body(sock: socket.socket, data: bytes) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")


def head_only(sock: socket.socket, data: bytes) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")


def bad_chunks(sock: socket.socket, data: bytes) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    gevent.sleep(0.05)  # let the head be parsed alone: the garbage comes mid-body
    sock.sendall(b"zz\r\n")


def garbage(sock: socket.socket, data: bytes) -> None:
    sock.sendall(b"\x16\x03\x01 certainly not HTTP\r\n\r\n")


@pytest.fixture
def raw_upstream() -> Iterator[Callable[[Callable[[socket.socket, bytes], None]], RawUpstream]]:
    started: list[RawUpstream] = []

    def start(handler: Callable[[socket.socket, bytes], None]) -> RawUpstream:
        server = RawUpstream(handler)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def good_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
    return [b"good"]


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(short_body, id="short-body"),
        pytest.param(head_only, id="head-then-close"),
        pytest.param(bad_chunks, id="garbage-chunks"),
        pytest.param(garbage, id="garbage"),
    ],
)
def test_failing_upstream_under_buffer_is_retried_then_502(
    proxy: Any, raw_upstream: Any, handler: Callable[[socket.socket, bytes], None]
) -> None:
    # Updated for issue 14: Buffer streams the response unless
    # max_response_body_bytes is set; these cases are about the buffered path,
    # where a body cut short is still retried.  Streaming: see
    # test_unbuffered_response_cut_mid_body_aborts_the_client and
    # test_head_then_close_is_retried_while_streaming.
    raw = raw_upstream(handler)
    lines: list[str] = []
    app = Trace(
        Buffer(
            Forward(raw.url),
            retry="IsNetworkError() && Attempts() < 3",
            max_response_body_bytes=MiB,
        ),
        sink=lines.append,
    )
    r = HTTP.request("GET", proxy(app) + "/")
    assert r.status == 502
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.data.endswith(b"\n") and len(r.data) < 80 and b"Traceback" not in r.data
    assert raw.connections == 3
    wait_for(lambda: len(lines) == 1)
    rec = json.loads(lines[0])
    assert rec["status"] == 502 and rec["attempts"] == 3
    assert all(up["error"].startswith("upstream_") for up in rec["upstream"])


CUT = b"upstream closed the connection mid-body\n"
INVALID = b"invalid response from upstream\n"


@pytest.mark.parametrize(
    ("handler", "answer"),
    [
        pytest.param(short_body, CUT, id="short-body"),
        pytest.param(head_only, CUT, id="head-then-close"),
        pytest.param(bad_chunks, INVALID, id="garbage-chunks"),
        pytest.param(garbage, INVALID, id="garbage"),
    ],
)
def test_failing_upstream_without_retry_is_502(
    proxy: Any,
    raw_upstream: Any,
    handler: Callable[[socket.socket, bytes], None],
    answer: bytes,
) -> None:
    # Updated for issue 14: Buffer streams the response unless
    # max_response_body_bytes is set; these cases are about the buffered path,
    # where a body cut short is still retried.  Streaming: see
    # test_unbuffered_response_cut_mid_body_aborts_the_client and
    # test_head_then_close_is_retried_while_streaming.
    raw = raw_upstream(handler)
    r = HTTP.request("GET", proxy(Buffer(Forward(raw.url), max_response_body_bytes=MiB)) + "/")
    assert (r.status, r.data) == (502, answer)
    assert raw.connections == 1


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(short_body, id="short-body"),
        pytest.param(head_only, id="head-then-close"),
        pytest.param(bad_chunks, id="garbage-chunks"),
        pytest.param(garbage, id="garbage"),
    ],
)
def test_failing_upstream_behind_round_robin_fails_over(
    proxy: Any, pywsgi: Any, raw_upstream: Any, handler: Callable[[socket.socket, bytes], None]
) -> None:
    # Updated for issue 14: Buffer streams the response unless
    # max_response_body_bytes is set; these cases are about the buffered path,
    # where a body cut short is still retried.  Streaming: see
    # test_unbuffered_response_cut_mid_body_aborts_the_client and
    # test_head_then_close_is_retried_while_streaming.
    raw = raw_upstream(handler)
    good = pywsgi(good_app)
    app = Buffer(
        RoundRobin(Forward(), [raw.url, good]),
        retry="IsNetworkError() && Attempts() < 3",
        max_response_body_bytes=MiB,
    )
    url = proxy(app)
    for _ in range(4):
        r = HTTP.request("GET", url + "/")
        assert (r.status, r.data) == (200, b"good")
    assert raw.connections >= 2  # the bad one was tried, and failed over each time


def test_unbuffered_response_cut_mid_body_aborts_the_client(proxy: Any, raw_upstream: Any) -> None:
    raw = raw_upstream(short_body)
    app = Buffer(
        Forward(raw.url), retry="IsNetworkError() && Attempts() < 3", buffer_response=False
    )
    reply = raw_request(proxy(app), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until="close")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100" in head
    assert body == b"hello"  # truncated, visibly: never padded to 100 bytes
    assert raw.connections == 1  # the head went out: no retry


def test_unbuffered_response_failing_before_its_first_byte_is_502(
    proxy: Any, raw_upstream: Any
) -> None:
    raw = raw_upstream(head_only)
    app = Buffer(Forward(raw.url), buffer_response=False)
    r = HTTP.request("GET", proxy(app) + "/")
    assert (r.status, r.data) == (502, CUT)


def test_body_iterator_failing_under_buffer_is_retried(proxy: Any) -> None:
    calls = []

    def flaky(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        calls.append(environ["oxypy.attempt"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        if len(calls) == 1:
            yield b"par"
            raise UpstreamProtocolError("upstream closed the connection mid-body")
        yield b"whole"

    # Buffered (max_response_body_bytes): a body failing mid-way is retried.
    # Updated for issue 14: streaming, the client would get "par" and a cut.
    app = Buffer(flaky, retry="IsNetworkError() && Attempts() < 3", max_response_body_bytes=MiB)
    r = HTTP.request("GET", proxy(app) + "/")
    assert (r.status, r.data) == (200, b"whole")
    assert calls == [1, 2]


def test_head_then_close_is_retried_while_streaming(
    proxy: Any, pywsgi: Any, raw_upstream: Any
) -> None:
    """Streaming Buffer reads the first body bytes before deciding: an upstream
    that sends a head and closes before any byte is still failed over."""
    raw = raw_upstream(head_only)
    good = pywsgi(good_app)
    app = Buffer(RoundRobin(Forward(), [raw.url, good]), retry="IsNetworkError() && Attempts() < 3")
    url = proxy(app)
    for _ in range(4):
        r = HTTP.request("GET", url + "/")
        assert (r.status, r.data) == (200, b"good")
    assert raw.connections >= 2


# -- client aborts never count against an upstream: outlier detection, retries ------


def _abort_uploads(
    url: str, count: int, in_flight: Callable[[], int], arrived: Callable[[], int]
) -> None:
    """``count`` clients send half of a 1 MiB upload; once all reached the upstream, reset."""
    clients = []
    for _ in range(count):
        sock = socket.create_connection(host_port(url), timeout=10)
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % MiB)
        sock.sendall(b"x" * (MiB // 2))
        clients.append(sock)
    wait_for(lambda: in_flight() == count and arrived() == count)
    for sock in clients:
        reset(sock)
    wait_for(lambda: in_flight() == 0)


def reading_app(arrived: list[str]) -> Callable[..., list[bytes]]:
    """An upstream that reads the whole upload; ``arrived`` records each request."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        arrived.append(environ["REQUEST_METHOD"])
        try:
            environ["wsgi.input"].read()
        except OSError:
            pass
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    return app


def test_outlier_detection_ignores_aborting_clients(proxy: Any, pywsgi: Any) -> None:
    events: list[tuple[str, str]] = []
    arrived: list[str] = []
    first, second = pywsgi(reading_app(arrived)), pywsgi(reading_app(arrived))
    slots = MemoryConnStore()
    lb = RoundRobin(
        Forward(),
        [first, second],
        outlier_detection=OutlierDetection(consecutive_errors=2),
        on_change=lambda url, event: events.append((url, event)),
    )
    url = proxy(ConnLimit(lb, max_conns=64, store=slots))
    _abort_uploads(url, 6, lambda: slots.in_flight("127.0.0.1"), lambda: len(arrived))
    assert [e for e in events if e[1] == "ejected"] == []
    for _ in range(4):
        assert HTTP.request("GET", url + "/").status == 200

    # The same detector does eject a server that really fails.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    lb.upsert_server(dead_url)
    for _ in range(6):
        HTTP.request("GET", url + "/")
    assert (dead_url, "ejected") in events
    assert [e for e in events if e[1] == "ejected"] == [(dead_url, "ejected")]


def test_buffer_never_retries_for_a_client_that_left(proxy: Any, pywsgi: Any) -> None:
    seen: list[str] = []
    upstream = pywsgi(reading_app(seen))
    slots = MemoryConnStore()
    app = ConnLimit(
        Buffer(Forward(upstream), retry="Attempts() < 5", buffer_request=False),
        max_conns=64,
        store=slots,
    )
    url = proxy(app)
    _abort_uploads(url, 3, lambda: slots.in_flight("127.0.0.1"), lambda: len(seen))
    wait_for(lambda: len(slots) == 0)
    assert len(seen) == 3  # one upstream request each: never sent again
    assert HTTP.request("GET", url + "/").status == 200


def test_event_stream_failing_before_its_first_byte_is_502(proxy: Any, raw_upstream: Any) -> None:
    def sse_dies(sock: socket.socket, data: bytes) -> None:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

    raw = raw_upstream(sse_dies)
    app = Buffer(Forward(raw.url), retry="IsNetworkError() && Attempts() < 3")
    r = HTTP.request("GET", proxy(app) + "/")
    assert (r.status, r.data) == (502, CUT)
    assert raw.connections == 1  # the stream's head was handed on: never retried


def test_event_stream_failing_mid_stream_aborts_the_client(proxy: Any, raw_upstream: Any) -> None:
    def sse_event_then_dies(sock: socket.socket, data: bytes) -> None:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: hi\n\r\n"
        )

    raw = raw_upstream(sse_event_then_dies)
    app = Buffer(Forward(raw.url), retry="IsNetworkError() && Attempts() < 3")
    reply = raw_request(proxy(app), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until="close")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" in head.lower()
    assert body == b"9\r\ndata: hi\n\r\n"  # no terminating chunk: visibly cut


def test_forward_alone_answers_a_failure_before_the_first_byte(
    proxy: Any, raw_upstream: Any
) -> None:
    lines: list[str] = []
    url = proxy(Trace(Forward(raw_upstream(head_only).url), sink=lines.append))
    r = HTTP.request("GET", url + "/")
    assert (r.status, r.data) == (502, CUT)  # not the server's 500
    wait_for(lambda: len(lines) == 1)
    rec = json.loads(lines[0])
    assert (rec["status"], rec["error"]) == (502, "upstream_protocol_error")

    # After the first byte: the client connection is cut, never padded.
    url = proxy(Forward(raw_upstream(short_body).url))
    reply = raw_request(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until="close")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello"


def _spool_files() -> set[str]:
    """The temp files this process holds open (Buffer's spools are unlinked ones)."""
    tmp = tempfile.gettempdir()
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if path.startswith(tmp + "/"):
            found.add(f"{fd}:{path}")
    return found


def test_buffer_spool_of_an_aborted_upload_is_freed(proxy: Any, pywsgi: Any) -> None:
    arrived: list[str] = []
    slots = MemoryConnStore()
    app = ConnLimit(
        Buffer(Forward(pywsgi(reading_app(arrived))), mem_request_body_bytes=64 * 1024),
        max_conns=64,
        store=slots,
    )
    url = proxy(app)
    before = _spool_files()
    clients = []
    for _ in range(4):
        sock = socket.create_connection(host_port(url), timeout=10)
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * MiB))
        sock.sendall(b"x" * MiB)
        clients.append(sock)
    wait_for(lambda: slots.in_flight("127.0.0.1") == 4 and len(_spool_files() - before) == 4)
    for sock in clients:
        reset(sock)
    wait_for(lambda: len(slots) == 0)
    assert _spool_files() - before == set()
    assert arrived == []  # nothing half-read was ever sent upstream
