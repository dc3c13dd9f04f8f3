"""The 1D synthetic experiment (supplement A.1, Figures 5 and 9, Table 4's first column).

Arms: one per gamma of ``arms.gammas`` at Table 4's ``p`` (``train.jacobian.p``), and a
positive control: a large gamma (``arms.control_gamma``) applied at every step
(``arms.control_p``), so that a reader sees what an effective penalty does. Every arm trains
once per seed of ``seeds``; the seed is the training seed (initialization, data order, the
penalty's draws), so arms with the same seed pair.

Readings (``data.targets``): ``raw`` trains on ``y`` as the supplement prints it (about
+-23, so a mean squared error near 140 at the start, far above any ``gamma * f'^2 <= gamma``);
``standardized`` trains on ``(y - mean) / std`` of the training targets, where the penalty
and the loss start at the same scale. Every MSE is reported in the units of ``y``.

In 1D the whole mechanism is one number per input: the slope ``f'(z*(x)) = df/dz`` at the
equilibrium. ``J`` of a batch is diagonal, so ``||J||_F / sqrt(d)`` of one sample is
``|f'|`` and the spectral radius of the batch's Jacobian is ``max |f'|``; both are taken
exactly from that derivative (a Hutchinson probe would give a random multiple of it). Plain
fixed-point iteration contracts the error by ``|f'|`` per call, so its NFE to a relative
residual follows the slope; Anderson (the paper's solver) is measured beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from ..checks import check_choice, check_int, check_int_list, check_real, check_real_list
from ..data.synthetic import SyntheticConfig, make_synthetic
from ..deq import SolverSettings
from ..models.synthetic import SyntheticDEQ, SyntheticModelConfig
from ..solvers import METHODS
from ..config import to_dict
from ..report.claims import Claim, Verdict, fmt_mean_se, judge, judge_threshold
from ..stats import verdict
from ..train import TensorBatches, TrainConfig, train
from .core import ArmResult, by_arm, compare, equilibrium_mean, mean_step_time, nfe_to_tol

__all__ = ["TARGETS", "SyntheticDataConfig", "ArmsConfig", "EvalConfig", "SyntheticExperiment", "ArmSpec",
           "arm_specs", "SyntheticData", "load_data", "run_arm", "Equilibria", "measure", "slope_at",
           "slope_monitor", "quantile", "nfe_quantile", "CLAIMS", "FIT_FACTOR",
           "pair_tests", "judge_claims"]

TARGETS = ("raw", "standardized")


@dataclass(frozen=True)
class SyntheticDataConfig(SyntheticConfig):
    """The supplement's data set (:class:`~deqlib.data.synthetic.SyntheticConfig`) and the
    reading of its targets the model trains on: ``raw`` or ``standardized``."""

    targets: str = "raw"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("targets", self.targets, TARGETS)


@dataclass(frozen=True)
class ArmsConfig:
    """The arms: one per gamma (at ``train.jacobian.p``), and the positive control, gamma
    ``control_gamma`` with probability ``control_p`` (no control when ``control_gamma`` is null)."""

    gammas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    control_gamma: float | None = 40.0
    control_p: float = 1.0

    def __post_init__(self) -> None:
        check_real_list("gammas", self.gammas, minimum=0)
        if len(set(self.gammas)) != len(self.gammas):
            raise ValueError(f"gammas must be distinct (one arm each), got gammas={self.gammas!r}")
        check_real("control_gamma", self.control_gamma, minimum=0, min_open=True, optional=True)
        check_real("control_p", self.control_p, minimum=0, maximum=1, min_open=True)


@dataclass(frozen=True)
class EvalConfig:
    """How each trained model is measured on the validation set.

    Attributes:
        tol: the relative residual ``|f(z) - z| / |f(z)|`` NFE are counted to, in (0, 1).
        method, nfe_cap: the paper's solver and its most calls; the equilibrium the MSE and
            slopes are read at is this solve run on to ``tol * 1e-3``.
        plain_cap: the most calls of plain fixed-point iteration (a sample with ``|f'| >= 1``
            never gets there).
        monitor_every: steps between two measurements of the slope during training (every arm).
        slices: the inputs ``x0`` whose slices ``f(z; x0)`` Figure 5 is redrawn with.
    """

    tol: float = 1e-3
    method: str = "anderson"
    nfe_cap: int = 200
    plain_cap: int = 1000
    monitor_every: int = 100
    slices: tuple[float, ...] = (-1.5, 0.0, 1.5)

    def __post_init__(self) -> None:
        check_real("tol", self.tol, minimum=0, maximum=1, min_open=True, max_open=True)
        check_choice("method", self.method, METHODS)
        check_int("nfe_cap", self.nfe_cap, 2)
        check_int("plain_cap", self.plain_cap, 2)
        check_int("monitor_every", self.monitor_every, 1)
        check_real_list("slices", self.slices)


@dataclass(frozen=True)
class SyntheticExperiment:
    data: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    model: SyntheticModelConfig = field(default_factory=SyntheticModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    arms: ArmsConfig = field(default_factory=ArmsConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_int_list("seeds", self.seeds, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct (one run each), got seeds={self.seeds!r}")
        # Each arm's weight and each run's seed come from arms and seeds; a value set in train
        # would be silently replaced.
        jac = self.train.jacobian
        if jac.gamma != 0.0 or jac.gamma_end is not None or jac.adaptive is not None:
            raise ValueError(f"train.jacobian.gamma={jac.gamma!r}, gamma_end={jac.gamma_end!r} is not used: "
                             f"each arm's constant gamma comes from arms.gammas; leave gamma at 0 and "
                             f"gamma_end and adaptive unset")
        if self.train.seed != 0:
            raise ValueError(f"train.seed={self.train.seed!r} is not used: each run's training seed comes "
                             f"from seeds; leave train.seed at 0")


@dataclass(frozen=True)
class ArmSpec:
    """One arm: its name, its constant gamma and the probability ``p`` of the penalty."""

    name: str
    gamma: float
    p: float
    control: bool = False


def arm_specs(exp: SyntheticExperiment) -> dict[str, ArmSpec]:
    """The arms by name, in order: ``gamma=<g>`` for each of ``arms.gammas``, then ``control``."""
    specs = {f"gamma={g:g}": ArmSpec(f"gamma={g:g}", float(g), exp.train.jacobian.p) for g in exp.arms.gammas}
    if exp.arms.control_gamma is not None:
        specs["control"] = ArmSpec("control", float(exp.arms.control_gamma), exp.arms.control_p, control=True)
    return specs


@dataclass(frozen=True)
class SyntheticData:
    """The data in the units the model trains on, and the map back to ``y``'s units.

    ``x_*``: ``(N, 1)``; ``y_train``: ``(N, 1)`` targets as trained on; ``y_valid``: ``(N, 1)``
    in ``y``'s units. A model's output ``z`` reads ``y_mean + y_std * z`` in ``y``'s units.
    """

    x_train: Tensor
    y_train: Tensor
    x_valid: Tensor
    y_valid: Tensor
    y_mean: float = 0.0
    y_std: float = 1.0

    def to_y(self, z: Tensor) -> Tensor:
        return self.y_mean + self.y_std * z


def load_data(exp: SyntheticExperiment, base: str | Path | None = None) -> SyntheticData:
    """The seeded data set, its targets read as ``data.targets`` says (``base`` is unused: the
    data are generated, not read)."""
    (xt, yt), (xv, yv) = make_synthetic(exp.data)
    if exp.data.targets == "raw":
        return SyntheticData(xt, yt, xv, yv)
    mean, std = float(yt.mean()), float(yt.std())
    return SyntheticData(xt, (yt - mean) / std, xv, yv, mean, std)


def slope_at(model: SyntheticDEQ, z: Tensor, x: Tensor) -> Tensor:
    """``(B,)`` the exact ``df/dz`` at ``(z, x)``, each ``(B, 1)``: samples are independent,
    so one vector-Jacobian product with ones gives every sample's derivative."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        fz = model.f(z, x)
        (d,) = torch.autograd.grad(fz, z, torch.ones_like(fz))
    return d[:, 0].detach()


