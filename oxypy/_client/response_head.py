"""The relayed response head: Location and Set-Cookie rewriting, and the proxy's own answers.

``Location``/``Content-Location`` pointing at the upstream are rewritten to
the address the client used (nginx's ``proxy_redirect default``);
``Set-Cookie`` ``Domain``/``Path`` attributes are rewritten by the user's
rules (nginx's ``proxy_cookie_domain``/``proxy_cookie_path``); an OPTIONS or
TRACE whose ``Max-Forwards`` reached 0 is answered here (RFC 9110 §7.6.2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from .. import environ as keys
from .._core.headers import environ_to_header, is_field_name, is_field_value
from .._core.net import TrustedProxies
from .._core.types import StartResponse, WSGIEnvironment
from ..exceptions import ConfigurationError

__all__ = [
    "ALLOWED_METHODS",
    "CookieRule",
    "answer_max_forwards",
    "authority",
    "client_origin",
    "compile_cookie_rule",
    "relocate",
    "rewrite_cookies",
    "trailer_fields",
]

#: What a Forward relays: ``Allow`` of an OPTIONS answered at ``Max-Forwards: 0``
#: (CONNECT is refused with 405).
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"

#: Request fields a TRACE answer never reflects (RFC 9110 §9.3.8: credentials
#: and cookies are the sensitive data a cross-site trace would steal).
_SENSITIVE = frozenset(
    {
        "HTTP_AUTHORIZATION",
        "HTTP_PROXY_AUTHORIZATION",
        "HTTP_COOKIE",
        "HTTP_X_API_KEY",
        "HTTP_X_AUTH_TOKEN",
        "HTTP_X_CSRF_TOKEN",
        "HTTP_X_CSRFTOKEN",
    }
)

#: Fields that must not travel as trailers (RFC 9110 §6.5.1: framing, routing,
#: authentication, controls and the payload's own metadata), besides hop-by-hop.
_NOT_TRAILERS = frozenset(
    {
        "content-length",
        "content-type",
        "content-encoding",
        "content-range",
        "transfer-encoding",
        "host",
        "cache-control",
        "expires",
        "date",
        "location",
        "retry-after",
        "vary",
        "set-cookie",
        "authorization",
        "www-authenticate",
        "proxy-authenticate",
        "proxy-authorization",
        "age",
        "max-forwards",
        "te",
        "trailer",
        "connection",
        "keep-alive",
        "upgrade",
    }
)


def _first(value: str) -> str:
    return value.split(",", 1)[0].strip()


def client_origin(environ: WSGIEnvironment, trusted: TrustedProxies) -> tuple[str, str, str]:
    """``(scheme, host, prefix)`` of the address the client used.

    ``X-Forwarded-Proto``/``-Host``/``-Prefix`` are believed only from a
    trusted peer (the first, i.e. the original client's, element); otherwise
    ``wsgi.url_scheme`` and ``Host``.  The prefix is the trusted proxy's one
    followed by what was stripped here (``oxypy.forwarded_prefix``).
    """
    peer_trusted = bool(trusted) and trusted.trusts(environ.get("REMOTE_ADDR"))
    scheme = str(environ.get("wsgi.url_scheme", "http"))
    host = environ.get("HTTP_HOST") or ""
    prefix = ""
    if peer_trusted:
        proto = _first(environ.get("HTTP_X_FORWARDED_PROTO", "")).lower()
        if proto in ("http", "https"):
            scheme = proto
        host = _first(environ.get("HTTP_X_FORWARDED_HOST", "")) or host
        prefix = _first(environ.get("HTTP_X_FORWARDED_PREFIX", "")).rstrip("/")
    if not host:
        name = str(environ.get("SERVER_NAME", ""))
        port = str(environ.get("SERVER_PORT", ""))
        default = "443" if scheme == "https" else "80"
        host = name if not port or port == default else f"{name}:{port}"
    prefix += environ.get(keys.FORWARDED_PREFIX, "")
    return scheme, host, prefix


def authority(host: str, scheme: str) -> tuple[str, int] | None:
    """``(lower-cased host, port)`` of a URL's or a Host header's authority."""
    try:
        parts = urlsplit(f"//{host}")
        port = parts.port
    except ValueError:
        return None
    if parts.hostname is None:
        return None
    return parts.hostname, port or (443 if scheme in ("https", "wss") else 80)


def relocate(
    value: str,
    upstreams: Iterable[tuple[str, int]],
    base_path: str,
    client: tuple[str, str, str],
) -> str:
    """``value`` (a Location) moved from the upstream to the client's address.

    Only an absolute (or scheme-relative) URL whose host and port are one of
    ``upstreams`` and whose path is under ``base_path`` changes: the
    authority becomes the client's scheme and host, ``base_path`` becomes the
    client's prefix.  A relative reference or another host is returned as is.
    """
    if "//" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.scheme not in ("http", "https", "") or not parts.netloc or "@" in parts.netloc:
        return value
    if not value.startswith("//") and not parts.scheme:
        return value
    found = authority(parts.netloc, parts.scheme or "http")
    if found is None or found not in upstreams:
        return value
    base = base_path.rstrip("/")
    path = parts.path
    if base:
        if path != base and not path.startswith(base + "/"):
            return value
        path = path[len(base) :]
    scheme, host, prefix = client
    path = prefix + path
    if not path.startswith("/"):
        path = "/" + path
    out = f"{scheme}://{host}{path}"
    if parts.query:
        out += "?" + parts.query
    if parts.fragment:
        out += "#" + parts.fragment
    return out


CookieRule = Callable[[str], "str | None"]


def compile_cookie_rule(
    rule: Mapping[str, str] | Callable[[str], str | None] | None, attribute: str
) -> CookieRule | None:
    """A ``Domain`` or ``Path`` rule as one callable ``value -> new value | None (remove)``.

    A mapping for ``"domain"`` matches case-insensitively, a leading dot
    ignored; for ``"path"`` each key is a prefix (the longest wins) replaced
    by its value, as nginx's ``proxy_cookie_path`` does.
    """
    if rule is None or callable(rule):
        return rule
    if not isinstance(rule, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and k for k, v in rule.items()
    ):
        raise ConfigurationError(
            f"cookie_{attribute} must be a mapping of non-empty strings to strings, or a callable"
        )
    if any(any(c in v for c in ";,\r\n") for v in rule.values()):
        raise ConfigurationError(f"cookie_{attribute}: a replacement may not contain ; , or CR/LF")
    if attribute == "domain":
        table = {k.lower().lstrip("."): v for k, v in rule.items()}

        def domain(value: str) -> str | None:
            return table.get(value.lower().lstrip("."), value)

        return domain
    prefixes = sorted(rule.items(), key=lambda kv: -len(kv[0]))

    def path(value: str) -> str | None:
        for old, new in prefixes:
            if value.startswith(old):
                return new + value[len(old) :]
        return value

    return path


def _rewrite_cookie(value: str, domain: CookieRule | None, path: CookieRule | None) -> str:
    pieces = value.split(";")
    out = [pieces[0]]
    changed = False
    for piece in pieces[1:]:
        name, eq, attr = piece.partition("=")
        key = name.strip().lower()
        rule = domain if key == "domain" else path if key == "path" else None
        if rule is None or not eq:
            out.append(piece)
            continue
        old = attr.strip()
        new = rule(old)
        if new == old:
            out.append(piece)
            continue
        changed = True
        if new is not None:
            out.append(f" {name.strip()}={new}")
    return ";".join(out) if changed else value


def rewrite_cookies(
    headers: list[tuple[str, str]], domain: CookieRule | None, path: CookieRule | None
) -> list[tuple[str, str]]:
    """``headers`` with each ``Set-Cookie``'s ``Domain``/``Path`` rewritten."""
    return [
        (n, _rewrite_cookie(v, domain, path)) if n.lower() == "set-cookie" else (n, v)
        for n, v in headers
    ]


def trailer_fields(trailers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The trailer fields a proxy may relay (no framing, routing or auth fields).

    A field the server would refuse (a name with ``_``) is dropped too.
    """
    return [
        (n, v)
        for n, v in trailers
        if n.lower() not in _NOT_TRAILERS and is_field_name(n) and is_field_value(v)
    ]


def answer_max_forwards(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The proxy's own answer to an OPTIONS or TRACE whose ``Max-Forwards`` is 0.

    OPTIONS: ``200`` with ``Allow`` (what Forward relays) and no body.
    TRACE: ``200`` ``message/http`` reflecting the request head as received,
    minus credentials and cookies (RFC 9110 §9.3.8).
    """
    if environ["REQUEST_METHOD"] == "OPTIONS":
        start_response("200 OK", [("Allow", ALLOWED_METHODS), ("Content-Length", "0")])
        return [b""]
    target = (
        environ.get("RAW_URI")
        or environ.get("REQUEST_URI")
        or (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
    )
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    lines = [f"TRACE {target} {protocol}"]
    for key, value in environ.items():
        if key[:5] == "HTTP_" and key not in _SENSITIVE:
            lines.append(f"{environ_to_header(key)}: {value}")
    body = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    start_response("200 OK", [("Content-Type", "message/http"), ("Content-Length", str(len(body)))])
    return [body]
