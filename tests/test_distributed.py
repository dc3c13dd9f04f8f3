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
IMAGENET_WORKER = ROOT / "tests" / "scripts" / "distributed_imagenet_worker.py"


def _torchrun(worker: Path, *args: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), *map(str, args)],
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


def test_two_process_imagenet_arm_shares_each_epoch_and_gathers_the_validation_set_once(tmp_path):
    """The ImageNet experiment's run_arm, as ``accelerate launch`` runs it: each rank trains on
    a disjoint share of every batch and the shares cover each epoch's images; the ranks end
    with the same parameters; the validation outcomes are gathered, every image once, the same
    on both ranks and the same as one process evaluating the trained model alone."""
    from test_imagenet_data import _folder

    folder = _folder(tmp_path / "tiny", n_train=4, n_val=2)  # 3 classes: 12 training, 6 validation images
    _torchrun(IMAGENET_WORKER, folder, tmp_path)
    ranks = [json.loads((tmp_path / f"imagenet_rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert all(r["steps"] == 6 for r in ranks)  # 12 images, batch 4, 2 epochs
    order = ranks[0]["epoch_order"]
    assert order == ranks[1]["epoch_order"] and order[0] != order[1]  # one shuffle per epoch, shared
    for epoch in range(2):
        shares = []
        for r in ranks:
            calls = [c for c in r["calls"] if c["world"] == 2 and c["epoch"] == epoch]
            assert [c["i"] for c in calls] == [0, 1, 2] and all(c["rank"] == r["rank"] for c in calls)
            shares.append([i for c in calls for i in c["indices"]])
        assert len(shares[0]) == len(shares[1]) == 6
        assert not set(shares[0]) & set(shares[1])  # disjoint
        assert sorted(shares[0] + shares[1]) == list(range(12))  # together: every image of the epoch
    for r in ranks:
        assert r["param_spread"] == 0.0  # every rank holds the same parameters, bit for bit
        assert r["metrics"]["n_test"] == 6 and len(r["outcomes"]["correct"]) == 6
        assert r["metrics"]["acc"] == sum(r["outcomes"]["correct"]) / 6
    assert ranks[0]["outcomes"] == ranks[1]["outcomes"] == ranks[0]["outcomes_one_process"]
    assert json.dumps(ranks[0]["metrics"]["acc_nfe_2"]) == json.dumps(ranks[1]["metrics"]["acc_nfe_2"])
