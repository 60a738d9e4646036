"""CircuitBreaker: oxy's cbreaker tests as HTTP behaviour, plus real failing upstreams."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast
from urllib.parse import parse_qs

import gevent
import gevent.event
import pytest
import urllib3
from werkzeug.test import create_environ

from oxypy import CircuitOpen, ConfigurationError, Forward, PredicateError, UpstreamProtocolError
from oxypy.cbreaker import (
    TRIGGER_FUNCTIONS,
    CircuitBreaker,
    State,
    Transition,
    _RatioController,
)
from oxypy.fallback import RedirectFallback, ResponseFallback, Webhook
from oxypy.predicate import compile_predicate
from oxypy.rolling import RoundTripMetrics

from _servers import RawUpstream, raw_request

TRIGGER = "NetworkErrorRatio() > 0.5"


class FakeClock:
    def __init__(self, now: float = 5_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def answer(status: str, body: bytes = b"") -> Callable[..., list[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


HTTP = urllib3.PoolManager(retries=False, timeout=10)


def get(url: str, method: str = "GET") -> urllib3.BaseHTTPResponse:
    return HTTP.request(method, url, redirect=False)


def preload(metrics: RoundTripMetrics, ratio: float, n: int = 100) -> None:
    """oxy's statsNetErrors: ``ratio`` of n requests were network errors."""
    for i in range(n):
        bad = i < int(ratio * n)
        metrics.record(502 if bad else 200, 0.0, bad)


def ignore_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None, /) -> Any:
    return None


def state_of(cb: CircuitBreaker) -> State:
    """The state, read through a call so the type checker does not narrow it."""
    return cb.state


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for ``condition``: the server closes the body just after the client read it."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.005)


def refused_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


# --- pure logic ------------------------------------------------------------------


def test_ratio_controller_ramp_up() -> None:
    # oxy Test_ratioController_rampUp: the admitted fraction tracks 0.5·t/T.
    rc = _RatioController(0.0, 10.0)
    allowed = 0
    for step in range(1, 10_001):
        t = step / 1000
        if rc.allow(t):
            allowed += 1
        assert abs(allowed / step - 0.5 * t / 10.0) <= 0.05
    assert 0.45 <= allowed / 10_000 <= 0.5


@pytest.mark.parametrize(
    ("expression", "records", "tripped"),
    [
        pytest.param(TRIGGER, [(502, 0.0, True)] * 6 + [(200, 0.0, False)] * 4, True, id="net60"),
        pytest.param(
            "NetworkErrorRatio() < 0.5",
            [(502, 0.0, True)] * 6 + [(200, 0.0, False)] * 4,
            False,
            id="net60-lt",
        ),
        pytest.param("LatencyAtQuantileMS(50.0) > 50", [(200, 0.051, False)], True, id="lat51"),
        pytest.param("LatencyAtQuantileMS(50.0) < 50", [(200, 0.051, False)], False, id="lat-lt"),
        pytest.param("LatencyAtQuantileMS(40.0) > 50", [(200, 0.0, False)], False, id="lat0"),
        pytest.param(
            "ResponseCodeRatio(500, 600, 0, 600) > 0.5",
            [(200, 0.0, False)] * 5 + [(500, 0.0, False)] * 6,
            True,
            id="codes-6of11",
        ),
        pytest.param(
            "ResponseCodeRatio(500, 600, 0, 600) > 0.5",
            [(200, 0.0, False)] * 5 + [(500, 0.0, False)] * 4,
            False,
            id="codes-4of9",
        ),
        pytest.param(
            "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 20",
            [(502, 0.0, True)] * 19,
            False,
            id="threshold-19",
        ),
        pytest.param(
            "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 20",
            [(502, 0.0, True)] * 20,
            True,
            id="threshold-20",
        ),
        pytest.param("NetworkErrorRatio() > 1", [(502, 0.0, True)], False, id="int-literal"),
    ],
)
def test_trigger_table(
    expression: str, records: list[tuple[int, float, bool]], tripped: bool
) -> None:
    metrics = RoundTripMetrics(clock=FakeClock())
    for status, latency, net in records:
        metrics.record(status, latency, net)
    assert compile_predicate(expression, TRIGGER_FUNCTIONS)(metrics) is tripped


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"expression": "NetworkErrorRatio( > 0.5"}, PredicateError, id="syntax"),
        pytest.param({"expression": "Attempts() > 1"}, PredicateError, id="unknown-func"),
        pytest.param({"expression": "LatencyAtQuantileMS() > 1"}, PredicateError, id="arity"),
        pytest.param({"fallback_duration": -1}, ConfigurationError, id="neg-fallback"),
        pytest.param({"recovery_duration": float("inf")}, ConfigurationError, id="inf-recovery"),
        pytest.param({"check_period": "1"}, ConfigurationError, id="str-check"),
        pytest.param({"fallback": "http://x"}, ConfigurationError, id="fallback-not-app"),
        pytest.param({"on_trip": 3}, ConfigurationError, id="on-trip-not-callable"),
        pytest.param({"metrics": {}}, ConfigurationError, id="bad-metrics"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any], error: type[Exception]) -> None:
    options = dict(kwargs)  # the parameter dict is shared by every repeat of this case
    expression = options.pop("expression", TRIGGER)
    with pytest.raises(error):
        CircuitBreaker(hello, expression, **options)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: RedirectFallback("localhost:5000"), id="redirect-no-scheme"),
        pytest.param(lambda: RedirectFallback("http://a b"), id="redirect-space"),
        pytest.param(lambda: ResponseFallback(99), id="status-low"),
        pytest.param(lambda: ResponseFallback(200, body=cast(Any, 5)), id="body-type"),
        pytest.param(lambda: Webhook("ftp://x/"), id="webhook-scheme"),
        pytest.param(lambda: Webhook("http://x/", method="PO ST"), id="webhook-method"),
        pytest.param(lambda: Webhook("http://x/", body=b"a", form={"a": "b"}), id="body+form"),
        pytest.param(lambda: Webhook("http://x/", timeout=0), id="webhook-timeout"),
        pytest.param(lambda: Webhook("http://x/", headers={"A": "b\r\nC: d"}), id="hdr-inject"),
    ],
)
def test_fallback_and_webhook_validation(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError):
        make()


