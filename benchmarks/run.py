"""oxypy's benchmark: Forward and the full chain vs direct, nginx, Go oxy and Python peers.

One command measures every target side by side, in interleaved rounds (round
r runs every target once, in a rotated order), and prints markdown tables of
medians with ratios to werkzeug's and to Go oxy's figures from the same round
(the median of the per-round ratios)::

    python benchmarks/run.py                 # 3 rounds, ~10-15 minutes
    python benchmarks/run.py --quick         # 1 round, c=1/64, short runs
    python benchmarks/run.py --only small,ws --rounds 5

Each proxy runs in its own process pinned to CPU 0 (``taskset -c 0``); the Go
upstream, wrk, curl and the Go WebSocket client share CPU 1; everything is on
127.0.0.1 with ports picked at run time.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

GROUPS = ("small", "download", "upload", "ws")
ALL = frozenset(GROUPS)
BIG = 100 * 1024 * 1024
SMALL_BODY = b"x" * 1024
BASELINE = "werkzeug"


@dataclass(frozen=True)
class Target:
    name: str
    script: str | None  # None: the upstream itself
    args: tuple[str, ...] = ()
    groups: frozenset[str] = ALL
    about: str = ""


UP, UP2 = "{up}", "{up2}"  # replaced by the upstreams' URLs when a target starts
GOOXY = "gooxy"  # the Go oxy program, built at run time
WORKER = "oxypy.gunicorn.Worker"

TARGETS = (
    Target("direct", None, about="the Go upstream itself, no proxy"),
    Target("nginx", "launch.py", ("nginx", UP), about="nginx, 1 worker, keepalive upstream"),
    Target("go-oxy", GOOXY, ("-chain", "rr", UP), about="Go oxy 1.3 roundrobin(forward)"),
    Target(
        "go-oxy-full",
        GOOXY,
        ("-chain", "full", UP, UP2),
        about="Go oxy 1.3 trace(connlimit(ratelimit(cbreaker(buffer(roundrobin(forward))))))",
    ),
    Target("oxypy-server", "oxypy_server.py", (UP,), about="oxypy.Forward on oxypy.serve"),
    Target(
        "oxypy-full",
        "oxypy_chain.py",
        ("full", UP, UP2),
        about="the `oxypy proxy` chain (Trace > ConnLimit > RateLimit > CircuitBreaker > "
        "Buffer > RoundRobin > Forward, limits huge) on oxypy.serve",
    ),
    Target(
        "gunicorn-oxypy",
        "launch.py",
        ("gunicorn", WORKER, "forward", UP),
        about=f"oxypy.Forward under gunicorn -w 1 -k {WORKER}",
    ),
    Target(
        "gunicorn-oxypy-full",
        "launch.py",
        ("gunicorn", WORKER, "full", UP, UP2),
        about=f"the chain under gunicorn -w 1 -k {WORKER}",
    ),
    Target(
        "gunicorn-gevent",
        "launch.py",
        ("gunicorn", "gevent", "forward", UP),
        about="oxypy.Forward under gunicorn -w 1 -k gevent",
    ),
    Target(
        "gunicorn-gevent-full",
        "launch.py",
        ("gunicorn", "gevent", "full", UP, UP2),
        about="the chain under gunicorn -w 1 -k gevent",
    ),
    Target(
        "oxypy-pywsgi",
        "oxypy_pywsgi.py",
        (UP,),
        about="oxypy.Forward on gevent.pywsgi.WSGIServer, handler sets TCP_NODELAY",
    ),
    Target(
        "oxypy-pywsgi-plain",
        "oxypy_pywsgi.py",
        (UP, "--plain"),
        groups=frozenset({"small"}),
        about="oxypy.Forward on gevent.pywsgi.WSGIServer, stock handler (Nagle on)",
    ),
    Target(
        "werkzeug",
        "werkzeug_pywsgi.py",
        (UP,),
        about="werkzeug ProxyMiddleware on gevent.pywsgi (TCP_NODELAY)",
    ),
    Target(
        "wsgiproxy2",
        "wsgiproxy2_pywsgi.py",
        (UP,),
        about="WSGIProxy2 HostProxy on gevent.pywsgi (TCP_NODELAY)",
    ),
)


@dataclass
class Settings:
    rounds: int
    conns: tuple[int, ...]
    warmup: float
    duration: float
    ws_conns: int
    ws_seconds: float
    only: frozenset[str]
    targets: tuple[Target, ...]


class Results:
    """values[target][metric] -> one entry per round (float, or None when failed)."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.values: dict[str, dict[str, list[float | None]]] = {}
        self.text: dict[str, dict[str, str]] = {}  # non-numeric outcomes ("no WS: ...")
        self.notes: list[str] = []

    def put(self, target: str, metric: str, rnd: int, value: float | None) -> None:
        row = self.values.setdefault(target, {}).setdefault(metric, [None] * self.rounds)
        row[rnd] = value

    def fail(self, target: str, metric: str, rnd: int, why: str) -> None:
        self.put(target, metric, rnd, None)
        self.text.setdefault(target, {}).setdefault(metric, "FAIL")
        self.note(f"{target} {metric} round {rnd + 1}: FAIL: {why}")

    def note(self, line: str) -> None:
        self.notes.append(line)
        print(f"  note: {line}", flush=True)

    def median(self, target: str, metric: str) -> float | None:
        vals = [v for v in self.values.get(target, {}).get(metric, []) if v is not None]
        return statistics.median(vals) if vals else None

    def ratio(self, target: str, metric: str, base: str = BASELINE) -> float | None:
        mine = self.values.get(target, {}).get(metric, [])
        theirs = self.values.get(base, {}).get(metric, [])
        if not mine or not theirs:  # a target not run, or the metric never measured
            return None
        per_round = [
            a / b
            for a, b in zip(mine, theirs, strict=True)
            if a is not None and b is not None and b > 0
        ]
        return statistics.median(per_round) if per_round else None

    def cell(self, target: str, metric: str, fmt: Callable[[float], str]) -> str:
        value = self.median(target, metric)
        if value is not None:
            failed = sum(v is None for v in self.values[target][metric])
            return fmt(value) + (f" ({failed} FAIL)" if failed else "")
        return self.text.get(target, {}).get(metric, "-")


