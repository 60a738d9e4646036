"""What each oxypy block costs on top of Forward, measured on the shared harness.

Every chain (see proxies/oxypy_chain.py) runs in its own process on oxypy's
Server pinned to CPU 0; two Go upstream processes, wrk, curl and (for the
Redis chain) redis-server share CPU 1, so the proxy core is the bottleneck.
Rounds are interleaved (round r runs every chain once, order rotated per
round) and medians reported::

    python benchmarks/blocks.py              # 3 rounds, about 5 minutes
    python benchmarks/blocks.py --quick      # 1 round, 2 s runs: a smoke test
    python benchmarks/blocks.py --chains forward,rr2 --only small --rounds 5

Small GET: wrk -t1 -c64 on GET /small (1 KiB), 1 s warm-up then ``--duration``
seconds: req/s, p50/p99, and the proxy's CPU µs per request (utime+stime of
its process tree from /proc over the measured run / wrk's request count).  A
block's *cost* is its chain's CPU µs/request minus bare Forward's in the same
round (median over rounds); ``×fwd`` is the median per-round throughput ratio.
Uploads: 10 MiB POSTs with Content-Length (curl) through forward, rr2 and
buffer_rr2: MB/s (median of the uploads) and the RSS growth of the proxy.
Tables go to stdout and to benchmarks/results/blocks.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

SMALL_BODY = b"x" * 1024
UPLOAD = 10 * 1024 * 1024
CONNS = 64
BASE = "forward"
GROUPS = ("small", "upload")


@dataclass(frozen=True)
class Chain:
    name: str
    about: str
    upstreams: int = 1
    redis: bool = False
    upload: bool = False


CHAINS = (
    Chain("forward", "`Forward(up1)`: the baseline", upload=True),
    Chain("rr1", "`RoundRobin(Forward(), [up1])`: the balancer alone, same single upstream"),
    Chain("rr2", "`RoundRobin(Forward(), [up1, up2])`", upstreams=2, upload=True),
    Chain(
        "rr2_status",
        "the same watched by a `StatusPage` (per-server stats: cost vs rr2)",
        upstreams=2,
    ),
    Chain("least2", "`LeastRequest(Forward(), [up1, up2])`", upstreams=2),
    Chain("consistenthash2", "`ConsistentHash(Forward(), [up1, up2])`", upstreams=2),
    Chain(
        "buffer_rr2",
        '`Buffer(RoundRobin(Forward(), [up1, up2]), retry="IsNetworkError() && Attempts() < 2")`',
        upstreams=2,
        upload=True,
    ),
    Chain("ratelimit_mem", "`RateLimit(Forward(up1), rates=[Rate(1e9, burst=10**9)])`, memory"),
    Chain("ratelimit_redis", "the same with `RedisStore(redis://…)`", redis=True),
    Chain(
        "rr2_registry",
        "`RoundRobin(Forward(), [up1, up2], registry=RedisRegistry(redis://…, name))`",
        upstreams=2,
        redis=True,
    ),
    Chain("cbreaker", '`CircuitBreaker(Forward(up1), "NetworkErrorRatio() > 0.5")`'),
    Chain("trace", '`Trace(Forward(up1), sink=open("/dev/null", "w"))`'),
    Chain(
        "headers",
        '`Headers(Forward(up1), request={"X-Env": "bench"}, response={"Server": None})`',
    ),
    Chain("ipallow", '`IPAllowList(Forward(up1), ["10.0.0.0/8", "127.0.0.0/8"])`'),
    Chain(
        "cors",
        '`CORS(Forward(up1), allow_origins=["https://app.example.com"])`, requests without Origin',
    ),
    Chain("cors_star", '`CORS(Forward(up1), allow_origins=["*"])`, requests without Origin'),
    Chain("compress", "`Compress(Forward(up1))`, requests without Accept-Encoding"),
    Chain("forwardauth", "`ForwardAuth(Forward(up1), <in-process WSGI app answering 204>)`"),
    Chain("timeout", "`Timeout(Forward(up1), 30.0)`: a deadline no request reaches"),
    Chain(
        "otel_drop",
        "`OpenTelemetry(Forward(up1))`, SDK, sampler `ParentBased(ALWAYS_OFF)`: nothing recorded",
    ),
    Chain(
        "otel_batch",
        "`OpenTelemetry(Forward(up1))`, SDK, every span recorded, `BatchSpanProcessor` "
        "to an exporter that drops the batches",
    ),
    Chain(
        "full",
        "Trace → ConnLimit → RateLimit → CircuitBreaker → Buffer → RoundRobin → Forward "
        "(2 upstreams, huge limits)",
        upstreams=2,
    ),
    Chain(
        "full_1up",
        "the same chain, its two RoundRobin servers on one upstream process "
        "(`127.0.0.1` and `localhost`, two pools)",
    ),
)


@dataclass
class Settings:
    rounds: int
    duration: float
    warmup: float
    uploads: int
    only: frozenset[str]
    chains: tuple[Chain, ...]


class Results:
    """values[chain][metric] -> one entry per round (None when that run failed)."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.values: dict[str, dict[str, list[float | None]]] = {}
        self.failed: set[tuple[str, str]] = set()
        self.notes: list[str] = []

    def put(self, chain: str, metric: str, rnd: int, value: float | None) -> None:
        self.values.setdefault(chain, {}).setdefault(metric, [None] * self.rounds)[rnd] = value

    def fail(self, chain: str, metric: str, rnd: int, why: str) -> None:
        self.put(chain, metric, rnd, None)
        self.failed.add((chain, metric))
        self.note(f"{chain} {metric} round {rnd + 1}: FAIL: {why}")

    def note(self, line: str) -> None:
        self.notes.append(line)
        print(f"  note: {line}", flush=True)

    def _row(self, chain: str, metric: str) -> list[float | None]:
        return self.values.get(chain, {}).get(metric, [])

    def median(self, chain: str, metric: str) -> float | None:
        vals = [v for v in self._row(chain, metric) if v is not None]
        return statistics.median(vals) if vals else None

    def paired(
        self, chain: str, metric: str, base: str, op: Callable[[float, float], float]
    ) -> float | None:
        """Median over rounds of ``op(chain's value, base's value)`` from the same round."""
        mine, theirs = self._row(chain, metric), self._row(base, metric)
        if not mine or not theirs:
            return None
        vals = [op(a, b) for a, b in zip(mine, theirs, strict=True) if a is not None and b]
        return statistics.median(vals) if vals else None

    def diffs(self, chain: str, metric: str, base: str = BASE) -> list[float]:
        """``chain``'s value minus ``base``'s from the same round, for each round with both."""
        mine, theirs = self._row(chain, metric), self._row(base, metric)
        if not mine or not theirs:
            return []
        return [a - b for a, b in zip(mine, theirs, strict=True) if a is not None and b]

    def spread(self, chain: str, metric: str, base: str = BASE) -> str:
        """The 25th-75th percentile of the per-round differences (3 rounds or more)."""
        vals = self.diffs(chain, metric, base)
        if len(vals) < 3:
            return "-"
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
        return f"{q1:+.1f} to {q3:+.1f}"

    def ratio(self, chain: str, metric: str, base: str = BASE) -> float | None:
        return self.paired(chain, metric, base, lambda a, b: a / b)

    def diff(self, chain: str, metric: str, base: str = BASE) -> float | None:
        return self.paired(chain, metric, base, lambda a, b: a - b)

    def cell(self, chain: str, metric: str, fmt: Callable[[float], str]) -> str:
        value = self.median(chain, metric)
        failed = sum(v is None for v in self._row(chain, metric))
        if value is None:
            return "FAIL" if (chain, metric) in self.failed else "-"
        return fmt(value) + (f" ({failed} FAIL)" if failed else "")


