"""deqlib.experiments.wikitext: the arms' configuration, the monitor and the other
measurements, one arm run end to end, and the claims judged over seeds."""

import math
from dataclasses import replace

import pytest
import torch

from deqlib.deq import SolverSettings
from deqlib.experiments.core import ArmResult
from deqlib.experiments.wikitext import (ARMS, LMEvalConfig, WikiTextExperiment, arm_settings, fixed_batch,
                                         jacobian_monitor, plain_nfe, run_arm, step_peak_memory)
from deqlib.experiments.wikitext.summary import hard_stop_cap, judge_claims, judge_measured, judge_timing, matched_nfe
from deqlib.jacobian import JacobianPenalty
from deqlib.models.transformer import DEQTransformerLM, TransformerConfig
from deqlib.report import Claim
from deqlib.train import TrainConfig

V = 40
TINY = TransformerConfig(d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=4, mem_len=4, dropout=0.0,
                         cutoffs=(10, 20), div_val=2.0, n_layer=3, pretrain_layers=2, init_std=0.05)


def _exp(**changes):
    train = TrainConfig(epochs=1, max_steps=6, batch_size=2, lr=1e-3, pretrain_steps=2,
                        forward=SolverSettings("anderson", 4, 1e-3), backward=SolverSettings("broyden", 4, 1e-4),
                        jacobian=JacobianPenalty(gamma=1.0, gamma_end=2.0, p=0.5))
    ev = LMEvalConfig(batch_size=2, max_tokens=None, nfe_caps=(2, 4), memory_batch=2, monitor_every=3,
                      monitor_batch=2, jac_probes=2, radius_iters=20, radius_vectors=2, plain_nfe_cap=10)
    return WikiTextExperiment(model=TINY, train=train, eval=ev, seeds=(0, 1),
                              thresholds={"post_ln": {"forward": 6, "backward": 7}, "post_ln_jr": {"jitter": 1}},
                              **changes)


def test_each_arm_gets_its_thresholds_norm_penalty_and_seed():
    exp = _exp()
    s = arm_settings(exp, "post_ln", seed=3)
    assert (s.train.forward.max_iter, s.train.backward.max_iter, s.train.seed) == (6, 7, 3)
    assert not s.model.pre_ln and not s.train.jacobian.enabled and s.forward_jitter == 0
    s = arm_settings(exp, "post_ln_jr", seed=1)  # train's 4 / 4, with the official jitter
    assert (s.train.forward.max_iter, s.train.backward.max_iter, s.forward_jitter) == (4, 4, 1)
    assert s.train.jacobian.enabled and s.train.jacobian.gamma_end == 2.0
    s = arm_settings(exp, "pre_ln")
    assert s.model.pre_ln and not s.train.jacobian.enabled
    s = arm_settings(exp, "explicit")
    assert s.explicit and s.train.pretrain_steps == 0 and not s.train.jacobian.enabled
    assert set(ARMS) == {"post_ln", "post_ln_reduced", "pre_ln", "post_ln_jr", "pre_ln_jr", "explicit"}
    with pytest.raises(ValueError, match="unknown arm='postln'"):
        arm_settings(exp, "postln")


@pytest.mark.parametrize("changes, message", [
    ({"thresholds": {"explicit": {"forward": 3}}}, r"thresholds keys must be DEQ arms.*thresholds.explicit"),
    ({"thresholds": {"postln": {"forward": 3}}}, r"thresholds.postln"),
    ({"thresholds": {"post_ln": {"forward": 0}}}, r"in thresholds.post_ln: forward must be an integer >= 1"),
    ({"thresholds": {"post_ln": {"fwd": 3}}}, r"unknown key\(s\) \['fwd'\] in thresholds.post_ln"),
    ({"thresholds": {"post_ln": {"forward": 4, "jitter": 4}}},
     r"thresholds.post_ln.jitter must be below its forward threshold 4"),
    ({"thresholds": {"post_ln": 3}}, r"thresholds.post_ln must be a mapping"),
    ({"seeds": ()}, r"seeds must be a non-empty list"),
    ({"seeds": (1, 1)}, r"seeds must be distinct"),
    ({"arms": ("post_ln", "post_ln")}, r"arms must be a non-empty list of distinct names"),
])
def test_bad_arm_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        WikiTextExperiment(**changes)


def test_a_training_seed_other_than_0_is_refused_not_ignored():
    with pytest.raises(ValueError, match=r"train.seed is not used.*train.seed=4"):
        WikiTextExperiment(train=TrainConfig(seed=4))


