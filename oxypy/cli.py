"""The ``oxypy`` console script: a ready-made gateway, any WSGI app, a demo.

``oxypy servers`` lists or changes the server set of a Redis registry
(docs/fleet.md).  ``oxypy proxy`` builds Trace → ConnLimit → RateLimit → CircuitBreaker →
Buffer → balancer → Forward from flags and serves it; ``oxypy serve
module:app`` serves any WSGI application on the embedded server; ``oxypy
demo`` runs two local upstreams (one flaky) behind the full chain.  Bad
flags, URLs or predicates exit with status 2 and a message naming the flag,
never a traceback.

The command shows the toolkit's warnings (upstream failures answered 502/504,
a Redis store failing open, a breaker tripping) on stderr, one line each:
unless logging was configured already, it gives the ``oxypy`` logger a stderr
handler at WARNING.  The library itself configures no logging.

The process cooperates with gevent.  The console script's entry point
(``_oxypy_cli.main``, a module outside the package) patches it before
``oxypy`` is imported; under ``python -m oxypy`` the package's first import
(``oxypy._cli.boot``) does, before anything imports ``ssl``.  Nothing
re-executes the process.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from ._cli.chain import (
    FlagError,
    argtype,
    parse_listen_flag,
    parse_rate,
    parse_upstream,
    server_options,
)
from .exceptions import ConfigurationError

__all__ = ["main", "make_parser"]

PROG = "oxypy"
_LOG_LEVELS = ("debug", "info", "warning", "error")

_EPILOG = """\
examples:
  oxypy proxy --listen 127.0.0.1:8080 http://127.0.0.1:9001 http://127.0.0.1:9002 \\
        --retry 'IsNetworkError() && Attempts() < 3' \\
        --breaker 'NetworkErrorRatio() > 0.5' --rate 100/s:200 --trace
  oxypy serve mygateway:app --listen 0.0.0.0:8080
  oxypy demo
  oxypy check gateway.toml
  oxypy run gateway.toml
  oxypy servers list --redis redis://127.0.0.1:6379/0 --name api
"""

_PROXY_EPILOG = """\
examples:
  # two app servers, retries on network errors, a breaker, a rate limit, JSON access lines
  oxypy proxy http://10.0.0.5:8000 http://10.0.0.6:8000 --listen 0.0.0.0:8080 \\
        --retry 'IsNetworkError() && Attempts() < 3' \\
        --breaker 'NetworkErrorRatio() > 0.5' --rate 100/s:200 --trace

  # HTTPS in front, a private-CA upstream, Prometheus metrics at /metrics, JSON logs
  oxypy proxy https://app.internal:8443 --listen 0.0.0.0:443 \\
        --tls-cert /etc/oxypy/cert.pem --tls-key /etc/oxypy/key.pem \\
        --ca-certs /etc/oxypy/internal-ca.pem --metrics /metrics \\
        --log-level info --log-format json

  # Django behind the proxy: keep the client's Host so CSRF's origin check passes
  oxypy proxy http://127.0.0.1:8000 --pass-host-header --health-check /healthz
"""


def _version() -> str:
    from . import __version__

    return __version__


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``oxypy`` command (all subcommands)."""
    return _make_parsers()[0]


