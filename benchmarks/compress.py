"""Compress: throughput per coding, and small-request latency while big bodies compress.

Two measurements::

    python benchmarks/compress.py                 # both, about 1.5 minutes
    python benchmarks/compress.py --only speed    # in-process throughput only

*speed*: in-process, ``Compress(app, encodings=[coding])`` over a 10 MiB JSON
body that the app yields in 64 KiB chunks (as Forward relays an upstream) and
in one 10 MiB chunk; MB/s of input per CPU second of this process (the CPU
cost: µs per MiB is its inverse) and the compression ratio, median of 3.

*stall*: ``Server(Compress(app))`` in its own process pinned to CPU 0 serves
``/small`` (1 KiB, asked without Accept-Encoding) and ``/big`` (10 MiB in one
chunk, asked with ``Accept-Encoding: gzip``).  wrk measures ``/small`` alone,
then while two curl loops download ``/big`` without pause; the same again
with slicing disabled (``SLICE`` = the whole body) to show what the 64 KiB
slices with ``gevent.sleep(0)`` between them buy.  Tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BIG = 10 * 1024 * 1024
CHUNK = 64 * 1024


def json_body(size: int) -> bytes:
    rng = random.Random(15)
    rows = []
    total = 0
    i = 0
    while total < size:
        row = json.dumps(
            {
                "id": i,
                "name": f"user{i}",
                "email": f"user{i}@example.com",
                "tags": rng.sample(["alpha", "beta", "gamma", "delta", "eps", "zeta"], 3),
                "score": round(rng.random(), 6),
                "active": rng.random() < 0.5,
            }
        )
        rows.append(row)
        total += len(row) + 2
        i += 1
    return ("[" + ",\n".join(rows) + "]").encode()[:size]


def chunked_app(body: bytes, chunk: int) -> Callable[..., Iterator[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            yield bytes(view[start : start + chunk])

    return app


def speed() -> list[str]:
    from oxypy import Compress
    from oxypy._core.codecs import available

    body = json_body(BIG)
    out = [
        "### Compress throughput (in-process, 10 MiB JSON, median of 3)",
        "",
        "| coding | app chunks | MB/s (input per CPU s) | CPU ms per MiB | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for coding in ("zstd", "br", "gzip"):
        if coding not in available():
            out.append(f"| {coding} | - | library not installed | - | - |")
            continue
        for chunk in (CHUNK, BIG):
            block = Compress(chunked_app(body, chunk), encodings=[coding])
            rates, size = [], 0
            for _ in range(3):
                environ = {"REQUEST_METHOD": "GET", "HTTP_ACCEPT_ENCODING": coding}
                t0 = time.process_time()
                result = block(environ, lambda status, headers, exc_info=None: None)
                size = sum(len(piece) for piece in result)
                getattr(result, "close", lambda: None)()
                rates.append(len(body) / (time.process_time() - t0) / 1e6)
            rate = statistics.median(rates)
            label = "64 KiB" if chunk == CHUNK else "one 10 MiB"
            out.append(
                f"| {coding} | {label} | {rate:.0f} | {1e3 * 1.048576 / rate:.2f} | "
                f"{len(body) / size:.2f} |"
            )
    return [*out, ""]


# -- stall -----------------------------------------------------------------------------
def serve(unsliced: bool) -> None:
    from gevent import monkey

    monkey.patch_all()
    import oxypy.compress
    from oxypy import Compress
    from oxypy.server import Server

    if unsliced:
        oxypy.compress.SLICE = 1 << 40
    big = json_body(BIG)
    small = b"x" * 1024

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = big if environ["PATH_INFO"] == "/big" else small
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    server = Server(Compress(app), "127.0.0.1:0", graceful_timeout=1).start()
    sys.stdout.write(f"READY {server.address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


class Downloads:
    """``n`` threads downloading ``url`` with curl (gzip asked), without pause."""

    def __init__(self, url: str, n: int) -> None:
        import _harness as h

        self.stop = threading.Event()
        self.count = 0
        self.argv = h.pinned(
            h.LOAD_CORE,
            ["curl", "-sS", "-o", os.devnull, "-H", "Accept-Encoding: gzip", "--max-time", "60"],
        )
        self.threads = [threading.Thread(target=self.loop, args=(url,)) for _ in range(n)]

    def loop(self, url: str) -> None:
        while not self.stop.is_set():
            subprocess.run([*self.argv, url], check=False, timeout=90)
            self.count += 1

    def __enter__(self) -> Downloads:
        for t in self.threads:
            t.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def stall(duration: int) -> list[str]:
    import _harness as h

    rows = []
    workdir = tempfile.mkdtemp(prefix="oxypy-compress-")
    for unsliced in (False, True):
        argv = [sys.executable, os.path.abspath(__file__), "--serve"]
        if unsliced:
            argv.append("--unsliced")
        proc = h.Proc("compress", h.pinned(h.PROXY_CORE, argv), workdir)
        try:
            small = proc.url + "/small"
            h.run_wrk(small, 16, 1)
            alone = h.run_wrk(small, 16, duration)
            with Downloads(proc.url + "/big", 2) as dl:
                loaded = h.run_wrk(small, 16, duration)
            label = "one call per chunk (unsliced)" if unsliced else "64 KiB slices + sleep(0)"
            rows.append(
                f"| {label} | {alone.p50_ms:.2f} | {alone.p99_ms:.2f} | {loaded.p50_ms:.2f} | "
                f"{loaded.p99_ms:.2f} | {loaded.rps:.0f} | {dl.count} |"
            )
        finally:
            proc.stop()
    return [
        f"### Small requests while 10 MiB bodies compress (gzip), wrk -c16 {duration} s",
        "",
        "| Compress | alone p50 ms | alone p99 ms | loaded p50 ms | loaded p99 ms | "
        "loaded req/s | 10 MiB bodies sent |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="speed,stall", help="subset of speed,stall")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--unsliced", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.unsliced)
        return 0
    only = {x.strip() for x in a.only.split(",")}
    if "speed" in only:
        print("\n".join(speed()), flush=True)
    if "stall" in only:
        print("\n".join(stall(a.duration)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
