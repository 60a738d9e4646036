"""CircuitBreaker fallbacks (what a tripped breaker answers) and webhooks (side effects).

Fallbacks are plain WSGI apps; any WSGI app, such as a ``Forward`` to a standby
region, can serve as one.  A :class:`Webhook` is a transition callback that
sends one HTTP request in the background with a hard timeout.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import urllib3

from . import environ as keys
from ._core.deprecation import keyword_only_since
from ._core.status import status_line
from ._core.types import StartResponse, WSGIEnvironment
from ._core.urls import parse_target_url
from .exceptions import ConfigurationError

__all__ = ["RedirectFallback", "ResponseFallback", "Webhook"]

log = logging.getLogger(__name__)


def _check_http_url(url: str, what: str) -> None:
    parse_target_url(url, what=what, allow_query=True)


class ResponseFallback:
    """A fixed response: ``status``, ``body`` and ``content_type``, with Content-Length.

    :param status: HTTP status (100–599), default 503.
    :param body: bytes or text (UTF-8); keyword-only.
    :param content_type: the Content-Type header; None sends none.
    :param retry_after: seconds for a ``Retry-After`` header.  None (default):
        on a 503 or 429, the seconds a :class:`~oxypy.CircuitBreaker` calling
        this fallback stays open (``environ["oxypy.retry_after"]``), else none.

    Example::

        fallback = ResponseFallback(503, body="come back later")
        cb = CircuitBreaker(app, "NetworkErrorRatio() > 0.5", fallback=fallback)

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``body`` and ``content_type`` are keyword-only (positional use warns).
    """

    @keyword_only_since("0.2", "body", "content_type")
    def __init__(
        self,
        status: int = 503,
        *,
        body: bytes | str = b"",
        content_type: str | None = "text/plain; charset=utf-8",
        retry_after: int | None = None,
    ) -> None:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ConfigurationError(f"status must be an int from 100 to 599, got {status!r}")
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, bytes):
            raise ConfigurationError("body must be bytes or str")
        if content_type is not None and any(ch in content_type for ch in "\r\n"):
            raise ConfigurationError("content_type must be a single header line")
        if retry_after is not None and (
            isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 1
        ):
            raise ConfigurationError(f"retry_after must be whole seconds >= 1, got {retry_after!r}")
        self.status = status
        self.body = body
        self.retry_after = retry_after
        self._status_line = status_line(status)
        self._headers = [("Content-Length", str(len(body)))]
        if content_type is not None:
            self._headers.insert(0, ("Content-Type", content_type))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        headers = list(self._headers)
        seconds = self.retry_after
        if seconds is None and self.status in (429, 503):
            seconds = environ.get(keys.RETRY_AFTER)
        if seconds is not None:
            headers.append(("Retry-After", str(seconds)))
        start_response(self._status_line, headers)
        if environ.get("REQUEST_METHOD") == "HEAD":
            return [b""]
        return [self.body]


class RedirectFallback:
    """Answer ``302 Found`` with ``Location: url``.

    :param url: absolute http(s) URL.
    :param preserve_path: append the request's path *and* query to ``url``
        (oxy keeps only the path).  The path is taken byte-exact from the raw
        request URI when the server provides one.

    Example::

        fallback = RedirectFallback("https://status.example.com", preserve_path=True)

    .. versionadded:: 0.1
    """

    def __init__(self, url: str, *, preserve_path: bool = False) -> None:
        _check_http_url(url, "redirect URL")
        self.url = url
        self.preserve_path = preserve_path
        self._parts = urlsplit(url)

    def location(self, environ: WSGIEnvironment) -> str:
        if not self.preserve_path:
            return self.url
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if raw and raw.startswith("/"):
            path, _, query = str(raw).partition("?")
        else:
            path = quote(
                (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1"),
                safe="/;=,:@!$&'()*+~-._",
            )
            query = str(environ.get("QUERY_STRING", ""))
        base = self._parts
        if base.query and query:
            query = f"{base.query}&{query}"
        else:
            query = query or base.query
        return urlunsplit(
            (base.scheme, base.netloc, base.path.rstrip("/") + path, query, base.fragment)
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = b"Found\n"
        start_response(
            "302 Found",
            [
                ("Location", self.location(environ)),
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        if environ.get("REQUEST_METHOD") == "HEAD":
            return [b""]
        return [body]


class Webhook:
    """A transition callback that sends one HTTP request in the background.

    The request runs in its own greenlet (a daemon thread when gevent is not
    monkey-patching) so the client request that caused the transition never
    waits for it, with ``timeout`` seconds for the whole exchange and no
    retries; failures are logged, never raised.

    :param url: absolute http(s) URL; every other option is keyword-only.
    :param method: HTTP method (default POST).
    :param headers: extra request headers (mapping or list of pairs).
    :param body: raw body (bytes or UTF-8 text); exclusive with ``form``.
    :param form: fields sent as ``application/x-www-form-urlencoded``; a value
        may be a list for repeated keys.
    :param timeout: seconds for connect + response (default 5).

    Example::

        hook = Webhook("http://ops.local/alert", body=b'{"down": true}',
                       headers={"Content-Type": "application/json"})
        cb = CircuitBreaker(app, "NetworkErrorRatio() > 0.5", on_trip=hook)

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       Every option but ``url`` is keyword-only (positional use warns).
    """

    @keyword_only_since("0.2", "method", "headers", "body", "form", "timeout")
    def __init__(
        self,
        url: str,
        *,
        method: str = "POST",
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        body: bytes | str | None = None,
        form: Mapping[str, str | Sequence[str]] | None = None,
        timeout: float = 5.0,
    ) -> None:
        _check_http_url(url, "webhook URL")
        if not isinstance(method, str) or not method.isalpha() or not method.isascii():
            raise ConfigurationError(f"webhook method must be a token like 'POST': {method!r}")
        if body is not None and form is not None:
            raise ConfigurationError("webhook takes body or form, not both")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigurationError(f"webhook timeout must be positive seconds: {timeout!r}")
        pairs = list(headers.items() if isinstance(headers, Mapping) else headers or [])
        for name, value in pairs:
            if any(ch in f"{name}{value}" for ch in "\r\n"):
                raise ConfigurationError(f"webhook header {name!r} must be a single line")
        data: bytes | None
        if form is not None:
            data = urlencode(
                [(k, v) for k, vs in form.items() for v in ([vs] if isinstance(vs, str) else vs)]
            ).encode("ascii")
            if not any(n.lower() == "content-type" for n, _ in pairs):
                pairs.append(("Content-Type", "application/x-www-form-urlencoded"))
        else:
            data = body.encode("utf-8") if isinstance(body, str) else body
            if data is not None and not any(n.lower() == "content-type" for n, _ in pairs):
                pairs.append(("Content-Type", _content_type(data)))
        self.url = url
        self.method = method.upper()
        self.headers = pairs
        self.body = data
        self.timeout = float(timeout)
        self._pool = urllib3.PoolManager(
            retries=False, timeout=urllib3.Timeout(connect=timeout, read=timeout)
        )

    def __call__(self, _transition: Any = None) -> Any:
        """Start sending; returns the greenlet (or thread) doing it, for joining."""
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            import gevent

            return gevent.spawn(self._send_with_deadline)
        thread = threading.Thread(target=self.send, name="oxypy-webhook", daemon=True)
        thread.start()
        return thread

    def _send_with_deadline(self) -> int | None:
        import gevent

        try:
            with gevent.Timeout(self.timeout):
                return self.send()
        except gevent.Timeout:
            log.warning("webhook %s %s timed out after %gs", self.method, self.url, self.timeout)
            return None

    def send(self) -> int | None:
        """Send now (blocking); the status, or None on failure (logged)."""
        try:
            resp = self._pool.request(
                self.method,
                self.url,
                body=self.body,
                headers=dict(self.headers),
                redirect=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("webhook %s %s failed: %s", self.method, self.url, exc)
            return None
        log.info("webhook %s %s answered %d", self.method, self.url, resp.status)
        return int(resp.status)

    def __repr__(self) -> str:
        return f"Webhook({self.method} {self.url})"


def _content_type(body: bytes) -> str:
    """The Content-Type of a webhook ``body`` given without one: JSON when it
    parses as a JSON object or array, UTF-8 text, else bytes."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    if text.lstrip()[:1] in ("{", "["):
        try:
            json.loads(text)
        except ValueError:
            pass
        else:
            return "application/json"
    return "text/plain; charset=utf-8"
