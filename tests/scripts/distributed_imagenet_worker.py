"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: trains the ImageNet
experiment's MDEQ + JR arm (``deqlib.experiments.imagenet.run_arm``, the code ``accelerate
launch`` runs) for two epochs on a tiny ImageFolder, and writes to ``<out>/imagenet_rank<r>.json``
which images each training call served this rank, the parameters' spread across the ranks, the
gathered validation metrics and outcomes, and (rank 0) the outcomes of the same model evaluated
by one process."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from deqlib.data.imagenet import ImageNetDataConfig
from deqlib.deq import SolverSettings
from deqlib.experiments.image_classification import (JR_ARM, ArmsConfig, ClassificationEvalConfig,
                                                     evaluate_equilibrium)
from deqlib.experiments.imagenet import ImageNetExperiment, load_data, run_arm
from deqlib.jacobian import JacobianPenalty
from deqlib.models.mdeq import MDEQConfig
from deqlib.train import TrainConfig


class RecordingBatches:
    """The training batches, noting the images each call serves."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.steps_per_epoch = inner.steps_per_epoch

    def batch(self, epoch, i, rank=0, world=1):
        self.calls.append({"epoch": epoch, "i": i, "rank": rank, "world": world,
                           "indices": self.inner.indices(epoch, i, rank, world)})
        return self.inner.batch(epoch, i, rank, world)


class RecordingData:
    def __init__(self, data):
        self.data, self.recorders = data, []
        self.classes = data.classes

    def train_batches(self, batch_size, seed):
        self.recorders.append(RecordingBatches(self.data.train_batches(batch_size, seed)))
        return self.recorders[-1]

    def eval_batches(self):
        return self.data.eval_batches()


def main(folder: Path, out: Path) -> None:
    acc = Accelerator(cpu=True)
    exp = ImageNetExperiment(
        data=ImageNetDataConfig(root=str(folder.parent), folder=folder.name, train_size=8, eval_size=8,
                                eval_resize=10, scale=(0.5, 1.0), workers=0),
        model=MDEQConfig(channels=(4, 8), expansion=2, groups=2, dropout=0.2, downsample=1, head_channels=(4, 8),
                         final_channels=8, num_classes=3, image_size=8, init_std=None),
        train=TrainConfig(epochs=2, batch_size=4, lr=3e-3, forward=SolverSettings("anderson", 4, 1e-3),
                          backward=SolverSettings("anderson", 4, 1e-4), jacobian=JacobianPenalty(gamma=0.5, p=0.5)),
        arms=ArmsConfig(gammas=(0.0, 0.5)), seeds=(0,),
        eval=ClassificationEvalConfig(batch_size=4, nfe=(1, 2), compare_nfe=2, nfe_cap=4, plain_cap=4, jac_batch=2,
                                      jac_probes=1, radius_iters=3, radius_vectors=2, memory_batch=2))
    data = RecordingData(load_data(exp))
    res = run_arm(exp, JR_ARM, 0, data, progress=False, accelerator=acc)
    flat = torch.cat([p.detach().flatten() for p in res.model.parameters()])
    every = acc.gather(flat.unsqueeze(0))  # (world, P)
    record = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "steps": len(res.records),
        "calls": data.recorders[0].calls,
        "epoch_order": [data.recorders[0].inner.permutation(e) for e in range(exp.train.epochs)],
        "param_spread": float((every - every[0]).abs().max()),
        "metrics": res.metrics,
        "outcomes": {k: v.tolist() for k, v in res.outcomes.items()},
    }
    if acc.is_main_process:
        _, alone = evaluate_equilibrium(res.model, data.eval_batches(), exp.eval)
        record["outcomes_one_process"] = {k: v.tolist() for k, v in alone.items()}
    (out / f"imagenet_rank{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
