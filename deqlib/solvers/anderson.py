"""Anderson acceleration (type II) with a window of ``m`` past iterates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..buffers import Empty
from ..checks import check_int, check_real
from .result import ResidualTracker
from .products import FlatMap, combine, dots, weights_like

__all__ = ["AndersonOptions", "AndersonSystem", "anderson"]


@dataclass(frozen=True)
class AndersonOptions:
    """Anderson acceleration (type II) with window ``m`` and mixing ``beta``.

    ``lam`` regularizes the least-squares Gram matrix *relative to its mean diagonal*, so it
    keeps the same strength whatever the size of the residuals (an absolute 1e-4 swamps the
    system once residuals are ~1e-2 and degrades Anderson to plain iteration).
    """

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4

    def __post_init__(self) -> None:
        check_int("m", self.m, 1)  # a float m would break the buffer shapes
        check_real("beta", self.beta, minimum=0, maximum=1, min_open=True)
        check_real("lam", self.lam, minimum=0)


def anderson(f: FlatMap, z: Tensor, tracker: ResidualTracker, opts: AndersonOptions, empty: Empty) -> None:
    B, D = z.shape
    m = opts.m
    F = empty(B, m, D, like=z)  # f(z_i) for the last m iterates (ring buffer)
    G = empty(B, m, D, like=z)  # residuals g_i = f(z_i) - z_i
    system = AndersonSystem(B, m, opts.lam, z.device)
    k = 0
    while True:
        fz = f(z)
        s = k % m
        g = torch.sub(fz, z, out=G[:, s])
        if tracker.record(z, fz, g):
            return
        n = min(k + 1, m)
        F[:, s] = fz
        # Only the newest residual changed: update one row and column of the Gram matrix.
        system.set_row(s, dots(G[:, :n], g).double())
        alpha = weights_like(system.weights(n, s), z)  # (B, n)
        z = combine(alpha, F[:, :n])
        if opts.beta != 1.0:  # z = sum a_i (beta f_i + (1-beta) z_i) = sum a_i (f_i - (1-beta) g_i)
            z = combine(alpha, G[:, :n], add=z, alpha=-(1.0 - opts.beta))
        z = tracker.hold(z)
        k += 1


class AndersonSystem:
    """The constrained least squares ``min ||sum_i a_i g_i||^2 + lam s ||a||^2, sum_i a_i = 1``
    per sample, as the bordered system ``[[0, 1^T], [1, Gram / s + lam I]] [mu; a] = [1; 0]``.

    ``s`` is the mean diagonal of the Gram matrix, so ``lam`` keeps its strength whatever the
    size of the residuals; dividing by it also keeps the Gram block of the order of the border,
    which LU needs for an accurate ``a``. The border, the right-hand side and the fallback
    weights are built once per solve (a solver iteration on a GPU is bound by kernel launches).

    Shapes: ``P (B, m+1, m+1)`` float64, the border and the raw Gram matrix ``<g_i, g_j>``.
    """

    def __init__(self, B: int, m: int, lam: float, device: torch.device):
        f64 = {"dtype": torch.float64, "device": device}
        self.P = torch.zeros(B, m + 1, m + 1, **f64)
        self.border = torch.zeros(m + 1, m + 1, dtype=torch.bool, device=device)
        self.border[0, 1:] = True
        self.border[1:, 0] = True
        self.P[:, self.border] = 1.0
        self.lam_eye = torch.diag(torch.tensor([0.0] + [lam] * m, **f64))
        self.rhs = torch.zeros(B, m + 1, **f64)
        self.rhs[:, 0] = 1.0
        self.plain = torch.eye(m, **f64)  # row s: all weight on slot s, a plain fixed-point step

    def set_row(self, s: int, col: Tensor) -> None:
        """Residual ``s`` is new: ``col (B, n)`` holds ``<g_i, g_s>`` for the slots in use."""
        n = col.shape[1]
        self.P[:, 1 + s, 1 : n + 1] = col
        self.P[:, 1 : n + 1, 1 + s] = col

    def weights(self, n: int, newest: int) -> Tensor:
        """``(B, n)`` float64 weights summing to 1 over the first ``n`` slots. A sample whose
        system is singular or not finite gets weight 1 on slot ``newest`` instead."""
        P = self.P[:, : n + 1, : n + 1]
        scale = P[:, 1:, 1:].diagonal(dim1=1, dim2=2).mean(dim=1).view(-1, 1, 1)
        H = torch.where(self.border[: n + 1, : n + 1], P, P / scale + self.lam_eye[: n + 1, : n + 1])
        sol, info = torch.linalg.solve_ex(H, self.rhs[:, : n + 1])
        alpha = sol[:, 1:]
        # A NaN or inf weight makes the sum non-finite; all residuals zero makes scale 0 and H NaN.
        ok = (info == 0) & (alpha.sum(dim=1).abs() < math.inf)
        return torch.where(ok.unsqueeze(1), alpha, self.plain[newest, :n])
