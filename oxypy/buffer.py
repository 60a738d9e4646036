"""Buffer: read the request body with limits, then optionally retry the request.

The request body is read into memory up to a threshold and then into an
anonymous temp file, and sent upstream with a definite ``Content-Length``
(chunked uploads become fixed-length), so every attempt can replay it.  The
retry predicate needs only the status, the headers and the error, so it is
decided on each attempt's response head and the chosen body streams from
then on; a response is buffered (to answer 502 cleanly when it is over
``max_response_body_bytes``) only when that limit is set.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import gevent

from . import environ as keys
from ._buffer.attempt import Capture, Captured, Failed, Final, Streaming, close_iterable
from ._buffer.store import Overflow, SpillBuffer
from ._client.exchange import BodySource
from ._client.request_head import check_framing
from ._core.exchange import Exchange, counts_against_upstream, exchange_log, settle_unfinished
from ._core.iterables import ClosingIterable
from ._core.observe import client_probe, client_went_away
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from ._core.watchdog import Watch, watchdog
from .errors import ErrorHandler, default_error_handler, relay_or_answer, respond_error
from .exceptions import (
    BodyTooLarge,
    ClientDisconnected,
    ConfigurationError,
    NoResponse,
    RequestError,
    ResponseTooLarge,
    UpstreamError,
    UpstreamTryTimeout,
)
from .predicate import Func, Predicate, compile_predicate
from .retrybudget import RetryBudget

__all__ = ["Buffer", "NoResponse"]

log = logging.getLogger(__name__)

MiB = 1 << 20

#: How long after ``per_try_timeout`` an attempt is interrupted: Forward's own
#: capped waits expire at the bound itself and answer first (with their
#: exchange record); the interruption is the backstop for other apps and for
#: a buffered body.
GRACE = 0.01


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt, as the retry predicate sees it."""

    attempt: int
    status: int
    network_error: bool
    method: str


#: The functions a Buffer retry predicate may call.
RETRY_FUNCS: dict[str, Func] = {
    "IsNetworkError": Func(lambda a: a.network_error, returns=bool),
    "Attempts": Func(lambda a: a.attempt, returns=int),
    "ResponseCode": Func(lambda a: a.status, returns=int),
    "RequestMethod": Func(lambda a: a.method, returns=str),
}


def should_retry(
    predicate: Predicate | None,
    outcome: Attempt,
    *,
    max_attempts: int,
    client_gone: bool,
    replayable: bool,
) -> bool:
    """The one retry decision: the predicate, under every hard rule that overrides it."""
    if predicate is None or client_gone or not replayable:
        return False
    if outcome.attempt >= max_attempts:
        return False
    return predicate(outcome)


