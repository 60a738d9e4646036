"""Instructions per request of ``OpenTelemetry``, and of each SDK call it makes (callgrind).

CPU time on the shared 2-core machine moves with the load; instruction
counts do not.  Each case runs in its own ``valgrind --tool=callgrind``
process, gevent-patched like the server, with collection switched on only
around ``--requests`` requests after 200 warm-up ones (by
``CALLGRIND_TOGGLE_COLLECT`` from a two-function C library compiled here
with ``cc`` from valgrind's ``callgrind.h`` and loaded with ctypes).  Cases:

- ``forward``, ``otel_drop``, ``otel_batch``: the ``blocks.py`` chains
  (``proxies/oxypy_chain.py``) called in process, one request at a time,
  against the Go upstream (GET /small, 1 KiB): real Forward, no front server;
- ``standin``, ``standin_drop``, ``standin_batch``, ``sdk_calls``: the
  stand-in for Forward of ``otel_inprocess.py`` (no socket), bare, under the
  block with a dropping sampler and with every span batched, and the SDK
  alone making the calls the block must make;
- ``sdk:start_server``, ``sdk:start_client``, ``sdk:set_attribute``,
  ``sdk:end``: each of those SDK calls alone (SERVER span with the block's 9
  request attributes; CLIENT child with 5; the status attribute on both
  spans; ending both), the others running uncounted.

Needs valgrind and a C compiler; the Go upstream is built as ``blocks.py``
builds it.  About 1 minute per case::

    python benchmarks/otel_instructions.py
    python benchmarks/otel_instructions.py --cases forward,otel_drop --requests 300
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CHAINS = ("forward", "otel_drop", "otel_batch")
STANDIN = ("standin", "standin_drop", "standin_batch", "sdk_calls")
SDK = ("sdk:start_server", "sdk:start_client", "sdk:set_attribute", "sdk:end")
TOGGLE_C = "#include <valgrind/callgrind.h>\nvoid toggle(void) { CALLGRIND_TOGGLE_COLLECT; }\n"


def child(case: str, library: str, upstream: str, requests: int) -> None:
    """Run ``case`` (inside valgrind), counting only the measured requests."""
    from gevent import monkey

    monkey.patch_all()
    import ctypes

    import gevent

    sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(HERE, "proxies")]
    toggle = ctypes.CDLL(library).toggle
    if case in SDK:
        sdk_call(case, toggle, requests)
        return
    run: Callable[[], Any]
    if case in CHAINS:
        import chain_cost
        import oxypy_chain

        app = oxypy_chain.build(case, [upstream, upstream], None)

        def run() -> None:
            chain_cost.one(app)

    else:
        import otel_inprocess as standin

        if case == "sdk_calls":
            standin.RUNS, standin.REQUESTS = 1, 200
            provider = batch_provider(standin.NullExporter)
            standin.sdk_calls(provider)
            gevent.sleep(0)
            standin.REQUESTS = requests
            toggle()
            standin.sdk_calls(provider)
            toggle()
            return
        app = standin_app(case, standin)

        def run() -> None:
            body = app(standin.environ(), standin.start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()

    for _ in range(200):
        run()
    gevent.sleep(0)  # the batch worker drains what the warm-up queued
    toggle()
    for _ in range(requests):
        run()
    toggle()


def batch_provider(exporter: Any) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(exporter(), max_queue_size=1 << 16))
    return provider


def standin_app(case: str, standin: Any) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    from oxypy import OpenTelemetry

    if case == "standin":
        return standin.forward_like
    if case == "standin_drop":
        provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    else:
        provider = batch_provider(standin.NullExporter)
    return OpenTelemetry(standin.forward_like, tracer_provider=provider)


def sdk_call(case: str, toggle: Callable[[], None], requests: int) -> None:
    """The two spans of a recorded request, counting only the SDK call ``case`` names."""
    import time

    import gevent
    import otel_inprocess as standin
    from opentelemetry.trace import SpanKind, set_span_in_context

    tracer = batch_provider(standin.NullExporter).get_tracer("oxypy")
    server_attributes = standin.SERVER_ATTRIBUTES
    client_attributes = standin.CLIENT_ATTRIBUTES

    def on(phase: str, counted: bool) -> None:
        if counted and case == phase:
            toggle()

    for i in range(200 + requests):
        counted = i >= 200
        on("sdk:start_server", counted)
        server = tracer.start_span("GET", kind=SpanKind.SERVER, attributes=server_attributes)
        on("sdk:start_server", counted)
        context = set_span_in_context(server)
        began = time.time_ns()
        on("sdk:start_client", counted)
        client = tracer.start_span(
            "GET",
            context=context,
            kind=SpanKind.CLIENT,
            attributes=client_attributes,
            start_time=began,
        )
        on("sdk:start_client", counted)
        on("sdk:set_attribute", counted)
        client.set_attribute("http.response.status_code", 200)
        server.set_attribute("http.response.status_code", 200)
        on("sdk:set_attribute", counted)
        ended = time.time_ns()
        on("sdk:end", counted)
        client.end(ended)
        server.end(ended)
        on("sdk:end", counted)
        if i % 64 == 0:
            gevent.sleep(0)


def count(case: str, library: str, upstream: str, requests: int, workdir: str) -> float:
    """Instructions per request of ``case``, from its own callgrind run."""
    out = os.path.join(workdir, "callgrind." + case.replace(":", "_"))
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        case,
        "--library",
        library,
        "--upstream",
        upstream,
        "--requests",
        str(requests),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{case}: callgrind run failed:\n{done.stderr[-3000:]}")
    with open(out) as fh:
        match = re.search(r"^(?:summary|totals): (\d+)", fh.read(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"{case}: no totals in {out}")
    return int(match.group(1)) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CHAINS + STANDIN + SDK))
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.library, args.upstream, args.requests)
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CHAINS + STANDIN + SDK]
    if unknown:
        parser.error(
            f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CHAINS + STANDIN + SDK)}"
        )
    compiler = shutil.which("cc") or shutil.which("gcc")
    if shutil.which("valgrind") is None or compiler is None:
        raise SystemExit("needs valgrind and a C compiler (cc)")
    sys.path.insert(0, HERE)
    import _harness as h

    workdir = tempfile.mkdtemp(prefix="oxypy-otel-instr-")
    library = os.path.join(workdir, "libtoggle.so")
    source = os.path.join(workdir, "toggle.c")
    with open(source, "w") as fh:
        fh.write(TOGGLE_C)
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", library, source], check=True)
    upstream = None
    try:
        if any(c in CHAINS for c in cases):
            binary, _ = h.build_go(workdir)
            upstream = h.Proc("up1", [binary], workdir)
        url = upstream.url if upstream is not None else ""
        got: dict[str, float] = {}
        for case in cases:
            got[case] = count(case, library, url, args.requests, workdir)
            print(f"  {case}: {got[case]:.0f}", flush=True)
    finally:
        if upstream is not None:
            upstream.stop()
    bases = {"otel_drop": "forward", "otel_batch": "forward"}
    bases.update({"standin_drop": "standin", "standin_batch": "standin"})
    print(f"\nInstructions per request (callgrind, {args.requests} requests after 200)\n")
    print("| case | instructions | over |")
    print("|---|---:|---:|")
    for case, value in got.items():
        base = bases.get(case)
        over = f"{value - got[base]:+,.0f} over {base}" if base in got else "-"
        print(f"| {case} | {value:,.0f} | {over} |")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
