"""Notebook 07's headline experiment: the solvers on DEQ-Transformer maps trained without and
with the Jacobian penalty.

The arms are notebook 02's (:mod:`deqlib.experiments.wikitext`: Post-LN without JR and with it,
their thresholds and penalty), trained for ``trained.train.max_steps`` steps on the WikiText-2
slice; the seed is the training seed, so the two arms of one seed share their initialization and
data order and pair. Per trained map, on the fixed evaluation batch (the second segment of the
evaluation stream after the first's memory):

- the mechanism: ``||J_f(z*)||_F / sqrt(d)`` and the spectral radius at the equilibrium
  (:func:`deqlib.experiments.core.jacobian_at_equilibrium`), and the same over training (the
  training loop's monitor);
- per method (plain iteration, Anderson, Broyden; deqlib's defaults): the calls of ``f`` to the
  forward tolerance (batch and per sample) and the time of that solve in calls of ``f``
  (:func:`solve_cost`);
- the parameter gradient's error when the implicit backward is solved to each of
  ``backward_tols`` (Table 4's 1e-4 and the released code's 1e-3), against a float64 reference
  solved to ``reference_tol`` (:func:`backward_gradient_error`), linearized at the reference
  equilibrium (the backward tolerance alone) and at the method's own forward answer (what a
  training step gets).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...data.wikitext import LMStream
from ...measure import median_time
from ...models.transformer import DEQTransformerLM
from ...nn import remove_weight_norm
from ...solvers import solve
from ...train import train
from ..core import ArmResult, jacobian_at_equilibrium
from ..wikitext import ARMS, arm_settings, fixed_batch, jacobian_monitor
from ..wikitext import load_data as load_wikitext_data
from .config import SolversExperiment
from .measurement import ImplicitBackward, call_time, gradient_error, reference
from .problems import FlatMap, LayerMap, Problem

__all__ = ["load_data", "run_arm", "trained_problem", "solve_cost", "backward_gradient_error", "measure_map",
           "best_accelerated", "tol_key", "MONITORED"]

# The monitor's keys on the steps it ran (every trained.eval.monitor_every steps and the last).
MONITORED = ("mon_jac_fro", "mon_radius", "mon_radius_max", "mon_fwd_nfe")


def load_data(exp: SolversExperiment, base: str | Path | None = None) -> dict[str, Any]:
    """The WikiText slice of ``exp.trained`` (:func:`deqlib.experiments.wikitext.load_data`)."""
    return load_wikitext_data(exp.trained, base)


def _loss_weight(shape: torch.Size, seed: int) -> Tensor:
    """``w`` of the loss ``L = <w, z*>``: seeded N(0, 1/B), as the seeded problems'."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(shape, generator=g) / math.sqrt(shape[0])


def trained_problem(model: DEQTransformerLM, inputs: Tensor, memory: Any, seed: int, name: str) -> Problem:
    """The trained layer as a :class:`Problem` on one segment: ``f`` maps ``(B, L*d)`` states,
    its context (injection of ``inputs (B, L)``, the ``memory`` of the segment before,
    positions, mask) held fixed; weight normalization folded into plain weights of a copy of the
    layer (inside one solve the weights are fixed either way); ``z0 = 0``; the loss
    ``L = <w, z*>`` with a seeded ``w``."""
    model.eval()
    B, L, d = *inputs.shape, model.cfg.d_model
    with torch.no_grad():
        ctx = model.context(model.inject(model.embed(inputs)), memory)
    layer = copy.deepcopy(model.layer)
    for module in layer.modules():
        if "weight_g" in module._parameters:
            remove_weight_norm(module)
    f = FlatMap(LayerMap(layer, ctx), torch.zeros(B, L, d)).eval()
    z0 = inputs.new_zeros(B, L * d, dtype=torch.float32)
    desc = f"trained Post-LN layer ({name}), d {d}, L {L} + mem {model.cfg.mem_len}, batch {B}"
    return Problem(name, desc, f, z0, _loss_weight(z0.shape, seed), 0.0)


