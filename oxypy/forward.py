"""Forward: send the request to its upstream and stream the answer back.

The foundation of every chain.  ``Forward`` rewrites the request head
(hop-by-hop removal, forwarding headers under the trust rule), streams the
body to the upstream as it arrives, and streams the response back chunk by
chunk as the upstream sends it.  WebSocket upgrades are tunnelled byte for
byte (see :mod:`oxypy._tunnel`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import urllib3

from . import environ as keys
from ._client.exchange import BodySource, Bounds, UpstreamResponse, exchange
from ._client.pool import HostPool, Pools
from ._client.request_head import build_headers, check_framing, max_forwards, request_target
from ._client.response_head import (
    CookieRule,
    answer_max_forwards,
    authority,
    client_origin,
    compile_cookie_rule,
    relocate,
    rewrite_cookies,
    trailer_fields,
)
from ._core.checks import UNPATCHED, unpatched_greenlet
from ._core.exchange import Exchange, exchange_log
from ._core.headers import HOP_BY_HOP, connection_tokens, is_field_name
from ._core.net import TrustedProxies
from ._core.status import reason_phrase
from ._core.telemetry import Telemetry
from ._core.types import StartResponse, WSGIEnvironment
from ._core.urls import parse_target_url
from ._tunnel.bytes_tunnel import relay_upgrade
from .errors import ErrorHandler, default_error_handler, respond_error, restarting
from .exceptions import (
    ClientDisconnected,
    ConfigurationError,
    NoTarget,
    RequestError,
)

__all__ = ["Exchange", "Forward", "OutgoingRequest", "ResponseHead"]

log = logging.getLogger(__name__)

_INF = float("inf")


class OutgoingRequest:
    """The request about to be sent, handed to ``modify_request`` (Go's Director)."""

    __slots__ = ("method", "target", "path", "headers")

    def __init__(self, method: str, target: str, path: str, headers: list[tuple[str, str]]):
        self.method = method
        self.target = target
        self.path = path
        self.headers = headers


class ResponseHead:
    """The upstream's answer as it will be relayed, handed to ``modify_response``."""

    __slots__ = ("status", "reason", "headers")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]]):
        self.status = status
        self.reason = reason
        self.headers = headers


#: Forward's answer in a gevent greenlet of an unpatched process (one line: what to do).
_REFUSED = (
    b"oxypy: gevent runs unpatched: put "
    b"`from gevent import monkey; monkey.patch_all()` first in your program\n"
)


def _refuse_unpatched(start_response: StartResponse) -> list[bytes]:
    start_response(
        "500 Internal Server Error",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(_REFUSED))),
        ],
    )
    return [_REFUSED]


class _Target:
    __slots__ = ("url", "scheme", "host_header", "authority", "base_path", "pool", "origin")

    def __init__(
        self,
        url: str,
        scheme: str,
        host_header: str,
        authority: tuple[str, int],
        base_path: str,
        pool: HostPool,
    ):
        self.url = url
        self.scheme = scheme
        self.host_header = host_header
        self.authority = authority
        self.base_path = base_path
        self.pool = pool
        #: ``scheme://host[:port]``, the start of the CLIENT span's ``url.full``.
        self.origin = f"{scheme}://{host_header}"


