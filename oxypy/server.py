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
import signal
import socket
import sys
import time
from email.utils import formatdate
from typing import Any

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from . import environ as keys
from ._core.types import WSGIApplication
from ._server.connection import Connection
from .exceptions import ConfigurationError

__all__ = ["Server", "serve"]

log = logging.getLogger(__name__)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[::1]:port"`` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"listen address must be host:port, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


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
        self.connections: set[Connection] = set()
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
            keys.SERVER: "oxypy",
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
        conn = Connection(self, sock, addr)
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
