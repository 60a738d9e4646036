"""``python -m oxypy``: the ``oxypy`` console script (see :mod:`oxypy.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
