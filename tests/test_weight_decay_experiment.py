"""deqlib.experiments.weight_decay: bad settings refused by name before training, each arm's
training settings, the residual windows, the rank correlation, the claims judged on synthetic
results (held, not held, inconclusive), and a tiny run of both models measured alike."""

import math

import pytest

from conftest import ROOT
from deqlib.config import load_experiment
from deqlib.experiments.core import ArmResult
from deqlib.experiments.weight_decay import (ARMS, WeightDecayExperiment, arm_name, arm_train_config, judge_claims,
                                             residual_windows, spearman, split_arm)

PARAMS = ROOT / "params.yaml"


def _load(overrides, profile="small"):
    return load_experiment(WeightDecayExperiment, "weight_decay", profile, overrides, PARAMS)


@pytest.mark.parametrize("overrides, message", [
    ({"mdeq.weight_decay": [1e-3, 1e-4]}, r"weight_decay must be two doses \[low, high\] with 0 < low < high"),
    ({"transformer.weight_decay": [1e-4]}, r"weight_decay must be two doses"),
    ({"mdeq.weight_decay": [0.0, 1e-4]}, r"weight_decay must be two doses"),
    ({"mdeq.train.weight_decay": 1e-4}, r"train.weight_decay must be 0"),
    ({"transformer.train.seed": 3}, r"train.seed is not used"),
    ({"mdeq.train.jacobian.gamma": 0.0}, r"train.jacobian must be the JR arm's fixed policy"),
    ({"mdeq.adaptive.gamma_min": 1.0}, r"gamma must be in \[adaptive.gamma_min, adaptive.gamma_max\]"),
    ({"mdeq.adaptive.measure": "loss"}, r"in weight_decay.small.mdeq.adaptive: measure must be one of"),
    ({"mdeq.adaptive.target": -1.0}, r"target must be"),
    ({"transformer.model.pre_ln": True}, r"model.pre_ln must be false"),
    ({"arms": ["none", "wd"]}, r"arms must be"),
    ({"models": ["resnet"]}, r"models must be"),
    ({"seeds": [0, 0]}, r"seeds must be distinct"),
    ({"mdeq.eval.monitor_every": 0}, r"monitor_every must be"),
    ({"mdeq.eval.tol": 1.0}, r"tol must be"),
])
def test_bad_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        _load(overrides)


@pytest.mark.parametrize("profile", ["small", "paper"])
def test_both_profiles_build_with_at_least_three_seeds(profile):
    exp = _load({}, profile)
    assert len(exp.seeds) >= 3 and set(exp.arms) == set(ARMS) and set(exp.models) == {"transformer", "mdeq"}


def test_the_paper_profile_is_table4_plus_the_doses():
    exp = _load({}, "paper")
    t, m = exp.transformer.train, exp.mdeq.train
    assert (t.epochs, t.batch_size, t.lr, t.forward.max_iter, t.backward.max_iter) == (23, 60, 2.5e-4, 12, 12)
    assert (t.jacobian.gamma, t.jacobian.gamma_end, t.jacobian.p) == (1.6, 2.5, 0.35)
    assert (m.epochs, m.batch_size, m.lr, m.forward.max_iter, m.backward.max_iter) == (200, 96, 1e-3, 7, 8)
    assert (m.jacobian.gamma, m.jacobian.p) == (0.5, 0.05)
    assert exp.transformer.weight_decay[0] == 1e-6  # Figure 8's dose
    assert (t.forward.tol, t.backward.tol, m.forward.tol, m.backward.tol) == (1e-3, 1e-4, 1e-3, 1e-4)


