"""Mirror: send a copy of the traffic to another upstream and ignore its answer.

Shadow traffic lets a new version of a service see real requests before it
serves them.  Copies are sampled, bounded in body size and in number, sent
from background greenlets and their responses discarded, so the client's
status, body and latency never depend on the mirror being slow, dead or
failing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import random
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import gevent

from . import environ as keys
from ._client.exchange import BodySource
from ._client.request_head import check_framing
from ._core.types import Skip, StartResponse, WSGIApplication, WSGIEnvironment
from .errors import default_error_handler, respond_error
from .exceptions import ConfigurationError, RequestError

__all__ = ["Mirror"]

log = logging.getLogger(__name__)

#: environ keys of the client request that the copy keeps (the rest of
#: ``oxypy.*`` describes the client request's own path through the chain).
_KEPT = frozenset({keys.REQUEST_ID, keys.SERVER})


class _Replay:
    """``wsgi.input`` for the primary after a body prefix was read: prefix, then the rest."""

    __slots__ = ("prefix", "stream")

    def __init__(self, prefix: bytes, stream: Any) -> None:
        self.prefix = prefix
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if self.prefix:
            if size is None or size < 0:
                data, self.prefix = self.prefix + self.stream.read(), b""
                return bytes(data)
            data, self.prefix = self.prefix[:size], self.prefix[size:]
            return data
        return bytes(self.stream.read(size))


def _discard(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


class _Digest:
    """One side's answer as compared: status code, body length and hash (streamed)."""

    __slots__ = ("status", "length", "hash", "limit")

    def __init__(self, limit: int) -> None:
        self.status = ""
        self.length = 0
        self.hash = hashlib.sha256()
        self.limit = limit

    def update(self, chunk: bytes) -> None:
        hashed = self.length
        self.length += len(chunk)
        if hashed < self.limit:
            self.hash.update(chunk if self.length <= self.limit else chunk[: self.limit - hashed])

    def hexdigest(self) -> str:
        return self.hash.hexdigest()[:16]

    def same(self, other: _Digest) -> bool:
        return (
            self.status == other.status
            and self.length == other.length
            and self.hash.digest() == other.hash.digest()
        )


class _Comparison:
    """The primary's and the copy's answers to one request; compared once both are in."""

    __slots__ = ("method", "path", "primary", "copy", "pending")

    def __init__(self, method: str, path: str, limit: int) -> None:
        self.method = method
        self.path = path
        self.primary: _Digest | None = _Digest(limit)
        self.copy: _Digest | None = _Digest(limit)
        self.pending = 2


class _Tap:
    """The primary's body, relayed unchanged while it is hashed for the comparison."""

    __slots__ = ("result", "mirror", "comparison", "done", "closed")

    def __init__(self, result: Iterable[bytes], mirror: Mirror, comparison: _Comparison) -> None:
        self.result = result
        self.mirror = mirror
        self.comparison = comparison
        self.done = False
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        digest = self.comparison.primary
        assert digest is not None
        for chunk in self.result:
            digest.update(chunk)
            yield chunk
        self.done = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            if not self.done:
                self.comparison.primary = None  # cut short: nothing to compare
            self.mirror._settle(self.comparison)