def _model(pre_ln=False, init_std=0.05, explicit=False, contractive=False):
    """A float64 model in eval mode; ``contractive`` makes f a contraction (a strong attention
    output driven by the injection, a weak dependence of q, k, v on z)."""
    torch.manual_seed(0)
    m = DEQTransformerLM(replace(TINY, pre_ln=pre_ln, init_std=init_std), V,
                         SolverSettings("anderson", 30, 1e-8), SolverSettings("broyden", 30, 1e-8),
                         explicit=explicit).double().eval()
    if contractive:
        with torch.no_grad():
            m.layer.attn.qkv.weight_g.mul_(0.3)
            m.layer.attn.out.weight_g.mul_(10.0)
            m.inject.weight.mul_(3.0)
    return m


def _tokens(n=200, seed=5):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_monitor_measures_the_jacobian_at_the_fixed_batch_and_reports_nan_for_a_broken_model():
    m = _model()
    batch = fixed_batch(_tokens(), 3, 4)
    assert batch.inputs.shape == (3, 4) and torch.equal(batch.inputs, _tokens()[:198].view(3, 66)[:, 4:8])
    mon = jacobian_monitor(batch, n_probes=64, radius_iters=200, radius_vectors=8)
    got = mon(m)
    assert set(got) == {"mon_jac_fro", "mon_radius", "mon_radius_max", "mon_radius_err", "mon_fwd_nfe",
                        "mon_fwd_res"}
    assert got["mon_fwd_res"] < 0.1 and got["mon_fwd_nfe"] <= 30
    # the spectral radius against the exact one: eigenvalues of the Jacobian built column by column
    z, fz, _ = m.equilibrium_pair(batch.inputs, batch.memory(m))
    rhos = []
    for b in range(3):
        J = torch.autograd.functional.jacobian(lambda v, b=b: _f_row(m, batch, v, b), z[b].detach())
        rhos.append(float(torch.linalg.eigvals(J).abs().max()))
    assert got["mon_radius"] == pytest.approx(sum(rhos) / 3, rel=1e-3)
    assert got["mon_radius_max"] == pytest.approx(max(rhos), rel=1e-3)
    assert got["mon_radius"] <= got["mon_jac_fro"] * math.sqrt(z.shape[1])  # rho <= ||J||_F
    with torch.no_grad():
        m.layer.ff.ff1.weight_g.fill_(float("nan"))
    broken = mon(m)
    assert math.isnan(broken["mon_radius"]) and math.isnan(broken["mon_jac_fro"])


def _f_row(m, batch, v, b):
    """f at one stream's state ``v (L*d,)``, the other streams held at zero."""
    from deqlib.nn import once_per_step

    L, d = batch.inputs.shape[1], TINY.d_model
    with once_per_step(m):
        ctx = m.context(m.inject(m.embed(batch.inputs)), batch.memory(m))
        z = torch.zeros(batch.inputs.shape[0], L, d, dtype=v.dtype)
        z = torch.cat([z[:b], v.view(1, L, d), z[b + 1:]])
        return m.layer(z, ctx)[b].reshape(-1)


def test_plain_nfe_counts_calls_to_the_tolerance_and_marks_streams_that_never_get_there():
    m = _model(contractive=True)
    batch = fixed_batch(_tokens(), 3, 4)
    got = plain_nfe(m, batch, tol=1e-3, cap=60)
    assert got["reached"] == 1.0 and 1 < got["mean"] < 60 and got["capped_mean"] == got["mean"]
    short = plain_nfe(m, batch, tol=1e-3, cap=2)
    assert short["reached"] == 0.0 and math.isnan(short["mean"]) and short["capped_mean"] == 2.0
    assert not m.training


def test_peak_memory_of_a_step_includes_the_solver_and_the_penalty():
    m = _model()
    x = _tokens(40).view(2, 20)[:, :4].contiguous()
    y = _tokens(40).view(2, 20)[:, 1:5].contiguous()
    plain = step_peak_memory(m, x, y)
    with_jr = step_peak_memory(m, x, y, JacobianPenalty(gamma=1.0))
    assert plain["peak"] > plain["shell"] > 0 and plain["core"] == plain["peak"] - plain["shell"]
    assert with_jr["peak"] > plain["peak"] and "PeakMemory" in plain["counted"]
    assert not m.training  # put back as found


