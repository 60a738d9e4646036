"""Hedge: a late response head sends the request again; the first head wins."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
import urllib3

from oxypy import Buffer, ConfigurationError, Forward, Hedge, RetryBudget, RoundRobin
from oxypy import environ as keys

from _servers import RawUpstream, read_exact_body

HTTP = urllib3.PoolManager(retries=False, timeout=10)
App = Callable[..., Any]


def hits(up: RawUpstream) -> int:
    """Requests this test sent (path ``/t/...``): a stray connection from another
    process to a reused port cannot change the count."""
    return sum(1 for r in up.requests if r.split(b" ", 2)[1].startswith(b"/t/"))


class SlowUpstream:
    """Answers after ``delay`` seconds unless the proxy closes the connection first."""

    def __init__(self, delay: float = 1.0, body: bytes = b"slow") -> None:
        self.closed = gevent.event.Event()
        self.answered = 0
        self.delay = delay
        self.body = body
        self.raw = RawUpstream(self.handle)

    def handle(self, sock: socket.socket, data: bytes) -> None:
        read_exact_body(sock, data)
        sock.settimeout(self.delay)
        try:
            if sock.recv(1) == b"":
                self.closed.set()  # the proxy gave up on this attempt
                return
        except TimeoutError:
            pass
        self.answered += 1
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\n\r\n".encode()
        sock.sendall(head + self.body)
        sock.settimeout(5)
        while sock.recv(65536):
            pass


def fast_upstream(body: bytes = b"fast") -> RawUpstream:
    def handler(sock: socket.socket, data: bytes) -> None:
        read_exact_body(sock, data)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return RawUpstream(handler)


def first_untried(app: App, targets: list[str]) -> App:
    """A deterministic balancer: the first target not tried yet for this request."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        tried = environ.get(keys.TRIED_TARGETS, set())
        target = next((t for t in targets if t not in tried), targets[0])
        tried.add(target)
        env = dict(environ)
        env[keys.TARGET] = target
        result: Iterable[bytes] = app(env, start_response)
        return result

    return wsgi


@pytest.fixture
def pair() -> Iterator[tuple[SlowUpstream, RawUpstream]]:
    slow, fast = SlowUpstream(), fast_upstream()
    yield slow, fast
    slow.raw.stop()
    fast.stop()


def test_a_late_head_is_hedged_and_the_loser_connection_closed(proxy: Any, pair: Any) -> None:
    slow, fast = pair
    hedge = Hedge(first_untried(Forward(), [slow.raw.url, fast.url]), delay=0.05)
    url = proxy(hedge)
    started = time.monotonic()
    resp = HTTP.request("GET", url + "/t/x")
    elapsed = time.monotonic() - started
    assert (resp.status, resp.data) == (200, b"fast")
    assert elapsed < 0.5
    assert slow.closed.wait(0.8)  # closed before the slow server would have answered
    assert slow.answered == 0
    assert (hits(slow.raw), hits(fast)) == (1, 1)
    assert (hedge.hedges, hedge.hedge_wins, hedge.refused) == (1, 1, 0)


def test_with_roundrobin_the_hedge_goes_to_the_other_server(proxy: Any, pair: Any) -> None:
    slow, fast = pair
    hedge = Hedge(RoundRobin(Forward(), [slow.raw.url, fast.url]), delay=0.05)
    url = proxy(hedge)
    for _ in range(4):
        started = time.monotonic()
        resp = HTTP.request("GET", url + "/t/")
        assert (resp.status, resp.data) == (200, b"fast")
        assert time.monotonic() - started < 0.5
    # RoundRobin alternates: two requests went to the slow server first and
    # were hedged to the fast one, never to the slow one again.
    assert hits(slow.raw) == 2
    assert hits(fast) == 4
    assert hedge.hedges == 2


def test_a_prompt_head_is_not_hedged(proxy: Any, pair: Any) -> None:
    slow, fast = pair
    hedge = Hedge(first_untried(Forward(), [fast.url, slow.raw.url]), delay=0.3)
    url = proxy(hedge)
    resp = HTTP.request("GET", url + "/t/")
    assert (resp.status, resp.data) == (200, b"fast")
    assert (hits(fast), hits(slow.raw), hedge.hedges) == (1, 0, 0)


