"""Hedge: send a slow idempotent request once more and take the first answer.

When no response head has arrived ``delay`` seconds after a request was
sent, the same request is sent again (to another server when a balancer is
below), and the first response head wins; the other attempts are cancelled
and their upstream connections closed.  This cuts the tail latency a few
slow servers or slow requests cause, at the price of a few extra requests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
from gevent.event import Event

from . import environ as keys
from ._core.checks import finite_number
from ._core.exchange import Exchange, exchange_log
from ._core.iterables import ClosingIterable
from ._core.snapshot import BlockSnapshot
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError, NoResponse
from .retrybudget import RetryBudget

__all__ = ["Hedge"]

log = logging.getLogger(__name__)


class _Race:
    """What the request's greenlet waits on: attempts that finished, in order."""

    __slots__ = ("finished", "event")

    def __init__(self) -> None:
        self.finished: list[_Attempt] = []
        self.event = Event()

    def report(self, attempt: _Attempt) -> None:
        self.finished.append(attempt)
        self.event.set()


class _Attempt:
    """One send of the request, run in its own greenlet up to its response head."""

    __slots__ = (
        "number",
        "env",
        "log",
        "status",
        "headers",
        "result",
        "first",
        "iterator",
        "error",
        "greenlet",
        "closed",
        "cancelled",
    )

    def __init__(self, number: int, env: WSGIEnvironment) -> None:
        self.number = number
        self.env = env
        self.log: list[Exchange] = []
        env[keys.EXCHANGES] = self.log
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.result: Iterable[bytes] | None = None
        self.first: list[bytes] = []
        self.iterator: Iterator[bytes] | None = None
        self.error: BaseException | None = None
        self.greenlet: Any = None  # a raw greenlet (gevent.spawn_raw)
        self.closed = False
        self.cancelled = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if self.status is not None and not exc_info:
            raise RuntimeError("start_response called twice without exc_info")
        self.status, self.headers = status, headers

        def write(data: bytes) -> object:
            raise RuntimeError("Hedge does not support the WSGI write() callable")

        return write

    def run(self, app: WSGIApplication, race: _Race) -> None:
        try:
            self.result = app(self.env, self.start_response)
            iterator = iter(self.result)
            while self.status is None:
                chunk = next(iterator, None)
                if chunk is None:
                    break
                self.first.append(chunk)
            if self.status is None:
                raise NoResponse()
            self.iterator = iterator
        except gevent.GreenletExit:
            self.close()
            raise
        except BaseException as exc:  # reported to the request's greenlet, which re-raises
            self.close()
            self.error = exc
        if self.cancelled:  # lost while its head arrived: nobody will read it
            self.close()
            return
        race.report(self)

    def close(self) -> None:
        """Close the attempt's response (Forward then drops its connection)."""
        if self.closed:
            return
        self.closed = True
        close = getattr(self.result, "close", None)
        if close is not None:
            close()


def _hedgeable_body(environ: WSGIEnvironment) -> bool:
    """True when the request has no body (so it can be sent any number of times)."""
    return (
        environ.get("CONTENT_LENGTH") in (None, "", "0")
        and "HTTP_TRANSFER_ENCODING" not in environ
        and "HTTP_UPGRADE" not in environ
    )


