"""Gamma policies of the Jacobian penalty: the adaptive one holds a measurement at its target
(on a plant with a known answer and on a tiny DEQ trained through JacobianPenalty.loss), skips
missing measurements, keeps its bounds, and resumes exactly from a plain-valued state; the
fixed schedule answers to the same controller calls."""

from __future__ import annotations

import io
import math
import random
import statistics

import pytest
import torch

from deqlib.config import build
from deqlib.jacobian import JacobianPenalty
from deqlib.penalty_schedule import AdaptiveGamma, AdaptiveGammaController, ScheduledGamma
from deqlib.report import print_setup


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "target must be a finite number > 0, got target=None"),  # required
        (dict(target=0.0), "target must be a finite number > 0, got target=0.0"),
        (dict(target=math.nan), "target must be a finite number > 0, got target=nan"),
        (dict(target=math.inf), "target must be a finite number > 0, got target=inf"),
        (dict(target=1.0, measure="loss"), "measure must be one of .*, got measure='loss'"),
        (dict(target=1.0, gain=0.0), r"gain must be a finite number in \(0, 1\], got gain=0.0"),
        (dict(target=1.0, gain=1.5), r"gain must be a finite number in \(0, 1\], got gain=1.5"),
        (dict(target=1.0, gain=True), "gain must be .*, got gain=True"),
        (dict(target=1.0, smoothing=0.0), r"smoothing must be a finite number in \(0, 1\], got smoothing=0.0"),
        (dict(target=1.0, smoothing=1.01), "smoothing must be .*, got smoothing=1.01"),
        (dict(target=1.0, gamma_min=0.0), "gamma_min must be a finite number > 0, got gamma_min=0.0"),
        (dict(target=1.0, gamma_min=2.0, gamma_max=1.0), "gamma_max must be a finite number >= 2.0, got gamma_max=1.0"),
        (dict(target=1.0, gamma_max=math.inf), "gamma_max must be .*, got gamma_max=inf"),
    ],
)
def test_bad_adaptive_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveGamma(**kwargs)


def test_bad_combinations_with_the_penalty_are_refused_by_name():
    adaptive = AdaptiveGamma(target=1.0, gamma_min=0.1, gamma_max=5.0)
    with pytest.raises(ValueError, match=r"gamma must be in .* = \[0.1, 5.0\] .*, got gamma=0.0"):
        JacobianPenalty(gamma=0.0, adaptive=adaptive)  # a log-scale rule cannot leave 0
    with pytest.raises(ValueError, match=r"gamma must be in .*, got gamma=6.0"):
        JacobianPenalty(gamma=6.0, adaptive=adaptive)
    with pytest.raises(ValueError, match="gamma_end must be null when adaptive is set .*, got gamma_end=2.0"):
        JacobianPenalty(gamma=1.0, gamma_end=2.0, adaptive=adaptive)
    with pytest.raises(ValueError, match=r"adaptive must be an AdaptiveGamma section or null, got adaptive=\{"):
        JacobianPenalty(gamma=1.0, adaptive={"target": 1.0})
    pen = JacobianPenalty(gamma=1.0, adaptive=adaptive)
    z = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="weight must be given when adaptive is set.*got weight=None"):
        pen.loss(z, 0.5 * z, 0, 10)  # the start gamma in its place would train a fixed-gamma run
    with pytest.raises(ValueError, match="weight must be a finite number >= 0 or null, got weight=-1.0"):
        pen.loss(z, 0.5 * z, 0, 10, weight=-1.0)


def test_the_params_yaml_section_builds_and_its_errors_name_the_path():
    pen = build(JacobianPenalty, {"gamma": 0.5, "p": 0.05, "n_probes": 1,
                                  "adaptive": {"target": 0.8, "gain": 0.02}}, "train.jacobian")
    assert pen.adaptive == AdaptiveGamma(target=0.8, gain=0.02)
    assert build(JacobianPenalty, {"gamma": 0.5, "adaptive": None}).adaptive is None
    with pytest.raises(ValueError, match=r"train.jacobian.adaptive.*gain must be .*, got gain=2"):
        build(JacobianPenalty, {"gamma": 0.5, "adaptive": {"target": 0.8, "gain": 2}}, "train.jacobian")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gian'\] in train.jacobian.adaptive"):
        build(JacobianPenalty, {"gamma": 0.5, "adaptive": {"target": 0.8, "gian": 0.1}}, "train.jacobian")
    with pytest.raises(ValueError, match="train.jacobian.adaptive must be a section"):
        build(JacobianPenalty, {"gamma": 0.5, "adaptive": 0.8}, "train.jacobian")


