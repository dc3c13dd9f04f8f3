"""What notebook 05's measurements say: flatness and growth with depth, Table 5 as ratios beside
the paper's, the step times, the verdicts on the paper's claims, and the GPU figures committed
in ``outputs/device/``.

Memory verdicts are exact: on the CPU a step's live and saved bytes are a deterministic function
of its shapes and calls, so one measurement decides a criterion (stated with each verdict). Time
verdicts come from a paired t-test over the rounds of :func:`.steps.time_rounds` and change from
run to run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...report.claims import Claim, Verdict, judge
from ...report.paper import PAPER
from ...stats import paired_t
from ..core import ArmResult

__all__ = ["CLAIMS", "by_row", "sweep_table", "flatness", "growth", "per_layer_saved_mb", "table5",
           "penalty_increments", "time_table", "expected_times", "memory_verdicts", "time_verdicts", "device_figures"]

CLAIMS = {
    "flat": Claim("With the implicit backward, training memory does not grow with the effective depth (the "
                  "forward NFE): only one call of f is kept for backward, no iterate",
                  PAPER["deq2019.memory"]["source"], "less"),
    "grows": Claim("Backpropagating through the iterations stores them: the unrolled solve and the explicit "
                   "stacks (tied and untied) grow with depth", PAPER["deq2019.memory"]["source"], "greater"),
    "vs_explicit": Claim("The DEQ (30 NFE) needs about half the training memory of an 18-layer explicit "
                         "Transformer (3.9 vs 9.0 GB)", PAPER["wikitext.post_ln"]["source"], "less"),
    "jr_memory": Claim("JR adds about 25% training memory (3.9 -> 4.8 GB at 13 against 30 NFE), less than one "
                       "layer's activations, because fewer NFE save the solver's memory",
                       PAPER["memory.jr_b1"]["source"], "less"),
    "solver_memory": Claim("Fewer NFE save the solver's memory (13 against 30 NFE)", PAPER["memory.jr_b1"]["source"],
                           "less"),
    "time_deq30": Claim("The DEQ at 30 NFE trains slower than the 18-layer explicit Transformer (3.1x)",
                        PAPER["wikitext.post_ln"]["source"], "greater"),
    "time_jr": Claim("DEQ + JR at 13 NFE (penalty drawn with probability p) trains faster than the DEQ at 30 NFE "
                     "(1.4x against 3.1x)", PAPER["wikitext.post_ln_jr"]["source"], "less"),
    "time_jr_explicit": Claim("DEQ + JR at 13 NFE still trains slower than the explicit Transformer (1.4x)",
                              PAPER["wikitext.post_ln_jr"]["source"], "greater"),
}
EXACT = "exact: one deterministic measurement (CPU live-tensor bytes)"


def _by_model(results: Sequence[ArmResult]) -> dict[str, ArmResult]:
    return {r.arm: r for r in results}


def sweep_table(result: ArmResult, key: str = "core_peak_live_mb") -> dict[str, dict[int, float]]:
    """``{method: {depth: value}}`` of the memory sweep."""
    out: dict[str, dict[int, float]] = {}
    for row in result.curves["memory"]:
        out.setdefault(row["method"], {})[row["depth"]] = row[key]
    return out


def flatness(result: ArmResult, method: str = "implicit") -> dict[str, float]:
    """How far ``method``'s layer-step peak moves over the NFE sweep: ``first``, ``last`` (MB), the
    largest relative change from the first, and whether the saved bytes are identical."""
    peak = sweep_table(result)[method]
    saved = sweep_table(result, "core_saved_mb")[method]
    ks = sorted(peak)
    return {"first_nfe": ks[0], "last_nfe": ks[-1], "first_mb": peak[ks[0]], "last_mb": peak[ks[-1]],
            "max_rel_change": max(abs(peak[k] / peak[ks[0]] - 1) for k in ks),
            "saved_identical": float(len(set(saved.values())) == 1)}


def growth(result: ArmResult, method: str) -> dict[str, float]:
    """``method``'s layer-step peak at the smallest and largest depth and the slope (MB per layer/NFE)."""
    peak = sweep_table(result)[method]
    ks = sorted(peak)
    return {"first": ks[0], "last": ks[-1], "first_mb": peak[ks[0]], "last_mb": peak[ks[-1]],
            "ratio": peak[ks[-1]] / peak[ks[0]], "mb_per_layer": (peak[ks[-1]] - peak[ks[0]]) / (ks[-1] - ks[0])}


