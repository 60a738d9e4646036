"""RequestID: give every request an id, pass it upstream and echo it back.

A valid incoming id is kept (when ``trust_incoming``), otherwise one is
minted.  The id travels upstream in the request header, comes back in the
response header, and is exposed as ``environ["oxypy.request_id"]`` for
``Trace`` and the application.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from . import environ as keys
from ._core.deprecation import keyword_only_since
from ._core.headers import header_to_environ
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError

__all__ = ["RequestID"]

MAX_ID_LENGTH = 200
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def valid_request_id(value: str | None) -> bool:
    """1 to 200 printable ASCII characters, no spaces or control characters."""
    if not value or len(value) > MAX_ID_LENGTH:
        return False
    return all(0x21 <= ord(c) <= 0x7E for c in value)


def _mint() -> str:
    return uuid.uuid4().hex


class RequestID:
    """Keep a valid incoming request id or mint one; echo it both ways.

    **Reads** the ``header`` request header.  **Writes** it on the environ
    (``HTTP_X_REQUEST_ID`` for the default header, so ``Forward`` sends it
    upstream), ``environ["oxypy.request_id"]``, and, when an incoming value was
    replaced, ``environ["oxypy.requestid.orig"]``.

    The response always carries exactly one ``header`` with the id this block
    chose: any value the upstream or app sent under that name is removed and
    the chosen id is added, so the client always sees the id that ``Trace``
    logged, even from an upstream that minted its own.  Streams; never
    answers by itself.

    An incoming id is valid when it has 1 to 200 printable ASCII characters
    and no spaces or control characters; anything else is replaced.

    :param header: the header name (default ``X-Request-Id``).
    :param generator: ``() -> str`` minting a new id (default: uuid4 hex); its
        output must itself be a valid id.
    :param trust_incoming: keep valid incoming ids (default True); False always
        mints (use it at an edge facing untrusted clients).
    :param skip: ``skip(environ) -> bool``; True passes the request unchanged.

    Example::

        from oxypy import Forward, RequestID, Trace
        app = Trace(RequestID(Forward("http://127.0.0.1:9000")))

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``header`` is keyword-only (positional use warns).
    """

    @keyword_only_since("0.2", "header")
    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        header: str = "X-Request-Id",
        generator: Callable[[], str] | None = None,
        trust_incoming: bool = True,
        skip: Skip | None = None,
    ) -> None:
        if not isinstance(header, str) or not _TOKEN.fullmatch(header) or "_" in header:
            raise ConfigurationError(f"header must be an HTTP header name without '_': {header!r}")
        if generator is not None and not callable(generator):
            raise ConfigurationError("generator must be a callable returning a str")
        self.next_app = next_app
        self.header = header
        self.header_lower = header.lower()
        self.environ_key = header_to_environ(header)
        self.generator = generator or _mint
        self.trust_incoming = trust_incoming
        self.skip = skip

    def choose(self, incoming: str | None) -> str:
        """The id for a request that arrived with ``incoming`` (or none)."""
        if self.trust_incoming and incoming is not None and valid_request_id(incoming):
            return incoming
        minted = self.generator()
        if not isinstance(minted, str) or not valid_request_id(minted):
            raise ConfigurationError(f"RequestID generator returned an invalid id: {minted!r}")
        return minted

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        incoming = environ.get(self.environ_key)
        request_id = self.choose(incoming)
        if incoming is not None and incoming != request_id:
            environ[keys.REQUEST_ID_ORIG] = incoming
        environ[self.environ_key] = request_id
        environ[keys.REQUEST_ID] = request_id
        name, lower = self.header, self.header_lower

        def id_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            headers = [(n, v) for n, v in headers if n.lower() != lower]
            headers.append((name, request_id))
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        return self.next_app(environ, id_start_response)
