"""ConnLimit: oxy's connlimit tests as behaviour, slot release on close, errors and aborts."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import pytest
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import EnvironBuilder

from oxypy.connlimit import ConnLimit, MemoryConnStore
from oxypy.exceptions import ConfigurationError, RequestError
from oxypy.forward import Forward


def hello(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


class Call:
    """One request through a WSGI app, kept open until :meth:`finish`."""

    def __init__(self, app: Any, limit: str | None = "a", path: str = "/") -> None:
        headers = [("Limit", limit)] if limit is not None else []
        self.environ = EnvironBuilder(path=path, headers=headers).get_environ()
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.body = app(self.environ, self.start_response)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        self.status, self.headers = status, headers
        return lambda data: None

    def finish(self) -> bytes:
        try:
            return b"".join(self.body)
        finally:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()


def limited(app: Any = hello, **kw: Any) -> tuple[Any, MemoryConnStore]:
    store = MemoryConnStore()
    kw.setdefault("max_conns", 1)
    kw.setdefault("source", "request.header.Limit")
    return LintMiddleware(ConnLimit(app, store=store, **kw)), store


def test_hit_limit_and_release() -> None:
    app, store = limited()
    first = Call(app, "a")
    assert first.status == "200 OK" and store.in_flight("a") == 1
    second = Call(app, "a")
    assert second.status == "429 Too Many Requests"
    assert second.finish() == b"connection limit reached: 1 in flight\n"
    other = Call(app, "b")
    assert other.status == "200 OK" and other.finish() == b"hello"
    assert first.finish() == b"hello"
    assert store.in_flight("a") == 0 and len(store) == 0
    again = Call(app, "a")
    assert again.status == "200 OK" and again.finish() == b"hello"


def test_429_headers() -> None:
    app, _ = limited(max_conns=0)
    call = Call(app)
    assert call.status == "429 Too Many Requests"
    assert dict(call.headers) == {
        "Content-Type": "text/plain; charset=utf-8",
        "Content-Length": str(len(b"connection limit reached: 0 in flight\n")),
        "Cache-Control": "no-store",
    }
    call.finish()


def test_custom_error_handler() -> None:
    def teapot(environ: Any, start_response: Any, exc: RequestError) -> list[bytes]:
        start_response("418 I'm a teapot", [("Content-Length", "0")])
        return [b""]

    app, _ = limited(max_conns=0, error_handler=teapot)
    call = Call(app)
    assert call.status == "418 I'm a teapot"
    call.finish()


def test_error_from_next_app_releases() -> None:
    def broken(environ: Any, start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("bug")

    app, store = limited(broken)
    with pytest.raises(RuntimeError):
        Call(app)
    assert store.in_flight("a") == 0


def test_error_while_streaming_releases_on_close() -> None:
    def failing(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"part"
        raise RuntimeError("mid-body")

    app, store = limited(failing)
    call = Call(app)
    assert store.in_flight("a") == 1
    with pytest.raises(RuntimeError):
        call.finish()
    assert store.in_flight("a") == 0


def test_close_is_idempotent() -> None:
    app, store = limited(max_conns=2)
    call, other = Call(app), Call(app)
    assert store.in_flight("a") == 2
    call.finish()
    call.body.close()
    assert store.in_flight("a") == 1
    other.finish()


def test_skip_and_missing() -> None:
    app, store = limited(max_conns=0, skip=lambda e: e["PATH_INFO"] == "/health")
    call = Call(app, path="/health")
    assert call.status == "200 OK"
    call.finish()
    app, _ = limited(missing="skip")
    held = [Call(app, None), Call(app, None)]
    assert [c.status for c in held] == ["200 OK", "200 OK"]
    for c in held:
        c.finish()
    app, _ = limited()
    rejected = Call(app, None)
    assert rejected.status == "400 Bad Request"
    rejected.finish()


@pytest.mark.parametrize(
    ("kwargs"),
    [
        pytest.param({"max_conns": -1}, id="negative"),
        pytest.param({"max_conns": 1.5}, id="float"),
        pytest.param({"max_conns": True}, id="bool"),
        pytest.param({"max_conns": 1, "source": "nope"}, id="bad-source"),
        pytest.param({"max_conns": 1, "missing": "pool"}, id="bad-missing"),
    ],
)
def test_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ConnLimit(hello, **kwargs)


# -- over real sockets: a streaming upstream through Forward ---------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(0.01)
    return predicate()


def streaming_upstream(release: threading.Event) -> Any:
    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first\n"
        if environ.get("PATH_INFO") == "/forever":
            for _ in range(500):  # until the proxy notices the client left
                gevent.sleep(0.02)
                yield b"tick\n"
            return
        release.wait(10)
        yield b"last\n"

    return app


def get(url: str, path: str = "/") -> tuple[int, bytes]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_streaming_response_holds_its_slot(proxy: Any, pywsgi: Any) -> None:
    release = threading.Event()
    upstream = pywsgi(streaming_upstream(release))
    store = MemoryConnStore()
    url = proxy(ConnLimit(Forward(upstream), max_conns=1, store=store))
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read1(6) == b"first\n"
        assert store.in_flight("127.0.0.1") == 1
        assert get(url) == (429, b"connection limit reached: 1 in flight\n")
        release.set()
        assert resp.read() == b"last\n"
    finally:
        conn.close()
    assert wait_for(lambda: store.in_flight("127.0.0.1") == 0)
    assert get(url) == (200, b"first\nlast\n")


def test_client_abort_releases_the_slot(proxy: Any, pywsgi: Any) -> None:
    upstream = pywsgi(streaming_upstream(threading.Event()))
    store = MemoryConnStore()
    url = proxy(ConnLimit(Forward(upstream), max_conns=1, store=store))
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"first" in sock.recv(4096)
        assert store.in_flight("127.0.0.1") == 1
    finally:
        sock.close()
    assert wait_for(lambda: store.in_flight("127.0.0.1") == 0)
