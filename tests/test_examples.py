"""Every file in examples/ runs as a subprocess and answers real requests.

Each example gets a free 127.0.0.1 port and its upstreams through environment
variables, is exercised with real HTTP (and WebSocket) requests, and is
stopped with SIGTERM by PID: exit status 0 within a bounded time.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from _ws import WSEchoUpstream

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
HTTP = urllib3.PoolManager(retries=False, timeout=10.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Example:
    """A running example: its process, its URL and its output (in files)."""

    def __init__(self, cmd: list[str], env: dict[str, str], tmp: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = tmp / f"example-{time.monotonic_ns()}.log"
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(EXAMPLES)]))
        full_env.update(env)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=EXAMPLES, env=full_env, stdout=out, stderr=subprocess.STDOUT
            )
        self._wait_ready()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"never listened:\n{self.output()}")

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> urllib3.BaseHTTPResponse:
        # Connection: close, so no idle keep-alive connection holds a graceful stop.
        headers = {"Connection": "close", **(headers or {})}
        return HTTP.request(method, self.url + path, headers=headers, **kw)

    def stop(self) -> None:
        assert self.proc.poll() is None, self.output()
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"ignored SIGTERM:\n{self.output()}") from None
        assert code == 0, self.output()
        assert time.monotonic() - started < 5


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Example]]:
    started: list[Example] = []

    def start(cmd: list[str], **env: str) -> Example:
        """Run ``cmd`` (``{listen}`` in it becomes the free address) in examples/."""
        port = free_port()
        env.setdefault("OXYPY_LISTEN", f"127.0.0.1:{port}")
        cmd = [part.replace("{listen}", f"127.0.0.1:{port}") for part in cmd]
        example = Example(cmd, env, tmp_path, port)
        started.append(example)
        return example

    try:
        yield start
    finally:
        for example in started:
            if example.proc.poll() is None:
                example.proc.kill()
                example.proc.wait()


def test_every_example_says_how_to_run_it() -> None:
    files = sorted(p for p in EXAMPLES.rglob("*.py") if p.name != "__init__.py")
    assert {p.name for p in files} >= {
        "flask_wrapped.py",
        "flask_behind_proxy.py",
        "django_behind_proxy.py",
        "upstream.py",
        "custom_gateway.py",
        "gateway_app.py",
        "gunicorn.conf.py",
        "websocket_chat.py",
        "wsgi.py",
    }
    for path in files:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, path
        if path.parent == EXAMPLES or path.name in ("wsgi.py", "upstream.py"):
            assert "Run" in doc, path


def test_flask_wrapped(run: Callable[..., Example], echo_upstream: str) -> None:
    pytest.importorskip("flask")
    ex = run([sys.executable, "flask_wrapped.py"], OXYPY_UPSTREAM=echo_upstream)
    try:
        own = ex.request("GET", "/", headers={"X-Request-Id": "flask-1"})
        assert own.status == 200
        assert json.loads(own.data) == {"hello": "from flask", "request_id": "flask-1"}
        assert own.headers["X-Request-Id"] == "flask-1"
        proxied = ex.request("POST", "/api/users?page=2", body=b"x" * 1000)
        assert proxied.status == 200
        doc = json.loads(proxied.data)
        assert (doc["method"], doc["path"], doc["query"]) == ("POST", "/users", "page=2")
        assert doc["body_len"] == 1000
        assert ex.request("GET", "/nowhere").status == 404  # Flask's own 404
    finally:
        ex.stop()
    traced = [json.loads(x) for x in ex.output().splitlines() if x.startswith('{"')]
    assert [(t["method"], t["url"], t["status"]) for t in traced] == [
        ("GET", "/", 200),
        ("POST", "/api/users?page=2", 200),
        ("GET", "/nowhere", 404),
    ]


def test_django_project(run: Callable[..., Example], echo_upstream: str) -> None:
    pytest.importorskip("django")
    cmd = [sys.executable, "-m", "oxypy", "serve", "django_project.wsgi:application"]
    ex = run([*cmd, "--listen", "{listen}"], OXYPY_UPSTREAM=echo_upstream)
    try:
        own = ex.request("GET", "/hello/")
        assert own.status == 200
        doc = json.loads(own.data)
        assert (doc["hello"], doc["path"]) == ("from django", "/hello/")
        assert doc["request_id"] == own.headers["X-Request-Id"] != ""
        proxied = ex.request("GET", "/api/items/7")
        assert proxied.status == 200
        assert json.loads(proxied.data)["path"] == "/items/7"
    finally:
        ex.stop()


def _cookies(resp: urllib3.BaseHTTPResponse) -> dict[str, str]:
    """``name -> full Set-Cookie line`` of a response."""
    return {line.split("=", 1)[0]: line for line in resp.headers.getlist("Set-Cookie")}


def test_django_login_post_under_a_prefix(run: Callable[..., Example]) -> None:
    pytest.importorskip("django")
    ex = run([sys.executable, "django_behind_proxy.py"])
    try:
        form = ex.request("GET", "/app/login/")
        assert form.status == 200
        assert b'action="/app/login/"' in form.data
        csrf = _cookies(form)["csrftoken"]
        assert "; Path=/app/" in csrf  # cookie_path={"/": "/app/"}
        token = csrf.split(";", 1)[0].split("=", 1)[1]
        hidden = form.data.split(b'name="csrfmiddlewaretoken" value="', 1)[1].split(b'"', 1)[0]
        body = f"csrfmiddlewaretoken={hidden.decode()}&user=alice"
        headers = {
            "Cookie": f"csrftoken={token}",
            "Origin": ex.url,
            "Content-Type": "application/x-www-form-urlencoded",
        }
        done = ex.request("POST", "/app/login/", headers=headers, body=body, redirect=False)
        assert done.status == 302, done.data
        assert done.headers["Location"] == ex.url + "/app/welcome/"
        user = _cookies(done)["user"]
        assert "; Path=/app/" in user
        page = ex.request(
            "GET", "/app/welcome/", headers={"Cookie": user.split(";", 1)[0]}, redirect=False
        )
        assert json.loads(page.data) == {
            "welcome": "alice",
            "path": "/app/welcome/",
            "home": "/app/hello/",
        }
        # The origin check still refuses another site.
        headers["Origin"] = "http://evil.example"
        refused = ex.request("POST", "/app/login/", headers=headers, body=body, redirect=False)
        assert refused.status == 403
    finally:
        ex.stop()


def test_flask_login_under_a_prefix(run: Callable[..., Example]) -> None:
    pytest.importorskip("flask")
    ex = run([sys.executable, "flask_behind_proxy.py"])
    try:
        form = ex.request("GET", "/app/")
        assert (form.status, b'action="/app/login"' in form.data) == (200, True)
        done = ex.request(
            "POST",
            "/app/login",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            body="user=alice",
            redirect=False,
        )
        assert done.status == 302
        assert done.headers["Location"] == ex.url + "/app/welcome"
        session = _cookies(done)["session"].split(";", 1)[0]
        page = ex.request("GET", "/app/welcome", headers={"Cookie": session})
        assert json.loads(page.data) == {
            "welcome": "alice",
            "home": ex.url + "/app/",
            "client": "127.0.0.1",
        }
    finally:
        ex.stop()


def test_gunicorn_gevent_http_and_websocket(
    run: Callable[..., Example], echo_upstream: str
) -> None:
    pytest.importorskip("gunicorn")
    websocket = pytest.importorskip("websocket")
    ws_up = WSEchoUpstream()
    try:
        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
        cmd += ["--no-control-socket", "gateway_app:app"]
        ex = run(cmd, OXYPY_UPSTREAMS=echo_upstream, OXYPY_WS_UPSTREAM=ws_up.url)
        try:
            r = ex.request("GET", "/through/gunicorn?x=1")
            assert r.status == 200
            doc = json.loads(r.data)
            assert (doc["path"], doc["query"]) == ("/through/gunicorn", "x=1")
            client = websocket.create_connection(f"ws://127.0.0.1:{ex.port}/ws/echo", timeout=10)
            try:
                client.send("hello through gunicorn")
                assert client.recv() == "hello through gunicorn"
                client.send_binary(b"\x00\x01\x02")
                assert client.recv() == b"\x00\x01\x02"
            finally:
                client.close()
            assert ws_up.requests[0].target == "/ws/echo"
        finally:
            ex.stop()
    finally:
        ws_up.stop()


def test_custom_gateway(run: Callable[..., Example], pywsgi: Callable[[Any], str]) -> None:
    from _servers import echo_app

    up1, up2 = pywsgi(echo_app), pywsgi(echo_app)
    ex = run([sys.executable, "custom_gateway.py"], OXYPY_UPSTREAMS=f"{up1},{up2}")
    try:
        first = ex.request("GET", "/one")
        assert first.status == 200
        assert json.loads(first.data)["headers"]["via"] == "1.1 oxypy"
        cookie = first.headers["Set-Cookie"].split(";", 1)[0]
        assert cookie.startswith("gw=")
        host = json.loads(first.data)["headers"]["host"]
        again = ex.request("GET", "/two", headers={"Cookie": cookie})
        assert json.loads(again.data)["headers"]["host"] == host  # sticky
        other = ex.request("GET", "/three")
        assert json.loads(other.data)["headers"]["host"] != host  # round robin
    finally:
        ex.stop()
    traced = [json.loads(x) for x in ex.output().splitlines() if x.startswith('{"')]
    assert [t["url"] for t in traced] == ["/one", "/two", "/three"]


def test_websocket_chat_broadcast(run: Callable[..., Example]) -> None:
    pytest.importorskip("geventwebsocket")
    websocket = pytest.importorskip("websocket")
    ex = run([sys.executable, "websocket_chat.py"])
    try:
        page = ex.request("GET", "/")
        assert page.status == 200
        assert b"new WebSocket" in page.data
        alice = websocket.create_connection(f"ws://127.0.0.1:{ex.port}/chat", timeout=10)
        bob = websocket.create_connection(f"ws://127.0.0.1:{ex.port}/chat", timeout=10)
        try:
            deadline = time.monotonic() + 10
            # Bob's registration in the room races with Alice's first message: resend
            # until Bob hears one (each message is also echoed back to Alice).
            heard = None
            bob.settimeout(0.5)
            while heard is None:
                assert time.monotonic() < deadline
                alice.send("hi bob")
                try:
                    heard = bob.recv()
                except websocket.WebSocketTimeoutException:
                    continue
            assert heard == "hi bob"
            bob.settimeout(10)
            bob.send("hi alice")
            messages = []
            while "hi alice" not in messages:
                messages.append(alice.recv())
            assert set(messages) <= {"hi bob", "hi alice"}
        finally:
            alice.close()
            bob.close()
    finally:
        ex.stop()
