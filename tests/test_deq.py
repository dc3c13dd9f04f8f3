"""The DEQ layer: implicit gradients against autograd through a long unrolled solve."""

import pytest
import torch
from torch import nn

from deqlib import DEQ, SolverSettings


EXACT_FWD = SolverSettings(method="anderson", max_iter=400, tol=1e-13, options={"m": 6})
EXACT_BWD = SolverSettings(method="anderson", max_iter=400, tol=1e-13, options={"m": 6})
UNROLLED = SolverSettings(method="fixed_point", max_iter=3000, tol=1e-14)


@pytest.fixture(autouse=True)
def float64_default():
    """Gradient checks need float64. Set per test (not at import, which would leak into every
    module collected after this one) and restore afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class MLPMap(nn.Module):
    """f(z, x) = tanh(W z + U x + b) with ||W||_2 = 0.8 (a contraction)."""

    def __init__(self, dz=12, dx=5):
        super().__init__()
        self.W = nn.Linear(dz, dz)
        self.U = nn.Linear(dx, dz, bias=False)
        with torch.no_grad():
            self.W.weight.mul_(0.8 / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


class ConvMap(nn.Module):
    """A small residual conv block with GroupNorm, input injected before the norm."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        with torch.no_grad():
            self.conv1.weight.mul_(0.3)
            self.conv2.weight.mul_(0.3)

    def forward(self, z, x):
        return 0.5 * self.norm(self.conv2(torch.relu(self.conv1(z))) + x)


class TwoScaleMap(nn.Module):
    """States at two resolutions that feed each other (an MDEQ-like multi-tensor state)."""

    def __init__(self, c=3):
        super().__init__()
        self.hi = nn.Conv2d(c, c, 3, padding=1)
        self.lo = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.up = nn.Conv2d(2 * c, c, 1)
        for m in (self.hi, self.lo, self.down, self.up):
            with torch.no_grad():
                m.weight.mul_(0.2)

    def forward(self, z, x):
        hi, lo = z
        up = nn.functional.interpolate(self.up(lo), scale_factor=2, mode="nearest")
        return [torch.tanh(self.hi(hi) + up + x), torch.tanh(self.lo(lo) + self.down(hi))]


def _grads(deq, x, z0, weights):
    deq.zero_grad()
    x = x.clone().requires_grad_()
    z, stats = deq(x, z0)
    zs = z if isinstance(z, list) else [z]
    loss = sum((w * t).sum() for w, t in zip(weights, zs))
    loss.backward()
    return [x.grad] + [p.grad.clone() for p in deq.parameters()], stats


def _assert_rel_close(got, ref, tol):
    for g, r in zip(got, ref):
        err = (g - r).norm() / r.norm()
        assert err <= tol, f"relative error {err:.2e} > {tol:g}"


def _case(name):
    torch.manual_seed(0)
    if name == "mlp":
        f, x = MLPMap(), torch.randn(6, 5)
        z0 = torch.zeros(6, 12)
    elif name == "conv":
        f, x = ConvMap(), torch.randn(3, 4, 6, 6)
        z0 = torch.zeros(3, 4, 6, 6)
    else:
        f, x = TwoScaleMap(), torch.randn(2, 3, 8, 8)
        z0 = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 6, 4, 4)]
    zs = z0 if isinstance(z0, list) else [z0]
    weights = [torch.randn_like(t) for t in zs]
    return f, x, z0, weights


@pytest.mark.parametrize("name", ["mlp", "conv", "two_scale"])
@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_implicit_gradient_matches_long_unrolled_solve(name, method):
    f, x, z0, weights = _case(name)
    ref_deq = DEQ(f, forward_solver=UNROLLED, backward="unrolled")
    ref, ref_stats = _grads(ref_deq, x, z0, weights)
    assert ref_stats.forward.status == "converged", ref_stats.forward.reason

    fwd = EXACT_FWD.replace(method=method, options={} if method == "broyden" else {"m": 6})
    deq = DEQ(f, forward_solver=fwd, backward_solver=EXACT_BWD.replace(method=method, options=fwd.options))
    got, stats = _grads(deq, x, z0, weights)
    assert stats.forward.status == "converged" and stats.backward.status == "converged"
    assert len(got) == len(ref) >= 3  # the input and every parameter
    _assert_rel_close(got, ref, 1e-6)


def test_gradient_is_wrong_without_the_implicit_solve():
    """Sanity of the check above: a one-step (Jacobian-free) gradient is measurably off."""
    f, x, z0, weights = _case("mlp")
    ref, _ = _grads(DEQ(f, forward_solver=UNROLLED, backward="unrolled"), x, z0, weights)
    approx, _ = _grads(DEQ(f, forward_solver=EXACT_FWD, backward="phantom", phantom_steps=1,
                           phantom_damping=1.0), x, z0, weights)
    errs = [((a - r).norm() / r.norm()).item() for a, r in zip(approx, ref)]
    assert max(errs) > 1e-2, errs


