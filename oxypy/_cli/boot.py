"""``python -m oxypy``: gevent's patch before anything imports ``ssl``.

``python -m oxypy`` imports the ``oxypy`` package (whose blocks pull in
urllib3, hence ``ssl``) before it runs ``oxypy/__main__.py``: patching there
would be too late for the ``ssl`` names urllib3 took, and upstream TLS would
block the whole process.  So ``oxypy/__init__`` imports this module first
(``oxypy._cli`` itself imports nothing), and it patches the process when, and
only when, the interpreter is locating ``oxypy`` (or ``oxypy.__main__``) as
its ``-m`` module: ``sys.argv[0]`` is ``"-m"`` only while that happens, and
``sys.orig_argv`` names the module.  Nothing re-executes the process.
``import oxypy`` in any other program patches nothing (the library leaves
that to the program).
"""

from __future__ import annotations

import sys

__all__ = ["run_as_module"]

#: ``-m`` targets that run the ``oxypy`` command, split at dots.
_COMMAND = frozenset({("oxypy",), ("oxypy", "__main__")})
#: Interpreter options that take the next argument as their value.
_WITH_VALUE = frozenset("XW")


def run_as_module(argv: list[str], orig_argv: list[str]) -> bool:
    """Whether the interpreter is locating the ``oxypy`` command as its ``-m`` module."""
    if argv[:1] != ["-m"]:
        return False
    args = iter(orig_argv[1:])
    for arg in args:
        if not arg.startswith("-") or arg.startswith("--") or arg == "-":
            return False  # a script, or an option without -m before it
        flags = arg[1:]
        for i, flag in enumerate(flags):
            if flag == "m":
                module = flags[i + 1 :] or next(args, "")
                return tuple(module.split(".")) in _COMMAND
            if flag == "c":
                return False
            if flag in _WITH_VALUE:
                if not flags[i + 1 :]:
                    next(args, None)
                break
    return False


if run_as_module(sys.argv, getattr(sys, "orig_argv", [])):
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
