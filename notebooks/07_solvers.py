# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Which solver once JR has made the map contractive: plain iteration, Anderson, Broyden
#
# **Question.** A DEQ spends its time in root solves: forward ($z^* = f(z^*)$) and backward
# (the implicit-function-theorem system $u = u\,J_f(z^*) + \partial L/\partial z^*$). The paper
# solves both with Anderson acceleration or Broyden's method (Table 4: forward / backward
# tolerance $10^{-3}$ / $10^{-4}$ on the relative residual $\lVert f(z)-z\rVert/\lVert f(z)\rVert$)
# and regularizes $\lVert J_f\rVert_F$ to make the map better conditioned. Plain fixed-point
# iteration converges at the rate of the spectral radius $\rho$ of $J_f(z^*)$, and each of its
# calls costs only the call of $f$. So a reader asks: **once JR has brought $\rho$ down, does
# plain iteration match Anderson or Broyden, at a lower cost per call?** And does Table 4's
# tighter backward tolerance buy a more accurate gradient?
#
# **Headline experiment.** Notebook 02's Post-LN DEQ-Transformer arms, **without and with JR**
# (same model, solvers, thresholds and penalty as there), trained briefly here on the WikiText
# slice, one run per training seed; the two arms of a seed share the initialization and the data
# order, so they pair. On each trained map, on a fixed evaluation batch (the second segment of
# the evaluation stream after the first's memory): $\rho$ and $\lVert J_f\rVert_F/\sqrt d$ at
# the equilibrium; the calls of $f$ each method needs to reach $10^{-3}$ (per sample: every
# sample stops on its own) and the time of that solve in calls of $f$; and the error of the
# parameter gradient when the backward is solved to $10^{-4}$ or $10^{-3}$, against a float64
# reference solved to $10^{-8}$.
#
# **Second: the libraries.** deqlib's three methods against torchdeq 0.1.0's (the DEQ library
# of the paper's authors, through its public solver API) on seeded problems from the synthetic
# experiment, the MDEQ and the DEQ-Transformer, each in a plain and a hard variant ($\rho$ near
# 1). Then what a GPU run of the same comparison at paper size found.
#
# torchdeq is optional (`pip install "deqlib[bench]"`); without it the comparison reports
# deqlib's rows only.

# %%
import time

t_notebook = time.perf_counter()
import json
import math
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display
from matplotlib import pyplot as plt

from deqlib.config import load_experiment, to_dict
from deqlib.experiments.core import by_arm, compare as compare_arms, run_arms, summarize
from deqlib.experiments.solver_study import SolversExperiment, compare, device_run, resolve_libraries, time_ratios
from deqlib.experiments.solver_study import trained
from deqlib.experiments.wikitext import ARMS
from deqlib.measure import steady_malloc
from deqlib.report import PAPER, make_output_dir, use_style, write_curves, write_metrics
from deqlib.report.claims import Claim, claims_markdown, claims_table, fmt_mean_se, judge
from deqlib.stats import paired_t

use_style()
pd.set_option("display.width", 200, "display.max_columns", 50, "display.max_colwidth", 80)
# Keep glibc from returning freed blocks to the OS between calls: otherwise the time of one
# call of f swings with the heap's history (see deqlib/bench/cli.py).
malloc_steady = steady_malloc()

# %% tags=["parameters"]
profile = "small"  # "paper" or "small"; the runner injects the profile DVC chose
overrides = {}  # e.g. {"repeats": 1} for a smoke run
output_dir = ""  # where metrics, curves and figures go ("" writes nothing)
params_path = "../params.yaml"

# %%
exp = load_experiment(SolversExperiment, "solvers", profile, overrides, params_path)
out = make_output_dir(output_dir)
w = exp.trained
print(f"profile: {profile}")
for key, value in to_dict(exp).items():
    if key != "trained":
        print(f"{key:>18}: {value}")
print("trained maps:")
for key in ("arms", "seeds", "thresholds"):
    print(f"{key:>18}: {getattr(w, key)}")