def solve_cost(f: Callable[[Tensor], Tensor], z0: Tensor, method: str, max_iter: int, tol: float,
               repeats: int, call_s: float) -> dict[str, float]:
    """One method's forward solve of ``f`` from ``z0 (B, D)`` to ``tol`` (deqlib's defaults).

    ``nfe``: calls of ``f`` for the batch; ``nfe_per_sample``: the mean over samples of the calls
    until each stopped; ``converged``: the share of samples below ``tol``; ``residual``: the
    largest relative residual returned; ``time_calls``: the median solve time over ``repeats``
    solves in units of ``call_s`` (the time of one call of ``f``), so that 1.0 per call means
    the solver costs nothing beyond ``f``; ``overhead``: ``time_calls / nfe``."""
    with torch.no_grad():
        res = solve(f, z0, method=method, max_iter=max_iter, tol=tol)
        t = median_time(lambda: solve(f, z0, method=method, max_iter=max_iter, tol=tol), repeats=repeats, warmup=0)
    return {"nfe": float(res.nfe), "nfe_per_sample": float(res.nfe_per_sample.double().mean()),
            "converged": float(res.converged.double().mean()), "residual": float(res.rel_residual.max()),
            "time_calls": t / call_s, "overhead": t / call_s / res.nfe}


def backward_gradient_error(problem: Problem, z_at: Tensor, method: str, tol: float, max_iter: int,
                            ref_grad: Tensor) -> dict[str, float]:
    """The implicit backward ``u = u J_f(z_at) + dL/dz*`` solved with ``method`` to ``tol`` from
    ``u = dL/dz*``, and the relative error of the parameter gradient ``u df/dtheta`` against
    ``ref_grad`` (flat, as :meth:`ImplicitBackward.param_grad`). ``z_at``: ``(B, D)``, where the
    backward is linearized. Returns ``nfe``, ``residual`` (largest relative) and ``grad_error``."""
    bw = ImplicitBackward(problem, z_at)
    with torch.no_grad():
        res = solve(bw.step, bw.g, method=method, max_iter=max_iter, tol=tol)
    return {"nfe": float(res.nfe), "residual": float(res.rel_residual.max()),
            "grad_error": gradient_error(bw.param_grad(res.z), ref_grad)}


def tol_key(tol: float) -> str:
    """A tolerance as a metric key's suffix: ``1e-3``, ``1e-4``."""
    return f"{tol:.0e}".replace("e-0", "e-")


def measure_map(problem: Problem, exp: SolversExperiment) -> dict[str, float]:
    """Everything :mod:`trained` measures on one map (keys ``<method>_<what>``; module docstring).

    ``radius``/``radius_max``/``radius_err``: mean and max over the batch of the spectral radius
    at the reference equilibrium and the mean error estimate; ``jac_fro``: mean ``||J||_F/sqrt(d)``;
    ``f_ms``, ``step_ms``: one call of ``f`` and of the backward step; per method ``nfe``,
    ``nfe_per_sample``, ``converged``, ``time_calls``, ``overhead`` (:func:`solve_cost`) and per
    backward tolerance ``grad_err_<tol>`` (at the reference ``z*``), ``grad_err_fwd_<tol>`` (at the
    method's forward answer), ``bwd_nfe_<tol>``."""
    ev = exp.trained.eval
    ref = reference(problem, exp.reference_tol, exp.reference_max_iter)
    z_star = ref.z_star.to(problem.z0.dtype)
    bw = ImplicitBackward(problem, z_star)
    jac = jacobian_at_equilibrium(bw.z, bw.fz, n_probes=ev.jac_probes, seed=exp.seed, n_iter=ev.radius_iters,
                                  n_vectors=ev.radius_vectors)
    with torch.no_grad():
        f_s = call_time(lambda: problem.f(z_star), exp.repeats)
        u = bw.g.clone()
        step_s = call_time(lambda: bw.step(u), exp.repeats)
    m = {"radius": float(jac["spectral_radius"].mean()), "radius_max": float(jac["spectral_radius"].max()),
         "radius_err": float(jac["spectral_radius_error"].mean()), "jac_fro": float(jac["jac_fro"].mean()),
         "f_ms": f_s * 1e3, "step_ms": step_s * 1e3, "ref_fwd_residual": ref.forward_residual,
         "ref_bwd_residual": ref.backward_residual}
    for method in exp.methods:
        cost = solve_cost(problem.f, problem.z0, method, exp.max_iter, exp.tol, exp.repeats, f_s)
        m.update({f"{method}_{k}": v for k, v in cost.items()})
        with torch.no_grad():
            answer = solve(problem.f, problem.z0, method=method, max_iter=exp.max_iter, tol=exp.tol).z
        for tol in exp.backward_tols:
            key = tol_key(tol)
            at_ref = backward_gradient_error(problem, z_star, method, tol, exp.max_iter, ref.grad)
            at_fwd = backward_gradient_error(problem, answer, method, tol, exp.max_iter, ref.grad)
            m.update({f"{method}_grad_err_{key}": at_ref["grad_error"], f"{method}_bwd_nfe_{key}": at_ref["nfe"],
                      f"{method}_grad_err_fwd_{key}": at_fwd["grad_error"]})
    return m


