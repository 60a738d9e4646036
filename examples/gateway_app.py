r"""The WSGI gateway that ``gunicorn.conf.py`` serves (HTTP and WebSockets).

Run it with gunicorn's gevent worker, from this directory::

    cd examples
    OXYPY_UPSTREAMS=http://127.0.0.1:9001,http://127.0.0.1:9002 \
    OXYPY_WS_UPSTREAM=http://127.0.0.1:9003 OXYPY_LISTEN=127.0.0.1:8080 \
    gunicorn -c gunicorn.conf.py gateway_app:app
    curl -i http://127.0.0.1:8080/
    # ws://127.0.0.1:8080/ws/... is tunnelled to OXYPY_WS_UPSTREAM (path kept)

``Forward`` tunnels ``Upgrade: websocket`` requests: under ``-k gevent`` it
takes over ``gunicorn.socket`` after the upstream's ``101`` and copies bytes
both ways until either side closes.  No ``monkey.patch_all()`` here: the
gevent worker patches the process before it imports this module.
"""

import os

from oxypy import Buffer, Forward, RequestID, RoundRobin, Router, Trace

UPSTREAMS = os.environ.get("OXYPY_UPSTREAMS", "http://127.0.0.1:9001,http://127.0.0.1:9002")
WS_UPSTREAM = os.environ.get("OXYPY_WS_UPSTREAM", "http://127.0.0.1:9003")

servers = [url.strip() for url in UPSTREAMS.split(",") if url.strip()]
# Plain HTTP: balanced, buffered and retried once on a network error.
http = Buffer(
    RoundRobin(Forward(), servers),
    retry="IsNetworkError() && Attempts() < 2",
)
# WebSockets under /ws/: streamed and tunnelled (Forward relays the 101, then bytes).
websockets = Forward(WS_UPSTREAM, tunnel_idle_timeout=600.0)

app = Trace(RequestID(Router([(None, "/ws", websockets)], default=http)))
