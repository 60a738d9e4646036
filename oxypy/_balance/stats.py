"""Per-server rolling stats for the status page, kept only when asked for.

A balancer keeps no per-server numbers by default (its pick must stay
cheap).  :meth:`Balancer.keep_stats` (which :class:`oxypy.StatusPage`
calls) gives every server a :class:`ServerStats`: one
:class:`~oxypy.rolling.RoundTripMetrics` of 60 one-second slots (requests,
5xx and network errors, a latency histogram per second, so the p50/p99 of
the last minute and a sparkline come from the same ring) and two rolling
counters for the retries and hedges sent to the server.  Recording costs
one lock and a few dict updates per request; reading (once a second, by
the page) merges at most 60 slots.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._core.exchange import Exchange, upstream_verdict
from .._core.types import Clock
from ..rolling import RollingCounter, RoundTripMetrics

__all__ = ["WINDOW", "ServerStats", "record_exchange"]

#: Seconds the stats cover (one slot a second).
WINDOW = 60


class ServerStats:
    """The last minute of one server's requests (each object has its own locks)."""

    __slots__ = ("metrics", "retries", "hedges")

    def __init__(self, clock: Clock) -> None:
        self.metrics = RoundTripMetrics(
            counter_buckets=WINDOW,
            counter_resolution=1.0,
            histogram_buckets=WINDOW,
            histogram_resolution=1.0,
            clock=clock,
        )
        self.retries = RollingCounter(WINDOW, 1.0, clock=clock)
        self.hedges = RollingCounter(WINDOW, 1.0, clock=clock)

    def record(self, status: int, latency: float, network_error: bool) -> None:
        """One settled request: its upstream status (0: none), latency (s), network error."""
        self.metrics.record(0 if network_error else status, latency, network_error)

    def resent(self, retry: bool) -> None:
        """The server got a retry (``retry``) or a hedge of a request another server had."""
        (self.retries if retry else self.hedges).inc()

    def read(self) -> tuple[int, float, float, float, float, int, int, list[float]]:
        """``(requests, rps, error_ratio, p50_ms, p99_ms, retries, hedges, sparkline_ms)``."""
        metrics = self.metrics
        codes = metrics.status_code_counts()
        total = sum(codes.values())
        errors = metrics.network_error_count() + sum(c for s, c in codes.items() if s >= 500)
        hist = metrics.latency_histogram()
        series = metrics.latency_series(50)
        return (
            total,
            total / WINDOW,
            errors / total if total else 0.0,
            hist.value_at_quantile(50) / 1000,
            hist.value_at_quantile(99) / 1000,
            self.retries.count(),
            self.hedges.count(),
            [us / 1000 for us in series],
        )


def record_exchange(
    stats: ServerStats, exchanges: Iterable[Exchange], target: str, latency: float
) -> None:
    """Record a settled request from its last exchange with ``target`` (if it says anything)."""
    last = None
    for record in exchanges:
        if record.target == target:
            last = record
    if last is None or upstream_verdict(last) is None:
        return  # nothing reached the server, or the client went away
    stats.record(last.status, latency, last.network_error)
