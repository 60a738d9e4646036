"""Shared bits of the benchmark proxy entry scripts (gevent is patched by the caller).

Every script takes the upstream base URL as its only positional argument,
binds 127.0.0.1 on a free port (or ``--port``), prints ``READY <port>`` on
stdout once it accepts connections, and serves until killed.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any


def parse_args(description: str, *, plain_flag: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("upstream", help="upstream base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick one)")
    if plain_flag:
        parser.add_argument(
            "--plain",
            action="store_true",
            help="gevent.pywsgi's stock handler (Nagle on) instead of one setting TCP_NODELAY",
        )
    return parser.parse_args()


def ready(port: int) -> None:
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def serve_pywsgi(app: Any, port: int, *, nodelay: bool = True) -> None:
    """Serve ``app`` on gevent.pywsgi; with ``nodelay`` accepted sockets get TCP_NODELAY.

    pywsgi writes a streamed response's head and body (and the chunked
    terminator) in separate sends; with Nagle's algorithm on, a keep-alive
    client's delayed ACK then stalls each response for ~40 ms.  The fair
    comparison sets TCP_NODELAY, as Go, nginx and oxypy's Server do.
    """
    from gevent.pywsgi import WSGIHandler, WSGIServer

    class NoDelayHandler(WSGIHandler):  # type: ignore[misc]
        def handle(self) -> Any:
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            return super().handle()

    handler = NoDelayHandler if nodelay else WSGIHandler
    server = WSGIServer(("127.0.0.1", port), app, handler_class=handler, log=None)
    server.init_socket()
    ready(server.address[1])
    server.serve_forever()
