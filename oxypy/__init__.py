"""oxypy: composable WSGI middleware for HTTP reverse proxies and gateways.

Every block is a WSGI application wrapping the next one, like Go handlers::

    from oxypy import Forward, serve
    serve(Forward("http://127.0.0.1:9000"), "127.0.0.1:8080")
"""

from __future__ import annotations

import logging

from .errors import ErrorHandler, default_error_handler
from .exceptions import (
    BadRequest,
    BodyTooLarge,
    CircuitOpen,
    ClientDisconnected,
    ConfigurationError,
    ConnLimitReached,
    NoServers,
    NoTarget,
    OxypyError,
    PredicateError,
    RateLimited,
    RequestError,
    ResponseTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .forward import Exchange, Forward, OutgoingRequest, ResponseHead
from .server import Server, serve

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0.dev0"

__all__ = [
    # building blocks
    "Forward",
    # serving
    "Server",
    "serve",
    # hooks and records
    "ErrorHandler",
    "Exchange",
    "OutgoingRequest",
    "ResponseHead",
    "default_error_handler",
    # exceptions
    "BadRequest",
    "BodyTooLarge",
    "CircuitOpen",
    "ClientDisconnected",
    "ConfigurationError",
    "ConnLimitReached",
    "NoServers",
    "NoTarget",
    "OxypyError",
    "PredicateError",
    "RateLimited",
    "RequestError",
    "ResponseTooLarge",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]
