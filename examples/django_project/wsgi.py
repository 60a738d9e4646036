r"""Django's WSGI application wrapped in oxypy blocks, with ``/api/*`` proxied.

Run it from the ``examples`` directory with oxypy's server (or gunicorn)::

    cd examples
    OXYPY_UPSTREAM=http://127.0.0.1:9000 oxypy serve django_project.wsgi:application \
        --listen 127.0.0.1:8080
    # or: gunicorn -k gevent django_project.wsgi:application
    curl -i http://127.0.0.1:8080/hello/       # answered by Django
    curl -i http://127.0.0.1:8080/api/users    # forwarded to the upstream as /users

The wrapping is the same as for any WSGI app: Django stays untouched, and the
chain decides per request whether Django or the upstream answers.
"""

import os

from django.core.wsgi import get_wsgi_application

from oxypy import ConnLimit, Forward, Rate, RateLimit, RequestID, Router, Trace

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")

django_app = get_wsgi_application()
upstream = os.environ.get("OXYPY_UPSTREAM", "http://127.0.0.1:9000")

routed = Router([(None, "/api", Forward(upstream))], default=django_app, strip=True)
application = Trace(
    RequestID(
        ConnLimit(
            RateLimit(routed, rates=[Rate(50, 1.0, burst=100)], source="client.ip"),
            max_conns=50,
            source="client.ip",
        )
    )
)
