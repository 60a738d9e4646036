"""Router: send each request to an app chosen by host and path prefix.

A small alternative to werkzeug's ``DispatcherMiddleware`` that also matches
the ``Host`` header and can strip the mount prefix before proxying.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._core.deprecation import keyword_only_since
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .errors import ErrorHandler, default_error_handler, respond_error
from .exceptions import ConfigurationError, RequestError
from .rewrite import Rewrite

__all__ = ["Router"]

Route = (
    tuple[str | None, str, WSGIApplication]
    | tuple[str | None, str, WSGIApplication, Mapping[str, Any]]
)

_MATCH_KEYS = ("methods", "headers", "strip")


class _Compiled:
    __slots__ = ("host", "wildcard", "prefix", "app", "mounted", "methods", "headers")

    def __init__(
        self,
        host: str | None,
        prefix: str,
        app: WSGIApplication,
        strip: bool,
        match: Mapping[str, Any] | None = None,
    ) -> None:
        self.methods: frozenset[str] | None = None
        self.headers: tuple[tuple[str, str], ...] = ()
        if match is not None:
            unknown = sorted(set(match) - set(_MATCH_KEYS))
            if unknown:
                raise ConfigurationError(
                    f"Router: unknown route match key {unknown[0]!r} "
                    f"(expected {', '.join(_MATCH_KEYS)})"
                )
            methods = match.get("methods")
            if methods is not None:
                if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
                    raise ConfigurationError("Router: methods must be a list of strings")
                self.methods = frozenset(m.upper() for m in methods)
                if not self.methods:
                    raise ConfigurationError("Router: methods must not be empty")
            headers = match.get("headers")
            if headers is not None:
                if not isinstance(headers, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) and k for k, v in headers.items()
                ):
                    raise ConfigurationError("Router: headers must map names to string values")
                self.headers = tuple((_environ_key(name), value) for name, value in headers.items())
            if "strip" in match:
                if not isinstance(match["strip"], bool):
                    raise ConfigurationError("Router: strip must be true or false")
                strip = match["strip"]
        self.wildcard = False
        if host is not None:
            host = host.strip().lower()
            if host.startswith("*."):
                self.wildcard = True
                host = host[1:]  # ".example.com"
            if not host or "/" in host or " " in host:
                raise ConfigurationError(f"Router: invalid host pattern {host!r}")
        self.host = host
        if not prefix.startswith("/"):
            raise ConfigurationError(f"Router: path prefix must start with '/': {prefix!r}")
        self.prefix = prefix.rstrip("/")
        self.app = app
        # strip: remove the prefix from the path entirely (the upstream sees
        # the rest); otherwise move it to SCRIPT_NAME, as WSGI mounting does.
        self.mounted = strip and bool(self.prefix)
        if self.mounted:
            self.app = Rewrite(app, strip_prefix=self.prefix)

    def matches_host(self, host: str) -> bool:
        if self.host is None:
            return True
        if self.wildcard:
            return host.endswith(self.host) and len(host) > len(self.host)
        return host == self.host

    def matches_path(self, path: str) -> bool:
        return not self.prefix or path == self.prefix or path.startswith(self.prefix + "/")

    def matches_request(self, environ: WSGIEnvironment) -> bool:
        if self.methods is not None and environ.get("REQUEST_METHOD", "") not in self.methods:
            return False
        return all(environ.get(key) == value for key, value in self.headers)

    @property
    def conditional(self) -> bool:
        return self.methods is not None or bool(self.headers)

    @property
    def specificity(self) -> int:
        """How many conditions the route has (a method set counts one, each header one)."""
        return (self.methods is not None) + len(self.headers)


def _environ_key(name: str) -> str:
    key = name.strip().upper().replace("-", "_")
    if not key or " " in key or ":" in key:
        raise ConfigurationError(f"Router: invalid header name {name!r}")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def _request_host(environ: WSGIEnvironment) -> str:
    host = str(environ.get("HTTP_HOST") or environ.get("SERVER_NAME") or "").lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


class Router:
    """Dispatch to the app of the most specific matching route.

    A route is ``(host, path_prefix, app)``: ``host`` is an exact name
    (``"api.example.com"``, port ignored), a wildcard (``"*.example.com"``
    matches one or more labels in front) or None for any host;
    ``path_prefix`` matches at a segment boundary (``"/api"`` matches
    ``/api`` and ``/api/x``, not ``/apix``; ``"/"`` matches everything).
    Exact-host routes are tried first, then wildcard-host routes, then
    host-less ones; within each group the longest prefix wins, then the
    route with more conditions (a method list counts one, each header one),
    then the order given.

    A route may carry a fourth element, a mapping of conditions and options:
    ``"methods"`` (request methods, any of which matches), ``"headers"``
    (header name -> exact value; every one must match; a header sent
    several times is compared as the server joined it) and ``"strip"``
    (this route's own ``strip``, overriding the router's).  A request whose
    host and path match but whose method or headers do not goes on to the
    next candidate route.

    By default the prefix moves from ``PATH_INFO`` to ``SCRIPT_NAME`` (WSGI
    mounting, as ``DispatcherMiddleware`` does); since ``Forward`` sends
    ``SCRIPT_NAME + PATH_INFO``, the upstream still sees the full path.  With
    ``strip=True`` the prefix is removed from the path and the raw URI (via
    :class:`~oxypy.Rewrite`), so ``/api/x`` reaches the upstream as ``/x``.

    No matching route and no ``default``: 404 through ``error_handler``.

    :param routes: a sequence of ``(host_or_None, path_prefix, app)`` or
        ``(host_or_None, path_prefix, app, conditions)``.
    :param default: the app for requests no route matches (keyword-only).
    :param strip: remove route prefixes instead of mounting them.
    :param error_handler: answers the 404.
    :param skip: ``skip(environ) -> bool``; True sends the request to
        ``default`` (404 without one), whatever the routes say: ``default`` is
        the router's "next app".

    Example::

        from oxypy import Forward
        from oxypy.router import Router
        app = Router([("api.example.com", "/", Forward("http://127.0.0.1:9001")),
                      (None, "/static", Forward("http://127.0.0.1:9002"))], strip=True)

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``default`` is keyword-only (positional use warns); ``skip`` added.
    .. versionchanged:: 0.2
       A route's optional fourth element: ``methods``, ``headers``, ``strip``.
    """

    @keyword_only_since("0.2", "default")
    def __init__(
        self,
        routes: Sequence[Route],
        /,
        *,
        default: WSGIApplication | None = None,
        strip: bool = False,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
    ) -> None:
        compiled = []
        for route in routes:
            if not (isinstance(route, tuple) and len(route) in (3, 4) and callable(route[2])) or (
                len(route) == 4 and not isinstance(route[3], Mapping)
            ):
                raise ConfigurationError(
                    "Router: each route is (host_or_None, prefix, app[, conditions])"
                )
            host, prefix, app = route[0], route[1], route[2]
            if not isinstance(prefix, str) or not (host is None or isinstance(host, str)):
                raise ConfigurationError("Router: host and prefix must be strings")
            match = route[3] if len(route) == 4 else None
            compiled.append(_Compiled(host, prefix, app, strip, match))
        if not compiled and default is None:
            raise ConfigurationError("Router needs routes or a default app")
        # Stable sort: exact hosts, wildcard hosts, any host; then longer
        # prefixes; then routes with more conditions; then the order given.
        compiled.sort(key=lambda r: (r.host is None, r.wildcard, -len(r.prefix), -r.specificity))
        self.routes = compiled
        self.default = default
        self.error_handler = error_handler
        self.skip = skip

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self._fallthrough(environ, start_response)
        host = _request_host(environ)
        path = environ.get("PATH_INFO", "")
        for route in self.routes:
            if (
                route.matches_host(host)
                and route.matches_path(path)
                and (not route.conditional or route.matches_request(environ))
            ):
                if route.prefix and not route.mounted:
                    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + route.prefix
                    environ["PATH_INFO"] = path[len(route.prefix) :]
                return route.app(environ, start_response)
        return self._fallthrough(environ, start_response)

    def _fallthrough(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        if self.default is not None:
            return self.default(environ, start_response)
        exc = RequestError("no route for this request", status=404)
        return respond_error(self.error_handler, environ, start_response, exc)
