"""deqlib.models.transformer: causality, memory, gradients, dropout, adaptive softmax, config,
exact resume with the memory carried between segments."""

import math
from dataclasses import replace

import pytest
import torch

from deqlib.data.wikitext import LMStream
from deqlib.deq import DEQ, SolverSettings
from deqlib.experiments.wikitext import LMEvalConfig, WikiTextExperiment, activation_memory, evaluate, future_token_leak
from deqlib.jacobian import JacobianPenalty
from deqlib.models.transformer import DEQTransformerLM, Memory, TransformerConfig
from deqlib.nn import once_per_step
from deqlib.train import TrainConfig, train

V = 30
SMALL = TransformerConfig(d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=5, mem_len=3, dropout=0.0,
                          cutoffs=(10, 20), div_val=2.0, n_layer=3, pretrain_layers=2, init_std=0.2)
TIGHT = SolverSettings("anderson", 100, 1e-12)


def _model(cfg=SMALL, contractive=True, forward=TIGHT, backward=TIGHT, **kw):
    """A float64 model; ``contractive`` makes f a contraction (strong attention output driven
    by the injection, weak dependence of q, k, v on z) so that plain iteration converges."""
    torch.manual_seed(0)
    m = DEQTransformerLM(cfg, V, forward, backward, **kw).double()
    if contractive:
        with torch.no_grad():
            m.layer.attn.qkv.weight_g.mul_(0.3)
            m.layer.attn.out.weight_g.mul_(10.0)
            m.inject.weight.mul_(3.0)
    return m


def _tokens(B=3, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)


