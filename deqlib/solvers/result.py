"""What a solve returns, and the residual bookkeeping every method shares.

:class:`ResidualTracker` is called after every evaluation of ``f``: it counts NFE the same way
for every method, records the absolute residual ``||f(z) - z||`` and the relative residual
``||f(z) - z|| / ||f(z)||`` (the paper's A.5) per sample, keeps each sample's best iterate, and
decides when the solve stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SolverResult", "ResidualTracker", "HALF", "STOP_MODES"]

STOP_MODES = ("rel", "abs")
HALF = (torch.float16, torch.bfloat16)  # states whose norms and dots are taken in float32


@dataclass
class SolverResult:
    """What a solve returns. ``B`` is the batch size, ``N`` the number of f evaluations.

    Every sample stops on its own: once its residual is below ``tol`` (or it diverged) it keeps
    its best iterate and stops changing, so its result does not depend on its batch-mates; the
    solve goes on for the others.

    Attributes:
        z: best iterate per sample, shape of ``z0``.
        fz: ``f(z)`` at that iterate, shape of ``z0`` (one fixed-point step past ``z``, free).
        nfe: number of calls of ``f`` (of the batch).
        abs_residual, rel_residual: ``(B,)`` residuals of the returned iterate.
        abs_trace, rel_trace: ``(N, B)`` residual of the iterate evaluated at each call (a
            sample that stopped is evaluated at its best iterate from then on).
        best_step: ``(B,)`` index (0-based call number) of the returned iterate.
        converged: ``(B,)`` bool, residual of the returned iterate below ``tol``.
        nfe_per_sample: ``(B,)`` calls until the sample stopped (converged or diverged), ``nfe``
            for one that never did.
        diverged: ``(B,)`` bool, the sample stopped on a non-finite value or a residual grown
            ``diverge_factor``-fold.
        status: ``"converged"`` (all samples), ``"diverged"`` (some sample did) or ``"max_iter"``.
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
    nfe_per_sample: Tensor
    diverged: Tensor
    status: str
    reason: str = ""