@dataclass
class Equilibria:
    """Per validation sample (each ``(N,)``): the equilibrium ``z*`` in the model's units (the
    Anderson solve run on to ``tol * 1e-3``), the output at the training threshold, the slope
    ``f'(z*)``, and the calls each solver needed to reach ``tol`` (0: never, within its cap)."""

    z_star: Tensor
    z_threshold: Tensor
    slope: Tensor
    anderson_nfe: Tensor
    plain_nfe: Tensor


@torch.no_grad()
def measure(model: SyntheticDEQ, x: Tensor, ev: EvalConfig) -> Equilibria:
    """Solve every ``x`` (``(N, 1)``) three ways and read the slope at the equilibrium."""
    z_thr, _ = model.predict(x)  # as trained: the forward threshold's solver
    _, stats = model.predict(x, SolverSettings(ev.method, ev.nfe_cap, ev.tol * 1e-3))
    res = stats.forward
    _, plain = model.predict(x, SolverSettings("fixed_point", ev.plain_cap, ev.tol))
    return Equilibria(z_star=res.z[:, 0], z_threshold=z_thr[:, 0], slope=slope_at(model, res.z, x),
                      anderson_nfe=nfe_to_tol(res.rel_trace, ev.tol),
                      plain_nfe=nfe_to_tol(plain.forward.rel_trace, ev.tol))


