"""Following a shared registry: its server set applied to one balancer's pool.

One :class:`Follower` per balancer runs a thread (a greenlet when gevent has
patched ``threading``) that listens to the registry's pub/sub channel,
reads the version every ``poll_interval`` (a missed message is never
permanent) and, when it changed, reads the whole registry and applies the
difference from what it applied last: ``upsert``/``remove``/``drain`` on the
pool, so every change goes through the state machine
(:mod:`oxypy._balance.state`) and reports its ``on_change`` event.  Diffing
against the last *applied* registry (not the pool) leaves alone what other
parts changed locally, such as the Rebalancer's weights.

Redis down: the pool keeps its last set; one warning, and one line when Redis
answers again.  A registry found missing (Redis restarted empty) is seeded
again with the last set.  With health checks, the follower also keeps (or
tries to take) the prober's lease; the lease holder probes and publishes,
the others apply the published health.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, NamedTuple, Protocol

from .._core.types import Clock
from ..exceptions import ConfigurationError
from .address import parse_server
from .pool import Pool
from .state import UNHEALTHY_STATES, Event, Input, State, transition

__all__ = ["Follower", "RegisteredServer", "Snapshot"]

log = logging.getLogger(__name__)


class RegisteredServer(NamedTuple):
    """One server of a registry: ``state`` is ``"active"`` or ``"draining"``;
    ``healthy`` is the prober's verdict (None: not probed)."""

    url: str
    weight: int
    state: str
    healthy: bool | None = None


class Snapshot(NamedTuple):
    version: str
    servers: dict[str, RegisteredServer]  # by identity


class Source(Protocol):
    """The registry as the follower uses it (its calls raise redis-py errors)."""

    name: str
    url: str
    poll_interval: float
    lease_ttl: float
    errors: tuple[type[BaseException], ...]

    def version(self) -> str | None: ...

    def read(self) -> Snapshot | None: ...

    def seed(self, servers: list[tuple[str, str, int, str]]) -> bool: ...

    def subscribe(self) -> Any: ...

    def take_lease(self) -> bool: ...

    def give_lease(self) -> None: ...

    def publish_health(self, health: dict[str, bool]) -> int: ...


