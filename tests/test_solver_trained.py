"""Notebook 07's headline measurements on trained maps: the gradient error of a backward solved
to a tolerance, a method's cost to tolerance, the trained layer as a problem, its config, and
the recorded GPU run's summary."""

import pytest
import torch
from torch import nn

from deqlib.config import build
from deqlib.experiments.solver_study import (Problem, SolversExperiment, backward_gradient_error, device_run,
                                             solve_cost, trained_problem)
from deqlib.experiments.wikitext import WikiTextExperiment
from deqlib.models.transformer import DEQTransformerLM, TransformerConfig
from deqlib.solvers import solve


class Linear(nn.Module):
    """``f(z) = z A^T + b`` on ``(B, D)``: its fixed point and gradient have closed forms."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.A, self.b = nn.Parameter(A), nn.Parameter(b)

    def forward(self, z):
        return z @ self.A.T + self.b


def _linear_problem(rho: float = 0.9, D: int = 6, B: int = 3) -> tuple[Problem, torch.Tensor, torch.Tensor]:
    """A linear map with spectral radius ``rho``, its exact ``z*`` and the exact gradient of
    ``L = <g, z*>`` with respect to ``(A, b)`` (flat, in that order), all float64."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-rho, rho, D, dtype=torch.float64)) @ Q.T
    b = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(B, D, generator=g, dtype=torch.float64)
    f = Linear(A.clone(), b.clone())
    A_, b_ = A.clone().requires_grad_(), b.clone().requires_grad_()
    z_star = torch.linalg.solve(torch.eye(D, dtype=torch.float64) - A_, b_.T).T  # z (I - A^T) = b
    grads = torch.autograd.grad((w * z_star).sum(), [A_, b_])
    exact = torch.cat([x.reshape(-1) for x in grads])
    problem = Problem("linear", "linear", f, torch.zeros(B, D, dtype=torch.float64), w, 0.0)
    return problem, z_star.detach(), exact


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_backward_gradient_error_against_the_exact_gradient_of_a_linear_map(method):
    problem, z_star, exact = _linear_problem()
    tight = backward_gradient_error(problem, z_star, method, 1e-12, 2000, exact)
    assert tight["grad_error"] < 1e-9
    errs = {tol: backward_gradient_error(problem, z_star, method, tol, 2000, exact) for tol in (1e-2, 1e-3, 1e-5)}
    for tol, e in errs.items():
        assert e["residual"] < tol
        # a relative residual r leaves an error of at most about r / (1 - rho) = 10 r here
        assert e["grad_error"] < 20 * tol, (tol, e)
    assert errs[1e-5]["grad_error"] < errs[1e-2]["grad_error"]
    assert errs[1e-5]["nfe"] > errs[1e-2]["nfe"]


def test_backward_gradient_error_carries_the_error_of_where_it_is_linearized():
    problem, z_star, exact = _linear_problem()
    off = z_star + 1e-3 * z_star.norm() / z_star.numel() ** 0.5
    at_star = backward_gradient_error(problem, z_star, "anderson", 1e-10, 2000, exact)
    at_off = backward_gradient_error(problem, off, "anderson", 1e-10, 2000, exact)
    assert at_off["grad_error"] > 100 * at_star["grad_error"]


def test_solve_cost_reports_per_sample_calls_and_time_in_calls():
    # two samples contracting at 0.5 and 0.9: each stops on its own
    c = torch.tensor([[0.5], [0.9]])

    def f(z):
        return c * z + 1.0

    cost = solve_cost(f, torch.zeros(2, 1), "fixed_point", 500, 1e-6, repeats=3, call_s=1e-6)
    alone = [solve(lambda z, k=k: c[k:k + 1] * z + 1.0, torch.zeros(1, 1), "fixed_point", 500, 1e-6).nfe
             for k in range(2)]
    assert cost["nfe"] == max(alone) and cost["nfe_per_sample"] == sum(alone) / 2
    assert cost["converged"] == 1.0 and cost["residual"] < 1e-6
    assert cost["time_calls"] > 0 and cost["overhead"] == pytest.approx(cost["time_calls"] / cost["nfe"])


def test_trained_problem_is_the_models_own_map_on_the_segment():
    cfg = TransformerConfig(d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=6, mem_len=6, dropout=0.0,
                            cutoffs=(20,), div_val=1.0)
    torch.manual_seed(0)
    lm = DEQTransformerLM(cfg, 40).eval()
    g = torch.Generator().manual_seed(1)
    first, inputs = (torch.randint(0, 40, (2, 6), generator=g) for _ in range(2))
    memory = lm.run(first, first).memory
    z, fz, _ = lm.equilibrium_pair(inputs, memory)
    problem = trained_problem(lm, inputs, memory, seed=0, name="tiny")
    with torch.no_grad():
        assert torch.allclose(problem.f(z.detach()), fz.detach(), atol=1e-6)
    assert problem.z0.shape == problem.grad_out.shape == z.shape
    assert not any("weight_g" in n for n, _ in problem.f.named_parameters())  # folded into plain weights
    assert any("weight_g" in n for n, _ in lm.named_parameters())  # the model itself is untouched


@pytest.mark.parametrize("arms", [("post_ln", "post_ln_reduced"), ("post_ln_jr", "pre_ln_jr"), ("post_ln", "explicit")])
def test_trained_arms_need_one_without_and_one_with_jr(arms):
    with pytest.raises(ValueError, match=r"trained.arms"):
        SolversExperiment(trained=WikiTextExperiment(arms=("post_ln_jr", *arms) if "explicit" in arms else arms))


def test_trained_config_refuses_one_seed_and_bad_backward_tols_by_name():
    with pytest.raises(ValueError, match=r"trained.seeds"):
        SolversExperiment(trained=WikiTextExperiment(arms=("post_ln", "post_ln_jr"), seeds=(0,)))
    with pytest.raises(ValueError, match=r"backward_tols"):
        build(SolversExperiment, {"backward_tols": [1e-3, 2.0]})


def test_device_run_reads_calls_and_marks_unconverged_solves():
    row = {"problem": "p", "method": "broyden", "fwd_nfe": 10, "bwd_nfe": 200, "fwd_converged": True,
           "bwd_converged": False}
    compare = {"device": "GPU X", "config": {"problems": ["p"], "methods": ["broyden"], "libraries": ["deqlib"]},
               "rows": [{**row, "library": "deqlib"}]}
    run = device_run("software ... deqlib as of\ncommit `abc123f`, more", compare)
    assert run == {"device": "GPU X", "commit": "abc123f",
                   "rows": [{"problem": "p", "method": "broyden", "deqlib": "10 + 200*"}]}
