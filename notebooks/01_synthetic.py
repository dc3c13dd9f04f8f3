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
# # 01 · Jacobian regularization on a 1D synthetic problem
#
# **Claim** (supplement A.1, Figure 5). A DEQ learns $z^*(x)$ with $z^* = f_\theta(z^*; x)$ on
# a 1D regression problem. *Every* regularization weight $\gamma$ fits the target, but larger
# $\gamma$ makes the surface $z_\text{out} = f_\theta(z; x)$ flatter around the fixed point, and
# the equilibrium then needs fewer function evaluations (NFE): Figure 5's bottom row iterates
# $f$ on a slice, where $\gamma = 0$ "zigzags" slowly and $\gamma = 2, 4$ converge fast.
#
# **The mechanism, in 1D.** The state is a scalar, so the Jacobian of one sample is the slope
# $f'(z^*) = \partial f/\partial z$ at its equilibrium: $\lVert J\rVert_F/\sqrt d = |f'(z^*)|$,
# the spectral radius of a batch's (diagonal) Jacobian is $\max_x |f'(z^*(x))|$, and plain
# fixed-point iteration shrinks the error by $|f'(z^*)|$ per call, so its NFE to a tolerance
# grows like $\log(\text{tol}) / \log|f'(z^*)|$. Everything below measures that slope for every
# arm, at the end and during training, and the NFE that follow from it.
#
# **Setup** (supplement A.1, Table 4, first column). 5096 pairs of
# $y = 1.5x^3 + x^2 + 5x + 2\sin x - 3 + \delta$: 4096 for training, 1000 for validation, with
# $x$ uniform on $[-2, 2]$ and $\delta \sim \mathcal N(0, 0.05)$ read as variance 0.05 (the
# paper states neither range nor reading), so the best possible validation MSE is about 0.05.
# The model is the paper's 200-parameter $f(z; x) = W_2^\top \mathrm{ReLU}(W_1 z + U x + b)$,
# width 50, initialized from $\mathcal N(0, 0.01^2)$; Adam $10^{-3}$ with a cosine schedule,
# batch 64, forward/backward Anderson with NFE thresholds 6/6 and tolerances $10^{-3}/10^{-4}$,
# and the Jacobian penalty with $p = 0.4$, $M = 1$, $\gamma \in \{0, 1, 2, 4\}$. Beside those
# arms runs a **positive control**: $\gamma = 40$ applied at every step ($p = 1$), a penalty
# strong enough to act, so that a reader sees what an effective penalty does to the same
# measurements. Every arm trains for each of 3 seeds; arms with the same seed share the
# initialization, the data order and the penalty's draws, so they are compared in pairs.
#
# **Two readings of the targets.** The paper trains on $y$ as printed (the *raw* reading, the
# paper profile): $y$ spans about $\pm 23$, so the MSE starts in the hundreds while the penalty
# $\gamma \lVert J\rVert_F^2/d$ is at most a few units. With the targets *standardized* by the
# training set's mean and standard deviation, loss and penalty start at the same scale; every
# MSE below is still reported in $y$'s units. The small profile (what this committed notebook
# ran) takes the standardized reading and trains for 25 epochs, half of Table 4's 50, so that
# its 15 runs fit the budget; the paper profile is Table 4 in the raw reading. The cell after the
# setup says which reading this run is.

# %%
import time

import pandas as pd
import torch
from IPython.display import Markdown, display
from matplotlib import pyplot as plt
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

from deqlib.config import load_experiment, to_dict
from deqlib.data.synthetic import target_function
from deqlib.experiments.core import by_arm, run_arms, summarize
from deqlib.deq import SolverSettings
from deqlib.experiments.synthetic import (FIT_FACTOR, SyntheticExperiment, arm_specs, judge_claims, load_data,
                                          pair_tests, run_arm)
from deqlib.report import (PAPER, claims_markdown, make_output_dir, print_setup, use_style, write_curves,
                           write_metrics)

use_style()
pd.set_option("display.width", 250, "display.max_columns", 50, "display.max_colwidth", None)

# %% tags=["parameters"]
profile = "small"  # "paper" or "small"; the runner injects the profile DVC chose
overrides = {}  # e.g. {"train.max_steps": 3} for a smoke run
output_dir = ""  # where metrics, curves and figures go ("" writes nothing)
params_path = "../params.yaml"