class Forward:
    """Forward each request to its upstream and stream the response back.

    The upstream is the fixed ``target`` or, without one,
    ``environ["oxypy.target"]`` as a balancer sets it.  A target's path is a
    base prefix: ``http://h:p/api`` + ``/x`` goes to ``/api/x``.  Path and query
    travel byte-exact from the raw request URI.

    **Reads** ``oxypy.target``, ``oxypy.forwarded_prefix`` (sent as
    ``X-Forwarded-Prefix``), the request head and ``wsgi.input``; calls
    ``oxypy.send_trailers`` with the upstream's trailers when the client
    sent ``TE: trailers`` and the server offers it; ``oxypy.deadline`` (set
    by :class:`~oxypy.Timeout`): connect, send, the head wait and every body
    read are capped at what remains, and its expiry is 504
    (:class:`DeadlineExceeded`) before the head, an aborted client connection
    after it; ``oxypy.try_deadline`` (set by ``Buffer(per_try_timeout=)``):
    connect, send and the head wait are capped at it (504
    :class:`UpstreamTryTimeout`).
    **Writes** ``oxypy.exchanges`` (an :class:`Exchange` per upstream request)
    and ``oxypy.error`` on failure.  Under :class:`~oxypy.OpenTelemetry`
    (``oxypy.otel``) each upstream request gets a CLIENT span, and its
    ``traceparent`` (with ``tracestate``/``baggage``) replaces the client's.
    **Streams** both ways; never buffers a body.

    OPTIONS and TRACE: ``Max-Forwards`` is decremented; at 0 Forward answers
    itself (OPTIONS: 200 with ``Allow``; TRACE: 200 ``message/http``
    reflecting the request head without credentials or cookies); an invalid
    value is 400.  Bytes an upstream sends after a complete response are
    never relayed, and that connection is never pooled.

    Errors (plain-text bodies through ``error_handler``): ambiguous framing
    400, no target 500, refused/unreachable/TLS failure 502
    (:class:`UpstreamConnectError`), reset or closed after connecting 502
    (:class:`UpstreamReadError`), invalid response 502, connect or read
    timeout 504 (:class:`UpstreamTimeout`), client gone 499
    (:class:`ClientDisconnected`, logged; nobody is left to read it; also
    while its upload streams: the upstream connection is then closed, never
    pooled, and the exchange is not a network error).  An upstream that
    fails before its first body byte is answered 502/504 in place of its
    head (not sent yet); one that dies later in the body aborts the client
    connection: the response is visibly truncated, never completed with
    fake bytes.

    :param target: fixed upstream base URL (positional).
    :param pool: a ``urllib3.PoolManager`` to draw connections from; by default
        Forward owns one (``retries=False``, TLS verification on).
    :param connect_timeout: seconds to connect (default 5).
    :param read_timeout: seconds per socket read from the upstream (default 60).
    :param response_header_timeout: seconds from the request fully sent to
        the response head (interim 1xx skipped) arriving; over it 504
        (:class:`UpstreamHeaderTimeout`, Trace kind
        ``upstream_header_timeout``), a network error for the breaker,
        outlier detection and ``IsNetworkError()``.  None (default): only
        ``read_timeout`` bounds each read, so an upstream trickling its head
        a byte at a time is not bounded as a whole.
    :param deadline_header: a request header name, e.g.
        ``"X-Request-Timeout-Ms"``: when the request has a deadline
        (``environ["oxypy.deadline"]``, set by :class:`~oxypy.Timeout`) the
        milliseconds that remain are sent in it (as Envoy's
        ``x-envoy-expected-rq-timeout-ms``); a copy the client sent is always
        removed.  None (default): nothing is sent.
    :param pool_maxsize: kept-alive connections per upstream host (default 128).
    :param pool_timeout: with a blocking ``pool``, seconds to wait for a free
        connection (default 5), then 502 (:class:`UpstreamConnectError`, "no
        upstream connection available"); waiting requests get the connections
        given back in the order they came.
    :param pool_idle_timeout: seconds a kept-alive upstream connection may sit
        idle in the pool before Forward closes it (default 4; None keeps idle
        connections until the upstream closes them).  Keep it below the
        upstream's own keep-alive timeout (Node 5 s, nginx 75 s, gunicorn 2 s:
        set 1 there) so Forward, not the upstream, closes an idle connection.
        Checked when a connection is taken from the pool and swept every half
        bound, so an idle process releases its connections too.
    :param trusted_proxies: CIDRs whose forwarding headers are believed.
    :param pass_host_header: send the client's Host instead of the target's.
    :param forwarded: also add an RFC 7239 ``Forwarded`` element.
    :param via: pseudonym for an RFC 9110 ``Via`` entry, e.g. ``"oxypy"``.
    :param ca_certs: CA bundle for upstream TLS.  ``cert_file``/``key_file``:
        client certificate.  ``server_hostname``: SNI and verification name.
    :param insecure: disable upstream certificate verification (explicit opt-out).
    :param websocket: tunnel ``Upgrade`` requests (default True).
    :param tunnel_idle_timeout: seconds a tunnel may stay silent (default 3600).
    :param expect_continue_timeout: seconds to wait for the upstream's
        ``100 Continue`` before sending the body anyway (default 1).
    :param rewrite_location: rewrite a ``Location`` or ``Content-Location``
        that points at the upstream (its host:port, or the ``Host`` sent, and
        a path under the target's base path) to the address the client used:
        scheme and host (``X-Forwarded-Proto``/``-Host`` from a trusted proxy,
        else ``wsgi.url_scheme``/``Host``) and the mount prefix (a trusted
        ``X-Forwarded-Prefix``, then ``environ["oxypy.forwarded_prefix"]``)
        in place of the base path; relative ones and other hosts are left
        alone (default True, nginx's ``proxy_redirect default``).
    :param cookie_domain: rewrite each ``Set-Cookie``'s ``Domain``: a mapping
        ``{"upstream.internal": "example.com"}`` (case-insensitive, leading
        dot ignored) or ``fn(domain) -> new | None`` (None removes it).
        Default None: untouched.
    :param cookie_path: rewrite ``Path``: a mapping of prefixes
        (``{"/": "/app/"}``, the longest match wins) or ``fn(path) -> new |
        None``.  Default None: untouched.
    :param error_handler: ``(environ, start_response, exc)`` for request errors.
    :param modify_request: ``fn(environ, OutgoingRequest)`` before sending.
    :param modify_response: ``fn(environ, ResponseHead)`` before relaying.

    Example::

        from oxypy import Forward, serve
        app = Forward("http://127.0.0.1:9000")
        serve(app, "127.0.0.1:8080")

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        target: str | None = None,
        /,
        *,
        pool: urllib3.PoolManager | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float | None = 60.0,
        pool_maxsize: int = 128,
        pool_timeout: float | None = 5.0,
        pool_idle_timeout: float | None = 4.0,
        trusted_proxies: Iterable[str] | None = None,
        pass_host_header: bool = False,
        forwarded: bool = False,
        via: str | None = None,
        ca_certs: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_hostname: str | None = None,
        insecure: bool = False,
        websocket: bool = True,
        tunnel_idle_timeout: float | None = 3600.0,
        expect_continue_timeout: float | None = 1.0,
        max_response_head_bytes: int = 256 * 1024,
        rewrite_location: bool = True,
        cookie_domain: Mapping[str, str] | Callable[[str], str | None] | None = None,
        cookie_path: Mapping[str, str] | Callable[[str], str | None] | None = None,
        response_header_timeout: float | None = None,
        deadline_header: str | None = None,
        error_handler: ErrorHandler = default_error_handler,
        modify_request: Callable[[WSGIEnvironment, OutgoingRequest], None] | None = None,
        modify_response: Callable[[WSGIEnvironment, ResponseHead], None] | None = None,
    ) -> None:
        if connect_timeout is not None and connect_timeout <= 0:
            raise ConfigurationError("connect_timeout must be > 0")
        if read_timeout is not None and read_timeout <= 0:
            raise ConfigurationError("read_timeout must be > 0 or None")
        if pool_maxsize < 1:
            raise ConfigurationError("pool_maxsize must be >= 1")
        if pool_idle_timeout is not None and not pool_idle_timeout > 0:
            raise ConfigurationError("pool_idle_timeout must be > 0 or None")
        if response_header_timeout is not None and not (
            isinstance(response_header_timeout, (int, float)) and response_header_timeout > 0
        ):
            raise ConfigurationError("response_header_timeout must be > 0 or None")
        if deadline_header is not None and not is_field_name(deadline_header):
            raise ConfigurationError("deadline_header must be a header field name")
        if via is not None and (not via or any(c in via for c in "\r\n,")):
            raise ConfigurationError("via must be a non-empty token without commas")
        self.read_timeout = read_timeout
        self.pool_timeout = pool_timeout
        self.trusted = TrustedProxies(trusted_proxies)
        self.pass_host_header = pass_host_header
        self.forwarded = forwarded
        self.via = via
        self.websocket = websocket
        self.tunnel_idle_timeout = tunnel_idle_timeout
        self.expect_continue_timeout = expect_continue_timeout
        self.max_head = max_response_head_bytes
        self.response_header_timeout = response_header_timeout
        self.deadline_header = deadline_header
        self._deadline_header_lower = deadline_header.lower() if deadline_header else ""
        self.error_handler = error_handler
        self.modify_request = modify_request
        self.modify_response = modify_response
        self.rewrite_location = rewrite_location
        self._cookie_domain: CookieRule | None = compile_cookie_rule(cookie_domain, "domain")
        self._cookie_path: CookieRule | None = compile_cookie_rule(cookie_path, "path")
        if pool is None:
            tls: dict[str, Any] = {}
            if insecure:
                tls["cert_reqs"] = "CERT_NONE"
                tls["assert_hostname"] = False
            else:
                tls["cert_reqs"] = "CERT_REQUIRED"
                if ca_certs:
                    tls["ca_certs"] = ca_certs
            if cert_file:
                tls["cert_file"] = cert_file
                tls["key_file"] = key_file
            if server_hostname:
                tls["server_hostname"] = server_hostname
            pool = urllib3.PoolManager(
                num_pools=256,
                maxsize=pool_maxsize,
                block=False,
                retries=False,
                timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
                **tls,
            )
        elif insecure or ca_certs or cert_file or server_hostname:
            raise ConfigurationError("TLS options apply to Forward's own pool; configure `pool`")
        self.pool = pool
        self.pool_idle_timeout = pool_idle_timeout
        self._pools = Pools(pool, pool_idle_timeout)
        self._targets: dict[str, _Target] = {}
        self._fixed = self._target(target) if target is not None else None
        #: Whether the process may run Forward (checked at the first request).
        self._process_ok: bool | None = None

    def _target(self, url: str) -> _Target:
        found = self._targets.get(url)
        if found is not None and not found.pool.closed:
            return found
        parsed = parse_target_url(url, websocket=True)
        pool = self._pools.host(parsed.scheme, parsed.host, parsed.port)
        found = _Target(
            url,
            parsed.scheme,
            parsed.host_header,
            (parsed.host.lower(), parsed.port),
            parsed.path,
            pool,
        )
        if len(self._targets) > 4096:
            self._targets.clear()
        self._targets[url] = found
        return found

    def close(self) -> None:
        """Close every pooled upstream connection (and stop the idle sweeper)."""
        self._pools.close()

    # -- the WSGI application -------------------------------------------------
    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not self._process_ok:
            if self._process_ok is None:
                self._check_process()
            if not self._process_ok:
                return _refuse_unpatched(start_response)
        method = environ["REQUEST_METHOD"]
        url = environ.get(keys.TARGET)
        record = Exchange(url or "", method, time.monotonic())
        exchange_log(environ).append(record)
        try:
            if self._fixed is not None and url is None:
                target = self._fixed
                record.target = target.url
            elif url is None:
                raise NoTarget()
            else:
                try:
                    target = self._target(url)
                except ConfigurationError as exc:
                    raise NoTarget(f"invalid upstream target {url!r}") from exc
            framing = check_framing(environ)
            if max_forwards(environ) == 0:
                record.ended = time.monotonic()
                return answer_max_forwards(environ, start_response)
            upgrade = None
            if self.websocket and "upgrade" in connection_tokens(environ.get("HTTP_CONNECTION")):
                upgrade = environ.get("HTTP_UPGRADE") or None
            host = (
                environ.get("HTTP_HOST") or target.host_header
                if self.pass_host_header
                else target.host_header
            )
            headers = build_headers(
                environ,
                host=host,
                trusted=self.trusted,
                upgrade=upgrade,
                framing=framing,
                forwarded=self.forwarded,
                via=self.via,
            )
            if upgrade and "wsgi.websocket" in environ:
                # gevent-websocket answered the handshake itself: relay messages,
                # so no extension the relay cannot decode may be negotiated.
                headers = [h for h in headers if h[0] != "Sec-Websocket-Extensions"]
            path = request_target(environ, target.base_path)
            deadline = environ.get(keys.DEADLINE)
            if self.deadline_header is not None:
                headers = self._with_deadline(headers, deadline)
            telemetry: Telemetry | None = environ.get(keys.OTEL)
            if telemetry is not None:
                headers = telemetry.client_span(
                    environ, record, target.authority, target.origin, path, headers
                )
            if self.modify_request is not None:
                outgoing = OutgoingRequest(method, target.url, path, headers)
                self.modify_request(environ, outgoing)
                path, headers = outgoing.path, outgoing.headers
            head = _encode_head(method, path, headers)
            body = None
            if framing.has_body:
                body = BodySource(environ["wsgi.input"], framing.length)
            expect = None
            if body is not None and environ.get("HTTP_EXPECT", "").lower() == "100-continue":
                expect = self.expect_continue_timeout
            bounds = None
            try_deadline = environ.get(keys.TRY_DEADLINE)
            if (
                deadline is not None
                or try_deadline is not None
                or self.response_header_timeout is not None
            ):
                bounds = Bounds(deadline, try_deadline, self.response_header_timeout)
            resp = exchange(
                target.pool,
                method,
                head,
                body,
                chunked=framing.chunked,
                read_timeout=self.read_timeout,
                pool_timeout=self.pool_timeout,
                max_head=self.max_head,
                expect_timeout=expect,
                bounds=bounds,
            )
        except RequestError as exc:
            exc.target = exc.target or record.target or None
            record.error = exc
            record.ended = time.monotonic()
            return respond_error(self.error_handler, environ, start_response, exc)
        record.status = resp.status
        if resp.status == 101:
            return relay_upgrade(
                environ,
                start_response,
                resp,
                record,
                upgrade,
                idle_timeout=self.tunnel_idle_timeout,
                error_handler=self.error_handler,
            )
        return self._relay(environ, start_response, resp, record, target, host)

    def _check_process(self) -> None:
        """Once, at the first request: refuse a gevent greenlet in an unpatched process.

        There the upstream exchange's blocking sockets would stop the hub, so
        concurrent requests would wait for each other and time out.  Real
        threads (werkzeug's threaded server, gunicorn's sync and gthread
        workers) and patched processes pass.
        """
        ok = not unpatched_greenlet()
        if not ok:
            log.error("Forward refuses every request: %s", UNPATCHED)
        self._process_ok = ok

    def _with_deadline(
        self, headers: list[tuple[str, str]], deadline: float | None
    ) -> list[tuple[str, str]]:
        name = self._deadline_header_lower
        headers = [h for h in headers if h[0].lower() != name]
        if deadline is not None:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            headers.append((str(self.deadline_header), str(left)))
        return headers

    def _relay(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        resp: UpstreamResponse,
        record: Exchange,
        target: _Target,
        host: str,
    ) -> Iterable[bytes]:
        headers = response_headers(resp.headers)
        if self.rewrite_location:
            headers = self._relocate(environ, headers, target, host)
        if self._cookie_domain is not None or self._cookie_path is not None:
            headers = rewrite_cookies(headers, self._cookie_domain, self._cookie_path)
        status, reason = resp.status, resp.reason
        if self.modify_response is not None:
            head = ResponseHead(status, reason, headers)
            try:
                self.modify_response(environ, head)
            except BaseException:
                resp.close()
                raise
            status, reason, headers = head.status, head.reason, head.headers
        try:
            start_response(status_line(status, reason), headers)
        except BaseException:
            resp.close()
            raise
        return _ResponseBody(resp, record, environ, self.error_handler, start_response)

    def _relocate(
        self,
        environ: WSGIEnvironment,
        headers: list[tuple[str, str]],
        target: _Target,
        host: str,
    ) -> list[tuple[str, str]]:
        """``Location``/``Content-Location`` pointing at the upstream -> the client's address."""
        out = None
        for i, (name, value) in enumerate(headers):
            lname = name.lower()
            if lname != "location" and lname != "content-location":
                continue
            upstreams = [target.authority]
            sent = authority(host, target.scheme)
            if sent is not None and sent != target.authority:
                upstreams.append(sent)
            new = relocate(value, upstreams, target.base_path, client_origin(environ, self.trusted))
            if new != value:
                if out is None:
                    out = list(headers)
                out[i] = (name, new)
        return headers if out is None else out