for key, value in to_dict(w.model).items():
    print(f"{'model.' + key:>18}: {value}")
for key in ("max_steps", "batch_size", "lr", "pretrain_steps", "forward", "backward", "jacobian"):
    print(f"{'train.' + key:>18}: {getattr(w.train, key)}")
libraries, note = resolve_libraries(exp.libraries)
print(note)

# %% [markdown]
# ## 1 · Solvers on maps trained without and with JR
#
# Each arm trains for `train.max_steps` steps (notebook 02's small arms train longer; this is
# the start of their training, enough to separate the arms' Jacobians). The training loop's
# monitor measures $\rho$ and $\lVert J_f\rVert_F$ on the fixed batch during training. What it
# took: with three seeds the difference in $\rho$ between the arms was inconclusive; the runs
# are cheap, so the small profile trains five. Both arms' maps are already contractive this
# early (plain iteration converges on every sample), so this is the regime where the question
# is whether acceleration still pays, not whether plain iteration converges at all.

# %%
# NBVAL_IGNORE_OUTPUT
data = trained.load_data(exp, Path(params_path).parent)
no_jr = next(a for a in w.arms if not ARMS[a].jr)
with_jr = next(a for a in w.arms if ARMS[a].jr)
t0 = time.perf_counter()
results = run_arms(trained.run_arm, exp, [no_jr, with_jr], w.seeds, data, progress=False)
train_s = time.perf_counter() - t0
print(f"trained and measured {len(results)} maps in {train_s:.0f} s")

# %% [markdown]
# The mechanism, per arm (mean ± standard error over seeds): the spectral radius at the
# equilibrium of the fixed batch (mean over its streams and the largest), $\lVert J_f\rVert_F /
# \sqrt d$ (the square root of the penalty's quantity) and the training loss at the end.

# %%
methods = list(exp.methods)
tols = [trained.tol_key(t) for t in exp.backward_tols]
MECH = ["radius", "radius_max", "jac_fro", "final_train_loss"]
COST = [f"{m}_{k}" for m in methods for k in ("nfe_per_sample", "nfe", "converged")]
GRAD = [f"{m}_grad_err{at}_{t}" for m in methods for at in ("", "_fwd") for t in tols]
summary = summarize(results, MECH + COST + GRAD + ["plain_over_best_nfe"])


def cell(arm: str, key: str, digits: int = 3) -> str:
    mean, se, n = summary[arm][key]
    return f"{mean:.{digits}g} ± {se:.1g}" if math.isfinite(se) else f"{mean:.{digits}g}"


display(pd.DataFrame([{"arm": a, "rho (mean)": cell(a, "radius", 2), "rho (max)": cell(a, "radius_max", 2),
                       "||J||_F/sqrt(d)": cell(a, "jac_fro", 2), "train loss": cell(a, "final_train_loss", 3)}
                      for a in (no_jr, with_jr)]).set_index("arm"))

# %% [markdown]
# Calls of $f$ to reach the forward tolerance, per method: per sample (each stops on its own)
# and for the batch (the slowest sample), with the share of samples that reached it.

# %%
display(pd.DataFrame([{"arm": a, "method": m, "calls per sample": cell(a, f"{m}_nfe_per_sample", 3),
                       "calls (batch)": cell(a, f"{m}_nfe", 3), "reached tol": cell(a, f"{m}_converged", 2)}
                      for a in (no_jr, with_jr) for m in methods]).set_index(["arm", "method"]))

# %% [markdown]
# The time of the same solves in calls of $f$ (time of the solve / time of one call; a
# solver costing nothing beyond $f$ would show its call count). These vary from run to run.

# %%
# NBVAL_IGNORE_OUTPUT
timed = {a: {k: [r.metrics[k] for r in rs] for k in [f"{m}_time_calls" for m in methods] + ["plain_over_best", "f_ms"]}
         for a, rs in by_arm(results).items()}
