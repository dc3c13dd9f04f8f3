"""Notebook 05's harness: what a DEQ step costs in memory, measured on small models.

The central property (the DEQ paper's): with the implicit backward a step's memory does not
depend on how many calls the forward solve made, while the same solve differentiated by
unrolled autograd stores every iterate. A regression that starts storing iterates (or solver
history that grows with the calls) under the implicit backward fails here."""

import math

import pytest
import torch

from deqlib.deq import DEQ, SolverSettings
from deqlib.experiments.core import ArmResult
from deqlib.experiments.memory import (CLAIMS, MDEQSpec, MemoryEval, MemoryExperiment, MDEQSteps, TransformerSpec,
                                       TransformerSteps, device_figures, expected_times, measure_memory,
                                       memory_verdicts, solver_buffers, time_rounds, time_verdicts)
from deqlib.jacobian import JacobianPenalty
from deqlib.measure import PeakMemory, saved_tensor_bytes, step_memory
from deqlib.solvers import AndersonOptions

from conftest import ROOT

TINY_LM = TransformerSpec(batch=2, d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=6, mem_len=6, vocab=60,
                          cutoffs=(20, 40), depth=3, time_nfe=(2, 4))
TINY_MDEQ = MDEQSpec(batch=2, channels=(8, 16), head_channels=(8, 16), final_channels=16, image_size=16, depth=2,
                     time_nfe=(2, 4))


