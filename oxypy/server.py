"""The embedded server: a strict HTTP/1.1 front door on gevent sockets.

Requests are parsed by llhttp (``httptools``), which rejects ambiguous or
malformed framing (Content-Length with Transfer-Encoding, duplicate or signed
Content-Length, obfuscated Transfer-Encoding, bare CR, whitespace before a
colon, control characters, folded lines).  On top of llhttp the server checks
what RFC 9112 requires of a server and llhttp leaves to it: one Host on
HTTP/1.1, Transfer-Encoding exactly ``chunked`` and never on HTTP/1.0, a size
cap on the head.  A rejected request gets a short 400 and the connection is
closed; nothing after it is read as a request.

Theory of operation: each connection runs in one greenlet.  The parser is fed
one ``recv`` at a time, and its callbacks queue events (head, body piece,
end); the request loop pulls events as the application reads ``wsgi.input``,
so an upload streams with at most one ``recv`` (64 KiB) buffered.  Responses
go out with the head and the first body piece in one ``send`` and
``TCP_NODELAY`` set, so keep-alive clients never wait on a delayed ACK.

Upgrade requests (WebSocket) get ``wsgi.input`` reading the raw socket; an
application that answers ``101`` may then yield raw bytes, which are written
unframed, as under ``gevent.pywsgi``.
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

import gevent
import httptools
from gevent.event import Event
from gevent.server import StreamServer

from ._io import send_all
from ._types import WSGIApplication
from .exceptions import ConfigurationError

__all__ = ["Server", "serve"]

log = logging.getLogger(__name__)

RECV_SIZE = 65536
#: How long a rejected connection is drained before it is closed.
LINGER_SECONDS = 1.0
_HEAD, _BODY, _END = 0, 1, 2
_NO_BODY_STATUS = frozenset({204, 304})
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
    }
)


class _BadRequest(Exception):
    def __init__(self, reason: str, status: str = "400 Bad Request") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _ClientGone(Exception):
    pass


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[::1]:port"`` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"listen address must be host:port, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Input:
    """``wsgi.input``: the request body, pulled from the connection on demand."""

    __slots__ = ("_conn", "_buf", "_eof", "_expect")

    def __init__(self, conn: _Connection, expect_continue: bool) -> None:
        self._conn = conn
        self._buf = b""
        self._eof = False
        self._expect = expect_continue

    def _more(self) -> bytes:
        if self._eof:
            return b""
        if self._expect:
            self._expect = False
            self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        data = self._conn.body_piece()
        if not data:
            self._eof = True
        return data

    def read1(self, size: int = -1) -> bytes:
        if self._buf:
            data = self._buf
            if 0 <= size < len(data):
                self._buf = data[size:]
                return data[:size]
            self._buf = b""
            return data
        data = self._more()
        if 0 <= size < len(data):
            self._buf = data[size:]
            return data[:size]
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buf]
            self._buf = b""
            while True:
                data = self._more()
                if not data:
                    return b"".join(parts)
                parts.append(data)
        parts = []
        have = 0
        while have < size:
            data = self.read1(size - have)
            if not data:
                break
            parts.append(data)
            have += len(data)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        parts = []
        have = 0
        limit = -1 if size is None else size
        while limit < 0 or have < limit:
            data = self.read1(RECV_SIZE if limit < 0 else limit - have)
            if not data:
                break
            nl = data.find(b"\n")
            if nl >= 0:
                self._buf = data[nl + 1 :] + self._buf
                parts.append(data[: nl + 1])
                break
            parts.append(data)
            have += len(data)
        return b"".join(parts)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> _Input:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class _RawInput(_Input):
    """``wsgi.input`` of an Upgrade request: the raw socket after the head."""

    __slots__ = ()

    def _more(self) -> bytes:
        if self._eof:
            return b""
        data = self._conn.raw_piece()
        if not data:
            self._eof = True
        return data


class _Connection:
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
        self.pending_error: _BadRequest | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_trailers = False
        host, port = addr[0], addr[1]
        self.base_environ = server.base_environ(host, port)
        self.base_environ["oxypy.client_gone"] = self.client_gone
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
            raise _BadRequest("request-target too long", "414 URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.server.max_head_bytes:
            raise _BadRequest(
                "request header fields too large", "431 Request Header Fields Too Large"
            )
        if not self._in_trailers:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self._in_trailers = True
        self.events.append(
            (
                _HEAD,
                self._url,
                self._headers,
                p.get_method(),
                p.get_http_version(),
                p.should_keep_alive(),
                p.should_upgrade(),
            )
        )

    def on_body(self, body: bytes) -> None:
        self.events.append((_BODY, body))

    def on_message_complete(self) -> None:
        self.events.append((_END,))

    # -- socket I/O -----------------------------------------------------------
    def client_gone(self) -> bool:
        """True when the client has closed its side (polled without blocking).

        Exposed as ``environ["oxypy.client_gone"]`` so a block that waits
        between attempts (Buffer's retries) stops when nobody is left to answer.
        """
        if self.upgraded:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            peeked: bytes = self.sock.recv(1, socket.MSG_PEEK)
            return peeked == b""
        except (OSError, ValueError):
            return True

    def send(self, data: bytes) -> None:
        try:
            send_all(self.sock, data)
        except OSError as exc:
            raise _ClientGone() from exc

    def _recv(self) -> bytes:
        try:
            data: bytes = self.sock.recv(RECV_SIZE)
        except TimeoutError as exc:
            raise _ClientGone("timeout") from exc
        except OSError as exc:
            raise _ClientGone() from exc
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
                if isinstance(cause, _BadRequest)
                else _BadRequest(str(exc) or "malformed request")
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
                if event[0] == _BODY:
                    self.events.popleft()
                    data: bytes = event[1]
                    return data
                if event[0] == _END:
                    self.events.popleft()
                self.body_done = True
                return b""
            if self.upgraded:
                self.body_done = True
                return b""
            if not self._fill():
                raise _ClientGone("client closed mid-body")

    def finish_body(self) -> bool:
        """Consume what the app left of the body; False if the connection must close."""
        if self.upgraded:
            return False
        seen = 0
        while not self.body_done:
            try:
                data = self.body_piece()
            except _ClientGone:
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
        if event[0] != _HEAD:
            raise _BadRequest("unexpected body data")
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
                except _BadRequest as exc:
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
        except _ClientGone:
            return
        except _BadRequest as exc:
            self.reject(exc)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def reject(self, exc: _BadRequest) -> None:
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
            raise _BadRequest("HTTP version not supported", "505 HTTP Version Not Supported")
        if method == "CONNECT":
            raise _BadRequest("CONNECT is not supported", "405 Method Not Allowed")
        if self.pending_error is not None and not any(e[0] == _END for e in self.events):
            raise self.pending_error  # this request's own body is malformed
        environ = self.build_environ(url, raw_headers, method, version)
        if upgrade and self.upgraded:
            environ["wsgi.input"] = _RawInput(self, False)
            environ["wsgi.input_terminated"] = False
        else:
            expect = version == "1.1" and environ.get("HTTP_EXPECT", "").lower() == "100-continue"
            environ["wsgi.input"] = _Input(self, expect)
        writer = _ResponseWriter(self, environ, version, keep_alive and not self.closing)
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
                    raise _BadRequest("invalid request-target")
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
            raise _BadRequest("more than one Host header")
        if version == "1.1" and hosts == 0:
            raise _BadRequest("missing Host header")
        if host_from_uri is not None:
            environ["HTTP_HOST"] = host_from_uri
        if te_seen:
            if version == "1.0":
                raise _BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            if environ["HTTP_TRANSFER_ENCODING"].lower() != "chunked":
                raise _BadRequest("unsupported Transfer-Encoding", "501 Not Implemented")
            environ["wsgi.input_terminated"] = True
        return environ


class _ResponseWriter:
    """Runs the app for one request and frames what it returns."""

    __slots__ = (
        "conn",
        "environ",
        "version",
        "keep_alive",
        "status",
        "headers",
        "head_sent",
        "length",
        "chunked",
        "no_body",
        "sent",
        "upgraded",
    )

    def __init__(
        self, conn: _Connection, environ: dict[str, Any], version: str, keep_alive: bool
    ) -> None:
        self.conn = conn
        self.environ = environ
        self.version = version
        self.keep_alive = keep_alive
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.length: int | None = None
        self.chunked = False
        self.no_body = False
        self.sent = 0
        self.upgraded = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        if exc_info:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        if len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
            raise ValueError(f"invalid WSGI status {status!r}")
        self.status = status
        self.headers = headers
        return self.write

    def _head(self, first: bytes, total: int | None) -> bytes:
        status = self.status
        assert status is not None
        code = int(status[:3])
        method = self.environ["REQUEST_METHOD"]
        out = [f"HTTP/1.1 {status}\r\n"]
        has_date = False
        length = None
        close = False
        for name, value in self.headers:
            lname = name.lower()
            if lname in _HOP:
                if lname == "connection" and "close" in value.lower():
                    close = True
                if code == 101 and lname in ("upgrade", "connection"):
                    out.append(f"{name}: {value}\r\n")
                continue
            if lname == "content-length":
                if length is not None or not value.strip().isdigit():
                    continue  # an app's broken or duplicate length is not relayed
                length = int(value.strip())
            elif lname == "date":
                has_date = True
            out.append(f"{name}: {value}\r\n")
        if not has_date:
            out.append(f"Date: {self.conn.server.http_date()}\r\n")
        if code == 101:
            self.upgraded = True
            self.keep_alive = False
        elif code < 200 or code in _NO_BODY_STATUS:
            self.no_body = True
            length = None
        else:
            if method == "HEAD":
                self.no_body = True
            if length is None and total is not None and not self.no_body:
                length = total
                out.append(f"Content-Length: {total}\r\n")
            if length is None and not self.no_body:
                if self.version == "1.1":
                    self.chunked = True
                    out.append("Transfer-Encoding: chunked\r\n")
                else:
                    self.keep_alive = False
        self.length = length
        if close or self.conn.closing:
            self.keep_alive = False
        if not self.upgraded:
            if not self.keep_alive:
                out.append("Connection: close\r\n")
            elif self.version == "1.0":
                out.append("Connection: keep-alive\r\n")
        out.append("\r\n")
        return "".join(out).encode("latin-1")

    def write(self, data: bytes, total: int | None = None) -> None:
        if self.status is None:
            raise AssertionError("write() before start_response()")
        head = b""
        if not self.head_sent:
            head = self._head(data, total)
            self.head_sent = True
        if self.no_body or not data:
            if head:
                self.conn.send(head)
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        elif self.length is not None and not self.upgraded:
            room = self.length - self.sent
            if len(data) > room:
                log.warning("app sent more than its Content-Length; truncated")
                data = data[:room]
                self.keep_alive = False
        self.sent += len(data)
        self.conn.send(head + data if head else data)

    def run(self, app: WSGIApplication) -> bool:
        environ = self.environ
        result: Iterable[bytes] | None = None
        try:
            try:
                result = app(environ, self.start_response)
                total = None
                if isinstance(result, (list, tuple)) and len(result) == 1:
                    total = len(result[0])
                for data in result:
                    if data:
                        self.write(data, total)
                    elif self.upgraded and self.head_sent:
                        continue
                if not self.head_sent:
                    self.write(b"", 0 if total is None else total)
                if self.chunked:
                    self.conn.send(b"0\r\n\r\n")
                elif self.length is not None and self.sent < self.length and not self.no_body:
                    log.warning("app sent less than its Content-Length; closing the connection")
                    return False
            finally:
                if result is not None:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
        except _ClientGone:
            return False
        except _BadRequest as exc:
            # The body turned out malformed while the app was reading it.
            if not self.head_sent:
                self.conn.reject(exc)
            return False
        except Exception:
            if self.head_sent:
                log.warning(
                    "error after the response started; aborting the connection", exc_info=True
                )
                return False
            log.exception("application error")
            self.status = None
            self.headers = []
            body = b"Internal Server Error\n"
            self.start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "22")],
            )
            self.keep_alive = False
            self.write(body)
            return False
        if self.upgraded:
            return False
        if not self.conn.finish_body():
            return False
        return self.keep_alive


class Server:
    """A gevent WSGI server with a strict parser, keep-alive and graceful stop.

    :param app: the WSGI application (any oxypy chain, Flask, Django, ...).
    :param listen: ``"host:port"``; port 0 picks a free port (see :attr:`address`).
    :param ssl_context: an :class:`ssl.SSLContext` to serve HTTPS.
    :param header_timeout: seconds a client has to send a complete head.
    :param keepalive_timeout: seconds an idle keep-alive connection is kept.
    :param read_timeout: seconds per read of a request body.
    :param max_head_bytes: cap on request line + headers (431/414 beyond).
    :param graceful_timeout: seconds :meth:`stop` lets in-flight requests finish.

    Example::

        server = Server(app, "127.0.0.1:0").start()
        print(server.address)
        server.stop()

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: WSGIApplication,
        listen: str = "127.0.0.1:8080",
        *,
        ssl_context: Any = None,
        backlog: int = 1024,
        header_timeout: float = 30.0,
        keepalive_timeout: float = 60.0,
        read_timeout: float = 60.0,
        max_head_bytes: int = 64 * 1024,
        max_drain_bytes: int = 1024 * 1024,
        graceful_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.host, self.port = parse_listen(listen)
        self.ssl_context = ssl_context
        self.backlog = backlog
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.read_timeout = read_timeout
        self.max_head_bytes = max_head_bytes
        self.max_drain_bytes = max_drain_bytes
        self.graceful_timeout = graceful_timeout
        self.header_keys: dict[bytes, str] = {}
        self.connections: set[_Connection] = set()
        self._server: StreamServer | None = None
        self._stopped = Event()
        self._date = (0, "")
        self._scheme = "https" if ssl_context is not None else "http"

    # -- helpers used by connections --------------------------------------------
    def header_key(self, name: bytes) -> str:
        text = name.decode("latin-1")
        if "_" in text:
            key = ""
        else:
            key = text.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
        if len(self.header_keys) < 4096:
            self.header_keys[name] = key
        return key

    def http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def base_environ(self, host: str, port: int) -> dict[str, Any]:
        return {
            "SCRIPT_NAME": "",
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "REMOTE_ADDR": host,
            "REMOTE_PORT": str(port),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": self._scheme,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": False,
            "oxypy.server": "oxypy",
        }

    # -- lifecycle ----------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._server is None:
            return self.host, self.port
        addr = self._server.address
        return addr[0], addr[1]

    @property
    def url(self) -> str:
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"{self._scheme}://{shown}:{port}"

    def _handle(self, sock: Any, addr: Any) -> None:
        conn = _Connection(self, sock, addr)
        self.connections.add(conn)
        try:
            conn.run()
        finally:
            self.connections.discard(conn)

    def start(self) -> Server:
        """Bind and start accepting in the background; returns self."""
        kwargs: dict[str, Any] = {"backlog": self.backlog}
        if self.ssl_context is not None:
            kwargs["ssl_context"] = self.ssl_context
        self._server = StreamServer((self.host, self.port), self._handle, **kwargs)
        self._server.start()
        self.port = self._server.address[1]
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close."""
        server = self._server
        if server is None:
            return
        deadline = time.monotonic() + (self.graceful_timeout if timeout is None else timeout)
        server.close()  # stop accepting
        for conn in list(self.connections):
            conn.closing = True
            if not conn.busy:
                _shutdown(conn.sock)
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        for conn in list(self.connections):
            _shutdown(conn.sock)
        server.stop(timeout=0.5)
        self._stopped.set()

    def serve_forever(self, *, signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`), then stop gracefully."""
        if self._server is None:
            self.start()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                gevent.signal_handler(sig, lambda: gevent.spawn(self.stop))
        log.info("oxypy serving on %s", self.url)
        self._stopped.wait()


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def serve(app: WSGIApplication, listen: str = "127.0.0.1:8080", **options: Any) -> None:
    """Serve ``app`` on ``listen`` until SIGTERM/SIGINT; see :class:`Server` for options.

    Call ``gevent.monkey.patch_all()`` first in a program that imports
    blocking libraries, so the whole process cooperates with gevent.
    """
    Server(app, listen, **options).serve_forever()
