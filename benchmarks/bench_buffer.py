"""Cost of Buffer: Buffer(Forward) against bare Forward on oxypy's Server.

Self-contained: starts a gevent.pywsgi upstream (1 KiB answer to GET, a sink
for POST), one proxy subprocess per variant pinned to CPU 0, and drives them
from CPU 1: wrk at 64 connections for small GETs, a Python loop timing 20
uploads of 10 MiB.  Three interleaved rounds; prints a markdown table of
medians.  Everything listens on 127.0.0.1 and every process it starts is
stopped by PID.

    python3 benchmarks/bench_buffer.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
SMALL = b"x" * 1024
UPLOAD = 10 * 1024 * 1024
WRK = "/usr/bin/wrk"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------- child roles


def run_upstream(port: int) -> None:
    from gevent import monkey

    monkey.patch_all()
    from gevent.pywsgi import WSGIServer

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            stream, size = environ["wsgi.input"], 0
            while True:
                piece = stream.read(65536)
                if not piece:
                    break
                size += len(piece)
            body = str(size).encode()
        else:
            body = SMALL
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]

    WSGIServer(("127.0.0.1", port), app, log=None).serve_forever()


def run_proxy(mode: str, port: int, upstream: str) -> None:
    from gevent import monkey

    monkey.patch_all()
    sys.path.insert(0, ROOT)
    import oxypy
    from oxypy.buffer import Buffer

    app: Any = oxypy.Forward(upstream)
    if mode == "buffer":
        app = Buffer(app, retry="IsNetworkError() && Attempts() < 2")
    oxypy.Server(app, f"127.0.0.1:{port}").serve_forever()


# --------------------------------------------------------------- driver


def start(args: list[str], cpu: str) -> subprocess.Popen[bytes]:
    cmd = ["taskset", "-c", cpu, sys.executable, HERE, *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wrk(port: int, duration: int) -> tuple[float, float]:
    """Requests/s and p99 latency (ms) for GET / at 64 connections."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            WRK,
            "-t1",
            "-c64",
            f"-d{duration}s",
            "--latency",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert m is not None, out
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return rps, p99


def uploads(port: int, count: int = 20) -> float:
    """Median seconds per 10 MiB POST (sequential, one connection each)."""
    block = b"u" * 65536
    times = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        started = time.perf_counter()
        conn.putrequest("POST", "/up")
        conn.putheader("Content-Length", str(UPLOAD))
        conn.endheaders()
        for _ in range(UPLOAD // len(block)):
            conn.send(block)
        resp = conn.getresponse()
        body = resp.read()
        times.append(time.perf_counter() - started)
        conn.close()
        if resp.status != 200 or body != str(UPLOAD).encode():
            raise RuntimeError(f"upload failed: {resp.status} {body[:80]!r}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    up_port, bare_port, buf_port = free_port(), free_port(), free_port()
    procs = [start(["upstream", str(up_port)], "1")]
    upstream = f"http://127.0.0.1:{up_port}"
    procs.append(start(["proxy", "bare", str(bare_port), upstream], "0"))
    procs.append(start(["proxy", "buffer", str(buf_port), upstream], "0"))
    results: dict[str, dict[str, list[float]]] = {
        name: {"rps": [], "p99": [], "upload": []} for name in ("bare", "buffer")
    }
    try:
        for port in (up_port, bare_port, buf_port):
            wait_ready(port)
        for port in (bare_port, buf_port):  # warm up pools and code paths
            wrk(port, 1)
            uploads(port, 2)
        for rnd in range(opts.rounds):
            order = [("bare", bare_port), ("buffer", buf_port)]
            if rnd % 2:
                order.reverse()
            for name, port in order:
                rps, p99 = wrk(port, opts.duration)
                results[name]["rps"].append(rps)
                results[name]["p99"].append(p99)
                results[name]["upload"].append(uploads(port))
    finally:
        for proc in reversed(procs):
            stop(proc)

    def med(name: str, key: str) -> float:
        return statistics.median(results[name][key])

    rows = [
        ("GET 1 KiB, 64 conns: req/s", "rps", "{:.0f}"),
        ("GET 1 KiB, 64 conns: p99 ms", "p99", "{:.2f}"),
        ("POST 10 MiB: s per upload", "upload", "{:.3f}"),
    ]
    print(f"medians of {opts.rounds} interleaved rounds; proxy on CPU 0, load on CPU 1\n")
    print("| metric | Forward | Buffer(Forward) | Buffer / Forward |")
    print("|---|---:|---:|---:|")
    for label, key, fmt in rows:
        a, b = med("bare", key), med("buffer", key)
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f} |")
    mib_s = [UPLOAD / med(n, "upload") / 2**20 for n in ("bare", "buffer")]
    print(f"| POST 10 MiB: MiB/s | {mib_s[0]:.0f} | {mib_s[1]:.0f} | {mib_s[1] / mib_s[0]:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "upstream":
        run_upstream(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "proxy":
        run_proxy(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
