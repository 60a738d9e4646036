"""Rebalancer: shift weight away from servers whose error ratio stands out.

oxy's algorithm on top of a balancer: each server has a meter (by default
the share of 500–504 answers over a 10 × 1 s rolling window); once every
meter is ready and the backoff has passed, servers whose rating is an
outlier (above (median + MAD) × 1.5, as ``memmetrics.SplitFloat64``) keep
their weight while the others' grow ×4 (capped at 4096); when no server
stands out any more, weights converge back ÷4 to their configured values.

Unlike oxy, the Rebalancer wraps the inner balancer instead of bypassing
it, so its sticky sessions, health checks and ejection still apply;
upserting a known server never duplicates it; meters are only touched
under the Rebalancer's lock; and time comes from an injected clock.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Protocol

from ._balance.address import parse_server
from ._balance.balancer import Balancer
from ._core.checks import finite_number
from ._core.exchange import Mark, mark, upstream_verdict
from ._core.iterables import ClosingIterable
from ._core.types import Clock, Skip, StartResponse, WSGIEnvironment
from .errors import ErrorHandler
from .exceptions import ConfigurationError
from .registry import RedisRegistry
from .rolling import RatioCounter

__all__ = ["Meter", "Rebalancer"]

MAX_WEIGHT = 4096
GROW_FACTOR = 4
SPLIT_THRESHOLD = 1.5


class Meter(Protocol):
    """Rates one server; called only under the Rebalancer's lock."""

    def rating(self) -> float: ...

    def record(self, status: int, latency: float) -> None: ...

    def is_ready(self) -> bool: ...


class CodeMeter:
    """oxy's default meter: the ratio of 500–504 answers over 10 × 1 s buckets."""

    __slots__ = ("_counter",)

    def __init__(self, clock: Clock = time.monotonic, buckets: int = 10, resolution: float = 1.0):
        self._counter = RatioCounter(buckets, resolution, clock=clock)

    def rating(self) -> float:
        return self._counter.ratio()

    def record(self, status: int, latency: float) -> None:
        if 500 <= status < 505:
            self._counter.inc_a()
        else:
            self._counter.inc_b()

    def is_ready(self) -> bool:
        return self._counter.is_ready()


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def split_float64(threshold: float, sentinel: float, values: Sequence[float]) -> set[int]:
    """Indexes of the outliers in ``values``: ``v > (median + MAD) × threshold``.

    As oxy's ``memmetrics.SplitFloat64``: with an even count, ``sentinel`` is
    added to the sample the median and MAD are taken from.
    """
    if not values:
        return set()
    sample = list(values)
    if len(sample) % 2 == 0:
        sample.append(sentinel)
    m = _median(sample)
    mad = _median([abs(v - m) for v in sample])
    limit = (m + mad) * threshold
    return {i for i, v in enumerate(values) if v > limit}


class _Record:
    __slots__ = ("url", "orig", "cur", "meter")

    def __init__(self, url: str, orig: int, meter: Meter) -> None:
        self.url = url
        self.orig = orig
        self.cur = orig
        self.meter = meter