def _memory(B=3, M=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return Memory(torch.randn(B, M, 16, generator=g, dtype=torch.float64),
                  torch.randn(B, M, 48, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("pre_ln", [False, True])
def test_layer_output_at_t_ignores_later_positions(pre_ln):
    m = _model(replace(SMALL, pre_ln=pre_ln))
    x, _ = _tokens()
    u = m.inject(m.embed(x))
    z = torch.randn(3, 5, 16, dtype=torch.float64)
    out = m.layer(z, m.context(u, _memory()))
    t = 2
    z2, u2 = z.clone(), u.clone()
    z2[:, t + 1:] += 5.0
    u2[:, t + 1:] -= 3.0
    out2 = m.layer(z2, m.context(u2, _memory()))
    torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-12)
    assert (out2[:, t + 1:] - out[:, t + 1:]).abs().max() > 1e-3  # later positions do change


@pytest.mark.parametrize("mode", ["explicit", "equilibrium"])
def test_model_hidden_state_at_t_ignores_later_tokens(mode):
    """Exact for the explicit stack; for the equilibrium up to the solve's tolerance (a solver
    mixes whole sequences, so only the fixed point itself is causal)."""
    m = _model(forward=SolverSettings("fixed_point", 200, 1e-13))
    x, y = _tokens()
    layers = 3 if mode == "explicit" else None
    h = m.run(x, y, _memory(), layers=layers).hidden
    x2 = x.clone()
    x2[:, 3:] = (x2[:, 3:] + 7) % V
    h2 = m.run(x2, y, _memory(), layers=layers).hidden
    tol = 0.0 if mode == "explicit" else 1e-9
    assert (h2[:, :3] - h[:, :3]).abs().max() <= tol
    assert (h2[:, 3:] - h[:, 3:]).abs().max() > 1e-3


@pytest.mark.parametrize("solver, leaks", [
    (SolverSettings("fixed_point", 3, 1e-30), False),  # each call is causal, so is any iterate
    (SolverSettings("anderson", 3, 1e-30), True),  # weights mixed over the segment: later tokens in
    (SolverSettings("anderson", 100, 1e-12), False),  # at the fixed point itself: causal again
])
def test_future_token_leak_is_zero_only_for_a_causal_solve(solver, leaks):
    m = _model()
    tokens = torch.randint(0, V, (3 * 11,), generator=torch.Generator().manual_seed(4))
    leak = future_token_leak(m, tokens, 3, 5, forward_solver=solver)
    assert leak["nfe"] == solver.max_iter if solver.max_iter < 100 else leak["nfe"] < 100
    if leaks:
        assert leak["max"] > 1e-4 and 0 < leak["mean"] <= leak["max"]
    else:
        assert leak["max"] <= (0.0 if solver.method == "fixed_point" else 1e-9)
    assert m.training  # put back as found
    with pytest.raises(ValueError, match="no second segment"):
        future_token_leak(m, tokens[:20], 3, 5)


def test_memory_changes_the_output_and_holds_the_last_mem_len_states():
    m = _model()
    x, y = _tokens()
    without = m.run(x, y, None)
    with_mem = m.run(x, y, _memory())
    assert (with_mem.hidden - without.hidden).abs().max() > 1e-3
    assert with_mem.memory.z.shape == (3, 3, 16) and with_mem.memory.u.shape == (3, 3, 48)
    torch.testing.assert_close(with_mem.memory.z, with_mem.hidden[:, -3:])
    assert not with_mem.memory.z.requires_grad
    long_mem = replace(SMALL, mem_len=7)  # longer than a segment: the old memory's tail is kept
    m7 = _model(long_mem)
    out = m7.run(x, y, _memory(M=4))
    torch.testing.assert_close(out.memory.z[:, :2], _memory(M=4).z[:, -2:])
    assert m7.run(x, y, None).memory.z.shape == (3, 5, 16)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_implicit_gradient_matches_unrolled_in_float64(pre_ln):
    cfg = replace(SMALL, pre_ln=pre_ln)
    x, y = _tokens()
    grads = {}
    for backward in ("implicit", "unrolled"):
        m = _model(cfg)
        fwd = SolverSettings("fixed_point", 300, 1e-14) if backward == "unrolled" else TIGHT
        m.deq = DEQ(m.layer, fwd, TIGHT, backward=backward)
        out = m.run(x, y, _memory())
        assert out.stats.forward.rel_residual.max() < 1e-10
        out.loss.backward()
        grads[backward] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for name, g in grads["unrolled"].items():
        torch.testing.assert_close(grads["implicit"][name], g, rtol=1e-6, atol=1e-10, msg=name)
    assert grads["implicit"]["layer.attn.qkv.weight_v"].abs().max() > 1e-6


def test_dropout_mask_and_weights_are_fixed_within_a_step():
    m = _model(replace(SMALL, dropout=0.3)).train()
    x, _ = _tokens()
    z = torch.randn(3, 5, 16, dtype=torch.float64)
    with once_per_step(m):
        ctx = m.context(m.inject(m.embed(x)), _memory())
        a, b = m.layer(z, ctx), m.layer(z, ctx)
    assert torch.equal(a, b)
    c, d = m.layer(z, ctx), m.layer(z, ctx)  # outside the block: fresh masks per call
    assert not torch.equal(c, d)
    m.eval()
    assert torch.equal(m.layer(z, ctx), m.layer(z, ctx))


def test_adaptive_softmax_normalizes_and_embedding_is_tied():
    m = _model()
    h = torch.randn(7, 16, dtype=torch.float64)
    logp = m.softmax.log_prob(h)
    assert logp.shape == (7, V)
    torch.testing.assert_close(logp.logsumexp(dim=1), torch.zeros(7, dtype=torch.float64), atol=1e-12, rtol=0)
    emb = m.embed(torch.tensor([[3, 12, 25]]))[0] / math.sqrt(16)
    torch.testing.assert_close(emb[0], m.softmax.head.weight[3])
    tail0, tail1 = m.softmax.tail
    torch.testing.assert_close(emb[1], tail0[1].weight[12 - 10] @ tail0[0].weight)
    torch.testing.assert_close(emb[2], tail1[1].weight[25 - 20] @ tail1[0].weight)
    x, y = _tokens()  # the model's per-target log-probabilities are rows of the full table
    out = m.run(x, y, None)
    full = m.softmax.log_prob(out.hidden.reshape(-1, 16))
    torch.testing.assert_close(out.logprob.reshape(-1), full.gather(1, y.reshape(-1, 1))[:, 0])


@pytest.mark.parametrize("change, message", [
    ({"d_model": 15}, "d_model=15"),
    ({"n_head": 0}, "n_head=0"),
    ({"mem_len": -1}, "mem_len=-1"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"cutoffs": (20, 10)}, r"cutoffs=\(20, 10\)"),
    ({"cutoffs": ()}, "cutoffs"),
    ({"div_val": 0.5}, "div_val=0.5"),
    ({"div_val": 64.0}, "div_val=64.0"),
    ({"pre_ln": "yes"}, "pre_ln='yes'"),
    ({"init_std": 0.0}, "init_std=0.0"),
])
def test_bad_config_values_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **change)


def test_cutoffs_must_fit_the_vocabulary():
    with pytest.raises(ValueError, match=r"cutoffs=\[10, 30\].*vocabulary size 30"):
        DEQTransformerLM(replace(SMALL, cutoffs=(10, 30)), V)
    with pytest.raises(ValueError, match="arms"):
        WikiTextExperiment(arms=("post_ln", "postln"))
    with pytest.raises(ValueError, match="nfe_caps"):
        LMEvalConfig(nfe_caps=(0,))


def _stream(n=400, B=4, L=5):
    g = torch.Generator().manual_seed(5)
    return LMStream(torch.randint(0, V, (n,), generator=g), B, L)


