"""Jacobian estimators against exact values, and the penalty policy."""

import math

import pytest
import torch

from deqlib import DEQ, SolverSettings
from deqlib.jacobian import JacobianPenalty, estimate_spectral_radius, frobenius_sq_per_dim, spectral_radius


def _pair(seed=0, batch=3, dim=16, scale=0.9):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=torch.float64) * scale / math.sqrt(dim)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    def f(z):
        return torch.tanh(z @ W.T + x)
    z = torch.randn(batch, dim, generator=g, dtype=torch.float64).requires_grad_()
    exact = torch.stack([torch.autograd.functional.jacobian(
        lambda v, b=b: torch.tanh(v @ W.T + x[b]), z[b].detach()) for b in range(batch)])  # (B, D, D)
    return z, f(z), exact


def test_hutchinson_mean_within_three_standard_errors():
    z, fz, J = _pair()
    d = z.shape[1]
    exact = J.pow(2).sum(dim=(1, 2)) / d  # (B,)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([frobenius_sq_per_dim(z, fz, 1, create_graph=False, generator=g)
                         for _ in range(2000)])  # (N, B)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((mean - exact).abs() <= 3 * se).all()), (mean, exact, se)
    assert bool((se < 0.05 * exact).all())  # the check is tight, not vacuous


def test_hutchinson_with_m_probes_averages_them():
    z, fz, _ = _pair()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    two = frobenius_sq_per_dim(z, fz, 2, create_graph=False, generator=g1)
    singles = [frobenius_sq_per_dim(z, fz, 1, create_graph=False, generator=g2) for _ in range(2)]
    torch.testing.assert_close(two, (singles[0] + singles[1]) / 2)


def test_hutchinson_is_differentiable_and_its_gradient_matches_exact():
    """In expectation, the estimate's gradient w.r.t. a parameter is that of the exact
    ||J||_F^2 / d (J = diag(1 - tanh^2) W depends on W twice; both paths must be kept)."""
    W = (torch.randn(6, 6, dtype=torch.float64) * 0.5).requires_grad_()
    z = torch.randn(2, 6, dtype=torch.float64).requires_grad_()

    def fz():
        return torch.tanh(z @ W.T)

    exact = (((1 - fz() ** 2)[:, :, None] * W[None]) ** 2).sum(dim=(1, 2)).mean() / 6
    (g_exact,) = torch.autograd.grad(exact, W)
    g, n, total = torch.Generator().manual_seed(0), 3000, torch.zeros_like(W)
    for _ in range(n):
        total += torch.autograd.grad(frobenius_sq_per_dim(z, fz(), 1, generator=g).mean(), W)[0]
    assert ((total / n - g_exact).norm() / g_exact.norm()) < 0.05


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spectral_radius_within_one_percent_of_eigvals(seed):
    z, fz, J = _pair(seed=seed, scale=2.0)
    exact = torch.linalg.eigvals(J).abs().amax(dim=1)
    est = spectral_radius(z, fz, n_iter=150, generator=torch.Generator().manual_seed(seed))
    rel = ((est - exact).abs() / exact)
    assert bool((rel < 0.01).all()), (est, exact)


def test_spectral_radius_of_rotation_needs_two_vectors():
    """A scaled rotation has a complex pair of equal modulus; one-vector power iteration
    cannot see its modulus, the two-vector subspace iteration does."""
    theta, r = 0.7, 0.9
    R = r * torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                         dtype=torch.float64)
    z = torch.randn(1, 2, dtype=torch.float64).requires_grad_()
    est = spectral_radius(z, z @ R.T, n_iter=20)
    assert abs(est.item() - r) < 1e-9


def test_penalty_pair_from_deq_matches_exact_jacobian():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).double()
    with torch.no_grad():
        lin.weight.mul_(0.5)
    deq = DEQ(lambda z, x: torch.tanh(lin(z) + x), forward_solver=SolverSettings(tol=1e-10, max_iter=200))
    x = torch.randn(2, 8, dtype=torch.float64)
    _, stats = deq(x, torch.zeros_like(x))
    z, fz = stats.jacobian_inputs()
    J = (1 - fz.detach() ** 2)[:, :, None] * lin.weight.detach()[None]
    exact = torch.linalg.eigvals(J).abs().amax(dim=1)
    torch.testing.assert_close(spectral_radius(z, fz, n_iter=300), exact, rtol=1e-2, atol=0)


