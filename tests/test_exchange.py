"""The exchange log: the typed record and the one way to read it (pure logic)."""

from __future__ import annotations

from typing import Any

import pytest

import oxypy
import oxypy.environ
import oxypy.forward
from oxypy._core.exchange import (
    Exchange,
    counts_against_upstream,
    exchange_log,
    mark,
    upstream_verdict,
)
from oxypy.exceptions import (
    ClientDisconnected,
    NoTarget,
    RequestError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)


def test_public_import_paths_are_the_same_class() -> None:
    assert oxypy.Exchange is Exchange
    assert oxypy.forward.Exchange is Exchange


def test_record_is_slotted_with_defaults() -> None:
    ex = Exchange("http://127.0.0.1:1", "GET", 5.0)
    assert (ex.status, ex.error, ex.ended, ex.bytes_received) == (0, None, None, 0)
    with pytest.raises(AttributeError):
        ex.other = 1  # type: ignore[attr-defined]
    assert "status=0" in repr(ex)


@pytest.mark.parametrize(
    ("target", "status", "error", "network", "client", "verdict"),
    [
        pytest.param("http://u", 200, None, False, False, False, id="answered-200"),
        pytest.param("http://u", 502, None, False, False, False, id="upstream-said-502"),
        pytest.param("http://u", 0, UpstreamConnectError(), True, False, True, id="refused"),
        pytest.param("http://u", 0, UpstreamTimeout(), True, False, True, id="timeout"),
        pytest.param(
            "http://u", 200, UpstreamProtocolError(), True, False, True, id="cut-mid-body"
        ),
        pytest.param("http://u", 0, ClientDisconnected(), False, True, None, id="client-upload"),
        pytest.param("http://u", 200, ClientDisconnected(), False, True, None, id="client-dl"),
        pytest.param("", 0, NoTarget(), False, False, None, id="no-target"),
        pytest.param("http://u", 0, RequestError(status=400), False, False, None, id="bad-req"),
    ],
)
def test_what_an_exchange_says_about_its_upstream(
    target: str,
    status: int,
    error: RequestError | None,
    network: bool,
    client: bool,
    verdict: bool | None,
) -> None:
    ex = Exchange(target, "GET", 0.0, status=status, error=error)
    assert ex.network_error is network
    assert ex.client_aborted is client
    assert counts_against_upstream(ex) is network
    assert upstream_verdict(ex) is verdict


def test_mark_reads_only_what_came_after_it() -> None:
    environ: dict[str, Any] = {}
    outer = mark(environ)
    assert outer.since() == [] and outer.last is None
    first = Exchange("http://a", "GET", 0.0)
    exchange_log(environ).append(first)
    inner = mark(environ)
    second = Exchange("http://b", "GET", 1.0)
    environ[oxypy.environ.EXCHANGES].append(second)
    assert outer.since() == [first, second] and outer.last is second
    assert inner.since() == [second] and inner.last is second
    copy = dict(environ)  # a block's shallow copy shares the log by reference
    assert exchange_log(copy) is exchange_log(environ)
