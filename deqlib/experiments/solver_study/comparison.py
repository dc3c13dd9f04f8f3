"""The comparison notebook 07 runs: every problem x library x method of a
:class:`~.config.SolversExperiment`, forward and backward, measured by :mod:`.measurement`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...jacobian import spectral_radius
from ...measure import peak_memory
from .config import LIBRARIES, METHODS, SolversExperiment
from .libraries import library_solver, resolve_libraries
from .measurement import ImplicitBackward, Reference, call_time, gradient_error, measure_solve, reference
from .problems import Problem, build_problem

__all__ = ["Comparison", "describe_problem", "call_time_drift", "run_one", "compare"]


@dataclass
class Comparison:
    """What :func:`compare` returns.

    ``problems``: one dict per problem (sizes, spectral radius, call costs, reference).
    ``rows``: one dict per (problem, library, method) with ``fwd_*`` and ``bwd_*`` columns and
    ``grad_error``. ``curves``: residual traces, one dict per call.
    """

    libraries: list[str]
    note: str
    problems: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)


def describe_problem(problem: Problem, exp: SolversExperiment) -> tuple[dict, Reference, dict]:
    """Reference solve, spectral radius at ``z*`` and the time/peak of one call of ``f`` and
    of one backward step. Returns (info row, reference, baselines)."""
    t0 = time.perf_counter()
    ref = reference(problem, exp.reference_tol, exp.reference_max_iter)
    t_ref = time.perf_counter() - t0
    z_star = ref.z_star.to(problem.z0.dtype)
    bw = ImplicitBackward(problem, z_star)
    gen = torch.Generator(device=bw.z.device).manual_seed(exp.seed + 2)
    rho = spectral_radius(bw.z, bw.fz, n_iter=exp.radius_iters, generator=gen)
    t_rho = time.perf_counter() - t0 - t_ref
    with torch.no_grad():
        f_s = call_time(lambda: problem.f(z_star), exp.repeats)
        f_peak = peak_memory(lambda: problem.f(z_star), z_star.device).nbytes
        u = bw.g.clone()
        b_s = call_time(lambda: bw.step(u), exp.repeats)
        b_peak = peak_memory(lambda: bw.step(u), u.device).nbytes
    B, D = problem.z0.shape
    info = {
        "problem": problem.name, "description": problem.description, "batch": B, "dim": D,
        "scale": problem.scale, "radius_max": float(rho.max()), "radius_mean": float(rho.mean()),
        "f_ms": f_s * 1e3, "vjp_step_ms": b_s * 1e3, "state_mb": problem.z0.numel() * 4 / 2**20,
        "ref_fwd_residual": ref.forward_residual, "ref_bwd_residual": ref.backward_residual,
        "ref_fwd_nfe": ref.forward_nfe, "ref_bwd_nfe": ref.backward_nfe,
        "reference_s": t_ref, "radius_s": t_rho,
    }
    return info, ref, {"f_s": f_s, "f_peak": f_peak, "b_s": b_s, "b_peak": b_peak}


def call_time_drift(problem: Problem, base: dict, z: Tensor, repeats: int) -> float:
    """Time of one call of ``f`` now over the one measured before the runs: far from 1 means
    something else shared the CPU while the runs were timed."""
    with torch.no_grad():
        return call_time(lambda: problem.f(z), repeats) / base["f_s"]


def run_one(problem: Problem, library: str, method: str, exp: SolversExperiment, ref: Reference,
            base: dict) -> tuple[dict, list[dict]]:
    """Forward and backward of one library and method on one problem: (row, curve rows)."""
    solver = library_solver(library, method)
    fwd = measure_solve(solver, problem.f, problem.z0, method, exp.max_iter, exp.tol, exp.repeats,
                        base["f_s"], base["f_peak"])
    bw = ImplicitBackward(problem, fwd.answer)
    bwd = measure_solve(solver, bw.step, bw.g, method, exp.max_iter, exp.backward_tol, exp.repeats,
                        base["b_s"], base["b_peak"])
    grad = bw.param_grad(bwd.answer)
    row = {"problem": problem.name, "library": library, "method": method}
    for prefix, m in (("fwd", fwd), ("bwd", bwd)):
        row.update({f"{prefix}_nfe": m.nfe, f"{prefix}_converged": m.converged,
                    f"{prefix}_residual": m.residual, f"{prefix}_time_s": m.time_s,
                    f"{prefix}_overhead": m.overhead, f"{prefix}_extra_mem_mb": m.extra_mem_mb})
    row["grad_error"] = gradient_error(grad, ref.grad)
    curves = [{"problem": problem.name, "library": library, "method": method, "direction": d,
               "nfe": n, "time_s": t, "max_rel_residual": r}
              for d, m in (("forward", fwd), ("backward", bwd)) for n, t, r in m.trace]
    return row, curves


def compare(exp: SolversExperiment, log: Callable[[str], None] | None = None) -> Comparison:
    """Run every problem x library x method of ``exp``; ``log`` gets a line per step."""
    log = log or (lambda _msg: None)
    libs, note = resolve_libraries(exp.libraries)
    out = Comparison(libraries=libs, note=note)
    for name in exp.problems:
        t0 = time.perf_counter()
        problem = build_problem(name, exp)
        info, ref, base = describe_problem(problem, exp)
        out.problems.append(info)
        log(f"{name}: built and described in {time.perf_counter() - t0:.1f} s (reference "
            f"{info['reference_s']:.1f} s, spectral radius {info['radius_s']:.1f} s; one call "
            f"{info['f_ms']:.3f} ms, backward step {info['vjp_step_ms']:.3f} ms)")
        # Libraries alternate within each method, so that a disturbance of the machine during
        # the runs hits both sides of a ratio alike.
        for method in exp.methods:
            for library in libs:
                t0 = time.perf_counter()
                row, curves = run_one(problem, library, method, exp, ref, base)
                out.rows.append(row)
                out.curves.extend(curves)
                log(f"  {library:>8} {method:<11} fwd NFE {row['fwd_nfe']:>4} "
                    f"bwd NFE {row['bwd_nfe']:>4}  ({time.perf_counter() - t0:.1f} s)")
        info["f_time_drift"] = call_time_drift(problem, base, ref.z_star.to(problem.z0.dtype), exp.repeats)
        if abs(info["f_time_drift"] - 1) > 0.25:
            log(f"  WARNING: one call of f now takes {info['f_time_drift']:.2f}x its time before the "
                "runs: the machine was shared, timings of this problem are unreliable")
    out.rows.sort(key=lambda r: (exp.problems.index(r["problem"]), LIBRARIES.index(r["library"]),
                                 METHODS.index(r["method"])))
    return out

