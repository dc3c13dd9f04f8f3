"""Notebook 05's measurements of one model (an arm): memory against effective depth, Table 5's
rows (the penalty's increment and the solvers' buffers), and step time against NFE.

``run_arm(exp, "transformer" | "mdeq", seed)`` returns an :class:`~deqlib.experiments.core.ArmResult`
whose ``curves`` hold:

- ``"memory"``: one row per method and effective depth (forward NFE of the DEQ, layers of an
  explicit stack), the figures of :func:`.steps.measure_memory` for the layer step (``core_``:
  the layers alone, the paper's "excluding embeddings");
- ``"rows"``: Table 5's rows for the Transformer (the paper's NFE, the JR rows measured on a
  step that draws the penalty), the MDEQ at its Table 4 threshold without and with the
  penalty, and the explicit network; each as a layer step (``core_``) and a whole step
  (``whole_``: embedding and softmax, or stem and head, included), with its solvers' buffers;
- ``"times"``: the wall time of every timed step, round by round (:func:`.steps.time_rounds`).

Memory on the CPU is a deterministic function of the shapes and the calls made, so one
measurement of each is exact; times vary from run to run and come from ``eval.repeats`` rounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...jacobian import JacobianPenalty
from ...report.paper import PAPER
from ..core import ArmResult
from .config import MemoryExperiment
from .steps import MDEQSteps, TransformerSteps, measure_memory, pick_device, solver_buffers, time_rounds

__all__ = ["TABLE_ROWS", "load_data", "make_steps", "memory_sweep", "table_rows", "timed_configs", "step_times",
           "run_arm", "row_nfe"]

MB = 2**20

# Table 5's rows (WikiText-103): (row id, key in PAPER, label, variant, NFE, penalty drawn); NFE
# None is the paper's training NFE (forward and backward alike), or for the MDEQ its Table 4
# threshold. One row is not the paper's: the Post-LN DEQ at JR's 13 NFE without the penalty, so
# that the penalty's own increment (equal NFE) stands beside the paper's comparison (13 against
# 30 NFE). Every model's last row, the explicit network, is added by :func:`table_rows`.
TABLE_ROWS: dict[str, tuple[tuple[str, str, str, str, int | None, bool], ...]] = {
    "transformer": (
        ("post_ln_30", "wikitext.post_ln", "DEQ Post-LN, 30 NFE", "default", None, False),
        ("post_ln_20", "wikitext.post_ln_reduced", "DEQ Post-LN, 20 NFE", "default", None, False),
        ("post_ln_15", "wikitext.post_ln_15nfe", "DEQ Post-LN, 15 NFE (diverged in the paper)", "default", None,
         False),
        ("post_ln_13", "", "DEQ Post-LN, 13 NFE, no penalty (not in the paper)", "default", 13, False),
        ("post_ln_jr_13", "wikitext.post_ln_jr", "DEQ Post-LN + JR, 13 NFE", "default", None, True),
        ("pre_ln_jr_14", "wikitext.pre_ln_jr", "DEQ Pre-LN + JR, 14 NFE", "pre_ln", None, True),
    ),
    "mdeq": (
        ("mdeq", "", "MDEQ", "default", None, False),
        ("mdeq_jr", "", "MDEQ + JR", "default", None, True),
    ),
}


def row_nfe(exp: MemoryExperiment, model: str, key: str, nfe: int | None) -> tuple[int, int]:
    """Forward and backward NFE of a :data:`TABLE_ROWS` row."""
    if nfe is not None:
        return nfe, nfe
    if key:
        k = PAPER[key]["value"]["train_nfe"]
        return k, k
    spec = _spec(exp, model)
    return spec.forward.max_iter, spec.backward.max_iter


def load_data(exp: MemoryExperiment, base: str | Path | None = None) -> None:
    """No data set: every arm draws its own seeded inputs (:class:`.steps.TransformerSteps`,
    :class:`.steps.MDEQSteps`). Here for the one shape of every experiment."""
    return None


def make_steps(exp: MemoryExperiment, model: str, seed: int) -> TransformerSteps | MDEQSteps:
    device = pick_device(exp.device)
    if model == "transformer":
        return TransformerSteps(exp.transformer, seed, device, exp.eval.phantom_steps)
    if model == "mdeq":
        return MDEQSteps(exp.mdeq, seed, device, exp.eval.phantom_steps)
    raise ValueError(f"model must be transformer or mdeq, got model={model!r}")


def _mb(measured: dict, prefix: str) -> dict:
    """A measured step's figures in MB, keys prefixed (``core_`` or ``whole_``)."""
    out = {f"{prefix}peak_live_mb": measured["peak_live_bytes"] / MB, f"{prefix}saved_mb": measured["saved_bytes"] / MB}
    if measured["cuda_peak_bytes"] is not None:
        out[f"{prefix}cuda_peak_mb"] = measured["cuda_peak_bytes"] / MB
    return out