def _drive(ctl: AdaptiveGammaController, plant, n: int, rng: random.Random) -> list[float]:
    gammas = []
    for _ in range(n):
        ctl.update(plant(ctl.weight(), rng))
        gammas.append(ctl.weight())
    return gammas


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converges_to_the_gamma_that_puts_a_known_measurement_at_its_target(seed):
    # m(gamma) = c / (1 + gamma), 20% Gaussian noise: m* = 0.8 at gamma* = c / 0.8 - 1 = 4.
    c, target = 4.0, 0.8
    gamma_star = c / target - 1
    pen = JacobianPenalty(gamma=0.5, adaptive=AdaptiveGamma(target=target, gain=0.05, smoothing=0.1,
                                                            gamma_min=0.01, gamma_max=100.0))
    gammas = _drive(pen.controller(), lambda g, rng: c / (1 + g) * (1 + 0.2 * rng.gauss(0, 1)), 1000,
                    random.Random(seed))
    # At most a factor exp(0.05) per update: 0.5 -> 4 takes >= 42 updates; settled by 150.
    assert all(abs(g / gamma_star - 1) < 0.15 for g in gammas[150:])
    assert abs(statistics.mean(gammas[-300:]) / gamma_star - 1) < 0.05


def test_smoothing_removes_the_bias_the_error_cap_gives_heavy_tailed_measurements():
    # A one-probe estimate of a one-dimensional ||J||^2 is m * chi2_1: mean m, but often > 2m,
    # where the cap at +1 cuts the error. Unsmoothed, gamma settles low; smoothed, at gamma*.
    c, target = 4.0, 0.8
    gamma_star = c / target - 1

    def settle(smoothing: float) -> float:
        pen = JacobianPenalty(gamma=0.5, adaptive=AdaptiveGamma(target=target, gain=0.02, smoothing=smoothing,
                                                                gamma_min=0.01, gamma_max=100.0))
        gammas = _drive(pen.controller(), lambda g, rng: c / (1 + g) * rng.gauss(0, 1) ** 2, 2500,
                        random.Random(0))
        return statistics.mean(gammas[-1500:])

    assert abs(settle(0.05) / gamma_star - 1) < 0.2
    assert settle(1.0) < 0.6 * gamma_star


