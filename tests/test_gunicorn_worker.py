"""``gunicorn -k oxypy.gunicorn.Worker``: gunicorn manages the processes, oxypy
serves the connections.

gunicorn runs as a subprocess on a listening socket the test binds to port 0
and hands over as ``-b fd://N`` (no free-port race); upstreams run in the test
process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import psutil
import pytest
import trustme
import urllib3
import websocket
from gevent.pywsgi import WSGIServer
from test_client import CountingUpstream
from test_server import MALFORMED

from _servers import raw_request
from _ws import WSEchoUpstream

HERE = Path(__file__).parent
WORKER = "oxypy.gunicorn.Worker"


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class Gunicorn:
    """``gunicorn -k oxypy.gunicorn.Worker ... _gunicorn_app:APP`` on a socket
    bound here to port 0; ready once it answered a request."""

    def __init__(
        self,
        app: str,
        *options: str,
        workers: int = 1,
        env: dict[str, str] | None = None,
        tls: tuple[Path, Path, trustme.CA] | None = None,
    ) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port: int = listener.getsockname()[1]
        self.scheme = "https" if tls else "http"
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            WORKER,
            "-w",
            str(workers),
            "-b",
            f"fd://{listener.fileno()}",
            "--no-control-socket",
            "--graceful-timeout",
            "5",
            "--chdir",
            str(HERE),
            *options,
        ]
        self.pool = urllib3.PoolManager(retries=False, timeout=10)
        if tls:
            cert, key, ca = tls
            args += ["--certfile", str(cert), "--keyfile", str(key)]
            context = ssl.create_default_context()
            ca.configure_trust(context)
            self.pool = urllib3.PoolManager(retries=False, timeout=10, ssl_context=context)
        self.proc = subprocess.Popen(
            [*args, f"_gunicorn_app:{app}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
            pass_fds=[listener.fileno()],
        )
        listener.close()  # gunicorn holds its own copy
        self.stderr = b""
        try:
            wait_for(self._answers, timeout=20)
        except AssertionError:
            self.stop()
            raise AssertionError(
                f"gunicorn did not start: {self.stderr.decode()[-2000:]}"
            ) from None

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            return True  # reported by the caller's first request
        try:
            self.get("/ready", timeout=1)
            return True
        except urllib3.exceptions.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def get(self, path: str, *, timeout: float = 10, **kw: Any) -> urllib3.BaseHTTPResponse:
        """One request on a fresh connection (``Connection: close``)."""
        headers = {"Connection": "close", **kw.pop("headers", {})}
        return self.pool.request(
            kw.pop("method", "GET"), self.url + path, headers=headers, timeout=timeout, **kw
        )

    def worker_pids(self) -> set[int]:
        return {p.pid for p in psutil.Process(self.proc.pid).children()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.stderr = self.proc.stderr.read()
            self.proc.stderr.close()


@pytest.fixture
def gunicorn() -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(app: str, *options: str, **kw: Any) -> Gunicorn:
        server = Gunicorn(app, *options, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_get_and_post_with_two_workers(gunicorn: Callable[..., Gunicorn]) -> None:
    server = gunicorn("whoami", workers=2)
    resp = server.get("/a?x=1")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/plain"
    pid, scheme, path, length = resp.data.split()
    assert int(pid) in server.worker_pids()
    assert (scheme, path, length) == (b"http", b"/a", b"0")
    body = os.urandom(300_000)
    resp = server.get("/up", method="POST", body=body)
    assert resp.status == 200 and resp.data.split()[1:] == [b"http", b"/up", b"300000"]


def test_pipelined_requests_keep_alive(gunicorn: Callable[..., Gunicorn]) -> None:
    server = gunicorn("whoami")
    two = (
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    out = raw_request(server.url, two, until="close")
    assert out.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert out.index(b" /one 0") < out.index(b" /two 0")


def tls_files(tmp_path: Path) -> tuple[Path, Path, trustme.CA, Path]:
    """A certificate for 127.0.0.1: its file, its key's, its CA and the CA's file."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert_file, key_file, ca, ca_file


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_websocket_echo_through_forward(
    gunicorn: Callable[..., Gunicorn], tmp_path: Path, tls: bool
) -> None:
    # Over TLS the client socket is tunnelled by greenlets (the loop-callback
    # copy, _tunnel/splice.py, takes plain TCP only).
    upstream = WSEchoUpstream()
    try:
        env = {"OXYPY_TEST_UPSTREAM": upstream.url}
        if tls:
            cert_file, key_file, ca, ca_file = tls_files(tmp_path)
            server = gunicorn("forward", env=env, tls=(cert_file, key_file, ca))
            url, sslopt = f"wss://127.0.0.1:{server.port}/ws", {"ca_certs": str(ca_file)}
        else:
            server = gunicorn("forward", env=env)
            url, sslopt = f"ws://127.0.0.1:{server.port}/ws", {}
        ws = websocket.create_connection(url, timeout=5, subprotocols=["chat"], sslopt=sslopt)
        try:
            assert ws.subprotocol == "chat"
            ws.send("hello")
            assert ws.recv() == "hello"
            payload = os.urandom(300_000)
            ws.send_binary(payload)
            assert ws.recv() == payload
        finally:
            ws.close()
        wait_for(lambda: upstream.open_connections == 0, timeout=5)
    finally:
        upstream.stop()


