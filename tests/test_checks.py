"""deqlib.checks: every config class's checks. A bad value is refused by type before any
comparison, and the message reads ``<key> must be ..., got <key>=<value!r>``."""

import math
import re

import numpy as np
import pytest

from deqlib.checks import (check_bool, check_choice, check_choice_list, check_int, check_int_list, check_mapping,
                           check_real, check_real_list, check_str)


def _refused(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("value", [2.0, True, "3", None, math.nan, math.inf, [3], 0, 11])
def test_check_int_refuses_anything_but_an_integer_in_range(value):
    message = _refused(check_int, "k", value, 1, 10)
    assert message == f"k must be an integer in [1, 10], got k={value!r}"


def test_check_int_accepts_integers_of_any_kind_and_null_when_optional():
    for value in (1, 10, np.int64(5)):
        check_int("k", value, 1, 10)
    check_int("k", None, 1, optional=True)
    assert _refused(check_int, "k", -1, 0, optional=True) == "k must be an integer >= 0 or null, got k=-1"
    assert _refused(check_int, "k", 5, maximum=4) == "k must be an integer <= 4, got k=5"


@pytest.mark.parametrize("value", ["0.5", True, None, math.nan, math.inf, -math.inf, 10**400, [0.5]])
def test_check_real_refuses_strings_bools_and_non_finite_numbers(value):
    assert _refused(check_real, "lr", value, minimum=0, min_open=True) == \
        f"lr must be a finite number > 0, got lr={value!r}"


def test_check_real_ranges_and_where_infinity_is_allowed():
    for value in (1, 0.5, np.float32(0.25), 1.0):
        check_real("p", value, minimum=0, maximum=1)
    assert _refused(check_real, "p", 1.5, minimum=0, maximum=1) == "p must be a finite number in [0, 1], got p=1.5"
    assert _refused(check_real, "b", 0.0, minimum=0, maximum=1, min_open=True) == \
        "b must be a finite number in (0, 1], got b=0.0"
    assert _refused(check_real, "d", 1.0, minimum=0, maximum=1, max_open=True) == \
        "d must be a finite number in [0, 1), got d=1.0"
    check_real("f", math.inf, minimum=1, min_open=True, finite=False)
    # NaN compares False with everything: it must not slip past a range where inf may.
    assert _refused(check_real, "f", math.nan, minimum=1, min_open=True, finite=False) == \
        "f must be a number > 1, got f=nan"
    check_real("g", None, minimum=0, optional=True)
    assert _refused(check_real, "g", "x", optional=True) == "g must be a finite number or null, got g='x'"


def test_choices_switches_strings_and_mappings():
    check_choice("method", "anderson", ("anderson", "broyden"))
    assert _refused(check_choice, "method", "newton", ("anderson", "broyden")) == \
        "method must be one of ['anderson', 'broyden'], got method='newton'"
    # an unhashable value is refused by name, not with a TypeError
    assert "got method=['anderson']" in _refused(check_choice, "method", ["anderson"], {"anderson": 1})
    check_bool("download", False)
    assert _refused(check_bool, "download", "no") == "download must be true or false, got download='no'"
    assert _refused(check_bool, "download", 0) == "download must be true or false, got download=0"
    check_str("root", "")
    assert _refused(check_str, "root", 3) == "root must be a string, got root=3"
    assert _refused(check_str, "file", "", nonempty=True) == "file must be a non-empty string, got file=''"
    check_mapping("options", {"m": 3})
    assert _refused(check_mapping, "options", [("m", 3)]) == \
        "options must be a mapping of names to values, got options=[('m', 3)]"


def test_lists():
    check_int_list("nfe", (1, 2, 3), 1)
    check_int_list("nfe", [1], 1)
    for value in ((), (1, 2.0), (0,), "12", None, (True,)):
        assert _refused(check_int_list, "nfe", value, 1) == \
            f"nfe must be a non-empty list of integers >= 1, got nfe={value!r}"
    assert _refused(check_int_list, "cutoffs", (20, 10), 1, increasing=True) == \
        "cutoffs must be a non-empty increasing list of integers >= 1, got cutoffs=(20, 10)"
    assert _refused(check_int_list, "r", (1, 2, 3), 1, length=2, nondecreasing=True) == \
        "r must be a non-decreasing list of 2 integers >= 1, got r=(1, 2, 3)"
    check_real_list("gammas", (0.0, 1, 2.5), minimum=0)
    for value in ((), (-1.0,), (math.inf,), ("1",)):
        assert _refused(check_real_list, "gammas", value, minimum=0) == \
            f"gammas must be a non-empty list of finite numbers >= 0, got gammas={value!r}"
    check_choice_list("arms", ("a", "b"), ("a", "b", "c"), distinct=True)
    for value in (("a", "a"), ("a", "d"), (), "ab"):
        message = _refused(check_choice_list, "arms", value, ("a", "b", "c"), distinct=True)
        assert message == f"arms must be a non-empty list of distinct names from ['a', 'b', 'c'], got arms={value!r}"


def test_every_message_names_the_key_twice():
    """``<key> must be ..., got <key>=<value!r>``: the form every config class's errors share."""
    for fn, args in [(check_int, ("x", "a", 0)), (check_real, ("x", "a")), (check_choice, ("x", "a", ("b",))),
                     (check_bool, ("x", "a")), (check_str, ("x", 1)), (check_int_list, ("x", "a", 1)),
                     (check_real_list, ("x", "a")), (check_choice_list, ("x", "a", ("b",))),
                     (check_mapping, ("x", "a"))]:
        message = _refused(fn, *args)
        assert re.fullmatch(r"x must be .+, got x=.+", message), message
