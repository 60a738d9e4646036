"""What RateLimit costs per request: memory and Redis stores in front of Forward vs bare Forward.

Each proxy runs in its own process pinned to CPU 0 (``taskset -c 0``) on
oxypy's Server; wrk runs pinned to CPU 1 with 64 connections; the upstream (a
gevent pywsgi app answering 1 KiB with TCP_NODELAY) and redis-server share CPU
1 with wrk.  The rate is huge, so nothing is rejected: the figure is the cost
of the bookkeeping.  Rounds are interleaved (bare, memory, redis, bare, ...)
and medians reported, with the cost per request in microseconds::

    cost = (1 / rps_limited - 1 / rps_bare) * 1e6

Usage: ``python benchmarks/bench_limits.py [--duration 5] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
VARIANTS = ("bare", "memory", "redis")
BODY = b"x" * 1024


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(argv: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=_env(), cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY "):
        _stop(proc)
        raise RuntimeError(f"{argv} did not start: {line!r}")
    return proc, int(line.split()[1])


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis() -> tuple[subprocess.Popen[bytes], int, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port, workdir = _free_port(), tempfile.mkdtemp(prefix="oxypy-bench-redis-")
    proc = subprocess.Popen(
        ["taskset", "-c", "1", binary, "--port", str(port), "--bind", "127.0.0.1"]
        + ["--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, port, workdir
        except OSError:
            time.sleep(0.05)
    _stop(proc)
    raise RuntimeError("redis-server did not start")


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

    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None, handler_class=NoDelay)
    server.start()
    print(f"READY {server.address[1]}", flush=True)
    server.serve_forever()


def _serve_proxy(variant: str, upstream: str, redis_url: str) -> None:
    from gevent import monkey

    monkey.patch_all()
    from oxypy._redis import RedisStore
    from oxypy.forward import Forward
    from oxypy.ratelimit import Rate, RateLimit
    from oxypy.server import Server

    app: Any = Forward(upstream)
    huge = [Rate(1e9, 1.0, burst=10**9)]
    if variant == "memory":
        app = RateLimit(app, rates=huge)
    elif variant == "redis":
        app = RateLimit(app, rates=huge, store=RedisStore(redis_url))
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
    workdir = ""
    try:
        redis, redis_port, workdir = _start_redis()
        procs.append(redis)
        up, up_port = _start(["taskset", "-c", "1", sys.executable, HERE, "upstream"])
        procs.append(up)
        ports = {}
        for variant in VARIANTS:
            proc, port = _start(
                ["taskset", "-c", "0", sys.executable, HERE, "proxy", variant]
                + [f"http://127.0.0.1:{up_port}", f"redis://127.0.0.1:{redis_port}/0"]
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
            "proxy on CPU 0, wrk + upstream + redis on CPU 1\n"
        )
        print("| proxy | median req/s | runs (req/s) | cost per request |")
        print("| --- | ---: | --- | ---: |")
        names = {
            "bare": "Forward",
            "memory": "RateLimit (memory) + Forward",
            "redis": "RateLimit (Redis) + Forward",
        }
        for variant in VARIANTS:
            rps = statistics.median(results[variant])
            runs = ", ".join(f"{r:.0f}" for r in results[variant])
            cost = "-" if variant == "bare" else f"{(1 / rps - 1 / bare) * 1e6:.1f} µs"
            print(f"| {names[variant]} | {rps:.0f} | {runs} | {cost} |")
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["upstream"]:
        _serve_upstream()
    elif sys.argv[1:2] == ["proxy"]:
        _serve_proxy(*sys.argv[2:5])
    else:
        main()
