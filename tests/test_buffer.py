"""Buffer: oxy's buffer and retry tests as HTTP behaviour, plus limits and replay."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import psutil
import pytest
import urllib3

from oxypy import BodyTooLarge, ConfigurationError, Forward, PredicateError, RequestError
from oxypy import environ as keys
from oxypy.buffer import RETRY_FUNCS, Attempt, Buffer, should_retry
from oxypy.predicate import compile_predicate

from _servers import RawUpstream, dead_url, raw_request, read_exact_body, wait_for

HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=20))
App = Callable[..., Any]


def text_app(
    body: bytes, status: str = "200 OK", headers: list[tuple[str, str]] | None = None
) -> App:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("CONTENT_LENGTH"):
            environ["wsgi.input"].read()
        start_response(status, list(headers or [("Content-Type", "text/plain")]))
        return [body]

    return app


def balancer(app: App, targets: list[str], seen: list[tuple[int, str]]) -> App:
    """A tiny RoundRobin stand-in: first target not yet tried, recorded in tried_targets."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        tried = environ.get(keys.TRIED_TARGETS)
        choices = [t for t in targets if tried is None or t not in tried] or targets
        target = choices[0]
        if tried is not None:
            tried.add(target)
        env = dict(environ)
        env[keys.TARGET] = target
        seen.append((env.get(keys.ATTEMPT, 0), target))
        result: Iterable[bytes] = app(env, start_response)
        return result

    return wsgi


