"""Test session setup: gevent cooperation first, then shared fixtures."""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from _servers import REPO, OxypyProcess, echo_app, start_pywsgi, url_of  # noqa: E402

logging.getLogger("oxypy").setLevel(logging.DEBUG)


@pytest.fixture
def echo_upstream() -> Iterator[str]:
    """A pywsgi upstream answering JSON that describes the request it got."""
    server = start_pywsgi(echo_app)
    try:
        yield url_of(server)
    finally:
        server.stop(timeout=1)


@pytest.fixture
def pywsgi() -> Iterator[Any]:
    """Start any WSGI app on gevent.pywsgi: ``url = pywsgi(app)``."""
    started = []

    def start(app: Any) -> str:
        server = start_pywsgi(app)
        started.append(server)
        return url_of(server)

    yield start
    for server in started:
        server.stop(timeout=1)


@pytest.fixture
def proxy() -> Iterator[Any]:
    """Serve a WSGI app (LintMiddleware-wrapped) on oxypy's server: ``url = proxy(app)``."""
    from _servers import proxy_server

    started = []

    def start(app: Any, lint: bool = True) -> str:
        server = proxy_server(app, lint=lint)
        started.append(server)
        return server.url

    yield start
    for server in started:
        server.stop(timeout=1)


@pytest.fixture
def oxypy(tmp_path: Path) -> Iterator[Callable[..., OxypyProcess]]:
    """Run ``python -m oxypy ARGS...`` until it listens: ``p = oxypy("proxy", url, ...)``.

    Every process still running at the end is killed by its PID.
    """
    running: list[OxypyProcess] = []

    def start(*args: str, cwd: Path = REPO, env: Mapping[str, str] | None = None) -> OxypyProcess:
        process = OxypyProcess(list(args), tmp_path, cwd, env)
        running.append(process)
        return process

    try:
        yield start
    finally:
        for process in running:
            process.kill()
