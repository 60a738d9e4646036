"""Retry discipline side by side: retry storms with and without a budget, hedging's tail.

The proxy under test is the ``oxypy proxy`` command (its ``--retry``,
``--retry-budget`` and ``--hedge`` flags) in its own process, pinned to core
0; the upstreams (raw keep-alive sockets that count every request) and the
clients (urllib3 on gevent, keep-alive) run in this process, pinned to core
1, all on 127.0.0.1.  The figures are counts (upstream requests per client
request, as the upstreams saw them) and client latencies.

    python benchmarks/retry.py                 # about 4 minutes
    python benchmarks/retry.py --requests 500  # a smoke test
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
import urllib3  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _harness import free_port, pinned  # noqa: E402

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
STORM = "IsNetworkError() && Attempts() < 4"


class Upstream:
    """A raw keep-alive upstream: ``behave(rng)`` says what to do with each request."""

    def __init__(self, behave: Callable[[random.Random], str], seed: int) -> None:
        self.behave = behave
        self.rng = random.Random(seed)
        self.requests = 0
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.address[1]}"

    def handle(self, sock: socket.socket, addr: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b""
        try:
            while True:
                while b"\r\n\r\n" not in data:
                    piece = sock.recv(65536)
                    if not piece:
                        return
                    data += piece
                _, _, data = data.partition(b"\r\n\r\n")
                self.requests += 1
                action = self.behave(self.rng)
                if action == "close":
                    return
                if action == "slow":
                    gevent.sleep(0.2)
                sock.sendall(OK)
        except OSError:
            pass
        finally:
            sock.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)


def failing(rng: random.Random) -> str:
    return "close"  # reads the request, closes without an answer: a network error


def healthy(rng: random.Random) -> str:
    return "ok"


def five_percent_slow(rng: random.Random) -> str:
    return "slow" if rng.random() < 0.05 else "ok"


class Proxy:
    """``oxypy proxy`` with ``flags`` in front of ``upstreams``, pinned to core 0."""

    def __init__(self, upstreams: list[Upstream], flags: list[str]) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = [sys.executable, "-m", "oxypy", "proxy", "--listen", f"127.0.0.1:{port}"]
        argv += [u.url for u in upstreams] + flags
        self.proc = subprocess.Popen(
            pinned(0, argv), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"oxypy proxy {' '.join(flags)} did not start") from None
                gevent.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def drive(
    upstreams: list[Upstream],
    flags: list[str],
    requests: int,
    concurrency: int,
    warmup: int = 0,
) -> tuple[list[float], list[int]]:
    """Run ``requests`` through a fresh proxy; after ``warmup`` requests (not
    measured) and a 1.1 s pause, so a derived hedge delay has been computed."""
    proxy = Proxy(upstreams, flags)
    http = urllib3.PoolManager(maxsize=concurrency, retries=False, timeout=10)
    latencies: list[float] = []
    statuses: list[int] = []
    url = proxy.url

    def one(i: int) -> None:
        started = time.perf_counter()
        resp = http.request("GET", f"{url}/r/{i}")
        latencies.append(time.perf_counter() - started)
        statuses.append(resp.status)

    try:
        if warmup:
            pool = gevent.pool.Pool(concurrency)
            for i in range(warmup):
                pool.spawn(one, i)
            pool.join()
            gevent.sleep(1.1)
            latencies.clear()
            statuses.clear()
        for u in upstreams:
            u.requests = 0
        pool = gevent.pool.Pool(concurrency)
        began = time.perf_counter()
        for i in range(requests):
            pool.spawn(one, i)
        pool.join()
        latencies.append(time.perf_counter() - began)  # the last value: the whole run
    finally:
        http.clear()
        proxy.stop()
    return latencies, statuses


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def storm(requests: int, concurrency: int) -> list[str]:
    rows = [
        "| outage | retry budget | upstream requests / client request | client 2xx |",
        "|---|---|---:|---:|",
    ]
    for outage in ("1 of 2 upstreams failing", "every upstream failing"):
        for budgeted in (False, True):
            ups = [Upstream(failing, 1)]
            if outage.startswith("1 of 2"):
                ups.insert(0, Upstream(healthy, 2))
            flags = ["--retry", STORM] + (["--retry-budget", "20"] if budgeted else [])
            _, statuses = drive(ups, flags, requests, concurrency)
            upstream = sum(u.requests for u in ups)
            ok = sum(1 for s in statuses if s == 200)
            label = "20 % (`--retry-budget 20`)" if budgeted else "none"
            rows.append(
                f"| {outage} | {label} | {upstream / requests:.2f} | {100 * ok / requests:.1f} % |"
            )
            for u in ups:
                u.stop()
    return rows


def tail(requests: int, concurrency: int, rounds: int) -> list[str]:
    chains = {
        "no hedging": [],
        "`--hedge 0.02`": ["--hedge", "0.02"],
        "`--hedge 0.02 --retry-budget 10`": ["--hedge", "0.02", "--retry-budget", "10"],
        "`--hedge p90` (derived)": ["--hedge", "p90"],
        "`--hedge p95` (derived)": ["--hedge", "p95"],
    }
    # Interleaved rounds, medians: the shared machine's load moves between runs.
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in chains}
    for _ in range(rounds):
        for name, flags in chains.items():
            ups = [Upstream(five_percent_slow, 11), Upstream(five_percent_slow, 12)]
            # 300 warm-up requests for every chain: a derived delay needs 100 latencies.
            latencies, statuses = drive(ups, flags, requests, concurrency, warmup=300)
            rate = requests / latencies.pop()
            assert all(s == 200 for s in statuses), set(statuses)
            load = sum(u.requests for u in ups) / requests
            ms = [v * 1000 for v in latencies]
            runs[name].append((pct(ms, 50), pct(ms, 90), pct(ms, 99), max(ms), load, rate))
            for u in ups:
                u.stop()
    rows = [
        "| chain | p50 ms | p90 ms | p99 ms | max ms | upstream requests / client request "
        "| client req/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    medians = {}
    for name, values in runs.items():
        med = [statistics.median(column) for column in zip(*values, strict=True)]
        medians[name] = med
        rows.append(
            f"| {name} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | {med[3]:.1f} | "
            f"{med[4]:.3f} | {med[5]:.0f} |"
        )
    base = ", ".join(f"{v[2]:.0f}" for v in runs["no hedging"])
    rows.append("")
    for name in ("`--hedge 0.02`", "`--hedge p90` (derived)", "`--hedge p95` (derived)"):
        ratio = medians[name][2] / medians["no hedging"][2]
        p99s = ", ".join(f"{v[2]:.0f}" for v in runs[name])
        rows.append(f"p99 {name} / unhedged: {ratio:.2f} (per round: {p99s} ms vs {base} ms)  ")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="tail-latency rounds (medians)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    load = os.getloadavg()[0]
    print(f"# retry discipline: {args.requests} requests, concurrency {args.concurrency}")
    print(f"# load average at start: {load:.2f}\n")
    started = time.monotonic()
    print("## Retry storm (`Buffer(retry='IsNetworkError() && Attempts() < 4')`)\n")
    print("\n".join(storm(args.requests, args.concurrency)))
    print("\n## Tail latency: each of 2 upstreams delays 5 % of requests by 200 ms\n")
    print("\n".join(tail(args.requests, args.concurrency, args.rounds)))
    took = time.monotonic() - started
    print(f"\n# {took:.0f} s; load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
