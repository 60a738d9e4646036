"""Argument types and chain building for the ``oxypy`` console script.

Every function here turns one command-line value into a configured object and
raises :class:`FlagError` naming the flag when the value is wrong, so the CLI
can exit with status 2 and a message the user can act on.  Nothing here
touches the network at import time; the blocks are imported lazily by
:func:`build_proxy`, after ``cli.main`` has monkey-patched the process.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._core.net import parse_listen
from .._core.urls import parse_target_url

if TYPE_CHECKING:
    from .._core.types import WSGIApplication
    from ..ratelimit import Rate

__all__ = [
    "FlagError",
    "Proxy",
    "build_proxy",
    "parse_listen_flag",
    "parse_rate",
    "parse_upstream",
    "server_options",
]

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*(?::\s*(\d+)\s*)?$")


class FlagError(Exception):
    """A command-line value is invalid; ``flag`` names the option."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"argument {flag}: {message}")
        self.flag = flag
        self.message = message


def parse_rate(text: str) -> tuple[float, float, int | None]:
    """``"100/s:200"`` -> ``(100.0, 1.0, 200)``: average, period seconds, burst.

    Units: ``s``, ``m``, ``h`` (also ``sec``/``min``/``hour``/``second``/``minute``).
    The burst after the colon is optional (RateLimit then uses the average).
    Raises ValueError with a short reason.
    """
    m = _RATE.match(text.lower())
    if m is None and _RATE.match(text.lower().lstrip().lstrip("-")):
        raise ValueError(f"the rate must be above 0, got {text!r}")
    if m is None:
        raise ValueError(f"expected N/UNIT[:BURST] such as 100/s:200, got {text!r}")
    average = float(m.group(1))
    unit = m.group(2)
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} in {text!r} (use s, m or h)")
    if average <= 0:
        raise ValueError(f"the rate must be above 0, got {text!r}")
    if average == float("inf"):
        raise ValueError(f"the rate is too large: {text!r}")
    burst = int(m.group(3)) if m.group(3) is not None else None
    if burst is not None and burst < 1:
        raise ValueError(f"the burst must be at least 1, got {text!r}")
    return average, _UNITS[unit], burst


def parse_upstream(text: str) -> str:
    """An upstream base URL: ``http(s)://host[:port][/path]``, no query, fragment or userinfo."""
    # ConfigurationError is a ValueError: argparse reports its message.
    parse_target_url(text, what="upstream", allow_userinfo=False)
    return text


def parse_listen_flag(text: str) -> str:
    """``host:port`` (``[::1]:port`` for IPv6); port 0 picks a free one."""
    parse_listen(text)  # ConfigurationError is a ValueError naming the fault
    return text


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`oxypy.Server` options of the serving flags (every subcommand)."""
    options: dict[str, Any] = {
        "graceful_timeout": args.graceful_timeout,
        "header_timeout": args.header_timeout,
        "keepalive_timeout": args.keepalive_timeout,
        "body_timeout": args.body_timeout,
        "max_connections": args.max_connections,
    }
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if cert is None and key is None:
        return options
    if cert is None or key is None:
        raise FlagError(
            "--tls-cert" if cert is None else "--tls-key", "--tls-cert and --tls-key go together"
        )
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise FlagError("--tls-cert", f"cannot load {cert} with {key}: {exc}") from None
    options["ssl_context"] = context
    options["handshake_timeout"] = args.handshake_timeout
    return options


def argtype(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Wrap a parser for argparse: ValueError becomes ArgumentTypeError with its reason."""

    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


@dataclass
class Proxy:
    """The built chain and the blocks to close when the server stops."""

    app: WSGIApplication
    closers: list[Callable[[], object]] = field(default_factory=list)
    balancer: Any = None
    breaker: Any = None
    trace: Any = None

    def close(self) -> None:
        # Outermost first: Trace flushes its lines last-in, balancers stop checkers.
        for close in self.closers:
            close()


def _forward_flag(args: argparse.Namespace) -> str:
    """The flag to name when Forward refuses its options."""
    for flag in ("ca_certs", "client_cert", "server_name"):
        if getattr(args, flag, None) is not None:
            return "--" + flag.replace("_", "-")
    return "--trusted-proxy"


