"""StickySession: cookie rendering, opaque values, pinning, fallbacks, restarts."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import urllib3

from oxypy._balance.sticky import StickyCookies
from oxypy.exceptions import ConfigurationError
from oxypy.forward import Forward
from oxypy.roundrobin import RoundRobin
from oxypy.sticky import StickySession


def name_app(name: str) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = name.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


# -- tier 1 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "suffix"),
    [
        pytest.param({"http_only": False, "same_site": None}, "; Path=/", id="oxy-default"),
        pytest.param({}, "; Path=/; HttpOnly; SameSite=Lax", id="oxypy-default"),
        pytest.param({"same_site": None}, "; Path=/; HttpOnly", id="http-only"),
        pytest.param(
            {"secure": True, "same_site": None, "http_only": False}, "; Path=/; Secure", id="secure"
        ),
        pytest.param(
            {"path": "/foo", "same_site": None, "http_only": False}, "; Path=/foo", id="path"
        ),
        pytest.param(
            {"domain": "example.org", "same_site": None, "http_only": False},
            "; Path=/; Domain=example.org",
            id="domain",
        ),
        pytest.param(
            {"max_age": -20, "same_site": None, "http_only": False},
            "; Path=/; Max-Age=0",
            id="negative-max-age",
        ),
        pytest.param(
            {"max_age": 3600, "secure": True, "same_site": "none"},
            "; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=None",
            id="all",
        ),
        pytest.param(
            {"same_site": "strict", "path": None}, "; HttpOnly; SameSite=Strict", id="strict"
        ),
    ],
)
def test_set_cookie_rendering(options: dict[str, Any], suffix: str) -> None:
    cookies = StickyCookies(StickySession("test", value="raw", **options))
    assert cookies.render("http://a:1", "ignored") == "test=http://a:1" + suffix


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"cookie_name": "bad name"}, id="name-space"),
        pytest.param({"cookie_name": "a;b"}, id="name-semicolon"),
        pytest.param({"cookie_name": ""}, id="name-empty"),
        pytest.param({"cookie_name": "c", "same_site": "sometimes"}, id="same-site"),
        pytest.param({"cookie_name": "c", "value": "aes"}, id="value-kind"),
        pytest.param({"cookie_name": "c", "path": "/a;b"}, id="path"),
        pytest.param({"cookie_name": "c", "domain": "a b"}, id="domain"),
        pytest.param({"cookie_name": "c", "max_age": 1.5}, id="max-age"),
        pytest.param({"cookie_name": "c", "secret": b""}, id="empty-secret"),
        pytest.param({"cookie_name": "c", "secret": 42}, id="secret-type"),
    ],
)
def test_configuration_errors(options: dict[str, Any]) -> None:
    options = dict(options)  # the parameter is shared by repeated runs
    name = options.pop("cookie_name")
    with pytest.raises(ConfigurationError):
        StickySession(name, **options)


def test_hmac_value_is_opaque_stable_and_keyed() -> None:
    def value(sticky: StickySession) -> str:
        return StickyCookies(sticky).value_for("http://10.1.2.3:8080/")

    one = value(StickySession("s", secret="k1"))
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", one)
    assert "10.1.2.3" not in one and "8080" not in one
    assert value(StickySession("s", secret=b"k1")) == one
    assert value(StickySession("s", secret="k2")) != one
    assert value(StickySession("s")) != one  # random key
    anonymous = StickySession("s")
    assert value(anonymous) == value(anonymous)  # ... made once per instance


def test_a_plain_frozen_value() -> None:
    sticky = StickySession("s", secret="k", same_site="strict")
    assert (sticky.same_site, sticky.secret) == ("Strict", b"k")  # canonical forms
    assert sticky == StickySession("s", secret=b"k", same_site="Strict")
    assert StickySession("s") != StickySession("s")  # two random keys
    assert "secret" not in repr(sticky) and "k'" not in repr(sticky)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sticky.secure = True  # type: ignore[misc]
    with pytest.raises(ConfigurationError, match="same_site"):
        StickySession("s", same_site="sometimes")
    with pytest.raises(TypeError):
        StickySession("s", True)  # type: ignore[call-arg]  # options are keyword-only


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(None, None, id="no-cookie"),
        pytest.param("other=AAAAAAAAAAAAAAAAAAAAAA", None, id="other-name"),
        pytest.param("s=AAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAAAA", id="plain"),
        pytest.param('a=1; s="AAAAAAAAAAAAAAAAAAAAAA"; b=2', "AAAAAAAAAAAAAAAAAAAAAA", id="quoted"),
        pytest.param("s=http://127.0.0.1:1", None, id="raw-url-in-hmac-mode"),
        pytest.param("s=" + "A" * 23, None, id="too-long"),
        pytest.param("s=<script>", None, id="garbage"),
        pytest.param("ss=AAAAAAAAAAAAAAAAAAAAAA", None, id="name-prefix"),
    ],
)
def test_requested_hmac(header: str | None, expected: str | None) -> None:
    env = {} if header is None else {"HTTP_COOKIE": header}
    assert StickyCookies(StickySession("s")).requested(env) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("s=http://a:80", "http://a:80/", id="default-port"),
        pytest.param("s=http://user:pw@A/", "http://a:80/", id="userinfo-ignored"),
        pytest.param("s=ftp://a", None, id="bad-scheme"),
        pytest.param("s=%%%", None, id="garbage"),
    ],
)
def test_requested_raw(header: str, expected: str | None) -> None:
    cookies = StickyCookies(StickySession("s", value="raw"))
    assert cookies.requested({"HTTP_COOKIE": header}) == expected


# -- tier 2: real upstreams ----------------------------------------------------------


@pytest.fixture
def http() -> Any:
    pool = urllib3.PoolManager(retries=False, timeout=10)
    yield pool
    pool.clear()


def get(http: Any, url: str, cookie: str | None = None) -> tuple[bytes, str | None]:
    headers = {"Cookie": cookie} if cookie else {}
    resp = http.request("GET", url + "/", headers=headers)
    assert resp.status == 200
    return resp.data, resp.headers.get("Set-Cookie")


def cookie_of(set_cookie: str | None) -> str:
    assert set_cookie is not None
    return set_cookie.split(";", 1)[0]


def test_cookie_pins_and_survives_a_proxy_restart(pywsgi: Any, proxy: Any, http: Any) -> None:
    a, b = pywsgi(name_app("a")), pywsgi(name_app("b"))
    url = proxy(RoundRobin(Forward(), [a, b], sticky=StickySession("lb", secret="s3cret")))
    body, set_cookie = get(http, url)
    assert body == b"a"
    assert set_cookie is not None and set_cookie.endswith("; Path=/; HttpOnly; SameSite=Lax")
    cookie = cookie_of(set_cookie)
    port = a.rsplit(":", 1)[1]
    assert "127.0.0.1" not in cookie and port not in cookie  # the backend is not revealed
    for _ in range(10):
        assert get(http, url, cookie) == (b"a", None)
    # Without the cookie round robin goes on.
    assert get(http, url)[0] == b"b"

    # A new proxy (new RoundRobin, servers listed in another order) with the same secret.
    url2 = proxy(RoundRobin(Forward(), [b, a], sticky=StickySession("lb", secret="s3cret")))
    for _ in range(5):
        assert get(http, url2, cookie) == (b"a", None)
    # A different secret (or none) does not recognise it: normal pick and a new cookie.
    url3 = proxy(RoundRobin(Forward(), [b, a], sticky=StickySession("lb")))
    body, set_cookie = get(http, url3, cookie)
    assert body == b"b" and cookie_of(set_cookie) != cookie


def test_forged_cookie_is_ignored(pywsgi: Any, proxy: Any, http: Any) -> None:
    a, b = pywsgi(name_app("a")), pywsgi(name_app("b"))
    url = proxy(RoundRobin(Forward(), [a, b], sticky=StickySession("lb", secret="x")))
    for forged in ("lb=" + "A" * 22, "lb=" + b, "lb=%00garbage", 'lb="'):
        body, set_cookie = get(http, url, forged)
        assert body in (b"a", b"b")
        assert set_cookie is not None and cookie_of(set_cookie) != forged


def test_removed_server_falls_back_and_reissues(pywsgi: Any, proxy: Any, http: Any) -> None:
    a, b = pywsgi(name_app("a")), pywsgi(name_app("b"))
    rr = RoundRobin(Forward(), [a, b], sticky=StickySession("lb", secret="x"))
    url = proxy(rr)
    body, set_cookie = get(http, url)
    assert body == b"a"
    rr.remove_server(a)
    body, reissued = get(http, url, cookie_of(set_cookie))
    assert body == b"b"
    assert reissued is not None and cookie_of(reissued) != cookie_of(set_cookie)
    for _ in range(10):
        assert get(http, url, cookie_of(reissued)) == (b"b", None)
    rr.remove_server(b)
    resp = http.request("GET", url + "/", headers={"Cookie": cookie_of(reissued)})
    assert resp.status == 503 and resp.headers.get("Set-Cookie") is None


def test_raw_value_mode_matches_oxy(pywsgi: Any, proxy: Any, http: Any) -> None:
    a, b = pywsgi(name_app("a")), pywsgi(name_app("b"))
    url = proxy(
        RoundRobin(
            Forward(),
            [a, b],
            sticky=StickySession("test", value="raw", http_only=False, same_site=None),
        )
    )
    body, set_cookie = get(http, url)
    assert (body, set_cookie) == (b"a", f"test={a}; Path=/")
    for _ in range(10):
        assert get(http, url, f"test={b}") == (b"b", None)
