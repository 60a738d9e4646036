r"""A gateway composed in code: every oxypy block nested by hand, served by oxypy.

Run it in front of two upstreams::

    OXYPY_UPSTREAMS=http://127.0.0.1:9001,http://127.0.0.1:9002 \
    OXYPY_LISTEN=127.0.0.1:8080 python examples/custom_gateway.py
    curl -i http://127.0.0.1:8080/anything

The chain, outermost first (each block wraps the next, like Go handlers)::

    Trace -> RequestID -> ConnLimit -> RateLimit -> CircuitBreaker -> Buffer
          -> RoundRobin (sticky cookie, passive outlier ejection) -> Forward

``oxypy proxy`` builds the same chain from flags; this file is the starting
point when you need more (a fallback response, per-route rules, hooks...).
"""

from gevent import monkey

monkey.patch_all()  # before anything opens a socket

import os  # noqa: E402

from oxypy import (  # noqa: E402
    Buffer,
    CircuitBreaker,
    ConnLimit,
    Forward,
    OutlierDetection,
    Rate,
    RateLimit,
    RequestID,
    ResponseFallback,
    RoundRobin,
    StickySession,
    Trace,
    serve,
)

UPSTREAMS = os.environ.get("OXYPY_UPSTREAMS", "http://127.0.0.1:9001,http://127.0.0.1:9002")
LISTEN = os.environ.get("OXYPY_LISTEN", "127.0.0.1:8080")


def build() -> Trace:
    servers = [url.strip() for url in UPSTREAMS.split(",") if url.strip()]
    fwd = Forward(connect_timeout=2.0, read_timeout=30.0, via="oxypy")
    lb = RoundRobin(
        fwd,
        servers,
        sticky=StickySession("gw", secret=os.environ.get("OXYPY_STICKY_SECRET")),
        outlier_detection=OutlierDetection(consecutive_errors=5, base_ejection_time=30.0),
    )
    buf = Buffer(
        lb,
        retry="IsNetworkError() && Attempts() < 3",
        max_request_body_bytes=10 * 1024 * 1024,
        max_response_body_bytes=50 * 1024 * 1024,
    )
    cb = CircuitBreaker(
        buf,
        "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 10",
        fallback=ResponseFallback(503, body="the service is recovering, try again soon\n"),
    )
    rl = RateLimit(cb, rates=[Rate(100, 1.0, burst=200)], source="client.ip")
    cl = ConnLimit(rl, max_conns=100, source="client.ip")
    return Trace(RequestID(cl), response_headers=["Content-Type"])


app = build()

if __name__ == "__main__":
    serve(app, LISTEN)
