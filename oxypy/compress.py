"""Compress: encode responses with zstd, brotli or gzip as the client accepts.

The coding is negotiated from ``Accept-Encoding``; the body streams: every
chunk the next app yields is compressed and flushed at once, so server-sent
updates and long polls keep flowing.  Large chunks are compressed in slices
with a yield to the event loop between them, so one big body never stalls
the other requests a gevent worker serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent

from ._core.codecs import KNOWN, Coder, available, negotiate
from ._core.headers import connection_tokens, merge_vary
from ._core.iterables import ClosingIterable
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError

__all__ = ["Compress"]

#: Bytes handed to the compressor per call; between slices the greenlet yields.
SLICE = 64 * 1024

_NEVER_STATUS = frozenset({204, 206, 304})


class _State:
    """What the last ``start_response`` call decided (per request)."""

    __slots__ = ("coder", "decided")

    def __init__(self) -> None:
        self.coder: Coder | None = None
        self.decided = False


def _compress(coder: Coder, chunk: bytes) -> Iterator[bytes]:
    """Compress ``chunk`` in slices, yielding to the hub between them, then flush."""
    if len(chunk) <= SLICE:
        out = coder.compress(chunk)
    else:
        view = memoryview(chunk)
        out = b""
        for start in range(0, len(chunk), SLICE):
            if start:
                gevent.sleep(0)
            piece = coder.compress(view[start : start + SLICE])
            if piece:
                if out:
                    yield out
                out = piece
    out += coder.flush()
    if out:
        yield out


def _encoded(body: Iterable[bytes], state: _State) -> Iterator[bytes]:
    for chunk in body:
        coder = state.coder
        if coder is None:
            yield chunk
        elif chunk:
            yield from _compress(coder, chunk)
    if state.coder is not None:
        tail = state.coder.finish()
        if tail:
            yield tail


class Compress:
    """Compress response bodies with the best coding the client accepts.

    **Reads** ``Accept-Encoding`` (q-values honoured, ``q=0`` refuses a
    coding, ``*`` stands for the others, ``identity`` wins only with an
    explicitly higher q; ties go to the order of ``encodings``), and the
    response's status, ``Content-Type``, ``Content-Encoding``,
    ``Content-Length``, ``Content-Range`` and ``Cache-Control``.

    **Never compresses**: requests without ``Accept-Encoding``, ``HEAD``,
    upgrades (``Connection: upgrade``), 1xx, 204, 206 and 304 responses,
    ``Content-Range``, bodies already carrying a ``Content-Encoding``,
    ``text/event-stream``, ``Cache-Control: no-transform``, and bodies whose
    ``Content-Length`` is under ``min_size`` (inclusive: ``min_size`` bytes
    are compressed).  A body of unknown length is compressed.

    **Writes**, when it compresses: ``Content-Encoding``, no
    ``Content-Length`` (the server frames the body), no ``Accept-Ranges``
    (ranges apply to the uncompressed representation), a strong ``ETag``
    made weak (``W/"…"``), and ``Accept-Encoding`` merged into ``Vary``;
    ``Vary`` is merged too when the client accepted no coding, since the
    answer depended on the header.  **Streams**: each chunk from the next app
    is compressed and flushed (zlib ``Z_SYNC_FLUSH``, brotli ``flush``, zstd
    block flush) before the next one is read, in slices of 64 KiB with a
    ``gevent.sleep(0)`` between slices.  Nothing is buffered and the block
    answers no request itself.

    gzip uses the standard library's zlib.  ``br`` needs ``brotli`` or
    ``brotlicffi`` (extra ``oxypy-gateway[brotli]``), ``zstd`` needs ``zstandard``
    (extra ``oxypy-gateway[zstd]``) or Python 3.14's ``compression.zstd``.  A coding
    whose library is not installed is silently left out of negotiation.

    :param min_size: smallest ``Content-Length`` compressed (default 1024).
    :param encodings: codings to offer, in server preference order, from
        ``"zstd"``, ``"br"`` and ``"gzip"`` (default all three).
    :param skip: ``skip(environ) -> bool``; True passes the request unchanged.

    Example::

        from oxypy import Compress, Forward
        app = Compress(Forward("http://127.0.0.1:9000"), min_size=512)
        # only gzip, for old clients and caches:
        gz = Compress(Forward("http://127.0.0.1:9000"), encodings=["gzip"])

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        min_size: int = 1024,
        encodings: Iterable[str] = KNOWN,
        skip: Skip | None = None,
    ) -> None:
        if skip is not None and not callable(skip):
            raise ConfigurationError("skip must be a callable (environ) -> bool")
        if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
            raise ConfigurationError(f"min_size must be an integer >= 0, got {min_size!r}")
        if isinstance(encodings, str) or not isinstance(encodings, Iterable):
            raise ConfigurationError("encodings must be a list such as ['zstd', 'br', 'gzip']")
        chosen: list[str] = []
        for name in encodings:
            if name not in KNOWN:
                raise ConfigurationError(
                    f"encodings: unknown coding {name!r} (known: {', '.join(KNOWN)})"
                )
            if name in chosen:
                raise ConfigurationError(f"encodings: {name!r} given twice")
            chosen.append(name)
        if not chosen:
            raise ConfigurationError("encodings must name at least one coding")
        factories = available()
        self.next_app = next_app
        self.min_size = min_size
        #: The codings offered: those asked for whose library is importable.
        self.encodings = tuple(name for name in chosen if name in factories)
        self._factories = factories
        self.skip = skip

    def _start_response(
        self, coding: str | None, state: _State, start_response: StartResponse
    ) -> StartResponse:
        min_size = self.min_size
        factory = self._factories[coding] if coding is not None else None

        def compress_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            state.decided = True
            state.coder = None
            if _eligible(status, headers, min_size):
                headers = merge_vary(list(headers), "Accept-Encoding")
                if factory is not None:
                    state.coder = factory()
                    headers = _encoded_headers(headers, coding or "")
            write = (
                start_response(status, headers, exc_info)
                if exc_info is not None
                else start_response(status, headers)
            )
            coder = state.coder
            if coder is None:
                return write

            def compressed_write(data: bytes) -> object:
                if data:
                    for piece in _compress(coder, data):
                        write(piece)
                return None

            return compressed_write

        return compress_start_response

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        accept = environ.get("HTTP_ACCEPT_ENCODING")
        if (
            accept is None
            or environ.get("REQUEST_METHOD") == "HEAD"
            or (self.skip is not None and self.skip(environ))
            or "upgrade" in connection_tokens(environ.get("HTTP_CONNECTION"))
        ):
            return self.next_app(environ, start_response)
        coding = negotiate(accept, self.encodings)
        state = _State()
        body = self.next_app(environ, self._start_response(coding, state, start_response))
        if state.decided and state.coder is None:
            return body
        close = getattr(body, "close", None)
        return ClosingIterable(_encoded(body, state), *((close,) if close is not None else ()))


def _eligible(status: str, headers: list[tuple[str, str]], min_size: int) -> bool:
    try:
        code = int(status[:3])
    except ValueError:
        return False
    if code < 200 or code in _NEVER_STATUS:
        return False
    for name, value in headers:
        lower = name.lower()
        if lower == "content-encoding":
            if value.strip().lower() not in ("", "identity"):
                return False
        elif lower == "content-type":
            if value.split(";", 1)[0].strip().lower() == "text/event-stream":
                return False
        elif lower == "cache-control":
            if "no-transform" in connection_tokens(value):
                return False
        elif lower == "content-length":
            try:
                if int(value) < min_size:
                    return False
            except ValueError:
                return False
        elif lower == "content-range":
            return False
    return True


def _encoded_headers(headers: list[tuple[str, str]], coding: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in ("content-length", "content-encoding", "accept-ranges"):
            continue
        if lower == "etag":
            tag = value.strip()
            if not tag.startswith("W/"):
                value = "W/" + tag
        out.append((name, value))
    out.append(("Content-Encoding", coding))
    return out
