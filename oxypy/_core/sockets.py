"""Small socket helpers on the hot path, shared by the server and the upstream client."""

from __future__ import annotations

import select
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

    A stdlib socket (a process gevent did not patch: Forward under a threaded
    server) with a timeout waits up to that timeout for data before any
    ``recv``, ``MSG_DONTWAIT`` or not: it is polled with a zero timeout first,
    so a quiet, live connection answers at once instead of after the read
    timeout.
    """
    raw = getattr(sock, "_sock", None)
    if raw is None:
        raw = sock
        timeout = sock.gettimeout()
        if timeout and not _readable_now(sock):
            return False  # alive and quiet
    try:
        data = raw.recv(1, _PEEK)
    except BlockingIOError:
        return False  # alive and quiet
    except (OSError, ValueError):
        return True
    return not (data and data_is_fine)


def _readable_now(sock: Any) -> bool:
    """Whether ``sock`` has data or an end to read, without waiting."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True  # closed under us: let the peek say so