class Rebalancer:
    """Adjust an inner balancer's weights from each server's error ratio.

    Wraps a :class:`~oxypy.RoundRobin` (or any balancer of this package):
    every request goes through the inner balancer, so its sticky cookies,
    health checks and ejection keep working.  After each response is closed,
    the exchanges ``Forward`` made below (``environ["oxypy.exchanges"]``) are
    recorded to the meter of their server (a network error counts with the
    502/504 Forward answered; a client that went away is not counted), then
    weights are adjusted at most once per ``backoff`` seconds.

    Servers are managed through the Rebalancer (:meth:`upsert_server`,
    :meth:`remove_server`), which records each one's configured weight; a
    change made directly on the inner balancer is noticed too.  Any change
    restores every server to its configured weight.

    :param round_robin: the balancer to drive (positional).
    :param backoff: seconds between two weight changes (default 10).
    :param meter: ``fn(url) -> Meter`` making a server's meter; default
        :class:`CodeMeter` on ``clock``.
    :param clock: monotonic seconds, for the backoff and the default meters.
    :param error_handler: deprecated and ignored (it never did anything: errors
        are answered by the inner balancer); passing it warns.
    :param skip: ``fn(environ) -> bool``; True passes the request to the
        inner balancer without metering it.
    :param registry: a :class:`~oxypy.RedisRegistry` for the inner balancer
        (as its own ``registry=``): the server set is shared by every process,
        the weight adjustments stay local to each.

    Example::

        from oxypy import Forward, Rebalancer, RoundRobin
        rb = Rebalancer(RoundRobin(Forward(), ["http://10.0.0.1", "http://10.0.0.2"]))

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        round_robin: Balancer,
        /,
        *,
        backoff: float = 10.0,
        meter: Callable[[str], Meter] | None = None,
        clock: Clock = time.monotonic,
        error_handler: ErrorHandler | None = None,
        skip: Skip | None = None,
        registry: RedisRegistry | None = None,
    ) -> None:
        if error_handler is not None:
            warnings.warn(
                "Rebalancer(error_handler=) does nothing and will be removed: errors are "
                "answered by the inner balancer's error_handler",
                DeprecationWarning,
                stacklevel=2,
            )
        if not isinstance(round_robin, Balancer):
            raise ConfigurationError("Rebalancer wraps an oxypy balancer (e.g. RoundRobin)")
        finite_number("backoff", backoff)
        if registry is not None:
            round_robin.follow_registry(registry)
        self.balancer = round_robin
        self.backoff = float(backoff)
        self.clock = clock
        self.skip = skip
        self._make_meter: Callable[[str], Meter] = meter or (lambda _url: CodeMeter(clock))
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}  # by identity, in pool order
        self._seen_version = -1
        self._timer = clock() - 1.0
        with self._lock:
            self._sync()

    # -- server management -------------------------------------------------------
    def upsert_server(self, url: str, weight: int = 1) -> None:
        """Add ``url`` or change its configured weight (never duplicated)."""
        self.balancer.upsert_server(url, weight)
        _, identity = parse_server(url)
        with self._lock:
            self._sync()
            record = self._records[identity]
            record.orig = weight
            self._reset()

    def remove_server(self, url: str) -> None:
        """Remove ``url`` (:class:`ConfigurationError` when unknown)."""
        self.balancer.remove_server(url)
        with self._lock:
            self._sync()
            self._reset()

    def servers(self) -> list[str]:
        return self.balancer.servers()

    def server_weight(self, url: str) -> int | None:
        """The weight in effect now (None when unknown)."""
        return self.balancer.server_weight(url)

    def close(self) -> None:
        """Close the inner balancer (stops its health checks)."""
        self.balancer.close()

    # -- internals (lock held) ---------------------------------------------------
    def _sync(self) -> None:
        """Follow the inner pool: new servers, removed ones, weights set directly."""
        pool = self.balancer.pool
        if pool.version == self._seen_version:
            return
        version, current = pool.members()
        records: dict[str, _Record] = {}
        changed = False
        for identity, url, weight in current:
            record = self._records.get(identity)
            if record is None:
                record = _Record(url, weight, self._make_meter(url))
                changed = True
            elif weight != record.cur:
                record.orig = record.cur = weight  # set on the inner balancer directly
                changed = True
            records[identity] = record
        changed = changed or len(records) != len(self._records)
        self._records = records
        self._seen_version = version
        if changed:
            self._reset()

    def _reset(self) -> None:
        for record in self._records.values():
            record.cur = record.orig
        self._apply()
        self._timer = self.clock() - 1.0

    def _apply(self) -> None:
        pool = self.balancer.pool
        for identity, record in self._records.items():
            pool.reweight(identity, record.cur)  # a server removed meanwhile stays removed
        self._seen_version = pool.version

    def _adjust(self, now: float) -> None:
        """oxy's ``adjustWeights``: grow the good, or converge back."""
        records = list(self._records.values())
        if len(records) < 2 or now <= self._timer:
            return
        if not all(r.meter.is_ready() for r in records):
            return
        bad = split_float64(SPLIT_THRESHOLD, 0.0, [r.meter.rating() for r in records])
        if bad and len(bad) < len(records):
            for i, record in enumerate(records):
                if i not in bad and record.cur * GROW_FACTOR <= MAX_WEIGHT:
                    record.cur *= GROW_FACTOR
        else:
            changed = False
            for record in records:
                if record.cur != record.orig:
                    record.cur = max(record.orig, record.cur // GROW_FACTOR)
                    changed = True
            if not changed:
                return
        divisor = 0
        for record in records:
            divisor = math.gcd(divisor, record.cur)
        if divisor > 1:
            for record in records:
                record.cur //= divisor
        self._apply()
        self._timer = now + self.backoff

    def _done(self, since: Mark) -> None:
        now = self.clock()
        with self._lock:
            self._sync()
            for ex in since.since():
                if upstream_verdict(ex) is None:
                    continue  # a client abort (or no answer at all) says nothing of the server
                try:
                    _, identity = parse_server(ex.target)
                except ConfigurationError:
                    continue
                record = self._records.get(identity)
                if record is None:
                    continue
                status = ex.error.status if ex.error is not None else ex.status
                ended = ex.ended if ex.ended is not None else time.monotonic()
                record.meter.record(status, max(0.0, ended - ex.started))
            self._adjust(now)

    # -- the WSGI application ----------------------------------------------------
    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.balancer(environ, start_response)
        done = partial(self._done, mark(environ))
        try:
            result = self.balancer(environ, start_response)
        except BaseException:
            done()
            raise
        return ClosingIterable(result, done)
