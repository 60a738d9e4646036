"""The life of one server in a balancer's pool: every transition, in one table.

Theory of operation
-------------------

A server record is created in state ``NEW`` and enters the pool with the
``ADD`` input.  From then on it is in exactly one of six states:

``ACTIVE``
    In rotation: the balancer may pick it (when its weight is above 0).
``UNHEALTHY``
    Out of rotation because active health checks failed
    (:class:`~oxypy.HealthCheck`); checks go on and bring it back.
``EJECTED``
    Out of rotation because passive outlier detection saw it fail real
    traffic (:class:`~oxypy.OutlierDetection`); it returns by itself when its
    ejection time is up (``ejected_until``, checked lazily at each pick).
``UNHEALTHY_EJECTED``
    Both at once: the active checks and the ejection each have to let it go.
``DRAINING``
    Out of rotation because an operator drains it (``drain_server``, or
    ``oxypy servers drain`` through a :class:`~oxypy.RedisRegistry`):
    requests already sent to it finish, no new one is picked.  Draining wins
    over health and ejection (it forgets both); ``UNDRAIN`` puts the server
    back in rotation, where the next health verdict applies again.
``REMOVED``
    Out of the pool (``remove_server``).  Terminal: requests already sent to
    it drain normally, but nothing they report (nor a late probe) changes
    anything.  Upserting the same URL again makes a new record.

The inputs are decisions already taken elsewhere: ``PROBES_FAILED`` and
``PROBES_PASSED`` arrive when a health-check streak reaches its threshold
(:mod:`oxypy._balance.health` counts the streaks), ``EJECT`` when outlier
detection trips (:mod:`oxypy._balance.outlier` counts the failures and
chooses the duration), ``EJECTION_OVER`` when a pick finds the ejection
time passed, ``ADD`` and ``REMOVE`` from the pool's membership changes,
``DRAIN`` and ``UNDRAIN`` from an operator (directly or through a registry).
:data:`TRANSITIONS` says, for each live state and each input, the next state
and the ``on_change`` event it reports (``None``: none).  An input that
changes nothing is listed too, with the reason, so the table is total: a
probe result for a server already unhealthy, a failure reported by a request
that was in flight when its server left rotation (a *straggler*).  Any pair
not in the table is a bug and raises :class:`RuntimeError`.

Who may mutate what: :func:`transition` is the only writer of
``ServerState.state`` and ``ejected_until``; it also wipes the outlier
counters when a server is ejected or returns (it comes back with a clean
slate).  Everything runs with the pool's lock held; the events collected in
``events`` are reported to ``on_change`` by the pool after the lock is
released, so a slow listener never blocks a pick.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .stats import ServerStats

__all__ = [
    "EJECTED_STATES",
    "TRANSITIONS",
    "UNHEALTHY_STATES",
    "Change",
    "Event",
    "Input",
    "ServerState",
    "State",
    "transition",
]


#: ``(server_url, on_change event)``, collected under the lock, reported after.
Event = tuple[str, str]


class Change(tuple[str, str]):
    """The :data:`Event` :func:`transition` appends, with ``reason``: why, in
    words, for the pool's log line (``"3 network errors or timeouts in a
    row"``); the reason is not part of the tuple."""

    reason: str

    def __new__(cls, url: str, name: str, reason: str = "") -> Change:
        self = super().__new__(cls, (url, name))
        self.reason = reason
        return self


