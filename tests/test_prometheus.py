"""PrometheusMetrics: exposition parsed by prometheus_client's own parser."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import urllib3
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from oxypy import Forward
from oxypy._core.exchange import Exchange
from oxypy.environ import EXCHANGES
from oxypy.exceptions import ConfigurationError
from oxypy.prometheus import BreakerStateGauge, PrometheusMetrics, metrics_app

HTTP = urllib3.PoolManager(retries=False, timeout=10)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def refused_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def ok_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def test_metrics_over_http(proxy: Any, echo_upstream: str) -> None:
    registry = CollectorRegistry()
    down = refused_url()
    chain = PrometheusMetrics(
        DispatcherMiddleware(ok_app, {"/ok": Forward(echo_upstream), "/down": Forward(down)}),
        registry=registry,
        skip=lambda e: e["PATH_INFO"] == "/skipped",
    )
    url = proxy(DispatcherMiddleware(chain, {"/metrics": metrics_app(registry)}))
    assert HTTP.request("GET", url + "/ok/a").status == 200
    assert HTTP.request("POST", url + "/ok/b", body=b"x").status == 200
    assert HTTP.request("GET", url + "/down/c").status == 502
    assert HTTP.request("GET", url + "/skipped").status == 200
    resp = HTTP.request("GET", url + "/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    s = parse(resp.data.decode())
    assert value(s, "oxypy_requests_total", method="GET", code_class="2xx") == 1
    assert value(s, "oxypy_requests_total", method="POST", code_class="2xx") == 1
    assert value(s, "oxypy_requests_total", method="GET", code_class="5xx") == 1
    assert value(s, "oxypy_request_duration_seconds_count", code_class="2xx") == 2
    assert value(s, "oxypy_request_duration_seconds_count", code_class="5xx") == 1
    assert value(s, "oxypy_requests_in_flight") == 0
    assert value(s, "oxypy_upstream_requests_total", target=echo_upstream, code_class="2xx") == 2
    assert value(s, "oxypy_upstream_requests_total", target=down, code_class="none") == 1
    assert value(s, "oxypy_upstream_errors_total", target=down, kind="upstream_connect_error") == 1
    assert value(s, "oxypy_errors_total", kind="upstream_connect_error") == 1
    total = sum(v for (n, _), v in s.items() if n == "oxypy_requests_total")
    assert total == 3  # the skipped request is not counted


def test_in_flight_and_client_abort_counts() -> None:
    registry = CollectorRegistry()
    seen: list[float] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        seen.append(registry.get_sample_value("oxypy_requests_in_flight") or 0.0)
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"a"
        yield b"b"

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    metrics = PrometheusMetrics(app, registry=registry)
    body = metrics({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, start_response)
    assert next(iter(body)) == b"a"
    assert registry.get_sample_value("oxypy_requests_in_flight") == 1
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]  # idempotent
    assert seen == [1.0]
    assert registry.get_sample_value("oxypy_requests_in_flight") == 0
    assert (
        registry.get_sample_value("oxypy_requests_total", {"method": "GET", "code_class": "4xx"})
        == 1
    )


def test_app_error_counts_as_5xx_and_reraises() -> None:
    registry = CollectorRegistry()

    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        Client(LintMiddleware(PrometheusMetrics(broken, registry=registry))).get("/")
    labels = {"method": "GET", "code_class": "5xx"}
    assert registry.get_sample_value("oxypy_requests_total", labels) == 1
    assert registry.get_sample_value("oxypy_requests_in_flight") == 0


def test_target_label_cap() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ[EXCHANGES].append(Exchange(environ["HTTP_X_T"], "GET", 0.0, status=200))
        return ok_app(environ, start_response)

    registry = CollectorRegistry()
    client = Client(LintMiddleware(PrometheusMetrics(app, registry=registry, max_targets=2)))
    for t in ["http://a", "http://b", "http://c", "http://a"]:
        client.get("/", headers={"X-T": t}, buffered=True)
    s = parse(metrics_text(registry))
    assert value(s, "oxypy_upstream_requests_total", target="http://a", code_class="2xx") == 2
    assert value(s, "oxypy_upstream_requests_total", target="http://b", code_class="2xx") == 1
    assert value(s, "oxypy_upstream_requests_total", target="other", code_class="2xx") == 1


def metrics_text(registry: Any) -> str:
    resp = Client(metrics_app(registry)).get("/metrics", buffered=True)
    assert resp.status_code == 200
    return resp.get_data(as_text=True)


def test_breaker_state_gauge() -> None:
    class Transition:
        def __init__(self, new: str) -> None:
            self.new = new

    registry = CollectorRegistry()
    states = BreakerStateGauge(registry=registry, namespace="gw")
    hook = states.callback("api")

    def state_of(name: str) -> dict[str, float]:
        s = parse(metrics_text(registry))
        return {
            st: value(s, "gw_circuit_breaker_state", name=name, state=st)
            for st in ("standby", "tripped", "recovering")
        }

    assert state_of("api") == {"standby": 1, "tripped": 0, "recovering": 0}
    hook(Transition("tripped"))
    assert state_of("api") == {"standby": 0, "tripped": 1, "recovering": 0}
    hook(Transition("standby"))
    assert state_of("api")["standby"] == 1
    with pytest.raises(ValueError):
        states.set("api", "melted")


def test_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    PrometheusMetrics(ok_app, registry=registry)
    with pytest.raises(ConfigurationError, match="already registered with buckets"):
        PrometheusMetrics(ok_app, registry=registry, buckets=(0.1, 1.0))
    PrometheusMetrics(ok_app, registry=registry, namespace="other")
    foreign = CollectorRegistry()
    from prometheus_client import Counter

    Counter("requests", "not oxypy's", namespace="oxypy", registry=foreign)
    with pytest.raises(ConfigurationError, match="already registered by another collector"):
        PrometheusMetrics(ok_app, registry=foreign)
    with pytest.raises(ConfigurationError):
        PrometheusMetrics(ok_app, registry=registry, namespace="bad-name")
    with pytest.raises(ConfigurationError):
        PrometheusMetrics(ok_app, registry=CollectorRegistry(), max_targets=0)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match="pip install"):
        PrometheusMetrics(ok_app, registry=registry, namespace="third")
    with pytest.raises(ConfigurationError, match="pip install"):
        metrics_app()


MULTIPROC_WORKER = textwrap.dedent(
    """
    import sys
    from werkzeug.test import Client
    from oxypy.prometheus import PrometheusMetrics, metrics_app

    def ok(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    if sys.argv[1] == "serve":
        from prometheus_client import CollectorRegistry
        app = PrometheusMetrics(ok, registry=CollectorRegistry())
        for _ in range(int(sys.argv[2])):
            Client(app).get("/", buffered=True)
    else:
        sys.stdout.write(Client(metrics_app()).get("/metrics", buffered=True).get_data(True))
    """
)


def test_multiprocess_mode_aggregates_workers(tmp_path: Path) -> None:
    """Like gunicorn workers: separate processes write to PROMETHEUS_MULTIPROC_DIR,
    and metrics_app() in yet another process reports their sum."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mp_dir))
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    script = tmp_path / "worker.py"
    script.write_text(MULTIPROC_WORKER)
    for count in ("3", "4"):
        subprocess.run(
            [sys.executable, str(script), "serve", count], env=env, check=True, timeout=30
        )
    out = subprocess.run(
        [sys.executable, str(script), "expose"],
        env=env,
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    ).stdout
    s = parse(out)
    assert value(s, "oxypy_requests_total", method="GET", code_class="2xx") == 7, json.dumps(
        sorted(str(k) for k in s)
    )
    assert value(s, "oxypy_request_duration_seconds_count", code_class="2xx") == 7


def test_two_instances_in_one_process_share_the_registry_families() -> None:
    registry = CollectorRegistry()
    one = Client(LintMiddleware(PrometheusMetrics(ok_app, registry=registry)))
    two = Client(LintMiddleware(PrometheusMetrics(ok_app, registry=registry)))
    apart = Client(LintMiddleware(PrometheusMetrics(ok_app, registry=registry, namespace="b")))
    for client in (one, two, two, apart):
        assert client.get("/", buffered=True).status_code == 200
    labels = {"method": "GET", "code_class": "2xx"}
    assert registry.get_sample_value("oxypy_requests_total", labels) == 3
    assert registry.get_sample_value("b_requests_total", labels) == 1
    states = BreakerStateGauge(registry=registry)
    BreakerStateGauge(registry=registry).set("api", "tripped")
    assert (
        registry.get_sample_value(
            "oxypy_circuit_breaker_state", {"name": "api", "state": "tripped"}
        )
        == 1
    )
    states.set("api", "standby")
    assert (
        registry.get_sample_value(
            "oxypy_circuit_breaker_state", {"name": "api", "state": "tripped"}
        )
        == 0
    )


def test_two_instances_on_the_default_registry() -> None:
    """The documented default: prometheus_client.REGISTRY, shared by every instance."""
    from prometheus_client import REGISTRY

    namespace = "oxypy_test_default_registry"
    labels = {"method": "GET", "code_class": "2xx"}
    before = REGISTRY.get_sample_value(f"{namespace}_requests_total", labels) or 0.0
    first = Client(LintMiddleware(PrometheusMetrics(ok_app, namespace=namespace)))
    second = Client(LintMiddleware(PrometheusMetrics(ok_app, namespace=namespace)))
    for client in (first, second):
        assert client.get("/", buffered=True).status_code == 200
    assert REGISTRY.get_sample_value(f"{namespace}_requests_total", labels) == before + 2
    text = Client(metrics_app()).get("/metrics").get_data(as_text=True)
    assert f"{namespace}_requests_total" in text
