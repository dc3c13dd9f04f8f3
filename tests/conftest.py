"""Shared fixtures: small seeded maps with known fixed points; the data-slice check."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def skip_without_slice(root: str) -> None:
    """Skip a test that reads the real data slice at ``root`` (relative to the repository, as
    ``params.yaml`` writes it) when it is not there, naming the path.

    The slices live beside the checkout in ``../shared/data`` (README, "Data"); a clone made
    anywhere else has none, and there is no network to fetch them. ``""`` (meaning
    ``$DEQLIB_DATA``) is not a slice and never skips.
    """
    if root and not (ROOT / root).is_dir():
        pytest.skip(f"needs the data slice {root} (relative to the repository), which is not here")


def linear_map(dim: int, rho: float, batch: int = 4, seed: int = 0, dtype=torch.float64):
    """f(z) = z W^T + x with spectral radius ``rho``; returns (f, x, exact fixed point)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=dtype)
    W = W * (rho / torch.linalg.eigvals(W).abs().max())
    x = torch.randn(batch, dim, generator=g, dtype=dtype)
    # z = z W^T + x  <=>  z (I - W^T) = x  <=>  (I - W) z^T = x^T
    exact = torch.linalg.solve(torch.eye(dim, dtype=dtype) - W, x.T).T
    return (lambda z: z @ W.T + x), x, exact


@pytest.fixture
def contractive_linear():
    return linear_map(40, 0.8)


@pytest.fixture
def slow_linear():
    return linear_map(60, 0.97, seed=1)
