"""IPAllowList: answer 403 to clients outside a set of networks.

The client address is the one the ``client.ip`` source extractor reads:
the connection's peer, or, when the peer is one of ``trusted_proxies``, the
first untrusted hop of ``X-Forwarded-For`` walked from the right (the same
rule as ``Forward``, ``RateLimit`` and ``ConnLimit``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ._core.net import IPNetwork, TrustedProxies, parse_ip
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .errors import ErrorHandler, default_error_handler, respond_error
from .exceptions import ConfigurationError, RequestError
from .extractors import Source

__all__ = ["AddressForbidden", "IPAllowList"]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_CACHE_MAX = 4096


class AddressForbidden(RequestError):
    """The client address is outside every allowed network (403)."""

    status = 403
    reason = "client address not allowed"


def parse_cidrs(cidrs: Iterable[str], option: str = "cidrs") -> tuple[IPNetwork, ...]:
    """Parse CIDRs (or single addresses); raise :class:`ConfigurationError` naming a bad one.

    IPv4-mapped IPv6 networks (``::ffff:10.0.0.0/104``) are folded to IPv4,
    as client addresses are.
    """
    if isinstance(cidrs, str) or not isinstance(cidrs, Iterable):
        raise ConfigurationError(f"{option} must be a list of CIDRs, not {type(cidrs).__name__}")
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        if not isinstance(cidr, str):
            raise ConfigurationError(f"{option}: invalid CIDR {cidr!r}")
        try:
            net: IPNetwork = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as exc:
            raise ConfigurationError(f"{option}: invalid CIDR {cidr!r}") from exc
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
            mapped = net.network_address.ipv4_mapped
            if mapped is not None:
                net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
        networks.append(net)
    if not networks:
        raise ConfigurationError(f"{option} must name at least one network")
    return tuple(networks)


class IPAllowList:
    """Let through only clients whose address lies in one of ``cidrs``; 403 the rest.

    **Reads** ``REMOTE_ADDR`` and, only when that peer is in
    ``trusted_proxies``, ``X-Forwarded-For`` (walked from the right past
    trusted hops, exactly as the ``client.ip`` source extractor does).
    IPv4 and IPv6 are both accepted; an IPv4-mapped IPv6 address
    (``::ffff:10.1.2.3``) is matched as its IPv4 address.  **Writes**
    ``oxypy.error`` when it refuses.  Never touches bodies.

    Failures: a client outside every network, or with no parsable address
    (a UNIX-socket peer), gets 403 with a short plain-text body through
    ``error_handler``; the next app never sees the request.

    :param cidrs: networks such as ``"10.0.0.0/8"``, ``"2001:db8::/32"`` or
        single addresses (positional); an invalid one raises
        :class:`~oxypy.ConfigurationError` naming it.
    :param trusted_proxies: CIDRs of the proxies in front whose
        ``X-Forwarded-For`` is believed (default: none, the peer is the client).
    :param error_handler: ``(environ, start_response, exc)`` answering the 403.
    :param skip: ``skip(environ) -> bool``; True passes the request unchecked.

    Example::

        from oxypy import Forward, IPAllowList
        app = IPAllowList(
            Forward("http://127.0.0.1:9000"), ["10.0.0.0/8", "192.168.0.0/16", "::1"],
            trusted_proxies=["127.0.0.1"],
        )

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        cidrs: Iterable[str],
        /,
        *,
        trusted_proxies: Iterable[str] | None = None,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
    ) -> None:
        if skip is not None and not callable(skip):
            raise ConfigurationError("skip must be a callable (environ) -> bool")
        self.next_app = next_app
        self.networks = parse_cidrs(cidrs)
        self.trusted = TrustedProxies(trusted_proxies)
        #: The ``client.ip`` source extractor under the same trust rule.
        self.client_ip = Source("client.ip", trusted_proxies=self.trusted).extract
        self.error_handler = error_handler
        self.skip = skip
        # Address text -> verdict.  A bounded cache shared by requests: plain dict
        # reads and writes are atomic, and a lost race only recomputes a verdict.
        self._verdicts: dict[str, bool] = {}

    def allows(self, address: str | None) -> bool:
        """True when ``address`` (text) lies in one of the allowed networks."""
        if address is None:
            return False
        verdict = self._verdicts.get(address)
        if verdict is None:
            ip = parse_ip(address)
            verdict = ip is not None and any(ip in net for net in self.networks)
            if len(self._verdicts) >= _CACHE_MAX:
                self._verdicts.clear()
            self._verdicts[address] = verdict
        return verdict

    def _allowed(self, environ: WSGIEnvironment) -> bool:
        peer = environ.get("REMOTE_ADDR")
        forwarded = environ.get("HTTP_X_FORWARDED_FOR") if self.trusted else None
        if not forwarded:
            # The extractor would answer the peer itself: skip its parse and str().
            return self.allows(peer)
        key = f"{peer}\x00{forwarded}"
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self.allows(self.client_ip(environ))
            self._verdicts[key] = verdict
        return verdict

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        if self._allowed(environ):
            return self.next_app(environ, start_response)
        return respond_error(self.error_handler, environ, start_response, AddressForbidden())
