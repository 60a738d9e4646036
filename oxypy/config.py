"""A gateway described in a TOML file: listeners, routes, chains, services.

:func:`load_config` reads a file (or TOML text) and builds the same objects
the Python API builds: every block of a route's ``chain`` is the public class
of that name, constructed with the table's keys as its keyword arguments
(read from the class's own signature, so a new option of a block is a new
key of the file without any change here).  A few values need converting (a
duration string, a ``Rate`` table, a fallback, a Redis store); the small
tables below say which.  ``docs/config.md`` documents every key, generated
from the same tables (``tests/test_config.py`` holds the two together).

Errors name the key path and the problem (``routes[2].chain[1].retry:
unexpected '=' at column 16``); every error of a file is collected and
raised together as one :class:`~oxypy.ConfigFileError`.

The result, a :class:`Gateway`, is a WSGI application that can reload its
file: the new configuration is built and checked off the request path, then
swapped in with one reference assignment.  Requests (and WebSocket tunnels)
already running finish on the objects they started on; those objects are
closed once the last of them ends.  A block or service whose own section did
not change is carried over as the same object, so rate-limit buckets,
connection counts, breaker state, health and sticky mappings survive.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import re
import ssl
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import gevent
from gevent.lock import Semaphore

from . import fallback as _fallback
from ._balance.address import check_weight, parse_server
from ._core.iterables import ClosingIterable
from ._core.types import StartResponse, WSGIApplication, WSGIEnvironment
from .exceptions import ConfigFileError, ConfigurationError, PredicateError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ConfigFileError", "Gateway", "load_app", "load_config"]

log = logging.getLogger("oxypy.config")

# -- values ------------------------------------------------------------------

#: Option names whose value is a duration: seconds as a number, or a string
#: such as ``"250ms"``, ``"10s"``, ``"1m30s"``, ``"2h"``.
_DURATION_NAMES = re.compile(
    r"(^|_)(timeout|duration|interval|period|time|backoff|ttl|delay|seconds|window)$"
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Invalid(Exception):
    """One value is wrong: ``key`` (relative to the current table) and why."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.key = key


def _duration(value: object) -> float:
    if isinstance(value, bool):
        raise _Invalid(f"expected a duration, got {_describe(value)}")
    if isinstance(value, int | float):
        if value < 0:
            raise _Invalid(f"expected a duration, got {value} (negative)")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos, total = 0, 0.0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if m is None:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if text and pos == len(text):
            return total
        raise _Invalid(f'expected a duration such as "500ms", "10s" or "1m", got {value!r}')
    raise _Invalid(f"expected a duration, got {_describe(value)}")


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


# A value type, parsed from a parameter's annotation string.  Each kind has a
# checker/converter and a short name for the docs.
class _Kind:
    def __init__(self, name: str, convert: Callable[[object], object]) -> None:
        self.name = name
        self.convert = convert


def _scalar(kind: type, name: str) -> _Kind:
    def convert(value: object) -> object:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        raise _Invalid(f"expected {name}, got {_describe(value)}")

    return _Kind(name, convert)


