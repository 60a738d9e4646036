"""Mirror: copies go to the mirror in the background; the client never notices it."""

from __future__ import annotations

import hashlib
import json
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
import urllib3

from oxypy import ConfigurationError, Forward, Mirror
from oxypy import environ as keys

from _servers import RawUpstream, read_exact_body

HTTP = urllib3.PoolManager(retries=False, timeout=10)
BODY = bytes(range(256)) * 40  # 10 KiB


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        gevent.sleep(0.01)


def dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


class Recorder:
    """A raw mirror upstream: records each body's hash, then answers as told."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") -> None:
        self.bodies: list[str] = []
        self.answer = answer
        self.delay = 0.0
        self.release: gevent.event.Event | None = None
        self.raw = RawUpstream(self.handle)

    def handle(self, sock: socket.socket, data: bytes) -> None:
        body = read_exact_body(sock, data)
        # Only this test's requests: a stray connection from another process
        # to a reused port must not change what is recorded.
        if data.split(b" ", 2)[1].startswith(b"/upload"):
            self.bodies.append(hashlib.sha256(body).hexdigest())
        if self.release is not None:
            self.release.wait(5)
        if self.delay:
            gevent.sleep(self.delay)
        if self.answer:
            sock.sendall(self.answer)


@pytest.fixture
def recorders() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(*args: Any) -> Recorder:
        made.append(Recorder(*args))
        return made[-1]

    yield make
    for rec in made:
        if rec.release is not None:
            rec.release.set()
        rec.raw.stop()


def post(url: str, body: bytes = BODY, **kw: Any) -> tuple[urllib3.BaseHTTPResponse, float]:
    started = time.monotonic()
    resp = HTTP.request("POST", url + "/upload?x=1", body=body, **kw)
    return resp, time.monotonic() - started


def check_echo(resp: urllib3.BaseHTTPResponse, body: bytes = BODY) -> None:
    assert resp.status == 200
    doc = json.loads(resp.data)
    assert (doc["body_len"], doc["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert (doc["path"], doc["query"]) == ("/upload", "x=1")


def test_the_mirror_gets_the_exact_request_and_the_client_the_primary_answer(
    proxy: Any, echo_upstream: str, recorders: Any
) -> None:
    rec = recorders()
    mirror = Mirror(Forward(echo_upstream), rec.raw.url)
    resp, _ = post(proxy(mirror))
    check_echo(resp)
    wait_for(lambda: mirror.in_flight == 0)
    assert rec.bodies == [hashlib.sha256(BODY).hexdigest()]
    assert rec.raw.requests[0].startswith(b"POST /upload?x=1 HTTP/1.1\r\n")
    assert (mirror.mirrored, mirror.failed, mirror.dropped, mirror.too_large) == (1, 0, 0, 0)


def test_a_chunked_upload_is_read_once_for_both(
    proxy: Any, echo_upstream: str, recorders: Any
) -> None:
    rec = recorders()
    mirror = Mirror(Forward(echo_upstream), rec.raw.url)
    pieces = [BODY[:3000], BODY[3000:]]
    resp = HTTP.request("POST", proxy(mirror) + "/upload?x=1", body=iter(pieces), chunked=True)
    check_echo(resp)
    wait_for(lambda: len(rec.bodies) == 1)
    assert rec.bodies == [hashlib.sha256(BODY).hexdigest()]


@pytest.mark.parametrize("kind", ["dead", "slow", "failing", "resetting", "raising"])
def test_a_bad_mirror_changes_nothing_for_the_client(
    proxy: Any, echo_upstream: str, recorders: Any, kind: str
) -> None:
    target: Any
    if kind == "dead":
        target = dead_url()
    elif kind == "raising":

        def target(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            raise RuntimeError("mirror bug")

    else:
        rec = recorders()
        if kind == "slow":
            rec.delay = 2.0
        elif kind == "failing":
            rec.answer = b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nfail"
        else:
            rec.answer = b""  # closes without an answer
        target = rec.raw.url
    mirror = Mirror(Forward(echo_upstream), target)
    url = proxy(mirror)
    for _ in range(3):
        resp, elapsed = post(url)
        check_echo(resp)
        assert elapsed < 0.5
    assert mirror.mirrored == 3
    if kind != "slow":
        wait_for(lambda: mirror.in_flight == 0)
        assert mirror.failed == (0 if kind == "failing" else 3)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_not_copied_and_reaches_the_primary_whole(
    proxy: Any, echo_upstream: str, recorders: Any, chunked: bool
) -> None:
    rec = recorders()
    mirror = Mirror(Forward(echo_upstream), rec.raw.url, max_body_bytes=len(BODY) - 1)
    url = proxy(mirror)
    if chunked:
        parts = [BODY[i : i + 1000] for i in range(0, len(BODY), 1000)]
        resp = HTTP.request("POST", url + "/upload?x=1", body=iter(parts), chunked=True)
    else:
        resp, _ = post(url)
    check_echo(resp)
    small, _ = post(url, BODY[:-1])  # exactly the limit: copied
    check_echo(small, BODY[:-1])
    wait_for(lambda: mirror.in_flight == 0)
    assert (mirror.too_large, mirror.mirrored) == (1, 1)
    assert rec.bodies == [hashlib.sha256(BODY[:-1]).hexdigest()]


def test_without_mirror_body_the_copy_has_none(
    proxy: Any, echo_upstream: str, recorders: Any
) -> None:
    rec = recorders()
    mirror = Mirror(Forward(echo_upstream), rec.raw.url, mirror_body=False)
    resp, _ = post(proxy(mirror))
    check_echo(resp)
    wait_for(lambda: len(rec.bodies) == 1)
    assert rec.bodies == [hashlib.sha256(b"").hexdigest()]
    assert b"\r\nContent-Length: 0\r\n" in rec.raw.requests[0]


def test_copies_beyond_max_in_flight_are_dropped(
    proxy: Any, echo_upstream: str, recorders: Any
) -> None:
    rec = recorders()
    rec.release = gevent.event.Event()
    mirror = Mirror(Forward(echo_upstream), rec.raw.url, max_in_flight=2)
    url = proxy(mirror)
    for _ in range(5):
        resp, elapsed = post(url)
        check_echo(resp)
        assert elapsed < 0.5
    assert (mirror.mirrored, mirror.dropped, mirror.in_flight) == (2, 3, 2)
    rec.release.set()
    wait_for(lambda: mirror.in_flight == 0)
    resp, _ = post(url)
    check_echo(resp)
    assert (mirror.mirrored, mirror.dropped) == (3, 3)


def test_sampling_follows_the_seeded_rng(proxy: Any, echo_upstream: str) -> None:
    paths: list[str] = []

    def counting(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"].startswith("/s/"):
            paths.append(environ["PATH_INFO"])
        assert keys.EXCHANGES not in environ and keys.TARGET not in environ
        start_response("204 No Content", [])
        return []

    mirror = Mirror(Forward(echo_upstream), counting, percent=30.0, rng=random.Random(7))
    url = proxy(mirror)
    for i in range(60):
        assert HTTP.request("GET", f"{url}/s/{i}").status == 200
    expected_rng = random.Random(7)
    expected = [f"/s/{i}" for i in range(60) if expected_rng.random() * 100 < 30.0]
    wait_for(lambda: mirror.in_flight == 0)
    assert paths == expected
    assert mirror.mirrored == len(expected) == 22


@pytest.mark.parametrize(
    "kwargs",
    [
        {"percent": 101},
        {"percent": float("nan")},
        {"max_body_bytes": -1},
        {"max_in_flight": 0},
        {"compare_body_bytes": -1},
        {"compare_body_bytes": 1.5},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Mirror(Forward(), "http://127.0.0.1:1", **kwargs)


def test_a_bad_mirror_url_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        Mirror(Forward(), "ftp://nowhere")


# -- compare mode -------------------------------------------------------------------


def answering(answer: bytes) -> RawUpstream:
    """A raw upstream giving every request the same bytes."""

    def handler(sock: socket.socket, data: bytes) -> None:
        read_exact_body(sock, data)
        sock.sendall(answer)

    return RawUpstream(handler)


def response(status: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def short_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


@pytest.fixture
def upstreams() -> Iterator[Callable[[bytes], RawUpstream]]:
    made: list[RawUpstream] = []

    def make(answer: bytes) -> RawUpstream:
        made.append(answering(answer))
        return made[-1]

    yield make
    for up in made:
        up.stop()


@pytest.mark.parametrize(
    ("mirror_status", "mirror_body", "differs"),
    [
        ("200 OK", b"hello", False),
        ("500 Oops", b"hello", True),
        ("200 OK", b"hellO", True),  # same length, another body
        ("200 OK", b"hello!", True),
    ],
    ids=["same", "status", "body", "length"],
)
def test_compare_logs_one_line_per_difference(
    proxy: Any,
    upstreams: Any,
    caplog: pytest.LogCaptureFixture,
    mirror_status: str,
    mirror_body: bytes,
    differs: bool,
) -> None:
    primary = upstreams(response("200 OK", b"hello"))
    copy = upstreams(response(mirror_status, mirror_body))
    mirror = Mirror(Forward(primary.url), copy.url, compare=True)
    with caplog.at_level("WARNING", logger="oxypy.mirror"):
        resp = HTTP.request("GET", proxy(mirror) + "/t/a?secret=1")
        assert (resp.status, resp.data) == (200, b"hello")
        wait_for(lambda: mirror.compared == 1)
    assert (mirror.compared, mirror.differed, mirror.failed) == (1, int(differs), 0)
    lines = [r for r in caplog.records if r.name == "oxypy.mirror"]
    if not differs:
        assert lines == []
        return
    (line,) = lines
    code = mirror_status[:3]
    assert line.getMessage() == (
        f"mirror differs: GET /t/a: status 200 vs {code}, body 5 bytes sha256 "
        f"{short_hash(b'hello')} vs {len(mirror_body)} bytes sha256 {short_hash(mirror_body)}"
    )
    fields = {k: getattr(line, k) for k in ("method", "path", "primary_status", "mirror_status")}
    assert fields == {
        "method": "GET",
        "path": "/t/a",
        "primary_status": "200",
        "mirror_status": code,
    }
    assert (line.primary_bytes, line.mirror_bytes) == (5, len(mirror_body))  # type: ignore[attr-defined]
    assert (line.primary_sha256, line.mirror_sha256) == (  # type: ignore[attr-defined]
        short_hash(b"hello"),
        short_hash(mirror_body),
    )


def test_compare_with_a_slow_mirror_never_delays_the_client(
    proxy: Any, upstreams: Any, recorders: Any, caplog: pytest.LogCaptureFixture
) -> None:
    primary = upstreams(response("200 OK", b"hello"))
    rec = recorders(response("201 Created", b"hello"))
    rec.release = gevent.event.Event()
    mirror = Mirror(Forward(primary.url), rec.raw.url, compare=True)
    with caplog.at_level("WARNING", logger="oxypy.mirror"):
        started = time.monotonic()
        resp = HTTP.request("GET", proxy(mirror) + "/t/slow")
        assert (resp.status, resp.data) == (200, b"hello")
        assert time.monotonic() - started < 0.5
        assert mirror.compared == 0  # the copy has not answered: nothing compared yet
        rec.release.set()
        wait_for(lambda: mirror.compared == 1)
    assert mirror.differed == 1
    (line,) = [r for r in caplog.records if r.name == "oxypy.mirror"]
    assert (line.primary_status, line.mirror_status) == ("200", "201")  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["dead", "raising"])
def test_compare_with_a_failing_mirror(
    proxy: Any, upstreams: Any, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    primary = upstreams(response("200 OK", b"hello"))
    target: Any = dead_url()
    if kind == "raising":

        def target(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            raise RuntimeError("mirror bug")

    mirror = Mirror(Forward(primary.url), target, compare=True)
    with caplog.at_level("WARNING", logger="oxypy.mirror"):
        started = time.monotonic()
        resp = HTTP.request("GET", proxy(mirror) + "/t/f")
        assert (resp.status, resp.data) == (200, b"hello")
        assert time.monotonic() - started < 0.5
        wait_for(lambda: mirror.in_flight == 0)
    lines = [r for r in caplog.records if r.name == "oxypy.mirror"]
    assert mirror.failed == 1
    if kind == "dead":
        # Forward answered the copy 502: an answer, compared as such.
        assert (mirror.compared, mirror.differed) == (1, 1)
        assert [(r.primary_status, r.mirror_status) for r in lines] == [("200", "502")]  # type: ignore[attr-defined]
    else:
        assert (mirror.compared, mirror.differed, lines) == (0, 0, [])  # no answer to compare


def test_compare_hashes_at_most_compare_body_bytes(proxy: Any, upstreams: Any) -> None:
    primary = upstreams(response("200 OK", b"abcdef-one"))
    copy = upstreams(response("200 OK", b"abcdef-two"))
    mirror = Mirror(Forward(primary.url), copy.url, compare=True, compare_body_bytes=6)
    url = proxy(mirror)
    assert HTTP.request("GET", url + "/t/1").data == b"abcdef-one"
    wait_for(lambda: mirror.compared == 1)
    assert mirror.differed == 0  # the first 6 bytes and the lengths agree


def test_compare_of_an_in_process_list_body(proxy: Any, upstreams: Any) -> None:
    def primary(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hel", b"lo"]

    copy = upstreams(response("200 OK", b"hello"))
    mirror = Mirror(primary, copy.url, compare=True)
    resp = HTTP.request("GET", proxy(mirror) + "/t/list")
    assert (resp.status, resp.data, resp.headers["Content-Length"]) == (200, b"hello", "5")
    wait_for(lambda: mirror.compared == 1)
    assert mirror.differed == 0


def test_mirror_metrics_export_the_counts(proxy: Any, upstreams: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from oxypy import MirrorMetrics

    primary = upstreams(response("200 OK", b"hello"))
    copy = upstreams(response("200 OK", b"HELLO"))
    mirror = Mirror(Forward(primary.url), copy.url, compare=True)
    registry = CollectorRegistry()
    MirrorMetrics(registry=registry).add("candidate", mirror)
    url = proxy(mirror)
    for _ in range(2):
        assert HTTP.request("GET", url + "/t/m").data == b"hello"
    wait_for(lambda: mirror.compared == 2 and mirror.in_flight == 0)
    text = generate_latest(registry).decode()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        'oxypy_mirror_copies_total{name="candidate"} 2.0',
        'oxypy_mirror_dropped_total{name="candidate"} 0.0',
        'oxypy_mirror_too_large_total{name="candidate"} 0.0',
        'oxypy_mirror_failed_total{name="candidate"} 0.0',
        'oxypy_mirror_compared_total{name="candidate"} 2.0',
        'oxypy_mirror_differed_total{name="candidate"} 2.0',
        'oxypy_mirror_in_flight{name="candidate"} 0.0',
    ]
    with pytest.raises(ConfigurationError):
        MirrorMetrics(registry=registry).add("x", Forward())  # type: ignore[arg-type]
