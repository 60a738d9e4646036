"""One HTTP/1.1 exchange with an upstream, over a connection from urllib3's pool.

urllib3 owns connections, TLS (verification, SNI, client certificates) and
pooling, reached only through :mod:`oxypy._client.pool`; socket errors become
oxypy errors only in :mod:`oxypy._client.errors`.  The per-request path is
ours and lean: the request head is written in one ``sendall`` (with a small
body), and the response is parsed by llhttp
(``httptools``), which rejects what a proxy must never relay: an invalid,
negative or duplicated Content-Length, Content-Length with chunked, NUL or CR
in header values, a garbage status line.  Interim 1xx responses are skipped.

A connection goes back to the pool only when its response was read to the
end with keep-alive; anything else (abandoned body, framing doubt, errors)
closes it and frees the pool slot.

Under gevent, a request just sent lets the other greenlets run once before
its response head is read: the upstream's answer has then usually arrived,
and is read without arming a timer and an I/O watcher and without a trip
through the hub to wait for it (``wrk -c64`` on one core: 75 -> 61 µs of
CPU per proxied request, ``benchmarks/README.md``, issue 17).  A process
gevent did not patch has plain sockets, and does not yield.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import httptools
from gevent.socket import socket as CooperativeSocket

from .._core.sockets import send_all
from ..exceptions import (
    ClientDisconnected,
    DeadlineExceeded,
    RequestError,
    UpstreamError,
    UpstreamHeaderTimeout,
    UpstreamProtocolError,
    UpstreamReadError,
    UpstreamTimeout,
    UpstreamTryTimeout,
)
from .errors import READ, SEND, upstream_error
from .pool import HostPool

__all__ = ["BodySource", "Bounds", "Limit", "UpstreamResponse", "exchange"]

RECV_SIZE = 65536
#: Largest read from a ``wsgi.input`` without ``read1`` (see :class:`BodySource`).
MAX_BODY_READ = 1 << 20
#: A full read faster than this doubles the next one (no ``read1``); one slower
#: than :data:`SLOW_READ` goes back to :data:`RECV_SIZE`.
FAST_READ = 0.01
SLOW_READ = 0.05
#: Bodies up to this size are sent in the same ``sendall`` as the head.
COALESCE_BYTES = 16384
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


_monotonic = time.monotonic


class Limit:
    """An absolute ``time.monotonic()`` bound on a wait and the error its expiry is."""

    __slots__ = ("at", "error")

    def __init__(self, at: float, error: Callable[[], UpstreamTimeout]) -> None:
        self.at = at
        self.error = error

    def remaining(self) -> float:
        """Seconds left; raises the bound's error when none are."""
        left = self.at - _monotonic()
        if left <= 0:
            raise self.error()
        return left


def _earliest(*limits: Limit | None) -> Limit | None:
    found = None
    for limit in limits:
        if limit is not None and (found is None or limit.at < found.at):
            found = limit
    return found


def _deadline_error() -> UpstreamTimeout:
    return DeadlineExceeded("request deadline reached")


def _try_error() -> UpstreamTimeout:
    return UpstreamTryTimeout("upstream attempt timed out (per_try_timeout)")


class Bounds:
    """The time bounds of one exchange beyond the per-read timeout.

    ``deadline`` bounds everything (connect, send, head, every body read: the
    request's ``Timeout``); ``try_deadline`` bounds everything up to the
    response head (``Buffer(per_try_timeout=)``); ``header_timeout`` is
    seconds from the request fully sent to the response head
    (``Forward(response_header_timeout=)``).  Each expiry raises its own
    :class:`~oxypy.UpstreamTimeout` subclass, whose reason names the bound.
    """

    __slots__ = ("deadline", "try_deadline", "header_timeout")

    def __init__(
        self,
        deadline: float | None = None,
        try_deadline: float | None = None,
        header_timeout: float | None = None,
    ) -> None:
        self.deadline = None if deadline is None else Limit(deadline, _deadline_error)
        self.try_deadline = None if try_deadline is None else Limit(try_deadline, _try_error)
        self.header_timeout = header_timeout

    def before_head(self) -> Limit | None:
        """The bound on connecting and sending."""
        if self.try_deadline is None:
            return self.deadline
        return _earliest(self.deadline, self.try_deadline)

    def head(self) -> Limit | None:
        """The bound on the response head, from now (the request was just sent)."""
        seconds = self.header_timeout
        if seconds is None:
            return self.before_head()
        header = Limit(
            _monotonic() + seconds,
            lambda: UpstreamHeaderTimeout(
                f"upstream sent no response head within {seconds:g} s (response_header_timeout)"
            ),
        )
        return _earliest(self.deadline, self.try_deadline, header)


