"""A real WebSocket upstream for the tunnel tests, built on wsproto over gevent sockets.

It echoes every message part as it arrives (so fragmentation survives), answers
pings, negotiates the first offered subprotocol and permessage-deflate, and
obeys a few text commands: ``close-me`` (closes with 4001 "bye"), ``ping-me``
(sends a ping with payload ``from-server``) and ``drop-me`` (drops TCP).
"""

from __future__ import annotations

import socket
from typing import Any

from gevent.server import StreamServer
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate


class WSEchoUpstream:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.closed_codes: list[int | None] = []
        self.open_connections = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.address[1]}"

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def _handle(self, sock: socket.socket, addr: Any) -> None:
        self.open_connections += 1
        ws = WSConnection(ConnectionType.SERVER)
        try:
            while True:
                data = sock.recv(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, Request):
                        self.requests.append(event)
                        sub = event.subprotocols[0] if event.subprotocols else None
                        sock.sendall(
                            ws.send(
                                AcceptConnection(subprotocol=sub, extensions=[PerMessageDeflate()])
                            )
                        )
                    elif isinstance(event, TextMessage):
                        if event.data == "close-me":
                            sock.sendall(ws.send(CloseConnection(code=4001, reason="bye")))
                        elif event.data == "ping-me":
                            sock.sendall(ws.send(Ping(b"from-server")))
                        elif event.data == "drop-me":
                            sock.close()
                            return
                        else:
                            sock.sendall(
                                ws.send(
                                    Message(
                                        data=event.data, message_finished=event.message_finished
                                    )
                                )
                            )
                    elif isinstance(event, BytesMessage):
                        sock.sendall(
                            ws.send(
                                Message(data=event.data, message_finished=event.message_finished)
                            )
                        )
                    elif isinstance(event, Ping):
                        sock.sendall(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.closed_codes.append(event.code)
                        try:
                            sock.sendall(ws.send(event.response()))
                        except Exception:  # noqa: BLE001 - the peer may be gone already
                            pass
                        return
                if not data:
                    self.closed_codes.append(None)
                    return
        except OSError:
            self.closed_codes.append(None)
        finally:
            self.open_connections -= 1
            sock.close()
