"""The byte-level tunnel after a 101, on every way a server exposes the client socket.

On ``oxypy.serve`` a plain-TCP tunnel is copied from the event loop's
callbacks (``_tunnel/splice.py``); over TLS, and on gevent.pywsgi, by two
greenlets.  The behaviours here hold on each: bytes either side sent before
the tunnel began come first, big transfers through slow readers arrive
intact, ``tunnel_idle_timeout`` closes a silent tunnel (and only a silent
one), and after one side's close the other direction has ``LINGER`` seconds.
Raw sockets on both ends: the tunnel is byte-transparent.
"""

from __future__ import annotations

import hashlib
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
import trustme

from oxypy import Buffer, Forward
from oxypy._tunnel import bytes_tunnel
from oxypy.server import Server

from _servers import RawUpstream, start_pywsgi, wait_for

UPGRADE = b"GET /t HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"

Handler = Callable[[socket.socket, bytes], None]


class Proxy:
    """Forward on one server kind; :meth:`connect` opens a client socket to it."""

    def __init__(self, kind: str, app: Any) -> None:
        self.kind = kind
        self.client_context: ssl.SSLContext | None = None
        if kind == "pywsgi":
            self.server: Any = start_pywsgi(app)
            self.port = self.server.address[1]
            return
        context = None
        if kind == "serve-tls":
            ca = trustme.CA()
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(context)
            self.client_context = ssl.create_default_context()
            ca.configure_trust(self.client_context)
        self.server = Server(app, "127.0.0.1:0", graceful_timeout=2, ssl_context=context).start()
        self.port = self.server.address[1]

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        if self.client_context is not None:
            sock = self.client_context.wrap_socket(sock, server_hostname="127.0.0.1")
        return sock

    def stop(self) -> None:
        self.server.stop(timeout=1)


KINDS = ["serve", "serve-tls", "pywsgi"]


@pytest.fixture
def upstreams() -> Iterator[Callable[[Handler], RawUpstream]]:
    started: list[RawUpstream] = []

    def start(handler: Handler) -> RawUpstream:
        up = RawUpstream(handler)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


@pytest.fixture(params=KINDS)
def proxy_of(request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(upstream: RawUpstream, **options: Any) -> Proxy:
        proxy = Proxy(request.param, Forward(upstream.url, **options))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def open_tunnel(proxy: Proxy, early: bytes = b"", **kw: Any) -> tuple[socket.socket, bytes]:
    """Send the upgrade (and ``early`` in the same write); the socket and what followed the 101."""
    sock = proxy.connect(**kw)
    sock.sendall(UPGRADE + early)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"closed before the 101: {data!r}"
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), head
    return sock, rest


def read_exactly(sock: socket.socket, size: int, have: bytes = b"") -> bytes:
    data = bytearray(have)
    while len(data) < size:
        piece = sock.recv(min(size - len(data), 1 << 20))
        assert piece, f"EOF after {len(data)} of {size} bytes"
        data += piece
    return bytes(data)


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while piece := sock.recv(65536):
        data += piece
    return bytes(data)


def echo(greeting: bytes = b"") -> Handler:
    def handle(sock: socket.socket, head: bytes) -> None:
        sock.sendall(SWITCH + greeting)
        while data := sock.recv(65536):
            sock.sendall(data)

    return handle


def test_bytes_sent_before_the_tunnel_began_come_first(
    proxy_of: Callable[..., Proxy], upstreams: Callable[[Handler], RawUpstream]
) -> None:
    # The upstream's bytes came with its 101, the client's with its upgrade:
    # both were read by a parser before the tunnel existed.
    proxy = proxy_of(upstreams(echo(b"hello")))
    sock, rest = open_tunnel(proxy, early=b"early")
    try:
        assert read_exactly(sock, 10, rest) == b"helloearly"
        sock.sendall(b"more")
        assert read_exactly(sock, 4) == b"more"
    finally:
        sock.close()


def test_big_transfers_through_slow_readers_arrive_intact(
    proxy_of: Callable[..., Proxy], upstreams: Callable[[Handler], RawUpstream]
) -> None:
    # 4 MiB each way against a client that reads nothing for a while through a
    # small receive buffer: the proxy's writes fill up and must resume.
    payload = random.Random(17).randbytes(4 << 20)
    proxy = proxy_of(upstreams(echo()))
    sock, rest = open_tunnel(proxy, rcvbuf=32 << 10)
    try:
        sender = gevent.spawn(sock.sendall, payload)
        gevent.sleep(0.3)
        got = read_exactly(sock, len(payload), rest)
        sender.get(timeout=10)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["serve", "serve-tls"])
