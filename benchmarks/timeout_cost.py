"""What ``Timeout`` costs per request, measured so that load on a shared machine cannot fake it.

``benchmarks/blocks.py`` measures the ``timeout`` chain end to end (wrk
through the whole server), where a few µs drown in the noise of a ~150 µs
request on a shared 2-core machine (its same-round differences moved from
+4 to +32 µs).  This script measures the same work without the server and
the client, in one process pinned to core 0, as process CPU time
(``time.process_time()``: time spent waiting for the upstream or
descheduled by other load does not count):

1. **Block alone**: ``Timeout(app, 30)`` around a trivial app, against the
   bare app: with a streamed body (each chunk watched), and with a body that
   bounds itself by the deadline as Forward's does (relayed as it is).
2. **Through Forward**: ``GET /small`` (1 KiB) proxied by one ``Forward`` to
   the Go upstream (in another process, on core 1), against the same
   ``Forward`` under ``Timeout(…, 30)``; and, to split the cost, the same
   ``Forward`` given an ``oxypy.deadline`` directly (what the deadline makes
   Forward do: cap connect, send, the head wait and each read) against it
   without one and against ``Timeout``.

Rounds alternate the order of the two variants (A/B, then B/A); a round's
cost is B − A of that round, and the median over rounds is reported with the
25th–75th percentile of the per-round costs::

    python benchmarks/timeout_cost.py              # 41 rounds, about 2 minutes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "1024")]
BODY = b"x" * 1024


class _Stream:
    """A one-chunk body that is not a list (as Forward's): Timeout watches each chunk."""

    def __iter__(self) -> Any:
        return iter((BODY,))

    def close(self) -> None:
        pass


class _BoundedStream(_Stream):
    """The same body declaring that it bounds itself by the deadline, as Forward's does."""

    bounded_until = 0.0


def bounded_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> _Stream:
    start_response("200 OK", list(HEADERS))
    return _BoundedStream()


def stream_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> _Stream:
    start_response("200 OK", list(HEADERS))
    return _Stream()


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def _environ(port: int) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/small",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "HTTP_HOST": f"127.0.0.1:{port}",
        "HTTP_USER_AGENT": "bench/1.0",
        "HTTP_ACCEPT": "*/*",
    }


def drive(app: Callable[..., Iterable[bytes]], base: dict[str, Any], n: int) -> float:
    """Run ``n`` requests as a server would (iterate, close); CPU µs per request."""
    t0 = time.process_time()
    for _ in range(n):
        result = app(dict(base), _start_response)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return (time.process_time() - t0) / n * 1e6


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def ab(
    name: str,
    a: Callable[..., Iterable[bytes]],
    b: Callable[..., Iterable[bytes]],
    base: dict[str, Any],
    n: int,
    rounds: int,
) -> dict[str, float]:
    drive(a, base, n)  # warm-up: connections, caches
    drive(b, base, n)
    a_us: list[float] = []
    b_us: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            a_us.append(drive(a, base, n))
            b_us.append(drive(b, base, n))
        else:
            b_us.append(drive(b, base, n))
            a_us.append(drive(a, base, n))
    diffs = [y - x for x, y in zip(a_us, b_us, strict=True)]
    lo, mid, hi = _quartiles(diffs)
    return {
        "a": statistics.median(a_us),
        "b": statistics.median(b_us),
        "cost": mid,
        "lo": lo,
        "hi": hi,
    }


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--requests", type=int, default=1500, help="requests per round and variant")
    a = p.parse_args(argv)

    import _harness as h

    workdir = tempfile.mkdtemp(prefix="oxypy-timeout-cost-")
    up_bin, _ = h.build_go(workdir)
    upstream = h.Proc("upstream", h.pinned(h.LOAD_CORE, [up_bin]), workdir)
    try:
        return _measure(a, upstream.url, upstream.port)
    finally:
        upstream.stop()


def _measure(a: argparse.Namespace, url: str, port: int) -> int:
    _pin(0)
    from gevent import monkey

    monkey.patch_all()
    from oxypy import Forward, Timeout

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# Timeout(…, 30.0) cost per request; {a.rounds} interleaved A/B rounds of "
        f"{a.requests} requests; process CPU time; load average {load:.1f} at start\n"
    )
    print("| measurement (A vs B) | A µs | B µs | cost µs (median of B − A) | 25th–75th pct |")
    print("|---|---:|---:|---:|---:|")
    base = _environ(port)
    n = a.requests
    fwd = Forward(url)

    def marked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["oxypy.x"] = time.monotonic() + 30.0  # the same work as below, another key
        return fwd(environ, start_response)

    def deadline(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["oxypy.deadline"] = time.monotonic() + 30.0
        return fwd(environ, start_response)

    rows = [
        (
            "app vs `Timeout(app)`, a streamed 1-chunk body",
            stream_app,
            Timeout(stream_app, 30.0),
            20 * n,
        ),
        (
            "app vs `Timeout(app)`, a body bounding itself (as Forward's)",
            bounded_app,
            Timeout(bounded_app, 30.0),
            20 * n,
        ),
        ("`Forward` vs `Forward` given a deadline, GET /small (1 KiB)", marked, deadline, n),
        ("`Forward` vs `Timeout(Forward)`, GET /small (1 KiB)", fwd, Timeout(fwd, 30.0), n),
        (
            "`Forward` given the deadline vs `Timeout(Forward)`",
            deadline,
            Timeout(fwd, 30.0),
            n,
        ),
    ]
    for label, plain, timed, count in rows:
        r = ab(label, plain, timed, base, count, a.rounds)
        print(
            f"| {label} | {r['a']:.2f} | {r['b']:.2f} | **{r['cost']:+.2f}** | "
            f"{r['lo']:+.2f} to {r['hi']:+.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