@pytest.mark.parametrize("preload", [False, True])
def test_forward_reuses_one_upstream_connection(
    gunicorn: Callable[..., Gunicorn], preload: bool
) -> None:
    """With ``--preload`` the app (Forward, urllib3) is built in the master,
    before any patching: the worker's pool still keeps its connection alive."""
    upstream = CountingUpstream()
    try:
        options = ("--preload",) if preload else ()
        server = gunicorn("forward", *options, env={"OXYPY_TEST_UPSTREAM": upstream.url})
        # Startup probes abandoned after 1 s may have opened one more.
        opened = upstream.opened
        assert opened >= 1
        for i in range(5):
            resp = server.get(f"/{i}")
            assert (resp.status, resp.data) == (200, b"ok")
        assert (upstream.opened, upstream.closed) == (opened, 0)
    finally:
        upstream.stop()


def test_tls_from_certfile_and_keyfile(gunicorn: Callable[..., Gunicorn], tmp_path: Path) -> None:
    cert_file, key_file, ca, _ = tls_files(tmp_path)
    server = gunicorn("whoami", tls=(cert_file, key_file, ca))
    resp = server.get("/secure", method="POST", body=b"x" * 70_000)
    assert resp.status == 200 and resp.data.split()[1:] == [b"https", b"/secure", b"70000"]


