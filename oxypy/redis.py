"""Redis backends: rate buckets and connection leases shared by every process.

Both keep their state in server-side Lua scripts that read the clock with
Redis ``TIME``, so the limit holds exactly across gunicorn workers and hosts
whatever their own clocks say.  Both use short socket timeouts and no
retries: when Redis is unreachable a request waits at most ``timeout``, then
the ``on_error`` policy applies (``"allow"``, the default, fails open;
``"deny"`` answers 429) and Redis is not asked again for ``retry_interval``
seconds.  The failure is logged at most once per ``log_interval``, and the
first answer after it once (``Redis at ... available again``).

Either store takes a URL (it then owns its client: short timeouts, no
retries, closed by ``close()``) or a redis-py client object you built
(``redis.Redis``, a Sentinel-managed master from ``Sentinel.master_for``, or
``redis.cluster.RedisCluster``): your client's own timeouts and retry policy
apply, and ``close()`` leaves it open.  Every Lua script touches one key, so
the stores work on Redis Cluster.

``redis`` (redis-py) is imported when a store is created, so ``import oxypy``
never needs it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from ._core.redisclient import client_for, describe_client, redis_errors
from ._core.types import Clock
from .exceptions import ConfigurationError
from .ratelimit import Rate, Verdict

__all__ = ["RedisConnStore", "RedisStore"]

log = logging.getLogger(__name__)

OnError = Literal["allow", "deny"]

# KEYS[1]: the source's hash.  ARGV[1]: n; then per rate: field, interval and
# tolerance in microseconds.  Returns {allowed, wait_us, debt_us...}.
_RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local fields = {}
for i = 1, n do fields[i] = ARGV[3 * i - 1] end
local stored = redis.call('HMGET', KEYS[1], unpack(fields))
local new = {}
local wait = 0
for i = 1, n do
  local tat = tonumber(stored[i]) or now
  if tat < now then tat = now end
  local nxt = tat + tonumber(ARGV[3 * i])
  local over = nxt - now - tonumber(ARGV[3 * i + 1])
  if over > 0.001 and over > wait then wait = over end
  new[i] = nxt
end
local out = {0, 0}
if wait > 0 then
  out[2] = math.ceil(wait)
  for i = 1, n do
    local tat = tonumber(stored[i]) or now
    out[i + 2] = math.max(0, math.floor(tat - now))
  end
  return out
end
out[1] = 1
local args = {}
local longest = 0
for i = 1, n do
  args[2 * i - 1] = fields[i]
  args[2 * i] = string.format('%.17g', new[i])
  local debt = new[i] - now
  if debt > longest then longest = debt end
  out[i + 2] = math.floor(debt)
end
redis.call('HSET', KEYS[1], unpack(args))
local ttl = math.ceil(longest / 1000) + 1
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return out
"""

# KEYS[1]: the source's sorted set of leases (score: expiry in ms).
# ARGV: limit, lease id, ttl ms.  Returns 1 (taken) or 0 (at the limit).
_ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# ARGV: lease id, ttl ms.  Extends a lease that still exists.
_REFRESH_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""


