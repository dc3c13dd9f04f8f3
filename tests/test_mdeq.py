"""deqlib.models.mdeq and the CIFAR experiment's evaluation: gradients against an unrolled
reference, one map per solve, named config errors, training lowers the loss, hard NFE caps."""

from dataclasses import replace

import pytest
import torch

from deqlib.deq import SolverSettings
from deqlib.jacobian import JacobianPenalty
from deqlib.experiments.cifar import CifarEvalConfig, evaluate_model, hard_cap, nfe_to_tol
from deqlib.models.mdeq import MDEQ, MDEQConfig
from deqlib.nn import once_per_step
from deqlib.train import TensorBatches, TrainConfig, evaluate, train

TINY = MDEQConfig(channels=(4, 8), expansion=2, groups=2, dropout=0.0, downsample=1, head_channels=(4, 8),
                  final_channels=8, image_size=8, init_std=None)


def _tiny(cfg: MDEQConfig = TINY, seed: int = 0, forward=None, backward=None) -> MDEQ:
    torch.manual_seed(seed)
    return MDEQ(cfg, forward or SolverSettings("anderson", 30, 1e-3), backward or SolverSettings("anderson", 30, 1e-4))


def _contractive(model: MDEQ) -> MDEQ:
    """Shrink each block's last GroupNorm gain so that plain iteration of f contracts (a random
    MDEQ need not have a fixed point; the gradient identity needs one)."""
    with torch.no_grad():
        for block in model.f.blocks:
            block.gn3.weight.fill_(0.1)
            block.gn3.bias.normal_()
    return model


def test_shapes_of_state_and_logits():
    model = _tiny(replace(TINY, channels=(4, 8, 8), head_channels=(4, 8, 8)))
    x = torch.randn(5, 3, 8, 8)
    z0 = model.initial_state(model.stem(x))
    assert [tuple(z.shape) for z in z0] == [(5, 4, 4, 4), (5, 8, 2, 2), (5, 8, 1, 1)]
    logits, stats = model.predict(x)
    assert logits.shape == (5, 10) and stats.forward.rel_trace.shape[1] == 5


def test_implicit_gradient_matches_long_unrolled_gradient_float64():
    """IFT gradient of every parameter (weight-norm g and v included) against autograd through
    300 plain iterations of f from z0 = 0, on a contractive map, dropout off."""
    model = _contractive(_tiny()).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(backward: str, forward: SolverSettings) -> dict[str, torch.Tensor]:
        model.deq.backward = backward
        model.zero_grad()
        logits, stats = model.predict(x, forward_solver=forward)
        (logits * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, stats

    model.deq.backward_solver = SolverSettings("anderson", 100, 1e-12)
    implicit, st = grads("implicit", SolverSettings("anderson", 100, 1e-12))
    assert st.forward.status == "converged" and st.backward.status == "converged"
    unrolled, st = grads("unrolled", SolverSettings("fixed_point", 300, 1e-13))
    assert st.forward.status == "converged"
    names = set(implicit)
    assert {"f.blocks.0.conv1.weight_g", "f.blocks.0.conv1.weight_v", "f.post.1.1.weight_v"} <= names
    for name in sorted(names):
        ref = unrolled[name]
        err = float((implicit[name] - ref).norm() / ref.norm().clamp_min(1e-30))
        assert err <= 1e-5, (name, err)


def test_once_per_step_makes_f_one_map_with_dropout_on():
    model = _tiny(replace(TINY, dropout=0.5)).train()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        injection = model.stem(x)
        z = [torch.randn_like(t) for t in model.initial_state(injection)]
        with once_per_step(model):
            a, b = model.f(z, injection), model.f(z, injection)
        c, d = model.f(z, injection), model.f(z, injection)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    assert not all(torch.equal(tc, td) for tc, td in zip(c, d))  # fresh masks outside the context


@pytest.mark.parametrize(
    "change, message",
    [
        ({"channels": ()}, r"channels="),
        ({"channels": (4, 0)}, r"channels=\(4, 0\)"),
        ({"head_channels": (4,)}, r"head_channels=\[4\]"),
        ({"groups": 3}, r"groups=3 does not divide"),
        ({"dropout": 1.0}, r"dropout=1.0"),
        ({"expansion": 0}, r"expansion=0"),
        ({"downsample": -1}, r"downsample=-1"),
        ({"downsample": 3}, r"image_size=8 is too small for downsample=3"),
        ({"image_size": 10}, r"image_size=10 must be divisible by 2\*\*2"),
        ({"init_std": -0.1}, r"init_std=-0.1"),
        ({"num_classes": 1}, r"num_classes=1"),
    ],
)
def test_bad_config_values_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **change)


