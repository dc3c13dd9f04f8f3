"""The paper's claims checked against a run: held / not held / inconclusive, each by a named test.

A notebook states each claim once (:class:`Claim`: what the paper says, where, and which way an
effect must go), measures it over seeds (a :class:`deqlib.stats.PairedTest`), and renders the
verdicts with the numbers that decided them (:func:`claims_markdown`), so that the prose a
reader sees is made from the run that made the numbers: a paper-profile run never quotes the
small one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..stats import PairedTest, mean_se, verdict

__all__ = ["Claim", "Verdict", "judge", "judge_threshold", "claims_markdown", "claims_table", "fmt_mean_se"]


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: its text, where it is made, and the direction of the effect
    ``a - b`` that it predicts (``"greater"`` or ``"less"``)."""

    text: str
    source: str
    direction: str


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict in a run: ``held``, ``not held`` or ``inconclusive``, the test that
    decided it (name, n, p) and the numbers beside it."""

    claim: Claim
    verdict: str
    test: str
    evidence: str

    def as_dict(self) -> dict[str, str]:
        return {"claim": self.claim.text, "source": self.claim.source, "verdict": self.verdict,
                "test": self.test, "evidence": self.evidence}


def fmt_mean_se(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± se (n=k)"`` at ``digits`` significant digits; ``"n/a"`` with no finite value."""
    mean, se, n = mean_se(values)
    if n == 0:
        return "n/a"
    if not math.isfinite(se):
        return f"{mean:.{digits}g} (n={n})"
    return f"{mean:.{digits}g} ± {se:.2g} (n={n})"


def judge(claim: Claim, test: PairedTest, evidence: str, alpha: float = 0.05) -> Verdict:
    """The verdict on ``claim`` from ``test`` of ``a - b``: held when the test finds the claimed
    direction at level ``alpha``, not held when it finds the opposite, else inconclusive."""
    v = verdict(test.diff if test.test != "exact McNemar" else test.statistic, test.p, claim.direction, alpha)
    return Verdict(claim, v, f"{test.describe()} (alpha {alpha:g})", evidence)


def judge_threshold(claim: Claim, values: Sequence[float], threshold: float, evidence: str,
                    alpha: float = 0.05) -> Verdict:
    """The verdict on a claim that a quantity lies above (``"greater"``) or below (``"less"``) a
    fixed ``threshold``, from a one-sample t-test of ``values - threshold`` over seeds."""
    from ..stats import paired_t

    test = paired_t(list(values), [threshold] * len(values))
    v = verdict(test.diff, test.p, claim.direction, alpha)
    return Verdict(claim, v, f"one-sample t against {threshold:g}, n={test.n}: p={test.p:.2g} (alpha {alpha:g})",
                   evidence)


def claims_table(verdicts: Sequence[Verdict]) -> list[dict[str, str]]:
    """One row per claim, for a DataFrame or metrics.json."""
    return [v.as_dict() for v in verdicts]


def claims_markdown(verdicts: Sequence[Verdict], title: str = "What held in this run") -> str:
    """The verdicts as a Markdown section: a counted summary, then one line per claim with its
    verdict, the numbers and the test that decided it."""
    counts = {k: sum(v.verdict == k for v in verdicts) for k in ("held", "not held", "inconclusive")}
    lines = [f"### {title}", "",
             f"{counts['held']} held, {counts['not held']} not held, {counts['inconclusive']} inconclusive "
             f"(of {len(verdicts)} claims).", ""]
    for v in verdicts:
        lines.append(f"- **{v.verdict}**: {v.claim.text} ({v.claim.source}). {v.evidence}. *Test:* {v.test}.")
    return "\n".join(lines) + "\n"
