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

    Stalls: on some maps the least-squares system is so ill-conditioned that Anderson's
    extrapolation keeps missing (a paper-size Transformer layer left one sample in 16 at a
    residual of 1.4e-2 after 200 calls, where plain iteration needs 20, and a regularization of
    1e-2 instead of 1e-4 converged it in 15). A sample whose best residual has not halved in
    ``restart`` calls is restarted: its window is cleared, it steps from its best iterate, and
    from then on its system is regularized with ``max(lam, restart_lam)``. ``restart=0`` never
    restarts. With 6 that sample converged in 18 calls (10: 43); on the other problems of
    notebook 07 that were tried (synthetic, conv, MDEQ and Transformer maps, easy and hard,
    forward and backward, at the small profile's size and some at the paper's) restarts at 6
    left the calls the same or fewer (the paper-width MDEQ map near rho 0.99: 97 -> 93).
    """

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4
    restart: int = 6
    restart_lam: float = 1e-2

    def __post_init__(self) -> None:
        check_int("m", self.m, 1)  # a float m would break the buffer shapes
        check_real("beta", self.beta, minimum=0, maximum=1, min_open=True)
        check_real("lam", self.lam, minimum=0)
        check_int("restart", self.restart, 0)
        check_real("restart_lam", self.restart_lam, minimum=0)


def anderson(f: FlatMap, z: Tensor, tracker: ResidualTracker, opts: AndersonOptions, empty: Empty) -> None:
    B, D = z.shape
    m = opts.m
    F = empty(B, m, D, like=z)  # f(z_i) for the last m iterates (ring buffer)
    G = empty(B, m, D, like=z)  # residuals g_i = f(z_i) - z_i
    system = AndersonSystem(B, m, opts.lam, z.device)
    stall = _StallWatch(B, opts.restart, z.device) if opts.restart else None
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
        if stall is not None and stall.check(k, tracker.best_crit, tracker.done):
            # Restart the stalled samples from their best iterate: that pair replaces the newest
            # slot, and the older slots leave their windows.
            keep = stall.restarting.unsqueeze(1)
            F[:, s] = torch.where(keep, tracker.best_fz, F[:, s])
            torch.where(keep, tracker.best_fz - tracker.best_z, G[:, s], out=G[:, s])
            system.set_row(s, dots(G[:, :n], G[:, s]).double())
            system.restart(stall.restarting, s, max(opts.lam, opts.restart_lam))
        alpha = weights_like(system.weights(n, s), z)  # (B, n)
        z = combine(alpha, F[:, :n])
        if opts.beta != 1.0:  # z = sum a_i (beta f_i + (1-beta) z_i) = sum a_i (f_i - (1-beta) g_i)
            z = combine(alpha, G[:, :n], add=z, alpha=-(1.0 - opts.beta))
        z = tracker.hold(z, owned=True)  # combine's output: a new tensor
        k += 1


class _StallWatch:
    """Which samples have stalled: their best residual has not halved in ``patience`` calls.

    Checked every few calls, so that on a GPU the host learns of a stall with one transfer per
    check rather than one more per iteration."""

    def __init__(self, B: int, patience: int, device: torch.device):
        self.patience = patience
        self.every = max(1, min(patience, 5))
        self.ref: Tensor | None = None  # (B,) best residual at the last progress
        self.since = torch.zeros(B, dtype=torch.long, device=device)  # call of the last progress
        self.restarted = torch.zeros(B, dtype=torch.bool, device=device)  # ever restarted
        self.restarting = self.restarted
        self.any_restarted = False

    def check(self, k: int, best: Tensor, done: Tensor) -> bool:
        """Update with the best residuals after call ``k``; True when some sample must restart
        now (then :attr:`restarting` says which)."""
        if self.ref is None:
            self.ref = best.clone()
            return False
        progressed = best <= 0.5 * self.ref
        self.ref = torch.where(progressed, best, self.ref)
        self.since = torch.where(progressed, k, self.since)
        if k % self.every:
            return False
        stalled = (k - self.since >= self.patience) & ~done
        if not bool(stalled.any()):
            return False
        self.restarting = stalled
        self.restarted = self.restarted | stalled
        self.any_restarted = True
        self.ref = torch.where(stalled, best, self.ref)
        self.since = torch.where(stalled, k, self.since)
        return True


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
        self.eye = torch.eye(m + 1, **f64)
        self.rhs = torch.zeros(B, m + 1, **f64)
        self.rhs[:, 0] = 1.0
        self.plain = torch.eye(m, **f64)  # row s: all weight on slot s, a plain fixed-point step
        self.valid: Tensor | None = None  # (B, m) slots in a sample's window; None: all

    def set_row(self, s: int, col: Tensor) -> None:
        """Residual ``s`` is new: ``col (B, n)`` holds ``<g_i, g_s>`` for the slots in use."""
        n = col.shape[1]
        self.P[:, 1 + s, 1 : n + 1] = col
        self.P[:, 1 : n + 1, 1 + s] = col
        if self.valid is not None:
            self.valid[:, s] = True  # the newest slot is in every window

    def restart(self, samples: Tensor, newest: int, lam: float) -> None:
        """Clear the windows of ``samples`` (``(B,)`` bool) but for slot ``newest``, and
        regularize their systems with ``lam`` from now on."""
        B, m1 = self.P.shape[0], self.P.shape[1]
        if self.valid is None:
            self.valid = torch.ones(B, m1 - 1, dtype=torch.bool, device=self.P.device)
        self.valid[samples] = False
        self.valid[:, newest] = True
        if self.lam_eye.dim() == 2:
            self.lam_eye = self.lam_eye.expand(B, m1, m1).clone()
        stronger = torch.diag(torch.tensor([0.0] + [lam] * (m1 - 1), dtype=self.P.dtype, device=self.P.device))
        self.lam_eye = torch.where(samples.view(-1, 1, 1), torch.maximum(self.lam_eye, stronger), self.lam_eye)

    def weights(self, n: int, newest: int) -> Tensor:
        """``(B, n)`` float64 weights summing to 1 over the first ``n`` slots (zero on slots out
        of a sample's window). A sample whose system is singular or not finite gets weight 1 on
        slot ``newest`` instead."""
        P = self.P[:, : n + 1, : n + 1]
        diag = P[:, 1:, 1:].diagonal(dim1=1, dim2=2)
        if self.valid is None:
            scale = diag.mean(dim=1).view(-1, 1, 1)
        else:
            valid = self.valid[:, :n]
            scale = ((diag * valid).sum(dim=1) / valid.sum(dim=1)).view(-1, 1, 1)
        H = torch.where(self.border[: n + 1, : n + 1], P, P / scale + self.lam_eye[..., : n + 1, : n + 1])
        if self.valid is not None:
            # A slot out of the window: its row and column become the identity's, so its weight
            # solves to 0 and it takes no part in the others' equations.
            inside = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
            H = torch.where(inside.unsqueeze(2) & inside.unsqueeze(1), H, self.eye[: n + 1, : n + 1])
        sol, info = torch.linalg.solve_ex(H, self.rhs[:, : n + 1])
        alpha = sol[:, 1:]
        # A NaN or inf weight makes the sum non-finite; all residuals zero makes scale 0 and H NaN.
        ok = (info == 0) & (alpha.sum(dim=1).abs() < math.inf)
        return torch.where(ok.unsqueeze(1), alpha, self.plain[newest, :n])
