"""Sticky-session cookies: signing, rendering and reading them.

One :class:`StickyCookies` per balancer, built from its
:class:`~oxypy.StickySession` value.  The pool asks it for each server's
cookie value when the server is added (:meth:`value_for`); the request path
asks it which value a request's cookie carries (:meth:`requested`) and for
the ``Set-Cookie`` header of a new pick (:meth:`render`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from .._core.types import WSGIEnvironment
from ..exceptions import ConfigurationError
from ..sticky import StickySession
from .address import parse_server

__all__ = ["StickyCookies"]

_DIGEST_BYTES = 16  # 128-bit tag: unguessable, short cookie
_HMAC_VALUE = re.compile(r"^[A-Za-z0-9_-]{22}$")


class StickyCookies:
    """The cookie machinery of one :class:`~oxypy.StickySession`."""

    __slots__ = ("cookie_name", "raw", "_key", "_prefix", "_suffix")

    def __init__(self, config: StickySession) -> None:
        secret = config.secret
        self.cookie_name = config.cookie_name
        self.raw = config.value == "raw"
        self._key = secret.encode("utf-8") if isinstance(secret, str) else (secret or b"")
        self._prefix = config.cookie_name + "="
        # Attribute order follows Go's http.Cookie.String(), as oxy's tests expect.
        attrs = []
        if config.path:
            attrs.append(f"Path={config.path}")
        if config.domain:
            attrs.append(f"Domain={config.domain}")
        if config.max_age is not None:
            attrs.append(f"Max-Age={max(config.max_age, 0)}")
        if config.http_only:
            attrs.append("HttpOnly")
        if config.secure:
            attrs.append("Secure")
        if config.same_site is not None:
            attrs.append(f"SameSite={config.same_site}")
        self._suffix = "".join("; " + a for a in attrs)

    def value_for(self, identity: str) -> str:
        """The key a request's cookie is matched on (the HMAC, or the raw identity)."""
        if self.raw:
            return identity
        tag = hmac.new(self._key, identity.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(tag[:_DIGEST_BYTES]).rstrip(b"=").decode("ascii")

    def render(self, url: str, key: str) -> str:
        """The ``Set-Cookie`` header value pinning the server ``url`` (match key ``key``)."""
        return self._prefix + (url if self.raw else key) + self._suffix

    def requested(self, environ: WSGIEnvironment) -> str | None:
        """The match key this request's cookie carries, if well formed."""
        header = environ.get("HTTP_COOKIE")
        if not header or self.cookie_name not in header:
            return None
        for part in header.split(";"):
            name, sep, value = part.partition("=")
            if not sep or name.strip() != self.cookie_name:
                continue
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if self.raw:
                try:
                    return parse_server(value)[1]
                except ConfigurationError:
                    return None
            return value if _HMAC_VALUE.match(value) else None
        return None