def per_layer_saved_mb(result: ArmResult) -> float:
    """One layer's activations: the saved bytes each layer adds to the weight-tied stack (MB)."""
    saved = sweep_table(result, "core_saved_mb")["tied"]
    ks = sorted(saved)
    return (saved[ks[-1]] - saved[ks[0]]) / (ks[-1] - ks[0])


def _rows(result: ArmResult) -> list[dict]:
    return result.curves["rows"]


def by_row(result: ArmResult) -> dict[str, dict]:
    """Table 5's rows of a result by row id (:data:`.run.TABLE_ROWS`, and ``"explicit"``)."""
    return {r["row"]: r for r in _rows(result)}


def table5(result: ArmResult) -> list[dict]:
    """The rows of Table 5 (the MDEQ's: its two arms) as ratios: memory relative to the first
    row (the DEQ at 30 NFE) and to the explicit network, the paper's beside the run's; the
    layer step's peak and saved bytes, the whole step's peak, the solvers' buffers."""
    rows = _rows(result)
    base, explicit = rows[0], rows[-1]
    paper_base = PAPER[base["key"]]["value"]["memory_gb"] if base["key"] else None
    paper_explicit = PAPER[explicit["key"]]["value"]["memory_gb"] if explicit["key"] else None
    out = []
    for r in rows:
        gb = PAPER[r["key"]]["value"].get("memory_gb") if r["key"] else None
        out.append({
            "model": r["label"], "NFE f/b": "-" if r["fwd_nfe"] is None else f"{r['fwd_nfe']} / {r['bwd_nfe']}",
            "penalty drawn": "yes" if r["penalty"] else "no",
            "paper GB": gb if gb is not None else "-",
            "paper / row 1": round(gb / paper_base, 2) if gb and paper_base else "-",
            "paper / explicit": round(gb / paper_explicit, 2) if gb and paper_explicit else "-",
            "layers peak MB": round(r["core_peak_live_mb"], 2),
            "/ row 1": round(r["core_peak_live_mb"] / base["core_peak_live_mb"], 2),
            "/ explicit": round(r["core_peak_live_mb"] / explicit["core_peak_live_mb"], 2),
            "layers saved MB": round(r["core_saved_mb"], 2),
            "saved / row 1": round(r["core_saved_mb"] / base["core_saved_mb"], 2),
            "whole peak MB": round(r["whole_peak_live_mb"], 2),
            "whole / row 1": round(r["whole_peak_live_mb"] / base["whole_peak_live_mb"], 2),
            "solver states f / b": f"{r['fwd_solver_states']:.1f} / {r['bwd_solver_states']:.1f}",
        })
    return out


