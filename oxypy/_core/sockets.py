"""Small socket helpers on the hot path, shared by the server and the upstream client."""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["send_all", "peer_closed"]

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def send_all(sock: Any, data: bytes) -> None:
    """``sendall`` that costs one system call when the data fits the buffer.

    gevent's ``sendall`` asks the kernel for the send buffer size on every
    call (a ``getsockopt`` per write); a plain ``send`` usually takes a whole
    small response at once, and only the rest goes through ``sendall``.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def peer_closed(sock: Any, *, data_is_fine: bool = False) -> bool:
    """True when the other side closed ``sock`` (polled without blocking).

    One non-blocking peek on the real socket: no poll object, no greenlet
    switch.  For an idle pooled upstream connection unexpected bytes are as bad
    as a close; for a client connection (``data_is_fine``) they are a
    pipelined request.
    """
    raw = getattr(sock, "_sock", sock)
    try:
        data = raw.recv(1, _PEEK)
    except BlockingIOError:
        return False  # alive and quiet
    except (OSError, ValueError):
        return True
    return not (data and data_is_fine)
