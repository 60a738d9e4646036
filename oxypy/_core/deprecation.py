"""Deprecation shims: old call shapes kept working for one release, with a warning."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = ["keyword_only_since", "renamed_since"]

P = ParamSpec("P")
R = TypeVar("R")


def keyword_only_since(version: str, *names: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Accept options ``names`` positionally for one more release, warning each time.

    Decorates an ``__init__`` whose options became keyword-only in ``version``:
    extra positional arguments are mapped onto ``names`` in order (the old
    positional order) with a :class:`DeprecationWarning` naming the new
    spelling.  ``inspect.signature`` still shows the new, keyword-only shape.
    """

    def decorate(init: Callable[P, R]) -> Callable[P, R]:
        params = list(inspect.signature(init).parameters.values())
        positional = sum(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
        )  # includes self
        owner = init.__qualname__.rsplit(".", 1)[0]

        @functools.wraps(init)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > positional:
                extra = args[positional:]
                if len(extra) > len(names):
                    raise TypeError(
                        f"{owner}() takes at most {positional - 1} positional arguments"
                    )
                for name in names[: len(extra)]:
                    if name in kwargs:
                        raise TypeError(f"{owner}() got multiple values for argument {name!r}")
                spelled = ", ".join(f"{name}=" for name in names[: len(extra)])
                warnings.warn(
                    f"{owner}: passing {spelled} positionally is deprecated since "
                    f"{version}; pass it by keyword ({spelled}...)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs.update(zip(names, extra, strict=False))
                args = args[:positional]
            return init(*args, **kwargs)

        return wrapper

    return decorate


def renamed_since(version: str, **renames: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Accept old keyword names (``old="new"``) for one more release, warning each time."""

    def decorate(init: Callable[P, R]) -> Callable[P, R]:
        owner = init.__qualname__.rsplit(".", 1)[0]

        @functools.wraps(init)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{owner}() got both {old}= and {new}=")
                    warnings.warn(
                        f"{owner}: {old}= is deprecated since {version}; write {new}=",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return init(*args, **kwargs)

        return wrapper

    return decorate