class _RedisBase:
    def __init__(
        self,
        url: Any,
        *,
        prefix: str,
        timeout: float,
        on_error: OnError,
        retry_interval: float,
        log_interval: float,
        clock: Clock,
    ) -> None:
        if on_error not in ("allow", "deny"):
            raise ConfigurationError(f"on_error must be 'allow' or 'deny', got {on_error!r}")
        for name, value in (
            ("timeout", timeout),
            ("retry_interval", retry_interval),
            ("log_interval", log_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f"{name} must be a number >= 0, got {value!r}")
        if timeout <= 0:
            raise ConfigurationError("timeout must be > 0")
        if not isinstance(prefix, str):
            raise ConfigurationError("prefix must be a string")
        self.client, self._owns_client = client_for(url, timeout)
        self.url = url if isinstance(url, str) else describe_client(url)
        self.prefix = prefix
        self.timeout = timeout
        self.on_error: OnError = on_error
        self.retry_interval = retry_interval
        self.log_interval = log_interval
        self.clock = clock
        self.errors = 0
        self._errors_type = redis_errors()
        self._lock = threading.Lock()
        self._down_until = float("-inf")
        self._logged_at = float("-inf")
        self._unlogged = 0
        #: Failed since the last success: the next success logs "available again".
        self._down = False

    def _available(self) -> bool:
        return self.clock() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            now = self.clock()
            self.errors += 1
            self._unlogged += 1
            self._down = True
            self._down_until = now + self.retry_interval
            if now - self._logged_at < self.log_interval:
                return
            count, self._unlogged = self._unlogged, 0
            self._logged_at = now
        log.warning(
            "Redis at %s unavailable (%d failure(s)), %s requests: %s",
            self.url,
            count,
            "allowing" if self.on_error == "allow" else "denying",
            exc,
        )

    def _succeeded(self) -> None:
        """Redis answered: after an outage, say once that it is back."""
        if not self._down:
            return
        with self._lock:
            if not self._down:
                return
            self._down = False
            self._unlogged = 0
            self._logged_at = float("-inf")
        log.warning("Redis at %s available again", self.url)

    def close(self) -> None:
        """Close the connection pool of a client the store made from a URL
        (a client object passed in stays open: it is yours)."""
        if self._owns_client:
            self.client.close()


class RedisStore(_RedisBase):
    """Token buckets in Redis, updated atomically by one Lua script per request.

    Hits that arrive while another one waits for Redis go together in the
    next round trip (one pipeline of ``EVALSHA``), so a busy process pays one
    send and one read for many requests; a cluster client makes one call per
    hit.

    A source's buckets are one hash, ``<prefix><source>``, that expires exactly
    when every bucket in it is full again (so expiry never grants a burst).

    :param url: ``redis://host:port/db`` (or ``rediss://``, ``unix://``), or a
        redis-py client object (``Redis``, ``Sentinel.master_for(...)``,
        ``RedisCluster``) whose own timeouts then apply.
    :param prefix: key prefix.
    :param timeout: seconds to connect and per reply; no retries (URL only).
    :param on_error: ``"allow"`` (fail open, default) or ``"deny"`` (429, retry in 1 s).
    :param retry_interval: seconds Redis is left alone after a failure.
    :param log_interval: at most one warning per this many seconds.
    :param clock: monotonic seconds, for the two intervals.

    Example::

        from oxypy import Forward, Rate, RateLimit, RedisStore
        store = RedisStore("redis://127.0.0.1:6379/0")
        app = RateLimit(Forward("http://127.0.0.1:9000"), rates=[Rate(20)], store=store)

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``url`` may be a redis-py client object.
    """

    def __init__(
        self,
        url: str | Any,
        *,
        prefix: str = "oxypy:rl:",
        timeout: float = 0.25,
        on_error: OnError = "allow",
        retry_interval: float = 1.0,
        log_interval: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            url,
            prefix=prefix,
            timeout=timeout,
            on_error=on_error,
            retry_interval=retry_interval,
            log_interval=log_interval,
            clock=clock,
        )
        self._script = self.client.register_script(_RATE_SCRIPT)
        self._args: dict[tuple[Rate, ...], list[Any]] = {}
        # Hits that arrive while another one is waiting for Redis share the
        # next round trip (one pipeline): see _batched.  Only for a plain
        # client (a URL, or Redis/Sentinel.master_for): a cluster client
        # routes each key itself.
        self._pipelines = type(self.client).__name__ == "Redis" and callable(
            getattr(self.client, "pipeline", None)
        )
        from redis.exceptions import NoScriptError

        self._no_script = NoScriptError
        self._queue: list[_Hit] = []
        self._queue_lock = threading.Lock()
        self._busy = False

    def _rate_args(self, rates: tuple[Rate, ...]) -> list[Any]:
        args = self._args.get(rates)
        if args is None:
            args = [len(rates)]
            for rate in rates:
                interval, tolerance = rate.interval * 1e6, rate.tolerance * 1e6
                args += [f"{interval!r}:{tolerance!r}", repr(interval), repr(tolerance)]
            if len(self._args) < 256:
                self._args[rates] = args
        return args

    def hit(self, key: str, rates: Sequence[Rate]) -> Verdict:
        if self._available():
            try:
                args = self._rate_args(tuple(rates))
                if self._pipelines:
                    out = self._batched(_Hit(self.prefix + key, args))
                else:
                    out = self._script(keys=[self.prefix + key], args=args)
            except self._errors_type as exc:
                self._failed(exc)
            else:
                self._succeeded()
                debts = tuple(int(d) / 1e6 for d in out[2:])
                return Verdict(bool(int(out[0])), int(out[1]) / 1e6, debts)
        if self.on_error == "allow":
            return Verdict(True, 0.0, ())
        return Verdict(False, max(1.0, self.retry_interval), ())

    def _batched(self, hit: _Hit) -> Any:
        """Run ``hit``'s script, in one round trip with every hit queued meanwhile.

        The first caller leads: it sends what is queued (its own hit first) as
        one pipeline, hands each caller its reply, then passes the lead to the
        first hit queued during the round trip, if any.  Under load a round
        trip serves many requests (one send, one read, one wake-up); alone, a
        hit costs what one script call costs.
        """
        with self._queue_lock:
            self._queue.append(hit)
            lead = not self._busy
            self._busy = True
        if not lead:
            try:
                hit.done.wait()
            except BaseException:
                # Interrupted while waiting (its caller's timeout): leave the
                # queue, and pass the lead on if it had just been handed over.
                with self._queue_lock:
                    if hit in self._queue:
                        self._queue.remove(hit)
                    handed, hit.lead = hit.lead, False
                if handed:
                    self._pass_lead()
                raise
            if not hit.lead:
                if isinstance(hit.error, _Interrupted):
                    return self._script(keys=[hit.key], args=hit.args)  # on its own
                if hit.error is not None:
                    raise hit.error
                return hit.reply
        batch: list[_Hit] = []
        try:
            with self._queue_lock:
                batch, self._queue = self._queue, []
            self._round_trip(batch)
        except BaseException as exc:
            # Every waiter of the batch gets a Redis error as its own; a leader
            # interrupted by something else (its caller's timeout) leaves the
            # others to call Redis on their own.
            for other in batch:
                if other.error is None and other.reply is None:
                    other.error = exc if isinstance(exc, self._errors_type) else _Interrupted()
            raise
        finally:
            self._pass_lead()
            for other in batch:
                if other is not hit:
                    other.done.set()
        if hit.error is not None:
            raise hit.error
        return hit.reply

    def _pass_lead(self) -> None:
        """The next round trip is led by the first hit queued, if any."""
        with self._queue_lock:
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].done.set()
            else:
                self._busy = False

    def _round_trip(self, batch: list[_Hit]) -> None:
        """One EVALSHA per hit, in one pipeline; the script is loaded again if Redis lost it."""
        sha = self._script.sha
        for attempt in (1, 2):
            replies: list[Any]
            if len(batch) == 1:
                try:
                    replies = [self.client.evalsha(sha, 1, batch[0].key, *batch[0].args)]
                except self._no_script as exc:
                    replies = [exc]
            else:
                pipe = self.client.pipeline(transaction=False)
                for one in batch:
                    pipe.evalsha(sha, 1, one.key, *one.args)
                replies = pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, self._no_script) for r in replies):
                self.client.script_load(_RATE_SCRIPT)  # Redis lost it (restart, SCRIPT FLUSH)
                continue
            for one, reply in zip(batch, replies, strict=True):
                if isinstance(reply, BaseException):
                    one.error = reply
                else:
                    one.reply = reply
            return