@pytest.mark.parametrize(
    ("method", "body"),
    [pytest.param("POST", b"data", id="POST"), pytest.param("GET", b"data", id="GET-with-body")],
)
def test_other_methods_and_bodies_are_not_hedged(
    proxy: Any, pair: Any, method: str, body: bytes
) -> None:
    slow, fast = pair
    slow.delay = 0.3
    hedge = Hedge(first_untried(Forward(), [slow.raw.url, fast.url]), delay=0.05)
    url = proxy(hedge)
    resp = HTTP.request(method, url + "/t/", body=body)
    assert (resp.status, resp.data) == (200, b"slow")
    assert (hits(slow.raw), hits(fast), hedge.hedges) == (1, 0, 0)


def test_a_refusing_budget_keeps_the_first_attempt(proxy: Any, pair: Any) -> None:
    slow, fast = pair
    slow.delay = 0.3
    budget = RetryBudget(0.0, min_per_second=0.0)
    lb = first_untried(Forward(), [slow.raw.url, fast.url])
    hedge = Hedge(lb, delay=0.05, retry_budget=budget)
    url = proxy(hedge)
    resp = HTTP.request("GET", url + "/t/")
    assert (resp.status, resp.data) == (200, b"slow")
    assert (hedge.hedges, hedge.refused, hits(fast)) == (0, 1, 0)
    state = budget.state()
    assert (state.requests_total, state.retries_total, state.refused_total) == (1, 0, 1)


def test_a_buffer_above_sees_only_the_winner(proxy: Any, pair: Any) -> None:
    """The cancelled attempt is no network error: the winner's 200 is not retried."""
    slow, fast = pair
    seen: list[list[Any]] = []

    def spy(app: App) -> App:
        def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            seen.append(environ.setdefault(keys.EXCHANGES, []))
            result: Iterable[bytes] = app(environ, start_response)
            return result

        return wsgi

    inner = Hedge(first_untried(Forward(), [slow.raw.url, fast.url]), delay=0.05)
    url = proxy(spy(Buffer(inner, retry="IsNetworkError() && Attempts() < 3")))
    resp = HTTP.request("GET", url + "/t/")
    assert (resp.status, resp.data) == (200, b"fast")
    assert slow.closed.wait(0.8)
    assert (hits(slow.raw), hits(fast)) == (1, 1)
    assert [(x.target, x.status, x.error) for x in seen[0]] == [(fast.url, 200, None)]


def test_the_winner_streams_its_body(proxy: Any, pywsgi: Any, pair: Any) -> None:
    slow, _ = pair

    def chunks(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        for i in range(3):
            yield json.dumps({"i": i}).encode() + b"\n"
            gevent.sleep(0.01)

    streaming = pywsgi(chunks)
    hedge = Hedge(first_untried(Forward(), [slow.raw.url, streaming]), delay=0.05)
    resp = HTTP.request("GET", proxy(hedge) + "/t/")
    assert resp.status == 200
    assert resp.data == b'{"i": 0}\n{"i": 1}\n{"i": 2}\n'


def test_every_attempt_failing_answers_the_error(proxy: Any) -> None:
    def refuse() -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        return f"http://127.0.0.1:{port}"

    hedge = Hedge(first_untried(Forward(), [refuse(), refuse()]), delay=0.05)
    resp = HTTP.request("GET", proxy(hedge) + "/t/")
    assert resp.status == 502
    assert hedge.hedges == 0  # the refusal was the first head


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": 0},
        {"delay": "1"},
        {"delay": 0.1, "max_hedges": 0},
        {"delay": 0.1, "methods": "GET"},
        {"delay": 0.1, "methods": ()},
        {"delay": 0.1, "retry_budget": 5},
        {"delay": "fast"},
        {"delay": "p0"},
        {"delay": "p100"},
        {"delay": "p95", "min_delay": 0.5, "max_delay": 0.1},
        {"delay": "p95", "min_samples": 0},
        {"delay": "p95", "delay_window": 0},
        {"delay": "p95", "fallback_delay": -1},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Hedge(Forward(), **kwargs)


def test_derived_delay_options_need_a_quantile_delay() -> None:
    with pytest.raises(ConfigurationError) as info:
        Hedge(Forward(), delay=0.05, min_samples=5, max_delay=1.0)
    assert (
        str(info.value)
        == 'max_delay, min_samples: only with a quantile delay (such as delay="p95")'
    )


# -- a delay derived from the observed latency ----------------------------------


class SteppedClock:
    """Real time plus an offset a test steps (to pass the refresh and the window)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def paced_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Answers ``A`` after the seconds its path names: ``/t/wait/0.05``."""
    gevent.sleep(float(environ["PATH_INFO"].rsplit("/", 1)[1]))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "1")])
    return [b"A"]


