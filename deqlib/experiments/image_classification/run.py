"""One arm of an image-classification experiment, trained for one seed and measured.

The seed is the training seed: it draws the initialization (``torch.manual_seed`` before the
model is built: every arm of one seed starts from the same weights, the explicit stack
included, since it is the same network), the data order, the augmentation, the dropout masks
and the penalty's draws. Arms of one seed therefore pair.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...config import to_dict
from ...models.mdeq import MDEQ
from ...train import make_accelerator, train
from ..core import ArmResult, equilibrium_mean, mean_step_time
from .config import arm_specs, arm_train_config
from .measure import (ImageData, equilibrium_jacobian, evaluate_equilibrium, evaluate_explicit, fixed_batch,
                      jacobian_monitor, step_peak_memory)

__all__ = ["run_arm", "MONITORED"]

# What the monitor adds to a record every eval.monitor_every steps (equilibrium arms).
MONITORED = ("mon_jac_fro", "mon_res_threshold", "mon_nfe_to_tol")


def _identity(exp: object, model_cfg: object) -> dict:
    """What makes a run this one beside its training settings (its seed and gamma are in those):
    the data and the model. Other arms, seeds and the evaluation are not, so adding one does not
    discard the runs already trained."""
    return {"experiment": {"data": to_dict(exp)["data"], "model": to_dict(model_cfg)}}


def _records_mean(records: list[dict[str, float]], key: str) -> float:
    vals = [r[key] for r in records if r[key] == r[key]]
    return sum(vals) / len(vals) if vals else math.nan


def run_arm(exp: object, arm: str, seed: int, data: ImageData, run_dir: str | Path | None = None,
            progress: bool = True, accelerator: Any = None) -> ArmResult:
    """Train ``arm`` (a name of :func:`~.config.arm_specs`) with training seed ``seed`` on ``data``
    and measure it; ``run_dir``: where it checkpoints and resumes (None: nowhere).

    ``accelerator``: the ``accelerate.Accelerator`` training and evaluation run under (None:
    :func:`deqlib.train.make_accelerator`'s, which under ``accelerate launch --num_processes N``
    is the N-process one): each process trains on its share of every batch and evaluates its
    share of the test batches; the test outcomes are gathered, so every process returns the
    metrics of the whole test set, each image counted once.

    Metrics of every arm: ``acc`` (the equilibrium solved to ``eval.tol``; the explicit stack's
    output), ``step_time_s`` (mean over the steps), ``train_time_s`` (their sum),
    ``peak_memory_bytes`` of one training step (the penalty's term included for a JR arm),
    ``train_acc_last_epoch``, ``train_steps``, ``params``. Equilibrium arms add the caps' accuracies
    and the NFE of :func:`~.measure.evaluate_equilibrium`, ``jac_fro`` and the spectral radius on
    the fixed batch at the end and before training (``init_``), the mean forward / backward NFE and
    relative residual over training (``train_*``) and the steps the penalty was drawn on
    (``penalized_steps``). ``records`` hold the monitor's measurements (:data:`MONITORED`);
    ``outcomes`` the per-image correctness; ``curves["accuracy_vs_nfe"]`` one row per cap.
    """
    specs = arm_specs(exp)
    if arm not in specs:
        raise ValueError(f"arm must be one of {list(specs)}, got arm={arm!r}")
    spec, ev = specs[arm], exp.eval
    batches = data.train_batches(exp.train.batch_size, int(seed))
    cfg = arm_train_config(exp, spec, int(seed), batches.steps_per_epoch)
    model_cfg = exp.model if not spec.explicit else replace(exp.model, pretrain_depth=spec.explicit_depth)
    torch.manual_seed(int(seed))  # the initialization: the same for every arm of this seed
    model = MDEQ(model_cfg, cfg.forward, cfg.backward)
    x_fixed = fixed_batch(data, ev.jac_batch)
    threshold = cfg.forward.max_iter
    init: dict[str, float] = {}
    if not spec.explicit:
        with torch.random.fork_rng(devices=[]):  # leaves the training's draws as they were
            init = equilibrium_jacobian(model, x_fixed, ev, threshold)
    accelerator = make_accelerator(cfg) if accelerator is None else accelerator
    result = train(model, batches, cfg, run_dir=run_dir, progress=progress, identity=_identity(exp, model_cfg),
                   monitor=None if spec.explicit else jacobian_monitor(x_fixed, ev, threshold),
                   monitor_every=ev.monitor_every, accelerator=accelerator)
    records = result.records
    source = data.eval_batches()
    if spec.explicit:
        metrics, outcomes = evaluate_explicit(model, source, spec.explicit_depth, ev.batch_size, accelerator)
        metrics["step_time_s"] = _records_mean(records, "step_time_s")
    else:
        metrics, outcomes = evaluate_equilibrium(model, source, ev, accelerator)
        with torch.random.fork_rng(devices=[]):
            metrics.update(equilibrium_jacobian(model, x_fixed, ev, threshold))
        metrics.update({f"init_{k}": v for k, v in init.items()})
        metrics.update({f"train_{key}": equilibrium_mean(records, key)
                        for key in ("fwd_nfe", "bwd_nfe", "fwd_rel_res", "bwd_rel_res")})
        metrics["step_time_s"] = mean_step_time(records)
        metrics["penalized_steps"] = float(sum(r["jac_fro"] == r["jac_fro"] for r in records))
    train_x, train_y = batches.batch(0, 0)[:2]
    n = min(ev.memory_batch, len(train_y))
    penalty = cfg.jacobian if cfg.jacobian.enabled else None
    metrics["peak_memory_bytes"], _ = step_peak_memory(model, train_x[:n], train_y[:n], penalty, spec.explicit)
    last_epoch = records[-1]["epoch"]
    metrics.update({
        "train_time_s": sum(r["step_time_s"] for r in records),
        "train_steps": float(len(records)),
        "train_acc_last_epoch": _records_mean([r for r in records if r["epoch"] == last_epoch], "train_acc"),
        "params": float(sum(p.numel() for p in model.parameters())),
    })
    model.eval()
    curves = {}
    if not spec.explicit:
        curves["accuracy_vs_nfe"] = [{"nfe": k, "accuracy": metrics[f"acc_nfe_{k}"]} for k in ev.nfe]
    return ArmResult(arm=arm, seed=int(seed), metrics=metrics, records=records, curves=curves,
                     outcomes=outcomes, model=model)
