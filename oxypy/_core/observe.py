"""Watching a response go by, and deciding once what the client really got.

Trace, the Prometheus metrics, CircuitBreaker, ConnLimit and Buffer all need
to know how a request ended; they all learn it here, so a client that went
away is 499 everywhere and never a failure of the upstream.

:func:`observe` calls the next app with a ``start_response`` that records the
status, and returns an :class:`ObservedBody` (a
:class:`~oxypy._core.iterables.ClosingIterable`) that counts the bytes
passing through and calls ``finish(observation)`` exactly once: from
``close()``, or at once when the app itself raised.  ``finish`` then reads
:meth:`Observation.outcome`, the one decision:

* **the client went away** → ``499``: a :class:`~oxypy.ClientDisconnected`
  (the server's ``ClientGone`` is one) raised below or recorded by Forward, a
  body closed before its end without an error (the server stopped reading: its
  write to the client failed), or any other non-oxypy error while the client
  connection is closed (``environ["oxypy.client_gone"]``, or a peek at
  ``gunicorn.socket``);
* **an upstream failure mid-body** (an :class:`~oxypy.UpstreamError` raised by
  the body iterator after the head went out) keeps the upstream's status and
  is marked ``aborted`` and ``upstream_failed``: the server cuts the
  connection, the response is visibly truncated;
* **an error before the head went out** (an app bug, or anything else raised
  before the first body byte) → ``500``, which is what the server answers;
* otherwise the status the head carried.

``upstream_failed`` (what a breaker or a retry counts against an upstream) is
true only for Forward's own network errors, never when the client went away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import environ as keys
from ..exceptions import ClientDisconnected, RequestError, UpstreamError
from .exchange import Exchange, counts_against_upstream, exchange_log
from .iterables import ClosingIterable
from .sockets import peer_closed
from .types import Clock, StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "ObservedBody",
    "Observation",
    "Outcome",
    "client_probe",
    "client_went_away",
    "observe",
]

#: The ``error`` kind every client abort is reported as (whatever raised it).
CLIENT_GONE_KIND = "client_disconnected"


def client_probe(environ: WSGIEnvironment) -> Callable[[], bool] | None:
    """A ``() -> bool`` telling whether the client connection has closed, if knowable.

    ``oxypy.serve`` provides ``environ["oxypy.client_gone"]``; under gunicorn
    the client socket it exposes is peeked without blocking.  Other servers
    give no way to know: then only a :class:`~oxypy.ClientDisconnected` tells.
    """
    provided = environ.get(keys.CLIENT_GONE)
    if callable(provided):
        return provided  # type: ignore[no-any-return]
    sock = environ.get("gunicorn.socket") or environ.get("gunicorn.sock")
    if sock is None or not hasattr(sock, "fileno"):
        return None
    return lambda: peer_closed(sock, data_is_fine=True)


def client_went_away(exc: BaseException, environ: WSGIEnvironment) -> bool:
    """Whether ``exc`` means the client left (rather than an upstream failure or a bug).

    True for a :class:`~oxypy.ClientDisconnected` or an error raised *from*
    one; for an error that is not an oxypy :class:`~oxypy.RequestError` (a
    socket error reading the request or writing the answer) when the client
    connection is closed.  Never for an :class:`~oxypy.UpstreamError`.
    """
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 8:
        if isinstance(cause, ClientDisconnected):
            return True
        cause = cause.__cause__
        seen += 1
    if isinstance(exc, RequestError) or not isinstance(exc, Exception):
        return False
    probe = client_probe(environ)
    if probe is None:
        return False
    try:
        return bool(probe())
    except Exception:  # noqa: BLE001 - a broken probe tells nothing
        return False


def error_kind(exc: BaseException) -> str:
    """A stable name for ``exc`` in logs and metrics (``upstream_timeout``, ``ValueError``)."""
    return exc.kind if isinstance(exc, RequestError) else type(exc).__name__


class Outcome:
    """How one request ended, as the client saw it (see the module docstring)."""

    __slots__ = (
        "status",
        "status_sent",
        "error",
        "client_gone",
        "aborted",
        "upstream_failed",
        "exchanges",
    )

    def __init__(
        self,
        status: int,
        status_sent: int | None,
        error: BaseException | None,
        client_gone: bool,
        aborted: bool,
        upstream_failed: bool,
        exchanges: list[Exchange],
    ) -> None:
        #: The status the client got: 499 when it went away, 500 for an error
        #: before any byte went out, else the status of the head.
        self.status = status
        #: The head's status when the client went away after it was set (else None).
        self.status_sent = status_sent
        #: Why the request failed, if it did: raised below this block, recorded
        #: on the environ (``oxypy.error``) or on the last exchange.
        self.error = error
        #: The client went away.
        self.client_gone = client_gone
        #: The response did not end normally (cut short, or failed).
        self.aborted = aborted
        #: A network failure of the upstream (Forward's own), never a client abort.
        self.upstream_failed = upstream_failed
        #: The exchanges made below this block for this request, oldest first.
        self.exchanges = exchanges

    @property
    def error_kind(self) -> str | None:
        """``error``'s stable name; ``"client_disconnected"`` whenever the client left."""
        if self.client_gone:
            return CLIENT_GONE_KIND
        return None if self.error is None else error_kind(self.error)

    def __repr__(self) -> str:
        return (
            f"<Outcome {self.status} error={self.error!r} upstream_failed={self.upstream_failed}>"
        )


