"""The public contract of shared/API.md, exercised as written."""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import json
import pkgutil
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import prometheus_client
import pytest
import urllib3
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

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
    oxypy.CORS,
    oxypy.CircuitBreaker,
    oxypy.Compress,
    oxypy.ConnLimit,
    oxypy.ConsistentHash,
    oxypy.ForwardAuth,
    oxypy.Headers,
    oxypy.Hedge,
    oxypy.IPAllowList,
    oxypy.LeastRequest,
    oxypy.Mirror,
    oxypy.OpenTelemetry,
    oxypy.PrometheusMetrics,
    oxypy.RateLimit,
    oxypy.Rebalancer,
    oxypy.RequestID,
    oxypy.Rewrite,
    oxypy.RoundRobin,
    oxypy.Router,
    oxypy.Timeout,
    oxypy.Trace,
]
#: WSGI apps that end a chain: they have no next app, hence no ``skip``.
TERMINAL = [
    oxypy.Forward,
    oxypy.Gateway,
    oxypy.RedirectFallback,
    oxypy.ResponseFallback,
    oxypy.StatusPage,
]


@pytest.mark.parametrize("block", MIDDLEWARE, ids=lambda b: b.__name__)
def test_every_middleware_takes_next_first_and_skip_keyword_only(block: Any) -> None:
    params = list(inspect.signature(block).parameters.values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_ONLY
    skip = next(p for p in params if p.name == "skip")
    assert skip.kind is inspect.Parameter.KEYWORD_ONLY and skip.default is None


def elsewhere(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("410 Gone", [("Content-Length", "0")])
    return [b""]


# Each built so that, were skip ignored, the requests below would be changed or
# answered differently (Router: /x is routed elsewhere; skip sends to default).
SKIPPABLE = [
    pytest.param(
        lambda nxt, skip, sink: oxypy.Buffer(nxt, retry="Attempts() < 3", skip=skip), id="Buffer"
    ),
    pytest.param(
        lambda nxt, skip, sink: oxypy.CircuitBreaker(nxt, "NetworkErrorRatio() > 0.5", skip=skip),
        id="CircuitBreaker",
    ),
    pytest.param(
        lambda nxt, skip, sink: oxypy.ConnLimit(
            nxt, max_conns=1, source="request.header.X-Absent", missing="reject", skip=skip
        ),
        id="ConnLimit",
    ),
    pytest.param(
        lambda nxt, skip, sink: oxypy.OpenTelemetry(nxt, trust_incoming=True, skip=skip),
        id="OpenTelemetry",
    ),
    pytest.param(
        lambda nxt, skip, sink: oxypy.PrometheusMetrics(
            nxt, registry=prometheus_client.CollectorRegistry(), skip=skip
        ),
        id="PrometheusMetrics",
    ),
    pytest.param(
        lambda nxt, skip, sink: oxypy.RateLimit(nxt, rates=[Rate(1)], skip=skip), id="RateLimit"
    ),
    pytest.param(lambda nxt, skip, sink: oxypy.RequestID(nxt, skip=skip), id="RequestID"),
    pytest.param(
        lambda nxt, skip, sink: oxypy.Rewrite(nxt, rules={"/x": "/y"}, skip=skip), id="Rewrite"
    ),
    pytest.param(
        lambda nxt, skip, sink: oxypy.Router([(None, "/x", elsewhere)], default=nxt, skip=skip),
        id="Router",
    ),
    pytest.param(lambda nxt, skip, sink: oxypy.Trace(nxt, sink=sink.append, skip=skip), id="Trace"),
]


@pytest.mark.parametrize("make", SKIPPABLE)
def test_skip_hands_the_request_on_untouched(proxy: Any, make: Any) -> None:
    """With skip true, next sees what it would see unwrapped and the client gets its answer."""
    seen: list[dict[str, Any]] = []

    def record(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append({k: v for k, v in environ.items() if isinstance(v, str)})
        seen[-1]["keys"] = sorted(environ)
        start_response("200 OK", [("Content-Length", "2"), ("X-Next", "1")])
        return [b"ok"]

    traced: list[str] = []
    direct = proxy(record)
    wrapped_app = make(record, lambda environ: True, traced)
    wrapped = proxy(wrapped_app)
    answers = []
    for url in (direct, wrapped):
        for _ in range(3):  # a limit of 1 would show on the second request
            resp = HTTP.request("GET", url + "/x", headers={"X-Request-Id": "id-1"})
            answers.append((resp.status, resp.data, sorted(set(resp.headers) - {"Date"})))
    assert answers[3:] == answers[:3]
    assert answers[0] == (200, b"ok", ["Content-Length", "X-Next"])
    volatile = {"REMOTE_PORT", "SERVER_PORT", "HTTP_HOST"}
    plain = [{k: v for k, v in env.items() if k not in volatile} for env in seen]
    assert plain[3:] == plain[:3] and plain[0]["PATH_INFO"] == "/x"
    close = getattr(wrapped_app, "close", None)
    if close is not None:
        close()  # Trace: flush its writer
    assert traced == []


def test_skip_passes_straight_to_next(proxy: Any, echo_upstream: str) -> None:
    # Rewrite would send /old to /new; skipped for requests carrying X-Skip.
    app = Rewrite(
        Forward(echo_upstream),
        rules={"/old": "/new"},
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
        pytest.param(
            lambda nxt, skip: oxypy.ConsistentHash(nxt, ["http://a:1"], skip=skip), id="chash"
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


# -- the curated public API ------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_API = (ROOT / "docs" / "public-api.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = PUBLIC_API.index(f"## {title}\n")
    end = PUBLIC_API.find("\n## ", start + 1)
    return PUBLIC_API[start : end if end >= 0 else None]


def documented_package_names() -> list[str]:
    """The names of the group bullets under "The `oxypy` package", in order."""
    section = _section("The `oxypy` package").split("\n### ")[0]
    names: list[str] = []
    for bullet in re.split(r"\n- ", section)[1:]:
        _, _, listed = bullet.partition(":")
        names += re.findall(r"`(\w+)`", listed.split("\n\n")[0])
    return names


def documented_modules() -> dict[str, list[str]]:
    rows = re.findall(r"^\| `(oxypy\.\w+)` \| (.+) \|$", _section("Public modules"), re.M)
    return {module: re.findall(r"`(\w+)`", names) for module, names in rows}


def public_modules() -> list[str]:
    import oxypy as package

    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    return sorted(f"oxypy.{name}" for name in names if name not in ("cli", "metrics"))


def test_package_all_is_the_documented_list() -> None:
    documented = documented_package_names()
    assert len(documented) == len(set(documented))
    assert oxypy.__all__ == documented


def test_every_public_module_all_is_documented() -> None:
    documented = documented_modules()
    assert sorted(documented) == public_modules()
    for module, names in documented.items():
        assert sorted(importlib.import_module(module).__all__) == sorted(names), module


@pytest.mark.parametrize(
    ("module", "name"),
    [
        pytest.param("oxypy.ratelimit", "go_duration", id="go_duration"),
        pytest.param("oxypy.extractors", "make_extractor", id="make_extractor"),
        pytest.param("oxypy.extractors", "Source", id="Source"),
        pytest.param("oxypy.rewrite", "rewrite_path", id="rewrite_path"),
        pytest.param("oxypy.requestid", "valid_request_id", id="valid_request_id"),
        pytest.param("oxypy.rebalancer", "split_float64", id="split_float64"),
        pytest.param("oxypy.server", "parse_listen", id="parse_listen"),
        pytest.param("oxypy.errors", "respond_error", id="respond_error"),
        pytest.param("oxypy.buffer", "should_retry", id="should_retry"),
        pytest.param("oxypy.cbreaker", "ResponseFallback", id="cbreaker.ResponseFallback"),
    ],
)
def test_names_that_left_all_stay_importable(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    assert name not in mod.__all__
    assert callable(getattr(mod, name))


def _public_classes() -> list[type]:
    found = []
    for name in oxypy.__all__:
        obj = getattr(oxypy, name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        if getattr(obj, "_is_protocol", False):  # a Protocol a user implements
            continue
        found.append(obj)
    return found


#: Records the library builds, each field a positional argument by nature.
RECORDS = {oxypy.Exchange, oxypy.OutgoingRequest, oxypy.ResponseHead, oxypy.Predicate}
RECORDS.add(oxypy.Verdict)
#: ``Rate(average, period)`` reads as one pair; ``RedisRegistry(url, name, /)``
#: is API.md's binding shape (where, and which registry there).
PAIRS = {oxypy.Rate, oxypy.RedisRegistry}


@pytest.mark.parametrize(
    "cls",
    [pytest.param(cls, id=cls.__name__) for cls in _public_classes() if cls not in RECORDS],
)
def test_constructors_follow_the_rule(cls: type) -> None:
    """Next app positional-only, at most one core positional argument, options keyword-only."""
    params = list(inspect.signature(cls).parameters.values())
    kinds = [p.kind for p in params]
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if cls in MIDDLEWARE or cls in (oxypy.Forward, oxypy.Server):
        assert positional and positional[0].kind is inspect.Parameter.POSITIONAL_ONLY
        assert len(positional) <= (1 if cls is oxypy.Forward else 2)
        assert all(p.kind is inspect.Parameter.POSITIONAL_ONLY for p in positional)
    else:
        assert len(positional) <= (2 if cls in PAIRS else 1)


def test_every_wsgi_class_is_a_middleware_or_terminal() -> None:
    """A new block cannot escape the ``skip`` check above by being left off its list."""
    for cls in _public_classes():
        call = next((vars(k)["__call__"] for k in cls.__mro__ if "__call__" in vars(k)), None)
        if call is None or cls in RECORDS:
            continue
        params = list(inspect.signature(call).parameters)
        if params[1:3] == ["environ", "start_response"]:
            assert cls in MIDDLEWARE or cls in TERMINAL, cls.__name__


def _state(obj: Any) -> Any:
    """A comparable picture of a configured object (compiled rules included)."""
    if isinstance(obj, list | tuple):
        return [_state(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _state(v) for k, v in obj.items()}
    slots = getattr(type(obj), "__slots__", None)
    if slots and not isinstance(obj, str | bytes):
        return (type(obj).__name__, {k: _state(getattr(obj, k)) for k in slots})
    if hasattr(obj, "__dict__") and not callable(obj) or type(obj).__module__.startswith("oxypy"):
        return (type(obj).__name__, _state(_fields(obj)))
    return obj


def _fields(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _noop(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("204 No Content", [])
    return []


@pytest.mark.parametrize(
    ("old", "new", "spelled"),
    [
        pytest.param(
            lambda: Rewrite(_noop, {"/a": "/b"}, {"^/c": "/d"}),  # type: ignore[call-arg]
            lambda: Rewrite(_noop, rules={"/a": "/b"}, regex_rules={"^/c": "/d"}),
            "rules=, regex_rules=",
            id="Rewrite",
        ),
        pytest.param(
            lambda: oxypy.RequestID(_noop, "X-Trace"),  # type: ignore[call-arg]
            lambda: oxypy.RequestID(_noop, header="X-Trace"),
            "header=",
            id="RequestID",
        ),
        pytest.param(
            lambda: oxypy.Router([(None, "/x", _noop)], _noop),  # type: ignore[call-arg]
            lambda: oxypy.Router([(None, "/x", _noop)], default=_noop),
            "default=",
            id="Router",
        ),
        pytest.param(
            lambda: oxypy.ResponseFallback(503, "later", "text/x"),  # type: ignore[call-arg]
            lambda: oxypy.ResponseFallback(503, body="later", content_type="text/x"),
            "body=, content_type=",
            id="ResponseFallback",
        ),
        pytest.param(
            lambda: oxypy.Webhook("http://127.0.0.1:1/", "PUT", None, b"x", None, 1.0),  # type: ignore[call-arg]
            lambda: oxypy.Webhook("http://127.0.0.1:1/", method="PUT", body=b"x", timeout=1.0),
            "method=, headers=, body=, form=, timeout=",
            id="Webhook",
        ),
        pytest.param(
            lambda: Rate(10, 2.0, 5),  # type: ignore[call-arg]
            lambda: Rate(10, 2.0, burst=5),
            "burst=",
            id="Rate",
        ),
    ],
)
def test_positional_options_still_work_for_one_release(old: Any, new: Any, spelled: str) -> None:
    with pytest.warns(DeprecationWarning, match="deprecated since 0.2") as caught:
        made = old()
    assert len(caught) == 1 and spelled in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the caller
    expected = new()
    if isinstance(made, Rate):
        assert (made, made.name) == (expected, expected.name)
    else:
        assert _state(_fields(made)) == _state(_fields(expected))


def test_renamed_option_still_works_for_one_release() -> None:
    rates = [Rate(1)]
    with pytest.warns(
        DeprecationWarning, match="headers= is deprecated since 0.2; write ratelimit_headers="
    ) as caught:
        old = cast(Any, oxypy.RateLimit)(_noop, rates=rates, headers=True)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert old.ratelimit_headers is True
    with pytest.raises(TypeError, match="both headers= and ratelimit_headers="):
        cast(Any, oxypy.RateLimit)(_noop, rates=rates, headers=True, ratelimit_headers=True)


def test_too_many_positional_arguments_is_still_a_type_error() -> None:
    with pytest.raises(TypeError, match="at most 1 positional"):
        cast(Any, oxypy.RequestID)(_noop, "X-A", "extra")
    with pytest.raises(TypeError, match="multiple values"):
        cast(Any, oxypy.RequestID)(_noop, "X-A", header="X-B")


def test_router_skip_goes_to_default() -> None:
    seen: list[str] = []

    def named(name: str) -> Any:
        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            seen.append(name)
            start_response("200 OK", [("Content-Length", str(len(name)))])
            return [name.encode()]

        return app

    skip = lambda environ: "HTTP_X_SKIP" in environ  # noqa: E731
    routed = oxypy.Router([(None, "/api", named("api"))], default=named("site"), skip=skip)
    client = Client(LintMiddleware(routed))
    assert client.get("/api/x").get_data() == b"api"
    assert client.get("/api/x", headers={"X-Skip": "1"}).get_data() == b"site"
    bare = Client(LintMiddleware(oxypy.Router([(None, "/api", named("api"))], skip=skip)))
    resp = bare.get("/api/x", headers={"X-Skip": "1"})
    assert resp.status_code == 404 and resp.get_data() == b"no route for this request\n"
    assert seen == ["api", "site"]


IMPORT_WITHOUT_EXTRAS = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("redis", "prometheus_client"):
            raise ImportError("no " + name)
        return None

sys.meta_path.insert(0, Refuse())
import oxypy
from oxypy import RedisStore, PrometheusMetrics, ConfigurationError
for make in (lambda: RedisStore("redis://127.0.0.1:1"), lambda: PrometheusMetrics(None)):
    try:
        make()
    except ConfigurationError as exc:
        print(exc)
print(sorted(m for m in sys.modules if m.partition(".")[0] in ("redis", "prometheus_client")))
"""


def test_import_oxypy_needs_no_extras() -> None:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_EXTRAS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out == [
        "the Redis backends need redis-py: pip install 'oxypy-gateway[redis]'",
        "prometheus metrics need the prometheus_client package: "
        "pip install 'oxypy-gateway[prometheus]'",
        "[]",
    ]


def test_oxypy_metrics_is_a_deprecated_alias_of_rolling() -> None:
    import oxypy.rolling

    sys.modules.pop("oxypy.metrics", None)
    with pytest.warns(
        DeprecationWarning, match=r"oxypy\.metrics is deprecated; import from oxypy\.rolling"
    ):
        old = importlib.import_module("oxypy.metrics")
    assert old.__all__ == oxypy.rolling.__all__
    for name in oxypy.rolling.__all__:
        assert getattr(old, name) is getattr(oxypy.rolling, name)


# -- environ keys ---------------------------------------------------------------------


def _source_files() -> list[Path]:
    return sorted((ROOT / "oxypy").rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def test_environ_keys_are_constants_of_oxypy_environ() -> None:
    """No ``"oxypy.<key>"`` literal outside oxypy/environ.py (logger names aside)."""
    found = []
    for path in _source_files():
        if path.name == "environ.py" and path.parent.name == "oxypy":
            continue
        if path.name == "telemetry.py" and path.parent.name == "_core":
            continue  # the OpenTelemetry event and attribute names, likewise in one module
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "getLogger":
                skip.update(id(arg) for arg in node.args)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in skip
                and re.fullmatch(r"oxypy\.[a-z_]+(\.[a-z_]+)*", node.value)
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert found == []


def test_every_oxypy_environ_key_is_set_by_someone() -> None:
    from oxypy import environ as keys

    source = "\n".join(p.read_text(encoding="utf-8") for p in _source_files())
    for name in keys.__all__:
        value = getattr(keys, name)
        assert isinstance(value, str), name
        if not value.startswith("oxypy."):
            continue  # a server's key (RAW_URI), written under its own name
        writes = (f"[keys.{name}] = ", f"keys.{name}: ", f"setdefault(keys.{name}")
        assert any(w in source for w in writes), f"{name} ({value}) is never set"
