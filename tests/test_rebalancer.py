"""Rebalancer: oxy's tables with fixed meters and a stepped clock, plus real 5xx traffic."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import urllib3
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import EnvironBuilder

from oxypy import environ as keys
from oxypy.exceptions import ConfigurationError
from oxypy.forward import Forward
from oxypy.rebalancer import CodeMeter, Rebalancer, split_float64
from oxypy.roundrobin import RoundRobin
from oxypy.sticky import StickySession


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FixedMeter:
    """oxy's testMeter: a fixed rating, always ready."""

    def __init__(self, ratings: dict[str, float], url: str) -> None:
        self.ratings, self.url = ratings, url

    def rating(self) -> float:
        return self.ratings.get(self.url, 0.0)

    def record(self, status: int, latency: float) -> None:
        pass

    def is_ready(self) -> bool:
        return True


def target_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = environ[keys.TARGET].encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


def call(app: Any, cookie: str | None = None) -> tuple[str, bytes]:
    headers = [("Cookie", cookie)] if cookie else []
    env = EnvironBuilder(path="/", headers=headers).get_environ()
    seen: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        seen.append(status)
        return lambda data: None

    result = LintMiddleware(app)(env, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()  # type: ignore[attr-defined]
    return seen[0], body


def make(
    servers: list[Any], ratings: dict[str, float], **rr_options: Any
) -> tuple[Rebalancer, RoundRobin, FakeClock]:
    clock = FakeClock()
    rr = RoundRobin(target_app, servers, **rr_options)
    rb = Rebalancer(rr, clock=clock, meter=lambda url: FixedMeter(ratings, url))
    return rb, rr, clock


def rounds(rb: Rebalancer, clock: FakeClock, n: int) -> None:
    """One request per round, the backoff expired before each (as oxy's tests do)."""
    for _ in range(n):
        clock.now += rb.backoff + 1
        assert call(rb)[0] == "200 OK"


def weights(rb: Rebalancer) -> list[int | None]:
    return [rb.server_weight(u) for u in rb.servers()]


# -- tier 1 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        pytest.param([0, 1], {1}, id="0-1"),
        pytest.param([0.15, 0.1], set(), id="close"),
        pytest.param([0.012, 0.01, 1], {2}, id="one-high"),
        pytest.param([0, 0.01, 0.1, 0], {1, 2}, id="sentinel-even"),
        pytest.param([0, 0, 0, 0, 0, 0.01, 0.02, 1], {5, 6, 7}, id="eight"),
        pytest.param([0, 0.01, 0.02, 1], {3}, id="four"),
        pytest.param([0.12, 0.13, 0.11], set(), id="all-bad-similar"),
        pytest.param([], set(), id="empty"),
    ],
)
def test_split_ratios(values: list[float], bad: set[int]) -> None:
    assert split_float64(1.5, 0.0, values) == bad


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        Rebalancer(target_app)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Rebalancer(RoundRobin(target_app), backoff=-1)


def test_error_handler_is_deprecated_and_ignored() -> None:
    def never(environ: Any, start_response: Any, exc: Exception) -> Iterable[bytes]:
        raise AssertionError("the Rebalancer never answers errors itself")

    with pytest.warns(DeprecationWarning, match="error_handler"):
        rb = Rebalancer(RoundRobin(target_app, []), error_handler=never)
    assert call(rb) == ("503 Service Unavailable", b"no servers in the pool\n")


def test_normal_operation_and_no_servers() -> None:
    rb, _, _ = make(["http://a"], {})
    assert [call(rb)[1] for _ in range(3)] == [b"http://a"] * 3
    assert rb.servers() == ["http://a"]
    empty, _, _ = make([], {})
    assert call(empty) == ("503 Service Unavailable", b"no servers in the pool\n")


def test_remove_server() -> None:
    rb, _, _ = make(["http://a", "http://b"], {})
    assert [call(rb)[1] for _ in range(3)] == [b"http://a", b"http://b", b"http://a"]
    rb.remove_server("http://a")
    assert [call(rb)[1] for _ in range(3)] == [b"http://b"] * 3
    with pytest.raises(ConfigurationError):
        rb.remove_server("http://a")


def test_recovery() -> None:
    ratings = {"http://a": 0.3, "http://b": 0.0}
    rb, rr, clock = make(["http://a", "http://b"], ratings)
    rounds(rb, clock, 6)
    assert weights(rb) == [1, 4096]
    assert rr.server_weight("http://b") == 4096  # applied to the inner balancer
    rounds(rb, clock, 1)
    assert weights(rb) == [1, 4096]  # capped
    ratings["http://a"] = 0.0
    rounds(rb, clock, 6)
    assert weights(rb) == [1, 1]


def test_backoff_holds_changes() -> None:
    rb, _, clock = make(["http://a", "http://b"], {"http://a": 0.3})
    rounds(rb, clock, 1)
    assert weights(rb) == [1, 4]
    for _ in range(5):  # clock not past the backoff: nothing moves
        call(rb)
    clock.now += rb.backoff - 0.5
    call(rb)
    assert weights(rb) == [1, 4]
    clock.now += 1
    call(rb)
    assert weights(rb) == [1, 16]


