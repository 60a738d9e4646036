"""The one exceptions module: every oxypy error has :class:`OxypyError` as root.

Configuration errors (:class:`ConfigurationError`, :class:`PredicateError`) are
raised at construction.  Request-time errors derive from :class:`RequestError`;
each carries the HTTP ``status`` the toolkit answers with (the table in
``API.md``) and a short ``reason`` that becomes the plain-text body.
"""

from __future__ import annotations

from ._core.status import status_line

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "CircuitOpen",
    "ClientDisconnected",
    "ClientGone",
    "ConfigFileError",
    "ConfigurationError",
    "ConnLimitReached",
    "DeadlineExceeded",
    "NoResponse",
    "NoServers",
    "NoTarget",
    "OxypyError",
    "PredicateError",
    "RateLimited",
    "RequestError",
    "ResponseTooLarge",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamHeaderTimeout",
    "UpstreamProtocolError",
    "UpstreamReadError",
    "UpstreamTLSError",
    "UpstreamTimeout",
    "UpstreamTryTimeout",
]


class OxypyError(Exception):
    """Root of every exception oxypy raises."""


class ConfigurationError(OxypyError, ValueError):
    """A block was constructed with invalid options."""


class ConfigFileError(ConfigurationError):
    """A configuration file (:func:`oxypy.load_config`) has errors: all of them.

    ``errors`` lists each one as ``"key.path: problem"`` (for instance
    ``"routes[2].chain[1].retry: unexpected '=' at column 16"``); ``origin``
    is the file's path (``"<config>"`` for text).
    """

    def __init__(self, origin: str, errors: list[str]) -> None:
        self.origin = origin
        self.errors = list(errors)
        count = f"{len(errors)} error{'s' if len(errors) != 1 else ''}"
        super().__init__(f"{origin}: {count}\n" + "\n".join(f"  {e}" for e in errors))


class PredicateError(ConfigurationError):
    """A predicate string does not parse or does not type-check.

    ``position`` is the 0-based column of the fault in ``expression``; the
    message ends with the expression and a caret line under that column (an
    expression longer than 120 characters is shown as the 120 around the
    column, cut ends marked ``...``).
    """

    def __init__(self, message: str, expression: str, position: int) -> None:
        self.message = message
        self.expression = expression
        self.position = position
        shown, column = _excerpt(expression, position)
        caret = " " * column + "^"
        super().__init__(f"{message} at column {position + 1}\n  {shown}\n  {caret}")


