"""The README's Python snippets run as written (servers and hosts stubbed out)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import oxypy

README = Path(__file__).parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _dummy(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 6


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    served: list[Any] = []
    monkeypatch.setattr(oxypy, "serve", lambda app, listen, **kw: served.append((app, listen)))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {
        "app": _dummy,
        "api_gateway": _dummy,
        "static_app": _dummy,
        "site": _dummy,
        "lb": _dummy,
    }
    namespace.update({name: getattr(oxypy, name) for name in oxypy.__all__})
    try:
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    finally:
        for value in list(namespace.values()):
            close = getattr(value, "close", None)
            if callable(close) and not isinstance(value, type):
                try:
                    close()
                except TypeError:
                    pass
    if "oxypy.serve(" in code:
        assert served and served[0][1] == "127.0.0.1:8080"
