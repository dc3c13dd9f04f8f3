"""The 1D synthetic regression set of the supplement (A.1, Figure 9).

``y = 1.5 x^3 + x^2 + 5 x + 2 sin(x) - 3 + delta`` (the supplement's sign of the ``5x`` term;
the main text prints ``-5x``). The paper writes ``delta ~ N(0, 0.05)`` without saying whether
0.05 is the variance or the standard deviation, nor the range of ``x``: we read 0.05 as the
**variance** (the usual meaning of ``N(mu, sigma^2)``; std ~0.224) and draw ``x`` uniformly
on ``[x_min, x_max]`` (default ``[-2, 2]``). Both are parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int, check_real

__all__ = ["SyntheticConfig", "target_function", "make_synthetic"]


def target_function(x: Tensor) -> Tensor:
    """Noise-free target ``h(x)``, elementwise."""
    return 1.5 * x**3 + x**2 + 5 * x + 2 * torch.sin(x) - 3


@dataclass(frozen=True)
class SyntheticConfig:
    n_train: int = 4096
    n_valid: int = 1000
    noise_var: float = 0.05
    x_min: float = -2.0
    x_max: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_train", "n_valid"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        check_real("noise_var", self.noise_var, minimum=0)
        check_real("x_min", self.x_min)
        check_real("x_max", self.x_max)
        if not self.x_min < self.x_max:
            raise ValueError(f"need x_min < x_max, got x_min={self.x_min!r}, x_max={self.x_max!r}")


def make_synthetic(cfg: SyntheticConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Seeded ``((x_train, y_train), (x_valid, y_valid))``, each ``(N, 1)`` float32."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_valid
    x = cfg.x_min + (cfg.x_max - cfg.x_min) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    y = target_function(x) + math.sqrt(cfg.noise_var) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x, y = x.float(), y.float()
    return (x[: cfg.n_train], y[: cfg.n_train]), (x[cfg.n_train:], y[cfg.n_train:])
