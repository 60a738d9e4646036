"""Source extractors: which bucket (RateLimit) or counter (ConnLimit) a request uses.

A source is named by a string (``"client.ip"``, ``"request.host"``,
``"request.header.<Name>"``, ``"request.cookie.<Name>"``) or given as any
callable ``(environ) -> str | None``.  The same sources key RateLimit,
ConnLimit and ConsistentHash.
A request that has no value for the source is handled by an explicit policy
(``missing=``): rejected with 400, counted in one explicitly named shared
bucket, or let through unlimited, never pooled into a ``""`` bucket by
accident as oxy's extractors do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, Protocol

from ._core.headers import header_to_environ
from ._core.net import TrustedProxies
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .errors import ErrorHandler, respond_error
from .exceptions import BadRequest, ConfigurationError, RequestError

__all__ = ["MISSING_KEY", "Missing", "SourceExtractor"]

#: The key of the one bucket that ``missing="shared"`` counts requests in.  It
#: holds a NUL, which no header value, host or address can contain, so it never
#: collides with a real source.
MISSING_KEY = "\x00missing"

Missing = Literal["reject", "shared", "skip"]
_MISSING_POLICIES = ("reject", "shared", "skip")
_HEADER_PREFIX = "request.header."
_COOKIE_PREFIX = "request.cookie."


class SourceExtractor(Protocol):
    """``(environ) -> str | None``: the source of a request; None or "" when it has none."""

    def __call__(self, environ: WSGIEnvironment, /) -> str | None: ...


def _client_ip(trusted: TrustedProxies, depth: int) -> SourceExtractor:
    def client_ip(environ: WSGIEnvironment) -> str | None:
        peer = environ.get("REMOTE_ADDR")
        forwarded = environ.get("HTTP_X_FORWARDED_FOR") if trusted else None
        return trusted.client_ip(peer, forwarded, depth)

    return client_ip


def _request_host(environ: WSGIEnvironment) -> str | None:
    host = environ.get("HTTP_HOST")
    return host.strip().lower() if host else None


def _header(name: str) -> SourceExtractor:
    key = header_to_environ(name)

    def header(environ: WSGIEnvironment) -> str | None:
        value = environ.get(key)
        return value.strip() if isinstance(value, str) else None

    return header


def _cookie(name: str) -> SourceExtractor:
    def cookie(environ: WSGIEnvironment) -> str | None:
        raw = environ.get("HTTP_COOKIE")
        if not isinstance(raw, str):
            return None
        # RFC 6265 5.4: "name=value" pairs separated by ";"; the first pair of
        # that exact name wins; a quoted value loses its quotes.
        for pair in raw.split(";"):
            key, eq, value = pair.partition("=")
            if eq and key.strip() == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value
        return None

    return cookie


def _make_extractor(
    source: str | SourceExtractor,
    *,
    trusted_proxies: Iterable[str] | TrustedProxies | None = None,
    depth: int = 0,
) -> SourceExtractor:
    """Build the extractor for ``source``; raise :class:`ConfigurationError` if unknown.

    :param trusted_proxies: CIDRs whose ``X-Forwarded-For`` is believed by
        ``"client.ip"`` (the same rule as ``Forward``); empty by default.
    :param depth: with trusted proxies, take at most the ``depth``-th hop from
        the right (0: the first untrusted hop).
    """
    if callable(source):
        return source
    if not isinstance(source, str):
        raise ConfigurationError(f"source must be a string or a callable, got {source!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ConfigurationError(f"depth must be an integer >= 0, got {depth!r}")
    if source == "client.ip":
        trusted = (
            trusted_proxies
            if isinstance(trusted_proxies, TrustedProxies)
            else TrustedProxies(trusted_proxies)
        )
        return _client_ip(trusted, depth)
    if source == "request.host":
        return _request_host
    if source.startswith(_HEADER_PREFIX):
        name = source[len(_HEADER_PREFIX) :].strip()
        if not name or "_" in name or any(c.isspace() or c == ":" for c in name):
            raise ConfigurationError(f"source {source!r}: invalid header name")
        return _header(name)
    if source.startswith(_COOKIE_PREFIX):
        name = source[len(_COOKIE_PREFIX) :].strip()
        if not name or any(c.isspace() or c in '=;,"' for c in name):
            raise ConfigurationError(f"source {source!r}: invalid cookie name")
        return _cookie(name)
    raise ConfigurationError(
        f"unsupported source {source!r}: use 'client.ip', 'request.host', "
        "'request.header.<Name>', 'request.cookie.<Name>' or a callable"
    )


#: Not public since 0.2 (an internal helper); importable until 1.0.
make_extractor = _make_extractor


class Source:
    """A source extractor plus its missing-value policy: ``key(environ)``.

    :param source: ``"client.ip"``, ``"request.host"``, ``"request.header.<Name>"``,
        ``"request.cookie.<Name>"`` (the first cookie of that exact name) or a
        callable ``(environ) -> str | None``.
    :param missing: ``"reject"`` (400 :class:`BadRequest`), ``"shared"`` (all
        such requests share the one bucket :data:`MISSING_KEY`) or ``"skip"``
        (no limit applies to them).
    :param trusted_proxies: see ``make_extractor``.
    :param depth: see ``make_extractor``.
    """

    __slots__ = ("extract", "missing", "name")

    def __init__(
        self,
        source: str | SourceExtractor = "client.ip",
        *,
        missing: Missing = "reject",
        trusted_proxies: Iterable[str] | TrustedProxies | None = None,
        depth: int = 0,
    ) -> None:
        if missing not in _MISSING_POLICIES:
            raise ConfigurationError(
                f"missing must be one of {', '.join(_MISSING_POLICIES)}, got {missing!r}"
            )
        self.extract: Callable[[WSGIEnvironment], str | None] = _make_extractor(
            source, trusted_proxies=trusted_proxies, depth=depth
        )
        self.missing: Missing = missing
        self.name = source if isinstance(source, str) else getattr(source, "__name__", "callable")

    def key(self, environ: WSGIEnvironment) -> str | None:
        """The bucket key for this request; None means "do not limit it".

        Raises :class:`BadRequest` (400) under ``missing="reject"``.
        """
        value = self.extract(environ)
        if value:
            return value
        if self.missing == "shared":
            return MISSING_KEY
        if self.missing == "skip":
            return None
        raise BadRequest(f"no {self.name} to limit this request by")

    def gate(
        self,
        block: _Keyed,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> str | Iterable[bytes]:
        """The preamble a keyed limit runs: the request's key (a ``str``), or its response.

        A response settles the request without a key: the block's ``skip``
        said so or the source has no value under ``missing="skip"`` (both go
        straight to the next app), or the source refused the request (its
        error answered through the block's ``error_handler``).
        """
        if block.skip is not None and block.skip(environ):
            return block.next_app(environ, start_response)
        try:
            key = self.key(environ)
        except RequestError as exc:
            return respond_error(block.error_handler, environ, start_response, exc)
        if key is None:
            return block.next_app(environ, start_response)
        return key


class _Keyed(Protocol):
    """What :meth:`Source.gate` needs of a block: its next app, skip and error handler."""

    next_app: WSGIApplication
    skip: Skip | None
    error_handler: ErrorHandler
