"""The in-process cost of ``OpenTelemetry``, and the SDK's own share of it.

``benchmarks/blocks.py`` measures whole proxied requests (chains
``otel_drop`` and ``otel_batch``), where a loaded shared machine blurs a few
µs.  This script runs, gevent-patched as the server is, a stand-in for
Forward that appends its ``Exchange`` and asks ``environ["oxypy.otel"]``
for the CLIENT span exactly as Forward does (no socket), with and without
the block, and reports process CPU µs per request over the bare stand-in
(``time.process_time()``: other processes' load does not count): best of 7
runs of 20,000 requests (a ``gevent.sleep(0)`` every 64, so the batch
exporter's greenlet runs).  The dropping cases: ``ParentBased(ALWAYS_OFF)``,
whose dropped spans the block makes itself, and a ratio sampler that drops
everything, which the SDK decides with every attribute.  ``SDK floor`` is
what the SDK alone costs for the same two spans with the same attributes
(start, end, batch processor);
``SDK calls`` is the SDK making the calls any instrumentation of a proxy
must (the response status set when it is known, the CLIENT span a child of
the SERVER span, explicit times): the part of ``batch`` no code of oxypy's
can remove::

    python benchmarks/otel_inprocess.py
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (  # noqa: E402
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
)
from opentelemetry.trace import SpanKind  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oxypy import OpenTelemetry  # noqa: E402
from oxypy import environ as keys  # noqa: E402
from oxypy.forward import Exchange  # noqa: E402

REQUESTS = 20_000
RUNS = 7
TARGET = "http://127.0.0.1:9000"
#: The attributes the block gives the SERVER and the CLIENT span of a small GET.
SERVER_ATTRIBUTES = {
    "http.request.method": "GET",
    "url.path": "/small",
    "url.scheme": "http",
    "server.address": "127.0.0.1",
    "server.port": 8080,
    "client.address": "127.0.0.1",
    "network.peer.address": "127.0.0.1",
    "network.protocol.version": "1.1",
    "user_agent.original": "wrk/4.1",
}
CLIENT_ATTRIBUTES = {
    "http.request.method": "GET",
    "server.address": "127.0.0.1",
    "server.port": 9000,
    "url.full": TARGET + "/small",
    "network.protocol.version": "1.1",
}


class NullExporter(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def forward_like(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """What Forward does around the telemetry seam, without the socket."""
    record = Exchange(TARGET, environ["REQUEST_METHOD"], time.monotonic())
    environ.setdefault(keys.EXCHANGES, []).append(record)
    headers = [("Host", "127.0.0.1:9000"), ("User-Agent", "wrk"), ("X-Forwarded-For", "1.2.3.4")]
    telemetry = environ.get(keys.OTEL)
    if telemetry is not None:
        headers = telemetry.client_span(
            environ, record, ("127.0.0.1", 9000), TARGET, "/small", headers
        )
    record.status = 200
    start_response("200 OK", [("Content-Length", "1024")])
    record.ended = time.monotonic()
    return [b"x" * 1024]


def environ() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/small",
        "QUERY_STRING": "",
        "RAW_URI": "/small",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_USER_AGENT": "wrk/4.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
    }


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


def requests(app: Callable[..., Any]) -> float:
    """Best µs per request over RUNS runs."""
    best = float("inf")
    for _ in range(RUNS):
        started = time.process_time()
        for i in range(REQUESTS):
            if i % 64 == 0:
                gevent.sleep(0)
            body = app(environ(), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        best = min(best, (time.process_time() - started) / REQUESTS * 1e6)
    return best


def sdk_floor(provider: Any) -> float:
    """Two spans with the block's attributes, started and ended: the SDK alone."""
    tracer = provider.get_tracer("floor")
    server_attributes = {**SERVER_ATTRIBUTES, "http.response.status_code": 200}
    client_attributes = {**CLIENT_ATTRIBUTES, "http.response.status_code": 200}
    best = float("inf")
    for _ in range(RUNS):
        started = time.process_time()
        for i in range(REQUESTS):
            if i % 64 == 0:
                gevent.sleep(0)
            server = tracer.start_span("GET", kind=SpanKind.SERVER, attributes=server_attributes)
            client = tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=client_attributes)
            client.end()
            server.end()
        best = min(best, (time.process_time() - started) / REQUESTS * 1e6)
    return best


def sdk_calls(provider: Any) -> float:
    """The SDK calls the block must make for the two spans, and nothing else."""
    from opentelemetry.trace import set_span_in_context

    tracer = provider.get_tracer("calls")
    server_attributes = SERVER_ATTRIBUTES
    client_attributes = CLIENT_ATTRIBUTES
    best = float("inf")
    for _ in range(RUNS):
        started = time.process_time()
        for i in range(REQUESTS):
            if i % 64 == 0:
                gevent.sleep(0)
            server = tracer.start_span("GET", kind=SpanKind.SERVER, attributes=server_attributes)
            begun = time.time_ns()
            client = tracer.start_span(
                "GET",
                context=set_span_in_context(server),
                kind=SpanKind.CLIENT,
                attributes=client_attributes,
                start_time=begun,
            )
            client.set_attribute("http.response.status_code", 200)
            server.set_attribute("http.response.status_code", 200)
            ended = time.time_ns()
            client.end(ended)
            server.end(ended)
        best = min(best, (time.process_time() - started) / REQUESTS * 1e6)
    return best


def main() -> None:
    drop = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    ratio = TracerProvider(sampler=ParentBasedTraceIdRatio(0.0))
    batch = TracerProvider(sampler=ALWAYS_ON)
    batch.add_span_processor(BatchSpanProcessor(NullExporter(), max_queue_size=1 << 16))
    base = requests(forward_like)
    rows = [
        (
            "sampler drops (ParentBased(ALWAYS_OFF))",
            requests(OpenTelemetry(forward_like, tracer_provider=drop)) - base,
        ),
        (
            "ratio sampler dropping (ParentBasedTraceIdRatio(0)): the SDK decides",
            requests(OpenTelemetry(forward_like, tracer_provider=ratio)) - base,
        ),
        (
            "every span, BatchSpanProcessor",
            requests(OpenTelemetry(forward_like, tracer_provider=batch)) - base,
        ),
        ("SDK floor: the same two spans, SDK alone", sdk_floor(batch)),
        ("SDK calls: the calls the block must make, SDK alone", sdk_calls(batch)),
    ]
    print(f"bare stand-in: {base:.2f} µs/request (best of {RUNS} x {REQUESTS})")
    print("| case | µs per request |")
    print("| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")
    batch.shutdown()


if __name__ == "__main__":
    main()
