"""Limited-memory ("good") Broyden on ``g(z) = f(z) - z``, in compact form."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..buffers import Empty
from ..checks import check_int
from .result import ResidualTracker
from .products import FlatMap, combine, dots, mv, vdot, weights_like

__all__ = ["BroydenOptions", "broyden"]

_FIRST_ROWS = 24  # basis rows held at first: 21 updates, more than most solves take


@dataclass(frozen=True)
class BroydenOptions:
    """Limited-memory ("good") Broyden on ``g(z) = f(z) - z``.

    The inverse Jacobian of ``g`` is approximated as ``-I + U V^T`` with at most ``window``
    rank-one terms; when they are used up the approximation restarts from ``-I`` (overwriting
    the oldest term instead was seen to diverge on slowly contracting maps). Memory grows with
    the iterations a solve actually takes, in doublings from 24 states, and stops at
    ``window + 3`` states whatever ``max_iter`` is: a solve that converges in 15 calls holds 24
    states however large the window.

    Why a window of 100: on the paper-width MDEQ map near rho = 0.99 a window of 20 restarted
    too often (200 calls without converging on an H100, where torchdeq's Broyden, which keeps
    every update, converged in 126); windows of 40 / 80 / 200 took 186 / 103 / 90 calls there,
    and on this project's CPU version of that problem (batch 8) 20 / 60 / 100 took 99 / 93 / 85.
    Only long solves use it: a solve of ``n`` calls holds about ``n`` states.
    """

    window: int = 100

    def __post_init__(self) -> None:
        check_int("window", self.window, 1)


def broyden(f: FlatMap, z: Tensor, tracker: ResidualTracker, opts: BroydenOptions, empty: Empty) -> None:
    """Good Broyden, ``Hinv = -I + sum_i u_i v_i^T`` with ``k <= L`` terms, in compact form.

    Every ``u_i``, ``v_i`` and step ``dx`` is a combination of the residuals met since the last
    restart (and of two vectors kept at it), so only those are stored, as rows of a basis ``W``,
    and the terms are small coefficient matrices over it: ``U = Cu W``, ``V = Cv W``,
    ``dx = e W``. An iteration then makes two passes over the history (the dots ``W g`` and the
    step ``z + e W``) where explicit ``U``, ``V`` took six, and writes one new row instead of
    two. The scalars of the update come from the float64 Gram matrix ``M = W W^T``, whose new
    row is exactly ``W g``.

    Shapes: ``W (B, R, D)`` of which ``n`` rows are in use, ``R`` grown by doubling up to
    ``L+3``; ``M (B, R, R)``; ``Cu, Cv (B, min(L, R), R)``; ``e (B, R)`` (grown with ``W``).
    """
    B, D = z.shape
    L = min(opts.window, max(tracker.max_iter - 1, 1))
    cap = L + 3  # n <= k + 2, plus the row of the newest residual
    f64 = {"dtype": torch.float64, "device": z.device}
    R = min(cap, _FIRST_ROWS)
    W = empty(B, R, D, like=z)
    M = torch.zeros(B, R, R, **f64)
    Cu = torch.zeros(B, min(L, R), R, **f64)  # rows past k stay zero
    Cv = torch.zeros(B, min(L, R), R, **f64)
    e = torch.zeros(B, R, **f64)
    fz = f(z)
    g = torch.sub(fz, z, out=W[:, 0])
    if tracker.record(z, fz, g):
        return
    M[:, 0, 0] = dots(W[:, :1], g)[:, 0].double()
    e[:, 0] = 1.0  # with no terms, dx = -Hinv g = g: a plain fixed-point step
    n, k = 1, 0
    one = torch.ones(B, 1, **f64)
    zero = torch.zeros((), **f64)
    while True:
        # z + dx; a sample that stopped stays at its best iterate (its rows of the update below
        # then describe a step it did not take, and only ever move it back there).
        z = tracker.hold(combine(weights_like(e[:, :n], z), W[:, :n], add=z), owned=True)
        fz = f(z)
        if n == R:  # the basis is full below the window: double it, and its coefficients
            R = min(cap, 2 * R)
            grown = empty(B, R, D, like=z)
            grown[:, :n].copy_(W)
            W = grown
            M, Cu, Cv, e = (_grown(M, (B, R, R)), _grown(Cu, (B, min(L, R), R)), _grown(Cv, (B, min(L, R), R)),
                            _grown(e, (B, R)))
        g = torch.sub(fz, z, out=W[:, n])  # the new residual is the next basis row
        if tracker.record(z, fz, g):
            return
        r = dots(W[:, : n + 1], g).double()  # (B, n+1): w_i . g, the last one g . g
        M[:, n, : n + 1] = r
        M[:, : n + 1, n] = r
        # The update, with dx the step just taken (dx = -Hinv g_old) and dg = g - g_old:
        # v = Hinv^T dx = -dx + V^T (U dx),  Hinv dg = dx - g + U^T (V g),  u = (dx - Hinv dg) / d.
        en, rn, Cun, Cvn = e[:, :n], r[:, :n], Cu[:, :k, :n], Cv[:, :k, :n]
        w_dx = mv(M[:, :n, :n], en)  # (B, n): w_i . dx
        a = mv(Cvn, rn)  # (B, k): V g
        q = mv(Cun, w_dx)  # (B, k): U dx
        s = vdot(q, a) - vdot(en, rn)  # v . g
        dxdx = vdot(en, w_dx)
        d = dxdx + s  # v . dg = dx^T Hinv dg
        d_abs = d.abs()
        ok = (d_abs > 1e-30) & (d_abs < math.inf)  # else skip the update for that sample (NaN too)
        inv_d = torch.where(ok, d, math.inf).reciprocal()  # 0 where skipped
        ey = torch.cat([-mv(Cun.transpose(1, 2), a), one], dim=1)  # y = g - U^T a; u = y / d
        ev = torch.where(ok.unsqueeze(1), mv(Cvn.transpose(1, 2), q) - en, 0.0)  # v
        if k < L:
            # Written in place (``out=``): on a GPU every separate copy is one more launch.
            torch.where(ok.unsqueeze(1), ey * inv_d.unsqueeze(1), zero, out=Cu[:, k, : n + 1])
            Cv[:, k, :n] = ev
            # Next step -Hinv_new g = y - u (v . g) = (dxdx / d) y; plain y if skipped.
            torch.mul(ey, torch.where(ok, dxdx * inv_d, 1.0).unsqueeze(1), out=e[:, : n + 1])
            n, k = n + 1, k + 1
        else:  # memory full: restart from -I plus this update (overwriting the oldest was unstable)
            # Fresh basis [y, v, g]: u = y / d, v, and the step g - u (v . g).
            y = combine(weights_like(ey, z), W[:, : n + 1])
            v = combine(weights_like(ev, z), W[:, :n])
            W[:, 2].copy_(g)  # g is row n >= 2
            W[:, 0].copy_(y)
            W[:, 1].copy_(v)
            del y, v
            for i in range(3):
                M[:, :3, i] = dots(W[:, :3], W[:, i]).double()
            Cu.zero_()
            Cv.zero_()
            e.zero_()
            Cu[:, 0, 0] = inv_d
            Cv[:, 0, 1] = ok.double()
            e[:, 0] = torch.where(ok, -s * inv_d, 0.0)
            e[:, 2] = 1.0
            n, k = 3, 1


def _grown(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t`` copied into the corner of a zero tensor of the larger ``shape``."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out
