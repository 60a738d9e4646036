"""CircuitBreaker: stop sending traffic to a failing app, then let it back in gradually.

The breaker watches the outcome of every request that passes through it
(status, latency, and whether ``Forward`` itself failed to reach the upstream),
evaluates a trigger expression over a rolling window of those outcomes, and
while tripped answers from a fallback instead of the wrapped app.

Theory of operation
-------------------

The breaker is a small state machine with three states and only four edges::

            trigger true                 fallback_duration over
    STANDBY -------------> TRIPPED ----------------------------> RECOVERING
       ^                     ^                                      |   |
       |                     |          trigger true                |   |
       |                     +--------------------------------------+   |
       |                         recovery_duration over                 |
       +----------------------------------------------------------------+

* **STANDBY** admits everything.  Each request's outcome is recorded in a
  :class:`~oxypy.rolling.RoundTripMetrics` window when its response iterable
  is *closed* (so streamed bodies count, and an upstream that fails
  mid-body counts as a network error).
* The trigger is evaluated lazily, right after an outcome is recorded, at
  most once per ``check_period``.  When it holds (in STANDBY or RECOVERING)
  the breaker goes to **TRIPPED** for ``fallback_duration`` seconds, resets
  the metrics (so recovery is judged only on traffic admitted after the
  trip) and fires ``on_trip``.
* **TRIPPED** sends every request to the fallback; those are not recorded.
* **RECOVERING** starts exactly when the fallback period ends and lasts
  ``recovery_duration``.  oxy's ratio controller admits a request when
  ``admitted / seen`` would stay below ``0.5 * elapsed / recovery_duration``;
  under steady traffic that cumulative target means the *instantaneous*
  share admitted rises linearly from 0 to 1 over the recovery period.  The
  trigger is still checked, so a backend that fails again trips again.
* When the recovery period ends the breaker is back in **STANDBY** and fires
  ``on_standby``.

Time-driven edges (TRIPPED → RECOVERING → STANDBY) are applied whenever the
breaker looks at the clock: on each request and on every read of
:attr:`CircuitBreaker.state`, so an idle breaker reports the true state and
fires its callbacks as soon as anyone asks.  All state lives behind one lock;
callbacks run after the lock is released.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any

from . import environ as keys
from ._core import telemetry
from ._core.checks import finite_number
from ._core.observe import Observation, observe
from ._core.snapshot import BreakerSnapshot, TermSnapshot
from ._core.types import Clock, Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .errors import ErrorHandler, default_error_handler, respond_error
from .exceptions import CircuitOpen, ConfigurationError
from .fallback import (  # noqa: F401 - importable from here until 1.0; live in oxypy.fallback
    RedirectFallback,
    ResponseFallback,
    Webhook,
)
from .predicate import Func, compile_predicate
from .rolling import RoundTripMetrics

__all__ = ["CircuitBreaker", "State", "Transition"]

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    """The breaker's state; compares equal to its lower-case name."""

    STANDBY = "standby"
    TRIPPED = "tripped"
    RECOVERING = "recovering"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Transition:
    """Handed to ``on_trip``/``on_standby`` callbacks: what changed, and when."""

    breaker: CircuitBreaker
    old: State
    new: State
    at: float


#: The functions a trigger expression may call, evaluated on RoundTripMetrics.
TRIGGER_FUNCTIONS = MappingProxyType(
    {
        "NetworkErrorRatio": Func(lambda m: m.network_error_ratio(), returns=float),
        "LatencyAtQuantileMS": Func(
            lambda m, q: m.latency_at_quantile_ms(q), args=(float,), returns=int
        ),
        "ResponseCodeRatio": Func(
            lambda m, a, b, c, d: m.response_code_ratio(a, b, c, d),
            args=(int, int, int, int),
            returns=float,
        ),
        "RequestThreshold": Func(lambda m: m.total_count(), returns=int),
    }
)


class _RatioController:
    """oxy's recovery ramp: admit while admitted/seen stays under 0.5·elapsed/duration."""

    __slots__ = ("start", "duration", "allowed", "denied")

    def __init__(self, start: float, duration: float) -> None:
        self.start = start
        self.duration = duration
        self.allowed = 0
        self.denied = 0

    def target(self, now: float) -> float:
        if self.duration <= 0:
            return 1.0
        return 0.5 * max(now - self.start, 0.0) / self.duration

    def allow(self, now: float) -> bool:
        if (self.allowed + 1) / (self.allowed + 1 + self.denied) < self.target(now):
            self.allowed += 1
            return True
        self.denied += 1
        return False


