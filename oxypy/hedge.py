"""Hedge: send a slow idempotent request once more and take the first answer.

When no response head has arrived ``delay`` seconds after a request was
sent, the same request is sent again (to another server when a balancer is
below), and the first response head wins; the other attempts are cancelled
and their upstream connections closed.  This cuts the tail latency a few
slow servers or slow requests cause, at the price of a few extra requests.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
from gevent.event import Event

from . import environ as keys
from ._core.checks import finite_number
from ._core.exchange import Exchange, exchange_log
from ._core.iterables import ClosingIterable
from ._core.snapshot import BlockSnapshot
from ._core.types import Clock, Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError, NoResponse
from .retrybudget import RetryBudget
from .rolling import RollingHistogram

__all__ = ["Hedge"]

log = logging.getLogger(__name__)

_QUANTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")
#: The derived delay's window is this many slots of a rolling histogram.
_SLOTS = 12
#: Seconds between two computations of a derived delay (at most).
_REFRESH = 1.0


class _DerivedDelay:
    """A hedge delay that follows a quantile of the observed head latency.

    Records each first attempt's time to its response head (a rolling
    histogram, one lock and one dict update per request) and computes the
    quantile from the window at most once per :data:`_REFRESH` seconds, so
    the request path never merges the window.
    """

    __slots__ = ("quantile", "low", "high", "fallback", "min_samples", "hist")

    def __init__(
        self,
        quantile: float,
        window: float,
        low: float,
        high: float,
        fallback: float,
        min_samples: int,
        clock: Clock,
    ) -> None:
        self.quantile = quantile
        self.low = low
        self.high = high
        self.fallback = fallback
        self.min_samples = min_samples
        self.hist = RollingHistogram(_SLOTS, window / _SLOTS, clock=clock)

    def compute(self) -> tuple[float, int]:
        """The delay the window gives now and the number of samples in it."""
        merged = self.hist.merged()
        if merged.total < self.min_samples:
            return self.fallback, merged.total
        seconds = merged.value_at_quantile(self.quantile) / 1e6
        return min(max(seconds, self.low), self.high), merged.total


def _derived(
    spec: str,
    window: float | None,
    low: float | None,
    high: float | None,
    fallback: float | None,
    min_samples: int | None,
    clock: Clock,
) -> _DerivedDelay:
    """The derived delay of a quantile ``delay``, its options checked (defaults filled in)."""
    window = 60.0 if window is None else finite_number("delay_window", window, positive=True)
    low = 0.005 if low is None else finite_number("min_delay", low, positive=True)
    high = 1.0 if high is None else finite_number("max_delay", high, positive=True)
    if low > high:
        raise ConfigurationError(f"min_delay ({low:g}) must not be above max_delay ({high:g})")
    fallback = (
        high if fallback is None else finite_number("fallback_delay", fallback, positive=True)
    )
    if min_samples is None:
        min_samples = 100
    elif isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ConfigurationError(f"min_samples must be an int >= 1, got {min_samples!r}")
    if not callable(clock):
        raise ConfigurationError("clock must be a callable returning seconds")
    return _DerivedDelay(_quantile(spec), window, low, high, fallback, min_samples, clock)


def _quantile(spec: str) -> float:
    match = _QUANTILE.fullmatch(spec.strip())
    value = float(match.group(1)) if match else 0.0
    if not 0 < value < 100:
        raise ConfigurationError(
            f'delay: expected seconds or a quantile such as "p95" (p1 to p99.9), got {spec!r}'
        )
    return value


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

    **A delay derived from the observed latency**: with ``delay="p95"`` (any
    quantile ``"p1"`` to ``"p99.9"``) the delay is that quantile of the time
    first attempts took to their response head over the last
    ``delay_window`` seconds, kept between ``min_delay`` and ``max_delay``
    and recomputed at most once a second (:attr:`current_delay`); while the
    window holds fewer than ``min_samples`` latencies the delay is
    ``fallback_delay``.  A first attempt that a hedge beat is recorded with
    the time it had waited (a lower bound, above the delay), so hedging does
    not pull the quantile down.  With ``"p95"`` about 5 % of requests are
    hedged whatever the upstream's latency is, as the slowest of them keep
    moving.  Requests that are not hedgeable (method, body) are not recorded.

    :param delay: seconds to wait for a response head before hedging (> 0),
        or a quantile of the observed head latency such as ``"p95"``.
    :param max_hedges: extra attempts at most (>= 1).
    :param methods: the methods that may be hedged (idempotent ones).
    :param retry_budget: a :class:`~oxypy.RetryBudget`; each hedge is a retry
        on it (a refused hedge is not sent).
    :param delay_window: seconds of latencies a quantile ``delay`` looks at
        (default 60).  This and the four options below only go with a
        quantile ``delay``.
    :param min_delay: the derived delay's floor, seconds (default 0.005).
    :param max_delay: the derived delay's ceiling, seconds (default 1.0).
    :param fallback_delay: the delay while fewer than ``min_samples``
        latencies are known (default ``max_delay``).
    :param min_samples: latencies the window must hold before the quantile
        is used (default 100).
    :param clock: monotonic clock in seconds (tests step it).
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
        delay: float | str,
        max_hedges: int = 1,
        methods: Iterable[str] = ("GET", "HEAD", "OPTIONS"),
        retry_budget: RetryBudget | None = None,
        delay_window: float | None = None,
        min_delay: float | None = None,
        max_delay: float | None = None,
        fallback_delay: float | None = None,
        min_samples: int | None = None,
        clock: Clock = time.monotonic,
        skip: Skip | None = None,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("Hedge needs the next WSGI app as first argument")
        derived = None
        if isinstance(delay, str):
            derived = _derived(
                delay, delay_window, min_delay, max_delay, fallback_delay, min_samples, clock
            )
        else:
            finite_number("delay", delay, positive=True)
            given = {
                "delay_window": delay_window,
                "min_delay": min_delay,
                "max_delay": max_delay,
                "fallback_delay": fallback_delay,
                "min_samples": min_samples,
            }
            extra = [name for name, value in given.items() if value is not None]
            if extra:
                raise ConfigurationError(
                    f'{", ".join(extra)}: only with a quantile delay (such as delay="p95")'
                )
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
        #: The delay as given: seconds, or a quantile such as ``"p95"``.
        self.delay: float | str = delay if derived is not None else float(delay)
        self._fixed = 0.0 if derived is not None else float(delay)
        self._derived_delay = derived
        self._clock = clock
        self._current = derived.fallback if derived is not None else self._fixed
        self._refresh_at = -float("inf")
        self._samples = 0
        self.max_hedges = max_hedges
        self.methods = names
        self.retry_budget = retry_budget
        self.skip = skip
        self._lock = threading.Lock()
        self.hedges = 0
        self.hedge_wins = 0
        self.refused = 0

    @property
    def current_delay(self) -> float:
        """The delay (seconds) a request arriving now waits before it is hedged.

        With a quantile ``delay``: the quantile of the window's first-attempt
        head latencies as last computed (at most a second ago), between
        ``min_delay`` and ``max_delay``; ``fallback_delay`` while the window
        holds fewer than ``min_samples``.
        """
        if self._derived_delay is None:
            return self._fixed
        now = self._clock()
        if now >= self._refresh_at:
            self._refresh(now)
        return self._current

    @property
    def samples(self) -> int:
        """First-attempt latencies in the window at the last computation (0 with a fixed delay)."""
        return self._samples

    def _refresh(self, now: float) -> None:
        assert self._derived_delay is not None
        self._refresh_at = now + _REFRESH
        self._current, self._samples = self._derived_delay.compute()

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

        derived = self._derived_delay
        if derived is None:
            delay = self._fixed
        else:
            started = self._clock()
            if started >= self._refresh_at:
                self._refresh(started)
            delay = self._current
        first_head: float | None = None
        winner: _Attempt | None = None
        try:
            launch()
            may_hedge = True
            finished = 0
            while winner is None:
                may_hedge = may_hedge and len(attempts) <= self.max_hedges
                if not race.finished:
                    race.event.clear()
                    race.event.wait(delay if may_hedge else None)
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
                    if derived is not None and attempt.number == 1:
                        first_head = self._clock() - started
                elif finished == len(attempts):
                    raise attempt.error  # every attempt failed: nothing left to wait for
        finally:
            self._cancel(attempts, winner)
        if derived is not None and attempts[0].error is None:
            # A first attempt a hedge beat is recorded at the time it had
            # waited: a lower bound of its latency, and above the delay, so
            # the quantiles up to the delay stay exact.
            latency = first_head if first_head is not None else self._clock() - started
            derived.hist.record(int(latency * 1e6))
        if winner.number > 1:
            with self._lock:
                self.hedge_wins += 1
        outer_log.extend(winner.log)
        start_response(winner.status or "502 Bad Gateway", winner.headers)
        return ClosingIterable(_chain(winner.first, winner.iterator or iter(())), winner.close)

    def snapshot(self) -> BlockSnapshot:
        """``{"kind", "delay", "max_hedges", "hedges", "hedge_wins", "refused"}``
        (counts since creation) for the status page; with a quantile ``delay``
        also ``current_delay`` (seconds) and ``samples``.

        .. versionadded:: 0.3
        """
        with self._lock:
            counts = (self.hedges, self.hedge_wins, self.refused)
        snap: BlockSnapshot = {
            "kind": "Hedge",
            "delay": self.delay,
            "max_hedges": self.max_hedges,
            "hedges": counts[0],
            "hedge_wins": counts[1],
            "refused": counts[2],
        }
        if self._derived_delay is not None:  # "delay" is a quantile such as "p95"
            snap["current_delay"] = self.current_delay
            snap["samples"] = self._samples
        return snap

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
