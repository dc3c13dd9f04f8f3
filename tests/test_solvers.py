"""Solvers against known fixed points, fault cases and argument checks."""

import math

import pytest
import torch

from deqlib import METHODS, solve
from deqlib.measure import PeakMemory
from conftest import linear_map

ALL = sorted(METHODS)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_reaches_known_fixed_point(method, stop_mode, contractive_linear):
    f, x, exact = contractive_linear
    res = solve(f, torch.zeros_like(x), method=method, max_iter=200, tol=1e-10, stop_mode=stop_mode)
    assert res.status == "converged", res.reason
    assert bool(res.converged.all())
    torch.testing.assert_close(res.z, exact, rtol=1e-8, atol=1e-8)
    # Reported residuals are those of the returned iterate, recomputed independently.
    fz = f(res.z)
    torch.testing.assert_close(res.fz, fz)
    abs_res = (fz - res.z).norm(dim=1)
    torch.testing.assert_close(res.abs_residual, abs_res)
    torch.testing.assert_close(res.rel_residual, abs_res / fz.norm(dim=1))
    crit = res.rel_residual if stop_mode == "rel" else res.abs_residual
    assert bool((crit < 1e-10).all())


@pytest.mark.parametrize("method", ALL)
def test_traces_and_best_iterate(method, slow_linear):
    f, x, _ = slow_linear
    res = solve(f, torch.zeros_like(x), method=method, max_iter=25, tol=1e-12)
    assert res.status == "max_iter" and res.nfe == 25
    assert res.abs_trace.shape == (25, x.shape[0]) and res.rel_trace.shape == (25, x.shape[0])
    # The returned iterate is the per-sample minimum of the trace, at the step it names.
    torch.testing.assert_close(res.rel_residual, res.rel_trace.min(dim=0).values)
    torch.testing.assert_close(res.rel_trace[res.best_step, torch.arange(x.shape[0])], res.rel_residual)
    assert not bool(res.converged.any())


def test_accelerated_methods_beat_plain_iteration():
    f, x, exact = linear_map(60, 0.97, seed=1)
    nfe = {}
    for method in ALL:
        res = solve(f, torch.zeros_like(x), method=method, max_iter=2000, tol=1e-6)
        assert res.status == "converged", (method, res.reason)
        torch.testing.assert_close(res.z, exact, rtol=1e-4, atol=1e-4)
        nfe[method] = res.nfe
    assert nfe["anderson"] < nfe["fixed_point"], nfe
    assert nfe["broyden"] < nfe["fixed_point"], nfe


def test_anderson_regularizer_is_scale_free():
    """The same map with residuals scaled by 1e-4 takes the same number of steps."""
    f, x, _ = linear_map(60, 0.97, seed=1)
    big = solve(f, torch.zeros_like(x), method="anderson", max_iter=2000, tol=1e-6)
    small = solve(lambda z: f(z * 1e4) * 1e-4, torch.zeros_like(x), method="anderson",
                  max_iter=2000, tol=1e-6)
    assert abs(big.nfe - small.nfe) <= 2, (big.nfe, small.nfe)


def test_fixed_point_first_steps_of_broyden_and_anderson_are_plain_steps(contractive_linear):
    f, x, _ = contractive_linear
    plain = solve(f, torch.zeros_like(x), method="fixed_point", max_iter=2, tol=1e-30)
    for method in ("anderson", "broyden"):
        res = solve(f, torch.zeros_like(x), method=method, max_iter=2, tol=1e-30)
        torch.testing.assert_close(res.abs_trace, plain.abs_trace)


@pytest.mark.parametrize("method", ALL)
def test_nan_returns_best_iterate_with_status_diverged(method, contractive_linear):
    f, x, _ = contractive_linear
    calls = {"n": 0}

    def poisoned(z):
        calls["n"] += 1
        out = f(z)
        return out * math.nan if calls["n"] >= 6 else out

    res = solve(poisoned, torch.zeros_like(x), method=method, max_iter=50, tol=1e-12)
    assert res.status == "diverged" and res.nfe == 6
    assert bool(torch.isfinite(res.z).all()) and bool(torch.isfinite(res.fz).all())
    assert bool((res.best_step < 5).all())
    ref = solve(f, torch.zeros_like(x), method=method, max_iter=5, tol=1e-12)
    torch.testing.assert_close(res.z, ref.z)


