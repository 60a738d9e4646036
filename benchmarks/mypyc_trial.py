"""Issue 17's trial of a mypyc-compiled build of oxypy's hot modules.

The package stays pure Python: this copies ``oxypy/`` and ``benchmarks/`` into
a throwaway directory outside the repository, compiles the chosen modules
there with mypyc (the ``.so`` files sit next to the ``.py`` files, and Python
imports an extension module before the source of the same name), then runs
the same measurement once from the repository (pure Python) and once from the
copy (compiled), alternating which goes first, in interleaved rounds::

    python benchmarks/mypyc_trial.py                     # chain_cost.py, 5 rounds
    python benchmarks/mypyc_trial.py --e2e 3             # + blocks.py forward,full small
    python benchmarks/mypyc_trial.py --build-dir DIR --keep   # build kept in DIR

In-process: ``chain_cost.py`` (Forward and the full chain called directly,
against the Go upstreams, no server; process CPU per request) pinned to CPU 0,
the upstreams to CPU 1. End to end (``--e2e N``): ``blocks.py --chains
forward,full --only small --rounds 1`` N times per variant, alternating.
Medians over rounds; ``compiled ÷ pure`` is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

# The hot path of the full chain (issue 17's profile), compiled together.
MODULES = [
    "oxypy/_server/connection.py",
    "oxypy/_server/wsgi_io.py",
    "oxypy/_client/exchange.py",
    "oxypy/_client/response_head.py",
    "oxypy/_client/request_head.py",
    "oxypy/_core/headers.py",
    "oxypy/_core/observe.py",
    "oxypy/_core/exchange.py",
    # observe.ObservedBody and wsgi_io.Input subclass its classes: an interpreted
    # base makes them non-native classes, and mypyc refuses __slots__ there.
    # (_buffer/store.py's _FileReader, interpreted, subclasses it too: Buffer's
    # spill to disk then fails, see benchmarks/README.md.)
    "oxypy/_core/iterables.py",
    "oxypy/trace.py",
    "oxypy/connlimit.py",
    "oxypy/cbreaker.py",
    "oxypy/buffer.py",
    "oxypy/roundrobin.py",
    "oxypy/forward.py",
]
# Left out, and why (see benchmarks/README.md, issue 17).
SKIPPED = {
    "oxypy/ratelimit.py": (
        "mypyc 2.4 emits C that does not compile: RateLimit.__init__ is wrapped by "
        "@renamed_since (a decorator on __init__), and the generated constructor calls "
        "the native __init__ with no arguments"
    ),
}
CHAINS = ["forward", "full"]
_COST_LINE = re.compile(r"^(\w+)\s+([\d.]+)\s+[+-][\d.]+\s+[\d.]+$")
_BLOCKS_LINE = re.compile(
    r"^\s+(\w+)\s+(\d+) req/s\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms\s+cpu\s+(\d+) us/req"
)


def build(root: str, modules: list[str]) -> None:
    """Copy the package and the benchmarks into ``root`` and compile ``modules`` there."""
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.so")
    for name in ("oxypy", "benchmarks"):
        shutil.copytree(os.path.join(h.ROOT, name), os.path.join(root, name), ignore=ignore)
    # The mypy configuration (strict, stubs-less third-party modules).
    shutil.copy(os.path.join(h.ROOT, "pyproject.toml"), root)
    log = os.path.join(root, "build.log")
    t0 = time.monotonic()
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "mypyc", *modules], cwd=root, stdout=out, stderr=out
        )
    if done.returncode != 0:
        with open(log, encoding="utf-8", errors="replace") as f:
            errors = [line for line in f if " error" in line or "Error" in line]
        raise SystemExit("mypyc failed:\n" + "".join(errors[-20:]))
    names = [m[:-3].replace("/", ".") for m in modules]
    check = (
        "import importlib, sys\n"
        f"for n in {names!r}:\n"
        "    f = importlib.import_module(n).__file__\n"
        "    assert f.endswith('.so'), f\n"
        "import oxypy, oxypy._buffer.store, oxypy.config\n"
    )
    subprocess.run([sys.executable, "-c", check], cwd=root, check=True)
    print(f"compiled {len(modules)} modules in {time.monotonic() - t0:.0f} s", flush=True)


def chain_cost(root: str, ups: list[str], requests: int) -> dict[str, float]:
    argv = [sys.executable, os.path.join(root, "benchmarks", "chain_cost.py")]
    argv += ["--upstream", ",".join(ups), "--rounds", "1", "--requests", str(requests)]
    argv += ["--chains", ",".join(CHAINS)]
    out = subprocess.run(h.pinned(h.PROXY_CORE, argv), capture_output=True, text=True, check=True)
    got = {m[1]: float(m[2]) for m in map(_COST_LINE.match, out.stdout.splitlines()) if m}
    if set(got) != set(CHAINS):
        raise SystemExit(f"chain_cost.py printed no figures:\n{out.stdout}{out.stderr}")
    return got


def blocks(root: str, duration: int) -> dict[str, tuple[float, float]]:
    """``{chain: (req/s, CPU µs/req)}`` from one round of blocks.py."""
    argv = [sys.executable, os.path.join(root, "benchmarks", "blocks.py"), "--only", "small"]
    argv += ["--chains", ",".join(CHAINS), "--rounds", "1", "--duration", str(duration)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=root)
    got = {}
    for line in out.stdout.splitlines():
        m = _BLOCKS_LINE.match(line)
        if m:
            got[m[1]] = (float(m[2]), float(m[5]))
    if set(got) != set(CHAINS):
        raise SystemExit(f"blocks.py printed no figures:\n{out.stdout}{out.stderr}")
    return got


def report(title: str, runs: dict[str, list[dict[str, float]]], unit: str) -> None:
    print(f"\n{title}")
    print(f"{'chain':8} {'pure ' + unit:>16} {'compiled ' + unit:>20} {'compiled ÷ pure':>16}")
    for c in CHAINS:
        pure = [r[c] for r in runs["pure"]]
        comp = [r[c] for r in runs["compiled"]]
        ratio = statistics.median(b / a for a, b in zip(pure, comp, strict=True))
        mid_pure, mid_comp = statistics.median(pure), statistics.median(comp)
        print(f"{c:8} {mid_pure:>16.1f} {mid_comp:>20.1f} {ratio:>16.3f}")
    for v in ("pure", "compiled"):
        per = statistics.median(r["full"] / r["forward"] for r in runs[v])
        print(f"full ÷ forward, {v}: {per:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--build-dir", help="an empty directory outside the repository (temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the build directory")
    p.add_argument("--rounds", type=int, default=5, help="in-process rounds per variant (5)")
    p.add_argument("--requests", type=int, default=20000, help="requests per in-process run")
    p.add_argument("--e2e", type=int, default=0, metavar="N", help="blocks.py rounds per variant")
    p.add_argument("--duration", type=int, default=5, help="blocks.py seconds per wrk run (5)")
    args = p.parse_args()
    root = args.build_dir or tempfile.mkdtemp(prefix="oxypy-mypyc-")
    root = os.path.abspath(root)
    if os.path.commonpath([root, h.ROOT]) == h.ROOT:
        raise SystemExit("--build-dir must be outside the repository")
    os.makedirs(root, exist_ok=True)
    if os.listdir(root):
        raise SystemExit(f"--build-dir {root} is not empty")
    services: list[h.Proc] = []
    try:
        for module, why in SKIPPED.items():
            print(f"skipped {module}: {why}")
        build(root, MODULES)
        upstream_bin, _ = h.build_go(root)
        for name in ("up1", "up2"):
            services.append(h.Proc(name, h.pinned(h.LOAD_CORE, [upstream_bin]), root))
        ups = [s.url for s in services]
        roots = {"pure": h.ROOT, "compiled": root}
        loads = [os.getloadavg()[0]]
        cost: dict[str, list[dict[str, float]]] = {"pure": [], "compiled": []}
        for rnd in range(args.rounds):
            order = ["pure", "compiled"] if rnd % 2 == 0 else ["compiled", "pure"]
            for v in order:
                cost[v].append(chain_cost(roots[v], ups, args.requests))
                print(f"round {rnd + 1} {v:8} {cost[v][-1]}", flush=True)
            loads.append(os.getloadavg()[0])
        report(
            f"In-process (chain_cost.py, c=16, {args.requests} requests, "
            f"median of {args.rounds}): CPU µs per request",
            cost,
            "µs/req",
        )
        print("1-minute load average: " + ", ".join(f"{x:.2f}" for x in loads))
        for s in services:
            s.stop()
        services.clear()
        if args.e2e:
            rps: dict[str, list[dict[str, float]]] = {"pure": [], "compiled": []}
            cpu: dict[str, list[dict[str, float]]] = {"pure": [], "compiled": []}
            loads = [os.getloadavg()[0]]
            for rnd in range(args.e2e):
                order = ["pure", "compiled"] if rnd % 2 == 0 else ["compiled", "pure"]
                for v in order:
                    got = blocks(roots[v], args.duration)
                    rps[v].append({c: got[c][0] for c in CHAINS})
                    cpu[v].append({c: got[c][1] for c in CHAINS})
                    print(f"e2e round {rnd + 1} {v:8} {got}", flush=True)
                loads.append(os.getloadavg()[0])
            report(f"End to end (blocks.py, wrk -c64, median of {args.e2e}): req/s", rps, "req/s")
            report("End to end: the proxy's CPU µs per request", cpu, "µs/req")
            print("1-minute load average: " + ", ".join(f"{x:.2f}" for x in loads))
    finally:
        for s in services:
            s.stop()
        if args.keep:
            print(f"build kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
