"""RedisRegistry: one balancer's server set, shared through Redis by every process naming it.

vulcand kept oxy's servers in etcd; here a Redis hash holds them.  Every
process whose balancer names the same registry follows it: writes go to
Redis (and are applied at once locally), a pub/sub message tells the others,
and a version polled every ``poll_interval`` catches any message missed, so
every process converges within about a second, including processes started
later.  The request path never talks to Redis: picks read the local pool.

Layout (the name in braces is a Redis Cluster hash tag, so every key of one
registry lives in one slot and the Lua scripts may touch them together):

``<prefix>{<name>}``
    a hash: ``e`` (epoch, set when the registry is created), ``v`` (version,
    incremented by every change), ``s:<server>`` = ``"<weight> <state> <url>"``
    (state ``active`` or ``draining``) and ``h:<server>`` = ``up``/``down``
    (the health the prober publishes).
``<prefix>{<name>}:prober``
    the prober's lease (``SET NX PX``, renewed by its holder).
``<prefix>{<name>}:changed``
    the pub/sub channel; each message is the new version.

``redis`` (redis-py) is imported when a registry is created, so ``import
oxypy`` never needs it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from typing import Any

from ._balance.address import parse_server
from ._balance.follow import Follower, RegisteredServer, Snapshot
from ._balance.pool import Pool
from ._core.redisclient import client_for, describe_client, redis_errors
from ._core.types import Clock
from .exceptions import ConfigurationError, OxypyError
from .health import HealthCheck

__all__ = ["RedisRegistry", "RegisteredServer"]

# KEYS[1]: the hash.  ARGV: channel, epoch, identity, url, weight ('' keeps it;
# 1 for a new server), state ('' keeps it; a new server is active), '1' when
# the server must exist already.  Returns -1 (unknown server, and it had to
# exist), 0 (nothing changed) or 1.
_WRITE = """
local f = 's:' .. ARGV[3]
local old = redis.call('HGET', KEYS[1], f)
local weight, state = ARGV[5], ARGV[6]
if old then
  local ow, ost = string.match(old, '^(%S+) (%S+)')
  if weight == '' then weight = ow end
  if state == '' then state = ost end
else
  if ARGV[7] == '1' then return -1 end
  if weight == '' then weight = '1' end
  if state == '' then state = 'active' end
end
local value = weight .. ' ' .. state .. ' ' .. ARGV[4]
if old == value then return 0 end
redis.call('HSETNX', KEYS[1], 'e', ARGV[2])
redis.call('HSET', KEYS[1], f, value)
redis.call('PUBLISH', ARGV[1], redis.call('HINCRBY', KEYS[1], 'v', 1))
return 1
"""

# KEYS[1]: the hash.  ARGV: channel, identity.  Returns 0 (unknown) or 1.
_REMOVE = """
if redis.call('HEXISTS', KEYS[1], 's:' .. ARGV[2]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], 's:' .. ARGV[2], 'h:' .. ARGV[2])
redis.call('PUBLISH', ARGV[1], redis.call('HINCRBY', KEYS[1], 'v', 1))
return 1
"""

# KEYS[1]: the hash.  ARGV: channel, epoch, then identity, value pairs.
# Creates the registry only when it does not exist.  Returns 1 if it did.
_SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local args = {'e', ARGV[2], 'v', 1}
for i = 3, #ARGV, 2 do
  args[#args + 1] = 's:' .. ARGV[i]
  args[#args + 1] = ARGV[i + 1]
end
redis.call('HSET', KEYS[1], unpack(args))
redis.call('PUBLISH', ARGV[1], 1)
return 1
"""

# KEYS[1]: the hash, KEYS[2]: the lease.  ARGV: channel, holder, then
# identity, 'up'|'down' pairs.  Only the lease holder may publish health (a
# prober that lost its lease is fenced off).  Returns -1 (not the holder), 0, 1.
_HEALTH = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
local changed = 0
for i = 3, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], 's:' .. ARGV[i]) == 1 then
    local f = 'h:' .. ARGV[i]
    if redis.call('HGET', KEYS[1], f) ~= ARGV[i + 1] then
      redis.call('HSET', KEYS[1], f, ARGV[i + 1])
      changed = 1
    end
  end
end
if changed == 1 then
  redis.call('PUBLISH', ARGV[1], redis.call('HINCRBY', KEYS[1], 'v', 1))