class Mirror:
    """Send a copy of (a sample of) the requests to ``mirror``; discard its answers.

    The client's request goes to ``next_app`` as usual.  For a sampled
    request (``percent`` % at random) a copy goes to ``mirror`` in a
    background greenlet, whose response is read and thrown away.  The
    client's status, headers, body and latency never depend on the mirror:
    a mirror that is slow, refuses connections, answers 5xx or raises is
    only counted.  Upgrade requests (WebSocket) are never copied.

    The request body is read once: when a copy is made it is read (up to
    ``max_body_bytes``) and both the primary and the copy get it with a
    ``Content-Length``; a body declared or found longer than the limit means
    no copy (``too_large``) and the primary still gets the whole body (what
    was read, then the rest of the stream).  Without a copy, the body
    streams to the primary untouched.  With ``mirror_body=False`` the copy
    is sent without a body and the primary's streams.

    **Writes** on the copy's own environ: a fresh ``wsgi.input``, and none of
    the client request's ``oxypy.*`` keys except the request id (so the
    copy's exchanges, target and tried servers stay its own).  Counts on the
    instance: ``mirrored`` (copies started), ``dropped`` (copies not made
    because ``max_in_flight`` copies were running), ``too_large``,
    ``failed`` (copies that raised or whose mirror could not be reached:
    status 502/503/504 answered below it counts too) and ``in_flight``.

    **Compare mode** (``compare=True``), for testing a new version against
    the current one: the primary's status code, body length and a SHA-256 of
    its first ``compare_body_bytes`` bytes (hashed as the body streams to
    the client: constant memory, nothing held back) are compared with the
    copy's once both have finished.  Each difference is one WARNING line on
    the ``oxypy.mirror`` logger, ``mirror differs: GET /path: status 200 vs
    500, body 1234 bytes sha256 ab12… vs 99 bytes cd34…``, carrying
    ``method``, ``path`` (no query string), ``primary_status``,
    ``mirror_status``, ``primary_bytes``, ``mirror_bytes``,
    ``primary_sha256`` and ``mirror_sha256`` (16 hex digits) as extras
    (fields of ``oxypy --log-format json``).  Counted: ``compared`` and
    ``differed`` (:class:`~oxypy.MirrorMetrics` exports every count to
    Prometheus).  A copy that raised, or a primary body the client did
    not take to its end, is not compared.  The client still never waits
    for the copy: whichever side finishes last compares.

    Failures: only the primary's, answered as usual; a client body that
    cannot be read while buffering it for a copy is answered by the default
    error handler (499 when the client went away, 400 for a malformed body).

    :param mirror: a WSGI app, or an upstream URL (then ``Forward(mirror)``).
    :param percent: share of requests copied, 0–100 (sampled at random).
    :param mirror_body: also copy the request body (else the copy has none).
    :param max_body_bytes: bodies longer than this are not copied (>= 0).
    :param max_in_flight: copies running at once at most (>= 1); more are dropped.
    :param compare: compare each copy's answer with the primary's: the status
        code, the body length and a SHA-256 of the body (see above).
    :param compare_body_bytes: bytes of each body hashed at most (>= 0); the
        lengths are always compared in full.
    :param rng: the random source for sampling (a seeded ``random.Random`` in tests).
    :param skip: ``callable(environ) -> bool``; True passes the request straight on.

    Example::

        from oxypy import Forward, Mirror, serve
        app = Mirror(Forward("http://127.0.0.1:9001"), "http://127.0.0.1:9101", percent=10)
        serve(app, "127.0.0.1:8080")

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        next_app: WSGIApplication,
        mirror: WSGIApplication | str,
        /,
        *,
        percent: float = 100.0,
        mirror_body: bool = True,
        max_body_bytes: int = 1 << 20,
        max_in_flight: int = 64,
        compare: bool = False,
        compare_body_bytes: int = 1 << 20,
        rng: random.Random | None = None,
        skip: Skip | None = None,
    ) -> None:
        if not callable(next_app):
            raise ConfigurationError("Mirror needs the next WSGI app as first argument")
        if isinstance(mirror, str):
            from .forward import Forward

            mirror = Forward(mirror)
        elif not callable(mirror):
            raise ConfigurationError("mirror must be a WSGI app or an upstream URL")
        if (
            isinstance(percent, bool)
            or not isinstance(percent, (int, float))
            or not 0 <= percent <= 100
            or math.isnan(percent)
        ):
            raise ConfigurationError(f"percent must be a number from 0 to 100, got {percent!r}")
        if (
            isinstance(max_body_bytes, bool)
            or not isinstance(max_body_bytes, int)
            or max_body_bytes < 0
        ):
            raise ConfigurationError(f"max_body_bytes must be an int >= 0, got {max_body_bytes!r}")
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ConfigurationError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if (
            isinstance(compare_body_bytes, bool)
            or not isinstance(compare_body_bytes, int)
            or compare_body_bytes < 0
        ):
            raise ConfigurationError(
                f"compare_body_bytes must be an int >= 0, got {compare_body_bytes!r}"
            )
        self.next_app = next_app
        self.mirror = mirror
        self.compare = bool(compare)
        self.compare_body_bytes = compare_body_bytes
        self.percent = float(percent)
        self.mirror_body = bool(mirror_body)
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.rng = rng if rng is not None else random.Random()
        self.skip = skip
        self._lock = threading.Lock()
        self.in_flight = 0
        self.mirrored = 0
        self.dropped = 0
        self.too_large = 0
        self.failed = 0
        self.compared = 0
        self.differed = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.skip is not None and self.skip(environ):
            return self.next_app(environ, start_response)
        if "HTTP_UPGRADE" in environ or not self._sampled():
            return self.next_app(environ, start_response)
        try:
            framing = check_framing(environ)
        except RequestError:
            return self.next_app(environ, start_response)  # the primary answers it
        copy_body = self.mirror_body and framing.has_body
        if copy_body and framing.length is not None and framing.length > self.max_body_bytes:
            self._count_too_large()
            return self.next_app(environ, start_response)
        with self._lock:
            if self.in_flight >= self.max_in_flight:
                self.dropped += 1
                return self.next_app(environ, start_response)
            self.in_flight += 1
        primary = environ
        try:
            copy = self._copy_environ(environ)
            if copy_body:
                primary = dict(environ)
                try:
                    body = self._read_body(primary, framing.length)
                except RequestError as exc:
                    self._release()
                    return respond_error(default_error_handler, environ, start_response, exc)
                if body is None:
                    self._release()
                    self._count_too_large()
                    return self.next_app(primary, start_response)
                for env in (primary, copy):
                    env["CONTENT_LENGTH"] = str(len(body))
                    env.pop("HTTP_TRANSFER_ENCODING", None)
                    env["wsgi.input_terminated"] = True
                primary["wsgi.input"] = io.BytesIO(body)
                copy["wsgi.input"] = io.BytesIO(body)
            elif framing.has_body:
                copy["CONTENT_LENGTH"] = "0"
                copy.pop("HTTP_TRANSFER_ENCODING", None)
            with self._lock:
                self.mirrored += 1
            comparison = None
            if self.compare:
                path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
                method = environ.get("REQUEST_METHOD", "GET")
                comparison = _Comparison(method, path, self.compare_body_bytes)
            gevent.spawn(self._send_copy, copy, comparison)
        except BaseException:
            self._release()
            raise
        if comparison is None:
            return self.next_app(primary, start_response)
        return self._tap(primary, start_response, comparison)

    def _tap(
        self, environ: WSGIEnvironment, start_response: StartResponse, comparison: _Comparison
    ) -> Iterable[bytes]:
        """The primary's response, its status and body fed to ``comparison`` unchanged."""
        digest = comparison.primary
        assert digest is not None

        def observe(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            digest.status = status[:3]
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        try:
            result = self.next_app(environ, observe)
        except BaseException:
            comparison.primary = None
            self._settle(comparison)
            raise
        if type(result) is list:  # complete already: hashed now, handed on as it is
            for chunk in result:
                digest.update(chunk)
            self._settle(comparison)
            return result
        return _Tap(result, self, comparison)

    def _settle(self, comparison: _Comparison) -> None:
        """One side is in; the second compares (and logs a difference)."""
        with self._lock:
            comparison.pending -= 1
            if comparison.pending:
                return
        primary, copy = comparison.primary, comparison.copy
        if primary is None or copy is None:
            return
        same = primary.same(copy)
        with self._lock:
            self.compared += 1
            if not same:
                self.differed += 1
        if same:
            return
        fields = {
            "method": comparison.method,
            "path": comparison.path,
            "primary_status": primary.status,
            "mirror_status": copy.status,
            "primary_bytes": primary.length,
            "mirror_bytes": copy.length,
            "primary_sha256": primary.hexdigest(),
            "mirror_sha256": copy.hexdigest(),
        }
        log.warning(
            "mirror differs: %s %s: status %s vs %s, body %d bytes sha256 %s vs %d bytes sha256 %s",
            comparison.method,
            comparison.path,
            primary.status,
            copy.status,
            primary.length,
            fields["primary_sha256"],
            copy.length,
            fields["mirror_sha256"],
            extra=fields,
        )

    # -- helpers ----------------------------------------------------------------
    def _sampled(self) -> bool:
        if self.percent >= 100.0:
            return True
        with self._lock:
            return self.rng.random() * 100.0 < self.percent

    def _count_too_large(self) -> None:
        with self._lock:
            self.too_large += 1

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    @staticmethod
    def _copy_environ(environ: WSGIEnvironment) -> WSGIEnvironment:
        copy = {k: v for k, v in environ.items() if not k.startswith("oxypy.") or k in _KEPT}
        copy["wsgi.input"] = io.BytesIO(b"")
        return copy

    def _read_body(self, environ: WSGIEnvironment, length: int | None) -> bytes | None:
        """The whole body, or None when it is over the limit.

        Then ``environ["wsgi.input"]`` (the primary's copy) replays what was
        read before the rest of the stream, so the primary gets all of it.
        """
        stream = environ["wsgi.input"]
        parts: list[bytes] = []
        size = 0
        for data in BodySource(stream, length).chunks():
            parts.append(data)
            size += len(data)
            if size > self.max_body_bytes:
                environ["wsgi.input"] = _Replay(b"".join(parts), stream)
                return None
        return b"".join(parts)

    def _send_copy(self, env: WSGIEnvironment, comparison: _Comparison | None = None) -> None:
        failed = False
        status: list[str] = []
        digest = comparison.copy if comparison is not None else None
        answered = False

        def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status[:] = [line]
            return _discard(line, headers)

        result: Iterable[bytes] | None = None
        try:
            result = self.mirror(env, start_response)
            if digest is None:
                for _ in result:
                    pass
            else:
                for chunk in result:
                    digest.update(chunk)
            answered = True
            failed = not status or status[0][:3] in ("502", "503", "504")
        except gevent.GreenletExit:
            failed = True
            raise
        except Exception as exc:  # noqa: BLE001 - the mirror must never reach the client
            failed = True
            log.info("mirror copy of %s failed: %r", env.get("PATH_INFO"), exc)
        finally:
            close = getattr(result, "close", None)
            try:
                if close is not None:
                    close()
            except Exception:  # noqa: BLE001 - as above
                failed = True
            with self._lock:
                self.in_flight -= 1
                if failed:
                    self.failed += 1
            if comparison is not None:
                assert digest is not None
                if answered and status:
                    digest.status = status[0][:3]
                else:  # raised or cut short: no answer to compare, only counted as failed
                    comparison.copy = None
                self._settle(comparison)
