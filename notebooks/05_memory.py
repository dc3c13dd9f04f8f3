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
# # 05 · What a DEQ costs in memory and time, and what JR changes
#
# **Claims.** *DEQ (NeurIPS 2019):* the implicit backward differentiates through the
# equilibrium without storing the iterates that reached it, so training memory is that of one
# layer's activations, constant in the effective depth (the number of solver calls); on
# WikiText-103 the DEQ-TrellisNet used 80-85% less memory than explicit models. *Jacobian
# regularization (ICML 2021, Table 1 / Table 5, supplement B.1):* at batch 15 and excluding
# embeddings, the Post-LN DEQ-Transformer trained at 30 NFE takes 3.9 GB, at 20 NFE 3.6 GB,
# with JR at 13-14 NFE 4.8 GB, "a roughly 25% increase", "less than the memory consumption of
# a layer, because the reduction in NFEs needed on the other side saves the memory used by the
# solver"; the 18-layer Transformer-XL takes 9.0 GB, about 2x. Relative to Transformer-XL the
# DEQ trains 3.1x slower at 30 NFE, 2.2x at 20, and 1.4-1.5x with JR at 13-14 NFE.
#
# **What this notebook does.** No training: it measures training steps of the two models of
# the paper, the DEQ-Transformer and the MDEQ, each differentiated every way the library can,
# at small sizes on the CPU:
#
# 1. memory against effective depth: the DEQ with the implicit backward (and the phantom
#    gradient) at forward NFE from 4 to 32, the *same solve differentiated by unrolled autograd*
#    (plain iteration, the library's `backward="unrolled"`), and explicit stacks of 2 to 18
#    layers, weight-tied and untied;
# 2. Table 5's rows at the paper's NFE: the penalty's increment on a step that draws it, and
#    the solvers' own buffers (forward Anderson, backward Broyden, as the release scripts);
# 3. step time against NFE, the penalty drawn with the paper's frequency $p$, against the
#    explicit stack of the paper's depth (18 layers): Table 5's $t_\text{train}$ as ratios.
#
# **Departures from the paper's setting**, each because this notebook measures rather than
# trains: the weights and inputs are seeded random draws (memory and time depend on shapes and
# calls, not on values); every solve runs exactly the NFE asked (the tolerance is out of
# reach), forward and backward alike at Table 5's training NFE, where the paper's JR models
# were trained at a threshold of 12-14 that their solves could stop before; the explicit
# network is 18 untied copies of the DEQ's own layer, not Transformer-XL (whose feed-forward
# is narrower); the solvers are this library's Anderson (a fixed window) and Broyden (a basis
# that grows with the calls a solve takes, up to its window), where the official Broyden holds
# as many states as its threshold. The MDEQ has no memory or time figure in the paper: it is
# measured at its Table 4 threshold, without and with the penalty.
#
# **Two measures of memory, both device-independent.** *Peak live bytes*: the largest total
# of live tensors made during the step (`deqlib.measure.PeakMemory`: activations, temporaries,
# the gradients its backward makes, and the solvers' history buffers while a solve holds them;
# not the parameters or optimizer state, which exist before the step). *Saved bytes*: the
# distinct storages autograd saves for backward during the step (activations, and the
# weight-normalized weights the backward reads; no gradients, no solver buffers). On CUDA the
# harness also records `torch.cuda.max_memory_allocated`. **Two kinds of step.** The *whole*
# step is the model's training step, embedding and softmax (the MDEQ's stem and head)
# included. The *layer* step is the paper's "excluding embeddings": the equilibrium layer (or
# the explicit stack) and its solvers alone, the injection a fixed random input that receives
# its gradient, the loss a fixed random linear readout of the output state. The paper's figures
# are GPU allocator peaks on an RTX 2080 Ti at paper size, and its text does not say what else
# they count, so this notebook compares *ratios*, never gigabytes with megabytes.

# %%
import time

t_notebook = time.perf_counter()
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display
from matplotlib import pyplot as plt

from deqlib.config import load_experiment, to_dict
from deqlib.experiments.core import run_arms
from deqlib.experiments.memory import (MemoryExperiment, by_row, device_figures, expected_times, flatness, growth,
                                       memory_verdicts, penalty_increments, per_layer_saved_mb, run_arm,
                                       sweep_table, table5, time_table, time_verdicts)
