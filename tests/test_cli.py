"""The ``oxypy`` console script: flag parsing, and every subcommand as a real process.

Subcommands run as ``python -m oxypy ...`` subprocesses listening on port 0
(the banner names the bound URL), in front of real pywsgi upstreams started
in this process, and are stopped with SIGTERM by PID: exit status 0 within a
bounded time.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
import urllib3

from oxypy import __version__
from oxypy._cli.chain import parse_rate
from oxypy.cli import main

from _servers import REPO, OxypyProcess, dead_url

HTTP = urllib3.PoolManager(retries=False, timeout=10.0)


def named(name: bytes, health: str = "200 OK") -> Any:
    """An upstream answering its ``name``; ``/healthz`` answers ``health``."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/healthz":
            start_response(health, [("Content-Length", "0")])
            return [b""]
        start_response("200 OK", [("Content-Length", str(len(name)))])
        return [name]

    return wsgi


def port_of(response: urllib3.BaseHTTPResponse) -> str:
    """Which echo upstream answered: the Host it saw (Forward sends the target's)."""
    return str(json.loads(response.data)["headers"]["host"]).rsplit(":", 1)[1]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("100/s:200", (100.0, 1.0, 200), id="per-second-burst"),
        pytest.param("100/s", (100.0, 1.0, None), id="no-burst"),
        pytest.param("600/m", (600.0, 60.0, None), id="per-minute"),
        pytest.param("1000/h:50", (1000.0, 3600.0, 50), id="per-hour"),
        pytest.param("2.5/sec", (2.5, 1.0, None), id="fraction-long-unit"),
        pytest.param("10/minute:1", (10.0, 60.0, 1), id="minute-word"),
        pytest.param(" 5 / S : 7 ", (5.0, 1.0, 7), id="spaces-case"),
    ],
)
def test_rate_parsing(text: str, expected: tuple[float, float, int | None]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("100", id="no-unit"),
        pytest.param("100/d", id="bad-unit"),
        pytest.param("0/s", id="zero"),
        pytest.param("-1/s", id="negative"),
        pytest.param("10/s:0", id="zero-burst"),
        pytest.param("10/s:", id="empty-burst"),
        pytest.param("ten/s", id="words"),
        pytest.param("10/s:2.5", id="fractional-burst"),
    ],
)
def test_rate_parsing_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


