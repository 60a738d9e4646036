"""Soak: the full ``oxypy proxy`` chain under steady load and hostile clients.

The ``full`` chain of proxies/oxypy_chain.py (Trace → ConnLimit → RateLimit →
CircuitBreaker → Buffer → RoundRobin → Forward) runs on oxypy's Server pinned
to CPU 0, in front of two Go upstreams. wrk keeps 64 keep-alive connections
busy on GET /small for the whole run, in slices; during every slice a hostile
thread misbehaves the ways a public edge sees:

- uploaders that send half of a 10 MiB Content-Length body, then reset
  (they must be 499s, never trip the breaker, never leak a connection);
- slow heads that send one byte every 0.5 s (cut by the header deadline);
- clients that connect and go away without a byte.

After every slice the script records the proxy's RSS and open file
descriptors, wrk's request count, errors and non-2xx answers, and checks that
a healthy request still gets 200. Everything goes to 127.0.0.1 only, and
every process is stopped by its PID::

    python benchmarks/soak.py                 # 10 minutes, 64 connections
    python benchmarks/soak.py --minutes 1     # a short smoke run

The table goes to stdout and to benchmarks/results/soak.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

CONNS = 64
SLICE_SECONDS = 30
UPLOAD_SIZE = 10 * 1024 * 1024


@dataclass
class Slice:
    index: int
    requests: int
    rps: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    rss_mib: float
    fds: int
    hostile: int
    probe: int


def fd_count(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in h.tree_pids(pid))


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout: close() sends a RST, as a crashed client would.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def aborted_upload(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {UPLOAD_SIZE}\r\n\r\n"
    ).encode()
    sock.sendall(head)
    chunk = b"u" * 65536
    for _ in range(UPLOAD_SIZE // 2 // len(chunk)):
        sock.sendall(chunk)
    _reset(sock)


def slow_head(port: int, stop: threading.Event) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        for byte in b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ":
            if stop.wait(0.5):
                break
            sock.sendall(bytes([byte]))
    except OSError:
        pass  # cut by the server's header deadline: what we want
    finally:
        sock.close()


def silent(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


class Hostile(threading.Thread):
    """Misbehaving clients, a few per second, until stopped; counts what it sent."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        slow: list[threading.Thread] = []
        while not self.stop.is_set():
            for action in (aborted_upload, silent):
                try:
                    action(self.port)
                except OSError:
                    pass
                self.sent += 1
            if len([t for t in slow if t.is_alive()]) < 10:
                thread = threading.Thread(
                    target=slow_head, args=(self.port, self.stop), daemon=True
                )
                thread.start()
                slow.append(thread)
                self.sent += 1
            self.stop.wait(0.5)
        for thread in slow:
            thread.join(10)


def probe(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/small", timeout=10) as resp:  # noqa: S310 - loopback
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=CONNS)
    parser.add_argument("--slice", type=float, default=SLICE_SECONDS, help="seconds per slice")
    args = parser.parse_args()
    missing = h.missing_tools()
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)}; {h.INSTALL_HINT}")

    slices: list[Slice] = []
    with tempfile.TemporaryDirectory(prefix="oxypy-soak-") as work:
        upstream_bin, _ = h.build_go(work)
        procs: list[h.Proc] = []
        try:
            ups = [
                h.Proc(f"upstream{i}", h.pinned(h.LOAD_CORE, [upstream_bin]), work) for i in (1, 2)
            ]
            procs.extend(ups)
            chain = os.path.join(h.HERE, "proxies", "oxypy_chain.py")
            proxy = h.Proc(
                "proxy",
                h.pinned(h.PROXY_CORE, [sys.executable, chain, "full", *(u.url for u in ups)]),
                work,
            )
            procs.append(proxy)
            start_rss = h.rss_kib(proxy.pid) / 1024
            start_fds = fd_count(proxy.pid)
            print(f"proxy pid {proxy.pid}: RSS {start_rss:.1f} MiB, {start_fds} fds at start")
            count = max(1, round(args.minutes * 60 / args.slice))
            for index in range(1, count + 1):
                hostile = Hostile(proxy.port)
                hostile.start()
                result = h.run_wrk(proxy.url + "/small", args.connections, args.slice)
                hostile.stop.set()
                hostile.join(30)
                time.sleep(1.0)  # let the last hostile connections be torn down before counting
                row = Slice(
                    index=index,
                    requests=result.requests,
                    rps=result.rps,
                    p99_ms=result.p99_ms,
                    non2xx=result.non2xx,
                    socket_errors=sum(result.errors.values()),
                    rss_mib=h.rss_kib(proxy.pid) / 1024,
                    fds=fd_count(proxy.pid),
                    hostile=hostile.sent,
                    probe=probe(proxy.url),
                )
                slices.append(row)
                print(
                    f"slice {index}/{count}: {row.requests} req ({row.rps:.0f}/s, p99 "
                    f"{row.p99_ms:.1f} ms), non-2xx {row.non2xx}, socket errors "
                    f"{row.socket_errors}, hostile {row.hostile}, RSS {row.rss_mib:.1f} MiB, "
                    f"fds {row.fds}, probe {row.probe}",
                    flush=True,
                )
        finally:
            for proc in reversed(procs):
                proc.stop()

    report(slices, start_rss, start_fds, args)


def report(slices: list[Slice], start_rss: float, start_fds: int, args: argparse.Namespace) -> None:
    total = sum(s.requests for s in slices)
    lines = [
        "# Soak: the full chain under load and hostile clients",
        "",
        f"`python benchmarks/soak.py --minutes {args.minutes:g}` at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, revision {h.git_revision()}; "
        f"wrk -c{args.connections} on GET /small in {args.slice:g} s slices, two Go upstreams.",
        "",
        f"Start: RSS {start_rss:.1f} MiB, {start_fds} fds. "
        f"Total: {total} requests, {sum(s.non2xx for s in slices)} non-2xx, "
        f"{sum(s.socket_errors for s in slices)} socket errors, "
        f"{sum(s.hostile for s in slices)} hostile clients.",
        "",
        "| slice | requests | req/s | p99 ms | non-2xx | socket errors | hostile"
        " | RSS MiB | fds | probe |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in slices:
        lines.append(
            f"| {s.index} | {s.requests} | {s.rps:.0f} | {s.p99_ms:.1f} | {s.non2xx} | "
            f"{s.socket_errors} | {s.hostile} | {s.rss_mib:.1f} | {s.fds} | {s.probe} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(h.HERE, "results", "soak.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