from deqlib.report import PAPER, claims_markdown, make_output_dir, use_style, write_curves, write_metrics

use_style()
pd.set_option("display.width", 250, "display.max_columns", 50, "display.max_colwidth", 80)

# %% tags=["parameters"]
profile = "small"  # "paper" or "small"; the runner injects the profile DVC chose
overrides = {}  # e.g. {"eval.repeats": 2} for a smoke run
output_dir = ""  # where metrics, curves and figures go ("" writes nothing)
params_path = "../params.yaml"

# %%
exp = load_experiment(MemoryExperiment, "memory", profile, overrides, params_path)
out = make_output_dir(output_dir)
cfg = to_dict(exp)
print(f"profile: {profile}; device: {exp.device}; seed {exp.seed} (weights and inputs; the figures do not "
      "depend on it)")
for name in exp.models:
    spec = cfg[name]
    sizes = {k: v for k, v in spec.items() if k not in ("forward", "backward", "jacobian", "time_nfe", "depth")}
    print(f"{name:>12}: {sizes}")
    print(f"{'':>12}  forward {spec['forward']['method']} / backward {spec['backward']['method']}, threshold "
          f"{spec['forward']['max_iter']} / {spec['backward']['max_iter']}, tol {spec['forward']['tol']:g} (out of "
          f"reach: every solve runs the NFE asked); penalty gamma {spec['jacobian']['gamma']}, "
          f"p {spec['jacobian']['p']}, M {spec['jacobian']['n_probes']}; explicit depth {spec['depth']}; "
          f"timed NFE {spec['time_nfe']}")
print(f"{'grids':>12}: {cfg['eval']}")

# %% [markdown]
# ## The run
#
# One arm per model (`deqlib.experiments.memory.run_arm`): the memory sweep, Table 5's rows
# with the solvers' buffers, then every timed step `eval.repeats` times in interleaved rounds.
# Memory on the CPU is a deterministic function of shapes and calls: each figure below is one
# exact measurement. Times are not, and are kept out of the checked outputs.

# %%
# NBVAL_IGNORE_OUTPUT
results = run_arms(run_arm, exp, exp.models, [exp.seed], progress=False)
by_model = {r.arm: r for r in results}
depth_of = {name: getattr(exp, name).depth for name in exp.models}

# %% [markdown]
# ## 1. Memory against effective depth
#
# Layer steps, one line per way of differentiating them; the effective depth is the forward
# NFE for the DEQ (its backward solve at the model's threshold throughout) and the number of
# layers for an explicit stack.

# %%
styles = {"implicit": ("o-", "DEQ, implicit backward"), "phantom": ("^-", "DEQ, phantom gradient"),
          "unrolled": ("s--", "same solve, unrolled autograd"), "tied": ("d:", "explicit, weight-tied"),
          "untied": ("x:", "explicit, untied")}