class _Interrupted(Exception):
    """The leading hit was interrupted (a timeout of the caller): its batch failed."""


class _Hit:
    """One queued rate-limit hit: its key and script args; its reply or error when done."""

    __slots__ = ("key", "args", "reply", "error", "lead", "done")

    def __init__(self, key: str, args: list[Any]) -> None:
        self.key = key
        self.args = args
        self.reply: Any = None
        self.error: BaseException | None = None
        #: Set by the leader when this hit is to lead the next round trip.
        self.lead = False
        self.done = threading.Event()


class _RedisLease:
    __slots__ = ("_store", "_key", "_id", "_released", "refresh_every")

    def __init__(self, store: RedisConnStore | None, key: str, lease_id: str) -> None:
        self._store = store
        self._key = key
        self._id = lease_id
        self._released = store is None
        self.refresh_every = 0.0 if store is None else store.lease_ttl / 3

    def release(self) -> None:
        if self._released or self._store is None:
            return
        self._released = True
        self._store._release(self._key, self._id)

    def refresh(self) -> None:
        if not self._released and self._store is not None:
            self._store._refresh(self._key, self._id)


class RedisConnStore(_RedisBase):
    """Connection slots as expiring leases in Redis, for :class:`oxypy.ConnLimit`.

    Each source is a sorted set ``<prefix><source>`` of lease ids scored by
    their expiry (Redis ``TIME``).  A lease is released when the response is
    closed; if the worker dies first it simply expires after ``lease_ttl``.
    While a response streams, ConnLimit refreshes its lease every
    ``lease_ttl / 3`` seconds *as chunks pass*: a stream silent for longer
    than ``lease_ttl`` may lose its slot to another request.

    :param url: ``redis://host:port/db``, or a redis-py client object (as for
        :class:`RedisStore`).
    :param prefix: key prefix.
    :param lease_ttl: seconds a lease lives without a refresh (default 60).
    :param timeout: seconds to connect and per reply; no retries (URL only).
    :param on_error: ``"allow"`` (fail open, default) or ``"deny"`` (429).
    :param retry_interval: seconds Redis is left alone after a failure.
    :param log_interval: at most one warning per this many seconds.
    :param clock: monotonic seconds, for the two intervals.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``url`` may be a redis-py client object.
    """

    def __init__(
        self,
        url: str | Any,
        *,
        prefix: str = "oxypy:cl:",
        lease_ttl: float = 60.0,
        timeout: float = 0.25,
        on_error: OnError = "allow",
        retry_interval: float = 1.0,
        log_interval: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            url,
            prefix=prefix,
            timeout=timeout,
            on_error=on_error,
            retry_interval=retry_interval,
            log_interval=log_interval,
            clock=clock,
        )
        if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, int | float):
            raise ConfigurationError(f"lease_ttl must be a number, got {lease_ttl!r}")
        if lease_ttl < 0.01:
            raise ConfigurationError(f"lease_ttl must be >= 0.01 s, got {lease_ttl!r}")
        self.lease_ttl = float(lease_ttl)
        self._ttl_ms = max(10, round(lease_ttl * 1000))
        self._acquire = self.client.register_script(_ACQUIRE_SCRIPT)
        self._refresh_script = self.client.register_script(_REFRESH_SCRIPT)

    def acquire(self, key: str, limit: int) -> _RedisLease | None:
        if self._available():
            lease_id = os.urandom(9).hex()
            try:
                taken = self._acquire(
                    keys=[self.prefix + key], args=[limit, lease_id, self._ttl_ms]
                )
            except self._errors_type as exc:
                self._failed(exc)
            else:
                self._succeeded()
                return _RedisLease(self, key, lease_id) if int(taken) else None
        if self.on_error == "allow":
            return _RedisLease(None, key, "")
        return None

    def in_flight(self, key: str) -> int:
        """Live leases of ``key`` (for tests and metrics)."""
        now_s, now_us = self.client.time()
        now_ms = now_s * 1000 + now_us // 1000
        return int(self.client.zcount(self.prefix + key, f"({now_ms}", "+inf"))

    def _release(self, key: str, lease_id: str) -> None:
        try:
            self.client.zrem(self.prefix + key, lease_id)
        except self._errors_type as exc:
            self._failed(exc)  # the lease expires by itself

    def _refresh(self, key: str, lease_id: str) -> None:
        try:
            self._refresh_script(keys=[self.prefix + key], args=[lease_id, self._ttl_ms])
        except self._errors_type as exc:
            self._failed(exc)
