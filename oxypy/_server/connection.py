"""HTTP/1.1 connections of the embedded server: parse, run the app, frame the answer.

Theory of operation: each connection runs in one greenlet.  llhttp
(``httptools``) is fed one ``recv`` at a time and its callbacks queue events
(head, body piece, end); the request loop pulls events as the application
reads ``wsgi.input``, so an upload streams with at most one ``recv``
(64 KiB) buffered.  Responses go out with the head and the first body piece in
one ``send`` and ``TCP_NODELAY`` set, so keep-alive clients never wait on a
delayed ACK.  See :mod:`oxypy.server` for what is rejected and why.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import httptools

from .. import environ as keys
from .._core.sockets import peer_closed, send_all
from .common import BODY, END, HEAD, LINGER_SECONDS, RECV_SIZE, BadRequest, ClientGone
from .wsgi_io import Input, RawInput, ResponseWriter

if TYPE_CHECKING:
    from ..server import Server

__all__ = ["Connection"]

log = logging.getLogger("oxypy.server")


class Connection:
    """One client connection: parse requests, run the app, write responses."""

    def __init__(self, server: Server, sock: Any, addr: Any) -> None:
        self.server = server
        self.sock = sock
        self.events: deque[Any] = deque()
        self.parser = httptools.HttpRequestParser(self)
        self.leftover = b""
        self.upgraded = False
        self.busy = False
        self.closing = False
        self.body_done = False
        self.pending_error: BadRequest | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_trailers = False
        host, port = addr[0], addr[1]
        self.base_environ = server.base_environ(host, port)
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

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.server.max_head_bytes:
            raise BadRequest("request-target too long", "414 URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.server.max_head_bytes:
            raise BadRequest(
                "request header fields too large", "431 Request Header Fields Too Large"
            )
        if not self._in_trailers:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self._in_trailers = True
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

    def send(self, data: bytes) -> None:
        try:
            send_all(self.sock, data)
        except OSError as exc:
            raise ClientGone() from exc

    def _recv(self) -> bytes:
        try:
            data: bytes = self.sock.recv(RECV_SIZE)
        except TimeoutError as exc:
            raise ClientGone("timeout") from exc
        except OSError as exc:
            raise ClientGone() from exc
        return data

    def _fill(self) -> bool:
        """Feed one recv to the parser; False on EOF."""
        if self.pending_error is not None:
            raise self.pending_error
        if self.upgraded:
            return False
        data = self._recv()
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
            if not self.events:
                raise error from None
            # Requests queued before the fault are answered first; the fault
            # ends the connection as soon as the queue reaches it.
            self.pending_error = error
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
            if not self._fill():
                raise ClientGone("client closed mid-body")

    def finish_body(self) -> bool:
        """Consume what the app left of the body; False if the connection must close."""
        if self.upgraded:
            return False
        seen = 0
        while not self.body_done:
            try:
                data = self.body_piece()
            except ClientGone:
                return False
            seen += len(data)
            if seen > self.server.max_drain_bytes:
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

    def next_head(self) -> tuple[Any, ...] | None:
        while not self.events:
            if self.upgraded or not self._fill():
                return None
        event = self.events.popleft()
        if event[0] != HEAD:
            raise BadRequest("unexpected body data")
        head: tuple[Any, ...] = event
        return head

    # -- the request loop -----------------------------------------------------
    def run(self) -> None:
        server = self.server
        sock = self.sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            first = True
            while not self.closing:
                sock.settimeout(server.header_timeout if first else server.keepalive_timeout)
                try:
                    head = self.next_head()
                except BadRequest as exc:
                    self.reject(exc)
                    return
                if head is None:
                    return
                first = False
                self.busy = True
                sock.settimeout(server.read_timeout)
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
            f"HTTP/1.1 {exc.status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        sock = self.sock
        try:
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(LINGER_SECONDS)
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
            raise BadRequest("HTTP version not supported", "505 HTTP Version Not Supported")
        if method == "CONNECT":
            raise BadRequest("CONNECT is not supported", "405 Method Not Allowed")
        if self.pending_error is not None and not any(e[0] == END for e in self.events):
            raise self.pending_error  # this request's own body is malformed
        environ = self.build_environ(url, raw_headers, method, version)
        if upgrade and self.upgraded:
            environ["wsgi.input"] = RawInput(self, False)
            environ["wsgi.input_terminated"] = False
        else:
            expect = version == "1.1" and environ.get("HTTP_EXPECT", "").lower() == "100-continue"
            environ["wsgi.input"] = Input(self, expect)
        writer = ResponseWriter(self, environ, version, keep_alive and not self.closing)
        return writer.run(self.server.app)

    def build_environ(
        self, url: bytes, raw_headers: list[tuple[bytes, bytes]], method: str, version: str
    ) -> dict[str, Any]:
        environ = self.base_environ.copy()
        environ["REQUEST_METHOD"] = method
        environ["SERVER_PROTOCOL"] = "HTTP/" + version
        raw_uri = url.decode("latin-1")
        environ["RAW_URI"] = environ["REQUEST_URI"] = raw_uri
        target = url
        host_from_uri = None
        if url[:1] != b"/":
            if url == b"*" and method == "OPTIONS":
                target = b"*"
            else:
                lower = url[:8].lower()
                if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
                    raise BadRequest("invalid request-target")
                rest = url.split(b"://", 1)[1]
                slash = rest.find(b"/")
                qmark = rest.find(b"?")
                cut = min(i for i in (slash, qmark, len(rest)) if i >= 0)
                host_from_uri = rest[:cut].decode("latin-1")
                target = rest[cut:] or b"/"
                if target[:1] == b"?":
                    target = b"/" + target
        path, _, query = target.partition(b"?")
        environ["PATH_INFO"] = (
            unquote_to_bytes(path).decode("latin-1") if b"%" in path else path.decode("latin-1")
        )
        environ["QUERY_STRING"] = query.decode("latin-1")
        keys = self.server.header_keys
        hosts = 0
        te_seen = False
        for name, value in raw_headers:
            key = keys.get(name)
            if key is None:
                key = self.server.header_key(name)
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
                raise BadRequest("unsupported Transfer-Encoding", "501 Not Implemented")
            environ["wsgi.input_terminated"] = True
        return environ
