"""TLS to upstreams (verification, CA, SNI name, client certificates) and TLS in front."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import urllib3
from gevent.pywsgi import WSGIServer

from oxypy import Forward, Server

from _servers import echo_app, wait_for

HTTP = urllib3.PoolManager(retries=False, timeout=10)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_upstream(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[str, str, trustme.CA]]:
    """An HTTPS pywsgi echo upstream whose certificate names only upstream.internal."""
    cert = ca.issue_cert("upstream.internal")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server = WSGIServer(("127.0.0.1", 0), echo_app, ssl_context=ctx, log=None, error_log=None)
    server.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        yield f"https://127.0.0.1:{server.address[1]}", str(ca_file), ca
    finally:
        server.stop(timeout=1)


def test_verified_tls_with_ca_and_server_hostname(proxy: Any, tls_upstream: Any) -> None:
    url, ca_file, _ = tls_upstream
    fwd = Forward(url, ca_certs=ca_file, server_hostname="upstream.internal")
    resp = HTTP.request("GET", proxy(fwd) + "/secure")
    assert resp.status == 200 and json.loads(resp.data)["path"] == "/secure"


def test_unverifiable_upstream_is_502_by_default(proxy: Any, tls_upstream: Any) -> None:
    url, ca_file, _ = tls_upstream
    # Right CA, but the certificate does not name 127.0.0.1.
    resp = HTTP.request("GET", proxy(Forward(url, ca_certs=ca_file)) + "/")
    assert resp.status == 502 and resp.data == b"TLS handshake with upstream failed\n"
    # Unknown CA.
    resp = HTTP.request("GET", proxy(Forward(url)) + "/")
    assert resp.status == 502 and resp.data == b"TLS handshake with upstream failed\n"


def test_insecure_opt_out(proxy: Any, tls_upstream: Any) -> None:
    url, _, _ = tls_upstream
    resp = HTTP.request("GET", proxy(Forward(url, insecure=True)) + "/")
    assert resp.status == 200


def test_client_certificate(proxy: Any, ca: trustme.CA, tmp_path: Path) -> None:
    server_cert = ca.issue_cert("127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(ctx)
    server = WSGIServer(("127.0.0.1", 0), echo_app, ssl_context=ctx, log=None, error_log=None)
    server.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("proxy.client")
    cert_file = tmp_path / "client.pem"
    key_file = tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    url = f"https://127.0.0.1:{server.address[1]}"
    try:
        with_cert = Forward(
            url, ca_certs=str(ca_file), cert_file=str(cert_file), key_file=str(key_file)
        )
        assert HTTP.request("GET", proxy(with_cert) + "/").status == 200
        without = Forward(url, ca_certs=str(ca_file))
        assert HTTP.request("GET", proxy(without) + "/").status == 502
    finally:
        server.stop(timeout=1)


def test_https_front_sets_forwarded_proto(
    ca: trustme.CA, echo_upstream: str, tmp_path: Path
) -> None:
    cert = ca.issue_cert("127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server = Server(Forward(echo_upstream), "127.0.0.1:0", ssl_context=ctx).start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        client = urllib3.PoolManager(retries=False, ca_certs=str(ca_file), timeout=10)
        resp = client.request("GET", f"https://127.0.0.1:{server.address[1]}/tls")
        doc = json.loads(resp.data)
        assert doc["headers"]["x-forwarded-proto"] == "https"
        assert doc["headers"]["x-forwarded-port"] == str(server.address[1])
    finally:
        server.stop(timeout=1)


def test_tls_failure_is_traced_with_its_cause(proxy: Any, tls_upstream: Any) -> None:
    from oxypy import Trace, UpstreamConnectError, UpstreamTLSError

    url, _, _ = tls_upstream
    lines: list[str] = []
    resp = HTTP.request("GET", proxy(Trace(Forward(url), sink=lines.append)) + "/")
    assert resp.status == 502 and resp.data == b"TLS handshake with upstream failed\n"
    wait_for(lambda: lines)
    rec = json.loads(lines[0])
    assert rec["error"] == "upstream_tls_error"
    assert rec["error_detail"].startswith("certificate verify failed: ")
    assert "_ssl.c" not in rec["error_detail"]
    assert rec["upstream"][0]["error"] == "upstream_tls_error"
    assert rec["upstream"][0]["error_detail"] == rec["error_detail"]
    assert issubclass(UpstreamTLSError, UpstreamConnectError)
    assert UpstreamTLSError().kind == "upstream_tls_error"


def test_refused_upstream_has_a_short_error_detail(proxy: Any) -> None:
    import socket

    from oxypy import Trace

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lines: list[str] = []
    resp = HTTP.request(
        "GET", proxy(Trace(Forward(f"http://127.0.0.1:{port}"), sink=lines.append)) + "/"
    )
    assert resp.status == 502
    wait_for(lambda: lines)
    rec = json.loads(lines[0])
    assert rec["error"] == "upstream_connect_error"
    assert rec["error_detail"] == "Connection refused"
