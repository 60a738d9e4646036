"""Forward's lean exchange vs urllib3's ``urlopen(preload_content=False)``.

The decision this measures is written in docs/architecture.md (``## _client``):
Forward runs each upstream exchange itself (one ``sendall``, llhttp parsing,
a peek instead of ``poll()`` at checkout) over connections from urllib3's
pool, instead of calling ``HTTPConnectionPool.urlopen``.  Both variants here
build the same outgoing head (``build_headers``/``request_target``) and stream
the body back; only the exchange differs.  The WSGI app is called directly
(no front server), so the figures are the client side's CPU alone::

    python benchmarks/client_seam.py                 # 20000 GETs per variant
    python benchmarks/client_seam.py --requests 5000 --concurrency 32

The upstream is the Go server of the harness (GET /small, 1 KiB), or
``--upstream URL`` for any server answering GET /small.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
import urllib3  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from oxypy import Forward  # noqa: E402
from oxypy._client.request_head import build_headers, check_framing, request_target  # noqa: E402
from oxypy._core.net import TrustedProxies  # noqa: E402

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def urlopen_forward(url: str) -> App:
    """A Forward whose exchange is ``pool.urlopen(..., preload_content=False)``."""
    host_port = url.split("//", 1)[1]
    host, port = host_port.rsplit(":", 1)
    pool = urllib3.HTTPConnectionPool(
        host, int(port), maxsize=128, block=False, retries=False, timeout=urllib3.Timeout(5, 60)
    )
    trusted = TrustedProxies(None)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        framing = check_framing(environ)
        headers = build_headers(
            environ,
            host=host_port,
            trusted=trusted,
            upgrade=None,
            framing=framing,
            forwarded=False,
            via=None,
        )
        path = request_target(environ, "")
        resp = pool.urlopen(
            environ["REQUEST_METHOD"],
            path,
            headers=urllib3.HTTPHeaderDict(headers),
            retries=False,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=False,
        )
        start_response(f"{resp.status} {resp.reason}", list(resp.headers.items()))

        def body() -> Iterable[bytes]:
            try:
                yield from resp.stream(65536, decode_content=False)
            finally:
                resp.release_conn()

        return body()

    return app


def environ_for(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "RAW_URI": path,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "proxy.test",
        "HTTP_USER_AGENT": "bench",
        "HTTP_ACCEPT": "*/*",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
    }


def one(app: App) -> int:
    got: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
        got.append(status)
        return None

    body = app(environ_for("/small"), start_response)
    n = 0
    try:
        for chunk in body:
            n += len(chunk)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    if not got or not got[0].startswith("200") or n != 1024:
        raise RuntimeError(f"bad answer {got} {n} bytes")
    return n


def run(app: App, requests: int, concurrency: int) -> tuple[float, float]:
    """(CPU µs per request, requests per second)."""
    for _ in range(200):
        one(app)  # warm the pool
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if concurrency <= 1:
        for _ in range(requests):
            one(app)
    else:
        group = gevent.pool.Pool(concurrency)
        for _ in range(requests):
            group.spawn(one, app)
        group.join(raise_error=True)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu / requests * 1e6, requests / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upstream", help="an upstream URL answering GET /small (1 KiB)")
    args = parser.parse_args()
    service = None
    if args.upstream is None:
        import _harness as h

        workdir = tempfile.mkdtemp(prefix="oxypy-seam-")
        upstream_bin, _ = h.build_go(workdir)
        service = h.Proc("upstream", h.pinned(h.LOAD_CORE, [upstream_bin]), workdir)
        args.upstream = service.url
    try:
        variants = {
            "Forward (lean exchange)": Forward(args.upstream, pool_idle_timeout=None),
            "urlopen(preload_content=False)": urlopen_forward(args.upstream),
        }
        print(f"upstream {args.upstream}; {args.requests} GET /small per run, median of rounds")
        print(f"urllib3 {urllib3.__version__}, python {sys.version.split()[0]}")
        print(f"{'variant':34} {'conc':>4} {'CPU µs/req':>11} {'req/s':>8}")
        for concurrency in (1, 32):
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, app in variants.items():  # interleaved rounds
                    results[name].append(run(app, args.requests, concurrency))
            for name, runs in results.items():
                cpu = statistics.median(r[0] for r in runs)
                rate = statistics.median(r[1] for r in runs)
                print(f"{name:34} {concurrency:>4} {cpu:>11.1f} {rate:>8.0f}")
    finally:
        if service is not None:
            service.stop()


if __name__ == "__main__":
    main()
