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
# # 03 · CIFAR-10 with a multiscale DEQ, with and without Jacobian regularization
#
# **Claim** (Table 2 and Table 3). A multiscale DEQ (MDEQ) classifies CIFAR-10 at 93.6% but
# needs about 17 function evaluations (NFE) per forward solve; stopping its solver at 6 NFE
# drops it to 89.1%. Trained with Jacobian regularization (JR), the same model reaches 93.1%
# at 6 NFE, on par with a ResNet-18 (93.0%), and keeps most of its accuracy even at 1-3 NFE
# (Table 3: 82-86% at NFE 1, 89.6-91.5% at NFE 2).
#
# **Setup** (Table 4, CIFAR-10 column). The equilibrium state is one feature map per scale.
# One application of $f_\theta$ runs a residual block on every scale (3x3 conv widening 5x,
# GroupNorm, ReLU, 3x3 conv, variational dropout, the input injected at the highest
# resolution, GroupNorm, the residual, ReLU, GroupNorm), then fuses the scales (stride-2 convs
# down, 1x1 conv + upsampling up) and applies ReLU, 1x1 conv and GroupNorm per scale; block and
# fusion-output convolutions are weight-normalized. A head widens each scale, sums them from
# high to low resolution, pools and classifies. The paper profile is Table 4: scales
# [28, 56, 112, 224], dropout 0.25, forward/backward NFE thresholds 7/8 with tolerances
# $10^{-3}/10^{-4}$, 200 epochs, batch 96, Adam $10^{-3}$, cosine schedule, and for the JR arm
# $\gamma = 0.5$, $p = 0.05$, $M = 1$. The two arms below share the seed, data, model and
# thresholds; only $\gamma$ differs (0 and 0.5).
#
# The **small** profile (what this committed notebook ran) keeps the solver, threshold and JR
# settings but trains on the 5085 / 1017-image slice of CIFAR-10 (the first 1017 images of each
# official batch) for 4 epochs, with 3 narrower scales [16, 32, 64] after one stride-2 stem
# convolution (the "input injection downsampling" of Table 4's ImageNet column), so the DEQ
# runs at 16x16, 8x8 and 4x4. It also starts from PyTorch's default initialization rather than
# $\mathcal N(0, 0.01^2)$ (see `params.yaml`). At this scale the absolute accuracies cannot be
# compared with the paper's; what can be compared is how the two arms differ.

# %%
import time

import pandas as pd
import torch
from IPython.display import display
from matplotlib import pyplot as plt
from pathlib import Path

from deqlib.config import load_experiment, to_dict
from deqlib.data.cifar import random_crop_flip
from deqlib.experiments.cifar import ARMS, CifarExperiment, load_data, run_arm
from deqlib.report import PAPER, make_output_dir, print_setup, use_style, write_curves, write_metrics

use_style()

# %% tags=["parameters"]
profile = "small"  # "paper" or "small"; the runner injects the profile DVC chose
overrides = {}  # e.g. {"train.max_steps": 3} for a smoke run
output_dir = ""  # where metrics, curves and figures go ("" writes nothing)
params_path = "../params.yaml"

# %%
exp = load_experiment(CifarExperiment, "cifar10", profile, overrides, params_path)
base = Path(params_path).resolve().parent  # relative data roots are relative to params.yaml
out = make_output_dir(output_dir)
print_setup(profile, to_dict(exp), penalty="JR arm penalty")

# %% [markdown]
# ## The data
#
# Training batches are randomly cropped from the image padded by 4 black pixels and flipped
# horizontally, then normalized per channel; test images are only normalized.

# %%
data = load_data(exp, base)
print(f"train {len(data.train_y)}, test {len(data.test_y)} images of {tuple(data.train_x.shape[1:])}; "
      f"test images per class: {data.test_y.bincount(minlength=10).tolist()}")
fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
shown = data.train_x[:8]
augmented = random_crop_flip(shown, torch.Generator().manual_seed(0), exp.data.pad)
for i in range(8):
    for row, imgs in enumerate((shown, augmented)):
        axes[row, i].imshow(imgs[i].permute(1, 2, 0).numpy())
        axes[row, i].axis("off")
    axes[0, i].set_title(data.classes[int(data.train_y[i])], fontsize=8)
