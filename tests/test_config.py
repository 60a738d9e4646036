"""The TOML gateway: loading, every error kind, serving, hot reload, state across reloads.

Upstreams are real pywsgi servers on 127.0.0.1; the gateway is served by
``oxypy.Server``; ``oxypy check`` / ``oxypy run`` and gunicorn run as
subprocesses.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.event import Event

import oxypy
from oxypy import ConfigFileError, Gateway, Server, load_config
from oxypy.config import chain_blocks, reference_markdown

import _servers
from _servers import OxypyProcess, start_pywsgi, url_of
from _ws import WSEchoUpstream

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "gateway.toml"


def named(name: str) -> Callable[..., Any]:
    """An upstream app answering ``{"app": name, "path": ..., "prefix": ...}``."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = json.dumps(
            {
                "app": name,
                "path": environ["PATH_INFO"],
                "prefix": environ.get("HTTP_X_FORWARDED_PREFIX"),
            }
        ).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    return app


@pytest.fixture
def upstreams() -> Iterator[dict[str, str]]:
    servers = {name: start_pywsgi(named(name)) for name in ("web", "api1", "api2", "other")}
    try:
        yield {name: url_of(server) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop(timeout=1)


@pytest.fixture
def dead_url() -> str:
    return _servers.dead_url()


def example_text(urls: dict[str, str]) -> str:
    text = EXAMPLE.read_text()
    text = text.replace("http://127.0.0.1:9001", urls["web"])
    text = text.replace("http://127.0.0.1:9002", urls["api1"])
    text = text.replace("http://127.0.0.1:9003", urls["api2"])
    return text.replace('"127.0.0.1:8080"', '"127.0.0.1:0"')


class Served:
    """A gateway on ``oxypy.Server`` (port 0) with a small HTTP client."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.server = Server(gateway, "127.0.0.1:0").start()
        self.port = self.server.address[1]

    def get(
        self, path: str, host: str = "gw.test", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": host, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.server.stop(timeout=1)
        self.gateway.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Gateway], Served]]:
    started: list[Served] = []

    def start(gateway: Gateway) -> Served:
        served = Served(gateway)
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()


def app_of(body: bytes) -> tuple[str, str]:
    doc = json.loads(body)
    return doc["app"], doc["path"]


# -- the complete example --------------------------------------------------------


def test_example_file_loads_and_serves_its_three_routes(
    upstreams: dict[str, str], serve: Callable[[Gateway], Served], dead_url: str
) -> None:
    gateway = load_config(example_text(upstreams))
    assert gateway.summary == "1 listener(s), 4 route(s), 3 service(s)"
    assert [opts["listen"] for opts in gateway.listeners] == ["127.0.0.1:0"]
    assert gateway.listeners[0]["header_timeout"] == 30.0
    s = serve(gateway)
    # 1. by host (exact and wildcard), whatever the path
    status, _, body = s.get("/x/y", host="www.example.com")
    assert (status, app_of(body)) == (200, ("web", "/x/y"))
    status, _, body = s.get("/api/z", host="a.b.example.org")
    assert (status, app_of(body)) == (200, ("web", "/api/z"))
    status, _, _ = s.get("/x", host="example.org")  # the apex is not a subdomain
    assert status == 404
    # 2. prefix, stripped
    status, _, body = s.get("/static/app.css")
    assert (status, app_of(body)) == (200, ("web", "/app.css"))
    # 3. the API through its chain, balanced over both servers
    # (LeastRequest picks at random between idle servers: both within 100
    # requests, or the odds are (2/3)**100.)
    seen = set()
    for _ in range(100):
        status, headers, body = s.get("/api/users")
        assert status == 200
        app, path = app_of(body)
        assert path == "/api/users"
        seen.add(app)
        if len(seen) == 2:
            break
    assert seen == {"api1", "api2"}
    assert s.get("/nothing")[0] == 404


def test_example_chain_retries_past_a_dead_server(
    upstreams: dict[str, str], serve: Callable[[Gateway], Served], dead_url: str
) -> None:
    # One API server refuses connections: Buffer retries every such request.
    text = example_text(upstreams).replace(upstreams["api2"], dead_url)
    s = serve(load_config(text))
    for _ in range(10):
        status, _, body = s.get("/api/retry")
        assert (status, app_of(body)) == (200, ("api1", "/api/retry"))


def test_retry_budget_hedge_and_mirror_in_a_chain(
    upstreams: dict[str, str], serve: Callable[[Gateway], Served], dead_url: str
) -> None:
    text = f"""
[services.api]
servers = ["{upstreams["api1"]}", "{dead_url}"]
[[routes]]
service = "api"
chain = [
  {{ block = "Mirror", mirror = "{upstreams["other"]}", percent = 50.0 }},
  {{ block = "Buffer", retry = "IsNetworkError()", retry_budget = {{ percent = 100.0 }} }},
  {{ block = "Hedge", delay = 0.05, max_hedges = 1 }},
]
"""
    s = serve(load_config(text))
    for _ in range(6):
        status, _, body = s.get("/api/budget")
        assert (status, app_of(body)) == (200, ("api1", "/api/budget"))


def test_a_derived_hedge_delay_and_mirror_compare_from_a_file(
    upstreams: dict[str, str],
    serve: Callable[[Gateway], Served],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mirror = f'block = "Mirror", mirror = "{upstreams["other"]}", compare = true'
    hedge = (
        'block = "Hedge", delay = "p95", delay_window = "30s", min_delay = "2ms", '
        'max_delay = "250ms", fallback_delay = "100ms", min_samples = 20'
    )
    text = f"""
[services.api]
servers = ["{upstreams["api1"]}"]
[[routes]]
service = "api"
chain = [{{ {mirror}, compare_body_bytes = 4096 }}, {{ {hedge} }}]
"""
    s = serve(load_config(text))
    with caplog.at_level("WARNING", logger="oxypy.mirror"):
        status, _, body = s.get("/api/compare")
        assert (status, app_of(body)) == (200, ("api1", "/api/compare"))
        # The copy went to "other", whose answer names another app: it differs.
        wait_for(lambda: any(r.name == "oxypy.mirror" for r in caplog.records))
    (line,) = [r for r in caplog.records if r.name == "oxypy.mirror"]
    assert line.getMessage().startswith("mirror differs: GET /api/compare: status 200 vs 200, ")


def test_method_and_header_matches(
    upstreams: dict[str, str], serve: Callable[[Gateway], Served]
) -> None:
    text = f"""
[services.a]
servers = ["{upstreams["api1"]}"]
[services.b]
servers = ["{upstreams["api2"]}"]
[services.c]
servers = ["{upstreams["other"]}"]
[[routes]]
prefix = "/x"
service = "a"
[[routes]]
prefix = "/x"
methods = ["DELETE"]
service = "b"
[[routes]]
prefix = "/x"
headers = {{ X-Canary = "1" }}
service = "c"
"""
    s = serve(load_config(text))
    assert app_of(s.get("/x/1")[2])[0] == "api1"
    assert app_of(s.get("/x/1", headers={"X-Canary": "1"})[2])[0] == "other"
    assert app_of(s.get("/x/1", headers={"X-Canary": "2"})[2])[0] == "api1"
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("DELETE", "/x/1")
    assert app_of(conn.getresponse().read())[0] == "api2"
    conn.close()


# -- errors ------------------------------------------------------------------------


def _noop(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    return []


def _api_error(build: Callable[[], object]) -> str:
    """The message the Python API gives for the same mistake (the file passes it on)."""
    with pytest.raises(oxypy.ConfigurationError) as info:
        build()
    return str(info.value)


SERVICE = '[services.api]\nservers = ["http://127.0.0.1:9"]\n'
ROUTE = '[[routes]]\nservice = "api"\n'

ERRORS = [
    pytest.param(
        SERVICE
        + ROUTE
        + 'chain = [{block = "Buffer"}, {block = "Buffer", retry = "Attempts() = 2"}]',
        ["routes[0].chain[1].retry: unexpected '=' (did you mean '=='?) at column 12"],
        id="predicate-position",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{block = "CircuitBreaker", expression = "Nope() > 1"}]',
        [
            "routes[0].chain[0].expression: unknown function 'Nope' (known: "
            "LatencyAtQuantileMS, NetworkErrorRatio, RequestThreshold, ResponseCodeRatio) "
            "at column 1"
        ],
        id="breaker-predicate",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{block = "Buffer", retyr = "Attempts() < 2"}]',
        ["routes[0].chain[0].retyr: unknown key (did you mean 'retry'?)"],
        id="unknown-block-key",
    ),
    pytest.param(
        SERVICE + ROUTE + "colour = 1\n",
        ["routes[0].colour: unknown key"],
        id="unknown-route-key",
    ),
    pytest.param(
        SERVICE + ROUTE + "[listener]\naddress = 1\n",
        ["listener: unknown key (did you mean 'listeners'?)"],
        id="unknown-top-key",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{block = "Bufer"}]',
        ["routes[0].chain[0].block: unknown block 'Bufer' (did you mean 'Buffer'?)"],
        id="unknown-block",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{retry = "x"}]',
        ["routes[0].chain[0].block: missing (required: one of " + ", ".join(chain_blocks()) + ")"],
        id="missing-block",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{block = "Buffer", max_attempts = "3"}]',
        ["routes[0].chain[0].max_attempts: expected an integer, got a string ('3')"],
        id="type-int",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{block = "ConnLimit", max_conns = true}]',
        ["routes[0].chain[0].max_conns: expected an integer, got a boolean (true)"],
        id="type-bool-is-not-int",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{block = "Hedge", delay = "p100"}]',
        [
            'routes[0].chain[0].delay: expected seconds or a quantile such as "p95" (p1 to '
            "p99.9), got 'p100'"
        ],
        id="hedge-quantile",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{block = "ConnLimit"}]',
        ["routes[0].chain[0].max_conns: missing (required)"],
        id="missing-required",
    ),
    pytest.param(
        SERVICE + ROUTE + 'chain = [{block = "ConnLimit", max_conns = 1, missing = "drop"}]',
        [
            'routes[0].chain[0].missing: expected one of "reject", "shared", "skip", '
            "got a string ('drop')"
        ],
        id="choice",
    ),
    pytest.param(
        SERVICE
        + ROUTE
        + 'chain = [{block = "RateLimit", rates = [{average = 1, period = "soon"}]}]',
        [
            'routes[0].chain[0].rates[0].period: expected a duration such as "500ms", "10s" '
            "or \"1m\", got 'soon'"
        ],
        id="duration",
    ),
    pytest.param(
        SERVICE
        + ROUTE
        + 'chain = [{block = "RateLimit", rates = [{average = 1}], store = {redis = 5}}]',
        ["routes[0].chain[0].store.redis: expected a string, got an integer (5)"],
        id="store",
    ),
    pytest.param(
        SERVICE
        + ROUTE
        + 'chain = [{block = "CircuitBreaker", expression = "RequestThreshold() > 1", '
        'fallback = {status = "503"}}]',
        ["routes[0].chain[0].fallback.status: expected an integer, got a string ('503')"],
        id="fallback",
    ),
    pytest.param(
        '[services.api]\nservers = ["ftp://h", {url = "http://h:1", weight = "2"}, {uri = "x"}]\n'
        + ROUTE,
        [
            "services.api.servers[1].weight: expected an integer, got a string ('2')",
            "services.api.servers[2].uri: unknown key (did you mean 'url'?)",
            "services.api.servers[2].url: missing (required)",
            f"services.api.servers[0]: {_api_error(lambda: oxypy.RoundRobin(_noop, ['ftp://h']))}",
        ],
        id="servers",
    ),
    pytest.param(
        '[services.api]\nservers = []\nbalancer = "Random"\n' + ROUTE,
        [
            'services.api.balancer: expected one of "RoundRobin", "LeastRequest", '
            "\"ConsistentHash\", got a string ('Random')"
        ],
        id="balancer",
    ),
    pytest.param(
        '[services.api]\nservers = ["http://h:1"]\nhealth_check = {interval = -1}\n'
        "forward = {read_timeot = 1}\n" + ROUTE,
        [
            "services.api.forward.read_timeot: unknown key (did you mean 'read_timeout'?)",
            "services.api.health_check.interval: expected a duration, got -1 (negative)",
        ],
        id="service-options",
    ),
    pytest.param(
        SERVICE + '[[routes]]\nservice = "apx"\nprefix = "api"\nhost = "a b"\n',
        [
            "routes[0].prefix: expected a path starting with '/', got a string ('api')",
            "routes[0].service: no service 'apx' (did you mean 'api'?)",
        ],
        id="route-fields",
    ),
    pytest.param(
        SERVICE + '[[routes]]\nservice = "api"\nhost = "a b"\n',
        ["routes[0]: invalid host pattern 'a b'"],
        id="host-pattern",
    ),
    pytest.param(
        SERVICE + "[[listeners]]\nport = 80\n" + ROUTE,
        [
            "listeners[0].port: unknown key",
            "listeners[0].address: missing (required)",
        ],
        id="listener",
    ),
    pytest.param(
        SERVICE + '[[listeners]]\naddress = "nope"\n' + ROUTE,
        [f"listeners[0].address: {_api_error(lambda: Server(_noop, 'nope'))}"],
        id="listener-address",
    ),
    pytest.param(
        SERVICE + '[[listeners]]\naddress = "127.0.0.1:0"\ncert = "c.pem"\n' + ROUTE,
        ["listeners[0].key: missing (cert and key go together)"],
        id="listener-tls",
    ),
    pytest.param(
        SERVICE,
        ["routes: no routes: a gateway needs at least one [[routes]] table"],
        id="no-routes",
    ),
    pytest.param(
        "[[routes]\n",
        ["(toml): Expected ']]' at the end of an array declaration (at line 1, column 9)"],
        id="toml-syntax",
    ),
]


@pytest.mark.parametrize(("text", "errors"), ERRORS)
def test_every_error_is_reported_with_its_key_path(text: str, errors: list[str]) -> None:
    with pytest.raises(ConfigFileError) as info:
        load_config(text)
    assert info.value.errors == errors
    assert str(info.value).splitlines()[0] == (
        f"<config>: {len(errors)} error{'s' if len(errors) > 1 else ''}"
    )


def test_all_errors_of_a_file_are_collected() -> None:
    text = (
        '[services.api]\nservers = ["http://h:1"]\nsticky = {cookie_nam = "x"}\n'
        '[[routes]]\nservice = "api"\n'
        'chain = [{block = "Buffer", retry = "Attempts() <"}, {block = "RateLimit"}]\n'
        '[[routes]]\nservice = "nope"\nprefix = "/b"\n'
    )
    with pytest.raises(ConfigFileError) as info:
        load_config(text)
    assert info.value.errors == [
        "services.api.sticky.cookie_nam: unknown key (did you mean 'cookie_name'?)",
        "services.api.sticky.cookie_name: missing (required)",
        "routes[0].chain[0].retry: unexpected end of expression, expected a function call, "
        "a literal or '(' at column 13",
        "routes[0].chain[1].rates: missing (required)",
        "routes[1].service: no service 'nope'",
    ]


def test_a_failed_build_closes_what_it_opened() -> None:
    # A service with a health check starts a prober; a later error closes it.
    text = (
        '[services.api]\nservers = ["http://127.0.0.1:9"]\n'
        'health_check = {interval = "50ms"}\n'
        '[[routes]]\nservice = "api"\nchain = [{block = "Nope"}]\n'
    )
    before = _greenlet_count()
    for _ in range(5):
        with pytest.raises(ConfigFileError):
            load_config(text)
    gevent.sleep(0.2)
    assert _greenlet_count() <= before


def _greenlet_count() -> int:
    import gc

    return sum(1 for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead)


# -- oxypy check -------------------------------------------------------------------


def _oxypy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "oxypy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_oxypy_check_exit_codes(tmp_path: Path) -> None:
    ok = _oxypy("check", str(EXAMPLE))
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout == f"{EXAMPLE}: OK: 1 listener(s), 4 route(s), 3 service(s)\n"
    bad = tmp_path / "bad.toml"
    bad.write_text(SERVICE + ROUTE + 'chain = [{block = "Buffer", retry = "Attempts() = 2"}]\nx=1')
    res = _oxypy("check", str(bad))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == (
        f"oxypy: error: {bad}: 2 errors\n"
        "  routes[0].x: unknown key\n"
        "  routes[0].chain[0].retry: unexpected '=' (did you mean '=='?) at column 12\n"
    )
    missing = _oxypy("check", str(tmp_path / "none.toml"))
    assert missing.returncode == 2
    assert "(file): cannot read: No such file or directory" in missing.stderr
    assert "Traceback" not in missing.stderr + res.stderr


# -- hot reload --------------------------------------------------------------------


def _versioned(urls: dict[str, str], n: int, extra: str = "") -> str:
    """A config whose /api route answers with ``X-Gen: n``; RateLimit and the
    service stay unchanged from one version to the next."""
    return f"""
[services.api]
servers = ["{urls["api1"]}"]
[services.other]
servers = ["{urls["other"]}"]
[[routes]]
prefix = "/api"
service = "api"
chain = [
  {{ block = "Headers", response = {{ X-Gen = "{n}" }} }},
  {{ block = "RateLimit", rates = [{{ average = 100000, period = "1s", burst = 100000 }}] }},
]
{extra}
"""


class KeepAlive:
    """One keep-alive connection sending GETs back to back in a greenlet."""

    def __init__(self, port: int, path: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.connect()
        self.sock = self.conn.sock
        self.path = path
        self.errors: list[str] = []
        self.gens: list[str] = []
        self.stopping = False
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while not self.stopping:
            try:
                self.conn.request("GET", self.path)
                resp = self.conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    self.errors.append(f"{resp.status} {body!r}")
                self.gens.append(resp.getheader("X-Gen") or "")
                if self.conn.sock is not self.sock:
                    self.errors.append("connection replaced")
            except Exception as exc:  # noqa: BLE001 - every failure is a test failure
                self.errors.append(repr(exc))
                return

    def stop(self) -> None:
        self.stopping = True
        self.greenlet.join(timeout=10)
        self.conn.close()


def wait_for(probe: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        gevent.sleep(0.01)


def test_twenty_reloads_under_keepalive_load_drop_nothing(
    tmp_path: Path, upstreams: dict[str, str], serve: Callable[[Gateway], Served]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(_versioned(upstreams, 0))
    gateway = load_config(path)
    s = serve(gateway)
    clients = [KeepAlive(s.port, "/api/x") for _ in range(3)]
    try:
        for n in range(1, 21):
            extra = f'[[routes]]\nprefix = "/new{n}"\nservice = "other"\n'
            path.write_text(_versioned(upstreams, n, extra))
            assert gateway.reload() is True
            seen = len(clients[0].gens)
            wait_for(lambda seen=seen: len(clients[0].gens) > seen + 2)  # type: ignore[misc]
            assert clients[0].gens[-1] == str(n)
            assert app_of(s.get(f"/new{n}/y")[2]) == ("other", f"/new{n}/y")
            assert s.get(f"/new{n - 1}/y")[0] == 404 or n == 1
    finally:
        for c in clients:
            c.stop()
    for c in clients:
        assert c.errors == []
        assert len(c.gens) > 40
    assert gateway.reloads == {"success": 20, "error": 0}
    wait_for(lambda: len(gateway._live) == 1)


def test_file_watcher_reloads_on_change(
    tmp_path: Path, upstreams: dict[str, str], serve: Callable[[Gateway], Served]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(_versioned(upstreams, 1))
    gateway = load_config(path).watch(interval=0.05)
    s = serve(gateway)
    assert s.get("/api/a")[1]["X-Gen"] == "1"
    for n in (2, 3):
        path.write_text(_versioned(upstreams, n))
        stat = path.stat()
        os.utime(path, (stat.st_atime + n, stat.st_mtime + n))
        wait_for(lambda n=n: s.get("/api/a")[1]["X-Gen"] == str(n))  # type: ignore[misc]
    assert gateway.reloads == {"success": 2, "error": 0}


def test_oxypy_run_reloads_on_sighup_under_load(
    tmp_path: Path, upstreams: dict[str, str], oxypy: Callable[..., OxypyProcess]
) -> None:
    path = tmp_path / "gw.toml"
    listener = '[[listeners]]\naddress = "127.0.0.1:0"\n'
    path.write_text(listener + _versioned(upstreams, 0))
    proc = oxypy("run", str(path), "--no-watch")
    client = KeepAlive(int(proc.url.rsplit(":", 1)[1]), "/api/x")
    try:
        for n in range(1, 21):
            path.write_text(listener + _versioned(upstreams, n))
            proc.proc.send_signal(signal.SIGHUP)
            wait_for(lambda n=n: bool(client.gens) and client.gens[-1] == str(n))  # type: ignore[misc]
    finally:
        client.stop()
    assert client.errors == []
    proc.stop(timeout=20)
    err = proc.stderr()
    assert err.count("reloaded: 0 listener") == 0
    assert err.count(" reloaded: 1 listener(s), 1 route(s), 2 service(s)") == 20
    assert "Traceback" not in err


def test_a_broken_file_on_reload_keeps_the_old_config(
    tmp_path: Path,
    upstreams: dict[str, str],
    serve: Callable[[Gateway], Served],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(_versioned(upstreams, 1))
    gateway = load_config(path)
    s = serve(gateway)
    path.write_text(_versioned(upstreams, 2, '[[routes]]\nservice = "other"\nchain = [{block=1}]'))
    with caplog.at_level(logging.ERROR, logger="oxypy.config"):
        assert gateway.reload() is False
    assert [r.getMessage() for r in caplog.records if r.name == "oxypy.config"] == [
        f"{path}: 1 error\n  routes[1].chain[0].block: unknown block 1"
    ]
    status, headers, _ = s.get("/api/a")
    assert (status, headers["X-Gen"]) == (200, "1")
    path.write_text("not toml")
    assert gateway.reload() is False
    assert gateway.reloads == {"success": 0, "error": 2}
    assert s.get("/api/a")[1]["X-Gen"] == "1"


def test_reload_counter_in_prometheus(tmp_path: Path, upstreams: dict[str, str]) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.REGISTRY

    def count(result: str) -> float:
        value = registry.get_sample_value("oxypy_config_reloads_total", {"result": result})
        return value or 0.0

    path = tmp_path / "gw.toml"
    metrics = '[[routes]]\nprefix = "/metrics"\nmetrics = true\n'
    path.write_text(_versioned(upstreams, 1, metrics))
    gateway = load_config(path)
    try:
        ok, bad = count("success"), count("error")
        assert gateway.reload() is True
        path.write_text("[[routes]\n")
        assert gateway.reload() is False
        assert (count("success"), count("error")) == (ok + 1, bad + 1)
    finally:
        gateway.close()


# -- state across reloads -----------------------------------------------------------


def _limited(urls: dict[str, str], extra: str, burst: int = 2) -> str:
    return f"""
[services.api]
servers = ["{urls["api1"]}"]
[services.other]
servers = ["{urls["other"]}"]
[[routes]]
prefix = "/api"
service = "api"
chain = [{{ block = "RateLimit", rates = [{{ average = 1, period = "1h", burst = {burst} }}] }}]
{extra}
"""


def test_an_unchanged_ratelimit_keeps_its_bucket(
    tmp_path: Path, upstreams: dict[str, str], serve: Callable[[Gateway], Served]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(_limited(upstreams, ""))
    gateway = load_config(path)
    s = serve(gateway)
    assert [s.get("/api/a")[0] for _ in range(3)] == [200, 200, 429]
    path.write_text(_limited(upstreams, '[[routes]]\nprefix = "/b"\nservice = "other"\n'))
    assert gateway.reload() is True
    assert s.get("/b/x")[0] == 200  # the new route is served
    assert s.get("/api/a")[0] == 429  # and the limit has no hole
    # A changed RateLimit section is a new limiter (the test above can fail).
    path.write_text(_limited(upstreams, "", burst=3))
    assert gateway.reload() is True
    assert [s.get("/api/a")[0] for _ in range(4)] == [200, 200, 200, 429]


def test_a_tripped_breaker_stays_tripped(
    tmp_path: Path, upstreams: dict[str, str], dead_url: str, serve: Callable[[Gateway], Served]
) -> None:
    def text(extra: str) -> str:
        return f"""
[services.api]
servers = ["{dead_url}"]
[services.other]
servers = ["{upstreams["other"]}"]
[[routes]]
prefix = "/api"
service = "api"
[[routes.chain]]
block = "CircuitBreaker"
expression = "NetworkErrorRatio() > 0.5"
fallback = {{ status = 503, body = "tripped" }}
fallback_duration = "1h"
check_period = "10ms"
{extra}
"""

    path = tmp_path / "gw.toml"
    path.write_text(text(""))
    gateway = load_config(path)
    s = serve(gateway)

    def tripped() -> bool:
        return s.get("/api/x")[2] == b"tripped"

    wait_for(tripped)
    path.write_text(text('[[routes]]\nprefix = "/b"\nservice = "other"\n'))
    assert gateway.reload() is True
    assert s.get("/b/x")[0] == 200
    assert s.get("/api/x")[:1] == (503,) and s.get("/api/x")[2] == b"tripped"


def test_in_flight_requests_and_tunnels_finish_on_the_old_chain(
    tmp_path: Path, upstreams: dict[str, str], serve: Callable[[Gateway], Served]
) -> None:
    websocket = pytest.importorskip("websocket")
    release = Event()
    entered = Event()

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        entered.set()
        release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"old slow"]

    slow_server = start_pywsgi(slow)
    ws_up = WSEchoUpstream()

    def text(slow_url: str) -> str:
        return f"""
[services.slow]
servers = ["{slow_url}"]
[services.ws]
servers = ["{ws_up.url}"]
[[routes]]
prefix = "/slow"
service = "slow"
[[routes]]
prefix = "/ws"
service = "ws"
"""

    path = tmp_path / "gw.toml"
    path.write_text(text(url_of(slow_server)))
    gateway = load_config(path)
    s = serve(gateway)
    try:
        ws = websocket.create_connection(f"ws://127.0.0.1:{s.port}/ws/echo", timeout=10)
        ws.send("before")
        assert ws.recv() == "before"
        pending = gevent.spawn(s.get, "/slow/x")
        assert entered.wait(10)
        # Both services change: the old ones close only when their last user ends.
        path.write_text(text(upstreams["other"]).replace(ws_up.url, ws_up.url + "/"))
        assert gateway.reload() is True
        assert app_of(s.get("/slow/y")[2]) == ("other", "/slow/y")
        assert len(gateway._live) == 2
        ws.send("after")
        assert ws.recv() == "after"
        release.set()
        assert pending.get(timeout=10)[2] == b"old slow"
        assert len(gateway._live) == 2  # the tunnel still holds the old generation
        ws.close()
        wait_for(lambda: len(gateway._live) == 1)
    finally:
        release.set()
        slow_server.stop(timeout=1)
        ws_up.stop()


# -- gunicorn -------------------------------------------------------------------------


def test_the_same_file_under_gunicorn(tmp_path: Path, upstreams: dict[str, str]) -> None:
    pytest.importorskip("gunicorn")
    config = tmp_path / "gateway.toml"
    config.write_text(example_text(upstreams))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OXYPY_CONFIG=str(config))
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "--no-control-socket"]
    cmd += ["-b", f"127.0.0.1:{port}", "--chdir", str(REPO / "examples"), "gateway_toml_app:app"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "died"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start"
                gevent.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/static/a.css", headers={"Host": "gw.test"})
        assert app_of(conn.getresponse().read()) == ("web", "/a.css")
        conn.request("GET", "/x", headers={"Host": "www.example.com"})
        assert app_of(conn.getresponse().read()) == ("web", "/x")
        # the worker watches the file
        config.write_text(example_text(upstreams).replace('prefix = "/static"', 'prefix = "/s"'))
        stat = config.stat()
        os.utime(config, (stat.st_atime + 5, stat.st_mtime + 5))

        def moved() -> bool:
            conn.request("GET", "/s/b.css", headers={"Host": "gw.test"})
            resp = conn.getresponse()
            body = resp.read()
            return resp.status == 200 and app_of(body) == ("web", "/b.css")

        try:
            wait_for(moved, timeout=20)
        finally:
            conn.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


# -- docs -------------------------------------------------------------------------------


def test_docs_option_tables_match_the_loader() -> None:
    doc = (REPO / "docs" / "config.md").read_text()
    start, end = "<!-- generated: oxypy.config.reference_markdown() -->", "<!-- end generated -->"
    assert start in doc and end in doc
    before, rest = doc.split(start, 1)
    generated, after = rest.split(end, 1)
    fresh = reference_markdown().strip()
    if os.environ.get("OXYPY_REGEN_DOCS") == "1":
        (REPO / "docs" / "config.md").write_text(f"{before}{start}\n{fresh}\n{end}{after}")
        return
    assert generated.strip() == fresh, (
        "docs/config.md's option tables are stale: regenerate them with "
        "OXYPY_REGEN_DOCS=1 python -m pytest tests/test_config.py -k docs_option"
    )


def test_every_public_middleware_can_be_named_in_a_chain() -> None:
    wrapping = {
        name
        for name in oxypy.__all__
        if isinstance(getattr(oxypy, name), type)
        and not issubclass(getattr(oxypy, name), BaseException)
        and name
        not in ("RoundRobin", "LeastRequest", "ConsistentHash", "Router", "Rebalancer", "Gateway")
        and (params := list(__import__("inspect").signature(getattr(oxypy, name)).parameters))
        and params[0] == "next_app"
    }
    assert wrapping == set(chain_blocks())
    assert "RateLimit" in wrapping and "Buffer" in wrapping


# -- fuzz -------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    """A tiny TOML writer for the fuzz documents (inline tables only)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _fuzz_documents() -> Any:
    from hypothesis import strategies as st

    def render(d: dict[str, Any]) -> str:
        return "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in d.items()) + "\n"

    cut = st.integers(0, 400)
    return st.one_of(
        _fuzz_doc(chaos=False).map(render),
        _fuzz_doc(chaos=True).map(render),
        st.tuples(_fuzz_doc(chaos=True).map(render), cut, st.text("[]{}=\"'\n ,.", max_size=3)).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
        ),
    )


