"""``oxypy servers list|add|remove|drain``: change a fleet's server set from a shell.

Each subcommand opens the named :class:`~oxypy.RedisRegistry`, reads or
writes it once and exits: 0 on success, 1 when Redis cannot be reached or
the server is not registered (one line on stderr naming it), 2 for bad flags
(argparse's usage line and a message naming the flag).  Every process whose
balancer follows the registry applies a change within about a second.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..exceptions import ConfigurationError, OxypyError
from .chain import FlagError

__all__ = ["add_servers_parser", "run_servers"]

_EPILOG = """\
examples:
  oxypy servers list   --redis redis://10.0.0.9:6379/0 --name api
  oxypy servers add    --redis redis://10.0.0.9:6379/0 --name api http://10.0.0.7:8000 --weight 2
  oxypy servers drain  --redis redis://10.0.0.9:6379/0 --name api http://10.0.0.5:8000
  oxypy servers remove --redis redis://10.0.0.9:6379/0 --name api http://10.0.0.5:8000

Every process whose balancer names the registry (gunicorn workers, other hosts)
applies a change within about a second.  drain stops new requests to a server
while requests in flight finish; add puts a drained server back in rotation.
Exit status: 0 done, 1 Redis unreachable or server not registered, 2 bad flags.
"""


def _weight(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def add_servers_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``servers`` subcommand and its four actions (each its own parser)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "servers",
        help="list or change the servers of a Redis registry (a fleet's shared server set)",
        description="List or change the server set that every balancer naming the registry "
        "follows (RedisRegistry; docs/fleet.md).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    helps = {
        "list": "the registered servers: URL, weight, state, health; and the prober",
        "add": "add a server, or change its weight; a drained server returns to rotation",
        "remove": "unregister a server (requests in flight finish)",
        "drain": "no new requests to a server; requests in flight finish",
    }
    for action, text in helps.items():
        a = actions.add_parser(
            action,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if action != "list":
            a.add_argument("url", metavar="URL", help="the server, e.g. http://10.0.0.7:8000")
        a.add_argument(
            "--redis",
            metavar="URL",
            required=True,
            help="the registry's Redis, e.g. redis://10.0.0.9:6379/0",
        )
        a.add_argument("--name", metavar="NAME", required=True, help="the registry's name")
        if action == "add":
            a.add_argument(
                "--weight",
                type=_weight,
                metavar="N",
                help="the server's weight (default 1 for a new server, unchanged for a known one)",
            )
    return p


def run_servers(args: argparse.Namespace) -> int:
    """Run one ``servers`` action; FlagError for bad flags (exit 2), else 0 or 1."""
    from .._balance.address import parse_server
    from ..registry import RedisRegistry

    url = getattr(args, "url", None)
    if url is not None:
        try:
            parse_server(url)
        except ConfigurationError as exc:
            raise FlagError("URL", str(exc)) from None
    try:
        registry = RedisRegistry(args.redis, args.name)
    except ConfigurationError as exc:
        message = str(exc)
        flag = "--name" if message.startswith("name ") else "--redis"
        raise FlagError(flag, message) from None
    try:
        if args.action == "list":
            return _list(registry)
        try:
            if args.action == "add":
                known = any(_same(s.url, args.url) for s in registry.fleet())
                changed = registry.upsert(args.url, args.weight, state="active")
                weight = next(
                    (s.weight for s in registry.fleet() if _same(s.url, args.url)), args.weight
                )
                verb = "updated" if known and changed else "unchanged" if known else "added"
                print(f"{verb} {args.url} (weight {weight}, active)", flush=True)
            elif args.action == "remove":
                registry.remove(args.url)
                print(f"removed {args.url}", flush=True)
            else:
                registry.drain(args.url)
                print(
                    f"draining {args.url}: no new requests; requests in flight finish",
                    flush=True,
                )
        except ConfigurationError as exc:  # the URL was checked: only "not found" is left
            print(f"oxypy servers: error: {exc} in registry {args.name!r}", file=sys.stderr)
            return 1
        return 0
    except OxypyError as exc:
        print(f"oxypy servers: error: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.close()


def _same(a: str, b: str) -> bool:
    from .._balance.address import parse_server

    return parse_server(a)[1] == parse_server(b)[1]


def _list(registry: Any) -> int:
    fleet = registry.fleet()
    prober = registry.prober()
    rows = [("URL", "WEIGHT", "STATE", "HEALTH")]
    for server in fleet:
        health = "-" if server.healthy is None else ("up" if server.healthy else "down")
        rows.append((server.url, str(server.weight), server.state, health))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for url, weight, state, health in rows:
        print(
            f"{url.ljust(widths[0])}  {weight.ljust(widths[1])}  {state.ljust(widths[2])}  {health}"
        )
    print(f"{len(fleet)} server(s); prober: {prober or 'none'}", flush=True)
    return 0
