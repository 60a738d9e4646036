"""Machinery shared by the balancers: the server pool and the request path.

A balancer owns one :class:`Pool` (server records behind one lock) and
subclasses :class:`Balancer`, supplying only ``_choose(candidates)``: the
pick among the servers that may take this request.  Everything else, the
sticky cookie, health and ejection filters, the retry rule of avoiding
``oxypy.tried_targets``, the environ copy and the cleanup in ``close()``, is
here, so RoundRobin and LeastRequest behave the same way around their pick.

Theory of operation: a server is *available* when it is healthy (active
checks) and not ejected (passive outlier detection); it is a *candidate*
when it is available and its weight is above 0.  Ejections expire lazily:
each pick first returns servers whose ejection time has passed.  State
changes are collected under the lock and reported to ``on_change`` after it
is released, so a slow listener never blocks picks.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import environ as keys
from .._core.exchange import Mark, mark, upstream_verdict
from .._core.iterables import ClosingIterable
from .._core.types import Clock, Skip, StartResponse, WSGIApplication, WSGIEnvironment
from ..errors import ErrorHandler, respond_error
from ..exceptions import ConfigurationError, NoServers

if TYPE_CHECKING:
    from ..health import HealthCheck, OutlierDetection, _HealthChecker
    from ..sticky import StickySession

__all__ = ["Balancer", "OnChange", "Pool", "ServerSpec", "ServerState", "parse_server"]

log = logging.getLogger(__name__)

#: ``on_change(server_url, event)``; events: ``added``, ``removed``,
#: ``unhealthy``, ``healthy``, ``ejected``, ``returned``.
OnChange = Callable[[str, str], Any]

#: A server as the constructors take it: a URL, or ``(url, weight)``.
ServerSpec = str | tuple[str, int]

Event = tuple[str, str]


def parse_server(url: object) -> tuple[str, str]:
    """Validate a server URL; return ``(target_url, identity)``.

    The target URL is the URL without userinfo (it may end up in a cookie or
    a log).  The identity is scheme + host + port + path, normalised: the
    scheme and host are lower-cased, the default port is made explicit and an
    empty path is ``/``, so ``http://A:80`` and ``http://a/`` are one server.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"server URL must be a string, got {url!r}")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"server URL must be http(s)://host[:port][/path]: {url!r}")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"server URL must not carry a query or fragment: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid port in server URL {url!r}") from exc
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    target = f"{scheme}://{shown}{'' if port is None else f':{port}'}{parts.path}"
    identity = f"{scheme}://{shown}:{port or default}{parts.path or '/'}"
    return target, identity


