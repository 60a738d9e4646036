"""Shared helpers of the benchmark harness: processes, pinning, wrk, curl, /proc.

Nothing here imports gevent or oxypy: the harness itself runs unpatched and
starts every measured program as a separate process, pinned with ``taskset``.
Every process is started through :class:`Proc` and stopped by its PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE = 0
LOAD_CORE = 1


# -- tools ---------------------------------------------------------------------
INSTALL_HINT = (
    "apt-get update && apt-get install -y golang-go golang-github-gorilla-websocket-dev wrk curl"
)


def missing_tools() -> list[str]:
    """Names of the external programs the harness needs but cannot find."""
    return [name for name in ("go", "wrk", "curl", "taskset") if shutil.which(name) is None]


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def tool_versions() -> dict[str, str]:
    go = _first_line(["go", "version"]).removeprefix("go version ")
    wrk = _first_line(["wrk", "-v"]).split(" Copyright")[0].removeprefix("wrk ")
    curl = " ".join(_first_line(["curl", "--version"]).split()[1:2])
    return {"go": go, "wrk": wrk, "curl": curl}


def git_revision() -> str:
    """HEAD of the repository under test, with "+dirty" when oxypy/ has local changes."""
    head = _first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", ROOT, "status", "--porcelain", "--", "oxypy"])
    return head + ("+dirty" if dirty not in ("", "unknown") else "")


def _go_env(workdir: str) -> dict[str, str]:
    """GOPATH mode over the Debian Go packages: builds without any network."""
    gopath = os.path.join(workdir, "gopath")
    os.makedirs(gopath, exist_ok=True)
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"/usr/share/gocode:{gopath}", GOFLAGS="")
    if not os.environ.get("HOME"):
        env["GOCACHE"] = os.path.join(workdir, "gocache")
    return env


def build_go(workdir: str) -> tuple[str, str]:
    """Build the Go upstream and wsload into ``workdir`` (GOPATH mode, no network)."""
    env = _go_env(workdir)
    out = []
    for name in ("upstream", "wsload"):
        binary = os.path.join(workdir, name)
        done = subprocess.run(
            ["go", "build", "-o", binary, os.path.join(HERE, name, "main.go")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"go build of benchmarks/{name} failed:\n{done.stderr}\n"
                f"(is golang-github-gorilla-websocket-dev installed? {INSTALL_HINT})"
            )
        out.append(binary)
    return out[0], out[1]


def build_gooxy(workdir: str) -> tuple[str | None, str]:
    """Build ``proxies/gooxy`` (Go oxy's chains) into ``workdir``: (binary, "") or (None, why).

    Needs golang-github-vulcand-oxy-dev (GOPATH mode, no network); without it
    the Go oxy targets are skipped, not failed.
    """
    if not os.path.isdir("/usr/share/gocode/src/github.com/vulcand/oxy"):
        return None, "golang-github-vulcand-oxy-dev is not installed"
    env = _go_env(workdir)
    binary = os.path.join(workdir, "gooxy")
    done = subprocess.run(
        ["go", "build", "-o", binary, os.path.join(HERE, "proxies", "gooxy", "main.go")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        return None, f"go build of proxies/gooxy failed: {done.stderr.strip()[-300:]}"
    return binary, ""


# -- processes -------------------------------------------------------------------
def pinned(core: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run under ``taskset -c core`` (taskset execs: the PID stays the same)."""
    return ["taskset", "-c", str(core), *argv]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A long-running server process that prints ``READY <port>`` when accepting."""

    def __init__(self, name: str, argv: Sequence[str], logdir: str, ready_timeout: float = 30.0):
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}.{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
        self.pid = self.proc.pid
        try:
            self.port = self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as fh:
                match = re.search(rb"READY (\d+)", fh.read())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start; its output:\n{self.output()}")

    def output(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL after 5 s; idempotent."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()


# -- /proc ---------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        data = fh.read()
    return data[data.rindex(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """utime + stime of the process tree rooted at ``root``, in seconds."""
    total = 0
    for pid in tree_pids(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(root: int) -> int:
    return sum(_status_kib(pid, "VmRSS") for pid in tree_pids(root))


def hwm_kib(root: int) -> int:
    return sum(_status_kib(pid, "VmHWM") for pid in tree_pids(root))


def reset_hwm(root: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``); False if not allowed."""
    ok = True
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            ok = False
    return ok


class RssPeak:
    """Peak resident memory of a process tree over a ``with`` block.

    Samples VmRSS every ``interval`` seconds in a thread and, where the kernel
    lets us reset VmHWM first, also reads the exact high-water mark at the end.
    """

    def __init__(self, root: int, interval: float = 0.005):
        self.root = root
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._hwm_ok = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, rss_kib(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPeak:
        self._hwm_ok = reset_hwm(self.root)
        self.peak_kib = rss_kib(self.root)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak_kib = max(self.peak_kib, rss_kib(self.root))
        if self._hwm_ok:
            self.peak_kib = max(self.peak_kib, hwm_kib(self.root))


# -- wrk -------------------------------------------------------------------------
@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    non2xx: int = 0
    raw: str = ""


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output (req/s, request count, p50/p99, errors)."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    reqs = re.search(r"(\d+) requests in", text)
    if rps is None or reqs is None:
        raise RuntimeError(f"cannot read wrk output:\n{text}")
    pct = {
        int(m.group(1)): _ms(m.group(2), m.group(3))
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    errors: dict[str, int] = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(value):
                errors[name] = int(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(reqs.group(1)),
        p50_ms=pct.get(50, float("nan")),
        p99_ms=pct.get(99, float("nan")),
        errors=errors,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        raw=text,
    )


def run_wrk(url: str, connections: int, seconds: float, *, timeout_s: float = 10.0) -> WrkResult:
    """One wrk run (-t1, keep-alive) pinned to the load core; bounded in time."""
    argv = pinned(
        LOAD_CORE,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",  # wrk takes whole seconds only
            f"--timeout={timeout_s:g}s",
            "--latency",
            url,
        ],
    )
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


# -- curl ------------------------------------------------------------------------
@dataclass
class CurlResult:
    status: int
    size_download: int
    size_upload: int
    seconds: float
    body: bytes
    error: str = ""


def run_curl(
    args: Sequence[str], *, stdin_path: str | None = None, limit_s: float = 120.0
) -> CurlResult:
    """curl pinned to the load core; the response body is kept if small."""
    fmt = "%{http_code} %{size_download} %{size_upload} %{time_total}"
    argv = pinned(LOAD_CORE, ["curl", "-sS", "--max-time", f"{limit_s:g}", "-w", fmt, *args])
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        done = subprocess.run(
            argv, stdin=stdin, capture_output=True, timeout=limit_s + 30, check=False
        )
    finally:
        if stdin_path and not isinstance(stdin, int):
            stdin.close()
    out = done.stdout
    # -w output comes last; everything before it is the body (when not -o).
    match = re.search(rb"(\d{3}) (\d+) (\d+) ([\d.]+)$", out)
    if match is None:
        return CurlResult(0, 0, 0, 0.0, b"", done.stderr.decode(errors="replace").strip())
    return CurlResult(
        status=int(match.group(1)),
        size_download=int(match.group(2)),
        size_upload=int(match.group(3)),
        seconds=float(match.group(4)),
        body=out[: match.start()],
        error=done.stderr.decode(errors="replace").strip(),
    )


def make_file(path: str, size: int) -> None:
    """``size`` random bytes (written 1 MiB at a time)."""
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            fh.write(os.urandom(n))
            left -= n
