r"""Flask under ``/app/`` behind oxypy, with werkzeug's ``ProxyFix``.

Run it (Flask installed)::

    OXYPY_LISTEN=127.0.0.1:8080 python examples/flask_behind_proxy.py
    curl -i http://127.0.0.1:8080/app/            # the login form, action /app/login
    curl -i -d user=alice http://127.0.0.1:8080/app/login
    # 302 Location: http://127.0.0.1:8080/app/welcome

For the demo the Flask upstream runs in the same process on
``OXYPY_FLASK_LISTEN`` (default: a free port); in production it is its own
gunicorn.  ``Router(strip=True)`` removes ``/app`` and ``Forward`` sends it as
``X-Forwarded-Prefix``, with the client's address in ``X-Forwarded-Host`` and
``-Proto``; ``ProxyFix(x_prefix=1, x_host=1, x_proto=1)`` makes Flask build
every URL (``url_for``, ``_external=True``, redirects) from them.  Without
``ProxyFix`` Forward's ``rewrite_location`` still fixes the ``Location`` of
redirects, but not the links inside pages.
"""

from gevent import monkey

monkey.patch_all()  # before anything opens a socket

import os  # noqa: E402
from typing import Any  # noqa: E402

from flask import Flask, redirect, request, session, url_for  # noqa: E402
from werkzeug.middleware.proxy_fix import ProxyFix  # noqa: E402

from oxypy import Forward, Router, Trace  # noqa: E402
from oxypy.server import Server  # noqa: E402

LISTEN = os.environ.get("OXYPY_LISTEN", "127.0.0.1:8080")
FLASK_LISTEN = os.environ.get("OXYPY_FLASK_LISTEN", "127.0.0.1:0")

app = Flask(__name__)
app.secret_key = os.environ.get("FLASK_SECRET_KEY", "example-only-not-secret")
# Trust one proxy's X-Forwarded-For/-Proto/-Host/-Prefix: oxypy's Forward.
app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_prefix=1)  # type: ignore[method-assign]


@app.route("/")
def index() -> str:
    return f'<form method="post" action="{url_for("login")}"><input name="user"></form>'


@app.route("/login", methods=["POST"])
def login() -> Any:
    session["user"] = request.form.get("user", "")
    return redirect(url_for("welcome", _external=True))


@app.route("/welcome")
def welcome() -> dict[str, Any]:
    return {
        "welcome": session.get("user"),
        "home": url_for("index", _external=True),
        "client": request.remote_addr,
    }


def main() -> None:
    upstream = Server(app, FLASK_LISTEN).start()
    proxy = Server(Trace(Router([(None, "/app", Forward(upstream.url))], strip=True)), LISTEN)
    try:
        proxy.serve_forever()
    finally:
        upstream.stop(timeout=2)


if __name__ == "__main__":
    main()