# %%
exp = load_experiment(SyntheticExperiment, "synthetic", profile, overrides, params_path)
out = make_output_dir(output_dir)
specs = arm_specs(exp)
print_setup(profile, to_dict(exp), penalty_hides=("gamma",))
print(f"{'arms':>17}: " + ", ".join(f"{s.name} (gamma {s.gamma:g}, p {s.p:g})" for s in specs.values()))
print(f"{'seeds':>17}: {list(exp.seeds)}")
READING = {"raw": "raw targets (the paper's reading)",
           "standardized": "standardized targets (the reading in which the penalty can act)"}[exp.data.targets]
display(Markdown(f"**This run:** profile `{profile}`, {READING}, {exp.train.epochs} epochs, "
                 f"{len(specs)} arms x {len(exp.seeds)} seeds."))

# %% [markdown]
# ## The data (Figure 9)
#
# The gray curve is the noise-free target $h(x)$; the dots are the validation pairs.

# %%
data = load_data(exp)
xs = torch.linspace(exp.data.x_min, exp.data.x_max, 400)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.scatter(data.x_valid, data.y_valid, s=4, alpha=0.4, label="validation pairs")
ax.plot(xs, target_function(xs), color="0.4", lw=2, label="target $h(x)$")
ax.set(xlabel="$x$", ylabel="$y$", title="Figure 9: target function and data")
ax.legend()
if out:
    fig.savefig(out / "fig9_target.png")
plt.show()
y_valid = data.y_valid[:, 0]
print(f"train {len(data.x_train)}, valid {len(data.x_valid)}; y in [{float(y_valid.min()):.1f}, "
      f"{float(y_valid.max()):.1f}], var(y) = {float(y_valid.var()):.1f}; the model trains on y"
      + ("" if exp.data.targets == "raw" else f" standardized: (y - {data.y_mean:.2f}) / {data.y_std:.2f}"))

# %% [markdown]
# ## Training every arm for every seed
#
# Each step records the loss and the forward/backward NFE and residuals; every
# `eval.monitor_every` steps (and after the last) the training loop's monitor solves the 1000
# validation inputs to convergence and records $\lVert J\rVert_F/\sqrt d$ (the root mean square
# of $f'(z^*)$), the spectral radius $\max |f'(z^*)|$ and the median $|f'(z^*)|$, for every
# arm alike. The timings below vary from machine to machine (the small profile's budget is
# 4 minutes for the whole notebook on 2 CPU cores).

# %%
# NBVAL_IGNORE_OUTPUT
t_start = time.perf_counter()
results = run_arms(run_arm, exp, list(specs), exp.seeds, data, progress=False, keep_models=True)
t_train = time.perf_counter() - t_start
for arm, runs in by_arm(results).items():
    rate = sum(r.metrics["train_steps"] for r in runs) / sum(r.metrics["train_steps"] * r.metrics["step_time_s"]
                                                             for r in runs)
    print(f"{arm:>8}: {rate:.0f} training steps/s (mean step {1e3 / rate:.1f} ms)")
print(f"all {len(results)} runs trained and measured in {t_train:.0f} s")

# %% [markdown]
# ## Results per arm
#
# Mean ± standard error over the seeds. *MSE* is the validation MSE (in $y$'s units) at the
# equilibrium solved to convergence (Anderson run on to $10^{-6}$); *MSE @ threshold* is the
# output as trained, after at most 6 Anderson calls. The slope columns describe the
# distribution of $|f'(z^*(x))|$ over the validation inputs (median, 90th percentile, root mean
# square $= \lVert J\rVert_F/\sqrt d$, maximum $=$ spectral radius $\rho$). *NFE* columns are the
# calls each validation sample needs to reach a relative residual $|f(z)-z|/|f(z)|$ of
# $10^{-3}$ from $z = 0$, median and 90th percentile over the samples (a sample that never gets
# there within the cap counts as infinitely many calls; *reached* is the share that did);
# *train NFE* is the forward solver's mean calls per training step.

# %%
METRICS = ["valid_mse", "valid_mse_at_threshold", "valid_r2", "slope_abs_median", "slope_abs_p90", "jac_fro",
           "spectral_radius", "unstable_share", "plain_nfe_median", "plain_nfe_p90", "plain_reached",
           "anderson_nfe_median", "anderson_nfe_p90", "anderson_reached", "train_fwd_nfe", "train_bwd_nfe"]
