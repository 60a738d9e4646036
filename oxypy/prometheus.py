"""Prometheus metrics for a chain, and a ``/metrics`` WSGI endpoint.

``PrometheusMetrics`` counts requests by status class, times them, tracks
requests in flight, and reads ``environ["oxypy.exchanges"]`` for per-target
counts and upstream errors by kind.  ``prometheus_client`` is an optional
extra (``pip install 'oxypy-gateway[prometheus]'``), imported only when used.
Not to be confused with :mod:`oxypy.rolling`, the in-memory rolling metrics
that CircuitBreaker and the Rebalancer use.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

from . import environ as keys
from ._core.observe import Observation, error_kind, observe
from ._core.telemetry import Telemetry
from ._core.types import Clock, Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError, RequestError
from .mirror import Mirror
from .retrybudget import RetryBudget

__all__ = [
    "BreakerStateGauge",
    "MirrorMetrics",
    "PrometheusMetrics",
    "RetryBudgetMetrics",
    "metrics_app",
]

#: Latency buckets in seconds: 5 ms to 30 s, suited to a gateway.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BREAKER_STATES = ("standby", "tripped", "recovering")


def _require() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            "prometheus metrics need the prometheus_client package: "
            "pip install 'oxypy-gateway[prometheus]'"
        ) from exc
    return prometheus_client


def _registry(pc: Any, registry: Any) -> Any:
    return pc.REGISTRY if registry is None else registry


def _code_class(status: int | None) -> str:
    if not status:
        return "none"
    return f"{status // 100}xx"


def _check_namespace(namespace: str) -> None:
    if not namespace.replace("_", "a").isalnum() or namespace[0].isdigit():
        raise ConfigurationError(f"namespace must be a Prometheus name prefix: {namespace!r}")


class _RequestFamilies:
    """PrometheusMetrics' metric families for one namespace in one registry."""

    def __init__(self, pc: Any, registry: Any, namespace: str, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.lock = threading.Lock()
        self.targets: set[str] = set()
        self.requests = pc.Counter(
            "requests",
            "Requests finished, by method and status class.",
            ["method", "code_class"],
            namespace=namespace,
            registry=registry,
        )
        self.duration = pc.Histogram(
            "request_duration_seconds",
            "Time from the call to the end of the response body.",
            ["code_class"],
            namespace=namespace,
            buckets=buckets,
            registry=registry,
        )
        self.in_flight = pc.Gauge(
            "requests_in_flight",
            "Requests being served.",
            namespace=namespace,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.upstream = pc.Counter(
            "upstream_requests",
            "Upstream requests made by Forward, by target and status class.",
            ["target", "code_class"],
            namespace=namespace,
            registry=registry,
        )
        self.upstream_errors = pc.Counter(
            "upstream_errors",
            "Upstream requests that failed, by target and error kind.",
            ["target", "kind"],
            namespace=namespace,
            registry=registry,
        )
        self.errors = pc.Counter(
            "errors",
            "Request errors answered by oxypy blocks, by kind.",
            ["kind"],
            namespace=namespace,
            registry=registry,
        )


class _BreakerFamily:
    """BreakerStateGauge's gauge for one namespace in one registry."""

    def __init__(self, pc: Any, registry: Any, namespace: str, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.gauge = pc.Gauge(
            "circuit_breaker_state",
            "1 for the current state of each circuit breaker, 0 for the others.",
            ["name", "state"],
            namespace=namespace,
            registry=registry,
            multiprocess_mode="livemax",
        )


class _BudgetFamily:
    """RetryBudgetMetrics' collector for one namespace in one registry.

    A custom collector: it reads each budget's state when scraped, so a
    budget costs nothing per request beyond its own counting.
    """

    def __init__(self, pc: Any, registry: Any, namespace: str, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.pc = pc
        self.prefix = f"{namespace}_retry_budget"
        self.lock = threading.Lock()
        self.budgets: dict[str, RetryBudget] = {}
        registry.register(self)

    def _families(self) -> list[Any]:
        from prometheus_client import core

        p = self.prefix
        return [
            core.CounterMetricFamily(
                f"{p}_requests", "Client requests counted by the retry budget.", labels=["name"]
            ),
            core.CounterMetricFamily(
                f"{p}_retries", "Retries and hedges the retry budget allowed.", labels=["name"]
            ),
            core.CounterMetricFamily(
                f"{p}_refused", "Retries and hedges the retry budget refused.", labels=["name"]
            ),
            core.GaugeMetricFamily(
                f"{p}_window_retries", "Retries counted in the budget's window.", labels=["name"]
            ),
            core.GaugeMetricFamily(
                f"{p}_limit", "Retries the budget allows in its window now.", labels=["name"]
            ),
        ]

    def describe(self) -> list[Any]:
        return self._families()

    def collect(self) -> list[Any]:
        families = self._families()
        with self.lock:
            budgets = list(self.budgets.items())
        for name, budget in budgets:
            state = budget.state()
            values = (
                state.requests_total,
                state.retries_total,
                state.refused_total,
                state.retries,
                state.limit,
            )
            for family, value in zip(families, values, strict=True):
                family.add_metric([name], value)
        return families


#: MirrorMetrics' counters: (metric suffix, Mirror attribute, help).
_MIRROR_COUNTS = (
    ("copies", "mirrored", "Copies of requests sent to the mirror."),
    ("dropped", "dropped", "Copies not made: max_in_flight copies were running."),
    ("too_large", "too_large", "Copies not made: the body was over max_body_bytes."),
    ("failed", "failed", "Copies that raised, or that the mirror answered 502/503/504."),
    ("compared", "compared", "Copies whose answer was compared with the primary's."),
    ("differed", "differed", "Compared copies whose status, length or body hash differed."),
)


class _MirrorFamily:
    """MirrorMetrics' collector for one namespace in one registry (read when scraped)."""

    def __init__(self, pc: Any, registry: Any, namespace: str, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.prefix = f"{namespace}_mirror"
        self.lock = threading.Lock()
        self.mirrors: dict[str, Mirror] = {}
        registry.register(self)

    def _families(self) -> list[Any]:
        from prometheus_client import core

        p = self.prefix
        families: list[Any] = [
            core.CounterMetricFamily(f"{p}_{suffix}", text, labels=["name"])
            for suffix, _, text in _MIRROR_COUNTS
        ]
        families.append(
            core.GaugeMetricFamily(f"{p}_in_flight", "Copies running now.", labels=["name"])
        )
        return families

    def describe(self) -> list[Any]:
        return self._families()

    def collect(self) -> list[Any]:
        families = self._families()
        with self.lock:
            mirrors = list(self.mirrors.items())
        for name, mirror in mirrors:
            values = [getattr(mirror, attr) for _, attr, _ in _MIRROR_COUNTS]
            values.append(mirror.in_flight)
            for family, value in zip(families, values, strict=True):
                family.add_metric([name], value)
        return families


_F = TypeVar("_F", _RequestFamilies, _BreakerFamily, _BudgetFamily, _MirrorFamily)

# A registry accepts each metric name once, so the families registered for a
# namespace are kept next to the registry (weakly: a registry that goes away
# takes its entry with it) and handed to every later instance on the same
# registry and namespace.  This mirrors the registry's own, already
# process-wide, state; it holds no state of its own.
_FAMILIES: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]] = weakref.WeakKeyDictionary()
_FAMILIES_LOCK = threading.Lock()


def _shared(
    pc: Any,
    registry: Any,
    namespace: str,
    kind: str,
    buckets: tuple[float, ...],
    factory: Callable[[Any, Any, str, tuple[float, ...]], _F],
) -> _F:
    """The families ``kind`` of ``namespace`` in ``registry``, registered on first use."""
    registry = _registry(pc, registry)
    with _FAMILIES_LOCK:
        known = _FAMILIES.setdefault(registry, {})
        found = known.get((kind, namespace))
        if found is not None:
            if found.buckets != buckets:
                raise ConfigurationError(
                    f"metrics for namespace {namespace!r} are already registered with buckets "
                    f"{found.buckets}: use the same buckets, another namespace or another registry"
                )
            return found  # type: ignore[no-any-return]
        try:
            made = factory(pc, registry, namespace, buckets)
        except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
            raise ConfigurationError(
                f"metric names of namespace {namespace!r} are already registered by another "
                "collector: use another namespace or registry"
            ) from exc
        known[(kind, namespace)] = made
        return made


class PrometheusMetrics:
    """Export Prometheus metrics about the requests passing through.

    Metrics (``<ns>`` is ``namespace``):

    * ``<ns>_requests_total{method,code_class}``: finished requests; a
      client that went away (mid-upload or mid-download) counts as ``4xx``
      (499); an app that raised before any byte went out as ``5xx`` (the
      status decision Trace and CircuitBreaker share).
    * ``<ns>_request_duration_seconds{code_class}``: histogram, from the call
      to the ``close()`` of the response (the whole body streamed); under an
      :class:`~oxypy.OpenTelemetry` block each observation of a sampled
      trace carries ``trace_id``/``span_id`` as an exemplar (shown when the
      scrape asks for ``application/openmetrics-text``).
    * ``<ns>_requests_in_flight``: gauge (``livesum`` in multi-process mode).
    * ``<ns>_upstream_requests_total{target,code_class}``: one per
      ``Forward`` exchange below (retries count); ``code_class="none"`` when
      the upstream never answered.
    * ``<ns>_upstream_errors_total{target,kind}``: exchanges that failed, by
      error kind (``upstream_connect_error``, ``upstream_timeout``,
      ``client_disconnected``...).
    * ``<ns>_errors_total{kind}``: request errors any oxypy block answered
      (``rate_limited``, ``circuit_open``...), from ``environ["oxypy.error"]``.

    Targets beyond ``max_targets`` distinct URLs are counted as ``"other"``
    so a dynamic ``oxypy.target`` cannot explode the label set.  Breaker state:
    see :class:`BreakerStateGauge`.  Streams; never answers by itself.

    Under gunicorn with several workers set ``PROMETHEUS_MULTIPROC_DIR``
    before the workers start and serve :func:`metrics_app`; add
    ``prometheus_client.multiprocess.mark_process_dead(worker.pid)`` to
    gunicorn's ``child_exit`` hook.

    :param registry: a ``prometheus_client.CollectorRegistry``; default: the
        global ``prometheus_client.REGISTRY``, the one :func:`metrics_app` serves
        and multi-process mode collects.  Every PrometheusMetrics on the same
        registry and ``namespace`` shares one set of metric families (two
        chains in one process, or an app built twice, count into the same
        series, as two workers do); give each its own ``namespace`` or
        ``registry`` for separate series.
    :param namespace: metric name prefix (default ``"oxypy"``).
    :param buckets: histogram buckets in seconds.
    :param max_targets: distinct ``target`` label values kept (default 256).
    :param clock: monotonic seconds, for the latency.
    :param skip: ``skip(environ) -> bool``; True: not counted.
    :raises ConfigurationError: prometheus_client missing; the namespace's
        names taken by another collector; or the namespace already in use on
        this registry with other ``buckets``.

    Example::

        from werkzeug.middleware.dispatcher import DispatcherMiddleware
        from oxypy import Forward
        from oxypy.prometheus import PrometheusMetrics, metrics_app
        app = DispatcherMiddleware(PrometheusMetrics(Forward("http://127.0.0.1:9000")),
                                   {"/metrics": metrics_app()})

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        registry: Any = None,
        namespace: str = "oxypy",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_targets: int = 256,
        clock: Clock = time.monotonic,
        skip: Skip | None = None,
    ) -> None:
        pc = _require()
        _check_namespace(namespace)
        if max_targets < 1:
            raise ConfigurationError("max_targets must be >= 1")
        families = _shared(pc, registry, namespace, "requests", tuple(buckets), _RequestFamilies)
        self.requests = families.requests
        self.duration = families.duration
        self.in_flight = families.in_flight
        self.upstream = families.upstream
        self.upstream_errors = families.upstream_errors
        self.errors = families.errors
        self.next_app = next_app
        self.clock = clock
        self.skip = skip
        self.max_targets = max_targets
        # The target labels are capped per set of families, not per instance.
        self._lock = families.lock
        self._targets = families.targets

    def _target_label(self, target: str) -> str:
        with self._lock:
            if target in self._targets:
                return target
            if len(self._targets) < self.max_targets:
                self._targets.add(target)
                return target
        return "other"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        self.in_flight.inc()
        return observe(self.next_app, environ, start_response, partial(self._finish, self.clock()))

    def _finish(self, started: float, seen: Observation) -> None:
        self.in_flight.dec()
        outcome = seen.outcome()
        code_class = _code_class(outcome.status)
        environ = seen.environ
        self.requests.labels(environ.get("REQUEST_METHOD", ""), code_class).inc()
        telemetry: Telemetry | None = environ.get(keys.OTEL)
        exemplar = telemetry.exemplar() if telemetry is not None else None
        self.duration.labels(code_class).observe(max(0.0, self.clock() - started), exemplar)
        for ex in outcome.exchanges:
            target = self._target_label(ex.target or "none")
            self.upstream.labels(target, _code_class(ex.status)).inc()
            if ex.error is not None:
                self.upstream_errors.labels(target, error_kind(ex.error)).inc()
        error = environ.get(keys.ERROR)
        if isinstance(error, RequestError) and error is not seen.error_before:
            self.errors.labels(error.kind).inc()


class BreakerStateGauge:
    """``<ns>_circuit_breaker_state{name,state}``: 1 for a breaker's current state.

    Wire it to a :class:`~oxypy.CircuitBreaker` through its callbacks::

        states = BreakerStateGauge(registry=registry)
        hook = states.callback("api")           # sets "standby" now
        breaker = CircuitBreaker(next_app, "NetworkErrorRatio() > 0.5",
                                 on_trip=hook, on_standby=hook)

    The callback takes the breaker's transition (anything with ``.new``) or a
    state name.  The breaker only reports trips and returns to standby, so the
    gauge shows ``tripped`` through the recovery ramp.  In multi-process mode
    the value is the maximum over live workers (``livemax``).

    :param registry: as for :class:`PrometheusMetrics` (gauges on the same
        registry and namespace are one gauge).
    :param namespace: metric name prefix.
    """

    def __init__(self, *, registry: Any = None, namespace: str = "oxypy") -> None:
        pc = _require()
        _check_namespace(namespace)
        self.gauge = _shared(pc, registry, namespace, "breaker", (), _BreakerFamily).gauge

    def set(self, name: str, state: Any) -> None:
        """Record ``state`` (a name, a State, or a transition) for breaker ``name``."""
        value = str(getattr(state, "new", state)).lower()
        if value not in _BREAKER_STATES:
            raise ValueError(f"unknown circuit breaker state {value!r}")
        for each in _BREAKER_STATES:
            self.gauge.labels(name, each).set(1 if each == value else 0)

    def callback(self, name: str) -> Callable[[Any], None]:
        """A hook for ``on_trip``/``on_standby``; the gauge starts at ``standby``."""
        self.set(name, "standby")

        def hook(transition: Any) -> None:
            self.set(name, transition)

        return hook


class RetryBudgetMetrics:
    """Export the state of :class:`~oxypy.RetryBudget` objects, read when scraped.

    Metrics, each labelled ``name`` (``<ns>`` is ``namespace``):
    ``<ns>_retry_budget_requests_total``, ``<ns>_retry_budget_retries_total``
    (retries and hedges allowed), ``<ns>_retry_budget_refused_total``, and
    the gauges ``<ns>_retry_budget_window_retries`` and
    ``<ns>_retry_budget_limit`` (the retries the window allows now)::

        budget = RetryBudget(percent=20.0)
        RetryBudgetMetrics(registry=registry).add("api", budget)

    The collector reads each budget in the scraping process; with
    ``PROMETHEUS_MULTIPROC_DIR`` set, :func:`metrics_app` only aggregates
    the files of the multi-process mode, which these metrics are not part of.

    :param registry: as for :class:`PrometheusMetrics` (instances on the same
        registry and namespace share one collector).
    :param namespace: metric name prefix.

    .. versionadded:: 0.2
    """

    def __init__(self, *, registry: Any = None, namespace: str = "oxypy") -> None:
        pc = _require()
        _check_namespace(namespace)
        self._family = _shared(pc, registry, namespace, "budget", (), _BudgetFamily)

    def add(self, name: str, budget: RetryBudget) -> None:
        """Export ``budget`` under the label ``name`` (a name already used is replaced)."""
        if not isinstance(budget, RetryBudget):
            raise ConfigurationError("RetryBudgetMetrics.add needs a RetryBudget")
        with self._family.lock:
            self._family.budgets[name] = budget


class MirrorMetrics:
    """Export the counts of :class:`~oxypy.Mirror` blocks, read when scraped.

    Counters, each labelled ``name`` (``<ns>`` is ``namespace``):
    ``<ns>_mirror_copies_total`` (copies sent), ``<ns>_mirror_dropped_total``,
    ``<ns>_mirror_too_large_total``, ``<ns>_mirror_failed_total``, and in
    compare mode ``<ns>_mirror_compared_total`` and
    ``<ns>_mirror_differed_total``; the gauge ``<ns>_mirror_in_flight``::

        mirror = Mirror(Forward(current), candidate, compare=True)
        MirrorMetrics(registry=registry).add("candidate", mirror)

    The collector reads each block in the scraping process (not part of the
    multi-process mode, as :class:`RetryBudgetMetrics`).

    :param registry: as for :class:`PrometheusMetrics` (instances on the same
        registry and namespace share one collector).
    :param namespace: metric name prefix.

    .. versionadded:: 0.3
    """

    def __init__(self, *, registry: Any = None, namespace: str = "oxypy") -> None:
        pc = _require()
        _check_namespace(namespace)
        self._family = _shared(pc, registry, namespace, "mirror", (), _MirrorFamily)

    def add(self, name: str, mirror: Mirror) -> None:
        """Export ``mirror`` under the label ``name`` (a name already used is replaced)."""
        if not isinstance(mirror, Mirror):
            raise ConfigurationError("MirrorMetrics.add needs a Mirror")
        with self._family.lock:
            self._family.mirrors[name] = mirror


def metrics_app(registry: Any = None) -> WSGIApplication:
    """A WSGI app answering the Prometheus text format (mount it at ``/metrics``).

    With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn with several workers) it
    aggregates every worker's metrics through
    ``prometheus_client.multiprocess.MultiProcessCollector`` (``registry`` is
    then ignored); otherwise it exposes ``registry`` (default: the global
    ``REGISTRY``).

    .. versionadded:: 0.1
    """
    pc = _require()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = pc.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    app: WSGIApplication = pc.make_wsgi_app(_registry(pc, registry))
    return app