CFG = TrainConfig(epochs=2, batch_size=4, lr=3e-3, pretrain_steps=3, grad_clip=1.0, seed=4,
                  forward=SolverSettings("anderson", 8, 1e-3), backward=SolverSettings("broyden", 8, 1e-4),
                  jacobian=JacobianPenalty(gamma=1.0, p=0.5))


def test_resume_with_memory_is_bit_exact(tmp_path):
    cfg_model = replace(SMALL, dropout=0.1, init_std=0.05)

    def fresh():
        torch.manual_seed(0)
        return DEQTransformerLM(cfg_model, V, CFG.forward, CFG.backward)

    stream = _stream()
    assert stream.steps_per_epoch == 19
    a = fresh()
    full = train(a, stream, CFG, run_dir=tmp_path / "a", progress=False)
    assert [r["mem_len"] for r in full.records[:3]] == [0.0, 3.0, 3.0]
    assert full.records[19]["mem_len"] == 0.0  # a new epoch starts the stream, and the memory, anew
    b = fresh()
    train(b, stream, CFG, run_dir=tmp_path / "b", progress=False, stop_after=11)
    c = fresh()
    with _no_warning():
        rest = train(c, stream, CFG, run_dir=tmp_path / "b", progress=False)
    assert rest.resumed_from == 11
    for (name, pa), pc in zip(a.state_dict().items(), c.state_dict().values()):
        if name.endswith("_extra_state"):
            assert pa["memory_at"] == pc["memory_at"]
            assert all(torch.equal(x, y) for x, y in zip(pa["memory"], pc["memory"]))
        else:
            assert torch.equal(pa, pc), name
    for ra, rc in zip(full.records, rest.records):
        for k in ("loss", "fwd_nfe", "bwd_nfe", "jac_fro", "mem_len"):
            assert ra[k] == rc[k] or (math.isnan(ra[k]) and math.isnan(rc[k])), (k, ra["step"])