def test_phantom_gradient_approaches_exact_with_more_steps():
    f, x, z0, weights = _case("mlp")
    ref, _ = _grads(DEQ(f, forward_solver=UNROLLED, backward="unrolled"), x, z0, weights)
    errs = []
    for k in (1, 5, 40):
        got, _ = _grads(DEQ(f, forward_solver=EXACT_FWD, backward="phantom", phantom_steps=k,
                            phantom_damping=1.0), x, z0, weights)
        errs.append(max(((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs


def test_two_calls_before_one_backward():
    f, x, z0, weights = _case("mlp")
    x2 = torch.randn_like(x)
    deq = DEQ(f, forward_solver=EXACT_FWD, backward_solver=EXACT_BWD)
    one, _ = _grads(deq, x, z0, weights)
    two, _ = _grads(deq, x2, z0, weights)
    deq.zero_grad()
    za, sa = deq(x, z0)
    zb, sb = deq(x2, z0)
    ((weights[0] * za).sum() + (weights[0] * zb).sum()).backward()
    both = [p.grad for p in deq.parameters()]
    _assert_rel_close(both, [a + b for a, b in zip(one[1:], two[1:])], 1e-9)
    assert sa.backward is not None and sb.backward is not None and sa.backward is not sb.backward


def test_a_retained_graph_can_be_differentiated_twice():
    """``backward(retain_graph=True)`` then ``backward()`` accumulates the same gradient twice;
    without retaining, the second backward gets PyTorch's own error, not a crash inside."""
    f, x, z0, weights = _case("mlp")
    deq = DEQ(f, forward_solver=EXACT_FWD, backward_solver=EXACT_BWD)
    z, _ = deq(x, z0)
    loss = (weights[0] * z).sum()
    first = torch.autograd.grad(loss, list(deq.parameters()), retain_graph=True)
    again = torch.autograd.grad(loss, list(deq.parameters()), retain_graph=True)
    _assert_rel_close(list(again), list(first), 1e-12)
    deq.zero_grad()
    loss.backward(retain_graph=True)
    loss.backward()
    _assert_rel_close([p.grad for p in deq.parameters()], [2 * g for g in first], 1e-12)
    z, _ = deq(x, z0)
    loss = (weights[0] * z).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_no_grad_and_eval_return_the_equilibrium_without_a_graph():
    f, x, z0, _ = _case("conv")
    deq = DEQ(f, forward_solver=EXACT_FWD)
    with torch.no_grad():
        z, stats = deq(x, z0)
    assert not z.requires_grad and stats.backward is None
    torch.testing.assert_close(z, f(z, x), rtol=1e-10, atol=1e-10)
    deq.eval()
    z_eval, _ = deq(x, z0)
    torch.testing.assert_close(z_eval, z)
    with pytest.raises(RuntimeError, match="without autograd"):
        stats.jacobian_inputs()


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
@pytest.mark.parametrize("max_iter", [1, 6])
def test_jacobian_inputs_are_a_pair_of_the_forward_without_a_new_call(backward, max_iter):
    """``jacobian_inputs()`` hands back a call ``f(z*)`` the forward made (a call made later
    would fall outside the model's ``once_per_step``: a new dropout mask) and its VJPs are
    those of the exact Jacobian at ``z*``."""
    f, x, z0, _ = _case("mlp")
    calls = [0]

    def counted(z, x):
        calls[0] += 1
        return f(z, x)

    deq = DEQ(counted, forward_solver=SolverSettings("fixed_point", max_iter, 1e-30), backward=backward)
    deq(x, z0)[1].jacobian_inputs()  # a pair of the forward may be asked for more than once
    _, stats = deq(x, z0)
    made = calls[0]
    z_star, f_star = stats.jacobian_inputs()
    assert calls[0] == made
    with torch.no_grad():
        torch.testing.assert_close(f_star, f(z_star, x), rtol=1e-12, atol=1e-12)
    v = torch.randn_like(f_star)
    (vjp,) = torch.autograd.grad(f_star, z_star, v)
    J = torch.func.vmap(torch.func.jacrev(lambda z, xi: f(z, xi)))(z_star.detach(), x)  # (B, D, D)
    torch.testing.assert_close(vjp, torch.einsum("bi,bij->bj", v, J), rtol=1e-10, atol=1e-12)


def test_hard_stop_override_counts_calls():
    f, x, z0, _ = _case("mlp")
    deq = DEQ(f, forward_solver=EXACT_FWD)
    with torch.no_grad():
        for k in (1, 2, 5):
            _, stats = deq(x, z0, forward_solver=EXACT_FWD.replace(max_iter=k))
            assert stats.forward.nfe == k


def test_multi_tensor_output_keeps_shapes():
    f, x, z0, _ = _case("two_scale")
    z, stats = DEQ(f, forward_solver=EXACT_FWD)(x, z0)
    assert [t.shape for t in z] == [t.shape for t in z0]
    assert stats.forward.z.shape == (2, 3 * 64 + 6 * 16)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(backward="adjoint"), "backward"),
        (dict(phantom_steps=0), "phantom_steps"),
        (dict(phantom_damping=0.0), "phantom_damping"),
    ],
)
def test_bad_layer_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DEQ(MLPMap(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(phantom_steps=2.0), r"phantom_steps must be an integer >= 1, got phantom_steps=2.0"),
    (dict(phantom_damping="0.5"), r"phantom_damping must be a finite number in \(0, 1\], got phantom_damping='0.5'"),
    (dict(backward=["implicit"]), r"backward=\['implicit'\]"),
])
def test_layer_arguments_are_refused_by_type_naming_them(kwargs, message):
    """A whole float was taken for a step count and a string failed a comparison (TypeError)."""
    with pytest.raises(ValueError, match=message):
        DEQ(MLPMap(), **kwargs)


