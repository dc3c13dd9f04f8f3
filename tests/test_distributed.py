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


def test_two_processes_keep_identical_parameters_and_count_the_test_set_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
