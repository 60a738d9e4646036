"""Sticky sessions: a cookie pins a client to the server that first served it.

The cookie never reveals the backend address by default: its value is an
HMAC-SHA256 of the server's identity, so a client can neither read which
backend it is on nor forge a cookie that steers it to a server it was never
given (oxy's raw-URL cookies did both, vulcand/oxy#107).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from ._core.types import WSGIEnvironment
from .exceptions import ConfigurationError

__all__ = ["StickySession"]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_ATTR_VALUE = re.compile(r"^[\x21-\x3a\x3c-\x7e]+$")  # printable, no space or ';'
_SAME_SITE = {"lax": "Lax", "strict": "Strict", "none": "None"}
_DIGEST_BYTES = 16  # 128-bit tag: unguessable, short cookie
_HMAC_VALUE = re.compile(r"^[A-Za-z0-9_-]{22}$")


class StickySession:
    """Cookie affinity for a balancer: ``RoundRobin(fwd, servers, sticky=StickySession("lb"))``.

    A request whose cookie names a server that may take it (in the pool,
    weight above 0, healthy, not ejected, not already tried by this client
    request) goes to that server and no cookie is set.  Otherwise the
    balancer picks as usual and the response gets a fresh ``Set-Cookie``
    naming the pick.  A forged, stale or garbage cookie is ignored, never an
    error.

    **Reads** the ``Cookie`` header.  **Writes** ``Set-Cookie`` on responses
    whose server was newly chosen.

    :param cookie_name: the cookie's name (an RFC 6265 token).
    :param secure: add ``Secure``.
    :param http_only: add ``HttpOnly`` (default True).
    :param same_site: ``"Lax"`` (default), ``"Strict"``, ``"None"``, or None to omit.
    :param max_age: seconds for ``Max-Age``; None omits it (a session cookie),
        a negative value renders ``Max-Age=0``.
    :param path: ``Path`` attribute (default ``/``).
    :param domain: ``Domain`` attribute, omitted by default.
    :param value: ``"hmac"`` (default): the value is a truncated, URL-safe
        HMAC-SHA256 of the server identity (scheme, host, port, path) keyed by
        ``secret``.  ``"raw"``: the value is the server URL itself; only for
        trusted clients, since it reveals the backend and lets a client pick one.
    :param secret: the HMAC key (str or bytes).  With an explicit secret,
        cookies stay valid across proxy restarts and across several proxies
        sharing it.  When None, a random key is made per instance, so
        stickiness lasts only as long as this ``StickySession`` object.

    Example::

        from oxypy import Forward, RoundRobin, StickySession
        lb = RoundRobin(Forward(), ["http://10.0.0.1:80", "http://10.0.0.2:80"],
                        sticky=StickySession("srv", secret="change me", secure=True))

    .. versionadded:: 0.1
    """

    __slots__ = ("cookie_name", "raw", "_key", "_suffix", "_prefix")

    def __init__(
        self,
        cookie_name: str,
        *,
        secure: bool = False,
        http_only: bool = True,
        same_site: str | None = "Lax",
        max_age: int | None = None,
        path: str | None = "/",
        domain: str | None = None,
        value: str = "hmac",
        secret: str | bytes | None = None,
    ) -> None:
        if not isinstance(cookie_name, str) or not _TOKEN.match(cookie_name):
            raise ConfigurationError(f"cookie_name must be a cookie token, got {cookie_name!r}")
        if value not in ("hmac", "raw"):
            raise ConfigurationError(f'value must be "hmac" or "raw", got {value!r}')
        for name, attr in (("path", path), ("domain", domain)):
            if attr is not None and (not isinstance(attr, str) or not _ATTR_VALUE.match(attr)):
                raise ConfigurationError(f"{name} must be printable without ';' or spaces")
        site: str | None = None
        if same_site is not None:
            site = _SAME_SITE.get(str(same_site).lower())
            if site is None:
                raise ConfigurationError(
                    f"same_site must be 'Lax', 'Strict', 'None' or None, got {same_site!r}"
                )
        if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int)):
            raise ConfigurationError(f"max_age must be an int or None, got {max_age!r}")
        if secret is None:
            key = secrets.token_bytes(32)
        elif isinstance(secret, str):
            key = secret.encode("utf-8")
        elif isinstance(secret, bytes):
            key = secret
        else:
            raise ConfigurationError("secret must be str or bytes")
        if not key:
            raise ConfigurationError("secret must not be empty")
        self.cookie_name = cookie_name
        self.raw = value == "raw"
        self._key = key
        self._prefix = cookie_name + "="
        # Attribute order follows Go's http.Cookie.String(), as oxy's tests expect.
        attrs = []
        if path:
            attrs.append(f"Path={path}")
        if domain:
            attrs.append(f"Domain={domain}")
        if max_age is not None:
            attrs.append(f"Max-Age={max(max_age, 0)}")
        if http_only:
            attrs.append("HttpOnly")
        if secure:
            attrs.append("Secure")
        if site is not None:
            attrs.append(f"SameSite={site}")
        self._suffix = "".join("; " + a for a in attrs)

    def value_for(self, url: str, identity: str) -> str:
        """The key a request's cookie is matched on (the HMAC, or the raw identity)."""
        if self.raw:
            return identity
        tag = hmac.new(self._key, identity.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(tag[:_DIGEST_BYTES]).rstrip(b"=").decode("ascii")

    def render(self, url: str, key: str) -> str:
        """The ``Set-Cookie`` header value pinning the server ``url`` (match key ``key``)."""
        return self._prefix + (url if self.raw else key) + self._suffix

    def requested(self, environ: WSGIEnvironment) -> str | None:
        """The value of this session's cookie in the request, if well formed."""
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
                return self._raw_lookup(value)
            return value if _HMAC_VALUE.match(value) else None
        return None

    def _raw_lookup(self, value: str) -> str | None:
        from ._balance.pool import parse_server

        try:
            return parse_server(value)[1]
        except ConfigurationError:
            return None
