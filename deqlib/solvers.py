"""Fixed-point solvers behind one call: ``solve(f, z0, method=...)``.

Every method works on a batch: ``z0`` has shape ``(B, ...)`` and ``f`` maps a tensor of that
shape to one of the same shape, sample ``b`` of the output depending only on sample ``b`` of
the input. Internally states are flattened to ``(B, D)``.

What every method shares (and so lives in :class:`_Tracker`, not in the methods):
- NFE counts calls of ``f``, the same way for every method;
- after each call the absolute residual ``||f(z) - z||`` and the relative residual
  ``||f(z) - z|| / ||f(z)||`` (the paper's A.5) are recorded per sample;
- the iterate with the lowest residual is kept per sample and returned, with ``f`` at it;
- non-finite values or a residual that has grown ``diverge_factor``-fold stop the solve with
  status ``"diverged"``; the best iterate so far is still returned.

Memory: fixed-point keeps O(1) states, Anderson ``m`` pairs, Broyden ``window + 3`` states;
none grows with ``max_iter``. On the CPU the history buffers are lent by
:data:`deqlib.buffers.POOL` and kept for the next solve (glibc maps every block over 32 MB
afresh, and a fresh history is page-faulted in again); :func:`deqlib.buffers.release_buffers`
frees them.

Speed (CPU): besides ``f``, a solve's time is memory traffic over the history, so Anderson
and Broyden make two passes over it per iteration (the dots with the new residual, then the
combination giving the next iterate) and write as few fresh rows as they can. On the 2-core
machine here the history is read from DRAM each iteration even when it would fit the cache:
after any pause of a few milliseconds (one call of ``f``) a pass over a 10 MB history took
~0.5 ms instead of ~0.12 ms back to back, with one thread or two.

Speed (GPU): at DEQ sizes an iteration is bound by kernel launches, so the bookkeeping is
written in few operations (``python -m deqlib.bench solvers`` prints them per iteration:
about 13 for plain iteration, 30 for Anderson, 45 for Broyden, ``f`` not counted).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .buffers import POOL, Empty
from .checks import check_choice, check_int, check_mapping, check_real

__all__ = ["SolverResult", "solve", "METHODS", "STOP_MODES", "check_method_options"]

STOP_MODES = ("rel", "abs")


@dataclass
class SolverResult:
    """What a solve returns. ``B`` is the batch size, ``N`` the number of f evaluations.

    Attributes:
        z: best iterate per sample, shape of ``z0``.
        fz: ``f(z)`` at that iterate, shape of ``z0`` (one fixed-point step past ``z``, free).
        nfe: number of calls of ``f``.
        abs_residual, rel_residual: ``(B,)`` residuals of the returned iterate.
        abs_trace, rel_trace: ``(N, B)`` residual of the iterate evaluated at each call.
        best_step: ``(B,)`` index (0-based call number) of the returned iterate.
        converged: ``(B,)`` bool, residual of the returned iterate below ``tol``.
        status: ``"converged"`` (all samples), ``"max_iter"`` or ``"diverged"``.
        reason: a short human-readable explanation of the status.
    """

    z: Tensor
    fz: Tensor
    nfe: int
    abs_residual: Tensor
    rel_residual: Tensor
    abs_trace: Tensor
    rel_trace: Tensor
    best_step: Tensor
    converged: Tensor
    status: str
    reason: str = ""


_HALF = (torch.float16, torch.bfloat16)  # states whose norms and dots are taken in float32


class _Tracker:
    """Residual bookkeeping shared by all methods; states are ``(B, D)``.

    On a GPU at DEQ sizes a solver iteration is bound by kernel launches, not arithmetic, so
    ``record`` is written in few operations: one host transfer carries every decision, and the
    index of each sample's best iterate is found once, from the traces, at the end.
    """

    def __init__(self, max_iter: int, tol: float, stop_mode: str, diverge_factor: float):
        self.max_iter = max_iter
        self.tol = tol
        self.use_rel = stop_mode == "rel"
        self.diverge_factor = diverge_factor
        self.nfe = 0
        self.abs_trace: list[Tensor] = []
        self.rel_trace: list[Tensor] = []
        self.best_z: Tensor | None = None
        self.best_fz: Tensor | None = None
        self.best_crit: Tensor | None = None
        self.start: Tensor | None = None  # the first z, which may be a view of the caller's z0
        self.limit: Tensor | None = None  # (B,) absolute residual above which a sample diverged
        self.status = "max_iter"
        self.reason = ""

    def record(self, z: Tensor, fz: Tensor, g: Tensor) -> bool:
        """Record one evaluation ``fz = f(z)`` with residual ``g = fz - z``; return True when
        the solve should stop."""
        self.nfe += 1
        # 16-bit states are measured in float32: their norms overflow past 65504 (a relative
        # residual of 0, "converged") and the floor below rounds to 0 (0/0 at f(z) = 0).
        acc = torch.float32 if g.dtype in _HALF else None
        abs_res = torch.linalg.vector_norm(g, dim=1, dtype=acc)
        # The tiny floor keeps rel finite at f(z) = 0 without changing any realistic value.
        rel_res = abs_res / (torch.linalg.vector_norm(fz, dim=1, dtype=acc) + 1e-12)
        self.abs_trace.append(abs_res)
        self.rel_trace.append(rel_res)
        crit = rel_res if self.use_rel else abs_res
        if self.best_z is None:
            self.start = z
            self.limit = self.diverge_factor * abs_res
            # fmin takes the finite side, so a NaN start leaves the best criterion at inf.
            self.best_crit = torch.fmin(crit, torch.full_like(crit, math.inf))
            improved = crit < math.inf
        else:
            improved = crit < self.best_crit  # NaN compares False: never "best"
            self.best_crit = torch.fmin(crit, self.best_crit)
        # Per sample: improved, finite, below tol, within the divergence limit. Counting them
        # over samples gives every decision (all: count B, any: count > 0) in one transfer.
        # "Not above" the limit, not "<=": a limit of inf * 0 (diverge_factor=inf, a sample
        # starting at its fixed point) is NaN and must not read as growth.
        counts = torch.stack([improved, crit < math.inf, self.best_crit < self.tol,
                              ~(abs_res > self.limit)]).sum(dim=1).tolist()
        B = crit.shape[0]
        n_improved = counts[0]
        all_finite, all_below, none_grew = (c == B for c in counts[1:])
        if n_improved == B or self.best_z is None:  # the common case: no copy, just keep references
            self.best_z, self.best_fz = z, fz
        elif n_improved > 0:
            keep = improved.unsqueeze(1)
            self.best_z = torch.where(keep, z, self.best_z)
            self.best_fz = torch.where(keep, fz, self.best_fz)
        if not all_finite:
            self.status, self.reason = "diverged", f"non-finite f(z) at call {self.nfe}"
            return True
        if all_below:
            self.status, self.reason = "converged", f"all samples below tol at call {self.nfe}"
            return True
        if not none_grew:
            self.status = "diverged"
            self.reason = f"residual grew over {self.diverge_factor:g}x its start by call {self.nfe}"
            return True
        if self.nfe >= self.max_iter:
            self.status, self.reason = "max_iter", f"max_iter={self.max_iter} reached"
            return True
        return False

    def result(self, shape: torch.Size) -> SolverResult:
        abs_trace = torch.stack(self.abs_trace)
        rel_trace = torch.stack(self.rel_trace)
        crit = rel_trace if self.use_rel else abs_trace
        # The first call at which each sample reached its lowest criterion: the iterate that
        # ``record`` kept (a strict ``<`` there keeps the first of equal values, as argmin does).
        # NaN and inf never count as best; a sample that never was finite keeps call 0.
        best_step = torch.where(torch.isfinite(crit), crit, math.inf).argmin(dim=0)
        idx = best_step.unsqueeze(0)
        abs_res = abs_trace.gather(0, idx).squeeze(0)
        rel_res = rel_trace.gather(0, idx).squeeze(0)
        converged = (rel_res if self.use_rel else abs_res) < self.tol
        # The start itself as the best iterate: a copy, or the result would change with the
        # caller's z0 (a warm-start buffer updated in place, say).
        best_z = self.best_z.clone() if self.best_z is self.start else self.best_z
        return SolverResult(
            z=best_z.reshape(shape),
            fz=self.best_fz.reshape(shape),
            nfe=self.nfe,
            abs_residual=abs_res,
            rel_residual=rel_res,
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            best_step=best_step,
            converged=converged,
            status=self.status,
            reason=self.reason,
        )


FlatMap = Callable[[Tensor], Tensor]


# History products. ``H`` is a ``(B, n, D)`` history, ``v`` a ``(B, D)`` state, ``c`` ``(B, n)``
# weights. Both are written as (row vector) x (matrix) products: on CPU, bmm(H, v[..., None])
# (a long reduction per output) ran ~8x slower than bmm(v[:, None], H^T) on the same data.
def _dots(H: Tensor, v: Tensor) -> Tensor:
    """``<H_i, v>`` per sample: ``(B, n)``. 16-bit states are multiplied in float32 (a copy of
    ``H``): in float16 ``<g, g>`` overflows once ``||g|| > 256``, and the inf stalls Anderson
    (plain steps) and turns Broyden's update into NaN."""
    if v.dtype in _HALF:
        H, v = H.float(), v.float()
    return torch.bmm(v.unsqueeze(1), H.transpose(1, 2)).squeeze(1)


