"""Word-level language modelling with the DEQ-Transformer (Table 1 / Table 5, Table 4's
WikiText-103 column).

Arms share the seed, data and budget and differ in the layer's normalization (Post-LN /
Pre-LN) and whether the Jacobian penalty is on; the ``explicit`` arm is the weight-tied stack
of ``model.n_layer`` layers trained by ordinary backprop, the reference for time and memory.
Per arm: perplexity on the evaluation split (memory carried across segments), mean NFE in
training and evaluation, the median training step time, activation memory at batch 15, the
forward/backward residuals over training, and perplexity with the solver hard-stopped at a
range of NFEs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median

import torch
from torch import Tensor

from ..checks import check_choice_list, check_int, check_int_list
from ..config import training_identity
from ..data.wikitext import LMStream, WikiTextData, batchify, load_wikitext
from ..deq import SolverSettings
from ..jacobian import JacobianPenalty
from ..measure import peak_memory, saved_tensor_bytes
from ..models.transformer import DEQTransformerLM, Memory, TransformerConfig
from ..train import TrainConfig, train
from .core import equilibrium_mean, pipeline_run_dir

__all__ = ["ARMS", "LMEvalConfig", "WikiTextExperiment", "evaluate", "activation_memory",
           "unigram_perplexity", "run_arm", "arm_settings", "future_token_leak"]

# name -> (pre_ln, Jacobian penalty on, explicit stack)
ARMS = {
    "post_ln": (False, False, False),
    "post_ln_jr": (False, True, False),
    "pre_ln": (True, False, False),
    "pre_ln_jr": (True, True, False),
    "explicit": (False, False, True),
}


@dataclass(frozen=True)
class LMEvalConfig:
    """What is run and how the trained models are measured.

    ``arms``: names from :data:`ARMS`. ``batch_size``: streams of the evaluation split.
    ``max_tokens``: evaluate on this many leading tokens of the split (None: all of it).
    ``nfe_caps``: hard forward NFE limits for the "early stopped" rows. ``memory_batch``: the
    batch at which activation memory is measured (the paper's 15).
    """

    arms: tuple[str, ...] = ("post_ln", "post_ln_jr", "pre_ln_jr", "pre_ln", "explicit")
    batch_size: int = 10
    max_tokens: int | None = None
    nfe_caps: tuple[int, ...] = (4, 8, 12)
    memory_batch: int = 15

    def __post_init__(self) -> None:
        check_choice_list("arms", self.arms, ARMS, distinct=True)
        for name in ("batch_size", "memory_batch"):
            check_int(name, getattr(self, name), 1)
        check_int_list("nfe_caps", self.nfe_caps, 1, nonempty=False)  # none: no early-stopped rows
        check_int("max_tokens", self.max_tokens, 2, optional=True)
        if self.max_tokens is not None and self.max_tokens < 2 * self.batch_size:
            # Each of the batch_size streams needs two tokens: an input and its target.
            raise ValueError(f"max_tokens must be null or >= 2 * batch_size = {2 * self.batch_size}, "
                             f"got max_tokens={self.max_tokens!r}")


@dataclass(frozen=True)
class WikiTextExperiment:
    data: WikiTextData = field(default_factory=WikiTextData)
    model: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)


def arm_settings(exp: WikiTextExperiment, arm: str) -> tuple[TransformerConfig, TrainConfig, bool]:
    """``(model config, train config, explicit)`` of ``arm``: the normalization is set, and
    the penalty is switched off for arms without it (the explicit stack has no pretraining)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm={arm!r}; choose one of {sorted(ARMS)}")
    pre_ln, jr, explicit = ARMS[arm]
    model = replace(exp.model, pre_ln=pre_ln)
    cfg = exp.train
    if not jr:
        cfg = replace(cfg, jacobian=replace(cfg.jacobian, gamma=0.0, gamma_end=None))
    if explicit:
        cfg = replace(cfg, pretrain_steps=0)
    return model, cfg, explicit


def unigram_perplexity(train_tokens: Tensor, eval_tokens: Tensor, n_token: int) -> float:
    """Perplexity of ``eval_tokens`` under the training split's word frequencies (add-one)."""
    counts = torch.bincount(train_tokens, minlength=n_token).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(torch.exp(-logp[eval_tokens].mean()))


@torch.no_grad()
def evaluate(model: DEQTransformerLM, tokens: Tensor, batch_size: int, tgt_len: int,
             forward_solver: SolverSettings | None = None, max_tokens: int | None = None) -> dict:
    """Perplexity of a token stream, segment by segment, each segment's memory being the
    equilibrium of the one before (as in training).

    The stream is batchified to ``(batch_size, T)`` and every column but the first is scored
    (the last segment may be shorter). Returns ``ppl``, ``nll`` per token, ``tokens`` scored,
    mean forward ``nfe`` and ``rel_residual`` of the solves (NaN for the explicit stack).
    """
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    data = batchify(tokens, batch_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    memory: Memory | None = None
    nll, count, nfe, res = 0.0, 0, [], []
    T = data.shape[1]
    for s in range(0, T - 1, tgt_len):
        e = min(s + tgt_len, T - 1)
        out = model.run(data[:, s:e].to(device), data[:, s + 1:e + 1].to(device), memory,
                        forward_solver=forward_solver)
        memory = out.memory
        nll -= float(out.logprob.double().sum())
        count += out.logprob.numel()
        if out.stats is not None:
            nfe.append(out.stats.forward.nfe)
            res.append(float(out.stats.forward.rel_residual.mean()))
    model.train(was_training)
    mean_nll = nll / count
    return {
        "ppl": math.exp(min(mean_nll, 700.0)) if math.isfinite(mean_nll) else float("nan"),
        "nll": mean_nll,
        "tokens": count,
        "nfe": sum(nfe) / len(nfe) if nfe else float("nan"),
        "rel_residual": sum(res) / len(res) if res else float("nan"),
    }


@torch.no_grad()
def future_token_leak(model: DEQTransformerLM, tokens: Tensor, batch_size: int, tgt_len: int,
                      forward_solver: SolverSettings | None = None, seed: int = 0) -> dict:
    """How far the predictions before the middle of a segment move when the tokens after it
    are replaced: 0 for a causal model.

    The segment is the second of ``tokens`` batchified to ``batch_size`` streams, with the
    first segment's memory. From position ``t = tgt_len // 2`` on, its inputs are replaced by
    random tokens (seeded); the log-probability of each target before ``t`` is compared. The
    attention mask is causal, but the solver's mixing weights and its best iterate are chosen
    over each stream's whole segment, so a solve stopped before the fixed point lets later
    tokens in.

    Returns ``max`` and ``mean`` ``|delta log p|`` in nats over the ``batch_size * t``
    positions, and the forward ``nfe`` of the unchanged segment.
    """
    data = batchify(tokens, batch_size)
    if data.shape[1] < 2 * tgt_len + 1:
        raise ValueError(f"{tokens.numel()} tokens make no second segment of tgt_len={tgt_len} "
                         f"over batch_size={batch_size} streams")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = data.to(device)
    memory = model.run(data[:, :tgt_len], data[:, 1:tgt_len + 1], forward_solver=forward_solver).memory
    x, y = data[:, tgt_len:2 * tgt_len], data[:, tgt_len + 1:2 * tgt_len + 1]
    t = tgt_len // 2
    changed = x.clone()
    gen = torch.Generator().manual_seed(seed)
    changed[:, t:] = torch.randint(0, model.n_token, changed[:, t:].shape, generator=gen).to(device)
    a = model.run(x, y, memory, forward_solver=forward_solver)
    b = model.run(changed, y, memory, forward_solver=forward_solver)
    model.train(was_training)
    delta = (a.logprob[:, :t] - b.logprob[:, :t]).double().abs()
    return {"max": float(delta.max()), "mean": float(delta.mean()),
            "nfe": a.stats.forward.nfe if a.stats is not None else float("nan")}


def activation_memory(model: DEQTransformerLM, inputs: Tensor, targets: Tensor,
                      penalty: JacobianPenalty | None = None) -> dict:
    """Bytes autograd saves for backward in one training step on ``inputs (B, L)`` with a full
    memory of ``mem_len`` positions (zeros), Jacobian penalty term included if given.

    ``total``: the whole step; ``core``: minus a step with no layer at all (embedding,
    injection and adaptive softmax only), i.e. what the Transformer layer(s) add, which is what
    the paper compares ("excluding embeddings"). On CUDA also ``cuda_peak``: peak allocated
    bytes of forward + backward above what was allocated before.
    """
    B = inputs.shape[0]
    cfg = model.cfg
    ref = next(model.parameters())
    memory = None
    if cfg.mem_len:
        memory = Memory(ref.new_zeros(B, cfg.mem_len, cfg.d_model),
                        ref.new_zeros(B, cfg.mem_len, 3 * cfg.n_head * cfg.d_head))
    was_training = model.training
    model.train()

    def step(layers: int | None = None) -> Tensor:
        out = model.run(inputs, targets, memory, layers=layers)
        loss = out.loss
        if penalty is not None and out.stats is not None:
            z, fz = out.stats.jacobian_inputs()
            loss = loss + penalty.loss(z, fz, 0, 1)[0]
        return loss

    result = {}
    loss, result["total"] = saved_tensor_bytes(step)
    del loss
    _, shell = saved_tensor_bytes(lambda: step(layers=0))
    result["core"] = result["total"] - shell
    if ref.is_cuda:
        result["cuda_peak"] = peak_memory(lambda: step().backward(), ref.device).nbytes
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    return result


def run_arm(exp: WikiTextExperiment, arm: str, data: dict, run_dir: str | Path | None = None,
            progress: bool = True) -> dict:
    """Train and evaluate one arm on ``data`` (from :func:`deqlib.data.wikitext.load_wikitext`).

    Returns metrics (perplexity at the training threshold and at each NFE cap, NFEs, median
    step time, activation memory, :func:`future_token_leak` at the threshold), the per-step
    records and the model. ``run_dir``: where the
    run checkpoints and resumes from (default :func:`~deqlib.experiments.core.pipeline_run_dir`: nowhere
    outside the pipeline).
    """
    model_cfg, cfg, explicit = arm_settings(exp, arm)
    torch.manual_seed(cfg.seed)
    n_token = len(data["vocab"])
    model = DEQTransformerLM(model_cfg, n_token, cfg.forward, cfg.backward, explicit=explicit)
    stream = LMStream(data["train"], cfg.batch_size, model_cfg.tgt_len)
    if run_dir is None:
        run_dir = pipeline_run_dir(arm)
    result = train(model, stream, cfg, run_dir=run_dir, progress=progress, identity=training_identity(exp))
    records = result.records
    deq_steps = [r for r in records if not r["pretrain"]]
    ev = exp.eval
    evaluation = evaluate(model, data["eval"], ev.batch_size, model_cfg.tgt_len, max_tokens=ev.max_tokens)
    capped, leak = {}, None
    if not explicit:
        for cap in ev.nfe_caps:
            capped[cap] = evaluate(model, data["eval"], ev.batch_size, model_cfg.tgt_len,
                                   forward_solver=cfg.forward.replace(max_iter=cap), max_tokens=ev.max_tokens)
        leak = future_token_leak(model, data["eval"], ev.batch_size, model_cfg.tgt_len, seed=cfg.seed)
    seg = batchify(data["eval"], ev.memory_batch)[:, : model_cfg.tgt_len + 1]
    mem = activation_memory(model, seg[:, :-1].contiguous(), seg[:, 1:].contiguous(),
                            cfg.jacobian if cfg.jacobian.enabled else None)
    times = [r["step_time_s"] for r in deq_steps[1:]] or [r["step_time_s"] for r in records]
    finite = all(math.isfinite(r["loss"]) for r in records)
    return {
        "arm": arm,
        "diverged": not finite or not math.isfinite(evaluation["nll"]),
        "ppl": evaluation["ppl"],
        "eval_nll": evaluation["nll"],
        "eval_tokens": evaluation["tokens"],
        "valid_nfe": evaluation["nfe"],
        "valid_rel_residual": evaluation["rel_residual"],
        "train_nfe": equilibrium_mean(records, "fwd_nfe"),
        "train_bwd_nfe": equilibrium_mean(records, "bwd_nfe"),
        "final_train_loss": _mean(r["loss"] for r in records[-20:]),
        "step_time_s": median(times),
        "memory": mem,
        "capped": {cap: {"ppl": c["ppl"], "nfe": c["nfe"]} for cap, c in capped.items()},
        "future_token_leak": leak,  # at the training threshold; None for the explicit stack
        "records": records,
        "model": model,
    }


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
