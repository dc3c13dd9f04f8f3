"""``python -m deqlib.bench mdeq`` and ``transformer``: the time and memory of one training step
of a model, without and with the Jacobian penalty.

The penalty is added as the training loop adds it, by :func:`deqlib.step.add_penalty`, on every
timed step. The Transformer's steps are built and measured by notebook 05's harness
(:mod:`deqlib.experiments.memory.steps`, :func:`deqlib.measure.step_memory`); the MDEQ's, which
take an optimizer step and mixed precision too, here, their peaks by
:func:`deqlib.measure.peak_memory`. Each MDEQ arm is measured in a function of its own, so its
model and optimizer are freed when the next arm starts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import load_experiment
from ..experiments.cifar import CifarExperiment
from ..experiments.imagenet import ImageNetExperiment
from ..experiments.memory import TransformerSpec, TransformerSteps, measure_memory, time_rounds
from ..experiments.wikitext import WikiTextExperiment
from ..jacobian import JacobianPenalty
from ..measure import median_time, peak_memory
from ..models.mdeq import MDEQ
from ..step import StepOutput, add_penalty
from .environment import CHECKOUT_PARAMS, device_name, pick_device

__all__ = ["PRECISIONS", "bench_mdeq", "bench_transformer"]

# --precision -> the autocast dtype (None: full precision, autocast off)
PRECISIONS: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _loss(out: StepOutput, penalty: JacobianPenalty | None) -> Tensor:
    """The step's loss: the task loss, plus the penalty term at step 0 of 1 when ``penalty``."""
    return out.loss if penalty is None else add_penalty(out, penalty)[0]


MDEQ_EXPERIMENTS = {"cifar10": CifarExperiment, "imagenet": ImageNetExperiment}


def bench_mdeq(profile: str = "paper", batch: int = 96, precision: str = "no", steps: int = 5,
               params_path: str | Path = "params.yaml", device: str | None = None, seed: int = 0,
               experiment: str = "cifar10") -> dict:
    """Step time, images per second and peak memory of the MDEQ of ``experiment`` (the
    ``cifar10`` or ``imagenet`` section of ``params.yaml``) in ``profile``, without and with
    the penalty, on ``batch`` random images ``(batch, C, H, W)`` at the model's size (random
    pixels: the cost of a step does not depend on them, but the solver's NFE does, so the NFE
    are printed beside it).

    A step is forward solve, implicit backward and Adam step; the median of ``steps`` steps
    after one warm-up is reported. The peak is that of forward + backward (the paper's training
    memory) and of a whole step; on CUDA it counts the parameters and Adam state too.
    """
    if experiment not in MDEQ_EXPERIMENTS:
        raise ValueError(f"experiment must be one of {list(MDEQ_EXPERIMENTS)}, got experiment={experiment!r}")
    exp = load_experiment(MDEQ_EXPERIMENTS[experiment], experiment, profile, params_path=params_path)
    dev = pick_device(device)
    torch.manual_seed(seed)
    size = exp.model.image_size
    x = torch.randn(batch, exp.model.in_channels, size, size, device=dev)
    y = torch.randint(0, exp.model.num_classes, (batch,), device=dev)
    rows, counted = [], ""
    for penalty in (None, exp.train.jacobian):
        row, counted = _mdeq_arm(exp, x, y, penalty, precision, steps, seed)
        rows.append(row)
    return {"experiment": experiment, "profile": profile, "batch": batch, "precision": precision,
            "device": device_name(dev), "memory": counted, "torch": torch.__version__,
            "channels": list(exp.model.channels), "rows": rows}


def _mdeq_arm(exp: CifarExperiment | ImageNetExperiment, x: Tensor, y: Tensor, penalty: JacobianPenalty | None,
              precision: str, steps: int, seed: int) -> tuple[dict, str]:
    """One arm of :func:`bench_mdeq` on images ``x (B, C, H, W)`` and labels ``y (B,)``:
    (its row, what its peaks count)."""
    dev, dtype = x.device, PRECISIONS[precision]
    torch.manual_seed(seed)
    model = MDEQ(exp.model, exp.train.forward, exp.train.backward).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=exp.train.lr)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    nfe: list[tuple[int, int]] = []

    def forward_backward() -> None:
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model((x, y))
            loss = _loss(out, penalty)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        nfe.append((out.stats.forward.nfe, out.stats.backward.nfe))

    def step() -> None:
        forward_backward()
        scaler.step(opt)
        scaler.update()

    step()  # warm-up: kernels chosen, Adam state allocated
    seconds = median_time(step, repeats=steps, warmup=0)
    opt.zero_grad(set_to_none=True)
    # Peak memory of forward + backward (the paper's training-memory comparison), then of a
    # whole step (the optimizer's update adds temporaries the size of the parameters).
    peaks = []
    for fn in (forward_backward, step):
        opt.zero_grad(set_to_none=True)
        peaks.append(peak_memory(fn, dev, count_existing=True))
    row = {"arm": "MDEQ" if penalty is None else "MDEQ + JR (penalty on this step)", "step_time_s": seconds,
           "peak_fwd_bwd_mb": peaks[0].nbytes / 2**20, "peak_step_mb": peaks[1].nbytes / 2**20,
           "images_per_s": x.shape[0] / seconds, "fwd_nfe": nfe[-1][0], "bwd_nfe": nfe[-1][1]}
    return row, peaks[0].counted


