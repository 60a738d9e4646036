"""The WSGI side of one request on the embedded server: ``wsgi.input`` and the response framing."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

from .. import environ as keys
from .._core.headers import is_field_name, is_field_value
from .._core.iterables import LineIteration
from .._core.status import status_line
from .._core.types import WSGIApplication
from ..exceptions import BadRequest, ClientDisconnected
from .common import HOP, NO_BODY_STATUS, RECV_SIZE
from .config import ServerConfig

__all__ = ["Conn", "Input", "RawInput", "ResponseWriter"]

log = logging.getLogger("oxypy.server")


class Conn(Protocol):
    """What the WSGI side needs of its connection (``connection.Connection``)."""

    closing: bool

    def send(self, data: bytes) -> None: ...

    def body_piece(self) -> bytes: ...

    def raw_piece(self) -> bytes: ...

    def take_socket(self) -> tuple[Any, bytes]: ...

    def finish_body(self) -> bool: ...

    def reject(self, exc: BadRequest) -> None: ...


class Input(LineIteration):
    """``wsgi.input``: the request body, pulled from the connection on demand."""

    __slots__ = ("_conn", "_buf", "_eof", "_expect")

    def __init__(self, conn: Conn, expect_continue: bool) -> None:
        self._conn = conn
        self._buf = b""
        self._eof = False
        self._expect = expect_continue

    def _more(self) -> bytes:
        if self._eof:
            return b""
        if self._expect:
            self._expect = False
            self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        data = self._conn.body_piece()
        if not data:
            self._eof = True
        return data

    def read1(self, size: int = -1) -> bytes:
        if self._buf:
            data = self._buf
            if 0 <= size < len(data):
                self._buf = data[size:]
                return data[:size]
            self._buf = b""
            return data
        data = self._more()
        if 0 <= size < len(data):
            self._buf = data[size:]
            return data[:size]
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._buf]
            self._buf = b""
            while True:
                data = self._more()
                if not data:
                    return b"".join(parts)
                parts.append(data)
        parts = []
        have = 0
        while have < size:
            data = self.read1(size - have)
            if not data:
                break
            parts.append(data)
            have += len(data)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        parts = []
        have = 0
        limit = -1 if size is None else size
        while limit < 0 or have < limit:
            data = self.read1(RECV_SIZE if limit < 0 else limit - have)
            if not data:
                break
            nl = data.find(b"\n")
            if nl >= 0:
                self._buf = data[nl + 1 :] + self._buf
                parts.append(data[: nl + 1])
                break
            parts.append(data)
            have += len(data)
        return b"".join(parts)


class RawInput(Input):
    """``wsgi.input`` of an Upgrade request: the raw socket after the head."""

    __slots__ = ()

    def take_socket(self) -> tuple[Any, bytes]:
        """Hand the client socket to a tunnel that copies on its own (after the 101).

        Returns the socket and the bytes already read past the request head
        (the tunnel relays them first); nothing is read through this input
        afterwards.  The server still closes the socket when the app returns.
        """
        self._eof = True
        data, self._buf = self._buf, b""
        sock, more = self._conn.take_socket()
        return sock, data + more

    def _more(self) -> bytes:
        if self._eof:
            return b""
        data = self._conn.raw_piece()
        if not data:
            self._eof = True
        return data


class ResponseWriter:
    """Runs the app for one request and frames what it returns."""

    __slots__ = (
        "conn",
        "config",
        "method",
        "version",
        "keep_alive",
        "status",
        "headers",
        "head_sent",
        "length",
        "chunked",
        "no_body",
        "sent",
        "upgraded",
        "trailers",
    )

    def __init__(
        self,
        conn: Conn,
        config: ServerConfig,
        environ: dict[str, Any],
        version: str,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.config = config
        # Not the environ itself: it holds send_trailers (a bound method of
        # this writer), and the pair would be a cycle only the GC frees.
        self.method = environ["REQUEST_METHOD"]
        self.version = version
        self.keep_alive = keep_alive
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.length: int | None = None
        self.chunked = False
        self.no_body = False
        self.sent = 0
        self.upgraded = False
        self.trailers: list[tuple[str, str]] = []
        environ[keys.SEND_TRAILERS] = self.send_trailers

    def send_trailers(self, trailers: list[tuple[str, str]]) -> None:
        """``environ["oxypy.send_trailers"]``: trailer fields to end a chunked response with.

        Kept until the body ends; written only when the response is chunked
        (a ``Content-Length`` response, HTTP/1.0 or a HEAD has no room for
        them: dropped).  An invalid name or value raises ``ValueError``.
        """
        for name, value in trailers:
            if not is_field_name(name) or not is_field_value(value):
                raise ValueError(f"invalid trailer field {name!r}")
        self.trailers.extend(trailers)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        if exc_info:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        if len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
            raise ValueError(f"invalid WSGI status {status!r}")
        self.status = status
        self.headers = headers
        return self.write

    def _head(self, first: bytes, total: int | None) -> bytes:
        status = self.status
        assert status is not None
        code = int(status[:3])
        method = self.method
        out = [f"HTTP/1.1 {status}\r\n"]
        has_date = False
        length = None
        close = False
        for name, value in self.headers:
            lname = name.lower()
            if lname in HOP:
                if lname == "connection" and "close" in value.lower():
                    close = True
                if code == 101 and lname in ("upgrade", "connection"):
                    out.append(f"{name}: {value}\r\n")
                continue
            if lname == "content-length":
                if length is not None or not value.strip().isdigit():
                    continue  # an app's broken or duplicate length is not relayed
                length = int(value.strip())
            elif lname == "date":
                has_date = True
            out.append(f"{name}: {value}\r\n")
        if not has_date:
            out.append(f"Date: {self.config.http_date()}\r\n")
        if code == 101:
            self.upgraded = True
            self.keep_alive = False
        elif code < 200 or code in NO_BODY_STATUS:
            self.no_body = True
            length = None
        else:
            if method == "HEAD":
                self.no_body = True
            if length is None and total is not None and not self.no_body:
                length = total
                out.append(f"Content-Length: {total}\r\n")
            if length is None and not self.no_body:
                if self.version == "1.1":
                    self.chunked = True
                    out.append("Transfer-Encoding: chunked\r\n")
                else:
                    self.keep_alive = False
        self.length = length
        if close or self.conn.closing:
            self.keep_alive = False
        if not self.upgraded:
            if not self.keep_alive:
                out.append("Connection: close\r\n")
            elif self.version == "1.0":
                out.append("Connection: keep-alive\r\n")
        out.append("\r\n")
        return "".join(out).encode("latin-1")

    def write(self, data: bytes, total: int | None = None) -> None:
        if self.status is None:
            raise AssertionError("write() before start_response()")
        head = b""
        if not self.head_sent:
            head = self._head(data, total)
            self.head_sent = True
        if self.no_body or not data:
            if head:
                self.conn.send(head)
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        elif self.length is not None and not self.upgraded:
            room = self.length - self.sent
            if len(data) > room:
                log.warning("app sent more than its Content-Length; truncated")
                data = data[:room]
                self.keep_alive = False
        self.sent += len(data)
        self.conn.send(head + data if head else data)

    def _last_chunk(self) -> bytes:
        if not self.trailers:
            return b"0\r\n\r\n"
        fields = "".join(f"{name}: {value}\r\n" for name, value in self.trailers)
        return b"0\r\n" + fields.encode("latin-1") + b"\r\n"

    def run(self, app: WSGIApplication, environ: dict[str, Any]) -> bool:
        result: Iterable[bytes] | None = None
        try:
            try:
                result = app(environ, self.start_response)
                total = None
                if isinstance(result, (list, tuple)) and len(result) == 1:
                    total = len(result[0])
                for data in result:
                    if data:
                        self.write(data, total)
                    elif self.upgraded and self.head_sent:
                        continue
                if not self.head_sent:
                    self.write(b"", 0 if total is None else total)
                if self.chunked:
                    self.conn.send(self._last_chunk())
                elif self.length is not None and self.sent < self.length and not self.no_body:
                    log.warning("app sent less than its Content-Length; closing the connection")
                    return False
            finally:
                if result is not None:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
        except ClientDisconnected:  # ClientGone from our socket, or a block's own verdict
            return False
        except BadRequest as exc:
            # The body turned out malformed while the app was reading it.
            if not self.head_sent:
                self.conn.reject(exc)
            return False
        except Exception:
            if self.head_sent:
                log.warning(
                    "error after the response started; aborting the connection", exc_info=True
                )
                return False
            log.exception("application error")
            self.status = None
            self.headers = []
            body = b"Internal Server Error\n"
            self.start_response(
                status_line(500),
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "22")],
            )
            self.keep_alive = False
            self.write(body)
            return False
        if self.upgraded:
            return False
        if not self.conn.finish_body():
            return False
        return self.keep_alive