def memory_sweep(exp: MemoryExperiment, model: str, steps: TransformerSteps | MDEQSteps) -> list[dict]:
    """Memory of the layer step against effective depth: the DEQ's ``eval.modes`` at forward
    NFE ``eval.nfe`` (backward at the model's threshold), the explicit stacks at ``eval.depths``."""
    grid = [(m, k) for m in exp.eval.modes for k in exp.eval.nfe] + \
        [(m, k) for m in ("tied", "untied") for k in exp.eval.depths]
    rows = []
    for method, k in grid:
        measured = measure_memory(steps.step(method, k, core=True), steps.device)
        rows.append({"model": model, "method": method, "depth": k, **_mb(measured, "core_"),
                     "fwd_nfe": measured["fwd_nfe"], "bwd_nfe": measured["bwd_nfe"],
                     "layer_param_mb": steps.layer_param_bytes(method, k) / MB})
    return rows


def _spec(exp: MemoryExperiment, model: str):
    return exp.transformer if model == "transformer" else exp.mdeq


def table_rows(exp: MemoryExperiment, model: str, steps: TransformerSteps | MDEQSteps) -> list[dict]:
    """Table 5's rows (the MDEQ's two at its threshold) and the explicit network, each as a
    layer step and a whole step, with its solvers' own buffers; a JR row is a step that draws
    the penalty."""
    spec = _spec(exp, model)
    rows = []
    for row_id, key, label, variant, nfe, jr in TABLE_ROWS[model]:
        k, kb = row_nfe(exp, model, key, nfe)
        penalty = spec.jacobian if jr else None
        core = measure_memory(steps.step("implicit", k, kb, penalty, variant, core=True), steps.device)
        whole = measure_memory(steps.step("implicit", k, kb, penalty, variant), steps.device)
        rows.append({"model": model, "row": row_id, "key": key, "label": label, "variant": variant, "penalty": jr,
                     "fwd_nfe": core["fwd_nfe"], "bwd_nfe": core["bwd_nfe"], **_mb(core, "core_"),
                     **_mb(whole, "whole_"), **solver_buffers(steps, k, kb, penalty, variant)})
    depth = spec.depth
    core = measure_memory(steps.step("untied", depth, core=True), steps.device)
    whole = measure_memory(steps.step("untied", depth), steps.device)
    rows.append({"model": model, "row": "explicit", "key": "wikitext.explicit" if model == "transformer" else "",
                 "label": f"explicit, {depth} untied layers", "variant": f"untied{depth}", "penalty": False,
                 "fwd_nfe": None, "bwd_nfe": None, **_mb(core, "core_"), **_mb(whole, "whole_"),
                 "fwd_solver_bytes": 0, "bwd_solver_bytes": 0, "fwd_solver_states": 0.0, "bwd_solver_states": 0.0})
    return rows


def timed_configs(exp: MemoryExperiment, model: str) -> list[tuple[str, str, int, str, bool]]:
    """What :func:`step_times` times: ``(name, method, k, variant, penalty drawn)``; the DEQ at
    every ``time_nfe`` and Table 5's NFE, without and with the penalty drawn, and the untied
    explicit stacks at ``eval.depths`` and the model's ``depth``."""
    spec = _spec(exp, model)
    nfes = set(spec.time_nfe)
    configs = []
    for _, key, _, variant, nfe, _ in TABLE_ROWS[model]:
        k, _ = row_nfe(exp, model, key, nfe)
        if key and PAPER[key]["value"]["t_train"] is None:
            continue  # no time in the paper (diverged)
        if variant == "default":
            nfes.add(k)
        else:
            configs += [(f"{variant}@{k}", "implicit", k, variant, False),
                        (f"{variant}+jr@{k}", "implicit", k, variant, True)]
    for k in sorted(nfes):
        configs += [(f"deq@{k}", "implicit", k, "default", False), (f"deq+jr@{k}", "implicit", k, "default", True)]
    for d in sorted(set(exp.eval.depths) | {spec.depth}):
        configs.append((f"untied@{d}", "untied", d, f"untied{d}", False))
    return configs


def step_times(exp: MemoryExperiment, model: str, steps: TransformerSteps | MDEQSteps) -> dict[str, list[float]]:
    """Seconds per whole step of every :func:`timed_configs` entry, ``eval.repeats`` rounds. The
    DEQ steps run forward and backward at the same NFE ``k`` (Table 5's rows train so)."""
    spec = _spec(exp, model)
    fns = {}
    for name, method, k, variant, jr in timed_configs(exp, model):
        penalty: JacobianPenalty | None = spec.jacobian if jr else None
        fns[name] = steps.step(method, k, k if method == "implicit" else None, penalty, variant)
    return time_rounds(fns, exp.eval.repeats, steps.device)


def run_arm(exp: MemoryExperiment, arm: str, seed: int, data: Any = None, run_dir: str | Path | None = None,
            progress: bool = True) -> ArmResult:
    """Measure one model (``arm``): no training, so nothing to checkpoint (``run_dir`` unused)."""
    steps = make_steps(exp, arm, seed)
    sweep = memory_sweep(exp, arm, steps)
    rows = table_rows(exp, arm, steps)
    times = step_times(exp, arm, steps)
    metrics = {"state_mb": steps.state_bytes() / MB, "layer_param_mb": steps.layer_param_bytes("implicit", 1) / MB,
               "p": _spec(exp, arm).jacobian.p}
    return ArmResult(arm=arm, seed=seed, metrics=metrics,
                     curves={"memory": sweep, "rows": rows,
                             "times": [{"model": arm, "config": name, "round": r, "seconds": t}
                                       for name, ts in times.items() for r, t in enumerate(ts)]})
