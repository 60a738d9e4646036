"""The urllib3 seam: every use of urllib3's private names lives in this module.

Forward keeps urllib3 for what it does well (opening connections, TLS
verification, SNI, client certificates, proxies via a user's ``PoolManager``)
and runs each exchange itself (:mod:`oxypy._client.exchange`).  That needs
one thing urllib3 only offers privately on ``HTTPConnectionPool``:

* ``pool._new_conn()``: a configured, unconnected connection.

The idle connections are not kept in urllib3's queue (``pool.pool``) but in
this module's own LIFO per urllib3 pool (:class:`_Idle`, hung on the pool
object, so every Forward sharing a ``PoolManager`` shares it).  urllib3's
queue is a ``queue.LifoQueue``: when urllib3 was imported before gevent
patched the process (gunicorn's master imports the worker class, hence
oxypy and urllib3, before the worker patches), it is the standard library's
queue on gevent's locks, whose ``Condition.notify`` tests ownership with a
non-blocking ``acquire`` that yields to the hub: every checkout and checkin
switched greenlets (~17 µs of CPU per proxied request under the gunicorn
worker).  The LIFO here is a list and two counters under the C lock
(:func:`~oxypy._core.locks.short_lock`: no section yields), the same
whatever was imported first; only a checkout that must wait for a slot
(a user's ``PoolManager(block=True)``) waits on an event.

Semantics are urllib3's: ``maxsize`` tokens per pool, each an idle
connection or a free slot.  A checkout takes the most recently used idle
connection, else a free slot (a new connection), else waits up to
``pool_timeout`` with ``block=True`` (then "no upstream connection
available") or opens a connection beyond ``maxsize`` with ``block=False``;
a checkin keeps the connection when fewer than ``maxsize`` tokens are
there, else closes it.  Waiters are served first come, first served.

Besides those, only public names are used: ``PoolManager.connection_from_host``,
``PoolManager.clear``, ``pool.pool`` (``None`` once the manager closed the
pool), ``pool.pool.maxsize``, ``pool.scheme``/``pool.block``/
``pool.num_connections``, ``conn.connect()``/``conn.close()``/``conn.sock``
and ``conn.is_connected``.  ``tests/test_client.py`` runs against the oldest
and the newest urllib3 the pin allows (``.ci/run``).

The interface the rest of oxypy sees is :class:`Pools` (one per Forward) and
:class:`HostPool` (one per upstream ``scheme://host:port``):
``checkout() -> (conn, reused)``, ``checkin(conn)``, ``discard(conn)``,
``detach(conn) -> socket`` and ``closed``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import urllib3
from urllib3.exceptions import ClosedPoolError, EmptyPoolError

from .._core.locks import short_lock
from .._core.sockets import peer_closed
from ..exceptions import UpstreamConnectError
from .errors import CONNECT, map_exceptions

__all__ = ["HostPool", "Pools"]

log = logging.getLogger(__name__)

#: Attribute stamped on a pooled connection: when it went idle (clock seconds).
_IDLE_SINCE = "_oxypy_idle_since"
#: Attribute of a urllib3 pool holding its :class:`_Idle`.
_IDLE = "_oxypy_idle"
#: Guards the creation of a pool's :class:`_Idle` (two threads, one pool).
_CREATE = short_lock()


class _Waiter:
    """A checkout waiting for a token (``block=True``); served first come, first served."""

    __slots__ = ("event", "served", "conn")

    def __init__(self) -> None:
        # Looked up now: gevent's Event once the process is patched, else the thread one.
        self.event = threading.Event()
        self.served = False
        self.conn: Any = None  # the connection handed over, or None for a free slot


class _Idle:
    """The tokens of one urllib3 pool: idle connections (LIFO) and free slots."""

    __slots__ = ("conns", "free", "maxsize", "lock", "waiters", "__weakref__")

    def __init__(self, maxsize: int) -> None:
        self.conns: list[Any] = []  # idle connections, the most recently used last
        self.free = maxsize  # slots neither idle nor checked out
        self.maxsize = maxsize
        self.lock = short_lock()  # no section under it yields
        self.waiters: deque[_Waiter] = deque()

    def take(self) -> tuple[bool, Any]:
        """``(True, conn or None)`` when a token was there, ``(False, None)`` if not."""
        with self.lock:
            return self._grab()

    def _grab(self) -> tuple[bool, Any]:
        """:meth:`take` with the lock held."""
        if self.conns:
            return True, self.conns.pop()
        if self.free > 0:
            self.free -= 1
            return True, None
        return False, None

    def wait(self, timeout: float | None) -> tuple[bool, Any]:
        """Wait up to ``timeout`` for a token given back; ``(False, None)`` on timeout."""
        with self.lock:
            found = self._grab()
            if found[0]:
                return found
            waiter = _Waiter()
            self.waiters.append(waiter)
        try:
            waiter.event.wait(timeout)
        except BaseException:  # killed or timed out by its caller: pass the token on
            if not self._leave(waiter):
                self.give(waiter.conn)
            raise
        if self._leave(waiter):
            return False, None
        return True, waiter.conn

    def _leave(self, waiter: _Waiter) -> bool:
        """Remove a waiter that was not served; whether it was not."""
        with self.lock:
            if waiter.served:
                return False
            self.waiters.remove(waiter)
            return True

    def give(self, conn: Any) -> bool:
        """Give a token back (``conn``, or ``None`` for a free slot); False when all
        ``maxsize`` tokens are already there (``conn`` was made beyond it)."""
        with self.lock:
            if self.waiters:
                waiter = self.waiters.popleft()
                waiter.conn = conn
                waiter.served = True
                waiter.event.set()
                return True
            if len(self.conns) + self.free >= self.maxsize:
                return False
            if conn is None:
                self.free += 1
            else:
                self.conns.append(conn)
            return True

    def expired(self, limit: float | None) -> list[Any]:
        """Remove the idle connections that went idle before ``limit`` (all with None)."""
        with self.lock:
            conns = self.conns
            if limit is None:
                gone, kept = conns, []
            else:
                gone = [c for c in conns if getattr(c, _IDLE_SINCE, limit) < limit]
                if not gone:
                    return []
                kept = [c for c in conns if getattr(c, _IDLE_SINCE, limit) >= limit]
            self.conns = kept
            self.free += len(gone)
            return gone


def _close_all(idle: _Idle) -> None:
    for conn in idle.expired(None):
        conn.close()


def _idle_of(pool: Any) -> _Idle:
    """The pool's :class:`_Idle`, made on first use (closed with the pool object)."""
    found: _Idle | None = getattr(pool, _IDLE, None)
    if found is not None:
        return found
    with _CREATE:
        found = getattr(pool, _IDLE, None)
        if found is None:
            queue = pool.pool
            found = _Idle(int(queue.maxsize) if queue is not None else 1)
            setattr(pool, _IDLE, found)
            # What urllib3 does for its own queue: close the idle connections
            # when the pool object is collected (the manager dropped it).
            weakref.finalize(pool, _close_all, found)
    return found