class Hedge:
    """Send a request again when its response head is late; the first head wins.

    The first attempt is sent at once.  When no response head has arrived
    after ``delay`` seconds, another attempt of the same request is sent
    (up to ``max_hedges`` more, one every ``delay``), each in its own
    greenlet with its own copy of the environ.  The first attempt whose
    response head arrives is the one the client gets (its body streams); the
    others are cancelled: an attempt still waiting is killed and one that
    already has its head is closed, so Forward closes their upstream
    connections instead of reusing them.

    Only requests whose method is in ``methods`` and that have no body
    (``Content-Length`` absent or 0, no ``Transfer-Encoding``) and no
    ``Upgrade`` are hedged; others pass straight through.  A body buffered
    by a :class:`~oxypy.Buffer` above is still a body: such a request is not
    hedged.  Below a Buffer (``Buffer(Hedge(balancer))``) the bodiless GETs
    are hedged and every request is still retried by the Buffer.

    **Reads** the request method and framing headers.  **Writes**, on each
    attempt's copy: ``oxypy.tried_targets`` (a set shared by every attempt,
    created when absent, so a balancer below sends a hedge to a server not
    tried yet) and a private ``oxypy.exchanges`` list; only the winning
    attempt's exchanges are added to the client request's
    ``oxypy.exchanges`` (a cancelled attempt is not an upstream failure).
    Counts ``hedges`` (hedges sent), ``hedge_wins`` (client answered by a
    hedge) and ``refused`` (hedges the budget refused) on the instance.

    Failures: an attempt that raises (e.g. an app error) is ignored while
    another is still running; when every attempt failed, the last error
    propagates.  A response head is a response: a 502 that comes first wins
    (put a :class:`~oxypy.Buffer` with a retry predicate above to retry it).

    :param delay: seconds to wait for a response head before hedging (> 0).
    :param max_hedges: extra attempts at most (>= 1).
    :param methods: the methods that may be hedged (idempotent ones).
    :param retry_budget: a :class:`~oxypy.RetryBudget`; each hedge is a retry
        on it (a refused hedge is not sent).
    :param skip: ``callable(environ) -> bool``; True passes the request straight on.

    Example::

        from oxypy import Forward, Hedge, RoundRobin, serve
        lb = RoundRobin(Forward(), ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
        app = Hedge(lb, delay=0.05)
        serve(app, "127.0.0.1:8080")

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        delay: float,
        max_hedges: int = 1,
        methods: Iterable[str] = ("GET", "HEAD", "OPTIONS"),
        retry_budget: RetryBudget | None = None,
        skip: Skip | None = None,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("Hedge needs the next WSGI app as first argument")
        finite_number("delay", delay, positive=True)
        if isinstance(max_hedges, bool) or not isinstance(max_hedges, int) or max_hedges < 1:
            raise ConfigurationError(f"max_hedges must be an int >= 1, got {max_hedges!r}")
        if isinstance(methods, str):
            raise ConfigurationError("methods must be a collection of method names, not a string")
        names = frozenset(str(m).upper() for m in methods)
        if not names:
            raise ConfigurationError("methods must name at least one method")
        if retry_budget is not None and not isinstance(retry_budget, RetryBudget):
            raise ConfigurationError("retry_budget must be a RetryBudget or None")
        self.next_app = next_app
        self.delay = float(delay)
        self.max_hedges = max_hedges
        self.methods = names
        self.retry_budget = retry_budget
        self.skip = skip
        self._lock = threading.Lock()
        self.hedges = 0
        self.hedge_wins = 0
        self.refused = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        if environ.get("REQUEST_METHOD") not in self.methods or not _hedgeable_body(environ):
            return self.next_app(environ, start_response)
        budget = self.retry_budget
        if budget is not None:
            budget.request(environ)
        environ.setdefault(keys.TRIED_TARGETS, set())
        outer_log = exchange_log(environ)
        race = _Race()
        attempts: list[_Attempt] = []

        def launch() -> None:
            attempt = _Attempt(len(attempts) + 1, dict(environ))
            attempts.append(attempt)
            # spawn_raw: a plain greenlet costs a third of a gevent.Greenlet.
            attempt.greenlet = gevent.spawn_raw(attempt.run, self.next_app, race)

        winner: _Attempt | None = None
        try:
            launch()
            may_hedge = True
            finished = 0
            while winner is None:
                may_hedge = may_hedge and len(attempts) <= self.max_hedges
                if not race.finished:
                    race.event.clear()
                    race.event.wait(self.delay if may_hedge else None)
                if not race.finished:  # the delay passed without a head: hedge
                    if budget is None or budget.try_retry():
                        launch()
                        with self._lock:
                            self.hedges += 1
                    else:
                        may_hedge = False
                        with self._lock:
                            self.refused += 1
                    continue
                attempt = race.finished.pop(0)
                finished += 1
                if attempt.error is None:
                    winner = attempt
                elif finished == len(attempts):
                    raise attempt.error  # every attempt failed: nothing left to wait for
        finally:
            self._cancel(attempts, winner)
        if winner.number > 1:
            with self._lock:
                self.hedge_wins += 1
        outer_log.extend(winner.log)
        start_response(winner.status or "502 Bad Gateway", winner.headers)
        return ClosingIterable(_chain(winner.first, winner.iterator or iter(())), winner.close)

    def snapshot(self) -> BlockSnapshot:
        """``{"kind", "delay", "max_hedges", "hedges", "hedge_wins", "refused"}``
        (counts since creation) for the status page.

        .. versionadded:: 0.3
        """
        with self._lock:
            counts = (self.hedges, self.hedge_wins, self.refused)
        return {
            "kind": "Hedge",
            "delay": self.delay,
            "max_hedges": self.max_hedges,
            "hedges": counts[0],
            "hedge_wins": counts[1],
            "refused": counts[2],
        }

    @staticmethod
    def _cancel(attempts: list[_Attempt], winner: _Attempt | None) -> None:
        losers = [a for a in attempts if a is not winner]
        for attempt in losers:
            attempt.cancelled = True
            if attempt.greenlet is not None and not attempt.greenlet.dead:
                # Delivered at the hub's next turn: the attempt closes its
                # response (and Forward its connection) as GreenletExit unwinds.
                gevent.kill(attempt.greenlet)
            else:
                attempt.close()
        if losers:
            log.debug("hedge: cancelled %d attempt(s)", len(losers))


def _chain(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest
