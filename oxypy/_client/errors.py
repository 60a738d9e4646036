"""The one boundary where upstream socket and library errors become oxypy errors.

Classification is by exception *type* and by the *phase* of the exchange it
happened in, never by the words of a message:

=========  ===========================================  ==================================
phase      exception                                    oxypy error (status, reason)
=========  ===========================================  ==================================
connect    socket timeout / urllib3 ConnectTimeoutError  UpstreamTimeout 504
                                                          "upstream connect timed out"
connect    TLS failure (ssl.SSLError, urllib3 SSLError)  UpstreamTLSError 502 "TLS ..."
connect    name resolution (socket.gaierror)             UpstreamConnectError 502
connect    ConnectionRefusedError                        UpstreamConnectError 502 "refused"
connect    any other OSError / urllib3 HTTPError         UpstreamConnectError 502
send       socket timeout                                UpstreamTimeout 504
send       any other OSError / TLS error                 UpstreamReadError 502
read       socket timeout                                UpstreamTimeout 504
read       any other OSError / TLS error                 UpstreamReadError 502
=========  ===========================================  ==================================

Connect errors are raised with ``before_send = True``: nothing reached the
upstream.  Anything else (a :class:`RequestError`, ``GreenletExit``, a bug)
passes through unchanged.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProxyError,
    SSLError,
)

from ..exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamReadError,
    UpstreamTimeout,
    UpstreamTLSError,
)

__all__ = ["CONNECT", "READ", "SEND", "map_exceptions", "upstream_error"]

CONNECT, SEND, READ = "connect", "send", "read"

_WIRE = (OSError, ssl.SSLError, HTTPError)


def _root(exc: BaseException) -> BaseException:
    """urllib3 wraps the socket's error; the innermost cause says what happened."""
    seen = 0
    while isinstance(exc, HTTPError) and exc.__cause__ is not None and seen < 8:
        exc = exc.__cause__
        seen += 1
    return exc


def upstream_error(exc: BaseException, phase: str) -> BaseException:
    """The oxypy error for ``exc`` raised during ``phase``; other exceptions unchanged."""
    if not isinstance(exc, _WIRE):
        return exc
    if phase != CONNECT:
        if isinstance(exc, (TimeoutError, socket.timeout)):
            if phase == SEND:
                return UpstreamTimeout("upstream timed out receiving the request")
            return UpstreamTimeout("upstream timed out")
        if phase == SEND:
            return UpstreamReadError("upstream connection reset while sending")
        return UpstreamReadError("upstream connection reset")
    root = _root(exc)
    err: UpstreamError
    if isinstance(root, (TimeoutError, socket.timeout)) or (
        isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError)
    ):
        # NewConnectionError subclasses ConnectTimeoutError in urllib3 2.x, so
        # only its cause can say whether it timed out.
        err = UpstreamTimeout("upstream connect timed out")
    elif isinstance(exc, SSLError) or isinstance(root, ssl.SSLError):
        err = UpstreamTLSError("TLS handshake with upstream failed")
    elif isinstance(exc, NameResolutionError) or isinstance(root, socket.gaierror):
        err = UpstreamConnectError("upstream host name does not resolve")
    elif isinstance(root, ConnectionRefusedError):
        err = UpstreamConnectError("upstream refused the connection")
    elif isinstance(exc, ProxyError):
        err = UpstreamConnectError("proxy to upstream failed")
    else:
        err = UpstreamConnectError("upstream unreachable")
    err.before_send = True
    err.detail = _detail(root)
    return err


_SSL_PREFIX = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\] ")
_SSL_SUFFIX = re.compile(r" \(_ssl\.c:\d+\)$")


def _detail(exc: BaseException) -> str:
    """The short cause of ``exc``: ``certificate verify failed: ...`` for TLS."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = _SSL_SUFFIX.sub(
            "", _SSL_PREFIX.sub("", str(exc.args[1] if len(exc.args) > 1 else exc))
        )
        return text or str(exc.reason or type(exc).__name__).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@contextmanager
def map_exceptions(phase: str) -> Iterator[None]:
    """Re-raise socket and urllib3 errors of ``phase`` as oxypy errors (cause chained)."""
    try:
        yield
    except _WIRE as exc:
        raise upstream_error(exc, phase) from exc