summary = summarize(results, METRICS)
grouped = by_arm(results)


def cell(arm: str, metric: str, digits: int) -> str:
    """``mean ± se`` of a metric over the arm's seeds, at ``digits`` decimals."""
    mean, se, _ = summary[arm][metric]
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


fit_table = pd.DataFrame([{
    "arm": arm, "gamma": specs[arm].gamma, "p": specs[arm].p,
    "MSE": cell(arm, "valid_mse", 3), "MSE @ threshold": cell(arm, "valid_mse_at_threshold", 3),
    "R^2": cell(arm, "valid_r2", 4), "train NFE": cell(arm, "train_fwd_nfe", 2),
} for arm in specs]).set_index("arm")
mechanism_table = pd.DataFrame([{
    "arm": arm, "median |f'|": cell(arm, "slope_abs_median", 3), "p90 |f'|": cell(arm, "slope_abs_p90", 3),
    "||J||_F/sqrt(d)": cell(arm, "jac_fro", 3), "rho = max |f'|": cell(arm, "spectral_radius", 3),
    "share |f'| >= 1": cell(arm, "unstable_share", 3),
} for arm in specs]).set_index("arm")
nfe_table = pd.DataFrame([{
    "arm": arm, "plain median": cell(arm, "plain_nfe_median", 1), "plain p90": cell(arm, "plain_nfe_p90", 1),
    "plain reached": cell(arm, "plain_reached", 3), "Anderson median": cell(arm, "anderson_nfe_median", 1),
    "Anderson p90": cell(arm, "anderson_nfe_p90", 1), "Anderson reached": cell(arm, "anderson_reached", 3),
} for arm in specs]).set_index("arm")
display(fit_table, mechanism_table, nfe_table)

# %% [markdown]
# ## The mechanism: the slope at the fixed point
#
# Left: $f'(z^*(x))$ against $x$, one line per arm (the mean over seeds at each validation
# input; the validation set is the same for every seed). Right: the distribution of
# $|f'(z^*)|$ over the validation inputs and seeds. The dotted line at 1 is where plain
# iteration stops contracting.

# %%
colors = {arm: f"C{i}" for i, arm in enumerate(specs)}
label = {arm: (f"$\\gamma$={s.gamma:g}" if not s.control else f"control ($\\gamma$={s.gamma:g}, p={s.p:g})")
         for arm, s in specs.items()}
per_sample = {arm: pd.concat([pd.DataFrame(r.curves["per_sample"]).assign(seed=r.seed) for r in runs])
              for arm, runs in grouped.items()}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
for arm, df in per_sample.items():
    mean_slope = df.groupby("x")["slope"].mean()
    axes[0].plot(mean_slope.index, mean_slope.values, color=colors[arm], lw=1.5, label=label[arm],
                 ls="--" if specs[arm].control else "-")
axes[0].axhline(1, color="k", ls=":", lw=1)
axes[0].axhline(0, color="0.6", lw=0.8)
axes[0].set(xlabel="$x$", ylabel="$f'(z^*(x))$", title="slope at the fixed point (mean over seeds)")
axes[0].legend(fontsize=8)
axes[1].boxplot([per_sample[arm]["slope"].abs() for arm in specs], whis=(5, 95), showfliers=False)
axes[1].set_xticks(range(1, len(specs) + 1), [label[a].replace("control ", "control\n") for a in specs], fontsize=8)
axes[1].axhline(1, color="k", ls=":", lw=1)
axes[1].set(ylabel="$|f'(z^*)|$", title="over inputs and seeds (5-95%)")
if out:
    fig.savefig(out / "fig5_slope.png")
plt.show()

# %% [markdown]
# ## Figure 5, redrawn around the fixed point
#
# Figure 5 draws the surface $z_\text{out} = f(z; x)$; its flatness at the equilibrium is the
# slope above. Here each panel cuts the surface at one input $x_0$ and shows the residual
# $f(z; x_0) - z$ against the distance $z - z^*(x_0)$ from each model's own equilibrium (first
# seed, in $y$'s units), one line per arm. Every line crosses zero at its fixed point; its
# slope there is $f'(z^*) - 1$. The dotted line, slope $-1$, is a perfectly flat surface
# ($f' = 0$, one plain iteration lands on $z^*$); a line near horizontal is a steep surface
# ($f' \to 1$), where the residual says little about where the fixed point is.

