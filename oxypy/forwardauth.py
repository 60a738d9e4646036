"""ForwardAuth: ask an authentication service before letting a request through.

Traefik's ``forwardAuth`` and Caddy's ``forward_auth``: for each request the
block asks the auth service (a URL, over ``Forward``'s pooled client, or a
WSGI app in the same process, with no network hop) with a body-less ``GET``
that carries the client's headers and where the request was going.  A 2xx
answer lets the request through; any other answer goes back to the client
as the auth service sent it, and the next app never sees the request.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from typing import Any

from . import environ as keys
from ._client.request_head import request_target
from ._core.headers import (
    FORWARDING_ENVIRON,
    HOP_BY_HOP,
    HOP_BY_HOP_ENVIRON,
    header_to_environ,
    is_field_name,
)
from ._core.net import TrustedProxies, normalize_ip
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from ._core.urls import parse_target_url
from .errors import ErrorHandler, default_error_handler, respond_error
from .exceptions import ConfigurationError, RequestError, UpstreamError
from .forward import Forward

__all__ = ["AuthUnavailable", "ForwardAuth"]

log = logging.getLogger(__name__)

#: A granted answer's body is read (so its connection is reused) up to this
#: many bytes, then dropped with the connection.
MAX_GRANT_BODY = 64 * 1024

#: Request environ keys never copied to the auth request: it has no body and
#: is never an upgrade.
_BODY_KEYS = HOP_BY_HOP_ENVIRON | {"CONTENT_LENGTH", "HTTP_CONTENT_LENGTH", "HTTP_EXPECT"}
#: What the block sets itself (a client's values are replaced).
_OWN_KEYS = ("HTTP_X_FORWARDED_METHOD", "HTTP_X_FORWARDED_URI")


class AuthUnavailable(UpstreamError):
    """The auth service could not be reached or did not answer properly (502)."""

    status = 502
    reason = "authentication service unavailable"


class _Captured:
    """The auth answer's head, as ``start_response`` received it."""

    __slots__ = ("status", "headers")

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []


def _original_uri(environ: WSGIEnvironment) -> str:
    return request_target(environ, "")


def _client_host(environ: WSGIEnvironment) -> str:
    host = environ.get("HTTP_HOST")
    if host:
        return str(host)
    name, port = environ.get("SERVER_NAME", ""), environ.get("SERVER_PORT", "")
    return f"{name}:{port}" if port else str(name)


