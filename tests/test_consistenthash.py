"""ConsistentHash: the same key reaches the same server, in every process."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import urllib3

from oxypy import ConsistentHash, Forward, OutlierDetection, load_config
from oxypy import environ as keys
from oxypy.exceptions import ConfigurationError

from _servers import RawUpstream

FOUR = [f"http://10.0.0.{i}:80" for i in range(1, 5)]
KEYS = [f"user-{i}" for i in range(10_000)]


def name_app(name: str) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = name.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


def nothing(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]


def mapping(lb: ConsistentHash, keys_: list[str] = KEYS) -> dict[str, str | None]:
    return {k: lb.server_for(k) for k in keys_}


@pytest.fixture
def http() -> Any:
    pool = urllib3.PoolManager(maxsize=8, retries=False, timeout=10)
    yield pool
    pool.clear()


def test_same_key_same_server_over_http(pywsgi: Any, proxy: Any, http: Any) -> None:
    names = {pywsgi(name_app(n)): n for n in "abcd"}
    lb = ConsistentHash(Forward(), list(names), trusted_proxies=["127.0.0.1/32"])
    url = proxy(lb)
    seen: dict[str, str] = {}
    for i in range(1000):
        ip = f"198.51.{i // 250}.{i % 250}"
        got = http.request("GET", url + "/", headers={"X-Forwarded-For": ip}).data.decode()
        seen[ip] = got
        assert got == names[lb.server_for(ip) or ""]
    # every server got a share, and asking again gives the same answers
    assert set(collections.Counter(seen.values())) == set("abcd")
    assert min(collections.Counter(seen.values()).values()) > 150
    for ip in list(seen)[:100]:
        assert (
            http.request("GET", url + "/", headers={"X-Forwarded-For": ip}).data.decode()
            == (seen[ip])
        )


def test_header_and_cookie_keys_over_http(pywsgi: Any, proxy: Any, http: Any) -> None:
    names = {pywsgi(name_app(n)): n for n in "abc"}
    for key, header in (
        ("request.header.X-Tenant", lambda v: {"X-Tenant": v}),
        ("request.cookie.sid", lambda v: {"Cookie": f"theme=dark; sid={v}; x=1"}),
    ):
        lb = ConsistentHash(Forward(), list(names), key=key)
        url = proxy(lb)
        for i in range(60):
            value = f"t{i}"
            got = http.request("GET", url + "/", headers=header(value)).data.decode()
            assert got == names[lb.server_for(value) or ""]


def test_two_instances_map_every_key_identically() -> None:
    one = ConsistentHash(nothing, FOUR)
    two = ConsistentHash(nothing, list(reversed(FOUR)))  # another process, other order
    assert mapping(one) == mapping(two)
    # identity, not spelling: the same server written differently
    three = ConsistentHash(nothing, [u.replace("http://", "HTTP://") + "/" for u in FOUR])
    assert [(three.server_for(k) or "").rstrip("/") for k in KEYS[:500]] == [
        one.server_for(k) for k in KEYS[:500]
    ]


def test_removing_a_server_moves_exactly_its_keys() -> None:
    lb = ConsistentHash(nothing, FOUR)
    before = mapping(lb)
    lb.remove_server(FOUR[2])
    after = mapping(lb)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == FOUR[2]}
    assert 2000 < len(moved) < 3000
    assert FOUR[2] not in after.values()


def test_adding_a_fifth_server_moves_only_its_share_to_it() -> None:
    lb = ConsistentHash(nothing, FOUR)
    before = mapping(lb)
    lb.upsert_server("http://10.0.0.5:80")
    after = mapping(lb)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "http://10.0.0.5:80" for k in moved)
    assert 1500 <= len(moved) <= 2500  # 20% +- 5% of 10,000


def test_weights_are_honoured_proportionally() -> None:
    lb = ConsistentHash(nothing, [("http://10.0.0.1:80", 3), ("http://10.0.0.2:80", 1)])
    counts = collections.Counter(mapping(lb).values())
    assert 7200 <= counts["http://10.0.0.1:80"] <= 7800
    assert counts["http://10.0.0.1:80"] + counts["http://10.0.0.2:80"] == 10_000
    # weight 0: never picked; raising a weight moves keys only towards that server
    lb.upsert_server("http://10.0.0.3:80", 0)
    assert "http://10.0.0.3:80" not in mapping(lb, KEYS[:1000]).values()
    before = mapping(lb)
    lb.upsert_server("http://10.0.0.2:80", 2)
    after = mapping(lb)
    assert all(after[k] == "http://10.0.0.2:80" for k in KEYS if before[k] != after[k])


def _flaky(state: dict[str, bool]) -> Callable[[socket.socket, bytes], None]:
    def handler(sock: socket.socket, data: bytes) -> None:
        if state["broken"]:
            return  # closed without an answer: Forward's 502, a failure
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nd")

    return handler


def test_ejected_server_keys_go_elsewhere_and_come_back(pywsgi: Any, proxy: Any, http: Any) -> None:
    state = {"broken": False}
    flaky = RawUpstream(_flaky(state))
    try:
        names = {pywsgi(name_app(n)): n for n in "abc"}
        names[flaky.url] = "d"
        now = [1000.0]
        lb = ConsistentHash(
            Forward(),
            list(names),
            key="request.header.K",
            outlier_detection=OutlierDetection(consecutive_errors=1, base_ejection_time=30),
            clock=lambda: now[0],
        )
        url = proxy(lb)
        on_d = [k for k in KEYS[:400] if lb.server_for(k) == flaky.url][:20]
        others = [k for k in KEYS[:400] if lb.server_for(k) != flaky.url][:20]
        assert len(on_d) == 20

        def get(k: str) -> tuple[int, str]:
            resp = http.request("GET", url + "/", headers={"K": k})
            return resp.status, resp.data.decode()

        before = {k: get(k) for k in others}
        assert [get(k) for k in on_d] == [(200, "d")] * 20
        state["broken"] = True
        assert get(on_d[0])[0] == 502  # the failure that ejects it
        moved = {k: get(k) for k in on_d}
        assert all(status == 200 and body in "abc" for status, body in moved.values())
        assert {k: get(k) for k in on_d} == moved  # elsewhere, consistently
        assert {k: get(k) for k in others} == before  # nobody else moved
        state["broken"] = False
        now[0] += 31  # the ejection ends
        assert [get(k) for k in on_d] == [(200, "d")] * 20
    finally:
        flaky.stop()


def test_no_key_is_still_served_round_robin(pywsgi: Any, proxy: Any, http: Any) -> None:
    names = {pywsgi(name_app(n)): n for n in "ab"}
    url = proxy(ConsistentHash(Forward(), list(names), key="request.header.X-Tenant"))
    got = [http.request("GET", url + "/") for _ in range(4)]
    assert [r.status for r in got] == [200] * 4
    assert [r.data.decode() for r in got] == ["a", "b", "a", "b"]
    empty = http.request("GET", url + "/", headers={"X-Tenant": ""})
    assert (empty.status, empty.data) == (200, b"a")


def test_retry_avoids_tried_servers_in_hash_order() -> None:
    seen: list[str] = []

    def target(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.append(environ[keys.TARGET])
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
        return lambda data: None

    lb = ConsistentHash(target, FOUR, key="request.header.K")
    first = lb.server_for("k1")
    tried: set[str] = set()
    for _ in range(4):
        env = {"REQUEST_METHOD": "GET", "HTTP_K": "k1", keys.TRIED_TARGETS: tried}
        list(lb(env, start_response))
    assert seen[0] == first
    assert sorted(seen) == sorted(FOUR)  # each retry a new server, all of them once
    survivor = ConsistentHash(nothing, [u for u in FOUR if u != first])
    assert seen[1] == survivor.server_for("k1")  # the next-best server of the key


def test_cross_process_picks_match() -> None:
    keys_ = KEYS[:100]
    code = (
        "import json, sys\n"
        "from oxypy import ConsistentHash\n"
        "lb = ConsistentHash(lambda e, s: [], json.loads(sys.argv[1]))\n"
        "print(json.dumps([lb.server_for(k) for k in json.loads(sys.argv[2])]))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="random")
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(FOUR), json.dumps(keys_)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    lb = ConsistentHash(nothing, FOUR)
    assert json.loads(out.stdout) == [lb.server_for(k) for k in keys_]
    assert len(set(json.loads(out.stdout))) == 4


def test_config_file_builds_it(tmp_path: Any) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[[listeners]]\naddress = "127.0.0.1:0"\n'
        '[services.s]\nbalancer = "ConsistentHash"\nkey = "request.cookie.sid"\n'
        'servers = ["http://10.0.0.1:80", {url = "http://10.0.0.2:80", weight = 3}]\n'
        '[[routes]]\nprefix = "/"\nservice = "s"\n'
    )
    gateway = load_config(str(path))
    try:
        found = [o for o in gateway._current.owned if isinstance(o, ConsistentHash)]
        assert len(found) == 1
        assert found[0].key == "request.cookie.sid"
        assert found[0].server_weight("http://10.0.0.2:80") == 3
    finally:
        gateway.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": "request.cookie."}, "invalid cookie name"),
        ({"key": "request.cookie.a b"}, "invalid cookie name"),
        ({"key": "client.port"}, "unsupported source"),
        ({"key": 3}, "source must be a string or a callable"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ConsistentHash(nothing, FOUR, **kwargs)
