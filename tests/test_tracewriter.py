"""Trace's writer: process-wide exit and fork handlers installed once, writers held weakly."""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import weakref

from oxypy.trace import Trace

COUNT_HANDLERS = """
import atexit, os, sys
from oxypy._core.tracewriter import TraceWriter  # imports done: count only what writers add

registered = {"atexit": 0, "fork": 0}
real_atexit, real_fork = atexit.register, os.register_at_fork

def count_atexit(*args, **kwargs):
    registered["atexit"] += 1
    return real_atexit(*args, **kwargs)

def count_fork(**kwargs):
    registered["fork"] += 1
    return real_fork(**kwargs)

atexit.register, os.register_at_fork = count_atexit, count_fork
writers = [TraceWriter(sys.stdout, 16) for _ in range(100)]
print(registered["atexit"], registered["fork"], flush=True)
writers = writers[:2] + [TraceWriter(sys.stdout, 16) for _ in range(100)]
print(registered["atexit"], registered["fork"], flush=True)

writers[0].thread = writers[1].thread = object()  # not started: lines stay queued
writers[0].put("one")
writers[1].put("two")
pid = os.fork()
if pid == 0:  # the child inherits no queue and no writer thread
    state = [(len(w.pending), w.thread) for w in writers[:2]]
    print("child", state, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", [len(w.pending) for w in writers[:2]], flush=True)
"""


def test_handlers_are_installed_once_per_process() -> None:
    out = subprocess.run(
        [sys.executable, "-c", COUNT_HANDLERS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    # 100 writers, then 100 more: one exit and one fork handler in all; the
    # child starts empty; at exit the parent's queued lines are written.
    assert out[:4] == ["1 1", "1 1", "child [(0, None), (0, None)]", "parent [1, 1]"]
    assert sorted(out[4:]) == ["one", "two"]


def test_a_closed_writer_is_not_kept_alive() -> None:
    sink = io.StringIO()
    trace = Trace(lambda e, s: [], sink=sink)
    trace.emit({"n": 1})
    trace.close()
    assert sink.getvalue() == '{"n":1}\n'
    ref = weakref.ref(trace._writer)
    del trace
    gc.collect()
    assert ref() is None
