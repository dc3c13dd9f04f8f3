"""Shared fixtures: small seeded maps with known fixed points."""

import pytest
import torch


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
