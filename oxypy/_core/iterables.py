"""Response iterables whose ``close()`` runs cleanup exactly once, and line iteration.

In WSGI the body is produced after ``app()`` returns, so every block settles
its per-request state in the ``close()`` of the iterable it returns.  That
``close()`` always closes the inner iterable first and is idempotent.
:class:`LineIteration` gives a body reader with ``readline()`` the rest of the
file-like line protocol PEP 3333 asks of ``wsgi.input``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["ClosingIterable", "LineIteration"]


class LineIteration:
    """``readlines()``, ``__iter__`` and ``__next__`` on top of a ``readline()``."""

    __slots__ = ()

    def readline(self, size: int = -1) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class ClosingIterable:
    """Wrap ``iterable``; on ``close()`` close it, then call ``callbacks`` once.

    ``on_chunk`` (optional) sees every chunk as it passes, e.g. to count bytes.
    A callback's exception is raised after the remaining callbacks have run.
    """

    __slots__ = ("_iterable", "_iterator", "_callbacks", "_closed")

    def __init__(self, iterable: Iterable[bytes], *callbacks: Callable[[], Any]) -> None:
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._callbacks = callbacks
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        return self._iterator

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        error: BaseException | None = None
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error = exc
        for callback in self._callbacks:
            try:
                callback()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                error = error or exc
        if error is not None:
            raise error
