"""LeastRequest: send each request to a server with few requests in flight.

Power of two choices (Envoy's ``LEAST_REQUEST`` default): draw
``choice_count`` distinct servers at random, weighted by their weights, and take the
one with the fewest in-flight requests per unit of weight.  With no load
the picks follow the weights exactly; under load a slow server, whose
requests pile up, is drawn but rarely chosen.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

from ._balance.address import ServerSpec
from ._balance.balancer import Balancer
from ._balance.pool import OnChange
from ._balance.state import ServerState
from ._core.types import Clock, Skip, WSGIApplication
from .errors import ErrorHandler, default_error_handler
from .exceptions import ConfigurationError
from .health import HealthCheck, OutlierDetection
from .registry import RedisRegistry
from .sticky import StickySession

__all__ = ["LeastRequest"]


class LeastRequest(Balancer):
    """Balance by in-flight requests with weighted power-of-two choices.

    A request is *in flight* from the pick until the ``close()`` of the
    response iterable this balancer returns (or until the next app raises),
    so streamed responses count for as long as they stream and nothing is
    ever leaked.  Everything else (environ keys, sticky sessions, health
    checks, outlier ejection, runtime changes, the 503) is as for
    :class:`~oxypy.RoundRobin`.

    :param servers: URLs, or ``(url, weight)`` pairs.
    :param choice_count: servers drawn per pick (default 2; >= 1).
    :param rng: a ``random.Random`` to draw with (tests seed it).
    :param sticky: see :class:`~oxypy.RoundRobin`.  So are ``health_check``,
        ``outlier_detection``, ``on_change``, ``registry``, ``error_handler``, ``skip``, ``clock``.

    Example::

        from oxypy import Forward, LeastRequest
        lb = LeastRequest(Forward(), ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])

    .. versionadded:: 0.1
    """

    _tracks_in_flight = True

    def __init__(
        self,
        next_app: WSGIApplication,
        servers: Iterable[ServerSpec] = (),
        /,
        *,
        choice_count: int = 2,
        rng: random.Random | None = None,
        sticky: StickySession | None = None,
        health_check: HealthCheck | None = None,
        outlier_detection: OutlierDetection | None = None,
        on_change: OnChange | None = None,
        registry: RedisRegistry | None = None,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if isinstance(choice_count, bool) or not isinstance(choice_count, int) or choice_count < 1:
            raise ConfigurationError("choice_count must be an int >= 1")
        self.choice_count = choice_count
        self._rng = rng if rng is not None else random.Random()
        super().__init__(
            next_app,
            servers,
            sticky=sticky,
            health_check=health_check,
            outlier_detection=outlier_detection,
            on_change=on_change,
            registry=registry,
            error_handler=error_handler,
            skip=skip,
            clock=clock,
        )

    def in_flight(self, url: str) -> int | None:
        """Requests in flight to ``url`` now, or None when it is not in the pool."""
        return self.pool.in_flight(url)

    def _choose(self, candidates: list[ServerState]) -> ServerState:
        # Draw without replacement (with replacement, two servers would be
        # compared only half the time), each draw weighted by weight.
        rng = self._rng
        pool = list(candidates)
        equal = all(s.weight == pool[0].weight for s in pool)
        total = sum(s.weight for s in pool)
        drawn: list[ServerState] = []
        for _ in range(min(self.choice_count, len(pool))):
            if equal:
                index = rng.randrange(len(pool))
            else:
                point = rng.random() * total
                index = len(pool) - 1
                for i, server in enumerate(pool):
                    point -= server.weight
                    if point < 0:
                        index = i
                        break
            server = pool.pop(index)
            total -= server.weight
            drawn.append(server)
        # Fewest in flight per unit of weight; ties keep the first draw, so an
        # idle pool is picked exactly in proportion to the weights.
        best = drawn[0]
        for server in drawn[1:]:
            if server.in_flight * best.weight < best.in_flight * server.weight:
                best = server
        return best
