"""OpenTelemetry: a SERVER span per request, a CLIENT span per upstream attempt.

``OpenTelemetry`` starts a span for every request passing through, with the
stable HTTP semantic-convention attributes, and puts the request's telemetry
in ``environ["oxypy.otel"]``: ``Forward`` opens a CLIENT span there for each
upstream request it makes (each retry and hedge its own) and sends the W3C
trace context of that span upstream.  ``opentelemetry-api`` is an optional
extra (``pip install 'oxypy-gateway[otel]'``), imported only when the block
is built; the SDK and exporter are the user's choice
(:func:`tracer_provider_from_env` builds the usual one).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from . import environ as keys
from ._core.exchange import Exchange
from ._core.net import TrustedProxies
from ._core.observe import Observation, observe
from ._core.telemetry import ERROR_KIND, UNTRUSTED, Attributes
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError, RequestError, UpstreamError

__all__ = ["OpenTelemetry", "OpenTelemetryMissing", "tracer_provider_from_env"]

log = logging.getLogger(__name__)

#: The methods semantic conventions name; any other is reported as ``_OTHER``.
_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
#: The semantic-convention version the attribute names follow.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"


class OpenTelemetryMissing(ConfigurationError, ImportError):
    """A package OpenTelemetry support needs is not installed (the message names it)."""


def _api() -> Any:
    try:
        from opentelemetry import baggage, context, propagate, trace
    except ImportError as exc:
        raise OpenTelemetryMissing(
            "OpenTelemetry needs the opentelemetry-api package: pip install 'oxypy-gateway[otel]'"
        ) from exc
    return baggage, context, propagate, trace


def _w3c(propagator: Any) -> tuple[bool, bool]:
    """(is the W3C trace context propagator, also propagates W3C baggage).

    True only for the API's own classes, exactly (``OTEL_PROPAGATORS`` unset,
    ``tracecontext,baggage`` or ``tracecontext``): then ``traceparent`` is
    formatted here, as that propagator formats it.  Any other propagator, a
    subclass included, goes through the propagators API.
    """
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if type(propagator) is TraceContextTextMapPropagator:
        return True, False
    if type(propagator) is not CompositePropagator:
        return False, False
    # The API offers no public view of a composite's members.
    members = getattr(propagator, "_propagators", None)
    if not isinstance(members, (list, tuple)):
        return False, False
    kinds = [type(member) for member in members]
    if kinds.count(TraceContextTextMapPropagator) != 1 or any(
        kind not in (TraceContextTextMapPropagator, W3CBaggagePropagator) for kind in kinds
    ):
        return False, False
    return True, W3CBaggagePropagator in kinds


#: The parents a sampler tells apart: none (a root span), remote sampled,
#: remote not sampled, local sampled, local not sampled.
_ROOT, _REMOTE_SAMPLED, _REMOTE_UNSAMPLED, _LOCAL_SAMPLED, _LOCAL_UNSAMPLED = range(5)


def _drop_rule(tracer: Any) -> tuple[bool, ...] | None:
    """Which parents the SDK tracer's sampler drops whatever the span's attributes.

    A tuple of five booleans indexed by ``_ROOT``... (True: that span is
    dropped), or None when the block cannot know: any tracer but the SDK's
    own ``Tracer`` with its ``RandomIdGenerator`` and no span metrics, any
    sampler but ``ALWAYS_OFF``, ``ALWAYS_ON`` and ``ParentBased`` (whatever
    its name) made of those two (a ``TraceIdRatioBased`` delegate decides
    from a trace id of the SDK's own making, so it is unknown here, as is
    every sampler of the user's, which must see the attributes).
    """
    try:
        from opentelemetry.sdk.trace import Tracer, sampling
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    except ImportError:
        return None
    if type(tracer) is not Tracer or type(tracer.id_generator) is not RandomIdGenerator:
        return None
    # The SDK's own span metrics (OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED)
    # count every span started: then each must go through it.
    metrics = getattr(tracer, "_tracer_metrics", None)
    if metrics is not None and type(metrics).__name__ != "NoOpTracerMetrics":
        return None

    def static(sampler: Any) -> bool | None:
        """True: drops; False: records; None: not one of the SDK's static samplers."""
        if type(sampler) is not sampling.StaticSampler:
            return None
        return {"AlwaysOffSampler": True, "AlwaysOnSampler": False}.get(sampler.get_description())

    sampler = tracer.sampler
    decision = static(sampler)
    if decision is not None:
        return (True,) * 5 if decision else None
    parent_based = tuple(
        kind
        for kind in (
            getattr(sampling, name, None)
            for name in (
                "ParentBased",
                "ParentBasedTraceIdRatio",
                "_ParentBasedAlwaysOff",
                "_ParentBasedAlwaysOn",
            )
        )
        if isinstance(kind, type)
    )
    if type(sampler) not in parent_based:
        return None
    # The API offers no public view of ParentBased's delegates.
    delegates = (
        "_root",
        "_remote_parent_sampled",
        "_remote_parent_not_sampled",
        "_local_parent_sampled",
        "_local_parent_not_sampled",
    )
    rule = tuple(static(getattr(sampler, name, None)) for name in delegates)
    if not any(rule):
        return None  # nothing it drops for sure
    # A delegate this block cannot read (a ratio) is "not known to drop".
    return tuple(bool(drops) for drops in rule)


def tracer_provider_from_env() -> Any:
    """An SDK ``TracerProvider`` exporting over OTLP/HTTP in batches, configured by ``OTEL_*``.

    The standard variables apply: ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (default ``http://localhost:4318``),
    ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME`` (default ``oxypy``),
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` /
    ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*`` (batching), and
    ``OTEL_TRACES_EXPORTER`` (``otlp``, the default, ``console`` or ``none``).
    Call ``shutdown()`` on it when the process stops, to send what is queued.

    :raises OpenTelemetryMissing: ``opentelemetry-sdk`` or
        ``opentelemetry-exporter-otlp-proto-http`` is not installed.
    :raises ConfigurationError: an unsupported ``OTEL_TRACES_EXPORTER``.
    """
    _api()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError as exc:
        raise OpenTelemetryMissing(
            "exporting traces needs the OpenTelemetry SDK and OTLP/HTTP exporter: "
            "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"
        ) from exc
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    exporter: SpanExporter | None
    if kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise OpenTelemetryMissing(
                "exporting traces over OTLP/HTTP needs the exporter: "
                "pip install opentelemetry-exporter-otlp-proto-http"
            ) from exc
        exporter = OTLPSpanExporter()
    elif kind == "console":
        exporter = ConsoleSpanExporter()
    elif kind == "none":
        exporter = None
    else:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={kind!r} is not supported here (otlp, console or none)"
        )
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "oxypy"}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER(_ARG)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class _EnvironGetter:
    """The propagators' view of the request headers in a WSGI environ."""

    @staticmethod
    def get(carrier: WSGIEnvironment, key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return None if value is None else [value]

    @staticmethod
    def keys(carrier: WSGIEnvironment) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


_GETTER = _EnvironGetter()


#: ``-00`` ... ``-ff``: the end of a ``traceparent``, by trace flags.
_FLAGS = tuple(f"-{flags:02x}" for flags in range(256))


def _traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The W3C ``traceparent`` value, as ``TraceContextTextMapPropagator`` writes it.

    (``bytes.hex`` of the ids and a table of the flags: a third of the
    instructions ``f"{trace_id:032x}"`` and ``f"{flags:02x}"`` take.)
    """
    end = _FLAGS[flags] if 0 <= flags <= 0xFF else f"-{flags:02x}"
    return "00-" + trace_id.to_bytes(16, "big").hex() + "-" + span_id.to_bytes(8, "big").hex() + end


def _host_port(host: str) -> tuple[str, int | None]:
    """``"h:8080"`` / ``"[::1]:8080"`` / ``"h"`` -> (host, port or None)."""
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[1:end], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    return name, int(port) if port.isdigit() else None


def _url_path(environ: WSGIEnvironment) -> str:
    """The path as the client sent it (``RAW_URI``), else rebuilt from the WSGI keys."""
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if uri.startswith("/"):
        return str(uri.partition("?")[0])
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return quote(path.encode("latin-1", "replace"), safe="/:@!$&'()*+,;=-._~%") or "/"


def _server_attributes(
    environ: WSGIEnvironment, raw_method: str, method: str, client: str | None
) -> dict[str, Any]:
    """The SERVER span's request attributes, all given to the sampler at its start."""
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": _url_path(environ),
        "url.scheme": environ.get("wsgi.url_scheme", "http"),
    }
    if method == "_OTHER":
        attributes["http.request.method_original"] = raw_method
    query = environ.get("QUERY_STRING")
    if query:
        attributes["url.query"] = query
    host = environ.get("HTTP_HOST")
    if host:
        name, port = _host_port(host)
    else:
        name, port = environ.get("SERVER_NAME", ""), None
    if name:
        attributes["server.address"] = name
    if port is None:
        server_port = environ.get("SERVER_PORT")
        port = int(server_port) if server_port and str(server_port).isdigit() else None
    if port is not None:
        attributes["server.port"] = port
    if client:
        attributes["client.address"] = client
    peer = environ.get("REMOTE_ADDR")
    if peer:
        attributes["network.peer.address"] = peer
    protocol = environ.get("SERVER_PROTOCOL", "")
    if protocol.startswith("HTTP/"):
        attributes["network.protocol.version"] = protocol[5:]
    agent = environ.get("HTTP_USER_AGENT")
    if agent:
        attributes["user_agent.original"] = agent
    return attributes


