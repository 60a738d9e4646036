"""What every connection of one server shares: its settings and two small caches.

:class:`oxypy.server.Server` builds one :class:`ServerConfig` when it binds;
connections only read it, so the connection modules never import the public
server module (no import cycle).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from .. import environ as keys
from .._core.headers import header_to_environ
from .._core.types import WSGIApplication

__all__ = ["ServerConfig"]

#: Header names whose environ key is remembered (a bound on a hostile client's names).
_HEADER_KEY_CACHE = 4096


@dataclass(slots=True)
class ServerConfig:
    """Settings of one server, read by its connections.

    The timers (seconds): ``header_timeout`` bounds a whole request head, from
    its first byte (from accept for a connection's first request) to its end;
    ``keepalive_timeout`` bounds the silence between two requests;
    ``body_timeout`` bounds the silence while the app reads the body (and
    while a response write makes no progress).
    """

    app: WSGIApplication
    host: str
    port: int
    scheme: str
    header_timeout: float
    keepalive_timeout: float
    body_timeout: float
    max_head_bytes: int
    max_drain_bytes: int
    header_keys: dict[bytes, str] = field(default_factory=dict)
    _date: tuple[int, str] = (0, "")

    def header_key(self, name: bytes) -> str:
        """The environ key of header ``name``; ``""`` for names with ``_`` (dropped)."""
        key = self.header_keys.get(name)
        if key is not None:
            return key
        text = name.decode("latin-1")
        key = "" if "_" in text else header_to_environ(text)
        if len(self.header_keys) < _HEADER_KEY_CACHE:
            self.header_keys[name] = key
        return key

    def http_date(self) -> str:
        """The ``Date`` header value, formatted at most once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def base_environ(self, host: str, port: int) -> dict[str, Any]:
        """The environ keys shared by every request of a connection from ``host:port``."""
        return {
            "SCRIPT_NAME": "",
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "REMOTE_ADDR": host,
            "REMOTE_PORT": str(port),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": self.scheme,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": False,
            keys.SERVER: "oxypy",
        }
