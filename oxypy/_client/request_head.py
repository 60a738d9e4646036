"""The outgoing request head: framing checks, hop-by-hop removal, forwarding headers.

Order matters (oxy §6b.9): the headers the client's ``Connection`` names are
dropped first, then the hop-by-hop set, and only *then* are the forwarding
headers added, so a client can never strip ``X-Forwarded-For`` or
``X-Real-Ip`` by naming them in ``Connection``.
"""

from __future__ import annotations

from urllib.parse import quote, unquote_to_bytes

from .. import environ as keys
from .._core.headers import (
    FORWARDING_ENVIRON,
    HOP_BY_HOP_ENVIRON,
    connection_tokens,
    environ_to_header,
    header_to_environ,
)
from .._core.net import TrustedProxies, normalize_ip
from .._core.types import WSGIEnvironment
from .._core.urls import origin_form
from ..exceptions import BadRequest, RequestError

__all__ = ["Framing", "build_headers", "check_framing", "max_forwards", "request_target"]

_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: The methods whose ``Max-Forwards`` a proxy honours (RFC 9110 §7.6.2).
MAX_FORWARDS_METHODS = frozenset({"OPTIONS", "TRACE"})


def max_forwards(environ: WSGIEnvironment) -> int | None:
    """The request's ``Max-Forwards`` on OPTIONS and TRACE; None elsewhere or when absent.

    RFC 9110 §7.6.2: a single non-negative decimal integer.  Anything else
    (empty, signed, a list such as ``1, 2``) is a :class:`BadRequest` (400).
    """
    if environ.get("REQUEST_METHOD") not in MAX_FORWARDS_METHODS:
        return None
    value = environ.get("HTTP_MAX_FORWARDS")
    if value is None:
        return None
    value = value.strip(" \t")
    if not value or not value.isdigit() or not value.isascii() or len(value) > 18:
        raise BadRequest("invalid Max-Forwards")
    return int(value)


class Framing:
    """How the request body is framed: ``length`` bytes, chunked, or none."""

    __slots__ = ("length", "chunked")

    def __init__(self, length: int | None, chunked: bool) -> None:
        self.length = length
        self.chunked = chunked

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


_NO_BODY = Framing(None, False)


def check_framing(environ: WSGIEnvironment) -> Framing:
    """Refuse ambiguous framing (RFC 9112 §6.3) whatever server runs the app.

    Both Content-Length and Transfer-Encoding, a Content-Length that is not one
    plain decimal number (``+5``, ``5, 6``), or a Transfer-Encoding other than
    exactly ``chunked`` is a smuggling attempt or a broken client: 400.
    """
    if environ.get("REQUEST_METHOD") == "CONNECT":
        raise RequestError("CONNECT is not supported by a reverse proxy", status=405)
    te = environ.get("HTTP_TRANSFER_ENCODING")
    cl = environ.get("CONTENT_LENGTH")
    if te is not None:
        if cl not in (None, ""):
            raise BadRequest("request has both Content-Length and Transfer-Encoding")
        if te.strip().lower() != "chunked" or te != te.strip(" \t"):
            raise BadRequest("unsupported or obfuscated Transfer-Encoding")
        if not environ.get("wsgi.input_terminated"):
            raise RequestError("chunked upload not supported by this server", status=411)
        return Framing(None, True)
    if cl is None or cl == "":
        return _NO_BODY
    if not cl.isdigit() or not cl.isascii():
        raise BadRequest("invalid Content-Length")
    length = int(cl)
    return Framing(length, False) if length else Framing(0, False)


def request_target(environ: WSGIEnvironment, base_path: str) -> str:
    """The origin-form request-target for the upstream, byte-exact when possible.

    The raw URI the server received (``RAW_URI``/``REQUEST_URI``) is used as
    long as it still decodes to ``SCRIPT_NAME + PATH_INFO``; a middleware that
    rewrote the path (without updating ``RAW_URI``) gets it re-quoted.
    """
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING", "")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    target = None
    if raw:
        raw = origin_form(raw)
        raw_path, sep, raw_query = raw.partition("?")
        if raw_path == path or unquote_to_bytes(raw_path).decode("latin-1") == path:
            if raw_query == query:
                target = raw_path + sep + raw_query
            else:
                target = raw_path + ("?" + query if query else "")
    if target is None:
        target = quote(path.encode("latin-1"), safe=_PATH_SAFE) or "/"
        if query:
            target += "?" + query
    if base_path:
        if target.startswith("/"):
            target = base_path.rstrip("/") + target
        else:
            target = base_path.rstrip("/") + "/" + target
    return target if target else "/"


