"""Health: active checks (one greenlet, no leaks) and passive outlier ejection."""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.event
import pytest
import urllib3
from gevent.pywsgi import WSGIServer
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import EnvironBuilder

from oxypy import environ as keys
from oxypy._balance.health import count_probe
from oxypy._balance.outlier import count_result, expire_ejections
from oxypy._balance.pool import Pool
from oxypy._balance.state import Input, ServerState, State, transition
from oxypy._core.iterables import ClosingIterable
from oxypy.exceptions import ClientDisconnected, ConfigurationError, UpstreamConnectError
from oxypy.forward import Exchange, Forward
from oxypy.health import HealthCheck, OutlierDetection
from oxypy.leastrequest import LeastRequest
from oxypy.roundrobin import RoundRobin
from oxypy.sticky import StickySession

from _servers import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live_greenlets() -> set[gevent.Greenlet]:
    return {o for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead}


# -- tier 1: configuration and ejection rules ----------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"path": "healthz"}, id="relative-path"),
        pytest.param({"path": "/a b"}, id="space-in-path"),
        pytest.param({"interval": 0}, id="interval"),
        pytest.param({"timeout": -1}, id="timeout"),
        pytest.param({"healthy_threshold": 0}, id="healthy-threshold"),
        pytest.param({"unhealthy_threshold": 1.5}, id="unhealthy-threshold"),
        pytest.param({"expect_status": 99}, id="status-range"),
        pytest.param({"expect_status": []}, id="status-empty"),
        pytest.param({"expect_status": "200"}, id="status-string"),
    ],
)
def test_health_check_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        HealthCheck(**options)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"consecutive_errors": 0}, id="consecutive"),
        pytest.param({"consecutive_errors": None}, id="nothing-enabled"),
        pytest.param({"failure_ratio": 1.5}, id="ratio-over-1"),
        pytest.param({"window": 0}, id="window"),
        pytest.param({"base_ejection_time": 0}, id="base-time"),
        pytest.param({"max_ejection_percent": 101}, id="percent"),
    ],
)
def test_outlier_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        OutlierDetection(**options)


