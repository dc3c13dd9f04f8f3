"""What a model gives the training loop for one step, and the Jacobian penalty added to it.

The contract between models and the loop lives here, below both: a model's
``forward(batch, pretrain=bool)`` returns a :class:`StepOutput`; the loop (and the benchmarks,
which time the same step) add the penalty with :func:`add_penalty`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .deq import DEQStats
from .jacobian import JacobianPenalty

__all__ = ["StepOutput", "add_penalty"]


@dataclass
class StepOutput:
    """What ``model(batch, pretrain=...)`` returns to the loop: the task loss (0-d), the
    statistics of the equilibrium solve (None while pretraining an explicit stack), and any
    extra scalars to log."""

    loss: Tensor
    stats: DEQStats | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def add_penalty(out: StepOutput, penalty: JacobianPenalty, step: int = 0, total: int = 1,
                generator: torch.Generator | None = None, weight: float | None = None) -> tuple[Tensor, Tensor]:
    """``(task loss + gamma * ||J||_F^2 / d estimate, the estimate)`` for a step the penalty was
    drawn on (the caller draws tau). The estimate is taken at the equilibrium of the step's
    solve, from its differentiable pair ``(z*, f(z*))``: no extra call of ``f``. ``weight``:
    gamma of this step from the policy's controller (None: the fixed schedule at ``step`` of
    ``total``)."""
    if out.stats is None:
        raise ValueError("the penalty needs an equilibrium solve; this step has none (pretraining?)")
    z_star, f_star = out.stats.jacobian_inputs()
    term, estimate = penalty.loss(z_star, f_star, step, total, generator, weight=weight)
    return out.loss + term, estimate
