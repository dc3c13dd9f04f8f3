"""The image-classification experiment shared by CIFAR-10 and ImageNet
(deqlib.experiments.image_classification, with deqlib.experiments.cifar's data): the arms and
their settings, what one run measures, the peak memory of a step, and the claims over seeds."""

import math
from dataclasses import replace

import pytest
import torch

from deqlib.config import build
from deqlib.data.cifar import Cifar10, normalize
from deqlib.deq import SolverSettings
from deqlib.experiments.cifar import CifarExperiment, CifarImages
from deqlib.experiments.core import ArmResult
from deqlib.experiments.image_classification import (ArmsConfig, ClassificationEvalConfig, arm_specs,
                                                     arm_train_config, judge_claims, run_arm, spearman,
                                                     step_peak_memory)
from deqlib.jacobian import JacobianPenalty
from deqlib.models.mdeq import MDEQ, MDEQConfig
from deqlib.train import TrainConfig

MODEL = MDEQConfig(channels=(4, 8), expansion=2, groups=2, post_groups=1, dropout=0.0, downsample=2,
                   head_channels=(4, 8), final_channels=8, init_std=0.01, stem="official")
TRAIN = TrainConfig(epochs=1, batch_size=8, lr=1e-2, forward=SolverSettings("anderson", 5, 1e-3),
                    backward=SolverSettings("anderson", 5, 1e-4), jacobian=JacobianPenalty(gamma=1.0, p=1.0))
EVAL = ClassificationEvalConfig(batch_size=7, nfe=(1, 2, 3), compare_nfe=2, nfe_cap=12, plain_cap=15, jac_batch=4,
                                jac_probes=2, radius_iters=20, radius_vectors=2, monitor_every=2, memory_batch=4)


def tiny(**changes) -> CifarExperiment:
    """4 training steps of batch 8 on 32 random images, 11 test images."""
    exp = CifarExperiment(model=MODEL, train=TRAIN, arms=ArmsConfig(gammas=(0.0, 1.0), explicit_depth=3),
                          seeds=(0, 1, 2), eval=EVAL)
    return replace(exp, **changes)


def images(n_train: int = 32, n_test: int = 11) -> CifarImages:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    data = Cifar10(x[:n_train], y[:n_train], x[n_train:], y[n_train:], tuple("abcdefghij"))
    return CifarImages(data, augment=True, pad=4)


def test_the_arms_are_named_by_their_gamma_in_order():
    exp = tiny(arms=ArmsConfig(gammas=(3.0, 0.0, 1.0, 0.3), explicit_depth=4))
    specs = arm_specs(exp)
    assert list(specs) == ["MDEQ", "JR gamma=0.3", "MDEQ + JR", "JR gamma=3", "explicit"]
    assert [s.gamma for s in specs.values()] == [0.0, 0.3, 1.0, 3.0, 0.0]
    assert specs["explicit"].explicit_depth == 4 and not specs["MDEQ + JR"].explicit


def test_each_arm_trains_with_its_gamma_and_the_explicit_stack_only_unrolled():
    exp = tiny(train=replace(TRAIN, epochs=2, jacobian=JacobianPenalty(gamma=1.0, gamma_end=2.0, p=0.5)),
               arms=ArmsConfig(gammas=(0.0, 0.5, 1.0), explicit_depth=3, explicit_steps=7))
    specs = arm_specs(exp)
    jr = arm_train_config(exp, specs["JR gamma=0.5"], 4, steps_per_epoch=3)
    assert (jr.seed, jr.jacobian.gamma, jr.jacobian.gamma_end, jr.jacobian.p) == (4, 0.5, 1.0, 0.5)  # scaled schedule
    assert arm_train_config(exp, specs["MDEQ"], 4, 3).jacobian.enabled is False
    explicit = arm_train_config(exp, specs["explicit"], 4, steps_per_epoch=3)
    assert (explicit.max_steps, explicit.pretrain_steps, explicit.epochs) == (7, 7, 3)
    assert not explicit.jacobian.enabled


@pytest.mark.parametrize("change, message", [
    ({"arms": {"gammas": [0.5, 1.0]}}, "include 0"),
    ({"arms": {"gammas": [0.0, 0.5]}}, "train.jacobian.gamma"),
    ({"train": {"seed": 3}}, "train.seed must be 0"),
    ({"seeds": [0, 0, 1]}, "seeds must be distinct"),
    ({"eval": {"compare_nfe": 5}}, "compare_nfe=5"),
    ({"eval": {"nfe_cap": 2}}, "eval.nfe_cap must be >= max"),
    ({"model": {"image_size": 16}}, "image_size=16"),
])
def test_bad_settings_are_named_before_any_run(change, message):
    base = {"model": {"channels": [4, 8], "head_channels": [4, 8], "groups": 2, "final_channels": 8},
            "train": {"jacobian": {"gamma": 1.0}}, "arms": {"gammas": [0.0, 1.0]},
            "eval": {"nfe": [1, 2, 3], "compare_nfe": 2}}
    for section, values in change.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    with pytest.raises(ValueError, match=message):
        build(CifarExperiment, base, "cifar10.small")