UP = "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("argv", "flag", "detail"),
    [
        pytest.param(["proxy", UP, "--retry", "Attempts() <"], "--retry", "^", id="retry"),
        pytest.param(["proxy", UP, "--retry", "Nope()"], "--retry", "Nope", id="retry-func"),
        pytest.param(
            ["proxy", UP, "--breaker", "NetworkErrorRatio() >> 1"], "--breaker", "^", id="breaker"
        ),
        pytest.param(
            ["proxy", UP, "--breaker", "IsNetworkError()"], "--breaker", "IsNetworkError", id="bf"
        ),
        pytest.param(["proxy", UP, "--rate", "10/d"], "--rate", "unit", id="rate-unit"),
        pytest.param(["proxy", UP, "--rate", "fast"], "--rate", "N/UNIT", id="rate-shape"),
        pytest.param(["proxy", UP, "--conn-limit", "-1"], "--conn-limit", "1 or more", id="conn"),
        pytest.param(["proxy", UP, "--conn-limit", "0"], "--conn-limit", "1 or more", id="conn-0"),
        pytest.param(["proxy", UP, "--conn-limit", "x"], "--conn-limit", "integer", id="conn-nan"),
        pytest.param(["proxy", UP, "--timeout", "0"], "--timeout", "above 0", id="timeout"),
        pytest.param(["proxy", UP, "--eject-after", "0"], "--eject-after", "1 or more", id="eject"),
        pytest.param(["proxy", UP, "--listen", "8080"], "--listen", "HOST:PORT", id="listen"),
        pytest.param(
            ["proxy", UP, "--listen", "[::1:80"], "--listen", "brackets", id="listen-brackets"
        ),
        pytest.param(
            ["proxy", UP, "--header-timeout", "0"], "--header-timeout", "above 0", id="header-t"
        ),
        pytest.param(
            ["serve", "m:app", "--keepalive-timeout", "x"],
            "--keepalive-timeout",
            "number",
            id="keepalive-t",
        ),
        pytest.param(["demo", "--body-timeout", "-1"], "--body-timeout", "above 0", id="body-t"),
        pytest.param(
            ["proxy", UP, "--header-timeout", "inf"], "--header-timeout", "finite", id="inf-t"
        ),
        pytest.param(
            ["proxy", UP, "--max-connections", "0"], "--max-connections", "1 or more", id="cap"
        ),
        pytest.param(
            ["serve", "m:app", "--max-connections", "many"],
            "--max-connections",
            "integer",
            id="cap-nan",
        ),
        pytest.param(["proxy", "ftp://h"], "UPSTREAM", "http://", id="scheme"),
        pytest.param(["proxy", "http://"], "UPSTREAM", "no host", id="no-host"),
        pytest.param(["proxy", "http://h:99999"], "UPSTREAM", "invalid URL", id="bad-port"),
        pytest.param(["proxy", "http://h/?q=1"], "UPSTREAM", "query", id="query"),
        pytest.param(["proxy"], "UPSTREAM", "required", id="no-upstream"),
        pytest.param(
            ["proxy", UP, "--trusted-proxy", "not-a-cidr"], "--trusted-proxy", "", id="cidr"
        ),
        pytest.param(["proxy", UP, "--sticky", "bad name"], "--sticky", "", id="sticky"),
        pytest.param(
            ["proxy", UP, "--ip-allow", "10.0.0.0/33"], "--ip-allow", "'10.0.0.0/33'", id="ipallow"
        ),
        pytest.param(
            ["proxy", UP, "--cors-origin", "app.example"], "--cors-origin", "'app.example'", id="co"
        ),
        pytest.param(["proxy", UP, "--nope"], "--nope", "unrecognized", id="unknown-flag"),
        pytest.param(["serve", "no_such_module_xyz:app"], "APP", "cannot import", id="import"),
        pytest.param(["serve", "os:no_such_attr"], "APP", "no attribute", id="attr"),
        pytest.param(["serve", "os:sep"], "APP", "not callable", id="not-callable"),
        pytest.param(["serve", ":app"], "APP", "module:attribute", id="shape"),
        pytest.param(["frobnicate"], "COMMAND", "invalid choice", id="command"),
        pytest.param([], "COMMAND", "required", id="no-command"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    argv: list[str], flag: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err
    assert detail in err
    assert "Traceback" not in err


def test_predicate_error_shows_its_caret_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["proxy", UP, "--retry", "IsNetworkError() && && Attempts() < 2"])
    err = capsys.readouterr().err
    assert "argument --retry:" in err
    lines = err.splitlines()
    expr = next(i for i, line in enumerate(lines) if line.strip().startswith("IsNetworkError()"))
    caret = lines[expr + 1]
    assert caret.strip() == "^"
    assert lines[expr][caret.index("^")] == "&"
    assert caret.index("^") == lines[expr].index("&& &&") + 3


def test_version_help_and_a_bad_flag_as_processes() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "oxypy", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )

    version = run("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"oxypy {__version__}")
    helptext = run("--help")
    assert helptext.returncode == 0
    for word in ("proxy", "serve", "demo", "--version"):
        assert word in helptext.stdout
    proxy_help = run("proxy", "--help").stdout
    for flag in ("--retry", "--breaker", "--rate", "--conn-limit", "--trace", "--sticky"):
        assert flag in proxy_help
    bad = run("proxy", UP, "--breaker", "NetworkErrorRatio() >")
    assert bad.returncode == 2
    assert "argument --breaker:" in bad.stderr
    assert "^" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert "MonkeyPatchWarning" not in bad.stderr


# --------------------------------------------------------------------------- proxy


def test_proxy_full_chain_balances_and_traces(
    oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str]
) -> None:
    from _servers import echo_app

    up1, up2 = pywsgi(echo_app), pywsgi(echo_app)
    ports = {up1.rsplit(":", 1)[1], up2.rsplit(":", 1)[1]}
    gw = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        up1,
        up2,
        "--retry",
        "IsNetworkError() && Attempts() < 2",
        "--breaker",
        "NetworkErrorRatio() > 0.5",
        "--rate",
        "100/s:200",
        "--conn-limit",
        "10",
        "--trace",
        "--request-id",
    )
    try:
        seen = []
        for i in range(4):
            r = gw.get(f"/p/{i}?q={i}", headers={"X-Request-Id": f"rid-{i}"})
            assert r.status == 200
            assert r.headers["X-Request-Id"] == f"rid-{i}"
            doc = json.loads(r.data)
            assert (doc["path"], doc["query"]) == (f"/p/{i}", f"q={i}")
            assert doc["headers"]["x-request-id"] == f"rid-{i}"
            seen.append(port_of(r))
        assert set(seen) == ports
        assert seen[0] != seen[1]
    finally:
        gw.stop()
    lines = [json.loads(x) for x in gw.stderr().splitlines() if x.startswith("{")]
    assert [(x["status"], x["url"], x["request_id"]) for x in lines] == [
        (200, f"/p/{i}?q={i}", f"rid-{i}") for i in range(4)
    ]
    assert {x["target"] for x in lines} == {up1, up2}


