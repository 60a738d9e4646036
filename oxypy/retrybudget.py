"""RetryBudget: cap the extra load retries and hedges put on the upstreams.

During an outage every failed request that is retried adds another request
to the servers that are already failing.  A budget allows retries only while
the retries of the last ``window`` seconds stay under ``percent`` % of the
requests of the same window (with a floor of ``min_per_second`` retries a
second, so a quiet service can still retry), as Envoy's retry budgets do.
One budget may be shared by several blocks, threads and greenlets.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from . import environ as keys
from ._core.checks import finite_number
from ._core.snapshot import BlockSnapshot
from ._core.types import Clock, WSGIEnvironment
from .rolling import RollingCounter

__all__ = ["BudgetState", "RetryBudget"]

_BUCKETS = 10


@dataclass(frozen=True)
class BudgetState:
    """A snapshot of a :class:`RetryBudget` (what its metrics export).

    ``requests``/``retries`` count the rolling window; the ``*_total``
    fields count since the budget was created.
    """

    requests: int
    retries: int
    limit: float
    requests_total: int
    retries_total: int
    refused_total: int


class RetryBudget:
    """Allow a retry only while retries stay under a share of the requests.

    A block that may retry (:class:`~oxypy.Buffer` with ``retry_budget=``,
    :class:`~oxypy.Hedge` with ``retry_budget=``) calls :meth:`request` once
    per client request and :meth:`try_retry` before each retry or hedge.  A
    retry is allowed while the retries counted in the last ``window`` seconds
    are fewer than ``max(percent / 100 × requests in the window,
    min_per_second × window)``.  Retries are not counted as requests, and a
    refused retry is not counted as a retry (it is counted as refused).  When
    the budget refuses, the block does not retry: the failure passes through
    to the client as it is.

    The window is rolling (:class:`~oxypy.rolling.RollingCounter`, ten slots).
    All state sits behind one lock, so one budget may be shared by several
    blocks (a request passing through two of them is counted once: the
    budget marks the environ in ``oxypy.retry_budgets``).  The budget is per
    process; its state is exported by
    :class:`~oxypy.prometheus.RetryBudgetMetrics`.

    :param percent: retries allowed, in % of the requests in the window (>= 0).
    :param min_per_second: retries a second always allowed (>= 0), so a
        service with little traffic still retries.
    :param window: seconds the counts cover (> 0).
    :param clock: monotonic clock in seconds (tests inject one).

    Example::

        from oxypy import Buffer, Forward, RetryBudget, RoundRobin
        budget = RetryBudget(percent=20.0)
        lb = RoundRobin(Forward(), ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
        app = Buffer(lb, retry="IsNetworkError() && Attempts() < 4", retry_budget=budget)

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        percent: float = 20.0,
        *,
        min_per_second: float = 3.0,
        window: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.percent = finite_number("percent", percent)
        self.min_per_second = finite_number("min_per_second", min_per_second)
        self.window = finite_number("window", window, positive=True)
        self._floor = self.min_per_second * self.window
        resolution = self.window / _BUCKETS
        self._requests = RollingCounter(_BUCKETS, resolution, clock=clock)
        self._retries = RollingCounter(_BUCKETS, resolution, clock=clock)
        self._lock = threading.Lock()
        self._requests_total = 0
        self._retries_total = 0
        self._refused_total = 0

    def request(self, environ: WSGIEnvironment | None = None) -> None:
        """Count one client request (once per environ when one is given)."""
        if environ is not None:
            seen = environ.get(keys.RETRY_BUDGETS)
            if seen is None:
                seen = environ[keys.RETRY_BUDGETS] = set()
            if id(self) in seen:
                return
            seen.add(id(self))
        with self._lock:
            self._requests.inc()
            self._requests_total += 1

    def try_retry(self) -> bool:
        """True (and the retry is counted) when the budget allows one more retry."""
        with self._lock:
            limit = max(self.percent / 100.0 * self._requests.count(), self._floor)
            if self._retries.count() < limit:
                self._retries.inc()
                self._retries_total += 1
                return True
            self._refused_total += 1
            return False

    def state(self) -> BudgetState:
        """The window's counts, the current limit and the running totals."""
        with self._lock:
            requests = self._requests.count()
            return BudgetState(
                requests=requests,
                retries=self._retries.count(),
                limit=max(self.percent / 100.0 * requests, self._floor),
                requests_total=self._requests_total,
                retries_total=self._retries_total,
                refused_total=self._refused_total,
            )

    def snapshot(self) -> BlockSnapshot:
        """:meth:`state` as a status-page record (``kind`` ``"RetryBudget"``).

        .. versionadded:: 0.3
        """
        state = self.state()
        return {
            "kind": "RetryBudget",
            "percent": self.percent,
            "window": self.window,
            "requests": state.requests,
            "retries": state.retries,
            "limit": round(state.limit, 2),
            "refused": state.refused_total,
        }

    def __repr__(self) -> str:
        return (
            f"RetryBudget(percent={self.percent}, min_per_second={self.min_per_second}, "
            f"window={self.window})"
        )