# %%
width = 0.25 * float(y_valid.std())
fig, axes = plt.subplots(1, len(exp.eval.slices), figsize=(10, 3.5), sharey=True)
axes = [axes] if len(exp.eval.slices) == 1 else axes
for ax, x0 in zip(axes, exp.eval.slices):
    x = torch.tensor([[x0]])
    for arm, runs in grouped.items():
        model = runs[0].model
        with torch.no_grad():
            z_star, _ = model.predict(x, SolverSettings(exp.eval.method, exp.eval.nfe_cap, exp.eval.tol * 1e-3))
            dz = torch.linspace(-width, width, 101) / data.y_std  # model units
            zz = z_star + dz[:, None]
            resid = (model.f(zz, x.expand_as(zz)) - zz)[:, 0] * data.y_std
        ax.plot(dz * data.y_std, resid, color=colors[arm], label=label[arm], ls="--" if specs[arm].control else "-")
    ax.plot([-width, width], [width, -width], "k:", lw=1, label="flat surface ($f'$=0)")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set(title=f"$x_0$ = {x0:g}", xlabel="$z - z^*(x_0)$")
axes[0].set_ylabel("$f(z; x_0) - z$")
axes[-1].legend(fontsize=7)
if out:
    fig.savefig(out / "fig5_slices.png")
plt.show()

# %% [markdown]
# ## Over training
#
# Left: the training loss (in the units trained on, smoothed over 100 steps, mean over seeds).
# Right: $\lVert J\rVert_F/\sqrt d$ on the fixed validation batch, from the monitor, mean over
# seeds with the band between the smallest and largest seed.

# %%
records = pd.DataFrame([{**rec, "arm": r.arm, "seed": r.seed} for r in results for rec in r.records])
monitored = records.dropna(subset=["monitor_jac_fro"])
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for arm in specs:
    df = records[records["arm"] == arm]
    loss = df.groupby("step")["loss"].mean().rolling(100, min_periods=1).mean()
    axes[0].plot(loss.index, loss.values, color=colors[arm], label=label[arm])
    mon = monitored[monitored["arm"] == arm].groupby("step")["monitor_jac_fro"]
    axes[1].plot(mon.mean().index, mon.mean().values, color=colors[arm], marker=".", ms=3,
                 ls="--" if specs[arm].control else "-")
    axes[1].fill_between(mon.min().index, mon.min().values, mon.max().values, color=colors[arm], alpha=0.15)
axes[0].set(yscale="log", xlabel="step", ylabel="training loss (trained units)", title="training MSE")
axes[1].set(xlabel="step", ylabel="$\\|J\\|_F/\\sqrt{d}$ (validation)", title="Jacobian norm during training")
axes[0].legend(fontsize=8)
if out:
    fig.savefig(out / "training_curves.png")
plt.show()

