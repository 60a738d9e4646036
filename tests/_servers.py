"""Real servers on 127.0.0.1 for the tests: upstream apps, raw sockets, the proxy.

Upstreams run on ``gevent.pywsgi`` (a different HTTP stack from the proxy's
own server, so a bug in one cannot hide in the other) or on raw sockets for
byte-exact and misbehaving peers.  Everything binds port 0 and is stopped by
the fixture that started it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gevent
import urllib3
from gevent.pywsgi import WSGIHandler, WSGIServer
from gevent.server import StreamServer
from werkzeug.middleware.lint import LintMiddleware

from oxypy.server import Server

WSGIApp = Callable[..., Any]

REPO = Path(__file__).resolve().parent.parent
#: The line every serving subcommand prints once it listens.
LISTENING = re.compile(r" on (https?://[\w.\[\]:]+)")
_HTTP = urllib3.PoolManager(retries=False, timeout=10.0)


class _QuietLog:
    def write(self, data: str) -> None:
        pass


class _NoDelayHandler(WSGIHandler):  # type: ignore[misc]
    """pywsgi writes head and body in two sends: without TCP_NODELAY every
    keep-alive response would wait ~40 ms for the proxy's delayed ACK."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, *args, **kwargs)


def start_pywsgi(app: WSGIApp) -> WSGIServer:
    server = WSGIServer(
        ("127.0.0.1", 0),
        app,
        log=_QuietLog(),
        error_log=_QuietLog(),
        handler_class=_NoDelayHandler,
    )
    server.start()
    return server


def url_of(server: Any) -> str:
    host, port = server.address[:2]
    return f"http://{host}:{port}"


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Answers JSON describing the request it received (headers, raw URI, body hash)."""
    body = b""
    if environ.get("CONTENT_LENGTH") or environ.get("wsgi.input_terminated"):
        body = environ["wsgi.input"].read()
    headers = {
        k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")
    }
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["content-length"] = environ["CONTENT_LENGTH"]
    doc = {
        "method": environ["REQUEST_METHOD"],
        "path": environ.get("PATH_INFO"),
        "query": environ.get("QUERY_STRING"),
        "raw_uri": environ.get("RAW_URI") or environ.get("REQUEST_URI"),
        "headers": headers,
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    out = json.dumps(doc).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))]
    )
    return [out]


class RawUpstream:
    """A raw-socket upstream: ``handler(sock, request_bytes)`` plays the server.

    The request head (and as much body as arrived with it) is read first and
    recorded in :attr:`requests`, byte for byte.
    """

    def __init__(self, handler: Callable[[socket.socket, bytes], None]) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def url(self) -> str:
        return url_of(self.server)

    def _handle(self, sock: socket.socket, addr: Any) -> None:
        self.connections += 1
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = sock.recv(65536)
                if not piece:
                    return
                data += piece
            self.requests.append(data)
            self.handler(sock, data)
        except OSError:
            pass
        finally:
            sock.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A listening port whose accept queue is full: a connect to it times out.

    Fillers connect (blocking, short timeout) until one times out, so the
    queue is known to be full before the port is handed out (Linux drops the
    SYNs of a full accept queue).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(64):
            sock = socket.socket()
            sock.settimeout(0.2)
            fillers.append(sock)
            try:
                sock.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            raise AssertionError("the accept queue never filled")
        yield port
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def read_exact_body(sock: socket.socket, data: bytes) -> bytes:
    """Given the bytes read so far, read the rest of a Content-Length body."""
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return body


def proxy_server(app: WSGIApp, lint: bool = True) -> Server:
    """Serve ``app`` (wrapped in LintMiddleware) on the oxypy server, port 0."""
    wrapped = LintMiddleware(app) if lint else app
    return Server(wrapped, "127.0.0.1:0", graceful_timeout=2).start()


class _ResponseEnd:
    """Tells when one HTTP response has fully arrived (llhttp, client side)."""

    def __init__(self, head_request: bool) -> None:
        import httptools

        self.done = False
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.head_done = False

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() >= 200 or self.parser.get_status_code() == 101:
            self.head_done = True

    def on_message_complete(self) -> None:
        if self.head_done:
            self.done = True

    def feed(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.done = True
        except httptools.HttpParserError:
            self.done = True
        if self.head_request and self.head_done:
            self.done = True


def raw_request(url: str, data: bytes, *, timeout: float = 5.0, until: str = "response") -> bytes:
    """Send raw bytes to ``url``; return what came back.

    ``until="response"`` stops after one complete response (or at close),
    ``until="close"`` reads until the server closes the connection.
    """
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    ender = _ResponseEnd(data.startswith(b"HEAD ")) if until == "response" else None
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may have answered and closed before reading it all
        chunks = []
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                chunks.append(piece)
                if ender is not None:
                    ender.feed(piece)
                    if ender.done:
                        break
        except (TimeoutError, ConnectionResetError):
            pass  # a reset after the answer (unread request bytes) ends the read
        return b"".join(chunks)


def stream_sleep(seconds: float) -> Iterator[None]:
    gevent.sleep(seconds)
    yield None


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll ``predicate`` (cooperatively) until it is true; fail the test after ``timeout``.

    The one way tests wait for something to happen: never a bare sleep.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        gevent.sleep(interval)


#: Sockets holding the ports of recent dead_url() calls.  A bound socket that
#: never listens refuses connections and keeps its port from being handed to
#: a server the same test starts next (closing it first let the kernel give
#: that port to the test's own live upstream: dead == live, once in ~600).
_RESERVED: deque[socket.socket] = deque()


def dead_url() -> str:
    """A 127.0.0.1 URL where nothing listens (connection refused), reserved
    until 64 later calls have been made."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _RESERVED.append(sock)
    while len(_RESERVED) > 64:
        _RESERVED.popleft().close()
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


class OxypyProcess:
    """An ``oxypy`` subcommand (``python -m oxypy``), its output in files (no pipe can fill up).

    Starts it and waits for its listening line: ``url`` is the address it serves.
    ``cwd`` joins the repository on ``PYTHONPATH`` (for an app module written there);
    ``env`` adds variables to this process's environment.
    """

    def __init__(
        self, args: list[str], tmp: Path, cwd: Path = REPO, env: Mapping[str, str] | None = None
    ) -> None:
        stamp = time.monotonic_ns()
        self.out_path, self.err_path = tmp / f"out-{stamp}.txt", tmp / f"err-{stamp}.txt"
        env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join([str(REPO), str(cwd)]))
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oxypy", *args], stdout=out, stderr=err, cwd=cwd, env=env
            )
        self.url: str = self.wait_for(lambda: LISTENING.search(self.stdout()))[1]

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
        """``probe()``'s first true value, polled while the process runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = probe()
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.02)
        raise AssertionError(f"not seen: {self.stdout()!r} {self.stderr()!r}")

    def get(self, path: str = "/", **kw: Any) -> urllib3.BaseHTTPResponse:
        return _HTTP.request("GET", self.url + path, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal it by PID; it must exit 0 within ``timeout`` seconds."""
        if self.proc.poll() is not None:
            raise AssertionError(f"died early ({self.proc.returncode}): {self.stderr()}")
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not stop within {timeout} s of signal {sig}") from None
        assert code == 0, self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