fig.suptitle("training images (top) and one augmented draw of them (bottom)", fontsize=10)
plt.show()

# %% [markdown]
# ## Training the two arms
#
# Each step records the loss, the forward and backward NFE and relative residuals
# $\lVert f(z)-z\rVert / \lVert f(z)\rVert$, and $\lVert J\rVert_F$ when the penalty is drawn.
# After training, each model is measured on the whole test set: accuracy with the forward solve
# hard-stopped after $k$ calls, and the calls each image needs to reach a relative residual of
# $10^{-3}$ (Anderson, capped).

# %%
# NBVAL_IGNORE_OUTPUT
arms = {}
for jr in (False, True):
    t0 = time.perf_counter()
    arm = run_arm(exp, jr, base=base, data=data, progress=True)
    arms[arm["arm"]] = arm
    print(f"{arm['arm']}: {len(arm['records'])} steps, trained and evaluated in {time.perf_counter() - t0:.0f} s")

# %% [markdown]
# ## Results
#
# *acc @ k NFE*: test accuracy with the forward solve hard-stopped after $k$ calls of $f$
# (the training threshold is 7). *acc @ 1e-3*: every image solved to a relative residual of
# $10^{-3}$ (at most 40 calls). *NFE to 1e-3*: mean calls needed over the images that got
# there; *reached*: the share that did; *all (>=)*: the mean over every image with those that
# did not get there counted at 40 (so a lower bound). *train NFE* and *train res.* are means
# over the training steps.

# %%
ev = exp.eval
k_train = exp.train.forward.max_iter if exp.train.forward.max_iter in ev.nfe else max(ev.nfe)
rows = []
for name, arm in arms.items():
    m = arm["metrics"]
    rows.append({
        "arm": name,
        "acc @ 1e-3 (%)": round(100 * m["acc_tol"], 1),
        f"acc @ {k_train} NFE (%)": round(100 * m[f"acc_nfe_{k_train}"], 1),
        "NFE to 1e-3": round(m["nfe_to_tol_mean"], 1),
        "reached (%)": round(100 * m["reached_tol"], 1),
        "NFE to 1e-3, all (>=)": round(m["nfe_to_tol_capped_mean"], 1),
        "train fwd NFE": round(m["train_fwd_nfe"], 2),
        "train bwd NFE": round(m["train_bwd_nfe"], 2),
        "train fwd res.": round(m["train_fwd_rel_res"], 3),
        "train bwd res.": round(m["train_bwd_rel_res"], 4),
        "train acc, last epoch (%)": round(100 * m["train_acc_last_epoch"], 1),
    })
results = pd.DataFrame(rows).set_index("arm")
display(results)

# %% [markdown]
# Table 3's layout: test accuracy (%) at a hard NFE cap, for this run's two arms and, below,
# the paper's JR models at three values of $\gamma$ (full CIFAR-10, 200 epochs).

# %%
table3 = pd.DataFrame({name: {k: round(100 * arm["metrics"][f"acc_nfe_{k}"], 1) for k in ev.nfe}
                       for name, arm in arms.items()}).T
table3.columns = [f"NFE {k}" for k in ev.nfe]
display(table3)
paper3 = pd.DataFrame({f"paper, JR gamma={g}": dict(zip(range(1, 7), accs))
                       for g, accs in PAPER["cifar10.table3"]["value"].items()}).T
paper3.columns = [f"NFE {k}" for k in paper3.columns]
display(paper3)

# %% [markdown]
# ## Paper vs this run
#
# The paper's MDEQ row was trained with a larger NFE budget; here both arms train at the same
# 7 / 8, so "MDEQ" is the unregularized arm solved to $10^{-3}$ and its NFE is the mean it
# needed. No ResNet-18 is trained here.