display(pd.DataFrame([{"arm": a, "method": m, "time in calls of f": fmt_mean_se(timed[a][f"{m}_time_calls"], 3),
                       "one call of f, ms": fmt_mean_se(timed[a]["f_ms"], 2)}
                      for a in (no_jr, with_jr) for m in methods]).set_index(["arm", "method"]))

# %% [markdown]
# Gradient error $\lVert\nabla-\nabla_\text{ref}\rVert/\lVert\nabla_\text{ref}\rVert$ of the
# layer's parameters with the backward solved to each tolerance, by the same method as the
# forward: linearized at the reference equilibrium (the backward tolerance alone) and at the
# method's own forward answer to $10^{-3}$ (what a training step gets).

# %%
display(pd.DataFrame([{"arm": a, "method": m,
                       **{f"at z*, bwd {t}": cell(a, f"{m}_grad_err_{t}", 2) for t in tols},
                       **{f"at fwd answer, bwd {t}": cell(a, f"{m}_grad_err_fwd_{t}", 2) for t in tols}}
                      for a in (no_jr, with_jr) for m in methods]).set_index(["arm", "method"]))

# %% [markdown]
# Left and middle: $\rho$ and $\lVert J_f\rVert_F/\sqrt d$ on the fixed batch during training
# (thin: each seed; thick: the mean). Right: calls to the forward tolerance against $\rho$, one
# point per trained map and method.

# %%
colors = {"fixed_point": "C0", "anderson": "C1", "broyden": "C2"}
arm_colors = {no_jr: "0.25", with_jr: "C4"}  # apart from the methods' C0-C2
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
for arm in (no_jr, with_jr):
    rs = by_arm(results)[arm]
    steps = sorted({rec["step"] for rec in rs[0].records if "mon_radius" in rec})
    for key, ax in (("mon_radius", axes[0]), ("mon_jac_fro", axes[1])):
        per_seed = [{rec["step"]: rec[key] for rec in r.records if key in rec} for r in rs]
        mean = [sum(p[s] for p in per_seed) / len(per_seed) for s in steps]
        for p in per_seed:
            ax.plot(steps, [p[s] for s in steps], color=arm_colors[arm], lw=0.6, alpha=0.4)
        ax.plot(steps, mean, color=arm_colors[arm], lw=2, label=arm)
axes[0].set(xlabel="training step", ylabel="spectral radius of J_f", title="rho on the fixed batch")
axes[1].set(xlabel="training step", ylabel="||J_f||_F / sqrt(d)", title="Jacobian norm")
markers = {no_jr: "o", with_jr: "^"}
for arm in (no_jr, with_jr):  # one point per trained map and method
    for m in methods:
        rs = by_arm(results)[arm]
        axes[2].scatter([r.metrics["radius"] for r in rs], [r.metrics[f"{m}_nfe_per_sample"] for r in rs],
                        marker=markers[arm], color=colors[m], s=28, alpha=0.8)
axes[2].set(xlabel="spectral radius at z*", ylabel=f"calls of f to {exp.tol:g}, per sample",
            title="forward solve")
handles = [plt.Line2D([], [], color=arm_colors[a], marker=markers[a], lw=2, label=a) for a in (no_jr, with_jr)]
handles += [plt.Line2D([], [], color=colors[m], marker="s", ls="", label=m.replace("_", " ")) for m in methods]
fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, fontsize=8,
           bbox_to_anchor=(0.5, 1.07))
fig.tight_layout()
if out:
    fig.savefig(out / "trained_maps.png", bbox_inches="tight")
plt.show()

# %% [markdown]
# ### What held on the trained maps
#
# Each verdict is a paired t-test over the training seeds (the arms paired by seed, or two
# methods on the same map), two-sided at 5%; gradient errors are compared as $\log_{10}$.
# "Matches" is tested as the difference in calls: the claim that plain iteration needs no more
# calls than the best accelerated method holds where it needs significantly fewer, fails where
# it needs significantly more, and is inconclusive in between.

# %%
def per_seed(arm: str, key: str) -> list[float]:
    return [r.metrics[key] for r in by_arm(results)[arm]]


