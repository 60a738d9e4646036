"""The public contract of shared/API.md, exercised as written."""

from __future__ import annotations

import inspect
import io
import json
import socket
from typing import Any

import pytest
import urllib3

import oxypy
from oxypy import (
    Buffer,
    CircuitBreaker,
    ConnLimit,
    Forward,
    Rate,
    RateLimit,
    Rewrite,
    RoundRobin,
    Trace,
)

HTTP = urllib3.PoolManager(retries=False, timeout=10)


def test_the_readme_composition_works_end_to_end(proxy: Any, pywsgi: Any) -> None:
    def named(name: str) -> Any:
        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            body = name.encode()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]

        return app

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    up1, up2 = pywsgi(named("one")), pywsgi(named("two"))
    sink = io.StringIO()

    fwd = Forward()
    lb = RoundRobin(fwd, [up1, up2, dead])
    buf = Buffer(lb, retry="IsNetworkError() && Attempts() < 3")
    cb = CircuitBreaker(buf, "NetworkErrorRatio() > 0.5")
    rl = RateLimit(cb, rates=[Rate(average=100, period=1.0, burst=200)], source="client.ip")
    cl = ConnLimit(rl, max_conns=100, source="client.ip")
    app = Trace(cl, sink=sink)

    url = proxy(app)
    bodies = [HTTP.request("GET", url + "/x").data for _ in range(9)]
    # Every request succeeds: the dead server's turns are retried elsewhere.
    assert sorted(set(bodies)) == [b"one", b"two"]
    app.close()
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert len(lines) == 9 and all(line["status"] == 200 for line in lines)
    assert any(line["attempts"] == 2 for line in lines)


def test_forward_without_target_answers_500(proxy: Any) -> None:
    resp = HTTP.request("GET", proxy(Forward()) + "/")
    assert resp.status == 500 and resp.headers["Content-Type"].startswith("text/plain")


MIDDLEWARE = [
    oxypy.Buffer,
    oxypy.CircuitBreaker,
    oxypy.ConnLimit,
    oxypy.LeastRequest,
    oxypy.RateLimit,
    oxypy.Rebalancer,
    oxypy.RequestID,
    oxypy.Rewrite,
    oxypy.RoundRobin,
    oxypy.Trace,
]


@pytest.mark.parametrize("block", MIDDLEWARE, ids=lambda b: b.__name__)
def test_every_middleware_takes_next_first_and_skip_keyword_only(block: Any) -> None:
    params = list(inspect.signature(block).parameters.values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_ONLY
    assert params[-1].name == "skip" or any(p.name == "skip" for p in params)
    skip = next(p for p in params if p.name == "skip")
    assert skip.kind is inspect.Parameter.KEYWORD_ONLY and skip.default is None


def test_skip_passes_straight_to_next(proxy: Any, echo_upstream: str) -> None:
    # Rewrite would send /old to /new; skipped for requests carrying X-Skip.
    app = Rewrite(
        Forward(echo_upstream),
        {"/old": "/new"},
        skip=lambda environ: "HTTP_X_SKIP" in environ,
    )
    url = proxy(app)
    assert json.loads(HTTP.request("GET", url + "/old").data)["path"] == "/new"
    skipped = HTTP.request("GET", url + "/old", headers={"X-Skip": "1"})
    assert json.loads(skipped.data)["path"] == "/old"


def test_public_names_are_exported() -> None:
    for name in oxypy.__all__:
        assert getattr(oxypy, name) is not None, name
    for name in ("PredicateError", "ConfigurationError", "OxypyError", "serve", "Server"):
        assert name in oxypy.__all__
    assert issubclass(oxypy.ConfigurationError, ValueError)
    assert issubclass(oxypy.PredicateError, oxypy.ConfigurationError)


def test_malformed_predicate_names_the_position() -> None:
    with pytest.raises(oxypy.PredicateError) as info:
        Buffer(Forward("http://127.0.0.1:1"), retry="IsNetworkError() && Attempts( < 2")
    assert info.value.position == 30  # the "<" where ")" was due
    assert "^" in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda nxt, skip: oxypy.RoundRobin(nxt, ["http://a:1"], skip=skip), id="rr"),
        pytest.param(
            lambda nxt, skip: oxypy.LeastRequest(nxt, ["http://a:1"], skip=skip), id="least"
        ),
    ],
)
def test_skip_on_balancers_bypasses_the_pick(proxy: Any, make: Any) -> None:
    seen: list[str | None] = []

    def record(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ.get("oxypy.target"))
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    url = proxy(make(record, lambda environ: "HTTP_X_SKIP" in environ))
    assert HTTP.request("GET", url + "/").status == 200
    assert HTTP.request("GET", url + "/", headers={"X-Skip": "1"}).status == 200
    assert seen == ["http://a:1", None]