def test_pretrain_is_the_weight_tied_stack_and_has_no_solve():
    model = _tiny(forward=SolverSettings("anderson", 4, 1e-3)).eval()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        injection = model.stem(x)
        z = model.initial_state(injection)
        for _ in range(4):
            z = model.f(z, injection)
        expected = model.head(z)
        torch.testing.assert_close(model.unrolled(x, 4), expected)
    out = model((x, y), pretrain=True)
    assert out.stats is None
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, y))


def test_a_few_training_steps_lower_the_loss():
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 3, 8, 8, generator=g)  # one image per class, plus noise
    y = torch.randint(0, 10, (32,), generator=g)
    x = templates[y] + 0.5 * torch.randn(32, 3, 8, 8, generator=g)
    cfg = TrainConfig(epochs=20, batch_size=32, lr=1e-2, schedule="constant", seed=0,
                      forward=SolverSettings("anderson", 6, 1e-3), backward=SolverSettings("anderson", 6, 1e-4))
    model = _tiny(replace(TINY, final_channels=16), forward=cfg.forward, backward=cfg.backward)
    recs = train(model, TensorBatches((x, y), 32), cfg, progress=False).records
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert all(r["fwd_nfe"] <= 6 and r["bwd_nfe"] <= 6 for r in recs)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_hard_cap_stops_the_solve_at_exactly_k_calls(k):
    model = _tiny().eval()
    with torch.no_grad():
        _, stats = model.predict(torch.randn(4, 3, 8, 8), forward_solver=hard_cap(k))
    assert stats.forward.nfe == k and stats.forward.rel_trace.shape == (k, 4)


def test_evaluate_model_reports_each_cap_over_the_whole_set():
    model = _tiny()
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (23,))
    ev = CifarEvalConfig(batch_size=10, nfe=(1, 3), tol=1e-3, nfe_cap=12)
    res = evaluate_model(model, images, labels, ev)
    assert res["n"] == 23 and not model.training
    assert set(res) >= {"acc_nfe_1", "acc_nfe_3", "acc_tol", "reached_tol", "nfe_to_tol_mean"}
    with torch.no_grad():
        from deqlib.data.cifar import normalize

        logits, _ = model.predict(normalize(images), forward_solver=hard_cap(3))
    assert round(res["acc_nfe_3"] * 23) == int((logits.argmax(1) == labels).sum())


def test_nfe_to_tol_takes_the_first_crossing():
    trace = torch.tensor([[0.5, 0.5, 0.5], [1e-4, 0.1, 0.5], [1e-2, 1e-4, 0.5]])
    assert nfe_to_tol(trace, 1e-3).tolist() == [2, 3, 0]


@pytest.mark.parametrize("n, batch", [(23, 10), (10, 10), (7, 50), (1, 1)])
def test_evaluate_counts_every_item_exactly_once(n, batch):
    seen = []

    def fn(start, stop):
        seen.extend(range(start, stop))
        return {"n": stop - start, "idx": torch.arange(start, stop).sum()}

    tot = evaluate(fn, n, batch)
    assert sorted(seen) == list(range(n))
    assert tot == {"n": n, "idx": n * (n - 1) / 2}


def test_evaluate_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate(lambda a, b: {}, 5, 0)
    with pytest.raises(ValueError, match="n_items=0"):
        evaluate(lambda a, b: {}, 0, 5)


def test_eval_config_is_validated():
    with pytest.raises(ValueError, match=r"nfe=\(0,\)"):
        CifarEvalConfig(nfe=(0,))
    with pytest.raises(ValueError, match="method='newton'"):
        CifarEvalConfig(method="newton")


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one precision per process; start and leave this test with none set."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_mixed_precision_is_a_parameter_that_trains(fresh_accelerate_state):
    """bf16 autocast (what ``train.mixed_precision`` selects) runs the solve, the implicit
    backward and the penalty on a CPU; the loss stays finite."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    cfg = TrainConfig(epochs=1, batch_size=16, mixed_precision="bf16", forward=SolverSettings("anderson", 5, 1e-3),
                      backward=SolverSettings("anderson", 5, 1e-4), jacobian=JacobianPenalty(gamma=0.5, p=1.0))
    model = _tiny(forward=cfg.forward, backward=cfg.backward)
    recs = train(model, TensorBatches((x, y), 16), cfg, progress=False).records
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["jac_fro"]])).all() for r in recs)
    assert all(r["bwd_nfe"] >= 1 for r in recs)
