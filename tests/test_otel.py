"""OpenTelemetry: SERVER and CLIENT spans, propagation under the trust rule, exporters.

Every test runs the real SDK (``InMemorySpanExporter``, or the OTLP/HTTP
exporter posting to a receiver on 127.0.0.1 that decodes the protobuf) in
front of real upstreams.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
import urllib3
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from oxypy import (
    Buffer,
    CircuitBreaker,
    ConnLimit,
    Forward,
    Hedge,
    OpenTelemetry,
    PrometheusMetrics,
    Rate,
    RateLimit,
    ResponseFallback,
    Trace,
    metrics_app,
)
from oxypy.otel import OpenTelemetryMissing

from _servers import OxypyProcess, RawUpstream, dead_url, read_exact_body, wait_for

HTTP = urllib3.PoolManager(retries=False, timeout=10.0)
REPO = Path(__file__).resolve().parent.parent
App = Callable[..., Any]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
INCOMING = {
    "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01",
    "tracestate": "vendor=opaque",
    "baggage": "tenant=acme",
}


@pytest.fixture
def otel() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def finished(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The spans once ``count`` have ended (they end after the response is sent)."""
    wait_for(lambda: len(exporter.get_finished_spans()) >= count)
    spans = list(exporter.get_finished_spans())
    assert len(spans) == count, [s.name for s in spans]
    return spans


def server_span(spans: list[ReadableSpan]) -> ReadableSpan:
    (found,) = [s for s in spans if s.kind is SpanKind.SERVER]
    return found


def client_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.kind is SpanKind.CLIENT), key=lambda s: s.start_time or 0)


def ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def traceparent(value: str) -> tuple[str, str, int]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00"
    return trace_id, span_id, int(flags, 16)


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def sent_headers(response: urllib3.BaseHTTPResponse) -> dict[str, str]:
    """The headers the echo upstream received."""
    headers: dict[str, str] = json.loads(response.data)["headers"]
    return headers


# --------------------------------------------------------------------------- the span tree


