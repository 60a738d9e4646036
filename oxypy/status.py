"""StatusPage: what the gateway is doing, at a glance, in a browser.

One WSGI app, mounted on any path, serves a server-rendered HTML page of
the balancers (every server's state, weight, in-flight requests, requests
per second, error ratio, p50/p99 latency over the last minute, retries,
hedges and a latency sparkline), the circuit breakers (state, and each
function of the trigger expression against its threshold) and the limits
(RateLimit, ConnLimit, RetryBudget, Hedge) of a chain; a JSON document of
the same data; and a Server-Sent Events stream of that document once a
second, which the page's small inline script uses to update itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import gevent

from ._core.types import StartResponse, WSGIEnvironment
from ._status.collect import collect, layout, process_info, walk
from ._status.page import render
from .exceptions import ConfigurationError

__all__ = ["StatusPage"]

_SECURITY_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
)


class StatusPage:
    """A live status page (HTML, JSON and Server-Sent Events) for a chain's blocks.

    What it shows is found by walking ``app`` (and each of ``watch``): every
    object with a ``snapshot()`` method is shown (the balancers,
    :class:`~oxypy.CircuitBreaker`, :class:`~oxypy.RateLimit`,
    :class:`~oxypy.ConnLimit`, :class:`~oxypy.RetryBudget`,
    :class:`~oxypy.Hedge`); the walk follows each block's ``next_app`` (and
    ``app``, ``balancer``, ``retry_budget``), and a :class:`~oxypy.Router`
    shows one section per route.  Building the page turns on the balancers'
    per-server stats (:meth:`~oxypy.RoundRobin.keep_stats`), which cost a
    little on each request from then on.

    Answers, relative to where it is mounted (``SCRIPT_NAME``):

    * ``/`` (or the mount path itself): the HTML page; ``?format=json``: the JSON.
    * ``/status.json``: the JSON document: ``process`` (``hostname``,
      ``pid``, ``server``, ``gunicorn_master`` when under gunicorn: the page
      describes one process), ``layout`` (changes with the page's structure),
      ``groups`` (``[{name, blocks: [snapshot, ...]}]``).
    * ``/events``: ``text/event-stream``, one ``data:`` line of that JSON
      every ``interval`` seconds; each stream ends after ``stream_seconds``
      (the browser reconnects by itself), so a worker shutting down is not
      held by an open page.
    * anything else: 404; a method other than GET or HEAD: 405.

    Nothing secret is shown: sticky-cookie keys never, and URLs (servers,
    Redis stores) without their password.  It is an operator's page: put
    :class:`~oxypy.IPAllowList` or :class:`~oxypy.ForwardAuth` in front of it
    (``IPAllowList(StatusPage(app), ["10.0.0.0/8"])``).

    :param app: the chain to describe (not called: the page only reads it).
    :param watch: more objects to show: a mapping of section names to
        blocks, or an iterable of blocks (each named after its class).
    :param title: the page's title.
    :param interval: seconds between two events of the stream (> 0).
    :param stream_seconds: seconds one event stream lasts (> 0).
    :raises ConfigurationError: bad ``interval``, ``stream_seconds`` or ``watch``.

    Example::

        from oxypy import CircuitBreaker, Forward, IPAllowList, Router, RoundRobin, StatusPage
        lb = RoundRobin(Forward(), ["http://127.0.0.1:9001"])
        api = CircuitBreaker(lb, "NetworkErrorRatio() > 0.5")
        status = IPAllowList(StatusPage(api), ["127.0.0.1/32"])
        app = Router([(None, "/status", status), (None, "/", api)])

    .. versionadded:: 0.3
    """

    def __init__(
        self,
        app: object = None,
        /,
        *,
        watch: Mapping[str, object] | Iterable[object] = (),
        title: str = "oxypy status",
        interval: float = 1.0,
        stream_seconds: float = 300.0,
    ) -> None:
        for name, value in (("interval", interval), ("stream_seconds", stream_seconds)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"StatusPage: {name} must be a number > 0, got {value!r}")
        roots: list[tuple[str, object]] = []
        if app is not None:
            roots.append(("chain", app))
        if isinstance(watch, Mapping):
            roots.extend((str(name), obj) for name, obj in watch.items())
        elif isinstance(watch, str | bytes):
            raise ConfigurationError("StatusPage: watch must be blocks, not a string")
        else:
            roots.extend((type(obj).__name__, obj) for obj in watch)
        self.title = str(title)
        self.interval = float(interval)
        self.stream_seconds = float(stream_seconds)
        self._roots = roots
        self._started = time.monotonic()
        self._found = walk(roots) if roots else []

    def watch(self, roots: Mapping[str, object]) -> None:
        """Show these sections instead (the config loader's routes and services)."""
        self._roots = [(str(name), obj) for name, obj in roots.items()]
        self._found = walk(self._roots)

    def document(self, environ: WSGIEnvironment | None = None) -> dict[str, Any]:
        """The JSON document ``status.json`` serves, read now."""
        groups = collect(self._found)
        return {
            "process": process_info(environ or {}, self._started),
            "layout": layout(groups),
            "groups": groups,
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", [("Allow", "GET, HEAD")])
        path = environ.get("PATH_INFO", "") or "/"
        query = environ.get("QUERY_STRING", "")
        if path == "/events":
            start_response(
                "200 OK",
                [
                    ("Content-Type", "text/event-stream; charset=utf-8"),
                    ("X-Accel-Buffering", "no"),
                    *_SECURITY_HEADERS,
                ],
            )
            return [] if method == "HEAD" else self._events(environ)
        if path == "/status.json" or (path == "/" and "format=json" in query.split("&")):
            body = json.dumps(self.document(environ), separators=(",", ":")).encode()
            kind = "application/json"
        elif path == "/":
            body = render(self.title, self.document(environ)).encode()
            kind = "text/html; charset=utf-8"
        else:
            return _plain(start_response, "404 Not Found")
        start_response(
            "200 OK",
            [
                ("Content-Type", kind),
                ("Content-Length", str(len(body))),
                ("Content-Security-Policy", _CSP),
                *_SECURITY_HEADERS,
            ],
        )
        return [] if method == "HEAD" else [body]

    def _events(self, environ: WSGIEnvironment) -> Iterator[bytes]:
        end = time.monotonic() + self.stream_seconds
        yield b"retry: 1000\n\n"
        while True:
            data = json.dumps(self.document(environ), separators=(",", ":"))
            yield f"data: {data}\n\n".encode()
            if time.monotonic() >= end:
                return
            gevent.sleep(self.interval)


def _plain(
    start_response: StartResponse, status: str, extra: list[tuple[str, str]] | None = None
) -> list[bytes]:
    body = status.split(" ", 1)[1].lower().encode() + b"\n"
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *(extra or []),
        ],
    )
    return [body]
