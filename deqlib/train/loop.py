"""One training loop for every experiment, on Accelerate.

A model plugs in by returning a :class:`~deqlib.step.StepOutput` from ``model(batch,
pretrain=bool)``: the task loss, the :class:`~deqlib.deq.DEQStats` of its equilibrium solve
(None while pretraining an explicit weight-tied stack) and any extra scalars to log. The loop
adds the Jacobian penalty (:func:`deqlib.step.add_penalty`), steps the optimizer and the cosine
schedule, clips gradients, records per-step statistics and writes checkpoints atomically.

Determinism and exact resume: every random draw of step ``t`` comes from the named streams of
:mod:`deqlib.train.streams`, so a run resumed from a checkpoint at step ``k`` is bit for bit the
uninterrupted run on CPU.

Monitoring: ``monitor(model)`` (every ``monitor_every`` steps and after the last, with the model
in evaluation mode) returns scalars that are added to that step's record, e.g. ``||J_f||_F`` and
the spectral radius on a fixed evaluation batch, for every arm alike.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..step import StepOutput, add_penalty
from .checkpoint import (CHECKPOINT, atomic_save, differing_keys, extra_states, load_rank_state, plain_values,
                         rank_path, read_checkpoint)
from .config import TrainConfig
from .streams import penalty_rng, step_rng

__all__ = ["train", "TrainResult", "make_accelerator", "make_optimizer", "lr_factor", "Batches"]

Batches = Any  # anything with ``steps_per_epoch`` and ``batch(epoch, i, rank, world) -> tuple``


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_accelerator(cfg: TrainConfig) -> Any:
    """The ``accelerate.Accelerator`` that :func:`train` uses by default: the GPU when there is
    one, ``cfg.mixed_precision``, and as many processes as the launcher (``accelerate launch``,
    ``torchrun``) started.

    DistributedDataParallel is told that some parameters may go unused in a step: the adaptive
    softmax computes a tail cluster only for batches with a target in it, and without this the
    first step after one that missed a cluster stops every process with an error.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


@dataclass
class TrainResult:
    records: list[dict[str, float]]
    steps: int
    resumed_from: int


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        # Fused: the unfused CPU step takes ``torch.sqrt``, which MKL's vector math computes
        # differently on different CPUs (its bits are not pinned, see deqlib.numerics); the
        # fused kernel is ATen's own.
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _mean(t: Tensor | None) -> float:
    return float("nan") if t is None else float(t.float().mean())


