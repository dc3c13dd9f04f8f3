"""The DEQ-Transformer language model (Bai et al. 2019; 2021, Table 1 / Table 5).

One Transformer layer ``f`` is the map whose equilibrium is the model's hidden state:

    z* = f(z*; u, memory),   f = feed-forward o relative-position self-attention,

where ``u = W_inj emb(x)`` injects the input tokens into the queries, keys and values, and the
keys and values also see ``memory``: the equilibrium states (and injections) of the previous
segment, detached. The same ``f``, stacked ``N`` times and trained by ordinary backprop, is the
explicit weight-tied baseline and the pretraining mode.

Shapes: batch first. Tokens ``(B, L)``; hidden states ``(B, L, d)``; memory ``(B, M, d)`` and
``(B, M, 3 H Dh)``; the ``K = M + L`` keys cover memory then segment.

Post-LN (the DEQ default):  a = LN(z + Drop(Attn(cat[mem, z]; u))),  f = LN(a + Drop(FF(a))).
Pre-LN:  a = z + Drop(Attn(LN(cat[mem, z]); u)),  n = LN(a),  f = n + Drop(FF(n)). As in the
official code the feed-forward's residual adds the *normalized* ``n``, so ``f`` stays bounded.
LayerNorms have no learned gain (as there). All projections of ``f`` are weight-normalized,
dropout is variational (one mask per sample and channel, shared over positions and over every
call of one solve); both are held fixed for a whole step by :func:`deqlib.nn.once_per_step`.
The positional embedding (the sinusoids the attention's position term reads) is dropped too, one
mask per channel shared over positions, as the official code does. Attention probabilities are
not dropped (the release script's ``dropatt`` is 0.01).

The word embedding is adaptive (Baevski & Auli) and tied to torch's
``AdaptiveLogSoftmaxWithLoss``: the frequent words' vectors are the head's output rows, a rarer
cluster's vectors are its tail's output rows mapped up to ``d`` by the tail's own projection.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_bool, check_int, check_int_list, check_real
from ..deq import DEQ, DEQStats, SolverSettings
from ..nn import VariationalDropout, once_per_step, weight_norm
from ..step import StepOutput

__all__ = ["TransformerConfig", "Memory", "LMOutput", "DEQTransformerLM", "TransformerLayer", "AdaptiveInput"]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the DEQ-Transformer (Table 4's WikiText-103 column, release-script sizes).

    ``n_layer`` is the depth of the explicit weight-tied baseline, ``pretrain_layers`` that of
    the stack trained during the first ``pretrain_steps`` of a DEQ run. ``cutoffs`` split the
    vocabulary (sorted by frequency) into the adaptive softmax's head and tail clusters; tail
    ``i`` has width ``d_model // div_val**(i+1)``.
    """

    d_model: int = 700
    n_head: int = 10
    d_head: int = 70
    d_inner: int = 48000
    tgt_len: int = 150
    mem_len: int = 150
    dropout: float = 0.06
    pre_ln: bool = False
    cutoffs: tuple[int, ...] = (20000, 40000, 200000)
    div_val: float = 4.0
    n_layer: int = 18
    pretrain_layers: int = 2
    init_std: float = 0.01

    def __post_init__(self) -> None:
        for name in ("d_model", "n_head", "d_head", "d_inner", "tgt_len", "n_layer", "pretrain_layers"):
            check_int(name, getattr(self, name), 1)
        check_int("mem_len", self.mem_len, 0)
        check_real("dropout", self.dropout, minimum=0, maximum=1, max_open=True)
        check_bool("pre_ln", self.pre_ln)
        check_int_list("cutoffs", self.cutoffs, 1, increasing=True)
        check_real("div_val", self.div_val, minimum=1)
        check_real("init_std", self.init_std, minimum=0, min_open=True)
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (sinusoidal positions), got d_model={self.d_model}")
        if int(self.d_model // self.div_val ** len(self.cutoffs)) < 1:
            raise ValueError(f"div_val={self.div_val} leaves the last of {len(self.cutoffs)} tail clusters "
                             f"no width at d_model={self.d_model}")

    def check_vocab(self, n_token: int) -> None:
        """ValueError unless every cutoff lies inside a vocabulary of ``n_token`` words."""
        if self.cutoffs[-1] >= n_token:
            raise ValueError(f"cutoffs={list(self.cutoffs)} must all be below the vocabulary size {n_token}")


class Memory(NamedTuple):
    """The past ``M`` positions: equilibrium states ``z (B, M, d)`` and injections ``u (B, M, 3HDh)``."""

    z: Tensor
    u: Tensor


class Context(NamedTuple):
    """Everything ``f`` needs besides ``z``, fixed during a solve.

    ``u (B, K, 3HDh)`` injections of memory and segment; ``mem (B, M, d)``; ``pos (K, d)``
    sinusoids of the distances ``0..K-1``; ``dist (L, K)`` long: distance ``M + i - j`` from
    query ``i`` to key ``j`` (clamped at 0); ``mask (L, K)`` bool: True where key ``j`` lies
    after query ``i``.
    """

    u: Tensor
    mem: Tensor
    pos: Tensor
    dist: Tensor
    mask: Tensor


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:])