def _with_metrics(app: WSGIApplication, path: str) -> WSGIApplication:
    """``app`` measured by PrometheusMetrics, and ``path`` answering the metrics."""
    from .. import PrometheusMetrics, metrics_app

    if not path.startswith("/"):
        raise FlagError("--metrics", f"expected a path starting with /, got {path!r}")
    measured = _block("--metrics", lambda: PrometheusMetrics(app))
    exporter = _block("--metrics", metrics_app)

    def route(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == path:
            return exporter(environ, start_response)
        return measured(environ, start_response)

    return route


def _with_status(app: WSGIApplication, path: str, allow: list[str] | None, trusted: Any) -> Any:
    """``app``, with ``path`` (and below it) answered by a StatusPage of ``app``
    (behind the same ``--ip-allow`` as the rest)."""
    from .. import IPAllowList, StatusPage

    if not path.startswith("/") or path == "/":
        raise FlagError("--status-page", f"expected a path below /, such as /status, got {path!r}")
    mount = path.rstrip("/")
    page: WSGIApplication = StatusPage(app, title="oxypy proxy status")
    if allow:
        page = IPAllowList(page, allow, trusted_proxies=trusted)

    def route(environ: dict[str, Any], start_response: Any) -> Any:
        here = environ.get("PATH_INFO", "")
        if here == mount or here.startswith(mount + "/"):
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + mount
            environ["PATH_INFO"] = here[len(mount) :]
            return page(environ, start_response)
        return app(environ, start_response)

    return route


def otel_provider(flag: str, *, make_global: bool = False) -> Any:
    """The SDK tracer provider ``OTEL_*`` describes (OTLP/HTTP, in batches).

    ``make_global``: also install it as OpenTelemetry's global provider (unless
    one is already installed: then that one is returned and nothing is built).
    """
    from ..otel import tracer_provider_from_env

    provider = None
    if make_global:
        try:
            from opentelemetry import trace
        except ImportError:
            pass  # tracer_provider_from_env names what to install
        else:
            current = trace.get_tracer_provider()
            if not isinstance(current, trace.ProxyTracerProvider):
                return current
    provider = _block(flag, tracer_provider_from_env)
    if make_global:
        trace.set_tracer_provider(provider)
    return provider


def _block(flag: str, make: Callable[[], Any]) -> Any:
    from ..exceptions import ConfigurationError

    try:
        return make()
    except ConfigurationError as exc:
        raise FlagError(flag, str(exc)) from None


def build_proxy(
    args: argparse.Namespace,
    *,
    trace_sink: Any = None,
    fallback: WSGIApplication | None = None,
) -> Proxy:
    """Build OpenTelemetry → Trace → RequestID → Timeout → IPAllowList → CORS → Compress →
    ConnLimit → RateLimit → CircuitBreaker → Mirror → Buffer → Hedge →
    balancer → Forward from parsed flags.

    Blocks whose flag is absent are left out; Buffer is there only with
    ``--retry``; one ``--retry-budget`` is shared by Buffer and Hedge;
    Timeout only with ``--deadline``.
    """
    from .. import (
        CORS,
        Buffer,
        CircuitBreaker,
        Compress,
        ConnLimit,
        Forward,
        HealthCheck,
        Hedge,
        IPAllowList,
        LeastRequest,
        Mirror,
        OutlierDetection,
        Rate,
        RateLimit,
        RequestID,
        RetryBudget,
        RoundRobin,
        StickySession,
        Timeout,
        Trace,
    )

    trusted: list[str] = list(args.trusted_proxy or [])
    timeout: float | None = args.timeout
    fwd_options: dict[str, Any] = {
        "trusted_proxies": trusted,
        "pass_host_header": args.pass_host_header,
    }
    if timeout is not None:
        fwd_options["read_timeout"] = timeout
        fwd_options["connect_timeout"] = min(5.0, timeout)
    per_try = getattr(args, "per_try_timeout", None)
    if per_try is not None and args.retry is None:
        raise FlagError("--per-try-timeout", "needs --retry (it bounds each retried attempt)")
    if per_try is not None and not math.isfinite(per_try):
        raise FlagError("--per-try-timeout", f"must be a finite number, got {per_try!r}")
    header_timeout = getattr(args, "response_header_timeout", None)
    if header_timeout is not None:
        fwd_options["response_header_timeout"] = header_timeout
    for flag, option in (
        ("ca_certs", "ca_certs"),
        ("client_cert", "cert_file"),
        ("client_key", "key_file"),
        ("server_name", "server_hostname"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            fwd_options[option] = value
    if getattr(args, "insecure", False):
        fwd_options["insecure"] = True
    if (getattr(args, "client_key", None) is not None) and getattr(
        args, "client_cert", None
    ) is None:
        raise FlagError("--client-key", "needs --client-cert")
    fwd = _block(_forward_flag(args), lambda: Forward(**fwd_options))
    proxy = Proxy(app=fwd)

    sticky = None
    if args.sticky is not None:
        secret = args.sticky_secret or os.environ.get("OXYPY_STICKY_SECRET") or None
        sticky = _block("--sticky", lambda: StickySession(args.sticky, secret=secret))
    health = None
    if args.health_check is not None:
        health = _block(
            "--health-check",
            lambda: HealthCheck(args.health_check, interval=args.health_interval),
        )
    outlier = None
    if args.eject_after is not None:
        outlier = _block(
            "--eject-after", lambda: OutlierDetection(consecutive_errors=args.eject_after)
        )
    balancer_cls: Any = LeastRequest if args.least_request else RoundRobin
    percent = getattr(args, "retry_budget", None)
    hedge_delay = getattr(args, "hedge", None)
    budget = None
    if percent is not None:
        if args.retry is None and hedge_delay is None:
            raise FlagError("--retry-budget", "needs --retry or --hedge")
        budget = _block("--retry-budget", lambda: RetryBudget(percent))
    # Validate everything that starts no greenlet before the balancer starts its checker.
    rates: list[Rate] = []
    for text in args.rate or []:
        average, period, burst = text
        rates.append(_block("--rate", lambda: Rate(average, period, burst=burst)))  # noqa: B023

    balancer = _block(
        "UPSTREAM",
        lambda: balancer_cls(
            fwd,
            args.upstreams,
            sticky=sticky,
            health_check=health,
            outlier_detection=outlier,
        ),
    )
    proxy.balancer = balancer
    proxy.closers.append(balancer.close)
    app: WSGIApplication = balancer
    try:
        if hedge_delay is not None:
            inner = app
            app = _block("--hedge", lambda: Hedge(inner, delay=hedge_delay, retry_budget=budget))
        if args.retry is not None:
            inner = app
            app = _block(
                "--retry",
                lambda: Buffer(
                    inner, retry=args.retry, retry_budget=budget, per_try_timeout=per_try
                ),
            )
        compare = getattr(args, "mirror_compare", False)
        if compare and getattr(args, "mirror", None) is None:
            raise FlagError("--mirror-compare", "needs --mirror")
        mirror_block = None
        if getattr(args, "mirror", None) is not None:
            inner = app
            app = mirror_block = _block(
                "--mirror", lambda: Mirror(inner, args.mirror, compare=compare)
            )
        if args.breaker is not None:
            inner = app
            cb_options: dict[str, Any] = {}
            if fallback is not None:
                cb_options["fallback"] = fallback
            if args.breaker_duration is not None:
                cb_options["fallback_duration"] = args.breaker_duration
                cb_options["recovery_duration"] = args.breaker_duration
            app = _block("--breaker", lambda: CircuitBreaker(inner, args.breaker, **cb_options))
            proxy.breaker = app
        if rates:
            inner = app
            app = _block(
                "--rate",
                lambda: RateLimit(inner, rates=rates, source="client.ip", trusted_proxies=trusted),
            )
        if args.conn_limit is not None:
            inner = app
            app = _block(
                "--conn-limit",
                lambda: ConnLimit(
                    inner, max_conns=args.conn_limit, source="client.ip", trusted_proxies=trusted
                ),
            )
        # The edge blocks, outermost last: an address outside --ip-allow is
        # refused before anything else runs; Trace and RequestID still see it.
        if getattr(args, "compress", False):
            app = Compress(app)
        if getattr(args, "cors_origin", None):
            inner = app
            app = _block("--cors-origin", lambda: CORS(inner, allow_origins=args.cors_origin))
        if getattr(args, "ip_allow", None):
            inner = app
            app = _block(
                "--ip-allow",
                lambda: IPAllowList(inner, args.ip_allow, trusted_proxies=trusted),
            )
        deadline = getattr(args, "deadline", None)
        if deadline is not None:
            inner = app
            app = _block("--deadline", lambda: Timeout(inner, deadline))
        status_path = getattr(args, "status_page", None)
        if status_path is not None:
            ip_allow = getattr(args, "ip_allow", None)
            app = _with_status(app, status_path, ip_allow, trusted)
        metrics_path = getattr(args, "metrics", None)
        if metrics_path is not None:
            app = _with_metrics(app, metrics_path)
            if mirror_block is not None:
                from .. import MirrorMetrics

                MirrorMetrics().add("mirror", mirror_block)
        if args.request_id:
            app = RequestID(app)
        if args.trace or trace_sink is not None:
            inner = app
            sink = trace_sink if trace_sink is not None else sys.stderr
            trace = _block(
                "--trace", lambda: Trace(inner, sink=sink, trusted_proxies=trusted or None)
            )
            proxy.trace = trace
            proxy.closers.insert(0, trace.close)
            app = trace
        if getattr(args, "otel", False):
            from ..otel import OpenTelemetry

            provider = otel_provider("--otel")
            proxy.closers.append(provider.shutdown)  # last: sends the spans still queued
            app = OpenTelemetry(app, tracer_provider=provider, trusted_proxies=trusted)
    except BaseException:
        proxy.close()
        raise
    proxy.app = app
    return proxy
