"""Bounded body storage for Buffer: memory up to a threshold, then a temp file.

A :class:`SpillBuffer` holds one body.  Bytes go to memory until the memory
threshold would be passed, then everything moves to an anonymous
``tempfile.TemporaryFile`` in the spool directory (the system temp dir unless
given; unlinked at creation, so nothing is left on disk even if the process
dies).  :meth:`SpillBuffer.reader` hands out independent
readers positioned at 0, one per attempt, so a retry replays the body
byte-exact; :meth:`SpillBuffer.close` releases the file exactly once.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from typing import IO

from .._core.iterables import LineIteration

__all__ = ["CHUNK", "Overflow", "SpillBuffer"]

#: Read and write granularity (matches the server's and Forward's recv size).
CHUNK = 65536


class Overflow(Exception):
    """Raised by :meth:`SpillBuffer.write` when the body passes its maximum."""


class SpillBuffer:
    """One body, in memory up to ``mem_limit`` bytes, then in a temp file."""

    __slots__ = (
        "mem_limit",
        "max_size",
        "spool_dir",
        "size",
        "_mem",
        "_frozen",
        "_file",
        "_closed",
    )

    def __init__(self, mem_limit: int, max_size: int | None, spool_dir: str | None = None) -> None:
        self.mem_limit = mem_limit
        self.max_size = max_size
        self.spool_dir = spool_dir
        self.size = 0
        self._mem = bytearray()
        self._frozen: bytes | None = None
        self._file: IO[bytes] | None = None
        self._closed = False

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        if not data:
            return
        size = self.size + len(data)
        if self.max_size is not None and size > self.max_size:
            raise Overflow(size)
        self._frozen = None
        if self._file is None and size > self.mem_limit:
            self._file = tempfile.TemporaryFile(dir=self.spool_dir)
            if self._mem:
                self._file.write(self._mem)
                self._mem = bytearray()
        if self._file is not None:
            self._file.write(data)
        else:
            self._mem += data
        self.size = size

    def reset(self) -> None:
        """Forget the content (a new ``start_response`` with ``exc_info``)."""
        self.close()
        self._closed = False
        self.size = 0

    def _bytes(self) -> bytes:
        if self._frozen is None:
            self._frozen = bytes(self._mem)
            self._mem = bytearray()
            self._mem += self._frozen
        return self._frozen

    def reader(self) -> IO[bytes] | _FileReader:
        """A fresh file-like reader at position 0 (closing it keeps the body)."""
        if self._file is None:
            return io.BytesIO(self._bytes())
        self._file.flush()
        return _FileReader(self._file.fileno(), self.size)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """Yield the body in pieces of at most ``size`` bytes."""
        if self._file is None:
            data = self._bytes()
            for start in range(0, len(data), size):
                yield data[start : start + size]
            return
        self._file.flush()
        fd, pos = self._file.fileno(), 0
        while pos < self.size:
            piece = os.pread(fd, min(size, self.size - pos), pos)
            if not piece:
                raise OSError("buffered body file shrank")
            pos += len(piece)
            yield piece

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._mem = bytearray()
        self._frozen = None
        file, self._file = self._file, None
        if file is not None:
            file.close()


class _FileReader(LineIteration):
    """A read-only view of a spilled body with its own position (``os.pread``)."""

    __slots__ = ("_fd", "_size", "_pos")

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._size - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        parts = []
        while size > 0:
            piece = os.pread(self._fd, min(size, 1 << 20), self._pos)
            if not piece:
                break
            parts.append(piece)
            self._pos += len(piece)
            size -= len(piece)
        return b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        return self.read(CHUNK if size is None or size < 0 else min(size, CHUNK))

    def readline(self, size: int | None = -1) -> bytes:
        limit = self._size - self._pos if size is None or size < 0 else size
        out = bytearray()
        while len(out) < limit:
            piece = os.pread(self._fd, min(CHUNK, limit - len(out)), self._pos)
            if not piece:
                break
            nl = piece.find(b"\n")
            if nl >= 0:
                piece = piece[: nl + 1]
            out += piece
            self._pos += len(piece)
            if nl >= 0:
                break
        return bytes(out)

    def close(self) -> None:
        pass
