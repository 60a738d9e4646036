"""Server URLs as the balancers take them: validation and identity.

A leaf module: the pool, the sticky cookie lookup and the Rebalancer all
name servers the same way through :func:`parse_server`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..exceptions import ConfigurationError

__all__ = ["ServerSpec", "check_weight", "parse_server"]

#: A server as the constructors take it: a URL, or ``(url, weight)``.
ServerSpec = str | tuple[str, int]


def parse_server(url: object) -> tuple[str, str]:
    """Validate a server URL; return ``(target_url, identity)``.

    The target URL is the URL without userinfo (it may end up in a cookie or
    a log).  The identity is scheme + host + port + path, normalised: the
    scheme and host are lower-cased, the default port is made explicit and an
    empty path is ``/``, so ``http://A:80`` and ``http://a/`` are one server.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"server URL must be a string, got {url!r}")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"server URL must be http(s)://host[:port][/path]: {url!r}")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"server URL must not carry a query or fragment: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid port in server URL {url!r}") from exc
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    target = f"{scheme}://{shown}{'' if port is None else f':{port}'}{parts.path}"
    identity = f"{scheme}://{shown}:{port or default}{parts.path or '/'}"
    return target, identity


def check_weight(weight: object) -> int:
    """A server weight: an int >= 0 (0 takes the server out of the pick)."""
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise ConfigurationError(f"server weight must be an int >= 0, got {weight!r}")
    return weight
