"""The ``oxypy proxy`` flags an operator needs: TLS in front and upstream, metrics, logs.

The command runs as a real subprocess against real TLS sockets (certificates
from ``trustme``); flag refusals are checked in-process.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import urllib3
from gevent.pywsgi import WSGIServer

from oxypy.cli import main

from _servers import OxypyProcess, echo_app

REPO = Path(__file__).resolve().parent.parent
HTTP = urllib3.PoolManager(retries=False, timeout=10.0)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """PEM files: the CA, the proxy's own certificate and key (for 127.0.0.1)."""
    out = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    front = ca.issue_cert("127.0.0.1")
    front.cert_chain_pems[0].write_to_path(str(out["cert"]))
    front.private_key_pem.write_to_path(str(out["key"]))
    return {k: str(v) for k, v in out.items()}


@pytest.fixture
def private_upstream(ca: trustme.CA) -> Iterator[str]:
    """An HTTPS echo upstream whose certificate names only upstream.internal."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("upstream.internal").configure_cert(ctx)
    server = WSGIServer(("127.0.0.1", 0), echo_app, ssl_context=ctx, log=None, error_log=None)
    server.start()
    try:
        yield f"https://127.0.0.1:{server.address[1]}"
    finally:
        server.stop(timeout=1)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_tls_front_private_ca_upstream_metrics_and_json_logs(
    files: dict[str, str],
    private_upstream: str,
    tmp_path: Path,
    oxypy: Callable[..., OxypyProcess],
) -> None:
    c = oxypy(
        "proxy",
        private_upstream,
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        files["cert"],
        "--tls-key",
        files["key"],
        "--handshake-timeout",
        "0.5",
        "--ca-certs",
        files["ca"],
        "--server-name",
        "upstream.internal",
        "--metrics",
        "/metrics",
        "--log-level",
        "info",
        "--log-format",
        "json",
        cwd=tmp_path,
    )
    assert c.url.startswith("https://127.0.0.1:")
    client = urllib3.PoolManager(retries=False, ca_certs=files["ca"], timeout=10)
    resp = client.request("GET", c.url + "/through")
    assert resp.status == 200 and json.loads(resp.data)["path"] == "/through"
    metrics = client.request("GET", c.url + "/metrics")
    assert metrics.status == 200
    assert re.search(rb'oxypy_requests_total\{code_class="2xx",method="GET"\} 1\.0', metrics.data)
    # A client that connects and says nothing is closed after --handshake-timeout.
    host, port = c.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert time.monotonic() - started < 5
    c.stop()
    lines = json_lines(c.stderr())
    listening = [r for r in lines if r["message"] == f"listening on {c.url}"]
    assert len(listening) == 1
    assert listening[0]["level"] == "info" and listening[0]["logger"] == "oxypy.server"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", listening[0]["time"])
    assert any(r["message"].startswith("TLS handshake with 127.0.0.1 failed") for r in lines)
    assert "Traceback" not in c.stderr()


def test_unverified_upstream_is_traced_with_the_cause_and_insecure_opts_out(
    files: dict[str, str], private_upstream: str, oxypy: Callable[..., OxypyProcess]
) -> None:
    strict = oxypy("proxy", private_upstream, "--listen", "127.0.0.1:0", "--trace")
    assert HTTP.request("GET", strict.url + "/x").status == 502
    rec = strict.wait_for(
        lambda: next((r for r in json_lines(strict.stderr()) if "status" in r), None)
    )
    assert rec["error"] == "upstream_tls_error"
    assert rec["error_detail"].startswith("certificate verify failed: ")
    insecure = oxypy("proxy", private_upstream, "--listen", "127.0.0.1:0", "--insecure")
    assert HTTP.request("GET", insecure.url + "/x").status == 200


def test_server_state_changes_are_logged(
    tmp_path: Path, oxypy: Callable[..., OxypyProcess]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    live = WSGIServer(("127.0.0.1", 0), echo_app, log=None, error_log=None)
    live.start()
    try:
        c = oxypy(
            "proxy",
            dead,
            f"http://127.0.0.1:{live.address[1]}",
            "--listen",
            "127.0.0.1:0",
            "--eject-after",
            "1",
            "--log-level",
            "info",
            cwd=tmp_path,
        )
        statuses = {HTTP.request("GET", c.url + "/").status for _ in range(4)}
        assert 502 in statuses
        _check_ejection_line(c, dead)
    finally:
        live.stop(timeout=1)


def _check_ejection_line(c: OxypyProcess, dead: str) -> None:
    line = c.wait_for(
        lambda: re.search(
            rf"WARNING oxypy\.balancer: upstream {dead} ejected: .*$", c.stderr(), re.M
        )
    )
    assert line[0].endswith(
        f"upstream {dead} ejected: 1 network errors or timeouts in a row; out for 30 s"
    )
    assert f"INFO oxypy.server: listening on {c.url}" in c.stderr()


GATEWAY_APP = """
from oxypy import Forward, HealthCheck, OutlierDetection, RoundRobin

