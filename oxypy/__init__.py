"""oxypy: composable WSGI middleware for HTTP reverse proxies and gateways.

Every block is a WSGI application wrapping the next one, like Go handlers::

    from oxypy import Forward, serve
    serve(Forward("http://127.0.0.1:9000"), "127.0.0.1:8080")
"""

from __future__ import annotations

# First: under ``python -m oxypy`` it patches the process before ssl is imported.
from ._cli import boot as _boot  # noqa: F401  # isort: skip

import logging

from ._core.types import Clock
from .buffer import Buffer
from .cbreaker import CircuitBreaker
from .compress import Compress
from .config import Gateway, load_app, load_config
from .connlimit import ConnLimit, ConnStore, Lease
from .consistenthash import ConsistentHash
from .cors import CORS
from .errors import ErrorHandler, default_error_handler
from .exceptions import (
    BadRequest,
    BodyTooLarge,
    CircuitOpen,
    ClientDisconnected,
    ConfigFileError,
    ConfigurationError,
    ConnLimitReached,
    DeadlineExceeded,
    NoResponse,
    NoServers,
    NoTarget,
    OxypyError,
    PredicateError,
    RateLimited,
    RequestError,
    ResponseTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHeaderTimeout,
    UpstreamProtocolError,
    UpstreamReadError,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamTryTimeout,
)
from .extractors import SourceExtractor
from .fallback import RedirectFallback, ResponseFallback, Webhook
from .forward import Exchange, Forward, OutgoingRequest, ResponseHead
from .forwardauth import ForwardAuth
from .headers import Headers
from .health import HealthCheck, OutlierDetection
from .hedge import Hedge
from .ipallow import IPAllowList
from .leastrequest import LeastRequest
from .mirror import Mirror
from .otel import OpenTelemetry
from .predicate import Func, Predicate, compile_predicate
from .prometheus import (
    BreakerStateGauge,
    MirrorMetrics,
    PrometheusMetrics,
    RetryBudgetMetrics,
    metrics_app,
)
from .ratelimit import Rate, RateLimit, RateStore, Verdict
from .rebalancer import Rebalancer

# oxypy.redis imports the redis package only when a store is created, so these
# names cost nothing (and need nothing) until used.
from .redis import RedisConnStore, RedisStore
from .registry import RedisRegistry
from .requestid import RequestID
from .retrybudget import RetryBudget
from .rewrite import Rewrite
from .roundrobin import RoundRobin
from .router import Router
from .server import Server, serve
from .status import StatusPage
from .sticky import StickySession
from .timeout import Timeout
from .trace import Trace

#: The name issue 7 and the README use; ``prometheus_client`` is needed only
#: when one is constructed (the ``prometheus`` extra).
Metrics = PrometheusMetrics

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0.dev0"

# THE public API: docs/public-api.md lists the same names in the same groups
# (tests/test_api_contract.py holds the two together).
__all__ = [
    # building blocks
    "Buffer",
    "CORS",
    "CircuitBreaker",
    "Compress",
    "ConnLimit",
    "ConsistentHash",
    "Forward",
    "ForwardAuth",
    "Headers",
    "Hedge",
    "IPAllowList",
    "LeastRequest",
    "Metrics",
    "Mirror",
    "OpenTelemetry",
    "PrometheusMetrics",
    "RateLimit",
    "Rebalancer",
    "RequestID",
    "Rewrite",
    "RoundRobin",
    "Router",
    "StatusPage",
    "Timeout",
    "Trace",
    "metrics_app",
    # their options
    "BreakerStateGauge",
    "HealthCheck",
    "MirrorMetrics",
    "OutlierDetection",
    "Rate",
    "RedirectFallback",
    "RedisConnStore",
    "RedisRegistry",
    "RedisStore",
    "ResponseFallback",
    "RetryBudget",
    "RetryBudgetMetrics",
    "StickySession",
    "Webhook",
    # protocols a user implements (and what they return)
    "Clock",
    "ConnStore",
    "ErrorHandler",
    "Lease",
    "RateStore",
    "SourceExtractor",
    "Verdict",
    # the predicate language
    "Func",
    "Predicate",
    "compile_predicate",
    # serving
    "Server",
    "serve",
    # configuration files
    "Gateway",
    "load_app",
    "load_config",
    # hooks and records
    "Exchange",
    "OutgoingRequest",
    "ResponseHead",
    "default_error_handler",
    # exceptions
    "BadRequest",
    "BodyTooLarge",
    "CircuitOpen",
    "ClientDisconnected",
    "ConfigFileError",
    "ConfigurationError",
    "ConnLimitReached",
    "DeadlineExceeded",
    "NoResponse",
    "NoServers",
    "NoTarget",
    "OxypyError",
    "PredicateError",
    "RateLimited",
    "RequestError",
    "ResponseTooLarge",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamHeaderTimeout",
    "UpstreamProtocolError",
    "UpstreamReadError",
    "UpstreamTimeout",
    "UpstreamTLSError",
    "UpstreamTryTimeout",
]