def _make_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="oxypy: a composable WSGI reverse proxy and gateway on gevent.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    listen = argtype(parse_listen_flag, "HOST:PORT")

    p = sub.add_parser(
        "proxy",
        help="reverse-proxy to one or more upstreams through the full chain",
        description="Serve Trace -> ConnLimit -> RateLimit -> CircuitBreaker -> Buffer -> "
        "balancer -> Forward; blocks whose flag is absent are left out.",
        epilog=_PROXY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "upstreams",
        metavar="UPSTREAM",
        nargs="+",
        type=argtype(parse_upstream, "URL"),
        help="upstream base URL, e.g. http://127.0.0.1:9001",
    )
    _common(p, listen)
    _chain_flags(p)

    s = sub.add_parser(
        "serve",
        help="serve any WSGI app (module:app or module:factory()) on the embedded server",
        description="Serve a WSGI application on oxypy's server (WebSockets, graceful stop). "
        "The current directory is importable.",
    )
    s.add_argument("target", metavar="APP", help="module:attribute, or module:factory() to call")
    _common(s, listen)
    s.add_argument(
        "--otel",
        action="store_true",
        help="trace requests with OpenTelemetry (the global tracer provider, set up from "
        "the OTEL_* environment variables), exported over OTLP/HTTP",
    )

    d = sub.add_parser(
        "demo",
        help="two local demo upstreams (one flaky) behind the full chain",
        description="Start two demo upstreams in this process, the full chain in front, "
        "and generate a little traffic to show balancing, retries and the breaker.",
    )
    _common(d, listen)
    d.add_argument(
        "--no-traffic", action="store_true", help="do not generate traffic; only answer curl"
    )
    d.add_argument("--trace", action="store_true", help="print every Trace JSON line")
    d.add_argument(
        "--interval", type=_positive, default=3.0, metavar="SECONDS", help="summary every N s (3)"
    )
    c, r = _config_parsers(sub)
    from ._cli.servers import add_servers_parser

    v = add_servers_parser(sub)
    return parser, {"proxy": p, "serve": s, "demo": d, "check": c, "run": r, "servers": v}


def _config_parsers(sub: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    c = sub.add_parser(
        "check",
        help="validate a gateway TOML file (exit 0, or 2 listing every error)",
        description="Build the gateway a TOML file describes (docs/config.md) and close it: "
        "exit 0 with a one-line summary, or 2 with every error (key path: problem).",
    )
    c.add_argument("config", metavar="FILE", help="the gateway's TOML file")
    r = sub.add_parser(
        "run",
        help="serve a gateway TOML file, reloading it on change or SIGHUP",
        description="Serve the gateway a TOML file describes on the listeners it names. "
        "The file is reloaded when it changes and on SIGHUP; a file with errors keeps the "
        "running configuration (the errors are logged).",
    )
    r.add_argument("config", metavar="FILE", help="the gateway's TOML file")
    r.add_argument(
        "--no-watch", action="store_true", help="do not watch the file (SIGHUP still reloads)"
    )
    _log_flags(r)
    r.add_argument(
        "--otel",
        action="store_true",
        help="trace requests with OpenTelemetry (as an [otel] table in the file does), "
        "exported over OTLP/HTTP as the OTEL_* environment variables say",
    )
    r.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, let in-flight requests finish for up to N s (10)",
    )
    return c, r


def _config_command(args: argparse.Namespace) -> int:
    """``oxypy check`` / ``oxypy run``: 2 and every error on a bad file."""
    from .config import load_config
    from .exceptions import ConfigFileError

    try:
        gateway = load_config(os.fspath(args.config))
    except ConfigFileError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        gateway.close()
        print(f"{args.config}: OK: {gateway.summary}", flush=True)
        return 0
    _show_warnings(args)
    logging.getLogger("oxypy.config").setLevel(logging.INFO)
    provider = None
    try:
        app: Any = gateway
        if args.otel or gateway.traced:
            from ._cli.chain import otel_provider
            from .otel import OpenTelemetry

            # The global provider: the file's [otel] block (and any
            # OpenTelemetry block in a chain) takes its tracer from it.
            provider = otel_provider("--otel" if args.otel else "FILE", make_global=True)
            if not gateway.traced:
                app = OpenTelemetry(gateway)
        _run_gateway(gateway, app, args)
    finally:
        gateway.close()
        if provider is not None:
            provider.shutdown()
    return 0


