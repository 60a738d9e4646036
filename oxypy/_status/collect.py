"""What the status page shows: the blocks of a chain, found by walking it.

A block is *watched* when it has a ``snapshot()`` method (the balancers,
CircuitBreaker, RateLimit, ConnLimit, RetryBudget, Hedge: see
:mod:`oxypy._core.snapshot`).  The walk starts at each root and follows the
documented links every block exposes: ``next_app`` (the wrapped app),
``app`` (a route's or a file-built link's app), ``balancer`` (the
Rebalancer's), ``retry_budget`` (Buffer's and Hedge's); a
:class:`~oxypy.Router` starts one group per route.  Each object is shown
once, in the first group that reaches it.  Walking also turns on the
balancers' per-server stats (``keep_stats()``), so the page has numbers
from the moment it is built.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from .._core.snapshot import BlockSnapshot
from ..router import Router

__all__ = ["Group", "collect", "layout", "process_info"]

log = logging.getLogger(__name__)

#: The links the walk follows, in this order.
_LINKS = ("retry_budget", "balancer", "next_app", "app")


class Group(TypedDict):
    name: str
    blocks: list[BlockSnapshot]


class _Found:
    __slots__ = ("name", "blocks")

    def __init__(self, name: str) -> None:
        self.name = name
        self.blocks: list[Any] = []


def _route_name(route: Any) -> str:
    host = getattr(route, "host", None) or ""
    if getattr(route, "wildcard", False):
        host = "*" + host
    return f"route {host}{getattr(route, 'prefix', '') or '/'}"


def walk(roots: Iterable[tuple[str, object]]) -> list[_Found]:
    """The watched objects under each root, grouped (groups without any left out)."""
    groups: list[_Found] = []
    seen: set[int] = set()
    pending = [(name, obj) for name, obj in roots]
    while pending:
        name, obj = pending.pop(0)
        group = _Found(name)
        groups.append(group)
        todo: list[object] = [obj]
        while todo:
            item = todo.pop(0)
            if item is None or id(item) in seen or isinstance(item, str | bytes | int | float):
                continue
            seen.add(id(item))
            if isinstance(item, Router):
                routes = [(_route_name(r), r.app) for r in item.routes]
                pending[:0] = routes  # the routes' groups come next, in order
                todo.append(item.default)
                continue
            keep = getattr(item, "keep_stats", None)
            if callable(keep):
                keep()
            if callable(getattr(item, "snapshot", None)):
                group.blocks.append(item)
            todo.extend(getattr(item, link, None) for link in _LINKS)
    return [g for g in groups if g.blocks]


def _snapshot(block: Any) -> BlockSnapshot:
    try:
        snap = dict(block.snapshot())
    except Exception:  # noqa: BLE001 - one broken block must not take the page down
        log.exception("status page: %s.snapshot() failed", type(block).__name__)
        return {"kind": type(block).__name__, "error": "snapshot failed (see the log)"}
    snap.setdefault("kind", type(block).__name__)
    return snap


def collect(found: list[_Found]) -> list[Group]:
    """Every watched block's snapshot, now."""
    return [{"name": g.name, "blocks": [_snapshot(b) for b in g.blocks]} for g in found]


def layout(groups: list[Group]) -> str:
    """A key that changes when the page's structure does (groups, blocks, servers, terms)."""
    parts = []
    for group in groups:
        parts.append("G" + group["name"])
        for block in group["blocks"]:
            parts.append("B" + str(block.get("kind")))
            parts.extend("S" + str(s.get("url")) for s in block.get("servers", ()))
            fleet = (block.get("registry") or {}).get("servers", ())
            parts.extend("R" + str(s.get("url")) for s in fleet)
            parts.extend("T" + str(t.get("call")) for t in block.get("terms", ()))
            parts.extend("K" + k for k in block if k not in ("servers", "terms"))
    return format(zlib.crc32("\n".join(parts).encode()), "08x")


def process_info(environ: Mapping[str, Any], started: float) -> dict[str, Any]:
    """Which process the page describes: host, pid, and the gunicorn master when under one.

    A gunicorn worker is a child of the arbiter, which imported
    ``gunicorn.arbiter`` before forking (true of every worker class,
    ``oxypy.gunicorn.Worker`` included); gunicorn's own workers also name
    themselves in ``SERVER_SOFTWARE``.
    """
    software = str(environ.get("SERVER_SOFTWARE", ""))
    gunicorn = "gunicorn" in software.lower() or "gunicorn.arbiter" in sys.modules
    return {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "server": software,
        "gunicorn_master": os.getppid() if gunicorn else None,
        "page_age": round(time.monotonic() - started, 1),
    }