def test_outcome_is_recorded_when_the_body_is_closed() -> None:
    clock = FakeClock()

    def streamer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        clock.advance(0.25)  # time to the response head: the latency
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"one"
        clock.advance(60.0)  # a long body does not make the upstream slow
        yield b"two"

    cb = CircuitBreaker(streamer, TRIGGER, clock=clock)
    body = cb(create_environ("/"), ignore_start)
    chunks = iter(body)
    assert next(chunks) == b"one"
    assert cb.metrics.total_count() == 0
    assert next(chunks) == b"two"
    assert cb.metrics.total_count() == 0
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]
    assert cb.metrics.total_count() == 1  # counted at close, 60 s later
    assert 250 <= cb.metrics.latency_at_quantile_ms(100) <= 252


def test_app_raising_is_a_500_not_a_network_error_and_reraises() -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise RuntimeError("bug")

    counting = CircuitBreaker(broken, "RequestThreshold() > 99", clock=FakeClock())
    with pytest.raises(RuntimeError):
        counting(create_environ("/"), ignore_start)
    assert counting.metrics.status_code_counts() == {500: 1}
    assert counting.metrics.network_error_count() == 0

    cb = CircuitBreaker(broken, TRIGGER, clock=FakeClock(), check_period=0)
    with pytest.raises(RuntimeError):
        cb(create_environ("/"), ignore_start)
    assert cb.state is State.STANDBY  # a bug is not an unreachable upstream
    by_code = CircuitBreaker(broken, "ResponseCodeRatio(500, 600, 0, 600) > 0.5", check_period=0)
    with pytest.raises(RuntimeError):
        by_code(create_environ("/"), ignore_start)
    assert by_code.state is State.TRIPPED


def test_callbacks_get_transitions_and_a_raising_callback_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    seen: list[Transition] = []

    def boom(t: Transition) -> None:
        seen.append(t)
        raise ValueError("callback bug")

    cb = CircuitBreaker(
        hello, TRIGGER, clock=clock, check_period=0, on_trip=boom, on_standby=seen.append
    )
    preload(cb.metrics, 0.6)
    with caplog.at_level(logging.INFO, logger="oxypy.cbreaker"):
        status: list[str] = []
        start: Any = lambda s, h, e=None: status.append(s)  # noqa: E731
        body = cb(create_environ("/"), start)
        assert b"".join(body) == b"hello"
        assert cb.state is State.STANDBY  # recorded only on close()
        body.close()  # type: ignore[attr-defined]
        assert status == ["200 OK"]
        assert str(cb.state) == "tripped"
        clock.advance(3600)  # long idle: both time-driven edges apply on one read
        assert state_of(cb) is State.STANDBY
    assert [(t.old, t.new) for t in seen] == [
        (State.STANDBY, State.TRIPPED),
        (State.RECOVERING, State.STANDBY),
    ]
    assert seen[0].breaker is cb and seen[1].at == seen[0].at + 20.0
    messages = [r.getMessage() for r in caplog.records]
    assert any("tripped for 10s: NetworkErrorRatio() > 0.5" in m for m in messages)
    assert any("recovering" in m for m in messages)
    assert any("back to standby" in m for m in messages)
    assert any("callback" in r.getMessage() and r.exc_info for r in caplog.records)