def _fuzz_doc(chaos: bool) -> Any:
    """Documents of the loader's vocabulary: well-formed values mostly (chaos=False),
    or any values and unknown keys too (chaos=True)."""
    from hypothesis import strategies as st

    from oxypy.config import _params  # the loader's own vocabulary

    scalars = st.one_of(
        st.booleans(),
        st.integers(-5, 70000),
        st.floats(-1, 1e6, allow_nan=False),
        st.sampled_from(["10s", "1m", "x", "", "/", "*.a.b", "http://127.0.0.1:9", "GET"]),
        st.sampled_from(["IsNetworkError()", "Attempts() < 2", "NetworkErrorRatio() > 0.5", "("]),
        st.text(alphabet="abc/:.*=()<>&| 019", max_size=12),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(
                st.sampled_from(["url", "average", "status", "redis", "x"]), inner, max_size=3
            ),
        ),
        max_leaves=6,
    )
    blocks = chain_blocks()

    def plausible(kind: str) -> Any:
        """Mostly values of the kind the option wants, so most documents build."""
        if "duration" in kind:
            good: Any = st.sampled_from(["1s", 0.5, "250ms", 2])
        elif kind.startswith("an integer"):
            good = st.integers(1, 100)
        elif kind.startswith("a number"):
            good = st.floats(0.1, 100)
        elif kind.startswith("a boolean"):
            good = st.booleans()
        elif kind.startswith("an array of strings"):
            good = st.lists(st.sampled_from(["GET", "X-A", "10.0.0.0/8", "*"]), max_size=2)
        elif kind.startswith("a string"):
            good = st.sampled_from(["IsNetworkError() && Attempts() < 2", "client.ip", "/x"])
        elif "Rate" in kind:
            good = st.just([{"average": 10, "burst": 20}])
        else:
            good = values
        return st.one_of(good, values) if chaos else good

    @st.composite
    def block(draw: Any) -> dict[str, Any]:
        name = draw(st.sampled_from([*blocks, "Nope"] if chaos else [*blocks]))
        params = _params(blocks[name], True) if name in blocks else {}
        keys = [k for k in params if k != "sink"]
        table: dict[str, Any] = {"block": name}
        if name == "CircuitBreaker":
            table["expression"] = "NetworkErrorRatio() > 0.5"
        elif name == "ConnLimit":
            table["max_conns"] = 5
        elif name == "RateLimit":
            table["rates"] = [{"average": 5}]
        vocabulary = [*keys, "bogus"] if chaos else keys
        if not vocabulary:
            return table
        for key in draw(st.lists(st.sampled_from(vocabulary), max_size=3, unique=True)):
            kind = params[key].kind.name if key in params else ""
            table[key] = draw(plausible(kind))
        return table

    route_keys = ["host", "prefix", "methods", "headers", "strip", "metrics"]
    route_keys += ["bad"] if chaos else []
    route_values = {
        "host": st.sampled_from(["a.test", "*.b.test"]),
        "prefix": st.sampled_from(["/", "/a", "/b/c"]),
        "methods": st.just(["GET"]),
        "headers": st.just({"X-A": "1"}),
        "strip": st.booleans(),
        "metrics": st.just(False),
    }
    route = st.fixed_dictionaries(
        {"service": st.sampled_from(["a", "b"]), "chain": st.lists(block(), max_size=3)},
        optional={
            k: st.one_of(route_values.get(k, values), values) if chaos else route_values[k]
            for k in route_keys
        },
    )
    service_keys = ["balancer", "rebalancer", "forward", "health_check", "outlier_detection"]
    service_keys += ["sticky", "choice_count", "nope"] if chaos else ["sticky"]
    service_values = {
        "balancer": st.sampled_from(["RoundRobin", "LeastRequest", "ConsistentHash"]),
        "rebalancer": st.booleans(),
        "forward": st.just({"read_timeout": "5s"}),
        "health_check": st.just({"interval": "1h"}),
        "outlier_detection": st.just({"consecutive_errors": 3}),
        "sticky": st.just({"cookie_name": "s"}),
    }
    server = st.one_of(st.just("http://127.0.0.1:9"), st.just({"url": "http://127.0.0.1:8"}))
    service = st.fixed_dictionaries(
        {"servers": st.lists(st.one_of(server, values) if chaos else server, max_size=3)},
        optional={
            k: st.one_of(service_values.get(k, values), values) if chaos else service_values[k]
            for k in service_keys
        },
    )
    doc = st.fixed_dictionaries(
        {
            "services": st.fixed_dictionaries({"a": service, "b": service}),
            "routes": st.lists(route, min_size=0 if chaos else 1, max_size=3),
        },
        optional={
            "listeners": st.lists(
                st.dictionaries(
                    st.sampled_from(["address", "backlog", "header_timeout", "cert", "zz"]),
                    values,
                    max_size=3,
                )
                if chaos
                else st.just({"address": "127.0.0.1:0", "backlog": 5}),
                max_size=2,
            )
        },
    )
    return doc