def _linear_deq_run(pen: JacobianPenalty, steps: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """The DEQ z = a z + x (scalar a, |a| < 1, so J_f = a and ||J||_F^2 / d = a^2), trained by
    SGD on a least-squares fit of the slope a0 = 0.9 (a data term equal to (a - a0)^2) plus the
    penalty, drawn with probability p and weighted by the controller, as the training loop
    does. The expected loss (a - a0)^2 + p gamma a^2 has its optimum at a0 / (1 + p gamma)."""
    torch.manual_seed(seed)
    a0, batch = 0.9, 64
    a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    opt = torch.optim.SGD([a], lr=0.01)
    u = torch.randn(batch, 1, dtype=torch.float64)
    u = u / u.pow(2).mean().sqrt()  # mean u^2 = 1: mean((a u - a0 u)^2) = (a - a0)^2
    x = torch.randn(batch, 1, dtype=torch.float64)
    ctl = pen.controller()
    a_hist, gammas = [], []
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        z = (x / (1 - a.detach())).requires_grad_()  # the equilibrium, exactly
        fz = a * z + x
        loss = (a * u - a0 * u).pow(2).mean()
        jac_fro = math.nan  # the loop's record on a step without the penalty
        if pen.applies(gen):
            term, est = pen.loss(z, fz, step, steps, gen, weight=ctl.weight(step, steps))
            loss = loss + term
            jac_fro = math.sqrt(float(est))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.update(jac_fro)
        a_hist.append(a.item())
        gammas.append(ctl.weight(step, steps))
    return a_hist, gammas


def test_a_linear_deq_trained_through_the_penalty_ends_with_its_jacobian_at_the_target():
    a0, p, target = 0.9, 0.5, 0.3
    gamma_star = (a0 / target - 1) / p  # a0 / (1 + p gamma*) = target: gamma* = 4
    # The setup's closed form, checked at a fixed gamma first: a -> a0 / (1 + p gamma).
    a_fixed, _ = _linear_deq_run(JacobianPenalty(gamma=0.5, p=p), 600)
    assert abs(statistics.mean(a_fixed[-100:]) / (a0 / (1 + p * 0.5)) - 1) < 0.03
    pen = JacobianPenalty(gamma=0.5, p=p, adaptive=AdaptiveGamma(target=target, gain=0.05, smoothing=0.1,
                                                                 gamma_min=0.01, gamma_max=20.0))
    a_hist, gammas = _linear_deq_run(pen, 600)
    assert abs(statistics.mean(abs(a) for a in a_hist[-100:]) / target - 1) < 0.05
    assert abs(gammas[-1] / gamma_star - 1) < 0.1


def test_a_restored_controller_continues_with_identical_gammas_from_plain_values():
    pen = JacobianPenalty(gamma=1.0, adaptive=AdaptiveGamma(target=0.5, gain=0.1, smoothing=0.3))
    rng = random.Random(3)
    measurements = [rng.uniform(0.0, 1.0) for _ in range(120)]  # mean at the target: gamma wanders
    measurements[10] = math.nan
    never_stopped = pen.controller()
    for m in measurements[:60]:
        never_stopped.update(m)
    buf = io.BytesIO()
    torch.save({"gamma_policy": never_stopped.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["gamma_policy"]
    assert set(state) == {"gamma", "smoothed", "n_updates"}
    assert [type(v) for v in state.values()] == [float, float, int]
    assert state["n_updates"] == 59  # the NaN was skipped
    resumed = pen.controller()
    assert resumed.weight() == 1.0
    resumed.load_state_dict(state)
    gammas_a, gammas_b = [], []
    for m in measurements[60:]:
        never_stopped.update(m)
        resumed.update(m)
        gammas_a.append(never_stopped.weight())
        gammas_b.append(resumed.weight())
    assert gammas_a == gammas_b
    assert len(set(gammas_a)) > 1


def test_a_bad_state_is_refused_by_name():
    ctl = JacobianPenalty(gamma=1.0, adaptive=AdaptiveGamma(target=0.5, gamma_max=5.0)).controller()
    good = {"gamma": 2.0, "smoothed": 0.4, "n_updates": 7}
    for bad, message in [
        ({**good, "gamma": 9.0}, r"gamma must be a finite number in \[0.01, 5.0\], got gamma=9.0"),
        ({**good, "smoothed": math.nan}, "smoothed must be .*, got smoothed=nan"),
        ({**good, "n_updates": -1}, "n_updates must be an integer >= 0, got n_updates=-1"),
        ({**good, "smoothed": None}, "smoothed must be null exactly when n_updates is 0"),
        ({"gamma": 2.0}, r"state must have the keys \['gamma', 'n_updates', 'smoothed'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            ctl.load_state_dict(bad)
    assert ctl.state_dict() == {"gamma": 1.0, "smoothed": None, "n_updates": 0}  # left as it was
    with pytest.raises(ValueError, match="state must be empty for a fixed gamma schedule"):
        JacobianPenalty(gamma=1.0).controller().load_state_dict(good)


def test_missing_measurements_are_skipped_and_gamma_keeps_its_bounds():
    pen = JacobianPenalty(gamma=1.0, adaptive=AdaptiveGamma(target=1.0, gain=0.5, smoothing=1.0,
                                                            gamma_min=0.25, gamma_max=4.0))
    ctl = pen.controller()
    for m in (math.nan, math.inf, -math.inf, -1.0):
        ctl.update(m)
    assert ctl.state_dict() == {"gamma": 1.0, "smoothed": None, "n_updates": 0}
    with pytest.raises(ValueError, match="measured must be a real number, got measured='0.5'"):
        ctl.update("0.5")
    ctl.update(3.0)  # error 2, capped at 1: one step is a factor exp(gain), no more
    assert ctl.weight() == pytest.approx(math.exp(0.5))
    ups = [ctl.weight() for _ in range(20) if ctl.update(1e9) is None]
    assert max(ups) == 4.0 and ups[-1] == 4.0
    downs = [ctl.weight() for _ in range(40) if ctl.update(0.0) is None]
    assert min(downs) == 0.25 and downs[-1] == 0.25
    assert all(0.25 <= g <= 4.0 for g in ups + downs)


def test_the_fixed_schedule_answers_to_the_same_calls():
    pen = JacobianPenalty(gamma=1.6, gamma_end=2.5, p=0.35)
    ctl = pen.controller()
    assert isinstance(ctl, ScheduledGamma) and ctl.measure is None
    ctl.update(10.0)
    assert [ctl.weight(s, 101) for s in (0, 50, 100)] == [pen.weight(s, 101) for s in (0, 50, 100)]
    assert ctl.state_dict() == {}
    ctl.load_state_dict({})
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    fz = 0.5 * z
    gen = torch.Generator().manual_seed(0)
    term, est = pen.loss(z, fz, 50, 101, torch.Generator().manual_seed(0))
    term_w, _ = pen.loss(z, fz, 50, 101, gen, weight=ctl.weight(50, 101))
    assert float(term) == float(term_w) == pytest.approx(2.05 * float(est))
    adaptive = JacobianPenalty(gamma=0.5, adaptive=AdaptiveGamma(target=1.0))
    assert isinstance(adaptive.controller(), AdaptiveGammaController)
    assert adaptive.controller().measure == "jac_fro"


def test_the_notebooks_setup_line_shows_an_adaptive_policy_only_when_set(capsys):
    def line(jacobian: dict) -> str:
        print_setup("small", {"data": {}, "model": {}, "eval": {},
                              "train": {"forward": {}, "backward": {}, "jacobian": jacobian}})
        return next(s for s in capsys.readouterr().out.splitlines() if "Jacobian penalty" in s)

    fixed = {"gamma": 0.5, "gamma_end": None, "p": 0.05, "n_probes": 1}
    assert line({**fixed, "adaptive": None}).endswith(str(fixed))
    assert "'adaptive': {'target': 0.8}" in line({**fixed, "adaptive": {"target": 0.8}})
