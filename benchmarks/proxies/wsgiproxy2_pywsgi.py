"""WSGIProxy2's HostProxy on gevent.pywsgi (TCP_NODELAY unless --plain)."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import parse_args, serve_pywsgi  # noqa: E402
from wsgiproxy import HostProxy  # noqa: E402


def main() -> None:
    args = parse_args(__doc__ or "", plain_flag=True)
    serve_pywsgi(HostProxy(args.upstream), args.port, nodelay=not args.plain)


if __name__ == "__main__":
    main()
