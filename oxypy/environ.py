"""Every ``environ`` key oxypy reads or writes, in one place.

The contract keys (:data:`TARGET`, :data:`ATTEMPT`) are flat, as ``API.md``
names them.  Keys private to one block are ``oxypy.<block>.<name>``.  Blocks
that call ``next`` more than once pass a shallow copy of the environ, so any
value meant to travel *back up* the chain (the exchange log) is a mutable
object shared by reference between the copies.
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT",
    "CLIENT_GONE",
    "DEADLINE",
    "ERROR",
    "EXCHANGES",
    "FORWARDAUTH_FAILURE",
    "FORWARDED_PREFIX",
    "OTEL",
    "RAW_URI",
    "RETRY_AFTER",
    "RETRY_BUDGETS",
    "REQUEST_ID",
    "REQUEST_ID_ORIG",
    "REWRITE_ORIG",
    "SEND_TRAILERS",
    "SERVER",
    "TARGET",
    "TRIED_TARGETS",
    "TRY_DEADLINE",
]

#: The upstream base URL (``scheme://host:port[/base/path]``) that ``Forward``
#: sends this request to.  Set by balancers or by the user.
TARGET = "oxypy.target"

#: 1 for the first try, 2 for the first retry, ...  Set by ``Buffer``.
ATTEMPT = "oxypy.attempt"

#: A list of :class:`oxypy.Exchange` records, one per upstream request that
#: ``Forward`` made for this client request (retries append).  Created by the
#: outermost block that needs it and shared by reference with every copy of
#: the environ, so outer blocks (Buffer, CircuitBreaker, Trace, balancers) read
#: what happened below them, each through ``oxypy._core.exchange.mark``.
EXCHANGES = "oxypy.exchanges"

#: The request's deadline: an absolute ``time.monotonic()`` value set by
#: ``Timeout`` (an inner ``Timeout`` keeps an earlier deadline already set).
#: ``Forward`` caps its connect, send, head and body waits at what remains;
#: ``Buffer`` stops retrying and backing off once it has passed.
DEADLINE = "oxypy.deadline"

#: The current attempt's deadline for its response head: an absolute
#: ``time.monotonic()`` value set by ``Buffer(per_try_timeout=)`` on each
#: attempt's environ.  ``Forward`` caps connect, send and the head wait at it
#: (the body, relayed after the retry decision, is bounded by
#: :data:`DEADLINE` only).
TRY_DEADLINE = "oxypy.try_deadline"

#: The :class:`oxypy.exceptions.RequestError` that ended this request, if any
#: (set on the environ of the block that raised it, copied into the exchange).
ERROR = "oxypy.error"

#: Targets already tried for this client request (a set shared by reference);
#: balancers avoid them on a retry when another server is available.
TRIED_TARGETS = "oxypy.tried_targets"

#: ``RetryBudget``: ids of the budgets that already counted this client
#: request (a set shared by reference between environ copies), so a request
#: passing through two blocks sharing one budget is counted once.
RETRY_BUDGETS = "oxypy.retry_budgets"

#: The request id minted or validated by ``RequestID``.
REQUEST_ID = "oxypy.request_id"

#: The raw request-target as received by ``oxypy.serve`` (also ``RAW_URI``).
RAW_URI = "RAW_URI"

#: ``Rewrite``: the request keys as they were before the rewrite (a dict of the
#: ``PATH_INFO``/``QUERY_STRING``/``RAW_URI``/``REQUEST_URI`` values present).
REWRITE_ORIG = "oxypy.rewrite.orig"

#: ``RequestID``: the incoming id header value it replaced (invalid or untrusted).
REQUEST_ID_ORIG = "oxypy.requestid.orig"

#: Set to ``"oxypy"`` by ``oxypy.serve`` / ``Server`` on every request it
#: serves, so an application can tell which server runs it.
SERVER = "oxypy.server"

#: Optional, provided by a server: a ``() -> bool`` callable that is True once
#: the client connection has closed.  ``Buffer`` polls it to stop retrying (and
#: backing off) for a client that has gone.
CLIENT_GONE = "oxypy.client_gone"

#: ``ForwardAuth``: on the auth request's own environ, the error that kept the
#: auth service from answering (set by its Forward's error hook).
FORWARDAUTH_FAILURE = "oxypy.forwardauth.failure"

#: The path prefix removed from the request before ``Forward`` (by
#: ``Rewrite(strip_prefix=)`` or ``Router(strip=True)``), percent-encoded as
#: the client sent it, e.g. ``"/app"``; nested strips append.  ``Forward``
#: sends it upstream as ``X-Forwarded-Prefix`` and puts it back in
#: ``Location`` when ``rewrite_location`` is on.  Absent when nothing was
#: stripped (a plain WSGI mount forwards its full path and needs none).
FORWARDED_PREFIX = "oxypy.forwarded_prefix"

#: Provided by ``oxypy.serve`` / ``Server``: a ``(trailers) -> None`` callable
#: taking a list of ``(name, value)`` pairs.  Called before the response body
#: ends, it makes the server end a chunked response with those trailer
#: fields (a response framed by ``Content-Length`` has no room for them: they
#: are dropped).  ``Forward`` calls it to relay an upstream's trailers when
#: the client sent ``TE: trailers``; under servers without it (gunicorn's
#: sync/gevent workers, pywsgi, uWSGI) trailers are dropped.
SEND_TRAILERS = "oxypy.send_trailers"

#: Set by ``CircuitBreaker`` before it calls its ``fallback``: whole seconds
#: (an ``int``, at least 1) until the breaker lets requests through again.
#: ``ResponseFallback`` sends it as ``Retry-After`` on a 503 or 429.
RETRY_AFTER = "oxypy.retry_after"

#: Set by ``OpenTelemetry`` for the request it makes a SERVER span for: the
#: request's telemetry (see :class:`oxypy._core.telemetry.Telemetry`), shared
#: by reference with every copy of the environ.  ``Forward`` asks it for a
#: CLIENT span (and the ``traceparent`` to send) per upstream attempt, error
#: responses and ``CircuitBreaker`` add events to it, ``Trace`` reads the
#: trace and span ids and ``PrometheusMetrics`` the exemplar.  Absent when no
#: ``OpenTelemetry`` block is in the chain: one dictionary lookup is then all
#: it costs them.
OTEL = "oxypy.otel"
