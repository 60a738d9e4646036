"""RetryBudget: the counting rule, sharing, Buffer's use of it in a retry storm, metrics."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
import urllib3
from prometheus_client import CollectorRegistry, generate_latest

from oxypy import (
    Buffer,
    ConfigurationError,
    Forward,
    RetryBudget,
    RetryBudgetMetrics,
    RoundRobin,
)

from _servers import RawUpstream

HTTP = urllib3.PoolManager(retries=False, timeout=10)
STORM = "IsNetworkError() && Attempts() < 4"


def hits(up: RawUpstream) -> int:
    """Requests this test sent (path ``/t/...``): a stray connection from another
    process to a reused port cannot change the count."""
    return sum(1 for r in up.requests if r.split(b" ", 2)[1].startswith(b"/t/"))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closing_upstream() -> RawUpstream:
    """Reads each request head and closes the connection: a network error, counted."""

    def handler(sock: socket.socket, data: bytes) -> None:
        pass

    return RawUpstream(handler)


def ok_upstream() -> RawUpstream:
    def handler(sock: socket.socket, data: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    return RawUpstream(handler)


@pytest.fixture
def upstreams() -> Iterator[Callable[[RawUpstream], RawUpstream]]:
    started: list[RawUpstream] = []

    def keep(up: RawUpstream) -> RawUpstream:
        started.append(up)
        return up

    yield keep
    for up in started:
        up.stop()


# -- the rule, in-process ------------------------------------------------------------


def test_retries_stay_under_the_percentage_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(20.0, min_per_second=0.0, window=10.0, clock=clock)
    for _ in range(10):
        budget.request()
    allowed = [budget.try_retry() for _ in range(5)]
    assert allowed == [True, True, False, False, False]
    state = budget.state()
    # Refused retries are not retries; retries are not requests.
    assert (state.requests, state.retries, state.limit) == (10, 2, 2.0)
    assert (state.requests_total, state.retries_total, state.refused_total) == (10, 2, 3)


def test_the_floor_allows_min_per_second_times_window_without_requests() -> None:
    budget = RetryBudget(0.0, min_per_second=0.5, window=4.0, clock=FakeClock())
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]


def test_the_window_rolls() -> None:
    clock = FakeClock()
    budget = RetryBudget(50.0, min_per_second=0.0, window=10.0, clock=clock)
    budget.request()
    budget.request()
    assert budget.try_retry() is True
    assert budget.try_retry() is False
    clock.now += 10.0  # every count has left the window
    assert budget.state().requests == 0
    assert budget.try_retry() is False  # no request in the window: no retry
    budget.request()
    budget.request()
    assert budget.try_retry() is True


def test_a_request_is_counted_once_per_environ_and_budget() -> None:
    one = RetryBudget(clock=FakeClock())
    two = RetryBudget(clock=FakeClock())
    environ: dict[str, Any] = {}
    copy = dict(environ)
    one.request(environ)
    one.request(dict(environ))  # a copy made after the first count shares the mark
    one.request(copy)  # a copy made before it does not
    two.request(environ)
    assert one.state().requests == 2
    assert two.state().requests == 1


def test_greenlets_sharing_a_budget_never_exceed_it() -> None:
    budget = RetryBudget(10.0, min_per_second=0.0, window=60.0, clock=FakeClock())
    for _ in range(100):
        budget.request()
    results: list[bool] = []

    def worker() -> None:
        for _ in range(20):
            results.append(budget.try_retry())
            gevent.sleep(0)

    gevent.joinall([gevent.spawn(worker) for _ in range(10)], timeout=10)
    assert results.count(True) == 10
    assert budget.state().refused_total == 190


@pytest.mark.parametrize(
    "kwargs",
    [
        {"percent": -1},
        {"percent": float("nan")},
        {"percent": True},
        {"min_per_second": float("inf")},
        {"window": 0},
        {"window": "10"},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RetryBudget(**kwargs)


def test_buffer_refuses_a_budget_of_the_wrong_type() -> None:
    with pytest.raises(ConfigurationError, match="retry_budget"):
        Buffer(Forward(), retry="Attempts() < 2", retry_budget=20)  # type: ignore[arg-type]


# -- a retry storm on real upstreams ---------------------------------------------------


def storm(proxy: Any, app: Any, n: int) -> list[int]:
    url = proxy(app)
    return [HTTP.request("GET", f"{url}/t/r{i}").status for i in range(n)]


def test_an_outage_costs_four_requests_each_without_a_budget(proxy: Any, upstreams: Any) -> None:
    bad = upstreams(closing_upstream())
    statuses = storm(proxy, Buffer(Forward(bad.url), retry=STORM), 20)
    assert statuses == [502] * 20
    assert hits(bad) == 80


def test_with_a_budget_an_outage_costs_one_and_a_fifth(proxy: Any, upstreams: Any) -> None:
    bad = upstreams(closing_upstream())
    budget = RetryBudget(20.0, min_per_second=0.0, window=600.0)
    statuses = storm(proxy, Buffer(Forward(bad.url), retry=STORM, retry_budget=budget), 50)
    assert statuses == [502] * 50
    # Request k may retry while retries < 0.2 k: requests 1, 6, 11, ... get one
    # retry each (their second retry is refused), the others none.
    state = budget.state()
    assert (state.requests_total, state.retries_total, state.refused_total) == (50, 10, 50)
    assert hits(bad) == 60


def test_two_upstreams_one_failing_stay_within_the_budget(proxy: Any, upstreams: Any) -> None:
    good, bad = upstreams(ok_upstream()), upstreams(closing_upstream())
    lb = RoundRobin(Forward(), [good.url, bad.url])
    without = storm(proxy, Buffer(lb, retry=STORM), 40)
    assert without == [200] * 40  # every retry goes to the other server
    assert hits(good) + hits(bad) == 60
    good.requests.clear()
    bad.requests.clear()

    budget = RetryBudget(20.0, min_per_second=0.0, window=600.0)
    lb = RoundRobin(Forward(), [good.url, bad.url])
    statuses = storm(proxy, Buffer(lb, retry=STORM, retry_budget=budget), 40)
    total = hits(good) + hits(bad)
    retries = budget.state().retries_total
    assert total == 40 + retries
    assert total / 40 <= 1.25
    assert statuses.count(502) == hits(bad) - retries  # refused: passed through
    assert statuses.count(200) == hits(good)


def test_blocks_sharing_a_budget_share_its_requests(proxy: Any, upstreams: Any) -> None:
    good, bad = upstreams(ok_upstream()), upstreams(closing_upstream())
    budget = RetryBudget(20.0, min_per_second=0.0, window=600.0)
    url_a = proxy(Buffer(Forward(good.url), retry=STORM, retry_budget=budget))
    url_b = proxy(Buffer(Forward(bad.url), retry=STORM, retry_budget=budget))
    assert HTTP.request("GET", url_b + "/t/").status == 502
    assert hits(bad) == 2  # 1 request: 0 retries < 0.2, one retry
    assert HTTP.request("GET", url_b + "/t/").status == 502
    assert hits(bad) == 3  # 2 requests: 1 retry is not < 0.4
    for _ in range(4):
        assert HTTP.request("GET", url_a + "/t/").status == 200
    assert HTTP.request("GET", url_b + "/t/").status == 502
    assert hits(bad) == 5  # 7 requests (4 through A): 1 < 1.4, one retry
    assert budget.state().retries_total == 2


# -- metrics -------------------------------------------------------------------------


def test_metrics_export_the_budget_state() -> None:
    registry = CollectorRegistry()
    budget = RetryBudget(50.0, min_per_second=0.0, window=10.0, clock=FakeClock())
    RetryBudgetMetrics(registry=registry).add("api", budget)
    for _ in range(4):
        budget.request()
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]
    text = generate_latest(registry).decode()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        'oxypy_retry_budget_requests_total{name="api"} 4.0',
        'oxypy_retry_budget_retries_total{name="api"} 2.0',
        'oxypy_retry_budget_refused_total{name="api"} 1.0',
        'oxypy_retry_budget_window_retries{name="api"} 2.0',
        'oxypy_retry_budget_limit{name="api"} 2.0',
    ]
    # A second instance on the same registry adds to the same collector.
    RetryBudgetMetrics(registry=registry).add("other", RetryBudget())
    assert (
        'oxypy_retry_budget_requests_total{name="other"} 0.0' in generate_latest(registry).decode()
    )
