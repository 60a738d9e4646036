"""Redis backends against a real redis-server: one limit across processes, fail-open, leases."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

import gevent
import pytest
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client, EnvironBuilder

from oxypy.connlimit import ConnLimit
from oxypy.exceptions import ConfigurationError
from oxypy.ratelimit import Rate, RateLimit
from oxypy.redis import RedisConnStore, RedisStore

from _redis import REDIS_SERVER, RedisServer, start_proxy_process, stop_pid
from _servers import wait_for

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    yield redis_server.url
    store = RedisStore(redis_server.url)
    store.client.flushdb()
    store.close()


def hello(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- RedisStore -----------------------------------------------------------------------


def test_bucket_in_redis(redis_url: str) -> None:
    store = RedisStore(redis_url)
    rates = [Rate(5, 60.0, burst=3), Rate(100, 3600.0)]
    verdicts = [store.hit("a", rates) for _ in range(4)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert verdicts[0].debts == pytest.approx((12.0, 36.0), abs=0.01)
    assert verdicts[3].retry_in == pytest.approx(12.0, abs=0.1)  # exact, not a whole token
    assert verdicts[3].debts == pytest.approx((36.0, 108.0), abs=0.1)  # rolled back
    assert store.hit("b", rates).allowed  # isolation
    # the key lives exactly until every bucket is full again, never shorter
    ttl = store.client.pttl("oxypy:rl:a")
    assert 107_000 < ttl <= 108_001
    store.close()


def test_ratelimit_with_redis_store(redis_url: str) -> None:
    app = RateLimit(
        hello, rates=[Rate(1, 10.0)], source="request.header.Source", store=RedisStore(redis_url)
    )
    c = Client(LintMiddleware(app))
    assert c.get("/", headers={"Source": "k"}).status_code == 200
    r = c.get("/", headers={"Source": "k"})
    assert (r.status_code, r.headers["Retry-After"]) == (429, "10")
    assert r.headers["RateLimit"] == '"1/10s";r=0;t=10'


def test_two_processes_share_one_limit(redis_url: str) -> None:
    """100 requests at 20/s burst 20, spread over two proxy processes, admit 20 +- 1."""
    procs: list[Any] = []
    try:
        ports = []
        for _ in range(2):
            proc, port = start_proxy_process(redis_url, 20, 20)
            procs.append(proc)
            ports.append(port)

        def ask(sock: socket.socket, client: str) -> bytes:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: x\r\nX-Client: {client}\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(4096)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += sock.recv(4096)
            return head[:12]

        socks = [
            socket.create_connection(("127.0.0.1", ports[i % 2]), timeout=10) for i in range(100)
        ]
        # Warm up under other sources, all at once, so both processes have loaded
        # the script and opened a pool of Redis connections before the burst.
        warm = [gevent.spawn(ask, s, f"warm-{i}") for i, s in enumerate(socks)]
        gevent.joinall(warm, timeout=20)
        assert [job.value for job in warm] == [b"HTTP/1.1 200"] * 100
        started = time.monotonic()
        jobs = [gevent.spawn(ask, s, "burst") for s in socks]
        gevent.joinall(jobs, timeout=20)
        elapsed = time.monotonic() - started
        for s in socks:
            s.close()
        statuses = [job.value for job in jobs]
        admitted = [statuses[i::2].count(b"HTTP/1.1 200") for i in range(2)]
        limited = [statuses[i::2].count(b"HTTP/1.1 429") for i in range(2)]
        assert [a + b for a, b in zip(admitted, limited, strict=True)] == [50, 50]
        # 20 +- 1 in the first instant; on a loaded machine the burst may take
        # longer, and the bucket refills one token per 50 ms meanwhile.  Two
        # unshared limits would admit 40.
        refilled = int(elapsed * 20)
        assert 19 <= sum(admitted) <= 21 + refilled < 40, (admitted, elapsed)
    finally:
        for proc in procs:
            stop_pid(proc)


def _hit_all(store: RedisStore, key: str, rates: list[Rate], n: int) -> list[bool]:
    jobs = [gevent.spawn(store.hit, key, rates) for _ in range(n)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    return [job.value.allowed for job in jobs]


def test_concurrent_hits_share_round_trips(redis_url: str) -> None:
    """Hits arriving while one waits for Redis go together in the next pipeline:
    the limit is exact, and 60 concurrent hits need a connection or two, not 60."""
    store = RedisStore(redis_url, timeout=5)
    admin = RedisStore(redis_url).client
    before = admin.info("stats")["total_connections_received"]
    allowed = _hit_all(store, "c", [Rate(20, 60.0)], 60)
    assert allowed.count(True) == 20 and allowed[:20] == [True] * 20
    assert admin.info("stats")["total_connections_received"] - before <= 2
    assert store.errors == 0
    store.close()
    admin.close()


def test_hits_after_redis_lost_the_script(redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=5)
    assert store.hit("s", [Rate(5, 60.0)]).allowed  # the script is loaded
    admin = RedisStore(redis_url).client
    admin.script_flush()
    admin.execute_command("CLIENT", "PAUSE", 200, "ALL")  # the next hits queue up
    allowed = _hit_all(store, "s", [Rate(5, 60.0)], 8)
    assert allowed == [True] * 4 + [False] * 4
    assert store.errors == 0
    store.close()
    admin.close()


def test_a_hit_interrupted_in_the_queue_strands_no_other(redis_url: str) -> None:
    """The leading hit and a queued one time out while Redis is paused: the
    others are still answered once it resumes, and the limit stays exact."""
    store = RedisStore(redis_url, timeout=5)
    admin = RedisStore(redis_url).client
    assert store.hit("q", [Rate(1000, 60.0)]).allowed  # the script is loaded
    admin.execute_command("CLIENT", "PAUSE", 400, "ALL")

    def hit_within(seconds: float) -> bool | None:
        try:
            with gevent.Timeout(seconds):
                return store.hit("q", [Rate(1000, 60.0)]).allowed
        except gevent.Timeout:
            return None

    leader = gevent.spawn(hit_within, 0.1)
    gevent.sleep(0.02)
    queued = [gevent.spawn(hit_within, 0.15 if i == 0 else 5.0) for i in range(5)]
    gevent.joinall([leader, *queued], timeout=10, raise_error=True)
    assert [leader.value] + [job.value for job in queued] == [None, None] + [True] * 4
    # Later hits are still answered in order (no reply left behind on a connection).
    assert _hit_all(store, "q2", [Rate(3, 60.0)], 5) == [True] * 3 + [False] * 2
    store.close()
    admin.close()


def test_redis_down_fails_open_fast() -> None:
    store = RedisStore(f"redis://127.0.0.1:{dead_port()}/0", retry_interval=0)
    c = Client(LintMiddleware(RateLimit(hello, rates=[Rate(1)], store=store)))
    started = time.monotonic()
    assert [c.get("/", environ_base=LOCAL).status_code for _ in range(3)] == [200, 200, 200]
    assert time.monotonic() - started < 1.0
    assert store.errors == 3


def test_redis_hanging_fails_open_within_timeout() -> None:
    """A Redis that accepts but never answers costs at most the short timeout."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
        store = RedisStore(url, timeout=0.2, retry_interval=60)
        c = Client(LintMiddleware(RateLimit(hello, rates=[Rate(1)], store=store)))
        started = time.monotonic()
        assert c.get("/", environ_base=LOCAL).status_code == 200
        first = time.monotonic() - started
        assert 0.15 < first < 0.6
        started = time.monotonic()
        # Redis is left alone for retry_interval: no more waiting
        assert [c.get("/", environ_base=LOCAL).status_code for _ in range(5)] == [200] * 5
        assert time.monotonic() - started < 0.2
        assert store.errors == 1


