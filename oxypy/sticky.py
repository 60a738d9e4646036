"""Sticky sessions: a cookie pins a client to the server that first served it.

The cookie never reveals the backend address by default: its value is an
HMAC-SHA256 of the server's identity, so a client can neither read which
backend it is on nor forge a cookie that steers it to a server it was never
given (oxy's raw-URL cookies did both, vulcand/oxy#107).

:class:`StickySession` is a plain configuration value; signing, rendering
and looking up cookies is done by :mod:`oxypy._balance.sticky`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import KW_ONLY, dataclass, field

from .exceptions import ConfigurationError

__all__ = ["StickySession"]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_ATTR_VALUE = re.compile(r"^[\x21-\x3a\x3c-\x7e]+$")  # printable, no space or ';'
_SAME_SITE = {"lax": "Lax", "strict": "Strict", "none": "None"}


@dataclass(frozen=True, slots=True)
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

    A frozen value; bad options raise :class:`~oxypy.ConfigurationError`
    naming the option.  ``same_site`` is kept in its canonical spelling and
    ``secret`` as bytes (a random key when none was given); the secret is
    left out of ``repr()``.

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

    cookie_name: str
    _: KW_ONLY
    secure: bool = False
    http_only: bool = True
    same_site: str | None = "Lax"
    max_age: int | None = None
    path: str | None = "/"
    domain: str | None = None
    value: str = "hmac"
    secret: str | bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        name = self.cookie_name
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ConfigurationError(f"cookie_name must be a cookie token, got {name!r}")
        if self.value not in ("hmac", "raw"):
            raise ConfigurationError(f'value must be "hmac" or "raw", got {self.value!r}')
        for option, attr in (("path", self.path), ("domain", self.domain)):
            if attr is not None and (not isinstance(attr, str) or not _ATTR_VALUE.match(attr)):
                raise ConfigurationError(f"{option} must be printable without ';' or spaces")
        site: str | None = None
        if self.same_site is not None:
            site = _SAME_SITE.get(str(self.same_site).lower())
            if site is None:
                raise ConfigurationError(
                    f"same_site must be 'Lax', 'Strict', 'None' or None, got {self.same_site!r}"
                )
        max_age = self.max_age
        if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int)):
            raise ConfigurationError(f"max_age must be an int or None, got {max_age!r}")
        secret = self.secret
        if secret is None:
            key = secrets.token_bytes(32)
        elif isinstance(secret, str):
            key = secret.encode("utf-8")
        elif isinstance(secret, bytes):
            key = secret
        else:
            raise ConfigurationError(f"secret must be str or bytes, got {type(secret).__name__}")
        if not key:
            raise ConfigurationError("secret must not be empty")
        object.__setattr__(self, "same_site", site)
        object.__setattr__(self, "secret", key)