class _no_warning:
    """Fail if a warning is raised inside the block (a lost memory warns)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_a_lost_memory_is_not_used_silently():
    m = DEQTransformerLM(replace(SMALL, init_std=0.05), V)
    stream = _stream()
    m(stream.batch(0, 0))
    with pytest.warns(UserWarning, match="not the segment before"):
        out = m(stream.batch(0, 2))  # segment 1 was skipped
    assert out.metrics["mem_len"] == 0.0


def test_evaluate_scores_every_column_but_the_first():
    m = _model(forward=SolverSettings("anderson", 6, 1e-3))
    tokens = torch.randint(0, V, (103,), generator=torch.Generator().manual_seed(3))
    ev = evaluate(m, tokens, batch_size=4, tgt_len=5)
    assert ev["tokens"] == 4 * (103 // 4 - 1)  # 25 columns -> 24 targets per row
    # the same by hand, segment by segment with the memory carried
    data = tokens[:100].view(4, 25)
    nll, mem = 0.0, None
    m.eval()
    with torch.no_grad():
        for s in range(0, 24, 5):
            e = min(s + 5, 24)  # the last segment is 4 long
            out = m.run(data[:, s:e], data[:, s + 1:e + 1], mem)
            nll -= float(out.logprob.sum())
            mem = out.memory
    assert ev["nll"] == pytest.approx(nll / ev["tokens"], rel=1e-12)
    assert ev["ppl"] == pytest.approx(math.exp(ev["nll"]))
    assert 1 <= ev["nfe"] <= 6


def test_activation_memory_of_the_equilibrium_does_not_grow_with_depth():
    """The implicit backward saves one call of f whatever the NFE; the explicit stack saves
    the same amount again for every layer it adds."""
    x, y = _tokens(B=2)
    core = {}
    for n in (2, 3, 4):
        m = DEQTransformerLM(replace(SMALL, n_layer=n), V, explicit=True).double()
        core[("explicit", n)] = activation_memory(m, x, y)["core"]
        m = DEQTransformerLM(SMALL, V, SolverSettings("anderson", 2 * n, 1e-12)).double()
        core[("deq", n)] = activation_memory(m, x, y)["core"]
    per_layer = core[("explicit", 3)] - core[("explicit", 2)]
    assert per_layer > 0 and core[("explicit", 4)] - core[("explicit", 3)] == per_layer
    assert core[("deq", 2)] == core[("deq", 3)] == core[("deq", 4)] < core[("explicit", 2)]
    m = DEQTransformerLM(SMALL, V).double()
    with_jr = activation_memory(m, x, y, JacobianPenalty(gamma=1.0))["core"]
    assert with_jr > core[("deq", 2)]


def test_bench_transformer_runs_on_cpu_at_a_small_size():
    from deqlib.bench import bench_transformer

    small = {"model.d_model": 16, "model.n_head": 2, "model.d_head": 8, "model.d_inner": 32, "model.tgt_len": 6,
             "model.mem_len": 6, "model.cutoffs": [20, 40], "model.n_layer": 3}
    report = bench_transformer("paper", batch=2, overrides=small, vocab=60, repeats=1)
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["deq", "deq+jr", "explicit"] and rows["explicit"]["time_vs_explicit"] == 1.0
    assert 1 <= rows["deq"]["fwd_nfe"] <= 12 and rows["explicit"]["fwd_nfe"] is None
    assert rows["deq"]["core_saved_bytes"] < rows["deq+jr"]["core_saved_bytes"]
    assert rows["deq"]["core_saved_bytes"] < rows["explicit"]["core_saved_bytes"]
    assert all(r["peak_bytes"] > 0 for r in rows.values()) and report["device"].startswith("CPU")


def test_forward_jitter_lowers_the_training_threshold_by_a_seeded_draw():
    """``forward_jitter=2``: each DEQ training step solves with 6, 5 or 4 calls at most (the
    tolerance is out of reach), drawn from torch's global generator; evaluation (``run``) and
    pretraining are not jittered, and the same seed draws the same thresholds."""
    stream = _stream()

    def nfes(seed):
        torch.manual_seed(0)
        m = DEQTransformerLM(SMALL, V, SolverSettings("anderson", 6, 1e-30), TIGHT, forward_jitter=2).double()
        out = []
        for i in range(12):
            torch.manual_seed(seed * 100 + i)
            out.append(m(stream.batch(0, i)).stats.forward.nfe)
        return m, out

    m, a = nfes(1)
    assert set(a) == {4, 5, 6}
    assert nfes(1)[1] == a and nfes(2)[1] != a
    x, y = _tokens()
    assert m.run(x, y).stats.forward.nfe == 6  # not at evaluation
    assert m(stream.batch(0, 0), pretrain=True).stats is None  # pretraining stacks layers, no solve
    with pytest.raises(ValueError, match="forward_jitter must be below the forward threshold 6"):
        DEQTransformerLM(SMALL, V, SolverSettings("anderson", 6, 1e-3), forward_jitter=6)
    with pytest.raises(ValueError, match="forward_jitter=-1"):
        DEQTransformerLM(SMALL, V, forward_jitter=-1)


def test_positional_embedding_dropout_is_one_mask_per_channel_held_for_the_step():
    m = _model(replace(SMALL, dropout=0.5)).train()
    x, _ = _tokens()
    plain = m.context(m.inject(m.embed(x)), _memory())  # outside a step: fresh masks
    torch.manual_seed(3)
    with once_per_step(m):
        u = m.inject(m.embed(x))
        a, b = m.context(u, _memory()).pos, m.context(u, _memory()).pos
    assert torch.equal(a, b)  # held for the whole step (every call of f sees the same)
    m.eval()
    clean = m.context(m.inject(m.embed(x)), _memory()).pos  # (K, d) sinusoids; row 1 has no zero entry
    scale = torch.where(a[1] == 0, 0.0, 2.0).double()  # per channel: dropped, or kept and scaled by 1/(1-p)
    torch.testing.assert_close(a, clean * scale)  # one mask per channel, the same at every position
    assert (scale == 0).any() and (scale == 2).any()
    assert plain.pos.shape == clean.shape


@pytest.mark.parametrize("explicit", [False, True])
def test_equilibrium_pair_is_f_at_a_leaf_at_the_equilibrium(explicit):
    m = _model(explicit=explicit).eval()
    x, _ = _tokens()
    z, fz, stats = m.equilibrium_pair(x, _memory())
    assert z.shape == fz.shape == (3, 5 * 16) and z.is_leaf and z.requires_grad and fz.requires_grad
    with once_per_step(m):
        ctx = m.context(m.inject(m.embed(x)), _memory())
        torch.testing.assert_close(fz.detach(), m.layer(z.detach().view(3, 5, 16), ctx).reshape(3, -1))
        if explicit:
            assert stats is None
            h = torch.zeros(3, 5, 16, dtype=torch.float64)
            for _ in range(SMALL.n_layer):
                h = m.layer(h, ctx)
            torch.testing.assert_close(z.detach(), h.reshape(3, -1))
        else:
            assert stats.forward.rel_residual.max() < 1e-10  # at the fixed point: f(z) = z
            torch.testing.assert_close(fz.detach(), z.detach(), rtol=0, atol=1e-9)
    if explicit:  # solve=True: the explicit stack's layer is solved for its fixed point instead
        z2, fz2, st = m.equilibrium_pair(x, _memory(), solve=True)
        assert st is not None and st.forward.rel_residual.max() < 1e-10
