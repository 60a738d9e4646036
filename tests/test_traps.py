"""Traps a new user falls into: an unpatched process, an ``oxypy/`` folder in the cwd.

Each runs as a real subprocess (a fresh interpreter, not patched by the test
process's gevent).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
import urllib3

from _servers import start_pywsgi, url_of, wait_for

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


UNPATCHED = """
import sys
from oxypy import Forward, Server, serve
from oxypy.exceptions import ConfigurationError
app = Forward("http://127.0.0.1:9")
try:
    {call}
except ConfigurationError as exc:
    print(exc)
    sys.exit(3)
sys.exit(0)
"""


def test_server_refuses_an_unpatched_process(tmp_path: Path) -> None:
    for call in ('Server(app, "127.0.0.1:0").start()', 'serve(app, "127.0.0.1:0")'):
        done = _python(UNPATCHED.format(call=call), tmp_path)
        assert done.returncode == 3, (call, done.stdout, done.stderr)
        assert "from gevent import monkey; monkey.patch_all()" in done.stdout
        assert "before any other import" in done.stdout
        assert "Traceback" not in done.stderr


def test_a_patched_process_is_served(tmp_path: Path) -> None:
    code = "from gevent import monkey; monkey.patch_all()\n" + UNPATCHED.format(
        call='Server(app, "127.0.0.1:0").start().stop(timeout=0)'
    )
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr


def _console_script(tmp_path: Path) -> Path:
    """The wrapper pip writes for ``[project.scripts] oxypy`` (sys.path[0] is its folder)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    found = re.search(r'^oxypy = "([\w.]+):(\w+)"$', pyproject, re.MULTILINE)
    assert found is not None
    module, func = found.groups()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "oxypy"
    script.write_text(
        f"import re, sys\nfrom {module} import {func}\n"
        f"if __name__ == '__main__':\n"
        f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({func}())\n"
    )
    return script


def test_console_script_ignores_an_oxypy_folder_in_the_cwd(tmp_path: Path) -> None:
    script = _console_script(tmp_path)
    # A folder holding an unrelated oxypy/ package (with an editable install,
    # even a clone's folder without __init__ wins over the real package).
    parent = tmp_path / "src"
    (parent / "oxypy").mkdir(parents=True)
    (parent / "oxypy" / "__init__.py").write_text(
        "raise ImportError('the oxypy folder in the current directory was imported')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in (["--help"], ["proxy", "--help"], ["--version"]):
        done = subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=parent,
            env=env,
        )
        assert done.returncode == 0, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stdout.startswith("usage: oxypy") or done.stdout.startswith("oxypy ")