def test_run_arm_trains_monitors_and_measures_one_arm():
    exp = _exp()
    tokens = _tokens(400)
    data = {"train": tokens, "eval_used": _tokens(200, seed=6), "n_token": V}
    res = run_arm(exp, "post_ln_jr", 1, data, progress=False)
    assert isinstance(res, ArmResult) and (res.arm, res.seed) == ("post_ln_jr", 1) and len(res.records) == 6
    monitored = [r["step"] for r in res.records if "mon_radius" in r]
    assert monitored == [2, 5]  # every monitor_every steps and after the last
    m = res.metrics
    for key in ("ppl", "ppl_cap_2", "ppl_cap_4", "mon_radius", "mon_jac_fro", "plain_nfe_capped", "train_nfe",
                "calls_per_step", "step_time_s", "saved_bytes", "leak_max", "diverged", "ppl_or_uniform"):
        assert math.isfinite(m[key]), key
    assert "peak_bytes" not in m  # measured for the first seed only
    assert m["train_nfe"] <= 4 and m["diverged"] == 0.0
    assert [row["nfe_cap"] for row in res.curves["ppl_vs_nfe"]] == [4, 2, 4]
    first = run_arm(exp, "explicit", 0, data, progress=False)
    assert first.metrics["peak_bytes"] > 0 and "ppl_cap_2" not in first.metrics
    assert math.isnan(first.metrics["train_nfe"]) and math.isfinite(first.metrics["mon_radius"])


def _results(ppl, radius=None, seeds=(0, 1, 2)):
    """Fake results: ``ppl[arm]`` one perplexity per seed; every other metric made up around it."""
    out = []
    for arm, vals in ppl.items():
        for s, v in zip(seeds, vals):
            m = {"ppl": v, "ppl_or_uniform": v, "diverged": 0.0, "ppl_cap_2": v + 5 + s, "ppl_cap_4": v + 1 + 0.1 * s,
                 "ppl_cap_5": v + 0.5 + 0.1 * s, "mon_radius": (radius or {}).get(arm, [1.0] * 3)[s],
                 "mon_jac_fro": 0.5 + 0.01 * s, "plain_nfe_capped": 10.0 + s, "calls_per_step": 20.0 + s,
                 "step_time_s": 0.1 + 0.01 * s, "peak_core_bytes": 100.0 if arm != "post_ln_jr" else 125.0}
            out.append(ArmResult(arm, s, m))
    return out


def test_claims_are_judged_by_paired_tests_over_seeds():
    exp = WikiTextExperiment(train=replace(TrainConfig(), forward=SolverSettings(max_iter=5)),
                             eval=LMEvalConfig(nfe_caps=(2, 4, 5)),
                             thresholds={"post_ln": {"forward": 12}, "post_ln_reduced": {"forward": 6}})
    assert hard_stop_cap(exp) == 5  # 12/30 of 12 is 4.8
    ppl = {"post_ln": [100.0, 110.0, 105.0], "post_ln_reduced": [120.0, 131.0, 124.0],
           "post_ln_jr": [130.0, 120.0, 125.0]}
    verdicts = {v.claim.text: v for v in judge_claims(_results(ppl, {"post_ln_reduced": [3.0, 4.0, 5.0],
                                                                     "post_ln_jr": [0.2, 0.3, 0.25]}), exp)}
    reduced = next(v for t, v in verdicts.items() if t.startswith("training the unregularized"))
    assert reduced.verdict == "held" and "paired t, n=3" in reduced.test  # +20 +- 0.6: p < 0.05
    radius = next(v for t, v in verdicts.items() if "(post_ln_reduced) the spectral radius" in t)
    assert radius.verdict == "held"
    inconclusive = next(v for t, v in verdicts.items() if t.startswith("at the JR model's NFE"))
    assert inconclusive.verdict == "inconclusive"  # +30, +10, +20 around 100.5: p > 0.05
    memory = next(v for t, v in verdicts.items() if t.startswith("JR adds training memory"))
    assert memory.verdict == "held" and "+25%" in memory.evidence and "no test" in memory.test
    assert not any("pre_ln" in t for t in verdicts)  # arms that did not run: no claim
    assert judge_timing(_results(ppl))[0].claim.text.startswith("a training step with JR")
    rows = matched_nfe(_results(ppl), "post_ln_jr", "post_ln", [2, 4])
    assert [r["nfe_cap"] for r in rows] == [2, 4] and rows[0]["n"] == 3


def test_judge_measured_says_held_or_not_by_the_sign_and_inconclusive_when_equal():
    c = Claim("more", "here", "greater")
    assert judge_measured(c, 2.0, 1.0, "").verdict == "held"
    assert judge_measured(c, 1.0, 2.0, "").verdict == "not held"
    assert judge_measured(c, 1.0, 1.0, "").verdict == "inconclusive"
    assert judge_measured(replace(c, direction="less"), 1.0, 2.0, "").verdict == "held"
