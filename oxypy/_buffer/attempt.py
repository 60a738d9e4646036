"""Buffer's per-attempt machinery: capturing a response, then sending or dropping it.

:class:`Capture` is the ``start_response`` an attempt sees; :class:`Captured`
holds a finished attempt until the retry decision, then sends it (with a
definite ``Content-Length``) or discards it.  :func:`client_probe` tells
whether the client connection has closed, so retries stop for a gone client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import environ as keys
from .._core.iterables import ClosingIterable
from .._core.sockets import peer_closed
from .._core.types import StartResponse, WSGIEnvironment
from .store import SpillBuffer

__all__ = ["Capture", "Captured", "Final", "Streaming", "client_probe", "close_iterable"]

_NO_BODY_STATUS = frozenset({204, 304})


class Capture:
    """``start_response`` for one attempt: records the head, or streams when it must."""

    __slots__ = ("status", "headers", "body", "passthrough", "_start", "_stream_early")

    def __init__(self, body: SpillBuffer, start: StartResponse | None) -> None:
        self.status: str | None = None
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
        if self._start is not None and _streams(status, headers):
            self.passthrough = self._start(status, headers)
            return self.passthrough
        return self.write

    def write(self, data: bytes) -> None:
        self.body.write(data)

    @property
    def code(self) -> int:
        if self.status is None:
            return 0
        return int(self.status[:3])


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

    def discard(self) -> None:
        if self.streaming is not None:
            close_iterable(self.streaming.result)
        self.store.close()

    def send(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        capture, store = self.capture, self.store
        status = capture.status
        assert status is not None  # Captured is only built once a status exists
        streaming = self.streaming
        if streaming is not None:
            # Head-only mode: what write() received, then the body as it streams.
            try:
                write = start_response(status, capture.headers)
                for data in store.chunks():
                    write(data)
            except BaseException:
                self.discard()
                raise
            store.close()

            def gen() -> Iterator[bytes]:
                yield from streaming.first
                yield from streaming.iterator

            return ClosingIterable(gen(), lambda: close_iterable(streaming.result))
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


def close_iterable(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def client_probe(environ: WSGIEnvironment) -> Callable[[], bool] | None:
    """A ``() -> bool`` telling whether the client connection has closed, if knowable.

    ``oxypy.serve`` provides ``environ["oxypy.client_gone"]``; under gunicorn
    the client socket it exposes is peeked without blocking.  Other servers
    give no way to know: then only Forward's ``ClientDisconnected`` tells.
    """
    provided = environ.get(keys.CLIENT_GONE)
    if callable(provided):
        return provided  # type: ignore[no-any-return]
    sock = environ.get("gunicorn.socket") or environ.get("gunicorn.sock")
    if sock is None or not hasattr(sock, "fileno"):
        return None
    return lambda: peer_closed(sock, data_is_fine=True)