def best_acc(arm: str, key: str) -> list[float]:
    return [trained.best_accelerated(r.metrics, methods, key) for r in by_arm(results)[arm]]


def log10s(values: list[float]) -> list[float]:
    return [math.log10(max(v, 1e-300)) for v in values]


verdicts = [
    judge(Claim("JR lowers the spectral radius of J_f at the equilibrium", "section 3.2 and Figure 7", "less"),
          compare_arms(results, "radius", with_jr, no_jr),
          f"rho {fmt_mean_se(per_seed(with_jr, 'radius'), 2)} with JR against "
          f"{fmt_mean_se(per_seed(no_jr, 'radius'), 2)} without"),
    judge(Claim("JR lowers ||J_f||_F", "section 4 (the penalty's quantity)", "less"),
          compare_arms(results, "jac_fro", with_jr, no_jr),
          f"||J||_F/sqrt(d) {fmt_mean_se(per_seed(with_jr, 'jac_fro'), 2)} against "
          f"{fmt_mean_se(per_seed(no_jr, 'jac_fro'), 2)}"),
    judge(Claim(f"with JR, plain iteration reaches {exp.tol:g} in fewer calls", "Figure 5 (bottom); section 3.1",
                "less"),
          compare_arms(results, "fixed_point_nfe_per_sample", with_jr, no_jr),
          f"calls per sample {fmt_mean_se(per_seed(with_jr, 'fixed_point_nfe_per_sample'))} against "
          f"{fmt_mean_se(per_seed(no_jr, 'fixed_point_nfe_per_sample'))}"),
]
if "fixed_point" in methods and len(methods) > 1:
    for arm, label in ((with_jr, "with JR"), (no_jr, "without JR")):
        verdicts.append(judge(
            Claim(f"{label}, plain iteration needs no more calls than the best of Anderson and Broyden",
                  "this notebook's question", "less"),
            paired_t(per_seed(arm, "fixed_point_nfe_per_sample"), best_acc(arm, "nfe_per_sample")),
            f"calls per sample: plain {fmt_mean_se(per_seed(arm, 'fixed_point_nfe_per_sample'))}, best accelerated "
            f"{fmt_mean_se(best_acc(arm, 'nfe_per_sample'))}"))
    verdicts.append(judge(
        Claim("JR narrows plain iteration's gap in calls to the best accelerated method",
              "this notebook's question", "less"),
        compare_arms(results, "plain_over_best_nfe", with_jr, no_jr),
        f"plain / best accelerated calls {fmt_mean_se(per_seed(with_jr, 'plain_over_best_nfe'))} with JR against "
        f"{fmt_mean_se(per_seed(no_jr, 'plain_over_best_nfe'))}"))
if len(tols) > 1:
    loose, tight = tols[0], tols[-1]
    bwd_method = w.train.backward.method if w.train.backward.method in methods else methods[-1]
    for at, where in (("", "at the equilibrium"), ("_fwd", f"after a forward solve to {exp.tol:g}")):
        a = per_seed(with_jr, f"{bwd_method}_grad_err{at}_{tight}") + per_seed(no_jr, f"{bwd_method}_grad_err{at}_{tight}")
        b = per_seed(with_jr, f"{bwd_method}_grad_err{at}_{loose}") + per_seed(no_jr, f"{bwd_method}_grad_err{at}_{loose}")
        verdicts.append(judge(
            Claim(f"a backward tolerance of {tight} gives a more accurate gradient than {loose} ({where}, "
                  f"{bwd_method})", PAPER["solvers.backward_eps"]["source"], "less"),
            paired_t(log10s(a), log10s(b)),
            f"gradient error {fmt_mean_se(a, 2)} at {tight} against {fmt_mean_se(b, 2)} at {loose} "
            f"(both arms, every seed)"))
display(Markdown(claims_markdown(verdicts, "Verdicts on the trained maps")))

