"""A fleet of real processes sharing one RedisRegistry: two gunicorn ``-k gevent -w 2``
instances on their own ports, one redis-server, ``oxypy servers`` as a subprocess.

Workers are told apart by the ``X-Worker-Pid`` header of ``_gunicorn_app:fleet()``;
requests go over fresh connections until two workers of each instance have
answered after the deadline, and every answer after it must come from the
expected upstream.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gevent
import pytest
import redis

from _redis import REDIS_SERVER, RedisServer, free_port, stop_pid
from _servers import wait_for

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")

HERE = Path(__file__).parent
ROOT = HERE.parent


class Upstream:
    """Answers its label; ``/healthz`` answers ``health`` (a status line)."""

    def __init__(self, label: str) -> None:
        self.label = label.encode()
        self.health = "200 OK"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/healthz":
            start_response(self.health, [("Content-Length", "0")])
            return []
        start_response("200 OK", [("Content-Length", str(len(self.label)))])
        return [self.label]


class Fleet:
    """Two gunicorn instances (``-k gevent -w 2``) following registry ``name``."""

    def __init__(self, redis_url: str, name: str, seed: str, health: bool = False) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OXYPY_TEST_REDIS": redis_url,
            "OXYPY_TEST_REGISTRY": name,
            "OXYPY_TEST_UPSTREAM": seed,
            "OXYPY_TEST_HEALTH": "1" if health else "",
        }
        try:
            for _ in range(2):
                port = free_port()
                self.ports.append(port)
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "gunicorn",
                            "-k",
                            "gevent",
                            "-w",
                            "2",
                            "-b",
                            f"127.0.0.1:{port}",
                            "--no-control-socket",
                            "--graceful-timeout",
                            "2",
                            "--chdir",
                            str(HERE),
                            "_gunicorn_app:fleet()",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        env=env,
                    )
                )
            for port in self.ports:
                wait_for(lambda port=port: self.answers(port), timeout=30, interval=0.1)  # type: ignore[misc]
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def answers(port: int) -> bool:
        try:
            ask(port)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        for proc in self.procs:  # both at once, then wait for each
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            stop_pid(proc, timeout=10)


def ask(port: int) -> tuple[str, int, bytes]:
    """One GET / over a fresh connection: (worker pid, status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.getheader("X-Worker-Pid") or "", resp.status, resp.read()
    finally:
        conn.close()


def routes_to(fleet: Fleet, body: bytes, since: float, within: float = 1.0) -> dict[str, float]:
    """Every answer later than ``since + within`` is 200 ``body``, from every worker.

    Sends requests over fresh connections (four at a time) until two workers
    of each instance have answered after that point (at most 20 s).  Returns,
    per worker pid, when its last other answer came (seconds after ``since``).
    """
    point = since + within
    after: dict[int, set[str]] = {port: set() for port in fleet.ports}
    last_other: dict[str, float] = {}
    wrong: list[tuple[str, int, bytes, float]] = []
    deadline = time.monotonic() + 20

    def client(port: int) -> None:
        while time.monotonic() < deadline and not all(len(p) >= 2 for p in after.values()):
            sent = time.monotonic()
            pid, status, data = ask(port)
            if (status, data) != (200, body):
                last_other[pid] = max(last_other.get(pid, 0.0), sent - since)
            if sent >= point:
                after[port].add(pid)
                if (status, data) != (200, body):
                    wrong.append((pid, status, data, sent - since))

    gevent.joinall([gevent.spawn(client, port) for port in fleet.ports * 2], raise_error=True)
    assert not wrong, wrong
    assert all(len(pids) >= 2 for pids in after.values()), after
    return last_other


#: What the ``oxypy`` console script runs (``python -m oxypy`` re-executes once).
OXYPY = "import sys, _oxypy_cli; sys.argv[0] = 'oxypy'; sys.exit(_oxypy_cli.main())"


def servers(redis_url: str, name: str, *argv: str) -> str:
    """``oxypy servers ...`` as its own process; its stdout (exit status 0)."""
    done = subprocess.run(
        [sys.executable, "-c", OXYPY, "servers", *argv, "--redis", redis_url, "--name", name],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def upstreams(pywsgi: Any) -> dict[str, tuple[Upstream, str]]:
    out = {}
    for label in ("a", "b", "c"):
        up = Upstream(label)
        out[label] = (up, pywsgi(up))
    return out


def test_servers_command_reaches_every_worker_then_redis_restarts(
    upstreams: dict[str, tuple[Upstream, str]],
) -> None:
    port = free_port()
    server = RedisServer(port)
    fleet = None
    try:
        a, b, c = (upstreams[k][1] for k in "abc")
        fleet = Fleet(server.url, "api", a)
        routes_to(fleet, b"a", time.monotonic(), within=0)
        servers(server.url, "api", "add", b)
        servers(server.url, "api", "drain", a)
        routes_to(fleet, b"b", time.monotonic())  # every worker of both, within 1 s
        listing = servers(server.url, "api", "list").splitlines()
        assert [line.split() for line in listing[1:3]] == sorted(
            [[a, "1", "draining", "-"], [b, "1", "active", "-"]]
        )
        # Redis stops: every worker keeps routing on the last set.
        server.stop()
        routes_to(fleet, b"b", time.monotonic(), within=0)
        # Redis is back, empty: the workers seed it again with that set and follow it.
        server = RedisServer(port)
        client = redis.Redis.from_url(server.url)
        wait_for(lambda: client.exists("oxypy:registry:{api}") == 1, timeout=10)
        client.close()
        servers(server.url, "api", "add", c)
        servers(server.url, "api", "drain", b)
        routes_to(fleet, b"c", time.monotonic())
    finally:
        if fleet is not None:
            fleet.stop()
        server.stop()


def test_the_prober_killed_another_takes_over(
    upstreams: dict[str, tuple[Upstream, str]],
) -> None:
    server = RedisServer()
    fleet = None
    client = redis.Redis.from_url(server.url)
    try:
        (up_a, a), (up_b, b) = upstreams["a"], upstreams["b"]
        fleet = Fleet(server.url, "api", a, health=True)
        servers(server.url, "api", "add", b)

        def prober() -> str:
            holder = client.get("oxypy:registry:{api}:prober")
            return holder.decode() if isinstance(holder, bytes) else ""

        wait_for(lambda: prober() != "", timeout=10)
        first = prober()
        up_a.health = "503 Service Unavailable"  # only the prober sees it; all must follow
        routes_to(fleet, b"b", time.monotonic())
        os.kill(int(first.split(":")[1]), signal.SIGKILL)  # gunicorn starts another worker
        wait_for(lambda: prober() not in ("", first), timeout=10)
        up_a.health = "200 OK"
        up_b.health = "503 Service Unavailable"
        routes_to(fleet, b"a", time.monotonic())  # the new prober's verdicts reach everyone
    finally:
        client.close()
        if fleet is not None:
            fleet.stop()
        server.stop()
