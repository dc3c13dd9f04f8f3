"""The training settings of Table 4's rows: optimization, solver thresholds, the Jacobian
penalty."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import check_choice, check_int, check_real
from ..deq import SolverSettings
from ..jacobian import JacobianPenalty

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES", "PRECISIONS"]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization, solver thresholds and the Jacobian penalty (Table 4's rows).

    ``max_steps`` caps the run below ``epochs`` (a step-limit override for smoke runs).
    ``forward`` / ``backward`` are the solver settings (``max_iter`` is the NFE threshold).
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    pretrain_steps: int = 0
    seed: int = 0
    mixed_precision: str = "no"
    checkpoint_every: int = 0
    forward: SolverSettings = field(default_factory=lambda: SolverSettings(max_iter=30, tol=1e-3))
    backward: SolverSettings = field(default_factory=lambda: SolverSettings(max_iter=30, tol=1e-4))
    jacobian: JacobianPenalty = field(default_factory=JacobianPenalty)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "pretrain_steps", "seed", "checkpoint_every"):
            check_int(name, getattr(self, name), 0)
        check_int("max_steps", self.max_steps, 1, optional=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_real("lr", self.lr, minimum=0, min_open=True)
        check_real("weight_decay", self.weight_decay, minimum=0)
        check_real("momentum", self.momentum, minimum=0, maximum=1, max_open=True)
        check_real("grad_clip", self.grad_clip, minimum=0, min_open=True, optional=True)  # null: no clipping
