"""Forward's upstream client: error classification, client aborts, the idle pool, the urllib3 seam.

Also run by ``.ci/run`` against the oldest and the newest urllib3 the pin
allows, since :mod:`oxypy._client.pool` uses urllib3's private names.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
import urllib3
from gevent.server import StreamServer

from oxypy import CircuitBreaker, Forward, Trace
from oxypy.environ import ERROR, EXCHANGES
from oxypy.exceptions import ClientDisconnected, ConfigurationError

from _servers import REPO, RawUpstream, full_backlog, read_exact_body

HTTP = urllib3.PoolManager(retries=False, timeout=10)
RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        gevent.sleep(0.01)


def traced_lines(lines: list[str], count: int = 1) -> list[dict[str, Any]]:
    wait_for(lambda: len(lines) >= count)
    return [json.loads(line) for line in lines]


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    sock.close()


# -- errors are classified by phase and type --------------------------------------------------


def test_connect_timeout_is_504_with_kind(proxy: Any) -> None:
    lines: list[str] = []
    with full_backlog() as port:
        fwd = Forward(f"http://127.0.0.1:{port}", connect_timeout=0.3)
        resp = HTTP.request("GET", proxy(Trace(fwd, sink=lines.append)) + "/")
    assert resp.status == 504
    assert resp.data == b"upstream connect timed out\n"
    (rec,) = traced_lines(lines)
    assert rec["status"] == 504 and rec["error"] == "upstream_timeout"


def test_reset_mid_response_is_a_read_error(proxy: Any) -> None:
    def handler(sock: socket.socket, data: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        gevent.sleep(0.05)
        reset(sock)

    up = RawUpstream(handler)
    lines: list[str] = []
    try:
        url = proxy(Trace(Forward(up.url), sink=lines.append))
        host, port = url.split("//", 1)[1].split(":")
        got = b""
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            while True:
                piece = client.recv(65536)
                if not piece:
                    break
                got += piece
        # The head and the five bytes went out; then the connection was cut.
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nhello")
        (rec,) = traced_lines(lines)
        assert rec["error"] == "upstream_read_error"
        assert rec["upstream"][0]["error"] == "upstream_read_error"
    finally:
        up.stop()


def test_reset_before_the_head_is_a_502_read_error(proxy: Any) -> None:
    up = RawUpstream(lambda sock, data: reset(sock))
    lines: list[str] = []
    try:
        resp = HTTP.request("POST", proxy(Trace(Forward(up.url), sink=lines.append)), body=b"x")
        assert resp.status == 502
        (rec,) = traced_lines(lines)
        assert rec["status"] == 502 and rec["error"] == "upstream_read_error"
    finally:
        up.stop()


def test_tls_failure_is_a_connect_error(proxy: Any) -> None:
    # A plain-HTTP server answering the TLS ClientHello: the handshake fails.
    def plain(sock: socket.socket, addr: Any) -> None:
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        sock.close()

    up = StreamServer(("127.0.0.1", 0), plain)
    up.start()
    lines: list[str] = []
    try:
        fwd = Forward(f"https://127.0.0.1:{up.server_port}", connect_timeout=2)
        resp = HTTP.request("GET", proxy(Trace(fwd, sink=lines.append)) + "/")
        assert resp.status == 502
        assert resp.data == b"TLS handshake with upstream failed\n"
        (rec,) = traced_lines(lines)
        assert rec["error"] == "upstream_tls_error"  # an UpstreamConnectError subclass
        assert rec["error_detail"] == "wrong version number"
    finally:
        up.stop()


# -- a client that goes away while uploading -----------------------------------------------------


class CountingUpstream:
    """A raw keep-alive upstream that counts connections opened and seen closed."""

    def __init__(self, body: bytes = b"ok", *, read_body: bool = True) -> None:
        self.body = body
        self.read_body = read_body
        self.opened = 0
        self.closed = 0
        self.received = 0
        self.got_data = gevent.event.Event()
        self.gate: gevent.event.Event | None = None
        self.up = RawUpstream(self._handle)

    @property
    def url(self) -> str:
        return self.up.url

    def _handle(self, sock: socket.socket, data: bytes) -> None:
        self.opened += 1
        try:
            while True:
                if not self.read_body:
                    # Read whatever arrives until the proxy closes the connection.
                    self.received += len(data)
                    self.got_data.set()
                    while sock.recv(65536):
                        self.got_data.set()
                    return
                read_exact_body(sock, data)
                if self.gate is not None:
                    self.gate.wait(5)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
                sock.sendall(self.body)
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = sock.recv(65536)
                    if not piece:
                        return
                    data += piece
        finally:
            self.closed += 1

    def stop(self) -> None:
        self.up.stop()


def _abort_upload(url: str, sent: int = 100_000, declared: int = 10 * 1024 * 1024) -> None:
    host, port = url.split("//", 1)[1].split(":")
    client = socket.create_connection((host, int(port)), timeout=5)
    client.sendall(
        b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % declared + b"u" * sent
    )
    gevent.sleep(0.05)
    reset(client)


def test_client_abort_during_upload_is_499_and_closes_the_upstream(proxy: Any) -> None:
    upstream = CountingUpstream(read_body=False)
    seen: list[dict[str, Any]] = []
    fwd = Forward(upstream.url)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.append(environ)
        return fwd(environ, start_response)

    try:
        url = proxy(app, lint=False)
        _abort_upload(url)
        wait_for(lambda: upstream.closed == 1)  # Forward closed the upstream connection
        wait_for(lambda: ERROR in seen[0])
        error = seen[0][ERROR]
        assert isinstance(error, ClientDisconnected) and error.status == 499
        (record,) = seen[0][EXCHANGES]
        assert record.error is error
        assert record.network_error is False and record.client_aborted is True
        assert fwd._target(upstream.url).pool.idle == 0  # not returned to the pool
        assert upstream.opened == 1
    finally:
        upstream.stop()


def test_aborting_uploaders_never_trip_the_breaker(proxy: Any) -> None:
    upstream = CountingUpstream()
    lines: list[str] = []
    breaker = CircuitBreaker(Forward(upstream.url), "NetworkErrorRatio() > 0.5")
    try:
        url = proxy(Trace(breaker, sink=lines.append), lint=False)
        for _ in range(10):
            _abort_upload(url)
        recs = traced_lines(lines, 10)
        assert [r["status"] for r in recs] == [499] * 10
        assert {r["error"] for r in recs} == {"client_disconnected"}
        wait_for(lambda: upstream.closed == 10)
        resp = HTTP.request("GET", url + "/healthy")
        assert resp.status == 200 and resp.data == b"ok"
        assert breaker.metrics.network_error_count() == 0
    finally:
        upstream.stop()


# -- idle pooled connections are closed after the bound ---------------------------------------


def test_idle_pooled_connections_are_closed_after_the_bound(proxy: Any) -> None:
    upstream = CountingUpstream()
    upstream.gate = gevent.event.Event()
    fwd = Forward(upstream.url, pool_idle_timeout=0.5)
    n = 8

    def aborted_download(url: str, i: int) -> bytes:
        host, port = url.split("//", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            got = client.recv(12)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            return got

    try:
        url = proxy(fwd)
        jobs = [gevent.spawn(aborted_download, url, i) for i in range(n)]
        wait_for(lambda: upstream.opened == n)  # n concurrent requests: n connections
        upstream.gate.set()
        gevent.joinall(jobs, timeout=5, raise_error=True)
        assert [job.value for job in jobs] == [b"HTTP/1.1 200"] * n
        pool = fwd._target(upstream.url).pool
        # Each small answer was read whole before the client left: all pooled.
        wait_for(lambda: pool.idle == n)
        # Nothing else happens: the sweeper alone closes them, seen upstream.
        wait_for(lambda: upstream.closed == n, timeout=5)
        assert pool.idle == 0
        # The pool still works afterwards, on a fresh connection.
        assert HTTP.request("GET", url + "/again").data == b"ok"
        assert upstream.opened == n + 1
    finally:
        fwd.close()
        upstream.stop()


def test_connection_idle_past_the_bound_is_not_reused_at_checkout(proxy: Any) -> None:
    upstream = CountingUpstream()
    fwd = Forward(upstream.url, pool_idle_timeout=0.2)
    fwd._pools.close()  # no sweeper: only the checkout check can act
    try:
        url = proxy(fwd)
        assert HTTP.request("GET", url + "/1").data == b"ok"
        assert HTTP.request("GET", url + "/2").data == b"ok"
        assert upstream.opened == 1  # reused within the bound
        gevent.sleep(0.4)
        assert HTTP.request("GET", url + "/3").data == b"ok"
        assert upstream.opened == 2
        wait_for(lambda: upstream.closed == 1)
    finally:
        fwd.close()
        upstream.stop()


def test_no_idle_bound_keeps_connections() -> None:
    fwd = Forward("http://127.0.0.1:1", pool_idle_timeout=None)
    assert fwd.pool_idle_timeout is None


@pytest.mark.parametrize("bad", [0, -1.0])
def test_pool_idle_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ConfigurationError, match="pool_idle_timeout"):
        Forward("http://127.0.0.1:1", pool_idle_timeout=bad)


# -- the pool's own LIFO of idle connections (not urllib3's queue) -----------------------------


def test_close_closes_the_idle_connections(proxy: Any) -> None:
    upstream = CountingUpstream()
    fwd = Forward(upstream.url)
    try:
        url = proxy(fwd)
        assert HTTP.request("GET", url + "/1").data == b"ok"
        assert HTTP.request("GET", url + "/2").data == b"ok"
        assert upstream.opened == 1 and upstream.closed == 0  # kept alive, reused
        fwd.close()
        wait_for(lambda: upstream.closed == 1)
    finally:
        fwd.close()
        upstream.stop()


def _blocking(upstream: CountingUpstream, pool_timeout: float) -> Forward:
    manager = urllib3.PoolManager(maxsize=1, block=True, retries=False, timeout=10)
    return Forward(upstream.url, pool=manager, pool_timeout=pool_timeout)


def test_blocking_pool_serves_waiters_on_its_one_connection(proxy: Any) -> None:
    upstream = CountingUpstream()
    upstream.gate = gevent.event.Event()
    fwd = _blocking(upstream, 5)
    try:
        url = proxy(fwd)
        jobs = [gevent.spawn(HTTP.request, "GET", f"{url}/{i}") for i in range(3)]
        wait_for(lambda: upstream.opened == 1)
        tokens = fwd._target(upstream.url).pool._tokens
        wait_for(lambda: len(tokens.waiters) == 2)  # the others wait for its slot
        upstream.gate.set()
        gevent.joinall(jobs, timeout=10, raise_error=True)
        assert [(job.value.status, job.value.data) for job in jobs] == [(200, b"ok")] * 3
        assert upstream.opened == 1 and upstream.closed == 0
    finally:
        fwd.close()
        upstream.stop()


def test_blocking_pool_times_out_then_serves_again(proxy: Any) -> None:
    upstream = CountingUpstream()
    upstream.gate = gevent.event.Event()
    fwd = _blocking(upstream, 0.2)
    try:
        url = proxy(fwd)
        held = gevent.spawn(HTTP.request, "GET", url + "/held")
        wait_for(lambda: upstream.opened == 1)
        started = time.monotonic()
        resp = HTTP.request("GET", url + "/waits")
        assert resp.status == 502
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert 0.15 < time.monotonic() - started < 3
        upstream.gate.set()
        assert held.get(timeout=10).data == b"ok"
        assert HTTP.request("GET", url + "/again").data == b"ok"
        assert upstream.opened == 1  # the slot came back with its connection
    finally:
        fwd.close()
        upstream.stop()


def test_killed_waiter_leaves_the_connection_to_the_next(proxy: Any) -> None:
    upstream = CountingUpstream()
    fwd = _blocking(upstream, 5)
    try:
        pool = fwd._target(upstream.url).pool
        conn, reused = pool.checkout(5)
        assert not reused
        first = gevent.spawn(pool.checkout, 5)
        second = gevent.spawn(pool.checkout, 5)
        wait_for(lambda: len(pool._tokens.waiters) == 2)
        first.kill(timeout=5)
        pool.checkin(conn)
        assert second.get(timeout=5) == (conn, True)
        assert pool._tokens.waiters == deque() and pool.slots == 0
        pool.checkin(conn)
        assert pool.slots == 1 and pool.idle == 1
    finally:
        fwd.close()
        upstream.stop()


def test_checkout_and_checkin_never_switch_greenlets_whatever_was_imported_first(
    tmp_path: Path,
) -> None:
    """urllib3 imported before the patch gave its pool the standard library's
    queue on gevent's locks, whose every get/put switched to the hub."""
    script = tmp_path / "no_switch.py"
    script.write_text(
        "import oxypy  # and urllib3, before gevent patches: as gunicorn's master does\n"
        "from gevent import monkey\n"
        "monkey.patch_all()\n"
        "import greenlet\n"
        "from gevent.server import StreamServer\n"
        "up = StreamServer(('127.0.0.1', 0), lambda sock, addr: sock.recv(1))\n"
        "up.start()\n"
        "fwd = oxypy.Forward(f'http://127.0.0.1:{up.address[1]}')\n"
        "pool = fwd._target(f'http://127.0.0.1:{up.address[1]}').pool\n"
        "conn, reused = pool.checkout(5)\n"
        "pool.checkin(conn)\n"
        "switches = []\n"
        "greenlet.settrace(lambda event, args: switches.append(event))\n"
        "for _ in range(20):\n"
        "    conn, reused = pool.checkout(5)\n"
        "    assert reused\n"
        "    pool.checkin(conn)\n"
        "greenlet.settrace(None)\n"
        "print(reused, len(switches))\n"
    )
    # This checkout's oxypy, after whatever the run put first (CI's urllib3 pin).
    path = [p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p]
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True 0"


def test_seam_runs_on_this_urllib3() -> None:
    # The CI runs this file with the oldest and newest urllib3 the pin allows.
    major, minor = (int(x) for x in importlib.metadata.version("urllib3").split(".")[:2])
    assert (major, minor) >= (2, 2) and major < 3


def test_ci_runs_the_oldest_urllib3_the_pin_allows() -> None:
    root = Path(__file__).resolve().parent.parent
    assert '"urllib3>=2.2,<3"' in (root / "pyproject.toml").read_text()
    ci = (root / ".ci" / "run").read_text()
    assert "'urllib3==2.2.0' 'urllib3>=2.2,<3'" in ci
