"""Server URLs as the balancers take them: validation and identity.

A leaf module: the pool, the sticky cookie lookup and the Rebalancer all
name servers the same way through :func:`parse_server`.
"""

from __future__ import annotations

from .._core.urls import parse_target_url
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
    parsed = parse_target_url(url.strip(), what="server URL")
    scheme, shown, port = parsed.scheme, parsed.shown_host, parsed.explicit_port
    target = f"{scheme}://{shown}{'' if port is None else f':{port}'}{parsed.path}"
    identity = f"{scheme}://{shown}:{parsed.port}{parsed.path or '/'}"
    return target, identity


def check_weight(weight: object) -> int:
    """A server weight: an int >= 0 (0 takes the server out of the pick)."""
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise ConfigurationError(f"server weight must be an int >= 0, got {weight!r}")
    return weight
