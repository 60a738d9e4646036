"""In-process CPU cost of the ``oxypy proxy`` chain over bare ``Forward``.

The WSGI app is called directly (no front server), against the Go upstream of
the harness (GET /small, 1 KiB), so the figures are the blocks' own CPU and
the exchange's: what ``blocks.py`` measures end to end minus the server::

    python benchmarks/chain_cost.py                   # forward, full: µs/req
    python benchmarks/chain_cost.py --profile full    # + cProfile's top entries

Chains come from ``proxies/oxypy_chain.py`` (same names as ``blocks.py``).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "proxies"))

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def environ_for(path: str) -> dict[str, Any]:
    """What oxypy's Server puts in the environ of ``GET path`` from wrk."""
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "RAW_URI": path,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "HTTP_HOST": "proxy.test",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def one(app: App) -> None:
    got: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
        got.append(status)
        return None

    body = app(environ_for("/small"), start_response)
    n = 0
    try:
        for chunk in body:
            n += len(chunk)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    if not got or not got[0].startswith("200") or n != 1024:
        raise RuntimeError(f"bad answer {got} {n} bytes")


def run(app: App, requests: int, concurrency: int) -> float:
    """CPU µs per request."""
    for _ in range(300):
        one(app)
    cpu0 = time.process_time()
    group = gevent.pool.Pool(concurrency)
    for _ in range(requests):
        group.spawn(one, app)
    group.join(raise_error=True)
    return (time.process_time() - cpu0) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--chains", default="forward,full")
    parser.add_argument("--profile", metavar="CHAIN", help="cProfile this chain, print the top")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--redis", default=None, help="redis://... for ratelimit_redis")
    parser.add_argument("--upstream", help="upstream URL(s), comma-separated (default: Go)")
    args = parser.parse_args()
    import oxypy_chain

    services = []
    try:
        if args.upstream is None:
            import _harness as h

            workdir = tempfile.mkdtemp(prefix="oxypy-chain-")
            upstream_bin, _ = h.build_go(workdir)
            for name in ("up1", "up2"):
                services.append(h.Proc(name, h.pinned(h.LOAD_CORE, [upstream_bin]), workdir))
            ups = [s.url for s in services]
        else:
            ups = args.upstream.split(",")
        if args.profile:
            app = oxypy_chain.build(args.profile, ups, args.redis)
            for _ in range(300):
                one(app)
            prof = cProfile.Profile()
            prof.enable()
            group = gevent.pool.Pool(args.concurrency)
            for _ in range(args.requests):
                group.spawn(one, app)
            group.join(raise_error=True)
            prof.disable()
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(args.top)
            print(out.getvalue())
            return
        chains = args.chains.split(",")
        apps = {c: oxypy_chain.build(c, ups, args.redis) for c in chains}
        results: dict[str, list[float]] = {c: [] for c in chains}
        for _ in range(args.rounds):
            for c in chains:  # interleaved rounds
                results[c].append(run(apps[c], args.requests, args.concurrency))
        base = statistics.median(results[chains[0]])
        print(f"{args.requests} GET /small per run, c={args.concurrency}, median of {args.rounds}")
        print(f"{'chain':18} {'CPU µs/req':>11} {'cost':>8} {'×' + chains[0]:>10}")
        for c in chains:
            med = statistics.median(results[c])
            print(f"{c:18} {med:>11.1f} {med - base:>+8.1f} {med / base:>10.2f}")
    finally:
        for s in services:
            s.stop()


if __name__ == "__main__":
    main()
