"""GPU probe behind outputs/device/RESULTS.md section 5: CUDA kernels and host syncs per solver
iteration on the issue #2 map (torch.profiler), and Broyden's window on the paper-width mdeq_hard
problem in full precision. Run from the repository root on a CUDA machine:

    PYTHONPATH=$PWD python scripts/device_probe.py
"""
import sys
import time
import torch
from torch.profiler import profile, ProfilerActivity
from deqlib.solvers import solve
from deqlib.config import load_experiment
from deqlib.experiments.solver_study import SolversExperiment, build_problem, calibrated_conv_map
dev = torch.device("cuda")
# 1. kernels and syncs per iteration on the issue #2 map
f = calibrated_conv_map(32, 64, 32, 1e-3, 0).to(dev)
z0 = torch.zeros(32, 64, 32, 32, device=dev)
for m in ["fixed_point", "anderson", "broyden"]:
    solve(f, z0, method=m, max_iter=30, tol=1e-3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = solve(f, z0, method=m, max_iter=30, tol=1e-3)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    kern = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(e.count for e in ev if "Synchronize" in e.key or "cudaMemcpy" in e.key and "Async" not in e.key)
    print(f"{m}: NFE {r.nfe}, CUDA kernels {kern} ({kern / r.nfe:.1f} per iteration, f included), "
          f"sync-type calls {syncs}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
    sys.stdout.flush()
# 2. Broyden window on the paper-width MDEQ hard problem, full precision
torch.backends.cudnn.allow_tf32 = False
exp = load_experiment(SolversExperiment, "solvers", "paper", {}, "params.yaml")
t = time.time()
p = build_problem("mdeq_hard", exp)
print(f"mdeq_hard built in {time.time()-t:.0f}s, t={p.scale:.6f}")
for w in [20, 40, 80, 200]:
    r = solve(p.f, p.z0, method="broyden", max_iter=200, tol=1e-3, window=w)
    print(f"broyden window {w}: forward NFE {r.nfe} {r.status} residual {float(r.rel_residual.max()):.2e}")
    sys.stdout.flush()
ra = solve(p.f, p.z0, method="anderson", max_iter=200, tol=1e-3)
print(f"anderson: forward NFE {ra.nfe} {ra.status} residual {float(ra.rel_residual.max()):.2e}")
