"""Accepting connections: the cap on live connections, and accept() failures.

Theory of operation: :class:`ConnectionTable` counts the live connections of
one server (from accept to close) and knows which of them are waiting for a
request (idle between two keep-alive requests, or still receiving a head).
:class:`Listener` is gevent's ``StreamServer`` with two changes.  At the cap
(``max_connections``) it stops accepting, so the process never holds more
client descriptors than the cap, and when a connection waits in the backlog
the oldest waiting connection is closed to make room for it: an idle
keep-alive connection first, as nginx reuses its idle connections when it runs
short, then the oldest unfinished head (a slow or stalled client).  Its
release resumes accepting.  A connection whose request is in the application
is never evicted; when every connection is, new ones wait in the backlog until
one finishes.  So a flood of slow clients holds at most ``max_connections``
descriptors and never keeps a client that sends its head promptly from being
served.

Second, an ``accept()`` failing because descriptors ran out (``EMFILE``, ``ENFILE``,
``ENOBUFS``, ``ENOMEM``) evicts one waiting connection (its descriptor serves
the next accept) and pauses accepting for 0.1 s, doubling to 0.5 s while the
episode lasts; the episode is logged when it starts and when it ends, where
gevent would print a traceback for every failed accept.
"""

from __future__ import annotations

import errno
import logging
import resource
import select
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import gevent
from gevent.monkey import get_original
from gevent.server import StreamServer

__all__ = ["ConnectionTable", "Listener", "default_max_connections"]

log = logging.getLogger("oxypy.server")

#: accept() errors that mean "no descriptor or memory left": back off, don't crash.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: The real poll(): gevent's select yields to the hub, which a watcher callback may not.
_poll = get_original("select", "poll")
_PAUSE_FIRST = 0.1
_PAUSE_MAX = 0.5
#: Seconds without a failed accept that end an episode (and its log lines).
_EPISODE_END = 5.0
#: Descriptors kept out of the default cap (listening socket, log files, Redis...).
_FD_RESERVE = 100
_DEFAULT_CAP = 10000


def default_max_connections() -> int:
    """The default cap: half of what ``RLIMIT_NOFILE`` leaves after a reserve,
    at most 10000.

    Half, because a proxied request holds two descriptors (the client's and
    the upstream's); the reserve (100, or a quarter of a smaller limit) is for
    the listening socket, pooled idle upstream connections, log and spill
    files.  ``ulimit -n`` 1024 gives 462, 256 gives 96, 65536 gives 10000.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _DEFAULT_CAP
    reserve = min(_FD_RESERVE, soft // 4)
    return max(1, min(_DEFAULT_CAP, (soft - reserve) // 2))


class Evictable(Protocol):
    def evict(self) -> None: ...


class ConnectionTable:
    """The live connections of one server, and which of them may make room."""

    __slots__ = ("cap", "count", "idle", "reading", "on_room")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        #: Accepted connections that were not released yet.
        self.count = 0
        #: Waiting between two requests, oldest first.
        self.idle: OrderedDict[Evictable, None] = OrderedDict()
        #: Receiving a head (or waiting for the first one), oldest first.
        self.reading: OrderedDict[Evictable, None] = OrderedDict()
        #: Called when a slot frees up or a connection becomes evictable (the
        #: listener resumes accepting if the cap had paused it).
        self.on_room: Callable[[], None] | None = None

    def release(self) -> None:
        """Give a slot back (once per accepted connection)."""
        self.count -= 1
        if self.on_room is not None:
            self.on_room()

    def pop_waiting(self) -> Evictable | None:
        """Forget and return the connection that should make room, if any."""
        for table in (self.idle, self.reading):
            if table:
                return table.popitem(last=False)[0]
        return None

    def park(self, conn: Evictable, idle: bool) -> None:
        """``conn`` waits for a request (``idle``) or for the rest of a head."""
        if idle:
            self.reading.pop(conn, None)
            self.idle[conn] = None
        else:
            self.idle.pop(conn, None)
            self.reading[conn] = None
        if self.on_room is not None:
            self.on_room()

    def unpark(self, conn: Evictable) -> None:
        """``conn`` has a request to serve, or is gone: it may not be evicted."""
        self.idle.pop(conn, None)
        self.reading.pop(conn, None)


class Listener(StreamServer):  # type: ignore[misc]
    """``StreamServer`` that holds at most ``table.cap`` connections, evicts a
    waiting one for a newcomer at the cap, and backs off, without a traceback,
    when descriptors run out.

    An episode of failed accepts is logged twice at most: when it starts, and
    when accepts have succeeded for :data:`_EPISODE_END` seconds after the
    last failure.
    """

    def __init__(
        self,
        address: tuple[str, int] | Any,
        handle: Callable[[Any, Any], None],
        table: ConnectionTable,
        backlog: int | None,
    ) -> None:
        super().__init__(address, handle, backlog=backlog)
        self.table = table
        table.on_room = self._room
        self._pending: Any = None
        #: Accepting is paused because the cap is reached (not for lack of descriptors).
        self.paused_full = False
        self.full_episode = False
        #: Failed accepts in the current episode (0: no episode).
        self.failed_accepts = 0
        self.last_failure = 0.0
        self.pause = _PAUSE_FIRST

    def init_socket(self) -> None:
        super().init_socket()
        self._pending = _poll()
        self._pending.register(self.socket.fileno(), select.POLLIN)

    def full(self) -> bool:
        """At the cap: pause accepting; when a connection waits in the backlog,
        evict the oldest waiting connection for it (gevent calls this before
        every accept)."""
        table = self.table
        if table.count < table.cap:
            self.full_episode = False
            return False
        if not self._pending.poll(0):
            # Nobody waits (gevent asks before every accept of a burst): keep
            # watching the socket without evicting anyone.
            self.loop.run_callback(self._resume)
            return True
        victim = table.pop_waiting()
        if victim is not None:
            victim.evict()  # its release resumes accepting
        elif not self.full_episode:
            self.full_episode = True
            log.warning(
                "max_connections (%d) reached with every connection in a request; "
                "new connections wait in the backlog",
                table.cap,
            )
        self.paused_full = True
        return True

    def _room(self) -> None:
        if self.paused_full:
            self.paused_full = False
            self._resume()

    def do_handle(self, *args: Any) -> None:
        self.table.count += 1  # counted at accept: the next full() sees it
        try:
            super().do_handle(*args)
        except BaseException:
            self.table.release()
            raise

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in _EXHAUSTED:
                raise
            self._exhausted(exc)
            return None
        if accepted and self.failed_accepts:
            if time.monotonic() - self.last_failure >= _EPISODE_END:
                log.warning(
                    "accepting again; %d accept()s failed for lack of descriptors",
                    self.failed_accepts,
                )
                self.failed_accepts = 0
                self.pause = _PAUSE_FIRST
        return accepted

    def _exhausted(self, exc: OSError) -> None:
        if not self.failed_accepts:
            log.warning(
                "accept() failed: %s; pausing accepts %g-%g s while it lasts "
                "(max_connections=%d, %d open)",
                exc.strerror or exc,
                _PAUSE_FIRST,
                _PAUSE_MAX,
                self.table.cap,
                self.table.count,
            )
        self.failed_accepts += 1
        self.last_failure = time.monotonic()
        victim = self.table.pop_waiting()
        if victim is not None:
            victim.evict()  # frees a descriptor for the next accept
        self.stop_accepting()
        gevent.spawn_later(self.pause, self._resume)
        self.pause = min(_PAUSE_MAX, self.pause * 2)

    def _resume(self) -> None:
        if self.started and not self.closed:
            self.start_accepting()
