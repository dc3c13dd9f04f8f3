"""The CPU pool that lends the solvers their history buffers between solves."""

import pytest
import torch

from deqlib.buffers import POOL, BufferPool, release_buffers
from deqlib.measure import PeakMemory
from deqlib.solvers import solve

# One state of (4, 2**16) float32 is 1 MiB: the histories are over the pool's 1 MiB floor.
B, D = 4, 2**16


def _map(seed: int, rho: float = 0.6):
    """f(z) = rho * tanh(z) * w + x per sample; contractive, with a fixed point of its own."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(B, D, generator=gen)
    x = torch.randn(B, D, generator=gen)
    return lambda z: rho * torch.tanh(z) * w + x


@pytest.fixture(autouse=True)
def empty_pool():
    release_buffers()
    yield
    release_buffers()


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_result_is_not_overwritten_by_the_next_solve(method):
    f = _map(0)
    first = solve(f, torch.zeros(B, D), method=method, tol=1e-6, max_iter=40)
    kept = first.z.clone(), first.fz.clone()
    assert POOL.free_bytes > 0  # the history was given back ...
    solve(_map(1), torch.zeros(B, D), method=method, tol=1e-6, max_iter=40)  # ... and lent again
    torch.testing.assert_close(first.z, kept[0], rtol=0, atol=0)
    torch.testing.assert_close(first.fz, kept[1], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_nested_solves_get_their_own_buffers(method):
    """f itself solves a fixed point (as a DEQ inside a DEQ would): both solutions stay right."""
    g = _map(1)
    inner = []

    def f(z):
        res = solve(lambda u: g(u) + 0.1 * z, torch.zeros(B, D), method=method, tol=1e-5, max_iter=60)
        inner.append(res.status)
        return 0.5 * torch.tanh(res.z) + 0.1

    res = solve(f, torch.zeros(B, D), method=method, tol=1e-4, max_iter=60)
    assert res.status == "converged" and set(inner) == {"converged"}, (res.reason, set(inner))
    alone = solve(f, res.z, method="fixed_point", tol=1e-4, max_iter=1)  # one evaluation at z*
    assert float(alone.rel_residual.max()) < 1e-3


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_peak_memory_counts_a_reused_history(method):
    """PeakMemory sees the same solver memory whether the history is fresh or lent again."""
    f, peaks = _map(0), []
    for _ in range(2):
        with PeakMemory() as pm:
            solve(f, torch.zeros(B, D), method=method, tol=1e-6, max_iter=40)
        peaks.append(pm.peak)
    state = B * D * 4
    assert peaks[0] > 3 * state  # the history is in the figure at all
    assert peaks[1] == peaks[0], peaks


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_measured_memory_does_not_depend_on_what_ran_before(method):
    """A bigger solve's buffers, given back, must not be lent to a smaller one: it would hold
    (and PeakMemory count) their whole size."""
    def peak(batch):
        x = torch.randn(batch, D, generator=torch.Generator().manual_seed(1))
        with PeakMemory() as pm:
            solve(lambda z: 0.6 * torch.tanh(z) + x, torch.zeros(batch, D), method=method, tol=1e-6, max_iter=40)
        return pm.peak

    alone = peak(B)
    release_buffers()
    peak(4 * B)  # its history goes back to the pool, the only buffers there
    assert peak(B) == alone


def test_pool_keeps_at_most_its_bound_and_reuses_same_sizes():
    pool = BufferPool(max_free_bytes=3 * B * D * 4)
    like = torch.zeros(1)
    with pool.lease() as empty:
        a = empty(B, 2, D, like=like)
        ptr = a.data_ptr()
    assert pool.free_bytes == 2 * B * D * 4
    with pool.lease() as empty:
        assert empty(B, 2, D, like=like).data_ptr() == ptr  # the same buffer, lent again
        assert empty(B, 2, D, like=like).data_ptr() != ptr  # the second one is new
    assert pool.free_bytes == 2 * B * D * 4  # two buffers of 2 states: one over the bound, freed
    with pool.lease() as empty:
        assert empty(B, 1, D // 4, like=like).numel() == B * D // 4  # below the floor: not pooled
    assert pool.free_bytes == 2 * B * D * 4
    pool.clear()
    assert pool.free_bytes == 0


def test_buffers_go_back_when_f_raises():
    def f(z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        solve(lambda z: f(z) if z.abs().sum() > 0 else z + 1, torch.zeros(B, D), method="anderson")
    assert POOL.free_bytes == 2 * 5 * B * D * 4  # F and G, m = 5 states each