def test_retry_makes_a_dead_live_pair_succeed(
    oxypy: Callable[..., OxypyProcess], echo_upstream: str
) -> None:
    dead = dead_url()
    without = oxypy("proxy", "--listen", "127.0.0.1:0", dead, echo_upstream)
    with_retry = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        dead,
        echo_upstream,
        "--retry",
        "IsNetworkError() && Attempts() < 2",
    )
    try:
        assert sorted(without.get(f"/{i}").status for i in range(4)) == [200, 200, 502, 502]
        for i in range(4):
            r = with_retry.get(f"/{i}")
            assert r.status == 200
            assert json.loads(r.data)["path"] == f"/{i}"
    finally:
        without.stop()
        with_retry.stop()


def test_rate_and_conn_limit(oxypy: Callable[..., OxypyProcess], echo_upstream: str) -> None:
    rated = oxypy("proxy", "--listen", "127.0.0.1:0", echo_upstream, "--rate", "1/m:2")
    # --conn-limit 0 is refused (it could only answer 429); ConnLimit's 429 is tested there.
    capped = oxypy("proxy", "--listen", "127.0.0.1:0", echo_upstream, "--conn-limit", "1")
    try:
        assert [rated.get("/").status for _ in range(2)] == [200, 200]
        limited = rated.get("/")
        assert limited.status == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert capped.get("/").status == 200
    finally:
        rated.stop()
        capped.stop()


def test_sticky_least_request_and_pass_host_header(
    oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str], echo_upstream: str
) -> None:
    sticky = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        pywsgi(named(b"one")),
        pywsgi(named(b"two")),
        "--sticky",
        "lb",
        "--sticky-secret",
        "s3cret",
        "--least-request",
        "--timeout",
        "5",
    )
    host = oxypy("proxy", "--listen", "127.0.0.1:0", echo_upstream, "--pass-host-header")
    try:
        first = sticky.get("/")
        assert first.status == 200
        cookie = first.headers["Set-Cookie"]
        assert cookie.startswith("lb=")
        pair = cookie.split(";", 1)[0]
        for _ in range(6):
            r = sticky.get("/", headers={"Cookie": pair})
            assert (r.status, r.data) == (200, first.data)
            assert "Set-Cookie" not in r.headers
        r = host.get("/", headers={"Host": "example.test"})
        assert json.loads(r.data)["headers"]["host"] == "example.test"
    finally:
        sticky.stop()
        host.stop()


def test_health_check_takes_a_sick_upstream_out(
    oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str]
) -> None:
    good = pywsgi(named(b"good"))
    sick = pywsgi(named(b"sick", "500 Internal Server Error"))
    gw = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        good,
        sick,
        "--health-check",
        "/healthz",
        "--health-interval",
        "0.1",
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if {gw.get("/").data for _ in range(4)} == {b"good"}:
                break
            time.sleep(0.1)
        assert {gw.get("/").data for _ in range(6)} == {b"good"}
    finally:
        gw.stop()


def test_eject_after_takes_a_hanging_upstream_out(
    oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str]
) -> None:
    import gevent.event

    from _servers import RawUpstream

    release = gevent.event.Event()
    hang = RawUpstream(lambda sock, data: release.wait(10))
    good = pywsgi(named(b"good"))
    gw = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        hang.url,
        good,
        "--timeout",
        "0.5",
        "--eject-after",
        "2",
    )
    try:
        got = [gw.get("/") for _ in range(10)]
        assert [(r.status, r.data) for r in got] == [
            (504, b"upstream timed out\n"),
            (200, b"good"),
        ] * 2 + [(200, b"good")] * 6
        assert len(hang.requests) == 2
    finally:
        gw.stop()
        release.set()
        hang.stop()


