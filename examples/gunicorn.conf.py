r"""gunicorn settings for ``gateway_app:app`` with oxypy's worker (WebSockets work).

Run from this directory::

    cd examples
    OXYPY_UPSTREAMS=http://127.0.0.1:9001 OXYPY_LISTEN=127.0.0.1:8080 \
    gunicorn -c gunicorn.conf.py gateway_app:app

``worker_class = "oxypy.gunicorn.Worker"``: gunicorn manages the processes
and oxypy's strict server (the one ``oxypy.serve`` runs) handles the
connections; each request (and each WebSocket tunnel) is a greenlet, so
thousands of slow upstream calls and idle sockets cost no threads.
``worker_class = "gevent"`` works too (gunicorn's own, more lenient parser;
``Forward`` then hijacks ``gunicorn.socket`` for WebSocket tunnels).
"""

import os

bind = [os.environ.get("OXYPY_LISTEN", "127.0.0.1:8080")]
worker_class = "oxypy.gunicorn.Worker"
workers = int(os.environ.get("OXYPY_WORKERS", "1"))
worker_connections = 1000  # open connections per worker (oxypy max_connections)
# A WebSocket tunnel can stay open for hours; the worker heartbeats on its own,
# so the timeout only catches a worker that blocked the event loop.
timeout = 30
graceful_timeout = 10
keepalive = 5  # seconds an idle keep-alive connection is kept
accesslog = None  # Trace writes one JSON line per request to stderr instead
loglevel = "info"
# gunicorn >= 27 opens a control socket by default; a gateway does not need it.
control_socket_disable = True
