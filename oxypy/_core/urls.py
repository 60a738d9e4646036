"""The one URL validator for upstream and server URLs, and absolute-form parsing.

Forward's targets, every balancer's server list, the command's ``--upstream``
and the fallbacks' redirect and webhook URLs are all checked by
:func:`parse_target_url`, so one URL is accepted or refused the same way
everywhere.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

from ..exceptions import ConfigurationError

__all__ = ["TargetURL", "origin_form", "split_absolute_form", "parse_target_url"]


class TargetURL(NamedTuple):
    """A validated ``http(s)://host[:port][/path]``; ``host`` is bare (no brackets)."""

    scheme: str
    host: str
    #: The port as written, or None when the URL leaves it to the scheme.
    explicit_port: int | None
    path: str
    query: str

    @property
    def port(self) -> int:
        """The port to connect to (the scheme's default when none is written)."""
        return self.explicit_port or (443 if self.scheme == "https" else 80)

    @property
    def shown_host(self) -> str:
        """The host as it appears in a URL or a Host header (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_header(self) -> str:
        """``host`` or ``host:port``; the default port is left out."""
        default = 443 if self.scheme == "https" else 80
        return self.shown_host if self.port == default else f"{self.shown_host}:{self.port}"


def parse_target_url(
    url: object,
    *,
    what: str = "upstream URL",
    websocket: bool = False,
    allow_query: bool = False,
    allow_userinfo: bool = True,
) -> TargetURL:
    """Validate an absolute ``http(s)://host[:port][/path]`` URL.

    ``websocket`` also accepts ``ws://``/``wss://`` (mapped to http/https);
    ``allow_query`` accepts a query (redirect and webhook URLs).  The scheme
    and host are lower-cased.  Anything else (another scheme, no host, a bad
    port, a fragment, whitespace or control characters) raises
    :class:`ConfigurationError`, whose message names ``what`` and the URL.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"{what} must be a string, got {url!r}")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise ConfigurationError(f"{what} must not contain whitespace: {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigurationError(f"invalid URL for {what}: bad port in {url!r}") from exc
    scheme = parts.scheme.lower()
    if websocket and scheme in ("ws", "wss"):
        scheme = "http" if scheme == "ws" else "https"
    if scheme not in ("http", "https"):
        raise ConfigurationError(
            f"{what} must be an http:// or https:// URL (http(s)://host[:port][/path]): {url!r}"
        )
    if not parts.hostname:
        raise ConfigurationError(f"{what} has no host: {url!r}")
    if parts.fragment or (parts.query and not allow_query):
        raise ConfigurationError(f"{what} must not carry a query or fragment: {url!r}")
    if not allow_userinfo and (parts.username is not None or parts.password is not None):
        raise ConfigurationError(f"{what} must not carry userinfo: {url!r}")
    return TargetURL(scheme, parts.hostname, port, parts.path, parts.query)


def split_absolute_form(raw: str) -> tuple[str, str, str] | None:
    """``"http://h:81/p?q"`` -> ``("http", "h:81", "/p?q")``: scheme, authority and
    origin-form of an absolute-form request-target (RFC 9112 §3.2.2).

    None for an origin-form target, ``*``, or text without ``://``.  A target
    without a path gets ``/`` (``"http://h?q"`` -> ``"/?q"``).  The scheme is
    returned as written; the caller decides which it accepts.
    """
    if not raw or raw[0] == "/":
        return None
    scheme, sep, rest = raw.partition("://")
    if not sep:
        return None
    cut = len(rest)
    for mark in ("/", "?"):
        at = rest.find(mark)
        if 0 <= at < cut:
            cut = at
    target = rest[cut:]
    if not target or target[0] == "?":
        target = "/" + target
    return scheme, rest[:cut], target


def origin_form(raw: str) -> str:
    """The origin-form of a request-target: ``http://h/p?q`` -> ``/p?q`` (RFC 9112 §3.2.2).

    An origin-form target (or ``*``) is returned unchanged; an absolute-form
    one without a path gets ``/``.
    """
    split = split_absolute_form(raw)
    return raw if split is None else split[2]
