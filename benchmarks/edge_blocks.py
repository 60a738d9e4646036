"""The in-process cost of each edge block: µs per request over a bare WSGI app.

``benchmarks/blocks.py`` measures whole proxied requests, where a few µs
drown in the noise of a ~100 µs request on a shared machine.  This script
calls each block around a trivial app (the response iterated and closed, as
a server does) and subtracts the bare app's time: best of 7 runs of 50,000
calls::

    python benchmarks/edge_blocks.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oxypy import CORS, Compress, ForwardAuth, Headers, IPAllowList, Timeout  # noqa: E402

CALLS = 50_000
RUNS = 7
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "1024"), ("Server", "up")]
BODY = [b"x" * 1024]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", list(HEADERS))
    return BODY


class _Stream:
    """A one-chunk body that is not a list (as Forward's): Timeout bounds each chunk."""

    def __init__(self) -> None:
        self.chunks = BODY

    def __iter__(self) -> Any:
        return iter(self.chunks)

    def close(self) -> None:
        pass


def stream_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> _Stream:
    start_response("200 OK", list(HEADERS))
    return _Stream()


def allow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("204 No Content", [("X-User", "bench")])
    return []


def environ() -> dict[str, Any]:
    # What oxypy's server hands a typical browser GET, minus the body stream.
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/small",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_USER_AGENT": "bench/1.0",
        "HTTP_ACCEPT": "*/*",
    }


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def per_call(wsgi: Callable[..., Iterable[bytes]], extra: dict[str, str]) -> float:
    base = environ()
    base.update(extra)
    best = float("inf")
    for _ in range(RUNS):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            result = wsgi(dict(base), start_response)
            for _chunk in result:
                pass
            close = getattr(result, "close", None)
            if close is not None:
                close()
        best = min(best, time.perf_counter() - t0)
    return best / CALLS * 1e6


CASES: list[tuple[str, Callable[..., Iterable[bytes]], dict[str, str]]] = [
    ("bare app", app, {}),
    (
        'Headers(request={"X-Env": "bench"}, response={"Server": None})',
        Headers(app, request={"X-Env": "bench"}, response={"Server": None}),
        {},
    ),
    ("Headers(request={...}) only", Headers(app, request={"X-Env": "bench"}), {}),
    ("IPAllowList(2 CIDRs)", IPAllowList(app, ["10.0.0.0/8", "127.0.0.0/8"]), {}),
    (
        "IPAllowList(2 CIDRs, trusted_proxies), with X-Forwarded-For",
        IPAllowList(app, ["10.0.0.0/8", "127.0.0.0/8"], trusted_proxies=["127.0.0.1"]),
        {"HTTP_X_FORWARDED_FOR": "10.1.2.3"},
    ),
    ("CORS(one origin), no Origin", CORS(app, allow_origins=["https://a.example"]), {}),
    ('CORS(["*"]), no Origin', CORS(app, allow_origins=["*"]), {}),
    (
        "CORS(one origin), allowed Origin",
        CORS(app, allow_origins=["https://a.example"]),
        {"HTTP_ORIGIN": "https://a.example"},
    ),
    (
        "CORS(one origin), preflight",
        CORS(app, allow_origins=["https://a.example"], allow_headers=["X-A"]),
        {
            "REQUEST_METHOD": "OPTIONS",
            "HTTP_ORIGIN": "https://a.example",
            "HTTP_ACCESS_CONTROL_REQUEST_METHOD": "GET",
            "HTTP_ACCESS_CONTROL_REQUEST_HEADERS": "x-a",
        },
    ),
    ("Compress, no Accept-Encoding", Compress(app), {}),
    (
        "Compress, Accept-Encoding but 1 KiB < min_size",
        Compress(app, min_size=2048),
        {"HTTP_ACCEPT_ENCODING": "gzip, br, zstd"},
    ),
    ("ForwardAuth(in-process WSGI app)", ForwardAuth(app, allow, response_headers=["X-User"]), {}),
    ("Timeout(30 s), list body", Timeout(app, 30.0), {}),
    ("bare app, streamed body (1 chunk, not a list)", stream_app, {}),
    ("Timeout(30 s), streamed body (1 chunk)", Timeout(stream_app, 30.0), {}),
]


def main() -> int:
    bare = None
    print("| block (around a trivial app) | µs/call | cost µs |")
    print("|---|---:|---:|")
    for label, wsgi, extra in CASES:
        us = per_call(wsgi, extra)
        if bare is None:
            bare = us
        print(f"| {label} | {us:.2f} | {us - bare:+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