app = RoundRobin(
    Forward(),
    [{dead!r}, {live!r}],
    health_check=HealthCheck("/healthz", interval=0.2, unhealthy_threshold=2),
    outlier_detection=OutlierDetection(consecutive_errors=1),
)
"""

GATEWAY_TOML = """
[[listeners]]
address = "127.0.0.1:0"

[services.api]
servers = [{dead!r}, {live!r}]
health_check = {{ path = "/healthz", interval = "0.2s", unhealthy_threshold = 2 }}
outlier_detection = {{ consecutive_errors = 1 }}

[[routes]]
prefix = "/"
service = "api"
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["serve", "run"])
def test_server_state_changes_are_logged_by_serve_and_run(
    command: str, tmp_path: Path, oxypy: Callable[..., OxypyProcess]
) -> None:
    """The balancer's lines come from the library: a gateway built in Python
    (``oxypy serve``) or from a file (``oxypy run``) logs them too."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    live = WSGIServer(("127.0.0.1", 0), echo_app, log=None, error_log=None)
    live.start()
    try:
        urls = {"dead": dead, "live": f"http://127.0.0.1:{live.address[1]}"}
        if command == "serve":
            (tmp_path / "gateway_app.py").write_text(GATEWAY_APP.format(**urls))
            argv = ["serve", "gateway_app:app", "--listen", "127.0.0.1:0"]
        else:
            (tmp_path / "gateway.toml").write_text(GATEWAY_TOML.format(**urls))
            argv = ["run", str(tmp_path / "gateway.toml"), "--no-watch"]
        c = oxypy(*argv, "--log-level", "info", "--log-format", "json", cwd=tmp_path)
        statuses = {HTTP.request("GET", c.url + "/").status for _ in range(4)}
        assert 200 in statuses
        c.wait_for(lambda: '"event": "unhealthy"' in c.stderr())
        lines = [r for r in json_lines(c.stderr()) if r["logger"] == "oxypy.balancer"]
        (unhealthy,) = [r for r in lines if r["event"] == "unhealthy"]
        assert unhealthy["level"] == "warning" and unhealthy["upstream"] == dead
        assert unhealthy["message"].startswith(
            f"upstream {dead} unhealthy: 2 health checks failed in a row, "
            "the last: GET /healthz failed: "
        )
        assert "Connection refused" in unhealthy["reason"]
        if 502 in statuses:  # round robin sent a request to the dead server first
            (ejected,) = [r for r in lines if r["event"] == "ejected"]
            assert ejected["message"] == (
                f"upstream {dead} ejected: 1 network errors or timeouts in a row; out for 30 s"
            )
        assert not [r for r in lines if r["upstream"] == urls["live"] and r["level"] != "info"]
        c.stop()
    finally:
        live.stop(timeout=1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "-5/s"], "argument --rate: the rate must be above 0, got '-5/s'"),
        (["--conn-limit", "0"], "argument --conn-limit: must be 1 or more, got '0'"),
        (["--conn-limit", "-2"], "argument --conn-limit: must be 1 or more, got '-2'"),
        (["--tls-cert", "c.pem"], "argument --tls-key: --tls-cert and --tls-key go together"),
        (["--handshake-timeout", "0"], "argument --handshake-timeout: must be above 0"),
        (["--metrics", "metrics"], "argument --metrics: expected a path starting with /"),
        (["--client-key", "k.pem"], "argument --client-key: needs --client-cert"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    ],
)
def test_values_that_cannot_work_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", "http://127.0.0.1:9", "--listen", "127.0.0.1:0", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_proxy_help_shows_worked_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "--tls-cert /etc/oxypy/cert.pem --tls-key /etc/oxypy/key.pem" in out
    assert "--pass-host-header" in out and "CSRF" in out
    assert "--retry 'IsNetworkError() && Attempts() < 3'" in out


#: The flags issue 12 added: the README shows each of them too.
OPERATOR_FLAGS = (
    "--tls-cert --tls-key --handshake-timeout --ca-certs --client-cert --client-key "
    "--server-name --insecure --metrics --pass-host-header --log-level --log-format"
).split()


def test_docs_show_every_flag() -> None:
    from oxypy.cli import _make_parsers

    gateway = (REPO / "docs" / "gateway.md").read_text()
    readme = (REPO / "README.md").read_text()
    _, subcommands = _make_parsers()
    missing = sorted(
        f"{name} {option}"
        for name, parser in subcommands.items()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and f"`{option}" not in gateway
    )
    assert missing == []
    assert [flag for flag in OPERATOR_FLAGS if flag not in readme] == []
