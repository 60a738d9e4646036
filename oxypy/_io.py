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


def peer_closed(sock: Any) -> bool:
    """True when an idle pooled connection was closed (or got junk) from the other side.

    One non-blocking peek on the real socket: no poll object, no greenlet switch.
    """
    raw = getattr(sock, "_sock", sock)
    try:
        raw.recv(1, _PEEK)
    except BlockingIOError:
        return False  # alive and quiet: the only good answer
    except (OSError, ValueError):
        return True
    return True  # EOF, or bytes nobody asked for