def _process_mean(accelerator: Any, value: float) -> float:
    """``value`` averaged over the processes of the run (itself with one process); NaN where any
    process had none (a step without the penalty: nothing to measure)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.gather(t).mean())


def _monitored(monitor: Callable[[nn.Module], Mapping[str, float]], model: nn.Module) -> dict[str, float]:
    """``monitor(model)`` in evaluation mode, with torch's global generator left as it was (a
    monitored run draws what an unmonitored one draws)."""
    was_training = model.training
    state = torch.random.get_rng_state()
    model.eval()
    try:
        return {k: float(v) for k, v in monitor(model).items()}
    finally:
        torch.random.set_rng_state(state)
        model.train(was_training)


def train(
    model: nn.Module,
    data: Batches,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    accelerator: Any = None,
    identity: Mapping[str, Any] | None = None,
    monitor: Callable[[nn.Module], Mapping[str, float]] | None = None,
    monitor_every: int = 0,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``cfg``; resume from ``run_dir/checkpoint.pt`` if there
    and it is of the same run (same ``cfg``, step count and ``identity``; else start afresh).

    Args:
        run_dir: where checkpoints go (None: no checkpoints).
        identity: what else makes the run this one (e.g. the experiment's whole config, the
            model's shape included); compared, with ``cfg``, before resuming.
        stop_after: stop (after checkpointing) once this many steps are done, as if killed;
            used to test exact resume.
        accelerator: an ``accelerate.Accelerator``; :func:`make_accelerator` makes one if None.
        monitor, monitor_every: ``monitor(model)`` after every ``monitor_every``-th step and the
            last (in evaluation mode, without touching the training streams); its scalars join
            that step's record (absent from the others).
    Returns:
        The per-step records (of the whole run, resumed part included).
    """
    if accelerator is None:
        accelerator = make_accelerator(cfg)
    total = cfg.epochs * data.steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    optimizer = make_optimizer(model, cfg)
    scaler = getattr(accelerator, "scaler", None)  # fp16: the loss scale and its growth count
    ckpt_path = Path(run_dir) / CHECKPOINT if run_dir is not None else None
    start, records = 0, []
    gamma = cfg.jacobian.controller()  # the penalty's weight: a fixed schedule, or adaptive run state
    run_id = plain_values({"train": dataclasses.asdict(cfg), "total_steps": total,
                           "steps_per_epoch": data.steps_per_epoch, "identity": dict(identity or {})}, "run")
    state = None
    if ckpt_path is not None and ckpt_path.exists():
        state = read_checkpoint(ckpt_path, "not resuming from it: this run starts afresh and overwrites it")
        if state is not None and not isinstance(state, dict):
            state = {}
        if state is not None and state.get("run") != run_id:
            keys = differing_keys(state.get("run") or {}, run_id)
            warnings.warn(f"{ckpt_path} is a checkpoint of another run (it differs in {keys[:8]}); "
                          "not resuming from it: this run starts afresh and overwrites it", stacklevel=2)
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, records = state["step"], state["records"]
        gamma.load_state_dict(state.get("gamma_policy") or {})
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if accelerator.num_processes > 1:
            load_rank_state(model, rank_path(ckpt_path, accelerator.process_index), start,
                            accelerator.num_processes)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm import tqdm

        # The plain text bar: tqdm.auto's notebook bar needs ipywidgets, and without them it
        # prints a warning naming the environment's path into the notebook. A slow refresh:
        # in a notebook every refresh is a stored output.
        bar = tqdm(total=total, initial=start, desc="train", leave=False, mininterval=5.0, maxinterval=60.0)

    step = start
    for step in range(start, total):
        if stop_after is not None and step >= stop_after:
            break
        t0 = time.perf_counter()
        epoch, i = divmod(step, data.steps_per_epoch)
        rank = accelerator.process_index
        torch.manual_seed(step_rng(cfg.seed, step, rank).initial_seed())  # dropout etc. of this step
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, total, cfg.warmup_steps, cfg.schedule)
        batch = tuple(t.to(accelerator.device) for t in data.batch(epoch, i, rank, accelerator.num_processes))
        wrapped.train()
        pretrain = step < cfg.pretrain_steps
        with accelerator.autocast():
            out: StepOutput = wrapped(batch, pretrain=pretrain)
            jac_est, weight = None, float("nan")
            loss = out.loss
            gen = penalty_rng(cfg.seed, step)  # tau: the same draw on every process
            if out.stats is not None and cfg.jacobian.applies(gen, epoch):
                if rank:
                    gen = penalty_rng(cfg.seed, step, rank)  # this process's own probes
                # gamma's schedule runs over the equilibrium steps: it starts at gamma when the
                # penalty first can apply, after pretraining (as the official code's does).
                weight = gamma.weight(step - cfg.pretrain_steps, total - cfg.pretrain_steps)
                loss, jac_est = add_penalty(out, cfg.jacobian, generator=gen, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip is not None:
            accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
        optimizer.step()
        st = out.stats
        rec = {
            "step": step,
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": float(out.loss.detach()),
            "pretrain": float(pretrain),
            "fwd_nfe": float(st.forward.nfe) if st else float("nan"),
            "fwd_rel_res": _mean(st.forward.rel_residual) if st else float("nan"),
            "bwd_nfe": float(st.backward.nfe) if st and st.backward else float("nan"),
            "bwd_rel_res": _mean(st.backward.rel_residual) if st and st.backward else float("nan"),
            "jac_fro": math.sqrt(float(jac_est)) if jac_est is not None else float("nan"),
            "gamma": weight,
            "step_time_s": time.perf_counter() - t0,
            **out.metrics,
        }
        if gamma.measure:
            # With several processes each measured its own share: the policy must see one
            # value, or each process would move gamma its own way.
            gamma.update(_process_mean(accelerator, rec[gamma.measure]))
        done = step + 1
        if monitor is not None and ((monitor_every and done % monitor_every == 0) or done == total):
            rec.update(_monitored(monitor, accelerator.unwrap_model(wrapped)))
        records.append(rec)
        if ckpt_path is not None and (
            (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total
            or done == stop_after
        ):
            unwrapped = accelerator.unwrap_model(wrapped)
            if accelerator.num_processes > 1:
                atomic_save({"step": done, "world": accelerator.num_processes,
                             "extra": extra_states(unwrapped)},
                            rank_path(ckpt_path, accelerator.process_index))
            if accelerator.is_main_process:
                atomic_save({"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else None,
                             "gamma_policy": gamma.state_dict(),
                             "step": done, "records": records, "run": run_id}, ckpt_path)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3g}", nfe=f"{rec['fwd_nfe']:.0f}/{rec['bwd_nfe']:.0f}",
                            refresh=False)
    if bar is not None:
        bar.close()
    accelerator.wait_for_everyone()
    return TrainResult(records=records, steps=len(records), resumed_from=start)
