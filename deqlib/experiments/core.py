"""The one shape of every experiment, and what every notebook measures.

An experiment module (``synthetic``, ``cifar``, ``wikitext``, ...) offers the same verbs with
the same meanings:

- a typed config (a dataclass read from its ``params.yaml`` section) whose ``seeds`` lists the
  seeds every arm runs with, and whose ``arms`` names the arms;
- ``load_data(exp, base)``: the data, once for all arms;
- ``run_arm(exp, arm, seed, data, run_dir=None, progress=True) -> ArmResult``: train one arm
  for one seed and measure it.

:func:`run_arms` runs the grid (every arm for every seed; arms with the same seed share the
initialization of what they have in common and the data order, so they can be compared in
pairs) and :func:`summarize` / :func:`compare` reduce it over seeds. The measurements shared by
the notebooks live here with one meaning each:

- **NFE cap**: at most ``k`` calls of ``f`` in the forward solve, stopping earlier only where
  the solve reaches its tolerance (:func:`capped`); the NFE reported beside it is the one spent;
- **NFE to a tolerance**: per example, the first call at which the relative residual is below
  it, 0 when never (:func:`nfe_to_tol`);
- ``||J_f(z*)||_F`` and the spectral radius at the equilibrium, on a fixed evaluation batch
  (:func:`jacobian_at_equilibrium`); ``jac_fro`` is ``||J||_F / sqrt(d)``, the square root of
  the penalty's ``||J||_F^2 / d``;
- the mean step time over every equilibrium step, penalized ones included
  (:func:`mean_step_time`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..deq import SolverSettings
from ..jacobian import estimate_spectral_radius, frobenius_sq_per_dim
from ..stats import PairedTest, mean_se, mcnemar, paired_t
from ..train import checkpoint_files

__all__ = ["ArmResult", "RUN_DIR_ENV", "pipeline_run_dir", "remove_pipeline_checkpoints", "run_arms", "capped",
           "nfe_to_tol",
           "jacobian_at_equilibrium", "mean_step_time", "equilibrium_mean", "summarize", "compare",
           "by_arm", "RunArm"]

RUN_DIR_ENV = "DEQLIB_RUN_DIR"
# In $DEQLIB_RUN_DIR: one line per arm folder pipeline_run_dir handed out, so that the runner
# removes what the run's arms wrote there and nothing else.
ARMS_FILE = ".arms"


@dataclass
class ArmResult:
    """One arm trained and measured for one seed.

    Attributes:
        arm, seed: which run this is.
        metrics: scalar results (test metrics, NFE, ``jac_fro``, spectral radius, step time, ...).
        records: one dict per training step (loss, NFE, residuals, step time, ...).
        curves: named tables of rows (e.g. ``"accuracy_vs_nfe"``: one row per NFE cap).
        outcomes: per-example results for paired tests, e.g. ``"correct_tol"``: ``(N,)`` bool.
        model: the trained model (not kept by :func:`run_arms` unless asked).
    """

    arm: str
    seed: int
    metrics: dict[str, float]
    records: list[dict[str, float]] = field(default_factory=list)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    outcomes: dict[str, Tensor] = field(default_factory=dict)
    model: nn.Module | None = None


RunArm = Callable[..., ArmResult]


def pipeline_run_dir(name: str) -> Path | None:
    """``$DEQLIB_RUN_DIR/<name>``, where ``pipelines.run`` asks a notebook's training runs to
    checkpoint (each ``/``-separated part of ``name`` made a safe folder name: ``"MDEQ + JR/seed0"``
    is ``MDEQ_JR/seed0``); None when the variable is unset (a plain notebook, nbval): no
    checkpoints. The folder is noted in ``$DEQLIB_RUN_DIR/.arms``, so that
    :func:`remove_pipeline_checkpoints` removes what the arms wrote there and nothing else."""
    root = os.environ.get(RUN_DIR_ENV, "")
    if not root:
        return None
    parts = []
    for part in name.split("/"):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", part).strip("_")
        parts.append("run" if safe.strip(".") == "" else safe)  # "", "." and ".." name no folder
    folder = Path(root).joinpath(*parts)
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ARMS_FILE, "a") as fh:  # one short append: whole lines
        fh.write("/".join(parts) + "\n")
    return folder


def remove_pipeline_checkpoints(root: str | Path) -> None:
    """Remove what the training arms of a pipeline run wrote under ``root`` (its
    ``$DEQLIB_RUN_DIR``): the checkpoint files (:func:`deqlib.train.checkpoint_files`) of each arm
    folder that :func:`pipeline_run_dir` handed out, the list of them, and the folders that
    leaves empty. Anything else there (a file of the user's) is kept, and so is its folder."""
    root = Path(root)
    arms_file = root / ARMS_FILE
    try:
        names = set(arms_file.read_text().split())
    except FileNotFoundError:
        names = set()
    for name in sorted(names, reverse=True):  # seed folders before their arm folder
        parts = name.split("/")
        if any(not re.fullmatch(r"[A-Za-z0-9._-]+", p) or p.strip(".") == "" for p in parts):
            continue  # not a name pipeline_run_dir writes (a line cut short cannot climb out)
        folder = root.joinpath(*parts)
        for path in checkpoint_files(folder):
            path.unlink(missing_ok=True)
        for k in range(len(parts), 0, -1):
            _remove_if_empty(root.joinpath(*parts[:k]))
    arms_file.unlink(missing_ok=True)
    _remove_if_empty(root)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, or not there
        pass


def run_arms(run_arm: RunArm, exp: Any, arms: Iterable[str], seeds: Iterable[int], data: Any = None,
             progress: bool = True, keep_models: bool = False,
             log: Callable[[str], None] | None = print) -> list[ArmResult]:
    """Every arm for every seed (seed-major: all arms of the first seed, then the next), each
    checkpointing under ``<arm>/seed<k>`` of the pipeline's run folder (resumable)."""
    import time

    results = []
    for seed in seeds:
        for arm in arms:
            t0 = time.perf_counter()
            res = run_arm(exp, arm, seed, data, run_dir=pipeline_run_dir(f"{arm}/seed{seed}"), progress=progress)
            if not keep_models:
                res.model = None
            results.append(res)
            if log is not None:
                log(f"{arm}, seed {seed}: {len(res.records)} steps in {time.perf_counter() - t0:.0f} s")
    return results


def capped(settings: SolverSettings, k: int) -> SolverSettings:
    """The forward solve with an NFE cap of ``k``: at most ``k`` calls of ``f``, stopping earlier
    only where it reaches ``settings.tol`` (the meaning of "cap" everywhere in the suite)."""
    return settings.replace(max_iter=k)


def nfe_to_tol(rel_trace: Tensor, tol: float) -> Tensor:
    """``(B,)`` int64: per example, the first call count at which the relative residual
    (``rel_trace``: ``(N, B)``, one row per call) is below ``tol``; 0 where it never was."""
    below = rel_trace < tol
    first = below.to(torch.uint8).argmax(dim=0) + 1  # the first maximal entry
    return torch.where(below.any(dim=0), first, torch.zeros_like(first))


def jacobian_at_equilibrium(z: Tensor, fz: Tensor, n_probes: int = 4, seed: int = 0,
                            radius: bool = True, n_iter: int = 300, n_vectors: int = 8) -> dict[str, Tensor]:
    """``jac_fro`` (``||J_f(z)||_F / sqrt(d)``, Hutchinson with ``n_probes`` probes) and, with
    ``radius``, the spectral radius and its error estimate, each ``(B,)`` (``n_iter`` and
    ``n_vectors``: the subspace iteration's most steps and block size).

    ``z``, ``fz``: ``(B, D)``, ``z`` a leaf of ``fz``'s graph (``DEQStats.jacobian_inputs``) at
    the equilibrium of a fixed evaluation batch; probes and the starting block are seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        fro2 = frobenius_sq_per_dim(z, fz, n_probes, create_graph=False, generator=gen).detach()
        out = {"jac_fro": fro2.clamp_min(0).sqrt()}
        if radius:
            est = estimate_spectral_radius(z, fz, n_iter=n_iter, n_vectors=n_vectors, generator=gen)
            out.update(spectral_radius=est.value.detach(), spectral_radius_error=est.error.detach())
    return out


def equilibrium_mean(records: Sequence[Mapping[str, Any]], key: str) -> float:
    """Mean of ``key`` over the equilibrium (not pretraining) steps, NaN values (a step with no
    solve to report) left out; NaN when none is left."""
    vals = [r[key] for r in records if not r["pretrain"] and r[key] == r[key]]
    return sum(vals) / len(vals) if vals else float("nan")


def mean_step_time(records: Sequence[Mapping[str, Any]]) -> float:
    """Mean wall time of a training step over every equilibrium step, the steps the penalty was
    drawn on included (a median would leave them out at a small ``p``)."""
    return equilibrium_mean(records, "step_time_s")


def by_arm(results: Sequence[ArmResult]) -> dict[str, list[ArmResult]]:
    """Results grouped by arm, each list ordered by seed."""
    out: dict[str, list[ArmResult]] = {}
    for r in sorted(results, key=lambda r: r.seed):
        out.setdefault(r.arm, []).append(r)
    return out


def summarize(results: Sequence[ArmResult], metrics: Sequence[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{arm: {metric: (mean, standard error, n seeds)}}`` over the seeds of each arm."""
    return {arm: {m: mean_se([r.metrics.get(m, math.nan) for r in rs]) for m in metrics}
            for arm, rs in by_arm(results).items()}


def compare(results: Sequence[ArmResult], metric: str, a: str, b: str) -> PairedTest:
    """Arm ``a`` against arm ``b`` on ``metric``, paired by seed: a paired t-test over the seeds
    both ran; for an ``outcomes`` key (per-example booleans, e.g. ``correct_tol``), the exact
    McNemar test on the examples of every shared seed pooled (a stratified McNemar)."""
    ra = {r.seed: r for r in results if r.arm == a}
    rb = {r.seed: r for r in results if r.arm == b}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        raise ValueError(f"arms {a!r} and {b!r} share no seed")
    if metric in ra[seeds[0]].outcomes:
        xa = torch.cat([ra[s].outcomes[metric].reshape(-1) for s in seeds]).tolist()
        xb = torch.cat([rb[s].outcomes[metric].reshape(-1) for s in seeds]).tolist()
        return mcnemar(xa, xb)
    return paired_t([ra[s].metrics[metric] for s in seeds], [rb[s].metrics[metric] for s in seeds])
