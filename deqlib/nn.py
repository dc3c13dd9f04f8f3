"""Layers whose randomness and reparametrization must hold still for a whole equilibrium solve.

A DEQ calls ``f`` tens of times per training step. Two things must then be drawn or computed
once per step, not once per call:

- weight normalization ``w = g * v / ||v||``: recomputing it in every solver iteration wastes
  time and, worse, would leave the backward graph with one copy per call;
- variational ("locked") dropout: a fresh mask per call would make ``f`` a different map at
  every iteration, and the solver would chase a moving target.

Both are governed by one context manager, :func:`once_per_step`::

    with once_per_step(model):
        z, stats = model.deq(x, z0)   # every f call shares one weight and one dropout mask

Outside the context each call computes its weights afresh and draws a fresh dropout mask, which
is ordinary (correct, slower) behaviour for non-equilibrium use.
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .checks import check_int, check_real

__all__ = [
    "weight_norm",
    "remove_weight_norm",
    "VariationalDropout",
    "once_per_step",
    "group_norm",
]


class _WeightNorm:
    """Forward pre-hook that sets ``module.<name>`` from ``<name>_g`` and ``<name>_v``."""

    def __init__(self, name: str, dim: int):
        self.name, self.dim = name, dim
        self.cached: Tensor | None = None

    def compute(self, module: nn.Module) -> Tensor:
        g = getattr(module, self.name + "_g")
        v = getattr(module, self.name + "_v")
        return torch._weight_norm(v, g, self.dim)

    def __call__(self, module: nn.Module, inputs: object) -> None:
        setattr(module, self.name, self.cached if self.cached is not None else self.compute(module))

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) made inside ``once_per_step`` must not take the step's
        # weight along: it is no graph leaf, and the copy's hook would keep it for good.
        return {**self.__dict__, "cached": None}


class _DetachWeight:
    """Forward hook that leaves ``module.<name>`` detached once the call is over: a plain
    attribute that still carried the step's graph made ``copy.deepcopy(module)`` fail (only
    graph leaves can be deep-copied) and kept that graph alive until the next call."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module: nn.Module, inputs: object, output: object) -> None:
        setattr(module, self.name, getattr(module, self.name).detach())


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Reparametrize ``module.<name>`` as ``g * v / ||v||`` (norm over all dims but ``dim``).

    Returns ``module``, now with parameters ``<name>_g`` (shape 1 on every dim but ``dim``) and
    ``<name>_v`` in place of ``<name>``. At creation ``g = ||w||``, so the function is unchanged.
    """
    check_int("dim", dim)
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _WeightNorm) and hook.name == name:
            raise ValueError(f"weight_norm applied twice to {name!r} of {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{type(module).__name__} has no parameter named {name!r}")
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"dim={dim} out of range for a {weight.dim()}-d weight")
    hook = _WeightNorm(name, dim % weight.dim())
    del module._parameters[name]
    g = torch.norm_except_dim(weight.detach(), 2, hook.dim)
    module.register_parameter(name + "_g", nn.Parameter(g.clone()))
    module.register_parameter(name + "_v", nn.Parameter(weight.detach().clone()))
    setattr(module, name, hook.compute(module).detach())  # a plain attribute until the first call
    module.register_forward_pre_hook(hook)
    module.register_forward_hook(_DetachWeight(name), always_call=True)  # a failed call too
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold ``<name>_g`` and ``<name>_v`` back into one parameter ``<name>``."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, _WeightNorm) and hook.name == name:
            weight = hook.compute(module).detach()
            del module._forward_pre_hooks[key]
            for post_key, post in list(module._forward_hooks.items()):
                if isinstance(post, _DetachWeight) and post.name == name:
                    del module._forward_hooks[post_key]
            del module._parameters[name + "_g"], module._parameters[name + "_v"]
            delattr(module, name)
            module.register_parameter(name, nn.Parameter(weight))
            return module
    raise ValueError(f"no weight_norm on {name!r} of {type(module).__name__}")


class VariationalDropout(nn.Module):
    """Dropout with one mask shared along ``shared_dims`` and, inside :func:`once_per_step`,
    across every call.

    Args:
        p: drop probability in ``[0, 1)``.
        shared_dims: dims over which the mask is constant. The default ``None`` shares it over
            every dim after the first two, i.e. one mask entry per (sample, channel) for a
            ``(B, C, H, W)`` feature map or a ``(B, C, L)`` sequence. For ``(B, L, C)`` use
            ``shared_dims=(1,)``.

    The mask is drawn on the input's device with the input's dtype, scaled by ``1/(1-p)``.
    In ``eval()`` mode, or with ``p == 0``, the layer is the identity.
    """

    def __init__(self, p: float, shared_dims: Sequence[int] | None = None):
        super().__init__()
        check_real("p", p, minimum=0, maximum=1, max_open=True)
        self.p = float(p)
        self.shared_dims = None if shared_dims is None else tuple(int(d) for d in shared_dims)
        self._locked = False
        self._masks: dict[tuple, Tensor] = {}  # inside once_per_step: one per input shape, dtype, device

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"

    def _draw(self, x: Tensor) -> Tensor:
        shared = self.shared_dims if self.shared_dims is not None else tuple(range(2, x.dim()))
        shape = [1 if d in shared or d - x.dim() in shared else n for d, n in enumerate(x.shape)]
        keep = 1.0 - self.p
        return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep) / keep

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self._locked:
            return x * self._draw(x)
        # Keyed by the whole input shape: a mask drawn for batch 1 must not broadcast over a
        # batch of 4 (one mask for every sample), and 4 -> 3 -> 4 in one step gets its first back.
        key = (tuple(x.shape), x.dtype, x.device)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = self._draw(x)
        return x * mask


@contextmanager
def once_per_step(module: nn.Module) -> Iterator[None]:
    """Within the block, weight-normalized weights are computed once (at entry, in the grad
    mode of the entry) and each :class:`VariationalDropout` draws one mask on first use and
    keeps it. Both are released at exit. Nested use is a no-op for modules already held."""
    hooks: list[_WeightNorm] = []
    drops: list[VariationalDropout] = []
    for m in module.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, _WeightNorm) and hook.cached is None:
                hook.cached = hook.compute(m)
                hooks.append(hook)
        if isinstance(m, VariationalDropout) and not m._locked:
            m._locked, m._masks = True, {}
            drops.append(m)
    try:
        yield
    finally:
        for hook in hooks:
            hook.cached = None
        for m in drops:
            m._locked, m._masks = False, {}


def group_norm(channels: int, groups: int, affine: bool = True) -> nn.GroupNorm:
    """``nn.GroupNorm`` with a clear error when ``groups`` does not divide ``channels``."""
    if channels % groups:
        raise ValueError(f"GroupNorm groups={groups} does not divide channels={channels}")
    return nn.GroupNorm(groups, channels, affine=affine)