class _Telemetry:
    """One request's telemetry: its SERVER span and the CLIENT spans below it.

    Lives in ``environ["oxypy.otel"]`` (see :class:`oxypy._core.telemetry.Telemetry`).
    """

    __slots__ = ("block", "span", "context", "recording", "clients", "unsampled", "direct")

    def __init__(self, block: OpenTelemetry, span: Any, context: Any, recording: bool) -> None:
        self.block = block
        self.span = span
        self.context = context
        #: Whether the SERVER span records (asked of the SDK once per request).
        self.recording = recording
        #: (record, span, start in epoch ns, start in monotonic seconds) per
        #: attempt; None until the first (a dropped trace never has one).
        self.clients: list[tuple[Exchange, Any, int, float]] | None = None
        #: The propagation headers of an unsampled request (the same for every
        #: attempt): set when the span is made, or on the first attempt.
        self.unsampled: list[tuple[str, str]] | None = None
        #: Whether ``traceparent`` is formatted here (the W3C propagator, no
        #: baggage to send); None until the first attempt asks.
        self.direct: bool | None = None

    def propagation(self, span: Any) -> list[tuple[str, str]]:
        """The headers carrying ``span``'s trace context (and the request's baggage) upstream."""
        block = self.block
        direct = self.direct
        if direct is None:
            direct = self.direct = block.w3c and not (
                block.w3c_baggage and block.baggage_of(self.context)
            )
        if direct:
            found = span.get_span_context()
            if found.is_valid and not found.trace_state:
                # What TraceContextTextMapPropagator.inject writes, without the
                # context, carrier and setter it goes through.
                return [
                    ("traceparent", _traceparent(found.trace_id, found.span_id, found.trace_flags))
                ]
        carrier: dict[str, str] = {}
        block.propagator.inject(carrier, context=block.with_span(span, self.context))
        return list(carrier.items())

    def client_span(
        self,
        environ: WSGIEnvironment,
        record: Exchange,
        address: tuple[str, int],
        origin: str,
        path: str,
        headers: list[tuple[str, str]],
    ) -> list[tuple[str, str]]:
        block = self.block
        if block.sent_by_client(environ):
            fields = block.fields
            headers = [h for h in headers if h[0].lower() not in fields]
        if not self.recording:
            # A trace the sampler dropped: its CLIENT spans would be dropped as
            # well (a sampler decides per trace, or follows the parent), so
            # none is made; upstream continues the trace under the SERVER span.
            carrier = self.unsampled
            if carrier is None:
                carrier = self.unsampled = self.propagation(self.span)
            headers.extend(carrier)
            return headers
        method = record.method if record.method in _METHODS else "_OTHER"
        attributes = {
            "http.request.method": method,
            "server.address": address[0],
            "server.port": address[1],
            "url.full": origin + path,
            "network.protocol.version": "1.1",
        }
        if method == "_OTHER":
            attributes["http.request.method_original"] = record.method
        attempt = environ.get(keys.ATTEMPT)
        if isinstance(attempt, int) and attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        started = time.time_ns()
        span = block.tracer.start_span(
            method if method != "_OTHER" else "HTTP",
            context=self.context,
            kind=block.client_kind,
            attributes=attributes,
            start_time=started,
        )
        clients = self.clients
        if clients is None:
            clients = self.clients = []
        clients.append((record, span, started, time.monotonic()))
        headers.extend(self.propagation(span))
        return headers

    def event(self, name: str, attributes: Attributes) -> None:
        self.span.add_event(name, attributes)

    def ids(self) -> tuple[str, str] | None:
        found = self.span.get_span_context()
        if not found.is_valid:
            return None
        return format(found.trace_id, "032x"), format(found.span_id, "016x")

    def exemplar(self) -> dict[str, str] | None:
        found = self.span.get_span_context()
        if not found.is_valid or not found.trace_flags.sampled:
            return None
        return {
            "trace_id": format(found.trace_id, "032x"),
            "span_id": format(found.span_id, "016x"),
        }

    def finish(self, seen: Observation) -> None:
        try:
            self._finish(seen)
        except Exception:  # noqa: BLE001 - telemetry must never break a response
            log.warning("could not end the OpenTelemetry spans", exc_info=True)

    def _finish(self, seen: Observation) -> None:
        span = self.span
        now = time.time_ns()
        block = self.block
        for record, client, started, mono in self.clients or ():
            if client.is_recording():
                block.settle_client(client, record)
            ended = record.ended
            client.end(now if ended is None else started + max(0, int((ended - mono) * 1e9)))
        outcome = seen.outcome()
        status = outcome.status_sent if outcome.status_sent is not None else outcome.status
        error = outcome.error
        if outcome.client_gone or status >= 500 or (outcome.aborted and error is not None):
            kind = outcome.error_kind or str(status)
            span.set_attributes({"http.response.status_code": status, "error.type": kind})
            if status >= 500 or not outcome.client_gone:
                span.set_status(block.error_status(kind))
        else:
            span.set_attribute("http.response.status_code", status)
        if error is not None and not isinstance(error, RequestError):
            span.record_exception(error)
        span.end(now)


