"""The one table of HTTP status phrases: the standard ones, plus nginx's 499."""

from __future__ import annotations

from http import HTTPStatus

__all__ = ["reason_phrase", "status_line"]

#: Every registered code, plus the codes outside the registry the toolkit names.
_PHRASES: dict[int, str] = {status.value: status.phrase for status in HTTPStatus}
_PHRASES[499] = "Client Closed Request"


def reason_phrase(code: int) -> str:
    """The standard reason phrase of ``code`` (``"Error"`` for an unknown code)."""
    return _PHRASES.get(code, "Error")


def status_line(code: int) -> str:
    """``"404 Not Found"``: a WSGI status string with the standard phrase."""
    return f"{code} {_PHRASES.get(code, 'Error')}"