# %%
noj, jrm = arms[ARMS[0]]["metrics"], arms[ARMS[1]]["metrics"]
k6 = 6 if 6 in ev.nfe else max(ev.nfe)
p_mdeq, p_hard, p_jr = (PAPER[k]["value"] for k in ("cifar10.mdeq", "cifar10.mdeq_hard_stop", "cifar10.mdeq_jr"))
paper_vs_run = pd.DataFrame([
    {"model": "MDEQ", "paper acc (%)": f"{p_mdeq['accuracy']} ± {p_mdeq['std']}", "paper NFE": str(p_mdeq["nfe"]),
     "this run acc (%)": f"{100 * noj['acc_tol']:.1f}",
     "this run NFE": f"{noj['nfe_to_tol_mean']:.1f} ({100 * noj['reached_tol']:.0f}% of images reach 1e-3)",
     "source": PAPER["cifar10.mdeq"]["source"]},
    {"model": "MDEQ, hard-stopped", "paper acc (%)": f"{p_hard['accuracy']}", "paper NFE": str(p_hard["nfe"]),
     "this run acc (%)": f"{100 * noj[f'acc_nfe_{k6}']:.1f}", "this run NFE": str(k6),
     "source": PAPER["cifar10.mdeq_hard_stop"]["source"]},
    {"model": "MDEQ + JR", "paper acc (%)": f"{p_jr['accuracy']} ± {p_jr['std']}", "paper NFE": str(p_jr["nfe"]),
     "this run acc (%)": f"{100 * jrm[f'acc_nfe_{k6}']:.1f}", "this run NFE": str(k6),
     "source": PAPER["cifar10.mdeq_jr"]["source"]},
    {"model": "ResNet-18", "paper acc (%)": f"{PAPER['cifar10.resnet18']['value']['accuracy']}", "paper NFE": "-",
     "this run acc (%)": "not run", "this run NFE": "-", "source": PAPER["cifar10.resnet18"]["source"]},
]).set_index("model")
display(paper_vs_run)
if out:
    write_metrics(out, {name.replace(" + ", "_").replace(" ", "_"): arm["metrics"] for name, arm in arms.items()})
    write_curves(out, "curves.csv", [{**r, "arm": name} for name, arm in arms.items() for r in arm["records"]])
    write_curves(out, "accuracy_vs_nfe.csv", [{"arm": name, "nfe": k, "accuracy": arm["metrics"][f"acc_nfe_{k}"]}
                                              for name, arm in arms.items() for k in ev.nfe])

# %% [markdown]
# ## Over training
#
# Relative residual left after the forward solve (7 calls) and after the backward solve (8
# calls), per step, smoothed over 20 steps. The penalty was drawn on the JR arm's steps marked
# at the bottom of the left panel.

# %%
curves = pd.DataFrame([{**r, "arm": name} for name, arm in arms.items() for r in arm["records"]])
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for name, df in curves.groupby("arm", sort=False):
    axes[0].plot(df["step"], df["fwd_rel_res"].rolling(20, min_periods=1).mean(), label=name)
    axes[1].plot(df["step"], df["bwd_rel_res"].rolling(20, min_periods=1).mean(), label=name)
    axes[2].plot(df["step"], df["loss"].rolling(20, min_periods=1).mean(), label=name)
pen = curves[curves["arm"] == ARMS[1]].dropna(subset=["jac_fro"])
axes[0].plot(pen["step"], [0.7 * curves["fwd_rel_res"].min()] * len(pen), "|", color="k", ms=8,
             label="JR drawn")
axes[0].set(yscale="log", title="forward relative residual", xlabel="step")
axes[1].set(yscale="log", title="backward relative residual", xlabel="step")
axes[2].set(title="training loss", xlabel="step")
axes[0].legend(fontsize=8)
if out:
    fig.savefig(out / "residuals_over_training.png")
plt.show()

# %% [markdown]
# ## Accuracy against evaluation NFE
#
# Left: this run, each arm hard-stopped after $k$ calls (dotted: solved to $10^{-3}$).
# Right: the paper's Table 3 (JR models at three $\gamma$, full data).

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for (name, arm), color in zip(arms.items(), ("C0", "C1")):
    m = arm["metrics"]
    axes[0].plot(list(ev.nfe), [100 * m[f"acc_nfe_{k}"] for k in ev.nfe], "o-", color=color, label=name)
    axes[0].axhline(100 * m["acc_tol"], color=color, ls=":", lw=1)
axes[0].set(xlabel="NFE at evaluation", ylabel="test accuracy (%)", title="this run")
axes[0].legend()
for g, accs in PAPER["cifar10.table3"]["value"].items():
    axes[1].plot(range(1, 7), accs, "o--", label=f"JR, $\\gamma$={g}")
