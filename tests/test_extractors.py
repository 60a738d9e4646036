"""Source extractors: address parsing, the trust rule, header sources, missing policies."""

from __future__ import annotations

from typing import Any

import pytest

from oxypy.exceptions import BadRequest, ConfigurationError
from oxypy.extractors import MISSING_KEY, Source, _make_extractor


def env(**kw: str) -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": "/", **kw}


@pytest.mark.parametrize(
    ("environ", "trusted", "depth", "expected"),
    [
        pytest.param(env(REMOTE_ADDR="10.1.2.3"), None, 0, "10.1.2.3", id="ipv4"),
        pytest.param(env(REMOTE_ADDR="::1"), None, 0, "::1", id="ipv6-loopback"),
        pytest.param(env(REMOTE_ADDR="2001:DB8::0:1"), None, 0, "2001:db8::1", id="ipv6-canonical"),
        pytest.param(env(REMOTE_ADDR="[2001:db8::1]"), None, 0, "2001:db8::1", id="ipv6-brackets"),
        pytest.param(env(REMOTE_ADDR="fe80::1%eth0"), None, 0, "fe80::1", id="ipv6-zone-stripped"),
        pytest.param(env(REMOTE_ADDR="::ffff:192.0.2.7"), None, 0, "192.0.2.7", id="v4-mapped"),
        pytest.param(
            env(REMOTE_ADDR="192.0.2.1", HTTP_X_FORWARDED_FOR="203.0.113.9"),
            None,
            0,
            "192.0.2.1",
            id="xff-ignored-without-trust",
        ),
        pytest.param(
            env(REMOTE_ADDR="192.0.2.1", HTTP_X_FORWARDED_FOR="203.0.113.9"),
            ["10.0.0.0/8"],
            0,
            "192.0.2.1",
            id="xff-ignored-untrusted-peer",
        ),
        pytest.param(
            env(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="203.0.113.9"),
            ["10.0.0.0/8"],
            0,
            "203.0.113.9",
            id="xff-trusted-peer",
        ),
        pytest.param(
            env(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.9, 10.0.0.7"),
            ["10.0.0.0/8"],
            0,
            "203.0.113.9",
            id="xff-walk-stops-at-first-untrusted",
        ),
        pytest.param(
            env(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.9, 10.0.0.7"),
            ["0.0.0.0/0"],
            2,
            "203.0.113.9",
            id="xff-depth-2",
        ),
        pytest.param(
            env(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="2001:db8::5"),
            ["10.0.0.0/8"],
            0,
            "2001:db8::5",
            id="xff-ipv6-client",
        ),
        pytest.param(env(REMOTE_ADDR="not-an-ip"), None, 0, None, id="garbage-peer"),
        pytest.param(env(), None, 0, None, id="no-peer"),
    ],
)
def test_client_ip(
    environ: dict[str, Any], trusted: list[str] | None, depth: int, expected: str | None
) -> None:
    extract = _make_extractor("client.ip", trusted_proxies=trusted, depth=depth)
    assert extract(environ) == expected


def test_ipv6_clients_get_distinct_keys() -> None:
    """oxy put every IPv6 client in the bucket "["; here each address is its own key."""
    source = Source("client.ip")
    keys = {source.key(env(REMOTE_ADDR=a)) for a in ("::1", "2001:db8::1", "2001:db8::2")}
    assert keys == {"::1", "2001:db8::1", "2001:db8::2"}


@pytest.mark.parametrize(
    ("source", "environ", "expected"),
    [
        pytest.param(
            "request.host", env(HTTP_HOST="Example.COM:8080"), "example.com:8080", id="host"
        ),
        pytest.param("request.host", env(), None, id="host-missing"),
        pytest.param("request.header.X-Api-Key", env(HTTP_X_API_KEY=" k1 "), "k1", id="header"),
        pytest.param("request.header.x-api-key", env(HTTP_X_API_KEY="k1"), "k1", id="header-case"),
        pytest.param("request.header.Content-Type", env(CONTENT_TYPE="a/b"), "a/b", id="ctype"),
        pytest.param("request.header.X-Api-Key", env(), None, id="header-missing"),
        pytest.param("request.header.X-Api-Key", env(HTTP_X_API_KEY=""), "", id="header-empty"),
        pytest.param(lambda e: e.get("HTTP_X_T"), env(HTTP_X_T="t"), "t", id="callable"),
        pytest.param("request.cookie.sid", env(HTTP_COOKIE="a=1; sid=s2; b=3"), "s2", id="cookie"),
        pytest.param("request.cookie.sid", env(HTTP_COOKIE='sid="q v"'), "q v", id="cookie-quoted"),
        pytest.param("request.cookie.sid", env(HTTP_COOKIE="sid=1;sid=2"), "1", id="cookie-first"),
        pytest.param(
            "request.cookie.sid", env(HTTP_COOKIE="SID=1; xsid=2"), None, id="cookie-case"
        ),
        pytest.param("request.cookie.sid", env(HTTP_COOKIE="sid; a=1"), None, id="cookie-no-eq"),
        pytest.param("request.cookie.sid", env(), None, id="cookie-missing"),
        pytest.param("request.cookie.sid", env(HTTP_COOKIE="sid="), "", id="cookie-empty"),
    ],
)
def test_other_sources(source: Any, environ: dict[str, Any], expected: str | None) -> None:
    assert _make_extractor(source)(environ) == expected


@pytest.mark.parametrize(
    ("missing", "environ", "expected"),
    [
        pytest.param("shared", env(), MISSING_KEY, id="shared-absent"),
        pytest.param("shared", env(HTTP_X_KEY=""), MISSING_KEY, id="shared-empty"),
        pytest.param("skip", env(), None, id="skip"),
        pytest.param("shared", env(HTTP_X_KEY="a"), "a", id="present"),
    ],
)
def test_missing_policies(missing: Any, environ: dict[str, Any], expected: str | None) -> None:
    assert Source("request.header.X-Key", missing=missing).key(environ) == expected


@pytest.mark.parametrize("name", ["", " ", "a b", "a=b", "a;b", 'a"'])
def test_bad_cookie_source_names(name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid cookie name"):
        _make_extractor("request.cookie." + name)


def test_cookie_source_limits_a_ratelimit_per_cookie() -> None:
    source = Source("request.cookie.sid", missing="shared")
    assert source.key(env(HTTP_COOKIE="sid=u1")) == "u1"
    assert source.key(env(HTTP_COOKIE="other=1")) == MISSING_KEY


def test_missing_reject_is_400() -> None:
    with pytest.raises(BadRequest) as info:
        Source("request.header.X-Key").key(env())
    assert info.value.status == 400
    assert "request.header.X-Key" in info.value.reason


def test_shared_key_never_collides_with_a_value() -> None:
    source = Source("request.header.X-Key", missing="shared")
    assert source.key(env(HTTP_X_KEY="missing")) != source.key(env())


@pytest.mark.parametrize(
    ("kwargs"),
    [
        pytest.param({"source": "client.port"}, id="unknown"),
        pytest.param({"source": "request.header."}, id="empty-header"),
        pytest.param({"source": "request.header.X Key"}, id="space-in-header"),
        pytest.param({"source": "request.header.X_Key"}, id="underscore-header"),
        pytest.param({"source": 42}, id="not-a-string"),
        pytest.param({"source": "client.ip", "missing": "pool"}, id="bad-missing"),
        pytest.param({"source": "client.ip", "depth": -1}, id="bad-depth"),
        pytest.param({"source": "client.ip", "trusted_proxies": ["10.0.0.0/33"]}, id="bad-cidr"),
        pytest.param({"source": "client.ip", "trusted_proxies": "10.0.0.0/8"}, id="cidr-string"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Source(**kwargs)