def test_an_empty_batch_is_refused_before_any_call_of_f():
    calls = []
    deq = DEQ(lambda z, x: calls.append(1) or z)
    with pytest.raises(ValueError, match=r"batch dimension.*\(0, 3\)"):
        deq(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="batch dimension"):
        deq(None, [torch.zeros(2, 3), torch.zeros(())])
    assert not calls


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(method="secant"), "method"),
        (dict(tol=0), "tol"),
        (dict(max_iter=0), "max_iter"),
        (dict(stop_mode="relative"), "stop_mode"),
        (dict(options={"window": 3}), "window"),
    ],
)
def test_bad_solver_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SolverSettings(**kwargs)


@pytest.mark.parametrize("args, message", [
    (("anderson", 10.0), r"max_iter must be an integer >= 1, got max_iter=10.0"),
    (("anderson", 10, "1e-3"), r"tol must be a finite number > 0, got tol='1e-3'"),
    (("anderson", 10, 1e-3, "rel", 3), r"options must be a mapping of names to values, got options=3"),
    (("anderson", 10, 1e-3, "rel", {"m": 2.0}), r"m must be an integer >= 1, got m=2.0"),
])
def test_positional_solver_settings_are_checked_by_type(args, message):
    """``SolverSettings("anderson", 10.0)`` was accepted, and pretraining (which loops
    ``range(max_iter)``) crashed with a TypeError naming no key."""
    with pytest.raises(ValueError, match=message):
        SolverSettings(*args)


# Second derivatives: a Hessian-vector product ``d/dtheta <v, dL/dtheta>`` of the parameters,
# taken by differentiating a gradient made with ``create_graph=True``.


def _hvp(deq, x, z0, weight, v):
    params = list(deq.parameters())
    z, _ = deq(x, z0)
    grads = torch.autograd.grad((weight * z).sum(), params, create_graph=True)
    return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, v)), params)


def _equilibrium_hvp(f, x, z0, weight, v, h=1e-6):
    """The equilibrium's own HVP by central differences of the exact implicit gradient along
    ``v``: the error is O(h^2) (1e-4 relative at h = 1e-3 here, 1e-10 at 1e-6) plus a rounding
    of ~1e-13 / h."""
    deq = DEQ(f, forward_solver=EXACT_FWD, backward_solver=EXACT_BWD)
    params = list(deq.parameters())

    def grad_at(step):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(d, alpha=step)
        try:
            z, _ = deq(x, z0)
            return torch.autograd.grad((weight * z).sum(), params)
        finally:
            with torch.no_grad():
                for p, d in zip(params, v):
                    p.sub_(d, alpha=step)

    return [(a - b) / (2 * h) for a, b in zip(grad_at(h), grad_at(-h))]


def test_implicit_mode_refuses_a_second_derivative_and_names_the_alternative():
    """Its gradient holds z* and the backward solution fixed in theta: differentiated again it
    was wrong by as much as its size. A gradient made with ``create_graph=True`` is still the
    exact first derivative; differentiating it raises."""
    f, x, z0, (weight,) = _case("mlp")
    deq = DEQ(f, forward_solver=EXACT_FWD, backward_solver=EXACT_BWD)
    params = list(deq.parameters())
    z, _ = deq(x, z0)
    plain = torch.autograd.grad((weight * z).sum(), params)
    z, _ = deq(x, z0)
    grads = torch.autograd.grad((weight * z).sum(), params, create_graph=True)
    _assert_rel_close(grads, plain, 1e-12)
    with pytest.raises(RuntimeError, match=r"backward='implicit'.*backward='unrolled'"):
        torch.autograd.grad(sum((g ** 2).sum() for g in grads), params)
    # The same through the input, and through the loss weights (a gradient penalty on x).
    x_in, w_in = x.clone().requires_grad_(), weight.clone().requires_grad_()
    z, _ = deq(x_in, z0)
    (gx,) = torch.autograd.grad((w_in * z).sum(), x_in, create_graph=True)
    for wrt in (x_in, w_in):
        with pytest.raises(RuntimeError, match=r"backward='implicit'"):
            torch.autograd.grad(gx.pow(2).sum(), wrt, retain_graph=True)