Callback = Callable[[Transition], Any]


class CircuitBreaker:
    """Trip to a fallback when a trigger over recent outcomes holds; recover gradually.

    **Reads** ``oxypy.exchanges`` (creating the list if needed): the last
    :class:`~oxypy.Exchange` appended below this block decides whether a
    request was a *network error* (Forward could not reach the upstream, or
    it failed mid-body); an upstream that itself answers 502 is not one.
    **Streams**: the body passes through untouched; the outcome (status,
    latency, network error) is recorded when the response iterable is closed.
    Latency runs from the call to ``start_response`` (the response head), so
    long downloads, event streams and WebSocket sessions do not count as slow.

    A client that goes away (mid-upload or mid-download) is recorded as
    ``499`` and is **never** a network error, so clients that abort cannot
    trip ``NetworkErrorRatio()``.  A wrapped app or body iterator that raises
    something other than an upstream failure is an app error, not a network
    error: recorded as ``500`` when nothing was sent yet (what the server
    answers), else with the status already sent.  The status decision is the
    one Trace and the Prometheus metrics make.

    While tripped (or when the recovery ramp turns a request away) the
    ``fallback`` answers; by default :class:`~oxypy.CircuitOpen` (**503**,
    with ``Retry-After``) through ``error_handler``.  Turned-away requests are
    not recorded.  See the module docstring for the state machine.

    :param expression: trigger over ``NetworkErrorRatio()``,
        ``LatencyAtQuantileMS(q)``, ``ResponseCodeRatio(a, b, c, d)`` and
        ``RequestThreshold()`` (positional); a bad one raises PredicateError.
    :param fallback: any WSGI app, e.g. :class:`ResponseFallback`,
        :class:`RedirectFallback` or a ``Forward`` to a standby region.
    :param fallback_duration: seconds to stay tripped (default 10).
    :param recovery_duration: seconds of the recovery ramp (default 10).
    :param check_period: minimum seconds between trigger evaluations (0.1).
    :param on_trip: ``callback(Transition)`` or :class:`Webhook`, on every trip.
    :param on_standby: the same, on the return to standby after recovery.
    :param clock: monotonic clock in seconds (tests step it).
    :param metrics: the :class:`~oxypy.rolling.RoundTripMetrics` to record
        into (default: 10 × 1 s counters, 6 × 10 s latency window).
    :param error_handler: answers :class:`~oxypy.CircuitOpen` without fallback.
    :param skip: ``skip(environ) -> True`` bypasses the breaker entirely.

    Example::

        from oxypy import CircuitBreaker, Forward, ResponseFallback
        cb = CircuitBreaker(Forward("http://127.0.0.1:9000"),
                            "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 20",
                            fallback=ResponseFallback(503, body="try again soon"))
        print(cb.state)  # standby

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        expression: str,
        /,
        *,
        fallback: WSGIApplication | None = None,
        fallback_duration: float = 10.0,
        recovery_duration: float = 10.0,
        check_period: float = 0.1,
        on_trip: Callback | None = None,
        on_standby: Callback | None = None,
        clock: Clock = time.monotonic,
        metrics: RoundTripMetrics | None = None,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("CircuitBreaker needs a WSGI app to wrap")
        self.predicate = compile_predicate(expression, TRIGGER_FUNCTIONS)
        for name, value in (
            ("fallback_duration", fallback_duration),
            ("recovery_duration", recovery_duration),
            ("check_period", check_period),
        ):
            finite_number(name, value)
        for name, fn in (
            ("fallback", fallback),
            ("on_trip", on_trip),
            ("on_standby", on_standby),
            ("skip", skip),
            ("error_handler", error_handler),
            ("clock", clock),
        ):
            if fn is not None and not callable(fn):
                raise ConfigurationError(f"{name} must be callable, got {fn!r}")
        if metrics is not None and not isinstance(metrics, RoundTripMetrics):
            raise ConfigurationError("metrics must be a RoundTripMetrics")
        self.next_app = next_app
        self.expression = expression
        self.fallback = fallback
        self.fallback_duration = float(fallback_duration)
        self.recovery_duration = float(recovery_duration)
        self.check_period = float(check_period)
        self.on_trip = on_trip
        self.on_standby = on_standby
        self.clock = clock
        self.metrics = metrics if metrics is not None else RoundTripMetrics(clock=clock)
        self.error_handler = error_handler
        self.skip = skip
        self._lock = threading.Lock()
        self._state = State.STANDBY
        self._until = 0.0  # end of the current TRIPPED or RECOVERING period
        self._ratio: _RatioController | None = None
        self._next_check: float | None = None

    # -- state machine (callers hold self._lock) ---------------------------------

    def _advance(self, now: float, fired: list[Transition]) -> None:
        """Apply the time-driven edges up to ``now``."""
        if self._state is State.TRIPPED and now >= self._until:
            start = self._until
            self._state = State.RECOVERING
            self._until = start + self.recovery_duration
            self._ratio = _RatioController(start, self.recovery_duration)
            self._log_edge(logging.INFO, f"recovering for {self.recovery_duration:g}s")
            fired.append(Transition(self, State.TRIPPED, State.RECOVERING, start))
        if self._state is State.RECOVERING and now >= self._until:
            self._state = State.STANDBY
            self._ratio = None
            self._log_edge(logging.INFO, "back to standby")
            fired.append(Transition(self, State.RECOVERING, State.STANDBY, self._until))

    def _log_edge(self, level: int, what: str) -> None:
        """One line for a state change, with what the trigger's functions give now."""
        values = _trigger_values(self.expression, self.metrics)
        log.log(
            level,
            "circuit breaker %s: %s%s",
            what,
            self.expression,
            f" with {values}" if values else "",
            extra={"trigger": self.expression, "values": values},
        )

    def _trip(self, now: float, fired: list[Transition]) -> None:
        old = self._state
        self._state = State.TRIPPED
        self._until = now + self.fallback_duration
        self._ratio = None
        values = _trigger_values(self.expression, self.metrics)
        self.metrics.reset()
        log.warning(
            "circuit breaker tripped for %gs: %s holds (%s)%s",
            self.fallback_duration,
            self.expression,
            old,
            f" with {values}" if values else "",
            extra={"trigger": self.expression, "values": values},
        )
        fired.append(Transition(self, old, State.TRIPPED, now))

    def _fire(self, fired: list[Transition]) -> None:
        for transition in fired:
            if transition.new is State.TRIPPED:
                callback = self.on_trip
            elif transition.new is State.STANDBY:
                callback = self.on_standby
            else:
                continue
            if callback is None:
                continue
            try:
                callback(transition)
            except Exception:
                # A broken callback must not fail the request that caused the transition.
                log.exception("circuit breaker %s callback %r failed", transition.new, callback)

    @property
    def state(self) -> State:
        """The current state (time-driven transitions applied first)."""
        fired: list[Transition] = []
        with self._lock:
            self._advance(self.clock(), fired)
            state = self._state
        self._fire(fired)
        return state

    def _admit(self, now: float) -> tuple[bool, float]:
        """Whether to pass this request on, and the Retry-After hint if not."""
        state = self._state
        if state is State.STANDBY:
            return True, 0.0  # fast path: standby has no time-driven edge
        fired: list[Transition] = []
        with self._lock:
            self._advance(now, fired)
            state = self._state
            if state is State.STANDBY:
                admitted, wait = True, 0.0
            elif state is State.TRIPPED:
                admitted, wait = False, self._until - now
            else:
                ratio = self._ratio
                admitted, wait = (ratio is None or ratio.allow(now)), 1.0
        self._fire(fired)
        return admitted, wait

    def _settle(self, status: int, latency: float, network_error: bool) -> bool:
        """Record one outcome; True when it tripped the breaker."""
        self.metrics.record(status, latency, network_error)
        now = self.clock()
        if self._next_check is not None and now < self._next_check:
            return False  # fast path; re-checked under the lock below
        fired: list[Transition] = []
        tripped = False
        with self._lock:
            if self._next_check is not None and now < self._next_check:
                return False
            self._next_check = now + self.check_period
            self._advance(now, fired)
            if self._state is not State.TRIPPED and self.predicate(self.metrics):
                self._trip(now, fired)
                tripped = True
        self._fire(fired)
        return tripped

    # -- WSGI ---------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        started = self.clock()
        admitted, wait = self._admit(started)
        if not admitted:
            seconds = max(1, math.ceil(wait))
            if self.fallback is not None:
                environ[keys.RETRY_AFTER] = seconds
                attributes = {telemetry.RETRY_AFTER: seconds}
                telemetry.note(environ, telemetry.EVENT_BREAKER_FALLBACK, attributes)
                return self.fallback(environ, start_response)
            exc = CircuitOpen(headers=[("Retry-After", str(seconds))])
            return respond_error(self.error_handler, environ, start_response, exc)

        return observe(
            self.next_app, environ, start_response, partial(self._done, started), clock=self.clock
        )

    def _done(self, started: float, seen: Observation) -> None:
        """Record one admitted request's outcome (from its body's ``close()``)."""
        outcome = seen.outcome()
        # Latency is time to the response head: a long download, an event
        # stream or a WebSocket session is not a slow upstream.
        ended = seen.head_at if seen.head_at is not None else self.clock()
        # Only Forward's own failure to reach or read the upstream is a network
        # error; a client that went away (499) or an app bug (500) never is.
        if self._settle(outcome.status, ended - started, outcome.upstream_failed):
            telemetry.note(
                seen.environ,
                telemetry.EVENT_BREAKER_TRIPPED,
                {
                    telemetry.TRIGGER: self.expression,
                    telemetry.FALLBACK_DURATION: self.fallback_duration,
                },
            )

    def snapshot(self) -> BreakerSnapshot:
        """The state now, the seconds it has left, and each comparison of the
        expression with its function's current value (for the status page).

        .. versionadded:: 0.3
        """
        state = self.state  # applies the time-driven edges first
        with self._lock:
            left = self._until - self.clock() if state is not State.STANDBY else None
        return {
            "kind": "CircuitBreaker",
            "state": state.value,
            "expression": self.expression,
            "state_for": None if left is None else round(max(0.0, left), 1),
            "terms": _terms(self.expression, self.metrics),
        }

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.expression!r}, state={self._state.value})"


