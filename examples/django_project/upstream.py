"""Django as an upstream behind oxypy, mounted under a prefix the proxy strips.

Run it (any WSGI server; the proxy in front is ``django_behind_proxy.py``)::

    cd examples
    oxypy serve django_project.upstream:application --listen 127.0.0.1:8000

``prefix_from_proxy`` is the five-line WSGI middleware that reads
``X-Forwarded-Prefix`` (sent by ``Forward`` when ``Router(strip=True)`` or
``Rewrite(strip_prefix=)`` removed a prefix) into ``SCRIPT_NAME``, so
``reverse()`` and redirects keep the browser under ``/app/``.  With a fixed
prefix, ``FORCE_SCRIPT_NAME = "/app"`` in the settings does the same.
Trust the header only when the app is reachable through the proxy alone.
"""

import os
from typing import Any

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")


def prefix_from_proxy(app: Any) -> Any:
    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        prefix = environ.get("HTTP_X_FORWARDED_PREFIX", "").split(",")[0].strip().rstrip("/")
        if prefix.startswith("/"):
            environ["SCRIPT_NAME"] = prefix
        return app(environ, start_response)

    return wrapped


application = prefix_from_proxy(get_wsgi_application())