def test_plain_frozen_values() -> None:
    hc = HealthCheck("/ready", interval=1, expect_status=[200, 204])
    assert (hc.interval, hc.expect_status) == (1.0, frozenset({200, 204}))
    assert hc == HealthCheck("/ready", interval=1.0, expect_status={204, 200})
    assert hc.accepts(204) and not hc.accepts(500)
    assert HealthCheck(expect_status=range(200, 300)).accepts(299)
    od = OutlierDetection(consecutive_errors=3, base_ejection_time=60, max_ejection_time=10)
    assert od.max_ejection_time == 60.0  # never below the first ejection
    assert od == OutlierDetection(
        consecutive_errors=3, base_ejection_time=60.0, max_ejection_time=60
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        od.window = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        HealthCheck("/", 5)  # type: ignore[call-arg]  # options are keyword-only
    with pytest.raises(TypeError):
        OutlierDetection(3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("make", "option"),
    [
        pytest.param(lambda: HealthCheck(interval=0), "interval", id="interval"),
        pytest.param(lambda: HealthCheck(host="a b"), "host", id="host"),
        pytest.param(lambda: OutlierDetection(window=0), "window", id="window"),
        pytest.param(
            lambda: OutlierDetection(max_ejection_percent=-1), "max_ejection_percent", id="pct"
        ),
    ],
)
def test_errors_name_the_option(make: Callable[[], object], option: str) -> None:
    with pytest.raises(ConfigurationError, match=option):
        make()


def test_balancer_rejects_wrong_option_types() -> None:
    with pytest.raises(ConfigurationError):
        RoundRobin(lambda e, s: [], [], health_check=OutlierDetection())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        RoundRobin(lambda e, s: [], [], sticky="lb")  # type: ignore[arg-type]


def servers(n: int) -> list[ServerState]:
    pool = [ServerState(f"http://s{i}", f"http://s{i}:80/", 1) for i in range(n)]
    for server in pool:
        transition(server, Input.ADD, [])
    return pool


def feed(
    od: OutlierDetection, pool: list[ServerState], results: str, now: float = 0.0
) -> list[Any]:
    """Feed ``results`` ('x' failure, '.' success) for pool[0]; return the events."""
    events: list[tuple[str, str]] = []
    for ch in results:
        count_result(od, pool[0], ch == "x", now, pool, events)
    return events


@pytest.mark.parametrize(
    ("options", "results", "ejected"),
    [
        pytest.param({"consecutive_errors": 3}, "xx", False, id="below-consecutive"),
        pytest.param({"consecutive_errors": 3}, "xxx", True, id="consecutive"),
        pytest.param({"consecutive_errors": 3}, "xx.xx", False, id="success-resets"),
        pytest.param(
            {"consecutive_errors": None, "failure_ratio": 0.5, "window": 4},
            "x.x",
            False,
            id="ratio-window-not-full",
        ),
        pytest.param(
            {"consecutive_errors": None, "failure_ratio": 0.5, "window": 4},
            "x.x.",
            True,
            id="ratio-reached",
        ),
        pytest.param(
            {"consecutive_errors": None, "failure_ratio": 0.5, "window": 4},
            "x...x...x",
            False,
            id="ratio-slides",
        ),
    ],
)
def test_ejection_rules(options: dict[str, Any], results: str, ejected: bool) -> None:
    pool = servers(4)
    events = feed(OutlierDetection(**options), pool, results)
    assert (pool[0].ejected_until is not None) is ejected
    assert pool[0].state is (State.EJECTED if ejected else State.ACTIVE)
    assert events == ([("http://s0", "ejected")] if ejected else [])


def test_max_ejection_percent_caps_the_pool() -> None:
    od = OutlierDetection(consecutive_errors=1, max_ejection_percent=50)
    pool = servers(4)
    events: list[tuple[str, str]] = []
    for server in pool:
        count_result(od, server, True, 0.0, pool, events)
    assert [s.ejected_until is not None for s in pool] == [True, True, False, False]
    single = servers(1)
    assert feed(od, single, "xxxx") == []  # a lone server is never ejected at 50 %


def test_ejection_time_grows_and_decays() -> None:
    od = OutlierDetection(consecutive_errors=1, base_ejection_time=30, max_ejection_time=100)
    pool = servers(2)
    s = pool[0]
    expected_durations = [30, 60, 90, 100]
    now = 0.0
    events: list[tuple[str, str]] = []
    for duration in expected_durations:
        count_result(od, s, True, now, pool, events)
        assert s.ejected_until == now + duration
        expire_ejections(pool, now + duration - 0.001, events)
        assert s.ejected
        now = s.ejected_until
        expire_ejections(pool, now, events)
        assert s.state is State.ACTIVE and s.returned_at == now
        now += 1  # fails again right after returning
    # Staying in for as long as the last ejection lasted resets the multiplier.
    count_result(od, s, True, now + 100, pool, events)
    assert s.ejected_until == now + 100 + 30
    # Results of requests still in flight while ejected are ignored.
    count_result(od, s, True, now + 101, pool, events)
    assert s.ejected_until == now + 100 + 30 and s.ejections == 1
    assert events == [("http://s0", "ejected"), ("http://s0", "returned")] * 4 + [
        ("http://s0", "ejected")
    ]


def test_health_check_thresholds() -> None:
    hc = HealthCheck(healthy_threshold=2, unhealthy_threshold=3)
    (s,) = servers(1)
    events: list[tuple[str, str]] = []
    for passed in [False, False, True, False, False, False, True, True]:
        count_probe(hc, s, passed, events)
    assert events == [("http://s0", "unhealthy"), ("http://s0", "healthy")]
    assert s.state is State.ACTIVE


# -- tier 1b: the balancer's passive path, in process, with made-up exchanges ----------


def fake_forward(outcomes: dict[str, list[str]]) -> Callable[..., Iterable[bytes]]:
    """Records an Exchange per call: 'x' a network error, 'd' client gone, else 200."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        target = environ[keys.TARGET]
        record = Exchange(target, "GET", time.monotonic())
        kind = outcomes[target].pop(0) if outcomes.get(target) else "."
        if kind == "x":
            record.error = UpstreamConnectError(target=target)
        elif kind == "d":
            record.status, record.error = 200, ClientDisconnected()
        else:
            record.status = 200
        environ[keys.EXCHANGES].append(record)
        body = target.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


def call(app: Any, cookie: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
    headers = [("Cookie", cookie)] if cookie else []
    env = EnvironBuilder(path="/", headers=headers).get_environ()
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
        seen["status"], seen["headers"] = status, headers
        return lambda data: None

    result = LintMiddleware(app)(env, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()  # type: ignore[attr-defined]
    return seen["status"], seen["headers"], body


@pytest.mark.parametrize("balancer", [RoundRobin, LeastRequest])
def test_passive_ejection_and_return_with_clock(balancer: Any) -> None:
    clock = FakeClock()
    events: list[tuple[str, str]] = []
    outcomes = {"http://b": list("xdxx")}  # the client-gone exchange counts as nothing
    # LeastRequest draws at random: a seeded rng makes the run repeatable, and
    # the assertions below hold for any draw (only *when* b is picked varies).
    seeded = {"rng": random.Random(11)} if balancer is LeastRequest else {}
    lb = balancer(
        fake_forward(outcomes),
        ["http://a", "http://b"],
        outlier_detection=OutlierDetection(consecutive_errors=3, base_ejection_time=30),
        on_change=lambda url, ev: events.append((url, ev)),
        clock=clock,
        **seeded,
    )
    bodies: list[bytes] = []
    while ("http://b", "ejected") not in events:
        assert len(bodies) < 200, "b was never ejected"
        bodies.append(call(lb)[2])
    assert bodies.count(b"http://b") == 4 and outcomes["http://b"] == []
    assert bodies[-1] == b"http://b"  # ejected by the request that made the third error
    assert events == [("http://a", "added"), ("http://b", "added"), ("http://b", "ejected")]
    assert [call(lb)[2] for _ in range(8)] == [b"http://a"] * 8
    clock.now += 29.9
    assert {call(lb)[2] for _ in range(10)} == {b"http://a"}
    clock.now += 0.1
    returned = [call(lb)[2] for _ in range(2)]
    assert events[-1] == ("http://b", "returned")
    while b"http://b" not in returned:
        assert len(returned) < 200, "b was never picked again"
        returned.append(call(lb)[2])  # b is back in the pool: picked again


def test_all_ejected_is_503() -> None:
    clock = FakeClock()
    lb = RoundRobin(
        fake_forward({"http://a": ["x"], "http://b": ["x"]}),
        ["http://a", "http://b"],
        outlier_detection=OutlierDetection(consecutive_errors=1, max_ejection_percent=100),
        clock=clock,
    )
    call(lb), call(lb)
    status, _, body = call(lb)
    assert (status, body) == ("503 Service Unavailable", b"no healthy upstream server\n")
    clock.now += 30
    assert call(lb)[0] == "200 OK"


def test_sticky_cookie_to_ejected_server_falls_back() -> None:
    clock = FakeClock()
    lb = RoundRobin(
        fake_forward({"http://a": list("xx")}),
        ["http://a", "http://b"],
        sticky=StickySession("lb", secret="k"),
        outlier_detection=OutlierDetection(consecutive_errors=2),
        clock=clock,
    )
    _, headers, body = call(lb)
    assert body == b"http://a"
    cookie = dict(headers)["Set-Cookie"].split(";")[0]
    assert call(lb, cookie)[2] == b"http://a"  # second failure: ejected
    _, headers, body = call(lb, cookie)
    assert body == b"http://b" and dict(headers)["Set-Cookie"].split(";")[0] != cookie


# -- tier 2: real servers ---------------------------------------------------------------


@pytest.fixture
def http() -> Any:
    pool = urllib3.PoolManager(retries=False, timeout=10)
    yield pool
    pool.clear()


def health_app(name: str, healthy: Callable[[], bool]) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/healthz":
            status = "200 OK" if healthy() else "503 Service Unavailable"
            start_response(status, [("Content-Length", "0")])
            return [b""]
        body = name.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


def test_active_check_takes_out_and_readmits(pywsgi: Any, proxy: Any, http: Any) -> None:
    state = {"b": True}
    a = pywsgi(health_app("a", lambda: True))
    b = pywsgi(health_app("b", lambda: state["b"]))
    events: list[tuple[str, str]] = []
    rr = RoundRobin(
        Forward(),
        [a, b],
        health_check=HealthCheck(interval=0.02, timeout=1, healthy_threshold=2),
        on_change=lambda url, ev: events.append((url, ev)),
    )
    try:
        url = proxy(rr)
        assert {http.request("GET", url).data for _ in range(4)} == {b"a", b"b"}
        state["b"] = False
        wait_for(lambda: (b, "unhealthy") in events)
        assert {http.request("GET", url).data for _ in range(10)} == {b"a"}
        state["b"] = True
        wait_for(lambda: (b, "healthy") in events)
        assert {http.request("GET", url).data for _ in range(4)} == {b"a", b"b"}
        assert events[2:] == [(b, "unhealthy"), (b, "healthy")]
    finally:
        rr.close()


def test_active_check_dead_server_and_restart(pywsgi: Any, proxy: Any, http: Any) -> None:
    a = pywsgi(health_app("a", lambda: True))
    b_server = WSGIServer(("127.0.0.1", 0), health_app("b", lambda: True), log=None)
    b_server.start()
    port = b_server.server_port
    b = f"http://127.0.0.1:{port}"
    events: list[tuple[str, str]] = []
    hc = HealthCheck(
        interval=0.02, timeout=0.5, unhealthy_threshold=2, expect_status=range(200, 300)
    )
    rr = RoundRobin(
        Forward(), [a, b], health_check=hc, on_change=lambda u, e: events.append((u, e))
    )
    try:
        url = proxy(rr)
        b_server.stop(timeout=1)
        wait_for(lambda: (b, "unhealthy") in events)
        assert [http.request("GET", url).status for _ in range(6)] == [200] * 6
        b_server = WSGIServer(("127.0.0.1", port), health_app("b", lambda: True), log=None)
        b_server.start()
        wait_for(lambda: (b, "healthy") in events)
        assert {http.request("GET", url).data for _ in range(4)} == {b"a", b"b"}
    finally:
        rr.close()
        b_server.stop(timeout=1)


def test_health_greenlet_stops_on_close(pywsgi: Any) -> None:
    calls: list[str] = []

    def counting(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        calls.append(environ["PATH_INFO"])
        start_response("204 No Content", [])
        return [b""]

    a, b = pywsgi(counting), pywsgi(counting)
    before = live_greenlets()  # compared as sets: earlier tests' greenlets may still end
    rr = RoundRobin(
        Forward(), [a, b], health_check=HealthCheck("/ping", interval=0.01, expect_status={204})
    )
    wait_for(lambda: len(calls) >= 6)
    assert set(calls) == {"/ping"}
    assert live_greenlets() - before  # the checker runs
    rr.close()
    rr.close()  # idempotent
    # The checker and the upstreams' handlers of its probe connections all end.
    # so nothing is left that could probe again.
    wait_for(lambda: not live_greenlets() - before)


def test_passive_ejection_over_real_network(pywsgi: Any, proxy: Any, http: Any) -> None:
    clock = FakeClock()
    a = pywsgi(health_app("a", lambda: True))
    dead = WSGIServer(("127.0.0.1", 0), health_app("b", lambda: True), log=None)
    dead.start()
    port = dead.server_port
    dead.stop(timeout=1)
    b = f"http://127.0.0.1:{port}"
    events: list[tuple[str, str]] = []
    rr = RoundRobin(
        Forward(),
        [a, b],
        outlier_detection=OutlierDetection(consecutive_errors=3, base_ejection_time=30),
        on_change=lambda u, e: events.append((u, e)),
        clock=clock,
    )
    url = proxy(rr)
    statuses = [http.request("GET", url).status for _ in range(6)]
    assert statuses == [200, 502] * 3
    assert events[-1] == (b, "ejected")
    assert [http.request("GET", url).data for _ in range(5)] == [b"a"] * 5
    back = WSGIServer(("127.0.0.1", port), health_app("b", lambda: True), log=None)
    back.start()
    try:
        clock.now += 30
        got = [http.request("GET", url) for _ in range(4)]
        assert [(r.status, r.data) for r in got] == [(200, b"a"), (200, b"b")] * 2 or [
            (r.status, r.data) for r in got
        ] == [(200, b"b"), (200, b"a")] * 2
        assert events[-1] == (b, "returned")
    finally:
        back.stop(timeout=1)


def test_a_hanging_server_does_not_delay_the_others_checks() -> None:
    import socket

    from _servers import RawUpstream

    hanging = RawUpstream(lambda sock, data: gevent.sleep(5))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    events: list[tuple[str, str, float]] = []
    start = time.monotonic()
    lb = RoundRobin(
        Forward(),
        [hanging.url, refused],
        health_check=HealthCheck("/healthz", interval=0.05, timeout=1.5, unhealthy_threshold=1),
        on_change=lambda url, event: events.append((url, event, time.monotonic() - start)),
    )
    try:
        with gevent.Timeout(5):
            while not any(url == refused and event == "unhealthy" for url, event, _ in events):
                gevent.sleep(0.02)
        (took,) = [t for url, event, t in events if url == refused and event == "unhealthy"]
        # Probed one after another, the refused server would wait out the
        # hanging one's 1.5 s timeout first.
        assert took < 1.0
    finally:
        lb.close()
        hanging.stop()


def test_a_hanging_upstream_is_ejected_after_consecutive_timeouts(
    pywsgi: Any, proxy: Any, http: Any
) -> None:
    """Accepts, reads the request, never answers: three 504s eject it, no probe needed."""
    from _servers import RawUpstream

    release = gevent.event.Event()
    hang = RawUpstream(lambda sock, data: release.wait(10))
    good = pywsgi(health_app("good", lambda: True))
    clock = FakeClock()  # the ejection must not run out during the test
    events: list[tuple[str, str]] = []
    rr = RoundRobin(
        Forward(read_timeout=0.5),
        [hang.url, good],
        outlier_detection=OutlierDetection(consecutive_errors=3, base_ejection_time=30),
        on_change=lambda url, event: events.append((url, event)),
        clock=clock,
    )
    url = proxy(rr)
    try:
        started = time.monotonic()
        got = [http.request("GET", url + "/x") for _ in range(12)]
        took = time.monotonic() - started
        assert [(r.status, r.data) for r in got[:6]] == [
            (504, b"upstream timed out\n"),
            (200, b"good"),
        ] * 3
        assert [(r.status, r.data) for r in got[6:]] == [(200, b"good")] * 6
        assert len(hang.requests) == 3 and hang.requests[0].startswith(b"GET /x HTTP/1.1\r\n")
        assert events[-1] == (hang.url, "ejected") and events.count((hang.url, "ejected")) == 1
        assert took < 5.0  # three 0.5 s timeouts, not a probe interval
    finally:
        release.set()
        hang.stop()


class RecordingMeter:
    """A Rebalancer meter that keeps every status it is given."""

    def __init__(self, seen: dict[str, list[int]], url: str) -> None:
        self.statuses = seen.setdefault(url, [])

    def rating(self) -> float:
        return 0.0

    def record(self, status: int, latency: float) -> None:
        self.statuses.append(status)

    def is_ready(self) -> bool:
        return False


def test_client_aborts_never_count_against_a_server(pywsgi: Any, proxy: Any, http: Any) -> None:
    """Uploads cut mid-body and downloads abandoned mid-stream: no ejection, no meter entry."""
    import socket
    import struct

    from oxypy.rebalancer import Rebalancer

    def upstream(name: str) -> Callable[..., Iterable[bytes]]:
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ["REQUEST_METHOD"] == "POST":
                uploads.append(environ["wsgi.input"].read(1))
                environ["wsgi.input"].read()
                start_response("200 OK", [("Content-Length", str(len(name)))])
                return [name.encode()]
            if environ["PATH_INFO"] == "/stream":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return (gevent.sleep(0.02) or b"x" * 1024 for _ in range(500))
            start_response("200 OK", [("Content-Length", str(len(name)))])
            return [name.encode()]

        return app

    uploads: list[bytes] = []
    a, b = pywsgi(upstream("a")), pywsgi(upstream("b"))
    events: list[tuple[str, str]] = []
    statuses: dict[str, list[int]] = {}
    rr = RoundRobin(
        Forward(),
        [a, b],
        outlier_detection=OutlierDetection(consecutive_errors=1, max_ejection_percent=100),
        on_change=lambda url, event: events.append((url, event)),
    )
    rb = Rebalancer(rr, meter=lambda url: RecordingMeter(statuses, url))
    settled: list[int] = []

    def counting(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            result = rb(environ, start_response)
        except BaseException:
            settled.append(1)
            raise
        return ClosingIterable(result, lambda: settled.append(1))

    host, port = proxy(counting).split("//")[1].rsplit(":", 1)

    def reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    for n in range(4):  # half an upload, then a reset
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
            sock.sendall(b"y" * 100000)
            wait_for(lambda: len(uploads) == n + 1)  # noqa: B023 - the upstream is reading it
            reset(sock)
        wait_for(lambda: len(settled) == 2 * n + 1)  # noqa: B023
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            reset(sock)
        wait_for(lambda: len(settled) == 2 * n + 2)  # noqa: B023
    assert events == [(a, "added"), (b, "added")]
    assert statuses == {a: [], b: []}
    assert sorted(http.request("GET", f"http://{host}:{port}/").data for _ in range(2)) == [
        b"a",
        b"b",
    ]
    assert statuses == {a: [200], b: [200]}


def test_every_state_change_is_one_log_line_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pool logs each event (logger ``oxypy.balancer``) whoever built the
    balancer: WARNING when a server leaves rotation, INFO otherwise."""
    caplog.set_level(logging.INFO, logger="oxypy.balancer")
    pool = Pool(clock=lambda: 0.0, on_change=None)
    pool.upsert("http://s0", 1)
    pool.upsert("http://s1", 1)
    s0 = pool.find("http://s0")
    assert s0 is not None
    hc = HealthCheck(healthy_threshold=2, unhealthy_threshold=2)
    od = OutlierDetection(consecutive_errors=3, base_ejection_time=30)
    for passed, failure in [(False, "GET / answered 503"), (False, "GET / answered 500")]:
        events: list[tuple[str, str]] = []
        count_probe(hc, s0, passed, events, failure)
        pool.notify(events)
    for passed in [True, True]:
        events = []
        count_probe(hc, s0, passed, events)
        pool.notify(events)
    for _ in range(3):
        events = []
        count_result(od, s0, True, 10.0, pool.snapshot(), events)
        pool.notify(events)
    events = []
    expire_ejections(pool.snapshot(), 40.0, events)
    pool.notify(events)
    pool.remove("http://s0")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "upstream http://s0 added"),
        ("INFO", "upstream http://s1 added"),
        (
            "WARNING",
            "upstream http://s0 unhealthy: 2 health checks failed in a row, "
            "the last: GET / answered 500",
        ),
        ("INFO", "upstream http://s0 healthy: 2 health checks passed in a row"),
        (
            "WARNING",
            "upstream http://s0 ejected: 3 network errors or timeouts in a row; out for 30 s",
        ),
        ("INFO", "upstream http://s0 returned: its ejection time is over"),
        ("INFO", "upstream http://s0 removed"),
    ]
    assert {r.name for r in caplog.records} == {"oxypy.balancer"}
    assert [getattr(r, "event", None) for r in caplog.records] == [
        "added",
        "added",
        "unhealthy",
        "healthy",
        "ejected",
        "returned",
        "removed",
    ]
