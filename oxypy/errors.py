"""Turning oxypy errors into responses: the one place where that happens.

Every block that can fail takes ``error_handler=`` with the
:class:`ErrorHandler` signature; the default, :func:`default_error_handler`,
answers ``exc.status`` with a short plain-text body naming the cause.  No
traceback ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from . import environ as keys
from ._core import telemetry
from ._core.types import StartResponse, WSGIEnvironment
from .exceptions import RequestError, UpstreamError

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
    """Record ``exc`` on the environ and let ``handler`` answer it.

    Under :class:`~oxypy.OpenTelemetry` an error other than an
    :class:`~oxypy.UpstreamError` is an event ``oxypy.<kind>`` on the
    request's SERVER span.
    """
    environ[keys.ERROR] = exc
    if keys.OTEL in environ and not isinstance(exc, UpstreamError):
        # Forward's own failures are on their CLIENT span; the rest are events.
        attributes: telemetry.Attributes = {
            telemetry.STATUS: exc.status,
            telemetry.REASON: exc.reason,
        }
        telemetry.note(environ, telemetry.EVENT_PREFIX + exc.kind, attributes)
    level = logging.WARNING if exc.status >= 500 else logging.INFO
    if log.isEnabledFor(level):
        cause = f" [{exc.__cause__!r}]" if exc.__cause__ is not None else ""
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
        log.log(level, "%s %s: %s%s", method, path, exc, cause)
    return handler(environ, start_response, exc)


def relay_or_answer(
    body: Iterable[bytes],
    handler: ErrorHandler,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    *,
    started: bool = False,
) -> Iterator[bytes]:
    """Relay ``body``; an oxypy error it raises before any byte went out is answered instead.

    Until the first non-empty chunk the server has not sent the response head,
    so a :class:`~oxypy.RequestError` (an upstream that failed before its
    first body byte) is answered through ``handler`` with its own status (502,
    504), replacing the head (``start_response`` with ``exc_info``), instead
    of the server's 500.  Once a byte went out (or ``started``) the error
    propagates: the server cuts the connection, so a truncated response is
    visibly truncated, never padded.  Closing the generator closes nothing
    else: the caller closes ``body``.
    """
    try:
        for chunk in body:
            if chunk:
                started = True
            yield chunk
    except RequestError as exc:
        if started:
            raise
        yield from respond_error(handler, environ, restarting(start_response, exc), exc)


def restarting(start_response: StartResponse, exc: BaseException) -> StartResponse:
    """A ``start_response`` that replaces a head not sent yet (passes ``exc`` as ``exc_info``).

    PEP 3333: a server that already sent the head re-raises ``exc`` instead.
    """
    exc_info: Any = (type(exc), exc, exc.__traceback__)

    def start(
        status: str, headers: list[tuple[str, str]], _: Any = None
    ) -> Callable[[bytes], object]:
        return start_response(status, headers, exc_info)

    return start