def _capped(limit: Limit | None, timeout: float | None) -> tuple[float | None, bool]:
    """The socket timeout under ``limit``, and whether the limit is what binds."""
    if limit is None:
        return timeout, False
    left = limit.remaining()
    if timeout is None or left < timeout:
        return left, True
    return timeout, False


class BodySource:
    """The request body, read from ``wsgi.input`` as it arrives.

    ``length`` is the declared Content-Length, or None for a chunked upload
    (read to EOF; the server has set ``wsgi.input_terminated``).  Any failure
    to read (a socket error, the server's own "client gone" signal) and a
    short body mean the client went away: :class:`ClientDisconnected` (499),
    never an upstream error.  A :class:`RequestError` the server raises (a
    malformed chunked body: 400) passes through.

    An input with ``read1`` (oxypy's server) gives what has arrived, up to
    64 KiB.  Without it (gunicorn's ``Body``, pywsgi's ``Input``) ``read(n)``
    waits for ``n`` bytes, and small reads are costly: gunicorn buffers up to
    1 MiB ahead and copies the rest of that buffer on every read, which held
    a 100 MiB upload under ``-k gevent`` to a few hundred MB/s.  So the read
    size doubles, up to 1 MiB, while reads come back full within 10 ms, and
    drops back to 64 KiB after a read that waited over 50 ms (a slow client's
    bytes are not held back for long).
    """

    __slots__ = ("stream", "length", "sent", "_read", "_grows")

    def __init__(self, stream: Any, length: int | None) -> None:
        self.stream = stream
        self.length = length
        self.sent = 0
        read1 = getattr(stream, "read1", None)
        self._read = read1 if read1 is not None else stream.read
        self._grows = read1 is None

    def chunks(self) -> Iterator[bytes]:
        remaining = self.length
        read = self._read
        grows = self._grows
        size = RECV_SIZE
        started = 0.0
        while remaining is None or remaining > 0:
            want = size if remaining is None else min(size, remaining)
            if grows:
                started = time.monotonic()
            try:
                data = read(want)
            except RequestError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever the server raises: client gone
                raise ClientDisconnected("client went away during the upload") from exc
            if not data:
                if remaining is None:
                    return
                raise ClientDisconnected("client sent a short request body")
            if grows:
                took = time.monotonic() - started
                if took > SLOW_READ:
                    size = RECV_SIZE
                elif took < FAST_READ and len(data) == want:
                    size = min(size * 2, MAX_BODY_READ)
            if remaining is not None:
                remaining -= len(data)
            self.sent += len(data)
            yield data