def test_expanding_iteration_stops_as_diverged():
    x = torch.ones(3, 5, dtype=torch.float64)
    res = solve(lambda z: 3.0 * z + x, torch.zeros_like(x), method="fixed_point", max_iter=500)
    assert res.status == "diverged" and res.nfe < 500
    assert bool(torch.isfinite(res.z).all())


@pytest.mark.parametrize("method", ALL)
def test_map_without_fixed_point_never_reports_convergence(method):
    """g(z) = z^2 + z + 1 > 0 has no root: no method may claim one or raise."""
    x = torch.ones(3, 5, dtype=torch.float64)
    res = solve(lambda z: z * z + 2 * z + x, torch.zeros_like(x), method=method, max_iter=200)
    assert res.status in ("diverged", "max_iter"), res.reason
    assert bool(torch.isfinite(res.z).all())
    assert bool((res.rel_residual <= res.rel_trace[0]).all())


def test_singular_least_squares_does_not_raise():
    """f(z) = z + c: all residuals equal, the unregularized Anderson system is singular."""
    c = torch.ones(2, 8, dtype=torch.float64)
    res = solve(lambda z: z + c, torch.zeros_like(c), method="anderson", lam=0.0, max_iter=20)
    assert res.status in ("max_iter", "diverged")
    assert bool(torch.isfinite(res.z).all())
    res = solve(lambda z: z + c, torch.zeros_like(c), method="broyden", max_iter=20)
    assert res.status in ("max_iter", "diverged")


def test_per_sample_best_iterate_mixes_samples():
    """Sample 0 contracts, sample 1 expands: each keeps its own best iterate."""
    f, x, exact = linear_map(10, 0.5, batch=2)
    scale = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    res = solve(lambda z: scale * f(z), torch.zeros_like(x), method="fixed_point", max_iter=20,
                tol=1e-14, stop_mode="abs", diverge_factor=1e12)
    assert res.status == "max_iter"
    assert res.best_step.tolist() == [19, 0]
    torch.testing.assert_close(res.z[0], exact[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.z[1], torch.zeros_like(x[1]))


@pytest.mark.parametrize("method, options, grows", [("anderson", {}, 0), ("broyden", {"window": 20}, 0),
                                                    ("broyden", {"window": 40}, 40 + 3 - 24)])
def test_memory_does_not_grow_with_max_iter(method, options, grows):
    """Memory is bounded by the method's window, not by max_iter: a solve of 300 calls holds at
    most the window's states more than one of 30 (Broyden's basis grows from 24 states to its
    window as a solve runs long; Anderson's is its window from the start)."""
    f, x, _ = linear_map(200, 0.99, batch=4, seed=3, dtype=torch.float32)
    peaks, nfes = [], []
    for max_iter in (30, 300):
        with PeakMemory() as pm:
            res = solve(f, torch.zeros_like(x), method=method, max_iter=max_iter, tol=1e-7, **options)
        peaks.append(pm.peak)
        nfes.append(res.nfe)
    assert nfes[1] > 60, nfes  # the long solve really ran longer
    state = x.numel() * x.element_size()
    # Besides the basis's growth, only the (N, B) residual traces may grow (abs and rel, listed
    # and stacked): far below the max_iter states a preallocated history would add. A grown
    # basis is held beside the one it grew from while the rows are copied.
    traces = 4 * x.shape[0] * x.element_size() * (nfes[1] - nfes[0])
    budget = state + traces + (grows + (40 if grows else 0)) * state
    assert peaks[1] - peaks[0] < budget, (peaks, state, traces)


def test_multi_dim_state_shape_is_kept():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    res = solve(lambda z: 0.5 * z + x, torch.zeros_like(x), method="anderson", tol=1e-9, max_iter=100)
    assert res.z.shape == x.shape
    torch.testing.assert_close(res.z, 2 * x)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(method="newton"), "method"),
        (dict(stop_mode="max"), "stop_mode"),
        (dict(tol=0.0), "tol"),
        (dict(tol=-1e-3), "tol"),
        (dict(tol=math.nan), "tol"),
        (dict(max_iter=0), "max_iter"),
        (dict(max_iter=2.5), "max_iter"),
        (dict(method="anderson", m=0), "m"),
        (dict(method="anderson", m=2.0), "m=2.0"),
        (dict(method="anderson", m=True), "m=True"),
        (dict(method="anderson", m=math.nan), "m=nan"),
        (dict(method="broyden", window=3.0), "window=3.0"),
        (dict(method="broyden", window=math.inf), "window=inf"),
        (dict(method="anderson", beta=1.5), "beta"),
        (dict(method="anderson", lam=-1.0), "lam"),
        (dict(method="broyden", window=0), "window"),
        (dict(method="broyden", m=5), "m"),
        (dict(method="fixed_point", f_stop_mode="abs"), "f_stop_mode"),
        # A whole float, NaN, infinity or a string is no call count, nor a string a number: each
        # was accepted, or ended in a TypeError / OverflowError naming no argument.
        (dict(max_iter=2.0), r"max_iter must be an integer >= 1, got max_iter=2.0"),
        (dict(max_iter=math.nan), r"max_iter=nan"),
        (dict(max_iter=math.inf), r"max_iter=inf"),
        (dict(max_iter="5"), r"max_iter='5'"),
        (dict(tol="1e-3"), r"tol='1e-3'"),
        (dict(tol=True), r"tol=True"),
        (dict(diverge_factor="10"), r"diverge_factor must be a number > 1, got diverge_factor='10'"),
        (dict(diverge_factor=math.nan), r"diverge_factor=nan"),
        (dict(diverge_factor=1), r"diverge_factor=1"),
        (dict(method="fixed_point", beta="0.5"), r"beta='0.5'"),
        (dict(method="anderson", beta="0.5"), r"beta='0.5'"),
        (dict(method="anderson", beta=math.nan), r"beta=nan"),
        (dict(method="anderson", lam=math.inf), r"lam=inf"),
        (dict(method="anderson", lam="0"), r"lam='0'"),
        (dict(stop_mode=["rel"]), r"stop_mode=\['rel'\]"),
        (dict(method=["anderson"]), r"method=\['anderson'\]"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    calls = []
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=name):
        solve(lambda z: calls.append(1) or z, x, **kwargs)
    assert not calls, "validation must happen before any call of f"