def test_server_span_parents_the_client_span_and_the_upstream_gets_its_traceparent(
    proxy: Any, echo_upstream: str, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    url = proxy(OpenTelemetry(Forward(echo_upstream), tracer_provider=provider))
    r = HTTP.request("GET", url + "/a/b?x=1", headers={"User-Agent": "otel-test/1"})
    assert r.status == 200
    spans = finished(exporter, 2)
    server, (client,) = server_span(spans), client_spans(spans)
    assert (server.name, client.name) == ("GET", "GET")
    assert server.parent is None
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    trace_id, client_id = ids(client)
    assert ids(server)[0] == trace_id
    sent_trace, sent_parent, flags = traceparent(sent_headers(r)["traceparent"])
    assert (sent_trace, sent_parent, flags & 1) == (trace_id, client_id, 1)
    assert dict(server.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/a/b",
        "url.query": "x=1",
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": port(url),
        "client.address": "127.0.0.1",
        "network.peer.address": "127.0.0.1",
        "network.protocol.version": "1.1",
        "user_agent.original": "otel-test/1",
        "http.response.status_code": 200,
    }
    assert dict(client.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": port(echo_upstream),
        "url.full": echo_upstream + "/a/b?x=1",
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
    }
    assert server.status.status_code is StatusCode.UNSET
    assert client.status.status_code is StatusCode.UNSET
    assert server.start_time is not None and client.start_time is not None
    assert server.end_time is not None and client.end_time is not None
    assert server.start_time <= client.start_time <= client.end_time <= server.end_time


def test_retries_are_sibling_client_spans_with_resend_count(
    proxy: Any, pywsgi: Callable[[Any], str], otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    seen: list[str] = []

    def flaky(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["HTTP_TRACEPARENT"])
        status = "503 Service Unavailable" if len(seen) < 3 else "200 OK"
        start_response(status, [("Content-Length", "2")])
        return [b"ok"]

    up = pywsgi(flaky)
    app = Buffer(Forward(up), retry="ResponseCode() == 503 && Attempts() < 3")
    url = proxy(OpenTelemetry(app, tracer_provider=provider))
    assert HTTP.request("GET", url + "/r").status == 200
    spans = finished(exporter, 4)
    server, clients = server_span(spans), client_spans(spans)
    assert len(clients) == 3
    assert {c.parent.span_id for c in clients if c.parent} == {server.context.span_id}
    assert [(c.attributes or {}).get("http.request.resend_count") for c in clients] == [
        None,
        1,
        2,
    ]
    assert [(c.attributes or {})["http.response.status_code"] for c in clients] == [503, 503, 200]
    assert [c.status.status_code for c in clients] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert (clients[0].attributes or {})["error.type"] == "503"
    # Each attempt carried its own span as the parent.
    assert [traceparent(v)[1] for v in seen] == [ids(c)[1] for c in clients]
    assert (server.attributes or {})["http.response.status_code"] == 200


def test_hedges_are_sibling_client_spans(
    proxy: Any, pywsgi: Callable[[Any], str], otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    release = gevent.event.Event()
    parents: list[str] = []

    def slow_first(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        parents.append(traceparent(environ["HTTP_TRACEPARENT"])[1])
        if len(parents) == 1:
            release.wait(10)  # the first copy hangs until the test ends
        start_response("200 OK", [("Content-Length", "4")])
        return [b"fast"]

    up = pywsgi(slow_first)
    url = proxy(OpenTelemetry(Hedge(Forward(up), delay=0.05), tracer_provider=provider))
    try:
        r = HTTP.request("GET", url + "/h")
        assert (r.status, r.data) == (200, b"fast")
        spans = finished(exporter, 3)
    finally:
        release.set()
    server, clients = server_span(spans), client_spans(spans)
    assert len(clients) == 2
    assert {c.parent.span_id for c in clients if c.parent} == {server.context.span_id}
    assert parents == [ids(c)[1] for c in clients]
    # The first copy lost (cancelled: no answer), the hedge answered.
    assert "http.response.status_code" not in (clients[0].attributes or {})
    assert (clients[1].attributes or {})["http.response.status_code"] == 200
    assert clients[0].status.status_code is StatusCode.UNSET


def test_unreachable_upstream_is_an_error_on_both_spans(
    proxy: Any, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    url = proxy(OpenTelemetry(Forward(dead_url()), tracer_provider=provider))
    assert HTTP.request("GET", url + "/x").status == 502
    spans = finished(exporter, 2)
    server, (client,) = server_span(spans), client_spans(spans)
    assert client.status.status_code is StatusCode.ERROR
    assert (client.attributes or {})["error.type"] == "upstream_connect_error"
    assert "http.response.status_code" not in (client.attributes or {})
    (event,) = client.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "oxypy.exceptions.UpstreamConnectError"
    assert (event.attributes or {})["oxypy.error.kind"] == "upstream_connect_error"
    assert server.status.status_code is StatusCode.ERROR
    attributes = server.attributes or {}
    assert (attributes["http.response.status_code"], attributes["error.type"]) == (
        502,
        "upstream_connect_error",
    )
    assert server.events == ()  # Forward's own failure is on its CLIENT span


def test_upstream_timeout_is_504_on_both_spans(
    proxy: Any, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel

    def silent(sock: socket.socket, data: bytes) -> None:
        sock.settimeout(10)
        sock.recv(1)  # until the proxy gives up and closes

    up = RawUpstream(silent)
    try:
        url = proxy(OpenTelemetry(Forward(up.url, read_timeout=0.2), tracer_provider=provider))
        assert HTTP.request("GET", url + "/slow").status == 504
        spans = finished(exporter, 2)
    finally:
        up.stop()
    server, (client,) = server_span(spans), client_spans(spans)
    assert (client.attributes or {})["error.type"] == "upstream_timeout"
    assert client.status.status_code is StatusCode.ERROR
    assert [e.name for e in client.events] == ["exception"]
    assert (server.attributes or {})["http.response.status_code"] == 504
    assert (server.attributes or {})["error.type"] == "upstream_timeout"


# --------------------------------------------------------------------------- trust


def test_untrusted_peer_starts_a_new_trace_linked_to_the_clients(
    proxy: Any, echo_upstream: str, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    app = OpenTelemetry(Forward(echo_upstream), tracer_provider=provider)
    url = proxy(app)
    r = HTTP.request("GET", url + "/u", headers=INCOMING)
    spans = finished(exporter, 2)
    server, (client,) = server_span(spans), client_spans(spans)
    trace_id = ids(server)[0]
    assert trace_id != TRACE_ID
    assert server.parent is None
    (link,) = server.links
    assert (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x")) == (
        TRACE_ID,
        SPAN_ID,
    )
    assert dict(link.attributes or {}) == {"oxypy.untrusted": True}
    sent = sent_headers(r)
    assert traceparent(sent["traceparent"])[:2] == (trace_id, ids(client)[1])
    # The client's tracestate and baggage went with its trace context.
    assert "tracestate" not in sent and "baggage" not in sent


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"trusted_proxies": ["127.0.0.1/32"]}, id="trusted-proxy"),
        pytest.param({"trust_incoming": True}, id="trust-incoming"),
    ],
)
def test_trusted_peer_continues_the_clients_trace(
    proxy: Any,
    echo_upstream: str,
    otel: tuple[TracerProvider, InMemorySpanExporter],
    options: dict[str, Any],
) -> None:
    provider, exporter = otel
    url = proxy(OpenTelemetry(Forward(echo_upstream), tracer_provider=provider, **options))
    r = HTTP.request("GET", url + "/t", headers=INCOMING)
    spans = finished(exporter, 2)
    server, (client,) = server_span(spans), client_spans(spans)
    assert ids(server)[0] == TRACE_ID
    assert server.parent is not None and server.parent.is_remote
    assert format(server.parent.span_id, "016x") == SPAN_ID
    assert server.links == ()
    sent = sent_headers(r)
    assert traceparent(sent["traceparent"])[:2] == (TRACE_ID, ids(client)[1])
    assert (sent["tracestate"], sent["baggage"]) == ("vendor=opaque", "tenant=acme")


def test_unsampled_requests_still_send_a_trace_context_upstream(
    proxy: Any, echo_upstream: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lines: list[str] = []
    app = Trace(OpenTelemetry(Forward(echo_upstream), tracer_provider=provider), sink=lines.append)
    url = proxy(app)
    try:
        r = HTTP.request("GET", url + "/n", headers=INCOMING)
        wait_for(lambda: lines)
        trace_id, _, flags = traceparent(sent_headers(r)["traceparent"])
        assert trace_id != TRACE_ID and flags & 1 == 0
        line = json.loads(lines[0])
        assert line["trace_id"] == trace_id
        assert re.fullmatch("[0-9a-f]{16}", line["span_id"])
        assert exporter.get_finished_spans() == ()
    finally:
        app.close()
        provider.shutdown()


# --------------------------------------------------------------------------- Trace, metrics


@pytest.mark.parametrize("outside", [True, False], ids=["trace-outside", "trace-inside"])
def test_trace_lines_carry_the_server_span_ids(
    proxy: Any,
    echo_upstream: str,
    otel: tuple[TracerProvider, InMemorySpanExporter],
    outside: bool,
) -> None:
    provider, exporter = otel
    lines: list[str] = []
    if outside:
        trace = Trace(
            OpenTelemetry(Forward(echo_upstream), tracer_provider=provider), sink=lines.append
        )
        app: App = trace
    else:
        trace = Trace(Forward(echo_upstream), sink=lines.append)
        app = OpenTelemetry(trace, tracer_provider=provider)
    url = proxy(app)
    try:
        assert HTTP.request("GET", url + "/line").status == 200
        server = server_span(finished(exporter, 2))
        wait_for(lambda: lines)
        line = json.loads(lines[0])
        assert (line["trace_id"], line["span_id"]) == ids(server)
    finally:
        trace.close()


def test_trace_lines_have_no_ids_without_the_block(proxy: Any, echo_upstream: str) -> None:
    lines: list[str] = []
    trace = Trace(Forward(echo_upstream), sink=lines.append)
    url = proxy(trace)
    try:
        assert HTTP.request("GET", url + "/plain").status == 200
        wait_for(lambda: lines)
        assert "trace_id" not in json.loads(lines[0])
        assert "traceparent" not in sent_headers(HTTP.request("GET", url + "/plain"))
    finally:
        trace.close()


def test_latency_histogram_carries_the_trace_as_an_exemplar(
    proxy: Any, echo_upstream: str, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    from prometheus_client import CollectorRegistry

    provider, exporter = otel
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(Forward(echo_upstream), registry=registry)
    url = proxy(OpenTelemetry(metrics, tracer_provider=provider))
    scrape = proxy(metrics_app(registry))
    assert HTTP.request("GET", url + "/m").status == 200
    trace_id, span_id = ids(server_span(finished(exporter, 2)))
    open_metrics = HTTP.request(
        "GET", scrape + "/", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
    text = open_metrics.data.decode()
    exemplars = re.findall(
        r'^oxypy_request_duration_seconds_bucket\{code_class="2xx",le="[^"]+"\} 1\.0 '
        r'# \{span_id="([0-9a-f]+)",trace_id="([0-9a-f]+)"\} ',
        text,
        re.MULTILINE,
    )
    assert exemplars == [(span_id, trace_id)]
    plain = HTTP.request("GET", scrape + "/").data.decode()
    assert "oxypy_request_duration_seconds_bucket" in plain and trace_id not in plain


# --------------------------------------------------------------------------- events


def test_rate_limit_rejection_is_an_event(
    proxy: Any, echo_upstream: str, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    limited = RateLimit(
        Forward(echo_upstream), rates=[Rate(average=1, period=60.0, burst=1)], source="client.ip"
    )
    url = proxy(OpenTelemetry(limited, tracer_provider=provider))
    assert HTTP.request("GET", url + "/1").status == 200
    finished(exporter, 2)
    exporter.clear()
    assert HTTP.request("GET", url + "/2").status == 429
    (server,) = finished(exporter, 1)
    (event,) = server.events
    assert event.name == "oxypy.rate_limited"
    attributes = dict(event.attributes or {})
    assert attributes.pop("oxypy.status") == 429
    assert re.fullmatch(
        r"rate limit reached, retry in [\d.]+s", str(attributes.pop("oxypy.reason"))
    )
    assert attributes == {}
    assert server.status.status_code is StatusCode.UNSET


def test_conn_limit_rejection_is_an_event(
    proxy: Any, pywsgi: Callable[[Any], str], otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    arrived, release = gevent.event.Event(), gevent.event.Event()

    def hold(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        arrived.set()
        release.wait(10)
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    app = ConnLimit(Forward(pywsgi(hold)), max_conns=1, source="client.ip")
    url = proxy(OpenTelemetry(app, tracer_provider=provider))
    first = gevent.spawn(HTTP.request, "GET", url + "/held")
    try:
        assert arrived.wait(10)
        rejected = HTTP.request("GET", url + "/over")
        (server,) = finished(exporter, 1)
    finally:
        release.set()
    assert first.get(timeout=10).status == 200
    assert [e.name for e in server.events] == ["oxypy.conn_limit_reached"]
    assert (server.events[0].attributes or {})["oxypy.status"] == rejected.status


def test_breaker_trip_and_fallback_are_events(
    proxy: Any, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    breaker = CircuitBreaker(
        Forward(dead_url()),
        "NetworkErrorRatio() > 0.5",
        fallback=ResponseFallback(503, body="later"),
        fallback_duration=60.0,
    )
    url = proxy(OpenTelemetry(breaker, tracer_provider=provider))
    assert HTTP.request("GET", url + "/trip").status == 502
    server = server_span(finished(exporter, 2))
    (event,) = server.events
    assert event.name == "oxypy.circuit_breaker.tripped"
    assert dict(event.attributes or {}) == {
        "oxypy.trigger": "NetworkErrorRatio() > 0.5",
        "oxypy.fallback_duration": 60.0,
    }
    exporter.clear()
    assert HTTP.request("GET", url + "/open").data == b"later"
    (server,) = finished(exporter, 1)  # no upstream request: no CLIENT span
    assert [e.name for e in server.events] == ["oxypy.circuit_breaker.fallback"]
    assert (server.events[0].attributes or {})["oxypy.retry_after"] == 60


# --------------------------------------------------------------------------- WebSocket


def test_websocket_span_covers_the_handshake_and_the_tunnel(
    proxy: Any, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    websocket = pytest.importorskip("websocket")
    from _ws import WSEchoUpstream

    provider, exporter = otel
    upstream = WSEchoUpstream()
    try:
        url = proxy(OpenTelemetry(Forward(upstream.url), tracer_provider=provider), lint=False)
        ws = websocket.create_connection(url.replace("http", "ws") + "/chat", timeout=10)
        opened = time.time_ns()
        try:
            ws.send("hello")
            assert ws.recv() == "hello"
            gevent.sleep(0.2)  # the tunnel stays open: no span has ended
            assert exporter.get_finished_spans() == ()
        finally:
            ws.close()
        closed = time.time_ns()
        spans = finished(exporter, 2)
    finally:
        upstream.stop()
    server, (client,) = server_span(spans), client_spans(spans)
    assert (server.attributes or {})["http.response.status_code"] == 101
    assert (client.attributes or {})["http.response.status_code"] == 101
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert upstream.requests[0].extra_headers  # the handshake went through the tunnel
    assert server.start_time is not None and server.end_time is not None
    assert server.start_time < opened and server.end_time > opened + 200_000_000
    assert server.end_time <= time.time_ns() and closed > opened


# --------------------------------------------------------------------------- OTLP/HTTP


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest it is posted."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        if environ.get("HTTP_CONTENT_ENCODING") == "gzip":
            body = gzip.decompress(body)
        if environ["PATH_INFO"] != "/v1/traces" or environ["REQUEST_METHOD"] != "POST":
            start_response("404 Not Found", [("Content-Length", "0")])
            return [b""]
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.requests.append(request)
        out = ExportTraceServiceResponse().SerializeToString()
        start_response(
            "200 OK",
            [("Content-Type", "application/x-protobuf"), ("Content-Length", str(len(out)))],
        )
        return [out]

    def spans(self) -> list[tuple[dict[str, str], Any]]:
        """(resource attributes, span) for every span received."""
        out: list[tuple[dict[str, str], Any]] = []
        for request in self.requests:
            for resource in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
                for scope in resource.scope_spans:
                    out.extend((attributes, span) for span in scope.spans)
        return out


def check_exported(receiver: Receiver, sent_traceparent: str) -> dict[str, str]:
    """The received spans are one SERVER and one CLIENT span of the traceparent sent."""
    spans = receiver.spans()
    kinds = {span.kind: span for _, span in spans}
    assert sorted(kinds) == [2, 3]  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT
    server, client = kinds[2], kinds[3]
    trace_id, parent, _ = traceparent(sent_traceparent)
    assert (server.trace_id.hex(), client.trace_id.hex()) == (trace_id, trace_id)
    assert client.span_id.hex() == parent
    assert client.parent_span_id == server.span_id
    assert server.name == "GET"
    assert {a.key: a.value.int_value for a in server.attributes}["http.response.status_code"] == 200
    return spans[0][0]


def test_otlp_http_exporter_delivers_the_spans(
    proxy: Any, pywsgi: Callable[[Any], str], echo_upstream: str
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    receiver = Receiver()
    endpoint = pywsgi(receiver) + "/v1/traces"
    provider = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    try:
        url = proxy(OpenTelemetry(Forward(echo_upstream), tracer_provider=provider))
        r = HTTP.request("GET", url + "/otlp")
        assert r.status == 200
        wait_for(lambda: len(receiver.spans()) >= 2)
        check_exported(receiver, sent_headers(r)["traceparent"])
    finally:
        provider.shutdown()


OTEL_ENV = {
    "OTEL_SERVICE_NAME": "gateway-under-test",
    # Only the shutdown at SIGTERM sends the batch: the closer is what is tested.
    "OTEL_BSP_SCHEDULE_DELAY": "60000",
    "OTEL_TRACES_SAMPLER": "always_on",
}


@pytest.mark.parametrize("command", ["proxy", "serve", "run-flag", "run-file"])
def test_command_exports_to_the_otlp_endpoint(
    pywsgi: Callable[[Any], str],
    echo_upstream: str,
    tmp_path: Path,
    oxypy: Callable[..., OxypyProcess],
    command: str,
) -> None:
    receiver = Receiver()
    env = dict(OTEL_ENV, OTEL_EXPORTER_OTLP_ENDPOINT=pywsgi(receiver))
    if command == "proxy":
        args = ["proxy", "--listen", "127.0.0.1:0", echo_upstream, "--otel"]
    elif command == "serve":
        module = f"from oxypy import Forward\n\napp = Forward({echo_upstream!r})\n"
        (tmp_path / "otel_gw.py").write_text(module)
        args = ["serve", "otel_gw:app", "--listen", "127.0.0.1:0", "--otel"]
    else:
        config = tmp_path / "gateway.toml"
        table = "[otel]\ntrust_incoming = false\n" if command == "run-file" else ""
        config.write_text(
            f'{table}[[listeners]]\naddress = "127.0.0.1:0"\n'
            f'[services.api]\nservers = ["{echo_upstream}"]\n'
            '[[routes]]\nprefix = "/"\nservice = "api"\n'
        )
        args = ["run", str(config), "--no-watch"] + (["--otel"] if command == "run-flag" else [])
    gateway = oxypy(*args, cwd=tmp_path, env=env)
    r = HTTP.request("GET", gateway.url + "/cli")
    assert r.status == 200
    assert receiver.spans() == []  # nothing sent before the shutdown
    gateway.stop()  # SIGTERM: exit 0, the batch sent on the way out
    wait_for(lambda: len(receiver.spans()) >= 2)
    resource = check_exported(receiver, sent_headers(r)["traceparent"])
    assert resource["service.name"] == "gateway-under-test"


def test_command_names_what_is_wrong_with_the_otel_setup(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OTEL_TRACES_EXPORTER="zipkin")
    done = subprocess.run(
        [sys.executable, "-m", "oxypy", "proxy", "http://127.0.0.1:9", "--otel"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--otel: OTEL_TRACES_EXPORTER='zipkin' is not supported here" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- without the API


def test_oxypy_works_without_opentelemetry_and_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if not installed\n"
        "import oxypy\n"
        "from oxypy import Forward, OpenTelemetry, Trace\n"
        "Trace(Forward('http://127.0.0.1:9'))\n"
        "try:\n"
        "    OpenTelemetry(Forward('http://127.0.0.1:9'))\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, isinstance(exc, ValueError), exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "OpenTelemetryMissing True OpenTelemetry needs the opentelemetry-api package: "
        "pip install 'oxypy-gateway[otel]'"
    )


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="trust_incoming must be a boolean"):
        OpenTelemetry(Forward(), trust_incoming="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TracerProvider"):
        OpenTelemetry(Forward(), tracer_provider=object())
    with pytest.raises(ValueError, match="invalid CIDR"):
        OpenTelemetry(Forward(), trusted_proxies=["not-a-network"])
    assert issubclass(OpenTelemetryMissing, ImportError)


def test_skip_and_nested_blocks_make_one_server_span(
    proxy: Any, echo_upstream: str, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel
    inner = OpenTelemetry(Forward(echo_upstream), tracer_provider=provider)
    outer = OpenTelemetry(
        inner, tracer_provider=provider, skip=lambda e: e["PATH_INFO"] == "/skipped"
    )
    url = proxy(outer)
    assert HTTP.request("GET", url + "/once").status == 200
    spans = finished(exporter, 2)
    assert [s.kind for s in spans].count(SpanKind.SERVER) == 1
    exporter.clear()
    r = HTTP.request("GET", url + "/skipped", headers=INCOMING)
    spans = finished(exporter, 2)  # the inner block traced it
    assert traceparent(sent_headers(r)["traceparent"])[0] == ids(server_span(spans))[0]


def test_raw_upstream_receives_exactly_one_traceparent(
    proxy: Any, otel: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = otel

    def answer(sock: socket.socket, data: bytes) -> None:
        read_exact_body(sock, data)
        sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    up = RawUpstream(answer)
    try:
        url = proxy(OpenTelemetry(Forward(up.url), tracer_provider=provider))
        headers = {"TraceParent": INCOMING["traceparent"], "Baggage": "a=b"}
        assert HTTP.request("GET", url + "/raw", headers=headers).status == 204
        (client,) = client_spans(finished(exporter, 2))
    finally:
        up.stop()
    head = up.requests[0].decode("latin-1").lower()
    lines = [line for line in head.split("\r\n") if line.startswith(("traceparent:", "baggage:"))]
    assert len(lines) == 1
    assert traceparent(lines[0].split(": ", 1)[1])[:2] == ids(client)


# --------------------------------------------------------------------------- propagation paths


def w3c_traceparent(span_context: trace.SpanContext) -> str:
    """What the W3C propagator itself writes for ``span_context``."""
    carrier: dict[str, str] = {}
    context = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return carrier["traceparent"]


@pytest.fixture
def injects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The classes whose ``inject`` ran (each still does its work)."""
    calls: list[str] = []
    for cls in (TraceContextTextMapPropagator, W3CBaggagePropagator):
        original = cls.inject

        def counted(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            calls.append(type(self).__name__)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "inject", counted)
    return calls


@pytest.fixture
def global_propagator() -> Iterator[Callable[[Any], None]]:
    """Set the global propagator for the test (blocks built after it take it)."""
    before = propagate.get_global_textmap()
    yield propagate.set_global_textmap
    propagate.set_global_textmap(before)


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "dropped"])
def test_default_propagator_traceparent_is_formatted_as_the_w3c_propagator_does(
    proxy: Any,
    pywsgi: Callable[[Any], str],
    injects: list[str],
    sampled: bool,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=None if sampled else ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    received: list[str] = []

    def upstream(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        received.append(environ["HTTP_TRACEPARENT"])
        start_response("503 Service Unavailable" if len(received) < 2 else "200 OK", [])
        return [b""]

    servers: list[trace.SpanContext] = []

    def current(environ: dict[str, Any], start_response: Any) -> Any:
        servers.append(trace.get_current_span().get_span_context())
        return forward(environ, start_response)

    forward = Buffer(Forward(pywsgi(upstream)), retry="ResponseCode() == 503 && Attempts() < 2")
    url = proxy(OpenTelemetry(current, tracer_provider=provider))
    try:
        assert HTTP.request("GET", url + "/p", headers={"TraceParent": "junk"}).status == 200
        spans = finished(exporter, 3) if sampled else []
    finally:
        provider.shutdown()
    assert injects == []  # formatted by the block: the propagator did not run
    if sampled:
        expected = [w3c_traceparent(c.context) for c in client_spans(spans) if c.context]
    else:
        expected = [w3c_traceparent(servers[0])] * 2
    assert received == expected and len(set(received)) == (2 if sampled else 1)


@pytest.mark.parametrize(
    "incoming",
    [
        pytest.param({"tracestate": "vendor=opaque"}, id="state"),
        pytest.param({"baggage": "tenant=acme"}, id="baggage"),
    ],
)
def test_tracestate_or_baggage_goes_through_the_propagators(
    proxy: Any,
    echo_upstream: str,
    otel: tuple[TracerProvider, InMemorySpanExporter],
    injects: list[str],
    incoming: dict[str, str],
) -> None:
    provider, exporter = otel
    app = OpenTelemetry(Forward(echo_upstream), tracer_provider=provider, trust_incoming=True)
    url = proxy(app)
    headers = {"traceparent": INCOMING["traceparent"], **incoming}
    sent = sent_headers(HTTP.request("GET", url + "/s", headers=headers))
    (client,) = client_spans(finished(exporter, 2))
    assert injects == ["TraceContextTextMapPropagator", "W3CBaggagePropagator"]
    assert client.context is not None
    assert sent["traceparent"] == w3c_traceparent(client.context)
    assert {k: sent.get(k) for k in incoming} == incoming


def test_baggage_set_above_the_block_goes_upstream(
    proxy: Any,
    echo_upstream: str,
    otel: tuple[TracerProvider, InMemorySpanExporter],
    injects: list[str],
) -> None:
    provider, exporter = otel
    inner = OpenTelemetry(Forward(echo_upstream), tracer_provider=provider)

    def with_baggage(environ: dict[str, Any], start_response: Any) -> Any:
        from opentelemetry import context

        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            return inner(environ, start_response)
        finally:
            context.detach(token)

    url = proxy(with_baggage)
    sent = sent_headers(HTTP.request("GET", url + "/b"))
    (client,) = client_spans(finished(exporter, 2))
    assert injects == ["TraceContextTextMapPropagator", "W3CBaggagePropagator"]
    assert client.context is not None
    assert sent["traceparent"] == w3c_traceparent(client.context)
    assert sent["baggage"] == "tenant=acme"


class _Custom(TraceContextTextMapPropagator):
    """A propagator of the user's: the W3C header and one of its own."""

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        super().inject(carrier, context=context)
        span_id = trace.get_current_span(context).get_span_context().span_id
        carrier["x-custom-span"] = format(span_id, "016x")

    @property
    def fields(self) -> set[str]:
        return super().fields | {"x-custom-span"}


@pytest.mark.parametrize(
    "propagator",
    [
        pytest.param(_Custom(), id="subclass"),
        pytest.param(CompositePropagator([_Custom(), W3CBaggagePropagator()]), id="composite"),
    ],
)
def test_custom_propagators_go_through_the_api(
    proxy: Any,
    echo_upstream: str,
    otel: tuple[TracerProvider, InMemorySpanExporter],
    global_propagator: Callable[[Any], None],
    propagator: Any,
) -> None:
    provider, exporter = otel
    global_propagator(propagator)
    url = proxy(OpenTelemetry(Forward(echo_upstream), tracer_provider=provider))
    sent = sent_headers(HTTP.request("GET", url + "/c", headers={"X-Custom-Span": "client's"}))
    (client,) = client_spans(finished(exporter, 2))
    assert client.context is not None
    assert sent["traceparent"] == w3c_traceparent(client.context)
    assert sent["x-custom-span"] == ids(client)[1]


class _Seen(Sampler):
    """Records the attributes it is asked about, samples everything."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if kind is SpanKind.SERVER:
            self.seen.append(dict(attributes or {}))
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "seen"


def test_the_sampler_sees_every_request_attribute(proxy: Any, echo_upstream: str) -> None:
    sampler = _Seen()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    url = proxy(OpenTelemetry(Forward(echo_upstream), tracer_provider=provider))
    try:
        r = HTTP.request("GET", url + "/health?deep=1", headers={"User-Agent": "kube-probe/1.30"})
        assert r.status == 200
        server = server_span(finished(exporter, 2))
    finally:
        provider.shutdown()
    assert sampler.seen == [
        {
            "http.request.method": "GET",
            "url.path": "/health",
            "url.query": "deep=1",
            "url.scheme": "http",
            "server.address": "127.0.0.1",
            "server.port": port(url),
            "client.address": "127.0.0.1",
            "network.peer.address": "127.0.0.1",
            "network.protocol.version": "1.1",
            "user_agent.original": "kube-probe/1.30",
        }
    ]
    assert dict(server.attributes or {}) == {**sampler.seen[0], "http.response.status_code": 200}


# --------------------------------------------------------------------------- dropping samplers


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """Count the SDK's ``start_span`` calls from now on (each still runs): ``calls = started()``."""

    def start() -> list[str]:
        calls: list[str] = []
        original = Tracer.start_span

        def counted(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(self, name, *args, **kwargs)

        monkeypatch.setattr(Tracer, "start_span", counted)
        return calls

    return start


def sdk_dropped(provider: TracerProvider, context: Context) -> trace.SpanContext:
    """The span context the SDK's own ``start_span`` makes for a dropped span under ``context``."""
    span = provider.get_tracer("t").start_span("GET", context=context, kind=SpanKind.SERVER)
    assert not span.is_recording()
    return span.get_span_context()


def below_and_lines(
    proxy: Any, echo_upstream: str, provider: TracerProvider, **options: Any
) -> tuple[str, list[trace.SpanContext], list[str], Trace]:
    """A proxy: Trace -> OpenTelemetry -> an app noting the current span -> Forward."""
    seen: list[trace.SpanContext] = []
    forward = Forward(echo_upstream)

    def below(environ: dict[str, Any], start_response: Any) -> Any:
        seen.append(trace.get_current_span().get_span_context())
        return forward(environ, start_response)

    lines: list[str] = []
    app = Trace(OpenTelemetry(below, tracer_provider=provider, **options), sink=lines.append)
    return proxy(app), seen, lines, app


@pytest.mark.parametrize("sampler", [ALWAYS_OFF, ParentBased(ALWAYS_OFF)], ids=["off", "parent"])
def test_a_dropping_sdk_sampler_skips_start_span_and_sends_what_the_sdk_would(
    proxy: Any, echo_upstream: str, started: Callable[[], list[str]], sampler: Sampler
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    url, seen, lines, app = below_and_lines(proxy, echo_upstream, provider)
    calls = started()
    expected = sdk_dropped(provider, Context())
    try:
        sent = [traceparent(sent_headers(HTTP.request("GET", url + "/d"))["traceparent"])]
        sent.append(traceparent(sent_headers(HTTP.request("GET", url + "/d"))["traceparent"]))
        wait_for(lambda: len(lines) == 2)
    finally:
        app.close()
        provider.shutdown()
    assert calls == ["GET"]  # only the SDK's own span above, none by the block
    assert exporter.get_finished_spans() == ()
    assert [flags for _, _, flags in sent] == [int(expected.trace_flags)] * 2 == [0x02] * 2
    assert sent[0][0] != sent[1][0] and sent[0][1] != sent[1][1]  # fresh ids per request
    # The unsampled SERVER span is the current span below and the upstream's parent.
    assert [(s.trace_id, s.span_id, s.is_remote, s.trace_state) for s in seen] == [
        (int(t, 16), int(p, 16), False, expected.trace_state) for t, p, _ in sent
    ]
    assert [(json.loads(x)["trace_id"], json.loads(x)["span_id"]) for x in lines] == [
        (t, p) for t, p, _ in sent
    ]


@pytest.mark.parametrize("flags", ["00", "02"])
def test_a_dropped_trusted_parent_is_continued_as_the_sdk_does(
    proxy: Any, echo_upstream: str, started: Callable[[], list[str]], flags: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(1.0))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    url, seen, _, app = below_and_lines(proxy, echo_upstream, provider, trust_incoming=True)
    calls = started()
    incoming = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-{flags}", "tracestate": "vendor=opaque"}
    parent = propagate.extract(incoming)
    expected = sdk_dropped(provider, parent)
    try:
        sent = sent_headers(HTTP.request("GET", url + "/p", headers=incoming))
    finally:
        app.close()
        provider.shutdown()
    assert calls == ["GET"]
    assert exporter.get_finished_spans() == ()
    trace_id, span_id, sent_flags = traceparent(sent["traceparent"])
    assert (trace_id, sent_flags) == (TRACE_ID, int(expected.trace_flags)) == (TRACE_ID, int(flags))
    assert span_id != SPAN_ID and sent["tracestate"] == "vendor=opaque"
    (below,) = seen
    assert (below.trace_id, below.span_id, below.trace_state) == (
        expected.trace_id,
        int(span_id, 16),
        expected.trace_state,
    )


def test_a_dropped_request_sends_the_baggage_set_above_the_block(
    proxy: Any, echo_upstream: str, started: Callable[[], list[str]], injects: list[str]
) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    url, seen, _, app = below_and_lines(proxy, echo_upstream, provider)

    def with_baggage(environ: dict[str, Any], start_response: Any) -> Any:
        from opentelemetry import context

        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            return app(environ, start_response)
        finally:
            context.detach(token)

    url = proxy(with_baggage)
    calls = started()
    try:
        sent = sent_headers(HTTP.request("GET", url + "/b"))
    finally:
        app.close()
        provider.shutdown()
    assert calls == []  # dropped by the block itself
    assert injects == ["TraceContextTextMapPropagator", "W3CBaggagePropagator"]
    (below,) = seen
    assert sent["traceparent"] == w3c_traceparent(below) and below.trace_flags == 0x02
    assert sent["baggage"] == "tenant=acme"


def test_a_dropped_request_under_a_current_span_continues_its_trace(
    proxy: Any, echo_upstream: str, started: Callable[[], list[str]], injects: list[str]
) -> None:
    above = TracerProvider().get_tracer("above")
    provider = TracerProvider(sampler=ALWAYS_OFF)
    url, seen, _, app = below_and_lines(proxy, echo_upstream, provider)
    parents: list[trace.SpanContext] = []

    def with_span(environ: dict[str, Any], start_response: Any) -> Any:
        from opentelemetry import context

        span = above.start_span("above", kind=SpanKind.INTERNAL)
        parents.append(span.get_span_context())
        token = context.attach(trace.set_span_in_context(span))
        try:
            return app(environ, start_response)
        finally:
            context.detach(token)
            span.end()

    url = proxy(with_span)
    probe = above.start_span("probe")
    expected = sdk_dropped(provider, trace.set_span_in_context(probe))
    calls = started()
    try:
        sent = sent_headers(HTTP.request("GET", url + "/s"))
    finally:
        app.close()
        provider.shutdown()
    assert calls == ["above"]  # none by the block
    assert injects == []  # no baggage: formatted by the block
    (parent,), (below,) = parents, seen
    trace_id, span_id, flags = traceparent(sent["traceparent"])
    assert (int(trace_id, 16), int(span_id, 16), flags) == (
        parent.trace_id,
        below.span_id,
        int(expected.trace_flags),
    )
    assert below.trace_id == parent.trace_id and below.span_id != parent.span_id
    assert flags == 0x02 and sent["traceparent"] == w3c_traceparent(below)


class _Off(StaticSampler):
    """A user's subclass of the SDK's sampler: it might read the attributes."""


class _DropsSeen(_Seen):
    """Records the attributes it is asked about, drops everything."""

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        super().should_sample(*args, **kwargs)
        return SamplingResult(Decision.DROP)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_DropsSeen, id="custom"),
        pytest.param(lambda: ParentBased(_DropsSeen()), id="custom-root"),
        pytest.param(lambda: _Off(Decision.DROP), id="subclass-of-the-sdks"),
        pytest.param(lambda: ParentBasedTraceIdRatio(0.0), id="ratio"),
        pytest.param(lambda: TraceIdRatioBased(0.0), id="ratio-alone"),
    ],
)
def test_other_samplers_still_decide_with_the_attributes(
    proxy: Any, echo_upstream: str, started: Callable[[], list[str]], make: Callable[[], Sampler]
) -> None:
    sampler = make()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    url, seen, _, app = below_and_lines(proxy, echo_upstream, provider)
    calls = started()
    try:
        r = HTTP.request("GET", url + "/health", headers={"User-Agent": "kube-probe/1.30"})
        sent = traceparent(sent_headers(r)["traceparent"])
    finally:
        app.close()
        provider.shutdown()
    assert calls == ["GET"]  # the block asked the SDK
    assert exporter.get_finished_spans() == ()
    assert sent[2] == 0x02 and int(sent[0], 16) == seen[0].trace_id
    # The user's samplers (alone or as ParentBased's root) were asked with the attributes.
    asker = sampler if isinstance(sampler, _DropsSeen) else getattr(sampler, "_root", None)
    if isinstance(asker, _DropsSeen):
        asked = asker.seen
        assert [(a["url.path"], a["user_agent.original"]) for a in asked] == [
            ("/health", "kube-probe/1.30")
        ]


def test_a_sampled_trusted_parent_or_sdk_span_metrics_take_the_sdk_path(
    proxy: Any,
    echo_upstream: str,
    started: Callable[[], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    counted = TracerProvider(sampler=ALWAYS_OFF)
    apps = [
        OpenTelemetry(Forward(echo_upstream), tracer_provider=provider, trust_incoming=True),
        OpenTelemetry(Forward(echo_upstream), tracer_provider=counted),
    ]
    urls = [proxy(app) for app in apps]
    calls = started()
    try:
        incoming = {"traceparent": INCOMING["traceparent"]}  # sampled
        sent = traceparent(
            sent_headers(HTTP.request("GET", urls[0], headers=incoming))["traceparent"]
        )
        spans = finished(exporter, 2)
        assert sent[:2] == (TRACE_ID, ids(client_spans(spans)[0])[1])
        dropped = traceparent(sent_headers(HTTP.request("GET", urls[1]))["traceparent"])
        assert dropped[2] == 0x02
    finally:
        provider.shutdown()
        counted.shutdown()
    assert calls == ["GET", "GET", "GET"]  # SERVER and CLIENT spans, then the counted root


def test_sampled_sdk_samplers_are_not_shortcut(
    proxy: Any, echo_upstream: str, started: Callable[[], list[str]]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    url = proxy(
        OpenTelemetry(Forward(echo_upstream), tracer_provider=provider, trust_incoming=True)
    )
    calls = started()
    try:
        HTTP.request("GET", url + "/on")
        spans = finished(exporter, 2)
        dropped = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00"}
        sent = traceparent(sent_headers(HTTP.request("GET", url, headers=dropped))["traceparent"])
    finally:
        provider.shutdown()
    assert len(spans) == 2 and calls == ["GET", "GET"]  # the unsampled parent: no call
    assert sent[0] == TRACE_ID and sent[2] == 0


def test_config_otel_table_wraps_the_routes_and_checks_its_keys(
    proxy: Any, echo_upstream: str
) -> None:
    """Without an SDK (the API's global no-op provider) the context still follows the rule."""
    from oxypy import ConfigFileError, load_config

    base = f'[services.api]\nservers = ["{echo_upstream}"]\n[[routes]]\nservice = "api"\n'
    for table, continued in (('trusted_proxies = ["127.0.0.1/32"]', True), ("", False)):
        gateway = load_config(f"[otel]\n{table}\n" + base)
        try:
            assert gateway.traced
            r = HTTP.request("GET", proxy(gateway) + "/c", headers=INCOMING)
            sent = sent_headers(r)
            if continued:
                assert sent["traceparent"] == INCOMING["traceparent"]
                assert sent["baggage"] == INCOMING["baggage"]
            else:
                assert "traceparent" not in sent and "baggage" not in sent
        finally:
            gateway.close()
    plain = load_config(base)
    try:
        assert not plain.traced
        sent = sent_headers(HTTP.request("GET", proxy(plain) + "/c", headers=INCOMING))
        assert sent["traceparent"] == INCOMING["traceparent"]  # no block: passed untouched
    finally:
        plain.close()
    with pytest.raises(ConfigFileError) as info:
        load_config('otel = { trust_incoming = "yes", sample = 1 }\n' + base)
    assert info.value.errors == [
        "otel.sample: unknown key",
        "otel.trust_incoming: expected a boolean, got a string ('yes')",
    ]
    with pytest.raises(ConfigFileError, match="otel: expected a table or a boolean, got"):
        load_config("otel = 3\n" + base)