def f_int(x: float) -> str:
    return f"{x:.0f}"


def f_ms(x: float) -> str:
    return f"{x:.2f}"


def f_1(x: float) -> str:
    return f"{x:.1f}"


def f_opt(x: float | None, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


# -- redis ------------------------------------------------------------------------
class Redis(h.Proc):
    """redis-server on a free loopback port, pinned to the load core, stopped by PID."""

    def __init__(self, workdir: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install -y redis-server)")
        self.redis_port = h.free_port()
        argv = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", workdir]
        super().__init__("redis", h.pinned(h.LOAD_CORE, argv), workdir)

    def _wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), 0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self.redis_port
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start; its output:\n{self.output()}")


# -- measurements ------------------------------------------------------------------
class Bench:
    def __init__(self, s: Settings, workdir: str, ups: list[h.Proc], redis: Redis | None):
        self.s = s
        self.workdir = workdir
        self.ups = ups
        self.redis = redis
        self.res = Results(s.rounds)
        self.upload_file = os.path.join(workdir, "upload.bin")
        self.loads: list[float] = []

    def start(self, chain: Chain) -> h.Proc:
        script = os.path.join(h.HERE, "proxies", "oxypy_chain.py")
        argv = [sys.executable, script, chain.name, *(u.url for u in self.ups)]
        if chain.redis:
            assert self.redis is not None
            argv += ["--redis", f"redis://127.0.0.1:{self.redis.port}/0"]
        return h.Proc(chain.name, h.pinned(h.PROXY_CORE, argv), self.workdir)

    def redis_commands(self) -> int | None:
        """Commands redis-server processed so far (``INFO stats``), when one runs."""
        if self.redis is None:
            return None
        with socket.create_connection(("127.0.0.1", self.redis.redis_port), 5) as sock:
            sock.sendall(b"INFO stats\r\n")
            data = b""
            while b"total_commands_processed:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        for line in data.decode().splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":", 1)[1])
        return None

    def check_small(self, url: str) -> str | None:
        got = h.run_curl([url + "/small"], limit_s=20)
        if got.status != 200 or got.body != SMALL_BODY:
            return f"GET /small answered HTTP {got.status} with {len(got.body)} bytes {got.error}"
        return None

    def run(self, chain: Chain, group: str, rnd: int) -> None:
        proxy = None
        metric = "rps" if group == "small" else "upload"
        try:
            proxy = self.start(chain)
            bad = self.check_small(proxy.url)  # also warms imports and the upstream pool
            if bad:
                self.res.fail(chain.name, metric, rnd, bad)
                return
            getattr(self, f"m_{group}")(chain, rnd, proxy)
        except Exception as exc:  # one broken measurement must not end the run
            self.res.fail(chain.name, metric, rnd, f"{type(exc).__name__}: {exc}")
            if proxy is not None:
                self.res.note(f"{chain.name} output:\n{proxy.output()}")
        finally:
            if proxy is not None:
                proxy.stop()

    def m_small(self, chain: Chain, rnd: int, proxy: h.Proc) -> None:
        url = proxy.url + "/small"
        h.run_wrk(url, CONNS, self.s.warmup)
        cmds0 = self.redis_commands() if chain.redis else None
        cpu0 = h.cpu_seconds(proxy.pid)
        got = h.run_wrk(url, CONNS, self.s.duration)
        cpu1 = h.cpu_seconds(proxy.pid)
        cmds1 = self.redis_commands() if chain.redis else None
        problems = []
        if got.non2xx:
            problems.append(f"{got.non2xx} non-2xx responses")
        if got.errors:
            problems.append(f"socket errors {got.errors}")
        if problems:
            self.res.note(
                f"{chain.name} round {rnd + 1}: {', '.join(problems)} of {got.requests} requests"
            )
        # A rejected (429) or failed request is cheaper than a forwarded one:
        # more than 1 % of them would flatter the block, so the run is void.
        if got.requests == 0 or got.non2xx * 100 > got.requests:
            self.res.fail(chain.name, "rps", rnd, "; ".join(problems) or "no requests")
            return
        cpu = (cpu1 - cpu0) * 1e6 / got.requests
        if cmds0 is not None and cmds1 is not None:
            # Redis round trips the chain made per request (minus the first INFO).
            per_request = (cmds1 - cmds0 - 1) / got.requests
            self.res.put(chain.name, "redis", rnd, per_request)
            print(f"  {chain.name:16s} Redis commands per request: {per_request:.4f}", flush=True)
        for metric, value in (
            ("rps", got.rps),
            ("p50", got.p50_ms),
            ("p99", got.p99_ms),
            ("cpu", cpu),
        ):
            self.res.put(chain.name, metric, rnd, value)
        print(
            f"  {chain.name:16s} {got.rps:8.0f} req/s  p50 {got.p50_ms:6.2f} ms"
            f"  p99 {got.p99_ms:7.2f} ms  cpu {cpu:5.0f} us/req",
            flush=True,
        )

    def m_upload(self, chain: Chain, rnd: int, proxy: h.Proc) -> None:
        args = ["-X", "POST", "-H", "Expect:", "-H", "Content-Type: application/octet-stream"]
        args += ["-T", self.upload_file, proxy.url + "/upload"]
        time.sleep(0.2)
        idle = h.rss_kib(proxy.pid)
        rates = []
        with h.RssPeak(proxy.pid) as peak:
            for _ in range(self.s.uploads):
                got = h.run_curl(args)
                if got.status != 200 or got.body.strip() != str(UPLOAD).encode():
                    why = (
                        f"HTTP {got.status}, upstream received {got.body.strip()[:60]!r}"
                        f" of {UPLOAD} bytes {got.error}"
                    )
                    self.res.fail(chain.name, "upload", rnd, why)
                    return
                rates.append(UPLOAD / got.seconds / 1e6)
        rate = statistics.median(rates)
        growth = (peak.peak_kib - idle) / 1024
        self.res.put(chain.name, "upload", rnd, rate)
        self.res.put(chain.name, "idle_rss", rnd, idle / 1024)
        self.res.put(chain.name, "upload_rss", rnd, growth)
        print(
            f"  {chain.name:16s} upload {rate:7.0f} MB/s (median of {len(rates)})"
            f"  RSS +{growth:.1f} MiB",
            flush=True,
        )


