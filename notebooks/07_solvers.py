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
# # 07 · Which solver, and what the machinery costs: deqlib against torchdeq
#
# **Questions.** A DEQ spends its time in a root solver, forward ($z^* = f(z^*)$) and
# backward (the implicit-function-theorem system $u = u\,J_f(z^*) + \partial L/\partial z^*$).
# The paper trains with Broyden's method (official code) and reports its cost only as NFE
# (Table 4: forward/backward tolerance $10^{-3}/10^{-4}$, relative residual
# $\lVert f(z)-z\rVert / \lVert f(z)\rVert$). A user choosing a library asks two things this
# notebook answers by measurement: *which solver on which problem*, and *what the solver costs
# beyond its calls of $f$*. We compare deqlib's fixed-point iteration, Anderson acceleration
# and limited-memory Broyden with the same three methods of **torchdeq 0.1.0** (the DEQ
# library of the paper's authors), called through its public solver API.
#
# **Setup.** Seeded problems, each in a plain and a *hard* variant (the same map scaled so
# that plain iteration needs 100+ calls: spectral radius of $J_f(z^*)$ near 1):
# the synthetic experiment's 2-layer ReLU map (scalar state, a tiny $f$), and an MDEQ-sized
# residual branch $f(z) = \mathrm{GN}(s\,\mathrm{conv}(\mathrm{ReLU}(\mathrm{conv}\,z)) + x)$
# at CIFAR resolution (`deqlib.bench.ConvMap`; the real MDEQ and DEQ-Transformer cells join
# when those models land). Both libraries get the same start ($z_0 = 0$; backward $u_0 =
# \partial L/\partial z^*$), tolerance, stop mode `"rel"` and `max_iter`, and otherwise their
# default options: deqlib Anderson $m=5$, $\lambda = 10^{-4}$ relative to the Gram diagonal,
# Broyden window 20; torchdeq Anderson $m=6$, $\lambda = 10^{-4}$ absolute, Broyden with a
# preallocated history of `max_iter` terms, no line search. The loss is
# $L = \langle w, z^*\rangle$ with a seeded $w$; gradients are taken w.r.t. the map's
# parameters and compared with a reference from a float64 Anderson solve to $10^{-8}$.
# NFE is counted by wrapping $f$ (never from a library's own statistics).
#
# torchdeq is optional: `pip install "deqlib[bench]"` (it is part of the `dev` extra). Without
# it this notebook prints so and reports deqlib's rows only.

# %%
import time

t_notebook = time.perf_counter()
import math

import pandas as pd
from IPython.display import display
from matplotlib import pyplot as plt

from deqlib.config import load_experiment, to_dict
from deqlib.experiments.solvers import (RATIO_TARGETS, SolversExperiment, compare, recommendations,
                                        resolve_libraries, target_checks, time_ratios)
from deqlib.measure import steady_malloc
from deqlib.report import PAPER, make_output_dir, use_style, write_curves, write_metrics

use_style()
pd.set_option("display.width", 200)
pd.set_option("display.max_colwidth", 80)
# Keep glibc from returning freed blocks to the OS between calls: otherwise the time of one
# conv call swings 24-50 ms with the heap's history (see deqlib/bench.py).
malloc_steady = steady_malloc()

# %% tags=["parameters"]
profile = "small"  # "paper" or "small"; the runner injects the profile DVC chose
overrides = {}  # e.g. {"repeats": 1} for a smoke run
output_dir = ""  # where metrics, curves and figures go ("" writes nothing)
params_path = "../params.yaml"

# %%
exp = load_experiment(SolversExperiment, "solvers", profile, overrides, params_path)
out = make_output_dir(output_dir)
cfg = to_dict(exp)
print(f"profile: {profile}")
for key, value in cfg.items():
    print(f"{key:>18}: {value}")
libraries, note = resolve_libraries(exp.libraries)
print(note)