class HostPool:
    """The kept-alive connections to one upstream ``scheme://host:port``."""

    __slots__ = ("_pool", "_tokens", "_idle_timeout", "_clock", "_owner", "__weakref__")

    def __init__(self, pool: Any, owner: Pools) -> None:
        self._pool = pool  # a urllib3 HTTPConnectionPool
        self._tokens = _idle_of(pool)
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
        """Tokens in the pool: idle connections plus free slots (<= maxsize)."""
        tokens = self._tokens
        return len(tokens.conns) + tokens.free

    @property
    def idle(self) -> int:
        """How many connections sit idle in the pool (kept alive, connected)."""
        return sum(1 for conn in list(self._tokens.conns) if conn.sock is not None)

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
        if pool.pool is None:
            raise UpstreamConnectError("no upstream connection available") from ClosedPoolError(
                pool, "Pool is closed."
            )
        got, conn = self._tokens.take()
        if not got and pool.block:
            got, conn = self._tokens.wait(pool_timeout)
            if not got:
                raise UpstreamConnectError("no upstream connection available") from EmptyPoolError(
                    pool, "Pool is empty."
                )
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
        if self._pool.pool is None or not self._tokens.give(conn):
            # The manager closed the pool, or the connection was made beyond
            # maxsize (block=False) and every token is back: not kept.
            conn.close()
            return
        if self._idle_timeout is not None and self._owner._sweeper is None and _cooperative():
            self._owner._start_sweeper()

    def discard(self, conn: Any) -> None:
        """Close ``conn`` and free its slot."""
        try:
            conn.close()
        finally:
            self._tokens.give(None)

    def detach(self, conn: Any) -> Any:
        """Hand the raw socket over (a WebSocket tunnel owns it now); the slot is freed."""
        sock = conn.sock
        conn.sock = None
        self._tokens.give(None)
        return sock

    def sweep(self) -> int:
        """Close the connections idle longer than the bound (every one once the
        manager closed the pool); how many were closed."""
        if self._pool.pool is None:
            gone = self._tokens.expired(None)
        elif self._idle_timeout is None:
            return 0
        else:
            gone = self._tokens.expired(self._clock() - self._idle_timeout)
        for conn in gone:
            conn.close()
        return len(gone)

    def close_idle(self) -> None:
        """Close every idle connection (the pool is being dropped or closed)."""
        _close_all(self._tokens)


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
        if found is not None:
            if not found.closed:
                return found
            found.close_idle()
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
        for pool in list(self._hosts.values()):
            pool.close_idle()
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
