"""Router: host and path-prefix dispatch, in-process tables and through Forward."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

import pytest
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from oxypy import Forward
from oxypy.exceptions import ConfigurationError
from oxypy.router import Router

from _servers import RawUpstream


def named(name: str) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = json.dumps(
            {"app": name, "script": environ["SCRIPT_NAME"], "path": environ["PATH_INFO"]}
        ).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


ROUTER = Router(
    [
        (None, "/api", named("api")),
        (None, "/api/v2", named("api-v2")),
        ("admin.example.com", "/", named("admin")),
        ("*.example.com", "/api", named("wild-api")),
        (None, "/", named("root")),
    ]
)


@pytest.mark.parametrize(
    ("host", "path", "app", "script", "rest"),
    [
        pytest.param("x.org", "/api/users", "api", "/api", "/users", id="prefix"),
        pytest.param("x.org", "/api", "api", "/api", "", id="prefix-exact"),
        pytest.param("x.org", "/apix", "root", "", "/apix", id="segment-boundary"),
        pytest.param("x.org", "/api/v2/a", "api-v2", "/api/v2", "/a", id="longest-prefix"),
        pytest.param("admin.example.com:8080", "/api/x", "admin", "", "/api/x", id="host-wins"),
        pytest.param("ADMIN.example.com", "/", "admin", "", "/", id="host-case"),
        pytest.param("a.b.example.com", "/api/q", "wild-api", "/api", "/q", id="wildcard"),
        pytest.param("example.com", "/api/q", "api", "/api", "/q", id="wildcard-not-apex"),
        pytest.param("x.org", "/", "root", "", "/", id="root"),
    ],
)
def test_dispatch_table(host: str, path: str, app: str, script: str, rest: str) -> None:
    resp = Client(LintMiddleware(ROUTER)).get(path, headers={"Host": host}, buffered=True)
    assert resp.status_code == 200
    assert resp.json == {"app": app, "script": script, "path": rest}


def test_no_route_is_404_or_default() -> None:
    router = Router([("only.example.com", "/", named("only"))])
    resp = Client(LintMiddleware(router)).get("/", headers={"Host": "x"}, buffered=True)
    assert resp.status_code == 404
    assert resp.data == b"no route for this request\n"
    with_default = Router([("only.example.com", "/", named("only"))], default=named("fallback"))
    resp = Client(LintMiddleware(with_default)).get("/z", buffered=True)
    assert resp.json == {"app": "fallback", "script": "", "path": "/z"}


@pytest.mark.parametrize(
    "routes",
    [
        pytest.param([(None, "api", named("a"))], id="prefix-no-slash"),
        pytest.param([("bad host", "/", named("a"))], id="bad-host"),
        pytest.param([(None, "/")], id="not-a-triple"),
        pytest.param([(None, "/", "not-callable")], id="not-callable"),
        pytest.param([], id="empty"),
    ],
)
def test_configuration_errors(routes: Any) -> None:
    with pytest.raises(ConfigurationError):
        Router(routes)


def test_forward_mounted_full_path_or_stripped(proxy: Any) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    upstream = RawUpstream(lambda sock, data: sock.sendall(answer))
    try:
        mounted = proxy(Router([(None, "/api", Forward(upstream.url))], default=named("home")))
        stripped = proxy(Router([(None, "/api", Forward(upstream.url))], strip=True))
        got = []
        for url, target in [(mounted, "/api/a%2Fb?q=1"), (stripped, "/api/a%2Fb?q=1")]:
            host, port = url.split("//", 1)[1].split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", target)
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"ok")
            conn.close()
            got.append(upstream.requests[-1].split(b"\r\n", 1)[0])
        assert got == [b"GET /api/a%2Fb?q=1 HTTP/1.1", b"GET /a%2Fb?q=1 HTTP/1.1"]
    finally:
        upstream.stop()


CONDITIONAL = Router(
    [
        (None, "/x", named("any")),
        (None, "/x", named("delete"), {"methods": ["delete"]}),
        (None, "/x", named("canary"), {"headers": {"X-Canary": "1"}}),
        (None, "/x", named("both"), {"methods": ["POST"], "headers": {"X-Canary": "1"}}),
        (None, "/s", named("stripped"), {"strip": True}),
    ]
)


@pytest.mark.parametrize(
    ("method", "headers", "path", "app", "script", "rest"),
    [
        pytest.param("GET", {}, "/x/1", "any", "/x", "/1", id="no-condition"),
        pytest.param("DELETE", {}, "/x/1", "delete", "/x", "/1", id="method"),
        pytest.param("GET", {"X-Canary": "1"}, "/x/1", "canary", "/x", "/1", id="header"),
        pytest.param("GET", {"X-Canary": "2"}, "/x/1", "any", "/x", "/1", id="header-value"),
        pytest.param("POST", {"X-Canary": "1"}, "/x", "both", "/x", "", id="method-and-header"),
        pytest.param("POST", {}, "/x", "any", "/x", "", id="falls-through"),
        pytest.param("GET", {}, "/s/a", "stripped", "", "/a", id="per-route-strip"),
    ],
)
def test_method_header_and_strip_conditions(
    method: str, headers: dict[str, str], path: str, app: str, script: str, rest: str
) -> None:
    resp = Client(LintMiddleware(CONDITIONAL)).open(
        path, method=method, headers=headers, buffered=True
    )
    assert resp.status_code == 200
    assert json.loads(resp.data) == {"app": app, "script": script, "path": rest}


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        (
            {"method": ["GET"]},
            "Router: unknown route match key 'method' (expected methods, headers, strip)",
        ),
        ({"methods": "GET"}, "Router: methods must be a list of strings"),
        ({"methods": []}, "Router: methods must not be empty"),
        ({"headers": {"X": 1}}, "Router: headers must map names to string values"),
        ({"headers": {"X Y": "1"}}, "Router: invalid header name 'X Y'"),
        ({"strip": "yes"}, "Router: strip must be true or false"),
    ],
)
def test_bad_conditions_are_configuration_errors(conditions: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Router([(None, "/", named("a"), conditions)])
    assert str(info.value) == message
