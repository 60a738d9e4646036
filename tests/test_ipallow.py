"""IPAllowList: the address table in-process, then real clients through a real proxy."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import urllib3

from oxypy import ConfigurationError, Forward, IPAllowList
from oxypy.extractors import make_extractor

HTTP = urllib3.PoolManager(retries=False, timeout=10)
NETS = ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::ffff:172.16.0.0/108"]


def noop(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        pytest.param("10.1.2.3", True, id="v4-in"),
        pytest.param("11.0.0.1", False, id="v4-out"),
        pytest.param("192.168.1.7", True, id="single-address"),
        pytest.param("192.168.1.8", False, id="single-address-neighbour"),
        pytest.param("2001:db8::1", True, id="v6-in"),
        pytest.param("[2001:db8::1]", True, id="v6-bracketed"),
        pytest.param("2001:db9::1", False, id="v6-out"),
        pytest.param("::ffff:10.9.9.9", True, id="v4-mapped-client-folded"),
        pytest.param("172.16.5.5", True, id="v4-mapped-cidr-folded"),
        pytest.param("172.32.0.1", False, id="v4-mapped-cidr-bounds"),
        pytest.param("fe80::1%eth0", False, id="zone-out"),
        pytest.param("not-an-ip", False, id="garbage"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="none"),
    ],
)
def test_address_table(address: str | None, allowed: bool) -> None:
    block = IPAllowList(noop, NETS)
    assert block.allows(address) is allowed
    assert block.allows(address) is allowed  # the cached verdict agrees


@pytest.mark.parametrize(
    ("cidrs", "message"),
    [
        pytest.param(["10.0.0.0/33"], "cidrs: invalid CIDR '10.0.0.0/33'", id="prefix"),
        pytest.param(["10.0.0.0/8", "banana"], "cidrs: invalid CIDR 'banana'", id="word"),
        pytest.param("10.0.0.0/8", "cidrs must be a list", id="string"),
        pytest.param([], "at least one network", id="empty"),
        pytest.param([10], "invalid CIDR 10", id="int"),
    ],
)
def test_bad_cidrs_are_named(cidrs: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        IPAllowList(noop, cidrs)
    assert message in str(info.value)


def test_bad_trusted_proxy_is_named() -> None:
    with pytest.raises(ConfigurationError) as info:
        IPAllowList(noop, ["10.0.0.0/8"], trusted_proxies=["nope"])
    assert "trusted_proxies: invalid CIDR 'nope'" in str(info.value)


class Counting:
    """An upstream app that counts the requests that reach it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        self.count += 1
        body = json.dumps({"xff": environ.get("HTTP_X_FORWARDED_FOR")}).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]


def test_peer_inside_passes_outside_gets_403(proxy: Any, pywsgi: Any) -> None:
    upstream = Counting()
    up = pywsgi(upstream)
    allowed = proxy(IPAllowList(Forward(up), ["127.0.0.0/8"]))
    denied = proxy(IPAllowList(Forward(up), ["10.0.0.0/8", "::1"]))
    ok = HTTP.request("GET", allowed + "/")
    assert ok.status == 200
    assert upstream.count == 1
    no = HTTP.request("GET", denied + "/")
    assert no.status == 403
    assert no.data == b"client address not allowed\n"
    assert no.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert upstream.count == 1  # the upstream never saw the refused request


def test_forwarded_for_believed_only_from_trusted_peer(proxy: Any, pywsgi: Any) -> None:
    upstream = Counting()
    up = pywsgi(upstream)
    trusted = proxy(IPAllowList(Forward(up), NETS, trusted_proxies=["127.0.0.1"]))
    untrusted = proxy(IPAllowList(Forward(up), NETS))
    cases = [
        ("10.1.2.3", 200),
        ("2001:db8::42", 200),
        ("::ffff:172.16.0.9", 200),
        ("8.8.8.8", 403),
        ("10.1.2.3, 8.8.8.8", 403),  # the rightmost untrusted hop is the client
        ("8.8.8.8, 10.1.2.3", 200),
    ]
    for xff, status in cases:
        resp = HTTP.request("GET", trusted + "/", headers={"X-Forwarded-For": xff})
        assert resp.status == status, xff
    before = upstream.count
    # From an untrusted peer a forged X-Forwarded-For is not believed.
    forged = HTTP.request("GET", untrusted + "/", headers={"X-Forwarded-For": "10.1.2.3"})
    assert forged.status == 403
    assert upstream.count == before


def test_client_address_matches_the_client_ip_extractor() -> None:
    trusted = ["127.0.0.1", "10.0.0.0/8"]
    extract = make_extractor("client.ip", trusted_proxies=trusted)
    block = IPAllowList(noop, ["203.0.113.0/24"], trusted_proxies=trusted)
    for peer, xff in [
        ("127.0.0.1", "203.0.113.5, 10.0.0.2"),
        ("127.0.0.1", "203.0.113.5"),
        ("127.0.0.1", None),
        ("203.0.113.9", None),
        ("::ffff:203.0.113.9", None),
        ("127.0.0.1", "198.51.100.1, 203.0.113.5"),
        ("10.0.0.1", None),
        ("192.0.2.1", "203.0.113.5"),
    ]:
        environ: dict[str, Any] = {"REMOTE_ADDR": peer}
        if xff:
            environ["HTTP_X_FORWARDED_FOR"] = xff
        assert block.client_ip(environ) == extract(environ)
        expected = block.allows(extract(environ))
        assert block._allowed(environ) is expected
        assert block._allowed(environ) is expected  # cached


def test_skip_bypasses_the_check(proxy: Any, pywsgi: Any) -> None:
    upstream = Counting()
    app = IPAllowList(
        Forward(pywsgi(upstream)), ["10.0.0.0/8"], skip=lambda e: e["PATH_INFO"] == "/health"
    )
    url = proxy(app)
    assert HTTP.request("GET", url + "/health").status == 200
    assert HTTP.request("GET", url + "/other").status == 403
    assert upstream.count == 1
