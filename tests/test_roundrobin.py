"""RoundRobin: exact smooth sequences, runtime changes, the 503, real traffic."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import pytest
import urllib3
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import EnvironBuilder

from oxypy import environ as keys
from oxypy.exceptions import ConfigurationError, NoServers, RequestError
from oxypy.forward import Forward
from oxypy.roundrobin import RoundRobin


def target_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Stands in for Forward: answers the target it was given."""
    body = environ[keys.TARGET].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def call(
    app: Any, environ: dict[str, Any] | None = None
) -> tuple[str, list[tuple[str, str]], bytes]:
    """Run ``app`` in-process under LintMiddleware; return status, headers, body."""
    env = EnvironBuilder(path="/").get_environ()
    env.update(environ or {})
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


def picks(app: Any, n: int) -> list[str]:
    return [call(app)[2].decode().removeprefix("http://") for _ in range(n)]


def name_app(name: str) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = name.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


# -- tier 1: pure logic -----------------------------------------------------------


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        pytest.param(["http://a"], "a a a", id="one-server"),
        pytest.param(["http://a", "http://b"], "a b a b", id="simple"),
        pytest.param([("http://a", 3), ("http://b", 1)], "a a b a a a b a", id="smooth-3-1"),
        pytest.param(
            [("http://a", 3), ("http://b", 2), ("http://z", 0)], "a b a b a a b a b a", id="3-2-0"
        ),
        pytest.param(
            [("http://a", 5), ("http://b", 1), ("http://c", 1)], "a a b a c a a", id="nginx-5-1-1"
        ),
        pytest.param([("http://a", 0), ("http://b", 2)], "b b b", id="zero-never-picked"),
    ],
)
def test_exact_sequence(servers: list[Any], expected: str) -> None:
    rr = RoundRobin(target_app, servers)
    assert picks(rr, len(expected.split())) == expected.split()


def test_upsert_same_server_is_not_duplicated() -> None:
    rr = RoundRobin(target_app, ["http://a"])
    rr.upsert_server("http://a")
    rr.upsert_server("HTTP://A:80/")
    assert rr.servers() == ["http://a"]
    assert picks(rr, 3) == ["a", "a", "a"]


def test_upsert_weight_restarts_sequence() -> None:
    rr = RoundRobin(target_app, ["http://a", "http://b"])
    assert picks(rr, 3) == ["a", "b", "a"]
    rr.upsert_server("http://b", weight=3)
    assert picks(rr, 4) == ["b", "a", "b", "b"]
    assert rr.server_weight("http://b") == 3


def test_remove_server() -> None:
    rr = RoundRobin(target_app, ["http://a", "http://b"])
    assert picks(rr, 3) == ["a", "b", "a"]
    rr.remove_server("http://a:80")
    assert picks(rr, 3) == ["b", "b", "b"]
    with pytest.raises(ConfigurationError, match="server not found"):
        rr.remove_server("http://a")


def test_server_weight_and_identity() -> None:
    rr = RoundRobin(target_app, [("http://a:8080/x", 3), ("https://b", 2), ("http://z", 0)])
    assert rr.server_weight("http://A:8080/x") == 3
    assert rr.server_weight("https://b:443") == 2
    assert rr.server_weight("http://z/") == 0
    assert rr.server_weight("http://a:8080/y") is None  # path is part of the identity
    assert rr.server_weight("https://a:8080/x") is None  # so is the scheme
    assert rr.servers() == ["http://a:8080/x", "https://b", "http://z"]


def test_userinfo_never_reaches_the_target() -> None:
    rr = RoundRobin(target_app, ["http://user:pw@a:81"])
    assert rr.servers() == ["http://a:81"]
    assert call(rr)[2] == b"http://a:81"


@pytest.mark.parametrize(
    ("servers", "reason"),
    [
        pytest.param([], b"no servers in the pool\n", id="empty"),
        pytest.param([("http://a", 0), ("http://b", 0)], b"all servers have weight 0\n", id="zero"),
    ],
)
def test_no_server_is_503(servers: list[Any], reason: bytes) -> None:
    status, headers, body = call(RoundRobin(target_app, servers))
    assert status == "503 Service Unavailable"
    assert body == reason
    assert ("Content-Type", "text/plain; charset=utf-8") in headers


def test_custom_error_handler() -> None:
    def teapot(environ: Any, start_response: Any, exc: RequestError) -> Iterable[bytes]:
        assert isinstance(exc, NoServers)
        start_response("418 I'm a teapot", [("Content-Length", "0")])
        return []

    status, _, body = call(RoundRobin(target_app, [], error_handler=teapot))
    assert (status, body) == ("418 I'm a teapot", b"")


def test_next_server_and_empty() -> None:
    rr = RoundRobin(target_app, [("http://a", 2), "http://b"])
    assert [rr.next_server() for _ in range(3)] == ["http://a", "http://b", "http://a"]
    with pytest.raises(NoServers):
        RoundRobin(target_app).next_server()


@pytest.mark.parametrize(
    "servers",
    [
        pytest.param(["ftp://a"], id="scheme"),
        pytest.param(["http://"], id="no-host"),
        pytest.param(["http://a?x=1"], id="query"),
        pytest.param(["http://a:99999"], id="port"),
        pytest.param([("http://a", -1)], id="negative-weight"),
        pytest.param([("http://a", True)], id="bool-weight"),
        pytest.param([("http://a", 1.5)], id="float-weight"),
        pytest.param([("http://a", 1, 2)], id="triple"),
        pytest.param("http://a", id="bare-string"),
        pytest.param([42], id="not-a-string"),
    ],
)
def test_configuration_errors(servers: Any) -> None:
    with pytest.raises(ConfigurationError):
        RoundRobin(target_app, servers)


