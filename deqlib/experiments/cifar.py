"""CIFAR-10 with a multiscale DEQ, with and without Jacobian regularization (Tables 2 and 3).

Two arms share the seed, the data, the model and the training budget (forward/backward NFE
thresholds); only the Jacobian penalty differs: the JR arm uses ``train.jacobian``, the other arm
the same with ``gamma = 0``. Each trained model is then measured on the test set:

- accuracy when the forward solve is hard-stopped after ``k`` calls of ``f`` (Table 3's layout);
- the NFE each test image needs to reach a relative residual of ``eval.tol`` (1e-3), and the
  accuracy when every image is solved to that tolerance (capped at ``eval.nfe_cap`` calls).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_int_list, check_real
from ..data.cifar import Cifar10, CifarDataConfig, CifarTransform, load_cifar10, normalize
from ..deq import SolverSettings
from ..models.mdeq import MDEQ, MDEQConfig
from ..solvers import METHODS
from ..config import training_identity
from ..train import TensorBatches, TrainConfig, evaluate, train
from .core import equilibrium_mean, pipeline_run_dir

__all__ = ["CifarEvalConfig", "CifarExperiment", "hard_cap", "nfe_to_tol", "evaluate_model", "run_arm",
           "arm_config", "ARMS"]

ARMS = ("MDEQ", "MDEQ + JR")


@dataclass(frozen=True)
class CifarEvalConfig:
    """How the trained models are measured on the test set.

    Attributes:
        batch_size: test images per solve.
        nfe: the hard caps ``k`` at which accuracy is reported (Table 3 uses 1..6).
        tol: relative residual each image is solved to; nfe_cap: the most calls for that solve.
        method: solver used at evaluation.
    """

    batch_size: int = 500
    nfe: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    tol: float = 1e-3
    nfe_cap: int = 40
    method: str = "anderson"

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1)
        check_int_list("nfe", self.nfe, 1)
        check_real("tol", self.tol, minimum=0, maximum=1, min_open=True, max_open=True)
        check_int("nfe_cap", self.nfe_cap, 1)
        check_choice("method", self.method, METHODS)


@dataclass(frozen=True)
class CifarExperiment:
    data: CifarDataConfig = field(default_factory=CifarDataConfig)
    model: MDEQConfig = field(default_factory=MDEQConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: CifarEvalConfig = field(default_factory=CifarEvalConfig)


def arm_config(exp: CifarExperiment, jr: bool) -> TrainConfig:
    """The training settings of one arm: ``train`` as configured, or with the penalty off."""
    if jr:
        return exp.train
    return replace(exp.train, jacobian=replace(exp.train.jacobian, gamma=0.0, gamma_end=None))


def hard_cap(k: int, method: str = "anderson") -> SolverSettings:
    """Settings that stop the forward solve after exactly ``k`` calls of ``f``: the tolerance is
    far below what float arithmetic reaches, so only the cap (or a divergence) ends it."""
    return SolverSettings(method=method, max_iter=k, tol=1e-30)


def nfe_to_tol(rel_trace: Tensor, tol: float) -> Tensor:
    """Per sample, the first call count at which the relative residual is below ``tol``.

    Args:
        rel_trace: ``(N, B)`` residual at each of N calls.
    Returns:
        ``(B,)`` int64, 0 where the residual never got below ``tol``.
    """
    below = rel_trace < tol
    first = below.float().argmax(dim=0) + 1  # argmax returns the first maximal entry
    return torch.where(below.any(dim=0), first, torch.zeros_like(first))


@torch.no_grad()
def evaluate_model(model: MDEQ, images: Tensor, labels: Tensor, ev: CifarEvalConfig,
                   accelerator: Any = None) -> dict[str, float]:
    """Test-set metrics of a trained model (dropout off), computed over ``images`` ``uint8 (N, 3,
    32, 32)`` once each, across processes when an accelerator is given.

    Returns accuracies as fractions: ``acc_nfe_<k>`` for each hard cap, ``acc_tol`` when solved to
    ``ev.tol``; ``nfe_to_tol_mean`` over the images that reached it, ``reached_tol`` the fraction
    that did within ``ev.nfe_cap`` calls, ``nfe_to_tol_capped_mean`` over all images with those
    that did not counted at the cap; ``rel_residual_mean`` after that solve; ``n`` images.
    """
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    to_tol = SolverSettings(method=ev.method, max_iter=ev.nfe_cap, tol=ev.tol)

    def batch(start: int, stop: int) -> dict[str, Tensor | float]:
        x = normalize(images[start:stop]).to(device)
        y = labels[start:stop].to(device)
        out: dict[str, Tensor | float] = {"n": stop - start}
        for k in ev.nfe:
            logits, _ = model.predict(x, forward_solver=hard_cap(k, ev.method))
            out[f"correct_nfe_{k}"] = (logits.argmax(dim=1) == y).sum()
        logits, stats = model.predict(x, forward_solver=to_tol)
        first = nfe_to_tol(stats.forward.rel_trace, ev.tol)
        out["correct_tol"] = (logits.argmax(dim=1) == y).sum()
        out["reached"] = (first > 0).sum()
        out["nfe_to_tol_sum"] = first.sum()
        out["rel_residual_sum"] = stats.forward.rel_residual.double().sum()
        return out

    tot = evaluate(batch, len(labels), ev.batch_size, accelerator)
    n = tot["n"]
    res = {f"acc_nfe_{k}": tot[f"correct_nfe_{k}"] / n for k in ev.nfe}
    res.update({
        "acc_tol": tot["correct_tol"] / n,
        "reached_tol": tot["reached"] / n,
        "nfe_to_tol_mean": tot["nfe_to_tol_sum"] / tot["reached"] if tot["reached"] else float("nan"),
        # the images that never got there counted at the cap: a lower bound on the true mean
        "nfe_to_tol_capped_mean": (tot["nfe_to_tol_sum"] + (n - tot["reached"]) * ev.nfe_cap) / n,
        "rel_residual_mean": tot["rel_residual_sum"] / n,
        "n": n,
    })
    return res


def load_data(exp: CifarExperiment, base: str | Path | None = None) -> Cifar10:
    """The configured CIFAR-10 (a relative root is resolved against ``base``), cut to the first
    ``data.n_train`` / ``data.n_test`` images when those are set."""
    d = load_cifar10(exp.data.root, base, exp.data.download)
    tr, te = slice(exp.data.n_train), slice(exp.data.n_test)
    return Cifar10(d.train_x[tr], d.train_y[tr], d.test_x[te], d.test_y[te], d.classes)


def run_arm(exp: CifarExperiment, jr: bool, base: str | Path | None = None, data: Cifar10 | None = None,
            run_dir: str | Path | None = None, progress: bool = True, accelerator: Any = None) -> dict:
    """Train one arm and measure it on the test set.

    Args:
        jr: with the Jacobian penalty of ``exp.train.jacobian`` (else gamma = 0).
        base: folder a relative ``data.root`` is resolved against (that of ``params.yaml``).
        data: already loaded data (else loaded from the configuration).
        run_dir: where the run checkpoints and resumes from (default: :func:`~deqlib.experiments.core.pipeline_run_dir`,
            i.e. nowhere outside the pipeline).
    Returns:
        ``{"arm", "metrics", "records", "model"}``; metrics hold the test-set figures of
        :func:`evaluate_model` plus the mean forward/backward NFE and residuals of training.
    """
    data = data if data is not None else load_data(exp, base)
    cfg = arm_config(exp, jr)
    torch.manual_seed(cfg.seed)
    model = MDEQ(exp.model, cfg.forward, cfg.backward)
    batches = TensorBatches((data.train_x, data.train_y), cfg.batch_size, seed=cfg.seed,
                            transform=CifarTransform(exp.data.augment, exp.data.pad))
    if run_dir is None:
        run_dir = pipeline_run_dir(ARMS[int(jr)])
    result = train(model, batches, cfg, run_dir=run_dir, progress=progress, accelerator=accelerator,
                   identity=training_identity(exp))
    metrics = evaluate_model(model, data.test_x, data.test_y, exp.eval, accelerator)
    metrics.update({
        **{f"train_{key}": equilibrium_mean(result.records, key)
           for key in ("fwd_nfe", "bwd_nfe", "fwd_rel_res", "bwd_rel_res")},
        "train_steps": len(result.records),
        "train_loss_last_epoch": _last_epoch_mean(result.records, "loss"),
        "train_acc_last_epoch": _last_epoch_mean(result.records, "train_acc"),
    })
    return {"arm": ARMS[int(jr)], "metrics": metrics, "records": result.records, "model": model}


def _last_epoch_mean(records: list[dict[str, float]], key: str) -> float:
    last = records[-1]["epoch"]
    vals = [r[key] for r in records if r["epoch"] == last]
    return sum(vals) / len(vals)