class State(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"
    UNHEALTHY_EJECTED = "unhealthy+ejected"
    DRAINING = "draining"
    REMOVED = "removed"


class Input(enum.Enum):
    ADD = "add"
    REMOVE = "remove"
    PROBES_FAILED = "probes failed"
    PROBES_PASSED = "probes passed"
    EJECT = "eject"
    EJECTION_OVER = "ejection over"
    DRAIN = "drain"
    UNDRAIN = "undrain"


S, I = State, Input  # noqa: E741 - the table reads better with one-letter names

#: ``(state, input) -> (next state, on_change event or None)``.
TRANSITIONS: dict[tuple[State, Input], tuple[State, str | None]] = {
    (S.NEW, I.ADD): (S.ACTIVE, "added"),
    # -- in rotation
    (S.ACTIVE, I.PROBES_FAILED): (S.UNHEALTHY, "unhealthy"),
    (S.ACTIVE, I.PROBES_PASSED): (S.ACTIVE, None),  # already healthy
    (S.ACTIVE, I.EJECT): (S.EJECTED, "ejected"),
    (S.ACTIVE, I.EJECTION_OVER): (S.ACTIVE, None),  # not ejected
    (S.ACTIVE, I.REMOVE): (S.REMOVED, "removed"),
    (S.ACTIVE, I.DRAIN): (S.DRAINING, "draining"),
    (S.ACTIVE, I.UNDRAIN): (S.ACTIVE, None),  # not draining
    # -- out: failed the active checks
    (S.UNHEALTHY, I.PROBES_FAILED): (S.UNHEALTHY, None),
    (S.UNHEALTHY, I.PROBES_PASSED): (S.ACTIVE, "healthy"),
    (S.UNHEALTHY, I.EJECT): (S.UNHEALTHY, None),  # straggler: already out
    (S.UNHEALTHY, I.EJECTION_OVER): (S.UNHEALTHY, None),  # not ejected
    (S.UNHEALTHY, I.REMOVE): (S.REMOVED, "removed"),
    (S.UNHEALTHY, I.DRAIN): (S.DRAINING, "draining"),
    (S.UNHEALTHY, I.UNDRAIN): (S.UNHEALTHY, None),
    # -- out: ejected by outlier detection
    (S.EJECTED, I.PROBES_FAILED): (S.UNHEALTHY_EJECTED, "unhealthy"),
    (S.EJECTED, I.PROBES_PASSED): (S.EJECTED, None),  # still ejected
    (S.EJECTED, I.EJECT): (S.EJECTED, None),  # straggler: already out
    (S.EJECTED, I.EJECTION_OVER): (S.ACTIVE, "returned"),
    (S.EJECTED, I.REMOVE): (S.REMOVED, "removed"),
    (S.EJECTED, I.DRAIN): (S.DRAINING, "draining"),  # the ejection is forgotten
    (S.EJECTED, I.UNDRAIN): (S.EJECTED, None),
    # -- out for both reasons
    (S.UNHEALTHY_EJECTED, I.PROBES_FAILED): (S.UNHEALTHY_EJECTED, None),
    (S.UNHEALTHY_EJECTED, I.PROBES_PASSED): (S.EJECTED, "healthy"),
    (S.UNHEALTHY_EJECTED, I.EJECT): (S.UNHEALTHY_EJECTED, None),
    (S.UNHEALTHY_EJECTED, I.EJECTION_OVER): (S.UNHEALTHY, "returned"),
    (S.UNHEALTHY_EJECTED, I.REMOVE): (S.REMOVED, "removed"),
    (S.UNHEALTHY_EJECTED, I.DRAIN): (S.DRAINING, "draining"),
    (S.UNHEALTHY_EJECTED, I.UNDRAIN): (S.UNHEALTHY_EJECTED, None),
    # -- out: drained by an operator; in-flight requests finish, nothing else counts
    (S.DRAINING, I.PROBES_FAILED): (S.DRAINING, None),
    (S.DRAINING, I.PROBES_PASSED): (S.DRAINING, None),
    (S.DRAINING, I.EJECT): (S.DRAINING, None),  # straggler: already out
    (S.DRAINING, I.EJECTION_OVER): (S.DRAINING, None),
    (S.DRAINING, I.REMOVE): (S.REMOVED, "removed"),
    (S.DRAINING, I.DRAIN): (S.DRAINING, None),
    (S.DRAINING, I.UNDRAIN): (S.ACTIVE, "undrained"),
    # -- gone: requests in flight drain; nothing they report counts
    (S.REMOVED, I.PROBES_FAILED): (S.REMOVED, None),
    (S.REMOVED, I.PROBES_PASSED): (S.REMOVED, None),
    (S.REMOVED, I.EJECT): (S.REMOVED, None),
    (S.REMOVED, I.EJECTION_OVER): (S.REMOVED, None),
    (S.REMOVED, I.REMOVE): (S.REMOVED, None),
    (S.REMOVED, I.DRAIN): (S.REMOVED, None),
    (S.REMOVED, I.UNDRAIN): (S.REMOVED, None),
}

del S, I

EJECTED_STATES = frozenset({State.EJECTED, State.UNHEALTHY_EJECTED})
#: The inputs that take a server out of rotation (their reason is kept on it).
_LEAVING = frozenset({Input.PROBES_FAILED, Input.EJECT, Input.DRAIN})
#: Out of rotation for failing the active checks.
UNHEALTHY_STATES = frozenset({State.UNHEALTHY, State.UNHEALTHY_EJECTED})


class ServerState:
    """One server's record; every field is guarded by the pool's lock.

    ``state`` and ``ejected_until`` are written by :func:`transition` only;
    the other fields are counters owned by the code named beside them.
    """

    __slots__ = (
        "url",
        "identity",
        "weight",
        "state",
        "ejected_until",
        "current",
        "in_flight",
        "check_streak",
        "ejections",
        "returned_at",
        "consecutive_errors",
        "recent",
        "sticky_value",
        "reason",
        "stats",
    )

    def __init__(self, url: str, identity: str, weight: int) -> None:
        self.url = url
        self.identity = identity
        self.weight = weight
        self.state = State.NEW
        self.ejected_until: float | None = None
        self.current = 0  # RoundRobin: smooth WRR running weight
        self.in_flight = 0  # LeastRequest: picks not yet closed
        self.check_streak = 0  # health: >0 consecutive passes, <0 consecutive failures
        self.ejections = 0  # outlier: ejections in a row (the duration multiplier)
        self.returned_at: float | None = None  # outlier: when the last ejection ended
        self.consecutive_errors = 0  # outlier
        self.recent: deque[bool] = deque()  # outlier: the failure-ratio window
        self.sticky_value = ""  # sticky: the cookie value naming this server
        self.reason = ""  # health/outlier: why it last left rotation (the status page)
        self.stats: ServerStats | None = None  # the status page's rolling stats, when kept

    @property
    def available(self) -> bool:
        """In rotation (the pick still filters on weight)."""
        return self.state is State.ACTIVE

    @property
    def ejected(self) -> bool:
        return self.state in EJECTED_STATES

    def __repr__(self) -> str:
        return f"<ServerState {self.url} {self.state.value} weight={self.weight}>"


def transition(
    server: ServerState,
    event: Input,
    events: list[Event],
    *,
    now: float = 0.0,
    until: float | None = None,
    reason: str = "",
) -> bool:
    """Apply ``event`` to ``server`` (pool lock held); return whether its state changed.

    ``until`` is the end of the ejection for ``EJECT``; ``now`` the time of
    ``EJECTION_OVER``.  The ``on_change`` event, if any, is appended to
    ``events`` with ``reason`` (why, for the log line).
    """
    try:
        after, name = TRANSITIONS[server.state, event]
    except KeyError:
        raise RuntimeError(
            f"no transition for {event.value!r} in state {server.state.value!r}"
        ) from None
    before = server.state
    if after is before:
        return False
    server.state = after
    if event in _LEAVING:
        server.reason = reason  # shown while it is out (the status page)
    if event is Input.EJECT:
        if until is None:
            raise RuntimeError("EJECT needs the end of the ejection")
        server.ejected_until = until
        server.consecutive_errors = 0
        server.recent.clear()
    elif event is Input.DRAIN or event is Input.UNDRAIN:
        # Both start from a clean slate: no ejection, no streaks.
        server.ejected_until = None
        server.ejections = 0
        server.check_streak = 0
        server.consecutive_errors = 0
        server.recent.clear()
    elif event is Input.EJECTION_OVER:
        server.ejected_until = None
        server.returned_at = now
        server.consecutive_errors = 0
        server.recent.clear()
    if name is not None:
        events.append(Change(server.url, name, reason))
    return True