def test_cascading() -> None:
    ratings = {"http://a": 0.3, "http://b": 0.0, "http://d": 0.0}
    rb, _, clock = make(["http://a", "http://b", "http://d"], ratings)
    rounds(rb, clock, 6)
    assert weights(rb) == [1, 4096, 4096]
    ratings.update({"http://a": 0.3, "http://b": 0.2, "http://d": 0.2})
    rounds(rb, clock, 6)
    assert weights(rb) == [1, 1, 1]


def test_all_bad_keeps_weights() -> None:
    ratings = {"http://a": 0.12, "http://b": 0.13, "http://c": 0.11}
    rb, _, clock = make(["http://a", "http://b", "http://c"], ratings)
    rounds(rb, clock, 6)
    assert weights(rb) == [1, 1, 1]


def test_reset_on_change_restores_configured_weights() -> None:
    ratings = {"http://a": 0.3}
    rb, _, clock = make([("http://a", 1), ("http://b", 2), ("http://c", 3)], ratings)
    rounds(rb, clock, 2)
    assert weights(rb) != [1, 2, 3]
    rb.remove_server("http://c")
    assert weights(rb) == [1, 2]


def test_upsert_never_duplicates() -> None:
    rb, rr, clock = make(["http://a", "http://b"], {"http://a": 0.3})
    rounds(rb, clock, 2)
    rb.upsert_server("http://a", weight=2)
    rb.upsert_server("HTTP://A:80/", weight=2)
    assert rb.servers() == rr.servers() == ["http://a", "http://b"]
    assert weights(rb) == [2, 1]
    assert len(rb._records) == 2
    # A change made on the inner balancer directly is picked up as configuration.
    rr.upsert_server("http://c", weight=5)
    rounds(rb, clock, 1)
    assert rb.servers() == ["http://a", "http://b", "http://c"] and len(rb._records) == 3


def test_sticky_sessions_of_the_inner_balancer_are_honoured() -> None:
    rb, rr, _ = make(
        ["http://a", "http://b", "http://x"], {}, sticky=StickySession("test", value="raw")
    )
    assert {call(rb, "test=http://a")[1] for _ in range(5)} == {b"http://a"}
    rr.remove_server("http://a")
    assert [call(rb, "test=http://a")[1] for _ in range(3)] == [
        b"http://b",
        b"http://x",
        b"http://b",
    ]
    rb.remove_server("http://b")
    assert [call(rb, "test=http://b")[1] for _ in range(3)] == [b"http://x"] * 3


@pytest.mark.parametrize(
    ("codes", "rating"),
    [
        pytest.param([200] * 9 + [500], 0.1, id="one-500"),
        pytest.param([502, 504, 200, 200], 0.5, id="gateway"),
        pytest.param([505, 499, 404, 200], 0.0, id="outside-500-504"),
    ],
)
def test_code_meter(codes: list[int], rating: float) -> None:
    clock = FakeClock()
    meter = CodeMeter(clock)
    for code in codes:
        meter.record(code, 0.01)
    assert meter.rating() == pytest.approx(rating)
    assert not meter.is_ready()
    for _ in range(10):
        clock.now += 1
        meter.record(200, 0.01)
    assert meter.is_ready()


# -- tier 2: the default meter over real traffic -------------------------------------


def status_app(name: str, status: str) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = name.encode()
        start_response(status, [("Content-Length", str(len(body)))])
        return [body]

    return app


def test_live_traffic_raises_good_servers(pywsgi: Any, proxy: Any) -> None:
    a, b = pywsgi(status_app("a", "200 OK")), pywsgi(status_app("b", "200 OK"))
    bad = pywsgi(status_app("bad", "500 Internal Server Error"))
    clock = FakeClock()
    rb = Rebalancer(RoundRobin(Forward(), [a, b, bad]), backoff=0.001, clock=clock)
    url = proxy(rb)
    http = urllib3.PoolManager(retries=False, timeout=10)
    statuses: collections.Counter[int] = collections.Counter()
    seen = []
    for _ in range(40):  # one second per request: the meters fill their 10 buckets
        clock.now += 1
        statuses[http.request("GET", url + "/").status] += 1
        seen.append(weights(rb))
        if seen[-1] == [4096, 4096, 1]:
            break
    # Nothing moves until every meter is ready (10 buckets each), then x4 per step.
    assert seen[-7:] == [
        [1, 1, 1],
        [4, 4, 1],
        [16, 16, 1],
        [64, 64, 1],
        [256, 256, 1],
        [1024, 1024, 1],
        [4096, 4096, 1],
    ]
    assert all(w == [1, 1, 1] for w in seen[:-6]) and len(seen) >= 30
    before = statuses[500]
    for _ in range(200):
        statuses[http.request("GET", url + "/").status] += 1
    assert statuses[500] - before <= 2  # 1 in 8193 picks
    http.clear()
