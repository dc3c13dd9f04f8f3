"""Gamma policies of the Jacobian penalty as controllers: the fixed ``A -> B`` schedule, and an
adaptive one that holds a measured quantity at a target.

Why an adaptive policy: under Jacobian regularization at a fixed gamma, ``||J_f||_F`` still
creeps up over training (the paper's "critical stability"), which the paper says calls for
adaptive gamma scheduling and leaves open; its release code raises gamma by a hand-set +0.1
every N steps instead. :class:`AdaptiveGamma` closes that loop: it reads, after each step, a
quantity the training loop measures anyway and moves gamma to hold it at a target.

Both policies answer to the same calls (:class:`GammaController`), so the loop has one way to
get the weight whichever is configured: ``JacobianPenalty.controller()`` gives the controller,
``weight(step, total)`` the gamma of a step, ``update(measured)`` feeds it the step's
measurement (a no-op for the fixed schedule), and ``state_dict()`` / ``load_state_dict()`` carry
it through a checkpoint as plain values (``torch.load(weights_only=True)`` reads them back).

This module imports nothing of deqlib but :mod:`deqlib.checks`, so that
:mod:`deqlib.jacobian` can hold an :class:`AdaptiveGamma` as a field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .checks import check_choice, check_int, check_mapping, check_real, is_real

__all__ = ["MEASURES", "AdaptiveGamma", "AdaptiveGammaController", "GammaController", "ScheduledGamma"]

# The per-step record keys of the training loop an adaptive policy can hold at a target. Each
# falls as gamma rises (a flatter map has a smaller Jacobian, converges in fewer calls of f and
# to a smaller residual at a fixed NFE threshold), which fixes the sign of the update rule.
MEASURES = ("jac_fro", "fwd_nfe", "fwd_rel_res")


@dataclass(frozen=True)
class AdaptiveGamma:
    """An adaptive gamma: hold ``measure`` at ``target`` by moving gamma on the log scale.

    The rule, applied on each finite measurement ``m`` (NaN, infinite or negative ones are
    skipped: the loop's ``jac_fro`` is NaN on the steps the penalty was not drawn, every measure
    is NaN while pretraining)::

        s     <- m                          (first measurement)
        s     <- s + smoothing * (m - s)    (after)
        e      = clip(s / target - 1, -1, 1)
        gamma <- clip(gamma * exp(gain * e), gamma_min, gamma_max)

    Why this rule: ``log gamma`` integrates the relative error, so gamma keeps moving until the
    smoothed measurement sits at the target, also while training pushes it away (the creep a
    fixed gamma leaves). On the log scale a step is a ratio, the same whatever gamma's size, and
    gamma stays positive. Capping the error at 1 bounds one step to a factor ``exp(gain)``: a
    diverged solve's huge residual moves gamma no more than a measurement at twice the target.
    The exponential moving average tames the one-probe Hutchinson estimate (relative standard
    error about ``sqrt(2 / batch)``). Near the target the loop contracts the error in log gamma
    by ``1 - gain * k`` per update, ``k = -d log m / d log gamma`` (``gamma / (1 + gamma)`` for
    ``m = c / (1 + gamma)``): stable for ``gain * k < 2``, hence ``gain <= 1``.

    Attributes:
        target: the value to hold the measurement at (> 0, required); below the NFE threshold
            for ``fwd_nfe``, which cannot exceed it.
        measure: which of the loop's per-step records: ``jac_fro`` (``sqrt(||J||_F^2 / d)``, the
            penalty's own estimate, on penalized steps only), ``fwd_nfe`` (calls of f in the
            forward solve) or ``fwd_rel_res`` (its final relative residual).
        gain: log-gamma change per update at a relative error of 1, in (0, 1]. Keep it slow
            against how fast training answers a change of gamma (many steps).
        smoothing: weight of a new measurement in the moving average, in (0, 1] (1: none).
        gamma_min, gamma_max: bounds of gamma, ``0 < gamma_min <= gamma_max`` (a log-scale
            rule cannot leave 0). JacobianPenalty's ``gamma`` is the start and must lie within.
    """

    target: float | None = None  # required: None only so that a section without it is named
    measure: str = "jac_fro"
    gain: float = 0.05
    smoothing: float = 0.1
    gamma_min: float = 0.01
    gamma_max: float = 10.0

    def __post_init__(self) -> None:
        check_choice("measure", self.measure, MEASURES)
        check_real("gain", self.gain, minimum=0, maximum=1, min_open=True)
        check_real("smoothing", self.smoothing, minimum=0, maximum=1, min_open=True)
        check_real("gamma_min", self.gamma_min, minimum=0, min_open=True)
        check_real("gamma_max", self.gamma_max, minimum=self.gamma_min)
        # Last, so that a bad other key in a section that also lacks its target is named first.
        check_real("target", self.target, minimum=0, min_open=True)


class GammaController(Protocol):
    """What the training loop calls, whichever gamma policy is configured.

    ``measure``: the loop's record key to feed :meth:`update` (None: nothing to feed).
    """

    measure: str | None

    def weight(self, step: int, total_steps: int) -> float: ...

    def update(self, measured: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class ScheduledGamma:
    """The fixed schedule as a controller: gamma is a function of the step alone, so there is
    nothing to update or to checkpoint."""

    measure: str | None = None

    def __init__(self, schedule: Callable[[int, int], float]) -> None:
        self._schedule = schedule

    def weight(self, step: int, total_steps: int) -> float:
        """gamma at ``step`` of ``total_steps`` (0-based), from the schedule."""
        return float(self._schedule(step, total_steps))

    def update(self, measured: float) -> None:
        """Nothing: a fixed schedule does not listen."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Accepts only the empty state: anything else was saved by another policy."""
        check_mapping("state", state)
        if state:
            raise ValueError(f"state must be empty for a fixed gamma schedule (saved by an adaptive one?), "
                             f"got state={dict(state)!r}")


