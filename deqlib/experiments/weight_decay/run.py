"""Train one arm of the weight-decay experiment (one model, one regularization, one seed) and
measure it."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...data.cifar import Cifar10, CifarTransform, load_cifar10, normalize
from ...data.wikitext import LMStream
from ...deq import SolverSettings
from ...models.mdeq import MDEQ
from ...models.transformer import DEQTransformerLM
from ...train import TensorBatches, TrainConfig, train
from ..core import ArmResult, equilibrium_mean
from ..wikitext import evaluate as lm_evaluate
from ..wikitext import fixed_batch
from ..wikitext import load_data as load_wikitext_data
from ..wikitext.config import WikiTextExperiment
from .config import MDEQPart, TransformerPart, WeightDecayExperiment, arm_train_config, split_arm
from .measure import MONITORED, final_measures, jacobian_monitor, mdeq_pair, transformer_pair

__all__ = ["load_data", "run_arm", "residual_windows"]


def load_data(exp: WeightDecayExperiment, base: str | Path | None = None) -> dict[str, Any]:
    """Each model's data in ``exp.models``: ``"transformer"``, WikiText's
    (:func:`deqlib.experiments.wikitext.load_data`: the corpus, ``eval_used``, ``n_token``);
    ``"mdeq"``, CIFAR-10 cut to ``eval.max_eval`` test images."""
    data: dict[str, Any] = {}
    if "transformer" in exp.models:
        part = exp.transformer
        lm = WikiTextExperiment(data=part.data, model=part.model, arms=("post_ln",), seeds=(0,),
                                eval=_lm_eval(part))
        data["transformer"] = load_wikitext_data(lm, base)
    if "mdeq" in exp.models:
        part = exp.mdeq
        d = load_cifar10(part.data.root, base, part.data.download)
        n_test = min(n for n in (part.data.n_test, part.eval.max_eval, len(d.test_y)) if n is not None)
        tr, te = slice(part.data.n_train), slice(n_test)
        data["mdeq"] = Cifar10(d.train_x[tr], d.train_y[tr], d.test_x[te], d.test_y[te], d.classes)
    return data


def _lm_eval(part: TransformerPart):
    from ..wikitext.config import LMEvalConfig

    return LMEvalConfig(batch_size=part.eval.eval_batch, max_tokens=part.eval.max_eval, nfe_caps=(), leak=False)


def residual_windows(records: list[dict[str, float]], share: float = 0.25) -> dict[str, float]:
    """Means of the training forward / backward relative residual over the first and the last
    ``share`` of the equilibrium steps (``fwd_res_early``, ``fwd_res_late``, ``bwd_res_early``,
    ``bwd_res_late``), and the standard deviation of the backward one over the last share
    (``bwd_res_late_sd``: Figure 10a's fluctuations)."""
    eq = [r for r in records if not r["pretrain"]]
    k = max(1, int(len(eq) * share))
    out = {}
    for key in ("fwd", "bwd"):
        for name, part in (("early", eq[:k]), ("late", eq[-k:])):
            out[f"{key}_res_{name}"] = equilibrium_mean(part, f"{key}_rel_res")
    late = [r["bwd_rel_res"] for r in eq[-k:] if math.isfinite(r["bwd_rel_res"])]
    mean = sum(late) / len(late) if late else math.nan
    out["bwd_res_late_sd"] = (math.sqrt(sum((v - mean) ** 2 for v in late) / (len(late) - 1))
                              if len(late) > 1 else math.nan)
    return out


def _monitor_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """The monitor's first reading after pretraining (``jac_fro_start``, ``fwd_res_start``)
    and its last (``jac_fro_end``, ``mon_fwd_res``...), and the creep ``jac_fro_end -
    jac_fro_start``."""
    mon = [r for r in records if "mon_jac_fro" in r and not r["pretrain"]]
    first, last = (mon[0], mon[-1]) if mon else ({}, {})
    out = {k: last.get(k, math.nan) for k in MONITORED}
    out.update(jac_fro_start=first.get("mon_jac_fro", math.nan), fwd_res_start=first.get("mon_fwd_res", math.nan),
               jac_fro_end=last.get("mon_jac_fro", math.nan))
    out["jac_fro_creep"] = out["jac_fro_end"] - out["jac_fro_start"]
    return out


def _training_metrics(records: list[dict[str, float]], cfg: TrainConfig) -> dict[str, float]:
    gammas = [r["gamma"] for r in records if math.isfinite(r["gamma"])]
    finite = all(math.isfinite(r["loss"]) for r in records)
    return {**residual_windows(records), **_monitor_metrics(records),
            "train_fwd_nfe": equilibrium_mean(records, "fwd_nfe"),
            "train_bwd_nfe": equilibrium_mean(records, "bwd_nfe"),
            "gamma_last": gammas[-1] if gammas else 0.0, "weight_decay": cfg.weight_decay,
            "penalized_steps": float(len(gammas)), "diverged": float(not finite),
            "final_train_loss": _mean([r["loss"] for r in records[-20:]])}


def _run_transformer(part: TransformerPart, arm: str, seed: int, data: dict[str, Any],
                     run_dir: str | Path | None, progress: bool) -> tuple[dict[str, float], list[dict]]:
    cfg, ev, L = arm_train_config(part, arm, seed), part.eval, part.model.tgt_len
    torch.manual_seed(seed)
    model = DEQTransformerLM(part.model, data["n_token"], cfg.forward, cfg.backward)
    pair = transformer_pair(fixed_batch(data["eval_used"], ev.monitor_batch, L))
    identity = {"data": asdict(part.data), "model": asdict(part.model), "arm": arm,
                "monitor": [ev.monitor_every, ev.monitor_batch, ev.jac_probes, ev.max_eval]}
    result = train(model, LMStream(data["train"], cfg.batch_size, L), cfg, run_dir=run_dir, progress=progress,
                   identity=identity, monitor=jacobian_monitor(pair, ev), monitor_every=ev.monitor_every)
    m = _training_metrics(result.records, cfg)
    m.update(final_measures(model, pair, ev))
    model.eval()
    lm = lm_evaluate(model, data["eval_used"], ev.eval_batch, L)
    m.update(ppl=lm["ppl"], eval_nll=lm["nll"], valid_nfe=lm["nfe"], valid_rel_residual=lm["rel_residual"])
    # A run that went non-finite is worth no more than the uniform model, for the paired tests.
    m["task"] = m["ppl"] if math.isfinite(m["ppl"]) else float(data["n_token"])
    m["diverged"] = float(m["diverged"] or not math.isfinite(lm["nll"]))
    return m, result.records


@torch.no_grad()
def _accuracy(model: MDEQ, data: Cifar10, batch: int, solver: SolverSettings | None = None) -> tuple[float, Any]:
    """Test accuracy (fraction) with the training forward solve (or ``solver``), and the
    per-image correctness ``(N,)`` bool for paired tests."""
    model.eval()
    correct = []
    for s in range(0, len(data.test_y), batch):
        logits, _ = model.predict(normalize(data.test_x[s:s + batch]), forward_solver=solver)
        correct.append(logits.argmax(dim=1) == data.test_y[s:s + batch])
    c = torch.cat(correct)
    return float(c.double().mean()), c


def _run_mdeq(part: MDEQPart, arm: str, seed: int, data: Cifar10, run_dir: str | Path | None,
              progress: bool) -> tuple[dict[str, float], list[dict], Any]:
    cfg, ev = arm_train_config(part, arm, seed), part.eval
    torch.manual_seed(seed)
    model = MDEQ(part.model, cfg.forward, cfg.backward)
    pair = mdeq_pair(normalize(data.test_x[: ev.monitor_batch]))
    batches = TensorBatches((data.train_x, data.train_y), cfg.batch_size, seed=seed,
                            transform=CifarTransform(part.data.augment, part.data.pad))
    identity = {"data": asdict(part.data), "model": asdict(part.model), "arm": arm,
                "monitor": [ev.monitor_every, ev.monitor_batch, ev.jac_probes]}
    result = train(model, batches, cfg, run_dir=run_dir, progress=progress, identity=identity,
                   monitor=jacobian_monitor(pair, ev), monitor_every=ev.monitor_every)
    m = _training_metrics(result.records, cfg)
    m.update(final_measures(model, pair, ev))
    acc, correct = _accuracy(model, data, ev.eval_batch)
    m.update(accuracy=acc, task=acc)
    return m, result.records, correct


def run_arm(exp: WeightDecayExperiment, arm: str, seed: int, data: dict[str, Any],
            run_dir: str | Path | None = None, progress: bool = True) -> ArmResult:
    """Train ``arm`` (``"<model>/<regularization>"``, :data:`~.config.ARMS`) with training seed
    ``seed`` on ``data`` (:func:`load_data`) and measure it.

    ``metrics``: the task metric ``task`` (perplexity, a diverged run counted as the uniform
    model; or test accuracy as a fraction) beside ``ppl`` / ``accuracy``; the training residuals
    over the first and last quarter of the equilibrium steps (:func:`residual_windows`); the
    monitor's first and last ``||J||_F / sqrt(d)`` and forward residual on the fixed batch
    (``jac_fro_start``, ``jac_fro_end``, ``jac_fro_creep``, ``mon_fwd_res``); after training,
    the spectral radius and plain-iteration NFE to ``eval.tol`` (:func:`~.measure.final_measures`);
    the last gamma, the weight decay, ``diverged``. ``records``: per training step, with the
    monitor's keys on monitored steps. ``outcomes["correct"]`` (MDEQ): per test image.
    """
    model_name, reg = split_arm(arm)
    part = exp.part(model_name)
    outcomes = {}
    if model_name == "transformer":
        m, records = _run_transformer(part, reg, seed, data["transformer"], run_dir, progress)
    else:
        m, records, correct = _run_mdeq(part, reg, seed, data["mdeq"], run_dir, progress)
        outcomes["correct"] = correct
    return ArmResult(arm=arm, seed=seed, metrics=m, records=records, outcomes=outcomes)


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
