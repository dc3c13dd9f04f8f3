"""What the weight-decay notebook measures on both models, with one meaning each: on a fixed
evaluation batch, the forward relative residual the training threshold leaves and
``||J_f(z*)||_F / sqrt(d)`` (every ``monitor_every`` steps, through the training loop's monitor),
and after training the spectral radius there and the plain-iteration NFE to a tolerance.

A model plugs in through a *pair* function, ``pair(model, solver) -> (z, f(z), stats)``: ``z``
``(B, D)`` a leaf at the equilibrium of the fixed batch found by ``solver`` (None: the model's
training forward solve, its threshold), ``f(z)`` with its graph, and the solve's statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...deq import DEQStats, SolverSettings
from ...models.mdeq import MDEQ
from ...models.transformer import DEQTransformerLM
from ..core import jacobian_at_equilibrium, nfe_to_tol
from ..wikitext.measure import FixedBatch
from .config import MonitorConfig

__all__ = ["Pair", "transformer_pair", "mdeq_pair", "jacobian_monitor", "final_measures", "MONITORED"]

Pair = Callable[[nn.Module, SolverSettings | None], tuple[Tensor, Tensor, DEQStats]]
# The keys the monitor adds to a record (every eval.monitor_every steps and after the last).
MONITORED = ("mon_jac_fro", "mon_fwd_res", "mon_fwd_nfe")


def transformer_pair(batch: FixedBatch) -> Pair:
    """The DEQ-Transformer's pair on the second segment of ``batch`` (the first one's memory)."""

    def pair(model: DEQTransformerLM, solver: SolverSettings | None) -> tuple[Tensor, Tensor, DEQStats]:
        z, fz, stats = model.equilibrium_pair(batch.inputs, batch.memory(model), forward_solver=solver)
        return z, fz, stats

    return pair


def mdeq_pair(images: Tensor) -> Pair:
    """The MDEQ's pair on ``images`` ``(B, 3, S, S)`` (normalized), its scales flattened."""

    def pair(model: MDEQ, solver: SolverSettings | None) -> tuple[Tensor, Tensor, DEQStats]:
        with torch.enable_grad():
            _, stats = model.predict(images.to(next(model.parameters()).device), forward_solver=solver)
            z, fz = stats.jacobian_inputs()
        return z, fz, stats

    return pair


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def jacobian_monitor(pair: Pair, ev: MonitorConfig) -> Callable[[nn.Module], dict[str, float]]:
    """A ``monitor`` for :func:`deqlib.train.train` (called in evaluation mode): on the fixed
    batch solved as in training, ``mon_fwd_res`` (mean relative residual of the returned
    iterate), ``mon_fwd_nfe`` and ``mon_jac_fro`` (``||J_f||_F / sqrt(d)``, mean over the batch,
    ``ev.jac_probes`` seeded probes: every arm and step measured with the same ones). NaN where
    the model has gone non-finite."""

    def monitor(model: nn.Module) -> dict[str, float]:
        z, fz, stats = pair(model, None)
        out = {"mon_fwd_res": float(stats.forward.rel_residual.mean()), "mon_fwd_nfe": float(stats.forward.nfe),
               "mon_jac_fro": math.nan}
        if _finite(z, fz):
            jac = jacobian_at_equilibrium(z, fz, n_probes=ev.jac_probes, seed=0, radius=False)
            out["mon_jac_fro"] = float(jac["jac_fro"].mean())
        return out

    return monitor


def final_measures(model: nn.Module, pair: Pair, ev: MonitorConfig) -> dict[str, float]:
    """After training, in evaluation mode, on the fixed batch: the spectral radius of ``J_f`` at
    the equilibrium of the training solve (``spectral_radius`` mean, ``_max``, ``_error``), and
    plain fixed-point iteration from ``z = 0`` run for ``ev.plain_nfe_cap`` calls: per example
    the calls until the relative residual is below ``ev.tol`` (``plain_nfe``: the mean, those that
    never got there counted at the cap, a lower bound; ``plain_reached``: the share that did).
    Its count follows the contraction factor of ``f`` near its fixed point."""
    was_training = model.training
    model.eval()
    nan = {"spectral_radius": math.nan, "spectral_radius_max": math.nan, "spectral_radius_error": math.nan}
    z, fz, _ = pair(model, None)
    out = dict(nan)
    if _finite(z, fz):
        jac = jacobian_at_equilibrium(z, fz, n_probes=ev.jac_probes, seed=0, n_iter=ev.radius_iters,
                                      n_vectors=ev.radius_vectors)
        rho = jac["spectral_radius"]
        out = {"spectral_radius": float(rho.mean()), "spectral_radius_max": float(rho.max()),
               "spectral_radius_error": float(jac["spectral_radius_error"].mean())}
    solver = SolverSettings("fixed_point", ev.plain_nfe_cap, ev.tol * 1e-3)  # run past tol: measure, not stop
    with torch.no_grad():
        _, _, stats = pair(model, solver)
    n = nfe_to_tol(stats.forward.rel_trace, ev.tol)
    hit = n > 0
    out.update(plain_nfe=float(torch.where(hit, n, torch.full_like(n, ev.plain_nfe_cap)).double().mean()),
               plain_reached=float(hit.double().mean()))
    model.train(was_training)
    return out