def test_a_run_measures_the_equilibrium_arms_and_the_explicit_stack():
    exp, data = tiny(), images()
    plain = run_arm(exp, "MDEQ", 0, data, progress=False)
    jr = run_arm(exp, "MDEQ + JR", 0, data, progress=False)
    m, n = plain.metrics, 11
    assert plain.outcomes["correct"].shape == (n,) and plain.outcomes["correct_nfe_2"].dtype == torch.bool
    assert math.isclose(m["acc"], float(plain.outcomes["correct"].double().mean()))
    # the accuracy at a cap is that of the model solved with at most that many calls
    x, y = data.eval_batches().batch(0, n)
    with torch.no_grad():
        logits, _ = plain.model.eval().predict(x, forward_solver=SolverSettings("anderson", 2, 1e-3))
    assert round(m["acc_nfe_2"] * n) == int((logits.argmax(1) == y).sum())
    assert 0 <= m["nfe_to_tol_reached"] <= 1 and m["nfe_to_tol_capped_mean"] <= exp.eval.nfe_cap
    assert m["plain_nfe_capped_mean"] <= exp.eval.plain_cap and m["spectral_radius"] > 0
    # arms of one seed start from the same weights, so their first measurement is the same
    assert plain.metrics["init_jac_fro"] == jr.metrics["init_jac_fro"]
    assert plain.metrics["init_spectral_radius"] == jr.metrics["init_spectral_radius"]
    assert (plain.metrics["penalized_steps"], jr.metrics["penalized_steps"]) == (0, 4)
    # the monitor ran after steps 2 and 4, on the fixed batch with the same probes as the end
    mon = [r for r in jr.records if "mon_jac_fro" in r]
    assert [r["step"] for r in mon] == [1, 3]
    assert math.isclose(mon[-1]["mon_jac_fro"], jr.metrics["jac_fro"], rel_tol=1e-6)
    assert jr.curves["accuracy_vs_nfe"] == [{"nfe": k, "accuracy": jr.metrics[f"acc_nfe_{k}"]} for k in (1, 2, 3)]
    explicit = run_arm(exp, "explicit", 0, data, progress=False)
    assert all(r["pretrain"] for r in explicit.records) and len(explicit.records) == 4
    with torch.no_grad():
        out = explicit.model.eval().unrolled(x, 3)
    assert round(explicit.metrics["acc"] * n) == int((out.argmax(1) == y).sum())
    assert explicit.metrics["params"] == plain.metrics["params"]  # the same network, tied weights


def test_the_peak_memory_of_a_step_counts_the_penalty_and_leaves_the_gradients():
    torch.manual_seed(0)
    model = MDEQ(MODEL, TRAIN.forward, TRAIN.backward)
    x, y = normalize(images().data.train_x[:4]), torch.tensor([0, 1, 2, 3])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    plain, counted = step_peak_memory(model, x, y, None, explicit=False)
    with_jr, _ = step_peak_memory(model, x, y, TRAIN.jacobian, explicit=False)
    assert 0 < plain < with_jr and "live tensor" in counted
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_spearman_is_the_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _result(arm: str, seed: int, better: bool) -> ArmResult:
    """A made-up run: with ``better`` the numbers the paper predicts for JR (seed-dependent
    noise so that the paired tests have a spread)."""
    e = 0.01 * seed
    correct = torch.arange(300) % 10 < (8 if better else 5)
    at_k = torch.arange(300) % 10 < (8 if better else 3)
    records = [{"step": s, "mon_jac_fro": 0.5 + 0.1 * s, "mon_res_threshold": 0.01 * s} for s in range(5)]
    metrics = {"acc": float(correct.double().mean()), "acc_nfe_2": float(at_k.double().mean()),
               "nfe_to_tol_capped_mean": (5 if better else 20) + e, "plain_nfe_capped_mean": (9 if better else 40) + e,
               "train_fwd_rel_res": (0.01 if better else 0.1) + e, "train_bwd_rel_res": (0.001 if better else 0.02) + e,
               "jac_fro": (0.3 if better else 1.0) + e, "spectral_radius": (0.5 if better else 1.2) + e}
    return ArmResult(arm, seed, metrics, records, outcomes={"correct": correct, "correct_nfe_2": at_k})


def test_the_claims_hold_on_runs_that_show_them():
    exp = tiny(eval=replace(EVAL, margin_points=40.0))
    results = [_result(arm, s, arm == "MDEQ + JR") for s in range(3) for arm in ("MDEQ", "MDEQ + JR")]
    verdicts = judge_claims(results, exp)
    assert {k: v.verdict for k, v in verdicts.items()} == {k: "held" for k in verdicts}
    assert "exact McNemar" in verdicts["hard_stop"].test and "paired t" in verdicts["nfe"].test
    # the same runs with the arms' names swapped: each comparison of the two arms goes the other way
    swapped = [replace(r, arm="MDEQ" if r.arm == "MDEQ + JR" else "MDEQ + JR") for r in results]
    flipped = judge_claims(swapped, exp)
    for key in ("nfe", "nfe_plain", "jr_at_k", "res_fwd", "res_bwd", "jac", "radius"):
        assert flipped[key].verdict == "not held", key
