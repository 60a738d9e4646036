"""Rewrite: change the request path before the next app sees it.

Echo's rewrite semantics (glob rules with ``*`` captured as ``$1..$n``, regex
rules with capture groups, first match wins) plus a prefix strip, applied
consistently to ``PATH_INFO`` and the raw request URI so that ``Forward``
still sends the client's percent-encoding byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote_to_bytes

from . import environ as keys
from ._core.deprecation import keyword_only_since
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from ._core.urls import origin_form
from .exceptions import ConfigurationError

__all__ = ["Rewrite"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
#: Characters a rewritten raw path may carry unquoted (``%`` keeps escapes).
_RAW_SAFE = "/:@!$&'()*+,;=-._~%"
_REF = re.compile(r"\$\$|\$\{(\d+)\}|\$(\d+)|\\(\d+)")

RuleInput = Mapping[str, str] | Iterable[tuple[str, str]] | None


class _Rule:
    """One compiled rule: ``pattern`` and a replacement template."""

    __slots__ = ("source", "pattern", "template", "anchored")

    def __init__(self, source: str, pattern: re.Pattern[str], template: str, anchored: bool):
        self.source = source
        self.pattern = pattern
        self.template = template
        self.anchored = anchored

    def apply(self, path: str) -> str | None:
        match = self.pattern.fullmatch(path) if self.anchored else self.pattern.search(path)
        if match is None:
            return None
        groups = match.groups()

        def ref(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            index = int(m.group(1) or m.group(2) or m.group(3))
            return groups[index - 1] or ""

        return _REF.sub(ref, self.template)


def _pairs(rules: RuleInput, name: str) -> list[tuple[str, str]]:
    if rules is None:
        return []
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ConfigurationError(f"{name}: each rule must be a (pattern, replacement) pair")
        pattern, replacement = item
        if not isinstance(pattern, str) or not isinstance(replacement, str):
            raise ConfigurationError(f"{name}: pattern and replacement must be strings")
        if not pattern:
            raise ConfigurationError(f"{name}: empty pattern")
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in replacement):
            raise ConfigurationError(
                f"{name}: replacement {replacement!r} contains spaces or control characters"
            )
        out.append((pattern, replacement))
    return out


def _check_refs(source: str, template: str, groups: int) -> None:
    for m in _REF.finditer(template):
        if m.group(0) == "$$":
            continue
        index = int(m.group(1) or m.group(2) or m.group(3))
        if index < 1 or index > groups:
            raise ConfigurationError(
                f"rewrite rule {source!r} -> {template!r}: ${index} refers to a capture "
                f"group that does not exist (the pattern has {groups})"
            )


def _compile_glob(pattern: str, template: str) -> _Rule:
    """``"/old/*"`` -> an anchored regex where each ``*`` captures ``(.*?)``."""
    if not pattern.startswith("/") and pattern != "*":
        raise ConfigurationError(f"glob rule {pattern!r} must start with '/'")
    regex = "(.*?)".join(re.escape(part) for part in pattern.split("*"))
    _check_refs(pattern, template, pattern.count("*"))
    return _Rule(pattern, re.compile(regex, re.DOTALL), template, anchored=True)


def _compile_regex(pattern: str, template: str) -> _Rule:
    """A regex rule, searched (anchor it with ``^``/``$`` yourself, as in Echo)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigurationError(f"regex rule {pattern!r} does not compile: {exc}") from exc
    _check_refs(pattern, template, compiled.groups)
    return _Rule(pattern, compiled, template, anchored=False)


def _normalize(raw_path: str) -> str:
    """Decode escapes of unreserved characters and upper-case the others (RFC 3986 §6.2.2)."""
    if "%" not in raw_path:
        return raw_path
    out = []
    i = 0
    n = len(raw_path)
    while i < n:
        ch = raw_path[i]
        if ch == "%" and i + 2 < n and raw_path[i + 1] in _HEX and raw_path[i + 2] in _HEX:
            byte = int(raw_path[i + 1 : i + 3], 16)
            out.append(chr(byte) if byte in _UNRESERVED else "%" + raw_path[i + 1 : i + 3].upper())
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _decode(raw: str) -> str:
    return unquote_to_bytes(raw).decode("latin-1") if "%" in raw else raw