def bench_transformer(profile: str = "paper", batch: int = 15, overrides: dict | None = None,
                      vocab: int = 267_735, repeats: int = 3, params_path: str | Path | None = None,
                      seed: int = 0) -> dict:
    """Training-step time and memory of the DEQ-Transformer (Post-LN) without and with the
    Jacobian penalty, and of the explicit weight-tied stack of ``model.n_layer`` layers, at
    ``batch`` segments of ``tgt_len`` tokens with a full memory of ``mem_len`` positions.

    The steps and their measurement are notebook 05's harness
    (:mod:`deqlib.experiments.memory.steps`): forward + loss (+ the penalty term, drawn on
    every step here) + backward; the optimizer step is left out (the same for all). Tokens are
    random over ``vocab`` words (the default is WikiText-103's 267,735), so no data set is
    needed. Memory: the bytes autograd saves for backward (``saved``: the whole step; ``core``:
    the layer step, the layer(s) and solvers alone, the paper's "excluding embeddings") and the
    peak of the whole step: on CUDA the allocated bytes above what was allocated before it,
    ``cuda_peak_bytes``; on every device the live tensors made during it, ``peak_bytes``.
    """
    exp = load_experiment(WikiTextExperiment, "wikitext", profile, overrides or {},
                          params_path or CHECKOUT_PARAMS)
    cfg, tcfg = replace(exp.model, pre_ln=False), exp.train
    cfg.check_vocab(vocab)
    device = pick_device()
    spec = TransformerSpec(batch=batch, d_model=cfg.d_model, n_head=cfg.n_head, d_head=cfg.d_head,
                           d_inner=cfg.d_inner, tgt_len=cfg.tgt_len, mem_len=cfg.mem_len, vocab=vocab,
                           cutoffs=cfg.cutoffs, div_val=cfg.div_val, dropout=cfg.dropout, init_std=cfg.init_std,
                           forward=tcfg.forward, backward=tcfg.backward, jacobian=replace(tcfg.jacobian, p=1.0),
                           depth=cfg.n_layer)
    steps = TransformerSteps(spec, seed, device)
    arms = {"deq": ("implicit", tcfg.forward.max_iter, None), "deq+jr": ("implicit", tcfg.forward.max_iter,
                                                                          spec.jacobian),
            "explicit": ("tied", cfg.n_layer, None)}
    fns = {name: steps.step(method, k, penalty=penalty) for name, (method, k, penalty) in arms.items()}
    seconds = {name: sorted(ts)[len(ts) // 2] for name, ts in time_rounds(fns, repeats, device).items()}
    rows, counted = [], ""
    for name, (method, k, penalty) in arms.items():
        whole = measure_memory(fns[name], device)
        core = measure_memory(steps.step(method, k, penalty=penalty, core=True), device)
        row = {"model": name, "layers": cfg.n_layer if method == "tied" else None, "step_s": seconds[name],
               "fwd_nfe": whole["fwd_nfe"], "bwd_nfe": whole["bwd_nfe"], "saved_bytes": whole["saved_bytes"],
               "core_saved_bytes": core["saved_bytes"], "peak_bytes": whole["peak_live_bytes"]}
        if whole["cuda_peak_bytes"] is not None:
            row["cuda_peak_bytes"] = whole["cuda_peak_bytes"]
            counted = "torch.cuda.max_memory_allocated above what was allocated before the step"
        else:
            counted = ("deqlib.measure.PeakMemory: live tensor bytes made inside the step (parameters and "
                       "optimizer state, made before it, not included)")
        rows.append(row)
    for r in rows:
        r["time_vs_explicit"] = r["step_s"] / seconds["explicit"]
    return {"profile": profile, "overrides": dict(overrides or {}), "batch": batch, "tgt_len": cfg.tgt_len,
            "mem_len": cfg.mem_len, "d_model": cfg.d_model, "d_inner": cfg.d_inner, "vocab": vocab,
            "forward": f"{tcfg.forward.method} {tcfg.forward.max_iter}",
            "backward": f"{tcfg.backward.method} {tcfg.backward.max_iter}",
            "device": device_name(device), "memory": counted, "torch": torch.__version__, "rows": rows}
