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
# $\gamma$ makes the surface $z_\text{out} = f_\theta(z; x)$ flatter around the fixed point,
# and the equilibrium then needs fewer function evaluations (NFE) to find.
#
# **Setup** (supplement A.1, Table 4, first column). 5096 pairs of
# $y = 1.5x^3 + x^2 + 5x + 2\sin x - 3 + \delta$: 4096 for training, 1000 for validation.
# The paper leaves two things open, and we state our reading: $\delta \sim \mathcal N(0, 0.05)$
# is read as *variance* 0.05 (std 0.224), so the best possible validation MSE is about 0.05;
# $x$ is drawn uniformly on $[-2, 2]$. The model is the paper's 200-parameter
# $f(z; x) = W_2^\top \mathrm{ReLU}(W_1 z + U x + b)$ with scalar $z, x$ and width 50,
# initialized from $\mathcal N(0, 0.01^2)$. Training: 50 epochs, batch 64, Adam $10^{-3}$,
# cosine schedule, forward/backward NFE thresholds 6/6 with tolerances
# $10^{-3}/10^{-4}$, Jacobian penalty with $p = 0.4$, $M = 1$, and
# $\gamma \in \{0, 1, 2, 4\}$. The small profile is the paper profile: it fits a laptop.

# %%
import pandas as pd
import torch
from IPython.display import display
from matplotlib import pyplot as plt

from deqlib.config import load_experiment, to_dict
from deqlib.data.synthetic import make_synthetic, target_function
from deqlib.experiments.synthetic import SyntheticExperiment, run_arm, surface
from deqlib.report import PAPER, make_output_dir, print_setup, use_style, write_curves, write_metrics

use_style()

# %% tags=["parameters"]
profile = "small"  # "paper" or "small"; the runner injects the profile DVC chose
overrides = {}  # e.g. {"train.max_steps": 3} for a smoke run
output_dir = ""  # where metrics, curves and figures go ("" writes nothing)
params_path = "../params.yaml"

# %%
exp = load_experiment(SyntheticExperiment, "synthetic", profile, overrides, params_path)
out = make_output_dir(output_dir)
print_setup(profile, to_dict(exp), penalty_hides=("gamma",))

# %% [markdown]
# ## The data (Figure 9)
#
# The gray curve is the noise-free target $h(x)$; the dots are the validation pairs.

# %%
(x_train, y_train), (x_valid, y_valid) = make_synthetic(exp.data)
xs = torch.linspace(exp.data.x_min, exp.data.x_max, 400)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.scatter(x_valid, y_valid, s=4, alpha=0.4, label="validation pairs")
ax.plot(xs, target_function(xs), color="0.4", lw=2, label="target $h(x)$")
ax.set(xlabel="$x$", ylabel="$y$", title="Figure 9: target function and data")
ax.legend()
if out:
    fig.savefig(out / "fig9_target.png")
plt.show()
print(f"train {len(x_train)}, valid {len(x_valid)}; y in [{float(y_valid.min()):.1f}, "
      f"{float(y_valid.max()):.1f}], var(y) = {float(y_valid.var()):.1f}")

# %% [markdown]
# ## Training one model per $\gamma$
#
# Same seed, data and budget for every arm; only $\gamma$ changes. Each step records the loss,
# forward/backward NFE and residuals, and the Jacobian estimate when the penalty is drawn.

# %%
# NBVAL_IGNORE_OUTPUT
import time

