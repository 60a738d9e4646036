"""Passive outlier detection: counting real traffic's failures per server.

The balancer settles each request in ``close()`` and asks :func:`outcome`
what the request's exchanges with its server said: a failure (a network
error or timeout of Forward's own), a success (an answer, any status), or
nothing (a client that went away, or no exchange at all).
:func:`count_result` counts it and, when the server trips a rule, computes
the ejection and hands ``EJECT`` to the state machine
(:mod:`oxypy._balance.state`); :func:`expire_ejections` hands it
``EJECTION_OVER`` when a pick finds the time up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from .._core.exchange import Exchange, upstream_verdict
from ..health import OutlierDetection
from .state import Event, Input, ServerState, State, transition

__all__ = ["count_result", "expire_ejections", "outcome"]


def outcome(exchanges: Iterable[Exchange], target: str) -> bool | None:
    """Whether the exchanges with ``target`` failed (True), succeeded (False) or say nothing.

    Each exchange's verdict is :func:`~oxypy._core.exchange.upstream_verdict`:
    a failure is a network error Forward raised itself (refused, reset,
    invalid answer: 502; connect or read timeout: 504), and one failure makes
    the request a failure even after an earlier success.  A client that went
    away is never held against the server.
    """
    failed: bool | None = None
    for record in exchanges:
        if record.target != target:
            continue
        verdict = upstream_verdict(record)
        if verdict:
            return True
        if verdict is False:
            failed = False
    return failed


def count_result(
    config: OutlierDetection,
    server: ServerState,
    failed: bool,
    now: float,
    servers: Sequence[ServerState],
    events: list[Event],
) -> None:
    """Count one result for ``server`` (pool lock held); eject it if due.

    Only a server in rotation counts: a result from one that left it while
    the request was in flight (a straggler) changes nothing.
    """
    if server.state is not State.ACTIVE:
        return
    server.consecutive_errors = server.consecutive_errors + 1 if failed else 0
    recent = server.recent
    if config.failure_ratio is not None:
        if recent.maxlen != config.window:
            server.recent = recent = deque(recent, maxlen=config.window)
        recent.append(failed)
    tripped = (
        config.consecutive_errors is not None
        and server.consecutive_errors >= config.consecutive_errors
    ) or (
        config.failure_ratio is not None
        and len(recent) >= config.window
        and sum(recent) >= config.failure_ratio * len(recent)
    )
    if not tripped:
        return
    ejected = sum(1 for s in servers if s.ejected)
    if (ejected + 1) * 100 > config.max_ejection_percent * len(servers):
        return  # over the cap: keep serving, keep counting
    last = min(config.base_ejection_time * server.ejections, config.max_ejection_time)
    if server.returned_at is not None and now - server.returned_at >= last:
        server.ejections = 0
    if (
        config.consecutive_errors is not None
        and server.consecutive_errors >= config.consecutive_errors
    ):
        why = f"{server.consecutive_errors} network errors or timeouts in a row"
    else:
        why = f"{sum(recent)} network errors or timeouts in the last {len(recent)} requests"
    server.ejections += 1
    duration = min(config.base_ejection_time * server.ejections, config.max_ejection_time)
    transition(
        server, Input.EJECT, events, until=now + duration, reason=f"{why}; out for {duration:g} s"
    )


def expire_ejections(servers: Sequence[ServerState], now: float, events: list[Event]) -> None:
    """Return every server whose ejection time has passed (pool lock held)."""
    for server in servers:
        until = server.ejected_until
        if until is not None and now >= until:
            reason = "its ejection time is over"
            transition(server, Input.EJECTION_OVER, events, now=now, reason=reason)