class Follower:
    """Keeps one pool equal to a registry; see the module docstring."""

    def __init__(
        self,
        source: Source,
        pool: Pool,
        seed: list[tuple[str, int]],
        *,
        health: bool,
        clock: Clock,
    ) -> None:
        self.source = source
        self.pool = pool
        self.health = health
        self.clock = clock
        self.applied: dict[str, RegisteredServer] = {}
        for url, weight in seed:
            _, identity = parse_server(url)
            self.applied[identity] = RegisteredServer(url, weight, "active")
        self.version: str | None = None
        self.syncs = 0  # registry reads applied (tests and benchmarks read it)
        self.down = False
        self.lease_until = float("-inf")
        self._published: dict[str, bool] = {}
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life ---------------------------------------------------------------------
    def start(self) -> None:
        """Seed and read once before returning (so the balancer starts with the
        registry's set), then follow in the background."""
        for entry in self.applied.values():  # the set to serve while Redis is away
            self.pool.upsert(entry.url, entry.weight)
        try:
            self.sync()
            if self.health:
                self._keep_lease()
        except self.source.errors as exc:
            self._failed(exc)
        self._thread = threading.Thread(
            target=self._run, name=f"oxypy-registry-{self.source.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End the thread (it leaves within ``poll_interval``, not waited for)
        and give the lease up.  Idempotent."""
        self._stop.set()
        self._thread = None
        if self.lease_until > float("-inf"):
            self.lease_until = float("-inf")
            try:
                self.source.give_lease()  # the next prober need not wait for it to expire
            except self.source.errors:
                pass

    def _run(self) -> None:
        source = self.source
        pubsub: Any = None
        next_poll = next_lease = self.clock()
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = source.subscribe()
                    self.sync()  # whatever changed before the subscription took
                    next_poll = self.clock() + source.poll_interval
                message = pubsub.get_message(timeout=source.poll_interval)
                now = self.clock()
                if message is not None or now >= next_poll:
                    self.sync()
                    next_poll = now + source.poll_interval
                if self.health and now >= next_lease:
                    self._keep_lease()
                    next_lease = now + source.lease_ttl / 3
            except source.errors as exc:
                self._failed(exc)
                if pubsub is not None:
                    _close_quietly(pubsub)
                    pubsub = None
                self.lease_until = min(self.lease_until, self.clock())
                self._stop.wait(source.poll_interval)
            except Exception:  # a bug here must not stop following
                if self._stop.is_set():
                    break  # closed under our feet (the client is gone): just leave
                log.exception("registry %r: following failed", source.name)
                self._stop.wait(source.poll_interval)
        if pubsub is not None:
            _close_quietly(pubsub)

    # -- the registry into the pool ---------------------------------------------
    def sync(self) -> None:
        """Read the registry if its version moved and apply it (raises redis errors)."""
        source = self.source
        with self._sync_lock:
            version = source.version()
            if version is None:  # never created, or Redis came back empty: seed it
                source.seed([(k, e.url, e.weight, e.state) for k, e in self.applied.items()])
            elif version == self.version and not self.down:
                return
            snapshot = source.read()
            if snapshot is None:
                return
            self._apply(snapshot)
            if self.down:
                self.down = False
                log.warning(
                    "registry %r: Redis at %s available again; resynchronised (%d servers)",
                    source.name,
                    source.url,
                    len(self.applied),
                )

    def _apply(self, snapshot: Snapshot) -> None:
        pool, before = self.pool, self.applied
        wanted = snapshot.servers
        for identity, entry in before.items():
            if identity not in wanted:
                try:
                    pool.remove(entry.url)
                except ConfigurationError:
                    pass  # removed locally already
        for identity, entry in wanted.items():
            old = before.get(identity)
            if old is None or old.weight != entry.weight or pool.find(entry.url) is None:
                pool.upsert(entry.url, entry.weight)
            if (old.state if old is not None else "active") != entry.state:
                pool.drain(entry.url, entry.state == "draining")
        self.applied = dict(wanted)
        self.version = snapshot.version
        self.syncs += 1
        if self.health and not self.is_prober():
            self._apply_health(wanted)

    def _apply_health(self, wanted: dict[str, RegisteredServer]) -> None:
        """The prober's verdicts into this pool (the prober's own pool has them)."""
        pool = self.pool
        events: list[Event] = []
        with pool.lock:
            for identity, entry in wanted.items():
                server = pool.by_identity.get(identity)
                if server is None or entry.healthy is None or server.state is State.DRAINING:
                    continue
                down = server.state in UNHEALTHY_STATES
                if entry.healthy and down:
                    server.check_streak = 0
                    transition(
                        server, Input.PROBES_PASSED, events, reason="the registry's prober: passed"
                    )
                elif not entry.healthy and not down:
                    server.check_streak = 0
                    transition(
                        server, Input.PROBES_FAILED, events, reason="the registry's prober: failed"
                    )
        pool.notify(events)

    # -- the prober's lease -------------------------------------------------------
    def is_prober(self) -> bool:
        """Whether this process holds the lease now (the health checker asks)."""
        return self.clock() < self.lease_until

    def _keep_lease(self) -> None:
        start = self.clock()
        held = self.source.take_lease()
        was = self.is_prober()
        # Trust the lease for 2/3 of its life from before the request: it is
        # renewed every third, so a live holder never lapses, and a holder cut
        # off from Redis stops probing before another may take over.
        self.lease_until = start + self.source.lease_ttl * 2 / 3 if held else float("-inf")
        if held and not was:
            self._published = {}  # publish every verdict once
            log.info("registry %r: this process probes for the registry", self.source.name)

    def publish_health(self) -> None:
        """After a round of probes (prober only): publish the verdicts that changed."""
        if not self.is_prober():
            return
        health: dict[str, bool] = {}
        for server in self.pool.snapshot():
            if server.state is State.DRAINING or server.state is State.REMOVED:
                continue
            health[server.identity] = server.state not in UNHEALTHY_STATES
        changed = {k: v for k, v in health.items() if self._published.get(k) != v}
        if not changed:
            return
        try:
            if self.source.publish_health(changed) < 0:
                self.lease_until = float("-inf")  # someone else holds the lease now
                return
        except self.source.errors as exc:
            self._failed(exc)
            return
        self._published.update(changed)

    # -- outages ------------------------------------------------------------------
    def _failed(self, exc: BaseException) -> None:
        if self.down or self._stop.is_set():
            return
        self.down = True
        log.warning(
            "registry %r: Redis at %s unavailable; keeping the last known %d servers: %s",
            self.source.name,
            self.source.url,
            len(self.applied),
            exc,
        )


def _close_quietly(pubsub: Any) -> None:
    try:
        pubsub.close()
    except Exception:  # a dead connection may fail to close: it is dropped anyway
        log.debug("closing the registry subscription failed", exc_info=True)
