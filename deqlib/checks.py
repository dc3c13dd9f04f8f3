"""Argument checks shared by every config class and by the public functions' arguments.

One style for every key: a bad value raises ValueError reading
``<key> must be <what>, got <key>=<value!r>``, so a message names the key however deep it sits
(:func:`deqlib.config.build` adds the section's path in front).

Types are checked before comparisons: ``2.0``, ``True`` or ``"0.5"`` would otherwise pass a
comparison (or fail it with a TypeError naming no key) and break something later, inside a
solve or a run. Numbers must be finite unless the caller says infinity means something
(``finite=False``); NaN is never accepted, since it compares False with every bound.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping

__all__ = ["check_int", "check_real", "check_choice", "check_bool", "check_str", "check_mapping",
           "check_int_list", "check_real_list", "check_choice_list", "is_int", "is_real"]


def _fail(name: str, what: str, value: object) -> None:
    raise ValueError(f"{name} must be {what}, got {name}={value!r}")


def is_int(value: object) -> bool:
    """An integer (Python's or NumPy's), not a bool and not a float that happens to be whole."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number, not a bool (nor a string that looks like one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _range_text(minimum: object, maximum: object, min_open: bool = False, max_open: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if min_open else '['}{minimum}, {maximum}{')' if max_open else ']'}"
    if minimum is not None:
        return f" {'>' if min_open else '>='} {minimum}"
    if maximum is not None:
        return f" {'<' if max_open else '<='} {maximum}"
    return ""


def _int_ok(value: object, minimum: int | None, maximum: int | None) -> bool:
    return is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


def _real_ok(value: object, minimum: float | None, maximum: float | None, min_open: bool, max_open: bool,
             finite: bool) -> bool:
    if not is_real(value):
        return False
    try:
        v = float(value)
    except OverflowError:  # an int past float's range: not a usable number
        return False
    if math.isnan(v) or (finite and math.isinf(v)):
        return False
    if minimum is not None and (v <= minimum if min_open else v < minimum):
        return False
    return maximum is None or (v < maximum if max_open else v <= maximum)


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None, *,
              optional: bool = False) -> None:
    """An integer in ``[minimum, maximum]`` (either bound may be None); ``None`` too if ``optional``."""
    if optional and value is None:
        return
    if not _int_ok(value, minimum, maximum):
        _fail(name, "an integer" + _range_text(minimum, maximum) + (" or null" if optional else ""), value)


def check_real(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
               min_open: bool = False, max_open: bool = False, finite: bool = True,
               optional: bool = False) -> None:
    """A real number (an int counts) between the bounds, open or closed; finite unless
    ``finite=False`` (for a key where infinity has a meaning); ``None`` too if ``optional``."""
    if optional and value is None:
        return
    if not _real_ok(value, minimum, maximum, min_open, max_open, finite):
        what = ("a finite number" if finite else "a number") + _range_text(minimum, maximum, min_open, max_open)
        _fail(name, what + (" or null" if optional else ""), value)


def check_choice(name: str, value: object, choices: Collection) -> None:
    """One of ``choices`` (an unhashable value is refused too, not a TypeError)."""
    try:
        ok = isinstance(value, str | int | float | type(None)) and value in choices
    except TypeError:
        ok = False
    if not ok:
        _fail(name, f"one of {sorted(choices)}", value)


def check_bool(name: str, value: object) -> None:
    """``True`` or ``False``: ``"no"`` is a (truthy) string in YAML 1.2, and ``0`` is no switch."""
    if not isinstance(value, bool):
        _fail(name, "true or false", value)


def check_str(name: str, value: object, *, nonempty: bool = False) -> None:
    """A string (a non-empty one if ``nonempty``)."""
    if not isinstance(value, str) or (nonempty and not value):
        _fail(name, "a non-empty string" if nonempty else "a string", value)


def check_mapping(name: str, value: object) -> None:
    """A mapping (a YAML section of names to values)."""
    if not isinstance(value, Mapping):
        _fail(name, "a mapping of names to values", value)


def _is_list(value: object) -> bool:
    # A string is a sequence of characters, not a list of values.
    return isinstance(value, list | tuple)


def check_int_list(name: str, value: object, minimum: int | None = None, maximum: int | None = None, *,
                   nonempty: bool = True, increasing: bool = False, nondecreasing: bool = False,
                   length: int | None = None) -> None:
    """A list (or tuple) of integers in ``[minimum, maximum]``, non-empty unless told, of
    ``length`` items if given, strictly ``increasing`` or ``nondecreasing`` if asked."""
    ok = (_is_list(value) and all(_int_ok(v, minimum, maximum) for v in value)
          and (length is None or len(value) == length) and not (nonempty and not value))
    if ok and (increasing or nondecreasing):
        pairs = list(zip(value, value[1:]))
        ok = all(a < b for a, b in pairs) if increasing else all(a <= b for a, b in pairs)
    if not ok:
        order = "increasing " if increasing else "non-decreasing " if nondecreasing else ""
        size = f"{length} " if length is not None else ""
        head = "a non-empty " if nonempty and length is None else "a "
        _fail(name, f"{head}{order}list of {size}integers{_range_text(minimum, maximum)}", value)


def check_real_list(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                    nonempty: bool = True) -> None:
    """A list (or tuple) of finite real numbers in ``[minimum, maximum]``, non-empty unless told."""
    ok = (_is_list(value) and not (nonempty and not value)
          and all(_real_ok(v, minimum, maximum, False, False, True) for v in value))
    if not ok:
        head = "a non-empty " if nonempty else "a "
        _fail(name, f"{head}list of finite numbers{_range_text(minimum, maximum)}", value)


def check_choice_list(name: str, value: object, choices: Collection, *, nonempty: bool = True,
                      distinct: bool = False) -> None:
    """A list (or tuple) of names from ``choices``, non-empty unless told, each once if ``distinct``."""
    ok = _is_list(value) and not (nonempty and not value)
    if ok:
        try:
            ok = all(isinstance(v, str) and v in choices for v in value)
        except TypeError:
            ok = False
    if ok and distinct:
        ok = len(set(value)) == len(value)
    if not ok:
        head = "a non-empty " if nonempty else "a "
        _fail(name, f"{head}list of {'distinct ' if distinct else ''}names from {sorted(choices)}", value)