def _split_raw(raw_path: str, script_name: str) -> tuple[str, str] | None:
    """Split ``raw_path`` where its decoded form has consumed ``script_name``."""
    if not script_name:
        return "", raw_path
    i = 0
    decoded = 0
    n = len(raw_path)
    while decoded < len(script_name) and i < n:
        if raw_path[i] == "%" and i + 2 < n and all(c in _HEX for c in raw_path[i + 1 : i + 3]):
            i += 3
        else:
            i += 1
        decoded += 1
    if _decode(raw_path[:i]) != script_name:
        return None
    return raw_path[:i], raw_path[i:]


def _rewrite_path(
    path: str, rules: list[_Rule], strip_prefix: str | None
) -> tuple[str, str | None] | None:
    """Apply ``strip_prefix`` then the first matching rule to a normalized raw path.

    Returns ``(new_raw_path, query_from_replacement)`` or None when nothing applies.
    """
    changed = False
    if strip_prefix is not None:
        if path == strip_prefix or path.startswith(strip_prefix + "/"):
            path = path[len(strip_prefix) :] or "/"
            changed = True
    query: str | None = None
    for rule in rules:
        result = rule.apply(path)
        if result is not None:
            path, sep, rest = result.partition("?")
            query = rest if sep else None
            changed = True
            break
    if not changed:
        return None
    path = quote(path, safe=_RAW_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    return path, query


#: Not public since 0.2 (an internal helper); importable until 1.0.
rewrite_path = _rewrite_path


class Rewrite:
    """Rewrite the request path with glob rules, regex rules and a prefix strip.

    The path seen by the rules is the app-relative part of the raw request
    URI (the ``PATH_INFO`` part, ``SCRIPT_NAME`` excluded, query excluded),
    percent-encoded as the client sent it but normalized (escapes of
    unreserved characters such as ``%41`` decoded, other escapes upper-cased),
    so a captured ``%2F`` stays ``%2F`` and ``Forward`` sends it unchanged.
    Without a raw URI (``RAW_URI``/``REQUEST_URI``) the quoted ``PATH_INFO`` is used.

    Order: ``strip_prefix`` first, then ``rules`` (globs) in insertion order,
    then ``regex_rules`` in insertion order; the first match wins and nothing
    else is applied.

    * Glob rules match the whole path; each ``*`` captures (lazily) and is
      referenced as ``$1``, ``$2``...  (``"/old/*": "/new/$1"``).
    * Regex rules are *searched*, as Echo does: anchor with ``^``/``$``.  The
      whole path becomes the replacement, with ``$1``, ``${1}`` or ``\\1`` for
      groups and ``$$`` for a literal ``$``.
    * ``strip_prefix="/proxy"``: ``/proxy/x`` -> ``/x``, ``/proxy`` -> ``/``;
      ``/proxyx`` is left alone (segment boundary).
    * The query string is kept.  A replacement containing ``?`` sets the
      query to its own part, followed by ``&`` and the original query.

    **Writes** ``PATH_INFO``, ``RAW_URI`` (also ``REQUEST_URI`` when present)
    and ``QUERY_STRING`` in place; the originals are kept in
    ``environ["oxypy.rewrite.orig"]``.  A prefix removed by ``strip_prefix``
    is appended to ``environ["oxypy.forwarded_prefix"]``, which ``Forward``
    sends upstream as ``X-Forwarded-Prefix`` (and puts back in redirects).
    Streams; never answers by itself.

    Configuration errors (bad regex, ``$3`` with two groups, bad prefix)
    raise :class:`ConfigurationError` at construction.

    :param rules: glob rules, a mapping or a list of ``(pattern, replacement)``.
    :param regex_rules: regex rules, same shape.
    :param strip_prefix: a path prefix to remove, e.g. ``"/proxy"``.
    :param skip: ``skip(environ) -> bool``; True passes the request unchanged.

    Example::

        from oxypy import Forward, Rewrite
        app = Rewrite(Forward("http://127.0.0.1:9000"),
                      rules={"/old/*": "/new/$1"},
                      regex_rules={r"^/users/(\\d+)$": "/u?id=$1"},
                      strip_prefix="/proxy")

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
       ``rules`` and ``regex_rules`` are keyword-only (positional use warns).
    """

    @keyword_only_since("0.2", "rules", "regex_rules")
    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        rules: RuleInput = None,
        regex_rules: RuleInput = None,
        strip_prefix: str | None = None,
        skip: Skip | None = None,
    ) -> None:
        compiled = [_compile_glob(p, r) for p, r in _pairs(rules, "rules")]
        compiled += [_compile_regex(p, r) for p, r in _pairs(regex_rules, "regex_rules")]
        if strip_prefix is not None:
            if not isinstance(strip_prefix, str) or not strip_prefix.startswith("/"):
                raise ConfigurationError("strip_prefix must be a path starting with '/'")
            strip_prefix = _normalize(quote(strip_prefix.rstrip("/"), safe=_RAW_SAFE))
            if not strip_prefix:
                raise ConfigurationError("strip_prefix must not be '/' alone")
        if not compiled and strip_prefix is None:
            raise ConfigurationError("Rewrite needs rules, regex_rules or strip_prefix")
        self.next_app = next_app
        self.rules = compiled
        self.strip_prefix = strip_prefix
        self.skip = skip

    def rewrite(self, environ: WSGIEnvironment) -> bool:
        """Rewrite ``environ`` in place; True when something changed."""
        script = environ.get("SCRIPT_NAME", "")
        path_info = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        raw_script = raw_rest = None
        raw_query = None
        if raw:
            raw = origin_form(raw)
            raw_path, sep, rq = raw.partition("?")
            split = _split_raw(raw_path, script)
            if split is not None and _decode(split[1]) == path_info:
                raw_script, raw_rest = split
                raw_query = rq if sep else ""
        if raw_rest is None or raw_script is None:
            raw_script = quote(script.encode("latin-1"), safe=_RAW_SAFE.replace("%", ""))
            raw_rest = quote(path_info.encode("latin-1"), safe=_RAW_SAFE.replace("%", ""))
        if raw_query != query:  # QUERY_STRING was changed below the server: it wins
            raw_query = query
        path = _normalize(raw_rest)
        prefix = self.strip_prefix
        stripped = ""
        if prefix is not None and (path == prefix or path.startswith(prefix + "/")):
            stripped = prefix
        result = _rewrite_path(path, self.rules, prefix)
        if result is None:
            return False
        new_raw, repl_query = result
        if stripped:
            environ[keys.FORWARDED_PREFIX] = environ.get(keys.FORWARDED_PREFIX, "") + stripped
        if repl_query is not None:
            raw_query = repl_query + ("&" + raw_query if raw_query else "")
        orig = {}
        for key in ("PATH_INFO", "QUERY_STRING", "RAW_URI", "REQUEST_URI"):
            if key in environ:
                orig[key] = environ[key]
        environ.setdefault(keys.REWRITE_ORIG, orig)
        environ["PATH_INFO"] = _decode(new_raw)
        environ["QUERY_STRING"] = raw_query
        uri = raw_script + new_raw + ("?" + raw_query if raw_query else "")
        environ["RAW_URI"] = uri
        if "REQUEST_URI" in environ:
            environ["REQUEST_URI"] = uri
        return True

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is None or not self.skip(environ):
            self.rewrite(environ)
        return self.next_app(environ, start_response)