def test_fuzz_loader_raises_only_config_file_errors() -> None:
    from hypothesis import HealthCheck as HC
    from hypothesis import given, settings

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HC.too_slow, HC.data_too_large],
    )
    @given(_fuzz_documents())
    def run(text: str) -> None:
        try:
            gateway = load_config(text)
        except ConfigFileError as exc:
            assert exc.errors and all(": " in e for e in exc.errors)
            assert "Traceback" not in str(exc)
            return
        gateway.close()

    run()


@pytest.mark.parametrize("name", ["README.md", "docs/config.md"])
def test_toml_snippets_of_the_docs_load(name: str) -> None:
    snippets = re.findall(r"```toml\n(.*?)```", (REPO / name).read_text(), re.S)
    assert snippets
    for text in snippets:
        load_config(text).close()


def test_tls_listener_serves_https(tmp_path: Path, upstreams: dict[str, str]) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    text = f"""
[[listeners]]
address = "127.0.0.1:0"
cert = "{cert_path}"
key = "{key_path}"
keepalive_timeout = "5s"
[services.a]
servers = ["{upstreams["api1"]}"]
[[routes]]
service = "a"
"""
    gateway = load_config(text)
    (opts,) = gateway.listeners
    assert opts["keepalive_timeout"] == 5.0
    (server,) = gateway.servers()
    server.start()
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        conn = http.client.HTTPSConnection("127.0.0.1", server.address[1], context=ctx, timeout=10)
        try:
            conn.request("GET", "/tls")
            resp = conn.getresponse()
            assert (resp.status, app_of(resp.read())) == (200, ("api1", "/tls"))
        finally:
            conn.close()
    finally:
        server.stop(timeout=1)
        gateway.close()
    bad = text.replace(f'key = "{key_path}"', f'key = "{tmp_path / "none.pem"}"')
    with pytest.raises(ConfigFileError) as info:
        load_config(bad)
    assert info.value.errors == [
        "listeners[0].cert: cannot load cert/key: [Errno 2] No such file or directory"
    ]