def check_weight(weight: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise ConfigurationError(f"server weight must be an int >= 0, got {weight!r}")
    return weight


class ServerState:
    """One server's record; every field is guarded by the pool's lock."""

    __slots__ = (
        "url",
        "identity",
        "weight",
        "current",
        "in_flight",
        "healthy",
        "check_streak",
        "ejected_until",
        "ejections",
        "returned_at",
        "consecutive_errors",
        "recent",
        "sticky_value",
        "member",
    )

    def __init__(self, url: str, identity: str, weight: int) -> None:
        self.url = url
        self.identity = identity
        self.weight = weight
        self.current = 0  # smooth WRR running weight
        self.in_flight = 0
        self.healthy = True
        self.check_streak = 0  # >0: consecutive passes, <0: consecutive failures
        self.ejected_until: float | None = None
        self.ejections = 0
        self.returned_at: float | None = None
        self.consecutive_errors = 0
        self.recent: deque[bool] = deque()
        self.sticky_value = ""
        self.member = True  # False once removed from the pool

    @property
    def available(self) -> bool:
        return self.healthy and self.ejected_until is None


class Pool:
    """The servers of one balancer, in insertion order, behind one lock."""

    def __init__(
        self,
        *,
        clock: Clock,
        on_change: OnChange | None,
        sticky: StickySession | None,
        outlier: OutlierDetection | None,
    ) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.on_change = on_change
        self.sticky = sticky
        self.outlier = outlier
        self.by_identity: dict[str, ServerState] = {}
        self.order: list[ServerState] = []
        #: bumped on every upsert/remove (the Rebalancer watches it)
        self.version = 0

    # -- membership ------------------------------------------------------------
    def upsert(self, url: object, weight: object) -> None:
        target, identity = parse_server(url)
        weight = check_weight(weight)
        events: list[Event] = []
        with self.lock:
            found = self.by_identity.get(identity)
            if found is None:
                found = ServerState(target, identity, weight)
                if self.sticky is not None:
                    found.sticky_value = self.sticky.value_for(target, identity)
                self.by_identity[identity] = found
                self.order = [*self.order, found]
                events.append((target, "added"))
            else:
                found.weight = weight
            for server in self.order:  # restart the smooth sequence, as oxy resets its iterator
                server.current = 0
            self.version += 1
        self.notify(events)

    def remove(self, url: object) -> None:
        _, identity = parse_server(url)
        with self.lock:
            found = self.by_identity.pop(identity, None)
            if found is None:
                raise ConfigurationError(f"server not found: {url!r}")
            found.member = False
            self.order = [s for s in self.order if s is not found]
            for server in self.order:
                server.current = 0
            self.version += 1
        self.notify([(found.url, "removed")])

    def urls(self) -> list[str]:
        with self.lock:
            return [s.url for s in self.order]

    def weight(self, url: object) -> int | None:
        _, identity = parse_server(url)
        with self.lock:
            found = self.by_identity.get(identity)
            return None if found is None else found.weight

    def snapshot(self) -> list[ServerState]:
        with self.lock:
            return list(self.order)

    # -- state changes (call with the lock held; report the events after) -----
    def expire_ejections(self, now: float, events: list[Event]) -> None:
        for server in self.order:
            until = server.ejected_until
            if until is not None and now >= until:
                server.ejected_until = None
                server.returned_at = now
                server.consecutive_errors = 0
                server.recent.clear()
                events.append((server.url, "returned"))

    def notify(self, events: list[Event]) -> None:
        if not events or self.on_change is None:
            return
        for url, event in events:
            try:
                self.on_change(url, event)
            except Exception:  # a user's listener must not break requests or checks
                log.exception("on_change listener failed for %s %s", url, event)


class Balancer:
    """Base of the balancers: picks a server per request and sets ``oxypy.target``.

    Subclasses implement :meth:`_choose`, called with the pool lock held.
    """

    _tracks_in_flight = False

    def __init__(
        self,
        next_app: WSGIApplication,
        servers: Iterable[ServerSpec],
        *,
        sticky: StickySession | None,
        health_check: HealthCheck | None,
        outlier_detection: OutlierDetection | None,
        on_change: OnChange | None,
        error_handler: ErrorHandler,
        skip: Skip | None,
        clock: Clock,
    ) -> None:
        from ..health import HealthCheck, OutlierDetection, _HealthChecker
        from ..sticky import StickySession

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
        self.sticky = sticky
        self.outlier = outlier_detection
        self._pool = Pool(
            clock=clock, on_change=on_change, sticky=sticky, outlier=outlier_detection
        )
        for spec in servers:
            if isinstance(spec, tuple):
                if len(spec) != 2:
                    raise ConfigurationError(f"server must be url or (url, weight): {spec!r}")
                self._pool.upsert(spec[0], spec[1])
            else:
                self._pool.upsert(spec, 1)
        self._needs_close = self._tracks_in_flight or outlier_detection is not None
        # Without health checks or ejection a server's availability never
        # changes, so the candidate list only changes with the pool's version.
        self._static = health_check is None and outlier_detection is None
        self._cached: list[ServerState] = []
        self._cached_version = -1
        self._checker: _HealthChecker | None = None
        if health_check is not None:
            self._checker = _HealthChecker(health_check, self._pool)
            self._checker.start()

    # -- runtime changes -------------------------------------------------------
    def upsert_server(self, url: str, weight: int = 1) -> None:
        """Add ``url`` or change its weight; the same server is never duplicated."""
        self._pool.upsert(url, weight)

    def remove_server(self, url: str) -> None:
        """Remove ``url``; :class:`ConfigurationError` if it is not in the pool.

        Requests already sent to it finish normally.
        """
        self._pool.remove(url)

    def servers(self) -> list[str]:
        """The servers' target URLs, in the order they were added."""
        return self._pool.urls()

    def server_weight(self, url: str) -> int | None:
        """The weight of ``url``, or ``None`` when it is not in the pool (oxy: -1)."""
        return self._pool.weight(url)

    def close(self) -> None:
        """Stop the health-check greenlet (if any).  Idempotent."""
        if self._checker is not None:
            self._checker.stop()

    # -- the pick ----------------------------------------------------------------
    def _choose(self, candidates: list[ServerState]) -> ServerState:
        raise NotImplementedError

    def _pick(
        self, environ: WSGIEnvironment, tried: set[str] | None
    ) -> tuple[ServerState | None, bool]:
        """(server or None, whether a new sticky cookie must be set)."""
        pool = self._pool
        events: list[Event] = []
        sticky = self.sticky
        wanted = sticky.requested(environ) if sticky is not None else None
        with pool.lock:
            if self.outlier is not None:
                pool.expire_ejections(pool.clock(), events)
            if self._static:
                if self._cached_version != pool.version:
                    self._cached = [s for s in pool.order if s.weight > 0]
                    self._cached_version = pool.version
                candidates = self._cached  # never mutated below: filters make new lists
            else:
                candidates = [s for s in pool.order if s.weight > 0 and s.available]
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
            set_cookie = sticky is not None and chosen is None
            if chosen is None and candidates:
                chosen = candidates[0] if len(candidates) == 1 else self._choose(candidates)
            if chosen is not None and self._tracks_in_flight:
                chosen.in_flight += 1
        if events:
            pool.notify(events)
        return chosen, set_cookie

    def _no_server(self) -> NoServers:
        with self._pool.lock:
            order = self._pool.order
            if not order:
                return NoServers("no servers in the pool")
            if all(s.weight == 0 for s in order):
                return NoServers("all servers have weight 0")
        return NoServers("no healthy upstream server")

    # -- the WSGI application ----------------------------------------------------
    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        tried: set[str] | None = environ.get(keys.TRIED_TARGETS)
        server, set_cookie = self._pick(environ, tried)
        if server is None:
            return respond_error(self.error_handler, environ, start_response, self._no_server())
        if tried is not None:
            tried.add(server.url)
        since = mark(environ) if self.outlier is not None else None
        env = dict(environ)
        env[keys.TARGET] = server.url
        sticky = self.sticky
        if set_cookie and sticky is not None:
            cookie = ("Set-Cookie", sticky.render(server.url, server.sticky_value))
            outer = start_response

            def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
                headers.append(cookie)
                return outer(status, headers, *exc)

        if not self._needs_close:
            return self.next_app(env, start_response)
        done = partial(self._done, server, since)
        try:
            result = self.next_app(env, start_response)
        except BaseException:
            done()
            raise
        return ClosingIterable(result, done)

    def _done(self, server: ServerState, since: Mark | None) -> None:
        """Settle one request: release the in-flight slot, feed outlier detection."""
        outlier = self.outlier
        failed: bool | None = None
        if outlier is not None and since is not None:
            for record in since.since():
                if record.target != server.url:
                    continue
                verdict = upstream_verdict(record)  # None for a client that went away
                if verdict is True:
                    failed = True
                elif verdict is False and failed is None:
                    failed = False
        pool = self._pool
        events: list[Event] = []
        with pool.lock:
            if self._tracks_in_flight:
                server.in_flight -= 1
            if failed is not None and outlier is not None and server.member:
                outlier._record(server, failed, pool.clock(), pool.order, events)
        pool.notify(events)
