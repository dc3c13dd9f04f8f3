"""The claims of Tables 2 and 3 and Figure 1 on an image classifier, each judged held / not
held / inconclusive by a named test over the seeds, and the ratios that compare an arm with the
unregularized MDEQ where absolute numbers cannot be compared with the paper's."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...report.claims import Claim, Verdict, fmt_mean_se, judge, judge_threshold
from ...stats import mcnemar, mean_se, paired_t
from ..core import ArmResult, by_arm, compare
from .config import JR_ARM, MDEQ_ARM

__all__ = ["CLAIMS", "judge_claims", "ratio", "spearman", "metric_values", "monitor_series"]

CLAIMS = {
    "nfe": Claim("JR reaches the equilibrium in fewer NFE (the solver's calls to a relative residual of 1e-3)",
                 "Table 2: 6 NFE against 17", "less"),
    "nfe_plain": Claim("JR reaches the equilibrium in fewer NFE of plain fixed-point iteration (its count "
                       "follows the contraction factor of f)", "Table 2; Section 3.1", "less"),
    "hard_stop": Claim("hard-stopping the unregularized MDEQ at few NFE costs accuracy (against it solved to 1e-3)",
                       "Table 2: 93.6% solved, 89.1% at 6 NFE", "greater"),
    "jr_at_k": Claim("at few NFE the JR model is more accurate than the unregularized MDEQ stopped there",
                     "Table 2: 93.1% against 89.1% at 6 NFE", "greater"),
    "flat": Claim("JR keeps its accuracy at few NFE: hard-stopping costs it less than it costs the "
                  "unregularized MDEQ", "Table 3's flat rows against Table 2's hard-stopped MDEQ", "greater"),
    "close": Claim("JR at few NFE is close to the unregularized MDEQ solved to 1e-3", "Table 2: 93.1% against 93.6%",
                   "greater"),
    "res_fwd": Claim("JR keeps a lower forward relative residual over training", "Figure 1a", "less"),
    "res_bwd": Claim("JR keeps a lower backward relative residual over training", "Figure 1a", "less"),
    "jac_rises": Claim("without JR, ||J_f||_F grows over training", "Figure 1b; Section 3.1", "greater"),
    "together": Claim("without JR, ||J_f||_F and the residual the training threshold leaves rise together",
                      "Figure 1b", "greater"),
    "jac": Claim("JR lowers ||J_f(z*)||_F", "Section 4; Figure 1b", "less"),
    "radius": Claim("JR lowers the spectral radius of J_f(z*)", "Section 4 (rho(J) <= ||J||_F); Figure 7", "less"),
}


def metric_values(results: Sequence[ArmResult], arm: str, metric: str) -> list[float]:
    """``metric`` of ``arm`` per seed, in seed order."""
    return [r.metrics.get(metric, math.nan) for r in by_arm(results).get(arm, [])]


def monitor_series(result: ArmResult, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a monitored key over training (the records that hold it)."""
    return [(int(r["step"]) + 1, float(r[key])) for r in result.records if key in r]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long series (ties get their mean rank); NaN
    below three pairs or when a series is constant."""
    if len(a) != len(b) or len(a) < 3:
        return math.nan

    def ranks(v: Sequence[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        return (t[:, None] > t[None, :]).sum(1).double() + ((t[:, None] == t[None, :]).sum(1).double() + 1) / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def ratio(results: Sequence[ArmResult], metric: str, a: str, b: str = MDEQ_ARM) -> tuple[float, float, int]:
    """``a / b`` of ``metric`` per seed (the seeds both ran), as ``(mean, standard error, n)``."""
    ra = {r.seed: r.metrics.get(metric, math.nan) for r in results if r.arm == a}
    rb = {r.seed: r.metrics.get(metric, math.nan) for r in results if r.arm == b}
    return mean_se([ra[s] / rb[s] if rb[s] else math.nan for s in sorted(set(ra) & set(rb))])


def _points(values: Sequence[float]) -> list[float]:
    return [100 * v for v in values]


def judge_claims(results: Sequence[ArmResult], exp: Any, alpha: float = 0.05,
                 claims: Mapping[str, Claim] = CLAIMS) -> dict[str, Verdict]:
    """Each claim of ``claims`` (keyed as :data:`CLAIMS`, whose sources are CIFAR-10's; another
    data set passes its own) on ``results`` (every arm for the same seeds): ``MDEQ + JR``
    against ``MDEQ``, at ``eval.compare_nfe`` where a claim speaks of few NFE.

    Tests: paired t over seeds on per-seed means (NFE, residuals, ``||J||_F``, spectral radius,
    the accuracy each arm loses when stopped); exact McNemar on the same test images, pooled
    over seeds, for accuracy; one-sample t for ``close`` (JR at ``k`` minus the MDEQ solved,
    against ``-eval.margin_points``) and ``together`` (per-seed rank correlation over the
    monitored steps, against 0); ``jac_rises``: the MDEQ's ``||J||_F`` at the end against the
    first monitored step.
    """
    k, ev = exp.eval.compare_nfe, exp.eval
    acc_k = f"acc_nfe_{k}"
    v = lambda arm, m: metric_values(results, arm, m)  # noqa: E731
    out: dict[str, Verdict] = {}

    def paired(key: str, metric: str, what: str, scale: float = 1.0) -> None:
        ev_text = (f"{what}: MDEQ + JR {fmt_mean_se([scale * x for x in v(JR_ARM, metric)])}, "
                   f"MDEQ {fmt_mean_se([scale * x for x in v(MDEQ_ARM, metric)])}")
        out[key] = judge(claims[key], compare(results, metric, JR_ARM, MDEQ_ARM), ev_text, alpha)

    paired("nfe", "nfe_to_tol_capped_mean", f"mean {ev.method} calls to {ev.tol:g} (images not there by "
                                            f"{ev.nfe_cap} counted at {ev.nfe_cap})")
    paired("nfe_plain", "plain_nfe_capped_mean", f"mean plain-iteration calls to {ev.tol:g} (images not there by "
                                                 f"{ev.plain_cap} counted at {ev.plain_cap})")
    mdeq = by_arm(results)[MDEQ_ARM]
    test = mcnemar(torch.cat([r.outcomes["correct"] for r in mdeq]).tolist(),
                   torch.cat([r.outcomes[f"correct_nfe_{k}"] for r in mdeq]).tolist())
    out["hard_stop"] = judge(claims["hard_stop"], test,
                             f"MDEQ accuracy (%) solved to {ev.tol:g} {fmt_mean_se(_points(v(MDEQ_ARM, 'acc')))}, "
                             f"at {k} NFE {fmt_mean_se(_points(v(MDEQ_ARM, acc_k)))}", alpha)
    out["jr_at_k"] = judge(claims["jr_at_k"], compare(results, f"correct_nfe_{k}", JR_ARM, MDEQ_ARM),
                           f"accuracy (%) at {k} NFE: MDEQ + JR {fmt_mean_se(_points(v(JR_ARM, acc_k)))}, "
                           f"MDEQ {fmt_mean_se(_points(v(MDEQ_ARM, acc_k)))}", alpha)
    drops = {arm: [100 * (a - b) for a, b in zip(v(arm, "acc"), v(arm, acc_k))] for arm in (MDEQ_ARM, JR_ARM)}
    out["flat"] = judge(claims["flat"], paired_t(drops[MDEQ_ARM], drops[JR_ARM]),
                        f"points lost at {k} NFE against solved to {ev.tol:g}: MDEQ {fmt_mean_se(drops[MDEQ_ARM])}, "
                        f"MDEQ + JR {fmt_mean_se(drops[JR_ARM])}", alpha)
    gap = [100 * (a - b) for a, b in zip(v(JR_ARM, acc_k), v(MDEQ_ARM, "acc"))]
    out["close"] = judge_threshold(
        claims["close"], gap, -ev.margin_points,
        f"MDEQ + JR at {k} NFE minus MDEQ solved to {ev.tol:g}: {fmt_mean_se(gap)} points; held if above "
        f"-{ev.margin_points:g} (the margin)", alpha)
    paired("res_fwd", "train_fwd_rel_res", "mean forward relative residual over the training steps")
    paired("res_bwd", "train_bwd_rel_res", "mean backward relative residual over the training steps")
    first = [monitor_series(r, "mon_jac_fro")[0][1] if monitor_series(r, "mon_jac_fro") else math.nan for r in mdeq]
    end = v(MDEQ_ARM, "jac_fro")
    out["jac_rises"] = judge(claims["jac_rises"], paired_t(end, first),
                             f"MDEQ ||J||_F/sqrt(d) at the first monitored step {fmt_mean_se(first)}, at the end "
                             f"{fmt_mean_se(end)}", alpha)
    corr = [spearman([x for _, x in monitor_series(r, "mon_jac_fro")],
                     [x for _, x in monitor_series(r, "mon_res_threshold")]) for r in mdeq]
    out["together"] = judge_threshold(claims["together"], corr, 0.0,
                                      f"rank correlation over the monitored steps per seed {fmt_mean_se(corr)}", alpha)
    paired("jac", "jac_fro", "||J_f(z*)||_F/sqrt(d) on the fixed batch at the end")
    paired("radius", "spectral_radius", "spectral radius on the fixed batch at the end")
    return out
