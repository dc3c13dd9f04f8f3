"""deqlib.models.mdeq: gradients against an unrolled reference, one map per solve, named config
errors, training lowers the loss, hard NFE caps, the official stem, the post-fusion groups and
the pretraining depth."""

import re
from dataclasses import replace

import pytest
import torch

from deqlib.deq import SolverSettings
from deqlib.jacobian import JacobianPenalty
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
def test_a_hard_cap_stops_the_solve_at_exactly_k_calls(k):
    model = _tiny().eval()
    with torch.no_grad():  # a tolerance no float reaches: only the cap ends the solve
        _, stats = model.predict(torch.randn(4, 3, 8, 8), forward_solver=SolverSettings("anderson", k, 1e-30))
    assert stats.forward.nfe == k and stats.forward.rel_trace.shape == (k, 4)


def test_the_official_stem_never_injects_a_negative_value():
    """The official stem ends in a ReLU (two conv3x3 + norm + ReLU, then conv1x1 + norm + ReLU);
    the compact one ends in a GroupNorm, whose output has both signs."""
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        official = _tiny(replace(TINY, stem="official")).stem(x)
        compact = _tiny(replace(TINY, stem="compact")).stem(x)
    assert official.shape == compact.shape == (6, 4, 4, 4)
    assert float(official.min()) >= 0 and float(official.max()) > 0
    assert float(compact.min()) < 0


@pytest.mark.parametrize("downsample, scales, convs3, ends_1x1", [(0, 2, 2, False), (0, 3, 2, True), (1, 2, 2, True),
                                                                  (3, 2, 3, True)])
def test_the_official_stem_has_the_official_layers(downsample, scales, convs3, ends_1x1):
    """max(2, downsample) conv3x3 (the first ``downsample`` of stride 2), then the 1x1 stage
    except with no downsampling and at most 2 scales, as the official code builds it."""
    channels = (4, 8, 8)[:scales]
    cfg = replace(TINY, stem="official", downsample=downsample, channels=channels, head_channels=channels,
                  image_size=16)
    convs = [m for m in _tiny(cfg).stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [3] * convs3 + ([1] if ends_1x1 else [])
    assert [c.stride[0] for c in convs[:convs3]] == [2] * downsample + [1] * (convs3 - downsample)


def test_post_fusion_groups_are_a_parameter():
    default = _tiny()
    halved = _tiny(replace(TINY, channels=(4, 8), groups=2, post_groups=1))
    assert [p[2].num_groups for p in default.f.post] == [2, 2]
    assert [p[2].num_groups for p in halved.f.post] == [1, 1]
    assert [b.gn1.num_groups for b in halved.f.blocks] == [2, 2]  # the blocks keep theirs


def test_pretraining_unrolls_pretrain_depth_layers():
    forward = SolverSettings("anderson", 4, 1e-3)
    model = _tiny(replace(TINY, pretrain_depth=2), forward=forward).eval()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        out = model((x, y), pretrain=True)
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(model.unrolled(x, 2), y))
        assert not torch.allclose(out.loss, torch.nn.functional.cross_entropy(model.unrolled(x, 4), y))
    assert _tiny(forward=forward).pretrain_depth == 4  # default: the forward threshold


@pytest.mark.parametrize("change, message", [({"stem": "resnet"}, "stem='resnet'"),
                                             ({"post_groups": 0}, "post_groups=0"),
                                             ({"post_groups": 3}, "post_groups=3 does not divide"),
                                             ({"pretrain_depth": 0}, "pretrain_depth=0")])
def test_bad_stem_groups_and_depth_are_named(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(TINY, **change)


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
