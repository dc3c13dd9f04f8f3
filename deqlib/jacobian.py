"""Jacobian tools at the equilibrium: Frobenius-norm estimate, spectral radius, penalty policy.

All functions take the pair ``(z, fz)`` of :meth:`deqlib.deq.DEQStats.jacobian_inputs`:
``z`` a ``(B, D)`` tensor that requires grad and ``fz = f(z)`` computed from it with autograd,
so that ``J = d fz / d z`` is block-diagonal over the batch (samples are independent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_int, is_real

__all__ = ["frobenius_sq_per_dim", "spectral_radius", "JacobianPenalty"]


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws of ``like``'s dtype on its device, taken from ``generator`` on the
    generator's own device: the training loop seeds CPU generators (the same draws on every
    device and process), and ``torch.randn`` refuses a CPU generator for CUDA output."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _probes(z: Tensor, n: int, generator: torch.Generator | None) -> list[Tensor]:
    return [_randn(z.shape, z, generator) for _ in range(n)]


def frobenius_sq_per_dim(
    z: Tensor,
    fz: Tensor,
    n_probes: int = 1,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hutchinson estimate of ``||J_f(z)||_F^2 / d`` per sample.

    ``E_eps ||eps^T J||^2 = ||J||_F^2`` for ``eps ~ N(0, I_d)``; averaging ``n_probes``
    vector-Jacobian products and dividing by ``d`` gives the paper's regularizer (whose batch
    mean equals the official code's division by the total element count).

    Args:
        z: ``(B, D)`` leaf of the graph of ``fz``. fz: ``(B, D)``.
        n_probes: M, the number of Gaussian probes (>= 1).
        create_graph: keep the graph so the estimate can be a loss term.
        generator: optional RNG for the probes (deterministic runs).
    Returns:
        ``(B,)`` unbiased estimates.
    """
    if isinstance(n_probes, bool) or int(n_probes) != n_probes or n_probes < 1:
        raise ValueError(f"n_probes must be an integer >= 1, got n_probes={n_probes!r}")
    total = z.new_zeros(z.shape[0])
    for eps in _probes(z, int(n_probes), generator):
        (vjp,) = torch.autograd.grad(fz, z, eps, retain_graph=True, create_graph=create_graph)
        total = total + vjp.pow(2).flatten(1).sum(dim=1)
    return total / (n_probes * z[0].numel())


@torch.no_grad()
def spectral_radius(
    z: Tensor,
    fz: Tensor,
    n_iter: int = 150,
    n_vectors: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Largest ``|eigenvalue|`` of ``J_f(z)`` per sample, by subspace (power) iteration.

    Iterates ``V <- orth(J^T V)`` with ``n_vectors`` vector-Jacobian products per step (``J^T``
    has the eigenvalues of ``J``), then returns the largest modulus of the eigenvalues of the
    small projected matrix ``V^T J^T V`` (Rayleigh-Ritz). Two vectors capture a dominant
    complex-conjugate pair, on which one-vector power iteration oscillates.

    Args:
        z, fz: ``(B, D)`` pair as above. n_iter: iterations (the paper uses ~150).
    Returns:
        ``(B,)`` estimates.
    """
    if isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got n_iter={n_iter!r}")
    if isinstance(n_vectors, bool) or int(n_vectors) != n_vectors or n_vectors < 1:
        raise ValueError(f"n_vectors must be an integer >= 1, got n_vectors={n_vectors!r}")
    B, D = z.shape
    k = min(int(n_vectors), D)

    def jt(V: Tensor) -> Tensor:  # (B, D, k) -> J^T V, one VJP per column
        cols = [torch.autograd.grad(fz, z, V[:, :, i], retain_graph=True)[0] for i in range(k)]
        return torch.stack(cols, dim=2)

    V = _randn((B, D, k), z, generator)
    V, _ = torch.linalg.qr(V)
    for _ in range(int(n_iter)):
        V, _ = torch.linalg.qr(jt(V))
    H = V.transpose(1, 2) @ jt(V)  # (B, k, k)
    return torch.linalg.eigvals(H.double()).abs().amax(dim=1).to(z.dtype)


@dataclass(frozen=True)
class JacobianPenalty:
    """The Jacobian regularization policy of the paper.

    The loss term is ``tau * gamma(t) * mean_b ||J_b||_F^2 / d`` with ``tau ~ Bernoulli(p)``.
    ``gamma`` goes from ``gamma`` to ``gamma_end`` over training (linear in the progress
    ``t / T``; the training loop counts the steps after pretraining, when the penalty can first
    apply), e.g. 1.6 -> 2.5 for WikiText-103; ``gamma_end=None`` keeps it constant.

    Attributes:
        gamma: start weight (>= 0). gamma_end: end weight (>= 0) or None.
        p: probability of applying the term at a step, in [0, 1].
        n_probes: M, Hutchinson probes (>= 1).
    """

    gamma: float = 0.0
    gamma_end: float | None = None
    p: float = 1.0
    n_probes: int = 1

    def __post_init__(self) -> None:
        # Types first: "0.5" or True would otherwise fail a comparison with a TypeError, or pass.
        for name in ("gamma", "gamma_end"):
            value = getattr(self, name)
            if value is not None and not (is_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
        if not (is_real(self.p) and 0.0 <= self.p <= 1.0):
            raise ValueError(f"p must be in [0, 1], got p={self.p!r}")
        check_int("n_probes", self.n_probes, 1)

    @property
    def enabled(self) -> bool:
        return self.p > 0 and (self.gamma > 0 or (self.gamma_end or 0.0) > 0)

    def weight(self, step: int, total_steps: int) -> float:
        """gamma at ``step`` of ``total_steps`` (0-based)."""
        if self.gamma_end is None or total_steps <= 1:
            return float(self.gamma)
        t = min(max(step / (total_steps - 1), 0.0), 1.0)
        return float(self.gamma + (self.gamma_end - self.gamma) * t)

    def applies(self, generator: torch.Generator) -> bool:
        """Draw tau ~ Bernoulli(p) from ``generator`` (the same draw on every process)."""
        if not self.enabled:
            return False
        return bool(torch.rand((), generator=generator) < self.p)

    def loss(
        self,
        z: Tensor,
        fz: Tensor,
        step: int,
        total_steps: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(weighted term, mean ||J||_F^2/d estimate)``; call only on steps where it applies."""
        est = frobenius_sq_per_dim(z, fz, self.n_probes, create_graph=True, generator=generator).mean()
        return self.weight(step, total_steps) * est, est.detach()