def _combine(c: Tensor, H: Tensor, add: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``add + alpha * sum_i c_i H_i`` per sample: ``(B, D)``. ``c`` must be contiguous (see
    :func:`_weights_like`)."""
    if add is None:
        out = torch.bmm(c.unsqueeze(1), H).squeeze(1)
        return out if alpha == 1.0 else out.mul_(alpha)  # skip a whole pass for alpha 1
    return torch.baddbmm(add.unsqueeze(1), c.unsqueeze(1), H, alpha=alpha).squeeze(1)


def _weights_like(c: Tensor, z: Tensor) -> Tensor:
    """Small float64 weights ``c (B, n)`` in ``z``'s dtype and row-major (at most one operation).

    Why contiguous: LAPACK's solution comes back column-major, and on CPU ``bmm`` with
    non-contiguous weights falls back to a per-sample loop; Anderson's mixing step at MDEQ size
    (batch 32, m 5, 64 x 32 x 32) took 2.5 ms that way against 1.2 ms, about the time of one
    pass over the history, with bitwise the same result.
    """
    if c.dtype == z.dtype:  # ``to`` would return ``c`` itself, layout and all
        return c.contiguous()
    return c.to(z.dtype, memory_format=torch.contiguous_format)


def _vdot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` per sample for small ``a, b (B, n)``: ``(B,)``, one operation."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _mv(A: Tensor, x: Tensor) -> Tensor:
    """``A x`` per sample for small ``A (B, p, n)`` and ``x (B, n)``: ``(B, p)``."""
    return torch.bmm(A, x.unsqueeze(2)).squeeze(2)


# ---------------------------------------------------------------------------------------------
# Methods. Each takes the flattened map, a (B, D) start point, the tracker, its own options
# and ``empty`` (which lends history buffers, see deqlib.buffers); it calls
# ``tracker.record(z, f(z), f(z) - z)`` after every evaluation and stops when told. Nothing it
# leaves in the tracker may be a view of a lent buffer.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPointOptions:
    """``z <- z + beta (f(z) - z)``; beta=1 is plain iteration."""

    beta: float = 1.0

    def __post_init__(self) -> None:
        check_real("beta", self.beta, minimum=0, maximum=1, min_open=True)


def _fixed_point(f: FlatMap, z: Tensor, tracker: _Tracker, opts: FixedPointOptions, empty: Empty) -> None:
    while True:
        fz = f(z)
        g = fz - z
        if tracker.record(z, fz, g):
            return
        z = fz if opts.beta == 1.0 else z.add(g, alpha=opts.beta)


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


def _anderson(f: FlatMap, z: Tensor, tracker: _Tracker, opts: AndersonOptions, empty: Empty) -> None:
    B, D = z.shape
    m = opts.m
    F = empty(B, m, D, like=z)  # f(z_i) for the last m iterates (ring buffer)
    G = empty(B, m, D, like=z)  # residuals g_i = f(z_i) - z_i
    system = _AndersonSystem(B, m, opts.lam, z.device)
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
        system.set_row(s, _dots(G[:, :n], g).double())
        alpha = _weights_like(system.weights(n, s), z)  # (B, n)
        z = _combine(alpha, F[:, :n])
        if opts.beta != 1.0:  # z = sum a_i (beta f_i + (1-beta) z_i) = sum a_i (f_i - (1-beta) g_i)
            z = _combine(alpha, G[:, :n], add=z, alpha=-(1.0 - opts.beta))
        k += 1


class _AndersonSystem:
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


@dataclass(frozen=True)
class BroydenOptions:
    """Limited-memory ("good") Broyden on ``g(z) = f(z) - z``.

    The inverse Jacobian of ``g`` is approximated as ``-I + U V^T`` with at most ``window``
    rank-one terms; when they are used up the approximation restarts from ``-I`` (overwriting
    the oldest term instead was seen to diverge on slowly contracting maps). Memory is
    ``window + 3`` states whatever ``max_iter`` is.
    """

    window: int = 20

    def __post_init__(self) -> None:
        check_int("window", self.window, 1)


def _broyden(f: FlatMap, z: Tensor, tracker: _Tracker, opts: BroydenOptions, empty: Empty) -> None:
    """Good Broyden, ``Hinv = -I + sum_i u_i v_i^T`` with ``k <= L`` terms, in compact form.

    Every ``u_i``, ``v_i`` and step ``dx`` is a combination of the residuals met since the last
    restart (and of two vectors kept at it), so only those are stored, as rows of a basis ``W``,
    and the terms are small coefficient matrices over it: ``U = Cu W``, ``V = Cv W``,
    ``dx = e W``. An iteration then makes two passes over the history (the dots ``W g`` and the
    step ``z + e W``) where explicit ``U``, ``V`` took six, and writes one new row instead of
    two. The scalars of the update come from the float64 Gram matrix ``M = W W^T``, whose new
    row is exactly ``W g``.

    Shapes: ``W (B, L+3, D)`` of which ``n`` rows are in use; ``M (B, L+3, L+3)``;
    ``Cu, Cv (B, L, L+3)``; ``e (B, L+3)``.
    """
    B, D = z.shape
    L = min(opts.window, max(tracker.max_iter - 1, 1))
    cap = L + 3  # n <= k + 2, plus the row of the newest residual
    f64 = {"dtype": torch.float64, "device": z.device}
    W = empty(B, cap, D, like=z)
    M = torch.zeros(B, cap, cap, **f64)
    Cu = torch.zeros(B, L, cap, **f64)  # rows past k stay zero
    Cv = torch.zeros(B, L, cap, **f64)
    e = torch.zeros(B, cap, **f64)
    fz = f(z)
    g = torch.sub(fz, z, out=W[:, 0])
    if tracker.record(z, fz, g):
        return
    M[:, 0, 0] = _dots(W[:, :1], g)[:, 0].double()
    e[:, 0] = 1.0  # with no terms, dx = -Hinv g = g: a plain fixed-point step
    n, k = 1, 0
    one = torch.ones(B, 1, **f64)
    zero = torch.zeros((), **f64)
    while True:
        z = _combine(_weights_like(e[:, :n], z), W[:, :n], add=z)  # z + dx
        fz = f(z)
        g = torch.sub(fz, z, out=W[:, n])  # the new residual is the next basis row
        if tracker.record(z, fz, g):
            return
        r = _dots(W[:, : n + 1], g).double()  # (B, n+1): w_i . g, the last one g . g
        M[:, n, : n + 1] = r
        M[:, : n + 1, n] = r
        # The update, with dx the step just taken (dx = -Hinv g_old) and dg = g - g_old:
        # v = Hinv^T dx = -dx + V^T (U dx),  Hinv dg = dx - g + U^T (V g),  u = (dx - Hinv dg) / d.
        en, rn, Cun, Cvn = e[:, :n], r[:, :n], Cu[:, :k, :n], Cv[:, :k, :n]
        w_dx = _mv(M[:, :n, :n], en)  # (B, n): w_i . dx
        a = _mv(Cvn, rn)  # (B, k): V g
        q = _mv(Cun, w_dx)  # (B, k): U dx
        s = _vdot(q, a) - _vdot(en, rn)  # v . g
        dxdx = _vdot(en, w_dx)
        d = dxdx + s  # v . dg = dx^T Hinv dg
        d_abs = d.abs()
        ok = (d_abs > 1e-30) & (d_abs < math.inf)  # else skip the update for that sample (NaN too)
        inv_d = torch.where(ok, d, math.inf).reciprocal()  # 0 where skipped
        ey = torch.cat([-_mv(Cun.transpose(1, 2), a), one], dim=1)  # y = g - U^T a; u = y / d
        ev = torch.where(ok.unsqueeze(1), _mv(Cvn.transpose(1, 2), q) - en, 0.0)  # v
        if k < L:
            # Written in place (``out=``): on a GPU every separate copy is one more launch.
            torch.where(ok.unsqueeze(1), ey * inv_d.unsqueeze(1), zero, out=Cu[:, k, : n + 1])
            Cv[:, k, :n] = ev
            # Next step -Hinv_new g = y - u (v . g) = (dxdx / d) y; plain y if skipped.
            torch.mul(ey, torch.where(ok, dxdx * inv_d, 1.0).unsqueeze(1), out=e[:, : n + 1])
            n, k = n + 1, k + 1
        else:  # memory full: restart from -I plus this update (overwriting the oldest was unstable)
            # Fresh basis [y, v, g]: u = y / d, v, and the step g - u (v . g).
            y = _combine(_weights_like(ey, z), W[:, : n + 1])
            v = _combine(_weights_like(ev, z), W[:, :n])
            W[:, 2].copy_(g)  # g is row n >= 2
            W[:, 0].copy_(y)
            W[:, 1].copy_(v)
            del y, v
            for i in range(3):
                M[:, :3, i] = _dots(W[:, :3], W[:, i]).double()
            Cu.zero_()
            Cv.zero_()
            e.zero_()
            Cu[:, 0, 0] = inv_d
            Cv[:, 0, 1] = ok.double()
            e[:, 0] = torch.where(ok, -s * inv_d, 0.0)
            e[:, 2] = 1.0
            n, k = 3, 1


METHODS: dict[str, tuple[Callable, type]] = {
    "fixed_point": (_fixed_point, FixedPointOptions),
    "anderson": (_anderson, AndersonOptions),
    "broyden": (_broyden, BroydenOptions),
}


def check_method_options(method: str, options: dict) -> object:
    """Validate ``method`` and its options; return the method's options object.

    Raises ValueError naming an unknown method, an unknown option or a bad value.
    """
    check_choice("method", method, METHODS)
    check_mapping("options", options)
    opts_cls = METHODS[method][1]
    known = {fld.name for fld in dataclasses.fields(opts_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method={method!r}; it takes {sorted(known)}"
        )
    return opts_cls(**options)


def check_solver_args(max_iter: int, tol: float, stop_mode: str, diverge_factor: float) -> None:
    """Raise ValueError naming the first bad common solver argument.

    ``diverge_factor`` alone may be infinite: ``inf`` switches the divergence check off.
    """
    check_int("max_iter", max_iter, 1)
    check_real("tol", tol, minimum=0, min_open=True)
    check_choice("stop_mode", stop_mode, STOP_MODES)
    check_real("diverge_factor", diverge_factor, minimum=1, min_open=True, finite=False)


@torch.no_grad()
def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    method: str = "anderson",
    max_iter: int = 50,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    diverge_factor: float = 1e6,
    **method_options,
) -> SolverResult:
    """Find ``z`` with ``f(z) = z`` for each sample of a batch.

    Args:
        f: map from a ``(B, ...)`` tensor to one of the same shape, per sample independent.
        z0: ``(B, ...)`` start point.
        method: ``"anderson"``, ``"broyden"`` or ``"fixed_point"``.
        max_iter: the most calls of ``f``.
        tol: stop when every sample's residual (of kind ``stop_mode``) is below it.
        stop_mode: ``"rel"`` (``||f(z)-z|| / ||f(z)||``) or ``"abs"`` (``||f(z)-z||``).
        diverge_factor: stop as diverged when a sample's absolute residual exceeds this
            multiple of its first one.
        **method_options: the method's own options (``m``, ``beta``, ``lam`` for Anderson;
            ``window`` for Broyden; ``beta`` for fixed-point). Unknown ones are rejected.

    Returns:
        A :class:`SolverResult`. Runs without autograd; never raises from inside the iteration
        (non-finite values end it with status ``"diverged"``), but for an ``f`` whose first
        output is not a tensor of ``z0``'s shape (ValueError): flattened, an output of another
        shape with as many numbers would be taken sample by sample in the wrong order.
    """
    check_solver_args(max_iter, tol, stop_mode, diverge_factor)
    opts = check_method_options(method, method_options)
    if not callable(f):
        raise ValueError(f"f must be callable, got f={f!r}")
    if not isinstance(z0, Tensor):
        raise ValueError(f"z0 must be a tensor of shape (B, ...), got z0={z0!r}")
    if z0.dim() < 1 or z0.shape[0] < 1:
        raise ValueError(f"z0 must be a tensor of shape (B, ...), got z0 of shape {tuple(z0.shape)}")
    shape = z0.shape
    B = shape[0]
    checked = False

    def f_flat(z: Tensor) -> Tensor:
        nonlocal checked
        out = f(z.view(shape))
        if not checked:  # the first call only: one flag test per iteration after it
            if not isinstance(out, Tensor) or out.shape != shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else f"a {type(out).__name__}"
                raise ValueError(f"f must return a tensor of z0's shape {tuple(shape)}, got {got}")
            checked = True
        return out.reshape(B, -1)

    tracker = _Tracker(int(max_iter), float(tol), stop_mode, float(diverge_factor))
    with POOL.lease() as empty:
        METHODS[method][0](f_flat, z0.reshape(B, -1), tracker, opts, empty)
    return tracker.result(shape)
