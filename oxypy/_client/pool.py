"""The urllib3 seam: every use of urllib3's private names lives in this module.

Forward keeps urllib3 for what it does well (opening connections, TLS
verification, SNI, client certificates, proxies via a user's ``PoolManager``)
and runs each exchange itself (:mod:`oxypy._client.exchange`).  That needs
four things urllib3 only offers privately on ``HTTPConnectionPool``:

* ``pool.pool``: the LIFO queue of idle connections (``None`` marks a free
  slot), read here to check a connection out without urllib3's ``poll()``,
  to stamp idle times and to sweep connections idle too long;
* ``pool._new_conn()``: a configured, unconnected connection;
* ``pool._put_conn(conn)``: give a connection (or a free slot) back;
* ``pool._get_conn(timeout)``: not used: :meth:`HostPool.checkout` replaces it.

Besides those, only public names are used: ``PoolManager.connection_from_host``,
``pool.scheme``/``pool.block``, ``conn.connect()``/``conn.close()``/``conn.sock``
and ``conn.is_connected``.  ``tests/test_client_pool.py`` runs against the
oldest and the newest urllib3 the pin allows (``.ci/run``).

The interface the rest of oxypy sees is :class:`Pools` (one per Forward) and
:class:`HostPool` (one per upstream ``scheme://host:port``):
``checkout() -> (conn, reused)``, ``checkin(conn)``, ``discard(conn)``,
``detach(conn) -> socket`` and ``closed``.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable
from queue import Empty, Full
from typing import Any

import gevent
import urllib3
from urllib3.exceptions import ClosedPoolError, EmptyPoolError

from .._core.sockets import peer_closed
from ..exceptions import UpstreamConnectError
from .errors import CONNECT, map_exceptions

__all__ = ["HostPool", "Pools"]

log = logging.getLogger(__name__)

#: Attribute stamped on a pooled connection: when it went idle (clock seconds).
_IDLE_SINCE = "_oxypy_idle_since"


class HostPool:
    """The kept-alive connections to one upstream ``scheme://host:port``."""

    __slots__ = ("_pool", "_idle_timeout", "_clock", "_owner", "__weakref__")

    def __init__(self, pool: Any, owner: Pools) -> None:
        self._pool = pool  # a urllib3 HTTPConnectionPool
        self._idle_timeout = owner.idle_timeout
        self._clock = owner.clock
        self._owner = owner

    @property
    def closed(self) -> bool:
        """True once the owning ``PoolManager`` dropped or closed this pool."""
        return self._pool.pool is None

    @property
    def opened(self) -> int:
        """How many connections this pool has opened so far."""
        return int(self._pool.num_connections)

    @property
    def slots(self) -> int:
        """Entries in the pool queue: idle connections plus free slots (<= maxsize)."""
        queue = self._pool.pool
        return 0 if queue is None else int(queue.qsize())

    @property
    def idle(self) -> int:
        """How many connections sit idle in the pool (kept alive, connected)."""
        queue = self._pool.pool
        if queue is None:
            return 0
        return sum(1 for conn in list(queue.queue) if conn is not None and conn.sock is not None)

    def checkout(
        self, pool_timeout: float | None, connect_timeout: float | None = None
    ) -> tuple[Any, bool]:
        """A connected connection and whether it was reused from the pool.

        A pooled connection that the peer closed, that holds unexpected bytes,
        or that stayed idle longer than the idle bound is closed and replaced
        by a fresh one.  Connect failures raise the mapped :class:`UpstreamError`.
        ``connect_timeout`` caps this connect below the pool's own (a deadline).
        """
        pool = self._pool
        queue = pool.pool
        if queue is None:
            raise UpstreamConnectError("no upstream connection available") from ClosedPoolError(
                pool, "Pool is closed."
            )
        try:
            conn = queue.get(block=pool.block, timeout=pool_timeout)
        except Empty as exc:
            if pool.block:
                raise UpstreamConnectError("no upstream connection available") from EmptyPoolError(
                    pool, "Pool is empty."
                )
            del exc
            conn = None
        if conn is not None and conn.sock is not None and not self._alive(conn):
            conn.close()
        if conn is None:
            conn = pool._new_conn()
        if conn.sock is not None:
            return conn, True
        saved = conn.timeout
        if connect_timeout is not None and (
            not isinstance(saved, (int, float)) or connect_timeout < saved
        ):
            conn.timeout = connect_timeout
        try:
            with map_exceptions(CONNECT):
                conn.connect()
        except BaseException:
            self.discard(conn)
            raise
        finally:
            conn.timeout = saved
        return conn, False

    def _alive(self, conn: Any) -> bool:
        if self._idle_timeout is not None:
            since = getattr(conn, _IDLE_SINCE, None)
            if since is not None and self._clock() - since > self._idle_timeout:
                return False
        if self._pool.scheme == "https":
            # A peek cannot see through TLS records: urllib3's own check.
            return bool(conn.is_connected)
        # Plain TCP: one non-blocking peek instead of a poll object (a large
        # share of a small request's CPU under gevent).
        return not peer_closed(conn.sock)

    def checkin(self, conn: Any) -> None:
        """Give back a connection whose response was read to the end with keep-alive."""
        setattr(conn, _IDLE_SINCE, self._clock())
        self._pool._put_conn(conn)
        if self._idle_timeout is not None and self._owner._sweeper is None and _cooperative():
            self._owner._start_sweeper()

    def discard(self, conn: Any) -> None:
        """Close ``conn`` and free its slot."""
        try:
            conn.close()
        finally:
            self._free_slot()

    def detach(self, conn: Any) -> Any:
        """Hand the raw socket over (a WebSocket tunnel owns it now); the slot is freed."""
        sock = conn.sock
        conn.sock = None
        self._free_slot()
        return sock

    def _free_slot(self) -> None:
        queue = self._pool.pool
        if queue is None:
            return
        try:
            queue.put(None, block=False)
        except Full:
            pass  # the connection was made beyond maxsize (block=False): no slot to free

    def sweep(self) -> int:
        """Close the connections idle longer than the bound; how many were closed."""
        queue = self._pool.pool
        if queue is None or self._idle_timeout is None:
            return 0
        limit = self._clock() - self._idle_timeout
        kept: list[Any] = []
        closed = 0
        while True:
            try:
                conn = queue.get(block=False)
            except Empty:
                break
            since = getattr(conn, _IDLE_SINCE, None) if conn is not None else None
            if conn is not None and conn.sock is not None and since is not None and since < limit:
                conn.close()
                closed += 1
                conn = None
            kept.append(conn)
        # LIFO: free slots at the bottom, live connections back in their order
        # (the most recently used on top, where the next checkout looks).
        for conn in [c for c in kept if c is None] + [c for c in reversed(kept) if c is not None]:
            try:
                queue.put(conn, block=False)
            except Full:  # pragma: no cover - only what was taken goes back
                if conn is not None:
                    conn.close()
        return closed


