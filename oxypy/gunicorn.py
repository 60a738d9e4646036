"""A gunicorn worker that serves with oxypy's strict server.

Run any WSGI application (an oxypy chain, Flask, Django) with::

    gunicorn -k oxypy.gunicorn.Worker -w 4 app:app

gunicorn keeps what it is good at: the master process, worker supervision,
``--reload``, ``--max-requests`` (with ``--max-requests-jitter``), signals,
config files, ``--timeout`` heartbeats, graceful restarts (``HUP``, ``USR2``)
and graceful shutdown within ``--graceful-timeout``.  Each worker patches the
process with ``gevent.monkey.patch_all()`` before the application is loaded
(as gunicorn's ``-k gevent`` does), then runs one
:class:`oxypy.server.Server` loop on each socket gunicorn bound, with the
same connection handling as :func:`oxypy.serve`: llhttp parsing and its
``400`` answers, ``TCP_NODELAY``, keep-alive, pipelining, the timers, and the
raw upgrade path that lets :class:`~oxypy.Forward` tunnel WebSocket.

gunicorn settings the worker uses:

* ``--certfile`` / ``--keyfile`` (and ``--ca-certs``, ``--cert-reqs``,
  ``--ciphers``, ``--ssl-context``): HTTPS, with gunicorn's own SSLContext;
* ``--worker-connections``: ``max_connections`` of each listening socket;
* ``--keep-alive``: ``keepalive_timeout`` (0 closes a connection as soon as
  it is idle);
* ``--graceful-timeout``: how long in-flight requests may finish when the
  worker stops; then their greenlets get
  :class:`~oxypy.exceptions.ClientGone` (every response iterable is closed);
* ``--max-requests``: the worker stops accepting after that many requests
  (plus its jitter), finishes what it serves and exits; the master starts a
  new one;
* ``--access-logfile`` and ``--access-logformat``: one line per request
  through gunicorn's access logger (status, bytes sent, time, request and
  response headers); nothing is measured when the access log is off.

Not applied: ``--limit-request-line``, ``--limit-request-fields`` and
``--limit-request-field_size`` (oxypy caps the whole head at 64 KiB instead:
``431``, or ``414`` for the request line), ``--keyfile`` passwords typed on a
terminal, HTTP/2 and gunicorn's ``--proxy-protocol``.

Importing :mod:`oxypy` never imports gunicorn; this module needs it
(``pip install oxypy[gunicorn]``).

.. versionadded:: 0.3
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import gevent
from gevent import monkey
from gevent.event import Event
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

from ._core.types import StartResponse, WSGIApplication, WSGIEnvironment
from .server import Server

__all__ = ["Worker"]

#: oxypy's keepalive_timeout must be above 0; ``--keep-alive 0`` maps to this.
_NO_KEEPALIVE = 0.001
#: Seconds between two heartbeats (gunicorn's gevent worker beats every second).
_BEAT = 1.0


class Worker(GeventWorker):  # type: ignore[misc]
    """gunicorn worker class: ``gunicorn -k oxypy.gunicorn.Worker app:app``.

    A :class:`gunicorn.workers.ggevent.GeventWorker` (same monkey-patching,
    signal handling and parent checks) whose connections are served by
    :class:`oxypy.server.Server`, one per listening socket.  See the module
    docstring for the gunicorn settings it maps.
    """

    _servers: list[_SocketServer]
    _wake: Event

    def patch(self) -> None:
        """Monkey-patch the process (as ``-k gevent`` does), then repoint what
        urllib3 took from :mod:`ssl` before the patch.

        gunicorn's master imports this module, hence oxypy and urllib3, before
        the worker patches; ``urllib3.util.ssl_`` holds the unpatched
        ``SSLContext`` and would make TLS to upstreams block the whole worker.
        """
        super().patch()
        _repoint_ssl()

    def run(self) -> None:
        """Serve until gunicorn stops the worker, beating the heartbeat every
        second; then stop every server within ``--graceful-timeout``."""
        self._wake = Event()
        app = self._wrap(self.wsgi)
        context = ssl_context(self.cfg) if self.cfg.is_ssl else None
        keepalive = self.cfg.keepalive if self.cfg.keepalive > 0 else _NO_KEEPALIVE
        servers = self._servers = []
        for sock in self.sockets:
            server = _SocketServer(
                app,
                sock,
                ssl_context=context,
                keepalive_timeout=keepalive,
                max_connections=max(1, self.worker_connections),
                graceful_timeout=self.cfg.graceful_timeout,
            )
            server.start()
            if self.cfg.workers > 1:
                # One accept per wakeup, so the workers share the connections.
                server.listener.max_accept = 1
            servers.append(server)
        while self.alive:
            self.notify()
            self._wake.wait(_BEAT)
        self.log.info("Stopping oxypy server (pid:%s)", self.pid)
        self._stop_accepting()
        stops = [gevent.spawn(server.stop) for server in servers]
        while not all(g.dead for g in stops):
            self.notify()
            gevent.joinall(stops, timeout=_BEAT)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM (graceful stop): stop accepting now, not at the next beat."""
        super().handle_exit(sig, frame)
        wake = getattr(self, "_wake", None)
        if wake is not None:  # run() has started
            wake.set()

    def _stop_accepting(self) -> None:
        for server in getattr(self, "_servers", ()):
            server.listener.close()

    def _wrap(self, app: WSGIApplication) -> WSGIApplication:
        """``app`` counting requests for ``--max-requests`` and writing the access log."""
        counted = self.max_requests < sys.maxsize  # gunicorn's "no limit"
        logged = _access_log_enabled(self.log, self.cfg)
        if not counted and not logged:
            return app
        worker = self

        def gunicorn_app(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
            if counted:
                worker.nr += 1
                if worker.nr >= worker.max_requests and worker.alive:
                    worker.log.info("Autorestarting worker after current request.")
                    worker.alive = False
                    # Accept nothing more: a connection taken now could be cut
                    # by the stop before it sends its request.
                    worker._stop_accepting()
                    worker._wake.set()
            if not logged:
                return app(environ, start_response)
            record = _AccessRecord(worker.log, environ)

            def recording_start_response(
                status: str, headers: list[tuple[str, str]], exc_info: Any = None
            ) -> Any:
                record.status = status
                record.headers = headers
                return start_response(status, headers, exc_info)

            try:
                body = app(environ, recording_start_response)
            except BaseException:
                record.write()
                raise
            if isinstance(body, (list, tuple)):
                # Kept a list, so the server still sizes a one-piece answer.
                record.sent = sum(len(piece) for piece in body)
                return _LoggedList(body, record)
            return _LoggedBody(body, record)

        return gunicorn_app


def _access_log_enabled(log: Any, cfg: Any) -> bool:
    """Whether gunicorn writes access lines (its own test; older versions lack it)."""
    enabled = getattr(log, "access_log_enabled", None)
    if enabled is not None:
        return bool(enabled)
    return bool(
        cfg.accesslog
        or cfg.logconfig
        or getattr(cfg, "logconfig_dict", None)
        or getattr(cfg, "logconfig_json", None)
        or (cfg.syslog and not cfg.disable_redirect_access_to_syslog)
    )


def _repoint_ssl() -> None:
    """Replace the unpatched :mod:`ssl` objects urllib3 and oxypy imported by name."""
    saved = monkey.saved.get("ssl", {})
    import ssl

    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("urllib3", "oxypy")):
            continue
        for attr, original in saved.items():
            if getattr(module, attr, None) is original:
                setattr(module, attr, getattr(ssl, attr))