axes[1].set(xlabel="NFE at evaluation", ylabel="test accuracy (%)", title="paper, Table 3")
axes[1].legend()
if out:
    fig.savefig(out / "accuracy_vs_nfe.png")
plt.show()

# %% [markdown]
# ## What held at this scale
#
# The cell below checks the paper's claims against this run's numbers; the prose after it
# discusses them.

# %%
gap_noj = 100 * (noj["acc_tol"] - noj[f"acc_nfe_{k6}"])
checks = {
    f"hard-stopping the unregularized MDEQ at {k6} NFE costs accuracy (vs solved to 1e-3)": gap_noj > 0,
    "JR needs fewer NFE to reach 1e-3": jrm["nfe_to_tol_mean"] < noj["nfe_to_tol_mean"],
    "JR: more test images reach 1e-3 within the cap": jrm["reached_tol"] > noj["reached_tol"],
    f"JR at {k6} NFE is at least as accurate as the unregularized MDEQ at {k6} NFE":
        jrm[f"acc_nfe_{k6}"] >= noj[f"acc_nfe_{k6}"],
    f"JR at {k6} NFE is within 0.5 points of the unregularized MDEQ solved to 1e-3":
        100 * jrm[f"acc_nfe_{k6}"] >= 100 * noj["acc_tol"] - 0.5,
    "JR at NFE 1 is more accurate than the unregularized MDEQ at NFE 1": jrm["acc_nfe_1"] > noj["acc_nfe_1"],
    "JR keeps a lower forward residual during training": jrm["train_fwd_rel_res"] < noj["train_fwd_rel_res"],
    "JR keeps a lower backward residual during training": jrm["train_bwd_rel_res"] < noj["train_bwd_rel_res"],
}
for claim, held in checks.items():
    print(f"{'held' if held else 'did not hold':>13}: {claim}")
print(f"accuracy lost by the unregularized arm at {k6} NFE: {gap_noj:.1f} points (paper: 4.5)")
n_pen = int(curves.loc[curves['arm'] == ARMS[1], 'jac_fro'].notna().sum())
print(f"JR arm: penalty drawn on {n_pen} of {len(arms[ARMS[1]]['records'])} steps")
n_test = int(noj["n"])
se = 100 * (noj["acc_tol"] * (1 - noj["acc_tol"]) / n_test) ** 0.5
print(f"one test image = {100 / n_test:.2f} points; binomial standard error of one accuracy here: {se:.1f} points")

# %% [markdown]
# **Conclusion.** At this scale (5085 training images, 4 epochs) both arms learn but stay near
# 30% test accuracy, so the paper's absolute numbers (93%) are out of reach and what can be
# read off is how the two arms differ, on one seed and 1017 test images, where one image is
# 0.1 point and the standard error of an accuracy is about 1.5 points.
#
# *Held, in direction:* hard-stopping the unregularized MDEQ costs accuracy (29.3% at 6 NFE
# against 31.5% when solved to $10^{-3}$: 2.2 points, the paper's 4.5); the JR arm is ahead of
# it at every cap from 1 to 8 NFE, most at the smallest (26.0 vs 22.2% at NFE 1, 0.1 point at 8), so its
# accuracy-vs-NFE curve is flatter, as in Table 3; JR kept lower forward and backward
# residuals during training (0.160 vs 0.178 and 0.039 vs 0.062) and more of its test images
# reach $10^{-3}$ within 40 calls (86.9 vs 78.6%).
#
# *Did not hold:* JR at 6 NFE (30.3%) does not match the unregularized model solved to
# convergence (31.5%), and JR does not make the equilibrium cheaper to reach: the images that
# get to $10^{-3}$ need 21.5 calls on average in both arms, far from the paper's 6 against 17.
# Counting the images that never get there at the 40-call cap gives 25.4 against 23.9 (lower
# bounds): the gap comes from how many images converge, not from how fast.
# Neither arm's forward solve gets near $10^{-3}$ within the 7-call training threshold
# (residual 0.16-0.18), so both are trained on inexact equilibria.
#
# Two limits of this run bound those findings. The penalty, at the paper's $p = 0.05$, was drawn
# on only 18 of 316 steps (the paper's 200 epochs give about 5,000), and most differences
# between the arms above are within the standard error of a single run; they are consistent
# with the paper's claims without establishing them.