# %% [markdown]
# ## The run
#
# For every problem: build it (calibrating its scale), solve the float64 reference, estimate
# the spectral radius at $z^*$ (power iteration, as in the paper) and time one call of $f$
# and one backward step (a vector-Jacobian product). Then, per library and method, forward
# and backward: one recorded solve (NFE, residual after each call, wall time), further timed
# solves (the median of `repeats` is the time to tolerance) and one solve under the memory
# counter.

# %%
# NBVAL_IGNORE_OUTPUT
print(f"glibc heap kept between calls: {malloc_steady}")
t_start = time.perf_counter()
cmp = compare(exp, log=print)
wall_s = time.perf_counter() - t_start
print(f"comparison done in {wall_s:.0f} s")
names = [p["problem"] for p in cmp.problems]

# %% [markdown]
# ## The problems
#
# *scale* is the calibrated contraction knob; $\rho$ the spectral radius of $J_f(z^*)$ (max
# and mean over the batch). Plain iteration converges at rate $\rho$ asymptotically, so the
# hard variants' $\rho$ near 1 is what makes them hard. *ref residual* is how well the
# float64 reference was solved (forward / backward).

# %%
problems = pd.DataFrame([{
    "problem": p["problem"], "what": p["description"], "D": p["dim"], "scale": p["scale"],
    "rho max": round(p["radius_max"], 2), "rho mean": round(p["radius_mean"], 2),
    "ref residual": f"{p['ref_fwd_residual']:.0e} / {p['ref_bwd_residual']:.0e}",
} for p in cmp.problems]).set_index("problem")
display(problems)

# %%
# NBVAL_IGNORE_OUTPUT
costs = pd.DataFrame([{"problem": p["problem"], "one f call, ms": round(p["f_ms"], 3),
                       "one backward step, ms": round(p["vjp_step_ms"], 3),
                       "state, MB": round(p["state_mb"], 3),
                       "f time after / before runs": round(p["f_time_drift"], 2)}
                      for p in cmp.problems]).set_index("problem")
display(costs)

# %% [markdown]
# ## Convergence and gradient accuracy (deterministic)
#
# *NFE* counts calls of $f$ (forward) or of the backward step (backward) until the solver
# stopped; *conv.* says whether the answer it returned has relative residual below the
# tolerance (recomputed with one extra call); *residual* is that residual (max over the
# batch, 2 significant digits); *grad err* is $\lVert \nabla - \nabla_\text{ref}\rVert /
# \lVert\nabla_\text{ref}\rVert$ for the parameter gradient, to an order of magnitude.

# %%
def order(x: float) -> str:
    return "0" if x == 0 else f"1e{round(math.log10(x)):+03d}"


det = pd.DataFrame([{
    "problem": r["problem"], "library": r["library"], "method": r["method"],
    "fwd NFE": r["fwd_nfe"], "fwd conv.": "yes" if r["fwd_converged"] else "no",
    "fwd residual": f"{r['fwd_residual']:.1e}",
    "bwd NFE": r["bwd_nfe"], "bwd conv.": "yes" if r["bwd_converged"] else "no",
    "bwd residual": f"{r['bwd_residual']:.1e}", "grad err": order(r["grad_error"]),
} for r in cmp.rows]).set_index(["problem", "library", "method"])
display(det)

# %% [markdown]
# ## Time, overhead and memory (vary run to run)
#
# *time* is the median wall time to tolerance; *overhead* = time / (NFE × time of one call),
# so 1.00 means the solver costs nothing beyond $f$; *extra MB* is the solver's peak live
# memory beyond that of one call.

