"""The 200-parameter DEQ of the synthetic experiment: ``f(z; x) = W2^T ReLU(W1 z + U x + b)``.

``z`` and ``x`` are scalars (shape ``(B, 1)``), hidden width 50: ``W1, U, b, W2`` hold 50
numbers each. The prediction is the equilibrium ``z*(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_int, check_real
from ..deq import DEQ, SolverSettings
from ..step import StepOutput

__all__ = ["SyntheticModelConfig", "SyntheticDEQ"]


@dataclass(frozen=True)
class SyntheticModelConfig:
    hidden: int = 50
    init_std: float = 0.01  # the paper's N(0, 0.01); read as a standard deviation

    def __post_init__(self) -> None:
        check_int("hidden", self.hidden, 1)
        check_real("init_std", self.init_std, minimum=0, min_open=True)


class SyntheticMap(nn.Module):
    """``f(z, x)`` with ``z, x: (B, 1)``."""

    def __init__(self, cfg: SyntheticModelConfig):
        super().__init__()
        h = cfg.hidden
        self.W1 = nn.Parameter(torch.randn(h, 1) * cfg.init_std)
        self.U = nn.Parameter(torch.randn(h, 1) * cfg.init_std)
        self.b = nn.Parameter(torch.randn(h) * cfg.init_std)
        self.W2 = nn.Parameter(torch.randn(h, 1) * cfg.init_std)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.relu(z @ self.W1.T + x @ self.U.T + self.b) @ self.W2


class SyntheticDEQ(nn.Module):
    """Regression by the equilibrium of :class:`SyntheticMap`; loss is the MSE."""

    def __init__(self, cfg: SyntheticModelConfig, forward: SolverSettings, backward: SolverSettings):
        super().__init__()
        self.f = SyntheticMap(cfg)
        self.deq = DEQ(self.f, forward_solver=forward, backward_solver=backward)

    def predict(self, x: Tensor, solver: SolverSettings | None = None):
        """``(z*(x), DEQStats)`` with ``x, z*: (B, 1)``."""
        return self.deq(x, torch.zeros_like(x), forward_solver=solver)

    def forward(self, batch: tuple[Tensor, Tensor], pretrain: bool = False) -> StepOutput:
        x, y = batch
        if pretrain:  # weight-tied explicit stack: the forward threshold's worth of unrolled steps
            z = torch.zeros_like(x)
            for _ in range(self.deq.forward_solver.max_iter):
                z = self.f(z, x)
            return StepOutput(loss=nn.functional.mse_loss(z, y))
        z, stats = self.predict(x)
        return StepOutput(loss=nn.functional.mse_loss(z, y), stats=stats)