def status_line(status: int, reason: str) -> str:
    """A WSGI status line; a missing or unprintable reason gets the standard phrase."""
    if not reason or not reason.isprintable():
        reason = reason_phrase(status)
    return f"{status} {reason}"


def response_headers(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's headers minus hop-by-hop ones and those its Connection names."""
    named: set[str] | None = None
    for name, value in raw:
        if name.lower() == "connection":
            named = (named or set()) | connection_tokens(value)
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    return [(n, v) for n, v in raw if n.lower() not in drop]


def _encode_head(method: str, path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    for name, value in headers:
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise RequestError("request head is not latin-1", status=400) from exc


class _ResponseBody:
    """The relayed body: yields upstream chunks; ``close()`` settles the exchange once.

    An upstream failing before its first body byte is answered through the
    error handler (the head was not sent yet: 502/504 replaces it, never the
    server's 500); after that the error propagates and the server cuts the
    client connection.
    """

    __slots__ = (
        "resp",
        "record",
        "environ",
        "handler",
        "start_response",
        "_closed",
        "bounded_until",
    )

    def __init__(
        self,
        resp: UpstreamResponse,
        record: Exchange,
        environ: WSGIEnvironment,
        handler: ErrorHandler,
        start_response: StartResponse,
    ):
        self.resp = resp
        self.record = record
        self.environ = environ
        self.handler = handler
        self.start_response = start_response
        self._closed = False
        limit = resp.body_limit
        #: The request deadline (``time.monotonic()``) this body honours on its
        #: own (every read capped at it, no chunk handed out after it), or
        #: infinity: a :class:`~oxypy.Timeout` above with a deadline no earlier
        #: relays it as it is instead of watching each chunk.
        self.bounded_until = _INF if limit is None else limit.at

    def __iter__(self) -> Iterator[bytes]:
        record = self.record
        limit = self.resp.body_limit
        try:
            for chunk in self.resp:
                if limit is not None and limit.at <= time.monotonic():
                    raise limit.error()  # the deadline passed while the client took the last chunk
                record.bytes_received += len(chunk)
                yield chunk
            if self.resp.trailers:
                self._send_trailers()
        except RequestError as exc:
            exc.target = exc.target or record.target
            record.error = exc
            if record.bytes_received == 0:
                start = restarting(self.start_response, exc)
                yield from respond_error(self.handler, self.environ, start, exc)
                return
            self.environ[keys.ERROR] = exc
            log.warning("aborting response from %s: %s", record.target, exc.reason)
            raise

    def _send_trailers(self) -> None:
        """Hand the upstream's trailers to the server, when it and the client take them."""
        send = self.environ.get(keys.SEND_TRAILERS)
        te = self.environ.get("HTTP_TE")
        if send is None or not te or "trailers" not in connection_tokens(te):
            return
        fields = trailer_fields(self.resp.trailers)
        if fields:
            send(fields)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        record = self.record
        if record.ended is not None:
            # Settled above (settle_unfinished): a block abandoned or cut the body.
            self.resp.close()
            return
        record.ended = time.monotonic()
        if not self.resp.complete and record.error is None:
            exc = ClientDisconnected(target=record.target)
            record.error = exc
            self.environ[keys.ERROR] = exc
            log.info("499 client closed request; abandoned upstream %s", record.target)
        self.resp.close()
