"""The request path shared by the balancers.

A balancer subclasses :class:`Balancer` and supplies only
``_choose(candidates)``: the pick among the servers that may take this
request.  Everything else is here, so RoundRobin and LeastRequest behave the
same way around their pick: the sticky cookie, the health and ejection
filters, the retry rule of avoiding ``oxypy.tried_targets``, the environ
copy, and settling the request in ``close()`` (the in-flight count, the
outlier result).

A server is a *candidate* when it is in rotation (state ``ACTIVE``, see
:mod:`oxypy._balance.state`) and its weight is above 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from .. import environ as keys
from .._core.exchange import Mark, mark
from .._core.iterables import ClosingIterable
from .._core.snapshot import BalancerSnapshot
from .._core.types import Clock, Skip, StartResponse, WSGIApplication, WSGIEnvironment
from ..errors import ErrorHandler, default_error_handler, respond_error
from ..exceptions import ConfigurationError, NoServers
from ..health import HealthCheck, OutlierDetection
from ..registry import RedisRegistry
from ..sticky import StickySession
from .address import ServerSpec, check_weight, parse_server
from .health import HealthChecker
from .outlier import count_result, expire_ejections, outcome
from .pool import OnChange, Pool
from .snapshot import balancer_snapshot
from .state import Event, ServerState, State
from .stats import ServerStats, record_exchange
from .sticky import StickyCookies

__all__ = ["Balancer"]


class Balancer:
    """Base of the balancers: picks a server per request and sets ``oxypy.target``.

    Subclasses implement :meth:`_choose`, called with the pool lock held.
    :attr:`pool` is the server pool (internal machinery, read by the
    Rebalancer through :meth:`Pool.members` and :meth:`Pool.reweight`).
    """

    _tracks_in_flight = False
    #: ``(environ) -> str | None``: the request's hash key (ConsistentHash).
    #: When it gives a key, :meth:`_choose_key` picks instead of :meth:`_choose`.
    _key_of: Callable[[WSGIEnvironment], str | None] | None = None

    def __init__(
        self,
        next_app: WSGIApplication,
        servers: Iterable[ServerSpec] = (),
        /,
        *,
        sticky: StickySession | None = None,
        health_check: HealthCheck | None = None,
        outlier_detection: OutlierDetection | None = None,
        on_change: OnChange | None = None,
        registry: RedisRegistry | None = None,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("next_app must be a WSGI callable")
        if sticky is not None and not isinstance(sticky, StickySession):
            raise ConfigurationError("sticky must be a StickySession")
        if health_check is not None and not isinstance(health_check, HealthCheck):
            raise ConfigurationError("health_check must be a HealthCheck")
        if outlier_detection is not None and not isinstance(outlier_detection, OutlierDetection):
            raise ConfigurationError("outlier_detection must be an OutlierDetection")
        if isinstance(servers, str | bytes):
            raise ConfigurationError("servers must be a list of URLs or (url, weight) pairs")
        self.next_app = next_app
        self.error_handler = error_handler
        self.skip = skip
        self.outlier = outlier_detection
        self.cookies = StickyCookies(sticky) if sticky is not None else None
        self.pool = Pool(
            clock=clock,
            on_change=on_change,
            sticky_value=self.cookies.value_for if self.cookies is not None else None,
        )
        seeds: list[tuple[str, int]] = []
        for spec in servers:
            if isinstance(spec, tuple):
                if len(spec) != 2:
                    raise ConfigurationError(f"server must be url or (url, weight): {spec!r}")
                url, weight = spec
            else:
                url, weight = spec, 1
            target, _ = parse_server(url)
            seeds.append((target, check_weight(weight)))
        if registry is None:
            for url, weight in seeds:
                self.pool.upsert(url, weight)
        self._needs_close = self._tracks_in_flight or outlier_detection is not None
        # keep_stats() turns these on for the status page.
        self._count_in_flight = self._tracks_in_flight
        self._marks = outlier_detection is not None
        # Without health checks or ejection a server leaves rotation only when
        # drained, which bumps the pool's version like membership changes, so
        # the candidate list only changes with the pool's version.
        self._static = health_check is None and outlier_detection is None
        self._cached: list[ServerState] = []
        self._cached_version = -1
        self._health_check = health_check
        self._checker: HealthChecker | None = None
        self.registry: RedisRegistry | None = None
        if registry is not None:
            self._follow(registry, seeds)
        elif health_check is not None:
            self._checker = HealthChecker(health_check, self.pool)
            self._checker.start()

    def follow_registry(self, registry: RedisRegistry) -> None:
        """Share this balancer's server set through ``registry`` from now on: what
        ``registry=`` does at construction (the current servers seed a registry
        that does not exist yet; an existing one's set replaces them).

        :class:`ConfigurationError` when it follows one already.

        .. versionadded:: 0.2
        """
        _, members = self.pool.members()
        self._follow(registry, [(url, weight) for _, url, weight in members])

    def _follow(self, registry: RedisRegistry, seeds: list[tuple[str, int]]) -> None:
        if not isinstance(registry, RedisRegistry):
            raise ConfigurationError("registry must be a RedisRegistry")
        if self.registry is not None:
            raise ConfigurationError(f"this balancer follows {self.registry!r} already")
        follower = registry.attach(self.pool, seeds, self._health_check)
        self.registry = registry
        if self._health_check is not None:  # one prober per registry, not one per process
            if self._checker is not None:
                self._checker.stop()  # the local checker gives way to the registry's
            self._checker = HealthChecker(
                self._health_check,
                self.pool,
                leader=follower.is_prober,
                after_round=follower.publish_health,
            )
            self._checker.start()

    # -- runtime changes -------------------------------------------------------
    def upsert_server(self, url: str, weight: int = 1) -> None:
        """Add ``url`` or change its weight; the same server is never duplicated.

        With a registry the change is written to Redis (every process follows)
        and applied here at once; :class:`~oxypy.OxypyError` when Redis fails.
        """
        if self.registry is not None:
            self.registry.upsert(url, check_weight(weight))
            self.registry.apply_now()
        else:
            self.pool.upsert(url, weight)

    def remove_server(self, url: str) -> None:
        """Remove ``url``; :class:`ConfigurationError` if it is not in the pool.

        Requests already sent to it finish normally.  With a registry, as
        :meth:`upsert_server`.
        """
        if self.registry is not None:
            self.registry.remove(url)
            self.registry.apply_now()
        else:
            self.pool.remove(url)

    def drain_server(self, url: str, draining: bool = True) -> None:
        """Stop sending new requests to ``url`` (requests in flight finish), or,
        with ``draining=False``, put it back in rotation.

        :class:`ConfigurationError` if it is not in the pool.  With a registry,
        as :meth:`upsert_server`: every process drains it.

        .. versionadded:: 0.2
        """
        if self.registry is not None:
            self.registry.drain(url, draining)
            self.registry.apply_now()
        elif not self.pool.drain(url, draining):
            raise ConfigurationError(f"server not found: {url!r}")

    def servers(self) -> list[str]:
        """The servers' target URLs, in the order they were added."""
        return self.pool.urls()

    def server_weight(self, url: str) -> int | None:
        """The weight of ``url``, or ``None`` when it is not in the pool (oxy: -1)."""
        return self.pool.weight(url)

    def keep_stats(self) -> None:
        """Keep per-server rolling stats from now on (idempotent).

        :class:`~oxypy.StatusPage` calls it on every balancer it shows: each
        server then counts its requests, 5xx and network errors, latencies,
        retries and hedges over the last minute, and its requests in flight
        (:meth:`snapshot`).  This costs a little on every request, so it is
        off until asked for (benchmarks/blocks.py measures it).
        """
        pool = self.pool
        with pool.lock:
            if pool.keep_stats:
                return
            pool.keep_stats = True
            for server in pool.order:
                server.stats = ServerStats(pool.clock)
        self._marks = self._needs_close = self._count_in_flight = True

    def snapshot(self) -> BalancerSnapshot:
        """The servers now: state, weight, in flight and (when kept) their stats."""
        return balancer_snapshot(
            type(self).__name__,
            self.pool,
            health_check=self._checker.config if self._checker is not None else None,
            outlier_detection=self.outlier is not None,
            sticky=self.cookies is not None,
            in_flight_counted=self._count_in_flight,
            registry=self.registry,
        )

    def close(self) -> None:
        """Stop the health-check greenlet (if any) and close the registry.  Idempotent."""
        if self._checker is not None:
            self._checker.stop()
        if self.registry is not None:
            self.registry.close()

    # -- the pick ----------------------------------------------------------------
    def _choose(self, candidates: list[ServerState]) -> ServerState:
        raise NotImplementedError

    def _choose_key(self, candidates: list[ServerState], key: str) -> ServerState:
        raise NotImplementedError

    def _pick(
        self, environ: WSGIEnvironment, tried: set[str] | None, counted: bool
    ) -> tuple[ServerState | None, bool]:
        """(server or None, whether a new sticky cookie must be set)."""
        pool = self.pool
        events: list[Event] = []
        cookies = self.cookies
        wanted = cookies.requested(environ) if cookies is not None else None
        key = self._key_of(environ) if self._key_of is not None else None
        with pool.lock:
            if self.outlier is not None:
                expire_ejections(pool.order, pool.clock(), events)
            if self._static:
                if self._cached_version != pool.version:
                    self._cached = [
                        s for s in pool.order if s.weight > 0 and s.state is State.ACTIVE
                    ]
                    self._cached_version = pool.version
                candidates = self._cached  # never mutated below: filters make new lists
            else:
                candidates = [s for s in pool.order if s.weight > 0 and s.state is State.ACTIVE]
            chosen: ServerState | None = None
            if candidates and tried:
                fresh = [s for s in candidates if s.url not in tried]
                if fresh:
                    candidates = fresh
            if wanted is not None:
                for server in candidates:
                    if server.sticky_value == wanted:
                        chosen = server
                        break
            set_cookie = cookies is not None and chosen is None
            if chosen is None and candidates:
                if len(candidates) == 1:
                    chosen = candidates[0]
                elif key:
                    chosen = self._choose_key(candidates, key)
                else:
                    chosen = self._choose(candidates)
            if chosen is not None and counted:
                chosen.in_flight += 1
        pool.notify(events)
        return chosen, set_cookie

    def _no_server(self) -> NoServers:
        _, members = self.pool.members()
        if not members:
            return NoServers("no servers in the pool")
        if all(weight == 0 for _, _, weight in members):
            return NoServers("all servers have weight 0")
        return NoServers("no healthy upstream server")

    # -- the WSGI application ----------------------------------------------------
    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        tried: set[str] | None = environ.get(keys.TRIED_TARGETS)
        counted = self._count_in_flight
        server, set_cookie = self._pick(environ, tried, counted)
        if server is None:
            return respond_error(self.error_handler, environ, start_response, self._no_server())
        if tried is not None:
            if tried and server.stats is not None:  # a retry or a hedge
                server.stats.resent(environ.get(keys.ATTEMPT, 1) > 1)
            tried.add(server.url)
        since = mark(environ) if self._marks else None
        env = dict(environ)
        env[keys.TARGET] = server.url
        cookies = self.cookies
        if set_cookie and cookies is not None:
            cookie = ("Set-Cookie", cookies.render(server.url, server.sticky_value))
            outer = start_response

            def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
                headers.append(cookie)
                return outer(status, headers, *exc)

        if not self._needs_close:
            return self.next_app(env, start_response)
        started = self.pool.clock() if server.stats is not None else 0.0
        done = partial(self._done, server, since, counted, started)
        try:
            result = self.next_app(env, start_response)
        except BaseException:
            done()
            raise
        return ClosingIterable(result, done)

    def _done(self, server: ServerState, since: Mark | None, counted: bool, started: float) -> None:
        """Settle one request: release the in-flight slot, feed outlier detection and stats."""
        config = self.outlier
        failed = None
        if since is not None:
            if config is not None:
                failed = outcome(since.since(), server.url)
            stats = server.stats
            if stats is not None:
                record_exchange(stats, since.since(), server.url, self.pool.clock() - started)
        pool = self.pool
        events: list[Event] = []
        with pool.lock:
            if counted:
                server.in_flight -= 1
            if failed is not None and config is not None:
                count_result(config, server, failed, pool.clock(), pool.order, events)
        pool.notify(events)
