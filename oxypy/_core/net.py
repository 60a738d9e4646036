"""Addresses: listen addresses, and the trust rule for forwarding headers.

Incoming ``X-Forwarded-*``, ``X-Real-Ip`` and ``Forwarded`` values are
believed only when the connection's peer is inside ``trusted_proxies``; the
client address is then found nginx-style (``real_ip_recursive``): walk
``X-Forwarded-For`` from the right while the hop is trusted.  Addresses are
parsed with :mod:`ipaddress`, never by splitting strings on ``":"``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from ..exceptions import ConfigurationError

__all__ = ["TrustedProxies", "normalize_ip", "parse_listen"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)
def parse_ip(value: str) -> IPAddress | None:
    """Parse ``value`` as an address: brackets, zone and an IPv4 port are dropped."""
    text = value.strip()
    if not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # "1.2.3.4:5678"
        text = text.split(":", 1)[0]
    zone = text.find("%")
    if zone >= 0:
        text = text[:zone]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@lru_cache(maxsize=4096)
def normalize_ip(value: str | None) -> str | None:
    """The canonical text of an address, or None when ``value`` is not one."""
    if value is None:
        return None
    addr = parse_ip(value)
    return None if addr is None else str(addr)


class TrustedProxies:
    """A set of CIDRs whose forwarding headers are believed.

    :param cidrs: networks such as ``"10.0.0.0/8"`` or single addresses.
    """

    __slots__ = ("networks",)

    def __init__(self, cidrs: Iterable[str] | None = None) -> None:
        networks: list[IPNetwork] = []
        if isinstance(cidrs, str):
            raise ConfigurationError("trusted_proxies must be a list of CIDRs, not a string")
        for cidr in cidrs or ():
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError as exc:
                raise ConfigurationError(f"trusted_proxies: invalid CIDR {cidr!r}") from exc
        self.networks: tuple[IPNetwork, ...] = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, addr: str | IPAddress | None) -> bool:
        """True when ``addr`` lies in one of the trusted networks."""
        if not self.networks or addr is None:
            return False
        ip = parse_ip(addr) if isinstance(addr, str) else addr
        if ip is None:
            return False
        return any(ip in net for net in self.networks)

    def client_ip(self, peer: str | None, forwarded_for: str | None, depth: int = 0) -> str | None:
        """The client address behind ``peer`` under the trust rule.

        When ``peer`` is trusted, ``forwarded_for`` is walked from the right and
        the first untrusted (or, with ``depth`` > 0, the ``depth``-th) hop is
        the client.  An unparsable hop stops the walk at the last good one.
        """
        if not peer:
            return None
        if not forwarded_for or not self.networks:
            return normalize_ip(peer)  # cached: the common case costs a lookup
        peer_ip = parse_ip(peer)
        if peer_ip is None:
            return None
        if not self.trusts(peer_ip):
            return str(peer_ip)
        client = peer_ip
        hops = [h for h in forwarded_for.split(",") if h.strip()]
        for count, hop in enumerate(reversed(hops), start=1):
            ip = parse_ip(hop)
            if ip is None:
                break
            client = ip
            if depth and count >= depth:
                break
            if not self.trusts(ip):
                break
        return str(client)


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[::1]:port"`` -> ``(host, port)``; port 0 picks a free one.

    An empty host (``":8080"``) means every IPv4 address.  Raises
    :class:`ConfigurationError` (a ``ValueError``) naming what is wrong.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(
            f"listen address must be HOST:PORT such as 127.0.0.1:8080, got {listen!r}"
        )
    if host.startswith("[") != host.endswith("]"):
        raise ConfigurationError(f"unbalanced brackets in listen address {listen!r}")
    if host.startswith("["):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)
