"""oxypy.serve's timers and connection cap, against raw sockets and subprocesses.

A head that trickles in gets 408 at its deadline, an idle keep-alive
connection is closed quietly, a stalled upload is cut after ``body_timeout``,
a flood of slow connections beyond ``max_connections`` never keeps a prompt
client from being served, running out of descriptors is one log line (never a
traceback loop), and a request cut at the graceful timeout still gets its
Trace line.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from oxypy.exceptions import ClientDisconnected, ClientGone, ConfigurationError
from oxypy.server import Server

from _servers import raw_request

HEAD = b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n"


def ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["PATH_INFO"].encode("latin-1")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Start an oxypy Server on port 0 with the given options; stopped afterwards."""
    started: list[Server] = []

    def start(app: Any = ok_app, **options: Any) -> Server:
        server = Server(app, "127.0.0.1:0", graceful_timeout=1, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(timeout=1)


def connect(server: Server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(server.address, timeout=timeout)


def read_until_close(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            chunks.append(piece)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def trickle(sock: socket.socket, data: bytes, every: float) -> gevent.Greenlet:
    """Send ``data`` one byte every ``every`` seconds, until it is sent or refused."""

    def run() -> None:
        for i in range(len(data)):
            try:
                sock.sendall(data[i : i + 1])
            except OSError:
                return
            gevent.sleep(every)

    return gevent.spawn(run)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        gevent.sleep(0.01)


# -- header_timeout: a deadline for the whole head ------------------------------


def test_head_sent_one_byte_at_a_time_gets_408_at_the_deadline(serve: Any) -> None:
    server = serve(header_timeout=1.0)
    with connect(server) as sock:
        start = time.monotonic()
        sender = trickle(sock, HEAD, 0.3)  # each read is far under the timeout
        out = read_until_close(sock)
        elapsed = time.monotonic() - start
        sender.kill()
    assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close\r\n" in out
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in out
    assert out.endswith(b"\r\n\r\nrequest head not received within 1 s\n")
    assert 0.9 <= elapsed < 2.5


def test_second_head_on_a_keepalive_connection_has_its_own_deadline(serve: Any) -> None:
    server = serve(header_timeout=1.0, keepalive_timeout=10.0)
    with connect(server) as sock:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"/first")
        start = time.monotonic()
        sender = trickle(sock, HEAD, 0.3)
        out = read_until_close(sock)
        elapsed = time.monotonic() - start
        sender.kill()
    assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 0.9 <= elapsed < 2.5


def test_connection_that_sends_nothing_is_closed_quietly_at_the_deadline(serve: Any) -> None:
    server = serve(header_timeout=0.5)
    with connect(server) as sock:
        start = time.monotonic()
        assert read_until_close(sock) == b""
        assert 0.4 <= time.monotonic() - start < 2.0


def test_idle_keepalive_connection_is_closed_quietly(serve: Any) -> None:
    server = serve(header_timeout=5.0, keepalive_timeout=0.5)
    with connect(server) as sock:
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        assert sock.recv(65536).endswith(b"/one")
        start = time.monotonic()
        assert read_until_close(sock) == b""  # no 408 for a connection between requests
        assert 0.4 <= time.monotonic() - start < 2.0


def test_keepalive_idle_shorter_than_header_timeout_still_serves_prompt_requests(
    serve: Any,
) -> None:
    server = serve(header_timeout=0.3, keepalive_timeout=5.0)
    with connect(server) as sock:
        for i in range(3):
            if i:
                gevent.sleep(0.5)  # idle longer than header_timeout, shorter than keep-alive
            sock.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            assert sock.recv(65536).endswith(b"/%d" % i)


# -- body_timeout ----------------------------------------------------------------


def test_stalled_upload_is_cut_after_body_timeout(serve: Any) -> None:
    seen: list[BaseException] = []
    done = gevent.event.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            environ["wsgi.input"].read(100)
        except BaseException as exc:
            seen.append(exc)
            raise
        finally:
            done.set()
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    server = serve(app, body_timeout=0.5)
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        start = time.monotonic()
        assert done.wait(timeout=5)
        elapsed = time.monotonic() - start
        assert read_until_close(sock) == b""  # nobody left to answer: closed
    assert 0.4 <= elapsed < 2.0
    assert len(seen) == 1 and isinstance(seen[0], ClientGone)
    assert isinstance(seen[0], ClientDisconnected) and seen[0].status == 499


def test_after_a_stalled_body_nothing_is_written_even_if_a_block_answers(serve: Any) -> None:
    answered = gevent.event.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            environ["wsgi.input"].read(100)
        except ClientDisconnected:  # what a block does: answer 499 for the log
            start_response("499 Client Closed Request", [("Content-Length", "5")])
            answered.set()
            return [b"gone\n"]
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    server = serve(app, body_timeout=0.5)
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        start = time.monotonic()
        assert read_until_close(sock) == b""
        assert time.monotonic() - start < 2.0  # not a second body_timeout of draining
    assert answered.is_set()


def test_slow_but_moving_upload_is_not_cut(serve: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read(6)
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    server = serve(app, body_timeout=0.5)
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":  # 1.2 s in all, each byte well within body_timeout
            gevent.sleep(0.2)
            sock.sendall(bytes([byte]))
        assert sock.recv(65536).endswith(b"\r\n\r\nabcdef")


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"header_timeout": 0}, id="header"),
        pytest.param({"keepalive_timeout": -1}, id="keepalive"),
        pytest.param({"body_timeout": 0}, id="body"),
        pytest.param({"header_timeout": float("inf")}, id="header-inf"),
        pytest.param({"body_timeout": float("nan")}, id="body-nan"),
        pytest.param({"max_connections": 0}, id="cap"),
        pytest.param({"graceful_timeout": -1}, id="graceful"),
    ],
)
def test_bad_timer_or_cap_is_a_configuration_error(options: dict[str, Any]) -> None:
    name = next(iter(options))
    with pytest.raises(ConfigurationError, match=name):
        Server(ok_app, "127.0.0.1:0", **options)


