"""``python -m oxypy``: the ``oxypy`` console script (see :mod:`oxypy.cli`).

The package's first import, ``oxypy._cli.boot``, patched the process with gevent before
anything imported ``ssl``; nothing re-executes.
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