def test_penalty_schedule_and_frequency():
    pen = JacobianPenalty(gamma=1.6, gamma_end=2.5, p=0.35, n_probes=2)
    assert pen.weight(0, 101) == pytest.approx(1.6)
    assert pen.weight(50, 101) == pytest.approx(2.05)
    assert pen.weight(100, 101) == pytest.approx(2.5)
    assert JacobianPenalty(gamma=0.5).weight(70, 100) == 0.5
    g = torch.Generator().manual_seed(0)
    hits = sum(pen.applies(g) for _ in range(4000))
    assert abs(hits / 4000 - 0.35) < 3 * math.sqrt(0.35 * 0.65 / 4000)
    assert not JacobianPenalty(gamma=0.0, p=1.0).applies(g)
    assert not JacobianPenalty(gamma=2.0, p=0.0).applies(g)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(gamma=-0.1), "gamma"),
        (dict(gamma=1.0, gamma_end=-1.0), "gamma_end"),
        (dict(p=1.5), "p"),
        (dict(p=-0.1), "p"),
        (dict(n_probes=0), "n_probes"),
        (dict(gamma="1"), "gamma='1'"),
        (dict(gamma=True), "gamma=True"),
        (dict(p="0.5"), "p='0.5'"),
        (dict(n_probes=2.0), "n_probes=2.0"),
        (dict(gamma=math.inf), "gamma=inf"),
        (dict(p=math.nan), "p=nan"),
        (dict(gamma_end="2.5"), "gamma_end='2.5'"),
    ],
)
def test_bad_penalty_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        JacobianPenalty(**kwargs)


def test_bad_estimator_arguments():
    z, fz, _ = _pair()
    with pytest.raises(ValueError, match="n_probes"):
        frobenius_sq_per_dim(z, fz, 0)
    with pytest.raises(ValueError, match="n_iter"):
        spectral_radius(z, fz, n_iter=0)
    # A whole float was taken for a count, and NaN raised int()'s error naming nothing.
    for bad in (2.0, math.nan, "2"):
        with pytest.raises(ValueError, match=rf"n_probes must be an integer >= 1, got n_probes={bad!r}"):
            frobenius_sq_per_dim(z, fz, bad)
    with pytest.raises(ValueError, match=r"tol must be a finite number > 0, got tol=inf"):
        spectral_radius(z, fz, tol=math.inf)


def test_probes_come_from_the_given_generator_whatever_the_device_of_the_states():
    """The training loop seeds CPU generators; states may live elsewhere (CUDA, where
    ``torch.randn(..., generator=cpu, device=cuda)`` raises). Here the states are on the meta
    device: the draws must still be taken from the CPU generator and land on the states' device."""
    W = torch.randn(6, 6)
    z = torch.zeros(3, 6, device="meta", requires_grad=True)
    fz = torch.tanh(z @ W.to("meta"))
    for estimate in (lambda g: frobenius_sq_per_dim(z, fz, 2, generator=g),
                     lambda g: spectral_radius(z, fz, n_iter=1, generator=g)):
        g = torch.Generator().manual_seed(0)
        before = g.get_state().clone()
        out = estimate(g)
        assert out.device.type == "meta" and out.shape == (3,)
        assert not torch.equal(g.get_state(), before), "the generator was not drawn from"