def penalty_increments(result: ArmResult) -> list[dict]:
    """What drawing the penalty adds to a step, in %: at equal NFE (each penalized row against
    the unpenalized row of the same NFE and variant) and, for the Transformer, in the paper's
    comparison (JR at 13 NFE against the DEQ at 30), with the paper's figure beside it."""
    rows = _rows(result)
    pairs = []
    for r in rows:
        if r["penalty"]:
            same = [x for x in rows
                    if not x["penalty"] and x["fwd_nfe"] == r["fwd_nfe"] and x["variant"] == r["variant"]]
            if same:
                pairs.append((f"{r['label']} against no penalty, same NFE", r, same[0], None))
    ids = by_row(result)
    if "post_ln_jr_13" in ids and "post_ln_30" in ids:
        paper = PAPER["wikitext.post_ln_jr"]["value"]["memory_gb"] / PAPER["wikitext.post_ln"]["value"]["memory_gb"]
        pairs.append(("DEQ Post-LN + JR at 13 NFE against DEQ Post-LN at 30 (the paper's)",
                      ids["post_ln_jr_13"], ids["post_ln_30"], round(100 * (paper - 1))))
    out = []
    for text, a, b, paper in pairs:
        out.append({"comparison": text,
                    "layers peak +%": round(100 * (a["core_peak_live_mb"] / b["core_peak_live_mb"] - 1), 1),
                    "layers saved +%": round(100 * (a["core_saved_mb"] / b["core_saved_mb"] - 1), 1),
                    "whole peak +%": round(100 * (a["whole_peak_live_mb"] / b["whole_peak_live_mb"] - 1), 1),
                    "paper +%": paper if paper is not None else "-"})
    return out


def expected_times(result: ArmResult, p: float | None = None) -> dict[str, list[float]]:
    """Seconds per round of every timed step, and for each NFE ``k`` the expected time of a JR
    step, ``"jr@k"``: ``(1 - p) t(deq@k) + p t(deq+jr@k)`` round by round (a mean over steps
    where a fraction ``p`` draws the penalty, so the penalized steps count)."""
    p = result.metrics["p"] if p is None else p
    times: dict[str, list[float]] = {}
    for row in sorted(result.curves["times"], key=lambda r: (r["config"], r["round"])):
        times.setdefault(row["config"], []).append(row["seconds"])
    for name in list(times):
        if "+jr@" in name:
            plain = name.replace("+jr@", "@")
            times[name.replace("+jr@", "+jr(p)@")] = [(1 - p) * a + p * b for a, b in zip(times[plain], times[name])]
    return times


def time_table(result: ArmResult, depth: int) -> list[dict]:
    """Table 5's t_train beside this run's median step time relative to the untied explicit
    stack of ``depth`` layers (JR rows: the expected time at the penalty's frequency p)."""
    times = expected_times(result)
    ref = statistics.median(times[f"untied@{depth}"])
    out = []
    for r in _rows(result)[:-1]:
        k = r["fwd_nfe"]
        prefix = "deq" if r["variant"] == "default" else r["variant"]
        name = f"{prefix}+jr(p)@{k}" if r["penalty"] else f"{prefix}@{k}"
        if name not in times:
            continue
        paper = PAPER[r["key"]]["value"]["t_train"] if r["key"] else None
        t = statistics.median(times[name])
        out.append({"model": r["label"], "NFE": k, "paper t_train": paper if paper is not None else "-",
                    "median ms / step": round(1e3 * t, 1), "vs explicit": round(t / ref, 2)})
    out.append({"model": f"explicit, {depth} untied layers", "NFE": "-",
                "paper t_train": PAPER["wikitext.explicit"]["value"]["t_train"] if result.arm == "transformer" else "-",
                "median ms / step": round(1e3 * ref, 1), "vs explicit": 1.0})
    return out


def _verdict(claim: Claim, holds: bool, criterion: str, evidence: str) -> Verdict:
    return Verdict(claim, "held" if holds else "not held", f"{EXACT}; criterion: {criterion}", evidence)