class Pools:
    """Forward's upstream pools: one :class:`HostPool` per ``scheme://host:port``.

    With an idle bound, a timer on the gevent hub sweeps idle connections
    every half bound (at most every 30 s), so an idle process releases them
    too.  It is a loop timer, not a greenlet: the sweep never blocks (it only
    closes sockets), the timer does not keep the hub alive (``ref=False``),
    it holds the pools weakly and stops with :meth:`close` or once Forward is
    collected.  In a process gevent did not patch (Forward under a threaded
    server, whose threads run no hub) there is no sweeper: only the checkout
    check runs.
    """

    def __init__(
        self,
        manager: urllib3.PoolManager,
        idle_timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._hosts: weakref.WeakValueDictionary[tuple[str, str, int], HostPool] = (
            weakref.WeakValueDictionary()
        )
        self._sweeper: Any = None  # the hub's timer watcher

    def host(self, scheme: str, host: str, port: int) -> HostPool:
        """The pool for one upstream (created by the manager on first use)."""
        key = (scheme, host, port)
        found = self._hosts.get(key)
        if found is not None and not found.closed:
            return found
        found = HostPool(self.manager.connection_from_host(host, port, scheme), self)
        self._hosts[key] = found
        return found

    def _start_sweeper(self) -> None:
        # Started by the first connection kept alive in this process (never at
        # construction, which may run in a pre-fork master).
        assert self.idle_timeout is not None
        interval = min(max(self.idle_timeout / 2, 0.05), 30.0)
        timer = gevent.get_hub().loop.timer(interval, interval, ref=False)
        ref = weakref.ref(self)

        def tick() -> None:
            pools = ref()
            if pools is None or pools._sweeper is not timer:
                timer.close()
                return
            try:
                pools.sweep()
            except Exception:  # noqa: BLE001 - a timer callback must never raise into the hub
                log.warning("sweeping idle upstream connections failed", exc_info=True)

        _ALL.add(self)
        self._sweeper = timer
        timer.start(tick)

    def sweep(self) -> int:
        """Close every connection idle longer than the bound, in every pool."""
        return sum(pool.sweep() for pool in list(self._hosts.values()))

    def close(self) -> None:
        """Close every pooled connection and stop the sweeper."""
        timer, self._sweeper = self._sweeper, None
        if timer is not None:
            timer.close()
        self.manager.clear()


def _cooperative() -> bool:
    """Whether gevent patched the process (its hub then runs the sweeper)."""
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


#: Pools with a sweeper: a forked child starts its own on its first checkin.
_ALL: weakref.WeakSet[Pools] = weakref.WeakSet()


def _forget_sweepers() -> None:
    for pools in list(_ALL):
        pools._sweeper = None  # the inherited timer stops itself at its next tick


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_sweepers)