def quantile(values: Tensor, q: float) -> float:
    """The ``q``-quantile of ``values`` (``(N,)``): the lower of two neighbours, as
    ``torch.median`` takes the lower middle value (an NFE stays a whole number of calls)."""
    return float(values.double().sort().values[int(math.floor(q * (len(values) - 1)))])


def nfe_quantile(nfe: Tensor, q: float) -> float:
    """The ``q``-quantile of per-sample NFE (``(N,)``, 0 for a sample that never got there),
    such a sample counted as infinitely many calls (so a quantile may be ``inf``)."""
    return quantile(torch.where(nfe > 0, nfe.double(), torch.full_like(nfe, math.inf, dtype=torch.float64)), q)


def slope_monitor(x: Tensor, ev: EvalConfig):
    """The training loop's ``monitor``: on the fixed batch ``x`` (``(N, 1)``), ``||J||_F /
    sqrt(d)`` over the batch (the root mean square of ``f'(z*)``), the spectral radius of the
    batch's Jacobian (``max |f'(z*)|``) and the median ``|f'(z*)|``."""

    def monitor(model: SyntheticDEQ) -> dict[str, float]:
        xs = x.to(next(model.parameters()).device)
        with torch.no_grad():
            _, stats = model.predict(xs, SolverSettings(ev.method, ev.nfe_cap, ev.tol * 1e-3))
        s = slope_at(model, stats.forward.z, xs).abs()
        return {"monitor_jac_fro": float(s.pow(2).mean().sqrt()), "monitor_spectral_radius": float(s.max()),
                "monitor_slope_median": float(s.median())}

    return monitor


def _identity(exp: SyntheticExperiment) -> dict:
    """What makes a run this one beside its training settings (its arm's gamma and p and its
    seed are in those): the data and the model. Other arms, seeds and the evaluation are not:
    adding an arm or a seed must not discard the runs already trained."""
    d = to_dict(exp)
    return {"experiment": {"data": d["data"], "model": d["model"]}}


