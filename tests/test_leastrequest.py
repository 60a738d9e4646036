"""LeastRequest: weighted P2C, in-flight accounting that never leaks, slow-server steering."""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import pytest
import urllib3
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import EnvironBuilder

from oxypy import environ as keys
from oxypy.exceptions import ConfigurationError
from oxypy.forward import Forward
from oxypy.leastrequest import LeastRequest


def target_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = environ[keys.TARGET].encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


def start(app: Any) -> Any:
    env = EnvironBuilder(path="/").get_environ()
    return LintMiddleware(app)(env, lambda status, headers, exc=None: lambda data: None)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"choice_count": 0}, id="zero"),
        pytest.param({"choice_count": True}, id="bool"),
        pytest.param({"choice_count": 2.0}, id="float"),
    ],
)
def test_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        LeastRequest(target_app, ["http://a"], **options)


def test_idle_picks_follow_weights() -> None:
    lb = LeastRequest(target_app, [("http://a", 3), ("http://b", 1)], rng=random.Random(7))
    counts: collections.Counter[bytes] = collections.Counter()
    for _ in range(4000):
        result = start(lb)
        counts[b"".join(result)] += 1
        result.close()
    assert 2850 <= counts[b"http://a"] <= 3150  # 3:1 within about 5 sigma
    assert counts[b"http://a"] + counts[b"http://b"] == 4000


def test_in_flight_prefers_the_idle_server() -> None:
    lb = LeastRequest(target_app, ["http://a", "http://b"], rng=random.Random(1))
    held = [start(lb) for _ in range(10)]
    bodies = collections.Counter(b"".join(r) for r in held)
    # P2C: a pick goes to the server with fewer in flight whenever both are drawn.
    assert abs(bodies[b"http://a"] - bodies[b"http://b"]) <= 4
    assert lb.in_flight("http://a") == bodies[b"http://a"]
    for result in held:
        result.close()
        result.close()  # idempotent
    assert (lb.in_flight("http://a"), lb.in_flight("http://b")) == (0, 0)
    assert lb.in_flight("http://zzz") is None


def test_in_flight_released_when_next_raises() -> None:
    def boom(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise RuntimeError("bug below")

    lb = LeastRequest(boom, ["http://a"])
    env = EnvironBuilder(path="/").get_environ()
    with pytest.raises(RuntimeError):
        lb(env, lambda s, h, e=None: lambda d: None)
    assert lb.in_flight("http://a") == 0


def test_removed_server_still_releases() -> None:
    lb = LeastRequest(target_app, ["http://a", "http://b"])
    held = [start(lb) for _ in range(4)]
    lb.remove_server("http://a")
    lb.upsert_server("http://a")
    for result in held:
        list(result)
        result.close()
    assert (lb.in_flight("http://a"), lb.in_flight("http://b")) == (0, 0)


def test_empty_pool_503() -> None:
    seen: list[str] = []
    env = EnvironBuilder(path="/").get_environ()

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        seen.append(status)

    body = LeastRequest(target_app, [])(env, start_response)
    assert seen == ["503 Service Unavailable"] and list(body) == [b"no servers in the pool\n"]


# -- tier 2 ----------------------------------------------------------------------------


def named(name: str, delay: float) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if delay:
            gevent.sleep(delay)
        body = name.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


def test_steers_away_from_a_slow_server(pywsgi: Any, proxy: Any) -> None:
    # The steering follows the latency ratio (slow's share ~ fast/slow latency):
    # slow is 0.25 s so that even a fast server slowed to 50 ms by a loaded
    # machine (all upstreams share this process) leaves slow well under 25 %.
    fast, slow = pywsgi(named("fast", 0.0)), pywsgi(named("slow", 0.25))
    lb = LeastRequest(Forward(), [fast, slow], rng=random.Random(3))
    url = proxy(lb)
    http = urllib3.PoolManager(maxsize=32, retries=False, timeout=10)
    got: list[bytes] = []

    def client() -> None:
        for _ in range(400 // 32 + 1):
            if len(got) >= 400:
                return
            resp = http.request("GET", url + "/")
            assert resp.status == 200
            got.append(resp.data)

    gevent.joinall([gevent.spawn(client) for _ in range(32)], timeout=30, raise_error=True)
    http.clear()
    counts = collections.Counter(got[:400])
    assert sum(counts.values()) == 400
    assert counts[b"slow"] < 100, counts  # < 25 %
    assert (lb.in_flight(fast), lb.in_flight(slow)) == (0, 0)


def test_network_errors_release_in_flight(proxy: Any) -> None:
    lb = LeastRequest(Forward(), ["http://127.0.0.1:1"])
    http = urllib3.PoolManager(retries=False, timeout=10)
    assert http.request("GET", proxy(lb) + "/").status == 502
    assert lb.in_flight("http://127.0.0.1:1") == 0
