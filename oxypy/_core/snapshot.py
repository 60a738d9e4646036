"""The typed records a block's ``snapshot()`` returns, for the status page.

Every block that keeps state an operator wants to see (a balancer's
servers, a breaker, a limit, a retry budget, a hedge) has a ``snapshot()``
method returning one of these ``TypedDict`` records: plain JSON-ready data
read at one instant, with no secret in it (sticky-cookie keys are never
included; URLs go through :func:`redact_url`).  :class:`oxypy.StatusPage`
collects them; the records are also there for scripts.
"""

from __future__ import annotations

from typing import Any, TypedDict
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "BalancerSnapshot",
    "BlockSnapshot",
    "BreakerSnapshot",
    "ServerSnapshot",
    "TermSnapshot",
    "describe_store",
    "redact_url",
]


class ServerSnapshot(TypedDict):
    """One server of a balancer, with its rolling stats (``None`` while not kept)."""

    url: str
    #: ``healthy``, ``unhealthy``, ``ejected``, ``unhealthy+ejected`` or
    #: ``draining`` (weight 0: in the pool, sent nothing new)
    state: str
    #: why it is out of rotation (the failed probe, the ejection rule), else ""
    reason: str
    #: seconds until the ejection ends, when ejected
    ejected_for: float | None
    weight: int
    in_flight: int | None
    requests: int | None
    rps: float | None
    error_ratio: float | None
    p50_ms: float | None
    p99_ms: float | None
    retries: int | None
    hedges: int | None
    #: p50 latency (ms) per second over the last minute, oldest first (0: no request)
    sparkline: list[float]


class BalancerSnapshot(TypedDict):
    kind: str
    servers: list[ServerSnapshot]
    #: ``"GET /healthz every 1s"``, or "" without active health checks
    health_check: str
    outlier_detection: bool
    sticky: bool
    #: the fleet-wide view of a shared registry ({} without one)
    registry: dict[str, Any]


class TermSnapshot(TypedDict):
    """One comparison of a breaker's expression: ``call op threshold``, and its value now."""

    call: str
    op: str
    threshold: float
    value: float | None
    holds: bool | None


class BreakerSnapshot(TypedDict):
    kind: str
    state: str
    expression: str
    #: seconds left in ``tripped`` or ``recovering``, else None
    state_for: float | None
    terms: list[TermSnapshot]


#: Any other block: ``{"kind": ..., ...}`` with its own fields (see each block's ``snapshot()``).
BlockSnapshot = dict[str, Any]


def redact_url(url: str) -> str:
    """``url`` without its password (userinfo becomes ``***``); any other string as is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc="***@" + host))


def describe_store(store: object) -> str:
    """``RedisStore(redis://***@host:6379/0)``: a store's class and its redacted URL, if any."""
    url = getattr(store, "url", None)
    name = type(store).__name__
    return f"{name}({redact_url(url)})" if isinstance(url, str) else name
