"""The active health checker: one greenlet per balancer probing its pool.

With a shared registry the greenlet runs in every process but probes only
while its process holds the registry's prober lease (``leader``), and hands
the verdicts to the registry after each round (``after_round``).

Each round probes every server at once (so one hanging server delays no
other), counts each result into the server's streak (:func:`count_probe`)
and, when a streak reaches its threshold, hands ``PROBES_FAILED`` or
``PROBES_PASSED`` to the state machine (:mod:`oxypy._balance.state`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent
import urllib3

from ..health import HealthCheck
from .pool import Pool
from .state import Event, Input, ServerState, transition

__all__ = ["HealthChecker", "count_probe"]

log = logging.getLogger(__name__)


def count_probe(
    config: HealthCheck,
    server: ServerState,
    passed: bool,
    events: list[Event],
    failure: str = "",
) -> None:
    """Count one probe result for ``server`` (pool lock held); ``failure``
    says what went wrong with a failed probe (for the log line)."""
    streak = server.check_streak
    if passed:
        server.check_streak = streak = streak + 1 if streak > 0 else 1
        if streak >= config.healthy_threshold:
            transition(
                server, Input.PROBES_PASSED, events, reason=f"{_checks(streak)} passed in a row"
            )
    else:
        server.check_streak = streak = streak - 1 if streak < 0 else -1
        if -streak >= config.unhealthy_threshold:
            reason = f"{_checks(-streak)} failed in a row, the last: {failure or 'failed'}"
            transition(server, Input.PROBES_FAILED, events, reason=reason)


def _checks(count: int) -> str:
    return "1 health check" if count == 1 else f"{count} health checks"


def _cause(exc: BaseException) -> str:
    """The innermost reason of a urllib3 error (``Connection refused``, ``timed out``)."""
    cause: BaseException = exc
    reason = getattr(cause, "reason", None)
    while isinstance(reason, BaseException):
        cause = reason
        reason = getattr(cause, "reason", None)
    # urllib3's messages start with the connection object: keep what follows it.
    return str(cause).split(">: ", 1)[-1] or type(cause).__name__


class HealthChecker:
    """The greenlet probing a balancer's pool: one round every ``interval``."""

    def __init__(
        self,
        config: HealthCheck,
        pool: Pool,
        *,
        leader: Callable[[], bool] | None = None,
        after_round: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        #: With a shared registry: probe only while this returns True (the
        #: prober's lease), then hand the verdicts on with ``after_round``.
        self.leader = leader
        self.after_round = after_round
        self.http = urllib3.PoolManager(
            num_pools=64,
            maxsize=1,
            retries=False,
            timeout=urllib3.Timeout(connect=config.timeout, read=config.timeout),
        )
        self.greenlet: gevent.Greenlet | None = None
        #: Probes in flight.  They are never killed while a round is cut short
        #: (a probe killed inside urllib3's connect leaks its half-made socket):
        #: each is bounded by its own timeouts, and stop() waits for them.
        self.probes: set[gevent.Greenlet] = set()
        self.stopped = False

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop probing: end the loop, let probes in flight finish, close connections.

        Idempotent.  A probe still running after twice its timeout (a name
        lookup that never returns) is killed as a last resort.
        """
        self.stopped = True
        greenlet, self.greenlet = self.greenlet, None
        if greenlet is not None:
            greenlet.kill(block=True, timeout=self.config.timeout + 1)
        probes = list(self.probes)
        if probes:
            gevent.joinall(probes, timeout=2 * self.config.timeout + 1)
            gevent.killall([p for p in probes if not p.dead], block=True, timeout=1)
        self.http.clear()

    def probe(self, url: str) -> str | None:
        """None when ``url`` passes the check, else what went wrong."""
        config = self.config
        headers = {"Host": config.host} if config.host else {}
        headers["User-Agent"] = "oxypy-health-check"
        try:
            resp = self.http.request(
                "GET", url.rstrip("/") + config.path, headers=headers, redirect=False
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.debug("health check of %s failed: %s", url, exc)
            return f"GET {config.path} failed: {_cause(exc)}"
        if config.accepts(resp.status):
            return None
        return f"GET {config.path} answered {resp.status}"

    def check(self, server: ServerState) -> None:
        """Probe one server and count the result as soon as it is known."""
        failure = self.probe(server.url)
        if self.stopped:
            return  # the balancer closed meanwhile: its pool takes no more results
        events: list[Event] = []
        with self.pool.lock:
            count_probe(self.config, server, failure is None, events, failure or "")
        self.pool.notify(events)

    def round(self) -> None:
        """Probe every server at once, so one hanging server delays no other."""
        jobs = [gevent.spawn(self.check, server) for server in self.pool.snapshot()]
        for job in jobs:
            self.probes.add(job)
            job.link(self.probes.discard)
        gevent.joinall(jobs, timeout=2 * self.config.timeout + 1)

    def _run(self) -> None:
        while True:
            try:
                if self.leader is None or self.leader():
                    self.round()
                    if self.after_round is not None and not self.stopped:
                        self.after_round()
            except Exception:  # keep checking: a bug here must not stop health checks
                log.exception("health check round failed")
            gevent.sleep(self.config.interval)
