"""ConsistentHash: the same key reaches the same server, from every process.

Weighted rendezvous hashing (HRW, as Traefik's ``hrw`` balancer): each
candidate server scores ``-weight / ln(u)``, where ``u`` in (0, 1) comes from
BLAKE2b over the key and the server's identity (scheme, host, port, path),
and the highest score wins.  Nothing is shared and nothing is random, so every
worker and host with the same server list maps a key to the same server;
removing a server moves only the keys it had; adding one moves to it only its
``weight / total`` share; a server of weight 3 beside one of weight 1 gets 75%
of the keys.  The candidates are the ones the shared balancer path hands over
(see :mod:`oxypy._balance`), so an unhealthy or ejected server's keys go to
their next-best server and come back when it returns, and a retry avoids the
servers already tried.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from hashlib import blake2b

from ._balance.address import ServerSpec
from ._balance.balancer import Balancer
from ._balance.pool import OnChange
from ._balance.state import ServerState, State
from ._core.net import TrustedProxies
from ._core.types import Clock, Skip, WSGIApplication
from .errors import ErrorHandler, default_error_handler
from .extractors import Source, SourceExtractor
from .health import HealthCheck, OutlierDetection
from .registry import RedisRegistry
from .roundrobin import RoundRobin
from .sticky import StickySession

__all__ = ["ConsistentHash"]

_SCALE = 2.0**-52


def _unit(digest: bytes) -> float:
    """The top 52 bits of ``digest`` as a float in the open interval (0, 1)."""
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) * _SCALE


class ConsistentHash(Balancer):
    """Send every request with the same key to the same server (weighted rendezvous).

    The key is read from the request by ``key`` (the sources of
    :class:`~oxypy.RateLimit`).  Among the servers that may take the request
    (in rotation, weight above 0, not yet tried by a retry) the one with the
    highest score ``-weight / ln(u)`` wins, ``u`` in (0, 1) being the top 52 bits of
    BLAKE2b(key, NUL, server identity).  Scores depend only on the key and
    the server's identity, so separate processes and hosts agree without
    sharing anything, and runtime changes (:meth:`upsert_server`,
    :meth:`remove_server`) move only the keys that must move.  A sticky
    cookie, when configured and valid, wins over the hash.

    A request without a key (no such header, cookie or address, or an empty
    value) is still served: it gets the next pick of the smooth weighted
    round robin of :class:`~oxypy.RoundRobin`, so keyless traffic is spread
    by weight.

    **Reads** the key source, ``oxypy.tried_targets``, the sticky cookie.
    **Writes** ``oxypy.target`` (on a shallow copy of the environ),
    ``oxypy.tried_targets``, ``Set-Cookie`` (sticky).  Failure: no server to
    pick answers **503** ``NoServers`` through ``error_handler``, as on
    RoundRobin.  Cost: one BLAKE2b of the key per candidate server.

    :param servers: URLs, or ``(url, weight)`` pairs (weight: int >= 0, default 1).
    :param key: ``"client.ip"`` (default), ``"request.host"``,
        ``"request.header.<Name>"``, ``"request.cookie.<Name>"`` or a callable
        ``(environ) -> str | None``.
    :param trusted_proxies: CIDRs whose ``X-Forwarded-For`` ``"client.ip"``
        believes (the rule of ``Forward``); none by default (the peer address).
    :param sticky: see :class:`~oxypy.RoundRobin`.  So are ``health_check``,
        ``outlier_detection``, ``on_change``, ``registry``, ``error_handler``, ``skip``, ``clock``.

    Example::

        from oxypy import ConsistentHash, Forward
        lb = ConsistentHash(
            Forward(),
            ["http://127.0.0.1:9001", ("http://127.0.0.1:9002", 2)],
            key="request.header.X-Tenant",
        )

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        servers: Iterable[ServerSpec] = (),
        /,
        *,
        key: str | SourceExtractor = "client.ip",
        trusted_proxies: Iterable[str] | TrustedProxies | None = None,
        sticky: StickySession | None = None,
        health_check: HealthCheck | None = None,
        outlier_detection: OutlierDetection | None = None,
        on_change: OnChange | None = None,
        registry: RedisRegistry | None = None,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._key_of = Source(key, trusted_proxies=trusted_proxies).extract
        self.key = key
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

    def _choose(self, candidates: list[ServerState]) -> ServerState:
        # A request without a key: the smooth weighted round robin pick.
        return RoundRobin._choose(self, candidates)  # type: ignore[arg-type]

    def _choose_key(self, candidates: list[ServerState], key: str) -> ServerState:
        prefix = key.encode("utf-8", "surrogatepass") + b"\x00"
        weight = candidates[0].weight
        best = candidates[0]
        if all(server.weight == weight for server in candidates):
            # Equal weights: -w / ln(u) grows with u, so the largest digest
            # (big-endian bytes compare as integers) wins; no float maths.
            best_digest = b""
            for server in candidates:
                digest = blake2b(
                    prefix + server.identity.encode("utf-8", "surrogatepass"), digest_size=8
                ).digest()
                if digest > best_digest:
                    best, best_digest = server, digest
            return best
        best, best_score = candidates[0], -1.0
        log = math.log
        for server in candidates:
            digest = blake2b(
                prefix + server.identity.encode("utf-8", "surrogatepass"), digest_size=8
            ).digest()
            score = -server.weight / log(_unit(digest))
            if score > best_score:
                best, best_score = server, score
        return best

    def server_for(self, key: str) -> str | None:
        """The URL that requests with ``key`` reach now (None: no server in rotation).

        The pick of a request without sticky cookie and without retries; a
        falsy ``key`` gives None (such a request gets a round robin pick).
        """
        if not key:
            return None
        with self.pool.lock:
            candidates = [s for s in self.pool.order if s.weight > 0 and s.state is State.ACTIVE]
            return self._choose_key(candidates, key).url if candidates else None
