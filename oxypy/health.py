"""Server health for the balancers: active checks and passive outlier ejection.

:class:`HealthCheck` probes every server on an interval from one greenlet
per balancer and takes servers out of rotation after consecutive failures
(Envoy's ``health_checks``, Traefik's ``healthCheck``).
:class:`OutlierDetection` watches real traffic instead: after consecutive
network errors or timeouts, or a failure ratio over a window, it ejects a
server for a time that grows with each ejection (Envoy's
``outlier_detection``, nginx's ``max_fails``/``fail_timeout``).  oxy had
neither.

Both are plain configuration values (frozen dataclasses checked when
built); the machinery that acts on them lives in :mod:`oxypy._balance`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import KW_ONLY, dataclass

from .exceptions import ConfigurationError

__all__ = ["HealthCheck", "OutlierDetection"]


def _positive(name: str, value: object, *, integer: bool = False) -> None:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:  # type: ignore[operator]
        raise ConfigurationError(
            f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}"
        )


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checking: ``RoundRobin(fwd, servers, health_check=HealthCheck())``.

    One greenlet per balancer (started by the balancer, stopped by its
    ``close()``) sends ``GET <server><path>`` to every server each
    ``interval`` seconds, all servers at once, with urllib3 (``retries=False``,
    no redirects).  A server passes when it answers a status in
    ``expect_status`` within ``timeout``; anything else (refused, reset,
    timeout, other status) is a failure.  Servers start healthy;
    ``unhealthy_threshold`` consecutive failures take a server out of rotation
    (event ``unhealthy``), ``healthy_threshold`` consecutive passes bring it
    back (event ``healthy``).  Checks run with gevent, as the server does.

    A frozen value: it may be shared by several balancers, each running its
    own checker.  Bad options raise :class:`~oxypy.ConfigurationError` naming
    the option.

    :param path: request path appended to the server's URL (default ``/healthz``).
    :param interval: seconds between rounds (default 10).
    :param timeout: connect and read timeout of one probe (default 2).
    :param healthy_threshold: passes needed to return (default 2).
    :param unhealthy_threshold: failures needed to leave (default 3).
    :param expect_status: an int, or a collection/range of ints (default 200);
        kept as a ``frozenset`` (or the ``range``).
    :param host: a ``Host`` header to send instead of the server's own.

    Example::

        from oxypy import Forward, HealthCheck, RoundRobin
        lb = RoundRobin(Forward(), ["http://10.0.0.1:80", "http://10.0.0.2:80"],
                        health_check=HealthCheck("/ready", interval=5))
        ...
        lb.close()  # stops the checker

    .. versionadded:: 0.1
    """

    path: str = "/healthz"
    _: KW_ONLY
    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expect_status: int | Collection[int] = 200
    host: str | None = None

    def __post_init__(self) -> None:
        path = self.path
        if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n"):
            raise ConfigurationError(f"path must start with '/' and have no spaces: {path!r}")
        _positive("interval", self.interval)
        _positive("timeout", self.timeout)
        _positive("healthy_threshold", self.healthy_threshold, integer=True)
        _positive("unhealthy_threshold", self.unhealthy_threshold, integer=True)
        expect = self.expect_status
        if isinstance(expect, int) and not isinstance(expect, bool):
            statuses: Collection[int] = frozenset({expect})
        elif isinstance(expect, range):
            statuses = expect
        elif isinstance(expect, Collection) and not isinstance(expect, str | bytes):
            statuses = frozenset(expect)
        else:
            raise ConfigurationError("expect_status must be an int or a collection of ints")
        if not statuses or not all(
            isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in statuses
        ):
            raise ConfigurationError("expect_status must name HTTP statuses (100-599)")
        host = self.host
        if host is not None and (
            not isinstance(host, str) or not host or any(c in host for c in " \r\n")
        ):
            raise ConfigurationError(f"host must be a non-empty header value, got {host!r}")
        object.__setattr__(self, "interval", float(self.interval))
        object.__setattr__(self, "timeout", float(self.timeout))
        object.__setattr__(self, "expect_status", statuses)

    def accepts(self, status: int) -> bool:
        """Whether a probe answered with ``status`` passes."""
        expect = self.expect_status
        return status == expect if isinstance(expect, int) else status in expect


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive ejection of failing servers, from the traffic itself.

    The balancer reads the exchanges ``Forward`` recorded below it for each
    request (``environ["oxypy.exchanges"]``, in ``close()``).  A *failure* is
    a network error of Forward's own: refused, reset, invalid response (the
    502 it produced) and timeouts, connect or read (the 504), so an upstream
    that accepts and then hangs is ejected after ``consecutive_errors``
    timeouts, long before a health check would notice.  An upstream that
    answers 5xx by itself is a success here, and a client that went away
    counts as nothing.

    A server is ejected after ``consecutive_errors`` failures in a row, or,
    when ``failure_ratio`` is set, when at least that share of its last
    ``window`` results failed.  The n-th ejection in a row lasts
    ``base_ejection_time × n`` seconds (capped at ``max_ejection_time``); n
    starts again at 1 once a returned server has stayed in for as long as its
    last ejection lasted.  Ejected servers return automatically when their
    time is up (checked lazily at each pick with the balancer's clock).  Never
    more than ``max_ejection_percent`` of the pool is ejected at once, so a
    pool of one server is never ejected (there is nothing to fail over to).
    Results of requests that were in flight when their server left rotation
    are ignored.

    A frozen value; bad options raise :class:`~oxypy.ConfigurationError`
    naming the option.

    :param consecutive_errors: failures in a row that eject (default 5; None: off).
    :param failure_ratio: share of failures in the window that ejects (default off).
    :param window: results kept per server for ``failure_ratio`` (default 10).
    :param base_ejection_time: seconds of the first ejection (default 30).
    :param max_ejection_time: longest ejection in seconds (default 300; raised
        to ``base_ejection_time`` when below it).
    :param max_ejection_percent: largest share of the pool ejected (default 50).

    Example::

        lb = RoundRobin(Forward(read_timeout=5), servers,
                        outlier_detection=OutlierDetection(consecutive_errors=3))

    .. versionadded:: 0.1
    """

    _: KW_ONLY
    consecutive_errors: int | None = 5
    failure_ratio: float | None = None
    window: int = 10
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0

    def __post_init__(self) -> None:
        if self.consecutive_errors is not None:
            _positive("consecutive_errors", self.consecutive_errors, integer=True)
        ratio = self.failure_ratio
        if ratio is not None:
            _positive("failure_ratio", ratio)
            if ratio > 1:
                raise ConfigurationError(f"failure_ratio must be in (0, 1], got {ratio!r}")
        if self.consecutive_errors is None and ratio is None:
            raise ConfigurationError("set consecutive_errors or failure_ratio (or both)")
        _positive("window", self.window, integer=True)
        _positive("base_ejection_time", self.base_ejection_time)
        _positive("max_ejection_time", self.max_ejection_time)
        percent = self.max_ejection_percent
        if (
            isinstance(percent, bool)
            or not isinstance(percent, int | float)
            or not 0 <= percent <= 100
        ):
            raise ConfigurationError(f"max_ejection_percent must be in [0, 100], got {percent!r}")
        base = float(self.base_ejection_time)
        object.__setattr__(self, "base_ejection_time", base)
        object.__setattr__(self, "max_ejection_time", max(float(self.max_ejection_time), base))
        object.__setattr__(self, "max_ejection_percent", float(percent))
        if ratio is not None:
            object.__setattr__(self, "failure_ratio", float(ratio))
