"""The distribution as users get it: an editable install type checkers see, a complete wheel.

Both build with the project's backend from this checkout, without network
access (no build isolation: the backend comes from the test extra) and
without the project's dependencies (``--no-deps``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import hatchling
import pytest

REPO = Path(__file__).resolve().parent.parent
#: Where the build backend and its dependencies are installed.
BACKEND_PATH = str(Path(hatchling.__file__).resolve().parent.parent)

USER_CODE = """\
from oxypy import Forward, RoundRobin

forward = Forward(read_timeout=5.0)
balancer: RoundRobin = RoundRobin(forward, ["http://127.0.0.1:9001"])
"""

#: Wrong only if mypy read oxypy's own annotations (``read_timeout`` is a float).
WRONG_USER_CODE = """\
from oxypy import Forward

timeout: str = Forward().read_timeout
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def _mypy(python: Path, code: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on ``code`` as a user's file, with ``python``'s site-packages."""
    user = tmp / "user"
    user.mkdir(exist_ok=True)
    (user / "app.py").write_text(code)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--python-executable",
            str(python),
            "--cache-dir",
            str(tmp / "mypy-cache"),
            "app.py",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=user,
        env=_env(),
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_editable_install_is_visible_to_mypy(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)  # nothing of this machine's site
    python = env_dir / "bin" / "python"
    before = _mypy(python, USER_CODE, tmp_path)
    assert before.returncode == 1
    assert 'Cannot find implementation or library stub for module named "oxypy"' in before.stdout

    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["-e", str(REPO)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(PYTHONPATH=BACKEND_PATH),  # the backend only, for the build step
    )
    assert installed.returncode == 0, installed.stderr
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (pth,) = site.glob("*oxypy*.pth")
    assert pth.read_text().split() == [str(REPO)]  # a path entry, no import hook

    after = _mypy(python, USER_CODE, tmp_path)
    assert after.returncode == 0, after.stdout
    assert after.stdout.startswith("Success: no issues found in 1 source file")
    wrong = _mypy(python, WRONG_USER_CODE, tmp_path)
    assert wrong.returncode == 1
    assert (
        'app.py:3: error: Incompatible types in assignment (expression has type "float | None", '
        'variable has type "str")  [assignment]'
    ) in wrong.stdout
    # The console script pip wrote, on the venv's interpreter (the dependencies
    # from this machine's site-packages: the venv has none of them).
    script = subprocess.run(
        [str(env_dir / "bin" / "oxypy"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=_env(PYTHONPATH=BACKEND_PATH),
    )
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    assert (script.returncode, script.stdout) == (0, f"oxypy {version[1]}\n"), script.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_wheel_holds_every_subpackage_py_typed_and_the_entry_point(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("oxypy_gateway-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    sources = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "oxypy").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    expected = sources | {"oxypy/py.typed", "_oxypy_cli.py"}
    assert {n for n in names if ".dist-info/" not in n} == expected
    subpackages = {n.rsplit("/", 1)[0] for n in expected if n.endswith("/__init__.py")}
    assert subpackages >= {"oxypy", "oxypy/_server", "oxypy/_client", "oxypy/_cli"}
    assert re.search(r"^Name: oxypy-gateway$", metadata, re.M)
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert extras >= {"examples", "test", "redis", "prometheus", "gunicorn"}
    assert "[console_scripts]\noxypy = _oxypy_cli:main" in entry_points


def test_first_commands_create_a_virtual_environment_first() -> None:
    """Debian's system Python refuses ``pip install`` (externally managed):
    the README's and the gateway guide's first commands make a venv first."""
    for doc in ("README.md", "docs/gateway.md"):
        text = (REPO / doc).read_text()
        venv_at = text.find("\npython3 -m venv .venv && . .venv/bin/activate")
        first_install = re.search(r"^pip install", text, re.M)
        assert first_install is not None and 0 <= venv_at < first_install.start(), doc


def test_examples_extra_brings_what_the_examples_import() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {re.split(r"[<>=\[ ;]", spec, maxsplit=1)[0].lower() for spec in extras["examples"]}
    imported = set()
    for path in (REPO / "examples").rglob("*.py"):
        imported |= set(re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.M))
    distributions = {"flask": "flask", "django": "django", "geventwebsocket": "gevent-websocket"}
    assert {distributions[m] for m in imported if m in distributions} == names
