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

#: Lower-cased hop-by-hop header names, never forwarded in either direction
#: and never written by the embedded server for an app: the one set oxypy uses.
#: It is Go's ``net/http/httputil`` list (what oxy v2 forwards with), which is
#: RFC 9110 §7.6.1 plus ``Proxy-Authenticate``/``Proxy-Authorization``: those
#: two are addressed to the proxy that demanded authentication (RFC 9110
#: §11.7.1-2), so relaying a client's proxy credentials to the upstream would
#: leak them.  "trailers" is not a header (oxy's legacy list gets that wrong);
#: "trailer" is.
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
        "HTTP_X_FORWARDED_PREFIX",
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
    """``X-Foo-Bar`` -> ``HTTP_X_FOO_BAR``; ``Content-Type``/``Content-Length`` keep no prefix.

    The one mapping from a header name to its WSGI environ key (PEP 3333).
    """
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


#: RFC 9110 ``token`` characters: what a field name may contain.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def is_field_name(name: object) -> bool:
    """True for a non-empty RFC 9110 token without ``_`` (WSGI folds ``_`` into ``-``)."""
    return (
        isinstance(name, str) and bool(name) and "_" not in name and all(c in _TCHAR for c in name)
    )


def is_field_value(value: object) -> bool:
    """True for a latin-1 string without CR, LF or NUL (no header injection)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not any(c in value for c in "\r\n\x00")


def merge_vary(headers: list[tuple[str, str]], *fields: str) -> list[tuple[str, str]]:
    """``headers`` with ``fields`` added to its ``Vary`` (one field line, no duplicates).

    An existing ``Vary: *`` already covers everything and is left alone.
    """
    present: set[str] = set()
    first = -1
    for index, (name, value) in enumerate(headers):
        if name.lower() == "vary":
            if first < 0:
                first = index
            present.update(t.strip().lower() for t in value.split(","))
    missing = [f for f in fields if f.lower() not in present]
    if "*" in present or not missing:
        return headers
    if first < 0:
        headers.append(("Vary", ", ".join(missing)))
        return headers
    name, value = headers[first]
    value = value.strip()
    headers[first] = (name, f"{value}, {', '.join(missing)}" if value else ", ".join(missing))
    return headers
