"""ConnLimit: cap the requests each source has in flight at once.

A request takes a slot for its source before the next app runs and gives it
back when the response iterable is closed, so a streaming response holds its
slot until the last byte (or the client's abort).  Over the cap the request is
answered 429 at once, never queued.  Slots are counted in memory per process
by default, or as expiring leases in Redis (:class:`oxypy.RedisConnStore`) so
the cap holds across processes and a dead worker's slots come back.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

from ._core.iterables import ClosingIterable
from ._core.locks import short_lock
from ._core.net import TrustedProxies
from ._core.observe import observe
from ._core.snapshot import BlockSnapshot, describe_store
from ._core.types import Clock, Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .errors import ErrorHandler, default_error_handler, respond_error
from .exceptions import ConfigurationError, ConnLimitReached
from .extractors import Missing, Source, SourceExtractor

__all__ = ["ConnLimit", "ConnStore", "Lease", "MemoryConnStore"]


class Lease(Protocol):
    """One taken slot.  ``release()`` is idempotent.

    ``refresh_every`` > 0 asks ConnLimit to call ``refresh()`` at least that
    often (in seconds, checked as body chunks pass) while the response streams.
    """

    refresh_every: float

    def release(self) -> None: ...

    def refresh(self) -> None: ...


class ConnStore(Protocol):
    """Where slots are counted: ``acquire`` returns a lease, or None at the limit."""

    def acquire(self, key: str, limit: int) -> Lease | None: ...


class _MemoryLease:
    __slots__ = ("_store", "_key", "_released")

    refresh_every = 0.0

    def __init__(self, store: MemoryConnStore, key: str) -> None:
        self._store = store
        self._key = key
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._store._release(self._key)

    def refresh(self) -> None:
        return None


class MemoryConnStore:
    """In-process counters; an entry exists only while its source has requests in flight."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = short_lock()  # dict updates only: never yields

    def in_flight(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)

    def usage(self) -> tuple[int, int]:
        """``(requests in flight, the most any one source has)``."""
        with self._lock:
            counts = list(self._counts.values())
        return sum(counts), max(counts, default=0)

    def acquire(self, key: str, limit: int) -> Lease | None:
        with self._lock:
            count = self._counts.get(key, 0)
            if count >= limit:
                return None
            self._counts[key] = count + 1
        return _MemoryLease(self, key)

    def _release(self, key: str) -> None:
        with self._lock:
            count = self._counts.get(key, 0) - 1
            if count > 0:
                self._counts[key] = count
            else:
                self._counts.pop(key, None)


class _Refresher:
    """``on_chunk`` for a streaming body: refresh ``lease`` when due."""

    __slots__ = ("_lease", "_clock", "_due")

    def __init__(self, lease: Lease, clock: Clock) -> None:
        self._lease = lease
        self._clock = clock
        self._due = clock() + lease.refresh_every

    def __call__(self, chunk: bytes) -> None:
        now = self._clock()
        if now >= self._due:
            self._lease.refresh()
            self._due = self._clock() + self._lease.refresh_every


class ConnLimit:
    """Allow at most ``max_conns`` requests in flight per source; 429 over it.

    **Reads** the source (see :class:`oxypy.RateLimit`).  **Writes**
    ``oxypy.error`` on rejection.  Streams; the slot is held until the
    response iterable is closed: a streaming response keeps it to the end, and
    an error raised by the next app or a client abort gives it back.

    Failures: over the cap → 429 :class:`ConnLimitReached` with a short
    plain-text body, at once (no queueing); no source value under
    ``missing="reject"`` → 400.

    :param next_app: the WSGI app to protect.
    :param max_conns: requests in flight per source (0 rejects every request).
    :param source: ``"client.ip"``, ``"request.host"``, ``"request.header.<Name>"``
        or a callable ``(environ) -> str | None``.
    :param missing: ``"reject"`` | ``"shared"`` | ``"skip"`` for requests without a source.
    :param trusted_proxies: CIDRs whose ``X-Forwarded-For`` ``client.ip`` believes.
    :param depth: at most this many trusted hops back into ``X-Forwarded-For``.
    :param store: a :class:`ConnStore`; default :class:`MemoryConnStore` (per process).
    :param clock: monotonic seconds, for lease refreshes while streaming.
    :param error_handler: answers the 429/400.
    :param skip: ``(environ) -> bool``; True passes the request through uncounted.

    Example::

        from oxypy import ConnLimit, Forward, serve
        app = ConnLimit(Forward("http://127.0.0.1:9000"), max_conns=10)
        serve(app, "127.0.0.1:8080")

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        max_conns: int,
        source: str | SourceExtractor = "client.ip",
        missing: Missing = "reject",
        trusted_proxies: Iterable[str] | TrustedProxies | None = None,
        depth: int = 0,
        store: ConnStore | None = None,
        clock: Clock = time.monotonic,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("ConnLimit needs the next WSGI app as first argument")
        if isinstance(max_conns, bool) or not isinstance(max_conns, int) or max_conns < 0:
            raise ConfigurationError(f"max_conns must be an integer >= 0, got {max_conns!r}")
        self.next_app = next_app
        self.max_conns = max_conns
        self.source = Source(source, missing=missing, trusted_proxies=trusted_proxies, depth=depth)
        self.store: ConnStore = store if store is not None else MemoryConnStore()
        self.clock = clock
        self.error_handler = error_handler
        self.skip = skip
        #: requests refused with 429 since creation (the status page)
        self.rejected = 0

    def snapshot(self) -> BlockSnapshot:
        """``{"kind", "max_conns", "store", "in_flight", "sources", "busiest", "rejected"}``
        for the status page; the use fields are None for a store other than the
        in-memory one.

        .. versionadded:: 0.3
        """
        store = self.store
        in_flight = sources = busiest = None
        if isinstance(store, MemoryConnStore):
            sources = len(store)
            in_flight, busiest = store.usage()
        return {
            "kind": "ConnLimit",
            "max_conns": self.max_conns,
            "store": describe_store(store),
            "in_flight": in_flight,
            "sources": sources,
            "busiest": busiest,
            "rejected": self.rejected,
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        key = self.source.gate(self, environ, start_response)
        if not isinstance(key, str):
            return key  # skipped, unkeyed or refused: already answered
        lease = self.store.acquire(key, self.max_conns)
        if lease is None:
            self.rejected += 1
            reached = ConnLimitReached(f"connection limit reached: {self.max_conns} in flight")
            return respond_error(self.error_handler, environ, start_response, reached)
        if lease.refresh_every > 0:
            refresh = _Refresher(lease, self.clock)
            return observe(
                self.next_app, environ, start_response, lambda _: lease.release(), on_chunk=refresh
            )
        # Nothing to watch as the body passes: the slot only has to come back
        # when the body is closed, or at once when the next app raises.
        try:
            result = self.next_app(environ, start_response)
        except BaseException:
            lease.release()
            raise
        return ClosingIterable(result, lease.release)