class UpstreamResponse:
    """A response head with its connection; iterate it for the body, then ``close()``."""

    __slots__ = (
        "pool",
        "conn",
        "sock",
        "parser",
        "status",
        "reason",
        "headers",
        "head_done",
        "complete",
        "reusable",
        "no_body",
        "framed",
        "upgraded",
        "interim",
        "leftover",
        "received",
        "trailers",
        "_chunks",
        "_head_bytes",
        "_max_head",
        "_messages",
        "_released",
        "_read_timeout",
        "limit",
        "body_limit",
    )

    def __init__(self, pool: HostPool, conn: Any, max_head: int) -> None:
        self.pool = pool
        self.conn = conn
        self.sock: Any = None
        #: None once released (see :meth:`release`).
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.head_done = False
        self.complete = False
        self.reusable = True
        self.no_body = False
        self.framed = False
        self.upgraded = False
        self.interim = 0
        self.leftover = b""
        self.received = 0
        #: Trailer fields after a chunked body, as received (not filtered).
        self.trailers: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._head_bytes = 0
        self._max_head = max_head
        self._messages = 0
        self._released = False
        self._read_timeout: float | None = None
        #: The bound on the next read (None: only the socket's read timeout).
        self.limit: Limit | None = None
        #: The bound on body reads, once the head is in.
        self.body_limit: Limit | None = None

    # -- llhttp callbacks ---------------------------------------------------
    def on_message_begin(self) -> None:
        self._messages += 1
        if self.complete:
            # Bytes after a complete response (even a whole second response):
            # stop parsing here, relay nothing of them, never reuse the
            # connection (the error ends feed_data; _feed swallows it).
            self.reusable = False
            raise _AfterMessage()

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            # A trailer field (after a chunked body); bounded like the head.
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > self._max_head:
                raise UpstreamProtocolError("upstream response trailers too large")
            self.trailers.append((name.decode("latin-1"), value.decode("latin-1")))
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head:
            raise UpstreamProtocolError("upstream response head too large")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # called by the parser itself
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): skip it.
            self.interim += 1
            self.headers = []
            self.reason = ""
            return
        self.status = status
        self.head_done = True
        if not parser.should_keep_alive():
            self.reusable = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == "content-length" or (
                lname == "transfer-encoding" and value.strip().lower().endswith("chunked")
            ):
                self.framed = True

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        if self.no_body:
            self.reusable = False
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True

    # -- reading --------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            raise UpstreamProtocolError("upstream response read after its release")
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self.upgraded = True
            self.leftover = data[offset:]
            self.complete = True
        except httptools.HttpParserError as exc:
            if self.complete:
                self.reusable = False  # junk after a complete response
                return
            if isinstance(exc.__context__, UpstreamProtocolError):
                raise exc.__context__ from None
            raise UpstreamProtocolError() from exc  # the parser's detail stays in the log

    def _recv(self) -> bytes:
        limit = self.limit
        capped = False
        if limit is not None:
            timeout, capped = _capped(limit, self._read_timeout)
            self.sock.settimeout(timeout)
        try:
            data: bytes = self.sock.recv(RECV_SIZE)
        except OSError as exc:  # ssl.SSLError and TimeoutError included
            if capped and isinstance(exc, (TimeoutError, socket.timeout)):
                assert limit is not None
                raise limit.error() from exc
            raise upstream_error(exc, READ) from exc
        self.received += len(data)
        return data

    def read_head(self, method: str) -> None:
        """Read until the final response head (1xx skipped) has arrived."""
        while not self.head_done:
            data = self._recv()
            if not data:
                if self.received == 0:
                    raise UpstreamReadError("upstream closed the connection without a response")
                raise UpstreamProtocolError("upstream closed the connection mid-head")
            self._feed(data)
        if self.limit is not None or self.body_limit is not None:
            self.limit = self.body_limit
            if self.limit is None:
                self.sock.settimeout(self._read_timeout)
        if method == "HEAD" or self.status in (204, 304):
            self.no_body = True
            if not self.complete:
                # llhttp waits for a HEAD body it cannot know is absent.
                self.complete = True
                if self._chunks:
                    self.reusable = False
            self._chunks.clear()

    def __iter__(self) -> Iterator[bytes]:
        chunks = self._chunks
        while True:
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                yield data
            if self.complete:
                self.release()
                return
            data = self._recv()
            if not data:
                if not self.framed:
                    # Close-delimited body: EOF is its end.
                    self.complete = True
                    self.reusable = False
                    continue
                raise UpstreamProtocolError("upstream closed the connection mid-body")
            self._feed(data)

    def release(self) -> None:
        """Return the connection to the pool if it is clean, else close it."""
        if self._released:
            return
        self._released = True
        # The parser holds bound methods of this response: a reference cycle
        # that only the cyclic GC would free (and scan at every collection).
        self.parser = None
        if self.complete and self.reusable and not self.upgraded:
            self.pool.checkin(self.conn)
        else:
            self.pool.discard(self.conn)

    def detach(self) -> Any:
        """Hand the raw socket over (WebSocket tunnel); the pool slot is freed."""
        self._released = True
        self.parser = None  # see release()
        return self.pool.detach(self.conn)  # the tunnel owns and closes the socket now

    def close(self) -> None:
        if not self.complete:
            self.reusable = False
        self.release()


class _AfterMessage(Exception):
    """Raised from a parser callback to stop at the end of the response."""


