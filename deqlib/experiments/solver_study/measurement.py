"""The one harness that measures a solve, for the comparison and the solver benchmark.

Per solve: NFE (calls of the map, counted by wrapping it, the same way for every library);
converged or not, and the final relative residual ``max_b ||f(z)-z|| / ||f(z)||`` of the
answer the solver returns, recomputed with one extra call; time to tolerance (median of
``repeats`` solves) and the overhead ratio ``solve time / (NFE x time of one call)``; the extra
memory (peak of the solve minus that of one call, :func:`deqlib.measure.peak_memory`); the
solver's own time and torch operations per call of the map (:func:`own_time_per_call`,
:func:`ops_per_call`). Backward: the implicit solve ``u = u J_f(z*) + dL/dz*``
(:class:`ImplicitBackward`), and the error of the parameter gradient against a long float64
reference solve (:func:`reference`, :func:`gradient_error`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ...measure import OpCounter, median_time, peak_memory
from ...solvers import solve
from .libraries import Solver
from .problems import Problem

__all__ = ["CallRecorder", "call_time", "Measurement", "measure_solve", "own_time_per_call", "ops_per_call",
           "ImplicitBackward", "gradient_error", "Reference", "reference"]


def _max_rel_residual(z: Tensor, fz: Tensor) -> float:
    d = (fz - z).flatten(1).norm(dim=1)
    return float((d / (fz.flatten(1).norm(dim=1) + 1e-12)).max())


class CallRecorder:
    """Wraps a map: counts its calls and, with ``record=True``, logs after each call the
    batch-max relative residual and the time since :meth:`start`, net of its own bookkeeping.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], record: bool = False):
        self.f = f
        self.record = record
        self.calls = 0
        self.trace: list[tuple[int, float, float]] = []  # (call, seconds, max rel residual)
        self._t0 = time.perf_counter()
        self._paused = 0.0

    def start(self) -> None:
        self._t0, self._paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        """Seconds since :meth:`start`, net of the recorder's own bookkeeping."""
        return time.perf_counter() - self._t0 - self._paused

    def __call__(self, z: Tensor) -> Tensor:
        out = self.f(z)
        self.calls += 1
        if self.record:
            if out.is_cuda:  # the call's kernels finish inside the timed span, not the paused one
                torch.cuda.synchronize(out.device)
            t = time.perf_counter()
            res = _max_rel_residual(z, out)
            self.trace.append((self.calls, t - self._t0 - self._paused, res))
            self._paused += time.perf_counter() - t
        return out