def run_arm(exp: SyntheticExperiment, arm: str, seed: int, data: SyntheticData | None = None,
            run_dir: str | Path | None = None, progress: bool = True) -> ArmResult:
    """Train arm ``arm`` (a name of :func:`arm_specs`) with training seed ``seed`` and measure
    it on the validation set. ``run_dir``: where it checkpoints and resumes (None: nowhere).

    Returns an :class:`~deqlib.experiments.core.ArmResult` whose metrics are in ``y``'s units
    for errors; ``records`` hold the monitor's slope measurements every ``eval.monitor_every``
    steps; ``curves["per_sample"]`` one row per validation sample (x, z* in ``y``'s units,
    slope, NFE of each solver)."""
    specs = arm_specs(exp)
    if arm not in specs:
        raise ValueError(f"arm must be one of {list(specs)}, got arm={arm!r}")
    check_int("seed", seed, 0)
    spec, data = specs[arm], data if data is not None else load_data(exp)
    cfg = replace(exp.train, seed=int(seed), jacobian=replace(exp.train.jacobian, gamma=spec.gamma, p=spec.p))
    torch.manual_seed(seed)  # the initialization: the same for every arm of this seed
    model = SyntheticDEQ(exp.model, cfg.forward, cfg.backward)
    result = train(model, TensorBatches((data.x_train, data.y_train), cfg.batch_size, seed=cfg.seed), cfg,
                   run_dir=run_dir, progress=progress, identity=_identity(exp),
                   monitor=slope_monitor(data.x_valid, exp.eval), monitor_every=exp.eval.monitor_every)
    # Training moved the model to the GPU when there is one; its 200 parameters are measured and
    # plotted beside the CPU data.
    model.cpu().eval()
    eq = measure(model, data.x_valid, exp.eval)
    y = data.y_valid[:, 0]
    pred, pred_thr = data.to_y(eq.z_star), data.to_y(eq.z_threshold)
    mse = float((pred - y).pow(2).mean())
    s = eq.slope.abs()
    last_epoch = result.records[-1]["epoch"] if result.records else 0
    metrics = {
        "valid_mse": mse,
        "valid_mse_at_threshold": float((pred_thr - y).pow(2).mean()),
        "valid_r2": 1 - mse / float(y.var()),
        "slope_mean": float(eq.slope.mean()),
        "slope_abs_median": float(s.median()),
        "slope_abs_p90": quantile(s, 0.9),
        "jac_fro": float(s.pow(2).mean().sqrt()),
        "spectral_radius": float(s.max()),
        "unstable_share": float((s >= 1).double().mean()),
        "plain_nfe_median": nfe_quantile(eq.plain_nfe, 0.5),
        "plain_nfe_p90": nfe_quantile(eq.plain_nfe, 0.9),
        "plain_reached": float((eq.plain_nfe > 0).double().mean()),
        "anderson_nfe_median": nfe_quantile(eq.anderson_nfe, 0.5),
        "anderson_nfe_p90": nfe_quantile(eq.anderson_nfe, 0.9),
        "anderson_reached": float((eq.anderson_nfe > 0).double().mean()),
        "train_fwd_nfe": equilibrium_mean(result.records, "fwd_nfe"),
        "train_bwd_nfe": equilibrium_mean(result.records, "bwd_nfe"),
        "train_loss_last_epoch": equilibrium_mean([r for r in result.records if r["epoch"] == last_epoch], "loss"),
        "train_steps": float(len(result.records)),
        "step_time_s": mean_step_time(result.records),
    }
    rows = [{"x": float(xi), "z_star": float(zi), "slope": float(si), "plain_nfe": int(pi), "anderson_nfe": int(ai)}
            for xi, zi, si, pi, ai in zip(data.x_valid[:, 0].tolist(), pred.tolist(), eq.slope.tolist(),
                                          eq.plain_nfe.tolist(), eq.anderson_nfe.tolist())]
    return ArmResult(arm=arm, seed=int(seed), metrics=metrics, records=result.records,
                     curves={"per_sample": rows}, model=model)


# --- the claims of supplement A.1 and Figure 5, judged over seeds --------------------------------

