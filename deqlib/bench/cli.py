"""Benchmarks that print measured figures (never asserted in tests).

    python -m deqlib.bench solvers [--batch 32 --channels 64 --size 32 --tol 1e-3]
    python -m deqlib.bench mdeq [--profile paper --batch 96 --precision no --steps 5]
    python -m deqlib.bench transformer [--profile paper --batch 15 --set model.d_inner=2000]
    python -m deqlib.bench compare [--profile paper --set repeats=1 --json out.json]

``mdeq``: one training step of the CIFAR-10 (``--experiment imagenet``: ImageNet) MDEQ of
``params.yaml`` (forward solve, implicit backward, Adam step) on random images, without and
with the Jacobian penalty applied at that step; prints the median step time and the peak memory
(:func:`deqlib.measure.peak_memory`: ``torch.cuda.max_memory_allocated`` on a GPU, else the
peak of live tensor bytes), with the device named and what the peak counts. The solver
thresholds are the profile's, so every step runs the full 7 / 8 calls unless the tolerance is
met first.

``transformer``: training-step time and memory of the DEQ-Transformer without and with the
penalty and of the explicit weight-tied stack (see :func:`deqlib.bench.bench_transformer`).

``solvers``: each method on an MDEQ-sized conv map f(z) = GN(s * conv(relu(conv(z))) + x),
whose contraction s is calibrated so that plain iteration needs 20-40 calls to reach ``tol``.
Prints time to tolerance, NFE, the overhead ratio ``solve time / (NFE x median f time)`` (the
median over ``repeats`` solves, each against f timed just before it, and their min-max), the
solver's own time per f call (solve time minus the time spent inside f, over NFE), its torch
operations per f call (views not counted; on a GPU, its kernel launches), and the
solver's extra memory (the peak of the solve minus that of one f call) at two ``max_iter``
values.

On CPU the time of one f call depends on glibc's heap trimming: freed 8 MB blocks are given
back to the OS and page-faulted in again on the next call, 0 to ~18000 faults per call (24 to
50 ms here) depending on the heap layout of the process, and the overhead ratio by ~25%
between identical runs; the own-time column much less (it is measured against the f calls of
the same solve). So :func:`main` calls :func:`deqlib.measure.steady_malloc` first, which
sets the same limits as ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``
from inside the process, so that freed blocks stay in the heap.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..checks import check_int, check_real
from ..config import load_experiment, parse_override
from ..experiments.cifar import CifarExperiment
from ..experiments.solver_study import CONV_GROUPS, SolversExperiment
from ..experiments.wikitext import WikiTextExperiment
from ..measure import steady_malloc
from .comparison import bench_compare
from .environment import CHECKOUT_PARAMS
from .model_step import PRECISIONS, bench_mdeq, bench_transformer
from .solver_cost import bench_solvers

__all__ = ["main"]


def _print_solvers(report: dict) -> None:
    p = report["problem"]
    print(f"solvers on ConvMap: batch {p['batch']}, {p['channels']} ch, {p['size']}x{p['size']}, "
          f"scale {p['scale']:.3f}, rel tol {p['tol']:g}; one f call {p['f_time_ms']:.1f} ms; "
          f"one state {p['state_mb']:.1f} MB; {report['device']}, torch {report['torch']}")
    print(f"memory: {report['memory']}")
    mis = [k.rsplit("_", 1)[1] for k in report["rows"][0] if k.startswith("extra_mem_mb_")]
    head = (f"{'method':<12}{'check':>6}{'NFE':>5}{'status':>11}{'rel res':>10}{'time s':>9}{'overhead':>10}"
            f"{'(min-max)':>12}")
    head += f"{'own ms/it':>11}{'ops/it':>8}"
    head += "".join(f"{'mem MB @' + m:>14}" for m in mis)
    print(head)
    for r in report["rows"]:
        line = (f"{r['method']:<12}{r.get('check_every', 1):>6}{r['nfe']:>5}{r['status']:>11}"
                f"{r['max_rel_residual']:>10.2e}"
                f"{r['time_s']:>9.3f}{r['overhead']:>10.3f}"
                f"{'{:.3f}-{:.3f}'.format(*r['overhead_range']):>12}{r['own_ms_per_iter']:>11.1f}"
                f"{r['ops_per_iter']:>8.1f}")
        line += "".join(f"{r['extra_mem_mb_max_iter_' + m]:>14.1f}" for m in mis)
        print(line)


def _print_mdeq(report: dict) -> None:
    print(f"MDEQ ({report['experiment']}, {report['profile']} profile, scales {report['channels']}), batch "
          f"{report['batch']}, precision {report['precision']}; {report['device']}, torch {report['torch']}")
    print(f"memory: {report['memory']}")
    print(f"{'arm':<34}{'step s':>9}{'images/s':>10}{'peak MB fwd+bwd':>17}{'peak MB step':>14}{'NFE f/b':>9}")
    for r in report["rows"]:
        print(f"{r['arm']:<34}{r['step_time_s']:>9.3f}{r['images_per_s']:>10.1f}{r['peak_fwd_bwd_mb']:>17.0f}"
              f"{r['peak_step_mb']:>14.0f}{r['fwd_nfe']:>6}/{r['bwd_nfe']}")


def _print_transformer(report: dict) -> None:
    r = report
    print(f"DEQ-Transformer ({r['profile']} profile{', ' + str(r['overrides']) if r['overrides'] else ''}): "
          f"batch {r['batch']}, tgt_len {r['tgt_len']}, mem_len {r['mem_len']}, d_model {r['d_model']}, "
          f"d_inner {r['d_inner']}, vocab {r['vocab']}; solvers {r['forward']} / {r['backward']}; "
          f"{r['device']}, torch {r['torch']}")
    print(f"memory: {r['memory']}")
    peak_key = "cuda_peak_bytes" if "cuda_peak_bytes" in r["rows"][0] else "peak_bytes"
    print(f"{'model':<10}{'layers':>7}{'NFE f/b':>9}{'step s':>9}{'vs expl.':>10}{'saved MB':>10}"
          f"{'core MB':>9}{('CUDA peak MB' if peak_key == 'cuda_peak_bytes' else 'peak MB'):>14}")
    for row in r["rows"]:
        nfe = f"{row['fwd_nfe']}/{row['bwd_nfe']}" if row["fwd_nfe"] is not None else "-"
        print(f"{row['model']:<10}{row['layers'] or '-':>7}{nfe:>9}{row['step_s']:>9.3f}"
              f"{row['time_vs_explicit']:>10.2f}{row['saved_bytes'] / 2**20:>10.1f}"
              f"{row['core_saved_bytes'] / 2**20:>9.1f}{row[peak_key] / 2**20:>14.1f}")


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


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument of ``args.bench`` checked before any work, each failure one usage line
    (``parser.error``, exit status 2): a benchmark runs for minutes, so a bad ``--tol`` or
    ``--channels`` must not end in a traceback part-way, nor a missing ``--json`` folder be found
    after all of it. The profile's configuration is built here too, overrides and all, as the
    benchmark builds it."""
    try:
        counts = {"solvers": ("batch", "channels", "size", "repeats", "check_every"), "mdeq": ("batch", "steps"),
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
            if not Path(args.params).is_file():
                raise ValueError(f"--params must be a params.yaml file, got --params={args.params!r} (no such file)")
            load_experiment(CifarExperiment, "cifar10", args.profile, params_path=args.params)
        elif args.bench == "transformer":
            check_int("--vocab", args.vocab, 2)
            exp = load_experiment(WikiTextExperiment, "wikitext", args.profile, dict(args.overrides),
                                  CHECKOUT_PARAMS)
            exp.model.check_vocab(args.vocab)
        else:
            load_experiment(SolversExperiment, "solvers", args.profile, dict(args.overrides), CHECKOUT_PARAMS)
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
    """``python -m deqlib.bench`` on ``argv`` (default: the command line): run one benchmark,
    print its figures (and write them to ``--json``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m deqlib.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("solvers", help="solver time, NFE, overhead and memory on a conv map")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--channels", type=int, default=64)
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--tol", type=float, default=1e-3)
    s.add_argument("--repeats", type=int, default=9)
    s.add_argument("--check-every", type=int, default=1,
                   help="also run each method with its stop test on the device, asked every K calls")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    s.add_argument("--json", help="also write the figures to this JSON file")
    m = sub.add_parser("mdeq", help="step time, images/s and peak memory of an MDEQ, without and with JR")
    m.add_argument("--experiment", choices=["cifar10", "imagenet"], default="cifar10",
                   help="whose MDEQ: params.yaml's cifar10 or imagenet section")
    m.add_argument("--profile", choices=["paper", "small"], default="paper")
    m.add_argument("--batch", type=int, default=96)
    m.add_argument("--precision", choices=list(PRECISIONS), default="no")
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
        report = bench_mdeq(args.profile, args.batch, args.precision, args.steps, args.params,
                            experiment=args.experiment)
        _print_mdeq(report)
    elif args.bench == "transformer":
        steady_malloc()  # CPU timings: keep freed blocks in the heap (see the module docstring)
        report = bench_transformer(args.profile, args.batch, dict(args.overrides), args.vocab, args.repeats)
        _print_transformer(report)
    else:
        steady_malloc()
        report = bench_solvers(args.batch, args.channels, args.size, args.tol, args.repeats, device=args.device,
                               check_every=args.check_every)
        _print_solvers(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0