def test_deadline_flags_bound_a_hanging_upstream(
    oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str]
) -> None:
    import gevent.event

    from _servers import RawUpstream

    release = gevent.event.Event()
    hang = RawUpstream(lambda sock, data: release.wait(10))
    good = pywsgi(named(b"good"))
    retrying = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        hang.url,
        good,
        "--retry",
        "IsNetworkError() && Attempts() < 3",
        "--per-try-timeout",
        "0.3",
        "--deadline",
        "5",
    )
    alone = oxypy(
        "proxy", "--listen", "127.0.0.1:0", hang.url, "--deadline", "0.4", "--timeout", "30"
    )
    slow_head = oxypy(
        "proxy", "--listen", "127.0.0.1:0", hang.url, "--response-header-timeout", "0.4"
    )
    try:
        for _ in range(2):  # one of the two starts on the hung server
            started = time.monotonic()
            r = retrying.get("/")
            assert (r.status, r.data) == (200, b"good")
            assert time.monotonic() - started < 0.3 + 1.0
        started = time.monotonic()
        r = alone.get("/")
        assert (r.status, r.data) == (504, b"request deadline reached\n")
        assert 0.4 <= time.monotonic() - started < 0.4 + 1.0
        r = slow_head.get("/")
        assert r.status == 504
        assert r.data == b"upstream sent no response head within 0.4 s (response_header_timeout)\n"
    finally:
        for gw in (retrying, alone, slow_head):
            gw.stop()
        release.set()
        hang.stop()


# --------------------------------------------------------------------------- serve, demo

GATEWAY = """
import os
from oxypy import Forward, RequestID

app = RequestID(Forward(os.environ["CLI_TEST_UPSTREAM"]))

def make():
    return Forward(os.environ["CLI_TEST_UPSTREAM"], via="factory")
"""


def test_serving_flags_reach_the_server(
    oxypy: Callable[..., OxypyProcess], echo_upstream: str
) -> None:
    gw = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        echo_upstream,
        "--header-timeout",
        "0.5",
        "--keepalive-timeout",
        "20",
        "--body-timeout",
        "20",
        "--max-connections",
        "2",
    )
    host, port = gw.url.split("//")[1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\n")  # and nothing more: 408 after 0.5 s
            start = time.monotonic()
            answer = slow.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            assert time.monotonic() - start < 3
        flood = [socket.create_connection((host, int(port)), timeout=10) for _ in range(5)]
        try:
            for sock in flood:
                sock.sendall(b"GET / HTTP/1.1\r\n")
            assert gw.get("/through").status == 200  # the cap of 2 made room for it
        finally:
            for sock in flood:
                sock.close()
    finally:
        gw.stop()


@pytest.mark.parametrize("target", ["gw_mod:app", "gw_mod:make()"])
def test_serve_module_app(
    target: str,
    oxypy: Callable[..., OxypyProcess],
    echo_upstream: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "gw_mod.py").write_text(GATEWAY)
    monkeypatch.setenv("CLI_TEST_UPSTREAM", echo_upstream)
    gw = oxypy("serve", target, "--listen", "127.0.0.1:0", cwd=tmp_path)
    try:
        r = gw.get("/served?x=1")
        assert r.status == 200
        doc = json.loads(r.data)
        assert (doc["path"], doc["query"]) == ("/served", "x=1")
        if target.endswith("()"):
            assert doc["headers"]["via"] == "1.1 factory"
        else:
            assert "x-request-id" in doc["headers"]
    finally:
        gw.stop()


def test_demo_balances_retries_and_reports(oxypy: Callable[..., OxypyProcess]) -> None:
    demo = oxypy("demo", "--listen", "127.0.0.1:0", "--interval", "0.3")
    try:
        bodies = []
        for i in range(6):
            r = demo.get(f"/hello/{i}")
            assert r.status == 200
            bodies.append(r.data.decode())
        assert any("upstream A" in b for b in bodies)
        assert any("upstream B" in b for b in bodies)
        deadline = time.monotonic() + 10
        while "saved by a retry: 0 " in demo.stdout() or "responses" not in demo.stdout():
            assert time.monotonic() < deadline, demo.stdout()
            time.sleep(0.1)
        assert "breaker: standby" in demo.stdout()
        assert "curl -i " + demo.url in demo.stdout()
    finally:
        demo.stop(signal.SIGINT)  # Ctrl-C
    assert demo.stdout().rstrip().endswith("oxypy demo: stopped")


def test_proxy_tunnels_websockets_through_the_full_chain(
    oxypy: Callable[..., OxypyProcess],
) -> None:
    websocket = pytest.importorskip("websocket")
    from _ws import WSEchoUpstream

    ws_up = WSEchoUpstream()
    gw = None
    try:
        gw = oxypy(
            "proxy",
            "--listen",
            "127.0.0.1:0",
            ws_up.url,
            "--retry",
            "IsNetworkError() && Attempts() < 2",
            "--breaker",
            "NetworkErrorRatio() > 0.5",
            "--rate",
            "10/s",
            "--conn-limit",
            "5",
            "--trace",
        )
        client = websocket.create_connection(gw.url.replace("http", "ws") + "/chat", timeout=10)
        try:
            client.send("through every block")
            assert client.recv() == "through every block"
        finally:
            client.close()
    finally:
        if gw is not None:
            gw.stop()
        ws_up.stop()
    line = json.loads(gw.stderr().splitlines()[-1])
    assert (line["status"], line["url"], line["target"]) == (101, "/chat", ws_up.url)


def test_sigterm_lets_an_in_flight_request_finish(
    oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str]
) -> None:
    import gevent
    import gevent.event

    arrived = gevent.event.Event()

    def slow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        arrived.set()
        gevent.sleep(1.0)  # the slow upstream: still answering when SIGTERM comes
        start_response("200 OK", [("Content-Length", "4")])
        return [b"done"]

    gw = oxypy("proxy", "--listen", "127.0.0.1:0", pywsgi(slow), "--graceful-timeout", "5")
    pending = gevent.spawn(gw.get, "/slow")
    assert arrived.wait(10)  # the request is in flight upstream
    gw.stop()
    response = pending.get(timeout=5)
    assert (response.status, response.data) == (200, b"done")


