"""What is measured on an image classifier, the same for every data set: test accuracy at each
NFE cap and solved to a tolerance (per image, for paired tests), the NFE to that tolerance of
the solver and of plain iteration, ``||J_f||_F`` and the spectral radius on a fixed evaluation
batch (the training loop's monitor, and at the start and the end), and the peak memory of a
training step.

A data set plugs in through two methods (:class:`ImageData`): ``train_batches(batch_size, seed)``
for the training loop and ``eval_batches()``, whose ``batch(start, stop)`` gives normalized test
images ``(B, C, S, S)`` and labels ``(B,)``, and ``n_items`` their number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from ...deq import SolverSettings
from ...jacobian import JacobianPenalty
from ...measure import peak_memory
from ...models.mdeq import MDEQ
from ...step import add_penalty
from ..core import jacobian_at_equilibrium, nfe_to_tol
from .config import ClassificationEvalConfig

__all__ = ["EvalSource", "ImageData", "fixed_batch", "equilibrium_jacobian", "jacobian_monitor",
           "evaluate_equilibrium", "evaluate_explicit", "step_peak_memory"]


class EvalSource(Protocol):
    n_items: int

    def batch(self, start: int, stop: int) -> tuple[Tensor, Tensor]: ...


class ImageData(Protocol):
    classes: tuple[str, ...]

    def train_batches(self, batch_size: int, seed: int) -> Any: ...

    def eval_batches(self) -> EvalSource: ...


def fixed_batch(data: ImageData, n: int) -> Tensor:
    """The fixed evaluation batch: the first ``n`` test images (fewer if the set is smaller)."""
    source = data.eval_batches()
    return source.batch(0, min(n, source.n_items))[0]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def equilibrium_jacobian(model: MDEQ, x: Tensor, ev: ClassificationEvalConfig, threshold: int,
                         radius: bool = True) -> dict[str, float]:
    """On the batch ``x`` ``(B, C, S, S)``, solved by ``ev.method`` to ``ev.tol`` (at most
    ``ev.nfe_cap`` calls) in evaluation mode: ``jac_fro`` (``||J_f(z*)||_F / sqrt(d)``, mean over
    the batch, ``ev.jac_probes`` probes), with ``radius`` the spectral radius (mean, max and the
    mean error estimate), ``res_threshold`` (the mean relative residual after ``threshold``
    calls: what the training threshold leaves) and ``nfe_to_tol`` (mean calls to ``ev.tol``,
    those that did not get there counted at the cap). Probes and starting blocks are seeded:
    every arm and every step is measured with the same ones."""
    was_training = model.training
    model.eval()
    solver = SolverSettings(ev.method, ev.nfe_cap, ev.tol)
    with torch.enable_grad():
        _, stats = model.predict(x.to(_device(model)), forward_solver=solver)
        z, fz = stats.jacobian_inputs()
        jac = jacobian_at_equilibrium(z, fz, n_probes=ev.jac_probes, seed=0, radius=radius,
                                      n_iter=ev.radius_iters, n_vectors=ev.radius_vectors)
    model.train(was_training)
    trace = stats.forward.rel_trace
    n = nfe_to_tol(trace, ev.tol)
    out = {"jac_fro": float(jac["jac_fro"].mean()),
           "res_threshold": float(trace[min(threshold, len(trace)) - 1].mean()),
           "nfe_to_tol": float(torch.where(n > 0, n, torch.full_like(n, ev.nfe_cap)).double().mean())}
    if radius:
        out.update(spectral_radius=float(jac["spectral_radius"].mean()),
                   spectral_radius_max=float(jac["spectral_radius"].max()),
                   spectral_radius_error=float(jac["spectral_radius_error"].mean()))
    return out


def jacobian_monitor(x: Tensor, ev: ClassificationEvalConfig, threshold: int) -> Callable[[MDEQ], dict[str, float]]:
    """The training loop's ``monitor``: :func:`equilibrium_jacobian` on the fixed batch ``x``,
    its keys prefixed ``mon_`` (the spectral radius only with ``ev.monitor_radius``)."""

    def monitor(model: MDEQ) -> dict[str, float]:
        out = equilibrium_jacobian(model, x, ev, threshold, radius=ev.monitor_radius)
        return {f"mon_{k}": v for k, v in out.items()}

    return monitor


TOP = 5  # the second accuracy reported beside top-1, where a data set has more classes


def _solve_nfe(model: MDEQ, x: Tensor, solver: SolverSettings, tol: float) -> tuple[Tensor, Tensor]:
    """The ``min(TOP, classes)`` highest-scoring classes ``(B, k)``, best first, and per-image
    calls to ``tol`` ``(B,)`` (0: not within the cap)."""
    logits, stats = model.predict(x, forward_solver=solver)
    return logits.topk(min(TOP, logits.shape[1]), dim=1).indices, nfe_to_tol(stats.forward.rel_trace, tol)


def _hits(ranked: Tensor, y: Tensor, suffix: str) -> dict[str, Tensor]:
    """Per image, top-1 correct (``correct<suffix>``) and, with more than ``TOP`` classes ranked,
    top-5 correct (``correct_top5<suffix>``): ``(B,)`` bool on the CPU."""
    out = {f"correct{suffix}": (ranked[:, 0] == y).cpu()}
    if ranked.shape[1] == TOP:
        out[f"correct_top{TOP}{suffix}"] = (ranked == y[:, None]).any(dim=1).cpu()
    return out


def _nfe_summary(prefix: str, nfe: Tensor, cap: int) -> dict[str, float]:
    hit = nfe > 0
    return {f"{prefix}_mean": float(nfe[hit].double().mean()) if bool(hit.any()) else math.nan,
            f"{prefix}_reached": float(hit.double().mean()),
            # the images that never got there counted at the cap: a lower bound on the true mean
            f"{prefix}_capped_mean": float(torch.where(hit, nfe, torch.full_like(nfe, cap)).double().mean())}


def _per_image(source: EvalSource, batch_size: int, accelerator: Any,
               fn: Callable[[Tensor, Tensor], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``fn(x, y)`` (per-image ``(B,)`` tensors on the CPU) over every test image, concatenated
    in image order: ``(N,)`` each. With an ``accelerate.Accelerator`` of ``w`` processes, process
    ``r`` takes the batches ``r, r + w, ...`` and the parts are gathered, so every image is
    counted once and every process returns the whole set."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    parts = []
    for b in range(rank, math.ceil(source.n_items / batch_size), world):
        start = b * batch_size
        x, y = source.batch(start, min(source.n_items, start + batch_size))
        parts.append((start, fn(x, y)))
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    parts.sort(key=lambda part: part[0])
    return {key: torch.cat([p[key] for _, p in parts]) for key in parts[0][1]}


@torch.no_grad()
def evaluate_equilibrium(model: MDEQ, source: EvalSource, ev: ClassificationEvalConfig, accelerator: Any = None,
                         ) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Every test image of ``source`` solved at each cap of ``ev.nfe`` (``ev.method``, stopping
    earlier only at ``ev.tol``), to ``ev.tol`` (at most ``ev.nfe_cap`` calls) and by plain
    fixed-point iteration (at most ``ev.plain_cap`` calls); split over the processes of
    ``accelerator`` when given (see :func:`_per_image`).

    Returns ``(metrics, outcomes)``: accuracies as fractions, ``acc`` solved to ``tol`` and
    ``acc_nfe_<k>`` at each cap (with more than five classes also top-5: ``acc_top5``,
    ``acc_top5_nfe_<k>``); ``nfe_to_tol_{mean,reached,capped_mean}`` of the solver and
    ``plain_nfe_{...}`` of plain iteration (mean over the images that got there, their share,
    and the mean with the others counted at the cap); outcomes ``correct``, ``correct_nfe_<k>``
    (and their ``_top5`` forms), ``(N,)`` bool per image, for McNemar tests.
    """
    model.eval()
    device = _device(model)

    def solve(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x, y = x.to(device), y.to(device)
        out: dict[str, Tensor] = {}
        for k in ev.nfe:
            out.update(_hits(_solve_nfe(model, x, SolverSettings(ev.method, k, ev.tol), ev.tol)[0], y, f"_nfe_{k}"))
        ranked, n = _solve_nfe(model, x, SolverSettings(ev.method, ev.nfe_cap, ev.tol), ev.tol)
        out.update(_hits(ranked, y, ""), nfe=n.cpu())
        out["plain"] = _solve_nfe(model, x, SolverSettings("fixed_point", ev.plain_cap, ev.tol), ev.tol)[1].cpu()
        return out

    per_image = _per_image(source, ev.batch_size, accelerator, solve)
    nfe, plain = per_image.pop("nfe"), per_image.pop("plain")
    outcomes = per_image
    metrics = {"acc" + key[len("correct"):]: float(hit.double().mean()) for key, hit in outcomes.items()}
    metrics.update(**_nfe_summary("nfe_to_tol", nfe, ev.nfe_cap), **_nfe_summary("plain_nfe", plain, ev.plain_cap),
                   n_test=float(len(nfe)))
    return metrics, outcomes


@torch.no_grad()
def evaluate_explicit(model: MDEQ, source: EvalSource, depth: int, batch_size: int, accelerator: Any = None,
                      ) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Test accuracy of the explicit weight-tied stack of ``depth`` layers: ``({"acc", "n_test"}
    (and ``acc_top5`` with more than five classes), {"correct": (N,) bool, ...})``."""
    model.eval()
    device = _device(model)

    def classify(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = model.unrolled(x.to(device), depth)
        return _hits(logits.topk(min(TOP, logits.shape[1]), dim=1).indices, y.to(device), "")

    outcomes = _per_image(source, batch_size, accelerator, classify)
    metrics = {"acc" + key[len("correct"):]: float(hit.double().mean()) for key, hit in outcomes.items()}
    metrics["n_test"] = float(len(outcomes["correct"]))
    return metrics, outcomes


def step_peak_memory(model: MDEQ, x: Tensor, y: Tensor, penalty: JacobianPenalty | None,
                     explicit: bool) -> tuple[int, str]:
    """Peak memory of one training step on ``(x, y)`` (``(B, C, S, S)``, ``(B,)``): the forward
    solve with the solver's buffers, the loss, the penalty term when given (drawn, at its
    ``gamma``), the backward with its solve; the explicit stack's forward and backward with
    ``explicit``. Returns the bytes and what they count (:func:`deqlib.measure.peak_memory`).
    The model's parameters and gradients are left as they were."""
    was_training = model.training
    model.train()
    device = _device(model)
    x, y = x.to(device), y.to(device)

    def step() -> None:
        out = model((x, y), pretrain=explicit)
        loss = out.loss
        if penalty is not None and out.stats is not None:
            loss = add_penalty(out, penalty, generator=torch.Generator().manual_seed(0))[0]
        loss.backward()

    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        measured = peak_memory(step, device)
    for n, p in model.named_parameters():
        p.grad = grads[n]
    model.train(was_training)
    return measured.nbytes, measured.counted