def _excerpt(expression: str, position: int, width: int = 120) -> tuple[str, int]:
    """At most ``width`` characters of ``expression`` around ``position``, and its column there."""
    if len(expression) <= width:
        return expression, position
    start = max(0, min(position - width // 2, len(expression) - width))
    end = start + width
    shown = expression[start:end]
    column = position - start
    if start > 0:
        shown, column = "..." + shown, column + 3
    if end < len(expression):
        shown += "..."
    return shown, column


class RequestError(OxypyError):
    """An error answered to the client with ``status`` and a short plain-text body."""

    status: int = 500
    reason: str = "internal error"

    def __init__(
        self,
        reason: str | None = None,
        *,
        status: int | None = None,
        target: str | None = None,
        attempt: int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        if reason is not None:
            self.reason = reason
        if status is not None:
            self.status = status
        self.target = target
        self.attempt = attempt
        self.headers: list[tuple[str, str]] = headers or []
        super().__init__(self.reason)

    @property
    def kind(self) -> str:
        """A stable, machine-friendly name for logs and Trace (``upstream_timeout``)."""
        name = type(self).__name__
        out = [name[0].lower()]
        for ch in name[1:]:
            out.append("_" + ch.lower() if ch.isupper() else ch)
        return "".join(out)

    @property
    def status_line(self) -> str:
        """``"400 Bad Request"``: the status with its standard phrase."""
        return status_line(self.status)

    def __str__(self) -> str:
        where = f" ({self.target})" if self.target else ""
        return f"{self.status} {self.reason}{where}"


class BadRequest(RequestError):
    """The request is malformed or its framing is ambiguous (smuggling guard).

    The embedded server raises it with the precise 4xx/5xx it answers carried
    on the instance: 400, 405 (``CONNECT``), 408 (head not received within
    ``header_timeout``), 414, 431, 501 (a Transfer-Encoding other than
    ``chunked``) or 505.
    """

    status = 400
    reason = "malformed request"


class ClientDisconnected(RequestError):
    """The client went away before the exchange finished (logged as 499).

    Never a failure of the upstream: a breaker, outlier detection, the
    rebalancer and a retry predicate's ``IsNetworkError()`` ignore it.  Its
    :attr:`kind` is ``"client_disconnected"`` for every subclass, so logs and
    metrics name a client abort the same way whoever noticed it.
    """

    status = 499
    reason = "client closed request"

    @property
    def kind(self) -> str:
        return "client_disconnected"


class ClientGone(ClientDisconnected):
    """The embedded server lost the client: it closed or reset the connection,
    sent no body byte for ``body_timeout`` seconds, or the server stopped at its
    ``graceful_timeout`` (499).

    Raised by ``wsgi.input`` reads and by writes of the response; every block
    that handles :class:`ClientDisconnected` handles it.
    """


class NoTarget(RequestError):
    """``Forward`` has neither a fixed target nor ``environ["oxypy.target"]``."""

    status = 500
    reason = "no upstream target set for this request"


class UpstreamError(RequestError):
    """The upstream could not be reached or did not answer properly (502).

    Raised (or recorded on the :class:`~oxypy.Exchange`) by ``Forward`` only:
    this is what ``IsNetworkError()`` and ``NetworkErrorRatio()`` count.
    """

    status = 502
    reason = "bad gateway"

    #: True when the failure happened before any byte of the request reached
    #: the upstream (the connection was never made), so sending the request
    #: again cannot duplicate it.  ``Buffer`` relies on it: a request whose body
    #: it did not buffer is retried only after such a failure (the body was
    #: never read, so it is still there to send).
    before_send: bool = False

    #: The short cause of the failure as the socket or TLS library gave it
    #: (``"certificate verify failed: unable to get local issuer
    #: certificate"``), when known: Trace writes it as ``error_detail``.
    detail: str | None = None


class UpstreamConnectError(UpstreamError):
    """The connection could not be opened: refused, unreachable, DNS or TLS failure (502)."""

    reason = "upstream unreachable"


class UpstreamTLSError(UpstreamConnectError):
    """The TLS handshake with the upstream failed: an unverifiable certificate,
    a wrong name, a refused client certificate, no common protocol (502; Trace
    kind ``upstream_tls_error``, with the library's reason as ``error_detail``).

    .. versionadded:: 0.3
    """

    reason = "TLS handshake with upstream failed"

    @property
    def kind(self) -> str:
        return "upstream_tls_error"


class UpstreamReadError(UpstreamError):
    """The connection failed after it was opened: reset or closed while the
    request was sent or the response was read (502; Trace kind
    ``upstream_read_error``)."""

    reason = "upstream connection reset"


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect or answer within the timeout (504)."""

    status = 504
    reason = "upstream timed out"


class UpstreamHeaderTimeout(UpstreamTimeout):
    """No response head within ``Forward(response_header_timeout=)`` of the
    request being sent (504; Trace kind ``upstream_header_timeout``)."""

    reason = "upstream sent no response head in time"


class UpstreamTryTimeout(UpstreamTimeout):
    """One attempt ran past ``Buffer(per_try_timeout=)`` (504; Trace kind
    ``upstream_try_timeout``).  A network error for ``IsNetworkError()``, so
    the retry predicate decides whether another attempt follows."""

    reason = "upstream attempt timed out"


class DeadlineExceeded(UpstreamTimeout):
    """The request's deadline (``Timeout``) passed before it was answered (504;
    Trace kind ``deadline_exceeded``).

    Raised by ``Forward`` when a wait capped at the deadline runs out and by
    ``Timeout`` when it interrupts an app below it that ignored the deadline.
    Like every :class:`UpstreamTimeout` it is a network error (an upstream
    that never answers within the deadline is counted by outlier detection
    and the breaker), but ``Buffer`` never retries once the deadline is gone.
    """

    reason = "request deadline exceeded"


class UpstreamProtocolError(UpstreamError):
    """The upstream sent an invalid or ambiguous response (502)."""

    reason = "invalid response from upstream"


class NoResponse(RequestError):
    """The wrapped app returned a body without ever calling ``start_response`` (502).

    Raised by ``Buffer``, which must know the status before it can decide.
    Also importable as ``oxypy.buffer.NoResponse``.
    """

    status = 502
    reason = "the wrapped application sent no response status"


class BodyTooLarge(RequestError):
    """The request body is over the configured maximum (413)."""

    status = 413
    reason = "request body too large"


class ResponseTooLarge(RequestError):
    """The upstream response body is over the buffering maximum (502)."""

    status = 502
    reason = "upstream response too large"


class RateLimited(RequestError):
    """The source is over its rate (429 with ``Retry-After``)."""

    status = 429
    reason = "rate limit reached"


class ConnLimitReached(RequestError):
    """The source has too many requests in flight (429)."""

    status = 429
    reason = "connection limit reached"


class CircuitOpen(RequestError):
    """The circuit breaker is open and no fallback was given (503)."""

    status = 503
    reason = "circuit breaker open"


class NoServers(RequestError):
    """The balancer has no server it may pick (503)."""

    status = 503
    reason = "no healthy upstream server"