# --- oxy's cbreaker_test.go over HTTP ---------------------------------------------


def test_standby_cycle(proxy: Any) -> None:
    cb = CircuitBreaker(hello, TRIGGER)
    url = proxy(cb)
    r = get(url)
    assert (r.status, r.data) == (200, b"hello")
    assert state_of(cb) is State.STANDBY
    assert cb.metrics.total_count() == 1


def test_full_cycle_with_rising_recovery_ramp(proxy: Any) -> None:
    clock = FakeClock()
    cb = CircuitBreaker(hello, TRIGGER, clock=clock)
    url = proxy(cb)
    assert get(url).status == 200

    preload(cb.metrics, 0.6)
    clock.advance(0.101)
    assert get(url).status == 200  # this response is served; its check trips
    assert cb.state is State.TRIPPED
    assert cb.metrics.total_count() == 0  # reset at trip

    clock.advance(9)
    r = get(url)
    assert (r.status, r.data) == (503, b"circuit breaker open\n")
    assert r.headers["Retry-After"] == "1"
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert cb.state is State.TRIPPED

    clock.advance(1.001)
    assert get(url).status == 503  # the ramp starts at zero
    assert state_of(cb) is State.RECOVERING

    admitted: list[int] = []
    for _ in range(3):  # at 2, 5 and 8 s into the 10 s recovery
        clock.advance(3 if admitted else 2)
        statuses = [get(url).status for _ in range(40)]
        assert set(statuses) <= {200, 503}
        admitted.append(statuses.count(200))
    assert 1 <= admitted[0] < admitted[1] < admitted[2] < 40, admitted
    assert state_of(cb) is State.RECOVERING

    clock.advance(2.0)
    r = get(url)
    assert (r.status, r.data) == (200, b"hello")
    assert state_of(cb) is State.STANDBY


@pytest.mark.parametrize(
    ("fallback", "path", "location"),
    [
        pytest.param(
            RedirectFallback("http://localhost:5000"),
            "/somePath?a=1",
            "http://localhost:5000",
            id="plain",
        ),
        pytest.param(
            RedirectFallback("http://localhost:6000", preserve_path=True),
            "/somePath",
            "http://localhost:6000/somePath",
            id="with-path",
        ),
        pytest.param(
            RedirectFallback("http://localhost:6000/", preserve_path=True),
            "/some%20Path/x?a=1&b=%2F",
            "http://localhost:6000/some%20Path/x?a=1&b=%2F",
            id="with-path-and-query",
        ),
        pytest.param(
            RedirectFallback("https://status.example/base?src=cb", preserve_path=True),
            "/p?q=2",
            "https://status.example/base/p?src=cb&q=2",
            id="merge-queries",
        ),
    ],
)
def test_redirect_fallback(
    proxy: Any, fallback: RedirectFallback, path: str, location: str
) -> None:
    cb = CircuitBreaker(hello, TRIGGER, clock=FakeClock(), fallback=fallback)
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    assert get(url).status == 200
    assert cb.state is State.TRIPPED
    r = get(url + path)
    assert r.status == 302
    assert r.headers["Location"] == location
    assert r.data == b"Found\n"


def test_response_fallback(proxy: Any) -> None:
    fallback = ResponseFallback(400, body="Come back later", content_type="text/x-later")
    cb = CircuitBreaker(hello, TRIGGER, clock=FakeClock(), fallback=fallback)
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    get(url)
    r = get(url)
    assert (r.status, r.data) == (400, b"Come back later")
    assert (r.headers["Content-Type"], r.headers["Content-Length"]) == ("text/x-later", "15")
    r = get(url, "HEAD")
    assert (r.status, r.data, r.headers["Content-Length"]) == (400, b"", "15")


