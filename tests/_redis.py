"""A real redis-server for the tests, and a rate-limited proxy process to run next to it.

``RedisServer`` starts ``redis-server`` on a free loopback port (no
persistence) and stops it by PID.  Run as a script, this module serves
``RateLimit(app, store=RedisStore(url))`` on oxypy's Server in its own process
and prints ``READY <port>`` once it listens; the tests start two of them to
check that one limit holds across processes::

    python tests/_redis.py proxy REDIS_URL AVERAGE BURST [UPSTREAM_URL]
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

REDIS_SERVER = shutil.which("redis-server")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM the process by PID, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


class RedisServer:
    """``redis-server`` on 127.0.0.1:<free port> with no persistence.

    ``extra`` arguments go after the defaults (``--cluster-enabled yes``);
    ``config`` is the text of a config file to start from (a Sentinel's, run
    with ``--sentinel``)."""

    def __init__(
        self, port: int | None = None, extra: tuple[str, ...] = (), config: str | None = None
    ) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self.dir = tempfile.mkdtemp(prefix="oxypy-redis-")
        self.port = port or free_port()
        head = [REDIS_SERVER]
        if config is not None:
            path = os.path.join(self.dir, "redis.conf")
            with open(path, "w") as out:
                out.write(config)
            head = [REDIS_SERVER, path, "--sentinel"]
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [
                *head,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--daemonize",
                "no",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    def stop(self) -> None:
        stop_pid(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_proxy_process(redis_url: str, average: float, burst: int) -> tuple[Any, int]:
    """Start this module as a rate-limited proxy process; returns (Popen, port)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "proxy", redis_url, str(average), str(burst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"proxy process did not start: {line!r}")
        return proc, int(line.split()[1])
    except BaseException:
        stop_pid(proc)
        raise


def _main(argv: list[str]) -> None:
    from gevent import monkey

    monkey.patch_all()

    from oxypy.ratelimit import Rate, RateLimit
    from oxypy.redis import RedisStore
    from oxypy.server import Server

    def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]

    redis_url, average, burst = argv[0], float(argv[1]), int(argv[2])
    app = RateLimit(
        hello,
        rates=[Rate(average, 1.0, burst=burst)],
        source="request.header.X-Client",
        store=RedisStore(redis_url),
    )
    server = Server(app, "127.0.0.1:0", graceful_timeout=1).start()
    sys.stdout.write(f"READY {server.address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        _main(sys.argv[2:])
