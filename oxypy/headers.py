"""Headers: set, add or remove request and response header fields.

Traefik's ``headers`` middleware and Caddy's ``header_up``/``header_down`` as
a block: the request fields are changed on the environ before the next app
sees it, the response fields as the response head passes back up.  The
rules are checked and compiled once, so a request costs one pass over them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ._core.headers import HOP_BY_HOP, header_to_environ, is_field_name, is_field_value
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigurationError

__all__ = ["Headers"]

HeaderRules = Mapping[str, "str | None"]
AddRules = Mapping[str, "str | Sequence[str]"]

#: Fields that frame the message or belong to one connection: the server and
#: Forward own them, and a wrong value would corrupt or smuggle messages.
REFUSED = HOP_BY_HOP | {"content-length"}


def _compile(rules: HeaderRules | None, option: str) -> tuple[tuple[str, str | None], ...]:
    if rules is None:
        return ()
    if not isinstance(rules, Mapping):
        raise ConfigurationError(f"{option} must be a mapping of header name to value or None")
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for name, value in rules.items():
        if not is_field_name(name):
            raise ConfigurationError(f"{option}: invalid header name {name!r}")
        lower = name.lower()
        if lower in REFUSED:
            raise ConfigurationError(
                f"{option}: {name!r} frames the message or belongs to the connection; "
                "the server and Forward manage it"
            )
        if lower in seen:
            raise ConfigurationError(f"{option}: header {name!r} given twice (any case)")
        seen.add(lower)
        if value is not None and not is_field_value(value):
            raise ConfigurationError(
                f"{option}: value of {name!r} must be a latin-1 string without CR, LF or NUL"
            )
        if option == "request" and lower == "host" and value is None:
            raise ConfigurationError("request: 'Host' cannot be removed (HTTP/1.1 requires it)")
        out.append((name, value))
    return tuple(out)


def _compile_add(
    rules: AddRules | None, option: str, taken: set[str]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if rules is None:
        return ()
    if not isinstance(rules, Mapping):
        raise ConfigurationError(
            f"{option} must be a mapping of header name to a value or list of values"
        )
    out: list[tuple[str, tuple[str, ...]]] = []
    for name, value in rules.items():
        if isinstance(value, str):
            values: tuple[str, ...] = (value,)
        elif isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
            values = tuple(value)
        else:
            raise ConfigurationError(
                f"{option}: value of {name!r} must be a string or a non-empty list of strings"
            )
        # The name, value and refused-field checks of set/remove, on each value.
        for one in values:
            _compile({name: one}, option)
        lower = name.lower()
        if lower in taken:
            raise ConfigurationError(
                f"{option}: header {name!r} is also set, removed or added elsewhere "
                "(one rule per field)"
            )
        if option == "add_request" and lower == "host":
            raise ConfigurationError("add_request: 'Host' holds one value; set it with request=")
        taken.add(lower)
        out.append((name, values))
    return tuple(out)


class Headers:
    """Set, add or remove header fields on the request and on the response.

    ``request``/``response`` map a field name to a value, or to ``None`` to
    remove every field of that name.  Setting replaces all existing values of
    the field (any case of the name), so a client or upstream cannot add a
    second one.  ``add_request``/``add_response`` map a name to a value or a
    list of values that are *appended*, keeping the values already there: a
    response gets one more field line per value (after the existing ones); a
    request field (one ``HTTP_*`` environ key in WSGI) gets the values joined
    to its existing value with ``", "`` (``"; "`` for ``Cookie``, RFC 6265),
    or is created when absent.  A field name may appear in only one rule of a
    side (set/remove or add).

    **Reads and writes** the ``HTTP_*`` environ keys named by ``request``
    (``Content-Type`` is ``CONTENT_TYPE``) before calling the next app; with
    ``Forward`` below, that is what the upstream receives.  ``response`` rules
    rewrite the header list the next app passes to ``start_response``.
    **Streams**: bodies are never touched, and the request is never answered
    by this block.

    Refused at construction (:class:`~oxypy.ConfigurationError` naming the
    option and the field): names that are not HTTP tokens or contain ``_``,
    values with CR, LF or NUL, and the fields that frame a message or belong
    to one connection (``Content-Length``, ``Transfer-Encoding``,
    ``Connection``, ``Keep-Alive``, ``TE``, ``Trailer``, ``Upgrade``,
    ``Proxy-Connection``, ``Proxy-Authenticate``, ``Proxy-Authorization``).
    ``Host`` may be set on the request (it reaches the upstream with
    ``Forward(pass_host_header=True)``) but not removed nor added to.

    :param request: ``{name: value or None}`` applied to the request.
    :param response: ``{name: value or None}`` applied to the response head.
    :param add_request: ``{name: value or [values]}`` appended to the request.
    :param add_response: ``{name: value or [values]}`` appended to the response head.
    :param skip: ``skip(environ) -> bool``; True passes the request unchanged.

    Example::

        from oxypy import Forward, Headers
        app = Headers(
            Forward("http://127.0.0.1:9000"),
            request={"X-Env": "prod", "Cookie": None},
            response={"Server": None, "Strict-Transport-Security": "max-age=63072000"},
            add_response={"Vary": "Accept-Language", "Link": ["</a.css>; rel=preload"]},
        )

    .. versionadded:: 0.2
    .. versionchanged:: 0.2 ``add_request`` and ``add_response``.
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        request: HeaderRules | None = None,
        response: HeaderRules | None = None,
        add_request: AddRules | None = None,
        add_response: AddRules | None = None,
        skip: Skip | None = None,
    ) -> None:
        if skip is not None and not callable(skip):
            raise ConfigurationError("skip must be a callable (environ) -> bool")
        self.next_app = next_app
        self.skip = skip
        set_request = _compile(request, "request")
        self.request_rules = tuple((header_to_environ(name), value) for name, value in set_request)
        taken = {name.lower() for name, _ in set_request}
        #: (environ key, separator, joined values) appended to the request.
        self.request_add = tuple(
            (header_to_environ(name), sep, sep.join(values))
            for name, values in _compile_add(add_request, "add_request", taken)
            for sep in ("; " if name.lower() == "cookie" else ", ",)
        )
        rules = _compile(response, "response")
        #: Lower-cased names whose incoming response fields are dropped.
        self.response_drop = frozenset(name.lower() for name, _ in rules)
        #: The fields appended after the drop: the set ones, then the added ones.
        self.response_set = tuple((name, value) for name, value in rules if value is not None)
        self.response_set += tuple(
            (name, value)
            for name, values in _compile_add(add_response, "add_response", set(self.response_drop))
            for value in values
        )

    def _start_response(self, start_response: StartResponse) -> StartResponse:
        drop, add = self.response_drop, self.response_set

        def headers_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            headers = [h for h in headers if h[0].lower() not in drop]
            headers.extend(add)
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        return headers_start_response

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        for key, value in self.request_rules:
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        for key, sep, joined in self.request_add:
            old = environ.get(key)
            environ[key] = f"{old}{sep}{joined}" if old else joined
        if self.response_set or self.response_drop:
            start_response = self._start_response(start_response)
        return self.next_app(environ, start_response)
