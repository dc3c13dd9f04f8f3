"""The 1D synthetic experiment (supplement A.1, Figures 5 and 9, Table 4's first column).

One arm per gamma, same seed and data: train the 200-parameter DEQ, then evaluate on the
validation set: MSE, NFE needed to reach a relative residual, ``||J||_F`` and spectral radius
at the equilibrium, and the surface ``z_out = f(z; x)`` for Figure 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_real, check_real_list
from ..data.synthetic import SyntheticConfig, make_synthetic
from ..deq import SolverSettings
from ..jacobian import spectral_radius
from ..models.synthetic import SyntheticDEQ, SyntheticModelConfig
from ..solvers import METHODS, SolverResult
from ..config import training_identity
from ..train import TensorBatches, TrainConfig, train
from .core import equilibrium_mean, pipeline_run_dir

__all__ = ["EvalConfig", "SyntheticExperiment", "run_arm", "batch_rel_trace", "nfe_to_tol", "GRID_MAX"]

# Figure 5's surfaces take grid^2 calls of f at once (grid^2 x hidden numbers), and matplotlib
# draws at most 50 rows and columns of a surface by default: far past this, a grid is only memory.
GRID_MAX = 1000


@dataclass(frozen=True)
class EvalConfig:
    """How the trained models are measured.

    Every key is checked here, at construction: the arms train first and are measured after, so
    a bad ``method`` or ``tol`` found when measuring would cost a trained arm, and a bad ``grid``
    (read when the surfaces are drawn) all of them.

    Attributes:
        gammas: one arm per Jacobian weight. tol: the relative residual the NFE is counted to,
            in (0, 1); the measuring solve runs to ``tol * 1e-3``. nfe_cap: its most calls.
        method: its solver. grid: points per axis of Figure 5's surfaces (at most GRID_MAX).
    """

    gammas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    tol: float = 1e-3
    nfe_cap: int = 200
    method: str = "anderson"
    grid: int = 41

    def __post_init__(self) -> None:
        check_real_list("gammas", self.gammas, minimum=0)
        check_real("tol", self.tol, minimum=0, maximum=1, min_open=True, max_open=True)
        check_int("nfe_cap", self.nfe_cap, 2)
        check_choice("method", self.method, METHODS)
        check_int("grid", self.grid, 2, GRID_MAX)


@dataclass(frozen=True)
class SyntheticExperiment:
    data: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: SyntheticModelConfig = field(default_factory=SyntheticModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # Each arm's gamma comes from eval.gammas; a weight set here would be silently replaced.
        jac = self.train.jacobian
        if jac.gamma != 0.0 or jac.gamma_end is not None:
            raise ValueError(f"train.jacobian.gamma={jac.gamma!r}, gamma_end={jac.gamma_end!r} is not used: "
                             f"each arm's constant gamma comes from eval.gammas; leave gamma at 0 and "
                             f"gamma_end unset")


def batch_rel_trace(res: SolverResult) -> Tensor:
    """``(N,)`` relative residual of the whole batch, ``||F - Z|| / ||F||``, at each call.

    For scalar states the per-sample ratio is ill-posed where the equilibrium crosses 0, so
    the synthetic experiment measures convergence over the batch, as the official code does.
    """
    fz_norm = res.abs_trace / res.rel_trace.clamp_min(1e-30)
    return res.abs_trace.norm(dim=1) / fz_norm.norm(dim=1)


def nfe_to_tol(trace: Tensor, tol: float) -> int | None:
    """First call count at which ``trace`` (``(N,)``) is below ``tol``, or None."""
    hit = (trace < tol).nonzero()
    return int(hit[0]) + 1 if len(hit) else None


def run_arm(exp: SyntheticExperiment, gamma: float, run_dir: str | Path | None = None,
            progress: bool = True) -> dict:
    """Train and evaluate one gamma. Returns metrics, per-step records and the model.
    ``run_dir``: where the run checkpoints and resumes from (default
    :func:`~deqlib.experiments.core.pipeline_run_dir`: nowhere outside the pipeline)."""
    (xt, yt), (xv, yv) = make_synthetic(exp.data)
    cfg = replace(exp.train, jacobian=replace(exp.train.jacobian, gamma=float(gamma)))
    torch.manual_seed(cfg.seed)
    model = SyntheticDEQ(exp.model, cfg.forward, cfg.backward)
    if run_dir is None:
        run_dir = pipeline_run_dir(f"gamma_{float(gamma):g}")
    result = train(model, TensorBatches((xt, yt), cfg.batch_size, seed=cfg.seed), cfg,
                   run_dir=run_dir, progress=progress, identity=training_identity(exp))
    # Training moved the model to the GPU when there is one; its 200 parameters are measured
    # and plotted (surfaces, the notebook's figures) beside the CPU data.
    model.cpu().eval()
    ev = exp.eval
    measure = SolverSettings(ev.method, ev.nfe_cap, ev.tol * 1e-3)  # run past tol: measure, not stop
    with torch.no_grad():
        z_thr, _ = model.predict(xv)  # at the training threshold, as trained
        z_cap, stats = model.predict(xv, measure)
    trace = batch_rel_trace(stats.forward)
    with torch.enable_grad():
        z = stats.forward.z.detach().requires_grad_()
        fz = model.f(z, xv)
        # d = 1 and samples independent: J is the diagonal df/dz, and its square is exact (one
        # Hutchinson probe would give eps^2 (df/dz)^2, a random multiple of it, per sample).
        (dfdz,) = torch.autograd.grad(fz, z, torch.ones_like(fz), retain_graph=True)
        jac = dfdz.pow(2).squeeze(1)
        rho = spectral_radius(z, fz, n_iter=5, n_vectors=1)
    var_y = float(yv.var())
    mse = float(torch.nn.functional.mse_loss(z_cap, yv))
    return {
        "gamma": float(gamma),
        "valid_mse": mse,
        "valid_mse_at_threshold": float(torch.nn.functional.mse_loss(z_thr, yv)),
        "valid_r2": 1 - mse / var_y,
        "nfe_to_tol": nfe_to_tol(trace, ev.tol),
        "jac_fro": math.sqrt(float(jac.mean())),
        "spectral_radius_mean": float(rho.mean()),
        "spectral_radius_max": float(rho.max()),
        "train_fwd_nfe": equilibrium_mean(result.records, "fwd_nfe"),
        "records": result.records,
        "trace": trace,
        "model": model,
    }


@torch.no_grad()
def surface(model: SyntheticDEQ, x_range: tuple[float, float], z_range: tuple[float, float],
            n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, Z, F)`` each ``(n, n)``: ``F = f(Z; X)`` on a grid (Figure 5's surface)."""
    xs = torch.linspace(*x_range, n)
    zs = torch.linspace(*z_range, n)
    X, Z = torch.meshgrid(xs, zs, indexing="xy")
    F = model.f(Z.reshape(-1, 1), X.reshape(-1, 1)).reshape(n, n)
    return X, Z, F