def _linear_with_spectrum(moduli_angles, rest: int, rest_radius: float, seed: int, normal: bool):
    """A real ``D x D`` matrix whose eigenvalues are the given ``(modulus, angle)`` (a pair per
    nonzero angle) plus ``rest`` real ones uniform in ``(-rest_radius, rest_radius)``, moved by a
    random orthogonal (``normal``) or general (non-normal) similarity."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for r, a in moduli_angles:
        if a == 0:
            blocks.append(torch.tensor([[r]], dtype=torch.float64))
        else:
            blocks.append(r * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                                           dtype=torch.float64))
    blocks += [torch.tensor([[v]], dtype=torch.float64) for v in (torch.rand(rest, generator=g, dtype=torch.float64)
                                                                 * 2 - 1) * rest_radius]
    A = torch.block_diag(*blocks)
    D = A.shape[0]
    if normal:
        Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        return Q @ A @ Q.T
    S = torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    return S @ A @ torch.linalg.inv(S)


@pytest.mark.parametrize("normal", [True, False])
@pytest.mark.parametrize("spectrum", [
    [(1.0, 0.0), (1.0, math.pi / 3), (-1.0, 0.0)],            # four eigenvalues of modulus 1
    [(0.9, 0.4), (0.9, 1.9)],                                 # two complex pairs, equal moduli
    [(1.058, 0.0), (1.05, 0.8), (1.04, 2.1)],                 # five nearly equal moduli, unstable
])
def test_estimate_converges_on_nearly_equal_moduli(spectrum, normal):
    """The case that two vectors got 54-75% wrong: several eigenvalues of (nearly) the largest
    modulus. The estimate is within its own error bound and 1e-3 of the exact value."""
    W = _linear_with_spectrum(spectrum, rest=40, rest_radius=0.6, seed=3, normal=normal)
    exact = float(torch.linalg.eigvals(W).abs().max())
    z = torch.randn(2, W.shape[0], dtype=torch.float64).requires_grad_()
    est = estimate_spectral_radius(z, z @ W.T, generator=torch.Generator().manual_seed(0))
    assert bool(est.converged.all()), est
    err = (est.value - exact).abs()
    assert bool((err < 1e-3 * exact).all()), (est.value, exact)
    assert bool((err <= est.error + 1e-9).all()), (err, est.error)


def test_two_vectors_are_not_enough_and_the_estimate_says_so():
    """With a block smaller than the cluster of largest moduli the value is off; the change or
    the residual it reports is large as well, so a reader can tell."""
    W = _linear_with_spectrum([(1.0, 0.0), (1.0, math.pi / 3), (-1.0, 0.0)], rest=40, rest_radius=0.6, seed=3,
                              normal=True)
    z = torch.randn(1, W.shape[0], dtype=torch.float64).requires_grad_()
    est = estimate_spectral_radius(z, z @ W.T, n_iter=150, n_vectors=2, generator=torch.Generator().manual_seed(0))
    assert float(est.residual.max()) > 1e-2 or not bool(est.converged.all())


def test_spectral_radius_of_a_small_mdeq_map_with_a_cluster_near_one():
    """A small MDEQ's map at an equilibrium, float64: the estimate agrees with the eigenvalues of
    the full Jacobian (built column by column)."""
    from deqlib.deq import StatePacker
    from deqlib.models.mdeq import MDEQConfig, MultiscaleMap, Stem

    torch.manual_seed(0)
    cfg = MDEQConfig(channels=(4, 8), expansion=2, groups=2, dropout=0.0, downsample=1, head_channels=(8, 16),
                     final_channels=16, image_size=8, init_std=None)
    f, stem = MultiscaleMap(cfg).double().eval(), Stem(cfg).double().eval()
    x = stem(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    z0 = [torch.zeros(1, c, 4 // 2 ** i, 4 // 2 ** i, dtype=torch.float64) for i, c in enumerate(cfg.channels)]
    packer = StatePacker(z0)
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(1.5)  # push it towards and past rho = 1, where clusters form
    z = packer.pack(z0).detach().requires_grad_()
    fz = packer.pack(f(packer.unpack(z), x))
    D = z.shape[1]
    J = torch.stack([torch.autograd.grad(fz[0, i], z, retain_graph=True)[0][0] for i in range(D)])
    exact = float(torch.linalg.eigvals(J).abs().max())
    est = estimate_spectral_radius(z, fz, generator=torch.Generator().manual_seed(1))
    assert abs(float(est.value) - exact) < 1e-3 * exact, (float(est.value), exact)


def test_a_state_of_any_shape_gives_the_flattened_states_estimates():
    """``(B, C, ...)`` states were read with ``B, D = z.shape`` by the spectral radius (a bare
    'too many values to unpack'); the Hutchinson estimate already took them."""
    W = torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 4
    flat = torch.randn(2, 12, dtype=torch.float64).requires_grad_()
    cube = flat.detach().view(2, 3, 4).requires_grad_()
    f_flat, f_cube = torch.tanh(flat @ W.T), torch.tanh(cube.reshape(2, 12) @ W.T).view(2, 3, 4)
    for fn in (estimate_spectral_radius, frobenius_sq_per_dim):
        a = fn(flat, f_flat, generator=torch.Generator().manual_seed(1))
        b = fn(cube, f_cube, generator=torch.Generator().manual_seed(1))
        a, b = (a.value, b.value) if fn is estimate_spectral_radius else (a, b)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fn", [frobenius_sq_per_dim, spectral_radius])
def test_a_pair_that_is_not_a_square_jacobian_with_a_graph_is_named(fn):
    z = torch.randn(2, 3).requires_grad_()
    with pytest.raises(ValueError, match=r"fz must have z's shape \(2, 3\).*got fz of shape \(2, 5\)"):
        fn(z, z @ torch.randn(5, 3).T)
    with pytest.raises(ValueError, match=r"z must require grad and fz be computed from it"):
        fn(z.detach(), torch.tanh(z.detach()))
    with pytest.raises(ValueError, match=r"z must be a tensor of shape \(B, ...\), got z of shape \(3,\)"):
        row = z[0]
        fn(row, torch.tanh(row))