class Buffer:
    """Buffer the request body (bounded, spilling to disk) and retry.

    **Reads** the request head and ``wsgi.input``; ``oxypy.exchanges`` recorded
    below it (to tell a network error from an upstream that answered 502);
    ``oxypy.deadline`` (set by :class:`~oxypy.Timeout`): once it has passed,
    or would pass during the backoff, no retry is made.
    **Writes** a fresh environ copy per attempt with ``oxypy.attempt`` = 1, 2, ...,
    ``CONTENT_LENGTH`` set and ``Transfer-Encoding`` removed, ``wsgi.input`` a
    replayable reader at position 0, and with ``per_try_timeout``
    ``oxypy.try_deadline``; creates ``oxypy.tried_targets`` (a set a balancer
    fills) and ``oxypy.exchanges`` once per client request.

    **Streams the response.**  The retry decision is taken on each attempt's
    response head (status, headers, error) and its first body bytes (which a
    server sends with the head anyway; not awaited for an event stream or a
    101), so an upstream that sends a head and closes is still a failed
    attempt; the body of the response the client gets then streams as the
    upstream sends it (first byte as soon as bare Forward's), with the
    upstream's own framing.  A body that fails after its first bytes went
    out aborts the client connection (never padded, never retried).
    **Buffers the response** only when ``max_response_body_bytes`` is set (or
    ``buffer_response=True``): the whole body is read (memory, then a temp
    file) before anything is sent, so
    an answer over the limit becomes a clean 502, a body cut short is a
    network error that can still be retried, and the client gets a definite
    ``Content-Length``; the price is the time to first byte of the whole
    body.  ``text/event-stream`` and ``101`` responses always stream through.

    Failures: ambiguous request framing 400; request body over the maximum 413
    (``Content-Length`` is checked before reading); client gone 499 (nobody
    is left to read it); response body over the maximum 502; an app that
    never called ``start_response`` 502 (:class:`~oxypy.NoResponse`).  An
    upstream that fails while its body is being buffered (cut short, reset,
    garbage) is a network error like a refused connection: retried when the
    predicate says so, else answered 502 (504 for a timeout) with a short
    plain-text body; nothing of it reached the client.  With
    ``buffer_response=False`` (or an event stream passing through) such a
    failure before the first body byte is answered the same way, and after it
    the client connection is cut: the response is visibly truncated, never
    padded.  An attempt over ``per_try_timeout`` is 504
    (:class:`~oxypy.UpstreamTryTimeout`, Trace kind ``upstream_try_timeout``)
    when no retry follows.  Other exceptions of the wrapped app propagate.

    Retries: after each attempt the ``retry`` predicate is evaluated over that
    attempt (``IsNetworkError()``, ``Attempts()``, ``ResponseCode()``,
    ``RequestMethod()``).  ``IsNetworkError()`` is true only for Forward's own
    failures to reach or read the upstream, never for a client that went
    away.  A request is never retried once the client has gone, nor past
    ``max_attempts`` in total, nor when its body was not buffered
    (``buffer_request=False``) unless the upstream was never reached
    (:attr:`UpstreamError.before_send <oxypy.UpstreamError.before_send>`: a
    refused connection), since then the body is still unread.

    :param retry: predicate string, e.g. ``"IsNetworkError() && Attempts() < 2"``.
    :param max_request_body_bytes: 413 above this (None: unlimited).
    :param mem_request_body_bytes: bytes kept in memory before spilling (1 MiB).
    :param max_response_body_bytes: 502 above this (None: unlimited); setting
        it makes Buffer buffer each response before sending it.
    :param mem_response_body_bytes: bytes of a buffered response kept in
        memory before spilling (1 MiB).
    :param max_attempts: hard cap on calls to ``next`` (11: oxy's first try + 10).
    :param buffer_request: read the request body first (needed to retry one).
    :param buffer_response: True: capture each response whole before
        sending it; False: decide on the head and stream; None (default):
        buffer only when ``max_response_body_bytes`` is set.
    :param per_try_timeout: seconds each attempt may take up to its response
        head and first body bytes (with a buffered response: up to its last
        body byte), so a hung
        server costs one try.  A timed-out attempt is a network error for
        ``IsNetworkError()`` and is retried as the predicate says; an outer
        :class:`~oxypy.Timeout` still caps the whole request.  Forward caps
        connect, send and the head wait at it (``oxypy.try_deadline``); any
        other app is interrupted just after it.  None (default): no bound.
    :param retry_backoff: ``(base, max)`` seconds: sleep a random time in
        ``[0, min(max, base * 2**(n-1))]`` before retry n (full jitter); no
        retry when the sleep would outlast the request's deadline.
    :param rng: the ``random.Random`` the backoff jitter is drawn from (default:
        a private one per instance, never the global ``random`` module); tests
        pass a seeded one.
    :param spool_dir: directory for the temp files of bodies over the memory
        thresholds (default: the system temp dir, ``tempfile.gettempdir()``).
        The files are anonymous (unlinked at creation) and closed when the
        request ends.  Must be an existing directory, else ConfigurationError.
    :param retry_budget: a :class:`~oxypy.RetryBudget` asked before each retry
        the predicate wants (each client request is counted on it); when it
        refuses, the attempt's outcome goes to the client as it is.
    :param sleep: how to wait (``gevent.sleep``); tests inject a fake.
    :param error_handler: ``(environ, start_response, exc)`` for request errors.
    :param skip: ``callable(environ) -> bool``; True passes the request straight on.

    Example::

        from oxypy import Buffer, Forward, RoundRobin, serve
        lb = RoundRobin(Forward(), ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
        app = Buffer(lb, retry="IsNetworkError() && Attempts() < 2")
        serve(app, "127.0.0.1:8080")

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        /,
        *,
        retry: str | None = None,
        max_request_body_bytes: int | None = None,
        mem_request_body_bytes: int = MiB,
        max_response_body_bytes: int | None = None,
        mem_response_body_bytes: int = MiB,
        max_attempts: int = 11,
        buffer_request: bool = True,
        buffer_response: bool | None = None,
        retry_backoff: tuple[float, float] | None = None,
        rng: random.Random | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        retry_budget: RetryBudget | None = None,
        per_try_timeout: float | None = None,
        sleep: Callable[[float], object] = gevent.sleep,
        error_handler: ErrorHandler = default_error_handler,
        skip: Skip | None = None,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("Buffer needs the next WSGI app as first argument")
        for name, value in (
            ("max_request_body_bytes", max_request_body_bytes),
            ("max_response_body_bytes", max_response_body_bytes),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{name} must be a positive int or None")
        for name, value in (
            ("mem_request_body_bytes", mem_request_body_bytes),
            ("mem_response_body_bytes", mem_response_body_bytes),
        ):
            if not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be an int >= 0")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError("max_attempts must be an int >= 1")
        if retry_backoff is not None:
            if len(retry_backoff) != 2 or not all(
                isinstance(v, (int, float)) and v >= 0 for v in retry_backoff
            ):
                raise ConfigurationError("retry_backoff must be (base, max) seconds >= 0")
            if retry_backoff[0] > retry_backoff[1]:
                raise ConfigurationError("retry_backoff base must not exceed max")
        if retry_budget is not None and not isinstance(retry_budget, RetryBudget):
            raise ConfigurationError("retry_budget must be a RetryBudget or None")
        if per_try_timeout is not None and (
            isinstance(per_try_timeout, bool)
            or not isinstance(per_try_timeout, (int, float))
            or not 0 < per_try_timeout < float("inf")
        ):
            raise ConfigurationError("per_try_timeout must be a finite number > 0 or None")
        if retry is not None and not isinstance(retry, str):
            raise ConfigurationError("retry must be a predicate string or None")
        if rng is not None and not isinstance(rng, random.Random):
            raise ConfigurationError("rng must be a random.Random or None")
        if spool_dir is not None:
            if not isinstance(spool_dir, (str, os.PathLike)):
                raise ConfigurationError("spool_dir must be a directory path or None")
            spool_dir = os.fspath(spool_dir)
            if not isinstance(spool_dir, str) or not os.path.isdir(spool_dir):
                raise ConfigurationError(f"spool_dir {spool_dir!r} is not an existing directory")
        self.next_app = next_app
        self.retry: Predicate | None = (
            compile_predicate(retry, RETRY_FUNCS) if retry is not None else None
        )
        self.max_request = max_request_body_bytes
        self.mem_request = mem_request_body_bytes
        self.max_response = max_response_body_bytes
        self.mem_response = mem_response_body_bytes
        self.max_attempts = max_attempts
        self.buffer_request = buffer_request
        if buffer_response is None:
            buffer_response = max_response_body_bytes is not None
        self.buffer_response = buffer_response
        self.per_try_timeout = per_try_timeout
        self.retry_backoff = retry_backoff
        self._rng = rng if rng is not None else random.Random()
        self.spool_dir: str | None = spool_dir
        self.retry_budget = retry_budget
        self.sleep = sleep
        self.error_handler = error_handler
        self.skip = skip

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        if (
            not self.buffer_request
            and not self.buffer_response
            and self.retry is None
            and self.per_try_timeout is None
        ):
            return self.next_app(environ, start_response)
        if self.retry_budget is not None and self.retry is not None:
            self.retry_budget.request(environ)
        body: SpillBuffer | None = None
        try:
            # Every attempt gets its own copy of ``base``; only a buffered
            # body changes it, so a request without one is copied once.
            base = environ
            replayable = True
            if self.buffer_request:
                body = self._read_request(environ)
                if body is not None:
                    base = dict(environ)
                    base["CONTENT_LENGTH"] = str(body.size)
                    base.pop("HTTP_TRANSFER_ENCODING", None)
                    base["wsgi.input_terminated"] = True
            else:
                cl = environ.get("CONTENT_LENGTH")
                replayable = cl in (None, "", "0") and "HTTP_TRANSFER_ENCODING" not in environ
        except RequestError as exc:
            if body is not None:
                body.close()
            return respond_error(self.error_handler, environ, start_response, exc)
        except BaseException:
            if body is not None:
                body.close()
            raise
        log_list = exchange_log(environ)
        tried = environ.setdefault(keys.TRIED_TARGETS, set())
        if base is not environ:
            base[keys.EXCHANGES] = log_list
            base[keys.TRIED_TARGETS] = tried
        try:
            result = self._attempts(environ, base, start_response, body, replayable, log_list)
        except BaseException:
            if body is not None:
                body.close()
            raise
        if body is None:
            return result
        return ClosingIterable(result, body.close)

    # -- request --------------------------------------------------------------
    def _read_request(self, environ: WSGIEnvironment) -> SpillBuffer | None:
        framing = check_framing(environ)
        if not framing.has_body:
            return None
        length = framing.length
        if length is not None and self.max_request is not None and length > self.max_request:
            raise BodyTooLarge(f"request body of {length} bytes is over the limit")
        store = SpillBuffer(self.mem_request, self.max_request, self.spool_dir)
        try:
            for data in BodySource(environ["wsgi.input"], length).chunks():
                store.write(data)
        except Overflow:
            store.close()
            raise BodyTooLarge("request body is over the limit") from None
        except BaseException:
            store.close()
            raise
        return store

    # -- attempts -------------------------------------------------------------
    def _attempts(
        self,
        environ: WSGIEnvironment,
        base: WSGIEnvironment,
        start_response: StartResponse,
        body: SpillBuffer | None,
        replayable: bool,
        log_list: list[Exchange],
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        attempt = 0
        while True:
            attempt += 1
            env = dict(base)
            env[keys.ATTEMPT] = attempt
            if body is not None:
                env["wsgi.input"] = body.reader()
            before = len(log_list)
            timer = dog = None
            if self.per_try_timeout is not None:
                at = time.monotonic() + self.per_try_timeout
                env[keys.TRY_DEADLINE] = at
                dog = watchdog()
                timer = dog.add(at + GRACE)
            try:
                if self.buffer_response:
                    outcome = self._buffered(env, start_response, timer, log_list, before)
                else:
                    outcome = self._head_only(env, start_response, timer, log_list, before)
            finally:
                if dog is not None and timer is not None:
                    dog.remove(timer)
            if isinstance(outcome, Final):
                return outcome.body
            new = log_list[before:]
            # One pass over this attempt's exchanges: did the client leave,
            # did Forward fail to reach or read an upstream?
            gone = outcome.client_gone
            failed_upstream = False
            for x in new:
                if x.error is not None:
                    gone = gone or x.client_aborted
                    failed_upstream = failed_upstream or counts_against_upstream(x)
            if isinstance(outcome, Failed):
                network = outcome.network_error
            elif new:
                network = failed_upstream
            else:
                network = outcome.code in (502, 504)
            ctx = Attempt(attempt, outcome.code, network, method)
            retry = should_retry(
                self.retry,
                ctx,
                max_attempts=self.max_attempts,
                client_gone=gone,
                replayable=replayable or _never_sent(outcome, new),
            )
            if retry and _past(environ):
                retry = False  # the deadline is gone: not a retry, not counted
            if retry and self.retry_budget is not None:
                retry = self.retry_budget.try_retry()
            if retry:
                retry = self._wait(attempt, environ)
            if not retry:
                return outcome.send(environ, start_response, self.error_handler)
            log.info("retrying %s %s (attempt %d)", method, environ.get("PATH_INFO"), attempt + 1)
            settle_unfinished(log_list[before:])  # abandoned on purpose, not by the client
            outcome.discard()

    def _wait(self, attempt: int, environ: WSGIEnvironment) -> bool:
        """Back off before the next attempt; False if the client left meanwhile
        or the request's deadline passes (or would, during the backoff)."""
        probe = client_probe(environ)
        deadline = environ.get(keys.DEADLINE)
        if deadline is not None and deadline - time.monotonic() <= 0:
            return False
        if self.retry_backoff is not None:
            low, high = self.retry_backoff
            delay = self._rng.uniform(0.0, min(high, low * 2 ** (attempt - 1)))
            if deadline is not None and delay >= deadline - time.monotonic():
                return False
            while delay > 0:
                if probe is not None and probe():
                    return False
                step = min(delay, 0.05)
                self.sleep(step)
                delay -= step
            if deadline is not None and deadline - time.monotonic() <= 0:
                return False  # the sleep overran the deadline (a loaded hub)
        return not (probe is not None and probe())

    def _buffered(
        self,
        env: WSGIEnvironment,
        start_response: StartResponse,
        timer: Watch | None,
        log_list: list[Exchange],
        before: int,
    ) -> Captured | Failed | Final:
        store = SpillBuffer(self.mem_response, self.max_response, self.spool_dir)
        capture = Capture(store, start_response)
        result: Iterable[bytes] | None = None
        try:
            result = self.next_app(env, capture.start_response)
            iterator = iter(result)
            for chunk in iterator:
                if capture.passthrough is not None:
                    return Final(
                        self._stream(store, [chunk], iterator, result, env, start_response)
                    )
                if chunk and capture.status is None:
                    raise NoResponse()
                store.write(chunk)
            if capture.passthrough is not None:
                return Final(self._stream(store, [], iterator, result, env, start_response))
            if capture.status is None:
                raise NoResponse()
        except Overflow:
            close_iterable(result)
            store.close()
            exc: RequestError = ResponseTooLarge(
                f"upstream response is over {self.max_response} bytes"
            )
            return Final(respond_error(self.error_handler, env, start_response, exc))
        except NoResponse as exc:
            close_iterable(result)
            store.close()
            return Final(respond_error(self.error_handler, env, start_response, exc))
        except BaseException as exc:
            if timer is not None and exc is timer.exc:
                exc = self._timed_out(log_list, before)
            close_iterable(result)
            store.close()
            passed_through = capture.passthrough is not None
            failed = _failed(exc, env, restart=passed_through)
            if failed is None:
                raise  # a bug in the wrapped app: the server answers 500
            if passed_through:
                # The stream's head already went to the server (not sent yet):
                # answer in its place; no retry can start the response again.
                return Final(failed.send(env, start_response, self.error_handler))
            return failed
        close_iterable(result)
        return Captured(capture, store)

    def _stream(
        self,
        store: SpillBuffer,
        first: list[bytes],
        iterator: Iterator[bytes],
        result: Iterable[bytes],
        env: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        """Pass the rest of an SSE/upgrade response through untouched.

        An upstream failing before the stream's first byte is answered 502/504;
        after it the client connection is cut (never padded).
        """
        pending = list(store.chunks()) + first
        store.close()

        def gen() -> Iterator[bytes]:
            yield from pending
            yield from iterator

        body = relay_or_answer(gen(), self.error_handler, env, start_response)
        return ClosingIterable(body, lambda: close_iterable(result))

    def _timed_out(self, log_list: list[Exchange], before: int) -> UpstreamTryTimeout:
        """The error of an attempt interrupted at ``per_try_timeout``."""
        exc = UpstreamTryTimeout(f"upstream attempt timed out after {self.per_try_timeout:g} s")
        settle_unfinished(log_list[before:], exc)
        return exc

    def _head_only(
        self,
        env: WSGIEnvironment,
        start_response: StartResponse,
        timer: Watch | None,
        log_list: list[Exchange],
        before: int,
    ) -> Captured | Failed | Final:
        store = SpillBuffer(self.mem_response, None, self.spool_dir)
        capture = Capture(store, None)
        result: Iterable[bytes] | None = None
        try:
            result = self.next_app(env, capture.start_response)
            iterator = iter(result)
            first: list[bytes] = []
            while capture.status is None:
                chunk = next(iterator, None)
                if chunk is None:
                    break
                if chunk and capture.status is None:
                    raise NoResponse()
                first.append(chunk)
            if capture.status is None:
                raise NoResponse()
            if not first and _prefetch(capture):
                # Wait for the first body bytes too: a server sends the head
                # with them anyway, so the client loses nothing, and an
                # upstream failing before its first byte (the head, then a
                # close) is still a failed attempt the predicate may retry.
                for chunk in iterator:
                    first.append(chunk)
                    if chunk:
                        break
        except NoResponse as exc:
            close_iterable(result)
            store.close()
            return Final(respond_error(self.error_handler, env, start_response, exc))
        except BaseException as exc:
            if timer is not None and exc is timer.exc:
                exc = self._timed_out(log_list, before)
            close_iterable(result)
            store.close()
            failed = _failed(exc, env)
            if failed is None:
                raise
            return failed
        return Captured(capture, store, Streaming(first, iterator, result))


def _failed(
    exc: BaseException, environ: WSGIEnvironment, *, restart: bool = False
) -> Failed | None:
    """An attempt that raised, as an outcome to decide on; None for a bug (re-raised).

    A client that went away, an upstream that failed (mid-body: nothing of it
    reached the client yet) and any other oxypy request error are answered
    with their own status; anything else is the wrapped app's bug.
    """
    if client_went_away(exc, environ):
        if not isinstance(exc, ClientDisconnected):
            gone = ClientDisconnected("client went away")
            gone.__cause__ = exc
            exc = gone
        return Failed(exc, restart=restart)
    if isinstance(exc, RequestError):
        return Failed(exc, restart=restart)
    return None


def _past(environ: WSGIEnvironment) -> bool:
    """True once the request's deadline (``oxypy.deadline``) has passed."""
    deadline = environ.get(keys.DEADLINE)
    return deadline is not None and deadline - time.monotonic() <= 0


def _prefetch(capture: Capture) -> bool:
    """Whether to read the first body bytes before deciding: not for a 101
    tunnel or an event stream, whose first bytes may be far away."""
    if capture.code == 101:
        return False
    for name, value in capture.headers:
        if name.lower() == "content-type":
            return value.split(";")[0].strip().lower() != "text/event-stream"
    return True


def _never_sent(outcome: Captured | Failed, new: list[Exchange]) -> bool:
    """True when no byte of this attempt's request reached an upstream.

    Then a request whose body Buffer did not read is still intact in
    ``wsgi.input`` and may be sent again (``UpstreamError.before_send``).
    """
    errors = [x.error for x in new]
    if isinstance(outcome, Failed):
        errors.append(outcome.error)
    return bool(errors) and all(
        isinstance(err, UpstreamError) and err.before_send for err in errors
    )
