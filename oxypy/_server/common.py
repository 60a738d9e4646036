"""Constants shared by the embedded server's modules."""

from __future__ import annotations

from .._core.headers import HOP_BY_HOP

__all__ = [
    "BODY",
    "END",
    "HEAD",
    "HOP",
    "LINGER_SECONDS",
    "NO_BODY_STATUS",
    "RECV_SIZE",
]

RECV_SIZE = 65536
#: How long a rejected connection is drained before it is closed.
LINGER_SECONDS = 1.0
#: Parser events queued by a connection: a head, a body piece, the end.
HEAD, BODY, END = 0, 1, 2
NO_BODY_STATUS = frozenset({204, 304})
#: Hop-by-hop response headers the server never takes from an app: the one set.
HOP = HOP_BY_HOP
