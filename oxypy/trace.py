"""Trace: one JSON line per request, written when the response is finished.

The record is taken in the ``close()`` of the response iterable, so it carries
the bytes actually handed to the server, the real duration, what happened
upstream (from ``environ["oxypy.exchanges"]``) and why a request failed.
Records (tuples of plain values) go through a bounded queue to a writer
(green) thread, which renders them into JSON lines a batch at a time: the
request path never encodes, a slow sink never slows a request, and when the
queue is full a record is dropped and counted.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from functools import partial
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
    return _tls_from(_tls_raw(environ))


def _tls_raw(environ: WSGIEnvironment) -> tuple[Any, Any] | None:
    """``(version, cipher)`` as the server exposes them (read on the request path).

    Only the rare ``gunicorn.socket`` case asks the socket; the names are
    normalized later, by :func:`_tls_from`, off the request path.
    """
    version = environ.get("SSL_PROTOCOL")
    if version:
        return version, environ.get("SSL_CIPHER")
    cipher = environ.get("SSL_CIPHER")
    sock = environ.get("gunicorn.socket")
    get_version = getattr(sock, "version", None)
    if get_version is not None:
        try:
            version = get_version()
            found = sock.cipher()  # type: ignore[union-attr]
            cipher = found[0] if found else cipher
        except (OSError, ValueError, AttributeError):
            version = None
    return (version, cipher) if version else None


def _tls_from(raw: tuple[Any, Any] | None) -> dict[str, str] | None:
    if raw is None:
        return None
    version, cipher = raw
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


#: A field the request did not have (the record leaves its key out).
_ABSENT: Any = object()

_escape = json.encoder.encode_basestring_ascii


def _value(value: Any) -> str:
    """``value`` in JSON exactly as :data:`_ENCODE` writes it (str, int, float and None inline)."""
    kind = value.__class__
    if kind is str:
        return _escape(value)
    if value is None:
        return "null"
    if kind is int or (kind is float and value - value == 0.0):  # finite floats only
        return repr(value)
    return _ENCODE(value)


#: The count of a request without a body (no Content-Length, or 0, and not
#: chunked): its ``wsgi.input`` is left unwrapped; never installed in an environ.
_NO_BODY = _CountingInput(None)
_NO_LENGTH = frozenset({None, "", "0"})


class _Request:
    """Per-request state: raw fields taken at the call and when the body closes.

    The request path only reads plain values (no reference to the environ,
    the exception or the exchanges: the record is a tuple of strings, numbers
    and tuples, which the garbage collector stops tracking); the writer renders
    it into the JSON line (:func:`_render`), a batch at a time.
    """

    __slots__ = ("trace", "start", "started", "input")

    def __init__(self, trace: Trace, environ: WSGIEnvironment) -> None:
        self.trace = trace
        url = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if not url:
            url = _url_of(environ)
        headers = trace.request_headers
        #: (epoch, peer, X-Forwarded-For, url, method, host, proto, request header values, tls)
        self.start = (
            trace.wall_clock(),
            environ.get("REMOTE_ADDR"),
            environ.get("HTTP_X_FORWARDED_FOR") if trace.trusted is not None else None,
            url,
            environ.get("REQUEST_METHOD"),
            environ.get("HTTP_HOST") or environ.get("SERVER_NAME"),
            environ.get("SERVER_PROTOCOL"),
            tuple([environ.get(key, _ABSENT) for _, key in headers]) if headers else None,
            _tls_raw(environ)
            if "SSL_PROTOCOL" in environ or "gunicorn.socket" in environ
            else None,
        )
        self.started = trace.clock()
        self.input: _CountingInput | None = None

    def finish(self, seen: Observation) -> None:
        try:
            record = self.take(seen)
        except Exception:  # noqa: BLE001 - tracing must never break a response
            log.warning("could not build the trace record", exc_info=True)
            return
        self.trace._writer.put(record)

    def take(self, seen: Observation) -> tuple[Any, ...]:
        """The record's raw fields, once the response is finished (its outcome decided here)."""
        trace, environ = self.trace, seen.environ
        duration = trace.clock() - self.started
        input_ = self.input
        self.input = None
        outcome = seen.outcome()
        error = outcome.error
        telemetry: Telemetry | None = environ.get(keys.OTEL)
        exchanges = outcome.exchanges
        return (
            self.start,
            round(duration * 1000.0, 3),
            environ.get(keys.REQUEST_ID, _ABSENT),
            _ABSENT if input_ is None else input_.count,
            seen.bytes_sent,
            self.pick_headers(seen.headers) if trace.response_headers else None,
            outcome.status,
            outcome.status_sent,
            None if error is None else outcome.error_kind,
            None if error is None else _detail_of(error),
            tuple(
                [
                    (
                        ex.target,
                        ex.status,
                        round(((ex.ended or ex.started) - ex.started) * 1000.0, 3),
                        ex.bytes_received,
                        None if ex.error is None else error_kind(ex.error),
                        None if ex.error is None else _detail_of(ex.error),
                    )
                    for ex in exchanges
                ]
            )
            if exchanges
            else (),
            environ.get(keys.ATTEMPT, _ABSENT),
            None if telemetry is None else telemetry.ids(),
        )

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

    Records are queued (``queue_size``), then rendered and written by a
    writer thread (a greenlet under gevent), a batch at a time, so a slow
    sink never blocks a request; when the queue is full the record is
    dropped and :attr:`dropped` counts it.  :meth:`close` (and the process's
    exit) writes every queued line.

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
        self._writer = TraceWriter(
            sys.stderr if sink is None else sink,
            queue_size,
            partial(_render, self.request_headers, self.trusted),
        )

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
        """Queue ``record`` (encoded as one JSON line by the writer)."""
        self._writer.put(record)

    def client_ip(self, environ: WSGIEnvironment) -> str | None:
        peer = environ.get("REMOTE_ADDR")
        if self.trusted is not None:
            return self.trusted.client_ip(peer, environ.get("HTTP_X_FORWARDED_FOR"))
        return normalize_ip(peer) or peer

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        request = _Request(self, environ)
        if "HTTP_UPGRADE" not in environ and "wsgi.input" in environ:
            if environ.get("CONTENT_LENGTH") in _NO_LENGTH and (
                "HTTP_TRANSFER_ENCODING" not in environ
            ):
                request.input = _NO_BODY  # nothing to count: request_bytes is 0
            else:
                request.input = _CountingInput(environ["wsgi.input"])
                environ["wsgi.input"] = request.input
        return observe(self.next_app, environ, start_response, request.finish)


