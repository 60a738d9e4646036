"""Deprecated alias of :mod:`oxypy.rolling` (the rolling in-memory metrics).

.. deprecated:: 0.2
   ``oxypy.metrics`` was renamed :mod:`oxypy.rolling` so that it no longer
   reads like :class:`oxypy.Metrics` (Prometheus).  Import from
   ``oxypy.rolling``; this alias will be removed in 1.0.
"""

from __future__ import annotations

import warnings

from .rolling import *  # noqa: F403
from .rolling import __all__ as __all__

warnings.warn(
    "oxypy.metrics is deprecated; import from oxypy.rolling",
    DeprecationWarning,
    stacklevel=2,
)