def memory_verdicts(results: Sequence[ArmResult], flat_tolerance: float) -> dict[str, Verdict]:
    """The memory claims, judged exactly on each model measured (Table 5's on the Transformer)."""
    out = {}
    for name, r in _by_model(results).items():
        fl = flatness(r)
        un = growth(r, "unrolled")
        out[f"{name}.flat"] = _verdict(
            CLAIMS["flat"], fl["max_rel_change"] <= flat_tolerance and fl["saved_identical"] == 1.0,
            f"the layers' peak within {flat_tolerance:.0%} over the sweep and identical saved bytes",
            f"{name}: the layers' peak {fl['first_mb']:.2f} MB at {fl['first_nfe']} NFE, {fl['last_mb']:.2f} MB at "
            f"{fl['last_nfe']} (largest change {fl['max_rel_change']:.2%}); saved bytes "
            f"{'identical' if fl['saved_identical'] else 'not identical'}; unrolled: {un['first_mb']:.2f} -> "
            f"{un['last_mb']:.2f} MB")
        grown = {m: growth(r, m) for m in ("unrolled", "tied", "untied")}
        out[f"{name}.grows"] = _verdict(
            CLAIMS["grows"], all(g["ratio"] > 1 + flat_tolerance for g in grown.values()),
            f"the layers' peak at the largest depth above (1 + {flat_tolerance:g}) x that at the smallest, for each",
            f"{name}: " + "; ".join(f"{m} {g['first_mb']:.1f} -> {g['last_mb']:.1f} MB ({g['first']} -> {g['last']}, "
                                    f"{g['mb_per_layer']:.2f} MB per layer)" for m, g in grown.items()))
    if "transformer" in _by_model(results):
        out.update(_table5_verdicts(_by_model(results)["transformer"]))
    return out


def _table5_verdicts(r: ArmResult) -> dict[str, Verdict]:
    rows = by_row(r)
    deq30, jr, explicit = rows["post_ln_30"], rows["post_ln_jr_13"], rows["explicit"]
    pv = {k: PAPER[k]["value"]["memory_gb"] for k in ("wikitext.post_ln", "wikitext.post_ln_jr", "wikitext.explicit")}
    ratio = deq30["core_peak_live_mb"] / explicit["core_peak_live_mb"]
    layer = per_layer_saved_mb(r)
    extra = jr["core_peak_live_mb"] - deq30["core_peak_live_mb"]
    solver = {k: rows[k]["fwd_solver_states"] + rows[k]["bwd_solver_states"] for k in ("post_ln_30", "post_ln_jr_13")}
    return {
        "transformer.vs_explicit": _verdict(
            CLAIMS["vs_explicit"], ratio < 1,
            "the layers' peak of the DEQ at 30 NFE below that of the explicit network",
            f"layers' peak {deq30['core_peak_live_mb']:.2f} MB against {explicit['core_peak_live_mb']:.2f} MB for "
            f"{explicit['label']}: ratio {ratio:.2f} (paper {pv['wikitext.post_ln'] / pv['wikitext.explicit']:.2f})"),
        "transformer.jr_memory": _verdict(
            CLAIMS["jr_memory"], extra < layer,
            "the layers' peak of a JR step at 13 NFE minus that of the DEQ at 30 NFE below one layer's saved "
            "activations",
            f"{jr['core_peak_live_mb']:.2f} against {deq30['core_peak_live_mb']:.2f} MB: {extra:+.2f} MB "
            f"({extra / deq30['core_peak_live_mb']:+.0%}; paper "
            f"{pv['wikitext.post_ln_jr'] / pv['wikitext.post_ln'] - 1:+.0%}); one layer's activations {layer:.2f} MB"),
        "transformer.solver_memory": _verdict(
            CLAIMS["solver_memory"], solver["post_ln_jr_13"] < solver["post_ln_30"],
            "the solvers' own buffers (forward + backward) at 13 NFE below those at 30",
            f"{solver['post_ln_jr_13']:.1f} states of z at 13 NFE against {solver['post_ln_30']:.1f} at 30 "
            f"(forward {jr['fwd_solver_states']:.1f} / {deq30['fwd_solver_states']:.1f}, backward "
            f"{jr['bwd_solver_states']:.1f} / {deq30['bwd_solver_states']:.1f})"),
    }


