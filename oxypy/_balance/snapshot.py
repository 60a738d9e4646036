"""A balancer's :class:`~oxypy._core.snapshot.BalancerSnapshot`: its pool read at one instant.

The pool's fields are copied under its lock (so a pick never waits on the
page for more than a list copy); the rolling stats, which have their own
locks, are read after it is released.
"""

from __future__ import annotations

from typing import Any

from .._core.snapshot import BalancerSnapshot, ServerSnapshot, redact_url
from ..exceptions import OxypyError
from ..health import HealthCheck
from .pool import Pool
from .state import State

__all__ = ["balancer_snapshot", "registry_snapshot"]

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
    registry: Any = None,
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
        elif state is State.DRAINING:
            reason = ""  # drained by an operator: health and ejection are forgotten
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
        "registry": {} if registry is None else registry_snapshot(registry),
    }


def registry_snapshot(registry: Any) -> dict[str, Any]:
    """The fleet-wide view of a shared server registry (``RedisRegistry``): every
    registered server with its weight, its state (``active``/``draining``) and
    the health the registry's one prober published (``up``/``down``/``unknown``),
    and which process probes, read from the registry now; ``error`` when it
    does not answer (the balancer goes on with the servers it last knew)."""
    out: dict[str, Any] = {
        "name": str(getattr(registry, "name", "")),
        "url": redact_url(str(getattr(registry, "url", ""))),
        "prober": None,
        "servers": [],
        "error": "",
    }
    try:
        fleet = list(registry.fleet())
        prober = registry.prober()
    except OxypyError:
        out["error"] = "the registry did not answer"
        return out
    out["prober"] = None if prober is None else str(prober)
    out["servers"] = [
        {
            "url": redact_url(str(s.url)),
            "weight": int(s.weight),
            "state": str(s.state),
            "health": "unknown" if s.healthy is None else "up" if s.healthy else "down",
        }
        for s in fleet
    ]
    return out
