"""A lock for short critical sections that never switch greenlets.

Once gevent has monkey-patched a process, ``threading.Lock()`` is gevent's
cooperative lock, written in Python: about three times the cost of the C
lock per ``with`` block, paid several times per proxied request by the
in-memory stores and rolling metrics.  A section that cannot yield to the
hub (no I/O, no logging, no user callback that might block) is never
entered by a second greenlet of the same thread while the first holds it,
so the original C lock of ``_thread`` guards it just as well, against other
OS threads too.  Anything that may block or log inside the section must use
``threading.Lock()`` instead.
"""

from __future__ import annotations

import _thread
import sys
import threading

__all__ = ["short_lock"]


def short_lock() -> _thread.LockType:
    """The C lock (the original one under gevent) for a section that never yields."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        allocate: object = monkey.get_original("_thread", "allocate_lock")
        if callable(allocate):
            lock: _thread.LockType = allocate()
            return lock
    return threading.Lock()