def _frame_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def exchange(
    pool: HostPool,
    method: str,
    head: bytes,
    body: BodySource | None,
    *,
    chunked: bool,
    read_timeout: float | None,
    pool_timeout: float | None,
    max_head: int,
    expect_timeout: float | None = None,
    bounds: Bounds | None = None,
) -> UpstreamResponse:
    """Send one request and read the final response head.

    A request without a body that meets a stale keep-alive connection (reset
    or closed before any response byte) is sent once more on a fresh
    connection; no request with a body is ever sent twice here.  Connect
    errors come from :meth:`HostPool.checkout`, already mapped.  ``bounds``
    caps connect, send, the head wait and (its deadline) every body read.
    """
    for attempt in (1, 2):
        before = bounds.before_head() if bounds is not None else None
        if before is None:
            conn, reused = pool.checkout(pool_timeout)
        else:
            conn, reused = _checkout_within(pool, pool_timeout, before)
        resp = UpstreamResponse(pool, conn, max_head)
        resp._read_timeout = read_timeout
        try:
            sock = conn.sock
            resp.sock = sock
            if before is None:
                sock.settimeout(read_timeout)
                _send(resp, sock, method, head, body, chunked, expect_timeout, read_timeout)
            else:
                _send_within(
                    resp, sock, method, head, body, chunked, expect_timeout, read_timeout, before
                )
            if bounds is not None:
                resp.body_limit = bounds.deadline
                resp.limit = bounds.head()
            if isinstance(sock, CooperativeSocket):
                gevent.sleep(0)  # see the module's docstring
            resp.read_head(method)
            return resp
        except UpstreamReadError:
            resp.close()
            stale = reused and resp.received == 0 and body is None and method in IDEMPOTENT
            if stale and attempt == 1:
                continue
            raise
        except BaseException:
            resp.close()
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _checkout_within(pool: HostPool, pool_timeout: float | None, limit: Limit) -> tuple[Any, bool]:
    """``pool.checkout`` with the connect timeout capped at what ``limit`` leaves."""
    left = limit.remaining()
    try:
        return pool.checkout(pool_timeout, connect_timeout=left)
    except UpstreamTimeout as exc:
        if exc.before_send and limit.at - _monotonic() <= 0.001:
            err = limit.error()
            err.before_send = True
            raise err from exc
        raise


def _send_within(
    resp: UpstreamResponse,
    sock: Any,
    method: str,
    head: bytes,
    body: BodySource | None,
    chunked: bool,
    expect_timeout: float | None,
    read_timeout: float | None,
    limit: Limit,
) -> None:
    """``_send`` with every socket wait capped at what ``limit`` leaves."""
    timeout, capped = _capped(limit, read_timeout)
    sock.settimeout(timeout)
    if expect_timeout is not None:
        expect_timeout = min(expect_timeout, limit.remaining())
    try:
        _send(resp, sock, method, head, body, chunked, expect_timeout, timeout)
    except UpstreamTimeout as exc:
        if capped or limit.at - _monotonic() <= 0.001:
            raise limit.error() from exc
        raise


def _send(
    resp: UpstreamResponse,
    sock: Any,
    method: str,
    head: bytes,
    body: BodySource | None,
    chunked: bool,
    expect_timeout: float | None,
    read_timeout: float | None,
) -> None:
    try:
        if body is None:
            send_all(sock, head)
            return
        if expect_timeout is not None:
            send_all(sock, head)
            head = b""
            sock.settimeout(expect_timeout)
            try:
                while not resp.head_done:
                    data = resp._recv()
                    if not data:
                        raise UpstreamReadError("upstream closed the connection")
                    resp._feed(data)
                    if resp.interim and not resp.head_done:
                        break  # 100 Continue arrived: send the body
            except UpstreamTimeout:
                pass  # no answer in time: send the body anyway (RFC 9110 §10.1.1)
            finally:
                sock.settimeout(read_timeout)
            if resp.head_done:
                # A final answer before the body: the body is never sent, so
                # this connection's framing is spent.
                resp.reusable = False
                return
        pending = head
        for data in body.chunks():
            if chunked:
                data = _frame_chunk(data)
            if pending:
                if len(pending) + len(data) <= COALESCE_BYTES + len(head):
                    send_all(sock, pending + data)
                else:
                    send_all(sock, pending)
                    send_all(sock, data)
                pending = b""
            else:
                send_all(sock, data)
        tail = b"0\r\n\r\n" if chunked else b""
        if pending or tail:
            send_all(sock, pending + tail)
    except TimeoutError as exc:
        raise upstream_error(exc, SEND) from exc
    except OSError as exc:  # ssl.SSLError included
        # The upstream may have answered early (413, 401) and closed: read it.
        try:
            sock.settimeout(min(read_timeout or 1.0, 1.0))
            resp.read_head(method)
            resp.reusable = False
            return
        except UpstreamError:
            pass
        raise upstream_error(exc, SEND) from exc
