"""The seam between the blocks and ``OpenTelemetry``: what a request's telemetry offers.

``OpenTelemetry`` puts an object with this shape in ``environ["oxypy.otel"]``
for the request it makes a SERVER span for.  The blocks below and above it
reach it only through that key, so none of them imports OpenTelemetry, and
a chain without the block pays one dictionary lookup per reader (Forward,
Trace, the metrics) and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from .. import environ as keys
from .exchange import Exchange
from .types import WSGIEnvironment

__all__ = [
    "ERROR_KIND",
    "EVENT_BREAKER_FALLBACK",
    "EVENT_BREAKER_TRIPPED",
    "EVENT_PREFIX",
    "FALLBACK_DURATION",
    "REASON",
    "RETRY_AFTER",
    "STATUS",
    "TRIGGER",
    "UNTRUSTED",
    "Attributes",
    "Telemetry",
    "note",
]

# The names oxypy gives its own events and attributes (the HTTP ones follow
# the semantic conventions), all here as the environ keys are in one module.

#: The prefix of the event for an error a block answered: ``oxypy.<kind>``.
EVENT_PREFIX = "oxypy."
#: A tripped CircuitBreaker sent the request to its fallback.
EVENT_BREAKER_FALLBACK = "oxypy.circuit_breaker.fallback"
#: This request's outcome tripped the CircuitBreaker.
EVENT_BREAKER_TRIPPED = "oxypy.circuit_breaker.tripped"
#: The status and reason of the error an event reports.
STATUS = "oxypy.status"
REASON = "oxypy.reason"
#: The seconds a tripped breaker's fallback announced.
RETRY_AFTER = "oxypy.retry_after"
#: The breaker's trigger expression, and how long it stays tripped.
TRIGGER = "oxypy.trigger"
FALLBACK_DURATION = "oxypy.fallback_duration"
#: The oxypy error kind on an exception event (``upstream_timeout``).
ERROR_KIND = "oxypy.error.kind"
#: On the link to a trace context sent by a client that is not trusted.
UNTRUSTED = "oxypy.untrusted"

#: Span and event attributes: OpenTelemetry's primitive attribute values.
Attributes = Mapping[str, str | bool | int | float]


class Telemetry(Protocol):
    """One request's telemetry, as the blocks see it."""

    def client_span(
        self,
        environ: WSGIEnvironment,
        record: Exchange,
        address: tuple[str, int],
        origin: str,
        path: str,
        headers: list[tuple[str, str]],
    ) -> list[tuple[str, str]]:
        """Open the CLIENT span of the upstream request ``record`` describes.

        ``address`` is the target's (host, port), ``origin + path`` its URL
        (``scheme://host[:port]`` and the request target): joined only when
        the span records.

        Returns ``headers`` with the trace context of that span in place of
        any the client sent (``traceparent``, ``tracestate``, ``baggage``).
        The span ends with the request's SERVER span, at ``record.ended``.
        """
        ...

    def event(self, name: str, attributes: Attributes) -> None:
        """Add an event to the request's SERVER span."""
        ...

    def ids(self) -> tuple[str, str] | None:
        """The SERVER span's trace id and span id in lower-case hex, when valid."""
        ...

    def exemplar(self) -> dict[str, str] | None:
        """``{"trace_id": ..., "span_id": ...}`` when the SERVER span is sampled."""
        ...


def note(environ: WSGIEnvironment, name: str, attributes: Attributes) -> None:
    """Add event ``name`` to the request's SERVER span, when there is one."""
    telemetry: Telemetry | None = environ.get(keys.OTEL)
    if telemetry is not None:
        telemetry.event(name, attributes)
