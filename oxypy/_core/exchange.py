"""The exchange log: one typed :class:`Exchange` per upstream request, and how to read it.

``Forward`` appends an :class:`Exchange` to ``environ["oxypy.exchanges"]`` for
every request it sends upstream (a retry appends another).  The list is shared
by reference between every copy of the environ, so the blocks above Forward
(Buffer, CircuitBreaker, balancers, outlier detection, the Rebalancer, Trace,
metrics) learn what happened below them.  Each of them reads it the same way:
take a :func:`mark` when the request enters the block, and read
:meth:`Mark.since` when it leaves.

Whether an exchange says something *against its upstream* is decided here,
once: :attr:`Exchange.network_error` is True only for Forward's own failures to
reach or read the upstream (:class:`~oxypy.UpstreamError`); a client that went
away (:class:`~oxypy.ClientDisconnected`) is never one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .. import environ as keys
from ..exceptions import ClientDisconnected, RequestError, UpstreamError
from .types import WSGIEnvironment

__all__ = [
    "Exchange",
    "Mark",
    "counts_against_upstream",
    "exchange_log",
    "mark",
    "settle_unfinished",
    "upstream_verdict",
]


@dataclass(slots=True, eq=False)
class Exchange:
    """What happened to one upstream request; appended to ``environ["oxypy.exchanges"]``.

    ``status`` is the upstream's status (0 when none arrived); ``error`` is the
    :class:`~oxypy.RequestError` that ended the exchange, if any: an
    :class:`~oxypy.UpstreamError` is a *network* error produced by Forward
    itself (refused, reset, timed out, invalid or cut-short response), never an
    upstream that answered 502 on its own; a
    :class:`~oxypy.ClientDisconnected` means the client went away first.
    ``started``/``ended`` are ``time.monotonic()`` values; ``bytes_received``
    counts the response body bytes relayed.
    """

    target: str
    method: str
    started: float
    status: int = 0
    error: RequestError | None = None
    ended: float | None = None
    bytes_received: int = 0

    @property
    def network_error(self) -> bool:
        """True when Forward failed to reach or read the upstream (never for a client abort)."""
        return isinstance(self.error, UpstreamError)

    @property
    def client_aborted(self) -> bool:
        """True when the exchange ended because the client went away."""
        return isinstance(self.error, ClientDisconnected)

    def __repr__(self) -> str:
        return f"<Exchange {self.method} {self.target} status={self.status} error={self.error!r}>"


def counts_against_upstream(exchange: Exchange) -> bool:
    """Whether ``exchange`` is a failure of its upstream (breaker, outlier detection, retries).

    Only Forward's own network errors count; an upstream that answered (any
    status) did not fail to be reached, and a client that went away says
    nothing about the upstream.
    """
    return exchange.network_error


def upstream_verdict(exchange: Exchange) -> bool | None:
    """What ``exchange`` says about its upstream: True failed, False answered, None nothing.

    None for an exchange without a target, for a client abort, and for one
    that ended before any answer for another reason (no target, bad request).
    """
    if not exchange.target or exchange.client_aborted:
        return None
    if exchange.network_error:
        return True
    if exchange.status:
        return False
    return None


def settle_unfinished(records: list[Exchange], error: RequestError | None = None) -> None:
    """End the exchanges of ``records`` still in progress, before their bodies are closed.

    A block above Forward that abandons a response on purpose (a retried
    attempt: ``error`` None) or interrupts it (a deadline: ``error`` the
    timeout) settles it first, so Forward's ``close()`` does not take the
    unread body for a client that went away.
    """
    now = time.monotonic()
    for record in records:
        if record.ended is None and record.error is None:
            record.error = error
            record.ended = now


def exchange_log(environ: WSGIEnvironment) -> list[Exchange]:
    """This request's exchange log, created (and shared from then on) if missing."""
    log: list[Exchange] = environ.setdefault(keys.EXCHANGES, [])
    return log


class Mark:
    """A position in a request's exchange log: :meth:`since` is what came after it."""

    __slots__ = ("log", "start")

    def __init__(self, log: list[Exchange], start: int) -> None:
        self.log = log
        self.start = start

    def since(self) -> list[Exchange]:
        """The exchanges appended after the mark, oldest first."""
        return self.log[self.start :]

    @property
    def last(self) -> Exchange | None:
        """The newest exchange after the mark (the one whose answer the client got)."""
        return self.log[-1] if len(self.log) > self.start else None


def mark(environ: WSGIEnvironment) -> Mark:
    """Mark the exchange log now; read :meth:`Mark.since` when the request leaves the block."""
    log = exchange_log(environ)
    return Mark(log, len(log))
