"""Message-level WebSocket relay for apps running under gevent-websocket.

gevent-websocket's handler answers the client's handshake itself (its own
``Sec-WebSocket-Accept``) before the app runs, so no byte-level tunnel is
possible: the client side is a ``wsgi.websocket`` object.  Forward still sends
the handshake upstream and, after the upstream's 101, acts as a WebSocket
*client* there: messages are copied both ways, text stays text and binary
stays binary, pings are answered, and a close (with its code) on either side
ends both.  Extensions are not negotiated upstream in this mode.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable
from typing import Any

import gevent

from .._core.exchange import Exchange

__all__ = ["relay_messages"]


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: Largest message relayed (gevent-websocket itself has no cap).
MAX_MESSAGE = 16 * 1024 * 1024


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 §5.2)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the repeating 4-byte ``mask`` (one big-int operation)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class FrameReader:
    """Reads the upstream's (unmasked) frames and reassembles messages."""

    def __init__(self, sock: Any, leftover: bytes) -> None:
        self.sock = sock
        self.buf = bytearray(leftover)

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._need(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._need(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._need(8))
        if length > MAX_MESSAGE:
            raise ValueError("frame too large")
        mask = self._need(4) if b1 & 0x80 else None
        payload = self._need(length) if length else b""
        if mask:
            payload = apply_mask(payload, mask)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def message(self) -> tuple[int, bytes]:
        """The next data or close message as (opcode, payload); answers pings."""
        parts: list[bytes] = []
        first = None
        while True:
            fin, opcode, payload = self.frame()
            if opcode == OP_PING:
                self.sock.sendall(encode_frame(OP_PONG, payload))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                return OP_CLOSE, payload
            if opcode != OP_CONT:
                first = opcode
            parts.append(payload)
            if sum(len(p) for p in parts) > MAX_MESSAGE:
                raise ValueError("message too large")
            if fin:
                return first or OP_BINARY, b"".join(parts)


def _client_to_upstream(ws: Any, upstream: Any) -> None:
    try:
        while True:
            message = ws.receive()
            if message is None:
                code = getattr(ws, "close_code", None) or 1000
                upstream.sendall(encode_frame(OP_CLOSE, struct.pack("!H", code)))
                return
            if isinstance(message, str):
                upstream.sendall(encode_frame(OP_TEXT, message.encode("utf-8")))
            else:
                upstream.sendall(encode_frame(OP_BINARY, bytes(message)))
    except Exception:  # noqa: BLE001 - the client side ended; the relay closes both
        return


def relay_messages(
    environ: Any, upstream: Any, leftover: bytes, record: Exchange
) -> Iterable[bytes]:
    """Relay messages between ``environ["wsgi.websocket"]`` and the upstream socket."""
    ws = environ["wsgi.websocket"]
    reader = FrameReader(upstream, leftover)
    pump = gevent.spawn(_client_to_upstream, ws, upstream)
    try:
        while True:
            opcode, payload = reader.message()
            record.bytes_received += len(payload)
            if opcode == OP_CLOSE:
                # gevent-websocket's close() drops its code argument and
                # stringifies bytes: send the close frame (code + reason) as is.
                try:
                    ws.send_frame(payload, ws.OPCODE_CLOSE)
                finally:
                    ws.closed = True
                break
            if opcode == OP_TEXT:
                ws.send(payload.decode("utf-8", "replace"))
            else:
                ws.send(payload, binary=True)
    except (EOFError, OSError, ValueError):
        try:
            ws.close(1011 if not ws.closed else 1000)
        except Exception:  # noqa: BLE001 - already gone
            pass
    finally:
        pump.kill(block=True, timeout=1)
        record.ended = time.monotonic()
        try:
            upstream.close()
        except OSError:
            pass
    return []