arms = {}
for gamma in exp.eval.gammas:
    t0 = time.perf_counter()
    arms[gamma] = run_arm(exp, gamma, progress=True)
    print(f"gamma={gamma:g}: trained {len(arms[gamma]['records'])} steps "
          f"in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## Results against the paper's claims
#
# *valid MSE* is measured at the equilibrium solved to convergence (Anderson, cap
# 200 calls); *MSE@6* at the training threshold of 6 calls. *NFE to 1e-3* is the number of
# calls until the relative residual of the whole validation batch,
# $\lVert f(Z)-Z\rVert / \lVert f(Z)\rVert$, falls below $10^{-3}$ (for scalar states the
# per-sample ratio is ill-posed where $z^*$ crosses 0). $\lVert J\rVert_F$ is
# $\sqrt{\mathrm{mean}_x\, f'(z^*)^2}$ and $\rho$ the spectral radius $|f'(z^*)|$ (mean and max
# over the validation set).

# %%
rows = []
for gamma, arm in arms.items():
    rows.append({
        "gamma": gamma,
        "valid MSE": round(arm["valid_mse"], 3),
        "MSE@6": round(arm["valid_mse_at_threshold"], 3),
        "R^2": round(arm["valid_r2"], 4),
        "NFE to 1e-3": arm["nfe_to_tol"],
        "||J||_F": round(arm["jac_fro"], 3),
        "rho mean": round(arm["spectral_radius_mean"], 3),
        "rho max": round(arm["spectral_radius_max"], 3),
    })
table = pd.DataFrame(rows).set_index("gamma")
display(table)

paper = pd.DataFrame([
    {"claim": PAPER["synthetic.claim_fit"]["value"], "source": PAPER["synthetic.claim_fit"]["source"],
     "this run": f"valid MSE {table['valid MSE'].min():.3f} to {table['valid MSE'].max():.3f} "
                 f"(noise floor {exp.data.noise_var:g}); R^2 >= {table['R^2'].min():.4f}"},
    {"claim": PAPER["synthetic.claim_flat"]["value"], "source": PAPER["synthetic.claim_flat"]["source"],
     "this run": "NFE " + " / ".join(str(v) for v in table["NFE to 1e-3"])
                 + "; ||J||_F " + " / ".join(f"{v:.3f}" for v in table["||J||_F"])
                 + f" for gamma {' / '.join(f'{g:g}' for g in table.index)}"},
])
display(paper)
if out:
    write_metrics(out, {f"gamma_{g:g}": {k: v for k, v in arm.items()
                                          if k not in ("records", "trace", "model")}
                        for g, arm in arms.items()})
    write_curves(out, "curves.csv", [{**r, "gamma": g} for g, arm in arms.items() for r in arm["records"]])
    write_curves(out, "residual_vs_nfe.csv", [{"gamma": g, "nfe": i + 1, "batch_rel_residual": float(v)}
                                              for g, arm in arms.items() for i, v in enumerate(arm["trace"])])

# %% [markdown]
# ## The surfaces (Figure 5)
#
# Each panel is $z_\text{out} = f_\theta(z; x)$ over $(x, z)$; the red dashed line is the
# learned equilibrium $z^*(x)$, where the surface meets the plane $z_\text{out} = z$.

# %%
z_lo, z_hi = float(y_valid.min()) - 2, float(y_valid.max()) + 2
fig = plt.figure(figsize=(4 * len(arms), 4))
order = torch.argsort(x_valid[:, 0])
for k, (gamma, arm) in enumerate(arms.items()):
    X, Z, F = surface(arm["model"], (exp.data.x_min, exp.data.x_max), (z_lo, z_hi), exp.eval.grid)
    ax = fig.add_subplot(1, len(arms), k + 1, projection="3d")
    ax.plot_surface(X.numpy(), Z.numpy(), F.numpy(), cmap="viridis", alpha=0.7, linewidth=0)
    with torch.no_grad():
        z_star, _ = arm["model"].predict(x_valid)
    xv, zv = x_valid[order, 0].numpy(), z_star[order, 0].numpy()
    ax.plot(xv, zv, zv, "r--", lw=2)
    ax.set(xlabel="$x$", ylabel="$z$", zlabel="$f(z;x)$", title=f"$\\gamma$ = {gamma:g}")
    ax.view_init(elev=20, azim=-60)
if out:
    fig.savefig(out / "fig5_surfaces.png")
plt.show()

# %% [markdown]
# A flatter surface means a smaller slope $\partial f/\partial z$ at the equilibrium: the
# slices below cut each surface at three values of $x$ and show $f(z; x)$ against the identity.

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=False)
for ax, x0 in zip(axes, (-1.5, 0.0, 1.5)):
    zz = torch.linspace(z_lo, z_hi, 200).unsqueeze(1)
    for gamma, arm in arms.items():
        with torch.no_grad():
            ax.plot(zz[:, 0], arm["model"].f(zz, torch.full_like(zz, x0))[:, 0], label=f"$\\gamma$={gamma:g}")
    ax.plot(zz[:, 0], zz[:, 0], "k:", lw=1, label="$z_{out}=z$")
    ax.axvline(float(target_function(torch.tensor(x0))), color="0.6", lw=1)
    ax.set(title=f"x = {x0:g}", xlabel="$z$", ylabel="$f(z; x)$")