class AdaptiveGammaController:
    """The state of an :class:`AdaptiveGamma` policy in a run: the current gamma, the smoothed
    measurement (None before the first) and the number of updates. Plain Python floats, so a
    run resumed from :meth:`state_dict` continues with bit-identical gammas."""

    def __init__(self, config: AdaptiveGamma, gamma: float) -> None:
        if not isinstance(config, AdaptiveGamma):
            raise ValueError(f"config must be an AdaptiveGamma, got config={config!r}")
        check_real("gamma", gamma, minimum=config.gamma_min, maximum=config.gamma_max)
        self.config = config
        self.measure: str | None = config.measure
        self.gamma = float(gamma)
        self.smoothed: float | None = None
        self.n_updates = 0

    def weight(self, step: int | None = None, total_steps: int | None = None) -> float:
        """The current gamma; ``step`` and ``total_steps`` are taken for the loop's one call
        shape and not used: the state, not the clock, sets gamma."""
        return self.gamma

    def update(self, measured: float) -> None:
        """Feed one step's measurement (the rule is :class:`AdaptiveGamma`'s). NaN, infinite and
        negative values are skipped: no measurement (a step without the penalty, pretraining) or
        none of a norm, a count or a residual. A non-number is a caller's error."""
        if not is_real(measured):
            raise ValueError(f"measured must be a real number, got measured={measured!r}")
        m = float(measured)
        if not math.isfinite(m) or m < 0:
            return
        cfg = self.config
        s = m if self.smoothed is None else self.smoothed + cfg.smoothing * (m - self.smoothed)
        err = min(max(s / cfg.target - 1.0, -1.0), 1.0)
        self.gamma = min(max(self.gamma * math.exp(cfg.gain * err), cfg.gamma_min), cfg.gamma_max)
        self.smoothed = s
        self.n_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"gamma": float, "smoothed": float | None, "n_updates": int}``."""
        return {"gamma": self.gamma, "smoothed": self.smoothed, "n_updates": self.n_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values, each checked by name (a checkpoint of other
        bounds, or a hand-edited one, is refused rather than run on)."""
        check_mapping("state", state)
        keys = {"gamma", "smoothed", "n_updates"}
        if set(state) != keys:
            raise ValueError(f"state must have the keys {sorted(keys)}, got state keys={sorted(map(str, state))}")
        cfg = self.config
        check_real("gamma", state["gamma"], minimum=cfg.gamma_min, maximum=cfg.gamma_max)
        check_real("smoothed", state["smoothed"], minimum=0, optional=True)
        check_int("n_updates", state["n_updates"], 0)
        if (state["smoothed"] is None) != (state["n_updates"] == 0):
            raise ValueError(f"smoothed must be null exactly when n_updates is 0, got "
                             f"smoothed={state['smoothed']!r} with n_updates={state['n_updates']!r}")
        self.gamma = float(state["gamma"])
        self.smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        self.n_updates = int(state["n_updates"])
