"""``oxypy demo``: two local upstreams (one flaky) behind the full chain.

Upstream A always answers.  Upstream B sends a garbled answer and hangs up
on every third request, so ``Buffer`` retries it on A.  Every cycle the demo
also stages an *outage* (both upstreams drop every request for a few
seconds): retries run out, the breaker trips to its fallback (503), then
recovers.  A traffic greenlet drives a few requests per second, and a
summary line every few seconds shows picks, retries and the breaker state.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import Counter
from typing import Any

import gevent
from gevent.server import StreamServer

__all__ = ["DemoUpstream", "run_demo"]

RETRY = "IsNetworkError() && Attempts() < 3"
BREAKER = "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 5"
CYCLE = 30.0  # seconds: an outage starts OUTAGE_AT into every cycle ...
OUTAGE_AT = 12.0
OUTAGE_FOR = 10.0  # ... and lasts this long
_MAX_HEAD = 65536


class DemoUpstream:
    """A tiny keep-alive HTTP/1.1 server; ``fail_every=n`` garbles every n-th answer."""

    def __init__(self, name: str, *, fail_every: int = 0) -> None:
        self.name = name
        self.fail_every = fail_every
        self.outage = False
        self.count = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.address[1]}"

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def _handle(self, sock: socket.socket, addr: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data or len(buf) > _MAX_HEAD:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                self.count += 1
                if self.outage or (self.fail_every and self.count % self.fail_every == 0):
                    # A garbled answer, then hang up: an invalid response is a
                    # network error for Forward (a silent close of a reused
                    # keep-alive connection would be retried by the pool).
                    sock.sendall(b"oops, not HTTP\r\n\r\n")
                    return
                path = lines[0].split(" ")[1] if " " in lines[0] else "/"
                body = (
                    f"hello from upstream {self.name} ({self.url}), request #{self.count}, "
                    f"path {path}\n"
                ).encode()
                keep = headers.get("connection", "").lower() != "close"
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: %d\r\nConnection: %s\r\n\r\n%s"
                    % (len(body), b"keep-alive" if keep else b"close", body)
                )
                if not keep:
                    return
        except OSError:
            return
        finally:
            sock.close()


class _Stats:
    def __init__(self, names: dict[str, str], echo: bool) -> None:
        self.names = names
        self.echo = echo
        self.statuses: Counter[int] = Counter()
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.retried = 0

    def sink(self, line: str) -> None:
        if self.echo:
            print(line, file=sys.stderr, flush=True)
        try:
            record = json.loads(line)
        except ValueError:
            return
        self.statuses[int(record.get("status", 0))] += 1
        ups = record.get("upstream") or []
        for ex in ups:
            name = self.names.get(ex.get("target", ""), ex.get("target", "?"))
            if ex.get("error"):
                self.failed[name] += 1
            else:
                self.ok[name] += 1
        if len(ups) > 1 and int(record.get("status", 0)) < 500:
            self.retried += 1

    def summary(self, elapsed: float, breaker: str, outage: bool) -> str:
        statuses = " ".join(f"{code}x{n}" for code, n in sorted(self.statuses.items())) or "-"
        picks = ", ".join(
            f"{name}: {self.ok[name]} ok/{self.failed[name]} failed"
            for name in sorted(self.names.values())
        )
        return (
            f"[{elapsed:5.1f}s] responses {statuses} | {picks} | "
            f"saved by a retry: {self.retried} | breaker: {breaker}"
            f"{' | OUTAGE in progress' if outage else ''}"
        )


def _traffic(url: str, stop: gevent.event.Event) -> None:
    import urllib3

    pool = urllib3.PoolManager(retries=False, timeout=5.0)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            pool.request("GET", f"{url}/demo/{n}").release_conn()
        except urllib3.exceptions.HTTPError:
            pass
        stop.wait(0.2)
    pool.clear()


def run_demo(args: argparse.Namespace) -> None:
    """Start the upstreams, the chain and the traffic; stop on SIGTERM/SIGINT."""
    import gevent.event

    from .. import ResponseFallback
    from ..server import Server
    from .chain import build_proxy, server_options

    a = DemoUpstream("A")
    b = DemoUpstream("B (flaky)", fail_every=3)
    stats = _Stats({a.url: "A", b.url: "B (flaky)"}, echo=args.trace)
    chain_args = argparse.Namespace(
        upstreams=[a.url, b.url],
        retry=RETRY,
        breaker=BREAKER,
        breaker_duration=5.0,
        rate=[(50.0, 1.0, 100)],
        conn_limit=50,
        trace=True,
        request_id=True,
        sticky=None,
        sticky_secret=None,
        health_check=None,
        health_interval=10.0,
        eject_after=None,
        trusted_proxy=None,
        least_request=False,
        timeout=5.0,
        pass_host_header=False,
        otel=getattr(args, "otel", False),
    )
    fallback = ResponseFallback(503, body="circuit open: the demo upstreams are having an outage\n")
    proxy = build_proxy(chain_args, trace_sink=stats.sink, fallback=fallback)
    server = Server(proxy.app, args.listen, **server_options(args)).start()
    url = server.url
    print(
        f"oxypy demo: proxy on {url}\n"
        f"  upstream A         {a.url}\n"
        f"  upstream B (flaky) {b.url}  garbles every 3rd answer\n"
        f"  chain: Trace -> RequestID -> ConnLimit(50) -> RateLimit(50/s:100) -> "
        f"CircuitBreaker -> Buffer(retry) -> RoundRobin -> Forward\n"
        f"  retry:   {RETRY}\n"
        f"  breaker: {BREAKER}\n"
        f"  an outage of both upstreams is staged {OUTAGE_AT:.0f}s into every "
        f"{CYCLE:.0f}s cycle, for {OUTAGE_FOR:.0f}s\n"
        f"try:  curl -i {url}/hello     (Ctrl-C to stop)",
        flush=True,
    )
    stop = gevent.event.Event()
    started = time.monotonic()
    workers = []
    if not args.no_traffic:
        workers.append(gevent.spawn(_traffic, url, stop))

    def report() -> None:
        while not stop.wait(args.interval):
            elapsed = time.monotonic() - started
            outage = a.outage
            breaker = str(getattr(proxy.breaker, "state", "?"))
            print(stats.summary(elapsed, breaker, outage), flush=True)

    def stage() -> None:
        while not stop.wait(0.25):
            outage = OUTAGE_AT <= (time.monotonic() - started) % CYCLE < OUTAGE_AT + OUTAGE_FOR
            a.outage = b.outage = outage

    workers.append(gevent.spawn(report))
    workers.append(gevent.spawn(stage))
    try:
        server.serve_forever()
    finally:
        stop.set()
        gevent.joinall(workers, timeout=5)
        gevent.killall(workers, timeout=1)
        proxy.close()
        a.stop()
        b.stop()
        print("oxypy demo: stopped", flush=True)
