"""A balancer's :class:`~oxypy._core.snapshot.BalancerSnapshot`: its pool read at one instant.

The pool's fields are copied under its lock (so a pick never waits on the
page for more than a list copy); the rolling stats, which have their own
locks, are read after it is released.
"""

from __future__ import annotations

from .._core.snapshot import BalancerSnapshot, ServerSnapshot, redact_url
from ..health import HealthCheck
from .pool import Pool
from .state import State

__all__ = ["balancer_snapshot"]

_STATE_NAMES = {
    State.ACTIVE: "healthy",
    State.UNHEALTHY: "unhealthy",
    State.EJECTED: "ejected",
    State.UNHEALTHY_EJECTED: "unhealthy+ejected",
}


def balancer_snapshot(
    kind: str,
    pool: Pool,
    *,
    health_check: HealthCheck | None,
    outlier_detection: bool,
    sticky: bool,
    in_flight_counted: bool,
) -> BalancerSnapshot:
    """What a balancer's ``snapshot()`` returns (see :class:`BalancerSnapshot`)."""
    with pool.lock:
        now = pool.clock()
        rows = [
            (s, s.url, s.state, s.reason, s.ejected_until, s.weight, s.in_flight, s.stats)
            for s in pool.order
        ]
    servers: list[ServerSnapshot] = []
    for _server, url, state, reason, until, weight, in_flight, stats in rows:
        name = _STATE_NAMES.get(state, state.value)
        if state is State.ACTIVE:
            reason = ""
            if weight == 0:
                name = "draining"
        left = max(0.0, until - now) if until is not None else None
        row: ServerSnapshot = {
            "url": redact_url(url),
            "state": name,
            "reason": reason,
            "ejected_for": None if left is None else round(left, 1),
            "weight": weight,
            "in_flight": in_flight if in_flight_counted else None,
            "requests": None,
            "rps": None,
            "error_ratio": None,
            "p50_ms": None,
            "p99_ms": None,
            "retries": None,
            "hedges": None,
            "sparkline": [],
        }
        if stats is not None:
            total, rps, ratio, p50, p99, retries, hedges, spark = stats.read()
            row["requests"] = total
            row["rps"] = round(rps, 2)
            row["error_ratio"] = round(ratio, 4)
            row["p50_ms"] = p50
            row["p99_ms"] = p99
            row["retries"] = retries
            row["hedges"] = hedges
            row["sparkline"] = spark
        servers.append(row)
    check = ""
    if health_check is not None:
        check = f"GET {health_check.path} every {health_check.interval:g}s"
    return {
        "kind": kind,
        "servers": servers,
        "health_check": check,
        "outlier_detection": outlier_detection,
        "sticky": sticky,
        "registry": {},
    }
