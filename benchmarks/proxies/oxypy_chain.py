"""A named oxypy chain ending in Forward, served by oxypy's own Server.

Usage: ``python proxies/oxypy_chain.py CHAIN UPSTREAM [UPSTREAM2] [--redis URL]``.
Chains (every rate and limit is huge, so nothing is ever rejected):

- ``forward``: ``Forward(up1)``
- ``rr1``: ``RoundRobin(Forward(), [up1])`` (the balancer over the same single upstream)
- ``rr2``: ``RoundRobin(Forward(), [up1, up2])``
- ``rr2_status``: the same, watched by a ``StatusPage`` (per-server stats kept)
- ``consistenthash2``: ``ConsistentHash(Forward(), [up1, up2])`` (key: client.ip)
- ``least2``: ``LeastRequest(Forward(), [up1, up2])``
- ``buffer_rr2``: ``Buffer(RoundRobin(Forward(), [up1, up2]), retry=...)``
- ``ratelimit_mem``: ``RateLimit(Forward(up1), rates=[huge])`` (in-process store)
- ``ratelimit_redis``: the same with ``RedisStore(--redis)``
- ``rr2_registry``: ``RoundRobin(Forward(), [up1, up2], registry=RedisRegistry(--redis, name))``
- ``cbreaker``: ``CircuitBreaker(Forward(up1), "NetworkErrorRatio() > 0.5")``
- ``trace``: ``Trace(Forward(up1), sink=open("/dev/null", "w"))``
- ``headers``: ``Headers(Forward(up1), request={...}, response={...})``
- ``ipallow``: ``IPAllowList(Forward(up1), ["10.0.0.0/8", "127.0.0.0/8"])``
- ``cors`` / ``cors_star``: ``CORS(Forward(up1), allow_origins=[one origin] / ["*"])``
- ``compress``: ``Compress(Forward(up1))``
- ``forwardauth``: ``ForwardAuth(Forward(up1), <in-process WSGI app answering 204>)``
- ``timeout``: ``Timeout(Forward(up1), 30.0)`` (a deadline no request reaches)
- ``buffer_retry``: ``Buffer(Forward(up1), retry=...)`` (decides on the head, streams)
- ``buffer_limit``: the same with ``max_response_body_bytes=1 GiB`` (buffers each response)
- ``full``: Trace → ConnLimit → RateLimit → CircuitBreaker → Buffer → RoundRobin → Forward
- ``full_1up``: the same, its two RoundRobin servers (two pools) on one upstream process
  (``127.0.0.1`` and ``localhost``): the chain without the second upstream process
- ``otel_drop``: ``OpenTelemetry(Forward(up1))``, the SDK with a sampler that drops
  every trace (``ParentBased(ALWAYS_OFF)``): no span recorded, ``traceparent`` still sent
- ``otel_batch``: the same with every span recorded (``ALWAYS_ON``) and exported by a
  ``BatchSpanProcessor`` to an exporter that drops the batches
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _common import ready  # noqa: E402

from oxypy import (  # noqa: E402
    CORS,
    Buffer,
    CircuitBreaker,
    Compress,
    ConnLimit,
    ConsistentHash,
    Forward,
    ForwardAuth,
    Headers,
    IPAllowList,
    LeastRequest,
    OpenTelemetry,
    Rate,
    RateLimit,
    RedisRegistry,
    RedisStore,
    RoundRobin,
    StatusPage,
    Timeout,
    Trace,
)
from oxypy.server import Server  # noqa: E402

RETRY = "IsNetworkError() && Attempts() < 2"
TRIGGER = "NetworkErrorRatio() > 0.5"
HUGE = [Rate(1e9, 1.0, burst=10**9)]
MAX_CONNS = 10**6


def _two(ups: list[str]) -> list[str]:
    if len(ups) < 2:
        raise SystemExit("this chain needs two upstream URLs")
    return ups[:2]


def _one_process(ups: list[str]) -> list[str]:
    """Two upstream entries (two pools) served by one upstream process."""
    return [ups[0], ups[0].replace("//127.0.0.1:", "//localhost:", 1)]


def _full(ups: list[str]) -> Any:
    return Trace(
        ConnLimit(
            RateLimit(
                CircuitBreaker(
                    Buffer(RoundRobin(Forward(), ups), retry=RETRY),
                    TRIGGER,
                ),
                rates=HUGE,
            ),
            max_conns=MAX_CONNS,
        ),
        sink=open(os.devnull, "w"),  # noqa: SIM115
    )


def _redis_store(url: str | None) -> Any:
    if not url:
        raise SystemExit("ratelimit_redis needs --redis URL")
    # "deny" turns a Redis failure into a 429 that the benchmark sees as non-2xx,
    # instead of silently measuring a limiter that skipped its store.
    return RedisStore(url, timeout=5.0, on_error="deny")


def _registry(url: str | None) -> Any:
    if not url:
        raise SystemExit("rr2_registry needs --redis URL")
    return RedisRegistry(url, f"bench-{os.getpid()}")


def _allow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("204 No Content", [("X-User", "bench")])
    return []


def _watched(balancer: Any) -> Any:
    """``balancer``, with the per-server stats a StatusPage turns on (the page itself
    is not served: only the request path's cost is measured)."""
    StatusPage(balancer)
    return balancer


def _otel(sampled: bool) -> Any:
    """A TracerProvider of the OpenTelemetry SDK: dropping every trace, or batching all."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    class NullExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    if not sampled:
        return TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(NullExporter()))
    return provider


def build(chain: str, ups: list[str], redis_url: str | None) -> Any:
    builders: dict[str, Callable[[], Any]] = {
        "forward": lambda: Forward(ups[0]),
        "rr1": lambda: RoundRobin(Forward(), [ups[0]]),
        "rr2": lambda: RoundRobin(Forward(), _two(ups)),
        "rr2_status": lambda: _watched(RoundRobin(Forward(), _two(ups))),
        "least2": lambda: LeastRequest(Forward(), _two(ups)),
        "consistenthash2": lambda: ConsistentHash(Forward(), _two(ups)),
        "buffer_rr2": lambda: Buffer(RoundRobin(Forward(), _two(ups)), retry=RETRY),
        "ratelimit_mem": lambda: RateLimit(Forward(ups[0]), rates=HUGE),
        "ratelimit_redis": lambda: RateLimit(
            Forward(ups[0]), rates=HUGE, store=_redis_store(redis_url)
        ),
        "rr2_registry": lambda: RoundRobin(Forward(), _two(ups), registry=_registry(redis_url)),
        "cbreaker": lambda: CircuitBreaker(Forward(ups[0]), TRIGGER),
        "trace": lambda: Trace(Forward(ups[0]), sink=open(os.devnull, "w")),  # noqa: SIM115
        "headers": lambda: Headers(
            Forward(ups[0]), request={"X-Env": "bench"}, response={"Server": None}
        ),
        "ipallow": lambda: IPAllowList(Forward(ups[0]), ["10.0.0.0/8", "127.0.0.0/8"]),
        "cors": lambda: CORS(Forward(ups[0]), allow_origins=["https://app.example.com"]),
        "cors_star": lambda: CORS(Forward(ups[0]), allow_origins=["*"]),
        "compress": lambda: Compress(Forward(ups[0])),
        "forwardauth": lambda: ForwardAuth(Forward(ups[0]), _allow, response_headers=["X-User"]),
        "timeout": lambda: Timeout(Forward(ups[0]), 30.0),
        "buffer_retry": lambda: Buffer(Forward(ups[0]), retry=RETRY),
        "buffer_limit": lambda: Buffer(
            Forward(ups[0]), retry=RETRY, max_response_body_bytes=1 << 30
        ),
        "otel_drop": lambda: OpenTelemetry(Forward(ups[0]), tracer_provider=_otel(False)),
        "otel_batch": lambda: OpenTelemetry(Forward(ups[0]), tracer_provider=_otel(True)),
        "full": lambda: _full(_two(ups)),
        "full_1up": lambda: _full(_one_process(ups)),
    }
    if chain not in builders:
        raise SystemExit(f"unknown chain {chain!r}; known: {', '.join(builders)}")
    return builders[chain]()


CHAINS = (
    "forward",
    "rr1",
    "rr2",
    "rr2_status",
    "least2",
    "consistenthash2",
    "buffer_rr2",
    "ratelimit_mem",
    "ratelimit_redis",
    "rr2_registry",
    "cbreaker",
    "trace",
    "headers",
    "ipallow",
    "cors",
    "cors_star",
    "compress",
    "forwardauth",
    "timeout",
    "buffer_retry",
    "buffer_limit",
    "full",
    "full_1up",
    "otel_drop",
    "otel_batch",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("chain", choices=CHAINS)
    parser.add_argument("upstreams", nargs="+", help="upstream base URLs (1 or 2)")
    parser.add_argument(
        "--redis", default=None, help="redis://127.0.0.1:PORT/0 for ratelimit_redis"
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick one)")
    args = parser.parse_args()
    app = build(args.chain, args.upstreams, args.redis)
    server = Server(app, f"127.0.0.1:{args.port}", graceful_timeout=1).start()
    ready(server.address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