FIT_FACTOR = 2.0  # "near the noise floor": the model's own error no larger than the noise
CLAIMS = {
    "fit": Claim(f"every gamma fits the target: validation MSE near the noise floor (below {FIT_FACTOR:g}x "
                 "the noise variance)", "supplement A.1; Figure 5", "less"),
    "flat": Claim("larger gamma flattens the surface around the fixed point: smaller median |f'(z*)|",
                  "Figure 5 and its caption", "less"),
    "nfe_plain": Claim("larger gamma needs fewer NFE: plain fixed-point iteration, median calls to a relative "
                       "residual of 1e-3", "Figure 5 caption (its bottom row iterates f on a slice)", "less"),
    "nfe_anderson": Claim("larger gamma needs fewer NFE: Anderson, the paper's solver, median calls to 1e-3",
                          "Figure 5 caption; supplement A.1", "less"),
    "control": Claim("the positive control flattens the surface: smaller median |f'(z*)| than gamma = 0",
                     "this notebook's control, not a claim of the paper", "less"),
}
CLAIM_METRICS = {"flat": "slope_abs_median", "nfe_plain": "plain_nfe_median", "nfe_anderson": "anderson_nfe_median",
                 "control": "slope_abs_median"}


def _values(results: Sequence[ArmResult], arm: str, metric: str) -> list[float]:
    return [r.metrics[metric] for r in by_arm(results).get(arm, [])]


def pair_tests(results: Sequence[ArmResult], exp: SyntheticExperiment, metric: str) -> list[dict[str, object]]:
    """Paired t-tests of ``metric`` between the gamma arms, by seed: each larger gamma against
    the smallest, and each against the next smaller one. One row per pair, the larger gamma's
    arm first (``difference`` is larger minus smaller)."""
    names = [n for n, s in sorted(arm_specs(exp).items(), key=lambda kv: kv[1].gamma) if not s.control]
    pairs = [(b, names[0]) for b in names[1:]] + [(b, a) for a, b in zip(names[1:], names[2:])]
    rows = []
    for a, b in pairs:
        t = compare(results, metric, a, b)
        rows.append({"pair": f"{a} vs {b}", "difference": t.diff, "se": t.se, "p": t.p, "n": t.n,
                     "direction": verdict(t.diff, t.p, "less")})
    return rows


def judge_claims(results: Sequence[ArmResult], exp: SyntheticExperiment, alpha: float = 0.05) -> dict[str, Verdict]:
    """Each claim of :data:`CLAIMS` judged on ``results`` (every arm for the same seeds).

    ``fit``: a one-sample t-test per gamma arm of its MSE against ``FIT_FACTOR`` times the noise
    variance; held when every arm holds, not held when any is significantly above. The others:
    the paired t-test over seeds of the largest gamma (the control for ``control``) against the
    smallest gamma (Figure 5 sets gamma = 0 beside 2 and 4); the smaller pairs are in
    :func:`pair_tests`."""
    specs = arm_specs(exp)
    gammas = sorted((s for s in specs.values() if not s.control), key=lambda s: s.gamma)
    low, high = gammas[0].name, gammas[-1].name
    out = {}
    floor = FIT_FACTOR * exp.data.noise_var
    fits = [judge_threshold(CLAIMS["fit"], _values(results, s.name, "valid_mse"), floor, "", alpha) for s in gammas]
    kinds = {v.verdict for v in fits}
    overall = "not held" if "not held" in kinds else ("held" if kinds == {"held"} else "inconclusive")
    evidence = "; ".join(f"{s.name}: MSE {fmt_mean_se(_values(results, s.name, 'valid_mse'))}, {v.verdict}"
                         for s, v in zip(gammas, fits))
    out["fit"] = Verdict(CLAIMS["fit"], overall, f"one-sample t per arm against {floor:g} (alpha {alpha:g}); "
                         "held only if every arm holds", evidence)
    for key, metric in CLAIM_METRICS.items():
        top = "control" if key == "control" else high
        if top not in specs or top == low:
            continue
        test = compare(results, metric, top, low)
        evidence = f"{metric}: {top} {fmt_mean_se(_values(results, top, metric))}, {low} " \
                   f"{fmt_mean_se(_values(results, low, metric))}"
        out[key] = judge(CLAIMS[key], test, evidence, alpha)
    return out
