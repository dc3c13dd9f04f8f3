"""``python -m deqlib.bench mdeq`` and ``transformer``: the time and memory of one training step
of a model, without and with the Jacobian penalty.

The penalty is added as the training loop adds it, by :func:`deqlib.step.add_penalty`, on every
timed step; peaks are measured by :func:`deqlib.measure.peak_memory`. Each arm is measured in a
function of its own, so its model and optimizer are freed when the next arm starts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import load_experiment
from ..experiments.cifar import CifarExperiment
from ..experiments.wikitext import WikiTextExperiment, activation_memory
from ..jacobian import JacobianPenalty
from ..measure import median_time, peak_memory
from ..models.mdeq import MDEQ
from ..models.transformer import DEQTransformerLM, Memory, TransformerConfig
from ..step import StepOutput, add_penalty
from ..train import TrainConfig
from .environment import CHECKOUT_PARAMS, device_name, pick_device

__all__ = ["PRECISIONS", "bench_mdeq", "bench_transformer"]

# --precision -> the autocast dtype (None: full precision, autocast off)
PRECISIONS: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _loss(out: StepOutput, penalty: JacobianPenalty | None) -> Tensor:
    """The step's loss: the task loss, plus the penalty term at step 0 of 1 when ``penalty``."""
    return out.loss if penalty is None else add_penalty(out, penalty)[0]


def bench_mdeq(profile: str = "paper", batch: int = 96, precision: str = "no", steps: int = 5,
               params_path: str | Path = "params.yaml", device: str | None = None, seed: int = 0) -> dict:
    """Step time and peak memory of the CIFAR-10 MDEQ of ``profile``, without and with the
    penalty, on ``batch`` random images ``(batch, C, H, W)``.

    A step is forward solve, implicit backward and Adam step; the median of ``steps`` steps
    after one warm-up is reported. The peak is that of forward + backward (the paper's training
    memory) and of a whole step; on CUDA it counts the parameters and Adam state too.
    """
    exp = load_experiment(CifarExperiment, "cifar10", profile, params_path=params_path)
    dev = pick_device(device)
    torch.manual_seed(seed)
    size = exp.model.image_size
    x = torch.randn(batch, exp.model.in_channels, size, size, device=dev)
    y = torch.randint(0, exp.model.num_classes, (batch,), device=dev)
    rows, counted = [], ""
    for penalty in (None, exp.train.jacobian):
        row, counted = _mdeq_arm(exp, x, y, penalty, precision, steps, seed)
        rows.append(row)
    return {"profile": profile, "batch": batch, "precision": precision, "device": device_name(dev),
            "memory": counted, "torch": torch.__version__, "channels": list(exp.model.channels), "rows": rows}


def _mdeq_arm(exp: CifarExperiment, x: Tensor, y: Tensor, penalty: JacobianPenalty | None, precision: str,
              steps: int, seed: int) -> tuple[dict, str]:
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
           "fwd_nfe": nfe[-1][0], "bwd_nfe": nfe[-1][1]}
    return row, peaks[0].counted


def bench_transformer(profile: str = "paper", batch: int = 15, overrides: dict | None = None,
                      vocab: int = 267_735, repeats: int = 3, params_path: str | Path | None = None,
                      seed: int = 0) -> dict:
    """Training-step time and memory of the DEQ-Transformer (Post-LN) without and with the
    Jacobian penalty, and of the explicit weight-tied stack of ``model.n_layer`` layers, at
    ``batch`` segments of ``tgt_len`` tokens with a full memory of ``mem_len`` positions.

    A step is forward + loss (+ the penalty term, applied every step here) + backward; the
    optimizer step is left out (the same for all). Tokens are random over ``vocab`` words (the
    default is WikiText-103's 267,735), so no data set is needed. Memory: the bytes autograd
    saves for backward (``saved``: all, ``core``: the layer(s) only) and the peak of a step
    (:func:`deqlib.measure.peak_memory`: on CUDA the allocated bytes above what was allocated
    before it, ``cuda_peak_bytes``; elsewhere the live tensors made during it, ``peak_bytes``).
    """
    exp = load_experiment(WikiTextExperiment, "wikitext", profile, overrides or {},
                          params_path or CHECKOUT_PARAMS)
    cfg, tcfg = replace(exp.model, pre_ln=False), exp.train
    cfg.check_vocab(vocab)
    device = pick_device()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, cfg.tgt_len + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    rows, counted = [], ""
    for name, explicit, penalty in (("deq", False, None), ("deq+jr", False, replace(tcfg.jacobian, p=1.0)),
                                    ("explicit", True, None)):
        row, counted = _transformer_arm(cfg, tcfg, vocab, explicit, penalty, inputs, targets, g, repeats, seed)
        rows.append({"model": name, **row})
    base_time = next(r["step_s"] for r in rows if r["model"] == "explicit")
    for r in rows:
        r["time_vs_explicit"] = r["step_s"] / base_time
    return {"profile": profile, "overrides": dict(overrides or {}), "batch": batch, "tgt_len": cfg.tgt_len,
            "mem_len": cfg.mem_len, "d_model": cfg.d_model, "d_inner": cfg.d_inner, "vocab": vocab,
            "forward": f"{tcfg.forward.method} {tcfg.forward.max_iter}",
            "backward": f"{tcfg.backward.method} {tcfg.backward.max_iter}",
            "device": device_name(device), "memory": counted, "torch": torch.__version__, "rows": rows}


def _transformer_arm(cfg: TransformerConfig, tcfg: TrainConfig, vocab: int, explicit: bool,
                     penalty: JacobianPenalty | None, inputs: Tensor, targets: Tensor, generator: torch.Generator,
                     repeats: int, seed: int) -> tuple[dict, str]:
    """One arm of :func:`bench_transformer` on tokens ``inputs, targets (B, L)``: (its row, what
    its peak counts). ``generator`` draws the memory states, arm after arm."""
    device, batch = inputs.device, inputs.shape[0]
    torch.manual_seed(seed)
    model = DEQTransformerLM(cfg, vocab, tcfg.forward, tcfg.backward, explicit=explicit).to(device).train()
    memory = None
    if cfg.mem_len:
        memory = Memory(torch.randn(batch, cfg.mem_len, cfg.d_model, generator=generator).to(device),
                        torch.zeros(batch, cfg.mem_len, 3 * cfg.n_head * cfg.d_head, device=device))
    nfe = {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model.run(inputs, targets, memory)
        _loss(out, penalty).backward()
        if out.stats is not None:
            nfe["forward"], nfe["backward"] = out.stats.forward.nfe, out.stats.backward.nfe

    seconds = median_time(step, repeats=repeats, warmup=1)
    row = {"layers": cfg.n_layer if explicit else None, "step_s": seconds,
           "fwd_nfe": nfe.get("forward"), "bwd_nfe": nfe.get("backward")}
    saved = activation_memory(model, inputs, targets, penalty)
    row["saved_bytes"], row["core_saved_bytes"] = saved["total"], saved["core"]
    model.zero_grad(set_to_none=True)
    peak = peak_memory(step, device)
    row["cuda_peak_bytes" if device.type == "cuda" else "peak_bytes"] = peak.nbytes
    return row, peak.counted
