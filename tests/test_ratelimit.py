"""RateLimit: oxy's bucket/bucketset/tokenlimiter tests as behaviour, plus what oxy got wrong."""

from __future__ import annotations

import http.client
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from oxypy.errors import default_error_handler
from oxypy.exceptions import ConfigurationError, RequestError
from oxypy.forward import Forward
from oxypy.ratelimit import MemoryStore, Rate, RateLimit, _go_duration
from oxypy.server import Server


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += seconds


def hello(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


# -- the bucket (oxy ratelimit/bucket_test.go, bucketset_test.go) -------------------


def test_single_token() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    rate = [Rate(1, 1.0, burst=1)]
    assert store.hit("a", rate).allowed
    v = store.hit("a", rate)
    assert (v.allowed, v.retry_in) == (False, 1.0)
    clock.step(1)
    assert store.hit("a", rate).allowed
    clock.step(5)  # idle: the bucket caps at burst
    assert store.hit("a", rate).allowed
    assert store.hit("a", rate).retry_in == 1.0


def test_fractional_refill_delay_is_exact() -> None:
    """oxy reports 1 s at +200 ms and +900 ms; the true waits are 800 ms and 100 ms."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    rate = [Rate(1, 1.0, burst=1)]
    assert store.hit("a", rate).allowed
    clock.step(0.2)
    assert store.hit("a", rate).retry_in == pytest.approx(0.8)
    clock.step(0.7)
    assert store.hit("a", rate).retry_in == pytest.approx(0.1)
    clock.step(0.1)
    assert store.hit("a", rate).allowed


def test_burst_then_rate() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    rate = [Rate(3, 1.0, burst=5)]
    assert [store.hit("a", rate).allowed for _ in range(6)] == [True] * 5 + [False]
    wait = store.hit("a", rate).retry_in
    assert wait == pytest.approx(1 / 3)
    clock.step(wait)  # waiting exactly the delay lets exactly one through
    assert [store.hit("a", rate).allowed for _ in range(2)] == [True, False]


def test_refill_up_to_burst() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    rate = [Rate(2, 1.0, burst=5)]
    assert all(store.hit("a", rate).allowed for _ in range(5))
    clock.step(2)
    assert [store.hit("a", rate).allowed for _ in range(5)] == [True] * 4 + [False]
    clock.step(60)
    assert [store.hit("a", rate).allowed for _ in range(6)] == [True] * 5 + [False]


def test_several_rates_all_must_allow_and_roll_back() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    rates = [Rate(1, 1.0, burst=1), Rate(10, 60.0, burst=3)]  # 6 s per token, 3 max
    assert store.hit("a", rates).allowed
    v = store.hit("a", rates)
    assert (v.allowed, v.retry_in) == (False, 1.0)  # limited by the 1st
    assert v.debts == (1.0, 6.0)  # the 2nd bucket was rolled back
    clock.step(1)
    assert store.hit("a", rates).allowed
    clock.step(1)
    assert store.hit("a", rates).allowed
    clock.step(1)
    v = store.hit("a", rates)
    assert not v.allowed and v.retry_in == pytest.approx(3.0)  # limited by the 2nd
    assert v.debts == pytest.approx((0.0, 15.0))  # the 1st was rolled back
    clock.step(3)
    assert store.hit("a", rates).allowed


def test_isolation_per_key() -> None:
    store = MemoryStore(clock=FakeClock())
    rate = [Rate(1, 1.0)]
    assert store.hit("a", rate).allowed
    assert not store.hit("a", rate).allowed
    assert store.hit("b", rate).allowed


def test_busy_source_never_gets_a_free_burst() -> None:
    """oxy drops a source's buckets 10*period+1 s after creation, granting a new burst."""
    clock = FakeClock()
    store = MemoryStore(capacity=64, clock=clock)
    rate = [Rate(1, 1.0, burst=5)]
    others = [f"o{i}" for i in range(8)]
    admitted = 0
    steps = 2 * 3600 * 4  # two hours, one request every 250 ms
    for i in range(steps):
        admitted += store.hit("busy", rate).allowed
        store.hit(others[i % len(others)], rate)
        clock.step(0.25)
    assert admitted == 5 + steps // 4 - 1  # burst + exactly the rate, never more


def test_capacity_keeps_the_spent_bucket() -> None:
    clock = FakeClock()
    store = MemoryStore(capacity=2, clock=clock)
    slow = [Rate(1, 10.0, burst=1)]
    fast = [Rate(10, 1.0, burst=1)]  # 100 ms per token
    assert store.hit("busy", slow).allowed  # spent for 10 s, and the coldest entry
    assert store.hit("quick", fast).allowed  # spent for 100 ms
    clock.step(1)  # quick is full again, busy is not
    assert store.hit("newcomer", slow).allowed
    assert store.evicted_busy == 0
    v = store.hit("busy", slow)
    assert not v.allowed and v.retry_in == pytest.approx(9.0)


def test_capacity_bound_holds_under_pressure() -> None:
    clock = FakeClock()
    store = MemoryStore(capacity=10, clock=clock)
    rate = [Rate(1, 60.0)]
    for i in range(100):
        store.hit(f"k{i}", rate)
    assert len(store) == 10
    assert store.evicted_busy == 90


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(1.5, "1.5s", id="1.5s"),
        pytest.param(0.1, "100ms", id="100ms"),
        pytest.param(1 / 3, "333.333333ms", id="third"),
        pytest.param(0.0005, "500us", id="us"),
        pytest.param(2e-7, "200ns", id="ns"),
        pytest.param(0, "0s", id="zero"),
        pytest.param(1, "1s", id="1s"),
        pytest.param(90.5, "1m30.5s", id="minutes"),
        pytest.param(3600, "1h0m0s", id="hour"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert _go_duration(seconds) == text


@pytest.mark.parametrize(
    ("kwargs"),
    [
        pytest.param({"average": 0}, id="zero-average"),
        pytest.param({"average": -1}, id="negative-average"),
        pytest.param({"average": float("inf")}, id="inf-average"),
        pytest.param({"average": 1, "period": 0}, id="zero-period"),
        pytest.param({"average": 1, "burst": 0}, id="zero-burst"),
        pytest.param({"average": 1, "burst": 1.5}, id="float-burst"),
        pytest.param({"average": "1"}, id="string-average"),
        pytest.param({"average": True}, id="bool-average"),
    ],
)
def test_rate_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Rate(**kwargs)


def test_rate_defaults() -> None:
    assert Rate(10).burst == 10 and Rate(10).period == 1.0
    assert Rate(0.5).burst == 1
    assert Rate(10, 60.0, burst=20).name == "10/60s"


@pytest.mark.parametrize(
    ("kwargs"),
    [
        pytest.param({"rates": []}, id="no-rates"),
        pytest.param({"rates": [1]}, id="not-a-rate"),
        pytest.param({"rates": [Rate(1)], "capacity": 0}, id="zero-capacity"),
        pytest.param({"rates": [Rate(1)], "rates_for": 3}, id="rates-for-not-callable"),
        pytest.param({"rates": [Rate(1)], "source": "nope"}, id="bad-source"),
        pytest.param({"rates": [Rate(1)], "missing": "pool"}, id="bad-missing"),
    ],
)
def test_ratelimit_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RateLimit(hello, **kwargs)


# -- the middleware in-process (oxy tokenlimiter_test.go) ----------------------------


def client(app: Any) -> Client:
    return Client(LintMiddleware(app))


def get(c: Client, key: str | None = "a", **headers: str) -> Any:
    if key is not None:
        headers["Source"] = key
    return c.get("/", headers=headers)


def test_hit_limit_then_recover() -> None:
    clock = FakeClock()
    c = client(RateLimit(hello, rates=[Rate(1)], source="request.header.Source", clock=clock))
    assert get(c).status_code == 200
    r = get(c)
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "1"
    assert r.headers["X-Retry-In"] == "1s"
    assert r.headers["RateLimit-Policy"] == '"1/1s";q=1;w=1'
    assert r.headers["RateLimit"] == '"1/1s";r=0;t=1'
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.get_data() == b"rate limit reached, retry in 1s\n"
    clock.step(1)
    assert get(c).status_code == 200


@pytest.mark.parametrize(
    ("step", "retry_after", "retry_in"),
    [
        pytest.param(0.0, "10", "10s", id="10s"),
        pytest.param(8.5, "2", "1.5s", id="1.5s-rounds-up"),
        pytest.param(9.9, "1", "100ms", id="100ms-is-1-not-0"),
        pytest.param(9.999, "1", "1ms", id="1ms"),
    ],
)
def test_retry_after_rounds_up(step: float, retry_after: str, retry_in: str) -> None:
    clock = FakeClock(0.0)
    app = RateLimit(hello, rates=[Rate(1, 10.0)], source="request.header.Source", clock=clock)
    c = client(app)
    assert get(c).status_code == 200
    clock.step(step)
    r = get(c)
    assert (r.status_code, r.headers["Retry-After"], r.headers["X-Retry-In"]) == (
        429,
        retry_after,
        retry_in,
    )


def test_isolation() -> None:
    c = client(RateLimit(hello, rates=[Rate(1)], source="request.header.Source", clock=FakeClock()))
    assert [get(c, "a").status_code, get(c, "a").status_code] == [200, 429]
    assert get(c, "b").status_code == 200


def test_expiration_after_a_day() -> None:
    clock = FakeClock()
    c = client(RateLimit(hello, rates=[Rate(1)], source="request.header.Source", clock=clock))
    assert [get(c).status_code, get(c).status_code] == [200, 429]
    clock.step(24 * 3600)
    assert get(c).status_code == 200


def test_rates_for_overrides_defaults() -> None:
    clock = FakeClock()

    def tier(environ: dict[str, Any]) -> list[Rate] | None:
        if environ.get("HTTP_TIER") == "gold":
            return [Rate(2, 1.0), Rate(10, 60.0)]
        return None

    c = client(
        RateLimit(
            hello, rates=[Rate(1)], source="request.header.Source", rates_for=tier, clock=clock
        )
    )
    assert [get(c, "g", Tier="gold").status_code for _ in range(3)] == [200, 200, 429]
    clock.step(1)
    assert get(c, "g", Tier="gold").status_code == 200
    assert [get(c, "s").status_code for _ in range(2)] == [200, 429]  # default 1/s


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda environ: [1, 2], id="not-rates"),
        pytest.param(lambda environ: 7, id="not-a-list"),
        pytest.param(lambda environ: 1 / 0, id="raises"),
    ],
)
def test_rates_for_garbage_goes_through_error_handler(
    broken: Callable[[dict[str, Any]], Any], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[RequestError] = []

    def handler(environ: Any, start_response: Any, exc: RequestError) -> Iterable[bytes]:
        seen.append(exc)
        return default_error_handler(environ, start_response, exc)

    c = client(
        RateLimit(
            hello,
            rates=[Rate(1)],
            source="request.header.Source",
            rates_for=broken,
            error_handler=handler,
        )
    )
    with caplog.at_level(logging.ERROR, logger="oxypy.ratelimit"):
        r = get(c)
    assert (r.status_code, r.get_data()) == (500, b"rate limit misconfigured: rates_for failed\n")
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert len(seen) == 1 and seen[0].__cause__ is not None
    assert any("rates_for failed" in rec.getMessage() for rec in caplog.records)


def test_rate_headers_on_success() -> None:
    clock = FakeClock()
    app = RateLimit(
        hello,
        rates=[Rate(10, 1.0), Rate(100, 60.0)],
        source="request.header.Source",
        ratelimit_headers=True,
        clock=clock,
    )
    c = client(app)
    r = get(c)
    assert r.status_code == 200 and r.get_data() == b"hello"
    assert r.headers["RateLimit-Policy"] == '"10/1s";q=10;w=1, "100/60s";q=100;w=60'
    assert r.headers["RateLimit"] == '"10/1s";r=9;t=1, "100/60s";r=99;t=1'
    for _ in range(8):
        get(c)
    assert get(c).headers["RateLimit"] == '"10/1s";r=0;t=1, "100/60s";r=90;t=6'


def test_no_rate_headers_on_success_by_default() -> None:
    c = client(RateLimit(hello, rates=[Rate(1)], source="request.header.Source"))
    r = get(c)
    assert r.status_code == 200 and "RateLimit" not in r.headers


def test_custom_error_handler() -> None:
    def teapot(environ: Any, start_response: Any, exc: RequestError) -> list[bytes]:
        start_response("418 I'm a teapot", [("Content-Length", "0")] + exc.headers)
        return [b""]

    app = RateLimit(hello, rates=[Rate(1)], source="request.header.Source", error_handler=teapot)
    c = client(app)
    assert get(c).status_code == 200
    r = get(c)
    assert r.status_code == 418 and r.headers["Retry-After"] == "1"


def test_skip() -> None:
    app = RateLimit(
        hello,
        rates=[Rate(1)],
        source="request.header.Source",
        skip=lambda e: e.get("PATH_INFO") == "/health",
    )
    c = client(app)
    assert [c.get("/health", headers={"Source": "a"}).status_code for _ in range(3)] == [200] * 3
    assert [get(c).status_code, get(c).status_code] == [200, 429]


@pytest.mark.parametrize(
    ("missing", "statuses"),
    [
        pytest.param("reject", [400, 400, 400], id="reject"),
        pytest.param("shared", [200, 429, 429], id="shared"),
        pytest.param("skip", [200, 200, 200], id="skip"),
    ],
)
def test_missing_source(missing: Any, statuses: list[int]) -> None:
    app = RateLimit(hello, rates=[Rate(1)], source="request.header.Source", missing=missing)
    c = client(app)
    assert [get(c, None).status_code for _ in range(3)] == statuses
    assert get(c, "a").status_code == 200  # a real source is never in the shared bucket


def test_missing_reject_body() -> None:
    r = get(client(RateLimit(hello, rates=[Rate(1)], source="request.header.Source")), None)
    assert r.get_data() == b"no request.header.Source to limit this request by\n"


# -- over real sockets --------------------------------------------------------------


def fetch(url: str, path: str = "/", headers: dict[str, str] | None = None) -> Any:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_through_forward(proxy: Any, echo_upstream: str) -> None:
    url = proxy(RateLimit(Forward(echo_upstream), rates=[Rate(2, 60.0)], ratelimit_headers=True))
    for remaining in (1, 0):
        status, headers, body = fetch(url, "/x?y=1")
        assert status == 200
        assert json.loads(body)["path"] == "/x"
        assert headers["RateLimit"] == f'"2/60s";r={remaining};t={30 * (2 - remaining)}'
    status, headers, body = fetch(url)
    assert (status, headers["Retry-After"]) == (429, "30")
    assert re.fullmatch(r"29\.\d+s|30s", headers["X-Retry-In"])  # the real clock moved on
    assert body == f"rate limit reached, retry in {headers['X-Retry-In']}\n".encode()


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_and_ipv4_clients_are_separate_sources(echo_upstream: str) -> None:
    limited = LintMiddleware(RateLimit(Forward(echo_upstream), rates=[Rate(1, 60.0)]))
    v6 = Server(limited, "[::1]:0", graceful_timeout=1).start()
    v4 = Server(limited, "127.0.0.1:0", graceful_timeout=1).start()
    try:
        assert fetch(v6.url)[0] == 200
        assert fetch(v6.url)[0] == 429  # ::1 is one source, not "[" shared by all of IPv6
        assert fetch(v4.url)[0] == 200  # 127.0.0.1 is another
        assert fetch(v4.url)[0] == 429
    finally:
        v6.stop(timeout=1)
        v4.stop(timeout=1)
