"""Training and evaluation on two CPU processes (gloo), started the way a cluster would start
them (``torchrun``): parameters stay identical across ranks, and metrics count every test
example exactly once."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "scripts" / "distributed_worker.py"
LM_WORKER = ROOT / "tests" / "scripts" / "distributed_lm_resume_worker.py"


def _torchrun(worker: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_keep_identical_parameters_and_count_the_test_set_once(tmp_path):
    _torchrun(WORKER, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert all(r["steps"] == 6 for r in ranks)  # 48 examples, batch 16, 2 epochs
    for r in ranks:
        assert r["param_spread"] == 0.0  # every rank holds rank 0's parameters, bit for bit
        assert all(n >= 1 for n in r["bwd_nfe"])  # the implicit backward ran on every step
    assert ranks[0]["param_norm"] == ranks[1]["param_norm"]
    n = 23
    for r in ranks:  # the sums of i and i^2 over the set: each index exactly once
        assert r["counts"] == {"n": n, "idx": n * (n - 1) / 2, "idx_sq": (n - 1) * n * (2 * n - 1) / 6}
        assert r["metrics"]["n"] == n
    # the same gathered figures on both ranks (compared as text: NaN is a value here)
    assert json.dumps(ranks[0]["metrics"], sort_keys=True) == json.dumps(ranks[1]["metrics"], sort_keys=True)


def test_two_process_lm_resumes_each_process_memory_bit_for_bit(tmp_path):
    """The segment memory differs per process; a run stopped and resumed must give each
    process its own back, so that it matches the run without a break on every rank."""
    _torchrun(LM_WORKER, tmp_path)
    ranks = [json.loads((tmp_path / f"lm_rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["resumed_from"] == 7 and r["steps"] == 19
        assert r["warnings"] == [], r["warnings"]  # no memory lost or mismatched
        assert r["mem_len_resumed"][0] == 3.0  # the first step after the break had its memory
        assert r["loss_resumed"] == r["loss_full"], r["rank"]
        assert r["params_equal"] and r["memory_equal"], r["rank"]
    assert ranks[0]["loss_full"] != ranks[1]["loss_full"]  # the ranks really saw different data
    assert (tmp_path / "b" / "checkpoint.rank1.pt").exists()
