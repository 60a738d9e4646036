"""Trace: one JSON line per request, written when the response is finished.

The line is built in the ``close()`` of the response iterable, so it carries
the bytes actually handed to the server, the real duration, what happened
upstream (from ``environ["oxypy.exchanges"]``) and why a request failed.
Lines go through a bounded queue to a writer (green) thread: a slow sink never
slows a request; when the queue is full a line is dropped and counted.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from . import environ as keys
from ._core.headers import header_to_environ
from ._core.net import TrustedProxies, normalize_ip
from ._core.observe import Observation, error_kind, observe
from ._core.telemetry import Telemetry
from ._core.tracewriter import TraceWriter
from ._core.types import Clock, Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError

__all__ = ["Trace", "TraceSink"]

log = logging.getLogger(__name__)

#: A sink: a file-like object (``write``), a :class:`logging.Logger`, or ``fn(line)``.
TraceSink = Any

_TLS_NAMES = {
    0x0300: "SSLv3",
    0x0301: "TLSv1.0",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}
_TLS_ALIASES = {
    "tlsv1": "TLSv1.0",
    "tls1.0": "TLSv1.0",
    "tlsv1.0": "TLSv1.0",
    "tls1.1": "TLSv1.1",
    "tlsv1.1": "TLSv1.1",
    "tls1.2": "TLSv1.2",
    "tlsv1.2": "TLSv1.2",
    "tls1.3": "TLSv1.3",
    "tlsv1.3": "TLSv1.3",
    "sslv3": "SSLv3",
}


def tls_version_name(value: Any) -> str | None:
    """Normalize a TLS version (``"TLSv1.3"``, ``"TLS1.3"``, ``0x0304``, ``"772"``)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        return _TLS_NAMES.get(number, f"unknown:{number:#06x}")
    text = str(value).strip()
    return _TLS_ALIASES.get(text.lower().replace(" ", ""), text)


def tls_info(environ: WSGIEnvironment) -> dict[str, str] | None:
    """TLS version and cipher, from whatever the server exposes.

    Apache mod_ssl / mod_wsgi and uWSGI style ``SSL_PROTOCOL`` and
    ``SSL_CIPHER`` keys first, then an :class:`ssl.SSLSocket` the server puts
    in the environ (``gunicorn.socket``; ``oxypy.serve`` sets ``SSL_PROTOCOL``).
    """
    version = environ.get("SSL_PROTOCOL")
    cipher = environ.get("SSL_CIPHER")
    if not version:
        sock = environ.get("gunicorn.socket")
        get_version = getattr(sock, "version", None)
        if get_version is not None:
            try:
                version = get_version()
                found = sock.cipher()  # type: ignore[union-attr]
                cipher = found[0] if found else cipher
            except (OSError, ValueError, AttributeError):
                version = None
    name = tls_version_name(version)
    if name is None:
        return None
    info = {"version": name}
    if cipher:
        info["cipher"] = str(cipher)
    return info


#: One compact encoder, built once (``json.dumps`` with options builds one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


#: The last second rendered by :func:`_timestamp`: (epoch second, its text).
_last_second: tuple[int, str] = (-1, "")


