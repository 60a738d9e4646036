"""Header names and the hop-by-hop rules (RFC 9110 §7.6.1), shared by all blocks."""

from __future__ import annotations

from functools import lru_cache

CONNECTION = "Connection"
CONTENT_LENGTH = "Content-Length"
CONTENT_TYPE = "Content-Type"
EXPECT = "Expect"
FORWARDED = "Forwarded"
HOST = "Host"
KEEP_ALIVE = "Keep-Alive"
PROXY_CONNECTION = "Proxy-Connection"
TE = "TE"
TRANSFER_ENCODING = "Transfer-Encoding"
UPGRADE = "Upgrade"
VIA = "Via"
X_FORWARDED_FOR = "X-Forwarded-For"
X_FORWARDED_HOST = "X-Forwarded-Host"
X_FORWARDED_PORT = "X-Forwarded-Port"
X_FORWARDED_PROTO = "X-Forwarded-Proto"
X_REAL_IP = "X-Real-Ip"
RETRY_AFTER = "Retry-After"
SET_COOKIE = "Set-Cookie"

#: Lower-cased hop-by-hop header names, never forwarded in either direction.
#: "trailers" is not a header (oxy's list gets that wrong); "trailer" is.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: The same set as WSGI environ keys.
HOP_BY_HOP_ENVIRON = frozenset("HTTP_" + h.upper().replace("-", "_") for h in HOP_BY_HOP)

#: Forwarding headers whose incoming values are believed only from trusted peers.
FORWARDING_ENVIRON = frozenset(
    {
        "HTTP_X_FORWARDED_PROTO",
        "HTTP_X_FORWARDED_HOST",
        "HTTP_X_FORWARDED_PORT",
        "HTTP_X_REAL_IP",
        "HTTP_FORWARDED",
    }
)

_SPECIAL_CASE = {
    "TE": "TE",
    "WWW_AUTHENTICATE": "WWW-Authenticate",
    "ETAG": "ETag",
    "DNT": "DNT",
    "X_XSS_PROTECTION": "X-XSS-Protection",
    "CONTENT_MD5": "Content-MD5",
    "X_REAL_IP": "X-Real-Ip",
}


@lru_cache(maxsize=2048)
def environ_to_header(key: str) -> str:
    """``HTTP_X_FOO_BAR`` -> ``X-Foo-Bar`` (WSGI servers lose the original case)."""
    name = key[5:] if key.startswith("HTTP_") else key
    special = _SPECIAL_CASE.get(name)
    if special is not None:
        return special
    return "-".join(part.capitalize() for part in name.split("_"))


def header_to_environ(name: str) -> str:
    """``X-Foo-Bar`` -> ``HTTP_X_FOO_BAR``."""
    key = name.upper().replace("-", "_")
    if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        return key
    return "HTTP_" + key


def connection_tokens(value: str | None) -> set[str]:
    """The lower-cased tokens of a ``Connection`` header value."""
    if not value:
        return set()
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def has_token(value: str | None, token: str) -> bool:
    """True when the comma-separated header ``value`` contains ``token`` (any case)."""
    return token in connection_tokens(value)
