r"""A Flask app wrapped in oxypy blocks, with ``/api/*`` proxied to an upstream.

Run it (Flask installed; an upstream listening on the URL you give)::

    OXYPY_UPSTREAM=http://127.0.0.1:9000 OXYPY_LISTEN=127.0.0.1:8080 \
        python examples/flask_wrapped.py
    curl -i http://127.0.0.1:8080/            # answered by Flask
    curl -i http://127.0.0.1:8080/api/users   # forwarded to the upstream as /users

Flask keeps its own routes; ``app.wsgi_app`` is replaced by a chain in which a
``Router`` sends ``/api`` (prefix stripped) to ``Forward`` and everything else
to Flask, behind a rate limit, a request id and one Trace JSON line per
request on stderr.  Served by oxypy's embedded gevent server.
"""

from gevent import monkey

monkey.patch_all()  # before anything opens a socket

import os  # noqa: E402

from flask import Flask, request  # noqa: E402

from oxypy import Forward, Rate, RateLimit, RequestID, Router, Trace, serve  # noqa: E402

UPSTREAM = os.environ.get("OXYPY_UPSTREAM", "http://127.0.0.1:9000")
LISTEN = os.environ.get("OXYPY_LISTEN", "127.0.0.1:8080")

app = Flask(__name__)


@app.route("/")
def index() -> dict[str, str]:
    return {"hello": "from flask", "request_id": request.headers.get("X-Request-Id", "")}


# /api/<anything> -> UPSTREAM/<anything>; the rest stays with Flask.
proxied = Router([(None, "/api", Forward(UPSTREAM))], default=app.wsgi_app, strip=True)
limited = RateLimit(proxied, rates=[Rate(20, 1.0, burst=40)], source="client.ip")
app.wsgi_app = Trace(RequestID(limited))  # type: ignore[method-assign]

if __name__ == "__main__":
    serve(app, LISTEN)