def _no_write(data: bytes) -> object:
    raise AssertionError("write() before start_response()")


class Observation:
    """What one block saw of one response: filled as it passes, read in ``finish``."""

    __slots__ = (
        "environ",
        "log",
        "log_start",
        "error_before",
        "status",
        "headers",
        "head_at",
        "bytes_sent",
        "exhausted",
        "error",
        "_start",
        "_write",
        "_clock",
    )

    def __init__(
        self, environ: WSGIEnvironment, start_response: StartResponse, clock: Clock | None
    ) -> None:
        self.environ = environ
        #: The request's exchange log, and its length when the block was entered.
        self.log: list[Exchange] = exchange_log(environ)
        self.log_start = len(self.log)
        self.error_before = environ.get(keys.ERROR)
        #: The status passed to ``start_response`` (the last one), if any.
        self.status: int | None = None
        #: The headers passed with it.
        self.headers: list[tuple[str, str]] = []
        #: ``clock()`` at the first ``start_response`` (when a clock was given).
        self.head_at: float | None = None
        #: Body bytes that went out (yielded, or passed to ``write``).
        self.bytes_sent = 0
        #: The body iterator ran to its end.
        self.exhausted = False
        #: The exception the app or its body iterator raised, if any.
        self.error: BaseException | None = None
        self._start = start_response
        self._write: Callable[[bytes], object] = _no_write
        self._clock = clock

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        code = status[:3]
        self.status = int(code) if code.isdigit() else None
        self.headers = headers
        if self._clock is not None and self.head_at is None:
            self.head_at = self._clock()
        if exc_info is not None:
            self._write = self._start(status, headers, exc_info)
        else:
            self._write = self._start(status, headers)
        return self.write

    def write(self, data: bytes) -> object:
        """The ``write`` callable handed to the app: counted, then passed on."""
        self.bytes_sent += len(data)
        return self._write(data)

    def outcome(self) -> Outcome:
        """Decide how the request ended (call it once the body is closed)."""
        environ = self.environ
        exchanges = self.log[self.log_start :]
        raised = self.error
        error = raised
        if error is None:
            found = environ.get(keys.ERROR)
            if found is not None and found is not self.error_before:
                error = found
            elif exchanges:
                error = exchanges[-1].error  # an earlier attempt's error was retried away
        closed_early = raised is None and not self.exhausted
        gone = (
            closed_early
            or self.status == 499
            or (raised is not None and client_went_away(raised, environ))
        )
        status_sent = None
        if gone:
            status = 499
            if self.status is not None and self.status != 499:
                status_sent = self.status
            if not isinstance(error, ClientDisconnected):
                error = ClientDisconnected()
        elif self.status is None or (raised is not None and self.bytes_sent == 0):
            status = 500  # nothing went out: the server answers 500
        else:
            status = self.status
        last = exchanges[-1] if exchanges else None
        upstream_failed = not gone and (
            isinstance(raised, UpstreamError)
            or (last is not None and counts_against_upstream(last))
        )
        return Outcome(
            status,
            status_sent,
            error,
            gone,
            raised is not None or closed_early,
            upstream_failed,
            exchanges,
        )