# %% [markdown]
# ## NFE per sample
#
# The share of validation samples (pooled over seeds) that reached a relative residual of
# $10^{-3}$ within $k$ calls, for plain fixed-point iteration (left; what Figure 5's bottom row
# runs) and for Anderson (right; the paper's solver).

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for ax, key, name in ((axes[0], "plain_nfe", "plain iteration"), (axes[1], "anderson_nfe", "Anderson")):
    for arm, df in per_sample.items():
        n = df[key].where(df[key] > 0).sort_values()
        ax.step(n.values, (torch.arange(1, len(n) + 1) / len(n)).numpy(), where="post", color=colors[arm],
                label=label[arm], ls="--" if specs[arm].control else "-")
    ax.set(xscale="log", xlabel="NFE to $10^{-3}$ (log scale)", ylabel="share of samples", title=name)
    ax.xaxis.set_major_locator(FixedLocator([1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
axes[0].legend(fontsize=8)
if out:
    fig.savefig(out / "nfe_per_sample.png")
plt.show()

# %% [markdown]
# ## Paired tests
#
# Each larger $\gamma$ against $\gamma = 0$ and against the next smaller $\gamma$, paired by
# seed (Student's t on the per-seed differences, two-sided; *direction* is the verdict on
# "smaller", at $\alpha = 0.05$). With 3 seeds only a consistent difference is significant.

# %%
tests = pd.concat([pd.DataFrame(pair_tests(results, exp, metric)).assign(metric=metric)
                   for metric in ("slope_abs_median", "plain_nfe_median", "anderson_nfe_median", "valid_mse")])
tests = tests[["metric", "pair", "difference", "se", "p", "n", "direction"]].round({"difference": 3, "se": 3, "p": 3})
display(tests.set_index(["metric", "pair"]))

# %% [markdown]
# ## The paper against this run
#
# The paper reports no numbers for this experiment, only Figure 5's picture: each row puts its
# statement (and where it is made) beside this run's numbers, mean ± standard error over seeds
# per arm, the ratio of the largest $\gamma$ to $\gamma = 0$ where absolute numbers cannot
# compare, and the verdict of the claim's test (next section).

# %%
verdicts = judge_claims(results, exp)
gamma_arms = sorted((s for s in specs.values() if not s.control), key=lambda s: s.gamma)
low, high = gamma_arms[0].name, gamma_arms[-1].name


def md(text: str) -> str:
    """A table cell: Markdown's column separator escaped."""
    return str(text).replace("|", "\\|")


def verdict_of(key: str) -> str:
    return verdicts[key].verdict if key in verdicts else "n/a"


paper_rows = [
    ("validation MSE (y's units)", f"noise floor {PAPER['synthetic.noise_var']['value']} "
     f"({PAPER['synthetic.noise_var']['source']}); {PAPER['synthetic.claim_fit']['value']} "
     f"({PAPER['synthetic.claim_fit']['source']})", "valid_mse", 3, verdict_of("fit")),
    ("R^2", "every learned z*(x) on the target (Figure 5)", "valid_r2", 4, ""),
    ("median |f'(z*)|", f"{PAPER['synthetic.claim_flat']['value']} ({PAPER['synthetic.claim_flat']['source']})",
     "slope_abs_median", 3, verdict_of("flat")),
    ("plain-iteration median NFE to 1e-3", f"{PAPER['synthetic.claim_nfe']['value']}: gamma 0 zigzags slowly, "
     f"gamma 2 and 4 converge fast ({PAPER['synthetic.claim_nfe']['source']})", "plain_nfe_median", 1,
     verdict_of("nfe_plain")),
    ("Anderson median NFE to 1e-3", f"{PAPER['synthetic.claim_nfe']['value']} (the paper's solver; not shown)",
     "anderson_nfe_median", 1, verdict_of("nfe_anderson")),
    ("forward NFE per training step", f"threshold {PAPER['synthetic.nfe_threshold']['value']} "
     f"({PAPER['synthetic.nfe_threshold']['source']})", "train_fwd_nfe", 2, "(setting)"),
]
header = ["this run's measure", "the paper"] + [label[a].replace("$\\gamma$", "γ") for a in specs] \
    + [f"{high} / {low}", "verdict"]
lines = ["| " + " | ".join(md(h) for h in header) + " |", "|" + "---|" * len(header)]
for what, paper_text, metric, digits, verdict_text in paper_rows:
    ratio_value = summary[high][metric][0] / summary[low][metric][0]
    cells = [what, paper_text] + [cell(a, metric, digits) for a in specs] + [f"{ratio_value:.3g}", verdict_text]
    lines.append("| " + " | ".join(md(c) for c in cells) + " |")
display(Markdown(f"Reading: {READING}.\n\n" + "\n".join(lines)))

# %% [markdown]
# ## What held in this run
#
# Each claim judged over seeds by the test named in its line: *held* when the test finds the
# claimed direction at $\alpha = 0.05$, *not held* when it finds the opposite, *inconclusive*
# otherwise. "Near the noise floor" is read as an MSE below twice the noise variance (the
# model's own error no larger than the noise). The positive control's line checks the
# measurement, not the paper.

# %%
ordered = [verdicts[k] for k in ("fit", "flat", "nfe_plain", "nfe_anderson", "control") if k in verdicts]
display(Markdown(claims_markdown(ordered, title=f"What held in this run ({READING})")))

# %%
mse_gap = {a: summary[a]["valid_mse_at_threshold"][0] - summary[a]["valid_mse"][0] for a in specs}
figure5 = [verdicts[k].verdict for k in ("fit", "flat", "nfe_plain") if k in verdicts]
reproduced = ("reproduces" if set(figure5) == {"held"} else
              "reproduces part of" if "held" in figure5 else "does not reproduce")
lines = [
    f"**Reading.** This run trained on {READING}; it {reproduced} Figure 5 "
    f"(fit: {verdicts['fit'].verdict}; flatter: {verdicts['flat'].verdict if 'flat' in verdicts else 'n/a'}; "
    f"fewer plain-iteration NFE: {verdicts['nfe_plain'].verdict if 'nfe_plain' in verdicts else 'n/a'}).",
    "**Slope.** Median $|f'(z^*)|$: " + ", ".join(f"{a} {summary[a]['slope_abs_median'][0]:.3f}" for a in specs)
    + "; share of inputs with $|f'| \\ge 1$ (where plain iteration does not converge): "
    + ", ".join(f"{a} {summary[a]['unstable_share'][0]:.3f}" for a in specs) + ".",
    f"**Fit.** Validation MSE against the noise floor {exp.data.noise_var:g} (claim: below "
    f"{FIT_FACTOR * exp.data.noise_var:g}): " + ", ".join(f"{a} {summary[a]['valid_mse'][0]:.3f}" for a in specs)
    + ". Output as trained (at most 6 calls) minus converged, in MSE: "
    + ", ".join(f"{a} {mse_gap[a]:+.3f}" for a in specs)
    + (" (negative: the truncated solve the model was trained through fits better than its exact "
       "equilibrium)." if min(mse_gap.values()) < -5e-4 else "."),
]
display(Markdown("\n\n".join(lines)))

# %% [markdown]
# **What it took, and what did not work** (from developing this notebook, stated qualitatively;
# the paper profile runs the raw reading, so its executed notebook shows the first point with
# its own numbers).
#
# - In the raw reading, $\gamma \le 4$ at $p = 0.4$ left the slope at the fixed point where
#   $\gamma = 0$ put it, close to 1: the model reaches the targets' scale through the
#   equilibrium's gain $1/(1 - f')$, the MSE dwarfs the penalty while it is large, and lowering
#   $f'$ later would cost the fit unless the weights grew by an order of magnitude. Only a much
#   larger weight applied at every step (the control) flattened the surface there, at a visible
#   cost in fit. A ten times larger initialization did not change this.
# - Standardizing the targets puts the loss and the penalty on one scale: there every
#   $\gamma \ge 1$ flattens the surface, and the penalized arms fit worse than $\gamma = 0$,
#   also at Table 4's full 50 epochs. Halving the training budget (this profile) widens that gap:
#   with the slope held near 0 the model is a one-hidden-layer network of $x$ without the
#   equilibrium's gain, and larger learning rates or batches did not recover its fit within the
#   budget.
# - Anderson on a scalar state barely sees the slope: where $f$ is affine between two iterates (a
#   ReLU network is piecewise affine), its extrapolation from two residuals is a secant step that
#   lands on the fixed point whatever $f'$ is, so it needs a few calls at any $\gamma$ unless a
#   kink of the ReLUs lies between the iterates. Plain iteration is the solver whose NFE follows
#   the mechanism, and the one Figure 5's bottom row runs.

# %%
if out:
    write_metrics(out, {
        "reading": exp.data.targets,
        "arms": {arm: {m: {"mean": v[0], "se": v[1], "n": v[2]} for m, v in summary[arm].items()} for arm in specs},
        "claims": {k: v.as_dict() for k, v in verdicts.items()},
        "pair_tests": {row["metric"] + ": " + row["pair"]: {c: row[c] for c in ("difference", "se", "p", "n",
                                                                               "direction")}
                       for row in tests.to_dict("records")},
    })
    mean_steps = records.groupby(["arm", "step"])[["loss", "fwd_rel_res", "fwd_nfe"]].mean().reset_index()
    write_curves(out, "curves.csv", mean_steps.to_dict("records"))
    mon = monitored.groupby(["arm", "step"])[["monitor_jac_fro", "monitor_spectral_radius",
                                              "monitor_slope_median"]].mean().reset_index()
    write_curves(out, "monitor.csv", mon.to_dict("records"))
    slope_x = pd.concat([df.groupby("x")[["slope"]].mean().reset_index().assign(arm=arm)
                         for arm, df in per_sample.items()])
    write_curves(out, "slope_vs_x.csv", slope_x.to_dict("records"))
print("claims:", {k: v.verdict for k, v in verdicts.items()})