def _render(
    request_headers: tuple[tuple[str, str], ...],
    trusted: TrustedProxies | None,
    record: tuple[Any, ...] | dict[str, Any],
) -> str:
    """One record's JSON line, rendered by the writer (it holds no reference to the Trace).

    The fields in their fixed order, written as :data:`_ENCODE` would write
    the same dict, byte for byte.
    """
    if isinstance(record, dict):
        return _ENCODE(record)
    (
        (wall, peer, forwarded, url, method, host, proto, header_values, tls),
        duration,
        request_id,
        request_bytes,
        response_bytes,
        response_headers,
        status,
        status_sent,
        error,
        detail,
        upstream,
        attempt,
        ids,
    ) = record
    if trusted is not None:
        client_ip = trusted.client_ip(peer, forwarded)
    else:
        client_ip = normalize_ip(peer) or peer
    line = (
        f'{{"time":"{_timestamp(wall)}","client_ip":{_value(client_ip)},'
        f'"method":{_value(method)},"url":{_value(url)},"host":{_value(host)},'
        f'"proto":{_value(proto)}'
    )
    if header_values is not None:
        picked = {
            name: [value]
            for (name, _), value in zip(request_headers, header_values, strict=True)
            if value is not _ABSENT
        }
        line += f',"request_headers":{_ENCODE(picked)}'
    if tls is not None:
        info = _tls_from(tls)
        if info is not None:
            line += f',"tls":{_ENCODE(info)}'
    line += f',"duration_ms":{_value(duration)}'
    if request_id is not _ABSENT:
        line += f',"request_id":{_value(request_id)}'
    if request_bytes is not _ABSENT:
        line += f',"request_bytes":{_value(request_bytes)}'
    line += f',"response_bytes":{_value(response_bytes)}'
    if response_headers is not None:
        line += f',"response_headers":{_ENCODE(response_headers)}'
    line += f',"status":{_value(status)}'
    if status_sent is not None:
        line += f',"status_sent":{_value(status_sent)}'
    if error is not None:
        line += f',"error":{_value(error)}'
        if detail is not None:
            line += f',"error_detail":{_value(detail)}'
    if upstream:
        entries = []
        for target, ex_status, ex_duration, received, ex_error, ex_detail in upstream:
            entry = (
                f'{{"target":{_value(target)},"status":{_value(ex_status)},'
                f'"duration_ms":{_value(ex_duration)},"bytes":{_value(received)}'
            )
            if ex_error is not None:
                entry += f',"error":{_value(ex_error)}'
            if ex_detail is not None:
                entry += f',"error_detail":{_value(ex_detail)}'
            entries.append(entry + "}")
        line += f',"upstream":[{",".join(entries)}],"target":{_value(upstream[-1][0])}'
    line += f',"attempts":{len(upstream)}'
    if attempt is not _ABSENT:
        line += f',"attempt":{_value(attempt)}'
    if ids is not None:
        trace_id, span_id = ids
        line += f',"trace_id":{_value(trace_id)},"span_id":{_value(span_id)}'
    return line + "}"


def _url_of(environ: WSGIEnvironment) -> str:
    """Path and query rebuilt from the environ, for servers that give no raw URI."""
    from urllib.parse import quote

    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    url = quote(path.encode("latin-1"), safe="/:@!$&'()*+,;=-._~") or "/"
    if environ.get("QUERY_STRING"):
        url += "?" + environ["QUERY_STRING"]
    return url


def _names(names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        if not isinstance(name, str) or not name or any(c in name for c in " \t\r\n:"):
            raise ConfigurationError(f"invalid header name {name!r}")
        out.append(name)
    return out


def _detail_of(error: BaseException | None) -> str | None:
    """``error``'s short cause when it knows one (``error_detail``), else None."""
    detail = getattr(error, "detail", None)
    return detail if isinstance(detail, str) and detail else None
