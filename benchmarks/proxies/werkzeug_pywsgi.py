"""werkzeug.middleware.http_proxy.ProxyMiddleware on gevent.pywsgi (TCP_NODELAY unless --plain)."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import parse_args, serve_pywsgi  # noqa: E402
from werkzeug.middleware.http_proxy import ProxyMiddleware  # noqa: E402


def not_found(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


def main() -> None:
    args = parse_args(__doc__ or "", plain_flag=True)
    app = ProxyMiddleware(not_found, targets={"/": {"target": args.upstream}})
    # ProxyMiddleware normalises every prefix to "/<key>/", so "/" becomes "//"
    # and matches no request path; put the normalised options back under "/"
    # so its own __call__ routes every path to the upstream.
    app.targets = {"/": app.targets["//"]}
    serve_pywsgi(app, args.port, nodelay=not args.plain)


if __name__ == "__main__":
    main()
