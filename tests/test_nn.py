"""deqlib.nn: weight norm once per step, variational dropout locked for a solve."""

import pytest
import torch
from torch import nn

from deqlib.deq import DEQ, SolverSettings
from deqlib.nn import VariationalDropout, group_norm, once_per_step, remove_weight_norm, weight_norm


def test_weight_norm_keeps_function_and_gradient_matches_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    before = conv(x).detach()
    weight_norm(conv)
    assert set(n for n, _ in conv.named_parameters()) == {"bias", "weight_g", "weight_v"}
    torch.testing.assert_close(conv(x), before)
    # gradient w.r.t. g and v against the closed form w = g v / ||v|| differentiated by autograd
    g = conv.weight_g.detach().clone().requires_grad_()
    v = conv.weight_v.detach().clone().requires_grad_()
    w = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    ref = nn.functional.conv2d(x, w, conv.bias, padding=1).square().sum()
    ref.backward()
    conv(x).square().sum().backward()
    torch.testing.assert_close(conv.weight_g.grad, g.grad)
    torch.testing.assert_close(conv.weight_v.grad, v.grad)


def test_weight_norm_computed_once_inside_context_and_fresh_after_update():
    lin = weight_norm(nn.Linear(3, 3))
    calls = []
    hook = next(iter(lin._forward_pre_hooks.values()))
    orig = hook.compute
    hook.compute = lambda m: (calls.append(1), orig(m))[1]
    x = torch.randn(2, 3)
    with once_per_step(lin):
        for _ in range(5):
            lin(x)
    assert len(calls) == 1
    with torch.no_grad():
        lin.weight_g.mul_(2.0)
    y = lin(x)  # outside the context: recomputed from the updated g
    torch.testing.assert_close(y - lin.bias, 2.0 * (nn.functional.linear(x, orig(lin) / 2.0)))


def test_a_weight_normed_module_can_be_deep_copied_after_a_forward():
    """The copy computes the same function and trains separately from the original."""
    import copy

    torch.manual_seed(0)
    conv = weight_norm(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 4, 4)
    conv(x).sum().backward()  # a training step leaves module.weight behind
    with once_per_step(conv):
        conv(x)
    twin = copy.deepcopy(conv)
    torch.testing.assert_close(twin(x), conv(x))
    with torch.no_grad():
        twin.weight_g.mul_(2.0)
    assert not torch.allclose(twin(x), conv(x))
    remove_weight_norm(conv)
    assert not conv._forward_hooks and not conv._forward_pre_hooks


def test_weight_norm_bad_input():
    with pytest.raises(ValueError, match="no parameter named 'kernel'"):
        weight_norm(nn.Linear(2, 2), name="kernel")
    lin = weight_norm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="twice"):
        weight_norm(lin)
    remove_weight_norm(lin)
    assert set(n for n, _ in lin.named_parameters()) == {"weight", "bias"}


def test_variational_dropout_mask_locked_and_shared():
    drop = VariationalDropout(0.5)
    x = torch.ones(4, 6, 3, 3)
    torch.manual_seed(0)
    with once_per_step(drop):
        a, b = drop(x), drop(x)
    torch.testing.assert_close(a, b)  # one mask for every call of the step
    # shared over H, W: each (sample, channel) slice is constant, values 0 or 1/(1-p)
    assert torch.all(a.amax(dim=(2, 3)) == a.amin(dim=(2, 3)))
    assert set(a.unique().tolist()) <= {0.0, 2.0}
    c, d = drop(x), drop(x)  # outside: fresh masks (equal only with probability 2^-24)
    assert not torch.equal(c, d)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_variational_dropout_keeps_expectation_and_rejects_bad_p():
    torch.manual_seed(1)
    drop = VariationalDropout(0.25, shared_dims=(1,))
    x = torch.ones(20000, 5, 2)
    y = drop(x)
    assert torch.all(y[:, 0] == y[:, 4])  # shared along dim 1
    assert abs(float(y.mean()) - 1.0) < 0.02
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"p={p}"):
            VariationalDropout(p)


def test_deq_with_dropout_converges_only_when_mask_locked():
    torch.manual_seed(0)

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = weight_norm(nn.Linear(16, 16))
            with torch.no_grad():
                self.lin.weight_g.mul_(0.5 / self.lin.weight_g.abs().max())
            self.drop = VariationalDropout(0.3)

        def forward(self, z, x):
            return self.drop(torch.tanh(self.lin(z) + x))

    f = F()
    deq = DEQ(f, forward_solver=SolverSettings(method="anderson", max_iter=50, tol=1e-6))
    x = torch.randn(8, 16)
    with once_per_step(f):
        _, stats = deq(x, torch.zeros_like(x))
    assert stats.forward.status == "converged"
    _, stats = deq(x, torch.zeros_like(x))  # a new mask every call: no fixed point to find
    assert stats.forward.status != "converged"


def test_group_norm_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups=3 does not divide channels=8"):
        group_norm(8, 3)


def test_a_locked_mask_belongs_to_one_input_shape():
    """A mask drawn for batch 1 was broadcast over a later batch of 4 in the same step (every
    sample the same mask); and 4 -> 3 -> 4 drew the batch-4 mask anew."""
    torch.manual_seed(0)
    drop = VariationalDropout(0.5).train()
    x1, x4, x3 = torch.ones(1, 64, 2), torch.ones(4, 64, 2), torch.ones(3, 64, 2)
    with once_per_step(drop):
        drop(x1)
        a = drop(x4)
        drop(x3)
        b = drop(x4)
        c = drop(x4.double())
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 4)), "one mask for every sample"
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the step's batch-4 mask, kept
    assert c.dtype == torch.float64  # a mask in the input's dtype


def test_weight_norm_copies_and_failed_calls_leave_no_graph_behind():
    """A failed call left ``weight`` with its graph (deepcopy then failed); a copy made inside
    once_per_step could not be made, or kept the step's weight for good."""
    import copy

    lin = weight_norm(nn.Linear(3, 2))
    with pytest.raises(RuntimeError):
        lin(torch.ones(4, 5))  # wrong width: the pre-hook ran, the call failed
    copy.deepcopy(lin)
    with once_per_step(lin):
        twin = copy.deepcopy(lin)
    with torch.no_grad():
        twin.weight_g.mul_(2)
    x = torch.ones(1, 3)
    torch.testing.assert_close(twin(x) - twin.bias, 2 * (lin(x) - lin.bias))  # g is used again
    twin(x).sum().backward()
    assert twin.weight_g.grad is not None
