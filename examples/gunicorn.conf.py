r"""gunicorn settings for ``gateway_app:app`` with the gevent worker (WebSockets work).

Run from this directory::

    cd examples
    OXYPY_UPSTREAMS=http://127.0.0.1:9001 OXYPY_LISTEN=127.0.0.1:8080 \
    gunicorn -c gunicorn.conf.py gateway_app:app

``worker_class = "gevent"`` is what makes a proxy viable under gunicorn: each
request (and each WebSocket tunnel) is a greenlet, so thousands of slow
upstream calls and idle sockets cost no threads.  oxypy's ``Forward`` detects
gunicorn's gevent worker and hijacks ``gunicorn.socket`` for WebSocket tunnels.
"""

import os

bind = [os.environ.get("OXYPY_LISTEN", "127.0.0.1:8080")]
worker_class = "gevent"
workers = int(os.environ.get("OXYPY_WORKERS", "1"))
worker_connections = 1000  # greenlets (concurrent requests + tunnels) per worker
# A WebSocket tunnel can stay open for hours; gevent workers heartbeat on their own,
# so the timeout only catches a worker that blocked the event loop.
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = None  # Trace writes one JSON line per request to stderr instead
loglevel = "info"
# gunicorn >= 27 opens a control socket by default; a gateway does not need it.
control_socket_disable = True