def b_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "1")])
    return [b"B"]


def test_a_quantile_delay_follows_the_observed_head_latency(proxy: Any, pywsgi: Any) -> None:
    clock = SteppedClock()
    a, b = pywsgi(paced_app), pywsgi(b_app)
    hedge = Hedge(
        first_untried(Forward(), [a, b]),
        delay="p90",
        fallback_delay=1.5,
        min_samples=10,
        min_delay=0.001,
        max_delay=5.0,
        clock=clock,
    )
    url = proxy(hedge)
    assert (hedge.current_delay, hedge.samples) == (1.5, 0)  # no latency known yet
    for _ in range(10):
        resp = HTTP.request("GET", url + "/t/wait/0.05")
        assert resp.data == b"A"
    assert hedge.current_delay == 1.5  # computed at most once a second
    clock.offset += 1.01
    delay = hedge.current_delay
    assert hedge.samples == 10
    assert 0.05 <= delay < 0.75  # p90 of ten ~50 ms heads (generous for a loaded machine)
    # A slow head is now hedged after the derived delay, not the 1.5 s fallback.
    started = time.monotonic()
    resp = HTTP.request("GET", url + "/t/wait/4")
    elapsed = time.monotonic() - started
    assert resp.data == b"B"
    assert delay <= elapsed < 1.4
    assert (hedge.hedges, hedge.hedge_wins) == (1, 1)
    # The window forgets: 61 s later nothing is known and the fallback is back.
    clock.offset += 61
    assert (hedge.current_delay, hedge.samples) == (1.5, 0)
    assert hedge.delay == "p90"


@pytest.mark.parametrize(
    ("wait", "bounds", "expected"), [(0, (0.2, 5.0), 0.2), (0.05, (0.001, 0.02), 0.02)]
)
def test_the_derived_delay_stays_between_its_floor_and_ceiling(
    proxy: Any, pywsgi: Any, wait: float, bounds: tuple[float, float], expected: float
) -> None:
    clock = SteppedClock()
    hedge = Hedge(
        Forward(pywsgi(paced_app)),
        delay="p50",
        min_delay=bounds[0],
        max_delay=bounds[1],
        min_samples=5,
        clock=clock,
    )
    url = proxy(hedge)
    for _ in range(5):
        assert HTTP.request("GET", url + f"/t/wait/{wait}").data == b"A"
    clock.offset += 1.01
    assert (hedge.current_delay, hedge.samples) == (expected, 5)
    snap = hedge.snapshot()
    assert (snap["delay"], snap["current_delay"], snap["samples"]) == ("p50", expected, 5)


def test_requests_that_are_not_hedgeable_are_not_sampled(proxy: Any, pywsgi: Any) -> None:
    clock = SteppedClock()
    hedge = Hedge(Forward(pywsgi(paced_app)), delay="p95", min_samples=1, clock=clock)
    url = proxy(hedge)
    assert HTTP.request("POST", url + "/t/wait/0", body=b"x").data == b"A"
    clock.offset += 1.01
    assert (hedge.current_delay, hedge.samples) == (1.0, 0)  # fallback = max_delay
