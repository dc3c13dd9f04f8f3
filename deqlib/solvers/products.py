"""Products of a solver's history with a state, written as few, cache-friendly operations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .result import HALF

__all__ = ["FlatMap", "dots", "combine", "weights_like", "vdot", "mv"]

FlatMap = Callable[[Tensor], Tensor]  # f on flat states: (B, D) -> (B, D)


# History products. ``H`` is a ``(B, n, D)`` history, ``v`` a ``(B, D)`` state, ``c`` ``(B, n)``
# weights. Both are written as (row vector) x (matrix) products: on CPU, bmm(H, v[..., None])
# (a long reduction per output) ran ~8x slower than bmm(v[:, None], H^T) on the same data.
def dots(H: Tensor, v: Tensor) -> Tensor:
    """``<H_i, v>`` per sample: ``(B, n)``. 16-bit states are multiplied in float32 (a copy of
    ``H``): in float16 ``<g, g>`` overflows once ``||g|| > 256``, and the inf stalls Anderson
    (plain steps) and turns Broyden's update into NaN."""
    if v.dtype in HALF:
        H, v = H.float(), v.float()
    return torch.bmm(v.unsqueeze(1), H.transpose(1, 2)).squeeze(1)


def combine(c: Tensor, H: Tensor, add: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``add + alpha * sum_i c_i H_i`` per sample: ``(B, D)``. ``c`` must be contiguous (see
    :func:`weights_like`)."""
    if add is None:
        out = torch.bmm(c.unsqueeze(1), H).squeeze(1)
        return out if alpha == 1.0 else out.mul_(alpha)  # skip a whole pass for alpha 1
    return torch.baddbmm(add.unsqueeze(1), c.unsqueeze(1), H, alpha=alpha).squeeze(1)


def weights_like(c: Tensor, z: Tensor) -> Tensor:
    """Small float64 weights ``c (B, n)`` in ``z``'s dtype and row-major (at most one operation).

    Why contiguous: LAPACK's solution comes back column-major, and on CPU ``bmm`` with
    non-contiguous weights falls back to a per-sample loop; Anderson's mixing step at MDEQ size
    (batch 32, m 5, 64 x 32 x 32) took 2.5 ms that way against 1.2 ms, about the time of one
    pass over the history, with bitwise the same result.
    """
    if c.dtype == z.dtype:  # ``to`` would return ``c`` itself, layout and all
        return c.contiguous()
    return c.to(z.dtype, memory_format=torch.contiguous_format)


def vdot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` per sample for small ``a, b (B, n)``: ``(B,)``, one operation."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def mv(A: Tensor, x: Tensor) -> Tensor:
    """``A x`` per sample for small ``A (B, p, n)`` and ``x (B, n)``: ``(B, p)``."""
    return torch.bmm(A, x.unsqueeze(2)).squeeze(2)
