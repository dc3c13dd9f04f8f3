"""The weight-decay experiment over seeds: curves for Figure 10 (residuals and ``||J||_F`` over
training, one row per arm, seed and window), the (``||J||_F^2``, residual) points of Figure 10b,
and the four claims of supplement B.2 / B.3 judged held / not held / inconclusive per model,
each by a named test over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ...report.claims import Claim, Verdict, fmt_mean_se, judge, judge_threshold
from ..core import ArmResult, by_arm, compare
from .config import WeightDecayExperiment, arm_name

__all__ = ["values", "residual_curves", "monitor_points", "spearman", "residual_jacobian_correlation",
           "judge_claims", "CLAIMS"]

CLAIMS = {
    1: "Unregularized DEQs grow harder to solve over training",
    2: "Weight decay alone adds difficulty to the fixed-point solve",
    3: "Residual and Jacobian norm go together",
    4: "JR keeps the residual flat, but ||J_f||_F still creeps up at a fixed gamma",
}


def values(results: Sequence[ArmResult], arm: str, metric: str) -> list[float]:
    """``metric`` of ``arm``, one value per seed in seed order (NaN where a run lacks it)."""
    return [r.metrics.get(metric, math.nan) for r in by_arm(results).get(arm, [])]


def residual_curves(results: Sequence[ArmResult], window: int) -> list[dict]:
    """Per arm, seed and window of ``window`` training steps: the mean training forward and
    backward relative residual (``fwd_rel_res``, ``bwd_rel_res``, pretraining steps left out),
    and the monitor's ``mon_jac_fro`` and ``mon_fwd_res`` at the window's last step if it ran
    there (NaN elsewhere). ``step`` is the window's last step + 1."""
    rows = []
    for r in results:
        for s in range(0, len(r.records), window):
            part = [x for x in r.records[s:s + window] if not x["pretrain"]]
            if not part:
                continue
            last = r.records[min(s + window, len(r.records)) - 1]
            row = {"arm": r.arm, "seed": r.seed, "step": int(last["step"]) + 1}
            for key in ("fwd_rel_res", "bwd_rel_res"):
                vals = [x[key] for x in part if math.isfinite(x[key])]
                row[key] = sum(vals) / len(vals) if vals else math.nan
            row["mon_jac_fro"] = last.get("mon_jac_fro", math.nan)
            row["mon_fwd_res"] = last.get("mon_fwd_res", math.nan)
            row["gamma"] = last["gamma"]
            rows.append(row)
    return rows


def monitor_points(results: Sequence[ArmResult]) -> list[dict]:
    """Figure 10b's points: one per (arm, seed, monitored step after pretraining), with
    ``jac_fro_sq`` (``||J||_F^2 / d`` on the fixed batch) and ``fwd_res`` (the forward relative
    residual the training threshold leaves there)."""
    return [{"arm": r.arm, "seed": r.seed, "step": int(x["step"]) + 1, "jac_fro_sq": x["mon_jac_fro"] ** 2,
             "fwd_res": x["mon_fwd_res"]}
            for r in results for x in r.records if "mon_jac_fro" in x and not x["pretrain"]]


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of the pairs where both are finite (ties share their mean
    rank); NaN with fewer than 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def residual_jacobian_correlation(results: Sequence[ArmResult], model: str) -> list[float]:
    """Per seed (in order), the Spearman correlation of ``||J||_F^2`` and the forward residual
    over every (arm, monitored step) point of ``model``: Figure 10b's across-models relation."""
    points = [p for p in monitor_points(results) if p["arm"].startswith(model + "/")]
    return [spearman([p["jac_fro_sq"] for p in points if p["seed"] == s],
                     [p["fwd_res"] for p in points if p["seed"] == s])
            for s in sorted({p["seed"] for p in points})]


def _ev(results: Sequence[ArmResult], a: str, metric_a: str, b: str, metric_b: str | None = None) -> str:
    return (f"{a} {fmt_mean_se(values(results, a, metric_a))} vs {b} "
            f"{fmt_mean_se(values(results, b, metric_b or metric_a))}")


def _paired(results: Sequence[ArmResult], a: str, metric_a: str, b: str, metric_b: str):
    from ...stats import paired_t

    ra, rb = {r.seed: r for r in results if r.arm == a}, {r.seed: r for r in results if r.arm == b}
    seeds = sorted(set(ra) & set(rb))
    return paired_t([ra[s].metrics[metric_a] for s in seeds], [rb[s].metrics[metric_b] for s in seeds])