def test_app_and_listen_are_positional_and_options_keyword_only() -> None:
    with pytest.raises(TypeError):
        Server(ok_app, "127.0.0.1:0", None)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Server(app=ok_app)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Server(ok_app, listen="127.0.0.1:0")  # type: ignore[call-arg]


def test_read_timeout_is_a_deprecated_alias_of_body_timeout() -> None:
    with pytest.warns(DeprecationWarning, match="body_timeout"):
        server = Server(ok_app, "127.0.0.1:0", read_timeout=3.0)
    assert server.body_timeout == 3.0


# -- max_connections -------------------------------------------------------------


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed ``sock`` (polled without blocking)."""
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(10)


def test_flood_of_slow_connections_beyond_the_cap_never_blocks_a_prompt_client(
    serve: Any,
) -> None:
    server = serve(max_connections=10, header_timeout=30.0)
    flood = []
    try:
        for _ in range(40):
            sock = connect(server)
            sock.sendall(b"GET / HTTP/1.1\r\nHost:")  # and never more
            flood.append(sock)
        start = time.monotonic()
        out = raw_request(server.url, b"GET /legit HTTP/1.1\r\nHost: a\r\n\r\n", timeout=5)
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"/legit")
        assert time.monotonic() - start < 1.0
        # Each newcomer closed the oldest slow head: 30 of the 40 are gone, the
        # newest ones are still open, never more than the cap at once.
        wait_for(lambda: sum(map(closed_by_server, flood)) >= 30)
        assert len(server.connections) <= 10
        assert closed_by_server(flood[0])
        assert not closed_by_server(flood[-1])
    finally:
        for sock in flood:
            sock.close()


def test_idle_keepalive_connections_make_room_before_slow_heads(serve: Any) -> None:
    server = serve(max_connections=2, header_timeout=30.0, keepalive_timeout=30.0)
    with connect(server) as idle, connect(server) as slow:
        idle.sendall(b"GET /idle HTTP/1.1\r\nHost: a\r\n\r\n")
        assert idle.recv(65536).endswith(b"/idle")
        slow.sendall(b"GET / HTTP/1.1\r\n")
        out = raw_request(server.url, b"GET /new HTTP/1.1\r\nHost: a\r\n\r\n", timeout=5)
        assert out.endswith(b"/new")
        idle.settimeout(2)
        assert read_until_close(idle) == b""  # the idle one made room
        slow.sendall(b"Host: a\r\n\r\n")  # the slow head is still served
        slow.settimeout(5)
        assert slow.recv(65536).endswith(b"\r\n\r\n/")


def test_at_the_cap_with_every_connection_in_a_request_new_ones_wait(serve: Any) -> None:
    release = gevent.event.Event()
    entered: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.append(environ["PATH_INFO"])
        release.wait(timeout=10)
        return ok_app(environ, start_response)

    server = serve(app, max_connections=2)
    busy = [connect(server), connect(server)]
    try:
        for i, sock in enumerate(busy):
            sock.sendall(b"GET /busy%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        wait_for(lambda: len(entered) == 2)
        with connect(server) as waiting:  # in the backlog: not accepted, not closed
            waiting.sendall(b"GET /waiting HTTP/1.1\r\nHost: a\r\n\r\n")
            gevent.sleep(0.3)
            assert sorted(entered) == ["/busy0", "/busy1"]
            assert len(server.connections) == 2
            release.set()
            for i, sock in enumerate(busy):
                assert sock.recv(65536).endswith(b"/busy%d" % i)
            waiting.settimeout(5)
            assert waiting.recv(65536).endswith(b"\r\n\r\n/waiting")
    finally:
        release.set()
        for sock in busy:
            sock.close()


# -- descriptors exhausted (subprocess under a low RLIMIT_NOFILE) -------------------

LIMITED_SERVER = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import logging, sys
    from oxypy.server import Server

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    cap = None if sys.argv[1] == "default" else int(sys.argv[1])

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = Server(app, "127.0.0.1:0", max_connections=cap, header_timeout=60,
                    graceful_timeout=1).start()
    print(server.address[1], server.max_connections, flush=True)
    server.serve_forever()
    """
)


