"""``python -m deqlib.bench solvers``: what each solver costs beyond its calls of ``f``, on the
calibrated MDEQ-sized conv map :class:`deqlib.experiments.solver_study.ConvMap`."""

from __future__ import annotations

import torch

from ..experiments.solver_study import calibrated_conv_map, ops_per_call, own_time_per_call
from ..measure import median_time, peak_memory
from ..solvers import METHODS, solve
from .environment import device_name, pick_device

__all__ = ["bench_solvers"]


@torch.no_grad()
def bench_solvers(
    batch: int = 32, channels: int = 64, size: int = 32, tol: float = 1e-3, repeats: int = 9,
    max_iters: tuple[int, int] = (30, 300), seed: int = 0, device: str | None = None, check_every: int = 1,
) -> dict:
    """Each method of :data:`deqlib.solvers.METHODS` on a seeded conv map, states
    ``(batch, channels, size, size)``, its scale calibrated so that plain iteration needs 20-40
    calls to reach ``tol``; ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when there is one).

    Per method: NFE and status of a solve with ``max_iters[0]``, its median time over
    ``repeats`` and overhead ratio (each solve against f timed just before it), its own time
    and torch operations per call of f, and its extra memory (peak of the solve minus that of
    one call of f) at each of ``max_iters``, in MB and in states. With ``check_every = k > 1``
    every method is also run with its stop test kept on the device and asked every ``k`` calls
    (:func:`deqlib.solvers.solve`'s option), as rows of their own. Returns the report
    ``python -m deqlib.bench solvers`` prints.
    """
    dev = pick_device(device)
    f = calibrated_conv_map(batch, channels, size, tol, seed).to(dev)  # calibrated on the CPU
    z0 = torch.zeros(batch, channels, size, size, device=dev)
    z1 = z0 + 0.1  # made outside the timings and the memory block: its cost is not f's
    f_time = median_time(lambda: f(z1), repeats=max(5, repeats))
    f_peak = peak_memory(lambda: f(z1), dev)
    state_bytes = z0.numel() * z0.element_size()
    methods = [(mth, k) for mth in sorted(METHODS) for k in sorted({1, check_every})]  # (method, check_every)
    first = {v: solve(f, z0, method=v[0], max_iter=max_iters[0], tol=tol, check_every=v[1]) for v in methods}
    # Each solve is paired with a timing of f just before it, and the ratio is taken per pair:
    # on a shared CPU the speed of f drifts by several percent between minutes. The methods
    # take turns within each repeat, so a slow minute falls on all of them alike.
    times: dict[tuple[str, int], list[float]] = {v: [] for v in methods}
    ratios: dict[tuple[str, int], list[float]] = {v: [] for v in methods}
    for _ in range(repeats):
        for method in methods:
            f_now = median_time(lambda: f(z1), repeats=5, warmup=0)
            times[method].append(median_time(
                lambda v=method: solve(f, z0, method=v[0], max_iter=max_iters[0], tol=tol, check_every=v[1]),
                repeats=1, warmup=0))
            ratios[method].append(times[method][-1] / (first[method].nfe * f_now))
    rows = []
    for method in methods:
        res = first[method]
        t, overhead = sorted(times[method])[repeats // 2], sorted(ratios[method])[repeats // 2]
        name, k = method
        own = own_time_per_call(f, z0, name, max_iters[0], tol, check_every=k)
        ops = ops_per_call(f, z0, name, max_iters[0], tol, check_every=k)
        mem = {}
        for mi in max_iters:
            peak = peak_memory(lambda n=mi, m=name, c=k: solve(f, z0, method=m, max_iter=n, tol=tol, check_every=c),
                               dev)
            mem[mi] = peak.nbytes - f_peak.nbytes
        rows.append({
            "method": name,
            "check_every": k,
            "nfe": res.nfe,
            "status": res.status,
            "max_rel_residual": float(res.rel_residual.max()),
            "time_s": t,
            "overhead": overhead,
            "overhead_range": (min(ratios[method]), max(ratios[method])),  # the spread over the repeats
            "own_ms_per_iter": own * 1e3,
            "ops_per_iter": ops,
            **{f"extra_mem_mb_max_iter_{mi}": mem[mi] / 2**20 for mi in max_iters},
            **{f"extra_mem_states_max_iter_{mi}": mem[mi] / state_bytes for mi in max_iters},
        })
    return {
        "problem": {"batch": batch, "channels": channels, "size": size, "tol": tol,
                    "scale": f.scale, "f_time_ms": f_time * 1e3, "state_mb": state_bytes / 2**20},
        "memory": f_peak.counted,
        "device": device_name(dev),
        "torch": torch.__version__,
        "rows": rows,
    }