# %%
# NBVAL_IGNORE_OUTPUT
timing = pd.DataFrame([{
    "problem": r["problem"], "library": r["library"], "method": r["method"],
    "fwd ms": round(r["fwd_time_s"] * 1e3, 1), "fwd overhead": round(r["fwd_overhead"], 2),
    "fwd extra MB": round(r["fwd_extra_mem_mb"], 1),
    "bwd ms": round(r["bwd_time_s"] * 1e3, 1), "bwd overhead": round(r["bwd_overhead"], 2),
    "bwd extra MB": round(r["bwd_extra_mem_mb"], 1),
} for r in cmp.rows]).set_index(["problem", "library", "method"])
display(timing)

# %% [markdown]
# ## Targets vs this run
#
# The targets set for deqlib (issue #6): overhead $\le 1.15$ (Broyden $\le 1.30$) wherever one
# call costs 5 ms or more (tinier maps are reported, exempt); converged wherever torchdeq's
# same method converged; geometric mean over problems of deqlib's time to tolerance over
# torchdeq's, per method: fixed point $\le 0.8$, Anderson $\le 0.5$, Broyden $\le 0.2$. The
# ratio is given over all problems and over those where both converged.

# %%
# NBVAL_IGNORE_OUTPUT
checks = pd.DataFrame(target_checks(cmp))
over = checks[checks.target.str.contains("overhead")].copy()
over["cell"] = [f"{v:.2f} " + ("ok" if m is True else "MISSED" if m is False else "(exempt)")
                for v, m in zip(over.value, over.met)]
over["direction"] = over.target.str.slice(0, 3)
print("deqlib overhead (target 1.15, Broyden 1.30; exempt where one call < 5 ms):")
display(over.pivot(index="problem", columns=["direction", "method"], values="cell").loc[names])
conv = checks[checks.target.str.contains("converges")]
missed = conv[conv.met != True]
print(f"deqlib converged wherever torchdeq did: {len(conv) - len(missed)} of {len(conv)} solves"
      + ("" if missed.empty else "; missed: " + ", ".join(
          f"{r.problem}/{r.method}/{r.target[:3]}" for r in missed.itertuples())))
ratios = {d: time_ratios(cmp.rows, d) for d in ("fwd", "bwd")}
for d, by_method in ratios.items():
    for method, v in by_method.items():
        if v["all"] is not None:
            print(f"{d} {method:<11} deqlib/torchdeq time, geomean: all problems {v['all']:.3f} "
                  f"(n={v['n_all']}), both converged "
                  + (f"{v['both_converged']:.3f}" if v["both_converged"] else "-")
                  + f" (n={v['n_both_converged']}); target {RATIO_TARGETS[method]}")

# %% [markdown]
# The paper's settings these runs follow, and where this run departs from them:

# %%
display(pd.DataFrame([
    {"setting": "forward tolerance (relative residual)", "paper": PAPER["solvers.forward_eps"]["value"],
     "source": PAPER["solvers.forward_eps"]["source"], "this run": f"{exp.tol:g}"},
    {"setting": "backward tolerance", "paper": PAPER["solvers.backward_eps"]["value"],
     "source": PAPER["solvers.backward_eps"]["source"], "this run": f"{exp.backward_tol:g}"},
    {"setting": "Anderson", "paper": PAPER["solvers.anderson"]["value"],
     "source": PAPER["solvers.anderson"]["source"],
     "this run": "deqlib m=5, lam 1e-4 relative; torchdeq m=6, lam 1e-4 absolute"},
    {"setting": "Broyden", "paper": PAPER["solvers.broyden"]["value"],
     "source": PAPER["solvers.broyden"]["source"],
     "this run": "deqlib: window 20 then restart; torchdeq: max_iter terms preallocated"},
]).set_index("setting"))

# %% [markdown]
# ## Residual against NFE and against wall time
#
# Batch-max relative residual after each call (color: method; solid: deqlib, dashed:
# torchdeq). The dotted line is the tolerance.

# %%
curves = pd.DataFrame(cmp.curves)
colors = {"fixed_point": "C0", "anderson": "C1", "broyden": "C2"}
styles = {"deqlib": "-", "torchdeq": "--"}