def time_verdicts(results: Sequence[ArmResult], depth: int) -> dict[str, Verdict]:
    """The Transformer's time claims: a paired t-test over the timing rounds (JR: the expected
    step at frequency p). Empty without the Transformer."""
    r = _by_model(results).get("transformer")
    if r is None:
        return {}
    t = expected_times(r)
    deq30, jr13, expl = t["deq@30"], t["deq+jr(p)@13"], t[f"untied@{depth}"]

    def ratio(a: list[float], b: list[float]) -> float:
        return statistics.median(a) / statistics.median(b)

    return {
        "transformer.time_deq30": judge(CLAIMS["time_deq30"], paired_t(deq30, expl),
                                        f"median {1e3 * statistics.median(deq30):.1f} ms against "
                                        f"{1e3 * statistics.median(expl):.1f} ms: {ratio(deq30, expl):.2f}x "
                                        f"(paper 3.1x)"),
        "transformer.time_jr": judge(CLAIMS["time_jr"], paired_t(jr13, deq30),
                                     f"{ratio(jr13, expl):.2f}x against {ratio(deq30, expl):.2f}x the explicit stack "
                                     f"(paper 1.4x against 3.1x)"),
        "transformer.time_jr_explicit": judge(CLAIMS["time_jr_explicit"], paired_t(jr13, expl),
                                              f"{ratio(jr13, expl):.2f}x the explicit stack (paper 1.4x)"),
    }


def device_figures(folder: str | Path) -> dict[str, Any]:
    """The GPU figures committed in ``folder`` (``outputs/device``): the Transformer's and the
    MDEQ's step benchmarks at paper size, each with its device, as table rows (and for the
    Transformer one state of z in MB and the penalty's graph, the saved bytes it adds, in
    states); a missing file is left out."""
    folder = Path(folder)
    out: dict[str, Any] = {}
    path = folder / "transformer_paper.json"
    if path.exists():
        rep = json.loads(path.read_text())
        rows = {r["model"]: r for r in rep["rows"]}
        deq = rows["deq"]
        state_mb = rep["batch"] * rep["tgt_len"] * rep["d_model"] * 4 / 2**20  # one float32 state of z
        out["transformer"] = {"device": rep["device"], "torch": rep["torch"], "batch": rep["batch"],
                              "state_mb": state_mb,
                              "penalty_graph_states": (rows["deq+jr"]["core_saved_bytes"] - deq["core_saved_bytes"])
                              / 2**20 / state_mb,
                              "solvers": f"{rep['forward']} / {rep['backward']}", "rows": [
            {"model": {"deq": "DEQ", "deq+jr": "DEQ + JR (penalty on the step)",
                       "explicit": f"explicit, {r['layers']} tied layers"}[name],
             "NFE f/b": "-" if r["fwd_nfe"] is None else f"{r['fwd_nfe']} / {r['bwd_nfe']}",
             "CUDA peak MB": round(r["cuda_peak_bytes"] / 2**20),
             "/ DEQ": round(r["cuda_peak_bytes"] / deq["cuda_peak_bytes"], 2),
             "core saved MB": round(r["core_saved_bytes"] / 2**20), "step s": round(r["step_s"], 3),
             "time vs explicit": round(r["time_vs_explicit"], 2)}
            for name, r in rows.items()]}
    mdeq = []
    for name in ("mdeq_paper.json", "mdeq_paper_bf16.json"):
        path = folder / name
        if path.exists():
            rep = json.loads(path.read_text())
            base = rep["rows"][0]
            for r in rep["rows"]:
                mdeq.append({"device": rep["device"], "precision": rep["precision"], "batch": rep["batch"],
                             "model": r["arm"], "NFE f/b": f"{r['fwd_nfe']} / {r['bwd_nfe']}",
                             "CUDA peak MB (fwd+bwd)": round(r["peak_fwd_bwd_mb"]),
                             "/ MDEQ": round(r["peak_fwd_bwd_mb"] / base["peak_fwd_bwd_mb"], 2),
                             "step s": round(r["step_time_s"], 3),
                             "time / MDEQ": round(r["step_time_s"] / base["step_time_s"], 2),
                             "counted": rep.get("memory", "")})
    if mdeq:
        out["mdeq"] = mdeq
    return out
