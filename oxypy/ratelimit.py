"""RateLimit: token-bucket rate limiting per request source.

Each source (client address, host, header value, or anything a callable
returns) gets one token bucket per :class:`Rate`; a request passes only when
every bucket has a token, otherwise it is answered 429 with ``Retry-After``
and ``X-Retry-In``.  Buckets live in a store: in memory per process by default,
or in Redis (:class:`oxypy.RedisStore`) so the limit holds across processes.

Theory of operation: a bucket is kept as one number, its *theoretical arrival
time* ``tat`` (GCRA).  A rate of ``average`` per ``period`` with ``burst``
spends ``T = period / average`` seconds per token and holds at most
``tau = T * burst`` seconds of credit.  A request at ``now`` moves ``tat`` to
``max(tat, now) + T`` when that stays within ``now + tau``; otherwise it waits
exactly ``max(tat, now) + T - tau - now`` (fractional refill: the delay is
never over-estimated).  A bucket whose ``tat <= now`` is full, so an entry can
be forgotten exactly when it is full, which is the only time the in-memory
store evicts without counting it as pressure and the time Redis expires a key:
a busy source never gets a fresh burst because its entry aged out.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from itertools import islice
from typing import Any, NamedTuple, Protocol

from ._core.deprecation import keyword_only_since, renamed_since
from ._core.locks import short_lock
from ._core.net import TrustedProxies
from ._core.snapshot import BlockSnapshot, describe_store
from ._core.types import Clock, Headers, Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .errors import ErrorHandler, default_error_handler, respond_error
from .exceptions import ConfigurationError, RateLimited, RequestError
from .extractors import Missing, Source, SourceExtractor

__all__ = ["MemoryStore", "Rate", "RateLimit", "RateStore", "Verdict"]

log = logging.getLogger(__name__)

_EPS = 1e-9  # float slack: stepping a clock by exactly T must refill one token


@dataclass(frozen=True)
class Rate:
    """``average`` requests per ``period`` seconds, with bursts up to ``burst``.

    A rate reads as the pair ``Rate(average, period)`` (``Rate(100, 60.0)``:
    100 per minute); the other options are keyword-only.

    :param average: tokens added per period (> 0, may be fractional).
    :param period: seconds (> 0).
    :param burst: bucket size, an integer >= 1; defaults to ``ceil(average)``.
    :param name: the policy name in the IETF ``RateLimit`` headers.

    .. versionchanged:: 0.2
       ``burst`` and ``name`` are keyword-only (positional use warns).
    """

    average: float
    period: float = 1.0
    _: KW_ONLY
    burst: int | None = None
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for attr in ("average", "period"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"Rate.{attr} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigurationError(f"Rate.{attr} must be > 0, got {value!r}")
        burst = self.burst
        if burst is None:
            object.__setattr__(self, "burst", max(1, math.ceil(self.average)))
        elif isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigurationError(f"Rate.burst must be an integer >= 1, got {burst!r}")
        if self.name is None:
            object.__setattr__(self, "name", f"{self.average:g}/{self.period:g}s")
        # Computed once: a Rate is a key of every bucket dict, looked up per request.
        interval = self.period / self.average
        object.__setattr__(self, "_interval", interval)
        object.__setattr__(self, "_tolerance", interval * self.size)
        object.__setattr__(self, "_hash", hash((self.average, self.period, self.burst)))

    def __hash__(self) -> int:
        # The same fields as the generated __eq__ compares (``name`` is not one).
        return self._hash  # type: ignore[attr-defined,no-any-return]

    @property
    def interval(self) -> float:
        """Seconds per token, ``period / average``."""
        return self._interval  # type: ignore[attr-defined,no-any-return]

    @property
    def tolerance(self) -> float:
        """Seconds of credit a full bucket holds, ``interval * burst``."""
        return self._tolerance  # type: ignore[attr-defined,no-any-return]

    @property
    def size(self) -> int:
        return self.burst if self.burst is not None else 1

    def remaining(self, debt: float) -> int:
        """Whole tokens left in a bucket that owes ``debt`` seconds."""
        return max(0, math.floor((self.tolerance - debt) / self.interval + _EPS))


# One more release of ``Rate(10, 1.0, 20)``; the dataclass's own ``__init__``
# is wrapped so its signature stays the generated, keyword-only one.
setattr(Rate, "__init__", keyword_only_since("0.2", "burst", "name")(Rate.__init__))  # noqa: B010


class Verdict(NamedTuple):
    """A store's answer: allowed or not, the exact wait, and each bucket's debt.

    ``debts[i]`` is how many seconds bucket ``i`` needs to be full again, after
    this request (empty when the store could not tell, e.g. Redis was down).
    """

    allowed: bool
    retry_in: float
    debts: tuple[float, ...]


class RateStore(Protocol):
    """Where buckets live: ``hit(key, rates)`` takes one token from each or none."""

    def hit(self, key: str, rates: Sequence[Rate]) -> Verdict: ...


def gcra(
    tats: Sequence[float], rates: Sequence[Rate], now: float
) -> tuple[bool, float, list[float]]:
    """One request against buckets ``tats`` at ``now``: (allowed, retry_in, new tats).

    All buckets must allow; on a rejection nothing changes (rollback) and the
    wait is the longest one.
    """
    new: list[float] = []
    wait = 0.0
    for tat, rate in zip(tats, rates, strict=True):
        nxt = max(tat, now) + rate.interval
        over = nxt - now - rate.tolerance
        if over > _EPS:
            wait = max(wait, over)
        new.append(nxt)
    if wait > 0.0:
        return False, wait, list(tats)
    return True, 0.0, new


class MemoryStore:
    """In-process buckets for up to ``capacity`` sources, least recently used first out.

    Full buckets carry no information, so they are dropped freely; a source
    with a partly spent bucket is evicted only when ``capacity`` other sources
    were used more recently (then counted in :attr:`evicted_busy` and logged).

    :param capacity: maximum number of tracked sources (default 65 536).
    :param clock: monotonic seconds (tests step it).
    """

    def __init__(self, *, capacity: int = 65536, clock: Clock = time.monotonic) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigurationError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.clock = clock
        self.evicted_busy = 0
        self._buckets: OrderedDict[str, dict[Rate, float]] = OrderedDict()
        self._lock = short_lock()  # dict updates only (the warning is logged after it)

    def __len__(self) -> int:
        return len(self._buckets)

    def hit(self, key: str, rates: Sequence[Rate]) -> Verdict:
        evicted = 0
        with self._lock:
            now = self.clock()
            buckets = self._buckets.get(key)
            if buckets is None:
                buckets = {}
                evicted = self._insert(key, buckets, now)
            else:
                self._buckets.move_to_end(key)
            tats = [buckets.get(rate, now) for rate in rates]
            allowed, wait, new = gcra(tats, rates, now)
            if allowed:
                for rate, tat in zip(rates, new, strict=True):
                    buckets[rate] = tat
            self._drop_idle(now)
        if evicted and (evicted == 1 or evicted % 1000 == 0):
            log.warning(
                "rate limit store at capacity %d: evicted busy source (%d so far)",
                self.capacity,
                evicted,
            )
        return Verdict(allowed, wait, tuple([max(0.0, t - now) for t in new]))

    def _insert(self, key: str, buckets: dict[Rate, float], now: float) -> int:
        """Add ``key``'s buckets, evicting if full; the busy-eviction count if one was evicted."""
        self._drop_idle(now)
        if len(self._buckets) >= self.capacity:
            # Prefer a full bucket among the coldest few over the coldest one.
            for cold_key in list(islice(self._buckets, 16)):
                if _idle(self._buckets[cold_key], now):
                    del self._buckets[cold_key]
                    break
        evicted = 0
        while len(self._buckets) >= self.capacity:
            old_key, old = self._buckets.popitem(last=False)
            if not _idle(old, now):
                self.evicted_busy += 1
                evicted = self.evicted_busy
        self._buckets[key] = buckets
        return evicted

    def _drop_idle(self, now: float) -> None:
        # Full buckets are indistinguishable from absent ones: forget a couple
        # from the cold end on every call so memory follows real activity.
        for _ in range(2):
            if not self._buckets:
                return
            old_key = next(iter(self._buckets))
            if not _idle(self._buckets[old_key], now):
                return
            del self._buckets[old_key]


