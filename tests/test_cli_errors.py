"""The ``oxypy`` command's failure paths: bad values exit 2 without a traceback, warnings show.

Predicates that once crashed the parser (deep nesting, long ``!`` runs, huge
numbers, long ``&&`` chains) are refused with status 2, the message and a caret
line, as real processes; odd values of the other flags are checked in-process.
The command (not the library) shows the toolkit's warnings on stderr, one line
each, unless logging was configured already.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import urllib3

from oxypy.cli import main

from _servers import OxypyProcess, dead_url

REPO = Path(__file__).resolve().parent.parent
UP = "http://127.0.0.1:9"
HTTP = urllib3.PoolManager(retries=False, timeout=10.0)
#: The handler's format: "2026-11-30 02:04:29,807 WARNING oxypy.errors: GET /x: 502 ..."
LOG_LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING oxypy\.[\w.]+: "

PARENS = "(" * 200 + "NetworkErrorRatio() > 0.5" + ")" * 200
NOTS = "!" * 500 + "IsNetworkError()"
BIG_INT = "Attempts() < " + "9" * 4301
ANDS = " && ".join(["IsNetworkError()"] * 995)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(cwd)]))
    return subprocess.run(
        [sys.executable, "-m", "oxypy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def caret_column(stderr: str) -> int:
    """The column the caret line points at, relative to the expression line above it."""
    lines = stderr.splitlines()
    caret = next(i for i, line in enumerate(lines) if line.strip() == "^")
    return lines[caret].index("^") - 2


# --------------------------------------------------------------------------- predicates


@pytest.mark.parametrize(
    ("flag", "expression", "message", "column"),
    [
        pytest.param("--breaker", PARENS, "nested too deeply (more than 64 levels)", 64, id="p"),
        pytest.param("--retry", NOTS, "nested too deeply (more than 64 levels)", 64, id="not"),
        pytest.param("--retry", BIG_INT, "too long (4314 characters, at most 4096)", 4096, id="n"),
        pytest.param("--breaker", ANDS, "too long (19896 characters, at most 4096)", 4096, id="a"),
    ],
)
def test_predicate_bombs_exit_2_with_the_message_as_a_process(
    flag: str, expression: str, message: str, column: int
) -> None:
    done = run("proxy", UP, flag, expression)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        f"oxypy proxy: error: argument {flag}: expression {message} at column {column + 1}\n"
        in (done.stderr)
    )
    # The expression is shown in part (120 characters around the fault), caret under it.
    lines = done.stderr.splitlines()
    caret = next(i for i, line in enumerate(lines) if line.strip() == "^")
    excerpt = lines[caret - 1]
    assert excerpt.startswith("  ...") and excerpt.endswith("...")
    assert len(excerpt) == 2 + 3 + 120 + 3
    at = lines[caret].index("^")
    assert excerpt[at - 60 : at + 60] == expression[column - 60 : column + 60]
    assert done.stdout == ""


@pytest.mark.parametrize("flag", ["--retry", "--breaker"])
@pytest.mark.parametrize(
    ("expression", "message"),
    [
        pytest.param(PARENS, "nested too deeply", id="parens"),
        pytest.param(NOTS, "nested too deeply", id="nots"),
        pytest.param(BIG_INT, "expression too long", id="big-int"),
        pytest.param("Attempts() < " + "9" * 65, "number too long", id="long-number"),
        pytest.param("NetworkErrorRatio() > 1e999", "out of range", id="inf"),
        pytest.param(ANDS, "expression too long", id="ands"),
    ],
)
def test_every_predicate_flag_refuses_bombs(
    flag: str, expression: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", UP, flag, expression])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err
    assert message in err
    assert "Traceback" not in err
    assert caret_column(err) >= 0


# --------------------------------------------------------------------------- other flags


@pytest.mark.parametrize(
    ("argv", "flag", "detail"),
    [
        pytest.param(
            ["proxy", UP, "--breaker-duration", "nan"], "--breaker-duration", "finite", id="bd-nan"
        ),
        pytest.param(
            ["proxy", UP, "--breaker-duration", "inf"], "--breaker-duration", "finite", id="bd-inf"
        ),
        pytest.param(
            ["proxy", UP, "--breaker-duration", "-1"], "--breaker-duration", ">= 0", id="bd-neg"
        ),
        pytest.param(
            ["proxy", UP, "--breaker-duration", "x"], "--breaker-duration", "number", id="bd-x"
        ),
        pytest.param(
            ["proxy", UP, "--rate", "1" + "0" * 400 + "/s"], "--rate", "too large", id="r"
        ),
        pytest.param(["proxy", UP, "--retry-budget", "101"], "--retry-budget", "0 to 100", id="rb"),
        pytest.param(["proxy", UP, "--retry-budget", "x"], "--retry-budget", "number", id="rb-x"),
        pytest.param(["proxy", UP, "--retry-budget", "20"], "--retry-budget", "--retry", id="rb1"),
        pytest.param(["proxy", UP, "--hedge", "0"], "--hedge", "above 0", id="hedge-0"),
        pytest.param(["proxy", UP, "--hedge", "nan"], "--hedge", "above 0", id="hedge-nan"),
        pytest.param(["proxy", UP, "--hedge", "p100"], "--hedge", "quantile", id="hedge-p100"),
        pytest.param(["proxy", UP, "--mirror", "ftp://x"], "--mirror", "http", id="mirror"),
        pytest.param(["proxy", UP, "--mirror-compare"], "--mirror-compare", "--mirror", id="mc"),
        pytest.param(["proxy", UP, "--deadline", "0"], "--deadline", "above 0", id="dl-0"),
        pytest.param(["proxy", UP, "--deadline", "x"], "--deadline", "number", id="dl-x"),
        pytest.param(["proxy", UP, "--deadline", "inf"], "--deadline", "finite", id="dl-inf"),
        pytest.param(
            ["proxy", UP, "--retry", "IsNetworkError()", "--per-try-timeout", "-1"],
            "--per-try-timeout",
            "above 0",
            id="ptt-neg",
        ),
        pytest.param(
            ["proxy", UP, "--per-try-timeout", "1"], "--per-try-timeout", "--retry", id="ptt-alone"
        ),
        pytest.param(
            ["proxy", UP, "--response-header-timeout", "nope"],
            "--response-header-timeout",
            "number",
            id="rht-x",
        ),
        pytest.param(["serve", ".:app"], "APP", "module:attribute", id="relative-module"),
        pytest.param(["serve", "..os:app"], "APP", "module:attribute", id="relative-module-2"),
        pytest.param(["serve", "os:path..join"], "APP", "module:attribute", id="empty-attr"),
        pytest.param(["serve", "os.path:join()"], "APP", "cannot be called", id="factory-args"),
        pytest.param(["serve", "json:loads()"], "APP", "cannot be called", id="factory-args-2"),
        pytest.param(["serve", "os:sep()"], "APP", "not callable", id="factory-not-callable"),
    ],
)
def test_odd_flag_values_exit_2_without_a_traceback(
    argv: list[str], flag: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err
    assert detail in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- warnings


def test_the_command_shows_warnings_on_stderr(oxypy: Callable[..., OxypyProcess]) -> None:
    # The proxy has no Redis flag; a refused upstream (502) and the breaker it trips are
    # warnings of the same kind as a Redis store failing open.
    dead = dead_url()
    p = oxypy("proxy", "--listen", "127.0.0.1:0", dead, "--breaker", "NetworkErrorRatio() > 0.5")
    assert HTTP.request("GET", p.url + "/probe").status == 502
    assert HTTP.request("GET", p.url + "/probe").status == 503
    refused = f"^{LOG_LINE}GET /probe: 502 upstream refused the connection \\({dead}\\) .*$"
    tripped = f"^{LOG_LINE}circuit breaker tripped for 10s: NetworkErrorRatio\\(\\) > 0.5 holds"
    p.wait_for(lambda: re.search(refused, p.stderr(), re.MULTILINE))
    p.wait_for(lambda: re.search(tripped, p.stderr(), re.MULTILINE))
    p.stop()
    assert "Traceback" not in p.stderr()


def test_the_library_configures_no_logging() -> None:
    code = (
        "import logging, oxypy, oxypy.cli\n"
        "print([type(h).__name__ for h in logging.getLogger('oxypy').handlers],"
        " logging.getLogger().handlers, logging.getLogger('oxypy').level)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.stdout.strip() == "['NullHandler'] [] 0", done.stderr


APP_WITH_LOGGING = """\
import logging

logging.basicConfig(format="USER %(levelname)s %(name)s %(message)s")


def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "10")])
    return [b"short"]  # less than announced: the server warns
"""


def test_logging_configured_by_the_app_is_left_alone(
    tmp_path: Path, oxypy: Callable[..., OxypyProcess]
) -> None:
    (tmp_path / "logged_app.py").write_text(APP_WITH_LOGGING)
    p = oxypy("serve", "--listen", "127.0.0.1:0", "logged_app:app", cwd=tmp_path)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        HTTP.request("GET", p.url + "/")
    line = "USER WARNING oxypy.server app sent less than its Content-Length"
    p.wait_for(lambda: re.search(f"^{line}", p.stderr(), re.MULTILINE))
    p.stop()
    err = p.stderr()
    assert err.count("app sent less than its Content-Length") == 1, err  # not twice
    assert not re.search(LOG_LINE, err), err
