"""Statistics over seeds against exact or tabulated values."""

import math

import pytest

from deqlib.stats import (binomial_two_sided_p, mcnemar, mean_se, paired_t, sign_test, t_two_sided_p,
                          verdict)


@pytest.mark.parametrize("t, df, p", [(12.706, 1, 0.05), (4.303, 2, 0.05), (2.776, 4, 0.05),
                                      (2.228, 10, 0.05), (9.925, 2, 0.01), (1.0, 1, 0.5), (0.0, 5, 1.0)])
def test_t_p_values_match_the_tables(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)
    assert t_two_sided_p(-t, df) == pytest.approx(p, abs=2e-4)


def test_t_with_many_degrees_of_freedom_is_normal():
    assert t_two_sided_p(1.959964, 1e7) == pytest.approx(0.05, abs=1e-5)


def test_mean_and_standard_error():
    mean, se, n = mean_se([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3) and se == pytest.approx(1.0 / math.sqrt(3))
    assert math.isnan(mean_se([5.0])[1]) and math.isnan(mean_se([])[0])


def test_paired_t_on_a_known_example():
    # differences 1, 2, 3: mean 2, se 1/sqrt(3), t = 2 sqrt(3) = 3.464 on 2 df: p = 0.0742
    res = paired_t([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert res.diff == 2.0 and res.statistic == pytest.approx(2 * math.sqrt(3))
    assert res.p == pytest.approx(0.0742, abs=2e-4) and res.n == 3


def test_paired_t_with_identical_differences_is_decisive():
    assert paired_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]).p == 0.0
    assert paired_t([1.0, 2.0], [1.0, 2.0]).p == 1.0


def test_binomial_and_sign_test():
    assert binomial_two_sided_p(0, 3) == pytest.approx(0.25)
    assert binomial_two_sided_p(0, 10) == pytest.approx(2 / 1024)
    assert binomial_two_sided_p(5, 10) == pytest.approx(1.0)
    assert sign_test([3, 4, 5], [1, 1, 1]).p == pytest.approx(0.25)  # three seeds can never decide


def test_mcnemar_counts_only_discordant_pairs():
    a = [True] * 10 + [True] * 9 + [False] * 1
    b = [True] * 10 + [False] * 9 + [True] * 1
    res = mcnemar(a, b)
    assert res.n == 10 and res.statistic == 8 and res.p == pytest.approx(22 / 1024)
    with pytest.raises(ValueError, match="same examples"):
        mcnemar([True], [True, False])


def test_verdicts_are_three_valued():
    assert verdict(+1.0, 0.01, "greater") == "held"
    assert verdict(-1.0, 0.01, "greater") == "not held"
    assert verdict(+1.0, 0.2, "greater") == "inconclusive"
    assert verdict(-1.0, 0.01, "less") == "held"
    assert verdict(1.0, float("nan"), "less") == "inconclusive"
    with pytest.raises(ValueError, match="claimed"):
        verdict(1.0, 0.01, "bigger")