def _list_of(item: _Kind, name: str) -> _Kind:
    def convert(value: object) -> object:
        if not isinstance(value, list):
            raise _Invalid(f"expected {name}, got {_describe(value)}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item.convert(v))
            except _Invalid as exc:
                raise _Invalid(exc.message, f"[{i}]") from None
        return tuple(out)

    return _Kind(name, convert)


def _pair(item: _Kind, name: str) -> _Kind:
    seq = _list_of(item, name)

    def convert(value: object) -> object:
        out = seq.convert(value)
        assert isinstance(out, tuple)
        if len(out) != 2:
            raise _Invalid(f"expected {name}, got {len(out)} items")
        return out

    return _Kind(name, convert)


def _table_of_str(name: str, allow_false: bool = False) -> _Kind:
    def convert(value: object) -> object:
        if not isinstance(value, dict):
            raise _Invalid(f"expected {name}, got {_describe(value)}")
        out: dict[str, str | None] = {}
        for k, v in value.items():
            if allow_false and v is False:
                out[k] = None
            elif isinstance(v, str):
                out[k] = v
            else:
                want = "a string or false" if allow_false else "a string"
                raise _Invalid(f"expected {want}, got {_describe(v)}", f".{_key(k)}")
        return out

    return _Kind(name, convert)


def _table_of_values(name: str) -> _Kind:
    """A table of header name -> a string or an array of strings (Headers' add rules)."""

    def convert(value: object) -> object:
        if not isinstance(value, dict):
            raise _Invalid(f"expected {name}, got {_describe(value)}")
        out: dict[str, str | list[str]] = {}
        for k, v in value.items():
            if isinstance(v, str) or (
                isinstance(v, list) and v and all(isinstance(x, str) for x in v)
            ):
                out[k] = v
            else:
                raise _Invalid(
                    f"expected a string or a non-empty array of strings, got {_describe(v)}",
                    f".{_key(k)}",
                )
        return out

    return _Kind(name, convert)


def _choice(choices: tuple[str, ...]) -> _Kind:
    name = "one of " + ", ".join(f'"{c}"' for c in choices)

    def convert(value: object) -> object:
        if isinstance(value, str) and value in choices:
            return value
        raise _Invalid(f"expected {name}, got {_describe(value)}")

    return _Kind(name, convert)


_BOOL = _scalar(bool, "a boolean")
_INT = _scalar(int, "an integer")
_FLOAT = _scalar(float, "a number")
_STR = _scalar(str, "a string")
_DURATION = _Kind("a duration", _duration)
_STRS = _list_of(_STR, "an array of strings")
_BYTES = _Kind("a string", lambda v: _STR.convert(v).encode())  # type: ignore[attr-defined]

_SIMPLE: dict[str, _Kind] = {
    "bool": _BOOL,
    "int": _INT,
    "float": _FLOAT,
    "str": _STR,
    "bytes": _BYTES,
    "Iterable[str]": _STRS,
    "Sequence[str]": _STRS,
    "Collection[str]": _STRS,
    "tuple[str, ...]": _STRS,
    "list[str]": _STRS,
    "Sequence[float]": _list_of(_FLOAT, "an array of numbers"),
    "tuple[float, ...]": _list_of(_FLOAT, "an array of numbers"),
    "Collection[int]": _list_of(_INT, "an array of integers"),
    "Iterable[int]": _list_of(_INT, "an array of integers"),
    "tuple[float, float]": _pair(_DURATION, "an array of two durations"),
    "Mapping[str, str]": _table_of_str("a table of strings"),
}


def _split_union(annotation: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(annotation[start:i].strip())
            start = i + 1
    parts.append(annotation[start:].strip())
    return parts


def _kind_of(name: str, annotation: object, module: Any) -> _Kind | None:
    """The TOML kind of a parameter, or None when a file cannot express it."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    kinds: list[_Kind] = []
    for alt in _split_union(str(text)):
        if alt == "None":
            continue
        if alt in ("float", "float | None") and _DURATION_NAMES.search(name):
            kinds.append(_DURATION)
            continue
        simple = _SIMPLE.get(alt)
        if simple is not None:
            kinds.append(simple)
            continue
        alias = getattr(module, alt, None)
        if typing.get_origin(alias) is typing.Literal:
            kinds.append(_choice(tuple(str(a) for a in typing.get_args(alias))))
        elif alt in _OPTION_CLASSES:
            kinds.append(_option_kind(alt))
    if not kinds:
        return None
    if len(kinds) == 1:
        return kinds[0]

    def convert(value: object) -> object:
        first: _Invalid | None = None
        for kind in kinds:
            try:
                return kind.convert(value)
            except _Invalid as exc:
                first = first or exc
        assert first is not None
        raise _Invalid(
            f"expected {' or '.join(k.name for k in kinds)}, got {_describe(value)}", first.key
        )

    return _Kind(" or ".join(k.name for k in kinds), convert)


# -- the public classes a file can name ----------------------------------------


def _public() -> dict[str, Any]:
    import oxypy

    return {name: getattr(oxypy, name) for name in oxypy.__all__}


#: Option value classes a table builds (generic: table keys are keyword args).
_OPTION_CLASSES = (
    "HealthCheck",
    "OutlierDetection",
    "StickySession",
    "Rate",
    "RetryBudget",
    "Webhook",
    "ResponseFallback",
    "RedirectFallback",
)


def _option_kind(class_name: str) -> _Kind:
    def convert(value: object) -> object:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a table of {class_name} options, got {_describe(value)}")
        return _construct(_public()[class_name], value)

    article = "an" if class_name[0] in "AEIOU" else "a"
    return _Kind(f"{article} {class_name} table", convert)


class _Param:
    __slots__ = ("name", "kind", "positional", "required", "default", "module")

    def __init__(
        self, name: str, kind: _Kind, positional: bool, required: bool, default: object
    ) -> None:
        self.name = name
        self.kind = kind
        self.positional = positional
        self.required = required
        self.default = default


def _params(cls: Any, skip_first: bool) -> dict[str, _Param]:
    """The file-settable parameters of ``cls``: name -> _Param, in signature order."""
    sig = inspect.signature(cls)
    module = sys.modules[cls.__module__]
    out: dict[str, _Param] = {}
    params = list(sig.parameters.values())
    if skip_first:
        params = params[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        special = _SPECIAL.get((cls.__name__, p.name))
        kind = special if special is not None else _kind_of(p.name, p.annotation, module)
        if kind is None:
            continue
        out[p.name] = _Param(
            p.name,
            kind,
            p.kind is p.POSITIONAL_ONLY,
            p.default is p.empty,
            None if p.default is p.empty else p.default,
        )
    return out


def _construct(
    cls: Any,
    table: Mapping[str, Any],
    *,
    first: Any = None,
    opened: list[Any] | None = None,
    before: tuple[Any, ...] = (),
) -> Any:
    """``cls([first,] *positional, **keywords)`` from ``table``; errors as _Invalid/_Many.

    Files the conversion opened (a Trace sink) go to ``opened`` when the object
    is built, and are closed when it is not.  ``before``: positional arguments
    the file does not name as keys, passed after ``first`` (a balancer's servers).
    """
    params = _params(cls, skip_first=first is not None)
    errors: list[tuple[str, str]] = []
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for key in table:
        if key not in params:
            errors.append((f".{_key(key)}", _unknown(key, list(params))))
    for name, param in params.items():
        if name not in table:
            if param.required:
                errors.append((f".{_key(name)}", "missing (required)"))
            elif param.positional:
                args.append(param.default)
            continue
        try:
            value = param.kind.convert(table[name])
        except _Invalid as exc:
            errors.append((f".{_key(name)}{exc.key}", exc.message))
            continue
        except _Many as many:
            errors.extend((f".{_key(name)}{k}", m) for k, m in many.errors)
            continue
        if param.positional:
            args.append(value)
        else:
            kwargs[name] = value
    files = [v for v in kwargs.values() if getattr(v, "_oxypy_config_file", False)]
    if errors:
        for f in files:
            f.close()
        raise _Many(errors)
    try:
        built = cls(*(() if first is None else (first,)), *before, *args, **kwargs)
    except BaseException as exc:
        for f in files:
            f.close()
        raise _explain(cls, table, exc) from None
    if opened is not None:
        opened.extend(files)
    return built


def _explain(cls: Any, table: Mapping[str, Any], exc: BaseException) -> BaseException:
    """The _Invalid for a constructor's exception (others are returned as they are)."""
    if isinstance(exc, PredicateError):
        where = next((k for k, v in table.items() if v == exc.expression), "")
        return _Invalid(
            f"{exc.message} at column {exc.position + 1}", f".{_key(where)}" if where else ""
        )
    if isinstance(exc, ConfigurationError | ValueError | TypeError | OSError):
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # "Block: option: problem" or "option: problem" names the key itself.
        match = re.match(rf"{cls.__name__}\.(\w+) ", message)
        if match and match[1] in table:
            return _Invalid(message, f".{_key(match[1])}")
        head, sep, rest = message.partition(": ")
        if sep and head == cls.__name__:
            message = rest
            head, sep, rest = message.partition(": ")
        if sep and head in table:
            return _Invalid(rest, f".{_key(head)}")
        return _Invalid(message)
    return exc


class _Many(Exception):
    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _unknown(key: str, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}"


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


# Values that need more than their annotation says -------------------------


def _fallback_kind() -> _Kind:
    def convert(value: object) -> object:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a fallback table, got {_describe(value)}")
        if "redirect" in value:
            table = dict(value)
            table["url"] = table.pop("redirect")
            try:
                return _construct(_fallback.RedirectFallback, table)
            except _Many as many:
                raise _Many(
                    [(k.replace(".url", ".redirect", 1), m) for k, m in many.errors]
                ) from None
        return _construct(_fallback.ResponseFallback, value)

    return _Kind(
        "a fallback table ({status, body, content_type} or {redirect, preserve_path})", convert
    )


def _webhook_kind() -> _Kind:
    def convert(value: object) -> object:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a webhook table, got {_describe(value)}")
        table = dict(value)
        if "webhook" in table:
            table["url"] = table.pop("webhook")
        return _construct(_fallback.Webhook, table)

    return _Kind("a Webhook table ({webhook = URL, method, headers, body, form, timeout})", convert)


def _store_kind(class_name: str) -> _Kind:
    def convert(value: object) -> object:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a store table ({{redis = URL, ...}}), got {_describe(value)}")
        table = dict(value)
        if "redis" not in table:
            raise _Invalid("missing (required)", ".redis")
        table["url"] = table.pop("redis")
        try:
            return _construct(_public()[class_name], table)
        except _Many as many:
            raise _Many([(k.replace(".url", ".redis", 1), m) for k, m in many.errors]) from None

    return _Kind(f"a {class_name} table ({{redis = URL, prefix, timeout, ...}})", convert)


def _registry_kind() -> _Kind:
    def convert(value: object) -> object:
        if not isinstance(value, dict):
            raise _Invalid(
                f"expected a registry table ({{redis = URL, name = NAME}}), got {_describe(value)}"
            )
        table = dict(value)
        if "redis" not in table:
            raise _Invalid("missing (required)", ".redis")
        table["url_or_client"] = table.pop("redis")
        try:
            return _construct(_public()["RedisRegistry"], table)
        except _Many as many:
            raise _Many(
                [(k.replace(".url_or_client", ".redis", 1), m) for k, m in many.errors]
            ) from None

    return _Kind("a RedisRegistry table ({redis = URL, name = NAME, ...})", convert)


def _rates_kind() -> _Kind:
    def convert(value: object) -> object:
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            raise _Invalid(f"expected an array of Rate tables, got {_describe(value)}")
        out, errors = [], []
        for i, item in enumerate(value):
            try:
                if not isinstance(item, dict):
                    raise _Invalid(f"expected a Rate table, got {_describe(item)}")
                out.append(_construct(_public()["Rate"], item))
            except _Invalid as exc:
                errors.append((f"[{i}]{exc.key}", exc.message))
            except _Many as many:
                errors.extend((f"[{i}]{k}", m) for k, m in many.errors)
        if errors:
            raise _Many(errors)
        return out

    return _Kind("an array of Rate tables ({average, period, burst, name})", convert)


def _sink_kind() -> _Kind:
    def convert(value: object) -> object:
        if value == "stderr":
            return sys.stderr
        if value == "stdout":
            return sys.stdout
        if isinstance(value, str) and value.startswith("logger:"):
            return logging.getLogger(value[len("logger:") :])
        if isinstance(value, str) and value:
            try:
                sink = open(value, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                setattr(sink, "_oxypy_config_file", True)  # closed with its Trace  # noqa: B010
                return sink
            except OSError as exc:
                raise _Invalid(f"cannot open: {exc.strerror}") from None
        raise _Invalid(
            f'expected "stderr", "stdout", "logger:NAME" or a file path, got {_describe(value)}'
        )

    return _Kind('"stderr" | "stdout" | "logger:NAME" | a file path (appended)', convert)


def _hedge_delay_kind() -> _Kind:
    def convert(value: object) -> object:
        if isinstance(value, str) and value.strip().startswith("p"):
            return value  # a quantile: Hedge checks it
        return _DURATION.convert(value)

    return _Kind('a duration or a quantile such as "p95"', convert)


_SPECIAL: dict[tuple[str, str], _Kind] = {
    ("Hedge", "delay"): _hedge_delay_kind(),
    ("CircuitBreaker", "fallback"): _fallback_kind(),
    ("CircuitBreaker", "on_trip"): _webhook_kind(),
    ("CircuitBreaker", "on_standby"): _webhook_kind(),
    ("RateLimit", "rates"): _rates_kind(),
    ("RateLimit", "store"): _store_kind("RedisStore"),
    ("ConnLimit", "store"): _store_kind("RedisConnStore"),
    ("RoundRobin", "registry"): _registry_kind(),
    ("LeastRequest", "registry"): _registry_kind(),
    ("ConsistentHash", "registry"): _registry_kind(),
    ("Headers", "request"): _table_of_str("a table of header values (false removes)", True),
    ("Headers", "response"): _table_of_str("a table of header values (false removes)", True),
    ("Headers", "add_request"): _table_of_values("a table of header values or arrays of them"),
    ("Headers", "add_response"): _table_of_values("a table of header values or arrays of them"),
    ("Rewrite", "rules"): _table_of_str("a table of path rewrites"),
    ("Rewrite", "regex_rules"): _table_of_str("a table of regex rewrites"),
    ("Trace", "sink"): _sink_kind(),
}

# -- what a file contains --------------------------------------------------------

_TOP_KEYS = ("listeners", "routes", "services", "otel")
_ROUTE_KEYS = (
    "name",
    "host",
    "prefix",
    "methods",
    "headers",
    "strip",
    "service",
    "metrics",
    "status",
    "chain",
)
_SERVICE_KEYS = ("balancer", "servers", "rebalancer", "forward")
_BALANCERS = ("RoundRobin", "LeastRequest", "ConsistentHash")
_LISTENER_TLS = ("cert", "key")


def chain_blocks() -> dict[str, Any]:
    """The block classes a route's ``chain`` can name: every public class of
    ``oxypy.__all__`` that wraps a next app (``Block(next_app, /, ...)``),
    except the balancers (a route's ``service``) and ``Router`` (the file's
    ``routes``)."""
    out: dict[str, Any] = {}
    for name, obj in _public().items():
        if not inspect.isclass(obj) or name in _BALANCERS or name in ("Router", "Metrics"):
            continue
        try:
            params = list(inspect.signature(obj).parameters.values())
        except (TypeError, ValueError):
            continue
        if params and params[0].name == "next_app" and params[0].kind is params[0].POSITIONAL_ONLY:
            out[name] = obj
    out["Metrics"] = _public()["Metrics"]
    return dict(sorted(out.items()))


def _toml_value(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | bytes):
        text = value.decode() if isinstance(value, bytes) else value
        return json.dumps(text)
    if isinstance(value, tuple | list | frozenset | set):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _table_md(params: Mapping[str, _Param], extra: Iterable[tuple[str, str, str]] = ()) -> str:
    rows = ["| key | value | default |", "| --- | --- | --- |"]
    rows += [f"| `{k}` | {kind} | {default} |" for k, kind, default in extra]
    for name, p in params.items():
        default = "**required**" if p.required else f"`{_toml_value(p.default)}`"
        rows.append(f"| `{name}` | {p.kind.name} | {default} |")
    return "\n".join(rows)


def reference_markdown() -> str:
    """The per-block option tables of ``docs/config.md``, generated from the
    signatures and conversion tables the loader itself uses."""
    public = _public()
    out = [
        "### `[[listeners]]`",
        "",
        _table_md(
            {k: v for k, v in _listener_params().items() if k != "ssl_context"},
            [
                ("address", 'a string, `"host:port"`', "**required**"),
                ("cert", "a file path (PEM certificate chain)", "(unset: plain HTTP)"),
                ("key", "a file path (PEM private key)", "(unset)"),
            ],
        ),
    ]
    for name in _BALANCERS:
        params = _params(public[name], skip_first=True)
        params.pop("servers", None)
        extra = [
            (
                "servers",
                "an array of URLs or `{url, weight}` tables (with `registry`: the seed)",
                "**required** (optional with `registry`)",
            ),
        ]
        if name == "RoundRobin":
            extra.insert(
                0,
                (
                    "balancer",
                    '`"RoundRobin"`, `"LeastRequest"` or `"ConsistentHash"`',
                    '`"RoundRobin"`',
                ),
            )
        extra += [
            ("rebalancer", "true or a Rebalancer table", "`false`"),
            ("forward", "a Forward table", "`{}`"),
        ]
        title = f'### `[services.NAME]` with `balancer = "{name}"`'
        out += ["", title, "", _table_md(params, extra)]
    out += ["", "### `forward` (Forward)", "", _table_md(_forward_params())]
    for name in ("Rebalancer",):
        out += ["", f"### `rebalancer` ({name})", "", _table_md(_params(public[name], True))]
    out += [
        "",
        "### `[[routes]]`",
        "",
        "\n".join(
            [
                "| key | value | default |",
                "| --- | --- | --- |",
                "| `name` | a string (identifies the route across reloads) | (unset) |",
                '| `host` | a string: `"a.example.com"` or `"*.example.com"` | (unset: any host) |',
                '| `prefix` | a path starting with `/` | `"/"` |',
                "| `methods` | an array of strings | (unset: any method) |",
                "| `headers` | a table of strings (exact values, all must match) | (unset) |",
                "| `strip` | a boolean: remove the prefix before the chain | `false` |",
                "| `service` | a `[services.NAME]` name | **required** (or `metrics`/`status`) |",
                "| `metrics` | a boolean: serve the Prometheus metrics | `false` |",
                "| `status` | a boolean: serve the live status page (`StatusPage`) | `false` |",
                "| `chain` | an array of block tables (first = outermost) | `[]` |",
            ]
        ),
    ]
    for name, cls in chain_blocks().items():
        params = _params(cls, skip_first=True)
        alias = " (alias of `PrometheusMetrics`)" if name == "Metrics" else ""
        out += ["", f'### `block = "{name}"`{alias}', "", _table_md(params)]
    options = [*_OPTION_CLASSES, "RedisStore", "RedisConnStore", "RedisRegistry"]
    for name in options:
        if name not in public:
            continue
        params = _params(public[name], False)
        renamed = _RENAMED_URL.get(name)
        if renamed is not None:  # the file names the URL after what it is
            params = {renamed if k in ("url", "url_or_client") else k: v for k, v in params.items()}
        out += ["", f"### {name} tables", "", _table_md(params)]
    return "\n".join(out) + "\n"


#: Option tables whose ``url`` argument the file spells differently.
_RENAMED_URL = {
    "RedisStore": "redis",
    "RedisConnStore": "redis",
    "RedisRegistry": "redis",
    "Webhook": "webhook",
    "RedirectFallback": "redirect",
}


def _listener_params() -> dict[str, _Param]:
    from .server import Server

    params = _params(Server, skip_first=True)
    params.pop("listen", None)
    return params


def _forward_params() -> dict[str, _Param]:
    from .forward import Forward

    params = _params(Forward, skip_first=False)
    params.pop("target", None)
    return params


def _norm(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class _Link:
    """The next app of a block built from a file: re-pointed when the block is
    carried over into a new configuration."""

    __slots__ = ("app",)

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return self.app(environ, start_response)


def _not_built(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
    return [b"not built\n"]


class _Generation:
    """One built configuration: its app, its objects, its in-flight count."""

    def __init__(self) -> None:
        self.app: WSGIApplication = _not_built
        self.listeners: list[dict[str, Any]] = []
        self.cache: dict[tuple[Any, ...], tuple[Any, _Link | None, list[Any]]] = {}
        self.relinks: list[tuple[_Link, WSGIApplication]] = []
        self.owned: list[Any] = []  # every object with close(), new or carried over
        self.inflight = 0
        self.retired = False
        self.closed = False
        self.metrics = False
        self.otel = False
        self.summary = ""
        self.listeners_norm = ""


class _Build:
    def __init__(self, doc: dict[str, Any], previous: _Generation | None) -> None:
        self.doc = doc
        self.prev = previous
        self.gen = _Generation()
        self.errors: list[str] = []
        self.new: list[Any] = []  # objects created by this build (closed if it fails)

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def _many(self, path: str, exc: _Invalid | _Many) -> None:
        if isinstance(exc, _Invalid):
            self.error(path + exc.key, exc.message)
        else:
            for key, message in exc.errors:
                self.error(path + key, message)

    def _reuse(self, key: tuple[Any, ...]) -> tuple[Any, _Link | None, list[Any]] | None:
        if self.prev is None:
            return None
        found = self.prev.cache.get(key)
        if found is not None and key not in self.gen.cache:
            return found
        return None

    def _own(
        self, key: tuple[Any, ...], obj: Any, link: _Link | None, parts: list[Any], new: bool
    ) -> None:
        """Record ``obj`` (built from the section ``key``) and the closeable
        ``parts`` it is made of as this generation's."""
        self.gen.cache[key] = (obj, link, parts)
        for part in parts:
            if callable(getattr(part, "close", None)):
                self.gen.owned.append(part)
                if new:
                    self.new.append(part)

    def run(self) -> None:
        doc = self.doc
        for key in doc:
            if key not in _TOP_KEYS:
                self.error(_key(key), _unknown(key, _TOP_KEYS))
        services = self._services(doc.get("services", {}))
        self._listeners(doc.get("listeners", []))
        self._routes(doc.get("routes", []), services)
        if "otel" in doc:
            self._otel(doc["otel"])

    def _otel(self, value: object) -> None:
        """``[otel]`` (or ``otel = true``): an OpenTelemetry block around the routes."""
        if value is False:
            return
        if value is True:
            value = {}
        if not isinstance(value, dict):
            self.error("otel", f"expected a table or a boolean, got {_describe(value)}")
            return
        from .otel import OpenTelemetry

        try:
            app = _construct(OpenTelemetry, value, first=self.gen.app)
        except (_Invalid, _Many) as exc:
            self._many("otel", exc)
            return
        self.gen.app = app
        self.gen.otel = True

    # -- listeners ----------------------------------------------------------------
    def _listeners(self, value: object) -> None:
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            self.error("listeners", f"expected an array of tables, got {_describe(value)}")
            return
        params = _listener_params()
        params.pop("ssl_context", None)
        for i, table in enumerate(value):
            path = f"listeners[{i}]"
            if not isinstance(table, dict):
                self.error(path, f"expected a table, got {_describe(table)}")
                continue
            opts: dict[str, Any] = {}
            ok = True
            for key in table:
                if key not in params and key not in ("address", *_LISTENER_TLS):
                    self.error(
                        f"{path}.{_key(key)}", _unknown(key, ["address", *_LISTENER_TLS, *params])
                    )
                    ok = False
            address = table.get("address")
            if not isinstance(address, str) or not address:
                self.error(
                    f"{path}.address",
                    "missing (required)"
                    if address is None
                    else f'expected a string such as "127.0.0.1:8080", got {_describe(address)}',
                )
                ok = False
            for name, param in params.items():
                if name in table:
                    try:
                        opts[name] = param.kind.convert(table[name])
                    except _Invalid as exc:
                        self.error(f"{path}.{name}{exc.key}", exc.message)
                        ok = False
            cert, key = table.get("cert"), table.get("key")
            if (cert is None) != (key is None):
                missing = "key" if key is None else "cert"
                self.error(f"{path}.{missing}", "missing (cert and key go together)")
                ok = False
            elif cert is not None:
                if not isinstance(cert, str) or not isinstance(key, str):
                    self.error(f"{path}.cert", "expected file paths (strings) for cert and key")
                    ok = False
                else:
                    try:
                        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                        ctx.load_cert_chain(cert, key)
                        opts["ssl_context"] = ctx
                    except (OSError, ssl.SSLError) as exc:
                        self.error(f"{path}.cert", f"cannot load cert/key: {exc}")
                        ok = False
            if ok:
                opts["listen"] = address
                from .server import Server

                try:  # the server's own checks (it binds only when started)
                    Server(
                        _not_built, str(address), **{k: v for k, v in opts.items() if k != "listen"}
                    )
                except (ConfigurationError, ValueError, TypeError) as exc:
                    message = str(exc)
                    key = "address" if "listen" in message else ""
                    self.error(f"{path}.{key}" if key else path, message)
                    continue
                self.gen.listeners.append(opts)
        self.gen.listeners_norm = _norm(value)

    # -- services -------------------------------------------------------------------
    def _services(self, value: object) -> dict[str, WSGIApplication]:
        out: dict[str, WSGIApplication] = {}
        if not isinstance(value, dict):
            self.error("services", f"expected a table of services, got {_describe(value)}")
            return out
        for name, table in value.items():
            path = f"services.{_key(name)}"
            if not isinstance(table, dict):
                self.error(path, f"expected a table, got {_describe(table)}")
                continue
            key = ("service", name, _norm(table))
            found = self._reuse(key)
            if found is not None:
                self._own(key, found[0], None, found[2], new=False)
                out[name] = found[0]
                continue
            built = self._service(path, table)
            if built is not None:
                self._own(key, built[0], None, built, new=True)
                out[name] = built[0]
        return out

    def _service(self, path: str, table: dict[str, Any]) -> list[Any] | None:
        """[the service app, the other objects it is made of...], or None after errors."""
        public = _public()
        balancer_name = table.get("balancer", "RoundRobin")
        if balancer_name not in _BALANCERS:
            self.error(
                f"{path}.balancer",
                f"expected one of {', '.join(map(json.dumps, _BALANCERS))}"
                f", got {_describe(balancer_name)}",
            )
            return None
        cls = public[balancer_name]
        bparams = _params(cls, skip_first=True)
        bparams.pop("servers", None)
        allowed = [*_SERVICE_KEYS, *bparams]
        errors_before = len(self.errors)
        for key in table:
            if key not in allowed:
                self.error(f"{path}.{_key(key)}", _unknown(key, allowed))
        # servers, checked one by one
        servers: list[tuple[int, str, int]] = []
        raw = table.get("servers")
        shared = "registry" in table  # the registry's set wins; servers only seed it
        if raw is None and shared:
            raw = []
        if raw is None:
            self.error(f"{path}.servers", "missing (required)")
        elif not isinstance(raw, list):
            self.error(f"{path}.servers", f"expected an array, got {_describe(raw)}")
        else:
            for i, item in enumerate(raw):
                spath = f"{path}.servers[{i}]"
                if isinstance(item, str):
                    servers.append((i, item, 1))
                    continue
                if not isinstance(item, dict):
                    self.error(
                        spath,
                        f"expected a URL string or a {{url, weight}} table, got {_describe(item)}",
                    )
                    continue
                for k in item:
                    if k not in ("url", "weight"):
                        self.error(f"{spath}.{_key(k)}", _unknown(k, ("url", "weight")))
                url, weight = item.get("url"), item.get("weight", 1)
                if not isinstance(url, str):
                    self.error(
                        f"{spath}.url",
                        "missing (required)"
                        if url is None
                        else f"expected a string, got {_describe(url)}",
                    )
                    continue
                if isinstance(weight, bool) or not isinstance(weight, int):
                    self.error(f"{spath}.weight", f"expected an integer, got {_describe(weight)}")
                    continue
                servers.append((i, url, weight))
        # Forward
        forward_table = table.get("forward", {})
        forward_kwargs: dict[str, Any] = {}
        if not isinstance(forward_table, dict):
            self.error(f"{path}.forward", f"expected a table, got {_describe(forward_table)}")
        else:
            fparams = _forward_params()
            for key, v in forward_table.items():
                if key not in fparams:
                    self.error(f"{path}.forward.{_key(key)}", _unknown(key, fparams))
                    continue
                try:
                    forward_kwargs[key] = fparams[key].kind.convert(v)
                except _Invalid as exc:
                    self.error(f"{path}.forward.{_key(key)}{exc.key}", exc.message)
        rebalancer = table.get("rebalancer", False)
        if not isinstance(rebalancer, bool | dict):
            self.error(
                f"{path}.rebalancer",
                f"expected true/false or a table of Rebalancer options, "
                f"got {_describe(rebalancer)}",
            )
        # balancer options
        btable = {k: v for k, v in table.items() if k in bparams}
        seeds: list[tuple[str, int]] = []
        if shared:  # checked here, so each bad server is named by its index
            for i, url, weight in servers:
                try:
                    seeds.append((parse_server(url)[0], check_weight(weight)))
                except (ConfigurationError, ValueError) as exc:
                    key = "url" if isinstance(raw, list) and isinstance(raw[i], dict) else ""
                    self.error(f"{path}.servers[{i}]" + (f".{key}" if key else ""), str(exc))
            if len(self.errors) > errors_before:
                return None
        forward = public["Forward"](**forward_kwargs)
        try:
            balancer = _construct(cls, btable, first=forward, before=(seeds,) if shared else ())
        except (_Invalid, _Many) as exc:
            _close(forward)
            self._many(path, exc)
            return None
        ok = len(self.errors) == errors_before
        for i, url, weight in [] if shared else servers:
            try:
                balancer.upsert_server(url, weight)
            except (ConfigurationError, ValueError) as exc:
                key = "url" if isinstance(raw, list) and isinstance(raw[i], dict) else ""
                self.error(f"{path}.servers[{i}]" + (f".{key}" if key else ""), str(exc))
                ok = False
        if ok and rebalancer is not False:
            try:
                return [
                    _construct(
                        public["Rebalancer"],
                        rebalancer if isinstance(rebalancer, dict) else {},
                        first=balancer,
                    ),
                    balancer,
                    forward,
                ]
            except (_Invalid, _Many) as exc:
                self._many(f"{path}.rebalancer", exc)
        if not ok or len(self.errors) > errors_before:
            _close(balancer)
            _close(forward)
            return None
        return [balancer, forward]

    # -- routes -----------------------------------------------------------------------
    def _routes(self, value: object, services: dict[str, WSGIApplication]) -> None:
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            self.error("routes", f"expected an array of tables, got {_describe(value)}")
            return
        if not value:
            self.error("routes", "no routes: a gateway needs at least one [[routes]] table")
            return
        from .router import Router

        declared = self.doc.get("services", {})
        if not isinstance(declared, dict):
            declared = {}
        routes: list[tuple[Any, ...]] = []
        shown: dict[str, Any] = {f"service {name}": app for name, app in services.items()}
        pages: list[Any] = []
        self.gen.metrics = False
        for i, table in enumerate(value):
            path = f"routes[{i}]"
            if not isinstance(table, dict):
                self.error(path, f"expected a table, got {_describe(table)}")
                continue
            for key in table:
                if key not in _ROUTE_KEYS:
                    self.error(f"{path}.{_key(key)}", _unknown(key, _ROUTE_KEYS))
            host = table.get("host")
            if host is not None and not isinstance(host, str):
                self.error(f"{path}.host", f"expected a string, got {_describe(host)}")
            prefix = table.get("prefix", "/")
            if not isinstance(prefix, str) or not prefix.startswith("/"):
                self.error(
                    f"{path}.prefix", f"expected a path starting with '/', got {_describe(prefix)}"
                )
            match: dict[str, Any] = {}
            for key, kind in (
                ("methods", _STRS),
                ("headers", _table_of_str("a table of strings")),
                ("strip", _BOOL),
            ):
                if key in table:
                    try:
                        match[key] = kind.convert(table[key])
                    except _Invalid as exc:
                        self.error(f"{path}.{key}{exc.key}", exc.message)
            target: Any = None
            service, metrics = table.get("service"), table.get("metrics", False)
            status = table.get("status", False)
            if status is True:
                if service is not None or metrics is not False:
                    self.error(
                        f"{path}.status", "a route has a service, metrics = true or status = true"
                    )
                # Short streams: after a reload the browser reconnects within
                # 30 s to the new configuration's page (and re-renders it).
                target = _public()["StatusPage"](title="oxypy gateway status", stream_seconds=30)
                pages.append(target)
            elif status is not False:
                self.error(f"{path}.status", f"expected a boolean, got {_describe(status)}")
            elif metrics is True:
                if service is not None:
                    self.error(
                        f"{path}.service", "a route has a service or metrics = true, not both"
                    )
                try:
                    target = _public()["metrics_app"]()
                except ConfigurationError as exc:
                    self.error(f"{path}.metrics", str(exc))
                self.gen.metrics = True
            elif metrics is not False:
                self.error(f"{path}.metrics", f"expected a boolean, got {_describe(metrics)}")
            elif service is None:
                self.error(
                    f"{path}.service",
                    "missing (required: the name of a [services] table, "
                    "or metrics = true, or status = true)",
                )
            elif not isinstance(service, str):
                self.error(f"{path}.service", f"expected a string, got {_describe(service)}")
            elif service not in declared:
                self.error(
                    f"{path}.service",
                    f"no service {service!r}"
                    + (
                        f" (did you mean {c[0]!r}?)"
                        if (c := difflib.get_close_matches(service, list(declared), n=1))
                        else ""
                    ),
                )
            else:
                target = services.get(service)
            if (
                isinstance(prefix, str)
                and prefix.startswith("/")
                and (host is None or isinstance(host, str))
            ):
                try:  # the Router's own checks, for this route alone
                    Router([(host, prefix, _not_built, match)])
                except ConfigurationError as exc:
                    self.error(path, str(exc).removeprefix("Router: "))
            route_key = _norm([table.get("name"), host, prefix, match])
            app = self._chain(f"{path}.chain", table.get("chain", []), target, route_key)
            if app is not None:
                routes.append((host, prefix, app, match))
                if status is not True and metrics is not True:
                    label = table.get("name") or f"{host or ''}{prefix}"
                    shown[f"route {label}"] = app
        if self.errors:
            return
        for page in pages:
            page.watch(shown)
        self.gen.app = Router(routes)
        self.gen.summary = (
            f"{len(self.gen.listeners)} listener(s), {len(routes)} route(s), "
            f"{len(self.doc.get('services', {}))} service(s)"
        )

    def _chain(self, path: str, value: object, target: Any, route_key: str) -> Any:
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            self.error(path, f"expected an array of block tables, got {_describe(value)}")
            return None
        blocks = chain_blocks()
        parsed: list[tuple[int, Any, dict[str, Any]]] = []
        for i, table in enumerate(value):
            bpath = f"{path}[{i}]"
            if not isinstance(table, dict):
                self.error(bpath, f"expected a table with a block key, got {_describe(table)}")
                continue
            name = table.get("block")
            if name is None:
                self.error(f"{bpath}.block", "missing (required: one of " + ", ".join(blocks) + ")")
                continue
            if name not in blocks:
                close = difflib.get_close_matches(str(name), list(blocks), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.error(f"{bpath}.block", f"unknown block {name!r}{hint}")
                continue
            parsed.append((i, blocks[name], {k: v for k, v in table.items() if k != "block"}))
        if target is None:
            # Check the blocks' options against a placeholder, then give up.
            for i, cls, opts in parsed:
                self._block(f"{path}[{i}]", cls, opts, _not_built, None)
            return None
        app = target
        seen: dict[str, int] = {}
        start = len(self.errors)
        chunks: list[list[str]] = []
        for i, cls, opts in reversed(parsed):
            mark = len(self.errors)
            chunks.append(self.errors[mark:])  # filled in below
            norm = _norm([cls.__name__, opts])
            seen[norm] = seen.get(norm, 0) + 1
            key = ("block", route_key, norm, seen[norm])
            found = self._reuse(key)
            if cls.__name__ == "PrometheusMetrics":
                self.gen.metrics = True
            if found is not None:
                obj, link, parts = found
                assert link is not None
                self.gen.relinks.append((link, app))
                self._own(key, obj, link, parts, new=False)
                app = obj
                continue
            built = self._block(f"{path}[{i}]", cls, opts, app, key)
            app = built if built is not None else app
            chunks[-1] = self.errors[mark:]
        # Built innermost first; reported in the file's order.
        self.errors[start:] = [e for chunk in reversed(chunks) for e in chunk]
        return app if not self.errors else None

    def _block(
        self, path: str, cls: Any, opts: dict[str, Any], app: Any, key: tuple[Any, ...] | None
    ) -> Any:
        link = _Link(app)
        opened: list[Any] = []
        try:
            obj = _construct(cls, opts, first=link, opened=opened)
        except (_Invalid, _Many) as exc:
            self._many(path, exc)
            return None
        if key is None:
            for part in (obj, *opened):
                _close(part)
            return None
        self._own(key, obj, link, [obj, *opened], new=True)
        return obj


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - closing must go on
            log.warning("closing %s failed", type(obj).__name__, exc_info=True)


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(origin, [f"(toml): {exc}"]) from None


def _build(text: str, origin: str, previous: _Generation | None) -> _Generation:
    doc = _parse(text, origin)
    build = _Build(doc, previous)
    try:
        build.run()
    except BaseException:
        for obj in build.new:
            _close(obj)
        raise
    if build.errors:
        for obj in build.new:
            _close(obj)
        raise ConfigFileError(origin, build.errors)
    return build.gen


# -- the gateway -------------------------------------------------------------------


class Gateway:
    """A WSGI application built from a TOML file, reloadable in place.

    ``gateway(environ, start_response)`` dispatches through the current
    configuration.  :meth:`reload` (and the file watcher :meth:`watch`
    starts, and ``SIGHUP`` under ``oxypy run``) builds the file again and
    swaps it in; a file with errors keeps the running configuration and logs
    every error on the ``oxypy.config`` logger.

    Counted in ``oxypy_config_reloads_total{result="success"|"error"}`` when
    the file configures a ``Metrics`` block or a ``metrics = true`` route.

    :param source: the file path (``str`` or :class:`~pathlib.Path`), or the
        TOML text itself (anything containing a newline or ``=``); text cannot
        be reloaded from disk.
    """

    def __init__(self, source: str | os.PathLike[str]) -> None:
        text = str(source)
        if isinstance(source, os.PathLike) or ("\n" not in text and "=" not in text):
            self.path: str | None = os.fspath(source)
            self.origin = self.path
            text = self._read()
        else:
            self.path = None
            self.origin = "<config>"
        self._current = _build(text, self.origin, None)
        self._relink(self._current)
        self._live = [self._current]  # the current generation and those draining
        self._lock = Semaphore()
        self._watcher: Any = None
        self._counted = False
        self.reloads = {"success": 0, "error": 0}
        self._text = text

    def _read(self) -> str:
        assert self.path is not None
        try:
            return Path(self.path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigFileError(self.origin, [f"(file): cannot read: {reason}"]) from None

    @property
    def listeners(self) -> list[dict[str, Any]]:
        """The options of each ``[[listeners]]`` table: ``listen`` (the address)
        and the :class:`~oxypy.Server` keyword options (``ssl_context`` when
        ``cert``/``key`` are set).  :meth:`servers` builds the servers."""
        return [dict(opts) for opts in self._current.listeners]

    def servers(self, **defaults: Any) -> list[Any]:
        """One unstarted :class:`~oxypy.Server` serving this gateway per
        ``[[listeners]]`` table; ``defaults`` are options the file did not set."""
        from .server import Server

        out = []
        for opts in self.listeners:
            listen = opts.pop("listen")
            out.append(Server(self, listen, **{**defaults, **opts}))
        return out

    @property
    def traced(self) -> bool:
        """Whether the file has an ``[otel]`` table (an OpenTelemetry block around
        the routes, taking its tracer from the global tracer provider)."""
        return self._current.otel

    @property
    def summary(self) -> str:
        """One line: how many listeners, routes and services are running."""
        return self._current.summary

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        gen = self._current
        gen.inflight += 1
        try:
            result = gen.app(environ, start_response)
        except BaseException:
            self._release(gen)
            raise
        return ClosingIterable(result, lambda: self._release(gen))

    def _release(self, gen: _Generation) -> None:
        gen.inflight -= 1
        if gen.retired and gen.inflight == 0:
            self._dispose(gen)

    def _dispose(self, gen: _Generation) -> None:
        if gen.closed:
            return
        gen.closed = True
        self._live = [g for g in self._live if g is not gen]
        keep = {id(obj) for g in self._live for obj in g.owned}
        for obj in gen.owned:
            if id(obj) not in keep:
                _close(obj)

    @staticmethod
    def _relink(gen: _Generation) -> None:
        for link, app in gen.relinks:
            link.app = app
        gen.relinks = []

    def reload(self) -> bool:
        """Build the file again and swap it in; False (old config kept) on errors.

        Blocks and services whose own section is unchanged are carried over
        (their state with them); the previous configuration's other objects
        are closed once its last in-flight request ends.
        """
        if self.path is None:
            raise ConfigurationError("a Gateway built from text has no file to reload")
        with self._lock:
            try:
                text = self._read()
                new = _build(text, self.origin, self._current)
            except ConfigFileError as exc:
                self._count("error")
                log.error("%s", exc)
                return False
            except Exception:  # noqa: BLE001 - a reload must never take the gateway down
                self._count("error")
                log.exception("reloading %s failed; the previous configuration stays", self.origin)
                return False
            if new.listeners_norm != self._current.listeners_norm:
                log.warning("%s: listeners changed; restart to apply them", self.origin)
            old = self._current
            self._relink(new)
            self._live.append(new)
            self._current = new  # the atomic swap
            old.retired = True
            if old.inflight == 0:
                self._dispose(old)
            self._text = text
            self._count("success")
            log.info("%s reloaded: %s", self.origin, new.summary)
            return True

    def _count(self, result: str) -> None:
        self.reloads[result] += 1
        if not self._current.metrics:
            return
        counter = _reload_counter()
        if counter is not None:
            counter.labels(result=result).inc()

    def watch(self, interval: float = 1.0) -> Gateway:
        """Reload when the file changes (gevent's stat watcher, polled every
        ``interval`` seconds).  Idempotent; returns self."""
        if self.path is None:
            raise ConfigurationError("a Gateway built from text has no file to watch")
        if self._watcher is None:
            watcher = gevent.get_hub().loop.stat(self.path, interval)
            watcher.start(lambda: gevent.spawn(self._changed))
            self._watcher = watcher
        return self

    def _changed(self) -> None:
        try:
            text = Path(self.path or "").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
        if text == self._text:
            return
        self.reload()

    def close(self) -> None:
        """Stop watching and close every object of the running configuration."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        gen = self._current
        gen.retired = True
        keep: set[int] = set()
        for obj in gen.owned:
            if id(obj) not in keep:
                keep.add(id(obj))
                _close(obj)
        gen.closed = True


_COUNTER: list[Any] = []


def _reload_counter() -> Any:
    if _COUNTER:
        return _COUNTER[0]
    try:
        import prometheus_client as pc
    except ImportError:
        return None
    try:
        counter = pc.Counter("oxypy_config_reloads", "Configuration reloads, by result", ["result"])
    except ValueError:  # registered by another copy of this module
        return None
    _COUNTER.append(counter)
    return counter


def load_config(source: str | os.PathLike[str], *, watch: bool = False) -> Gateway:
    """Build the gateway a TOML file (or TOML text) describes.

    :param source: a file path, or TOML text (see :class:`Gateway`).
    :param watch: reload when the file changes (:meth:`Gateway.watch`).
    :raises ConfigFileError: every error of the file, each naming its key path.
    """
    gateway = Gateway(source)
    if watch:
        gateway.watch()
    return gateway


def load_app(path: str | os.PathLike[str]) -> Gateway:
    """The gateway of a TOML file, watched for changes: ``app = load_app("gateway.toml")``
    under gunicorn (listeners in the file are ignored there: gunicorn binds)."""
    return load_config(path, watch=True)