def _limit_fds(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return preexec


@pytest.mark.parametrize(
    ("limit", "cap", "flood_size"),
    [
        pytest.param(256, "default", 300, id="default-cap-under-ulimit-256"),
        pytest.param(64, "1000", 120, id="cap-above-ulimit-hits-emfile"),
    ],
)
def test_descriptor_exhaustion_is_survived_without_a_traceback_loop(
    tmp_path: Path, limit: int, cap: str, flood_size: int
) -> None:
    script = tmp_path / "limited_server.py"
    script.write_text(LIMITED_SERVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), cap],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        preexec_fn=_limit_fds(limit),
    )
    flood: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port_text, cap_text = proc.stdout.readline().split()
        address = ("127.0.0.1", int(port_text))
        url = f"http://127.0.0.1:{int(port_text)}"
        for _ in range(flood_size):
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost:")  # a slow head, never finished
            flood.append(sock)
        gevent.sleep(1.5)  # the accept loop meets the limit (and, for EMFILE, backs off)
        request = b"GET /legit HTTP/1.1\r\nHost: a\r\n\r\n"
        start = time.monotonic()
        if cap == "default":
            assert int(cap_text) == 96  # (256 - 64) // 2
            out = raw_request(url, request, timeout=5)  # served during the flood
            assert out.startswith(b"HTTP/1.1 200 OK\r\n"), out
        else:
            for sock in flood:
                sock.close()
            flood = []
            out = raw_request(url, request, timeout=5)  # served once the flood has gone
            assert out.startswith(b"HTTP/1.1 200 OK\r\n"), out
        assert time.monotonic() - start < 3.0
    finally:
        for sock in flood:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        _, err_bytes = proc.communicate(timeout=15)
    err = err_bytes.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    failures = err.count("accept() failed")
    if cap == "default":
        assert failures == 0, err  # the cap keeps the process below its own limit
    else:
        assert 1 <= failures <= 3, err  # one line per episode, not one per accept


# -- the graceful timeout still closes every response iterable ---------------------

GRACEFUL_TRACE_APP = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import sys, gevent
    from oxypy import Trace
    from oxypy.server import Server

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/stuck":
            print("stuck", flush=True)
            gevent.sleep(60)  # an upstream that never answers
        start_response("200 OK", [("Content-Length", str(100 * 65536))])
        print("streaming", flush=True)
        return stream()

    def stream():
        for _ in range(100):
            gevent.sleep(0.1)
            yield b"z" * 65536

    with open(sys.argv[1], "a") as sink:
        trace = Trace(app, sink=sink)
        server = Server(trace, "127.0.0.1:0", graceful_timeout=0.5).start()
        print(server.address[1], flush=True)
        server.serve_forever()
        trace.close()
    """
)


def test_requests_cut_at_the_graceful_timeout_get_their_trace_line(tmp_path: Path) -> None:
    script = tmp_path / "graceful_trace.py"
    script.write_text(GRACEFUL_TRACE_APP)
    lines_file = tmp_path / "trace.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(lines_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        stuck = socket.create_connection(("127.0.0.1", port), timeout=10)
        stuck.sendall(b"GET /stuck HTTP/1.1\r\nHost: a\r\n\r\n")
        assert proc.stdout.readline() == b"stuck\n"
        streaming = socket.create_connection(("127.0.0.1", port), timeout=10)
        streaming.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        assert proc.stdout.readline() == b"streaming\n"
        assert streaming.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert time.monotonic() - start < 5
        assert read_until_close(stuck) == b""
        read_until_close(streaming)
        stuck.close()
        streaming.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err, err
    records = {r["url"]: r for r in map(json.loads, lines_file.read_text().splitlines())}
    assert sorted(records) == ["/stream", "/stuck"]
    assert records["/stuck"]["status"] == 499
    assert records["/stream"]["status"] == 499 and records["/stream"]["status_sent"] == 200
