"""CORS: preflights answered by the block, labels on real upstream responses, exact Vary."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import urllib3

from oxypy import CORS, ConfigurationError, Forward

HTTP = urllib3.PoolManager(retries=False, timeout=10)
BODY = b'{"ok": true}\n' * 50
SITE = "https://app.example.com"


class Upstream:
    """Counts requests; answers BODY with a Vary and a CORS header of its own."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        self.count += 1
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(BODY))),
                ("Vary", "Accept-Encoding"),
                ("Access-Control-Allow-Origin", "https://upstream-own.example"),
                ("X-Total", "7"),
            ],
        )
        return [BODY]


def cors_fields(resp: urllib3.BaseHTTPResponse) -> dict[str, str]:
    return {
        k.lower(): v
        for k, v in resp.headers.items()
        if k.lower().startswith("access-control-") or k.lower() == "vary"
    }


@pytest.fixture
def upstream(pywsgi: Any) -> tuple[Upstream, str]:
    app = Upstream()
    return app, pywsgi(app)


def preflight(url: str, origin: str, method: str, headers: str | None = None) -> Any:
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        h["Access-Control-Request-Headers"] = headers
    return HTTP.request("OPTIONS", url + "/api", headers=h)


def test_preflight_allowed_is_answered_by_the_block(proxy: Any, upstream: Any) -> None:
    counter, up = upstream
    app = CORS(
        Forward(up),
        allow_origins=[SITE],
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "X-Token"],
        allow_credentials=True,
        max_age=600,
    )
    url = proxy(app)
    resp = preflight(url, SITE, "DELETE", "authorization, x-token, content-type")
    assert resp.status == 204
    assert resp.data == b""
    assert cors_fields(resp) == {
        "vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        "access-control-allow-origin": SITE,
        "access-control-allow-methods": "GET, POST, DELETE",
        "access-control-allow-headers": "authorization, x-token, content-type",
        "access-control-allow-credentials": "true",
        "access-control-max-age": "600",
    }
    assert counter.count == 0