class OpenTelemetry:
    """Trace each request with OpenTelemetry: a SERVER span, a CLIENT span per upstream attempt.

    The SERVER span (named after the method, ``_OTHER`` methods ``HTTP``)
    carries the stable HTTP semantic-convention attributes:
    ``http.request.method``, ``url.path``, ``url.query`` (when present),
    ``url.scheme``, ``server.address``/``server.port`` (from ``Host``),
    ``client.address`` (the peer, or the client behind a trusted proxy),
    ``network.peer.address``, ``network.protocol.version``,
    ``user_agent.original`` (all given when the span starts, so a sampler
    sees them: health checks can be dropped by ``url.path`` or
    ``user_agent.original``), and at the end ``http.response.status_code``;
    a 5xx (or an aborted response) sets ``error.type`` (the oxypy error kind,
    such as ``upstream_timeout``, else the status) and an error status.  A
    client that went away is status 499 with ``error.type``
    ``client_disconnected``.  The span ends when the response body closes,
    so a WebSocket tunnel's span covers the handshake and the tunnel's life.

    ``Forward`` (anywhere below) makes a CLIENT span per upstream request,
    a child of the SERVER span: each ``Buffer`` retry and each ``Hedge``
    copy is its own sibling span, a retry with ``http.request.resend_count``.
    It carries ``server.address``/``server.port`` of the target, ``url.full``,
    ``http.response.status_code``, and on a 502/504 of Forward's own
    ``error.type`` (``upstream_connect_error``, ``upstream_timeout``...), an
    error status and an exception event; an upstream's own 4xx/5xx is an
    error status with ``error.type`` the status.  A hedge copy cancelled
    before its answer ends with the request, without a status.

    Events on the SERVER span: ``oxypy.<kind>`` for each error an oxypy
    block answered other than Forward's (``oxypy.rate_limited``,
    ``oxypy.conn_limit_reached``, ``oxypy.circuit_open``...), with
    ``oxypy.status`` and ``oxypy.reason``;
    ``oxypy.circuit_breaker.fallback`` when a tripped breaker sends a
    request to its fallback, and ``oxypy.circuit_breaker.tripped`` on the
    request whose outcome trips it.

    Propagation (the global propagator: W3C ``traceparent``/``tracestate``
    and ``baggage`` unless ``OTEL_PROPAGATORS`` says otherwise): the
    client's trace context is continued only when the peer address is in
    ``trusted_proxies`` or ``trust_incoming`` is True; otherwise the SERVER
    span starts a new trace (linked to the client's span context, when it
    sent a valid one) and the client's baggage is dropped.  Upstream, the
    client's ``traceparent``, ``tracestate`` and ``baggage`` are replaced by
    the attempt's CLIENT span context (and the request's baggage); with
    the default W3C propagator and nothing else to send, ``traceparent`` is
    formatted by the block itself, byte for byte as the propagator would
    (any other propagator, ``tracestate`` or baggage goes through the
    propagators API).  While the next app is called the SERVER span is the
    current span, so spans an application below starts are its children
    (an unsampled one included).

    Sampling: the tracer's sampler decides each SERVER span, with every
    request attribute.  When it is the SDK's own tracer (its
    ``RandomIdGenerator``, no SDK span metrics) and a sampler that drops
    whatever the attributes (``ALWAYS_OFF``, or a ``ParentBased`` of the
    SDK's ``ALWAYS_ON``/``ALWAYS_OFF``: ``parentbased_always_off`` for a
    new trace, any ``ParentBased`` for an unsampled parent), the block
    makes the dropped span itself, as the SDK would (fresh random ids, or
    the parent's trace id and trace state; flags not sampled, with the
    random-trace-id flag), without building its attributes; this is
    checked against the SDK once when the block is built.  Any other
    sampler, a ratio or the user's own, sees every attribute as before.

    **Reads** the request head, ``REMOTE_ADDR``, ``wsgi.url_scheme``,
    ``RAW_URI``; **writes** ``environ["oxypy.otel"]`` (read by Forward,
    Trace, which logs ``trace_id`` and ``span_id``, and PrometheusMetrics,
    which attaches the trace as an exemplar).  Streams; never answers by
    itself.  A nested ``OpenTelemetry`` (the request already has a SERVER
    span) passes requests straight on.

    :param tracer_provider: the ``TracerProvider`` to take the tracer from;
        default the global one (``opentelemetry.trace.set_tracer_provider``).
    :param trusted_proxies: CIDRs whose incoming trace context is continued
        (and whose ``X-Forwarded-For`` gives ``client.address``).
    :param trust_incoming: continue every client's trace context (default
        False: a public edge does not let clients choose trace ids).
    :param skip: ``skip(environ) -> bool``; True: no span for this request.
    :raises OpenTelemetryMissing: ``opentelemetry-api`` is not installed.

    Example::

        from oxypy import Forward, OpenTelemetry, serve
        from oxypy.otel import tracer_provider_from_env
        app = OpenTelemetry(Forward("http://127.0.0.1:9000"),
                            tracer_provider=tracer_provider_from_env())
        serve(app, "127.0.0.1:8080")

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        tracer_provider: Any = None,
        trusted_proxies: Iterable[str] | None = None,
        trust_incoming: bool = False,
        skip: Skip | None = None,
    ) -> None:
        baggage, context, propagate, trace = _api()
        if not callable(next_app):
            raise ConfigurationError("OpenTelemetry needs the next WSGI app as first argument")
        if not isinstance(trust_incoming, bool):
            raise ConfigurationError(f"trust_incoming must be a boolean, got {trust_incoming!r}")
        if tracer_provider is not None and not hasattr(tracer_provider, "get_tracer"):
            raise ConfigurationError("tracer_provider must be an OpenTelemetry TracerProvider")
        from . import __version__

        self.next_app = next_app
        self.trusted = TrustedProxies(trusted_proxies)
        self.trust_incoming = trust_incoming
        self.skip = skip
        self.tracer = trace.get_tracer(
            "oxypy", __version__, tracer_provider=tracer_provider, schema_url=SCHEMA_URL
        )
        self.propagator = propagate.get_global_textmap()
        #: Header names (lower case) the propagator writes, e.g. traceparent.
        self.fields = frozenset(name.lower() for name in self.propagator.fields)
        self._environ_fields = tuple(
            "HTTP_" + name.upper().replace("-", "_") for name in sorted(self.fields)
        )
        self.w3c, self.w3c_baggage = _w3c(self.propagator)
        self.baggage_of = baggage.get_all
        self._attach = context.attach
        self._detach = context.detach
        self.with_span = trace.set_span_in_context
        self._current_span = trace.get_current_span
        self._current = context.get_current
        self._link = trace.Link
        self.server_kind = trace.SpanKind.SERVER
        self.client_kind = trace.SpanKind.CLIENT
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self._span_context = trace.SpanContext
        self._non_recording = trace.NonRecordingSpan
        self._flags = trace.TraceFlags
        #: The flags of a dropped span: not sampled, with the parent's (or
        #: for a root span the id generator's) random-trace-id flag.
        self._unsampled = trace.TraceFlags(trace.TraceFlags.DEFAULT)
        self._unsampled_random = trace.TraceFlags(0x02)  # W3C level 2's random-trace-id
        #: Which requests the sampler drops whatever their attributes (see
        #: _drop_rule): those get their span here, without the SDK's start_span.
        self._drops = _drop_rule(self.tracer)
        self._enabled: Any = getattr(self.tracer, "_is_enabled", None)
        if self._drops is not None and not self._drops_as_the_sdk():
            self._drops = None

    def _dropped(self, parent: Any) -> _Telemetry | None:
        """The telemetry of a request the sampler drops, its span made as the SDK makes it.

        None when the sampler may keep it.  Only for the SDK's tracer and
        samplers (:func:`_drop_rule`), which decide from the parent alone: a
        fresh random trace id for a root span (or the parent's trace id,
        trace state and random-trace-id flag), a fresh random span id, the
        sampled flag clear.  ``parent`` None is the current context (as for
        ``start_span``): when it is empty, as in front of a plain gateway,
        there is no span to continue and no baggage to send, so neither is
        looked up.  The ``traceparent`` every attempt sends is formatted
        here, from the ids, when nothing else needs the propagators.
        """
        drops = self._drops
        if drops is None or (self._enabled is not None and not self._enabled()):
            return None
        if parent is None:
            parent = self._current()
        if not parent:
            found = None
        else:
            found = self._current_span(parent).get_span_context()
        if found is None or not found.is_valid:
            if not drops[_ROOT]:
                return None
            trace_id = random.getrandbits(128)
            while not trace_id:
                trace_id = random.getrandbits(128)
            flags, state = self._unsampled_random, None
        else:
            sampled = found.trace_flags.sampled
            if found.is_remote:
                which = _REMOTE_SAMPLED if sampled else _REMOTE_UNSAMPLED
            else:
                which = _LOCAL_SAMPLED if sampled else _LOCAL_UNSAMPLED
            if not drops[which]:
                return None
            trace_id, state = found.trace_id, found.trace_state
            flags = self._unsampled_random if found.trace_flags & 0x02 else self._unsampled
        span_id = random.getrandbits(64)
        while not span_id:
            span_id = random.getrandbits(64)
        span = self._non_recording(self._span_context(trace_id, span_id, False, flags, state))
        context = self.with_span(span, parent)
        telemetry = _Telemetry(self, span, context, False)
        if (
            self.w3c
            and not state
            and (not parent or not (self.w3c_baggage and self.baggage_of(context)))
        ):
            telemetry.direct = True
            telemetry.unsampled = [("traceparent", _traceparent(trace_id, span_id, flags))]
        return telemetry

    def _drops_as_the_sdk(self) -> bool:
        """Whether :meth:`_dropped` gives what the SDK's ``start_span`` gives, for each parent.

        Checked once with this SDK: same recording state, trace flags, trace
        state and trace-id continuation (the ids themselves are random).
        """
        from opentelemetry.context import Context
        from opentelemetry.trace import TraceState

        drops = self._drops
        assert drops is not None
        probes: list[tuple[Any, bool]] = []
        if drops[_ROOT]:
            probes.append((Context(), False))
        state = TraceState([("oxypy", "probe")])
        for which, remote, sampled in (
            (_REMOTE_SAMPLED, True, True),
            (_REMOTE_UNSAMPLED, True, False),
            (_LOCAL_SAMPLED, False, True),
            (_LOCAL_UNSAMPLED, False, False),
        ):
            if not drops[which]:
                continue
            for random_id in (False, True):
                flags = self._flags((1 if sampled else 0) | (2 if random_id else 0))
                found = self._span_context(0x5EED, 0x5EED, remote, flags, state)
                probes.append((self.with_span(self._non_recording(found)), True))
        for context, child in probes:
            theirs = self.tracer.start_span("probe", context=context, kind=self.server_kind)
            dropped = self._dropped(context)
            if dropped is None or theirs.is_recording() or dropped.span.is_recording():
                return False
            a, b = theirs.get_span_context(), dropped.span.get_span_context()
            if (a.trace_flags, a.trace_state, a.is_remote, a.is_valid) != (
                b.trace_flags,
                b.trace_state,
                b.is_remote,
                b.is_valid,
            ) or (child and a.trace_id != b.trace_id):
                return False
        return True

    def sent_by_client(self, environ: WSGIEnvironment) -> bool:
        """Whether the request carries a header the propagator writes."""
        return not environ.keys().isdisjoint(self._environ_fields)

    def error_status(self, description: str) -> Any:
        return self._status(self._error, description)

    def settle_client(self, span: Any, record: Exchange) -> None:
        """Set a CLIENT span's outcome from its exchange record."""
        error = record.error
        if error is None and record.status < 400:
            if record.status:
                span.set_attribute("http.response.status_code", record.status)
            return
        attributes: dict[str, Any] = {}
        if record.status:
            attributes["http.response.status_code"] = record.status
        if isinstance(error, UpstreamError):
            attributes["error.type"] = error.kind
            span.record_exception(error, attributes={ERROR_KIND: error.kind})
            span.set_status(self._status(self._error, error.reason))
        elif error is not None:
            attributes["error.type"] = error.kind
        elif record.status >= 400:
            attributes["error.type"] = str(record.status)
            span.set_status(self._status(self._error, str(record.status)))
        if attributes:
            span.set_attributes(attributes)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if (self.skip is not None and self.skip(environ)) or keys.OTEL in environ:
            return self.next_app(environ, start_response)
        peer = environ.get("REMOTE_ADDR")
        sent = not environ.keys().isdisjoint(self._environ_fields)  # sent_by_client, inlined
        trusted = sent and (self.trust_incoming or self.trusted.trusts(peer))
        parent = self.propagator.extract(environ, getter=_GETTER) if trusted else None
        # A request the SDK's sampler drops whatever its attributes gets its
        # span here, without them (nor the link to an untrusted client's trace
        # context, which a dropped span does not keep).
        telemetry = self._dropped(parent)
        if telemetry is None:
            raw_method = environ.get("REQUEST_METHOD", "")
            method = raw_method if raw_method in _METHODS else "_OTHER"
            links = None
            if sent and not trusted:
                incoming = self.propagator.extract(environ, getter=_GETTER)
                found = self._current_span(incoming).get_span_context()
                if found.is_valid:
                    links = [self._link(found, {UNTRUSTED: True})]
            # Every request attribute is given at the start (the semantic
            # conventions' sampling-relevant ones, and one call into the SDK
            # instead of two for a span that records).
            client = self.trusted.client_ip(peer, environ.get("HTTP_X_FORWARDED_FOR"))
            span = self.tracer.start_span(
                method if method != "_OTHER" else "HTTP",
                context=parent,
                kind=self.server_kind,
                attributes=_server_attributes(environ, raw_method, method, client),
                links=links,
            )
            telemetry = _Telemetry(self, span, self.with_span(span, parent), span.is_recording())
        environ[keys.OTEL] = telemetry
        token = self._attach(telemetry.context)
        try:
            if not telemetry.recording:
                # A dropped trace: nothing to record at the end, so the body
                # is not watched (Forward still sends the trace context).
                return self.next_app(environ, start_response)
            return observe(self.next_app, environ, start_response, telemetry.finish)
        finally:
            self._detach(token)
