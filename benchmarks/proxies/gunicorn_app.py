"""The WSGI app ``launch.py gunicorn`` serves: an ``oxypy_chain.py`` chain.

``OXYPY_BENCH_CHAIN`` names the chain (``forward``, ``full``...) and
``OXYPY_BENCH_UPSTREAMS`` its comma-separated upstream URLs.  Loaded in the
gunicorn worker after the worker monkey-patched the process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from oxypy_chain import build  # noqa: E402

app = build(os.environ["OXYPY_BENCH_CHAIN"], os.environ["OXYPY_BENCH_UPSTREAMS"].split(","), None)
