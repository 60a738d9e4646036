"""oxypy.Forward served by oxypy's own strict Server (the recommended setup)."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _common import parse_args, ready  # noqa: E402

from oxypy import Forward  # noqa: E402
from oxypy.server import Server  # noqa: E402


def main() -> None:
    args = parse_args(__doc__ or "")
    server = Server(Forward(args.upstream), f"127.0.0.1:{args.port}").start()
    ready(server.address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