def test_forward_to_standby_region_as_fallback(proxy: Any, echo_upstream: str) -> None:
    cb = CircuitBreaker(hello, TRIGGER, clock=FakeClock(), fallback=Forward(echo_upstream))
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    assert get(url).data == b"hello"
    r = get(url + "/region?x=1")
    assert r.status == 200
    doc = json.loads(r.data)
    assert (doc["path"], doc["query"]) == ("/region", "x=1")


def test_skip_bypasses_a_tripped_breaker(proxy: Any) -> None:
    cb = CircuitBreaker(
        hello, TRIGGER, clock=FakeClock(), skip=lambda env: env["PATH_INFO"] == "/health"
    )
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    get(url)
    assert get(url).status == 503
    assert get(url + "/health").status == 200
    assert cb.metrics.total_count() == 0  # skipped requests are not recorded


def test_trigger_during_recovery(proxy: Any) -> None:
    clock = FakeClock()
    cb = CircuitBreaker(hello, TRIGGER, clock=clock, check_period=1e-6)
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    assert get(url).status == 200
    assert cb.state is State.TRIPPED

    clock.advance(10.001)
    assert get(url).status == 503
    assert state_of(cb) is State.RECOVERING

    clock.advance(5)
    preload(cb.metrics, 0.6)
    statuses = [get(url).status for _ in range(100)]
    # The first admitted request's check trips again; everything after is refused.
    assert statuses.count(200) == 1
    assert statuses[statuses.index(200) + 1 :] == [503] * (99 - statuses.index(200))
    assert cb.state is State.TRIPPED


def test_request_threshold_with_real_network_errors(proxy: Any) -> None:
    cb = CircuitBreaker(
        Forward(refused_url()),
        "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 20",
        clock=FakeClock(),
        check_period=0,
    )
    url = proxy(cb)
    preload(cb.metrics, 1.0, n=18)
    r = get(url)
    assert r.status == 502  # Forward's own answer passes through
    eventually(lambda: cb.metrics.total_count() == 19)
    assert cb.metrics.network_error_count() == 19
    assert state_of(cb) is State.STANDBY

    cb.metrics.reset()
    preload(cb.metrics, 1.0, n=19)
    assert get(url).status == 502
    eventually(lambda: cb.state is State.TRIPPED)
    r = get(url)
    assert (r.status, r.data) == (503, b"circuit breaker open\n")


def test_upstream_502_is_not_a_network_error(proxy: Any, pywsgi: Any) -> None:
    upstream = pywsgi(answer("502 Bad Gateway", b"upstream says 502"))
    cb = CircuitBreaker(Forward(upstream), TRIGGER, clock=FakeClock(), check_period=0)
    url = proxy(cb)
    for _ in range(5):
        r = get(url)
        assert (r.status, r.data) == (502, b"upstream says 502")
    eventually(lambda: cb.metrics.total_count() == 5)
    assert state_of(cb) is State.STANDBY
    assert cb.metrics.status_code_counts() == {502: 5}
    assert cb.metrics.network_error_count() == 0

    down = CircuitBreaker(Forward(refused_url()), TRIGGER, clock=FakeClock(), check_period=0)
    down_url = proxy(down)
    assert get(down_url).status == 502
    eventually(lambda: down.state is State.TRIPPED)
    assert down.metrics.total_count() == 0  # reset by the trip it caused
    assert get(down_url).status == 503


def test_body_failing_mid_stream_counts_as_network_error(proxy: Any) -> None:
    def half(sock: socket.socket, request: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)

    upstream = RawUpstream(half)
    try:
        metrics = RoundTripMetrics(clock=FakeClock())
        cb = CircuitBreaker(
            Forward(upstream.url), "RequestThreshold() > 99", metrics=metrics, check_period=0
        )
        url = proxy(cb)
        reply = raw_request(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until="close")
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert reply.endswith(b"x" * 10)  # truncated: never completed with fake bytes
        eventually(lambda: metrics.total_count() == 1)
        assert metrics.status_code_counts() == {200: 1}
        assert metrics.network_error_count() == 1
    finally:
        upstream.stop()


def test_iterator_raising_an_upstream_error_counts_as_network_error(proxy: Any) -> None:
    def flaky(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "10")])
        yield b"12345"
        raise UpstreamProtocolError("upstream closed the connection mid-body")

    cb = CircuitBreaker(flaky, TRIGGER, clock=FakeClock(), check_period=0)
    url = proxy(cb, lint=False)
    reply = raw_request(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until="close")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert not reply.endswith(b"1234567890")
    eventually(lambda: cb.state is State.TRIPPED)


