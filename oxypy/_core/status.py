"""The one table of HTTP status phrases: the standard ones, plus nginx's 499."""

from __future__ import annotations

from http import HTTPStatus

__all__ = ["reason_phrase", "status_line"]

#: Codes outside the IANA registry that the toolkit still names.
_EXTRA = {499: "Client Closed Request"}


def reason_phrase(code: int) -> str:
    """The standard reason phrase of ``code`` (``"Error"`` for an unknown code)."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return _EXTRA.get(code, "Error")


def status_line(code: int) -> str:
    """``"404 Not Found"``: a WSGI status string with the standard phrase."""
    return f"{code} {reason_phrase(code)}"