def test_runtime_upsert_validates() -> None:
    rr = RoundRobin(target_app, ["http://a"])
    with pytest.raises(ConfigurationError):
        rr.upsert_server("http://b", weight=-2)
    with pytest.raises(ConfigurationError):
        rr.upsert_server("nope")
    assert rr.servers() == ["http://a"]


def test_target_is_set_on_a_copy() -> None:
    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.append(environ)
        return target_app(environ, start_response)

    rr = RoundRobin(app, ["http://a"])
    env = EnvironBuilder(path="/").get_environ()
    result = rr(env, lambda status, headers, exc=None: lambda data: None)
    assert list(result) == [b"http://a"]
    assert keys.TARGET not in env
    assert seen[0] is not env and seen[0][keys.TARGET] == "http://a"


def test_tried_targets_are_avoided_and_recorded() -> None:
    rr = RoundRobin(target_app, [("http://a", 5), "http://b", "http://c"])
    tried: set[str] = {"http://a"}
    got = [call(rr, {keys.TRIED_TARGETS: tried})[2] for _ in range(2)]
    assert sorted(got) == [b"http://b", b"http://c"]
    assert tried == {"http://a", "http://b", "http://c"}
    # Everything tried: the balancer still answers rather than failing.
    assert call(rr, {keys.TRIED_TARGETS: tried})[2] in {b"http://a", b"http://b", b"http://c"}


def test_skip_passes_straight_through() -> None:
    def plain(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok" if keys.TARGET not in environ else b"no"]

    rr = RoundRobin(plain, [], skip=lambda environ: environ["PATH_INFO"] == "/")
    assert call(rr)[:1] == ("200 OK",)
    assert call(rr)[2] == b"ok"


def test_on_change_added_removed() -> None:
    events: list[tuple[str, str]] = []
    rr = RoundRobin(target_app, ["http://a"], on_change=lambda url, ev: events.append((url, ev)))
    rr.upsert_server("http://b", weight=2)
    rr.upsert_server("http://b", weight=3)  # a weight change is not an "added"
    rr.remove_server("http://a")
    assert events == [("http://a", "added"), ("http://b", "added"), ("http://a", "removed")]


# -- tier 2: real upstreams ---------------------------------------------------------


@pytest.fixture
def http() -> Any:
    pool = urllib3.PoolManager(maxsize=64, retries=False, timeout=10)
    yield pool
    pool.clear()


def test_weighted_distribution_over_1000_requests(pywsgi: Any, proxy: Any, http: Any) -> None:
    a, b, c = pywsgi(name_app("a")), pywsgi(name_app("b")), pywsgi(name_app("c"))
    rr = RoundRobin(Forward(), [(a, 3), (b, 1), (c, 0)])
    url = proxy(rr)
    got = [http.request("GET", url + "/").data.decode() for _ in range(1000)]
    assert collections.Counter(got) == {"a": 750, "b": 250}
    assert got[:8] == ["a", "a", "b", "a", "a", "a", "b", "a"]


def test_unweighted_distribution(pywsgi: Any, proxy: Any, http: Any) -> None:
    ups = [pywsgi(name_app(n)) for n in "abcd"]
    url = proxy(RoundRobin(Forward(), ups))
    got = [http.request("GET", url + "/").data.decode() for _ in range(1000)]
    assert collections.Counter(got) == {"a": 250, "b": 250, "c": 250, "d": 250}
    assert got[:8] == list("abcdabcd")


def test_empty_pool_over_http(proxy: Any, http: Any) -> None:
    resp = http.request("GET", proxy(RoundRobin(Forward(), [])) + "/x")
    assert resp.status == 503
    assert resp.data == b"no servers in the pool\n"


def slow_name_app(name: str, delay: float) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        gevent.sleep(delay)
        body = name.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


def test_upsert_remove_under_50_concurrent_requests(pywsgi: Any, proxy: Any, http: Any) -> None:
    a, b, c = (pywsgi(slow_name_app(n, 0.02)) for n in "abc")
    rr = RoundRobin(Forward(), [a, b])
    url = proxy(rr)
    results: list[tuple[int, bytes]] = []

    def client() -> None:
        for _ in range(6):
            resp = http.request("GET", url + "/")
            results.append((resp.status, resp.data))

    clients = [gevent.spawn(client) for _ in range(50)]
    gevent.sleep(0.03)
    for step in range(10):  # churn the pool while the requests are in flight
        rr.upsert_server(c, weight=step % 3 + 1)
        gevent.sleep(0.005)
        rr.remove_server(a)
        gevent.sleep(0.005)
        rr.upsert_server(a)
        rr.upsert_server(b, weight=2)
        gevent.sleep(0.005)
        rr.remove_server(c)
    gevent.joinall(clients, timeout=30, raise_error=True)
    assert len(results) == 300
    assert all(status == 200 for status, _ in results), collections.Counter(results)
    assert {body for _, body in results} <= {b"a", b"b", b"c"}
    assert sorted(rr.servers()) == sorted([a, b])