def residual_plot(x: str, xlabel: str):
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6), squeeze=False)
    for j, name in enumerate(names):
        for i, (direction, tol) in enumerate((("forward", exp.tol), ("backward", exp.backward_tol))):
            ax = axes[i, j]
            sub = curves[(curves.problem == name) & (curves.direction == direction)]
            for (lib, method), df in sub.groupby(["library", "method"], sort=False):
                ax.semilogy(df[x], df["max_rel_residual"], styles[lib], color=colors[method],
                            lw=1.3, label=f"{lib} {method}")
            ax.axhline(tol, color="k", ls=":", lw=1)
            ax.set(title=f"{name}, {direction}", xlabel=xlabel, ylabel="max rel. residual" if j == 0 else "")
    axes[0, 0].legend(fontsize=7)
    return fig


fig = residual_plot("nfe", "NFE")
if out:
    fig.savefig(out / "residual_vs_nfe.png")
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
curves["time_ms"] = curves["time_s"] * 1e3
fig = residual_plot("time_ms", "wall time, ms")
if out:
    fig.savefig(out / "residual_vs_time.png")
plt.show()

# %% [markdown]
# ## Recommendations
#
# Per problem, the deqlib method to use, from NFE only (deterministic): among the methods
# that converged forward *and* backward, the one with the fewest calls in all, but an
# accelerated method only where it saves at least 1.3x the calls of plain iteration. The
# threshold is the cost of an Anderson or Broyden iteration measured above, about 1.3-1.4
# calls of $f$ at CIFAR size (plain iteration: about 1.05-1.1); a smaller saving does not pay
# for it. The cell after the table checks, with this run's timings, that the fastest
# converged method agrees.

# %%
recs = pd.DataFrame(recommendations(cmp.rows, min_saving=1.3)).set_index("problem")
display(recs)

# %%
# NBVAL_IGNORE_OUTPUT
for name in names:
    ok = [r for r in cmp.rows if r["problem"] == name and r["library"] == "deqlib"
          and r["fwd_converged"] and r["bwd_converged"]]
    if ok:
        fastest = min(ok, key=lambda r: r["fwd_time_s"] + r["bwd_time_s"])
        print(f"{name:<16} fastest converged (fwd+bwd time): {fastest['method']:<11} "
              f"{(fastest['fwd_time_s'] + fastest['bwd_time_s']) * 1e3:.1f} ms; "
              f"recommended by NFE: {recs.loc[name, 'use']}")

# %%
if out:
    write_metrics(out, {
        "libraries": cmp.libraries,
        "problems": {p["problem"]: {k: v for k, v in p.items() if k not in ("problem", "description")}
                     for p in cmp.problems},
        "runs": {f"{r['problem']}/{r['library']}/{r['method']}":
                 {k: v for k, v in r.items() if k not in ("problem", "library", "method")} for r in cmp.rows},
        "time_ratio_geomean": ratios,
        "recommendation": {r["problem"]: r["use"] for r in recommendations(cmp.rows, min_saving=1.3)},
    })
    write_curves(out, "curves.csv", cmp.curves)

# %%
# NBVAL_IGNORE_OUTPUT
print(f"notebook wall time: {time.perf_counter() - t_notebook:.0f} s")