# %% [markdown]
# The same question in time: plain iteration's solve time over the fastest accelerated method's,
# both in calls of $f$ (a ratio below 1: plain iteration is the cheaper solve). Timings vary from
# run to run, so these verdicts are printed apart and are not part of the conclusion's numbers.

# %%
# NBVAL_IGNORE_OUTPUT
if "fixed_point" in methods and len(methods) > 1:
    timed_verdicts = [judge(
        Claim(f"{label}, plain iteration solves in less time than the fastest accelerated method",
              "this notebook's question", "less"),
        paired_t(per_seed(arm, "fixed_point_time_calls"), best_acc(arm, "time_calls")),
        f"time in calls of f: plain {fmt_mean_se(per_seed(arm, 'fixed_point_time_calls'))}, fastest accelerated "
        f"{fmt_mean_se(best_acc(arm, 'time_calls'))}") for arm, label in ((with_jr, "with JR"), (no_jr, "without JR"))]
    display(Markdown(claims_markdown(timed_verdicts, "In time (varies between runs)")))

# %% [markdown]
# ## 2 · deqlib against torchdeq on seeded problems
#
# Each problem is a seeded map in a plain and a *hard* variant (plain iteration calibrated to
# need 20-40 calls to the tolerance on the plain one, 100-150 on the hard one: $\rho$ near 1).
# *synthetic*: the synthetic experiment's 2-layer ReLU map (scalar state); *conv*: an
# MDEQ-sized residual branch at CIFAR resolution (paper profile); *mdeq*: the MDEQ's multiscale
# map (notebook 03's widths) on seeded images; *transformer*: one Post-LN DEQ-Transformer layer
# on seeded tokens after a full memory. The MDEQ and Transformer maps are normalized and do not
# converge as initialized, so their knob is a point on a path between the map as initialized
# and a copy trained for a few steps on the Jacobian penalty alone. Both libraries get the same
# start, tolerance, stop rule and `max_iter`, and otherwise their own defaults (deqlib Anderson
# $m=5$, $\lambda=10^{-4}$ relative, restart of a stalled sample; Broyden window 100; torchdeq
# Anderson $m=6$, $\lambda=10^{-4}$ absolute; Broyden with `max_iter` terms preallocated). Calls
# of $f$ are counted by wrapping $f$; gradients are compared with a float64 reference.

# %%
# NBVAL_IGNORE_OUTPUT
print(f"glibc heap kept between calls: {malloc_steady}")
t_start = time.perf_counter()
cmp = compare(exp, log=print)
wall_s = time.perf_counter() - t_start
print(f"comparison done in {wall_s:.0f} s")
names = [p["problem"] for p in cmp.problems]

# %%
display(pd.DataFrame([{"problem": p["problem"], "what": p["description"], "D": p["dim"],
                       "rho max": round(p["radius_max"], 2), "rho mean": round(p["radius_mean"], 2)}
                      for p in cmp.problems]).set_index("problem"))

# %% [markdown]
# Calls of $f$ (forward) and of the backward step until the solver stopped, whether the answer
# it returned is below the tolerance, and the parameter gradient's error to an order of
# magnitude (deterministic).

# %%
def order(x: float) -> str:
    return "0" if x == 0 else f"1e{round(math.log10(x)):+03d}"


det = pd.DataFrame([{
    "problem": r["problem"], "library": r["library"], "method": r["method"],
    "fwd calls": r["fwd_nfe"], "fwd conv.": "yes" if r["fwd_converged"] else "no",
    "bwd calls": r["bwd_nfe"], "bwd conv.": "yes" if r["bwd_converged"] else "no",
    "grad err": order(r["grad_error"]),
} for r in cmp.rows]).set_index(["problem", "library", "method"])
display(det)
both = {(r["problem"], r["method"], d) for r in cmp.rows if r["library"] == "torchdeq"
        for d in ("fwd", "bwd") if r[f"{d}_converged"]}
ours = {(r["problem"], r["method"], d) for r in cmp.rows if r["library"] == "deqlib"
        for d in ("fwd", "bwd") if r[f"{d}_converged"]}
