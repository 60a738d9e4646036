"""The garbage collector's share of a served chain's CPU per request, with and without a freeze.

``blocks.py`` measures a chain's whole CPU per request; this script splits
off the collector's share.  Each (chain, mode) runs in a fresh process (the
heap, and so a full collection's cost, depends on what the chain imported):
``oxypy_chain.py``'s chain served by ``oxypy.server.Server`` pinned to CPU 0,
the Go upstream and wrk (-t1 -c64, 1 s warm-up, then ``--duration`` s) on
CPU 1.  ``gc.callbacks`` time every collection during the measured run:

- ``on``: the interpreter's defaults;
- ``freeze``: ``gc.collect(); gc.freeze()`` after the warm-up, so the
  objects alive then (imports, the app, its pools) are never scanned again.

Rounds are interleaved and medians reported::

    python benchmarks/gc_cost.py                       # 3 rounds, about 2 minutes
    python benchmarks/gc_cost.py --chains forward,otel_drop --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("on", "freeze")


def child(chain: str, mode: str, upstream: str, duration: int) -> dict[str, Any]:
    """Serve ``chain`` in this process and measure one run (called in a fresh process)."""
    from gevent import monkey

    monkey.patch_all()
    sys.path[:0] = [HERE, os.path.join(HERE, "proxies")]
    import _harness as h
    from oxypy_chain import build

    from oxypy.server import Server

    os.sched_setaffinity(0, {h.PROXY_CORE})
    server = Server(build(chain, [upstream], None), "127.0.0.1:0").start()
    url = f"http://127.0.0.1:{server.address[1]}/small"
    spent = [0.0, 0.0, 0.0]
    count = [0, 0, 0]
    began = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            spent[info["generation"]] += time.perf_counter() - began[0]
            count[info["generation"]] += 1

    h.run_wrk(url, 64, 1)
    if mode == "freeze":
        gc.collect()
        gc.freeze()
    gc.callbacks.append(timed)
    cpu0 = time.process_time()
    got = h.run_wrk(url, 64, duration)
    cpu1 = time.process_time()
    gc.callbacks.remove(timed)
    server.stop()
    n = max(1, got.requests)
    return {
        "requests": got.requests,
        "cpu": (cpu1 - cpu0) * 1e6 / n,
        "gc": sum(spent) * 1e6 / n,
        "per_1000": [c * 1000 / n for c in count],
        "each_us": [s * 1e6 / c if c else 0.0 for s, c in zip(spent, count, strict=True)],
        "frozen": gc.get_freeze_count(),
    }


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chains", default="forward,otel_drop,otel_batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=4, help="whole seconds per measured run")
    p.add_argument(
        "--child", nargs=3, metavar=("CHAIN", "MODE", "UPSTREAM"), help=argparse.SUPPRESS
    )
    a = p.parse_args(argv[1:])
    if a.child:
        print(json.dumps(child(*a.child, a.duration)))
        return 0
    sys.path.insert(0, HERE)
    import _harness as h

    chains = [c.strip() for c in a.chains.split(",") if c.strip()]
    workdir = tempfile.mkdtemp(prefix="oxypy-gc-")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    loads = []
    up = None
    try:
        up_bin, _ = h.build_go(workdir)
        up = h.Proc("upstream", h.pinned(h.LOAD_CORE, [up_bin]), workdir)
        runs = [(c, m) for c in chains for m in MODES]
        for rnd in range(a.rounds):
            loads.append(os.getloadavg()[0])
            shift = rnd % len(runs)
            for chain, mode in runs[shift:] + runs[:shift]:
                env = dict(
                    os.environ, PYTHONPATH=h.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
                )
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--duration",
                        str(a.duration),
                        "--child",
                        chain,
                        mode,
                        up.url,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=a.duration + 120,
                    env=env,
                    check=False,
                )
                if done.returncode != 0:
                    print(f"{chain} {mode}: FAIL\n{done.stderr[-2000:]}", flush=True)
                    continue
                got = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((chain, mode), []).append(got)
                print(
                    f"  round {rnd + 1} {chain:12s} {mode:6s} cpu {got['cpu']:6.1f} µs/req"
                    f"  gc {got['gc']:5.2f} µs/req",
                    flush=True,
                )
    finally:
        if up is not None:
            up.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(rows: list[dict[str, Any]], key: str, i: int | None = None) -> float:
        return statistics.median(r[key] if i is None else r[key][i] for r in rows)

    print()
    print(
        "| chain | gc | CPU µs/req | GC µs/req | collections per 1000 req (gen 0/1/2) "
        "| µs per collection (gen 0/1/2) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for chain in chains:
        for mode in MODES:
            rows = results.get((chain, mode))
            if not rows:
                continue
            per = " / ".join(f"{med(rows, 'per_1000', i):.2f}" for i in range(3))
            each = " / ".join(f"{med(rows, 'each_us', i):.0f}" for i in range(3))
            cpu, spent = med(rows, "cpu"), med(rows, "gc")
            print(f"| {chain} | {mode} | {cpu:.1f} | {spent:.2f} | {per} | {each} |")
    print()
    print(
        f"{a.rounds} interleaved rounds, medians; 1-minute load average at each round's start: "
        + ", ".join(f"{x:.2f}" for x in loads)
        + f", at the end {os.getloadavg()[0]:.2f}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