def test_redis_down_deny_policy() -> None:
    store = RedisStore(f"redis://127.0.0.1:{dead_port()}/0", on_error="deny")
    c = Client(LintMiddleware(RateLimit(hello, rates=[Rate(100)], store=store)))
    r = c.get("/", environ_base=LOCAL)
    assert (r.status_code, r.headers["Retry-After"], r.headers["X-Retry-In"]) == (429, "1", "1s")
    assert "RateLimit" not in r.headers


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_redis_comes_back_after_retry_interval() -> None:
    clock = FakeClock()
    port = dead_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", clock=clock, retry_interval=5)
    assert store.hit("a", [Rate(1)]) == (True, 0.0, ())  # down: fail open
    server = RedisServer(port)
    try:
        clock.now = 4.9
        assert store.hit("a", [Rate(1)]) == (True, 0.0, ())  # Redis left alone for 5 s
        clock.now = 5.0
        assert store.hit("a", [Rate(1)]).allowed
        assert not store.hit("a", [Rate(1)]).allowed  # the limit holds again
        assert store.errors == 1
    finally:
        store.close()
        server.stop()


@pytest.mark.parametrize(
    ("kwargs"),
    [
        pytest.param({"on_error": "ignore"}, id="bad-policy"),
        pytest.param({"timeout": 0}, id="zero-timeout"),
        pytest.param({"retry_interval": -1}, id="negative-retry"),
    ],
)
def test_store_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RedisStore("redis://127.0.0.1:6379/0", **kwargs)
    with pytest.raises(ConfigurationError):
        RedisConnStore("redis://127.0.0.1:6379/0", **kwargs)


def test_bad_url() -> None:
    with pytest.raises(ConfigurationError):
        RedisStore("http://nope")


# -- RedisConnStore -------------------------------------------------------------------


class Call:
    def __init__(self, app: Any) -> None:
        self.status = ""
        environ = EnvironBuilder(path="/", environ_base={"REMOTE_ADDR": "127.0.0.1"}).get_environ()
        self.body = app(environ, self.start_response)

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        self.status = status
        return lambda data: None

    def finish(self) -> bytes:
        try:
            return b"".join(self.body)
        finally:
            self.body.close()