def test_console_script_patches_before_ssl_is_imported(tmp_path: Path) -> None:
    """No re-exec, yet upstream TLS is cooperative: ssl is gevent's in the command."""
    script = _console_script(tmp_path)
    app = tmp_path / "probe_app.py"
    app.write_text(
        "import ssl, sys\n"
        "import gevent.ssl\n"
        "print('cooperative' if ssl.SSLContext is gevent.ssl.SSLContext else 'blocking')\n"
        "sys.exit(0)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]))
    done = subprocess.run(
        [sys.executable, str(script), "serve", "probe_app:app"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert done.stdout == "cooperative\n", done.stderr


#: The paths _slow_echo received.
ARRIVED: list[str] = []


def _slow_echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A 1 s upstream answering the request's path."""
    ARRIVED.append(environ["PATH_INFO"])
    gevent.sleep(1.0)
    body = environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


#: A program that never patches: Forward behind werkzeug's threaded dev server.
THREADED = """
import sys
from oxypy import Forward
from werkzeug.serving import make_server
server = make_server("127.0.0.1", 0, Forward(sys.argv[1]), threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
print("stopped", flush=True)
"""

#: A program that runs gevent's own WSGI server without patching.
GEVENT_UNPATCHED = """
import logging, sys
from gevent.pywsgi import WSGIServer
from oxypy import Forward
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
server = WSGIServer(("127.0.0.1", 0), Forward(sys.argv[1]), log=None)
server.start()
print(server.server_port, flush=True)
server.serve_forever()
"""


class _Program:
    """An unpatched ``python -c`` subprocess printing its port on its first line."""

    def __init__(self, code: str, upstream: str, tmp: Path) -> None:
        self.err_path = tmp / "err.txt"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(tmp / "out.txt", "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, upstream], stdout=out, stderr=err, env=env, cwd=tmp
            )
        self.out_path = tmp / "out.txt"
        wait_for(lambda: self.out_path.read_text().endswith("\n") or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.err_path.read_text()
        self.url = f"http://127.0.0.1:{int(self.out_path.read_text().split()[0])}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _get_all(urls: list[str]) -> list[tuple[int, bytes, float]]:
    """GET every URL at once; (status, body, seconds) each."""
    http = urllib3.PoolManager(
        retries=False, maxsize=len(urls), timeout=urllib3.Timeout(connect=5, read=15)
    )

    def get(url: str) -> tuple[int, bytes, float]:
        started = time.monotonic()
        resp = http.request("GET", url)
        return resp.status, resp.data, time.monotonic() - started

    jobs = [gevent.spawn(get, url) for url in urls]
    try:
        gevent.joinall(jobs, timeout=30, raise_error=True)
    finally:
        http.clear()
    return [job.value for job in jobs]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_forward_under_werkzeugs_threaded_server_without_patching(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """8 concurrent requests to a 1 s upstream, twice (the second round reuses
    the kept-alive connections): every one answered in about 1 s; then the
    signal stops the process while a request is in flight."""
    upstream = start_pywsgi(_slow_echo)
    program = _Program(THREADED, url_of(upstream), tmp_path)
    try:
        for round_ in range(2):
            paths = [f"/r{round_}-{i}" for i in range(8)]
            answers = _get_all([program.url + p for p in paths])
            assert [(status, body) for status, body, _ in answers] == [
                (200, p.encode()) for p in paths
            ], program.err_path.read_text()
            assert max(took for _, _, took in answers) < 5.0
        marker = f"/in-flight-{os.urandom(4).hex()}"
        in_flight = gevent.spawn(_get_all, [program.url + marker])
        wait_for(lambda: marker in ARRIVED)
        program.proc.send_signal(sig)
        program.proc.wait(timeout=10)
        in_flight.kill()
        if sig is signal.SIGINT:  # KeyboardInterrupt ends serve_forever: the program goes on
            assert (program.proc.returncode, program.out_path.read_text().split()[1:]) == (
                0,
                ["stopped"],
            ), program.err_path.read_text()
        else:  # the default action: nothing in the process blocks it
            assert program.proc.returncode == -signal.SIGTERM
    finally:
        program.kill()
        upstream.stop(timeout=1)


@pytest.mark.slow
def test_forward_in_an_unpatched_gevent_server_fails_fast(tmp_path: Path) -> None:
    """gevent's own server without the patch: Forward's blocking sockets would
    serialise the requests; every one gets a quick 500 saying what to do, and
    the log says it once."""
    upstream = start_pywsgi(_slow_echo)
    program = _Program(GEVENT_UNPATCHED, url_of(upstream), tmp_path)
    try:
        answers = _get_all([f"{program.url}/r{i}" for i in range(4)])
        for status, body, took in answers:
            assert status == 500
            assert body == (
                b"oxypy: gevent runs unpatched: put "
                b"`from gevent import monkey; monkey.patch_all()` first in your program\n"
            )
            assert took < 0.9  # never waited for the 1 s upstream
        log = program.err_path.read_text()
        assert log.count("ERROR oxypy.forward: Forward refuses every request: ") == 1, log
        assert "monkey.patch_all()` on the first lines of your program" in log
    finally:
        program.kill()
        upstream.stop(timeout=1)


@pytest.mark.parametrize("timeout", [None, 0.0, 30.0])
def test_peer_closed_never_waits_on_a_stdlib_socket(timeout: float | None) -> None:
    """A pooled connection of an unpatched process: a quiet, live peer is seen
    at once (a socket with a timeout used to wait that long for data)."""
    import _socket

    from gevent.monkey import get_original

    from oxypy._core.sockets import peer_closed

    stdlib_socket = get_original("socket", "socket")  # this test process is patched
    a, b = _socket.socketpair()
    ours, theirs = stdlib_socket(fileno=a.detach()), stdlib_socket(fileno=b.detach())
    assert not hasattr(ours, "_sock")
    try:
        ours.settimeout(timeout)
        started = time.monotonic()
        assert peer_closed(ours) is False
        assert time.monotonic() - started < 1.0
        theirs.sendall(b"x")
        assert peer_closed(ours) is True  # stray bytes on an idle upstream connection
        assert peer_closed(ours, data_is_fine=True) is False  # a pipelined request
        theirs.close()
        ours.recv(1)
        assert peer_closed(ours) is True
    finally:
        ours.close()
        theirs.close()


PROBE_APP = """
import sys, warnings
import gevent.ssl, ssl, urllib3.util.ssl_
print(sys.orig_argv[1:3], sys.modules["__main__"].__spec__.name)
print("ssl", ssl.SSLContext is gevent.ssl.SSLContext)
print("urllib3", urllib3.util.ssl_.SSLContext is gevent.ssl.SSLContext)
sys.exit(0)
"""


def test_python_m_oxypy_patches_first_without_re_executing(tmp_path: Path) -> None:
    """``python -m oxypy`` from the parent of a clone (an ``oxypy/`` folder
    that is not the package): the command runs in the same process, patched
    before urllib3 took its names from ssl."""
    (tmp_path / "oxypy").mkdir()  # the clone: no __init__.py at its top
    (tmp_path / "oxypy" / "README.md").write_text("a clone\\n")
    (tmp_path / "probe_app.py").write_text(PROBE_APP)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "oxypy", "serve", "probe_app:app"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "['-m', 'oxypy'] oxypy.__main__",
        "ssl True",
        "urllib3 True",
    ], done.stderr
    assert done.stderr == ""  # no MonkeyPatchWarning: nothing imported ssl first
    for args in (["--help"], ["proxy", "--help"], ["--version"]):
        shown = subprocess.run(
            [sys.executable, "-m", "oxypy", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
        assert shown.returncode == 0 and shown.stderr == "", (args, shown.stderr)
        assert shown.stdout.startswith(("usage: oxypy", "oxypy "))


def test_importing_oxypy_patches_nothing(tmp_path: Path) -> None:
    done = _python(
        "import oxypy, sys\nfrom gevent import monkey\n"
        "print(monkey.is_module_patched('socket'), 'ssl' in sys.modules)\n",
        tmp_path,
    )
    assert done.stdout == "False True\n", done.stderr


@pytest.mark.parametrize(
    ("orig_argv", "expected"),
    [
        (["python", "-m", "oxypy", "proxy"], True),
        (["python", "-moxypy"], True),
        (["python", "-X", "dev", "-W", "error", "-m", "oxypy"], True),
        (["python", "-Xdev", "-Im", "oxypy.__main__"], True),
        (["python", "-m", "mygateway"], False),
        (["python", "-m", "oxypy.cli"], False),
        (["python", "-c", "-m oxypy"], False),
        (["python", "-W", "-m", "-m", "other"], False),
        (["python", "script.py", "-m", "oxypy"], False),
    ],
)
def test_run_as_module_reads_the_interpreter_options(orig_argv: list[str], expected: bool) -> None:
    from oxypy._cli.boot import run_as_module

    assert run_as_module(["-m"], orig_argv) is expected
    assert run_as_module(["/usr/bin/oxypy"], orig_argv) is False  # not while locating -m
