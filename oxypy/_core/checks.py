"""Checks shared by the blocks: one wording for one mistake.

:func:`finite_number` checks an option at construction; :func:`unpatched_greenlet`
tells a process running gevent without its patch (the server refuses to
start, Forward to forward), with :data:`UNPATCHED`, the one message saying
what to do.
"""

from __future__ import annotations

import math

from ..exceptions import ConfigurationError

__all__ = ["UNPATCHED", "finite_number", "unpatched_greenlet"]

#: What to do when gevent runs in a process it did not patch.
UNPATCHED = (
    "the process is not monkey-patched by gevent, so one request waiting on an "
    "upstream blocks every other one: put "
    "`from gevent import monkey; monkey.patch_all()` on the first lines of your "
    "program, before any other import (the `oxypy` command and "
    "`gunicorn -k oxypy.gunicorn.Worker` do it for you)"
)


def unpatched_greenlet() -> bool:
    """True when this code runs in a gevent greenlet of a process whose
    ``socket`` module gevent did not patch.

    There a blocking socket call (Forward's upstream exchange) stops the hub,
    so every other request waits for it.  Under real threads (werkzeug's
    threaded server, gunicorn's sync and gthread workers) or in a patched
    process it is False: blocking sockets are then what is wanted.
    """
    from gevent import Greenlet, getcurrent, monkey

    return not monkey.is_module_patched("socket") and isinstance(getcurrent(), Greenlet)


def finite_number(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float when it is a finite number ``>= 0`` (``> 0`` with
    ``positive``); otherwise :class:`ConfigurationError` naming the option.

    ``True``/``False`` are refused although they are ints: a flag passed where
    a number belongs is a mistake, not 1 or 0.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)
