"""Train one arm of the WikiText experiment for one seed and measure it."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...data.wikitext import LMStream, batchify, load_wikitext
from ...models.transformer import DEQTransformerLM
from ...train import train
from ..core import ArmResult, equilibrium_mean, mean_step_time
from .config import ARMS, WikiTextExperiment, arm_settings
from .measure import (activation_memory, evaluate, fixed_batch, future_token_leak, jacobian_monitor, plain_nfe,
                      step_peak_memory, unigram_perplexity)

__all__ = ["load_data", "run_arm", "MONITORED"]

# The keys the monitor adds to a record (every eval.monitor_every steps and after the last).
MONITORED = ("mon_jac_fro", "mon_radius", "mon_radius_max", "mon_radius_err", "mon_fwd_nfe", "mon_fwd_res")


def load_data(exp: WikiTextExperiment, base: str | Path | None = None) -> dict[str, Any]:
    """The corpus (:func:`deqlib.data.wikitext.load_wikitext`), the evaluation tokens used
    (``eval_used``: the first ``eval.max_tokens``), the unigram baseline on them, and the
    vocabulary checked against the model's cutoffs."""
    data = load_wikitext(exp.data, base=base)
    n_token = len(data["vocab"])
    exp.model.check_vocab(n_token)
    used = data["eval"][: exp.eval.max_tokens] if exp.eval.max_tokens else data["eval"]
    return {**data, "n_token": n_token, "eval_used": used,
            "unigram_ppl": unigram_perplexity(data["train"], used, n_token)}


def run_arm(exp: WikiTextExperiment, arm: str, seed: int, data: dict[str, Any], run_dir: str | Path | None = None,
            progress: bool = True) -> ArmResult:
    """Train ``arm`` with training seed ``seed`` on ``data`` (:func:`load_data`) and measure it.

    ``metrics``: perplexity at the arm's threshold and at each of ``eval.nfe_caps`` (``ppl``,
    ``ppl_cap_<k>``, ``nfe_cap_<k>``: the mean forward NFE spent), training NFE, the monitor's
    last ``||J||_F`` and spectral radius (after the last step), plain-iteration NFE to
    ``eval.tol``, the mean step time over every equilibrium step, saved-for-backward bytes of a
    training step at ``eval.memory_batch`` and (for the first of ``seeds`` only: the shapes are
    the same for every seed) its peak memory, the future-token leak at the
    threshold, and ``diverged`` (1.0 when a training loss or the evaluation went non-finite).
    ``records``: per training step, the monitor's keys (:data:`MONITORED`) on monitored steps.
    ``curves["ppl_vs_nfe"]``: one row per cap, and the threshold's row; ``curves["memory"]`` (first
    seed): the peak's row with what it counts. ``run_dir``: where the
    run checkpoints and resumes from (None: nowhere).
    """
    s = arm_settings(exp, arm, seed)
    ev, L = exp.eval, s.model.tgt_len
    torch.manual_seed(seed)
    model = DEQTransformerLM(s.model, data["n_token"], s.train.forward, s.train.backward, explicit=s.explicit,
                             forward_jitter=s.forward_jitter)
    batch = fixed_batch(data["eval_used"], ev.monitor_batch, L)
    monitor = jacobian_monitor(batch, ev.jac_probes, ev.radius_iters, ev.radius_vectors, seed=0)
    identity = {"data": asdict(exp.data), "model": asdict(s.model), "arm": arm, "jitter": s.forward_jitter,
                "monitor": [ev.monitor_every, ev.monitor_batch, ev.jac_probes, ev.radius_iters, ev.radius_vectors,
                            ev.max_tokens]}
    result = train(model, LMStream(data["train"], s.train.batch_size, L), s.train, run_dir=run_dir, progress=progress,
                   identity=identity, monitor=monitor, monitor_every=ev.monitor_every)
    records = result.records
    model.eval()
    m: dict[str, float] = {}
    at_threshold = evaluate(model, data["eval_used"], ev.batch_size, L)
    m.update(ppl=at_threshold["ppl"], eval_nll=at_threshold["nll"], eval_tokens=at_threshold["tokens"],
             valid_nfe=at_threshold["nfe"], valid_rel_residual=at_threshold["rel_residual"])
    curve = [{"nfe_cap": s.train.forward.max_iter, "ppl": m["ppl"], "nfe": m["valid_nfe"], "threshold": True}]
    if not s.explicit:
        for cap in ev.nfe_caps:
            # At the threshold itself the capped solve is the one just evaluated.
            c = at_threshold if cap == s.train.forward.max_iter else evaluate(
                model, data["eval_used"], ev.batch_size, L, forward_solver=s.train.forward.replace(max_iter=cap))
            m[f"ppl_cap_{cap}"], m[f"nfe_cap_{cap}"] = c["ppl"], c["nfe"]
            curve.append({"nfe_cap": cap, "ppl": c["ppl"], "nfe": c["nfe"], "threshold": False})
    last = records[-1] if records else {}
    m.update({k: last.get(k, math.nan) for k in MONITORED})
    plain = plain_nfe(model, batch, ev.tol, ev.plain_nfe_cap)
    m.update(plain_nfe=plain["mean"], plain_reached=plain["reached"], plain_nfe_capped=plain["capped_mean"])
    m.update(train_nfe=equilibrium_mean(records, "fwd_nfe"), train_bwd_nfe=equilibrium_mean(records, "bwd_nfe"),
             calls_per_step=equilibrium_mean([{**r, "calls": r["fwd_nfe"] + r["bwd_nfe"]} for r in records], "calls"),
             train_fwd_res=equilibrium_mean(records, "fwd_rel_res"),
             train_bwd_res=equilibrium_mean(records, "bwd_rel_res"),
             step_time_s=mean_step_time(records),
             penalized_steps=float(sum(r["jac_fro"] == r["jac_fro"] for r in records)),
             final_train_loss=_mean(r["loss"] for r in records[-20:]))
    seg = batchify(data["eval_used"], ev.memory_batch)[:, : L + 1]
    inputs, targets = seg[:, :-1].contiguous(), seg[:, 1:].contiguous()
    penalty = s.train.jacobian if ARMS[arm].jr else None
    saved = activation_memory(model, inputs, targets, penalty)
    m.update(saved_bytes=saved["total"], saved_core_bytes=saved["core"])
    curves = {"ppl_vs_nfe": curve}
    if seed == exp.seeds[0]:  # the same shapes for every seed; PeakMemory's bookkeeping is slow on a CPU
        peak = step_peak_memory(model, inputs, targets, penalty)
        m.update(peak_bytes=peak["peak"], peak_core_bytes=peak["core"])
        curves["memory"] = [{"peak_bytes": peak["peak"], "shell_bytes": peak["shell"], "counted": peak["counted"]}]
    if ev.leak and not s.explicit:
        leak = future_token_leak(model, data["eval_used"], ev.batch_size, L, seed=seed)
        m.update(leak_max=leak["max"], leak_mean=leak["mean"])
    finite = all(math.isfinite(r["loss"]) for r in records)
    m["diverged"] = float(not finite or not math.isfinite(m["eval_nll"]))
    # A run that went non-finite is worth no more than the uniform model, for the paired tests.
    m["ppl_or_uniform"] = m["ppl"] if math.isfinite(m["ppl"]) else float(data["n_token"])
    model.train()
    return ArmResult(arm=arm, seed=seed, metrics=m, records=records, curves=curves, model=model)


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
