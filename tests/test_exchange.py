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
from oxypy._core.observe import Outcome, client_went_away, observe
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


# -- the one status decision (oxypy._core.observe) -----------------------------------


def _run(app: Any, environ: dict[str, Any], *, read: int | None = None) -> Outcome:
    """Run ``app`` under observe(); read ``read`` chunks (None: all) then close."""
    seen: list[Outcome] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return lambda data: None

    try:
        body = observe(app, environ, start_response, lambda o: seen.append(o.outcome()))
    except BaseException:  # noqa: BLE001 - the app's own exception: finish already ran
        return seen[0]
    try:
        iterator = iter(body)
        count = 0
        while read is None or count < read:
            try:
                next(iterator)
            except StopIteration:
                break
            count += 1
    except BaseException:  # noqa: BLE001 - the body's exception is what we observe
        pass
    finally:
        body.close()  # type: ignore[attr-defined]
    assert len(seen) == 1
    return seen[0]


def _answer(
    status: str = "200 OK",
    chunks: tuple[bytes, ...] = (b"hello",),
    raise_at: int | None = None,
    error: BaseException | None = None,
    exchange: Exchange | None = None,
) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if exchange is not None:
            exchange_log(environ).append(exchange)
        if raise_at == -1 and error is not None:
            raise error
        start_response(status, [])

        def body() -> Any:
            for i, chunk in enumerate(chunks):
                if raise_at == i and error is not None:
                    raise error
                yield chunk
            if raise_at == len(chunks) and error is not None:
                raise error

        return body()

    return app


def _gone_probe(gone: bool) -> dict[str, Any]:
    return {oxypy.environ.CLIENT_GONE: lambda: gone}


@pytest.mark.parametrize(
    ("app", "environ", "read", "expected"),
    [
        pytest.param(_answer(), {}, None, (200, None, None, False, False, False), id="ok"),
        pytest.param(
            _answer(raise_at=-1, error=RuntimeError("bug")),
            {},
            None,
            (500, None, "RuntimeError", False, True, False),
            id="app-bug-before-head",
        ),
        pytest.param(
            _answer(raise_at=0, error=RuntimeError("bug")),
            {},
            None,
            (500, None, "RuntimeError", False, True, False),
            id="body-bug-before-first-byte",
        ),
        pytest.param(
            _answer(raise_at=1, error=RuntimeError("bug")),
            _gone_probe(False),
            None,
            (200, None, "RuntimeError", False, True, False),
            id="body-bug-after-first-byte",
        ),
        pytest.param(
            _answer(raise_at=1, error=UpstreamProtocolError()),
            {},
            None,
            (200, None, "upstream_protocol_error", False, True, True),
            id="upstream-cut-mid-body",
        ),
        pytest.param(
            _answer(raise_at=0, error=UpstreamTimeout()),
            {},
            None,
            (500, None, "upstream_timeout", False, True, True),
            id="upstream-failed-before-first-byte",
        ),
        pytest.param(
            _answer(raise_at=-1, error=ClientDisconnected()),
            {},
            None,
            (499, None, "client_disconnected", True, True, False),
            id="client-gone-mid-upload",
        ),
        pytest.param(
            _answer(chunks=(b"a", b"b", b"c")),
            {},
            1,
            (499, 200, "client_disconnected", True, True, False),
            id="server-stopped-reading",
        ),
        pytest.param(
            _answer(raise_at=1, error=BrokenPipeError()),
            _gone_probe(True),
            None,
            (499, 200, "client_disconnected", True, True, False),
            id="socket-error-client-gone",
        ),
        pytest.param(
            _answer(raise_at=-1, error=ValueError("x")),
            _gone_probe(True),
            None,
            (499, None, "client_disconnected", True, True, False),
            id="any-error-while-client-gone",
        ),
        pytest.param(
            _answer(
                "499 Client Closed Request",
                exchange=Exchange("http://u", "POST", 0.0, error=ClientDisconnected()),
            ),
            {},
            None,
            (499, None, "client_disconnected", True, False, False),
            id="forward-answered-499",
        ),
        pytest.param(
            _answer(
                "502 Bad Gateway",
                exchange=Exchange("http://u", "GET", 0.0, error=UpstreamConnectError()),
            ),
            {},
            None,
            (502, None, "upstream_connect_error", False, False, True),
            id="forward-answered-502",
        ),
        pytest.param(
            _answer("502 Bad Gateway", exchange=Exchange("http://u", "GET", 0.0, status=502)),
            {},
            None,
            (502, None, None, False, False, False),
            id="upstream-said-502",
        ),
    ],
)
def test_the_status_the_client_got(
    app: Any,
    environ: dict[str, Any],
    read: int | None,
    expected: tuple[int, int | None, str | None, bool, bool, bool],
) -> None:
    outcome = _run(app, {"REQUEST_METHOD": "GET", **environ}, read=read)
    assert (
        outcome.status,
        outcome.status_sent,
        outcome.error_kind,
        outcome.client_gone,
        outcome.aborted,
        outcome.upstream_failed,
    ) == expected


def test_client_gone_is_found_through_the_cause_chain() -> None:
    try:
        try:
            raise ClientDisconnected()
        except ClientDisconnected as exc:
            raise OSError("read failed") from exc
    except OSError as exc:
        assert client_went_away(exc, {})
    assert not client_went_away(UpstreamConnectError(), _gone_probe(True))
    assert not client_went_away(OSError(), {})


def test_gunicorn_takeover_is_a_normal_end() -> None:
    def takeover(environ: dict[str, Any], start_response: Any) -> Any:
        raise StopIteration

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return None

    seen: list[Outcome] = []
    with pytest.raises(StopIteration):
        observe(takeover, {}, start_response, lambda o: seen.append(o.outcome()))
    assert (seen[0].status, seen[0].aborted, seen[0].client_gone) == (101, False, False)