class _SocketServer(Server):
    """:class:`Server` on a socket gunicorn's master bound (TCP or Unix)."""

    def __init__(self, app: WSGIApplication, sock: Any, **options: Any) -> None:
        super().__init__(app, "127.0.0.1:0", **options)
        self._listen_socket = sock
        sock.setblocking(False)
        name = sock.getsockname()
        if isinstance(name, tuple):
            self.host, self.port = name[0], name[1]
        else:  # a Unix socket: SERVER_NAME is its path, as under gunicorn
            self.host, self.port = str(name), 0

    @property
    def listener(self) -> Any:
        """The running gevent ``StreamServer``."""
        return self._server

    def _handle(self, sock: Any, addr: Any) -> None:
        if not isinstance(addr, tuple):  # a Unix socket's peer has no address
            addr = ("", 0)
        super()._handle(sock, addr)


class _AccessRecord:
    """What gunicorn's access logger reads of one request and its response."""

    __slots__ = ("log", "environ", "started", "status", "headers", "sent", "done")

    def __init__(self, log: Any, environ: WSGIEnvironment) -> None:
        self.log = log
        self.environ = environ
        self.started = time.monotonic()
        self.status = "500 Internal Server Error"
        self.headers: list[tuple[str, str]] = []
        self.sent = 0
        self.done = False

    def write(self) -> None:
        if self.done:
            return
        self.done = True
        environ = self.environ
        elapsed = datetime.timedelta(seconds=time.monotonic() - self.started)
        request_headers = [
            (key[5:].replace("_", "-"), value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        ]
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                request_headers.append((key.replace("_", "-"), environ[key]))
        self.log.access(self, request_headers, environ, elapsed)

    def close(self, body: Iterable[bytes]) -> None:
        """Close the app's response ``body`` (PEP 3333), then write the line."""
        try:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        finally:
            self.write()


class _LoggedList(list[bytes]):
    """A list response (sized by the server); closing it writes the access line."""

    def __init__(self, body: Iterable[bytes], record: _AccessRecord) -> None:
        super().__init__(body)
        self.body = body
        self.record = record

    def close(self) -> None:
        self.record.close(self.body)


class _LoggedBody:
    """The response iterable, counting bytes; closing it writes the access line."""

    __slots__ = ("body", "record")

    def __init__(self, body: Iterable[bytes], record: _AccessRecord) -> None:
        self.body = body
        self.record = record

    def __iter__(self) -> Iterator[bytes]:
        record = self.record
        for piece in self.body:
            record.sent += len(piece)
            yield piece

    def close(self) -> None:
        self.record.close(self.body)
