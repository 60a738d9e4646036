"""Microbenchmark: what a balancer adds to one request, in process, no network.

Calls each balancer with a trivial next app that records an answered
``Exchange`` (as Forward would) and closes the response, so the figure is the
pick plus the settling in ``close()`` (in-flight count, outlier counting)::

    python3 benchmarks/bench_balance.py

Prints the best of ``REPEAT`` runs of ``N`` requests, in µs per request.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from oxypy import (
    ConsistentHash,
    LeastRequest,
    OutlierDetection,
    RoundRobin,
    StatusPage,
    StickySession,
)
from oxypy import environ as keys
from oxypy.forward import Exchange

N = 50_000
REPEAT = 9
SERVERS = [f"http://10.0.0.{i}:80" for i in range(1, 5)]
SIXTEEN = [f"http://10.0.0.{i}:80" for i in range(1, 17)]


def answered(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    record = Exchange(environ[keys.TARGET], "GET", 0.0)
    record.status = 200
    environ.setdefault(keys.EXCHANGES, []).append(record)
    start_response("200 OK", [])
    return [b"x"]


def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> None:
    return None


def per_request_us(app: Any) -> float:
    best = float("inf")
    for _ in range(REPEAT):
        started = time.perf_counter()
        for _ in range(N):
            result = app({"REQUEST_METHOD": "GET", "REMOTE_ADDR": "192.0.2.7"}, start_response)
            close = getattr(result, "close", None)
            if close is not None:
                close()
        best = min(best, (time.perf_counter() - started) / N * 1e6)
    return best


def _watched(balancer: Any) -> Any:
    StatusPage(balancer)  # turns on the per-server stats (keep_stats)
    return balancer


def main() -> None:
    cases = {
        "RoundRobin": RoundRobin(answered, SERVERS),
        "RoundRobin + OutlierDetection": RoundRobin(
            answered, SERVERS, outlier_detection=OutlierDetection()
        ),
        "RoundRobin + StickySession": RoundRobin(
            answered, SERVERS, sticky=StickySession("s", secret="k")
        ),
        "RoundRobin watched by StatusPage": _watched(RoundRobin(answered, SERVERS)),
        "LeastRequest": LeastRequest(answered, SERVERS, rng=random.Random(1)),
        "ConsistentHash (client.ip)": ConsistentHash(answered, SERVERS),
        "ConsistentHash, weights 3:1:1:1": ConsistentHash(
            answered, [(SERVERS[0], 3), *SERVERS[1:]]
        ),
        "ConsistentHash, 16 servers": ConsistentHash(answered, SIXTEEN),
    }
    for name, app in cases.items():
        print(f"{name:32s} {per_request_us(app):6.2f} µs/request")


if __name__ == "__main__":
    main()
