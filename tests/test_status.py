"""StatusPage: the JSON document, the page, the event stream, redaction, the command and the file.

Everything runs against real servers on 127.0.0.1: pywsgi upstreams, the
page served by oxypy's own server (so the event stream is checked as a
client sees it, chunk by chunk), the ``oxypy`` command as a subprocess.
The browser test is tests/test_status_browser.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from oxypy import (
    Buffer,
    CircuitBreaker,
    ConfigurationError,
    ConnLimit,
    Forward,
    Hedge,
    Rate,
    RateLimit,
    RedisRegistry,
    RedisStore,
    RetryBudget,
    RoundRobin,
    Router,
    StatusPage,
    StickySession,
    load_config,
)
from oxypy.cli import main

from _redis import REDIS_SERVER, RedisServer
from _servers import dead_url, echo_app, start_pywsgi, url_of, wait_for

REPO = Path(__file__).resolve().parent.parent
HTTP = urllib3.PoolManager(retries=False, timeout=10.0)


@pytest.fixture
def upstream() -> Iterator[str]:
    server = start_pywsgi(echo_app)
    try:
        yield url_of(server)
    finally:
        server.stop(timeout=1)


def get_json(url: str) -> dict[str, Any]:
    resp = HTTP.request("GET", url)
    assert resp.status == 200, resp.data
    assert resp.headers["Content-Type"] == "application/json"
    doc: dict[str, Any] = json.loads(resp.data)
    return doc


def blocks(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["kind"]: b for g in doc["groups"] for b in g["blocks"]}


def test_json_describes_every_block_of_the_chain(upstream: str, proxy: Any) -> None:
    dead = dead_url()
    budget = RetryBudget(percent=50.0)
    lb = RoundRobin(Forward(), [dead, upstream])
    chain = ConnLimit(
        RateLimit(
            CircuitBreaker(
                Buffer(lb, retry="IsNetworkError() && Attempts() < 3", retry_budget=budget),
                "NetworkErrorRatio() > 0.9 && 100 <= RequestThreshold()",
            ),
            rates=[Rate(100, 1.0, burst=150)],
        ),
        max_conns=7,
    )
    app = Router([(None, "/status", StatusPage(chain)), (None, "/", chain)])
    url = proxy(app)
    for _ in range(4):
        assert HTTP.request("GET", url + "/x").status == 200

    doc = get_json(url + "/status/status.json")
    assert doc["process"]["pid"] == os.getpid()
    assert doc["process"]["hostname"] == socket.gethostname()
    assert [g["name"] for g in doc["groups"]] == ["chain"]
    kinds = [b["kind"] for b in doc["groups"][0]["blocks"]]
    assert kinds == ["ConnLimit", "RateLimit", "CircuitBreaker", "RetryBudget", "RoundRobin"]
    found = blocks(doc)
    assert found["ConnLimit"] == {
        "kind": "ConnLimit",
        "max_conns": 7,
        "store": "MemoryConnStore",
        "in_flight": 0,
        "sources": 0,
        "busiest": 0,
        "rejected": 0,
    }
    assert found["RateLimit"] == {
        "kind": "RateLimit",
        "rates": ["100 per 1s, burst 150"],
        "store": "MemoryStore",
        "sources": 1,
        "limited": 0,
    }
    breaker = found["CircuitBreaker"]
    assert breaker["state"] == "standby" and breaker["state_for"] is None
    assert breaker["terms"] == [
        {"call": "NetworkErrorRatio()", "op": ">", "threshold": 0.9, "value": 0.0, "holds": False},
        {
            "call": "RequestThreshold()",
            "op": ">=",
            "threshold": 100.0,
            "value": 4.0,
            "holds": False,
        },
    ]
    assert found["RetryBudget"]["requests"] == 4
    servers = {s["url"]: s for s in found["RoundRobin"]["servers"]}
    # Round robin alternates: the dead server got two first attempts, each
    # retried on the live one.
    assert servers[dead]["requests"] == 2 and servers[dead]["error_ratio"] == 1.0
    assert servers[upstream]["requests"] == 4 and servers[upstream]["error_ratio"] == 0.0
    assert servers[upstream]["retries"] == 2 and servers[dead]["retries"] == 0
    assert found["RetryBudget"]["retries"] == 2
    for server in servers.values():
        assert server["state"] == "healthy" and server["in_flight"] == 0
        assert server["hedges"] == 0
        assert len(server["sparkline"]) == 60
        assert server["p99_ms"] >= server["p50_ms"] > 0
        assert server["rps"] == round(server["requests"] / 60, 2)
    same = get_json(url + "/status?format=json")
    assert same["layout"] == doc["layout"]


def test_hedges_and_in_flight_are_counted_per_server(pywsgi: Any, proxy: Any) -> None:
    import gevent.event

    release = gevent.event.Event()

    def slow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slow"]

    slow_url, fast_url = pywsgi(slow), pywsgi(echo_app)
    lb = RoundRobin(Forward(), [slow_url, fast_url])
    hedge = Hedge(lb, delay=0.05)
    page = StatusPage(hedge)
    url = proxy(Router([(None, "/status", page), (None, "/", hedge)]))
    busy = gevent.spawn(HTTP.request, "GET", url + "/held")  # holds the slow server
    wait_for(lambda: blocks(page.document())["RoundRobin"]["servers"][0]["in_flight"] == 1)
    wait_for(lambda: hedge.snapshot()["hedges"] == 1)
    assert busy.get(timeout=10).status == 200  # the hedge to the fast server won
    release.set()
    found = blocks(get_json(url + "/status/status.json"))
    servers = found["RoundRobin"]["servers"]
    wait_for(lambda: lb.snapshot()["servers"][0]["in_flight"] == 0)  # the loser cancelled
    assert servers[0]["hedges"] == 0 and servers[1]["hedges"] == 1
    assert found["Hedge"] == {
        "kind": "Hedge",
        "delay": 0.05,
        "max_hedges": 1,
        "hedges": 1,
        "hedge_wins": 1,
        "refused": 0,
    }


def test_balancer_keeps_no_stats_until_a_page_watches_it(upstream: str) -> None:
    lb = RoundRobin(Forward(), [upstream])
    row = lb.snapshot()["servers"][0]
    assert row["requests"] is None and row["sparkline"] == [] and row["in_flight"] is None
    StatusPage(watch=[lb])
    row = lb.snapshot()["servers"][0]
    assert row["requests"] == 0 and len(row["sparkline"]) == 60 and row["in_flight"] == 0
    lb.upsert_server("http://127.0.0.1:9", 0)
    added = lb.snapshot()["servers"][1]
    assert added["requests"] == 0 and added["state"] == "draining"


def test_secrets_are_never_shown(upstream: str, proxy: Any) -> None:
    sticky = StickySession("route", secret="sticky-secret-key-do-not-show")
    lb = RoundRobin(Forward(), [upstream], sticky=sticky)
    store = RedisStore("redis://:hunter2@127.0.0.1:1/0")
    limited = RateLimit(lb, rates=[Rate(10, 1.0)], store=store)
    page = StatusPage(limited)
    url = proxy(Router([(None, "/status", page), (None, "/", limited)]))
    sticky_value = lb.pool.find(upstream).sticky_value  # type: ignore[union-attr]
    assert sticky_value
    for path in ("/status", "/status/status.json", "/status/?format=json"):
        body = HTTP.request("GET", url + path).data
        assert b"hunter2" not in body and b"sticky-secret" not in body
        assert sticky_value.encode() not in body
    found = blocks(get_json(url + "/status/status.json"))
    assert found["RateLimit"]["store"] == "RedisStore(redis://***@127.0.0.1:1/0)"
    assert found["RoundRobin"]["sticky"] is True
    store.close()


def test_page_is_server_rendered_escaped_and_locked_down(upstream: str, proxy: Any) -> None:
    lb = RoundRobin(Forward(), [upstream])
    breaker = CircuitBreaker(lb, "LatencyAtQuantileMS(50.0) > 100 && RequestThreshold() > 2")
    page = StatusPage(breaker, title="<edge> & co")
    url = proxy(Router([(None, "/ops/status", page)]))
    resp = HTTP.request("GET", url + "/ops/status")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    html = resp.data.decode()
    assert "<title>&lt;edge&gt; &amp; co</title>" in html
    assert "LatencyAtQuantileMS(50.0) &gt; 100 &amp;&amp; RequestThreshold() &gt; 2" in html
    assert f'<tr data-url="{upstream}">' in html
    assert (
        '<td class="state st-healthy" data-s="groups.0.blocks.1.servers.0">'
        "<span>healthy</span> <small></small></td>"
    ) in html
    assert 'data-b="groups.0.blocks.0">standby</b>' in html
    assert "<script>" in html and "src=" not in html and "http://" + "cdn" not in html
    head = HTTP.request("HEAD", url + "/ops/status")
    assert head.status == 200 and head.data == b""
    missing = HTTP.request("GET", url + "/ops/status/nothing")
    assert (missing.status, missing.data) == (404, b"not found\n")
    post = HTTP.request("POST", url + "/ops/status/status.json")
    assert (post.status, post.headers["Allow"], post.data) == (
        405,
        "GET, HEAD",
        b"method not allowed\n",
    )


def test_events_stream_flushes_each_event_through_oxypy_serve(upstream: str, proxy: Any) -> None:
    lb = RoundRobin(Forward(), [upstream])
    page = StatusPage(lb, interval=0.2, stream_seconds=600)
    url = proxy(Router([(None, "/status", page)]))
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /status/events HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = bytearray()
        while b"\r\n\r\n" not in raw:
            raw.extend(sock.recv(65536))
        head, _, rest = bytes(raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/event-stream; charset=utf-8" in head
        assert b"Transfer-Encoding: chunked" in head
        # Each event is one chunk, sent as soon as it is made: three arrive
        # a fraction of the ten-minute stream in.
        chunks = bytearray(rest)
        started = time.monotonic()
        events: list[bytes] = []
        while len(events) < 4:
            while True:
                text = bytes(chunks)
                try:
                    size_line, after = text.split(b"\r\n", 1)
                    size = int(size_line, 16)
                except ValueError:
                    size = -1
                if size >= 0 and len(after) >= size + 2:
                    events.append(after[:size])
                    del chunks[: len(size_line) + 2 + size + 2]
                    break
                piece = sock.recv(65536)
                assert piece, "stream ended"
                chunks.extend(piece)
        took = time.monotonic() - started
    assert took < 5, took
    assert events[0] == b"retry: 1000\n\n"
    docs = []
    for event in events[1:]:
        assert event.startswith(b"data: {") and event.endswith(b"}\n\n") and event.count(b"\n") == 2
        docs.append(json.loads(event[len(b"data: ") :]))
    assert all(d["groups"][0]["blocks"][0]["kind"] == "RoundRobin" for d in docs)
    assert docs[0]["process"]["pid"] == os.getpid()


def test_events_stream_ends_after_stream_seconds(upstream: str, proxy: Any) -> None:
    page = StatusPage(RoundRobin(Forward(), [upstream]), interval=0.1, stream_seconds=0.25)
    url = proxy(Router([(None, "/status", page)]))
    started = time.monotonic()
    resp = HTTP.request("GET", url + "/status/events", preload_content=True)
    assert time.monotonic() - started < 5
    assert resp.status == 200
    events = resp.data.split(b"\n\n")
    assert events[0] == b"retry: 1000" and events[-1] == b""
    assert 3 <= len(events[1:-1]) <= 6
    assert all(e.startswith(b"data: {") for e in events[1:-1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "StatusPage: interval must be a number > 0, got 0"),
        ({"stream_seconds": -1}, "StatusPage: stream_seconds must be a number > 0, got -1"),
        ({"interval": True}, "StatusPage: interval must be a number > 0, got True"),
        ({"watch": "lb"}, "StatusPage: watch must be blocks, not a string"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        StatusPage(None, **kwargs)
    assert str(info.value) == message


def test_a_failing_snapshot_is_shown_not_raised(proxy: Any, caplog: Any) -> None:
    class Broken:
        def snapshot(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    page = StatusPage(watch={"odd": Broken()})
    url = proxy(Router([(None, "/s", page)]))
    doc = get_json(url + "/s/status.json")
    assert doc["groups"] == [
        {"name": "odd", "blocks": [{"kind": "Broken", "error": "snapshot failed (see the log)"}]}
    ]
    assert HTTP.request("GET", url + "/s").status == 200
    assert "Broken.snapshot() failed" in caplog.text


def test_ejection_reason_and_time_left(pywsgi: Any) -> None:
    from oxypy import OutlierDetection

    dead = dead_url()
    lb = RoundRobin(
        Forward(),
        [dead, pywsgi(echo_app)],
        outlier_detection=OutlierDetection(consecutive_errors=1, base_ejection_time=30.0),
    )
    StatusPage(lb)
    from _servers import proxy_server

    server = proxy_server(lb)
    try:
        for _ in range(2):
            HTTP.request("GET", server.url + "/")
    finally:
        server.stop(timeout=1)
    row = lb.snapshot()["servers"][0]
    assert row["state"] == "ejected"
    assert row["reason"] == "1 network errors or timeouts in a row; out for 30 s"
    assert row["ejected_for"] is not None and 25 < row["ejected_for"] <= 30


# -- the gateway file -----------------------------------------------------------------


GATEWAY = """
[services.web]
servers = ["{up}"]