def test_leases_shared_by_two_workers(redis_url: str) -> None:
    worker1 = LintMiddleware(ConnLimit(hello, max_conns=1, store=RedisConnStore(redis_url)))
    worker2 = LintMiddleware(ConnLimit(hello, max_conns=1, store=RedisConnStore(redis_url)))
    held = Call(worker1)
    assert held.status == "200 OK"
    other = Call(worker2)
    assert other.status == "429 Too Many Requests"
    assert other.finish() == b"connection limit reached: 1 in flight\n"
    assert held.finish() == b"hello"
    again = Call(worker2)
    assert again.status == "200 OK"
    again.finish()


def test_lease_of_a_dead_worker_expires(redis_url: str) -> None:
    store = RedisConnStore(redis_url, lease_ttl=0.3)
    taken = time.monotonic()
    assert store.acquire("127.0.0.1", 1) is not None  # never released: the worker "died"
    assert store.acquire("127.0.0.1", 1) is None
    wait_for(lambda: store.in_flight("127.0.0.1") == 0)  # Redis expires it on its own clock
    assert time.monotonic() - taken >= 0.25  # not before its TTL (Redis rounds to ms)
    assert store.acquire("127.0.0.1", 1) is not None


def test_streaming_response_refreshes_its_lease(redis_url: str) -> None:
    def slow_stream(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for _ in range(16):
            gevent.sleep(0.05)
            yield b"x"

    store = RedisConnStore(redis_url, lease_ttl=0.3)
    app = LintMiddleware(ConnLimit(slow_stream, max_conns=1, store=store))
    call = Call(app)
    body = iter(call.body)
    got = b"".join(next(body) for _ in range(14))  # 0.7 s: over two lease lifetimes
    assert got == b"x" * 14
    assert store.in_flight("127.0.0.1") == 1
    assert store.acquire("127.0.0.1", 1) is None
    assert call.finish() == b"xx"
    assert store.in_flight("127.0.0.1") == 0


def test_conn_store_redis_down_fails_open() -> None:
    store = RedisConnStore(f"redis://127.0.0.1:{dead_port()}/0")
    app = LintMiddleware(ConnLimit(hello, max_conns=1, store=store))
    calls = [Call(app), Call(app)]
    assert [c.status for c in calls] == ["200 OK", "200 OK"]
    for c in calls:
        c.finish()
    deny = RedisConnStore(f"redis://127.0.0.1:{dead_port()}/0", on_error="deny")
    call = Call(LintMiddleware(ConnLimit(hello, max_conns=1, store=deny)))
    assert call.status == "429 Too Many Requests"
    call.finish()


# -- client objects ---------------------------------------------------------------------


def test_stores_accept_a_client_object_and_leave_it_open(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, prefix="obj:rl:")
    assert store.client is client
    rates = [Rate(1, 60.0, burst=2)]
    assert [store.hit("k", rates).allowed for _ in range(3)] == [True, True, False]
    assert client.exists("obj:rl:k") == 1
    conns = RedisConnStore(client, prefix="obj:cl:", lease_ttl=30)
    app = ConnLimit(hello, max_conns=1, store=conns)
    first = Call(app)
    assert first.status.startswith("200")
    assert client.zcard("obj:cl:127.0.0.1") == 1
    second = Call(app)
    assert second.status.startswith("429")
    assert b"".join(second.body) == b"connection limit reached: 1 in flight\n"
    assert first.finish() == b"hello"
    assert client.zcard("obj:cl:127.0.0.1") == 0
    store.close()
    conns.close()
    assert client.ping() is True  # the caller's client is still theirs, still open
    assert store.url == f"<Redis {client.connection_pool.connection_kwargs['host']}:" + (
        f"{client.connection_pool.connection_kwargs['port']}>"
    )
    client.close()


def test_a_client_object_down_fails_open_like_a_url() -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=dead_port(), socket_connect_timeout=0.2)
    store = RedisStore(client, retry_interval=60)
    verdict = store.hit("k", [Rate(1, 60.0)])
    assert (verdict.allowed, store.errors) == (True, 1)
    client.close()


@pytest.mark.parametrize("bad", [42, None, b"redis://x", object()])
def test_neither_url_nor_client(bad: Any) -> None:
    for cls in (RedisStore, RedisConnStore):
        with pytest.raises(ConfigurationError) as info:
            cls(bad)
        assert str(info.value) == (
            "expected a Redis URL (redis://, rediss://, unix://) or a redis-py client "
            f"object, got {type(bad).__name__}"
        )


def test_redis_down_and_back_are_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="oxypy.redis")
    port = dead_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", retry_interval=0)
    c = Client(LintMiddleware(RateLimit(hello, rates=[Rate(100)], store=store)))
    assert [c.get("/", environ_base=LOCAL).status_code for _ in range(3)] == [200] * 3
    server = RedisServer(port)
    try:
        assert [c.get("/", environ_base=LOCAL).status_code for _ in range(3)] == [200] * 3
    finally:
        server.stop()
    url = f"redis://127.0.0.1:{port}/0"
    messages = [r.getMessage() for r in caplog.records if r.name == "oxypy.redis"]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"Redis at {url} unavailable (1 failure(s)), allowing requests")
    assert messages[1] == f"Redis at {url} available again"
    store.close()