# -- formatting -------------------------------------------------------------------
def f_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10000 else f"{x:.0f}"


def f_ms(x: float) -> str:
    return f"{x:.2f}"


def f_int(x: float) -> str:
    return f"{x:.0f}"


def f_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def f_mib(x: float) -> str:
    return f"{x:.1f}"


# -- one target ---------------------------------------------------------------------
class Bench:
    def __init__(
        self,
        settings: Settings,
        workdir: str,
        upstreams: tuple[h.Proc, h.Proc],
        wsload: str,
        gooxy: str | None,
    ):
        self.s = settings
        self.workdir = workdir
        self.upstream, self.upstream2 = upstreams
        self.wsload = wsload
        self.gooxy = gooxy
        self.res = Results(settings.rounds)
        self.upload_file = os.path.join(workdir, "upload.bin")
        self.loads: list[float] = []  # 1-minute load average at the start of each round

    # processes
    def start(self, target: Target) -> h.Proc | None:
        """The target's proxy process (pinned to the proxy core), or None for direct."""
        if target.script is None:
            return None
        urls = {UP: self.upstream.url, UP2: self.upstream2.url}
        args = [urls.get(a, a) for a in target.args]
        if target.script == GOOXY:
            assert self.gooxy is not None
            argv = [self.gooxy, *args]
        else:
            argv = [sys.executable, os.path.join(h.HERE, "proxies", target.script), *args]
        return h.Proc(target.name, h.pinned(h.PROXY_CORE, argv), self.workdir)

    def url_of(self, proxy: h.Proc | None) -> str:
        return (proxy or self.upstream).url

    def check_small(self, url: str) -> str | None:
        """None when GET /small through ``url`` returns exactly the upstream's 1 KiB body."""
        got = h.run_curl([url + "/small"], limit_s=20)
        if got.status != 200 or got.body != SMALL_BODY:
            return f"GET /small answered HTTP {got.status} with {len(got.body)} bytes {got.error}"
        return None

    def run_target(self, target: Target, rnd: int) -> None:
        groups = [g for g in GROUPS if g in target.groups and g in self.s.only]
        for group in groups:
            proxy = None
            try:
                proxy = self.start(target)
                getattr(self, f"m_{group}")(target, rnd, proxy)
            except Exception as exc:  # one broken measurement must not end the run
                self.res.fail(target.name, group, rnd, f"{type(exc).__name__}: {exc}")
                if proxy is not None:
                    self.res.note(f"{target.name} output:\n{proxy.output()}")
            finally:
                if proxy is not None:
                    proxy.stop()

    # measurements
    def m_small(self, target: Target, rnd: int, proxy: h.Proc | None) -> None:
        url = self.url_of(proxy)
        bad = self.check_small(url)
        if bad:
            for c in self.s.conns:
                self.res.fail(target.name, f"rps{c}", rnd, bad)
            return
        for c in self.s.conns:
            h.run_wrk(url + "/small", c, self.s.warmup)
            cpu0 = h.cpu_seconds(proxy.pid) if proxy else 0.0
            got = h.run_wrk(url + "/small", c, self.s.duration)
            cpu1 = h.cpu_seconds(proxy.pid) if proxy else 0.0
            problems = []
            if got.non2xx:
                problems.append(f"{got.non2xx} non-2xx responses")
            if got.errors:
                problems.append(f"socket errors {got.errors}")
            if problems:
                self.res.note(
                    f"{target.name} c={c} round {rnd + 1}: {', '.join(problems)}"
                    f" of {got.requests} requests"
                )
            if got.requests == 0 or got.non2xx > got.requests // 2:
                self.res.fail(target.name, f"rps{c}", rnd, "; ".join(problems) or "no requests")
                continue
            self.res.put(target.name, f"rps{c}", rnd, got.rps)
            self.res.put(target.name, f"p50_{c}", rnd, got.p50_ms)
            self.res.put(target.name, f"p99_{c}", rnd, got.p99_ms)
            if proxy:
                self.res.put(target.name, f"cpu{c}", rnd, (cpu1 - cpu0) * 1e6 / got.requests)
            print(
                f"  {target.name:20s} c={c:<4d} {got.rps:9.0f} req/s  p50 {got.p50_ms:7.2f} ms"
                f"  p99 {got.p99_ms:8.2f} ms"
                + (f"  cpu {(cpu1 - cpu0) * 1e6 / got.requests:5.0f} us/req" if proxy else ""),
                flush=True,
            )

    def _transfer(
        self,
        target: Target,
        rnd: int,
        proxy: h.Proc | None,
        metric: str,
        curl_args: Sequence[str],
        stdin_path: str | None,
        check: Callable[[h.CurlResult], str | None],
        size_of: Callable[[h.CurlResult], int],
    ) -> None:
        url = self.url_of(proxy)
        bad = self.check_small(url)  # also warms the proxy's imports and pool
        if bad:
            self.res.fail(target.name, metric, rnd, bad)
            return
        time.sleep(0.2)
        if proxy is not None:
            idle = h.rss_kib(proxy.pid)
            with h.RssPeak(proxy.pid) as peak:
                got = h.run_curl([*curl_args], stdin_path=stdin_path)
            self.res.put(target.name, "idle_rss", rnd, idle / 1024)
            self.res.put(target.name, f"{metric}_rss", rnd, (peak.peak_kib - idle) / 1024)
        else:
            got = h.run_curl([*curl_args], stdin_path=stdin_path)
        why = check(got)
        if why:
            self.res.fail(target.name, metric, rnd, why)
            return
        rate = size_of(got) / got.seconds / 1e6
        self.res.put(target.name, metric, rnd, rate)
        growth = self.res.values.get(target.name, {}).get(f"{metric}_rss", [None] * (rnd + 1))
        shown = (
            f"  RSS +{growth[rnd]:.1f} MiB" if proxy is not None and growth[rnd] is not None else ""
        )
        print(f"  {target.name:20s} {metric:9s} {rate:8.0f} MB/s{shown}", flush=True)

    def m_download(self, target: Target, rnd: int, proxy: h.Proc | None) -> None:
        def check(got: h.CurlResult) -> str | None:
            if got.status != 200 or got.size_download != BIG:
                return f"HTTP {got.status}, {got.size_download} of {BIG} bytes {got.error}"
            return None

        url = self.url_of(proxy) + "/big"
        self._transfer(
            target,
            rnd,
            proxy,
            "download",
            ["-o", "/dev/null", url],
            None,
            check,
            lambda g: g.size_download,
        )

    def _upload(self, target: Target, rnd: int, proxy: h.Proc | None, chunked: bool) -> None:
        def check(got: h.CurlResult) -> str | None:
            if got.status != 200 or got.body.strip() != str(BIG).encode():
                return (
                    f"HTTP {got.status}, upstream received {got.body.strip()[:60]!r}"
                    f" of {BIG} bytes {got.error}"
                )
            return None

        url = self.url_of(proxy) + "/upload"
        common = ["-X", "POST", "-H", "Expect:", "-H", "Content-Type: application/octet-stream"]
        if chunked:
            args = [*common, "-H", "Transfer-Encoding: chunked", "-T", "-", url]
            stdin_path: str | None = self.upload_file
        else:
            args = [*common, "-T", self.upload_file, url]
            stdin_path = None
        metric = "up_chunk" if chunked else "up_cl"
        self._transfer(target, rnd, proxy, metric, args, stdin_path, check, lambda g: BIG)

    def m_upload(self, target: Target, rnd: int, proxy: h.Proc | None) -> None:
        self._upload(target, rnd, proxy, chunked=False)
        if proxy is not None:  # a fresh process for the second framing
            proxy.stop()
            proxy = self.start(target)
        try:
            self._upload(target, rnd, proxy, chunked=True)
        finally:
            if proxy is not None:
                proxy.stop()

    def m_ws(self, target: Target, rnd: int, proxy: h.Proc | None) -> None:
        url = self.url_of(proxy).replace("http://", "ws://") + "/ws"
        probe = self._wsload(["-probe", "-timeout", "3s", "-url", url], 30)
        if probe.strip() != "ok":
            why = probe.strip().removeprefix("error: ") or "no answer"
            self.res.put(target.name, "ws_rate", rnd, None)
            self.res.text.setdefault(target.name, {})["ws_rate"] = f"no WS: {why}"
            print(f"  {target.name:20s} ws        no WS: {why}", flush=True)
            return
        out = self._wsload(
            [
                "-url",
                url,
                "-c",
                str(self.s.ws_conns),
                "-d",
                f"{self.s.ws_seconds:g}s",
                "-size",
                "1024",
                "-timeout",
                "5s",
            ],
            self.s.ws_seconds + 60,
        )
        fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
        if "rate" not in fields:
            self.res.fail(target.name, "ws_rate", rnd, out.strip() or "wsload printed nothing")
            return
        if int(fields.get("errors", "0")):
            self.res.note(f"{target.name} ws round {rnd + 1}: {fields['errors']} connection errors")
        self.res.put(target.name, "ws_rate", rnd, float(fields["rate"]))
        self.res.put(target.name, "ws_p50", rnd, float(fields["p50_ms"]))
        self.res.put(target.name, "ws_p99", rnd, float(fields["p99_ms"]))
        print(f"  {target.name:20s} ws        {out.strip()}", flush=True)

    def _wsload(self, args: Sequence[str], limit: float) -> str:
        import subprocess

        argv = h.pinned(h.LOAD_CORE, [self.wsload, *args])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            return "error: wsload timed out"
        return done.stdout + done.stderr


