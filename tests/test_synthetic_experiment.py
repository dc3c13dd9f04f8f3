"""The synthetic experiment (deqlib.experiments.synthetic): what one run measures, the readings of
the targets, the pairing of arms by seed, and the claims judged over seeds."""

import math
from dataclasses import replace

import pytest
import torch

from deqlib.config import build
from deqlib.data.synthetic import make_synthetic
from deqlib.deq import SolverSettings
from deqlib.experiments.core import ArmResult, run_arms
from deqlib.experiments.synthetic import (ArmsConfig, EvalConfig, SyntheticDataConfig, SyntheticExperiment,
                                          arm_specs, judge_claims, load_data, measure, nfe_quantile, pair_tests,
                                          run_arm)
from deqlib.jacobian import estimate_spectral_radius
from deqlib.models.synthetic import SyntheticDEQ, SyntheticModelConfig
from deqlib.train import TrainConfig

TINY_TRAIN = TrainConfig(epochs=1, batch_size=32, lr=1e-2, forward=SolverSettings("anderson", 6, 1e-3),
                         backward=SolverSettings("anderson", 6, 1e-4))


def tiny(**changes) -> SyntheticExperiment:
    """4 training steps on 128 pairs, 50 validation pairs, slopes monitored every 2 steps."""
    base = SyntheticExperiment(data=SyntheticDataConfig(n_train=128, n_valid=50), train=TINY_TRAIN,
                               eval=EvalConfig(monitor_every=2, plain_cap=200))
    return replace(base, **changes)


def test_a_run_reports_the_exact_slope_its_jacobian_norm_and_spectral_radius(tmp_path):
    exp = tiny()
    res = run_arm(exp, "gamma=1", 0, run_dir=tmp_path, progress=False)
    model = res.model
    assert next(model.parameters()).device.type == "cpu"  # where the notebook plots it from
    # The slope at z*, one sample at a time with torch.func, against the batch's one VJP; in 1D
    # ||J||_F/sqrt(d) is its root mean square and the batch's spectral radius its largest modulus
    # (a one-probe Hutchinson estimate would be a random multiple of it per sample).
    data = load_data(exp)
    with torch.no_grad():
        _, stats = model.predict(data.x_valid, SolverSettings("anderson", 200, 1e-6))
    z = stats.forward.z
    d = torch.stack([torch.func.grad(lambda zi, xi: model.f(zi.view(1, 1), xi.view(1, 1)).sum())(zi, xi)
                     for zi, xi in zip(z[:, 0], data.x_valid[:, 0])]).detach()
    assert math.isclose(res.metrics["jac_fro"], float(d.pow(2).mean().sqrt()), rel_tol=1e-5)
    assert math.isclose(res.metrics["spectral_radius"], float(d.abs().max()), rel_tol=1e-5)
    with torch.enable_grad():
        zz = z.detach().requires_grad_()
        radius = estimate_spectral_radius(zz, model.f(zz, data.x_valid)).value
    assert math.isclose(res.metrics["spectral_radius"], float(radius.max()), rel_tol=1e-4)
    slopes = torch.tensor([row["slope"] for row in res.curves["per_sample"]])
    assert torch.allclose(slopes, d, rtol=1e-5, atol=1e-7)
    # The monitor ran after steps 2 and 4 (every 2, and the last), for this arm as for any.
    assert [r["step"] for r in res.records if "monitor_jac_fro" in r] == [1, 3]
    last = res.records[-1]
    assert math.isclose(last["monitor_jac_fro"], res.metrics["jac_fro"], rel_tol=1e-5)
    assert math.isclose(last["monitor_spectral_radius"], res.metrics["spectral_radius"], rel_tol=1e-5)
    assert res.metrics["train_fwd_nfe"] == sum(r["fwd_nfe"] for r in res.records) / len(res.records)


