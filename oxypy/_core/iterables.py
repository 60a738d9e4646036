"""Response iterables whose ``close()`` runs cleanup exactly once.

In WSGI the body is produced after ``app()`` returns, so every block settles
its per-request state in the ``close()`` of the iterable it returns.  That
``close()`` always closes the inner iterable first and is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["ClosingIterable"]


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