@pytest.mark.parametrize(
    ("origin", "method", "headers"),
    [
        pytest.param("https://evil.example", "GET", None, id="origin"),
        pytest.param(SITE, "PUT", None, id="method"),
        pytest.param(SITE, "GET", "x-secret", id="header"),
        pytest.param(SITE, "GET", "bad header", id="malformed-header"),
        pytest.param("https://APP.example.com", "GET", None, id="origin-case"),
    ],
)
def test_preflight_refused_has_no_allow_fields(
    proxy: Any, upstream: Any, origin: str, method: str, headers: str | None
) -> None:
    counter, up = upstream
    url = proxy(CORS(Forward(up), allow_origins=[SITE], allow_headers=["X-Token"]))
    resp = preflight(url, origin, method, headers)
    assert resp.status == 204
    assert resp.data == b""
    assert cors_fields(resp) == {
        "vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    }
    assert counter.count == 0


def test_actual_request_gets_labels_and_merged_vary(proxy: Any, upstream: Any) -> None:
    counter, up = upstream
    app = CORS(
        Forward(up),
        allow_origins=[SITE, "https://other.example"],
        expose_headers=["X-Total"],
        allow_credentials=True,
    )
    url = proxy(app)
    resp = HTTP.request("GET", url + "/api", headers={"Origin": SITE})
    assert resp.status == 200
    assert hashlib.sha256(resp.data).digest() == hashlib.sha256(BODY).digest()
    assert cors_fields(resp) == {
        "vary": "Accept-Encoding, Origin",
        "access-control-allow-origin": SITE,  # the upstream's own value replaced
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "X-Total",
    }
    refused = HTTP.request("GET", url + "/api", headers={"Origin": "https://evil.example"})
    assert refused.status == 200
    assert cors_fields(refused) == {"vary": "Accept-Encoding, Origin"}
    plain = HTTP.request("GET", url + "/api")
    assert plain.status == 200
    assert cors_fields(plain) == {
        "vary": "Accept-Encoding, Origin",
        "access-control-allow-origin": "https://upstream-own.example",
    }
    assert counter.count == 3


def test_star_without_credentials_is_literal_and_needs_no_vary(proxy: Any, upstream: Any) -> None:
    _, up = upstream
    url = proxy(CORS(Forward(up), allow_origins=["*"], allow_methods=["*"]))
    resp = HTTP.request("GET", url + "/api", headers={"Origin": "https://any.example"})
    assert cors_fields(resp) == {"vary": "Accept-Encoding", "access-control-allow-origin": "*"}
    pre = preflight(url, "https://any.example", "PATCH")
    assert cors_fields(pre) == {
        "vary": "Access-Control-Request-Method, Access-Control-Request-Headers",
        "access-control-allow-origin": "*",
        "access-control-allow-methods": "PATCH",
    }
    plain = HTTP.request("GET", url + "/api")
    assert plain.headers["Vary"] == "Accept-Encoding"


def test_star_with_credentials_echoes_the_exact_origin(proxy: Any, upstream: Any) -> None:
    _, up = upstream
    url = proxy(CORS(Forward(up), allow_origins=["*"], allow_credentials=True))
    resp = HTTP.request("GET", url + "/api", headers={"Origin": "https://any.example:8443"})
    assert cors_fields(resp) == {
        "vary": "Accept-Encoding, Origin",
        "access-control-allow-origin": "https://any.example:8443",
        "access-control-allow-credentials": "true",
    }
    pre = preflight(url, "null", "POST", "x-anything")
    assert pre.headers.get("Access-Control-Allow-Origin") is None  # header not allowed
    pre = preflight(url, "null", "POST")
    assert pre.headers["Access-Control-Allow-Origin"] == "null"


def test_options_without_request_method_reaches_the_app(proxy: Any, upstream: Any) -> None:
    counter, up = upstream
    url = proxy(CORS(Forward(up), allow_origins=[SITE]))
    resp = HTTP.request("OPTIONS", url + "/api", headers={"Origin": SITE})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == SITE
    assert counter.count == 1


def test_skip_passes_preflights_to_the_app(proxy: Any, upstream: Any) -> None:
    counter, up = upstream
    url = proxy(CORS(Forward(up), allow_origins=[SITE], skip=lambda e: True))
    resp = preflight(url, SITE, "GET")
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://upstream-own.example"
    assert counter.count == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"allow_origins": "*"}, "allow_origins must be a list", id="str"),
        pytest.param({"allow_origins": []}, "at least one origin", id="empty"),
        pytest.param(
            {"allow_origins": ["https://a.example/"]}, "invalid origin 'https://a.example/'", id="/"
        ),
        pytest.param({"allow_origins": ["a.example"]}, "invalid origin 'a.example'", id="bare"),
        pytest.param({"allow_origins": ["ftp://a.example"]}, "invalid origin", id="scheme"),
        pytest.param({"allow_origins": ["http://a:99999"]}, "invalid origin", id="port"),
        pytest.param({"allow_origins": ["*"], "allow_methods": ["G T"]}, "allow_methods", id="m"),
        pytest.param({"allow_origins": ["*"], "allow_headers": "X-A"}, "allow_headers", id="h"),
        pytest.param(
            {"allow_origins": ["*"], "expose_headers": ["*"], "allow_credentials": True},
            "expose_headers",
            id="expose-star-credentials",
        ),
        pytest.param({"allow_origins": ["*"], "max_age": -1}, "max_age", id="max-age"),
        pytest.param(
            {"allow_origins": ["*"], "allow_credentials": "yes"}, "allow_credentials", id="creds"
        ),
    ],
)
def test_bad_configuration_is_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CORS(Forward("http://127.0.0.1:1"), **kwargs)
    assert message in str(info.value)
