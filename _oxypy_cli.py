"""The ``oxypy`` console script's entry point: gevent's patch before anything else.

It lives outside the ``oxypy`` package on purpose: importing ``oxypy`` (its
``__init__`` pulls in urllib3, hence ``ssl``) before ``monkey.patch_all()``
would leave upstream TLS blocking. Here gevent patches the process first, then
the command is imported; nothing re-executes the process, so the current
directory (which may hold an unrelated ``oxypy/`` folder) is never put on
``sys.path``.
"""

from __future__ import annotations


def main() -> int:
    """Patch the process with gevent, then run ``oxypy.cli.main``."""
    from gevent import monkey

    monkey.patch_all()
    import sys

    from oxypy.cli import main as command

    return command(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