def judge_claims(results: Sequence[ArmResult], exp: WeightDecayExperiment) -> dict[int, list[Verdict]]:
    """The four claims of the issue (:data:`CLAIMS`), per model of the run, each part judged
    by a paired t-test over seeds (or a one-sample t for the correlation); a part whose arms
    did not run is left out. Residuals over training compare the mean over the last quarter of
    the equilibrium steps with the first quarter; arms compare their last quarters."""
    have = {r.arm for r in results}
    out: dict[int, list[Verdict]] = {k: [] for k in CLAIMS}
    for model in exp.models:
        a = lambda name, model=model: arm_name(model, name)  # noqa: E731
        none, jr, ad = a("none"), a("jr"), a("jr_adaptive")
        fig10a = "Figure 10a (CIFAR-10 MDEQ, backward after 14 iterations)" if model == "mdeq" else "Figure 3 / 8"
        if none in have:
            for key, word in (("fwd", "forward"), ("bwd", "backward")):
                c = Claim(f"{model}: without regularization the {word} residual at the threshold rises over training "
                          f"(last quarter above the first)", fig10a + "; Section 3.1", "greater")
                out[1].append(judge(c, _paired(results, none, f"{key}_res_late", none, f"{key}_res_early"),
                                    _ev(results, none, f"{key}_res_late", none, f"{key}_res_early")))
        # Figure 10a is the MDEQ's backward pass; Figure 8 the Transformer's forward one.
        key, word, src = (("bwd", "backward", "supplement B.2, Figure 10a: relative residual > 0.05 and rising")
                          if model == "mdeq" else ("fwd", "forward", "Figure 8: weight decay 1e-6 does not stabilize "
                                                   "forward convergence; supplement B.3"))
        for dose in ("wd_low", "wd_high"):
            if {none, a(dose)} <= have:
                wd = values(results, a(dose), "weight_decay")[0]
                c = Claim(f"{model}: weight decay {wd:g} leaves a larger {word} residual late in training than no "
                          f"regularization", src, "greater")
                out[2].append(judge(c, compare(results, f"{key}_res_late", a(dose), none),
                                    _ev(results, a(dose), f"{key}_res_late", none)))
                c = Claim(f"{model}: with weight decay {wd:g} plain iteration needs more calls to reach the "
                          f"tolerance after training than without regularization (a less contractive f)",
                          "Section 3.1 and supplement B.3: weight decay 'often makes this stability issue worse'",
                          "greater")
                out[2].append(judge(c, compare(results, "plain_nfe", a(dose), none),
                                    _ev(results, a(dose), "plain_nfe", none)))
        rhos = residual_jacobian_correlation(results, model)
        if rhos:
            c = Claim(f"{model}: across arms and checkpoints, a larger ||J_f||_F^2 comes with a larger forward "
                      f"residual (Spearman rank correlation per seed above 0)",
                      "supplement B.3, Figure 10b (DEQ-Transformer)", "greater")
            out[3].append(judge_threshold(c, rhos, 0.0, f"Spearman rho {fmt_mean_se(rhos)}"))
        if {none, jr} <= have:
            c = Claim(f"{model}: with JR the backward residual late in training is lower than without",
                      "supplement B.2, Figure 10a; Figure 3b", "less")
            out[4].append(judge(c, compare(results, "bwd_res_late", jr, none), _ev(results, jr, "bwd_res_late", none)))
        if jr in have:
            c = Claim(f"{model}: at a fixed gamma ||J_f||_F still grows over training (last monitor reading above "
                      f"the first after pretraining)", "supplement B.3, Figure 10c: critical stability", "greater")
            out[4].append(judge(c, _paired(results, jr, "jac_fro_end", jr, "jac_fro_start"),
                                _ev(results, jr, "jac_fro_end", jr, "jac_fro_start")))
        if {none, jr} <= have:
            c = Claim(f"{model}: ||J_f||_F grows more slowly with JR than without",
                      "supplement B.3, Figure 10c", "less")
            out[4].append(judge(c, compare(results, "jac_fro_creep", jr, none),
                                _ev(results, jr, "jac_fro_creep", none)))
        if {jr, ad} <= have:
            c = Claim(f"{model}: an adaptive gamma holds ||J_f||_F better than the fixed one (smaller growth); "
                      f"the question the paper leaves open", "supplement B.3: 'calls for adaptive gamma scheduling'",
                      "less")
            out[4].append(judge(c, compare(results, "jac_fro_creep", ad, jr), _ev(results, ad, "jac_fro_creep", jr)))
    return out
