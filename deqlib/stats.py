"""Statistics over seeds: mean and standard error, paired tests, and a three-valued verdict.

A notebook marks each claim of the paper held / not held / inconclusive from a stated test over
several seeds, never from one run's difference. The tests here are exact or standard and need
nothing beyond the standard library:

- :func:`paired_t`: Student's t on per-seed differences (arms paired by seed: same data order,
  same initialization of what they share), two-sided p-value;
- :func:`sign_test`: the exact two-sided sign test on the same differences (no normality, but
  with 3 seeds its smallest p-value is 0.25: it can only ever say "inconclusive");
- :func:`mcnemar`: the exact two-sided McNemar test on paired correct/incorrect outcomes (two
  classifiers on the same test images), from the discordant counts;
- :func:`verdict`: "held" when the test finds the effect in the claimed direction at level
  ``alpha``, "not held" when it finds the opposite, "inconclusive" otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["mean_se", "t_two_sided_p", "binomial_two_sided_p", "PairedTest", "paired_t", "sign_test",
           "mcnemar", "verdict", "VERDICTS"]

VERDICTS = ("held", "not held", "inconclusive")


def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, standard error of the mean, n)`` over the finite values; the standard error is
    NaN below two values, the mean NaN with none."""
    vals = [float(v) for v in values if math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    if n < 2:
        return mean, math.nan, n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return mean, math.sqrt(var / n), n


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got df={df!r}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (the probability of an
    outcome at most as likely as ``k``)."""
    if n == 0:
        return 1.0
    probs = [math.comb(n, i) / 2.0 ** n for i in range(n + 1)]
    observed = probs[k]
    return min(1.0, sum(p for p in probs if p <= observed * (1 + 1e-12)))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison ``a - b`` over seeds: the mean difference, its standard error, the
    statistic, its p-value (two-sided), the number of pairs and the test's name."""

    diff: float
    se: float
    statistic: float
    p: float
    n: int
    test: str

    def describe(self) -> str:
        return f"{self.test}, n={self.n}: difference {self.diff:+.3g} ± {self.se:.2g}, p={self.p:.2g}"


def _pairs(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b):
        raise ValueError(f"paired samples need the same length, got {len(a)} and {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b) if math.isfinite(float(x)) and math.isfinite(float(y))]


def paired_t(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Student's paired t-test of ``a - b`` (pairs with a non-finite member are left out)."""
    d = _pairs(a, b)
    mean, se, n = mean_se(d)
    if n < 2:
        return PairedTest(mean, se, math.nan, math.nan, n, "paired t")
    if se == 0.0:
        t = math.copysign(math.inf, mean) if mean else 0.0
        p = 0.0 if mean else 1.0
    else:
        t = mean / se
        p = t_two_sided_p(t, n - 1)
    return PairedTest(mean, se, t, p, n, "paired t")


def sign_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Exact two-sided sign test of ``a - b`` (ties left out)."""
    d = [x for x in _pairs(a, b) if x != 0.0]
    mean, se, _ = mean_se(d)
    pos = sum(x > 0 for x in d)
    return PairedTest(mean, se, float(pos), binomial_two_sided_p(pos, len(d)), len(d), "sign test")


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> PairedTest:
    """Exact two-sided McNemar test of two classifiers on the same examples.

    ``statistic`` is the number of examples only ``a`` got right minus those only ``b`` got
    right; ``diff`` the difference in accuracy; ``n`` the number of discordant examples.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"McNemar needs outcomes on the same examples, got {len(correct_a)} and {len(correct_b)}")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(correct_a, correct_b))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(correct_a, correct_b))
    total = max(len(correct_a), 1)
    return PairedTest((only_a - only_b) / total, math.nan, float(only_a - only_b),
                      binomial_two_sided_p(only_a, only_a + only_b), only_a + only_b, "exact McNemar")


def verdict(effect: float, p: float, claimed: str, alpha: float = 0.05) -> str:
    """Three-valued verdict on a directional claim from a test of ``effect`` (a - b).

    ``claimed`` is ``"greater"`` (the claim says a > b) or ``"less"``. "held" when ``p < alpha``
    and the effect has the claimed sign, "not held" when ``p < alpha`` and it has the other sign,
    "inconclusive" otherwise (including a NaN p-value: too few seeds to test).
    """
    if claimed not in ("greater", "less"):
        raise ValueError(f"claimed must be 'greater' or 'less', got claimed={claimed!r}")
    if not (math.isfinite(p) and p < alpha) or effect == 0 or math.isnan(effect):
        return "inconclusive"
    agrees = effect > 0 if claimed == "greater" else effect < 0
    return "held" if agrees else "not held"