def test_oxypy_run_shows_redis_failing_open_on_stderr(
    tmp_path: Path, upstreams: dict[str, str], oxypy: Callable[..., OxypyProcess]
) -> None:
    """The command makes the library's WARNING lines visible: a RateLimit whose
    Redis is down lets requests through and says so on stderr, once."""
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        redis_url = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
        store = f'{{ redis = "{redis_url}", timeout = "100ms" }}'
        path = tmp_path / "gw.toml"
        path.write_text(
            f"""
[[listeners]]
address = "127.0.0.1:0"
[services.api]
servers = ["{upstreams["api1"]}"]
[[routes]]
prefix = "/"
service = "api"
chain = [{{ block = "RateLimit", rates = [{{ average = 10, period = "1s" }}], store = {store} }}]
"""
        )
        proc = oxypy("run", str(path), "--no-watch")
        for _ in range(3):
            resp = proc.get("/x")
            assert resp.status == 200
            assert json.loads(resp.data)["app"] == "api1"
        proc.stop(timeout=20)
    err = proc.stderr()
    lines = [ln for ln in err.splitlines() if "unavailable" in ln]
    assert len(lines) == 1, err  # logged at most every log_interval, not per request
    assert f"WARNING oxypy.redis: Redis at {redis_url} unavailable" in lines[0]
    assert "allowing requests" in lines[0]
    assert "Traceback" not in err