class _Map(torch.nn.Module):
    """A small contractive map f(z, x) = 0.5 tanh(z W + x), z of shape (B, 64)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, z, x):
        return 0.5 * torch.tanh(self.lin(z) + x)


def _deq_step(mode: str, nfe: int, method: str = "anderson"):
    torch.manual_seed(0)
    f = _Map()
    deq = DEQ(f, SolverSettings(method, nfe, 1e-12), SolverSettings("anderson", 8, 1e-12), backward=mode)
    x, w = torch.randn(16, 64), torch.randn(16, 64)

    def step():
        f.zero_grad(set_to_none=True)
        z, stats = deq(x, torch.zeros(16, 64))
        (z * w).mean().backward()
        return {"fwd_nfe": stats.forward.nfe, "bwd_nfe": None}

    return step


@pytest.mark.parametrize("method", ["anderson", "fixed_point"])
def test_implicit_memory_is_flat_in_nfe_and_unrolled_memory_grows(method):
    """From 4 to 32 forward calls: the implicit step's saved bytes are identical and its peak
    (the solver's buffers included) moves by under 5%; the unrolled one's grows with the calls."""
    implicit = {k: measure_memory(_deq_step("implicit", k, method)) for k in (4, 32)}
    unrolled = {k: measure_memory(_deq_step("unrolled", k, "fixed_point")) for k in (4, 32)}
    assert implicit[4]["fwd_nfe"] == 4 and implicit[32]["fwd_nfe"] == 32  # every solve ran the NFE asked
    assert implicit[32]["saved_bytes"] == implicit[4]["saved_bytes"]
    assert implicit[32]["peak_live_bytes"] <= 1.05 * implicit[4]["peak_live_bytes"]
    assert unrolled[32]["saved_bytes"] > 5 * unrolled[4]["saved_bytes"]
    assert unrolled[32]["peak_live_bytes"] > 3 * unrolled[4]["peak_live_bytes"]
    assert unrolled[32]["peak_live_bytes"] > 2 * implicit[32]["peak_live_bytes"]


@pytest.mark.parametrize("steps_cls, spec", [(TransformerSteps, TINY_LM), (MDEQSteps, TINY_MDEQ)])
def test_the_models_layer_steps_are_flat_for_the_implicit_backward_and_grow_otherwise(steps_cls, spec):
    steps = steps_cls(spec)
    mem = {(m, k): measure_memory(steps.step(m, k, core=True)) for m in ("implicit", "unrolled", "tied", "untied")
           for k in (4, 32)}
    assert mem[("implicit", 4)]["saved_bytes"] == mem[("implicit", 32)]["saved_bytes"]
    assert abs(mem[("implicit", 32)]["peak_live_bytes"] / mem[("implicit", 4)]["peak_live_bytes"] - 1) < 0.05
    for m in ("unrolled", "tied", "untied"):
        assert mem[(m, 32)]["peak_live_bytes"] > 3 * mem[(m, 4)]["peak_live_bytes"], m
    # one call of f with grad: about one layer of a stack
    assert mem[("implicit", 4)]["saved_bytes"] < mem[("tied", 4)]["saved_bytes"]
    # the untied stack's layers are distinct: their parameters and their normalized weights count
    assert steps.layer_param_bytes("untied", 4) == 4 * steps.layer_param_bytes("tied", 4)
    assert mem[("untied", 4)]["saved_bytes"] > mem[("tied", 4)]["saved_bytes"]


def test_a_measurement_is_exact_and_repeats_bit_for_bit():
    steps = TransformerSteps(TINY_LM)
    first = measure_memory(steps.step("implicit", 6, penalty=JacobianPenalty(gamma=1.0), core=True))
    again = measure_memory(steps.step("implicit", 6, penalty=JacobianPenalty(gamma=1.0), core=True))
    assert first == again


def test_step_memory_takes_the_peak_and_the_saved_bytes_in_one_run():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)

    def fn():
        w.grad = None
        (torch.tanh(x @ w) ** 2).sum().backward()

    mem = step_memory(fn)
    with PeakMemory() as pm:
        fn()
    _, saved = saved_tensor_bytes(lambda: (torch.tanh(x @ w) ** 2).sum())
    assert (mem.peak_live_bytes, mem.saved_bytes, mem.cuda_peak_bytes) == (pm.peak, saved, None)
    # tanh's output and its square's input (one storage), and x for the weight's gradient
    assert saved == 64 * 256 * 4 + x.numel() * 4
    assert mem.peak_live_bytes >= saved + w.numel() * 4  # the gradient is made inside too


def test_the_penalty_adds_its_graph_on_a_step_that_draws_it():
    steps = MDEQSteps(TINY_MDEQ)
    plain = measure_memory(steps.step("implicit", 7, 8, core=True))
    jr = measure_memory(steps.step("implicit", 7, 8, penalty=TINY_MDEQ.jacobian, core=True))
    assert jr["saved_bytes"] > 1.3 * plain["saved_bytes"] and jr["peak_live_bytes"] > plain["peak_live_bytes"]
    with pytest.raises(ValueError, match="the penalty needs an equilibrium solve"):
        steps.step("tied", 3, penalty=TINY_MDEQ.jacobian)
    with pytest.raises(ValueError, match="method must be one of"):
        steps.step("checkpointed", 3)


def test_solver_buffers_anderson_keeps_its_window_and_broyden_grows_with_the_calls():
    """Anderson holds its m-window whatever the NFE; Broyden (the Transformer's backward
    solver) holds more the more calls it takes: the B.1 argument, fewer NFE -> less memory."""
    steps = TransformerSteps(TINY_LM)
    short, long = solver_buffers(steps, 13, 13), solver_buffers(steps, 30, 30)
    m = AndersonOptions().m
    assert short["fwd_solver_states"] == pytest.approx(long["fwd_solver_states"], rel=0.02)  # Anderson
    assert short["fwd_solver_states"] >= 2 * m
    assert long["bwd_solver_states"] > 1.3 * short["bwd_solver_states"]  # Broyden


def test_time_rounds_interleave_and_jr_time_is_the_expectation_at_p():
    calls = []
    times = time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4 and all(len(v) == 3 for v in times.values())  # one warm-up each
    rows = [{"model": "transformer", "config": c, "round": r, "seconds": s}
            for c, ts in {"deq@13": [1.0, 2.0], "deq+jr@13": [3.0, 4.0]}.items() for r, s in enumerate(ts)]
    t = expected_times(ArmResult("transformer", 0, {"p": 0.25}, curves={"times": rows}))
    assert t["deq+jr(p)@13"] == [0.75 * 1.0 + 0.25 * 3.0, 0.75 * 2.0 + 0.25 * 4.0]


def _fake_result(implicit_peaks: dict[int, float], saved: float = 4.0) -> ArmResult:
    rows = [{"model": "x", "method": "implicit", "depth": k, "core_peak_live_mb": v, "core_saved_mb": saved}
            for k, v in implicit_peaks.items()]
    for method, per in (("unrolled", 3.0), ("tied", 3.0), ("untied", 3.5)):
        rows += [{"model": "x", "method": method, "depth": k, "core_peak_live_mb": 4 + per * k,
                  "core_saved_mb": 3 + per * k} for k in (4, 32)]
    return ArmResult("mdeq", 0, {}, curves={"memory": rows, "rows": []})


def test_the_flatness_verdict_fails_when_the_implicit_step_stores_iterates():
    held = memory_verdicts([_fake_result({4: 8.0, 16: 8.1, 32: 8.0})], flat_tolerance=0.05)
    assert held["mdeq.flat"].verdict == "held" and held["mdeq.grows"].verdict == "held"
    grown = memory_verdicts([_fake_result({4: 8.0, 16: 14.0, 32: 20.0})], flat_tolerance=0.05)
    assert grown["mdeq.flat"].verdict == "not held"
    assert grown["mdeq.flat"].claim == CLAIMS["flat"] and "exact" in grown["mdeq.flat"].test


def test_the_small_experiment_runs_end_to_end_at_a_tiny_size():
    from deqlib.experiments.memory import run_arm

    exp = MemoryExperiment(transformer=TINY_LM, mdeq=TINY_MDEQ,
                           eval=MemoryEval(nfe=(2, 4), depths=(1, 2), repeats=2))
    results = [run_arm(exp, arm, 0) for arm in exp.models]
    verdicts = memory_verdicts(results, exp.eval.flat_tolerance)
    assert set(verdicts) == {"transformer.flat", "transformer.grows", "mdeq.flat", "mdeq.grows",
                             "transformer.vs_explicit", "transformer.jr_memory", "transformer.solver_memory"}
    assert verdicts["transformer.flat"].verdict == verdicts["mdeq.flat"].verdict == "held"
    tv = time_verdicts(results, TINY_LM.depth)
    assert set(tv) == {"transformer.time_deq30", "transformer.time_jr", "transformer.time_jr_explicit"}
    rows = {r["row"]: r for r in results[0].curves["rows"]}
    assert rows["post_ln_jr_13"]["fwd_nfe"] == 13 and rows["post_ln_30"]["bwd_nfe"] == 30
    assert all(math.isfinite(r["whole_peak_live_mb"]) for r in rows.values())


def test_the_committed_gpu_figures_are_read_with_their_device():
    gpu = device_figures(ROOT / "outputs" / "device")
    assert gpu["transformer"]["device"].startswith("NVIDIA")
    by = {r["model"]: r for r in gpu["transformer"]["rows"]}
    assert by["DEQ + JR (penalty on the step)"]["/ DEQ"] > 1.0 and gpu["transformer"]["penalty_graph_states"] > 0
    assert {r["precision"] for r in gpu["mdeq"]} == {"no", "bf16"}
    assert device_figures(ROOT / "no-such-folder") == {}


@pytest.mark.parametrize("override, message", [
    ({"eval.repeats": 1}, r"repeats must be an integer >= 2, got repeats=1"),
    ({"eval.nfe": [4]}, r"nfe and depths need two values each"),
    ({"eval.modes": ["implicit", "adjoint"]}, r"modes must be .*got modes=\('implicit', 'adjoint'\)"),
    ({"transformer.jacobian.p": 0.0}, r"jacobian must have gamma > 0 and p > 0"),
    ({"models": ["resnet"]}, r"models must be .*got models=\('resnet',\)"),
    ({"device": "tpu"}, r"device must be cpu, cuda, cuda:N or auto, got device='tpu'"),
    ({"mdeq.channels": [10, 20, 40]}, r"in memory.small.mdeq: groups=4 does not divide the widths \[10\]"),
])
def test_bad_settings_are_refused_by_name_before_any_measurement(override, message):
    from deqlib.config import load_experiment

    with pytest.raises(ValueError, match=message):
        load_experiment(MemoryExperiment, "memory", "small", override, ROOT / "params.yaml")
