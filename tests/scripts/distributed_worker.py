"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: trains a tiny MDEQ
through ``deqlib.train.train`` on the gloo backend, evaluates it with ``deqlib.train.evaluate``,
and writes what each rank saw to ``<out>/rank<r>.json``."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from deqlib.data.cifar import normalize
from deqlib.deq import SolverSettings
from deqlib.jacobian import JacobianPenalty
from deqlib.models.mdeq import MDEQ, MDEQConfig
from deqlib.train import TensorBatches, TrainConfig, evaluate, train

N_TEST = 23  # not a multiple of the eval batch or of the world size: no padding may count twice


def main(out: Path) -> None:
    acc = Accelerator(cpu=True)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, seed=0, forward=SolverSettings("anderson", 5, 1e-3),
                      backward=SolverSettings("anderson", 5, 1e-4), jacobian=JacobianPenalty(gamma=0.5, p=0.5))
    mcfg = MDEQConfig(channels=(4, 8), expansion=2, groups=2, dropout=0.2, downsample=1, head_channels=(4, 8),
                      final_channels=8, image_size=8, init_std=None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    test_x = torch.randint(0, 256, (N_TEST, 3, 8, 8), dtype=torch.uint8, generator=g)
    test_y = torch.randint(0, 10, (N_TEST,), generator=g)
    torch.manual_seed(acc.process_index + 1)  # different initial weights per rank: DDP must sync them
    model = MDEQ(mcfg, cfg.forward, cfg.backward)
    result = train(model, TensorBatches((x, y), cfg.batch_size, seed=cfg.seed), cfg, progress=False, accelerator=acc)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    every = acc.gather(flat.unsqueeze(0))  # (world, P)

    def fn(start, stop):
        idx = torch.arange(start, stop, dtype=torch.float64)
        return {"n": stop - start, "idx": idx.sum(), "idx_sq": idx.square().sum()}

    counts = evaluate(fn, N_TEST, 5, acc)
    model.eval()

    @torch.no_grad()
    def correct(start, stop):  # test accuracy at two NFE caps, split across the processes
        x, y = normalize(test_x[start:stop]), test_y[start:stop]
        out = {"n": stop - start}
        for k in (1, 2):
            logits, _ = model.predict(x, forward_solver=SolverSettings("anderson", k, 1e-3))
            out[f"correct_nfe_{k}"] = (logits.argmax(dim=1) == y).sum()
        return out

    metrics = evaluate(correct, N_TEST, 4, acc)
    record = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "steps": result.steps,
        "param_spread": float((every - every[0]).abs().max()),
        "param_norm": float(flat.norm()),
        "counts": counts,
        "metrics": metrics,
        "bwd_nfe": [r["bwd_nfe"] for r in result.records],
    }
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