def sink_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Reads the body in pieces (never whole) and answers its length and hash."""
    digest = hashlib.sha256()
    size = 0
    stream = environ["wsgi.input"]
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    while remaining > 0:
        piece = stream.read(min(65536, remaining))
        if not piece:
            break
        digest.update(piece)
        size += len(piece)
        remaining -= len(piece)
    out = json.dumps({"len": size, "sha": digest.hexdigest()}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [out]


# ------------------------------------------------------------------ pure logic

PRED = compile_predicate("IsNetworkError() && Attempts() < 3", RETRY_FUNCS)


@pytest.mark.parametrize(
    ("predicate", "outcome", "kwargs", "expected"),
    [
        pytest.param(PRED, Attempt(1, 502, True, "GET"), {}, True, id="network-error"),
        pytest.param(PRED, Attempt(2, 502, True, "GET"), {}, True, id="second"),
        pytest.param(PRED, Attempt(3, 502, True, "GET"), {}, False, id="predicate-cap"),
        pytest.param(PRED, Attempt(1, 502, False, "GET"), {}, False, id="upstream-502"),
        pytest.param(None, Attempt(1, 502, True, "GET"), {}, False, id="no-predicate"),
        pytest.param(
            PRED, Attempt(1, 502, True, "GET"), {"client_gone": True}, False, id="client-gone"
        ),
        pytest.param(
            PRED, Attempt(1, 502, True, "POST"), {"replayable": False}, False, id="not-replayable"
        ),
        pytest.param(PRED, Attempt(2, 502, True, "GET"), {"max_attempts": 2}, False, id="hard-cap"),
        pytest.param(
            compile_predicate("ResponseCode() == 503 && RequestMethod() == `GET`", RETRY_FUNCS),
            Attempt(5, 503, False, "GET"),
            {},
            True,
            id="code-method",
        ),
    ],
)
def test_should_retry(
    predicate: Any, outcome: Attempt, kwargs: dict[str, Any], expected: bool
) -> None:
    options = {"max_attempts": 11, "client_gone": False, "replayable": True, **kwargs}
    assert should_retry(predicate, outcome, **options) is expected


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"max_request_body_bytes": 0}, id="max-req-0"),
        pytest.param({"max_response_body_bytes": -1}, id="max-resp-neg"),
        pytest.param({"mem_request_body_bytes": -1}, id="mem-neg"),
        pytest.param({"max_attempts": 0}, id="attempts-0"),
        pytest.param({"retry_backoff": (2.0, 1.0)}, id="backoff-order"),
        pytest.param({"retry_backoff": (-1.0, 1.0)}, id="backoff-neg"),
        pytest.param({"retry": 5}, id="retry-type"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Buffer(text_app(b""), **kwargs)


def test_bad_predicate_names_column() -> None:
    with pytest.raises(PredicateError) as info:
        Buffer(text_app(b""), retry="IsNetworkError() && Bogus()")
    assert info.value.position == 20


# ------------------------------------------------------------------ over HTTP


def test_simple(proxy: Any, pywsgi: Any) -> None:
    up = pywsgi(text_app(b"hello"))
    r = HTTP.request("GET", proxy(Buffer(Forward(up))) + "/")
    assert (r.status, r.data, r.headers["Content-Length"]) == (200, b"hello", "5")


def test_chunked_request_arrives_with_content_length(proxy: Any, echo_upstream: str) -> None:
    url = proxy(Buffer(Forward(echo_upstream)))
    raw = raw_request(
        url,
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"4\r\ntest\r\n5\r\ntest1\r\n5\r\ntest2\r\n0\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 ")
    doc = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert doc["headers"]["content-length"] == "14"
    assert "transfer-encoding" not in doc["headers"]
    assert doc["body_len"] == 14
    assert doc["body_sha256"] == hashlib.sha256(b"testtest1test2").hexdigest()


def test_chunked_request_over_limit(proxy: Any, echo_upstream: str) -> None:
    url = proxy(Buffer(Forward(echo_upstream), mem_request_body_bytes=4, max_request_body_bytes=8))
    raw = raw_request(
        url,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"4\r\ntest\r\n5\r\ntest1\r\n5\r\ntest2\r\n0\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")


def test_content_length_over_limit_answers_before_reading(proxy: Any) -> None:
    calls: list[int] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        calls.append(1)
        start_response("200 OK", [])
        return [b""]

    url = proxy(Buffer(app, max_request_body_bytes=4))
    # Announce 24 bytes but send none: the 413 must come without waiting for them.
    started = time.monotonic()
    raw = raw_request(
        url, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 24\r\n\r\n", until="response"
    )
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b"request body of 24 bytes is over the limit" in raw
    assert time.monotonic() - started < 3
    assert calls == []


def test_request_body_at_limit(proxy: Any, echo_upstream: str) -> None:
    url = proxy(Buffer(Forward(echo_upstream), max_request_body_bytes=24))
    r = HTTP.request("POST", url + "/", body=b"x" * 24)
    assert r.status == 200
    assert json.loads(r.data)["body_len"] == 24
    r = HTTP.request("POST", url + "/", body=b"x" * 25)
    assert r.status == 413


def chunked_upstream(pieces: list[bytes]) -> RawUpstream:
    def handler(sock: socket.socket, data: bytes) -> None:
        out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        for piece in pieces:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
        sock.sendall(out + b"0\r\n\r\n")

    return RawUpstream(handler)


def test_chunked_response_gets_content_length(proxy: Any) -> None:
    # Updated when Buffer stopped buffering responses by default (issue 14):
    # a buffered response (max_response_body_bytes set) gets a Content-Length;
    # a streamed one keeps the upstream's chunked framing.
    up = chunked_upstream([b"test", b"test1", b"test2"])
    try:
        r = HTTP.request("GET", proxy(Buffer(Forward(up.url), max_response_body_bytes=1024)) + "/")
        assert (r.status, r.data, r.headers["Content-Length"]) == (200, b"testtest1test2", "14")
        assert "Transfer-Encoding" not in r.headers
        r = HTTP.request("GET", proxy(Buffer(Forward(up.url))) + "/")
        assert (r.status, r.data, r.headers.get("Transfer-Encoding")) == (
            200,
            b"testtest1test2",
            "chunked",
        )
        assert "Content-Length" not in r.headers
    finally:
        up.stop()


def test_empty_chunked_response(proxy: Any) -> None:
    up = chunked_upstream([])
    try:
        r = HTTP.request("GET", proxy(Buffer(Forward(up.url))) + "/")
        assert (r.status, r.data, r.headers["Content-Length"]) == (200, b"", "0")
    finally:
        up.stop()


@pytest.mark.parametrize(
    ("limit", "size", "status"),
    [
        pytest.param(4, 33, 502, id="4-33"),
        pytest.param(2000, 32769, 502, id="2000-32769"),
        pytest.param(2000, 67537, 502, id="2000-67537"),
        pytest.param(2000, 2000, 200, id="exact-2000"),
        pytest.param(65536, 65536, 200, id="exact-64k"),
        pytest.param(65536, 65537, 502, id="64k-plus-1"),
        pytest.param(131072, 131072, 200, id="exact-128k"),
        pytest.param(131072, 131073, 502, id="128k-plus-1"),
        pytest.param(131073, 131072, 200, id="128k-under"),
    ],
)
def test_response_limit_edges(proxy: Any, pywsgi: Any, limit: int, size: int, status: int) -> None:
    body = bytes(i % 251 for i in range(size))
    up = pywsgi(text_app(body))
    url = proxy(Buffer(Forward(up), max_response_body_bytes=limit, mem_response_body_bytes=1000))
    r = HTTP.request("GET", url + "/")
    assert r.status == status
    if status == 200:
        assert hashlib.sha256(r.data).digest() == hashlib.sha256(body).digest()
        assert r.headers["Content-Length"] == str(size)
    else:
        assert r.data == b"upstream response is over %d bytes\n" % limit


def test_response_limit_closes_inner_iterable(proxy: Any) -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            for _ in range(100):
                yield b"x" * 1000

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Body:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    r = HTTP.request("GET", proxy(Buffer(app, max_response_body_bytes=5000)) + "/")
    assert r.status == 502
    assert closed == [True]


def test_response_spills_to_disk(proxy: Any, pywsgi: Any) -> None:
    body = bytes(range(50))
    up = pywsgi(text_app(body))
    r = HTTP.request("GET", proxy(Buffer(Forward(up), mem_response_body_bytes=4)) + "/")
    assert (r.status, r.data) == (200, body)


def test_custom_error_handler(proxy: Any, pywsgi: Any) -> None:
    def teapot(environ: Any, start_response: Any, exc: RequestError) -> list[bytes]:
        start_response("418 I'm a teapot", [("Content-Type", "text/plain")])
        return [b"teapot: " + exc.reason.encode()]

    up = pywsgi(text_app(b"x" * 100))
    r = HTTP.request(
        "GET", proxy(Buffer(Forward(up), max_response_body_bytes=4, error_handler=teapot)) + "/"
    )
    assert r.status == 418
    assert r.data == b"teapot: upstream response is over 4 bytes"


@pytest.mark.parametrize(
    ("method", "status", "headers"),
    [
        pytest.param("GET", "304 Not Modified", [("ETag", '"a"')], id="304"),
        pytest.param("GET", "204 No Content", [], id="204"),
        pytest.param("GET", "200 OK", [("Content-Length", "0")], id="200-empty"),
        pytest.param("HEAD", "200 OK", [("Content-Length", "5")], id="head"),
    ],
)
def test_no_body(proxy: Any, pywsgi: Any, method: str, status: str, headers: Any) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(status, headers)
        return [b""]

    up = pywsgi(app)
    r = HTTP.request(method, proxy(Buffer(Forward(up))) + "/")
    assert r.status == int(status[:3])
    assert r.data == b""
    if status.startswith("304"):
        assert r.headers["ETag"] == '"a"'
    if method == "HEAD":
        assert r.headers["Content-Length"] == "5"


def test_get_and_empty_post_reach_inner_app(proxy: Any, echo_upstream: str) -> None:
    url = proxy(Buffer(Forward(echo_upstream), max_request_body_bytes=10))
    assert HTTP.request("GET", url + "/").status == 200
    r = HTTP.request("POST", url + "/", body=b"")
    assert r.status == 200
    assert json.loads(r.data)["body_len"] == 0


def test_no_start_response_is_an_error_response(proxy: Any) -> None:
    def silent(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        return [b"body without status"]

    def empty(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        return []

    for app in (silent, empty):
        for buffered in (True, False):
            url = proxy(Buffer(app, buffer_response=buffered), lint=False)
            r = HTTP.request("GET", url + "/")
            assert r.status == 502
            assert r.data == b"the wrapped application sent no response status\n"


def test_event_stream_passes_through(proxy: Any, pywsgi: Any) -> None:
    release = gevent.event.Event()

    def sse(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        yield b"data: one\n\n"
        release.wait(10)
        yield b"data: two\n\n"

    up = pywsgi(sse)
    url = proxy(Buffer(Forward(up), max_response_body_bytes=4))
    r = HTTP.request("GET", url + "/", preload_content=False)
    try:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        with gevent.Timeout(5):
            first = r.read1(64) if hasattr(r, "read1") else r.read(11)
        assert first == b"data: one\n\n"
        release.set()
        assert r.read() == b"data: two\n\n"
    finally:
        release.set()
        r.release_conn()


# ------------------------------------------------------------------ retries


def test_retry_success_first_try(proxy: Any, pywsgi: Any) -> None:
    live = pywsgi(text_app(b"hello"))
    seen: list[tuple[int, str]] = []
    app = Buffer(balancer(Forward(), [live], seen), retry="IsNetworkError() && Attempts() <= 2")
    r = HTTP.request("GET", proxy(app) + "/")
    assert (r.status, r.data) == (200, b"hello")
    assert seen == [(1, live)]


def test_post_replayed_to_second_server(proxy: Any, pywsgi: Any) -> None:
    dead = dead_url()
    live = pywsgi(sink_app)
    seen: list[tuple[int, str]] = []
    app = Buffer(
        balancer(Forward(), [dead, live], seen),
        retry="IsNetworkError() && Attempts() < 2",
        mem_request_body_bytes=1,
    )
    body = b"some request parameters" + bytes(range(256)) * 1000
    r = HTTP.request("POST", proxy(app) + "/", body=body)
    assert r.status == 200
    assert json.loads(r.data) == {"len": len(body), "sha": hashlib.sha256(body).hexdigest()}
    assert seen == [(1, dead), (2, live)]


def test_retry_exceeds_attempts(proxy: Any, pywsgi: Any) -> None:
    live = pywsgi(text_app(b"hello"))
    deads = [dead_url(), dead_url(), dead_url()]
    seen: list[tuple[int, str]] = []
    app = Buffer(
        balancer(Forward(), [*deads, live], seen), retry="IsNetworkError() && Attempts() <= 2"
    )
    r = HTTP.request("GET", proxy(app) + "/")
    assert r.status == 502
    assert seen == [(1, deads[0]), (2, deads[1]), (3, deads[2])]


def test_hard_cap_is_eleven_calls(proxy: Any) -> None:
    seen: list[tuple[int, str]] = []
    app = Buffer(balancer(Forward(), [dead_url()], seen), retry="IsNetworkError()")
    assert HTTP.request("GET", proxy(app) + "/").status == 502
    assert [a for a, _ in seen] == list(range(1, 12))


def test_upstream_502_is_not_a_network_error(proxy: Any, pywsgi: Any) -> None:
    up = pywsgi(text_app(b"bad", status="502 Bad Gateway"))
    seen: list[tuple[int, str]] = []
    app = Buffer(balancer(Forward(), [up], seen), retry="IsNetworkError() && Attempts() < 3")
    r = HTTP.request("GET", proxy(app) + "/")
    assert (r.status, r.data) == (502, b"bad")
    assert len(seen) == 1
    seen.clear()
    app = Buffer(balancer(Forward(), [up], seen), retry="ResponseCode() == 502 && Attempts() < 3")
    assert HTTP.request("GET", proxy(app) + "/").status == 502
    assert len(seen) == 3


def test_status_fallback_without_exchanges(proxy: Any) -> None:
    attempts: list[int] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        attempts.append(environ[keys.ATTEMPT])
        if len(attempts) < 2:
            start_response("504 Gateway Timeout", [])
            return [b""]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    r = HTTP.request("GET", proxy(Buffer(app, retry="IsNetworkError() && Attempts() < 5")) + "/")
    assert (r.status, r.data) == (200, b"ok")
    assert attempts == [1, 2]


def test_unbuffered_body_is_retried_only_when_never_sent(proxy: Any, echo_upstream: str) -> None:
    seen: list[tuple[int, str]] = []
    # Refused: no byte reached the upstream, the body is still unread: retried.
    app = Buffer(
        balancer(Forward(), [dead_url(), echo_upstream], seen),
        retry="IsNetworkError()",
        buffer_request=False,
    )
    r = HTTP.request("POST", proxy(app) + "/", body=b"payload")
    doc = json.loads(r.data)
    assert r.status == 200 and doc["body_sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert [t for _, t in seen] == [seen[0][1], echo_upstream]

    # Reset after reading the body: the body is gone, never sent twice.
    def take_and_reset(sock: socket.socket, data: bytes) -> None:
        read_exact_body(sock, data)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    raw = RawUpstream(take_and_reset)
    try:
        seen.clear()
        app = Buffer(
            balancer(Forward(), [raw.url, echo_upstream], seen),
            retry="IsNetworkError()",
            buffer_request=False,
        )
        assert HTTP.request("POST", proxy(app) + "/", body=b"payload").status == 502
        assert len(seen) == 1 and raw.connections == 1
    finally:
        raw.stop()
    seen.clear()
    app = Buffer(balancer(Forward(), [dead_url()], seen), retry="IsNetworkError()")
    assert HTTP.request("GET", proxy(app) + "/").status == 502
    assert len(seen) == 11


def test_unbuffered_response_retries_on_head(proxy: Any, pywsgi: Any) -> None:
    live = pywsgi(text_app(b"streamed"))
    seen: list[tuple[int, str]] = []
    app = Buffer(
        balancer(Forward(), [dead_url(), live], seen),
        retry="IsNetworkError() && Attempts() < 2",
        buffer_response=False,
        max_response_body_bytes=2,
    )
    r = HTTP.request("GET", proxy(app) + "/")
    assert (r.status, r.data) == (200, b"streamed")
    assert len(seen) == 2


def test_environ_per_attempt(proxy: Any) -> None:
    records: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        tried = environ[keys.TRIED_TARGETS]
        records.append(
            {
                "attempt": environ[keys.ATTEMPT],
                "tried": set(tried),
                "body": environ["wsgi.input"].read(),
                "cl": environ.get("CONTENT_LENGTH"),
                "leak": environ.get("x.leak"),
            }
        )
        tried.add(f"t{environ[keys.ATTEMPT]}")
        environ["x.leak"] = True
        start_response("503 Service Unavailable", [])
        return [b""]

    url = proxy(Buffer(app, retry="ResponseCode() == 503 && Attempts() < 3"))
    r = HTTP.request("PUT", url + "/", body=b"abc")
    assert r.status == 503
    assert records == [
        {"attempt": 1, "tried": set(), "body": b"abc", "cl": "3", "leak": None},
        {"attempt": 2, "tried": {"t1"}, "body": b"abc", "cl": "3", "leak": None},
        {"attempt": 3, "tried": {"t1", "t2"}, "body": b"abc", "cl": "3", "leak": None},
    ]


def test_backoff_uses_injected_sleep_and_rng(proxy: Any) -> None:
    slept: list[float] = []
    seen: list[tuple[int, str]] = []
    app = Buffer(
        balancer(Forward(), [dead_url()], seen),
        retry="IsNetworkError() && Attempts() < 4",
        retry_backoff=(0.01, 0.02),
        rng=random.Random(7),
        sleep=slept.append,
    )
    global_state = random.getstate()
    assert HTTP.request("GET", proxy(app) + "/").status == 502
    assert random.getstate() == global_state  # the global random module is never used
    assert len(seen) == 4
    jitter = random.Random(7)  # full jitter: uniform(0, min(max, base * 2**(n-1)))
    assert slept == [jitter.uniform(0.0, cap) for cap in (0.01, 0.02, 0.02)]


def test_skip(proxy: Any, echo_upstream: str) -> None:
    url = proxy(Buffer(Forward(echo_upstream), max_request_body_bytes=2, skip=lambda e: True))
    r = HTTP.request("POST", url + "/", body=b"12345")
    assert r.status == 200
    assert json.loads(r.data)["body_len"] == 5


def test_client_disconnect_stops_retry_loop(proxy: Any) -> None:
    seen: list[tuple[int, str]] = []
    in_backoff = gevent.event.Event()
    client_closed = gevent.event.Event()
    finished = gevent.event.Event()

    def sleep(seconds: float) -> None:
        in_backoff.set()
        assert client_closed.wait(10)
        gevent.sleep(seconds)

    buffer = Buffer(
        balancer(Forward(), [dead_url()], seen),
        retry="IsNetworkError()",
        retry_backoff=(0.3, 0.3),
        sleep=sleep,
    )

    def watched(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return buffer(environ, start_response)
        finally:
            finished.set()  # the retry loop runs inside the call

    url = proxy(watched)
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert in_backoff.wait(10)  # the first attempt failed; waiting before the second
    sock.close()
    client_closed.set()
    assert finished.wait(10)
    assert len(seen) == 1  # never retried for a client that has gone (else 11 attempts)


# ------------------------------------------------------------------ big upload


@pytest.mark.slow
def test_50_mib_upload_spills_to_disk(proxy: Any, pywsgi: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    spilled_at_upstream: list[set[str]] = []

    def spool_files() -> set[str]:
        """This process's open files in the spool dir (anonymous: only /proc shows them)."""
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if path.startswith(f"{spool}{os.sep}"):
                found.add(f"{fd}:{path}")
        return found

    def upstream(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        spilled_at_upstream.append(spool_files())  # the request body is in flight now
        return sink_app(environ, start_response)

    live = pywsgi(upstream)
    buffer = Buffer(Forward(live), retry="IsNetworkError() && Attempts() < 2", spool_dir=spool)
    url = proxy(buffer)
    block = bytes(range(256)) * 256  # 64 KiB
    count = 800  # 50 MiB
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(block)
    gc.collect()
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    peak = [rss_before]
    done = gevent.event.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            gevent.sleep(0.02)

    sampler = gevent.spawn(sample)
    try:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(block) * count)
            )
            for _ in range(count):
                sock.sendall(block)
            data = b""
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
    finally:
        done.set()
        sampler.join(2)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body) == {"len": len(block) * count, "sha": expected.hexdigest()}
    assert peak[0] - rss_before < 10 * 1024 * 1024, (peak[0] - rss_before) / 2**20
    assert len(spilled_at_upstream) == 1 and len(spilled_at_upstream[0]) == 1, spilled_at_upstream
    wait_for(lambda: not spool_files())  # closed with the response
    assert os.listdir(spool) == []  # anonymous files: never a name on disk


def test_spool_dir_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="spool_dir"):
        Buffer(text_app(b""), spool_dir=tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="spool_dir"):
        Buffer(text_app(b""), spool_dir=tmp_path / "file")
    with pytest.raises(ConfigurationError, match="spool_dir"):
        Buffer(text_app(b""), spool_dir=3)  # type: ignore[arg-type]
    assert Buffer(text_app(b""), spool_dir=str(tmp_path)).spool_dir == str(tmp_path)


def test_body_too_large_is_exported() -> None:
    assert BodyTooLarge.status == 413
    _ = read_exact_body