end
return changed
"""

# KEYS[1]: the lease.  ARGV: holder, ttl ms.  Takes a free lease or renews
# the holder's own.  Returns 1 when the caller holds it now.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1]: the lease.  ARGV: holder.  Gives the lease up, if still held.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_STATES = ("active", "draining")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisRegistry:
    """The server set of a balancer, shared by every process that names the registry.

    Pass it as ``registry=`` to a balancer (:class:`~oxypy.RoundRobin`,
    :class:`~oxypy.LeastRequest`, :class:`~oxypy.ConsistentHash`, or
    :class:`~oxypy.Rebalancer`, which hands it to the balancer it drives;
    ``follow_registry()`` does the same on a balancer already built).
    The balancer's ``servers`` argument then only seeds a registry that does
    not exist yet; from then on the registry's set wins.  ``upsert_server``,
    ``remove_server`` and ``drain_server`` on any process write to Redis and
    apply locally at once; every other process (gunicorn workers, other
    hosts, processes started later) follows within about a second: pub/sub
    pushes each change, and a version read every ``poll_interval`` seconds
    catches a message that was missed.  Requests never wait for Redis: picks
    read the local copy.

    Redis unreachable: each process keeps routing on the last set it knew and
    logs one warning; when Redis answers again it logs one line and
    resynchronises (a Redis that came back empty is seeded again with that
    set, so a restart without persistence loses nothing).  Writes made while
    Redis is down raise :class:`~oxypy.OxypyError` (nothing changes).

    Draining (``drain_server``, ``oxypy servers drain``) takes a server out
    of rotation everywhere while requests already sent to it finish.

    With a :class:`~oxypy.HealthCheck` on the balancer, one process per
    registry probes: it holds a lease (``SET NX PX``, ``lease_ttl``, renewed
    every third of it) and publishes each server's health; every process
    applies it (the ``unhealthy``/``healthy`` events and log lines as with
    local checks).  When the prober dies, another process takes the lease
    within ``lease_ttl`` seconds and goes on.

    One registry object serves one balancer, which closes it in its
    ``close()``.  Under gunicorn, build it in each worker (not with
    ``--preload``: the follower thread does not survive a fork).

    :param url_or_client: ``redis://host:port/db`` (``rediss://``,
        ``unix://``), or a redis-py client (``Redis``,
        ``Sentinel.master_for(...)``, ``RedisCluster``) whose own timeouts apply.
    :param name: the registry's name: processes naming the same one share it.
    :param prefix: key prefix.
    :param timeout: seconds to connect and per reply (URL only; no retries).
    :param poll_interval: seconds between two version reads (the fallback
        for a missed pub/sub message; also the retry interval when Redis is down).
    :param lease_ttl: seconds the prober's lease lives without renewal.
    :param clock: monotonic seconds.

    Example::

        from oxypy import Forward, RedisRegistry, RoundRobin
        lb = RoundRobin(Forward(), ["http://10.0.0.1:8000"],
                        registry=RedisRegistry("redis://10.0.0.9:6379/0", "api"))
        lb.upsert_server("http://10.0.0.2:8000")   # every process sees it within 1 s

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        url_or_client: str | Any,
        name: str,
        /,
        *,
        prefix: str = "oxypy:registry:",
        timeout: float = 1.0,
        poll_interval: float = 0.5,
        lease_ttl: float = 3.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in "{} \t\r\n"):
            raise ConfigurationError(
                f"name must be a non-empty string without spaces or braces, got {name!r}"
            )
        if not isinstance(prefix, str):
            raise ConfigurationError("prefix must be a string")
        for option, value, low in (
            ("timeout", timeout, 0.0),
            ("poll_interval", poll_interval, 0.0),
            ("lease_ttl", lease_ttl, 0.1),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > low:
                raise ConfigurationError(f"{option} must be a number above {low:g}, got {value!r}")
        self.client, self._owns_client = client_for(url_or_client, float(timeout))
        self.url = (
            url_or_client if isinstance(url_or_client, str) else describe_client(url_or_client)
        )
        self.name = name
        self.key = f"{prefix}{{{name}}}"
        self.lease_key = self.key + ":prober"
        self.channel = self.key + ":changed"
        self.poll_interval = float(poll_interval)
        self.lease_ttl = float(lease_ttl)
        self.clock = clock
        self.errors = redis_errors()
        #: who this process is, as the prober's lease names it
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._write = self.client.register_script(_WRITE)
        self._remove = self.client.register_script(_REMOVE)
        self._seed = self.client.register_script(_SEED)
        self._health = self.client.register_script(_HEALTH)
        self._lease = self.client.register_script(_LEASE)
        self._release = self.client.register_script(_RELEASE)
        self._follower: Follower | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisRegistry {self.name!r} at {self.url}>"

    # -- operators' view and writes (the ``oxypy servers`` command uses these) ----
    def fleet(self) -> list[RegisteredServer]:
        """The registered servers, read from Redis now (sorted by URL).

        Raises :class:`~oxypy.OxypyError` when Redis does not answer.
        """
        snapshot = self._call(self.read)
        return [] if snapshot is None else sorted(snapshot.servers.values())

    def prober(self) -> str | None:
        """The lease holder probing for the whole registry (``host:pid:tag``), or None."""
        value = self._call(self.client.get, self.lease_key)
        return None if value is None else _text(value)

    def upsert(self, url: str, weight: int | None = 1, *, state: str | None = None) -> bool:
        """Add ``url`` or change its weight (``None`` keeps a known server's, 1 for
        a new one) and its state when given (``"active"`` or ``"draining"``; a
        new server is active).  True when something changed."""
        target, identity = parse_server(url)
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int) or weight < 0
        ):
            raise ConfigurationError(f"weight must be an int >= 0, got {weight!r}")
        if state is not None and state not in _STATES:
            raise ConfigurationError(f"state must be 'active' or 'draining', got {state!r}")
        weight_arg = "" if weight is None else str(weight)
        args = [self.channel, os.urandom(6).hex(), identity, target, weight_arg, state or "", ""]
        return int(self._call(self._write, keys=[self.key], args=args)) == 1

    def drain(self, url: str, draining: bool = True) -> bool:
        """Mark ``url`` draining (or active again); True when it changed.

        :class:`~oxypy.ConfigurationError` when the server is not registered.
        """
        target, identity = parse_server(url)
        state = "draining" if draining else "active"
        args = [self.channel, os.urandom(6).hex(), identity, target, "", state, "1"]
        changed = int(self._call(self._write, keys=[self.key], args=args))
        if changed < 0:
            raise ConfigurationError(f"server not found: {url!r}")
        return changed == 1

    def remove(self, url: str) -> None:
        """Unregister ``url``; :class:`~oxypy.ConfigurationError` when it is not registered."""
        _, identity = parse_server(url)
        if not int(self._call(self._remove, keys=[self.key], args=[self.channel, identity])):
            raise ConfigurationError(f"server not found: {url!r}")

    def close(self) -> None:
        """Stop following (and give the prober's lease up), close a client made from a
        URL.  Idempotent; the balancer's ``close()`` calls it."""
        if self._closed:
            return
        self._closed = True
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.stop()
        if self._owns_client:
            self.client.close()

    # -- the balancer's side -----------------------------------------------------
    def attach(
        self,
        pool: Pool,
        servers: Iterable[tuple[str, int]],
        health_check: HealthCheck | None = None,
    ) -> Follower:
        """Make ``pool`` follow the registry (called by the balancer, once).

        ``servers`` seed a registry that does not exist yet (and are the pool's
        set while Redis cannot be reached).  Returns the follower, whose
        ``is_prober``/``publish_health`` drive the balancer's health checker.
        """
        if self._follower is not None or self._closed:
            raise ConfigurationError(f"{self!r} already serves a balancer: make one per balancer")
        self._follower = Follower(
            self, pool, list(servers), health=health_check is not None, clock=self.clock
        )
        self._follower.start()
        return self._follower

    @property
    def follower(self) -> Follower | None:
        return self._follower

    def apply_now(self) -> None:
        """After a write: read the registry back into the local pool at once."""
        if self._follower is not None:
            self._follower.sync()

    # -- the Redis protocol (the follower calls these; they raise redis errors) --
    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self.errors as exc:
            raise OxypyError(f"registry {self.name!r}: Redis at {self.url} failed: {exc}") from exc

    def version(self) -> str | None:
        epoch, version = self.client.hmget(self.key, ["e", "v"])
        if epoch is None and version is None:
            return None
        return f"{_text(epoch)}:{_text(version)}"

    def read(self) -> Snapshot | None:
        """The whole registry at one instant, or None when it does not exist."""
        raw = self.client.hgetall(self.key)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        health = {k[2:]: v == "up" for k, v in fields.items() if k.startswith("h:")}
        servers: dict[str, RegisteredServer] = {}
        for field, value in fields.items():
            if not field.startswith("s:"):
                continue
            parts = value.split(" ", 2)
            if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in _STATES:
                continue  # not written by oxypy: ignored
            try:
                parse_server(parts[2])
            except ConfigurationError:
                continue  # a URL no balancer could take: ignored, not retried forever
            identity = field[2:]
            servers[identity] = RegisteredServer(
                parts[2], int(parts[0]), parts[1], health.get(identity)
            )
        return Snapshot(f"{fields.get('e')}:{fields.get('v')}", servers)

    def seed(self, servers: Iterable[tuple[str, str, int, str]]) -> bool:
        """Create the registry with ``(identity, url, weight, state)`` unless it exists."""
        args: list[Any] = [self.channel, os.urandom(6).hex()]
        for identity, url, weight, state in servers:
            args += [identity, f"{weight} {state} {url}"]
        return bool(int(self._seed(keys=[self.key], args=args)))

    def subscribe(self) -> Any:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    def take_lease(self) -> bool:
        ttl = max(1, round(self.lease_ttl * 1000))
        return bool(int(self._lease(keys=[self.lease_key], args=[self.holder, ttl])))

    def give_lease(self) -> None:
        self._release(keys=[self.lease_key], args=[self.holder])

    def publish_health(self, health: dict[str, bool]) -> int:
        args: list[Any] = [self.channel, self.holder]
        for identity, up in health.items():
            args += [identity, "up" if up else "down"]
        return int(self._health(keys=[self.key, self.lease_key], args=args))
