"""RoundRobin: weighted round robin that spreads picks smoothly.

The pick is nginx's smooth weighted round robin: every server's running
weight grows by its weight, the largest wins and gives back the total, so
weights a=3, b=1 give ``a, a, b, a``, never ``a, a, a, b`` (oxy's interleaved
WRR bunches picks).  Sticky sessions, health checks and outlier ejection are
shared with the other balancers (see :mod:`oxypy._balance`).
"""

from __future__ import annotations

from ._balance.balancer import Balancer
from ._balance.state import ServerState

__all__ = ["RoundRobin"]


class RoundRobin(Balancer):
    """Spread requests over ``servers`` by smooth weighted round robin.

    Each request goes to one server: the balancer sets ``oxypy.target`` on a
    shallow copy of the environ (``Forward`` below sends it there) and never
    buffers anything.  Servers with weight 0 are never picked while another
    has weight.  When ``oxypy.tried_targets`` exists (``Buffer`` creates it),
    the pick is added to it, and servers already in it are avoided whenever
    another one may take the request, so a retry goes elsewhere.

    Runtime changes are safe under concurrent requests:
    :meth:`upsert_server`, :meth:`remove_server`, :meth:`drain_server`, :meth:`servers`,
    :meth:`server_weight`.  A server's identity is its scheme, host, port and
    path (normalised), so upserting a known server changes its weight and
    never duplicates it; either change restarts the smooth sequence.

    **Reads** ``oxypy.tried_targets``, the sticky cookie.  **Writes**
    ``oxypy.target`` (on the copy), ``oxypy.tried_targets``, ``Set-Cookie``
    (sticky).  Failure: no server to pick (empty pool, every weight 0, every
    server unhealthy or ejected) answers **503** ``NoServers`` through
    ``error_handler``, with a short body naming which.

    :param servers: URLs, or ``(url, weight)`` pairs (weight: int >= 0, default 1).
    :param sticky: a :class:`~oxypy.StickySession` for cookie affinity.
    :param health_check: a :class:`~oxypy.HealthCheck`; its greenlet starts
        now and stops in :meth:`close`.
    :param outlier_detection: an :class:`~oxypy.OutlierDetection` (passive ejection).
    :param on_change: ``fn(server_url, event)`` for ``added``, ``removed``,
        ``unhealthy``, ``healthy``, ``ejected``, ``returned``, ``draining``,
        ``undrained``.
    :param registry: a :class:`~oxypy.RedisRegistry`: the server set is then
        shared by every process naming it (``servers`` only seeds a registry
        that does not exist yet); runtime changes write through to Redis.
    :param error_handler: answers the 503.
    :param skip: ``fn(environ) -> bool``; True passes the request straight on.
    :param clock: monotonic seconds, for ejection times.

    Example::

        from oxypy import Forward, RoundRobin, serve
        lb = RoundRobin(Forward(), [("http://127.0.0.1:9001", 3), "http://127.0.0.1:9002"])
        lb.upsert_server("http://127.0.0.1:9003", weight=2)
        serve(lb, "127.0.0.1:8080")

    .. versionadded:: 0.1
    """

    def _choose(self, candidates: list[ServerState]) -> ServerState:
        total = 0
        best = candidates[0]
        best_current = None
        for server in candidates:
            server.current += server.weight
            total += server.weight
            if best_current is None or server.current > best_current:
                best, best_current = server, server.current
        best.current -= total
        return best

    def next_server(self) -> str:
        """Advance the sequence and return the next pick's URL (oxy's ``NextServer``).

        Raises :class:`~oxypy.NoServers` when there is none.
        """
        server, _ = self._pick({}, None, False)
        if server is None:
            raise self._no_server()
        return server.url
