"""RedisRegistry against a real redis-server: convergence, the polled fallback, drain,
Redis outages, the prober's lease.  Every balancer stands for one process; the
fleet of real gunicorn processes is in test_registry_fleet.py."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import gevent
import pytest
import redis
import urllib3

from oxypy import (
    ConfigurationError,
    ConsistentHash,
    Forward,
    HealthCheck,
    LeastRequest,
    OxypyError,
    Rebalancer,
    RedisRegistry,
    RoundRobin,
)
from oxypy.registry import RegisteredServer

from _redis import REDIS_SERVER, RedisServer, free_port
from _servers import wait_for

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")

HTTP = urllib3.PoolManager(retries=False, timeout=5)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A registry name of this test's own (the module shares one redis-server)."""
    return f"{request.node.originalname}-{os.urandom(3).hex()}"


def nothing(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("204 No Content", [])
    return []


def pick_all(lb: RoundRobin, n: int) -> list[str]:
    return [lb.next_server() for _ in range(n)]


@pytest.fixture
def balancers() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for lb in made:
        lb.close()


def test_every_balancer_converges_and_later_ones_start_with_the_set(
    redis_server: RedisServer, name: str, balancers: list[Any]
) -> None:
    a = RoundRobin(nothing, ["http://10.0.0.1"], registry=RedisRegistry(redis_server.url, name))
    # The registry exists now: a later process's own servers are only a seed, unused.
    b = LeastRequest(nothing, ["http://10.9.9.9"], registry=RedisRegistry(redis_server.url, name))
    c = ConsistentHash(nothing, registry=RedisRegistry(redis_server.url, name))
    balancers += [a, b, c]
    assert a.servers() == b.servers() == c.servers() == ["http://10.0.0.1"]

    started = time.monotonic()
    b.upsert_server("http://10.0.0.2", 3)  # written through, applied here at once
    assert b.servers() == ["http://10.0.0.1", "http://10.0.0.2"]
    wait_for(lambda: a.servers() == c.servers() == b.servers(), timeout=1.0)
    assert a.server_weight("http://10.0.0.2") == c.server_weight("http://10.0.0.2") == 3
    assert sorted(pick_all(a, 4)) == ["http://10.0.0.1"] + ["http://10.0.0.2"] * 3
    c.remove_server("http://10.0.0.1")
    wait_for(lambda: a.servers() == b.servers() == ["http://10.0.0.2"], timeout=1.0)
    assert time.monotonic() - started < 2.0
    d = RoundRobin(nothing, ["http://10.0.0.1"], registry=RedisRegistry(redis_server.url, name))
    balancers.append(d)
    assert d.servers() == ["http://10.0.0.2"] and d.server_weight("http://10.0.0.2") == 3
    assert a.registry is not None
    assert a.registry.fleet() == [RegisteredServer("http://10.0.0.2", 3, "active", None)]
    with pytest.raises(ConfigurationError, match="server not found"):
        a.remove_server("http://10.0.0.1")


def test_a_missed_message_is_caught_by_the_polled_version(
    redis_server: RedisServer, name: str, balancers: list[Any]
) -> None:
    reg = RedisRegistry(redis_server.url, name, poll_interval=0.2)
    a = RoundRobin(nothing, ["http://10.0.0.1"], registry=reg)
    balancers.append(a)
    follower = reg.follower
    assert follower is not None
    syncs = follower.syncs
    # A change written without its pub/sub message: only the version tells.
    raw = redis.Redis.from_url(redis_server.url)
    raw.hset(reg.key, "s:http://10.0.0.5:80/", "1 active http://10.0.0.5")
    raw.hincrby(reg.key, "v", 1)
    raw.close()
    started = time.monotonic()
    wait_for(lambda: a.servers() == ["http://10.0.0.1", "http://10.0.0.5"], timeout=1.0)
    assert time.monotonic() - started < 0.2 + 0.5
    assert follower.syncs == syncs + 1
    # Fields oxypy did not write are ignored; the rest still applies.
    raw = redis.Redis.from_url(redis_server.url)
    raw.hset(reg.key, "s:junk", "1 active ftp://10.0.0.6")
    raw.hset(reg.key, "s:junk2", "heavy active http://10.0.0.7")
    raw.hset(reg.key, "s:http://10.0.0.8:80/", "2 draining http://10.0.0.8")
    raw.hincrby(reg.key, "v", 1)
    raw.close()
    wait_for(lambda: len(a.servers()) == 3, timeout=1.0)
    assert a.servers() == ["http://10.0.0.1", "http://10.0.0.5", "http://10.0.0.8"]
    assert [s.url for s in reg.fleet()] == a.servers()


def test_rebalancer_weights_stay_local_while_the_set_follows(
    redis_server: RedisServer, name: str, balancers: list[Any]
) -> None:
    inner = RoundRobin(
        nothing,
        ["http://10.0.0.1", "http://10.0.0.2"],
        registry=RedisRegistry(redis_server.url, name),
    )
    other = RoundRobin(nothing, registry=RedisRegistry(redis_server.url, name))
    balancers += [inner, other]
    rb = Rebalancer(inner)
    inner.pool.reweight("http://10.0.0.1:80/", 16)  # what the Rebalancer does to a good server
    rb.upsert_server("http://10.0.0.3", 2)
    wait_for(lambda: len(other.servers()) == 3, timeout=1.0)
    assert other.server_weight("http://10.0.0.3") == 2
    assert other.server_weight("http://10.0.0.1") == 1  # never shared: the registry has 1
    rb.remove_server("http://10.0.0.3")
    wait_for(lambda: len(other.servers()) == 2, timeout=1.0)
    assert rb.servers() == ["http://10.0.0.1", "http://10.0.0.2"]


def test_rebalancer_registry_option_makes_its_balancer_follow(
    redis_server: RedisServer, name: str, balancers: list[Any], pywsgi: Any
) -> None:
    upstream = ProbeLog()
    url = pywsgi(upstream)
    check = HealthCheck(interval=0.05, healthy_threshold=1, unhealthy_threshold=1, host="rb")
    inner = RoundRobin(nothing, [url, "http://10.0.0.2"], health_check=check)
    gevent.sleep(0.2)
    assert set(upstream.hosts) == {"rb"}  # probing locally so far
    registry = RedisRegistry(redis_server.url, name, lease_ttl=0.6)
    rb = Rebalancer(inner, registry=registry)
    other = RoundRobin(nothing, registry=RedisRegistry(redis_server.url, name))
    balancers += [inner, other]
    assert other.servers() == [url, "http://10.0.0.2"]  # the rebalanced pool seeded it
    rb.upsert_server("http://10.0.0.3", 2)
    wait_for(lambda: other.server_weight("http://10.0.0.3") == 2, timeout=1.0)
    assert inner.registry is registry and registry.prober() == registry.holder
    with pytest.raises(ConfigurationError, match="follows <RedisRegistry"):
        inner.follow_registry(RedisRegistry(redis_server.url, name))


def slow_or_named(label: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/slow":
            gevent.sleep(float(environ["QUERY_STRING"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [label.encode()]

    return app


def test_drain_finishes_in_flight_requests_and_sends_no_new_ones(
    redis_server: RedisServer, name: str, balancers: list[Any], pywsgi: Any, proxy: Any
) -> None:
    one, two = pywsgi(slow_or_named("one")), pywsgi(slow_or_named("two"))
    a = RoundRobin(Forward(), [one, two], registry=RedisRegistry(redis_server.url, name))
    b = RoundRobin(Forward(), registry=RedisRegistry(redis_server.url, name))
    balancers += [a, b]
    url_a, url_b = proxy(a), proxy(b)
    slow = gevent.spawn(lambda: HTTP.request("GET", url_a + "/slow?0.5"))  # to "one" first
    wait_for(lambda: a.pool.snapshot()[1].current != 0)  # the pick happened
    b.drain_server(one)
    wait_for(lambda: a.pool.find(one).state.value == "draining", timeout=1.0)  # type: ignore[union-attr]
    bodies = {HTTP.request("GET", url + "/").data for url in (url_a, url_b) * 4}
    assert bodies == {b"two"}
    resp = slow.get(timeout=5)
    assert (resp.status, resp.data) == (200, b"one")  # the request in flight finished
    assert a.registry is not None
    assert {s.url: s.state for s in a.registry.fleet()} == {one: "draining", two: "active"}
    with pytest.raises(ConfigurationError, match="server not found"):
        a.drain_server("http://10.1.1.1")
    a.drain_server(one, False)  # back in rotation everywhere
    wait_for(lambda: b.pool.find(one).state.value == "active", timeout=1.0)  # type: ignore[union-attr]
    assert {HTTP.request("GET", url_b + "/").data for _ in range(4)} == {b"one", b"two"}


def test_drain_without_a_registry() -> None:
    lb = RoundRobin(nothing, ["http://10.0.0.1", "http://10.0.0.2"])
    lb.drain_server("http://10.0.0.1")
    assert pick_all(lb, 3) == ["http://10.0.0.2"] * 3
    lb.drain_server("http://10.0.0.1", draining=False)
    assert sorted(pick_all(lb, 2)) == ["http://10.0.0.1", "http://10.0.0.2"]
    with pytest.raises(ConfigurationError, match="server not found"):
        lb.drain_server("http://10.0.0.3")


def test_redis_down_keeps_the_set_logs_once_and_resyncs(
    caplog: pytest.LogCaptureFixture, name: str, balancers: list[Any]
) -> None:
    caplog.set_level(logging.WARNING, logger="oxypy._balance.follow")
    port = free_port()
    server = RedisServer(port)
    url = server.url
    a = RoundRobin(
        nothing, ["http://10.0.0.1"], registry=RedisRegistry(url, name, poll_interval=0.1)
    )
    b = RoundRobin(nothing, registry=RedisRegistry(url, name, poll_interval=0.1))
    balancers += [a, b]
    a.upsert_server("http://10.0.0.2")
    wait_for(lambda: len(b.servers()) == 2, timeout=1.0)
    server.stop()
    try:
        wait_for(lambda: a.registry.follower.down and b.registry.follower.down)  # type: ignore[union-attr]
        # Routing goes on from the last known set; writes fail and change nothing.
        assert pick_all(b, 2) == ["http://10.0.0.1", "http://10.0.0.2"]
        with pytest.raises(OxypyError, match=re.escape(f"registry '{name}': Redis at {url} fail")):
            a.upsert_server("http://10.0.0.3")
        gevent.sleep(0.5)  # several failed polls: still one line per process
        assert a.servers() == b.servers() == ["http://10.0.0.1", "http://10.0.0.2"]
        server = RedisServer(port)  # back, and empty: the last set is seeded again
        wait_for(lambda: not a.registry.follower.down and not b.registry.follower.down)  # type: ignore[union-attr]
        a.upsert_server("http://10.0.0.3")
        wait_for(lambda: len(b.servers()) == 3, timeout=1.0)
        assert b.servers() == ["http://10.0.0.1", "http://10.0.0.2", "http://10.0.0.3"]
        a.close()  # before Redis stops below: their lines are all counted now
        b.close()
    finally:
        server.stop()
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "oxypy._balance.follow" and name in r.getMessage()
    ]
    down = f"registry '{name}': Redis at {url} unavailable; keeping the last known 2 servers: "
    back = f"registry '{name}': Redis at {url} available again; resynchronised (2 servers)"
    assert sorted(line[: len(down)] if line.startswith(down) else line for line in lines) == [
        back,
        back,
        down,
        down,
    ], lines


def test_redis_down_at_start_serves_the_given_servers(name: str, balancers: list[Any]) -> None:
    port = free_port()
    a = RoundRobin(
        nothing,
        ["http://10.0.0.1"],
        registry=RedisRegistry(f"redis://127.0.0.1:{port}/0", name, poll_interval=0.1),
    )
    balancers.append(a)
    assert a.servers() == ["http://10.0.0.1"]
    server = RedisServer(port)
    try:
        wait_for(lambda: a.registry.fleet() != [])  # type: ignore[union-attr]
        assert a.registry.fleet() == [RegisteredServer("http://10.0.0.1", 1, "active")]  # type: ignore[union-attr]
    finally:
        a.close()
        server.stop()


class ProbeLog:
    """An upstream recording the Host of every health probe."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.status = "200 OK"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/healthz":
            self.hosts.append(environ["HTTP_HOST"])
        start_response(self.status, [("Content-Type", "text/plain")])
        return [b"ok"]


def test_one_prober_per_registry_and_a_takeover(
    redis_server: RedisServer, name: str, pywsgi: Any, balancers: list[Any]
) -> None:
    upstream = ProbeLog()
    url = pywsgi(upstream)
    events: dict[str, list[str]] = {"a": [], "b": []}

    def balancer(who: str) -> RoundRobin:
        check = HealthCheck(interval=0.05, unhealthy_threshold=2, healthy_threshold=1, host=who)
        return RoundRobin(
            nothing,
            [url],
            health_check=check,
            on_change=lambda u, e: events[who].append(e),
            registry=RedisRegistry(redis_server.url, name, lease_ttl=0.6, poll_interval=0.1),
        )

    a = balancer("a")
    b = balancer("b")
    balancers += [a, b]
    wait_for(lambda: len(upstream.hosts) >= 6)
    assert set(upstream.hosts) == {"a"}  # only the lease holder probes
    assert a.registry is not None and a.registry.prober() == a.registry.holder
    upstream.status = "503 Service Unavailable"
    wait_for(lambda: events["a"] == events["b"] == ["added", "unhealthy"], timeout=2)
    assert b.pool.snapshot()[0].state.value == "unhealthy"
    a.close()  # gives the lease up: b takes over
    upstream.status = "200 OK"
    wait_for(lambda: events["b"] == ["added", "unhealthy", "healthy"], timeout=2)
    assert upstream.hosts[-1] == "b"
    assert b.registry is not None and b.registry.prober() == b.registry.holder
    assert b.registry.fleet()[0].healthy is True


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        pytest.param(("redis://x", ""), {}, "name must be a non-empty string", id="empty-name"),
        pytest.param(("redis://x", "a{b}"), {}, "without spaces or braces", id="brace"),
        pytest.param(("redis://x", "a"), {"poll_interval": 0}, "poll_interval must", id="poll"),
        pytest.param(("redis://x", "a"), {"lease_ttl": -1}, "lease_ttl must", id="lease"),
        pytest.param(("ftp://x", "a"), {}, "invalid Redis URL", id="url"),
        pytest.param((object(), "a"), {}, "or a redis-py client object", id="client"),
    ],
)
def test_registry_validation(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisRegistry(*args, **kwargs)


def test_one_registry_per_balancer(redis_server: RedisServer, name: str) -> None:
    reg = RedisRegistry(redis_server.url, name)
    lb = RoundRobin(nothing, registry=reg)
    try:
        with pytest.raises(ConfigurationError, match="already serves a balancer"):
            RoundRobin(nothing, registry=reg)
        with pytest.raises(ConfigurationError, match="registry must be a RedisRegistry"):
            RoundRobin(nothing, registry="redis://x")  # type: ignore[arg-type]
    finally:
        lb.close()
        lb.close()


_PLAIN_THREADS = """
import sys, time
from gevent import monkey
assert not monkey.is_module_patched("threading")
from oxypy import RedisRegistry, RoundRobin
url, name = sys.argv[1:]
app = lambda environ, start_response: []
a = RoundRobin(app, ["http://10.0.0.1"], registry=RedisRegistry(url, name))
b = RoundRobin(app, registry=RedisRegistry(url, name))
a.upsert_server("http://10.0.0.2")
deadline = time.monotonic() + 1
while len(b.servers()) < 2 and time.monotonic() < deadline:
    time.sleep(0.005)
print(b.servers())
a.close()
b.close()
"""


def test_plain_threads_without_gevent(redis_server: RedisServer, name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PLAIN_THREADS, redis_server.url, name],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": ROOT},
        check=False,
    )
    assert (out.returncode, out.stdout) == (0, "['http://10.0.0.1', 'http://10.0.0.2']\n"), (
        out.stderr
    )
    assert threading.active_count() >= 1


def test_config_file_service_follows_a_registry(
    redis_server: RedisServer,
    name: str,
    tmp_path: Any,
    balancers: list[Any],
    pywsgi: Any,
    proxy: Any,
) -> None:
    from oxypy import load_config

    one, two = pywsgi(slow_or_named("one")), pywsgi(slow_or_named("two"))
    operator = RoundRobin(nothing, [one], registry=RedisRegistry(redis_server.url, name))
    balancers.append(operator)
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[services.api]
registry = {{ redis = "{redis_server.url}", name = "{name}", poll_interval = "200ms" }}

[services.seeded]
balancer = "LeastRequest"
servers = ["http://10.0.0.8", {{ url = "http://10.0.0.9", weight = 2 }}]
registry = {{ redis = "{redis_server.url}", name = "{name}-seeded" }}

[[routes]]
service = "api"
"""
    )
    gateway = load_config(path)
    try:
        url = proxy(gateway)
        assert HTTP.request("GET", url + "/").data == b"one"
        operator.upsert_server(two)
        operator.remove_server(one)
        wait_for(lambda: HTTP.request("GET", url + "/").data == b"two", timeout=1.0)
        seeded = RedisRegistry(redis_server.url, f"{name}-seeded")
        assert seeded.fleet() == [
            RegisteredServer("http://10.0.0.8", 1, "active"),
            RegisteredServer("http://10.0.0.9", 2, "active"),
        ]
        seeded.close()
    finally:
        gateway.close()


@pytest.mark.parametrize(
    ("registry", "error"),
    [
        pytest.param(
            '{ redis = "redis://127.0.0.1:1/0" }',
            "services.api.registry.name: missing (required)",
            id="no-name",
        ),
        pytest.param(
            '{ name = "api" }', "services.api.registry.redis: missing (required)", id="no-redis"
        ),
        pytest.param(
            '{ redis = "redis://127.0.0.1:1/0", name = "api", poll = 1 }',
            "services.api.registry.poll: unknown key",
            id="unknown-key",
        ),
        pytest.param(
            '"redis://127.0.0.1:1/0"',
            "services.api.registry: expected a registry table",
            id="not-a-table",
        ),
    ],
)
def test_config_registry_errors_name_the_key(tmp_path: Any, registry: str, error: str) -> None:
    from oxypy import ConfigFileError, load_config

    path = tmp_path / "gateway.toml"
    path.write_text(f'[services.api]\nregistry = {registry}\n\n[[routes]]\nservice = "api"\n')
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    assert error in str(info.value)


# -- oxypy servers ------------------------------------------------------------------


def servers_cmd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``oxypy servers ARGV`` in this process: (exit status, stdout, stderr)."""
    from oxypy.cli import main

    try:
        status = main(["servers", *argv])
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_servers_command_changes_every_follower(
    redis_server: RedisServer, name: str, balancers: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    lb = RoundRobin(nothing, ["http://10.0.0.1"], registry=RedisRegistry(redis_server.url, name))
    balancers.append(lb)
    flags = ["--redis", redis_server.url, "--name", name]
    assert servers_cmd(capsys, "add", "http://10.0.0.2:8000", "--weight", "3", *flags) == (
        0,
        "added http://10.0.0.2:8000 (weight 3, active)\n",
        "",
    )
    wait_for(lambda: lb.servers() == ["http://10.0.0.1", "http://10.0.0.2:8000"], timeout=1.0)
    assert lb.server_weight("http://10.0.0.2:8000") == 3
    status, out, _ = servers_cmd(capsys, "drain", *flags, "http://10.0.0.1")
    assert (status, out) == (
        0,
        "draining http://10.0.0.1: no new requests; requests in flight finish\n",
    )
    wait_for(lambda: pick_all(lb, 3) == ["http://10.0.0.2:8000"] * 3, timeout=1.0)
    assert servers_cmd(capsys, "list", *flags) == (
        0,
        "URL                   WEIGHT  STATE     HEALTH\n"
        "http://10.0.0.1       1       draining  -\n"
        "http://10.0.0.2:8000  3       active    -\n"
        "2 server(s); prober: none\n",
        "",
    )
    # add puts a drained server back, keeping its weight; an unchanged add says so
    assert servers_cmd(capsys, "add", *flags, "http://10.0.0.1")[1] == (
        "updated http://10.0.0.1 (weight 1, active)\n"
    )
    assert servers_cmd(capsys, "add", *flags, "http://10.0.0.1")[1] == (
        "unchanged http://10.0.0.1 (weight 1, active)\n"
    )
    assert servers_cmd(capsys, "remove", *flags, "http://10.0.0.2:8000") == (
        0,
        "removed http://10.0.0.2:8000\n",
        "",
    )
    wait_for(lambda: pick_all(lb, 2) == ["http://10.0.0.1"] * 2, timeout=1.0)
    status, out, err = servers_cmd(capsys, "remove", *flags, "http://10.0.0.2:8000")
    assert (status, out) == (1, "")
    assert err == (
        f"oxypy servers: error: server not found: 'http://10.0.0.2:8000' in registry '{name}'\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["list", "--name", "api"],
            "oxypy servers list: error: the following arguments are required: --redis\n",
            id="no-redis",
        ),
        pytest.param(
            ["drain", "--redis", "redis://127.0.0.1:1/0", "--name", "api"],
            "oxypy servers drain: error: the following arguments are required: URL\n",
            id="no-url",
        ),
        pytest.param(
            ["add", "x", "--redis", "redis://127.0.0.1:1/0", "--name", "api", "--weight", "-2"],
            "oxypy servers add: error: argument --weight: must be 0 or more, got '-2'\n",
            id="weight",
        ),
        pytest.param(
            ["add", "ftp://x", "--redis", "redis://127.0.0.1:1/0", "--name", "api"],
            "oxypy servers: error: argument URL: server URL must be an http:// or https:// URL",
            id="url",
        ),
        pytest.param(
            ["list", "--redis", "mongo://x", "--name", "api"],
            "oxypy servers: error: argument --redis: invalid Redis URL 'mongo://x'",
            id="redis-url",
        ),
        pytest.param(
            ["list", "--redis", "redis://127.0.0.1:1/0", "--name", "a b"],
            "oxypy servers: error: argument --name: name must be a non-empty string",
            id="name",
        ),
        pytest.param(
            ["servers"],
            "oxypy servers: error: argument ACTION: invalid choice: 'servers'",
            id="action",
        ),
    ],
)
def test_servers_command_bad_flags_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = servers_cmd(capsys, *argv)
    assert (status, out) == (2, "")
    assert message in err and "Traceback" not in err


def test_servers_command_redis_down_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    status, out, err = servers_cmd(
        capsys, "list", "--redis", f"redis://127.0.0.1:{port}/0", "--name", "api"
    )
    assert (status, out) == (1, "")
    assert err.startswith(
        f"oxypy servers: error: registry 'api': Redis at redis://127.0.0.1:{port}/0 failed: "
    ), err
    assert err.count("\n") == 1, err


def test_servers_command_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = servers_cmd(capsys, "drain", "--help")
    assert status == 0
    assert "oxypy servers drain  --redis redis://10.0.0.9:6379/0 --name api http://" in out
    assert "Exit status: 0 done, 1 Redis unreachable or server not registered, 2 bad flags" in out