def _run_gateway(gateway: Any, app: Any, args: argparse.Namespace) -> None:
    import signal

    import gevent

    from .server import Server

    servers = []
    for opts in gateway.listeners:
        listen = opts.pop("listen")
        servers.append(Server(app, listen, **{"graceful_timeout": args.graceful_timeout, **opts}))
    if not servers:
        raise FlagError("FILE", "the file has no [[listeners]]: nothing to serve on")
    if not args.no_watch:
        gateway.watch()
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(gateway.reload))
    for server in servers:
        server.start()
    print(
        f"{PROG}: serving {args.config} ({gateway.summary}) on "
        f"{', '.join(server.url for server in servers)} (Ctrl-C to stop)",
        flush=True,
    )
    try:
        servers[0].serve_forever()
    finally:
        for server in servers[1:]:
            server.stop()
    print(f"{PROG}: stopped", flush=True)


def _common(p: argparse.ArgumentParser, listen: Any) -> None:
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve HTTPS with this PEM certificate (chain); needs --tls-key",
    )
    p.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    p.add_argument(
        "--handshake-timeout",
        type=_timer,
        default=10.0,
        metavar="SECONDS",
        help="with --tls-cert: close a client that has not finished its TLS handshake "
        "N s after connecting (10)",
    )
    _log_flags(p)
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        type=listen,
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:8080; port 0 picks a free one)",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, let in-flight requests finish for up to N s (10)",
    )
    p.add_argument(
        "--header-timeout",
        type=_timer,
        default=30.0,
        metavar="SECONDS",
        help="a request head must arrive within N s of its first byte, else 408 (30)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=_timer,
        default=60.0,
        metavar="SECONDS",
        help="close a keep-alive connection idle for N s between requests (60)",
    )
    p.add_argument(
        "--body-timeout",
        type=_timer,
        default=60.0,
        metavar="SECONDS",
        help="cut a request body (or response write) making no progress for N s (60)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="open client connections at most; at the cap an idle or slow one makes "
        "room (default: from ulimit -n, at most 10000)",
    )


def _log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="warning",
        help="log lines at this level and above on stderr (warning); info adds the "
        "listening line and every state change (server ejected/returned, breaker, Redis)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line (time, level, logger, message, extras)",
    )