@pytest.mark.parametrize("z0, message", [
    ([[0.0, 1.0]], r"z0 must be a tensor of shape \(B, \.\.\.\), got z0=\[\[0.0, 1.0\]\]"),
    (torch.zeros(()), r"z0 must be a tensor of shape \(B, \.\.\.\), got z0 of shape \(\)"),
    (torch.zeros(0, 3), r"z0 .* got z0 of shape \(0, 3\)"),
    (torch.zeros(2, 3, dtype=torch.int64), r"z0 must be a floating-point tensor, got z0 of dtype torch.int64"),
    (torch.zeros(2, 3, dtype=torch.bool), r"z0 must be a floating-point tensor, got z0 of dtype torch.bool"),
])
def test_a_bad_start_is_refused_naming_it(z0, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        solve(lambda z: calls.append(1) or z, z0)
    assert not calls


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("out, shape", [
    (lambda z: z.reshape(3, 2), r"\(3, 2\)"),      # as many numbers, another shape: was accepted
    (lambda z: z[:, :2], r"\(2, 2\)"),              # fewer numbers per sample
    (lambda z: z.sum(), r"\(\)"),
    (lambda z: z.tolist(), r"a list"),
])
def test_f_returning_another_shape_is_refused_at_its_first_call(method, out, shape):
    calls = []

    def f(z):
        calls.append(1)
        return out(z)

    with pytest.raises(ValueError, match=r"f must return a tensor of z0's shape \(2, 3\), got " + shape):
        solve(f, torch.zeros(2, 3), method=method, max_iter=10)
    assert len(calls) == 1


def _explicit_broyden_trace(f, z, max_iter, window):
    """Reference: limited-memory good Broyden with explicit u_i, v_i (restart when full)."""
    U, V = [], []

    def hinv(y):  # Hinv y = -y + sum_i u_i (v_i . y)
        out = -y
        for u, v in zip(U, V):
            out = out + u * (v * y).sum(1, keepdim=True)
        return out

    def hinv_t(y):  # Hinv^T y = -y + sum_i v_i (u_i . y)
        out = -y
        for u, v in zip(U, V):
            out = out + v * (u * y).sum(1, keepdim=True)
        return out

    g = f(z) - z
    trace = [g.norm(dim=1)]
    dx = g
    while len(trace) < max_iter:
        z = z + dx
        g_new = f(z) - z
        trace.append(g_new.norm(dim=1))
        dg = g_new - g
        v = hinv_t(dx)
        denom = (v * dg).sum(1, keepdim=True)
        u = (dx - hinv(dg)) / denom
        if len(U) == window:
            U, V = [], []
        U.append(u)
        V.append(v)
        g = g_new
        dx = -hinv(g)
    return torch.stack(trace)


@pytest.mark.parametrize("window", [1, 3, 20])
def test_broyden_compact_form_matches_explicit_rank_one_updates(window):
    """The compact storage (residual basis + small coefficients) is the same algorithm,
    restarts included: same residual trace as the explicit u_i, v_i form."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 30, generator=g, dtype=torch.float64) * 0.15
    x = torch.randn(3, 30, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T) + x  # noqa: E731  (nonlinear, contractive)
    z0 = torch.zeros_like(x)
    res = solve(f, z0, method="broyden", window=window, max_iter=12, tol=1e-30)
    ref = _explicit_broyden_trace(f, z0, 12, window)
    torch.testing.assert_close(res.abs_trace, ref, rtol=1e-7, atol=1e-12)


def _reference_anderson_weights(G: torch.Tensor, lam: float) -> torch.Tensor:
    """``min ||sum_i a_i g_i||^2 + lam s ||a||^2`` s.t. ``sum_i a_i = 1``, ``s`` the mean of the
    ``||g_i||^2``, in closed form: ``a = K^-1 1 / (1^T K^-1 1)`` with ``K = G G^T + lam s I``.
    ``G (B, n, D)``; returns ``(B, n)``."""
    gram = G @ G.transpose(1, 2)
    s = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
    K = gram + lam * s.view(-1, 1, 1) * torch.eye(G.shape[1], dtype=G.dtype)
    y = torch.linalg.solve(K, torch.ones(G.shape[:2], dtype=G.dtype))
    return y / y.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_anderson_matches_reference_mixing(beta, slow_linear):
    """F kept by reference in ring slots gives the textbook update
    z = sum_i a_i (beta f_i + (1 - beta) z_i) over the last m iterates."""
    f, x, _ = slow_linear
    m, z, hist, trace = 3, torch.zeros_like(x), [], []
    for _ in range(15):
        fz = f(z)
        trace.append((fz - z).norm(dim=1))
        hist = (hist + [(z, fz)])[-m:]
        G = torch.stack([fi - zi for zi, fi in hist], 1)
        a = _reference_anderson_weights(G, 1e-4)
        z = sum(a[:, i : i + 1] * (beta * fi + (1 - beta) * zi) for i, (zi, fi) in enumerate(hist))
    res = solve(f, torch.zeros_like(x), method="anderson", m=m, beta=beta, max_iter=15, tol=1e-30)
    torch.testing.assert_close(res.abs_trace, torch.stack(trace), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("method", ["fixed_point", "anderson"])
def test_damped_iteration_reaches_known_fixed_point(method, contractive_linear):
    f, x, exact = contractive_linear
    res = solve(f, torch.zeros_like(x), method=method, beta=0.5, max_iter=300, tol=1e-10)
    assert res.status == "converged", res.reason
    torch.testing.assert_close(res.z, exact, rtol=1e-8, atol=1e-8)


def test_anderson_system_falls_back_to_plain_step_per_sample():
    """A non-finite Gram entry (LAPACK reports no error for NaN) or a singular system gives that
    sample weight 1 on the newest slot; the other samples keep their least-squares weights."""
    from deqlib.solvers.anderson import AndersonSystem as _AndersonSystem

    torch.manual_seed(0)
    G = torch.randn(3, 3, 5, dtype=torch.float64)
    G[2, 1] = G[2, 0]  # sample 2: two equal residuals, singular without the regularizer
    system = _AndersonSystem(3, 3, 0.0, torch.device("cpu"))
    for i in range(3):
        system.set_row(i, (G[:, : i + 1] @ G[:, i].unsqueeze(2)).squeeze(2))
    system.P[1, 2, 2] = float("nan")
    a = system.weights(3, newest=2)
    torch.testing.assert_close(a[0], _reference_anderson_weights(G[:1], 0.0)[0])
    for b in (1, 2):
        torch.testing.assert_close(a[b], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixing_weights_are_made_contiguous_in_the_state_dtype(dtype):
    """LAPACK hands back column-major solutions; the weights that reach ``bmm`` must be
    row-major (CPU ``bmm`` otherwise loops per sample, 2x slower at MDEQ size) and unchanged."""
    from deqlib.solvers.products import combine as _combine, weights_like as _weights_like

    torch.manual_seed(0)
    col_major = torch.randn(5, 4, dtype=torch.float64).t()  # (B=4, n=5), stride (1, 4)
    H = torch.randn(4, 5, 7, dtype=dtype)
    c = _weights_like(col_major, H[:, 0])
    assert c.dtype == dtype and c.is_contiguous()
    torch.testing.assert_close(c, col_major.to(dtype), rtol=0, atol=0)
    expected = torch.einsum("bn,bnd->bd", col_major.double(), H.double()).to(dtype)
    torch.testing.assert_close(_combine(c, H), expected)


@pytest.mark.parametrize("method", ALL)
def test_half_precision_residuals_are_measured_in_float32(method):
    """In float16 ||f(z)|| overflows past 65504 (relative residual 0: a false "converged") and
    the floor of the relative residual rounds to 0 (0/0 at f(z) = 0: a false "diverged")."""
    at_zero = solve(lambda z: 0.5 * z, torch.zeros(2, 64, dtype=torch.float16), method=method, tol=1e-3)
    assert at_zero.status == "converged" and at_zero.nfe == 1 and float(at_zero.rel_residual.max()) == 0.0
    z0 = torch.full((1, 2**16), 250.0, dtype=torch.float16)  # f = 300: ||f|| = 76800 > 65504
    far = solve(lambda z: torch.full_like(z, 300.0), z0, method=method, max_iter=1, tol=1e-3)
    assert far.status == "max_iter"
    assert float(far.rel_trace[0, 0]) == pytest.approx(50 / 300, rel=1e-3)


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_half_precision_history_products_do_not_overflow(method):
    """Residuals of norm ~450: <g, g> ~ 2e5 is inf in float16; Anderson fell back to plain
    steps and Broyden's update went NaN. With float32 products both converge about as fast as
    in float32."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(512, 512, generator=gen))
    A = (Q * torch.linspace(0.5, 0.97, 512)) @ Q.T  # symmetric, eigenvalues 0.5 to 0.97
    x = torch.randn(2, 512, generator=gen) * 20

    def f(z):
        return (z.float() @ A.T + x).to(z.dtype)

    ref = solve(f, torch.zeros(2, 512), method=method, max_iter=100, tol=3e-3)
    half = solve(f, torch.zeros(2, 512, dtype=torch.float16), method=method, max_iter=100, tol=3e-3)
    assert ref.status == half.status == "converged", half.reason
    assert half.nfe <= ref.nfe + 3


def test_divergence_check_off_with_an_infinite_factor():
    """diverge_factor=inf switches the check off; a sample starting at its fixed point (limit
    inf * 0 = NaN) made every solve stop at call 1 as "diverged"."""
    x = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z0 = torch.zeros_like(x)
    z0[0] = 2 * x[0]  # f(2x) = x + x = 2x exactly: a residual of exactly 0
    res = solve(lambda z: 0.5 * z + x, z0, method="anderson", tol=1e-10, max_iter=100,
                diverge_factor=math.inf)
    assert res.status == "converged", res.reason
    torch.testing.assert_close(res.z, 2 * x)


@pytest.mark.parametrize("method", ALL)
def test_result_never_shares_memory_with_the_start(method):
    """When the start is the best iterate, the result must not be a view of the caller's z0."""
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z0 = 2 * x  # the exact fixed point of 0.5 z + x
    res = solve(lambda z: 0.5 * z + x, z0, method=method, tol=1e-6)
    assert res.status == "converged" and res.nfe == 1
    z0.zero_()  # the caller reuses its buffer
    torch.testing.assert_close(res.z, 2 * x)


def _per_sample_map(scales, dim: int = 30, seed: int = 0):
    """f(z) = a_b * tanh(w * z + x_b): sample b contracts at about ``a_b`` (elementwise, so a
    sample's values do not depend on how many others share its batch)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    a = torch.tensor(scales, dtype=torch.float64).unsqueeze(1)
    x = torch.randn(len(scales), dim, generator=g, dtype=torch.float64)
    return (lambda z: a * torch.tanh(w * z + x)), torch.zeros(len(scales), dim, dtype=torch.float64)


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_each_sample_stops_on_its_own(method):
    """A sample solved alone and inside a batch with a hard and a diverging sample gives the same
    iterate and per-sample NFE: its result does not depend on its batch-mates."""
    scales = [0.5, 0.99, 30.0]  # easy, slow, expansive (a residual that grows)
    f_batch, z0 = _per_sample_map(scales)
    batch = solve(f_batch, z0, method, max_iter=300, tol=1e-9, diverge_factor=20.0)
    f_alone, z_alone = _per_sample_map([scales[0]])
    # the same x for sample 0: rebuild its map from the batch's
    alone = solve(lambda z: f_batch(torch.cat([z, z0[1:]]))[:1], z0[:1], method, max_iter=300, tol=1e-9,
                  diverge_factor=20.0)
    assert bool(alone.converged.all()) and bool(batch.converged[0])
    assert int(batch.nfe_per_sample[0]) == int(alone.nfe_per_sample[0]) == alone.nfe
    torch.testing.assert_close(batch.z[:1], alone.z, rtol=0, atol=1e-12)
    # the easy sample stopped early and stayed put; the solve went on for the others
    assert int(batch.nfe_per_sample[0]) < batch.nfe
    stopped_at, best = int(batch.nfe_per_sample[0]), int(batch.best_step[0])
    assert bool((batch.rel_trace[stopped_at:, 0] == batch.rel_trace[best, 0]).all())


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_a_diverging_sample_does_not_end_the_others_solve(method):
    """Sample 1's map turns non-finite at its third call; the others still converge."""
    f, z0 = _per_sample_map([0.5, 0.9, 0.7])
    calls = []

    def g(z):
        out = f(z)
        calls.append(1)
        if len(calls) >= 3:
            out = out.clone()
            out[1] = float("nan")
        return out

    res = solve(g, z0, method, max_iter=300, tol=1e-9)
    assert res.diverged.tolist() == [False, True, False]
    assert res.converged.tolist() == [True, False, True]
    assert res.status == "diverged" and "1 of 3 samples diverged" in res.reason
    assert int(res.nfe_per_sample[1]) == 3 and res.nfe > 3
    assert bool(torch.isfinite(res.z).all())  # held at its best (finite) iterate


def test_a_growing_residual_stops_only_its_sample():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([[0.5], [3.0]], dtype=torch.float64)  # sample 1 expands 3x per call
    x = torch.randn(2, 10, generator=g, dtype=torch.float64)
    res = solve(lambda z: a * z + x, torch.zeros(2, 10, dtype=torch.float64), "fixed_point", max_iter=200,
                tol=1e-10, diverge_factor=100.0)
    assert res.diverged.tolist() == [False, True] and bool(res.converged[0])
    assert int(res.nfe_per_sample[1]) < 10 < int(res.nfe_per_sample[0])


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_checking_the_stop_every_k_calls_gives_the_same_iterates(method):
    """check_every=k moves the per-sample bookkeeping onto the device and asks the host only
    every k calls: the same iterates and per-sample NFE, the batch at most k - 1 calls longer."""
    f, z0 = _per_sample_map([0.5, 0.9, 0.7, 0.95])
    every1 = solve(f, z0, method, max_iter=300, tol=1e-9)
    every4 = solve(f, z0, method, max_iter=300, tol=1e-9, check_every=4)
    assert torch.equal(every4.z, every1.z) and torch.equal(every4.fz, every1.fz)
    assert torch.equal(every4.nfe_per_sample, every1.nfe_per_sample)
    assert every4.converged.tolist() == every1.converged.tolist() == [True] * 4
    assert every1.nfe <= every4.nfe < every1.nfe + 4 and every4.nfe % 4 == 0
    assert torch.equal(every4.rel_trace[: every1.nfe], every1.rel_trace)
    # non-finite values: the same handling
    bad = lambda z: torch.where(torch.arange(4).unsqueeze(1) == 1, torch.nan, f(z))  # noqa: E731
    res = solve(bad, z0, method, max_iter=50, tol=1e-9, check_every=4)
    assert res.diverged.tolist() == [False, True, False, False] and res.status == "diverged"


def test_check_every_is_checked():
    with pytest.raises(ValueError, match="check_every"):
        solve(lambda z: z, torch.zeros(2, 3), check_every=0)
    from deqlib import SolverSettings
    with pytest.raises(ValueError, match="check_every"):
        SolverSettings(check_every=2.0)
    assert SolverSettings(check_every=3).run(lambda z: 0.5 * z + 1, torch.zeros(2, 3)).converged.all()