# -- report ------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("gevent", "greenlet", "urllib3", "httptools", "redis"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out.update(h.tool_versions())
    try:
        done = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=20, check=False
        )
        ver = [w for w in done.stdout.split() if w.startswith("v=")]
        out["redis-server"] = ver[0][2:] if ver else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        out["redis-server"] = "unavailable"
    out["oxypy"] = "git " + h.git_revision()
    return out


def header(argv: Sequence[str], s: Settings) -> list[str]:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return [
        "# oxypy block costs",
        "",
        f"Command: `{shlex.join(argv)}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: {os.cpu_count()} CPUs "
        f"({cpu}), {platform.system()} {platform.release()}  ",
        "Versions: " + "; ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"Method: {s.rounds} interleaved round(s) (round r runs every chain once, order rotated "
        "per round), medians reported. Each chain runs on `oxypy.server.Server` in a fresh "
        "process pinned to CPU 0; two Go upstream processes (benchmarks/upstream), wrk, curl "
        "and redis-server are pinned to CPU 1; 127.0.0.1 only. Rates and limits are huge: "
        "nothing is rejected.",
        "",
        "Chains: " + "; ".join(f"`{c.name}` = {c.about}" for c in s.chains),
        "",
    ]


def tables(s: Settings, r: Results) -> list[str]:
    out: list[str] = []
    names = [c.name for c in s.chains]
    if "small" in s.only:
        out += [
            f"### Small GET (1 KiB), wrk -t1 -c{CONNS}, {s.duration:g} s after {s.warmup:g} s "
            "warm-up",
            "",
            "CPU µs/req = the proxy's utime+stime (its process tree, from /proc) per request; "
            "cost = that minus bare Forward's in the same round; ×fwd = req/s over bare "
            "Forward's in the same round (both medians over rounds); spread = the 25th-75th "
            "percentile of the per-round costs.",
            "",
            "| chain | req/s | ×fwd | p50 ms | p99 ms | CPU µs/req | cost µs/req | spread |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in names:
            if "rps" not in r.values.get(n, {}):
                continue
            cost = "-" if n == BASE else f_opt(r.diff(n, "cpu"), "{:+.1f}")
            spread = "-" if n == BASE else r.spread(n, "cpu")
            out.append(
                f"| {n} | {r.cell(n, 'rps', f_int)} | {f_opt(r.ratio(n, 'rps'), '{:.3f}')} | "
                f"{r.cell(n, 'p50', f_ms)} | {r.cell(n, 'p99', f_ms)} | "
                f"{r.cell(n, 'cpu', f_1)} | {cost} | {spread} |"
            )
        out.append("")
        counted = [n for n in names if "redis" in r.values.get(n, {})]
        if counted:
            out += [
                "Redis commands per request during the measured run (redis-server's "
                "`total_commands_processed` before and after, median over rounds): "
                + "; ".join(f"{n} {r.cell(n, 'redis', lambda x: f'{x:.4f}')}" for n in counted)
                + ".",
                "",
            ]
    ups = [c.name for c in s.chains if c.upload]
    if "upload" in s.only and ups:
        out += [
            f"### 10 MiB POST upload with Content-Length (curl -T), {s.uploads} per round",
            "",
            "MB/s = 10^6 B/s over curl's time_total (median of the uploads, then over rounds); "
            "RSS growth = peak RSS of the proxy's process tree during the uploads minus its "
            "idle RSS just before.",
            "",
            "| chain | MB/s | ×fwd | idle RSS MiB | RSS growth MiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for n in ups:
            if "upload" not in r.values.get(n, {}):
                continue
            out.append(
                f"| {n} | {r.cell(n, 'upload', f_int)} | "
                f"{f_opt(r.ratio(n, 'upload'), '{:.2f}')} | {r.cell(n, 'idle_rss', f_int)} | "
                f"{r.cell(n, 'upload_rss', f_1)} |"
            )
        out.append("")
    out += goals(s, r)
    if r.notes:
        out += ["### Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    return out


def goals(s: Settings, r: Results) -> list[str]:
    """The benchmark asks of issues 3, 4 and 6, checked against this run."""
    rows: list[tuple[str, str, str]] = []

    def row(label: str, value: float | None, fmt: str, ok: Callable[[float], bool] | None) -> None:
        met = "-" if value is None or ok is None else ("yes" if ok(value) else "NO")
        rows.append((label, f_opt(value, fmt), met))

    if "small" in s.only:
        row(
            "#3 RoundRobin(Forward), 2 upstreams: req/s ×fwd ≥ 0.90",
            r.ratio("rr2", "rps"),
            "{:.3f}",
            lambda v: v >= 0.90,
        )
        row(
            "#3 RoundRobin(Forward), same 1 upstream: req/s ×fwd ≥ 0.90",
            r.ratio("rr1", "rps"),
            "{:.3f}",
            lambda v: v >= 0.90,
        )
        row("#3 RoundRobin cost, 2 upstreams (µs/req)", r.diff("rr2", "cpu"), "{:+.1f}", None)
        row(
            "#4 Buffer over RoundRobin, small GET: req/s ×rr2",
            r.ratio("buffer_rr2", "rps", "rr2"),
            "{:.3f}",
            None,
        )
        row(
            "#4 Buffer over RoundRobin, small GET: cost (µs/req)",
            r.diff("buffer_rr2", "cpu", "rr2"),
            "{:+.1f}",
            None,
        )
        for name in ("headers", "ipallow", "cors", "cors_star"):
            row(
                f"#15 {name} cost on a non-CORS request ≤ 5 µs (µs/req)",
                r.diff(name, "cpu"),
                "{:+.1f}",
                lambda v: v <= 5,
            )
        row(
            "#15 Compress cost, no Accept-Encoding (µs/req)",
            r.diff("compress", "cpu"),
            "{:+.1f}",
            None,
        )
        row(
            "#15 ForwardAuth (in-process app) cost (µs/req)",
            r.diff("forwardauth", "cpu"),
            "{:+.1f}",
            None,
        )
        row(
            "#14 Timeout cost ≤ 3 µs (µs/req)",
            r.diff("timeout", "cpu"),
            "{:+.1f}",
            lambda v: v <= 3,
        )
        row(
            "#16 OpenTelemetry, a sampler that drops: cost ≤ 15 µs (µs/req)",
            r.diff("otel_drop", "cpu"),
            "{:+.1f}",
            lambda v: v <= 15,
        )
        row(
            "#16 OpenTelemetry, every span batched: cost ≤ 60 µs (µs/req)",
            r.diff("otel_batch", "cpu"),
            "{:+.1f}",
            lambda v: v <= 60,
        )
        row("#6 RateLimit (memory) cost (µs/req)", r.diff("ratelimit_mem", "cpu"), "{:+.1f}", None)
        row("#6 RateLimit (Redis) cost (µs/req)", r.diff("ratelimit_redis", "cpu"), "{:+.1f}", None)
    if "upload" in s.only:
        row(
            "#4 Buffer over RoundRobin, 10 MiB upload: MB/s ×rr2",
            r.ratio("buffer_rr2", "upload", "rr2"),
            "{:.2f}",
            None,
        )
        row(
            "#4 Buffer, 10 MiB upload: RSS growth < 10 MiB (MiB)",
            r.median("buffer_rr2", "upload_rss"),
            "{:.1f}",
            lambda v: v < 10,
        )
    rows = [x for x in rows if x[1] != "-"]
    if not rows:
        return []
    out = ["### Issues 3, 4, 6, 14, 15 and 16", "", "| ask | measured | met |", "|---|---:|:---:|"]
    out += [f"| {label} | {value} | {met} |" for label, value, met in rows]
    return [*out, ""]


# -- main ------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="1 round, 2 s runs, 3 uploads")
    p.add_argument("--duration", type=int, default=None, help="whole seconds per wrk run (5)")
    p.add_argument("--only", default=",".join(GROUPS), help="subset of small,upload")
    p.add_argument("--chains", default="", help="comma-separated subset of chain names")
    p.add_argument("--uploads", type=int, default=None, help="10 MiB uploads per round (10)")
    a = p.parse_args(argv)
    only = frozenset(x.strip() for x in a.only.split(",") if x.strip())
    if not only or not only <= set(GROUPS):
        p.error(f"--only takes {','.join(GROUPS)}")
    chains: tuple[Chain, ...] = CHAINS
    if a.chains:
        wanted = {x.strip() for x in a.chains.split(",") if x.strip()}
        unknown = wanted - {c.name for c in CHAINS}
        if unknown:
            p.error(f"unknown chains {sorted(unknown)}; known: {[c.name for c in CHAINS]}")
        wanted.add(BASE)  # every cost is relative to bare Forward in the same round
        chains = tuple(c for c in CHAINS if c.name in wanted)
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    if rounds < 1:
        p.error("--rounds must be >= 1")
    return Settings(
        rounds=rounds,
        duration=float(a.duration if a.duration is not None else (2 if a.quick else 5)),
        warmup=1.0,
        uploads=a.uploads if a.uploads is not None else (3 if a.quick else 10),
        only=only,
        chains=chains,
    )


def main(argv: Sequence[str]) -> int:
    s = parse(argv[1:])
    missing = h.missing_tools()
    if any(c.redis for c in s.chains) and shutil.which("redis-server") is None:
        missing.append("redis-server")
    if missing:
        print(f"missing tools: {', '.join(missing)}; install them with:\n  {h.INSTALL_HINT}")
        return 2
    head = header([os.path.basename(sys.executable), *argv], s)
    print("\n".join(head), flush=True)
    workdir = tempfile.mkdtemp(prefix="oxypy-blocks-")
    procs: list[h.Proc] = []
    bench: Bench | None = None
    started = time.monotonic()
    try:
        up_bin, _ = h.build_go(workdir)
        ups = []
        for i in (1, 2):
            ups.append(h.Proc(f"upstream{i}", h.pinned(h.LOAD_CORE, [up_bin]), workdir))
            procs.append(ups[-1])
        redis = None
        if any(c.redis for c in s.chains) and "small" in s.only:
            redis = Redis(workdir)
            procs.append(redis)
        bench = Bench(s, workdir, ups, redis)
        if "upload" in s.only:
            h.make_file(bench.upload_file, UPLOAD)
        for rnd in range(s.rounds):
            shift = rnd % len(s.chains)
            order = s.chains[shift:] + s.chains[:shift]
            bench.loads.append(os.getloadavg()[0])
            print(f"## round {rnd + 1}/{s.rounds}: {', '.join(c.name for c in order)}", flush=True)
            if "small" in s.only:
                for chain in order:
                    bench.run(chain, "small", rnd)
            if "upload" in s.only:
                for chain in order:
                    if chain.upload:
                        bench.run(chain, "upload", rnd)
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert bench is not None
    body = tables(s, bench.res)
    body.append(
        f"Total wall time: {time.monotonic() - started:.0f} s; 1-minute load average at the "
        f"start of each round: {', '.join(f'{x:.2f}' for x in bench.loads)}, at the end: "
        f"{os.getloadavg()[0]:.2f} (above ~2, other processes shared the two cores: absolute "
        "figures drift, same-round differences and ratios hold better)."
    )
    print("\n" + "\n".join(body), flush=True)
    out_dir = os.path.join(h.HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "blocks.md")
    with open(path, "w") as fh:
        fh.write("\n".join(head + body) + "\n")
    print(f"\nwritten to {os.path.relpath(path, os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
