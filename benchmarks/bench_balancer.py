"""What a balancer costs: RoundRobin(Forward) over 2 upstreams vs bare Forward to one.

Each proxy runs in its own process pinned to CPU 0 (``taskset -c 0``) on
oxypy's Server; wrk runs pinned to CPU 1 with 64 connections; the two
upstreams (gevent pywsgi servers answering 1 KiB with TCP_NODELAY, both in
one process) share CPU 1 with wrk.  Rounds are interleaved (bare,
roundrobin1, roundrobin, leastrequest, bare, ...); ``roundrobin1`` balances
over the bare run's single upstream, which separates the balancer's own cost
from the two-upstream topology.  Medians are reported with the throughput
ratio to bare Forward and the cost per request in microseconds::

    cost = (1 / rps_balanced - 1 / rps_bare) * 1e6

Target: RoundRobin costs less than 10 % of throughput.

Usage: ``python benchmarks/bench_balancer.py [--duration 5] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
from typing import Any

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
VARIANTS = ("bare", "roundrobin1", "roundrobin", "leastrequest")
NAMES = {
    "bare": "Forward (1 upstream)",
    "roundrobin1": "RoundRobin + Forward (same 1 upstream)",
    "roundrobin": "RoundRobin + Forward (2 upstreams)",
    "leastrequest": "LeastRequest + Forward (2 upstreams)",
}
BODY = b"x" * 1024


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(argv: list[str]) -> tuple[subprocess.Popen[bytes], list[int]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=_env(), cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY "):
        _stop(proc)
        raise RuntimeError(f"{argv} did not start: {line!r}")
    return proc, [int(p) for p in line.split()[1:]]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def _wrk(port: int, seconds: float, connections: int) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "/usr/bin/wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"]
        + [f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if re.search(r"Non-2xx or 3xx responses: \d+", out):
        raise RuntimeError(f"non-2xx responses during the run:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    return float(match.group(1))


def _serve_upstream() -> None:
    from gevent import monkey

    monkey.patch_all()
    from gevent.pywsgi import WSGIHandler, WSGIServer

    class NoDelay(WSGIHandler):  # type: ignore[misc]
        def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().__init__(sock, *args, **kwargs)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]
        )
        return [BODY]

    # Two upstream servers in one process: two processes sharing CPU 1 with wrk
    # would wait on each other's time slices and measure the scheduler instead.
    servers = []
    for _ in range(2):
        server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None, handler_class=NoDelay)
        server.start()
        servers.append(server)
    print("READY " + " ".join(str(s.address[1]) for s in servers), flush=True)
    servers[0].serve_forever()


def _serve_proxy(variant: str, up1: str, up2: str) -> None:
    from gevent import monkey

    monkey.patch_all()
    from oxypy.forward import Forward
    from oxypy.leastrequest import LeastRequest
    from oxypy.roundrobin import RoundRobin
    from oxypy.server import Server

    app: Any
    if variant == "bare":
        app = Forward(up1)
    elif variant == "roundrobin1":
        app = RoundRobin(Forward(), [up1])
    elif variant == "roundrobin":
        app = RoundRobin(Forward(), [up1, up2])
    else:
        app = LeastRequest(Forward(), [up1, up2])
    server = Server(app, "127.0.0.1:0", graceful_timeout=1).start()
    print(f"READY {server.address[1]}", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    try:
        up, up_ports = _start(["taskset", "-c", "1", sys.executable, HERE, "upstream"])
        procs.append(up)
        upstreams = [f"http://127.0.0.1:{port}" for port in up_ports]
        ports = {}
        for variant in VARIANTS:
            proc, (port,) = _start(
                ["taskset", "-c", "0", sys.executable, HERE, "proxy", variant, *upstreams]
            )
            procs.append(proc)
            ports[variant] = port
        results: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                _wrk(ports[variant], 1, args.connections)  # warm pools and connections
                results[variant].append(_wrk(ports[variant], args.duration, args.connections))
        bare = statistics.median(results["bare"])
        print(
            f"\nwrk -c{args.connections}, {args.duration:g} s x {args.rounds} interleaved rounds, "
            "proxy on CPU 0, wrk + 2 upstreams on CPU 1\n"
        )
        print("| proxy | median req/s | runs (req/s) | vs bare | cost per request |")
        print("| --- | ---: | --- | ---: | ---: |")
        for variant in VARIANTS:
            rps = statistics.median(results[variant])
            runs = ", ".join(f"{r:.0f}" for r in results[variant])
            cost = "-" if variant == "bare" else f"{(1 / rps - 1 / bare) * 1e6:.1f} µs"
            print(f"| {NAMES[variant]} | {rps:.0f} | {runs} | {rps / bare:.3f} | {cost} |")
    finally:
        for proc in reversed(procs):
            _stop(proc)


if __name__ == "__main__":
    if sys.argv[1:2] == ["upstream"]:
        _serve_upstream()
    elif sys.argv[1:2] == ["proxy"]:
        _serve_proxy(*sys.argv[2:5])
    else:
        main()
