"""Timeout: one deadline for everything below it.

Every try, retry, backoff and upstream wait below a ``Timeout`` shares one
deadline, carried as ``environ["oxypy.deadline"]`` (an absolute
``time.monotonic()`` value).  Blocks that know it cap their own waits
(``Forward``, ``Buffer``); an app that ignores it is interrupted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from gevent import getcurrent

from . import environ as keys
from ._core.exchange import settle_unfinished
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from ._core.watchdog import Interrupt, Watch, Watchdog, watchdog
from .errors import ErrorHandler, default_error_handler, respond_error, restarting
from .exceptions import ConfigurationError, DeadlineExceeded, RequestError

__all__ = ["Timeout"]

log = logging.getLogger(__name__)

#: How long after the deadline an app below is interrupted.  Blocks that read
#: the deadline (Forward) time out on their own at the deadline itself and
#: answer with their own, more precise, 504 and exchange record; the
#: interruption is the backstop for apps that do not.
GRACE = 0.01

_monotonic = time.monotonic
_INF = float("inf")


class Timeout:
    """Bound the whole request below this block by one deadline.

    **Writes** ``oxypy.deadline`` (absolute ``time.monotonic()`` seconds) on
    the environ it passes on; a deadline already set by an outer ``Timeout``
    is kept when it is earlier (nested Timeouts: the earlier deadline wins).
    ``Forward`` caps connect, send, the head wait and every body read at what
    remains; ``Buffer`` neither backs off nor retries once it has passed.

    A body that bounds itself by this deadline (``Forward``'s, when
    ``Forward`` is what returned it) is relayed as it is: it answers 504
    before its first byte and aborts after, as below.

    An app below that ignores the deadline is interrupted (a
    ``gevent.Timeout`` raised in it, shortly after the deadline) while it
    computes its head and while it produces each body chunk:

    - before any body byte went out: 504 with a plain-text body naming the
      cause (:class:`~oxypy.DeadlineExceeded`, Trace kind
      ``deadline_exceeded``; ``Forward``'s own expiry gives the same kind);
    - after: the exception propagates and the server aborts the client
      connection: the response is visibly truncated, never padded or
      completed with fake bytes.

    The interruption only works where the app waits cooperatively (gevent
    sockets, ``gevent.sleep``); a CPU-bound loop is not interrupted.  An app
    that catches ``BaseException`` may swallow the interruption.

    :param seconds: the deadline, in seconds from the request entering this
        block (positional; > 0).
    :param error_handler: ``(environ, start_response, exc)`` for the 504.
    :param skip: ``callable(environ) -> bool``; True passes the request on
        with no deadline of this block.

    Example::

        from oxypy import Buffer, Forward, RoundRobin, Timeout, serve
        lb = RoundRobin(Forward(), ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
        app = Timeout(Buffer(lb, retry="IsNetworkError() && Attempts() < 3",
                             per_try_timeout=0.5), 2.0)
        serve(app, "127.0.0.1:8080")

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        seconds: float,
        /,
        *,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("Timeout needs the next WSGI app as first argument")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not (0 < seconds < float("inf"))
        ):
            raise ConfigurationError("Timeout seconds must be a finite number > 0")
        self.next_app = next_app
        self.seconds = float(seconds)
        self.error_handler = error_handler
        self.skip = skip

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        now = _monotonic()
        deadline = now + self.seconds
        outer = environ.get(keys.DEADLINE)
        if outer is not None and outer < deadline:
            deadline = outer
        environ[keys.DEADLINE] = deadline
        if deadline <= now:
            return self._expired(environ, start_response, "before the request was passed on")
        dog = watchdog()
        at = deadline + GRACE
        body = _Bounded(at, getcurrent(), dog)
        watches = dog.watches
        watches.add(body)  # dog.register(body), inlined: this runs per request
        if at < dog.due:
            dog.arm(at)
        try:
            result = self.next_app(environ, start_response)
        except Interrupt as exc:
            if exc is not body.exc:
                raise
            return self._expired(environ, start_response, "before the response head")
        except BaseException:
            dog.remove(body)
            raise
        if type(result) is list or getattr(result, "bounded_until", _INF) <= deadline:
            # Complete already, or a body that honours this deadline itself
            # (Forward's: every read capped at it, no chunk handed out after
            # it, 504 before the first byte and an abort after, as here).
            body.armed = False  # dog.remove(body), inlined
            watches.discard(body)
            return result
        return body.relay(result, self, environ, start_response)

    def _expired(
        self, environ: WSGIEnvironment, start_response: StartResponse, when: str
    ) -> Iterable[bytes]:
        exc = self._error(environ, when)
        return respond_error(self.error_handler, environ, start_response, exc)

    def _error(self, environ: WSGIEnvironment, when: str) -> DeadlineExceeded:
        exc = DeadlineExceeded(f"request deadline of {self.seconds:g} s reached {when}")
        _blame(environ, exc)
        return exc


def _blame(environ: WSGIEnvironment, exc: RequestError) -> None:
    """Record ``exc`` on the upstream exchanges the interruption cut short.

    An exchange still in progress (not ended, no error) was interrupted: it
    ends with the deadline, not with a client that went away.
    """
    records = environ.get(keys.EXCHANGES)
    if records:
        settle_unfinished(records, exc)
    environ[keys.ERROR] = exc


class _Bounded(Watch):
    """The watch of one request below a Timeout, then its body.

    Armed while the app computes its head, then only while the app produces
    a chunk (``next``), so the interruption never lands in the server's own
    code between chunks; a deadline that passed meanwhile is noticed before
    the next chunk.
    """

    __slots__ = (
        "result",
        "iterator",
        "dog",
        "block",
        "environ",
        "start_response",
        "started",
        "answer",
        "_closed",
    )

    def __init__(self, at: float, glet: Any, dog: Watchdog) -> None:
        # Watch's fields, set here (one call less per request).
        self.at = at
        self.glet = glet
        self.exc = None
        self.armed = True
        self.dog = dog

    def relay(
        self,
        result: Iterable[bytes],
        block: Timeout,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> _Bounded:
        """Become the body of ``result`` (the app returned its head)."""
        self.armed = False
        self.block = block
        self.environ = environ
        self.start_response = start_response
        self.result = result
        self.iterator = iter(result)
        self.started = False
        self.answer: Iterator[bytes] | None = None
        self._closed = False
        return self

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.answer is not None:
            return next(self.answer)
        if _monotonic() >= self.at:
            return self._expire()
        self.armed = True
        try:
            chunk = next(self.iterator)
        except Interrupt as exc:
            if exc is not self.exc:
                self.armed = False
                raise
            return self._expire()
        except BaseException:
            self.armed = False
            raise
        self.armed = False
        if chunk:
            self.started = True
        return chunk

    def _expire(self) -> bytes:
        self.dog.remove(self)
        err = self.block._error(self.environ, "while the response was produced")
        if self.started:
            log.warning("aborting response: %s", err.reason)
            raise err
        start = restarting(self.start_response, err)
        self.answer = iter(respond_error(self.block.error_handler, self.environ, start, err))
        return next(self.answer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.dog.remove(self)
        close: Any = getattr(self.result, "close", None)
        if close is not None:
            close()
