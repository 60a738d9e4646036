"""Server health for the balancers: active checks and passive outlier ejection.

:class:`HealthCheck` probes every server on an interval from one greenlet
per balancer and takes servers out of rotation after consecutive failures
(Envoy's ``health_checks``, Traefik's ``healthCheck``).
:class:`OutlierDetection` watches real traffic instead: after consecutive
network errors, or a failure ratio over a window, it ejects a server for a
time that grows with each ejection (Envoy's ``outlier_detection``, nginx's
``max_fails``/``fail_timeout``).  oxy had neither.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import urllib3

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._balance.pool import Event, Pool, ServerState

__all__ = ["HealthCheck", "OutlierDetection"]

log = logging.getLogger(__name__)


def _positive(name: str, value: object, *, integer: bool = False) -> None:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:  # type: ignore[operator]
        raise ConfigurationError(f"{name} must be a positive {'int' if integer else 'number'}")


class HealthCheck:
    """Active health checking: ``RoundRobin(fwd, servers, health_check=HealthCheck())``.

    One greenlet per balancer (started by the balancer, stopped by its
    ``close()``) sends ``GET <server><path>`` to every server each
    ``interval`` seconds, one server after another, with urllib3
    (``retries=False``, no redirects).  A server passes when it answers a
    status in ``expect_status`` within ``timeout``; anything else (refused,
    reset, timeout, other status) is a failure.  Servers start healthy;
    ``unhealthy_threshold`` consecutive failures take a server out of rotation
    (event ``unhealthy``), ``healthy_threshold`` consecutive passes bring it
    back (event ``healthy``).  Checks run with gevent, as the server does.

    :param path: request path appended to the server's URL (default ``/healthz``).
    :param interval: seconds between rounds (default 10).
    :param timeout: connect and read timeout of one probe (default 2).
    :param healthy_threshold: passes needed to return (default 2).
    :param unhealthy_threshold: failures needed to leave (default 3).
    :param expect_status: an int, or a collection/range of ints (default 200).
    :param host: a ``Host`` header to send instead of the server's own.

    Example::

        from oxypy import Forward, HealthCheck, RoundRobin
        lb = RoundRobin(Forward(), ["http://10.0.0.1:80", "http://10.0.0.2:80"],
                        health_check=HealthCheck(path="/ready", interval=5))
        ...
        lb.close()  # stops the checker

    .. versionadded:: 0.1
    """

    __slots__ = (
        "path",
        "interval",
        "timeout",
        "healthy_threshold",
        "unhealthy_threshold",
        "expect_status",
        "host",
    )

    def __init__(
        self,
        path: str = "/healthz",
        *,
        interval: float = 10.0,
        timeout: float = 2.0,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 3,
        expect_status: int | Collection[int] = 200,
        host: str | None = None,
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n"):
            raise ConfigurationError(f"path must start with '/' and have no spaces: {path!r}")
        _positive("interval", interval)
        _positive("timeout", timeout)
        _positive("healthy_threshold", healthy_threshold, integer=True)
        _positive("unhealthy_threshold", unhealthy_threshold, integer=True)
        if isinstance(expect_status, int) and not isinstance(expect_status, bool):
            statuses: Collection[int] = frozenset({expect_status})
        elif isinstance(expect_status, range):
            statuses = expect_status
        elif isinstance(expect_status, Collection) and not isinstance(expect_status, str):
            statuses = frozenset(expect_status)
        else:
            raise ConfigurationError("expect_status must be an int or a collection of ints")
        if not statuses or not all(
            isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in statuses
        ):
            raise ConfigurationError("expect_status must name HTTP statuses (100-599)")
        self.path = path
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.expect_status = statuses
        self.host = host

    def _apply(self, server: ServerState, passed: bool, events: list[Event]) -> None:
        """Count one probe result; change ``server.healthy`` at a threshold."""
        if passed:
            server.check_streak = server.check_streak + 1 if server.check_streak > 0 else 1
            if not server.healthy and server.check_streak >= self.healthy_threshold:
                server.healthy = True
                events.append((server.url, "healthy"))
        else:
            server.check_streak = server.check_streak - 1 if server.check_streak < 0 else -1
            if server.healthy and -server.check_streak >= self.unhealthy_threshold:
                server.healthy = False
                events.append((server.url, "unhealthy"))


class _HealthChecker:
    """The greenlet probing a balancer's pool: one round every ``interval``,
    each round probing all servers concurrently."""

    def __init__(self, config: HealthCheck, pool: Pool) -> None:
        self.config = config
        self.pool = pool
        self.http = urllib3.PoolManager(
            num_pools=64,
            maxsize=1,
            retries=False,
            timeout=urllib3.Timeout(connect=config.timeout, read=config.timeout),
        )
        self.greenlet: Any = None

    def start(self) -> None:
        import gevent

        self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        greenlet, self.greenlet = self.greenlet, None
        if greenlet is not None:
            greenlet.kill(block=True, timeout=self.config.timeout + 1)
        self.http.clear()

    def probe(self, url: str) -> bool:
        config = self.config
        headers = {"Host": config.host} if config.host else {}
        headers["User-Agent"] = "oxypy-health-check"
        try:
            resp = self.http.request(
                "GET", url.rstrip("/") + config.path, headers=headers, redirect=False
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.debug("health check of %s failed: %s", url, exc)
            return False
        return resp.status in config.expect_status

    def check(self, server: Any) -> None:
        """Probe one server and apply the result as soon as it is known."""
        passed = self.probe(server.url)
        events: list[Event] = []
        with self.pool.lock:
            if server.member:
                self.config._apply(server, passed, events)
        self.pool.notify(events)

    def round(self) -> None:
        """Probe every server at once, so one hanging server delays no other."""
        import gevent

        jobs = [gevent.spawn(self.check, server) for server in self.pool.snapshot()]
        try:
            gevent.joinall(jobs, timeout=2 * self.config.timeout + 1)
        finally:
            gevent.killall([job for job in jobs if not job.dead], block=False)

    def _run(self) -> None:
        import gevent

        while True:
            try:
                self.round()
            except Exception:  # keep checking: a bug here must not stop health checks
                log.exception("health check round failed")
            gevent.sleep(self.config.interval)


class OutlierDetection:
    """Passive ejection of failing servers, from the traffic itself.

    The balancer reads the exchanges ``Forward`` recorded below it for each
    request (``environ["oxypy.exchanges"]``, in ``close()``).  A *failure* is
    a network error of Forward's own (refused, reset, timeout, invalid
    response: the 502/504 it produced); an upstream that answers 5xx by itself
    is a success here, and a client that went away counts as nothing.

    A server is ejected after ``consecutive_errors`` failures in a row, or,
    when ``failure_ratio`` is set, when at least that share of its last
    ``window`` results failed.  The n-th ejection in a row lasts
    ``base_ejection_time × n`` seconds (capped at ``max_ejection_time``); n
    starts again at 1 once a returned server has stayed in for as long as its
    last ejection lasted.  Ejected servers return automatically when their
    time is up (checked lazily at each pick with the balancer's clock).  Never
    more than ``max_ejection_percent`` of the pool is ejected at once, so a
    pool of one server is never ejected (there is nothing to fail over to).

    :param consecutive_errors: failures in a row that eject (default 5; None: off).
    :param failure_ratio: share of failures in the window that ejects (default off).
    :param window: results kept per server for ``failure_ratio`` (default 10).
    :param base_ejection_time: seconds of the first ejection (default 30).
    :param max_ejection_time: longest ejection in seconds (default 300).
    :param max_ejection_percent: largest share of the pool ejected (default 50).

    Example::

        lb = RoundRobin(Forward(), servers,
                        outlier_detection=OutlierDetection(consecutive_errors=3))

    .. versionadded:: 0.1
    """

    __slots__ = (
        "consecutive_errors",
        "failure_ratio",
        "window",
        "base_ejection_time",
        "max_ejection_time",
        "max_ejection_percent",
    )

    def __init__(
        self,
        *,
        consecutive_errors: int | None = 5,
        failure_ratio: float | None = None,
        window: int = 10,
        base_ejection_time: float = 30.0,
        max_ejection_time: float = 300.0,
        max_ejection_percent: float = 50.0,
    ) -> None:
        if consecutive_errors is not None:
            _positive("consecutive_errors", consecutive_errors, integer=True)
        if failure_ratio is not None:
            _positive("failure_ratio", failure_ratio)
            if failure_ratio > 1:
                raise ConfigurationError("failure_ratio must be in (0, 1]")
        if consecutive_errors is None and failure_ratio is None:
            raise ConfigurationError("set consecutive_errors or failure_ratio (or both)")
        _positive("window", window, integer=True)
        _positive("base_ejection_time", base_ejection_time)
        _positive("max_ejection_time", max_ejection_time)
        if (
            isinstance(max_ejection_percent, bool)
            or not isinstance(max_ejection_percent, int | float)
            or not 0 <= max_ejection_percent <= 100
        ):
            raise ConfigurationError("max_ejection_percent must be in [0, 100]")
        self.consecutive_errors = consecutive_errors
        self.failure_ratio = failure_ratio
        self.window = window
        self.base_ejection_time = float(base_ejection_time)
        self.max_ejection_time = float(max(max_ejection_time, base_ejection_time))
        self.max_ejection_percent = float(max_ejection_percent)

    def _record(
        self,
        server: ServerState,
        failed: bool,
        now: float,
        pool: list[ServerState],
        events: list[Event],
    ) -> None:
        """Count one result for ``server`` (pool lock held); eject it if due."""
        if server.ejected_until is not None:
            return  # a straggler that was in flight when the server was ejected
        server.consecutive_errors = server.consecutive_errors + 1 if failed else 0
        recent = server.recent
        if self.failure_ratio is not None:
            if recent.maxlen != self.window:
                server.recent = recent = deque(recent, maxlen=self.window)
            recent.append(failed)
        tripped = (
            self.consecutive_errors is not None
            and server.consecutive_errors >= self.consecutive_errors
        ) or (
            self.failure_ratio is not None
            and len(recent) >= self.window
            and sum(recent) >= self.failure_ratio * len(recent)
        )
        if not tripped:
            return
        ejected = sum(1 for s in pool if s.ejected_until is not None)
        if (ejected + 1) * 100 > self.max_ejection_percent * len(pool):
            return  # over the cap: keep serving, keep counting
        last = min(self.base_ejection_time * server.ejections, self.max_ejection_time)
        if server.returned_at is not None and now - server.returned_at >= last:
            server.ejections = 0
        server.ejections += 1
        duration = min(self.base_ejection_time * server.ejections, self.max_ejection_time)
        server.ejected_until = now + duration
        server.consecutive_errors = 0
        recent.clear()
        log.warning("ejected %s for %.1f s", server.url, duration)
        events.append((server.url, "ejected"))
