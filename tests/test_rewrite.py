"""Rewrite: rule tables in-process, then byte-exact paths at a real upstream."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

import pytest
import urllib3
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from oxypy import Forward
from oxypy.environ import REWRITE_ORIG
from oxypy.exceptions import ConfigurationError
from oxypy.rewrite import Rewrite

from _servers import RawUpstream

HTTP = urllib3.PoolManager(retries=False, timeout=10)

RULES = {
    "/old/*": "/new/$1",
    "/a/*/b/*": "/x/$2/$1",
    "/static/*": "/assets/${1}",
    "/exact": "/other",
    "/js/*": "/public/javascripts/$1",
}
REGEX_RULES = {
    r"^/users/(\d+)$": "/u?id=$1",
    r"^/v1/(\w+)/(\w+)": r"/v2/\2/\1",
    r"/cost$": "/price/$$",
}


def noop(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "0")])
    return [b""]


def run(rw: Rewrite, raw: str, script: str = "") -> dict[str, Any]:
    from urllib.parse import unquote_to_bytes

    path, _, query = raw.partition("?")
    environ: dict[str, Any] = {
        "SCRIPT_NAME": script,
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1")[len(script) :],
        "QUERY_STRING": query,
        "RAW_URI": raw,
    }
    rw.rewrite(environ)
    return environ


@pytest.mark.parametrize(
    ("raw", "path_info", "raw_uri", "query"),
    [
        pytest.param("/old/x", "/new/x", "/new/x", "", id="glob"),
        pytest.param("/old/x/y?q=1", "/new/x/y", "/new/x/y?q=1", "q=1", id="glob-query-kept"),
        pytest.param("/old/", "/new/", "/new/", "", id="glob-empty-capture"),
        pytest.param("/a/1/b/2", "/x/2/1", "/x/2/1", "", id="two-stars"),
        pytest.param("/static/c.css", "/assets/c.css", "/assets/c.css", "", id="braces"),
        pytest.param("/exact", "/other", "/other", "", id="literal"),
        pytest.param("/exact/more", "/exact/more", "/exact/more", "", id="glob-anchored"),
        pytest.param("/x/old/y", "/x/old/y", "/x/old/y", "", id="glob-anchored-start"),
        pytest.param("/old/a%2Fb", "/new/a/b", "/new/a%2Fb", "", id="encoded-slash-kept"),
        pytest.param("/old/x%20y", "/new/x y", "/new/x%20y", "", id="space-kept"),
        pytest.param("/%6Fld/A", "/new/A", "/new/A", "", id="unreserved-escape-normalized"),
        pytest.param("/old/%e2%82%ac", "/new/\xe2\x82\xac", "/new/%E2%82%AC", "", id="utf8"),
        pytest.param("/users/42?z=2", "/u", "/u?id=42&z=2", "id=42&z=2", id="regex-query"),
        pytest.param("/users/42x", "/users/42x", "/users/42x", "", id="regex-anchored"),
        pytest.param("/v1/a/b/c", "/v2/b/a", "/v2/b/a", "", id="backslash-refs"),
        pytest.param("/item/cost", "/price/$", "/price/$", "", id="dollar-literal"),
        pytest.param("/nothing", "/nothing", "/nothing", "", id="no-match"),
        pytest.param("/js/*", "/public/javascripts/*", "/public/javascripts/*", "", id="echo-js"),
    ],
)
def test_rules_table(raw: str, path_info: str, raw_uri: str, query: str) -> None:
    env = run(Rewrite(noop, rules=RULES, regex_rules=REGEX_RULES), raw)
    assert (env["PATH_INFO"], env["RAW_URI"], env["QUERY_STRING"]) == (path_info, raw_uri, query)


@pytest.mark.parametrize(
    ("raw", "path_info", "raw_uri"),
    [
        pytest.param("/proxy/x", "/x", "/x", id="strip"),
        pytest.param("/proxy", "/", "/", id="strip-all"),
        pytest.param("/proxy/", "/", "/", id="strip-slash"),
        pytest.param("/proxy/a?b=c", "/a", "/a?b=c", id="strip-query"),
        pytest.param("/proxyx/a", "/proxyx/a", "/proxyx/a", id="segment-boundary"),
        pytest.param("/proxy/old/1", "/new/1", "/new/1", id="strip-then-rule"),
        pytest.param("/other", "/other", "/other", id="untouched"),
    ],
)
def test_strip_prefix_table(raw: str, path_info: str, raw_uri: str) -> None:
    env = run(Rewrite(noop, rules={"/old/*": "/new/$1"}, strip_prefix="/proxy/"), raw)
    assert (env["PATH_INFO"], env["RAW_URI"]) == (path_info, raw_uri)


def test_first_match_wins_in_insertion_order() -> None:
    rules = [("/a/*", "/first/$1"), ("/a/b", "/second")]
    assert run(Rewrite(noop, rules=rules), "/a/b")["PATH_INFO"] == "/first/b"
    rules.reverse()
    assert run(Rewrite(noop, rules=rules), "/a/b")["PATH_INFO"] == "/second"
    both = Rewrite(noop, rules={"/a/*": "/glob"}, regex_rules={"^/a": "/regex"})
    assert run(both, "/a/b")["PATH_INFO"] == "/glob"


def test_originals_kept_and_script_name_respected() -> None:
    env = run(Rewrite(noop, rules={"/old/*": "/new/$1"}), "/mount%20x/old/q?z=1", script="/mount x")
    assert env["SCRIPT_NAME"] == "/mount x"
    assert env["PATH_INFO"] == "/new/q"
    assert env["RAW_URI"] == "/mount%20x/new/q?z=1"
    assert env[REWRITE_ORIG] == {
        "PATH_INFO": "/old/q",
        "QUERY_STRING": "z=1",
        "RAW_URI": "/mount%20x/old/q?z=1",
    }


def test_no_raw_uri_requoted_and_request_uri_updated() -> None:
    rw = Rewrite(noop, rules={"/old/*": "/new/$1"})
    env: dict[str, Any] = {"PATH_INFO": "/old/a b", "QUERY_STRING": "k=v"}
    assert rw.rewrite(env)
    assert env["RAW_URI"] == "/new/a%20b?k=v" and env["PATH_INFO"] == "/new/a b"
    env = {"PATH_INFO": "/old/z", "QUERY_STRING": "", "REQUEST_URI": "/old/z"}
    rw.rewrite(env)
    assert env["REQUEST_URI"] == env["RAW_URI"] == "/new/z"


def test_stale_raw_uri_is_not_trusted() -> None:
    # PATH_INFO was changed below the server without RAW_URI: the path wins.
    env: dict[str, Any] = {"PATH_INFO": "/old/p", "QUERY_STRING": "", "RAW_URI": "/elsewhere"}
    Rewrite(noop, rules={"/old/*": "/new/$1"}).rewrite(env)
    assert env["RAW_URI"] == "/new/p"


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"regex_rules": {"([": "/x"}}, id="bad-regex"),
        pytest.param({"rules": {"/a/*": "/b/$2"}}, id="glob-missing-group"),
        pytest.param({"regex_rules": {"^/(a)$": r"/\2"}}, id="regex-missing-group"),
        pytest.param({"rules": {"noslash/*": "/x"}}, id="glob-no-slash"),
        pytest.param({"rules": {"/a": "/b c"}}, id="space-in-replacement"),
        pytest.param({"rules": {"": "/b"}}, id="empty-pattern"),
        pytest.param({"rules": [("/a",)]}, id="not-a-pair"),
        pytest.param({"strip_prefix": "proxy"}, id="prefix-no-slash"),
        pytest.param({"strip_prefix": "/"}, id="prefix-root"),
        pytest.param({}, id="nothing-to-do"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Rewrite(noop, **kwargs)


def test_skip() -> None:
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(environ["PATH_INFO"])
        return noop(environ, start_response)

    rw = Rewrite(app, rules={"/old/*": "/new/$1"}, skip=lambda e: "HTTP_X_NO_REWRITE" in e)
    client = Client(LintMiddleware(rw))
    client.get("/old/a", headers={"X-No-Rewrite": "1"}, buffered=True)
    client.get("/old/a", buffered=True)
    assert seen == ["/old/a", "/new/a"]


# -- through real servers: what the upstream receives ------------------------------


def get_raw(url: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client-side normalization)."""
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def recording() -> RawUpstream:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    return RawUpstream(lambda sock, data: sock.sendall(answer))


