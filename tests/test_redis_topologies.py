"""RedisStore, RedisConnStore and RedisRegistry over a Sentinel-managed master and a
Redis Cluster: real ``redis-server --sentinel`` and ``cluster-enabled`` processes,
reached through redis-py's ``Sentinel(...).master_for()`` and ``RedisCluster``."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel
from werkzeug.test import Client

from oxypy import ConnLimit, Rate, RateLimit, RedisConnStore, RedisRegistry, RedisStore, RoundRobin

from _redis import REDIS_SERVER, RedisServer, free_port
from _servers import wait_for

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")

LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def hello(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def nothing(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("204 No Content", [])
    return []


@pytest.fixture(scope="module")
def sentinel_master() -> Iterator[Any]:
    """A master and a Sentinel monitoring it; yields ``master_for("mymaster")``."""
    master = RedisServer()
    port = free_port()
    config = (
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mymaster 5000\n"
    )
    sentinel_server = None
    try:
        sentinel_server = RedisServer(port, config=config)
        sentinel = Sentinel([("127.0.0.1", port)], socket_timeout=2)  # type: ignore[no-untyped-call]
        client = sentinel.master_for("mymaster", socket_timeout=2)  # type: ignore[no-untyped-call]
        wait_for(lambda: client.ping(), timeout=10)
        yield client
        client.close()
    finally:
        if sentinel_server is not None:
            sentinel_server.stop()
        master.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A single-node Redis Cluster holding every slot; yields a ``RedisCluster`` client."""
    node = RedisServer(
        cluster_port(), extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    )
    try:
        raw = redis.Redis(host="127.0.0.1", port=node.port)
        raw.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")  # type: ignore[no-untyped-call]
        wait_for(
            lambda: b"cluster_state:ok" in raw.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        )
        raw.close()
        client = RedisCluster(host="127.0.0.1", port=node.port, socket_timeout=2)
        yield client
        client.close()
    finally:
        node.stop()


@pytest.fixture(params=["sentinel", "cluster"])
def client(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("sentinel_master" if request.param == "sentinel" else "cluster")


def test_rate_limit_holds_through_the_client(client: Any, request: pytest.FixtureRequest) -> None:
    store = RedisStore(client, prefix=f"rl:{request.node.callspec.id}:{time.monotonic_ns()}:")
    c = Client(RateLimit(hello, rates=[Rate(1, 60.0, burst=2)], store=store))
    codes = [c.get("/", environ_base=LOCAL).status_code for _ in range(4)]
    assert codes == [200, 200, 429, 429]
    assert store.errors == 0
    store.close()
    assert client.ping()  # a client passed in stays open


def test_connection_leases_through_the_client(client: Any) -> None:
    store = RedisConnStore(client, prefix=f"cl:{time.monotonic_ns()}:")
    first = store.acquire("k", 1)
    assert first is not None
    assert store.acquire("k", 1) is None  # the limit holds
    assert store.in_flight("k") == 1
    first.refresh()
    first.release()
    assert store.in_flight("k") == 0
    again = store.acquire("k", 1)
    assert again is not None
    again.release()
    assert store.errors == 0
    _ = ConnLimit  # the block these leases serve (tested with a plain Redis in test_redis.py)


def test_registry_converges_through_the_client(client: Any) -> None:
    name = f"topo-{time.monotonic_ns()}"
    a = RoundRobin(nothing, ["http://10.0.0.1"], registry=RedisRegistry(client, name))
    b = RoundRobin(nothing, registry=RedisRegistry(client, name))
    try:
        assert b.servers() == ["http://10.0.0.1"]
        a.upsert_server("http://10.0.0.2")
        b.drain_server("http://10.0.0.1")
        wait_for(lambda: [a.next_server() for _ in range(2)] == ["http://10.0.0.2"] * 2, 1.0)
        assert [(s.url, s.state) for s in b.registry.fleet()] == [  # type: ignore[union-attr]
            ("http://10.0.0.1", "draining"),
            ("http://10.0.0.2", "active"),
        ]
    finally:
        a.close()
        b.close()
    assert client.ping()  # the balancers closed their registries, not the client
