"""Traps a new user falls into: an unpatched process, an ``oxypy/`` folder in the cwd.

Each runs as a real subprocess (a fresh interpreter, not patched by the test
process's gevent).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
