"""The status page in a real browser: headless Chromium driven by selenium.

Real upstreams on 127.0.0.1 behind a RoundRobin with active health checks,
and a CircuitBreaker in front of an upstream that refuses connections.  One
upstream is stopped: the open page (never reloaded) must show it out of
rotation within its health-check interval plus a generous margin; the
breaker is made to trip: the page must show it tripped.  A screenshot of
the page is saved under ``$OXYPY_TEST_ARTIFACTS`` (default: the test's
tmp_path).  Skipped when ``chromium`` or ``chromedriver`` is missing
(``.ci/run`` installs Debian's ``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oxypy import CircuitBreaker, Forward, HealthCheck, RoundRobin, Router, StatusPage

from _servers import dead_url, echo_app, start_pywsgi, url_of, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
)

#: The balancer's health-check interval and the failures that take a server out.
INTERVAL = 0.5
UNHEALTHY_AFTER = 2


@pytest.fixture
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1180,760")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


def artifacts_dir(tmp_path: Path) -> Path:
    """``$OXYPY_TEST_ARTIFACTS`` (created if needed), else this test's tmp_path."""
    chosen = os.environ.get("OXYPY_TEST_ARTIFACTS")
    if not chosen:
        return tmp_path
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path


_UPSTREAM = """
import sys
from gevent.pywsgi import WSGIServer
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
server = WSGIServer(("127.0.0.1", 0), app, log=None)
server.start()
print(server.server_port, flush=True)
server.serve_forever()
"""


def upstream_process() -> tuple[subprocess.Popen[str], str]:
    """An upstream in its own process (so it can be killed): (process, url)."""
    proc = subprocess.Popen([sys.executable, "-c", _UPSTREAM], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    assert port.isdigit(), port
    return proc, f"http://127.0.0.1:{port}"


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def test_page_shows_ejection_and_trip_live(browser: Any, proxy: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    doomed, doomed_url = upstream_process()
    steady = start_pywsgi(echo_app)
    steady_url = url_of(steady)
    lb = RoundRobin(
        Forward(),
        [doomed_url, steady_url],
        health_check=HealthCheck(
            "/", interval=INTERVAL, timeout=1.0, unhealthy_threshold=UNHEALTHY_AFTER
        ),
    )
    breaker = CircuitBreaker(
        Forward(dead_url()),
        "NetworkErrorRatio() > 0.5 && RequestThreshold() >= 3",
        fallback_duration=60,
        check_period=0.0,
    )
    page = StatusPage(watch={"service api": lb, "route /flaky": breaker})
    app = Router([(None, "/status", page), (None, "/flaky", breaker), (None, "/", lb)])
    try:
        url = proxy(app, lint=False)
        for _ in range(6):
            assert get(url + "/api") == 200

        browser.get(url + "/status/")
        browser.execute_script("window.notReloaded = true;")

        def state_of(server_url: str) -> str:
            cell = browser.find_element(By.CSS_SELECTOR, f'tr[data-url="{server_url}"] td.state')
            return str(cell.text)

        def live() -> bool:
            return str(browser.find_element(By.ID, "live").text) == "live"

        wait_for(live, timeout=10, interval=0.05)
        assert state_of(doomed_url) == "healthy"
        assert state_of(steady_url) == "healthy"

        doomed.kill()  # SIGKILL: the server is gone, connections and all
        doomed.wait(timeout=5)
        stopped = time.monotonic()
        wait_for(lambda: state_of(doomed_url).startswith("unhealthy"), timeout=15, interval=0.05)
        took = time.monotonic() - stopped
        # The checker needs UNHEALTHY_AFTER failed rounds, the page one event
        # (1 s) to show it; the rest is a generous margin for a loaded machine.
        assert took < INTERVAL * UNHEALTHY_AFTER + 1.0 + 4.0, took
        assert "health check" in state_of(doomed_url)
        assert state_of(steady_url) == "healthy"

        breaker_state = browser.find_element(By.CSS_SELECTOR, "[data-b]")
        assert breaker_state.text == "standby"
        for _ in range(3):
            assert get(url + "/flaky") == 502
        assert get(url + "/flaky") == 503  # tripped: the fallback answers
        wait_for(lambda: breaker_state.text.startswith("tripped"), timeout=10, interval=0.05)
        assert "state tripped" not in breaker_state.get_attribute("class")
        assert "st-tripped" in breaker_state.get_attribute("class")
        for _ in range(4):
            assert get(url + "/api") == 200
        assert browser.execute_script("return window.notReloaded === true;")

        shot = artifacts_dir(tmp_path) / "status-page.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
    finally:
        lb.close()
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(timeout=5)
        steady.stop(timeout=1)
