"""Start a server that cannot say ``READY <port>`` itself: nginx, or gunicorn.

Usage::

    python proxies/launch.py nginx UPSTREAM
    python proxies/launch.py gunicorn WORKER CHAIN UPSTREAM [UPSTREAM2]

picks a free port on 127.0.0.1, starts the server as a child (it inherits the
launcher's CPU pinning), prints ``READY <port>`` once the port accepts, and on
SIGTERM stops the child by PID (SIGTERM, then SIGKILL after 5 s).  The
launcher only waits meanwhile, so the CPU time of its process tree is the
server's.  ``WORKER`` is a gunicorn worker class (``oxypy.gunicorn.Worker``,
``gevent``); ``CHAIN`` a chain of ``oxypy_chain.py`` (``forward``, ``full``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/error.log error;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
    upstream up {{ server {upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def command(argv: list[str], port: int, workdir: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if argv[0] == "nginx" and len(argv) == 2:
        upstream = argv[1].removeprefix("http://").rstrip("/")
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as fh:
            fh.write(NGINX_CONF.format(dir=workdir, upstream=upstream, port=port))
        return ["nginx", "-p", workdir, "-c", conf], env
    if argv[0] == "gunicorn" and len(argv) >= 4:
        worker, chain, *ups = argv[1:]
        env["OXYPY_BENCH_CHAIN"] = chain
        env["OXYPY_BENCH_UPSTREAMS"] = ",".join(ups)
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "1",
            "-k",
            worker,
            "-b",
            f"127.0.0.1:{port}",
            "--chdir",
            HERE,
            "--log-level",
            "warning",
            "gunicorn_app:app",
        ], env
    raise SystemExit(__doc__)


def main() -> None:
    workdir = tempfile.mkdtemp(prefix="oxypy-launch-")
    port = free_port()
    argv, env = command(sys.argv[1:], port, workdir)
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)

    def stop(*_: Any) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + 30
    while not accepting(port):
        if child.poll() is not None or time.monotonic() > deadline:
            print(f"{argv[0]} did not start (exit {child.poll()})", flush=True)
            stop()
        time.sleep(0.05)
    print(f"READY {port}", flush=True)
    child.wait()
    stop()


if __name__ == "__main__":
    main()
