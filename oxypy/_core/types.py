"""WSGI type aliases shared by every block.

The aliases re-export :mod:`_typeshed.wsgi` for the type checker and fall back
to loose runtime aliases, so importing this module costs nothing at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
else:
    WSGIEnvironment = dict
    StartResponse = Callable
    WSGIApplication = Callable

__all__ = [
    "Clock",
    "Headers",
    "Skip",
    "StartResponse",
    "WSGIApplication",
    "WSGIEnvironment",
]

#: A response header list as WSGI passes it to ``start_response``.
Headers = list[tuple[str, str]]

#: ``skip=`` callables: return True to pass the request straight to the next app.
Skip = Callable[["WSGIEnvironment"], bool]


class Clock(Protocol):
    """A monotonic clock in seconds, injected where time matters (tests step it)."""

    def __call__(self) -> float: ...


def _unused(_: Iterable[Any]) -> None:  # pragma: no cover - keeps imports honest
    return None
