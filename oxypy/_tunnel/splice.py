"""Copy a plain-TCP tunnel both ways from the event loop's callbacks, without greenlets.

A tunnel copied by two greenlets costs, per relayed message and direction, a
``recv`` that fails with ``EAGAIN`` (and the exception it raises), a
``gevent.Timeout`` armed and cancelled around the wait, and two greenlet
switches through the hub.  :class:`Splice` instead starts one read watcher per
direction on the loop: when the source is readable the callback reads into a
reused buffer and writes to the destination at once, in the hub, so a message
costs one ``recv`` and one ``send``.  A destination that takes less than was
read (a slow reader) stops the source's watcher and starts a write watcher on
the destination until the rest is written: backpressure, never more than one
buffer held per direction.

Timers: one per tunnel, not one per wait.  It ticks every quarter of
``idle_timeout``; the tunnel closes once no byte moved either way for
``idle_timeout`` (at most a quarter later).  When one side has closed, its
end is half-closed on the other side (``shutdown(SHUT_WR)``), and the other
direction has ``linger`` seconds to finish.

Only for plain sockets (TLS keeps buffered records the readiness of the file
descriptor does not show): the caller checks with :func:`plain_socket`.
"""

from __future__ import annotations

import socket
from typing import Any

import gevent
import gevent.socket
from gevent.event import Event

from .._core.exchange import Exchange

__all__ = ["Splice", "plain_socket"]

BUFFER_SIZE = 65536
_READ, _WRITE = 1, 2


def plain_socket(sock: Any) -> bool:
    """Whether ``sock`` is exactly a gevent socket: plain TCP (not TLS, not a stdlib socket)."""
    return type(sock) is gevent.socket.socket


class _Half:
    """One direction: ``src`` to ``dst``, through one reused buffer."""

    __slots__ = (
        "splice",
        "src",
        "dst",
        "reader",
        "writer",
        "buf",
        "view",
        "at",
        "end",
        "count",
    )

    def __init__(self, splice: Splice, src: Any, dst: Any, loop: Any, count: bool) -> None:
        self.splice = splice
        self.src = src
        self.dst = dst
        self.reader = loop.io(src.fileno(), _READ)
        self.writer = loop.io(dst.fileno(), _WRITE)
        self.buf = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buf)
        #: Unwritten bytes: ``view[at:end]``.
        self.at = 0
        self.end = 0
        #: Whether the bytes of this direction count as ``record.bytes_received``.
        self.count = count

    def readable(self) -> None:
        try:
            n = self.src.recv_into(self.buf)
        except BlockingIOError:
            return
        except OSError:
            n = 0  # a reset reads as the end of this direction
        splice = self.splice
        if not n:
            self.reader.stop()
            self.shut()
            return
        splice.moved = True
        if self.count:
            splice.record.bytes_received += n
        try:
            sent = self.dst.send(self.view[:n])
        except BlockingIOError:
            sent = 0
        except OSError:
            splice.finish()
            return
        if sent < n:
            self.at, self.end = sent, n
            self.reader.stop()
            self.writer.start(self.writable)

    def writable(self) -> None:
        try:
            sent = self.dst.send(self.view[self.at : self.end])
        except BlockingIOError:
            return
        except OSError:
            self.splice.finish()
            return
        self.at += sent
        if self.at < self.end:
            return
        self.writer.stop()
        self.at = self.end = 0
        self.reader.start(self.readable)

    def shut(self) -> None:
        """After the source's end (nothing is pending then): half-close the destination."""
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.splice.half_done()

    def stop(self) -> None:
        self.reader.stop()
        self.writer.stop()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class Splice:
    """Both directions of one tunnel between ``client`` and ``upstream`` (plain sockets).

    :meth:`run` blocks the calling greenlet until the tunnel ends (both
    directions ended, ``linger`` seconds after the first did, ``idle_timeout``
    of silence, or a write failed); the caller closes the sockets.
    """

    __slots__ = ("loop", "record", "halves", "done", "moved", "silent", "ended", "timers", "linger")

    def __init__(
        self,
        client: Any,
        upstream: Any,
        record: Exchange,
        *,
        idle_timeout: float | None,
        linger: float,
    ) -> None:
        loop = gevent.get_hub().loop
        self.loop = loop
        self.record = record
        for sock in (client, upstream):
            sock.settimeout(0.0)
            try:
                # Each read is written at once: Nagle must not hold a small one back.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.halves = (
            _Half(self, client, upstream, loop, False),
            _Half(self, upstream, client, loop, True),
        )
        self.done = Event()
        #: Whether a byte moved since the idle timer's last tick.
        self.moved = False
        self.silent = 0
        self.ended = 0
        self.linger = linger
        self.timers: list[Any] = []
        if idle_timeout is not None:
            tick = idle_timeout / 4
            self.timers.append(loop.timer(tick, tick, ref=False))

    def run(self) -> None:
        """Copy until the tunnel ends; every watcher is closed on the way out (even when killed)."""
        try:
            for half in self.halves:
                half.reader.start(half.readable)
            if self.timers:
                self.timers[0].start(self._tick)
            self.done.wait()
        finally:
            self.stop()
            for half in self.halves:
                half.close()
            for timer in self.timers:
                timer.close()

    def half_done(self) -> None:
        self.ended += 1
        if self.ended >= 2:
            self.finish()
        else:
            # The other direction has ``linger`` seconds to end as well.
            timer = self.loop.timer(self.linger, ref=False)
            self.timers.append(timer)
            timer.start(self.finish)

    def _tick(self) -> None:
        if self.moved:
            self.moved = False
            self.silent = 0
            return
        self.silent += 1
        if self.silent >= 4:
            self.finish()

    def finish(self) -> None:
        """End the tunnel (from a callback: watchers are stopped, closed by :meth:`run`)."""
        self.stop()
        self.done.set()

    def stop(self) -> None:
        for half in self.halves:
            half.stop()
        for timer in self.timers:
            timer.stop()