# %% [markdown]
# ## What this run shows
#
# The call counts, convergence flags and gradient errors above are deterministic; the times
# quoted here are those of the committed small-profile run (2 CPU cores, one call of the conv
# map about 5.7 ms) and move by some percent between runs.
#
# **Which solver.**
#
# | problem | use (deqlib) | why |
# |---|---|---|
# | tiny map (synthetic, one call 0.03 ms), plain or hard | Broyden | 7 + 3 calls (forward + backward) against 76 and 247 for plain iteration; fastest in wall time too, since on a tiny map the solver's own work per iteration is what costs |
# | CIFAR-sized conv map, $
# ho pprox 0.7$ | plain iteration | Anderson and Broyden save only 1.1x the calls on this strongly nonlinear map (GroupNorm, ReLU), less than the ~1.3x a call that each of their iterations costs; the times of the three methods were within 11% of each other |
# | CIFAR-sized conv map, $
# ho pprox 0.9$ | Anderson | 1.7x fewer calls than plain iteration (138 against 233), the fastest forward and backward; Broyden takes a few more calls (152) for the same cost per call |
#
# **What the machinery costs.** deqlib's plain iteration costs 1.06-1.09 calls of $f$ per call
# (one backward timing of 1.55 in the committed run is noise: the same solve measured 1.09 and
# 1.13 in two earlier runs); Anderson 1.28-1.42 and Broyden 1.34-1.41, which **misses the targets**
# 1.15 and 1.30 (the gap known since issue #2: each Anderson or Broyden iteration makes two
# passes over a 5- or 20-state history of 2 MB states, about 2 ms on these cores against
# 5.7 ms for $f$). Extra memory does not depend on `max_iter`: 4-6 MB for plain iteration,
# 24-26 MB for Anderson, 50-54 MB for Broyden. torchdeq's plain iteration costs 1.14-1.30,
# its Anderson 1.6-1.75 (46 MB), and its Broyden 7-20x the calls and 818 MB: it preallocates
# `max_iter` = 200 history terms (two 400 MB tensors for a 2 MB state) and its work per
# iteration grows with the iteration count.
#
# **Against torchdeq.** deqlib converged in every solve where torchdeq converged (23 of 23);
# torchdeq's Anderson did not converge in one where deqlib's did (synthetic_hard backward:
# 200 calls, residual 6.8e-3, against 4 calls). Its absolute regularizer $\lambda = 10^{-4}$
# swamps the Gram matrix $\langle g_i, g_j\rangle$ once the residuals fall below about
# $10^{-2}$, which a one-dimensional state reaches after a few steps, and leaves a damped
# plain iteration (135 calls against 4 on the plain synthetic backward). On the conv states
# ($D = 65536$, residual norms above 0.2 down to the tolerance) the same $\lambda$ is
# negligible and both Andersons take exactly the same calls. Geometric mean of
# deqlib's forward time over torchdeq's: plain iteration **0.70** (target $\le 0.8$, met),
# Anderson **0.66** (target $\le 0.5$, missed: where torchdeq's regularizer does not inflate
# the calls, the ratio is just the overhead ratio, about 1.3 against 1.7), Broyden **0.34**
# (target $\le 0.2$, missed: on the conv maps it is 0.18 and 0.07, but on the tiny synthetic
# maps both Broydens take 7 calls and about 2.5 ms, a ratio near 1).
#
# **Gradients.** A residual tolerance of $10^{-3}$ is not a gradient accuracy of $10^{-3}$.
# At the same tolerance the parameter gradient is off by about $10^{-2}$ (plain iteration) and
# $10^{-1}$ (Anderson, Broyden, both libraries) on the conv maps, and by $10^{-1}$ with
# plain iteration on the synthetic ones, where Broyden overshoots the tolerance (residuals
# $10^{-4}$ to $10^{-7}$) and lands at $10^{-4}$ to $10^{-3}$. We did not dig into why
# Anderson's and Broyden's answers carry a larger gradient error than plain iteration's at the
# same residual; a user who needs accurate gradients should tighten the backward tolerance
# (Table 4's $10^{-4}$) rather than trust $10^{-3}$.
#
# **At this scale.** CPU only, with one call of $f$ at 5.7 ms; on a GPU the solver's passes
# over its history cost relatively less or more depending on the memory bandwidth, so the
# overhead ratios should be re-measured there. The real MDEQ and DEQ-Transformer maps are not
# in this run yet (their models were not merged when it was made); the conv map is their
# stand-in at CIFAR size.
