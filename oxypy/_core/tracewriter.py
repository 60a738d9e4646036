"""Trace's writer: a bounded buffer drained by one background thread (a greenlet under gevent).

A request only appends its record to a deque and, when the writer sleeps,
wakes it; the writer takes everything queued at once, renders the records
into lines (``render``: the encoding runs a batch at a time, off the request
path) and hands file sinks one write and one flush per batch, so a busy proxy
pays no system call per line and a slow sink never blocks a request: past
``size`` records waiting, new ones are dropped and counted.  After each
batch the writer pauses briefly (:attr:`TraceWriter.interval`), so a busy
proxy wakes it a few dozen times a second rather than once per request.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from ..exceptions import ConfigurationError

__all__ = ["TraceWriter"]

log = logging.getLogger("oxypy.trace")

_STOP = "\x00stop"

# Process-wide by nature: one atexit and one after-fork handler for every
# writer, installed when the first writer is made.  Writers are held weakly,
# so a writer dropped by its Trace is collected, never kept alive by them.
_writers: weakref.WeakSet[TraceWriter] = weakref.WeakSet()
_hooks_lock = threading.Lock()
_hooks_installed = False


def _track(writer: TraceWriter) -> None:
    global _hooks_installed
    with _hooks_lock:
        if not _hooks_installed:
            os.register_at_fork(after_in_child=_after_fork_in_child)
            atexit.register(_flush_at_exit)
            _hooks_installed = True
        _writers.add(writer)


def _after_fork_in_child() -> None:
    global _hooks_lock
    _hooks_lock = threading.Lock()  # a thread of the parent may have held it
    for writer in list(_writers):
        writer._after_fork()


def _flush_at_exit() -> None:
    """Lines still queued when the process ends are written."""
    for writer in list(_writers):
        writer.flush()


class TraceWriter:
    """Queue records for ``sink`` (a file-like, a ``logging.Logger`` or a callable).

    ``render(record) -> str`` makes a record's line in the writer (default:
    records are lines already); a record it raises on is logged and skipped.
    """

    #: Pause after each batch, so that under load lines gather into batches
    #: instead of waking the writer (and the sink) once per request.
    interval = 0.02

    def __init__(self, sink: Any, size: int, render: Callable[[Any], str] | None = None) -> None:
        self.render = render
        self.batch: Callable[[list[str]], None]
        if isinstance(sink, logging.Logger):
            self.batch = self._each_line(sink.info)
        elif hasattr(sink, "write"):
            self.batch = self._file_batch(sink)
        elif callable(sink):
            self.batch = self._each_line(sink)
        else:
            raise ConfigurationError("sink must be a file-like, a logging.Logger or a callable")
        self.size = size
        self.lock = threading.Lock()
        self.pending: deque[Any] = deque()
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self.dropped = 0
        self.failed = 0
        _track(self)

    def _after_fork(self) -> None:
        """In a forked child: the writer thread did not survive, nor should its queue."""
        self.thread = None
        self.pending.clear()
        self.lock = threading.Lock()
        self.wakeup = threading.Event()

    @staticmethod
    def _each_line(emit: Callable[[str], Any]) -> Callable[[list[str]], None]:
        def batch(lines: list[str]) -> None:
            for line in lines:
                emit(line)

        return batch

    @staticmethod
    def _file_batch(stream: Any) -> Callable[[list[str]], None]:
        flush = getattr(stream, "flush", None)

        def batch(lines: list[str]) -> None:
            stream.write("\n".join(lines) + "\n")
            if flush is not None:
                flush()

        return batch

    def put(self, line: Any) -> None:
        if self.thread is None:
            self._start()
        if len(self.pending) >= self.size:
            with self.lock:
                self.dropped += 1
            return
        self.pending.append(line)
        if not self.wakeup.is_set():
            self.wakeup.set()

    def _start(self) -> None:
        with self.lock:
            if self.thread is None:
                thread = threading.Thread(target=self._run, name="oxypy-trace", daemon=True)
                thread.start()
                self.thread = thread

    def _run(self) -> None:
        pending = self.pending
        while True:
            self.wakeup.wait()
            self.wakeup.clear()
            lines = []
            while pending:
                lines.append(pending.popleft())
            stop = _STOP in lines
            if stop:
                lines = [line for line in lines if line is not _STOP]
            self._write(lines, warn=True)
            if stop:
                return
            time.sleep(self.interval)

    def _write(self, records: list[Any], *, warn: bool) -> None:
        """Render ``records`` and hand their lines to the sink in one batch.

        A sink that fails costs the batch (counted in :attr:`failed`, and
        logged when ``warn``: not at exit, where nobody is left to tell).
        """
        render = self.render
        if render is None:
            lines = records
        else:
            lines = []
            for record in records:
                try:
                    lines.append(render(record))
                except Exception:  # noqa: BLE001 - one bad record must not cost the batch
                    log.warning("could not build the trace record", exc_info=True)
        if not lines:
            return
        try:
            self.batch(lines)
        except Exception:  # noqa: BLE001 - a broken sink must not kill the writer
            with self.lock:
                self.failed += len(lines)
            if warn:
                log.warning("trace sink failed", exc_info=True)

    def flush(self) -> None:
        """Write what is queued now, in the calling thread (used at exit)."""
        lines = []
        while self.pending:
            line = self.pending.popleft()
            if line is not _STOP:
                lines.append(line)
        self._write(lines, warn=False)

    def close(self, timeout: float) -> None:
        """Write what is queued (waiting up to ``timeout``) and stop the writer."""
        thread = self.thread
        if thread is None or not thread.is_alive():
            return
        self.pending.append(_STOP)
        self.wakeup.set()
        thread.join(timeout)
        self.thread = None
