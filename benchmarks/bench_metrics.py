"""Microbenchmark: the cost of recording one request in oxypy's rolling metrics.

Prints µs per ``RoundTripMetrics.record`` (the breaker's per-request cost, lock
included) and compares the histogram step with the ``hdrhistogram`` PyPI
package (``hdrh``), if installed::

    python3 benchmarks/bench_metrics.py
    python3 benchmarks/bench_metrics.py --gevent   # with gevent monkey patching
"""

from __future__ import annotations

import sys

if "--gevent" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from oxypy.rolling import Histogram, RollingHistogram, RoundTripMetrics  # noqa: E402

N = 200_000


def per_call_us(fn: Callable[[int], None], n: int = N, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    rng = random.Random(7)
    latencies = [rng.lognormvariate(-4.0, 1.5) for _ in range(1024)]
    statuses = [200] * 900 + [500] * 60 + [502] * 64
    rng.shuffle(statuses)
    values_us = [int(v * 1e6) + 1 for v in latencies]

    metrics = RoundTripMetrics()

    def record(n: int) -> None:
        rec = metrics.record
        for k in range(n):
            j = k & 1023
            rec(statuses[j], latencies[j], j % 17 == 0)

    hist = Histogram()

    def own_hist(n: int) -> None:
        rec = hist.record
        for k in range(n):
            rec(values_us[k & 1023])

    rolling = RollingHistogram()

    def own_rolling(n: int) -> None:
        rec = rolling.record
        for k in range(n):
            rec(values_us[k & 1023])

    from oxypy.cbreaker import CircuitBreaker

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    ignore: Any = lambda s, h, e=None: None  # noqa: E731

    def bare(n: int) -> None:
        for _ in range(n):
            body = app({}, ignore)
            for _chunk in body:
                pass

    breaker = CircuitBreaker(app, "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 20")

    def through_breaker(n: int) -> None:
        for _ in range(n):
            body: Any = breaker({"REQUEST_METHOD": "GET"}, ignore)
            for _chunk in body:
                pass
            body.close()

    print(f"RoundTripMetrics.record        {per_call_us(record):6.2f} µs/record")
    overhead = per_call_us(through_breaker, N // 4) - per_call_us(bare, N // 4)
    print(f"CircuitBreaker per request     {overhead:6.2f} µs overhead (in-process, no HTTP)")
    print(f"Histogram.record (oxypy)       {per_call_us(own_hist):6.2f} µs/record")
    print(f"RollingHistogram.record        {per_call_us(own_rolling):6.2f} µs/record")
    try:
        from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
    except ImportError:
        print("hdrhistogram (hdrh) not installed: no comparison")
        return
    hdr = HdrHistogram(1, 3_600_000_000, 2)

    def hdr_hist(n: int) -> None:
        rec = hdr.record_value
        for k in range(n):
            rec(values_us[k & 1023])

    print(f"hdrh HdrHistogram.record_value {per_call_us(hdr_hist):6.2f} µs/record")
    # Same quantile from both, to show the implementations agree within 1 %.
    ours = Histogram()
    for v in values_us:
        ours.record(v)
    theirs = HdrHistogram(1, 3_600_000_000, 2)
    for v in values_us:
        theirs.record_value(v)
    for q in (50.0, 99.0):
        print(
            f"p{q:g}: oxypy {ours.value_at_quantile(q)} µs, "
            f"hdrh {theirs.get_value_at_percentile(q)} µs"
        )


if __name__ == "__main__":
    main()
