"""WSGI apps for the gunicorn subprocess tests (imported by gunicorn, not by pytest).

``forward`` proxies to ``$OXYPY_TEST_UPSTREAM``; ``trivial`` answers 200 with
the request body length, to observe what gunicorn's own parser accepts.
"""

from __future__ import annotations

import os
import time
from typing import Any

from oxypy import Forward, RoundRobin, StatusPage, Trace

forward = Forward(os.environ.get("OXYPY_TEST_UPSTREAM") or "http://127.0.0.1:9")
#: Forward to an HTTPS upstream with a test certificate.
forward_insecure = Forward(
    os.environ.get("OXYPY_TEST_UPSTREAM") or "https://127.0.0.1:9", insecure=True
)


def trivial(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    length = environ.get("CONTENT_LENGTH")
    body = environ["wsgi.input"].read(int(length)) if length else environ["wsgi.input"].read()
    out = b"seen %s %d" % (environ["PATH_INFO"].encode("latin-1"), len(body))
    start_response("200 OK", [("Content-Length", str(len(out)))])
    return [out]


def _trace_sink(line: str) -> None:
    path = os.environ.get("OXYPY_TEST_TRACE")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


#: Forward behind Trace, writing its lines to ``$OXYPY_TEST_TRACE``.
traced = Trace(forward, sink=_trace_sink)


def whoami(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """``pid scheme path body-length``; ``/slow?S`` sleeps S seconds first and
    creates ``$OXYPY_TEST_MARK`` when it starts sleeping."""
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/slow":
        mark = os.environ.get("OXYPY_TEST_MARK")
        if mark:
            open(mark, "w").close()
        time.sleep(float(environ["QUERY_STRING"]))  # patched: a gevent sleep
    out = b"%d %s %s %d" % (
        os.getpid(),
        environ["wsgi.url_scheme"].encode(),
        environ["PATH_INFO"].encode("latin-1"),
        len(body),
    )
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]


#: A status page of a balancer (no upstream is ever called): ``status.json`` names the worker.
status_page = StatusPage(RoundRobin(Forward(), ["http://127.0.0.1:9"]))


def fleet() -> Any:
    """A factory (``_gunicorn_app:fleet()``): RoundRobin following the registry
    ``$OXYPY_TEST_REGISTRY`` at ``$OXYPY_TEST_REDIS``, seeded with
    ``$OXYPY_TEST_UPSTREAM``; every answer carries ``X-Worker-Pid``.  With
    ``$OXYPY_TEST_HEALTH`` set, health checks every 0.1 s (one prober per
    registry).  Built in each worker, as docs/fleet.md says (no ``--preload``)."""
    from oxypy import HealthCheck, RedisRegistry, RoundRobin

    check = None
    if os.environ.get("OXYPY_TEST_HEALTH"):
        check = HealthCheck(interval=0.1, timeout=1, unhealthy_threshold=1, healthy_threshold=1)
    lb = RoundRobin(
        Forward(),
        [os.environ["OXYPY_TEST_UPSTREAM"]],
        health_check=check,
        registry=RedisRegistry(
            os.environ["OXYPY_TEST_REDIS"],
            os.environ["OXYPY_TEST_REGISTRY"],
            poll_interval=0.25,
            lease_ttl=1.0,
            timeout=0.5,
        ),
    )
    pid = ("X-Worker-Pid", str(os.getpid()))

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        def with_pid(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            headers.append(pid)
            return start_response(status, headers, *exc_info)

        return lb(environ, with_pid)

    return app