def test_iterator_raising_a_bug_is_not_a_network_error(proxy: Any) -> None:
    done = gevent.event.Event()

    def flaky(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "10")])
        yield b"12345"
        raise OSError("storage went away")

    class Recorded(RoundTripMetrics):
        def record(self, status: int, latency_s: float, network_error: bool = False) -> None:
            super().record(status, latency_s, network_error)
            done.set()

    metrics = Recorded(clock=FakeClock())
    cb = CircuitBreaker(flaky, TRIGGER, clock=FakeClock(), check_period=0, metrics=metrics)
    url = proxy(cb, lint=False)
    reply = raw_request(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until="close")
    assert reply.startswith(b"HTTP/1.1 200 ") and not reply.endswith(b"1234567890")
    assert done.wait(5.0)
    assert metrics.status_code_counts() == {200: 1}
    assert metrics.network_error_count() == 0
    assert cb.state is State.STANDBY


# --- real slow / erroring upstreams ------------------------------------------------


def test_latency_quantile_trigger_with_slow_upstream(proxy: Any, pywsgi: Any) -> None:
    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            gevent.sleep(0.15)
        return answer("200 OK", b"ok")(environ, start_response)

    upstream = pywsgi(slow)
    cb = CircuitBreaker(Forward(upstream), "LatencyAtQuantileMS(50.0) > 100", check_period=0)
    url = proxy(cb)
    for _ in range(3):
        assert get(url + "/fast").status == 200
    assert state_of(cb) is State.STANDBY
    assert cb.metrics.latency_at_quantile_ms(50.0) < 100
    for _ in range(4):  # p50 of 3 fast + 4 slow is slow; the 4th trips
        assert get(url + "/slow").status == 200
    eventually(lambda: cb.state is State.TRIPPED)
    r = get(url + "/fast")
    assert (r.status, r.data) == (503, b"circuit breaker open\n")