def _client_host(environ: WSGIEnvironment) -> str:
    host = environ.get("HTTP_HOST")
    if host:
        return str(host)
    name = environ.get("SERVER_NAME", "")
    port = environ.get("SERVER_PORT", "")
    scheme = environ.get("wsgi.url_scheme", "http")
    if port and not ((scheme == "http" and port == "80") or (scheme == "https" and port == "443")):
        return f"{name}:{port}"
    return str(name)


def _host_port(host: str, scheme: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            return rest[1:]
    elif host.count(":") == 1:
        port = host.rsplit(":", 1)[1]
        if port.isdigit():
            return port
    return "443" if scheme in ("https", "wss") else "80"


def _forwarded_node(ip: str | None) -> str:
    if ip is None:
        return "unknown"
    return f'"[{ip}]"' if ":" in ip else ip


def build_headers(
    environ: WSGIEnvironment,
    *,
    host: str,
    trusted: TrustedProxies,
    upgrade: str | None,
    framing: Framing,
    forwarded: bool,
    via: str | None,
) -> list[tuple[str, str]]:
    """The outgoing header list, as (name, value) pairs in the client's order."""
    drop = HOP_BY_HOP_ENVIRON
    named = environ.get("HTTP_CONNECTION")
    if named:
        tokens = connection_tokens(named)
        drop = drop | {header_to_environ(t) for t in tokens}
    peer = environ.get("REMOTE_ADDR")
    peer_trusted = trusted.trusts(peer) if trusted else False
    if not peer_trusted:
        drop = drop | FORWARDING_ENVIRON

    headers: list[tuple[str, str]] = [("Host", host)]
    xff = None
    hops = max_forwards(environ)
    for key, value in environ.items():
        if key[:5] != "HTTP_":
            continue
        if key in drop or key == "HTTP_HOST":
            continue
        if key == "HTTP_X_FORWARDED_FOR":
            xff = value
            continue
        if key == "HTTP_MAX_FORWARDS" and hops is not None:
            value = str(max(hops - 1, 0))
        if key == "HTTP_VIA" and via:
            continue
        headers.append((environ_to_header(key), value))
    ctype = environ.get("CONTENT_TYPE")
    if ctype:
        headers.append(("Content-Type", ctype))
    if framing.chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    elif framing.length is not None:
        headers.append(("Content-Length", str(framing.length)))
    elif environ.get("REQUEST_METHOD") in _BODY_METHODS:
        headers.append(("Content-Length", "0"))

    te = environ.get("HTTP_TE")
    if te and "trailers" in connection_tokens(te):
        headers.append(("TE", "trailers"))
    if upgrade:
        headers.append(("Connection", "Upgrade"))
        headers.append(("Upgrade", upgrade))

    # Forwarding headers come last, after every removal.
    peer_ip = normalize_ip(peer) or peer or ""
    headers.append(("X-Forwarded-For", f"{xff}, {peer_ip}" if xff else peer_ip))
    scheme = environ.get("wsgi.url_scheme", "http")
    client_host = _client_host(environ)
    if not (peer_trusted and "HTTP_X_FORWARDED_PROTO" in environ):
        headers.append(("X-Forwarded-Proto", scheme))
    if not (peer_trusted and "HTTP_X_FORWARDED_HOST" in environ):
        headers.append(("X-Forwarded-Host", client_host))
    if not (peer_trusted and "HTTP_X_FORWARDED_PORT" in environ):
        headers.append(("X-Forwarded-Port", _host_port(client_host, scheme)))
    if not (peer_trusted and "HTTP_X_REAL_IP" in environ):
        client = trusted.client_ip(peer, xff) if peer_trusted else peer_ip
        headers.append(("X-Real-Ip", client or peer_ip))
    stripped = environ.get(keys.FORWARDED_PREFIX)
    if stripped:
        # The prefix stripped before Forward, after one a trusted proxy sent.
        previous_prefix = environ.get("HTTP_X_FORWARDED_PREFIX") if peer_trusted else None
        if previous_prefix:
            headers = [h for h in headers if h[0] != "X-Forwarded-Prefix"]
            stripped = previous_prefix.split(",")[0].strip().rstrip("/") + stripped
        headers.append(("X-Forwarded-Prefix", stripped))
    if forwarded:
        element = f'for={_forwarded_node(normalize_ip(peer))};host="{client_host}";proto={scheme}'
        previous = environ.get("HTTP_FORWARDED") if peer_trusted else None
        headers = [h for h in headers if h[0] != "Forwarded"]
        headers.append(("Forwarded", f"{previous}, {element}" if previous else element))
    if via:
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1").partition("/")[2] or "1.1"
        hop = f"{protocol} {via}"
        previous_via = environ.get("HTTP_VIA")
        headers.append(("Via", f"{previous_via}, {hop}" if previous_via else hop))
    return headers