@pytest.mark.parametrize("slope", [0.2, 0.5, 0.9, -0.5, -0.8])
def test_plain_iteration_nfe_follows_the_slope(slope):
    """f(z; x) = s z + x + 5 (one ReLU unit, always active): from z = 0 plain iteration's error
    shrinks by |s| per call, so the relative residual at call k is |1-s| |s|^(k-1) / |1-s^k| and
    the NFE to 1e-3 is the first k where that is below it."""
    model = SyntheticDEQ(SyntheticModelConfig(hidden=1), SolverSettings("anderson", 6, 1e-3),
                         SolverSettings("anderson", 6, 1e-4))
    with torch.no_grad():
        model.f.W1.fill_(slope)
        model.f.U.fill_(1.0)
        model.f.b.fill_(5.0)
        model.f.W2.fill_(1.0)
    x = torch.linspace(-1, 1, 7).unsqueeze(1)
    eq = measure(model, x, EvalConfig(plain_cap=500))
    tol = 1e-3
    expected = next(k for k in range(1, 500) if abs(1 - slope) * abs(slope) ** (k - 1) / abs(1 - slope ** k) < tol)
    assert eq.plain_nfe.tolist() == [expected] * len(x)
    assert torch.allclose(eq.slope, torch.full((len(x),), slope))
    assert torch.allclose(eq.z_star, (x[:, 0] + 5) / (1 - slope), rtol=1e-5)
    assert (eq.anderson_nfe > 0).all() and (eq.anderson_nfe <= eq.plain_nfe).all()


def test_a_slope_beyond_one_never_converges_under_plain_iteration():
    model = SyntheticDEQ(SyntheticModelConfig(hidden=1), SolverSettings("anderson", 6, 1e-3),
                         SolverSettings("anderson", 6, 1e-4))
    with torch.no_grad():
        model.f.W1.fill_(1.5)
        model.f.U.fill_(1.0)
        model.f.b.fill_(5.0)
        model.f.W2.fill_(1.0)
    eq = measure(model, torch.zeros(3, 1), EvalConfig(plain_cap=100))
    assert (eq.plain_nfe == 0).all()
    assert nfe_quantile(eq.plain_nfe, 0.5) == math.inf


def test_arms_with_the_same_seed_share_initialization_and_data_order():
    """With the penalty never drawn (p = 0), the gamma = 0 and gamma = 2 arms of one seed are the
    same run bit for bit: only the penalty tells paired arms apart. Another seed is another run."""
    exp = tiny(train=replace(TINY_TRAIN, jacobian=replace(TINY_TRAIN.jacobian, p=0.0)),
               arms=ArmsConfig(gammas=(0.0, 2.0), control_gamma=None), seeds=(1, 2))
    results = run_arms(run_arm, exp, list(arm_specs(exp)), exp.seeds, progress=False, keep_models=True, log=None)
    runs = {(r.arm, r.seed): r for r in results}
    a, b = runs["gamma=0", 1], runs["gamma=2", 1]
    timing = {"step_time_s"}
    assert {k: v for k, v in a.metrics.items() if k not in timing} == \
        {k: v for k, v in b.metrics.items() if k not in timing}
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert runs["gamma=0", 2].metrics["valid_mse"] != a.metrics["valid_mse"]


def test_the_standardized_reading_trains_on_unit_targets_and_reports_mse_in_y_units():
    raw = load_data(tiny())
    exp = tiny(data=SyntheticDataConfig(n_train=128, n_valid=50, targets="standardized"))
    std = load_data(exp)
    (_, yt), (xv, yv) = make_synthetic(exp.data)
    assert torch.equal(std.x_valid, raw.x_valid) and torch.equal(std.y_valid, yv)
    assert abs(float(std.y_train.mean())) < 1e-6 and abs(float(std.y_train.std()) - 1) < 1e-6
    assert torch.allclose(std.to_y(std.y_train), yt, atol=1e-5)
    res = run_arm(exp, "gamma=0", 0, std, progress=False)
    z_y = torch.tensor([row["z_star"] for row in res.curves["per_sample"]])  # in y's units
    assert math.isclose(res.metrics["valid_mse"], float((z_y - yv[:, 0]).pow(2).mean()), rel_tol=1e-5)
    assert float(z_y.abs().max()) > 2  # not in the model's units: y spans about +-23