def test_each_arm_changes_only_its_regularization():
    exp = _load({})
    part = exp.mdeq
    cfgs = {arm: arm_train_config(part, arm, seed=2) for arm in ARMS}
    assert all(c.seed == 2 for c in cfgs.values())
    assert [cfgs[a].weight_decay for a in ARMS] == [0.0, part.weight_decay[0], part.weight_decay[1], 0.0, 0.0]
    for arm in ("none", "wd_low", "wd_high"):
        assert not cfgs[arm].jacobian.enabled
    assert cfgs["jr"].jacobian == part.train.jacobian
    ad = cfgs["jr_adaptive"].jacobian
    assert ad.adaptive == part.adaptive and ad.gamma == part.train.jacobian.gamma and ad.p == part.train.jacobian.p
    for arm in ARMS:  # the rest is the same for every arm
        assert cfgs[arm].forward == part.train.forward and cfgs[arm].lr == part.train.lr
    assert split_arm(arm_name("mdeq", "jr")) == ("mdeq", "jr")
    with pytest.raises(ValueError, match="arm names are"):
        split_arm("mdeq/wd")


def _records(fwd, bwd, pretrain=0):
    return [{"step": i, "pretrain": float(i < pretrain), "fwd_rel_res": f, "bwd_rel_res": b}
            for i, (f, b) in enumerate(zip(fwd, bwd))]


def test_residual_windows_compare_the_first_and_last_quarter_after_pretraining():
    rec = _records([9.0, 9.0] + [1.0] * 4 + [2.0] * 4 + [3.0] * 4, [0.5] * 14, pretrain=2)
    w = residual_windows(rec)
    assert w["fwd_res_early"] == 1.0 and w["fwd_res_late"] == 3.0  # 12 equilibrium steps, quarters of 3
    assert w["bwd_res_late_sd"] == 0.0


def test_spearman_is_a_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 25, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share their mean rank
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, 3, float("nan")], [1, 2, 3, 0]) == pytest.approx(1.0)


def _arm(model, reg, seed, noise, fwd_early, fwd_late, bwd_early, bwd_late, jac_start, jac_end):
    """A synthetic ArmResult with its monitor readings: a residual rising with ||J||."""
    # The noise moves the late readings only, so that differences within a seed vary too.
    m = {"fwd_res_early": fwd_early, "fwd_res_late": fwd_late + noise, "bwd_res_early": bwd_early,
         "bwd_res_late": bwd_late + noise, "jac_fro_start": jac_start, "jac_fro_end": jac_end + noise,
         "weight_decay": {"wd_low": 1e-4, "wd_high": 1e-3}.get(reg, 0.0), "plain_nfe": 10 * bwd_late + noise}
    m["jac_fro_creep"] = m["jac_fro_end"] - m["jac_fro_start"]
    records = [{"step": k, "pretrain": 0.0, "mon_jac_fro": j, "mon_fwd_res": j / 10}
               for k, j in enumerate([jac_start, (jac_start + jac_end) / 2, jac_end])]
    return ArmResult(arm=arm_name(model, reg), seed=seed, metrics=m, records=records)


def _results(flip=False, noise=(0.0, 0.01, -0.01)):
    """Every claim built to hold (or, with ``flip``, each effect reversed)."""
    out = []
    for model in ("transformer", "mdeq"):
        for seed, e in enumerate(noise):
            s = -1 if flip else 1
            late = 0.2 + s * 0.1  # the unregularized arm's late residual
            out += [
                _arm(model, "none", seed, e, 0.2, late, 0.2, late, 1.0, 1.0 + s * 1.0),
                _arm(model, "wd_low", seed, e, 0.2, late + s * 0.05, 0.2, late + s * 0.05, 1.0, 2.0),
                _arm(model, "wd_high", seed, e, 0.2, late + s * 0.1, 0.2, late + s * 0.1, 1.0, 2.0),
                _arm(model, "jr", seed, e, 0.2, late - s * 0.05, 0.2, late - s * 0.05, 0.5, 0.5 + s * 0.3),
                _arm(model, "jr_adaptive", seed, e, 0.2, 0.2, 0.2, 0.2, 0.5, 0.5 + 0.3 - s * 0.2),
            ]
    return out


