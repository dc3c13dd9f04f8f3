"""What the WikiText notebook measures on a trained DEQ-Transformer: perplexity (at the
training threshold or a hard NFE cap), the Jacobian of ``f`` on a fixed batch (the training
loop's monitor), plain-iteration NFE to a tolerance, memory, and how far a stopped solve lets
later tokens in."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...data.wikitext import batchify
from ...deq import SolverSettings
from ...jacobian import JacobianPenalty
from ...measure import peak_memory, saved_tensor_bytes
from ...models.transformer import DEQTransformerLM, Memory
from ..core import jacobian_at_equilibrium, nfe_to_tol

__all__ = ["unigram_perplexity", "evaluate", "future_token_leak", "activation_memory", "step_peak_memory",
           "FixedBatch", "fixed_batch", "jacobian_monitor", "plain_nfe"]


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


def _full_memory(model: DEQTransformerLM, batch: int) -> Memory | None:
    cfg = model.cfg
    if not cfg.mem_len:
        return None
    ref = next(model.parameters())
    return Memory(ref.new_zeros(batch, cfg.mem_len, cfg.d_model),
                  ref.new_zeros(batch, cfg.mem_len, 3 * cfg.n_head * cfg.d_head))


def _training_step(model: DEQTransformerLM, inputs: Tensor, targets: Tensor, penalty: JacobianPenalty | None,
                   layers: int | None = None) -> Callable[[], Tensor]:
    """The loss of one training step on ``inputs (B, L)`` after a full memory of zeros, the
    penalty term (drawn, weight ``penalty.gamma``) included if given."""
    memory = _full_memory(model, inputs.shape[0])

    def step() -> Tensor:
        out = model.run(inputs, targets, memory, layers=layers)
        loss = out.loss
        if penalty is not None and out.stats is not None:
            z, fz = out.stats.jacobian_inputs()
            loss = loss + penalty.loss(z, fz, 0, 1)[0]
        return loss

    return step


def activation_memory(model: DEQTransformerLM, inputs: Tensor, targets: Tensor,
                      penalty: JacobianPenalty | None = None) -> dict:
    """Bytes autograd saves for backward in one training step on ``inputs (B, L)`` with a full
    memory of ``mem_len`` positions (zeros), Jacobian penalty term included if given.

    ``total``: the whole step; ``core``: minus a step with no layer at all (embedding,
    injection and adaptive softmax only), i.e. what the Transformer layer(s) add. On CUDA also
    ``cuda_peak``: peak allocated bytes of forward + backward above what was allocated before.
    """
    was_training = model.training
    model.train()
    result = {}
    loss, result["total"] = saved_tensor_bytes(_training_step(model, inputs, targets, penalty))
    del loss
    _, shell = saved_tensor_bytes(_training_step(model, inputs, targets, penalty, layers=0))
    result["core"] = result["total"] - shell
    ref = next(model.parameters())
    if ref.is_cuda:
        step = _training_step(model, inputs, targets, penalty)
        result["cuda_peak"] = peak_memory(lambda: step().backward(), ref.device).nbytes
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    return result


def step_peak_memory(model: DEQTransformerLM, inputs: Tensor, targets: Tensor,
                     penalty: JacobianPenalty | None = None) -> dict:
    """Peak memory of one training step (forward solve with the solver's history, the loss,
    the penalty term if given, the backward with its solve) on ``inputs (B, L)`` after a full
    memory, by :func:`deqlib.measure.peak_memory`.

    ``peak``: the whole step; ``shell``: a step with no layer (embedding, injection, adaptive
    softmax); ``core``: ``peak - shell``, the paper's "excluding embeddings" as near as a peak
    allows (peaks do not add; the two steps' peaks come at different moments); ``counted``:
    what the device's figure counts."""
    was_training = model.training
    model.train()
    out = {}
    for name, layers in (("peak", None), ("shell", 0)):
        step = _training_step(model, inputs, targets, penalty, layers)
        measured = peak_memory(lambda step=step: step().backward(), next(model.parameters()).device)
        out[name], out["counted"] = measured.nbytes, measured.counted
        model.zero_grad(set_to_none=True)
    out["core"] = out["peak"] - out["shell"]
    model.train(was_training)
    return out


class FixedBatch:
    """The fixed evaluation batch the monitor measures on: the second segment of the
    evaluation stream batchified to ``n`` streams, ``inputs (n, L)``, after the first."""

    def __init__(self, tokens: Tensor, n: int, tgt_len: int):
        data = batchify(tokens, n)
        if data.shape[1] < 2 * tgt_len + 1:
            raise ValueError(f"{tokens.numel()} evaluation tokens make no second segment of tgt_len={tgt_len} "
                             f"over {n} streams")
        self.first, self.first_targets = data[:, :tgt_len], data[:, 1:tgt_len + 1]
        self.inputs = data[:, tgt_len:2 * tgt_len]

    @torch.no_grad()
    def memory(self, model: DEQTransformerLM) -> Memory | None:
        return model.run(self.first, self.first_targets).memory


def fixed_batch(tokens: Tensor, n: int, tgt_len: int) -> FixedBatch:
    return FixedBatch(tokens, n, tgt_len)


def jacobian_monitor(batch: FixedBatch, n_probes: int = 4, radius_iters: int = 150, radius_vectors: int = 8,
                     seed: int = 0) -> Callable[[nn.Module], dict[str, float]]:
    """A ``monitor`` for :func:`deqlib.train.train`: ``||J_f||_F / sqrt(d)`` and the spectral
    radius of ``J_f`` at the equilibrium of the fixed ``batch`` (for the explicit stack, at its
    output), means over its streams, with the subspace iteration's error estimate and the
    forward solve's NFE and residual there. NaN where the model has gone non-finite."""

    def monitor(model: nn.Module) -> dict[str, float]:
        memory = batch.memory(model)
        z, fz, stats = model.equilibrium_pair(batch.inputs, memory)
        out = {"mon_fwd_nfe": float(stats.forward.nfe) if stats is not None else math.nan,
               "mon_fwd_res": float(stats.forward.rel_residual.mean()) if stats is not None else math.nan}
        nan = {"mon_jac_fro": math.nan, "mon_radius": math.nan, "mon_radius_max": math.nan,
               "mon_radius_err": math.nan}
        if not (bool(torch.isfinite(z).all()) and bool(torch.isfinite(fz).all())):
            return {**out, **nan}
        jac = jacobian_at_equilibrium(z, fz, n_probes=n_probes, seed=seed, n_iter=radius_iters,
                                      n_vectors=radius_vectors)
        out.update(mon_jac_fro=float(jac["jac_fro"].mean()), mon_radius=float(jac["spectral_radius"].mean()),
                   mon_radius_max=float(jac["spectral_radius"].max()),
                   mon_radius_err=float(jac["spectral_radius_error"].mean()))
        return out

    return monitor


@torch.no_grad()
def plain_nfe(model: DEQTransformerLM, batch: FixedBatch, tol: float, cap: int) -> dict[str, float]:
    """Plain fixed-point iteration of ``f`` on the fixed batch from ``z = 0`` (the explicit
    stack's layer too), at most ``cap`` calls: per stream the calls until the relative residual
    is below ``tol``. ``mean``: over the streams that got there; ``reached``: their share;
    ``capped_mean``: every stream, those that did not get there counted at ``cap`` (a lower
    bound). Its count follows the contraction factor of ``f`` near its fixed point."""
    was_training = model.training
    model.eval()
    solver = SolverSettings("fixed_point", cap, tol * 1e-3)  # run past tol: measure, not stop
    _, _, stats = model.equilibrium_pair(batch.inputs, batch.memory(model), forward_solver=solver, solve=True)
    model.train(was_training)
    n = nfe_to_tol(stats.forward.rel_trace, tol)
    hit = n > 0
    return {"mean": float(n[hit].double().mean()) if bool(hit.any()) else math.nan,
            "reached": float(hit.double().mean()),
            "capped_mean": float(torch.where(hit, n, torch.full_like(n, cap)).double().mean())}
