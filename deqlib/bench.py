"""Benchmarks that print measured figures (never asserted in tests).

    python -m deqlib.bench solvers [--batch 32 --channels 64 --size 32 --tol 1e-3]
    python -m deqlib.bench mdeq [--profile paper --batch 96 --precision no --steps 5]
    python -m deqlib.bench transformer [--profile paper --batch 15 --set model.d_inner=2000]
    python -m deqlib.bench compare [--profile paper --set repeats=1 --json out.json]

``mdeq``: one training step of the CIFAR-10 MDEQ of ``params.yaml`` (forward solve, implicit
backward, Adam step) on random images, without and with the Jacobian penalty applied at that
step; prints the median step time and the peak memory (``torch.cuda.max_memory_allocated`` on
a GPU, else the peak of live tensor bytes from :class:`deqlib.measure.PeakMemory`), with the
device named. The solver thresholds are the profile's, so every step runs the full 7 / 8 calls
unless the tolerance is met first.

``transformer``: training-step time and memory of the DEQ-Transformer without and with the
penalty and of the explicit weight-tied stack (see :func:`bench_transformer`).

``solvers``: each method on an MDEQ-sized conv map f(z) = GN(s * conv(relu(conv(z))) + x),
whose contraction s is calibrated so that plain iteration needs 20-40 calls to reach ``tol``.
Prints time to tolerance, NFE, the overhead ratio ``solve time / (NFE x median f time)`` (the
median over ``repeats`` solves, each against f timed just before it, and their min-max), the
solver's own time per f call (solve time minus the time spent inside f, over NFE), its torch
operations per f call (views not counted; on a GPU, its kernel launches), and the
solver's extra memory (peak live bytes of the solve minus those of one f call) at two
``max_iter`` values.

On CPU the time of one f call depends on glibc's heap trimming: freed 8 MB blocks are given
back to the OS and page-faulted in again on the next call, 0 to ~18000 faults per call (24 to
50 ms here) depending on the heap layout of the process. The overhead ratio therefore moved by
~25% between identical runs; the own-time column much less (it is measured against the f
calls of the same solve). ``main`` now calls :func:`deqlib.measure.steady_malloc` first, which
sets the same limits as ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``
from inside the process, so that freed blocks stay in the heap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .checks import check_int, check_int_list, check_real
from .config import parse_override
from .measure import OpCounter, PeakMemory, median_time, steady_malloc
from .solvers import METHODS, solve

__all__ = ["ConvMap", "calibrate_scale", "calibrated_conv_map", "bench_solvers", "bench_mdeq",
           "bench_transformer", "bench_compare", "main"]


CONV_GROUPS = 8  # GroupNorm groups of the ``solvers`` benchmark's map: its channels must be a multiple


class ConvMap(nn.Module):
    """``f(z) = GroupNorm(s * conv2(relu(conv1(z))) + x)``: an MDEQ-sized residual branch.

    Shapes: ``z, x: (B, C, H, W)``. ``s`` sets the contraction.
    """

    def __init__(self, channels: int, x: Tensor, scale: float = 1.0, groups: int = CONV_GROUPS):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, channels)
        self.register_buffer("x", x)  # a buffer: ``.double()`` and ``.to()`` carry the input along
        self.scale = scale

    def forward(self, z: Tensor) -> Tensor:
        return self.norm(self.scale * self.conv2(torch.relu(self.conv1(z))) + self.x)


def _plain_nfe(f: Callable[[Tensor], Tensor], z0: Tensor, tol: float, cap: int = 80) -> int:
    """Calls plain iteration needs to reach ``tol``; ``cap + 1`` when it does not (so that a
    diverging run, stopped early, never reads as a fast one)."""
    res = solve(f, z0, method="fixed_point", max_iter=cap, tol=tol)
    return res.nfe if res.status == "converged" else cap + 1


def calibrate_scale(
    set_scale: Callable[[float], Callable[[Tensor], Tensor]], z0: Tensor, tol: float,
    target: tuple[int, int] = (20, 40), hi: float = 64.0, steps: int = 30,
) -> float:
    """The scale ``s`` at which plain iteration of ``set_scale(s)`` from ``z0`` needs between
    ``target[0]`` and ``target[1]`` calls to reach ``tol`` (bisection on ``[0, hi]``).

    ``set_scale(s)`` returns the map at scale ``s``; larger ``s`` must mean slower convergence.
    Plain iteration stops at ``target[1] + 1`` calls, when the verdict "too slow" is known.
    Returns the last scale tried (the bisection stops as soon as one lands in ``target``).
    """
    check_int_list("target", target, 1, length=2, nondecreasing=True)  # (lo, hi) calls
    lo, mid = 0.0, 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        nfe = _plain_nfe(set_scale(mid), z0, tol, cap=target[1] + 1)
        if nfe < target[0]:
            lo = mid
        elif nfe > target[1]:
            hi = mid
        else:
            break
    return mid


def calibrated_conv_map(
    batch: int, channels: int, size: int, tol: float, seed: int = 0, target: tuple[int, int] = (20, 40)
) -> ConvMap:
    """A seeded ConvMap whose plain iteration needs ``target`` calls to reach ``tol``.

    The scale is found by bisection on a batch of 4 (:func:`calibrate_scale`); the full batch
    may need a few calls more or less.
    """
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, size, size)
    f = ConvMap(channels, x[:4]).eval()

    def set_scale(s: float) -> ConvMap:
        f.scale = s
        return f

    f.scale = calibrate_scale(set_scale, torch.zeros_like(x[:4]), tol, target)
    f.x = x
    return f


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _own_time_per_iter(f: ConvMap, z0: Tensor, method: str, max_iter: int, tol: float) -> float:
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
    res = solve(timed_f, z0, method=method, max_iter=max_iter, tol=tol)
    return (time.perf_counter() - t0 - inside[0]) / res.nfe


def _ops_per_iter(f: ConvMap, z0: Tensor, method: str, max_iter: int, tol: float) -> float:
    """Torch operations per f call that one solve runs outside f (views not counted): on a
    GPU, where a small solve is bound by launches, the solver's kernels per iteration."""
    with OpCounter() as counter:
        def counted_f(z: Tensor) -> Tensor:
            with counter.paused():
                return f(z)

        res = solve(counted_f, z0, method=method, max_iter=max_iter, tol=tol)
    return counter.count / res.nfe