def best_accelerated(metrics: dict[str, float], methods: Sequence[str], key: str = "time_calls") -> float:
    """The smallest ``key`` over the accelerated methods (Anderson, Broyden) in ``methods``."""
    vals = [metrics[f"{m}_{key}"] for m in methods if m != "fixed_point"]
    return min(vals) if vals else math.nan


def run_arm(exp: SolversExperiment, arm: str, seed: int, data: dict[str, Any], run_dir: str | Path | None = None,
            progress: bool = True) -> ArmResult:
    """Train ``arm`` (notebook 02's arm of that name, ``trained.train.max_steps`` steps) with
    training seed ``seed`` on ``data`` (:func:`load_data`), then measure its map
    (:func:`measure_map`) on the fixed evaluation batch.

    ``metrics``: :func:`measure_map`'s keys, ``plain_over_best``: plain iteration's solve time
    over the fastest accelerated method's (both in calls of ``f``), ``plain_over_best_nfe``: its
    calls per sample over the fewest of an accelerated method, ``final_train_loss`` (mean of
    the last 20 steps). ``records``: the training steps, with the monitor's keys on monitored
    steps (:data:`MONITORED`). ``run_dir``: where training checkpoints (None: nowhere)."""
    w = exp.trained
    s = arm_settings(w, arm, seed)
    L = s.model.tgt_len
    torch.manual_seed(seed)
    model = DEQTransformerLM(s.model, data["n_token"], s.train.forward, s.train.backward,
                             forward_jitter=s.forward_jitter)
    batch = fixed_batch(data["eval_used"], w.eval.monitor_batch, L)
    monitor = jacobian_monitor(batch, w.eval.jac_probes, w.eval.radius_iters, w.eval.radius_vectors, seed=0)
    identity = {"data": asdict(w.data), "model": asdict(s.model), "arm": arm, "jitter": s.forward_jitter,
                "monitor": [w.eval.monitor_every, w.eval.monitor_batch, w.eval.max_tokens]}
    result = train(model, LMStream(data["train"], s.train.batch_size, L), s.train, run_dir=run_dir, progress=progress,
                   identity=identity, monitor=monitor, monitor_every=w.eval.monitor_every)
    model.eval()
    problem = trained_problem(model, batch.inputs, batch.memory(model), exp.seed, f"{arm}/seed{seed}")
    m = measure_map(problem, exp)
    if "fixed_point" in exp.methods:
        m["plain_over_best"] = m["fixed_point_time_calls"] / best_accelerated(m, exp.methods)
        m["plain_over_best_nfe"] = m["fixed_point_nfe_per_sample"] / best_accelerated(m, exp.methods, "nfe_per_sample")
    losses = [r["loss"] for r in result.records[-20:] if math.isfinite(r["loss"])]
    m["final_train_loss"] = sum(losses) / len(losses) if losses else math.nan
    m["jr"] = float(ARMS[arm].jr)
    return ArmResult(arm=arm, seed=seed, metrics=m, records=result.records)