def test_idle_timeout_closes_a_silent_tunnel_only(
    kind: str, upstreams: Callable[[Handler], RawUpstream]
) -> None:
    # (gevent.pywsgi keeps the client connection after the tunnel's end.)
    proxy = Proxy(kind, Forward(upstreams(echo()).url, tunnel_idle_timeout=0.4))
    sock, rest = open_tunnel(proxy)
    try:
        assert rest == b""
        # Talking every 0.1 s for three idle timeouts keeps it open.
        for i in range(12):
            time.sleep(0.1)
            sock.sendall(b"%02d" % i)
            assert read_exactly(sock, 2) == b"%02d" % i
        silent = time.monotonic()
        assert read_to_eof(sock) == b""
        assert 0.35 <= time.monotonic() - silent < 3
    finally:
        sock.close()
        proxy.stop()


def test_after_the_upstream_closes_the_client_has_linger_seconds(
    monkeypatch: pytest.MonkeyPatch, upstreams: Callable[[Handler], RawUpstream]
) -> None:
    # The upstream half-closes: the client reads the end, and what it still
    # sends reaches the upstream until LINGER passes, then both ends close.
    monkeypatch.setattr(bytes_tunnel, "LINGER", 0.5)
    got: list[bytes] = []
    times: list[float] = []

    def half_close(sock: socket.socket, head: bytes) -> None:
        sock.sendall(SWITCH + b"bye")
        sock.shutdown(socket.SHUT_WR)
        times.append(time.monotonic())
        got.append(read_to_eof(sock))
        times.append(time.monotonic())

    proxy = Proxy("serve", Forward(upstreams(half_close).url))
    try:
        sock, rest = open_tunnel(proxy)
        try:
            assert read_exactly(sock, 3, rest) == b"bye"
            assert sock.recv(10) == b""  # the upstream's end, relayed as a half-close
            sock.sendall(b"after")
            wait_for(lambda: len(times) == 2, timeout=5)
            assert got == [b"after"]
            assert 0.45 <= times[1] - times[0] < 3
        finally:
            sock.close()
    finally:
        proxy.stop()


def test_a_client_close_ends_the_tunnel_at_once(
    proxy_of: Callable[..., Proxy], upstreams: Callable[[Handler], RawUpstream]
) -> None:
    ended: list[float] = []

    def count(sock: socket.socket, head: bytes) -> None:
        sock.sendall(SWITCH)
        read_to_eof(sock)
        ended.append(time.monotonic())

    proxy = proxy_of(upstreams(count))
    sock, _ = open_tunnel(proxy)
    sock.sendall(b"x")
    closed = time.monotonic()
    sock.close()
    wait_for(lambda: bool(ended), timeout=5)
    assert ended[0] - closed < 2


@pytest.mark.parametrize("kind", ["serve", "serve-tls"])
def test_stopping_the_server_ends_open_tunnels(
    kind: str, upstreams: Callable[[Handler], RawUpstream]
) -> None:
    ended: list[bytes] = []

    def count(sock: socket.socket, head: bytes) -> None:
        sock.sendall(SWITCH)
        ended.append(read_to_eof(sock))

    proxy = Proxy(kind, Forward(upstreams(count).url))
    sock, _ = open_tunnel(proxy)
    try:
        sock.sendall(b"x")
        started = time.monotonic()
        proxy.server.stop(timeout=0.2)
        assert time.monotonic() - started < 3
        wait_for(lambda: ended == [b"x"], timeout=5)
        assert read_to_eof(sock) == b""
    finally:
        sock.close()


def test_a_block_that_calls_iter_before_passing_the_101_on(
    upstreams: Callable[[Handler], RawUpstream],
) -> None:
    # Buffer takes the response iterator before it hands the 101 to the server:
    # the tunnel must not start (and block) in iter().
    proxy = Proxy("serve", Buffer(Forward(upstreams(echo(b"hi")).url)))
    try:
        sock, rest = open_tunnel(proxy)
        try:
            sock.sendall(b"ping")
            assert read_exactly(sock, 6, rest) == b"hiping"
        finally:
            sock.close()
    finally:
        proxy.stop()
