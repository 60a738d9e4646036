"""The server pool of one balancer: its records, in order, behind one lock.

The pool owns membership (add, reweight, remove) and the lock every pick,
probe and settled request takes; state changes go through the state machine
(:mod:`oxypy._balance.state`) and the events they produce are reported to
``on_change`` after the lock is released (:meth:`Pool.notify`), so a slow
listener never blocks a pick.  :attr:`Pool.version` grows with every
membership or weight change, so a watcher (the Rebalancer, the balancer's
candidate cache) can tell cheaply that nothing changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .._core.locks import short_lock
from .._core.types import Clock
from ..exceptions import ConfigurationError
from .address import check_weight, parse_server
from .state import Event, Input, ServerState, transition
from .stats import ServerStats

__all__ = ["Member", "OnChange", "Pool"]

log = logging.getLogger(__name__)
#: One line per server state change, under the name operators see.
_events_log = logging.getLogger("oxypy.balancer")

#: The level of each event's line: WARNING when a server leaves rotation.
_LEVELS = {"unhealthy": logging.WARNING, "ejected": logging.WARNING, "draining": logging.WARNING}

#: ``on_change(server_url, event)``; events: ``added``, ``removed``,
#: ``unhealthy``, ``healthy``, ``ejected``, ``returned``, ``draining``, ``undrained``.
OnChange = Callable[[str, str], Any]

#: ``(identity, url, weight)`` of one server, as :meth:`Pool.members` lists them.
Member = tuple[str, str, int]


class Pool:
    """The servers of one balancer, in insertion order, behind one lock.

    ``sticky_value(identity)`` (optional) gives each new server its sticky
    cookie value.  Fields are read under :attr:`lock` by the balancer's pick.
    Every section under the lock only reads and updates the servers' records
    (events are logged and reported after it is released), so it is the C
    lock of :func:`~oxypy._core.locks.short_lock`: taken twice per proxied
    request, gevent's cooperative lock cost three times as much.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        on_change: OnChange | None,
        sticky_value: Callable[[str], str] | None = None,
    ) -> None:
        self.lock = short_lock()
        self.clock = clock
        self.on_change = on_change
        self.sticky_value = sticky_value
        self.by_identity: dict[str, ServerState] = {}
        self.order: list[ServerState] = []  # replaced, never mutated: snapshots stay valid
        #: bumped on every upsert/remove
        self.version = 0
        #: give every server a ServerStats (Balancer.keep_stats)
        self.keep_stats = False

    # -- membership ------------------------------------------------------------
    def upsert(self, url: object, weight: object) -> None:
        """Add ``url`` (event ``added``) or change its weight; restarts the WRR sequence."""
        target, identity = parse_server(url)
        weight = check_weight(weight)
        events: list[Event] = []
        with self.lock:
            found = self.by_identity.get(identity)
            if found is None:
                found = ServerState(target, identity, weight)
                if self.sticky_value is not None:
                    found.sticky_value = self.sticky_value(identity)
                if self.keep_stats:
                    found.stats = ServerStats(self.clock)
                transition(found, Input.ADD, events)
                self.by_identity[identity] = found
                self.order = [*self.order, found]
            else:
                found.weight = weight
            for server in self.order:  # restart the smooth sequence, as oxy resets its iterator
                server.current = 0
            self.version += 1
        self.notify(events)

    def reweight(self, identity: str, weight: int) -> bool:
        """Set the weight of a member (by identity) if it differs; False if not a member."""
        with self.lock:
            found = self.by_identity.get(identity)
            if found is None:
                return False
            if found.weight == weight:
                return True
            found.weight = weight
            for server in self.order:
                server.current = 0
            self.version += 1
        return True

    def remove(self, url: object) -> None:
        """Remove ``url`` (event ``removed``); :class:`ConfigurationError` if unknown."""
        _, identity = parse_server(url)
        events: list[Event] = []
        with self.lock:
            found = self.by_identity.pop(identity, None)
            if found is None:
                raise ConfigurationError(f"server not found: {url!r}")
            transition(found, Input.REMOVE, events)
            self.order = [s for s in self.order if s is not found]
            for server in self.order:
                server.current = 0
            self.version += 1
        self.notify(events)

    def drain(self, url: object, draining: bool = True) -> bool:
        """Take ``url`` out of rotation (event ``draining``) or put it back
        (``undrained``); False when it is not a member."""
        _, identity = parse_server(url)
        events: list[Event] = []
        with self.lock:
            found = self.by_identity.get(identity)
            if found is None:
                return False
            if transition(
                found,
                Input.DRAIN if draining else Input.UNDRAIN,
                events,
                reason="drained by an operator" if draining else "the drain ended",
            ):
                self.version += 1  # the balancer's candidate cache follows the version
        self.notify(events)
        return True

    # -- reading -------------------------------------------------------------------
    def urls(self) -> list[str]:
        with self.lock:
            return [s.url for s in self.order]

    def find(self, url: object) -> ServerState | None:
        """The record of ``url`` (any spelling of its identity), or None."""
        _, identity = parse_server(url)
        with self.lock:
            return self.by_identity.get(identity)

    def weight(self, url: object) -> int | None:
        found = self.find(url)
        return None if found is None else found.weight

    def in_flight(self, url: object) -> int | None:
        found = self.find(url)
        return None if found is None else found.in_flight

    def snapshot(self) -> list[ServerState]:
        with self.lock:
            return list(self.order)

    def members(self) -> tuple[int, list[Member]]:
        """``(version, [(identity, url, weight), ...])``, read at one instant."""
        with self.lock:
            return self.version, [(s.identity, s.url, s.weight) for s in self.order]

    # -- events ----------------------------------------------------------------------
    def notify(self, events: list[Event]) -> None:
        """Log ``events`` (logger ``oxypy.balancer``: one line each, WARNING
        when a server leaves rotation, INFO otherwise) and report them to
        ``on_change``; call without the lock held."""
        for found in events:
            url, event = found
            reason = getattr(found, "reason", "")
            _events_log.log(
                _LEVELS.get(event, logging.INFO),
                "upstream %s %s%s",
                url,
                event,
                f": {reason}" if reason else "",
                extra={"upstream": url, "event": event, "reason": reason},
            )
        if not events or self.on_change is None:
            return
        for url, event in events:
            try:
                self.on_change(url, event)
            except Exception:  # a user's listener must not break requests or checks
                log.exception("on_change listener failed for %s %s", url, event)