def _linear(d_in: int, d_out: int, std: float, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(lin.weight, 0.0, std)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class RelativeSelfAttention(nn.Module):
    """Transformer-XL attention: score(i, j) = (q_i + b_w).k_j + (q_i + b_r).r_{dist(i,j)}."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        H, Dh, d = cfg.n_head, cfg.d_head, cfg.d_model
        self.n_head, self.d_head, self.pre_ln = H, Dh, cfg.pre_ln
        self.qkv = weight_norm(_linear(d, 3 * H * Dh, cfg.init_std, bias=False))
        self.r_net = weight_norm(_linear(d, H * Dh, cfg.init_std, bias=False))
        self.out = weight_norm(_linear(H * Dh, d, cfg.init_std))
        self.bias_w = nn.Parameter(torch.randn(H, Dh) * cfg.init_std)  # content bias u of XL
        self.bias_r = nn.Parameter(torch.randn(H, Dh) * cfg.init_std)  # position bias v of XL

    def forward(self, z: Tensor, ctx: Context) -> Tensor:
        """``z (B, L, d)`` -> ``(B, L, d)`` (before dropout and the residual)."""
        B, L, _ = z.shape
        H, Dh = self.n_head, self.d_head
        keys = torch.cat([ctx.mem, z], dim=1)  # (B, K, d)
        if self.pre_ln:
            keys = _layer_norm(keys)
        qkv = self.qkv(keys) + ctx.u  # input injection
        q, k, v = qkv.chunk(3, dim=-1)
        K = k.shape[1]
        q = q[:, -L:].reshape(B, L, H, Dh)
        k, v = k.reshape(B, K, H, Dh), v.reshape(B, K, H, Dh)
        r = self.r_net(ctx.pos).reshape(K, H, Dh)  # one vector per distance
        content = torch.einsum("bihd,bjhd->bhij", q + self.bias_w, k)
        by_dist = torch.einsum("bihd,khd->bhik", q + self.bias_r, r)  # (B, H, L, distance)
        position = by_dist.gather(3, ctx.dist.expand(B, H, L, K))  # -> (B, H, L, key)
        score = (content + position) / math.sqrt(Dh)
        attn = score.masked_fill(ctx.mask, float("-inf")).softmax(dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(B, L, H * Dh)
        return self.out(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ff1 = weight_norm(_linear(cfg.d_model, cfg.d_inner, cfg.init_std))
        self.ff2 = weight_norm(_linear(cfg.d_inner, cfg.d_model, cfg.init_std))
        self.drop = VariationalDropout(cfg.dropout, shared_dims=(1,))

    def forward(self, x: Tensor) -> Tensor:
        return self.ff2(self.drop(torch.relu(self.ff1(x))))


class TransformerLayer(nn.Module):
    """``f(z, ctx)``: ``z (B, L, d)`` -> ``(B, L, d)``; Post-LN or Pre-LN by ``cfg.pre_ln``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = RelativeSelfAttention(cfg)
        self.ff = FeedForward(cfg)
        self.drop_attn = VariationalDropout(cfg.dropout, shared_dims=(1,))
        self.drop_ff = VariationalDropout(cfg.dropout, shared_dims=(1,))

    def forward(self, z: Tensor, ctx: Context) -> Tensor:
        a = z + self.drop_attn(self.attn(z, ctx))
        n = _layer_norm(a)
        if self.pre_ln:
            return n + self.drop_ff(self.ff(n))
        return _layer_norm(n + self.drop_ff(self.ff(n)))


class AdaptiveInput(nn.Module):
    """Adaptive word embedding sharing its weights with an ``AdaptiveLogSoftmaxWithLoss``.

    Token ``w < cutoffs[0]``: row ``w`` of the head's weight. Token in tail cluster ``i``: its
    row of the tail's output weight ``(n_i, d_i)`` times the tail's projection ``(d_i, d)``.
    Returns ``(B, L, d)`` scaled by ``sqrt(d)``.
    """

    def __init__(self, softmax: nn.AdaptiveLogSoftmaxWithLoss):
        super().__init__()
        self.softmax = [softmax]  # a list, so the shared module is not registered twice
        self.bounds = [0] + list(softmax.cutoffs)
        self.scale = math.sqrt(softmax.in_features)

    def forward(self, tokens: Tensor) -> Tensor:
        sm = self.softmax[0]
        flat = tokens.reshape(-1)
        out = flat.new_zeros(flat.shape[0], sm.in_features, dtype=sm.head.weight.dtype)
        for c in range(len(self.bounds) - 1):
            lo, hi = self.bounds[c], self.bounds[c + 1]
            sel = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            if c == 0:
                vec = F.embedding(flat[sel], sm.head.weight[:hi])
            else:
                proj, rows = sm.tail[c - 1][0].weight, sm.tail[c - 1][1].weight  # (d_c, d), (n_c, d_c)
                vec = F.embedding(flat[sel] - lo, rows) @ proj
            out = out.index_copy(0, sel, vec)
        return out.view(*tokens.shape, -1) * self.scale


@dataclass
class LMOutput:
    """``loss``: mean NLL of the targets; ``logprob (B, L)``: log-prob of each target;
    ``memory`` for the next segment (None when ``mem_len == 0``); ``stats`` of the solve (None
    for the explicit stack); ``hidden (B, L, d)``: the output states."""

    loss: Tensor
    logprob: Tensor
    memory: Memory | None
    stats: DEQStats | None
    hidden: Tensor


def _sinusoids(n: int, d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(n, d)``: row ``k`` is ``[sin(k w), cos(k w)]`` over ``d/2`` frequencies ``w``."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=dtype) / d))
    ang = torch.arange(n, device=device, dtype=dtype)[:, None] * inv[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class DEQTransformerLM(nn.Module):
    """Language model: adaptive embedding -> equilibrium of ``f`` (or ``N`` stacked ``f``) ->
    adaptive softmax.

    Args:
        cfg: sizes. n_token: vocabulary size. forward, backward: solver settings of the DEQ.
        explicit: True makes this the explicit baseline (always ``cfg.n_layer`` stacked ``f``).
        forward_jitter: each training step through ``forward`` (not pretraining, not :meth:`run`)
            lowers the forward threshold by a uniform draw from ``0..forward_jitter`` (torch's global
            generator, seeded per step by the loop), as the official ``rand_f_thres_delta``; 0: no draw.

    Two ways in: :meth:`run` (tokens, targets, memory in; :class:`LMOutput` out) and, for
    :func:`deqlib.train.train`, ``forward(batch, pretrain)`` with ``batch = (inputs, targets,
    position)`` from :class:`deqlib.data.wikitext.LMStream`; that one keeps the memory of the
    last segment itself (part of the state dict, so it survives a checkpoint) and uses it when
    ``position`` says the batch is the next segment of the same rows.
    """

    def __init__(self, cfg: TransformerConfig, n_token: int, forward: SolverSettings | None = None,
                 backward: SolverSettings | None = None, explicit: bool = False, forward_jitter: int = 0):
        super().__init__()
        cfg.check_vocab(n_token)
        self.cfg, self.n_token, self.explicit = cfg, n_token, explicit
        d, HD = cfg.d_model, cfg.n_head * cfg.d_head
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(d, n_token, list(cfg.cutoffs), div_value=cfg.div_val)
        for p in self.softmax.parameters():
            nn.init.normal_(p, 0.0, cfg.init_std)
        self.embed = AdaptiveInput(self.softmax)
        self.inject = _linear(d, 3 * HD, cfg.init_std)
        self.layer = TransformerLayer(cfg)
        self.deq = DEQ(self.layer, forward, backward, backward="implicit")
        self.drop_in = VariationalDropout(cfg.dropout, shared_dims=(1,))
        self.drop_out = VariationalDropout(cfg.dropout, shared_dims=(1,))
        self.drop_pos = VariationalDropout(cfg.dropout, shared_dims=(0,))  # (K, d): one mask per channel
        check_int("forward_jitter", forward_jitter, 0)
        if forward_jitter >= self.deq.forward_solver.max_iter:
            raise ValueError(f"forward_jitter must be below the forward threshold "
                             f"{self.deq.forward_solver.max_iter}, got forward_jitter={forward_jitter}")
        self.forward_jitter = int(forward_jitter)
        self._memory: Memory | None = None
        self._memory_at: tuple[int, int, int] | None = None  # (epoch, segment, rank) it came from

    def context(self, u_new: Tensor, memory: Memory | None) -> Context:
        B, L, _ = u_new.shape
        if memory is None:
            memory = self.empty_memory(B, u_new)
        M = memory.z.shape[1]
        K = M + L
        i = torch.arange(L, device=u_new.device)[:, None]
        j = torch.arange(K, device=u_new.device)[None, :]
        dist = M + i - j
        return Context(u=torch.cat([memory.u, u_new], dim=1), mem=memory.z,
                       pos=self.drop_pos(_sinusoids(K, self.cfg.d_model, u_new.device, u_new.dtype)),
                       dist=dist.clamp(min=0), mask=dist < 0)

    def empty_memory(self, batch: int, like: Tensor) -> Memory:
        cfg = self.cfg
        return Memory(like.new_zeros(batch, 0, cfg.d_model), like.new_zeros(batch, 0, 3 * cfg.n_head * cfg.d_head))

    def run(self, inputs: Tensor, targets: Tensor, memory: Memory | None = None, *,
            layers: int | None = None, forward_solver: SolverSettings | None = None) -> LMOutput:
        """One segment. ``inputs, targets (B, L)`` int64; ``memory`` of earlier segments.

        ``layers``: stack ``f`` that many times from ``z = 0`` (explicit) instead of solving;
        None solves for the equilibrium (or, for the explicit baseline, stacks ``cfg.n_layer``).
        ``forward_solver`` overrides the forward solve (e.g. a hard NFE cap).
        """
        if inputs.shape != targets.shape or inputs.dim() != 2:
            raise ValueError(f"inputs and targets must both be (B, L), got {tuple(inputs.shape)} "
                             f"and {tuple(targets.shape)}")
        if self.explicit and layers is None:
            layers = self.cfg.n_layer
        B, L = inputs.shape
        d = self.cfg.d_model
        with once_per_step(self):
            u_new = self.inject(self.drop_in(self.embed(inputs)))
            ctx = self.context(u_new, memory)
            z = u_new.new_zeros(B, L, d)
            stats = None
            if layers is not None:
                for _ in range(layers):
                    z = self.layer(z, ctx)
            else:
                z, stats = self.deq(ctx, z, forward_solver=forward_solver)
            out = self.softmax(self.drop_out(z).reshape(B * L, d), targets.reshape(-1))
        new_memory = None
        if self.cfg.mem_len > 0:
            keep = self.cfg.mem_len
            new_memory = Memory(torch.cat([ctx.mem, z], dim=1)[:, -keep:].detach(),
                                ctx.u[:, -keep:].detach())
        return LMOutput(loss=out.loss, logprob=out.output.view(B, L), memory=new_memory, stats=stats,
                        hidden=z)

    def equilibrium_pair(self, inputs: Tensor, memory: Memory | None = None,
                         forward_solver: SolverSettings | None = None,
                         solve: bool | None = None) -> tuple[Tensor, Tensor, DEQStats | None]:
        """``(z, f(z), stats)`` for Jacobian measurements of ``f`` on one segment: ``z (B, L*d)``
        a leaf at the equilibrium (the explicit stack: its output after ``cfg.n_layer`` layers)
        and ``f(z)`` computed from it with autograd, ``stats`` of the solve (None for the stack).
        ``inputs (B, L)``; dropout as the module's mode says (call it in ``eval()``). ``solve``:
        True solves the explicit stack's layer too (None: as the model is used)."""
        B, L, d = *inputs.shape, self.cfg.d_model
        with once_per_step(self):
            with torch.no_grad():
                ctx = self.context(self.inject(self.drop_in(self.embed(inputs))), memory)
                z, stats = ctx.u.new_zeros(B, L, d), None
                if not (not self.explicit if solve is None else solve):
                    for _ in range(self.cfg.n_layer):
                        z = self.layer(z, ctx)
                else:
                    z, stats = self.deq(ctx, z, forward_solver=forward_solver)
                    z = stats.forward.z.view(B, L, d)  # the best iterate, not one step past it
            z = z.reshape(B, L * d).detach().requires_grad_()
            with torch.enable_grad():
                fz = self.layer(z.view(B, L, d), ctx).reshape(B, L * d)
        return z, fz, stats

    # --- training through deqlib.train: the memory is carried from step to step ---------------
    def forward(self, batch: tuple[Tensor, Tensor, Tensor], pretrain: bool = False) -> StepOutput:
        inputs, targets, position = batch
        at = tuple(int(v) for v in position.tolist())
        memory = self._recall(at, inputs)
        layers = self.cfg.pretrain_layers if pretrain and not self.explicit else None
        solver = None
        if self.forward_jitter and layers is None and not self.explicit:
            cut = int(torch.randint(0, self.forward_jitter + 1, ()))
            solver = self.deq.forward_solver.replace(max_iter=self.deq.forward_solver.max_iter - cut)
        out = self.run(inputs, targets, memory, layers=layers, forward_solver=solver)
        self._memory, self._memory_at = out.memory, at
        return StepOutput(loss=out.loss, stats=out.stats,
                          metrics={"mem_len": float(memory.z.shape[1]) if memory is not None else 0.0})

    def _recall(self, at: tuple[int, int, int], inputs: Tensor) -> Memory | None:
        epoch, i, rank = at
        if i == 0 or self._memory is None:
            if i > 0:
                warnings.warn(f"no memory for segment {i} of epoch {epoch} (rank {rank}); starting empty", stacklevel=2)
            return None
        if self._memory_at != (epoch, i - 1, rank) or self._memory.z.shape[0] != inputs.shape[0]:
            warnings.warn(f"the memory held is from {self._memory_at}, not the segment before "
                          f"{at}; starting empty", stacklevel=2)
            return None
        return Memory(*(t.to(inputs.device) for t in self._memory))

    def get_extra_state(self) -> dict:
        mem = None if self._memory is None else tuple(t.detach().cpu() for t in self._memory)
        return {"memory": mem, "memory_at": self._memory_at}

    def set_extra_state(self, state: dict) -> None:
        mem = state.get("memory")
        self._memory = None if mem is None else Memory(*mem)
        self._memory_at = None if state.get("memory_at") is None else tuple(state["memory_at"])

    def reset_memory(self) -> None:
        self._memory = self._memory_at = None
