"""WebSocket tunnelling through Forward on oxypy's server: byte-level and transparent.

LintMiddleware stays out of these tests on purpose: its ``wsgi.input`` wrapper
offers only ``read(n)``, which blocks for ``n`` bytes, while a tunnel must
relay whatever arrived.  Everything else is real: a wsproto upstream, the
websocket-client library as the client, and raw sockets.
"""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import websocket

from oxypy import Forward

from _servers import raw_request, wait_for
from _ws import WSEchoUpstream


@pytest.fixture
def ws_upstream() -> Iterator[WSEchoUpstream]:
    up = WSEchoUpstream()
    try:
        yield up
    finally:
        up.stop()


def ws_url(http_url: str, path: str = "/ws") -> str:
    return "ws://" + http_url.split("//", 1)[1] + path


def connect(http_url: str, path: str = "/ws", **kw: Any) -> websocket.WebSocket:
    return websocket.create_connection(ws_url(http_url, path), timeout=5, **kw)


def test_text_and_binary_echo(proxy: Any, ws_upstream: WSEchoUpstream) -> None:
    ws = connect(proxy(Forward(ws_upstream.url), lint=False))
    try:
        ws.send("OK")
        assert ws.recv() == "OK"
        payload = bytes(range(256)) * 4096  # 1 MiB binary
        ws.send_binary(payload)
        assert ws.recv() == payload
    finally:
        ws.close()


def test_fragmented_message_is_relayed(proxy: Any, ws_upstream: WSEchoUpstream) -> None:
    ws = connect(proxy(Forward(ws_upstream.url), lint=False))
    try:
        ws.send_frame(websocket.ABNF.create_frame("hel", websocket.ABNF.OPCODE_TEXT, fin=0))
        ws.send_frame(websocket.ABNF.create_frame("lo ", websocket.ABNF.OPCODE_CONT, fin=0))
        ws.send_frame(websocket.ABNF.create_frame("world", websocket.ABNF.OPCODE_CONT, fin=1))
        assert ws.recv() == "hello world"
    finally:
        ws.close()


def test_ping_pong_in_both_directions(proxy: Any, ws_upstream: WSEchoUpstream) -> None:
    ws = connect(proxy(Forward(ws_upstream.url), lint=False))
    try:
        ws.ping("Ping")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_PONG and frame.data == b"Ping"
        ws.send("ping-me")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_PING and frame.data == b"from-server"
    finally:
        ws.close()


def test_close_code_from_upstream_reaches_client(proxy: Any, ws_upstream: WSEchoUpstream) -> None:
    ws = connect(proxy(Forward(ws_upstream.url), lint=False))
    ws.send("close-me")
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 4001 and frame.data[2:] == b"bye"
    ws.shutdown()  # type: ignore[no-untyped-call]  # the close handshake is done: just drop the socket


def test_close_code_from_client_reaches_upstream(proxy: Any, ws_upstream: WSEchoUpstream) -> None:
    ws = connect(proxy(Forward(ws_upstream.url), lint=False))
    ws.send("x")
    ws.recv()
    ws.close(status=4100)
    wait_for(lambda: ws_upstream.closed_codes)
    assert ws_upstream.closed_codes == [4100]


def test_subprotocol_and_handshake_headers(proxy: Any, ws_upstream: WSEchoUpstream) -> None:
    url = proxy(Forward(ws_upstream.url, pass_host_header=True), lint=False)
    ws = connect(
        url,
        "/ws/%3A%2F%2F?query=test",
        subprotocols=["chat", "superchat"],
        host="front.example",
        header=["X-Forwarded-For: 1.2.3.4"],
    )
    try:
        assert ws.subprotocol == "chat"
        ws.send("hi")
        assert ws.recv() == "hi"
    finally:
        ws.close()
    (req,) = ws_upstream.requests
    assert req.target == "/ws/%3A%2F%2F?query=test"
    assert req.host == "front.example"
    extra = {k.decode().lower(): v.decode() for k, v in req.extra_headers}
    assert extra["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
    assert extra["x-forwarded-proto"] == "http"


def test_extensions_are_negotiated_end_to_end(proxy: Any, ws_upstream: WSEchoUpstream) -> None:
    url = proxy(Forward(ws_upstream.url), lint=False)
    out = raw_request(
        url,
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    )
    head = out.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 101 ")
    assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head
    assert b"sec-websocket-extensions: permessage-deflate" in head
    assert b"upgrade: websocket" in head and b"connection: upgrade" in head


def test_refused_upgrade_passes_status_and_body(proxy: Any, pywsgi: Any) -> None:
    def no_ws(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("400 Bad Request", [("Content-Type", "text/plain"), ("Content-Length", "9")])
        return [b"no ws pls"]

    url = proxy(Forward(pywsgi(no_ws)), lint=False)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect(url)
    assert info.value.status_code == 400
    assert info.value.resp_body == b"no ws pls"


def _live_greenlets() -> set[gevent.Greenlet]:
    return {o for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead}


def test_abrupt_client_close_frees_everything(proxy: Any, ws_upstream: WSEchoUpstream) -> None:
    url = proxy(Forward(ws_upstream.url), lint=False)
    ws = connect(url)
    ws.send("warm")
    ws.recv()
    ws.close()
    wait_for(lambda: ws_upstream.open_connections == 0)
    baseline = _live_greenlets()  # a set: greenlets ending meanwhile do not count
    for _ in range(10):
        ws = connect(url)
        ws.send("x")
        assert ws.recv() == "x"
        assert ws.sock is not None
        ws.sock.shutdown(socket.SHUT_RDWR)  # TCP drop, no close frame
        ws.sock.close()
    wait_for(lambda: ws_upstream.open_connections == 0, timeout=5)
    wait_for(lambda: not _live_greenlets() - baseline, timeout=5)


def test_abrupt_upstream_close_ends_the_client_side(
    proxy: Any, ws_upstream: WSEchoUpstream
) -> None:
    ws = connect(proxy(Forward(ws_upstream.url), lint=False))
    ws.send("drop-me")
    start = time.monotonic()
    with pytest.raises((websocket.WebSocketConnectionClosedException, OSError)):
        ws.recv()
        ws.recv()
    assert time.monotonic() - start < 2
    ws.close()


def test_tunnel_through_middleware_choosing_the_target(
    proxy: Any, ws_upstream: WSEchoUpstream
) -> None:
    fwd = Forward()

    def balancer(environ: dict[str, Any], start_response: Any) -> Any:
        environ = dict(environ)
        environ["oxypy.target"] = ws_upstream.url
        return fwd(environ, start_response)

    ws = connect(proxy(balancer, lint=False))
    try:
        ws.send("through")
        assert ws.recv() == "through"
    finally:
        ws.close()
