"""The gateway of ``gateway.toml`` as a WSGI app, for gunicorn.

Run it with gunicorn's gevent worker (gunicorn binds; the file's
``[[listeners]]`` are not used), from this directory::

    cd examples
    OXYPY_CONFIG=gateway.toml gunicorn -k gevent -b 127.0.0.1:8080 gateway_toml_app:app

Each worker watches the file and reloads it when it changes: an edit with
errors is logged (logger ``oxypy.config``) and the running configuration
stays.  ``oxypy check gateway.toml`` validates a file before you save it.
"""

import os

from oxypy import load_app

app = load_app(os.environ.get("OXYPY_CONFIG", "gateway.toml"))
