"""HTTP/1.1 connections of the embedded server: parse, run the app, frame the answer.

Theory of operation: each connection runs in one greenlet.  llhttp
(``httptools``) is fed one ``recv`` at a time and its callbacks queue events
(head, body piece, end); the request loop pulls events as the application
reads ``wsgi.input``, so an upload streams with at most one ``recv``
(64 KiB) buffered.  Responses go out with the head and the first body piece in
one ``send`` and ``TCP_NODELAY`` set, so keep-alive clients never wait on a
delayed ACK.  See :mod:`oxypy.server` for what is rejected and why.

After a response, a keep-alive connection yields once to the other
connections (when there are any) before it waits for the next request: by
the time it runs again the client's next request has usually arrived, so it
is read without arming a timer and an I/O watcher and without a trip through
the hub.  Under load this saves about a tenth of the CPU per request and the
garbage collections those per-wait objects caused (``benchmarks/README.md``,
issue 17); a lone connection does not yield.

Timers (each a socket timeout set before the ``recv`` it bounds):

* a request head must be complete ``header_timeout`` seconds after its first
  byte (after accept for the first request), however slowly it trickles in;
  past that the client gets ``408`` and the connection closes (nginx's
  ``client_header_timeout``).  A connection that sent nothing is closed
  without an answer;
* between two requests a connection may stay silent ``keepalive_timeout``
  seconds, then it is closed without an answer (nginx's ``keepalive_timeout``);
* while the app reads the body, each read may wait ``body_timeout`` seconds for
  a byte; past that ``wsgi.input`` raises :class:`~oxypy.exceptions.ClientGone`
  and the connection closes (nginx's ``client_body_timeout``).  The same bound
  applies to a response write that makes no progress.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from typing import Any
from urllib.parse import unquote_to_bytes

import gevent
import httptools

from .. import environ as keys
from .._core.sockets import peer_closed, send_all
from .._core.urls import split_absolute_form
from ..exceptions import BadRequest, ClientGone
from .common import BODY, END, HEAD, LINGER_SECONDS, RECV_SIZE
from .config import ServerConfig
from .listener import ConnectionTable
from .wsgi_io import Input, RawInput, ResponseWriter

__all__ = ["Connection"]

log = logging.getLogger("oxypy.server")


class Connection:
    """One client connection: parse requests, run the app, write responses."""

    def __init__(
        self,
        config: ServerConfig,
        table: ConnectionTable,
        sock: Any,
        addr: Any,
        accepted: float,
    ) -> None:
        self.config = config
        self.table = table
        self.sock = sock
        self.accepted = accepted
        self.events: deque[Any] = deque()
        self.parser = httptools.HttpRequestParser(self)
        self.leftover = b""
        self.upgraded = False
        self.busy = False
        self.closing = False
        self.evicted = False
        #: The client is gone (or its body stalled): nothing more is read or written.
        self.gone = False
        #: The greenlet running :meth:`run` (the server kills it at the graceful timeout).
        self.greenlet: Any = None
        self.body_done = False
        self.pending_error: BadRequest | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_trailers = False
        #: When the first byte of the head being received arrived (None: no head begun).
        self._head_started: float | None = None
        host, port = addr[0], addr[1]
        self.base_environ = config.base_environ(host, port)
        self.base_environ[keys.CLIENT_GONE] = self.client_gone
        version = getattr(sock, "version", None)
        if version is not None:  # TLS: what Trace and apps may want to know
            cipher = sock.cipher()
            self.base_environ["SSL_PROTOCOL"] = version() or ""
            self.base_environ["SSL_CIPHER"] = cipher[0] if cipher else ""

    # -- llhttp callbacks -----------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._in_trailers = False
        self._head_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.config.max_head_bytes:
            raise BadRequest("request-target too long", status=414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.config.max_head_bytes:
            raise BadRequest("request header fields too large", status=431)
        if not self._in_trailers:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self._in_trailers = True
        self._head_started = None
        self.events.append(
            (
                HEAD,
                self._url,
                self._headers,
                p.get_method(),
                p.get_http_version(),
                p.should_keep_alive(),
                p.should_upgrade(),
            )
        )

    def on_body(self, body: bytes) -> None:
        self.events.append((BODY, body))

    def on_message_complete(self) -> None:
        self.events.append((END,))

    # -- socket I/O -----------------------------------------------------------
    def client_gone(self) -> bool:
        """True when the client has closed its side (polled without blocking).

        Exposed as ``environ["oxypy.client_gone"]`` so a block that waits
        between attempts (Buffer's retries) stops when nobody is left to answer.
        """
        if self.upgraded:
            return False
        return peer_closed(self.sock, data_is_fine=True)

    def evict(self) -> None:
        """Close this waiting connection to make room for a new one (at the cap)."""
        self.evicted = True
        self.close()

    def send(self, data: bytes) -> None:
        if self.gone:
            raise ClientGone()
        try:
            send_all(self.sock, data)
        except OSError as exc:
            self.gone = True
            raise ClientGone() from exc

    def _fill(self) -> bool:
        """Feed one recv to the parser; False on EOF.

        A socket timeout propagates as :class:`TimeoutError` (the caller knows
        which timer it was); any other socket error is :class:`ClientGone`.
        """
        if self.pending_error is not None:
            raise self.pending_error
        if self.gone:
            raise ClientGone()
        if self.upgraded:
            return False
        try:
            data: bytes = self.sock.recv(RECV_SIZE)
        except TimeoutError:
            raise
        except OSError as exc:
            self.gone = True
            raise ClientGone() from exc
        if not data:
            return False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self.upgraded = True
            self.leftover = data[offset:]
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            error = (
                cause
                if isinstance(cause, BadRequest)
                else BadRequest(str(exc) or "malformed request")
            )
            # The parser is dead: nothing after the fault is ever read.  Requests
            # queued before it are answered first; the fault ends the connection
            # as soon as the queue reaches it.
            self.pending_error = error
            if not self.events:
                raise error from None
        return True

    def body_piece(self) -> bytes:
        """The next piece of the current request body; b"" at its end."""
        while True:
            if self.body_done:
                return b""
            if self.events:
                event = self.events[0]
                if event[0] == BODY:
                    self.events.popleft()
                    data: bytes = event[1]
                    return data
                if event[0] == END:
                    self.events.popleft()
                self.body_done = True
                return b""
            if self.upgraded:
                self.body_done = True
                return b""
            try:
                more = self._fill()
            except TimeoutError as exc:
                # A stalled body ends the connection: whatever a block answers
                # (a 499 for a gone client) is not written, nothing more is read.
                self.gone = True
                raise ClientGone(
                    f"no request body byte for {self.config.body_timeout:g} s"
                ) from exc
            if not more:
                self.gone = True
                raise ClientGone("client closed mid-body")

    def finish_body(self) -> bool:
        """Consume what the app left of the body; False if the connection must close."""
        if self.upgraded or self.gone:
            return False
        seen = 0
        while not self.body_done:
            try:
                data = self.body_piece()
            except (ClientGone, BadRequest):
                return False
            seen += len(data)
            if seen > self.config.max_drain_bytes:
                return False
        return True

    def raw_piece(self) -> bytes:
        if self.leftover:
            data, self.leftover = self.leftover, b""
            return data
        try:
            chunk: bytes = self.sock.recv(RECV_SIZE)
        except OSError:
            return b""
        return chunk

    def take_socket(self) -> tuple[Any, bytes]:
        """The socket and the bytes read past an upgrade's head (see ``RawInput.take_socket``)."""
        data, self.leftover = self.leftover, b""
        return self.sock, data

    def next_head(self, first: bool) -> tuple[Any, ...] | None:
        """The next request head, or None when the connection should close quietly.

        Raises :class:`BadRequest` (408) when a head was begun but not finished
        within ``header_timeout``.
        """
        config = self.config
        table = self.table
        waiting_since = self.accepted if first else time.monotonic()
        if not first and not self.events and table.count > 1:
            # Let the other connections run once before waiting: the client's
            # next request usually arrives meanwhile and is read without a
            # wait (no timer, no watcher, no trip through the hub).
            gevent.sleep(0)
        try:
            while not self.events:
                if self.upgraded or self.evicted:
                    return None
                started = self._head_started
                if started is None and not first:
                    table.park(self, idle=True)
                    deadline = None
                    timeout = config.keepalive_timeout
                else:
                    table.park(self, idle=False)
                    begun = waiting_since if started is None else max(started, waiting_since)
                    deadline = begun + config.header_timeout
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        self._head_timeout()
                        return None
                self.sock.settimeout(timeout)
                try:
                    if not self._fill():
                        return None
                except TimeoutError:
                    if deadline is None:
                        return None  # keep-alive idle: close quietly, as nginx does
                    self._head_timeout()
                    return None
        finally:
            table.unpark(self)
        event = self.events.popleft()
        if event[0] != HEAD:
            raise BadRequest("unexpected body data")
        head: tuple[Any, ...] = event
        return head

    def _head_timeout(self) -> None:
        """Raise the 408 when a head was begun; return (close quietly) when not."""
        if self._head_started is None:
            return
        raise BadRequest(
            f"request head not received within {self.config.header_timeout:g} s", status=408
        )

    # -- the request loop -----------------------------------------------------
    def run(self) -> None:
        sock = self.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            first = True
            while not self.closing:
                try:
                    head = self.next_head(first)
                except BadRequest as exc:
                    self.reject(exc)
                    return
                if head is None:
                    return
                first = False
                self.busy = True
                sock.settimeout(self.config.body_timeout)
                try:
                    keep = self.handle(head)
                finally:
                    self.busy = False
                if not keep:
                    return
        except ClientGone:
            return
        except BadRequest as exc:
            self.reject(exc)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def reject(self, exc: BadRequest) -> None:
        """Answer a short error and close with a lingering close (as nginx does).

        Closing with unread request bytes makes the kernel send a reset that can
        destroy the answer in flight; so the write side is shut first and what
        the client still sends is read and dropped for a short while.
        """
        body = (exc.reason + "\n").encode("latin-1", "replace")
        head = (
            f"HTTP/1.1 {exc.status_line}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        sock = self.sock
        try:
            sock.settimeout(LINGER_SECONDS)
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline and sock.recv(RECV_SIZE):
                pass
        except OSError:
            pass

    def handle(self, head: tuple[Any, ...]) -> bool:
        """Serve one request; True when the connection may carry another."""
        _, url, raw_headers, method_b, version, keep_alive, upgrade = head
        self.body_done = False
        method = method_b.decode("ascii")
        if version not in ("1.1", "1.0"):
            raise BadRequest("HTTP version not supported", status=505)
        if method == "CONNECT":
            raise BadRequest("CONNECT is not supported", status=405)
        if self.pending_error is not None and not any(e[0] == END for e in self.events):
            raise self.pending_error  # this request's own body is malformed
        environ = self.build_environ(url, raw_headers, method, version)
        if upgrade and self.upgraded:
            environ["wsgi.input"] = RawInput(self, False)
            environ["wsgi.input_terminated"] = False
        else:
            expect = version == "1.1" and environ.get("HTTP_EXPECT", "").lower() == "100-continue"
            environ["wsgi.input"] = Input(self, expect)
        writer = ResponseWriter(
            self, self.config, environ, version, keep_alive and not self.closing
        )
        return writer.run(self.config.app, environ)

    def build_environ(
        self, url: bytes, raw_headers: list[tuple[bytes, bytes]], method: str, version: str
    ) -> dict[str, Any]:
        environ = self.base_environ.copy()
        environ["REQUEST_METHOD"] = method
        environ["SERVER_PROTOCOL"] = "HTTP/" + version
        raw_uri = url.decode("latin-1")
        environ["RAW_URI"] = environ["REQUEST_URI"] = raw_uri
        target = raw_uri
        host_from_uri = None
        if raw_uri[:1] != "/" and not (raw_uri == "*" and method == "OPTIONS"):
            split = split_absolute_form(raw_uri)
            if split is None or split[0].lower() not in ("http", "https"):
                raise BadRequest("invalid request-target")
            _, host_from_uri, target = split
        path, _, query = target.partition("?")
        if "%" in path:
            path = unquote_to_bytes(path.encode("latin-1")).decode("latin-1")
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        config = self.config
        keys_of = config.header_keys
        hosts = 0
        te_seen = False
        for name, value in raw_headers:
            key = keys_of.get(name)
            if key is None:
                key = config.header_key(name)
            if not key:
                continue  # names with "_" are dropped (nginx's underscores_in_headers off)
            text = value.decode("latin-1")
            if key == "HTTP_HOST":
                hosts += 1
            elif key == "HTTP_TRANSFER_ENCODING":
                te_seen = True
            old = environ.get(key)
            if old is None:
                environ[key] = text
            elif key == "HTTP_COOKIE":
                environ[key] = old + "; " + text
            else:
                environ[key] = old + ", " + text
        if hosts > 1:
            raise BadRequest("more than one Host header")
        if version == "1.1" and hosts == 0:
            raise BadRequest("missing Host header")
        if host_from_uri is not None:
            environ["HTTP_HOST"] = host_from_uri
        if te_seen:
            if version == "1.0":
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            if environ["HTTP_TRANSFER_ENCODING"].lower() != "chunked":
                raise BadRequest("unsupported Transfer-Encoding", status=501)
            environ["wsgi.input_terminated"] = True
        return environ
