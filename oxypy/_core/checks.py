"""Construction-time checks shared by the blocks: one wording for one mistake."""

from __future__ import annotations

import math

from ..exceptions import ConfigurationError

__all__ = ["finite_number"]


def finite_number(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float when it is a finite number ``>= 0`` (``> 0`` with
    ``positive``); otherwise :class:`ConfigurationError` naming the option.

    ``True``/``False`` are refused although they are ints: a flag passed where
    a number belongs is a mistake, not 1 or 0.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)