def _idle(buckets: dict[Rate, float], now: float) -> bool:
    for tat in buckets.values():
        if tat > now:
            return False
    return True


def _go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String`` (``1.5s``, ``100ms``, ``1m30s``), ASCII ``us``."""
    ns = max(0, round(seconds * 1e9))
    if ns == 0:
        return "0s"

    def frac(value: int, unit: int) -> str:
        whole, rest = divmod(value, unit)
        if not rest:
            return str(whole)
        digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}"

    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return frac(ns, 1_000) + "us"
    if ns < 1_000_000_000:
        return frac(ns, 1_000_000) + "ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return out + frac(rest, 10**9) + "s"


#: Not public since 0.2 (an internal helper); importable until 1.0.
go_duration = _go_duration


def _sf_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_header(rates: Sequence[Rate]) -> str:
    """``RateLimit-Policy``: one item per rate, ``"name";q=<average>;w=<period>``."""
    return ", ".join(
        f"{_sf_string(r.name or '')};q={max(1, round(r.average))};w={max(1, math.ceil(r.period))}"
        for r in rates
    )


def state_header(rates: Sequence[Rate], debts: Sequence[float]) -> str:
    """``RateLimit``: ``"name";r=<tokens left>;t=<seconds until the bucket is full>``."""
    return ", ".join(
        f"{_sf_string(r.name or '')};r={r.remaining(d)};t={math.ceil(d - _EPS) if d > 0 else 0}"
        for r, d in zip(rates, debts, strict=True)
    )


class RateLimit:
    """Limit the request rate of each source; 429 when over.

    **Reads** the source (``REMOTE_ADDR`` and, from trusted proxies only,
    ``X-Forwarded-For`` for ``"client.ip"``).  **Writes** ``oxypy.error`` on
    rejection.  Streams; never buffers.

    Failures: over the rate → 429 :class:`RateLimited` with ``Retry-After``
    (whole seconds, rounded up, at least 1), ``X-Retry-In`` (Go duration, e.g.
    ``1.5s``) and the IETF ``RateLimit-Policy``/``RateLimit`` headers; no
    source value under ``missing="reject"`` → 400.

    :param next_app: the WSGI app to protect.
    :param rates: one or more :class:`Rate`; every one must allow a request.
    :param source: ``"client.ip"``, ``"request.host"``, ``"request.header.<Name>"``
        or a callable ``(environ) -> str | None``.
    :param missing: ``"reject"`` | ``"shared"`` | ``"skip"`` for requests without a source.
    :param trusted_proxies: CIDRs whose ``X-Forwarded-For`` ``client.ip`` believes.
    :param depth: at most this many trusted hops back into ``X-Forwarded-For``.
    :param rates_for: ``(environ) -> list[Rate] | None`` per-request rates (e.g.
        by API-key tier); None or empty means ``rates``.  If it raises or
        returns anything but Rates, the request is answered 500 ("rate limit
        misconfigured") through ``error_handler`` and the cause is logged.
    :param capacity: sources tracked by the default in-memory store.
    :param store: a :class:`RateStore`; default :class:`MemoryStore` (per process).
    :param ratelimit_headers: also send ``RateLimit-Policy``/``RateLimit`` on
        successes (``headers=`` until 0.2: the name now means header values
        everywhere, as in ``Webhook(headers=)``).
    :param clock: monotonic seconds for the default store.
    :param error_handler: answers the 429/400.
    :param skip: ``(environ) -> bool``; True passes the request through unlimited.

    Example::

        from oxypy import Forward, Rate, RateLimit, serve
        app = RateLimit(Forward("http://127.0.0.1:9000"),
                        rates=[Rate(10, 1.0, burst=20), Rate(300, 60.0)])
        serve(app, "127.0.0.1:8080")

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``headers=`` renamed ``ratelimit_headers=`` (the old name warns).
    """

    @renamed_since("0.2", headers="ratelimit_headers")
    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        rates: Iterable[Rate],
        source: str | SourceExtractor = "client.ip",
        missing: Missing = "reject",
        trusted_proxies: Iterable[str] | TrustedProxies | None = None,
        depth: int = 0,
        rates_for: Callable[[WSGIEnvironment], Sequence[Rate] | None] | None = None,
        capacity: int = 65536,
        store: RateStore | None = None,
        ratelimit_headers: bool = False,
        clock: Clock = time.monotonic,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("RateLimit needs the next WSGI app as first argument")
        self.rates = _check_rates(rates, "rates")
        self.next_app = next_app
        self.source = Source(source, missing=missing, trusted_proxies=trusted_proxies, depth=depth)
        if rates_for is not None and not callable(rates_for):
            raise ConfigurationError("rates_for must be a callable")
        self.rates_for = rates_for
        self.store: RateStore = (
            store if store is not None else MemoryStore(capacity=capacity, clock=clock)
        )
        self.ratelimit_headers = bool(ratelimit_headers)
        self.error_handler = error_handler
        self.skip = skip
        self._policies: dict[tuple[Rate, ...], str] = {self.rates: policy_header(self.rates)}
        #: requests refused with 429 since creation (the status page)
        self.limited = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        key = self.source.gate(self, environ, start_response)
        if not isinstance(key, str):
            return key  # skipped, unkeyed or refused: already answered
        rates = self.rates
        if self.rates_for is not None:
            try:
                chosen = self.rates_for(environ)
                if chosen:
                    rates = _check_rates(chosen, "rates_for()")
            except Exception as exc:  # noqa: BLE001 - the user's callable: answered, logged
                # Only visible at request time: answered through error_handler
                # (500, short body), with the cause in the log, never a traceback
                # to the client.
                log.error("RateLimit rates_for failed: %r", exc, exc_info=exc)
                broken = RequestError("rate limit misconfigured: rates_for failed", status=500)
                broken.__cause__ = exc
                return respond_error(self.error_handler, environ, start_response, broken)
        verdict = self.store.hit(key, rates)
        if not verdict.allowed:
            wait = verdict.retry_in
            shown = _go_duration(wait)
            headers = [
                ("Retry-After", str(max(1, math.ceil(wait - _EPS)))),
                ("X-Retry-In", shown),
            ]
            headers.extend(self._rate_headers(rates, verdict.debts))
            self.limited += 1
            limited = RateLimited(f"rate limit reached, retry in {shown}", headers=headers)
            return respond_error(self.error_handler, environ, start_response, limited)
        if not self.ratelimit_headers or not verdict.debts:
            return self.next_app(environ, start_response)
        extra = self._rate_headers(rates, verdict.debts)

        def start_with_headers(
            status: str, response_headers: Headers, exc_info: Any = None
        ) -> Callable[[bytes], object]:
            return start_response(status, response_headers + extra, exc_info)

        return self.next_app(environ, start_with_headers)

    def snapshot(self) -> BlockSnapshot:
        """``{"kind", "rates", "store", "sources", "limited"}`` for the status page:
        the rates, the store (URL password redacted), the sources the in-memory
        store tracks now (None for another store) and the requests refused.

        .. versionadded:: 0.3
        """
        store = self.store
        return {
            "kind": "RateLimit",
            "rates": [_describe_rate(r) for r in self.rates],
            "store": describe_store(store),
            "sources": len(store) if isinstance(store, MemoryStore) else None,
            "limited": self.limited,
        }

    def _rate_headers(self, rates: tuple[Rate, ...], debts: Sequence[float]) -> Headers:
        if len(debts) != len(rates):
            return []
        policy = self._policies.get(rates)
        if policy is None:
            policy = policy_header(rates)
            if len(self._policies) < 256:
                self._policies[rates] = policy
        return [("RateLimit-Policy", policy), ("RateLimit", state_header(rates, debts))]


def _describe_rate(rate: Rate) -> str:
    return f"{rate.average:g} per {_go_duration(rate.period)}, burst {rate.size}"


def _check_rates(rates: Iterable[Rate], what: str) -> tuple[Rate, ...]:
    if isinstance(rates, Rate):
        rates = (rates,)
    try:
        out = tuple(rates)
    except TypeError as exc:
        raise ConfigurationError(f"{what} must be a list of Rate") from exc
    if not out:
        raise ConfigurationError(f"{what} must hold at least one Rate")
    for rate in out:
        if not isinstance(rate, Rate):
            raise ConfigurationError(f"{what} must hold Rate objects, got {rate!r}")
    return out
