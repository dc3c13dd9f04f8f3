"""The seeded problems ``z = f(z)`` the solvers are compared on, and the calibration that
makes each as hard as asked.

Each builder gives a batched map on flat states ``(B, D)``, a start point and ``dL/dz*`` of the
loss ``L = <w, z*>``. Every kind has a harder variant, the same map moved along a one-parameter
family so that plain iteration contracts slowly (spectral radius near 1): a scale of its
residual branch (synthetic, conv) or, for the real MDEQ and DEQ-Transformer maps, a point on the
path between the map as initialized and a Jacobian-regularized copy of it
(:func:`contraction_path`). :class:`ConvMap`, calibrated by :func:`calibrated_conv_map`, is also
the map of ``python -m deqlib.bench solvers``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...checks import check_int_list
from ...deq import StatePacker
from ...jacobian import frobenius_sq_per_dim
from ...models.mdeq import MultiscaleMap, Stem
from ...models.synthetic import SyntheticMap, SyntheticModelConfig
from ...models.transformer import Context, DEQTransformerLM, Memory
from ...nn import remove_weight_norm
from ...solvers import solve
from .config import KINDS, PROBLEMS, SolversExperiment

__all__ = ["CONV_GROUPS", "ConvMap", "calibrate_scale", "calibrated_conv_map", "FlatMap", "Problem",
           "contraction_path", "LayerMap", "build_problem"]


CONV_GROUPS = 8  # GroupNorm groups of the ``solvers`` benchmark's map: its channels must be a multiple


class ConvMap(nn.Module):
    """``f(z) = GroupNorm(s * conv2(relu(conv1(z))) + x)``: an MDEQ-sized residual branch.

    Shapes: ``z, x: (B, C, H, W)``. ``s`` sets the contraction.
    """

    def __init__(self, channels: int, x: Tensor, scale: float = 1.0, groups: int = CONV_GROUPS):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, channels)
        self.register_buffer("x", x)  # a buffer: ``.double()`` and ``.to()`` carry the input along
        self.scale = scale

    def forward(self, z: Tensor) -> Tensor:
        return self.norm(self.scale * self.conv2(torch.relu(self.conv1(z))) + self.x)


def _plain_nfe(f: Callable[[Tensor], Tensor], z0: Tensor, tol: float, cap: int = 80) -> int:
    """Calls plain iteration needs to reach ``tol``; ``cap + 1`` when it does not (so that a
    diverging run, stopped early, never reads as a fast one)."""
    res = solve(f, z0, method="fixed_point", max_iter=cap, tol=tol)
    return res.nfe if res.status == "converged" else cap + 1


def calibrate_scale(
    set_scale: Callable[[float], Callable[[Tensor], Tensor]], z0: Tensor, tol: float,
    target: tuple[int, int] = (20, 40), hi: float = 64.0, steps: int = 30,
) -> float:
    """The scale ``s`` at which plain iteration of ``set_scale(s)`` from ``z0`` needs between
    ``target[0]`` and ``target[1]`` calls to reach ``tol`` (bisection on ``[0, hi]``).

    ``set_scale(s)`` returns the map at scale ``s``; larger ``s`` must mean slower convergence.
    Plain iteration stops at ``target[1] + 1`` calls, when the verdict "too slow" is known.
    Returns the last scale tried (the bisection stops as soon as one lands in ``target``).
    """
    check_int_list("target", target, 1, length=2, nondecreasing=True)  # (lo, hi) calls
    lo, mid = 0.0, 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        nfe = _plain_nfe(set_scale(mid), z0, tol, cap=target[1] + 1)
        if nfe < target[0]:
            lo = mid
        elif nfe > target[1]:
            hi = mid
        else:
            break
    return mid


def calibrated_conv_map(
    batch: int, channels: int, size: int, tol: float, seed: int = 0, target: tuple[int, int] = (20, 40)
) -> ConvMap:
    """A seeded ConvMap whose plain iteration needs ``target`` calls to reach ``tol``.

    The scale is found by bisection on a batch of 4 (:func:`calibrate_scale`); the full batch
    may need a few calls more or less.
    """
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, size, size)
    f = ConvMap(channels, x[:4]).eval()

    def set_scale(s: float) -> ConvMap:
        f.scale = s
        return f

    f.scale = calibrate_scale(set_scale, torch.zeros_like(x[:4]), tol, target)
    f.x = x
    return f


class FlatMap(nn.Module):
    """``f`` on flat states: ``(B, D) -> (B, D)``, the input ``x`` held as a buffer.

    ``inner`` is called as ``inner(state)`` when ``x`` is None, else ``inner(state, x)``;
    ``state`` is a tensor or a list of tensors shaped like ``example`` (one per scale).
    """

    def __init__(self, inner: nn.Module, example: Tensor | Sequence[Tensor], x: Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.packer = StatePacker(example)
        self.register_buffer("x", x)

    def forward(self, z: Tensor) -> Tensor:
        state = self.packer.unpack(z)
        out = self.inner(state) if self.x is None else self.inner(state, self.x)
        return self.packer.pack(out)


@dataclass
class Problem:
    """A seeded fixed-point problem ``z = f(z)`` on a batch, with what the gradient needs.

    Attributes:
        name: registry name. description: one line for tables.
        f: ``(B, D) -> (B, D)`` module, samples independent; its parameters are what the
            gradient is taken with respect to.
        z0: ``(B, D)`` start point. grad_out: ``(B, D)`` ``dL/dz*`` of ``L = <grad_out, z*>``.
        scale: the calibrated contraction knob (what makes the ``_hard`` variant hard).
    """

    name: str
    description: str
    f: nn.Module
    z0: Tensor
    grad_out: Tensor
    scale: float

    def params(self) -> list[Tensor]:
        return [p for p in self.f.parameters() if p.requires_grad]

    def to(self, target: torch.dtype | torch.device) -> Problem:
        """A copy in ``target``, a dtype (same numbers, e.g. float64 for a reference solve) or
        a device."""
        return Problem(self.name, self.description, copy.deepcopy(self.f).to(target),
                       self.z0.to(target), self.grad_out.to(target), self.scale)


def _grad_out(shape: torch.Size, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(shape, generator=g) / math.sqrt(shape[0])


def _synthetic(exp: SolversExperiment, target: tuple[int, int], name: str) -> Problem:
    """The synthetic map with seeded N(0, 1) weights, ``W2 = s |N(0, 1)| / hidden`` (positive,
    so ``f >= 0`` and ``z*`` stays off 0, where the per-sample relative residual is ill-posed),
    ``x ~ U(-2, 2)``; ``s`` calibrated to ``target``."""
    spec = exp.synthetic
    g = torch.Generator().manual_seed(exp.seed)
    with torch.random.fork_rng():  # the module's own init draws from the global RNG
        inner = SyntheticMap(SyntheticModelConfig(hidden=spec.hidden))
    h = spec.hidden
    w2 = torch.randn(h, 1, generator=g).abs() / h
    with torch.no_grad():
        inner.W1.copy_(torch.randn(h, 1, generator=g))
        inner.U.copy_(torch.randn(h, 1, generator=g))
        inner.b.copy_(torch.randn(h, generator=g))
    x = torch.rand(spec.batch, 1, generator=g) * 4 - 2
    f = FlatMap(inner, torch.zeros(spec.batch, 1), x)
    z0 = torch.zeros(spec.batch, 1)

    def set_scale(s: float) -> FlatMap:
        with torch.no_grad():
            inner.W2.copy_(w2 * s)
        return f

    scale = calibrate_scale(set_scale, z0, exp.tol, target)
    set_scale(scale)
    desc = f"synthetic 2-layer ReLU, hidden {h}, batch {spec.batch}, D=1"
    return Problem(name, desc, f, z0, _grad_out(z0.shape, exp.seed), scale)


def _conv(exp: SolversExperiment, target: tuple[int, int], name: str) -> Problem:
    """The calibrated :class:`ConvMap` (GroupNorm(s conv(relu(conv z)) + x)) at CIFAR size."""
    spec = exp.conv
    with torch.random.fork_rng():  # calibrated_conv_map seeds the global RNG
        inner = calibrated_conv_map(spec.batch, spec.channels, spec.size, exp.tol, exp.seed, tuple(target))
    shape = (spec.batch, spec.channels, spec.size, spec.size)
    f = FlatMap(inner, torch.zeros(shape))
    z0 = torch.zeros(spec.batch, spec.channels * spec.size**2)
    desc = f"conv residual branch + GN, {spec.channels} ch {spec.size}x{spec.size}, batch {spec.batch}"
    return Problem(name, desc, f, z0, _grad_out(z0.shape, exp.seed), float(inner.scale))


def contraction_path(f: nn.Module, z0: Tensor, steps: int, lr: float, seed: int) -> Callable[[float], nn.Module]:
    """A one-parameter family of maps from a Jacobian-regularized copy of ``f`` (``t = 0``) to
    ``f`` as it is (``t = 1``); returns ``at(t)``, which sets ``f``'s parameters to
    ``theta_reg + t (theta_init - theta_reg)`` and returns ``f``.

    Why: the MDEQ and DEQ-Transformer maps are normalized (GroupNorm, LayerNorm), so scaling a
    branch does not change how fast they contract, and at initialization plain iteration does
    not reach 1e-3 in 300 calls (MDEQ: residual stuck near 0.8; Transformer: near 4e-3). What
    makes trained DEQs contractive is training, with the Jacobian penalty the paper's lever.
    ``theta_reg`` is ``steps`` Adam steps (rate ``lr``) on that penalty alone,
    ``||J_f(z)||_F^2 / d`` (one seeded probe), at the states plain iteration visits (three
    calls between steps); no task loss is involved.

    Args:
        f: ``(B, D) -> (B, D)`` module; its trainable parameters are moved.
        z0: ``(B, D)`` start of the walk.
    """
    params = [p for p in f.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device=z0.device).manual_seed(seed)
    z = z0
    for _ in range(steps):
        with torch.no_grad():
            for _ in range(3):
                z = f(z)
        zz = z.detach().requires_grad_()
        penalty = frobenius_sq_per_dim(zz, f(zz), 1, create_graph=True, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        penalty.backward()
        opt.step()
    end = [p.detach().clone() for p in params]

    def at(t: float) -> nn.Module:
        with torch.no_grad():
            for p, reg, init in zip(params, end, start):
                p.copy_(torch.lerp(reg, init, float(t)))
        return f

    return at


def _on_path(exp: SolversExperiment, target: tuple[int, int], name: str, f: nn.Module, z0: Tensor,
             description: str) -> Problem:
    """Calibrate ``t`` on :func:`contraction_path` so plain iteration needs ``target`` calls."""
    at = contraction_path(f, z0, exp.contract_steps, exp.contract_lr, exp.seed)
    t = calibrate_scale(at, z0, exp.tol, target, hi=1.0)
    at(t)
    return Problem(name, description, f, z0, _grad_out(z0.shape, exp.seed).to(z0.device), t)


def _mdeq(exp: SolversExperiment, target: tuple[int, int], name: str) -> Problem:
    """The MDEQ's multiscale map on seeded N(0, 1) images (their stem's output is the injection)."""
    spec, dev = exp.mdeq, exp.torch_device()
    cfg = spec.config()
    with torch.random.fork_rng(devices=[]):  # module initialization draws from the global RNG
        torch.manual_seed(exp.seed)
        inner, stem = MultiscaleMap(cfg), Stem(cfg)
    g = torch.Generator().manual_seed(exp.seed)
    images = torch.randn(spec.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    with torch.no_grad():
        x = stem(images)
    example = [torch.zeros(spec.batch, c, s, s) for c, s in zip(cfg.channels, cfg.sizes)]
    f = FlatMap(inner.eval(), example, x).to(dev)
    z0 = f.packer.pack(example).to(dev)
    sizes = "/".join(f"{c}@{s}x{s}" for c, s in zip(cfg.channels, cfg.sizes))
    desc = f"MDEQ map, scales {sizes}, batch {spec.batch}"
    return _on_path(exp, target, name, f, z0, desc)


class LayerMap(nn.Module):
    """A Transformer layer as a map of its state alone, ``z (B, L, d) -> (B, L, d)``; the
    segment's context (injections, memory, positions, mask) is held in buffers, so ``.to()``
    moves and converts it with the layer."""

    def __init__(self, layer: nn.Module, ctx: Context):
        super().__init__()
        self.layer = layer
        for key, value in ctx._asdict().items():
            self.register_buffer(key, value)

    def forward(self, z: Tensor) -> Tensor:
        return self.layer(z, Context(self.u, self.mem, self.pos, self.dist, self.mask))


def _transformer(exp: SolversExperiment, target: tuple[int, int], name: str) -> Problem:
    """A Post-LN DEQ-Transformer layer on a segment of seeded tokens after a full memory
    (memory states N(0, 1), the scale of layer-normalized equilibria)."""
    spec, dev = exp.transformer, exp.torch_device()
    cfg = spec.config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(exp.seed)
        lm = DEQTransformerLM(cfg, spec.vocab).eval()
    B, L, M, d = spec.batch, cfg.tgt_len, cfg.mem_len, cfg.d_model
    g = torch.Generator().manual_seed(exp.seed)
    tokens = torch.randint(0, spec.vocab, (B, M + L), generator=g)
    with torch.no_grad():
        u = lm.inject(lm.embed(tokens))
        ctx = lm.context(u[:, M:], Memory(torch.randn(B, M, d, generator=g), u[:, :M]))
    for module in lm.layer.modules():  # fold g * v / ||v|| into plain weights, as once_per_step would
        if "weight_g" in module._parameters:
            remove_weight_norm(module)
    f = FlatMap(LayerMap(lm.layer, ctx), torch.zeros(B, L, d)).to(dev)
    z0 = torch.zeros(B, L * d, device=dev)
    desc = f"Post-LN Transformer layer, d {d}, {cfg.n_head} heads, inner {cfg.d_inner}, L {L} + mem {M}, batch {B}"
    return _on_path(exp, target, name, f, z0, desc)


# name -> builder(exp, calibration target, name); "_hard" variants use exp.hard_nfe.
_KINDS: dict[str, Callable[[SolversExperiment, tuple[int, int], str], Problem]] = {
    "synthetic": _synthetic,
    "conv": _conv,
    "mdeq": _mdeq,
    "transformer": _transformer,
}
if tuple(_KINDS) != KINDS:  # config.py names the kinds (it checks problem names without building any)
    raise RuntimeError(f"the builders {tuple(_KINDS)} must be config.KINDS {KINDS}")


def build_problem(name: str, exp: SolversExperiment) -> Problem:
    """The problem ``name`` (see :data:`PROBLEMS`), built deterministically from ``exp.seed``,
    on ``exp``'s device."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {list(PROBLEMS)}")
    kind, hard = (name[:-5], True) if name.endswith("_hard") else (name, False)
    target = tuple(exp.hard_nfe if hard else exp.easy_nfe)
    problem = _KINDS[kind](exp, target, name)
    dev, at = exp.torch_device(), problem.z0.device
    same = at.type == dev.type and (dev.index is None or at.index == dev.index)
    return problem if same else problem.to(dev)
