"""The benchmark CLI's solver measurements: what they report must hold, whatever the timings."""

import re

import pytest
import torch

from conftest import ROOT
from deqlib.bench import bench_mdeq, bench_solvers, main


def test_bench_solvers_reports_every_method_and_memory_flat_in_max_iter():
    report = bench_solvers(batch=2, channels=8, size=8, repeats=1, max_iters=(60, 300), device="cpu")
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"fixed_point", "anderson", "broyden"}
    for r in rows.values():
        assert r["status"] == "converged" and r["max_rel_residual"] < 1e-3
        assert r["overhead"] > 0 and r["nfe"] >= 1
        assert r["overhead_range"][0] <= r["overhead"] <= r["overhead_range"][1]
        # no storage that grows with max_iter
        assert r["extra_mem_mb_max_iter_60"] == r["extra_mem_mb_max_iter_300"]
    # the histories: Anderson keeps 2m = 10 states, Broyden window + 3 = 23 plus its basis rows
    assert rows["anderson"]["extra_mem_states_max_iter_60"] > rows["fixed_point"]["extra_mem_states_max_iter_60"]
    assert rows["broyden"]["extra_mem_states_max_iter_60"] > rows["anderson"]["extra_mem_states_max_iter_60"]
    assert report["device"].startswith("CPU")
    # operations outside f: plain iteration does only the bookkeeping every method shares
    assert 0 < rows["fixed_point"]["ops_per_iter"] < rows["anderson"]["ops_per_iter"]
    assert rows["fixed_point"]["ops_per_iter"] < rows["broyden"]["ops_per_iter"]


def test_op_counter_counts_computing_operations_only():
    from deqlib.measure import OpCounter

    x = torch.randn(4, 5)
    with OpCounter() as counter:
        y = x.view(20).unsqueeze(0)[:, 2:]  # views: nothing computed
        z = (y * 2).sum()  # 2
        with counter.paused():
            x + 1  # left out
        torch.stack([z, z])  # 1
        assert counter.count == 3
    x.sum()  # after the block
    assert counter.count == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA device")
def test_bench_solvers_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        main(["solvers", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    # each of these ran its benchmark first (55 s for --json) and ended in a traceback
    (["solvers", "--json", "/nonexistent/dir/x.json"],
     r"--json must be a file in an existing, writable folder, got --json='/nonexistent/dir/x.json' "
     r"\(no folder /nonexistent/dir\)"),
    (["solvers", "--tol", "inf"], r"--tol must be a finite number in \(0, 1\), got --tol=inf"),
    (["solvers", "--tol", "nan"], r"--tol must be a finite number in \(0, 1\), got --tol=nan"),
    (["solvers", "--channels", "3"], r"--channels must be a multiple of 8 \(the map's GroupNorm groups\), "
                                     r"got --channels=3"),
    (["solvers", "--batch", "0"], r"--batch must be an integer >= 1, got --batch=0"),
    (["mdeq", "--json", "/nonexistent/x.json"], r"--json must be .*\(no folder /nonexistent\)"),
    (["mdeq", "--steps", "0"], r"--steps must be an integer >= 1, got --steps=0"),
    (["mdeq", "--params", "/nonexistent/params.yaml"], r"--params.*/nonexistent/params.yaml"),
    (["transformer", "--profile", "small", "--set", "model.d_model=15"],
     r"in wikitext\.small\.model: d_model must be even.*d_model=15"),
    (["transformer", "--profile", "small", "--vocab", "100"], r"cutoffs=\[1000, 4000\] .* vocabulary size 100"),
    (["transformer", "--repeats", "0"], r"--repeats must be an integer >= 1, got --repeats=0"),
    (["compare", "--profile", "small", "--set", "repeats=0"], r"in solvers\.small: repeats must be an integer >= 1"),
    (["compare", "--json", "/"], r"--json must be a file .*got --json='/' \(a folder\)"),
])
def test_bad_arguments_are_one_usage_line_before_any_work(argv, message, monkeypatch, capsys):
    from deqlib.bench import cli

    for name in ("bench_solvers", "bench_mdeq", "bench_transformer", "bench_compare", "steady_malloc"):
        monkeypatch.setattr(cli, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran before the checks"))
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"python -m deqlib.bench \w+: error: " + message, last), last


def test_bench_mdeq_measures_both_arms_each_with_its_own_model(tmp_path):
    """Each arm's step closes over that arm's model and optimizer (ruff's F821 on the old
    loop, which deleted them at the end of each pass, was a false alarm: no step ran after the
    deletion); the penalty arm adds the training loop's term, so it takes more memory."""
    report = bench_mdeq("small", batch=2, steps=1, params_path=ROOT / "params.yaml", device="cpu")
    plain, jr = report["rows"]
    assert (plain["arm"], jr["arm"]) == ("MDEQ", "MDEQ + JR (penalty on this step)")
    for row in (plain, jr):
        assert row["fwd_nfe"] >= 1 and row["bwd_nfe"] >= 1 and row["step_time_s"] > 0
        assert 0 < row["peak_fwd_bwd_mb"] <= row["peak_step_mb"]
    assert jr["peak_fwd_bwd_mb"] > plain["peak_fwd_bwd_mb"]
    assert report["memory"].startswith("deqlib.measure.PeakMemory") and report["device"].startswith("CPU")


def test_bench_mdeq_reads_the_imagenet_model_and_counts_images_per_second():
    report = bench_mdeq("small", batch=2, steps=1, params_path=ROOT / "params.yaml", device="cpu",
                        experiment="imagenet")
    assert report["experiment"] == "imagenet" and report["channels"] == [16, 32]
    for row in report["rows"]:
        assert row["images_per_s"] == pytest.approx(2 / row["step_time_s"])
    with pytest.raises(ValueError, match="experiment="):
        bench_mdeq("small", experiment="mnist")


def test_bench_mdeq_adds_the_penalty_with_the_training_loop_s_add_penalty(monkeypatch):
    from deqlib.bench import model_step
    from deqlib.step import add_penalty

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return add_penalty(*args, **kwargs)

    monkeypatch.setattr(model_step, "add_penalty", counted)
    bench_mdeq("small", batch=2, steps=1, params_path=ROOT / "params.yaml", device="cpu")
    # the penalty arm only: warm-up, 1 timed step, then forward + backward and a step for the peaks
    assert len(calls) == 4 and all(c.gamma > 0 for c in calls)


def test_peak_memory_counts_what_the_call_makes_on_cpu():
    from deqlib.measure import PeakMemory, peak_memory

    x = torch.ones(1000)  # made before: not counted

    def call():
        y = x * 2  # 4000 bytes
        return (y + 1).sum()  # 4000 more while y lives

    peak = peak_memory(call, "cpu")
    with PeakMemory() as pm:
        call()
    assert peak.nbytes == pm.peak >= 8000 and "PeakMemory" in peak.counted
    assert peak_memory(call, torch.device("cpu"), count_existing=True).nbytes == peak.nbytes
