"""Buffer's per-attempt machinery: capturing a response, then sending or dropping it.

:class:`Capture` is the ``start_response`` an attempt sees; :class:`Captured`
holds a finished attempt until the retry decision, then sends it (with a
definite ``Content-Length``) or discards it.  :class:`Failed` is an attempt
that raised before anything reached the client (an upstream cut short, a
client gone): it is decided on like any other, and answered through the
error handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any

from .._core.iterables import ClosingIterable
from .._core.types import StartResponse, WSGIEnvironment
from ..errors import ErrorHandler, relay_or_answer, respond_error, restarting
from ..exceptions import ClientDisconnected, RequestError, UpstreamError
from .store import SpillBuffer

__all__ = ["Capture", "Captured", "Failed", "Final", "Streaming", "close_iterable"]

_NO_BODY_STATUS = frozenset({204, 304})


class Capture:
    """``start_response`` for one attempt: records the head, or streams when it must."""

    __slots__ = ("status", "code", "headers", "body", "passthrough", "_start", "_stream_early")

    def __init__(self, body: SpillBuffer, start: StartResponse | None) -> None:
        self.status: str | None = None
        #: The status code (0 until ``start_response``), parsed once.
        self.code = 0
        self.headers: list[tuple[str, str]] = []
        self.body = body
        self.passthrough: Callable[[bytes], object] | None = None
        self._start = start  # None: never pass through (the request may still retry)
        self._stream_early = start is not None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None:
            try:
                if self.passthrough is not None and self._start is not None:
                    return self._start(status, headers, exc_info)
            finally:
                exc_info = None
            self.body.reset()
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        self.status, self.headers = status, list(headers)
        self.code = int(status[:3])
        if self._start is not None and _streams(status, headers):
            self.passthrough = self._start(status, headers)
            return self.passthrough
        return self.write

    def write(self, data: bytes) -> None:
        self.body.write(data)


def _streams(status: str, headers: list[tuple[str, str]]) -> bool:
    if status[:3] == "101":
        return True
    for name, value in headers:
        if name.lower() == "content-type" and value.split(";")[0].strip().lower() == (
            "text/event-stream"
        ):
            return True
    return False


@dataclass
class Streaming:
    first: list[bytes]
    iterator: Iterator[bytes]
    result: Iterable[bytes]


class Final:
    """An attempt that ended the request (error or pass-through): no retry."""

    __slots__ = ("body",)

    def __init__(self, body: Iterable[bytes]) -> None:
        self.body = body


class Failed:
    """An attempt that raised before its answer reached the client.

    ``error`` is the :class:`~oxypy.RequestError` (an
    :class:`~oxypy.UpstreamError` for an upstream that failed mid-body, a
    :class:`~oxypy.ClientDisconnected` for a client that left); it is answered
    with its own status (502, 504, 499) through the error handler.  With
    ``restart`` the head of a pass-through response was already handed to the
    server (not yet sent): the answer replaces it (``exc_info``).
    """

    __slots__ = ("error", "restart")

    def __init__(self, error: RequestError, *, restart: bool = False) -> None:
        self.error = error
        self.restart = restart

    @property
    def code(self) -> int:
        return self.error.status

    @property
    def network_error(self) -> bool:
        return isinstance(self.error, UpstreamError)

    @property
    def client_gone(self) -> bool:
        return isinstance(self.error, ClientDisconnected)

    def discard(self) -> None:
        return None

    def send(
        self, environ: WSGIEnvironment, start_response: StartResponse, handler: ErrorHandler
    ) -> Iterable[bytes]:
        exc = self.error
        if self.restart:
            start_response = restarting(start_response, exc)
        return respond_error(handler, environ, start_response, exc)


class Captured:
    """A finished attempt: its head, and its body (buffered, or ready to stream)."""

    __slots__ = ("capture", "store", "streaming")

    def __init__(
        self, capture: Capture, store: SpillBuffer, streaming: Streaming | None = None
    ) -> None:
        self.capture = capture
        self.store = store
        self.streaming = streaming

    @property
    def code(self) -> int:
        return self.capture.code

    network_error = False
    client_gone = False

    def discard(self) -> None:
        if self.streaming is not None:
            close_iterable(self.streaming.result)
        self.store.close()

    def send(
        self, environ: WSGIEnvironment, start_response: StartResponse, handler: ErrorHandler
    ) -> Iterable[bytes]:
        capture, store = self.capture, self.store
        status = capture.status
        assert status is not None  # Captured is only built once a status exists
        streaming = self.streaming
        if streaming is not None:
            # Head-only mode: what write() received, then the body as it streams.
            try:
                write = start_response(status, capture.headers)
                if store.size:
                    for data in store.chunks():
                        write(data)
                if capture.code == 101:
                    # A tunnel's client waits for the 101 before it says
                    # anything: flush the head now (PEP 3333 write()).
                    write(b"")
            except BaseException:
                self.discard()
                raise
            # From now on the attempt talks to the server: a later
            # start_response (with exc_info, an app answering an error in place
            # of a head not sent yet) goes straight through.
            capture.passthrough = write
            capture._start = start_response
            started = store.size > 0
            store.close()
            # An upstream failing before its first body byte gets its 502/504;
            # after that the client connection is cut, never padded.
            body = relay_or_answer(
                chain(streaming.first, streaming.iterator),
                handler,
                environ,
                start_response,
                started=started,
            )
            return ClosingIterable(body, partial(close_iterable, streaming.result))
        headers = capture.headers
        code = capture.code
        no_body = code < 200 or code in _NO_BODY_STATUS or environ.get("REQUEST_METHOD") == "HEAD"
        if not no_body:
            headers = [
                (n, v)
                for n, v in headers
                if n.lower() not in ("content-length", "transfer-encoding")
            ]
            headers.append(("Content-Length", str(store.size)))
        try:
            start_response(status, headers)
        except BaseException:
            store.close()
            raise
        if no_body or store.size == 0:
            store.close()
            return [b""] if no_body else []
        if not store.on_disk:
            data = b"".join(store.chunks(store.size))
            store.close()
            return [data]
        return ClosingIterable(store.chunks(), store.close)


def close_iterable(result: Iterable[bytes] | None) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()