display(Markdown(f"deqlib converged in **{len(both & ours)} of {len(both)}** solves where torchdeq converged"
                 + (f"; it converged in {len(ours - both)} where torchdeq did not." if both else ".")))

# %% [markdown]
# Residual against time in calls of $f$ (the solve's time divided by one call of $f$, or of the
# backward step: where a solver costs nothing beyond $f$ this is its call count), one figure per
# family of problems; color: method, solid deqlib, dashed torchdeq; dotted: the tolerance.

# %%
# NBVAL_IGNORE_OUTPUT
curves = pd.DataFrame(cmp.curves)
unit = {(p["problem"], "forward"): p["f_ms"] / 1e3 for p in cmp.problems}
unit.update({(p["problem"], "backward"): p["vjp_step_ms"] / 1e3 for p in cmp.problems})
curves["time_calls"] = [t / unit[(p, d)] for p, d, t in zip(curves.problem, curves.direction, curves.time_s)]
styles = {"deqlib": "-", "torchdeq": "--"}
families = [k for k in ("synthetic", "conv", "mdeq", "transformer") if any(n.split("_hard")[0] == k for n in names)]
for family in families:
    probs = [n for n in names if n.split("_hard")[0] == family]
    panels = [(n, d) for n in probs for d in ("forward", "backward")]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3), squeeze=False)
    for ax, (name, direction) in zip(axes[0], panels):
        sub = curves[(curves.problem == name) & (curves.direction == direction)]
        for (lib, method), df in sub.groupby(["library", "method"], sort=False):
            ax.semilogy(df["time_calls"], df["max_rel_residual"], styles[lib], color=colors[method], lw=1.3,
                        label=f"{lib} {method.replace('_', ' ')}")
        ax.axhline(exp.tol if direction == "forward" else exp.backward_tol, color="k", ls=":", lw=1)
        ax.set_title(f"{name}, {direction}", fontsize=9)
        ax.set_xlabel("time, calls of f")
    axes[0, 0].set_ylabel("max rel. residual")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.14))
    fig.tight_layout()
    if out:
        fig.savefig(out / f"residuals_{family}.png", bbox_inches="tight")
    plt.show()

# %% [markdown]
# deqlib's time to tolerance over torchdeq's per method: the geometric mean over problems, over
# all and over those where both converged (varies between runs; nothing to print without
# torchdeq).

# %%
# NBVAL_IGNORE_OUTPUT
ratios = {d: time_ratios(cmp.rows, d) for d in ("fwd", "bwd")}
for d, by_method in ratios.items():
    for method, v in by_method.items():
        if v["all"] is not None:
            print(f"{d} {method:<11} deqlib/torchdeq time: all problems {v['all']:.2f} (n={v['n_all']}), "
                  f"both converged " + (f"{v['both_converged']:.2f}" if v["both_converged"] else "-")
                  + f" (n={v['n_both_converged']})")

# %% [markdown]
# The paper's solver settings and this run's:

# %%
display(pd.DataFrame([
    {"setting": "forward tolerance (relative residual)", "paper": PAPER["solvers.forward_eps"]["value"],
     "source": PAPER["solvers.forward_eps"]["source"], "this run": f"{exp.tol:g}"},
    {"setting": "backward tolerance", "paper": PAPER["solvers.backward_eps"]["value"],
     "source": PAPER["solvers.backward_eps"]["source"],
     "this run": f"{exp.backward_tol:g} (comparison); " + " and ".join(tols) + " (trained maps)"},
    {"setting": "Anderson", "paper": PAPER["solvers.anderson"]["value"], "source": PAPER["solvers.anderson"]["source"],
     "this run": "deqlib m=5, lam 1e-4 relative, stalled samples restart; torchdeq m=6, lam 1e-4 absolute"},
    {"setting": "Broyden", "paper": PAPER["solvers.broyden"]["value"], "source": PAPER["solvers.broyden"]["source"],
     "this run": "deqlib: window 100 then restart; torchdeq: max_iter terms preallocated"},
]).set_index("setting"))