class ResidualTracker:
    """Residual bookkeeping shared by all methods; states are ``(B, D)``.

    Each sample stops on its own: when its best residual is below ``tol``, when ``f`` gives it a
    non-finite value, or when its residual has grown ``diverge_factor``-fold over its first one.
    A stopped sample is held at its best iterate (the methods pass their next iterate through
    :meth:`hold`); the solve ends when every sample has stopped or after ``max_iter`` calls.

    On a GPU at DEQ sizes a solver iteration is bound by kernel launches, not arithmetic, so
    ``record`` is written in few operations: one host transfer carries every decision, and the
    index of each sample's best iterate is found once, from the traces, at the end.

    ``check_every=k > 1`` moves the decisions onto the device: every per-sample state (best
    iterate, stopped, diverged) is updated there without a host transfer, and the host asks
    whether every sample has stopped only every ``k`` calls. The iterates and per-sample NFE
    are those of ``k = 1``; the batch may run up to ``k - 1`` calls longer (its stopped samples
    held), for one transfer per ``k`` calls instead of one per call (on a GPU the transfer is
    a synchronization that stalls the queue of launches; on a CPU it costs nothing).
    """

    def __init__(self, max_iter: int, tol: float, stop_mode: str, diverge_factor: float, check_every: int = 1):
        self.check_every = check_every
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
        self.done: Tensor | None = None  # (B,) bool: stopped (converged or diverged)
        self.diverged: Tensor | None = None  # (B,) bool
        self.stop_call: Tensor | None = None  # (B,) call at which a sample stopped, 0 while it runs
        self.done_rows: Tensor | None = None  # (n,) indices of the stopped samples (check_every 1)
        self.best_owned = False  # best_z / best_fz are this tracker's own tensors, not the method's
        self.any_done = False
        self.status = "max_iter"
        self.reason = ""

    def record(self, z: Tensor, fz: Tensor, g: Tensor) -> bool:
        """Record one evaluation ``fz = f(z)`` with residual ``g = fz - z``; return True when
        the solve should stop (every sample stopped, or ``max_iter`` calls)."""
        self.nfe += 1
        # 16-bit states are measured in float32: their norms overflow past 65504 (a relative
        # residual of 0, "converged") and the floor below rounds to 0 (0/0 at f(z) = 0).
        acc = torch.float32 if g.dtype in HALF else None
        abs_res = torch.linalg.vector_norm(g, dim=1, dtype=acc)
        # The tiny floor keeps rel finite at f(z) = 0 without changing any realistic value.
        rel_res = abs_res / (torch.linalg.vector_norm(fz, dim=1, dtype=acc) + 1e-12)
        self.abs_trace.append(abs_res)
        self.rel_trace.append(rel_res)
        crit = rel_res if self.use_rel else abs_res
        first = self.best_z is None
        if first:
            self.start = z
            self.limit = self.diverge_factor * abs_res
            # fmin takes the finite side, so a NaN start leaves the best criterion at inf.
            self.best_crit = torch.fmin(crit, torch.full_like(crit, math.inf))
            improved = crit < math.inf
            self.done = torch.zeros_like(improved)
            self.diverged = torch.zeros_like(improved)
            self.stop_call = torch.zeros(improved.shape, dtype=torch.long, device=improved.device)
        else:
            running = ~self.done
            improved = (crit < self.best_crit) & running  # NaN compares False: never "best"
            self.best_crit = torch.where(running, torch.fmin(crit, self.best_crit), self.best_crit)
        # A running sample stops here when it is below tol, not finite, or grown past its limit.
        # "Above" the limit, not "not <=": a limit of inf * 0 (diverge_factor=inf, a sample
        # starting at its fixed point) is NaN and must not read as growth.
        blew_up = ~(crit < math.inf) | (abs_res > self.limit)
        diverging = blew_up & ~self.done
        stops = (self.best_crit < self.tol) | diverging
        done = self.done | stops
        if self.check_every > 1:
            return self._record_on_device(z, fz, improved, stops, diverging, done, first)
        # Counting over samples gives every decision in one host transfer.
        n_improved, n_done, n_new = torch.stack([improved, done, stops & ~self.done]).sum(dim=1).tolist()
        B = crit.shape[0]
        if first or n_improved == B:  # the common case: no copy, just keep references
            self.best_z, self.best_fz = z, fz
            self.best_owned = False
        elif n_improved > 0 and self.best_owned:  # copy only the rows that improved
            rows = improved.nonzero().squeeze(1)
            self.best_z.index_copy_(0, rows, z.index_select(0, rows))
            self.best_fz.index_copy_(0, rows, fz.index_select(0, rows))
        elif n_improved > 0:  # the best iterates are the method's tensors: make our own
            keep = improved.unsqueeze(1)
            self.best_z = torch.where(keep, z, self.best_z)
            self.best_fz = torch.where(keep, fz, self.best_fz)
            self.best_owned = True
        if n_new:
            self.stop_call = torch.where(stops & ~self.done, self.nfe, self.stop_call)
            self.diverged = self.diverged | diverging
            self.done = done
            self.done_rows = done.nonzero().squeeze(1)
            self.any_done = True
        if n_done == B or self.nfe >= self.max_iter:
            self._conclude()
            return True
        return False

    def _record_on_device(self, z: Tensor, fz: Tensor, improved: Tensor, stops: Tensor, diverging: Tensor,
                          done: Tensor, first: bool) -> bool:
        """``record``'s bookkeeping as unconditional tensor operations (no host transfer), and
        the stop test only every ``check_every`` calls."""
        if first:
            self.best_z, self.best_fz = z, fz
        else:
            keep = improved.unsqueeze(1)
            self.best_z = torch.where(keep, z, self.best_z)
            self.best_fz = torch.where(keep, fz, self.best_fz)
        self.stop_call = torch.where(stops & ~self.done, self.nfe, self.stop_call)
        self.diverged = self.diverged | diverging
        self.done = done
        self.any_done = True  # hold() then always applies: no host test of whether to
        if self.nfe >= self.max_iter or (self.nfe % self.check_every == 0 and bool(done.all())):
            self._conclude()
            return True
        return False

    def hold(self, z: Tensor, owned: bool = False) -> Tensor:
        """The next iterate ``z (B, D)`` with every stopped sample held at its best iterate.

        ``owned``: ``z`` is a new tensor that nothing else refers to (not ``f``'s output, which
        the best iterates may be), so the stopped rows are written into it in place, a copy of
        those rows only instead of a pass over the whole batch."""
        if not self.any_done:
            return z
        if owned and self.done_rows is not None:
            return z.index_copy_(0, self.done_rows, self.best_z.index_select(0, self.done_rows))
        return torch.where(self.done.unsqueeze(1), self.best_z, z)

    def _conclude(self) -> None:
        n_div, n_conv = torch.stack([self.diverged, self.best_crit < self.tol]).sum(dim=1).tolist()
        B = self.best_crit.shape[0]
        if n_div:
            self.status = "diverged"
            self.reason = (f"{n_div} of {B} samples diverged (a non-finite f(z), or a residual grown over "
                           f"{self.diverge_factor:g}x its start); {n_conv} below tol after {self.nfe} calls")
        elif n_conv == B:
            self.status, self.reason = "converged", f"all samples below tol by call {self.nfe}"
        else:
            self.status = "max_iter"
            self.reason = f"max_iter={self.max_iter} reached with {n_conv} of {B} samples below tol"

    def result(self, shape: torch.Size) -> SolverResult:
        abs_trace = torch.stack(self.abs_trace)
        rel_trace = torch.stack(self.rel_trace)
        crit = rel_trace if self.use_rel else abs_trace
        n = crit.shape[0]
        # Only the calls while a sample ran count: once stopped it is re-evaluated at its best.
        last = torch.where(self.stop_call > 0, self.stop_call, n)
        ran = torch.arange(n, device=crit.device).unsqueeze(1) < last.unsqueeze(0)
        # The first call at which each sample reached its lowest criterion: the iterate that
        # ``record`` kept (a strict ``<`` there keeps the first of equal values, as argmin does).
        # NaN and inf never count as best; a sample that never was finite keeps call 0.
        best_step = torch.where(torch.isfinite(crit) & ran, crit, math.inf).argmin(dim=0)
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
            nfe_per_sample=last,
            diverged=self.diverged.clone(),
            status=self.status,
            reason=self.reason,
        )