[[routes]]
prefix = "/status"
status = true
chain = [{{ block = "IPAllowList", cidrs = ["{allow}"] }}]

[[routes]]
name = "api"
prefix = "/"
service = "web"
chain = [{{ block = "CircuitBreaker", expression = "NetworkErrorRatio() > 0.5" }}]
"""


def test_gateway_file_status_route_behind_ip_allow_list(upstream: str, proxy: Any) -> None:
    gateway = load_config(GATEWAY.format(up=upstream, allow="127.0.0.1/32"))
    try:
        url = proxy(gateway)
        assert HTTP.request("GET", url + "/hello").status == 200
        doc = get_json(url + "/status/status.json")
        assert [(g["name"], [b["kind"] for b in g["blocks"]]) for g in doc["groups"]] == [
            ("service web", ["RoundRobin"]),
            ("route api", ["CircuitBreaker"]),
        ]
        assert doc["groups"][0]["blocks"][0]["servers"][0]["requests"] == 1
        assert b"oxypy gateway status" in HTTP.request("GET", url + "/status").data
    finally:
        gateway.close()
    refused = load_config(GATEWAY.format(up=upstream, allow="10.0.0.0/8"))
    try:
        url = proxy(refused)
        resp = HTTP.request("GET", url + "/status/status.json")
        assert resp.status == 403 and b"groups" not in resp.data
    finally:
        refused.close()


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ('status = "yes"', "routes[0].status: expected a boolean, got a string"),
        ('status = true\nservice = "web"', "routes[0].status: a route has a service, "),
    ],
)
def test_gateway_file_status_key_errors(route: str, message: str) -> None:
    from oxypy import ConfigFileError

    text = f'[services.web]\nservers = ["http://127.0.0.1:9"]\n[[routes]]\n{route}\n'
    with pytest.raises(ConfigFileError) as info:
        load_config(text)
    assert message in str(info.value)


# -- the command ------------------------------------------------------------------------


def test_command_status_page_flag(upstream: str, tmp_path: Path) -> None:
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "oxypy", "proxy", upstream, "--listen", "127.0.0.1:0"]
    argv += ["--status-page", "/ops/status", "--breaker", "NetworkErrorRatio() > 0.5"]
    argv += ["--ip-allow", "127.0.0.1/32"]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e, env=env)
    try:
        found: list[str] = []

        def listening() -> bool:
            m = re.search(r" on (http://[\d.:]+)", out.read_text())
            assert proc.poll() is None, err.read_text()
            if m:
                found.append(m[1])
            return bool(m)

        wait_for(listening, timeout=30, interval=0.02)
        url = found[0]
        assert HTTP.request("GET", url + "/x").status == 200
        doc = get_json(url + "/ops/status/status.json")
        assert doc["process"]["pid"] == proc.pid
        kinds = [b["kind"] for b in doc["groups"][0]["blocks"]]
        assert kinds == ["CircuitBreaker", "RoundRobin"]
        assert doc["groups"][0]["blocks"][1]["servers"][0]["requests"] == 1
        page = HTTP.request("GET", url + "/ops/status")
        assert page.status == 200 and b"oxypy proxy status" in page.data
        assert HTTP.request("GET", url + "/ops/statusx").status == 200  # the upstream's
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0, err.read_text()


def test_command_status_page_off_by_default_and_checked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", "http://127.0.0.1:9", "--listen", "127.0.0.1:0", "--status-page", "ops"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --status-page: expected a path below /, such as /status, got 'ops'" in err
    assert "Traceback" not in err


# -- a registry shared by several processes --------------------------------------------


def test_page_shows_the_fleet_wide_server_set_of_a_registry(upstream: str, proxy: Any) -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer()
    name = f"status-{os.urandom(3).hex()}"
    # Two balancers on one registry stand for two processes of a fleet.
    here = RoundRobin(Forward(), [upstream], registry=RedisRegistry(server.url, name))
    there = RoundRobin(Forward(), [], registry=RedisRegistry(server.url, name))
    try:
        page = StatusPage(here)
        there.upsert_server("http://127.0.0.1:9", 3)
        there.drain_server(upstream)

        def fleet() -> list[dict[str, Any]]:
            servers: list[dict[str, Any]] = blocks(page.document())["RoundRobin"]["registry"][
                "servers"
            ]
            return servers

        wait_for(lambda: [s["state"] for s in fleet()] == ["draining", "active"], timeout=10)

        def local_states() -> list[str]:
            return [s["state"] for s in here.snapshot()["servers"]]

        # This process follows the registry: it applies both changes too.
        wait_for(lambda: local_states() == ["draining", "healthy"], timeout=10)
        local = {s["url"]: s for s in here.snapshot()["servers"]}
        assert (local[upstream]["state"], local[upstream]["reason"]) == ("draining", "")
        assert (local["http://127.0.0.1:9"]["state"], local["http://127.0.0.1:9"]["weight"]) == (
            "healthy",
            3,
        )
        registry = blocks(page.document())["RoundRobin"]["registry"]
        assert registry["name"] == name and registry["url"] == server.url
        assert registry["error"] == "" and registry["prober"] is None
        assert registry["servers"] == [
            {"url": upstream, "weight": 1, "state": "draining", "health": "unknown"},
            {"url": "http://127.0.0.1:9", "weight": 3, "state": "active", "health": "unknown"},
        ]
        html = HTTP.request("GET", proxy(Router([(None, "/s", page)])) + "/s").data.decode()
        assert f"fleet-wide: registry {name} at {server.url}, probed by" in html
        server.stop()  # Redis gone: the page says so, the local view stays
        wait_for(lambda: blocks(page.document())["RoundRobin"]["registry"]["error"] != "")
        registry = blocks(page.document())["RoundRobin"]["registry"]
        assert registry["error"] == "the registry did not answer" and registry["servers"] == []
        assert len(blocks(page.document())["RoundRobin"]["servers"]) == 2
    finally:
        here.close()
        there.close()
        server.stop()
