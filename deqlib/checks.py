"""Argument checks shared by the config classes: a bad value raises ValueError naming it.

Types are checked before comparisons: ``2.0``, ``True`` or ``"0.5"`` would otherwise pass a
comparison (or fail it with a TypeError) and break something later, inside a solve or a run.
"""

from __future__ import annotations

import numbers

__all__ = ["check_int", "is_real"]


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")


def is_real(value: object) -> bool:
    """A real number, not a bool (nor a string that looks like one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
