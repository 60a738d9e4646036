"""A WebSocket chat room (the upstream) with oxypy proxying in front of it.

Run it, then open http://127.0.0.1:8080/ in two browser tabs::

    OXYPY_LISTEN=127.0.0.1:8080 python examples/websocket_chat.py

Two servers run in this one process:

* the chat upstream, on gevent-websocket (``pip install gevent-websocket``),
  on a free 127.0.0.1 port: every text message a client sends is broadcast
  to every connected client;
* the gateway on ``OXYPY_LISTEN``, oxypy's embedded server: a ``Router``
  answers ``/`` with a tiny HTML page and sends ``/chat`` through
  ``Trace`` to ``Forward``, which tunnels the WebSocket to the upstream.
"""

from gevent import monkey

monkey.patch_all()  # before anything opens a socket

import os  # noqa: E402
from typing import Any  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket import WebSocketError  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

from oxypy import Forward, Router, Trace, serve  # noqa: E402

LISTEN = os.environ.get("OXYPY_LISTEN", "127.0.0.1:8080")

PAGE = b"""<!doctype html><meta charset="utf-8"><title>oxypy chat</title>
<pre id="log"></pre><input id="msg" autofocus placeholder="say something, press Enter">
<script>
const ws = new WebSocket(location.origin.replace(/^http/, "ws") + "/chat");
const log = document.getElementById("log");
ws.onmessage = (e) => { log.textContent += e.data + "\\n"; };
document.getElementById("msg").onkeydown = (e) => {
  if (e.key === "Enter" && e.target.value) { ws.send(e.target.value); e.target.value = ""; }
};
</script>
"""


class ChatRoom:
    """The upstream WSGI app: a set of sockets and a broadcast loop per client."""

    def __init__(self) -> None:
        self.clients: set[Any] = set()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"WebSocket only\n"]
        self.clients.add(ws)
        try:
            while True:
                message = ws.receive()
                if message is None:  # closed
                    break
                for client in list(self.clients):
                    try:
                        client.send(message)
                    except WebSocketError:
                        self.clients.discard(client)
        finally:
            self.clients.discard(ws)
        return []


def page(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response(
        "200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(PAGE)))]
    )
    return [PAGE]


def main() -> None:
    upstream = WSGIServer(("127.0.0.1", 0), ChatRoom(), handler_class=WebSocketHandler, log=None)
    upstream.start()
    upstream_url = f"http://127.0.0.1:{upstream.address[1]}"
    gateway = Router([(None, "/chat", Trace(Forward(upstream_url)))], default=page)
    print(f"chat upstream on {upstream_url}; open http://{LISTEN}/", flush=True)
    try:
        serve(gateway, LISTEN)
    finally:
        upstream.stop(timeout=1)


if __name__ == "__main__":
    main()