def test_response_code_ratio_trigger_with_erroring_upstream(proxy: Any, pywsgi: Any) -> None:
    def erroring(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/fail":
            return answer("500 Internal Server Error", b"boom")(environ, start_response)
        return answer("200 OK", b"ok")(environ, start_response)

    upstream = pywsgi(erroring)
    cb = CircuitBreaker(
        Forward(upstream),
        "ResponseCodeRatio(500, 600, 0, 600) > 0.5",
        clock=FakeClock(),
        check_period=0,
    )
    url = proxy(cb)
    for _ in range(5):
        assert get(url + "/ok").status == 200
    for _ in range(5):
        assert get(url + "/fail").status == 500
    eventually(lambda: cb.metrics.total_count() == 10)
    assert cb.state is State.STANDBY  # 5 of 10 is not > 0.5
    assert get(url + "/fail").status == 500  # 6 of 11
    eventually(lambda: cb.state is State.TRIPPED)
    assert get(url + "/ok").status == 503


def test_concurrent_requests_through_the_breaker(proxy: Any) -> None:
    cb = CircuitBreaker(hello, TRIGGER)
    url = proxy(cb)
    pool = urllib3.PoolManager(retries=False, timeout=10, maxsize=50)
    results: list[int] = []

    def one() -> None:
        for _ in range(4):
            results.append(pool.request("GET", url).status)

    gevent.joinall([gevent.spawn(one) for _ in range(50)], timeout=30, raise_error=True)
    assert results == [200] * 200
    assert cb.metrics.total_count() == 200
    assert state_of(cb) is State.STANDBY


# --- webhooks received by a real server --------------------------------------------


class Recorder:
    """A pywsgi app recording every request it gets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.event = gevent.event.Event()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        self.requests.append(
            {
                "method": environ["REQUEST_METHOD"],
                "path": environ["PATH_INFO"],
                "content_type": environ.get("CONTENT_TYPE"),
                "body": environ["wsgi.input"].read(length),
            }
        )
        self.event.set()
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    def wait(self, n: int) -> None:
        deadline = time.monotonic() + 5
        while len(self.requests) < n and time.monotonic() < deadline:
            self.event.wait(0.1)
            self.event.clear()
        assert len(self.requests) >= n


def test_side_effects_webhooks(proxy: Any, pywsgi: Any) -> None:
    recorder = Recorder()
    hooks = pywsgi(recorder)
    on_trip = Webhook(
        hooks + "/post.json",
        method="POST",
        headers={"Content-Type": "application/json"},
        body=b'{"Key": ["val1", "val2"]}',
    )
    on_standby = Webhook(hooks + "/post", form={"key": ["val1", "val2"]})
    clock = FakeClock()
    cb = CircuitBreaker(
        hello, TRIGGER, clock=clock, check_period=1e-6, on_trip=on_trip, on_standby=on_standby
    )
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    assert get(url).status == 200
    assert cb.state is State.TRIPPED
    recorder.wait(1)
    assert recorder.requests[0] == {
        "method": "POST",
        "path": "/post.json",
        "content_type": "application/json",
        "body": b'{"Key": ["val1", "val2"]}',
    }

    clock.advance(10.001)
    get(url)
    assert state_of(cb) is State.RECOVERING
    clock.advance(10.001)
    assert get(url).status == 200
    assert state_of(cb) is State.STANDBY
    recorder.wait(2)
    second = recorder.requests[1]
    assert (second["method"], second["path"]) == ("POST", "/post")
    assert second["content_type"] == "application/x-www-form-urlencoded"
    assert parse_qs(second["body"].decode()) == {"key": ["val1", "val2"]}
    assert len(recorder.requests) == 2


def test_webhook_times_out_without_blocking_the_request(proxy: Any) -> None:
    def hang(sock: socket.socket, request: bytes) -> None:
        gevent.sleep(10)

    upstream = RawUpstream(hang)
    try:
        hook = Webhook(upstream.url + "/hook", timeout=0.3)
        cb = CircuitBreaker(hello, TRIGGER, clock=FakeClock(), check_period=0, on_trip=hook)
        url = proxy(cb)
        preload(cb.metrics, 0.6)
        started = time.monotonic()
        assert get(url).status == 200
        assert time.monotonic() - started < 0.3  # the trip did not wait for the hook
        assert cb.state is State.TRIPPED
        greenlet = hook(None)
        greenlet.join(5)
        assert greenlet.ready() and greenlet.value is None
        assert time.monotonic() - started < 3
        assert upstream.connections >= 1
    finally:
        upstream.stop()


def test_circuit_open_exception_is_what_the_error_handler_gets(proxy: Any) -> None:
    seen: list[Exception] = []

    def handler(environ: Any, start_response: Any, exc: Any) -> list[bytes]:
        seen.append(exc)
        start_response("503 Service Unavailable", [("Content-Length", "4")])
        return [b"shed"]

    cb = CircuitBreaker(hello, TRIGGER, clock=FakeClock(), error_handler=handler)
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    get(url)
    r = get(url)
    assert (r.status, r.data) == (503, b"shed")
    assert isinstance(seen[0], CircuitOpen) and seen[0].status == 503


def test_buffer_retry_past_a_network_error_is_not_counted(proxy: Any, echo_upstream: str) -> None:
    # The last exchange is what the client got: a failure Buffer retried away
    # from does not count; a request whose every attempt failed does.
    from oxypy.buffer import Buffer
    from oxypy.roundrobin import RoundRobin

    dead = refused_url()
    lb = RoundRobin(Forward(), [dead, echo_upstream])
    buf = Buffer(lb, retry="IsNetworkError() && Attempts() < 2")
    cb = CircuitBreaker(buf, "RequestThreshold() > 99", clock=FakeClock(), check_period=0)
    url = proxy(cb)
    for _ in range(4):
        assert get(url).status == 200
    eventually(lambda: cb.metrics.total_count() == 4)
    assert cb.metrics.network_error_count() == 0

    only_dead = CircuitBreaker(
        Buffer(RoundRobin(Forward(), [dead]), retry="IsNetworkError() && Attempts() < 2"),
        "RequestThreshold() > 99",
        clock=FakeClock(),
    )
    dead_url = proxy(only_dead)
    assert get(dead_url).status == 502
    eventually(lambda: only_dead.metrics.total_count() == 1)
    assert only_dead.metrics.network_error_count() == 1


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ('{"state": "tripped"}', "application/json"),
        (b" [1, 2] ", "application/json"),
        ("{not json", "text/plain; charset=utf-8"),
        ("breaker tripped", "text/plain; charset=utf-8"),
        (b"\xff\x00", "application/octet-stream"),
    ],
)
def test_webhook_body_gets_a_content_type_by_kind(
    pywsgi: Any, body: bytes | str, content_type: str
) -> None:
    recorder = Recorder()
    hook = Webhook(pywsgi(recorder) + "/hook", body=body)
    hook().join(timeout=5)
    recorder.wait(1)
    sent = body.encode() if isinstance(body, str) else body
    assert recorder.requests == [
        {"method": "POST", "path": "/hook", "content_type": content_type, "body": sent}
    ]


def test_webhook_keeps_an_explicit_content_type(pywsgi: Any) -> None:
    recorder = Recorder()
    hook = Webhook(
        pywsgi(recorder) + "/hook", body="{}", headers={"content-type": "application/x-state"}
    )
    hook().join(timeout=5)
    recorder.wait(1)
    assert recorder.requests[0]["content_type"] == "application/x-state"


def test_response_fallback_503_carries_the_breakers_retry_after(proxy: Any) -> None:
    fallback = ResponseFallback(503, body="down for a moment")
    clock = FakeClock()
    cb = CircuitBreaker(hello, TRIGGER, clock=clock, fallback=fallback, fallback_duration=7)
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    get(url)
    r = get(url)
    assert (r.status, r.data, r.headers["Retry-After"]) == (503, b"down for a moment", "7")
    clock.advance(4.5)
    assert get(url).headers["Retry-After"] == "3"
    fixed = ResponseFallback(503, body="x", retry_after=30)
    assert fixed.retry_after == 30
    cb2 = CircuitBreaker(hello, TRIGGER, clock=FakeClock(), fallback=fixed)
    url2 = proxy(cb2)
    preload(cb2.metrics, 0.6)
    get(url2)
    assert get(url2).headers["Retry-After"] == "30"
    # Another status carries none unless asked.
    other = ResponseFallback(400, body="no")
    cb3 = CircuitBreaker(hello, TRIGGER, clock=FakeClock(), fallback=other)
    url3 = proxy(cb3)
    preload(cb3.metrics, 0.6)
    get(url3)
    assert "Retry-After" not in get(url3).headers


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_response_fallback_retry_after_is_validated(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="retry_after must be whole seconds"):
        ResponseFallback(503, retry_after=bad)


def test_trip_line_carries_the_expressions_values(
    proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="oxypy.cbreaker")
    expression = (
        "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 10 || "
        "ResponseCodeRatio(500, 600, 0, 600) > 0.9"
    )
    cb = CircuitBreaker(hello, expression, clock=FakeClock())
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    get(url)
    assert cb.state is State.TRIPPED
    (line,) = [r.getMessage() for r in caplog.records if "tripped" in r.getMessage()]
    assert line == (
        f"circuit breaker tripped for 10s: {expression} holds (standby) with "
        # 60 of 101 (the preload and this request): 60 network errors, recorded as 502s
        "NetworkErrorRatio()=0.5941, RequestThreshold()=101, "
        "ResponseCodeRatio(500, 600, 0, 600)=0.5941"
    )


def test_recovering_and_standby_lines_carry_the_expressions_values(
    proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="oxypy.cbreaker")
    clock = FakeClock()
    expression = "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 10"
    cb = CircuitBreaker(hello, expression, clock=clock)
    url = proxy(cb)
    preload(cb.metrics, 0.6)
    get(url)
    assert cb.state is State.TRIPPED
    clock.advance(10)
    preload(cb.metrics, 0.2, n=50)  # what the metrics hold when the period ends
    get(url)
    assert state_of(cb) is State.RECOVERING
    clock.advance(10)
    preload(cb.metrics, 0.1, n=20)  # the recovery window's traffic
    get(url)
    assert state_of(cb) is State.STANDBY
    lines = [r.getMessage() for r in caplog.records if r.name == "oxypy.cbreaker"]
    assert lines[1:] == [
        f"circuit breaker recovering for 10s: {expression} with "
        "NetworkErrorRatio()=0.2, RequestThreshold()=50",
        f"circuit breaker back to standby: {expression} with "
        "NetworkErrorRatio()=0.1, RequestThreshold()=20",
    ]
    records = [r for r in caplog.records if r.name == "oxypy.cbreaker"]
    assert [getattr(r, "values", None) for r in records[1:]] == [
        "NetworkErrorRatio()=0.2, RequestThreshold()=50",
        "NetworkErrorRatio()=0.1, RequestThreshold()=20",
    ]