for key, label in (("core_peak_live_mb", "peak live MB (layer step)"),
                   ("core_saved_mb", "saved for backward, MB (layer step)")):
    fig, axes = plt.subplots(1, len(results), figsize=(10, 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        for method, values in sweep_table(r, key).items():
            fmt, name = styles[method]
            ax.plot(list(values), list(values.values()), fmt, label=name)
        ax.set(yscale="log", xlabel="effective depth (forward NFE or layers)", ylabel=label, title=r.arm)
    axes[0][0].legend(fontsize=8)
    if out:
        fig.savefig(out / f"{key.replace('core_', '').replace('_mb', '')}_vs_depth.png")
    plt.show()

# %%
sweep = pd.DataFrame([row for r in results for row in r.curves["memory"]])
for key in ("core_peak_live_mb", "core_saved_mb"):
    print(f"{key} by effective depth:")
    display(sweep.pivot_table(index=["model", "method"], columns="depth", values=key, sort=False).round(2))

# %%
lines = []
for name, r in by_model.items():
    fl, un, ti = flatness(r), growth(r, "unrolled"), growth(r, "tied")
    same = "the same at every NFE" if fl["saved_identical"] else "not the same at every NFE"
    text = (f"- **{name}**: with the implicit backward the layer step's peak is {fl['first_mb']:.2f} MB at "
            f"{fl['first_nfe']} NFE and {fl['last_mb']:.2f} MB at {fl['last_nfe']} (largest change over the sweep "
            f"{fl['max_rel_change']:.1%}); the saved bytes are {same}. The same solve unrolled grows "
            f"{un['mb_per_layer']:.2f} MB per call ({un['first_mb']:.1f} -> {un['last_mb']:.1f} MB), the weight-tied "
            f"stack {ti['mb_per_layer']:.2f} MB per layer; one layer's saved activations are "
            f"{per_layer_saved_mb(r):.2f} MB.")
    if "phantom" in sweep_table(r):
        ph = flatness(r, "phantom")
        text += (f" The phantom gradient ({exp.eval.phantom_steps} unrolled steps from $z^*$) takes "
                 f"{ph['first_mb']:.2f} MB at {ph['first_nfe']} NFE and {ph['last_mb']:.2f} MB at {ph['last_nfe']}.")
    lines.append(text)
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## 2. Table 5 at small scale: the penalty's increment and the solvers' buffers
#
# The paper's rows at its training NFE (forward = backward NFE here), and one row that is not
# the paper's: the DEQ at JR's 13 NFE without the penalty. A JR row is measured on a step that
# draws the penalty (the peak over training is such a step). *Layers*: the layer step (the
# paper's "excluding embeddings"); *whole*: the whole step. Ratios to row 1 (the Post-LN DEQ
# at 30 NFE) and to the explicit network of the paper's depth, beside the paper's. *Solver
# states*: the forward and backward solvers' own buffers, in states of $z$ (the peak of each
# solve minus that of one call of its map, in a layer step). The MDEQ has no paper figure: its
# rows are its two arms at the Table 4 threshold.

# %%
for r in results:
    print(f"{r.arm}: one state of z = {r.metrics['state_mb']:.3f} MB; one layer's parameters "
          f"{r.metrics['layer_param_mb']:.3f} MB (not counted: they exist before the step)")
    display(pd.DataFrame(table5(r)).set_index("model"))

# %% [markdown]
# **Two quantities, two answers.** Notebook 02 reported the penalty adding about 81% to the
# layer's *saved* bytes; the paper reports +25% *peak* memory. The saved bytes count only what
# autograd keeps for backward, and the penalty's vector-Jacobian product with `create_graph`
# keeps a second graph through $f$ of about the same size again. The peak counts everything
# live at the worst moment: the gradients, the backward solver's history, temporaries, and in
# the whole step the embedding and softmax, which dilute the layers' share. And the paper's
# +25% compares the JR model at 13 NFE with the DEQ at 30, whose solvers hold more history.
# The increments of this run, at equal NFE and in the paper's comparison:

# %%
for r in results:
    print(f"{r.arm}: what drawing the penalty adds to a step")
    display(pd.DataFrame(penalty_increments(r)).set_index("comparison"))

# %% [markdown]
# ## 3. Step time against NFE
#
# Each DEQ step runs forward and backward at the same NFE; a JR step's time is the expected
# time at the paper's frequency, $(1-p)\,t_\text{plain} + p\,t_\text{penalized}$, round by
# round (so the penalized steps count, as in a mean over training steps); explicit: untied
# stacks. Medians over the rounds. **Times vary from run to run (more on a shared machine):
# the cells below are not checked, and no number in the prose comes from them.**

# %%
# NBVAL_IGNORE_OUTPUT
fig, axes = plt.subplots(1, len(results), figsize=(10, 3.8), squeeze=False)
time_rows = []
for ax, r in zip(axes[0], results):
    times = expected_times(r)
    med = {k: 1e3 * pd.Series(v).median() for k, v in times.items()}
    for prefix, fmt, label in (("deq@", "o-", "DEQ"), ("deq+jr(p)@", "s-", f"DEQ + JR, p = {r.metrics['p']:g}"),
                               ("untied@", "x:", "explicit, untied")):
        pts = sorted((int(k.split("@")[1]), v) for k, v in med.items() if k.startswith(prefix))
        ax.plot([x for x, _ in pts], [y for _, y in pts], fmt, label=label)
        time_rows += [{"arm": f"{r.arm} {label}", "depth": x, "median_ms": y} for x, y in pts]
    for i, key in enumerate(("wikitext.post_ln", "wikitext.post_ln_reduced", "wikitext.post_ln_jr")
                            if r.arm == "transformer" else ()):
        ax.axvline(PAPER[key]["value"]["train_nfe"], color="0.6", lw=0.8, ls="--",
                   label="Table 5's training NFE" if i == 0 else None)
    ax.set(xlabel="effective depth (NFE, forward = backward; or layers)", ylabel="ms per step (median)", title=r.arm)
axes[0][0].legend(fontsize=8)
if out:
    fig.savefig(out / "time_vs_depth.png")
plt.show()
for r in results:
    print(f"{r.arm}: time relative to the explicit stack of {depth_of[r.arm]} untied layers "
          f"(paper: Transformer-XL, 18 layers)")
    display(pd.DataFrame(time_table(r, depth_of[r.arm])).set_index("model"))

# %% [markdown]
# ## GPU figures at paper size (committed, not re-measured)
#
# Measured earlier on a GPU by `python -m deqlib.bench transformer --profile paper --batch 15`
# and `python -m deqlib.bench mdeq --profile paper --batch 96` (the commands and conditions are
# in `outputs/device/RESULTS.md`), read here from their JSON files. No GPU was available to
# this notebook's run. Those benchmarks ran before this harness: forward and backward at the
# threshold 12 (MDEQ 7 / 8) for every arm, the penalty on every step, the explicit
# Transformer weight-tied and built from the DEQ's own 48000-wide layer (not Transformer-XL's),
# the Transformer's CUDA peak counted above the parameters and the MDEQ's with parameters and
# Adam state, and with the solvers of that time.

# %%
gpu = device_figures(Path(params_path).resolve().parent / "outputs" / "device")
if "transformer" in gpu:
    g = gpu["transformer"]
    print(f"DEQ-Transformer, paper size, batch {g['batch']}, solvers {g['solvers']}; device: {g['device']}, "
          f"torch {g['torch']}")
    display(pd.DataFrame(g["rows"]).set_index("model"))
if "mdeq" in gpu:
    print(f"MDEQ, paper size; device: {gpu['mdeq'][0]['device']}; memory: {gpu['mdeq'][0]['counted']}")
    display(pd.DataFrame(gpu["mdeq"]).drop(columns=["device", "counted"]).set_index(["precision", "model"]))
if not gpu:
    print("no GPU figures in outputs/device")

# %%
lines = []
if "transformer" in gpu and "transformer" in by_model:
    pen = next(x for x in gpu["transformer"]["rows"] if x["model"].startswith("DEQ + JR"))
    paper_cmp = penalty_increments(by_model["transformer"])[-1]
    lines.append(f"- DEQ-Transformer: drawing the penalty adds {pen['/ DEQ'] - 1:.0%} to the CUDA peak at paper size "
                 f"(GPU, both at 12 NFE); in this run, JR at 13 NFE against the DEQ at 30 adds "
                 f"{paper_cmp['layers peak +%']:+.1f}% to the layers' peak (paper {paper_cmp['paper +%']:+d}%).")
if "mdeq" in gpu and "mdeq" in by_model:
    fp32 = [x for x in gpu["mdeq"] if x["precision"] == "no"]
    same = penalty_increments(by_model["mdeq"])[0]
    lines.append(f"- MDEQ: drawing the penalty adds {fp32[-1]['/ MDEQ'] - 1:.0%} to the CUDA peak at paper size "
                 f"(parameters and Adam state included); {same['whole peak +%']:+.1f}% to this run's whole-step "
                 f"peak and {same['layers peak +%']:+.1f}% to its layers' peak, all at the same NFE.")
display(Markdown("\n".join(lines) if lines else "No GPU figure to set beside this run."))

# %% [markdown]
# ## What held
#
# Memory verdicts (exact: one deterministic measurement decides each stated criterion):

# %%
mem_verdicts = memory_verdicts(results, exp.eval.flat_tolerance)
display(Markdown(claims_markdown(list(mem_verdicts.values()), title="Memory: what held in this run")))

# %% [markdown]
# Time verdicts (a paired t-test over the timing rounds, JR at its frequency $p$). **This cell
# is not checked: its numbers and even its verdicts can change from run to run.**

# %%
# NBVAL_IGNORE_OUTPUT
tv = time_verdicts(results, exp.transformer.depth) if "transformer" in by_model else {}
display(Markdown(claims_markdown(list(tv.values()), title="Time: what held in this run") if tv
                 else "No Transformer measured: no time claim to judge."))

# %%
if out:
    metrics = {"verdicts": {k: v.as_dict() for k, v in {**mem_verdicts, **tv}.items()}}
    for r in results:
        times = expected_times(r)
        metrics[r.arm] = {**r.metrics, "flat": flatness(r), "unrolled": growth(r, "unrolled"),
                          "tied": growth(r, "tied"), "untied": growth(r, "untied"),
                          "layer_saved_mb": per_layer_saved_mb(r),
                          "rows": {row["row"]: {k: v for k, v in row.items() if k not in ("model", "row")}
                                   for row in r.curves["rows"]},
                          "median_step_s": {k: float(pd.Series(v).median()) for k, v in times.items()}}
    write_metrics(out, metrics)
    write_curves(out, "curves.csv",
                 [{**row, "arm": f"{row['model']} {row['method']}"} for row in sweep.to_dict("records")])
    write_curves(out, "time_vs_depth.csv", time_rows)

# %%
# NBVAL_IGNORE_OUTPUT
print(f"notebook wall time: {time.perf_counter() - t_notebook:.0f} s")

# %% [markdown]
# ## Reading the results
#
# Why the penalty's cost comes out as it does, in units that carry across sizes: states of
# $z$. The penalty's graph is what it adds to the saved bytes (a second pass through $f$ kept
# for its own gradient); the solvers' history is a number of states that depends on the NFE,
# not on the width. Rendered from this run and from the committed GPU benchmark.

# %%
lines = []
if "transformer" in by_model:
    r = by_model["transformer"]
    t = by_row(r)
    state = r.metrics["state_mb"]
    plain, jr, deq30 = t["post_ln_13"], t["post_ln_jr_13"], t["post_ln_30"]
    graph = (jr["core_saved_mb"] - plain["core_saved_mb"]) / state
    history = sum(deq30[k] - jr[k] for k in ("fwd_solver_states", "bwd_solver_states"))
    less = jr["core_peak_live_mb"] < deq30["core_peak_live_mb"]
    lines.append(
        f"- DEQ-Transformer, this run: one layer saves {per_layer_saved_mb(r) / state:.1f} states of $z$; the "
        f"penalty's graph is {graph:.1f} states; from 30 to 13 NFE the solvers hold {history:.1f} states less. "
        f"JR at 13 NFE therefore takes {'less' if less else 'more'} memory than the DEQ at 30 in the layers' peak "
        f"({jr['core_peak_live_mb']:.2f} against {deq30['core_peak_live_mb']:.2f} MB).")
    if "transformer" in gpu:
        g = gpu["transformer"]
        more = g["penalty_graph_states"] > history
        lines.append(
            f"- At paper size ({g['device']}) the penalty's graph is {g['penalty_graph_states']:.0f} states of $z$ "
            f"(the 48000-wide feed-forward makes a layer's activations large against one state), "
            f"{'more' if more else 'less'} than the {history:.1f} states of history that 13 instead of 30 NFE saves: "
            + ("so there JR should cost more memory than the DEQ at 30 NFE, as the paper reports" if more
               else "so even there the saved history would outweigh the penalty")
            + " (no 30-NFE step was measured on the GPU).")
for name, r in by_model.items():
    inc = penalty_increments(r)[0]
    lines.append(
        f"- {name}, at equal NFE: drawing the penalty adds {inc['layers saved +%']:+.1f}% to the layers' saved "
        f"bytes, {inc['layers peak +%']:+.1f}% to their peak, {inc['whole peak +%']:+.1f}% to the whole step's "
        "peak: the peak also holds gradients, the backward solver's history and temporaries, and the whole step "
        "the embedding and softmax, so the same graph is a smaller share of it.")
display(Markdown("\n".join(lines)))

# %% [markdown]
# The time figures (section 3) are not interpreted here: at this width on a CPU an explicit
# layer costs little beside a solver iteration's bookkeeping, so the ratios to the explicit
# network need not match the paper's GPU ratios at paper size, and they move between runs.