# %% [markdown]
# ## 3 · On a GPU, at paper size
#
# The same comparison at the paper profile's sizes ran once on a lent GPU
# (`python -m deqlib.bench compare --profile paper`, recorded in `outputs/device/`). Its calls
# of $f$ forward + backward per library (`*`: a solve that did not converge within 200 calls):

# %%
device_dir = Path(params_path).parent / "outputs" / "device"
gpu = None
if (device_dir / "compare_paper.json").exists() and (device_dir / "RESULTS.md").exists():
    gpu = device_run((device_dir / "RESULTS.md").read_text(), json.loads((device_dir / "compare_paper.json").read_text()))
    display(Markdown(f"Device: **{gpu['device']}**; deqlib as of commit `{gpu['commit']}`."))
    display(pd.DataFrame(gpu["rows"]).set_index(["problem", "method"]))
else:
    print("no recorded GPU run in outputs/device")

# %% [markdown]
# What that run found, and what changed since (qualitative; the numbers are in the table and in
# `outputs/device/RESULTS.md`): on the GPU one call of these maps takes well under a millisecond
# to a few milliseconds and every solver's own work per iteration is bound by kernel launches,
# so the time per call of $f$ of Anderson and Broyden is far above that of plain iteration on
# the small maps for both libraries; only the paper-width MDEQ map at batch 96 brings it near 1.
# It found three failures of deqlib's solvers at paper size, all fixed since that commit and
# tested on the CPU (`tests/test_solver_failures.py`): Anderson stalled near $10^{-2}$ on the
# Transformer layer where plain iteration converged (a stalled sample now restarts), a Broyden
# window of 20 restarted too often on the hard MDEQ map where torchdeq's full history converged
# (the window is now 100), and the solve stopped over the whole batch (each sample now stops on
# its own). The GPU timings have not been re-measured since.

# %%
if out:
    write_metrics(out, {
        "trained": {"summary": summary, "claims": claims_table(verdicts),
                    "runs": {f"{r.arm}/seed{r.seed}": r.metrics for r in results}},
        "libraries": cmp.libraries,
        "problems": {p["problem"]: {k: v for k, v in p.items() if k not in ("problem", "description")}
                     for p in cmp.problems},
        "runs": {f"{r['problem']}/{r['library']}/{r['method']}":
                 {k: v for k, v in r.items() if k not in ("problem", "library", "method")} for r in cmp.rows},
        "time_ratio_geomean": ratios,
    })
    write_curves(out, "curves.csv", cmp.curves)
    write_curves(out, "training.csv", [{"arm": r.arm, "seed": r.seed, "step": rec["step"],
                                        **{k: rec[k] for k in trained.MONITORED if k in rec}}
                                       for r in results for rec in r.records if "mon_radius" in rec])

# %%
# NBVAL_IGNORE_OUTPUT
print(f"notebook wall time: {time.perf_counter() - t_notebook:.0f} s")

# %% [markdown]
# ## Conclusion

# %%
held = {v.claim.text: v.verdict for v in verdicts}
lines = [f"On the DEQ-Transformer maps trained here for {w.train.max_steps} steps ({len(w.seeds)} seeds), "
         f"JR's spectral radius at the equilibrium was {cell(with_jr, 'radius', 2)} against "
         f"{cell(no_jr, 'radius', 2)} without it (**{verdicts[0].verdict}**). Plain iteration needed "
         f"{cell(with_jr, 'fixed_point_nfe_per_sample', 3)} calls per sample with JR and "
         f"{cell(no_jr, 'fixed_point_nfe_per_sample', 3)} without; the fewest of Anderson and Broyden "
         f"{fmt_mean_se(best_acc(with_jr, 'nfe_per_sample'))} and {fmt_mean_se(best_acc(no_jr, 'nfe_per_sample'))}."]
lines += [f"- {v.claim.text}: **{v.verdict}**." for v in verdicts[3:]]
display(Markdown("\n".join(lines)))