Finish = Callable[[Observation], object]


class ObservedBody(ClosingIterable):
    """The response body as a block returns it: counted as it passes, settled once on close."""

    __slots__ = ("_observation", "_on_chunk", "_finish")

    def __init__(
        self,
        iterable: Iterable[bytes],
        observation: Observation,
        finish: Finish,
        on_chunk: Callable[[bytes], object] | None = None,
    ) -> None:
        # ClosingIterable's fields, set here: its one callback is ``finish``,
        # called with the observation by :meth:`close` (no closure per request).
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._callbacks = ()
        self._closed = False
        self._observation = observation
        self._on_chunk = on_chunk
        self._finish = finish

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            self._iterator = self._watch() if self._on_chunk is None else self._watch_chunks()
        return self._iterator

    def _watch(self) -> Iterator[bytes]:
        observation = self._observation
        try:
            for chunk in self._iterable:
                observation.bytes_sent += len(chunk)
                yield chunk
        except GeneratorExit:  # the consumer stopped reading: not an error of ours
            raise
        except BaseException as exc:
            observation.error = exc
            raise
        observation.exhausted = True

    def _watch_chunks(self) -> Iterator[bytes]:
        observation = self._observation
        on_chunk = self._on_chunk
        assert on_chunk is not None
        try:
            for chunk in self._iterable:
                observation.bytes_sent += len(chunk)
                on_chunk(chunk)
                yield chunk
        except GeneratorExit:  # the consumer stopped reading: not an error of ours
            raise
        except BaseException as exc:
            observation.error = exc
            raise
        observation.exhausted = True

    def close(self) -> None:
        if self._closed:
            return
        iterator = self._iterator
        if iterator is not None:
            iterator.close()  # type: ignore[attr-defined]
        self._closed = True
        error: BaseException | None = None
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error = exc
        try:
            self._finish(self._observation)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error = error or exc
        if error is not None:
            raise error


def observe(
    app: WSGIApplication,
    environ: WSGIEnvironment,
    start_response: StartResponse,
    finish: Finish,
    *,
    clock: Clock | None = None,
    on_chunk: Callable[[bytes], object] | None = None,
) -> Iterable[bytes]:
    """Call ``app`` and return its body wrapped; ``finish(observation)`` runs exactly once.

    ``finish`` runs from the body's ``close()``, or before the exception
    propagates when ``app`` itself raises.  ``StopIteration`` from ``app`` is
    gunicorn's sign that the app took the connection over (a WebSocket tunnel
    under ``-k gevent``): the exchange ended normally (status 101 unless set).
    ``clock`` (optional) stamps :attr:`Observation.head_at`; ``on_chunk`` sees
    every body chunk as it passes.
    """
    observation = Observation(environ, start_response, clock)
    try:
        iterable = app(environ, observation.start_response)
    except StopIteration:
        if observation.status is None:
            observation.status = 101
        observation.exhausted = True
        finish(observation)
        raise
    except BaseException as exc:
        observation.error = exc
        finish(observation)
        raise
    return ObservedBody(iterable, observation, finish, on_chunk)