def request_target(upstream: RawUpstream) -> str:
    return upstream.requests[-1].split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        pytest.param(b"/proxy/a%2Fb?x=%20", "/a%2Fb?x=%20", id="strip-byte-exact"),
        pytest.param(b"/proxy", "/", id="strip-root"),
        pytest.param(b"/proxy/old/%7Euser", "/new/~user", id="rule-normalized"),
        pytest.param(b"/old/a%2fb", "/new/a%2Fb", id="escape-uppercased"),
        pytest.param(b"/users/7?a=b", "/u?id=7&a=b", id="regex-query"),
        pytest.param(b"/plain%3Bx", "/plain%3Bx", id="untouched"),
    ],
)
def test_upstream_sees_rewritten_path(proxy: Any, sent: bytes, received: str) -> None:
    upstream = recording()
    try:
        app = Rewrite(
            Forward(upstream.url),
            rules={"/old/*": "/new/$1"},
            regex_rules={r"^/users/(\d+)$": "/u?id=$1"},
            strip_prefix="/proxy",
        )
        assert get_raw(proxy(app), sent.decode()) == (200, b"ok")
        assert request_target(upstream) == received
    finally:
        upstream.stop()


def test_dispatcher_mount_keeps_full_path(proxy: Any) -> None:
    """werkzeug's DispatcherMiddleware mounts Forward under /api: SCRIPT_NAME is
    "/api" and Forward sends SCRIPT_NAME + PATH_INFO, so the mount is
    transparent and the upstream sees the full path (strip with
    ``Rewrite(strip_prefix=)`` outside the dispatcher, or ``Router(strip=True)``)."""

    def home(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        return [b"home"]

    upstream = recording()
    try:
        app = DispatcherMiddleware(home, {"/api": Forward(upstream.url)})
        url = proxy(app)
        assert HTTP.request("GET", url + "/").data == b"home"
        assert HTTP.request("GET", url + "/api/v1/x%2F?q=1").data == b"ok"
        assert request_target(upstream) == "/api/v1/x%2F?q=1"
        assert len(upstream.requests) == 1
    finally:
        upstream.stop()
