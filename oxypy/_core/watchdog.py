"""Interrupt a greenlet that is still inside an app past its deadline, cheaply.

``gevent.Timeout`` creates, starts and closes one hub timer per use: about
6 µs on the 2-core CI machine, twice per streamed response.  ``Timeout`` and
``Buffer(per_try_timeout=)`` need a backstop for every request, so they share
one :class:`Watchdog` per hub instead: registering a :class:`Watch` is a set
insertion, and a single non-referencing loop timer, armed at the earliest
deadline it knows of, fires rarely (about once per deadline length under a
steady load, since most requests finish long before theirs and are simply
forgotten).  When it fires it scans the watches still registered, throws
(from a loop callback) into each greenlet whose deadline passed *while it is
armed* (inside the app: never into the server's own code between body
chunks), and re-arms at the next deadline.
"""

from __future__ import annotations

import time
from typing import Any

import gevent
from gevent import getcurrent

__all__ = ["Interrupt", "Watch", "Watchdog", "watchdog"]

_monotonic = time.monotonic
_INF = float("inf")


class Interrupt(BaseException):
    """Thrown into a greenlet whose watch expired while armed (caught by identity)."""


class Watch:
    """One greenlet's deadline: interrupted only while ``armed``."""

    __slots__ = ("at", "glet", "exc", "armed")

    def __init__(self, at: float, glet: Any) -> None:
        self.at = at
        self.glet = glet
        #: The exception thrown, once it is (None until then).
        self.exc: Interrupt | None = None
        self.armed = True


class Watchdog:
    """The watches of one hub and the one timer that serves them."""

    __slots__ = ("loop", "watches", "timer", "due")

    def __init__(self, hub: Any) -> None:
        self.loop = hub.loop
        self.watches: set[Watch] = set()
        self.timer: Any = None
        self.due = _INF

    def add(self, at: float) -> Watch:
        """Watch the current greenlet until ``at`` (absolute ``time.monotonic()``); armed."""
        found = Watch(at, getcurrent())
        self.watches.add(found)
        if at < self.due:
            self.arm(at)
        return found

    def register(self, found: Watch) -> None:
        """Start watching ``found`` (a :class:`Watch` built by the caller)."""
        self.watches.add(found)
        if found.at < self.due:
            self.arm(found.at)

    def remove(self, found: Watch) -> None:
        found.armed = False
        self.watches.discard(found)

    def arm(self, at: float) -> None:
        """Set the timer for ``at`` (earlier than :attr:`due`): after :meth:`register`'s
        ``watches.add``, for callers that inline it."""
        if self.timer is not None:
            self.timer.close()
        self.due = at
        self.timer = self.loop.timer(max(at - _monotonic(), 0.0), ref=False)
        self.timer.start(self._fire)

    def _fire(self) -> None:
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        self.due = _INF
        now = _monotonic()
        upcoming = _INF
        for found in list(self.watches):
            if found.at <= now:
                # Expired: forgotten either way; its owner checks the time
                # itself before it arms the watch again.
                self.watches.discard(found)
                if found.armed:
                    # Thrown from a callback, not from this timer: a socket
                    # timeout due at the same moment (the app's own, more
                    # precise bound: libev runs the later timer first) gets
                    # its turn, and an app that finished meanwhile is spared.
                    self.loop.run_callback(_throw, found)
            elif found.at < upcoming:
                upcoming = found.at
        if upcoming < _INF and upcoming < self.due:
            self.arm(upcoming)


def _throw(found: Watch) -> None:
    if found.armed and not found.glet.dead:
        found.armed = False
        found.exc = Interrupt()
        found.glet.throw(found.exc)


_get_hub = gevent.get_hub


def watchdog() -> Watchdog:
    """The current hub's watchdog (created on first use)."""
    hub = _get_hub()
    try:
        dog: Watchdog = hub._oxypy_watchdog
    except AttributeError:
        dog = hub._oxypy_watchdog = Watchdog(hub)
    return dog
