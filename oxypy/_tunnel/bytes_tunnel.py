"""Byte-level tunnelling of upgraded connections (WebSocket) after a 101.

Forward relays the client's handshake like any request; when the upstream
answers ``101 Switching Protocols`` the two sockets are joined and bytes are
copied both ways until either side closes: frames of any kind (text, binary,
fragments, ping/pong, close with its code, permessage-deflate) pass untouched.

Servers expose the client connection differently:

* ``oxypy.serve`` and ``oxypy.gunicorn.Worker``: the app calls
  ``start_response("101 ...")`` and ``wsgi.input.take_socket()`` hands over the
  client socket and the bytes read past the head; over plain TCP both
  directions are then copied from the event loop's callbacks
  (:mod:`oxypy._tunnel.splice`), and the response iterable is empty and lasts
  as long as the tunnel.  Over TLS, as below.
* ``gevent.pywsgi`` and gunicorn ``-k gevent_pywsgi``: ``wsgi.input`` reads the
  raw socket (a greenlet pumps it upstream) and the bytes the response
  iterable yields are written unframed.
* gunicorn ``-k gevent`` (gunicorn's own parser) drops body bytes after a 101,
  so the raw ``gunicorn.socket`` is taken over, the tunnel runs to its end
  (spliced when both sockets are plain TCP), and ``StopIteration`` tells
  gunicorn the connection was handled.
* gevent-websocket answers the handshake itself: see :mod:`oxypy._tunnel.ws_relay`.

The tunnel depends on ``_client`` (the upstream response it takes the socket
from) and ``_core`` only; Forward calls it, never the other way round.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

import gevent

from .._client.exchange import UpstreamResponse
from .._core.exchange import Exchange
from .._core.headers import HOP_BY_HOP
from .._core.types import StartResponse, WSGIEnvironment
from ..errors import ErrorHandler, respond_error
from ..exceptions import UpstreamProtocolError
from .splice import Splice, plain_socket
from .ws_relay import relay_messages

__all__ = ["relay_upgrade"]

log = logging.getLogger(__name__)
RECV_SIZE = 65536
#: After one side closes, how long the other may take to finish its close.
LINGER = 5.0


def relay_upgrade(
    environ: WSGIEnvironment,
    start_response: StartResponse,
    resp: UpstreamResponse,
    record: Exchange,
    requested: str | None,
    *,
    idle_timeout: float | None,
    error_handler: ErrorHandler,
) -> Iterable[bytes]:
    """Answer the client's upgrade with the upstream's 101 and join the sockets.

    ``idle_timeout`` bounds how long either side may stay silent; a 101 for a
    protocol the client did not ask for is answered through ``error_handler``.
    """
    offered = next((v for n, v in resp.headers if n.lower() == "upgrade"), None)
    if requested is None or offered is None or offered.strip().lower() != requested.lower():
        resp.close()
        exc = UpstreamProtocolError("upstream switched to a protocol the client did not ask for")
        record.error = exc
        return respond_error(error_handler, environ, start_response, exc)
    headers = [(n, v) for n, v in resp.headers if n.lower() not in HOP_BY_HOP]
    headers.append(("Connection", "Upgrade"))
    headers.append(("Upgrade", offered))
    leftover = resp.leftover
    upstream = resp.detach()

    if "wsgi.websocket" in environ:
        return relay_messages(environ, upstream, leftover, record)

    if "gunicorn.socket" in environ and "gunicorn.sock" not in environ:
        client = environ["gunicorn.socket"]
        head = ["HTTP/1.1 101 Switching Protocols\r\n"]
        head.extend(f"{n}: {v}\r\n" for n, v in headers)
        head.append("\r\n")
        try:
            client.sendall("".join(head).encode("latin-1") + leftover)
            if plain_socket(client) and plain_socket(upstream):
                Splice(client, upstream, record, idle_timeout=idle_timeout, linger=LINGER).run()
            else:
                upstream.settimeout(idle_timeout)
                client.settimeout(idle_timeout)
                _join(client.recv, client, upstream)
        finally:
            record.ended = time.monotonic()
            _close(upstream)
        # gunicorn's signal that the app took the connection over.
        raise StopIteration()

    write = start_response("101 Switching Protocols", headers)
    # Servers send the head with the first non-empty body piece, but a WebSocket
    # client waits for the 101 before it says anything: flush it now through the
    # write() callable (PEP 3333), which pywsgi and oxypy.serve honour at once.
    write(b"")
    source = environ["wsgi.input"]
    take = getattr(source, "take_socket", None)
    if take is not None and plain_socket(upstream):
        # oxypy's server hands its socket over: copied from the loop's callbacks.
        client, early = take()
        if plain_socket(client):
            return _Spliced(client, early, upstream, leftover, record, idle_timeout)
        read = _prefixed(early, client.recv)
    else:
        read = getattr(source, "read1", None) or source.read
    upstream.settimeout(idle_timeout)
    return _Tunnel(read, upstream, leftover, record)


def _prefixed(first: bytes, recv: Any) -> Any:
    """``recv``, returning ``first`` on the first call when there is any."""
    pending = [first] if first else []

    def read(size: int) -> bytes:
        if pending:
            return pending.pop()
        data: bytes = recv(size)
        return data

    return read


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _pump(read: Any, dest: Any) -> None:
    """Copy until EOF from ``read`` to ``dest``, then half-close ``dest``."""
    try:
        while True:
            data = read(RECV_SIZE)
            if not data:
                break
            dest.sendall(data)
    except (OSError, ValueError):
        pass
    finally:
        try:
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _join(client_read: Any, client: Any, upstream: Any) -> None:
    """Copy both ways until both directions are done (or one dies)."""
    up = gevent.spawn(_pump, client_read, upstream)
    try:
        _pump(upstream.recv, client)
        up.join(timeout=LINGER)
    finally:
        up.kill(block=True, timeout=1)


class _Spliced:
    """The 101 response body on oxypy's server: an empty body that lasts as long as the tunnel.

    The server has sent the 101; the bytes each side sent before the tunnel
    began go out first, then :class:`Splice` copies both ways until the end.
    """

    def __init__(
        self,
        client: Any,
        early: bytes,
        upstream: Any,
        leftover: bytes,
        record: Exchange,
        idle_timeout: float | None,
    ) -> None:
        self.client = client
        self.early = early
        self.upstream = upstream
        self.leftover = leftover
        self.record = record
        self.idle_timeout = idle_timeout
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        # A generator: the tunnel runs when the server asks for the first
        # piece, never in iter(), which a block may call before it passes the
        # 101 on (Buffer does).
        try:
            if self.leftover:
                self.client.sendall(self.leftover)
                self.record.bytes_received += len(self.leftover)
            if self.early:
                self.upstream.sendall(self.early)
        except OSError:
            return
        splice = Splice(
            self.client, self.upstream, self.record, idle_timeout=self.idle_timeout, linger=LINGER
        )
        splice.run()
        # Ending the body (it yields nothing) makes the server close the client.
        yield from ()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.record.ended = time.monotonic()
        _close(self.upstream)


class _Tunnel:
    """The 101 response body: upstream bytes out, while a greenlet pumps client bytes in."""

    def __init__(self, read: Any, upstream: Any, leftover: bytes, record: Exchange) -> None:
        self.read = read
        self.upstream = upstream
        self.leftover = leftover
        self.record = record
        self.pump: gevent.Greenlet | None = None
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        self.pump = gevent.spawn(_pump, self.read, self.upstream)
        if self.leftover:
            yield self.leftover
        upstream = self.upstream
        while True:
            try:
                data = upstream.recv(RECV_SIZE)
            except OSError:
                break
            if not data:
                break
            self.record.bytes_received += len(data)
            yield data
        # Upstream finished: ending the body makes the server close the client.

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.record.ended = time.monotonic()
        if self.pump is not None:
            self.pump.kill(block=True, timeout=1)
        _close(self.upstream)
