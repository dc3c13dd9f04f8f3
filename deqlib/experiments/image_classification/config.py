"""The configuration every image-classification experiment shares: its arms, its seeds and how
a trained model is measured; the data section is each experiment's own (CIFAR-10, ImageNet).

Arms (:func:`arm_specs`): one equilibrium model (MDEQ) per Jacobian weight of ``arms.gammas``,
all with the penalty policy ``train.jacobian`` but its weight: gamma 0 is the unregularized
``MDEQ``, ``train.jacobian.gamma`` is ``MDEQ + JR`` (Table 2's regularized row), every other
gamma a ``JR gamma=<g>`` arm of the sweep (Table 3); a schedule ``gamma -> gamma_end`` is scaled
to each arm's gamma. Optionally the explicit baseline: the same network's map ``f`` unrolled
``arms.explicit_depth`` times with tied weights, trained by plain backpropagation (the official
code's pretraining mode, for the whole run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ...checks import check_choice, check_int, check_int_list, check_real, check_real_list
from ...solvers import METHODS
from ...train import TrainConfig

__all__ = ["ArmsConfig", "ClassificationEvalConfig", "ArmSpec", "arm_specs", "arm_train_config",
           "check_experiment", "MDEQ_ARM", "JR_ARM", "EXPLICIT_ARM"]

MDEQ_ARM = "MDEQ"
JR_ARM = "MDEQ + JR"
EXPLICIT_ARM = "explicit"


@dataclass(frozen=True)
class ArmsConfig:
    """Which arms run.

    Attributes:
        gammas: one equilibrium arm per Jacobian weight (distinct, >= 0, with 0, the
            unregularized MDEQ every claim is measured against, and ``train.jacobian.gamma``,
            the MDEQ + JR arm, among them).
        explicit_depth: layers of the explicit weight-tied stack (None: no explicit arm).
        explicit_steps: its training steps (None: as many as the equilibrium arms); chosen so
            that it trains for about their wall time.
    """

    gammas: tuple[float, ...] = (0.0, 0.5)
    explicit_depth: int | None = None
    explicit_steps: int | None = None

    def __post_init__(self) -> None:
        check_real_list("gammas", self.gammas, minimum=0)
        if len(set(self.gammas)) != len(self.gammas) or 0 not in self.gammas:
            raise ValueError(f"gammas must be distinct and include 0 (the unregularized MDEQ), got "
                             f"gammas={list(self.gammas)!r}")
        check_int("explicit_depth", self.explicit_depth, 1, optional=True)
        check_int("explicit_steps", self.explicit_steps, 1, optional=True)


@dataclass(frozen=True)
class ClassificationEvalConfig:
    """How every trained model is measured.

    Attributes:
        batch_size: test images per solve.
        nfe: the NFE caps ``k`` at which test accuracy is reported (Table 3: 1..6).
        compare_nfe: the low cap at which the claims compare the arms (Table 2: 6); one of ``nfe``.
        tol: the relative residual each test image is solved to; nfe_cap: the most calls of
            ``method`` for that solve; plain_cap: the most calls of plain fixed-point iteration
            (counted to ``tol`` too: its count follows the contraction factor of ``f``).
        margin_points: how many accuracy points "close to" allows (JR at ``compare_nfe`` against
            the unregularized MDEQ solved to ``tol``).
        jac_batch: the fixed evaluation batch (the first test images) on which ``||J_f||_F``
            and the spectral radius are measured, at the start, every ``monitor_every`` steps
            (0: only at the end) and at the end; jac_probes: Hutchinson probes;
            radius_iters, radius_vectors: the subspace iteration's most steps and block size.
        monitor_radius: measure the spectral radius at every monitor step too (else only at the
            start and the end: it costs ``radius_vectors`` products per iteration).
        memory_batch: images of the training step whose peak memory is measured.
    """

    batch_size: int = 500
    nfe: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    compare_nfe: int = 6
    tol: float = 1e-3
    nfe_cap: int = 40
    method: str = "anderson"
    plain_cap: int = 60
    margin_points: float = 1.0
    jac_batch: int = 32
    jac_probes: int = 4
    radius_iters: int = 150
    radius_vectors: int = 8
    monitor_every: int = 0
    monitor_radius: bool = False
    memory_batch: int = 32

    def __post_init__(self) -> None:
        for name in ("batch_size", "nfe_cap", "plain_cap", "jac_batch", "jac_probes", "radius_iters",
                     "radius_vectors", "memory_batch"):
            check_int(name, getattr(self, name), 1)
        check_int("monitor_every", self.monitor_every, 0)
        check_int_list("nfe", self.nfe, 1)
        check_int("compare_nfe", self.compare_nfe, 1)  # before the membership test: 2.0 is "in" (1, 2)
        if self.compare_nfe not in self.nfe:
            raise ValueError(f"compare_nfe must be one of nfe={list(self.nfe)!r}, got compare_nfe={self.compare_nfe!r}")
        check_real("tol", self.tol, minimum=0, maximum=1, min_open=True, max_open=True)
        check_choice("method", self.method, METHODS)
        check_real("margin_points", self.margin_points, minimum=0)
        if not isinstance(self.monitor_radius, bool):
            raise ValueError(f"monitor_radius must be true or false, got monitor_radius={self.monitor_radius!r}")


@dataclass(frozen=True)
class ArmSpec:
    """One arm: its name, its Jacobian weight (0 for the explicit stack), and the depth of the
    explicit stack (None for an equilibrium arm)."""

    name: str
    gamma: float
    explicit_depth: int | None = None

    @property
    def explicit(self) -> bool:
        return self.explicit_depth is not None


def _name(gamma: float, jr_gamma: float) -> str:
    if gamma == 0:
        return MDEQ_ARM
    return JR_ARM if gamma == jr_gamma else f"JR gamma={gamma:g}"


def arm_specs(exp: Any) -> dict[str, ArmSpec]:
    """The arms of ``exp`` by name, in order: the equilibrium arms by increasing gamma (``MDEQ``
    first), then ``explicit``."""
    jr = exp.train.jacobian.gamma
    specs = {_name(g, jr): ArmSpec(_name(g, jr), float(g)) for g in sorted(exp.arms.gammas)}
    if exp.arms.explicit_depth is not None:
        specs[EXPLICIT_ARM] = ArmSpec(EXPLICIT_ARM, 0.0, exp.arms.explicit_depth)
    return specs


def arm_train_config(exp: Any, spec: ArmSpec, seed: int, steps_per_epoch: int) -> TrainConfig:
    """The training settings of one arm and seed: ``exp.train`` with the seed and the arm's
    gamma (a schedule scaled by ``gamma / train.jacobian.gamma``); for the explicit stack, no
    penalty and every step a pretraining step (the stack of ``explicit_depth`` layers), for
    ``arms.explicit_steps`` steps when set."""
    jac = exp.train.jacobian
    end = None if jac.gamma_end is None else jac.gamma_end * spec.gamma / jac.gamma
    cfg = replace(exp.train, seed=int(seed), jacobian=replace(jac, gamma=spec.gamma, gamma_end=end))
    if not spec.explicit:
        return cfg
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    steps = exp.arms.explicit_steps or total
    return replace(cfg, epochs=max(1, math.ceil(steps / steps_per_epoch)), max_steps=steps, pretrain_steps=steps)


def check_experiment(exp: Any) -> None:
    """The checks every image-classification experiment config makes on its sections together.

    ``seeds``: distinct, >= 0, at least one. ``train.jacobian.gamma`` (the MDEQ + JR arm's
    weight) > 0 and one of ``arms.gammas``, no adaptive policy (each arm's weight comes from
    ``arms.gammas``). ``train.seed`` stays 0: each run's seed comes from ``seeds``, so a value
    set there would be silently replaced.
    """
    check_int_list("seeds", exp.seeds, 0)
    if len(set(exp.seeds)) != len(exp.seeds):
        raise ValueError(f"seeds must be distinct (one run each), got seeds={list(exp.seeds)!r}")
    jac = exp.train.jacobian
    if not jac.gamma > 0 or jac.gamma not in exp.arms.gammas:
        raise ValueError(f"train.jacobian.gamma (the MDEQ + JR arm's weight) must be > 0 and one of "
                         f"arms.gammas={list(exp.arms.gammas)!r}, got train.jacobian.gamma={jac.gamma!r}")
    if jac.adaptive is not None:
        raise ValueError("train.jacobian.adaptive must be null (each arm's weight comes from arms.gammas), "
                         f"got train.jacobian.adaptive={jac.adaptive!r}")
    if exp.train.seed != 0:
        raise ValueError(f"train.seed must be 0 (each run's training seed comes from seeds), "
                         f"got train.seed={exp.train.seed!r}")
    if exp.eval.nfe_cap < max(exp.eval.nfe):
        raise ValueError(f"eval.nfe_cap must be >= max(eval.nfe)={max(exp.eval.nfe)} (the solve to tol is the "
                         f"reference the caps are read against), got eval.nfe_cap={exp.eval.nfe_cap!r}")
