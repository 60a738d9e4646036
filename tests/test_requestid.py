"""RequestID: validation table in-process, then the id seen upstream and downstream."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
import urllib3
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from oxypy import Forward
from oxypy.environ import REQUEST_ID, REQUEST_ID_ORIG
from oxypy.exceptions import ConfigurationError
from oxypy.requestid import RequestID, valid_request_id
from oxypy.trace import Trace

from _servers import wait_for

HTTP = urllib3.PoolManager(retries=False, timeout=10)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param("abc-123", True, id="simple"),
        pytest.param("a" * 200, True, id="max-length"),
        pytest.param("a" * 201, False, id="too-long"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="missing"),
        pytest.param("has space", False, id="space"),
        pytest.param("tab\there", False, id="control"),
        pytest.param("caf\xe9", False, id="non-ascii"),
        pytest.param("!~{}[]", True, id="punctuation"),
        pytest.param("del\x7f", False, id="del"),
    ],
)
def test_valid_request_id(value: str | None, ok: bool) -> None:
    assert valid_request_id(value) is ok


def seen_app(seen: list[dict[str, Any]], echo: str | None = None) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen.append(dict(environ))
        headers = [("Content-Type", "text/plain"), ("Content-Length", "2")]
        if echo is not None:
            headers.append(("x-request-id", echo))
        start_response("200 OK", headers)
        return [b"ok"]

    return app


@pytest.mark.parametrize(
    ("incoming", "trust", "expected", "orig"),
    [
        pytest.param("client-id-1", True, "client-id-1", None, id="kept"),
        pytest.param("bad id", True, "minted-1", "bad id", id="invalid-replaced"),
        pytest.param(None, True, "minted-1", None, id="missing-minted"),
        pytest.param("client-id-1", False, "minted-1", "client-id-1", id="untrusted"),
    ],
)
def test_keep_or_mint(incoming: str | None, trust: bool, expected: str, orig: str | None) -> None:
    seen: list[dict[str, Any]] = []
    counter = itertools.count(1)
    app = RequestID(
        seen_app(seen), generator=lambda: f"minted-{next(counter)}", trust_incoming=trust
    )
    headers = {"X-Request-Id": incoming} if incoming is not None else {}
    resp = Client(LintMiddleware(app)).get("/", headers=headers, buffered=True)
    assert resp.headers.getlist("X-Request-Id") == [expected]
    env = seen[0]
    assert env[REQUEST_ID] == expected
    assert env["HTTP_X_REQUEST_ID"] == expected
    assert env.get(REQUEST_ID_ORIG) == orig


def test_upstream_id_replaced_by_ours() -> None:
    seen: list[dict[str, Any]] = []
    app = RequestID(seen_app(seen, echo="upstream-own"), generator=lambda: "ours")
    resp = Client(LintMiddleware(app)).get("/", buffered=True)
    assert resp.headers.getlist("X-Request-Id") == ["ours"]


def test_default_generator_is_uuid_hex() -> None:
    seen: list[dict[str, Any]] = []
    client = Client(LintMiddleware(RequestID(seen_app(seen))))
    ids = {client.get("/", buffered=True).headers["X-Request-Id"] for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_custom_header_name() -> None:
    seen: list[dict[str, Any]] = []
    app = RequestID(seen_app(seen), header="X-Correlation-Id", generator=lambda: "c1")
    resp = Client(LintMiddleware(app)).get("/", buffered=True)
    assert resp.headers["X-Correlation-Id"] == "c1"
    assert seen[0]["HTTP_X_CORRELATION_ID"] == "c1"


def test_bad_generator_output_raises() -> None:
    seen: list[dict[str, Any]] = []
    app = RequestID(seen_app(seen), generator=lambda: "has space")
    with pytest.raises(ConfigurationError):
        Client(app).get("/", buffered=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"header": "X Bad"}, id="space"),
        pytest.param({"header": "X_Under"}, id="underscore"),
        pytest.param({"header": ""}, id="empty"),
        pytest.param({"generator": "uuid"}, id="not-callable"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RequestID(seen_app([]), **kwargs)


def test_skip() -> None:
    seen: list[dict[str, Any]] = []
    app = RequestID(seen_app(seen), skip=lambda e: e["PATH_INFO"] == "/raw")
    resp = Client(LintMiddleware(app)).get("/raw", buffered=True)
    assert "X-Request-Id" not in resp.headers
    assert REQUEST_ID not in seen[0]


def test_id_travels_upstream_downstream_and_into_trace(proxy: Any, echo_upstream: str) -> None:
    lines: list[str] = []
    trace = Trace(RequestID(Forward(echo_upstream)), sink=lines.append)
    url = proxy(trace)
    resp = HTTP.request("GET", url + "/a", headers={"X-Request-Id": "abc.123"})
    doc = json.loads(resp.data)
    assert doc["headers"]["x-request-id"] == "abc.123"
    assert resp.headers.getlist("X-Request-Id") == ["abc.123"]
    minted = HTTP.request("GET", url + "/b", headers={"X-Request-Id": "no good"})
    new_id = minted.headers["X-Request-Id"]
    assert new_id != "no good" and len(new_id) == 32
    assert json.loads(minted.data)["headers"]["x-request-id"] == new_id
    wait_for(lambda: len(lines) == 2)  # Trace writes from its own greenlet
    assert sorted(json.loads(line)["request_id"] for line in lines) == sorted(["abc.123", new_id])