def test_proxy_edge_flags(oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str]) -> None:
    big = b"edge " * 1000

    def upstream(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5000")])
        return [big]

    up = pywsgi(upstream)
    common = ["proxy", "--listen", "127.0.0.1:0", up, "--compress"]
    gw = oxypy(*common, "--ip-allow", "127.0.0.0/8", "--cors-origin", "https://app.example")
    refused = oxypy(*common, "--ip-allow", "10.0.0.0/8", "--ip-allow", "::1")
    try:
        r = gw.get("/", headers={"Accept-Encoding": "gzip", "Origin": "https://app.example"})
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert r.headers["Vary"] == "Accept-Encoding, Origin"
        assert r.data == big  # urllib3 decoded the gzip body
        pre = HTTP.request(
            "OPTIONS",
            gw.url + "/",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        assert pre.status == 204
        assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
        no = refused.get("/")
        assert (no.status, no.data) == (403, b"client address not allowed\n")
    finally:
        gw.stop()
        refused.stop()


def test_proxy_hedge_retry_budget_and_mirror_flags(
    oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str], echo_upstream: str
) -> None:
    copies: list[str] = []

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        gevent.sleep(1.0)
        start_response("200 OK", [("Content-Length", "4")])
        return [b"slow"]

    def mirror(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        copies.append(environ["PATH_INFO"])
        start_response("500 Internal Server Error", [("Content-Length", "0")])
        return []

    slow_url, mirror_url = pywsgi(slow), pywsgi(mirror)
    gw = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        slow_url,
        echo_upstream,
        "--hedge",
        "0.05",
        "--retry-budget",
        "100",
        "--mirror",
        mirror_url,
    )
    try:
        for i in range(4):
            started = time.monotonic()
            r = gw.get(f"/h/{i}")
            assert time.monotonic() - started < 0.5
            assert r.status == 200
            assert json.loads(r.data)["path"] == f"/h/{i}"
        deadline = time.monotonic() + 5
        while len(copies) < 4 and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert sorted(copies) == [f"/h/{i}" for i in range(4)]
    finally:
        gw.stop()


def test_proxy_quantile_hedge_and_mirror_compare_flags(
    oxypy: Callable[..., OxypyProcess], pywsgi: Callable[[Any], str], echo_upstream: str
) -> None:
    def mirror(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("503 Service Unavailable", [("Content-Length", "4")])
        return [b"down"]

    gw = oxypy(
        "proxy",
        "--listen",
        "127.0.0.1:0",
        echo_upstream,
        "--hedge",
        "p95",
        "--mirror",
        pywsgi(mirror),
        "--mirror-compare",
        "--metrics",
        "/metrics",
    )
    try:
        r = gw.get("/c/1")
        assert (r.status, json.loads(r.data)["path"]) == (200, "/c/1")
        deadline = time.monotonic() + 10
        while "mirror differs" not in gw.stderr() and time.monotonic() < deadline:
            gevent.sleep(0.02)
        (line,) = [x for x in gw.stderr().splitlines() if "mirror differs" in x]
        assert "mirror differs: GET /c/1: status 200 vs 503, body " in line
        assert line.endswith(f"vs 4 bytes sha256 {hashlib.sha256(b'down').hexdigest()[:16]}")
        exported = gw.get("/metrics").data.decode()
        assert 'oxypy_mirror_compared_total{name="mirror"} 1.0' in exported
        assert 'oxypy_mirror_differed_total{name="mirror"} 1.0' in exported
    finally:
        gw.stop()