def test_claims_hold_on_results_built_to_hold_them():
    exp = WeightDecayExperiment()
    verdicts = judge_claims(_results(), exp)
    assert sorted(verdicts) == [1, 2, 3, 4]
    for k, vs in verdicts.items():
        assert vs, k
        assert all(v.verdict == "held" for v in vs), [(v.claim.text, v.verdict, v.evidence) for v in vs]
    # per model: 2 residual directions, 2 doses x (residual, plain NFE), 1 correlation, 4 JR parts
    assert [len(verdicts[k]) for k in (1, 2, 3, 4)] == [4, 8, 2, 8]
    assert all("paired t" in v.test or "one-sample t" in v.test for k in verdicts for v in verdicts[k])


def test_claims_fail_on_reversed_effects_and_stay_open_on_noise():
    verdicts = judge_claims(_results(flip=True), WeightDecayExperiment())
    for k in (1, 2):
        assert all(v.verdict == "not held" for v in verdicts[k]), k
    assert [v.verdict for v in verdicts[4]].count("not held") == 8
    noisy = judge_claims(_results(noise=(0.0, 5.0, -3.0)), WeightDecayExperiment())
    assert all(v.verdict == "inconclusive" for v in noisy[1])


def test_a_claim_whose_arms_did_not_run_is_left_out():
    results = [r for r in _results() if r.arm.endswith(("/none", "/jr"))]
    verdicts = judge_claims(results, WeightDecayExperiment())
    assert not verdicts[2] and len(verdicts[1]) == 4
    assert not any("adaptive" in v.claim.text for v in verdicts[4])


def test_a_tiny_run_measures_every_arm_of_both_models_alike():
    from deqlib.experiments.weight_decay import load_data, run_arm

    tiny = {"transformer.model.d_model": 16, "transformer.model.n_head": 2, "transformer.model.d_head": 8,
            "transformer.model.d_inner": 32, "transformer.model.tgt_len": 8, "transformer.model.mem_len": 8,
            "transformer.model.n_layer": 2, "transformer.train.max_steps": 4, "transformer.train.batch_size": 4,
            "transformer.train.pretrain_steps": 1, "transformer.eval.max_eval": 400, "transformer.eval.eval_batch": 4,
            "transformer.eval.monitor_every": 2, "transformer.eval.monitor_batch": 2,
            "transformer.eval.radius_iters": 5, "transformer.eval.radius_vectors": 2,
            "transformer.eval.plain_nfe_cap": 5,
            "mdeq.data.n_train": 16, "mdeq.eval.max_eval": 8, "mdeq.train.max_steps": 4, "mdeq.train.batch_size": 4,
            "mdeq.eval.monitor_every": 2, "mdeq.eval.monitor_batch": 2, "mdeq.eval.radius_iters": 5,
            "mdeq.eval.radius_vectors": 2, "mdeq.eval.plain_nfe_cap": 5, "mdeq.eval.eval_batch": 8,
            "arms": ["none", "jr_adaptive"], "seeds": [0]}
    exp = _load(tiny)
    for path in (exp.transformer.data.root, exp.mdeq.data.root):
        if not (PARAMS.parent / path).exists():
            pytest.skip(f"no data slice at {path}")
    data = load_data(exp, PARAMS.parent)
    for arm in exp.arm_names:
        r = run_arm(exp, arm, 0, data, progress=False)
        assert len(r.records) == 4
        monitored = [x["step"] for x in r.records if "mon_jac_fro" in x]
        assert monitored == [1, 3]  # every 2 steps and after the last
        for key in ("task", "fwd_res_late", "bwd_res_late", "jac_fro_end", "spectral_radius", "plain_nfe"):
            assert math.isfinite(r.metrics[key]), (arm, key)
        adaptive = arm.endswith("jr_adaptive")
        gammas = [x["gamma"] for x in r.records if x["gamma"] == x["gamma"]]
        assert bool(gammas) == adaptive or r.metrics["penalized_steps"] == len(gammas)