def call_time(fn: Callable[[], object], repeats: int, min_s: float = 0.02) -> float:
    """Median seconds of one ``fn()``, timing loops of several calls when one is tiny."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    n = max(1, int(min_s / max(one, 1e-7)))

    def loop() -> None:
        for _ in range(n):
            fn()

    return median_time(loop, repeats=max(5, repeats), warmup=1) / n


@dataclass
class Measurement:
    """One solve of one library and method (forward or backward); times in seconds."""

    nfe: int
    converged: bool
    residual: float
    time_s: float
    overhead: float
    extra_mem_mb: float
    trace: list[tuple[int, float, float]]
    answer: Tensor


@torch.no_grad()
def measure_solve(solver: Solver, f: Callable[[Tensor], Tensor], z0: Tensor, method: str,
                  max_iter: int, tol: float, repeats: int, call_s: float, call_peak: int) -> Measurement:
    """Record, time and measure the memory of ``solver`` on ``f`` from ``z0``.

    ``z0``: ``(B, D)``. ``call_s`` and ``call_peak`` are the time and peak bytes
    (:func:`deqlib.measure.peak_memory` on ``z0``'s device) of one call of ``f``: the overhead
    ratio's and the extra memory's baselines.
    """
    rec = CallRecorder(f, record=True)
    rec.start()
    answer = solver(rec, z0, method, max_iter, tol)
    recorded_s = rec.elapsed()
    fa = f(answer)
    residual = _max_rel_residual(answer, fa)
    # The recorded run is the first of the ``repeats`` timed ones (its bookkeeping excluded).
    times = [recorded_s] + [median_time(lambda: solver(f, z0, method, max_iter, tol), repeats=1,
                                        warmup=0) for _ in range(repeats - 1)]
    t = sorted(times)[len(times) // 2]
    peak = peak_memory(lambda: solver(f, z0, method, max_iter, tol), z0.device)
    return Measurement(
        nfe=rec.calls, converged=bool(residual < tol), residual=residual, time_s=t,
        overhead=t / (rec.calls * call_s), extra_mem_mb=(peak.nbytes - call_peak) / 2**20,
        trace=rec.trace, answer=answer,
    )


class ImplicitBackward:
    """The implicit backward at ``z* (B, D)``: ``step(u) = u J_f(z*) + g`` on ``(B, D)`` and the
    parameter gradient ``u df/dtheta``, flat (``L = <g, z*>``, so ``dL/dtheta`` solves
    ``u = u J + g``)."""

    def __init__(self, problem: Problem, z_star: Tensor):
        self.params = problem.params()
        self.g = problem.grad_out.to(z_star.dtype)
        self.z = z_star.detach().requires_grad_()
        with torch.enable_grad():
            self.fz = problem.f(self.z)

    def step(self, u: Tensor) -> Tensor:
        (uj,) = torch.autograd.grad(self.fz, self.z, u, retain_graph=True)
        return uj + self.g

    def param_grad(self, u: Tensor) -> Tensor:
        grads = torch.autograd.grad(self.fz, self.params, u, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])


def gradient_error(grad: Tensor, ref: Tensor) -> float:
    """Relative error ``||grad - ref|| / ||ref||`` (computed in float64)."""
    if grad.shape != ref.shape:
        raise ValueError(f"gradient shapes differ: {tuple(grad.shape)} vs reference {tuple(ref.shape)}")
    ref64 = ref.double()
    return float((grad.double() - ref64).norm() / ref64.norm().clamp_min(1e-300))


@dataclass
class Reference:
    """A long float64 solve: the fixed point, the gradient and how well both were solved."""

    z_star: Tensor
    grad: Tensor
    forward_residual: float
    backward_residual: float
    forward_nfe: int
    backward_nfe: int


def reference(problem: Problem, tol: float = 1e-8, max_iter: int = 2000) -> Reference:
    """Forward and backward solved in float64 with deqlib's Anderson to ``tol``."""
    p64 = problem.to(torch.float64)
    fwd = solve(p64.f, p64.z0, method="anderson", max_iter=max_iter, tol=tol)
    bw = ImplicitBackward(p64, fwd.z)
    with torch.no_grad():
        bwd = solve(bw.step, bw.g, method="anderson", max_iter=max_iter, tol=tol)
    return Reference(fwd.z, bw.param_grad(bwd.z), float(fwd.rel_residual.max()),
                     float(bwd.rel_residual.max()), fwd.nfe, bwd.nfe)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def own_time_per_call(f: Callable[[Tensor], Tensor], z0: Tensor, method: str, max_iter: int, tol: float,
                      check_every: int = 1) -> float:
    """Seconds per f call that one solve spends outside f: its own work, whatever the time
    of f happens to be in this process (f's page faults vary between runs). On a GPU each call
    is bracketed by synchronizations, so the solver's kernels are not counted as f's."""
    inside = [0.0]

    def timed_f(z: Tensor) -> Tensor:
        _sync(z.device)
        t0 = time.perf_counter()
        out = f(z)
        _sync(z.device)
        inside[0] += time.perf_counter() - t0
        return out

    t0 = time.perf_counter()
    res = solve(timed_f, z0, method=method, max_iter=max_iter, tol=tol, check_every=check_every)
    return (time.perf_counter() - t0 - inside[0]) / res.nfe


def ops_per_call(f: Callable[[Tensor], Tensor], z0: Tensor, method: str, max_iter: int, tol: float,
                 check_every: int = 1) -> float:
    """Torch operations per f call that one solve runs outside f (views not counted): on a
    GPU, where a small solve is bound by launches, the solver's kernels per iteration."""
    with OpCounter() as counter:
        def counted_f(z: Tensor) -> Tensor:
            with counter.paused():
                return f(z)

        res = solve(counted_f, z0, method=method, max_iter=max_iter, tol=tol, check_every=check_every)
    return counter.count / res.nfe