def test_hup_lets_the_slow_request_finish_and_new_workers_serve(
    gunicorn: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    mark = tmp_path / "slow-started"
    server = gunicorn("whoami", workers=2, env={"OXYPY_TEST_MARK": str(mark)})
    old = server.worker_pids()
    assert len(old) == 2
    result: dict[str, Any] = {}

    def slow() -> None:
        resp = server.get("/slow?1.5")
        result["status"], result["data"] = resp.status, resp.data

    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(mark.exists)
    server.proc.send_signal(signal.SIGHUP)
    thread.join(timeout=10)
    assert result["status"] == 200 and int(result["data"].split()[0]) in old
    # The old workers get SIGTERM once the new ones are up; then only new ones serve.
    wait_for(lambda: server.worker_pids().isdisjoint(old) and len(server.worker_pids()) == 2)
    seen = {int(server.get("/after").data.split()[0]) for _ in range(6)}
    assert seen and not seen & old


def test_sigterm_drains_the_request_in_flight_then_exits(
    gunicorn: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    mark = tmp_path / "slow-started"
    server = gunicorn("whoami", env={"OXYPY_TEST_MARK": str(mark)})
    (worker,) = server.worker_pids()
    result: dict[str, Any] = {}

    def slow() -> None:
        resp = server.get("/slow?1.5")
        result["status"], result["data"] = resp.status, resp.data

    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(mark.exists)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=10)
    # The request in flight gets its whole answer from the draining worker...
    assert result["status"] == 200
    assert result["data"].split() == [str(worker).encode(), b"http", b"/slow", b"0"]
    # ...then the master exits cleanly, within the graceful timeout (5 s).
    assert server.proc.wait(timeout=10) == 0


def test_max_requests_recycles_workers_without_failing_a_request(
    gunicorn: Callable[..., Gunicorn],
) -> None:
    server = gunicorn("whoami", "--max-requests", "20", workers=2)
    pids = set()
    statuses = []
    for i in range(70):
        resp = server.get(f"/n{i}")
        statuses.append(resp.status)
        pids.add(int(resp.data.split()[0]))
    assert statuses == [200] * 70
    # 70 requests (plus the readiness probe) at 20 per worker: at least 4 workers served.
    assert len(pids) >= 4


@pytest.mark.parametrize(("request_bytes", "status"), MALFORMED)
def test_strict_parser_answers_like_oxypy_serve(
    gunicorn_trivial: Gunicorn, request_bytes: bytes, status: str
) -> None:
    follow = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    out = raw_request(gunicorn_trivial.url, request_bytes + follow, until="close", timeout=3)
    assert out.startswith(f"HTTP/1.1 {status}\r\n".encode()), out[:80]
    assert b"Connection: close\r\n" in out
    assert out.count(b"HTTP/1.1 ") == 1 and b"seen" not in out


@pytest.fixture(scope="module")
def gunicorn_trivial() -> Iterator[Gunicorn]:
    server = Gunicorn("trivial")
    try:
        yield server
    finally:
        server.stop()


def test_heartbeat_keeps_an_idle_worker_past_the_timeout(
    gunicorn: Callable[..., Gunicorn],
) -> None:
    server = gunicorn("whoami", "--timeout", "2")
    (pid,) = server.worker_pids()
    time.sleep(5)  # 2.5 timeouts of silence
    assert server.worker_pids() == {pid}
    assert int(server.get("/still").data.split()[0]) == pid


def test_access_log_line_per_request(gunicorn: Callable[..., Gunicorn], tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    server = gunicorn(
        "whoami",
        "--access-logfile",
        str(log),
        "--access-logformat",
        '%(m)s %(U)s %(s)s %(B)s "%({user-agent}i)s" %({content-type}o)s',
    )
    server.get("/logged", headers={"User-Agent": "t/1"})
    body = json.dumps({"k": 1}).encode()
    server.get("/posted", method="POST", body=body, headers={"User-Agent": "t/2"})
    # Readiness probes may have logged lines of their own (/ready) before these.
    wait_for(lambda: log.exists() and all(x in log.read_text() for x in ("GET /logged", "POST /")))
    lines = log.read_text().splitlines()
    size = len(server.get("/logged").data)  # the same answer's size
    assert f'GET /logged 200 {size} "t/1" text/plain' in lines
    (posted,) = [line for line in lines if line.startswith("POST /posted ")]
    assert posted.startswith("POST /posted 200 ") and posted.endswith('"t/2" text/plain')


def test_importing_oxypy_does_not_import_gunicorn() -> None:
    code = "import sys, oxypy; print(sorted(m for m in sys.modules if 'gunicorn' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_https_upstream_stays_cooperative(gunicorn: Callable[..., Gunicorn]) -> None:
    """gunicorn's master imports oxypy (and urllib3) before the worker patches:
    a stalled HTTPS upstream answer must not block the worker's other requests."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    stalled = gevent.event.Event()

    def upstream(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/stall":
            stalled.set()
            gevent.sleep(2)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    tls = WSGIServer(("127.0.0.1", 0), upstream, ssl_context=context, log=None, error_log=None)
    tls.start()
    try:
        env = {"OXYPY_TEST_UPSTREAM": f"https://127.0.0.1:{tls.address[1]}"}
        server = gunicorn("forward_insecure", env=env)
        slow = gevent.spawn(server.get, "/stall")
        assert stalled.wait(timeout=10)
        started = time.monotonic()
        resp = server.get("/fast", timeout=5)
        assert resp.status == 200 and resp.data == b"ok"
        assert time.monotonic() - started < 1.0
        assert slow.get(timeout=10).status == 200
    finally:
        tls.stop(timeout=1)


def test_status_page_names_the_worker_it_describes(gunicorn: Callable[..., Gunicorn]) -> None:
    server = gunicorn("status_page", workers=2)
    resp = server.get("/status.json")
    assert resp.status == 200
    process = json.loads(resp.data)["process"]
    assert process["gunicorn_master"] == server.proc.pid
    assert process["pid"] in server.worker_pids()
    page = server.get("/").data.decode()
    assert (
        f'gunicorn worker of <span data-f="process.gunicorn_master" data-t="v">{server.proc.pid}<'
        in page
    )