axes[0].legend(fontsize=8)
if out:
    fig.savefig(out / "fig5_slices.png")
plt.show()

# %% [markdown]
# ## Over training
#
# Forward relative residual after the 6-call threshold, and the Jacobian estimate on the
# steps where the penalty was drawn (about 40% of them), smoothed over 100 steps.

# %%
curves = pd.DataFrame([{**r, "gamma": g} for g, arm in arms.items() for r in arm["records"]])
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for gamma, df in curves.groupby("gamma"):
    axes[0].plot(df["step"], df["loss"].rolling(100, min_periods=1).mean(), label=f"$\\gamma$={gamma:g}")
    axes[1].plot(df["step"], df["fwd_rel_res"].rolling(100, min_periods=1).mean())
    jac = df.dropna(subset=["jac_fro"])
    axes[2].plot(jac["step"], jac["jac_fro"].rolling(40, min_periods=1).mean())
axes[0].set(yscale="log", title="training MSE", xlabel="step")
axes[1].set(yscale="log", title="forward rel. residual (per-sample mean)", xlabel="step")
axes[2].set(title="$\\|J\\|_F$ estimate (penalized steps)", xlabel="step")
axes[0].legend()
if out:
    fig.savefig(out / "training_curves.png")
plt.show()

# %% [markdown]
# Residual of the whole validation batch against the number of calls, each model solved
# with Anderson well past the tolerance.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for gamma, arm in arms.items():
    ax.semilogy(range(1, len(arm["trace"]) + 1), arm["trace"], label=f"$\\gamma$={gamma:g}")
ax.axhline(exp.eval.tol, color="k", ls=":", lw=1)
ax.set(xlabel="NFE", ylabel="batch relative residual", xlim=(0, 60), title="convergence at evaluation")
ax.legend()
if out:
    fig.savefig(out / "residual_vs_nfe.png")
plt.show()

# %% [markdown]
# ## What held at this scale
#
# The cell below checks the two claims against this run's numbers; the prose after it
# discusses them.

# %%
fits = bool((table["valid MSE"] < 10 * exp.data.noise_var).all())
gam = list(table.index)
jac_monotone = all(a >= b for a, b in zip(table["||J||_F"], table["||J||_F"][1:]))
nfe = [v if v is not None else float("inf") for v in table["NFE to 1e-3"]]
nfe_fewer = nfe[-1] < nfe[0]
nfe_monotone = all(a >= b for a, b in zip(nfe, nfe[1:]))
print(f"every gamma fits (valid MSE < 10x the noise variance): {fits}")
print(f"||J||_F decreases with gamma: {jac_monotone}")
print(f"largest gamma needs fewer NFE than gamma=0: {nfe_fewer} ({nfe[-1]} vs {nfe[0]})")
print(f"NFE non-increasing in gamma: {nfe_monotone}")

# %% [markdown]
# **Conclusion.** *Every $\gamma$ fits* held: all four models reach $R^2 \ge 0.998$ on
# the validation set, though their MSE (0.17 to 0.25 in the run committed here) is 3 to 5
# times the noise floor of 0.05, a looser fit than Figure 5 shows. *Larger $\gamma$ flattens
# the surface and needs fewer NFEs* did **not** hold at this configuration: $\lVert J\rVert_F$ stays
# between 0.89 and 0.90 and the batch residual reaches $10^{-3}$ after 7 calls for every $\gamma$.
#
# Why, as far as this run shows: the targets span about $\pm 23$ while the parameters start
# at $\mathcal N(0, 0.01^2)$. The training curves show the models reaching that range through
# the equilibrium's gain $1/(1 - f')$ with a slope $f' \approx 0.9$, and while the MSE is
# large (it starts near 140) it outweighs $\gamma \lVert J\rVert_F^2 / d \le 4$. The penalty is active: its
# estimate is recorded on the penalized steps, and a test (`tests/test_train.py`) shows that a
# penalty comparable to the loss does lower $\lVert J\rVert_F$. Details the paper leaves open
# (the range of $x$, the reading of $\mathcal N(0, 0.01)$ and of the noise) plausibly decide
# this; we report what this reading gives rather than tune it to agree.
