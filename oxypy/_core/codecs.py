"""Streaming content codings for ``Compress``: gzip, and brotli/zstd when installed.

Each coder compresses a stream in calls to :meth:`compress`, makes everything
so far decodable with :meth:`flush` (a sync flush: the stream stays open), and
ends it with :meth:`finish`.  gzip is zlib from the standard library; brotli
comes from ``brotli`` or ``brotlicffi`` and zstd from ``zstandard`` or, on
Python 3.14+, the standard library's ``compression.zstd``.  A coding whose
library is missing is simply not offered (:func:`available`).
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

__all__ = ["KNOWN", "Coder", "available", "negotiate"]

#: Levels chosen by measured speed and ratio (8 MiB of JSON, one core, see
#: benchmarks/compress.py): gzip 4 gives 122 MB/s at ratio 5.1 (level 6:
#: 67 MB/s, 5.5); brotli 3 gives 122 MB/s at 5.7 (quality 4: 48 MB/s, 6.2);
#: zstd 3 gives 383 MB/s at 5.6.  On-the-fly compression wants the knee
#: where more CPU stops buying ratio, not the archival levels.
GZIP_LEVEL = 4
BROTLI_QUALITY = 3
ZSTD_LEVEL = 3


class Coder(Protocol):
    def compress(self, data: bytes | memoryview) -> bytes: ...
    def flush(self) -> bytes: ...
    def finish(self) -> bytes: ...


class _Gzip:
    __slots__ = ("_z",)

    def __init__(self) -> None:
        self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._z.compress(data)

    def flush(self) -> bytes:
        return self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("_c", "_process")

    def __init__(self, module: Any) -> None:
        self._c = module.Compressor(quality=BROTLI_QUALITY)
        self._process = getattr(self._c, "process", None) or self._c.compress

    def compress(self, data: bytes | memoryview) -> bytes:
        return bytes(self._process(bytes(data)))

    def flush(self) -> bytes:
        return bytes(self._c.flush())

    def finish(self) -> bytes:
        return bytes(self._c.finish())


class _Zstd:
    """A zstd compressor: ``zstandard``'s compressobj or Python 3.14's ``compression.zstd``.

    Both take ``compress(data)``, ``flush(mode)`` with a block-flush mode, and
    ``flush()`` to end the frame; they differ only in how one is made.
    """

    __slots__ = ("_c", "_block")

    def __init__(self, compressor: Any, block_mode: Any) -> None:
        self._c = compressor
        self._block = block_mode

    def compress(self, data: bytes | memoryview) -> bytes:
        return bytes(self._c.compress(data))

    def flush(self) -> bytes:
        return bytes(self._c.flush(self._block))

    def finish(self) -> bytes:
        return bytes(self._c.flush())


def _first(*names: str) -> Any:
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _factories() -> dict[str, Callable[[], Coder]]:
    out: dict[str, Callable[[], Coder]] = {"gzip": _Gzip}
    brotli = _first("brotli", "brotlicffi")
    if brotli is not None:
        out["br"] = lambda: _Brotli(brotli)
    zstandard = _first("zstandard")
    if zstandard is not None:
        out["zstd"] = lambda: _Zstd(
            zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj(),
            zstandard.COMPRESSOBJ_FLUSH_BLOCK,
        )
    else:
        stdlib = _first("compression.zstd")
        if stdlib is not None:
            out["zstd"] = lambda: _Zstd(
                stdlib.ZstdCompressor(level=ZSTD_LEVEL), stdlib.ZstdCompressor.FLUSH_BLOCK
            )
    return out


#: Every coding Compress knows, installed or not.
KNOWN = ("zstd", "br", "gzip")


@lru_cache(maxsize=1)
def available() -> dict[str, Callable[[], Coder]]:
    """Coding name -> coder factory, for the codings whose library is importable."""
    return _factories()


def _q(params: str) -> float | None:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return None
            return q if 0.0 <= q <= 1.0 else None
    return 1.0


@lru_cache(maxsize=1024)
def negotiate(accept: str, offered: tuple[str, ...]) -> str | None:
    """The coding of ``offered`` to use for ``Accept-Encoding: accept`` (None: identity).

    Highest q-value wins (RFC 9110 §12.5.3); ``q=0`` refuses a coding; ``*``
    stands for every coding not named; ties go to the earlier of ``offered``;
    ``identity`` wins over a coding only with an explicit, strictly higher q.  A
    malformed q-value drops its entry.  ``x-gzip`` is ``gzip``.
    """
    prefs: dict[str, float] = {}
    for part in accept.split(","):
        token, _, params = part.partition(";")
        token = token.strip().lower()
        if not token:
            continue
        q = _q(params) if params else 1.0
        if q is None:
            continue
        if token == "x-gzip":
            token = "gzip"
        prefs[token] = max(q, prefs.get(token, 0.0))
    star = prefs.get("*")
    best, best_q = None, 0.0
    for coding in offered:
        q = prefs.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    # Unnamed, identity is acceptable but not preferred: only an explicit
    # higher q-value makes it win over a coding the client asked for.
    if best is None or prefs.get("identity", 0.0) > best_q:
        return None
    return best
