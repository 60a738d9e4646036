"""The embedded server: a strict HTTP/1.1 front door on gevent sockets.

Requests are parsed by llhttp (``httptools``), which rejects ambiguous or
malformed framing (Content-Length with Transfer-Encoding, duplicate or signed
Content-Length, obfuscated Transfer-Encoding, bare CR, whitespace before a
colon, control characters, folded lines).  On top of llhttp the server checks
what RFC 9112 requires of a server and llhttp leaves to it: one Host on
HTTP/1.1, Transfer-Encoding exactly ``chunked`` and never on HTTP/1.0, a size
cap on the head.  A rejected request gets a short 400 and the connection is
closed; nothing after it is read as a request.

Each connection runs in one greenlet (:mod:`oxypy._server.connection`), under
three timers: a deadline for a whole request head (408), an idle bound
between keep-alive requests (quiet close) and an idle bound on body reads
(the app sees :class:`~oxypy.exceptions.ClientGone`).  At most
``max_connections`` connections are open at once; at the cap a connection
that waits for a request makes room for a new one
(:mod:`oxypy._server.listener`).

Upgrade requests (WebSocket) get ``wsgi.input`` reading the raw socket; an
application that answers ``101`` may then yield raw bytes, which are written
unframed, as under ``gevent.pywsgi``.  After its ``101``, such an application
may instead call ``wsgi.input.take_socket()``, which returns the client socket
and the bytes already read past the request head, and do its own I/O on it
until its response iterable ends (Forward's tunnel does); the server closes
the socket then.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import time
import warnings
from typing import Any

import gevent
from gevent.event import Event

from ._core.checks import UNPATCHED
from ._core.net import parse_listen
from ._core.types import WSGIApplication
from ._server.config import ServerConfig
from ._server.connection import Connection
from ._server.listener import ConnectionTable, Listener, default_max_connections
from ._server.tls import accept_tls
from .exceptions import ClientGone, ConfigurationError

__all__ = ["Server", "serve"]

log = logging.getLogger(__name__)

#: How long connections killed at the graceful timeout get to run their cleanup.
_KILL_GRACE = 1.0


class Server:
    """A gevent WSGI server with a strict parser, keep-alive, timers, a connection
    cap and graceful stop.

    Timers and the cap (what a client sees):

    * a request head not complete ``header_timeout`` seconds after its first
      byte (after accept for a connection's first request) gets ``408`` and a
      close; a connection that sent nothing is closed without an answer;
    * a keep-alive connection silent ``keepalive_timeout`` seconds between two
      requests is closed without an answer;
    * while the app reads the body, ``body_timeout`` seconds without a byte
      make ``wsgi.input`` raise :class:`~oxypy.exceptions.ClientGone` (a
      :class:`~oxypy.exceptions.ClientDisconnected`, traced as 499) and close
      the connection; a response write that makes no progress for as long is
      cut the same way;
    * at ``max_connections`` open connections the server stops accepting; a
      connection waiting in the backlog makes the oldest connection waiting
      for a request close (idle keep-alive first, then the slowest head) and
      takes its place; when every connection is in a request, new ones wait
      in the backlog until one finishes.  When ``accept()`` fails for lack of
      descriptors (``EMFILE``), the server pauses accepting for 0.1-0.5 s and
      logs one line when the episode starts and one when it ends.

    :param app: the WSGI application (any oxypy chain, Flask, Django, ...).
    :param listen: ``"host:port"``; port 0 picks a free port (see :attr:`address`).
    :param ssl_context: an :class:`ssl.SSLContext` to serve HTTPS.  Plain HTTP
        sent to the TLS port gets ``400`` (``plain HTTP request sent to HTTPS
        port``) and a close; a failed handshake is one ``INFO`` line on
        ``oxypy.server`` (peer and reason), never a traceback.
    :param handshake_timeout: seconds a TLS client has, from accept, to finish
        its handshake; then the connection is closed (default 10).
    :param backlog: the listen backlog.
    :param header_timeout: seconds a request head may take, from its first
        byte to its end (nginx ``client_header_timeout``; default 30).
    :param keepalive_timeout: seconds an idle keep-alive connection is kept
        (nginx ``keepalive_timeout``; default 60).
    :param body_timeout: seconds a read of the request body (or a write of the
        response) may wait without progress (nginx ``client_body_timeout``;
        default 60).
    :param max_connections: open connections at most; None derives it from
        ``RLIMIT_NOFILE``: half of the soft limit less 100 descriptors, at
        most 10000 (462 under ``ulimit -n 1024``).
    :param max_head_bytes: cap on request line + headers (431/414 beyond).
    :param max_drain_bytes: request body bytes the server reads and drops after
        a response to keep the connection; beyond it, it closes.
    :param graceful_timeout: seconds :meth:`stop` lets in-flight requests
        finish; then their greenlets get :class:`~oxypy.exceptions.ClientGone`,
        so every response iterable is still closed (Trace writes its line).
    :param read_timeout: deprecated name of ``body_timeout``.

    Example::

        server = Server(app, "127.0.0.1:0").start()
        print(server.address)
        server.stop()

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``header_timeout`` is a deadline for the whole head (was per read),
       ``body_timeout`` replaces ``read_timeout``, ``max_connections``; ``app``
       and ``listen`` are positional-only, every option keyword-only.
    """

    def __init__(
        self,
        app: WSGIApplication,
        listen: str = "127.0.0.1:8080",
        /,
        *,
        ssl_context: Any = None,
        backlog: int = 1024,
        header_timeout: float = 30.0,
        keepalive_timeout: float = 60.0,
        body_timeout: float = 60.0,
        max_connections: int | None = None,
        max_head_bytes: int = 64 * 1024,
        max_drain_bytes: int = 1024 * 1024,
        graceful_timeout: float = 30.0,
        handshake_timeout: float = 10.0,
        read_timeout: float | None = None,
    ) -> None:
        if read_timeout is not None:
            warnings.warn(
                "Server(read_timeout=) is deprecated; use body_timeout=",
                DeprecationWarning,
                stacklevel=2,
            )
            body_timeout = read_timeout
        for name, value in (
            ("header_timeout", header_timeout),
            ("keepalive_timeout", keepalive_timeout),
            ("body_timeout", body_timeout),
            ("handshake_timeout", handshake_timeout),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"{name} must be a finite number above 0, got {value!r}")
        if not (graceful_timeout >= 0 and math.isfinite(graceful_timeout)):
            raise ConfigurationError(
                f"graceful_timeout must be a finite number >= 0, got {graceful_timeout!r}"
            )
        if max_connections is None:
            max_connections = default_max_connections()
        elif max_connections < 1:
            raise ConfigurationError(f"max_connections must be at least 1, got {max_connections!r}")
        self.app = app
        self.host, self.port = parse_listen(listen)
        self.ssl_context = ssl_context
        self.backlog = backlog
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.max_head_bytes = max_head_bytes
        self.max_drain_bytes = max_drain_bytes
        self.graceful_timeout = graceful_timeout
        self.handshake_timeout = handshake_timeout
        self.connections: set[Connection] = set()
        self._table = ConnectionTable(max_connections)
        self._config: ServerConfig | None = None
        self._server: Listener | None = None
        self._stopped = Event()
        self._scheme = "https" if ssl_context is not None else "http"
        #: A listening socket to serve instead of binding ``listen`` (the
        #: gunicorn worker serves the sockets gunicorn's master bound).
        self._listen_socket: Any = None

    @property
    def read_timeout(self) -> float:
        """Deprecated name of :attr:`body_timeout`."""
        return self.body_timeout

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
        accepted = time.monotonic()
        config = self._config
        table = self._table  # the listener counted this connection at accept
        try:
            if config is None:
                return  # gevent closes the socket
            if self.ssl_context is not None:
                tls = accept_tls(sock, addr, self.ssl_context, self.handshake_timeout)
                if tls is None:
                    _close(sock)
                    return
                sock = tls
            conn = Connection(config, table, sock, addr, accepted)
            conn.greenlet = gevent.getcurrent()
            self.connections.add(conn)
            try:
                conn.run()
            finally:
                self.connections.discard(conn)
                table.unpark(conn)
        finally:
            table.release()

    def start(self) -> Server:
        """Bind and start accepting in the background; returns self.

        :raises ConfigurationError: the process was not monkey-patched by
            gevent (``socket`` is the standard library's), so the app's
            blocking calls (``Forward``'s upstream sockets) would stall every
            other connection.
        """
        _require_patched()
        if self._listen_socket is not None:  # bound and listening already
            self._server = Listener(self._listen_socket, self._handle, self._table, None)
        else:
            self._server = Listener((self.host, self.port), self._handle, self._table, self.backlog)
        self._server.start()
        bound = self._server.address
        if isinstance(bound, tuple):  # a Unix socket's address is its path
            self.port = bound[1]
        self._config = ServerConfig(
            app=self.app,
            host=self.host,
            port=self.port,
            scheme=self._scheme,
            header_timeout=self.header_timeout,
            keepalive_timeout=self.keepalive_timeout,
            body_timeout=self.body_timeout,
            max_head_bytes=self.max_head_bytes,
            max_drain_bytes=self.max_drain_bytes,
        )
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close.

        Connections still in a request at the deadline get
        :class:`~oxypy.exceptions.ClientGone` raised in their greenlet, so the
        app's response iterable is closed (Trace, Metrics, ConnLimit settle)
        before the server returns.
        """
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
        left = list(self.connections)
        for conn in left:
            _shutdown(conn.sock)
        greenlets = [c.greenlet for c in left if c.busy and c.greenlet is not None]
        for greenlet in greenlets:
            gevent.kill(greenlet, ClientGone)
        gevent.joinall(greenlets, timeout=_KILL_GRACE)
        server.stop(timeout=0)
        self._stopped.set()

    def serve_forever(self, *, signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`), then stop gracefully."""
        if self._server is None:
            self.start()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                gevent.signal_handler(sig, lambda: gevent.spawn(self.stop))
        log.info("listening on %s", self.url)
        self._stopped.wait()


def _require_patched() -> None:
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        raise ConfigurationError(f"oxypy's server refuses to start: {UNPATCHED}")


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def serve(app: WSGIApplication, listen: str = "127.0.0.1:8080", /, **options: Any) -> None:
    """Serve ``app`` on ``listen`` until SIGTERM/SIGINT; see :class:`Server` for the
    keyword-only options (timers, ``max_connections``, ``ssl_context``, ...).

    Call ``gevent.monkey.patch_all()`` first, before any other import, so the
    whole process cooperates with gevent; without it :class:`~oxypy.exceptions.ConfigurationError`
    is raised at once (it would hang under concurrency).
    """
    Server(app, listen, **options).serve_forever()