def _chain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retry", metavar="EXPR", help="Buffer retry predicate")
    p.add_argument(
        "--retry-budget",
        type=_percent,
        metavar="PERCENT",
        help="retries and hedges at most this %% of requests (10 s window; needs --retry or "
        "--hedge)",
    )
    p.add_argument(
        "--hedge",
        type=_hedge_delay,
        metavar="SECONDS|pNN",
        help="send a GET/HEAD/OPTIONS without body again to another upstream when no response "
        "head came in this time, or in this quantile of the last minute's head latencies "
        "(e.g. p95; 1 s until 100 are known); the first head wins",
    )
    p.add_argument(
        "--mirror",
        metavar="URL",
        help="send a copy of every request to this upstream, answer discarded",
    )
    p.add_argument(
        "--mirror-compare",
        action="store_true",
        help="log each copy whose status, body length or body SHA-256 differs from the "
        "client's answer (needs --mirror)",
    )
    p.add_argument("--breaker", metavar="EXPR", help="CircuitBreaker trigger predicate")
    p.add_argument(
        "--breaker-duration",
        type=_duration,
        metavar="SECONDS",
        help="seconds the breaker stays open and ramps back (default 10)",
    )
    p.add_argument(
        "--rate",
        action="append",
        type=argtype(parse_rate, "RATE"),
        metavar="N/UNIT[:BURST]",
        help="rate limit per client ip, e.g. 100/s:200, 600/m, 1000/h (repeatable)",
    )
    p.add_argument(
        "--conn-limit", type=_positive_int, metavar="N", help="requests in flight per client ip"
    )
    p.add_argument("--trace", action="store_true", help="JSON lines to stderr, one per request")
    p.add_argument(
        "--request-id", action="store_true", help="keep or mint X-Request-Id (shown by --trace)"
    )
    p.add_argument("--sticky", metavar="COOKIE_NAME", help="sticky sessions with this cookie")
    p.add_argument(
        "--sticky-secret",
        metavar="SECRET",
        help="HMAC key of sticky cookies (default: $OXYPY_STICKY_SECRET, else random)",
    )
    p.add_argument("--health-check", metavar="PATH", help="active health check path, e.g. /healthz")
    p.add_argument(
        "--health-interval",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="seconds between health check rounds (10)",
    )
    p.add_argument(
        "--eject-after",
        type=_positive_int,
        metavar="N",
        help="eject an upstream for 30 s (longer if it fails again) after N network errors "
        "or timeouts in a row (passive outlier detection)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="CIDR",
        help="believe X-Forwarded-* from these peers (repeatable)",
    )
    p.add_argument(
        "--least-request", action="store_true", help="balance by requests in flight (P2C)"
    )
    p.add_argument(
        "--timeout", type=_positive, metavar="SECONDS", help="upstream read timeout (default 60)"
    )
    p.add_argument(
        "--deadline",
        type=_positive,
        metavar="SECONDS",
        help="one deadline for each request through the whole chain (every try, retry and "
        "backoff): 504 before the response head, connection aborted after it",
    )
    p.add_argument(
        "--per-try-timeout",
        type=_positive,
        metavar="SECONDS",
        help="with --retry: bound each attempt up to its response head (a timed-out attempt "
        "is a network error for the retry predicate)",
    )
    p.add_argument(
        "--response-header-timeout",
        type=_positive,
        metavar="SECONDS",
        help="seconds from the request sent to the upstream's response head (504 over it)",
    )
    p.add_argument(
        "--pass-host-header",
        action="store_true",
        help="send the client's Host upstream instead of the upstream's own: needed by apps "
        "that build URLs or check origins from Host, e.g. Django's CSRF check, which "
        "refuses a POST whose Origin does not match the Host it sees (docs/apps.md)",
    )
    p.add_argument(
        "--ca-certs",
        metavar="FILE",
        help="verify https upstreams against these PEM CA certificates (a private CA)",
    )
    p.add_argument(
        "--client-cert", metavar="FILE", help="PEM client certificate for https upstreams (mTLS)"
    )
    p.add_argument("--client-key", metavar="FILE", help="the PEM private key of --client-cert")
    p.add_argument(
        "--server-name",
        metavar="NAME",
        help="TLS name (SNI and verification) of https upstreams, when the URL has an address",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify https upstreams' certificates (testing only)",
    )
    p.add_argument(
        "--otel",
        action="store_true",
        help="trace requests with OpenTelemetry, exported over OTLP/HTTP as the OTEL_* "
        "environment variables say (needs opentelemetry-sdk and "
        "opentelemetry-exporter-otlp-proto-http)",
    )
    p.add_argument(
        "--metrics",
        metavar="PATH",
        help="serve Prometheus metrics at this path on the same listener, e.g. /metrics "
        "(needs prometheus_client)",
    )
    p.add_argument(
        "--status-page",
        metavar="PATH",
        help="serve a live status page (balancers, breakers, limits) at this path on the same "
        "listener, e.g. /status; off by default; behind --ip-allow like everything else: "
        "give --ip-allow when the listener is reachable by others",
    )
    p.add_argument(
        "--ip-allow",
        action="append",
        metavar="CIDR",
        help="answer 403 to clients outside these networks (repeatable; client ip as "
        "--trusted-proxy allows)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="answer CORS preflights and label responses for this origin, or * (repeatable)",
    )
    p.add_argument(
        "--compress", action="store_true", help="compress responses (zstd, br, gzip as installed)"
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def _hedge_delay(text: str) -> float | str:
    if text.strip().startswith("p"):
        return text  # a quantile: Hedge checks it
    return _positive(text)


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100, got {text!r}")
    return value


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _timer(text: str) -> float:
    value = _positive(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


def _patch() -> None:
    """Monkey-patch with gevent unless the entry point did (it always does first)."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def load_app(target: str) -> Any:
    """``module:attr`` (``module`` alone means ``module:app``); ``module:factory()`` calls it."""
    module_name, _, attr = target.partition(":")
    attr = attr or "app"
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    names_ok = all(part.isidentifier() for part in module_name.split("."))
    if not names_ok or not all(part.isidentifier() for part in attr.split(".")):
        raise FlagError("APP", f"expected module:attribute or module:factory(), got {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlagError("APP", f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FlagError("APP", f"module {module_name!r} has no attribute {attr!r}") from None
    if call:
        if not callable(obj):
            raise FlagError("APP", f"{module_name}:{attr} is not callable")
        try:
            inspect.signature(obj).bind()
        except TypeError as exc:
            raise FlagError("APP", f"{module_name}:{attr}() cannot be called: {exc}") from None
        except ValueError:
            pass  # no signature to check (some builtins): call it and see
        obj = obj()
    if not callable(obj):
        raise FlagError("APP", f"{target!r} is not a WSGI application (not callable)")
    return obj


def _serve(app: Any, args: argparse.Namespace, banner: str) -> None:
    from .server import Server

    server = Server(app, args.listen, **server_options(args)).start()
    print(f"oxypy: {banner} on {server.url} (Ctrl-C to stop)", flush=True)
    server.serve_forever()
    print("oxypy: stopped", flush=True)


def _show_warnings(args: argparse.Namespace | None = None) -> None:
    """Give the ``oxypy`` logger a stderr handler (``--log-level``/``--log-format``)
    unless logging is configured."""
    from ._cli.logs import configure

    configure(getattr(args, "log_level", "warning"), getattr(args, "log_format", "text"))


#: An option's value may start with "-" (``--rate -5/s``): argparse would take
#: it for an option and say only "expected one argument".
_NEGATIVE = re.compile(r"^-[0-9.]")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``["--rate", "-5/s"]`` -> ``["--rate=-5/s"]``, so the flag's own check names
    what is wrong with the value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if token.startswith("--") and "=" not in token and _NEGATIVE.match(nxt):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``oxypy`` command; returns the exit status (2 for usage errors)."""
    _patch()
    if argv is None:
        argv = sys.argv[1:]
    parser, subparsers = _make_parsers()
    args = parser.parse_args(_join_negative_values(list(argv)))
    try:
        if args.command == "proxy":
            from ._cli.chain import build_proxy

            _show_warnings(args)
            proxy = build_proxy(args)
            try:
                _serve(proxy.app, args, f"proxying to {', '.join(args.upstreams)}")
            finally:
                proxy.close()
        elif args.command == "serve":
            app = load_app(args.target)
            _show_warnings(args)  # after the app's import, which may configure logging itself
            provider = None
            served = app
            if args.otel:
                from ._cli.chain import otel_provider
                from .otel import OpenTelemetry

                # Global: OpenTelemetry blocks inside the app take their tracer from it.
                provider = otel_provider("--otel", make_global=True)
                served = OpenTelemetry(app)
            try:
                _serve(served, args, f"serving {args.target}")
            finally:
                close = getattr(app, "close", None)
                if callable(close):
                    close()  # flush a Trace queue, stop health checks
                if provider is not None:
                    provider.shutdown()
        elif args.command in ("check", "run"):
            return _config_command(args)
        elif args.command == "servers":
            from ._cli.servers import run_servers

            _show_warnings(None)
            return run_servers(args)
        else:
            from ._cli.demo import run_demo

            _show_warnings(args)
            run_demo(args)
    except FlagError as exc:
        subparsers[args.command].error(str(exc))  # exits with status 2
    except ConfigurationError as exc:  # a value no flag check caught: still no traceback
        subparsers[args.command].error(str(exc))
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0
