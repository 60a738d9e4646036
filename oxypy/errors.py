"""Turning oxypy errors into responses: the one place where that happens.

Every block that can fail takes ``error_handler=`` with the
:class:`ErrorHandler` signature; the default, :func:`default_error_handler`,
answers ``exc.status`` with a short plain-text body naming the cause.  No
traceback ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from . import environ as keys
from ._core.types import StartResponse, WSGIEnvironment
from .exceptions import RequestError

__all__ = ["ErrorHandler", "default_error_handler"]

log = logging.getLogger(__name__)


class ErrorHandler(Protocol):
    """``(environ, start_response, exc) -> body``: answer a request-time error."""

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse, exc: RequestError
    ) -> Iterable[bytes]: ...


def default_error_handler(
    environ: WSGIEnvironment, start_response: StartResponse, exc: RequestError
) -> Iterable[bytes]:
    """Answer ``exc.status`` with ``"<reason>\\n"`` as ``text/plain``."""
    body = (exc.reason + "\n").encode("utf-8", "replace")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ]
    headers.extend(exc.headers)
    start_response(exc.status_line, headers)
    if environ.get("REQUEST_METHOD") == "HEAD":
        return [b""]
    return [body]


def respond_error(
    handler: ErrorHandler,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    exc: RequestError,
) -> Iterable[bytes]:
    """Record ``exc`` on the environ and let ``handler`` answer it."""
    environ[keys.ERROR] = exc
    level = logging.WARNING if exc.status >= 500 else logging.INFO
    if log.isEnabledFor(level):
        cause = f" [{exc.__cause__!r}]" if exc.__cause__ is not None else ""
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
        log.log(level, "%s %s: %s%s", method, path, exc, cause)
    return handler(environ, start_response, exc)
