"""The redis-py client every Redis-backed part uses: imported lazily, made from a URL with
short timeouts and no retries, or taken as given; and a short name for log lines.

``import oxypy`` never imports redis-py: :func:`import_redis` does, when a
store or a registry is created, and turns its absence into a
:class:`~oxypy.ConfigurationError` naming the extra to install.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import ConfigurationError

__all__ = ["client_for", "describe_client", "import_redis", "redis_errors"]


def import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "the Redis backends need redis-py: pip install 'oxypy-gateway[redis]'"
        ) from exc
    return redis


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a failed Redis call raises: redis-py's errors and socket errors."""
    return (import_redis().RedisError, OSError)


def client_for(url_or_client: Any, timeout: float) -> tuple[Any, bool]:
    """``(client, owned)``: a new client for a URL (``timeout`` to connect and per
    reply, no retries), or the redis-py client object given (not owned)."""
    redis = import_redis()
    if not isinstance(url_or_client, str):
        if not callable(getattr(url_or_client, "register_script", None)):
            raise ConfigurationError(
                "expected a Redis URL (redis://, rediss://, unix://) or a redis-py client "
                f"object, got {type(url_or_client).__name__}"
            )
        return url_or_client, False
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        client = redis.Redis.from_url(
            url_or_client,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {url_or_client!r}: {exc}") from exc
    return client, True


def describe_client(client: Any) -> str:
    """A short name of a client object for the log lines (never its password)."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None) or {}
    host, port = kwargs.get("host"), kwargs.get("port")
    where = f" {host}:{port}" if host else ""
    return f"<{type(client).__name__}{where}>"
