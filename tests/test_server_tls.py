"""The TLS front door of the embedded server: handshake deadline, plain HTTP, quiet failures."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
import trustme
import urllib3

from oxypy import Server
from oxypy.exceptions import ConfigurationError

from _servers import echo_app

PLAIN_400 = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 38\r\nConnection: close\r\n\r\n"
    b"plain HTTP request sent to HTTPS port\n"
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[Server]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    server = Server(
        echo_app, "127.0.0.1:0", ssl_context=ctx, handshake_timeout=0.5, header_timeout=30
    ).start()
    try:
        yield server
    finally:
        server.stop(timeout=1)


def _https_get(ca: trustme.CA, tmp_path: Path, server: Server) -> urllib3.BaseHTTPResponse:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = urllib3.PoolManager(retries=False, ca_certs=str(ca_file), timeout=10)
    return client.request("GET", f"https://127.0.0.1:{server.address[1]}/ok")


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_silent_tls_clients_are_closed_after_handshake_timeout(
    ca: trustme.CA, tls_server: Server, tmp_path: Path
) -> None:
    silent = [socket.create_connection(tls_server.address, timeout=10) for _ in range(300)]
    try:
        started = time.monotonic()
        # A real HTTPS request is served while 300 connections say nothing.
        resp = _https_get(ca, tmp_path, tls_server)
        assert resp.status == 200 and b'"path": "/ok"' in resp.data
        for sock in silent:
            assert sock.recv(1) == b""  # closed by the server, not by our 10 s timeout
        elapsed = time.monotonic() - started
        assert 0.4 < elapsed < 8.0
    finally:
        for sock in silent:
            sock.close()


def test_trickled_hello_is_bounded_by_one_deadline(tls_server: Server) -> None:
    """The deadline covers the whole handshake, not each read."""
    sock = socket.create_connection(tls_server.address, timeout=10)
    try:
        started = time.monotonic()
        sock.sendall(b"\x16")
        for byte in b"\x03\x01\x02\x00\x01":
            gevent.sleep(0.2)
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
        assert _read_all(sock) == b""
        assert time.monotonic() - started < 3.0
    except ConnectionResetError:
        assert time.monotonic() - started < 3.0
    finally:
        sock.close()


def test_failed_handshake_is_one_info_line(
    tls_server: Server, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    client_ctx = ssl.create_default_context()  # does not trust the test CA
    raw = socket.create_connection(tls_server.address, timeout=10)
    with pytest.raises(ssl.SSLError):
        client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    raw.close()
    records: list[logging.LogRecord] = []
    gevent_wait = time.monotonic() + 5
    while time.monotonic() < gevent_wait:
        records = [r for r in caplog.records if r.name.startswith("oxypy")]
        if records:
            break
        gevent.sleep(0.01)
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.INFO and record.exc_info is None
    message = record.getMessage()
    assert message.startswith("TLS handshake with 127.0.0.1 failed: ")
    assert "\n" not in message
    assert "Traceback" not in caplog.text
    # Other tests' upstreams (gevent's own servers, some of them failing TLS
    # handshakes on purpose) print their greenlets' failures to this same
    # stderr at any moment; only a traceback of oxypy's listener is a failure.
    tracebacks = capfd.readouterr().err.split("Traceback (most recent call last):")[1:]
    assert [
        t for t in tracebacks if "Listener" in t or "oxypy.server" in t or "oxypy/_server" in t
    ] == []


def test_garbage_instead_of_hello_is_closed_quietly(
    tls_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oxypy")
    sock = socket.create_connection(tls_server.address, timeout=10)
    try:
        sock.sendall(b"\x00\x01\x02garbage")
        try:
            assert _read_all(sock) == b""
        except ConnectionResetError:
            pass  # closed with our garbage unread: a reset is as good
    finally:
        sock.close()
    assert "Traceback" not in caplog.text


def test_plain_http_on_tls_port_gets_400(tls_server: Server) -> None:
    sock = socket.create_connection(tls_server.address, timeout=10)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert _read_all(sock) == PLAIN_400
    finally:
        sock.close()


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_handshake_timeout_is_validated(bad: float) -> None:
    with pytest.raises(ConfigurationError, match="handshake_timeout must be"):
        Server(echo_app, "127.0.0.1:0", handshake_timeout=bad)