class ForwardAuth:
    """Let a request through only when the auth service answers 2xx.

    The auth service gets a ``GET`` with no body carrying the request's
    headers (``request_headers``: all of them when None; hop-by-hop and body
    framing fields never) plus ``X-Forwarded-Method`` (the request's method)
    and ``X-Forwarded-Uri`` (its path and query, as received), always set by
    this block.  With a URL, ``Forward`` sends it to the URL's path and query
    with its usual forwarding headers: ``X-Forwarded-Host`` (the client's
    ``Host``), ``X-Forwarded-Proto``, ``-Port``, ``-For`` and ``X-Real-Ip``,
    believed from the client only under ``trusted_proxies``.  A WSGI app gets
    an environ with the same headers, the request's path and query, and
    ``REQUEST_METHOD`` ``GET``.

    * **2xx**: the request goes on to the next app.  Each of
      ``response_headers`` is copied from the auth answer onto the request
      environ (``X-User`` → ``HTTP_X_USER``, several values joined by ``, ``);
      one the answer lacks is *removed* from the request, so a client cannot
      forge it.  The answer's body is discarded.
    * **anything else** (401, 403, a 302 to a login page, a 500...) is
      returned to the client as the auth service sent it: status, headers
      (hop-by-hop fields removed) and body, streamed.  The next app never
      sees the request.
    * **auth unreachable** (refused, reset, timed out, invalid answer): 502
      with a short plain-text body through ``error_handler``
      (:class:`AuthUnavailable`, also set as ``oxypy.error``).  An exception
      raised by an in-process auth app is a bug and propagates.

    :param auth: the auth service: an ``http(s)://`` URL (path and query kept)
        or a WSGI application (positional).
    :param request_headers: names of the request headers sent to the auth
        service; None (default) sends all of them.
    :param response_headers: names of the auth answer's headers copied onto
        the request on success (and removed from it when the answer lacks them).
    :param trusted_proxies: CIDRs whose forwarding headers are believed (as
        ``Forward``'s option); from other peers they are replaced.
    :param timeout: seconds to connect to and to wait on the auth service (URL
        auth only; default 10).
    :param error_handler: ``(environ, start_response, exc)`` answering the 502.
    :param skip: ``skip(environ) -> bool``; True passes the request unchecked.

    Example::

        from oxypy import Forward, ForwardAuth
        app = ForwardAuth(
            Forward("http://127.0.0.1:9000"), "http://127.0.0.1:9091/verify",
            request_headers=["Cookie", "Authorization"], response_headers=["X-User"],
        )

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        auth: str | WSGIApplication,
        /,
        *,
        request_headers: Iterable[str] | None = None,
        response_headers: Iterable[str] = (),
        trusted_proxies: Iterable[str] | None = None,
        timeout: float = 10.0,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
    ) -> None:
        if skip is not None and not callable(skip):
            raise ConfigurationError("skip must be a callable (environ) -> bool")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigurationError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.next_app = next_app
        self.error_handler = error_handler
        self.skip = skip
        self.request_keys = (
            None
            if request_headers is None
            else tuple(
                k
                for k in (header_to_environ(n) for n in _names(request_headers, "request_headers"))
                if k not in _BODY_KEYS
            )
        )
        names = _names(response_headers, "response_headers")
        for name in names:
            if name.lower() in HOP_BY_HOP or name.lower() in ("content-length", "host"):
                raise ConfigurationError(f"response_headers: {name!r} cannot be copied")
        self.response_headers = tuple((n.lower(), header_to_environ(n)) for n in names)
        proxies = None if trusted_proxies is None else list(trusted_proxies)
        self.trusted = TrustedProxies(proxies)
        self.auth_app: WSGIApplication
        self.auth_path = self.auth_query = None
        if isinstance(auth, str):
            target = parse_target_url(auth, what="auth", allow_query=True)
            origin = f"{target.scheme}://{target.shown_host}"
            if target.explicit_port is not None:
                origin += f":{target.explicit_port}"
            try:
                self.auth_app = Forward(
                    origin,
                    connect_timeout=timeout,
                    read_timeout=timeout,
                    trusted_proxies=proxies,
                    error_handler=self._unreachable,
                )
            except ConfigurationError as exc:
                raise ConfigurationError(f"auth: invalid URL {auth!r}: {exc}") from exc
            self.auth_path = target.path or "/"
            self.auth_query = target.query
        elif callable(auth):
            self.auth_app = auth
        else:
            raise ConfigurationError("auth must be an http(s):// URL or a WSGI application")
        self.auth = auth

    def close(self) -> None:
        """Close the pooled connections to a URL auth service."""
        if isinstance(self.auth_app, Forward):
            self.auth_app.close()

    @staticmethod
    def _unreachable(
        environ: WSGIEnvironment, start_response: StartResponse, exc: RequestError
    ) -> Iterable[bytes]:
        # Forward's error hook: remember the failure; the client gets our 502.
        environ[keys.FORWARDAUTH_FAILURE] = exc
        start_response("502 Bad Gateway", [("Content-Length", "0")])
        return []

    def auth_environ(self, environ: WSGIEnvironment) -> WSGIEnvironment:
        """The environ of the auth request for the request ``environ``."""
        sub: WSGIEnvironment = {
            k: environ[k]
            for k in (
                "SERVER_NAME",
                "SERVER_PORT",
                "SERVER_PROTOCOL",
                "REMOTE_ADDR",
                "REMOTE_PORT",
                "wsgi.url_scheme",
                "wsgi.errors",
                "wsgi.version",
                "wsgi.multithread",
                "wsgi.multiprocess",
                "wsgi.run_once",
            )
            if k in environ
        }
        sub["REQUEST_METHOD"] = "GET"
        sub["wsgi.input"] = io.BytesIO(b"")
        if self.request_keys is None:
            for key, value in environ.items():
                if (key[:5] == "HTTP_" or key == "CONTENT_TYPE") and key not in _BODY_KEYS:
                    sub[key] = value
        else:
            for key in self.request_keys:
                if key in environ:
                    sub[key] = environ[key]
        if "HTTP_HOST" in environ:
            sub["HTTP_HOST"] = environ["HTTP_HOST"]  # the source of X-Forwarded-Host
        sub[_OWN_KEYS[0]] = environ.get("REQUEST_METHOD", "GET")
        sub[_OWN_KEYS[1]] = _original_uri(environ)
        if self.auth_path is not None:
            sub["SCRIPT_NAME"] = ""
            sub["PATH_INFO"] = self.auth_path
            sub["QUERY_STRING"] = self.auth_query or ""
            sub["RAW_URI"] = self.auth_path + ("?" + self.auth_query if self.auth_query else "")
        else:
            for key in ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "RAW_URI", "REQUEST_URI"):
                if key in environ:
                    sub[key] = environ[key]
            # What Forward would send a URL auth service: forwarding headers
            # from an untrusted peer are replaced, never believed.
            if not self.trusted.trusts(environ.get("REMOTE_ADDR")):
                for key in FORWARDING_ENVIRON:
                    sub.pop(key, None)
            peer = normalize_ip(environ.get("REMOTE_ADDR")) or ""
            xff = environ.get("HTTP_X_FORWARDED_FOR")
            sub["HTTP_X_FORWARDED_FOR"] = f"{xff}, {peer}" if xff else peer
            sub.setdefault("HTTP_X_FORWARDED_HOST", _client_host(environ))
            sub.setdefault("HTTP_X_FORWARDED_PROTO", environ.get("wsgi.url_scheme", "http"))
        return sub

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        sub = self.auth_environ(environ)
        head = _Captured()

        def auth_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            head.status, head.headers = status, list(headers)
            return _no_write

        body = self.auth_app(sub, auth_start_response)
        failure = sub.get(keys.FORWARDAUTH_FAILURE)
        if failure is None:
            # Read up to the first body byte before deciding: a lazy app calls
            # start_response only then, and an auth service failing before
            # its first byte is "unreachable" (Forward's hook records it).
            chunks = iter(body)
            first = b""
            try:
                first = next(chunks, b"")
            except UpstreamError as broken:
                failure = broken
            else:
                failure = sub.get(keys.FORWARDAUTH_FAILURE)
            body = _Prepended(first, chunks, body)
        if failure is None and not head.status:
            _close(body)
            raise RuntimeError("ForwardAuth: the auth app returned without start_response")
        if failure is None and head.status[:1] == "2":
            try:
                _drain(body)
            except UpstreamError as broken:  # the grant's body broke off
                failure = broken
            else:
                failure = sub.get(keys.FORWARDAUTH_FAILURE)
            if failure is None:
                self._grant(environ, head.headers)
                return self.next_app(environ, start_response)
        if failure is not None:
            _close(body)
            error = AuthUnavailable(target=self.auth if isinstance(self.auth, str) else None)
            error.__cause__ = failure
            return respond_error(self.error_handler, environ, start_response, error)
        headers = [(n, v) for n, v in head.headers if n.lower() not in HOP_BY_HOP]
        try:
            start_response(head.status, headers)
        except BaseException:
            _close(body)
            raise
        return body

    def _grant(self, environ: WSGIEnvironment, headers: list[tuple[str, str]]) -> None:
        for lower, key in self.response_headers:
            values = [v for n, v in headers if n.lower() == lower]
            if values:
                environ[key] = ", ".join(values)
            else:
                environ.pop(key, None)


def _drain(body: Iterable[bytes]) -> None:
    """Read a granted answer's body (so its connection is reused), then close it."""
    try:
        seen = 0
        for chunk in body:
            seen += len(chunk)
            if seen > MAX_GRANT_BODY:
                break
    finally:
        _close(body)


def _names(values: Iterable[str], option: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ConfigurationError(f"{option} must be a list of header names, not a string")
    out = tuple(values)
    for name in out:
        if not is_field_name(name):
            raise ConfigurationError(f"{option}: invalid header name {name!r}")
    return out


def _no_write(data: bytes) -> object:
    raise RuntimeError("ForwardAuth: the auth app must return its body, not write() it")


def _close(body: Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


class _Prepended:
    """``first`` then the rest of ``chunks``; ``close()`` closes ``original``."""

    __slots__ = ("first", "chunks", "original")

    def __init__(self, first: bytes, chunks: Iterable[bytes], original: Iterable[bytes]) -> None:
        self.first = first
        self.chunks = chunks
        self.original = original

    def __iter__(self) -> Any:
        if self.first:
            yield self.first
        yield from self.chunks

    def close(self) -> None:
        _close(self.original)