def _timestamp(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-21T07:09:56.123Z``.

    The date and time of day are rendered once per second (every request of
    that second reuses them); only the milliseconds are formatted per call.
    """
    global _last_second
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    cached_second, text = _last_second
    if cached_second != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{millis:03d}Z"


class _CountingInput:
    """``wsgi.input`` wrapper counting the request bytes the app reads."""

    __slots__ = ("stream", "count")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.count = 0

    def read(self, size: int | None = -1) -> bytes:
        data: bytes = self.stream.read() if size is None else self.stream.read(size)
        self.count += len(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        read1 = getattr(self.stream, "read1", None)
        data: bytes = read1(size) if read1 is not None else self.stream.read(size)
        self.count += len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        data: bytes = self.stream.readline() if size is None else self.stream.readline(size)
        self.count += len(data)
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _Request:
    """Per-request state: the record begun at the call, finished when the body closes."""

    __slots__ = ("trace", "record", "started", "input")

    def __init__(self, trace: Trace, record: dict[str, Any]) -> None:
        self.trace = trace
        self.record = record
        self.started = trace.clock()
        self.input: _CountingInput | None = None

    def finish(self, seen: Observation) -> None:
        try:
            self.trace.emit(self.build(seen))
        except Exception:  # noqa: BLE001 - tracing must never break a response
            log.warning("could not build the trace record", exc_info=True)

    def build(self, seen: Observation) -> dict[str, Any]:
        trace, environ, record = self.trace, seen.environ, self.record
        record["duration_ms"] = round((trace.clock() - self.started) * 1000.0, 3)
        if keys.REQUEST_ID in environ:
            record["request_id"] = environ[keys.REQUEST_ID]
        if self.input is not None:
            record["request_bytes"] = self.input.count
        record["response_bytes"] = seen.bytes_sent
        if trace.response_headers:
            record["response_headers"] = self.pick_headers(seen.headers)
        outcome = seen.outcome()
        record["status"] = outcome.status
        if outcome.status_sent is not None:
            record["status_sent"] = outcome.status_sent
        if outcome.error is not None:
            record["error"] = outcome.error_kind
            record.update(_detail(outcome.error))
        exchanges = outcome.exchanges
        if exchanges:
            record["upstream"] = [
                {
                    "target": ex.target,
                    "status": ex.status,
                    "duration_ms": round(((ex.ended or ex.started) - ex.started) * 1000.0, 3),
                    "bytes": ex.bytes_received,
                    **({"error": error_kind(ex.error)} if ex.error is not None else {}),
                    **_detail(ex.error),
                }
                for ex in exchanges
            ]
            record["target"] = exchanges[-1].target
        record["attempts"] = len(exchanges)
        if keys.ATTEMPT in environ:
            record["attempt"] = environ[keys.ATTEMPT]
        telemetry: Telemetry | None = environ.get(keys.OTEL)
        if telemetry is not None:
            ids = telemetry.ids()
            if ids is not None:
                record["trace_id"], record["span_id"] = ids
        return record

    def pick_headers(self, headers: list[tuple[str, str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        wanted = self.trace.response_headers
        for name, value in headers:
            lower = name.lower()
            if lower in wanted:
                out.setdefault(lower, []).append(value)
        return out


class Trace:
    """Write one JSON line per request when its response iterable closes.

    Fields: ``time`` (request start, RFC 3339 UTC), ``request_id`` (from
    ``RequestID``), ``client_ip``, ``method``, ``url`` (path and query as
    received: ``RAW_URI``/``REQUEST_URI`` when the server provides them),
    ``host``, ``proto``, ``request_headers``/``response_headers`` (only the
    configured names, lower-cased, values always lists: a request header
    appears as the server joined it), ``status``, ``request_bytes`` (counted
    as the app reads ``wsgi.input``), ``response_bytes`` (counted as the body
    passes, never taken from ``Content-Length``), ``duration_ms``,
    ``upstream`` (one entry per ``Forward`` exchange: target, status,
    duration, bytes, error kind), ``target`` (the last one), ``attempts``,
    ``attempt`` (when Trace runs below ``Buffer``), ``tls`` (``version``,
    ``cipher``), ``error`` (``upstream_timeout``, ``client_disconnected``...)
    and, when an :class:`~oxypy.OpenTelemetry` block (above or below) traces
    the request, ``trace_id`` and ``span_id`` (hex) of its SERVER span.
    Bodies are never logged.

    Status rules (the one decision CircuitBreaker and the Prometheus metrics
    share, :mod:`oxypy._core.observe`): a client that went away (mid-upload or
    mid-download, however it was noticed) is recorded as ``499`` with
    ``error: "client_disconnected"`` and ``status_sent`` holding what the head
    said, if anything; a body whose iterator raised after the first byte went
    out keeps the status sent plus ``error`` (the server cuts the connection)
    and the exception propagates; an app or body that raised before any byte
    went out is recorded as ``500``, which is what the server answers.

    TLS: ``SSL_PROTOCOL``/``SSL_CIPHER`` environ keys (mod_ssl, mod_wsgi,
    uWSGI), else ``version()``/``cipher()`` of an ``ssl.SSLSocket`` found in
    ``environ["gunicorn.socket"]`` (``oxypy.serve`` sets the keys); TLS 1.3 is
    reported as ``TLSv1.3``.  Absent when the server exposes nothing.

    Lines are queued (``queue_size``) and written by a writer thread (a
    greenlet under gevent), so a slow sink never blocks a request; when the
    queue is full the line is dropped and :attr:`dropped` counts it.
    :meth:`close` flushes the queue.

    :param sink: ``sys.stderr`` by default; a file-like (``write`` +
        ``flush``), a :class:`logging.Logger` (``info``), or ``fn(line)``.
    :param request_headers: request header names to record.
    :param response_headers: response header names to record.
    :param trusted_proxies: CIDRs whose ``X-Forwarded-For`` gives the client
        ip (default: the peer address).
    :param queue_size: lines waiting for the sink before new ones are dropped.
    :param clock: monotonic seconds, for ``duration_ms``.
    :param wall_clock: epoch seconds, for ``time``.
    :param skip: ``skip(environ) -> bool``; True: no line for this request.

    Example::

        import logging
        from oxypy import Forward, RequestID, Trace
        app = Trace(RequestID(Forward("http://127.0.0.1:9000")),
                    sink=logging.getLogger("access"), response_headers=["Content-Type"])

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        sink: TraceSink = None,
        request_headers: Iterable[str] = (),
        response_headers: Iterable[str] = (),
        trusted_proxies: Iterable[str] | None = None,
        queue_size: int = 1024,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        skip: Skip | None = None,
    ) -> None:
        if isinstance(request_headers, str) or isinstance(response_headers, str):
            raise ConfigurationError("request_headers/response_headers must be lists of names")
        if queue_size < 1:
            raise ConfigurationError("queue_size must be >= 1")
        self.next_app = next_app
        self.request_headers = tuple(
            (name.lower(), header_to_environ(name)) for name in _names(request_headers)
        )
        self.response_headers = frozenset(name.lower() for name in _names(response_headers))
        self.trusted = TrustedProxies(trusted_proxies) if trusted_proxies is not None else None
        self.clock = clock
        self.wall_clock = wall_clock
        self.skip = skip
        self._writer = TraceWriter(sys.stderr if sink is None else sink, queue_size)

    @property
    def dropped(self) -> int:
        """Lines dropped because the queue was full."""
        return self._writer.dropped

    @property
    def failed(self) -> int:
        """Lines the sink raised on (logged at WARNING on ``oxypy.trace``)."""
        return self._writer.failed

    def close(self, timeout: float = 5.0) -> None:
        """Write every queued line, then stop the writer (it restarts on demand)."""
        self._writer.close(timeout)

    def emit(self, record: dict[str, Any]) -> None:
        self._writer.put(_ENCODE(record))

    def client_ip(self, environ: WSGIEnvironment) -> str | None:
        peer = environ.get("REMOTE_ADDR")
        if self.trusted is not None:
            return self.trusted.client_ip(peer, environ.get("HTTP_X_FORWARDED_FOR"))
        return normalize_ip(peer) or peer

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        request = _Request(self, self.start_record(environ))
        if "HTTP_UPGRADE" not in environ and "wsgi.input" in environ:
            request.input = _CountingInput(environ["wsgi.input"])
            environ["wsgi.input"] = request.input
        return observe(self.next_app, environ, start_response, request.finish)

    def start_record(self, environ: WSGIEnvironment) -> dict[str, Any]:
        url = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if not url:
            from urllib.parse import quote

            path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
            url = quote(path.encode("latin-1"), safe="/:@!$&'()*+,;=-._~") or "/"
            if environ.get("QUERY_STRING"):
                url += "?" + environ["QUERY_STRING"]
        record: dict[str, Any] = {
            "time": _timestamp(self.wall_clock()),
            "client_ip": self.client_ip(environ),
            "method": environ.get("REQUEST_METHOD"),
            "url": url,
            "host": environ.get("HTTP_HOST") or environ.get("SERVER_NAME"),
            "proto": environ.get("SERVER_PROTOCOL"),
        }
        if self.request_headers:
            record["request_headers"] = {
                name: [environ[key]] for name, key in self.request_headers if key in environ
            }
        tls = tls_info(environ)
        if tls is not None:
            record["tls"] = tls
        return record


def _names(names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        if not isinstance(name, str) or not name or any(c in name for c in " \t\r\n:"):
            raise ConfigurationError(f"invalid header name {name!r}")
        out.append(name)
    return out


def _detail(error: BaseException | None) -> dict[str, str]:
    """``{"error_detail": ...}`` when ``error`` knows its short cause, else ``{}``."""
    detail = getattr(error, "detail", None)
    return {"error_detail": detail} if isinstance(detail, str) and detail else {}
