"""Time to first byte through ``Buffer(retry=…)`` against bare ``Forward`` (issue 14).

Buffer decides a retry on the response head and streams the body from then
on; only with ``max_response_body_bytes`` set does it buffer each response
(to answer 502 cleanly over the limit).  This measures the difference on
the Go upstream (``benchmarks/upstream``):

- a 50 MiB download (``/big`` with ``-big 52428800``): time to first byte
  and total time;
- a slow chunked stream (``/stream``: 10 lines, 100 ms apart): time to the
  first byte.

Chains (``benchmarks/proxies/oxypy_chain.py``, oxypy's own server, pinned to
one core; curl on the other): ``forward`` = ``Forward(up)``,
``buffer_retry`` = ``Buffer(Forward(up), retry=...)``, ``buffer_limit`` =
the same with ``max_response_body_bytes=1 GiB`` (the old behaviour of every
Buffer).  Medians of ``--rounds`` interleaved rounds::

    python benchmarks/ttfb.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    INSTALL_HINT,
    LOAD_CORE,
    PROXY_CORE,
    Proc,
    build_go,
    missing_tools,
    pinned,
)

HERE = os.path.dirname(os.path.abspath(__file__))
CHAINS = ("forward", "buffer_retry", "buffer_limit")
BIG = 50 << 20


def curl_times(url: str) -> tuple[float, float, int]:
    """(time to first byte, total time, bytes) of one GET, in seconds."""
    fmt = "%{time_starttransfer} %{time_total} %{size_download} %{http_code}"
    argv = pinned(LOAD_CORE, ["curl", "-sS", "-o", os.devnull, "-w", fmt, url])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    first, total, size, code = done.stdout.split()
    if code != "200":
        raise RuntimeError(f"{url}: HTTP {code} {done.stderr}")
    return float(first), float(total), int(size)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        print(f"missing {', '.join(missing)}; install with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="oxypy-ttfb-") as work:
        upstream_bin, _ = build_go(work)
        up = Proc("upstream", pinned(LOAD_CORE, [upstream_bin, "-big", str(BIG)]), work)
        proxies: dict[str, Proc] = {}
        try:
            for chain in CHAINS:
                script = os.path.join(HERE, "proxies", "oxypy_chain.py")
                proxies[chain] = Proc(
                    chain, pinned(PROXY_CORE, [sys.executable, script, chain, up.url]), work
                )
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for chain, proc in proxies.items():
                    for path in ("/big", "/stream"):
                        first, total, size = curl_times(proc.url + path)
                        if path == "/big" and size != BIG:
                            raise RuntimeError(f"{chain}: {size} bytes of /big")
                        results.setdefault((chain, path), []).append((first, total))
                    time.sleep(0.05)
        finally:
            for proc in proxies.values():
                proc.stop()
            up.stop()
    base = {
        path: statistics.median(f for f, _ in results[("forward", path)])
        for path in ("/big", "/stream")
    }
    print(
        "| chain | 50 MiB: first byte ms | ×forward | 50 MiB: total ms "
        "| stream: first byte ms | ×forward |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for chain in CHAINS:
        big = results[(chain, "/big")]
        stream = results[(chain, "/stream")]
        big_first = statistics.median(f for f, _ in big)
        big_total = statistics.median(t for _, t in big)
        stream_first = statistics.median(f for f, _ in stream)
        print(
            f"| `{chain}` | {big_first * 1000:.1f} | {big_first / base['/big']:.2f} "
            f"| {big_total * 1000:.0f} | {stream_first * 1000:.1f} "
            f"| {stream_first / base['/stream']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
