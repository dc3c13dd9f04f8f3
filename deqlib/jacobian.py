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

from .checks import check_int, check_real
from .penalty_schedule import AdaptiveGamma, AdaptiveGammaController, GammaController, ScheduledGamma

__all__ = ["frobenius_sq_per_dim", "spectral_radius", "estimate_spectral_radius", "SpectralRadius",
           "JacobianPenalty", "AdaptiveGamma"]


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws of ``like``'s dtype on its device, taken from ``generator`` on the
    generator's own device: the training loop seeds CPU generators (the same draws on every
    device and process), and ``torch.randn`` refuses a CPU generator for CUDA output."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _check_pair(z: Tensor, fz: Tensor) -> None:
    """ValueError unless ``(z, fz)`` is a square Jacobian's pair with a graph: the probes are
    shaped like ``z`` and given to ``fz``'s graph, where autograd's own errors name neither."""
    if not isinstance(z, Tensor) or z.dim() < 2:
        got = f"z of shape {tuple(z.shape)}" if isinstance(z, Tensor) else f"z={z!r}"
        raise ValueError(f"z must be a tensor of shape (B, ...), got {got}")
    if not isinstance(fz, Tensor) or fz.shape != z.shape:
        got = f"fz of shape {tuple(fz.shape)}" if isinstance(fz, Tensor) else f"fz={fz!r}"
        raise ValueError(f"fz must have z's shape {tuple(z.shape)} (f maps the state to itself), got {got}")
    if not z.requires_grad or not fz.requires_grad:
        raise ValueError("z must require grad and fz be computed from it with autograd, as "
                         "DEQStats.jacobian_inputs() gives them; got a pair without a graph")


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
        z: ``(B, D)`` leaf of the graph of ``fz`` (or ``(B, C, ...)``). fz: of ``z``'s shape.
        n_probes: M, the number of Gaussian probes (>= 1).
        create_graph: keep the graph so the estimate can be a loss term.
        generator: optional RNG for the probes (deterministic runs).
    Returns:
        ``(B,)`` unbiased estimates.
    """
    check_int("n_probes", n_probes, 1)
    _check_pair(z, fz)
    total = z.new_zeros(z.shape[0])
    for eps in _probes(z, int(n_probes), generator):
        (vjp,) = torch.autograd.grad(fz, z, eps, retain_graph=True, create_graph=create_graph)
        total = total + vjp.pow(2).flatten(1).sum(dim=1)
    return total / (n_probes * z[0].numel())


@dataclass(frozen=True)
class SpectralRadius:
    """A subspace-iteration estimate of the spectral radius of ``J_f(z)``, per sample.

    Attributes (each ``(B,)`` but ``iterations``):
        value: the largest modulus of the Ritz values.
        change: relative change of ``value`` over the last ``check_every`` iterations: how much
            the estimate still moves.
        residual: ``||J^T x - theta x|| / (|theta| ||x||)`` of the dominant Ritz pair
            ``(theta, x)``: 0 when ``x`` is an exact eigenvector.
        converged: ``change`` stayed below the tolerance at two checks in a row.
        iterations: subspace iterations run (each ``n_vectors`` vector-Jacobian products).
    """

    value: Tensor
    change: Tensor
    residual: Tensor
    converged: Tensor
    iterations: int

    @property
    def error(self) -> Tensor:
        """``(B,)`` a rough absolute error bound: ``value * max(change, residual)``. For a
        normal ``J`` the residual bounds the distance to an eigenvalue; for a non-normal one
        it is a backward error, and ``change`` the better guide."""
        return self.value * torch.maximum(self.change, self.residual)


@torch.no_grad()
def estimate_spectral_radius(
    z: Tensor,
    fz: Tensor,
    n_iter: int = 300,
    n_vectors: int = 8,
    tol: float = 1e-4,
    check_every: int = 10,
    generator: torch.Generator | None = None,
) -> SpectralRadius:
    """Largest ``|eigenvalue|`` of ``J_f(z)`` per sample, by subspace iteration with a
    convergence test and an error estimate.

    Iterates ``V <- orth(J^T V)`` with ``n_vectors`` vector-Jacobian products per step (``J^T``
    has the eigenvalues of ``J``); every ``check_every`` steps the eigenvalues of the projected
    ``V^T J^T V`` (Rayleigh-Ritz) give the estimate. It stops when every sample's estimate moved
    by less than ``tol`` (relative) at two checks in a row, or after ``n_iter`` steps.

    Why 8 vectors: the block converges at the rate ``|lambda_{k+1} / lambda_1|``, so ``k`` must
    exceed the number of eigenvalues whose moduli are close to the largest. Two vectors (one
    complex pair) read 0.72 for an exact 1.058 on a small MDEQ map and were 54-75% off on
    linear maps with three or four equal moduli; eight were within 1e-6 there.

    Args:
        z, fz: ``(B, D)``, ``z`` a leaf of the graph of ``fz`` (``(B, C, ...)`` states are
            taken flattened).
        n_iter: the most iterations (the paper's power method uses ~150).
        n_vectors: block size ``k`` (clamped to ``D``).
        tol: relative change below which the estimate counts as converged.
        check_every: iterations between two Rayleigh-Ritz checks.
        generator: RNG of the starting block.
    """
    check_int("n_iter", n_iter, 1)
    check_int("n_vectors", n_vectors, 1)
    check_int("check_every", check_every, 1)
    check_real("tol", tol, minimum=0, min_open=True)
    _check_pair(z, fz)
    B, D = z.shape[0], z[0].numel()  # a state (B, C, ...) is worked on flattened
    k = min(int(n_vectors), D)

    def jt(V: Tensor) -> Tensor:  # (B, D, k) -> J^T V, one VJP per column
        cols = [torch.autograd.grad(fz, z, V[:, :, i].reshape(z.shape), retain_graph=True)[0].reshape(B, D)
                for i in range(k)]
        return torch.stack(cols, dim=2)

    V, _ = torch.linalg.qr(_randn((B, D, k), z, generator))
    nan = torch.full((B,), math.nan, dtype=torch.float64, device=z.device)
    value, change, residual, prev = nan, nan.clone(), nan.clone(), None
    stable = torch.zeros(B, dtype=torch.long, device=z.device)
    it = 0
    for it in range(1, int(n_iter) + 1):
        W = jt(V)
        if it % check_every == 0 or it == n_iter:
            Vd, Wd = V.double(), W.double()
            evals, evecs = torch.linalg.eig(Vd.transpose(1, 2) @ Wd)  # (B, k), (B, k, k)
            top = evals.abs().argmax(dim=1)
            theta = evals.gather(1, top[:, None]).squeeze(1)
            y = evecs.gather(2, top[:, None, None].expand(B, k, 1))  # (B, k, 1)
            x, jx = Vd.to(y.dtype) @ y, Wd.to(y.dtype) @ y  # Ritz vector and J^T x, (B, D, 1)
            value = theta.abs()
            scale = value.clamp_min(1e-300) * torch.linalg.vector_norm(x, dim=(1, 2)).clamp_min(1e-300)
            residual = torch.linalg.vector_norm(jx - theta[:, None, None] * x, dim=(1, 2)) / scale
            if prev is not None:
                change = (value - prev).abs() / value.clamp_min(1e-300)
                stable = torch.where(change <= tol, stable + 1, torch.zeros_like(stable))
            prev = value
            # Meta tensors (shape-only runs) have no values to test; elsewhere this is one
            # host transfer per check.
            if z.device.type != "meta" and bool((stable >= 2).all()):
                break
        V, _ = torch.linalg.qr(W)
    return SpectralRadius(value=value.to(z.dtype), change=change.to(z.dtype), residual=residual.to(z.dtype),
                          converged=stable >= 2, iterations=it)


def spectral_radius(
    z: Tensor,
    fz: Tensor,
    n_iter: int = 300,
    n_vectors: int = 8,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(B,)`` spectral radius of ``J_f(z)``: :func:`estimate_spectral_radius`'s value."""
    return estimate_spectral_radius(z, fz, n_iter=n_iter, n_vectors=n_vectors, tol=tol, generator=generator).value


@dataclass(frozen=True)
class JacobianPenalty:
    """The Jacobian regularization policy of the paper.

    The loss term is ``tau * gamma(t) * mean_b ||J_b||_F^2 / d`` with ``tau ~ Bernoulli(p)``.
    ``gamma`` goes from ``gamma`` to ``gamma_end`` over training (linear in the progress
    ``t / T``; the training loop counts the steps after pretraining, when the penalty can first
    apply), e.g. 1.6 -> 2.5 for WikiText-103; ``gamma_end=None`` keeps it constant. With
    ``adaptive`` set, gamma starts at ``gamma`` and follows what the run measures instead
    (:class:`deqlib.penalty_schedule.AdaptiveGamma`); the loop then takes each step's weight from
    :meth:`controller`, which serves the fixed schedule too.

    Attributes:
        gamma: start weight (>= 0; within the adaptive bounds when adaptive is set).
        gamma_end: end weight (>= 0) or None; None when adaptive is set.
        p: probability of applying the term at a step, in [0, 1].
        n_probes: M, Hutchinson probes (>= 1).
        adaptive: an adaptive gamma policy, or None for the fixed schedule.
        stop_epoch: no penalty from this epoch on (0-based, counted from the start of
            training, pretraining included: the official code's ``JAC_STOP_EPOCH``, which keeps
            the term from dominating a task loss near 0 late in training); None: never stops.
    """

    gamma: float = 0.0
    gamma_end: float | None = None
    p: float = 1.0
    n_probes: int = 1
    adaptive: AdaptiveGamma | None = None
    stop_epoch: int | None = None

    def __post_init__(self) -> None:
        check_real("gamma", self.gamma, minimum=0)
        check_real("gamma_end", self.gamma_end, minimum=0, optional=True)
        check_real("p", self.p, minimum=0, maximum=1)
        check_int("n_probes", self.n_probes, 1)
        check_int("stop_epoch", self.stop_epoch, 1, optional=True)
        a = self.adaptive
        if a is None:
            return
        if not isinstance(a, AdaptiveGamma):
            raise ValueError(f"adaptive must be an AdaptiveGamma section or null, got adaptive={a!r}")
        if self.gamma_end is not None:
            raise ValueError(f"gamma_end must be null when adaptive is set (gamma follows the "
                             f"measurement, not the clock), got gamma_end={self.gamma_end!r}")
        if not a.gamma_min <= self.gamma <= a.gamma_max:
            raise ValueError(f"gamma must be in [adaptive.gamma_min, adaptive.gamma_max] = [{a.gamma_min}, "
                             f"{a.gamma_max}] when adaptive is set (it is the start), got gamma={self.gamma!r}")

    @property
    def enabled(self) -> bool:
        return self.p > 0 and (self.gamma > 0 or (self.gamma_end or 0.0) > 0)

    def weight(self, step: int, total_steps: int) -> float:
        """gamma at ``step`` of ``total_steps`` (0-based); with ``adaptive`` set, the start
        (the current gamma is the state of :meth:`controller`'s controller)."""
        if self.gamma_end is None or total_steps <= 1:
            return float(self.gamma)
        t = min(max(step / (total_steps - 1), 0.0), 1.0)
        return float(self.gamma + (self.gamma_end - self.gamma) * t)

    def controller(self) -> GammaController:
        """A fresh controller of this policy, the loop's one source of the weight: stateless
        for the fixed schedule, the adaptive policy's state (starting at ``gamma``) otherwise."""
        if self.adaptive is None:
            return ScheduledGamma(self.weight)
        return AdaptiveGammaController(self.adaptive, self.gamma)

    def applies(self, generator: torch.Generator, epoch: int | None = None) -> bool:
        """Draw tau ~ Bernoulli(p) from ``generator`` (the same draw on every process); False
        without a draw when the penalty is off or ``epoch`` is at or past ``stop_epoch``."""
        if not self.enabled or (self.stop_epoch is not None and epoch is not None and epoch >= self.stop_epoch):
            return False
        return bool(torch.rand((), generator=generator) < self.p)

    def loss(
        self,
        z: Tensor,
        fz: Tensor,
        step: int,
        total_steps: int,
        generator: torch.Generator | None = None,
        weight: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(weighted term, mean ||J||_F^2/d estimate)``; call only on steps where it applies.

        ``weight``: gamma of this step, from :meth:`controller` (None: the fixed schedule's
        :meth:`weight`). Required with ``adaptive`` set: the policy's gamma is run state that
        this frozen configuration does not hold, and the start gamma in its place would silently
        train a fixed-gamma run."""
        check_real("weight", weight, minimum=0, optional=True)
        if weight is None and self.adaptive is not None:
            raise ValueError("weight must be given when adaptive is set (the controller's current gamma: "
                             "controller().weight(step, total_steps)), got weight=None")
        est = frobenius_sq_per_dim(z, fz, self.n_probes, create_graph=True, generator=generator).mean()
        w = self.weight(step, total_steps) if weight is None else float(weight)
        return w * est, est.detach()
