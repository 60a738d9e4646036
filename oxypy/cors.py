"""CORS: answer preflights and label cross-origin responses (the Fetch standard).

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
is answered by the block itself and never reaches the next app.  Other
requests pass through; when they carry an allowed ``Origin`` their response
gets ``Access-Control-Allow-Origin`` and its companions.  ``Vary`` names
``Origin`` whenever the answer depends on it, so shared caches stay correct.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from ._core.headers import is_field_name, merge_vary
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError

__all__ = ["CORS"]

ALLOW_ORIGIN = "Access-Control-Allow-Origin"
ALLOW_CREDENTIALS = "Access-Control-Allow-Credentials"
ALLOW_METHODS = "Access-Control-Allow-Methods"
ALLOW_HEADERS = "Access-Control-Allow-Headers"
EXPOSE_HEADERS = "Access-Control-Expose-Headers"
MAX_AGE = "Access-Control-Max-Age"

#: Response fields this block owns: an app's own values are replaced on CORS responses.
_OWNED = frozenset(
    h.lower() for h in (ALLOW_ORIGIN, ALLOW_CREDENTIALS, ALLOW_METHODS, ALLOW_HEADERS, MAX_AGE)
) | {EXPOSE_HEADERS.lower()}

#: Request headers a browser may send cross-origin without them being allowed
#: (CORS-safelisted request headers; Starlette and Django-cors do the same).
_SAFELISTED = frozenset({"accept", "accept-language", "content-language", "content-type"})
_PREFLIGHT_VARY = ("Access-Control-Request-Method", "Access-Control-Request-Headers")


def _names(values: Iterable[str], option: str, *, methods: bool = False) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ConfigurationError(f"{option} must be a list of strings, not a string")
    out: list[str] = []
    for value in values:
        if not isinstance(value, str) or (value != "*" and not is_field_name(value)):
            raise ConfigurationError(f"{option}: invalid entry {value!r}")
        out.append(value.upper() if methods else value)
    return tuple(out)


def _origin(value: object) -> str:
    if value in ("*", "null"):
        return str(value)
    if not isinstance(value, str):
        raise ConfigurationError(f"allow_origins: invalid origin {value!r}")
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        parts = urlsplit("")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
        or value.endswith("/")
    ):
        raise ConfigurationError(
            f"allow_origins: invalid origin {value!r} (want scheme://host[:port], '*' or 'null')"
        )
    return value.lower()


class CORS:
    """Answer CORS preflights and add the ``Access-Control-*`` response fields.

    **Preflights** (``OPTIONS`` with ``Origin`` and
    ``Access-Control-Request-Method``) are answered here with ``204`` and no
    body; the next app never sees them.  An allowed one carries
    ``Access-Control-Allow-Origin``, ``-Allow-Methods``, ``-Allow-Headers``
    (the requested headers, echoed), ``-Allow-Credentials`` and ``-Max-Age``
    as configured; a refused one (origin, method or a requested header not
    allowed) carries no ``Access-Control-Allow-*`` field, so the browser
    blocks the request that would have followed.

    **Other requests** with an allowed ``Origin`` pass to the next app and
    their response gets ``Access-Control-Allow-Origin`` (plus
    ``-Allow-Credentials`` and ``-Expose-Headers`` when configured); values
    the app set for these fields are replaced.  A request with a refused
    ``Origin`` passes through without them.  CORS is enforced by browsers:
    this block labels responses, it does not reject requests.

    ``allow_origins=["*"]`` allows any origin: without credentials the answer
    is the literal ``*``; with ``allow_credentials=True`` the request's exact
    ``Origin`` is echoed, because the Fetch standard ignores ``*`` on
    credentialed requests.  Whenever the response depends on the origin (any
    list of origins, or ``*`` with credentials) ``Vary: Origin`` is merged into
    every response, requests without ``Origin`` included, so a shared cache
    never serves one origin's answer to another.  **Streams**; reads
    ``REQUEST_METHOD``, ``HTTP_ORIGIN``,
    ``HTTP_ACCESS_CONTROL_REQUEST_METHOD`` and ``-HEADERS``; writes nothing on
    the environ.

    Refused at construction (:class:`~oxypy.ConfigurationError` naming the
    option): an origin that is not ``scheme://host[:port]``, ``*`` or
    ``null``; a method or header that is not a token; ``expose_headers=["*"]``
    with credentials (the Fetch standard ignores it there); a negative
    ``max_age``.

    :param allow_origins: the allowed origins, e.g.
        ``["https://app.example.com"]``, or ``["*"]`` for any.
    :param allow_methods: methods a preflight may ask for (``["*"]``: any);
        default ``GET``, ``HEAD``, ``POST``.
    :param allow_headers: request headers a preflight may ask for besides the
        CORS-safelisted ones (``["*"]``: any).
    :param expose_headers: response headers the page's script may read.
    :param allow_credentials: allow cookies and HTTP authentication.
    :param max_age: seconds a browser may cache a preflight answer.
    :param skip: ``skip(environ) -> bool``; True passes the request unchanged.

    Example::

        from oxypy import CORS, Forward
        app = CORS(
            Forward("http://127.0.0.1:9000"),
            allow_origins=["https://app.example.com"],
            allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization"],
            allow_credentials=True, max_age=600,
        )

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        allow_origins: Iterable[str],
        allow_methods: Iterable[str] = ("GET", "HEAD", "POST"),
        allow_headers: Iterable[str] = (),
        expose_headers: Iterable[str] = (),
        allow_credentials: bool = False,
        max_age: int | None = None,
        skip: Skip | None = None,
    ) -> None:
        if skip is not None and not callable(skip):
            raise ConfigurationError("skip must be a callable (environ) -> bool")
        if isinstance(allow_origins, str) or not isinstance(allow_origins, Iterable):
            raise ConfigurationError("allow_origins must be a list of origins, e.g. ['*']")
        origins = tuple(_origin(o) for o in allow_origins)
        if not origins:
            raise ConfigurationError("allow_origins must name at least one origin (or '*')")
        if not isinstance(allow_credentials, bool):
            raise ConfigurationError("allow_credentials must be True or False")
        methods = _names(allow_methods, "allow_methods", methods=True)
        headers = _names(allow_headers, "allow_headers")
        expose = _names(expose_headers, "expose_headers")
        if allow_credentials and "*" in expose:
            raise ConfigurationError(
                "expose_headers: '*' is ignored by browsers on credentialed requests; "
                "list the header names"
            )
        if max_age is not None and (
            not isinstance(max_age, int) or isinstance(max_age, bool) or max_age < 0
        ):
            raise ConfigurationError(f"max_age must be an integer >= 0 or None, got {max_age!r}")
        self.next_app = next_app
        self.skip = skip
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.credentials = allow_credentials
        #: ``*`` is answered literally only without credentials; then nothing depends on Origin.
        self.literal_star = self.any_origin and not allow_credentials
        self.vary_origin = not self.literal_star
        self.any_method = "*" in methods
        self.methods = frozenset(methods)
        self.methods_value = ", ".join(m for m in methods if m != "*")
        self.any_header = "*" in headers
        self.headers = frozenset(h.lower() for h in headers) | _SAFELISTED
        extra: list[tuple[str, str]] = []
        if allow_credentials:
            extra.append((ALLOW_CREDENTIALS, "true"))
        self.preflight_extra = tuple(extra) + (
            ((MAX_AGE, str(max_age)),) if max_age is not None else ()
        )
        if expose:
            extra.append((EXPOSE_HEADERS, ", ".join(expose)))
        self.actual_extra = tuple(extra)
        self.preflight_vary = (("Origin",) if self.vary_origin else ()) + _PREFLIGHT_VARY

    def allows_origin(self, origin: str) -> bool:
        """True when ``origin`` (the request's ``Origin`` value) is allowed."""
        return self.any_origin or origin in self.origins

    # -- preflight ----------------------------------------------------------------
    def _preflight(
        self, environ: WSGIEnvironment, origin: str, start_response: StartResponse
    ) -> Iterable[bytes]:
        method = environ["HTTP_ACCESS_CONTROL_REQUEST_METHOD"].strip()
        requested = [
            h.strip().lower()
            for h in environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "").split(",")
            if h.strip()
        ]
        headers: list[tuple[str, str]] = [("Vary", ", ".join(self.preflight_vary))]
        allowed = (
            self.allows_origin(origin)
            and is_field_name(method)
            and (self.any_method or method.upper() in self.methods)
            and all(is_field_name(h) for h in requested)
            and (self.any_header or all(h in self.headers for h in requested))
        )
        if allowed:
            headers.append((ALLOW_ORIGIN, "*" if self.literal_star else origin))
            headers.append((ALLOW_METHODS, method if self.any_method else self.methods_value))
            if requested:
                headers.append((ALLOW_HEADERS, ", ".join(requested)))
            headers.extend(self.preflight_extra)
        start_response("204 No Content", headers)
        return []

    # -- actual requests ----------------------------------------------------------
    def _label(self, origin: str | None, start_response: StartResponse) -> StartResponse:
        add: tuple[tuple[str, str], ...] = ()
        if origin is not None and self.allows_origin(origin):
            add = ((ALLOW_ORIGIN, "*" if self.literal_star else origin),) + self.actual_extra
        vary = self.vary_origin

        def cors_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            # A new list: the app's own list is never mutated.
            headers = [h for h in headers if origin is None or h[0].lower() not in _OWNED]
            headers.extend(add)
            if vary:
                headers = merge_vary(headers, "Origin")
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        return cors_start_response

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            if not self.vary_origin or (self.skip is not None and self.skip(environ)):
                return self.next_app(environ, start_response)
            return self.next_app(environ, self._label(None, start_response))
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        if (
            environ.get("REQUEST_METHOD") == "OPTIONS"
            and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ
        ):
            return self._preflight(environ, origin, start_response)
        return self.next_app(environ, self._label(origin, start_response))
