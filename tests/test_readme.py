"""The README's Python snippets run as written, each alone in a fresh namespace.

Nothing is injected: a snippet that forgets an import fails here.  The one
thing replaced is ``oxypy.serve`` (it would serve forever): the replacement
records what it was given, and the gateway snippet's app is then served on
port 0 in front of upstreams started here, and must answer a real request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

import oxypy
from oxypy import RoundRobin

from _servers import wait_for

README = Path(__file__).parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
GATEWAY = next(code for code in SNIPPETS if "oxypy.serve(" in code)
HTTP = urllib3.PoolManager(retries=False, timeout=10)

Served = list[tuple[Any, str, dict[str, Any]]]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """``namespace, served = run(code)``: exec a snippet alone, closing what it built after."""
    namespaces: list[dict[str, Any]] = []

    def execute(code: str) -> tuple[dict[str, Any], Served]:
        served: Served = []
        monkeypatch.setattr(
            oxypy, "serve", lambda app, listen, **kw: served.append((app, listen, kw))
        )
        monkeypatch.chdir(tmp_path)
        namespace: dict[str, Any] = {"__name__": "readme_snippet"}
        namespaces.append(namespace)
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
        return namespace, served

    yield execute
    for namespace in namespaces:
        for value in namespace.values():
            close = getattr(value, "close", None)
            if callable(close) and not isinstance(value, type):
                try:
                    close()
                except TypeError:
                    pass  # a module's or a class's close, not an instance's


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 7


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code: str, run: Callable[[str], Any]) -> None:
    namespace, served = run(code)
    defined = [v for k, v in namespace.items() if not k.startswith("__")]
    assert any(callable(v) and not isinstance(v, type) for v in defined)  # it built something
    if "oxypy.serve(" in code:
        assert [(listen, kw) for _, listen, kw in served] == [("127.0.0.1:8080", {})]
    else:
        assert served == []


def test_readme_snippets_only_name_loopback_addresses() -> None:
    """No snippet depends on DNS or on a host outside this machine."""
    hosts = {host for code in SNIPPETS for host in re.findall(r"\b[a-z]+://([^/:\"'\s]+)", code)}
    assert hosts == {"127.0.0.1"}


def test_readme_gateway_serves_a_request(
    run: Callable[[str], Any], pywsgi: Any, proxy: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    """The composed gateway, as written, proxies a request (its upstreams swapped for ours)."""

    def named(name: bytes) -> Any:
        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response("200 OK", [("Content-Length", str(len(name)))])
            return [name]

        return app

    namespace, served = run(GATEWAY)
    ((app, listen, _),) = served
    lb = namespace["lb"]
    assert isinstance(lb, RoundRobin)
    written = sorted(lb.servers())
    assert written == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    ours = [pywsgi(named(b"one")), pywsgi(named(b"two"))]
    for url in ours:
        lb.upsert_server(url)  # the runtime API the README shows, safe under traffic
    for url in written:
        lb.remove_server(url)
    url = proxy(app)
    bodies = [HTTP.request("GET", url + "/hello") for _ in range(4)]
    assert [(r.status, r.data) for r in bodies] == [(200, b"one"), (200, b"two")] * 2
    app.close()  # Trace: writes what is queued
    lines: list[str] = []

    def traced() -> bool:
        lines.extend(capfd.readouterr().err.splitlines())
        return len(lines) >= 4

    wait_for(traced)
    records = [json.loads(line) for line in lines]
    assert [(r["status"], r["url"]) for r in records] == [(200, "/hello")] * 4