def test_unrolled_second_derivative_is_the_equilibriums_when_converged():
    """``"unrolled"`` differentiates its iteration exactly, to any order; run to convergence,
    that is the equilibrium's second derivative."""
    f, x, z0, (weight,) = _case("mlp")
    v = [torch.randn_like(p) for p in f.parameters()]
    ref = _equilibrium_hvp(f, x, z0, weight, v)
    got = _hvp(DEQ(f, forward_solver=UNROLLED, backward="unrolled"), x, z0, weight, v)
    _assert_rel_close(got, ref, 1e-8)


def test_phantom_second_derivative_is_that_of_its_steps_from_a_fixed_z_star():
    """``"phantom"`` differentiates its ``k`` damped steps from z* exactly, to any order, with
    z* a constant: not the equilibrium's second derivative, even where its first is close."""
    f, x, z0, (weight,) = _case("mlp")
    v = [torch.randn_like(p) for p in f.parameters()]
    k, lam = 5, 0.8
    deq = DEQ(f, forward_solver=EXACT_FWD, backward="phantom", phantom_steps=k, phantom_damping=lam)
    got = _hvp(deq, x, z0, weight, v)
    with torch.no_grad():
        z_star, _ = deq(x, z0)  # f(z*): z* to 1e-13

    class Steps(nn.Module):  # the same k steps, written out, from the constant z_star
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, x, z0):
            z = z_star
            for _ in range(k):
                z = torch.lerp(z, self.f(z, x), lam)
            return z, None

    _assert_rel_close(got, _hvp(Steps(), x, z0, weight, v), 1e-10)
    ref = _equilibrium_hvp(f, x, z0, weight, v)
    assert max(((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)) > 1e-2


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
@pytest.mark.parametrize("out, z0, said", [
    (lambda z: z.reshape(4, 2, 3), torch.zeros(4, 3, 2), r"a tensor \(4, 2, 3\)"),
    (lambda z: [z], torch.zeros(4, 3, 2), r"a list of \[\(4, 3, 2\)\]"),
    (lambda z: z[1], [torch.zeros(2, 3), torch.zeros(2, 4)], r"a tensor \(2, 4\)"),
    (lambda z: [z[0], z[1], z[1]], [torch.zeros(2, 3), torch.zeros(2, 4)],
     r"a list of \[\(2, 3\), \(2, 4\), \(2, 4\)\]"),
    (lambda z: [z[1], z[0]], [torch.zeros(2, 3), torch.zeros(2, 4)], r"a list of \[\(2, 4\), \(2, 3\)\]"),
], ids=["transposed", "list_for_tensor", "tensor_for_list", "one_more", "swapped"])
def test_an_output_of_f_shaped_unlike_the_state_is_named(backward, out, z0, said):
    """Packing flattened whatever f returned: a transposed output of as many numbers was read in
    the state's order (wrong results, no error); a list for a tensor failed in ``reshape``."""
    deq = DEQ(lambda z, x: out(z), forward_solver=SolverSettings("fixed_point", 3, 1e-6), backward=backward)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"f\(z, x\) must return .* got " + said):
            deq(None, z0)


def test_unrolled_mode_refuses_settings_of_another_method_by_name():
    """The unrolled mode iterates f plainly; Anderson's or damped settings given to it would be
    ignored, so they are refused, at construction and per call, naming the method."""
    f = MLPMap()
    with pytest.raises(ValueError, match=r"backward='unrolled'.*method='anderson'"):
        DEQ(f, forward_solver=EXACT_FWD, backward="unrolled")
    with pytest.raises(ValueError, match=r"beta"):
        DEQ(f, forward_solver=UNROLLED.replace(options={"beta": 0.5}), backward="unrolled")
    deq = DEQ(f, backward="unrolled")  # the default: plain iteration
    assert deq.forward_solver.method == "fixed_point"
    x, z0 = torch.randn(3, 5), torch.zeros(3, 12)
    z, stats = deq(x, z0)
    assert stats.forward.nfe >= 2 and torch.allclose(z, f(z, x), atol=1e-3)
    with pytest.raises(ValueError, match=r"method='broyden'"):
        deq(x, z0, forward_solver=SolverSettings(method="broyden", max_iter=5))