@torch.no_grad()
def bench_solvers(
    batch: int = 32, channels: int = 64, size: int = 32, tol: float = 1e-3, repeats: int = 9,
    max_iters: tuple[int, int] = (30, 300), seed: int = 0, device: str | None = None,
) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    f = calibrated_conv_map(batch, channels, size, tol, seed).to(dev)  # calibrated on the CPU
    z0 = torch.zeros(batch, channels, size, size, device=dev)
    z1 = z0 + 0.1  # made outside the timings and the memory block: its cost is not f's
    f_time = median_time(lambda: f(z1), repeats=max(5, repeats))
    with PeakMemory() as pm:
        f(z1)
    f_peak = pm.peak
    state_bytes = z0.numel() * z0.element_size()
    methods = sorted(METHODS)
    first = {mth: solve(f, z0, method=mth, max_iter=max_iters[0], tol=tol) for mth in methods}
    # Each solve is paired with a timing of f just before it, and the ratio is taken per pair:
    # on a shared CPU the speed of f drifts by several percent between minutes. The methods
    # take turns within each repeat, so a slow minute falls on all of them alike.
    times: dict[str, list[float]] = {mth: [] for mth in methods}
    ratios: dict[str, list[float]] = {mth: [] for mth in methods}
    for _ in range(repeats):
        for method in methods:
            f_now = median_time(lambda: f(z1), repeats=5, warmup=0)
            times[method].append(median_time(
                lambda: solve(f, z0, method=method, max_iter=max_iters[0], tol=tol), repeats=1, warmup=0))
            ratios[method].append(times[method][-1] / (first[method].nfe * f_now))
    rows = []
    for method in methods:
        res = first[method]
        t, overhead = sorted(times[method])[repeats // 2], sorted(ratios[method])[repeats // 2]
        own = _own_time_per_iter(f, z0, method, max_iters[0], tol)
        ops = _ops_per_iter(f, z0, method, max_iters[0], tol)
        mem = {}
        for mi in max_iters:
            with PeakMemory() as pm:
                solve(f, z0, method=method, max_iter=mi, tol=tol)
            mem[mi] = pm.peak - f_peak
        rows.append({
            "method": method,
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
        "device": _device_name(dev),
        "torch": torch.__version__,
        "rows": rows,
    }


def _print_solvers(report: dict) -> None:
    p = report["problem"]
    print(f"solvers on ConvMap: batch {p['batch']}, {p['channels']} ch, {p['size']}x{p['size']}, "
          f"scale {p['scale']:.3f}, rel tol {p['tol']:g}; one f call {p['f_time_ms']:.1f} ms; "
          f"one state {p['state_mb']:.1f} MB; {report['device']}, torch {report['torch']}")
    mis = [k.rsplit("_", 1)[1] for k in report["rows"][0] if k.startswith("extra_mem_mb_")]
    head = f"{'method':<12}{'NFE':>5}{'status':>11}{'rel res':>10}{'time s':>9}{'overhead':>10}{'(min-max)':>12}"
    head += f"{'own ms/it':>11}{'ops/it':>8}"
    head += "".join(f"{'mem MB @' + m:>14}" for m in mis)
    print(head)
    for r in report["rows"]:
        line = (f"{r['method']:<12}{r['nfe']:>5}{r['status']:>11}{r['max_rel_residual']:>10.2e}"
                f"{r['time_s']:>9.3f}{r['overhead']:>10.3f}"
                f"{'%.3f-%.3f' % r['overhead_range']:>12}{r['own_ms_per_iter']:>11.1f}"
                f"{r['ops_per_iter']:>8.1f}")
        line += "".join(f"{r['extra_mem_mb_max_iter_' + m]:>14.1f}" for m in mis)
        print(line)


def bench_mdeq(profile: str = "paper", batch: int = 96, precision: str = "no", steps: int = 5,
               params_path: str = "params.yaml", device: str | None = None, seed: int = 0) -> dict:
    """Step time and peak memory of the CIFAR-10 MDEQ, without and with the penalty."""
    from .config import load_experiment
    from .experiments.cifar import CifarExperiment
    from .models.mdeq import MDEQ

    exp = load_experiment(CifarExperiment, "cifar10", profile, params_path=params_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.manual_seed(seed)
    size = exp.model.image_size
    x = torch.randn(batch, exp.model.in_channels, size, size, device=dev)
    y = torch.randint(0, exp.model.num_classes, (batch,), device=dev)
    penalty = exp.train.jacobian
    rows = []
    for jr in (False, True):
        torch.manual_seed(seed)
        model = MDEQ(exp.model, exp.train.forward, exp.train.backward).to(dev).train()
        opt = torch.optim.Adam(model.parameters(), lr=exp.train.lr)
        scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
        nfe: list[tuple[int, int]] = []

        def forward_backward() -> None:
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model((x, y))
                loss = out.loss
                if jr:
                    z, fz = out.stats.jacobian_inputs()
                    loss = loss + penalty.loss(z, fz, 0, 1)[0]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            nfe.append((out.stats.forward.nfe, out.stats.backward.nfe))

        def step() -> None:
            forward_backward()
            scaler.step(opt)
            scaler.update()

        step()  # warm-up: kernels chosen, Adam state allocated
        t = median_time(step, repeats=steps, warmup=0)
        opt.zero_grad(set_to_none=True)
        # Peak memory of forward + backward (the paper's training-memory comparison), then of a
        # whole step (the optimizer's update adds temporaries the size of the parameters).
        peaks = []
        for fn in (forward_backward, step):
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                fn()
                torch.cuda.synchronize(dev)
                peaks.append(torch.cuda.max_memory_allocated(dev))
            else:
                with PeakMemory() as pm:
                    fn()
                peaks.append(pm.peak)
        kind = ("torch.cuda.max_memory_allocated (parameters and Adam state included)" if cuda else
                "deqlib.measure.PeakMemory (live tensor bytes made inside; parameters and Adam state not included)")
        rows.append({"arm": "MDEQ + JR (penalty on this step)" if jr else "MDEQ", "step_time_s": t,
                     "peak_fwd_bwd_mb": peaks[0] / 2**20, "peak_step_mb": peaks[1] / 2**20,
                     "fwd_nfe": nfe[-1][0], "bwd_nfe": nfe[-1][1]})
        del model, opt
    return {"profile": profile, "batch": batch, "precision": precision, "device": _device_name(dev),
            "memory": kind, "torch": torch.__version__, "channels": list(exp.model.channels), "rows": rows}


def _print_mdeq(report: dict) -> None:
    print(f"MDEQ ({report['profile']} profile, scales {report['channels']}), batch {report['batch']}, "
          f"precision {report['precision']}; {report['device']}, torch {report['torch']}")
    print(f"memory: {report['memory']}")
    print(f"{'arm':<34}{'step s':>9}{'peak MB fwd+bwd':>17}{'peak MB step':>14}{'NFE f/b':>9}")
    for r in report["rows"]:
        print(f"{r['arm']:<34}{r['step_time_s']:>9.3f}{r['peak_fwd_bwd_mb']:>17.0f}{r['peak_step_mb']:>14.0f}"
              f"{r['fwd_nfe']:>6}/{r['bwd_nfe']}")


def bench_transformer(profile: str = "paper", batch: int = 15, overrides: dict | None = None,
                      vocab: int = 267_735, repeats: int = 3, params_path: str | None = None,
                      seed: int = 0) -> dict:
    """Training-step time and memory of the DEQ-Transformer (Post-LN) without and with the
    Jacobian penalty, and of the explicit weight-tied stack of ``model.n_layer`` layers, at
    ``batch`` segments of ``tgt_len`` tokens with a full memory of ``mem_len`` positions.

    A step is forward + loss (+ the penalty term, applied every step here) + backward; the
    optimizer step is left out (the same for all). Tokens are random over ``vocab`` words (the
    default is WikiText-103's 267,735), so no data set is needed. Memory: on CUDA the peak
    allocated bytes of a step above what was allocated before it; on any device the bytes
    autograd saves for backward (``saved``: all, ``core``: the layer(s) only) and, on CPU, the
    peak of live tensors created during the step (``peak``).
    """
    from dataclasses import replace
    from pathlib import Path

    from .config import load_experiment
    from .experiments.wikitext import WikiTextExperiment, activation_memory
    from .models.transformer import DEQTransformerLM, Memory

    root = Path(__file__).resolve().parent.parent
    exp = load_experiment(WikiTextExperiment, "wikitext", profile, overrides or {},
                          params_path or root / "params.yaml")
    cfg, tcfg = replace(exp.model, pre_ln=False), exp.train
    cfg.check_vocab(vocab)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, cfg.tgt_len + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    rows = []
    for name, explicit, penalty in (("deq", False, None), ("deq+jr", False, replace(tcfg.jacobian, p=1.0)),
                                    ("explicit", True, None)):
        torch.manual_seed(seed)
        model = DEQTransformerLM(cfg, vocab, tcfg.forward, tcfg.backward, explicit=explicit).to(device).train()
        memory = None
        if cfg.mem_len:
            memory = Memory(torch.randn(batch, cfg.mem_len, cfg.d_model, generator=g).to(device),
                            torch.zeros(batch, cfg.mem_len, 3 * cfg.n_head * cfg.d_head, device=device))
        nfe = {}

        def step() -> None:
            model.zero_grad(set_to_none=True)
            out = model.run(inputs, targets, memory)
            loss = out.loss
            if penalty is not None:
                z, fz = out.stats.jacobian_inputs()
                loss = loss + penalty.loss(z, fz, 0, 1)[0]
            loss.backward()
            if out.stats is not None:
                nfe["forward"], nfe["backward"] = out.stats.forward.nfe, out.stats.backward.nfe

        seconds = median_time(step, repeats=repeats, warmup=1)
        row = {"model": name, "layers": cfg.n_layer if explicit else None, "step_s": seconds,
               "fwd_nfe": nfe.get("forward"), "bwd_nfe": nfe.get("backward")}
        saved = activation_memory(model, inputs, targets, penalty)
        row["saved_bytes"], row["core_saved_bytes"] = saved["total"], saved["core"]
        if device.type == "cuda":
            torch.cuda.synchronize()
            model.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        else:
            model.zero_grad(set_to_none=True)
            with PeakMemory() as pm:
                step()
            row["peak_bytes"] = pm.peak
        rows.append(row)
        del model
    base_time = next(r["step_s"] for r in rows if r["model"] == "explicit")
    for r in rows:
        r["time_vs_explicit"] = r["step_s"] / base_time
    return {"profile": profile, "overrides": dict(overrides or {}), "batch": batch, "tgt_len": cfg.tgt_len,
            "mem_len": cfg.mem_len, "d_model": cfg.d_model, "d_inner": cfg.d_inner, "vocab": vocab,
            "forward": f"{tcfg.forward.method} {tcfg.forward.max_iter}",
            "backward": f"{tcfg.backward.method} {tcfg.backward.max_iter}",
            "device": _device_name(device), "torch": torch.__version__, "rows": rows}


def _print_transformer(report: dict) -> None:
    r = report
    print(f"DEQ-Transformer ({r['profile']} profile{', ' + str(r['overrides']) if r['overrides'] else ''}): "
          f"batch {r['batch']}, tgt_len {r['tgt_len']}, mem_len {r['mem_len']}, d_model {r['d_model']}, "
          f"d_inner {r['d_inner']}, vocab {r['vocab']}; solvers {r['forward']} / {r['backward']}; "
          f"{r['device']}, torch {r['torch']}")
    peak_key = "cuda_peak_bytes" if "cuda_peak_bytes" in r["rows"][0] else "peak_bytes"
    print(f"{'model':<10}{'layers':>7}{'NFE f/b':>9}{'step s':>9}{'vs expl.':>10}{'saved MB':>10}"
          f"{'core MB':>9}{('CUDA peak MB' if peak_key == 'cuda_peak_bytes' else 'peak MB'):>14}")
    for row in r["rows"]:
        nfe = f"{row['fwd_nfe']}/{row['bwd_nfe']}" if row["fwd_nfe"] is not None else "-"
        print(f"{row['model']:<10}{row['layers'] or '-':>7}{nfe:>9}{row['step_s']:>9.3f}"
              f"{row['time_vs_explicit']:>10.2f}{row['saved_bytes'] / 2**20:>10.1f}"
              f"{row['core_saved_bytes'] / 2**20:>9.1f}{row[peak_key] / 2**20:>14.1f}")


def bench_compare(profile: str = "paper", overrides: dict | None = None, params_path: str | None = None) -> dict:
    """Notebook 07's comparison (deqlib's solvers against torchdeq's) outside a notebook, for
    machines without Jupyter: the same :func:`deqlib.experiments.solvers.compare`."""
    from dataclasses import asdict
    from pathlib import Path

    from .config import load_experiment, to_dict
    from .experiments.solvers import SolversExperiment, compare, target_checks, time_ratios, torchdeq_version

    root = Path(__file__).resolve().parent.parent
    exp = load_experiment(SolversExperiment, "solvers", profile, overrides or {}, params_path or root / "params.yaml")
    dev = exp.torch_device()
    result = compare(exp, log=print)
    return {"profile": profile, "overrides": dict(overrides or {}), "config": to_dict(exp),
            "device": _device_name(dev),
            "torch": torch.__version__, "torchdeq": torchdeq_version(), "note": result.note,
            **{k: v for k, v in asdict(result).items() if k in ("problems", "rows", "curves")},
            "checks": target_checks(result), "ratios": {d: time_ratios(result.rows, d) for d in ("fwd", "bwd")}}


def _print_compare(report: dict) -> None:
    print(f"solver comparison ({report['profile']} profile): {report['note']}; {report['device']}, "
          f"torch {report['torch']}")
    print(f"{'problem':<17}{'f ms':>8}{'library':>10}{'method':>12}{'NFE f/b':>10}{'conv f/b':>10}"
          f"{'fwd ms':>9}{'ovh f':>7}{'ovh b':>7}{'grad err':>10}")
    f_ms = {p["problem"]: p["f_ms"] for p in report["problems"]}
    for r in report["rows"]:
        conv = "/".join("y" if r[f"{d}_converged"] else "n" for d in ("fwd", "bwd"))
        print(f"{r['problem']:<17}{f_ms[r['problem']]:>8.2f}{r['library']:>10}{r['method']:>12}"
              f"{str(r['fwd_nfe']) + '/' + str(r['bwd_nfe']):>10}{conv:>10}{r['fwd_time_s'] * 1e3:>9.1f}"
              f"{r['fwd_overhead']:>7.2f}{r['bwd_overhead']:>7.2f}{r['grad_error']:>10.1e}")
    for d, by_method in report["ratios"].items():
        for method, v in by_method.items():
            if v["all"] is not None:
                both = f"{v['both_converged']:.3f}" if v["both_converged"] is not None else "-"
                print(f"{d} {method:<11} deqlib/torchdeq time, geomean: all {v['all']:.3f} (n={v['n_all']}), "
                      f"both converged {both} (n={v['n_both_converged']})")


def _device_name(dev: torch.device) -> str:
    """The device a report was measured on, in words."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument of ``args.bench`` checked before any work, each failure one usage line
    (``parser.error``, exit status 2): a benchmark runs for minutes, so a bad ``--tol`` or
    ``--channels`` must not end in a traceback part-way, nor a missing ``--json`` folder be found
    after all of it. The profile's configuration is built here too, overrides and all, as the
    benchmark builds it."""
    from .config import load_experiment

    root = Path(__file__).resolve().parent.parent
    try:
        counts = {"solvers": ("batch", "channels", "size", "repeats"), "mdeq": ("batch", "steps"),
                  "transformer": ("batch", "repeats"), "compare": ()}[args.bench]
        for name in counts:
            check_int(f"--{name}", getattr(args, name), 1)
        if args.bench == "solvers":
            check_real("--tol", args.tol, minimum=0, maximum=1, min_open=True, max_open=True)
            if args.channels % CONV_GROUPS:
                raise ValueError(f"--channels must be a multiple of {CONV_GROUPS} (the map's GroupNorm groups), "
                                 f"got --channels={args.channels}")
            if args.device == "cuda" and not torch.cuda.is_available():
                raise ValueError("--device cuda, but torch sees no CUDA device here")
        elif args.bench == "mdeq":
            from .experiments.cifar import CifarExperiment

            if not Path(args.params).is_file():
                raise ValueError(f"--params must be a params.yaml file, got --params={args.params!r} (no such file)")
            load_experiment(CifarExperiment, "cifar10", args.profile, params_path=args.params)
        elif args.bench == "transformer":
            from .experiments.wikitext import WikiTextExperiment

            check_int("--vocab", args.vocab, 2)
            exp = load_experiment(WikiTextExperiment, "wikitext", args.profile, dict(args.overrides),
                                  root / "params.yaml")
            exp.model.check_vocab(args.vocab)
        else:
            from .experiments.solvers import SolversExperiment

            load_experiment(SolversExperiment, "solvers", args.profile, dict(args.overrides), root / "params.yaml")
        _check_output("--json", args.json)
    except ValueError as err:
        parser.error(" ".join(str(err).split()))


def _check_output(name: str, path: str | None) -> None:
    """``path`` (when given) can be written: not a folder, in a folder that exists and is writable."""
    if path is None:
        return
    folder = Path(path).parent
    why = ("a folder" if Path(path).is_dir() else f"no folder {folder}" if not folder.is_dir()
           else f"folder {folder} not writable" if not os.access(folder, os.W_OK | os.X_OK) else None)
    if why:
        raise ValueError(f"{name} must be a file in an existing, writable folder, got {name}={path!r} ({why})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deqlib.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("solvers", help="solver time, NFE, overhead and memory on a conv map")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--channels", type=int, default=64)
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--tol", type=float, default=1e-3)
    s.add_argument("--repeats", type=int, default=9)
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    s.add_argument("--json", help="also write the figures to this JSON file")
    m = sub.add_parser("mdeq", help="step time and peak memory of the CIFAR-10 MDEQ, without and with JR")
    m.add_argument("--profile", choices=["paper", "small"], default="paper")
    m.add_argument("--batch", type=int, default=96)
    m.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    m.add_argument("--steps", type=int, default=5, help="timed steps (median), after one warm-up step")
    m.add_argument("--params", default="params.yaml", help="the params.yaml to read the profile from")
    m.add_argument("--json", help="also write the figures to this JSON file")
    t = sub.add_parser("transformer", help="DEQ-Transformer step time and memory: DEQ, DEQ + JR, explicit stack")
    t.add_argument("--profile", choices=["paper", "small"], default="paper")
    t.add_argument("--batch", type=int, default=15)
    t.add_argument("--vocab", type=int, default=267_735, help="vocabulary size (WikiText-103's by default)")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                   metavar="KEY=VALUE",
                   help="override a parameter of the wikitext profile, e.g. model.d_inner=2000")
    t.add_argument("--json", help="also write the figures to this JSON file")
    c = sub.add_parser("compare", help="notebook 07's deqlib-vs-torchdeq comparison, without Jupyter")
    c.add_argument("--profile", choices=["paper", "small"], default="paper")
    c.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                   metavar="KEY=VALUE",
                   help="override a parameter of the solvers profile, e.g. repeats=1")
    c.add_argument("--json", help="also write the figures (and residual curves) to this JSON file")
    args = parser.parse_args(argv)
    # Everything a run could fail on, before any work; the usage line is the subcommand's.
    _check_args({"solvers": s, "mdeq": m, "transformer": t, "compare": c}[args.bench], args)
    if args.bench == "compare":
        steady_malloc()
        report = bench_compare(args.profile, dict(args.overrides))
        _print_compare(report)
    elif args.bench == "mdeq":
        report = bench_mdeq(args.profile, args.batch, args.precision, args.steps, args.params)
        _print_mdeq(report)
    elif args.bench == "transformer":
        steady_malloc()  # CPU timings: keep freed blocks in the heap (see the module docstring)
        report = bench_transformer(args.profile, args.batch, dict(args.overrides), args.vocab, args.repeats)
        _print_transformer(report)
    else:
        steady_malloc()
        report = bench_solvers(args.batch, args.channels, args.size, args.tol, args.repeats, device=args.device)
        _print_solvers(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0

if __name__ == "__main__":
    sys.exit(main())
