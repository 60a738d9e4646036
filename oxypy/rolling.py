"""Rolling in-memory metrics: counters, ratios and latency histograms over a time window.

These are the measurements :class:`oxypy.CircuitBreaker` evaluates its trigger
on (oxy's ``memmetrics``).  Every structure is a ring of time slots: slot
``floor(now / resolution)`` lives at ``slot % buckets`` and slots that fell out
of the window are zeroed on *every* access, reads included, so an idle hour
leaves no old data behind.  Each public object guards its state with one lock
(a C lock even under gevent: the sections never yield, see ``_core/locks``) and takes an injectable
``clock``.

Latencies go into an HDR-style log-linear histogram of integer microseconds:
256 linear sub-buckets per power of two, so any value from 1 µs to 1 h is
reported within 1/128 (< 0.8 %) of what was recorded, never below it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ._core.locks import short_lock
from ._core.types import Clock
from .exceptions import ConfigurationError

__all__ = [
    "Histogram",
    "RatioCounter",
    "RollingCounter",
    "RollingHistogram",
    "RoundTripMetrics",
]

_T = TypeVar("_T")

#: Values above this (1 hour in µs) are recorded as this.
HIGHEST_US = 3_600_000_000
_SUB_BITS = 8  # 256 sub-buckets per power of two: 2 significant decimal digits
_HALF_SHIFT = _SUB_BITS - 1


def _check_window(buckets: int, resolution: float) -> None:
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ConfigurationError(f"buckets must be a positive int, got {buckets!r}")
    if not isinstance(resolution, (int, float)) or not resolution > 0 or math.isinf(resolution):
        raise ConfigurationError(f"resolution must be a positive number of seconds: {resolution!r}")


class _Ring(Generic[_T]):
    """``buckets`` slots of ``resolution`` seconds; no lock (the owner holds one)."""

    __slots__ = ("n", "resolution", "slots", "last", "factory")

    def __init__(self, buckets: int, resolution: float, factory: Callable[[], _T]) -> None:
        self.n = buckets
        self.resolution = float(resolution)
        self.factory = factory
        self.slots: list[_T] = [factory() for _ in range(buckets)]
        self.last: int | None = None

    def index(self, now: float) -> int:
        """The slot for ``now``, after zeroing every slot that left the window."""
        slot = int(now // self.resolution)
        if slot != self.last:
            self._roll(slot)
        return slot % self.n

    def _roll(self, slot: int) -> None:
        last, n, factory, slots = self.last, self.n, self.factory, self.slots
        if last is None or slot - last >= n or slot < last:
            # First use, a gap longer than the window, or a clock that went back.
            for i in range(n):
                slots[i] = factory()
        else:
            for k in range(last + 1, slot + 1):
                slots[k % n] = factory()
        self.last = slot

    def reset(self) -> None:
        for i in range(self.n):
            self.slots[i] = self.factory()
        self.last = None

    def copy_from(self, other: _Ring[_T], copy: Callable[[_T], _T]) -> None:
        self.slots = [copy(s) for s in other.slots]
        self.last = other.last


class RollingCounter:
    """Events counted over the last ``buckets * resolution`` seconds.

    :param buckets: number of slots in the window (> 0).
    :param resolution: seconds per slot (> 0); oxy's default is 10 × 1 s.
    :param clock: monotonic clock in seconds.

    Example::

        c = RollingCounter(10, 1.0)
        c.inc()
        assert c.count() == 1

    .. versionadded:: 0.1
    """

    __slots__ = ("_ring", "_clock", "_lock", "_counted", "_last_counted")

    def __init__(self, buckets: int, resolution: float, *, clock: Clock = time.monotonic) -> None:
        _check_window(buckets, resolution)
        self._ring: _Ring[int] = _Ring(buckets, resolution, int)
        self._clock = clock
        self._lock = short_lock()  # arithmetic only: never yields
        self._counted = 0
        self._last_counted: int | None = None

    @property
    def buckets(self) -> int:
        return self._ring.n

    @property
    def resolution(self) -> float:
        return self._ring.resolution

    @property
    def window(self) -> float:
        """Seconds covered by the window."""
        return self._ring.n * self._ring.resolution

    def inc(self, n: int = 1) -> None:
        with self._lock:
            ring = self._ring
            i = ring.index(self._clock())
            ring.slots[i] += n
            if self._counted < ring.n and ring.last != self._last_counted:
                self._last_counted = ring.last
                self._counted += 1

    def count(self) -> int:
        with self._lock:
            self._ring.index(self._clock())
            return sum(self._ring.slots)

    def counted_buckets(self) -> int:
        """Distinct slots that received events since creation or reset (capped at ``buckets``)."""
        with self._lock:
            return self._counted

    def reset(self) -> None:
        with self._lock:
            self._ring.reset()
            self._counted = 0
            self._last_counted = None

    def clone(self) -> RollingCounter:
        """An independent copy (with its own lock) of the current window."""
        with self._lock:
            self._ring.index(self._clock())
            other = RollingCounter(self._ring.n, self._ring.resolution, clock=self._clock)
            other._ring.copy_from(self._ring, int)
            other._counted = self._counted
            other._last_counted = self._last_counted
            return other


class RatioCounter:
    """Two rolling counters A and B; :meth:`ratio` is A / (A + B), 0 with no data.

    :meth:`is_ready` turns true once the counters together saw events in
    ``buckets`` distinct slots (oxy's warm-up rule).

    .. versionadded:: 0.1
    """

    __slots__ = ("a", "b")

    def __init__(self, buckets: int, resolution: float, *, clock: Clock = time.monotonic) -> None:
        self.a = RollingCounter(buckets, resolution, clock=clock)
        self.b = RollingCounter(buckets, resolution, clock=clock)

    def inc_a(self, n: int = 1) -> None:
        self.a.inc(n)

    def inc_b(self, n: int = 1) -> None:
        self.b.inc(n)

    def count_a(self) -> int:
        return self.a.count()

    def count_b(self) -> int:
        return self.b.count()

    def processed_count(self) -> int:
        return self.a.count() + self.b.count()

    def is_ready(self) -> bool:
        return self.a.counted_buckets() + self.b.counted_buckets() >= self.a.buckets

    def ratio(self) -> float:
        a, b = self.a.count(), self.b.count()
        return a / (a + b) if a + b else 0.0

    def reset(self) -> None:
        self.a.reset()
        self.b.reset()


# --- histogram -------------------------------------------------------------------


def bucket_index(value_us: int) -> int:
    """The histogram bucket of a value in µs (clamped to 0 .. 1 h)."""
    if value_us < 0:
        value_us = 0
    elif value_us > HIGHEST_US:
        value_us = HIGHEST_US
    shift = value_us.bit_length() - _SUB_BITS
    if shift <= 0:
        return value_us
    return (shift << _HALF_SHIFT) + (value_us >> shift)


def bucket_value(index: int) -> int:
    """The highest value (µs) that lands in bucket ``index`` (HDR's highest equivalent)."""
    if index < (1 << _SUB_BITS):
        return index
    shift = (index >> _HALF_SHIFT) - 1
    sub = index - (shift << _HALF_SHIFT)
    return ((sub + 1) << shift) - 1


def _value_at_quantile(counts: dict[int, int], total: int, q: float) -> int:
    if total <= 0:
        return 0
    q = min(max(q, 0.0), 100.0)
    wanted = max(int(q / 100.0 * total + 0.5), 1)
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= wanted:
            return bucket_value(index)
    return bucket_value(max(counts))  # pragma: no cover - totals always add up


class Histogram:
    """A log-linear histogram of integer microseconds (no window, no lock).

    Quantiles are percentiles (0 to 100) as in HDR Histogram and oxy.

    .. versionadded:: 0.1
    """

    __slots__ = ("counts", "total")

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts) if counts else {}
        self.total = sum(self.counts.values())

    def record(self, value_us: int, count: int = 1) -> None:
        i = bucket_index(int(value_us))
        self.counts[i] = self.counts.get(i, 0) + count
        self.total += count

    def merge(self, other: Histogram) -> None:
        for i, c in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + c
        self.total += other.total

    def value_at_quantile(self, q: float) -> int:
        """The value (µs) at percentile ``q``; 0 when empty."""
        return _value_at_quantile(self.counts, self.total, q)

    def max(self) -> int:
        return bucket_value(max(self.counts)) if self.counts else 0

    def copy(self) -> Histogram:
        return Histogram(self.counts)

    def reset(self) -> None:
        self.counts.clear()
        self.total = 0


class RollingHistogram:
    """A :class:`Histogram` per slot over a rolling window (default 6 × 10 s, as oxy).

    .. versionadded:: 0.1
    """

    __slots__ = ("_ring", "_clock", "_lock")

    def __init__(
        self,
        buckets: int = 6,
        resolution: float = 10.0,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        _check_window(buckets, resolution)
        self._ring: _Ring[dict[int, int]] = _Ring(buckets, resolution, dict)
        self._clock = clock
        self._lock = short_lock()  # arithmetic only: never yields

    def record(self, value_us: int, count: int = 1) -> None:
        i = bucket_index(int(value_us))
        with self._lock:
            slot = self._ring.slots[self._ring.index(self._clock())]
            slot[i] = slot.get(i, 0) + count

    def merged(self) -> Histogram:
        """A snapshot of the whole window as one :class:`Histogram`."""
        with self._lock:
            return _merge(self._ring, self._clock())

    def value_at_quantile(self, q: float) -> int:
        return self.merged().value_at_quantile(q)

    def reset(self) -> None:
        with self._lock:
            self._ring.reset()


def _merge(ring: _Ring[dict[int, int]], now: float) -> Histogram:
    ring.index(now)
    out = Histogram()
    counts = out.counts
    for slot in ring.slots:
        for i, c in slot.items():
            counts[i] = counts.get(i, 0) + c
    out.total = sum(counts.values())
    return out


# --- round trips -----------------------------------------------------------------

_NET = -1  # key of the network-error count inside a counter slot


class RoundTripMetrics:
    """Status codes, network errors and latencies of recent requests.

    Counters cover ``counter_buckets × counter_resolution`` seconds (10 × 1 s)
    and latencies ``histogram_buckets × histogram_resolution`` (6 × 10 s), as in
    oxy.  A *network error* is whatever the caller says it is (for the breaker:
    Forward itself failed), never inferred from a 502/504 status.  One lock
    guards everything; every read expires stale slots first.

    Example::

        m = RoundTripMetrics()
        m.record(200, 0.012, False)
        m.record(502, 0.001, True)
        assert m.network_error_ratio() == 0.5

    .. versionadded:: 0.1
    """

    __slots__ = ("_codes", "_latency", "_clock", "_lock")

    def __init__(
        self,
        *,
        counter_buckets: int = 10,
        counter_resolution: float = 1.0,
        histogram_buckets: int = 6,
        histogram_resolution: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        _check_window(counter_buckets, counter_resolution)
        _check_window(histogram_buckets, histogram_resolution)
        # One dict per slot: status -> count, plus _NET -> network errors.
        self._codes: _Ring[dict[int, int]] = _Ring(counter_buckets, counter_resolution, dict)
        self._latency: _Ring[dict[int, int]] = _Ring(histogram_buckets, histogram_resolution, dict)
        self._clock = clock
        self._lock = short_lock()  # arithmetic only: never yields

    def record(self, status: int, latency_s: float, network_error: bool = False) -> None:
        """Count one finished request (latency in seconds)."""
        us = int(latency_s * 1_000_000)
        if us <= 0:
            i = 0
        else:
            if us > HIGHEST_US:
                us = HIGHEST_US
            shift = us.bit_length() - _SUB_BITS
            i = us if shift <= 0 else (shift << _HALF_SHIFT) + (us >> shift)
        with self._lock:
            now = self._clock()
            ring = self._codes
            slot = int(now // ring.resolution)
            if slot != ring.last:
                ring._roll(slot)
            codes = ring.slots[slot % ring.n]
            codes[status] = codes.get(status, 0) + 1
            if network_error:
                codes[_NET] = codes.get(_NET, 0) + 1
            ring = self._latency
            slot = int(now // ring.resolution)
            if slot != ring.last:
                ring._roll(slot)
            hist = ring.slots[slot % ring.n]
            hist[i] = hist.get(i, 0) + 1

    def _code_totals(self) -> dict[int, int]:
        self._codes.index(self._clock())
        out: dict[int, int] = {}
        for slot in self._codes.slots:
            for code, c in slot.items():
                out[code] = out.get(code, 0) + c
        return out

    def status_code_counts(self) -> dict[int, int]:
        """Requests per status code in the counter window."""
        with self._lock:
            totals = self._code_totals()
        totals.pop(_NET, None)
        return totals

    def total_count(self) -> int:
        """Requests in the counter window (``RequestThreshold()``)."""
        with self._lock:
            totals = self._code_totals()
        return sum(c for code, c in totals.items() if code != _NET)

    def network_error_count(self) -> int:
        with self._lock:
            return self._code_totals().get(_NET, 0)

    def network_error_ratio(self) -> float:
        """Network errors / requests in the counter window; 0 without traffic."""
        with self._lock:
            totals = self._code_totals()
        net = totals.pop(_NET, 0)
        total = sum(totals.values())
        return net / total if total else 0.0

    def response_code_ratio(self, start_a: int, end_a: int, start_b: int, end_b: int) -> float:
        """count(codes in [start_a, end_a)) / count(codes in [start_b, end_b)); 0 if no B."""
        with self._lock:
            totals = self._code_totals()
        totals.pop(_NET, None)
        a = sum(c for code, c in totals.items() if start_a <= code < end_a)
        b = sum(c for code, c in totals.items() if start_b <= code < end_b)
        return a / b if b else 0.0

    def latency_histogram(self) -> Histogram:
        """A snapshot of the latency window (values in µs)."""
        with self._lock:
            return _merge(self._latency, self._clock())

    def latency_at_quantile_ms(self, q: float) -> int:
        """Latency in whole milliseconds at percentile ``q`` (0 to 100); 0 when empty."""
        return self.latency_histogram().value_at_quantile(q) // 1000

    def latency_series(self, q: float) -> list[int]:
        """Per slot of the latency window, oldest first: the latency (µs) at
        percentile ``q``; 0 for a slot without requests (a sparkline's points).

        .. versionadded:: 0.3
        """
        with self._lock:
            ring = self._latency
            ring.index(self._clock())
            last = ring.last if ring.last is not None else 0
            slots = [dict(ring.slots[(last - k) % ring.n]) for k in range(ring.n - 1, -1, -1)]
        return [_value_at_quantile(slot, sum(slot.values()), q) for slot in slots]

    def reset(self) -> None:
        with self._lock:
            self._codes.reset()
            self._latency.reset()