_CALL = re.compile(r"\b([A-Za-z]+)\(([^()]*)\)")
_NUM = r"(-?[0-9][0-9.eE+-]*)"
_OP = r"(==|!=|<=|>=|<|>)"
_CALL_OP_NUM = re.compile(r"\b([A-Za-z]+)\(([^()]*)\)\s*" + _OP + r"\s*" + _NUM)
_NUM_OP_CALL = re.compile(_NUM + r"\s*" + _OP + r"\s*([A-Za-z]+)\(([^()]*)\)")
_FLIP = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}
_CMP: dict[str, Callable[[float, float], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}


def _call_value(name: str, raw: str, metrics: Any) -> float | None:
    """The value of the trigger function call ``name(raw)`` on ``metrics`` (None if not one)."""
    func = TRIGGER_FUNCTIONS.get(name)
    if func is None:
        return None
    parts = [p.strip() for p in raw.split(",")] if raw.strip() else []
    try:
        args = [t(p) for t, p in zip(func.args, parts, strict=True)]
        value = func.impl(metrics, *args)
    except (ValueError, TypeError, ArithmeticError):
        return None
    return float(value) if isinstance(value, int | float) else None


def _terms(expression: str, metrics: Any) -> list[TermSnapshot]:
    """Each ``Call() op number`` comparison of ``expression``, with the call's value now."""
    found: list[tuple[int, str, str, str, str]] = []
    for m in _CALL_OP_NUM.finditer(expression):
        found.append((m.start(), m.group(1), m.group(2), m.group(3), m.group(4)))
    for m in _NUM_OP_CALL.finditer(expression):
        found.append((m.start(), m.group(3), m.group(4), _FLIP[m.group(2)], m.group(1)))
    out: list[TermSnapshot] = []
    for _, name, raw, op, number in sorted(found):
        try:
            threshold = float(number)
        except ValueError:
            continue
        value = _call_value(name, raw, metrics)
        out.append(
            {
                "call": f"{name}({raw.strip()})",
                "op": op,
                "threshold": threshold,
                "value": value,
                "holds": None if value is None else _CMP[op](value, threshold),
            }
        )
    return out


def _trigger_values(expression: str, metrics: Any) -> str:
    """``"NetworkErrorRatio()=0.6, RequestThreshold()=20"``: what each metric
    function of ``expression`` gave when it tripped (for the log line)."""
    shown: dict[str, str] = {}
    for name, raw in _CALL.findall(expression):
        call = f"{name}({raw.strip()})"
        if call in shown:
            continue
        value = _call_value(name, raw, metrics)
        if value is None:
            continue
        float_ = TRIGGER_FUNCTIONS[name].returns is float
        shown[call] = f"{value:.4g}" if float_ else str(int(value))
    return ", ".join(f"{k}={v}" for k, v in shown.items())
