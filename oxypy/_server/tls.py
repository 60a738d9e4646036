"""The TLS front door: handshake deadline, plain HTTP on a TLS port, quiet failures.

Theory of operation: before the handshake the server peeks at the client's
first bytes.  A TLS connection starts with a handshake record (``0x16``); an
ASCII capital letter is the start of a plain HTTP method, which gets a short
``400`` naming the mistake and a close (nginx answers its 497 as a 400 the
same way); anything else is closed.  The peek and the whole handshake run
under one deadline (``handshake_timeout``), so a client that connects and
sends nothing, or trickles its hello, is closed when it expires.  A failed
handshake (a port scan, a client without the CA, an old protocol version) is
one ``INFO`` line on ``oxypy.server`` with the peer and the reason, never a
traceback.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

import gevent

from .common import LINGER_SECONDS, RECV_SIZE

__all__ = ["PLAIN_HTTP_RESPONSE", "accept_tls"]

log = logging.getLogger("oxypy.server")

#: The first byte of a TLS handshake record.
_HANDSHAKE_RECORD = 0x16
_PLAIN_HTTP_BODY = b"plain HTTP request sent to HTTPS port\n"
#: The whole answer to a plain HTTP request on a TLS port.
PLAIN_HTTP_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_PLAIN_HTTP_BODY)).encode() + b"\r\n"
    b"Connection: close\r\n\r\n" + _PLAIN_HTTP_BODY
)


class _HandshakeTimeout(Exception):
    """The handshake deadline expired (a private gevent.Timeout exception)."""


def accept_tls(sock: Any, addr: Any, context: ssl.SSLContext, timeout: float) -> Any:
    """The TLS socket for an accepted ``sock``, or None when the connection was
    answered or dropped (plain HTTP, handshake failure, deadline); the caller
    then closes ``sock``."""
    peer = addr[0] if isinstance(addr, tuple) else str(addr)
    tls: Any = None
    deadline = gevent.Timeout(timeout, _HandshakeTimeout)
    deadline.start()
    try:
        sock.settimeout(timeout)
        first = sock.recv(1, socket.MSG_PEEK)
        if not first:
            log.info("TLS handshake with %s failed: connection closed before a hello", peer)
            return None
        if first[0] != _HANDSHAKE_RECORD:
            if 0x41 <= first[0] <= 0x5A:  # an HTTP method token: GET, POST, ...
                deadline.cancel()
                log.info("plain HTTP request from %s on a TLS port: answered 400", peer)
                _answer_plain_http(sock)
            else:
                log.info("TLS handshake with %s failed: not a TLS hello", peer)
            return None
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
        return tls
    except _HandshakeTimeout:
        log.info("TLS handshake with %s failed: not finished within %g s", peer, timeout)
    except (OSError, ValueError) as exc:
        log.info("TLS handshake with %s failed: %s", peer, _reason(exc))
    finally:
        deadline.cancel()
    if tls is not None:
        try:
            tls.close()
        except OSError:
            pass
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _answer_plain_http(sock: Any) -> None:
    """Answer 400 and close lingering (unread request bytes would reset the answer)."""
    try:
        sock.settimeout(LINGER_SECONDS)
        sock.sendall(PLAIN_HTTP_RESPONSE)
        sock.shutdown(socket.SHUT_WR)
        end = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < end and sock.recv(RECV_SIZE):
            pass
    except OSError:
        pass