# -- report ------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("gevent", "greenlet", "urllib3", "werkzeug", "httptools", "WSGIProxy2", "WebOb"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out.update(h.tool_versions())
    out["oxypy"] = "git " + h.git_revision()
    return out


def header(argv: Sequence[str], s: Settings, vers: dict[str, str]) -> list[str]:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    lines = [
        "# oxypy benchmark results",
        "",
        f"Command: `{shlex.join(argv)}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: {os.cpu_count()} CPUs "
        f"({cpu}), {platform.system()} {platform.release()}  ",
        "Versions: " + "; ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        f"Method: {s.rounds} interleaved round(s) (round r runs every target once, order "
        "rotated per round); medians reported; ratios ×wz are the median of the per-round "
        "ratios to werkzeug's figure in the same round. Proxy process pinned to CPU 0; Go "
        "upstream, wrk, curl and wsload pinned to CPU 1; 127.0.0.1 only.",
        "",
        "Targets: " + "; ".join(f"`{t.name}` = {t.about}" for t in s.targets),
        "",
    ]
    return lines


def tables(s: Settings, r: Results) -> list[str]:
    names = [t.name for t in s.targets]
    out: list[str] = []
    if "small" in s.only:
        cs = s.conns
        out += [
            f"### A. small GET (1 KiB), keep-alive, wrk -t1, {s.duration:g} s after "
            f"{s.warmup:g} s warm-up: req/s",
            "",
            "| target | " + " | ".join(f"c={c} req/s | ×wz" for c in cs) + " |",
            "|---|" + "---:|---:|" * len(cs),
        ]
        for n in names:
            if not any(f"rps{c}" in r.values.get(n, {}) for c in cs):
                continue
            cells = []
            for c in cs:
                cells += [r.cell(n, f"rps{c}", f_rate), f_ratio(r.ratio(n, f"rps{c}"))]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out += [
            "",
            "Latency p50 / p99 (ms, from wrk --latency), p99 ×wz, and the proxy's CPU time "
            "per request (µs, utime+stime of its process tree from /proc):",
            "",
            "| target | "
            + " | ".join(f"c={c} p50 / p99 | p99 ×wz" for c in cs)
            + " | "
            + " | ".join(f"CPU µs/req c={c}" for c in cs)
            + " |",
            "|---|" + "---:|---:|" * len(cs) + "---:|" * len(cs),
        ]
        for n in names:
            if not any(f"rps{c}" in r.values.get(n, {}) for c in cs):
                continue
            cells = []
            for c in cs:
                cells += [
                    f"{r.cell(n, f'p50_{c}', f_ms)} / {r.cell(n, f'p99_{c}', f_ms)}",
                    f_ratio(r.ratio(n, f"p99_{c}")),
                ]
            cells += [r.cell(n, f"cpu{c}", f_int) for c in cs]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    transfer = [
        m
        for m, g in (("download", "download"), ("up_cl", "upload"), ("up_chunk", "upload"))
        if g in s.only
    ]
    if transfer:
        titles = {
            "download": "download",
            "up_cl": "upload (Content-Length)",
            "up_chunk": "upload (chunked)",
        }
        out += [
            "### B/C. 100 MiB download / upload (curl), MB/s = 10^6 B/s; RSS growth = peak "
            "RSS of the proxy's process tree during that transfer minus its idle RSS just "
            "before (MiB)",
            "",
            "| target | idle RSS MiB | "
            + " | ".join(f"{titles[m]} MB/s | ×wz | RSS growth MiB" for m in transfer)
            + " |",
            "|---|---:|" + "---:|---:|---:|" * len(transfer),
        ]
        for n in names:
            if not any(m in r.values.get(n, {}) for m in transfer):
                continue
            cells = [r.cell(n, "idle_rss", f_int)]
            for m in transfer:
                cells += [
                    r.cell(n, m, f_int),
                    f_ratio(r.ratio(n, m)),
                    r.cell(n, f"{m}_rss", f_mib),
                ]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    if "ws" in s.only:
        out += [
            f"### D. WebSocket echo, 1 KiB binary messages, {s.ws_conns} connections, "
            f"{s.ws_seconds:g} s (Go wsload)",
            "",
            "| target | msgs/s | ×direct | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for n in names:
            if "ws_rate" not in r.values.get(n, {}):
                continue
            out.append(
                f"| {n} | {r.cell(n, 'ws_rate', f_rate)} | "
                f"{f_ratio(r.ratio(n, 'ws_rate', 'direct'))} | "
                f"{r.cell(n, 'ws_p50', f_ms)} | {r.cell(n, 'ws_p99', f_ms)} |"
            )
        out.append("")
    out += oxy_table(s, r)
    out += goals(s, r)
    out += goals17(s, r)
    if r.notes:
        out += ["### Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    return out


OXY = "go-oxy"
#: (metric, column title, format, higher is better) of the Go oxy table.
OXY_COLUMNS: tuple[tuple[str, str, Callable[[float], str], bool], ...] = (
    ("rps64", "req/s c=64", f_rate, True),
    ("p99_256", "p99 c=256", f_ms, False),
    ("cpu64", "CPU µs/req c=64", f_int, False),
    ("download", "100 MiB down MB/s", f_int, True),
    ("up_cl", "CL up MB/s", f_int, True),
    ("up_chunk", "chunked up MB/s", f_int, True),
    ("ws_rate", "WS msgs/s", f_rate, True),
)


def oxy_table(s: Settings, r: Results) -> list[str]:
    """Every target's headline figures with its ratio to Go oxy's (rr+forward) in the same round."""
    names = [t.name for t in s.targets]
    if OXY not in names:
        return []
    cols = [c for c in OXY_COLUMNS if any(c[0] in r.values.get(n, {}) for n in names)]
    if not cols:
        return []
    out = [
        "### Side by side with Go oxy (value, and ×oxy: the median of per-round ratios to "
        "go-oxy's figure; p99 and CPU: lower is better)",
        "",
        "| target | " + " | ".join(f"{title} | ×oxy" for _, title, _, _ in cols) + " |",
        "|---|" + "---:|---:|" * len(cols),
    ]
    for n in names:
        if not any(c[0] in r.values.get(n, {}) for c in cols):
            continue
        cells = []
        for metric, _, fmt, _ in cols:
            cells += [r.cell(n, metric, fmt), f_ratio(r.ratio(n, metric, OXY))]
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def goals17(s: Settings, r: Results) -> list[str]:
    """The targets of issue 17, against Go oxy and bare Forward in this run."""
    rows: list[str] = []

    def row(label: str, value: float | None, goal: float, higher: bool) -> None:
        if value is None:
            rows.append(f"| {label} | - | - |")
            return
        ok = value >= goal if higher else value <= goal
        miss = "" if ok else f" (missed by {abs(value / goal - 1) * 100:.0f} %)"
        rows.append(f"| {label} | {value:.2f}× | {'yes' if ok else 'NO' + miss} |")

    def info(label: str, value: float | None) -> None:
        rows.append(f"| {label} | {'-' if value is None else f'{value:.2f}×'} | - |")

    for ox in ("oxypy-server", "gunicorn-oxypy"):
        row(f"{ox}: small GET c=64 req/s ≥ 0.9× go-oxy", r.ratio(ox, "rps64", OXY), 0.9, True)
        row(f"{ox}: p99 c=256 ≤ 1.5× go-oxy", r.ratio(ox, "p99_256", OXY), 1.5, False)
        row(f"{ox}: 100 MiB download ≥ 0.95× go-oxy", r.ratio(ox, "download", OXY), 0.95, True)
        row(f"{ox}: WebSocket msgs/s ≥ 0.9× go-oxy", r.ratio(ox, "ws_rate", OXY), 0.9, True)
    for chain, fwd in (
        ("oxypy-full", "oxypy-server"),
        ("gunicorn-oxypy-full", "gunicorn-oxypy"),
        ("gunicorn-gevent-full", "gunicorn-gevent"),
    ):
        row(
            f"{chain}: CPU µs/req c=64 ≤ 1.5× {fwd}'s",
            r.ratio(chain, "cpu64", fwd),
            1.5,
            False,
        )
    for label, target, metric, base in (
        ("go-oxy-full: CPU µs/req c=64 ÷ go-oxy's", "go-oxy-full", "cpu64", OXY),
        ("gunicorn-oxypy req/s c=64 ÷ oxypy-server's", "gunicorn-oxypy", "rps64", "oxypy-server"),
        (
            "gunicorn-oxypy req/s c=64 ÷ gunicorn-gevent's",
            "gunicorn-oxypy",
            "rps64",
            "gunicorn-gevent",
        ),
        ("gunicorn-gevent CL upload ÷ oxypy-server's", "gunicorn-gevent", "up_cl", "oxypy-server"),
    ):
        info(label, r.ratio(target, metric, base))
    if all(line.endswith("| - | - |") for line in rows):
        return []
    return [
        "### Targets of issue 17",
        "",
        "| goal | measured | met |",
        "|---|---:|:---:|",
        *rows,
        "",
    ]


def goals(s: Settings, r: Results) -> list[str]:
    """The targets of issues 2 and 8, checked against this run."""
    rows: list[tuple[str, str, bool | None]] = []
    ox = "oxypy-server"

    def check(label: str, value: float | None, ok: Callable[[float], bool], fmt: str) -> None:
        rows.append(
            (
                label,
                "-" if value is None else fmt.format(value),
                None if value is None else ok(value),
            )
        )

    if "small" in s.only:
        if 64 in s.conns:
            check(
                "small GET c=64 req/s ≥ 2× werkzeug",
                r.ratio(ox, "rps64"),
                lambda v: v >= 2.0,
                "{:.2f}×",
            )
        if 256 in s.conns:
            check(
                "small GET c=256 p99 ≤ 1/5 of werkzeug's",
                r.ratio(ox, "p99_256"),
                lambda v: v <= 0.2,
                "{:.2f}×",
            )
        for c in s.conns:
            ratio = r.ratio(ox, f"rps{c}", "oxypy-pywsgi")
            check(f"oxypy Server ≥ 1.0× pywsgi req/s, c={c}", ratio, lambda v: v >= 1.0, "{:.2f}×")
    for m, g, title in (
        ("download", "download", "download"),
        ("up_cl", "upload", "upload (Content-Length)"),
        ("up_chunk", "upload", "upload (chunked)"),
    ):
        if g not in s.only:
            continue
        wz = r.median(BASELINE, m)
        if wz is None:  # werkzeug failed: compare with nothing, report the absolute rate
            check(f"{title} MB/s (werkzeug FAIL)", r.median(ox, m), lambda v: True, "{:.0f} MB/s")
        else:
            check(f"{title} MB/s ≥ 1.2× werkzeug", r.ratio(ox, m), lambda v: v >= 1.2, "{:.2f}×")
        check(
            f"{title} RSS growth < 20 MiB", r.median(ox, f"{m}_rss"), lambda v: v < 20, "{:.1f} MiB"
        )
    if "ws" in s.only:
        check("WebSocket ≥ 20k msgs/s", r.median(ox, "ws_rate"), lambda v: v >= 20000, "{:.0f}")
        check("WebSocket p99 < 20 ms", r.median(ox, "ws_p99"), lambda v: v < 20, "{:.2f} ms")
    if not rows:
        return []
    out = [
        "### Targets of issues 2 and 8 (oxypy-server)",
        "",
        "| goal | measured | met |",
        "|---|---:|:---:|",
    ]
    for label, value, ok in rows:
        out.append(f"| {label} | {value} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    out.append("")
    return out


# -- main ---------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="1 round, c=1/64, short runs")
    p.add_argument("--only", default=",".join(GROUPS), help="subset of small,download,upload,ws")
    p.add_argument("--targets", default="", help="comma-separated subset of target names")
    p.add_argument("--conns", default="", help="connection counts, e.g. 1,16,64,256")
    p.add_argument("--duration", type=int, default=None, help="whole seconds per wrk run (5)")
    a = p.parse_args(argv)
    only = frozenset(x.strip() for x in a.only.split(",") if x.strip())
    if not only <= ALL:
        p.error(f"--only takes {','.join(GROUPS)}")
    targets: tuple[Target, ...] = TARGETS
    if a.targets:
        wanted = {x.strip() for x in a.targets.split(",")}
        unknown = wanted - {t.name for t in TARGETS}
        if unknown:
            p.error(f"unknown targets {sorted(unknown)}; known: {[t.name for t in TARGETS]}")
        targets = tuple(t for t in TARGETS if t.name in wanted)
    quick = a.quick
    conns: tuple[int, ...] = (1, 64) if quick else (1, 16, 64, 256)
    if a.conns:
        conns = tuple(int(x) for x in a.conns.split(","))
    return Settings(
        rounds=a.rounds if a.rounds is not None else (1 if quick else 3),
        conns=conns,
        warmup=1.0,
        duration=float(a.duration if a.duration is not None else (2 if quick else 5)),
        ws_conns=50,
        ws_seconds=1.0 if quick else 3.0,
        only=only,
        targets=targets,
    )


def main(argv: Sequence[str]) -> int:
    s = parse(argv[1:])
    missing = h.missing_tools()
    if missing:
        print(f"missing tools: {', '.join(missing)}; install them with:\n  {h.INSTALL_HINT}")
        return 2
    try:
        import wsgiproxy  # noqa: F401
    except ImportError:
        print("WSGIProxy2 is not installed (pip install WSGIProxy2): skipping its target")
        s.targets = tuple(t for t in s.targets if t.name != "wsgiproxy2")
    if shutil.which("nginx") is None:
        print("nginx is not installed (apt-get install nginx): skipping its target")
        s.targets = tuple(t for t in s.targets if t.name != "nginx")
    if importlib.util.find_spec("gunicorn") is None:
        print("gunicorn is not installed (pip install gunicorn): skipping its targets")
        s.targets = tuple(t for t in s.targets if not t.name.startswith("gunicorn-"))
    cmd = [os.path.basename(sys.executable), *argv]
    vers = versions()
    head = header(cmd, s, vers)
    print("\n".join(head), flush=True)
    workdir = tempfile.mkdtemp(prefix="oxypy-bench-")
    upstreams: list[h.Proc] = []
    bench: Bench | None = None
    started = time.monotonic()
    try:
        up_bin, ws_bin = h.build_go(workdir)
        gooxy = None
        if any(t.script == GOOXY for t in s.targets):
            gooxy, why = h.build_gooxy(workdir)
            if gooxy is None:
                print(f"skipping the Go oxy targets: {why}")
                s.targets = tuple(t for t in s.targets if t.script != GOOXY)
        for name in ("upstream", "upstream2"):
            upstreams.append(h.Proc(name, h.pinned(h.LOAD_CORE, [up_bin]), workdir))
        bench = Bench(s, workdir, (upstreams[0], upstreams[1]), ws_bin, gooxy)
        if "upload" in s.only:
            h.make_file(bench.upload_file, BIG)
        for rnd in range(s.rounds):
            shift = rnd % len(s.targets)
            order = s.targets[shift:] + s.targets[:shift]
            bench.loads.append(os.getloadavg()[0])
            print(f"## round {rnd + 1}/{s.rounds}: {', '.join(t.name for t in order)}", flush=True)
            for target in order:
                bench.run_target(target, rnd)
    finally:
        for upstream in upstreams:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert bench is not None
    body = tables(s, bench.res)
    body.append(
        f"Total wall time: {time.monotonic() - started:.0f} s; 1-minute load average at the "
        f"start of each round: {', '.join(f'{x:.2f}' for x in bench.loads)}, at the end: "
        f"{os.getloadavg()[0]:.2f} (anything above ~2 means other processes shared the two "
        "cores: absolute figures drift, same-round ratios hold better)."
    )
    text = "\n".join(head + body) + "\n"
    print("\n" + "\n".join(body), flush=True)
    out_dir = os.path.join(h.HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "latest.md"), "w") as fh:
        fh.write(text)
    print(f"\nwritten to {os.path.relpath(os.path.join(out_dir, 'latest.md'), os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