@pytest.mark.parametrize("section, message", [
    ({"seeds": [0, 0]}, r"seeds must be distinct"),
    ({"seeds": []}, r"seeds must be a non-empty list"),
    ({"train": {"seed": 3}}, r"train.seed=3 is not used"),
    ({"train": {"jacobian": {"gamma": 1.0}}}, r"gamma=1.0.*arms.gammas"),
    ({"arms": {"gammas": [1.0, 1.0]}}, r"gammas must be distinct"),
    ({"arms": {"control_p": 0.0}}, r"control_p must be .*, got control_p=0.0"),
    ({"arms": {"control_gamma": 0.0}}, r"control_gamma must be .*, got control_gamma=0.0"),
    ({"data": {"targets": "normalized"}}, r"targets must be one of \['raw', 'standardized'\]"),
    ({"eval": {"monitor_every": 0}}, r"monitor_every must be an integer >= 1, got monitor_every=0"),
])
def test_bad_arms_seeds_and_readings_are_refused_by_name(section, message):
    with pytest.raises(ValueError, match=message):
        build(SyntheticExperiment, section, "synthetic.small")


def test_an_unknown_arm_or_a_bad_seed_is_refused_before_training():
    exp = tiny()
    with pytest.raises(ValueError, match=r"arm must be one of \['gamma=0', 'gamma=1', 'gamma=2', 'gamma=4', "
                                         r"'control'\], got arm='gamma=3'"):
        run_arm(exp, "gamma=3", 0)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got seed=-1"):
        run_arm(exp, "gamma=0", -1)


def _fake(arm: str, seed: int, **metrics: float) -> ArmResult:
    return ArmResult(arm=arm, seed=seed, metrics=metrics)


def _results(slopes: dict[str, list[float]], nfe: dict[str, list[float]], mse: dict[str, list[float]]):
    return [_fake(arm, s, slope_abs_median=slopes[arm][s], plain_nfe_median=nfe[arm][s],
                  anderson_nfe_median=nfe[arm][s], valid_mse=mse[arm][s])
            for arm in slopes for s in range(3)]


def test_claims_are_judged_by_paired_tests_over_seeds():
    exp = SyntheticExperiment()
    arms = ["gamma=0", "gamma=1", "gamma=2", "gamma=4", "control"]
    slopes = {a: [0.5 - 0.1 * i + 0.01 * s for s in range(3)] for i, a in enumerate(arms)}
    nfe = {a: [3.0 + i + (s % 2) for s in range(3)] for i, a in enumerate(arms)}  # grows with gamma
    mse = {a: [0.06 + 0.001 * s for s in range(3)] for a in arms}
    verdicts = judge_claims(_results(slopes, nfe, mse), exp)
    assert {k: v.verdict for k, v in verdicts.items()} == {
        "fit": "held", "flat": "held", "nfe_plain": "not held", "nfe_anderson": "not held", "control": "held"}
    assert "paired t, n=3" in verdicts["flat"].test
    # one arm far above the floor: the fit claim does not hold; one arm noisy around it: inconclusive
    mse["gamma=2"] = [0.5, 0.6, 0.55]
    assert judge_claims(_results(slopes, nfe, mse), exp)["fit"].verdict == "not held"
    mse["gamma=2"] = [0.02, 0.2, 0.09]
    assert judge_claims(_results(slopes, nfe, mse), exp)["fit"].verdict == "inconclusive"
    rows = pair_tests(_results(slopes, nfe, mse), exp, "slope_abs_median")
    assert [r["pair"] for r in rows] == ["gamma=1 vs gamma=0", "gamma=2 vs gamma=0", "gamma=4 vs gamma=0",
                                         "gamma=2 vs gamma=1", "gamma=4 vs gamma=2"]
    assert all(r["direction"] == "held" and r["n"] == 3 for r in rows)


def test_nfe_quantiles_count_a_sample_that_never_converged_as_infinitely_many_calls():
    nfe = torch.tensor([3, 5, 4, 0, 6])
    assert nfe_quantile(nfe, 0.5) == 5.0  # of 3, 4, 5, 6, inf
    assert nfe_quantile(nfe, 0.9) == 6.0  # the lower neighbour of the 90th percentile
    assert nfe_quantile(nfe, 1.0) == math.inf
