r"""Django under ``/app/`` behind oxypy: redirects, CSRF and cookies work unchanged.

Run it from the ``examples`` directory (Django installed)::

    cd examples
    OXYPY_LISTEN=127.0.0.1:8080 python django_behind_proxy.py
    curl -i http://127.0.0.1:8080/app/login/       # Django's form, action /app/login/

For the demo the Django upstream runs in the same process on
``OXYPY_DJANGO_LISTEN`` (default: a free port); in production it is its own
gunicorn or ``oxypy serve django_project.upstream:application``.

What makes it work (see docs/apps.md):

* ``Router(strip=True)`` removes ``/app`` and ``Forward`` sends it as
  ``X-Forwarded-Prefix``; ``django_project.upstream`` turns that into
  ``SCRIPT_NAME``, so ``reverse()`` gives ``/app/...``.
* ``Forward`` sends the upstream's name in ``Host`` and the client's in
  ``X-Forwarded-Host``; ``USE_X_FORWARDED_HOST = True`` lets Django's CSRF
  origin check and ``build_absolute_uri()`` see the client's address
  (without it every POST is refused with 403 "Origin checking failed").
* ``cookie_path={"/": "/app/"}`` scopes Django's cookies to the mount.
"""

from gevent import monkey

monkey.patch_all()  # before anything opens a socket

import os  # noqa: E402

from oxypy import Forward, Router, Trace  # noqa: E402
from oxypy.server import Server  # noqa: E402

LISTEN = os.environ.get("OXYPY_LISTEN", "127.0.0.1:8080")
DJANGO_LISTEN = os.environ.get("OXYPY_DJANGO_LISTEN", "127.0.0.1:0")


def main() -> None:
    from django_project.upstream import application as django_app

    upstream = Server(django_app, DJANGO_LISTEN).start()
    forward = Forward(upstream.url, cookie_path={"/": "/app/"})
    proxy = Server(Trace(Router([(None, "/app", forward)], strip=True)), LISTEN)
    try:
        proxy.serve_forever()
    finally:
        upstream.stop(timeout=2)


if __name__ == "__main__":
    main()
